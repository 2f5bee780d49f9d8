//! ReadWriteOncePod (SINGLE_NODE_SINGLE_WRITER): a volume is published at
//! most once on the node, decided by what is mounted (the volume's loop
//! device, the bind of its data directory), never by where the targets are
//! or which filesystem they share with other volumes.

use std::path::{Path, PathBuf};

use filevol::ops::requests::{self as req, MIB};
use filevol::proto::csi;
use filevol::proto::csi::volume_capability::access_mode::Mode;
use filevol_kit::driver::status;
use filevol_kit::leaks::is_mounted;
use filevol_kit::node_env::NodeEnv;
use grpcio::RpcStatusCode;

use crate::BIN;

/// A target path under the kubelet directory but outside `pods/`, as
/// csi-sanity and other COs use.
fn elsewhere(env: &NodeEnv, name: &str) -> PathBuf {
    let dir = env.kubelet.join("elsewhere").join(name);
    std::fs::create_dir_all(&dir).unwrap();
    dir.join("target")
}

fn create(
    env: &NodeEnv,
    name: &str,
    cap: csi::VolumeCapability,
    params: &[(&str, &str)],
) -> String {
    let mut r = req::create_with(name, 64 * MIB, params);
    r.volume_capabilities[0] = cap;
    env.d
        .controller()
        .create_volume(&r)
        .unwrap()
        .volume
        .unwrap()
        .volume_id
}

/// Publishes at `first`, checks a publish at `second` is refused with
/// FAILED_PRECONDITION and mounts nothing there, then moves the publish.
fn one_publish_at_a_time(
    env: &NodeEnv,
    id: &str,
    staging: &Path,
    cap: &csi::VolumeCapability,
    first: &Path,
    second: &Path,
) {
    let n = env.d.node();
    n.node_publish_volume(&req::publish(id, staging, first, cap.clone(), false))
        .unwrap();
    // A retry at the same target is idempotent, not a second publish.
    n.node_publish_volume(&req::publish(id, staging, first, cap.clone(), false))
        .unwrap();
    let st = status(n.node_publish_volume(&req::publish(id, staging, second, cap.clone(), false)));
    assert_eq!(
        st.code(),
        RpcStatusCode::FAILED_PRECONDITION,
        "{}",
        st.message()
    );
    assert!(
        st.message().contains("ReadWriteOncePod"),
        "{}",
        st.message()
    );
    assert!(!is_mounted(second), "a refused publish left a mount");
    n.node_unpublish_volume(&req::unpublish(id, first)).unwrap();
    n.node_publish_volume(&req::publish(id, staging, second, cap.clone(), false))
        .unwrap();
    n.node_unpublish_volume(&req::unpublish(id, second))
        .unwrap();
}

#[test]
#[ignore = "needs root"]
fn a_single_writer_image_is_published_once_wherever_the_targets_are() {
    let env = NodeEnv::new(BIN, "xfs", 1024);
    let n = env.d.node();
    let cap = req::mount_cap(Mode::SINGLE_NODE_SINGLE_WRITER, "ext4");
    let id = create(&env, "rwop-image", cap.clone(), &[]);
    let staging = env.staging(&id);
    n.node_stage_volume(&req::stage(&id, &staging, cap.clone()))
        .unwrap();
    // Outside pods/, as csi-sanity publishes.
    let (a, b) = (elsewhere(&env, "a"), elsewhere(&env, "b"));
    one_publish_at_a_time(&env, &id, &staging, &cap, &a, &b);
    // One under pods/, one outside it.
    let pod = env.target("pod-rwop");
    one_publish_at_a_time(&env, &id, &staging, &cap, &pod, &a);
    n.node_unstage_volume(&req::unstage(&id, &staging)).unwrap();
}

#[test]
#[ignore = "needs root"]
fn a_single_writer_block_volume_is_published_once() {
    let env = NodeEnv::new(BIN, "xfs", 1024);
    let n = env.d.node();
    let cap = req::block_cap(Mode::SINGLE_NODE_SINGLE_WRITER);
    let id = create(&env, "rwop-block", cap.clone(), &[]);
    let staging = env.staging(&id);
    n.node_stage_volume(&req::stage(&id, &staging, cap.clone()))
        .unwrap();
    let (a, b) = (elsewhere(&env, "a"), env.target("pod-rwop-block"));
    one_publish_at_a_time(&env, &id, &staging, &cap, &a, &b);
    n.node_unstage_volume(&req::unstage(&id, &staging)).unwrap();
}

/// Two directory volumes live on one filesystem (the pool's): each is its
/// own single writer, and one's publish never counts against the other.
#[test]
#[ignore = "needs root"]
fn single_writer_dir_volumes_count_only_themselves() {
    let env = NodeEnv::new(BIN, "xfs", 1024);
    let n = env.d.node();
    let cap = req::mount_cap(Mode::SINGLE_NODE_SINGLE_WRITER, "");
    let one = create(&env, "rwop-dir-1", cap.clone(), &[("layout", "dir")]);
    let two = create(&env, "rwop-dir-2", cap.clone(), &[("layout", "dir")]);
    let (s1, s2) = (env.staging(&one), env.staging(&two));
    n.node_stage_volume(&req::stage(&one, &s1, cap.clone()))
        .unwrap();
    n.node_stage_volume(&req::stage(&two, &s2, cap.clone()))
        .unwrap();
    let t2 = elsewhere(&env, "two");
    n.node_publish_volume(&req::publish(&two, &s2, &t2, cap.clone(), false))
        .unwrap();
    // With the other volume published, this one is still free once.
    let (a, b) = (elsewhere(&env, "one-a"), env.target("pod-rwop-dir"));
    one_publish_at_a_time(&env, &one, &s1, &cap, &a, &b);
    n.node_unpublish_volume(&req::unpublish(&two, &t2)).unwrap();
    n.node_unstage_volume(&req::unstage(&one, &s1)).unwrap();
    n.node_unstage_volume(&req::unstage(&two, &s2)).unwrap();
}

/// A single-writer volume does not stop other volumes, even single-writer
/// images published beside it.
#[test]
#[ignore = "needs root"]
fn other_single_writer_images_publish_beside_it() {
    let env = NodeEnv::new(BIN, "xfs", 1024);
    let n = env.d.node();
    let cap = req::mount_cap(Mode::SINGLE_NODE_SINGLE_WRITER, "ext4");
    let ids: Vec<String> = (0..2)
        .map(|i| create(&env, &format!("rwop-side-{i}"), cap.clone(), &[]))
        .collect();
    let mut done = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let staging = env.staging(id);
        let target = elsewhere(&env, &format!("side-{i}"));
        n.node_stage_volume(&req::stage(id, &staging, cap.clone()))
            .unwrap();
        n.node_publish_volume(&req::publish(id, &staging, &target, cap.clone(), false))
            .unwrap();
        done.push((id, staging, target));
    }
    for (id, staging, target) in done {
        n.node_unpublish_volume(&req::unpublish(id, &target))
            .unwrap();
        n.node_unstage_volume(&req::unstage(id, &staging)).unwrap();
    }
}

/// SINGLE_NODE_MULTI_WRITER, the other side of the rule: one node, many
/// targets, all writable.
#[test]
#[ignore = "needs root"]
fn a_single_node_multi_writer_volume_publishes_at_many_targets() {
    let env = NodeEnv::new(BIN, "xfs", 1024);
    let n = env.d.node();
    let cap = req::mount_cap(Mode::SINGLE_NODE_MULTI_WRITER, "ext4");
    let id = create(&env, "snmw", cap.clone(), &[]);
    let staging = env.staging(&id);
    n.node_stage_volume(&req::stage(&id, &staging, cap.clone()))
        .unwrap();
    let targets = [
        elsewhere(&env, "a"),
        env.target("pod-snmw-1"),
        env.target("pod-snmw-2"),
    ];
    for t in &targets {
        n.node_publish_volume(&req::publish(&id, &staging, t, cap.clone(), false))
            .unwrap();
    }
    std::fs::write(targets[0].join("note"), b"one").unwrap();
    assert_eq!(std::fs::read(targets[2].join("note")).unwrap(), b"one");
    for t in &targets {
        n.node_unpublish_volume(&req::unpublish(&id, t)).unwrap();
    }
    n.node_unstage_volume(&req::unstage(&id, &staging)).unwrap();
}
