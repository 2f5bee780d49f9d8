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
pub mod paths;

use std::collections::HashMap;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use parking_lot::Mutex;

use error::sys;
pub use error::NodeError;
use format::Content;

use crate::pool::meta::{AccessMode, AccessType, FsType, Layout, VolumeMeta};
use crate::pool::store::Fence;
use crate::pool::Pool;
use crate::sys::lock::LockKind;
use crate::sys::loopdev::{self, LoopDevice};
use crate::sys::mount::{self, MountState};
use crate::sys::mountinfo;

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
            // that finished: not staged, nothing to fence.
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
        let _ = std::fs::remove_file(&scratch);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&scratch)
            .map_err(sys("create", &scratch))?;
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
        if result.is_err() {
            let _ = std::fs::remove_file(&scratch);
        }
        result
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
        self.fenced(pool, &v.id, LockKind::Shared, || {
            if mount::state(staging).map_err(sys("stat", staging))? == MountState::Mounted {
                return self.expect_same_fs(staging, &data, "another filesystem");
            }
            std::fs::create_dir_all(staging).map_err(sys("create", staging))?;
            mount::bind(&data, staging).map_err(sys("bind-mount", staging))?;
            if req.mode.is_read_only() {
                if let Err(e) = mount::remount_read_only(staging) {
                    let _ = mount::unmount(staging);
                    return Err(sys("remount read-only", staging)(e));
                }
            }
            Ok(())
        })
    }

    /// Runs a stage holding the volume's fence of `kind`; a stage that fails
    /// lets go of a fence it took (not of one an earlier stage holds).
    fn fenced<T>(
        &self,
        pool: &Pool,
        id: &str,
        kind: LockKind,
        stage: impl FnOnce() -> Result<T, NodeError>,
    ) -> Result<T, NodeError> {
        let fenced_now = self.take_fence(pool, id, kind)?;
        let result = stage();
        if result.is_err() && fenced_now {
            self.release_fence(id);
        }
        result
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
        if let Some(dev) = loopdev::find(&image).map_err(sys("find loop device of", &image))? {
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
        self.fenced(pool, &v.id, lock_kind(req.mode), || {
            self.stage_image_fenced(pool, v, staging, req)
        })
    }

    fn stage_image_fenced(
        &self,
        pool: &Pool,
        v: &VolumeMeta,
        staging: &Path,
        req: &Request,
    ) -> Result<(), NodeError> {
        let fs = v.fs_type.unwrap_or(FsType::Ext4);
        let read_only = req.mode.is_read_only();
        // A provably blank image gets its filesystem before it is attached.
        let v = if !read_only && v.written != Some(true) {
            self.format_if_blank(pool, &v.id, fs)?
        } else {
            v.clone()
        };
        let (dev, attached_now) = self.attach(pool, &v, read_only)?;
        if attached_now {
            if let Err(e) = dev.drop_cached_blocks() {
                let _ = dev.detach();
                return Err(sys("drop cached blocks of", dev.path())(e));
            }
        }
        let undo = |e: NodeError| {
            if attached_now {
                let _ = dev.detach();
            }
            e
        };
        if mount::state(staging).map_err(sys("stat", staging))? == MountState::Mounted {
            // Staged already (a retry, or a restart): it must be this
            // volume's device.
            let source =
                mount::source_of(staging).map_err(sys("read the mount table for", staging))?;
            if source.as_deref() != Some(dev.path().to_string_lossy().as_ref()) {
                return Err(undo(NodeError::Occupied {
                    path: staging.to_owned(),
                    what: "another filesystem".into(),
                }));
            }
            return Ok(());
        }

        match format::probe(&dev.path(), &pool.image_path(&v.id)).map_err(undo)? {
            Content::Filesystem(found) if found == fs.as_str() => {}
            Content::Blank => {
                // A read-only stage of a never-formatted volume, or an image
                // blanked under us: nothing to mount, nothing to format.
                return Err(undo(NodeError::WillNotFormat {
                    device: dev.path(),
                    found: "nothing (a blank volume is formatted at its first read-write stage)"
                        .into(),
                    expected: fs.as_str().into(),
                }));
            }
            Content::Filesystem(found) => {
                return Err(undo(NodeError::WillNotFormat {
                    device: dev.path(),
                    found,
                    expected: fs.as_str().into(),
                }))
            }
            Content::Other(found) => {
                return Err(undo(NodeError::WillNotFormat {
                    device: dev.path(),
                    found,
                    expected: fs.as_str().into(),
                }))
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
        std::fs::create_dir_all(staging)
            .map_err(sys("create", staging))
            .map_err(undo)?;
        mount::mount_fs(&dev.path(), staging, fs.as_str(), flags, &data)
            .map_err(sys("mount", staging))
            .map_err(undo)?;
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
        self.fenced(pool, &v.id, lock_kind(req.mode), || {
            // Recorded before the device is handed out: from here on the
            // pod may write anything, signature or not, and a later stage as
            // a filesystem must never take it for blank.
            if !read_only && v.written != Some(true) {
                let lock = pool.lock_volume(&v.id)?;
                pool.mark_written(&v.id, &lock)?;
            }
            let (dev, attached_now) = self.attach(pool, v, read_only)?;
            let file = staging.join(BLOCK_DEVICE_FILE);
            if mount::state(&file).map_err(sys("stat", &file))? == MountState::Mounted {
                return Ok(());
            }
            let bound = (|| {
                std::fs::create_dir_all(staging).map_err(sys("create", staging))?;
                std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(&file)
                    .map_err(sys("create", &file))?;
                mount::bind(&dev.path(), &file).map_err(sys("bind-mount", &file))
            })();
            if bound.is_err() && attached_now {
                let _ = dev.detach();
            }
            bound
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
    /// lock. Idempotent.
    pub fn unstage(&self, pool: &Pool, id: &str, staging: &Path) -> Result<(), NodeError> {
        let device_file = staging.join(BLOCK_DEVICE_FILE);
        if matches!(
            mount::state(&device_file).map_err(sys("stat", &device_file))?,
            MountState::Mounted | MountState::Broken
        ) {
            mount::unmount(&device_file).map_err(sys("unmount", &device_file))?;
        }
        if device_file.exists() {
            std::fs::remove_file(&device_file).map_err(sys("remove", &device_file))?;
        }
        if matches!(
            mount::state(staging).map_err(sys("stat", staging))?,
            MountState::Mounted | MountState::Broken
        ) {
            mount::unmount(staging).map_err(sys("unmount", staging))?;
        }
        // The fence and the loop device go only with the volume's last mount
        // on this host: staged at another path too (CSI allows one per
        // usage), or still published, it stays fenced and attached.
        let image = pool.image_path(id);
        if let Some(dev) = loopdev::find(&image).map_err(sys("find loop device of", &image))? {
            if loop_in_use(&dev, &self.kubelet_dir).map_err(sys("read", "/proc/self/mountinfo"))? {
                log::info!(
                    "volume {id}: {} is still mounted elsewhere on this node; it stays attached and fenced",
                    dev.path().display()
                );
                return Ok(());
            }
            dev.detach().map_err(sys("detach", dev.path()))?;
        }
        if staged_dirs(pool, Some(&self.kubelet_dir))
            .map_err(sys("read", "/proc/self/mountinfo"))?
            .iter()
            .any(|d| d == id)
        {
            log::info!("volume {id}: its directory is still mounted elsewhere on this node; it stays fenced");
            return Ok(());
        }
        self.release_fence(id);
        Ok(())
    }

    // ---- publish ----

    /// NodePublishVolume: binds the staged volume onto the target.
    pub fn publish(
        &self,
        v: &VolumeMeta,
        staging: &Path,
        target: &Path,
        req: &Request,
    ) -> Result<(), NodeError> {
        let block = req.access == AccessType::Block;
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
            let ro = is_read_only(target)?;
            if ro != (req.readonly || req.mode.is_read_only()) {
                return Err(NodeError::Occupied {
                    path: target.to_owned(),
                    what: "this volume published with another read-only setting".into(),
                });
            }
            return Ok(());
        }
        if req.mode == AccessMode::SingleNodeSingleWriter {
            if let Some(other) = other_publish(&source, staging, target)? {
                return Err(NodeError::SingleWriter {
                    id: v.id.clone(),
                    other,
                });
            }
        }
        if block {
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent).map_err(sys("create", parent))?;
            }
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .open(target)
                .map_err(sys("create", target))?;
        } else {
            std::fs::create_dir_all(target).map_err(sys("create", target))?;
        }
        mount::bind(&source, target).map_err(sys("bind-mount", target))?;
        let finish = || -> Result<(), NodeError> {
            if req.readonly || req.mode.is_read_only() {
                mount::remount_read_only(target).map_err(sys("remount read-only", target))?;
            }
            if let (Some(gid), false) = (req.mount_group, block) {
                apply_group(target, gid)?;
            }
            Ok(())
        };
        if let Err(e) = finish() {
            let _ = mount::unmount(target);
            return Err(e);
        }
        Ok(())
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
    pub fn expand(&self, pool: &Pool, v: &VolumeMeta, path: &Path) -> Result<u64, NodeError> {
        if v.layout == Layout::Dir {
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
        if v.access == AccessType::Mount {
            format::grow(v.fs_type.unwrap_or(FsType::Ext4), &dev.path(), path)?;
        }
        dev.size().map_err(sys("size of", dev.path()))
    }
}

/// Whether this node plugin still has the loop device mounted under its
/// kubelet directory: a filesystem on it (the mount's source is the device)
/// or a bind of its device node (a block stage or publish: devtmpfs, root
/// `/loopN`). Mounts elsewhere are not this node's stages.
fn loop_in_use(dev: &LoopDevice, kubelet_dir: &Path) -> std::io::Result<bool> {
    let path = dev.path();
    let node = Path::new("/").join(path.file_name().unwrap_or_default());
    Ok(mountinfo::read()?.iter().any(|e| {
        e.mount_point.starts_with(kubelet_dir)
            && (Path::new(&e.source) == path || (e.fs_type == "devtmpfs" && e.root == node))
    }))
}

/// Ids of the pool's directory volumes bind-mounted on this host (staged or
/// published; under `under` only, when given: one node plugin's kubelet
/// directory), from the mount table: a bind's `root` field is the path
/// inside the filesystem it comes from, which for a directory volume is
/// `<pool, inside its filesystem>/volumes/<id>/data`.
fn staged_dirs(pool: &Pool, under: Option<&Path>) -> std::io::Result<Vec<String>> {
    let table = mountinfo::read()?;
    let root = pool.root().canonicalize()?;
    // The mount that holds the pool: the longest mount point above it.
    let Some(holder) = table
        .iter()
        .filter(|e| root.starts_with(&e.mount_point))
        .max_by_key(|e| e.mount_point.as_os_str().len())
    else {
        return Ok(Vec::new());
    };
    let inside = holder.root.join(
        root.strip_prefix(&holder.mount_point)
            .expect("the holder's mount point is a prefix of the pool"),
    );
    let volumes = inside.join("volumes");
    let mut ids: Vec<String> = table
        .iter()
        .filter(|e| e.device == holder.device)
        .filter(|e| under.is_none_or(|dir| e.mount_point.starts_with(dir)))
        .filter_map(|e| {
            let rest = e.root.strip_prefix(&volumes).ok()?;
            let mut parts = rest.components();
            let id = parts.next()?.as_os_str().to_str()?.to_owned();
            (parts.next()?.as_os_str() == "data" && parts.next().is_none()).then_some(id)
        })
        .collect();
    ids.sort();
    ids.dedup();
    Ok(ids)
}

fn is_read_only(path: &Path) -> Result<bool, NodeError> {
    let st = rustix::fs::statvfs(path).map_err(|e| sys("statvfs", path)(e.into()))?;
    Ok(st.f_flag.contains(rustix::fs::StatVfsMountFlags::RDONLY))
}

/// Another bind mount of the same staged filesystem on this node, other
/// than the staging mount and `target`. Reads /proc/self/mountinfo: only
/// for ReadWriteOncePod, where a second publish must be refused.
fn other_publish(
    source: &Path,
    staging: &Path,
    target: &Path,
) -> Result<Option<PathBuf>, NodeError> {
    let dev = mount::device_of(source).map_err(sys("stat", source))?;
    let wanted = format!("{}:{}", rustix::fs::major(dev), rustix::fs::minor(dev));
    let table = mountinfo::read().map_err(sys("read", "/proc/self/mountinfo"))?;
    Ok(table
        .into_iter()
        .filter(|e| e.device == wanted)
        .map(|e| e.mount_point)
        .find(|point| {
            point != staging
                && point != target
                && point != source
                && !point.starts_with(staging)
                // Only mounts under the kubelet's pod directories are publishes.
                && point.components().any(|c| c.as_os_str() == "pods")
        }))
}

/// Gives group `gid` the volume's root (and, when the root's group differs,
/// everything below it, as kubelet's fsGroup does with OnRootMismatch), with
/// group write and setgid on directories so new files inherit the group.
fn apply_group(root: &Path, gid: u32) -> Result<(), NodeError> {
    let meta = std::fs::metadata(root).map_err(sys("stat", root))?;
    if meta.gid() == gid {
        return Ok(());
    }
    fn walk(path: &Path, gid: u32) -> Result<(), NodeError> {
        let meta = std::fs::symlink_metadata(path).map_err(sys("stat", path))?;
        std::os::unix::fs::lchown(path, None, Some(gid)).map_err(sys("chown", path))?;
        if meta.file_type().is_symlink() {
            return Ok(());
        }
        let mut mode = meta.permissions().mode() | 0o060;
        if meta.is_dir() {
            mode |= 0o2010;
            for entry in std::fs::read_dir(path).map_err(sys("read directory", path))? {
                walk(&entry.map_err(sys("read directory", path))?.path(), gid)?;
            }
        }
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode & 0o7777))
            .map_err(sys("chmod", path))
    }
    walk(root, gid)
}
