//! Requests as text for logs, with every secret taken out.
//!
//! The CSI proto marks credential fields with the `csi_secret` field option
//! (extension number 1059). Rather than remembering which requests have a
//! `secrets` map, the redactor reads that option from the message
//! descriptors, so a field the spec marks secret in a later version is
//! covered without a code change here.

use protobuf::reflect::{FieldDescriptor, ReflectValueBox, RuntimeFieldType, RuntimeType};
use protobuf::{MessageDyn, MessageFull};

/// The field number of the `csi_secret` option in proto/csi.proto.
const CSI_SECRET_OPTION: u32 = 1059;

/// What a redacted value reads as.
pub const REDACTED: &str = "<redacted>";

/// `msg` in protobuf text format, one line, with the value of every field
/// marked `csi_secret` replaced by [`REDACTED`] (map keys stay, so the log
/// still shows which secrets were passed).
pub fn redacted_text<M: MessageFull>(msg: &M) -> String {
    let mut copy = msg.clone();
    redact(&mut copy);
    protobuf::text_format::print_to_string(&copy)
}

fn is_secret(field: &FieldDescriptor) -> bool {
    field
        .proto()
        .options
        .as_ref()
        .and_then(|o| o.special_fields.unknown_fields().get(CSI_SECRET_OPTION))
        .is_some()
}

fn redact(msg: &mut dyn MessageDyn) {
    let descriptor = msg.descriptor_dyn();
    for field in descriptor.fields() {
        if is_secret(&field) {
            redact_field(&field, msg);
            continue;
        }
        // Recurse into singular sub-messages that are present. (No CSI
        // message nests a secret today; this keeps it so if one ever does.)
        if let RuntimeFieldType::Singular(RuntimeType::Message(_)) = field.runtime_field_type() {
            if field.has_field(msg) {
                redact(field.mut_message(msg));
            }
        }
    }
}

fn redact_field(field: &FieldDescriptor, msg: &mut dyn MessageDyn) {
    match field.runtime_field_type() {
        RuntimeFieldType::Map(RuntimeType::String, RuntimeType::String) => {
            let keys: Vec<String> = field
                .get_map(msg)
                .into_iter()
                .map(|(k, _)| k.to_str().unwrap_or_default().to_owned())
                .collect();
            let mut map = field.mut_map(msg);
            map.clear();
            for k in keys {
                map.insert(
                    ReflectValueBox::String(k),
                    ReflectValueBox::String(REDACTED.to_owned()),
                );
            }
        }
        RuntimeFieldType::Singular(RuntimeType::String) if field.has_field(msg) => {
            field.set_singular_field(msg, ReflectValueBox::String(REDACTED.to_owned()));
        }
        // Any other shape of secret is dropped whole.
        _ => field.clear_field(msg),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::csi;

    #[test]
    fn secrets_are_replaced_and_the_rest_kept() {
        let mut req = csi::CreateVolumeRequest::new();
        req.name = "pvc-1".into();
        req.secrets.insert("password".into(), "hunter2".into());
        req.parameters.insert("layout".into(), "image".into());
        let text = redacted_text(&req);
        assert!(!text.contains("hunter2"), "{text}");
        assert!(text.contains("password"), "{text}");
        assert!(text.contains(REDACTED), "{text}");
        assert!(text.contains("pvc-1") && text.contains("layout"), "{text}");
        // The caller's message is untouched.
        assert_eq!(req.secrets["password"], "hunter2");
    }

    #[test]
    fn every_message_with_secrets_is_covered() {
        // Walk the whole CSI file: every message with a `secrets` map must
        // come out without the secret's value. A `secrets` field whose
        // csi_secret option got lost in the proto would fail here.
        let mut checked = 0;
        for descriptor in csi::file_descriptor().messages() {
            let Some(field) = descriptor.field_by_name("secrets") else {
                continue;
            };
            let mut msg = descriptor.new_instance();
            field
                .mut_map(msg.as_mut())
                .insert("k".to_string().into(), "s3cr3t".to_string().into());
            redact(msg.as_mut());
            let text = protobuf::text_format::print_to_string(msg.as_ref());
            assert!(!text.contains("s3cr3t"), "{}: {text}", descriptor.name());
            checked += 1;
        }
        // The 19 requests of CSI v1.12 that take secrets (17, and the two
        // SnapshotMetadata requests), and the three health requests of
        // v1.13 that do.
        assert_eq!(checked, 22);
    }
}
