//! Opening and walking trees that a pod controls: a volume's files.
//!
//! The node plugin and the controller run as root, and a pod can rename,
//! replace or swap (`renameat2(RENAME_EXCHANGE)`) any name inside its volume
//! while they work on it. A walk that works on path strings checks one object
//! and then acts on whatever the name resolves to a moment later: a directory
//! swapped for a symlink to `/etc` turns a chgrp of the volume into a chgrp of
//! the host. So everything here goes through descriptors:
//!
//! - a child is opened relative to its parent's descriptor, one name at a
//!   time, `O_PATH | O_NOFOLLOW` (nothing is really opened: no FIFO blocks,
//!   no device driver runs) and with `openat2`'s `RESOLVE_BENEATH |
//!   RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV`: it never
//!   follows a link and never crosses into another mount;
//! - what it is comes from `fstat` on that descriptor, and what is done to it
//!   is done through the same descriptor: a swap after the open changes the
//!   name, not the object in hand;
//! - a regular file's data is read through a reopen of that descriptor
//!   (`/proc/self/fd/N`, which names the object, not a path), a directory's
//!   entries through `openat(fd, ".")`; nothing else is ever opened for I/O.
//!
//! Where `openat2` is missing (Linux before 5.6, or refused by a seccomp
//! profile) the same single-name open is
//! made with `openat(O_PATH | O_NOFOLLOW)`, which cannot escape either (a
//! name from a directory listing has no `/` and no `..`), and the mount is
//! compared by hand.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags, Stat, StatxFlags};

/// How every name inside an untrusted tree is resolved.
const RESOLVE: ResolveFlags = ResolveFlags::BENEATH
    .union(ResolveFlags::NO_SYMLINKS)
    .union(ResolveFlags::NO_MAGICLINKS)
    .union(ResolveFlags::NO_XDEV);

/// The deepest nesting a walk follows: a descriptor or two stay open per
/// level, and a pod can nest directories far deeper than any path could
/// name. A tree deeper than this is refused rather than exhausting the
/// process's descriptors (the server raises its soft limit to the hard one
/// at start; containers commonly get 1024 soft).
pub const MAX_DEPTH: usize = 256;

/// One object inside an untrusted tree: an `O_PATH` descriptor and what
/// `fstat` said about it when it was opened.
#[derive(Debug)]
pub struct Entry {
    fd: OwnedFd,
    stat: Stat,
}

impl Entry {
    /// What kind of file it is.
    pub fn kind(&self) -> FileType {
        FileType::from_raw_mode(self.stat.st_mode)
    }

    /// Its `fstat`, taken through the descriptor.
    pub fn stat(&self) -> &Stat {
        &self.stat
    }

    /// The descriptor (`O_PATH`).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Opens it as a directory to list or to work below it.
    pub fn open_dir(&self) -> io::Result<OwnedFd> {
        if self.kind() != FileType::Directory {
            return Err(rustix::io::Errno::NOTDIR.into());
        }
        // "." of the descriptor is the directory in hand, whatever its name
        // points at now.
        Ok(rustix::fs::openat(
            &self.fd,
            c".",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )?)
    }

    /// Opens a regular file for reading, without blocking and without ever
    /// opening anything else: the reopen goes through the descriptor, so it
    /// is the object `fstat` called a regular file.
    pub fn open_file(&self) -> io::Result<std::fs::File> {
        if self.kind() != FileType::RegularFile {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a regular file",
            ));
        }
        let fd = rustix::fs::open(
            proc_path(self.fd.as_fd()),
            OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        let st = rustix::fs::fstat(&fd)?;
        if (st.st_dev, st.st_ino) != (self.stat.st_dev, self.stat.st_ino) {
            return Err(io::Error::other("the file changed while it was reopened"));
        }
        Ok(std::fs::File::from(fd))
    }

    /// The target of a symlink, as stored.
    pub fn read_link(&self) -> io::Result<CString> {
        Ok(rustix::fs::readlinkat(&self.fd, c"", Vec::new())?)
    }

    /// Changes its owner and/or group, never following a symlink (a symlink
    /// is changed itself).
    pub fn chown(&self, uid: Option<u32>, gid: Option<u32>) -> io::Result<()> {
        Ok(rustix::fs::chownat(
            &self.fd,
            c"",
            uid.map(rustix::fs::Uid::from_raw_unchecked),
            gid.map(rustix::fs::Gid::from_raw_unchecked),
            AtFlags::EMPTY_PATH,
        )?)
    }

    /// Changes its mode (not for symlinks, whose mode means nothing): through
    /// `/proc/self/fd/N`, which resolves to the object in hand without
    /// opening it. (`fchmod` needs an open file, and `fchmodat` with
    /// `AT_EMPTY_PATH` is Linux 6.6.)
    pub fn chmod(&self, mode: u32) -> io::Result<()> {
        if self.kind() == FileType::Symlink {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a symlink has no mode to change",
            ));
        }
        Ok(rustix::fs::chmod(
            proc_path(self.fd.as_fd()),
            Mode::from_raw_mode(mode & 0o7777),
        )?)
    }
}

/// `/proc/self/fd/N`: the path of a descriptor's object, for the calls that
/// take no descriptor. The kernel resolves it to the object itself (a "magic
/// link"), not to a name that could have changed.
pub fn proc_path(fd: BorrowedFd<'_>) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// Opens the root of a tree: a trusted path (in the pool or under the
/// kubelet directory), never through a final symlink.
pub fn open_root(path: &Path) -> io::Result<OwnedFd> {
    Ok(rustix::fs::open(
        path,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

/// Opens the entry `name` of the directory `dir` without following it and
/// without leaving `dir`'s mount. `Ok(None)`: the name is gone (removed
/// since the listing) or is another mount's root; either way not part of
/// this tree.
pub fn child(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<Option<Entry>> {
    use rustix::io::Errno;
    let flags = OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let fd = match rustix::fs::openat2(dir, name, flags, Mode::empty(), RESOLVE) {
        Ok(fd) => fd,
        Err(Errno::NOENT | Errno::XDEV) => return Ok(None),
        // Before Linux 5.6, or a seccomp profile that does not know
        // openat2 (older runtimes' defaults answer EPERM).
        Err(Errno::NOSYS | Errno::PERM) => {
            let fd = match rustix::fs::openat(dir, name, flags, Mode::empty()) {
                Ok(fd) => fd,
                Err(Errno::NOENT) => return Ok(None),
                Err(e) => return Err(e.into()),
            };
            if mount_id(fd.as_fd())? != mount_id(dir)? {
                return Ok(None);
            }
            fd
        }
        Err(e) => return Err(e.into()),
    };
    let stat = rustix::fs::fstat(&fd)?;
    Ok(Some(Entry { fd, stat }))
}

/// Opens (O_PATH) a path below `dir`, several components long, never
/// leaving `dir` or its mount and never following a link.
pub fn open_beneath(dir: BorrowedFd<'_>, path: &Path) -> io::Result<Entry> {
    let fd = rustix::fs::openat2(
        dir,
        path,
        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
        RESOLVE,
    )?;
    let stat = rustix::fs::fstat(&fd)?;
    Ok(Entry { fd, stat })
}

fn mount_id(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let st = rustix::fs::statx(fd, c"", AtFlags::EMPTY_PATH, StatxFlags::MNT_ID)?;
    Ok(st.stx_mnt_id)
}

/// The names in the directory open at `dir`, without `.` and `..`.
pub fn names(dir: BorrowedFd<'_>) -> io::Result<Vec<CString>> {
    let mut out = Vec::new();
    for entry in rustix::fs::Dir::read_from(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        if name != c"." && name != c".." {
            out.push(name.to_owned());
        }
    }
    Ok(out)
}

/// Creates the directory `name` in `dir` and opens it: the new directory is
/// the one created here or, when it already exists, whatever is there, which
/// must be a directory and is never followed through a link.
pub fn make_dir(dir: BorrowedFd<'_>, name: &CStr, mode: u32) -> io::Result<OwnedFd> {
    match rustix::fs::mkdirat(dir, name, Mode::from_raw_mode(mode)) {
        Ok(()) | Err(rustix::io::Errno::EXIST) => {}
        Err(e) => return Err(e.into()),
    }
    Ok(rustix::fs::openat2(
        dir,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
        RESOLVE,
    )?)
}

/// Creates the new regular file `name` in `dir` for writing (it must not
/// exist: `O_EXCL` never opens what a link points at).
pub fn create_file(dir: BorrowedFd<'_>, name: &CStr, mode: u32) -> io::Result<std::fs::File> {
    let fd = rustix::fs::openat(
        dir,
        name,
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(mode),
    )?;
    Ok(std::fs::File::from(fd))
}

/// A path for messages: `root` joined with the names walked so far.
pub fn display(root: &Path, name: &CStr) -> PathBuf {
    use std::os::unix::ffi::OsStrExt;
    root.join(std::ffi::OsStr::from_bytes(name.to_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn children_are_opened_without_following_links() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("d")).unwrap();
        std::fs::write(dir.path().join("f"), b"data").unwrap();
        std::os::unix::fs::symlink("/etc", dir.path().join("l")).unwrap();
        let root = open_root(dir.path()).unwrap();
        let mut seen = names(root.as_fd()).unwrap();
        seen.sort();
        assert_eq!(
            seen,
            vec![c"d".to_owned(), c"f".to_owned(), c"l".to_owned()]
        );

        let link = child(root.as_fd(), c"l").unwrap().unwrap();
        assert_eq!(link.kind(), FileType::Symlink);
        assert_eq!(link.read_link().unwrap().as_c_str(), c"/etc");
        assert!(link.open_dir().is_err());
        assert!(link.chmod(0o777).is_err());

        let file = child(root.as_fd(), c"f").unwrap().unwrap();
        let mut s = String::new();
        std::io::Read::read_to_string(&mut file.open_file().unwrap(), &mut s).unwrap();
        assert_eq!(s, "data");
        file.chmod(0o640).unwrap();
        let m = std::fs::metadata(dir.path().join("f")).unwrap();
        assert_eq!(m.mode() & 0o7777, 0o640);

        assert!(child(root.as_fd(), c"missing").unwrap().is_none());
        // A path through a link is refused, not followed.
        assert!(open_beneath(root.as_fd(), Path::new("l/passwd")).is_err());
        assert!(open_beneath(root.as_fd(), Path::new("../")).is_err());
    }

    #[test]
    fn a_fifo_is_never_opened() {
        let dir = tempfile::tempdir().unwrap();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            dir.path().join("p"),
            FileType::Fifo,
            Mode::from_raw_mode(0o644),
            0,
        )
        .unwrap();
        let root = open_root(dir.path()).unwrap();
        // O_PATH: no writer needed, nothing blocks.
        let fifo = child(root.as_fd(), c"p").unwrap().unwrap();
        assert_eq!(fifo.kind(), FileType::Fifo);
        assert!(fifo.open_file().is_err());
        fifo.chmod(0o600).unwrap();
    }
}
