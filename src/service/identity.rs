//! The Identity service: who the plugin is, what it offers, whether it can
//! serve.

use std::path::Path;
use std::sync::Arc;

use protobuf::well_known_types::wrappers::BoolValue;

use super::{Driver, Operation};
use crate::error::Error;
use crate::executor::{Job, Lane, WorkerPool};
use crate::proto::csi;
use crate::proto::csi::plugin_capability::{service, volume_expansion};
use crate::rpc::{Rpc, Service};

impl Operation for csi::GetPluginInfoRequest {
    type Response = csi::GetPluginInfoResponse;
    const RPC: Rpc = Rpc::GetPluginInfo;

    fn prepare(self, driver: &Arc<Driver>) -> Result<Job<Self::Response>, Error> {
        let driver = Arc::clone(driver);
        Ok(Job::new(move || {
            let mut resp = csi::GetPluginInfoResponse::new();
            resp.name.clone_from(&driver.config.driver_name);
            resp.vendor_version = env!("CARGO_PKG_VERSION").to_owned();
            resp.manifest
                .insert("mode".into(), driver.config.mode.to_string());
            Ok(resp)
        }))
    }
}

impl Operation for csi::GetPluginCapabilitiesRequest {
    type Response = csi::GetPluginCapabilitiesResponse;
    const RPC: Rpc = Rpc::GetPluginCapabilities;

    fn prepare(self, driver: &Arc<Driver>) -> Result<Job<Self::Response>, Error> {
        let offers = Offers {
            controller: driver.offers(Service::Controller),
            group_controller: driver.offers(Service::GroupController),
            snapshot_metadata: driver.offers(Service::SnapshotMetadata),
            topology: !driver.config.topology.is_empty(),
        };
        Ok(Job::new(move || {
            let mut resp = csi::GetPluginCapabilitiesResponse::new();
            resp.capabilities = plugin_capabilities(offers);
            Ok(resp)
        }))
    }
}

impl Operation for csi::ProbeRequest {
    type Response = csi::ProbeResponse;
    const RPC: Rpc = Rpc::Probe;

    fn prepare(self, driver: &Arc<Driver>) -> Result<Job<Self::Response>, Error> {
        let driver = Arc::clone(driver);
        let job = Job::new(move || {
            check_health(&driver.config.pool, driver.executor.workers())?;
            let mut resp = csi::ProbeResponse::new();
            resp.ready = Some(BoolValue {
                value: true,
                ..Default::default()
            })
            .into();
            Ok(resp)
        });
        Ok(job.on_lane(Lane::Probe))
    }
}

/// The services this process offers, as `Driver::offers` decides, and
/// whether the pool has a topology segment.
#[derive(Debug, Clone, Copy)]
struct Offers {
    controller: bool,
    group_controller: bool,
    snapshot_metadata: bool,
    topology: bool,
}

/// What this process offers: each service it serves; volume expansion,
/// online and offline, always.
///
/// Topology (VOLUME_ACCESSIBILITY_CONSTRAINTS) only with the controller and
/// where the pool has a segment. A shared pool (`--topology=`) has none, so
/// its node plugins report no topology keys; external-provisioner v6.3.0
/// fails every claim of a driver that advertises the capability when the
/// selected node has no keys ("no topology key found for node", its
/// pkg/controller/topology.go:191-207).
fn plugin_capabilities(offers: Offers) -> Vec<csi::PluginCapability> {
    let svc = |t: service::Type| {
        let mut cap = csi::PluginCapability::new();
        let mut s = csi::plugin_capability::Service::new();
        s.type_ = t.into();
        cap.set_service(s);
        cap
    };
    let expansion = |t: volume_expansion::Type| {
        let mut cap = csi::PluginCapability::new();
        let mut e = csi::plugin_capability::VolumeExpansion::new();
        e.type_ = t.into();
        cap.set_volume_expansion(e);
        cap
    };
    let mut caps = Vec::new();
    if offers.controller {
        caps.push(svc(service::Type::CONTROLLER_SERVICE));
        if offers.topology {
            caps.push(svc(service::Type::VOLUME_ACCESSIBILITY_CONSTRAINTS));
        }
    }
    if offers.group_controller {
        caps.push(svc(service::Type::GROUP_CONTROLLER_SERVICE));
    }
    if offers.snapshot_metadata {
        caps.push(svc(service::Type::SNAPSHOT_METADATA_SERVICE));
    }
    caps.push(expansion(volume_expansion::Type::ONLINE));
    caps.push(expansion(volume_expansion::Type::OFFLINE));
    caps
}

/// Ready means: the pool is a directory this process can read and write,
/// and every worker thread is running.
fn check_health(pool: &Path, workers: &WorkerPool) -> Result<(), Error> {
    filevol_core::pool::usable(pool).map_err(Error::Unhealthy)?;
    let alive = workers.alive();
    if alive < workers.size() {
        return Err(Error::Unhealthy(format!(
            "only {alive} of {} worker threads are running",
            workers.size()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn services(controller: bool, reflinks: bool, topology: bool) -> Vec<service::Type> {
        plugin_capabilities(Offers {
            controller,
            group_controller: reflinks,
            snapshot_metadata: reflinks,
            topology,
        })
        .iter()
        .filter(|c| c.has_service())
        .map(|c| c.service().type_.enum_value().unwrap())
        .collect()
    }

    #[test]
    fn services_are_advertised_where_served() {
        use service::Type::*;
        // A node plugin: no controller, no topology of its own to offer.
        assert!(services(false, false, true).is_empty());
        assert_eq!(
            services(true, true, true),
            [
                CONTROLLER_SERVICE,
                VOLUME_ACCESSIBILITY_CONSTRAINTS,
                GROUP_CONTROLLER_SERVICE,
                SNAPSHOT_METADATA_SERVICE
            ]
        );
        // A shared pool has no segment: no topology to advertise.
        assert_eq!(
            services(true, true, false),
            [
                CONTROLLER_SERVICE,
                GROUP_CONTROLLER_SERVICE,
                SNAPSHOT_METADATA_SERVICE
            ]
        );
        // A pool that cannot reflink has no group snapshots and no deltas.
        assert_eq!(services(true, false, false), [CONTROLLER_SERVICE]);
    }

    #[test]
    fn expansion_is_online_and_offline() {
        let exp: Vec<_> = plugin_capabilities(Offers {
            controller: false,
            group_controller: false,
            snapshot_metadata: false,
            topology: false,
        })
        .iter()
        .filter(|c| c.has_volume_expansion())
        .map(|c| c.volume_expansion().type_.enum_value().unwrap())
        .collect();
        assert_eq!(
            exp,
            [
                volume_expansion::Type::ONLINE,
                volume_expansion::Type::OFFLINE
            ]
        );
    }

    #[test]
    fn health_needs_the_pool() {
        let dir = tempfile::tempdir().unwrap();
        let workers = WorkerPool::start("t-health", 1, 1).unwrap();
        check_health(dir.path(), &workers).unwrap();
        let gone = dir.path().join("gone");
        let err = check_health(&gone, &workers).unwrap_err();
        assert!(err.to_string().contains("gone"), "{err}");
    }

    #[test]
    fn health_needs_every_worker() {
        let dir = tempfile::tempdir().unwrap();
        let workers = WorkerPool::start("t-health2", 2, 1).unwrap();
        workers.shutdown();
        let err = check_health(dir.path(), &workers).unwrap_err();
        assert!(err.to_string().contains("0 of 2"), "{err}");
    }
}
