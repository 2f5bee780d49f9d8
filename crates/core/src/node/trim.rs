//! Giving freed space back to the pool: FITRIM on staged filesystems.
//!
//! An image is sparse when it is made, and a filesystem on a loop device
//! turns each discard into a hole punched in the image. Nothing discards by
//! itself unless a volume is mounted with `discard` (its StorageClass
//! parameter), so the node trims every staged, writable filesystem volume
//! on a schedule ([`Schedule`], run by the server's trim thread) and on
//! demand (`filevol trim`, the `TrimVolumes` call).
//!
//! What a trim never does:
//! - run during a stage or unstage of its volume: `Gate` keeps them apart.
//!   A stage or unstage that arrives during a trim waits for it (a FITRIM
//!   is short, and an unstage refused because of our own housekeeping would
//!   be a failure kubelet has to retry); a trim that finds one in progress
//!   skips the volume until its next turn.
//! - touch a volume staged read-only (its loop device is read-only) or a
//!   thick volume (a trim would punch holes in the preallocation that is the
//!   reason for `thick`).
//! - act on anything but the mount the table named: the descriptor it trims
//!   through is opened beneath the kubelet directory and must be on that
//!   very mount (its statx mount id).
//!
//! Snapshots and clones are reflinks or copies of the image, so a hole
//! punched in the image changes only the image: a shared extent is unshared
//! from the image's side and stays whole in every other file that maps it.

use std::collections::{HashMap, HashSet};
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::{Condvar, Mutex};

use super::error::NodeError;
use super::mounts::FsMount;
use super::paths;
use super::Node;
use crate::pool::Pool;
use crate::volume::meta::FsType;

/// The longest a trim waits for its discards to complete before it reads
/// what the image holds.
const SETTLE: Duration = Duration::from_secs(10);

/// How long an xfs image's allocation must hold still after a trim to be
/// taken as the trim's result.
const QUIET: Duration = Duration::from_millis(100);

/// Keeps trims and stages/unstages of one volume apart (see the module
/// documentation). Volumes are independent: a trim of one never waits for
/// a stage of another.
#[derive(Debug, Default)]
pub(super) struct Gate {
    state: Mutex<GateState>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct GateState {
    /// Volumes with a stage or unstage in progress, and how many (the
    /// executor's lock table already makes it one per volume).
    changing: HashMap<String, usize>,
    /// Volumes being trimmed.
    trimming: HashSet<String>,
}

/// A stage or unstage in progress; lets trims of the volume run again when
/// dropped.
#[derive(Debug)]
pub(super) struct Changing<'a> {
    gate: &'a Gate,
    id: String,
}

/// A trim in progress; wakes a stage or unstage waiting for it when dropped.
#[derive(Debug)]
struct Trimming<'a> {
    gate: &'a Gate,
    id: String,
}

impl Gate {
    /// Marks a stage or unstage of `id` in progress, after waiting for a
    /// trim of it to end.
    pub(super) fn change(&self, id: &str) -> Changing<'_> {
        let mut st = self.state.lock();
        while st.trimming.contains(id) {
            self.changed.wait(&mut st);
        }
        *st.changing.entry(id.to_owned()).or_insert(0) += 1;
        Changing {
            gate: self,
            id: id.to_owned(),
        }
    }

    /// Marks a trim of `id` in progress, unless a stage, unstage or another
    /// trim of it is.
    fn try_trim(&self, id: &str) -> Option<Trimming<'_>> {
        let mut st = self.state.lock();
        if st.changing.contains_key(id) || !st.trimming.insert(id.to_owned()) {
            return None;
        }
        Some(Trimming {
            gate: self,
            id: id.to_owned(),
        })
    }
}

impl Drop for Changing<'_> {
    fn drop(&mut self) {
        let mut st = self.gate.state.lock();
        if let Some(n) = st.changing.get_mut(&self.id) {
            *n -= 1;
            if *n == 0 {
                st.changing.remove(&self.id);
            }
        }
    }
}

impl Drop for Trimming<'_> {
    fn drop(&mut self) {
        self.gate.state.lock().trimming.remove(&self.id);
        self.gate.changed.notify_all();
    }
}

/// What trims have done since the process started, for the metrics.
#[derive(Debug, Default)]
pub struct TrimTotals {
    trims: AtomicU64,
    failures: AtomicU64,
    discarded: AtomicU64,
    reclaimed: AtomicU64,
}

impl TrimTotals {
    /// (trims done, trims failed, bytes sent as discards, bytes the images'
    /// allocation fell by).
    pub fn read(&self) -> (u64, u64, u64, u64) {
        (
            self.trims.load(Ordering::Relaxed),
            self.failures.load(Ordering::Relaxed),
            self.discarded.load(Ordering::Relaxed),
            self.reclaimed.load(Ordering::Relaxed),
        )
    }
}

/// One volume's trim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trimmed {
    /// Bytes the filesystem sent to its device as discards (every free
    /// extent it walked, not only what was freed since the last trim).
    pub discarded: u64,
    /// The image's allocated bytes (st_blocks) before the trim.
    pub allocated_before: u64,
    /// And after.
    pub allocated_after: u64,
}

impl Trimmed {
    /// What the trim gave back to the pool (0 if the pod wrote more than
    /// was freed meanwhile).
    pub fn reclaimed(&self) -> u64 {
        self.allocated_before.saturating_sub(self.allocated_after)
    }
}

/// Why a staged volume was not trimmed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Skipped {
    /// Staged read-only: nothing of it is written, nothing is trimmed.
    ReadOnly,
    /// A thick volume keeps its preallocation.
    Thick,
    /// A stage or unstage of it is in progress (or another trim).
    Busy,
    /// Unstaged (or staged anew) since the mount table was read.
    Gone,
}

impl std::fmt::Display for Skipped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Skipped::ReadOnly => "staged read-only",
            Skipped::Thick => "thick: its preallocation is kept",
            Skipped::Busy => "a stage or unstage of it is in progress; trimmed at its next turn",
            Skipped::Gone => "unstaged since the mount table was read",
        })
    }
}

/// What a trim of one volume came to.
#[derive(Debug)]
pub struct TrimReport {
    /// The volume.
    pub id: String,
    /// The mount trimmed through.
    pub mount_point: PathBuf,
    /// Trimmed, skipped with the reason, or failed.
    pub outcome: Result<Result<Trimmed, Skipped>, NodeError>,
}

impl Node {
    /// The pool's filesystem volumes mounted under this node's kubelet
    /// directory, from the kernel.
    pub fn filesystems(&self, pool: &Pool) -> Result<Vec<FsMount>, NodeError> {
        self.mounts(pool)
            .filesystems()
            .map_err(super::error::sys("read", "/proc/self/mountinfo"))
    }

    /// Trims every staged filesystem volume, or those of `only` when it is
    /// not empty, one after the other. Ids in `only` that are not staged
    /// here are not in the answer.
    pub fn trim(&self, pool: &Pool, only: &[String]) -> Result<Vec<TrimReport>, NodeError> {
        Ok(self
            .filesystems(pool)?
            .into_iter()
            .filter(|m| only.is_empty() || only.contains(&m.id))
            .map(|m| self.trim_one(pool, &m))
            .collect())
    }

    /// Trims one volume (see the module documentation for what it checks).
    pub fn trim_one(&self, pool: &Pool, m: &FsMount) -> TrimReport {
        let outcome = match self.gate.try_trim(&m.id) {
            None => Ok(Err(Skipped::Busy)),
            Some(_trimming) => self.trim_checked(pool, m),
        };
        match &outcome {
            Ok(Ok(t)) => {
                self.trims.trims.fetch_add(1, Ordering::Relaxed);
                self.trims
                    .discarded
                    .fetch_add(t.discarded, Ordering::Relaxed);
                self.trims
                    .reclaimed
                    .fetch_add(t.reclaimed(), Ordering::Relaxed);
                log::info!(
                    "volume {}: trimmed, {} bytes discarded, the image's allocation fell by {} bytes",
                    m.id,
                    t.discarded,
                    t.reclaimed()
                );
            }
            Ok(Err(why)) => log::debug!("volume {}: not trimmed: {why}", m.id),
            Err(e) => {
                self.trims.failures.fetch_add(1, Ordering::Relaxed);
                log::warn!(
                    "volume {}: trim: {}",
                    m.id,
                    crate::error_chain::message_chain(e)
                );
            }
        }
        TrimReport {
            id: m.id.clone(),
            mount_point: m.mount_point.clone(),
            outcome,
        }
    }

    /// The trim itself, with the gate held.
    fn trim_checked(
        &self,
        pool: &Pool,
        m: &FsMount,
    ) -> Result<Result<Trimmed, Skipped>, NodeError> {
        use super::error::sys;
        // Read again under the gate: an unstage (and a new stage) may have
        // finished since the table was read. Its device and mount are gone
        // then, and that is no failure of the trim.
        let image = pool.image_path(&m.id);
        let bound = self
            .bound(&image)
            .map_err(sys("find loop device of", &image))?;
        if bound.is_none_or(|b| b.device != m.device || b.detaching) {
            return Ok(Err(Skipped::Gone));
        }
        if self
            .kernel
            .read_only(m.device)
            .map_err(sys("read the state of", m.device.path()))?
        {
            return Ok(Err(Skipped::ReadOnly));
        }
        let v = pool.volume(&m.id)?;
        if v.thick {
            return Ok(Err(Skipped::Thick));
        }
        let root = match paths::open_dir(&self.kubelet_dir, &m.mount_point) {
            Ok(fd) => fd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Err(Skipped::Gone)),
            Err(e) => return Err(sys("open", &m.mount_point)(e)),
        };
        // Only through the very mount the table named: whatever else is at
        // that path now (the bare staging directory after an unstage, a new
        // stage's mount) is not trimmed.
        let on = self
            .kernel
            .mount_id(root.as_fd())
            .map_err(sys("stat", &m.mount_point))?;
        if on != m.mount_id {
            return Ok(Err(Skipped::Gone));
        }
        if self
            .kernel
            .fd_read_only(root.as_fd())
            .map_err(sys("statvfs", &m.mount_point))?
        {
            return Ok(Err(Skipped::ReadOnly));
        }
        let allocated = || -> Result<u64, NodeError> {
            Ok(std::fs::metadata(&image)
                .map_err(sys("stat", &image))?
                .blocks()
                * 512)
        };
        let allocated_before = allocated()?;
        let trim = || {
            self.kernel
                .trim(root.as_fd())
                .map_err(sys("trim (FITRIM)", &m.mount_point))
        };
        let mut discarded = trim()?;
        let allocated_after = if v.fs_type == Some(FsType::Xfs) {
            // xfs skips extents whose freeing its log has not finished
            // committing ("busy"), even right after the sync: seen as a
            // 512 MiB delete of which one trim gave back 130 MiB. A second
            // pass, once the first one's discards are through, finds them
            // free.
            self.settled_allocation(m.device, allocated)?;
            discarded = discarded.max(trim()?);
            self.settled_allocation(m.device, allocated)?
        } else {
            allocated()?
        };
        Ok(Ok(Trimmed {
            discarded,
            allocated_before,
            allocated_after,
        }))
    }

    /// Reads the image's allocation once an xfs trim's discards are
    /// through. xfs returns from FITRIM once it has sent its discards, not
    /// when they are done (ext4 and btrfs wait for theirs), and the loop
    /// device punches the image as it completes them. Nothing reports the
    /// end, so this waits until the device has nothing in flight and the
    /// allocation has held still for [`QUIET`], up to [`SETTLE`]: a pod
    /// writing all the while only makes the wait end at the bound, and the
    /// figure is what the image held then.
    fn settled_allocation(
        &self,
        dev: crate::sys::loopdev::LoopDevice,
        allocated: impl Fn() -> Result<u64, NodeError>,
    ) -> Result<u64, NodeError> {
        let start = std::time::Instant::now();
        let mut last = allocated()?;
        let mut still_since = start;
        while start.elapsed() < SETTLE {
            std::thread::sleep(Duration::from_millis(10));
            let now = allocated()?;
            let busy = self.kernel.in_flight(dev).is_ok_and(|n| n > 0);
            if now != last || busy {
                last = now;
                still_since = std::time::Instant::now();
            } else if still_since.elapsed() >= QUIET {
                break;
            }
        }
        Ok(last)
    }

    /// What trims have done so far.
    pub fn trim_totals(&self) -> &TrimTotals {
        &self.trims
    }
}

/// When the node trims each volume: once per `interval`, at a fixed offset
/// of its own. Intervals are counted from a Monday 00:00 UTC, so the weekly
/// default starts each week when util-linux's fstrim.timer
/// (`OnCalendar=weekly`) does; a volume's offset within `jitter` comes from
/// a hash of its id, like the timer's `RandomizedDelaySec` but the same on
/// every start, so a restarted plugin neither trims every volume at once
/// nor moves any volume's turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Schedule {
    interval: u64,
    jitter: u64,
}

/// 1970-01-05, the first Monday of the Unix epoch, in seconds.
const FIRST_MONDAY: u64 = 4 * 86_400;

impl Schedule {
    /// A schedule, or `None` for an interval of zero (trims on demand
    /// only). The jitter is at most the interval; both count in seconds.
    pub fn new(interval: Duration, jitter: Duration) -> Option<Schedule> {
        let interval = interval.as_secs();
        (interval > 0).then(|| Schedule {
            interval,
            jitter: jitter.as_secs().min(interval - 1),
        })
    }

    /// The interval.
    pub fn interval(&self) -> Duration {
        Duration::from_secs(self.interval)
    }

    /// The volume's offset into each interval.
    fn offset(&self, id: &str) -> u64 {
        if self.jitter == 0 {
            return 0;
        }
        // FNV-1a: stable across builds and versions, unlike std's hasher.
        let hash = id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
        });
        hash % (self.jitter + 1)
    }

    /// The last turn of `id` at or before `now` (seconds since the epoch).
    pub fn last_turn(&self, id: &str, now: u64) -> u64 {
        let phase = (FIRST_MONDAY + self.offset(id)) % self.interval;
        let since = now.saturating_sub(phase);
        phase + since / self.interval * self.interval
    }

    /// How often the trim thread looks at what is staged: often enough to
    /// meet each volume's turn within a few seconds (a minute at most), and
    /// never busier than four looks an interval.
    pub fn tick(&self) -> Duration {
        Duration::from_millis((self.interval * 250).clamp(250, 60_000))
    }
}

/// The periodic trims' memory: the turn each staged volume had last.
#[derive(Debug, Default)]
pub struct Turns {
    last: HashMap<String, u64>,
}

impl Turns {
    /// The volumes of `staged` whose turn came since they were last seen.
    /// A volume seen for the first time waits for its next turn: a new
    /// stage or a restarted plugin does not start with a trim.
    pub fn due<'a>(
        &mut self,
        schedule: &Schedule,
        staged: &'a [FsMount],
        now: SystemTime,
    ) -> Vec<&'a FsMount> {
        let now = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let mut due = Vec::new();
        for m in staged {
            let turn = schedule.last_turn(&m.id, now);
            match self.last.get(&m.id) {
                None => {
                    self.last.insert(m.id.clone(), turn);
                }
                Some(&seen) if turn > seen => due.push(m),
                Some(_) => {}
            }
        }
        self.last.retain(|id, _| staged.iter().any(|m| &m.id == id));
        due
    }

    /// Records that `id` had its turn at `now`, or leaves it due when it
    /// was busy.
    pub fn done(&mut self, schedule: &Schedule, id: &str, now: SystemTime) {
        let now = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        self.last.insert(id.to_owned(), schedule.last_turn(id, now));
    }
}

/// One pass of the periodic trims: lists what is staged, trims what is
/// due. Run by the server's trim thread every [`Schedule::tick`].
pub fn periodic_pass(node: &Node, pool: &Pool, schedule: &Schedule, turns: &mut Turns) {
    let staged = match node.filesystems(pool) {
        Ok(s) => s,
        Err(e) => {
            log::warn!("periodic trim: {}", crate::error_chain::message_chain(&e));
            return;
        }
    };
    let due: Vec<FsMount> = turns
        .due(schedule, &staged, SystemTime::now())
        .into_iter()
        .cloned()
        .collect();
    for m in due {
        let report = node.trim_one(pool, &m);
        // A busy volume stays due and is tried at the next tick.
        if !matches!(report.outcome, Ok(Err(Skipped::Busy))) {
            turns.done(schedule, &m.id, SystemTime::now());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::loopdev::LoopDevice;

    fn mount(id: &str) -> FsMount {
        FsMount {
            id: id.into(),
            device: LoopDevice { number: 0 },
            mount_point: PathBuf::from("/k/x"),
            mount_id: 1,
        }
    }

    #[test]
    fn the_weekly_default_turns_on_mondays_within_the_jitter() {
        let s = Schedule::new(Duration::from_secs(604_800), Duration::from_secs(6000)).unwrap();
        // 2026-11-23 was a Monday; 00:00 UTC is 1_795_392_000.
        let monday = 1_795_392_000;
        assert_eq!((monday - FIRST_MONDAY) % 604_800, 0);
        let mut offsets = HashSet::new();
        for i in 0..200 {
            let id = format!("pvc-{i}");
            let turn = s.last_turn(&id, monday + 7 * 86_400 - 1);
            assert!((monday..=monday + 6000).contains(&turn), "{id}: {turn}");
            // The same on every call: a restart does not move it.
            assert_eq!(turn, s.last_turn(&id, monday + 7 * 86_400 - 1));
            offsets.insert(turn - monday);
        }
        // Spread out, not all at one moment.
        assert!(offsets.len() > 150, "{}", offsets.len());
    }

    #[test]
    fn a_volume_is_due_once_per_interval_and_not_at_first_sight() {
        let s = Schedule::new(Duration::from_secs(10), Duration::ZERO).unwrap();
        let staged = [mount("a")];
        let mut turns = Turns::default();
        let at = |secs| UNIX_EPOCH + Duration::from_secs(secs);
        assert!(turns.due(&s, &staged, at(1_000_003)).is_empty());
        assert!(turns.due(&s, &staged, at(1_000_009)).is_empty());
        // 1_000_010 is a turn: 1_000_010 - 4 days is a multiple of 10.
        assert_eq!(turns.due(&s, &staged, at(1_000_011)).len(), 1);
        turns.done(&s, "a", at(1_000_011));
        assert!(turns.due(&s, &staged, at(1_000_019)).is_empty());
        // Busy last time (not `done`): still due at the next look.
        assert_eq!(turns.due(&s, &staged, at(1_000_021)).len(), 1);
        assert_eq!(turns.due(&s, &staged, at(1_000_022)).len(), 1);
        // Unstaged: forgotten, and first sight again when it comes back.
        assert!(turns.due(&s, &[], at(1_000_023)).is_empty());
        assert!(turns.due(&s, &staged, at(1_000_031)).is_empty());
    }

    #[test]
    fn zero_means_on_demand_only() {
        assert_eq!(Schedule::new(Duration::ZERO, Duration::from_secs(5)), None);
        let s = Schedule::new(Duration::from_secs(2), Duration::from_secs(60)).unwrap();
        assert_eq!(s.jitter, 1, "the jitter never exceeds the interval");
        assert_eq!(s.tick(), Duration::from_millis(500));
    }

    #[test]
    fn a_stage_waits_for_a_trim_and_a_trim_skips_a_stage() {
        let gate = std::sync::Arc::new(Gate::default());
        let changing = gate.change("a");
        assert!(gate.try_trim("a").is_none(), "a trim during a stage");
        assert!(gate.try_trim("b").is_some(), "other volumes are free");
        drop(changing);
        let trimming = gate.try_trim("a").unwrap();
        assert!(gate.try_trim("a").is_none(), "two trims of one volume");
        let (tx, rx) = std::sync::mpsc::channel();
        let g = std::sync::Arc::clone(&gate);
        let waiter = std::thread::spawn(move || {
            let _c = g.change("a");
            tx.send(()).unwrap();
        });
        assert!(
            rx.recv_timeout(Duration::from_millis(200)).is_err(),
            "the unstage went ahead during the trim"
        );
        drop(trimming);
        rx.recv_timeout(Duration::from_secs(5))
            .expect("the unstage goes ahead once the trim ends");
        waiter.join().unwrap();
    }
}
