//! The health metrics: the pool's findings, each unhealthy volume's, and
//! the I/O every volume's loop device did, for alerts and for finding a
//! noisy neighbour.
//!
//! The findings come from the same functions the CSI health answers do
//! (`crate::health`), so an alert and `kubectl describe` agree. The I/O
//! figures are the kernel's own counters of each loop device
//! (`/sys/block/loopN/stat`): one small read per device, whatever the
//! volume holds.

use std::fmt::Write as _;

use filevol_core::health::{Health, Reason, Severity};
use filevol_core::sys::blockstat::IoStat;

/// One volume's findings, for [`render`].
pub type VolumeFindings = (String, Health);

/// What the health section of the exposition is made of.
#[derive(Debug, Default, Clone)]
pub struct HealthGauges {
    /// The pool's findings.
    pub pool: Health,
    /// What the volumes may still write, and what the pool can still hold
    /// beyond the reserve (bytes), from the last probe.
    pub owed_and_writable: Option<(u64, u64)>,
    /// Every unhealthy volume this process looks at, with its findings.
    pub volumes: Vec<VolumeFindings>,
    /// How many volumes were looked at.
    pub looked_at: usize,
    /// Per-volume I/O of this node's loop devices, as (volume, counters).
    pub io: Vec<(String, IoStat)>,
    /// When this process started (seconds since the epoch).
    pub started: f64,
}

/// Escapes a label value (ids are validated, but a label must never break
/// the exposition).
fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Appends the health section to `out`.
pub fn render(out: &mut String, g: &HealthGauges) {
    let _ = writeln!(
        out,
        "# HELP filevol_start_time_seconds When this process started, in seconds since the epoch (a change is a restart).\n# TYPE filevol_start_time_seconds gauge\nfilevol_start_time_seconds {:.3}",
        g.started
    );
    let _ = writeln!(
        out,
        "# HELP filevol_pool_health Whether the pool has a finding of each reason now (1) or not (0): pool_low_space (free space at or below the reserve), pool_out_of_space (next to nothing free: thin volumes' writes into new blocks fail now), pool_overcommitted (the volumes may write more than the pool can still hold), pool_unreachable (a read of the pool did not answer within --health-interval, or failed).\n# TYPE filevol_pool_health gauge"
    );
    for reason in [
        Reason::PoolLowSpace,
        Reason::PoolOutOfSpace,
        Reason::PoolOvercommitted,
        Reason::PoolUnreachable,
    ] {
        let _ = writeln!(
            out,
            "filevol_pool_health{{reason=\"{reason}\"}} {}",
            u8::from(g.pool.has(reason))
        );
    }
    if let Some((owed, writable)) = g.owed_and_writable {
        let _ = writeln!(
            out,
            "# HELP filevol_pool_unwritten_bytes What the pool's volumes may still write: their capacity less what their images hold (at the last health probe).\n# TYPE filevol_pool_unwritten_bytes gauge\nfilevol_pool_unwritten_bytes {owed}\n# HELP filevol_pool_writable_bytes What the pool filesystem can still hold beyond the reserve (at the last health probe). Below filevol_pool_unwritten_bytes, writes will fail before the volumes are full.\n# TYPE filevol_pool_writable_bytes gauge\nfilevol_pool_writable_bytes {writable}"
        );
    }
    let _ = writeln!(
        out,
        "# HELP filevol_volumes_unhealthy Volumes this process looks at (a node plugin: those with a loop device here; a controller: all) by their worst finding.\n# TYPE filevol_volumes_unhealthy gauge"
    );
    for severity in [Severity::Degraded, Severity::Inaccessible] {
        let n = g
            .volumes
            .iter()
            .filter(|(_, h)| h.worst() == Some(severity))
            .count();
        let _ = writeln!(
            out,
            "filevol_volumes_unhealthy{{severity=\"{}\"}} {n}",
            severity.as_str()
        );
    }
    let _ = writeln!(
        out,
        "# HELP filevol_volumes_checked Volumes whose health this process checked for this scrape.\n# TYPE filevol_volumes_checked gauge\nfilevol_volumes_checked {}",
        g.looked_at
    );
    let _ = writeln!(
        out,
        "# HELP filevol_volume_health A finding about a volume: present (1) while it lasts, absent once it clears. The reason is stable (see docs/src/health.md); severity is degraded or inaccessible.\n# TYPE filevol_volume_health gauge"
    );
    for (id, h) in &g.volumes {
        for f in &h.findings {
            let _ = writeln!(
                out,
                "filevol_volume_health{{volume=\"{}\",reason=\"{}\",severity=\"{}\"}} 1",
                label(id),
                f.reason,
                f.severity().as_str()
            );
        }
    }
    render_io(out, &g.io);
}

/// The per-volume I/O counters of this node's loop devices.
fn render_io(out: &mut String, io: &[(String, IoStat)]) {
    type Field = fn(&IoStat) -> f64;
    #[allow(clippy::cast_precision_loss)]
    let series: [(&str, &str, &str, Field); 10] = [
        ("filevol_volume_reads_total", "counter", "Reads the volume's loop device completed.", |s| s.reads as f64),
        ("filevol_volume_writes_total", "counter", "Writes the volume's loop device completed.", |s| s.writes as f64),
        ("filevol_volume_read_bytes_total", "counter", "Bytes the volume's loop device read.", |s| (s.read_sectors * 512) as f64),
        ("filevol_volume_written_bytes_total", "counter", "Bytes the volume's loop device wrote.", |s| (s.write_sectors * 512) as f64),
        ("filevol_volume_read_seconds_total", "counter", "Time the volume's reads took, summed over requests (divide by reads for the mean latency).", |s| s.read_ms as f64 / 1000.0),
        ("filevol_volume_write_seconds_total", "counter", "Time the volume's writes took, summed over requests.", |s| s.write_ms as f64 / 1000.0),
        ("filevol_volume_io_busy_seconds_total", "counter", "Time the volume's loop device had requests in flight (its utilisation, as a rate).", |s| s.io_ms as f64 / 1000.0),
        ("filevol_volume_discards_total", "counter", "Discards (trims) the volume's loop device completed.", |s| s.discards as f64),
        ("filevol_volume_flushes_total", "counter", "Flushes the volume's loop device completed.", |s| s.flushes as f64),
        ("filevol_volume_io_in_flight", "gauge", "Requests in flight on the volume's loop device now.", |s| s.in_flight as f64),
    ];
    for (name, kind, help, value) in series {
        let _ = writeln!(
            out,
            "# HELP {name} {help} From the kernel's counters (/sys/block/loopN/stat) of this node's loop device; they start at 0 when the device is attached.\n# TYPE {name} {kind}"
        );
        for (id, stat) in io {
            let _ = writeln!(out, "{name}{{volume=\"{}\"}} {}", label(id), value(stat));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use filevol_core::health::Finding;

    #[test]
    fn findings_counts_and_io_are_rendered_with_their_types() {
        let mut pool = Health::ok();
        pool.add(Finding::new(Reason::PoolLowSpace, "x"));
        let mut sick = Health::ok();
        sick.add(Finding::new(Reason::FilesystemReadOnly, "ro"));
        sick.add(Finding::new(Reason::LoopIoErrors, "eio"));
        let g = HealthGauges {
            pool,
            owed_and_writable: Some((10, 4)),
            volumes: vec![("pvc-1".into(), sick)],
            looked_at: 3,
            io: vec![(
                "pvc-1".into(),
                IoStat {
                    reads: 5,
                    write_sectors: 8,
                    write_ms: 1500,
                    in_flight: 2,
                    ..IoStat::default()
                },
            )],
            started: 12.5,
        };
        let mut text = String::new();
        render(&mut text, &g);
        for want in [
            "filevol_pool_health{reason=\"pool_low_space\"} 1",
            "filevol_pool_health{reason=\"pool_unreachable\"} 0",
            "filevol_pool_health{reason=\"pool_out_of_space\"} 0",
            "filevol_pool_unwritten_bytes 10",
            "filevol_pool_writable_bytes 4",
            "filevol_volumes_unhealthy{severity=\"degraded\"} 1",
            "filevol_volumes_unhealthy{severity=\"inaccessible\"} 0",
            "filevol_volumes_checked 3",
            "filevol_volume_health{volume=\"pvc-1\",reason=\"filesystem_read_only\",severity=\"degraded\"} 1",
            "filevol_volume_health{volume=\"pvc-1\",reason=\"loop_io_errors\",severity=\"degraded\"} 1",
            "# TYPE filevol_volume_reads_total counter",
            "filevol_volume_reads_total{volume=\"pvc-1\"} 5",
            "filevol_volume_written_bytes_total{volume=\"pvc-1\"} 4096",
            "filevol_volume_write_seconds_total{volume=\"pvc-1\"} 1.5",
            "# TYPE filevol_volume_io_in_flight gauge",
            "filevol_volume_io_in_flight{volume=\"pvc-1\"} 2",
            "filevol_start_time_seconds 12.500",
        ] {
            assert!(text.lines().any(|l| l == want), "{want} missing in:\n{text}");
        }
    }

    #[test]
    fn a_label_cannot_break_the_exposition() {
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
