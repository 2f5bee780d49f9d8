//! The formatted templates in `templates/` (made and used by node plugins,
//! see `node::template`), as the pool accounts for them: what their blocks
//! count in capacity, and how many may exist.
//!
//! A template is made at the first stage of a volume of a new size, with no
//! capacity promised for it, and it takes real blocks of the pool (an ext4
//! template of 10 GiB maps a few MiB of metadata). So capacity counts what
//! the templates hold now (`st_blocks`, read at every look: there are at
//! most [`MAX_TEMPLATES`]), as it counts snapshots by their blocks. A
//! volume copied from one on a reflink pool shares those blocks, and they
//! are then counted twice, in the template and in the volume's capacity:
//! a few MiB too cautious, never room that is not there.
//!
//! One template per distinct size is minted, so a cluster asking for many
//! sizes would fill `templates/` without bound. Two rules bound it:
//! - at most [`MAX_TEMPLATES`] exist: a node plugin that makes one removes
//!   the least recently used beyond that (a use sets the template's mtime);
//! - one unused for [`TEMPLATE_IDLE`] is reclaimed, by that same pass and
//!   by the controller's janitor at start-up.
//!
//! Removing a template never harms a volume: a copy in progress holds its
//! own descriptor, volumes never refer to their template, and a volume of
//! that size made later makes the template again (one mkfs).

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use super::error::io_error;
use super::{Pool, PoolError};

/// How many templates the pool keeps at most. Each spares one mkfs per
/// volume of its size (a process start, ~20 ms of CPU, and for a thick
/// volume the zeroing of its inode tables) and costs a few MiB of the
/// pool; clusters use a handful of volume sizes (1, 5, 10, 20, 50,
/// 100 GiB...), so eight serve the common ones, while a workload of ever
/// new sizes pays one mkfs per volume, as it would without templates, and
/// holds at most eight templates' blocks.
pub const MAX_TEMPLATES: usize = 8;

/// How long a template may go unused before it is reclaimed: a size not
/// asked for in a day is given its blocks back, and a mkfs when it comes
/// again.
pub const TEMPLATE_IDLE: Duration = Duration::from_secs(24 * 60 * 60);

/// A template found in `templates/`.
#[derive(Debug)]
struct Found {
    /// Its file name.
    name: String,
    /// Bytes it has allocated.
    bytes: u64,
    /// When it was last used (or made).
    used: SystemTime,
}

/// What the pool's templates hold, for capacity.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Held {
    /// How many there are.
    pub count: usize,
    /// The bytes they have allocated (`st_blocks` x 512).
    pub bytes: u64,
}

impl Pool {
    fn templates_dir(&self) -> PathBuf {
        self.root.join("templates")
    }

    /// The templates in `templates/`: regular files only. One gone between
    /// the listing and its `stat` (removed by another process) is skipped.
    fn found_templates(&self) -> Result<Vec<Found>, PoolError> {
        let dir = self.templates_dir();
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            // A pool opened by an older filevol may lack the directory.
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_error("read directory", &dir)(e)),
        };
        let mut found = Vec::new();
        for entry in entries {
            let entry = entry.map_err(io_error("read directory", &dir))?;
            let meta = match entry.metadata() {
                Ok(m) => m,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_error("stat", entry.path())(e)),
            };
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            if !meta.is_file() {
                continue;
            }
            found.push(Found {
                name,
                bytes: meta.blocks().saturating_mul(512),
                used: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            });
        }
        Ok(found)
    }

    /// What the templates hold now (see the module documentation).
    pub fn templates_held(&self) -> Result<Held, PoolError> {
        let found = self.found_templates()?;
        Ok(Held {
            count: found.len(),
            bytes: found.iter().map(|t| t.bytes).sum(),
        })
    }

    /// Removes the templates unused for [`TEMPLATE_IDLE`], then the least
    /// recently used beyond `keep`; never `spare` (one just made). Returns
    /// how many it removed. A removal that fails is logged and counted
    /// against nothing: the next pass tries again.
    pub fn prune_templates(&self, keep: usize, spare: Option<&str>) -> Result<usize, PoolError> {
        let mut found = self.found_templates()?;
        // Most recently used first.
        found.sort_by_key(|t| std::cmp::Reverse(t.used));
        let now = SystemTime::now();
        let spared = |t: &Found| spare == Some(t.name.as_str());
        // The spared one takes its place in the bound first.
        let mut kept = found.iter().filter(|t| spared(t)).count();
        let mut removed = 0;
        for t in found.iter().filter(|t| !spared(t)) {
            let idle = now.duration_since(t.used).unwrap_or_default();
            if kept < keep && idle < TEMPLATE_IDLE {
                kept += 1;
                continue;
            }
            let path = self.template_path(&t.name);
            match std::fs::remove_file(&path) {
                Ok(()) => {
                    removed += 1;
                    log::info!(
                        "removed template {} (unused for {}s; {kept} kept, at most {keep})",
                        t.name,
                        idle.as_secs()
                    );
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => log::warn!("remove template {}: {e}", path.display()),
            }
        }
        Ok(removed)
    }
}
