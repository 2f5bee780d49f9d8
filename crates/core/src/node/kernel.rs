//! The node's one seam to the kernel: every loop-device, mount and mkfs call
//! a stage, publish, unstage or expansion makes goes through [`Kernel`].
//!
//! The node's logic (idempotent retries, what a failed step undoes, which
//! fence is kept) is the part that loses data when it is wrong, and it is
//! the part a root test exercises worst: making the kernel fail the third
//! step of a stage on cue is hard on a real machine. Behind this trait the
//! node runs against [`Host`] in production and against a recording fake in
//! its unit tests (`node::fake`), which answers from its own mount and loop
//! tables, fails any call on request and lists what was called.
//!
//! The seam is narrow on purpose: it takes paths and descriptors the node
//! has already opened safely (`node::paths`, `sys::untrusted`), so the fake
//! cannot hide a path-handling mistake, and everything that is not a mount,
//! a loop device or a filesystem tool (record keeping, fences, directory
//! creation, fsGroup) stays real in the tests too.
//!
//! It speaks the kernel's vocabulary only: no pool, no node error. Questions
//! about the pool's volumes ("which mounts hold volume `id`", "which lock
//! records are the pool's") are not asked of it; it hands over the raw
//! tables ([`Kernel::mount_table`], [`Kernel::lock_records`],
//! [`Kernel::attached`]) and single `statx` answers ([`Kernel::identity`]),
//! and `node::mounts` decides from them, the same code on the fake's tables
//! as on the host's. The tools answer with `io::Error` (a probe that could
//! not be made), a [`CommandError`] (a tool that failed, as it said it) or a
//! [`Renewal`]; the node names the step in its own error (`NodeError`).

use std::fs::File;
use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::path::Path;

use rustix::mount::MountFlags;

use super::ext4::{self, RenewError};
use super::format::{self, Content};
use super::probe;
use crate::sys::command::CommandError;
use crate::sys::lock::{self, Recorded};
use crate::sys::loopdev::{self, Attached, LoopDevice};
use crate::sys::mount::{self, Identity, MountState};
use crate::sys::mountinfo::{self, MountEntry};
use crate::volume::meta::FsType;
use crate::volume::mkfs_options::Validated;

/// The loop device bound to an image, and whether its detach is pending.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bound {
    /// The device.
    pub device: LoopDevice,
    /// A detach is pending: the device still serves its last opener and
    /// must not be used, nor a second device attached beside it.
    pub detaching: bool,
    /// The node it was attached for (see [`loopdev::Owner`]).
    pub owner: Option<loopdev::Owner>,
}

/// What [`Kernel::renew_uuid`] did with a copy of a template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Renewal {
    /// The copy has its own UUID now.
    Renewed,
    /// The copy does not hold the filesystem a template makes (why, for
    /// the log); nothing was written to it.
    NotTemplate(String),
}

/// The kernel calls of the node side. Method names follow what they do to
/// the kernel; errors are the kernel's (or the tool's), and the caller
/// names the step.
pub trait Kernel: Send + Sync + std::fmt::Debug {
    // ---- loop devices ----

    /// What `dev` is bound to (one LOOP_GET_STATUS64), `None` if unbound.
    /// The node finds an image's device through its own table
    /// (`node::devices`) and checks it with this.
    fn loop_status(&self, dev: LoopDevice) -> io::Result<Option<loopdev::Status>>;
    /// Every attached device and the (st_dev, st_ino) of its backing file.
    fn attached(&self) -> io::Result<Vec<(Bound, (u64, u64))>>;
    /// Attaches a free device to `image` for node `node_id`, fenced by the
    /// device itself (see [`loopdev::attach`]): `Ok(None)` when the image's
    /// lock is held elsewhere and nothing was attached.
    fn attach(
        &self,
        image: &Path,
        read_only: bool,
        direct_io: bool,
        node_id: &str,
    ) -> io::Result<Option<Attached>>;
    /// Detaches a device (deferred by the kernel until its last close).
    fn detach(&self, dev: LoopDevice) -> io::Result<()>;
    /// Whether the device is read-only.
    fn read_only(&self, dev: LoopDevice) -> io::Result<bool>;
    /// Drops the cached blocks of a (re-used) device number.
    fn drop_cached_blocks(&self, dev: LoopDevice) -> io::Result<()>;
    /// Has the device re-read its image's size.
    fn refresh_capacity(&self, dev: LoopDevice) -> io::Result<()>;
    /// The device's size in bytes.
    fn size(&self, dev: LoopDevice) -> io::Result<u64>;
    /// Opens (`O_PATH`) the device node: the source of a block bind.
    fn open_device(&self, dev: LoopDevice) -> io::Result<OwnedFd>;

    // ---- mounts ----

    /// Whether `path` is a mount root (statx, no final symlink followed).
    fn mount_state(&self, path: &Path) -> io::Result<MountState>;
    /// Mounts the filesystem on `device` onto the object open at `target`.
    fn mount_fs(
        &self,
        device: &Path,
        target: BorrowedFd<'_>,
        fs_type: &str,
        flags: MountFlags,
        data: &str,
    ) -> io::Result<()>;
    /// Mounts the filesystem on `device` read-write where no path reaches
    /// it, and unmounts it again before returning (see
    /// [`mount::mount_unattached`]): what replays a journal.
    fn mount_unattached(&self, device: &Path, fs_type: &str, flags: &[&str]) -> io::Result<()>;
    /// Binds the object open at `source` onto the object open at `target`.
    fn bind(&self, source: BorrowedFd<'_>, target: BorrowedFd<'_>) -> io::Result<()>;
    /// Whether the object open at `root` is the root of a mount of the
    /// object open at `source` (the same inode, and a mount root): a mount
    /// just made, not whatever a swapped name now leads to.
    fn is_mount_of(&self, root: BorrowedFd<'_>, source: BorrowedFd<'_>) -> io::Result<bool>;
    /// Makes the mount whose root is open at `root` read-only.
    fn remount_read_only(&self, root: BorrowedFd<'_>) -> io::Result<()>;
    /// Whether the filesystem at `path` is mounted read-only (statvfs).
    fn mounted_read_only(&self, path: &Path) -> io::Result<bool>;
    /// Unmounts `path` (nothing mounted there is not an error).
    fn unmount(&self, path: &Path) -> io::Result<()>;
    /// This process's mount table (`/proc/self/mountinfo`). What a mount
    /// holds is decided from it by `node::mounts`.
    fn mount_table(&self) -> io::Result<Vec<MountEntry>>;
    /// The OFD locks this host records (`/proc/locks`); which are the
    /// pool's is decided by `node::mounts::pool_locks`.
    fn lock_records(&self) -> io::Result<Vec<Recorded>>;
    /// What one `statx` of `path` says (no final symlink followed): the
    /// fast answer to "what does this mount hold" (`node::mounts`).
    fn identity(&self, path: &Path) -> io::Result<Identity>;
    /// The id of the mount the object open at `fd` lies on.
    fn mount_id(&self, fd: BorrowedFd<'_>) -> io::Result<u64>;
    /// Whether the filesystem the object open at `fd` lies on is mounted
    /// read-only (its superblock or this mount).
    fn fd_read_only(&self, fd: BorrowedFd<'_>) -> io::Result<bool>;
    /// Syncs the filesystem the object open at `fd` lies on, then trims
    /// it (FITRIM): the bytes it sent to its device as discards. The sync
    /// first, because blocks a pod just deleted are free space only once
    /// the deletion is committed (ext4's journal does that every few
    /// seconds on its own; a trim on demand right after a delete should
    /// not miss them).
    fn trim(&self, fd: BorrowedFd<'_>) -> io::Result<u64>;
    /// Requests the device has in flight.
    fn in_flight(&self, dev: LoopDevice) -> io::Result<u64>;

    // ---- filesystems ----

    /// What `device` (backed by `image`) holds; `expected` is the
    /// filesystem the stage wants, which only decides whether the answer
    /// is clear enough to give without `blkid` (see `node::probe`). An
    /// error is a probe that failed: the caller formats nothing.
    fn probe(&self, device: &Path, image: &Path, expected: FsType) -> io::Result<Content>;
    /// Whether an image is provably blank (see [`format::blank_image`]).
    fn blank_image(
        &self,
        image: &Path,
        reports_holes: bool,
        written: Option<bool>,
    ) -> io::Result<bool>;
    /// Makes a filesystem in the file `file`; `overwrite`: over the
    /// signatures of a format filevol itself cut short (see
    /// [`format::mkfs_file_over`]).
    fn mkfs(
        &self,
        file: &Path,
        options: &Validated<'_>,
        overwrite: bool,
    ) -> Result<(), CommandError>;
    /// Checks that `copy` (a copy of a template, see `node::template`)
    /// holds the whole `fs` of `len` bytes a template makes, then gives it
    /// a fresh random UUID; [`Renewal::NotTemplate`] when it does not hold
    /// one (nothing was written).
    fn renew_uuid(&self, copy: &File, fs: FsType, len: u64) -> io::Result<Renewal>;
    /// Grows the filesystem mounted at `mount_point` to fill `device`.
    fn grow(&self, fs: FsType, device: &Path, mount_point: &Path) -> Result<(), CommandError>;
    /// The size of the one device of the btrfs mounted at `mount_point`.
    fn btrfs_device_size(&self, mount_point: &Path) -> Result<u64, CommandError>;
}

/// The real kernel: `crate::sys` and the filesystem tools.
#[derive(Debug, Clone, Copy, Default)]
pub struct Host;

impl Kernel for Host {
    fn loop_status(&self, dev: LoopDevice) -> io::Result<Option<loopdev::Status>> {
        dev.status()
    }

    fn attached(&self) -> io::Result<Vec<(Bound, (u64, u64))>> {
        Ok(loopdev::attached()?
            .into_iter()
            .map(|(device, status)| {
                let bound = Bound {
                    device,
                    detaching: status.detaching,
                    owner: status.owner,
                };
                (bound, status.backing)
            })
            .collect())
    }

    fn attach(
        &self,
        image: &Path,
        read_only: bool,
        direct_io: bool,
        node_id: &str,
    ) -> io::Result<Option<Attached>> {
        loopdev::attach(image, read_only, direct_io, node_id)
    }

    fn detach(&self, dev: LoopDevice) -> io::Result<()> {
        dev.detach()
    }

    fn read_only(&self, dev: LoopDevice) -> io::Result<bool> {
        dev.read_only()
    }

    fn drop_cached_blocks(&self, dev: LoopDevice) -> io::Result<()> {
        dev.drop_cached_blocks()
    }

    fn refresh_capacity(&self, dev: LoopDevice) -> io::Result<()> {
        dev.refresh_capacity()
    }

    fn size(&self, dev: LoopDevice) -> io::Result<u64> {
        dev.size()
    }

    fn open_device(&self, dev: LoopDevice) -> io::Result<OwnedFd> {
        rustix::fs::open(
            dev.path(),
            rustix::fs::OFlags::PATH | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .map_err(io::Error::from)
    }

    fn mount_state(&self, path: &Path) -> io::Result<MountState> {
        mount::state(path)
    }

    fn mount_fs(
        &self,
        device: &Path,
        target: BorrowedFd<'_>,
        fs_type: &str,
        flags: MountFlags,
        data: &str,
    ) -> io::Result<()> {
        mount::mount_fs_at(device, target, fs_type, flags, data)
    }

    fn mount_unattached(&self, device: &Path, fs_type: &str, flags: &[&str]) -> io::Result<()> {
        mount::mount_unattached(device, fs_type, flags)
    }

    fn bind(&self, source: BorrowedFd<'_>, target: BorrowedFd<'_>) -> io::Result<()> {
        mount::bind_at(source, target)
    }

    fn is_mount_of(&self, root: BorrowedFd<'_>, source: BorrowedFd<'_>) -> io::Result<bool> {
        let (a, b) = (rustix::fs::fstat(root)?, rustix::fs::fstat(source)?);
        Ok((a.st_dev, a.st_ino) == (b.st_dev, b.st_ino) && mount::is_mount_root(root)?)
    }

    fn remount_read_only(&self, root: BorrowedFd<'_>) -> io::Result<()> {
        mount::remount_read_only_at(root)
    }

    fn mounted_read_only(&self, path: &Path) -> io::Result<bool> {
        let st = rustix::fs::statvfs(path)?;
        Ok(st.f_flag.contains(rustix::fs::StatVfsMountFlags::RDONLY))
    }

    fn unmount(&self, path: &Path) -> io::Result<()> {
        mount::unmount(path)
    }

    fn mount_table(&self) -> io::Result<Vec<MountEntry>> {
        mountinfo::read()
    }

    fn lock_records(&self) -> io::Result<Vec<Recorded>> {
        lock::recorded()
    }

    fn identity(&self, path: &Path) -> io::Result<Identity> {
        mount::identity(path)
    }

    fn mount_id(&self, fd: BorrowedFd<'_>) -> io::Result<u64> {
        mount::mount_id(fd)
    }

    fn fd_read_only(&self, fd: BorrowedFd<'_>) -> io::Result<bool> {
        let st = rustix::fs::fstatvfs(fd)?;
        Ok(st.f_flag.contains(rustix::fs::StatVfsMountFlags::RDONLY))
    }

    fn trim(&self, fd: BorrowedFd<'_>) -> io::Result<u64> {
        rustix::fs::syncfs(fd)?;
        crate::sys::trim::trim(fd)
    }

    fn in_flight(&self, dev: LoopDevice) -> io::Result<u64> {
        dev.in_flight()
    }

    fn probe(&self, device: &Path, image: &Path, expected: FsType) -> io::Result<Content> {
        probe::probe(device, image, expected)
    }

    fn blank_image(
        &self,
        image: &Path,
        reports_holes: bool,
        written: Option<bool>,
    ) -> io::Result<bool> {
        format::blank_image(image, reports_holes, written)
    }

    fn mkfs(
        &self,
        file: &Path,
        options: &Validated<'_>,
        overwrite: bool,
    ) -> Result<(), CommandError> {
        format::mkfs_file_over(file, options, overwrite)
    }

    fn renew_uuid(&self, copy: &File, fs: FsType, len: u64) -> io::Result<Renewal> {
        if fs != FsType::Ext4 {
            return Ok(Renewal::NotTemplate(format!(
                "no in-process UUID for {}",
                fs.as_str()
            )));
        }
        let (uuid, seed) = (ext4::random_uuid()?, ext4::random_bytes()?);
        match ext4::renew_uuid(copy, len, uuid, seed) {
            Ok(()) => Ok(Renewal::Renewed),
            Err(RenewError::NotTemplate(why)) => Ok(Renewal::NotTemplate(why)),
            Err(RenewError::Io(e)) => Err(e),
        }
    }

    fn grow(&self, fs: FsType, device: &Path, mount_point: &Path) -> Result<(), CommandError> {
        format::grow(fs, device, mount_point)
    }

    fn btrfs_device_size(&self, mount_point: &Path) -> Result<u64, CommandError> {
        format::btrfs_device_size(mount_point)
    }
}
