//! Capacity: what the pool may still promise to new volumes.
//!
//! Room is the usable size (total less the reserve) times the overcommit
//! ratio, less the capacity of every volume and snapshot in the pool, less
//! what creations in progress have been promised. Any process may be
//! creating (controller replicas, node plugins making ephemeral volumes), so
//! promises live in the pool too: a creation holds an empty file
//! `.scratch/<instance>/promise-<bytes>-<n>` until its volume is committed,
//! and every process counts the promises of instances that are alive (their
//! scratch lock is held; a dead instance's promises are void). Checking the
//! room and writing the promise happen under `.capacity.lock`, held only for
//! that arithmetic, never across the creation itself, so two processes
//! cannot both take the last free space.
//!
//! Summing the capacity of 10,000 volumes must not cost 10,000 file reads
//! per CreateVolume. Each process keeps the sizes it has read, by id; the
//! ids come from listing the directories on every call, so creations and
//! deletions by any process are seen at once. What a listing cannot show is
//! an id whose size changed: an expansion, or an object deleted and made
//! again under the same id (its directory may even get the same inode
//! number back). Both replace `.capacity.gen` after their change, and a
//! process that finds that file's stamp changed reads every size again.
//! Promises are read before the generation, so an expansion in progress is
//! counted either by its promise or by its new size, never by neither.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::path::PathBuf;
use std::time::Duration;

use super::error::io_error;
use super::meta::{SnapshotMeta, VolumeMeta};
use super::store::{self, Kind, Stamp};
use super::{Pool, PoolError};
use crate::sys::fs as sysfs;
use crate::sys::lock::{self, LockKind};

/// How long a creation waits for another process's capacity check: those
/// hold the lock for a directory scan, never for slow work.
const CAPACITY_LOCK_WAIT: Duration = Duration::from_secs(2);

/// The file every expansion replaces (see the module documentation).
const GENERATION: &str = ".capacity.gen";

/// Sizes this process has read, valid while `.capacity.gen` is unchanged:
/// by id, the size and the pass that last saw the id listed.
#[derive(Debug, Default)]
pub(super) struct SizeCache {
    generation: Option<Stamp>,
    epoch: u64,
    volumes: HashMap<String, Sized>,
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

impl Pool {
    /// Bytes the pool can still promise to new volumes. Thin volumes take no
    /// space when created, so free space is not the bound; preallocation
    /// and copies that meet a full filesystem fail with ENOSPC and are
    /// rolled back. At ratio 1.0 the pool can write every byte it promised.
    /// Snapshots count at their full size because a reflinked copy grows
    /// toward it as its source diverges.
    pub fn capacity(&self) -> Result<u64, PoolError> {
        self.room()
    }

    fn room(&self) -> Result<u64, PoolError> {
        let space = sysfs::space(&self.root).map_err(io_error("statvfs", &self.root))?;
        // Promises first: see the module documentation.
        let promised = self.promised()?;
        let (_, _, volumes, snapshots) = self.committed()?;
        let usable = space.total.saturating_sub(self.opts.reserve_bytes);
        // A float product: overcommit is a ratio. `as` saturates (and maps
        // NaN to 0), and config refuses a negative ratio.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let promisable = (usable as f64 * self.opts.overcommit) as u64;
        Ok(promisable.saturating_sub(volumes.saturating_add(snapshots).saturating_add(promised)))
    }

    /// (volumes, snapshots, bytes of volumes, bytes of snapshots) committed.
    /// A record that cannot be read counts as nothing (and is reported by
    /// the listings).
    fn committed(&self) -> Result<(usize, usize, u64, u64), PoolError> {
        let generation = store::stamp(&self.root.join(GENERATION));
        let mut cache = self.sizes.lock();
        if cache.generation != generation {
            cache.volumes.clear();
            cache.snapshots.clear();
            cache.generation = generation;
        }
        cache.epoch = cache.epoch.wrapping_add(1);
        let epoch = cache.epoch;
        let (mut volumes, mut snapshots) = (0u64, 0u64);
        let SizeCache {
            volumes: vcache,
            snapshots: scache,
            ..
        } = &mut *cache;
        let nv = self.store.each_id(Kind::Volume, |id| {
            volumes = volumes.saturating_add(size_of(vcache, id, epoch, || {
                Some(self.store.load::<VolumeMeta>(id)?.ok()?.capacity_bytes)
            }));
        })?;
        let ns = self.store.each_id(Kind::Snapshot, |id| {
            snapshots = snapshots.saturating_add(size_of(scache, id, epoch, || {
                Some(self.store.load::<SnapshotMeta>(id)?.ok()?.size_bytes)
            }));
        })?;
        // Forget what is gone (not seen in this pass).
        if vcache.len() > nv {
            vcache.retain(|_, s| s.seen == epoch);
        }
        if scache.len() > ns {
            scache.retain(|_, s| s.seen == epoch);
        }
        Ok((nv, ns, volumes, snapshots))
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
            if instance.ends_with(".lock") || !self.scratch.is_alive(&instance) {
                continue;
            }
            let Ok(dir) = std::fs::read_dir(entry.path()) else {
                continue;
            };
            for item in dir.flatten() {
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
        let available = self.room()?;
        if bytes > available {
            return Err(PoolError::Exhausted {
                requested: bytes,
                available,
            });
        }
        let promise = self.scratch.new_path(&format!("promise-{bytes}"));
        // The name carries the amount; an empty file is all it takes.
        let _ = File::create(&promise).map_err(io_error("create", &promise))?;
        drop(lock);
        Ok(Promise { path: promise })
    }

    /// Volumes, snapshots, and bytes promised to volumes, for metrics and
    /// reports.
    pub fn usage(&self) -> Result<(usize, usize, u64), PoolError> {
        let (volumes, snapshots, provisioned, _) = self.committed()?;
        Ok((volumes, snapshots, provisioned))
    }
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
    fn promise_files_name_their_bytes() {
        assert_eq!(promised_bytes("promise-1048576-3"), Some(1 << 20));
        assert_eq!(promised_bytes("promise-0-0"), Some(0));
        assert_eq!(promised_bytes("volume-3"), None);
        assert_eq!(promised_bytes("promise-x-3"), None);
    }
}
