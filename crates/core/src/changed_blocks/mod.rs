//! Changed-block tracking: which byte ranges of a snapshot hold data, and
//! which differ between two snapshots, computed from the pool filesystem's
//! own metadata without reading a byte of volume data.
//!
//! - Allocated ranges come from SEEK_DATA/SEEK_HOLE over the snapshot image.
//! - Changed ranges come from the two images' extent maps ([`delta`]). Both
//!   snapshots are reflink copies of one volume image, so a range whose
//!   blocks were never rewritten between them maps to the same physical
//!   blocks in both (the copy-on-write of a shared block gives the writer a
//!   new one). Equal addresses therefore prove equal bytes; anything else,
//!   including extents whose address does not name the bytes one to one, is
//!   reported as changed. A delta may say too much, never too little.
//! - [`Pager`] turns either into the pages of a CSI SnapshotMetadata stream:
//!   clipped to the request's `starting_offset` and the volume's capacity,
//!   adjacent runs coalesced, at most `max_results` runs a page, in strictly
//!   increasing, non-overlapping order across the whole stream.
//!
//! Everything here is pure arithmetic over iterators, so it is fuzzed
//! (`fuzz/fuzz_targets/block_ranges.rs`) and tested against a byte model.

pub mod delta;
mod pager;

pub use delta::Delta;
pub use pager::Pager;

/// The byte range `[start, end)`; never empty once it leaves this module.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
}

impl Run {
    /// Bytes in the run.
    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    /// Whether the run holds no byte.
    pub fn is_empty(&self) -> bool {
        self.end <= self.start
    }
}

/// A filesystem answered ranges that go backwards: `run` came after one
/// starting at `after`. Such an answer cannot be trusted to be complete, so
/// the stream ends with an error rather than a reordering.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutOfOrder {
    /// The run out of place.
    pub run: Run,
    /// The start of the run before it.
    pub after: u64,
}

impl std::fmt::Display for OutOfOrder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the filesystem's ranges went backwards: {}..{} after one starting at {}",
            self.run.start, self.run.end, self.after
        )
    }
}

impl std::error::Error for OutOfOrder {}

impl From<OutOfOrder> for std::io::Error {
    fn from(e: OutOfOrder) -> Self {
        std::io::Error::new(std::io::ErrorKind::InvalidData, e)
    }
}

/// Checks what the CSI spec asks of a SnapshotMetadata stream, a message
/// at a time: no empty run, no message over `per_page` runs, runs strictly
/// increasing and apart from one another across messages, none ending at or
/// before `from`, none past `capacity`. Used by the tests, the fuzz target
/// and `filevol client` (which checks what any driver sends it).
#[derive(Debug, Clone)]
pub struct StreamCheck {
    from: u64,
    capacity: u64,
    per_page: usize,
    last_end: Option<u64>,
    pages: usize,
}

impl StreamCheck {
    /// A check for a stream asked from `from`, of a volume of `capacity`
    /// bytes, at most `per_page` runs a message.
    pub fn new(from: u64, capacity: u64, per_page: usize) -> Self {
        StreamCheck {
            from,
            capacity,
            per_page,
            last_end: None,
            pages: 0,
        }
    }

    /// Checks the next message's runs; the first violation, if any.
    pub fn page(&mut self, runs: &[Run]) -> Result<(), String> {
        let i = self.pages;
        self.pages += 1;
        if runs.len() > self.per_page {
            return Err(format!(
                "message {i} has {} runs, more than {}",
                runs.len(),
                self.per_page
            ));
        }
        for r in runs {
            if r.is_empty() {
                return Err(format!("message {i}: empty run {r:?}"));
            }
            if r.end <= self.from {
                return Err(format!(
                    "message {i}: run {r:?} ends before the starting offset {}",
                    self.from
                ));
            }
            if r.end > self.capacity {
                return Err(format!(
                    "message {i}: run {r:?} goes past the capacity {}",
                    self.capacity
                ));
            }
            if let Some(end) = self.last_end {
                if r.start < end {
                    return Err(format!(
                        "message {i}: run {r:?} overlaps or precedes the run ending at {end}"
                    ));
                }
            }
            self.last_end = Some(r.end);
        }
        Ok(())
    }
}

/// [`StreamCheck`] over a whole stream.
pub fn check_stream<'a>(
    pages: impl IntoIterator<Item = &'a [Run]>,
    from: u64,
    capacity: u64,
    per_page: usize,
) -> Result<(), String> {
    let mut check = StreamCheck::new(from, capacity, per_page);
    pages.into_iter().try_for_each(|p| check.page(p))
}
