//! Node figures for the book (docs/src/performance.md), against the
//! release binary over its UNIX socket on a loop-mounted xfs pool (needs root), each beside the same
//! operation done directly with the syscalls (the floor):
//! - NodePublish (bind mount) and NodeUnpublish, over the socket and as the
//!   server logs it (its own duration line);
//! - NodeStage of an already formatted 1 GiB ext4 image;
//! - the first NodeStage of a new 10 GiB ext4 image (mkfs included);
//! - NodePublish with 10 and with 1,000 other mounts on the node.
//!
//! Run: `cargo bench --bench node`. `BENCH_PUBLISHES` (default 300) scales
//! the publish loops.

// A benchmark's report is its output: a table on stdout, progress on
// stderr.
#![allow(clippy::print_stdout, clippy::print_stderr)]
// Test data and measurements cast on purpose: counters truncated into
// pattern bytes, percentile indices from floats, sizes into CSI's int64.
#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss
)]

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use filevol::ops::requests as req;
use filevol::ops::stats::percentile;
use filevol::proto::csi;
use filevol::proto::csi::volume_capability::access_mode::Mode;
use filevol::proto::grpc::{ControllerClient, NodeClient};
use filevol_core::sys::{loopdev, mount};
use filevol_kit::driver::{Driver, Opts};
use filevol_kit::scratch::pool_on;
use filevol_kit::tempdir::TempDir;

/// The driver and its clients.
struct Server {
    driver: Driver,
    controller: ControllerClient,
    node: NodeClient,
}

fn start(pool: &Path, kubelet: &Path) -> Server {
    let driver = Driver::start_on(
        env!("CARGO_BIN_EXE_filevol"),
        pool,
        Opts::default()
            .args(&["--node-id", "bench", "--log-level", "info"])
            .args(&["--reserve", "0", "--overcommit", "100"])
            .args(&["--kubelet-dir", kubelet.to_str().unwrap()]),
    );
    Server {
        controller: driver.controller(),
        node: driver.node(),
        driver,
    }
}

fn cap() -> csi::VolumeCapability {
    req::mount_cap(Mode::SINGLE_NODE_WRITER, "ext4")
}

fn create(s: &Server, name: &str, bytes: i64) -> String {
    s.controller
        .create_volume(&req::create(name, bytes))
        .unwrap()
        .volume
        .unwrap()
        .volume_id
}

fn stage(s: &Server, id: &str, staging: &Path) {
    s.node
        .node_stage_volume(&req::stage(id, staging, cap()))
        .unwrap();
}

fn unstage(s: &Server, id: &str, staging: &Path) {
    s.node
        .node_unstage_volume(&req::unstage(id, staging))
        .unwrap();
}

fn publish(s: &Server, id: &str, staging: &Path, target: &Path) {
    s.node
        .node_publish_volume(&req::publish(id, staging, target, cap(), false))
        .unwrap();
}

fn unpublish(s: &Server, id: &str, target: &Path) {
    s.node
        .node_unpublish_volume(&req::unpublish(id, target))
        .unwrap();
}

/// Server-side durations of `rpc` from the driver's info log lines.
fn logged_ms(s: &Server, rpc: &str) -> Vec<f64> {
    let text = s.driver.log();
    let mut out: Vec<f64> = text
        .lines()
        .filter(|l| l.contains(&format!("] {rpc} ")) && l.contains("outcome=OK"))
        .filter_map(|l| l.split("duration=").nth(1))
        .filter_map(|d| d.split("ms").next())
        .filter_map(|d| d.parse().ok())
        .collect();
    out.sort_by(f64::total_cmp);
    out
}

/// The median of `v` in milliseconds.
fn p50(v: &mut [Duration]) -> f64 {
    v.sort();
    percentile(v, 0.5).expect("samples").as_secs_f64() * 1000.0
}

/// The median of sorted `v`.
fn p50f(v: &[f64]) -> f64 {
    percentile(v, 0.5).expect("samples")
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Publishes and unpublishes `n` times; returns the client-side durations.
fn publish_loop(
    s: &Server,
    id: &str,
    staging: &Path,
    target: &Path,
    n: usize,
) -> (Vec<Duration>, Vec<Duration>) {
    let (mut p, mut u) = (Vec::new(), Vec::new());
    for _ in 0..n {
        let t = Instant::now();
        publish(s, id, staging, target);
        p.push(t.elapsed());
        let t = Instant::now();
        unpublish(s, id, target);
        u.push(t.elapsed());
    }
    (p, u)
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipped: the node benchmark needs root for loop devices and mounts");
        return;
    }
    let n = env_usize("BENCH_PUBLISHES", 300);
    let (fs, pool) = pool_on("xfs", 16384);
    let scratch = TempDir::new().unwrap();
    let kubelet = scratch.path().join("kubelet");
    std::fs::create_dir(&kubelet).unwrap();
    let s = start(&pool, &kubelet);

    // Publish with 10 mounts on the node.
    let id = create(&s, "bench-pub", 1 << 30);
    let staging = kubelet.join("staging/pub");
    std::fs::create_dir_all(&staging).unwrap();
    let target = kubelet.join("pods/p/volumes/mount");
    std::fs::create_dir_all(target.parent().unwrap()).unwrap();
    stage(&s, &id, &staging);
    let (mut pub10, mut unpub10) = publish_loop(&s, &id, &staging, &target, n);
    let server_pub10 = logged_ms(&s, "NodePublishVolume");

    // The floor: the same bind mount and unmount done directly.
    let direct_target = kubelet.join("pods/p/volumes/direct");
    std::fs::create_dir_all(&direct_target).unwrap();
    let mut direct = Vec::new();
    for _ in 0..n {
        let t = Instant::now();
        mount::bind(&staging, &direct_target).unwrap();
        direct.push(t.elapsed());
        mount::unmount(&direct_target).unwrap();
    }

    // Publish with 1,000 other mounts on the node.
    let crowd = kubelet.join("crowd");
    let mut crowd_points = Vec::new();
    for i in 0..1000 {
        let p = crowd.join(i.to_string());
        std::fs::create_dir_all(&p).unwrap();
        mount::bind(&staging, &p).unwrap();
        crowd_points.push(p);
    }
    let (mut pub1000, _) = publish_loop(&s, &id, &staging, &target, n);
    for p in &crowd_points {
        mount::unmount(p).unwrap();
    }
    unstage(&s, &id, &staging);

    // NodeStage of a formatted 1 GiB image (formatted by the first stage).
    stage(&s, &id, &staging);
    unstage(&s, &id, &staging);
    let mut stages = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        stage(&s, &id, &staging);
        stages.push(t.elapsed());
        unstage(&s, &id, &staging);
    }
    // The floor: attach + mount done directly.
    let image = pool.join("volumes").join(&id).join("image");
    let mut direct_stages = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        let dev = loopdev::attach(&image, false, true, "bench")
            .unwrap()
            .expect("not fenced")
            .device;
        mount::mount_fs(
            &dev.path(),
            &staging,
            "ext4",
            rustix::mount::MountFlags::empty(),
            "",
        )
        .unwrap();
        direct_stages.push(t.elapsed());
        mount::unmount(&staging).unwrap();
        dev.detach().unwrap();
    }

    // First NodeStage of new 10 GiB ext4 images: mkfs included.
    let mut firsts = Vec::new();
    for i in 0..5 {
        let vid = create(&s, &format!("bench-new-{i}"), 10 << 30);
        let st = kubelet.join(format!("staging/new-{i}"));
        std::fs::create_dir_all(&st).unwrap();
        let t = Instant::now();
        stage(&s, &vid, &st);
        firsts.push(t.elapsed());
        unstage(&s, &vid, &st);
    }
    let mut mkfs_direct = Vec::new();
    for i in 0..5 {
        let img = scratch.path().join(format!("direct-{i}.img"));
        let img = fs.path().join(img.file_name().unwrap());
        std::fs::File::create(&img)
            .unwrap()
            .set_len(10 << 30)
            .unwrap();
        let dev = loopdev::attach(&img, false, true, "bench")
            .unwrap()
            .expect("not fenced")
            .device;
        let t = Instant::now();
        assert!(Command::new("mkfs.ext4")
            .args(["-F", "-q"])
            .arg(dev.path())
            .status()
            .unwrap()
            .success());
        mount::mount_fs(
            &dev.path(),
            &staging,
            "ext4",
            rustix::mount::MountFlags::empty(),
            "",
        )
        .unwrap();
        mkfs_direct.push(t.elapsed());
        mount::unmount(&staging).unwrap();
        dev.detach().unwrap();
        std::fs::remove_file(&img).unwrap();
    }
    drop(s);

    println!("| measure | filevol | direct syscalls |");
    println!("|---|---|---|");
    println!(
        "| NodePublish (bind mount), p50 over the socket / server-side | {:.3} ms / {:.3} ms | {:.3} ms |",
        p50(&mut pub10),
        p50f(&server_pub10),
        p50(&mut direct)
    );
    println!(
        "| NodeUnpublish, p50 over the socket | {:.3} ms | |",
        p50(&mut unpub10)
    );
    println!(
        "| NodePublish p50 with 10 / 1,000 other mounts on the node | {:.3} ms / {:.3} ms | |",
        p50(&mut pub10.clone()),
        p50(&mut pub1000)
    );
    println!(
        "| NodeStage of a formatted 1 GiB ext4 image, p50 (attach + probe + mount) | {:.1} ms | {:.1} ms (attach + mount) |",
        p50(&mut stages),
        p50(&mut direct_stages)
    );
    println!(
        "| first NodeStage of a new 10 GiB ext4 image, p50 (mkfs included) | {:.0} ms | {:.0} ms (mkfs.ext4 + mount) |",
        p50(&mut firsts),
        p50(&mut mkfs_direct)
    );
}
