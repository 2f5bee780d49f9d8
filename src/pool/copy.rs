//! Copies of images and directory trees: a reflink where the pool's
//! filesystem can share blocks, else a byte copy that keeps holes.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use super::error::{io_error, PoolError};
use super::meta::CopyMethod;
use super::store::Fence;
use crate::sys::fs as sysfs;

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

/// Errors from FICLONE that mean "this filesystem (pair) cannot share
/// blocks", as opposed to a real failure.
fn reflink_unsupported(e: &io::Error) -> bool {
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
        Err(e) if reflink_unsupported(&e) => match fallback {
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

/// Copies the directory tree `src` into `dst` (which must not exist),
/// reflinking each file where the filesystem can, keeping modes, owners and
/// symlinks. Sockets, FIFOs and device nodes are not volume data and are
/// skipped.
pub fn copy_tree(src: &Path, dst: &Path) -> Result<(), PoolError> {
    let meta = std::fs::symlink_metadata(src).map_err(io_error("stat", src))?;
    std::fs::create_dir(dst).map_err(io_error("create directory", dst))?;
    for entry in std::fs::read_dir(src).map_err(io_error("read directory", src))? {
        let entry = entry.map_err(io_error("read directory", src))?;
        let (from, to) = (entry.path(), dst.join(entry.file_name()));
        let ft = entry.file_type().map_err(io_error("stat", &from))?;
        if ft.is_dir() {
            copy_tree(&from, &to)?;
        } else if ft.is_symlink() {
            let target = std::fs::read_link(&from).map_err(io_error("read link", &from))?;
            std::os::unix::fs::symlink(&target, &to).map_err(io_error("create link", &to))?;
            let m = std::fs::symlink_metadata(&from).map_err(io_error("stat", &from))?;
            std::os::unix::fs::lchown(&to, Some(m.uid()), Some(m.gid()))
                .map_err(io_error("chown", &to))?;
        } else if ft.is_file() {
            copy_file(&from, &to)?;
        }
    }
    copy_owner_and_mode(&meta, dst)
}

fn copy_file(from: &Path, to: &Path) -> Result<(), PoolError> {
    let meta = std::fs::symlink_metadata(from).map_err(io_error("stat", from))?;
    let src = File::open(from).map_err(io_error("open", from))?;
    let dst = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(to)
        .map_err(io_error("create", to))?;
    match sysfs::reflink(&src, &dst) {
        Ok(()) => {}
        Err(e) if reflink_unsupported(&e) => {
            sysfs::sparse_copy(&src, &dst, meta.len()).map_err(io_error("copy", to))?
        }
        Err(e) => return Err(io_error("reflink", to)(e)),
    }
    dst.sync_all().map_err(io_error("sync", to))?;
    copy_owner_and_mode(&meta, to)
}

fn copy_owner_and_mode(meta: &std::fs::Metadata, to: &Path) -> Result<(), PoolError> {
    std::os::unix::fs::lchown(to, Some(meta.uid()), Some(meta.gid()))
        .map_err(io_error("chown", to))?;
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(meta.mode() & 0o7777))
        .map_err(io_error("chmod", to))
}
