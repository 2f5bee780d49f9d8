//! Copies of images and directory trees: a reflink where the pool's
//! filesystem can share blocks, else a byte copy that keeps holes.

use std::ffi::CStr;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use rustix::fs::{AtFlags, FileType, Mode, Stat};

use super::error::{io_error, PoolError};
use super::store::Fence;
use crate::sys::fs as sysfs;
use crate::sys::untrusted;
use crate::volume::meta::CopyMethod;

/// What to do where the pool cannot reflink.
#[allow(missing_debug_implementations)]
pub enum Fallback<'a> {
    /// Refuse: the caller needs a copy that is instant and atomic.
    Refuse,
    /// Copy the bytes, after `check` has approved the source; what it
    /// returns (the source's fence, held shared) is kept for the copy's
    /// duration.
    Sparse(&'a dyn Fn() -> Result<Option<Fence>, PoolError>),
}

/// Copies the image `src` into the new file `dst` (which must not exist),
/// `len` bytes long, and syncs it.
pub fn copy_image(
    src: &Path,
    dst: &Path,
    len: u64,
    fallback: Fallback<'_>,
) -> Result<CopyMethod, PoolError> {
    let src_file = File::open(src).map_err(io_error("open source image", src))?;
    let dst_file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(dst)
        .map_err(io_error("create image", dst))?;
    let method = match sysfs::reflink(&src_file, &dst_file) {
        Ok(()) => {
            // The source may be shorter than `len` (an image being grown):
            // extend sparsely.
            if dst_file
                .metadata()
                .map_err(io_error("stat image", dst))?
                .len()
                < len
            {
                dst_file.set_len(len).map_err(io_error("grow image", dst))?;
            }
            CopyMethod::Reflink
        }
        Err(e) if sysfs::reflink_unsupported(&e) => match fallback {
            Fallback::Refuse => {
                return Err(PoolError::NeedsReflink(format!(
                    "the pool filesystem cannot reflink {} ({e}); this operation needs reflink",
                    src.display()
                )))
            }
            Fallback::Sparse(check) => {
                let _held = check()?;
                sysfs::sparse_copy(&src_file, &dst_file, len)
                    .map_err(io_error("copy image", dst))?;
                CopyMethod::Sparse
            }
        },
        Err(e) => return Err(io_error("reflink image", dst)(e)),
    };
    dst_file.sync_all().map_err(io_error("sync image", dst))?;
    Ok(method)
}

/// Copies the directory tree `src` (a `dir` volume's data: every name in it
/// is the pod's) into `dst` (which must not exist), reflinking each file
/// where the filesystem can, keeping modes, owners and symlinks (as links).
///
/// The walk goes through descriptors (`crate::sys::untrusted`): an entry is
/// opened without following it, its type comes from `fstat` on that
/// descriptor and its data is read through it, so a pod that swaps a name
/// for a link to the host while the copy runs gets the link copied, never
/// the host's files. Nothing but regular files and directories is opened:
/// FIFOs are recreated (a mknod, as the pod left them), sockets and device
/// nodes are not volume data and are skipped. Other mounts inside the tree
/// are not entered.
pub fn copy_tree(src: &Path, dst: &Path) -> Result<(), PoolError> {
    let from = untrusted::open_root(src).map_err(io_error("open", src))?;
    let root = rustix::fs::fstat(&from).map_err(|e| io_error("stat", src)(e.into()))?;
    std::fs::create_dir(dst).map_err(io_error("create directory", dst))?;
    let to = untrusted::open_root(dst).map_err(io_error("open", dst))?;
    copy_dir(from.as_fd(), to.as_fd(), src, dst, 0)?;
    copy_owner_and_mode(&root, to.as_fd(), dst)
}

fn copy_dir(
    from: BorrowedFd<'_>,
    to: BorrowedFd<'_>,
    src: &Path,
    dst: &Path,
    depth: usize,
) -> Result<(), PoolError> {
    if depth >= untrusted::MAX_DEPTH {
        return Err(io_error("copy", src)(io::Error::other(format!(
            "directories nested deeper than {} levels",
            untrusted::MAX_DEPTH
        ))));
    }
    for name in untrusted::names(from).map_err(io_error("read directory", src))? {
        let (src, dst) = (
            untrusted::display(src, &name),
            untrusted::display(dst, &name),
        );
        let Some(entry) = untrusted::child(from, &name).map_err(io_error("open", &src))? else {
            continue;
        };
        let (uid, gid) = (entry.stat().st_uid, entry.stat().st_gid);
        match entry.kind() {
            FileType::Directory => {
                let inner = entry.open_dir().map_err(io_error("open", &src))?;
                let stat = *entry.stat();
                // Two descriptors per level, not three.
                drop(entry);
                let made = untrusted::make_dir(to, &name, 0o700)
                    .map_err(io_error("create directory", &dst))?;
                copy_dir(inner.as_fd(), made.as_fd(), &src, &dst, depth + 1)?;
                copy_owner_and_mode(&stat, made.as_fd(), &dst)?;
            }
            FileType::Symlink => {
                let target = entry.read_link().map_err(io_error("read link", &src))?;
                rustix::fs::symlinkat(target.as_c_str(), to, name.as_c_str())
                    .map_err(|e| io_error("create link", &dst)(e.into()))?;
                chown_at(to, &name, uid, gid).map_err(io_error("chown", &dst))?;
            }
            FileType::RegularFile => {
                let source = entry.open_file().map_err(io_error("open", &src))?;
                let copy =
                    untrusted::create_file(to, &name, 0o600).map_err(io_error("create", &dst))?;
                match sysfs::reflink(&source, &copy) {
                    Ok(()) => {}
                    Err(e) if sysfs::reflink_unsupported(&e) => sysfs::sparse_copy(
                        &source,
                        &copy,
                        entry.stat().st_size.try_into().unwrap_or(0),
                    )
                    .map_err(io_error("copy", &dst))?,
                    Err(e) => return Err(io_error("reflink", &dst)(e)),
                }
                copy.sync_all().map_err(io_error("sync", &dst))?;
                copy_owner_and_mode(entry.stat(), copy.as_fd(), &dst)?;
            }
            FileType::Fifo => {
                let mode = Mode::from_raw_mode(entry.stat().st_mode & 0o7777);
                rustix::fs::mknodat(to, name.as_c_str(), FileType::Fifo, mode, 0)
                    .map_err(|e| io_error("create FIFO", &dst)(e.into()))?;
                chown_at(to, &name, uid, gid).map_err(io_error("chown", &dst))?;
            }
            other => log::debug!("copy: skipping {} ({other:?})", src.display()),
        }
    }
    Ok(())
}

fn chown_at(dir: BorrowedFd<'_>, name: &CStr, uid: u32, gid: u32) -> io::Result<()> {
    Ok(rustix::fs::chownat(
        dir,
        name,
        Some(rustix::fs::Uid::from_raw_unchecked(uid)),
        Some(rustix::fs::Gid::from_raw_unchecked(gid)),
        AtFlags::SYMLINK_NOFOLLOW,
    )?)
}

/// Gives the copy `to` (open: a directory or a file this copy created) the
/// owner and mode of the original.
fn copy_owner_and_mode(meta: &Stat, to: BorrowedFd<'_>, path: &Path) -> Result<(), PoolError> {
    rustix::fs::fchown(
        to,
        Some(rustix::fs::Uid::from_raw_unchecked(meta.st_uid)),
        Some(rustix::fs::Gid::from_raw_unchecked(meta.st_gid)),
    )
    .map_err(|e| io_error("chown", path)(e.into()))?;
    rustix::fs::fchmod(to, Mode::from_raw_mode(meta.st_mode & 0o7777))
        .map_err(|e| io_error("chmod", path)(e.into()))
}
