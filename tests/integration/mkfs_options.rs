//! `mkfsOptions`: a StorageClass may tune the filesystem, never make mkfs
//! read or write anything else on the node. The controller refuses options
//! off the allowlist before anything is made; the node refuses, before mkfs,
//! a record that an older version accepted.

use std::process::Command;

use filevol::ops::requests::{self as req, MIB};
use filevol::proto::csi::volume_capability::access_mode::Mode;
use filevol_kit::driver::{status, Driver};
use filevol_kit::leaks::{detach_loops_under, is_mounted, loop_of};
use filevol_kit::node_env::NodeEnv;
use grpcio::RpcStatusCode;

use crate::BIN;

/// Options a StorageClass must not pass, per filesystem, and the word the
/// refusal must name: most name a path or device of the node.
const ATTACKS: &[(&str, &str, &str)] = &[
    ("ext4", "-d /etc", "-d"),
    ("ext4", "-d/etc", "-d/etc"),
    ("ext4", "-l /etc/badblocks", "-l"),
    ("ext4", "-z /var/tmp/undo", "-z"),
    ("ext4", "-J device=/dev/sdb", "device"),
    ("ext4", "-M /mnt", "-M"),
    ("ext4", "-e panic", "-e"),
    ("ext4", "-m 1 /dev/sdb", "/dev/sdb"),
    ("ext4", "-jd /etc", "-jd"),
    ("xfs", "-d name=/dev/sdb", "name"),
    ("xfs", "-l logdev=/dev/sdb", "logdev"),
    ("xfs", "-p /etc/protofile", "-p"),
    ("xfs", "-r rtdev=/dev/sdb", "-r"),
    ("btrfs", "-f /dev/sdb", "-f"),
    ("btrfs", "-r /etc", "-r"),
    ("btrfs", "--rootdir=/etc", "--rootdir"),
    ("btrfs", "--root /etc", "--root"),
];

#[test]
fn create_volume_refuses_mkfs_options_that_reach_the_node() {
    let d = Driver::start(BIN);
    let c = d.controller();
    for (fs, options, named) in ATTACKS {
        let mut r = req::create_with("pvc-attack", 512 * MIB, &[("mkfsOptions", options)]);
        r.volume_capabilities[0] = req::mount_cap(Mode::SINGLE_NODE_WRITER, fs);
        let st = status(c.create_volume(&r));
        assert_eq!(
            st.code(),
            RpcStatusCode::INVALID_ARGUMENT,
            "{fs} {options}: {}",
            st.message()
        );
        assert!(
            st.message().contains("parameters") && st.message().contains(named),
            "{fs} {options}: the message names the option: {}",
            st.message()
        );
    }
    // A block volume is never formatted, but its options are what an ext4
    // format would get: held to the same list.
    let mut r = req::create_with("pvc-attack", 8 * MIB, &[("mkfsOptions", "-d /etc")]);
    r.volume_capabilities[0] = req::block_cap(Mode::SINGLE_NODE_WRITER);
    assert_eq!(
        status(c.create_volume(&r)).code(),
        RpcStatusCode::INVALID_ARGUMENT
    );
    // Nothing was made.
    assert_eq!(
        std::fs::read_dir(d.pool.join("volumes")).unwrap().count(),
        0
    );

    // Tuning is accepted, in both spellings, and recorded as given.
    let mut r = req::create_with(
        "pvc-tuned",
        512 * MIB,
        &[(
            "mkfsOptions",
            "-b size=4096 -mreflink=1 -L tuned -i maxpct=5",
        )],
    );
    r.volume_capabilities[0] = req::mount_cap(Mode::SINGLE_NODE_WRITER, "xfs");
    let id = c.create_volume(&r).unwrap().volume.unwrap().volume_id;
    let meta: serde_json::Value = serde_json::from_slice(
        &std::fs::read(d.pool.join("volumes").join(&id).join("meta.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        meta["mkfs_options"],
        serde_json::json!([
            "-b",
            "size=4096",
            "-mreflink=1",
            "-L",
            "tuned",
            "-i",
            "maxpct=5"
        ])
    );
    c.delete_volume(&req::delete(&id)).unwrap();
}

/// A record written by a version that passed mkfsOptions through unchecked:
/// the first stage refuses it before mkfs runs, and leaves nothing behind.
#[test]
#[ignore = "needs root"]
fn stage_refuses_a_recorded_mkfs_option_that_reaches_the_node() {
    let env = NodeEnv::new(BIN, "xfs", 1024);
    let n = env.d.node();
    let id = env.create("old-record", 64, "ext4");
    let meta_path = env.pool.join("volumes").join(&id).join("meta.json");
    let mut meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&meta_path).unwrap()).unwrap();
    meta["mkfs_options"] = serde_json::json!(["-d", "/etc"]);
    std::fs::write(&meta_path, serde_json::to_vec(&meta).unwrap()).unwrap();

    let cap = req::mount_cap(Mode::SINGLE_NODE_WRITER, "ext4");
    let staging = env.staging(&id);
    let image = env.image(&id);
    let size = std::fs::metadata(&image).unwrap().len();
    // Twice: the first refusal let go of the fence, so the second is the
    // same refusal, not "staged by another node plugin".
    for _ in 0..2 {
        let st = status(n.node_stage_volume(&req::stage(&id, &staging, cap.clone())));
        assert_eq!(
            st.code(),
            RpcStatusCode::FAILED_PRECONDITION,
            "{}",
            st.message()
        );
        assert!(
            st.message().contains(&id) && st.message().contains("\"-d\""),
            "names the volume and the option: {}",
            st.message()
        );
        assert!(!is_mounted(&staging));
        assert_eq!(loop_of(&image), None, "no loop device is left attached");
        assert!(
            !filevol_core::node::format::has_data(&image).unwrap(),
            "the image is still blank"
        );
        assert_eq!(std::fs::metadata(&image).unwrap().len(), size);
        assert!(!image.with_file_name(".image.mkfs").exists());
    }
    assert!(detach_loops_under(&env.pool).is_empty());
    // The fence is free: DeleteVolume (which needs it exclusively) goes
    // through.
    env.d.controller().delete_volume(&req::delete(&id)).unwrap();
    assert!(!env.pool.join("volumes").join(&id).exists());
}

/// Allowed options reach mkfs: the label set in the StorageClass is on the
/// staged filesystem, and an ext4 `-E` keeps filevol's own `nodiscard`.
#[test]
#[ignore = "needs root"]
fn allowed_mkfs_options_reach_mkfs() {
    let env = NodeEnv::new(BIN, "xfs", 1024);
    let n = env.d.node();
    let mut r = req::create_with(
        "tuned",
        64 * MIB,
        &[
            ("mkfsOptions", "-Ltuned-ext4 -m 0 -E lazy_itable_init=1"),
            ("thick", "true"),
        ],
    );
    r.volume_capabilities[0] = req::mount_cap(Mode::SINGLE_NODE_WRITER, "ext4");
    let id = env
        .d
        .controller()
        .create_volume(&r)
        .unwrap()
        .volume
        .unwrap()
        .volume_id;
    let cap = req::mount_cap(Mode::SINGLE_NODE_WRITER, "ext4");
    let (staging, target) = (env.staging(&id), env.target("pod-t"));
    n.node_stage_volume(&req::stage(&id, &staging, cap.clone()))
        .unwrap();
    let dev = loop_of(&env.image(&id)).expect("a loop device backs the image");
    let probe = Command::new("blkid")
        .args(["-p", "-o", "value", "-s", "LABEL"])
        .arg(format!("/dev/{dev}"))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&probe.stdout).trim(), "tuned-ext4");
    // Thick stays thick: the -E from the StorageClass did not replace the
    // nodiscard filevol formats with.
    let allocated =
        std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(env.image(&id)).unwrap()) * 512;
    assert!(
        allocated >= 60 * MIB as u64,
        "a thick image lost its preallocation to mkfs's discard: {allocated} bytes allocated"
    );
    n.node_publish_volume(&req::publish(&id, &staging, &target, cap, false))
        .unwrap();
    n.node_unpublish_volume(&req::unpublish(&id, &target))
        .unwrap();
    n.node_unstage_volume(&req::unstage(&id, &staging)).unwrap();
}
