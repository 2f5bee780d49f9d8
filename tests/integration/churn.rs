//! Crash loop: a churn workload (create, stage, publish, write checksummed
//! data, snapshot, unpublish, unstage, delete) while the driver is SIGKILLed
//! at random moments and restarted. Every call is retried until it
//! succeeds. Afterwards every volume the workload was told exists is there
//! with its data, the pool holds nothing half-made, and once everything is
//! cleaned up no mount and no loop device is left.
//!
//! Two layouts: `--mode all` (one process), and the shipped one, a node
//! plugin and a controller as separate processes on one pool (node started
//! first, ControllerPublish in the flow), each killed on its own.
//!
//! Beside the churn, a writer inside one long-lived volume keeps writing
//! checksummed blocks (each fsynced before it counts) through every kill:
//! at the end every acknowledged block reads back and fsck finds its ext4
//! clean. The writer never stops for a kill: its mount and loop device are
//! the kernel's, and its fence is the device's.
//!
//! CI runs a reduced form (FILEVOL_CHURN_KILLS, default 20 kills for the
//! single process and 50 for the separate ones); the full form is
//! `FILEVOL_CHURN_KILLS=200 cargo test --test integration churn --
//! --include-ignored`, as root.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use filevol::ops::requests::{self as req, MIB};
use filevol::proto::csi;
use filevol::proto::csi::volume_capability::access_mode::Mode;
use filevol::proto::grpc::{ControllerClient, NodeClient};
use filevol_kit::driver::{Driver, Opts};
use filevol_kit::files::{assert_consistent, digest};
use filevol_kit::leaks::LeakGuard;
use filevol_kit::scratch::{pool_on, Bindfs};
use filevol_kit::tempdir::TempDir;
use filevol_kit::writer::{fsck_clean, verify, Writer};
use grpcio::{CallOption, ChannelBuilder, EnvBuilder, RpcStatusCode};
use parking_lot::Mutex;

use crate::BIN;

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
    /// ControllerPublish/Unpublish to this node id (the separate layout,
    /// where attachment records are part of the flow).
    attach_to: Option<String>,
}

/// How the driver runs: one process, or a node plugin and a controller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    All,
    Separate,
}

/// Where the workload finds the driver.
#[derive(Debug, Clone)]
struct Sockets {
    controller: PathBuf,
    node: PathBuf,
    layout: Layout,
    /// Whether the pool can reflink: only then is a snapshot of a staged
    /// volume possible (a byte copy of it would be torn and is refused).
    reflink: bool,
}

const NODE_ID: &str = "churn-node";

fn channel(socket: &Path) -> grpcio::Channel {
    let env = Arc::new(EnvBuilder::new().cq_count(1).build());
    ChannelBuilder::new(env)
        .initial_reconnect_backoff(Duration::from_millis(20))
        .max_reconnect_backoff(Duration::from_millis(200))
        .connect(&format!("unix:{}", socket.display()))
}

fn clients(sockets: &Sockets) -> Clients {
    Clients {
        controller: ControllerClient::new(channel(&sockets.controller)),
        node: NodeClient::new(channel(&sockets.node)),
        attach_to: (sockets.layout == Layout::Separate).then(|| NODE_ID.to_owned()),
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
    sockets: Sockets,
    kubelet: PathBuf,
    stop: Arc<AtomicBool>,
    ledger: Ledger,
    rounds: Arc<AtomicUsize>,
) {
    let c = clients(&sockets);
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
        if let Some(node) = &c.attach_to {
            retry("ControllerPublishVolume", || {
                c.controller.controller_publish_volume_opt(
                    &req::controller_publish(
                        &id,
                        node,
                        req::mount_cap(Mode::SINGLE_NODE_WRITER, ""),
                        false,
                    ),
                    opt(),
                )
            });
        }
        retry("NodeStageVolume", || {
            c.node
                .node_stage_volume_opt(&req::stage(&id, &staging, cap.clone()), opt())
        });
        retry("NodePublishVolume", || {
            c.node.node_publish_volume_opt(
                &req::publish(&id, &staging, &target, cap.clone(), false),
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
        let snapshot = || {
            retry("CreateSnapshot", || {
                c.controller
                    .create_snapshot_opt(&req::snapshot(&format!("snap-{name}"), &id), opt())
            })
        };
        if i % 3 == 0 && sockets.reflink {
            snapshot();
        }
        retry("NodeUnpublishVolume", || {
            c.node
                .node_unpublish_volume_opt(&req::unpublish(&id, &target), opt())
        });
        retry("NodeUnstageVolume", || {
            c.node
                .node_unstage_volume_opt(&req::unstage(&id, &staging), opt())
        });
        if let Some(node) = &c.attach_to {
            retry("ControllerUnpublishVolume", || {
                c.controller
                    .controller_unpublish_volume_opt(&req::controller_unpublish(&id, node), opt())
            });
        }
        if i % 3 == 0 && !sockets.reflink {
            snapshot();
        }
        if i % 2 == 0 {
            retry("DeleteVolume", || {
                c.controller.delete_volume_opt(&req::delete(&id), opt())
            });
            ledger.lock().remove(&id);
        }
        rounds.fetch_add(1, Ordering::SeqCst);
    }
}

fn start(pool: &Path, kubelet: &Path, socket: &Path, mode: &str) -> Driver {
    let dir = TempDir::new().unwrap();
    let mut d = Driver::spawn_at(
        BIN,
        dir,
        socket.to_owned(),
        pool.to_owned(),
        Opts::default().args(&[
            "--mode",
            mode,
            "--node-id",
            NODE_ID,
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
#[ignore = "needs root"]
fn sigkill_loop_under_churn_loses_nothing() {
    churn(Layout::All, false, 20);
}

#[test]
#[ignore = "needs root"]
fn sigkill_loop_of_separate_controller_and_node_loses_nothing() {
    churn(Layout::Separate, false, 50);
}

#[test]
#[ignore = "needs root"]
fn sigkill_loop_of_separate_processes_on_a_share_without_holes_loses_nothing() {
    churn(Layout::Separate, true, 20);
}

/// The processes of one layout, restarted after each kill.
struct Procs {
    pool: PathBuf,
    kubelet: PathBuf,
    sockets: Sockets,
    /// The controller (`--mode all` in the single-process layout).
    controller: Driver,
    /// The node plugin, in the separate layout.
    node: Option<Driver>,
}

impl Procs {
    fn start(layout: Layout, reflink: bool, pool: &Path, kubelet: &Path, dir: &Path) -> Procs {
        let sockets = Sockets {
            controller: dir.join("controller.sock"),
            node: match layout {
                Layout::All => dir.join("controller.sock"),
                Layout::Separate => dir.join("node.sock"),
            },
            layout,
            reflink,
        };
        // The node plugin first, as a DaemonSet usually is.
        let node =
            (layout == Layout::Separate).then(|| start(pool, kubelet, &sockets.node, "node"));
        let mode = if layout == Layout::All {
            "all"
        } else {
            "controller"
        };
        let controller = start(pool, kubelet, &sockets.controller, mode);
        Procs {
            pool: pool.to_owned(),
            kubelet: kubelet.to_owned(),
            sockets,
            controller,
            node,
        }
    }

    /// SIGKILLs one process (`node` picks the node plugin where there is
    /// one) and starts it again.
    fn kill_and_restart(&mut self, node: bool, logs: &Mutex<String>) {
        let (victim, socket, mode) = match (&mut self.node, node) {
            (Some(n), true) => (n, &self.sockets.node, "node"),
            _ => (
                &mut self.controller,
                &self.sockets.controller,
                if self.sockets.layout == Layout::All {
                    "all"
                } else {
                    "controller"
                },
            ),
        };
        victim.signal(rustix::process::Signal::KILL);
        victim.wait_exit(Duration::from_secs(10));
        keep_log(victim, logs);
        *victim = start(&self.pool, &self.kubelet, socket, mode);
    }
}

/// The crash loop in `layout`, on an xfs pool or (`share`) on a bindfs view
/// of it that reports no holes and cannot reflink.
fn churn(layout: Layout, share: bool, default_kills: usize) {
    let kills: usize = std::env::var("FILEVOL_CHURN_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default_kills);
    let (_fs, xfs_pool) = pool_on("xfs", 8192);
    let view = share.then(|| Bindfs::new(_fs.path()));
    let pool = match &view {
        Some(v) => v.path().join("pool"),
        None => xfs_pool,
    };
    let dir = tempfile::tempdir().unwrap();
    let kubelet = dir.path().canonicalize().unwrap().join("kubelet");
    std::fs::create_dir_all(&kubelet).unwrap();
    let _guard = LeakGuard {
        kubelet: kubelet.clone(),
        pool: pool.clone(),
    };
    let mut procs = Procs::start(layout, !share, &pool, &kubelet, dir.path());
    let logs = Mutex::new(String::new());
    let steady = Steady::start(&clients(&procs.sockets), &kubelet);

    let stop = Arc::new(AtomicBool::new(false));
    let ledger: Ledger = Arc::default();
    let rounds = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..WORKERS)
        .map(|w| {
            let (sockets, kubelet) = (procs.sockets.clone(), kubelet.clone());
            let (stop, ledger, rounds) =
                (Arc::clone(&stop), Arc::clone(&ledger), Arc::clone(&rounds));
            std::thread::spawn(move || workload(w, sockets, kubelet, stop, ledger, rounds))
        })
        .collect();

    // Kill at pseudo-random moments (a fixed-seed LCG: the run repeats),
    // and in the separate layout pick the controller or the node plugin.
    let mut seed: u64 = 0x5eed_f11e;
    let mut node_kills = 0;
    for _ in 0..kills {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        std::thread::sleep(Duration::from_millis(50 + (seed >> 33) % 400));
        let node = (seed >> 20) & 1 == 1;
        node_kills += usize::from(node && layout == Layout::Separate);
        procs.kill_and_restart(node, &logs);
    }
    stop.store(true, Ordering::SeqCst);
    let mut failed = false;
    for w in workers {
        failed |= w.join().is_err();
    }
    if failed {
        keep_log(&procs.controller, &logs);
        if let Some(n) = &procs.node {
            keep_log(n, &logs);
        }
        std::fs::write("/tmp/churn-failure.log", &*logs.lock()).unwrap();
        panic!("a workload thread failed; driver logs in /tmp/churn-failure.log");
    }
    assert!(
        rounds.load(Ordering::SeqCst) > 0,
        "the workload made no progress"
    );
    let steady_writes = steady.finish(&clients(&procs.sockets), &pool);

    // Every volume the workload was told exists is there, with its data.
    let c = clients(&procs.sockets);
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
                .node_stage_volume_opt(&req::stage(id, &staging, cap.clone()), opt())
        });
        retry("NodePublishVolume", || {
            c.node.node_publish_volume_opt(
                &req::publish(id, &staging, &target, cap.clone(), false),
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
                .node_unpublish_volume_opt(&req::unpublish(id, &target), opt())
        });
        retry("NodeUnstageVolume", || {
            c.node
                .node_unstage_volume_opt(&req::unstage(id, &staging), opt())
        });
    }
    // No half-made volume or snapshot: everything listed was recorded or is
    // a volume whose delete the workload was still retrying. Clean-up of
    // what killed processes left is a controller's job at its start (node
    // plugins never clean up), so the controller starts once more first.
    if layout == Layout::Separate {
        procs.kill_and_restart(false, &logs);
    }
    assert_consistent(&pool);

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
    drop(procs);
    eprintln!(
        "churn ({layout:?}{}): {kills} kills ({node_kills} of the node plugin), {} rounds, {} volumes verified, {steady_writes} acknowledged writes read back",
        if share { ", bindfs" } else { "" },
        rounds.load(Ordering::SeqCst),
        ledger.len()
    );
}

/// The long-lived volume a writer writes into through every kill.
struct Steady {
    id: String,
    staging: PathBuf,
    target: PathBuf,
    writer: Writer,
}

impl Steady {
    fn start(c: &Clients, kubelet: &Path) -> Steady {
        let cap = req::mount_cap(Mode::SINGLE_NODE_WRITER, "ext4");
        let id = retry("CreateVolume", || {
            c.controller
                .create_volume_opt(&req::create("steady", 128 * MIB), opt())
        })
        .volume
        .unwrap()
        .volume_id;
        let staging = kubelet.join("staging").join(&id);
        let target = kubelet.join("pods/steady").join(&id).join("mount");
        std::fs::create_dir_all(&staging).unwrap();
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        if let Some(node) = &c.attach_to {
            retry("ControllerPublishVolume", || {
                c.controller.controller_publish_volume_opt(
                    &req::controller_publish(&id, node, cap.clone(), false),
                    opt(),
                )
            });
        }
        retry("NodeStageVolume", || {
            c.node
                .node_stage_volume_opt(&req::stage(&id, &staging, cap.clone()), opt())
        });
        retry("NodePublishVolume", || {
            c.node.node_publish_volume_opt(
                &req::publish(&id, &staging, &target, cap.clone(), false),
                opt(),
            )
        });
        let writer = Writer::start(&target.join("data"));
        Steady {
            id,
            staging,
            target,
            writer,
        }
    }

    /// Stops the writer, checks every acknowledged block, unstages the
    /// volume and checks its filesystem; returns the writes acknowledged.
    fn finish(self, c: &Clients, pool: &Path) -> u64 {
        let acked = self.writer.finish();
        verify(&self.target.join("data"), &acked);
        retry("NodeUnpublishVolume", || {
            c.node
                .node_unpublish_volume_opt(&req::unpublish(&self.id, &self.target), opt())
        });
        retry("NodeUnstageVolume", || {
            c.node
                .node_unstage_volume_opt(&req::unstage(&self.id, &self.staging), opt())
        });
        if let Some(node) = &c.attach_to {
            retry("ControllerUnpublishVolume", || {
                c.controller.controller_unpublish_volume_opt(
                    &req::controller_unpublish(&self.id, node),
                    opt(),
                )
            });
        }
        fsck_clean(&filevol_kit::files::image(pool, &self.id));
        acked.writes
    }
}
