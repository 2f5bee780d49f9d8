//! The gRPC server's life: claim the socket, start the workers and gRPC core,
//! serve until a signal, drain, and clean up.

pub mod signals;
pub mod socket;

use std::sync::Arc;
use std::time::Duration;

use grpcio::{ChannelBuilder, EnvBuilder, ServerBuilder};

use crate::config::{Config, ConfigError};
use crate::executor::Executor;
use crate::metrics::dir_usage::{DirUsage, DirUsageLimits};
use crate::metrics::http::MetricsServer;
use crate::service::{CsiService, Driver};
use filevol_core::node::{Node, NodeError};
use filevol_core::pool::lock_reach::{self, LockReach, Verdict};
use filevol_core::pool::{Pool, PoolError, PoolOptions};
use filevol_core::units::human;
use filevol_core::volume::meta::NodeRecord;
use socket::{SocketClaim, SocketError};

/// Largest request accepted. CSI requests are a few KiB at most (ids,
/// parameters, secrets); the bound keeps a hostile client from making the
/// driver buffer gRPC's default 4 MiB per call.
pub const MAX_REQUEST_BYTES: i32 = 1 << 20;

/// Calls one connection may have open at once (a sidecar makes a handful).
const MAX_STREAMS_PER_CONNECTION: i32 = 128;

/// gRPC core's memory quota for connection and call buffers.
const GRPC_MEMORY_QUOTA: usize = 64 << 20;

/// How long cancelled calls get to unwind after the grace period.
const CANCEL_WAIT: Duration = Duration::from_secs(5);

/// How often a node plugin looks for freeze requests: a readdir of a
/// directory that is empty but while a group snapshot is being taken. It
/// bounds how long a controller waits for a freeze, not how long one lasts.
const FREEZE_POLL: Duration = Duration::from_millis(50);

/// Why `filevol serve` stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A setting is unusable.
    #[error("configuration")]
    Config(#[from] ConfigError),
    /// The socket path cannot be used.
    #[error("socket")]
    Socket(#[from] SocketError),
    /// The metrics address cannot be listened on.
    #[error("serve metrics on {0}")]
    Metrics(String, #[source] std::io::Error),
    /// The pool cannot be opened.
    #[error("open the pool")]
    Pool(#[from] PoolError),
    /// The mount table could not say where the pool's locks reach.
    #[error("read the mount table to tell whether the locks of pool {0} reach other hosts")]
    MountTable(std::path::PathBuf, #[source] std::io::Error),
    /// A shared pool on locks that may stay on this host.
    #[error(
        "a shared pool (--topology=) needs locks that reach every host, and pool {pool} is on {reach}. \
         Its fences would exclude nothing on another host: two hosts could stage one single-writer volume at once. \
         Mount the share so that its locks reach every host (NFS without nolock and without local_lock=all|posix, CephFS), \
         use the node-local layout (a --topology segment), or, if every process of this pool runs on this one host, \
         pass {flag} (FILEVOL_ALLOW_HOST_LOCAL_LOCKS=true)",
        flag = lock_reach::ALLOW_FLAG
    )]
    LocksStayOnHost {
        /// The pool directory.
        pool: std::path::PathBuf,
        /// What was found (boxed: the other variants are small).
        reach: Box<LockReach>,
    },
    /// The node side cannot start.
    #[error("start the node service")]
    Node(#[from] NodeError),
    /// Threads could not be started.
    #[error("start worker threads")]
    Threads(#[source] std::io::Error),
    /// Signal handlers could not be installed.
    #[error("install signal handlers")]
    Signals(#[source] std::io::Error),
    /// gRPC core refused the server.
    #[error("build the gRPC server")]
    Grpc(#[from] grpcio::Error),
}

/// Serves CSI on `config.endpoint` until SIGTERM or SIGINT, then drains.
pub fn run(config: Config) -> Result<(), ServeError> {
    log::debug!(
        "open file limit: {}",
        filevol_core::sys::fs::raise_open_file_limit()
    );
    check_lock_reach(&config)?;
    let mut claim = SocketClaim::claim(&config.endpoint)?;
    let grace = config.shutdown_grace;
    let socket_mode = config.socket_mode;
    let pool = Pool::open(
        &config.pool,
        PoolOptions {
            reserve_bytes: config.reserve_bytes,
            overcommit: config.overcommit,
            topology: config.topology.clone(),
            janitor: config.mode.serves_controller(),
        },
    )?;
    if config.mode.serves_node() {
        // The controller publishes only to nodes that registered here.
        pool.register_node(&NodeRecord {
            node_id: config.node_id.clone(),
            topology: config.topology.clone(),
            max_volumes: config.max_volumes_per_node,
        })?;
    }
    // The node side re-takes the locks of what it finds staged before it
    // serves a single call.
    let node = if config.mode.serves_node() {
        match config.ephemeral {
            Some(limits) => log::info!(
                "CSI ephemeral inline volumes: on, at most {} each and {} on this node together",
                human(limits.max_size),
                human(limits.max_per_node)
            ),
            None => {
                log::info!("CSI ephemeral inline volumes: off (--ephemeral-inline turns them on)")
            }
        }
        Some(
            Node::start(
                &config.kubelet_dir,
                &config.node_id,
                &pool,
                config.loop_direct_io,
            )?
            .with_ephemeral(config.ephemeral)
            .with_kernel_log(filevol_core::health::loop_errors::LoopErrors::follow()),
        )
    } else {
        None
    };
    let executor = Executor::start(
        config.workers,
        config.queue_depth,
        config.mode.serves_controller(),
    )
    .map_err(ServeError::Threads)?;
    let health = crate::service::health::PoolWatch::new(pool.root(), config.health_interval);
    let driver = Arc::new(Driver {
        config,
        executor,
        pool,
        node,
        health,
    });
    driver.health.start(&driver).map_err(ServeError::Threads)?;
    let cfg = &driver.config;

    // One completion queue: its thread only decodes, validates and hands
    // off, which one thread does at tens of thousands of calls a second.
    let env = Arc::new(
        EnvBuilder::new()
            .cq_count(1)
            .name_prefix("filevol-grpc")
            .build(),
    );
    // Bounds for hostile or broken clients: requests over 1 MiB are refused
    // by gRPC core, a connection that does not finish its handshake in time
    // is dropped, and gRPC core's buffers share one memory quota, so a
    // flood of connections cannot grow the process without limit.
    let args = ChannelBuilder::new(Arc::clone(&env))
        .max_receive_message_len(MAX_REQUEST_BYTES)
        .max_concurrent_stream(MAX_STREAMS_PER_CONNECTION)
        .raw_cfg_int(
            std::ffi::CString::new("grpc.server_handshake_timeout_ms").expect("no NUL"),
            i32::try_from(driver.config.grpc_handshake_timeout.saturating_mul(1000))
                .unwrap_or(i32::MAX),
        )
        .set_resource_quota(
            grpcio::ResourceQuota::new(Some("filevol")).resize_memory(GRPC_MEMORY_QUOTA),
        )
        .build_args();
    let mut builder = ServerBuilder::new(env).channel_args(args);
    for service in CsiService::new(Arc::clone(&driver)).grpc_services() {
        builder = builder.register_service(service);
    }
    let mut server = builder.build()?;
    claim.bind(&mut server, socket_mode)?;
    // Directory volumes' trees are measured on a thread of their own, only
    // where metrics are served: a scrape reads the last figures.
    let dir_usage = match &driver.config.metrics_address {
        Some(_) => {
            let d = Arc::clone(&driver);
            let limits = DirUsageLimits::every(driver.config.dir_usage_interval);
            Some(Arc::new(
                DirUsage::start(limits, move || d.dir_volumes_to_measure())
                    .map_err(ServeError::Threads)?,
            ))
        }
        None => None,
    };
    let metrics = match (&driver.config.metrics_address, &dir_usage) {
        (Some(address), Some(dirs)) => {
            let (d, dirs) = (Arc::clone(&driver), Arc::clone(dirs));
            let m = MetricsServer::start(address, move || d.metrics_text(&dirs.summary()))
                .map_err(|e| ServeError::Metrics(address.clone(), e))?;
            log::info!("metrics at http://{}/metrics", m.address());
            Some(m)
        }
        _ => None,
    };
    // Watch signals before serving, so a SIGTERM that arrives during
    // start-up still drains instead of killing the process mid-call.
    let stop = signals::watch().map_err(ServeError::Signals)?;
    server.start();
    let janitor = match driver.config.janitor_interval {
        Some(every) if driver.config.mode.serves_controller() => {
            let d = Arc::clone(&driver);
            Some(
                Periodic::start("filevol-janitor", every, move || {
                    if let Err(e) = d.pool.clean_up() {
                        log::warn!("pool clean-up: {e}");
                    }
                })
                .map_err(ServeError::Threads)?,
            )
        }
        _ => None,
    };
    // The periodic trims run on a thread of their own, one volume at a
    // time like fstrim: they never take a worker from kubelet's calls.
    let trims = match (driver.config.trim, driver.node.is_some()) {
        (Some(schedule), true) => {
            let d = Arc::clone(&driver);
            let mut turns = filevol_core::node::trim::Turns::default();
            Some(
                Periodic::start("filevol-trim", schedule.tick(), move || {
                    if let Some(node) = &d.node {
                        filevol_core::node::trim::periodic_pass(
                            node, &d.pool, &schedule, &mut turns,
                        );
                    }
                })
                .map_err(ServeError::Threads)?,
            )
        }
        _ => None,
    };
    // Group snapshots' freeze requests are answered on a thread of their
    // own, every FREEZE_POLL: a controller waits for the answer, and the
    // pods of a frozen filesystem wait for the thaw.
    let freezes = match &driver.node {
        Some(node) => {
            node.thaw_left_frozen(&driver.pool, &driver.config.node_id);
            let d = Arc::clone(&driver);
            let guardian = filevol_core::node::freeze::GuardianCommand {
                program: "/proc/self/exe".into(),
                args: vec!["freeze-guard".into()],
            };
            Some(
                Periodic::start("filevol-freezes", FREEZE_POLL, move || {
                    if let Some(node) = &d.node {
                        node.serve_freezes(&d.pool, &d.config.node_id, &guardian);
                    }
                })
                .map_err(ServeError::Threads)?,
            )
        }
        None => None,
    };
    // The fences of this node's devices are checked again on a thread of
    // their own: a lock lost while a device lives is reported, not missed.
    let fence_checks = match (driver.config.fence_check_interval, driver.node.is_some()) {
        (Some(every), true) => {
            let d = Arc::clone(&driver);
            Some(
                Periodic::start("filevol-fences", every, move || {
                    if let Some(node) = &d.node {
                        node.check_custody(&d.pool);
                    }
                })
                .map_err(ServeError::Threads)?,
            )
        }
        _ => None,
    };

    log::info!(
        "filevol {} serving mode={} driver={} node={} endpoint={} pool={} workers={} queue={}",
        env!("CARGO_PKG_VERSION"),
        cfg.mode,
        cfg.driver_name,
        cfg.node_id,
        cfg.endpoint,
        cfg.pool.display(),
        cfg.workers,
        cfg.queue_depth
    );
    if !cfg.defaulted.is_empty() {
        // On stderr whatever the log level: a flag left at its default is
        // what an operator starting the driver by hand should see.
        #[allow(clippy::print_stderr)]
        {
            eprintln!(
                "filevol: serving with defaults: {} (see `filevol serve --help`)",
                cfg.defaulted.join(", ")
            );
        }
    }

    let sig = stop.recv().unwrap_or(signal_hook::consts::SIGTERM);
    log::info!(
        "{} received: refusing new calls, finishing those in flight (up to {}s); a second signal exits at once",
        signals::name(sig),
        grace.as_secs()
    );
    drop(janitor);
    drop(trims);
    drop(fence_checks);
    drop(freezes);
    if let Some(node) = &driver.node {
        node.end_freezes(&driver.pool, &driver.config.node_id);
    }
    drain(&mut server, grace);
    driver.executor.shutdown();
    drop(server);
    drop(claim);
    // The metrics server holds the last figures' owner: it goes first.
    drop(metrics);
    drop(dir_usage);
    log::info!("stopped");
    Ok(())
}

/// Refuses a shared pool whose locks may stay on this host, unless the
/// operator allowed it, in which case it says so once; every mode checks,
/// since every process takes the pool's locks (`pool::lock_reach`).
fn check_lock_reach(config: &Config) -> Result<(), ServeError> {
    let shared = config.topology.is_empty();
    let reach = match lock_reach::of_pool(&config.pool) {
        Ok(reach) => reach,
        // The node-local layout needs nothing from the answer.
        Err(e) if !shared => {
            log::debug!("pool {}: mount table: {e}", config.pool.display());
            return Ok(());
        }
        Err(e) if config.allow_host_local_locks => {
            log::warn!(
                "pool {}: cannot tell whether its locks reach other hosts ({e}); serving it as a shared pool because of {}",
                config.pool.display(),
                lock_reach::ALLOW_FLAG
            );
            return Ok(());
        }
        Err(e) => return Err(ServeError::MountTable(config.pool.clone(), e)),
    };
    match lock_reach::verdict(reach.class, shared, config.allow_host_local_locks) {
        Verdict::Refuse => Err(ServeError::LocksStayOnHost {
            pool: config.pool.clone(),
            reach: Box::new(reach),
        }),
        Verdict::Warn => {
            log::warn!(
                "pool {} is on {reach}; serving it as a shared pool because of {}: its fences exclude nothing on other hosts",
                config.pool.display(),
                lock_reach::ALLOW_FLAG
            );
            Ok(())
        }
        // A shared pool says at start why its fences hold across hosts.
        Verdict::Fine if shared => {
            log::info!("pool {} is on {reach}", config.pool.display());
            Ok(())
        }
        Verdict::Fine => {
            log::debug!("pool {} is on {reach}", config.pool.display());
            Ok(())
        }
    }
}

/// Work repeated on a thread of its own (the pool's clean-up, the trims);
/// stopped and joined when dropped.
struct Periodic {
    stop: Option<crossbeam_channel::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Periodic {
    fn start(
        name: &str,
        every: Duration,
        mut work: impl FnMut() + Send + 'static,
    ) -> std::io::Result<Periodic> {
        let (stop, stopped) = crossbeam_channel::bounded::<()>(0);
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                // Disconnected (the sender dropped) ends the loop.
                while let Err(crossbeam_channel::RecvTimeoutError::Timeout) =
                    stopped.recv_timeout(every)
                {
                    work();
                }
            })?;
        Ok(Periodic {
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for Periodic {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Stops accepting calls and waits up to `grace` for those in progress,
/// then cancels what is left.
fn drain(server: &mut grpcio::Server, grace: Duration) {
    let (done_tx, done_rx) = crossbeam_channel::bounded(1);
    let shutdown = server.shutdown();
    let waiter = std::thread::Builder::new()
        .name("filevol-drain".into())
        .spawn(move || {
            if let Err(e) = futures_executor::block_on(shutdown) {
                log::warn!("gRPC shutdown: {e}");
            }
            let _ = done_tx.send(());
        });
    if waiter.is_err() {
        log::warn!("could not start the drain thread; cancelling calls in flight");
        server.cancel_all_calls();
        return;
    }
    if done_rx.recv_timeout(grace).is_err() {
        log::warn!(
            "calls still in flight after {}s: cancelling them",
            grace.as_secs()
        );
        server.cancel_all_calls();
        let _ = done_rx.recv_timeout(CANCEL_WAIT);
    }
}
