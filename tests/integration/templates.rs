//! New ext4 volumes are copies of a template made once per size
//! (`node::template`): each is a clean filesystem with a UUID of its own,
//! independent of every other copy, on a pool that reflinks (xfs) and on
//! one that cannot (ext4: sparse copies); and a volume that holds data is
//! never formatted again, template or not.

use std::path::{Path, PathBuf};
use std::process::Command;

use filevol::ops::requests as req;
use filevol::proto::csi::volume_capability::access_mode::Mode;
use filevol_kit::node_env::NodeEnv;

use crate::BIN;

fn cap() -> filevol::proto::csi::VolumeCapability {
    req::mount_cap(Mode::SINGLE_NODE_WRITER, "ext4")
}

/// Stages and publishes `id`, runs `f` on the mounted target, and takes it
/// all down again.
fn with_mounted<T>(env: &NodeEnv, id: &str, f: impl FnOnce(&Path) -> T) -> T {
    let n = env.d.node();
    let (staging, target) = (env.staging(id), env.target(&format!("pod-{id}")));
    n.node_stage_volume(&req::stage(id, &staging, cap()))
        .unwrap();
    n.node_publish_volume(&req::publish(id, &staging, &target, cap(), false))
        .unwrap();
    let out = f(&target);
    n.node_unpublish_volume(&req::unpublish(id, &target))
        .unwrap();
    n.node_unstage_volume(&req::unstage(id, &staging)).unwrap();
    out
}

fn write_synced(path: &Path, bytes: &[u8]) {
    std::fs::write(path, bytes).unwrap();
    std::fs::File::open(path).unwrap().sync_all().unwrap();
}

/// What `blkid -p` says the UUID of `image` is.
fn uuid(image: &Path) -> String {
    let out = Command::new("blkid")
        .args(["-p", "-o", "value", "-s", "UUID"])
        .arg(image)
        .output()
        .unwrap();
    assert!(out.status.success(), "blkid {}: {out:?}", image.display());
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Asserts that `e2fsck -fn` finds nothing to fix in `image`.
fn assert_clean(image: &Path) {
    let out = Command::new("e2fsck")
        .arg("-fn")
        .arg(image)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "e2fsck -fn {}: {}{}",
        image.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn templates(pool: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(pool.join("templates"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect()
}

/// Two volumes of one size on a pool of filesystem `pool_fs`: one
/// template, two clean filesystems with their own UUIDs and their own data.
fn two_volumes_from_one_template(pool_fs: &str) {
    let env = NodeEnv::new(BIN, pool_fs, 1024);
    let a = env.create("template-a", 256, "ext4");
    let b = env.create("template-b", 256, "ext4");
    with_mounted(&env, &a, |t| write_synced(&t.join("a"), b"volume a"));
    with_mounted(&env, &b, |t| write_synced(&t.join("b"), b"volume b"));

    let made = templates(&env.pool);
    assert_eq!(made.len(), 1, "one template for one size: {made:?}");
    let template = &made[0];
    let name = template.file_name().unwrap().to_string_lossy().into_owned();
    assert!(name.starts_with("ext4-268435456-"), "{name}");
    assert_eq!(std::fs::metadata(template).unwrap().len(), 256 << 20);
    // Templates are no volumes.
    let listed = env.d.controller().list_volumes(&req::list(0, "")).unwrap();
    assert_eq!(listed.entries.len(), 2);

    for image in [env.image(&a), env.image(&b), template.clone()] {
        assert_clean(&image);
    }
    let uuids = [uuid(&env.image(&a)), uuid(&env.image(&b)), uuid(template)];
    assert!(
        uuids[0] != uuids[1] && uuids[0] != uuids[2] && uuids[1] != uuids[2],
        "every copy has its own UUID: {uuids:?}"
    );

    // Each volume holds its own data and nothing of the other's.
    let names = |t: &Path| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(t)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n != "lost+found")
            .collect();
        v.sort();
        v
    };
    with_mounted(&env, &a, |t| {
        assert_eq!(names(t), ["a"]);
        assert_eq!(std::fs::read(t.join("a")).unwrap(), b"volume a");
    });
    with_mounted(&env, &b, |t| {
        assert_eq!(names(t), ["b"]);
        assert_eq!(std::fs::read(t.join("b")).unwrap(), b"volume b");
    });
    // Still clean after a second life, and a deleted volume takes nothing
    // of the template with it.
    assert_clean(&env.image(&a));
    for id in [&a, &b] {
        env.d.controller().delete_volume(&req::delete(id)).unwrap();
    }
    assert_clean(template);
}

#[test]
#[ignore = "needs root"]
fn template_copies_are_clean_independent_and_have_their_own_uuid_on_a_reflink_pool() {
    two_volumes_from_one_template("xfs");
}

#[test]
#[ignore = "needs root"]
fn template_copies_are_clean_independent_and_have_their_own_uuid_on_a_pool_without_reflink() {
    two_volumes_from_one_template("ext4");
}

/// A volume that holds a filesystem (and data) is never formatted again,
/// even when its record says it was never written (a crash before the
/// record, or a record older than the field) and its template is gone.
#[test]
#[ignore = "needs root"]
fn template_never_reformats_a_volume_with_data() {
    let env = NodeEnv::new(BIN, "ext4", 1024);
    let id = env.create("template-kept", 128, "ext4");
    with_mounted(&env, &id, |t| write_synced(&t.join("kept"), b"precious"));
    let before = uuid(&env.image(&id));
    for t in templates(&env.pool) {
        std::fs::remove_file(t).unwrap();
    }
    let meta_path = env.pool.join("volumes").join(&id).join("meta.json");
    let mut meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&meta_path).unwrap()).unwrap();
    meta["written"] = serde_json::json!(false);
    std::fs::write(&meta_path, serde_json::to_vec(&meta).unwrap()).unwrap();

    with_mounted(&env, &id, |t| {
        assert_eq!(std::fs::read(t.join("kept")).unwrap(), b"precious");
    });
    assert_eq!(uuid(&env.image(&id)), before, "the same filesystem");
    assert!(templates(&env.pool).is_empty(), "no template was needed");
    assert_clean(&env.image(&id));
    env.d.controller().delete_volume(&req::delete(&id)).unwrap();
}
