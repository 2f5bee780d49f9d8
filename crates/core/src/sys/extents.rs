//! What a file's blocks are, as the filesystem knows them: its data ranges
//! (SEEK_DATA/SEEK_HOLE) and its extent map (FS_IOC_FIEMAP), both read a
//! bounded batch at a time so that a file with millions of extents costs a
//! fixed amount of memory.
//!
//! Neither reads a byte of the file's data: both ask the filesystem's
//! metadata, which is what makes changed-block tracking cheap
//! (`crate::changed_blocks`).

#![allow(unsafe_code)]

use std::io;
use std::os::fd::AsFd;

use rustix::fs::SeekFrom;

use linux_raw_sys::ioctl::{
    FIEMAP_EXTENT_DATA_ENCRYPTED, FIEMAP_EXTENT_DATA_INLINE, FIEMAP_EXTENT_DATA_TAIL,
    FIEMAP_EXTENT_DELALLOC, FIEMAP_EXTENT_ENCODED, FIEMAP_EXTENT_LAST, FIEMAP_EXTENT_NOT_ALIGNED,
    FIEMAP_EXTENT_UNKNOWN, FIEMAP_FLAG_SYNC, FS_IOC_FIEMAP,
};
use rustix::ioctl::{ioctl, Opcode, Updater};

/// Extents asked for per FIEMAP call: 256 x 56 bytes, a 14 KiB buffer.
const BATCH: usize = 256;
const BATCH_U32: u32 = 256;

/// One extent of a file: `length` bytes at `logical` in the file live at
/// `physical` on the filesystem's device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Offset in the file.
    pub logical: u64,
    /// Where the bytes are on the device (or in btrfs's address space).
    pub physical: u64,
    /// Length in bytes.
    pub length: u64,
    /// `FIEMAP_EXTENT_*` flags.
    pub flags: u32,
}

/// Flags under which `physical` does not name the bytes one to one: the
/// location is not known yet, the data is stored compressed, encrypted,
/// inline in metadata, or packed with other files' tails. Two such extents
/// can never be proven to hold the same bytes by comparing addresses.
pub const UNPROVABLE: u32 = FIEMAP_EXTENT_UNKNOWN
    | FIEMAP_EXTENT_DELALLOC
    | FIEMAP_EXTENT_ENCODED
    | FIEMAP_EXTENT_DATA_ENCRYPTED
    | FIEMAP_EXTENT_NOT_ALIGNED
    | FIEMAP_EXTENT_DATA_INLINE
    | FIEMAP_EXTENT_DATA_TAIL;

impl Extent {
    /// One past the extent's last byte in the file (saturating: a damaged
    /// map must not wrap).
    pub fn end(&self) -> u64 {
        self.logical.saturating_add(self.length)
    }

    /// Whether comparing `physical` addresses says anything about the bytes.
    pub fn is_provable(&self) -> bool {
        self.flags & UNPROVABLE == 0
    }
}

// The kernel's `struct fiemap` followed by its `struct fiemap_extent` array
// (include/uapi/linux/fiemap.h); linux-raw-sys has the constants but not the
// structs.
#[repr(C)]
#[derive(Clone, Copy)]
struct FiemapExtent {
    fe_logical: u64,
    fe_physical: u64,
    fe_length: u64,
    fe_reserved64: [u64; 2],
    fe_flags: u32,
    fe_reserved: [u32; 3],
}

#[repr(C)]
struct Fiemap {
    fm_start: u64,
    fm_length: u64,
    fm_flags: u32,
    fm_mapped_extents: u32,
    fm_extent_count: u32,
    fm_reserved: u32,
    fm_extents: [FiemapExtent; BATCH],
}

const ZERO_EXTENT: FiemapExtent = FiemapExtent {
    fe_logical: 0,
    fe_physical: 0,
    fe_length: 0,
    fe_reserved64: [0; 2],
    fe_flags: 0,
    fe_reserved: [0; 3],
};

/// The extents of a file from an offset on, in file order, read `BATCH` at a
/// time: memory stays fixed whatever the file's extent count.
pub struct ExtentMap<F> {
    file: F,
    /// Where the next FIEMAP call starts.
    next: u64,
    /// One past the last byte of interest.
    end: u64,
    buf: Box<Fiemap>,
    /// Extents of the last batch not yet handed out: `buf.fm_extents[at..len]`.
    at: usize,
    len: usize,
    /// The last batch ended the map.
    done: bool,
    /// The first call asks the filesystem to flush delayed allocations, so
    /// no extent is still without a place.
    synced: bool,
}

impl<F> std::fmt::Debug for ExtentMap<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExtentMap")
            .field("next", &self.next)
            .field("end", &self.end)
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

impl<F: AsFd> ExtentMap<F> {
    /// The extents of `file` that overlap `[from, end)`.
    pub fn new(file: F, from: u64, end: u64) -> Self {
        ExtentMap {
            file,
            next: from,
            end,
            buf: Box::new(Fiemap {
                fm_start: 0,
                fm_length: 0,
                fm_flags: 0,
                fm_mapped_extents: 0,
                fm_extent_count: 0,
                fm_reserved: 0,
                fm_extents: [ZERO_EXTENT; BATCH],
            }),
            at: 0,
            len: 0,
            done: from >= end,
            synced: false,
        }
    }

    fn fill(&mut self) -> io::Result<()> {
        let buf = &mut *self.buf;
        buf.fm_start = self.next;
        buf.fm_length = self.end - self.next;
        buf.fm_flags = if self.synced { 0 } else { FIEMAP_FLAG_SYNC };
        buf.fm_mapped_extents = 0;
        buf.fm_extent_count = BATCH_U32;
        buf.fm_reserved = 0;
        // SAFETY: FS_IOC_FIEMAP reads the header of a `struct fiemap` and
        // writes at most `fm_extent_count` (BATCH) extents into the array
        // that follows it, which `Fiemap` lays out as the kernel does.
        unsafe {
            ioctl(
                &self.file,
                Updater::<{ FS_IOC_FIEMAP as Opcode }, Fiemap>::new(buf),
            )
        }?;
        self.synced = true;
        let mapped = (buf.fm_mapped_extents as usize).min(BATCH);
        self.at = 0;
        self.len = mapped;
        match buf.fm_extents[..mapped].last() {
            None => self.done = true,
            Some(last) => {
                let last_end = last.fe_logical.saturating_add(last.fe_length);
                // A map that does not move forward would loop for ever: end
                // it (the caller sees the extents it got, and treats what
                // follows as a hole only if the kernel said LAST).
                if last.fe_flags & FIEMAP_EXTENT_LAST != 0 || last_end >= self.end {
                    self.done = true;
                } else if last_end <= self.next {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("FIEMAP did not advance past offset {}", self.next),
                    ));
                } else {
                    self.next = last_end;
                }
            }
        }
        Ok(())
    }
}

impl<F: AsFd> Iterator for ExtentMap<F> {
    type Item = io::Result<Extent>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if self.at < self.len {
                let e = self.buf.fm_extents[self.at];
                self.at += 1;
                return Some(Ok(Extent {
                    logical: e.fe_logical,
                    physical: e.fe_physical,
                    length: e.fe_length,
                    flags: e.fe_flags,
                }));
            }
            if self.done {
                return None;
            }
            if let Err(e) = self.fill() {
                self.done = true;
                return Some(Err(e));
            }
        }
    }
}

/// The data ranges `[start, end)` of `file` within `[from, end)`, in order,
/// from SEEK_DATA/SEEK_HOLE: one pair of seeks per range, nothing held.
#[derive(Debug)]
pub struct DataRanges<F> {
    file: F,
    next: u64,
    end: u64,
}

impl<F: AsFd> DataRanges<F> {
    /// The data of `file` in `[from, end)`.
    pub fn new(file: F, from: u64, end: u64) -> Self {
        DataRanges {
            file,
            next: from,
            end,
        }
    }
}

impl<F: AsFd> Iterator for DataRanges<F> {
    type Item = io::Result<(u64, u64)>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.next >= self.end {
            return None;
        }
        let data = match rustix::fs::seek(&self.file, SeekFrom::Data(self.next)) {
            Ok(pos) => pos,
            // ENXIO: no data at or after `next`.
            Err(rustix::io::Errno::NXIO) => {
                self.next = self.end;
                return None;
            }
            Err(e) => return Some(Err(e.into())),
        };
        if data >= self.end {
            self.next = self.end;
            return None;
        }
        let hole = match rustix::fs::seek(&self.file, SeekFrom::Hole(data)) {
            Ok(pos) => pos.min(self.end),
            Err(e) => return Some(Err(e.into())),
        };
        if hole <= data {
            self.next = self.end;
            return Some(Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("SEEK_HOLE from data at {data} went back to {hole}"),
            )));
        }
        self.next = hole;
        Some(Ok((data, hole)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::os::unix::fs::FileExt;

    fn sparse_file(dir: &std::path::Path, len: u64, writes: &[(u64, usize)]) -> File {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(dir.join("f"))
            .unwrap();
        f.set_len(len).unwrap();
        for &(at, n) in writes {
            f.write_all_at(&vec![0xa5; n], at).unwrap();
        }
        f.sync_all().unwrap();
        f
    }

    #[test]
    fn data_ranges_follow_the_writes() {
        let dir = tempfile::tempdir().unwrap();
        let f = sparse_file(dir.path(), 64 << 20, &[(1 << 20, 8192), (10 << 20, 4096)]);
        let got: Vec<_> = DataRanges::new(&f, 0, 64 << 20)
            .collect::<io::Result<_>>()
            .unwrap();
        // A filesystem may round out to its block size, never cut short.
        assert_eq!(got.len(), 2, "{got:?}");
        assert!(got[0].0 <= 1 << 20 && got[0].1 >= (1 << 20) + 8192);
        assert!(got[1].0 <= 10 << 20 && got[1].1 >= (10 << 20) + 4096);
        // Starting inside the first range clips it.
        let from = (1 << 20) + 4096;
        let clipped: Vec<_> = DataRanges::new(&f, from, 64 << 20)
            .collect::<io::Result<_>>()
            .unwrap();
        assert_eq!(clipped[0].0, from);
    }

    #[test]
    fn extent_map_covers_the_writes_in_batches() {
        let dir = tempfile::tempdir().unwrap();
        // More separate extents than one batch holds.
        let writes: Vec<(u64, usize)> = (0..(BATCH as u64 * 2 + 7))
            .map(|i| (i * 65536, 4096))
            .collect();
        let f = sparse_file(dir.path(), 64 << 20, &writes);
        let extents: Vec<Extent> = ExtentMap::new(&f, 0, 64 << 20)
            .collect::<io::Result<_>>()
            .unwrap();
        for &(at, n) in &writes {
            assert!(
                extents
                    .iter()
                    .any(|e| e.logical <= at && e.end() >= at + n as u64),
                "no extent covers {at}"
            );
        }
        assert!(extents.windows(2).all(|w| w[0].end() <= w[1].logical));
    }
}
