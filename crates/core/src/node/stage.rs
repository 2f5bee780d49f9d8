//! NodeStageVolume and NodeUnstageVolume: attach the image, give a blank one
//! its filesystem, mount it (or bind the device node, for block; or bind
//! the data directory, for `dir` volumes), and the reverse.
//!
//! A stage holds a [`Claim`] from its first step: the fence, then the
//! device, then each mount, so a stage that fails part-way gives back what
//! it took and a retry starts clean. A stage that finds itself done already
//! (kubelet's retry, a restarted plugin) checks that what is mounted is this
//! volume and answers OK.

use std::borrow::Cow;
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use super::claim::Claim;
use super::error::{probe_failed, sys, unmountable, NodeError};
use super::format::Content;
use super::paths::Create;
use super::rollback::Rollback;
use super::template::Recipe;
use super::{lock_kind, Node, Request, BLOCK_DEVICE_FILE};
use crate::pool::Pool;
use crate::sys::lock::LockKind;
use crate::sys::loopdev::LoopDevice;
use crate::sys::mount::{self, MountState};
use crate::volume::meta::{AccessType, FsType, Layout, VolumeMeta};
use crate::volume::mkfs_options;

impl Node {
    /// NodeStageVolume.
    pub fn stage(
        &self,
        pool: &Pool,
        v: &VolumeMeta,
        staging: &Path,
        req: &Request,
    ) -> Result<(), NodeError> {
        // Waits for a trim of this volume to end; none starts until the
        // stage is done.
        let _changing = self.gate.change(&v.id);
        self.refuse_unproven(&v.id)?;
        match (v.layout, req.access) {
            (Layout::Dir, _) => self.stage_dir(pool, v, staging, req),
            (Layout::Image, AccessType::Mount) => {
                let v = self.settled_for(pool, v, staging, req)?;
                let mut claim = Claim::fence(self, pool, &v.id, lock_kind(req.mode))?;
                let result = self.stage_image(pool, &v, staging, req, &mut claim);
                claim.finish(result)
            }
            (Layout::Image, AccessType::Block) => {
                let mut claim = Claim::fence(self, pool, &v.id, lock_kind(req.mode))?;
                let result = self.stage_block(pool, v, staging, req, &mut claim);
                claim.finish(result)
            }
        }
    }

    /// The volume's record for a filesystem stage: for a read-only one of
    /// a clone or restore not settled yet, after it is settled (see
    /// `node::settle`). Not for a stage this plugin holds the fence of
    /// already (a retry, a second staging path: settled before, or staged
    /// by a version before settling, which must not be fenced out by its
    /// own fence).
    fn settled_for<'v>(
        &self,
        pool: &Pool,
        v: &'v VolumeMeta,
        staging: &Path,
        req: &Request,
    ) -> Result<Cow<'v, VolumeMeta>, NodeError> {
        if !req.mode.is_read_only()
            || !v.needs_settling()
            // A format cut short is refused by the stage, never replayed.
            || v.formatting
            || self.fences.held(&v.id).is_some()
            || self.mount_state(staging)? == MountState::Mounted
        {
            return Ok(Cow::Borrowed(v));
        }
        Ok(Cow::Owned(self.settle(pool, v)?))
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
        let mut claim = Claim::fence(self, pool, &v.id, LockKind::Shared)?;
        let result = (|| {
            if self.mount_state(staging)? == MountState::Mounted {
                // Staged already, if what is bound there is this volume's
                // directory (another volume's lies on the same filesystem).
                self.expect_volume_at(pool, &v.id, staging)?;
                return self.hold_dir_fence(pool, &v.id, &mut claim);
            }
            let source = crate::sys::untrusted::open_root(&data).map_err(sys("open", &data))?;
            let target = self.mount_point(staging, Create::Dir)?;
            self.kernel
                .bind(source.as_fd(), target.as_fd())
                .map_err(sys("bind-mount", staging))?;
            claim.push(format!("unmount {}", staging.display()), move || {
                self.kernel.unmount(staging)
            });
            if req.mode.is_read_only() {
                let root = self.mounted_root(staging, source.as_fd())?;
                self.kernel
                    .remount_read_only(root.as_fd())
                    .map_err(sys("remount read-only", staging))?;
            }
            self.hold_dir_fence(pool, &v.id, &mut claim)
        })();
        claim.finish(result)
    }

    /// Gives a directory volume's stage a fence as long-lived as its bind
    /// mount: a read-only loop device of the volume's fence file, which
    /// holds the file's lock shared (`sys::loopdev::attach`) for as long as
    /// the device exists, whatever happens to this plugin. A bind mount
    /// holds no open file, so nothing else the kernel keeps could carry
    /// the lock. The device has no size and nothing mounts it; a delete or
    /// a copy of the volume, which needs the fence exclusively, is refused
    /// while it exists, on any host sharing the pool. The unstage detaches
    /// it.
    fn hold_dir_fence<'a>(
        &'a self,
        pool: &Pool,
        id: &str,
        claim: &mut Claim<'a>,
    ) -> Result<(), NodeError> {
        let fence = pool.fence_path(id);
        let key = super::devices::image_key(&fence)
            .and_then(|key| key.ok_or_else(|| std::io::ErrorKind::NotFound.into()))
            .map_err(sys("attach a loop device to", &fence))?;
        if let Some(bound) = self
            .devices
            .bound_key(&*self.kernel, key)
            .map_err(sys("find loop device of", &fence))?
        {
            if !bound.detaching {
                return Ok(());
            }
        }
        let Some(a) = self
            .kernel
            .attach(&fence, true, false, &self.node_id)
            .map_err(sys("attach a loop device to", &fence))?
        else {
            // Held exclusively: a delete or copy of the volume is under way.
            return Err(NodeError::Fenced {
                id: id.to_owned(),
                image: fence,
            });
        };
        claim.attached(a.device);
        self.devices.attached(key, a.device, id);
        Ok(())
    }

    /// Attaches the image's loop device unless this plugin has a usable
    /// one attached; the claim detaches one this call attached if the
    /// stage fails.
    ///
    /// A device of the image anywhere else is found by the image's lock,
    /// which every device this filevol attaches holds (`sys::loopdev::attach`)
    /// and which a restarted plugin takes for any device it finds without
    /// one (`custody`): so the attach itself is the look for another device,
    /// at no cost while there is none. When the lock is held, the host's
    /// devices are asked ([`Node::clear_other_devices`]): one another node
    /// plugin has mounted (or a dead one left mounted) is refused; one
    /// mounted nowhere (a stage that died between attach and mount) is
    /// detached and the attach tried once more; none means the holder is on
    /// another host, or a delete or copy is under way.
    fn attach(
        &self,
        pool: &Pool,
        v: &VolumeMeta,
        read_only: bool,
        claim: &mut Claim<'_>,
    ) -> Result<LoopDevice, NodeError> {
        let image = pool.image_path(&v.id);
        let key = super::devices::image_key(&image)
            .and_then(|key| key.ok_or_else(|| std::io::ErrorKind::NotFound.into()))
            .map_err(sys("attach a loop device to", &image))?;
        if let Some(bound) = self
            .devices
            .bound_key(&*self.kernel, key)
            .map_err(sys("find loop device of", &image))?
        {
            // A device being detached still writes the image until its last
            // close: a second device beside it would be a second writer.
            if bound.detaching {
                return Err(NodeError::DetachPending {
                    device: bound.device.path(),
                    image,
                });
            }
            return Ok(bound.device);
        }
        let attach = || {
            self.kernel
                .attach(&image, read_only, self.direct_io, &self.node_id)
                .map_err(sys("attach a loop device to", &image))
        };
        let a = match attach()? {
            Some(a) => a,
            None => {
                self.clear_other_devices(&v.id, &image, key)?;
                attach()?.ok_or_else(|| NodeError::ImageFenced {
                    id: v.id.clone(),
                    image: image.clone(),
                })?
            }
        };
        claim.attached(a.device);
        self.devices.attached(key, a.device, &v.id);
        // Errors the number logged before belong to its last image.
        self.loop_errors.forget(a.device.number);
        if !a.direct_io {
            log::info!(
                "volume {}: the pool filesystem refused direct I/O; the loop device is buffered",
                v.id
            );
        }
        // A device number is reused: drop anything cached of an image it
        // backed before.
        self.kernel
            .drop_cached_blocks(a.device)
            .map_err(sys("drop cached blocks of", a.device.path()))?;
        Ok(a.device)
    }

    /// Deals with the devices of the image on this host when its lock is
    /// held (see [`Node::attach`]): refuses one attached for another node
    /// (on this kernel: its mounts do not show in this namespace) or one
    /// that is mounted, detaches one of this node's that is mounted
    /// nowhere.
    pub(super) fn clear_other_devices(
        &self,
        id: &str,
        image: &Path,
        key: (u64, u64),
    ) -> Result<(), NodeError> {
        let found = self
            .kernel
            .attached()
            .map_err(sys("find loop devices of", image))?;
        for (bound, _) in found.into_iter().filter(|(_, backing)| *backing == key) {
            let dev = bound.device;
            let at = self
                .loop_mount_points(dev)
                .map_err(sys("read", "/proc/self/mountinfo"))?;
            if let Some(at) = at.into_iter().next() {
                return Err(NodeError::AttachedElsewhere {
                    id: id.to_owned(),
                    image: image.to_owned(),
                    device: dev.path(),
                    at,
                });
            }
            // Mounted nowhere that this namespace shows: another node's
            // mounts are in its own.
            if !self.owns(bound) {
                return Err(NodeError::AttachedForAnotherNode {
                    id: id.to_owned(),
                    image: image.to_owned(),
                    device: dev.path(),
                });
            }
            // Mounted nowhere: nobody's stage. The kernel defers the detach
            // while anything still holds the device open, and then the
            // image stays in use: refused until it is gone.
            if !bound.detaching {
                log::info!(
                    "volume {id}: {} serves the image but is mounted nowhere (left by a stage that died); detaching it",
                    dev.path().display()
                );
                self.kernel.detach(dev).map_err(sys("detach", dev.path()))?;
            }
            if !self
                .detached_device(dev, key)
                .map_err(sys("find loop device of", image))?
            {
                return Err(NodeError::DetachPending {
                    device: dev.path(),
                    image: image.to_owned(),
                });
            }
        }
        Ok(())
    }

    fn stage_image<'a>(
        &'a self,
        pool: &Pool,
        v: &VolumeMeta,
        staging: &'a Path,
        req: &Request,
        claim: &mut Claim<'a>,
    ) -> Result<(), NodeError> {
        let fs = v.fs_type.unwrap_or(FsType::Ext4);
        let read_only = req.mode.is_read_only();
        if self.mount_state(staging)? == MountState::Mounted {
            // Staged already (a retry, or a restart), if what is mounted is
            // this volume's device; decided before anything is formatted
            // or attached, so a stage at another volume's path changes
            // nothing.
            return self.expect_volume_at(pool, &v.id, staging);
        }
        // A provably blank image gets its filesystem before it is attached.
        let (v, formatted_now) = if !read_only && v.written != Some(true) {
            self.format_if_blank(pool, &v.id, fs)?
        } else {
            (v.clone(), false)
        };
        let dev = self.attach(pool, &v, read_only, claim)?;

        let will_not = |found: String| NodeError::WillNotFormat {
            device: dev.path(),
            found,
            expected: fs.as_str().into(),
        };
        // The probe reads 768 KiB through the device. After a format by
        // this very call it has nothing to find out: under the volume's
        // lock and exclusive fence this call proved the image blank,
        // replaced it by the filesystem it made, and attached a new device
        // to that file (a new inode no other device can serve).
        // A read-only stage never formats: a filesystem whose making was
        // cut short waits for the first read-write stage.
        if v.formatting && v.written != Some(true) {
            return Err(will_not(
                "a filesystem whose making was cut short (made again at the first read-write stage)"
                    .into(),
            ));
        }
        let content = if formatted_now {
            Content::Filesystem(fs.as_str().into())
        } else {
            self.kernel
                .probe(&dev.path(), &pool.image_path(&v.id), fs)
                .map_err(probe_failed(dev.path()))?
        };
        match content {
            Content::Filesystem(found) if found == fs.as_str() => {}
            // A read-only stage of a never-formatted volume, or an image
            // blanked under us: nothing to mount, nothing to format.
            Content::Blank => {
                return Err(will_not(
                    "nothing (a blank volume is formatted at its first read-write stage)".into(),
                ))
            }
            Content::Filesystem(found) | Content::Other(found) => return Err(will_not(found)),
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
        let mut add = |option: &str| {
            if !data.is_empty() {
                data.push(',');
            }
            data.push_str(option);
        };
        if fs == FsType::Xfs {
            // Clones and restores share their source's UUID.
            add("nouuid");
        }
        if !read_only && crate::volume::parameters::online_discard(&v.parameters, v.thick) {
            add("discard");
        }
        let target = self.mount_point(staging, Create::Dir)?;
        self.kernel
            .mount_fs(&dev.path(), target.as_fd(), fs.as_str(), flags, &data)
            .map_err(|e| {
                // A read-only mount the kernel refuses (a journal to replay
                // after all, a damaged filesystem) is the volume's state,
                // not a fault: kubelet's retries would change nothing.
                if read_only {
                    unmountable(&v.id, fs.as_str(), dev.path(), "read-only")(e)
                } else {
                    sys("mount", staging)(e)
                }
            })?;
        claim.push(format!("unmount {}", staging.display()), move || {
            self.kernel.unmount(staging)
        });
        // A restored or cloned volume may be larger than its filesystem.
        if !read_only && v.source.is_some() {
            if let Err(e) = self.kernel.grow(fs, &dev.path(), staging) {
                log::warn!(
                    "volume {}: growing the filesystem after a restore: {e}",
                    v.id
                );
            }
        }
        Ok(())
    }

    fn stage_block<'a>(
        &'a self,
        pool: &Pool,
        v: &VolumeMeta,
        staging: &Path,
        req: &Request,
        claim: &mut Claim<'a>,
    ) -> Result<(), NodeError> {
        let read_only = req.mode.is_read_only();
        let file = staging.join(BLOCK_DEVICE_FILE);
        if self.mount_state(&file)? == MountState::Mounted {
            // Staged already, if it is this volume's device node; decided
            // before anything is recorded or attached.
            return self.expect_volume_at(pool, &v.id, &file);
        }
        // Recorded before the device is handed out: from here on the pod
        // may write anything, signature or not, and a later stage as a
        // filesystem must never take it for blank.
        if !read_only && v.written != Some(true) {
            let lock = pool.lock_volume(&v.id)?;
            pool.mark_written(&v.id, &lock)?;
        }
        let dev = self.attach(pool, v, read_only, claim)?;
        let source = self
            .kernel
            .open_device(dev)
            .map_err(sys("open", dev.path()))?;
        let target = self.mount_point(&file, Create::File)?;
        self.kernel
            .bind(source.as_fd(), target.as_fd())
            .map_err(sys("bind-mount", &file))?;
        claim.push(format!("unmount {}", file.display()), move || {
            self.kernel.unmount(&file)
        });
        Ok(())
    }

    /// Formats the image if it is provably blank (see
    /// [`super::format::blank_image`]), and returns the volume's record as
    /// it is now and whether this call formatted it. Runs under the volume's lock in the pool: the size
    /// formatted is the one recorded now (an expansion before the first
    /// stage is not lost), and no other process changes the record in
    /// between.
    fn format_if_blank(
        &self,
        pool: &Pool,
        id: &str,
        fs: FsType,
    ) -> Result<(VolumeMeta, bool), NodeError> {
        let lock = pool.lock_volume(id)?;
        let v = pool.volume(id)?;
        let image = pool.image_path(id);
        // A format in place cut short (see `super::in_place`): the image
        // holds only filevol's half-made filesystem, never handed out, and
        // is formatted again. Asked before the probe, which would call it
        // data (or a filesystem, one that may not be whole).
        let redo = v.formatting && v.written != Some(true);
        // Holes prove an image blank only where filevol never put data
        // extents in it itself: a zero-filled image has them from the day
        // it was built, and a clone or restore has its source's (the
        // zeros of a zero-filled source, copied or shared). For those the
        // record decides (never formatted or handed out, which a copy
        // inherits from its source, and no signature), as on a pool whose
        // holes cannot be seen.
        let holes_prove_blank = pool.reports_holes()
            && v.source.is_none()
            && !crate::volume::parameters::zero_fill(&v.parameters);
        if !redo
            && !self
                .kernel
                .blank_image(&image, holes_prove_blank, v.written)
                .map_err(probe_failed(&image))?
        {
            return Ok((v, false));
        }
        // Checked again here, not only at CreateVolume: a record made by a
        // version that passed mkfsOptions through unchecked is refused
        // before anything runs (the caller lets go of the fence).
        let words: Vec<String> = if fs == FsType::Ext4 && v.thick {
            // A thick image's inode tables are zeroed by mkfs, which keeps
            // the preallocation (FALLOC_FL_ZERO_RANGE). Left to the
            // kernel's ext4lazyinit thread after the first mount, they
            // would be zeroed through the loop device, which punches holes
            // and gives 16 MiB of every 256 MiB back to the pool. The
            // volume's own options come after, and win.
            ["-E", "lazy_itable_init=0"]
                .iter()
                .map(|&w| w.to_owned())
                .chain(v.mkfs_options.iter().cloned())
                .collect()
        } else {
            v.mkfs_options.clone()
        };
        let options =
            mkfs_options::validate(fs, &words).map_err(|source| NodeError::MkfsOptionsRefused {
                id: id.to_owned(),
                source,
            })?;
        // One already attached (a crash between attach and format) is
        // mounted nowhere: detach it first.
        if let Some(bound) = self
            .bound(&image)
            .map_err(sys("find loop device of", &image))?
        {
            if !bound.detaching {
                self.kernel
                    .detach(bound.device)
                    .map_err(sys("detach", bound.device.path()))?;
            }
        }
        // No device of the image anywhere (another host's holds its lock):
        // the image is replaced below, and a device elsewhere would go on
        // writing the old one. Held until the new image is in place.
        let _image = match pool.lock_image(id, LockKind::Exclusive)? {
            crate::pool::ImageLock::Busy => {
                return Err(NodeError::ImageFenced {
                    id: id.to_owned(),
                    image,
                })
            }
            held => held,
        };
        if v.thick {
            // The image itself: a second preallocated copy would need twice
            // the volume's size of the pool.
            let v = self.format_in_place(pool, &v, &options, &lock, redo)?;
            return Ok((v, true));
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
        Ok((pool.mark_written(id, &lock)?, true))
    }

    /// Makes the filesystem of a blank thin image without ever writing to
    /// the image itself (a thick one is formatted in place, see
    /// `super::in_place`): a new file beside it, a copy of the volume's template
    /// (see `super::template`) or one mkfs formats, replaces the image by
    /// one rename once it is complete and synced. A crash before that
    /// leaves the blank image and a scratch file (removed on the next try),
    /// never a half-made filesystem that the probe would then refuse to
    /// touch. The caller holds the volume's fence and lock.
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
        // Left by a stage that crashed before its rename.
        crate::sys::fs::remove_if_present(&scratch).map_err(sys("remove", &scratch))?;
        let mut undo = Rollback::new();
        undo.push(format!("remove {}", scratch.display()), || {
            crate::sys::fs::remove_if_present(&scratch)
        });
        let result = (|| {
            let copied = match Recipe::of(pool, v, options.fs()) {
                Some(recipe) => self.copy_template(pool, &recipe, &scratch)?,
                None => None,
            };
            let file = match copied {
                Some(file) => file,
                None => self.mkfs_scratch(v, &scratch, options)?,
            };
            file.sync_all().map_err(sys("sync", &scratch))?;
            crate::faults::crash_point("stage.formatted");
            std::fs::rename(&scratch, &image).map_err(sys("replace", &image))?;
            crate::sys::fs::fsync_dir(dir).map_err(sys("sync", dir))
        })();
        undo.finish(result)
    }

    /// Makes the new file `scratch` and runs mkfs on it (see
    /// [`Self::format_image`]).
    fn mkfs_scratch(
        &self,
        v: &VolumeMeta,
        scratch: &Path,
        options: &mkfs_options::Validated<'_>,
    ) -> Result<std::fs::File, NodeError> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(scratch)
            .map_err(sys("create", scratch))?;
        file.set_len(v.capacity_bytes)
            .map_err(sys("size", scratch))?;
        self.kernel.mkfs(scratch, options, false)?;
        Ok(file)
    }

    /// NodeUnstageVolume: unmounts, detaches the loop device, drops the
    /// fence. Idempotent. Refused while the volume is still mounted
    /// elsewhere under this node's kubelet directory (a publish not yet
    /// unpublished); the fence is kept until the loop device is really gone.
    pub fn unstage(&self, pool: &Pool, id: &str, staging: &Path) -> Result<(), NodeError> {
        // A trim holds the filesystem open: the unmount waits for it.
        let _changing = self.gate.change(id);
        let image = pool.image_path(id);
        let bound = self
            .bound(&image)
            .map_err(sys("find loop device of", &image))?;
        let mounts = self
            .mounts(pool)
            .of_volume(id, bound.map(|b| b.device))
            .map_err(sys("read", "/proc/self/mountinfo"))?;
        if let Some(at) = mounts.iter().find(|p| !p.starts_with(staging)) {
            return Err(NodeError::StillPublished {
                id: id.to_owned(),
                at: at.clone(),
            });
        }
        // Only what is provably this volume's is unmounted.
        let not_this = |path: &Path| NodeError::NotThisVolume {
            id: id.to_owned(),
            path: path.to_owned(),
            what: "a mount of something else".into(),
        };
        let staged = matches!(
            self.mount_state(staging)?,
            MountState::Mounted | MountState::Broken
        );
        if staged {
            if !mounts.iter().any(|p| p == staging) {
                return Err(not_this(staging));
            }
            // A filesystem or directory stage: everything below the staging
            // path is the pod's (a `device` there is just its file).
            self.kernel
                .unmount(staging)
                .map_err(sys("unmount", staging))?;
        } else {
            // A block stage: the staging directory is kubelet's, and the
            // device node is bound onto its `device` file.
            let device_file = staging.join(BLOCK_DEVICE_FILE);
            if matches!(
                self.mount_state(&device_file)?,
                MountState::Mounted | MountState::Broken
            ) {
                if !mounts.contains(&device_file) {
                    return Err(not_this(&device_file));
                }
                self.kernel
                    .unmount(&device_file)
                    .map_err(sys("unmount", &device_file))?;
            }
            crate::sys::fs::remove_if_present(&device_file).map_err(sys("remove", &device_file))?;
        }
        if let Some(bound) = bound {
            let dev = bound.device;
            if self
                .loop_mounted(dev)
                .map_err(sys("read", "/proc/self/mountinfo"))?
            {
                // Another node plugin on this host (its own kubelet
                // directory, a shared read-only stage) still has it mounted:
                // the device stays for it; this plugin's stage is over.
                log::info!(
                    "volume {id}: {} is still mounted outside this node's kubelet directory; it stays attached",
                    dev.path().display()
                );
            } else {
                if !bound.detaching {
                    self.kernel.detach(dev).map_err(sys("detach", dev.path()))?;
                }
                if !self
                    .detached(&image)
                    .map_err(sys("find loop device of", &image))?
                {
                    return Err(NodeError::DetachPending {
                        device: dev.path(),
                        image,
                    });
                }
            }
        }
        self.release_dir_fence(pool, id)?;
        self.fences.release(id);
        self.custody.forget(id);
        Ok(())
    }

    /// Detaches the fence device of a directory volume's stage (see
    /// [`Node::hold_dir_fence`]), if this plugin has one.
    fn release_dir_fence(&self, pool: &Pool, id: &str) -> Result<(), NodeError> {
        let fence = pool.fence_path(id);
        let Some(bound) = self
            .bound(&fence)
            .map_err(sys("find loop device of", &fence))?
        else {
            return Ok(());
        };
        if !bound.detaching {
            self.kernel
                .detach(bound.device)
                .map_err(sys("detach", bound.device.path()))?;
        }
        if !self
            .detached(&fence)
            .map_err(sys("find loop device of", &fence))?
        {
            return Err(NodeError::DetachPending {
                device: bound.device.path(),
                image: fence,
            });
        }
        Ok(())
    }

    /// Waits (up to about two seconds) until no loop device is bound to
    /// `image` any more, detaching or not: the kernel lets go of a detached
    /// device at its last close, which a moment's opener (a probe, udev)
    /// can delay.
    fn detached(&self, image: &Path) -> std::io::Result<bool> {
        for wait in [0, 10, 20, 50, 100, 200, 400, 600, 600] {
            std::thread::sleep(std::time::Duration::from_millis(wait));
            if self.bound(image)?.is_none() {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

impl Node {
    /// Waits as [`Node::detached`] does until `dev` no longer serves the
    /// image `key`.
    pub(super) fn detached_device(
        &self,
        dev: LoopDevice,
        key: (u64, u64),
    ) -> std::io::Result<bool> {
        for wait in [0, 10, 20, 50, 100, 200, 400, 600, 600] {
            std::thread::sleep(std::time::Duration::from_millis(wait));
            match self.kernel.loop_status(dev)? {
                Some(status) if status.backing == key => {}
                _ => return Ok(true),
            }
        }
        Ok(false)
    }
}
