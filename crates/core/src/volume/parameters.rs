//! The StorageClass parameter grammar, in one place: which keys CreateVolume,
//! ControllerModifyVolume and the snapshot calls take, and what their values
//! mean. Parsed into typed values here; the service layer only names the
//! request field an error belongs to.

use std::collections::BTreeMap;

use super::meta::Layout;

/// `layout`: `image` (default) or `dir`.
pub const LAYOUT: &str = "layout";
/// `thick`: `true` preallocates the image; mutable.
pub const THICK: &str = "thick";
/// `mkfsOptions`: tuning options for mkfs, split on whitespace (see
/// `volume::mkfs_options` for what is allowed).
pub const MKFS_OPTIONS: &str = "mkfsOptions";
/// `discard`: `true` mounts the filesystem with `discard`, so space a pod
/// frees goes back to the pool at once instead of at the next trim.
pub const DISCARD: &str = "discard";
/// `zeroFill`: `true` (with `thick=true`) writes zeros over the whole image
/// at creation, so the pool filesystem holds written blocks rather than
/// unwritten or absent ones, and the first write to each block inside the
/// volume costs what an overwrite does. Not mutable: zeros are written only
/// where no pod can be writing (a volume being built).
pub const ZERO_FILL: &str = "zeroFill";
/// Keys the external-provisioner adds itself (PVC name and namespace with
/// `--extra-create-metadata`): recorded, never interpreted.
pub const CO_PREFIX: &str = "csi.storage.k8s.io/";
/// The keys that may change after creation (`mutableParameters`, and
/// ControllerModifyVolume).
pub const MUTABLE_KEYS: &[&str] = &[THICK];

/// Which set of parameters an error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Set {
    /// The StorageClass `parameters`.
    Parameters,
    /// `mutableParameters` (VolumeAttributesClass).
    Mutable,
}

/// A parameter that is unknown or has a value filevol does not take.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct ParamError {
    /// The set the parameter came in.
    pub set: Set,
    /// What is wrong, naming the key.
    pub reason: String,
}

impl ParamError {
    fn new(set: Set, reason: impl Into<String>) -> Self {
        ParamError {
            set,
            reason: reason.into(),
        }
    }
}

/// What CreateVolume's parameters ask for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeParameters {
    /// Image (a loop-mounted file) or directory.
    pub layout: Layout,
    /// Preallocate the image.
    pub thick: bool,
    /// mkfs tuning options, one argv entry each (never a shell).
    pub mkfs_options: Vec<String>,
    /// Mount with online discard.
    pub discard: bool,
    /// Write zeros over the thick image at creation ([`ZERO_FILL`]).
    pub zero_fill: bool,
}

/// What mutable parameters ask to change.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MutableParameters {
    /// `thick`, when given.
    pub thick: Option<bool>,
}

/// Parses CreateVolume's `parameters` and `mutable_parameters`. A mutable
/// `thick` overrides the class's.
pub fn volume(
    params: &BTreeMap<String, String>,
    mutable_params: &BTreeMap<String, String>,
) -> Result<VolumeParameters, ParamError> {
    let overrides = mutable(mutable_params)?;
    let mut layout = Layout::Image;
    let mut thick = false;
    let mut mkfs_options = Vec::new();
    let mut discard = false;
    let mut zero_fill = false;
    for (key, value) in params {
        match key.as_str() {
            LAYOUT => {
                layout = match value.as_str() {
                    "image" => Layout::Image,
                    "dir" => Layout::Dir,
                    other => {
                        return Err(ParamError::new(
                            Set::Parameters,
                            format!("layout={other:?}: expected \"image\" or \"dir\""),
                        ))
                    }
                }
            }
            THICK => thick = boolean(Set::Parameters, THICK, value)?,
            MKFS_OPTIONS => mkfs_options = value.split_whitespace().map(str::to_owned).collect(),
            DISCARD => discard = boolean(Set::Parameters, DISCARD, value)?,
            ZERO_FILL => zero_fill = boolean(Set::Parameters, ZERO_FILL, value)?,
            k if k.starts_with(CO_PREFIX) => {}
            other => {
                return Err(ParamError::new(
                    Set::Parameters,
                    format!(
                        "unknown parameter {other:?}; filevol takes layout, thick, zeroFill, mkfsOptions and discard"
                    ),
                ))
            }
        }
    }
    if let Some(t) = overrides.thick {
        thick = t;
    }
    Ok(VolumeParameters {
        layout,
        thick,
        mkfs_options,
        discard,
        zero_fill,
    })
}

impl VolumeParameters {
    /// Refuses image options on a directory volume. Separate from
    /// [`volume`] so a caller can check the capabilities first and report
    /// the more basic mistake (a directory asked to be a block device).
    pub fn check_layout_options(&self) -> Result<(), ParamError> {
        if self.layout == Layout::Dir
            && (self.thick || self.zero_fill || !self.mkfs_options.is_empty() || self.discard)
        {
            return Err(ParamError::new(
                Set::Parameters,
                "thick, zeroFill, mkfsOptions and discard apply to image volumes only",
            ));
        }
        if self.zero_fill && !self.thick {
            return Err(ParamError::new(
                Set::Parameters,
                "zeroFill=true needs thick=true: the zeros are the preallocation, written",
            ));
        }
        if self.thick && self.discard {
            return Err(ParamError::new(
                Set::Parameters,
                "discard=true with thick=true: every discard would punch a hole in the preallocation that thick keeps; choose one",
            ));
        }
        Ok(())
    }
}

/// Parses mutable parameters (CreateVolume's `mutable_parameters`,
/// ControllerModifyVolume's): only [`MUTABLE_KEYS`].
pub fn mutable(params: &BTreeMap<String, String>) -> Result<MutableParameters, ParamError> {
    let mut out = MutableParameters::default();
    for (key, value) in params {
        match key.as_str() {
            THICK => out.thick = Some(boolean(Set::Mutable, THICK, value)?),
            other => {
                return Err(ParamError::new(
                    Set::Mutable,
                    format!(
                        "unknown key {other:?}; mutable parameters are: {}",
                        MUTABLE_KEYS.join(", ")
                    ),
                ))
            }
        }
    }
    Ok(out)
}

/// Whether a volume created with `params` (its recorded StorageClass
/// parameters, checked by [`volume`] at creation) is mounted with online
/// discard. A volume made thick since (ControllerModifyVolume) is not: its
/// preallocation wins.
pub fn online_discard(params: &BTreeMap<String, String>, thick: bool) -> bool {
    !thick && params.get(DISCARD).map(String::as_str) == Some("true")
}

/// Whether a volume with `params` (its StorageClass parameters, checked by
/// [`volume`] at creation, which refuses `zeroFill` on anything but a thick
/// image) has zeros written over its image when it is built: the pool
/// builds it so, and a node knows from it that the image's data extents
/// are those zeros (see `node::format::blank_image`).
pub fn zero_fill(params: &BTreeMap<String, String>) -> bool {
    params.get(ZERO_FILL).map(String::as_str) == Some("true")
}

/// Checks the parameters of a call that takes none but the CO's own
/// (snapshots, group snapshots: `what` names them in the error).
pub fn none(params: &BTreeMap<String, String>, what: &str) -> Result<(), ParamError> {
    match params.keys().find(|k| !k.starts_with(CO_PREFIX)) {
        Some(k) => Err(ParamError::new(
            Set::Parameters,
            format!("unknown parameter {k:?}; {what} take none"),
        )),
        None => Ok(()),
    }
}

fn boolean(set: Set, key: &str, value: &str) -> Result<bool, ParamError> {
    match value {
        "true" => Ok(true),
        "false" => Ok(false),
        other => Err(ParamError::new(
            set,
            format!("{key}={other:?}: expected \"true\" or \"false\""),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn defaults_are_a_thin_image_without_options() {
        let p = volume(&map(&[]), &map(&[])).unwrap();
        assert_eq!(
            p,
            VolumeParameters {
                layout: Layout::Image,
                thick: false,
                mkfs_options: vec![],
                discard: false,
                zero_fill: false,
            }
        );
    }

    #[test]
    fn every_key_is_read() {
        let p = volume(
            &map(&[
                ("layout", "image"),
                ("thick", "true"),
                ("mkfsOptions", "  -m 0\t-L  data "),
                ("csi.storage.k8s.io/pvc/name", "claim"),
            ]),
            &map(&[]),
        )
        .unwrap();
        assert_eq!(p.layout, Layout::Image);
        assert!(p.thick);
        assert_eq!(p.mkfs_options, ["-m", "0", "-L", "data"]);
        let dir = volume(&map(&[("layout", "dir")]), &map(&[])).unwrap();
        assert_eq!(dir.layout, Layout::Dir);
    }

    #[test]
    fn a_mutable_thick_overrides_the_class() {
        let p = volume(&map(&[("thick", "true")]), &map(&[("thick", "false")])).unwrap();
        assert!(!p.thick);
        let p = volume(&map(&[]), &map(&[("thick", "true")])).unwrap();
        assert!(p.thick);
    }

    #[test]
    fn unknown_keys_and_values_name_the_key_and_the_set() {
        let cases = [
            (map(&[("layot", "dir")]), map(&[]), Set::Parameters, "layot"),
            (
                map(&[("layout", "block")]),
                map(&[]),
                Set::Parameters,
                "layout",
            ),
            (map(&[("thick", "yes")]), map(&[]), Set::Parameters, "thick"),
            (map(&[]), map(&[("thick", "1")]), Set::Mutable, "thick"),
            (
                map(&[("zeroFill", "yes")]),
                map(&[]),
                Set::Parameters,
                "zeroFill",
            ),
            (
                map(&[]),
                map(&[("zeroFill", "true")]),
                Set::Mutable,
                "zeroFill",
            ),
            (map(&[]), map(&[("layout", "dir")]), Set::Mutable, "layout"),
            (
                map(&[("csi.storage.k8s.io", "x")]),
                map(&[]),
                Set::Parameters,
                "csi.storage.k8s.io",
            ),
        ];
        for (params, mutable_params, set, key) in cases {
            let e = volume(&params, &mutable_params).unwrap_err();
            assert_eq!(e.set, set, "{params:?} {mutable_params:?}");
            assert!(e.reason.contains(key), "{e}");
        }
    }

    #[test]
    fn directories_take_no_image_options() {
        let check = |params: &[(&str, &str)], mutable_params: &[(&str, &str)]| {
            volume(&map(params), &map(mutable_params))
                .unwrap()
                .check_layout_options()
        };
        for extra in [
            ("thick", "true"),
            ("zeroFill", "true"),
            ("mkfsOptions", "-m 0"),
            ("discard", "true"),
        ] {
            let e = check(&[("layout", "dir"), extra], &[]).unwrap_err();
            assert!(e.reason.contains("image volumes only"), "{e}");
        }
        let e = check(&[("layout", "dir")], &[("thick", "true")]).unwrap_err();
        assert!(e.reason.contains("image volumes only"), "{e}");
        // thick=false is no image option; images take both.
        check(&[("layout", "dir"), ("thick", "false")], &[]).unwrap();
        check(&[("thick", "true"), ("mkfsOptions", "-m 0")], &[]).unwrap();
    }

    #[test]
    fn zero_fill_is_for_thick_images() {
        let check = |p: &[(&str, &str)], m: &[(&str, &str)]| {
            volume(&map(p), &map(m)).and_then(|v| v.check_layout_options().map(|()| v))
        };
        let v = check(&[("thick", "true"), ("zeroFill", "true")], &[]).unwrap();
        assert!(v.thick && v.zero_fill);
        assert!(!check(&[("zeroFill", "false")], &[]).unwrap().zero_fill);
        // Thin, by the class or by a mutable override: refused.
        for (p, m) in [
            (&[("zeroFill", "true")][..], &[][..]),
            (
                &[("zeroFill", "true"), ("thick", "true")][..],
                &[("thick", "false")][..],
            ),
        ] {
            let e = check(p, m).unwrap_err();
            assert!(e.reason.contains("needs thick=true"), "{e}");
        }
        assert!(zero_fill(&map(&[("thick", "true"), ("zeroFill", "true")])));
        assert!(!zero_fill(&map(&[("thick", "true")])));
    }

    #[test]
    fn discard_is_for_thin_images() {
        let check = |p: &[(&str, &str)], m: &[(&str, &str)]| {
            volume(&map(p), &map(m)).and_then(|v| v.check_layout_options().map(|()| v))
        };
        assert!(check(&[("discard", "true")], &[]).unwrap().discard);
        assert!(!check(&[("discard", "false")], &[]).unwrap().discard);
        let e = check(&[("discard", "yes")], &[]).unwrap_err();
        assert!(e.reason.contains("discard=\"yes\""), "{e}");
        for (p, m) in [
            (&[("discard", "true"), ("thick", "true")][..], &[][..]),
            (&[("discard", "true")][..], &[("thick", "true")][..]),
        ] {
            let e = check(p, m).unwrap_err();
            assert!(e.reason.contains("preallocation"), "{e}");
        }
        assert!(online_discard(&map(&[("discard", "true")]), false));
        assert!(!online_discard(&map(&[("discard", "true")]), true));
        assert!(!online_discard(&map(&[("discard", "false")]), false));
        assert!(!online_discard(&map(&[]), false));
    }

    #[test]
    fn calls_without_parameters_take_only_the_co_s() {
        none(
            &map(&[("csi.storage.k8s.io/volumesnapshot/name", "s")]),
            "snapshots",
        )
        .unwrap();
        let e = none(&map(&[("type", "fast")]), "snapshots").unwrap_err();
        assert_eq!(e.reason, "unknown parameter \"type\"; snapshots take none");
    }
}
