//! Staging and target paths must lie under the kubelet directory, after
//! `..` and symlinks are resolved: nothing is ever mounted anywhere else.
//!
//! The check is a string check, and a name under the kubelet directory can
//! change after it (a symlink swapped in). So what is mounted on is opened
//! from a descriptor of the kubelet directory with `openat2`
//! (`RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS`) and the
//! mount is made on that descriptor (`crate::sys::mount`'s `*_at` calls):
//! the object checked is the object mounted on.

use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use rustix::fs::{FileType, Mode, OFlags, ResolveFlags};

use super::error::{sys, NodeError};

/// How a path under the kubelet directory is resolved from its descriptor.
const RESOLVE: ResolveFlags = ResolveFlags::BENEATH
    .union(ResolveFlags::NO_SYMLINKS)
    .union(ResolveFlags::NO_MAGICLINKS);

/// What [`create`] makes when the path is missing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Create {
    /// A directory (a filesystem or a directory volume is mounted on it).
    Dir,
    /// An empty file (a block device is bind-mounted on it).
    File,
}

fn relative<'p>(kubelet_dir: &Path, path: &'p Path) -> io::Result<&'p Path> {
    match path.strip_prefix(kubelet_dir) {
        Ok(rel) if !rel.as_os_str().is_empty() => Ok(rel),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not under {}", path.display(), kubelet_dir.display()),
        )),
    }
}

fn open_kubelet_dir(kubelet_dir: &Path) -> io::Result<OwnedFd> {
    Ok(rustix::fs::open(
        kubelet_dir,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

/// Opens (`O_PATH`) `path`, a checked path under `kubelet_dir`, from a
/// descriptor of the kubelet directory, never through a symlink.
pub fn open(kubelet_dir: &Path, path: &Path) -> io::Result<OwnedFd> {
    let dir = open_kubelet_dir(kubelet_dir)?;
    Ok(rustix::fs::openat2(
        &dir,
        relative(kubelet_dir, path)?,
        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
        RESOLVE,
    )?)
}

/// [`open`], for reading: a directory (a mount root) an ioctl can act on,
/// which an `O_PATH` descriptor cannot.
pub fn open_dir(kubelet_dir: &Path, path: &Path) -> io::Result<OwnedFd> {
    let dir = open_kubelet_dir(kubelet_dir)?;
    Ok(rustix::fs::openat2(
        &dir,
        relative(kubelet_dir, path)?,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
        RESOLVE,
    )?)
}

/// Creates `path` (a checked path under `kubelet_dir`) and its missing
/// parents, one name at a time from a descriptor of the kubelet directory,
/// and opens it (`O_PATH`). An existing directory (or, for `File`, an
/// existing file or bind-mounted device node) is opened as it is; a symlink
/// anywhere on the way is refused.
pub fn create(kubelet_dir: &Path, path: &Path, what: Create) -> io::Result<OwnedFd> {
    let rel = relative(kubelet_dir, path)?;
    let mut dir = open_kubelet_dir(kubelet_dir)?;
    // Usually kubelet has made the path already: one openat2 of the whole
    // of it, with the same resolution rules as the walk below, instead of
    // a mkdir and an open per name.
    if what == Create::Dir {
        match rustix::fs::openat2(
            &dir,
            rel,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
            RESOLVE,
        ) {
            Ok(fd) => return Ok(fd),
            Err(rustix::io::Errno::NOENT) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let names: Vec<&OsStr> = rel.iter().collect();
    let (last, parents) = names.split_last().expect("relative() is not empty");
    for name in parents {
        dir = make_dir(&dir, name)?;
    }
    match what {
        Create::Dir => make_dir(&dir, last),
        Create::File => {
            let opened = rustix::fs::openat2(
                &dir,
                *last,
                OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
                RESOLVE,
            );
            let fd = match opened {
                Err(rustix::io::Errno::NOENT) => {
                    drop(rustix::fs::openat(
                        &dir,
                        *last,
                        OFlags::WRONLY
                            | OFlags::CREATE
                            | OFlags::EXCL
                            | OFlags::NOFOLLOW
                            | OFlags::CLOEXEC,
                        Mode::from_raw_mode(0o640),
                    )?);
                    rustix::fs::openat2(
                        &dir,
                        *last,
                        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                        Mode::empty(),
                        RESOLVE,
                    )?
                }
                other => other?,
            };
            match FileType::from_raw_mode(rustix::fs::fstat(&fd)?.st_mode) {
                FileType::RegularFile | FileType::BlockDevice => Ok(fd),
                other => Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} is a {other:?}, not a file", path.display()),
                )),
            }
        }
    }
}

fn make_dir(dir: &OwnedFd, name: &OsStr) -> io::Result<OwnedFd> {
    match rustix::fs::mkdirat(dir.as_fd(), name, Mode::from_raw_mode(0o750)) {
        Ok(()) | Err(rustix::io::Errno::EXIST) => {}
        Err(e) => return Err(e.into()),
    }
    Ok(rustix::fs::openat2(
        dir,
        name,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
        RESOLVE,
    )?)
}

/// Resolves `path` (which may not exist yet: its deepest existing ancestor
/// is canonicalised and the rest appended, with no `..` allowed in the
/// rest) and checks that it lies strictly under `kubelet_dir` (canonical).
pub fn under_kubelet(
    field: &'static str,
    path: &str,
    kubelet_dir: &Path,
) -> Result<PathBuf, NodeError> {
    let outside = || NodeError::OutsideKubeletDir {
        field,
        path: PathBuf::from(path),
        kubelet_dir: kubelet_dir.to_owned(),
    };
    let p = Path::new(path);
    if !p.is_absolute() || path.contains('\0') {
        return Err(outside());
    }
    // The common case: a path of plain names below the (resolved) kubelet
    // directory. It is inside unless a symlink on it leads out, and one
    // `openat2` with RESOLVE_NO_SYMLINKS, the way every later open of it
    // goes (see the module notes), finds any symlink on its existing part
    // (ELOOP) in one call, where resolving it with `canonicalize` takes a
    // failing readlink per name and more for a path not made yet.
    if let Ok(rest) = p.strip_prefix(kubelet_dir) {
        if !rest.as_os_str().is_empty()
            && rest.components().all(|c| matches!(c, Component::Normal(_)))
        {
            return match beneath_without_symlinks(kubelet_dir, rest) {
                Ok(()) => Ok(p.to_owned()),
                Err(e) if leads_out(&e) => Err(outside()),
                // The path could not be looked at: the cause, not a verdict
                // on where it lies (stats would answer NOT_FOUND for it).
                Err(e) => Err(sys("resolve", p)(e)),
            };
        }
    }
    // Anything else (`.` or `..`, a kubelet directory reached through a
    // symlink): resolved as the kernel would, then checked.
    let mut existing = p.to_path_buf();
    let mut rest: Vec<std::ffi::OsString> = Vec::new();
    let resolved = loop {
        match existing.canonicalize() {
            Ok(c) => break c,
            Err(e) if !not_made_yet(&e) && !leads_out(&e) => {
                return Err(sys("resolve", &existing)(e));
            }
            Err(_) => {
                let name = existing.file_name().ok_or_else(outside)?.to_owned();
                rest.push(name);
                if !existing.pop() {
                    return Err(outside());
                }
            }
        }
    };
    let mut full = resolved;
    for name in rest.iter().rev() {
        match Path::new(name).components().next() {
            Some(Component::Normal(_)) => full.push(name),
            _ => return Err(outside()),
        }
    }
    if full.starts_with(kubelet_dir) && full != kubelet_dir {
        Ok(full)
    } else {
        Err(outside())
    }
}

/// Errors of a walk that say the path leaves the kubelet directory or
/// loops: a symlink where none may be (ELOOP), an escape (EXDEV).
fn leads_out(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ELOOP | libc::EXDEV))
}

/// Errors of a walk that say part of the path does not exist yet: a
/// missing name (ENOENT), a file where a directory would be (ENOTDIR).
fn not_made_yet(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENOTDIR))
}

/// Whether `rest` (plain names) resolves beneath `kubelet_dir` without a
/// symlink on the part of it that exists: a missing name (ENOENT) or a file
/// where a directory was expected (ENOTDIR) ends the walk before any
/// symlink was met, so the path is inside; a symlink (ELOOP) or an escape
/// (EXDEV) is an error.
fn beneath_without_symlinks(kubelet_dir: &Path, rest: &Path) -> io::Result<()> {
    let dir = open_kubelet_dir(kubelet_dir)?;
    match rustix::fs::openat2(
        &dir,
        rest,
        // Without O_NOFOLLOW: a symlink as the last name is refused too.
        OFlags::PATH | OFlags::CLOEXEC,
        Mode::empty(),
        RESOLVE,
    ) {
        Ok(_) | Err(rustix::io::Errno::NOENT | rustix::io::Errno::NOTDIR) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_must_stay_under_the_kubelet_dir() {
        let dir = tempfile::tempdir().unwrap();
        let kubelet = dir
            .path()
            .join("kubelet")
            .canonicalize()
            .unwrap_or_else(|_| {
                std::fs::create_dir(dir.path().join("kubelet")).unwrap();
                dir.path().join("kubelet").canonicalize().unwrap()
            });
        std::fs::create_dir_all(kubelet.join("pods/p1")).unwrap();
        let ok = under_kubelet(
            "target_path",
            kubelet.join("pods/p1/vol").to_str().unwrap(),
            &kubelet,
        )
        .unwrap();
        assert_eq!(ok, kubelet.join("pods/p1/vol"));
        // `..` that climbs out, a symlink that points out, the dir itself,
        // a relative path: all refused.
        let climb = format!("{}/pods/../../etc", kubelet.display());
        assert!(under_kubelet("target_path", &climb, &kubelet).is_err());
        std::os::unix::fs::symlink("/etc", kubelet.join("pods/evil")).unwrap();
        let via_link = format!("{}/pods/evil/x", kubelet.display());
        assert!(under_kubelet("target_path", &via_link, &kubelet).is_err());
        // The symlink itself as the last name, and one that stays inside:
        // every later open refuses symlinks, so the check does too.
        let evil = format!("{}/pods/evil", kubelet.display());
        assert!(under_kubelet("target_path", &evil, &kubelet).is_err());
        std::os::unix::fs::symlink(kubelet.join("pods/p1"), kubelet.join("pods/in")).unwrap();
        let inside_link = format!("{}/pods/in/vol", kubelet.display());
        assert!(under_kubelet("target_path", &inside_link, &kubelet).is_err());
        // Not made yet, below a file: inside (the later open says why it
        // cannot be used).
        let deep = kubelet.join("pods/p1/new/deeper/still");
        assert_eq!(
            under_kubelet("target_path", deep.to_str().unwrap(), &kubelet).unwrap(),
            deep
        );
        assert!(under_kubelet("target_path", kubelet.to_str().unwrap(), &kubelet).is_err());
        assert!(under_kubelet("target_path", "pods/p1", &kubelet).is_err());
        let missing_dotdot = format!("{}/pods/missing/../../..", kubelet.display());
        assert!(under_kubelet("target_path", &missing_dotdot, &kubelet).is_err());
    }
}
