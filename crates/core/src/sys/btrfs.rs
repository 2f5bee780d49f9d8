//! btrfs subvolumes and quota groups: what makes a directory volume on a
//! btrfs pool a tree with a size and with atomic snapshots.
//!
//! A subvolume is a directory with a tree of its own: a snapshot of it
//! (`BTRFS_IOC_SNAP_CREATE_V2`) is taken at one transaction, however many
//! writers run, and shares every extent with its source until one of them
//! is rewritten. Each subvolume `<id>` has a quota group `0/<id>` once
//! quotas are on; a limit on its *referenced* bytes (what the tree maps,
//! shared or not) is what a pod sees as its volume's size, and the kernel
//! answers a write past it with EDQUOT.
//!
//! Every call is an ioctl on a descriptor (no `btrfs` tool, which a
//! controller image need not carry); usage is read from sysfs
//! (`/sys/fs/btrfs/<fsid>/qgroups/0_<id>/`, Linux 5.9 and later), the same
//! figures `btrfs qgroup show` prints. Quota ioctls need CAP_SYS_ADMIN.

#![allow(unsafe_code)]

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use linux_raw_sys::btrfs::{
    btrfs_ioctl_fs_info_args, btrfs_ioctl_ino_lookup_args, btrfs_ioctl_qgroup_create_args,
    btrfs_ioctl_qgroup_limit_args, btrfs_ioctl_quota_ctl_args, btrfs_ioctl_vol_args,
    btrfs_ioctl_vol_args_v2, btrfs_qgroup_limit, BTRFS_FIRST_FREE_OBJECTID,
    BTRFS_QGROUP_LIMIT_MAX_RFER, BTRFS_QUOTA_CTL_ENABLE, BTRFS_SUBVOL_RDONLY,
};
use linux_raw_sys::general::BTRFS_SUPER_MAGIC;
use linux_raw_sys::ioctl::{
    BTRFS_IOC_FS_INFO, BTRFS_IOC_INO_LOOKUP, BTRFS_IOC_QGROUP_CREATE, BTRFS_IOC_QGROUP_LIMIT,
    BTRFS_IOC_QUOTA_CTL, BTRFS_IOC_SNAP_CREATE_V2, BTRFS_IOC_SNAP_DESTROY, BTRFS_IOC_SUBVOL_CREATE,
    BTRFS_IOC_SYNC,
};
use rustix::ioctl::{ioctl, NoArg, Opcode, Setter, Updater};

/// How long [`destroy_qgroup`] waits for the kernel to drop a deleted
/// subvolume's tree: a qgroup that still counts bytes cannot be destroyed.
/// A commit wakes the cleaner, which drops a tree in milliseconds; the
/// bound is for a tree of millions of files.
const QGROUP_DROP_WAIT: Duration = Duration::from_secs(10);

/// Whether the filesystem holding `fd` is btrfs.
pub fn is_btrfs(fd: impl AsFd) -> io::Result<bool> {
    let st = rustix::fs::fstatfs(fd)?;
    // f_type's type differs between architectures (signed on some); the
    // magic fits in 32 bits either way.
    Ok(i128::from(st.f_type) == i128::from(BTRFS_SUPER_MAGIC))
}

/// Whether the directory `dir` is the root of a btrfs subvolume (inode 256
/// of a btrfs filesystem: every subvolume's root has that number, nothing
/// else has).
pub fn is_subvolume(dir: impl AsFd) -> io::Result<bool> {
    let st = rustix::fs::fstat(&dir)?;
    Ok(st.st_ino == u64::from(BTRFS_FIRST_FREE_OBJECTID) && is_btrfs(&dir)?)
}

/// The name argument the subvolume ioctls take: NUL-terminated, in a
/// fixed-size array.
fn put_name(name: &CStr, into: &mut [linux_raw_sys::ctypes::c_char]) -> io::Result<()> {
    let bytes = name.to_bytes();
    if bytes.is_empty() || bytes.len() >= into.len() || bytes.contains(&b'/') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{name:?} is not a subvolume name"),
        ));
    }
    for (slot, b) in into.iter_mut().zip(bytes) {
        *slot = linux_raw_sys::ctypes::c_char::from_ne_bytes([*b]);
    }
    Ok(())
}

/// BTRFS_IOC_SUBVOL_CREATE: makes an empty subvolume `name` in the
/// directory `parent`.
pub fn create_subvolume(parent: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
    // SAFETY: btrfs_ioctl_vol_args is a plain C struct; all zeros is valid.
    let mut args: btrfs_ioctl_vol_args = unsafe { std::mem::zeroed() };
    put_name(name, &mut args.name)?;
    // SAFETY: BTRFS_IOC_SUBVOL_CREATE reads a `struct btrfs_ioctl_vol_args`.
    unsafe {
        ioctl(
            parent,
            Setter::<{ BTRFS_IOC_SUBVOL_CREATE as Opcode }, _>::new(args),
        )
    }?;
    Ok(())
}

/// BTRFS_IOC_SNAP_CREATE_V2: snapshots the subvolume `source` (its root
/// directory, open) as `name` in the directory `parent`, at one
/// transaction; `read_only` makes a snapshot nothing can change.
pub fn snapshot(
    source: BorrowedFd<'_>,
    parent: BorrowedFd<'_>,
    name: &CStr,
    read_only: bool,
) -> io::Result<()> {
    // SAFETY: btrfs_ioctl_vol_args_v2 is a plain C struct (with unions of
    // integers and bytes); all zeros is valid.
    let mut args: btrfs_ioctl_vol_args_v2 = unsafe { std::mem::zeroed() };
    args.fd = i64::from(rustix::fd::AsRawFd::as_raw_fd(&source));
    if read_only {
        args.flags = u64::from(BTRFS_SUBVOL_RDONLY);
    }
    // SAFETY: writing the `name` member of a zeroed union of plain data.
    put_name(name, unsafe { &mut args.__bindgen_anon_2.name })?;
    // SAFETY: BTRFS_IOC_SNAP_CREATE_V2 reads a `struct
    // btrfs_ioctl_vol_args_v2` whose `fd` is open for the call's length.
    unsafe {
        ioctl(
            parent,
            Setter::<{ BTRFS_IOC_SNAP_CREATE_V2 as Opcode }, _>::new(args),
        )
    }?;
    Ok(())
}

/// BTRFS_IOC_SNAP_DESTROY: deletes the subvolume `name` in `parent`, read-only
/// or not, with everything in it, at once (its blocks are freed later, by
/// the kernel's cleaner). Fails with ENOTEMPTY when it holds other
/// subvolumes.
pub fn destroy_subvolume(parent: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
    // SAFETY: as in `create_subvolume`.
    let mut args: btrfs_ioctl_vol_args = unsafe { std::mem::zeroed() };
    put_name(name, &mut args.name)?;
    // SAFETY: BTRFS_IOC_SNAP_DESTROY reads a `struct btrfs_ioctl_vol_args`.
    unsafe {
        ioctl(
            parent,
            Setter::<{ BTRFS_IOC_SNAP_DESTROY as Opcode }, _>::new(args),
        )
    }?;
    Ok(())
}

/// The id of the subvolume that holds `fd` (BTRFS_IOC_INO_LOOKUP of the
/// subvolume's root inode): its qgroup is `0/<id>`.
pub fn subvolume_id(fd: BorrowedFd<'_>) -> io::Result<u64> {
    // SAFETY: btrfs_ioctl_ino_lookup_args is a plain C struct.
    let mut args: btrfs_ioctl_ino_lookup_args = unsafe { std::mem::zeroed() };
    // treeid 0: the tree of the descriptor's own subvolume.
    args.objectid = u64::from(BTRFS_FIRST_FREE_OBJECTID);
    // SAFETY: BTRFS_IOC_INO_LOOKUP reads and fills the struct.
    unsafe {
        ioctl(
            fd,
            Updater::<{ BTRFS_IOC_INO_LOOKUP as Opcode }, _>::new(&mut args),
        )
    }?;
    Ok(args.treeid)
}

/// BTRFS_QUOTA_CTL_ENABLE on the filesystem holding `fd`: full qgroup
/// accounting (not simple quotas, which do not count what a snapshot
/// shares, so a clone would start at nothing). The kernel answers at once
/// when quotas are already on.
pub fn enable_quota(fd: BorrowedFd<'_>) -> io::Result<()> {
    let mut args = btrfs_ioctl_quota_ctl_args {
        cmd: u64::from(BTRFS_QUOTA_CTL_ENABLE),
        status: 0,
    };
    // SAFETY: BTRFS_IOC_QUOTA_CTL reads (and may fill) the struct.
    unsafe {
        ioctl(
            fd,
            Updater::<{ BTRFS_IOC_QUOTA_CTL as Opcode }, _>::new(&mut args),
        )
    }?;
    Ok(())
}

/// Limits the referenced bytes of subvolume `id`'s qgroup `0/<id>` to
/// `max_referenced` (BTRFS_IOC_QGROUP_LIMIT).
pub fn limit_qgroup(fd: BorrowedFd<'_>, id: u64, max_referenced: u64) -> io::Result<()> {
    let mut args = btrfs_ioctl_qgroup_limit_args {
        qgroupid: id,
        lim: btrfs_qgroup_limit {
            flags: u64::from(BTRFS_QGROUP_LIMIT_MAX_RFER),
            max_rfer: max_referenced,
            max_excl: 0,
            rsv_rfer: 0,
            rsv_excl: 0,
        },
    };
    // SAFETY: BTRFS_IOC_QGROUP_LIMIT reads the struct (the uapi declares it
    // _IOR, but the kernel only copies it in).
    unsafe {
        ioctl(
            fd,
            Updater::<{ BTRFS_IOC_QGROUP_LIMIT as Opcode }, _>::new(&mut args),
        )
    }?;
    Ok(())
}

/// BTRFS_IOC_SYNC: commits the filesystem's transaction and wakes the
/// kernel's cleaner, which drops deleted subvolumes' trees (a plain syncfs
/// commits but leaves the cleaner asleep until its next 30 s round).
pub fn sync(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: BTRFS_IOC_SYNC takes no argument.
    unsafe { ioctl(fd, NoArg::<{ BTRFS_IOC_SYNC as Opcode }>::new()) }?;
    Ok(())
}

/// Removes qgroup `0/<id>` of a subvolume already deleted. Its tree is
/// dropped by the kernel's cleaner, and until then the qgroup counts bytes
/// and cannot go (EBUSY), so this commits and wakes the cleaner ([`sync`])
/// and retries for a while. Kernels since
/// 6.7 remove the qgroup themselves once the tree is dropped: ENOENT is
/// success. Returns whether the qgroup is gone.
pub fn destroy_qgroup(fd: BorrowedFd<'_>, id: u64) -> io::Result<bool> {
    let deadline = Instant::now() + QGROUP_DROP_WAIT;
    let mut pause = Duration::from_millis(5);
    loop {
        sync(fd)?;
        let args = btrfs_ioctl_qgroup_create_args {
            create: 0,
            qgroupid: id,
        };
        // SAFETY: BTRFS_IOC_QGROUP_CREATE reads the struct; `create: 0`
        // destroys.
        match unsafe {
            ioctl(
                fd,
                Setter::<{ BTRFS_IOC_QGROUP_CREATE as Opcode }, _>::new(args),
            )
        } {
            // ENOTCONN: quotas are off, so there is no qgroup to remove.
            Ok(()) | Err(rustix::io::Errno::NOENT) | Err(rustix::io::Errno::NOTCONN) => {
                return Ok(true)
            }
            Err(rustix::io::Errno::BUSY) if Instant::now() < deadline => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(200));
            }
            Err(rustix::io::Errno::BUSY) => return Ok(false),
            Err(e) => return Err(e.into()),
        }
    }
}

/// A subvolume's qgroup figures, as `btrfs qgroup show` prints them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QgroupUsage {
    /// Bytes the subvolume's tree maps, shared with snapshots or not.
    pub referenced: u64,
    /// Bytes only this subvolume maps (what deleting it would free).
    pub exclusive: u64,
    /// The limit on `referenced`, if one is set.
    pub max_referenced: Option<u64>,
}

/// The sysfs directory of the filesystem holding `fd`:
/// `/sys/fs/btrfs/<fsid>` (BTRFS_IOC_FS_INFO gives the fsid).
fn sysfs_dir(fd: BorrowedFd<'_>) -> io::Result<PathBuf> {
    // SAFETY: btrfs_ioctl_fs_info_args is a plain C struct; zeroed `flags`
    // asks for no optional fields.
    let mut args: btrfs_ioctl_fs_info_args = unsafe { std::mem::zeroed() };
    // SAFETY: BTRFS_IOC_FS_INFO reads `flags` and fills the struct.
    unsafe {
        ioctl(
            fd,
            Updater::<{ BTRFS_IOC_FS_INFO as Opcode }, _>::new(&mut args),
        )
    }?;
    Ok(Path::new("/sys/fs/btrfs").join(format_uuid(&args.fsid)))
}

/// A UUID as sysfs and blkid spell it.
fn format_uuid(b: &[u8; 16]) -> String {
    let hex: Vec<String> = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        hex[..4].concat(),
        hex[4..6].concat(),
        hex[6..8].concat(),
        hex[8..10].concat(),
        hex[10..].concat()
    )
}

/// The qgroup figures of subvolume `id` on the filesystem holding `fd`.
/// NotFound when the qgroup does not exist (quotas off, or a kernel
/// before 5.9 without the sysfs files).
pub fn qgroup_usage(fd: BorrowedFd<'_>, id: u64) -> io::Result<QgroupUsage> {
    let dir = sysfs_dir(fd)?.join("qgroups").join(format!("0_{id}"));
    let read = |name: &str| -> io::Result<u64> {
        let path = dir.join(name);
        let text = std::fs::read_to_string(&path)?;
        text.trim().parse().map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: {text:?}: {e}", path.display()),
            )
        })
    };
    let limited = read("limit_flags")? & u64::from(BTRFS_QGROUP_LIMIT_MAX_RFER) != 0;
    Ok(QgroupUsage {
        referenced: read("referenced")?,
        exclusive: read("exclusive")?,
        max_referenced: if limited {
            Some(read("max_referenced")?)
        } else {
            None
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuids_are_spelled_as_sysfs_names_them() {
        let b: [u8; 16] = [
            0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef, 0x00, 0x11, 0x22, 0x33, 0x44, 0x55,
            0x66, 0x77,
        ];
        assert_eq!(format_uuid(&b), "01234567-89ab-cdef-0011-223344556677");
    }

    #[test]
    fn names_that_are_paths_or_too_long_are_refused() {
        let mut slot = [0 as linux_raw_sys::ctypes::c_char; 8];
        assert!(put_name(c"a/b", &mut slot).is_err());
        assert!(put_name(c"", &mut slot).is_err());
        assert!(put_name(c"12345678", &mut slot).is_err());
        put_name(c"data", &mut slot).unwrap();
        let bytes: Vec<u8> = slot[..5].iter().map(|c| c.to_ne_bytes()[0]).collect();
        assert_eq!(bytes, b"data\0");
    }

    #[test]
    fn a_tmpfs_directory_is_no_subvolume() {
        let dir = tempfile::tempdir().unwrap();
        let f = std::fs::File::open(dir.path()).unwrap();
        if !is_btrfs(&f).unwrap() {
            assert!(!is_subvolume(&f).unwrap());
        }
    }
}
