//! What a CO asks of a volume (a capability: mount or block, filesystem,
//! access mode) and whether a volume can give it. No protobuf here: the
//! service layer builds a [`Capability`] from the request.

use super::{Pool, PoolError};
use crate::volume::meta::{AccessMode, AccessType, VolumeMeta};

/// A volume capability, checked and typed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capability {
    /// Mount or block.
    pub access: AccessType,
    /// `fs_type` of a mount capability (empty: the default).
    pub fs_type: String,
    /// Mount flags of a mount capability.
    pub mount_flags: Vec<String>,
    /// `volume_mount_group` (fsGroup) of a mount capability.
    pub mount_group: String,
    /// The access mode.
    pub mode: AccessMode,
}

impl Capability {
    /// A capability without mount flags or group: what the unit tests ask
    /// with.
    #[cfg(test)]
    pub(crate) fn plain(access: AccessType, fs_type: &str, mode: AccessMode) -> Capability {
        Capability {
            access,
            fs_type: fs_type.into(),
            mount_flags: vec![],
            mount_group: String::new(),
            mode,
        }
    }
}

/// Why `v` cannot serve `cap`, or `None` when it can.
pub fn mismatch(v: &VolumeMeta, cap: &Capability) -> Option<String> {
    if v.access != cap.access {
        return Some(format!(
            "volume {} is a {} volume, the capability asks for {}",
            v.id,
            access_name(v.access),
            access_name(cap.access)
        ));
    }
    if !cap.mode.supported_by(v.layout) {
        return Some(format!(
            "access mode {:?} needs a volume that several nodes can write; volume {} is an image (use layout=dir)",
            cap.mode, v.id
        ));
    }
    if let (Some(fs), false) = (v.fs_type, cap.fs_type.is_empty()) {
        if fs.as_str() != cap.fs_type {
            return Some(format!(
                "volume {} holds {}, the capability asks for {}",
                v.id,
                fs.as_str(),
                cap.fs_type
            ));
        }
    }
    None
}

fn access_name(a: AccessType) -> &'static str {
    match a {
        AccessType::Mount => "filesystem",
        AccessType::Block => "block",
    }
}

impl Pool {
    /// The volume `id`, checked against the capability a CO asks for: the
    /// record, or why the volume cannot serve it (`Unsupported`).
    pub fn volume_for(&self, id: &str, cap: &Capability) -> Result<VolumeMeta, PoolError> {
        let v = self.volume(id)?;
        match mismatch(&v, cap) {
            Some(why) => Err(PoolError::Unsupported(why)),
            None => Ok(v),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::meta::{FsType, Layout};

    fn volume(layout: Layout, access: AccessType, fs_type: Option<FsType>) -> VolumeMeta {
        VolumeMeta {
            format: crate::volume::meta::FORMAT,
            id: "v".into(),
            name: "n".into(),
            layout,
            capacity_bytes: 1 << 20,
            access,
            fs_type,
            thick: false,
            mkfs_options: vec![],
            parameters: Default::default(),
            mutable_parameters: Default::default(),
            source: None,
            topology: Default::default(),
            created_unix_ms: 0,
            legacy_attachments: vec![],
            written: None,
            settled: false,
            formatting: false,
            subvolume: false,
        }
    }

    fn cap(access: AccessType, fs: &str, mode: AccessMode) -> Capability {
        Capability::plain(access, fs, mode)
    }

    #[test]
    fn a_volume_serves_its_own_shape_only() {
        let xfs = volume(Layout::Image, AccessType::Mount, Some(FsType::Xfs));
        let rwo = AccessMode::SingleNodeWriter;
        assert_eq!(mismatch(&xfs, &cap(AccessType::Mount, "xfs", rwo)), None);
        // No filesystem named: the volume's own.
        assert_eq!(mismatch(&xfs, &cap(AccessType::Mount, "", rwo)), None);
        let why = mismatch(&xfs, &cap(AccessType::Mount, "ext4", rwo)).unwrap();
        assert!(why.contains("holds xfs"), "{why}");
        let why = mismatch(&xfs, &cap(AccessType::Block, "", rwo)).unwrap();
        assert!(why.contains("filesystem volume"), "{why}");
        // Several writers on several nodes need a directory.
        let rwx = AccessMode::MultiNodeMultiWriter;
        assert!(mismatch(&xfs, &cap(AccessType::Mount, "xfs", rwx)).is_some());
        let dir = volume(Layout::Dir, AccessType::Mount, None);
        assert_eq!(mismatch(&dir, &cap(AccessType::Mount, "", rwx)), None);
    }
}
