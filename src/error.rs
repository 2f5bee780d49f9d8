//! Errors a CSI call can end with, and the one place that turns them into
//! gRPC status codes.
//!
//! Each layer below (request validation, the executor, later the pool and the
//! node's kernel layer) has its own error type; they all meet in [`Error`],
//! and [`to_status`] is the only function that picks a gRPC code. The mapping
//! is keyed by the RPC as well as the error, because the CSI spec's error
//! tables give different codes for the same condition in different calls, and
//! it has no catch-all arm: a new error variant does not compile until someone
//! has decided its code.

use filevol_core::error_chain::message_chain;

use grpcio::{RpcStatus, RpcStatusCode};

use crate::rpc::Rpc;
use filevol_core::node::NodeError;
use filevol_core::pool::PoolError;

/// Why a CSI call failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is malformed: a required field is missing or a value is
    /// outside what the spec or filevol accepts.
    #[error("{field}: {reason}")]
    InvalidArgument {
        /// The request field at fault, as named in the CSI spec.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// Another call on the same volume or snapshot is in progress. The CSI
    /// spec's concurrency section asks for ABORTED so the caller retries.
    #[error("an operation on {key} is already in progress; retry later")]
    Busy {
        /// The lock key that was held (`volume/<id>`, `snapshot/<id>`, ...).
        key: String,
    },
    /// Every worker is busy and the queue in front of them is full.
    #[error("all workers are busy and {queued} calls are queued; retry later")]
    QueueFull {
        /// How many calls were waiting when this one was refused.
        queued: usize,
    },
    /// The server is draining after SIGTERM/SIGINT and takes no new work.
    #[error("filevol is shutting down")]
    ShuttingDown,
    /// The operation panicked. The worker survived; the call did not.
    #[error("internal error: the operation panicked: {0}")]
    Panicked(String),
    /// This process does not serve the call's service: its mode leaves the
    /// service to another process, or the pool cannot support it. The
    /// reason says which, so a bare UNIMPLEMENTED never leaves an operator
    /// guessing.
    #[error("{rpc} is not served here: {reason}")]
    NotServed {
        /// The call refused.
        rpc: Rpc,
        /// Why, and where the call should go instead.
        reason: String,
    },
    /// The plugin cannot serve: the pool is unusable or workers are gone.
    /// Needs an operator, so Probe reports it as FAILED_PRECONDITION.
    #[error("not healthy: {0}")]
    Unhealthy(String),
    /// An offset outside the object it points into (SnapshotMetadata's
    /// `starting_offset`).
    #[error("{field}: {reason}")]
    OutOfRange {
        /// The request field at fault.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The reader of a streaming answer went away (it cancelled, its
    /// deadline passed, the connection closed): the stream stopped.
    #[error("the reader went away mid-stream: {0}")]
    ReaderGone(String),
    /// A pagination token this driver did not hand out.
    #[error("starting_token {0:?} was not issued by this driver; start the listing again")]
    BadToken(String),
    /// The pool refused or failed the operation.
    #[error(transparent)]
    Pool(#[from] PoolError),
    /// The node refused or failed the operation.
    #[error(transparent)]
    Node(#[from] NodeError),
}

impl From<filevol_core::pool::new_volume::Refused> for Error {
    fn from(e: filevol_core::pool::new_volume::Refused) -> Self {
        Error::invalid(e.field, e.reason)
    }
}

impl From<filevol_core::volume::parameters::ParamError> for Error {
    fn from(e: filevol_core::volume::parameters::ParamError) -> Self {
        filevol_core::pool::new_volume::Refused::from(e).into()
    }
}

impl From<filevol_core::node::PublishRefused> for Error {
    fn from(e: filevol_core::node::PublishRefused) -> Self {
        match e {
            filevol_core::node::PublishRefused::Request(r) => r.into(),
            filevol_core::node::PublishRefused::Node(n) => Error::Node(n),
        }
    }
}

impl From<filevol_core::changed_blocks::OutOfOrder> for Error {
    fn from(e: filevol_core::changed_blocks::OutOfOrder) -> Self {
        Error::Pool(PoolError::Io {
            step: "read the extent maps of",
            path: "a snapshot image".into(),
            source: e.into(),
        })
    }
}

impl Error {
    /// Shorthand for [`Error::InvalidArgument`].
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Error::InvalidArgument {
            field,
            reason: reason.into(),
        }
    }
}

/// The gRPC status code for `err` as an answer to `rpc`.
pub fn status_code(rpc: Rpc, err: &Error) -> RpcStatusCode {
    match err {
        Error::InvalidArgument { .. } => RpcStatusCode::INVALID_ARGUMENT,
        Error::Busy { .. } => RpcStatusCode::ABORTED,
        Error::QueueFull { .. } => RpcStatusCode::RESOURCE_EXHAUSTED,
        Error::ShuttingDown => RpcStatusCode::UNAVAILABLE,
        Error::Panicked(_) => RpcStatusCode::INTERNAL,
        Error::NotServed { .. } => RpcStatusCode::UNIMPLEMENTED,
        // The spec's Probe table: an unhealthy plugin that needs intervention
        // answers FAILED_PRECONDITION. Any other call cannot be served at all
        // right now, which is what UNAVAILABLE means to a retrying sidecar.
        Error::Unhealthy(_) => match rpc {
            Rpc::Probe => RpcStatusCode::FAILED_PRECONDITION,
            _ => RpcStatusCode::UNAVAILABLE,
        },
        Error::BadToken(_) => RpcStatusCode::ABORTED,
        Error::OutOfRange { .. } => RpcStatusCode::OUT_OF_RANGE,
        // Only logged and counted: there is nobody to answer.
        Error::ReaderGone(_) => RpcStatusCode::CANCELLED,
        Error::Pool(e) => pool_code(rpc, e),
        Error::Node(e) => node_code(rpc, e),
    }
}

fn node_code(rpc: Rpc, err: &NodeError) -> RpcStatusCode {
    match err {
        // Stage and publish would mount there: a bad path is a bad request.
        // Stats and expansion only look: no volume of ours can be at a path
        // outside the kubelet directory, which the spec calls NOT_FOUND
        // ("volume does not exist on the specified path").
        NodeError::OutsideKubeletDir { .. } => match rpc {
            Rpc::NodeGetVolumeStats | Rpc::NodeGetVolumeHealth | Rpc::NodeExpandVolume => {
                RpcStatusCode::NOT_FOUND
            }
            _ => RpcStatusCode::INVALID_ARGUMENT,
        },
        NodeError::NotFound { .. } => RpcStatusCode::NOT_FOUND,
        // "Volume published but is incompatible".
        NodeError::Occupied { .. } => RpcStatusCode::ALREADY_EXISTS,
        // States that need the CO or an operator to change something first:
        // another node holds the image, the volume is not staged, a
        // ReadWriteOncePod volume is in use, the device is not blank, a
        // mount point is busy, the volume's record asks for mkfs options
        // that are not allowed (only a new volume fixes that), a device of
        // the image exists elsewhere or its fence cannot be proven, or
        // what a path holds is not the volume named (an unpublish or
        // unstage that would act on someone else's mount).
        NodeError::Fenced { .. }
        | NodeError::ImageFenced { .. }
        | NodeError::AttachedElsewhere { .. }
        | NodeError::AttachedForAnotherNode { .. }
        | NodeError::FenceUnproven { .. }
        | NodeError::NotThisVolume { .. }
        | NodeError::NotStaged { .. }
        | NodeError::SingleWriter { .. }
        | NodeError::WillNotFormat { .. }
        | NodeError::MkfsOptionsRefused { .. }
        | NodeError::Busy { .. }
        | NodeError::StillPublished { .. }
        | NodeError::NotSettled { .. } => RpcStatusCode::FAILED_PRECONDITION,
        // A filesystem the kernel will not mount needs an operator, not a
        // retry; a full or unreachable pool is still what it is.
        NodeError::Unmountable { source, .. } => match io_code(source) {
            RpcStatusCode::INTERNAL => RpcStatusCode::FAILED_PRECONDITION,
            code => code,
        },
        // The spec's NodeExpandVolume table: a capacity the plugin cannot
        // give is OUT_OF_RANGE.
        NodeError::NotGrown { .. } | NodeError::TooSmallToResize { .. } => {
            RpcStatusCode::OUT_OF_RANGE
        }
        // The kernel lets go of the device at its last close: a retry soon
        // succeeds.
        NodeError::DetachPending { .. } => RpcStatusCode::UNAVAILABLE,
        // What caused the failure decides; the failed undo is in the message.
        NodeError::RollbackFailed { error, .. } => node_code(rpc, error),
        NodeError::Sys { source, .. } => io_code(source),
        // A filesystem tool that ran out of room (mkfs writing into an
        // image on a full pool) is a full pool, as ENOSPC from a syscall
        // is (see `io_code`); any other failure of it needs an operator.
        NodeError::Command(e) if e.out_of_space() => RpcStatusCode::RESOURCE_EXHAUSTED,
        NodeError::ProbeFailed { .. } | NodeError::Command(_) => RpcStatusCode::INTERNAL,
        // Ephemeral inline volumes. Off: the request is sound, the node is
        // not set up to serve it, and only its operator can change that;
        // gRPC's FAILED_PRECONDITION ("the system is not in a state required
        // for the operation", not retried until that is fixed), the code
        // the spec's NodePublishVolume table gives a request that exceeds
        // what the plugin serves ("Exceeds capabilities"). INVALID_ARGUMENT
        // would call the request wrong whatever the state, which it is not.
        NodeError::EphemeralOff { .. } => RpcStatusCode::FAILED_PRECONDITION,
        // Larger than one may be: the size itself is outside what the node
        // allows and no retry changes that, the spec's "Unsupported
        // capacity" (OUT_OF_RANGE in CreateVolume's table).
        NodeError::EphemeralTooLarge { .. } => RpcStatusCode::OUT_OF_RANGE,
        // Over the node's total: "Insufficient capacity", which the spec
        // makes RESOURCE_EXHAUSTED; it fits once other ephemeral volumes go.
        NodeError::EphemeralNodeFull { .. } => RpcStatusCode::RESOURCE_EXHAUSTED,
        NodeError::Pool(e) => pool_code(rpc, e),
    }
}

fn pool_code(rpc: Rpc, err: &PoolError) -> RpcStatusCode {
    match err {
        PoolError::NotFound { .. } | PoolError::NodeNotFound(_) => RpcStatusCode::NOT_FOUND,
        PoolError::Incompatible { .. } | PoolError::AttachedIncompatibly { .. } => {
            RpcStatusCode::ALREADY_EXISTS
        }
        PoolError::OutOfRange(_) => RpcStatusCode::OUT_OF_RANGE,
        // "Insufficient capacity", "not enough space to create snapshot",
        // "unable to provision in accessible_topology": all
        // RESOURCE_EXHAUSTED in the spec's tables.
        PoolError::Exhausted { .. }
        | PoolError::NoSpace { .. }
        | PoolError::Topology(_)
        | PoolError::AttachLimit { .. } => RpcStatusCode::RESOURCE_EXHAUSTED,
        PoolError::InUse(_) | PoolError::AttachedElsewhere { .. } | PoolError::NeedsReflink(_) => {
            RpcStatusCode::FAILED_PRECONDITION
        }
        // "Exceeds capabilities" is INVALID_ARGUMENT for controller calls
        // but FAILED_PRECONDITION for NodeStage/NodePublish.
        PoolError::Unsupported(_) => match rpc {
            Rpc::NodeStageVolume | Rpc::NodePublishVolume => RpcStatusCode::FAILED_PRECONDITION,
            _ => RpcStatusCode::INVALID_ARGUMENT,
        },
        PoolError::Mismatch(_) => RpcStatusCode::INVALID_ARGUMENT,
        // The concurrency section: an operation already in progress on the
        // object is ABORTED, whichever process runs it.
        PoolError::Busy { .. } => RpcStatusCode::ABORTED,
        PoolError::Io { source, .. } => io_code(source),
        PoolError::Damaged { .. } => RpcStatusCode::INTERNAL,
    }
}

/// The code for a pool or node step that failed with `source`. Such a
/// failure never means "not there" (only ENOENT does, and it is decided
/// below this layer), so it is never OK or NOT_FOUND:
/// - UNAVAILABLE when the filesystem cannot be reached right now: a FUSE
///   daemon or network server gone (ENOTCONN), an NFS handle gone stale
///   (ESTALE), a server that does not answer. gRPC defines UNAVAILABLE as
///   transient and retried with backoff, which the sidecars and kubelet
///   do, and a remount or reconnect is what ends it;
/// - RESOURCE_EXHAUSTED when the pool filesystem is full or a quota is
///   reached (ENOSPC, EDQUOT), on any call: the spec's tables use it for
///   "insufficient capacity" and "not enough space", and what ends it is
///   space made free, not an operator mending a fault. (INTERNAL here sent
///   kubelet into retries that looked like a driver bug.);
/// - INTERNAL for the rest (EIO from a failing disk or a shut-down xfs,
///   EACCES, ENOTDIR where the pool's layout is broken), as for every I/O
///   failure before: the spec's error tables have no row for a failing
///   pool, and it needs an operator, not a retry.
fn io_code(source: &std::io::Error) -> RpcStatusCode {
    use rustix::io::Errno;
    let unreachable = [
        Errno::NOTCONN,
        Errno::STALE,
        Errno::TIMEDOUT,
        Errno::HOSTDOWN,
        Errno::HOSTUNREACH,
        Errno::SHUTDOWN,
    ];
    let full = [Errno::NOSPC, Errno::DQUOT];
    match source.raw_os_error() {
        Some(code) if unreachable.iter().any(|e| e.raw_os_error() == code) => {
            RpcStatusCode::UNAVAILABLE
        }
        Some(code) if full.iter().any(|e| e.raw_os_error() == code) => {
            RpcStatusCode::RESOURCE_EXHAUSTED
        }
        _ => RpcStatusCode::INTERNAL,
    }
}

/// The canonical name of a gRPC status code (`NOT_FOUND`), for log lines.
pub fn code_name(code: RpcStatusCode) -> &'static str {
    const NAMES: [(RpcStatusCode, &str); 17] = [
        (RpcStatusCode::OK, "OK"),
        (RpcStatusCode::CANCELLED, "CANCELLED"),
        (RpcStatusCode::UNKNOWN, "UNKNOWN"),
        (RpcStatusCode::INVALID_ARGUMENT, "INVALID_ARGUMENT"),
        (RpcStatusCode::DEADLINE_EXCEEDED, "DEADLINE_EXCEEDED"),
        (RpcStatusCode::NOT_FOUND, "NOT_FOUND"),
        (RpcStatusCode::ALREADY_EXISTS, "ALREADY_EXISTS"),
        (RpcStatusCode::PERMISSION_DENIED, "PERMISSION_DENIED"),
        (RpcStatusCode::RESOURCE_EXHAUSTED, "RESOURCE_EXHAUSTED"),
        (RpcStatusCode::FAILED_PRECONDITION, "FAILED_PRECONDITION"),
        (RpcStatusCode::ABORTED, "ABORTED"),
        (RpcStatusCode::OUT_OF_RANGE, "OUT_OF_RANGE"),
        (RpcStatusCode::UNIMPLEMENTED, "UNIMPLEMENTED"),
        (RpcStatusCode::INTERNAL, "INTERNAL"),
        (RpcStatusCode::UNAVAILABLE, "UNAVAILABLE"),
        (RpcStatusCode::DATA_LOSS, "DATA_LOSS"),
        (RpcStatusCode::UNAUTHENTICATED, "UNAUTHENTICATED"),
    ];
    NAMES
        .iter()
        .find(|(c, _)| *c == code)
        .map_or("UNKNOWN", |(_, name)| name)
}

/// The full answer for `err`: its code and a message with the whole cause
/// chain, so the sidecar's event tells the operator what went wrong.
pub fn to_status(rpc: Rpc, err: &Error) -> RpcStatus {
    RpcStatus::with_message(status_code(rpc, err), message_chain(err))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_is_aborted_so_sidecars_retry() {
        let err = Error::Busy {
            key: "volume/v1".into(),
        };
        assert_eq!(
            status_code(Rpc::NodeStageVolume, &err),
            RpcStatusCode::ABORTED
        );
        assert_eq!(status_code(Rpc::CreateVolume, &err), RpcStatusCode::ABORTED);
    }

    #[test]
    fn unhealthy_depends_on_the_rpc() {
        let err = Error::Unhealthy("pool gone".into());
        assert_eq!(
            status_code(Rpc::Probe, &err),
            RpcStatusCode::FAILED_PRECONDITION
        );
        assert_eq!(
            status_code(Rpc::GetPluginInfo, &err),
            RpcStatusCode::UNAVAILABLE
        );
    }

    #[test]
    fn status_message_carries_the_cause_chain() {
        #[derive(Debug, thiserror::Error)]
        #[error("open pool")]
        struct Outer(#[source] std::io::Error);
        let err = Outer(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "no such directory",
        ));
        assert_eq!(message_chain(&err), "open pool: no such directory");
    }

    #[test]
    fn exceeding_capabilities_depends_on_the_rpc() {
        let err = Error::Pool(PoolError::Unsupported("block on a dir volume".into()));
        assert_eq!(
            status_code(Rpc::ControllerExpandVolume, &err),
            RpcStatusCode::INVALID_ARGUMENT
        );
        assert_eq!(
            status_code(Rpc::NodeStageVolume, &err),
            RpcStatusCode::FAILED_PRECONDITION
        );
    }

    #[test]
    fn pool_full_is_resource_exhausted() {
        let err = Error::Pool(PoolError::NoSpace {
            step: "copy image",
            path: "/pool/x".into(),
        });
        assert_eq!(
            status_code(Rpc::CreateSnapshot, &err),
            RpcStatusCode::RESOURCE_EXHAUSTED
        );
        let bad = Error::BadToken("x".into());
        assert_eq!(status_code(Rpc::ListVolumes, &bad), RpcStatusCode::ABORTED);
    }

    #[test]
    fn io_failures_are_never_ok_or_not_found() {
        let io = |errno: i32| {
            Error::Pool(PoolError::Io {
                step: "stat",
                path: "/pool/volumes/v".into(),
                source: std::io::Error::from_raw_os_error(errno),
            })
        };
        // A pool that cannot be reached now: retried.
        for errno in [libc::ENOTCONN, libc::ESTALE] {
            assert_eq!(
                status_code(Rpc::DeleteVolume, &io(errno)),
                RpcStatusCode::UNAVAILABLE
            );
        }
        // A pool that fails: an operator looks.
        for errno in [libc::EIO, libc::EACCES, libc::ENOTDIR] {
            assert_eq!(
                status_code(Rpc::DeleteVolume, &io(errno)),
                RpcStatusCode::INTERNAL
            );
        }
        let node = |errno: i32| {
            Error::Node(filevol_core::node::NodeError::Sys {
                step: "stat",
                path: "/pool/volumes/v/image".into(),
                source: std::io::Error::from_raw_os_error(errno),
            })
        };
        assert_eq!(
            status_code(Rpc::NodeGetVolumeStats, &node(libc::ENOTCONN)),
            RpcStatusCode::UNAVAILABLE
        );
        // A full pool or a reached quota, on whichever call meets it (a
        // stage's preallocation, a copy, a snapshot): space, not a fault.
        for errno in [libc::ENOSPC, libc::EDQUOT] {
            for rpc in [
                Rpc::CreateVolume,
                Rpc::CreateSnapshot,
                Rpc::ControllerExpandVolume,
            ] {
                assert_eq!(
                    status_code(rpc, &io(errno)),
                    RpcStatusCode::RESOURCE_EXHAUSTED
                );
            }
            for rpc in [Rpc::NodeStageVolume, Rpc::NodePublishVolume] {
                assert_eq!(
                    status_code(rpc, &node(errno)),
                    RpcStatusCode::RESOURCE_EXHAUSTED
                );
                let undone = Error::Node(filevol_core::node::NodeError::RollbackFailed {
                    error: Box::new(match node(errno) {
                        Error::Node(e) => e,
                        _ => unreachable!(),
                    }),
                    undo: "unmount: busy".into(),
                });
                assert_eq!(status_code(rpc, &undone), RpcStatusCode::RESOURCE_EXHAUSTED);
            }
        }
    }

    #[test]
    fn a_tool_out_of_space_is_resource_exhausted_and_other_failures_internal() {
        let tool = |stderr: &str| {
            Error::Node(NodeError::Command(
                filevol_core::sys::command::CommandError {
                    command: "mkfs.ext4 -q /pool/volumes/v/.image.mkfs".into(),
                    status: "exit status: 1".into(),
                    stderr: stderr.into(),
                },
            ))
        };
        let full =
            tool("mkfs.ext4: No space left on device while writing out and closing file system");
        let broken = tool("mkfs.ext4: Permission denied while trying to determine filesystem size");
        for rpc in [
            Rpc::NodeStageVolume,
            Rpc::NodePublishVolume,
            Rpc::NodeExpandVolume,
        ] {
            assert_eq!(status_code(rpc, &full), RpcStatusCode::RESOURCE_EXHAUSTED);
            assert_eq!(status_code(rpc, &broken), RpcStatusCode::INTERNAL);
        }
        // The tool's own words reach the caller.
        assert!(to_status(Rpc::NodeStageVolume, &full)
            .message()
            .contains("No space left on device"));
    }

    #[test]
    fn ephemeral_refusals_say_what_would_change_them() {
        let off = Error::Node(NodeError::EphemeralOff { id: "csi-1".into() });
        let large = Error::Node(NodeError::EphemeralTooLarge {
            id: "csi-1".into(),
            size: 2 << 30,
            max: 1 << 30,
        });
        let full = Error::Node(NodeError::EphemeralNodeFull {
            id: "csi-1".into(),
            size: 1 << 30,
            used: 10 << 30,
            max: 10 << 30,
        });
        let rpc = Rpc::NodePublishVolume;
        assert_eq!(status_code(rpc, &off), RpcStatusCode::FAILED_PRECONDITION);
        assert_eq!(status_code(rpc, &large), RpcStatusCode::OUT_OF_RANGE);
        assert_eq!(status_code(rpc, &full), RpcStatusCode::RESOURCE_EXHAUSTED);
        assert!(to_status(rpc, &off)
            .message()
            .contains("--ephemeral-inline"));
        assert!(to_status(rpc, &large)
            .message()
            .contains("--ephemeral-max-size"));
        assert!(to_status(rpc, &full)
            .message()
            .contains("--ephemeral-max-per-node"));
    }

    #[test]
    fn a_filesystem_that_will_not_mount_is_a_precondition_unless_the_pool_is_full() {
        let unmountable = |errno: i32| {
            Error::Node(filevol_core::node::error::unmountable(
                "v",
                "xfs",
                "/dev/loop3",
                "read-only",
            )(std::io::Error::from_raw_os_error(errno)))
        };
        for errno in [libc::EROFS, libc::EUCLEAN, libc::EINVAL, libc::EIO] {
            let e = unmountable(errno);
            assert_eq!(
                status_code(Rpc::NodeStageVolume, &e),
                RpcStatusCode::FAILED_PRECONDITION,
                "{e}"
            );
        }
        assert!(unmountable(libc::EROFS)
            .to_string()
            .contains("journal to replay"));
        assert_eq!(
            status_code(Rpc::NodeStageVolume, &unmountable(libc::ENOSPC)),
            RpcStatusCode::RESOURCE_EXHAUSTED
        );
    }

    #[test]
    fn queue_full_and_shutdown_codes() {
        assert_eq!(
            status_code(Rpc::GetPluginInfo, &Error::QueueFull { queued: 3 }),
            RpcStatusCode::RESOURCE_EXHAUSTED
        );
        assert_eq!(
            status_code(Rpc::DeleteVolume, &Error::ShuttingDown),
            RpcStatusCode::UNAVAILABLE
        );
        assert_eq!(
            status_code(Rpc::DeleteVolume, &Error::Panicked("boom".into())),
            RpcStatusCode::INTERNAL
        );
        let err = Error::NotServed {
            rpc: Rpc::ListVolumes,
            reason: "node only".into(),
        };
        let st = to_status(Rpc::ListVolumes, &err);
        assert_eq!(st.code(), RpcStatusCode::UNIMPLEMENTED);
        assert_eq!(st.message(), "ListVolumes is not served here: node only");
    }
}
