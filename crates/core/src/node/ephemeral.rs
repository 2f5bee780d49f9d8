//! CSI ephemeral inline volumes: a volume that lives exactly as long as the
//! pod that names it in its spec. kubelet calls only NodePublishVolume and
//! NodeUnpublishVolume for them, so the node plugin does the whole life
//! itself: create the pool volume, stage it in the plugin's own directory,
//! publish it; and on unpublish the reverse, down to deleting the volume.
//!
//! Three steps that each take something, on a call kubelet retries: a step
//! that fails gives back what the steps before it took in this call
//! (unstage, then the staging directory, then a volume this call created),
//! so a retry starts from nothing and a pod that never starts leaves no
//! volume behind. A volume that was there before the call (an earlier
//! publish, answered OK) is never deleted by a failed retry.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use super::error::{sys, NodeError};
use super::rollback::Rollback;
use super::{Node, Request};
use crate::pool::capability::Capability;
use crate::pool::new_volume::Refused;
use crate::pool::{CapacityRange, Pool, PoolError, VolumeSpec};
use crate::units::parse_size;
use crate::volume::ids;
use crate::volume::meta::{AccessType, FsType, Layout, VolumeMeta};

/// The volume_context key kubelet sets on ephemeral inline volumes.
pub const EPHEMERAL_KEY: &str = "csi.storage.k8s.io/ephemeral";
/// The volume attribute that sizes an ephemeral volume.
pub const SIZE_KEY: &str = "size";
/// The size of an ephemeral volume that names none.
pub const DEFAULT_SIZE: u64 = 1 << 30;

fn refused(field: &'static str, reason: impl Into<String>) -> Refused {
    Refused {
        field,
        reason: reason.into(),
    }
}

/// Whether a publish's volume_context says the volume is ephemeral.
pub fn requested(context: &HashMap<String, String>) -> bool {
    context.get(EPHEMERAL_KEY).is_some_and(|v| v == "true")
}

/// Whether a pool volume was made for an ephemeral inline volume.
pub fn is_ephemeral(v: &VolumeMeta) -> bool {
    v.parameters.get(EPHEMERAL_KEY).is_some_and(|e| e == "true")
}

/// The pool volume behind an ephemeral inline volume: named after kubelet's
/// volume id, sized by the `size` attribute, marked ephemeral so that
/// unpublish removes it.
pub fn spec(
    volume_id: &str,
    cap: &Capability,
    context: &HashMap<String, String>,
) -> Result<VolumeSpec, Refused> {
    if cap.access != AccessType::Mount {
        return Err(refused(
            "volume_capability",
            "ephemeral inline volumes are filesystems",
        ));
    }
    let mut size = DEFAULT_SIZE;
    for (key, value) in context {
        match key.as_str() {
            SIZE_KEY => {
                size = parse_size(value)
                    .map_err(|e| refused("volume_context", format!("size: {e}")))?
            }
            k if k.starts_with("csi.storage.k8s.io/") => {}
            other => {
                return Err(refused(
                    "volume_context",
                    format!("unknown attribute {other:?}; ephemeral volumes take `size`"),
                ))
            }
        }
    }
    let fs_type = FsType::parse(&cap.fs_type).ok_or_else(|| {
        refused(
            "volume_capability",
            format!("fs_type {:?} is not supported", cap.fs_type),
        )
    })?;
    Ok(VolumeSpec {
        name: volume_id.to_owned(),
        layout: Layout::Image,
        capacity: CapacityRange {
            required: size,
            limit: 0,
        },
        access: AccessType::Mount,
        fs_type: Some(fs_type),
        thick: false,
        mkfs_options: Vec::new(),
        parameters: BTreeMap::from([(EPHEMERAL_KEY.to_owned(), "true".to_owned())]),
        mutable_parameters: BTreeMap::new(),
        source: None,
        modes: vec![cap.mode],
    })
}

/// Where an ephemeral volume is staged: the plugin's own directory under
/// the kubelet directory, one per kubelet volume id.
pub fn staging(kubelet_dir: &Path, driver_name: &str, volume_id: &str) -> PathBuf {
    kubelet_dir
        .join("plugins")
        .join(driver_name)
        .join("ephemeral")
        .join(volume_id)
}

/// The pool volume that kubelet's `volume_id` names: an ephemeral
/// volume's id is derived from it (see [`Node::publish_ephemeral`]); any
/// other volume's is the id itself.
pub fn pool_id(pool: &Pool, volume_id: &str) -> Result<String, NodeError> {
    let derived = ids::derive(ids::Kind::Volume, volume_id);
    match pool.volume(&derived) {
        Ok(v) if is_ephemeral(&v) => Ok(derived),
        Ok(_) | Err(PoolError::NotFound { .. }) => Ok(volume_id.to_owned()),
        Err(e) => Err(e.into()),
    }
}

impl Node {
    /// Where this node stages the ephemeral volume kubelet calls
    /// `volume_id`: [`staging`] under its kubelet directory, in the
    /// directory of the plugin named `driver_name`.
    pub fn ephemeral_staging(&self, driver_name: &str, volume_id: &str) -> PathBuf {
        staging(self.kubelet_dir(), driver_name, volume_id)
    }

    /// NodePublishVolume of an ephemeral volume: creates the pool volume
    /// described by `spec` (or finds it, on a retry), stages it at
    /// `staging` and publishes it at `target`; a failure undoes what this
    /// call did (see the module).
    pub fn publish_ephemeral(
        &self,
        pool: &Pool,
        spec: &VolumeSpec,
        staging: &Path,
        target: &Path,
        req: &Request,
    ) -> Result<(), NodeError> {
        let id = ids::derive(ids::Kind::Volume, &spec.name);
        let existed = match pool.volume(&id) {
            Ok(_) => true,
            Err(PoolError::NotFound { .. }) => false,
            Err(e) => return Err(e.into()),
        };
        let mut undo = Rollback::new();
        let result = (|| {
            let v = pool.create_volume(spec)?;
            if !existed {
                undo.push(format!("delete volume {id}"), || {
                    pool.delete_volume(&id).map_err(std::io::Error::other)
                });
            }
            if !crate::sys::fs::exists(staging).map_err(sys("stat", staging))? {
                std::fs::create_dir_all(staging).map_err(sys("create", staging))?;
                undo.push(format!("remove {}", staging.display()), || {
                    std::fs::remove_dir(staging)
                });
            }
            self.stage(pool, &v, staging, req)?;
            undo.push(format!("unstage {}", staging.display()), || {
                self.unstage(pool, &id, staging)
                    .map_err(std::io::Error::other)
            });
            self.publish(pool, &v, staging, target, req)
        })();
        undo.finish(result)
    }

    /// After NodeUnpublishVolume: if kubelet's `volume_id` is an ephemeral
    /// volume of `pool`, unstages it from `staging`, removes the staging
    /// directory and deletes the volume. Anything else is left alone.
    pub fn remove_ephemeral(
        &self,
        pool: &Pool,
        volume_id: &str,
        staging: &Path,
    ) -> Result<(), NodeError> {
        let id = ids::derive(ids::Kind::Volume, volume_id);
        let v = match pool.volume(&id) {
            Ok(v) => v,
            Err(PoolError::NotFound { .. }) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        if !is_ephemeral(&v) {
            return Ok(());
        }
        self.unstage(pool, &id, staging)?;
        if crate::sys::fs::exists(staging).map_err(sys("stat", staging))? {
            std::fs::remove_dir(staging).map_err(sys("remove", staging))?;
        }
        pool.delete_volume(&id)?;
        Ok(())
    }
}
