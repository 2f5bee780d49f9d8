//! [`Claim`]: a volume being staged, attached and locked, as one guard.
//!
//! A stage takes two things another node or process must never see half
//! given back: the volume's fence (its lock in the pool) and its loop
//! device. Then it mounts, binds, remounts. When a step fails, what was
//! taken is given back newest first (the mounts, then the device), and the
//! fence last and only if everything it protects is gone: a device that
//! would not detach, or a mount that would not unmount, still writes the
//! image, so the fence stays held by this process (a later unstage, or the
//! next start's recovery, deals with it) and no other node attaches the
//! image beside it. Every undo that fails is reported with the error that
//! caused the rollback ([`NodeError::RollbackFailed`]), never dropped.
//!
//! A claim dropped without [`Claim::finish`] (a panic in the stage) undoes
//! the same way, logging what it could not undo.

use super::error::NodeError;
use super::rollback::{with_failed_undos, Rollback};
use super::Node;
use crate::pool::Pool;
use crate::sys::lock::LockKind;
use crate::sys::loopdev::LoopDevice;

/// A volume's fence and loop device, held for a stage in progress.
#[must_use = "a claim is kept only through finish()"]
#[derive(Debug)]
pub(super) struct Claim<'a> {
    node: &'a Node,
    id: &'a str,
    /// Whether this claim took the fence (not a stage before it).
    took_fence: bool,
    /// The device this claim attached, if it attached one.
    attached: Option<LoopDevice>,
    /// The steps taken with the device since (mounts, binds).
    steps: Rollback<'a>,
    /// Cleared by `finish`: nothing left to undo on drop.
    armed: bool,
}

impl<'a> Claim<'a> {
    /// Takes the volume's fence of `kind` for this process (or keeps the one
    /// it holds, upgraded when a writer needs it).
    pub(super) fn fence(
        node: &'a Node,
        pool: &Pool,
        id: &'a str,
        kind: LockKind,
    ) -> Result<Claim<'a>, NodeError> {
        let took_fence = node.fences.take(pool, id, kind)?;
        Ok(Claim {
            node,
            id,
            took_fence,
            attached: None,
            steps: Rollback::new(),
            armed: true,
        })
    }

    /// Records that this claim attached `dev`: a failure detaches it.
    pub(super) fn attached(&mut self, dev: LoopDevice) {
        self.attached = Some(dev);
    }

    /// Records how to undo a step taken with the volume (a mount).
    pub(super) fn push(
        &mut self,
        what: impl Into<String>,
        undo: impl FnOnce() -> std::io::Result<()> + 'a,
    ) {
        self.steps.push(what, undo);
    }

    /// Ends the stage: on success the fence and device stay; on failure
    /// everything is undone as the module says, and the error comes back
    /// with every undo that failed.
    pub(super) fn finish<T>(mut self, result: Result<T, NodeError>) -> Result<T, NodeError> {
        self.armed = false;
        match result {
            Ok(v) => {
                self.steps.keep();
                Ok(v)
            }
            Err(error) => Err(with_failed_undos(error, self.undo())),
        }
    }

    /// Undoes the steps, then the attach, then (only if all of that
    /// succeeded) the fence. Returns what could not be undone.
    fn undo(&mut self) -> Vec<String> {
        let mut failed = self.steps.undo();
        if let Some(dev) = self.attached.take() {
            if let Err(e) = self.node.kernel.detach(dev) {
                log::error!(
                    "undoing a failed stage: detach {}: {e}",
                    dev.path().display()
                );
                failed.push(format!("detach {}: {e}", dev.path().display()));
            }
        }
        if self.took_fence {
            if failed.is_empty() {
                self.node.fences.release(self.id);
            } else {
                log::error!(
                    "volume {}: its fence stays held: what it protects could not be undone",
                    self.id
                );
                failed.push(format!(
                    "the fence of {} stays held until an unstage succeeds",
                    self.id
                ));
            }
        }
        failed
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.undo();
        }
    }
}
