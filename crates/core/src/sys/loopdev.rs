//! Loop devices: attach an image in one step, find the device that backs an
//! image, grow it, detach it.
//!
//! Attaching uses LOOP_CTL_GET_FREE and then LOOP_CONFIGURE, which sets the
//! backing file, the flags (read-only, direct I/O) and the block size in one
//! ioctl, so no other process can see a half-configured device (the two-step
//! LOOP_SET_FD + LOOP_SET_STATUS64 has that window). Finding a device asks
//! the kernel (LOOP_GET_STATUS64: the backing file's device and inode), so it
//! works after a restart and whatever path the pool is reached by.

#![allow(unsafe_code)]

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use linux_raw_sys::ioctl::BLKFLSBUF;
use linux_raw_sys::loop_device::{
    loop_config, loop_info64, LOOP_CLR_FD, LOOP_CONFIGURE, LOOP_CTL_GET_FREE, LOOP_GET_STATUS64,
    LOOP_SET_CAPACITY, LO_FLAGS_AUTOCLEAR, LO_FLAGS_DIRECT_IO, LO_FLAGS_READ_ONLY,
};
use rustix::ioctl::{ioctl, Getter, Ioctl, IoctlOutput, NoArg, Opcode, Setter};

use crate::sys::lock::LockKind;

/// Logical block size of every loop device the driver attaches. Fixed, so a
/// filesystem made on one attach always mounts on the next (a filesystem
/// with 4 KiB sectors cannot mount on a 512-byte device), and aligned for
/// direct I/O on any pool filesystem.
pub const BLOCK_SIZE: u32 = 4096;

/// How many times to retry when another process takes the free device
/// between LOOP_CTL_GET_FREE and LOOP_CONFIGURE.
const ATTACH_TRIES: usize = 16;

/// Held from LOOP_CTL_GET_FREE to LOOP_CONFIGURE (see [`attach`]).
static ATTACHING: parking_lot::Mutex<()> = parking_lot::Mutex::new(());

/// An attached loop device, `/dev/loop<number>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoopDevice {
    /// The device's minor number.
    pub number: u32,
}

/// How a device was attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attached {
    /// The device.
    pub device: LoopDevice,
    /// Whether the pool filesystem took direct I/O (no double caching).
    pub direct_io: bool,
}

/// LOOP_CTL_GET_FREE: no argument, the free device's number as the result.
struct GetFree;

// SAFETY: LOOP_CTL_GET_FREE takes no argument and returns the number of a
// free loop device (or -1 and an errno, which rustix turns into an error).
unsafe impl Ioctl for GetFree {
    type Output = u32;
    const IS_MUTATING: bool = false;

    fn opcode(&self) -> Opcode {
        LOOP_CTL_GET_FREE as Opcode
    }

    fn as_ptr(&mut self) -> *mut std::ffi::c_void {
        std::ptr::null_mut()
    }

    unsafe fn output_from_ptr(
        out: IoctlOutput,
        _: *mut std::ffi::c_void,
    ) -> rustix::io::Result<u32> {
        // The kernel returns a device number, never negative on success.
        u32::try_from(out).map_err(|_| rustix::io::Errno::RANGE)
    }
}

impl LoopDevice {
    /// `/dev/loopN`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/dev/loop{}", self.number))
    }

    fn sys_block_attr(&self, attr: &str) -> PathBuf {
        PathBuf::from(format!("/sys/block/loop{}/{attr}", self.number))
    }

    fn open(&self) -> io::Result<File> {
        OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(self.path())
    }

    /// Size in bytes, as the kernel sees it now.
    pub fn size(&self) -> io::Result<u64> {
        parse_sectors(&std::fs::read_to_string(self.sys_block_attr("size"))?)
    }

    /// Whether a detach is pending (LOOP_CLR_FD on a device still open sets
    /// autoclear: it detaches when the last opener closes it). filevol
    /// never attaches with autoclear, so such a device is one it let go of.
    pub fn detaching(&self) -> bool {
        std::fs::read_to_string(self.sys_block_attr("loop/autoclear"))
            .is_ok_and(|s| s.trim() == "1")
    }

    /// Requests the device has taken and not yet completed (sysfs
    /// `inflight`: reads and writes; discards count as writes).
    pub fn in_flight(&self) -> io::Result<u64> {
        let text = std::fs::read_to_string(self.sys_block_attr("inflight"))?;
        text.split_whitespace()
            .map(|n| {
                n.parse::<u64>().map_err(|e| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("inflight {text:?}: {e}"),
                    )
                })
            })
            .sum()
    }

    /// Whether the device is read-only.
    pub fn read_only(&self) -> io::Result<bool> {
        Ok(std::fs::read_to_string(self.sys_block_attr("ro"))?.trim() == "1")
    }

    /// Drops whatever the kernel has cached of the device's blocks
    /// (BLKFLSBUF). A loop device number is reused for other images; if
    /// anything held the device open across a detach and a new attach,
    /// pages of the previous image could still be cached, and a probe or a
    /// mount must never read those.
    pub fn drop_cached_blocks(&self) -> io::Result<()> {
        let dev = self.open()?;
        // SAFETY: BLKFLSBUF takes no argument.
        unsafe { ioctl(&dev, NoArg::<{ BLKFLSBUF as Opcode }>::new()) }.map_err(io::Error::from)
    }

    /// Re-reads the backing file's size (after the image grew).
    pub fn refresh_capacity(&self) -> io::Result<()> {
        let dev = self.open()?;
        // SAFETY: LOOP_SET_CAPACITY takes no argument.
        unsafe { ioctl(&dev, NoArg::<{ LOOP_SET_CAPACITY as Opcode }>::new()) }
            .map_err(io::Error::from)
    }

    /// Detaches the backing file. The kernel defers the detach until the
    /// last opener closes the device, so a device still in use is not torn
    /// away from its user.
    pub fn detach(&self) -> io::Result<()> {
        let dev = self.open()?;
        // SAFETY: LOOP_CLR_FD takes no argument.
        match unsafe { ioctl(&dev, NoArg::<{ LOOP_CLR_FD as Opcode }>::new()) } {
            // ENXIO: already detached.
            Ok(()) | Err(rustix::io::Errno::NXIO) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// What the device is bound to, from one LOOP_GET_STATUS64: `None` if
    /// it is unbound (or its node is gone).
    pub fn status(&self) -> io::Result<Option<Status>> {
        let dev = match self.open() {
            Ok(dev) => dev,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        // SAFETY: LOOP_GET_STATUS64 fills a `struct loop_info64`.
        match unsafe {
            ioctl(
                &dev,
                Getter::<{ LOOP_GET_STATUS64 as Opcode }, loop_info64>::new(),
            )
        } {
            Ok(info) => Ok(Some(Status {
                backing: (info.lo_device, info.lo_inode),
                // The flag sysfs `loop/autoclear` shows (see `detaching`).
                detaching: info.lo_flags & LO_FLAGS_AUTOCLEAR as u32 != 0,
                owner: Owner::from_name(&info.lo_file_name),
            })),
            Err(rustix::io::Errno::NXIO) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }
}

/// A bound device's backing file and detach state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status {
    /// (st_dev, st_ino) of the backing file.
    pub backing: (u64, u64),
    /// A detach is pending (see [`LoopDevice::detaching`]).
    pub detaching: bool,
    /// The node whose plugin attached it, from the device's name; `None`
    /// for a device not named by [`attach`] (an older filevol's, or
    /// someone else's).
    pub owner: Option<Owner>,
}

/// The node a loop device was attached for, kept in the device's name
/// (`lo_file_name`, set by LOOP_CONFIGURE): a property of the kernel
/// object, so it outlives the plugin that attached it, and it is the one
/// thing two node plugins on one kernel (kind-style clusters, or a node
/// plugin beside a second kubelet on the same host) both see. A plugin
/// judges "mounted" from its own mount namespace, where another node's
/// mounts do not show: without the name it would take another node's
/// device in use for one a dead stage left, and detach or adopt it.
///
/// The name is `filevol@<16 hex digits> <node id>`: the digits are a
/// 64-bit FNV-1a hash of the whole node id (which compares exactly,
/// whatever its length), the node id is there for people (`losetup` does
/// not show it, `LOOP_GET_STATUS64` does) and is cut to fit 63 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner(u64);

const OWNER_PREFIX: &[u8] = b"filevol@";

impl Owner {
    /// The owner that stands for node `node_id`.
    pub fn of_node(node_id: &str) -> Owner {
        // FNV-1a, 64 bits: stable across builds and releases, unlike
        // std's hasher, because the name outlives the process.
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for byte in node_id.bytes() {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
        Owner(hash)
    }

    /// Whether a device named for `named` is this owner's: named for it,
    /// or unnamed (attached by a filevol from before devices were named,
    /// which served one node per kernel).
    pub fn claims(self, named: Option<Owner>) -> bool {
        named.is_none_or(|owner| owner == self)
    }

    /// The device name for this owner, with `node_id` (its node) for
    /// people; [`configuration`] cuts it to fit.
    fn name_with(self, node_id: &str) -> Vec<u8> {
        let mut name = OWNER_PREFIX.to_vec();
        name.extend_from_slice(format!("{:016x} {node_id}", self.0).as_bytes());
        name
    }

    /// The owner a device name records, if it is one [`attach`] wrote.
    fn from_name(name: &[u8]) -> Option<Owner> {
        let digits = name.strip_prefix(OWNER_PREFIX)?.get(..16)?;
        let digits = std::str::from_utf8(digits).ok()?;
        u64::from_str_radix(digits, 16).ok().map(Owner)
    }
}

/// A sysfs `size` attribute (512-byte sectors, whatever the device's block
/// size) in bytes.
pub fn parse_sectors(text: &str) -> io::Result<u64> {
    let sectors: u64 = text.trim().parse().map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("sysfs size {text:?}: {e}"),
        )
    })?;
    sectors.checked_mul(512).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("sysfs size {text:?} overflows"),
        )
    })
}

/// The number of a free loop device (the kernel creates one if needed).
pub fn free_device() -> io::Result<u32> {
    let control = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/loop-control")?;
    // SAFETY: see `GetFree`.
    Ok(unsafe { ioctl(&control, GetFree) }?)
}

/// Attaches `image` to a free loop device in one step, fenced: the image
/// is locked (an OFD lock, see [`crate::sys::lock`]) on the very open file
/// description the device is configured with, exclusively for a writable
/// device and shared for a read-only one. `Ok(None)` when the lock is
/// held elsewhere (another device of the image, on this host or another
/// sharing the pool, or a DeleteVolume or copy in progress): nothing is
/// attached then. Direct I/O is asked for when `direct_io`, and dropped if
/// the pool filesystem refuses it. The device is named for node `node_id`
/// (see [`Owner`]).
///
/// Why the fence lives exactly as long as the device, whatever happens to
/// the process that attached it:
/// - LOOP_CONFIGURE takes its own reference to the `struct file` behind
///   the descriptor it is given (`fget`) and keeps it as the device's
///   backing file until the device is cleared, that is until LOOP_CLR_FD,
///   or for a device still open at that moment, until its last close.
/// - An OFD lock belongs to that `struct file`, not to a process or a
///   descriptor: closing a descriptor (or the process dying, SIGKILL or
///   OOM kill alike) removes only classic POSIX locks, and OFD locks go
///   when the last reference to the file is dropped.
/// - So after this returns, the lock is held by the device alone: the
///   descriptor here is closed, a restarted or upgraded plugin does not
///   need to hold anything, and the lock goes with the device's last use
///   of the image, never before. On NFS the lock is the client's state on
///   the server, kept by the kernel's lease renewal, not by any process.
pub fn attach(
    image: &Path,
    read_only: bool,
    direct_io: bool,
    node_id: &str,
) -> io::Result<Option<Attached>> {
    let file = open_backing(image, read_only)?;
    let kind = if read_only {
        LockKind::Shared
    } else {
        LockKind::Exclusive
    };
    // Patiently: a device detached a moment ago lets go of its lock only
    // when the kernel drops its last reference to the file, which can run
    // deferred (a close by udev's probe, a delayed fput).
    if !crate::sys::lock::try_lock_patiently(&file, kind)? {
        return Ok(None);
    }
    let name = Owner::of_node(node_id).name_with(node_id);
    configure(&file, &name, read_only, direct_io, BLOCK_SIZE).map(Some)
}

/// Attaches `image` with logical block size `block_size` and no fence.
/// Volumes are attached by [`attach`]; this is for an image whose
/// filesystem was made on the plain file, as `mount -o loop` takes it:
/// mkfs on a file picks 512-byte sectors (xfs) or 1 KiB blocks (ext4 under
/// 512 MiB), which a 4 KiB device cannot mount, so such an image needs 512
/// (the test kit's scratch pools).
pub fn attach_with_block_size(
    image: &Path,
    read_only: bool,
    direct_io: bool,
    block_size: u32,
) -> io::Result<Attached> {
    let file = open_backing(image, read_only)?;
    configure(
        &file,
        image.as_os_str().as_encoded_bytes(),
        read_only,
        direct_io,
        block_size,
    )
}

fn open_backing(image: &Path, read_only: bool) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(!read_only)
        .custom_flags(libc::O_CLOEXEC)
        .open(image)
}

/// Configures a free device with `file` as its backing file and `name` as
/// its name.
fn configure(
    file: &File,
    name: &[u8],
    read_only: bool,
    direct_io: bool,
    block_size: u32,
) -> io::Result<Attached> {
    let control = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/loop-control")?;
    let mut dio = direct_io;
    let mut tries = 0;
    // One attach at a time in this process. LOOP_CTL_GET_FREE hands every
    // caller the same free number until one of them configures it, so
    // concurrent stages here raced for it: each loser took the next
    // number, and under 16 workers one stage could lose ATTACH_TRIES times
    // in a row and fail with EBUSY (a rare FAILED_PRECONDITION from
    // NodeStageVolume at concurrency 32). Within the process the lock ends
    // the race; the retries remain for other processes on the host.
    let _one_at_a_time = ATTACHING.lock();
    loop {
        tries += 1;
        // SAFETY: see `GetFree`.
        let number = unsafe { ioctl(&control, GetFree) }?;
        let device = LoopDevice { number };
        let dev = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(device.path())?;
        let config = configuration(file, name, read_only, dio, block_size);
        // SAFETY: LOOP_CONFIGURE reads a `struct loop_config` whose `fd` is
        // an open descriptor of the backing file, alive for the call.
        let result = unsafe {
            ioctl(
                &dev,
                Setter::<{ LOOP_CONFIGURE as Opcode }, loop_config>::new(config),
            )
        };
        match result {
            Ok(()) => {
                return Ok(Attached {
                    device,
                    direct_io: dio,
                })
            }
            // Another process configured this device first: take the next.
            Err(rustix::io::Errno::BUSY) if tries < ATTACH_TRIES => continue,
            // The pool filesystem cannot do direct I/O with this block size.
            Err(rustix::io::Errno::INVAL) if dio => dio = false,
            Err(e) => return Err(e.into()),
        }
    }
}

fn configuration(
    file: &File,
    name: &[u8],
    read_only: bool,
    direct_io: bool,
    block_size: u32,
) -> loop_config {
    // SAFETY: loop_info64 and loop_config are plain C structs for which all
    // zero bytes is the valid "nothing set" value.
    let mut info: loop_info64 = unsafe { std::mem::zeroed() };
    let mut flags = 0;
    if read_only {
        flags |= LO_FLAGS_READ_ONLY as u32;
    }
    if direct_io {
        flags |= LO_FLAGS_DIRECT_IO as u32;
    }
    info.lo_flags = flags;
    // At most LO_NAME_SIZE - 1 bytes: the kernel keeps a NUL at the end.
    let n = name.len().min(info.lo_file_name.len() - 1);
    info.lo_file_name[..n].copy_from_slice(&name[..n]);
    // SAFETY: as above.
    let mut config: loop_config = unsafe { std::mem::zeroed() };
    // An open descriptor is never negative.
    config.fd = file.as_raw_fd().unsigned_abs();
    config.block_size = block_size;
    config.info = info;
    config
}

/// Every loop device with a backing file, with what it is bound to.
pub fn attached() -> io::Result<Vec<(LoopDevice, Status)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/sys/block")? {
        let name = entry?.file_name();
        let Some(number) = name
            .to_str()
            .and_then(|n| n.strip_prefix("loop"))
            .and_then(|n| n.parse().ok())
        else {
            continue;
        };
        let device = LoopDevice { number };
        // Only bound devices have loop/backing_file; a device whose
        // attribute cannot be looked at is not taken for an unbound one.
        if !super::fs::exists(&device.sys_block_attr("loop/backing_file"))? {
            continue;
        }
        match device.status() {
            Ok(Some(status)) => out.push((device, status)),
            Ok(None) => {}
            // Detached between the sysfs check and the open or the ioctl
            // (ENXIO), or no device node (ENOENT): not attached.
            Err(e)
                if [rustix::io::Errno::NOENT, rustix::io::Errno::NXIO]
                    .iter()
                    .any(|errno| e.raw_os_error() == Some(errno.raw_os_error())) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// The loop device backed by `image`, including one whose detach is pending
/// because something still holds it open: the kernel still reads and
/// writes the image through it until the last close, so the image is in use
/// until this returns `None`.
pub fn find_bound(image: &Path) -> io::Result<Option<LoopDevice>> {
    let mut devices = bound_to(image)?;
    // A usable one first: that is the one a stage works with.
    devices.sort_by_key(|d| d.detaching());
    Ok(devices.into_iter().next())
}

fn bound_to(image: &Path) -> io::Result<Vec<LoopDevice>> {
    let meta = match std::fs::metadata(image) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    // The kernel reports lo_device with new_encode_dev(), which is the
    // layout of st_dev for every major below 4096 and minor below 2^20.
    let key = (meta.dev(), meta.ino());
    Ok(attached()?
        .into_iter()
        .filter(|(_, status)| status.backing == key)
        .map(|(d, _)| d)
        .collect())
}
