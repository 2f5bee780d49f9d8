//! FITRIM: ask a mounted filesystem to discard its free space.
//!
//! The filesystem sends a discard for every free extent to its device; on a
//! loop device a discard becomes a hole punched in the image
//! (`fallocate(PUNCH_HOLE)`), so what a pod deleted goes back to the pool.
//! The kernel answers with the bytes it asked the device to discard: the
//! free space it walked, not what was newly released (an extent discarded
//! last time is discarded again), so callers that want the space reclaimed
//! measure the image before and after.

#![allow(unsafe_code)]

use std::io;
use std::os::fd::AsFd;

use linux_raw_sys::ioctl::FITRIM;
use rustix::ioctl::{ioctl, Opcode, Updater};

/// `struct fstrim_range` from `<linux/fs.h>`: the range of the filesystem
/// to trim, and the smallest free extent worth a discard. The kernel
/// writes the bytes discarded back into `len`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct FstrimRange {
    start: u64,
    len: u64,
    minlen: u64,
}

/// Trims every free extent of the filesystem open at `fd` (any file or
/// directory on it), as `fstrim` does. Returns the bytes the filesystem
/// sent to its device as discards. EOPNOTSUPP: the device takes no
/// discards; EROFS: mounted read-only.
pub fn trim(fd: impl AsFd) -> io::Result<u64> {
    let mut range = FstrimRange {
        start: 0,
        len: u64::MAX,
        minlen: 0,
    };
    // SAFETY: FITRIM is _IOWR('X', 121, struct fstrim_range): it reads and
    // writes one `struct fstrim_range`, which `FstrimRange` lays out.
    unsafe {
        ioctl(
            fd.as_fd(),
            Updater::<{ FITRIM as Opcode }, FstrimRange>::new(&mut range),
        )
    }?;
    Ok(range.len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_filesystem_that_cannot_discard_says_so() {
        // /proc takes no FITRIM: the call fails with the kernel's reason
        // rather than reporting a trim.
        let proc = std::fs::File::open("/proc").unwrap();
        let err = trim(&proc).unwrap_err();
        assert!(
            matches!(
                err.raw_os_error(),
                Some(libc::ENOTTY) | Some(libc::EOPNOTSUPP) | Some(libc::EPERM)
            ),
            "{err}"
        );
    }
}
