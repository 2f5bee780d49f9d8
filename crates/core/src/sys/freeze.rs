//! Filesystem freezes (`FIFREEZE`, `FITHAW`) and the one way filevol runs
//! the process that holds them: a child handed its descriptors.
//!
//! A freeze belongs to the superblock, not to the process that asked for
//! it: it outlives the process (measured here: a frozen ext4 stays frozen
//! after the freezer is SIGKILLed, and every writer on it blocks). So a
//! freeze is only ever held by a guardian child (`node::freeze`) that thaws
//! when its parent's pipe closes or its deadline passes, whichever comes
//! first, and the freezing code never depends on its own survival.

#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::Command;

/// `_IOWR('X', 119, int)` and `_IOWR('X', 120, int)` from linux/fs.h.
const FIFREEZE: libc::c_ulong = 0xC004_5877;
const FITHAW: libc::c_ulong = 0xC004_5878;

/// Freezes the filesystem that `fd` (any file or directory on it) lies on:
/// the kernel flushes it, makes it consistent on its device (a clean
/// journal) and blocks every new write until [`thaw`].
pub fn freeze(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: the descriptor is valid for the borrow, and FIFREEZE takes
    // no argument (the kernel ignores the third one).
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), FIFREEZE as _, 0) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Thaws the filesystem `fd` lies on. `Ok(false)` when it was not frozen
/// (EINVAL), so a sweep may thaw whatever it finds without knowing.
pub fn thaw(fd: BorrowedFd<'_>) -> io::Result<bool> {
    // SAFETY: as in `freeze`.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), FITHAW as _, 0) };
    if rc == 0 {
        return Ok(true);
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EINVAL) => Ok(false),
        _ => Err(err),
    }
}

/// Makes `command` hand the child the descriptors `fds` under their own
/// numbers (they are close-on-exec in this process, as every descriptor
/// filevol opens, so no other child ever inherits them).
pub fn pass_fds(command: &mut Command, fds: &[BorrowedFd<'_>]) {
    let raw: Vec<RawFd> = fds.iter().map(|fd| fd.as_raw_fd()).collect();
    // SAFETY: the closure runs in the child between fork and exec, where
    // only async-signal-safe calls are allowed: it calls fcntl alone, and
    // touches only `raw`, a copy made before the fork.
    unsafe {
        command.pre_exec(move || {
            for &fd in &raw {
                if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

/// Takes ownership of descriptor `fd`, handed to this process by its
/// parent ([`pass_fds`]), after checking it is open.
pub fn inherited(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: F_GETFD only reads the descriptor's flags; it fails with
    // EBADF for a number that is not open.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the descriptor is open (above) and was handed to this
    // process for it alone: its parent passed it under this number, and
    // nothing else in this process knows the number.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Makes this process ignore SIGINT, SIGTERM and SIGHUP: a guardian must
/// outlive whatever stops its parent (a Ctrl-C to the process group, a
/// terminal hanging up) long enough to thaw. SIGKILL still ends it, and
/// its parent then thaws instead.
pub fn ignore_stop_signals() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: SIG_IGN installs no handler code; signal() with it is
        // sound at any time.
        unsafe {
            libc::signal(sig, libc::SIG_IGN);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ioctl_numbers_are_linux_fs_h() {
        // _IOWR(type, nr, int): dir 3 << 30, size 4 << 16, type << 8, nr.
        let iowr =
            |nr: libc::c_ulong| (3 << 30) | (4 << 16) | (libc::c_ulong::from(b'X') << 8) | nr;
        assert_eq!(FIFREEZE, iowr(119));
        assert_eq!(FITHAW, iowr(120));
    }
}
