//! Throwaway filesystems for pools: a loop-mounted image of xfs (reflink),
//! ext4 (no reflink) or btrfs, tiny ones that fill up, and a bindfs view of
//! one standing in for a network share. Each is unmounted, its loop device
//! detached and its image removed when dropped, even when the test fails.
//!
//! They need root: a test that makes one carries `#[ignore = "needs
//! root"]` (see [`super::needs`]), and making one without root fails the
//! test with that reason. The filesystem is made on the image file, as an
//! operator's `mkfs` and `mount -o loop` would, so the device is attached
//! with 512-byte sectors (see [`filevol_core::sys::loopdev::attach_with_block_size`]).

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use super::tempdir::TempDir;
use filevol_core::sys::{loopdev, mount};

/// A mounted scratch filesystem on a loop device.
#[derive(Debug)]
pub struct LoopFs {
    mnt: PathBuf,
    device: loopdev::LoopDevice,
    /// The image and the mount point; removed after the unmount.
    _dir: TempDir,
}

impl LoopFs {
    /// Makes a `size_mib` filesystem of type `fs` ("xfs", "ext4", "btrfs")
    /// and mounts it. Fails the test without root.
    pub fn new(fs: &str, size_mib: u64) -> LoopFs {
        super::needs::root();
        let dir = TempDir::new().expect("make a temporary directory");
        let device = make_at(dir.path(), fs, size_mib << 20).unwrap_or_else(|e| panic!("{e}"));
        LoopFs {
            mnt: dir.path().join("mnt"),
            device,
            _dir: dir,
        }
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        &self.mnt
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        unmount_patiently(&self.mnt);
        // After a lazy unmount the device is still in use; the kernel then
        // detaches it when the filesystem lets go of it.
        let _ = self.device.detach();
    }
}

/// Makes a filesystem of type `fs` ("xfs" with reflink, "ext4", "btrfs") in
/// a sparse `dir/fs.img` of `bytes`, attaches it with 512-byte sectors and
/// mounts it at `dir/mnt`: what [`LoopFs`] and the `scratch-pool` tool of
/// the shell benchmarks both do. On an error nothing stays attached.
pub fn make_at(dir: &Path, fs: &str, bytes: u64) -> Result<loopdev::LoopDevice, String> {
    let image = dir.join("fs.img");
    let mnt = dir.join("mnt");
    std::fs::create_dir_all(&mnt).map_err(|e| format!("make {}: {e}", mnt.display()))?;
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(bytes))
        .map_err(|e| format!("make {}: {e}", image.display()))?;
    let mut mkfs = match fs {
        "xfs" => {
            let mut c = Command::new("mkfs.xfs");
            c.args(["-q", "-m", "reflink=1"]);
            c
        }
        "ext4" => {
            let mut c = Command::new("mkfs.ext4");
            c.args(["-q", "-F"]);
            c
        }
        other => {
            let mut c = Command::new(format!("mkfs.{other}"));
            c.arg("-q");
            c
        }
    };
    let status = mkfs
        .arg(&image)
        .status()
        .map_err(|e| format!("run mkfs.{fs}: {e}"))?;
    if !status.success() {
        return Err(format!("mkfs.{fs} failed ({status})"));
    }
    let device = loopdev::attach_with_block_size(&image, false, false, 512)
        .map_err(|e| format!("attach {} to a loop device: {e}", image.display()))?
        .device;
    let mounted = mount::mount_fs(
        &device.path(),
        &mnt,
        fs,
        rustix::mount::MountFlags::empty(),
        "",
    );
    if let Err(e) = mounted {
        // Best effort: the mount's failure is the one to report.
        let _ = device.detach();
        return Err(format!("mount {fs} from {}: {e}", device.path().display()));
    }
    Ok(device)
}

/// Removes `work` and everything a benchmark left under it: the loop
/// devices backed by files there (a driver's block volumes keep the scratch
/// filesystem busy, so they go first, while their paths still read as under
/// `work`), every mount under it, deepest first, then the scratch
/// filesystem's own device, then the files. Best effort throughout; what
/// could not be undone is returned.
pub fn remove_tree(work: &Path) -> Result<(), String> {
    let mut problems = Vec::new();
    super::leaks::detach_loops_under(work);
    let unmounted =
        super::leaks::unmount_under(work).map_err(|e| format!("read the mount table: {e}"))?;
    for (p, done) in unmounted {
        if let Err(e) = done {
            problems.push(format!("unmount {}: {e}", p.display()));
        }
    }
    // The scratch filesystem's own device, free now that nothing is
    // mounted from it (a lazy unmount lets the kernel detach it later).
    super::leaks::detach_loops_under(work);
    match std::fs::remove_dir_all(work) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => problems.push(format!("remove {}: {e}", work.display())),
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

/// A pool directory on a fresh loop-mounted filesystem of type `fs` and
/// `mib` MiB.
pub fn pool_on(fs: &str, mib: u64) -> (LoopFs, PathBuf) {
    let lfs = LoopFs::new(fs, mib);
    let pool = lfs.path().join("pool");
    std::fs::create_dir(&pool).expect("make the pool directory");
    (lfs, pool)
}

/// A bindfs (FUSE) view of a directory, unmounted when dropped: a pool seen
/// through it behaves like one on a network share before NFS 4.2 (sparse
/// files read as all data, no reflink). Its locks stay in this kernel, per
/// view: two opens through one view conflict, opens through two views of
/// one directory do not (see `pool::lock_reach`).
#[derive(Debug)]
pub struct Bindfs {
    mnt: PathBuf,
    /// The view's daemon, when the test may kill it ([`Bindfs::killable`]).
    daemon: Option<Child>,
    source: PathBuf,
    _dir: TempDir,
}

impl Bindfs {
    /// Mounts a bindfs view of `source`.
    pub fn new(source: &Path) -> Bindfs {
        let dir = TempDir::new().expect("make a temporary directory");
        let mnt = dir.path().join("share");
        std::fs::create_dir(&mnt).expect("make the mount point");
        // Lock forwarding off by name: bindfs's manual says a later release
        // may turn it on by default, and with it the daemon would take the
        // locks as one process, so that opens through one view no longer
        // conflicted. The subtype names the mount `fuse.bindfs`, as an
        // fstab mount of that type is named (run by hand it is `fuse`).
        let ok = Command::new("bindfs")
            .args(["--disable-lock-forwarding", "-o", "subtype=bindfs"])
            .arg(source)
            .arg(&mnt)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "bindfs is needed (scripts/install-deps.sh installs it)");
        Bindfs {
            mnt,
            daemon: None,
            source: source.to_owned(),
            _dir: dir,
        }
    }

    /// A bindfs view of `source` whose daemon this process runs, so that
    /// [`Bindfs::kill_daemon`] can stand for a network share whose server
    /// went away.
    pub fn killable(source: &Path) -> Bindfs {
        let dir = TempDir::new().expect("make a temporary directory");
        let mnt = dir.path().join("share");
        std::fs::create_dir(&mnt).expect("make the mount point");
        let mut view = Bindfs {
            mnt,
            daemon: None,
            source: source.to_owned(),
            _dir: dir,
        };
        view.start_daemon();
        view
    }

    /// Runs bindfs in the foreground on the mount point and waits for the
    /// view to be mounted.
    fn start_daemon(&mut self) {
        let daemon = Command::new("bindfs")
            .arg("-f")
            .arg(&self.source)
            .arg(&self.mnt)
            .spawn()
            .expect("bindfs is needed (scripts/install-deps.sh installs it)");
        self.daemon = Some(daemon);
        for _ in 0..100 {
            if mount::state(&self.mnt).is_ok_and(|s| s == mount::MountState::Mounted) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("bindfs did not mount {}", self.mnt.display());
    }

    /// Kills the view's daemon: the mount stays, and every call on a path
    /// under it fails with ENOTCONN until [`Bindfs::restart`].
    pub fn kill_daemon(&mut self) {
        let mut daemon = self.daemon.take().expect("a killable view, running");
        daemon.kill().expect("kill bindfs");
        daemon.wait().expect("reap bindfs");
    }

    /// The pid of the view's daemon ([`Bindfs::killable`] only).
    pub fn daemon_pid(&self) -> u32 {
        self.daemon.as_ref().expect("a killable view, running").id()
    }

    /// Stops the view's daemon (SIGSTOP): the mount stays and every call
    /// that reaches it sleeps until [`Bindfs::resume_daemon`], as on a
    /// share whose server stopped answering.
    pub fn pause_daemon(&self) {
        self.signal_daemon(rustix::process::Signal::STOP);
    }

    /// Lets a paused daemon go on (SIGCONT): the calls waiting on it
    /// finish.
    pub fn resume_daemon(&self) {
        self.signal_daemon(rustix::process::Signal::CONT);
    }

    fn signal_daemon(&self, signal: rustix::process::Signal) {
        let daemon = self.daemon.as_ref().expect("a killable view, running");
        let pid = i32::try_from(daemon.id())
            .ok()
            .and_then(rustix::process::Pid::from_raw)
            .expect("a daemon's pid is positive");
        rustix::process::kill_process(pid, signal).expect("signal bindfs");
    }

    /// Unmounts the dead view and mounts a new one at the same path: what
    /// reconnecting a share does.
    pub fn restart(&mut self) {
        assert!(self.daemon.is_none(), "the daemon still runs");
        unmount_patiently(&self.mnt);
        self.start_daemon();
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        &self.mnt
    }
}

impl Drop for Bindfs {
    fn drop(&mut self) {
        // A paused daemon would keep the unmount waiting.
        if let Some(daemon) = &self.daemon {
            if let Some(pid) = i32::try_from(daemon.id())
                .ok()
                .and_then(rustix::process::Pid::from_raw)
            {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::CONT);
            }
        }
        unmount_patiently(&self.mnt);
        // A foreground bindfs exits once unmounted; one that did not is
        // killed, never left behind.
        if let Some(mut daemon) = self.daemon.take() {
            for _ in 0..50 {
                if daemon.try_wait().is_ok_and(|s| s.is_some()) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = daemon.kill();
            let _ = daemon.wait();
        }
    }
}

/// Unmounts `mnt`. A process of the test may still hold a file open for a
/// moment after being killed; retry for about 5 s before falling back to a
/// lazy unmount, so that no mount outlives the test.
pub fn unmount_patiently(mnt: &Path) {
    for _ in 0..50 {
        if mount::unmount(mnt).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // Best effort: nothing is left to try.
    let _ = mount::unmount_lazily(mnt);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Dropped, a scratch filesystem leaves nothing: no mount, no loop
    /// device, no image.
    #[test]
    #[ignore = "needs root"]
    fn a_scratch_filesystem_goes_whole() {
        let fs = LoopFs::new("ext4", 64);
        let mnt = fs.path().to_owned();
        let image = mnt.with_file_name("fs.img");
        assert_eq!(mount::state(&mnt).unwrap(), mount::MountState::Mounted);
        assert_eq!(loopdev::find_bound(&image).unwrap(), Some(fs.device));
        std::fs::write(mnt.join("f"), b"scratch").unwrap();
        let device = fs.device;
        drop(fs);
        assert_eq!(mount::state(&mnt).unwrap(), mount::MountState::Missing);
        assert!(!image.exists());
        // The device may serve another image by now, never this one.
        let backing = format!("/sys/block/loop{}/loop/backing_file", device.number);
        let backing = std::fs::read_to_string(backing).unwrap_or_default();
        assert!(!backing.starts_with(image.to_str().unwrap()), "{backing}");
    }
}
