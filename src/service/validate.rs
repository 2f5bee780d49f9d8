//! Request checks shared by the services: ids, names, capabilities,
//! capacity ranges, pagination. Each turns protobuf values into typed ones
//! or an INVALID_ARGUMENT that names the field.

use protobuf::MessageField;

use crate::error::Error;
use crate::proto::csi;
use crate::proto::csi::volume_capability::access_mode::Mode;
use filevol_core::pool::capability::Capability;
use filevol_core::pool::CapacityRange;
use filevol_core::volume::ids;
use filevol_core::volume::meta::{AccessMode, AccessType};

/// A required id: present and unable to leave its directory.
pub fn id(field: &'static str, value: &str) -> Result<(), Error> {
    ids::check(value).map_err(|reason| Error::invalid(field, reason))
}

/// A required name (CreateVolume, CreateSnapshot, group snapshots).
pub fn name(value: &str) -> Result<(), Error> {
    ids::check_name(value).map_err(|reason| Error::invalid("name", reason))
}

/// Checks one capability.
pub fn capability(field: &'static str, cap: &csi::VolumeCapability) -> Result<Capability, Error> {
    let mode = match cap.access_mode.as_ref().map(|m| m.mode.enum_value()) {
        None => return Err(Error::invalid(field, "access_mode is missing")),
        Some(Ok(m)) => {
            access_mode(m).ok_or_else(|| Error::invalid(field, "access_mode is UNKNOWN"))?
        }
        Some(Err(n)) => {
            return Err(Error::invalid(
                field,
                format!("access_mode {n} is not a CSI mode"),
            ))
        }
    };
    let typed = if cap.has_block() {
        Capability {
            access: AccessType::Block,
            fs_type: String::new(),
            mount_flags: Vec::new(),
            mount_group: String::new(),
            mode,
        }
    } else if cap.has_mount() {
        let m = cap.mount();
        Capability {
            access: AccessType::Mount,
            fs_type: m.fs_type.clone(),
            mount_flags: m.mount_flags.clone(),
            mount_group: m.volume_mount_group.clone(),
            mode,
        }
    } else {
        return Err(Error::invalid(
            field,
            "access_type (mount or block) is missing",
        ));
    };
    Ok(typed)
}

/// Checks a required, non-empty list of capabilities.
pub fn capabilities(
    field: &'static str,
    caps: &[csi::VolumeCapability],
) -> Result<Vec<Capability>, Error> {
    if caps.is_empty() {
        return Err(Error::invalid(field, "at least one capability is required"));
    }
    caps.iter().map(|c| capability(field, c)).collect()
}

fn access_mode(m: Mode) -> Option<AccessMode> {
    Some(match m {
        Mode::UNKNOWN => return None,
        Mode::SINGLE_NODE_WRITER => AccessMode::SingleNodeWriter,
        Mode::SINGLE_NODE_READER_ONLY => AccessMode::SingleNodeReaderOnly,
        Mode::MULTI_NODE_READER_ONLY => AccessMode::MultiNodeReaderOnly,
        Mode::MULTI_NODE_SINGLE_WRITER => AccessMode::MultiNodeSingleWriter,
        Mode::MULTI_NODE_MULTI_WRITER => AccessMode::MultiNodeMultiWriter,
        Mode::SINGLE_NODE_SINGLE_WRITER => AccessMode::SingleNodeSingleWriter,
        Mode::SINGLE_NODE_MULTI_WRITER => AccessMode::SingleNodeMultiWriter,
    })
}

/// A capacity range; absent means "no preference".
pub fn capacity(range: &MessageField<csi::CapacityRange>) -> Result<CapacityRange, Error> {
    let Some(r) = range.as_ref() else {
        return Ok(CapacityRange::default());
    };
    let bytes = |field: &'static str, v: i64| {
        u64::try_from(v).map_err(|_| Error::invalid(field, format!("{v} is negative")))
    };
    Ok(CapacityRange {
        required: bytes("capacity_range.required_bytes", r.required_bytes)?,
        limit: bytes("capacity_range.limit_bytes", r.limit_bytes)?,
    })
}

/// `max_entries`: 0 means no limit; negative is invalid.
pub fn max_entries(n: i32) -> Result<usize, Error> {
    usize::try_from(n).map_err(|_| Error::invalid("max_entries", format!("{n} is negative")))
}

/// Pagination tokens are `n:<id of the next entry>`: a cursor, so entries
/// created or deleted between pages do not shift the rest.
pub fn starting_token(token: &str) -> Result<Option<String>, Error> {
    if token.is_empty() {
        return Ok(None);
    }
    match token.strip_prefix("n:") {
        Some(id) if ids::check(id).is_ok() => Ok(Some(id.to_owned())),
        _ => Err(Error::BadToken(token.to_owned())),
    }
}

/// The token for the page that starts at `next`.
pub fn next_token(next: Option<String>) -> String {
    next.map(|id| format!("n:{id}")).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cap(mode: Mode, block: bool) -> csi::VolumeCapability {
        let mut c = csi::VolumeCapability::new();
        let mut am = csi::volume_capability::AccessMode::new();
        am.mode = mode.into();
        c.access_mode = Some(am).into();
        if block {
            c.set_block(Default::default());
        } else {
            let mut m = csi::volume_capability::MountVolume::new();
            m.fs_type = "xfs".into();
            c.set_mount(m);
        }
        c
    }

    #[test]
    fn capabilities_are_typed() {
        let c = capability("volume_capability", &cap(Mode::SINGLE_NODE_WRITER, false)).unwrap();
        assert_eq!(c.access, AccessType::Mount);
        assert_eq!(c.fs_type, "xfs");
        assert_eq!(c.mode, AccessMode::SingleNodeWriter);
        let b = capability(
            "volume_capability",
            &cap(Mode::MULTI_NODE_READER_ONLY, true),
        )
        .unwrap();
        assert_eq!(b.access, AccessType::Block);
        assert!(capability("c", &cap(Mode::UNKNOWN, true)).is_err());
        assert!(capability("c", &csi::VolumeCapability::new()).is_err());
        assert!(capabilities("c", &[]).is_err());
    }

    #[test]
    fn tokens_round_trip_and_foreign_ones_are_refused() {
        assert_eq!(starting_token("").unwrap(), None);
        let t = next_token(Some("pvc-1-00ff".into()));
        assert_eq!(starting_token(&t).unwrap().as_deref(), Some("pvc-1-00ff"));
        assert!(matches!(
            starting_token("invalid-token"),
            Err(Error::BadToken(_))
        ));
        assert!(matches!(starting_token("n:../x"), Err(Error::BadToken(_))));
    }

    #[test]
    fn negative_sizes_are_invalid() {
        let mut r = csi::CapacityRange::new();
        r.required_bytes = -1;
        assert!(capacity(&Some(r).into()).is_err());
        assert_eq!(
            capacity(&MessageField::none()).unwrap(),
            CapacityRange::default()
        );
    }
}
