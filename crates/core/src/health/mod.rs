//! Health: what is wrong with a volume or with the pool, as findings an
//! operator can act on.
//!
//! Every fault filevol detects becomes one [`Finding`]: a stable
//! [`Reason`] (what alerts, dashboards and scripts match on; its name never
//! changes once released), how bad it is ([`Severity`]), and a message that
//! says what happened and what to do. The CSI answers (the v1.12
//! `VolumeCondition` and the v1.13 health calls), the metrics and the log
//! are all made from the same findings, so they cannot tell different
//! stories.
//!
//! The findings are computed in three places, each from what it can see
//! without blocking on a hung share:
//!
//! - [`crate::pool::health`]: the pool as a whole (free space against the reserve, what
//!   the volumes may still write against what the pool can hold), from a
//!   [`crate::pool::room::Usage`] a background probe read.
//! - [`crate::pool::Pool::volume_health`]: a volume's record and data in
//!   the pool (the controller's view).
//! - [`crate::node::Node::volume_health`]: a staged volume on this host: its
//!   mount, loop device, filesystem and fence.
//!
//! Whoever combines them runs the parts that touch the pool under a
//! deadline ([`crate::sys::deadline`]), so a share that stopped answering
//! makes a finding, not a hung worker.

pub mod loop_errors;

use std::fmt;

/// How bad a finding is, worst last.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Severity {
    /// The data can still be read and written, but something will fail or
    /// has failed partly: a filling pool, I/O errors, a filesystem with
    /// recorded errors, an unproven fence.
    Degraded,
    /// The data cannot be reached: the image is gone, the mount is gone,
    /// the pool does not answer. For the pool itself, "unreachable".
    Inaccessible,
}

impl Severity {
    /// The lower-case name the metrics and messages use.
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Degraded => "degraded",
            Severity::Inaccessible => "inaccessible",
        }
    }
}

/// Why a volume or the pool is unhealthy: one per kind of fault, named for
/// what an operator sees. The names ([`Reason::as_str`]) are a stable
/// interface: alert rules and scripts match on them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Reason {
    /// The pool's free space is at or below the reserve: what is left is
    /// all thin volumes have to write into.
    PoolLowSpace,
    /// The pool filesystem is out of space (nearly nothing free): thin
    /// volumes' writes into blocks they never wrote fail now.
    PoolOutOfSpace,
    /// The volumes may still write more than the pool has free: the writes
    /// of an overcommitted pool will fail before its volumes are full.
    PoolOvercommitted,
    /// The pool did not answer a read within the deadline, or answered with
    /// an error (ESTALE, EIO, ENOTCONN): a share that stopped answering.
    PoolUnreachable,
    /// The volume's record in the pool cannot be read.
    RecordDamaged,
    /// The volume's image or directory is gone from the pool.
    DataMissing,
    /// The volume's image or directory cannot be read, is not what its
    /// record says, or is shorter than the volume.
    DataUnreadable,
    /// The pool is out of space and the volume is thin: its next write into
    /// a block it never wrote fails.
    PoolFull,
    /// The staging or target path is not mounted, or its filesystem went
    /// away (stale, disconnected).
    NotMounted,
    /// The image is not attached to a loop device on this node.
    NoLoopDevice,
    /// The loop device returned I/O errors (the kernel logged them).
    LoopIoErrors,
    /// The filesystem inside the volume has recorded errors.
    FilesystemErrors,
    /// The kernel remounted the volume's filesystem read-only (ext4's
    /// `errors=remount-ro`, a btrfs transaction abort).
    FilesystemReadOnly,
    /// The volume's xfs shut itself down: every I/O fails.
    FilesystemShutdown,
    /// This node cannot prove it holds the volume's fence: another host
    /// may be writing the image.
    FenceUnproven,
}

impl Reason {
    /// The stable name: snake case, what alerts and scripts match on.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::PoolLowSpace => "pool_low_space",
            Reason::PoolOutOfSpace => "pool_out_of_space",
            Reason::PoolOvercommitted => "pool_overcommitted",
            Reason::PoolUnreachable => "pool_unreachable",
            Reason::RecordDamaged => "record_damaged",
            Reason::DataMissing => "data_missing",
            Reason::DataUnreadable => "data_unreadable",
            Reason::PoolFull => "pool_full",
            Reason::NotMounted => "not_mounted",
            Reason::NoLoopDevice => "no_loop_device",
            Reason::LoopIoErrors => "loop_io_errors",
            Reason::FilesystemErrors => "filesystem_errors",
            Reason::FilesystemReadOnly => "filesystem_read_only",
            Reason::FilesystemShutdown => "filesystem_shutdown",
            Reason::FenceUnproven => "fence_unproven",
        }
    }

    /// Every reason, for the metrics (a series per reason, present at 0,
    /// so an alert can tell "healthy" from "not reported").
    pub const ALL: [Reason; 15] = [
        Reason::PoolLowSpace,
        Reason::PoolOutOfSpace,
        Reason::PoolOvercommitted,
        Reason::PoolUnreachable,
        Reason::RecordDamaged,
        Reason::DataMissing,
        Reason::DataUnreadable,
        Reason::PoolFull,
        Reason::NotMounted,
        Reason::NoLoopDevice,
        Reason::LoopIoErrors,
        Reason::FilesystemErrors,
        Reason::FilesystemReadOnly,
        Reason::FilesystemShutdown,
        Reason::FenceUnproven,
    ];

    /// The name on the CSI v1.13 wire, whose `reason` fields are "a
    /// brief CamelCase string": the stable name in CamelCase
    /// (`pool_full` is `PoolFull`).
    pub fn camel_case(self) -> String {
        self.as_str()
            .split('_')
            .map(|w| {
                let mut c = w.chars();
                c.next()
                    .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                    .unwrap_or_default()
            })
            .collect()
    }

    /// How bad a finding of this reason is.
    pub fn severity(self) -> Severity {
        match self {
            Reason::PoolUnreachable
            | Reason::RecordDamaged
            | Reason::DataMissing
            | Reason::DataUnreadable
            | Reason::NotMounted
            | Reason::NoLoopDevice => Severity::Inaccessible,
            Reason::PoolLowSpace
            | Reason::PoolOutOfSpace
            | Reason::PoolOvercommitted
            | Reason::PoolFull
            | Reason::LoopIoErrors
            | Reason::FilesystemErrors
            | Reason::FilesystemReadOnly
            | Reason::FilesystemShutdown
            | Reason::FenceUnproven => Severity::Degraded,
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One thing wrong, with what to do about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// What kind of fault.
    pub reason: Reason,
    /// What happened, to which object, and what to do.
    pub message: String,
}

impl Finding {
    /// A finding of `reason`.
    pub fn new(reason: Reason, message: impl Into<String>) -> Finding {
        Finding {
            reason,
            message: message.into(),
        }
    }

    /// How bad it is.
    pub fn severity(&self) -> Severity {
        self.reason.severity()
    }
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.reason, self.message)
    }
}

/// The findings about one object (a volume, the pool): none is healthy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Health {
    /// What is wrong, in the order found, one per reason.
    pub findings: Vec<Finding>,
}

impl Health {
    /// Healthy.
    pub fn ok() -> Health {
        Health::default()
    }

    /// Adds a finding, unless one of the same reason is already there
    /// (the first one found says it).
    pub fn add(&mut self, finding: Finding) {
        if !self.findings.iter().any(|f| f.reason == finding.reason) {
            self.findings.push(finding);
        }
    }

    /// Adds every finding of `other`.
    pub fn extend(&mut self, other: Health) {
        for f in other.findings {
            self.add(f);
        }
    }

    /// Whether nothing is wrong.
    pub fn is_healthy(&self) -> bool {
        self.findings.is_empty()
    }

    /// The worst severity found, if any.
    pub fn worst(&self) -> Option<Severity> {
        self.findings.iter().map(Finding::severity).max()
    }

    /// Whether a finding of `reason` is there.
    pub fn has(&self, reason: Reason) -> bool {
        self.findings.iter().any(|f| f.reason == reason)
    }

    /// One line for a message field: every finding, reason first, joined
    /// by "; ". Empty when healthy.
    pub fn message(&self) -> String {
        let parts: Vec<String> = self.findings.iter().map(ToString::to_string).collect();
        parts.join("; ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_worst_finding_decides_and_a_reason_is_said_once() {
        let mut h = Health::ok();
        assert!(h.is_healthy());
        assert_eq!(h.worst(), None);
        h.add(Finding::new(Reason::PoolFull, "the pool is full"));
        assert_eq!(h.worst(), Some(Severity::Degraded));
        h.add(Finding::new(Reason::DataMissing, "image x is gone"));
        h.add(Finding::new(Reason::PoolFull, "said again"));
        assert_eq!(h.worst(), Some(Severity::Inaccessible));
        assert_eq!(
            h.message(),
            "pool_full: the pool is full; data_missing: image x is gone"
        );
    }

    #[test]
    fn reason_names_are_distinct_and_every_reason_is_listed() {
        let names: std::collections::BTreeSet<&str> =
            Reason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(names.len(), Reason::ALL.len());
        for r in Reason::ALL {
            assert!(r
                .as_str()
                .chars()
                .all(|c| c.is_ascii_lowercase() || c == '_'));
        }
        assert_eq!(Reason::PoolFull.camel_case(), "PoolFull");
        assert_eq!(
            Reason::FilesystemReadOnly.camel_case(),
            "FilesystemReadOnly"
        );
    }
}
