//! Custody of this node plugin's loop devices: proving, from the kernel,
//! that every device of the pool's images it has is fenced, at start and
//! periodically after.
//!
//! A device this filevol attaches holds its image's lock itself
//! (`sys::loopdev::attach`): the fence lives exactly as long as the device,
//! whatever happens to the plugin. Three things can still leave a device
//! without a fence, and the plugin is the only one on the host that can
//! notice:
//!
//! - **An older filevol attached it** (before fences were held by devices):
//!   it holds no lock. The plugin takes one on the image itself
//!   ([`Custody::Process`]), which lasts while this process lives, and
//!   says so; unstaging and staging the volume again gives it a device's
//!   fence.
//! - **The lock was lost** while the device lives: an NFSv4 lease that
//!   lapsed while the host was cut off, an evicted CephFS client. If nobody
//!   holds the lock now, the plugin takes it as above and reports it.
//! - **Another holder has it** ([`Custody::Unproven`]): another host
//!   attached the image after the lock was lost, or an older filevol there
//!   did. Two hosts may be writing the image: the volume is reported
//!   abnormal (NodeGetVolumeStats, the log, the metrics) and not staged or
//!   published again until its device here is gone or the check proves the
//!   fence again.
//!
//! Whose lock it is comes from `/proc/locks`: the kernel lists every OFD
//! lock granted on this host, including one on a file no process has open
//! (a loop device's backing file); a lock another host holds on a shared
//! pool is in that host's list, not this one's. A device's own lock is
//! told from one this process took by the table of the latter.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use parking_lot::Mutex;

use crate::sys::lock::{self, LockKind};

/// Who holds the fence of a device's image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Custody {
    /// The device itself: held as long as the device exists.
    Device,
    /// This process, for a device that had no lock: held while it lives.
    Process,
    /// Nobody this host can prove: another holder has the image's lock, or
    /// it could not be checked. The reason says which.
    Unproven(String),
}

/// How many of this plugin's devices were in each custody at the last
/// check (for the metrics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CustodyCounts {
    /// Fenced by the device itself.
    pub device: usize,
    /// Fenced by this process.
    pub process: usize,
    /// Not provably fenced.
    pub unproven: usize,
}

/// What the checks found, kept between them.
#[derive(Debug, Default)]
pub(super) struct Custodies {
    /// Locks this process took for devices that had none, by volume.
    taken: Mutex<HashMap<String, File>>,
    /// Volumes whose device here is not provably fenced, and why.
    unproven: Mutex<BTreeMap<String, String>>,
    /// The counts of the last check.
    counts: Mutex<CustodyCounts>,
}

/// What the check needs to know of one device.
#[derive(Debug, Clone, Copy)]
pub(super) struct Device<'a> {
    /// The volume.
    pub id: &'a str,
    /// Its image.
    pub image: &'a Path,
    /// The image's inode, as `/proc/locks` names it.
    pub inode: u64,
    /// The device's path, for messages.
    pub path: &'a Path,
    /// Whether the device is read-only (its fence is then shared).
    pub read_only: bool,
}

impl Custodies {
    /// Decides who holds `dev`'s fence, given the locks this host records
    /// on the pool's filesystem (`recorded`: inode and kind), and takes the
    /// lock for this process when nobody holds it.
    pub(super) fn judge(&self, dev: Device<'_>, recorded: &[(u64, LockKind)]) -> Custody {
        let wanted = if dev.read_only {
            LockKind::Shared
        } else {
            LockKind::Exclusive
        };
        if self.taken.lock().contains_key(dev.id) {
            return Custody::Process;
        }
        if recorded
            .iter()
            .any(|(inode, kind)| *inode == dev.inode && *kind == wanted)
        {
            return Custody::Device;
        }
        match take(dev.image, wanted) {
            Ok(Some(file)) => {
                self.taken.lock().insert(dev.id.to_owned(), file);
                Custody::Process
            }
            Ok(None) => Custody::Unproven(format!(
                "its image {} is attached here to {}, but the image's lock is held by another holder, not this host's device: another host may be writing it",
                dev.image.display(),
                dev.path.display()
            )),
            Err(e) => Custody::Unproven(format!(
                "the fence of its image {} (attached here to {}) cannot be checked: {e}",
                dev.image.display(),
                dev.path.display()
            )),
        }
    }

    /// Records the outcome of a check for `id`, logging what changed.
    pub(super) fn record(&self, id: &str, device: &Path, custody: &Custody) {
        let mut unproven = self.unproven.lock();
        match custody {
            Custody::Unproven(reason) => {
                if unproven.get(id) != Some(reason) {
                    log::error!("volume {id}: fence not proven: {reason}");
                    unproven.insert(id.to_owned(), reason.clone());
                }
            }
            proven => {
                if unproven.remove(id).is_some() {
                    log::warn!("volume {id}: its fence is proven again ({proven:?})");
                }
                if *proven == Custody::Process {
                    // Said once per start: the table keeps the lock.
                    log::debug!(
                        "volume {id}: {} holds no fence of its own; this process holds it while it lives (unstage and stage the volume again to give it the device's)",
                        device.display()
                    );
                }
            }
        }
    }

    /// Stores the counts of a finished check.
    pub(super) fn set_counts(&self, counts: CustodyCounts) {
        *self.counts.lock() = counts;
    }

    /// The counts of the last check.
    pub(super) fn counts(&self) -> CustodyCounts {
        *self.counts.lock()
    }

    /// Why the volume's device here is not provably fenced, if it is not.
    pub(super) fn unproven(&self, id: &str) -> Option<String> {
        self.unproven.lock().get(id).cloned()
    }

    /// Forgets the volume: its device here is gone (an unstage), so the
    /// lock this process took for it, if any, is let go.
    pub(super) fn forget(&self, id: &str) {
        self.taken.lock().remove(id);
        self.unproven.lock().remove(id);
    }

    /// Whether this process holds the volume's lock itself.
    #[cfg(test)]
    pub(super) fn holds(&self, id: &str) -> bool {
        self.taken.lock().contains_key(id)
    }
}

/// Opens `image` and takes its lock of `kind` for this process: `Ok(None)`
/// when another holder has a conflicting one.
fn take(image: &Path, kind: LockKind) -> io::Result<Option<File>> {
    let file = OpenOptions::new()
        .read(true)
        .write(kind == LockKind::Exclusive)
        .custom_flags(libc::O_CLOEXEC)
        .open(image)?;
    Ok(lock::try_lock_patiently(&file, kind)?.then_some(file))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn image(dir: &Path) -> (std::path::PathBuf, u64) {
        let p = dir.join("image");
        std::fs::write(&p, b"").unwrap();
        let ino = std::fs::metadata(&p).unwrap().ino();
        (p, ino)
    }

    fn device<'a>(image: &'a Path, inode: u64, read_only: bool) -> Device<'a> {
        Device {
            id: "v",
            image,
            inode,
            path: Path::new("/dev/loop7"),
            read_only,
        }
    }

    #[test]
    fn a_recorded_lock_of_the_device_s_kind_is_the_device_s() {
        let dir = tempfile::tempdir().unwrap();
        let (p, ino) = image(dir.path());
        let c = Custodies::default();
        let got = c.judge(device(&p, ino, false), &[(ino, LockKind::Exclusive)]);
        assert_eq!(got, Custody::Device);
        assert!(!c.holds("v"));
        // A read-only device's fence is shared.
        let got = c.judge(device(&p, ino, true), &[(ino, LockKind::Shared)]);
        assert_eq!(got, Custody::Device);
    }

    #[test]
    fn a_device_without_a_lock_gets_one_from_this_process() {
        let dir = tempfile::tempdir().unwrap();
        let (p, ino) = image(dir.path());
        let c = Custodies::default();
        // Another inode's lock is not this image's.
        let got = c.judge(device(&p, ino, false), &[(ino + 1, LockKind::Exclusive)]);
        assert_eq!(got, Custody::Process);
        assert!(c.holds("v"));
        // Nobody else can take it now.
        let other = OpenOptions::new().read(true).write(true).open(&p).unwrap();
        assert!(!lock::try_lock(&other, LockKind::Shared).unwrap());
        // The next check knows the lock is this process's, even though
        // /proc/locks now lists it.
        let again = c.judge(device(&p, ino, false), &[(ino, LockKind::Exclusive)]);
        assert_eq!(again, Custody::Process);
        c.forget("v");
        assert!(lock::try_lock(&other, LockKind::Exclusive).unwrap());
    }

    #[test]
    fn a_lock_held_by_another_holder_is_unproven_and_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let (p, ino) = image(dir.path());
        // Another holder (on a shared pool: another host) has the lock;
        // this host records none of the device's kind.
        let holder = OpenOptions::new().read(true).write(true).open(&p).unwrap();
        assert!(lock::try_lock(&holder, LockKind::Exclusive).unwrap());
        let c = Custodies::default();
        let got = c.judge(device(&p, ino, false), &[]);
        let Custody::Unproven(reason) = &got else {
            panic!("{got:?}")
        };
        assert!(
            reason.contains("another host may be writing it"),
            "{reason}"
        );
        c.record("v", Path::new("/dev/loop7"), &got);
        assert!(c.unproven("v").is_some());
        // Proven again (the other holder let go): cleared.
        drop(holder);
        let got = c.judge(device(&p, ino, false), &[]);
        assert_eq!(got, Custody::Process);
        c.record("v", Path::new("/dev/loop7"), &got);
        assert_eq!(c.unproven("v"), None);
    }

    #[test]
    fn an_image_that_cannot_be_opened_is_unproven_with_the_cause() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("gone");
        let c = Custodies::default();
        let Custody::Unproven(reason) = c.judge(device(&p, 1, false), &[]) else {
            panic!("proven without an image")
        };
        assert!(reason.contains("cannot be checked"), "{reason}");
    }
}
