//! Mounts: filesystems, bind mounts, read-only remounts, unmounts, and the
//! O(1) "is this a mount point" question (statx STATX_ATTR_MOUNT_ROOT, no
//! walk of /proc/self/mountinfo, whose cost grows with the node's mounts).

use std::io;
use std::path::Path;

use std::os::fd::BorrowedFd;

use rustix::fs::{AtFlags, StatxFlags, CWD};

use super::untrusted::proc_path;
use rustix::mount::{MountFlags, UnmountFlags};

/// What statx says about a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MountState {
    /// Nothing at the path.
    Missing,
    /// A path that is not the root of a mount.
    NotMounted,
    /// The root of a mount.
    Mounted,
    /// The path cannot be examined because the filesystem behind it is
    /// gone (ENOTCONN, EIO, ESTALE): a dead mount that still needs
    /// unmounting.
    Broken,
}

/// Whether `path` is a mount point, without following a final symlink.
pub fn state(path: &Path) -> io::Result<MountState> {
    use rustix::io::Errno;
    match rustix::fs::statx(
        CWD,
        path,
        AtFlags::SYMLINK_NOFOLLOW,
        StatxFlags::BASIC_STATS | StatxFlags::MNT_ID,
    ) {
        Ok(st) => {
            let root = rustix::fs::StatxAttributes::MOUNT_ROOT;
            if !st.stx_attributes_mask.contains(root) {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    "the kernel does not report STATX_ATTR_MOUNT_ROOT (Linux 5.8 or later needed)",
                ));
            }
            Ok(if st.stx_attributes.contains(root) {
                MountState::Mounted
            } else {
                MountState::NotMounted
            })
        }
        Err(Errno::NOENT) => Ok(MountState::Missing),
        Err(Errno::NOTCONN | Errno::IO | Errno::STALE) => Ok(MountState::Broken),
        Err(e) => Err(e.into()),
    }
}

/// What one `statx` of a path says about the object there, enough to tell
/// which mount holds it (see `crate::node::mounts`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    /// The device of the filesystem the object lies on (`st_dev`; an
    /// anonymous device, major 0, on btrfs and other filesystems that
    /// have no block device of their own per mount).
    pub dev: u64,
    /// Its inode.
    pub ino: u64,
    /// The device number it stands for, when it is a block device node
    /// (`st_rdev`).
    pub block: Option<u64>,
}

/// The [`Identity`] of what is at `path`, without following a final
/// symlink.
pub fn identity(path: &Path) -> io::Result<Identity> {
    use rustix::fs::{makedev, FileType};
    let st = rustix::fs::statx(
        CWD,
        path,
        AtFlags::SYMLINK_NOFOLLOW,
        StatxFlags::BASIC_STATS,
    )?;
    let block = FileType::from_raw_mode(u32::from(st.stx_mode)) == FileType::BlockDevice;
    Ok(Identity {
        dev: makedev(st.stx_dev_major, st.stx_dev_minor),
        ino: st.stx_ino,
        block: block.then(|| makedev(st.stx_rdev_major, st.stx_rdev_minor)),
    })
}

/// Mounts the filesystem on `device` at `target`.
pub fn mount_fs(
    device: &Path,
    target: &Path,
    fs_type: &str,
    flags: MountFlags,
    data: &str,
) -> io::Result<()> {
    let data = std::ffi::CString::new(data)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "mount options contain NUL"))?;
    rustix::mount::mount(device, target, fs_type, flags, Some(data.as_c_str()))
        .map_err(io::Error::from)
}

/// Mounts the filesystem on `device` read-write where no path reaches it,
/// and lets it go again: the kernel opens it as for any mount (a journal
/// is replayed, orphans are cleaned up) and, when the descriptor closes,
/// shuts it down as an unmount does (everything written, the log marked
/// clean) before this returns. `flags` are the filesystem's boolean options
/// (`nouuid`).
///
/// Built on the mount API's `fsopen` and `FSCONFIG_CMD_CREATE`: the
/// superblock exists only for the descriptor, never in a mount table, so a
/// process killed half-way leaves no mount behind, and no directory is
/// needed for it.
pub fn mount_unattached(device: &Path, fs_type: &str, flags: &[&str]) -> io::Result<()> {
    use rustix::mount::{fsconfig_create, fsconfig_set_flag, fsconfig_set_string, fsopen};
    let fs = fsopen(fs_type, rustix::mount::FsOpenFlags::FSOPEN_CLOEXEC)?;
    fsconfig_set_string(&fs, "source", device)?;
    for flag in flags {
        fsconfig_set_flag(&fs, *flag)?;
    }
    fsconfig_create(&fs)?;
    // The close puts the only reference to the superblock: the kernel
    // shuts it down (in the task work run before close returns).
    drop(fs);
    Ok(())
}

/// Bind-mounts `source` (a directory or a file) onto `target`. The new
/// mount's propagation follows the mount it lands on: under a kubelet
/// directory mounted `Bidirectional`, the host and the pods see it.
pub fn bind(source: &Path, target: &Path) -> io::Result<()> {
    rustix::mount::mount_bind(source, target)?;
    Ok(())
}

/// [`mount_fs`] onto the object open at `target` (an `O_PATH` descriptor):
/// the mount lands on that object even if its name has changed since it
/// was opened (see `crate::node::paths`).
pub fn mount_fs_at(
    device: &Path,
    target: BorrowedFd<'_>,
    fs_type: &str,
    flags: MountFlags,
    data: &str,
) -> io::Result<()> {
    mount_fs(device, &proc_path(target), fs_type, flags, data)
}

/// [`bind`] from the object open at `source` onto the object open at
/// `target`.
pub fn bind_at(source: BorrowedFd<'_>, target: BorrowedFd<'_>) -> io::Result<()> {
    bind(&proc_path(source), &proc_path(target))
}

/// Whether the object open at `fd` is the root of a mount. A statx that
/// fails is an error, not "not a mount" (which would have it mounted over).
pub fn is_mount_root(fd: BorrowedFd<'_>) -> io::Result<bool> {
    let st = rustix::fs::statx(fd, c"", AtFlags::EMPTY_PATH, StatxFlags::BASIC_STATS)?;
    Ok(st
        .stx_attributes
        .contains(rustix::fs::StatxAttributes::MOUNT_ROOT))
}

/// The id of the mount the object open at `fd` lies on (statx
/// `STATX_MNT_ID`), the id mountinfo gives that mount: how a descriptor is
/// proved to be on the very mount a table line describes.
pub fn mount_id(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let st = rustix::fs::statx(fd, c"", AtFlags::EMPTY_PATH, StatxFlags::MNT_ID)?;
    if st.stx_mask & StatxFlags::MNT_ID.bits() == 0 {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "the kernel gives no mount id (statx STATX_MNT_ID needs Linux 5.8)",
        ));
    }
    Ok(st.stx_mnt_id)
}

/// [`remount_read_only`] of the mount whose root is open at `root`. A
/// descriptor that is not a mount's root is refused: the remount would
/// change the mount it lies on instead.
pub fn remount_read_only_at(root: BorrowedFd<'_>) -> io::Result<()> {
    if !is_mount_root(root)? {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not the root of a mount; refusing to remount what it lies on",
        ));
    }
    remount_read_only(&proc_path(root))
}

/// Makes the mount at `target` read-only (a bind mount must be remounted to
/// take MS_RDONLY; the first mount ignores it).
pub fn remount_read_only(target: &Path) -> io::Result<()> {
    rustix::mount::mount_remount(target, MountFlags::BIND | MountFlags::RDONLY, "")
        .map_err(io::Error::from)
}

/// Unmounts `target`, never through a final symlink. EBUSY and every other failure is reported; EINVAL
/// ("not a mount point") means there is nothing to do.
///
/// EBUSY is asked again a few times over ~50 ms first: a child process
/// forked by any thread on the node holds copies of open descriptors until
/// it execs, which can pin a mount for a moment. A mount still busy after
/// that is in real use, and the error says so.
pub fn unmount(target: &Path) -> io::Result<()> {
    let mut tries = 0;
    loop {
        match rustix::mount::unmount(target, UnmountFlags::NOFOLLOW) {
            Ok(()) | Err(rustix::io::Errno::INVAL) => return Ok(()),
            Err(rustix::io::Errno::BUSY) if tries < 5 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Detaches the mount at `target` from the tree at once and lets the kernel
/// finish the unmount when the last user lets go (MNT_DETACH), never
/// through a final symlink. Only for clean-up that must not leave a mount
/// behind whatever still holds it (the test kit's guards); the driver
/// itself reports a busy mount instead ([`unmount`]).
pub fn unmount_lazily(target: &Path) -> io::Result<()> {
    match rustix::mount::unmount(target, UnmountFlags::NOFOLLOW | UnmountFlags::DETACH) {
        Ok(()) | Err(rustix::io::Errno::INVAL) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Splits CSI mount flags (`ro`, `noatime`, `context=...`) into mount(2)
/// flags and the filesystem's data string.
pub fn parse_options<S: AsRef<str>>(options: &[S]) -> (MountFlags, String) {
    let mut flags = MountFlags::empty();
    let mut data: Vec<&str> = Vec::new();
    for opt in options
        .iter()
        .flat_map(|o| o.as_ref().split(','))
        .map(str::trim)
    {
        match opt {
            "" | "rw" | "defaults" | "async" | "auto" | "nouser" | "suid" | "dev" | "exec" => {}
            "ro" => flags |= MountFlags::RDONLY,
            "noatime" => flags |= MountFlags::NOATIME,
            "nodiratime" => flags |= MountFlags::NODIRATIME,
            "relatime" => flags |= MountFlags::RELATIME,
            "strictatime" => flags |= MountFlags::STRICTATIME,
            "nosuid" => flags |= MountFlags::NOSUID,
            "nodev" => flags |= MountFlags::NODEV,
            "noexec" => flags |= MountFlags::NOEXEC,
            "sync" => flags |= MountFlags::SYNCHRONOUS,
            "dirsync" => flags |= MountFlags::DIRSYNC,
            "lazytime" => flags |= MountFlags::LAZYTIME,
            other => data.push(other),
        }
    }
    (flags, data.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_split_into_flags_and_data() {
        let (flags, data) = parse_options(&[
            "ro,noatime",
            "context=\"system_u:object_r:container_file_t:s0\"",
            "discard",
        ]);
        assert!(flags.contains(MountFlags::RDONLY | MountFlags::NOATIME));
        assert_eq!(
            data,
            "context=\"system_u:object_r:container_file_t:s0\",discard"
        );
    }

    #[test]
    fn plain_directories_are_not_mount_points() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(state(dir.path()).unwrap(), MountState::NotMounted);
        assert_eq!(
            state(&dir.path().join("nope")).unwrap(),
            MountState::Missing
        );
        assert_eq!(state(Path::new("/")).unwrap(), MountState::Mounted);
    }
}
