//! Group snapshots at one instant, in the layout deploy/ ships: a node
//! plugin (`--mode node`) that has the members mounted and a controller
//! (`--mode controller`) that sees none of its mounts, on one xfs pool. The
//! controller asks through the pool; the node freezes through a guardian.
//!
//! The writer is the issue's: counter `i` written to volume A and then to
//! volume B, each O_DIRECT|O_SYNC, so at any one instant A holds `i` and B
//! `i` or `i - 1`. A group whose members say otherwise is torn. Each
//! member's counter is read straight from the snapshot's image, at the
//! counter file's place on the volume's device (FIEMAP), with no mount.
//!
//! Then the kills: the guardian, the node plugin, the controller, and a
//! guardian and its plugin at once; none leaves a filesystem frozen.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use filevol::ops::requests::{self as req, MIB};
use filevol::proto::csi;
use filevol::proto::csi::volume_capability::access_mode::Mode;
use filevol_core::sys::extents::ExtentMap;
use filevol_kit::driver::{status, Driver, Opts};
use filevol_kit::leaks::LeakGuard;
use filevol_kit::node_env::{staging_path, target_path};
use filevol_kit::scratch::{pool_on, LoopFs};
use grpcio::RpcStatusCode;
use rustix::process::Signal;

use crate::BIN;

/// One xfs pool, a node plugin and a controller, as separate processes.
/// Field order is drop order: the thaw guard first (a failed test must not
/// leave a frozen filesystem for the unmounts to hang on), the processes,
/// the leak check, the pool.
struct Site {
    _thaw: ThawOnDrop,
    node: Option<Driver>,
    controller: Option<Driver>,
    _guard: LeakGuard,
    kubelet: PathBuf,
    pool: PathBuf,
    _kubelet_dir: tempfile::TempDir,
    _fs: LoopFs,
}

impl Site {
    fn new(controller_faults: &str) -> Site {
        let (fs, pool) = pool_on("xfs", 1536);
        let kubelet_dir = tempfile::tempdir().unwrap();
        let kubelet = kubelet_dir.path().canonicalize().unwrap();
        let mut site = Site {
            _thaw: ThawOnDrop(kubelet.clone()),
            node: None,
            controller: None,
            _guard: LeakGuard {
                kubelet: kubelet.clone(),
                pool: pool.clone(),
            },
            kubelet,
            pool,
            _kubelet_dir: kubelet_dir,
            _fs: fs,
        };
        site.start_node();
        site.start_controller(controller_faults);
        site
    }

    fn opts(&self, mode: &str) -> Opts {
        Opts::default().args(&[
            "--mode",
            mode,
            "--node-id",
            "n1",
            "--kubelet-dir",
            self.kubelet.to_str().unwrap(),
            "--reserve",
            "0",
        ])
    }

    fn start_node(&mut self) {
        self.node = Some(Driver::start_on(BIN, &self.pool, self.opts("node")));
    }

    fn start_controller(&mut self, faults: &str) {
        self.controller = Some(Driver::start_on(
            BIN,
            &self.pool,
            self.opts("controller").faults(faults),
        ));
    }

    fn node(&self) -> &Driver {
        self.node.as_ref().unwrap()
    }

    fn controller(&self) -> &Driver {
        self.controller.as_ref().unwrap()
    }

    /// Creates, stages and publishes a `fs` volume; returns its id and
    /// where the pod sees it.
    fn mounted(&self, name: &str, fs: &str, mib: i64) -> (String, PathBuf) {
        let cap = req::mount_cap(Mode::SINGLE_NODE_WRITER, fs);
        let mut r = req::create(name, mib * MIB);
        r.volume_capabilities[0] = cap.clone();
        let id = self
            .controller()
            .controller()
            .create_volume(&r)
            .unwrap()
            .volume
            .unwrap()
            .volume_id;
        let staging = staging_path(&self.kubelet, &id);
        let target = target_path(&self.kubelet, name);
        let n = self.node().node();
        n.node_stage_volume(&req::stage(&id, &staging, cap.clone()))
            .unwrap_or_else(|e| panic!("stage {id}: {e:?}\n{}", self.node().log()));
        n.node_publish_volume(&req::publish(&id, &staging, &target, cap, false))
            .unwrap();
        (id, target)
    }

    /// A raw block volume staged and published for writing.
    fn block(&self, name: &str) -> String {
        let cap = req::block_cap(Mode::SINGLE_NODE_WRITER);
        let mut r = req::create(name, 32 * MIB);
        r.volume_capabilities[0] = cap.clone();
        let id = self
            .controller()
            .controller()
            .create_volume(&r)
            .unwrap()
            .volume
            .unwrap()
            .volume_id;
        let staging = staging_path(&self.kubelet, &id);
        let target = target_path(&self.kubelet, name);
        let n = self.node().node();
        n.node_stage_volume(&req::stage(&id, &staging, cap.clone()))
            .unwrap();
        n.node_publish_volume(&req::publish(&id, &staging, &target, cap, false))
            .unwrap();
        id
    }

    /// Unpublishes and unstages `id` (published at `target`).
    fn unmount(&self, id: &str, target: &Path) {
        let n = self.node().node();
        n.node_unpublish_volume(&req::unpublish(id, target))
            .unwrap();
        n.node_unstage_volume(&req::unstage(id, &staging_path(&self.kubelet, id)))
            .unwrap();
    }

    fn snapshot_image(&self, snapshot_id: &str) -> PathBuf {
        self.pool.join("snapshots").join(snapshot_id).join("image")
    }

    /// Waits until the node has answered a freeze request (it holds one).
    fn wait_frozen(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let answered = std::fs::read_dir(self.pool.join("freezes"))
                .unwrap()
                .flatten()
                .any(|e| e.file_name().to_string_lossy().ends_with("@n1.answer"));
            if answered {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "no freeze answer in 10 s\n{}",
                self.node().log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The node plugin's freeze guardian (its child running `freeze-guard`).
    fn guardian_pid(&self) -> i32 {
        let parent = self.node().pid();
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            // pid (comm) state ppid ...
            let after = &stat[stat.rfind(')').unwrap() + 2..];
            let ppid: u32 = after.split(' ').nth(1).unwrap().parse().unwrap();
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if ppid == parent && String::from_utf8_lossy(&cmdline).contains("freeze-guard") {
                return pid;
            }
        }
        panic!("no freeze guardian under node plugin {parent}");
    }
}

/// Thaws whatever is mounted under the kubelet directory when dropped
/// (`fsfreeze -u`, errors ignored): only a failed test has anything to thaw.
struct ThawOnDrop(PathBuf);

impl Drop for ThawOnDrop {
    fn drop(&mut self) {
        let Ok(table) = std::fs::read_to_string("/proc/self/mountinfo") else {
            return;
        };
        let under = self.0.to_string_lossy().into_owned();
        for line in table.lines() {
            if let Some(point) = line.split(' ').nth(4) {
                if point.starts_with(&under) {
                    let _ = std::process::Command::new("fsfreeze")
                        .args(["-u", point])
                        .stderr(std::process::Stdio::null())
                        .status();
                }
            }
        }
    }
}

/// A 4 KiB counter file in a mounted volume, written in place with
/// O_DIRECT|O_SYNC, and where its block lies on the volume's device.
struct Counter {
    file: File,
    /// Byte offset of the counter on the device (= in the image).
    physical: u64,
    buf: Vec<u8>,
}

const BLOCK: usize = 4096;

impl Counter {
    fn new(dir: &Path) -> Counter {
        let path = dir.join("counter");
        {
            let f = File::create(&path).unwrap();
            f.write_all_at(&[0u8; BLOCK], 0).unwrap();
            f.sync_all().unwrap();
        }
        let probe = File::open(&path).unwrap();
        let extent = ExtentMap::new(&probe, 0, BLOCK as u64)
            .next()
            .expect("the counter has an extent")
            .unwrap();
        assert_eq!(extent.logical, 0);
        let file = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT | libc::O_SYNC)
            .open(&path)
            .unwrap();
        Counter {
            file,
            physical: extent.physical,
            buf: vec![0u8; 2 * BLOCK],
        }
    }

    fn write(&mut self, value: u64) {
        // O_DIRECT wants a buffer aligned to the block size.
        let at = self.buf.as_ptr().align_offset(BLOCK);
        let block = &mut self.buf[at..at + BLOCK];
        block[..8].copy_from_slice(&value.to_le_bytes());
        self.file.write_all_at(block, 0).unwrap();
    }
}

/// The counter a snapshot image holds at `physical`.
fn counter_in(image: &Path, physical: u64) -> u64 {
    let mut bytes = [0u8; 8];
    File::open(image)
        .unwrap()
        .read_exact_at(&mut bytes, physical)
        .unwrap();
    u64::from_le_bytes(bytes)
}

/// Writes 1, 2, 3, ... to `a` and then `b` until `stop`; `last` is the
/// last value written to both.
fn spawn_writer(
    mut a: Counter,
    mut b: Counter,
    stop: Arc<AtomicBool>,
    last: Arc<AtomicU64>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut i = 0;
        while !stop.load(Ordering::Relaxed) {
            i += 1;
            a.write(i);
            b.write(i);
            last.store(i, Ordering::Relaxed);
        }
    })
}

/// Whether a write and fsync to `dir` finish within `within` (a frozen
/// filesystem blocks them until it thaws).
fn writable_within(dir: &Path, within: Duration) -> bool {
    let path = dir.join("probe");
    let (tx, rx) = crossbeam_channel::bounded(1);
    std::thread::spawn(move || {
        let ok =
            std::fs::write(&path, b"x").is_ok() && File::open(&path).unwrap().sync_all().is_ok();
        let _ = tx.send(ok);
    });
    rx.recv_timeout(within).unwrap_or(false)
}

#[test]
#[ignore = "needs root"]
fn a_hundred_group_snapshots_of_live_writers_are_never_torn() {
    let site = Site::new("");
    let (a, at) = site.mounted("wal", "ext4", 64);
    let (b, bt) = site.mounted("data", "xfs", 320);
    let (ca, cb) = (Counter::new(&at), Counter::new(&bt));
    let (pa, pb) = (ca.physical, cb.physical);
    let stop = Arc::new(AtomicBool::new(false));
    let last = Arc::new(AtomicU64::new(0));
    let writer = spawn_writer(ca, cb, Arc::clone(&stop), Arc::clone(&last));
    let g = site.controller().group_controller();
    let mut torn = Vec::new();
    let mut seen = Vec::new();
    for k in 0..100 {
        let r = req::group_snapshot(&format!("g{k}"), [a.clone(), b.clone()]);
        let group = g
            .create_volume_group_snapshot(&r)
            .unwrap_or_else(|e| panic!("group {k}: {e:?}\n{}", site.controller().log()))
            .group_snapshot
            .unwrap();
        let member = |source: &str| {
            group
                .snapshots
                .iter()
                .find(|s| s.source_volume_id == source)
                .unwrap()
                .snapshot_id
                .clone()
        };
        let va = counter_in(&site.snapshot_image(&member(&a)), pa);
        let vb = counter_in(&site.snapshot_image(&member(&b)), pb);
        // A is written first: at one instant A == B or A == B + 1.
        if !(va == vb || va == vb + 1) {
            torn.push((k, va, vb));
        }
        seen.push(va);
        let mut del = csi::DeleteVolumeGroupSnapshotRequest::new();
        del.group_snapshot_id = group.group_snapshot_id.clone();
        g.delete_volume_group_snapshot(&del).unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    eprintln!(
        "100 groups; the writer reached {}; counters captured {:?}..{:?}",
        last.load(Ordering::Relaxed),
        seen.first(),
        seen.last()
    );
    assert!(torn.is_empty(), "torn groups (k, A, B): {torn:?}");
    // The writer ran through the groups: the captured counters moved.
    seen.dedup();
    assert!(seen.len() > 50, "the counters barely moved: {seen:?}");
    assert!(writable_within(&at, Duration::from_secs(5)));
    assert!(writable_within(&bt, Duration::from_secs(5)));
    site.unmount(&a, &at);
    site.unmount(&b, &bt);
}

#[test]
#[ignore = "needs root"]
fn a_member_that_cannot_be_frozen_refuses_the_group() {
    let site = Site::new("");
    let (fs, ft) = site.mounted("fs", "ext4", 64);
    let block = site.block("raw");
    let g = site.controller().group_controller();
    let s = status(
        g.create_volume_group_snapshot(&req::group_snapshot("mixed", [fs.clone(), block.clone()])),
    );
    assert_eq!(s.code(), RpcStatusCode::FAILED_PRECONDITION, "{s:?}");
    assert!(s.message().contains("raw block"), "{}", s.message());
    // Nothing kept, nothing left frozen.
    let listed = site
        .controller()
        .controller()
        .list_snapshots(&csi::ListSnapshotsRequest::new())
        .unwrap();
    assert!(listed.entries.is_empty());
    assert!(writable_within(&ft, Duration::from_secs(5)));
    // The filesystem member alone is taken, while mounted.
    let group = g
        .create_volume_group_snapshot(&req::group_snapshot("fs-only", [fs.clone()]))
        .unwrap()
        .group_snapshot
        .unwrap();
    assert_eq!(group.snapshots.len(), 1);
    site.unmount(&fs, &ft);
    site.unmount(&block, &target_path(&site.kubelet, "raw"));
}

/// Which process a kill test kills while the members are frozen.
#[derive(Debug, Clone, Copy)]
enum Victim {
    Guardian,
    NodePlugin,
    Controller,
    /// The guardian and its plugin at once (the guardian stopped first,
    /// so neither thaws): the plugin's next start thaws.
    Both,
}

fn kill_while_frozen(victim: Victim) {
    // The controller holds the freeze 4 s before its copies.
    let mut site = Site::new("delay:group.frozen:4000");
    let (a, at) = site.mounted("a", "ext4", 64);
    let (b, bt) = site.mounted("b", "xfs", 320);
    let g = site.controller().group_controller();
    let r = req::group_snapshot("killed", [a.clone(), b.clone()]);
    let maker = std::thread::spawn(move || g.create_volume_group_snapshot(&r));
    site.wait_frozen();
    assert!(
        !writable_within(&at, Duration::from_millis(500)),
        "the member is not frozen"
    );
    let guardian = site.guardian_pid();
    let kill = |pid: i32, sig: Signal| {
        rustix::process::kill_process(rustix::process::Pid::from_raw(pid).unwrap(), sig).unwrap();
    };
    let started = Instant::now();
    match victim {
        Victim::Guardian => kill(guardian, Signal::KILL),
        Victim::NodePlugin => {
            site.node.as_mut().unwrap().signal(Signal::KILL);
            site.node
                .as_mut()
                .unwrap()
                .wait_exit(Duration::from_secs(10));
        }
        Victim::Controller => {
            site.controller.as_mut().unwrap().signal(Signal::KILL);
            site.controller
                .as_mut()
                .unwrap()
                .wait_exit(Duration::from_secs(10));
        }
        Victim::Both => {
            kill(guardian, Signal::STOP);
            site.node.as_mut().unwrap().signal(Signal::KILL);
            site.node
                .as_mut()
                .unwrap()
                .wait_exit(Duration::from_secs(10));
            kill(guardian, Signal::KILL);
            // Left frozen, as the kernel keeps it: nobody is left to thaw.
            std::thread::sleep(Duration::from_millis(200));
            assert!(!writable_within(&at, Duration::from_millis(500)));
            site.start_node();
        }
    }
    for dir in [&at, &bt] {
        assert!(
            writable_within(dir, Duration::from_secs(5)),
            "{victim:?}: {} still frozen\n{}",
            dir.display(),
            site.node().log()
        );
    }
    eprintln!(
        "{victim:?} killed: writable again within {:?}",
        started.elapsed()
    );
    let answer = maker.join().unwrap();
    match victim {
        // The controller died: its call failed with the connection.
        Victim::Controller => assert!(answer.is_err()),
        // The freeze ended before the copies: the group is refused.
        _ => {
            let s = status(answer);
            assert_eq!(s.code(), RpcStatusCode::FAILED_PRECONDITION, "{s:?}");
        }
    }
    if matches!(victim, Victim::NodePlugin) {
        site.start_node();
    }
    if matches!(victim, Victim::Controller) {
        site.start_controller("");
    }
    // Nothing of the group was kept.
    let listed = site
        .controller()
        .controller()
        .list_snapshots(&csi::ListSnapshotsRequest::new())
        .unwrap();
    assert!(listed.entries.is_empty(), "{:?}", listed.entries);
    // No request or answer is left (a dead controller's: the next one's
    // janitor removes it).
    let left: Vec<_> = std::fs::read_dir(site.pool.join("freezes"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "{victim:?}: left in freezes/: {left:?}");
    site.unmount(&a, &at);
    site.unmount(&b, &bt);
}

#[test]
#[ignore = "needs root"]
fn killing_the_freeze_guardian_leaves_nothing_frozen() {
    kill_while_frozen(Victim::Guardian);
}

#[test]
#[ignore = "needs root"]
fn killing_the_node_plugin_mid_freeze_leaves_nothing_frozen() {
    kill_while_frozen(Victim::NodePlugin);
}

#[test]
#[ignore = "needs root"]
fn killing_the_controller_mid_freeze_leaves_nothing_frozen() {
    kill_while_frozen(Victim::Controller);
}

#[test]
#[ignore = "needs root"]
fn a_plugin_that_restarts_thaws_what_a_dead_guardian_left_frozen() {
    kill_while_frozen(Victim::Both);
}
