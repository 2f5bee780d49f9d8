//! Undoing what a node operation took when it fails part-way.
//!
//! A stage attaches a loop device, takes the volume's fence, mounts; a
//! publish binds, remounts, applies a group. Each step that succeeds pushes
//! its undo here; [`Rollback::finish`] keeps them all when the operation
//! succeeds and runs them newest first when it fails. An undo that fails as
//! well is not dropped: the caller gets both errors
//! ([`NodeError::RollbackFailed`]), because what is left behind (an attached
//! device, a mount) is what an operator has to clean up.

use std::io;

use super::error::NodeError;

/// One undo: what it does (for messages) and how.
type Step<'a> = (String, Box<dyn FnOnce() -> io::Result<()> + 'a>);

/// The undo steps of an operation in progress.
#[must_use = "an operation's undo steps run only through finish()"]
pub struct Rollback<'a> {
    steps: Vec<Step<'a>>,
}

impl std::fmt::Debug for Rollback<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.steps.iter().map(|(what, _)| what))
            .finish()
    }
}

impl<'a> Rollback<'a> {
    /// Nothing to undo yet.
    pub fn new() -> Self {
        Rollback { steps: Vec::new() }
    }

    /// Records how to undo a step that just succeeded; `what` names the undo
    /// for the error message ("detach /dev/loop3").
    pub fn push(&mut self, what: impl Into<String>, undo: impl FnOnce() -> io::Result<()> + 'a) {
        self.steps.push((what.into(), Box::new(undo)));
    }

    /// Ends the operation: on success every step stays; on failure each is
    /// undone, newest first, and undos that fail are reported with the
    /// error that caused them.
    pub fn finish<T>(mut self, result: Result<T, NodeError>) -> Result<T, NodeError> {
        match result {
            Ok(v) => {
                self.keep();
                Ok(v)
            }
            Err(error) => Err(with_failed_undos(error, self.undo())),
        }
    }

    /// Keeps every step (the operation succeeded).
    pub fn keep(&mut self) {
        self.steps.clear();
    }

    /// Undoes every step now, newest first; returns the undos that failed.
    pub fn undo(&mut self) -> Vec<String> {
        let mut failed = Vec::new();
        while let Some((what, undo)) = self.steps.pop() {
            if let Err(e) = undo() {
                log::error!("undoing a failed node operation: {what}: {e}");
                failed.push(format!("{what}: {e}"));
            }
        }
        failed
    }
}

/// The error that made an operation fail, with the undos that failed too
/// (`failed`, as [`Rollback::undo`] gives them), if any.
pub fn with_failed_undos(error: NodeError, failed: Vec<String>) -> NodeError {
    if failed.is_empty() {
        error
    } else {
        NodeError::RollbackFailed {
            error: Box::new(error),
            undo: failed.join("; "),
        }
    }
}

impl Drop for Rollback<'_> {
    /// An operation that panicked never reached `finish`: undo it anyway
    /// (the worker survives the panic; what it took must not stay).
    fn drop(&mut self) {
        if !self.steps.is_empty() {
            self.undo();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    fn failed() -> Result<(), NodeError> {
        Err(NodeError::NotFound {
            what: "test",
            path: "/x".into(),
        })
    }

    #[test]
    fn success_keeps_and_failure_undoes_newest_first() {
        let log = RefCell::new(Vec::new());
        let mut r = Rollback::new();
        r.push("one", || {
            log.borrow_mut().push(1);
            Ok(())
        });
        assert!(r.finish(Ok(())).is_ok());
        assert!(log.borrow().is_empty());

        let mut r = Rollback::new();
        r.push("one", || {
            log.borrow_mut().push(1);
            Ok(())
        });
        r.push("two", || {
            log.borrow_mut().push(2);
            Ok(())
        });
        let e = r.finish(failed()).unwrap_err();
        assert!(matches!(e, NodeError::NotFound { .. }));
        assert_eq!(*log.borrow(), vec![2, 1]);
    }

    #[test]
    fn a_failed_undo_is_reported_with_the_cause() {
        let mut r = Rollback::new();
        r.push("detach /dev/loop9", || Err(io::Error::other("device busy")));
        let e = r.finish(failed()).unwrap_err();
        let text = e.to_string();
        assert!(text.contains("test /x does not exist"), "{text}");
        assert!(text.contains("detach /dev/loop9: device busy"), "{text}");
    }
}
