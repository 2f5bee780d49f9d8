//! CSI ephemeral inline volumes: a volume that lives exactly as long as the
//! pod that names it in its spec. kubelet calls only NodePublishVolume and
//! NodeUnpublishVolume for them, so the node plugin does the whole life
//! itself: create the pool volume, stage it in the plugin's own directory,
//! publish it; and on unpublish the reverse, down to deleting the volume.
//!
//! They are off unless the operator turns them on ([`Limits`], the node's
//! `--ephemeral-inline`): the size comes from the pod spec, which any pod
//! author writes, so without a bound one pod could take the whole pool from
//! every PersistentVolumeClaim. When on, one volume is at most
//! [`Limits::max_size`] and this node's ephemeral volumes together at most
//! [`Limits::max_per_node`]. That total is read from the node's own
//! ephemeral staging directory and the pool's records at every creation
//! ([`Node::ephemeral_bytes`]), never kept in memory, so a restarted plugin
//! counts what it made before.
//!
//! Three steps that each take something, on a call kubelet retries: a step
//! that fails gives back what the steps before it took in this call
//! (unstage, then the staging directory, then a volume this call created),
//! so a retry starts from nothing and a pod that never starts leaves no
//! volume behind. A volume that was there before the call (an earlier
//! publish, answered OK) is never deleted by a failed retry.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};

use super::error::{sys, NodeError};
use super::rollback::Rollback;
use super::{Node, Request};
use crate::pool::capability::Capability;
use crate::pool::new_volume::Refused;
use crate::pool::{align_up, CapacityRange, Pool, PoolError, VolumeSpec};
use crate::units::parse_size;
use crate::volume::ids;
use crate::volume::meta::{AccessType, FsType, Layout, VolumeMeta};

/// The volume_context key kubelet sets on ephemeral inline volumes.
pub const EPHEMERAL_KEY: &str = "csi.storage.k8s.io/ephemeral";
/// The volume attribute that sizes an ephemeral volume.
pub const SIZE_KEY: &str = "size";
/// The size of an ephemeral volume that names none.
pub const DEFAULT_SIZE: u64 = 1 << 30;

/// How big ephemeral inline volumes may get on a node that makes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The most one ephemeral volume may take in the pool, in bytes.
    pub max_size: u64,
    /// The most this node's ephemeral volumes may take together, in bytes.
    pub max_per_node: u64,
}

impl Default for Limits {
    /// 1 GiB a volume (the size of one that names none) and 10 GiB a node.
    fn default() -> Self {
        Limits {
            max_size: DEFAULT_SIZE,
            max_per_node: 10 << 30,
        }
    }
}

/// Keeps the count of this node's ephemeral bytes and the creation it
/// admits together: two publishes that each fit alone must not both be
/// admitted when together they do not.
#[derive(Debug, Default)]
pub(super) struct Admission(Mutex<()>);

impl Admission {
    fn hold(&self) -> MutexGuard<'_, ()> {
        // The guarded data is nothing: a panic while held leaves no state
        // to distrust.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The bytes a volume of `spec` takes in the pool: its size rounded as the
/// pool rounds a new volume's (whole MiB, at least its filesystem's
/// minimum), which is what the limits bound.
pub fn size_in_pool(spec: &VolumeSpec) -> u64 {
    let min = spec.fs_type.map_or(0, FsType::min_bytes);
    align_up(spec.capacity.required.max(min))
}

/// Refuses an ephemeral volume of `spec` larger than `limits` allow one
/// ([`NodeError::EphemeralTooLarge`]); nothing is read or made.
pub fn check_size(spec: &VolumeSpec, limits: &Limits) -> Result<(), NodeError> {
    let size = size_in_pool(spec);
    if size > limits.max_size {
        return Err(NodeError::EphemeralTooLarge {
            id: spec.name.clone(),
            size,
            max: limits.max_size,
        });
    }
    Ok(())
}

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
    /// What this node allows of ephemeral inline volumes: its [`Limits`],
    /// or [`NodeError::EphemeralOff`] for the volume kubelet calls `id`.
    pub fn ephemeral_limits(&self, id: &str) -> Result<Limits, NodeError> {
        self.ephemeral
            .ok_or_else(|| NodeError::EphemeralOff { id: id.to_owned() })
    }

    /// The bytes this node's ephemeral volumes take in the pool now: every
    /// entry of `dir`, this node's ephemeral staging directory (one per
    /// kubelet volume id, made by the publish that created the volume and
    /// removed with it), whose pool volume exists and is ephemeral. Read
    /// from the directory and the records, so a restarted plugin counts
    /// what it made before, and another node's volumes in a shared pool
    /// are not this node's. A record that cannot be read fails the count:
    /// a limit is not enforced on a guess.
    pub fn ephemeral_bytes(&self, pool: &Pool, dir: &Path) -> Result<u64, NodeError> {
        let entries = match std::fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(sys("list", dir)(e)),
        };
        let mut total = 0u64;
        for entry in entries {
            let entry = entry.map_err(sys("list", dir))?;
            // Named after kubelet's volume id, which is UTF-8.
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            match pool.volume(&ids::derive(ids::Kind::Volume, &name)) {
                Ok(v) if is_ephemeral(&v) => total = total.saturating_add(v.capacity_bytes),
                Ok(_) | Err(PoolError::NotFound { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(total)
    }

    /// Admits a new ephemeral volume of `spec`, to be staged at `staging`:
    /// refused when it is larger than one may be, or when this node's
    /// ephemeral volumes (counted from `staging`'s parent) would then take
    /// more than `limits` allow ([`NodeError::EphemeralNodeFull`]). The
    /// guard returned keeps other admissions out until the volume and its
    /// staging directory exist, so that the next count sees it.
    fn admit_ephemeral(
        &self,
        pool: &Pool,
        spec: &VolumeSpec,
        staging: &Path,
    ) -> Result<MutexGuard<'_, ()>, NodeError> {
        let limits = self.ephemeral_limits(&spec.name)?;
        check_size(spec, &limits)?;
        let held = self.ephemeral_admission.hold();
        let size = size_in_pool(spec);
        let used = match staging.parent() {
            Some(dir) => self.ephemeral_bytes(pool, dir)?,
            None => 0,
        };
        if used.saturating_add(size) > limits.max_per_node {
            return Err(NodeError::EphemeralNodeFull {
                id: spec.name.clone(),
                size,
                used,
                max: limits.max_per_node,
            });
        }
        Ok(held)
    }

    /// Where this node stages the ephemeral volume kubelet calls
    /// `volume_id`: [`staging`] under its kubelet directory, in the
    /// directory of the plugin named `driver_name`.
    pub fn ephemeral_staging(&self, driver_name: &str, volume_id: &str) -> PathBuf {
        staging(self.kubelet_dir(), driver_name, volume_id)
    }

    /// NodePublishVolume of an ephemeral volume: creates the pool volume
    /// described by `spec` (or finds it, on a retry), stages it at
    /// `staging` and publishes it at `target`; a failure undoes what this
    /// call did (see the module). A new volume must be allowed by the
    /// node's [`Limits`] first (off: [`NodeError::EphemeralOff`]); one an
    /// earlier publish made is already counted.
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
        let admitted = if existed {
            // kubelet's retry of a publish that made it: already counted in
            // this node's total.
            check_size(spec, &self.ephemeral_limits(&spec.name)?)?;
            None
        } else {
            Some(self.admit_ephemeral(pool, spec, staging)?)
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
            // Counted from here on (volume and directory both exist): the
            // next admission may go ahead while this one formats.
            drop(admitted);
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
