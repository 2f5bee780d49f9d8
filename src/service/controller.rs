//! The Controller and GroupController services: volumes, snapshots and
//! attachments on the pool.
//!
//! Each `prepare` checks its request on the completion-queue thread, turns
//! it into typed values, and names the objects its job locks; the job then
//! calls the pool on a worker and converts the result.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::validate;
use super::{convert, group_key, snapshot_key, volume_key, Driver, Operation};
use crate::error::Error;
use crate::executor::Job;
use crate::proto::csi;
use crate::proto::csi::controller_service_capability::rpc::Type as CtrlCap;
use crate::proto::csi::group_controller_service_capability::rpc::Type as GroupCap;
use crate::rpc::Rpc;
use filevol_core::pool::capability::{self, Capability};
use filevol_core::pool::store::{self, Kind};
use filevol_core::pool::{new_volume, PoolError, ALIGN};
use filevol_core::volume::meta::{Source, VolumeMeta};
use filevol_core::volume::parameters;
use filevol_core::volume::{ids, topology};

fn sorted(map: &std::collections::HashMap<String, String>) -> BTreeMap<String, String> {
    map.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

impl Operation for csi::CreateVolumeRequest {
    type Response = csi::CreateVolumeResponse;
    const RPC: Rpc = Rpc::CreateVolume;

    fn prepare(self, driver: &Arc<Driver>) -> Result<Job<Self::Response>, Error> {
        validate::name(&self.name)?;
        let caps = validate::capabilities("volume_capabilities", &self.volume_capabilities)?;
        let capacity = validate::capacity(&self.capacity_range)?;
        let mut spec = new_volume::spec(
            &self.name,
            &caps,
            capacity,
            sorted(&self.parameters),
            sorted(&self.mutable_parameters),
        )?;

        let source = match self.volume_content_source.as_ref() {
            None => None,
            Some(cs) if cs.has_snapshot() => {
                let id = cs.snapshot().snapshot_id.clone();
                validate::id("volume_content_source.snapshot.snapshot_id", &id)?;
                Some(Source::Snapshot(id))
            }
            Some(cs) if cs.has_volume() => {
                let id = cs.volume().volume_id.clone();
                validate::id("volume_content_source.volume.volume_id", &id)?;
                Some(Source::Volume(id))
            }
            Some(_) => {
                return Err(Error::invalid(
                    "volume_content_source",
                    "names neither a snapshot nor a volume",
                ))
            }
        };
        if let Some(req) = self.accessibility_requirements.as_ref() {
            let requisite = req.requisite.iter().map(|t| &t.segments);
            topology::require(&driver.config.topology, requisite).map_err(PoolError::from)?;
        }

        spec.source.clone_from(&source);
        let id = ids::derive(ids::Kind::Volume, &self.name);
        let driver = Arc::clone(driver);
        let mut job = Job::new(move || {
            let v = driver.pool.create_volume(&spec)?;
            let mut resp = csi::CreateVolumeResponse::new();
            resp.volume = Some(convert::volume(&v)).into();
            Ok(resp)
        })
        .locking(volume_key(&id));
        job = match source {
            Some(Source::Volume(src)) => job.locking(volume_key(&src)),
            Some(Source::Snapshot(src)) => job.locking(snapshot_key(&src)),
            None => job,
        };
        Ok(job)
    }
}

impl Operation for csi::DeleteVolumeRequest {
    type Response = csi::DeleteVolumeResponse;
    const RPC: Rpc = Rpc::DeleteVolume;

    fn prepare(self, driver: &Arc<Driver>) -> Result<Job<Self::Response>, Error> {
        validate::id("volume_id", &self.volume_id)?;
        let driver = Arc::clone(driver);
        let id = self.volume_id;
        let key = volume_key(&id);
        Ok(Job::new(move || {
            driver.pool.delete_volume(&id)?;
            Ok(csi::DeleteVolumeResponse::new())
        })
        .locking(key))
    }
}

impl Operation for csi::ControllerPublishVolumeRequest {
    type Response = csi::ControllerPublishVolumeResponse;
    const RPC: Rpc = Rpc::ControllerPublishVolume;

    fn prepare(self, driver: &Arc<Driver>) -> Result<Job<Self::Response>, Error> {
        validate::id("volume_id", &self.volume_id)?;
        if self.node_id.is_empty() {
            return Err(Error::invalid("node_id", "must not be empty"));
        }
        let cap = match self.volume_capability.as_ref() {
            Some(c) => validate::capability("volume_capability", c)?,
            None => return Err(Error::invalid("volume_capability", "is required")),
        };
        let (driver, id, node, readonly) = (
            Arc::clone(driver),
            self.volume_id,
            self.node_id,
            self.readonly,
        );
        let key = volume_key(&id);
        Ok(Job::new(move || {
            driver.pool.volume_for(&id, &cap)?;
            let v = driver.pool.publish(&id, &node, cap.mode, readonly)?;
            let mut resp = csi::ControllerPublishVolumeResponse::new();
            resp.publish_context = convert::volume_context(&v);
            resp.publish_context
                .insert("readonly".into(), readonly.to_string());
            Ok(resp)
        })
        .locking(key))
    }
}

impl Operation for csi::ControllerUnpublishVolumeRequest {
    type Response = csi::ControllerUnpublishVolumeResponse;
    const RPC: Rpc = Rpc::ControllerUnpublishVolume;

    fn prepare(self, driver: &Arc<Driver>) -> Result<Job<Self::Response>, Error> {
        validate::id("volume_id", &self.volume_id)?;
        let (driver, id, node) = (Arc::clone(driver), self.volume_id, self.node_id);
        let key = volume_key(&id);
        Ok(Job::new(move || {
            let node = (!node.is_empty()).then_some(node.as_str());
            driver.pool.unpublish(&id, node)?;
            Ok(csi::ControllerUnpublishVolumeResponse::new())
        })
        .locking(key))
    }
}

impl Operation for csi::ValidateVolumeCapabilitiesRequest {
    type Response = csi::ValidateVolumeCapabilitiesResponse;
    const RPC: Rpc = Rpc::ValidateVolumeCapabilities;

    fn prepare(self, driver: &Arc<Driver>) -> Result<Job<Self::Response>, Error> {
        validate::id("volume_id", &self.volume_id)?;
        let caps = validate::capabilities("volume_capabilities", &self.volume_capabilities)?;
        let driver = Arc::clone(driver);
        Ok(Job::new(move || {
            let v = driver.pool.volume(&self.volume_id)?;
            let mut resp = csi::ValidateVolumeCapabilitiesResponse::new();
            let problems: Vec<String> = caps
                .iter()
                .filter_map(|c: &Capability| capability::mismatch(&v, c))
                .collect();
            if problems.is_empty() {
                let mut confirmed = csi::validate_volume_capabilities_response::Confirmed::new();
                confirmed.volume_context = self.volume_context;
                confirmed.volume_capabilities = self.volume_capabilities;
                confirmed.parameters = self.parameters;
                confirmed.mutable_parameters = self.mutable_parameters;
                resp.confirmed = Some(confirmed).into();
            } else {
                resp.message = problems.join("; ");
            }
            Ok(resp)
        }))
    }
}

/// Runs `work`, which reads the pool, under the health deadline: a pool
/// that does not answer makes the call UNAVAILABLE at once (the watch
/// knows) or at the deadline, never a worker hung on it.
fn reading_the_pool<T: Send + 'static>(
    driver: &Arc<Driver>,
    work: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    if let Some(h) = super::health::unreachable(driver) {
        return Err(Error::Unhealthy(h.message()));
    }
    super::health::under_deadline(driver, work)
        .unwrap_or_else(|h| Err(Error::Unhealthy(h.message())))
}

/// The v1.12 conditions of a page of volumes whose records were read,
/// where that is served (`--volume-condition`): from the same findings as
/// the v1.13 health calls, all checked under one deadline.
fn conditions(
    driver: &Arc<Driver>,
    volumes: Vec<Arc<VolumeMeta>>,
) -> Vec<Option<csi::VolumeCondition>> {
    if !driver.config.volume_condition {
        return vec![None; volumes.len()];
    }
    super::health::of_volumes(driver, volumes)
        .iter()
        .map(|h| Some(convert::condition(h)))
        .collect()
}

/// Where volume `id`'s record is: what a listing that found it damaged
/// names.
fn record_path(driver: &Driver, id: &str) -> std::path::PathBuf {
    driver
        .pool
        .store()
        .object_dir(Kind::Volume, id)
        .join(store::META)
}

/// The v1.12 condition of a volume whose record is damaged, where that is
/// served.
fn damaged_condition(
    driver: &Driver,
    path: &std::path::Path,
    problem: &str,
) -> Option<csi::VolumeCondition> {
    driver
        .config
        .volume_condition
        .then(|| convert::condition(&super::health::damaged(path, problem)))
}

impl Operation for csi::ListVolumesRequest {
    type Response = csi::ListVolumesResponse;
    const RPC: Rpc = Rpc::ListVolumes;

    fn prepare(self, driver: &Arc<Driver>) -> Result<Job<Self::Response>, Error> {
        let max = validate::max_entries(self.max_entries)?;
        let start = validate::starting_token(&self.starting_token)?;
        let driver = Arc::clone(driver);
        Ok(Job::new(move || {
            let outer = Arc::clone(&driver);
            reading_the_pool(&outer, move || {
                let (entries, next) = driver.pool.list_volumes(start.as_deref(), max)?;
                // One readdir answers for every volume of the page.
                let attached = driver.pool.attachments()?;
                let read: Vec<Arc<VolumeMeta>> = entries
                    .iter()
                    .filter_map(|(_, e)| e.as_ref().ok().cloned())
                    .collect();
                let mut conditions = conditions(&driver, read).into_iter();
                let mut resp = csi::ListVolumesResponse::new();
                for (id, entry) in entries {
                    let mut e = csi::list_volumes_response::Entry::new();
                    let mut status = csi::list_volumes_response::VolumeStatus::new();
                    match entry {
                        Ok(v) => {
                            status.published_node_ids = convert::published_nodes(&attached, &v);
                            status.volume_condition = conditions.next().flatten().into();
                            e.volume = Some(convert::volume(&v)).into();
                        }
                        Err(problem) => {
                            status.volume_condition =
                                damaged_condition(&driver, &record_path(&driver, &id), &problem)
                                    .into();
                            let mut vol = csi::Volume::new();
                            vol.volume_id = id;
                            e.volume = Some(vol).into();
                        }
                    }
                    e.status = Some(status).into();
                    resp.entries.push(e);
                }
                resp.next_token = validate::next_token(next);
                Ok(resp)
            })
        }))
    }
}

impl Operation for csi::ControllerGetVolumeHealthRequest {
    type Response = csi::ControllerGetVolumeHealthResponse;
    const RPC: Rpc = Rpc::ControllerGetVolumeHealth;

    fn prepare(self, driver: &Arc<Driver>) -> Result<Job<Self::Response>, Error> {
        validate::id("volume_id", &self.volume_id)?;
        let driver = Arc::clone(driver);
        // No lock: a health answer must not wait for a slow operation.
        Ok(Job::new(move || {
            let health = super::health::in_pool(&driver, &self.volume_id)?.ok_or_else(|| {
                Error::from(PoolError::NotFound {
                    kind: "volume",
                    id: self.volume_id.clone(),
                })
            })?;
            let mut resp = csi::ControllerGetVolumeHealthResponse::new();
            resp.volume_health = Some(convert::volume_health(&self.volume_id, &health)).into();
            Ok(resp)
        }))
    }
}

impl Operation for csi::ControllerListVolumeHealthRequest {
    type Response = csi::ControllerListVolumeHealthResponse;
    const RPC: Rpc = Rpc::ControllerListVolumeHealth;

    fn prepare(self, driver: &Arc<Driver>) -> Result<Job<Self::Response>, Error> {
        let max = validate::max_entries(self.max_entries)?;
        let start = validate::starting_token(&self.starting_token)?;
        let driver = Arc::clone(driver);
        Ok(Job::new(move || {
            // A pool that does not answer cannot be listed: UNAVAILABLE at
            // once, or at the deadline, never a hung worker.
            let outer = Arc::clone(&driver);
            reading_the_pool(&outer, move || {
                let (entries, next) = driver.pool.list_volumes(start.as_deref(), max)?;
                let read: Vec<Arc<VolumeMeta>> = entries
                    .iter()
                    .filter_map(|(_, e)| e.as_ref().ok().cloned())
                    .collect();
                let mut healths = super::health::of_volumes(&driver, read).into_iter();
                let mut resp = csi::ControllerListVolumeHealthResponse::new();
                for (id, entry) in entries {
                    let health = match entry {
                        Ok(_) => healths.next().unwrap_or_default(),
                        Err(problem) => {
                            super::health::damaged(&record_path(&driver, &id), &problem)
                        }
                    };
                    // Only volumes with findings: what the spec's answer
                    // lists ("abnormal volume health entries").
                    if !health.is_healthy() {
                        resp.entries.push(convert::volume_health(&id, &health));
                    }
                }
                resp.next_token = validate::next_token(next);
                Ok(resp)
            })
        }))
    }
}

impl Operation for csi::ControllerGetVolumeRequest {
    type Response = csi::ControllerGetVolumeResponse;
    const RPC: Rpc = Rpc::ControllerGetVolume;

    fn prepare(self, driver: &Arc<Driver>) -> Result<Job<Self::Response>, Error> {
        validate::id("volume_id", &self.volume_id)?;
        let driver = Arc::clone(driver);
        Ok(Job::new(move || {
            // A pool that does not answer: the condition says so, at once
            // or at the deadline (the record cannot be read without
            // hanging a worker).
            let id = self.volume_id.clone();
            let answer = super::health::unreachable(&driver).map_or_else(
                || {
                    let d = Arc::clone(&driver);
                    super::health::under_deadline(&driver, move || get_volume(&d, &self.volume_id))
                },
                Err,
            );
            match answer {
                Ok(answer) => answer,
                Err(h) if driver.config.volume_condition => {
                    let mut status = csi::controller_get_volume_response::VolumeStatus::new();
                    let mut resp = csi::ControllerGetVolumeResponse::new();
                    let mut vol = csi::Volume::new();
                    vol.volume_id = id;
                    resp.volume = Some(vol).into();
                    status.volume_condition = Some(convert::condition(&h)).into();
                    resp.status = Some(status).into();
                    Ok(resp)
                }
                Err(h) => Err(Error::Unhealthy(h.message())),
            }
        }))
    }
}

/// ControllerGetVolume's answer, from the pool.
fn get_volume(driver: &Arc<Driver>, id: &str) -> Result<csi::ControllerGetVolumeResponse, Error> {
    let mut status = csi::controller_get_volume_response::VolumeStatus::new();
    let mut resp = csi::ControllerGetVolumeResponse::new();
    match driver.pool.volume(id) {
        Ok(v) => {
            let attached = driver.pool.attachments()?;
            status.published_node_ids = convert::published_nodes(&attached, &v);
            status.volume_condition = conditions(driver, vec![Arc::new(v.clone())])
                .pop()
                .flatten()
                .into();
            resp.volume = Some(convert::volume(&v)).into();
        }
        // Damaged metadata is a condition to report, not a failure of the
        // call: the health monitor should see it.
        Err(PoolError::Damaged { path, problem }) => {
            let mut vol = csi::Volume::new();
            vol.volume_id = id.to_owned();
            resp.volume = Some(vol).into();
            status.volume_condition = damaged_condition(driver, &path, &problem).into();
        }
        Err(e) => return Err(e.into()),
    }
    resp.status = Some(status).into();
    Ok(resp)
}

impl Operation for csi::GetCapacityRequest {
    type Response = csi::GetCapacityResponse;
    const RPC: Rpc = Rpc::GetCapacity;

    fn prepare(self, driver: &Arc<Driver>) -> Result<Job<Self::Response>, Error> {
        for c in &self.volume_capabilities {
            validate::capability("volume_capabilities", c)?;
        }
        let elsewhere = self
            .accessible_topology
            .as_ref()
            .is_some_and(|t| !topology::within(&driver.config.topology, &t.segments));
        let driver = Arc::clone(driver);
        Ok(Job::new(move || {
            let available = if elsewhere {
                0
            } else {
                driver.pool.capacity()?
            };
            let mut resp = csi::GetCapacityResponse::new();
            resp.available_capacity = convert::count(available);
            resp.maximum_volume_size = Some(protobuf::well_known_types::wrappers::Int64Value {
                value: resp.available_capacity,
                ..Default::default()
            })
            .into();
            resp.minimum_volume_size = Some(protobuf::well_known_types::wrappers::Int64Value {
                value: convert::count(ALIGN),
                ..Default::default()
            })
            .into();
            Ok(resp)
        }))
    }
}

impl Operation for csi::ControllerGetCapabilitiesRequest {
    type Response = csi::ControllerGetCapabilitiesResponse;
    const RPC: Rpc = Rpc::ControllerGetCapabilities;

    fn prepare(self, driver: &Arc<Driver>) -> Result<Job<Self::Response>, Error> {
        let (condition, health) = (driver.config.volume_condition, driver.config.volume_health);
        Ok(Job::new(move || {
            let mut resp = csi::ControllerGetCapabilitiesResponse::new();
            let always = [
                CtrlCap::CREATE_DELETE_VOLUME,
                CtrlCap::PUBLISH_UNPUBLISH_VOLUME,
                CtrlCap::LIST_VOLUMES,
                CtrlCap::GET_CAPACITY,
                CtrlCap::CREATE_DELETE_SNAPSHOT,
                CtrlCap::LIST_SNAPSHOTS,
                CtrlCap::CLONE_VOLUME,
                CtrlCap::PUBLISH_READONLY,
                CtrlCap::EXPAND_VOLUME,
                CtrlCap::LIST_VOLUMES_PUBLISHED_NODES,
                CtrlCap::GET_VOLUME,
                CtrlCap::SINGLE_NODE_MULTI_WRITER,
                CtrlCap::MODIFY_VOLUME,
                CtrlCap::GET_SNAPSHOT,
            ];
            let v12 = condition.then_some(CtrlCap::VOLUME_CONDITION);
            let v13 = [CtrlCap::GET_VOLUME_HEALTH, CtrlCap::LIST_VOLUME_HEALTH]
                .into_iter()
                .filter(move |_| health);
            for t in always.into_iter().chain(v12).chain(v13) {
                let mut rpc = csi::controller_service_capability::RPC::new();
                rpc.type_ = t.into();
                let mut cap = csi::ControllerServiceCapability::new();
                cap.set_rpc(rpc);
                resp.capabilities.push(cap);
            }
            Ok(resp)
        }))
    }
}

impl Operation for csi::ControllerExpandVolumeRequest {
    type Response = csi::ControllerExpandVolumeResponse;
    const RPC: Rpc = Rpc::ControllerExpandVolume;

    fn prepare(self, driver: &Arc<Driver>) -> Result<Job<Self::Response>, Error> {
        validate::id("volume_id", &self.volume_id)?;
        if self.capacity_range.is_none() {
            return Err(Error::invalid("capacity_range", "is required"));
        }
        let range = validate::capacity(&self.capacity_range)?;
        let cap = self
            .volume_capability
            .as_ref()
            .map(|c| validate::capability("volume_capability", c))
            .transpose()?;
        let (driver, id) = (Arc::clone(driver), self.volume_id);
        let key = volume_key(&id);
        Ok(Job::new(move || {
            if let Some(cap) = &cap {
                driver.pool.volume_for(&id, cap)?;
            }
            let v = driver.pool.expand_volume(&id, range)?;
            let mut resp = csi::ControllerExpandVolumeResponse::new();
            resp.capacity_bytes = convert::count(v.capacity_bytes);
            resp.node_expansion_required = v.layout.expands_on_node();
            Ok(resp)
        })
        .locking(key))
    }
}

impl Operation for csi::ControllerModifyVolumeRequest {
    type Response = csi::ControllerModifyVolumeResponse;
    const RPC: Rpc = Rpc::ControllerModifyVolume;

    fn prepare(self, driver: &Arc<Driver>) -> Result<Job<Self::Response>, Error> {
        validate::id("volume_id", &self.volume_id)?;
        let params = sorted(&self.mutable_parameters);
        parameters::mutable(&params)?;
        let (driver, id) = (Arc::clone(driver), self.volume_id);
        let key = volume_key(&id);
        Ok(Job::new(move || {
            driver.pool.modify_volume(&id, &params)?;
            Ok(csi::ControllerModifyVolumeResponse::new())
        })
        .locking(key))
    }
}

impl Operation for csi::CreateSnapshotRequest {
    type Response = csi::CreateSnapshotResponse;
    const RPC: Rpc = Rpc::CreateSnapshot;

    fn prepare(self, driver: &Arc<Driver>) -> Result<Job<Self::Response>, Error> {
        validate::name(&self.name)?;
        validate::id("source_volume_id", &self.source_volume_id)?;
        parameters::none(&sorted(&self.parameters), "snapshots")?;
        let id = ids::derive(ids::Kind::Snapshot, &self.name);
        let (driver, name, source) = (Arc::clone(driver), self.name, self.source_volume_id);
        let source_key = volume_key(&source);
        Ok(Job::new(move || {
            let s = driver.pool.create_snapshot(&name, &source)?;
            let mut resp = csi::CreateSnapshotResponse::new();
            resp.snapshot = Some(convert::snapshot(&s)).into();
            Ok(resp)
        })
        .locking(snapshot_key(&id))
        .locking(source_key))
    }
}

impl Operation for csi::DeleteSnapshotRequest {
    type Response = csi::DeleteSnapshotResponse;
    const RPC: Rpc = Rpc::DeleteSnapshot;

    fn prepare(self, driver: &Arc<Driver>) -> Result<Job<Self::Response>, Error> {
        validate::id("snapshot_id", &self.snapshot_id)?;
        let (driver, id) = (Arc::clone(driver), self.snapshot_id);
        let key = snapshot_key(&id);
        Ok(Job::new(move || {
            driver.pool.delete_snapshot(&id)?;
            Ok(csi::DeleteSnapshotResponse::new())
        })
        .locking(key))
    }
}

impl Operation for csi::ListSnapshotsRequest {
    type Response = csi::ListSnapshotsResponse;
    const RPC: Rpc = Rpc::ListSnapshots;

    fn prepare(self, driver: &Arc<Driver>) -> Result<Job<Self::Response>, Error> {
        let max = validate::max_entries(self.max_entries)?;
        let start = validate::starting_token(&self.starting_token)?;
        let driver = Arc::clone(driver);
        Ok(Job::new(move || {
            let (snapshots, next) = driver.pool.list_snapshots(start.as_deref(), max, |s| {
                (self.snapshot_id.is_empty() || s.id == self.snapshot_id)
                    && (self.source_volume_id.is_empty()
                        || s.source_volume_id == self.source_volume_id)
            })?;
            let mut resp = csi::ListSnapshotsResponse::new();
            for s in snapshots {
                let mut e = csi::list_snapshots_response::Entry::new();
                e.snapshot = Some(convert::snapshot(&s)).into();
                resp.entries.push(e);
            }
            resp.next_token = validate::next_token(next);
            Ok(resp)
        }))
    }
}

impl Operation for csi::GetSnapshotRequest {
    type Response = csi::GetSnapshotResponse;
    const RPC: Rpc = Rpc::GetSnapshot;

    fn prepare(self, driver: &Arc<Driver>) -> Result<Job<Self::Response>, Error> {
        validate::id("snapshot_id", &self.snapshot_id)?;
        let driver = Arc::clone(driver);
        Ok(Job::new(move || {
            let s = driver.pool.snapshot(&self.snapshot_id)?;
            let mut resp = csi::GetSnapshotResponse::new();
            resp.snapshot = Some(convert::snapshot(&s)).into();
            Ok(resp)
        }))
    }
}

impl Operation for csi::GroupControllerGetCapabilitiesRequest {
    type Response = csi::GroupControllerGetCapabilitiesResponse;
    const RPC: Rpc = Rpc::GroupControllerGetCapabilities;

    fn prepare(self, _driver: &Arc<Driver>) -> Result<Job<Self::Response>, Error> {
        Ok(Job::new(|| {
            let mut rpc = csi::group_controller_service_capability::RPC::new();
            rpc.type_ = GroupCap::CREATE_DELETE_GET_VOLUME_GROUP_SNAPSHOT.into();
            let mut cap = csi::GroupControllerServiceCapability::new();
            cap.set_rpc(rpc);
            let mut resp = csi::GroupControllerGetCapabilitiesResponse::new();
            resp.capabilities.push(cap);
            Ok(resp)
        }))
    }
}

impl Operation for csi::CreateVolumeGroupSnapshotRequest {
    type Response = csi::CreateVolumeGroupSnapshotResponse;
    const RPC: Rpc = Rpc::CreateVolumeGroupSnapshot;

    fn prepare(self, driver: &Arc<Driver>) -> Result<Job<Self::Response>, Error> {
        validate::name(&self.name)?;
        if self.source_volume_ids.is_empty() {
            return Err(Error::invalid(
                "source_volume_ids",
                "at least one volume is required",
            ));
        }
        for id in &self.source_volume_ids {
            validate::id("source_volume_ids", id)?;
        }
        parameters::none(&sorted(&self.parameters), "group snapshots")?;
        let id = ids::derive(ids::Kind::Group, &self.name);
        // Every member volume is held for the group's duration, so the
        // snapshots are taken together with no call changing a member.
        let mut job_keys: Vec<String> = self
            .source_volume_ids
            .iter()
            .map(|v| volume_key(v))
            .collect();
        job_keys.push(group_key(&id));
        let (driver, name, sources) = (Arc::clone(driver), self.name, self.source_volume_ids);
        let mut job = Job::new(move || {
            let g = driver.pool.create_group(&name, &sources)?;
            let mut resp = csi::CreateVolumeGroupSnapshotResponse::new();
            resp.group_snapshot = Some(convert::group(&driver.pool, &g)).into();
            Ok(resp)
        });
        for key in job_keys {
            job = job.locking(key);
        }
        Ok(job)
    }
}

impl Operation for csi::DeleteVolumeGroupSnapshotRequest {
    type Response = csi::DeleteVolumeGroupSnapshotResponse;
    const RPC: Rpc = Rpc::DeleteVolumeGroupSnapshot;

    fn prepare(self, driver: &Arc<Driver>) -> Result<Job<Self::Response>, Error> {
        validate::id("group_snapshot_id", &self.group_snapshot_id)?;
        let (driver, id, members) = (
            Arc::clone(driver),
            self.group_snapshot_id,
            self.snapshot_ids,
        );
        let key = group_key(&id);
        Ok(Job::new(move || {
            driver.pool.delete_group(&id, &members)?;
            Ok(csi::DeleteVolumeGroupSnapshotResponse::new())
        })
        .locking(key))
    }
}

impl Operation for csi::GetVolumeGroupSnapshotRequest {
    type Response = csi::GetVolumeGroupSnapshotResponse;
    const RPC: Rpc = Rpc::GetVolumeGroupSnapshot;

    fn prepare(self, driver: &Arc<Driver>) -> Result<Job<Self::Response>, Error> {
        validate::id("group_snapshot_id", &self.group_snapshot_id)?;
        let driver = Arc::clone(driver);
        Ok(Job::new(move || {
            let g = driver.pool.group(&self.group_snapshot_id)?;
            filevol_core::pool::check_members(&g, &self.snapshot_ids)?;
            let mut resp = csi::GetVolumeGroupSnapshotResponse::new();
            resp.group_snapshot = Some(convert::group(&driver.pool, &g)).into();
            Ok(resp)
        }))
    }
}
