//! The node side: stage (attach, probe, format only when blank, mount),
//! publish (bind mounts), unpublish/unstage, stats, expansion, fencing.
//!
//! Where each part lives: `fences` (the locks held per staged volume),
//! `claim` (a stage's fence and device as one guard), `stage`, `publish`,
//! `stats` (stats and expansion), [`trim`] (giving freed space back to the
//! pool), [`ephemeral`] (inline volumes, created
//! and removed by the node with rollback), [`kernel`] (the one seam to the mount,
//! loop and mkfs calls, with a recording fake for the unit tests), `mounts`
//! (what the mount table says of a volume), [`paths`] (staging and target
//! paths, opened safely), `probe` (the signature probe: in-process where the
//! answer is clear, else `blkid`), `format` (`blkid`, mkfs), `template`
//! (new ext4 volumes as copies of a template made once, given their own
//! UUID by `ext4`) and [`mkfs_options`].
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

mod claim;
mod devices;
pub mod ephemeral;
pub mod error;
mod ext4;
#[cfg(test)]
mod fake;
mod fences;
pub mod format;
pub mod kernel;
pub mod mkfs_options;
mod mounts;
pub mod paths;
mod probe;
mod publish;
mod rollback;
mod stage;
mod stats;
mod template;
#[cfg(test)]
mod tests;
pub mod trim;

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use error::sys;
pub use error::NodeError;
use fences::Fences;
use kernel::{Host, Kernel};
use paths::Create;

use crate::pool::meta::{AccessMode, AccessType};
use crate::pool::Pool;
use crate::sys::lock::LockKind;
use crate::sys::mount::MountState;

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

/// Node-side state: the kubelet directory, the fences held, and the kernel
/// the node acts on.
#[derive(Debug)]
pub struct Node {
    kubelet_dir: PathBuf,
    /// Direct I/O on loop devices where the pool allows it.
    direct_io: bool,
    fences: Fences,
    /// Which loop device serves which image.
    devices: devices::DeviceTable,
    kernel: std::sync::Arc<dyn Kernel>,
    /// Keeps trims and stages/unstages of one volume apart.
    gate: trim::Gate,
    /// What trims have done, for the metrics.
    trims: trim::TrimTotals,
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
        Node::with_kernel(kubelet_dir, pool, direct_io, std::sync::Arc::new(Host))
    }

    /// [`Node::start`] acting on `kernel` (the unit tests' fake).
    pub fn with_kernel(
        kubelet_dir: &Path,
        pool: &Pool,
        direct_io: bool,
        kernel: std::sync::Arc<dyn Kernel>,
    ) -> Result<Node, NodeError> {
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
            fences: Fences::default(),
            devices: devices::DeviceTable::default(),
            kernel,
            gate: trim::Gate::default(),
            trims: trim::TrimTotals::default(),
        };
        node.recover(pool)?;
        Ok(node)
    }

    /// The resolved kubelet directory.
    pub fn kubelet_dir(&self) -> &Path {
        &self.kubelet_dir
    }

    /// Re-takes the fence of every volume this host has staged: images
    /// attached to a loop device, directories bind-mounted under the
    /// kubelet directory.
    fn recover(&self, pool: &Pool) -> Result<(), NodeError> {
        let attached = match self.kernel.attached() {
            Ok(a) => a,
            // Without access to loop devices (not root) there is nothing
            // this process could have staged; node calls will fail on their
            // own with the reason.
            Err(e) => {
                log::warn!("cannot list loop devices ({e}); no staged volumes to recover");
                return Ok(());
            }
        };
        // The one scan of every device: from here on the table answers.
        self.devices.fill(&attached);
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
            let Some((bound, _)) = attached
                .iter()
                .find(|(d, b)| *b == (meta.dev(), meta.ino()) && !d.detaching)
            else {
                continue;
            };
            let dev = bound.device;
            let kind = if self.kernel.read_only(dev).unwrap_or(false) {
                LockKind::Shared
            } else {
                LockKind::Exclusive
            };
            match self.fences.take(pool, &id, kind) {
                Ok(_) => log::info!(
                    "volume {id}: found attached to {}, fence re-taken",
                    dev.path().display()
                ),
                Err(e) => log::error!("volume {id}: attached to {} but {e}", dev.path().display()),
            }
        }
        match self.kernel.staged_dirs(pool, &self.kubelet_dir) {
            Ok(ids) => {
                for id in ids {
                    match self.fences.take(pool, &id, LockKind::Shared) {
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

    /// The loop device serving `image` (see `node::devices`).
    fn bound(&self, image: &Path) -> std::io::Result<Option<kernel::Bound>> {
        self.devices.bound(&*self.kernel, image)
    }

    /// Checks a staging or target path from a request.
    pub fn check_path(&self, field: &'static str, path: &str) -> Result<PathBuf, NodeError> {
        paths::under_kubelet(field, path, &self.kubelet_dir)
    }

    /// (staged, published) on this node, decided by what the mount table
    /// holds, not by where it is ([`mounts_by_volume`]): a volume of the
    /// pool with any mount under the kubelet directory is staged, once
    /// (kubelet stages a volume once per node, as a filesystem, as a block
    /// device's bind, or as a directory's bind); every other mount of it
    /// there is a publish, wherever kubelet put the target (block publishes
    /// live under `plugins/kubernetes.io/csi/volumeDevices/`, not `pods/`).
    ///
    /// [`mounts_by_volume`]: Kernel::mounts_by_volume
    pub fn mount_counts(&self, pool: &Pool) -> std::io::Result<(usize, usize)> {
        let by_volume = self.kernel.mounts_by_volume(pool, &self.kubelet_dir)?;
        let staged = by_volume.len();
        let published = by_volume.values().map(|n| n.saturating_sub(1)).sum();
        Ok((staged, published))
    }

    /// The pool's directory volumes bind-mounted under the kubelet
    /// directory (staged or published), from the mount table: those whose
    /// usage a node plugin's metrics measure.
    pub fn staged_dir_volumes(&self, pool: &Pool) -> std::io::Result<Vec<String>> {
        self.kernel.staged_dirs(pool, &self.kubelet_dir)
    }

    fn mount_state(&self, path: &Path) -> Result<MountState, NodeError> {
        self.kernel.mount_state(path).map_err(sys("stat", path))
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
        if !self
            .kernel
            .is_mount_of(root.as_fd(), source)
            .map_err(sys("stat", path))?
        {
            return Err(NodeError::Occupied {
                path: path.to_owned(),
                what: "something other than the mount just made (the path changed)".into(),
            });
        }
        Ok(root)
    }

    fn expect_same_fs(&self, mounted: &Path, source: &Path, what: &str) -> Result<(), NodeError> {
        if self
            .kernel
            .same_filesystem(mounted, source)
            .map_err(sys("stat", mounted))?
        {
            Ok(())
        } else {
            Err(NodeError::Occupied {
                path: mounted.to_owned(),
                what: what.into(),
            })
        }
    }
}
