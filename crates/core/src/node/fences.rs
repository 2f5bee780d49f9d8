//! The fences this node plugin holds: one lock per staged volume, in the
//! pool, so that no other node plugin (on this host or another sharing the
//! pool) mounts a single-writer image at the same time, and no DeleteVolume
//! or byte copy touches a staged volume.
//!
//! Exclusive for an image staged for writing; shared for read-only stages
//! and for directories. The lock lives as long as its open file, which this
//! table owns: releasing a fence is dropping its entry.

use std::collections::HashMap;

use parking_lot::Mutex;

use super::error::NodeError;
use crate::pool::store::Fence;
use crate::pool::Pool;
use crate::sys::lock::LockKind;

/// The fences held, by volume id, and of which kind.
#[derive(Debug, Default)]
pub(super) struct Fences {
    held: Mutex<HashMap<String, (Fence, LockKind)>>,
}

impl Fences {
    /// Takes the volume's fence for this process, unless it holds it
    /// already. `Ok(true)` when taken by this call (so a failed stage knows
    /// to let it go).
    pub(super) fn take(&self, pool: &Pool, id: &str, kind: LockKind) -> Result<bool, NodeError> {
        let fenced = || NodeError::Fenced {
            id: id.to_owned(),
            image: pool.image_path(id),
        };
        let mut held = self.held.lock();
        if let Some((fence, have)) = held.get_mut(id) {
            // Staged before (another staging path, or a retry). A writer's
            // stage after a read-only one needs the fence exclusively: the
            // open file's lock is converted, which fails while any other
            // process holds it shared.
            if *have == LockKind::Shared && kind == LockKind::Exclusive {
                if !fence.upgrade()? {
                    return Err(fenced());
                }
                *have = LockKind::Exclusive;
            }
            return Ok(false);
        }
        match pool.fence_volume(id, kind)? {
            Some(fence) => {
                log::debug!("volume {id}: fence taken");
                held.insert(id.to_owned(), (fence, kind));
                Ok(true)
            }
            None => Err(fenced()),
        }
    }

    /// Lets go of the volume's fence, if this process holds it.
    pub(super) fn release(&self, id: &str) {
        if self.held.lock().remove(id).is_some() {
            log::debug!("volume {id}: fence released");
        }
    }

    /// The kind of fence held on the volume, if any.
    pub(super) fn held(&self, id: &str) -> Option<LockKind> {
        self.held.lock().get(id).map(|(_, kind)| *kind)
    }
}
