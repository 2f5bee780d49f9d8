//! The one parser of /proc/self/mountinfo. filevol answers "is this a mount
//! point" with statx; the mount table is read only where statx cannot say
//! enough: a mount's source device (btrfs reports anonymous devices), the
//! other binds of a ReadWriteOncePod volume, propagation for `doctor`, the
//! filesystem and options a pool's locks depend on (`pool::lock_reach`),
//! and the staged/published gauges.

use std::path::PathBuf;

/// One line of /proc/self/mountinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// The mount's id (statx's `stx_mnt_id` names the same mount).
    pub id: u64,
    /// The id of the mount it lies on (its own id for the root of the
    /// namespace's tree, or one outside the table: a mount below a chroot).
    pub parent: u64,
    /// `major:minor` of the filesystem.
    pub device: String,
    /// The path inside the filesystem that is mounted.
    pub root: PathBuf,
    /// Where it is mounted.
    pub mount_point: PathBuf,
    /// Per-mount options (`rw,nosuid,relatime`).
    pub options: String,
    /// Optional fields (`shared:N`, `master:N`, ...).
    pub optional: Vec<String>,
    /// Filesystem type.
    pub fs_type: String,
    /// Mount source (`/dev/loop3`, `server:/export`, ...).
    pub source: String,
    /// The filesystem's own options (`rw,vers=4.2,...,local_lock=none`);
    /// empty where the line has none.
    pub super_options: String,
}

/// Parses one line; `None` for a line that does not have mountinfo's shape.
pub fn parse_line(line: &str) -> Option<MountEntry> {
    let (head, tail) = line.split_once(" - ")?;
    let fields: Vec<&str> = head.split(' ').collect();
    if fields.len() < 6 {
        return None;
    }
    let mut tail = tail.split(' ');
    let fs_type = tail.next()?.to_owned();
    let source = unescape(tail.next()?);
    let super_options = tail.next().map(unescape).unwrap_or_default();
    // The kernel writes every field; an empty device or a mount point that
    // is not absolute means the line is not a mount-table line.
    if fields[2].is_empty() || !fields[4].starts_with('/') || fs_type.is_empty() {
        return None;
    }
    Some(MountEntry {
        id: fields[0].parse().ok()?,
        parent: fields[1].parse().ok()?,
        device: fields[2].to_owned(),
        root: PathBuf::from(unescape(fields[3])),
        mount_point: PathBuf::from(unescape(fields[4])),
        options: unescape(fields[5]),
        optional: fields[6..].iter().map(|s| (*s).to_owned()).collect(),
        fs_type,
        source,
        super_options,
    })
}

/// Parses a whole table, skipping malformed lines.
pub fn parse(text: &str) -> Vec<MountEntry> {
    text.lines().filter_map(parse_line).collect()
}

/// This process's mount table.
pub fn read() -> std::io::Result<Vec<MountEntry>> {
    Ok(parse(&std::fs::read_to_string("/proc/self/mountinfo")?))
}

/// The mount points in `table` whose root is the directory `dir` (a path
/// with no symlinks, as `canonicalize` gives): binds of it, wherever they
/// are. The mount that holds `dir` is the longest mount point above it; a
/// bind of `dir` shows that mount's device and, as its root, `dir`'s path
/// inside that filesystem.
pub fn binds_of(table: &[MountEntry], dir: &std::path::Path) -> Vec<PathBuf> {
    let Some(holder) = table
        .iter()
        .filter(|e| dir.starts_with(&e.mount_point))
        .max_by_key(|e| e.mount_point.as_os_str().len())
    else {
        return Vec::new();
    };
    let Ok(rest) = dir.strip_prefix(&holder.mount_point) else {
        return Vec::new();
    };
    let inside = holder.root.join(rest);
    table
        .iter()
        .filter(|e| e.device == holder.device && e.root == inside && e.id != holder.id)
        .map(|e| e.mount_point.clone())
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
pub fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 4 <= b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push(u8::from_str_radix(&s[i + 1..i + 4], 8).unwrap_or(b'?'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_real_line() {
        let e = parse_line(
            r"36 35 98:0 /mnt1 /var/lib/kubelet/pods/a\040b rw,noatime master:1 shared:7 - ext3 /dev/root rw,errors=continue",
        )
        .unwrap();
        assert_eq!(e.id, 36);
        assert_eq!(e.parent, 35);
        assert_eq!(e.device, "98:0");
        assert_eq!(e.root, PathBuf::from("/mnt1"));
        assert_eq!(e.mount_point, PathBuf::from("/var/lib/kubelet/pods/a b"));
        assert_eq!(e.optional, ["master:1", "shared:7"]);
        assert_eq!(e.fs_type, "ext3");
        assert_eq!(e.source, "/dev/root");
        assert_eq!(e.options, "rw,noatime");
        assert_eq!(e.super_options, "rw,errors=continue");
    }

    #[test]
    fn binds_of_a_directory_are_found_by_root_and_device() {
        let table = parse(
            "22 1 8:1 / / rw - ext4 /dev/sda1 rw
30 22 8:2 / /pool rw - xfs /dev/sdb rw
31 22 8:2 /volumes/d/data /k/stage rw - xfs /dev/sdb rw
32 22 8:2 /volumes/d/data /k/pods/p/mount rw - xfs /dev/sdb rw
33 22 8:1 /volumes/d/data /elsewhere rw - ext4 /dev/sda1 rw
34 22 8:2 /volumes/e/data /k/other rw - xfs /dev/sdb rw
",
        );
        let dir = std::path::Path::new("/pool/volumes/d/data");
        assert_eq!(
            binds_of(&table, dir),
            [PathBuf::from("/k/stage"), PathBuf::from("/k/pods/p/mount")]
        );
        assert!(binds_of(&table, std::path::Path::new("/pool/volumes/x/data")).is_empty());
    }

    #[test]
    fn malformed_lines_are_skipped() {
        assert_eq!(parse_line("garbage"), None);
        assert_eq!(parse_line("1 2 - x"), None);
        // Found by fuzzing: empty fields from doubled spaces.
        assert_eq!(parse_line("1 2  / / rw - ext4 /dev/x rw"), None);
        assert_eq!(parse_line("1 2 8:1 / relative rw - ext4 /dev/x rw"), None);
        assert_eq!(unescape(r"\0"), r"\0");
        assert_eq!(unescape(r"a\134b"), r"a\b");
        assert!(!read().unwrap().is_empty());
    }
}
