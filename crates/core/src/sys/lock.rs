//! Advisory locks that every filevol process sharing a pool agrees on:
//! whole-file open file description (OFD) locks, `fcntl(F_OFD_SETLK)`.
//!
//! The pool is shared by threads of one process (`--mode all`), by several
//! processes on one host (a controller beside a node plugin) and by
//! processes on several hosts (a shared NFS or CephFS pool). The lock kind
//! has to conflict in all three places; OFD locks are the only kind that
//! does:
//! - `flock` conflicts between open file descriptions on one host, but on
//!   NFS it is emulated with a classic POSIX lock, which the server sees per
//!   process, so two opens in one process no longer conflict there.
//! - Classic POSIX locks (`F_SETLK`, what `rustix::fs::fcntl_lock` makes)
//!   belong to the *process*: they never conflict between its threads, and
//!   closing any descriptor of the file silently drops all of them.
//! - OFD locks belong to the open file description, like flock, so two
//!   opens conflict even inside one process; they are byte-range locks, so
//!   the NFS client forwards them to the server (NLM for v3, LOCK for v4.x)
//!   with the open file as the owner, and CephFS and FUSE filesystems that
//!   implement POSIX locks see them too. The kernel drops them when the
//!   last descriptor of the open file description closes, so a killed
//!   process never leaves anything locked.
//!
//! A lock is taken on a file opened read-write (a write lock needs it) and
//! lasts as long as that `File`.

#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::time::Duration;

/// Which lock to take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockKind {
    /// Many holders at once (read-only stages, copies, shared directories).
    Shared,
    /// One holder (a writer's stage, a mutation, a delete).
    Exclusive,
}

/// Takes an OFD lock over the whole of `file` without waiting. `Ok(false)`
/// when another open file description, here or on another host, holds a
/// conflicting lock.
pub fn try_lock(file: &impl AsFd, kind: LockKind) -> io::Result<bool> {
    let l_type = match kind {
        LockKind::Shared => libc::F_RDLCK,
        LockKind::Exclusive => libc::F_WRLCK,
    };
    // l_len 0: from l_start to the end of the file, however it grows.
    // l_pid must be 0 for OFD locks.
    let request = libc::flock {
        // F_RDLCK, F_WRLCK and SEEK_SET are 0 to 2: they fit a short.
        #[allow(clippy::cast_possible_truncation)]
        l_type: l_type as libc::c_short,
        #[allow(clippy::cast_possible_truncation)]
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: 0,
        l_len: 0,
        l_pid: 0,
    };
    // SAFETY: the descriptor is valid for the borrow of `file`, and
    // F_OFD_SETLK reads exactly one `struct flock`, which `request` is and
    // which outlives the call.
    let rc = unsafe {
        libc::fcntl(
            file.as_fd().as_raw_fd(),
            libc::F_OFD_SETLK,
            &request as *const libc::flock,
        )
    };
    if rc == 0 {
        return Ok(true);
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::EACCES) => Ok(false),
        _ => Err(err),
    }
}

/// [`try_lock`], asked again over about `patience` before answering "held".
///
/// A lock can outlive its holder's close for a moment: a child process
/// forked by another thread shares the open file description until it
/// execs (the descriptor is close-on-exec). A test that decides whether a
/// volume is in use must not mistake that for a holder.
pub fn try_lock_for(file: &impl AsFd, kind: LockKind, patience: Duration) -> io::Result<bool> {
    let step = Duration::from_millis(10);
    let mut waited = Duration::ZERO;
    loop {
        if try_lock(file, kind)? {
            return Ok(true);
        }
        if waited >= patience {
            return Ok(false);
        }
        std::thread::sleep(step);
        waited += step;
    }
}

/// [`try_lock_for`] with the patience lock tests use: about 50 ms.
pub fn try_lock_patiently(file: &impl AsFd, kind: LockKind) -> io::Result<bool> {
    try_lock_for(file, kind, Duration::from_millis(50))
}

/// An OFD lock the kernel records on this host, as `/proc/locks` lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recorded {
    /// The (major, minor) of the filesystem's superblock. On btrfs this is
    /// not the `st_dev` that stat gives (a subvolume's anonymous device):
    /// it is the device the mount table names.
    pub device: (u32, u32),
    /// The inode locked.
    pub inode: u64,
    /// Read (shared) or write (exclusive).
    pub kind: LockKind,
}

/// The OFD locks granted on this host, from `/proc/locks`. A lock the
/// kernel holds for a file no process has open (a loop device's backing
/// file) is listed too, which is what makes a device's fence visible.
pub fn recorded() -> io::Result<Vec<Recorded>> {
    Ok(parse_recorded(&std::fs::read_to_string("/proc/locks")?))
}

/// Parses `/proc/locks`: `N: OFDLCK ADVISORY WRITE -1 00:28:257 0 EOF`.
/// Other kinds of lock (POSIX, FLOCK, leases: never filevol's) and
/// waiters (`N: -> ...`) are left out, as are lines of another shape.
pub fn parse_recorded(text: &str) -> Vec<Recorded> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace().skip(1);
            if fields.next()? != "OFDLCK" {
                return None;
            }
            let _advisory = fields.next()?;
            let kind = match fields.next()? {
                "READ" => LockKind::Shared,
                "WRITE" => LockKind::Exclusive,
                _ => return None,
            };
            let _pid = fields.next()?;
            let mut id = fields.next()?.split(':');
            let major = u32::from_str_radix(id.next()?, 16).ok()?;
            let minor = u32::from_str_radix(id.next()?, 16).ok()?;
            let inode = id.next()?.parse().ok()?;
            Some(Recorded {
                device: (major, minor),
                inode,
                kind,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::{File, OpenOptions};

    fn open(p: &std::path::Path) -> File {
        OpenOptions::new().read(true).write(true).open(p).unwrap()
    }

    #[test]
    fn two_opens_in_one_process_conflict() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("lock");
        File::create(&p).unwrap();
        let (a, b) = (open(&p), open(&p));
        assert!(try_lock(&a, LockKind::Exclusive).unwrap());
        // A classic POSIX lock would be granted here: same process.
        assert!(!try_lock(&b, LockKind::Shared).unwrap());
        assert!(!try_lock(&b, LockKind::Exclusive).unwrap());
        // Re-locking through the holder's own description converts it.
        assert!(try_lock(&a, LockKind::Shared).unwrap());
        assert!(try_lock(&b, LockKind::Shared).unwrap());
        assert!(!try_lock_for(&open(&p), LockKind::Exclusive, Duration::ZERO).unwrap());
        drop(a);
        drop(b);
        assert!(try_lock(&open(&p), LockKind::Exclusive).unwrap());
    }

    #[test]
    fn closing_another_descriptor_keeps_the_lock() {
        // With classic POSIX locks, this close would drop the lock.
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("lock");
        File::create(&p).unwrap();
        let holder = open(&p);
        assert!(try_lock(&holder, LockKind::Exclusive).unwrap());
        drop(open(&p));
        assert!(!try_lock(&open(&p), LockKind::Shared).unwrap());
    }

    #[test]
    fn a_duplicated_descriptor_shares_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("lock");
        File::create(&p).unwrap();
        let holder = open(&p);
        assert!(try_lock(&holder, LockKind::Exclusive).unwrap());
        let dup = holder.try_clone().unwrap();
        drop(holder);
        // The open file description lives on in `dup`.
        assert!(!try_lock(&open(&p), LockKind::Shared).unwrap());
        drop(dup);
        assert!(try_lock(&open(&p), LockKind::Shared).unwrap());
    }

    #[test]
    fn proc_locks_lines_are_read_for_ofd_locks_only() {
        let text = "\
1: OFDLCK ADVISORY  WRITE -1 00:28:257 0 EOF
2: OFDLCK ADVISORY  READ  -1 fd:01:1048577 0 EOF
2: -> OFDLCK ADVISORY  WRITE -1 fd:01:1048577 0 EOF
3: POSIX  ADVISORY  WRITE 812 08:01:4242 0 EOF
4: FLOCK  ADVISORY  WRITE 901 00:1a:77 0 EOF
garbage
";
        assert_eq!(
            parse_recorded(text),
            vec![
                Recorded {
                    device: (0, 0x28),
                    inode: 257,
                    kind: LockKind::Exclusive
                },
                Recorded {
                    device: (0xfd, 1),
                    inode: 1048577,
                    kind: LockKind::Shared
                },
            ]
        );
    }

    #[test]
    fn a_held_lock_is_recorded_with_the_mount_table_s_device() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("lock");
        File::create(&p).unwrap();
        let holder = open(&p);
        assert!(try_lock(&holder, LockKind::Exclusive).unwrap());
        let ino = std::os::unix::fs::MetadataExt::ino(&holder.metadata().unwrap());
        let mine: Vec<_> = recorded()
            .unwrap()
            .into_iter()
            .filter(|r| r.inode == ino && r.kind == LockKind::Exclusive)
            .collect();
        assert!(!mine.is_empty(), "the lock is listed in /proc/locks");
        drop(holder);
    }
}
