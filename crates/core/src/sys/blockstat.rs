//! What the kernel counts for a block device and for the filesystem on
//! it: `/sys/block/<dev>/stat` (I/O done) and `/sys/fs/ext4/<dev>/`
//! (errors recorded). One small read each, whatever the device holds.

use std::io;
use std::path::Path;

/// A block device's I/O counters (`Documentation/block/stat.rst`): what
/// completed since it was set up; errors are not counted there.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IoStat {
    /// Reads completed.
    pub reads: u64,
    /// 512-byte sectors read.
    pub read_sectors: u64,
    /// Milliseconds spent reading (summed over requests).
    pub read_ms: u64,
    /// Writes completed.
    pub writes: u64,
    /// 512-byte sectors written.
    pub write_sectors: u64,
    /// Milliseconds spent writing.
    pub write_ms: u64,
    /// Requests in flight now.
    pub in_flight: u64,
    /// Milliseconds the device had requests in flight (its busy time).
    pub io_ms: u64,
    /// Discards completed (0 on kernels before 4.18).
    pub discards: u64,
    /// 512-byte sectors discarded.
    pub discard_sectors: u64,
    /// Flushes completed (0 on kernels before 5.5).
    pub flushes: u64,
}

/// Parses the text of a `stat` file.
pub fn parse_stat(text: &str) -> io::Result<IoStat> {
    let f: Vec<u64> = text
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("block stat: {e}")))?;
    if f.len() < 11 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("block stat has {} fields, 11 at least expected", f.len()),
        ));
    }
    let at = |i: usize| f.get(i).copied().unwrap_or(0);
    Ok(IoStat {
        reads: at(0),
        read_sectors: at(2),
        read_ms: at(3),
        writes: at(4),
        write_sectors: at(6),
        write_ms: at(7),
        in_flight: at(8),
        io_ms: at(9),
        discards: at(11),
        discard_sectors: at(13),
        flushes: at(15),
    })
}

/// The counters of block device `name` (for example "loop3").
pub fn io_stat(name: &str) -> io::Result<IoStat> {
    parse_stat(&std::fs::read_to_string(
        Path::new("/sys/block").join(name).join("stat"),
    )?)
}

/// The errors ext4 has recorded on the filesystem of device `name` (its
/// superblock's `s_error_count`, kept across mounts until fsck clears
/// it), or `None` where no ext4 is mounted from it.
pub fn ext4_errors(name: &str) -> io::Result<Option<u64>> {
    let path = Path::new("/sys/fs/ext4").join(name).join("errors_count");
    match std::fs::read_to_string(&path) {
        Ok(text) => text.trim().parse().map(Some).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: {e}", path.display()),
            )
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Whether the filesystem mounted at `dir` refuses to be opened with EIO:
/// what an xfs that shut itself down answers to every open (and what
/// other filesystems answer when their device is gone). Opening a
/// directory does no I/O on a healthy filesystem.
pub fn refuses_open(dir: &Path) -> io::Result<bool> {
    use rustix::fs::{Mode, OFlags};
    match rustix::fs::open(
        dir,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    ) {
        Ok(_) => Ok(false),
        Err(rustix::io::Errno::IO) => Ok(true),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kernel_s_stat_line_is_read() {
        // 4.18 to 5.4: 15 fields; 5.5 on: 17.
        let s = parse_stat(
            "    1459        0    70730      311     9037      191  1208336    27110        2    12116    28094      12    0   2048    4   55   77\n",
        )
        .unwrap();
        assert_eq!(s.reads, 1459);
        assert_eq!(s.read_sectors, 70730);
        assert_eq!(s.read_ms, 311);
        assert_eq!(s.writes, 9037);
        assert_eq!(s.write_sectors, 1_208_336);
        assert_eq!(s.write_ms, 27110);
        assert_eq!(s.in_flight, 2);
        assert_eq!(s.io_ms, 12116);
        assert_eq!(s.discards, 12);
        assert_eq!(s.discard_sectors, 2048);
        assert_eq!(s.flushes, 55);
        let old = parse_stat("1 0 2 3 4 0 5 6 0 7 8").unwrap();
        assert_eq!((old.writes, old.discards, old.flushes), (4, 0, 0));
        assert!(parse_stat("1 2 3").is_err());
        assert!(parse_stat("1 x 3 4 5 6 7 8 9 10 11").is_err());
    }

    #[test]
    fn a_device_without_ext4_has_no_error_count() {
        assert_eq!(ext4_errors("no-such-device").unwrap(), None);
    }
}
