//! `filevol pool ls`: what a pool holds, read straight from its metadata
//! files without changing anything (no scratch, no clean-up), as a table or
//! as JSON, with the totals capacity is made of.
//!
//! The figures are the driver's own: allocated bytes and what a snapshot
//! counts as come from [`filevol_core::pool::capacity`], the functions GetCapacity
//! and the metrics use. What it cannot show is the room GetCapacity
//! reports: that depends on `filevol serve`'s `--reserve` and
//! `--overcommit`, which a reader of the pool does not know, so the report
//! says so rather than guess.

use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use serde::Serialize;

use super::OpsError;
use filevol_core::pool::attachments::Attachments;
use filevol_core::pool::capacity::allocated;
use filevol_core::pool::error::io_error;
use filevol_core::pool::room::snapshot_counts;
use filevol_core::sys::fs as sysfs;
use filevol_core::units::human;
use filevol_core::volume::meta::{SnapshotMeta, VolumeMeta};

/// Flags of `filevol pool`.
#[derive(Debug, Args)]
pub struct PoolArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: PoolCommand,
}

/// `filevol pool` subcommands.
#[derive(Debug, Subcommand)]
pub enum PoolCommand {
    /// Volumes (size, allocated bytes, attachments, snapshots), snapshots
    /// (allocated bytes, what capacity counts them as) and the pool's totals.
    Ls {
        /// The pool directory. Default: the one `filevol serve` uses when
        /// given none (/var/lib/filevol as root).
        #[arg(long, env = "FILEVOL_POOL")]
        pool: Option<PathBuf>,
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// One volume in the report.
#[derive(Debug, Serialize)]
pub struct VolumeRow {
    /// Volume id.
    pub id: String,
    /// CreateVolume name.
    pub name: String,
    /// `image` or `dir`.
    pub layout: String,
    /// Filesystem, or `block`/`-`.
    pub kind: String,
    /// Promised size: what capacity counts the volume as.
    pub capacity_bytes: u64,
    /// Bytes its data (image or directory tree, not its record) has
    /// allocated on the pool: `st_blocks` x 512.
    pub allocated_bytes: u64,
    /// Nodes it is attached to.
    pub attached_to: Vec<String>,
    /// Snapshots taken of it.
    pub snapshots: usize,
    /// What of it cannot be read (its metadata, its data's allocation), if
    /// anything.
    pub problem: Option<String>,
}

/// One snapshot in the report.
#[derive(Debug, Serialize)]
pub struct SnapshotRow {
    /// Snapshot id.
    pub id: String,
    /// Source volume.
    pub source_volume_id: String,
    /// The source's size.
    pub size_bytes: u64,
    /// Bytes its data has allocated (blocks a reflink shares with its
    /// source count in full, as `st_blocks` does).
    pub allocated_bytes: u64,
    /// What capacity counts it as: the blocks it can come to own.
    pub counted_bytes: u64,
    /// `reflink` or `sparse`.
    pub method: String,
    /// Group snapshot, if any.
    pub group_id: Option<String>,
    /// What of it cannot be read (its metadata, its data's allocation), if
    /// anything: such a snapshot is listed, not left out.
    pub problem: Option<String>,
}

/// The whole report.
#[derive(Debug, Serialize)]
pub struct Report {
    /// The pool directory.
    pub pool: PathBuf,
    /// Volumes by id.
    pub volumes: Vec<VolumeRow>,
    /// Snapshots by id.
    pub snapshots: Vec<SnapshotRow>,
    /// The pool as a whole.
    pub totals: Totals,
}

/// The pool's totals: its filesystem, and what volumes and snapshots count
/// for and have allocated.
#[derive(Debug, Serialize)]
pub struct Totals {
    /// Size of the pool filesystem.
    pub filesystem_size_bytes: u64,
    /// Size less free bytes.
    pub filesystem_used_bytes: u64,
    /// Free bytes (statvfs, for an unprivileged writer).
    pub filesystem_free_bytes: u64,
    /// Volumes whose record could be read.
    pub volumes: usize,
    /// Their capacity: what they were promised.
    pub provisioned_bytes: u64,
    /// Snapshots whose record could be read.
    pub snapshots: usize,
    /// What capacity counts them as.
    pub snapshot_counted_bytes: u64,
    /// What volumes' data has allocated.
    pub volume_allocated_bytes: u64,
    /// What snapshots' data has allocated.
    pub snapshot_allocated_bytes: u64,
    /// Why the room GetCapacity reports is not shown.
    pub capacity_note: &'static str,
}

/// Why `pool ls` shows no room.
const CAPACITY_NOTE: &str = "the room GetCapacity reports is (size - reserve) x overcommit, less provisioned, less counted for snapshots, less creations in progress (above an overcommit of 1, at most free - reserve); --reserve and --overcommit are filevol serve's flags, which pool ls does not know";

/// Bytes the data in `dir` has allocated. What cannot be read counts as
/// nothing in the figures (the report shows the pool as it can be read) and
/// is said in `problems`, never passed over as if it were not there.
fn allocated_or_zero(dir: &Path, problems: &mut Vec<String>) -> u64 {
    allocated(dir).unwrap_or_else(|e| {
        problems.push(format!("allocated bytes cannot be read: {e}"));
        0
    })
}

/// `problems` joined, or `None`.
fn problem(problems: Vec<String>) -> Option<String> {
    (!problems.is_empty()).then(|| problems.join("; "))
}

fn entries(dir: &Path) -> Result<Vec<(String, PathBuf)>, OpsError> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_error("read directory", dir))? {
        let entry = entry.map_err(io_error("read directory", dir))?;
        if let Ok(name) = entry.file_name().into_string() {
            if !name.starts_with('.') {
                out.push((name, entry.path()));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Whether `path` is a directory; one that cannot be looked at is an error
/// (with its cause), not "not a pool".
fn is_dir(path: &Path) -> Result<bool, OpsError> {
    let found = sysfs::metadata_if_present(path).map_err(io_error("stat", path))?;
    Ok(found.is_some_and(|m| m.is_dir()))
}

/// The record in `dir`, or why it cannot be read.
fn record<T: serde::de::DeserializeOwned>(dir: &Path) -> Result<T, String> {
    let path = dir.join("meta.json");
    let bytes = std::fs::read(&path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => "metadata missing".to_owned(),
        _ => format!("metadata cannot be read: {e}"),
    })?;
    serde_json::from_slice(&bytes).map_err(|e| format!("metadata damaged: {e}"))
}

/// Reads the pool at `root`. A directory without the pool's layout is
/// refused with that said, not read as an empty pool.
pub fn read(root: &Path) -> Result<Report, OpsError> {
    if !is_dir(&root.join("volumes"))? || !is_dir(&root.join("snapshots"))? {
        return Err(OpsError::NotAPool(root.to_owned()));
    }
    let mut snapshots = Vec::new();
    // Snapshots and volumes whose record could be read.
    let (mut snapshots_read, mut volumes_read) = (0, 0);
    for (id, dir) in entries(&root.join("snapshots"))? {
        let mut problems = Vec::new();
        let row = match record::<SnapshotMeta>(&dir) {
            Ok(s) => {
                snapshots_read += 1;
                let allocated_bytes = allocated_or_zero(&dir, &mut problems);
                SnapshotRow {
                    id,
                    counted_bytes: snapshot_counts(&s, allocated_bytes),
                    source_volume_id: s.source_volume_id,
                    size_bytes: s.size_bytes,
                    allocated_bytes,
                    method: format!("{:?}", s.method).to_lowercase(),
                    group_id: s.group_id,
                    problem: problem(problems),
                }
            }
            Err(why) => {
                let allocated_bytes = allocated_or_zero(&dir, &mut problems);
                problems.insert(0, why);
                SnapshotRow {
                    id,
                    counted_bytes: 0,
                    source_volume_id: String::new(),
                    size_bytes: 0,
                    allocated_bytes,
                    method: String::new(),
                    group_id: None,
                    problem: problem(problems),
                }
            }
        };
        snapshots.push(row);
    }
    let attached = Attachments::read(root)?;
    let mut volumes = Vec::new();
    for (id, dir) in entries(&root.join("volumes"))? {
        let mut problems = Vec::new();
        let row = match record::<VolumeMeta>(&dir) {
            Ok(v) => {
                volumes_read += 1;
                VolumeRow {
                    attached_to: attached.of(&v).into_iter().map(|a| a.node_id).collect(),
                    snapshots: snapshots
                        .iter()
                        .filter(|s| s.source_volume_id == id)
                        .count(),
                    id,
                    name: v.name,
                    layout: format!("{:?}", v.layout).to_lowercase(),
                    kind: match (v.access, v.fs_type) {
                        (filevol_core::volume::meta::AccessType::Block, _) => "block".into(),
                        (_, Some(fs)) => fs.as_str().into(),
                        (_, None) => "-".into(),
                    },
                    capacity_bytes: v.capacity_bytes,
                    allocated_bytes: allocated_or_zero(&dir, &mut problems),
                    problem: problem(problems),
                }
            }
            Err(why) => {
                let allocated_bytes = allocated_or_zero(&dir, &mut problems);
                problems.insert(0, why);
                VolumeRow {
                    id,
                    name: String::new(),
                    layout: String::new(),
                    kind: String::new(),
                    capacity_bytes: 0,
                    allocated_bytes,
                    attached_to: Vec::new(),
                    snapshots: 0,
                    problem: problem(problems),
                }
            }
        };
        volumes.push(row);
    }
    let space = sysfs::space(root).map_err(io_error("statvfs", root))?;
    let totals = Totals {
        filesystem_size_bytes: space.total,
        filesystem_used_bytes: space.total.saturating_sub(space.available),
        filesystem_free_bytes: space.available,
        volumes: volumes_read,
        // A volume whose record cannot be read has a capacity of 0 here.
        provisioned_bytes: volumes.iter().map(|v| v.capacity_bytes).sum(),
        snapshots: snapshots_read,
        snapshot_counted_bytes: snapshots.iter().map(|s| s.counted_bytes).sum(),
        volume_allocated_bytes: volumes.iter().map(|v| v.allocated_bytes).sum(),
        snapshot_allocated_bytes: snapshots.iter().map(|s| s.allocated_bytes).sum(),
        capacity_note: CAPACITY_NOTE,
    };
    Ok(Report {
        pool: root.to_owned(),
        volumes,
        snapshots,
        totals,
    })
}

/// Runs `filevol pool ...`, writing to `out`.
pub fn run(args: PoolArgs, out: &mut dyn std::io::Write) -> Result<(), OpsError> {
    let PoolCommand::Ls { pool, json } = args.command;
    let pool = pool.unwrap_or_else(crate::config::default_pool);
    let report = read(&pool)?;
    let w =
        |out: &mut dyn std::io::Write, s: String| writeln!(out, "{s}").map_err(OpsError::Output);
    if json {
        return w(
            out,
            serde_json::to_string_pretty(&report).expect("report serialises"),
        );
    }
    w(
        out,
        format!(
            "{:<44} {:<6} {:<6} {:>10} {:>10} {:<16} {:>5}  NAME",
            "VOLUME", "LAYOUT", "KIND", "SIZE", "ALLOCATED", "ATTACHED", "SNAPS"
        ),
    )?;
    for v in &report.volumes {
        let attached = if v.attached_to.is_empty() {
            "-".to_owned()
        } else {
            v.attached_to.join(",")
        };
        w(
            out,
            format!(
                "{:<44} {:<6} {:<6} {:>10} {:>10} {:<16} {:>5}  {}{}",
                v.id,
                v.layout,
                v.kind,
                human(v.capacity_bytes),
                human(v.allocated_bytes),
                attached,
                v.snapshots,
                v.name,
                v.problem
                    .as_deref()
                    .map(|p| format!("  ({p})"))
                    .unwrap_or_default()
            ),
        )?;
    }
    w(out, String::new())?;
    w(
        out,
        format!(
            "{:<44} {:<44} {:>10} {:>10} {:>10} {:<8} GROUP",
            "SNAPSHOT", "SOURCE", "SIZE", "ALLOCATED", "COUNTED", "METHOD"
        ),
    )?;
    for s in &report.snapshots {
        w(
            out,
            format!(
                "{:<44} {:<44} {:>10} {:>10} {:>10} {:<8} {}{}",
                s.id,
                s.source_volume_id,
                human(s.size_bytes),
                human(s.allocated_bytes),
                human(s.counted_bytes),
                s.method,
                s.group_id.as_deref().unwrap_or("-"),
                s.problem
                    .as_deref()
                    .map(|p| format!("  ({p})"))
                    .unwrap_or_default()
            ),
        )?;
    }
    w(out, String::new())?;
    for line in summary(&report.totals) {
        w(out, line)?;
    }
    Ok(())
}

/// The pool summary after the tables.
fn summary(t: &Totals) -> Vec<String> {
    vec![
        format!(
            "filesystem  {} size, {} used, {} free",
            human(t.filesystem_size_bytes),
            human(t.filesystem_used_bytes),
            human(t.filesystem_free_bytes)
        ),
        format!(
            "volumes     {}: {} provisioned (their capacity), {} allocated",
            t.volumes,
            human(t.provisioned_bytes),
            human(t.volume_allocated_bytes)
        ),
        format!(
            "snapshots   {}: {} counted (the blocks they can come to own), {} allocated",
            t.snapshots,
            human(t.snapshot_counted_bytes),
            human(t.snapshot_allocated_bytes)
        ),
        "            (blocks a reflink shares count in each file that maps them, so allocated can exceed used)".to_owned(),
        format!("room        not shown: {}", t.capacity_note),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_cannot_be_read_is_listed_with_its_cause() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for d in ["volumes", "snapshots"] {
            std::fs::create_dir(root.join(d)).unwrap();
        }
        // A snapshot whose directory is a file: ENOTDIR on its record.
        std::fs::write(root.join("snapshots/s1"), b"").unwrap();
        // A volume whose data cannot be looked at.
        std::fs::create_dir(root.join("volumes/v1")).unwrap();
        std::fs::write(root.join("volumes/v1/meta.json"), b"{torn").unwrap();
        let report = {
            let _eio = filevol_core::faults::inject_eio("volumes/v1/image", 0);
            read(root).unwrap()
        };
        let s = &report.snapshots[0];
        assert_eq!(s.id, "s1");
        let problem = s.problem.as_deref().unwrap();
        assert!(
            problem.starts_with("metadata cannot be read: "),
            "{problem}"
        );
        assert_eq!(report.totals.snapshots, 0);
        let problem = report.volumes[0].problem.as_deref().unwrap();
        assert!(problem.starts_with("metadata damaged: "), "{problem}");
        assert!(
            problem.contains("allocated bytes cannot be read: Input/output error"),
            "{problem}"
        );
        // A layout that cannot be looked at is an error, not "not a pool".
        let _eio = filevol_core::faults::inject_eio("volumes", 0);
        assert!(matches!(read(root), Err(OpsError::Pool(_))));
    }

    #[test]
    fn the_summary_says_what_it_cannot_know() {
        let t = Totals {
            filesystem_size_bytes: 2 << 30,
            filesystem_used_bytes: 1 << 30,
            filesystem_free_bytes: 1 << 30,
            volumes: 1,
            provisioned_bytes: 1 << 30,
            snapshots: 1,
            snapshot_counted_bytes: 100 << 20,
            volume_allocated_bytes: 300 << 20,
            snapshot_allocated_bytes: 100 << 20,
            capacity_note: CAPACITY_NOTE,
        };
        let text = summary(&t).join("\n");
        assert!(
            text.contains("2.0 GiB size, 1.0 GiB used, 1.0 GiB free"),
            "{text}"
        );
        assert!(text.contains("1: 1.0 GiB provisioned"), "{text}");
        assert!(text.contains("100.0 MiB counted"), "{text}");
        assert!(text.contains("--reserve and --overcommit"), "{text}");
    }
}
