//! A recording fake of [`Kernel`] for the node's unit tests: no root, no
//! loop device, no mount.
//!
//! It keeps its own loop-device and mount tables and answers from them the
//! way the kernel would (a bind of a mount shows that mount's source; a
//! fresh mount point is a mount root; unmounting nothing is not an error),
//! lists every call it was made (for "nothing was attached twice"), and
//! fails the next call of any kind on request (for "what does a stage undo
//! when its mount fails"). Descriptors handed to it are real (the node
//! opens real directories under a temporary kubelet directory), so it reads
//! the path behind each through `/proc/self/fd`.
//!
//! Which mount holds which volume is not decided here: the fake writes its
//! mount table as the kernel writes `/proc/self/mountinfo` (mount id,
//! parent, `major:minor`, root, mount point, options, filesystem type,
//! source; names escaped) and hands it, parsed by `sys::mountinfo`, to
//! the node, whose classifiers (`node::mounts`) are the ones that run on a
//! real node. The fake's host is one filesystem, the one holding the
//! temporary directory (mount `/`): a bind of a directory shows that
//! filesystem's device and the directory's path as its root. A loop
//! device's filesystem shows `7:N`, or an anonymous `0:N` for btrfs as
//! the real one does; a bind of a device node shows devtmpfs with root
//! `/loopN`. [`Kernel::identity`] answers from the same state (the device a
//! mount shows, the node a bind stands for), so the statx fast path of
//! `node::mounts` runs too. The fake's devices hold no lock of their own:
//! it records none.
//!
//! "mkfs" writes a marker at the start of the file and "probe" reads it
//! back: the image's bytes, not the fake's memory, say whether a volume was
//! formatted, as they do for the real tools.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use parking_lot::Mutex;
use rustix::fs::makedev;
use rustix::mount::MountFlags;

use super::format::Content;
use super::kernel::{Bound, Kernel, Renewal};
use crate::sys::command::CommandError;
use crate::sys::lock::Recorded;
use crate::sys::loopdev::{self, Attached, LoopDevice};
use crate::sys::mount::{Identity, MountState};
use crate::sys::mountinfo::{self, MountEntry};
use crate::volume::meta::FsType;
use crate::volume::mkfs_options::Validated;

/// What the fake's "mkfs" writes at the start of a file.
const MARKER: &str = "FAKE-FILESYSTEM ";

/// The major number of loop devices.
const LOOP_MAJOR: u32 = 7;
/// The `major:minor` the fake's devtmpfs shows.
const DEVTMPFS: (u32, u32) = (0, 5);
/// The first mount id the fake gives (the host's filesystem is 1).
const FIRST_MOUNT_ID: u64 = 100;

/// What a fake mount holds.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Source {
    /// A filesystem of type `fs_type` on the loop device `number`.
    Filesystem { number: u32, fs_type: String },
    /// The node of the loop device `number` (a block stage or publish).
    Node(u32),
    /// A directory of the host's filesystem bound from elsewhere, with its
    /// identity when it was bound.
    Dir { path: PathBuf, dev: u64, ino: u64 },
}

impl Source {
    /// The device number a mount of this shows (`st_dev` of its root, and
    /// the table's `major:minor`): btrfs, as the real one, an anonymous
    /// device rather than its block device.
    fn dev(&self) -> u64 {
        match self {
            Source::Filesystem { number, fs_type } if fs_type == "btrfs" => {
                makedev(0, 100 + number)
            }
            Source::Filesystem { number, .. } => makedev(LOOP_MAJOR, *number),
            Source::Node(_) => makedev(DEVTMPFS.0, DEVTMPFS.1),
            Source::Dir { dev, .. } => *dev,
        }
    }

    /// What `statx` of a mount root of this says.
    fn identity(&self) -> Identity {
        match self {
            // The root directory of a filesystem.
            Source::Filesystem { .. } => Identity {
                dev: self.dev(),
                ino: 2,
                block: None,
            },
            Source::Node(number) => node_identity(*number),
            Source::Dir { dev, ino, .. } => Identity {
                dev: *dev,
                ino: *ino,
                block: None,
            },
        }
    }
}

/// What `statx` of the fake's `/dev/loopN` says.
fn node_identity(number: u32) -> Identity {
    Identity {
        dev: makedev(DEVTMPFS.0, DEVTMPFS.1),
        ino: 1000 + u64::from(number),
        block: Some(makedev(LOOP_MAJOR, number)),
    }
}

/// The number of a loop device path (`/dev/loopN`).
fn loop_number(path: &Path) -> Option<u32> {
    path.strip_prefix("/dev")
        .ok()?
        .to_str()?
        .strip_prefix("loop")?
        .parse()
        .ok()
}

/// `major:minor` of a device number, as the mount table writes it.
fn major_minor(dev: u64) -> String {
    format!("{}:{}", rustix::fs::major(dev), rustix::fs::minor(dev))
}

/// Escapes a mount-table field as the kernel does: space, tab, newline and
/// backslash as three octal digits.
fn escape(field: &str) -> String {
    let mut out = String::with_capacity(field.len());
    for c in field.chars() {
        match c {
            ' ' | '\t' | '\n' | '\\' => out.push_str(&format!("\\{:03o}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

#[derive(Debug, Clone)]
struct Mount {
    id: u64,
    target: PathBuf,
    source: Source,
    read_only: bool,
}

#[derive(Debug, Clone)]
struct Loop {
    device: LoopDevice,
    image: PathBuf,
    read_only: bool,
    detaching: bool,
    owner: Option<loopdev::Owner>,
}

#[derive(Debug, Default)]
struct State {
    calls: Vec<String>,
    fail: HashMap<&'static str, io::ErrorKind>,
    loops: Vec<Loop>,
    mounts: Vec<Mount>,
    next_loop: u32,
    next_mount: u64,
    /// Devices whose detach the fake leaves pending (held open elsewhere).
    held_open: Vec<u32>,
    /// Images whose lock a device elsewhere (another host) holds: an
    /// attach of one answers "held".
    fenced_elsewhere: Vec<PathBuf>,
}

impl State {
    /// The mount at `path` (the newest, when mounts are stacked).
    fn mount_at(&self, path: &Path) -> Option<&Mount> {
        self.mounts.iter().rev().find(|m| m.target == path)
    }

    /// Adds a mount on top at `target`.
    fn push_mount(&mut self, target: PathBuf, source: Source, read_only: bool) {
        let id = self.next_mount;
        self.next_mount += 1;
        self.mounts.push(Mount {
            id,
            target,
            source,
            read_only,
        });
    }
}

/// The fake kernel. Device nodes it hands out are files in `dev_dir`.
#[derive(Debug)]
pub struct Recording {
    dev_dir: tempfile::TempDir,
    /// The device of the host's one filesystem (see the module
    /// documentation).
    host_dev: u64,
    state: Mutex<State>,
}

fn path_of(fd: BorrowedFd<'_>) -> io::Result<PathBuf> {
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

impl Recording {
    /// An empty kernel: nothing attached, nothing mounted.
    pub fn new() -> Recording {
        let dev_dir = tempfile::tempdir().unwrap();
        let host_dev = std::fs::metadata(dev_dir.path()).unwrap().dev();
        Recording {
            dev_dir,
            host_dev,
            state: Mutex::new(State {
                next_loop: 900,
                next_mount: FIRST_MOUNT_ID,
                ..State::default()
            }),
        }
    }

    /// The next call named `op` fails with `kind`.
    pub fn fail_next(&self, op: &'static str, kind: io::ErrorKind) {
        self.state.lock().fail.insert(op, kind);
    }

    /// Attaches of `image` find its lock held by a device elsewhere.
    pub fn fence_elsewhere(&self, image: &Path) {
        self.state.lock().fenced_elsewhere.push(image.to_owned());
    }

    /// Detaches of `dev` stay pending (something holds it open).
    pub fn hold_open(&self, dev: LoopDevice) {
        self.state.lock().held_open.push(dev.number);
    }

    /// The next attach takes device number `n` (the kernel hands out the
    /// lowest free one, so a number comes back).
    pub fn reuse_number(&self, n: u32) {
        self.state.lock().next_loop = n;
    }

    /// How many calls named `op` were made.
    pub fn count(&self, op: &str) -> usize {
        self.state
            .lock()
            .calls
            .iter()
            .filter(|c| c.split(' ').next() == Some(op))
            .count()
    }

    /// Every call made, in order ("attach <image>", "mount <dev> <target>").
    pub fn calls(&self) -> Vec<String> {
        self.state.lock().calls.clone()
    }

    /// The mount points of the fake mount table.
    pub fn mounted(&self) -> Vec<PathBuf> {
        self.state
            .lock()
            .mounts
            .iter()
            .map(|m| m.target.clone())
            .collect()
    }

    /// The images with a device attached (detaching or not).
    pub fn attached_images(&self) -> Vec<PathBuf> {
        self.state
            .lock()
            .loops
            .iter()
            .map(|l| l.image.clone())
            .collect()
    }

    /// Records the call and fails it if asked to.
    fn call(&self, op: &'static str, detail: impl std::fmt::Display) -> io::Result<()> {
        let mut st = self.state.lock();
        st.calls.push(format!("{op} {detail}"));
        match st.fail.remove(op) {
            Some(kind) => Err(io::Error::new(kind, format!("injected failure of {op}"))),
            None => Ok(()),
        }
    }

    /// Records a tool's call and fails it, as the tool would, if asked to.
    fn tool(&self, op: &'static str, detail: &Path) -> Result<(), CommandError> {
        self.call(op, detail.display()).map_err(|e| CommandError {
            command: format!("{op} {}", detail.display()),
            status: "failed".into(),
            stderr: e.to_string(),
        })
    }

    /// The fake's mount table as the kernel would write it
    /// (`/proc/self/mountinfo`).
    fn mountinfo(&self) -> String {
        let st = self.state.lock();
        let mut text = format!(
            "1 1 {} / / rw,relatime shared:1 - ext4 /dev/root rw\n",
            major_minor(self.host_dev)
        );
        for (i, m) in st.mounts.iter().enumerate() {
            // It lies on the newest mount made before it at or above its
            // mount point, or on the host's filesystem.
            let parent = st.mounts[..i]
                .iter()
                .filter(|p| m.target.starts_with(&p.target))
                .max_by_key(|p| p.target.as_os_str().len())
                .map_or(1, |p| p.id);
            let (root, fs_type, source) = match &m.source {
                Source::Filesystem { number, fs_type } => (
                    "/".to_owned(),
                    fs_type.as_str(),
                    format!("/dev/loop{number}"),
                ),
                Source::Node(number) => (format!("/loop{number}"), "devtmpfs", "udev".into()),
                Source::Dir { path, .. } => {
                    // The kernel marks a bound directory that was removed.
                    let mut root = path.to_string_lossy().into_owned();
                    if std::fs::symlink_metadata(path).is_err() {
                        root.push_str("//deleted");
                    }
                    (root, "ext4", "/dev/root".into())
                }
            };
            text.push_str(&format!(
                "{} {parent} {} {} {} {},relatime shared:1 - {fs_type} {} rw\n",
                m.id,
                major_minor(m.source.dev()),
                escape(&root),
                escape(&m.target.to_string_lossy()),
                if m.read_only { "ro" } else { "rw" },
                escape(&source),
            ));
        }
        text
    }

    /// What the fake would show as the source of a bind from `path`: the
    /// mount there, a device node it handed out, or the directory itself.
    fn source_at(st: &State, dev_dir: &Path, path: &Path) -> io::Result<Source> {
        if let Some(m) = st.mount_at(path) {
            return Ok(m.source.clone());
        }
        if let Some(number) = path
            .strip_prefix(dev_dir)
            .ok()
            .and_then(|rest| loop_number(&Path::new("/dev").join(rest)))
        {
            return Ok(Source::Node(number));
        }
        let meta = std::fs::symlink_metadata(path)?;
        Ok(Source::Dir {
            path: path.to_owned(),
            dev: meta.dev(),
            ino: meta.ino(),
        })
    }
}

impl Kernel for Recording {
    fn loop_status(&self, dev: LoopDevice) -> io::Result<Option<loopdev::Status>> {
        use std::os::unix::fs::MetadataExt;
        let st = self.state.lock();
        let Some(l) = st.loops.iter().find(|l| l.device == dev) else {
            return Ok(None);
        };
        let meta = std::fs::metadata(&l.image)?;
        Ok(Some(loopdev::Status {
            backing: (meta.dev(), meta.ino()),
            detaching: l.detaching,
            owner: l.owner,
        }))
    }

    fn attached(&self) -> io::Result<Vec<(Bound, (u64, u64))>> {
        use std::os::unix::fs::MetadataExt;
        let st = self.state.lock();
        Ok(st
            .loops
            .iter()
            .filter_map(|l| {
                let meta = std::fs::metadata(&l.image).ok()?;
                let bound = Bound {
                    device: l.device,
                    detaching: l.detaching,
                    owner: l.owner,
                };
                Some((bound, (meta.dev(), meta.ino())))
            })
            .collect())
    }

    fn attach(
        &self,
        image: &Path,
        read_only: bool,
        direct_io: bool,
        node_id: &str,
    ) -> io::Result<Option<Attached>> {
        self.call("attach", image.display())?;
        let mut st = self.state.lock();
        // Each fake device holds its image's lock as a real one does
        // (`loopdev::attach`): exclusive when writable, shared when
        // read-only, until it is gone.
        let conflicts = st
            .loops
            .iter()
            .any(|l| l.image == image && !(l.read_only && read_only));
        if conflicts || st.fenced_elsewhere.iter().any(|p| p == image) {
            return Ok(None);
        }
        let device = LoopDevice {
            number: st.next_loop,
        };
        st.next_loop += 1;
        std::fs::write(
            self.dev_dir.path().join(format!("loop{}", device.number)),
            "",
        )?;
        st.loops.push(Loop {
            device,
            image: image.to_owned(),
            read_only,
            detaching: false,
            owner: Some(loopdev::Owner::of_node(node_id)),
        });
        Ok(Some(Attached { device, direct_io }))
    }

    fn detach(&self, dev: LoopDevice) -> io::Result<()> {
        self.call("detach", dev.path().display())?;
        let mut st = self.state.lock();
        if st.held_open.contains(&dev.number) {
            for l in st.loops.iter_mut().filter(|l| l.device == dev) {
                l.detaching = true;
            }
        } else {
            st.loops.retain(|l| l.device != dev);
        }
        Ok(())
    }

    fn read_only(&self, dev: LoopDevice) -> io::Result<bool> {
        let st = self.state.lock();
        Ok(st.loops.iter().any(|l| l.device == dev && l.read_only))
    }

    fn drop_cached_blocks(&self, dev: LoopDevice) -> io::Result<()> {
        self.call("drop_cached_blocks", dev.path().display())
    }

    fn refresh_capacity(&self, dev: LoopDevice) -> io::Result<()> {
        self.call("refresh_capacity", dev.path().display())
    }

    fn size(&self, dev: LoopDevice) -> io::Result<u64> {
        let st = self.state.lock();
        let l = st
            .loops
            .iter()
            .find(|l| l.device == dev)
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        Ok(std::fs::metadata(&l.image)?.len())
    }

    fn open_device(&self, dev: LoopDevice) -> io::Result<OwnedFd> {
        let node = self.dev_dir.path().join(format!("loop{}", dev.number));
        Ok(std::fs::File::open(node)?.into())
    }

    fn mount_state(&self, path: &Path) -> io::Result<MountState> {
        let st = self.state.lock();
        if st.mount_at(path).is_some() {
            Ok(MountState::Mounted)
        } else if std::fs::symlink_metadata(path).is_ok() {
            Ok(MountState::NotMounted)
        } else {
            Ok(MountState::Missing)
        }
    }

    fn mount_fs(
        &self,
        device: &Path,
        target: BorrowedFd<'_>,
        fs_type: &str,
        flags: MountFlags,
        _data: &str,
    ) -> io::Result<()> {
        let target = path_of(target)?;
        self.call(
            "mount",
            format_args!("{} {} {fs_type}", device.display(), target.display()),
        )?;
        let number = loop_number(device).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("{}: not a fake loop device", device.display()),
            )
        })?;
        let source = Source::Filesystem {
            number,
            fs_type: fs_type.to_owned(),
        };
        let read_only = flags.contains(MountFlags::RDONLY);
        self.state.lock().push_mount(target, source, read_only);
        Ok(())
    }

    /// Checks that `device` is a fake loop device and writable; leaves
    /// nothing mounted.
    fn mount_unattached(&self, device: &Path, fs_type: &str, _flags: &[&str]) -> io::Result<()> {
        self.call(
            "mount_unattached",
            format_args!("{} {fs_type}", device.display()),
        )?;
        let st = self.state.lock();
        match st.loops.iter().find(|l| l.device.path() == device) {
            Some(l) if l.read_only => Err(io::Error::from_raw_os_error(libc::EROFS)),
            Some(_) => Ok(()),
            None => Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{}: not a fake loop device", device.display()),
            )),
        }
    }

    fn bind(&self, source: BorrowedFd<'_>, target: BorrowedFd<'_>) -> io::Result<()> {
        let (source, target) = (path_of(source)?, path_of(target)?);
        self.call(
            "bind",
            format_args!("{} {}", source.display(), target.display()),
        )?;
        let mut st = self.state.lock();
        let source = Self::source_at(&st, self.dev_dir.path(), &source)?;
        st.push_mount(target, source, false);
        Ok(())
    }

    fn is_mount_of(&self, root: BorrowedFd<'_>, source: BorrowedFd<'_>) -> io::Result<bool> {
        let (root, source) = (path_of(root)?, path_of(source)?);
        let st = self.state.lock();
        let dev = self.dev_dir.path();
        Ok(st.mount_at(&root).is_some()
            && Self::source_at(&st, dev, &root)? == Self::source_at(&st, dev, &source)?)
    }

    fn remount_read_only(&self, root: BorrowedFd<'_>) -> io::Result<()> {
        let root = path_of(root)?;
        self.call("remount_read_only", root.display())?;
        let mut st = self.state.lock();
        match st.mounts.iter_mut().rev().find(|m| m.target == root) {
            Some(m) => {
                m.read_only = true;
                Ok(())
            }
            None => Err(io::Error::from(io::ErrorKind::InvalidInput)),
        }
    }

    fn mounted_read_only(&self, path: &Path) -> io::Result<bool> {
        let st = self.state.lock();
        Ok(st.mount_at(path).is_some_and(|m| m.read_only))
    }

    fn unmount(&self, path: &Path) -> io::Result<()> {
        self.call("unmount", path.display())?;
        let mut st = self.state.lock();
        if let Some(i) = st.mounts.iter().rposition(|m| m.target == path) {
            st.mounts.remove(i);
        }
        Ok(())
    }

    fn mount_table(&self) -> io::Result<Vec<MountEntry>> {
        Ok(mountinfo::parse(&self.mountinfo()))
    }

    fn lock_records(&self) -> io::Result<Vec<Recorded>> {
        // The fake's devices hold no lock of their own: a check finds none
        // and takes the images' locks for the process (`node::custody`).
        Ok(Vec::new())
    }

    fn identity(&self, path: &Path) -> io::Result<Identity> {
        if let Some(number) = loop_number(path) {
            return Ok(node_identity(number));
        }
        if let Some(m) = self.state.lock().mount_at(path) {
            return Ok(m.source.identity());
        }
        let meta = std::fs::symlink_metadata(path)?;
        let block = std::os::unix::fs::FileTypeExt::is_block_device(&meta.file_type());
        Ok(Identity {
            dev: meta.dev(),
            ino: meta.ino(),
            block: block.then(|| meta.rdev()),
        })
    }

    // Trims act on real filesystems only: the unit tests never trim, and
    // the calls below fail; the root tests trim for real.
    fn mount_id(&self, _fd: BorrowedFd<'_>) -> io::Result<u64> {
        Err(io::ErrorKind::Unsupported.into())
    }

    fn fd_read_only(&self, _fd: BorrowedFd<'_>) -> io::Result<bool> {
        Err(io::ErrorKind::Unsupported.into())
    }

    fn trim(&self, _fd: BorrowedFd<'_>) -> io::Result<u64> {
        Err(io::ErrorKind::Unsupported.into())
    }

    fn in_flight(&self, _dev: LoopDevice) -> io::Result<u64> {
        Ok(0)
    }

    fn probe(&self, device: &Path, _image: &Path, _expected: FsType) -> io::Result<Content> {
        self.call("probe", device.display())?;
        let image = {
            let st = self.state.lock();
            st.loops
                .iter()
                .find(|l| l.device.path() == device)
                .map(|l| l.image.clone())
        };
        let Some(image) = image else {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                "no such fake loop device",
            ));
        };
        let bytes = std::fs::read(&image).unwrap_or_default();
        let head = String::from_utf8_lossy(&bytes[..bytes.len().min(64)]).into_owned();
        Ok(match head.strip_prefix(MARKER) {
            Some(rest) => Content::Filesystem(rest.split('\n').next().unwrap_or("").to_owned()),
            None if bytes.iter().all(|&b| b == 0) => Content::Blank,
            None => Content::Other("data".into()),
        })
    }

    fn blank_image(
        &self,
        image: &Path,
        _reports_holes: bool,
        written: Option<bool>,
    ) -> io::Result<bool> {
        let bytes = std::fs::read(image).unwrap_or_default();
        Ok(written != Some(true) && bytes.iter().all(|&b| b == 0))
    }

    fn mkfs(
        &self,
        file: &Path,
        options: &Validated<'_>,
        _overwrite: bool,
    ) -> Result<(), CommandError> {
        self.tool("mkfs", file)?;
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().write(true).open(file).unwrap();
        writeln!(f, "{MARKER}{}", options.fs().as_str()).unwrap();
        Ok(())
    }

    /// Checks the marker "mkfs" wrote and the length, and writes a new
    /// "UUID" on the marker's second line (a counter: each copy its own).
    fn renew_uuid(&self, copy: &File, fs: FsType, len: u64) -> io::Result<Renewal> {
        use std::os::unix::fs::FileExt;
        self.call("renew_uuid", fs.as_str())?;
        let first = format!("{MARKER}{}\n", fs.as_str());
        let mut head = vec![0u8; first.len()];
        copy.read_exact_at(&mut head, 0)?;
        if head != first.as_bytes() || copy.metadata()?.len() != len {
            return Ok(Renewal::NotTemplate(
                "no fake filesystem of that size".into(),
            ));
        }
        let uuid = self.state.lock().calls.len();
        copy.write_all_at(format!("uuid {uuid:08}\n").as_bytes(), head.len() as u64)?;
        Ok(Renewal::Renewed)
    }

    fn grow(&self, _fs: FsType, device: &Path, _mount_point: &Path) -> Result<(), CommandError> {
        self.tool("grow", device)
    }

    fn btrfs_device_size(&self, mount_point: &Path) -> Result<u64, CommandError> {
        self.tool("btrfs_device_size", mount_point)?;
        Ok(0)
    }
}
