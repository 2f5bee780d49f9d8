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
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use super::Driver;
use crate::error::Error;
use crate::metrics::dir_usage::DirUsageSummary;
use crate::metrics::Load;
use filevol_core::health::{Finding, Health, Reason};
use filevol_core::pool::room::Usage;
use filevol_core::pool::{Pool, PoolError};
use filevol_core::sys::deadline::{self, Outcome};
use filevol_core::volume::meta::VolumeMeta;

/// The file every process reads to prove the pool answers. Written once,
/// by whichever process finds it missing; never changed after.
const PROBE_FILE: &str = ".health-probe";

/// How many probe intervals the capacity figures may take before the pool
/// counts as unreachable: they stat every image, which on a large pool on
/// a share takes longer than the read that proves the pool answers.
const FIGURES_INTERVALS: u32 = 6;

/// The longest a scrape waits for the pool's figures and the volumes'
/// health: under the metrics server's 5 s to answer.
const SCRAPE_DEADLINE: Duration = Duration::from_secs(4);

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
    /// When the read of the probe running now started, while it reads.
    reading_since: Option<Instant>,
    /// When its capacity figures started, while it reads them.
    figures_since: Option<Instant>,
    /// The last probe that finished.
    last: Option<PoolReport>,
}

/// The pool's health, kept by a probe on a thread of its own.
#[derive(Debug, Clone)]
pub struct PoolWatch {
    shared: Arc<(Mutex<State>, Condvar)>,
    /// How often the pool is probed, and how long a read of it may take
    /// before the pool counts as unreachable.
    interval: Duration,
    root: std::path::PathBuf,
    /// When this process started serving (seconds since the epoch).
    started: f64,
    /// Whether a scrape's gathering runs now (one at a time: a slow pool
    /// leaves at most one behind).
    gathering: Arc<AtomicBool>,
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
            gathering: Arc::default(),
        }
    }

    /// The deadline of a probe's read and of a volume's checks.
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
                let Some(driver) = weak.upgrade() else { return };
                let report = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    watch.probe(&driver.pool)
                }))
                .unwrap_or_else(|_| {
                    let mut report = PoolReport::default();
                    report.health.add(Finding::new(
                        Reason::PoolUnreachable,
                        "the pool's health probe failed (a bug: the log has its panic); it is tried again",
                    ));
                    report
                });
                drop(driver);
                let before = {
                    let mut st = watch.shared.0.lock();
                    st.reading_since = None;
                    st.figures_since = None;
                    st.last.replace(report.clone())
                };
                log_change(before.as_ref(), &report);
                watch.shared.1.notify_all();
                std::thread::sleep(watch.interval);
            })?;
        Ok(())
    }

    /// One probe: a read of [`PROBE_FILE`] that reaches the storage, then
    /// the capacity figures, each phase marked in the state so that
    /// [`PoolWatch::pool_health`] can tell one that hangs. A failed read is
    /// [`Reason::PoolUnreachable`]; figures that cannot be read (a damaged
    /// record) are logged and leave the space findings out.
    fn probe(&self, pool: &Pool) -> PoolReport {
        self.shared.0.lock().reading_since = Some(Instant::now());
        let mut report = PoolReport::default();
        if let Err(e) = read_probe(pool, &self.root) {
            report.health.add(Finding::new(
                Reason::PoolUnreachable,
                format!(
                    "the pool at {} answers a read with an error: {e}. A stale or lost share (ESTALE: remount it), a failing disk (EIO: dmesg)",
                    self.root.display()
                ),
            ));
            return report;
        }
        {
            let mut st = self.shared.0.lock();
            st.reading_since = None;
            st.figures_since = Some(Instant::now());
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

    /// The pool's findings now, waiting up to the deadline for the first
    /// probe (a call that arrives as the process starts). Never blocks on
    /// the pool.
    pub fn pool_health(&self) -> Health {
        self.health_now(true)
    }

    /// The pool's findings now, without waiting for a first probe (the
    /// metrics: a scrape has 5 s).
    pub fn pool_health_now(&self) -> Health {
        self.health_now(false)
    }

    /// A read running past the interval, or capacity figures running past
    /// [`FIGURES_INTERVALS`] of them, is [`Reason::PoolUnreachable`].
    fn health_now(&self, wait: bool) -> Health {
        let (lock, cv) = &*self.shared;
        let mut st = lock.lock();
        if wait && st.last.is_none() {
            let until = Instant::now() + self.interval;
            while st.last.is_none() && Instant::now() < until {
                cv.wait_until(&mut st, until);
            }
        }
        let hung = |since: Option<Instant>, bound: Duration| {
            since.map(|s| s.elapsed()).filter(|waited| *waited > bound)
        };
        let unreachable = |what: &str, waited: Duration| {
            let mut h = Health::ok();
            h.add(Finding::new(
                Reason::PoolUnreachable,
                format!(
                    "the pool at {} has not answered {what} for {}s: the share or disk below it stopped answering (a server gone, a network cut, a device failed). Check the mount (is the NFS server up? dmesg), not the volumes; this clears once it answers",
                    self.root.display(),
                    waited.as_secs()
                ),
            ));
            h
        };
        if let Some(waited) = hung(st.reading_since, self.interval) {
            return unreachable("a read", waited);
        }
        if let Some(waited) = hung(st.figures_since, self.interval * FIGURES_INTERVALS) {
            return unreachable("the stat of its volumes", waited);
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

/// Reads the probe file, bypassing the page cache where the filesystem
/// allows (O_DIRECT), so the read reaches the disk or the server. Creates
/// it first if it is missing.
fn read_probe(pool: &Pool, root: &Path) -> io::Result<()> {
    let path = root.join(PROBE_FILE);
    match std::fs::symlink_metadata(&path) {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            // Another process may write it at the same moment: either
            // write leaves the same bytes.
            // Made in this process's scratch (a name no other process
            // uses, on the pool's filesystem), then renamed in place.
            let tmp = pool.scratch_path("health-probe");
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
            Reason::PoolOutOfSpace if v.is_none_or(|v| !v.thick) => h.add(Finding::new(
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
        Err(PoolError::Damaged { path, problem }) => Ok(Some((damaged(&path, &problem), None))),
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

/// The health of a volume whose record at `path` is damaged: that finding
/// alone.
pub fn damaged(path: &Path, problem: &str) -> Health {
    let mut h = Health::ok();
    h.add(Finding::new(
        Reason::RecordDamaged,
        format!(
            "the volume's record {} is damaged ({problem}): filevol will not act on it. Restore it from a backup of the pool, or delete the volume",
            path.display()
        ),
    ));
    h
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
            Err(PoolError::Damaged { path, problem }) => Ok((damaged(&path, &problem), None)),
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
pub fn under_deadline<T: Send + 'static>(
    driver: &Driver,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Health> {
    bounded(driver.health.deadline(), work)
}

/// [`under_deadline`] with a deadline of its own.
fn bounded<T: Send + 'static>(
    deadline: Duration,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Health> {
    let unreachable = |why: &str| {
        let mut h = Health::ok();
        h.add(Finding::new(
            Reason::PoolUnreachable,
            format!(
                "the checks that read the pool did not finish in {}s ({why}): the pool's share or disk stopped answering. Check the pool's mount (dmesg, the server); this clears once it answers",
                deadline.as_secs()
            ),
        ));
        h
    };
    match deadline::run("health-check", deadline, work) {
        Outcome::Done(out) => Ok(out),
        Outcome::TimedOut => Err(unreachable("timed out")),
        Outcome::TooManyStuck => Err(unreachable("earlier checks are still stuck in the kernel")),
        Outcome::Panicked => Err(unreachable("they failed: the log has the panic")),
    }
}

/// The whole Prometheus exposition of this process: the calls and the
/// workers' load (never the pool's), then, gathered under
/// `SCRAPE_DEADLINE` (4 s) on a thread of their own, the pool's figures and
/// every volume this process looks at (a node plugin: those with a loop
/// device here, with their I/O counters; a controller: every volume in
/// the pool) with its findings, and last the pool's findings from the
/// watch. A pool that does not answer, or a gathering that does not come
/// back in time (or is still running from the last scrape), leaves the
/// pool's figures and the volumes out of this scrape and says
/// `pool_unreachable`: the scrape itself is never held up.
pub fn exposition(driver: &Arc<Driver>, load: Load, dirs: &DirUsageSummary) -> String {
    let mut pool = driver.health.pool_health_now();
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
    let gathered = if pool.has(Reason::PoolUnreachable) {
        None
    } else if driver.health.gathering.swap(true, Ordering::AcqRel) {
        pool.add(Finding::new(
            Reason::PoolUnreachable,
            "the last scrape's reads of the pool have not come back: the share or disk below it is slow or stopped answering",
        ));
        None
    } else {
        let (d, dirs, seen) = (Arc::clone(driver), dirs.clone(), pool.clone());
        let flag = Arc::clone(&driver.health.gathering);
        let gather = bounded(SCRAPE_DEADLINE, move || {
            let _done = ClearOnDrop(flag);
            let text = d
                .executor
                .metrics()
                .exposition(load, &d.pool, d.node.as_ref(), &dirs);
            (text, volumes_and_io(&d, &seen))
        });
        match gather {
            Ok(out) => Some(out),
            Err(h) => {
                pool.extend(h);
                None
            }
        }
    };
    let mut text = match gathered {
        Some((text, (volumes, looked_at, io))) => {
            g.volumes = volumes;
            g.looked_at = looked_at;
            g.io = io;
            text
        }
        None => {
            let mut text = driver.executor.metrics().render_calls(load);
            if let Some(node) = &driver.node {
                crate::metrics::render_trims(&mut text, node.trim_totals().read());
                crate::metrics::render_fences(&mut text, node.custody_counts());
            }
            text
        }
    };
    g.pool = pool;
    crate::metrics::health::render(&mut text, &g);
    text
}

/// Clears a flag when dropped: the end of a gathering, however it ends.
struct ClearOnDrop(Arc<AtomicBool>);

impl Drop for ClearOnDrop {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

type VolumesAndIo = (
    Vec<crate::metrics::health::VolumeFindings>,
    usize,
    Vec<(String, filevol_core::sys::blockstat::IoStat)>,
);

/// The unhealthy volumes this process looks at (with what the pool's state
/// `pool` means for each), how many it looked at, and the I/O counters of
/// this node's devices.
fn volumes_and_io(driver: &Driver, pool: &Health) -> VolumesAndIo {
    let mut unhealthy = Vec::new();
    let mut io = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut look = |seen: &mut std::collections::HashSet<String>,
                    id: String,
                    found: Result<(Health, VolumeMeta), Health>| {
        let h = match found {
            Ok((mut h, v)) => {
                h.extend(from_pool(pool, Some(&v)));
                h
            }
            Err(h) => h,
        };
        if !h.is_healthy() {
            unhealthy.push((id.clone(), h));
        }
        seen.insert(id);
    };
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
            let found = match driver.pool.volume(&id) {
                Ok(v) => {
                    let h = node
                        .volume_health(&driver.pool, &v, None)
                        .unwrap_or_else(|e| {
                            log::warn!("metrics: health of volume {id}: {e}");
                            Health::ok()
                        });
                    Ok((h, v))
                }
                Err(PoolError::Damaged { path, problem }) => Err(damaged(&path, &problem)),
                Err(_) => continue,
            };
            look(&mut seen, id, found);
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
            let found = match driver.pool.volume(&id) {
                Ok(v) => Ok((driver.pool.volume_health(&v), v)),
                Err(PoolError::Damaged { path, problem }) => Err(damaged(&path, &problem)),
                Err(_) => continue,
            };
            look(&mut seen, id, found);
        }
    }
    let looked_at = seen.len();
    (unhealthy, looked_at, io)
}
