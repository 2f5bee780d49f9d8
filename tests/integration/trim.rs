//! Thin pools stay thin: space freed inside a volume goes back to the pool
//! by trims (on demand and on schedule), by online discard, and by a block
//! volume's own discards, on real images, loop devices and mounts. The
//! layout is the one deploy/ ships: a node plugin (`--mode node`, started
//! first) and a controller (`--mode controller`) on one xfs pool.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use filevol::ops::requests::{self as req, MIB};
use filevol::proto::csi;
use filevol::proto::csi::volume_capability::access_mode::Mode;
use filevol::proto::filevol::{TrimVolumesRequest, VolumeTrim};
use filevol_kit::driver::{Driver, Opts};
use filevol_kit::files::{allocated, digest, fill};
use filevol_kit::leaks::{loop_of, LeakGuard};
use filevol_kit::node_env::{staging_path, target_path};
use filevol_kit::scratch::{pool_on, LoopFs};

use crate::BIN;

const RWO: Mode = Mode::SINGLE_NODE_WRITER;

/// A node plugin and a controller on one xfs pool. Fields drop in order:
/// the processes stop, then the guard unmounts and detaches whatever a
/// failing test left, then the pool's filesystem goes.
struct Site {
    node: Driver,
    controller: Driver,
    pool: PathBuf,
    kubelet: PathBuf,
    _guard: LeakGuard,
    _kubelet_dir: tempfile::TempDir,
    _fs: LoopFs,
}

impl Site {
    fn new(pool_mib: u64, node_flags: &[&str]) -> Site {
        Site::on("xfs", pool_mib, node_flags)
    }

    fn on(pool_fs: &str, pool_mib: u64, node_flags: &[&str]) -> Site {
        let (fs, pool) = pool_on(pool_fs, pool_mib);
        let kubelet_dir = tempfile::tempdir().unwrap();
        let kubelet = kubelet_dir.path().canonicalize().unwrap();
        let common = |mode: &str| {
            Opts::default().args(&[
                "--mode",
                mode,
                "--node-id",
                "n1",
                "--kubelet-dir",
                kubelet.to_str().unwrap(),
                "--reserve",
                "0",
                "--overcommit",
                "10",
                "--log-level",
                "debug",
            ])
        };
        let node = Driver::start_on(BIN, &pool, common("node").args(node_flags));
        let controller = Driver::start_on(BIN, &pool, common("controller"));
        Site {
            node,
            controller,
            _guard: LeakGuard {
                kubelet: kubelet.clone(),
                pool: pool.clone(),
            },
            pool,
            kubelet,
            _kubelet_dir: kubelet_dir,
            _fs: fs,
        }
    }

    fn create(
        &self,
        name: &str,
        mib: i64,
        cap: csi::VolumeCapability,
        params: &[(&str, &str)],
    ) -> String {
        let mut r = req::create_volume(name, mib * MIB, cap);
        for (k, v) in params {
            r.parameters.insert((*k).into(), (*v).into());
        }
        self.create_from(&r)
    }

    /// CreateVolume as asked (a clone, a restore); the new volume's id.
    fn create_from(&self, r: &csi::CreateVolumeRequest) -> String {
        self.controller
            .controller()
            .create_volume(r)
            .expect("CreateVolume")
            .volume
            .into_option()
            .expect("a volume")
            .volume_id
    }

    fn image(&self, id: &str) -> PathBuf {
        filevol_kit::files::image(&self.pool, id)
    }

    fn stage(&self, id: &str, cap: csi::VolumeCapability) -> PathBuf {
        let staging = staging_path(&self.kubelet, id);
        self.node
            .node()
            .node_stage_volume(&req::stage(id, &staging, cap))
            .expect("NodeStageVolume");
        staging
    }

    fn unstage(&self, id: &str, staging: &Path) {
        self.node
            .node()
            .node_unstage_volume(&req::unstage(id, staging))
            .expect("NodeUnstageVolume");
    }

    fn delete(&self, id: &str) {
        self.controller
            .controller()
            .delete_volume(&req::delete(id))
            .expect("DeleteVolume");
    }

    fn trim(&self, ids: &[&str]) -> Vec<VolumeTrim> {
        let mut r = TrimVolumesRequest::new();
        r.volume_ids = ids.iter().map(|s| (*s).to_owned()).collect();
        self.node
            .node_maintenance()
            .trim_volumes(&r)
            .expect("TrimVolumes")
            .volumes
    }

    fn metrics(&self) -> String {
        let log = self.node.log();
        let address = log
            .split("metrics at http://")
            .nth(1)
            .and_then(|rest| rest.split("/metrics").next())
            .unwrap_or_else(|| panic!("no metrics address in the log:\n{log}"))
            .to_owned();
        let mut s = std::net::TcpStream::connect(address).unwrap();
        write!(s, "GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }
}

/// A counter's value in a metrics exposition.
fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
}

/// Writes `n` files of `mib` MiB each (distinct contents) under `dir` and
/// returns their digests.
fn write_files(dir: &Path, n: usize, mib: usize) -> Vec<(String, u64)> {
    (0..n)
        .map(|i| {
            let name = format!("data-{i}");
            let path = dir.join(&name);
            std::fs::File::create(&path).unwrap();
            fill(&path, 0, mib << 20, 7 + i as u8);
            (name, digest(&path))
        })
        .collect()
}

/// Makes the filesystem at `dir` write out what was freed (a deletion is
/// only free space once its transaction commits).
fn sync_fs(dir: &Path) {
    let f = std::fs::File::open(dir).unwrap();
    rustix::fs::syncfs(&f).unwrap();
}

fn remove_files(dir: &Path, files: &[(String, u64)]) {
    for (name, _) in files {
        std::fs::remove_file(dir.join(name)).unwrap();
    }
    sync_fs(dir);
}

const DATA_MIB: usize = 512;

#[test]
#[ignore = "needs root"]
fn a_trim_gives_deleted_data_back_and_a_snapshot_keeps_every_checksum() {
    let site = Site::new(4096, &["--metrics-address", "127.0.0.1:0"]);
    let mut reclaimed_total = 0;
    for (i, fs) in ["ext4", "xfs", "btrfs"].into_iter().enumerate() {
        let cap = req::mount_cap(RWO, fs);
        let id = site.create(&format!("trimmed-{fs}"), 1024, cap.clone(), &[]);
        let staging = site.stage(&id, cap.clone());
        let files = write_files(&staging, 4, DATA_MIB / 4);
        sync_fs(&staging);
        let written = allocated(&site.image(&id));
        assert!(
            written >= (DATA_MIB as u64) << 20,
            "{fs}: {written} allocated"
        );

        // A snapshot before the delete: its blocks are shared with the
        // image until the trim punches the image's side.
        let snap = site
            .controller
            .controller()
            .create_snapshot(&req::snapshot(&format!("before-{fs}"), &id))
            .expect("CreateSnapshot")
            .snapshot
            .into_option()
            .unwrap()
            .snapshot_id;
        let snap_image = site.pool.join("snapshots").join(&snap).join("image");
        let snap_allocated = allocated(&snap_image);

        remove_files(&staging, &files);
        let before_trim = allocated(&site.image(&id));
        let answer = site.trim(&[&id]);
        assert_eq!(answer.len(), 1, "{answer:?}");
        let t = &answer[0];
        assert!(t.trimmed, "{fs}: {t:?}");
        assert_eq!(t.volume_id, id);
        assert!(t.error.is_empty() && t.skipped.is_empty(), "{t:?}");
        let after = allocated(&site.image(&id));
        assert_eq!(
            t.allocated_bytes_after, after,
            "{fs}: the answer is st_blocks"
        );
        assert_eq!(t.allocated_bytes_before, before_trim);
        let fell = written.saturating_sub(after);
        assert!(
            fell * 10 >= ((DATA_MIB as u64) << 20) * 9,
            "{fs}: the image's allocation fell by {fell} of {DATA_MIB} MiB deleted ({written} -> {after}): {t:?}"
        );
        reclaimed_total += t.allocated_bytes_before - t.allocated_bytes_after;

        // The snapshot is untouched: same allocation, and a volume restored
        // from it holds every file with its checksum.
        assert_eq!(
            allocated(&snap_image),
            snap_allocated,
            "{fs}: the snapshot changed"
        );
        let mut restore = req::create_volume(&format!("restored-{fs}"), 1024 * MIB, cap.clone());
        restore.volume_content_source = Some(req::snapshot_source(&snap)).into();
        let restored = site.create_from(&restore);
        let r_staging = site.stage(&restored, cap.clone());
        for (name, sum) in &files {
            assert_eq!(digest(&r_staging.join(name)), *sum, "{fs}: {name} changed");
        }
        site.unstage(&restored, &r_staging);
        site.unstage(&id, &staging);
        site.delete(&restored);
        site.delete(&id);
        site.controller
            .controller()
            .delete_snapshot(&req::delete_snapshot(&snap))
            .expect("DeleteSnapshot");

        let text = site.metrics();
        assert_eq!(metric(&text, "filevol_trims_total"), i as u64 + 1);
        assert_eq!(metric(&text, "filevol_trim_failures_total"), 0);
        assert_eq!(
            metric(&text, "filevol_trim_reclaimed_bytes_total"),
            reclaimed_total
        );
    }
}

/// Waits up to `limit` for `path`'s allocation to fall to `at_most`.
fn allocation_falls(path: &Path, at_most: u64, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if allocated(path) <= at_most {
            return Some(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

/// [`allocation_falls`], syncing the filesystem mounted at `mounted`
/// every half second while it waits.
fn allocation_falls_syncing(
    path: &Path,
    mounted: &Path,
    at_most: u64,
    limit: Duration,
) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        sync_fs(mounted);
        if allocation_falls(path, at_most, Duration::from_millis(500)).is_some() {
            return Some(start.elapsed());
        }
    }
    None
}

#[test]
#[ignore = "needs root"]
fn the_node_trims_on_schedule_but_never_a_read_only_or_thick_volume() {
    let site = Site::new(2048, &["--trim-interval", "2s", "--trim-jitter", "1s"]);
    let cap = req::mount_cap(RWO, "ext4");
    let thin = site.create("thin", 256, cap.clone(), &[]);
    let thick = site.create("thick", 256, cap.clone(), &[("thick", "true")]);
    // Formatted by a first stage, then staged read-only by two readers.
    let reader = site.create("reader", 256, cap.clone(), &[]);
    let s = site.stage(&reader, cap.clone());
    write_files(&s, 1, 16);
    site.unstage(&reader, &s);
    let read_only = req::mount_cap(Mode::MULTI_NODE_READER_ONLY, "ext4");
    let reader_staging = site.stage(&reader, read_only);
    let reader_allocated = allocated(&site.image(&reader));

    let thin_staging = site.stage(&thin, cap.clone());
    let thick_staging = site.stage(&thick, cap.clone());
    let thick_allocated = allocated(&site.image(&thick));
    assert!(thick_allocated >= 256 * MIB as u64);
    let files = write_files(&thin_staging, 1, 64);
    write_files(&thick_staging, 1, 64);
    let written = allocated(&site.image(&thin));
    remove_files(&thin_staging, &files);
    remove_files(&thick_staging, &[("data-0".into(), 0)]);

    // A turn comes every 2 s; the first sight of a volume waits for the
    // next one, so within a few seconds the freed 64 MiB is back.
    let took = allocation_falls(
        &site.image(&thin),
        written - 60 * MIB as u64,
        Duration::from_secs(15),
    );
    assert!(
        took.is_some(),
        "no periodic trim within 15 s:\n{}",
        site.node.log()
    );
    let log = site.node.log();
    assert!(log.contains(&format!("volume {thin}: trimmed")), "{log}");
    assert!(!log.contains(&format!("volume {reader}: trimmed")), "{log}");
    assert!(!log.contains(&format!("volume {thick}: trimmed")), "{log}");
    assert_eq!(
        allocated(&site.image(&thick)),
        thick_allocated,
        "the thick image lost its preallocation"
    );
    assert_eq!(allocated(&site.image(&reader)), reader_allocated);

    // On demand, the two are named with the reason.
    let answer = site.trim(&[]);
    let of = |id: &str| {
        answer
            .iter()
            .find(|t| t.volume_id == id)
            .unwrap_or_else(|| panic!("{id} not in {answer:?}"))
    };
    assert!(!of(&reader).trimmed);
    assert_eq!(of(&reader).skipped, "staged read-only");
    assert!(of(&thick).skipped.starts_with("thick"), "{:?}", of(&thick));
    assert!(of(&thin).trimmed);

    site.unstage(&thin, &thin_staging);
    site.unstage(&thick, &thick_staging);
    site.unstage(&reader, &reader_staging);
    for id in [&thin, &thick, &reader] {
        site.delete(id);
    }
}

#[test]
#[ignore = "needs root"]
fn online_discard_gives_space_back_without_a_trim() {
    // No periodic trims: only the `discard` mount option can give it back.
    let site = Site::new(2048, &["--trim-interval", "0"]);
    for fs in ["ext4", "xfs", "btrfs"] {
        let cap = req::mount_cap(RWO, fs);
        let id = site.create(
            &format!("discarding-{fs}"),
            512,
            cap.clone(),
            &[("discard", "true")],
        );
        let staging = site.stage(&id, cap.clone());
        let options = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let line = options
            .lines()
            .find(|l| l.contains(staging.to_str().unwrap()))
            .unwrap();
        assert!(
            line.contains("discard"),
            "{fs}: not mounted with discard: {line}"
        );
        let files = write_files(&staging, 1, 128);
        sync_fs(&staging);
        let written = allocated(&site.image(&id));
        remove_files(&staging, &files);
        // xfs frees an unlinked file's blocks later, in its inode
        // garbage collector, and discards them only when the log commits
        // that: by itself that is the log worker's 30 s tick, so the wait
        // syncs as an application's next fsync would.
        let took = allocation_falls_syncing(
            &site.image(&id),
            &staging,
            written - 120 * MIB as u64,
            Duration::from_secs(30),
        );
        assert!(
            took.is_some(),
            "{fs}: discard freed nothing: {} of {written}",
            allocated(&site.image(&id))
        );
        site.unstage(&id, &staging);
        site.delete(&id);
    }
    // Without the parameter, a delete frees nothing until a trim.
    let cap = req::mount_cap(RWO, "ext4");
    let id = site.create("plain", 512, cap.clone(), &[]);
    let staging = site.stage(&id, cap);
    let files = write_files(&staging, 1, 128);
    let written = allocated(&site.image(&id));
    remove_files(&staging, &files);
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        allocated(&site.image(&id)) + 64 * MIB as u64 > written,
        "freed without discard or trim"
    );
    site.unstage(&id, &staging);
    site.delete(&id);
}

/// The start of the data at or after `offset` in `path` (SEEK_DATA), or
/// the file's size where there is none.
fn next_data(path: &Path, offset: u64) -> u64 {
    let f = std::fs::File::open(path).unwrap();
    match rustix::fs::seek(&f, rustix::fs::SeekFrom::Data(offset)) {
        Ok(at) => at,
        Err(rustix::io::Errno::NXIO) => f.metadata().unwrap().len(),
        Err(e) => panic!("SEEK_DATA: {e}"),
    }
}

#[test]
#[ignore = "needs root"]
fn a_block_volume_s_discards_punch_holes_with_and_without_direct_io() {
    for direct_io in ["true", "false"] {
        let site = Site::new(1024, &["--loop-direct-io", direct_io]);
        let cap = req::block_cap(RWO);
        let id = site.create("raw", 256, cap.clone(), &[]);
        let staging = site.stage(&id, cap.clone());
        let target = target_path(&site.kubelet, "pod-raw");
        site.node
            .node()
            .node_publish_volume(&req::publish(&id, &staging, &target, cap, false))
            .expect("NodePublishVolume");
        let device = loop_of(&site.image(&id)).expect("a loop device");
        let dio = std::fs::read_to_string(format!(
            "/sys/block/{}/loop/dio",
            device.trim_start_matches("/dev/")
        ))
        .unwrap();
        assert_eq!(
            dio.trim() == "1",
            direct_io == "true",
            "direct I/O is {dio}"
        );

        // The pod writes 64 MiB, then discards 32 MiB of it from its side.
        fill(&target, 0, 64 << 20, 3);
        let written = allocated(&site.image(&id));
        assert!(written >= 64 * MIB as u64);
        let out = std::process::Command::new("blkdiscard")
            .args(["--offset", "16777216", "--length", "33554432"])
            .arg(&target)
            .output()
            .expect("run blkdiscard");
        assert!(
            out.status.success(),
            "blkdiscard: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let image = site.image(&id);
        assert_eq!(
            next_data(&image, 16 << 20),
            48 << 20,
            "the discarded range is not a hole"
        );
        assert_eq!(next_data(&image, 0), 0, "data before it stays");
        assert_eq!(allocated(&image), written - 32 * MIB as u64);

        // NodeGetVolumeStats: what the image holds is the block volume's
        // "used".
        let stats = site
            .node
            .node()
            .node_get_volume_stats(&req::volume_stats(&id, &target))
            .expect("NodeGetVolumeStats");
        let bytes = &stats.usage[0];
        assert_eq!(bytes.total, 256 * MIB);
        assert_eq!(bytes.used as u64, allocated(&image));
        assert_eq!(bytes.available, bytes.total - bytes.used);

        site.node
            .node()
            .node_unpublish_volume(&req::unpublish(&id, &target))
            .expect("NodeUnpublishVolume");
        site.unstage(&id, &staging);
        site.delete(&id);
    }
}

#[test]
#[ignore = "needs root"]
fn a_trim_racing_an_unstage_neither_fails_it_nor_leaves_a_mount() {
    let site = Arc::new(Site::new(1024, &["--trim-interval", "0"]));
    let cap = req::mount_cap(RWO, "ext4");
    let id = site.create("raced", 256, cap.clone(), &[]);
    let stop = Arc::new(AtomicBool::new(false));
    let trimmer = {
        let (site, stop) = (Arc::clone(&site), Arc::clone(&stop));
        std::thread::spawn(move || {
            let (mut trimmed, mut skipped) = (0, 0);
            while !stop.load(Ordering::Relaxed) {
                for t in site.trim(&[]) {
                    assert!(t.error.is_empty(), "a trim failed: {t:?}");
                    if t.trimmed {
                        trimmed += 1;
                    } else {
                        skipped += 1;
                    }
                }
            }
            (trimmed, skipped)
        })
    };
    for round in 0..25 {
        let staging = site.stage(&id, cap.clone());
        let files = write_files(&staging, 1, 8);
        remove_files(&staging, &files);
        std::thread::sleep(Duration::from_millis(round % 5 * 3));
        site.unstage(&id, &staging);
        assert!(
            !filevol_kit::leaks::is_mounted(&staging),
            "round {round}: left mounted"
        );
        assert_eq!(
            loop_of(&site.image(&id)),
            None,
            "round {round}: left attached"
        );
    }
    stop.store(true, Ordering::Relaxed);
    let (trimmed, skipped) = trimmer.join().expect("the trimming thread");
    assert!(
        trimmed > 0,
        "no trim ran during the race ({skipped} skipped)"
    );
    site.delete(&id);
}

/// `zeroFill`: on each pool filesystem that can preallocate (ext4, xfs,
/// btrfs: a thick volume needs it), an ext4 and an xfs volume are built
/// with no hole left in the image; the first stage formats it all the same (the record, not
/// the holes, proves it blank), the files written survive a second stage
/// (no second format), and a trim leaves the written blocks alone (thick).
#[test]
#[ignore = "needs root"]
fn a_zero_filled_volume_is_formatted_at_its_first_stage_and_kept_written() {
    for pool_fs in ["ext4", "xfs", "btrfs"] {
        let site = Site::on(pool_fs, 1024, &[]);
        for fs in ["ext4", "xfs"] {
            let cap = req::mount_cap(RWO, fs);
            let params = [("thick", "true"), ("zeroFill", "true")];
            let id = site.create(&format!("filled-{fs}"), 320, cap.clone(), &params);
            let image = site.image(&id);
            let len = std::fs::metadata(&image).unwrap().len();
            let data = |path: &Path| -> u64 {
                let f = std::fs::File::open(path).unwrap();
                filevol_core::sys::extents::DataRanges::new(&f, 0, len)
                    .map(|r| r.map(|(a, b)| b - a).unwrap())
                    .sum()
            };
            assert_eq!(
                data(&image),
                len,
                "{pool_fs}/{fs}: a hole before the first stage"
            );
            assert!(
                allocated(&image) >= len,
                "{pool_fs}/{fs}: not all allocated"
            );

            // A thin clone of it, never staged either: the zeros are its
            // source's, and its own class does not say zeroFill.
            let mut r = req::create_volume(&format!("clone-{fs}"), 320 * MIB, cap.clone());
            r.volume_content_source = Some(req::volume_source(&id)).into();
            let clone = site.create_from(&r);
            let staging = site.stage(&clone, cap.clone());
            write_files(&staging, 1, 1);
            site.unstage(&clone, &staging);
            site.delete(&clone);

            let staging = site.stage(&id, cap.clone());
            let files = write_files(&staging, 2, 8);
            site.unstage(&id, &staging);
            let staging = site.stage(&id, cap.clone());
            for (name, sum) in &files {
                assert_eq!(digest(&staging.join(name)), *sum, "{pool_fs}/{fs}: {name}");
            }
            let answer = site.trim(&[&id]);
            assert!(answer[0].skipped.starts_with("thick"), "{answer:?}");
            // mkfs zeroes what it must with FALLOC_FL_ZERO_RANGE, which
            // makes those blocks unwritten again: ext4's inode tables, and
            // xfs's log (64 MiB, a fifth of this small volume; its first
            // writes make it written again). The rest stays written.
            let written = data(&image);
            assert!(
                written >= len / 4 * 3,
                "{pool_fs}/{fs}: {written} of {len} bytes written"
            );
            site.unstage(&id, &staging);
            site.delete(&id);
        }
    }
}
