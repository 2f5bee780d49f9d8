//! The catalogue of CSI calls filevol serves: one name per RPC, used to key
//! the error-to-status mapping, log lines and fault injection.

use std::fmt;

/// One CSI remote procedure call. Each variant is the CSI method of the same
/// name, documented in the CSI spec; they are not repeated here. The one
/// exception is `TrimVolumes`, filevol's own (`proto/filevol.proto`).
#[allow(missing_docs)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rpc {
    // Identity
    GetPluginInfo,
    GetPluginCapabilities,
    Probe,
    // Controller
    CreateVolume,
    DeleteVolume,
    ControllerPublishVolume,
    ControllerUnpublishVolume,
    ValidateVolumeCapabilities,
    ListVolumes,
    ControllerListVolumeHealth,
    ControllerGetVolumeHealth,
    GetCapacity,
    ControllerGetCapabilities,
    CreateSnapshot,
    DeleteSnapshot,
    ListSnapshots,
    GetSnapshot,
    ControllerExpandVolume,
    ControllerGetVolume,
    ControllerModifyVolume,
    // GroupController
    GroupControllerGetCapabilities,
    CreateVolumeGroupSnapshot,
    DeleteVolumeGroupSnapshot,
    GetVolumeGroupSnapshot,
    // Node
    NodeStageVolume,
    NodeUnstageVolume,
    NodePublishVolume,
    NodeUnpublishVolume,
    NodeGetVolumeStats,
    NodeGetVolumeHealth,
    NodeGetStorageHealth,
    NodeExpandVolume,
    NodeGetCapabilities,
    NodeGetInfo,
    // filevol's own, on the node (proto/filevol.proto)
    TrimVolumes,
    // SnapshotMetadata (server-streaming)
    GetMetadataAllocated,
    GetMetadataDelta,
}

/// The CSI services, each a gRPC service of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    /// Identity: every process serves it.
    Identity,
    /// Controller: the controller StatefulSet (`--mode controller`).
    Controller,
    /// GroupController: the controller, on a pool that can reflink.
    GroupController,
    /// Node: the node DaemonSet (`--mode node`).
    Node,
    /// SnapshotMetadata: changed-block tracking, by the controller.
    SnapshotMetadata,
}

impl Rpc {
    /// The service this call belongs to.
    pub fn service(self) -> Service {
        use Rpc::*;
        match self {
            GetPluginInfo | GetPluginCapabilities | Probe => Service::Identity,
            CreateVolume
            | DeleteVolume
            | ControllerPublishVolume
            | ControllerUnpublishVolume
            | ValidateVolumeCapabilities
            | ListVolumes
            | ControllerListVolumeHealth
            | ControllerGetVolumeHealth
            | GetCapacity
            | ControllerGetCapabilities
            | CreateSnapshot
            | DeleteSnapshot
            | ListSnapshots
            | GetSnapshot
            | ControllerExpandVolume
            | ControllerGetVolume
            | ControllerModifyVolume => Service::Controller,
            GroupControllerGetCapabilities
            | CreateVolumeGroupSnapshot
            | DeleteVolumeGroupSnapshot
            | GetVolumeGroupSnapshot => Service::GroupController,
            NodeStageVolume | NodeUnstageVolume | NodePublishVolume | NodeUnpublishVolume
            | NodeGetVolumeStats | NodeGetVolumeHealth | NodeGetStorageHealth | NodeExpandVolume
            | NodeGetCapabilities | NodeGetInfo
            // Served where the Node service is: it acts on what is staged.
            | TrimVolumes => Service::Node,
            GetMetadataAllocated | GetMetadataDelta => Service::SnapshotMetadata,
        }
    }

    /// The CSI v1.13 health calls (`--volume-health`).
    pub fn is_health(self) -> bool {
        use Rpc::*;
        matches!(
            self,
            ControllerListVolumeHealth
                | ControllerGetVolumeHealth
                | NodeGetVolumeHealth
                | NodeGetStorageHealth
        )
    }

    /// Calls that change state. Each gets one info log line with its outcome;
    /// read-only calls log at debug so a busy cluster's polling stays quiet.
    pub fn is_mutating(self) -> bool {
        use Rpc::*;
        matches!(
            self,
            CreateVolume
                | DeleteVolume
                | ControllerPublishVolume
                | ControllerUnpublishVolume
                | CreateSnapshot
                | DeleteSnapshot
                | ControllerExpandVolume
                | ControllerModifyVolume
                | CreateVolumeGroupSnapshot
                | DeleteVolumeGroupSnapshot
                | NodeStageVolume
                | NodeUnstageVolume
                | NodePublishVolume
                | NodeUnpublishVolume
                | NodeExpandVolume
                | TrimVolumes
        )
    }
}

impl fmt::Display for Rpc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The variant names are the CSI method names.
        fmt::Debug::fmt(self, f)
    }
}
