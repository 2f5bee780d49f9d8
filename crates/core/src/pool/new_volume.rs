//! What a CreateVolume asks for, checked and resolved into a
//! [`VolumeSpec`]: the capabilities agree on mount or block and on one
//! filesystem, the layout can serve every access mode asked for, and the
//! StorageClass parameters (`volume::parameters`) and mkfs options
//! (`volume::mkfs_options`) are ones filevol takes. Nothing here touches the
//! pool: a refused request has changed nothing.

use std::collections::BTreeMap;

use super::capability::Capability;
use super::{CapacityRange, VolumeSpec};
use crate::volume::meta::{AccessType, FsType, Layout};
use crate::volume::mkfs_options;
use crate::volume::parameters::{self, ParamError, Set, VolumeParameters};

/// A request field that asks for something filevol cannot make (a
/// CreateVolume's, or an ephemeral volume's publish): INVALID_ARGUMENT
/// naming the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct Refused {
    /// The request field at fault (`parameters`, `volume_capabilities`,
    /// `volume_context`, ...).
    pub field: &'static str,
    /// What is wrong with it.
    pub reason: String,
}

fn capabilities(reason: impl Into<String>) -> Refused {
    Refused {
        field: "volume_capabilities",
        reason: reason.into(),
    }
}

impl From<ParamError> for Refused {
    fn from(e: ParamError) -> Self {
        let field = match e.set {
            Set::Parameters => "parameters",
            Set::Mutable => "mutable_parameters",
        };
        Refused {
            field,
            reason: e.reason,
        }
    }
}

/// The volume a CreateVolume named `name` asks for, without its content
/// source (the caller adds it). `caps` is not empty (the service checks
/// that with the capabilities themselves).
pub fn spec(
    name: &str,
    caps: &[Capability],
    capacity: CapacityRange,
    parameters: BTreeMap<String, String>,
    mutable_parameters: BTreeMap<String, String>,
) -> Result<VolumeSpec, Refused> {
    let params = parameters::volume(&parameters, &mutable_parameters)?;
    let layout = params.layout;
    let access = caps[0].access;
    if caps.iter().any(|c| c.access != access) {
        return Err(capabilities(
            "mixes mount and block; a volume is one or the other",
        ));
    }
    let fs_type = match (layout, access) {
        (Layout::Dir, AccessType::Block) => {
            return Err(capabilities(
                "a dir volume cannot be a block device; use layout=image",
            ))
        }
        (Layout::Dir, AccessType::Mount) | (Layout::Image, AccessType::Block) => None,
        (Layout::Image, AccessType::Mount) => {
            let mut fs_types = caps
                .iter()
                .map(|c| c.fs_type.as_str())
                .filter(|f| !f.is_empty());
            let first = fs_types.next().unwrap_or("");
            if fs_types.any(|f| f != first) {
                return Err(capabilities("names different filesystems"));
            }
            Some(FsType::parse(first).ok_or_else(|| {
                capabilities(format!(
                    "fs_type {first:?} is not supported; use ext4, xfs or btrfs"
                ))
            })?)
        }
    };
    if let Some(c) = caps.iter().find(|c| !c.mode.supported_by(layout)) {
        return Err(capabilities(format!(
            "access mode {:?} needs several writers on several nodes; use layout=dir",
            c.mode
        )));
    }
    params.check_layout_options()?;
    let VolumeParameters {
        thick,
        mkfs_options,
        ..
    } = params;
    // Only tuning options, checked once the filesystem is known. A block
    // volume is never formatted; its options are held to the list of ext4,
    // the filesystem the node would give it.
    mkfs_options::validate(fs_type.unwrap_or(FsType::Ext4), &mkfs_options).map_err(|e| {
        Refused {
            field: "parameters",
            reason: e.to_string(),
        }
    })?;
    Ok(VolumeSpec {
        name: name.to_owned(),
        layout,
        capacity,
        access,
        fs_type,
        thick,
        mkfs_options,
        parameters,
        mutable_parameters,
        source: None,
        modes: caps.iter().map(|c| c.mode).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::meta::AccessMode;

    fn cap(access: AccessType, fs: &str, mode: AccessMode) -> Capability {
        Capability::plain(access, fs, mode)
    }

    fn params(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn ask(caps: &[Capability], p: &[(&str, &str)]) -> Result<VolumeSpec, Refused> {
        let range = CapacityRange {
            required: 1 << 30,
            limit: 0,
        };
        spec("v", caps, range, params(p), BTreeMap::new())
    }

    const RWO: AccessMode = AccessMode::SingleNodeWriter;
    const RWX: AccessMode = AccessMode::MultiNodeMultiWriter;

    #[test]
    fn an_image_gets_the_one_filesystem_its_capabilities_name() {
        let s = ask(
            &[
                cap(AccessType::Mount, "", RWO),
                cap(AccessType::Mount, "xfs", RWO),
            ],
            &[],
        )
        .unwrap();
        assert_eq!((s.layout, s.fs_type), (Layout::Image, Some(FsType::Xfs)));
        let s = ask(&[cap(AccessType::Mount, "", RWO)], &[]).unwrap();
        assert_eq!(s.fs_type, Some(FsType::Ext4), "the default");
        let s = ask(&[cap(AccessType::Block, "", RWO)], &[]).unwrap();
        assert_eq!(s.fs_type, None);
        let e = ask(
            &[
                cap(AccessType::Mount, "ext4", RWO),
                cap(AccessType::Mount, "xfs", RWO),
            ],
            &[],
        )
        .unwrap_err();
        assert_eq!(e.field, "volume_capabilities");
        let e = ask(&[cap(AccessType::Mount, "zfs", RWO)], &[]).unwrap_err();
        assert!(e.reason.contains("\"zfs\""), "{e}");
    }

    #[test]
    fn shapes_the_layout_cannot_serve_are_refused() {
        let mixed = [
            cap(AccessType::Mount, "", RWO),
            cap(AccessType::Block, "", RWO),
        ];
        assert!(ask(&mixed, &[])
            .unwrap_err()
            .reason
            .contains("mixes mount and block"));
        let e = ask(&[cap(AccessType::Block, "", RWO)], &[("layout", "dir")]).unwrap_err();
        assert!(e.reason.contains("cannot be a block device"), "{e}");
        let e = ask(&[cap(AccessType::Mount, "", RWX)], &[]).unwrap_err();
        assert!(e.reason.contains("use layout=dir"), "{e}");
        let s = ask(&[cap(AccessType::Mount, "", RWX)], &[("layout", "dir")]).unwrap();
        assert_eq!((s.layout, s.fs_type), (Layout::Dir, None));
    }

    #[test]
    fn parameters_are_refused_with_the_field_they_came_in() {
        let m = [cap(AccessType::Mount, "", RWO)];
        assert_eq!(ask(&m, &[("bogus", "1")]).unwrap_err().field, "parameters");
        let e = ask(&m, &[("layout", "dir"), ("thick", "true")]).unwrap_err();
        assert!(e.reason.contains("image volumes only"), "{e}");
        let e = ask(&m, &[("mkfsOptions", "-d /etc")]).unwrap_err();
        assert_eq!(e.field, "parameters");
        let range = CapacityRange {
            required: 1,
            limit: 0,
        };
        let e = spec(
            "v",
            &m,
            range,
            BTreeMap::new(),
            params(&[("thick", "maybe")]),
        )
        .unwrap_err();
        assert_eq!(e.field, "mutable_parameters");
        let s = ask(&m, &[("thick", "true"), ("mkfsOptions", "-m 1")]).unwrap();
        assert!(s.thick);
        assert_eq!(s.mkfs_options, ["-m", "1"]);
    }
}
