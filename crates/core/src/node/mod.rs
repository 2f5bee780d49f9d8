//! The node side: stage (attach, probe, format only when blank, mount),
//! publish (bind mounts), unpublish/unstage, stats, expansion, fencing.
//!
//! Where each part lives: `fences` (the pool fences held per staged
//! volume), [`custody`] (who holds each device's fence, checked from the
//! kernel), `devices` (this plugin's loop devices), `claim` (a stage's
//! fence and device as one guard), `stage`, `publish`, `publication`
//! (whether a NodePublishVolume's volume is staged or ephemeral, and the
//! order NodeUnpublishVolume removes an ephemeral one in),
//! `settle` (the journal of a clone or restore replayed once, before its
//! first read-only stage),
//! `stats` (stats and expansion), [`trim`] (giving freed space back to the
//! pool), [`freeze`] (group snapshots' freezes, held by a guardian
//! process), [`ephemeral`] (inline volumes, off unless turned on, created
//! and removed by the node with rollback, within limits), [`kernel`] (the one seam to the mount,
//! loop and mkfs calls, with a recording fake for the unit tests), `mounts`
//! (what the mount table says of a volume), [`paths`] (staging and target
//! paths, opened safely), `probe` (the signature probe: in-process where the
//! answer is clear, else `blkid`), `format` (`blkid`, mkfs), `template`
//! (new ext4 volumes as copies of a template made once, given their own
//! UUID by `ext4`) and [`mkfs_options`](crate::volume::mkfs_options).
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
//! Fencing (see `custody` and `sys::loopdev::attach`): a staged image's
//! fence is its loop device's own OFD lock on the image, exclusive for a
//! writer and shared for a reader, taken on the open file the device is
//! configured with, so it lives exactly as long as the device, whatever
//! happens to this process. A `dir` volume's stage gets a read-only loop
//! device of its fence file for the same reason. While a stage or unstage
//! of a volume runs, and as long as it stays staged, this process also
//! holds the volume's fence file in the pool, which keeps a second node
//! plugin's stage from starting meanwhile. A second node plugin, on this
//! host or another sharing the pool, cannot attach beside the device;
//! DeleteVolume and byte copies need the image's lock, so neither can touch
//! a staged volume. A restarted plugin adopts its devices from the kernel
//! and checks their fences before it serves, and every
//! `--fence-check-interval` after.

mod claim;
pub mod custody;
mod devices;
pub mod ephemeral;
pub mod error;
mod ext4;
#[cfg(test)]
mod fake;
mod fences;
pub mod format;
pub mod freeze;
mod health;
mod in_place;
pub mod kernel;
mod mounts;
pub mod paths;
mod probe;
mod publication;
mod publish;
mod rollback;
mod settle;
mod stage;
mod stats;
mod template;
#[cfg(test)]
mod tests;
pub mod trim;

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use custody::Custody;
use error::sys;
pub use error::NodeError;
use fences::Fences;
use kernel::{Host, Kernel};
use paths::Create;
pub use publication::{Publication, PublishRefused};

use crate::pool::Pool;
use crate::sys::lock::LockKind;
use crate::sys::loopdev;
use crate::sys::mount::MountState;
use crate::volume::meta::{AccessMode, AccessType};

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
    /// This node's id: the name of every loop device it attaches (see
    /// [`loopdev::Owner`]).
    node_id: String,
    /// The owner its devices carry.
    owner: loopdev::Owner,
    /// Direct I/O on loop devices where the pool allows it.
    direct_io: bool,
    fences: Fences,
    /// Who holds the fences of this plugin's devices.
    custody: custody::Custodies,
    /// Which loop device serves which image.
    devices: devices::DeviceTable,
    kernel: std::sync::Arc<dyn Kernel>,
    /// Keeps trims and stages/unstages of one volume apart.
    gate: trim::Gate,
    /// What trims have done, for the metrics.
    trims: trim::TrimTotals,
    /// The freezes held for group snapshots.
    freezes: freeze::Freezes,
    /// Whether ephemeral inline volumes are made here, and how big (None:
    /// they are refused).
    ephemeral: Option<ephemeral::Limits>,
    /// One admission of a new ephemeral volume at a time.
    ephemeral_admission: ephemeral::Admission,
    /// The loop devices' I/O errors from the kernel log (empty unless
    /// [`Node::with_kernel_log`] started following it).
    loop_errors: crate::health::loop_errors::LoopErrors,
}

/// What NodeGetVolumeStats reports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Bytes: total, available, used.
    pub bytes: Option<(u64, u64, u64)>,
    /// Inodes: total, available, used.
    pub inodes: Option<(u64, u64, u64)>,
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
    pub fn start(
        kubelet_dir: &Path,
        node_id: &str,
        pool: &Pool,
        direct_io: bool,
    ) -> Result<Node, NodeError> {
        Node::with_kernel(
            kubelet_dir,
            node_id,
            pool,
            direct_io,
            std::sync::Arc::new(Host),
        )
    }

    /// [`Node::start`] acting on `kernel` (the unit tests' fake).
    pub fn with_kernel(
        kubelet_dir: &Path,
        node_id: &str,
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
            node_id: node_id.to_owned(),
            owner: loopdev::Owner::of_node(node_id),
            direct_io,
            fences: Fences::default(),
            custody: custody::Custodies::default(),
            devices: devices::DeviceTable::of(loopdev::Owner::of_node(node_id)),
            kernel,
            gate: trim::Gate::default(),
            trims: trim::TrimTotals::default(),
            freezes: freeze::Freezes::default(),
            ephemeral: None,
            ephemeral_admission: ephemeral::Admission::default(),
            loop_errors: crate::health::loop_errors::LoopErrors::default(),
        };
        node.recover(pool)?;
        Ok(node)
    }

    /// This node with ephemeral inline volumes made within `limits`, or
    /// refused (`None`, as a node starts: an operator turns them on).
    #[must_use]
    pub fn with_ephemeral(mut self, limits: Option<ephemeral::Limits>) -> Node {
        self.ephemeral = limits;
        self
    }

    /// This node counting its loop devices' I/O errors from `errors` (see
    /// [`crate::health::loop_errors`]).
    #[must_use]
    pub fn with_kernel_log(mut self, errors: crate::health::loop_errors::LoopErrors) -> Node {
        self.loop_errors = errors;
        self
    }

    /// The volumes with a loop device of this node, as (volume id, device),
    /// for the per-volume I/O figures: from the device table and the
    /// pool's directory, one readdir and a stat per volume.
    pub fn volume_devices(
        &self,
        pool: &Pool,
    ) -> std::io::Result<Vec<(String, loopdev::LoopDevice)>> {
        self.mounts(pool).volume_devices()
    }

    /// The resolved kubelet directory.
    pub fn kubelet_dir(&self) -> &Path {
        &self.kubelet_dir
    }

    /// Finds what this plugin has staged from the kernel before it serves:
    /// the devices of the pool's images (by backing inode) that are its own
    /// (mounted under its kubelet directory, or mounted nowhere: a stage
    /// that died between attach and mount), whose fences it then checks
    /// (`custody`), and the directories bind-mounted under the kubelet
    /// directory. It re-takes the pool fence of each, which keeps another
    /// node plugin's stage from starting while this one has it.
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
        let dirs = match self.mounts(pool).staged_dirs() {
            Ok(ids) => ids,
            Err(e) => {
                log::warn!(
                    "cannot read the mount table ({e}); staged directory volumes are not fenced"
                );
                Vec::new()
            }
        };
        let mut ours = Vec::new();
        if !attached.is_empty() {
            // From the directory and the kernel, not the records: a record
            // that cannot be read right now must not leave a staged image
            // unfenced.
            for id in pool.store().ids(crate::pool::store::Kind::Volume)? {
                let image = pool.image_path(&id);
                match devices::image_key(&image) {
                    Ok(Some(key)) => {
                        for (bound, _) in attached.iter().filter(|(_, b)| *b == key) {
                            self.adopt(pool, &id, *bound, key, &mut ours)?;
                        }
                    }
                    Ok(None) => {}
                    Err(e) => log::error!(
                        "volume {id}: cannot stat {}: {e}; its devices on this host are not adopted",
                        image.display()
                    ),
                }
                if dirs.contains(&id) {
                    self.adopt_dir_fence(pool, &id, &attached, &mut ours);
                }
            }
        }
        // The one scan of every device: from here on the table answers for
        // this plugin's devices.
        self.devices.fill(&ours);
        self.check_custody(pool);
        for id in dirs {
            match self.fences.take(pool, &id, LockKind::Shared) {
                Ok(_) => log::info!("volume {id}: found bind-mounted, fence re-taken"),
                Err(e) => log::error!("volume {id}: bind-mounted but {e}"),
            }
        }
        Ok(())
    }

    /// Takes one fence device of the directory volume `id`, bind-mounted
    /// under this plugin's kubelet directory, into `ours` (see
    /// `Node::hold_dir_fence`): any one serves, as each holds the same
    /// shared lock and each unstage detaches one.
    fn adopt_dir_fence(
        &self,
        pool: &Pool,
        id: &str,
        attached: &[(kernel::Bound, (u64, u64))],
        ours: &mut Vec<(kernel::Bound, (u64, u64), String)>,
    ) {
        let fence = pool.fence_path(id);
        let key = match devices::image_key(&fence) {
            Ok(Some(key)) => key,
            Ok(None) => return,
            Err(e) => {
                log::error!("volume {id}: cannot stat {}: {e}", fence.display());
                return;
            }
        };
        match attached
            .iter()
            .find(|(bound, backing)| *backing == key && !bound.detaching && self.owns(*bound))
        {
            Some((bound, _)) => {
                log::info!(
                    "volume {id}: its directory's fence device {} adopted",
                    bound.device.path().display()
                );
                ours.push((*bound, key, id.to_owned()));
            }
            None => log::warn!(
                "volume {id}: bind-mounted with no fence device (staged by an older filevol, or a stage that died half-way): fenced by this process only, until it is staged again"
            ),
        }
    }

    /// Whether `bound` is a device of this node: attached for its node id,
    /// or unnamed (attached by a filevol from before devices carried their
    /// node, which was this node's: such a release served one node per
    /// kernel). Another node's device on this kernel is never detached or
    /// adopted here, whatever this mount namespace shows of it: its mounts
    /// are in that node's namespace, not this one.
    fn owns(&self, bound: kernel::Bound) -> bool {
        self.owner.claims(bound.owner)
    }

    /// Takes a device of volume `id` found at start into `ours` if it is
    /// this plugin's (see [`Node::recover`]).
    fn adopt(
        &self,
        pool: &Pool,
        id: &str,
        bound: kernel::Bound,
        key: (u64, u64),
        ours: &mut Vec<(kernel::Bound, (u64, u64), String)>,
    ) -> Result<(), NodeError> {
        let dev = bound.device;
        if !self.owns(bound) {
            log::info!(
                "volume {id}: {} was attached for another node on this host, not adopted",
                dev.path().display()
            );
            return Ok(());
        }
        let at = self
            .loop_mount_points(dev)
            .map_err(sys("read", "/proc/self/mountinfo"))?;
        if !at.is_empty() && !at.iter().any(|p| p.starts_with(&self.kubelet_dir)) {
            log::info!(
                "volume {id}: {} is mounted at {} by another node plugin on this host, not adopted",
                dev.path().display(),
                at[0].display()
            );
            return Ok(());
        }
        ours.push((bound, key, id.to_owned()));
        // A device with a detach pending was let go of by an unstage
        // (which waited for it; one still held open is refused by the next
        // stage): nothing staged to fence.
        if bound.detaching {
            return Ok(());
        }
        let kind = if self.kernel.read_only(dev).unwrap_or(false) {
            LockKind::Shared
        } else {
            LockKind::Exclusive
        };
        match self.fences.take(pool, id, kind) {
            Ok(_) => log::info!(
                "volume {id}: found attached to {}{}, adopted",
                dev.path().display(),
                if at.is_empty() {
                    String::new()
                } else {
                    format!(" and mounted at {}", at[0].display())
                }
            ),
            Err(e) => log::error!("volume {id}: attached to {} but {e}", dev.path().display()),
        }
        Ok(())
    }

    /// Checks who holds the fence of each of this plugin's devices (see
    /// `custody`), records what is not proven and returns the counts. Run
    /// at start and then periodically (`filevol serve --fence-check-interval`).
    pub fn check_custody(&self, pool: &Pool) -> custody::CustodyCounts {
        let recorded = match self.mounts(pool).pool_locks() {
            Ok(r) => r,
            Err(e) => {
                log::warn!("cannot read this host's locks (/proc/locks): {e}; fences not checked");
                return self.custody.counts();
            }
        };
        let mut counts = custody::CustodyCounts::default();
        for (id, key, device) in self.devices.entries() {
            // Gone or detaching since: nothing of it left to fence. A
            // device that cannot be asked is not taken for gone.
            match self.kernel.loop_status(device) {
                // Another node's since (this node's went, and the number
                // was reused for the same image): not this node's to fence.
                Ok(Some(status))
                    if status.backing == key
                        && !status.detaching
                        && self.owner.claims(status.owner) => {}
                Ok(_) => continue,
                Err(e) => {
                    let verdict = Custody::Unproven(format!(
                        "the state of {} cannot be read: {e}",
                        device.path().display()
                    ));
                    self.custody.record(&id, &device.path(), &verdict);
                    counts.unproven += 1;
                    continue;
                }
            }
            let read_only = self.kernel.read_only(device).unwrap_or(false);
            let path = device.path();
            // The device serves the image, or a directory volume's fence.
            let image = pool.image_path(&id);
            let image = match devices::image_key(&image) {
                Ok(Some(k)) if k == key => image,
                _ => pool.fence_path(&id),
            };
            let verdict = self.custody.judge(
                custody::Device {
                    id: &id,
                    image: &image,
                    inode: key.1,
                    path: &path,
                    read_only,
                },
                &recorded,
            );
            self.custody.record(&id, &path, &verdict);
            match verdict {
                Custody::Device => counts.device += 1,
                Custody::Process => counts.process += 1,
                Custody::Unproven(_) => counts.unproven += 1,
            }
        }
        if counts.process > 0 {
            log::warn!(
                "{} staged volume(s) on this node have no fence of their own device (attached by an older filevol, or their lock was lost): this process holds their fences while it lives; unstage and stage them again to give them their devices' fences",
                counts.process
            );
        }
        self.custody.set_counts(counts);
        counts
    }

    /// Refuses a stage or publish of a volume whose device here is not
    /// provably fenced.
    fn refuse_unproven(&self, id: &str) -> Result<(), NodeError> {
        match self.custody.unproven(id) {
            Some(reason) => Err(NodeError::FenceUnproven {
                id: id.to_owned(),
                reason,
            }),
            None => Ok(()),
        }
    }

    /// The fence counts of the last check (for the metrics).
    pub fn custody_counts(&self) -> custody::CustodyCounts {
        self.custody.counts()
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
    /// holds, not by where it is (`node::mounts::by_volume`): a volume of the
    /// pool with any mount under the kubelet directory is staged, once
    /// (kubelet stages a volume once per node, as a filesystem, as a block
    /// device's bind, or as a directory's bind); every other mount of it
    /// there is a publish, wherever kubelet put the target (block publishes
    /// live under `plugins/kubernetes.io/csi/volumeDevices/`, not `pods/`).
    pub fn mount_counts(&self, pool: &Pool) -> std::io::Result<(usize, usize)> {
        let by_volume = self.mounts(pool).by_volume()?;
        let staged = by_volume.len();
        let published = by_volume.values().map(|n| n.saturating_sub(1)).sum();
        Ok((staged, published))
    }

    /// The pool's directory volumes bind-mounted under the kubelet
    /// directory (staged or published), from the mount table: those whose
    /// usage a node plugin's metrics measure.
    pub fn staged_dir_volumes(&self, pool: &Pool) -> std::io::Result<Vec<String>> {
        self.mounts(pool).staged_dirs()
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

    /// Every mount of volume `id` under the kubelet directory, by identity:
    /// its image's loop device, or its data directory (see `node::mounts`).
    /// What a path holds is this volume's only if the path is among them.
    fn mounts_of(&self, pool: &Pool, id: &str) -> Result<Vec<PathBuf>, NodeError> {
        let image = pool.image_path(id);
        let device = self
            .bound(&image)
            .map_err(sys("find loop device of", &image))?
            .map(|b| b.device);
        self.mounts(pool)
            .of_volume(id, device)
            .map_err(sys("read", "/proc/self/mountinfo"))
    }

    /// Whether the mount on top at `path` holds volume `id` (see
    /// `node::mounts::holds`).
    fn holds(&self, pool: &Pool, id: &str, path: &Path) -> Result<bool, NodeError> {
        let image = pool.image_path(id);
        let device = self
            .bound(&image)
            .map_err(sys("find loop device of", &image))?
            .map(|b| b.device);
        self.mounts(pool)
            .holds(id, device, path)
            .map_err(sys("tell what is mounted at", path))
    }

    /// Answers OK when the mount at `path` is volume `id`'s, else says what
    /// is there ([`NodeError::Occupied`]).
    fn expect_volume_at(&self, pool: &Pool, id: &str, path: &Path) -> Result<(), NodeError> {
        if self.holds(pool, id, path)? {
            Ok(())
        } else {
            Err(NodeError::Occupied {
                path: path.to_owned(),
                what: "another volume or filesystem".into(),
            })
        }
    }
}
