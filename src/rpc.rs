//! The catalogue of CSI calls filevol serves: one name per RPC, used to key
//! the error-to-status mapping, log lines and fault injection.

use std::fmt;

/// One CSI remote procedure call.
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
    NodeExpandVolume,
    NodeGetCapabilities,
    NodeGetInfo,
}

impl Rpc {
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
        )
    }
}

impl fmt::Display for Rpc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The variant names are the CSI method names.
        fmt::Debug::fmt(self, f)
    }
}
