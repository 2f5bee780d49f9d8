//! Request builders for the tests.

use filevol::proto::csi;
use filevol::proto::csi::volume_capability::access_mode::Mode;

pub const MIB: i64 = 1 << 20;
pub const GIB: i64 = 1 << 30;

/// A mount capability with `fs` (empty: default) and `mode`.
pub fn mount_cap(mode: Mode, fs: &str) -> csi::VolumeCapability {
    let mut c = csi::VolumeCapability::new();
    let mut am = csi::volume_capability::AccessMode::new();
    am.mode = mode.into();
    c.access_mode = Some(am).into();
    let mut m = csi::volume_capability::MountVolume::new();
    m.fs_type = fs.into();
    c.set_mount(m);
    c
}

/// A block capability with `mode`.
pub fn block_cap(mode: Mode) -> csi::VolumeCapability {
    let mut c = csi::VolumeCapability::new();
    let mut am = csi::volume_capability::AccessMode::new();
    am.mode = mode.into();
    c.access_mode = Some(am).into();
    c.set_block(Default::default());
    c
}

/// CreateVolume for an ext4 RWO image of `bytes`.
pub fn create(name: &str, bytes: i64) -> csi::CreateVolumeRequest {
    let mut r = csi::CreateVolumeRequest::new();
    r.name = name.into();
    let mut cr = csi::CapacityRange::new();
    cr.required_bytes = bytes;
    r.capacity_range = Some(cr).into();
    r.volume_capabilities
        .push(mount_cap(Mode::SINGLE_NODE_WRITER, "ext4"));
    r
}

/// The same with StorageClass parameters.
pub fn create_with(name: &str, bytes: i64, params: &[(&str, &str)]) -> csi::CreateVolumeRequest {
    let mut r = create(name, bytes);
    for (k, v) in params {
        r.parameters.insert((*k).into(), (*v).into());
    }
    r
}

/// CreateVolume restoring `snapshot`.
pub fn restore(name: &str, bytes: i64, snapshot: &str) -> csi::CreateVolumeRequest {
    let mut r = create(name, bytes);
    let mut s = csi::volume_content_source::SnapshotSource::new();
    s.snapshot_id = snapshot.into();
    let mut cs = csi::VolumeContentSource::new();
    cs.set_snapshot(s);
    r.volume_content_source = Some(cs).into();
    r
}

/// CreateVolume cloning `volume`.
pub fn clone(name: &str, bytes: i64, volume: &str) -> csi::CreateVolumeRequest {
    let mut r = create(name, bytes);
    let mut s = csi::volume_content_source::VolumeSource::new();
    s.volume_id = volume.into();
    let mut cs = csi::VolumeContentSource::new();
    cs.set_volume(s);
    r.volume_content_source = Some(cs).into();
    r
}

pub fn delete(id: &str) -> csi::DeleteVolumeRequest {
    let mut r = csi::DeleteVolumeRequest::new();
    r.volume_id = id.into();
    r
}

pub fn snapshot(name: &str, source: &str) -> csi::CreateSnapshotRequest {
    let mut r = csi::CreateSnapshotRequest::new();
    r.name = name.into();
    r.source_volume_id = source.into();
    r
}

pub fn delete_snapshot(id: &str) -> csi::DeleteSnapshotRequest {
    let mut r = csi::DeleteSnapshotRequest::new();
    r.snapshot_id = id.into();
    r
}

pub fn publish(
    id: &str,
    node: &str,
    mode: Mode,
    readonly: bool,
) -> csi::ControllerPublishVolumeRequest {
    let mut r = csi::ControllerPublishVolumeRequest::new();
    r.volume_id = id.into();
    r.node_id = node.into();
    r.volume_capability = Some(mount_cap(mode, "")).into();
    r.readonly = readonly;
    r
}

pub fn unpublish(id: &str, node: &str) -> csi::ControllerUnpublishVolumeRequest {
    let mut r = csi::ControllerUnpublishVolumeRequest::new();
    r.volume_id = id.into();
    r.node_id = node.into();
    r
}

/// NodeExpandVolume of `id` at `path` (staged at `staging`, if given),
/// asking for `bytes` (none: no capacity range).
pub fn node_expand(
    id: &str,
    path: &std::path::Path,
    staging: Option<&std::path::Path>,
    bytes: Option<i64>,
) -> csi::NodeExpandVolumeRequest {
    let mut r = csi::NodeExpandVolumeRequest::new();
    r.volume_id = id.into();
    r.volume_path = path.to_str().unwrap().into();
    if let Some(staging) = staging {
        r.staging_target_path = staging.to_str().unwrap().into();
    }
    if let Some(bytes) = bytes {
        let mut cr = csi::CapacityRange::new();
        cr.required_bytes = bytes;
        r.capacity_range = Some(cr).into();
    }
    r
}

pub fn expand(id: &str, bytes: i64) -> csi::ControllerExpandVolumeRequest {
    let mut r = csi::ControllerExpandVolumeRequest::new();
    r.volume_id = id.into();
    let mut cr = csi::CapacityRange::new();
    cr.required_bytes = bytes;
    r.capacity_range = Some(cr).into();
    r
}

pub fn list(max: i32, token: &str) -> csi::ListVolumesRequest {
    let mut r = csi::ListVolumesRequest::new();
    r.max_entries = max;
    r.starting_token = token.into();
    r
}

pub fn get_volume(id: &str) -> csi::ControllerGetVolumeRequest {
    let mut r = csi::ControllerGetVolumeRequest::new();
    r.volume_id = id.into();
    r
}
