//! Health as the driver reports it: the pool watched by a probe of its
//! own, and each volume's findings gathered without ever blocking a
//! worker on a share that stopped answering.
//!
//! The pool is probed on a thread of its own every `--health-interval`: a
//! direct read of a small file in the pool (it reaches the disk or the
//! server, where a `stat` might be answered from cache), then the figures
//! capacity is made of. A probe that has not finished after the interval
//! means the pool is hung: every health answer says
//! [`Reason::PoolUnreachable`] from then on, without touching the pool,
//! until a probe finishes again. A volume's own checks (a record, a stat
//! of its image, the mount table) run under the same deadline on a thread
//! of their own ([`filevol_core::sys::deadline`]), so a share that hangs
//! between two probes costs a call its deadline, not a worker.
//!
//! Health calls take no volume lock: a slow stage of the same volume
//! cannot hold them up, and what they read is the kernel's and the pool's
//! state at the moment they look.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use super::Driver;
use crate::error::Error;
use filevol_core::health::{Finding, Health, Reason};
use filevol_core::pool::room::Usage;
use filevol_core::pool::{Pool, PoolError};
use filevol_core::sys::deadline::{self, Outcome};
use filevol_core::volume::meta::VolumeMeta;

/// The file every process reads to prove the pool answers. Written once,
/// by whichever process finds it missing; never changed after.
const PROBE_FILE: &str = ".health-probe";

/// What the last finished probe found.
#[derive(Debug, Clone, Default)]
pub struct PoolReport {
    /// The figures capacity is made of (absent when they could not be read).
    pub usage: Option<Usage>,
    /// Bytes the volumes' images hold.
    pub allocated: u64,
    /// The pool's findings.
    pub health: Health,
}

#[derive(Debug, Default)]
struct State {
    /// When the probe running now started, if one is.
    probing_since: Option<Instant>,
    /// The last probe that finished.
    last: Option<PoolReport>,
}

/// The pool's health, kept by a probe on a thread of its own.
#[derive(Debug, Clone)]
pub struct PoolWatch {
    shared: Arc<(Mutex<State>, Condvar)>,
    /// How often the pool is probed, and how long a probe may take before
    /// the pool counts as unreachable.
    interval: Duration,
    root: std::path::PathBuf,
    /// When this process started serving (seconds since the epoch).
    started: f64,
}

impl PoolWatch {
    /// A watch of the pool at `root` that probes every `interval`; nothing
    /// runs until [`PoolWatch::start`].
    pub fn new(root: &Path, interval: Duration) -> PoolWatch {
        PoolWatch {
            shared: Arc::default(),
            interval,
            root: root.to_owned(),
            started: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
        }
    }

    /// The deadline of a probe and of a volume's checks.
    pub fn deadline(&self) -> Duration {
        self.interval
    }

    /// Starts probing the pool of `driver` until the driver is dropped.
    pub fn start(&self, driver: &Arc<Driver>) -> io::Result<()> {
        let weak: Weak<Driver> = Arc::downgrade(driver);
        let watch = self.clone();
        std::thread::Builder::new()
            .name("pool-health".into())
            .spawn(move || loop {
                {
                    let mut st = watch.shared.0.lock();
                    st.probing_since = Some(Instant::now());
                }
                let Some(driver) = weak.upgrade() else { return };
                let report = probe(&driver.pool, &watch.root);
                drop(driver);
                log_change(watch.shared.0.lock().last.as_ref(), &report);
                {
                    let mut st = watch.shared.0.lock();
                    st.probing_since = None;
                    st.last = Some(report);
                }
                watch.shared.1.notify_all();
                std::thread::sleep(watch.interval);
            })?;
        Ok(())
    }

    /// The pool's findings now. Never blocks on the pool: a probe running
    /// past the deadline is [`Reason::PoolUnreachable`]. Before the first
    /// probe has finished, waits for it up to the deadline.
    pub fn pool_health(&self) -> Health {
        let (lock, cv) = &*self.shared;
        let mut st = lock.lock();
        if st.last.is_none() {
            let until = Instant::now() + self.interval;
            while st.last.is_none() && Instant::now() < until {
                cv.wait_until(&mut st, until);
            }
        }
        if let Some(since) = st.probing_since {
            let waited = since.elapsed();
            if waited > self.interval {
                let mut h = Health::ok();
                h.add(Finding::new(
                    Reason::PoolUnreachable,
                    format!(
                        "the pool at {} has not answered a read for {}s: the share or disk below it stopped answering (a server gone, a network cut, a device failed). Check the mount (is the NFS server up? dmesg), not the volumes; this clears once a read returns",
                        self.root.display(),
                        waited.as_secs()
                    ),
                ));
                return h;
            }
        }
        st.last
            .as_ref()
            .map(|r| r.health.clone())
            .unwrap_or_default()
    }

    /// The last finished probe's report.
    pub fn report(&self) -> Option<PoolReport> {
        self.shared.0.lock().last.clone()
    }
}

/// Logs a change of the pool's findings, once per change.
fn log_change(before: Option<&PoolReport>, now: &PoolReport) {
    let before = before.map(|r| r.health.message()).unwrap_or_default();
    let after = now.health.message();
    if before != after {
        if after.is_empty() {
            log::info!("pool health: healthy again");
        } else {
            log::warn!("pool health: {after}");
        }
    }
}

/// One probe: a read of [`PROBE_FILE`] that reaches the storage, then the
/// capacity figures. A failed read is [`Reason::PoolUnreachable`]; figures
/// that cannot be read (a damaged record) are logged and leave the space
/// findings out.
fn probe(pool: &Pool, root: &Path) -> PoolReport {
    let mut report = PoolReport::default();
    if let Err(e) = read_probe(root) {
        report.health.add(Finding::new(
            Reason::PoolUnreachable,
            format!(
                "the pool at {} answers a read with an error: {e}. A stale or lost share (ESTALE: remount it), a failing disk (EIO: dmesg), or a full pool that cannot write the probe file",
                root.display()
            ),
        ));
        return report;
    }
    match (pool.usage(), pool.allocation()) {
        (Ok(usage), Ok(alloc)) => {
            report.allocated = alloc.volume_images;
            report.health = filevol_core::pool::health::assess(&usage, alloc.volume_images);
            report.usage = Some(usage);
        }
        (Err(e), _) | (_, Err(e)) => log::warn!("pool health: capacity figures: {e}"),
    }
    report
}

/// Reads the probe file, bypassing the page cache where the filesystem
/// allows (O_DIRECT), so the read reaches the disk or the server. Creates
/// it first if it is missing.
fn read_probe(root: &Path) -> io::Result<()> {
    let path = root.join(PROBE_FILE);
    match std::fs::symlink_metadata(&path) {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            // Another process may write it at the same moment: either
            // write leaves the same bytes.
            let tmp = root.join(format!("{PROBE_FILE}.{}", std::process::id()));
            let written =
                std::fs::write(&tmp, vec![0u8; 4096]).and_then(|()| std::fs::rename(&tmp, &path));
            if let Err(e) = written {
                let _ = std::fs::remove_file(&tmp);
                // A pool that is full or read-only still answers: a read
                // of its directory proves that much (the space findings
                // say the rest).
                let answers_anyway = matches!(
                    e.raw_os_error(),
                    Some(libc::ENOSPC | libc::EDQUOT | libc::EROFS | libc::EACCES)
                );
                if answers_anyway {
                    return std::fs::read_dir(root)?.next().transpose().map(|_| ());
                }
                return Err(e);
            }
        }
        Err(e) => return Err(e),
    }
    let direct = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT | libc::O_NOFOLLOW)
        .open(&path);
    let mut file: File = match direct {
        Ok(f) => f,
        // A filesystem without direct I/O (tmpfs before 6.6, some FUSE):
        // a buffered read is the best there is.
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)?,
        Err(e) => return Err(e),
    };
    // O_DIRECT wants an aligned buffer: 4 KiB in an 8 KiB vector.
    let mut buf = vec![0u8; 8192];
    let offset = buf.as_ptr().align_offset(4096);
    match file.read(&mut buf[offset..offset + 4096]) {
        Ok(_) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            let mut plain = File::open(&path)?;
            plain.read(&mut buf[..4096]).map(|_| ())
        }
        Err(e) => Err(e),
    }
}

/// The findings the pool's state gives every volume in it: unreachable,
/// or (for a thin volume) full.
fn from_pool(pool: &Health, v: Option<&VolumeMeta>) -> Health {
    let mut h = Health::ok();
    for f in &pool.findings {
        match f.reason {
            Reason::PoolUnreachable => h.add(f.clone()),
            Reason::PoolLowSpace if v.is_none_or(|v| !v.thick) => h.add(Finding::new(
                Reason::PoolFull,
                format!(
                    "the volume is thin and the pool is out of space, so its writes into blocks it never wrote fail ({})",
                    f.message
                ),
            )),
            _ => {}
        }
    }
    h
}

/// Every volume's findings while the pool does not answer, if it does not:
/// what the calls that would read the pool (ControllerGetVolume,
/// ListVolumes, NodeGetVolumeStats) answer at once instead of hanging a
/// worker on it.
pub fn unreachable(driver: &Driver) -> Option<Health> {
    let pool = driver.health.pool_health();
    pool.has(Reason::PoolUnreachable)
        .then(|| from_pool(&pool, None))
}

/// A volume's findings where it is looked at from the pool (the
/// controller): its record and data, and the pool's state. `Ok(None)`
/// when there is no such volume.
pub fn in_pool(driver: &Arc<Driver>, id: &str) -> Result<Option<Health>, Error> {
    let pool_health = driver.health.pool_health();
    if pool_health.has(Reason::PoolUnreachable) {
        return Ok(Some(from_pool(&pool_health, None)));
    }
    let d = Arc::clone(driver);
    let id = id.to_owned();
    let checked = under_deadline(driver, move || match d.pool.volume(&id) {
        Ok(v) => Ok(Some((d.pool.volume_health(&v), Some(v)))),
        Err(PoolError::NotFound { .. }) => Ok(None),
        Err(PoolError::Damaged { path, problem }) => {
            let mut h = Health::ok();
            h.add(damaged(&path, &problem));
            Ok(Some((h, None)))
        }
        Err(e) => Err(Error::from(e)),
    });
    let (mut h, v) = match checked {
        Ok(Ok(Some(found))) => found,
        Ok(Ok(None)) => return Ok(None),
        Ok(Err(e)) => return Err(e),
        Err(unreachable) => return Ok(Some(unreachable)),
    };
    h.extend(from_pool(&pool_health, v.as_ref()));
    Ok(Some(h))
}

/// The findings of volumes whose records were read (a page of a listing):
/// their data in the pool, checked under one deadline, and the pool's
/// state. In the order given.
pub fn of_volumes(driver: &Arc<Driver>, volumes: Vec<Arc<VolumeMeta>>) -> Vec<Health> {
    let pool_health = driver.health.pool_health();
    if pool_health.has(Reason::PoolUnreachable) {
        return vec![from_pool(&pool_health, None); volumes.len()];
    }
    let d = Arc::clone(driver);
    let n = volumes.len();
    let checked = under_deadline(driver, move || {
        volumes
            .into_iter()
            .map(|v| {
                let mut h = d.pool.volume_health(&v);
                h.extend(from_pool(&pool_health, Some(&v)));
                h
            })
            .collect::<Vec<_>>()
    });
    checked.unwrap_or_else(|unreachable| vec![unreachable; n])
}

/// A damaged record's finding.
pub fn damaged(path: &Path, problem: &str) -> Finding {
    Finding::new(
        Reason::RecordDamaged,
        format!(
            "the volume's record {} is damaged ({problem}): filevol will not act on it. Restore it from a backup of the pool, or delete the volume",
            path.display()
        ),
    )
}

/// A volume's findings on this node, at `path` when a call names one:
/// its mount, device, filesystem, fence, and the pool's state.
pub fn on_node(driver: &Arc<Driver>, id: &str, path: Option<&Path>) -> Result<Health, Error> {
    let pool_health = driver.health.pool_health();
    if pool_health.has(Reason::PoolUnreachable) {
        return Ok(from_pool(&pool_health, None));
    }
    let d = Arc::clone(driver);
    let id = id.to_owned();
    let path = path.map(Path::to_owned);
    let checked = under_deadline(driver, move || {
        let node = d.node.as_ref().ok_or(Error::NotServed {
            rpc: crate::rpc::Rpc::NodeGetVolumeHealth,
            reason: "this process serves no Node service".into(),
        })?;
        match d.pool.volume(&id) {
            Ok(v) => {
                let h = node.volume_health(&d.pool, &v, path.as_deref())?;
                Ok((h, Some(v)))
            }
            Err(PoolError::Damaged { path, problem }) => {
                let mut h = Health::ok();
                h.add(damaged(&path, &problem));
                Ok((h, None))
            }
            Err(e) => Err(Error::from(e)),
        }
    });
    let (mut h, v) = match checked {
        Ok(found) => found?,
        Err(unreachable) => return Ok(unreachable),
    };
    h.extend(from_pool(&pool_health, v.as_ref()));
    Ok(h)
}

/// Runs `work` under the health deadline; a timeout is the pool not
/// answering (`Err` holds that finding).
fn under_deadline<T: Send + 'static>(
    driver: &Driver,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Health> {
    let unreachable = |why: &str| {
        let mut h = Health::ok();
        h.add(Finding::new(
            Reason::PoolUnreachable,
            format!(
                "the volume's checks did not finish in {}s ({why}): the pool's share or disk stopped answering. Check the pool's mount (dmesg, the server); this clears once it answers",
                driver.health.deadline().as_secs()
            ),
        ));
        h
    };
    match deadline::run("health-check", driver.health.deadline(), work) {
        Outcome::Done(out) => Ok(out),
        Outcome::TimedOut => Err(unreachable("timed out")),
        Outcome::TooManyStuck => Err(unreachable("earlier checks are still stuck in the kernel")),
    }
}

/// The health section of the metrics: the pool's findings from the watch,
/// and where the pool answers, every volume this process looks at (a node
/// plugin: those with a loop device here, with their I/O counters; a
/// controller: every volume in the pool) with its findings. Gathered under
/// the deadline: a pool that hangs leaves the volumes out, not the scrape.
pub fn gauges(driver: &Arc<Driver>) -> crate::metrics::health::HealthGauges {
    let pool = driver.health.pool_health();
    let mut g = crate::metrics::health::HealthGauges {
        owed_and_writable: driver.health.report().and_then(|r| {
            r.usage.map(|u| {
                (
                    filevol_core::pool::health::unwritten(&u, r.allocated),
                    u.fs_free.saturating_sub(u.reserve),
                )
            })
        }),
        started: driver.health.started,
        ..Default::default()
    };
    if !pool.has(Reason::PoolUnreachable) {
        let d = Arc::clone(driver);
        match under_deadline(driver, move || volumes_and_io(&d)) {
            Ok((volumes, looked_at, io)) => {
                g.volumes = volumes;
                g.looked_at = looked_at;
                g.io = io;
            }
            Err(h) => log::warn!("metrics: volume health: {}", h.message()),
        }
    }
    let pool_findings = from_pool(&pool, None);
    for (_, h) in &mut g.volumes {
        h.extend(pool_findings.clone());
    }
    g.pool = pool;
    g
}

type VolumesAndIo = (
    Vec<crate::metrics::health::VolumeFindings>,
    usize,
    Vec<(String, filevol_core::sys::blockstat::IoStat)>,
);

/// The unhealthy volumes this process looks at, how many it looked at,
/// and the I/O counters of this node's devices.
fn volumes_and_io(driver: &Driver) -> VolumesAndIo {
    let mut unhealthy = Vec::new();
    let mut io = Vec::new();
    let mut seen = std::collections::HashSet::new();
    if let Some(node) = &driver.node {
        let devices = node.volume_devices(&driver.pool).unwrap_or_else(|e| {
            log::warn!("metrics: this node's loop devices: {e}");
            Vec::new()
        });
        for (id, dev) in devices {
            match filevol_core::sys::blockstat::io_stat(&format!("loop{}", dev.number)) {
                Ok(stat) => io.push((id.clone(), stat)),
                Err(e) => log::debug!("metrics: I/O counters of loop{}: {e}", dev.number),
            }
            let h = match driver.pool.volume(&id) {
                Ok(v) => node
                    .volume_health(&driver.pool, &v, None)
                    .unwrap_or_else(|e| {
                        log::warn!("metrics: health of volume {id}: {e}");
                        Health::ok()
                    }),
                Err(PoolError::Damaged { path, problem }) => {
                    let mut h = Health::ok();
                    h.add(damaged(&path, &problem));
                    h
                }
                Err(_) => Health::ok(),
            };
            if !h.is_healthy() {
                unhealthy.push((id.clone(), h));
            }
            seen.insert(id);
        }
    }
    if driver.config.mode.serves_controller() {
        let ids = driver
            .pool
            .store()
            .ids(filevol_core::pool::store::Kind::Volume)
            .unwrap_or_default();
        for id in ids {
            if seen.contains(&id) {
                continue;
            }
            let h = match driver.pool.volume(&id) {
                Ok(v) => driver.pool.volume_health(&v),
                Err(PoolError::Damaged { path, problem }) => {
                    let mut h = Health::ok();
                    h.add(damaged(&path, &problem));
                    h
                }
                Err(_) => continue,
            };
            if !h.is_healthy() {
                unhealthy.push((id.clone(), h));
            }
            seen.insert(id);
        }
    }
    (unhealthy, seen.len(), io)
}
