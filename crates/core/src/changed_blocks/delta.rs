//! The ranges where two extent maps of reflinked files may differ.

use std::io;

use linux_raw_sys::ioctl::{FIEMAP_EXTENT_LAST, FIEMAP_EXTENT_MERGED, FIEMAP_EXTENT_SHARED};

use super::Run;
use crate::sys::extents::Extent;

/// Flags that say nothing about a block's bytes: where the map ends, that
/// the filesystem merged records for the answer, that the block is shared
/// (both snapshots' blocks are, which is the point). Every other flag must
/// be equal on both sides for a range to count as unchanged.
const NEUTRAL: u32 = FIEMAP_EXTENT_LAST | FIEMAP_EXTENT_MERGED | FIEMAP_EXTENT_SHARED;

/// What one file has at a position.
#[derive(Debug, Clone, Copy)]
enum Segment {
    /// A hole up to `end`.
    Hole { end: u64 },
    /// Data of `extent`, which covers the position.
    Data(Extent),
}

impl Segment {
    fn end(&self) -> u64 {
        match self {
            Segment::Hole { end } => *end,
            Segment::Data(e) => e.end(),
        }
    }
}

/// One file's extents, read forward.
#[derive(Debug)]
struct Side<I> {
    extents: I,
    /// The first extent not wholly behind the position, if read.
    current: Option<Extent>,
    exhausted: bool,
}

impl<I: Iterator<Item = io::Result<Extent>>> Side<I> {
    fn new(extents: I) -> Self {
        Side {
            extents,
            current: None,
            exhausted: false,
        }
    }

    /// What the file has at `pos`, up to `limit` at most.
    fn at(&mut self, pos: u64, limit: u64) -> io::Result<Segment> {
        loop {
            match self.current {
                Some(e) if e.end() > pos => break,
                _ if self.exhausted => {
                    self.current = None;
                    break;
                }
                _ => match self.extents.next() {
                    Some(e) => self.current = Some(e?),
                    None => self.exhausted = true,
                },
            }
        }
        Ok(match self.current {
            Some(e) if e.logical <= pos => Segment::Data(e),
            Some(e) => Segment::Hole {
                end: e.logical.min(limit),
            },
            None => Segment::Hole { end: limit },
        })
    }
}

/// Whether `a` and `b` provably hold the same bytes at `pos`: both data at
/// the same physical address with the same content-bearing flags, and both
/// addresses meaningful ([`Extent::is_provable`]).
fn same_at(a: &Extent, b: &Extent, pos: u64) -> bool {
    let address = |e: &Extent| e.physical.checked_add(pos - e.logical);
    // An extent whose physical end wraps is a damaged answer.
    let sane = |e: &Extent| e.physical.checked_add(e.length).is_some();
    a.is_provable()
        && b.is_provable()
        && sane(a)
        && sane(b)
        && (a.flags & !NEUTRAL) == (b.flags & !NEUTRAL)
        && address(a).is_some()
        && address(a) == address(b)
}

/// The changed runs between the extent maps `base` and `target` over
/// `[from, end)`, in order, adjacent runs merged. Holes in both are
/// unchanged; data in one and a hole in the other is changed; data in both
/// is unchanged only where `same_at` proves it.
#[derive(Debug)]
pub struct Delta<A, B> {
    base: Side<A>,
    target: Side<B>,
    pos: u64,
    end: u64,
}

impl<A, B> Delta<A, B>
where
    A: Iterator<Item = io::Result<Extent>>,
    B: Iterator<Item = io::Result<Extent>>,
{
    /// Compares `base` and `target` (each in file order) over `[from, end)`.
    pub fn new(base: A, target: B, from: u64, end: u64) -> Self {
        Delta {
            base: Side::new(base),
            target: Side::new(target),
            pos: from,
            end,
        }
    }

    /// The next segment boundary and whether `[pos, boundary)` changed.
    fn step(&mut self) -> io::Result<(u64, bool)> {
        let a = self.base.at(self.pos, self.end)?;
        let b = self.target.at(self.pos, self.end)?;
        let next = a.end().min(b.end()).min(self.end);
        let changed = match (a, b) {
            (Segment::Hole { .. }, Segment::Hole { .. }) => false,
            (Segment::Data(x), Segment::Data(y)) => !same_at(&x, &y, self.pos),
            _ => true,
        };
        Ok((next, changed))
    }
}

impl<A, B> Iterator for Delta<A, B>
where
    A: Iterator<Item = io::Result<Extent>>,
    B: Iterator<Item = io::Result<Extent>>,
{
    type Item = io::Result<Run>;

    fn next(&mut self) -> Option<Self::Item> {
        let mut run: Option<Run> = None;
        while self.pos < self.end {
            let (next, changed) = match self.step() {
                Ok(step) => step,
                Err(e) => {
                    self.pos = self.end;
                    return Some(Err(e));
                }
            };
            debug_assert!(next > self.pos, "segments always advance");
            let start = self.pos;
            self.pos = next;
            match (&mut run, changed) {
                (Some(r), true) => r.end = next,
                (None, true) => run = Some(Run { start, end: next }),
                (Some(_), false) => break,
                (None, false) => {}
            }
        }
        run.map(Ok)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use linux_raw_sys::ioctl::{FIEMAP_EXTENT_ENCODED, FIEMAP_EXTENT_UNWRITTEN};

    fn ext(logical: u64, physical: u64, length: u64) -> Extent {
        Extent {
            logical,
            physical,
            length,
            flags: 0,
        }
    }

    fn delta(a: &[Extent], b: &[Extent], from: u64, end: u64) -> Vec<(u64, u64)> {
        Delta::new(
            a.iter().copied().map(Ok),
            b.iter().copied().map(Ok),
            from,
            end,
        )
        .map(|r| r.map(|r| (r.start, r.end)))
        .collect::<io::Result<_>>()
        .unwrap()
    }

    #[test]
    fn shared_blocks_are_unchanged_and_rewritten_ones_changed() {
        // base: one extent of 16 blocks. target: the same, with blocks 4..6
        // rewritten elsewhere (the copy-on-write of a shared block).
        let base = [ext(0, 1000, 16)];
        let target = [ext(0, 1000, 4), ext(4, 5000, 2), ext(6, 1006, 10)];
        assert_eq!(delta(&base, &target, 0, 16), vec![(4, 6)]);
    }

    #[test]
    fn data_against_a_hole_is_changed_both_ways() {
        let base = [ext(0, 100, 4)];
        let target = [ext(0, 100, 4), ext(8, 900, 4)];
        assert_eq!(delta(&base, &target, 0, 16), vec![(8, 12)]);
        // Punched in the target.
        assert_eq!(delta(&target, &base, 0, 16), vec![(8, 12)]);
    }

    #[test]
    fn unprovable_or_differently_flagged_extents_are_changed() {
        let mut enc = ext(0, 100, 8);
        enc.flags = FIEMAP_EXTENT_ENCODED;
        assert_eq!(delta(&[enc], &[enc], 0, 8), vec![(0, 8)]);
        let mut unwritten = ext(0, 100, 8);
        unwritten.flags = FIEMAP_EXTENT_UNWRITTEN;
        assert_eq!(delta(&[ext(0, 100, 8)], &[unwritten], 0, 8), vec![(0, 8)]);
        // Sharing and the end-of-map marker say nothing about the bytes.
        let mut shared_last = ext(0, 100, 8);
        shared_last.flags = FIEMAP_EXTENT_SHARED | FIEMAP_EXTENT_LAST;
        assert!(delta(&[ext(0, 100, 8)], &[shared_last], 0, 8).is_empty());
    }

    #[test]
    fn a_shifted_mapping_is_changed() {
        // Same physical extent, mapped one block further on: other bytes.
        assert_eq!(
            delta(&[ext(0, 100, 8)], &[ext(1, 100, 8)], 0, 9),
            vec![(0, 9)]
        );
    }

    #[test]
    fn starts_inside_an_extent_and_stops_at_end() {
        let base = [ext(0, 100, 100)];
        let target = [ext(0, 500, 100)];
        assert_eq!(delta(&base, &target, 30, 60), vec![(30, 60)]);
    }

    #[test]
    fn adjacent_changes_merge_and_holes_in_both_are_skipped() {
        let base = [ext(0, 100, 4), ext(10, 200, 2)];
        let target = [ext(0, 300, 4), ext(4, 400, 2), ext(10, 200, 2)];
        assert_eq!(delta(&base, &target, 0, 20), vec![(0, 6)]);
    }

    #[test]
    fn physical_overflow_is_changed() {
        let a = ext(0, u64::MAX - 1, 8);
        assert_eq!(delta(&[a], &[a], 0, 8), vec![(0, 8)]);
    }

    #[test]
    fn errors_from_a_map_end_the_delta() {
        let base = vec![Ok(ext(0, 1, 1)), Err(io::Error::other("fiemap failed"))];
        let out: io::Result<Vec<Run>> =
            Delta::new(base.into_iter(), std::iter::empty(), 0, 10).collect();
        assert!(out.is_err());
    }
}
