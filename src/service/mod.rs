//! The CSI services: from a decoded request to a queued job.
//!
//! Each request type implements [`Operation`]: on the completion-queue thread
//! it checks the request and turns it into typed values and a [`Job`] (the
//! blocking work, the volumes it locks); the executor runs the job on a
//! worker. One generic `CsiService::dispatch` does the rest for every RPC,
//! so logging, locking, back-pressure and the error mapping cannot differ
//! between calls.

mod controller;
mod convert;
pub mod health;
mod identity;
mod node;
mod snapshot_metadata;
mod validate;

use std::sync::Arc;

use grpcio::{RpcContext, ServerStreamingSink, UnarySink};
use protobuf::MessageFull;

use crate::config::Config;
use crate::error::Error;
use crate::executor::{Executor, Job};
use crate::metrics::dir_usage::{self, DirUsageSummary};
use crate::metrics::Load;
use crate::proto::{csi, grpc};
use crate::redact::redacted_text;
use crate::rpc::{Rpc, Service};
use filevol_core::node::Node;
use filevol_core::pool::Pool;

use snapshot_metadata::StreamOperation;

/// State shared by every call.
#[derive(Debug)]
pub struct Driver {
    /// The settings the driver runs with.
    pub config: Config,
    /// Worker pool, probe lane and lock table.
    pub executor: Executor,
    /// The pool.
    pub pool: Pool,
    /// The node side, in modes that serve the Node service.
    pub node: Option<Node>,
    /// The pool's health, kept by a probe of its own (see `health`).
    pub health: health::PoolWatch,
}

impl Driver {
    /// Whether this process offers `service`: what GetPluginCapabilities
    /// advertises. The same decision as [`Driver::refusal`], but for
    /// SnapshotMetadata: it is advertised only where deltas work (a pool
    /// that reflinks), yet served in every controller, so a backup tool
    /// that calls it anyway gets allocated ranges, and for a delta the
    /// spec's FAILED_PRECONDITION ("changed block tracking is not enabled")
    /// with the reason.
    pub fn offers(&self, service: Service) -> bool {
        let needs_reflink = matches!(
            service,
            Service::GroupController | Service::SnapshotMetadata
        );
        self.mode_refusal(service).is_none() && (!needs_reflink || self.pool.reflinks())
    }

    /// Why this process does not serve `rpc`, if it does not: its mode
    /// leaves the call's service to another process, or (for the group
    /// snapshot calls that make something) the pool cannot reflink. Group
    /// snapshots already in the pool can still be read and deleted.
    pub fn refusal(&self, rpc: Rpc) -> Option<String> {
        if let Some(why) = self.mode_refusal(rpc.service()) {
            return Some(why);
        }
        if rpc.is_health() && !self.config.volume_health {
            return Some(
                "the CSI v1.13 health calls are off here (--volume-health=false); the v1.12 volume condition is in NodeGetVolumeStats, ListVolumes and ControllerGetVolume".into(),
            );
        }
        let makes_groups = matches!(
            rpc,
            Rpc::GroupControllerGetCapabilities | Rpc::CreateVolumeGroupSnapshot
        );
        (makes_groups && !self.pool.reflinks()).then(|| {
            format!(
                "the pool filesystem at {} cannot reflink, and a group snapshot must copy all its volumes at one instant, so GROUP_CONTROLLER_SERVICE is not offered; put the pool on xfs (mkfs.xfs -m reflink=1) or btrfs",
                self.pool.root().display()
            )
        })
    }

    fn mode_refusal(&self, service: Service) -> Option<String> {
        let mode = self.config.mode;
        match service {
            Service::Controller | Service::GroupController | Service::SnapshotMetadata
                if !mode.serves_controller() =>
            {
                Some(format!(
                    "this process runs with --mode {mode} and serves the Identity and Node services only; controller calls go to the filevol controller (--mode controller)"
                ))
            }
            Service::Node if !mode.serves_node() => Some(format!(
                "this process runs with --mode {mode} and serves no Node service; node calls go to the filevol node plugin on the volume's node (--mode node)"
            )),
            Service::Identity
            | Service::Controller
            | Service::GroupController
            | Service::Node
            | Service::SnapshotMetadata => None,
        }
    }

    /// The directory volumes whose usage this process's metrics report
    /// (see `dir_usage::to_measure`): a controller (or `--mode all`)
    /// every one in the pool, a node plugin those mounted under its
    /// kubelet directory.
    pub fn dir_volumes_to_measure(&self) -> dir_usage::Listing {
        dir_usage::to_measure(
            &self.pool,
            self.node.as_ref(),
            self.config.mode.serves_controller(),
        )
    }

    /// The Prometheus exposition (see `health::exposition`);
    /// `dirs` is what the background measurement of directory volumes last
    /// found.
    pub fn metrics_text(self: &Arc<Self>, dirs: &DirUsageSummary) -> String {
        let workers = self.executor.workers();
        let load = Load {
            queued: workers.queued(),
            busy: workers.busy(),
        };
        health::exposition(self, load, dirs)
    }
}

/// A CSI request that filevol can run.
pub trait Operation: MessageFull + Send + 'static {
    /// The matching response message.
    type Response: Send + 'static;
    /// Which RPC this request belongs to.
    const RPC: Rpc;
    /// Checks the request and builds its job. Runs on a completion-queue
    /// thread: no syscalls, no blocking.
    fn prepare(self, driver: &Arc<Driver>) -> Result<Job<Self::Response>, Error>;
}

/// The lock key of a volume.
pub fn volume_key(id: &str) -> String {
    format!("volume/{id}")
}

/// The lock key of a snapshot.
pub fn snapshot_key(id: &str) -> String {
    format!("snapshot/{id}")
}

/// The lock key of a group snapshot.
pub fn group_key(id: &str) -> String {
    format!("group/{id}")
}

/// The one implementation of every generated service trait.
#[derive(Debug, Clone)]
pub struct CsiService {
    driver: Arc<Driver>,
}

impl CsiService {
    /// Serves calls against `driver`.
    pub fn new(driver: Arc<Driver>) -> Self {
        CsiService { driver }
    }

    /// Every gRPC service. Those this process does not serve are registered
    /// too, so that their calls are refused with the reason
    /// ([`Driver::refusal`]) rather than gRPC's bare "unknown service".
    pub fn grpc_services(&self) -> Vec<grpcio::Service> {
        vec![
            grpc::create_identity(self.clone()),
            grpc::create_controller(self.clone()),
            grpc::create_group_controller(self.clone()),
            grpc::create_node(self.clone()),
            grpc::create_snapshot_metadata(self.clone()),
            grpc::create_node_maintenance(self.clone()),
        ]
    }

    fn dispatch<Req: Operation>(
        &self,
        ctx: RpcContext<'_>,
        req: Req,
        sink: UnarySink<Req::Response>,
    ) {
        let job = self.admit(Req::RPC, req, Req::prepare);
        self.driver.executor.submit(&ctx, Req::RPC, sink, job);
    }

    /// `dispatch` for the server-streaming calls.
    fn dispatch_stream<Req: StreamOperation>(
        &self,
        ctx: RpcContext<'_>,
        req: Req,
        sink: ServerStreamingSink<Req::Response>,
    ) {
        let job = self.admit(Req::RPC, req, Req::prepare);
        self.driver
            .executor
            .submit_stream(&ctx, Req::RPC, sink, job);
    }

    /// What every call, unary or streaming, goes through on its way to the
    /// executor: its trace line (secrets redacted), then its job, or the
    /// refusal of a call this process does not serve.
    fn admit<Req: MessageFull, J>(
        &self,
        rpc: Rpc,
        req: Req,
        prepare: impl FnOnce(Req, &Arc<Driver>) -> Result<J, Error>,
    ) -> Result<J, Error> {
        if log::log_enabled!(log::Level::Trace) {
            log::trace!("{rpc} request: {}", redacted_text(&req));
        }
        match self.driver.refusal(rpc) {
            None => prepare(req, &self.driver),
            Some(reason) => Err(Error::NotServed { rpc, reason }),
        }
    }
}

impl grpc::SnapshotMetadata for CsiService {
    fn get_metadata_allocated(
        &mut self,
        ctx: RpcContext<'_>,
        req: csi::GetMetadataAllocatedRequest,
        sink: ServerStreamingSink<csi::GetMetadataAllocatedResponse>,
    ) {
        self.dispatch_stream(ctx, req, sink)
    }

    fn get_metadata_delta(
        &mut self,
        ctx: RpcContext<'_>,
        req: csi::GetMetadataDeltaRequest,
        sink: ServerStreamingSink<csi::GetMetadataDeltaResponse>,
    ) {
        self.dispatch_stream(ctx, req, sink)
    }
}

impl grpc::NodeMaintenance for CsiService {
    fn trim_volumes(
        &mut self,
        ctx: RpcContext<'_>,
        req: crate::proto::filevol::TrimVolumesRequest,
        sink: UnarySink<crate::proto::filevol::TrimVolumesResponse>,
    ) {
        self.dispatch(ctx, req, sink)
    }
}

/// Implements a generated service trait by sending every method through
/// `CsiService::dispatch`.
macro_rules! dispatch_all {
    ($service:path { $($method:ident($req:ident) -> $resp:ident;)* }) => {
        impl $service for CsiService {
            $(
                fn $method(&mut self, ctx: RpcContext<'_>, req: csi::$req, sink: UnarySink<csi::$resp>) {
                    self.dispatch(ctx, req, sink)
                }
            )*
        }
    };
}

dispatch_all!(grpc::Identity {
    get_plugin_info(GetPluginInfoRequest) -> GetPluginInfoResponse;
    get_plugin_capabilities(GetPluginCapabilitiesRequest) -> GetPluginCapabilitiesResponse;
    probe(ProbeRequest) -> ProbeResponse;
});

dispatch_all!(grpc::Controller {
    create_volume(CreateVolumeRequest) -> CreateVolumeResponse;
    delete_volume(DeleteVolumeRequest) -> DeleteVolumeResponse;
    controller_publish_volume(ControllerPublishVolumeRequest) -> ControllerPublishVolumeResponse;
    controller_unpublish_volume(ControllerUnpublishVolumeRequest) -> ControllerUnpublishVolumeResponse;
    validate_volume_capabilities(ValidateVolumeCapabilitiesRequest) -> ValidateVolumeCapabilitiesResponse;
    list_volumes(ListVolumesRequest) -> ListVolumesResponse;
    controller_list_volume_health(ControllerListVolumeHealthRequest) -> ControllerListVolumeHealthResponse;
    controller_get_volume_health(ControllerGetVolumeHealthRequest) -> ControllerGetVolumeHealthResponse;
    get_capacity(GetCapacityRequest) -> GetCapacityResponse;
    controller_get_capabilities(ControllerGetCapabilitiesRequest) -> ControllerGetCapabilitiesResponse;
    create_snapshot(CreateSnapshotRequest) -> CreateSnapshotResponse;
    delete_snapshot(DeleteSnapshotRequest) -> DeleteSnapshotResponse;
    list_snapshots(ListSnapshotsRequest) -> ListSnapshotsResponse;
    get_snapshot(GetSnapshotRequest) -> GetSnapshotResponse;
    controller_expand_volume(ControllerExpandVolumeRequest) -> ControllerExpandVolumeResponse;
    controller_get_volume(ControllerGetVolumeRequest) -> ControllerGetVolumeResponse;
    controller_modify_volume(ControllerModifyVolumeRequest) -> ControllerModifyVolumeResponse;
});

dispatch_all!(grpc::GroupController {
    group_controller_get_capabilities(GroupControllerGetCapabilitiesRequest) -> GroupControllerGetCapabilitiesResponse;
    create_volume_group_snapshot(CreateVolumeGroupSnapshotRequest) -> CreateVolumeGroupSnapshotResponse;
    delete_volume_group_snapshot(DeleteVolumeGroupSnapshotRequest) -> DeleteVolumeGroupSnapshotResponse;
    get_volume_group_snapshot(GetVolumeGroupSnapshotRequest) -> GetVolumeGroupSnapshotResponse;
});

dispatch_all!(grpc::Node {
    node_stage_volume(NodeStageVolumeRequest) -> NodeStageVolumeResponse;
    node_unstage_volume(NodeUnstageVolumeRequest) -> NodeUnstageVolumeResponse;
    node_publish_volume(NodePublishVolumeRequest) -> NodePublishVolumeResponse;
    node_unpublish_volume(NodeUnpublishVolumeRequest) -> NodeUnpublishVolumeResponse;
    node_get_volume_stats(NodeGetVolumeStatsRequest) -> NodeGetVolumeStatsResponse;
    node_get_volume_health(NodeGetVolumeHealthRequest) -> NodeGetVolumeHealthResponse;
    node_get_storage_health(NodeGetStorageHealthRequest) -> NodeGetStorageHealthResponse;
    node_expand_volume(NodeExpandVolumeRequest) -> NodeExpandVolumeResponse;
    node_get_capabilities(NodeGetCapabilitiesRequest) -> NodeGetCapabilitiesResponse;
    node_get_info(NodeGetInfoRequest) -> NodeGetInfoResponse;
});
