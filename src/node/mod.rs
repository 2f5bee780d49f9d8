//! The node side: stage (attach, probe, format only when blank, mount),
//! publish (bind mounts), unpublish/unstage, stats, expansion, fencing.
//!
//! Every decision is read from the kernel, never from memory: whether a
//! path is mounted (statx `STATX_ATTR_MOUNT_ROOT`), which loop device backs
//! an image (LOOP_GET_STATUS64), what a mount holds (its device number). A
//! restarted plugin, a rebooted node or kubelet's out-of-order retries
//! therefore converge on the right answer.
//!
//! The volume's record is read from the pool at every call (the service
//! layer hands a fresh one in), so what a controller committed a moment ago
//! (an expansion, a new volume, an ephemeral volume of another node plugin)
//! is what the node acts on.
//!
//! Fencing: while a volume is staged, this process holds the volume's fence
//! in the pool (`pool::store`): exclusive for an image staged for writing,
//! shared for read-only stages and for directories. A second node plugin, on
//! this host or another sharing the pool, cannot take it, so a
//! single-writer image is never mounted twice; DeleteVolume needs it
//! exclusively and byte copies need it shared, so neither can touch a staged
//! volume. A restarted plugin re-takes the fences of the images it finds
//! attached and the directories it finds bind-mounted before it serves.

pub mod error;
pub mod format;
pub mod mkfs_options;
mod mounts;
pub mod paths;
mod rollback;

use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use parking_lot::Mutex;

use error::sys;
pub use error::NodeError;
use format::Content;
use mounts::staged_dirs;
use paths::Create;
use rollback::Rollback;

use crate::pool::meta::{AccessMode, AccessType, FsType, Layout, VolumeMeta};
use crate::pool::store::Fence;
use crate::pool::{CapacityRange, Pool};
use crate::sys::lock::LockKind;
use crate::sys::loopdev::{self, LoopDevice};
use crate::sys::mount::{self, MountState};
use crate::sys::mountinfo;
use crate::sys::untrusted;

/// The file inside a block volume's staging directory onto which its loop
/// device is bind-mounted, so the kernel's mount table remembers the stage.
const BLOCK_DEVICE_FILE: &str = "device";

/// What NodeStage/NodePublish asks for, checked.
#[derive(Debug, Clone)]
pub struct Request {
    /// The volume.
    pub volume_id: String,
    /// Mount or block.
    pub access: AccessType,
    /// The access mode.
    pub mode: AccessMode,
    /// Mount flags from the capability.
    pub mount_flags: Vec<String>,
    /// fsGroup to apply (VOLUME_MOUNT_GROUP), if any.
    pub mount_group: Option<u32>,
    /// Publish read-only.
    pub readonly: bool,
}

/// Node-side state: the kubelet directory and the fencing locks held.
#[derive(Debug)]
pub struct Node {
    kubelet_dir: PathBuf,
    /// Direct I/O on loop devices where the pool allows it.
    direct_io: bool,
    /// The fences this process holds, by volume id, and of which kind.
    fences: Mutex<HashMap<String, (Fence, LockKind)>>,
}

/// What NodeGetVolumeStats reports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Bytes: total, available, used.
    pub bytes: Option<(u64, u64, u64)>,
    /// Inodes: total, available, used.
    pub inodes: Option<(u64, u64, u64)>,
    /// Why the volume is abnormal, if it is.
    pub problem: Option<String>,
}

fn lock_kind(mode: AccessMode) -> LockKind {
    if mode.is_read_only() {
        LockKind::Shared
    } else {
        LockKind::Exclusive
    }
}

impl Node {
    /// Prepares the node side: resolves the kubelet directory and re-takes
    /// the fencing locks of every image of `pool` attached to a loop device.
    pub fn start(kubelet_dir: &Path, pool: &Pool, direct_io: bool) -> Result<Node, NodeError> {
        // Paths are compared after resolving symlinks, so the kubelet
        // directory is resolved too. A missing one is not created (it is
        // kubelet's): node calls fail until it exists.
        let kubelet_dir = match kubelet_dir.canonicalize() {
            Ok(dir) => dir,
            Err(e) => {
                log::warn!(
                    "kubelet directory {}: {e}; node calls will be refused until it exists",
                    kubelet_dir.display()
                );
                kubelet_dir.to_owned()
            }
        };
        let node = Node {
            kubelet_dir,
            direct_io,
            fences: Mutex::new(HashMap::new()),
        };
        node.recover(pool)?;
        Ok(node)
    }

    /// The resolved kubelet directory.
    pub fn kubelet_dir(&self) -> &Path {
        &self.kubelet_dir
    }

    fn recover(&self, pool: &Pool) -> Result<(), NodeError> {
        let attached = match loopdev::attached() {
            Ok(a) => a,
            // Without access to loop devices (not root) there is nothing
            // this process could have staged; node calls will fail on their
            // own with the reason.
            Err(e) => {
                log::warn!("cannot list loop devices ({e}); no staged volumes to recover");
                return Ok(());
            }
        };
        // From the directory and the kernel, not the records: a record that
        // cannot be read right now must not leave a staged image unfenced.
        for id in pool.store().ids(crate::pool::store::Kind::Volume)? {
            let image = pool.image_path(&id);
            let Ok(meta) = std::fs::metadata(&image) else {
                continue;
            };
            // A device with a detach pending was let go of by an unstage
            // (which waited for it; one still held open is refused by the
            // next stage): nothing staged to fence.
            let Some((dev, _)) = attached
                .iter()
                .find(|(d, b)| *b == (meta.dev(), meta.ino()) && !d.detaching())
            else {
                continue;
            };
            let kind = if dev.read_only().unwrap_or(false) {
                LockKind::Shared
            } else {
                LockKind::Exclusive
            };
            match self.take_fence(pool, &id, kind) {
                Ok(_) => log::info!(
                    "volume {id}: found attached to {}, fence re-taken",
                    dev.path().display()
                ),
                Err(e) => log::error!("volume {id}: attached to {} but {e}", dev.path().display()),
            }
        }
        match staged_dirs(pool, Some(&self.kubelet_dir)) {
            Ok(ids) => {
                for id in ids {
                    match self.take_fence(pool, &id, LockKind::Shared) {
                        Ok(_) => log::info!("volume {id}: found bind-mounted, fence re-taken"),
                        Err(e) => log::error!("volume {id}: bind-mounted but {e}"),
                    }
                }
            }
            Err(e) => log::warn!(
                "cannot read the mount table ({e}); staged directory volumes are not fenced"
            ),
        }
        Ok(())
    }

    /// Takes the volume's fence for this process, unless it holds it
    /// already. `Ok(true)` when taken by this call (so a failed stage knows
    /// to let it go).
    fn take_fence(&self, pool: &Pool, id: &str, kind: LockKind) -> Result<bool, NodeError> {
        let fenced = || NodeError::Fenced {
            id: id.to_owned(),
            image: pool.image_path(id),
        };
        let mut fences = self.fences.lock();
        if let Some((fence, held)) = fences.get_mut(id) {
            // Staged before (another staging path, or a retry). A writer's
            // stage after a read-only one needs the fence exclusively: the
            // open file's lock is converted, which fails while any other
            // process holds it shared.
            if *held == LockKind::Shared && kind == LockKind::Exclusive {
                if !fence.upgrade()? {
                    return Err(fenced());
                }
                *held = LockKind::Exclusive;
            }
            return Ok(false);
        }
        match pool.fence_volume(id, kind)? {
            Some(fence) => {
                log::debug!("volume {id}: fence taken");
                fences.insert(id.to_owned(), (fence, kind));
                Ok(true)
            }
            None => Err(fenced()),
        }
    }

    /// Formats the image if it is provably blank (see
    /// [`format::blank_image`]), and returns the volume's record as it is
    /// now. Runs under the volume's lock in the pool: the size formatted is
    /// the one recorded now (an expansion before the first stage is not
    /// lost), and no other process changes the record in between.
    fn format_if_blank(&self, pool: &Pool, id: &str, fs: FsType) -> Result<VolumeMeta, NodeError> {
        let lock = pool.lock_volume(id)?;
        let v = pool.volume(id)?;
        let image = pool.image_path(id);
        if !format::blank_image(&image, pool.reports_holes(), v.written)? {
            return Ok(v);
        }
        // Checked again here, not only at CreateVolume: a record made by a
        // version that passed mkfsOptions through unchecked is refused
        // before anything runs (the caller lets go of the fence).
        let options = mkfs_options::validate(fs, &v.mkfs_options).map_err(|source| {
            NodeError::MkfsOptionsRefused {
                id: id.to_owned(),
                source,
            }
        })?;
        // One already attached (a crash between attach and format) is
        // mounted nowhere: detach it first.
        if let Some(dev) = loopdev::find(&image).map_err(sys("find loop device of", &image))? {
            dev.detach().map_err(sys("detach", dev.path()))?;
        }
        log::info!(
            "volume {id}: the image is blank, making {} of {} bytes",
            fs.as_str(),
            v.capacity_bytes
        );
        self.format_image(pool, &v, &options)?;
        // After the rename: a crash before this line leaves a formatted
        // image with `written: false`, which the signature probe still
        // refuses to format again.
        crate::faults::crash_point("stage.renamed");
        Ok(pool.mark_written(id, &lock)?)
    }

    /// Makes the filesystem of a blank image without ever writing to the
    /// image itself: mkfs runs on a new file beside it, which replaces the
    /// image by one rename once it is complete and synced. A crash during
    /// mkfs leaves the blank image and a scratch file (removed on the next
    /// try), never a half-made filesystem that the probe would then refuse
    /// to touch. The caller holds the volume's fence and lock.
    fn format_image(
        &self,
        pool: &Pool,
        v: &VolumeMeta,
        options: &mkfs_options::Validated<'_>,
    ) -> Result<(), NodeError> {
        let image = pool.image_path(&v.id);
        let dir = image
            .parent()
            .expect("images live in their volume directory");
        let scratch = dir.join(".image.mkfs");
        // Left by a stage that crashed during mkfs.
        remove_if_present(&scratch).map_err(sys("remove", &scratch))?;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&scratch)
            .map_err(sys("create", &scratch))?;
        let mut undo = Rollback::new();
        undo.push(format!("remove {}", scratch.display()), || {
            remove_if_present(&scratch)
        });
        let result = (|| {
            file.set_len(v.capacity_bytes)
                .map_err(sys("size", &scratch))?;
            if v.thick {
                crate::sys::fs::preallocate(&file, v.capacity_bytes)
                    .map_err(sys("preallocate", &scratch))?;
            }
            format::mkfs_file(&scratch, options)?;
            file.sync_all().map_err(sys("sync", &scratch))?;
            crate::faults::crash_point("stage.formatted");
            std::fs::rename(&scratch, &image).map_err(sys("replace", &image))?;
            crate::sys::fs::fsync_dir(dir).map_err(sys("sync", dir))
        })();
        undo.finish(result)
    }

    fn release_fence(&self, id: &str) {
        if self.fences.lock().remove(id).is_some() {
            log::debug!("volume {id}: fence released");
        }
    }

    /// Checks a staging or target path from a request.
    pub fn check_path(&self, field: &'static str, path: &str) -> Result<PathBuf, NodeError> {
        paths::under_kubelet(field, path, &self.kubelet_dir)
    }

    /// Mounts of this pool's volumes under the kubelet directory, from the
    /// mount table: (staged, published). A mount counts as this pool's when
    /// its source is a loop device backed by a pool image, or when it lives
    /// on the pool's own filesystem (directory volumes); it is a publish when
    /// it lies under `<kubelet>/pods/`.
    pub fn mount_counts(&self, pool: &Pool) -> std::io::Result<(usize, usize)> {
        let pool_dev = mount::device_of(pool.root())?;
        let pool_dev = format!(
            "{}:{}",
            rustix::fs::major(pool_dev),
            rustix::fs::minor(pool_dev)
        );
        let ours: Vec<String> = loopdev::attached()?
            .into_iter()
            .filter(|(_, (dev, _))| {
                format!("{}:{}", rustix::fs::major(*dev), rustix::fs::minor(*dev)) == pool_dev
            })
            .map(|(d, _)| d.path().to_string_lossy().into_owned())
            .collect();
        let pods = self.kubelet_dir.join("pods");
        let (mut staged, mut published) = (0, 0);
        for entry in mountinfo::read()? {
            if !entry.mount_point.starts_with(&self.kubelet_dir) {
                continue;
            }
            if entry.device == pool_dev || ours.contains(&entry.source) {
                if entry.mount_point.starts_with(&pods) {
                    published += 1;
                } else {
                    staged += 1;
                }
            }
        }
        Ok((staged, published))
    }

    // ---- stage ----

    /// NodeStageVolume.
    pub fn stage(
        &self,
        pool: &Pool,
        v: &VolumeMeta,
        staging: &Path,
        req: &Request,
    ) -> Result<(), NodeError> {
        match (v.layout, req.access) {
            (Layout::Dir, _) => self.stage_dir(pool, v, staging, req),
            (Layout::Image, AccessType::Mount) => self.stage_image(pool, v, staging, req),
            (Layout::Image, AccessType::Block) => self.stage_block(pool, v, staging, req),
        }
    }

    fn stage_dir(
        &self,
        pool: &Pool,
        v: &VolumeMeta,
        staging: &Path,
        req: &Request,
    ) -> Result<(), NodeError> {
        let data = pool.data_path(&v.id);
        // Shared: a directory serves many nodes at once. Held while staged
        // so that no DeleteVolume removes a directory in use, whether or not
        // ControllerPublish is used (the node-local layout skips it).
        self.fenced(pool, &v.id, LockKind::Shared, |undo| {
            if mount::state(staging).map_err(sys("stat", staging))? == MountState::Mounted {
                return self.expect_same_fs(staging, &data, "another filesystem");
            }
            let source = untrusted::open_root(&data).map_err(sys("open", &data))?;
            let target = self.mount_point(staging, Create::Dir)?;
            mount::bind_at(source.as_fd(), target.as_fd()).map_err(sys("bind-mount", staging))?;
            undo.push(format!("unmount {}", staging.display()), move || {
                mount::unmount(staging)
            });
            if req.mode.is_read_only() {
                let root = self.mounted_root(staging, source.as_fd())?;
                mount::remount_read_only_at(root.as_fd())
                    .map_err(sys("remount read-only", staging))?;
            }
            Ok(())
        })
    }

    /// Runs a stage holding the volume's fence of `kind`. The stage pushes
    /// the undo of each step it takes (an attach, a mount) on the rollback
    /// it is handed; a stage that fails has them undone, newest first, and
    /// then lets go of a fence this call took (not of one an earlier stage
    /// holds), so the fence is the last thing released.
    fn fenced<'a, T>(
        &'a self,
        pool: &Pool,
        id: &'a str,
        kind: LockKind,
        stage: impl FnOnce(&mut Rollback<'a>) -> Result<T, NodeError>,
    ) -> Result<T, NodeError> {
        let mut undo = Rollback::new();
        if self.take_fence(pool, id, kind)? {
            undo.push(format!("release the fence of {id}"), move || {
                self.release_fence(id);
                Ok(())
            });
        }
        let result = stage(&mut undo);
        undo.finish(result)
    }

    /// Creates (when missing) and opens the staging or target path
    /// `path` from a descriptor of the kubelet directory, for a mount onto
    /// the object opened (see [`paths`]).
    fn mount_point(&self, path: &Path, what: Create) -> Result<OwnedFd, NodeError> {
        paths::create(&self.kubelet_dir, path, what).map_err(sys("create", path))
    }

    /// Opens the root of the mount just made at `path` (under the kubelet
    /// directory) from `source`, and checks that it is that mount: the root
    /// of a mount, and the same object as the source (a name swapped since
    /// the mount would give another directory).
    fn mounted_root(&self, path: &Path, source: BorrowedFd<'_>) -> Result<OwnedFd, NodeError> {
        let root = paths::open(&self.kubelet_dir, path).map_err(sys("open", path))?;
        let (a, b) = (
            rustix::fs::fstat(&root).map_err(|e| sys("stat", path)(e.into()))?,
            rustix::fs::fstat(source).map_err(|e| sys("stat", path)(e.into()))?,
        );
        if (a.st_dev, a.st_ino) != (b.st_dev, b.st_ino) || !mount::is_mount_root(root.as_fd()) {
            return Err(NodeError::Occupied {
                path: path.to_owned(),
                what: "something other than the mount just made (the path changed)".into(),
            });
        }
        Ok(root)
    }

    /// Attaches the image's loop device if no usable one is attached, and
    /// has the rollback detach one it attached.
    fn attach_undoable<'a>(
        &self,
        pool: &Pool,
        v: &VolumeMeta,
        read_only: bool,
        undo: &mut Rollback<'a>,
    ) -> Result<LoopDevice, NodeError> {
        let (dev, attached_now) = self.attach(pool, v, read_only)?;
        if attached_now {
            undo.push(format!("detach {}", dev.path().display()), move || {
                dev.detach()
            });
            // A device number is reused: drop anything cached of an image
            // it backed before.
            dev.drop_cached_blocks()
                .map_err(sys("drop cached blocks of", dev.path()))?;
        }
        Ok(dev)
    }

    /// Attaches (or finds) the image's loop device; the caller holds the
    /// fence. Returns the device and whether this call attached it.
    fn attach(
        &self,
        pool: &Pool,
        v: &VolumeMeta,
        read_only: bool,
    ) -> Result<(LoopDevice, bool), NodeError> {
        let image = pool.image_path(&v.id);
        if let Some(dev) =
            loopdev::find_bound(&image).map_err(sys("find loop device of", &image))?
        {
            // A device being detached still writes the image until its last
            // close: a second device beside it would be a second writer.
            if dev.detaching() {
                return Err(NodeError::DetachPending {
                    device: dev.path(),
                    image,
                });
            }
            return Ok((dev, false));
        }
        let a = loopdev::attach(&image, read_only, self.direct_io)
            .map_err(sys("attach a loop device to", &image))?;
        if !a.direct_io {
            log::info!(
                "volume {}: the pool filesystem refused direct I/O; the loop device is buffered",
                v.id
            );
        }
        Ok((a.device, true))
    }

    fn stage_image(
        &self,
        pool: &Pool,
        v: &VolumeMeta,
        staging: &Path,
        req: &Request,
    ) -> Result<(), NodeError> {
        self.fenced(pool, &v.id, lock_kind(req.mode), |undo| {
            self.stage_image_fenced(pool, v, staging, req, undo)
        })
    }

    fn stage_image_fenced<'a>(
        &self,
        pool: &Pool,
        v: &VolumeMeta,
        staging: &'a Path,
        req: &Request,
        undo: &mut Rollback<'a>,
    ) -> Result<(), NodeError> {
        let fs = v.fs_type.unwrap_or(FsType::Ext4);
        let read_only = req.mode.is_read_only();
        // A provably blank image gets its filesystem before it is attached.
        let v = if !read_only && v.written != Some(true) {
            self.format_if_blank(pool, &v.id, fs)?
        } else {
            v.clone()
        };
        let dev = self.attach_undoable(pool, &v, read_only, undo)?;
        if mount::state(staging).map_err(sys("stat", staging))? == MountState::Mounted {
            // Staged already (a retry, or a restart): it must be this
            // volume's device.
            let source =
                mount::source_of(staging).map_err(sys("read the mount table for", staging))?;
            if source.as_deref() != Some(dev.path().to_string_lossy().as_ref()) {
                return Err(NodeError::Occupied {
                    path: staging.to_owned(),
                    what: "another filesystem".into(),
                });
            }
            return Ok(());
        }

        match format::probe(&dev.path(), &pool.image_path(&v.id))? {
            Content::Filesystem(found) if found == fs.as_str() => {}
            Content::Blank => {
                // A read-only stage of a never-formatted volume, or an image
                // blanked under us: nothing to mount, nothing to format.
                return Err(NodeError::WillNotFormat {
                    device: dev.path(),
                    found: "nothing (a blank volume is formatted at its first read-write stage)"
                        .into(),
                    expected: fs.as_str().into(),
                });
            }
            Content::Filesystem(found) => {
                return Err(NodeError::WillNotFormat {
                    device: dev.path(),
                    found,
                    expected: fs.as_str().into(),
                })
            }
            Content::Other(found) => {
                return Err(NodeError::WillNotFormat {
                    device: dev.path(),
                    found,
                    expected: fs.as_str().into(),
                })
            }
        }

        // A filesystem found where the record still says "never written"
        // (a crash between mkfs and the record, or a record older than the
        // field): record it now, so the record alone stays conservative.
        if !read_only && v.written != Some(true) {
            if let Ok(lock) = pool.lock_volume(&v.id) {
                if let Err(e) = pool.mark_written(&v.id, &lock) {
                    log::warn!("volume {}: record that it holds a filesystem: {e}", v.id);
                }
            }
        }

        let (mut flags, mut data) = mount::parse_options(&req.mount_flags);
        if read_only {
            flags |= rustix::mount::MountFlags::RDONLY;
        }
        if fs == FsType::Xfs {
            // Clones and restores share their source's UUID.
            if !data.is_empty() {
                data.push(',');
            }
            data.push_str("nouuid");
        }
        let target = self.mount_point(staging, Create::Dir)?;
        mount::mount_fs_at(&dev.path(), target.as_fd(), fs.as_str(), flags, &data)
            .map_err(sys("mount", staging))?;
        // A restored or cloned volume may be larger than its filesystem.
        if !read_only && v.source.is_some() {
            if let Err(e) = format::grow(fs, &dev.path(), staging) {
                log::warn!(
                    "volume {}: growing the filesystem after a restore: {e}",
                    v.id
                );
            }
        }
        Ok(())
    }

    fn stage_block(
        &self,
        pool: &Pool,
        v: &VolumeMeta,
        staging: &Path,
        req: &Request,
    ) -> Result<(), NodeError> {
        let read_only = req.mode.is_read_only();
        self.fenced(pool, &v.id, lock_kind(req.mode), |undo| {
            // Recorded before the device is handed out: from here on the
            // pod may write anything, signature or not, and a later stage as
            // a filesystem must never take it for blank.
            if !read_only && v.written != Some(true) {
                let lock = pool.lock_volume(&v.id)?;
                pool.mark_written(&v.id, &lock)?;
            }
            let dev = self.attach_undoable(pool, v, read_only, undo)?;
            let file = staging.join(BLOCK_DEVICE_FILE);
            if mount::state(&file).map_err(sys("stat", &file))? == MountState::Mounted {
                return Ok(());
            }
            let source = open_device(&dev)?;
            let target = self.mount_point(&file, Create::File)?;
            mount::bind_at(source.as_fd(), target.as_fd()).map_err(sys("bind-mount", &file))
        })
    }

    fn expect_same_fs(&self, mounted: &Path, source: &Path, what: &str) -> Result<(), NodeError> {
        let a = mount::device_of(mounted).map_err(sys("stat", mounted))?;
        let b = mount::device_of(source).map_err(sys("stat", source))?;
        if a == b {
            Ok(())
        } else {
            Err(NodeError::Occupied {
                path: mounted.to_owned(),
                what: what.into(),
            })
        }
    }

    // ---- unstage ----

    /// NodeUnstageVolume: unmounts, detaches the loop device, drops the
    /// fence. Idempotent. Refused while the volume is still mounted
    /// elsewhere under this node's kubelet directory (a publish not yet
    /// unpublished); the fence is kept until the loop device is really gone.
    pub fn unstage(&self, pool: &Pool, id: &str, staging: &Path) -> Result<(), NodeError> {
        let mounts = mounts::of_volume(pool, id, &self.kubelet_dir)
            .map_err(sys("read", "/proc/self/mountinfo"))?;
        if let Some(at) = mounts.into_iter().find(|p| !p.starts_with(staging)) {
            return Err(NodeError::StillPublished {
                id: id.to_owned(),
                at,
            });
        }
        let staged = matches!(
            mount::state(staging).map_err(sys("stat", staging))?,
            MountState::Mounted | MountState::Broken
        );
        if staged {
            // A filesystem or directory stage: everything below the staging
            // path is the pod's (a `device` there is just its file).
            mount::unmount(staging).map_err(sys("unmount", staging))?;
        } else {
            // A block stage: the staging directory is kubelet's, and the
            // device node is bound onto its `device` file.
            let device_file = staging.join(BLOCK_DEVICE_FILE);
            if matches!(
                mount::state(&device_file).map_err(sys("stat", &device_file))?,
                MountState::Mounted | MountState::Broken
            ) {
                mount::unmount(&device_file).map_err(sys("unmount", &device_file))?;
            }
            remove_if_present(&device_file).map_err(sys("remove", &device_file))?;
        }
        let image = pool.image_path(id);
        if let Some(dev) =
            loopdev::find_bound(&image).map_err(sys("find loop device of", &image))?
        {
            if mounts::loop_mounted(&dev).map_err(sys("read", "/proc/self/mountinfo"))? {
                // Another node plugin on this host (its own kubelet
                // directory, a shared read-only stage) still has it mounted:
                // the device stays for it; this plugin's stage is over.
                log::info!(
                    "volume {id}: {} is still mounted outside this node's kubelet directory; it stays attached",
                    dev.path().display()
                );
            } else {
                if !dev.detaching() {
                    dev.detach().map_err(sys("detach", dev.path()))?;
                }
                if !detached(&image).map_err(sys("find loop device of", &image))? {
                    return Err(NodeError::DetachPending {
                        device: dev.path(),
                        image,
                    });
                }
            }
        }
        self.release_fence(id);
        Ok(())
    }

    // ---- publish ----

    /// NodePublishVolume: binds the staged volume onto the target.
    pub fn publish(
        &self,
        pool: &Pool,
        v: &VolumeMeta,
        staging: &Path,
        target: &Path,
        req: &Request,
    ) -> Result<(), NodeError> {
        let block = req.access == AccessType::Block;
        let read_only = req.readonly || req.mode.is_read_only();
        let source = if block {
            staging.join(BLOCK_DEVICE_FILE)
        } else {
            staging.to_owned()
        };
        if mount::state(&source).map_err(sys("stat", &source))? != MountState::Mounted {
            return Err(NodeError::NotStaged {
                id: v.id.clone(),
                path: staging.to_owned(),
            });
        }
        if mount::state(target).map_err(sys("stat", target))? == MountState::Mounted {
            self.expect_same_fs(target, &source, "another volume")?;
            if is_read_only(target)? != read_only {
                return Err(NodeError::Occupied {
                    path: target.to_owned(),
                    what: "this volume published with another read-only setting".into(),
                });
            }
            return Ok(());
        }
        if req.mode == AccessMode::SingleNodeSingleWriter {
            // By identity: any mount of this volume under the kubelet
            // directory but its stage is a publish, wherever it is.
            let mounts = mounts::of_volume(pool, &v.id, &self.kubelet_dir)
                .map_err(sys("read", "/proc/self/mountinfo"))?;
            if let Some(other) = mounts
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
        mount::bind_at(from.as_fd(), onto.as_fd()).map_err(sys("bind-mount", target))?;
        let mut undo = Rollback::new();
        undo.push(format!("unmount {}", target.display()), || {
            mount::unmount(target)
        });
        let finish = || -> Result<(), NodeError> {
            let root = self.mounted_root(target, from.as_fd())?;
            if read_only {
                mount::remount_read_only_at(root.as_fd())
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
    pub fn unpublish(&self, target: &Path) -> Result<(), NodeError> {
        match mount::state(target).map_err(sys("stat", target))? {
            MountState::Missing => return Ok(()),
            MountState::Mounted | MountState::Broken => {
                mount::unmount(target).map_err(sys("unmount", target))?;
            }
            MountState::NotMounted => {}
        }
        let meta = std::fs::symlink_metadata(target).map_err(sys("stat", target))?;
        if meta.is_dir() {
            std::fs::remove_dir(target).map_err(sys("remove", target))?;
        } else {
            std::fs::remove_file(target).map_err(sys("remove", target))?;
        }
        Ok(())
    }

    // ---- stats and expansion ----

    /// NodeGetVolumeStats.
    pub fn stats(&self, pool: &Pool, v: &VolumeMeta, path: &Path) -> Result<Stats, NodeError> {
        let state = mount::state(path).map_err(sys("stat", path))?;
        if state == MountState::Missing {
            return Err(NodeError::NotFound {
                what: "volume path",
                path: path.to_owned(),
            });
        }
        let mut stats = Stats::default();
        let mut problems = Vec::new();
        if state != MountState::Mounted {
            problems.push(format!("{} is not mounted", path.display()));
        }
        if v.layout == Layout::Image {
            let image = pool.image_path(&v.id);
            match loopdev::find(&image) {
                Ok(Some(dev)) => {
                    if v.access == AccessType::Block {
                        let size = dev.size().map_err(sys("size of", dev.path()))?;
                        stats.bytes = Some((size, 0, 0));
                    }
                }
                Ok(None) if !image.exists() => {
                    problems.push(format!("image {} is gone", image.display()))
                }
                Ok(None) => problems.push(format!("no loop device backs {}", image.display())),
                Err(e) => problems.push(format!("loop devices cannot be listed: {e}")),
            }
        }
        if v.access == AccessType::Mount && state == MountState::Mounted {
            let st = rustix::fs::statvfs(path).map_err(|e| sys("statvfs", path)(e.into()))?;
            let total = st.f_blocks * st.f_frsize;
            let avail = st.f_bavail * st.f_frsize;
            let used = (st.f_blocks - st.f_bfree) * st.f_frsize;
            stats.bytes = Some((total, avail, used));
            if st.f_files > 0 {
                stats.inodes = Some((st.f_files, st.f_favail, st.f_files - st.f_ffree));
            }
        }
        if state == MountState::Broken {
            problems.push(format!(
                "the filesystem at {} is gone (stale or disconnected)",
                path.display()
            ));
        }
        stats.problem = (!problems.is_empty()).then(|| problems.join("; "));
        Ok(stats)
    }

    /// NodeExpandVolume: the loop device re-reads the image's size, then the
    /// filesystem grows online. Returns the device's new size.
    pub fn expand(
        &self,
        pool: &Pool,
        v: &VolumeMeta,
        path: &Path,
        range: CapacityRange,
    ) -> Result<u64, NodeError> {
        let (required, limit) = (range.required, range.limit);
        if v.layout == Layout::Dir {
            // A directory has no filesystem of its own to grow; its size is
            // what the record (and the capacity accounting) says.
            if required > v.capacity_bytes || (limit != 0 && v.capacity_bytes > limit) {
                return Err(NodeError::NotGrown {
                    id: v.id.clone(),
                    size: v.capacity_bytes,
                    required,
                    limit,
                });
            }
            return Ok(v.capacity_bytes);
        }
        let image = pool.image_path(&v.id);
        let dev = loopdev::find(&image)
            .map_err(sys("find loop device of", &image))?
            .ok_or_else(|| NodeError::NotFound {
                what: "loop device of",
                path: image.clone(),
            })?;
        dev.refresh_capacity()
            .map_err(sys("refresh capacity of", dev.path()))?;
        crate::faults::crash_point("expand.device_grown");
        // Answer with what the volume is, never with what was asked for: an
        // image the controller did not grow is an error, not a success.
        let size = dev.size().map_err(sys("size of", dev.path()))?;
        if required > size || (limit != 0 && size > limit) {
            return Err(NodeError::NotGrown {
                id: v.id.clone(),
                size,
                required,
                limit,
            });
        }
        if v.access == AccessType::Mount {
            let fs = v.fs_type.unwrap_or(FsType::Ext4);
            if fs == FsType::Btrfs && size < FsType::Btrfs.min_bytes() {
                // The kernel resizes no btrfs this small, not even to its
                // own size: fine when it already fills its device (a small
                // volume of an older version, asked for what it has), an
                // error when it would have to grow.
                if format::btrfs_device_size(path)? >= size {
                    return Ok(size);
                }
                return Err(NodeError::TooSmallToResize {
                    id: v.id.clone(),
                    size,
                });
            }
            format::grow(fs, &dev.path(), path)?;
        }
        Ok(size)
    }
}

fn is_read_only(path: &Path) -> Result<bool, NodeError> {
    let st = rustix::fs::statvfs(path).map_err(|e| sys("statvfs", path)(e.into()))?;
    Ok(st.f_flag.contains(rustix::fs::StatVfsMountFlags::RDONLY))
}

fn remove_if_present(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// Opens (`O_PATH`) a loop device's node, the source of a block bind.
fn open_device(dev: &LoopDevice) -> Result<OwnedFd, NodeError> {
    rustix::fs::open(
        dev.path(),
        rustix::fs::OFlags::PATH | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .map_err(|e| sys("open", dev.path())(e.into()))
}

/// Waits (up to about two seconds) until no loop device is bound to `image`
/// any more, detaching or not: the kernel lets go of a detached device at
/// its last close, which a moment's opener (a probe, udev) can delay.
fn detached(image: &Path) -> std::io::Result<bool> {
    for wait in [0, 10, 20, 50, 100, 200, 400, 600, 600] {
        std::thread::sleep(std::time::Duration::from_millis(wait));
        if loopdev::find_bound(image)?.is_none() {
            return Ok(true);
        }
    }
    Ok(false)
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
