//! A pod that fills a directory volume cannot turn `/metrics` against the
//! node plugin: the tree is measured in the background, in bounded memory,
//! and scrapes only read the figure. The layout is the one deploy/ ships: a
//! node plugin (`--mode node`, its own process) and a controller
//! (`--mode controller`) on one xfs pool.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use filevol::ops::requests as req;
use filevol::ops::stats::memory_kib;
use filevol::proto::csi::volume_capability::access_mode::Mode;
use filevol_kit::driver::{scrape, Driver, Opts};
use filevol_kit::leaks::LeakGuard;
use filevol_kit::node_env::staging_path;
use filevol_kit::scratch::{pool_on, LoopFs};
use rustix::fs::{Mode as FileMode, OFlags};

use crate::BIN;

/// Files the pod makes: what once took a node plugin from 20 to 95 MiB
/// with four scrapes.
const FILES: usize = 400_000;

/// The node plugin's peak resident set must stay under this.
const PEAK_KIB: u64 = 32 * 1024;

/// A node plugin and a controller on one xfs pool. Fields drop in order:
/// the processes stop, then the guard unmounts and detaches whatever a
/// failing test left, then the pool's filesystem goes.
struct Site {
    node: Driver,
    controller: Driver,
    kubelet: PathBuf,
    _guard: LeakGuard,
    _kubelet_dir: tempfile::TempDir,
    _fs: LoopFs,
}

impl Site {
    fn new() -> Site {
        let (fs, pool) = pool_on("xfs", 1024);
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
            ])
        };
        // Figures refreshed every 2 s, so the one taken after the fill
        // comes soon; the bounds on memory do not depend on it.
        let node = Driver::start_on(
            BIN,
            &pool,
            common("node").args(&[
                "--metrics-address",
                "127.0.0.1:0",
                "--dir-usage-interval",
                "2",
            ]),
        );
        let controller = Driver::start_on(BIN, &pool, common("controller"));
        Site {
            node,
            controller,
            _guard: LeakGuard {
                kubelet: kubelet.clone(),
                pool,
            },
            kubelet,
            _kubelet_dir: kubelet_dir,
            _fs: fs,
        }
    }
}

/// The value of the series `name` (with its labels, if any) in a scrape.
fn series(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// Makes `n` empty files in the directory at `dir`, one `openat` each, as
/// fast as a pod could.
fn fill_with_empty_files(dir: &std::path::Path, n: usize) {
    let dir = rustix::fs::open(
        dir,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        FileMode::empty(),
    )
    .unwrap();
    for i in 0..n {
        rustix::fs::openat(
            dir.as_fd(),
            format!("f{i:07}"),
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::CLOEXEC,
            FileMode::from_raw_mode(0o644),
        )
        .unwrap();
    }
}

/// A scrape, and how long it took to be answered in full.
fn timed_scrape(address: &str) -> (String, Duration) {
    let started = Instant::now();
    let mut s = TcpStream::connect(address).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    (out, started.elapsed())
}

#[test]
#[ignore = "needs root"]
fn a_node_plugin_reports_a_400000_file_directory_volume_in_bounded_memory() {
    let site = Site::new();
    let address = site.node.metrics_address();
    let cap = req::mount_cap(Mode::MULTI_NODE_MULTI_WRITER, "");
    let mut r = req::create_with("crowded", 256 << 20, &[("layout", "dir")]);
    r.volume_capabilities[0] = cap.clone();
    let id = site
        .controller
        .controller()
        .create_volume(&r)
        .unwrap()
        .volume
        .unwrap()
        .volume_id;
    let staging = staging_path(&site.kubelet, &id);
    let node = site.node.node();
    node.node_stage_volume(&req::stage(&id, &staging, cap))
        .unwrap();

    fill_with_empty_files(&staging, FILES);
    // What a full walk of the filled tree finds (the same walk the node
    // plugin makes, run here to the end).
    let tree =
        filevol_core::pool::capacity::allocated(&site.node.pool.join("volumes").join(&id)).unwrap();
    assert!(tree > 1 << 20, "a directory of {FILES} names: {tree} bytes");
    // Wait for the node plugin to report it: a walk begun after the fill.
    let filled = Instant::now();
    loop {
        let text = scrape(&address);
        let measured = series(&text, "filevol_dir_usage_volumes{state=\"measured\"}");
        let figure = series(&text, "filevol_pool_allocated_bytes{kind=\"volume\"}");
        if measured == Some(1.0) && figure == Some(tree as f64) {
            assert!(series(&text, "filevol_dir_usage_age_seconds").is_some());
            break;
        }
        assert!(
            filled.elapsed() < Duration::from_secs(180),
            "the filled volume's {tree} bytes never reported:\n{text}\n{}",
            site.node.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // Four scrapes at once, the resident set sampled meanwhile.
    let pid = site.node.pid();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let done = std::sync::Arc::clone(&done);
        std::thread::spawn(move || {
            let mut most = 0;
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                most = most.max(memory_kib(pid, "VmRSS").unwrap_or(0));
                std::thread::sleep(Duration::from_millis(2));
            }
            most
        })
    };
    let scrapes: Vec<_> = (0..4)
        .map(|_| {
            let address = address.clone();
            std::thread::spawn(move || timed_scrape(&address))
        })
        .collect();
    for s in scrapes {
        let (out, took) = s.join().unwrap();
        assert!(out.starts_with("HTTP/1.1 200 OK"), "{out}");
        assert!(took < Duration::from_secs(1), "a scrape took {took:?}");
    }
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let sampled = sampler.join().unwrap();
    let peak = memory_kib(pid, "VmHWM").unwrap();
    eprintln!(
        "node plugin: VmHWM {peak} KiB, VmRSS sampled during the scrapes at most {sampled} KiB"
    );
    assert!(
        peak < PEAK_KIB,
        "the node plugin's peak resident set is {peak} KiB"
    );

    // A hundred connections that say nothing do not hold up a scrape.
    let idle: Vec<_> = (0..100)
        .map(|_| TcpStream::connect(&address).unwrap())
        .collect();
    let (out, took) = timed_scrape(&address);
    assert!(out.starts_with("HTTP/1.1 200 OK"), "{out}");
    assert!(
        took < Duration::from_secs(1),
        "answered after {took:?} beside 100 idle connections"
    );
    drop(idle);

    node.node_unstage_volume(&req::unstage(&id, &staging))
        .unwrap();
    site.controller
        .controller()
        .delete_volume(&req::delete(&id))
        .unwrap();
}
