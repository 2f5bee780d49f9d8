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

/// The size of the ext4 filesystem in `image`, from its superblock: block
/// count (with its high half where the filesystem is 64-bit) x block size.
fn fs_bytes(image: &Path) -> u64 {
    use std::os::unix::fs::FileExt;
    let mut sb = [0u8; 1024];
    std::fs::File::open(image)
        .unwrap()
        .read_exact_at(&mut sb, 1024)
        .unwrap();
    let u32_at = |at: usize| u64::from(u32::from_le_bytes(sb[at..at + 4].try_into().unwrap()));
    let hi = if u32_at(0x60) & 0x80 != 0 {
        u32_at(0x150)
    } else {
        0
    };
    ((hi << 32) | u32_at(0x04)) * (1024 << u32_at(0x18))
}

/// Sizes whose last block group mke2fs leaves out (1025 MiB, and "20G" =
/// 20e9 bytes, which CreateVolume rounds up to whole MiB) are made from a
/// template like any other: one mkfs (the template's), no warning, the
/// template kept, and a filesystem as long as a mkfs of its own would make
/// it: whole groups, less than a group short of the device, which the
/// kernel mounts.
#[test]
#[ignore = "needs root"]
fn ext4_sizes_whose_last_group_mke2fs_leaves_out_are_made_from_templates() {
    const MIB: u64 = 1 << 20;
    const GROUP: u64 = 128 * MIB;
    // A pool that can hold the 20e9-byte volume's promise: 20 GiB of
    // sparse backing file, of which the test writes a few MiB.
    let env = NodeEnv::new(BIN, "xfs", 20 * 1024);
    for (name, asked) in [("odd-1025mi", 1025 * MIB), ("odd-20g", 20_000_000_000)] {
        let r = req::create_volume(name, i64::try_from(asked).unwrap(), cap());
        let v = env
            .d
            .controller()
            .create_volume(&r)
            .unwrap()
            .volume
            .unwrap();
        let (id, bytes) = (v.volume_id, u64::try_from(v.capacity_bytes).unwrap());
        assert_eq!(bytes, asked.div_ceil(MIB) * MIB);
        let total = with_mounted(&env, &id, |t| {
            write_synced(&t.join("f"), b"odd size");
            let st = rustix::fs::statvfs(t).unwrap();
            st.f_blocks * st.f_frsize
        });
        let image = env.image(&id);
        // What mke2fs makes of the size: the last, small group left out.
        let fs = fs_bytes(&image);
        assert_eq!(fs, bytes / GROUP * GROUP, "{name}: {fs} of {bytes}");
        assert!(fs < bytes);
        // Mounted at that size (statfs leaves out the filesystem's own
        // metadata: a few percent).
        assert!(
            total <= fs && total > fs / 10 * 9,
            "{name}: {total} of {fs}"
        );
        assert_clean(&image);
        let prefix = format!("ext4-{bytes}-");
        let made: Vec<_> = templates(&env.pool)
            .into_iter()
            .filter(|p| {
                p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with(&prefix)
            })
            .collect();
        assert_eq!(made.len(), 1, "{name}: the template is kept");
        let log = env.d.log();
        let making = format!("making the template for ext4 of {bytes} bytes");
        assert_eq!(log.matches(&making).count(), 1, "{name}:\n{log}");
        for refused in ["unusable", "running mkfs for this volume"] {
            assert!(!log.contains(refused), "{name}: {refused:?} in\n{log}");
        }
        env.d.controller().delete_volume(&req::delete(&id)).unwrap();
    }
}

/// Templates count in capacity by the blocks they hold, and no more than
/// eight are kept: a ninth size evicts the least recently used; one unused
/// for more than a day is reclaimed by the janitor of the next controller
/// to open the pool.
#[test]
#[ignore = "needs root"]
fn templates_count_in_capacity_and_no_more_than_eight_are_kept() {
    use filevol::proto::csi;
    use filevol_kit::driver::{Driver, Opts};
    use filevol_kit::files::allocated;
    const MIB: u64 = 1 << 20;
    let env = NodeEnv::with_opts(BIN, "xfs", 1024, |o| {
        crate::capacity::with_flag(o, "--overcommit", "1.0")
    });
    let room = |d: &Driver| {
        let r = d
            .controller()
            .get_capacity(&csi::GetCapacityRequest::new())
            .unwrap();
        u64::try_from(r.available_capacity).unwrap()
    };
    let st = rustix::fs::statvfs(&env.pool).unwrap();
    let usable = st.f_blocks * st.f_frsize;
    assert_eq!(room(&env.d), usable);

    let mut ids = Vec::new();
    let mut promised = 0;
    for i in 0..9u64 {
        let id = env.create(&format!("size-{i}"), i64::try_from(16 + i).unwrap(), "ext4");
        promised += (16 + i) * MIB;
        with_mounted(&env, &id, |_| ());
        ids.push(id);
    }
    let made = templates(&env.pool);
    assert_eq!(made.len(), 8, "{made:?}");
    let names: Vec<String> = made
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert!(
        !names
            .iter()
            .any(|n| n.starts_with(&format!("ext4-{}-", 16 * MIB))),
        "the least recently used went: {names:?}"
    );
    let held: u64 = made.iter().map(|p| allocated(p)).sum();
    assert!(held > 0);
    assert_eq!(room(&env.d), usable - promised - held, "templates count");

    // Unused for two days: reclaimed when a controller opens the pool.
    let stale = &made[0];
    let stale_blocks = allocated(stale);
    std::fs::File::options()
        .write(true)
        .open(stale)
        .unwrap()
        .set_modified(std::time::SystemTime::now() - std::time::Duration::from_secs(2 * 86400))
        .unwrap();
    let controller = Driver::start_on(
        BIN,
        &env.pool,
        Opts::default().args(&[
            "--mode",
            "controller",
            "--node-id",
            "janitor",
            "--reserve",
            "0",
            "--overcommit",
            "1.0",
        ]),
    );
    assert!(!stale.exists(), "{}", controller.log());
    assert_eq!(room(&controller), usable - promised - held + stale_blocks);
    drop(controller);
    for id in &ids {
        env.d.controller().delete_volume(&req::delete(id)).unwrap();
    }
}
