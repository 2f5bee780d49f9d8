//! Directory volumes on a btrfs pool: each is a subvolume with a quota
//! group whose limit is the volume's size.
//!
//! A plain directory has no size and cannot be copied at one instant; a
//! subvolume has both: its qgroup limit refuses writes past the volume's
//! capacity (EDQUOT), and a snapshot of it is atomic however many pods
//! write it, so a snapshot or clone of a live `dir` volume is a consistent
//! tree. Snapshots are read-only subvolumes, clones and restores writable
//! ones with their own limit.
//!
//! Whether a volume's data is a subvolume is recorded in its record
//! (`VolumeMeta::subvolume`, `SnapshotMeta::subvolume`), never guessed:
//! directories made before this, or on another filesystem, stay plain and
//! behave as they always did. Removal alone also looks at the object itself
//! (`remove_object`), because it also clears scratch debris that has no
//! record and a read-only snapshot that no plain `remove_dir_all` can empty.
//!
//! Quotas are turned on by the first subvolume volume made, not when the
//! pool opens: qgroup accounting costs on every extent change of the whole
//! filesystem (reflinked image snapshots, their deletes), so a btrfs pool
//! that only holds images never pays for it; and only a controller making
//! a `dir` volume needs the privilege (CAP_SYS_ADMIN), never a node plugin
//! opening the pool. A process without it makes plain directories, as
//! before, and says so once.

use std::ffi::CStr;
use std::io;
use std::os::fd::AsFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use super::error::io_error;
use super::PoolError;
use crate::sys::btrfs::{self, QgroupUsage};
use crate::sys::untrusted;

/// The name of an object's data directory (see `Pool::data_path`).
const DATA: &CStr = c"data";

/// Whether this process has said it cannot turn quotas on.
static NO_QUOTA_SAID: AtomicBool = AtomicBool::new(false);

/// Makes `built/data` a subvolume whose qgroup limit is `capacity` bytes,
/// where the pool is btrfs and this process may turn quotas on.
/// `Ok(false)`: nothing made; the caller makes a plain directory.
pub(super) fn create(built: &Path, capacity: u64) -> Result<bool, PoolError> {
    let parent = untrusted::open_root(built).map_err(io_error("open", built))?;
    if !btrfs::is_btrfs(&parent).map_err(io_error("statfs", built))? {
        return Ok(false);
    }
    match btrfs::enable_quota(parent.as_fd()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
            if !NO_QUOTA_SAID.swap(true, Ordering::Relaxed) {
                log::warn!(
                    "pool {}: btrfs quotas cannot be turned on by this process ({e}; it needs CAP_SYS_ADMIN): dir volumes are plain directories without an enforced size or live snapshots",
                    built.display()
                );
            }
            return Ok(false);
        }
        Err(e) => return Err(io_error("turn on btrfs quotas of", built)(e)),
    }
    let data = built.join("data");
    btrfs::create_subvolume(parent.as_fd(), DATA)
        .map_err(io_error("create btrfs subvolume", &data))?;
    set_limit(&data, capacity)?;
    Ok(true)
}

/// Snapshots the subvolume `from` (a volume's or snapshot's data) as
/// `built/data`, at one instant: read-only for a snapshot, else writable
/// with its own limit of `limit` bytes (a clone or restore; a snapshot's
/// qgroup starts with its source's limit, which the new size replaces).
pub(super) fn snapshot(
    from: &Path,
    built: &Path,
    read_only: bool,
    limit: Option<u64>,
) -> Result<(), PoolError> {
    let source = untrusted::open_root(from).map_err(io_error("open", from))?;
    if !btrfs::is_subvolume(&source).map_err(io_error("stat", from))? {
        // The record says subvolume; what is there is not one.
        return Err(PoolError::Damaged {
            path: from.to_owned(),
            problem: "its record says it is a btrfs subvolume, and it is not".into(),
        });
    }
    let parent = untrusted::open_root(built).map_err(io_error("open", built))?;
    let data = built.join("data");
    btrfs::snapshot(source.as_fd(), parent.as_fd(), DATA, read_only)
        .map_err(io_error("snapshot btrfs subvolume", &data))?;
    if let Some(limit) = limit {
        set_limit(&data, limit)?;
    }
    Ok(())
}

/// Sets the qgroup limit of the subvolume `data` to `bytes`.
pub(super) fn set_limit(data: &Path, bytes: u64) -> Result<(), PoolError> {
    let fd = untrusted::open_root(data).map_err(io_error("open", data))?;
    let id = btrfs::subvolume_id(fd.as_fd()).map_err(io_error("look up subvolume", data))?;
    btrfs::limit_qgroup(fd.as_fd(), id, bytes).map_err(io_error("limit the qgroup of", data))
}

/// The qgroup figures of the subvolume `data` (a volume's or snapshot's
/// data directory), as of the filesystem's last transaction commit
/// (btrfs commits every 30 s by default; a snapshot commits at once).
pub fn usage(data: &Path) -> io::Result<QgroupUsage> {
    let fd = untrusted::open_root(data)?;
    let id = btrfs::subvolume_id(fd.as_fd())?;
    btrfs::qgroup_usage(fd.as_fd(), id)
}

/// Whether `data` is a btrfs subvolume (for debris without a record, and
/// for capacity's count of a snapshot). A missing `data` is not one.
pub(super) fn is_subvolume(data: &Path) -> io::Result<bool> {
    match untrusted::open_root(data) {
        Ok(fd) => btrfs::is_subvolume(&fd),
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ENOTDIR)) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Removes the object at `path` (a volume's or snapshot's directory moved
/// out of the pool, or a half-built one): a file, or a directory whose
/// `data` may be a subvolume. A subvolume goes in one ioctl, read-only or
/// not and however large, and then its qgroup, so `btrfs qgroup show` keeps
/// no `0/<id>` of a deleted volume. One a pod filled with subvolumes of its
/// own cannot go in one ioctl (ENOTEMPTY); the tree walk below empties it,
/// and removing an empty subvolume's directory deletes it.
pub(super) fn remove_object(path: &Path) -> io::Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !meta.is_dir() {
        return std::fs::remove_file(path);
    }
    let data = path.join("data");
    let mut qgroup = None;
    if is_subvolume(&data)? {
        let parent = untrusted::open_root(path)?;
        let id = btrfs::subvolume_id(untrusted::open_root(&data)?.as_fd())?;
        match btrfs::destroy_subvolume(parent.as_fd(), DATA) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOTEMPTY) => {
                log::warn!(
                    "{}: holds subvolumes of its own; removing it file by file",
                    data.display()
                );
            }
            Err(e) => return Err(e),
        }
        qgroup = Some(id);
    }
    std::fs::remove_dir_all(path)?;
    if let Some(id) = qgroup {
        // Asked through a directory that still exists: the one `path` was in.
        let around = untrusted::open_root(path.parent().unwrap_or(Path::new("/")))?;
        if !btrfs::destroy_qgroup(around.as_fd(), id)? {
            log::warn!(
                "qgroup 0/{id} of {} stays until btrfs has dropped the subvolume's tree",
                data.display()
            );
        }
    }
    Ok(())
}
