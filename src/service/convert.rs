//! Pool records into CSI messages.

use std::collections::HashMap;

use protobuf::well_known_types::timestamp::Timestamp;

use crate::proto::csi;
use filevol_core::pool::attachments::Attachments;
use filevol_core::pool::Pool;
use filevol_core::volume::meta::{AccessType, GroupMeta, Layout, SnapshotMeta, Source, VolumeMeta};

/// A byte or inode count as CSI's int64 fields carry it (saturating: no
/// count of ours reaches 2^63).
pub fn count(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// A volume as CreateVolume, ListVolumes and ControllerGetVolume return it.
pub fn volume(v: &VolumeMeta) -> csi::Volume {
    let mut out = csi::Volume::new();
    out.volume_id.clone_from(&v.id);
    out.capacity_bytes = count(v.capacity_bytes);
    out.volume_context = volume_context(v);
    if let Some(source) = &v.source {
        let mut cs = csi::VolumeContentSource::new();
        match source {
            Source::Snapshot(id) => {
                let mut s = csi::volume_content_source::SnapshotSource::new();
                s.snapshot_id.clone_from(id);
                cs.set_snapshot(s);
            }
            Source::Volume(id) => {
                let mut s = csi::volume_content_source::VolumeSource::new();
                s.volume_id.clone_from(id);
                cs.set_volume(s);
            }
        }
        out.content_source = Some(cs).into();
    }
    if !v.topology.is_empty() {
        out.accessible_topology.push(topology(&v.topology));
    }
    out
}

/// What the node is told about a volume (it reads the rest from the pool).
pub fn volume_context(v: &VolumeMeta) -> HashMap<String, String> {
    let mut ctx = HashMap::new();
    ctx.insert(
        "layout".to_owned(),
        match v.layout {
            Layout::Image => "image",
            Layout::Dir => "dir",
        }
        .to_owned(),
    );
    ctx.insert(
        "access".to_owned(),
        match v.access {
            AccessType::Mount => "mount",
            AccessType::Block => "block",
        }
        .to_owned(),
    );
    if let Some(fs) = v.fs_type {
        ctx.insert("fsType".to_owned(), fs.as_str().to_owned());
    }
    ctx
}

/// A topology segment.
pub fn topology(segments: &std::collections::BTreeMap<String, String>) -> csi::Topology {
    let mut t = csi::Topology::new();
    t.segments = segments
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    t
}

/// A volume condition: abnormal with a message, or normal.
pub fn condition(problem: Option<String>) -> csi::VolumeCondition {
    let mut c = csi::VolumeCondition::new();
    if let Some(message) = problem {
        c.abnormal = true;
        c.message = message;
    }
    c
}

/// A volume's ControllerGetVolume/ListVolumes `published_node_ids`, from
/// the pool's attachment records read for the call.
pub fn published_nodes(attached: &Attachments, v: &VolumeMeta) -> Vec<String> {
    attached.of(v).into_iter().map(|a| a.node_id).collect()
}

fn timestamp(secs: i64, nanos: i32) -> Timestamp {
    let mut t = Timestamp::new();
    t.seconds = secs;
    t.nanos = nanos;
    t
}

/// A snapshot. It is in the pool only once complete, so always ready.
pub fn snapshot(s: &SnapshotMeta) -> csi::Snapshot {
    let mut out = csi::Snapshot::new();
    out.snapshot_id.clone_from(&s.id);
    out.source_volume_id.clone_from(&s.source_volume_id);
    out.size_bytes = count(s.size_bytes);
    out.creation_time = Some(timestamp(s.created_secs, s.created_nanos)).into();
    out.ready_to_use = true;
    out.group_snapshot_id = s.group_id.clone().unwrap_or_default();
    out
}

/// A group snapshot with its members.
pub fn group(pool: &Pool, g: &GroupMeta) -> csi::VolumeGroupSnapshot {
    let mut out = csi::VolumeGroupSnapshot::new();
    out.group_snapshot_id.clone_from(&g.id);
    out.snapshots = g
        .snapshot_ids
        .iter()
        .filter_map(|id| pool.snapshot(id).ok())
        .map(|s| snapshot(&s))
        .collect();
    out.creation_time = Some(timestamp(g.created_secs, g.created_nanos)).into();
    out.ready_to_use = true;
    out
}
