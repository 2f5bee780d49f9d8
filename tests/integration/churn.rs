//! Crash loop: a churn workload (create, stage, publish, write checksummed
//! data, snapshot, unpublish, unstage, delete) while the driver is SIGKILLed
//! at random moments and restarted. Every call is retried until it
//! succeeds. Afterwards every volume the workload was told exists is there
//! with its data, the pool holds nothing half-made, and once everything is
//! cleaned up no mount and no loop device is left.
//!
//! CI runs a reduced form (FILEVOL_CHURN_KILLS, default 20 kills); the full
//! form is `FILEVOL_CHURN_KILLS=200 cargo test --test integration churn`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use filevol::proto::csi;
use filevol::proto::csi::volume_capability::access_mode::Mode;
use filevol::proto::grpc::{ControllerClient, NodeClient};
use grpcio::{CallOption, ChannelBuilder, EnvBuilder, RpcStatusCode};
use parking_lot::Mutex;

use crate::controller::{digest, pool_on};
use crate::node::{publish_req, stage_req, unpublish_req, unstage_req};
use crate::req::{self, MIB};
use crate::util::{Driver, Opts};

const WORKERS: usize = 3;

/// Retries `call` until it succeeds; any answer other than "the driver is
/// down" (UNAVAILABLE, a dropped or cancelled call, a deadline) or ABORTED
/// is a bug and fails the test.
fn retry<T>(what: &str, mut call: impl FnMut() -> grpcio::Result<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        match call() {
            Ok(v) => return v,
            Err(grpcio::Error::RpcFailure(s))
                if matches!(
                    s.code(),
                    RpcStatusCode::UNAVAILABLE
                        | RpcStatusCode::CANCELLED
                        | RpcStatusCode::DEADLINE_EXCEEDED
                        | RpcStatusCode::ABORTED
                        | RpcStatusCode::UNKNOWN
                ) => {}
            Err(grpcio::Error::RpcFinished(_)) => {}
            Err(e) => panic!("{what}: a retried call failed for real: {e:?}"),
        }
        assert!(Instant::now() < deadline, "{what}: no success within 120 s");
        std::thread::sleep(Duration::from_millis(50));
    }
}

struct Clients {
    controller: ControllerClient,
    node: NodeClient,
}

fn clients(socket: &Path) -> Clients {
    let env = Arc::new(EnvBuilder::new().cq_count(1).build());
    let ch = ChannelBuilder::new(env)
        .initial_reconnect_backoff(Duration::from_millis(20))
        .max_reconnect_backoff(Duration::from_millis(200))
        .connect(&format!("unix:{}", socket.display()));
    Clients {
        controller: ControllerClient::new(ch.clone()),
        node: NodeClient::new(ch),
    }
}

fn opt() -> CallOption {
    CallOption::default()
        .timeout(Duration::from_secs(30))
        .wait_for_ready(true)
}

/// What the workload was told: live volumes and the digest of their data.
type Ledger = Arc<Mutex<BTreeMap<String, Option<u64>>>>;

fn workload(
    w: usize,
    socket: PathBuf,
    kubelet: PathBuf,
    stop: Arc<AtomicBool>,
    ledger: Ledger,
    rounds: Arc<AtomicUsize>,
) {
    let c = clients(&socket);
    let cap = req::mount_cap(Mode::SINGLE_NODE_WRITER, "ext4");
    let mut i = 0;
    while !stop.load(Ordering::SeqCst) {
        i += 1;
        let name = format!("churn-{w}-{i}");
        let id = retry("CreateVolume", || {
            c.controller
                .create_volume_opt(&req::create(&name, 64 * MIB), opt())
        })
        .volume
        .unwrap()
        .volume_id;
        ledger.lock().insert(id.clone(), None);
        let staging = kubelet.join("staging").join(&id);
        let target = kubelet.join("pods").join(&id).join("mount");
        std::fs::create_dir_all(&staging).unwrap();
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        retry("NodeStageVolume", || {
            c.node
                .node_stage_volume_opt(&stage_req(&id, &staging, cap.clone()), opt())
        });
        retry("NodePublishVolume", || {
            c.node.node_publish_volume_opt(
                &publish_req(&id, &staging, &target, cap.clone(), false),
                opt(),
            )
        });
        // The data goes through the kernel's mount, which a driver crash
        // does not touch.
        let file = target.join("data");
        let bytes: Vec<u8> = (0..(256 << 10))
            .map(|k| (k as u8) ^ (i as u8) ^ (w as u8))
            .collect();
        std::fs::write(&file, &bytes).unwrap();
        std::fs::File::open(&file).unwrap().sync_all().unwrap();
        ledger.lock().insert(id.clone(), Some(digest(&file)));
        if i % 3 == 0 {
            retry("CreateSnapshot", || {
                c.controller
                    .create_snapshot_opt(&req::snapshot(&format!("snap-{name}"), &id), opt())
            });
        }
        retry("NodeUnpublishVolume", || {
            c.node
                .node_unpublish_volume_opt(&unpublish_req(&id, &target), opt())
        });
        retry("NodeUnstageVolume", || {
            c.node
                .node_unstage_volume_opt(&unstage_req(&id, &staging), opt())
        });
        if i % 2 == 0 {
            retry("DeleteVolume", || {
                c.controller.delete_volume_opt(&req::delete(&id), opt())
            });
            ledger.lock().remove(&id);
        }
        rounds.fetch_add(1, Ordering::SeqCst);
    }
}

fn start(pool: &Path, kubelet: &Path, socket: &Path) -> Driver {
    let dir = tempfile::tempdir().unwrap();
    let mut d = Driver::spawn_at(
        dir,
        socket.to_owned(),
        pool.to_owned(),
        Opts::default().args(&[
            "--reserve",
            "0",
            "--overcommit",
            "100",
            "--kubelet-dir",
            kubelet.to_str().unwrap(),
            "--log-level",
            "debug",
        ]),
    );
    d.wait_ready();
    d
}

/// Keeps every driver's log for the post-mortem.
fn keep_log(d: &Driver, all: &Mutex<String>) {
    all.lock().push_str(&d.log());
}

#[test]
fn sigkill_loop_under_churn_loses_nothing() {
    let kills: usize = std::env::var("FILEVOL_CHURN_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let Some((_fs, pool)) = pool_on("xfs", 8192) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let kubelet = dir.path().canonicalize().unwrap().join("kubelet");
    std::fs::create_dir_all(&kubelet).unwrap();
    let socket = dir.path().join("csi.sock");
    let _guard = crate::node::LeakGuard {
        kubelet: kubelet.clone(),
        pool: pool.clone(),
    };
    let mut driver = start(&pool, &kubelet, &socket);
    let logs = Mutex::new(String::new());

    let stop = Arc::new(AtomicBool::new(false));
    let ledger: Ledger = Arc::default();
    let rounds = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..WORKERS)
        .map(|w| {
            let (socket, kubelet) = (socket.clone(), kubelet.clone());
            let (stop, ledger, rounds) =
                (Arc::clone(&stop), Arc::clone(&ledger), Arc::clone(&rounds));
            std::thread::spawn(move || workload(w, socket, kubelet, stop, ledger, rounds))
        })
        .collect();

    // Kill at pseudo-random moments (a fixed-seed LCG: the run repeats).
    let mut seed: u64 = 0x5eed_f11e;
    for _ in 0..kills {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        std::thread::sleep(Duration::from_millis(50 + (seed >> 33) % 400));
        driver.signal(rustix::process::Signal::KILL);
        driver.wait_exit(Duration::from_secs(10));
        keep_log(&driver, &logs);
        driver = start(&pool, &kubelet, &socket);
    }
    stop.store(true, Ordering::SeqCst);
    let mut failed = false;
    for w in workers {
        failed |= w.join().is_err();
    }
    if failed {
        keep_log(&driver, &logs);
        std::fs::write("/tmp/churn-failure.log", &*logs.lock()).unwrap();
        panic!("a workload thread failed; driver logs in /tmp/churn-failure.log");
    }
    assert!(
        rounds.load(Ordering::SeqCst) > 0,
        "the workload made no progress"
    );

    // Every volume the workload was told exists is there, with its data.
    let c = clients(&socket);
    let listed: Vec<String> = retry("ListVolumes", || {
        c.controller.list_volumes_opt(&req::list(0, ""), opt())
    })
    .entries
    .iter()
    .map(|e| e.volume.volume_id.clone())
    .collect();
    let ledger = ledger.lock().clone();
    let cap = req::mount_cap(Mode::SINGLE_NODE_WRITER, "ext4");
    for (id, sum) in &ledger {
        assert!(listed.contains(id), "volume {id} was created but is gone");
        let staging = kubelet.join("verify").join(id);
        let target = kubelet.join("pods").join(format!("verify-{id}"));
        std::fs::create_dir_all(&staging).unwrap();
        retry("NodeStageVolume", || {
            c.node
                .node_stage_volume_opt(&stage_req(id, &staging, cap.clone()), opt())
        });
        retry("NodePublishVolume", || {
            c.node.node_publish_volume_opt(
                &publish_req(id, &staging, &target, cap.clone(), false),
                opt(),
            )
        });
        if let Some(sum) = sum {
            assert_eq!(
                digest(&target.join("data")),
                *sum,
                "volume {id} lost its data"
            );
        }
        retry("NodeUnpublishVolume", || {
            c.node
                .node_unpublish_volume_opt(&unpublish_req(id, &target), opt())
        });
        retry("NodeUnstageVolume", || {
            c.node
                .node_unstage_volume_opt(&unstage_req(id, &staging), opt())
        });
    }
    // No half-made volume or snapshot: everything listed was recorded or is
    // a volume whose delete the workload was still retrying.
    crate::crash::assert_consistent(&pool);

    // Clean up everything; nothing may remain mounted or attached.
    for s in retry("ListSnapshots", || {
        c.controller
            .list_snapshots_opt(&csi::ListSnapshotsRequest::new(), opt())
    })
    .entries
    {
        retry("DeleteSnapshot", || {
            c.controller
                .delete_snapshot_opt(&req::delete_snapshot(&s.snapshot.snapshot_id), opt())
        });
    }
    for id in &listed {
        retry("DeleteVolume", || {
            c.controller.delete_volume_opt(&req::delete(id), opt())
        });
    }
    drop(driver);
    eprintln!(
        "churn: {kills} kills, {} rounds, {} volumes verified",
        rounds.load(Ordering::SeqCst),
        ledger.len()
    );
}
