//! The Node service: requests checked on the completion-queue thread, the
//! mounts and loop devices done by `filevol_core::node` on a worker.

use std::path::PathBuf;
use std::sync::Arc;

use super::validate;
use super::{convert, volume_key, Driver, Operation};
use crate::error::Error;
use crate::executor::Job;
use crate::proto::csi;
use crate::proto::csi::node_service_capability::rpc::Type as NodeCap;
use crate::rpc::Rpc;
use filevol_core::node::{Node, Request};
use filevol_core::pool::capability::Capability;
use filevol_core::volume::meta::VolumeMeta;

/// The node side. Always there when a node call gets this far: dispatch
/// refuses node calls in a mode without it (`Driver::serves`).
fn node(driver: &Driver) -> Result<&Node, Error> {
    driver.node.as_ref().ok_or_else(|| Error::NotServed {
        rpc: Rpc::NodeGetInfo,
        reason: "this process has no node side".into(),
    })
}

fn node_path(driver: &Driver, field: &'static str, path: &str) -> Result<PathBuf, Error> {
    if path.is_empty() {
        return Err(Error::invalid(field, "is required"));
    }
    Ok(node(driver)?.check_path(field, path)?)
}

fn required_capability(
    cap: &protobuf::MessageField<csi::VolumeCapability>,
) -> Result<Capability, Error> {
    match cap.as_ref() {
        Some(c) => validate::capability("volume_capability", c),
        None => Err(Error::invalid("volume_capability", "is required")),
    }
}

fn request(volume_id: &str, cap: &Capability, readonly: bool) -> Result<Request, Error> {
    let mount_group = if cap.mount_group.is_empty() {
        None
    } else {
        Some(cap.mount_group.parse::<u32>().map_err(|_| {
            Error::invalid(
                "volume_capability.mount.volume_mount_group",
                format!("{:?} is not a group id", cap.mount_group),
            )
        })?)
    };
    Ok(Request {
        volume_id: volume_id.to_owned(),
        access: cap.access,
        mode: cap.mode,
        mount_flags: cap.mount_flags.clone(),
        mount_group,
        readonly,
    })
}

/// The volume, checked against the capability the CO asks for.
fn volume_for(driver: &Driver, id: &str, cap: &Capability) -> Result<VolumeMeta, Error> {
    Ok(driver.pool.volume_for(id, cap)?)
}

impl Operation for csi::NodeStageVolumeRequest {
    type Response = csi::NodeStageVolumeResponse;
    const RPC: Rpc = Rpc::NodeStageVolume;

    fn prepare(self, driver: &Arc<Driver>) -> Result<Job<Self::Response>, Error> {
        validate::id("volume_id", &self.volume_id)?;
        let staging = node_path(driver, "staging_target_path", &self.staging_target_path)?;
        let cap = required_capability(&self.volume_capability)?;
        let req = request(&self.volume_id, &cap, false)?;
        let (driver, id) = (Arc::clone(driver), self.volume_id);
        let key = volume_key(&id);
        Ok(Job::new(move || {
            let v = volume_for(&driver, &id, &cap)?;
            node(&driver)?.stage(&driver.pool, &v, &staging, &req)?;
            Ok(csi::NodeStageVolumeResponse::new())
        })
        .locking(key))
    }
}

impl Operation for csi::NodeUnstageVolumeRequest {
    type Response = csi::NodeUnstageVolumeResponse;
    const RPC: Rpc = Rpc::NodeUnstageVolume;

    fn prepare(self, driver: &Arc<Driver>) -> Result<Job<Self::Response>, Error> {
        validate::id("volume_id", &self.volume_id)?;
        let staging = node_path(driver, "staging_target_path", &self.staging_target_path)?;
        let (driver, id) = (Arc::clone(driver), self.volume_id);
        let key = volume_key(&id);
        Ok(Job::new(move || {
            node(&driver)?.unstage(&driver.pool, &id, &staging)?;
            Ok(csi::NodeUnstageVolumeResponse::new())
        })
        .locking(key))
    }
}

impl Operation for csi::NodePublishVolumeRequest {
    type Response = csi::NodePublishVolumeResponse;
    const RPC: Rpc = Rpc::NodePublishVolume;

    fn prepare(self, driver: &Arc<Driver>) -> Result<Job<Self::Response>, Error> {
        validate::id("volume_id", &self.volume_id)?;
        let target = node_path(driver, "target_path", &self.target_path)?;
        let cap = required_capability(&self.volume_capability)?;
        let req = request(&self.volume_id, &cap, self.readonly)?;
        let publication = node(driver)?.plan_publish(
            &driver.config.driver_name,
            &req,
            &cap,
            &self.volume_context,
            &self.staging_target_path,
        )?;
        let driver = Arc::clone(driver);
        let key = volume_key(&self.volume_id);
        Ok(Job::new(move || {
            node(&driver)?.publish_volume(&driver.pool, &publication, &target, &req)?;
            Ok(csi::NodePublishVolumeResponse::new())
        })
        .locking(key))
    }
}

impl Operation for csi::NodeUnpublishVolumeRequest {
    type Response = csi::NodeUnpublishVolumeResponse;
    const RPC: Rpc = Rpc::NodeUnpublishVolume;

    fn prepare(self, driver: &Arc<Driver>) -> Result<Job<Self::Response>, Error> {
        validate::id("volume_id", &self.volume_id)?;
        let target = node_path(driver, "target_path", &self.target_path)?;
        let (driver, id) = (Arc::clone(driver), self.volume_id);
        let key = volume_key(&id);
        Ok(Job::new(move || {
            node(&driver)?.unpublish_volume(
                &driver.pool,
                &driver.config.driver_name,
                &id,
                &target,
            )?;
            Ok(csi::NodeUnpublishVolumeResponse::new())
        })
        .locking(key))
    }
}

impl Operation for csi::NodeGetVolumeStatsRequest {
    type Response = csi::NodeGetVolumeStatsResponse;
    const RPC: Rpc = Rpc::NodeGetVolumeStats;

    fn prepare(self, driver: &Arc<Driver>) -> Result<Job<Self::Response>, Error> {
        validate::id("volume_id", &self.volume_id)?;
        let path = node_path(driver, "volume_path", &self.volume_path)?;
        let driver = Arc::clone(driver);
        // Stats read only: no lock, so a long stage does not stall them.
        Ok(Job::new(move || {
            // A pool that does not answer: no figures, and the condition
            // says why. The figures read the record and may stat the
            // image, so they are read under the health deadline too.
            let figures = super::health::unreachable(&driver).map_or_else(
                || {
                    let (d, id, path) = (Arc::clone(&driver), self.volume_id.clone(), path.clone());
                    super::health::under_deadline(&driver, move || {
                        let v = d.pool.volume(&id)?;
                        Ok::<_, Error>(node(&d)?.stats(&d.pool, &v, &path)?)
                    })
                },
                Err,
            );
            let stats = match figures {
                Ok(stats) => stats?,
                Err(h) if driver.config.volume_condition => {
                    let mut resp = csi::NodeGetVolumeStatsResponse::new();
                    resp.volume_condition = Some(convert::condition(&h)).into();
                    return Ok(resp);
                }
                Err(h) => return Err(Error::Unhealthy(h.message())),
            };
            let mut resp = csi::NodeGetVolumeStatsResponse::new();
            let usage = |unit: csi::volume_usage::Unit, (total, avail, used): (u64, u64, u64)| {
                let mut u = csi::VolumeUsage::new();
                u.unit = unit.into();
                u.total = convert::count(total);
                u.available = convert::count(avail);
                u.used = convert::count(used);
                u
            };
            if let Some(b) = stats.bytes {
                resp.usage.push(usage(csi::volume_usage::Unit::BYTES, b));
            }
            if let Some(i) = stats.inodes {
                resp.usage.push(usage(csi::volume_usage::Unit::INODES, i));
            }
            if driver.config.volume_condition {
                let health = super::health::on_node(&driver, &self.volume_id, Some(&path))?;
                resp.volume_condition = Some(convert::condition(&health)).into();
            }
            Ok(resp)
        }))
    }
}

impl Operation for csi::NodeGetVolumeHealthRequest {
    type Response = csi::NodeGetVolumeHealthResponse;
    const RPC: Rpc = Rpc::NodeGetVolumeHealth;

    fn prepare(self, driver: &Arc<Driver>) -> Result<Job<Self::Response>, Error> {
        validate::id("volume_id", &self.volume_id)?;
        // The publish path where the CO names one, else the staging path:
        // either is a mount of the volume. Both are optional (the CO may
        // ask about a volume it only tried to stage): without one, the
        // volume is looked at through its loop device.
        let path = if !self.volume_publish_path.is_empty() {
            Some(node_path(
                driver,
                "volume_publish_path",
                &self.volume_publish_path,
            )?)
        } else if !self.staging_target_path.is_empty() {
            Some(node_path(
                driver,
                "staging_target_path",
                &self.staging_target_path,
            )?)
        } else {
            None
        };
        let driver = Arc::clone(driver);
        // No lock: a health answer must not wait for a slow stage.
        Ok(Job::new(move || {
            let health = super::health::on_node(&driver, &self.volume_id, path.as_deref())?;
            let mut resp = csi::NodeGetVolumeHealthResponse::new();
            resp.volume_health = Some(convert::volume_health(&self.volume_id, &health)).into();
            Ok(resp)
        }))
    }
}

impl Operation for csi::NodeGetStorageHealthRequest {
    type Response = csi::NodeGetStorageHealthResponse;
    const RPC: Rpc = Rpc::NodeGetStorageHealth;

    fn prepare(self, driver: &Arc<Driver>) -> Result<Job<Self::Response>, Error> {
        let driver = Arc::clone(driver);
        Ok(Job::new(move || {
            let mut resp = csi::NodeGetStorageHealthResponse::new();
            resp.backend_health = convert::storage_health(&driver.health.pool_health());
            Ok(resp)
        }))
    }
}

impl Operation for csi::NodeExpandVolumeRequest {
    type Response = csi::NodeExpandVolumeResponse;
    const RPC: Rpc = Rpc::NodeExpandVolume;

    fn prepare(self, driver: &Arc<Driver>) -> Result<Job<Self::Response>, Error> {
        validate::id("volume_id", &self.volume_id)?;
        let path = node_path(driver, "volume_path", &self.volume_path)?;
        let range = validate::capacity(&self.capacity_range)?;
        let (driver, id) = (Arc::clone(driver), self.volume_id);
        let key = volume_key(&id);
        Ok(Job::new(move || {
            let v = driver.pool.volume(&id)?;
            let size = node(&driver)?.expand(&driver.pool, &v, &path, range)?;
            let mut resp = csi::NodeExpandVolumeResponse::new();
            resp.capacity_bytes = convert::count(size);
            Ok(resp)
        })
        .locking(key))
    }
}

impl Operation for csi::NodeGetCapabilitiesRequest {
    type Response = csi::NodeGetCapabilitiesResponse;
    const RPC: Rpc = Rpc::NodeGetCapabilities;

    fn prepare(self, driver: &Arc<Driver>) -> Result<Job<Self::Response>, Error> {
        let (condition, health) = (driver.config.volume_condition, driver.config.volume_health);
        Ok(Job::new(move || {
            let mut resp = csi::NodeGetCapabilitiesResponse::new();
            let always = [
                NodeCap::STAGE_UNSTAGE_VOLUME,
                NodeCap::GET_VOLUME_STATS,
                NodeCap::EXPAND_VOLUME,
                NodeCap::SINGLE_NODE_MULTI_WRITER,
                NodeCap::VOLUME_MOUNT_GROUP,
            ];
            let v12 = condition.then_some(NodeCap::VOLUME_CONDITION);
            let v13 = [NodeCap::GET_VOLUME_HEALTH, NodeCap::GET_STORAGE_HEALTH]
                .into_iter()
                .filter(move |_| health);
            for t in always.into_iter().chain(v12).chain(v13) {
                let mut rpc = csi::node_service_capability::RPC::new();
                rpc.type_ = t.into();
                let mut cap = csi::NodeServiceCapability::new();
                cap.set_rpc(rpc);
                resp.capabilities.push(cap);
            }
            Ok(resp)
        }))
    }
}

impl Operation for csi::NodeGetInfoRequest {
    type Response = csi::NodeGetInfoResponse;
    const RPC: Rpc = Rpc::NodeGetInfo;

    fn prepare(self, driver: &Arc<Driver>) -> Result<Job<Self::Response>, Error> {
        let driver = Arc::clone(driver);
        Ok(Job::new(move || {
            let mut resp = csi::NodeGetInfoResponse::new();
            resp.node_id.clone_from(&driver.config.node_id);
            resp.max_volumes_per_node = i64::from(driver.config.max_volumes_per_node);
            if !driver.config.topology.is_empty() {
                resp.accessible_topology = Some(convert::topology(&driver.config.topology)).into();
            }
            Ok(resp)
        }))
    }
}

impl Operation for crate::proto::filevol::TrimVolumesRequest {
    type Response = crate::proto::filevol::TrimVolumesResponse;
    const RPC: Rpc = Rpc::TrimVolumes;

    fn prepare(self, driver: &Arc<Driver>) -> Result<Job<Self::Response>, Error> {
        use crate::proto::filevol::{TrimVolumesResponse, VolumeTrim};
        for id in &self.volume_ids {
            validate::id("volume_ids", id)?;
        }
        let driver = Arc::clone(driver);
        // No lock-table keys: a trim of one volume at a time is kept apart
        // from its stages and unstages by the node's own gate, which makes
        // an unstage wait for a trim instead of refusing it ABORTED.
        Ok(Job::new(move || {
            let reports = node(&driver)?.trim(&driver.pool, &self.volume_ids)?;
            let mut resp = TrimVolumesResponse::new();
            for r in reports {
                let mut t = VolumeTrim::new();
                t.volume_id = r.id;
                t.path = r.mount_point.to_string_lossy().into_owned();
                match r.outcome {
                    Ok(Ok(done)) => {
                        t.trimmed = true;
                        t.discarded_bytes = done.discarded;
                        t.allocated_bytes_before = done.allocated_before;
                        t.allocated_bytes_after = done.allocated_after;
                    }
                    Ok(Err(why)) => t.skipped = why.to_string(),
                    Err(e) => t.error = filevol_core::error_chain::message_chain(&e),
                }
                resp.volumes.push(t);
            }
            Ok(resp)
        }))
    }
}
