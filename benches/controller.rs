//! Controller figures for the book (docs/src/performance.md), measured over the UNIX socket against
//! the release binary on loop-mounted pools (needs root):
//! - CreateVolume of a sparse 10 GiB image (then DeleteVolume), p50/p99;
//! - CreateSnapshot of a 1 GiB image holding 512 MiB of data, reflink
//!   (xfs pool) against sparse copy (ext4 pool);
//! - ListVolumes over 10,000 volumes, every page.
//!
//! Run: `cargo bench --bench controller`. `BENCH_CREATES` (default 300) and
//! `BENCH_LIST_VOLUMES` (default 10000) scale it down.

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
use std::sync::Arc;
use std::time::{Duration, Instant};

use filevol::ops::requests as req;
use filevol::ops::stats::percentile;
use filevol::proto::csi::volume_capability::access_mode::Mode;
use filevol::proto::grpc::ControllerClient;
use filevol_kit::driver::{Driver, Opts};
use filevol_kit::scratch::pool_on;
use grpcio::{ChannelBuilder, EnvBuilder};

/// A driver on `pool`, and a controller client that takes the answer of a
/// ListVolumes of every volume in one page.
struct Server {
    _driver: Driver,
    controller: ControllerClient,
}

fn start(pool: &Path) -> Server {
    let driver = Driver::start_on(
        env!("CARGO_BIN_EXE_filevol"),
        pool,
        Opts::default()
            .args(&["--node-id", "bench", "--log-level", "warn"])
            .args(&["--reserve", "0", "--overcommit", "100000"]),
    );
    let env = Arc::new(EnvBuilder::new().cq_count(1).build());
    let channel = ChannelBuilder::new(env)
        .max_receive_message_len(64 << 20)
        .connect(&driver.address());
    Server {
        _driver: driver,
        controller: ControllerClient::new(channel),
    }
}

/// CreateVolume of a mount volume, the driver's default filesystem.
fn create_req(name: &str, bytes: i64) -> filevol::proto::csi::CreateVolumeRequest {
    req::create_volume(name, bytes, req::mount_cap(Mode::SINGLE_NODE_WRITER, ""))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn pct(sorted: &[Duration], q: f64) -> Duration {
    percentile(sorted, q).expect("samples")
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Writes 512 MiB of data into the first half of a 1 GiB image.
fn fill_half(image: &Path) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().write(true).open(image).unwrap();
    let chunk: Vec<u8> = (0..(4 << 20)).map(|i| (i % 251) as u8).collect();
    for _ in 0..128 {
        f.write_all(&chunk).unwrap();
    }
    f.sync_all().unwrap();
}

fn snapshot_time(fs_type: &str) -> (Duration, String) {
    let (_fs, pool) = pool_on(fs_type, 3072);
    let server = start(&pool);
    let v = server
        .controller
        .create_volume(&create_req("snap-source", 1 << 30))
        .unwrap()
        .volume
        .unwrap();
    fill_half(&pool.join("volumes").join(&v.volume_id).join("image"));
    let mut times = Vec::new();
    for i in 0..3 {
        let r = req::snapshot(&format!("snap-{i}"), &v.volume_id);
        let t = Instant::now();
        let s = server
            .controller
            .create_snapshot(&r)
            .unwrap()
            .snapshot
            .unwrap();
        times.push(t.elapsed());
        server
            .controller
            .delete_snapshot(&req::delete_snapshot(&s.snapshot_id))
            .unwrap();
    }
    times.sort();
    let meta = std::fs::read_dir(pool.join("volumes")).unwrap().count();
    (times[1], format!("{meta} volume, median of 3"))
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipped: the controller benchmark needs root for loop-mounted pools");
        return;
    }
    let creates = env_usize("BENCH_CREATES", 300);
    let list_n = env_usize("BENCH_LIST_VOLUMES", 10_000);

    // CreateVolume, sparse 10 GiB.
    let (fs, pool) = pool_on("xfs", 2048);
    let server = start(&pool);
    let mut create = Vec::with_capacity(creates);
    let mut delete = Vec::with_capacity(creates);
    for i in 0..creates {
        let t = Instant::now();
        let v = server
            .controller
            .create_volume(&create_req(&format!("pvc-bench-{i}"), 10 << 30))
            .unwrap()
            .volume
            .unwrap();
        create.push(t.elapsed());
        let d = req::delete(&v.volume_id);
        let t = Instant::now();
        server.controller.delete_volume(&d).unwrap();
        delete.push(t.elapsed());
    }
    create.sort();
    delete.sort();
    drop(server);
    drop(fs);

    let (reflink, _) = snapshot_time("xfs");
    let (sparse, _) = snapshot_time("ext4");

    // ListVolumes over many volumes.
    let (fs, pool) = pool_on("xfs", 2048);
    let server = start(&pool);
    let fill_started = Instant::now();
    let mut late_creates = Vec::new();
    for i in 0..list_n {
        let t = Instant::now();
        server
            .controller
            .create_volume(&create_req(&format!("pvc-list-{i:05}"), 1 << 20))
            .unwrap();
        // The last tenth: CreateVolume into a pool that is nearly full.
        if i >= list_n - list_n / 10 {
            late_creates.push(t.elapsed());
        }
    }
    let fill_time = fill_started.elapsed();
    late_creates.sort();
    let mut page_times = Vec::new();
    for page_size in [0, 1000] {
        let started = Instant::now();
        let mut token = String::new();
        let mut seen = 0;
        loop {
            let resp = server
                .controller
                .list_volumes(&req::list(page_size, &token))
                .unwrap();
            seen += resp.entries.len();
            if resp.next_token.is_empty() {
                break;
            }
            token = resp.next_token;
        }
        assert_eq!(seen, list_n);
        page_times.push((page_size, started.elapsed()));
    }
    drop(server);
    drop(fs);

    println!("| measure | value |");
    println!("|---|---|");
    println!(
        "| CreateVolume, sparse 10 GiB image on xfs, p50 / p99 ({creates} calls) | {:.2} ms / {:.2} ms |",
        ms(pct(&create, 0.5)),
        ms(pct(&create, 0.99))
    );
    println!(
        "| DeleteVolume of it, p50 / p99 | {:.2} ms / {:.2} ms |",
        ms(pct(&delete, 0.5)),
        ms(pct(&delete, 0.99))
    );
    println!(
        "| CreateSnapshot, 1 GiB image with 512 MiB of data: reflink (xfs) | {:.2} ms |",
        ms(reflink)
    );
    println!(
        "| CreateSnapshot, same image: sparse copy (ext4, no reflink) | {:.1} ms |",
        ms(sparse)
    );
    for (page_size, t) in page_times {
        let pages = if page_size == 0 {
            "one page".to_owned()
        } else {
            format!("pages of {page_size}")
        };
        println!(
            "| ListVolumes over {list_n} volumes, all entries, {pages} | {:.1} ms |",
            ms(t)
        );
    }
    println!(
        "| (creating those {list_n} volumes took {:.1} s) | |",
        fill_time.as_secs_f64()
    );
    if !late_creates.is_empty() {
        println!(
            "| CreateVolume into a pool of {} to {list_n} volumes, p50 / p99 | {:.2} ms / {:.2} ms |",
            list_n - list_n / 10,
            ms(pct(&late_creates, 0.5)),
            ms(pct(&late_creates, 0.99))
        );
    }
}
