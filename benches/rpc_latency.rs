//! Round-trip latency and throughput of the gRPC front end, and the idle
//! footprint of `filevol serve`.
//!
//! Run: `cargo bench --bench rpc_latency` (release build; prints a Markdown
//! table for the book, docs/src/performance.md). It starts the real binary on a temporary socket and
//! pool and measures, over the UNIX socket:
//! - Probe: answered on the probe lane;
//! - GetPluginInfo: handed to the worker pool and answered from a worker,
//!   so it pays the full hand-off (completion queue -> crossbeam channel ->
//!   worker -> oneshot -> completion queue);
//! - calls/s with several client threads on their own connections;
//! - the server's resident memory when idle and after the load;
//! - start-up: from spawning `filevol serve` to its first answered Probe.
//!
//! Environment: `BENCH_CALLS` (sequential calls per RPC, default 20000),
//! `BENCH_THREADS` (client threads for the throughput run, default 8),
//! `BENCH_STARTS` (start-ups timed, default 20).

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

use std::sync::Arc;
use std::time::{Duration, Instant};

use filevol::ops::stats::{memory_kib, percentile};
use filevol::proto::csi;
use filevol::proto::grpc::IdentityClient;
use filevol_kit::driver::{Driver, Opts};
use grpcio::{ChannelBuilder, EnvBuilder, Environment};

const NO_SUCH_METHOD: grpcio::Method<csi::ProbeRequest, csi::ProbeResponse> = grpcio::Method {
    ty: grpcio::MethodType::Unary,
    name: "/csi.v1.Identity/NoSuchMethod",
    req_mar: grpcio::Marshaller {
        ser: grpcio::pb_ser,
        de: grpcio::pb_de,
    },
    resp_mar: grpcio::Marshaller {
        ser: grpcio::pb_ser,
        de: grpcio::pb_de,
    },
};

fn client(env: &Arc<Environment>, address: &str) -> IdentityClient {
    // A local subchannel pool gives each client its own connection, as
    // separate sidecars would have.
    let channel = ChannelBuilder::new(Arc::clone(env))
        .use_local_subchannel_pool(true)
        .connect(address);
    IdentityClient::new(channel)
}

fn rss_kib(pid: u32) -> u64 {
    memory_kib(pid, "VmRSS").expect("VmRSS in /proc/pid/status")
}

/// The `q` quantile of `sorted` in microseconds.
fn us(sorted: &[Duration], q: f64) -> f64 {
    percentile(sorted, q).expect("samples").as_secs_f64() * 1e6
}

/// Times `calls` sequential calls of `f` after a warm-up.
fn latencies(calls: usize, mut f: impl FnMut()) -> Vec<Duration> {
    for _ in 0..calls / 10 {
        f();
    }
    let mut out = Vec::with_capacity(calls);
    for _ in 0..calls {
        let t = Instant::now();
        f();
        out.push(t.elapsed());
    }
    out.sort();
    out
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` passes nothing
    // and only wants to know the target builds and starts.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let calls = env_usize("BENCH_CALLS", 20_000);
    let threads = env_usize("BENCH_THREADS", 8);
    let starts = env_usize("BENCH_STARTS", 20);
    let mut startup: Vec<Duration> = (0..starts).map(|_| time_to_first_probe()).collect();
    startup.sort();
    // Started once it answers Probe; let it settle before reading its RSS.
    let server = Driver::start_with(
        env!("CARGO_BIN_EXE_filevol"),
        Opts::default().args(&["--node-id", "bench", "--log-level", "warn"]),
    );
    let address = server.address();
    let env = Arc::new(EnvBuilder::new().cq_count(1).build());
    let c = client(&env, &address);
    std::thread::sleep(Duration::from_secs(1));
    let idle_rss = rss_kib(server.pid());

    let probe = latencies(calls, || {
        c.probe(&csi::ProbeRequest::new()).unwrap();
    });
    let info = latencies(calls, || {
        c.get_plugin_info(&csi::GetPluginInfoRequest::new())
            .unwrap();
    });

    // The floor: a method the server does not have, answered UNIMPLEMENTED
    // by gRPC core on its own thread, with no filevol code and no hand-off.
    let raw = grpcio::Client::new(
        ChannelBuilder::new(Arc::clone(&env))
            .use_local_subchannel_pool(true)
            .connect(&address),
    );
    let floor = latencies(calls, || {
        let r = raw.unary_call(
            &NO_SUCH_METHOD,
            &csi::ProbeRequest::new(),
            Default::default(),
        );
        assert!(r.is_err());
    });

    let per_thread = calls / threads.max(1);
    let started = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let c = client(&env, &address);
            std::thread::spawn(move || {
                for _ in 0..per_thread {
                    c.get_plugin_info(&csi::GetPluginInfoRequest::new())
                        .unwrap();
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let rate = (per_thread * threads) as f64 / started.elapsed().as_secs_f64();
    let loaded_rss = rss_kib(server.pid());

    println!("| measure | value |");
    println!("|---|---|");
    println!(
        "| Probe round trip p50 / p99 (probe lane, {calls} calls) | {:.0} us / {:.0} us |",
        us(&probe, 0.5),
        us(&probe, 0.99)
    );
    println!(
        "| GetPluginInfo round trip p50 / p99 (worker pool, {calls} calls) | {:.0} us / {:.0} us |",
        us(&info, 0.5),
        us(&info, 0.99)
    );
    println!(
        "| floor: unknown method answered inline by gRPC core, p50 / p99 | {:.0} us / {:.0} us |",
        us(&floor, 0.5),
        us(&floor, 0.99)
    );
    println!("| GetPluginInfo throughput, {threads} client threads | {rate:.0} calls/s |");
    println!(
        "| server RSS idle / after the load | {:.1} MiB / {:.1} MiB |",
        idle_rss as f64 / 1024.0,
        loaded_rss as f64 / 1024.0
    );
    println!(
        "| exec to first answered Probe p50 / max ({starts} starts) | {:.1} ms / {:.1} ms |",
        us(&startup, 0.5) / 1000.0,
        us(&startup, 1.0) / 1000.0
    );
}

/// From spawning `filevol serve` (mode all, a new pool) to the first Probe
/// it answers ready. Polls every millisecond, each time on a fresh channel:
/// a channel that found no listener backs off for a second, which would
/// be measured instead of the server.
fn time_to_first_probe() -> Duration {
    let env = Arc::new(EnvBuilder::new().cq_count(1).build());
    let started = Instant::now();
    let server = Driver::spawn(
        env!("CARGO_BIN_EXE_filevol"),
        Opts::default().args(&["--node-id", "bench", "--log-level", "warn"]),
    );
    let deadline = started + Duration::from_secs(20);
    while Instant::now() < deadline {
        if server.socket.exists() {
            let opt = grpcio::CallOption::default().timeout(Duration::from_millis(200));
            let probe = client(&env, &server.address()).probe_opt(&csi::ProbeRequest::new(), opt);
            if probe.is_ok_and(|r| r.ready.value) {
                return started.elapsed();
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    panic!("filevol did not answer Probe within 20 s");
}
