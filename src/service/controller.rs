//! The Controller and GroupController services. Not implemented yet: every
//! call answers UNIMPLEMENTED after passing through the common dispatch path.

use std::sync::Arc;

use super::{not_implemented, Driver};
use crate::error::Error;
use crate::executor::Job;
use crate::proto::csi;
use crate::rpc::Rpc;

not_implemented! {
    CreateVolumeRequest -> CreateVolumeResponse as CreateVolume;
    DeleteVolumeRequest -> DeleteVolumeResponse as DeleteVolume locking volume_id;
    ControllerPublishVolumeRequest -> ControllerPublishVolumeResponse as ControllerPublishVolume locking volume_id;
    ControllerUnpublishVolumeRequest -> ControllerUnpublishVolumeResponse as ControllerUnpublishVolume locking volume_id;
    ValidateVolumeCapabilitiesRequest -> ValidateVolumeCapabilitiesResponse as ValidateVolumeCapabilities;
    ListVolumesRequest -> ListVolumesResponse as ListVolumes;
    GetCapacityRequest -> GetCapacityResponse as GetCapacity;
    ControllerGetCapabilitiesRequest -> ControllerGetCapabilitiesResponse as ControllerGetCapabilities;
    CreateSnapshotRequest -> CreateSnapshotResponse as CreateSnapshot locking source_volume_id;
    DeleteSnapshotRequest -> DeleteSnapshotResponse as DeleteSnapshot;
    ListSnapshotsRequest -> ListSnapshotsResponse as ListSnapshots;
    GetSnapshotRequest -> GetSnapshotResponse as GetSnapshot;
    ControllerExpandVolumeRequest -> ControllerExpandVolumeResponse as ControllerExpandVolume locking volume_id;
    ControllerGetVolumeRequest -> ControllerGetVolumeResponse as ControllerGetVolume;
    ControllerModifyVolumeRequest -> ControllerModifyVolumeResponse as ControllerModifyVolume locking volume_id;
    GroupControllerGetCapabilitiesRequest -> GroupControllerGetCapabilitiesResponse as GroupControllerGetCapabilities;
    CreateVolumeGroupSnapshotRequest -> CreateVolumeGroupSnapshotResponse as CreateVolumeGroupSnapshot;
    DeleteVolumeGroupSnapshotRequest -> DeleteVolumeGroupSnapshotResponse as DeleteVolumeGroupSnapshot;
    GetVolumeGroupSnapshotRequest -> GetVolumeGroupSnapshotResponse as GetVolumeGroupSnapshot;
}
