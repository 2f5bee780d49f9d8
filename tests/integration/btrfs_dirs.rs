//! Directory volumes on a btrfs pool, through the layout deploy/ ships (a
//! node plugin, `--mode node`, and a separate controller, `--mode
//! controller`): each is a subvolume whose qgroup limit is its size, so a
//! pod cannot write past it, an expansion raises it, NodeGetVolumeStats and
//! GetCapacity read the qgroup, and snapshots and clones of a volume that
//! pods are writing are atomic subvolume snapshots. A plain directory made
//! before (and any dir volume on xfs) works as it always did. Needs root.

use std::io::Write;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use filevol::ops::requests::{self as req, MIB};
use filevol::proto::csi;
use filevol::proto::csi::volume_capability::access_mode::Mode;
use filevol_kit::driver::{code, Driver, Opts};
use filevol_kit::leaks::LeakGuard;
use filevol_kit::node_env::{staging_path, target_path};
use filevol_kit::scratch::{pool_on, LoopFs};
use grpcio::RpcStatusCode;

use crate::BIN;

/// Bytes of each numbered file the writer writes.
const FILE_BYTES: usize = 64 << 10;

/// One pool, a node plugin and a controller. Field order is drop order.
struct Site {
    controller: Driver,
    node: Driver,
    _guard: LeakGuard,
    pool: PathBuf,
    kubelet: PathBuf,
    _kubelets: tempfile::TempDir,
    fs: LoopFs,
}

impl Site {
    fn new(fs_type: &str) -> Site {
        let (fs, pool) = pool_on(fs_type, 1024);
        let kubelets = tempfile::tempdir().unwrap();
        let kubelet = kubelets.path().join("n1");
        std::fs::create_dir_all(&kubelet).unwrap();
        let kubelet = kubelet.canonicalize().unwrap();
        let start = |mode: &str| {
            Driver::start_on(
                BIN,
                &pool,
                Opts::default().args(&[
                    "--mode",
                    mode,
                    "--node-id",
                    "n1",
                    "--kubelet-dir",
                    kubelet.to_str().unwrap(),
                    "--topology=",
                    "--allow-host-local-locks",
                    "--reserve",
                    "0",
                    // Not overcommitted: GetCapacity then moves by exactly
                    // what volumes and snapshots count for.
                    "--overcommit",
                    "1",
                    "--log-level",
                    "debug",
                ]),
            )
        };
        // The node plugin first, as a DaemonSet often comes up.
        let node = start("node");
        let controller = start("controller");
        Site {
            controller,
            node,
            _guard: LeakGuard {
                kubelet: kubelet.clone(),
                pool: pool.clone(),
            },
            pool,
            kubelet,
            _kubelets: kubelets,
            fs,
        }
    }

    fn create(&self, name: &str, mib: i64, source: Option<csi::VolumeContentSource>) -> String {
        let mut r = req::create_volume(name, mib * MIB, rwx());
        r.parameters.insert("layout".into(), "dir".into());
        if let Some(source) = source {
            r.volume_content_source = Some(source).into();
        }
        self.controller
            .controller()
            .create_volume(&r)
            .unwrap_or_else(|e| panic!("create {name}: {e:?}\n{}", self.controller.log()))
            .volume
            .unwrap()
            .volume_id
    }

    fn snapshot(&self, name: &str, source: &str) -> grpcio::Result<String> {
        self.controller
            .controller()
            .create_snapshot(&req::snapshot(name, source))
            .map(|r| r.snapshot.unwrap().snapshot_id)
    }

    fn capacity(&self) -> i64 {
        self.controller
            .controller()
            .get_capacity(&csi::GetCapacityRequest::new())
            .unwrap()
            .available_capacity
    }

    /// Stages and publishes `id` for a pod named `pod`; its target.
    fn mount(&self, id: &str, pod: &str) -> PathBuf {
        let n = self.node.node();
        let staging = staging_path(&self.kubelet, id);
        let target = target_path(&self.kubelet, pod);
        n.node_stage_volume(&req::stage(id, &staging, rwx()))
            .unwrap_or_else(|e| panic!("stage {id}: {e:?}\n{}", self.node.log()));
        n.node_publish_volume(&req::publish(id, &staging, &target, rwx(), false))
            .unwrap();
        target
    }

    fn unmount(&self, id: &str, pod: &str) {
        let n = self.node.node();
        n.node_unpublish_volume(&req::unpublish(id, &target_path(&self.kubelet, pod)))
            .unwrap();
        n.node_unstage_volume(&req::unstage(id, &staging_path(&self.kubelet, id)))
            .unwrap();
    }

    /// NodeGetVolumeStats bytes: (total, available, used).
    fn stats(&self, id: &str, target: &Path) -> (i64, i64, i64) {
        // A pod's sync: qgroup figures are those of the last commit.
        sync(target);
        let r = self
            .node
            .node()
            .node_get_volume_stats(&req::volume_stats(id, target))
            .unwrap();
        let bytes = r
            .usage
            .iter()
            .find(|u| u.unit == csi::volume_usage::Unit::BYTES.into())
            .expect("a bytes figure");
        (bytes.total, bytes.available, bytes.used)
    }

    fn delete(&self, id: &str) {
        self.controller
            .controller()
            .delete_volume(&req::delete(id))
            .unwrap_or_else(|e| panic!("delete {id}: {e:?}\n{}", self.controller.log()));
    }

    fn delete_snapshot(&self, id: &str) {
        self.controller
            .controller()
            .delete_snapshot(&req::delete_snapshot(id))
            .unwrap();
    }

    fn data(&self, kind: &str, id: &str) -> PathBuf {
        self.pool.join(kind).join(id).join("data")
    }
}

fn rwx() -> csi::VolumeCapability {
    req::mount_cap(Mode::MULTI_NODE_MULTI_WRITER, "")
}

fn sync(path: &Path) {
    let f = std::fs::File::open(path).unwrap();
    rustix::fs::syncfs(f.as_fd()).unwrap();
}

/// Writes `mib` MiB to `path` and syncs it; the first error.
fn fill(path: &Path, mib: usize) -> std::io::Result<()> {
    let mut f = std::fs::File::create(path)?;
    let block: Vec<u8> = (0..MIB as usize).map(|i| (i % 251) as u8).collect();
    for _ in 0..mib {
        f.write_all(&block)?;
    }
    f.sync_all()
}

fn refused_for_quota(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EDQUOT) | Some(libc::ENOSPC))
}

/// The bytes of numbered file `i`.
fn numbered(i: usize) -> Vec<u8> {
    (0..FILE_BYTES).map(|j| ((i * 7 + j) % 251) as u8).collect()
}

/// The qgroups `btrfs qgroup show` lists on the filesystem at `mnt`, with
/// their referenced bytes.
fn qgroups(mnt: &Path) -> Vec<(String, u64)> {
    let out = Command::new("btrfs")
        .args(["qgroup", "show", "--raw"])
        .arg(mnt)
        .output()
        .expect("run btrfs qgroup show");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            let id = w.next().filter(|id| id.starts_with("0/"))?;
            Some((id.to_owned(), w.next()?.parse().ok()?))
        })
        .collect()
}

/// The qgroup of the subvolume at `path`.
fn qgroup_of(path: &Path) -> String {
    let out = Command::new("btrfs")
        .args(["inspect-internal", "rootid"])
        .arg(path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    format!("0/{}", String::from_utf8_lossy(&out.stdout).trim())
}

/// Checks that the tree at `dir` is one a single instant of the writer
/// shows: files 0..k, every one but the last complete, the last a prefix
/// of its bytes. Returns k.
fn assert_prefix_of_complete_files(dir: &Path) -> usize {
    let mut numbers: Vec<usize> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| {
            e.unwrap()
                .file_name()
                .to_str()?
                .strip_prefix('n')?
                .parse()
                .ok()
        })
        .collect();
    numbers.sort_unstable();
    assert!(
        numbers.iter().enumerate().all(|(k, &i)| k == i),
        "{}: the numbered files have a gap",
        dir.display()
    );
    for &i in &numbers {
        let got = std::fs::read(dir.join(format!("n{i:05}"))).unwrap();
        let want = numbered(i);
        if i + 1 == numbers.len() {
            assert!(want.starts_with(&got), "{}: n{i:05} is torn", dir.display());
        } else {
            assert!(
                got == want,
                "{}: n{i:05} has {} bytes, not its {} (or other bytes)",
                dir.display(),
                got.len(),
                want.len()
            );
        }
    }
    numbers.len()
}

/// A pod writing numbered files into `dir`, each whole and synced before
/// the next is made, until stopped; joined by `stop`. A snapshot is
/// crash-consistent: it holds what a power cut at its instant would leave,
/// so, as with a power cut, only writes the pod ordered with fsync (as a
/// database orders its log) are ordered in it. Without the fsync, a file
/// made while the snapshot commits can show empty beside a later one.
struct Writer {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<usize>>,
}

impl Writer {
    fn start(dir: &Path, max: usize) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let (flag, dir) = (stop.clone(), dir.to_owned());
        let thread = std::thread::spawn(move || {
            let mut i = 0;
            while i < max && !flag.load(Ordering::Relaxed) {
                let mut f = std::fs::File::create(dir.join(format!("n{i:05}"))).unwrap();
                // In pieces, so a snapshot can fall inside a file.
                for piece in numbered(i).chunks(4096) {
                    f.write_all(piece).unwrap();
                }
                f.sync_all().unwrap();
                i += 1;
            }
            i
        });
        Writer {
            stop,
            thread: Some(thread),
        }
    }

    fn stop(mut self) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
#[ignore = "needs root"]
fn btrfs_dir_volumes_have_a_size_and_live_snapshots() {
    filevol_kit::needs::root();
    let site = Site::new("btrfs");
    let id = site.create("d", 32, None);
    let data = site.data("volumes", &id);
    let volume_qgroup = qgroup_of(&data);
    let target = site.mount(&id, "p1");

    // Past its size: the pod's write is refused.
    let e = fill(&target.join("big"), 48).unwrap_err();
    assert!(refused_for_quota(&e), "{e}");
    std::fs::remove_file(target.join("big")).unwrap();
    fill(&target.join("eight"), 8).unwrap();
    let (total, available, used) = site.stats(&id, &target);
    assert_eq!(total, 32 * MIB);
    assert!((8 * MIB..12 * MIB).contains(&used), "used {used}");
    assert_eq!(available, total - used);

    // Expanded: the limit follows at once, no node step needed.
    let r = site
        .controller
        .controller()
        .controller_expand_volume(&req::expand(&id, 96 * MIB))
        .unwrap();
    assert_eq!(r.capacity_bytes, 96 * MIB);
    fill(&target.join("more"), 48).unwrap();
    assert_eq!(site.stats(&id, &target).0, 96 * MIB);
    std::fs::remove_file(target.join("more")).unwrap();

    // Snapshots and a clone while a pod writes: each a consistent tree.
    let writer = Writer::start(&target, 400);
    std::thread::sleep(Duration::from_millis(20));
    let mut snaps = Vec::new();
    for n in 0..3 {
        let s = site
            .snapshot(&format!("live-{n}"), &id)
            .unwrap_or_else(|e| panic!("snapshot while written: {e:?}"));
        snaps.push(s);
        std::thread::sleep(Duration::from_millis(15));
    }
    let clone = site.create("live-clone", 96, Some(req::volume_source(&id)));
    let written = writer.stop();
    let mut seen = Vec::new();
    for s in &snaps {
        seen.push(assert_prefix_of_complete_files(&site.data("snapshots", s)));
    }
    seen.push(assert_prefix_of_complete_files(
        &site.data("volumes", &clone),
    ));
    eprintln!("writer wrote {written} files; snapshots and the clone hold {seen:?}");
    assert!(seen.windows(2).all(|w| w[0] <= w[1]), "{seen:?}");
    // A snapshot is read-only.
    assert!(std::fs::File::create(site.data("snapshots", &snaps[0]).join("x")).is_err());

    // GetCapacity counts a snapshot by its qgroup's referenced bytes.
    sync(&target);
    let before = site.capacity();
    let last = site.snapshot("quiet", &id).unwrap();
    let last_qgroup = qgroup_of(&site.data("snapshots", &last));
    let referenced = qgroups(site.fs.path())
        .into_iter()
        .find(|(q, _)| *q == last_qgroup)
        .expect("the snapshot's qgroup")
        .1;
    assert_eq!(before - site.capacity(), referenced as i64);
    snaps.push(last);

    // A restore (at least its source's size): the data, writable, with
    // its own limit.
    let restored = site.create("restored", 128, Some(req::snapshot_source(&snaps[3])));
    let rt = site.mount(&restored, "p2");
    assert_eq!(assert_prefix_of_complete_files(&rt), written);
    assert_eq!(site.stats(&restored, &rt).0, 128 * MIB);
    let e = fill(&rt.join("big"), 128).unwrap_err();
    assert!(refused_for_quota(&e), "{e}");
    std::fs::remove_file(rt.join("big")).unwrap();
    fill(&rt.join("own"), 4).unwrap();
    // The source did not see it.
    assert!(!target.join("own").exists());
    let ct = site.mount(&clone, "p3");
    assert_eq!(site.stats(&clone, &ct).0, 96 * MIB);
    fill(&ct.join("own"), 4).unwrap();

    // Deleted: subvolumes and their qgroups gone.
    let mut all = vec![volume_qgroup, qgroup_of(&rt), qgroup_of(&ct)];
    all.extend(snaps.iter().map(|s| qgroup_of(&site.data("snapshots", s))));
    for (v, pod) in [(&id, "p1"), (&restored, "p2"), (&clone, "p3")] {
        site.unmount(v, pod);
    }
    for s in &snaps {
        site.delete_snapshot(s);
    }
    for v in [&id, &restored, &clone] {
        site.delete(v);
    }
    let left: Vec<String> = qgroups(site.fs.path()).into_iter().map(|q| q.0).collect();
    for q in &all {
        assert!(!left.contains(q), "qgroup {q} is still there: {left:?}");
    }
}

#[test]
#[ignore = "needs root"]
fn a_plain_dir_volume_made_before_keeps_working_on_btrfs() {
    filevol_kit::needs::root();
    let site = Site::new("btrfs");
    let id = site.create("old", 16, None);
    // As an older filevol left it: a plain directory, a record without
    // the field.
    let dir = site.pool.join("volumes").join(&id);
    let status = Command::new("btrfs")
        .args(["subvolume", "delete"])
        .arg(dir.join("data"))
        .status()
        .unwrap();
    assert!(status.success());
    std::fs::create_dir(dir.join("data")).unwrap();
    let meta = dir.join("meta.json");
    let mut record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&meta).unwrap()).unwrap();
    record.as_object_mut().unwrap().remove("subvolume");
    let tmp = dir.join("meta.json.tmp");
    std::fs::write(&tmp, record.to_string()).unwrap();
    std::fs::rename(&tmp, &meta).unwrap();

    let target = site.mount(&id, "p1");
    // No size enforced, as before.
    fill(&target.join("big"), 24).unwrap();
    // Staged, it cannot be copied at one instant: refused as before.
    assert_eq!(
        code(site.snapshot("old-live", &id)),
        RpcStatusCode::FAILED_PRECONDITION
    );
    site.unmount(&id, "p1");
    let s = site.snapshot("old-s", &id).unwrap();
    let c = site.create("old-c", 32, Some(req::snapshot_source(&s)));
    assert_eq!(
        std::fs::metadata(site.data("volumes", &c).join("big"))
            .unwrap()
            .len(),
        24 * MIB as u64
    );
    site.delete(&c);
    site.delete_snapshot(&s);
    site.delete(&id);
}

#[test]
#[ignore = "needs root"]
fn dir_volumes_on_xfs_are_unchanged() {
    filevol_kit::needs::root();
    let site = Site::new("xfs");
    let id = site.create("x", 16, None);
    let target = site.mount(&id, "p1");
    // No size enforced: more than 16 MiB fits.
    fill(&target.join("big"), 24).unwrap();
    // Stats are the pool filesystem's.
    assert!(site.stats(&id, &target).0 > 512 * MIB);
    assert_eq!(
        code(site.snapshot("x-live", &id)),
        RpcStatusCode::FAILED_PRECONDITION
    );
    site.unmount(&id, "p1");
    let s = site.snapshot("x-s", &id).unwrap();
    site.delete_snapshot(&s);
    site.delete(&id);
}
