//! CSI messages as JSON for scripts (`--json` of the tools): fields by
//! their JSON names, enums by name, bytes as lists of numbers, 64-bit
//! integers as JSON numbers (not the strings of the canonical proto3
//! mapping: `jq` compares them directly), unset message fields left out.

use protobuf::reflect::{ReflectFieldRef, ReflectValueRef};
use protobuf::MessageDyn;
use serde_json::{Map, Value};

/// `m` as a JSON object.
pub fn message(m: &dyn MessageDyn) -> Value {
    let mut out = Map::new();
    for field in m.descriptor_dyn().fields() {
        let value = match field.get_reflect(m) {
            ReflectFieldRef::Optional(v) => match v.value() {
                Some(v) => value(v),
                None => continue,
            },
            ReflectFieldRef::Repeated(r) => {
                Value::Array((0..r.len()).map(|i| value(r.get(i))).collect())
            }
            ReflectFieldRef::Map(map) => Value::Object(
                (&map)
                    .into_iter()
                    .map(|(k, v)| (key(k), value(v)))
                    .collect(),
            ),
        };
        out.insert(field.json_name().to_owned(), value);
    }
    Value::Object(out)
}

fn key(k: ReflectValueRef<'_>) -> String {
    match value(k) {
        Value::String(s) => s,
        other => other.to_string(),
    }
}

fn value(v: ReflectValueRef<'_>) -> Value {
    match v {
        ReflectValueRef::U32(n) => n.into(),
        ReflectValueRef::U64(n) => n.into(),
        ReflectValueRef::I32(n) => n.into(),
        ReflectValueRef::I64(n) => n.into(),
        ReflectValueRef::F32(n) => n.into(),
        ReflectValueRef::F64(n) => n.into(),
        ReflectValueRef::Bool(b) => b.into(),
        ReflectValueRef::String(s) => s.into(),
        ReflectValueRef::Bytes(b) => b.to_vec().into(),
        ReflectValueRef::Enum(d, n) => match d.value_by_number(n) {
            Some(e) => e.name().into(),
            None => n.into(),
        },
        ReflectValueRef::Message(m) => message(&*m),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::csi;

    #[test]
    fn messages_become_json_by_field_name() {
        let mut v = csi::Volume::new();
        v.volume_id = "vol-1".into();
        v.capacity_bytes = 1 << 40;
        v.volume_context.insert("fsType".into(), "xfs".into());
        let mut r = csi::CreateVolumeResponse::new();
        r.volume = Some(v).into();
        let j = message(&r);
        assert_eq!(j["volume"]["volumeId"], "vol-1");
        assert_eq!(j["volume"]["capacityBytes"], 1u64 << 40);
        assert_eq!(j["volume"]["volumeContext"]["fsType"], "xfs");
        assert_eq!(j["volume"]["accessibleTopology"], serde_json::json!([]));

        let mut cap = csi::VolumeCapability::new();
        let mut am = csi::volume_capability::AccessMode::new();
        am.mode = csi::volume_capability::access_mode::Mode::SINGLE_NODE_WRITER.into();
        cap.access_mode = Some(am).into();
        assert_eq!(message(&cap)["accessMode"]["mode"], "SINGLE_NODE_WRITER");
        // An unset message field is left out.
        assert!(message(&csi::CreateVolumeResponse::new())
            .as_object()
            .unwrap()
            .is_empty());
    }
}
