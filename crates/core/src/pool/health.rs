//! The pool's own health, from figures read at one moment: is its free
//! space below the reserve, and can it still hold what its volumes may
//! write?
//!
//! Both are said before writes fail. A thin volume's image holds only what
//! the pod wrote; the rest of its capacity is a promise the pool keeps by
//! having the free space when the pod writes. When the free space is gone,
//! the loop device's writes into new blocks fail (ENOSPC, which the
//! filesystem inside sees as an I/O error and may answer by going
//! read-only): that is what these findings warn of.

use super::room::Usage;
use crate::health::{Finding, Health, Reason};
use crate::units::human_fine;

/// What the pool's volumes may still write: their capacity less what their
/// images hold now (`allocated`). An approximation: a block clones share
/// counts in each image that maps it (so this can be too low), and a
/// directory volume counts at its capacity, its usage not subtracted (so
/// a pool of full directory volumes can read as overcommitted).
pub fn unwritten(usage: &Usage, allocated: u64) -> u64 {
    usage.volume_bytes.saturating_sub(allocated)
}

/// Free space below which the pool counts as out of space: 0.5% of its
/// size, at least 4 MiB. Filesystems keep some blocks back from an
/// unprivileged `statvfs` (xfs a few, ext4 5% for root), so "none free"
/// is rarely seen as 0.
pub fn out_of_space_margin(fs_size: u64) -> u64 {
    (fs_size / 200).max(4 << 20)
}

/// The pool's findings from `usage` and the bytes its volumes' images have
/// `allocated`: [`Reason::PoolOutOfSpace`] when next to nothing is free
/// ([`out_of_space_margin`]), [`Reason::PoolLowSpace`] when the free space
/// is at or below the reserve, and [`Reason::PoolOvercommitted`] when the
/// volumes may write more than the free space beyond the reserve.
pub fn assess(usage: &Usage, allocated: u64) -> Health {
    let mut h = Health::ok();
    if usage.fs_free <= out_of_space_margin(usage.fs_size) {
        h.add(Finding::new(
            Reason::PoolOutOfSpace,
            format!(
                "the pool filesystem is out of space ({} free): thin volumes' writes into blocks they never wrote fail now (the pods see I/O errors, ext4 inside may go read-only). Free space at once: delete snapshots or unused volumes, or grow the pool filesystem",
                human_fine(usage.fs_free)
            ),
        ));
    }
    let beyond_reserve = usage.fs_free.saturating_sub(usage.reserve);
    if usage.fs_free <= usage.reserve {
        h.add(Finding::new(
            Reason::PoolLowSpace,
            format!(
                "the pool filesystem has {} free, {} the reserve of {}: that is all thin volumes have left to write into. Free space: delete snapshots or unused volumes, or grow the pool filesystem",
                human_fine(usage.fs_free),
                if usage.fs_free < usage.reserve { "below" } else { "at" },
                human_fine(usage.reserve),
            ),
        ));
    }
    let owed = unwritten(usage, allocated);
    if owed > beyond_reserve && usage.fs_free > usage.reserve {
        h.add(Finding::new(
            Reason::PoolOvercommitted,
            format!(
                "the pool's volumes may still write {} (their capacity of {} less the {} their images hold) and the pool has {} free beyond the reserve: writes will fail before the volumes are full. Grow the pool filesystem, lower --overcommit so no more is promised, or move volumes out",
                human_fine(owed),
                human_fine(usage.volume_bytes),
                human_fine(allocated),
                human_fine(beyond_reserve),
            ),
        ));
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: u64 = 1 << 30;

    fn usage(fs_free: u64, reserve: u64, volume_bytes: u64) -> Usage {
        Usage {
            fs_size: 10 * G,
            fs_free,
            reserve,
            overcommit: 2.0,
            volume_bytes,
            ..Usage::default()
        }
    }

    #[test]
    fn a_pool_that_can_write_every_promise_is_healthy() {
        // 4 GiB promised, 1 GiB written, 5 GiB free beyond the reserve.
        assert!(assess(&usage(6 * G, G, 4 * G), G).is_healthy());
    }

    #[test]
    fn free_space_at_the_reserve_is_low_space_and_next_to_none_is_out_of_space() {
        let h = assess(&usage(G, G, 0), 0);
        assert!(h.has(Reason::PoolLowSpace), "{h:?}");
        assert!(!h.has(Reason::PoolOutOfSpace), "{h:?}");
        assert!(!h.has(Reason::PoolOvercommitted), "{h:?}");
        // 10 GiB: out of space under 51.2 MiB free.
        let h = assess(&usage(50 << 20, 0, 0), 0);
        assert!(h.has(Reason::PoolOutOfSpace), "{h:?}");
        let h = assess(&usage(28 << 10, 32 << 20, 0), 0);
        assert!(
            h.has(Reason::PoolOutOfSpace) && h.has(Reason::PoolLowSpace),
            "{h:?}"
        );
        assert!(assess(&usage(G, 0, 0), 0).is_healthy());
        assert_eq!(out_of_space_margin(100 << 20), 4 << 20);
    }

    #[test]
    fn promises_beyond_the_free_space_are_overcommitted() {
        // 16 GiB promised, 2 written: 14 may still come, 5 are free.
        let h = assess(&usage(6 * G, G, 16 * G), 2 * G);
        assert!(h.has(Reason::PoolOvercommitted), "{h:?}");
        assert!(h.message().contains("Grow the pool"), "{}", h.message());
        // Once the pool is at its reserve, low space says it all.
        let h = assess(&usage(G, G, 16 * G), 2 * G);
        assert_eq!(h.findings.len(), 1, "{h:?}");
        assert!(h.has(Reason::PoolLowSpace));
    }
}
