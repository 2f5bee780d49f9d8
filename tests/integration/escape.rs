//! A pod owns every name inside its volume and can change them while the
//! node plugin works: none of that may reach the host. Each test here plays
//! the pod (a thread swapping names with `renameat2(RENAME_EXCHANGE)` during
//! the operation) against a host-side victim whose owner, mode and contents
//! are checked afterwards. Also: what a failed or refused node operation
//! leaves behind (nothing).

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use filevol::ops::requests as req;
use filevol::proto::csi;
use filevol::proto::csi::volume_capability::access_mode::Mode;
use filevol_kit::driver::status;
use filevol_kit::node_env::NodeEnv;
use grpcio::RpcStatusCode;

use crate::BIN;

/// Swaps `a` and `b` until `stop`; returns how many swaps it made.
fn swap_until(a: &Path, b: &Path, stop: &AtomicBool) -> usize {
    swap_counting(a, b, stop, &AtomicUsize::new(0))
}

/// [`swap_until`], counting the swaps in `swaps` as it goes, so the caller
/// can wait for the swapping to be under way.
fn swap_counting(a: &Path, b: &Path, stop: &AtomicBool, swaps: &AtomicUsize) -> usize {
    while !stop.load(Ordering::Relaxed) {
        if rustix::fs::renameat_with(
            rustix::fs::CWD,
            a,
            rustix::fs::CWD,
            b,
            rustix::fs::RenameFlags::EXCHANGE,
        )
        .is_ok()
        {
            swaps.fetch_add(1, Ordering::Relaxed);
        }
    }
    swaps.load(Ordering::Relaxed)
}

/// Waits (up to a second) until the swapping thread has swapped once: on a
/// busy machine it may not run before a short call is over, and a round
/// without a swap races nothing.
fn wait_for_swaps(swaps: &AtomicUsize) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
    while swaps.load(Ordering::Relaxed) == 0 && std::time::Instant::now() < deadline {
        std::thread::yield_now();
    }
}

/// Stops the swapping thread when dropped, even when the test panics.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Unmounts everything at or below `dir` when dropped: what a broken node
/// plugin could have mounted outside the kubelet directory, which the
/// environment's own clean-up does not look at.
struct UnmountBelow(PathBuf);

impl Drop for UnmountBelow {
    fn drop(&mut self) {
        for point in mounts_below(&self.0).iter().rev() {
            let _ = rustix::mount::unmount(point, rustix::mount::UnmountFlags::DETACH);
        }
    }
}

fn mounts_below(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(PathBuf::from))
        .filter(|p| p.starts_with(dir))
        .collect()
}

/// A host directory with a file in it, and what their owner and mode were.
struct Victim {
    dir: PathBuf,
    before: Vec<(PathBuf, u32, u32, Vec<u8>)>,
    _keep: tempfile::TempDir,
}

impl Victim {
    fn new() -> Victim {
        let keep = tempfile::tempdir().unwrap();
        let dir = keep.path().canonicalize().unwrap().join("host");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        std::fs::write(dir.join("secret"), b"host secret").unwrap();
        std::fs::set_permissions(dir.join("secret"), std::fs::Permissions::from_mode(0o600))
            .unwrap();
        let before = Victim::look(&dir);
        Victim {
            dir,
            before,
            _keep: keep,
        }
    }

    fn look(dir: &Path) -> Vec<(PathBuf, u32, u32, Vec<u8>)> {
        [dir.to_owned(), dir.join("secret")]
            .into_iter()
            .map(|p| {
                let m = std::fs::symlink_metadata(&p).unwrap();
                let data = if m.is_file() {
                    std::fs::read(&p).unwrap()
                } else {
                    Vec::new()
                };
                (p, m.gid(), m.mode(), data)
            })
            .collect()
    }

    fn assert_untouched(&self) {
        assert_eq!(
            Victim::look(&self.dir),
            self.before,
            "the host directory changed"
        );
    }
}

fn group_cap(gid: u32) -> csi::VolumeCapability {
    let mut cap = req::mount_cap(Mode::SINGLE_NODE_WRITER, "ext4");
    cap.mut_mount().volume_mount_group = gid.to_string();
    cap
}

#[test]
#[ignore = "needs root"]
fn the_fs_group_walk_never_follows_a_name_swapped_for_a_link() {
    let env = NodeEnv::new(BIN, "xfs", 1024);
    let victim = Victim::new();
    let n = env.d.node();
    let id = env.create("fsgroup-race", 64, "ext4");
    let cap = req::mount_cap(Mode::SINGLE_NODE_WRITER, "ext4");
    let staging = env.staging(&id);
    n.node_stage_volume(&req::stage(&id, &staging, cap.clone()))
        .unwrap();
    // The pod's tree: a directory of files, and a link to the host.
    let pod_target = env.target("pod-0");
    n.node_publish_volume(&req::publish(&id, &staging, &pod_target, cap, false))
        .unwrap();
    let tree = pod_target.join("tree");
    std::fs::create_dir(&tree).unwrap();
    for i in 0..200 {
        std::fs::write(tree.join(format!("f{i}")), b"pod").unwrap();
    }
    std::os::unix::fs::symlink(&victim.dir, pod_target.join("link")).unwrap();

    let stop = AtomicBool::new(false);
    let swaps = std::thread::scope(|s| {
        let swapper = s.spawn(|| swap_until(&tree, &pod_target.join("link"), &stop));
        let _stopper = StopOnDrop(&stop);
        // Every publish with a new group walks the whole volume.
        for (i, gid) in (5001..5031).enumerate() {
            let target = env.target(&format!("pod-g{i}"));
            n.node_publish_volume(&req::publish(&id, &staging, &target, group_cap(gid), false))
                .unwrap();
            assert_eq!(std::fs::metadata(&target).unwrap().gid(), gid);
            n.node_unpublish_volume(&req::unpublish(&id, &target))
                .unwrap();
        }
        drop(_stopper);
        swapper.join().unwrap()
    });
    assert!(swaps > 0);
    victim.assert_untouched();
    n.node_unpublish_volume(&req::unpublish(&id, &pod_target))
        .unwrap();
    n.node_unstage_volume(&req::unstage(&id, &staging)).unwrap();
}

/// Runs `op` `rounds` times while a thread swaps `path` (a directory under
/// the kubelet directory) with a symlink to the victim beside it, and checks
/// after each round that nothing got mounted on the host. A mount that
/// landed on the directory (whatever its name by then) is undone with
/// `undo`, and the names are put back before the next round.
fn race_path(path: &Path, victim: &Victim, rounds: usize, op: impl Fn(), undo: impl Fn(&Path)) {
    let decoy = path.with_file_name("decoy");
    std::os::unix::fs::symlink(&victim.dir, &decoy).unwrap();
    let mut swaps = 0;
    for _ in 0..rounds {
        let stop = AtomicBool::new(false);
        let counted = AtomicUsize::new(0);
        swaps += std::thread::scope(|s| {
            let swapper = s.spawn(|| swap_counting(path, &decoy, &stop, &counted));
            let stopper = StopOnDrop(&stop);
            wait_for_swaps(&counted);
            op();
            drop(stopper);
            swapper.join().unwrap()
        });
        assert_eq!(mounts_below(&victim.dir), Vec::<PathBuf>::new());
        for p in [path, decoy.as_path()] {
            if mounts_below(p).iter().any(|m| m == p) {
                undo(p);
            }
        }
        restore_names(path, &decoy, &victim.dir);
    }
    assert!(swaps > 0);
    std::fs::remove_file(&decoy).unwrap();
}

/// Puts the directory back at `path` and the link at `decoy`.
fn restore_names(path: &Path, decoy: &Path, host: &Path) {
    let link = |p: &Path| {
        std::fs::symlink_metadata(p)
            .map(|m| m.file_type().is_symlink())
            .ok()
    };
    match (link(path), link(decoy)) {
        (Some(true), Some(false)) => swap_once(path, decoy),
        (Some(true), None) => {
            std::fs::rename(path, decoy).unwrap();
            std::fs::create_dir(path).unwrap();
        }
        (None, Some(true)) => std::fs::create_dir(path).unwrap(),
        (Some(false), None) => std::os::unix::fs::symlink(host, decoy).unwrap(),
        _ => {}
    }
}

fn swap_once(a: &Path, b: &Path) {
    rustix::fs::renameat_with(
        rustix::fs::CWD,
        a,
        rustix::fs::CWD,
        b,
        rustix::fs::RenameFlags::EXCHANGE,
    )
    .unwrap();
}

#[test]
#[ignore = "needs root"]
fn a_staging_or_target_path_swapped_for_a_link_never_moves_a_mount() {
    let env = NodeEnv::new(BIN, "xfs", 1024);
    let victim = Victim::new();
    let _unmount = UnmountBelow(victim.dir.clone());
    let n = env.d.node();
    let id = env.create("path-race", 64, "ext4");
    let cap = req::mount_cap(Mode::SINGLE_NODE_WRITER, "ext4");

    let staging = env.staging(&id);
    race_path(
        &staging,
        &victim,
        20,
        || {
            let _ = n.node_stage_volume(&req::stage(&id, &staging, cap.clone()));
        },
        |at| {
            n.node_unstage_volume(&req::unstage(&id, at)).unwrap();
        },
    );
    n.node_stage_volume(&req::stage(&id, &staging, cap.clone()))
        .unwrap();

    let target = env.target("pod-race");
    std::fs::create_dir_all(&target).unwrap();
    race_path(
        &target,
        &victim,
        20,
        || {
            let _ =
                n.node_publish_volume(&req::publish(&id, &staging, &target, cap.clone(), false));
        },
        |at| {
            n.node_unpublish_volume(&req::unpublish(&id, at)).unwrap();
        },
    );
    victim.assert_untouched();
    n.node_unpublish_volume(&req::unpublish(&id, &target))
        .unwrap();
    n.node_unstage_volume(&req::unstage(&id, &staging)).unwrap();
}

#[test]
#[ignore = "needs root"]
fn a_read_only_publish_with_a_group_leaves_the_group_alone() {
    let env = NodeEnv::new(BIN, "xfs", 1024);
    let n = env.d.node();
    let id = env.create("ro-group", 64, "ext4");
    let staging = env.staging(&id);
    n.node_stage_volume(&req::stage(&id, &staging, group_cap(7000)))
        .unwrap();
    let (rw, ro) = (env.target("pod-rw"), env.target("pod-ro"));
    n.node_publish_volume(&req::publish(&id, &staging, &rw, group_cap(7000), false))
        .unwrap();
    n.node_unpublish_volume(&req::unpublish(&id, &rw)).unwrap();
    // Another group, read-only: published (not EROFS), group unchanged.
    n.node_publish_volume(&req::publish(&id, &staging, &ro, group_cap(7001), true))
        .unwrap();
    assert_eq!(std::fs::metadata(&ro).unwrap().gid(), 7000);
    n.node_unpublish_volume(&req::unpublish(&id, &ro)).unwrap();
    n.node_unstage_volume(&req::unstage(&id, &staging)).unwrap();
}

fn loop_devices_of(image: &Path) -> usize {
    let m = std::fs::metadata(image).unwrap();
    let mut n = 0;
    for e in std::fs::read_dir("/sys/block").unwrap() {
        let e = e.unwrap();
        let Ok(backing) = std::fs::read_to_string(e.path().join("loop/backing_file")) else {
            continue;
        };
        if std::fs::metadata(backing.trim())
            .map(|b| (b.dev(), b.ino()) == (m.dev(), m.ino()))
            .unwrap_or(false)
        {
            n += 1;
        }
    }
    n
}

#[test]
#[ignore = "needs root"]
fn unstage_is_refused_while_a_publish_is_mounted() {
    let env = NodeEnv::new(BIN, "xfs", 1024);
    let n = env.d.node();
    let id = env.create("still-published", 64, "ext4");
    let cap = req::mount_cap(Mode::SINGLE_NODE_WRITER, "ext4");
    let (staging, target) = (env.staging(&id), env.target("pod-p"));
    n.node_stage_volume(&req::stage(&id, &staging, cap.clone()))
        .unwrap();
    n.node_publish_volume(&req::publish(&id, &staging, &target, cap, false))
        .unwrap();
    let st = status(n.node_unstage_volume(&req::unstage(&id, &staging)));
    assert_eq!(
        st.code(),
        RpcStatusCode::FAILED_PRECONDITION,
        "{}",
        st.message()
    );
    assert!(
        st.message().contains(target.to_str().unwrap()),
        "{}",
        st.message()
    );
    // Nothing was taken away from the pod.
    std::fs::write(target.join("still-here"), b"yes").unwrap();
    assert_eq!(loop_devices_of(&env.image(&id)), 1);
    n.node_unpublish_volume(&req::unpublish(&id, &target))
        .unwrap();
    n.node_unstage_volume(&req::unstage(&id, &staging)).unwrap();
    assert_eq!(loop_devices_of(&env.image(&id)), 0);
}

#[test]
#[ignore = "needs root"]
fn a_stage_that_fails_after_attaching_lets_go_of_everything() {
    let env = NodeEnv::new(BIN, "xfs", 1024);
    let n = env.d.node();
    let id = env.create("fails-late", 64, "ext4");
    let staging = env.staging(&id);
    // Formatted by a first stage, so the failing one gets to the mount.
    let good = req::mount_cap(Mode::SINGLE_NODE_WRITER, "ext4");
    n.node_stage_volume(&req::stage(&id, &staging, good.clone()))
        .unwrap();
    n.node_unstage_volume(&req::unstage(&id, &staging)).unwrap();
    // A mount option ext4 rejects: attach succeeds, the mount fails.
    let mut bad = good.clone();
    bad.mut_mount().mount_flags = vec!["no_such_ext4_option".into()];
    for _ in 0..2 {
        assert!(n
            .node_stage_volume(&req::stage(&id, &staging, bad.clone()))
            .is_err());
        assert_eq!(
            loop_devices_of(&env.image(&id)),
            0,
            "loop device left attached"
        );
        assert!(mounts_below(&staging).is_empty());
        // The fence went too: another process can take it.
        let fence = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(env.pool.join("volumes").join(&id).join("fence"))
            .unwrap();
        assert!(filevol_core::sys::lock::try_lock(
            &fence,
            filevol_core::sys::lock::LockKind::Exclusive
        )
        .unwrap());
    }
    n.node_stage_volume(&req::stage(&id, &staging, good))
        .unwrap();
    n.node_unstage_volume(&req::unstage(&id, &staging)).unwrap();
}
