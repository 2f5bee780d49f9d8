//! Errors of the node layer. The gRPC code is chosen in `crate::error`.

use std::io;
use std::path::PathBuf;

/// Why a node operation failed.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// A staging or target path outside the kubelet directory.
    #[error("{field} {path} is not under the kubelet directory {kubelet_dir}")]
    OutsideKubeletDir {
        /// The request field.
        field: &'static str,
        /// The path as given.
        path: PathBuf,
        /// The kubelet directory.
        kubelet_dir: PathBuf,
    },
    /// Another node plugin (on this host or another) has the volume staged
    /// in a way that excludes this stage: its fence in the pool is held.
    #[error("volume {id} ({image}) is staged by another node plugin: its fence in the pool is held; a single-writer image is never mounted twice")]
    Fenced {
        /// The volume.
        id: String,
        /// The image.
        image: PathBuf,
    },
    /// The image's lock is held by a writer elsewhere: a loop device of it
    /// on another host sharing the pool (whose node plugin may have died
    /// while its pods write on), or a delete or copy of it in progress.
    #[error("volume {id}: its image {image} is locked by another writer's fence (a loop device of it on another host sharing the pool, perhaps left by a node plugin that died while its pods write on, or a delete or copy in progress); it is staged here only once that is gone")]
    ImageFenced {
        /// The volume.
        id: String,
        /// The image.
        image: PathBuf,
    },
    /// A loop device of the image exists on this host that this node
    /// plugin did not attach and that is mounted (another node plugin's
    /// stage, or an older filevol's): a second device beside it would be a
    /// second writer.
    #[error("volume {id}: its image {image} is already attached to {device} on this host, mounted at {at} (another node plugin's, or one a plugin left when it died); refusing to attach a second device beside it")]
    AttachedElsewhere {
        /// The volume.
        id: String,
        /// The image.
        image: PathBuf,
        /// The device found.
        device: PathBuf,
        /// Where it is mounted.
        at: PathBuf,
    },
    /// A loop device of the image exists on this kernel that was attached
    /// for another node (two nodes on one kernel: kind-style clusters):
    /// that node staged it, and its mounts are in its own mount namespace,
    /// out of this plugin's sight. Never detached from here: it goes when
    /// that node unstages, or when the node is rebooted.
    #[error("volume {id}: its image {image} is attached to {device} for another node on this host (staged there, or left by a node that stopped answering); it is staged here only once that device is gone")]
    AttachedForAnotherNode {
        /// The volume.
        id: String,
        /// The image.
        image: PathBuf,
        /// The other node's device.
        device: PathBuf,
    },
    /// This host has a device of the volume whose fence cannot be proven
    /// (another holder has the image's lock): the volume is not staged or
    /// published again until that is resolved.
    #[error("volume {id}: {reason}; it is not staged or published again until an unstage removes this host's device")]
    FenceUnproven {
        /// The volume.
        id: String,
        /// What the check found.
        reason: String,
    },
    /// What is mounted (or lies) at a path is not this volume's, so an
    /// unpublish or unstage leaves it alone.
    #[error("{path} holds {what}, not volume {id}; nothing was unmounted or removed")]
    NotThisVolume {
        /// The volume asked for.
        id: String,
        /// The path.
        path: PathBuf,
        /// What is there.
        what: String,
    },
    /// NodePublish before NodeStage.
    #[error("volume {id} is not staged at {path}")]
    NotStaged {
        /// The volume.
        id: String,
        /// The staging path.
        path: PathBuf,
    },
    /// Something else, or this volume with other options, is already there.
    #[error("{path} already holds {what}")]
    Occupied {
        /// The path.
        path: PathBuf,
        /// What is there.
        what: String,
    },
    /// A ReadWriteOncePod volume already published elsewhere on this node.
    #[error("volume {id} is single-writer (ReadWriteOncePod) and already published at {other}")]
    SingleWriter {
        /// The volume.
        id: String,
        /// The existing target.
        other: PathBuf,
    },
    /// The device holds something other than the volume's filesystem, or
    /// data the probe cannot name: it is never formatted.
    #[error("{device} holds {found}, the volume expects {expected}; refusing to format a device that is not provably blank")]
    WillNotFormat {
        /// The device.
        device: PathBuf,
        /// What the probe found.
        found: String,
        /// What the volume's metadata says.
        expected: String,
    },
    /// The probe itself failed: treated as "not blank", never formatted.
    #[error("probe {device} (so it will not be formatted)")]
    ProbeFailed {
        /// The device.
        device: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A filesystem tool failed, reported as it said it. Whether it ran out
    /// of space is [`CommandError::out_of_space`](crate::sys::command::CommandError::out_of_space).
    #[error(transparent)]
    Command(#[from] crate::sys::command::CommandError),
    /// The volume's record holds mkfs options off the allowlist (a record
    /// made by an older version): it is not formatted.
    #[error("volume {id} records mkfsOptions that filevol does not allow, so it is not formatted (recreate it from a StorageClass without them)")]
    MkfsOptionsRefused {
        /// The volume.
        id: String,
        /// The option at fault, and why.
        #[source]
        source: crate::volume::mkfs_options::MkfsOptionError,
    },
    /// The volume's filesystem cannot be mounted as the stage needs it: a
    /// read-only stage of one with a journal to replay, or one the kernel
    /// finds damaged. A retry changes nothing; the message says what to do.
    #[error("volume {id}: its {fs} filesystem on {device} cannot be mounted {how}: {reason}")]
    Unmountable {
        /// The volume.
        id: String,
        /// Its filesystem.
        fs: &'static str,
        /// The loop device.
        device: PathBuf,
        /// How it was mounted ("read-only", or read-write to replay its
        /// journal).
        how: &'static str,
        /// What the kernel's answer means here.
        reason: String,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },
    /// A read-only stage of a clone or restore whose copied journal has not
    /// been replayed yet (see `node::settle`) could not have the volume
    /// exclusively to replay it: another node is replaying it right now,
    /// or has it staged for writing.
    #[error("volume {id} is a clone or restore whose journal has not been replayed yet, which needs the volume exclusively once before any read-only stage: {reason}")]
    NotSettled {
        /// The volume.
        id: String,
        /// Who has it.
        reason: String,
    },
    /// The path is busy (EBUSY): it stays mounted.
    #[error("{step} {path}: busy (still in use)")]
    Busy {
        /// What was being done.
        step: &'static str,
        /// On what.
        path: PathBuf,
    },
    /// NodeUnstage while the volume is still mounted elsewhere on this node
    /// (a publish not yet unpublished): unstaging would pull the filesystem
    /// from under it.
    #[error("volume {id} is still mounted at {at}; unpublish it before unstaging")]
    StillPublished {
        /// The volume.
        id: String,
        /// One of its other mounts.
        at: PathBuf,
    },
    /// NodeExpandVolume asked for a size the volume does not have: more than
    /// the controller grew its image to (ControllerExpandVolume refused, or
    /// never called), or a limit below what it already is.
    #[error("volume {id} is {size} bytes, outside the {required}..{limit} bytes asked for (0: no limit); ControllerExpandVolume sets its size")]
    NotGrown {
        /// The volume.
        id: String,
        /// Its size now (the loop device, which the filesystem fills).
        size: u64,
        /// What the request asked for at least.
        required: u64,
        /// What the request allowed at most (0: no limit).
        limit: u64,
    },
    /// The filesystem cannot be resized at this size: the kernel refuses to
    /// resize a btrfs below 256 MiB, even to the size it has.
    #[error("volume {id} is a {size}-byte btrfs; the kernel resizes btrfs only at 256 MiB or more, so expand the volume to at least that")]
    TooSmallToResize {
        /// The volume.
        id: String,
        /// Its device's size.
        size: u64,
    },
    /// The loop device was told to detach but something still holds it open:
    /// the image is in use until it is gone, so its fence stays.
    #[error(
        "{device} (backing {image}) is detaching but still held open; retry once it is released"
    )]
    DetachPending {
        /// The device.
        device: PathBuf,
        /// Its image.
        image: PathBuf,
    },
    /// A step failed, and undoing what the operation had already done failed
    /// too: both are reported, since what stays behind needs cleaning up.
    /// The first error is not a `#[source]` (the undo is what failed last),
    /// so its own causes are written out here, not lost.
    #[error("{}; undoing it failed too: {undo}", crate::error_chain::message_chain(error.as_ref()))]
    RollbackFailed {
        /// What made the operation fail.
        error: Box<NodeError>,
        /// The undo steps that failed, and why.
        undo: String,
    },
    /// An ephemeral inline volume asked of a node plugin that does not make
    /// them: they are off unless the operator turns them on.
    #[error("volume {id} is a CSI ephemeral inline volume, and this node plugin does not make them: they are off unless its operator turns them on (`--ephemeral-inline`; the Kubernetes overlay deploy/kubernetes/overlays/ephemeral-inline); use a PersistentVolumeClaim or a generic ephemeral volume instead. Nothing was made")]
    EphemeralOff {
        /// kubelet's volume id.
        id: String,
    },
    /// An ephemeral inline volume larger than this node allows one.
    #[error("ephemeral volume {id} would take {} in the pool, more than the {} this node allows one ephemeral volume (`--ephemeral-max-size`); nothing was made", crate::units::human(*size), crate::units::human(*max))]
    EphemeralTooLarge {
        /// kubelet's volume id.
        id: String,
        /// What it would take in the pool, in bytes.
        size: u64,
        /// The most one may take.
        max: u64,
    },
    /// A new ephemeral inline volume would bring this node's ephemeral
    /// volumes over their total.
    #[error("ephemeral volume {id} would take {} in the pool, and this node's ephemeral volumes already take {} of the {} they may take together (`--ephemeral-max-per-node`); nothing was made, and it fits once others are removed", crate::units::human(*size), crate::units::human(*used), crate::units::human(*max))]
    EphemeralNodeFull {
        /// kubelet's volume id.
        id: String,
        /// What it would take in the pool, in bytes.
        size: u64,
        /// What this node's ephemeral volumes take now.
        used: u64,
        /// The most they may take together.
        max: u64,
    },
    /// No volume at the given path.
    #[error("{what} {path} does not exist")]
    NotFound {
        /// What was looked for.
        what: &'static str,
        /// Where.
        path: PathBuf,
    },
    /// The pool refused or failed a step of the node operation (reading or
    /// updating the volume's record, taking its lock).
    #[error(transparent)]
    Pool(#[from] crate::pool::PoolError),
    /// A syscall failed.
    #[error("{step} {path}")]
    Sys {
        /// What was being done.
        step: &'static str,
        /// On what.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// Builds the error for a failed syscall step; EBUSY becomes
/// [`NodeError::Busy`].
pub fn sys(step: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> NodeError {
    let path = path.into();
    move |source| {
        if source.raw_os_error() == Some(rustix::io::Errno::BUSY.raw_os_error()) {
            NodeError::Busy { step, path }
        } else {
            NodeError::Sys { step, path, source }
        }
    }
}

/// Builds the error for a probe that failed: the device (or image) is
/// never formatted ([`NodeError::ProbeFailed`]).
pub fn probe_failed(device: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> NodeError {
    let device = device.into();
    move |source| NodeError::ProbeFailed { device, source }
}

/// Builds the error for a mount of volume `id`'s filesystem `fs` on
/// `device` that the kernel refused ([`NodeError::Unmountable`]), saying
/// what the kernel's answer means for a filevol volume.
pub fn unmountable(
    id: &str,
    fs: &'static str,
    device: impl Into<PathBuf>,
    how: &'static str,
) -> impl FnOnce(io::Error) -> NodeError {
    let (id, device) = (id.to_owned(), device.into());
    move |source| {
        use rustix::io::Errno;
        let code = source.raw_os_error();
        let is = |e: Errno| code == Some(e.raw_os_error());
        let reason = if is(Errno::ROFS) {
            "it has a journal to replay (it was copied, or left, while mounted), which a read-only device cannot do; stage it read-write once to replay it".to_owned()
        } else if is(Errno::UCLEAN) || is(Errno::BADMSG) || is(Errno::INVAL) {
            format!("the kernel finds it damaged or not a valid {fs} (its log on the node says where); repair the image (fsck) or restore it again")
        } else if is(Errno::IO) {
            // btrfs answers EIO to a log tree it cannot replay read-only.
            format!("the kernel could not read it, finds it damaged, or has a log to replay that a read-only device cannot take (the node's kernel log says which); stage it read-write once, or repair the {fs} image")
        } else {
            "the kernel refused the mount".to_owned()
        };
        NodeError::Unmountable {
            id,
            fs,
            device,
            how,
            reason,
            source,
        }
    }
}
