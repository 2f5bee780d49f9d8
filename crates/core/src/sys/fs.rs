//! File operations the pool is built on: crash-safe replacement, reflink and
//! sparse copies, preallocation, capacity. Locks are in `super::lock`.

use std::fs::{File, Metadata, OpenOptions};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use rustix::fs::{FallocateFlags, SeekFrom, Timespec, Timestamps};

/// Raises this process's soft limit on open files to its hard limit, and
/// returns it. Walks of pods' trees hold a descriptor or two per directory
/// level (`super::untrusted::MAX_DEPTH`) on top of every call in flight, and
/// container runtimes commonly start processes with a soft limit of 1024.
pub fn raise_open_file_limit() -> u64 {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        limit.current = limit.maximum;
        if let Err(e) = setrlimit(Resource::Nofile, limit) {
            log::warn!("cannot raise the open file limit: {e}");
            return getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX);
        }
    }
    limit.current.unwrap_or(u64::MAX)
}

/// What is at `path`, symlinks followed: `Ok(None)` only when nothing is
/// there (ENOENT). Every other failure (EIO, ESTALE, EACCES, ENOTCONN from a
/// FUSE daemon that died, ENOTDIR where a directory was expected) is
/// returned: a path that cannot be looked at is not a path that is absent,
/// and whoever would delete, skip or answer "gone" on the strength of
/// absence must not do it on an error. Every decision about presence in
/// the pool and the node goes through here (or [`symlink_metadata_if_present`]).
pub fn metadata_if_present(path: &Path) -> io::Result<Option<Metadata>> {
    crate::faults::io_error_at(path)?;
    absent_as_none(std::fs::metadata(path))
}

/// [`metadata_if_present`] without following a symlink at the end of
/// `path`: a link is something there, wherever it points.
pub fn symlink_metadata_if_present(path: &Path) -> io::Result<Option<Metadata>> {
    crate::faults::io_error_at(path)?;
    absent_as_none(std::fs::symlink_metadata(path))
}

/// Whether anything (a symlink included) is at `path`; an error other than
/// ENOENT is returned, never taken for "no" (see [`metadata_if_present`]).
pub fn exists(path: &Path) -> io::Result<bool> {
    Ok(symlink_metadata_if_present(path)?.is_some())
}

/// `Ok(None)` for ENOENT, the value or any other error as it is.
fn absent_as_none<T>(result: io::Result<T>) -> io::Result<Option<T>> {
    match result {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Removes a file; one that is already gone is not an error (a retried
/// step, or a clean-up after a crash, finds it removed).
pub fn remove_if_present(path: &Path) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// Flushes a directory's entries (a rename or create inside it) to disk.
pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Replaces `path` with `bytes` so that a crash leaves either the old or the
/// new content, never a mix: write a temporary file beside it, fsync it,
/// rename it over `path`, fsync the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    replace(path, bytes, true)
}

/// [`write_atomic`] without the fsyncs: for files that only signal other
/// processes (a cache to drop) and whose loss in a host crash loses nothing,
/// since every process starts with empty caches after one.
pub fn replace_volatile(path: &Path, bytes: &[u8]) -> io::Result<()> {
    replace(path, bytes, false)
}

fn replace(path: &Path, bytes: &[u8], durable: bool) -> io::Result<()> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no file name"))?;
    // Unique across hosts and containers, where every process may be pid 1
    // and share the pool: the host name and the start of this process too.
    let tmp = dir.join(format!(
        ".{}.tmp-{}-{}-{}-{}",
        name.to_string_lossy(),
        rustix::system::uname().nodename().to_string_lossy(),
        std::process::id(),
        process_nonce(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let mut f = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
    // From here the temporary file is ours to remove if anything fails.
    let result = (|| {
        io::Write::write_all(&mut f, bytes)?;
        later_than(&f, path)?;
        if durable {
            f.sync_all()?;
        }
        std::fs::rename(&tmp, path)?;
        if durable {
            fsync_dir(dir)?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// A number fixed for the life of this process and unlikely to be shared
/// with another process of the same pid (its start time in nanoseconds).
fn process_nonce() -> u64 {
    static NONCE: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *NONCE.get_or_init(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
    })
}

/// Sets `new`'s modification time later than that of the file at `old`
/// (when there is one), so that every replacement of a file has a distinct
/// (inode, mtime) pair even when the kernel's coarse clock has not ticked
/// and the new file reuses an inode freed a moment ago. Readers that cache
/// what they parsed (the pool's listings) rely on that pair to notice a
/// change; writers of one file are serialised by the pool's object locks.
fn later_than(new: &File, old: &Path) -> io::Result<()> {
    let prev = match std::fs::metadata(old) {
        Ok(m) => (m.mtime(), m.mtime_nsec()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let m = new.metadata()?;
    if (m.mtime(), m.mtime_nsec()) > prev {
        return Ok(());
    }
    // One nanosecond later, or, where the filesystem keeps coarser times
    // (whole seconds on some FUSE and NFS servers), one second later.
    for step in [1, 1_000_000_000] {
        let total = prev.1 + step;
        let t = Timespec {
            tv_sec: prev.0 + total / 1_000_000_000,
            tv_nsec: total % 1_000_000_000,
        };
        rustix::fs::futimens(
            new,
            &Timestamps {
                last_access: t,
                last_modification: t,
            },
        )?;
        let m = new.metadata()?;
        if (m.mtime(), m.mtime_nsec()) > prev {
            return Ok(());
        }
    }
    Err(io::Error::other(
        "the filesystem does not record a later modification time",
    ))
}

/// Makes `dst` share `src`'s blocks (FICLONE): instant, atomic, no space
/// used until either side is written. Fails with EOPNOTSUPP/EXDEV/EINVAL
/// where the filesystem cannot.
pub fn reflink(src: &File, dst: &File) -> io::Result<()> {
    rustix::fs::ioctl_ficlone(dst, src).map_err(io::Error::from)
}

/// Whether a filesystem can reflink: clones the new, empty file `a` into
/// the new file `b` (paths the caller owns, on that filesystem), then
/// removes both. Empty, so that a full pool is told right: the kernel and
/// the filesystems refuse a clone they cannot do before they look at its
/// length. `Ok(false)` is the filesystem saying no (EOPNOTSUPP and its
/// kin); other errors are failures to run the probe.
pub fn probe_reflink(a: &Path, b: &Path) -> io::Result<bool> {
    let result = (|| {
        // FICLONE reads the source: it must be open for reading.
        let fa = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(a)?;
        let fb = OpenOptions::new().write(true).create_new(true).open(b)?;
        match reflink(&fa, &fb) {
            Ok(()) => Ok(true),
            Err(e) if reflink_unsupported(&e) => Ok(false),
            Err(e) => Err(e),
        }
    })();
    for p in [a, b] {
        let _ = std::fs::remove_file(p);
    }
    result
}

/// Errors from FICLONE that mean "this filesystem (pair) cannot share
/// blocks", as opposed to a real failure.
pub fn reflink_unsupported(e: &io::Error) -> bool {
    use rustix::io::Errno;
    let code = e.raw_os_error();
    [
        Errno::OPNOTSUPP,
        Errno::XDEV,
        Errno::INVAL,
        Errno::NOTTY,
        Errno::NOSYS,
        Errno::PERM,
    ]
    .iter()
    .any(|errno| Some(errno.raw_os_error()) == code)
}

/// Copies the first `len` bytes of `src` into `dst`, skipping holes
/// (SEEK_DATA/SEEK_HOLE), so a sparse image stays sparse. `dst` is set to
/// `len` bytes.
pub fn sparse_copy(src: &File, dst: &File, len: u64) -> io::Result<()> {
    dst.set_len(len)?;
    let mut offset = 0;
    while offset < len {
        let data = match rustix::fs::seek(src, SeekFrom::Data(offset)) {
            Ok(pos) => pos,
            // ENXIO: no data after `offset`.
            Err(rustix::io::Errno::NXIO) => break,
            Err(e) => return Err(e.into()),
        };
        if data >= len {
            break;
        }
        let hole = rustix::fs::seek(src, SeekFrom::Hole(data))?.min(len);
        copy_range(src, dst, data, hole - data)?;
        offset = hole;
    }
    Ok(())
}

/// Writes every data range of the first `len` bytes of `src` into `dst`
/// at the same offsets, by read and write: never `copy_file_range`, which
/// on a filesystem that can share blocks (xfs, btrfs) shares them instead,
/// dropping the blocks `dst` had allocated there. So a preallocated `dst`
/// keeps owning every block: the ranges land in its own (unwritten)
/// extents. `dst` keeps its length; what `src` has as holes, `dst` keeps
/// as it was (zeros, for a preallocated file never written).
pub fn write_data_into(src: &File, dst: &File, len: u64) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    const CHUNK: usize = 1 << 20;
    let mut buf = vec![0u8; CHUNK];
    for range in super::extents::DataRanges::new(src, 0, len) {
        let (mut at, end) = range?;
        while at < end {
            let n = usize::try_from(end - at).map_or(CHUNK, |left| left.min(CHUNK));
            src.read_exact_at(&mut buf[..n], at)?;
            dst.write_all_at(&buf[..n], at)?;
            at += n as u64;
        }
    }
    Ok(())
}

fn copy_range(src: &File, dst: &File, start: u64, mut count: u64) -> io::Result<()> {
    let (mut src_off, mut dst_off) = (start, start);
    while count > 0 {
        let chunk = count.min(1 << 30) as usize;
        let n =
            rustix::fs::copy_file_range(src, Some(&mut src_off), dst, Some(&mut dst_off), chunk)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "source shrank during copy",
            ));
        }
        count -= n as u64;
    }
    Ok(())
}

/// Allocates `len` bytes of `file` on disk (a thick image), so later writes
/// cannot fail for lack of space.
pub fn preallocate(file: &File, len: u64) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    rustix::fs::fallocate(file, FallocateFlags::empty(), 0, len).map_err(io::Error::from)
}

/// Makes `file` own every block of its first `len` bytes, so no later
/// write to it can fail for space: what a thick volume promises. A reflink
/// copy shares its blocks with its source until one of them is written, and
/// preallocation alone leaves shared blocks shared, so the shared ones are
/// unshared first: by FALLOC_FL_UNSHARE_RANGE where the filesystem has it
/// (xfs), else (btrfs) by writing each data range back over itself, which
/// copy-on-write gives new blocks. Then the holes are allocated.
///
/// Only for a file no one else writes meanwhile (a volume being built):
/// the rewrite reads a chunk and writes it back, which would undo a write
/// that came in between. A live file takes [`unshare`] instead.
pub fn own_blocks(file: &File, len: u64) -> io::Result<()> {
    if !unshare(file, len)? {
        rewrite_data(file, len)?;
    }
    preallocate(file, len)
}

/// Unshares the shared blocks of the first `len` bytes of `file` in the
/// kernel (FALLOC_FL_UNSHARE_RANGE), safe beside writers. `Ok(false)` where
/// the filesystem does not have the mode: ext4 (which shares nothing) and
/// btrfs (whose shared blocks then stay shared).
pub fn unshare(file: &File, len: u64) -> io::Result<bool> {
    if len == 0 {
        return Ok(true);
    }
    match rustix::fs::fallocate(file, FallocateFlags::UNSHARE_RANGE, 0, len) {
        Ok(()) => Ok(true),
        Err(rustix::io::Errno::OPNOTSUPP | rustix::io::Errno::INVAL) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Writes every data range of the first `len` bytes of `file` back over
/// itself (see [`own_blocks`]), a chunk at a time.
fn rewrite_data(file: &File, len: u64) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    const CHUNK: usize = 1 << 20;
    let mut buf = vec![0u8; CHUNK];
    for range in super::extents::DataRanges::new(file, 0, len) {
        let (mut at, end) = range?;
        while at < end {
            let n = usize::try_from(end - at).map_or(CHUNK, |left| left.min(CHUNK));
            file.read_exact_at(&mut buf[..n], at)?;
            file.write_all_at(&buf[..n], at)?;
            at += n as u64;
        }
    }
    Ok(())
}

/// FALLOC_FL_WRITE_ZEROES (Linux 6.17): allocate a range as written blocks
/// of zeros, the device zeroing them (WRITE ZEROES with unmap) instead of
/// the data crossing the bus. Not yet in linux-raw-sys.
const FALLOC_FL_WRITE_ZEROES: u32 = 0x80;

/// Writes zeros into every hole of the first `len` bytes of `file`, so the
/// filesystem under it holds written blocks there and not unwritten extents
/// or nothing: the first write into such a block is then an overwrite, with
/// no allocation or extent conversion in the pool filesystem's journal (a
/// `zeroFill` thick image, see `volume::parameters::ZERO_FILL`). Data ranges
/// are left as they are; an unwritten extent counts as a hole (it reads as
/// zeros, and SEEK_HOLE says so on ext4, xfs and btrfs).
///
/// Each hole is asked of the device first (FALLOC_FL_WRITE_ZEROES), and
/// written with zeros where the kernel or the device cannot do that. The
/// writes go through the page cache a batch at a time, each batch synced
/// and dropped from the cache, so zero-filling a large image holds neither
/// memory nor a writeback storm.
///
/// Where SEEK_DATA cannot tell holes from data (FUSE, NFS before 4.2) every
/// byte looks like data and nothing is filled: a new image, known to hold
/// nothing, takes [`write_zeros`] over all of it instead.
///
/// Only for a file no one else writes meanwhile (a volume being built):
/// zeros written over a hole a writer has just filled would destroy its
/// data.
pub fn zero_fill(file: &File, len: u64) -> io::Result<()> {
    // The data ranges first: filling changes what SEEK_DATA finds.
    let data: Vec<(u64, u64)> =
        super::extents::DataRanges::new(file, 0, len).collect::<io::Result<_>>()?;
    let mut at = 0;
    for (start, end) in data.into_iter().chain([(len, len)]) {
        if start > at {
            write_zeros(file, at, start)?;
        }
        at = end;
    }
    file.sync_all()
}

/// Writes zeros over `[start, end)` of `file` as [`zero_fill`] does a hole
/// (the device first, else through the page cache a batch at a time),
/// whatever is there: for a file known to hold nothing there, or nothing
/// that matters. Synced when it returns.
pub fn write_zeros(file: &File, start: u64, end: u64) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    const CHUNK: usize = 4 << 20;
    const BATCH: u64 = 256 << 20;
    let flags = FallocateFlags::from_bits_retain(FALLOC_FL_WRITE_ZEROES);
    match rustix::fs::fallocate(file, flags, start, end - start) {
        Ok(()) => return file.sync_data(),
        // A kernel before 6.17, a filesystem or device without it.
        Err(rustix::io::Errno::OPNOTSUPP | rustix::io::Errno::INVAL) => {}
        Err(e) => return Err(e.into()),
    }
    let zeros = vec![0u8; CHUNK];
    let mut at = start;
    let mut batch = start;
    while at < end {
        let n = usize::try_from(end - at).map_or(CHUNK, |left| left.min(CHUNK));
        file.write_all_at(&zeros[..n], at)?;
        at += n as u64;
        if at - batch >= BATCH || at == end {
            file.sync_data()?;
            let written = std::num::NonZeroU64::new(at - batch);
            rustix::fs::fadvise(file, batch, written, rustix::fs::Advice::DontNeed)?;
            batch = at;
        }
    }
    Ok(())
}

/// Bytes the file really occupies on disk (`st_blocks` x 512).
pub fn allocated_bytes(path: &Path) -> io::Result<u64> {
    Ok(std::fs::symlink_metadata(path)?.blocks() * 512)
}

/// Size and free space of the filesystem holding `path`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FsSpace {
    /// Total bytes.
    pub total: u64,
    /// Bytes an unprivileged writer can still use.
    pub available: u64,
}

/// statvfs(2) on `path`.
pub fn space(path: &Path) -> io::Result<FsSpace> {
    let st = rustix::fs::statvfs(path)?;
    Ok(FsSpace {
        total: st.f_blocks.saturating_mul(st.f_frsize),
        available: st.f_bavail.saturating_mul(st.f_frsize),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, Write};

    #[test]
    fn only_enoent_is_absence() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, b"x").unwrap();
        assert!(exists(&file).unwrap());
        assert!(!exists(&dir.path().join("missing")).unwrap());
        // A regular file where a directory is expected: ENOTDIR, an error,
        // where Path::exists says "no".
        let under_file = file.join("meta.json");
        assert!(!under_file.exists());
        let err = metadata_if_present(&under_file).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOTDIR));
        assert!(exists(&under_file).is_err());
        // A dangling symlink is there unless it is followed.
        let link = dir.path().join("l");
        std::os::unix::fs::symlink(dir.path().join("nowhere"), &link).unwrap();
        assert!(exists(&link).unwrap());
        assert!(metadata_if_present(&link).unwrap().is_none());
        // An injected I/O error on one path only.
        let _eio = crate::faults::inject_eio("f", 1);
        assert!(exists(&file).unwrap(), "the first look is let through");
        let err = exists(&file).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EIO));
        assert!(!exists(&dir.path().join("missing")).unwrap());
    }

    /// A zero-filled file has no hole left (an unwritten extent included),
    /// keeps its data where it had some, and reads zeros everywhere else;
    /// the hole after the data is longer than a batch, so the batching
    /// (sync and drop from the cache) runs too.
    #[test]
    fn zero_fill_writes_every_hole_and_keeps_the_data() {
        use std::os::unix::fs::FileExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("image");
        let len: u64 = 300 << 20;
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap();
        f.set_len(len).unwrap();
        f.write_all_at(&[0xab; 1 << 20], 8 << 20).unwrap();
        // An unwritten extent: allocated, reads as zeros, SEEK_HOLE's hole.
        rustix::fs::fallocate(&f, FallocateFlags::KEEP_SIZE, 20 << 20, 10 << 20)
            .expect("this test needs a temporary directory that can preallocate (fallocate)");
        zero_fill(&f, len).unwrap();
        let ranges: Vec<_> = crate::sys::extents::DataRanges::new(&f, 0, len)
            .collect::<io::Result<_>>()
            .unwrap();
        assert_eq!(ranges, [(0, len)], "a hole is left");
        assert!(allocated_bytes(&path).unwrap() >= len);
        let mut buf = vec![0u8; 1 << 20];
        for (at, byte) in [
            (0, 0),
            (8 << 20, 0xab),
            (9 << 20, 0),
            (20 << 20, 0),
            (299 << 20, 0),
        ] {
            f.read_exact_at(&mut buf, at).unwrap();
            assert!(buf.iter().all(|&b| b == byte), "at {at}: not {byte:#x}");
        }
    }

    #[test]
    fn every_replacement_moves_the_mtime_forward() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("meta.json");
        let stamp = || {
            let m = std::fs::metadata(&p).unwrap();
            (m.mtime(), m.mtime_nsec())
        };
        write_atomic(&p, b"one").unwrap();
        let mut last = stamp();
        // Faster than the kernel's coarse clock ticks.
        for i in 0..50 {
            write_atomic(&p, format!("v{i}").as_bytes()).unwrap();
            let now = stamp();
            assert!(now > last, "{now:?} is not after {last:?}");
            last = now;
        }
    }

    #[test]
    fn atomic_write_replaces_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("meta.json");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn sparse_copy_keeps_holes_and_data() {
        let dir = tempfile::tempdir().unwrap();
        let (sp, dp) = (dir.path().join("src"), dir.path().join("dst"));
        let mut src = File::create(&sp).unwrap();
        src.set_len(64 << 20).unwrap();
        src.seek(io::SeekFrom::Start(10 << 20)).unwrap();
        src.write_all(&[7u8; 1 << 20]).unwrap();
        src.seek(io::SeekFrom::Start((64 << 20) - 4096)).unwrap();
        src.write_all(&[9u8; 4096]).unwrap();
        src.sync_all().unwrap();
        let src = File::open(&sp).unwrap();
        let dst = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&dp)
            .unwrap();
        sparse_copy(&src, &dst, 64 << 20).unwrap();
        dst.sync_all().unwrap();
        assert_eq!(std::fs::read(&sp).unwrap(), std::fs::read(&dp).unwrap());
        // About 1 MiB + 4 KiB of data, far below the 64 MiB length.
        assert!(allocated_bytes(&dp).unwrap() < 4 << 20);
    }
}
