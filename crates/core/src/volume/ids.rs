//! Volume, snapshot and group ids.
//!
//! An id is derived from the CreateVolume/CreateSnapshot name, so a retried
//! call finds what the first one made without any index: the readable part
//! of the name (lower-case letters, digits, dashes; at most 40 characters)
//! followed by a 64-bit FNV-1a hash of the whole name. Operators browsing the
//! pool see `pvc-0a1b...-3f9c2d...` rather than an opaque number. Ids coming
//! in from callers are checked before they are ever joined to a path.

use std::fmt::Write as _;

/// What kind of object an id names; part of the hash input, so a volume and
/// a snapshot with the same name get different ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A volume.
    Volume,
    /// A snapshot.
    Snapshot,
    /// A group snapshot.
    Group,
}

/// Longest id filevol accepts from a caller.
pub const MAX_ID_LEN: usize = 128;

/// Longest name accepted (the CSI spec recommends at most 128 bytes; the
/// bound keeps metadata small).
pub const MAX_NAME_LEN: usize = 1024;

/// The id for `name`.
pub fn derive(kind: Kind, name: &str) -> String {
    let domain: &[u8] = match kind {
        Kind::Volume => b"volume\0",
        Kind::Snapshot => b"snapshot\0",
        Kind::Group => b"group\0",
    };
    let hash = fnv1a64(domain.iter().chain(name.as_bytes()));
    let mut readable: String = name
        .chars()
        .map(|c| c.to_ascii_lowercase())
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(40)
        .collect();
    while readable.contains("--") {
        readable = readable.replace("--", "-");
    }
    let readable = readable.trim_matches('-');
    let mut id = String::with_capacity(readable.len() + 17);
    id.push_str(if readable.is_empty() { "v" } else { readable });
    let _ = write!(id, "-{hash:016x}");
    id
}

/// The 64-bit FNV-1a hash of `bytes`: stable across versions and hosts.
pub fn fnv1a64<'a>(bytes: impl Iterator<Item = &'a u8>) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Checks an id from a caller: 1 to 128 characters of `[A-Za-z0-9._-]`,
/// not starting with a dot. Such an id is one path component that cannot
/// leave its directory (`..`, `/`, NUL and absolute paths are impossible).
pub fn check(id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err("must not be empty".into());
    }
    if id.len() > MAX_ID_LEN {
        return Err(format!("longer than {MAX_ID_LEN} characters"));
    }
    if id.starts_with('.') {
        return Err("must not start with '.'".into());
    }
    if let Some(bad) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(format!(
            "contains {bad:?}; ids are letters, digits, '-', '_' and '.'"
        ));
    }
    Ok(())
}

/// Checks a CreateVolume/CreateSnapshot name: present, bounded, no NUL.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("must not be empty".into());
    }
    if name.len() > MAX_NAME_LEN {
        return Err(format!("longer than {MAX_NAME_LEN} bytes"));
    }
    if name.contains('\0') {
        return Err("contains NUL".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_ids_are_stable_readable_and_valid() {
        let id = derive(Kind::Volume, "pvc-4f1c2a9e-0000-4c2b-9d55-1234567890ab");
        assert_eq!(
            id,
            derive(Kind::Volume, "pvc-4f1c2a9e-0000-4c2b-9d55-1234567890ab")
        );
        assert!(
            id.starts_with("pvc-4f1c2a9e-0000-4c2b-9d55-1234567890"),
            "{id}"
        );
        check(&id).unwrap();
        assert_ne!(
            id,
            derive(Kind::Snapshot, "pvc-4f1c2a9e-0000-4c2b-9d55-1234567890ab")
        );
        assert_ne!(derive(Kind::Volume, "a"), derive(Kind::Volume, "A"));
    }

    #[test]
    fn hostile_names_give_safe_ids() {
        for name in [
            "../../etc/passwd",
            "/abs/path",
            "a\0b",
            "..",
            "....",
            "日本語",
            "--",
        ] {
            let id = derive(Kind::Volume, name);
            check(&id).unwrap_or_else(|e| panic!("{name:?} -> {id}: {e}"));
            assert!(!id.contains('/') && !id.starts_with('.'), "{id}");
        }
    }

    #[test]
    fn incoming_ids_that_could_escape_are_refused() {
        for bad in ["", "..", "../x", "a/b", "/abs", ".hidden", "a\0b", "a b"] {
            assert!(check(bad).is_err(), "{bad:?} accepted");
        }
        assert!(check(&"a".repeat(129)).is_err());
        check("reallyfakevolumeid").unwrap();
    }
}
