//! The Node service. Not implemented yet: every call answers UNIMPLEMENTED
//! after passing through the common dispatch path (volume calls take their
//! volume's lock, so contention behaves as it will once they do real work).

use std::sync::Arc;

use super::{not_implemented, Driver};
use crate::error::Error;
use crate::executor::Job;
use crate::proto::csi;
use crate::rpc::Rpc;

not_implemented! {
    NodeStageVolumeRequest -> NodeStageVolumeResponse as NodeStageVolume locking volume_id;
    NodeUnstageVolumeRequest -> NodeUnstageVolumeResponse as NodeUnstageVolume locking volume_id;
    NodePublishVolumeRequest -> NodePublishVolumeResponse as NodePublishVolume locking volume_id;
    NodeUnpublishVolumeRequest -> NodeUnpublishVolumeResponse as NodeUnpublishVolume locking volume_id;
    NodeGetVolumeStatsRequest -> NodeGetVolumeStatsResponse as NodeGetVolumeStats locking volume_id;
    NodeExpandVolumeRequest -> NodeExpandVolumeResponse as NodeExpandVolume locking volume_id;
    NodeGetCapabilitiesRequest -> NodeGetCapabilitiesResponse as NodeGetCapabilities;
    NodeGetInfoRequest -> NodeGetInfoResponse as NodeGetInfo;
}
