//! One builder per CSI request, for everything that calls a driver: the
//! integration tests, the benchmarks, `filevol client` and `filevol bench`.
//! Each sets the fields a CO sets for the common case and nothing else; a
//! caller that needs an odd request (a missing field, a hostile path)
//! changes the built one, so the odd part is what the reader sees.
//!
//! Sizes are CSI's `int64`; [`size`] brings a `u64` size to it. Paths are
//! sent as they are, a name that is not UTF-8 lossily (CSI's paths are
//! strings).

use std::path::Path;

use crate::proto::csi;
use crate::proto::csi::volume_capability::access_mode::Mode;

/// One mebibyte, as CSI counts bytes.
pub const MIB: i64 = 1 << 20;
/// One gibibyte, as CSI counts bytes.
pub const GIB: i64 = 1 << 30;

/// `bytes` as CSI's `int64`: a size past `i64::MAX` is asked as
/// `i64::MAX`, which every driver refuses as too large rather than
/// wrapping to a negative size.
pub fn size(bytes: u64) -> i64 {
    i64::try_from(bytes).unwrap_or(i64::MAX)
}

fn path(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

fn capacity(bytes: i64) -> csi::CapacityRange {
    let mut cr = csi::CapacityRange::new();
    cr.required_bytes = bytes;
    cr
}

fn access(mode: Mode) -> csi::volume_capability::AccessMode {
    let mut am = csi::volume_capability::AccessMode::new();
    am.mode = mode.into();
    am
}

/// A mount capability with filesystem `fs` (empty: the driver's default)
/// and `mode`.
pub fn mount_cap(mode: Mode, fs: &str) -> csi::VolumeCapability {
    let mut c = csi::VolumeCapability::new();
    c.access_mode = Some(access(mode)).into();
    let mut m = csi::volume_capability::MountVolume::new();
    m.fs_type = fs.into();
    c.set_mount(m);
    c
}

/// A raw block capability with `mode`.
pub fn block_cap(mode: Mode) -> csi::VolumeCapability {
    let mut c = csi::VolumeCapability::new();
    c.access_mode = Some(access(mode)).into();
    c.set_block(Default::default());
    c
}

/// CreateVolume of `bytes` for `cap`.
pub fn create_volume(
    name: &str,
    bytes: i64,
    cap: csi::VolumeCapability,
) -> csi::CreateVolumeRequest {
    let mut r = csi::CreateVolumeRequest::new();
    r.name = name.into();
    r.capacity_range = Some(capacity(bytes)).into();
    r.volume_capabilities.push(cap);
    r
}

/// CreateVolume of an ext4 ReadWriteOnce volume of `bytes`.
pub fn create(name: &str, bytes: i64) -> csi::CreateVolumeRequest {
    create_volume(name, bytes, mount_cap(Mode::SINGLE_NODE_WRITER, "ext4"))
}

/// [`create`] with StorageClass parameters.
pub fn create_with(name: &str, bytes: i64, params: &[(&str, &str)]) -> csi::CreateVolumeRequest {
    let mut r = create(name, bytes);
    for (k, v) in params {
        r.parameters.insert((*k).into(), (*v).into());
    }
    r
}

/// The content source of a volume restored from `snapshot`.
pub fn snapshot_source(snapshot: &str) -> csi::VolumeContentSource {
    let mut s = csi::volume_content_source::SnapshotSource::new();
    s.snapshot_id = snapshot.into();
    let mut cs = csi::VolumeContentSource::new();
    cs.set_snapshot(s);
    cs
}

/// The content source of a clone of `volume`.
pub fn volume_source(volume: &str) -> csi::VolumeContentSource {
    let mut s = csi::volume_content_source::VolumeSource::new();
    s.volume_id = volume.into();
    let mut cs = csi::VolumeContentSource::new();
    cs.set_volume(s);
    cs
}

/// [`create`] restoring `snapshot`.
pub fn restore(name: &str, bytes: i64, snapshot: &str) -> csi::CreateVolumeRequest {
    let mut r = create(name, bytes);
    r.volume_content_source = Some(snapshot_source(snapshot)).into();
    r
}

/// [`create`] cloning `volume`.
pub fn clone(name: &str, bytes: i64, volume: &str) -> csi::CreateVolumeRequest {
    let mut r = create(name, bytes);
    r.volume_content_source = Some(volume_source(volume)).into();
    r
}

/// DeleteVolume of `id`.
pub fn delete(id: &str) -> csi::DeleteVolumeRequest {
    let mut r = csi::DeleteVolumeRequest::new();
    r.volume_id = id.into();
    r
}

/// CreateSnapshot `name` of volume `source`.
pub fn snapshot(name: &str, source: &str) -> csi::CreateSnapshotRequest {
    let mut r = csi::CreateSnapshotRequest::new();
    r.name = name.into();
    r.source_volume_id = source.into();
    r
}

/// DeleteSnapshot of `id`.
pub fn delete_snapshot(id: &str) -> csi::DeleteSnapshotRequest {
    let mut r = csi::DeleteSnapshotRequest::new();
    r.snapshot_id = id.into();
    r
}

/// ListSnapshots narrowed to the snapshot `id`: how a CO reads one
/// snapshot from any driver (GetSnapshot is newer and optional).
pub fn find_snapshot(id: &str) -> csi::ListSnapshotsRequest {
    let mut r = csi::ListSnapshotsRequest::new();
    r.snapshot_id = id.into();
    r
}

/// CreateVolumeGroupSnapshot `name` of the volumes `sources`.
pub fn group_snapshot<S: Into<String>>(
    name: &str,
    sources: impl IntoIterator<Item = S>,
) -> csi::CreateVolumeGroupSnapshotRequest {
    let mut r = csi::CreateVolumeGroupSnapshotRequest::new();
    r.name = name.into();
    r.source_volume_ids = sources.into_iter().map(Into::into).collect();
    r
}

/// ControllerPublishVolume of `id` to `node` for `cap`.
pub fn controller_publish(
    id: &str,
    node: &str,
    cap: csi::VolumeCapability,
    readonly: bool,
) -> csi::ControllerPublishVolumeRequest {
    let mut r = csi::ControllerPublishVolumeRequest::new();
    r.volume_id = id.into();
    r.node_id = node.into();
    r.volume_capability = Some(cap).into();
    r.readonly = readonly;
    r
}

/// ControllerUnpublishVolume of `id` from `node` (empty: every node).
pub fn controller_unpublish(id: &str, node: &str) -> csi::ControllerUnpublishVolumeRequest {
    let mut r = csi::ControllerUnpublishVolumeRequest::new();
    r.volume_id = id.into();
    r.node_id = node.into();
    r
}

/// ControllerExpandVolume of `id` to `bytes`.
pub fn expand(id: &str, bytes: i64) -> csi::ControllerExpandVolumeRequest {
    let mut r = csi::ControllerExpandVolumeRequest::new();
    r.volume_id = id.into();
    r.capacity_range = Some(capacity(bytes)).into();
    r
}

/// ListVolumes: at most `max` entries (0: the driver's choice), from
/// `token` (empty: the start).
pub fn list(max: i32, token: &str) -> csi::ListVolumesRequest {
    let mut r = csi::ListVolumesRequest::new();
    r.max_entries = max;
    r.starting_token = token.into();
    r
}

/// ControllerGetVolume of `id`.
pub fn get_volume(id: &str) -> csi::ControllerGetVolumeRequest {
    let mut r = csi::ControllerGetVolumeRequest::new();
    r.volume_id = id.into();
    r
}

/// NodeStageVolume of `id` at `staging` for `cap`.
pub fn stage(id: &str, staging: &Path, cap: csi::VolumeCapability) -> csi::NodeStageVolumeRequest {
    let mut r = csi::NodeStageVolumeRequest::new();
    r.volume_id = id.into();
    r.staging_target_path = path(staging);
    r.volume_capability = Some(cap).into();
    r
}

/// NodeUnstageVolume of `id` from `staging`.
pub fn unstage(id: &str, staging: &Path) -> csi::NodeUnstageVolumeRequest {
    let mut r = csi::NodeUnstageVolumeRequest::new();
    r.volume_id = id.into();
    r.staging_target_path = path(staging);
    r
}

/// NodePublishVolume of `id`, staged at `staging` (empty: a driver that
/// does not stage), at `target` for `cap`.
pub fn publish(
    id: &str,
    staging: &Path,
    target: &Path,
    cap: csi::VolumeCapability,
    readonly: bool,
) -> csi::NodePublishVolumeRequest {
    let mut r = csi::NodePublishVolumeRequest::new();
    r.volume_id = id.into();
    r.staging_target_path = path(staging);
    r.target_path = path(target);
    r.volume_capability = Some(cap).into();
    r.readonly = readonly;
    r
}

/// NodeUnpublishVolume of `id` from `target`.
pub fn unpublish(id: &str, target: &Path) -> csi::NodeUnpublishVolumeRequest {
    let mut r = csi::NodeUnpublishVolumeRequest::new();
    r.volume_id = id.into();
    r.target_path = path(target);
    r
}

/// NodeGetVolumeStats of `id` published or staged at `volume_path`.
pub fn volume_stats(id: &str, volume_path: &Path) -> csi::NodeGetVolumeStatsRequest {
    let mut r = csi::NodeGetVolumeStatsRequest::new();
    r.volume_id = id.into();
    r.volume_path = path(volume_path);
    r
}

/// NodeExpandVolume of `id` at `volume_path` (staged at `staging`, if
/// given), asking for `bytes` (none: no capacity range, the size the
/// volume has).
pub fn node_expand(
    id: &str,
    volume_path: &Path,
    staging: Option<&Path>,
    bytes: Option<i64>,
) -> csi::NodeExpandVolumeRequest {
    let mut r = csi::NodeExpandVolumeRequest::new();
    r.volume_id = id.into();
    r.volume_path = path(volume_path);
    if let Some(staging) = staging {
        r.staging_target_path = path(staging);
    }
    if let Some(bytes) = bytes {
        r.capacity_range = Some(capacity(bytes)).into();
    }
    r
}
