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
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use rustix::fs::{AtFlags, FileType, Mode, OFlags, RawDir, ResolveFlags, Stat, StatxFlags};

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

/// The names in the directory open at `dir`, without `.` and `..`, all in
/// memory at once: for directories the driver made or copies whole. A tree a
/// pod fills is read with [`walk`] instead.
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

/// Bytes of directory entries one `getdents64` call may fill. A walk reads
/// each directory in pieces of this size as it goes, never whole, so it holds
/// one piece per level it has entered, whatever a directory holds (a pod can
/// put millions of names in one).
pub const DIR_CHUNK: usize = 8 * 1024;

/// Where a [`walk`] stops.
#[derive(Debug, Clone, Copy)]
pub struct WalkBounds<'a> {
    /// The deepest level visited: the root's entries are level 1, and a
    /// directory at this level is visited but not entered.
    pub max_depth: usize,
    /// When to give up, if ever: checked before every entry.
    pub deadline: Option<Instant>,
    /// Set by another thread to end the walk early (a process stopping).
    pub stop: Option<&'a AtomicBool>,
}

impl WalkBounds<'_> {
    /// Every level [`MAX_DEPTH`] allows, however long it takes.
    pub const WHOLE: WalkBounds<'static> = WalkBounds {
        max_depth: MAX_DEPTH,
        deadline: None,
        stop: None,
    };

    fn reached(&self) -> bool {
        self.deadline.is_some_and(|d| Instant::now() >= d)
            || self.stop.is_some_and(|s| s.load(Ordering::Relaxed))
    }
}

/// What a [`walk`] left out.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Walked {
    /// Directories at the depth bound, whose contents were not visited.
    pub not_entered: u64,
    /// The deadline passed, or the walk was told to stop, before it was
    /// done.
    pub cut_short: bool,
}

impl Walked {
    /// Whether every entry of the tree was visited.
    pub fn complete(&self) -> bool {
        self.not_entered == 0 && !self.cut_short
    }
}

/// Visits every entry of the tree below the directory open at `root` (not
/// `root` itself), depth first, through descriptors: each is opened with
/// [`child`], so a symlink is visited as a symlink and never followed, and
/// the root of another mount is neither visited nor entered. Directories are
/// read in [`DIR_CHUNK`] pieces as the walk goes, so memory does not grow
/// with the number of names. Stops at `bounds`, and says so in the answer;
/// an entry that vanishes while the walk runs is skipped.
pub fn walk(
    root: BorrowedFd<'_>,
    bounds: WalkBounds<'_>,
    visit: &mut dyn FnMut(&Entry),
) -> io::Result<Walked> {
    let mut walked = Walked::default();
    walk_below(root, 1, bounds, visit, &mut walked)?;
    Ok(walked)
}

fn walk_below(
    dir: BorrowedFd<'_>,
    depth: usize,
    bounds: WalkBounds<'_>,
    visit: &mut dyn FnMut(&Entry),
    walked: &mut Walked,
) -> io::Result<()> {
    let mut chunk = vec![MaybeUninit::<u8>::uninit(); DIR_CHUNK];
    let mut entries = RawDir::new(dir, &mut chunk);
    while let Some(raw) = entries.next() {
        let raw = raw?;
        let name = raw.file_name();
        if name == c"." || name == c".." {
            continue;
        }
        if bounds.reached() {
            walked.cut_short = true;
            return Ok(());
        }
        // Gone since it was read, or another mount's root: not in the tree.
        let Some(entry) = child(dir, name)? else {
            continue;
        };
        visit(&entry);
        if entry.kind() != FileType::Directory {
            continue;
        }
        if depth >= bounds.max_depth {
            walked.not_entered += 1;
            continue;
        }
        let inner = entry.open_dir()?;
        // One descriptor per level, not two.
        drop(entry);
        walk_below(inner.as_fd(), depth + 1, bounds, visit, walked)?;
        if walked.cut_short {
            return Ok(());
        }
    }
    Ok(())
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

    /// The inode numbers a walk visits, and what it says it left out.
    fn walk_inodes(root: &Path, bounds: WalkBounds<'_>) -> (Vec<u64>, Walked) {
        let fd = open_root(root).unwrap();
        let mut seen = Vec::new();
        let walked = walk(fd.as_fd(), bounds, &mut |e: &Entry| {
            seen.push(e.stat().st_ino)
        })
        .unwrap();
        (seen, walked)
    }

    const UNBOUNDED: WalkBounds<'static> = WalkBounds::WHOLE;

    /// The inode numbers of everything below `root`, from the standard
    /// library's walk (which follows nothing either).
    fn inodes_below(root: &Path, out: &mut Vec<u64>) {
        for e in std::fs::read_dir(root).unwrap() {
            let e = e.unwrap();
            let m = std::fs::symlink_metadata(e.path()).unwrap();
            out.push(m.ino());
            if m.is_dir() {
                inodes_below(&e.path(), out);
            }
        }
    }

    #[test]
    fn a_walk_visits_every_entry_of_directories_many_chunks_long_once() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let top = open_root(root).unwrap();
        // Far more names than one chunk holds (an entry takes 24 bytes
        // and its name), in the root and in a subdirectory.
        let sub = make_dir(top.as_fd(), c"sub", 0o755).unwrap();
        for i in 0..6000 {
            let name = CString::new(format!("file-with-a-longish-name-{i:05}")).unwrap();
            create_file(top.as_fd(), &name, 0o644).unwrap();
            if i % 3 == 0 {
                create_file(sub.as_fd(), &name, 0o644).unwrap();
            }
        }
        std::fs::write(root.join("sub/data"), vec![1u8; 64 << 10]).unwrap();
        let (mut seen, walked) = walk_inodes(root, UNBOUNDED);
        assert!(walked.complete());
        let mut expected = Vec::new();
        inodes_below(root, &mut expected);
        assert_eq!(seen.len(), 6000 + 2000 + 2);
        seen.sort_unstable();
        expected.sort_unstable();
        assert_eq!(seen, expected, "each entry once, none left out");
    }

    #[test]
    fn a_walk_visits_symlinks_without_following_them() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::create_dir(outside.path().join("d")).unwrap();
        std::fs::write(outside.path().join("d/secret"), b"x").unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path().join("d"), dir.path().join("to-dir")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", dir.path().join("to-file")).unwrap();
        let fd = open_root(dir.path()).unwrap();
        let mut kinds = Vec::new();
        let walked = walk(fd.as_fd(), UNBOUNDED, &mut |e: &Entry| kinds.push(e.kind())).unwrap();
        assert!(walked.complete());
        assert_eq!(kinds, vec![FileType::Symlink, FileType::Symlink]);
    }

    #[test]
    fn a_walk_stops_at_its_depth_bound_and_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let deep = dir.path().join("1/2/3/4/5/6");
        std::fs::create_dir_all(&deep).unwrap();
        std::fs::write(deep.join("f"), b"x").unwrap();
        std::fs::write(dir.path().join("1/2/f"), b"x").unwrap();
        let bounds = WalkBounds {
            max_depth: 3,
            ..WalkBounds::WHOLE
        };
        let (seen, walked) = walk_inodes(dir.path(), bounds);
        // 1, 1/2, 1/2/f, 1/2/3 (visited, not entered).
        assert_eq!(seen.len(), 4, "{seen:?}");
        assert_eq!(walked.not_entered, 1);
        assert!(!walked.complete());
        let (seen, walked) = walk_inodes(dir.path(), UNBOUNDED);
        assert_eq!((seen.len(), walked.complete()), (8, true));
    }

    #[test]
    fn a_walk_stops_at_its_deadline_or_when_told_and_says_so() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f"), b"x").unwrap();
        let bounds = WalkBounds {
            deadline: Some(Instant::now()),
            ..WalkBounds::WHOLE
        };
        let (seen, walked) = walk_inodes(dir.path(), bounds);
        assert!(seen.is_empty());
        assert!(walked.cut_short && !walked.complete());
        let stop = AtomicBool::new(true);
        let bounds = WalkBounds {
            stop: Some(&stop),
            ..WalkBounds::WHOLE
        };
        let (seen, walked) = walk_inodes(dir.path(), bounds);
        assert!(seen.is_empty() && walked.cut_short);
    }

    /// A tmpfs mounted for a test, unmounted when dropped.
    struct Tmpfs(PathBuf);

    impl Drop for Tmpfs {
        fn drop(&mut self) {
            filevol_kit::scratch::unmount_patiently(&self.0);
        }
    }

    #[test]
    #[ignore = "needs root"]
    fn a_walk_does_not_enter_another_mount() {
        filevol_kit::needs::root();
        let dir = tempfile::tempdir().unwrap();
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        std::fs::write(dir.path().join("mine"), b"x").unwrap();
        crate::sys::mount::mount_fs(
            Path::new("tmpfs"),
            &mnt,
            "tmpfs",
            rustix::mount::MountFlags::empty(),
            "size=1m",
        )
        .unwrap();
        let _mounted = Tmpfs(mnt.clone());
        std::fs::write(mnt.join("theirs"), b"x").unwrap();
        std::fs::create_dir(mnt.join("deeper")).unwrap();
        let (seen, walked) = walk_inodes(dir.path(), UNBOUNDED);
        assert!(walked.complete());
        let mine = std::fs::metadata(dir.path().join("mine")).unwrap().ino();
        // The mount point's root is not in this tree, nor what it holds.
        assert_eq!(seen, vec![mine]);
    }
}
