//! `filevol pool ls`: what a pool holds, read straight from its metadata
//! files without changing anything (no scratch, no clean-up), as a table or
//! as JSON.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use serde::Serialize;

use super::OpsError;
use crate::pool::error::io_error;
use crate::pool::meta::{SnapshotMeta, VolumeMeta};

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
    /// Volumes (size, allocated bytes, attachments, snapshots) and snapshots.
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
    /// Promised size.
    pub capacity_bytes: u64,
    /// Bytes really allocated on the pool.
    pub allocated_bytes: u64,
    /// Nodes it is attached to.
    pub attached_to: Vec<String>,
    /// Snapshots taken of it.
    pub snapshots: usize,
    /// Why its metadata cannot be read, if it cannot.
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
    /// Bytes allocated (shared blocks of a reflink count in full).
    pub allocated_bytes: u64,
    /// `reflink` or `sparse`.
    pub method: String,
    /// Group snapshot, if any.
    pub group_id: Option<String>,
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
}

fn allocated(path: &Path) -> u64 {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    let mut total = meta.blocks() * 512;
    if meta.is_dir() {
        if let Ok(entries) = std::fs::read_dir(path) {
            total += entries.flatten().map(|e| allocated(&e.path())).sum::<u64>();
        }
    }
    total
}

fn entries(dir: &Path) -> Result<Vec<(String, PathBuf)>, OpsError> {
    let mut out: Vec<(String, PathBuf)> = std::fs::read_dir(dir)
        .map_err(io_error("read directory", dir))?
        .flatten()
        .filter_map(|e| Some((e.file_name().into_string().ok()?, e.path())))
        .filter(|(name, _)| !name.starts_with('.'))
        .collect();
    out.sort();
    Ok(out)
}

/// Reads the pool at `root`. A directory without the pool's layout is
/// refused with that said, not read as an empty pool.
pub fn read(root: &Path) -> Result<Report, OpsError> {
    if !root.join("volumes").is_dir() || !root.join("snapshots").is_dir() {
        return Err(OpsError::NotAPool(root.to_owned()));
    }
    let mut snapshots = Vec::new();
    for (id, dir) in entries(&root.join("snapshots"))? {
        let Ok(bytes) = std::fs::read(dir.join("meta.json")) else {
            continue;
        };
        let Ok(s) = serde_json::from_slice::<SnapshotMeta>(&bytes) else {
            continue;
        };
        snapshots.push(SnapshotRow {
            id,
            source_volume_id: s.source_volume_id,
            size_bytes: s.size_bytes,
            allocated_bytes: allocated(&dir),
            method: format!("{:?}", s.method).to_lowercase(),
            group_id: s.group_id,
        });
    }
    let mut volumes = Vec::new();
    for (id, dir) in entries(&root.join("volumes"))? {
        let row = match std::fs::read(dir.join("meta.json"))
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice::<VolumeMeta>(&b).map_err(|e| e.to_string()))
        {
            Ok(v) => VolumeRow {
                snapshots: snapshots
                    .iter()
                    .filter(|s| s.source_volume_id == id)
                    .count(),
                id,
                name: v.name,
                layout: format!("{:?}", v.layout).to_lowercase(),
                kind: match (v.access, v.fs_type) {
                    (crate::pool::meta::AccessType::Block, _) => "block".into(),
                    (_, Some(fs)) => fs.as_str().into(),
                    (_, None) => "-".into(),
                },
                capacity_bytes: v.capacity_bytes,
                allocated_bytes: allocated(&dir),
                attached_to: v.attachments.into_iter().map(|a| a.node_id).collect(),
                problem: None,
            },
            Err(problem) => VolumeRow {
                id,
                name: String::new(),
                layout: String::new(),
                kind: String::new(),
                capacity_bytes: 0,
                allocated_bytes: allocated(&dir),
                attached_to: Vec::new(),
                snapshots: 0,
                problem: Some(format!("metadata damaged: {problem}")),
            },
        };
        volumes.push(row);
    }
    Ok(Report {
        pool: root.to_owned(),
        volumes,
        snapshots,
    })
}

/// Bytes as a short human figure (binary units).
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
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
            "{:<44} {:<44} {:>10} {:>10} {:<8} GROUP",
            "SNAPSHOT", "SOURCE", "SIZE", "ALLOCATED", "METHOD"
        ),
    )?;
    for s in &report.snapshots {
        w(
            out,
            format!(
                "{:<44} {:<44} {:>10} {:>10} {:<8} {}",
                s.id,
                s.source_volume_id,
                human(s.size_bytes),
                human(s.allocated_bytes),
                s.method,
                s.group_id.as_deref().unwrap_or("-")
            ),
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_sizes() {
        assert_eq!(human(512), "512 B");
        assert_eq!(human(10 << 30), "10.0 GiB");
        assert_eq!(human(1536 << 10), "1.5 MiB");
    }
}
