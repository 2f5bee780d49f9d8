//! NodePublishVolume and NodeUnpublishVolume as the service hands them
//! over: which volume a request names, and whether the node makes and
//! stages it itself (an ephemeral inline volume, [`ephemeral`]) or finds it
//! staged by NodeStageVolume (`publish`).
//!
//! A publish is decided in two steps so that a request refused changes
//! nothing and takes no lock: [`Node::plan_publish`] reads the request
//! (no syscall), [`Node::publish_volume`] does the work on a worker.
//!
//! [`ephemeral`]: super::ephemeral

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::ephemeral;
use super::{Node, NodeError, Request};
use crate::pool::capability::Capability;
use crate::pool::new_volume::Refused;
use crate::pool::{Pool, VolumeSpec};

/// Where a NodePublishVolume's volume comes from, decided from the request
/// before anything is done.
#[derive(Debug, Clone)]
pub enum Publication {
    /// A volume NodeStageVolume staged at `staging` (a path checked to lie
    /// under the kubelet directory), published if it serves `cap`.
    Staged {
        /// The staging path.
        staging: PathBuf,
        /// The capability the volume must serve.
        cap: Capability,
    },
    /// An ephemeral inline volume: the node creates the pool volume `spec`
    /// (or finds it, on a retry) and stages it at `staging`, a directory of
    /// the plugin's own ([`ephemeral::staging`]).
    Ephemeral {
        /// The pool volume behind it.
        spec: VolumeSpec,
        /// Where the node stages it.
        staging: PathBuf,
    },
}

/// Why a NodePublishVolume is refused before anything is done: a field the
/// node cannot serve (an ephemeral volume's attributes), or a node rule (a
/// volume not staged, a path outside the kubelet directory).
#[derive(Debug, thiserror::Error)]
pub enum PublishRefused {
    /// A request field asks for what cannot be made.
    #[error(transparent)]
    Request(#[from] Refused),
    /// The node refuses the request.
    #[error(transparent)]
    Node(#[from] NodeError),
}

impl Node {
    /// Decides how NodePublishVolume serves `req`. A `volume_context` that
    /// marks the volume ephemeral gets a volume of its own, staged by the
    /// node in `driver_name`'s directory, where this node makes them and
    /// within its per-volume limit (see [`ephemeral`]); any other volume must have been
    /// staged by NodeStageVolume at `staging_target_path`, and an empty
    /// one means it was not ([`NodeError::NotStaged`]).
    pub fn plan_publish(
        &self,
        driver_name: &str,
        req: &Request,
        cap: &Capability,
        volume_context: &HashMap<String, String>,
        staging_target_path: &str,
    ) -> Result<Publication, PublishRefused> {
        let id = &req.volume_id;
        if ephemeral::requested(volume_context) {
            // Off, or larger than one may be: refused before anything is
            // made. This node's total is counted on the worker, at creation.
            let limits = self.ephemeral_limits(id)?;
            let spec = ephemeral::spec(id, cap, volume_context)?;
            ephemeral::check_size(&spec, &limits)?;
            return Ok(Publication::Ephemeral {
                spec,
                staging: self.ephemeral_staging(driver_name, id),
            });
        }
        if staging_target_path.is_empty() {
            return Err(NodeError::NotStaged {
                id: id.clone(),
                path: PathBuf::new(),
            }
            .into());
        }
        Ok(Publication::Staged {
            staging: self.check_path("staging_target_path", staging_target_path)?,
            cap: cap.clone(),
        })
    }

    /// NodePublishVolume as [`Node::plan_publish`] decided: an ephemeral
    /// volume is made, staged and published ([`Node::publish_ephemeral`]);
    /// a staged one is read from the pool, checked against the capability
    /// and published ([`Node::publish`]).
    pub fn publish_volume(
        &self,
        pool: &Pool,
        publication: &Publication,
        target: &Path,
        req: &Request,
    ) -> Result<(), NodeError> {
        match publication {
            Publication::Ephemeral { spec, staging } => {
                self.publish_ephemeral(pool, spec, staging, target, req)
            }
            Publication::Staged { staging, cap } => {
                let v = pool.volume_for(&req.volume_id, cap)?;
                self.publish(pool, &v, staging, target, req)
            }
        }
    }

    /// NodeUnpublishVolume of kubelet's `volume_id` at `target`: unbinds the
    /// pool volume it names ([`ephemeral::pool_id`]), then, if that is an
    /// ephemeral volume, removes it with its last (only) publish: unstages
    /// it from `driver_name`'s directory and deletes it
    /// ([`Node::remove_ephemeral`]).
    pub fn unpublish_volume(
        &self,
        pool: &Pool,
        driver_name: &str,
        volume_id: &str,
        target: &Path,
    ) -> Result<(), NodeError> {
        let pool_id = ephemeral::pool_id(pool, volume_id)?;
        self.unpublish(pool, &pool_id, target)?;
        self.remove_ephemeral(
            pool,
            volume_id,
            &self.ephemeral_staging(driver_name, volume_id),
        )
    }
}
