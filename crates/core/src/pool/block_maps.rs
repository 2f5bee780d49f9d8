//! What changed-block tracking reads from the pool: the ranges of a
//! snapshot that hold data, and the ranges that changed between two
//! snapshots of one volume, as [`Run`]s read lazily from the pool
//! filesystem's maps of the snapshot images ([`crate::changed_blocks`] has
//! the arithmetic, `sys::extents` the syscalls).
//!
//! The rules are the pool's: which snapshots can be compared (two reflink
//! copies of one volume's image), and what a failure to read a map means (a
//! filesystem that cannot report it, or an I/O error on the image).

use std::io;
use std::path::Path;

use super::{Pool, PoolError};
use crate::changed_blocks::{Delta, Run};
use crate::sys::extents::{DataRanges, ExtentMap};
use crate::volume::meta::{CopyMethod, SnapshotMeta};

/// The runs of a snapshot, in order, read as they are asked for. A read
/// error ends them.
pub type Runs = Box<dyn Iterator<Item = Result<Run, PoolError>> + Send>;

/// What a snapshot's map answers from `from` on: the capacity of the volume
/// it was taken of, which bounds the runs, and the runs themselves. Nothing
/// is read until the runs are: a caller can still refuse `from` against
/// `capacity` first.
pub struct BlockMap {
    /// The snapshot's size: the capacity of the volume when it was taken.
    pub capacity: u64,
    /// The runs from `from` up to `capacity`.
    pub runs: Runs,
}

impl std::fmt::Debug for BlockMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockMap")
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

impl Pool {
    /// The ranges of snapshot `id` that hold data, from `from` to its end
    /// (SEEK_DATA/SEEK_HOLE over its image).
    pub fn allocated_blocks(&self, id: &str, from: u64) -> Result<BlockMap, PoolError> {
        let (snapshot, image) = self.open_snapshot_image(id)?;
        let capacity = snapshot.size_bytes;
        let fail = read_error("data ranges", id.to_owned());
        let runs = DataRanges::new(image, from, capacity)
            .map(move |r| r.map(|(start, end)| Run { start, end }).map_err(&fail));
        Ok(BlockMap {
            capacity,
            runs: Box::new(runs),
        })
    }

    /// The ranges that changed from snapshot `base` to snapshot `target`,
    /// from `from` to the target's end, compared by their extent maps
    /// (see `comparable` for which pairs can be).
    pub fn changed_blocks(
        &self,
        base_id: &str,
        target_id: &str,
        from: u64,
    ) -> Result<BlockMap, PoolError> {
        let (base, base_image) = self.open_snapshot_image(base_id)?;
        let (target, target_image) = self.open_snapshot_image(target_id)?;
        comparable(&base, &target, self.root())?;
        let capacity = target.size_bytes;
        // The whole of both maps from `from` to the target's end: where
        // the base is shorter (the volume grew between the two), its
        // missing end reads as a hole, so the target's data there is
        // reported.
        let fail = read_error("extent maps", format!("{base_id} or {target_id}"));
        let runs = Delta::new(
            ExtentMap::new(base_image, from, capacity),
            ExtentMap::new(target_image, from, capacity),
            from,
            capacity,
        )
        // Which of the two maps failed is not known here; both ids are in
        // the call's log line.
        .map(move |r| r.map_err(&fail));
        Ok(BlockMap {
            capacity,
            runs: Box::new(runs),
        })
    }
}

/// Whether comparing the extent maps of `base` and `target` proves what
/// changed: two snapshots of one volume, both reflink copies of its image.
/// A byte-for-byte copy shares no block with anything, so its map would
/// report every allocated block as changed: correct, but a full backup in
/// disguise, and the spec has a code for it.
fn comparable(base: &SnapshotMeta, target: &SnapshotMeta, pool: &Path) -> Result<(), PoolError> {
    if base.source_volume_id != target.source_volume_id {
        return Err(PoolError::Unsupported(format!(
            "snapshots {} and {} are of different volumes ({} and {}); a delta compares two snapshots of one volume",
            base.id, target.id, base.source_volume_id, target.source_volume_id
        )));
    }
    for s in [base, target] {
        if s.method != CopyMethod::Reflink {
            return Err(PoolError::NeedsReflink(format!(
                "snapshot {} is a byte-for-byte copy (the pool filesystem at {} could not reflink when it was taken), so it shares no blocks with other snapshots and changed-block tracking is not available for it; take a full backup (GetMetadataAllocated), or put the pool on xfs (mkfs.xfs -m reflink=1) or btrfs",
                s.id,
                pool.display()
            )));
        }
    }
    Ok(())
}

/// An error of the filesystem while reading `what` of `snapshot`'s image:
/// a filesystem that cannot report it (EOPNOTSUPP) needs another pool, any
/// other error is the image's.
fn read_error(what: &'static str, snapshot: String) -> impl Fn(io::Error) -> PoolError {
    move |e| {
        if e.raw_os_error() == Some(libc::EOPNOTSUPP) {
            PoolError::NeedsReflink(format!(
                "the pool filesystem does not report {what} for snapshot {snapshot} ({e}); changed-block tracking needs a pool on xfs or btrfs"
            ))
        } else {
            PoolError::Io {
                step: what,
                path: format!("snapshots/{snapshot}/image").into(),
                source: e,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::meta::{AccessType, Layout};

    fn snapshot(id: &str, source: &str, method: CopyMethod) -> SnapshotMeta {
        SnapshotMeta {
            format: 1,
            id: id.into(),
            name: id.into(),
            source_volume_id: source.into(),
            size_bytes: 1 << 20,
            layout: Layout::Image,
            access: AccessType::Block,
            fs_type: None,
            method,
            group_id: None,
            created_secs: 0,
            created_nanos: 0,
            written: None,
            subvolume: false,
        }
    }

    #[test]
    fn only_reflink_copies_of_one_volume_compare() {
        let pool = Path::new("/pool");
        let a = snapshot("a", "v", CopyMethod::Reflink);
        let b = snapshot("b", "v", CopyMethod::Reflink);
        assert!(comparable(&a, &b, pool).is_ok());
        let other = snapshot("c", "w", CopyMethod::Reflink);
        assert!(matches!(
            comparable(&a, &other, pool),
            Err(PoolError::Unsupported(m)) if m.contains("different volumes (v and w)")
        ));
        let copied = snapshot("d", "v", CopyMethod::Sparse);
        for (base, target) in [(&a, &copied), (&copied, &a)] {
            assert!(matches!(
                comparable(base, target, pool),
                Err(PoolError::NeedsReflink(m)) if m.starts_with("snapshot d is a byte-for-byte copy (the pool filesystem at /pool")
            ));
        }
    }

    #[test]
    fn a_map_the_filesystem_cannot_report_needs_another_pool() {
        let e = read_error("extent maps", "a or b".into())(io::Error::from_raw_os_error(
            libc::EOPNOTSUPP,
        ));
        assert!(
            matches!(e, PoolError::NeedsReflink(m) if m.contains("extent maps for snapshot a or b"))
        );
        let e = read_error("data ranges", "a".into())(io::Error::from_raw_os_error(libc::EIO));
        assert!(matches!(
            e,
            PoolError::Io { step: "data ranges", path, .. } if path == Path::new("snapshots/a/image")
        ));
    }
}
