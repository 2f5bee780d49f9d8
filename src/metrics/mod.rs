//! Prometheus metrics: per-RPC request counts by gRPC code and latency
//! histograms (recorded by the executor where each call's outcome is
//! logged), plus gauges read at scrape time (worker queue, pool capacity and
//! allocation, volumes staged and published on this node) and the usage of
//! directory volumes, measured off the scrape ([`dir_usage`]).

pub mod dir_usage;
pub mod health;
pub mod http;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use grpcio::RpcStatusCode;
use parking_lot::Mutex;

use crate::error::code_name;
use crate::rpc::Rpc;
use filevol_core::node::Node;
use filevol_core::pool::Pool;

/// Upper bounds of the latency buckets, in seconds: from a bind mount
/// (sub-millisecond) to an mkfs or a byte copy of a large image.
const BUCKETS: [f64; 14] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0,
];

#[derive(Debug, Default, Clone)]
struct Histogram {
    /// Counts per bucket (not cumulative; made cumulative when rendered).
    buckets: [u64; BUCKETS.len()],
    sum: f64,
    count: u64,
}

/// Counters and histograms of CSI calls.
#[derive(Debug, Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(String, &'static str), u64>>,
    latency: Mutex<BTreeMap<String, Histogram>>,
}

/// Values read at scrape time.
#[derive(Debug, Default, Clone)]
pub struct Gauges {
    /// Calls waiting for a worker.
    pub queued: usize,
    /// Workers running a call.
    pub busy: usize,
    /// Bytes the pool can still promise.
    pub pool_capacity: u64,
    /// Size of the pool filesystem.
    pub pool_size: u64,
    /// Free bytes on the pool filesystem.
    pub pool_free: u64,
    /// Size less free bytes of the pool filesystem.
    pub pool_used: u64,
    /// Bytes promised to volumes: their capacity.
    pub pool_provisioned: u64,
    /// What snapshots count as in capacity (the blocks they can come to
    /// own).
    pub pool_snapshot_bytes: u64,
    /// What the pool's formatted templates hold, counted in capacity.
    pub pool_template_bytes: u64,
    /// Bytes allocated by volumes' images (read now) and directories (as
    /// last measured, `dir_usage`).
    pub pool_allocated_volumes: u64,
    /// Bytes allocated by snapshots' images and directories.
    pub pool_allocated_snapshots: u64,
    /// Volumes in the pool.
    pub volumes: usize,
    /// Snapshots in the pool.
    pub snapshots: usize,
    /// Volumes staged on this node (`None` where the node is not served).
    pub staged: Option<usize>,
    /// Volume publishes on this node.
    pub published: Option<usize>,
    /// The directory volumes' figures in `pool_allocated_volumes`.
    pub dir_usage: dir_usage::DirUsageSummary,
}

/// The executor's load at scrape time.
#[derive(Debug, Default, Clone, Copy)]
pub struct Load {
    /// Calls waiting for a worker.
    pub queued: usize,
    /// Workers running a call.
    pub busy: usize,
}

impl Gauges {
    /// The gauges read now: the executor's `load`, the pool's figures from
    /// one [`filevol_core::pool::room::Usage`] (the one GetCapacity answers
    /// from, so they add up) and its allocation, the mounts of `node` where
    /// this process serves one, and `dirs`, what the background measurement
    /// of directory volumes last found ([`dir_usage`]): their trees are not
    /// walked here. A figure that cannot be read is logged and reported as
    /// 0.
    pub fn read(
        load: Load,
        pool: &Pool,
        node: Option<&Node>,
        dirs: &dir_usage::DirUsageSummary,
    ) -> Gauges {
        let usage = pool.usage().unwrap_or_else(|e| {
            log::warn!("metrics: pool usage: {e}");
            Default::default()
        });
        let allocation = pool.allocation().unwrap_or_else(|e| {
            log::warn!("metrics: pool allocation: {e}");
            Default::default()
        });
        let counts = node.map(|n| {
            n.mount_counts(pool).unwrap_or_else(|e| {
                log::warn!("metrics: mounts of the pool's volumes: {e}");
                (0, 0)
            })
        });
        Gauges {
            queued: load.queued,
            busy: load.busy,
            pool_capacity: usage.room(),
            pool_size: usage.fs_size,
            pool_free: usage.fs_free,
            pool_used: usage.fs_size.saturating_sub(usage.fs_free),
            pool_provisioned: usage.volume_bytes,
            pool_snapshot_bytes: usage.snapshot_bytes,
            pool_template_bytes: usage.template_bytes,
            pool_allocated_volumes: allocation.volume_images.saturating_add(dirs.bytes),
            pool_allocated_snapshots: allocation.snapshots,
            volumes: usage.volumes,
            snapshots: usage.snapshots,
            staged: counts.map(|c| c.0),
            published: counts.map(|c| c.1),
            dir_usage: dirs.clone(),
        }
    }
}

impl Metrics {
    /// The whole Prometheus exposition of a process: its call metrics, the
    /// gauges read now ([`Gauges::read`]), and where it serves a `node`,
    /// the node's trim counters and fences.
    pub fn exposition(
        &self,
        load: Load,
        pool: &Pool,
        node: Option<&Node>,
        dirs: &dir_usage::DirUsageSummary,
    ) -> String {
        let mut text = self.render(&Gauges::read(load, pool, node, dirs));
        if let Some(node) = node {
            render_trims(&mut text, node.trim_totals().read());
            render_fences(&mut text, node.custody_counts());
        }
        text
    }

    /// Counts one finished call.
    pub fn record(&self, rpc: Rpc, code: RpcStatusCode, elapsed: Duration) {
        let name = rpc.to_string();
        *self
            .requests
            .lock()
            .entry((name.clone(), code_name(code)))
            .or_insert(0) += 1;
        let secs = elapsed.as_secs_f64();
        let mut latency = self.latency.lock();
        let h = latency.entry(name).or_default();
        if let Some(i) = BUCKETS.iter().position(|b| secs <= *b) {
            h.buckets[i] += 1;
        }
        h.sum += secs;
        h.count += 1;
    }

    /// The Prometheus text exposition of everything.
    pub fn render(&self, g: &Gauges) -> String {
        let mut out = self.render_calls(Load {
            queued: g.queued,
            busy: g.busy,
        });
        render_pool(&mut out, g);
        out
    }

    /// The calls' counters and latencies and the workers' load: what does
    /// not read the pool, all a scrape carries while the pool does not
    /// answer.
    pub fn render_calls(&self, load: Load) -> String {
        let mut out = String::with_capacity(8192);
        out.push_str(
            "# HELP filevol_rpc_requests_total CSI calls answered, by RPC and gRPC status code.\n",
        );
        out.push_str("# TYPE filevol_rpc_requests_total counter\n");
        for ((rpc, code), n) in self.requests.lock().iter() {
            let _ = writeln!(
                out,
                "filevol_rpc_requests_total{{rpc=\"{rpc}\",code=\"{code}\"}} {n}"
            );
        }
        out.push_str(
            "# HELP filevol_rpc_duration_seconds Time from a call's arrival to its answer.\n",
        );
        out.push_str("# TYPE filevol_rpc_duration_seconds histogram\n");
        for (rpc, h) in self.latency.lock().iter() {
            let mut cumulative = 0;
            for (bound, n) in BUCKETS.iter().zip(h.buckets.iter()) {
                cumulative += n;
                let _ = writeln!(out, "filevol_rpc_duration_seconds_bucket{{rpc=\"{rpc}\",le=\"{bound}\"}} {cumulative}");
            }
            let _ = writeln!(
                out,
                "filevol_rpc_duration_seconds_bucket{{rpc=\"{rpc}\",le=\"+Inf\"}} {}",
                h.count
            );
            let _ = writeln!(
                out,
                "filevol_rpc_duration_seconds_sum{{rpc=\"{rpc}\"}} {}",
                h.sum
            );
            let _ = writeln!(
                out,
                "filevol_rpc_duration_seconds_count{{rpc=\"{rpc}\"}} {}",
                h.count
            );
        }
        for (name, help, value) in [
            (
                "filevol_worker_queue_depth",
                "Calls waiting for a worker.",
                load.queued,
            ),
            ("filevol_workers_busy", "Workers running a call.", load.busy),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
            );
        }
        out
    }
}

/// The pool's figures and this node's mounts, read at scrape time.
fn render_pool(out: &mut String, g: &Gauges) {
    {
        // A family with labels: its HELP and TYPE once, then a line per
        // label value. Written here, before the one-value gauges, because
        // the closure below holds `out` until the last of them.
        out.push_str(
            "# HELP filevol_pool_allocated_bytes Bytes the data of the pool's volumes (kind=\"volume\") and snapshots (kind=\"snapshot\") has allocated: st_blocks x 512 of each image, read at scrape time; of each directory snapshot's tree, walked once; of each directory volume's tree as last measured in the background (filevol_dir_usage_age_seconds), and only of the directory volumes this process measures (a node plugin: those mounted under its kubelet directory; a controller: all). Blocks a reflink shares count in each file that maps them, so the sum can exceed filevol_pool_used_bytes.\n# TYPE filevol_pool_allocated_bytes gauge\n",
        );
        let _ = writeln!(
            out,
            "filevol_pool_allocated_bytes{{kind=\"volume\"}} {}\nfilevol_pool_allocated_bytes{{kind=\"snapshot\"}} {}",
            g.pool_allocated_volumes, g.pool_allocated_snapshots
        );
        let d = &g.dir_usage;
        out.push_str(
            "# HELP filevol_dir_usage_volumes Directory volumes whose trees this process measures in the background (a node plugin: those mounted under its kubelet directory; a controller: every one in the pool), by the state of their figure: measured (the last walk was complete), partial (it stopped at its time or depth bound: the figure is a lower bound), pending (not walked yet: counted as 0).\n# TYPE filevol_dir_usage_volumes gauge\n",
        );
        let _ = writeln!(
            out,
            "filevol_dir_usage_volumes{{state=\"measured\"}} {}\nfilevol_dir_usage_volumes{{state=\"partial\"}} {}\nfilevol_dir_usage_volumes{{state=\"pending\"}} {}",
            d.measured, d.partial, d.pending
        );
        if let Some(age) = d.oldest {
            let _ = writeln!(
                out,
                "# HELP filevol_dir_usage_age_seconds Age of the oldest directory-volume figure in filevol_pool_allocated_bytes{{kind=\"volume\"}}: the trees are walked by a background thread, each again once its figure is --dir-usage-interval old, never at scrape time. Absent while no tree has been walked.\n# TYPE filevol_dir_usage_age_seconds gauge\nfilevol_dir_usage_age_seconds {:.3}",
                age.as_secs_f64()
            );
        }
        let mut gauge = |name: &str, help: &str, value: String| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
            );
        };
        gauge(
            "filevol_pool_capacity_bytes",
            "Bytes the pool can still promise to new volumes (GetCapacity): usable size x overcommit, less filevol_pool_provisioned_bytes, filevol_pool_snapshot_bytes, filevol_pool_template_bytes and creations in progress; above an overcommit of 1, at most the free bytes less the reserve.",
            g.pool_capacity.to_string(),
        );
        gauge(
            "filevol_pool_size_bytes",
            "Size of the pool filesystem.",
            g.pool_size.to_string(),
        );
        gauge(
            "filevol_pool_free_bytes",
            "Free bytes on the pool filesystem (statvfs, for an unprivileged writer).",
            g.pool_free.to_string(),
        );
        gauge(
            "filevol_pool_used_bytes",
            "Size less free bytes of the pool filesystem.",
            g.pool_used.to_string(),
        );
        gauge(
            "filevol_pool_provisioned_bytes",
            "Bytes promised to the pool's volumes: the sum of their capacity (snapshots are in filevol_pool_snapshot_bytes).",
            g.pool_provisioned.to_string(),
        );
        gauge(
            "filevol_pool_snapshot_bytes",
            "Bytes the pool's snapshots count for in capacity: the blocks each can come to own (its allocated bytes, at most its size), not its size.",
            g.pool_snapshot_bytes.to_string(),
        );
        gauge(
            "filevol_pool_template_bytes",
            "Bytes the pool's formatted templates (new ext4 volumes start as copies of them) hold, counted in capacity: their allocated bytes.",
            g.pool_template_bytes.to_string(),
        );
        gauge(
            "filevol_pool_volumes",
            "Volumes in the pool.",
            g.volumes.to_string(),
        );
        gauge(
            "filevol_pool_snapshots",
            "Snapshots in the pool.",
            g.snapshots.to_string(),
        );
        if let Some(n) = g.staged {
            gauge(
                "filevol_volumes_staged",
                "Volumes of the pool staged on this node: those with a mount under the kubelet directory, each counted once.",
                n.to_string(),
            );
        }
        if let Some(n) = g.published {
            gauge(
                "filevol_volumes_published",
                "Volume publishes on this node: every mount of a staged volume under the kubelet directory other than its stage, filesystem or block, wherever its target.",
                n.to_string(),
            );
        }
    }
}

/// The node's fences by who holds them, at the last check (see
/// `node::custody`): the device itself, this process (a device an older
/// filevol attached, or whose lock was lost and re-taken), or nobody this
/// node can prove (another holder has the image's lock: the volume is
/// reported abnormal and not staged or published again). Appended by node
/// plugins only.
pub fn render_fences(out: &mut String, counts: filevol_core::node::custody::CustodyCounts) {
    let name = "filevol_fences";
    let _ = writeln!(
        out,
        "# HELP {name} Loop devices of this node plugin by who holds their image's fence at the last check: the device itself (holder=\"device\", lasts as long as the device), this process (holder=\"process\", lasts while the plugin lives; unstage and stage again to mend), or nobody provable (holder=\"unproven\": another host may be writing the image; the volume is reported abnormal and not staged or published again).\n# TYPE {name} gauge"
    );
    for (holder, n) in [
        ("device", counts.device),
        ("process", counts.process),
        ("unproven", counts.unproven),
    ] {
        let _ = writeln!(out, "{name}{{holder=\"{holder}\"}} {n}");
    }
}

/// The node's trim counters (see `node::trim::TrimTotals::read`):
/// trims done, trims failed, bytes sent as discards, bytes the images'
/// allocation fell by. Appended to the exposition by node plugins only.
pub fn render_trims(
    out: &mut String,
    (trims, failures, discarded, reclaimed): (u64, u64, u64, u64),
) {
    let mut counter = |name: &str, help: &str, value: u64| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
        );
    };
    counter(
        "filevol_trims_total",
        "Trims (FITRIM) of staged volumes done, periodic and on demand.",
        trims,
    );
    counter(
        "filevol_trim_failures_total",
        "Trims of staged volumes that failed (the log says why).",
        failures,
    );
    counter(
        "filevol_trim_discarded_bytes_total",
        "Bytes trims sent to the volumes' devices as discards (free space walked, freed or not).",
        discarded,
    );
    counter(
        "filevol_trim_reclaimed_bytes_total",
        "Bytes by which trims reduced the images' allocation in the pool.",
        reclaimed,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counts_and_cumulative_buckets() {
        let m = Metrics::default();
        m.record(
            Rpc::CreateVolume,
            RpcStatusCode::OK,
            Duration::from_micros(800),
        );
        m.record(
            Rpc::CreateVolume,
            RpcStatusCode::OK,
            Duration::from_millis(20),
        );
        m.record(
            Rpc::CreateVolume,
            RpcStatusCode::ALREADY_EXISTS,
            Duration::from_micros(90),
        );
        let text = m.render(&Gauges {
            staged: Some(2),
            pool_provisioned: 1 << 30,
            pool_snapshot_bytes: 100 << 20,
            pool_allocated_volumes: 300 << 20,
            pool_allocated_snapshots: 100 << 20,
            pool_used: 5,
            ..Gauges::default()
        });
        assert!(
            text.contains("filevol_rpc_requests_total{rpc=\"CreateVolume\",code=\"OK\"} 2"),
            "{text}"
        );
        assert!(text.contains(
            "filevol_rpc_requests_total{rpc=\"CreateVolume\",code=\"ALREADY_EXISTS\"} 1"
        ));
        assert!(text
            .contains("filevol_rpc_duration_seconds_bucket{rpc=\"CreateVolume\",le=\"0.0001\"} 1"));
        assert!(text
            .contains("filevol_rpc_duration_seconds_bucket{rpc=\"CreateVolume\",le=\"0.001\"} 2"));
        assert!(text
            .contains("filevol_rpc_duration_seconds_bucket{rpc=\"CreateVolume\",le=\"+Inf\"} 3"));
        assert!(text.contains("filevol_volumes_staged 2"));
        for line in [
            "filevol_pool_provisioned_bytes 1073741824",
            "filevol_pool_snapshot_bytes 104857600",
            "filevol_pool_allocated_bytes{kind=\"volume\"} 314572800",
            "filevol_pool_allocated_bytes{kind=\"snapshot\"} 104857600",
            "filevol_pool_used_bytes 5",
            "# TYPE filevol_pool_allocated_bytes gauge",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing:\n{text}");
        }
        // One HELP and TYPE per family, whatever its labels.
        assert_eq!(
            text.matches("# TYPE filevol_pool_allocated_bytes ").count(),
            1
        );
        assert!(!text.contains("filevol_volumes_published"));
        // No directory volume walked yet: no age to give.
        assert!(text
            .lines()
            .any(|l| l == "filevol_dir_usage_volumes{state=\"measured\"} 0"));
        assert!(!text.contains("# TYPE filevol_dir_usage_age_seconds"));
    }

    #[test]
    fn directory_usage_is_served_with_its_state_and_age() {
        let text = Metrics::default().render(&Gauges {
            pool_allocated_volumes: 4096,
            dir_usage: dir_usage::DirUsageSummary {
                bytes: 4096,
                measured: 2,
                partial: 1,
                pending: 3,
                oldest: Some(Duration::from_millis(1500)),
            },
            ..Gauges::default()
        });
        for line in [
            "# TYPE filevol_dir_usage_volumes gauge",
            "filevol_dir_usage_volumes{state=\"measured\"} 2",
            "filevol_dir_usage_volumes{state=\"partial\"} 1",
            "filevol_dir_usage_volumes{state=\"pending\"} 3",
            "# TYPE filevol_dir_usage_age_seconds gauge",
            "filevol_dir_usage_age_seconds 1.500",
            "filevol_pool_allocated_bytes{kind=\"volume\"} 4096",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing:\n{text}");
        }
        assert_eq!(
            text.matches("# HELP filevol_dir_usage_age_seconds ")
                .count(),
            1
        );
    }

    #[test]
    fn the_exposition_reads_the_pool_and_leaves_out_what_no_node_has() {
        let dir = tempfile::tempdir().unwrap();
        let pool = Pool::open(
            dir.path(),
            filevol_core::pool::PoolOptions {
                reserve_bytes: 0,
                overcommit: 1.0,
                topology: BTreeMap::new(),
                janitor: false,
            },
        )
        .unwrap();
        let dirs = dir_usage::DirUsageSummary {
            bytes: 4096,
            ..Default::default()
        };
        let text = Metrics::default().exposition(Load { queued: 3, busy: 2 }, &pool, None, &dirs);
        for line in [
            "filevol_worker_queue_depth 3",
            "filevol_workers_busy 2",
            "filevol_pool_volumes 0",
            "filevol_pool_allocated_bytes{kind=\"volume\"} 4096",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing:\n{text}");
        }
        for family in [
            "filevol_volumes_staged",
            "filevol_trims_total",
            "filevol_fences",
        ] {
            assert!(!text.contains(family), "{family} without a node:\n{text}");
        }
    }

    #[test]
    fn trim_counters_are_counters() {
        let mut text = String::new();
        render_trims(&mut text, (3, 1, 4096, 2048));
        for line in [
            "# TYPE filevol_trims_total counter",
            "filevol_trims_total 3",
            "filevol_trim_failures_total 1",
            "filevol_trim_discarded_bytes_total 4096",
            "filevol_trim_reclaimed_bytes_total 2048",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in {text}");
        }
    }
}
