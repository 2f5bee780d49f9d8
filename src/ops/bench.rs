//! `filevol bench`: a CSI load generator that replays what a busy cluster
//! does, against any driver's socket, so filevol and other drivers can be
//! measured in the same run on the same machine.
//!
//! Scenarios:
//! - `lifecycle`: N volumes through create, (controller publish), stage,
//!   publish, unpublish, unstage, (controller unpublish), delete, at
//!   concurrency C;
//! - `publish-storm`: M volumes staged once, then publish/unpublish cycles
//!   over them from C threads;
//! - `contention`: half the threads hammer one volume (publish/unpublish)
//!   while the other half run lifecycles on other volumes.
//!
//! It reports per-RPC p50/p90/p99, lifecycles per second, errors by gRPC
//! code, and the target process's peak RSS (VmHWM, given `--pid`). A run
//! fails, after its report, when it could not undo what it made or when
//! the driver refused or failed calls of the load (busy answers aside,
//! which contention is meant to meet): figures of a load that did not run
//! as asked are not to be quoted.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use grpcio::{CallOption, ChannelBuilder, EnvBuilder, Environment};
use parking_lot::Mutex;
use serde::Serialize;

use super::OpsError;
use crate::endpoint::Endpoint;
use crate::error::code_name;
use crate::ops::requests as req;
use crate::ops::stats::{machine_busy_seconds, memory_kib, percentile, process_cpu_seconds};
use crate::proto::csi;
use crate::proto::csi::volume_capability::access_mode::Mode;
use crate::proto::grpc::{ControllerClient, NodeClient};
use filevol_core::units::parse_size;

/// Which load to generate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// Whole volume lifecycles.
    Lifecycle,
    /// Publish/unpublish cycles over staged volumes.
    PublishStorm,
    /// One hot volume amid lifecycles on others.
    Contention,
}

/// Flags of `filevol bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// The driver's socket.
    #[arg(long, env = "CSI_ENDPOINT")]
    pub endpoint: String,
    /// Pid of the driver, for its peak RSS.
    #[arg(long)]
    pub pid: Option<u32>,
    /// The load.
    #[arg(long, value_enum, default_value_t = Scenario::Lifecycle)]
    pub scenario: Scenario,
    /// Volumes (lifecycles, or staged volumes for the storm).
    #[arg(long, default_value_t = 200)]
    pub volumes: usize,
    /// Concurrent callers.
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// Publish/unpublish cycles per caller in the storm.
    #[arg(long, default_value_t = 50)]
    pub cycles: usize,
    /// Volume size.
    #[arg(long, default_value = "64Mi", value_parser = parse_size)]
    pub size: u64,
    /// Raw block volumes instead of filesystems.
    #[arg(long)]
    pub block: bool,
    /// Filesystem for mount volumes (empty: the driver's default).
    #[arg(long, default_value = "")]
    pub fs_type: String,
    /// CreateVolume parameters, `key=value`, repeatable (e.g. layout=dir).
    #[arg(long = "param", value_parser = parse_pair)]
    pub params: Vec<(String, String)>,
    /// Directory under which staging and target paths are made (the
    /// driver's kubelet directory).
    #[arg(long)]
    pub kubelet_dir: PathBuf,
    /// Node id for ControllerPublish (default: NodeGetInfo's).
    #[arg(long)]
    pub node_id: Option<String>,
    /// Seconds to wait for each call.
    #[arg(long, default_value_t = 300)]
    pub timeout: u64,
    /// JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

fn parse_pair(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{s:?} is not key=value"))
}

/// Latency figures of one RPC.
#[derive(Debug, Serialize)]
pub struct RpcFigures {
    /// Calls made.
    pub calls: usize,
    /// Median, ms.
    pub p50_ms: f64,
    /// 90th percentile, ms.
    pub p90_ms: f64,
    /// 99th percentile, ms.
    pub p99_ms: f64,
}

/// What a run measured.
#[derive(Debug, Serialize)]
pub struct Report {
    /// The scenario.
    pub scenario: Scenario,
    /// Concurrent callers.
    pub concurrency: usize,
    /// Whole lifecycles completed.
    pub lifecycles: usize,
    /// Wall time of the load, seconds.
    pub seconds: f64,
    /// Lifecycles per second.
    pub lifecycles_per_second: f64,
    /// Per-RPC latency.
    pub rpcs: BTreeMap<String, RpcFigures>,
    /// Failed calls by RPC and code.
    pub errors: BTreeMap<String, usize>,
    /// The driver's peak resident set, KiB (VmHWM).
    pub peak_rss_kib: Option<u64>,
    /// CPU time per completed lifecycle (or publish cycle) over the timed
    /// load, ms.
    pub cpu_ms_per_lifecycle: Option<CpuPerLifecycle>,
    /// Calls of the load the driver refused or failed, "not now" answers
    /// (ABORTED, UNAVAILABLE, RESOURCE_EXHAUSTED) aside. A run with any
    /// has failed: its figures are not of the load asked for.
    pub failed_calls: usize,
    /// What the run made and could not undo (empty after a clean run).
    pub left_behind: Vec<String>,
}

/// Where the CPU time of a run went, ms per completed lifecycle. With both
/// cores busy this, not latency, bounds the rate: it is the stable figure
/// on a machine whose speed drifts.
#[derive(Debug, Serialize)]
pub struct CpuPerLifecycle {
    /// The driver process and the tools it forked (`--pid`).
    pub server: Option<f64>,
    /// This load generator.
    pub client: f64,
    /// The rest of the machine's busy time: kernel threads (loop workers,
    /// filesystem logs and discards) and anything else running.
    pub other: Option<f64>,
}

/// CPU counters at one moment, seconds.
struct CpuSample {
    server: Option<f64>,
    client: Option<f64>,
    machine: Option<f64>,
}

impl CpuSample {
    fn now(pid: Option<u32>) -> Self {
        CpuSample {
            server: pid.and_then(process_cpu_seconds),
            client: process_cpu_seconds(std::process::id()),
            machine: machine_busy_seconds(),
        }
    }

    /// Per completed unit between `self` and `end`, ms.
    fn per(&self, end: &CpuSample, units: usize) -> Option<CpuPerLifecycle> {
        if units == 0 {
            return None;
        }
        let ms = |a: Option<f64>, b: Option<f64>| Some((b? - a?) * 1000.0 / units as f64);
        let server = ms(self.server, end.server);
        let client = ms(self.client, end.client)?;
        let other = ms(self.machine, end.machine).map(|m| m - client - server.unwrap_or(0.0));
        Some(CpuPerLifecycle {
            server,
            client,
            other,
        })
    }
}

/// Shared recording of latencies and errors.
#[derive(Default)]
struct Recorder {
    latencies: Mutex<BTreeMap<&'static str, Vec<Duration>>>,
    errors: Mutex<BTreeMap<String, usize>>,
    /// Errors other than the driver's "not now" (see [`retriable`]).
    failed: AtomicUsize,
}

impl Recorder {
    fn record<T>(&self, rpc: &'static str, started: Instant, r: &grpcio::Result<T>) -> bool {
        match r {
            Ok(_) => {
                self.latencies
                    .lock()
                    .entry(rpc)
                    .or_default()
                    .push(started.elapsed());
                true
            }
            Err(e) => {
                let code = match e {
                    grpcio::Error::RpcFailure(s) => code_name(s.code()).to_owned(),
                    other => format!("{other:?}").chars().take(40).collect(),
                };
                *self
                    .errors
                    .lock()
                    .entry(format!("{rpc} {code}"))
                    .or_insert(0) += 1;
                if !retriable(r) {
                    self.failed.fetch_add(1, Ordering::SeqCst);
                }
                false
            }
        }
    }
}

/// What the run has made and not yet undone, so that whatever the driver
/// answers, the end of the run undoes it (see [`clean_up`]).
#[derive(Default)]
struct Made {
    volumes: Mutex<Vec<String>>,
    attached: Mutex<Vec<String>>,
    staged: Mutex<Vec<(String, PathBuf)>>,
    published: Mutex<Vec<(String, PathBuf)>>,
}

impl Made {
    fn add<T: PartialEq>(list: &Mutex<Vec<T>>, item: T) {
        let mut l = list.lock();
        if !l.contains(&item) {
            l.push(item);
        }
    }

    fn remove<T: PartialEq>(list: &Mutex<Vec<T>>, item: &T) {
        list.lock().retain(|x| x != item);
    }
}

/// One caller's clients (its own connection, as sidecars have).
struct Caller {
    controller: ControllerClient,
    node: NodeClient,
    opt: CallOption,
}

struct Plan {
    cap: csi::VolumeCapability,
    params: std::collections::HashMap<String, String>,
    size: u64,
    publish: bool,
    stage: bool,
    node_id: String,
    dir: PathBuf,
    run: String,
    made: Made,
}

impl Plan {
    fn staging(&self, name: &str) -> PathBuf {
        self.dir.join("staging").join(name)
    }
    fn target(&self, name: &str, n: usize) -> PathBuf {
        self.dir
            .join("pods")
            .join(format!("{name}-{n}"))
            .join("mount")
    }
}

macro_rules! timed {
    ($rec:expr, $rpc:literal, $call:expr) => {{
        let started = Instant::now();
        let r = $call;
        $rec.record($rpc, started, &r);
        r
    }};
}

fn caller(env: &Arc<Environment>, endpoint: &Endpoint, timeout: u64) -> Caller {
    let ch = ChannelBuilder::new(Arc::clone(env))
        .use_local_subchannel_pool(true)
        .connect(&endpoint.grpc_address());
    Caller {
        controller: ControllerClient::new(ch.clone()),
        node: NodeClient::new(ch),
        opt: CallOption::default().timeout(Duration::from_secs(timeout)),
    }
}

fn create(c: &Caller, p: &Plan, rec: &Recorder, name: &str) -> Option<String> {
    let mut r = req::create_volume(name, req::size(p.size), p.cap.clone());
    r.parameters = p.params.clone();
    let id = timed!(
        rec,
        "CreateVolume",
        c.controller.create_volume_opt(&r, c.opt.clone())
    )
    .ok()
    .map(|v| v.volume.volume_id.clone())?;
    Made::add(&p.made.volumes, id.clone());
    Some(id)
}

fn attach(c: &Caller, p: &Plan, rec: &Recorder, id: &str, staging: &Path) -> bool {
    if p.publish {
        let r = req::controller_publish(id, &p.node_id, p.cap.clone(), false);
        if timed!(
            rec,
            "ControllerPublishVolume",
            c.controller
                .controller_publish_volume_opt(&r, c.opt.clone())
        )
        .is_err()
        {
            return false;
        }
        Made::add(&p.made.attached, id.to_owned());
    }
    if p.stage {
        if std::fs::create_dir_all(staging).is_err() {
            return false;
        }
        let r = req::stage(id, staging, p.cap.clone());
        if timed!(
            rec,
            "NodeStageVolume",
            c.node.node_stage_volume_opt(&r, c.opt.clone())
        )
        .is_err()
        {
            return false;
        }
        Made::add(&p.made.staged, (id.to_owned(), staging.to_owned()));
    }
    true
}

fn publish(c: &Caller, p: &Plan, rec: &Recorder, id: &str, staging: &Path, target: &Path) -> bool {
    if let Some(parent) = target.parent() {
        if std::fs::create_dir_all(parent).is_err() {
            return false;
        }
    }
    let staging = if p.stage { staging } else { Path::new("") };
    let r = req::publish(id, staging, target, p.cap.clone(), false);
    // Recorded before the call: a publish that times out may still land.
    Made::add(&p.made.published, (id.to_owned(), target.to_owned()));
    timed!(
        rec,
        "NodePublishVolume",
        c.node.node_publish_volume_opt(&r, c.opt.clone())
    )
    .is_ok()
}

/// Whether a failed call is the driver saying "not now" (another call on
/// the volume, a full queue, a detach still under way): worth asking again.
fn retriable<T>(r: &grpcio::Result<T>) -> bool {
    use grpcio::RpcStatusCode as Code;
    matches!(r, Err(grpcio::Error::RpcFailure(s))
        if [Code::ABORTED, Code::UNAVAILABLE, Code::RESOURCE_EXHAUSTED].contains(&s.code()))
}

/// Makes `call` until it is not [`retriable`], for about `RETRY_FOR`.
fn retrying<T>(mut call: impl FnMut() -> grpcio::Result<T>) -> grpcio::Result<T> {
    let deadline = Instant::now() + RETRY_FOR;
    let mut pause = Duration::from_millis(2);
    loop {
        let r = call();
        if !retriable(&r) || Instant::now() >= deadline {
            return r;
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(200));
    }
}

/// How long an undo is asked again while the driver answers "not now".
const RETRY_FOR: Duration = Duration::from_secs(30);

/// Unpublishes, asking again while the driver is busy with the volume (a
/// contended volume answers ABORTED): a publish is never left behind
/// because the driver was busy. Every attempt is recorded.
fn unpublish(c: &Caller, p: &Plan, rec: &Recorder, id: &str, target: &Path) -> bool {
    let r = req::unpublish(id, target);
    let done = retrying(|| {
        timed!(
            rec,
            "NodeUnpublishVolume",
            c.node.node_unpublish_volume_opt(&r, c.opt.clone())
        )
    })
    .is_ok();
    if done {
        Made::remove(&p.made.published, &(id.to_owned(), target.to_owned()));
    }
    done
}

/// Unstages (where the driver stages) and controller-unpublishes (where it
/// publishes): the reverse of [`attach`].
fn detach(c: &Caller, p: &Plan, rec: &Recorder, id: &str, staging: &Path) -> bool {
    let mut ok = true;
    if p.stage {
        ok &= unstage(c, p, rec, id, staging);
    }
    if p.publish {
        ok &= controller_unpublish(c, p, rec, id);
    }
    ok
}

fn unstage(c: &Caller, p: &Plan, rec: &Recorder, id: &str, staging: &Path) -> bool {
    let r = req::unstage(id, staging);
    let done = retrying(|| {
        timed!(
            rec,
            "NodeUnstageVolume",
            c.node.node_unstage_volume_opt(&r, c.opt.clone())
        )
    })
    .is_ok();
    if done {
        Made::remove(&p.made.staged, &(id.to_owned(), staging.to_owned()));
    }
    done
}

fn controller_unpublish(c: &Caller, p: &Plan, rec: &Recorder, id: &str) -> bool {
    let r = req::controller_unpublish(id, &p.node_id);
    let done = retrying(|| {
        timed!(
            rec,
            "ControllerUnpublishVolume",
            c.controller
                .controller_unpublish_volume_opt(&r, c.opt.clone())
        )
    })
    .is_ok();
    if done {
        Made::remove(&p.made.attached, &id.to_owned());
    }
    done
}

fn delete(c: &Caller, p: &Plan, rec: &Recorder, id: &str) -> bool {
    let r = req::delete(id);
    let done = retrying(|| {
        timed!(
            rec,
            "DeleteVolume",
            c.controller.delete_volume_opt(&r, c.opt.clone())
        )
    })
    .is_ok();
    if done {
        Made::remove(&p.made.volumes, &id.to_owned());
    }
    done
}

/// One whole lifecycle; true when every step succeeded.
fn lifecycle(c: &Caller, p: &Plan, rec: &Recorder, n: usize) -> bool {
    let name = format!("{}-{n}", p.run);
    let Some(id) = create(c, p, rec, &name) else {
        return false;
    };
    let staging = p.staging(&name);
    let target = p.target(&name, 0);
    let mut ok = attach(c, p, rec, &id, &staging);
    if ok {
        ok &= publish(c, p, rec, &id, &staging, &target);
        ok &= unpublish(c, p, rec, &id, &target);
    }
    // A step that failed may have left what came before it: undo only what
    // was done, in order, so a failed unpublish does not unstage under a
    // publish (the final clean-up takes what is left).
    if ok || !p.made.published.lock().iter().any(|(v, _)| *v == id) {
        ok &= detach(c, p, rec, &id, &staging);
        if !p.made.staged.lock().iter().any(|(v, _)| *v == id)
            && !p.made.attached.lock().contains(&id)
        {
            ok &= delete(c, p, rec, &id);
        }
    }
    ok
}

/// The `q` quantile of `sorted` latencies in milliseconds (0 for none).
fn percentile_ms(sorted: &[Duration], q: f64) -> f64 {
    percentile(sorted, q).map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

/// Runs the scenario and returns what it measured.
pub fn measure(args: &BenchArgs) -> Result<Report, OpsError> {
    let endpoint = Endpoint::parse(&args.endpoint)?;
    let env = Arc::new(EnvBuilder::new().cq_count(2).build());
    let probe = caller(&env, &endpoint, args.timeout);
    let ctrl_caps = probe
        .controller
        .controller_get_capabilities_opt(&Default::default(), probe.opt.clone())
        .map_err(|source| OpsError::Rpc {
            call: "ControllerGetCapabilities",
            source,
        })?;
    let node_caps = probe
        .node
        .node_get_capabilities_opt(&Default::default(), probe.opt.clone())
        .map_err(|source| OpsError::Rpc {
            call: "NodeGetCapabilities",
            source,
        })?;
    use csi::controller_service_capability::rpc::Type as C;
    use csi::node_service_capability::rpc::Type as N;
    let publish_cap = ctrl_caps
        .capabilities
        .iter()
        .any(|c| c.rpc().type_ == C::PUBLISH_UNPUBLISH_VOLUME.into());
    let stage_cap = node_caps
        .capabilities
        .iter()
        .any(|c| c.rpc().type_ == N::STAGE_UNSTAGE_VOLUME.into());
    let node_id = match &args.node_id {
        Some(n) => n.clone(),
        None => {
            probe
                .node
                .node_get_info_opt(&Default::default(), probe.opt.clone())
                .map_err(|source| OpsError::Rpc {
                    call: "NodeGetInfo",
                    source,
                })?
                .node_id
        }
    };
    let cap = if args.block {
        req::block_cap(Mode::SINGLE_NODE_WRITER)
    } else {
        req::mount_cap(Mode::SINGLE_NODE_WRITER, &args.fs_type)
    };
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    let plan = Arc::new(Plan {
        cap,
        params: args.params.iter().cloned().collect(),
        size: args.size,
        publish: publish_cap,
        stage: stage_cap,
        node_id,
        dir: args.kubelet_dir.join(format!("bench-{stamp}")),
        run: format!("bench-{stamp}"),
        made: Made::default(),
    });
    let rec = Arc::new(Recorder::default());
    // Set-up and clean-up calls are not part of the figures.
    let setup = Recorder::default();
    let threads = args.concurrency.max(1);
    let completed = Arc::new(AtomicUsize::new(0));

    let load = (|| -> Result<(Duration, CpuSample), OpsError> {
        let started = Instant::now();
        let cpu = CpuSample::now(args.pid);
        match args.scenario {
            Scenario::Lifecycle => {
                let next = AtomicUsize::new(0);
                run_threads(threads, |_| {
                    let c = caller(&env, &endpoint, args.timeout);
                    loop {
                        let n = next.fetch_add(1, Ordering::SeqCst);
                        if n >= args.volumes {
                            break;
                        }
                        if lifecycle(&c, &plan, &rec, n) {
                            completed.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                });
                Ok((started.elapsed(), cpu))
            }
            Scenario::PublishStorm => {
                // M staged volumes first (not timed into the storm).
                let c = caller(&env, &endpoint, args.timeout);
                let mut staged = Vec::new();
                for n in 0..args.volumes {
                    let name = format!("{}-{n}", plan.run);
                    if let Some(id) = create(&c, &plan, &setup, &name) {
                        if attach(&c, &plan, &setup, &id, &plan.staging(&name)) {
                            staged.push((id, name));
                        }
                    }
                }
                if staged.is_empty() {
                    return Err(OpsError::NoLoad(format!(
                        "none of the {} volumes could be created and staged ({})",
                        args.volumes,
                        errors_text(&setup.errors.lock())
                    )));
                }
                let storm_started = Instant::now();
                let cpu = CpuSample::now(args.pid);
                run_threads(threads, |t| {
                    let c = caller(&env, &endpoint, args.timeout);
                    for k in 0..args.cycles {
                        let (id, name) = &staged[(t + k * threads) % staged.len()];
                        let target = plan.target(name, t + 1);
                        if publish(&c, &plan, &rec, id, &plan.staging(name), &target)
                            && unpublish(&c, &plan, &rec, id, &target)
                        {
                            completed.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                });
                Ok((storm_started.elapsed(), cpu))
            }
            Scenario::Contention => {
                let c = caller(&env, &endpoint, args.timeout);
                let hot_name = format!("{}-hot", plan.run);
                let hot_staging = plan.staging(&hot_name);
                let hot = create(&c, &plan, &setup, &hot_name)
                    .filter(|hot| attach(&c, &plan, &setup, hot, &hot_staging))
                    .ok_or_else(|| {
                        OpsError::NoLoad(format!(
                            "the hot volume could not be created and staged ({})",
                            errors_text(&setup.errors.lock())
                        ))
                    })?;
                let next = AtomicUsize::new(0);
                run_threads(threads, |t| {
                    let c = caller(&env, &endpoint, args.timeout);
                    if t % 2 == 0 {
                        let target = plan.target(&hot_name, t + 1);
                        for _ in 0..args.cycles {
                            if publish(&c, &plan, &rec, &hot, &hot_staging, &target) {
                                unpublish(&c, &plan, &rec, &hot, &target);
                            }
                        }
                    } else {
                        loop {
                            let n = next.fetch_add(1, Ordering::SeqCst);
                            if n >= args.volumes {
                                break;
                            }
                            if lifecycle(&c, &plan, &rec, n) {
                                completed.fetch_add(1, Ordering::SeqCst);
                            }
                        }
                    }
                });
                Ok((started.elapsed(), cpu))
            }
        }
    })();
    let cpu_end = CpuSample::now(args.pid);
    // Whatever happened, undo what was made.
    let left_behind = clean_up(&caller(&env, &endpoint, args.timeout), &plan, &setup);
    let (elapsed, cpu_start) = load?;
    let completed = completed.load(Ordering::SeqCst);
    let mut r = report(args, &rec, completed, elapsed);
    r.cpu_ms_per_lifecycle = cpu_start.per(&cpu_end, completed);
    r.left_behind = left_behind;
    Ok(r)
}

/// Errors by RPC and code, for a message.
fn errors_text(errors: &BTreeMap<String, usize>) -> String {
    if errors.is_empty() {
        return "no error reported".into();
    }
    errors
        .iter()
        .map(|(what, n)| format!("{what}: {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Undoes what the run made and has not undone, newest layer first
/// (publishes, stages, controller publishes, volumes), each asked again
/// while the driver answers "not now", then removes the run's directory
/// under the kubelet directory. Returns what is still there.
fn clean_up(c: &Caller, p: &Plan, rec: &Recorder) -> Vec<String> {
    let published = p.made.published.lock().clone();
    for (id, target) in &published {
        unpublish(c, p, rec, id, target);
    }
    let staged = p.made.staged.lock().clone();
    for (id, staging) in &staged {
        if !p.made.published.lock().iter().any(|(v, _)| v == id) {
            unstage(c, p, rec, id, staging);
        }
    }
    let attached = p.made.attached.lock().clone();
    for id in &attached {
        if !p.made.staged.lock().iter().any(|(v, _)| v == id) {
            controller_unpublish(c, p, rec, id);
        }
    }
    let volumes = p.made.volumes.lock().clone();
    for id in &volumes {
        if !p.made.attached.lock().contains(id)
            && !p.made.staged.lock().iter().any(|(v, _)| v == id)
        {
            delete(c, p, rec, id);
        }
    }
    let mut left: Vec<String> = Vec::new();
    let mounted = !p.made.published.lock().is_empty() || !p.made.staged.lock().is_empty();
    left.extend(
        p.made
            .published
            .lock()
            .iter()
            .map(|(id, t)| format!("volume {id} published at {}", t.display())),
    );
    left.extend(
        p.made
            .staged
            .lock()
            .iter()
            .map(|(id, s)| format!("volume {id} staged at {}", s.display())),
    );
    left.extend(
        p.made
            .attached
            .lock()
            .iter()
            .map(|id| format!("volume {id} controller-published to {}", p.node_id)),
    );
    left.extend(
        p.made
            .volumes
            .lock()
            .iter()
            .map(|id| format!("volume {id}")),
    );
    if mounted {
        left.push(format!(
            "{} (kept: volumes may still be mounted below it)",
            p.dir.display()
        ));
    } else if let Err(e) = remove_run_dir(&p.dir) {
        left.push(format!("{}: {e}", p.dir.display()));
    }
    left
}

/// Removes the run's directory of staging and target paths, never entering
/// another filesystem: a mount still below it is an error, not something
/// to delete files from.
fn remove_run_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    fn walk(dir: &Path, dev: u64) -> std::io::Result<()> {
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            let meta = std::fs::symlink_metadata(&path)?;
            if meta.dev() != dev {
                return Err(std::io::Error::other(format!(
                    "{} is still a mount",
                    path.display()
                )));
            }
            if meta.is_dir() {
                walk(&path, dev)?;
                std::fs::remove_dir(&path)?;
            } else {
                std::fs::remove_file(&path)?;
            }
        }
        Ok(())
    }
    let dev = match std::fs::symlink_metadata(dir) {
        Ok(m) => m.dev(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    walk(dir, dev)?;
    std::fs::remove_dir(dir)
}

fn run_threads(n: usize, work: impl Fn(usize) + Sync) {
    std::thread::scope(|s| {
        for t in 0..n {
            let work = &work;
            s.spawn(move || work(t));
        }
    });
}

fn report(args: &BenchArgs, rec: &Recorder, lifecycles: usize, elapsed: Duration) -> Report {
    let mut rpcs = BTreeMap::new();
    for (rpc, lat) in rec.latencies.lock().iter_mut() {
        lat.sort();
        rpcs.insert(
            (*rpc).to_owned(),
            RpcFigures {
                calls: lat.len(),
                p50_ms: percentile_ms(lat, 0.5),
                p90_ms: percentile_ms(lat, 0.9),
                p99_ms: percentile_ms(lat, 0.99),
            },
        );
    }
    let seconds = elapsed.as_secs_f64();
    Report {
        scenario: args.scenario,
        concurrency: args.concurrency,
        lifecycles,
        seconds,
        lifecycles_per_second: lifecycles as f64 / seconds.max(1e-9),
        rpcs,
        errors: rec.errors.lock().clone(),
        peak_rss_kib: args.pid.and_then(|pid| memory_kib(pid, "VmHWM")),
        cpu_ms_per_lifecycle: None,
        failed_calls: rec.failed.load(Ordering::SeqCst),
        left_behind: Vec::new(),
    }
}

/// Runs `filevol bench`, printing to `out`.
pub fn run(args: BenchArgs, out: &mut dyn std::io::Write) -> Result<(), OpsError> {
    let r = measure(&args)?;
    print_report(&args, &r, out)?;
    // A run that could not undo what it made has failed, however fast; so
    // has one whose calls the driver refused or failed.
    if !r.left_behind.is_empty() {
        Err(OpsError::LeftBehind(r.left_behind.len()))
    } else if r.failed_calls > 0 {
        Err(OpsError::CallsFailed(
            r.failed_calls,
            errors_text(&r.errors),
        ))
    } else {
        Ok(())
    }
}

fn print_report(
    args: &BenchArgs,
    r: &Report,
    out: &mut dyn std::io::Write,
) -> Result<(), OpsError> {
    let w =
        |out: &mut dyn std::io::Write, s: String| writeln!(out, "{s}").map_err(OpsError::Output);
    if args.json {
        return w(
            out,
            serde_json::to_string_pretty(r).expect("report serialises"),
        );
    }
    w(
        out,
        format!(
            "{:?} at concurrency {}: {} completed in {:.2} s ({:.1}/s)",
            r.scenario, r.concurrency, r.lifecycles, r.seconds, r.lifecycles_per_second
        ),
    )?;
    w(
        out,
        format!(
            "{:<28} {:>7} {:>9} {:>9} {:>9}",
            "RPC", "CALLS", "P50 ms", "P90 ms", "P99 ms"
        ),
    )?;
    for (rpc, f) in &r.rpcs {
        w(
            out,
            format!(
                "{rpc:<28} {:>7} {:>9.3} {:>9.3} {:>9.3}",
                f.calls, f.p50_ms, f.p90_ms, f.p99_ms
            ),
        )?;
    }
    for (what, n) in &r.errors {
        w(out, format!("errors: {what}: {n}"))?;
    }
    if let Some(kib) = r.peak_rss_kib {
        w(
            out,
            format!("peak RSS of the driver: {:.1} MiB", kib as f64 / 1024.0),
        )?;
    }
    if let Some(cpu) = &r.cpu_ms_per_lifecycle {
        let ms = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.2}"));
        w(
            out,
            format!(
                "CPU per completed cycle: driver {} ms, this client {:.2} ms, rest of the machine {} ms",
                ms(cpu.server),
                cpu.client,
                ms(cpu.other)
            ),
        )?;
    }
    for what in &r.left_behind {
        w(out, format!("left behind: {what}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failure(code: grpcio::RpcStatusCode) -> grpcio::Result<()> {
        Err(grpcio::Error::RpcFailure(grpcio::RpcStatus::new(code)))
    }

    #[test]
    fn busy_answers_are_asked_again_and_others_are_not() {
        use grpcio::RpcStatusCode as Code;
        for code in [Code::ABORTED, Code::UNAVAILABLE, Code::RESOURCE_EXHAUSTED] {
            assert!(retriable(&failure(code)), "{code:?}");
        }
        for code in [Code::INTERNAL, Code::NOT_FOUND, Code::FAILED_PRECONDITION] {
            assert!(!retriable(&failure(code)), "{code:?}");
        }
        assert!(!retriable(&Ok(())));
        // Asked again until the driver is no longer busy.
        let mut answers = vec![Ok(()), failure(Code::ABORTED), failure(Code::ABORTED)];
        let mut calls = 0;
        let r = retrying(|| {
            calls += 1;
            answers.pop().unwrap()
        });
        assert!(r.is_ok());
        assert_eq!(calls, 3);
    }

    #[test]
    fn the_run_directory_goes_whole_and_a_missing_one_is_fine() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("bench-1");
        std::fs::create_dir_all(run.join("pods/v-1/mount")).unwrap();
        std::fs::create_dir_all(run.join("staging/v-1")).unwrap();
        std::fs::write(run.join("pods/v-2-block"), b"").unwrap();
        remove_run_dir(&run).unwrap();
        assert!(!run.exists());
        remove_run_dir(&run).unwrap();
    }

    /// A mount left below the run's directory stops the removal: nothing is
    /// deleted from a volume that is still mounted.
    #[test]
    #[ignore = "needs root"]
    fn the_run_directory_is_never_removed_through_a_mount() {
        struct Unmount(PathBuf);
        impl Drop for Unmount {
            fn drop(&mut self) {
                let _ = filevol_core::sys::mount::unmount(&self.0);
            }
        }
        assert!(rustix::process::geteuid().is_root(), "this test needs root");
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("bench-2");
        let target = run.join("pods/v-1/mount");
        std::fs::create_dir_all(&target).unwrap();
        rustix::mount::mount(
            "tmpfs",
            &target,
            "tmpfs",
            rustix::mount::MountFlags::empty(),
            None,
        )
        .unwrap();
        let _unmount = Unmount(target.clone());
        std::fs::write(target.join("data"), b"keep").unwrap();
        let err = remove_run_dir(&run).unwrap_err();
        assert!(err.to_string().contains("still a mount"), "{err}");
        assert_eq!(std::fs::read(target.join("data")).unwrap(), b"keep");
    }
}
