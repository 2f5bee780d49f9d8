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
/// images hold now (`allocated`). An approximation from above where clones
/// share blocks (a shared block is counted in each image that maps it).
pub fn unwritten(usage: &Usage, allocated: u64) -> u64 {
    usage.volume_bytes.saturating_sub(allocated)
}

/// The pool's findings from `usage` and the bytes its volumes' images have
/// `allocated`: [`Reason::PoolLowSpace`] when the free space is at or below
/// the reserve (with no reserve, when none is left), and
/// [`Reason::PoolOvercommitted`] when the volumes may write more than the
/// free space beyond the reserve.
pub fn assess(usage: &Usage, allocated: u64) -> Health {
    let mut h = Health::ok();
    let beyond_reserve = usage.fs_free.saturating_sub(usage.reserve);
    if usage.fs_free <= usage.reserve {
        h.add(Finding::new(
            Reason::PoolLowSpace,
            format!(
                "the pool filesystem has {} free, {} the reserve of {}: writes into blocks thin volumes never wrote fail from here on (the pods see I/O errors, ext4 inside may go read-only). Free space now: delete snapshots or unused volumes, or grow the pool filesystem",
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
    fn free_space_at_the_reserve_is_low_space() {
        let h = assess(&usage(G, G, 0), 0);
        assert!(h.has(Reason::PoolLowSpace), "{h:?}");
        assert!(!h.has(Reason::PoolOvercommitted), "{h:?}");
        let h = assess(&usage(0, 0, 0), 0);
        assert!(h.has(Reason::PoolLowSpace), "a full pool with no reserve");
        assert!(assess(&usage(1, 0, 0), 0).is_healthy());
    }

    #[test]
    fn promises_beyond_the_free_space_are_overcommitted() {
        // 16 GiB promised, 2 written: 14 may still come, 5 are free.
        let h = assess(&usage(6 * G, G, 16 * G), 2 * G);
        assert!(h.has(Reason::PoolOvercommitted), "{h:?}");
        assert!(h.message().contains("Grow the pool"), "{}", h.message());
        // Once the pool is at its reserve, low space says it all.
        let h = assess(&usage(G, G, 16 * G), 2 * G);
        assert_eq!(h.findings.len(), 1);
        assert!(h.has(Reason::PoolLowSpace));
    }
}
