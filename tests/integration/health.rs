//! Health on both wires, each fault made for real: a thin pool filled from
//! inside its volumes, a filesystem forced into errors, an xfs shut down,
//! an image gone from the pool, a pool share whose daemon stops answering
//! or dies. Every test runs the layout deploy/ ships (a node plugin
//! started first, then a controller, as separate processes on one pool),
//! asks the v1.13 health calls and the v1.12 volume condition, reads the
//! metrics, and shows the finding clear once the fault is undone. Needs
//! root.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use filevol::ops::requests::{self as req, MIB};
use filevol::proto::csi;
use filevol::proto::csi::volume_capability::access_mode::Mode;
use filevol_kit::driver::{code, scrape, Driver, Opts};
use filevol_kit::files::digest;
use filevol_kit::leaks::LeakGuard;
use filevol_kit::node_env::{staging_path, target_path};
use filevol_kit::scratch::{pool_on, Bindfs};
use filevol_kit::writer::fsck_clean;
use grpcio::RpcStatusCode;

use crate::BIN;

const NODE: &str = "node-h";

/// A node plugin (started first) and a controller on one pool. Field
/// order is drop order: processes, then the leak check, then the pool's
/// filesystem.
struct Split {
    node: Driver,
    controller: Driver,
    _guard: LeakGuard,
    kubelet: PathBuf,
    pool: PathBuf,
    _kubelet_dir: tempfile::TempDir,
}

fn args(mode: &str, kubelet: &Path, extra: &[&str]) -> Opts {
    Opts::default()
        .args(&[
            "--mode",
            mode,
            "--node-id",
            NODE,
            "--kubelet-dir",
            kubelet.to_str().unwrap(),
            "--topology=",
            "--allow-host-local-locks",
            "--overcommit",
            "10",
            "--health-interval",
            "2",
            "--metrics-address",
            "127.0.0.1:0",
            "--log-level",
            "debug",
        ])
        .args(extra)
}

impl Split {
    fn start(pool: &Path, extra: &[&str]) -> Split {
        Split::with_node_faults(pool, extra, "")
    }

    /// The same, the node plugin with `faults` (`FILEVOL_FAULTS`).
    fn with_node_faults(pool: &Path, extra: &[&str], faults: &str) -> Split {
        let kubelet_dir = tempfile::tempdir().unwrap();
        let kubelet = kubelet_dir.path().canonicalize().unwrap();
        let node = Driver::start_on(BIN, pool, args("node", &kubelet, extra).faults(faults));
        let controller = Driver::start_on(BIN, pool, args("controller", &kubelet, extra));
        Split {
            node,
            controller,
            _guard: LeakGuard {
                kubelet: kubelet.clone(),
                pool: pool.to_owned(),
            },
            kubelet,
            pool: pool.to_owned(),
            _kubelet_dir: kubelet_dir,
        }
    }

    fn create(&self, name: &str, mib: i64, fs: &str) -> String {
        let r = req::create_volume(
            name,
            mib * MIB,
            req::mount_cap(Mode::SINGLE_NODE_WRITER, fs),
        );
        self.controller
            .controller()
            .create_volume(&r)
            .unwrap()
            .volume
            .unwrap()
            .volume_id
    }

    /// ControllerPublish, NodeStage and NodePublish for pod `pod`; returns
    /// the staging and target paths.
    fn use_volume(&self, id: &str, fs: &str, pod: &str) -> (PathBuf, PathBuf) {
        let cap = req::mount_cap(Mode::SINGLE_NODE_WRITER, fs);
        self.controller
            .controller()
            .controller_publish_volume(&req::controller_publish(id, NODE, cap.clone(), false))
            .unwrap();
        let staging = staging_path(&self.kubelet, id);
        let target = target_path(&self.kubelet, pod);
        let n = self.node.node();
        n.node_stage_volume(&req::stage(id, &staging, cap.clone()))
            .unwrap();
        n.node_publish_volume(&req::publish(id, &staging, &target, cap, false))
            .unwrap();
        (staging, target)
    }

    fn unuse(&self, id: &str, staging: &Path, target: &Path) {
        let n = self.node.node();
        n.node_unpublish_volume(&req::unpublish(id, target))
            .unwrap();
        n.node_unstage_volume(&req::unstage(id, staging)).unwrap();
    }

    fn image(&self, id: &str) -> PathBuf {
        filevol_kit::files::image(&self.pool, id)
    }

    /// The node's v1.13 findings about `id` at `target`, as (status, reason).
    fn node_health(&self, id: &str, target: &Path) -> Vec<(csi::VolumeHealthErrorType, String)> {
        let mut r = csi::NodeGetVolumeHealthRequest::new();
        r.volume_id = id.into();
        r.volume_publish_path = target.to_str().unwrap().into();
        let h = self.node.node().node_get_volume_health(&r).unwrap();
        let h = h.volume_health.unwrap();
        assert_eq!(h.volume_id, id);
        entries(&h)
    }

    /// The node's v1.12 condition of `id` at `target`: (abnormal, message).
    fn node_condition(&self, id: &str, target: &Path) -> (bool, String) {
        let s = self
            .node
            .node()
            .node_get_volume_stats(&req::volume_stats(id, target))
            .unwrap();
        let c = s.volume_condition.unwrap();
        (c.abnormal, c.message)
    }

    /// The controller's v1.13 findings about `id`.
    fn controller_health(&self, id: &str) -> Vec<(csi::VolumeHealthErrorType, String)> {
        let mut r = csi::ControllerGetVolumeHealthRequest::new();
        r.volume_id = id.into();
        let h = self
            .controller
            .controller()
            .controller_get_volume_health(&r)
            .unwrap();
        entries(&h.volume_health.unwrap())
    }

    /// The controller's v1.12 condition of `id` (ControllerGetVolume).
    fn controller_condition(&self, id: &str) -> (bool, String) {
        let v = self
            .controller
            .controller()
            .controller_get_volume(&req::get_volume(id))
            .unwrap();
        let c = v.status.unwrap().volume_condition.unwrap();
        (c.abnormal, c.message)
    }

    /// The node's storage findings, as (status, reason).
    fn storage_health(&self) -> Vec<(csi::StorageHealthErrorType, String)> {
        let h = self
            .node
            .node()
            .node_get_storage_health(&csi::NodeGetStorageHealthRequest::new())
            .unwrap();
        h.backend_health
            .iter()
            .map(|b| (b.status.enum_value().unwrap(), b.reason.clone()))
            .collect()
    }
}

fn entries(h: &csi::VolumeHealth) -> Vec<(csi::VolumeHealthErrorType, String)> {
    h.health_statuses
        .iter()
        .map(|e| {
            assert!(!e.message.is_empty(), "a finding without a message: {e:?}");
            (e.status.enum_value().unwrap(), e.reason.clone())
        })
        .collect()
}

fn has<S: PartialEq + std::fmt::Debug>(found: &[(S, String)], status: S, reason: &str) -> bool {
    found.iter().any(|(s, r)| *s == status && r == reason)
}

/// Waits up to 30 s (the bound) for `check` to hold; panics with
/// `what` and the last thing seen.
fn within_30s<T: std::fmt::Debug>(
    what: &str,
    mut probe: impl FnMut() -> T,
    check: impl Fn(&T) -> bool,
) -> Duration {
    let start = Instant::now();
    loop {
        let seen = probe();
        if check(&seen) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{what}: not within 30 s; last seen {seen:?}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Writes 1 MiB blocks of `seed` into `path` until a write or an fsync
/// fails, or `max_mib` are written; returns whether one failed.
fn write_until_error(path: &Path, max_mib: usize, seed: u8) -> bool {
    let block = vec![seed; 1 << 20];
    let Ok(mut f) = File::create(path) else {
        return true;
    };
    for i in 0..max_mib {
        if f.write_all(&block).is_err() {
            return true;
        }
        if i % 8 == 7 && f.sync_data().is_err() {
            return true;
        }
    }
    f.sync_all().is_err()
}

/// A file of `mib` MiB of a pattern, synced; returns its digest.
fn checksummed(path: &Path, mib: usize, seed: u8) -> u64 {
    let f = File::create(path).unwrap();
    for i in 0..mib {
        let block: Vec<u8> = (0..1 << 20)
            .map(|j: usize| {
                (j as u8)
                    .wrapping_mul(31)
                    .wrapping_add(seed)
                    .wrapping_add(i as u8)
            })
            .collect();
        f.write_all_at(&block, (i as u64) << 20).unwrap();
    }
    f.sync_all().unwrap();
    digest(path)
}

/// Fills the filesystem holding `path` with a file there until `leave`
/// bytes are left free.
fn ballast(path: &Path, leave: u64) {
    let mut f = File::create(path).unwrap();
    let block = vec![0x77u8; 1 << 20];
    loop {
        let st = rustix::fs::statvfs(path.parent().unwrap()).unwrap();
        if st.f_bavail * st.f_frsize <= leave + (1 << 20) {
            break;
        }
        f.write_all(&block).unwrap();
    }
    f.sync_all().unwrap();
}

fn metric(text: &str, line: &str) -> bool {
    text.lines().any(|l| l == line)
}

#[test]
#[ignore = "needs root"]
fn a_thin_pool_that_fills_is_reported_on_both_wires_and_clears_once_space_is_freed() {
    let (fs, pool) = pool_on("xfs", 1024);
    let site = Split::start(&pool, &["--reserve", "32Mi"]);
    let (a, b, quiet) = (
        site.create("fill-a", 256, "ext4"),
        site.create("fill-b", 256, "ext4"),
        site.create("quiet", 64, "ext4"),
    );
    let (sa, ta) = site.use_volume(&a, "ext4", "pod-a");
    let (sb, tb) = site.use_volume(&b, "ext4", "pod-b");
    let (sq, tq) = site.use_volume(&quiet, "ext4", "pod-q");
    // What each volume held before the pool filled.
    let kept: Vec<(PathBuf, u64)> = [(&ta, 1), (&tb, 2), (&tq, 3)]
        .iter()
        .map(|(t, seed)| {
            let p = t.join("before");
            let d = checksummed(&p, 8, *seed);
            (p, d)
        })
        .collect();
    for (id, t) in [(&a, &ta), (&b, &tb), (&quiet, &tq)] {
        let h = site.node_health(id, t);
        assert!(h.is_empty(), "{id}: {h:?}");
    }
    assert!(
        site.storage_health().is_empty(),
        "{:?}",
        site.storage_health()
    );
    assert!(site.controller_health(&a).is_empty());
    assert!(!site.node_condition(&a, &ta).0);

    // Leave 96 MiB of the pool filesystem free, then write more than that
    // into both volumes: the pool fills under them.
    let filler = fs.path().join("ballast");
    ballast(&filler, 96 * MIB as u64);
    // Before any write fails, the pool says it cannot hold what its
    // volumes may still write.
    within_30s(
        "the pool reported overcommitted before writes fail",
        || site.storage_health(),
        |s| {
            has(
                s,
                csi::StorageHealthErrorType::STORAGE_DEGRADED,
                "PoolOvercommitted",
            ) && !has(
                s,
                csi::StorageHealthErrorType::STORAGE_DEGRADED,
                "PoolLowSpace",
            )
        },
    );
    let text = scrape(&site.controller.metrics_address());
    assert!(
        metric(
            &text,
            "filevol_pool_health{reason=\"pool_overcommitted\"} 1"
        ),
        "{text}"
    );
    let failed_a = write_until_error(&ta.join("fill"), 200, 0xa1);
    let failed_b = write_until_error(&tb.join("fill"), 200, 0xb2);
    assert!(failed_a || failed_b, "no write failed on a full pool");

    let took = within_30s(
        "the pool reported out of space by the node (NodeGetStorageHealth)",
        || site.storage_health(),
        |s| {
            has(
                s,
                csi::StorageHealthErrorType::STORAGE_DEGRADED,
                "PoolOutOfSpace",
            )
        },
    );
    eprintln!("storage degraded seen after {took:?}");
    within_30s(
        "volume a degraded on the node (v1.13)",
        || site.node_health(&a, &ta),
        |h| has(h, csi::VolumeHealthErrorType::DEGRADED, "PoolFull"),
    );
    let node_b = site.node_health(&b, &tb);
    assert!(
        has(&node_b, csi::VolumeHealthErrorType::DEGRADED, "PoolFull"),
        "{node_b:?}"
    );
    // The writes that failed went through the loop device, which the kernel
    // logged.
    let a_seen = site.node_health(&a, &ta);
    assert!(
        has(
            &a_seen,
            csi::VolumeHealthErrorType::DEGRADED,
            "LoopIoErrors"
        ) || has(
            &node_b,
            csi::VolumeHealthErrorType::DEGRADED,
            "LoopIoErrors"
        ),
        "{a_seen:?} {node_b:?}"
    );
    let (abnormal, message) = site.node_condition(&a, &ta);
    assert!(abnormal && message.contains("pool_full"), "{message}");
    let ctl = site.controller_health(&b);
    assert!(
        has(&ctl, csi::VolumeHealthErrorType::DEGRADED, "PoolFull"),
        "{ctl:?}"
    );
    let (abnormal, message) = site.controller_condition(&b);
    assert!(abnormal && message.contains("pool_full"), "{message}");
    for d in [&site.node, &site.controller] {
        let text = scrape(&d.metrics_address());
        assert!(
            metric(&text, "filevol_pool_health{reason=\"pool_out_of_space\"} 1"),
            "{text}"
        );
    }
    let text = scrape(&site.node.metrics_address());
    assert!(
        metric(&text, &format!("filevol_volume_health{{volume=\"{a}\",reason=\"pool_full\",severity=\"degraded\"}} 1")),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "filevol_volume_written_bytes_total{{volume=\"{a}\"}}"
        )),
        "{text}"
    );
    // Nothing more is promised: GetCapacity says 0, CreateVolume refuses.
    let cap = site
        .controller
        .controller()
        .get_capacity(&csi::GetCapacityRequest::new())
        .unwrap();
    assert_eq!(cap.available_capacity, 0);
    assert_eq!(
        code(
            site.controller
                .controller()
                .create_volume(&req::create_volume(
                    "one-more",
                    64 * MIB,
                    req::mount_cap(Mode::SINGLE_NODE_WRITER, "ext4")
                ))
        ),
        RpcStatusCode::RESOURCE_EXHAUSTED
    );

    // Space comes back: the pool's and the controller's findings clear.
    std::fs::remove_file(&filler).unwrap();
    within_30s(
        "the pool healthy again (NodeGetStorageHealth)",
        || site.storage_health(),
        Vec::is_empty,
    );
    within_30s(
        "volume b healthy for the controller",
        || site.controller_health(&b),
        Vec::is_empty,
    );
    assert!(!site.controller_condition(&b).0);
    // What was written before the pool filled reads back; the volume that
    // only sat there is untouched.
    for (p, d) in &kept {
        assert_eq!(digest(p), *d, "{} changed", p.display());
    }
    // Unstaged, every filesystem checks clean, and staged again each is
    // healthy on the node too (the device is new: its old errors are not
    // its own).
    for (id, s, t) in [(&a, &sa, &ta), (&b, &sb, &tb), (&quiet, &sq, &tq)] {
        site.unuse(id, s, t);
        fsck_clean(&site.image(id));
    }
    let (sa, ta) = site.use_volume(&a, "ext4", "pod-a");
    within_30s(
        "volume a healthy on the node",
        || site.node_health(&a, &ta),
        Vec::is_empty,
    );
    assert!(!site.node_condition(&a, &ta).0);
    assert_eq!(digest(&ta.join("before")), kept[0].1);
    site.unuse(&a, &sa, &ta);
}

#[test]
#[ignore = "needs root"]
fn filesystem_faults_and_a_missing_image_show_on_both_wires_and_clear() {
    let (_fs, pool) = pool_on("xfs", 1024);
    let site = Split::start(&pool, &["--reserve", "0"]);
    let e = site.create("ext4-errors", 128, "ext4");
    let x = site.create("xfs-shutdown", 320, "xfs");
    let (se, te) = site.use_volume(&e, "ext4", "pod-e");
    let (sx, tx) = site.use_volume(&x, "xfs", "pod-x");
    assert!(site.node_health(&e, &te).is_empty());
    assert!(site.node_health(&x, &tx).is_empty());

    // ext4 records an error (the kernel's own test hook: what a corrupted
    // block found by the filesystem does), and with errors=remount-ro (set
    // on the mounted filesystem) the kernel makes it read-only.
    let remount = Command::new("mount")
        .args(["-o", "remount,errors=remount-ro"])
        .arg(&se)
        .status()
        .unwrap();
    assert!(remount.success());
    let dev = filevol_kit::leaks::loop_of(&site.image(&e)).unwrap();
    std::fs::write(format!("/sys/fs/ext4/{dev}/trigger_fs_error"), "1").unwrap();
    within_30s(
        "ext4 errors and the read-only remount reported (v1.13)",
        || site.node_health(&e, &te),
        |h| {
            has(h, csi::VolumeHealthErrorType::DEGRADED, "FilesystemErrors")
                && has(
                    h,
                    csi::VolumeHealthErrorType::DEGRADED,
                    "FilesystemReadOnly",
                )
        },
    );
    let (abnormal, message) = site.node_condition(&e, &te);
    assert!(
        abnormal && message.contains("filesystem_errors") && message.contains("e2fsck"),
        "{message}"
    );
    let text = scrape(&site.node.metrics_address());
    assert!(
        metric(&text, &format!("filevol_volume_health{{volume=\"{e}\",reason=\"filesystem_errors\",severity=\"degraded\"}} 1")),
        "{text}"
    );
    // The operator's fix: unstage, e2fsck, stage again.
    site.unuse(&e, &se, &te);
    let fixed = Command::new("e2fsck")
        .arg("-fy")
        .arg(site.image(&e))
        .status()
        .unwrap();
    assert!(fixed.code().is_some_and(|c| c <= 1), "e2fsck -fy: {fixed}");
    fsck_clean(&site.image(&e));
    let (se, te) = site.use_volume(&e, "ext4", "pod-e");
    within_30s(
        "ext4 healthy again",
        || site.node_health(&e, &te),
        Vec::is_empty,
    );

    // xfs shuts itself down.
    let down = Command::new("xfs_io")
        .args(["-x", "-c", "shutdown"])
        .arg(&tx)
        .status()
        .unwrap();
    assert!(down.success());
    within_30s(
        "xfs shutdown reported (v1.13)",
        || site.node_health(&x, &tx),
        |h| {
            has(
                h,
                csi::VolumeHealthErrorType::DEGRADED,
                "FilesystemShutdown",
            )
        },
    );
    assert!(site.node_condition(&x, &tx).0);
    site.unuse(&x, &sx, &tx);
    let (sx, tx) = site.use_volume(&x, "xfs", "pod-x");
    within_30s(
        "xfs healthy again",
        || site.node_health(&x, &tx),
        Vec::is_empty,
    );

    // The image goes from the pool (moved aside: what a stray rm or a
    // restore gone wrong does); the controller says data loss, the node
    // too, both wires.
    let image = site.image(&e);
    let aside = image.with_file_name("image.aside");
    std::fs::rename(&image, &aside).unwrap();
    within_30s(
        "the missing image reported by the controller (v1.13)",
        || site.controller_health(&e),
        |h| has(h, csi::VolumeHealthErrorType::DATA_LOSS, "DataMissing"),
    );
    let (abnormal, message) = site.controller_condition(&e);
    assert!(abnormal && message.contains("data_missing"), "{message}");
    let listed = site
        .controller
        .controller()
        .list_volumes(&req::list(0, ""))
        .unwrap();
    let entry = listed
        .entries
        .iter()
        .find(|en| en.volume.volume_id == e)
        .unwrap();
    assert!(entry.status.volume_condition.abnormal);
    let mut all = csi::ControllerListVolumeHealthRequest::new();
    all.max_entries = 0;
    let list = site
        .controller
        .controller()
        .controller_list_volume_health(&all)
        .unwrap();
    // Only the volume with a finding is listed.
    assert_eq!(list.entries.len(), 1, "{list:?}");
    assert_eq!(list.entries[0].volume_id, e);
    let found = entries(&list.entries[0]);
    assert!(
        has(&found, csi::VolumeHealthErrorType::DATA_LOSS, "DataMissing"),
        "{found:?}"
    );
    let node = site.node_health(&e, &te);
    assert!(
        has(&node, csi::VolumeHealthErrorType::DATA_LOSS, "DataMissing"),
        "{node:?}"
    );
    std::fs::rename(&aside, &image).unwrap();
    within_30s(
        "the image back, healthy",
        || site.controller_health(&e),
        Vec::is_empty,
    );
    within_30s(
        "the image back, healthy on the node",
        || site.node_health(&e, &te),
        Vec::is_empty,
    );
    site.unuse(&e, &se, &te);
    site.unuse(&x, &sx, &tx);
}

#[test]
#[ignore = "needs root"]
fn a_share_that_stops_answering_is_unreachable_and_no_worker_hangs() {
    let (fs, _) = pool_on("xfs", 1024);
    let backing = fs.path().join("share");
    std::fs::create_dir(&backing).unwrap();
    let mut share = Bindfs::killable(&backing);
    let pool = share.path().join("pool");
    std::fs::create_dir(&pool).unwrap();
    let site = Split::start(&pool, &["--reserve", "0", "--workers", "2"]);
    // Dropped before the processes: a failing assertion must not leave
    // them waiting on a stopped daemon while they are stopped.
    let _resume = ResumeOnDrop(share.daemon_pid());
    let id = site.create("on-share", 64, "ext4");
    let staging = staging_path(&site.kubelet, &id);
    assert!(site.storage_health().is_empty());
    assert!(site.controller_health(&id).is_empty());

    // The server stops answering: every call that reaches the share
    // sleeps. Calls made at once, before the watch has seen it, return
    // at their deadline (2 s here), more of them than there are workers.
    share.pause_daemon();
    let calls: Vec<_> = (0..6)
        .map(|i| {
            let (c, n) = (site.controller.controller(), site.node.node());
            let (id, staging) = (id.clone(), staging.clone());
            std::thread::spawn(move || {
                let start = Instant::now();
                let failed = match i {
                    0 => c.controller_get_volume(&req::get_volume(&id)).err(),
                    1 => c.list_volumes(&req::list(0, "")).err(),
                    2 => {
                        let mut r = csi::ControllerGetVolumeHealthRequest::new();
                        r.volume_id = id;
                        c.controller_get_volume_health(&r).err()
                    }
                    3 => c
                        .controller_list_volume_health(
                            &csi::ControllerListVolumeHealthRequest::new(),
                        )
                        .err(),
                    4 => n
                        .node_get_volume_stats(&req::volume_stats(&id, &staging))
                        .err(),
                    _ => n
                        .node_get_storage_health(&csi::NodeGetStorageHealthRequest::new())
                        .err(),
                };
                (i, start.elapsed(), failed)
            })
        })
        .collect();
    for call in calls {
        let (i, took, failed) = call.join().unwrap();
        assert!(
            took < Duration::from_secs(8),
            "call {i} took {took:?} on a hung pool"
        );
        if let Some(grpcio::Error::RpcFailure(st)) = &failed {
            assert_eq!(st.code(), RpcStatusCode::UNAVAILABLE, "call {i}: {st:?}");
        } else {
            assert!(failed.is_none(), "call {i}: {failed:?}");
        }
    }
    let start = Instant::now();
    let text = scrape(&site.node.metrics_address());
    assert!(
        start.elapsed() < Duration::from_secs(6),
        "a scrape took {:?}",
        start.elapsed()
    );
    assert!(
        text.contains("filevol_pool_health{reason=\"pool_unreachable\"}"),
        "{text}"
    );
    let took = within_30s(
        "the share reported unreachable (NodeGetStorageHealth)",
        || site.storage_health(),
        |s| {
            has(
                s,
                csi::StorageHealthErrorType::STORAGE_UNREACHABLE,
                "PoolUnreachable",
            )
        },
    );
    eprintln!("unreachable seen after {took:?}");
    // More health calls than there are workers: none of them hangs one.
    for _ in 0..6 {
        let start = Instant::now();
        let h = site.controller_health(&id);
        assert!(
            has(
                &h,
                csi::VolumeHealthErrorType::INACCESSIBLE,
                "PoolUnreachable"
            ),
            "{h:?}"
        );
        assert!(site.storage_health().len() == 1);
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "a health call took {:?}",
            start.elapsed()
        );
    }
    // The v1.12 wire says so too, at once: ControllerGetVolume and
    // NodeGetVolumeStats with the condition, ListVolumes UNAVAILABLE.
    let (abnormal, message) = site.controller_condition(&id);
    assert!(
        abnormal && message.contains("pool_unreachable"),
        "{message}"
    );
    let (abnormal, message) = site.node_condition(&id, &staging);
    assert!(
        abnormal && message.contains("pool_unreachable"),
        "{message}"
    );
    assert_eq!(
        code(site.controller.controller().list_volumes(&req::list(0, ""))),
        RpcStatusCode::UNAVAILABLE
    );
    let text = scrape(&site.node.metrics_address());
    assert!(
        metric(&text, "filevol_pool_health{reason=\"pool_unreachable\"} 1"),
        "{text}"
    );
    share.resume_daemon();
    within_30s(
        "the share answers again",
        || site.storage_health(),
        Vec::is_empty,
    );
    within_30s(
        "the volume healthy again",
        || site.controller_health(&id),
        Vec::is_empty,
    );

    // The daemon dies: the share answers ENOTCONN, until it is mounted again.
    share.kill_daemon();
    within_30s(
        "a dead share reported unreachable",
        || site.storage_health(),
        |s| {
            has(
                s,
                csi::StorageHealthErrorType::STORAGE_UNREACHABLE,
                "PoolUnreachable",
            )
        },
    );
    share.restart();
    within_30s("the share back", || site.storage_health(), Vec::is_empty);
    let mut del = csi::DeleteVolumeRequest::new();
    del.volume_id = id;
    site.controller.controller().delete_volume(&del).unwrap();
}

#[test]
#[ignore = "needs root"]
fn each_wire_is_switched_by_its_own_flag() {
    use csi::controller_service_capability::rpc::Type as Ctrl;
    use csi::node_service_capability::rpc::Type as NodeCap;
    let (_fs, pool) = pool_on("xfs", 512);
    let caps = |d: &Driver| {
        let node: Vec<NodeCap> = d
            .node()
            .node_get_capabilities(&csi::NodeGetCapabilitiesRequest::new())
            .unwrap()
            .capabilities
            .iter()
            .map(|c| c.rpc().type_.enum_value().unwrap())
            .collect();
        let ctrl: Vec<Ctrl> = d
            .controller()
            .controller_get_capabilities(&csi::ControllerGetCapabilitiesRequest::new())
            .unwrap()
            .capabilities
            .iter()
            .map(|c| c.rpc().type_.enum_value().unwrap())
            .collect();
        (node, ctrl)
    };
    let mut storage = csi::NodeGetStorageHealthRequest::new();
    storage.secrets.insert("k".into(), "v".into());

    // Only the v1.12 condition.
    let kubelet = tempfile::tempdir().unwrap();
    let old = Driver::start_on(
        BIN,
        &pool,
        args(
            "all",
            &kubelet.path().canonicalize().unwrap(),
            &["--volume-health=false"],
        ),
    );
    let (node, ctrl) = caps(&old);
    assert!(node.contains(&NodeCap::VOLUME_CONDITION) && ctrl.contains(&Ctrl::VOLUME_CONDITION));
    assert!(
        !node.contains(&NodeCap::GET_VOLUME_HEALTH) && !node.contains(&NodeCap::GET_STORAGE_HEALTH)
    );
    assert!(!ctrl.contains(&Ctrl::GET_VOLUME_HEALTH) && !ctrl.contains(&Ctrl::LIST_VOLUME_HEALTH));
    assert_eq!(
        code(old.node().node_get_storage_health(&storage)),
        RpcStatusCode::UNIMPLEMENTED
    );
    let id = {
        let r = req::create_volume(
            "switch",
            64 * MIB,
            req::mount_cap(Mode::SINGLE_NODE_WRITER, "ext4"),
        );
        old.controller()
            .create_volume(&r)
            .unwrap()
            .volume
            .unwrap()
            .volume_id
    };
    let mut one = csi::ControllerGetVolumeHealthRequest::new();
    one.volume_id.clone_from(&id);
    assert_eq!(
        code(old.controller().controller_get_volume_health(&one)),
        RpcStatusCode::UNIMPLEMENTED
    );
    let got = old
        .controller()
        .controller_get_volume(&req::get_volume(&id))
        .unwrap();
    assert!(got.status.volume_condition.is_some());
    drop(old);

    // Only the v1.13 calls.
    let new = Driver::start_on(
        BIN,
        &pool,
        args(
            "all",
            &kubelet.path().canonicalize().unwrap(),
            &["--volume-condition=false"],
        ),
    );
    let (node, ctrl) = caps(&new);
    assert!(!node.contains(&NodeCap::VOLUME_CONDITION) && !ctrl.contains(&Ctrl::VOLUME_CONDITION));
    assert!(
        node.contains(&NodeCap::GET_VOLUME_HEALTH) && node.contains(&NodeCap::GET_STORAGE_HEALTH)
    );
    assert!(ctrl.contains(&Ctrl::GET_VOLUME_HEALTH) && ctrl.contains(&Ctrl::LIST_VOLUME_HEALTH));
    let got = new
        .controller()
        .controller_get_volume(&req::get_volume(&id))
        .unwrap();
    assert!(got.status.volume_condition.is_none(), "{got:?}");
    assert!(new
        .node()
        .node_get_storage_health(&storage)
        .unwrap()
        .backend_health
        .is_empty());
    let h = new.controller().controller_get_volume_health(&one).unwrap();
    assert!(h.volume_health.health_statuses.is_empty());
    // Bad input: a missing id, an unknown volume, a path outside the
    // kubelet directory.
    assert_eq!(
        code(
            new.controller()
                .controller_get_volume_health(&csi::ControllerGetVolumeHealthRequest::new())
        ),
        RpcStatusCode::INVALID_ARGUMENT
    );
    let mut unknown = one.clone();
    unknown.volume_id = "no-such-volume".into();
    assert_eq!(
        code(new.controller().controller_get_volume_health(&unknown)),
        RpcStatusCode::NOT_FOUND
    );
    // Both paths are optional: a volume asked about without one is looked
    // at through its loop device, and this one has none here.
    let mut outside = csi::NodeGetVolumeHealthRequest::new();
    outside.volume_id.clone_from(&id);
    let found = entries(
        &new.node()
            .node_get_volume_health(&outside)
            .unwrap()
            .volume_health
            .unwrap(),
    );
    assert!(
        has(
            &found,
            csi::VolumeHealthErrorType::INACCESSIBLE,
            "NoLoopDevice"
        ),
        "{found:?}"
    );
    outside.volume_publish_path = "/etc".into();
    let c = code(new.node().node_get_volume_health(&outside));
    assert_eq!(c, RpcStatusCode::NOT_FOUND);
    let mut del = csi::DeleteVolumeRequest::new();
    del.volume_id = id;
    new.controller().delete_volume(&del).unwrap();
}

/// Lets a stopped bindfs daemon go on when dropped (SIGCONT).
struct ResumeOnDrop(u32);

impl Drop for ResumeOnDrop {
    fn drop(&mut self) {
        // The daemon may be gone (killed and started again by the test).
        if let Some(pid) = i32::try_from(self.0)
            .ok()
            .and_then(rustix::process::Pid::from_raw)
        {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::CONT);
        }
    }
}

/// A loop device attached with `losetup`, as an older filevol attached
/// one (no fence of its own, no node in its name); detached when dropped.
struct BareDevice(String);

impl BareDevice {
    fn attach(image: &Path) -> BareDevice {
        let out = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(image)
            .output()
            .unwrap();
        assert!(out.status.success(), "losetup: {out:?}");
        BareDevice(String::from_utf8(out.stdout).unwrap().trim().to_owned())
    }
}

impl Drop for BareDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

#[test]
#[ignore = "needs root"]
fn a_fence_another_holder_has_is_reported_until_it_is_this_node_s() {
    use filevol_core::sys::lock::{self, LockKind};
    let (_fs, pool) = pool_on("xfs", 1024);
    // The controller first: the node plugin must find the device at start.
    let kubelet_dir = tempfile::tempdir().unwrap();
    let kubelet = kubelet_dir.path().canonicalize().unwrap();
    let controller = Driver::start_on(
        BIN,
        &pool,
        args("controller", &kubelet, &["--reserve", "0"]),
    );
    let r = req::create_volume(
        "fenced",
        64 * MIB,
        req::mount_cap(Mode::SINGLE_NODE_WRITER, "ext4"),
    );
    let id = controller
        .controller()
        .create_volume(&r)
        .unwrap()
        .volume
        .unwrap()
        .volume_id;
    let image = filevol_kit::files::image(&pool, &id);
    // A device without a fence, and another holder of the image's lock:
    // what a lapsed NFS lease leaves once another host took the image. On
    // one host the other holder is told from a device's own lock by its
    // kind: a shared (read-only) holder, where this read-write device
    // would hold an exclusive one.
    let device = BareDevice::attach(&image);
    let other = File::open(&image).unwrap();
    assert!(lock::try_lock(&other, LockKind::Shared).unwrap());
    let node = Driver::start_on(
        BIN,
        &pool,
        args(
            "node",
            &kubelet,
            &["--reserve", "0", "--fence-check-interval", "1s"],
        ),
    );
    let staging = staging_path(&kubelet, &id);
    let mut health = csi::NodeGetVolumeHealthRequest::new();
    health.volume_id.clone_from(&id);
    health.staging_target_path = staging.to_str().unwrap().into();
    let findings = || {
        entries(
            &node
                .node()
                .node_get_volume_health(&health)
                .unwrap()
                .volume_health
                .unwrap(),
        )
    };
    within_30s("the unproven fence reported (v1.13)", findings, |h| {
        has(h, csi::VolumeHealthErrorType::DEGRADED, "FenceUnproven")
    });
    let stats = node
        .node()
        .node_get_volume_stats(&req::volume_stats(&id, &staging))
        .unwrap();
    assert!(
        stats.volume_condition.message.contains("fence_unproven"),
        "{:?}",
        stats.volume_condition
    );
    let text = scrape(&node.metrics_address());
    assert!(
        metric(&text, &format!("filevol_volume_health{{volume=\"{id}\",reason=\"fence_unproven\",severity=\"degraded\"}} 1")),
        "{text}"
    );
    // The other holder lets go: the next check takes the fence for this
    // node, and the finding clears.
    drop(other);
    within_30s("the fence this node's again", findings, |h| {
        !has(h, csi::VolumeHealthErrorType::DEGRADED, "FenceUnproven")
    });
    let stats = node
        .node()
        .node_get_volume_stats(&req::volume_stats(&id, &staging))
        .unwrap();
    assert!(
        !stats.volume_condition.message.contains("fence_unproven"),
        "{:?}",
        stats.volume_condition
    );
    drop(node);
    drop(device);
    let mut del = csi::DeleteVolumeRequest::new();
    del.volume_id = id;
    controller.controller().delete_volume(&del).unwrap();
}

#[test]
#[ignore = "needs root"]
fn a_health_call_does_not_wait_for_a_slow_stage_of_its_volume() {
    let (_fs, pool) = pool_on("xfs", 1024);
    // The stage sleeps 8 s after formatting, holding the volume's lock.
    let site = Split::with_node_faults(&pool, &["--reserve", "0"], "delay:stage.formatted:8000");
    let id = site.create("slow", 64, "ext4");
    let cap = req::mount_cap(Mode::SINGLE_NODE_WRITER, "ext4");
    site.controller
        .controller()
        .controller_publish_volume(&req::controller_publish(&id, NODE, cap.clone(), false))
        .unwrap();
    let staging = staging_path(&site.kubelet, &id);
    let stage = {
        let (n, r) = (site.node.node(), req::stage(&id, &staging, cap));
        std::thread::spawn(move || n.node_stage_volume(&r).map(|_| ()))
    };
    std::thread::sleep(Duration::from_secs(2));
    let mut r = csi::NodeGetVolumeHealthRequest::new();
    r.volume_id.clone_from(&id);
    r.staging_target_path = staging.to_str().unwrap().into();
    let start = Instant::now();
    let answer = site.node.node().node_get_volume_health(&r);
    let took = start.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "NodeGetVolumeHealth waited {took:?} for the stage"
    );
    // Formatted and not mounted yet: the path is not a mount.
    let found = entries(&answer.unwrap().volume_health.unwrap());
    assert!(
        has(
            &found,
            csi::VolumeHealthErrorType::INACCESSIBLE,
            "NotMounted"
        ),
        "{found:?}"
    );
    let start = Instant::now();
    assert!(site.controller_health(&id).is_empty());
    assert!(start.elapsed() < Duration::from_secs(3));
    assert!(
        !stage.is_finished(),
        "the stage was not slow: the test proves nothing"
    );
    stage.join().unwrap().unwrap();
    assert!(site.node_health(&id, &staging).is_empty());
    site.node
        .node()
        .node_unstage_volume(&req::unstage(&id, &staging))
        .unwrap();
}
