//! Pool records into CSI messages.

use std::collections::HashMap;

use protobuf::well_known_types::timestamp::Timestamp;

use crate::proto::csi;
use filevol_core::health::{Finding, Health, Reason, Severity};
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

/// The v1.12 volume condition of `health`: abnormal with every finding
/// in its message (reason first), or normal.
pub fn condition(health: &Health) -> csi::VolumeCondition {
    let mut c = csi::VolumeCondition::new();
    c.abnormal = !health.is_healthy();
    c.message = health.message();
    c
}

/// The v1.13 status of a finding. Data gone from the pool is data loss;
/// everything else is as bad as its severity.
fn volume_status(f: &Finding) -> csi::VolumeHealthErrorType {
    match (f.reason, f.severity()) {
        (Reason::DataMissing, _) => csi::VolumeHealthErrorType::DATA_LOSS,
        (_, Severity::Inaccessible) => csi::VolumeHealthErrorType::INACCESSIBLE,
        (_, Severity::Degraded) => csi::VolumeHealthErrorType::DEGRADED,
    }
}

/// The v1.13 `VolumeHealth` of volume `id`: one entry per finding, none
/// when it is healthy. The entry's reason is the stable name in CamelCase
/// (the spec asks for "a brief CamelCase string"); the metrics and the
/// v1.12 message use the snake-case form.
pub fn volume_health(id: &str, health: &Health) -> csi::VolumeHealth {
    let mut v = csi::VolumeHealth::new();
    v.volume_id = id.to_owned();
    for f in &health.findings {
        let mut e = csi::volume_health::VolumeHealthEntry::new();
        e.status = volume_status(f).into();
        e.reason = f.reason.camel_case();
        e.message.clone_from(&f.message);
        v.health_statuses.push(e);
    }
    v
}

/// The v1.13 storage health of the pool: one entry per finding (an
/// unreachable pool is STORAGE_UNREACHABLE, the rest degraded), none when
/// it is healthy.
pub fn storage_health(
    health: &Health,
) -> Vec<csi::node_get_storage_health_response::StorageBackendHealth> {
    health
        .findings
        .iter()
        .map(|f| {
            let mut b = csi::node_get_storage_health_response::StorageBackendHealth::new();
            b.status = match f.severity() {
                Severity::Inaccessible => csi::StorageHealthErrorType::STORAGE_UNREACHABLE,
                Severity::Degraded => csi::StorageHealthErrorType::STORAGE_DEGRADED,
            }
            .into();
            b.reason = f.reason.camel_case();
            b.message.clone_from(&f.message);
            b
        })
        .collect()
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

#[cfg(test)]
mod wire_tests {
    //! Both wires at the byte level: what filevol sends and reads must be
    //! exactly what the spec's definitions encode (v1.12.0 for the volume
    //! condition, v1.13.0 for the health calls): field numbers, wire types
    //! and enum values written out by hand here, not by the generated code.
    use super::*;
    use protobuf::Message;

    /// A length prefix that fits in one byte.
    fn len(bytes: &[u8]) -> u8 {
        u8::try_from(bytes.len()).unwrap()
    }

    fn finding(reason: Reason, message: &str) -> Health {
        let mut h = Health::ok();
        h.add(Finding::new(reason, message));
        h
    }

    #[test]
    fn the_v1_12_condition_is_field_2_of_the_stats_answer() {
        let mut resp = csi::NodeGetVolumeStatsResponse::new();
        resp.volume_condition = Some(condition(&finding(Reason::NotMounted, "m"))).into();
        let bytes = resp.write_to_bytes().unwrap();
        // field 2 (length-delimited) { abnormal (1, varint) = 1,
        // message (2, length-delimited) = "not_mounted: m" }
        let mut want = vec![0x12, 18, 0x08, 0x01, 0x12, 14];
        want.extend_from_slice(b"not_mounted: m");
        assert_eq!(bytes, want);
        // A healthy volume: abnormal false (not sent), no message.
        let mut ok = csi::NodeGetVolumeStatsResponse::new();
        ok.volume_condition = Some(condition(&Health::ok())).into();
        assert_eq!(ok.write_to_bytes().unwrap(), vec![0x12, 0x00]);
    }

    #[test]
    fn the_v1_13_volume_health_encodes_as_published() {
        let mut resp = csi::NodeGetVolumeHealthResponse::new();
        resp.volume_health = Some(volume_health("v", &finding(Reason::PoolFull, "m"))).into();
        let bytes = resp.write_to_bytes().unwrap();
        // VolumeHealthEntry { status (1) = DEGRADED (1), reason (2), message (3) }
        let mut entry = vec![0x08, 0x01, 0x12, 8];
        entry.extend_from_slice(b"PoolFull");
        entry.extend_from_slice(&[0x1a, 1, b'm']);
        // VolumeHealth { volume_id (1) = "v", health_statuses (2) = [entry] }
        let mut health = vec![0x0a, 1, b'v', 0x12, len(&entry)];
        health.extend_from_slice(&entry);
        // NodeGetVolumeHealthResponse { volume_health (1) }
        let mut want = vec![0x0a, len(&health)];
        want.extend_from_slice(&health);
        assert_eq!(bytes, want);

        // The statuses' numbers: INACCESSIBLE 2, DATA_LOSS 3.
        let lost = volume_health("v", &finding(Reason::DataMissing, "m"));
        assert_eq!(lost.health_statuses[0].status.value(), 3);
        let gone = volume_health("v", &finding(Reason::NotMounted, "m"));
        assert_eq!(gone.health_statuses[0].status.value(), 2);
        // Healthy: the id and no entries.
        let healthy = volume_health("v", &Health::ok());
        assert_eq!(healthy.write_to_bytes().unwrap(), vec![0x0a, 1, b'v']);
    }

    #[test]
    fn the_v1_13_storage_health_encodes_as_published() {
        let mut resp = csi::NodeGetStorageHealthResponse::new();
        resp.backend_health = storage_health(&finding(Reason::PoolUnreachable, "m"));
        let bytes = resp.write_to_bytes().unwrap();
        // StorageBackendHealth { status (1) = STORAGE_UNREACHABLE (2),
        // reason (2), message (3) } as backend_health (1).
        let mut entry = vec![0x08, 0x02, 0x12, 15];
        entry.extend_from_slice(b"PoolUnreachable");
        entry.extend_from_slice(&[0x1a, 1, b'm']);
        let mut want = vec![0x0a, len(&entry)];
        want.extend_from_slice(&entry);
        assert_eq!(bytes, want);
        let low = storage_health(&finding(Reason::PoolLowSpace, "m"));
        assert_eq!(low[0].status.value(), 1, "STORAGE_DEGRADED");
    }

    #[test]
    fn the_v1_13_requests_decode_from_their_published_field_numbers() {
        // NodeGetVolumeHealthRequest { volume_id 1, volume_publish_path 2,
        // staging_target_path 3 }
        let r = csi::NodeGetVolumeHealthRequest::parse_from_bytes(&[
            0x0a, 1, b'v', 0x12, 1, b'p', 0x1a, 1, b's',
        ])
        .unwrap();
        assert_eq!(
            (
                &*r.volume_id,
                &*r.volume_publish_path,
                &*r.staging_target_path
            ),
            ("v", "p", "s")
        );
        // ControllerGetVolumeHealthRequest { volume_id 1, secrets 2 (map) }
        let r = csi::ControllerGetVolumeHealthRequest::parse_from_bytes(&[
            0x0a, 1, b'v', 0x12, 6, 0x0a, 1, b'k', 0x12, 1, b's',
        ])
        .unwrap();
        assert_eq!(r.volume_id, "v");
        assert_eq!(r.secrets["k"], "s");
        // ControllerListVolumeHealthRequest { max_entries 1, starting_token 2,
        // secrets 3 }
        let r = csi::ControllerListVolumeHealthRequest::parse_from_bytes(&[
            0x08, 5, 0x12, 1, b't', 0x1a, 6, 0x0a, 1, b'k', 0x12, 1, b's',
        ])
        .unwrap();
        assert_eq!((r.max_entries, &*r.starting_token), (5, "t"));
        assert_eq!(r.secrets["k"], "s");
        // NodeGetStorageHealthRequest { secrets 1 }
        let r = csi::NodeGetStorageHealthRequest::parse_from_bytes(&[
            0x0a, 6, 0x0a, 1, b'k', 0x12, 1, b's',
        ])
        .unwrap();
        assert_eq!(r.secrets["k"], "s");
    }

    #[test]
    fn the_capability_values_of_both_wires() {
        use csi::controller_service_capability::rpc::Type as Ctrl;
        use csi::node_service_capability::rpc::Type as Node;
        // v1.12 (reserved in v1.13): VOLUME_CONDITION, controller 11 and
        // node 4. v1.13: controller GET_VOLUME_HEALTH 16 and
        // LIST_VOLUME_HEALTH 17, node GET_VOLUME_HEALTH 7 and
        // GET_STORAGE_HEALTH 8.
        assert_eq!(Ctrl::VOLUME_CONDITION as i32, 11);
        assert_eq!(Ctrl::GET_VOLUME_HEALTH as i32, 16);
        assert_eq!(Ctrl::LIST_VOLUME_HEALTH as i32, 17);
        assert_eq!(Node::VOLUME_CONDITION as i32, 4);
        assert_eq!(Node::GET_VOLUME_HEALTH as i32, 7);
        assert_eq!(Node::GET_STORAGE_HEALTH as i32, 8);
        let mut rpc = csi::node_service_capability::RPC::new();
        rpc.type_ = Node::GET_STORAGE_HEALTH.into();
        let mut cap = csi::NodeServiceCapability::new();
        cap.set_rpc(rpc);
        // rpc (1) { type (1) = 8 }
        assert_eq!(cap.write_to_bytes().unwrap(), vec![0x0a, 2, 0x08, 8]);
    }
}
