//! Room: the pure arithmetic of what the pool may still promise, from
//! figures read elsewhere ([`super::capacity`] reads them, with its locks,
//! promise files and caches). Nothing here does I/O, so the rule that
//! GetCapacity, CreateVolume's promise, the `Exhausted` error, the metrics
//! and `filevol pool ls` share is tested on numbers alone.

use std::fmt;

use crate::units::human_fine;
use crate::volume::meta::{Layout, SnapshotMeta};

/// What a snapshot counts as in the pool's capacity, from the bytes its data
/// has allocated (see [`allocated`](super::capacity::allocated)): the one rule, used by room,
/// GetCapacity, the `Exhausted` error, the metrics and `filevol pool ls`.
///
/// Capacity must count what each object can come to own, no more: a volume
/// can be written in full, so it counts at its capacity. A snapshot is
/// never written: the most it can ever own is the blocks it maps now. A
/// reflinked snapshot shares them with its source today and comes to own
/// them one by one as the source overwrites them (the source then takes new
/// blocks, which its own capacity already counts); its holes stay holes
/// forever. Counting a snapshot at its full size, as filevol once did,
/// counted space no file will ever take, so a thin pool with snapshots
/// refused volumes it could hold. A byte copy (on a pool that cannot
/// reflink) owns its blocks from the start, and counts the same.
///
/// An image counts at most its size: `st_blocks` can briefly include blocks
/// past the end that the filesystem allocated speculatively. A directory
/// snapshot counts its whole tree: directory volumes have no size to cap
/// at.
pub fn snapshot_counts(meta: &SnapshotMeta, allocated: u64) -> u64 {
    match meta.layout {
        Layout::Image => allocated.min(meta.size_bytes),
        Layout::Dir => allocated,
    }
}

/// How the pool's room is reached, read at one moment: what GetCapacity,
/// CreateVolume's promise, the [`PoolError::Exhausted`](super::PoolError::Exhausted) error and the
/// metrics report, so that they agree.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Usage {
    /// Size of the pool filesystem (statvfs).
    pub fs_size: u64,
    /// Bytes of it still free for an unprivileged writer (statvfs).
    pub fs_free: u64,
    /// Bytes never promised (`--reserve`).
    pub reserve: u64,
    /// How many times its usable size the pool may promise (`--overcommit`).
    pub overcommit: f64,
    /// Volumes in the pool.
    pub volumes: usize,
    /// Bytes promised to them: their capacity.
    pub volume_bytes: u64,
    /// Snapshots in the pool.
    pub snapshots: usize,
    /// What they count as ([`snapshot_counts`]).
    pub snapshot_bytes: u64,
    /// Formatted templates in the pool (see [`super::templates`]).
    pub templates: usize,
    /// The bytes they hold (`st_blocks`).
    pub template_bytes: u64,
    /// Bytes promised to creations and expansions in progress, in every
    /// live process.
    pub in_progress: u64,
}

impl Usage {
    /// The filesystem less the reserve.
    pub fn usable(&self) -> u64 {
        self.fs_size.saturating_sub(self.reserve)
    }

    /// What the pool may promise in all: usable x overcommit.
    pub fn promisable(&self) -> u64 {
        // A float product: overcommit is a ratio. `as` saturates (and maps
        // NaN to 0), and config refuses a negative ratio.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let promisable = (self.usable() as f64 * self.overcommit) as u64;
        promisable
    }

    /// What is counted against it: volumes, snapshots, templates,
    /// creations in progress.
    pub fn committed(&self) -> u64 {
        self.volume_bytes
            .saturating_add(self.snapshot_bytes)
            .saturating_add(self.template_bytes)
            .saturating_add(self.in_progress)
    }

    /// What the promises alone leave.
    pub fn unpromised(&self) -> u64 {
        self.promisable().saturating_sub(self.committed())
    }

    /// What the pool filesystem can still take beyond the reserve, when
    /// that bounds the room: only above a ratio of 1.
    ///
    /// Up to 1, what is counted (every volume at its capacity, every
    /// snapshot at the blocks it can come to own) is already the most the
    /// pool's files can ever hold, and it never passes usable: every
    /// promise can be written without looking at free space. Free space
    /// would add nothing there but noise: statvfs's free figure leaves out
    /// blocks the loop devices may still use (ext4 keeps 5% for root, and
    /// loop I/O runs as the kernel), and it moves with every write into a
    /// volume, while the promises only move when volumes and snapshots
    /// come and go, which is the figure a scheduler can plan on (and the
    /// one the tests pin exactly). Above 1 the promises may pass what the
    /// filesystem holds, so what it still holds is the bound: GetCapacity
    /// then never reports room the pool cannot write.
    pub fn free_bound(&self) -> Option<u64> {
        (self.overcommit > 1.0).then(|| self.fs_free.saturating_sub(self.reserve))
    }

    /// Whether the filesystem's free space, not the promises, sets the
    /// room.
    pub fn free_space_binds(&self) -> bool {
        self.free_bound()
            .is_some_and(|free| free < self.unpromised())
    }

    /// Bytes the pool can still promise to new volumes (GetCapacity).
    pub fn room(&self) -> u64 {
        match self.free_bound() {
            Some(free) => self.unpromised().min(free),
            None => self.unpromised(),
        }
    }

    /// The templates' part of the refusal's sum: nothing while there are
    /// none.
    fn templates_part(&self) -> String {
        if self.templates == 0 && self.template_bytes == 0 {
            return String::new();
        }
        format!(
            ", less {} held by {}",
            human_fine(self.template_bytes),
            plural(self.templates, "formatted template")
        )
    }

    /// What a creation could not get, in words: what was asked, what is
    /// left and how that was reached, and what would make room.
    fn explain(&self, need: Need, out: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ratio = ratio(self.overcommit);
        match need {
            Need::Capacity(bytes) => {
                write!(
                    out,
                    "the pool cannot promise {} more: it has {} left. Room is the usable size {} ({} less the reserve of {}) x overcommit {ratio} = {}, less {} promised to {}, less {} counted for {} (by the blocks they can come to own, not their size){}, less {} promised to creations in progress = {}",
                    human_fine(bytes),
                    human_fine(self.room()),
                    human_fine(self.usable()),
                    human_fine(self.fs_size),
                    human_fine(self.reserve),
                    human_fine(self.promisable()),
                    human_fine(self.volume_bytes),
                    plural(self.volumes, "volume"),
                    human_fine(self.snapshot_bytes),
                    plural(self.snapshots, "snapshot"),
                    self.templates_part(),
                    human_fine(self.in_progress),
                    human_fine(self.unpromised()),
                )?;
                if self.free_space_binds() {
                    write!(
                        out,
                        "; above an overcommit of 1.0 room is also bounded by the pool filesystem's free space, {} less the reserve = {}, which binds. To make room: delete volumes or snapshots, or grow the pool filesystem; raising --overcommit does not help while free space binds",
                        human_fine(self.fs_free),
                        human_fine(self.free_bound().unwrap_or(0)),
                    )
                } else {
                    write!(
                        out,
                        ". To make room: delete volumes or snapshots, grow the pool filesystem, or, for thin volumes, raise --overcommit (now {ratio})"
                    )
                }
            }
            Need::Space(bytes) => write!(
                out,
                "a byte copy needs {} of free space on the pool filesystem, which has {} free, {} beyond the reserve of {}. To make room: delete volumes or snapshots, or grow the pool filesystem (a pool that can reflink, xfs or btrfs, takes snapshots without copying; --overcommit does not help a copy)",
                human_fine(bytes),
                human_fine(self.fs_free),
                human_fine(self.fs_free.saturating_sub(self.reserve)),
                human_fine(self.reserve),
            ),
        }
    }
}

/// A ratio as a flag would be written: `1.0`, `2.5`.
fn ratio(r: f64) -> String {
    if r.fract() == 0.0 {
        format!("{r:.1}")
    } else {
        format!("{r}")
    }
}

fn plural(n: usize, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}

/// What a refused creation needed from the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Capacity to promise to a new or grown volume.
    Capacity(u64),
    /// Free space on the pool filesystem for the data of a byte copy.
    Space(u64),
}

/// Why the pool refused: what was needed, and the figures it was weighed
/// against (the text of [`PoolError::Exhausted`](super::PoolError::Exhausted)).
#[derive(Debug, Clone, PartialEq)]
pub struct Shortfall {
    /// What was asked.
    pub need: Need,
    /// The pool's figures when it was refused.
    pub usage: Usage,
}

impl fmt::Display for Shortfall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.usage.explain(self.need, f)
    }
}
