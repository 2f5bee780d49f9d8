//! Per-process scratch space inside the pool, where objects are built before
//! they are renamed into place.
//!
//! Each process gets `.scratch/<instance>/` and holds a lock (OFD, see
//! `sys::lock`) on `.scratch/<instance>.lock` for its life. A controller's
//! janitor removes the scratch of every instance whose lock is free (it
//! crashed or was killed), and never touches the scratch of one that still
//! runs, so a second controller or a node plugin on a shared pool cannot
//! delete work in progress.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use super::error::{io_error, PoolError};
use crate::sys::fs as sysfs;
use crate::sys::lock::{self, LockKind};

/// This process's scratch directory.
#[derive(Debug)]
pub struct Scratch {
    dir: PathBuf,
    lock_path: PathBuf,
    _lock: File,
    seq: AtomicU64,
}

/// Scratch directories with no lock file at all are left by a process that
/// died between creating its lock and its directory; after this long they
/// are certainly debris.
const ORPHAN_AGE: Duration = Duration::from_secs(3600);

impl Scratch {
    /// Creates this process's scratch.
    pub fn open(base: &Path) -> Result<Scratch, PoolError> {
        std::fs::create_dir_all(base).map_err(io_error("create", base))?;
        let host = rustix::system::uname()
            .nodename()
            .to_string_lossy()
            .into_owned();
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        let instance: String = format!("{host}-{}-{nanos}", std::process::id())
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        // The lock file appears under its real name only once it is locked:
        // a janitor that found it unlocked would take it for a dead
        // instance's and remove it.
        let lock_path = base.join(format!("{instance}.lock"));
        let unlocked = base.join(format!("{instance}.lock-new"));
        let lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&unlocked)
            .map_err(io_error("create", &unlocked))?;
        if !lock::try_lock(&lock, LockKind::Exclusive).map_err(io_error("lock", &unlocked))? {
            return Err(PoolError::InUse(format!(
                "{} is locked by another process",
                unlocked.display()
            )));
        }
        std::fs::rename(&unlocked, &lock_path).map_err(io_error("rename", &lock_path))?;
        let dir = base.join(&instance);
        std::fs::create_dir(&dir).map_err(io_error("create", &dir))?;
        Ok(Scratch {
            dir,
            lock_path,
            _lock: lock,
            seq: AtomicU64::new(0),
        })
    }

    /// Whether SEEK_DATA on this filesystem tells a hole from data: a new
    /// sparse file must show no data at all. FUSE filesystems and NFS
    /// before 4.2 answer with the generic "everything is data".
    pub fn reports_holes(&self) -> Result<bool, PoolError> {
        let path = self.new_path("holes");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(io_error("create", &path))?;
        let answer = file
            .set_len(1 << 20)
            .map_err(io_error("size", &path))
            .map(|()| {
                matches!(
                    rustix::fs::seek(&file, rustix::fs::SeekFrom::Data(0)),
                    Err(rustix::io::Errno::NXIO)
                )
            });
        drop(file);
        let _ = std::fs::remove_file(&path);
        answer
    }

    /// The directory holding every instance's scratch.
    pub fn base(&self) -> &Path {
        self.lock_path
            .parent()
            .expect("lock files live in the scratch base")
    }

    /// Whether the instance `name` (a directory in [`Scratch::base`]) still
    /// runs: its lock file is held. This process counts as alive. An
    /// instance is dead only when its lock is free or its lock file is
    /// absent (ENOENT); a lock that cannot be looked at is an error.
    pub fn is_alive(&self, name: &str) -> Result<bool, PoolError> {
        if self.dir.file_name().is_some_and(|own| own == name) {
            return Ok(true);
        }
        let path = self.base().join(format!("{name}.lock"));
        crate::faults::io_error_at(&path).map_err(io_error("open", &path))?;
        match OpenOptions::new().read(true).write(true).open(&path) {
            Ok(f) => Ok(!lock::try_lock(&f, LockKind::Exclusive).map_err(io_error("lock", &path))?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io_error("open", &path)(e)),
        }
    }

    /// A fresh path inside this process's scratch (not created).
    pub fn new_path(&self, what: &str) -> PathBuf {
        self.dir.join(format!(
            "{what}-{}",
            self.seq.fetch_add(1, Ordering::Relaxed)
        ))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
        let _ = std::fs::remove_file(&self.lock_path);
    }
}

/// Whether the scratch `name` has its lock file. One that cannot be looked
/// at counts as present: its instance may run, so its scratch stays.
fn lock_file_present(base: &Path, name: &str) -> bool {
    let path = base.join(format!("{name}.lock"));
    sysfs::exists(&path).unwrap_or_else(|e| {
        log::warn!("scratch {name}: {}: {e}; left in place", path.display());
        true
    })
}

/// Removes the scratch of instances that no longer run (for the janitor).
///
/// One look at each lock, without patience: a lock held for a moment past
/// its holder's death (a forked child not yet exec'd) only delays its
/// clean-up to the next round, while waiting on every live instance's lock
/// (this process's own included) would add 50 ms each to every start.
pub fn clean(scratch: &Scratch) -> Result<(), PoolError> {
    let base = scratch.base();
    let own = scratch.dir.file_name();
    for entry in std::fs::read_dir(base).map_err(io_error("read directory", base))? {
        let entry = entry.map_err(io_error("read directory", base))?;
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(instance) = name.strip_suffix(".lock") {
            if own.is_some_and(|own| own == instance) {
                continue;
            }
            let Ok(lock) = OpenOptions::new().read(true).write(true).open(&path) else {
                continue;
            };
            if lock::try_lock(&lock, LockKind::Exclusive).unwrap_or(false) {
                let dir = base.join(instance);
                match sysfs::exists(&dir) {
                    Ok(false) => {}
                    Ok(true) => {
                        log::warn!(
                            "removing scratch {} left by a process that stopped mid-operation",
                            dir.display()
                        );
                        remove_instance(&dir)?;
                    }
                    // Its lock file stays, so the next pass looks again.
                    Err(e) => {
                        log::warn!("scratch {}: {e}; left in place", dir.display());
                        continue;
                    }
                }
                let _ = std::fs::remove_file(&path);
            }
        } else if entry.file_type().is_ok_and(|t| t.is_dir()) && !lock_file_present(base, &name) {
            let old = entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > ORPHAN_AGE);
            if old {
                log::warn!("removing orphaned scratch {}", path.display());
                remove_instance(&path)?;
            }
        }
    }
    Ok(())
}

/// Removes an instance's scratch directory: each object it was building or
/// deleting first (a btrfs subvolume among them, read-only or not, goes
/// with its qgroup: see `subvolumes::remove_object`), then the directory.
fn remove_instance(dir: &Path) -> Result<(), PoolError> {
    for entry in std::fs::read_dir(dir).map_err(io_error("read directory", dir))? {
        let path = entry.map_err(io_error("read directory", dir))?.path();
        // One object that will not go (a read-only subvolume, once this
        // process has lost CAP_SYS_ADMIN) must not keep the pool from
        // opening: it is left for the next clean-up, and said.
        if let Err(e) = super::subvolumes::remove_object(&path) {
            log::warn!(
                "cannot remove scratch debris {}: {e}; left for the next clean-up",
                path.display()
            );
            return Ok(());
        }
    }
    std::fs::remove_dir_all(dir).map_err(io_error("remove", dir))
}
