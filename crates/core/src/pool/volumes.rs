//! Volumes: create (new, clone, restore), delete, expand, modify, read.
//!
//! Every call reads the volume's record from the pool, and every change of
//! an existing volume happens under its object lock, so controller replicas
//! and node plugins never act on a stale view of one another's work.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::error::io_error;
use super::store::{self, Fence, Kind, ObjectLock};
use super::subvolumes;
use super::{
    align_up, copy, now_ms, page, remove_built, source_missing, CapacityRange, Page, Pool,
    PoolError, VolumeEntry, VolumeSpec, ALIGN, DEFAULT_CAPACITY,
};
use crate::faults::crash_point;
use crate::health::{Finding, Health, Reason};
use crate::sys::fs as sysfs;
use crate::sys::lock::LockKind;
use crate::volume::meta::{AccessType, CopyMethod, Layout, Source, VolumeMeta, FORMAT};
use crate::volume::{ids, parameters};

/// An image's lock (see [`Pool::lock_image`]).
#[derive(Debug)]
pub enum ImageLock {
    /// Held, for as long as this file lives.
    Held(std::fs::File),
    /// The volume has no image (a directory volume, or one not made yet).
    NoImage,
    /// A loop device of the image, on any host sharing the pool, or
    /// another holder has it.
    Busy,
}

impl Pool {
    /// The volume `id`, as the pool holds it now.
    pub fn volume(&self, id: &str) -> Result<VolumeMeta, PoolError> {
        self.store.read(id)
    }

    /// Takes the volume's object lock (see [`store`]).
    pub fn lock_volume(&self, id: &str) -> Result<ObjectLock, PoolError> {
        self.store.lock(Kind::Volume, id)
    }

    /// Replaces the volume's record; the caller holds its lock.
    pub fn update_volume(&self, v: &VolumeMeta, held: &ObjectLock) -> Result<(), PoolError> {
        self.store.replace(&v.id, v, held)
    }

    /// Takes the volume's fence (see [`store`]): `Ok(None)` when another
    /// holder's fence conflicts.
    pub fn fence_volume(&self, id: &str, kind: LockKind) -> Result<Option<Fence>, PoolError> {
        self.store.fence(id, kind)
    }

    /// Takes the volume's fence as an operation on its data needs it (a
    /// delete, a byte copy): the pool fence that node plugins hold while a
    /// stage of theirs lasts, and the image's lock, which every loop device
    /// of the image holds for as long as the device exists, on any host
    /// sharing the pool, whether or not the node plugin that attached it
    /// still lives (`sys::loopdev::attach`). `Ok(None)` when either is held
    /// in a way that conflicts with `kind`.
    pub(super) fn fence_in_use(
        &self,
        id: &str,
        kind: LockKind,
    ) -> Result<Option<Fence>, PoolError> {
        let Some(fence) = self.store.fence(id, kind)? else {
            return Ok(None);
        };
        match self.lock_image(id, kind)? {
            ImageLock::Held(file) => Ok(Some(fence.with_image(file))),
            ImageLock::NoImage => Ok(Some(fence)),
            ImageLock::Busy => Ok(None),
        }
    }

    /// Takes the lock every loop device of the image holds (see
    /// `Pool::fence_in_use`), of `kind`, for as long as the file returned
    /// lives.
    pub fn lock_image(&self, id: &str, kind: LockKind) -> Result<ImageLock, PoolError> {
        let image = self.image_path(id);
        let file = match std::fs::OpenOptions::new()
            .read(true)
            .write(kind == LockKind::Exclusive)
            .custom_flags(libc::O_CLOEXEC)
            .open(&image)
        {
            Ok(file) => file,
            // A directory volume, or an image not made yet.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(ImageLock::NoImage),
            Err(e) => return Err(io_error("open", &image)(e)),
        };
        if crate::sys::lock::try_lock_patiently(&file, kind).map_err(io_error("lock", &image))? {
            Ok(ImageLock::Held(file))
        } else {
            Ok(ImageLock::Busy)
        }
    }

    /// What of volume `id` this host still has: a loop device of its image
    /// or a mount of its data directory, described; `None` when neither. A
    /// device's lock already keeps a delete away from it on any host; this
    /// also catches one attached by an older filevol (no lock) and a
    /// directory bound by a node plugin that died (its fence went with it).
    fn held_on_this_host(&self, id: &str) -> Result<Option<String>, PoolError> {
        let image = self.image_path(id);
        match crate::sys::loopdev::find_bound(&image) {
            Ok(Some(dev)) => {
                return Ok(Some(format!(
                    "its image is attached to {} on this host",
                    dev.path().display()
                )))
            }
            Ok(None) => {}
            // A controller without access to the host's loop devices (an
            // unprivileged process) cannot look; the image's lock, which
            // every device of it holds, still refused the delete if one
            // exists. Any other error is not "no device".
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                log::debug!(
                    "volume {id}: this process cannot read the host's loop devices ({e}); the image's lock decides alone"
                );
            }
            Err(e) => return Err(io_error("find the loop devices of", &image)(e)),
        }
        let data = self.data_path(id);
        let table = crate::sys::mountinfo::read()
            .map_err(io_error("read", Path::new("/proc/self/mountinfo")))?;
        Ok(crate::sys::mountinfo::binds_of(&table, &data)
            .first()
            .map(|at| format!("its directory is mounted at {} on this host", at.display())))
    }

    /// What is wrong with the volume's data in the pool ([`Reason::DataMissing`],
    /// [`Reason::DataUnreadable`]): a `stat` of its image or directory.
    /// Healthy when it is there, of its kind and size.
    pub fn volume_health(&self, v: &VolumeMeta) -> Health {
        let mut h = Health::ok();
        let (path, what) = match v.layout {
            Layout::Image => (self.image_path(&v.id), "image"),
            Layout::Dir => (self.data_path(&v.id), "directory"),
        };
        let finding = match sysfs::metadata_if_present(&path) {
            Err(e) => Some(Finding::new(
                Reason::DataUnreadable,
                format!(
                    "{what} {} cannot be read: {e}. The pool answers with an error: check the pool's filesystem or share (dmesg, its server)",
                    path.display()
                ),
            )),
            Ok(None) => Some(Finding::new(
                Reason::DataMissing,
                format!(
                    "{what} {} is gone from the pool: the volume's data is lost unless it is restored there from a backup or snapshot. Pods using it see I/O errors; delete the PersistentVolume once nothing needs it",
                    path.display()
                ),
            )),
            Ok(Some(m)) if v.layout == Layout::Image && !m.is_file() => Some(Finding::new(
                Reason::DataUnreadable,
                format!("image {} is not a file: something other than filevol replaced it; restore it or delete the volume", path.display()),
            )),
            Ok(Some(m)) if v.layout == Layout::Dir && !m.is_dir() => Some(Finding::new(
                Reason::DataUnreadable,
                format!("{} is not a directory: something other than filevol replaced it; restore it or delete the volume", path.display()),
            )),
            Ok(Some(m)) if v.layout == Layout::Image && m.len() < v.capacity_bytes => {
                Some(Finding::new(
                    Reason::DataUnreadable,
                    format!(
                        "image {} is {} bytes, the volume is {}: it was truncated outside filevol; expand the volume again or restore the image",
                        path.display(),
                        m.len(),
                        v.capacity_bytes
                    ),
                ))
            }
            Ok(Some(_)) => None,
        };
        if let Some(f) = finding {
            h.add(f);
        }
        h
    }

    /// Volumes in id order from `start` (inclusive), at most `max` (0: all),
    /// and the id to continue from. Reads the pool's directory on every
    /// call; records come from the validated cache.
    pub fn list_volumes(
        &self,
        start: Option<&str>,
        max: usize,
    ) -> Result<Page<VolumeEntry>, PoolError> {
        let ids = self.store.ids(Kind::Volume)?;
        Ok(page(&ids, start, max, |id| {
            self.store.load::<VolumeMeta>(id)
        }))
    }

    /// Every volume record (for capacity, attach limits, reports).
    pub fn all_volumes(&self) -> Result<Vec<(String, VolumeEntry)>, PoolError> {
        self.store.load_all::<VolumeMeta>()
    }

    /// Creates the volume `spec` asks for, or returns the one a previous
    /// identical request made, by this process or any other.
    pub fn create_volume(&self, spec: &VolumeSpec) -> Result<VolumeMeta, PoolError> {
        let id = ids::derive(ids::Kind::Volume, &spec.name);
        let capacity = self.size_for(spec)?;
        self.check_source_shape(spec)?;
        match self.volume(&id) {
            Ok(existing) => return check_compatible(existing, spec),
            Err(PoolError::NotFound { .. }) => {}
            Err(e) => return Err(e),
        }

        let promise = self.promise(capacity)?;
        // Between the promise and the writes: where a pod filling its thin
        // volume can still take the space a preallocation or copy needs.
        crash_point("create.promised");
        let built = self.scratch.new_path("volume");
        std::fs::create_dir(&built).map_err(io_error("create", &built))?;
        let meta = match self.build_volume(&built, &id, spec, capacity) {
            Ok(meta) => meta,
            Err(e) => {
                remove_built(&built);
                return Err(e);
            }
        };
        crash_point("create.built");
        match self.commit(&built, &self.volume_dir(&id)) {
            Ok(true) => {}
            Ok(false) => {
                // Another instance committed this name first: answer as a
                // retry would.
                remove_built(&built);
                drop(promise);
                return check_compatible(self.volume(&id)?, spec);
            }
            Err(e) => {
                remove_built(&built);
                return Err(e);
            }
        }
        crash_point("create.committed");
        drop(promise);
        Ok(meta)
    }

    /// The size a new volume gets: the capacity range rounded up to
    /// [`ALIGN`], at least what the filesystem and the content source need.
    fn size_for(&self, spec: &VolumeSpec) -> Result<u64, PoolError> {
        let CapacityRange { required, limit } = spec.capacity;
        if limit != 0 && required > limit {
            return Err(PoolError::OutOfRange(format!(
                "required {required} bytes exceeds the limit of {limit}"
            )));
        }
        let mut size = if required == 0 {
            if limit != 0 {
                limit.min(DEFAULT_CAPACITY)
            } else {
                DEFAULT_CAPACITY
            }
        } else {
            required
        };
        let min_for_fs = match (spec.layout, spec.access, spec.fs_type) {
            (Layout::Image, AccessType::Mount, Some(fs)) => fs.min_bytes(),
            _ => ALIGN,
        };
        let source_size = match &spec.source {
            None => 0,
            Some(Source::Snapshot(id)) => self.snapshot(id).map_err(source_missing)?.size_bytes,
            Some(Source::Volume(id)) => self.volume(id).map_err(source_missing)?.capacity_bytes,
        };
        size = align_up(size.max(min_for_fs).max(source_size));
        if limit != 0 && size > limit {
            let why = if source_size > required.max(limit) {
                format!("the source is {source_size} bytes, more than the limit of {limit}")
            } else {
                format!("rounded to {size} bytes (whole MiB, at least {min_for_fs} for this filesystem), more than the limit of {limit}")
            };
            return Err(PoolError::OutOfRange(why));
        }
        Ok(size)
    }

    /// A clone or restore must have its source's layout, access type and
    /// filesystem: the node never formats over existing data, so a mismatch
    /// would only fail later, at stage.
    fn check_source_shape(&self, spec: &VolumeSpec) -> Result<(), PoolError> {
        let (kind, id, shape) = match &spec.source {
            None => return Ok(()),
            Some(Source::Snapshot(id)) => {
                let s = self.snapshot(id).map_err(source_missing)?;
                ("snapshot", id, (s.layout, s.access, s.fs_type))
            }
            Some(Source::Volume(id)) => {
                let v = self.volume(id).map_err(source_missing)?;
                ("volume", id, (v.layout, v.access, v.fs_type))
            }
        };
        if shape != (spec.layout, spec.access, spec.fs_type) {
            return Err(PoolError::Unsupported(format!(
                "source {kind} {id} is {:?}/{:?}/{:?} (layout/access/filesystem); the new volume asks for {:?}/{:?}/{:?}",
                shape.0, shape.1, shape.2, spec.layout, spec.access, spec.fs_type
            )));
        }
        Ok(())
    }

    /// Whether the new image gets zeros written into its holes
    /// (`zeroFill`, see [`sysfs::zero_fill`]): a thick one whose class
    /// asks for it. It is done in the build, before the record is
    /// committed: no node can have the image attached, so no pod's write
    /// can land between the zeros, and a crash in the middle leaves a
    /// build the janitor removes, never a half-filled volume.
    fn zero_fills(&self, spec: &VolumeSpec) -> bool {
        spec.thick && parameters::zero_fill(&spec.parameters)
    }

    fn build_volume(
        &self,
        built: &Path,
        id: &str,
        spec: &VolumeSpec,
        capacity: u64,
    ) -> Result<VolumeMeta, PoolError> {
        // The source's lock, from the copy to reading its record (below): a
        // node formatting the source at its first stage holds it too, so the
        // copy and the `written` it records are of the same image.
        let _source = match &spec.source {
            Some(source) => self.lock_source(source)?,
            None => None,
        };
        let mut subvolume = false;
        match spec.layout {
            Layout::Image => {
                let image = built.join("image");
                match &spec.source {
                    None => {
                        let f = OpenOptions::new()
                            .write(true)
                            .create_new(true)
                            .mode(0o600)
                            .open(&image)
                            .map_err(io_error("create image", &image))?;
                        f.set_len(capacity)
                            .map_err(io_error("size image", &image))?;
                        // A fresh sparse image has no data to sync; its size
                        // is metadata, made durable by the commit.
                        if spec.thick {
                            sysfs::preallocate(&f, capacity)
                                .map_err(io_error("preallocate image", &image))?;
                            f.sync_all().map_err(io_error("sync image", &image))?;
                        }
                        // New, so all of it, whether or not the pool
                        // filesystem can tell holes from data.
                        if self.zero_fills(spec) {
                            sysfs::write_zeros(&f, 0, capacity)
                                .map_err(io_error("zero-fill image", &image))?;
                        }
                    }
                    Some(source) => {
                        let from = self.source_image(source);
                        let check = || self.check_copyable(source);
                        let method = copy::copy_image(
                            &from,
                            &image,
                            capacity,
                            copy::Fallback::Sparse(&check),
                        )?;
                        crash_point("create.copied");
                        if spec.thick {
                            let f = OpenOptions::new()
                                .read(true)
                                .write(true)
                                .open(&image)
                                .map_err(io_error("open image", &image))?;
                            // A thick restore or clone owns its blocks: a
                            // reflink's are shared with the source, and the
                            // first write to one could fail for space. A
                            // byte copy owns what it wrote already.
                            if method == CopyMethod::Reflink {
                                sysfs::own_blocks(&f, capacity)
                                    .map_err(io_error("take the image's blocks", &image))?;
                            } else {
                                sysfs::preallocate(&f, capacity)
                                    .map_err(io_error("preallocate image", &image))?;
                            }
                            f.sync_all().map_err(io_error("sync image", &image))?;
                            // The copy's holes only: its data stays.
                            if self.zero_fills(spec) {
                                sysfs::zero_fill(&f, capacity)
                                    .map_err(io_error("zero-fill image", &image))?;
                            }
                        }
                    }
                }
            }
            Layout::Dir => {
                let data = built.join("data");
                match &spec.source {
                    None => {
                        subvolume = subvolumes::create(built, capacity)?;
                        if !subvolume {
                            std::fs::create_dir(&data)
                                .map_err(io_error("create directory", &data))?;
                        }
                        // Any pod user may write a shared directory; kubelet
                        // applies fsGroup on top where one is set.
                        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o777))
                            .map_err(io_error("chmod", &data))?;
                    }
                    // A subvolume's copy is a writable snapshot, taken at
                    // one instant even while pods write the source.
                    Some(source) if self.source_is_subvolume(source)? => {
                        subvolumes::snapshot(
                            &self.source_data(source),
                            built,
                            false,
                            Some(capacity),
                        )?;
                        subvolume = true;
                    }
                    Some(source) => {
                        let _quiet = self.check_dir_copyable(source)?;
                        copy::copy_tree(&self.source_data(source), &data)?
                    }
                }
            }
        }
        // Read under the source's lock, after the copy: `written` only goes
        // from false to true, set before anything is written through a node.
        // A clone of a volume whose format in place was cut short holds
        // that half-made filesystem: formatted again, as its source will be.
        let (written, formatting) = match &spec.source {
            None => (Some(false), false),
            Some(Source::Volume(src)) => {
                let v = self.volume(src).map_err(source_missing)?;
                (v.written, v.formatting)
            }
            Some(Source::Snapshot(src)) => {
                (self.snapshot(src).map_err(source_missing)?.written, false)
            }
        };
        let meta = VolumeMeta {
            format: FORMAT,
            id: id.to_owned(),
            name: spec.name.clone(),
            layout: spec.layout,
            capacity_bytes: capacity,
            access: spec.access,
            fs_type: spec.fs_type,
            thick: spec.thick,
            mkfs_options: spec.mkfs_options.clone(),
            parameters: spec.parameters.clone(),
            mutable_parameters: spec.mutable_parameters.clone(),
            source: spec.source.clone(),
            topology: self.opts.topology.clone(),
            created_unix_ms: now_ms(),
            legacy_attachments: Vec::new(),
            written,
            settled: false,
            formatting,
            subvolume,
        };
        store::write_new(&built.join(store::META), &meta)?;
        Ok(meta)
    }

    /// The lock of a source volume (snapshots never change: none).
    fn lock_source(&self, source: &Source) -> Result<Option<ObjectLock>, PoolError> {
        match source {
            Source::Volume(id) => self.lock_volume(id).map(Some).map_err(source_missing),
            Source::Snapshot(_) => Ok(None),
        }
    }

    /// Whether the source's data is a btrfs subvolume, as its record says.
    fn source_is_subvolume(&self, source: &Source) -> Result<bool, PoolError> {
        Ok(match source {
            Source::Volume(id) => self.volume(id).map_err(source_missing)?.subvolume,
            Source::Snapshot(id) => self.snapshot(id).map_err(source_missing)?.subvolume,
        })
    }

    pub(super) fn source_image(&self, source: &Source) -> PathBuf {
        match source {
            Source::Snapshot(id) => self.snapshot_dir(id).join("image"),
            Source::Volume(id) => self.image_path(id),
        }
    }

    pub(super) fn source_data(&self, source: &Source) -> PathBuf {
        match source {
            Source::Snapshot(id) => self.snapshot_dir(id).join("data"),
            Source::Volume(id) => self.data_path(id),
        }
    }

    /// Approves a byte copy of a source image. Snapshots are never in use.
    /// A volume is refused while it is attached for writing to any node (its
    /// attachment records: they say so even while the node plugin that
    /// staged it restarts and holds no fence) or while any node plugin, on
    /// any host, has it staged for writing (it holds the fence exclusively):
    /// a copy of an image being written is torn. The shared fence returned
    /// is held for the copy, so no node can stage the volume for writing
    /// meanwhile.
    pub(super) fn check_copyable(&self, source: &Source) -> Result<Option<Fence>, PoolError> {
        let Source::Volume(id) = source else {
            return Ok(None);
        };
        self.refuse_writable_attachments(
            id,
            "the pool filesystem cannot reflink: a byte copy of an image in use would be torn",
        )?;
        match self.fence_in_use(id, LockKind::Shared)? {
            Some(fence) => Ok(Some(fence)),
            None => Err(PoolError::InUse(format!(
                "volume {id} is staged on a node (its fence, or its image's lock held by a loop device, is held) and the pool filesystem cannot reflink: a byte copy of an image in use would be torn; unstage it first or use a pool filesystem with reflink (xfs, btrfs)"
            ))),
        }
    }

    /// Approves a copy of a source `dir` volume that is a plain directory
    /// (a subvolume's copy is a btrfs snapshot, atomic, and needs no
    /// approval). A directory tree cannot be copied at one instant: files written during
    /// the walk would make a copy of no moment at all. So a volume is
    /// refused while it is attached for writing or staged on any node (its
    /// fence is held, even shared); the fence returned is held exclusively
    /// for the copy, so no node stages it meanwhile. Snapshots never change.
    pub(super) fn check_dir_copyable(&self, source: &Source) -> Result<Option<Fence>, PoolError> {
        let Source::Volume(id) = source else {
            return Ok(None);
        };
        let why = "a directory copied while pods may write it is not a point-in-time copy";
        self.refuse_writable_attachments(id, why)?;
        let fence = match self.store.fence(id, LockKind::Exclusive)? {
            Some(fence) => fence,
            None => {
                return Err(PoolError::InUse(format!(
                    "volume {id} is staged on a node: {why}; unstage it (stop its pods) first"
                )))
            }
        };
        // A bind whose node plugin died holds no fence (see
        // `held_on_this_host`).
        if let Some(what) = self.held_on_this_host(id)? {
            return Err(PoolError::InUse(format!(
                "volume {id} is in use ({what}): {why}; unstage it (stop its pods) first"
            )));
        }
        Ok(Some(fence))
    }

    fn refuse_writable_attachments(&self, id: &str, why: &str) -> Result<(), PoolError> {
        let v = self.volume(id)?;
        let writers: Vec<String> = self
            .attachments()?
            .of(&v)
            .into_iter()
            .filter(|a| !a.readonly && !a.mode.is_read_only())
            .map(|a| a.node_id)
            .collect();
        if writers.is_empty() {
            Ok(())
        } else {
            Err(PoolError::InUse(format!(
                "volume {id} is published for writing to node(s) {} and {why}; unpublish it first",
                writers.join(", ")
            )))
        }
    }

    /// Deletes the volume, whoever made it. Idempotent; refused while it is
    /// attached (ControllerPublish) or staged on any node (its fence is
    /// held). Only this explicit request deletes a volume whose record is
    /// damaged; no clean-up ever does.
    ///
    /// A successful delete leaves no attachment record of the id behind,
    /// not even one left by an earlier volume of the same id (removed by
    /// hand, or deleted by an older filevol that kept attachments in
    /// `meta.json`): the same name makes the same id again.
    pub fn delete_volume(&self, id: &str) -> Result<(), PoolError> {
        self.delete_volume_object(id)?;
        self.remove_stale_attachments(Some(id))
    }

    fn delete_volume_object(&self, id: &str) -> Result<(), PoolError> {
        let _lock = match self.lock_volume(id) {
            Ok(lock) => lock,
            Err(PoolError::NotFound { .. }) => return Ok(()),
            Err(e) => return Err(e),
        };
        let v = match self.volume(id) {
            Ok(v) => Some(v),
            Err(PoolError::NotFound { .. }) => return Ok(()),
            // The CO asks for this volume to go: a damaged record must not
            // make it undeletable. Its attachments cannot be read, but the
            // fence below still proves no node has it staged.
            Err(PoolError::Damaged { path, problem }) => {
                log::warn!(
                    "volume {id}: deleting despite its damaged record {} ({problem})",
                    path.display()
                );
                None
            }
            Err(e) => return Err(e),
        };
        let attached = match &v {
            Some(v) => self.attachments()?.of(v),
            None => Vec::new(),
        };
        if !attached.is_empty() {
            return Err(PoolError::InUse(format!(
                "volume {id} is still published to node(s) {}",
                attached
                    .iter()
                    .map(|a| a.node_id.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        // A node plugin holds the fence while the volume is staged, whether
        // or not ControllerPublish was used (ephemeral volumes, the
        // node-local layout): deleting it then would leave a loop device or
        // a bind mount on a deleted file or directory.
        //
        // A loop device of the image holds the image's lock for as long as
        // it exists, whether or not the node plugin that attached it lives
        // (killed, upgraded, its node cut off while its pods write on).
        let Some(_fence) = self.fence_in_use(id, LockKind::Exclusive)? else {
            return Err(PoolError::InUse(format!(
                "volume {id} is still staged on a node: its fence is held, by a node plugin or by a loop device of its image (on any host sharing the pool, even one whose node plugin died); unstage it first"
            )));
        };
        if let Some(what) = self.held_on_this_host(id)? {
            return Err(PoolError::InUse(format!(
                "volume {id} is still in use: {what}; unstage it first"
            )));
        }
        self.discard(&self.volume_dir(id))?;
        // The id may be made again with another size (see `capacity`).
        self.sizes_changed()
    }

    /// Grows the volume to the capacity range (never shrinks).
    pub fn expand_volume(&self, id: &str, range: CapacityRange) -> Result<VolumeMeta, PoolError> {
        if range.limit != 0 && range.required > range.limit {
            return Err(PoolError::OutOfRange(format!(
                "required {} bytes exceeds the limit of {}",
                range.required, range.limit
            )));
        }
        let lock = self.lock_volume(id)?;
        let mut v = self.volume(id)?;
        let target = align_up(range.required);
        if target <= v.capacity_bytes {
            // A retry after a crash between the record and the notice below
            // (the CO retries until it is answered): tell the others now.
            self.sizes_changed()?;
            return Ok(v);
        }
        // A volume made before its filesystem's minimum was raised (btrfs:
        // 114 MiB, now 256) grows at least to that minimum, the smallest
        // size the node can resize it to.
        let target = match (v.layout, v.access, v.fs_type) {
            (Layout::Image, AccessType::Mount, Some(fs)) => target.max(fs.min_bytes()),
            _ => target,
        };
        if range.limit != 0 && target > range.limit {
            return Err(PoolError::OutOfRange(format!(
                "rounded to {target} bytes (whole MiB, at least the filesystem's minimum), more than the limit of {}",
                range.limit
            )));
        }
        let _promise = self.promise(target - v.capacity_bytes)?;
        if v.layout == Layout::Image {
            let image = self.image_path(id);
            let f = OpenOptions::new()
                .write(true)
                .open(&image)
                .map_err(io_error("open image", &image))?;
            if f.metadata().map_err(io_error("stat image", &image))?.len() < target {
                f.set_len(target).map_err(io_error("grow image", &image))?;
            }
            crash_point("expand.grown");
            if v.thick {
                sysfs::preallocate(&f, target).map_err(io_error("preallocate image", &image))?;
            }
            f.sync_all().map_err(io_error("sync image", &image))?;
        }
        if v.subvolume {
            // The new size holds from here: no node has anything to grow.
            subvolumes::set_limit(&self.data_path(id), target)?;
        }
        v.capacity_bytes = target;
        self.update_volume(&v, &lock)?;
        self.sizes_changed()?;
        Ok(v)
    }

    /// Applies mutable parameters: `thick=true` unshares (where the kernel
    /// can) and preallocates the image.
    pub fn modify_volume(
        &self,
        id: &str,
        params: &BTreeMap<String, String>,
    ) -> Result<VolumeMeta, PoolError> {
        let thick = parameters::mutable(params)
            .map_err(|e| PoolError::Unsupported(e.reason))?
            .thick;
        let lock = self.lock_volume(id)?;
        let mut v = self.volume(id)?;
        if let Some(thick) = thick {
            if thick && !v.thick && v.layout == Layout::Image {
                let image = self.image_path(id);
                let f = OpenOptions::new()
                    .write(true)
                    .open(&image)
                    .map_err(io_error("open image", &image))?;
                // The volume may be in use: only the kernel's unshare is
                // safe beside its writers. Where the filesystem has none
                // (btrfs), blocks a clone shares stay shared.
                sysfs::unshare(&f, v.capacity_bytes).map_err(io_error("unshare image", &image))?;
                sysfs::preallocate(&f, v.capacity_bytes)
                    .map_err(io_error("preallocate image", &image))?;
                f.sync_all().map_err(io_error("sync image", &image))?;
            }
            v.thick = thick;
        }
        v.mutable_parameters
            .extend(params.iter().map(|(k, val)| (k.clone(), val.clone())));
        self.update_volume(&v, &lock)?;
        Ok(v)
    }

    /// Records that the volume's image now holds (or may hold) data: a node
    /// formatted it, or is about to hand it out as a raw block device. The
    /// caller holds the volume's lock. Never goes back to false.
    /// A format in place that was under way ([`VolumeMeta::formatting`])
    /// is over with the same write.
    pub fn mark_written(&self, id: &str, held: &ObjectLock) -> Result<VolumeMeta, PoolError> {
        let mut v = self.volume(id)?;
        if v.written != Some(true) || v.formatting {
            v.written = Some(true);
            v.formatting = false;
            self.update_volume(&v, held)?;
        }
        Ok(v)
    }

    /// Records, durably, that a node is about to format the volume's image
    /// in place ([`VolumeMeta::formatting`]). The caller holds its lock.
    pub fn mark_formatting(&self, id: &str, held: &ObjectLock) -> Result<VolumeMeta, PoolError> {
        let mut v = self.volume(id)?;
        if !v.formatting {
            v.formatting = true;
            self.update_volume(&v, held)?;
        }
        Ok(v)
    }

    /// Records that the journal the volume's copied filesystem carried has
    /// been replayed (see [`VolumeMeta::settled`]). The caller holds the
    /// volume's lock, and its fence exclusively. Never goes back to false.
    pub fn mark_settled(&self, id: &str, held: &ObjectLock) -> Result<VolumeMeta, PoolError> {
        let mut v = self.volume(id)?;
        if !v.settled {
            v.settled = true;
            self.update_volume(&v, held)?;
        }
        Ok(v)
    }
}

fn check_compatible(existing: VolumeMeta, spec: &VolumeSpec) -> Result<VolumeMeta, PoolError> {
    let CapacityRange { required, limit } = spec.capacity;
    let what = if existing.layout != spec.layout {
        Some("layout")
    } else if existing.access != spec.access {
        Some("access type")
    } else if existing.fs_type != spec.fs_type {
        Some("filesystem")
    } else if existing.capacity_bytes < required || (limit != 0 && existing.capacity_bytes > limit)
    {
        Some("capacity")
    } else if existing.parameters != spec.parameters {
        Some("parameter set")
    } else if existing.source != spec.source {
        Some("content source")
    } else if existing.mutable_parameters != spec.mutable_parameters {
        Some("mutable parameter set")
    } else {
        None
    };
    match what {
        None => Ok(existing),
        Some(what) => Err(PoolError::Incompatible {
            kind: "volume",
            name: spec.name.clone(),
            id: existing.id,
            what: what.into(),
        }),
    }
}
