//! The pool: a directory that holds every volume, snapshot and record the
//! controller knows, so it can be inspected, backed up, moved, and shared by
//! several nodes.
//!
//! ```text
//! <pool>/volumes/<id>/meta.json   VolumeMeta
//! <pool>/volumes/<id>/image       image layout: the sparse image
//! <pool>/volumes/<id>/data/       dir layout: the directory
//! <pool>/snapshots/<id>/...       the same, for snapshots
//! <pool>/groups/<id>.json         group snapshots
//! <pool>/nodes/<node>.json        node plugins serving this pool
//! <pool>/.scratch/<instance>/     work in progress of one running process
//! ```
//!
//! Crash safety comes from one rule: an object is built whole in the
//! process's scratch directory and enters `volumes/` or `snapshots/` by a
//! single rename (then the parent directory is fsynced); it leaves the same
//! way, renamed into scratch before it is removed. A crash at any point
//! leaves each object whole or absent, plus scratch debris that the next
//! start removes. Metadata updates replace `meta.json` atomically.
//!
//! The pool is the truth; the in-memory index is rebuilt from it at start
//! (and by a second controller taking over the same pool) and kept in step
//! with every change, so listing 10,000 volumes reads no file.

pub mod copy;
pub mod error;
pub mod ids;
pub mod meta;
mod scratch;

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use parking_lot::{Mutex, RwLock};

use error::io_error;
pub use error::PoolError;
use meta::{
    AccessMode, AccessType, Attachment, CopyMethod, FsType, GroupMeta, Layout, NodeRecord,
    SnapshotMeta, Source, VolumeMeta, FORMAT,
};
use scratch::Scratch;

use crate::faults::crash_point;
use crate::sys::fs as sysfs;

/// Sizes are rounded up to whole MiB: a block multiple for every filesystem
/// and sector size, and aligned for direct I/O through the loop device.
pub const ALIGN: u64 = 1 << 20;

/// Size of a volume created without a capacity range.
pub const DEFAULT_CAPACITY: u64 = 1 << 30;

/// Settings of a pool.
#[derive(Debug, Clone)]
pub struct PoolOptions {
    /// Bytes of the pool filesystem never promised to volumes.
    pub reserve_bytes: u64,
    /// How many times the usable size the pool may promise to thin volumes
    /// (1.0: never more than it can write).
    pub overcommit: f64,
    /// The topology segment volumes of this pool are reachable from (empty:
    /// everywhere, for a shared pool).
    pub topology: BTreeMap<String, String>,
}

/// A capacity range in bytes; 0 means unset.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CapacityRange {
    /// At least this many bytes.
    pub required: u64,
    /// At most this many bytes.
    pub limit: u64,
}

/// What CreateVolume asks for, validated.
#[derive(Debug, Clone)]
pub struct VolumeSpec {
    /// The CreateVolume name.
    pub name: String,
    /// Image or directory.
    pub layout: Layout,
    /// Size asked for.
    pub capacity: CapacityRange,
    /// Mount or block.
    pub access: AccessType,
    /// Filesystem, for mount volumes on images.
    pub fs_type: Option<FsType>,
    /// Preallocate the image.
    pub thick: bool,
    /// Extra mkfs arguments.
    pub mkfs_options: Vec<String>,
    /// StorageClass parameters.
    pub parameters: BTreeMap<String, String>,
    /// Mutable parameters.
    pub mutable_parameters: BTreeMap<String, String>,
    /// Content source.
    pub source: Option<Source>,
    /// Access modes asked for.
    pub modes: Vec<AccessMode>,
}

/// A volume as the index knows it: its metadata, or why it cannot be read.
pub type VolumeEntry = Result<VolumeMeta, String>;

#[derive(Debug, Default)]
struct Index {
    volumes: BTreeMap<String, VolumeEntry>,
    snapshots: BTreeMap<String, SnapshotMeta>,
    groups: BTreeMap<String, GroupMeta>,
}

/// An open pool.
#[derive(Debug)]
pub struct Pool {
    root: PathBuf,
    opts: PoolOptions,
    index: RwLock<Index>,
    scratch: Scratch,
    /// Bytes promised to creations in progress, so two concurrent creates
    /// cannot both take the last free space.
    in_flight: Mutex<u64>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn now_ts() -> (i64, i32) {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    (d.as_secs() as i64, d.subsec_nanos() as i32)
}

fn align_up(bytes: u64) -> u64 {
    bytes.div_ceil(ALIGN).saturating_mul(ALIGN)
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, PoolError> {
    let bytes = std::fs::read(path).map_err(io_error("read", path))?;
    serde_json::from_slice(&bytes).map_err(|e| PoolError::Damaged {
        path: path.to_owned(),
        problem: e.to_string(),
    })
}

/// Writes metadata into a new file of an object being built in scratch:
/// no temporary file needed, nothing can see it before the commit.
fn write_new_json<T: serde::Serialize>(path: &Path, value: &T) -> Result<(), PoolError> {
    use std::io::Write;
    let bytes = serde_json::to_vec_pretty(value).expect("metadata serialises");
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(io_error("create", path))?;
    f.write_all(&bytes).map_err(io_error("write", path))?;
    f.sync_all().map_err(io_error("sync", path))
}

/// Replaces the metadata of an object already in the pool, atomically.
fn write_json<T: serde::Serialize>(path: &Path, value: &T) -> Result<(), PoolError> {
    let bytes = serde_json::to_vec_pretty(value).expect("metadata serialises");
    sysfs::write_atomic(path, &bytes).map_err(io_error("write", path))
}

impl Pool {
    /// Opens the pool at `root`: creates its directories, removes what
    /// crashed processes left in scratch, and builds the index.
    pub fn open(root: &Path, opts: PoolOptions) -> Result<Pool, PoolError> {
        for dir in ["volumes", "snapshots", "groups", "nodes"] {
            let p = root.join(dir);
            std::fs::create_dir_all(&p).map_err(io_error("create", &p))?;
        }
        let scratch = Scratch::open(&root.join(".scratch"))?;
        let pool = Pool {
            root: root.to_owned(),
            opts,
            index: RwLock::new(Index::default()),
            scratch,
            in_flight: Mutex::new(0),
        };
        pool.load()?;
        Ok(pool)
    }

    /// The pool directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The topology segment of this pool's volumes.
    pub fn topology(&self) -> &BTreeMap<String, String> {
        &self.opts.topology
    }

    fn volume_dir(&self, id: &str) -> PathBuf {
        self.root.join("volumes").join(id)
    }

    fn snapshot_dir(&self, id: &str) -> PathBuf {
        self.root.join("snapshots").join(id)
    }

    fn group_file(&self, id: &str) -> PathBuf {
        self.root.join("groups").join(format!("{id}.json"))
    }

    /// The image file of an `image` volume.
    pub fn image_path(&self, id: &str) -> PathBuf {
        self.volume_dir(id).join("image")
    }

    /// The directory of a `dir` volume.
    pub fn data_path(&self, id: &str) -> PathBuf {
        self.volume_dir(id).join("data")
    }

    fn load(&self) -> Result<(), PoolError> {
        let mut index = Index::default();
        for (id, dir) in list_dir(&self.root.join("volumes"))? {
            let entry = read_json::<VolumeMeta>(&dir.join("meta.json")).map_err(|e| e.to_string());
            match &entry {
                Err(problem) => log::warn!("volume {id}: {problem}"),
                Ok(v) if v.layout == Layout::Image => self.repair_size(v),
                Ok(_) => {}
            }
            index.volumes.insert(id, entry);
        }
        for (id, _) in list_dir(&self.root.join("groups"))? {
            let Some(id) = id.strip_suffix(".json") else {
                continue;
            };
            let path = self.group_file(id);
            match read_json::<GroupMeta>(&path) {
                Ok(g) => {
                    index.groups.insert(id.to_owned(), g);
                }
                Err(e) => log::warn!("group snapshot {id}: {e}"),
            }
        }
        for (id, dir) in list_dir(&self.root.join("snapshots"))? {
            match read_json::<SnapshotMeta>(&dir.join("meta.json")) {
                // A member whose group record was never written belongs to
                // a group snapshot that crashed half-way: it was never
                // reported to anyone, so it goes.
                Ok(s)
                    if s.group_id
                        .as_ref()
                        .is_some_and(|g| !index.groups.contains_key(g)) =>
                {
                    log::warn!("removing snapshot {id} of an unfinished group snapshot");
                    self.discard(&dir)?;
                }
                Ok(s) => {
                    index.snapshots.insert(id, s);
                }
                Err(e) => log::warn!("snapshot {id}: {e}"),
            }
        }
        log::info!(
            "pool {}: {} volumes, {} snapshots, {} group snapshots",
            self.root.display(),
            index.volumes.len(),
            index.snapshots.len(),
            index.groups.len()
        );
        *self.index.write() = index;
        Ok(())
    }

    /// Extends an image that is shorter than its volume (a size change lost
    /// in a crash, or an expansion cut short): the tail is a hole, so no
    /// data changes. A missing image is left for the volume condition to
    /// report.
    fn repair_size(&self, v: &VolumeMeta) {
        let path = self.image_path(&v.id);
        let Ok(f) = OpenOptions::new().write(true).open(&path) else {
            return;
        };
        match f.metadata() {
            Ok(m) if m.len() < v.capacity_bytes => {
                log::warn!(
                    "volume {}: image is {} bytes, the volume {}; extending it",
                    v.id,
                    m.len(),
                    v.capacity_bytes
                );
                if let Err(e) = f.set_len(v.capacity_bytes).and_then(|()| f.sync_all()) {
                    log::warn!("volume {}: extend image: {e}", v.id);
                }
            }
            _ => {}
        }
    }

    /// Moves `path` out of the pool's namespace in one rename, then deletes
    /// it at leisure. A crash after the rename leaves only scratch debris.
    fn discard(&self, path: &Path) -> Result<(), PoolError> {
        let trash = self.scratch.new_path("trash");
        std::fs::rename(path, &trash).map_err(io_error("move out of the pool", path))?;
        if let Some(parent) = path.parent() {
            sysfs::fsync_dir(parent).map_err(io_error("sync", parent))?;
        }
        crash_point("discard.renamed");
        let removed = if trash.is_dir() {
            std::fs::remove_dir_all(&trash)
        } else {
            std::fs::remove_file(&trash)
        };
        if let Err(e) = removed {
            // The object is already gone from the pool; the next start
            // clears the debris.
            log::warn!("remove {}: {e}", trash.display());
        }
        Ok(())
    }

    /// Renames a finished object from scratch into the pool and makes the
    /// rename durable.
    ///
    /// Only the parent is fsynced. The entries and sizes inside `built` were
    /// created before the rename, and the filesystems a pool lives on order
    /// metadata: xfs and ext4 journal it in sequence (forcing the journal
    /// for the rename forces what came before), NFS servers commit metadata
    /// operations before answering. File *data* is not ordered that way, so
    /// every file with content (meta.json, copied or preallocated images) is
    /// fsynced when written. Should a filesystem still lose an image's size,
    /// the next start extends it back (see `load`): growing a sparse file
    /// loses nothing.
    fn commit(&self, built: &Path, dest: &Path) -> Result<(), PoolError> {
        std::fs::rename(built, dest).map_err(io_error("move into the pool", dest))?;
        let parent = dest.parent().expect("pool objects have a parent");
        sysfs::fsync_dir(parent).map_err(io_error("sync", parent))
    }

    // ---- capacity ----

    /// Bytes the pool can still promise to new volumes: the usable size
    /// (total less the reserve) times the overcommit ratio, less the
    /// capacity of every volume and snapshot. Snapshots count at their full
    /// size because a reflinked copy grows toward it as its source diverges.
    /// At ratio 1.0 the pool can write every byte it ever promised.
    /// Thin volumes take no space when created, so free space is not the
    /// bound; preallocation and copies that meet a full filesystem fail
    /// with ENOSPC and are rolled back.
    pub fn capacity(&self) -> Result<u64, PoolError> {
        let in_flight = *self.in_flight.lock();
        self.room(in_flight)
    }

    fn room(&self, in_flight: u64) -> Result<u64, PoolError> {
        let space = sysfs::space(&self.root).map_err(io_error("statvfs", &self.root))?;
        let index = self.index.read();
        let volumes: u64 = index
            .volumes
            .values()
            .filter_map(|v| v.as_ref().ok())
            .map(|v| v.capacity_bytes)
            .sum();
        let snapshots: u64 = index.snapshots.values().map(|s| s.size_bytes).sum();
        let usable = space.total.saturating_sub(self.opts.reserve_bytes);
        let promisable = (usable as f64 * self.opts.overcommit) as u64;
        Ok(promisable.saturating_sub(volumes + snapshots + in_flight))
    }

    /// Holds `bytes` of capacity until the returned guard is dropped, or
    /// fails with [`PoolError::Exhausted`]. The check and the hold happen
    /// under one lock, so two creations cannot both take the last space.
    fn promise(&self, bytes: u64) -> Result<Promise<'_>, PoolError> {
        let mut in_flight = self.in_flight.lock();
        let available = self.room(*in_flight)?;
        if bytes > available {
            return Err(PoolError::Exhausted {
                requested: bytes,
                available,
            });
        }
        *in_flight += bytes;
        Ok(Promise { pool: self, bytes })
    }

    /// Volumes, snapshots, and bytes promised to volumes, for metrics and
    /// reports.
    pub fn usage(&self) -> (usize, usize, u64) {
        let index = self.index.read();
        let provisioned = index
            .volumes
            .values()
            .filter_map(|v| v.as_ref().ok())
            .map(|v| v.capacity_bytes)
            .sum();
        (index.volumes.len(), index.snapshots.len(), provisioned)
    }

    // ---- volumes ----

    /// The volume `id`.
    pub fn volume(&self, id: &str) -> Result<VolumeMeta, PoolError> {
        match self.index.read().volumes.get(id) {
            Some(Ok(v)) => Ok(v.clone()),
            Some(Err(problem)) => Err(PoolError::Damaged {
                path: self.volume_dir(id).join("meta.json"),
                problem: problem.clone(),
            }),
            None => Err(PoolError::NotFound {
                kind: "volume",
                id: id.to_owned(),
            }),
        }
    }

    /// Why the volume is abnormal (its data is missing or shorter than its
    /// capacity), or `None` when it looks healthy.
    pub fn volume_problem(&self, v: &VolumeMeta) -> Option<String> {
        match v.layout {
            Layout::Image => {
                let path = self.image_path(&v.id);
                match std::fs::metadata(&path) {
                    Err(e) => Some(format!("image {} is unreadable: {e}", path.display())),
                    Ok(m) if !m.is_file() => {
                        Some(format!("image {} is not a file", path.display()))
                    }
                    Ok(m) if m.len() < v.capacity_bytes => Some(format!(
                        "image {} is {} bytes, the volume is {}",
                        path.display(),
                        m.len(),
                        v.capacity_bytes
                    )),
                    Ok(_) => None,
                }
            }
            Layout::Dir => {
                let path = self.data_path(&v.id);
                (!path.is_dir()).then(|| format!("directory {} is missing", path.display()))
            }
        }
    }

    /// Volumes in id order from `start` (inclusive), at most `max` (0: all),
    /// and the id to continue from.
    pub fn list_volumes(
        &self,
        start: Option<&str>,
        max: usize,
    ) -> (Vec<(String, VolumeEntry)>, Option<String>) {
        page(&self.index.read().volumes, start, max, |_| true)
    }

    /// Creates the volume `spec` asks for, or returns the one a previous
    /// identical request made.
    pub fn create_volume(&self, spec: &VolumeSpec) -> Result<VolumeMeta, PoolError> {
        let id = ids::derive(ids::Kind::Volume, &spec.name);
        let capacity = self.size_for(spec)?;
        self.check_source_shape(spec)?;
        if let Some(existing) = self.index.read().volumes.get(&id) {
            let existing = existing.clone().map_err(|problem| PoolError::Damaged {
                path: self.volume_dir(&id).join("meta.json"),
                problem,
            })?;
            return self.check_compatible(existing, spec);
        }

        let promise = self.promise(capacity)?;
        let built = self.scratch.new_path("volume");
        std::fs::create_dir(&built).map_err(io_error("create", &built))?;
        let result = self.build_volume(&built, &id, spec, capacity);
        let meta = match result {
            Ok(meta) => meta,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&built);
                return Err(e);
            }
        };
        crash_point("create.built");
        if let Err(e) = self.commit(&built, &self.volume_dir(&id)) {
            let _ = std::fs::remove_dir_all(&built);
            return Err(e);
        }
        crash_point("create.committed");
        self.index.write().volumes.insert(id, Ok(meta.clone()));
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

    fn check_compatible(
        &self,
        existing: VolumeMeta,
        spec: &VolumeSpec,
    ) -> Result<VolumeMeta, PoolError> {
        let CapacityRange { required, limit } = spec.capacity;
        let what = if existing.layout != spec.layout {
            Some("layout")
        } else if existing.access != spec.access {
            Some("access type")
        } else if existing.fs_type != spec.fs_type {
            Some("filesystem")
        } else if existing.capacity_bytes < required
            || (limit != 0 && existing.capacity_bytes > limit)
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

    fn build_volume(
        &self,
        built: &Path,
        id: &str,
        spec: &VolumeSpec,
        capacity: u64,
    ) -> Result<VolumeMeta, PoolError> {
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
                    }
                    Some(source) => {
                        let from = self.source_image(source)?;
                        let check = |f: &std::fs::File| self.check_copyable(source, f);
                        copy::copy_image(&from, &image, capacity, copy::Fallback::Sparse(&check))?;
                        crash_point("create.copied");
                        if spec.thick {
                            let f = OpenOptions::new()
                                .write(true)
                                .open(&image)
                                .map_err(io_error("open image", &image))?;
                            sysfs::preallocate(&f, capacity)
                                .map_err(io_error("preallocate image", &image))?;
                            f.sync_all().map_err(io_error("sync image", &image))?;
                        }
                    }
                }
            }
            Layout::Dir => {
                let data = built.join("data");
                match &spec.source {
                    None => {
                        std::fs::create_dir(&data).map_err(io_error("create directory", &data))?;
                        // Any pod user may write a shared directory; kubelet
                        // applies fsGroup on top where one is set.
                        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o777))
                            .map_err(io_error("chmod", &data))?;
                    }
                    Some(source) => copy::copy_tree(&self.source_data(source)?, &data)?,
                }
            }
        }
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
            attachments: Vec::new(),
        };
        write_new_json(&built.join("meta.json"), &meta)?;
        Ok(meta)
    }

    fn source_image(&self, source: &Source) -> Result<PathBuf, PoolError> {
        Ok(match source {
            Source::Snapshot(id) => self.snapshot_dir(id).join("image"),
            Source::Volume(id) => self.image_path(id),
        })
    }

    fn source_data(&self, source: &Source) -> Result<PathBuf, PoolError> {
        Ok(match source {
            Source::Snapshot(id) => self.snapshot_dir(id).join("data"),
            Source::Volume(id) => self.data_path(id),
        })
    }

    /// Approves a byte copy of a source image. Snapshots are never in use.
    /// A volume image is refused while a node has it staged (the node holds
    /// an exclusive lock on it): a copy of an image being written is torn.
    /// The shared lock taken here lasts as long as the open file, so no node
    /// can stage the image during the copy.
    fn check_copyable(&self, source: &Source, image: &std::fs::File) -> Result<(), PoolError> {
        let Source::Volume(id) = source else {
            return Ok(());
        };
        let path = self.image_path(id);
        match sysfs::try_lock_patiently(image, sysfs::LockKind::Shared) {
            Ok(true) => Ok(()),
            Ok(false) => Err(PoolError::InUse(format!(
                "volume {id} is staged on a node and the pool filesystem cannot reflink: a byte copy of an image in use would be torn; unstage it first or use a pool filesystem with reflink (xfs, btrfs)"
            ))),
            Err(e) => Err(io_error("lock", path)(e)),
        }
    }

    /// Deletes the volume. Idempotent; refused while it is attached.
    pub fn delete_volume(&self, id: &str) -> Result<(), PoolError> {
        let entry = self.index.read().volumes.get(id).cloned();
        let Some(entry) = entry else { return Ok(()) };
        if let Ok(v) = &entry {
            if !v.attachments.is_empty() {
                return Err(PoolError::InUse(format!(
                    "volume {id} is still published to node(s) {}",
                    v.attachments
                        .iter()
                        .map(|a| a.node_id.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
        }
        // A node holds its lock on the image while it is staged: deleting it
        // then would leave a loop device on a deleted file (and the data in
        // use). The controller only learns of node stages through this lock.
        let image = self.image_path(id);
        if let Ok(f) = std::fs::File::open(&image) {
            if !sysfs::try_lock_patiently(&f, sysfs::LockKind::Exclusive)
                .map_err(io_error("lock", &image))?
            {
                let holders = f
                    .metadata()
                    .map(|m| sysfs::lock_holders(m.ino()))
                    .unwrap_or_default();
                return Err(PoolError::InUse(format!(
                    "volume {id} is still staged on a node (its image is locked{}); unstage it first",
                    if holders.is_empty() { String::new() } else { format!(" by pid {}", holders.join(", ")) }
                )));
            }
        }
        let dir = self.volume_dir(id);
        if dir.exists() {
            self.discard(&dir)?;
        }
        self.index.write().volumes.remove(id);
        Ok(())
    }

    fn update_volume(&self, meta: &VolumeMeta) -> Result<(), PoolError> {
        write_json(&self.volume_dir(&meta.id).join("meta.json"), meta)?;
        self.index
            .write()
            .volumes
            .insert(meta.id.clone(), Ok(meta.clone()));
        Ok(())
    }

    /// Grows the volume to the capacity range (never shrinks).
    pub fn expand_volume(&self, id: &str, range: CapacityRange) -> Result<VolumeMeta, PoolError> {
        let mut v = self.volume(id)?;
        if range.limit != 0 && range.required > range.limit {
            return Err(PoolError::OutOfRange(format!(
                "required {} bytes exceeds the limit of {}",
                range.required, range.limit
            )));
        }
        let target = align_up(range.required);
        if target <= v.capacity_bytes {
            return Ok(v);
        }
        if range.limit != 0 && target > range.limit {
            return Err(PoolError::OutOfRange(format!(
                "rounded to {target} bytes (whole MiB), more than the limit of {}",
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
        v.capacity_bytes = target;
        self.update_volume(&v)?;
        Ok(v)
    }

    /// Applies mutable parameters: `thick=true` preallocates the image.
    pub fn modify_volume(
        &self,
        id: &str,
        params: &BTreeMap<String, String>,
    ) -> Result<VolumeMeta, PoolError> {
        let mut v = self.volume(id)?;
        let thick = parse_thick(params)?;
        if let Some(thick) = thick {
            if thick && !v.thick && v.layout == Layout::Image {
                let image = self.image_path(id);
                let f = OpenOptions::new()
                    .write(true)
                    .open(&image)
                    .map_err(io_error("open image", &image))?;
                sysfs::preallocate(&f, v.capacity_bytes)
                    .map_err(io_error("preallocate image", &image))?;
                f.sync_all().map_err(io_error("sync image", &image))?;
            }
            v.thick = thick;
        }
        v.mutable_parameters
            .extend(params.iter().map(|(k, val)| (k.clone(), val.clone())));
        self.update_volume(&v)?;
        Ok(v)
    }

    // ---- attachments ----

    /// Records that node `node` is a node plugin serving this pool.
    pub fn register_node(&self, record: &NodeRecord) -> Result<(), PoolError> {
        ids::check(&record.node_id)
            .map_err(|e| PoolError::Unsupported(format!("node id {:?}: {e}", record.node_id)))?;
        write_json(
            &self
                .root
                .join("nodes")
                .join(format!("{}.json", record.node_id)),
            record,
        )
    }

    /// The registration of the node plugin with this id, if it has one.
    pub fn node_record(&self, node: &str) -> Option<NodeRecord> {
        if ids::check(node).is_err() {
            return None;
        }
        read_json(&self.root.join("nodes").join(format!("{node}.json"))).ok()
    }

    /// ControllerPublish: attaches the volume to `node`.
    pub fn publish(
        &self,
        id: &str,
        node: &str,
        mode: AccessMode,
        readonly: bool,
    ) -> Result<VolumeMeta, PoolError> {
        let mut v = self.volume(id)?;
        let Some(record) = self.node_record(node) else {
            return Err(PoolError::NodeNotFound(node.to_owned()));
        };
        if let Some(a) = v.attachments.iter().find(|a| a.node_id == node) {
            return if a.mode == mode && a.readonly == readonly {
                Ok(v)
            } else {
                Err(PoolError::AttachedIncompatibly {
                    id: id.to_owned(),
                    node: node.to_owned(),
                })
            };
        }
        if record.max_volumes > 0 {
            let attached = self
                .index
                .read()
                .volumes
                .values()
                .filter_map(|v| v.as_ref().ok())
                .filter(|v| v.attachments.iter().any(|a| a.node_id == node))
                .count();
            if attached >= record.max_volumes as usize {
                return Err(PoolError::AttachLimit {
                    node: node.to_owned(),
                    max: record.max_volumes,
                });
            }
        }
        if let Some(other) = v
            .attachments
            .iter()
            .find(|a| a.node_id != node && (a.mode.is_single_node() || mode.is_single_node()))
        {
            return Err(PoolError::AttachedElsewhere {
                id: id.to_owned(),
                node: other.node_id.clone(),
            });
        }
        v.attachments.push(Attachment {
            node_id: node.to_owned(),
            mode,
            readonly,
        });
        self.update_volume(&v)?;
        Ok(v)
    }

    /// ControllerUnpublish: detaches the volume from `node` (every node when
    /// `None`). A volume or attachment that is gone is already unpublished.
    pub fn unpublish(&self, id: &str, node: Option<&str>) -> Result<(), PoolError> {
        let mut v = match self.volume(id) {
            Ok(v) => v,
            Err(PoolError::NotFound { .. }) => return Ok(()),
            Err(e) => return Err(e),
        };
        let before = v.attachments.len();
        v.attachments
            .retain(|a| node.is_some_and(|n| a.node_id != n));
        if v.attachments.len() != before {
            self.update_volume(&v)?;
        }
        Ok(())
    }

    // ---- snapshots ----

    /// The snapshot `id`.
    pub fn snapshot(&self, id: &str) -> Result<SnapshotMeta, PoolError> {
        self.index
            .read()
            .snapshots
            .get(id)
            .cloned()
            .ok_or_else(|| PoolError::NotFound {
                kind: "snapshot",
                id: id.to_owned(),
            })
    }

    /// Snapshots in id order from `start`, at most `max` (0: all), keeping
    /// those `keep` accepts, and the id to continue from.
    pub fn list_snapshots(
        &self,
        start: Option<&str>,
        max: usize,
        keep: impl Fn(&SnapshotMeta) -> bool,
    ) -> (Vec<SnapshotMeta>, Option<String>) {
        let (items, next) = page(&self.index.read().snapshots, start, max, keep);
        (items.into_iter().map(|(_, s)| s).collect(), next)
    }

    /// Takes a snapshot of `source`, or returns the one an identical
    /// earlier request took.
    pub fn create_snapshot(&self, name: &str, source: &str) -> Result<SnapshotMeta, PoolError> {
        let id = ids::derive(ids::Kind::Snapshot, name);
        if let Ok(existing) = self.snapshot(&id) {
            return if existing.source_volume_id == source && existing.group_id.is_none() {
                Ok(existing)
            } else {
                Err(PoolError::Incompatible {
                    kind: "snapshot",
                    name: name.to_owned(),
                    id,
                    what: "source volume".into(),
                })
            };
        }
        let built = self.scratch.new_path("snapshot");
        let result = self
            .build_snapshot(
                &built,
                &id,
                name,
                source,
                None,
                copy::Fallback::Sparse(&|f| {
                    self.check_copyable(&Source::Volume(source.to_owned()), f)
                }),
            )
            .and_then(|meta| {
                crash_point("snapshot.built");
                self.commit(&built, &self.snapshot_dir(&id)).map(|()| meta)
            });
        match result {
            Ok(meta) => {
                crash_point("snapshot.committed");
                self.index.write().snapshots.insert(id, meta.clone());
                Ok(meta)
            }
            Err(e) => {
                let _ = std::fs::remove_dir_all(&built);
                Err(e)
            }
        }
    }

    fn build_snapshot(
        &self,
        built: &Path,
        id: &str,
        name: &str,
        source: &str,
        group: Option<&str>,
        fallback: copy::Fallback<'_>,
    ) -> Result<SnapshotMeta, PoolError> {
        let v = self.volume(source).map_err(source_missing)?;
        std::fs::create_dir(built).map_err(io_error("create", built))?;
        let method = match v.layout {
            Layout::Image => {
                let dest = built.join("image");
                let src = self.image_path(source);
                if matches!(fallback, copy::Fallback::Sparse(_)) {
                    self.check_room_for_copy(&src)?;
                }
                copy::copy_image(&src, &dest, v.capacity_bytes, fallback)?
            }
            Layout::Dir => {
                copy::copy_tree(&self.data_path(source), &built.join("data"))?;
                CopyMethod::Sparse
            }
        };
        crash_point("snapshot.copied");
        let (secs, nanos) = now_ts();
        let meta = SnapshotMeta {
            format: FORMAT,
            id: id.to_owned(),
            name: name.to_owned(),
            source_volume_id: source.to_owned(),
            size_bytes: v.capacity_bytes,
            layout: v.layout,
            access: v.access,
            fs_type: v.fs_type,
            method,
            group_id: group.map(str::to_owned),
            created_secs: secs,
            created_nanos: nanos,
        };
        write_new_json(&built.join("meta.json"), &meta)?;
        Ok(meta)
    }

    /// Refuses a byte copy that cannot fit, before filling the pool with
    /// half of it.
    fn check_room_for_copy(&self, src: &Path) -> Result<(), PoolError> {
        let need = sysfs::allocated_bytes(src).map_err(io_error("stat", src))?;
        let space = sysfs::space(&self.root).map_err(io_error("statvfs", &self.root))?;
        let available = space.available.saturating_sub(self.opts.reserve_bytes);
        if need > available {
            return Err(PoolError::Exhausted {
                requested: need,
                available,
            });
        }
        Ok(())
    }

    /// Deletes the snapshot. Idempotent; a member of a group snapshot goes
    /// only with its group.
    pub fn delete_snapshot(&self, id: &str) -> Result<(), PoolError> {
        let Ok(s) = self.snapshot(id) else {
            return Ok(());
        };
        if let Some(group) = &s.group_id {
            return Err(PoolError::Mismatch(format!(
                "snapshot {id} belongs to group snapshot {group}; delete the group"
            )));
        }
        self.remove_snapshot(id)
    }

    fn remove_snapshot(&self, id: &str) -> Result<(), PoolError> {
        let dir = self.snapshot_dir(id);
        if dir.exists() {
            self.discard(&dir)?;
        }
        self.index.write().snapshots.remove(id);
        Ok(())
    }

    // ---- group snapshots ----

    /// The group snapshot `id`.
    pub fn group(&self, id: &str) -> Result<GroupMeta, PoolError> {
        self.index
            .read()
            .groups
            .get(id)
            .cloned()
            .ok_or_else(|| PoolError::NotFound {
                kind: "group snapshot",
                id: id.to_owned(),
            })
    }

    /// Snapshots every volume in `sources` together. Every member is a
    /// reflink (instant and atomic) or the whole group is refused.
    pub fn create_group(&self, name: &str, sources: &[String]) -> Result<GroupMeta, PoolError> {
        let id = ids::derive(ids::Kind::Group, name);
        if let Ok(existing) = self.group(&id) {
            return if existing.source_volume_ids == sources {
                Ok(existing)
            } else {
                Err(PoolError::Incompatible {
                    kind: "group snapshot",
                    name: name.to_owned(),
                    id,
                    what: "set of source volumes".into(),
                })
            };
        }
        let mut built = Vec::new();
        let result = (|| {
            for source in sources {
                let member_id = ids::derive(ids::Kind::Snapshot, &format!("{id}/{source}"));
                let path = self.scratch.new_path("group-member");
                built.push((member_id.clone(), path.clone()));
                let meta = self.build_snapshot(
                    &path,
                    &member_id,
                    &format!("{name}/{source}"),
                    source,
                    Some(&id),
                    copy::Fallback::Refuse,
                )?;
                if meta.layout == Layout::Dir {
                    return Err(PoolError::Unsupported(format!(
                        "volume {source} is a directory volume; group snapshots need image volumes on a reflink pool"
                    )));
                }
            }
            Ok(())
        })();
        if let Err(e) = result {
            for (_, path) in &built {
                let _ = std::fs::remove_dir_all(path);
            }
            return Err(e);
        }
        // Members enter the pool first; the group record last. A crash in
        // between leaves members without a group, removed at the next start.
        let mut members = Vec::new();
        for (member_id, path) in &built {
            self.commit(path, &self.snapshot_dir(member_id))?;
            crash_point("group.member_committed");
            members.push(read_json::<SnapshotMeta>(
                &self.snapshot_dir(member_id).join("meta.json"),
            )?);
        }
        let (secs, nanos) = now_ts();
        let group = GroupMeta {
            format: FORMAT,
            id: id.clone(),
            name: name.to_owned(),
            snapshot_ids: built.iter().map(|(m, _)| m.clone()).collect(),
            source_volume_ids: sources.to_vec(),
            created_secs: secs,
            created_nanos: nanos,
        };
        write_json(&self.group_file(&id), &group)?;
        let mut index = self.index.write();
        for m in members {
            index.snapshots.insert(m.id.clone(), m);
        }
        index.groups.insert(id, group.clone());
        Ok(group)
    }

    /// Deletes a group snapshot and its members. Idempotent. `expected`, when
    /// not empty, must list exactly the group's snapshots.
    pub fn delete_group(&self, id: &str, expected: &[String]) -> Result<(), PoolError> {
        let Ok(group) = self.group(id) else {
            return Ok(());
        };
        check_members(&group, expected)?;
        for member in &group.snapshot_ids {
            self.remove_snapshot(member)?;
        }
        let file = self.group_file(id);
        self.discard(&file)?;
        self.index.write().groups.remove(id);
        Ok(())
    }
}

/// Checks a caller's list of a group's snapshots against the group.
pub fn check_members(group: &GroupMeta, expected: &[String]) -> Result<(), PoolError> {
    if expected.is_empty() {
        return Ok(());
    }
    let mut a = expected.to_vec();
    let mut b = group.snapshot_ids.clone();
    a.sort();
    b.sort();
    if a != b {
        return Err(PoolError::Mismatch(format!(
            "the snapshot ids given do not match group snapshot {}'s members",
            group.id
        )));
    }
    Ok(())
}

/// Parses the `thick` (mutable) parameter.
pub fn parse_thick(params: &BTreeMap<String, String>) -> Result<Option<bool>, PoolError> {
    match params.get("thick").map(String::as_str) {
        None => Ok(None),
        Some("true") => Ok(Some(true)),
        Some("false") => Ok(Some(false)),
        Some(other) => Err(PoolError::Unsupported(format!(
            "thick={other:?}: expected \"true\" or \"false\""
        ))),
    }
}

fn source_missing(e: PoolError) -> PoolError {
    match e {
        PoolError::NotFound { kind, id } => PoolError::NotFound {
            kind: if kind == "volume" {
                "source volume"
            } else {
                "source snapshot"
            },
            id,
        },
        other => other,
    }
}

/// One page of a sorted map: the entries `keep` accepts from `start`
/// (inclusive), at most `max` (0: all), and the key to continue from.
fn page<V: Clone>(
    map: &BTreeMap<String, V>,
    start: Option<&str>,
    max: usize,
    keep: impl Fn(&V) -> bool,
) -> (Vec<(String, V)>, Option<String>) {
    use std::ops::Bound;
    let from = start.map_or(Bound::Unbounded, Bound::Included);
    let mut iter = map
        .range::<str, _>((from, Bound::Unbounded))
        .filter(|(_, v)| keep(v));
    let limit = if max == 0 { usize::MAX } else { max };
    let items: Vec<(String, V)> = iter
        .by_ref()
        .take(limit)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let next = iter.next().map(|(k, _)| k.clone());
    (items, next)
}

/// Entries of a directory as (name, path), skipping dot-files (temporary
/// metadata files of `write_atomic`).
fn list_dir(dir: &Path) -> Result<Vec<(String, PathBuf)>, PoolError> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_error("read directory", dir))? {
        let entry = entry.map_err(io_error("read directory", dir))?;
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        if name.starts_with('.') {
            continue;
        }
        out.push((name, entry.path()));
    }
    Ok(out)
}

/// Capacity held for a creation in progress.
struct Promise<'a> {
    pool: &'a Pool,
    bytes: u64,
}

impl Drop for Promise<'_> {
    fn drop(&mut self) {
        *self.pool.in_flight.lock() -= self.bytes;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_resume_at_the_cursor_and_filter() {
        let map: BTreeMap<String, u32> = (0..10).map(|i| (format!("v{i:02}"), i)).collect();
        let (first, next) = page(&map, None, 4, |_| true);
        assert_eq!(first.len(), 4);
        assert_eq!(next.as_deref(), Some("v04"));
        let (rest, next) = page(&map, next.as_deref(), 0, |_| true);
        assert_eq!(rest.len(), 6);
        assert_eq!(next, None);
        let (even, _) = page(&map, None, 0, |v| v % 2 == 0);
        assert_eq!(even.len(), 5);
        // A cursor whose entry was deleted meanwhile resumes after it.
        let (after, _) = page(&map, Some("v03x"), 1, |_| true);
        assert_eq!(after[0].0, "v04");
    }

    #[test]
    fn sizes_round_up_to_whole_mib() {
        assert_eq!(align_up(1), ALIGN);
        assert_eq!(align_up(ALIGN), ALIGN);
        assert_eq!(align_up(5 * ALIGN + 1), 6 * ALIGN);
        // The largest size a CSI request can carry (int64) still rounds.
        assert_eq!(align_up(i64::MAX as u64), 1 << 63);
    }

    #[test]
    fn group_member_lists_must_match_exactly() {
        let g = GroupMeta {
            format: FORMAT,
            id: "g".into(),
            name: "g".into(),
            snapshot_ids: vec!["a".into(), "b".into()],
            source_volume_ids: vec![],
            created_secs: 0,
            created_nanos: 0,
        };
        check_members(&g, &[]).unwrap();
        check_members(&g, &["b".into(), "a".into()]).unwrap();
        assert!(check_members(&g, &["a".into()]).is_err());
        assert!(check_members(&g, &["a".into(), "c".into()]).is_err());
    }
}
