//! Node figures for the README, against the release binary over its UNIX
//! socket on a loop-mounted xfs pool (needs root), each beside the same
//! operation done directly with the syscalls (the floor):
//! - NodePublish (bind mount) and NodeUnpublish, over the socket and as the
//!   server logs it (its own duration line);
//! - NodeStage of an already formatted 1 GiB ext4 image;
//! - the first NodeStage of a new 10 GiB ext4 image (mkfs included);
//! - NodePublish with 10 and with 1,000 other mounts on the node.
//!
//! Run: `cargo bench --bench node`. `BENCH_PUBLISHES` (default 300) scales
//! the publish loops.

// Test data and measurements cast on purpose: counters truncated into
// pattern bytes, percentile indices from floats, sizes into CSI's int64.
#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss
)]

#[path = "../tests/integration/loopfs.rs"]
mod loopfs;
// Only its root check is used here.
#[allow(dead_code)]
#[path = "../tests/integration/needs.rs"]
mod needs;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use filevol::proto::csi;
use filevol::proto::csi::volume_capability::access_mode::Mode;
use filevol::proto::grpc::{ControllerClient, IdentityClient, NodeClient};
use filevol::sys::{loopdev, mount};
use grpcio::{ChannelBuilder, EnvBuilder};

struct Server {
    child: Child,
    log: PathBuf,
    controller: ControllerClient,
    node: NodeClient,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(pool: &Path, kubelet: &Path, scratch: &Path) -> Server {
    let socket = scratch.join("csi.sock");
    let log = scratch.join("filevol.log");
    let child = Command::new(env!("CARGO_BIN_EXE_filevol"))
        .args(["serve", "--node-id", "bench", "--log-level", "info"])
        .args(["--reserve", "0", "--overcommit", "100"])
        .arg("--endpoint")
        .arg(format!("unix://{}", socket.display()))
        .arg("--pool")
        .arg(pool)
        .arg("--kubelet-dir")
        .arg(kubelet)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let env = Arc::new(EnvBuilder::new().cq_count(1).build());
    let channel = ChannelBuilder::new(env).connect(&format!("unix:{}", socket.display()));
    let identity = IdentityClient::new(channel.clone());
    let deadline = Instant::now() + Duration::from_secs(30);
    while identity.probe(&csi::ProbeRequest::new()).is_err() {
        assert!(Instant::now() < deadline, "filevol did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    Server {
        child,
        log,
        controller: ControllerClient::new(channel.clone()),
        node: NodeClient::new(channel),
    }
}

fn cap() -> csi::VolumeCapability {
    let mut c = csi::VolumeCapability::new();
    let mut am = csi::volume_capability::AccessMode::new();
    am.mode = Mode::SINGLE_NODE_WRITER.into();
    c.access_mode = Some(am).into();
    let mut m = csi::volume_capability::MountVolume::new();
    m.fs_type = "ext4".into();
    c.set_mount(m);
    c
}

fn create(s: &Server, name: &str, bytes: i64) -> String {
    let mut r = csi::CreateVolumeRequest::new();
    r.name = name.into();
    let mut cr = csi::CapacityRange::new();
    cr.required_bytes = bytes;
    r.capacity_range = Some(cr).into();
    r.volume_capabilities.push(cap());
    s.controller
        .create_volume(&r)
        .unwrap()
        .volume
        .unwrap()
        .volume_id
}

fn stage(s: &Server, id: &str, staging: &Path) {
    let mut r = csi::NodeStageVolumeRequest::new();
    r.volume_id = id.into();
    r.staging_target_path = staging.to_str().unwrap().into();
    r.volume_capability = Some(cap()).into();
    s.node.node_stage_volume(&r).unwrap();
}

fn unstage(s: &Server, id: &str, staging: &Path) {
    let mut r = csi::NodeUnstageVolumeRequest::new();
    r.volume_id = id.into();
    r.staging_target_path = staging.to_str().unwrap().into();
    s.node.node_unstage_volume(&r).unwrap();
}

fn publish(s: &Server, id: &str, staging: &Path, target: &Path) {
    let mut r = csi::NodePublishVolumeRequest::new();
    r.volume_id = id.into();
    r.staging_target_path = staging.to_str().unwrap().into();
    r.target_path = target.to_str().unwrap().into();
    r.volume_capability = Some(cap()).into();
    s.node.node_publish_volume(&r).unwrap();
}

fn unpublish(s: &Server, id: &str, target: &Path) {
    let mut r = csi::NodeUnpublishVolumeRequest::new();
    r.volume_id = id.into();
    r.target_path = target.to_str().unwrap().into();
    s.node.node_unpublish_volume(&r).unwrap();
}

/// Server-side durations of `rpc` from the driver's info log lines.
fn logged_ms(log: &Path, rpc: &str) -> Vec<f64> {
    let text = std::fs::read_to_string(log).unwrap();
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

fn p50(v: &mut [Duration]) -> f64 {
    v.sort();
    v[v.len() / 2].as_secs_f64() * 1000.0
}

fn p50f(v: &[f64]) -> f64 {
    v[v.len() / 2]
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
    let fs = loopfs::LoopFs::new("xfs", 16384);
    let pool = fs.path().join("pool");
    std::fs::create_dir(&pool).unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let kubelet = scratch.path().join("kubelet");
    std::fs::create_dir(&kubelet).unwrap();
    let s = start(&pool, &kubelet, scratch.path());

    // Publish with 10 mounts on the node.
    let id = create(&s, "bench-pub", 1 << 30);
    let staging = kubelet.join("staging/pub");
    std::fs::create_dir_all(&staging).unwrap();
    let target = kubelet.join("pods/p/volumes/mount");
    std::fs::create_dir_all(target.parent().unwrap()).unwrap();
    stage(&s, &id, &staging);
    let (mut pub10, mut unpub10) = publish_loop(&s, &id, &staging, &target, n);
    let server_pub10 = logged_ms(&s.log, "NodePublishVolume");

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
        let dev = loopdev::attach(&image, false, true).unwrap().device;
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
        let dev = loopdev::attach(&img, false, true).unwrap().device;
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
