//! Read-only restores and clones of a mounted filesystem (issue 28): a
//! snapshot or clone of an ext4 or xfs volume that a writer has mounted is
//! a crash image with a journal to replay, which a read-only loop device
//! cannot replay. Its first read-only stage replays it once, on a private
//! writable device under the volume's exclusive fence (`node::settle`), so
//! that readers on two nodes at once mount it and see the data as of the
//! snapshot. A read-only stage that still cannot mount answers
//! FAILED_PRECONDITION with the reason.
//!
//! The layout deploy/ ships, on one xfs pool (it reflinks: a mounted volume
//! can be snapshotted and cloned): two node plugins (`--mode node`, each
//! its node id and kubelet directory) and a controller (`--mode
//! controller`), as separate processes. Needs root (loop devices, mounts).

use std::path::{Path, PathBuf};
use std::process::Command;

use filevol::ops::requests::{self as req, MIB};
use filevol::proto::csi;
use filevol::proto::csi::volume_capability::access_mode::Mode;
use filevol::proto::grpc::NodeClient;
use filevol_kit::driver::{status, Driver, Opts};
use filevol_kit::files::{digest, fill, image};
use filevol_kit::leaks::{loop_of, LeakGuard};
use filevol_kit::node_env::{staging_path, target_path};
use filevol_kit::scratch::{pool_on, LoopFs};
use grpcio::RpcStatusCode;

use crate::BIN;

/// One pool and its processes. Field order is drop order: processes, then
/// the leak checks, then the pool's filesystem.
struct Site {
    procs: Vec<Driver>,
    guards: Vec<LeakGuard>,
    pool: PathBuf,
    kubelets: tempfile::TempDir,
    _fs: LoopFs,
}

/// The node plugins, by node id.
const NODES: [&str; 2] = ["node-a", "node-b"];

impl Site {
    /// The pool, both node plugins (started first, as the DaemonSet is),
    /// then the controller: processes 0 and 1 are the nodes, 2 the
    /// controller.
    fn new() -> Site {
        let (fs, pool) = pool_on("xfs", 3072);
        let mut site = Site {
            procs: Vec::new(),
            guards: Vec::new(),
            pool,
            kubelets: tempfile::tempdir().unwrap(),
            _fs: fs,
        };
        for node in NODES {
            let guard = LeakGuard {
                kubelet: site.kubelet(node),
                pool: site.pool.clone(),
            };
            site.guards.push(guard);
            let d = Driver::start_on(BIN, &site.pool, site.args("node", node));
            site.procs.push(d);
        }
        let d = Driver::start_on(BIN, &site.pool, site.args("controller", "controller-0"));
        site.procs.push(d);
        assert_eq!(site.guards.len(), NODES.len(), "a leak check per kubelet");
        site
    }

    fn kubelet(&self, node: &str) -> PathBuf {
        let k = self.kubelets.path().join(node);
        std::fs::create_dir_all(&k).unwrap();
        k.canonicalize().unwrap()
    }

    fn args(&self, mode: &str, node: &str) -> Opts {
        Opts::default().args(&[
            "--mode",
            mode,
            "--node-id",
            node,
            "--kubelet-dir",
            self.kubelet(node).to_str().unwrap(),
            // The shared-pool layout, on one host: its locks reach every
            // process that uses them, here.
            "--topology=",
            "--allow-host-local-locks",
            "--reserve",
            "0",
            "--log-level",
            "debug",
            "--metrics-address",
            "127.0.0.1:0",
        ])
    }

    /// The node plugin of node `i` (0 or 1).
    fn node(&self, i: usize) -> NodeClient {
        self.procs[i].node()
    }

    fn controller(&self) -> filevol::proto::grpc::ControllerClient {
        self.procs[2].controller()
    }

    /// Where node `i` stages `id`, and where pod `pod` has it published.
    fn paths(&self, i: usize, id: &str, pod: &str) -> (PathBuf, PathBuf) {
        let kubelet = self.kubelet(NODES[i]);
        (staging_path(&kubelet, id), target_path(&kubelet, pod))
    }

    fn image(&self, id: &str) -> PathBuf {
        image(&self.pool, id)
    }
}

fn cap(mode: Mode, fs: &str) -> csi::VolumeCapability {
    req::mount_cap(mode, fs)
}

fn stage_and_publish(
    n: &NodeClient,
    id: &str,
    paths: &(PathBuf, PathBuf),
    cap: &csi::VolumeCapability,
    readonly: bool,
) {
    let (staging, target) = paths;
    n.node_stage_volume(&req::stage(id, staging, cap.clone()))
        .unwrap_or_else(|e| panic!("stage {id}: {e:?}"));
    n.node_publish_volume(&req::publish(id, staging, target, cap.clone(), readonly))
        .unwrap_or_else(|e| panic!("publish {id}: {e:?}"));
}

fn unpublish_and_unstage(n: &NodeClient, id: &str, paths: &(PathBuf, PathBuf)) {
    let (staging, target) = paths;
    n.node_unpublish_volume(&req::unpublish(id, target))
        .unwrap();
    n.node_unstage_volume(&req::unstage(id, staging)).unwrap();
}

/// Writes `bytes` to `path` and syncs it.
fn write_synced(path: &Path, bytes: &[u8]) {
    std::fs::write(path, bytes).unwrap();
    std::fs::File::open(path).unwrap().sync_all().unwrap();
}

/// What the writer left in a mount: a digest of each file it wrote.
fn contents(root: &Path) -> Vec<(String, u64)> {
    let mut names: Vec<String> = std::fs::read_dir(root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "lost+found")
        .collect();
    names.sort();
    names
        .into_iter()
        .map(|n| {
            let d = digest(&root.join(&n));
            (n, d)
        })
        .collect()
}

/// Whether the kernel refuses to mount `image` (a filesystem `fs`) from a
/// read-only loop device, as every read-only stage attached it before
/// issue 28: the copy carries a journal to replay. Attached and mounted
/// here, outside the driver, and taken down again before it returns.
fn refused_read_only(image: &Path, fs: &str) -> bool {
    let out = Command::new("losetup")
        .args(["--read-only", "--find", "--show"])
        .arg(image)
        .output()
        .unwrap();
    assert!(out.status.success(), "losetup: {out:?}");
    let dev = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let mnt = tempfile::tempdir().unwrap();
    let options = if fs == "xfs" { "ro,nouuid" } else { "ro" };
    let mounted = Command::new("mount")
        .args(["-t", fs, "-o", options, &dev])
        .arg(mnt.path())
        .output()
        .unwrap();
    if mounted.status.success() {
        assert!(Command::new("umount")
            .arg(mnt.path())
            .status()
            .unwrap()
            .success());
    }
    assert!(Command::new("losetup")
        .args(["-d", &dev])
        .status()
        .unwrap()
        .success());
    // The device goes at its last close: gone before the driver attaches.
    for _ in 0..100 {
        if loop_of(image).is_none() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(loop_of(image), None, "the test's own loop device is gone");
    !mounted.status.success()
}

/// A writer mounts a volume of `fs` on node-a and writes and syncs data;
/// with it still mounted read-write, a snapshot is taken and restored, and
/// the volume cloned, both for readers only; the writer writes on. Each
/// copy is then staged and published read-only on both nodes at once, and
/// each reader sees exactly what was written before the copy.
fn read_only_copies_of_a_mounted_volume(fs: &str) {
    let site = Site::new();
    let ctl = site.controller();
    let rwo = cap(Mode::SINGLE_NODE_WRITER, fs);
    let rox = cap(Mode::MULTI_NODE_READER_ONLY, fs);
    let size = 320 * MIB;

    let source = ctl
        .create_volume(&req::create_volume("source", size, rwo.clone()))
        .unwrap()
        .volume
        .unwrap()
        .volume_id;
    let writer = site.paths(0, &source, "writer");
    stage_and_publish(&site.node(0), &source, &writer, &rwo, false);
    let data = writer.1.join("data");
    std::fs::write(&data, b"").unwrap();
    fill(&data, 0, 24 << 20, 7);
    write_synced(&writer.1.join("note"), b"written before the copies");
    let before = contents(&writer.1);

    // Taken while the writer has it mounted read-write.
    let snapshot = ctl
        .create_snapshot(&req::snapshot("source-snap", &source))
        .unwrap()
        .snapshot
        .unwrap()
        .snapshot_id;
    let mut restore = req::restore("restored", size, &snapshot);
    restore.volume_capabilities[0] = rox.clone();
    let restored = ctl
        .create_volume(&restore)
        .unwrap()
        .volume
        .unwrap()
        .volume_id;
    let mut clone = req::clone("cloned", size, &source);
    clone.volume_capabilities[0] = rox.clone();
    let cloned = ctl.create_volume(&clone).unwrap().volume.unwrap().volume_id;
    // The writer writes on: none of it is in the copies.
    write_synced(&writer.1.join("after"), b"written after the copies");
    fill(&data, 0, 1 << 20, 99);

    for id in [&restored, &cloned] {
        assert!(
            refused_read_only(&site.image(id), fs),
            "{fs}: a copy of the mounted source mounts from a read-only device as it is: the test does not reproduce the journal to replay"
        );
    }

    for id in [&restored, &cloned] {
        let readers: Vec<(PathBuf, PathBuf)> = (0..2)
            .map(|i| site.paths(i, id, &format!("reader-{i}")))
            .collect();
        // Both nodes at once: one replays the journal, the other waits
        // for it and then finds it settled.
        let nodes: Vec<NodeClient> = (0..2).map(|i| site.node(i)).collect();
        std::thread::scope(|s| {
            for (n, paths) in nodes.iter().zip(&readers) {
                let rox = &rox;
                s.spawn(move || stage_and_publish(n, id, paths, rox, true));
            }
        });
        for (i, (staging, target)) in readers.iter().enumerate() {
            assert_eq!(
                contents(target),
                before,
                "{fs}: what reader {i} of {id} sees is what was written before the copy"
            );
            for path in [staging, target] {
                let e = std::fs::write(path.join("more"), b"x").unwrap_err();
                assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{}", path.display());
            }
        }
        // A reader's retry, as kubelet's, changes nothing.
        site.node(1)
            .node_stage_volume(&req::stage(id, &readers[1].0, rox.clone()))
            .unwrap();
        for (i, paths) in readers.iter().enumerate() {
            unpublish_and_unstage(&site.node(i), id, paths);
        }
        assert_eq!(loop_of(&site.image(id)), None, "{id}: no device left");
        // Replayed and clean: the kernel mounts it read-only as it is now.
        assert!(
            !refused_read_only(&site.image(id), fs),
            "{fs}: {id} still needs a replay"
        );
    }

    // The writer was never disturbed.
    assert_eq!(
        std::fs::read(writer.1.join("after")).unwrap(),
        b"written after the copies"
    );
    unpublish_and_unstage(&site.node(0), &source, &writer);
    for id in [&restored, &cloned, &source] {
        ctl.delete_volume(&req::delete(id)).unwrap();
    }
    ctl.delete_snapshot(&req::delete_snapshot(&snapshot))
        .unwrap();
}

#[test]
#[ignore = "needs root"]
fn read_only_restore_and_clone_of_a_mounted_ext4_mount_on_two_nodes() {
    read_only_copies_of_a_mounted_volume("ext4");
}

#[test]
#[ignore = "needs root"]
fn read_only_restore_and_clone_of_a_mounted_xfs_mount_on_two_nodes() {
    read_only_copies_of_a_mounted_volume("xfs");
}

/// Clears the root inode of the ext4 in `image` (debugfs `clri <2>`): the
/// superblock, and so the signature, stay; no kernel mounts it.
fn damage_root_inode(image: &Path) {
    let out = Command::new("debugfs")
        .args(["-w", "-R", "clri <2>"])
        .arg(image)
        .output()
        .unwrap();
    assert!(out.status.success(), "debugfs: {out:?}");
}

/// A read-only stage of a filesystem the kernel will not mount answers
/// FAILED_PRECONDITION, saying so, whether the mount refused is the
/// read-only one or the replay of a restore; and it leaves nothing behind.
#[test]
#[ignore = "needs root"]
fn a_read_only_stage_that_cannot_mount_is_a_failed_precondition() {
    let site = Site::new();
    let ctl = site.controller();
    let rwo = cap(Mode::SINGLE_NODE_WRITER, "ext4");
    let rox = cap(Mode::MULTI_NODE_READER_ONLY, "ext4");
    let id = ctl
        .create_volume(&req::create_volume("damaged", 64 * MIB, rwo.clone()))
        .unwrap()
        .volume
        .unwrap()
        .volume_id;
    let writer = site.paths(0, &id, "writer");
    stage_and_publish(&site.node(0), &id, &writer, &rwo, false);
    write_synced(&writer.1.join("note"), b"soon unreadable");
    unpublish_and_unstage(&site.node(0), &id, &writer);
    let snapshot = ctl
        .create_snapshot(&req::snapshot("damaged-snap", &id))
        .unwrap()
        .snapshot
        .unwrap()
        .snapshot_id;
    let mut restore = req::restore("damaged-restored", 64 * MIB, &snapshot);
    restore.volume_capabilities[0] = rox.clone();
    let restored = ctl
        .create_volume(&restore)
        .unwrap()
        .volume
        .unwrap()
        .volume_id;
    for v in [&id, &restored] {
        damage_root_inode(&site.image(v));
    }

    for (v, says) in [
        (&id, "cannot be mounted read-only"),
        (&restored, "to replay its journal"),
    ] {
        let (staging, _) = site.paths(1, v, "reader");
        let st = status(
            site.node(1)
                .node_stage_volume(&req::stage(v, &staging, rox.clone())),
        );
        assert_eq!(
            st.code(),
            RpcStatusCode::FAILED_PRECONDITION,
            "{v}: {}",
            st.message()
        );
        assert!(st.message().contains(says), "{v}: {}", st.message());
        assert!(st.message().contains("damaged"), "{v}: {}", st.message());
        assert_eq!(loop_of(&site.image(v)), None, "{v}: no device left");
        assert!(
            !filevol_kit::leaks::is_mounted(&staging),
            "{v}: nothing mounted"
        );
        // Nothing changed: the retry answers the same.
        let again = status(
            site.node(1)
                .node_stage_volume(&req::stage(v, &staging, rox.clone())),
        );
        assert_eq!(again.code(), RpcStatusCode::FAILED_PRECONDITION);
    }
    for v in [&restored, &id] {
        ctl.delete_volume(&req::delete(v)).unwrap();
    }
    ctl.delete_snapshot(&req::delete_snapshot(&snapshot))
        .unwrap();
}

/// btrfs replays its log tree (written by an `fsync`) no more than ext4
/// and xfs replay their journals from a read-only device ("log replay
/// required on RO media"): the same replay settles it.
#[test]
#[ignore = "needs root"]
fn read_only_restore_and_clone_of_a_mounted_btrfs_mount_on_two_nodes() {
    read_only_copies_of_a_mounted_volume("btrfs");
}
