//! Errors of the pool layer. Each names what it was doing and on what; the
//! gRPC code is chosen in `crate::error`, not here.

use std::io;
use std::path::PathBuf;

use super::room::{Need, Shortfall, Usage};

/// Why a pool operation failed.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// No such volume, snapshot or group.
    #[error("{kind} {id} does not exist")]
    NotFound {
        /// "volume", "snapshot", "group snapshot" or "source volume"...
        kind: &'static str,
        /// The id asked for.
        id: String,
    },
    /// The name is taken by an object made with a different request.
    #[error("{kind} {name:?} already exists as {id} with a different {what}")]
    Incompatible {
        /// "volume", "snapshot" or "group snapshot".
        kind: &'static str,
        /// The name.
        name: String,
        /// The existing object's id.
        id: String,
        /// What differs.
        what: String,
    },
    /// The capacity range cannot be met.
    #[error("capacity range: {0}")]
    OutOfRange(String),
    /// The pool cannot take what a creation or expansion asks for; the
    /// message says what was asked, what is left, how that was reached
    /// (reserve, overcommit, volumes, snapshots, creations in progress, free
    /// space) and what would make room.
    #[error("{shortfall}")]
    Exhausted {
        /// What was asked and the pool's figures (boxed: they are large
        /// beside every other variant).
        shortfall: Box<Shortfall>,
    },
    /// The filesystem ran out of space mid-operation (the partial work was
    /// removed).
    #[error("the pool filesystem is full while {step} {path}")]
    NoSpace {
        /// What was being done.
        step: &'static str,
        /// On what.
        path: PathBuf,
    },
    /// The volume cannot be reached from the requested topology.
    #[error(transparent)]
    Topology(#[from] crate::volume::topology::Unreachable),
    /// Another thread, process or host holds the object's lock in the pool.
    #[error("another operation on {kind} {id} is in progress (its lock in the pool is held); retry later")]
    Busy {
        /// "volume", "snapshot" or "group snapshot".
        kind: &'static str,
        /// The object.
        id: String,
    },
    /// The object is in use in a way that forbids the operation.
    #[error("{0}")]
    InUse(String),
    /// The operation needs reflink (instant, atomic copies) and the pool
    /// filesystem cannot do it.
    #[error("{0}")]
    NeedsReflink(String),
    /// A single-node volume is already attached to another node.
    #[error("volume {id} is attached to node {node} with a single-node access mode")]
    AttachedElsewhere {
        /// The volume.
        id: String,
        /// The node holding it.
        node: String,
    },
    /// The volume is attached to this node with other options.
    #[error("volume {id} is already attached to node {node} with a different access mode or read-only flag")]
    AttachedIncompatibly {
        /// The volume.
        id: String,
        /// The node.
        node: String,
    },
    /// The node already has as many volumes attached as it accepts.
    #[error("node {node} already has its maximum of {max} volumes attached")]
    AttachLimit {
        /// The node.
        node: String,
        /// Its limit.
        max: u32,
    },
    /// The node has not registered with the pool.
    #[error("node {0} is not known to this pool (no node plugin has registered it)")]
    NodeNotFound(String),
    /// The volume cannot serve a requested capability or parameter.
    #[error("{0}")]
    Unsupported(String),
    /// The request contradicts the pool's state (a snapshot list that does
    /// not match its group, a group member deleted on its own).
    #[error("{0}")]
    Mismatch(String),
    /// A filesystem operation failed.
    #[error("{step} {path}")]
    Io {
        /// What was being done.
        step: &'static str,
        /// On what.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Metadata exists but cannot be read.
    #[error("metadata {path} is damaged: {problem}")]
    Damaged {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
}

impl PoolError {
    /// [`PoolError::Exhausted`]: `need` could not be had from a pool whose
    /// figures are `usage`.
    pub fn exhausted(need: Need, usage: Usage) -> PoolError {
        PoolError::Exhausted {
            shortfall: Box::new(Shortfall { need, usage }),
        }
    }
}

/// Builds the error for a failed filesystem step, turning ENOSPC and
/// EDQUOT into [`PoolError::NoSpace`].
pub fn io_error(
    step: &'static str,
    path: impl Into<PathBuf>,
) -> impl FnOnce(io::Error) -> PoolError {
    let path = path.into();
    move |source| match source.raw_os_error() {
        Some(code)
            if code == rustix::io::Errno::NOSPC.raw_os_error()
                || code == rustix::io::Errno::DQUOT.raw_os_error() =>
        {
            PoolError::NoSpace { step, path }
        }
        _ => PoolError::Io { step, path, source },
    }
}
