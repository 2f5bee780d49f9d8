//! The store: the one place pool metadata is read, written and locked.
//!
//! The pool is shared by every filevol process that opens it (controller
//! replicas, node plugins on one host or many), so no process may decide
//! from what it read earlier. The rules:
//!
//! - **Decisions read the record.** [`Store::read`] opens and parses the
//!   object's `meta.json` on every call: one small file. Opening (rather
//!   than trusting a cached stat) is what NFS's close-to-open consistency
//!   revalidates, so a record another host committed is seen.
//! - **Listings may use a cache, validated per call.** Listing 10,000
//!   volumes or summing their capacity would otherwise parse 10,000 files.
//!   [`Store::load`] stats `meta.json` and reuses what it parsed before only
//!   when the file is the same (device, inode, size, mtime, ctime). Records
//!   are never changed in place, only replaced by a rename, and every
//!   replacement gets an mtime later than the one it replaces
//!   (`sys::fs::write_atomic`), so a changed record never looks unchanged,
//!   even when its new inode reuses an old number within one clock tick.
//! - **Mutations of one object are serialised by an object lock** in the
//!   pool (`<object>/lock`, an OFD lock: see `sys::lock` for why that kind),
//!   taken without waiting for long: contention is `ABORTED`, as the CSI
//!   spec's concurrency section asks, never a worker blocked on another
//!   process. Creation needs no lock: an object enters the pool by renaming
//!   its finished directory into place, and a rename onto an existing,
//!   non-empty directory fails, so of two creators exactly one commits.
//! - **Fences** (`volumes/<id>/fence`) are held by node plugins for as long
//!   as a volume is staged: exclusive for a writer, shared for a reader or a
//!   shared directory. Delete needs the fence exclusively and byte copies
//!   need it shared, so neither can happen to a staged volume, whichever
//!   process or host staged it.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::error::{io_error, PoolError};
use crate::sys::fs as sysfs;
use crate::sys::lock::{self, LockKind};
use crate::volume::meta::{SnapshotMeta, VolumeMeta};

/// The record file of a volume or snapshot.
pub const META: &str = "meta.json";
/// The object lock file inside an object's directory.
const LOCK: &str = "lock";
/// The fence file inside a volume's directory.
pub const FENCE: &str = "fence";

/// How long a lock test waits before it answers "held": long enough for a
/// forked child's inherited descriptor to go (see `sys::lock`), short enough
/// that no worker sits waiting for another process.
const PATIENCE: Duration = Duration::from_millis(50);

/// The kinds of object that live in a directory of their own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `volumes/<id>/`
    Volume,
    /// `snapshots/<id>/`
    Snapshot,
}

impl Kind {
    /// The pool subdirectory holding objects of this kind.
    pub fn dir(self) -> &'static str {
        match self {
            Kind::Volume => "volumes",
            Kind::Snapshot => "snapshots",
        }
    }

    /// The name used in errors.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Volume => "volume",
            Kind::Snapshot => "snapshot",
        }
    }
}

/// A record type stored as `<kind>/<id>/meta.json`.
pub trait Record: Serialize + DeserializeOwned + Send + Sync + 'static {
    /// Where records of this type live.
    const KIND: Kind;
    /// This type's listing cache in `store`.
    fn cache(store: &Store) -> &Mutex<HashMap<String, (Stamp, Arc<Self>)>>;
}

impl Record for VolumeMeta {
    const KIND: Kind = Kind::Volume;
    fn cache(store: &Store) -> &Mutex<HashMap<String, (Stamp, Arc<Self>)>> {
        &store.volumes
    }
}

impl Record for SnapshotMeta {
    const KIND: Kind = Kind::Snapshot;
    fn cache(store: &Store) -> &Mutex<HashMap<String, (Stamp, Arc<Self>)>> {
        &store.snapshots
    }
}

/// What identifies one version of a record file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    fn of(m: &std::fs::Metadata) -> Stamp {
        Stamp {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        }
    }
}

/// The stamp of the file at `path`, `None` when there is none (ENOENT; any
/// other failure is an error, never "none"). Opened, not stat'ed: on NFS an
/// open revalidates what another host changed.
pub fn stamp(path: &Path) -> Result<Option<Stamp>, PoolError> {
    crate::faults::io_error_at(path).map_err(io_error("open", path))?;
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_error("open", path)(e)),
    };
    let m = f.metadata().map_err(io_error("stat", path))?;
    Ok(Some(Stamp::of(&m)))
}

/// A record as a listing sees it: parsed, or why it cannot be.
pub type Entry<T> = Result<Arc<T>, String>;

/// Reads, writes and locks the records of one pool.
#[derive(Debug)]
pub struct Store {
    root: PathBuf,
    volumes: Mutex<HashMap<String, (Stamp, Arc<VolumeMeta>)>>,
    snapshots: Mutex<HashMap<String, (Stamp, Arc<SnapshotMeta>)>>,
}

/// A held object lock; released when dropped (the kernel releases it too
/// if the process dies).
#[derive(Debug)]
pub struct ObjectLock {
    _file: File,
}

/// A held group snapshot lock. Its file is removed before the lock is let
/// go, so `groups/` holds lock files only while operations run (or after a
/// crash, until the next operation on that group). A process that opened
/// the file before the removal finds it unlinked once it gets the lock, and
/// takes a new one.
#[derive(Debug)]
pub struct GroupLock {
    _file: File,
    path: PathBuf,
}

impl Drop for GroupLock {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.path) {
            log::warn!("remove {}: {e}", self.path.display());
        }
    }
}

/// A held fence on a volume (see the module documentation), and for a
/// CO-side operation on an image (a delete, a byte copy) the image's lock
/// too, which loop devices of the image hold (`Pool::fence_in_use`).
#[derive(Debug)]
pub struct Fence {
    file: File,
    /// Held for its lock only.
    _image: Option<File>,
}

impl Fence {
    /// This fence, holding the image's lock taken on `image` as well.
    pub fn with_image(self, image: File) -> Fence {
        Fence {
            _image: Some(image),
            ..self
        }
    }

    /// Converts a shared fence to an exclusive one, on the same open file;
    /// `Ok(false)` while anyone else holds it.
    pub fn upgrade(&self) -> Result<bool, PoolError> {
        lock::try_lock_patiently(&self.file, LockKind::Exclusive).map_err(|e| PoolError::Io {
            step: "lock",
            path: PathBuf::from("fence"),
            source: e,
        })
    }
}

impl Store {
    /// The store of the pool at `root`.
    pub fn new(root: &Path) -> Store {
        Store {
            root: root.to_owned(),
            volumes: Mutex::default(),
            snapshots: Mutex::default(),
        }
    }

    /// The directory of an object.
    pub fn object_dir(&self, kind: Kind, id: &str) -> PathBuf {
        self.root.join(kind.dir()).join(id)
    }

    /// Reads the record of `id` from the pool, now.
    pub fn read<T: Record>(&self, id: &str) -> Result<T, PoolError> {
        let dir = self.object_dir(T::KIND, id);
        let path = dir.join(META);
        // A directory seen without its record may have been committed
        // (renamed into place, record and all) between the two looks: an
        // object whose record is still missing at a second look is damaged.
        // Only a directory proven absent (ENOENT) makes the object absent:
        // one that cannot be looked at is an error, never NotFound, which
        // delete and clean-up would take as "already gone".
        let dir_present = || sysfs::exists(&dir).map_err(io_error("stat", &dir));
        let first = read_record::<T>(&path);
        let result = match first {
            Err(ReadError::Missing) if dir_present()? => read_record::<T>(&path),
            other => other,
        };
        match result {
            Ok((_, record)) => Ok(record),
            Err(ReadError::Missing) if dir_present()? => Err(PoolError::Damaged {
                path,
                problem: "the record is missing".into(),
            }),
            Err(ReadError::Missing) => Err(PoolError::NotFound {
                kind: T::KIND.name(),
                id: id.to_owned(),
            }),
            Err(ReadError::Unreadable(e)) => Err(io_error("read", path)(e)),
            Err(ReadError::Damaged(problem)) => Err(PoolError::Damaged { path, problem }),
        }
    }

    /// The ids of every object of `kind`, sorted. Names starting with a dot
    /// are never objects.
    pub fn ids(&self, kind: Kind) -> Result<Vec<String>, PoolError> {
        let dir = self.root.join(kind.dir());
        let mut ids = Vec::new();
        for entry in std::fs::read_dir(&dir).map_err(io_error("read directory", &dir))? {
            let entry = entry.map_err(io_error("read directory", &dir))?;
            if let Ok(name) = entry.file_name().into_string() {
                if !name.starts_with('.') {
                    ids.push(name);
                }
            }
        }
        ids.sort_unstable();
        Ok(ids)
    }

    /// Calls `f` with the id of every object of `kind`, in directory order,
    /// without collecting or sorting them (for sums over the whole pool).
    pub fn each_id(&self, kind: Kind, mut f: impl FnMut(&str)) -> Result<usize, PoolError> {
        let dir = self.root.join(kind.dir());
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).map_err(io_error("read directory", &dir))? {
            let entry = entry.map_err(io_error("read directory", &dir))?;
            let name = entry.file_name();
            if let Some(id) = name.to_str().filter(|id| !id.starts_with('.')) {
                f(id);
                n += 1;
            }
        }
        Ok(n)
    }

    /// The record of `id` for a listing: from the cache when the file is
    /// unchanged, else read. `None` when the object is gone meanwhile.
    pub fn load<T: Record>(&self, id: &str) -> Option<Entry<T>> {
        let dir = self.object_dir(T::KIND, id);
        let path = dir.join(META);
        // As in `read`: a second look at a directory seen without its record.
        // A directory that cannot be looked at is reported with its error,
        // never left out as gone.
        let unreadable = |e: io::Error, at: &Path| Some(Err(format!("{}: {e}", at.display())));
        let looked = match sysfs::metadata_if_present(&path) {
            Ok(None) => match sysfs::exists(&dir) {
                Ok(true) => sysfs::metadata_if_present(&path),
                Ok(false) => Ok(None),
                Err(e) => return unreadable(e, &dir),
            },
            other => other,
        };
        let stamp = match looked {
            Ok(Some(m)) => Stamp::of(&m),
            Ok(None) => {
                T::cache(self).lock().remove(id);
                // A directory without its record is reported, not hidden.
                return match sysfs::exists(&dir) {
                    Ok(present) => present.then(|| Err("the record is missing".to_owned())),
                    Err(e) => unreadable(e, &dir),
                };
            }
            Err(e) => return unreadable(e, &path),
        };
        if let Some((cached, record)) = T::cache(self).lock().get(id) {
            if *cached == stamp {
                return Some(Ok(Arc::clone(record)));
            }
        }
        match read_record::<T>(&path) {
            Ok((stamp, record)) => {
                let record = Arc::new(record);
                T::cache(self)
                    .lock()
                    .insert(id.to_owned(), (stamp, Arc::clone(&record)));
                Some(Ok(record))
            }
            Err(ReadError::Missing) => None,
            Err(ReadError::Unreadable(e)) => Some(Err(format!("{}: {e}", path.display()))),
            Err(ReadError::Damaged(problem)) => Some(Err(problem)),
        }
    }

    /// Every record of a type, by id. Also forgets cached records of
    /// objects that are gone.
    pub fn load_all<T: Record>(&self) -> Result<Vec<(String, Entry<T>)>, PoolError> {
        let ids = self.ids(T::KIND)?;
        let out: Vec<(String, Entry<T>)> = ids
            .into_iter()
            .filter_map(|id| self.load::<T>(&id).map(|e| (id, e)))
            .collect();
        let mut cache = T::cache(self).lock();
        if cache.len() > out.len() {
            let live: std::collections::HashSet<&str> =
                out.iter().map(|(id, _)| id.as_str()).collect();
            cache.retain(|id, _| live.contains(id.as_str()));
        }
        Ok(out)
    }

    /// Replaces the record of an object already in the pool, atomically.
    /// The caller holds the object's lock.
    pub fn replace<T: Record>(
        &self,
        id: &str,
        record: &T,
        _held: &ObjectLock,
    ) -> Result<(), PoolError> {
        let path = self.object_dir(T::KIND, id).join(META);
        let bytes = serde_json::to_vec_pretty(record).expect("metadata serialises");
        sysfs::write_atomic(&path, &bytes).map_err(io_error("write", path))
    }

    /// Takes the lock of object `id` of `kind`: serialises its mutations
    /// across threads, processes and hosts. [`PoolError::Busy`] when another
    /// holds it, [`PoolError::NotFound`] when the object does not exist.
    pub fn lock(&self, kind: Kind, id: &str) -> Result<ObjectLock, PoolError> {
        let path = self.object_dir(kind, id).join(LOCK);
        match lock_in_place(&path, LockKind::Exclusive)? {
            Locked::Held(file) => Ok(ObjectLock { _file: file }),
            Locked::Busy => Err(PoolError::Busy {
                kind: kind.name(),
                id: id.to_owned(),
            }),
            Locked::Gone => Err(PoolError::NotFound {
                kind: kind.name(),
                id: id.to_owned(),
            }),
        }
    }

    /// Takes the lock of a group snapshot (`groups/<id>.lock`), which exists
    /// only while an operation on the group is under way: its creator holds
    /// it from the first member to the group record, so members whose group
    /// has no record and no held lock belong to a creator that is gone.
    pub fn lock_group(&self, id: &str) -> Result<GroupLock, PoolError> {
        let path = self.root.join("groups").join(format!("{id}.lock"));
        match lock_in_place(&path, LockKind::Exclusive)? {
            Locked::Held(file) => Ok(GroupLock { _file: file, path }),
            Locked::Busy | Locked::Gone => Err(PoolError::Busy {
                kind: "group snapshot",
                id: id.to_owned(),
            }),
        }
    }

    /// Takes the fence of volume `id`: `Ok(None)` when a conflicting fence
    /// is held (by this process, another, or another host).
    pub fn fence(&self, id: &str, kind: LockKind) -> Result<Option<Fence>, PoolError> {
        let path = self.object_dir(Kind::Volume, id).join(FENCE);
        match lock_in_place(&path, kind)? {
            Locked::Held(file) => Ok(Some(Fence { file, _image: None })),
            Locked::Busy => Ok(None),
            Locked::Gone => Err(PoolError::NotFound {
                kind: "volume",
                id: id.to_owned(),
            }),
        }
    }
}

enum ReadError {
    Missing,
    Unreadable(io::Error),
    Damaged(String),
}

fn read_record<T: DeserializeOwned>(path: &Path) -> Result<(Stamp, T), ReadError> {
    crate::faults::io_error_at(path).map_err(ReadError::Unreadable)?;
    let mut f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(ReadError::Missing),
        Err(e) => return Err(ReadError::Unreadable(e)),
    };
    // The stamp and the bytes come from the same open file: a record's
    // content never changes after it is renamed into place.
    let stamp = Stamp::of(&f.metadata().map_err(ReadError::Unreadable)?);
    let mut bytes = Vec::with_capacity(1024);
    f.read_to_end(&mut bytes).map_err(ReadError::Unreadable)?;
    let record = serde_json::from_slice(&bytes).map_err(|e| ReadError::Damaged(e.to_string()))?;
    Ok((stamp, record))
}

enum Locked {
    Held(File),
    Busy,
    Gone,
}

/// Opens (creating it if needed: records older than lock files have none)
/// and locks the file at `path`, then checks that the path still names the
/// locked file: a delete renames the object's directory away with its lock
/// file in it, and a lock on that file protects nothing.
fn lock_in_place(path: &Path, kind: LockKind) -> Result<Locked, PoolError> {
    for _ in 0..8 {
        let file = match OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Locked::Gone),
            Err(e) => return Err(io_error("open lock", path)(e)),
        };
        if !lock::try_lock_for(&file, kind, PATIENCE).map_err(io_error("lock", path))? {
            return Ok(Locked::Busy);
        }
        let held = file.metadata().map_err(io_error("stat", path))?;
        match std::fs::metadata(path) {
            Ok(now) if (now.dev(), now.ino()) == (held.dev(), held.ino()) => {
                return Ok(Locked::Held(file))
            }
            // Replaced by a new object of the same id: lock that one.
            Ok(_) => continue,
            // Unlinked by the holder we waited for (a group lock, or an
            // object deleted meanwhile): the next open says which.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_error("stat", path)(e)),
        }
    }
    Ok(Locked::Busy)
}

/// Writes the record of an object being built in scratch: a new file that
/// nothing can see before the commit, so no temporary file is needed.
pub fn write_new<T: Serialize>(path: &Path, value: &T) -> Result<(), PoolError> {
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

/// Reads a JSON file that is not an object record (group and node records).
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T, PoolError> {
    match read_record::<T>(path) {
        Ok((_, v)) => Ok(v),
        Err(ReadError::Missing) => Err(io_error("read", path)(io::ErrorKind::NotFound.into())),
        Err(ReadError::Unreadable(e)) => Err(io_error("read", path)(e)),
        Err(ReadError::Damaged(problem)) => Err(PoolError::Damaged {
            path: path.to_owned(),
            problem,
        }),
    }
}

/// Replaces a JSON file that is not an object record, atomically.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), PoolError> {
    let bytes = serde_json::to_vec_pretty(value).expect("metadata serialises");
    sysfs::write_atomic(path, &bytes).map_err(io_error("write", path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::meta::{AccessType, Layout, FORMAT};
    use std::collections::BTreeMap;

    fn volume(id: &str, capacity: u64) -> VolumeMeta {
        VolumeMeta {
            format: FORMAT,
            id: id.into(),
            name: id.into(),
            layout: Layout::Image,
            capacity_bytes: capacity,
            access: AccessType::Block,
            fs_type: None,
            thick: false,
            mkfs_options: vec![],
            parameters: BTreeMap::new(),
            mutable_parameters: BTreeMap::new(),
            source: None,
            topology: BTreeMap::new(),
            created_unix_ms: 0,
            legacy_attachments: vec![],
            written: Some(false),
            settled: false,
            formatting: false,
            subvolume: false,
        }
    }

    fn put(root: &Path, v: &VolumeMeta) {
        let dir = root.join("volumes").join(&v.id);
        std::fs::create_dir_all(&dir).unwrap();
        write_json(&dir.join(META), v).unwrap();
    }

    fn pool() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        for d in ["volumes", "snapshots", "groups"] {
            std::fs::create_dir(dir.path().join(d)).unwrap();
        }
        let store = Store::new(dir.path());
        (dir, store)
    }

    #[test]
    fn a_record_written_by_another_process_is_seen_at_once() {
        let (dir, store) = pool();
        assert!(matches!(
            store.read::<VolumeMeta>("a"),
            Err(PoolError::NotFound { .. })
        ));
        // "Another process" writes straight to the pool.
        put(dir.path(), &volume("a", 1 << 20));
        assert_eq!(
            store.read::<VolumeMeta>("a").unwrap().capacity_bytes,
            1 << 20
        );
        assert_eq!(
            store
                .load::<VolumeMeta>("a")
                .unwrap()
                .unwrap()
                .capacity_bytes,
            1 << 20
        );
        // Replaced faster than the clock ticks: the cache still notices.
        for i in 2..40u64 {
            put(dir.path(), &volume("a", i << 20));
            assert_eq!(
                store
                    .load::<VolumeMeta>("a")
                    .unwrap()
                    .unwrap()
                    .capacity_bytes,
                i << 20
            );
        }
        std::fs::remove_dir_all(dir.path().join("volumes/a")).unwrap();
        assert!(store.load::<VolumeMeta>("a").is_none());
        assert!(store.load_all::<VolumeMeta>().unwrap().is_empty());
    }

    #[test]
    fn damaged_and_missing_records_are_reported_not_hidden() {
        let (dir, store) = pool();
        put(dir.path(), &volume("good", 1));
        std::fs::create_dir(dir.path().join("volumes/empty")).unwrap();
        std::fs::create_dir(dir.path().join("volumes/bad")).unwrap();
        std::fs::write(dir.path().join("volumes/bad/meta.json"), b"{not json").unwrap();
        std::fs::create_dir(dir.path().join("volumes/.hidden")).unwrap();
        let all = store.load_all::<VolumeMeta>().unwrap();
        let ids: Vec<&str> = all.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(ids, ["bad", "empty", "good"]);
        assert!(all[0].1.is_err() && all[1].1.is_err() && all[2].1.is_ok());
        assert!(matches!(
            store.read::<VolumeMeta>("bad"),
            Err(PoolError::Damaged { .. })
        ));
        assert!(matches!(
            store.read::<VolumeMeta>("empty"),
            Err(PoolError::Damaged { .. })
        ));
        // Nothing was removed.
        assert!(dir.path().join("volumes/bad/meta.json").exists());
    }

    #[test]
    fn object_locks_conflict_within_a_process_and_follow_the_object() {
        let (dir, store) = pool();
        assert!(matches!(
            store.lock(Kind::Volume, "a"),
            Err(PoolError::NotFound { .. })
        ));
        put(dir.path(), &volume("a", 1));
        let held = store.lock(Kind::Volume, "a").unwrap();
        assert!(matches!(
            store.lock(Kind::Volume, "a"),
            Err(PoolError::Busy { .. })
        ));
        drop(held);
        let held = store.lock(Kind::Volume, "a").unwrap();
        store.replace("a", &volume("a", 2), &held).unwrap();
        drop(held);
        // Deleted (moved away with its lock file) and made again: the new
        // object has a lock of its own.
        let old = store.lock(Kind::Volume, "a").unwrap();
        std::fs::rename(dir.path().join("volumes/a"), dir.path().join("trash")).unwrap();
        assert!(matches!(
            store.lock(Kind::Volume, "a"),
            Err(PoolError::NotFound { .. })
        ));
        put(dir.path(), &volume("a", 3));
        let _new = store.lock(Kind::Volume, "a").unwrap();
        drop(old);
    }

    #[test]
    fn fences_share_between_readers_and_exclude_a_writer() {
        let (dir, store) = pool();
        put(dir.path(), &volume("a", 1));
        let r1 = store.fence("a", LockKind::Shared).unwrap().unwrap();
        let r2 = store.fence("a", LockKind::Shared).unwrap().unwrap();
        assert!(store.fence("a", LockKind::Exclusive).unwrap().is_none());
        drop((r1, r2));
        let w = store.fence("a", LockKind::Exclusive).unwrap().unwrap();
        assert!(store.fence("a", LockKind::Shared).unwrap().is_none());
        drop(w);
        // The object lock is a different file: a staged volume can still
        // have its record changed (ControllerPublish to another reader).
        let _w = store.fence("a", LockKind::Exclusive).unwrap().unwrap();
        assert!(store.lock(Kind::Volume, "a").is_ok());
    }
}
