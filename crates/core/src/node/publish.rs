//! NodePublishVolume and NodeUnpublishVolume: bind the staged volume (its
//! mount, or its device node) onto the pod's target, read-only and with the
//! pod's group as asked, and the reverse.
//!
//! A publish that finds the target already holding this volume with the
//! same read-only setting answers OK (kubelet retries); one that fails after
//! its bind unmounts it again. ReadWriteOncePod is decided by identity: any
//! mount of the volume under the kubelet directory other than its stage is
//! another publish, wherever its target is (`node::mounts`).

use std::os::fd::{AsFd, BorrowedFd};
use std::path::Path;

use super::error::{sys, NodeError};
use super::paths::{self, Create};
use super::rollback::Rollback;
use super::{Node, Request, BLOCK_DEVICE_FILE};
use crate::pool::Pool;
use crate::sys::mount::MountState;
use crate::sys::untrusted;
use crate::volume::meta::{AccessMode, AccessType, VolumeMeta};

impl Node {
    /// NodePublishVolume: binds the staged volume onto the target.
    pub fn publish(
        &self,
        pool: &Pool,
        v: &VolumeMeta,
        staging: &Path,
        target: &Path,
        req: &Request,
    ) -> Result<(), NodeError> {
        self.refuse_unproven(&v.id)?;
        let block = req.access == AccessType::Block;
        let read_only = req.readonly || req.mode.is_read_only();
        let source = if block {
            staging.join(BLOCK_DEVICE_FILE)
        } else {
            staging.to_owned()
        };
        // By identity, not by path: the staging path must hold this
        // volume (another volume staged there is not this one's stage), and
        // a target already mounted must hold it too.
        if self.mount_state(&source)? != MountState::Mounted || !self.holds(pool, &v.id, &source)? {
            return Err(NodeError::NotStaged {
                id: v.id.clone(),
                path: staging.to_owned(),
            });
        }
        if self.mount_state(target)? == MountState::Mounted {
            if !self.holds(pool, &v.id, target)? {
                return Err(NodeError::Occupied {
                    path: target.to_owned(),
                    what: "another volume".into(),
                });
            }
            let now = self
                .kernel
                .mounted_read_only(target)
                .map_err(sys("statvfs", target))?;
            if now != read_only {
                return Err(NodeError::Occupied {
                    path: target.to_owned(),
                    what: "this volume published with another read-only setting".into(),
                });
            }
            return Ok(());
        }
        if req.mode == AccessMode::SingleNodeSingleWriter {
            // Any mount of this volume under the kubelet directory but its
            // stage is a publish, wherever it is.
            if let Some(other) = self
                .mounts_of(pool, &v.id)?
                .into_iter()
                .find(|p| !p.starts_with(staging) && p != target)
            {
                return Err(NodeError::SingleWriter {
                    id: v.id.clone(),
                    other,
                });
            }
        }
        let from = paths::open(&self.kubelet_dir, &source).map_err(sys("open", &source))?;
        let onto = self.mount_point(target, if block { Create::File } else { Create::Dir })?;
        self.kernel
            .bind(from.as_fd(), onto.as_fd())
            .map_err(sys("bind-mount", target))?;
        let mut undo = Rollback::new();
        undo.push(format!("unmount {}", target.display()), || {
            self.kernel.unmount(target)
        });
        let finish = || -> Result<(), NodeError> {
            let root = self.mounted_root(target, from.as_fd())?;
            if read_only {
                self.kernel
                    .remount_read_only(root.as_fd())
                    .map_err(sys("remount read-only", target))?;
            }
            // As kubelet does: a read-only volume's group is left as it is
            // (it could not be changed, and the pod only reads).
            if let (Some(gid), false, false) = (req.mount_group, block, read_only) {
                apply_group(root.as_fd(), target, gid)?;
            }
            Ok(())
        };
        undo.finish(finish())
    }

    /// NodeUnpublishVolume: unmounts and removes the target. Idempotent; a
    /// dead mount (ENOTCONN, EIO, ESTALE) is still unmounted; EBUSY is an
    /// error.
    ///
    /// Only what is provably volume `id`'s is touched: a mount there must
    /// hold it (by identity, see `node::mounts`), and what is left once it
    /// is unmounted must be what a publish makes, an empty directory or an
    /// empty file. Anything else under the kubelet directory (a secret's
    /// tmpfs, another volume, a file with data) is refused with nothing
    /// unmounted or removed.
    pub fn unpublish(&self, pool: &Pool, id: &str, target: &Path) -> Result<(), NodeError> {
        let not_this = |what: &str| NodeError::NotThisVolume {
            id: id.to_owned(),
            path: target.to_owned(),
            what: what.into(),
        };
        match self.mount_state(target)? {
            MountState::Missing => return Ok(()),
            MountState::Mounted | MountState::Broken => {
                if !self.holds(pool, id, target)? {
                    return Err(not_this("a mount of something else"));
                }
                self.kernel
                    .unmount(target)
                    .map_err(sys("unmount", target))?;
            }
            MountState::NotMounted => {}
        }
        let meta = std::fs::symlink_metadata(target).map_err(sys("stat", target))?;
        if meta.is_dir() {
            // Fails, and removes nothing, unless it is empty.
            std::fs::remove_dir(target).map_err(sys("remove", target))?;
        } else if meta.is_file() && meta.len() == 0 {
            std::fs::remove_file(target).map_err(sys("remove", target))?;
        } else {
            return Err(not_this(
                "something a publish does not leave (a file with data, a link, a device)",
            ));
        }
        Ok(())
    }
}

/// Gives group `gid` the volume mounted at `root` (open, `O_PATH`): its root
/// and, when the root's group differs, everything below it, as kubelet's
/// fsGroup does with OnRootMismatch, with group read/write and setgid on
/// directories so new files inherit the group.
///
/// Every name below the root is the pod's and may be swapped while this
/// runs, so the walk goes through descriptors (`crate::sys::untrusted`):
/// each entry is opened without following it, inspected and changed through
/// that descriptor; symlinks get the group themselves (never their target);
/// other mounts inside the volume are not entered.
fn apply_group(root: BorrowedFd<'_>, path: &Path, gid: u32) -> Result<(), NodeError> {
    use rustix::fs::{FileType, Gid, Mode, OFlags};
    let dir = rustix::fs::openat(
        root,
        c".",
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| sys("open", path)(e.into()))?;
    let st = rustix::fs::fstat(&dir).map_err(|e| sys("stat", path)(e.into()))?;
    if st.st_gid == gid {
        return Ok(());
    }
    fn walk(dir: BorrowedFd<'_>, path: &Path, gid: u32, depth: usize) -> Result<(), NodeError> {
        if depth >= untrusted::MAX_DEPTH {
            return Err(sys("apply the group below", path)(std::io::Error::other(
                format!(
                    "directories nested deeper than {} levels",
                    untrusted::MAX_DEPTH
                ),
            )));
        }
        for name in untrusted::names(dir).map_err(sys("read directory", path))? {
            let path = untrusted::display(path, &name);
            let Some(entry) = untrusted::child(dir, &name).map_err(sys("open", &path))? else {
                continue;
            };
            entry.chown(None, Some(gid)).map_err(sys("chown", &path))?;
            let mode = entry.stat().st_mode & 0o7777;
            match entry.kind() {
                FileType::Symlink => {}
                FileType::Directory => {
                    let inner = entry.open_dir().map_err(sys("open", &path))?;
                    // One descriptor per level, not two.
                    drop(entry);
                    walk(inner.as_fd(), &path, gid, depth + 1)?;
                    rustix::fs::fchmod(&inner, Mode::from_raw_mode(mode | 0o2070))
                        .map_err(|e| sys("chmod", &path)(e.into()))?;
                }
                _ => entry.chmod(mode | 0o060).map_err(sys("chmod", &path))?,
            }
        }
        Ok(())
    }
    rustix::fs::fchown(&dir, None, Some(Gid::from_raw_unchecked(gid)))
        .map_err(|e| sys("chown", path)(e.into()))?;
    walk(dir.as_fd(), path, gid, 0)?;
    rustix::fs::fchmod(&dir, Mode::from_raw_mode((st.st_mode & 0o7777) | 0o2070))
        .map_err(|e| sys("chmod", path)(e.into()))
}
