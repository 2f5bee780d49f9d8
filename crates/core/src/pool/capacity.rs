//! Capacity: what the pool may still promise to new volumes, and the
//! figures that answer is made of.
//!
//! Room is the usable size (total less the reserve) times the overcommit
//! ratio, less the capacity of every volume, less what every snapshot counts
//! as ([`snapshot_counts`]: the blocks it can come to own, not its size),
//! less the blocks formatted templates hold ([`super::templates`]),
//! less what creations in progress have been promised; above a ratio of 1 it
//! is bounded too by what the pool filesystem can still hold. [`Usage`]
//! carries those figures, and GetCapacity, CreateVolume's promise, the
//! [`PoolError::Exhausted`] error, the metrics and `filevol pool ls` all read
//! them from it, so they cannot tell different stories.
//!
//! Any process may be creating (controller replicas, node plugins making
//! ephemeral volumes), so promises live in the pool too: a creation holds an
//! empty file `.scratch/<instance>/promise-<bytes>-<n>` until its volume is
//! committed, and every process counts the promises of instances that are
//! alive (their scratch lock is held; a dead instance's promises are void).
//! Checking the room and writing the promise happen under `.capacity.lock`,
//! held only for that arithmetic, never across the creation itself, so two
//! processes cannot both take the last free space.
//!
//! Summing 10,000 volumes and snapshots must not cost 10,000 file reads per
//! CreateVolume. Each process keeps what it has read, by id: a volume's
//! capacity, a snapshot's count (a snapshot never changes, so neither do the
//! blocks it holds). The ids come from listing the directories on every
//! call, so creations and deletions by any process are seen at once. What a
//! listing cannot show is an id whose figure changed: an expansion, or an
//! object deleted and made again under the same id (its directory may even
//! get the same inode number back). Both replace `.capacity.gen` after their
//! change, and a process that finds that file's stamp changed reads every
//! figure again. Promises are read before the generation, so an expansion in
//! progress is counted either by its promise or by its new size, never by
//! neither.

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustix::fs::FileType;

use super::error::io_error;
use super::room::{snapshot_counts, Need, Usage};
use super::store::{self, Kind, Stamp};
use super::{Pool, PoolError};
use crate::sys::fs as sysfs;
use crate::sys::lock::{self, LockKind};
use crate::sys::untrusted::{self, WalkBounds, Walked};
use crate::volume::meta::{SnapshotMeta, VolumeMeta};

/// How long a creation waits for another process's capacity check: those
/// hold the lock for a directory scan, never for slow work.
const CAPACITY_LOCK_WAIT: Duration = Duration::from_secs(2);

/// The file every expansion replaces (see the module documentation).
const GENERATION: &str = ".capacity.gen";

/// Bytes the data of the volume or snapshot in `dir` has allocated on the
/// pool filesystem: its image's `st_blocks` x 512; for a btrfs subvolume
/// (`subvolumes`), the bytes its qgroup references, which the kernel keeps
/// and no walk needs to count; for a plain directory volume or snapshot,
/// its whole `data/` tree ([`tree_allocated`], no deadline). The record and lock files beside the data are not counted.
/// Blocks a reflink shares count in each file that maps them, as
/// `st_blocks` does, so the sum over a pool can exceed what its filesystem
/// has in use.
///
/// For what must be exact and is read once: a snapshot's count (a
/// snapshot never changes) and `filevol pool ls`. The metrics never walk a
/// tree while they answer; see `metrics::dir_usage`.
pub fn allocated(dir: &Path) -> io::Result<u64> {
    let image = dir.join("image");
    match sysfs::symlink_metadata_if_present(&image)? {
        Some(m) if m.is_file() => return Ok(m.blocks().saturating_mul(512)),
        Some(_) => return Ok(0),
        None => {}
    }
    let data = dir.join("data");
    if super::subvolumes::is_subvolume(&data)? {
        match super::subvolumes::usage(&data) {
            Ok(usage) => return Ok(usage.referenced),
            // Quotas turned off since (by hand), or a kernel without the
            // qgroups' sysfs files: the tree walk still counts it.
            Err(e) => log::debug!(
                "{}: qgroup unreadable ({e}); walking the tree",
                data.display()
            ),
        }
    }
    Ok(tree_allocated(&data, WalkBounds::WHOLE)?.bytes)
}

/// What a directory tree has allocated, and what the walk left out.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TreeUsage {
    /// Bytes counted: every file, directory and symlink the walk visited,
    /// the root included; a lower bound unless `walked` is complete.
    pub bytes: u64,
    /// What the walk did not visit.
    pub walked: Walked,
}

/// Bytes allocated by the directory tree at `data` (the data of a
/// directory volume or snapshot): `st_blocks` x 512 of the root and of
/// everything below it, a file with several links once, within `bounds`.
///
/// The tree is the pod's to change while it is walked, so it is walked
/// through descriptors ([`untrusted::walk`]): never following a symlink,
/// never leaving the tree or its mount, reading directories in fixed-size
/// pieces. Memory stays bounded whatever the tree holds: one piece and one
/// descriptor per level, and at most [`LINKED_REMEMBERED`] files with
/// several links remembered (see `Linked`). A tree that is gone counts
/// as nothing.
pub fn tree_allocated(data: &Path, bounds: WalkBounds<'_>) -> io::Result<TreeUsage> {
    let root = match untrusted::open_root(data) {
        Ok(fd) => fd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(TreeUsage::default()),
        Err(e) => return Err(e),
    };
    let mut bytes = block_bytes(&rustix::fs::fstat(&root)?);
    let mut linked = Linked::default();
    let walked = untrusted::walk(root.as_fd(), bounds, &mut |entry| {
        let st = entry.stat();
        let counted = if entry.kind() != FileType::Directory && st.st_nlink > 1 {
            linked.bytes(st)
        } else {
            block_bytes(st)
        };
        bytes = bytes.saturating_add(counted);
    })?;
    Ok(TreeUsage { bytes, walked })
}

/// Files with several links a walk remembers by (device, inode), so that
/// each counts once: about 20 bytes each, so at most 350 KiB.
pub const LINKED_REMEMBERED: usize = 16 * 1024;

/// The files with several links seen so far in one walk.
#[derive(Debug)]
struct Linked {
    seen: HashSet<(u64, u64)>,
    /// How many it may remember: [`LINKED_REMEMBERED`].
    cap: usize,
}

impl Default for Linked {
    fn default() -> Linked {
        Linked {
            seen: HashSet::new(),
            cap: LINKED_REMEMBERED,
        }
    }
}

impl Linked {
    /// What a link to a file with several links counts for. A file
    /// remembered counts in full at its first link and nothing at the
    /// others. Once [`LINKED_REMEMBERED`] files are remembered, a file not
    /// among them counts its share at each link (its bytes divided by its
    /// link count): a file whose links are all in the tree (a pod can only
    /// link within its volume) then still adds up to its bytes, give or
    /// take the rounding, and a pod making millions of links cannot make
    /// the walk remember millions of files.
    fn bytes(&mut self, st: &rustix::fs::Stat) -> u64 {
        let key = (st.st_dev, st.st_ino);
        if self.seen.contains(&key) {
            return 0;
        }
        if self.seen.len() < self.cap {
            self.seen.insert(key);
            return block_bytes(st);
        }
        // st_nlink is a u64 on x86_64 but a u32 on some architectures.
        #[allow(clippy::useless_conversion)]
        let links = u64::from(st.st_nlink).max(1);
        block_bytes(st) / links
    }
}

fn block_bytes(st: &rustix::fs::Stat) -> u64 {
    // st_blocks is never negative; 512-byte units whatever the block size.
    u64::try_from(st.st_blocks).unwrap_or(0).saturating_mul(512)
}

/// Bytes allocated by the data of the pool's volumes and snapshots, as the
/// metrics read them at every scrape ([`Pool::allocation`]): one `stat` per
/// object, never a walk of a tree.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Allocation {
    /// By volumes' images. Directory volumes are not in it: their trees
    /// are measured off the scrape (`metrics::dir_usage`).
    pub volume_images: u64,
    /// By snapshots: images read now, directory snapshots as counted for
    /// capacity (their whole tree, walked once: a snapshot never changes).
    pub snapshots: u64,
}

/// Figures this process has read, valid while `.capacity.gen` is
/// unchanged: by id, the figure and the pass that last saw the id listed.
#[derive(Debug, Default)]
pub(super) struct SizeCache {
    generation: Option<Stamp>,
    epoch: u64,
    /// Capacities of volumes.
    volumes: HashMap<String, Sized>,
    /// What snapshots count as.
    snapshots: HashMap<String, Sized>,
}

#[derive(Debug, Clone, Copy)]
pub(super) struct Sized {
    bytes: u64,
    seen: u64,
}

/// Capacity held for a creation in progress; released when dropped.
#[derive(Debug)]
pub(super) struct Promise {
    path: PathBuf,
}

impl Drop for Promise {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.path) {
            log::warn!("release promise {}: {e}", self.path.display());
        }
    }
}

/// The bytes a promise file holds, from its name.
fn promised_bytes(name: &str) -> Option<u64> {
    name.strip_prefix("promise-")?
        .split('-')
        .next()?
        .parse()
        .ok()
}

/// Counts of what the pool holds and the bytes they count for.
struct Committed {
    volumes: usize,
    volume_bytes: u64,
    snapshots: usize,
    snapshot_bytes: u64,
}

impl Pool {
    /// Bytes the pool can still promise to new volumes ([`Usage::room`]).
    /// Thin volumes take no space when created, so free space is not the
    /// bound up to a ratio of 1; preallocation and copies that meet a full
    /// filesystem fail with ENOSPC and are rolled back. At ratio 1.0 the
    /// pool can write every byte it promised.
    pub fn capacity(&self) -> Result<u64, PoolError> {
        Ok(self.usage()?.room())
    }

    /// The figures capacity is made of, read now.
    pub fn usage(&self) -> Result<Usage, PoolError> {
        let space = sysfs::space(&self.root).map_err(io_error("statvfs", &self.root))?;
        // Promises first: see the module documentation.
        let in_progress = self.promised()?;
        let c = self.committed()?;
        let templates = self.templates_held()?;
        Ok(Usage {
            fs_size: space.total,
            fs_free: space.available,
            reserve: self.opts.reserve_bytes,
            overcommit: self.opts.overcommit,
            volumes: c.volumes,
            volume_bytes: c.volume_bytes,
            snapshots: c.snapshots,
            snapshot_bytes: c.snapshot_bytes,
            templates: templates.count,
            template_bytes: templates.bytes,
            in_progress,
        })
    }

    /// Bytes allocated by the volumes' images and by the snapshots, for
    /// the metrics: a `stat` per object, and for a directory snapshot the
    /// figure [`Pool::usage`] counted it for (read once per process), so
    /// nothing here grows with what a pod wrote. An object that cannot be
    /// read counts as nothing.
    pub fn allocation(&self) -> Result<Allocation, PoolError> {
        let mut total = Allocation::default();
        self.store.each_id(Kind::Volume, |id| {
            total.volume_images = total
                .volume_images
                .saturating_add(image_blocks(&self.image_path(id)).unwrap_or(0));
        })?;
        // Directory snapshots' counts are those usage() keeps; read it
        // first so that a snapshot made since the last one is in the cache.
        self.committed()?;
        let cache = self.sizes.lock();
        self.store.each_id(Kind::Snapshot, |id| {
            let image = self.snapshot_dir(id).join("image");
            let bytes = match image_blocks(&image) {
                Some(bytes) => bytes,
                None => cache.snapshots.get(id).map_or(0, |s| s.bytes),
            };
            total.snapshots = total.snapshots.saturating_add(bytes);
        })?;
        Ok(total)
    }

    /// The directory volumes of the pool: those with a `data/` tree and no
    /// image. One `stat` each.
    pub fn dir_volume_ids(&self) -> Result<Vec<String>, PoolError> {
        let mut ids = Vec::new();
        self.store.each_id(Kind::Volume, |id| {
            let is_dir = std::fs::symlink_metadata(self.data_path(id)).is_ok_and(|m| m.is_dir());
            if is_dir && image_blocks(&self.image_path(id)).is_none() {
                ids.push(id.to_owned());
            }
        })?;
        Ok(ids)
    }

    /// What the pool holds and what it counts for. A record that cannot be
    /// read counts as nothing (and is reported by the listings).
    fn committed(&self) -> Result<Committed, PoolError> {
        let generation = store::stamp(&self.root.join(GENERATION))?;
        let mut cache = self.sizes.lock();
        if cache.generation != generation {
            cache.volumes.clear();
            cache.snapshots.clear();
            cache.generation = generation;
        }
        cache.epoch = cache.epoch.wrapping_add(1);
        let epoch = cache.epoch;
        let (mut volume_bytes, mut snapshot_bytes) = (0u64, 0u64);
        let SizeCache {
            volumes: vcache,
            snapshots: scache,
            ..
        } = &mut *cache;
        let volumes = self.store.each_id(Kind::Volume, |id| {
            volume_bytes = volume_bytes.saturating_add(size_of(vcache, id, epoch, || {
                Some(self.store.load::<VolumeMeta>(id)?.ok()?.capacity_bytes)
            }));
        })?;
        let snapshots = self.store.each_id(Kind::Snapshot, |id| {
            snapshot_bytes = snapshot_bytes.saturating_add(size_of(scache, id, epoch, || {
                let meta = self.store.load::<SnapshotMeta>(id)?.ok()?;
                // A snapshot enters the pool whole (one rename of a finished
                // copy), so what it has allocated when first seen is final.
                let dir = self.snapshot_dir(id);
                match allocated(&dir) {
                    Ok(bytes) => Some(snapshot_counts(&meta, bytes)),
                    Err(e) => {
                        log::warn!("snapshot {id}: allocated bytes of {}: {e}", dir.display());
                        None
                    }
                }
            }));
        })?;
        // Forget what is gone (not seen in this pass).
        if vcache.len() > volumes {
            vcache.retain(|_, s| s.seen == epoch);
        }
        if scache.len() > snapshots {
            scache.retain(|_, s| s.seen == epoch);
        }
        Ok(Committed {
            volumes,
            volume_bytes,
            snapshots,
            snapshot_bytes,
        })
    }

    /// Tells every process to read the sizes again: after an expansion's
    /// record is replaced (before its promise is let go), after a delete (the
    /// id may come back with another size), and at every janitor pass.
    pub(super) fn sizes_changed(&self) -> Result<(), PoolError> {
        let path = self.root.join(GENERATION);
        sysfs::replace_volatile(&path, b"").map_err(io_error("write", path))
    }

    /// Bytes promised by creations in progress in every live instance.
    fn promised(&self) -> Result<u64, PoolError> {
        let base = self.scratch.base();
        let mut total = 0u64;
        for entry in std::fs::read_dir(base).map_err(io_error("read directory", base))? {
            let entry = entry.map_err(io_error("read directory", base))?;
            let Ok(instance) = entry.file_name().into_string() else {
                continue;
            };
            // An instance whose lock cannot be looked at may be alive: its
            // promises are not dropped from the sum, the sum fails.
            if instance.ends_with(".lock") || !self.scratch.is_alive(&instance)? {
                continue;
            }
            let path = entry.path();
            let dir = match std::fs::read_dir(&path) {
                Ok(dir) => dir,
                // It stopped meanwhile, and its scratch went.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_error("read directory", &path)(e)),
            };
            for item in dir {
                let item = item.map_err(io_error("read directory", &path))?;
                if let Some(bytes) = item.file_name().to_str().and_then(promised_bytes) {
                    total = total.saturating_add(bytes);
                }
            }
        }
        Ok(total)
    }

    /// Holds `bytes` of capacity until the returned promise is dropped, or
    /// fails with [`PoolError::Exhausted`].
    pub(super) fn promise(&self, bytes: u64) -> Result<Promise, PoolError> {
        let path = self.root.join(".capacity.lock");
        let lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io_error("open", &path))?;
        if !lock::try_lock_for(&lock, LockKind::Exclusive, CAPACITY_LOCK_WAIT)
            .map_err(io_error("lock", &path))?
        {
            return Err(PoolError::Busy {
                kind: "pool",
                id: "capacity".into(),
            });
        }
        let usage = self.usage()?;
        if bytes > usage.room() {
            return Err(PoolError::exhausted(Need::Capacity(bytes), usage));
        }
        let promise = self.scratch.new_path(&format!("promise-{bytes}"));
        // The name carries the amount; an empty file is all it takes.
        let _ = File::create(&promise).map_err(io_error("create", &promise))?;
        drop(lock);
        Ok(Promise { path: promise })
    }
}

/// `st_blocks` x 512 of the image at `path`, if there is one.
fn image_blocks(path: &Path) -> Option<u64> {
    std::fs::symlink_metadata(path)
        .ok()
        .filter(|m| m.is_file())
        .map(|m| m.blocks().saturating_mul(512))
}

/// The size of `id` from `cache`, else from `read` (a record that cannot be
/// read counts as nothing and is not remembered); marks it seen in `epoch`.
/// Listing 10,000 ids costs a hash lookup each, no allocation.
fn size_of(
    cache: &mut HashMap<String, Sized>,
    id: &str,
    epoch: u64,
    read: impl FnOnce() -> Option<u64>,
) -> u64 {
    if let Some(s) = cache.get_mut(id) {
        s.seen = epoch;
        return s.bytes;
    }
    match read() {
        Some(bytes) => {
            cache.insert(id.to_owned(), Sized { bytes, seen: epoch });
            bytes
        }
        None => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linked_files_count_once_remembered_or_not() {
        let dir = tempfile::tempdir().unwrap();
        let mut links = Vec::new();
        for i in 0..5 {
            let first = dir.path().join(format!("f{i}"));
            std::fs::write(&first, vec![1u8; 12 << 10]).unwrap();
            for j in 1..2 {
                let other = dir.path().join(format!("f{i}-{j}"));
                std::fs::hard_link(&first, &other).unwrap();
                links.push(other);
            }
            links.push(first);
        }
        let stats: Vec<_> = links
            .iter()
            .map(|p| rustix::fs::lstat(p).unwrap())
            .collect();
        // Two links each: a share is exact (blocks are 512 bytes).
        let whole: u64 = stats.iter().map(block_bytes).sum::<u64>() / 2;
        // Two files remembered, three counted by their half at each link:
        // the same total as remembering them all.
        let mut linked = Linked {
            seen: HashSet::new(),
            cap: 2,
        };
        let counted: u64 = stats.iter().map(|st| linked.bytes(st)).sum();
        assert_eq!(linked.seen.len(), 2);
        assert_eq!(counted, whole);
        let mut all = Linked::default();
        assert_eq!(stats.iter().map(|st| all.bytes(st)).sum::<u64>(), whole);
    }

    #[test]
    fn a_tree_walk_counts_what_du_counts_and_says_what_it_left_out() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir_all(data.join("a/b")).unwrap();
        std::fs::write(data.join("a/b/f"), vec![1u8; 64 << 10]).unwrap();
        std::os::unix::fs::symlink("/", data.join("root")).unwrap();
        let whole = tree_allocated(&data, WalkBounds::WHOLE).unwrap();
        assert!(whole.walked.complete());
        let du: u64 = ["", "a", "a/b", "a/b/f", "root"]
            .iter()
            .map(|p| block_bytes(&rustix::fs::lstat(data.join(p)).unwrap()))
            .sum();
        assert_eq!(whole.bytes, du);
        let shallow = WalkBounds {
            max_depth: 1,
            ..WalkBounds::WHOLE
        };
        let part = tree_allocated(&data, shallow).unwrap();
        assert_eq!(part.walked.not_entered, 1);
        assert!(part.bytes < whole.bytes);
        let gone = tree_allocated(&dir.path().join("missing"), WalkBounds::WHOLE).unwrap();
        assert_eq!(gone, TreeUsage::default());
    }

    #[test]
    fn promise_files_name_their_bytes() {
        assert_eq!(promised_bytes("promise-1048576-3"), Some(1 << 20));
        assert_eq!(promised_bytes("promise-0-0"), Some(0));
        assert_eq!(promised_bytes("volume-3"), None);
        assert_eq!(promised_bytes("promise-x-3"), None);
    }
}
