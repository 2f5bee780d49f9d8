//! The pool: a directory that holds every volume, snapshot and record, and
//! the only truth about them. Any number of filevol processes share one
//! pool: controller replicas, node plugins on the same host, and on a
//! shared filesystem the plugins of every node.
//!
//! ```text
//! <pool>/volumes/<id>/meta.json   VolumeMeta (the record)
//! <pool>/volumes/<id>/lock        object lock: serialises mutations
//! <pool>/volumes/<id>/fence       held by node plugins while staged
//! <pool>/volumes/<id>/image       image layout: the sparse image
//! <pool>/volumes/<id>/data/       dir layout: the directory (on btrfs,
//!                                 a subvolume: see `subvolumes`)
//! <pool>/snapshots/<id>/...       the same, for snapshots
//! <pool>/groups/<id>.json         group snapshots (and <id>.lock)
//! <pool>/nodes/<node>.json        node plugins serving this pool
//! <pool>/attachments/<volume>@<created>@<node>@<mode>@<rw|ro>
//!                                 ControllerPublish records (empty files)
//! <pool>/templates/<fs>-<bytes>-<recipe>  formatted filesystems that new
//!                                 volumes start as copies of (see
//!                                 `node::template`); no volume's data;
//!                                 counted in capacity, at most
//!                                 [`MAX_TEMPLATES`] (see [`templates`])
//! <pool>/freezes/<group>.json    a group snapshot's freeze request, and
//!                                 the nodes' answers (see [`freeze`])
//! <pool>/.capacity.lock           held while capacity is promised
//! <pool>/.scratch/<instance>/     work in progress of one running process
//! ```
//!
//! The modules follow the objects: [`store`] is the one place records are
//! read, written and locked (and says why each rule holds across hosts);
//! `volumes`, `snapshots` (and groups), [`attachments`] and [`capacity`] (with
//! [`room`], its arithmetic)
//! are the operations; [`block_maps`] is what changed-block tracking reads
//! of snapshots; `janitor` is the start-up clean-up, which only a
//! controller runs; [`lock_reach`] says whether the pool's locks reach
//! other hosts, which a shared pool needs.
//!
//! Crash safety comes from one rule: an object is built whole in the
//! process's scratch directory and enters `volumes/` or `snapshots/` by a
//! single rename (then the parent directory is fsynced); it leaves the same
//! way, renamed into scratch before it is removed. A crash at any point
//! leaves each object whole or absent, plus scratch debris that a
//! controller removes once the process that left it is gone.

pub mod attachments;
pub mod block_maps;
pub mod capability;
pub mod capacity;
pub mod copy;
pub mod error;
pub mod freeze;
pub mod health;
pub mod lock_reach;
pub mod new_volume;
pub mod room;
pub mod store;
pub mod subvolumes;
pub mod templates;

mod janitor;
mod scratch;
mod snapshots;
mod volumes;

pub use templates::{MAX_TEMPLATES, TEMPLATE_IDLE};
pub use volumes::ImageLock;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::volume::meta::{self, AccessMode, AccessType, FsType, Layout, Source};
use error::io_error;
pub use error::PoolError;
use scratch::Scratch;
use store::{Kind, Store};

use crate::faults::crash_point;
use crate::sys::fs as sysfs;

pub use snapshots::check_members;

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
    /// Whether this process cleans up what dead processes left (the
    /// controller, or `--mode all`). Node plugins never do: one process kind
    /// decides, so a node restarting cannot remove what a controller is
    /// still making.
    pub janitor: bool,
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

/// A volume as a listing sees it: its record, or why it cannot be read.
pub type VolumeEntry = store::Entry<meta::VolumeMeta>;

/// One page of a listing: (id, item) pairs and the id to continue from.
pub type Page<T> = (Vec<(String, T)>, Option<String>);

/// An open pool.
#[derive(Debug)]
pub struct Pool {
    root: PathBuf,
    /// `root` with symlinks resolved, once at open: the mount table names
    /// paths that way, and resolving it per call costs a readlink per name.
    resolved_root: PathBuf,
    opts: PoolOptions,
    store: Store,
    scratch: Scratch,
    /// Whether SEEK_DATA on the pool filesystem tells holes from data.
    reports_holes: bool,
    /// Whether the pool filesystem can reflink (instant, atomic copies).
    reflinks: bool,
    /// Sizes read for capacity (see `capacity`).
    sizes: parking_lot::Mutex<capacity::SizeCache>,
}

/// Whether this process can use the pool directory at `root` now: read,
/// write and search it. access(2) reports EROFS for a read-only mount even
/// to root and needs no write to the pool, so asking costs no I/O (Probe
/// asks at every call).
pub fn usable(root: &Path) -> Result<(), String> {
    use rustix::fs::Access;
    rustix::fs::access(root, Access::READ_OK | Access::WRITE_OK | Access::EXEC_OK).map_err(|e| {
        format!(
            "pool {} is not readable and writable: {}",
            root.display(),
            std::io::Error::from(e)
        )
    })
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn now_ts() -> (i64, i32) {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    (
        i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        // Below 10^9, so it fits.
        i32::try_from(d.subsec_nanos()).unwrap_or(0),
    )
}

/// `bytes` rounded up to [`ALIGN`], as a new volume's size is.
pub(crate) fn align_up(bytes: u64) -> u64 {
    bytes.div_ceil(ALIGN).saturating_mul(ALIGN)
}

impl Pool {
    /// Opens the pool at `root`: creates its directories and this process's
    /// scratch, and (a janitor only) cleans up after processes that died.
    pub fn open(root: &Path, opts: PoolOptions) -> Result<Pool, PoolError> {
        std::fs::create_dir_all(root).map_err(io_error("create", root))?;
        let mut made = false;
        for dir in [
            "volumes",
            "snapshots",
            "groups",
            "nodes",
            attachments::DIR,
            "templates",
            freeze::DIR,
        ] {
            let p = root.join(dir);
            match std::fs::create_dir(&p) {
                Ok(()) => made = true,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io_error("create", &p)(e)),
            }
        }
        // Records are made durable by fsyncing the directory that holds
        // them (`attachments/` has nothing else to make it so), which
        // assumes the directory itself is: make a new one durable once.
        if made {
            sysfs::fsync_dir(root).map_err(io_error("sync", root))?;
        }
        let scratch = Scratch::open(&root.join(".scratch"))?;
        let reports_holes = scratch.reports_holes()?;
        if !reports_holes {
            log::info!(
                "pool {}: the filesystem does not report holes (SEEK_DATA); blank volumes are told by the pool's records and the signature probe",
                root.display()
            );
        }
        // A probe that cannot run (an odd error from a network or FUSE
        // filesystem) must not keep a node plugin from starting: the pool
        // is then taken as one that cannot reflink, which only withholds
        // group snapshots.
        let reflinks = sysfs::probe_reflink(
            &scratch.new_path("reflink-a"),
            &scratch.new_path("reflink-b"),
        )
        .unwrap_or_else(|e| {
            log::warn!(
                "pool {}: could not tell whether the filesystem can reflink ({e}); taking it as one that cannot (no group snapshots)",
                root.display()
            );
            false
        });
        let resolved_root = root.canonicalize().map_err(io_error("resolve", root))?;
        let pool = Pool {
            root: root.to_owned(),
            resolved_root,
            opts,
            store: Store::new(root),
            scratch,
            reports_holes,
            reflinks,
            sizes: Default::default(),
        };
        if pool.opts.janitor {
            janitor::run(&pool)?;
        }
        Ok(pool)
    }

    /// Cleans up what dead processes left (see `janitor`); a controller does
    /// it at start and then periodically, so a node plugin that keeps dying
    /// does not fill the pool with its scratch. Only for janitor processes.
    pub fn clean_up(&self) -> Result<(), PoolError> {
        if self.opts.janitor {
            janitor::run(self)?;
        }
        Ok(())
    }

    /// Whether the pool filesystem can reflink: snapshots and clones are
    /// instant and atomic, and group snapshots are possible.
    pub fn reflinks(&self) -> bool {
        self.reflinks
    }

    /// The pool directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The pool directory with symlinks resolved (as when the pool opened).
    pub fn resolved_root(&self) -> &Path {
        &self.resolved_root
    }

    /// The topology segment of this pool's volumes.
    pub fn topology(&self) -> &BTreeMap<String, String> {
        &self.opts.topology
    }

    /// Whether SEEK_DATA on the pool filesystem tells holes from data (it
    /// does not on FUSE filesystems or NFS before 4.2, which report a sparse
    /// file as all data).
    pub fn reports_holes(&self) -> bool {
        self.reports_holes
    }

    /// The store of records and locks.
    pub fn store(&self) -> &Store {
        &self.store
    }

    fn volume_dir(&self, id: &str) -> PathBuf {
        self.store.object_dir(Kind::Volume, id)
    }

    fn snapshot_dir(&self, id: &str) -> PathBuf {
        self.store.object_dir(Kind::Snapshot, id)
    }

    fn group_file(&self, id: &str) -> PathBuf {
        self.root.join("groups").join(format!("{id}.json"))
    }

    /// The image file of an `image` volume.
    pub fn image_path(&self, id: &str) -> PathBuf {
        self.volume_dir(id).join("image")
    }

    /// The fence file of a volume (see [`store`]): what node plugins lock
    /// while a stage lasts, and what a directory volume's fence device
    /// serves (`node::stage`).
    pub fn fence_path(&self, id: &str) -> PathBuf {
        self.volume_dir(id).join(store::FENCE)
    }

    /// The formatted template named `name` (see `node::template`).
    pub fn template_path(&self, name: &str) -> PathBuf {
        self.root.join("templates").join(name)
    }

    /// The directory of a `dir` volume.
    pub fn data_path(&self, id: &str) -> PathBuf {
        self.volume_dir(id).join("data")
    }

    /// A fresh path in this process's scratch directory (not created).
    pub fn scratch_path(&self, what: &str) -> PathBuf {
        self.scratch.new_path(what)
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
        if let Err(e) = subvolumes::remove_object(&trash) {
            // The object is already gone from the pool; a controller clears
            // the debris once this process is gone.
            log::warn!("remove {}: {e}", trash.display());
        }
        Ok(())
    }

    /// Renames a finished object from scratch into the pool and makes the
    /// rename durable. `Ok(false)` when another process committed an object
    /// with the same id first: a rename onto an existing directory that is
    /// not empty fails (every object has its record), so of two creators
    /// exactly one wins, on a local filesystem and on NFS alike.
    ///
    /// Only the parent is fsynced. The entries and sizes inside `built` were
    /// created before the rename, and the filesystems a pool lives on order
    /// metadata: xfs and ext4 journal it in sequence (forcing the journal
    /// for the rename forces what came before), NFS servers commit metadata
    /// operations before answering. File *data* is not ordered that way, so
    /// every file with content (meta.json, copied or preallocated images) is
    /// fsynced when written. Should a filesystem still lose an image's size,
    /// a controller's start extends it back (see `janitor`): growing a
    /// sparse file loses nothing.
    fn commit(&self, built: &Path, dest: &Path) -> Result<bool, PoolError> {
        match std::fs::rename(built, dest) {
            Ok(()) => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTEMPTY) | Some(libc::EEXIST)) => {
                return Ok(false)
            }
            Err(e) => return Err(io_error("move into the pool", dest)(e)),
        }
        let parent = dest.parent().expect("pool objects have a parent");
        sysfs::fsync_dir(parent).map_err(io_error("sync", parent))?;
        Ok(true)
    }
}

/// Removes a half-built object from scratch after a failure. The failure is
/// what the caller reports; a leftover is only debris for the janitor.
fn remove_built(path: &Path) {
    if let Err(e) = subvolumes::remove_object(path) {
        if e.kind() != std::io::ErrorKind::NotFound {
            log::warn!("remove {}: {e}", path.display());
        }
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

/// One page of sorted ids: those from `start` (inclusive), loaded and kept
/// by `load`, at most `max` (0: all), and the id to continue from.
fn page<T>(
    ids: &[String],
    start: Option<&str>,
    max: usize,
    mut load: impl FnMut(&str) -> Option<T>,
) -> Page<T> {
    let from = start.map_or(0, |s| ids.partition_point(|id| id.as_str() < s));
    let limit = if max == 0 { usize::MAX } else { max };
    let mut items = Vec::new();
    for id in &ids[from..] {
        let Some(item) = load(id) else { continue };
        if items.len() == limit {
            return (items, Some(id.clone()));
        }
        items.push((id.clone(), item));
    }
    (items, None)
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_btrfs;

#[cfg(test)]
mod page_tests {
    use super::*;

    #[test]
    fn pages_resume_at_the_cursor_and_filter() {
        let ids: Vec<String> = (0..10).map(|i| format!("v{i:02}")).collect();
        let all = |id: &str| Some(id.to_owned());
        let (first, next) = page(&ids, None, 4, all);
        assert_eq!(first.len(), 4);
        assert_eq!(next.as_deref(), Some("v04"));
        let (rest, next) = page(&ids, next.as_deref(), 0, all);
        assert_eq!(rest.len(), 6);
        assert_eq!(next, None);
        let even = |id: &str| {
            let n: u32 = id[1..].parse().unwrap();
            (n % 2 == 0).then_some(n)
        };
        let (evens, next) = page(&ids, None, 0, even);
        assert_eq!(evens.len(), 5);
        assert_eq!(next, None);
        // The continuation is the next entry that is *kept*.
        let (two, next) = page(&ids, None, 2, even);
        assert_eq!(two.len(), 2);
        assert_eq!(next.as_deref(), Some("v04"));
        // A cursor whose entry was deleted meanwhile resumes after it.
        let (after, _) = page(&ids, Some("v03x"), 1, all);
        assert_eq!(after[0].0, "v04");
        // An exact page: nothing to continue from.
        let (ten, next) = page(&ids, None, 10, all);
        assert_eq!((ten.len(), next), (10, None));
    }

    #[test]
    fn sizes_round_up_to_whole_mib() {
        assert_eq!(align_up(1), ALIGN);
        assert_eq!(align_up(ALIGN), ALIGN);
        assert_eq!(align_up(5 * ALIGN + 1), 6 * ALIGN);
        // The largest size a CSI request can carry (int64) still rounds.
        assert_eq!(align_up(i64::MAX as u64), 1 << 63);
    }
}
