//! What directory volumes have allocated, measured off the scrape.
//!
//! A directory volume's usage is the sum over its whole tree, which the pod
//! fills as it likes: 400,000 files cost seconds of system time and, walked
//! at every scrape, let a pod set how long a scrape takes and (with names
//! read whole) how much memory the process needs. So one background thread
//! walks the trees and the scrape reads what it last found, with its age:
//!
//! - **Which volumes**: those this process has a reason to report, from a
//!   list it reads again every [`DirUsageLimits::relist`] (a node plugin:
//!   the directory volumes bind-mounted under its kubelet directory; a
//!   controller: every directory volume of the pool). A volume new to the
//!   list is walked as soon as the thread is free; one that leaves it is
//!   forgotten.
//! - **How often**: a figure is walked again once it is
//!   [`DirUsageLimits::refresh`] old; after a walk that took `d` the thread
//!   rests `d` x [`DirUsageLimits::rest_factor`], so it takes at most a
//!   fraction of a core however large the trees.
//! - **How far**: each walk stops at [`DirUsageLimits::walk_time`] and at
//!   [`DirUsageLimits::max_depth`]; a figure cut short is kept as a lower
//!   bound and said to be partial.
//! - **How much memory**: the walk reads directories in fixed-size pieces
//!   and remembers a bounded number of multiply-linked files
//!   ([`filevol_core::pool::capacity::tree_allocated`]); the thread keeps one
//!   figure per listed volume.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use filevol_core::error_chain::message_chain;
use filevol_core::node::Node;
use filevol_core::pool::capacity::{tree_allocated, TreeUsage};
use filevol_core::pool::Pool;
use filevol_core::sys::untrusted::{WalkBounds, MAX_DEPTH};

/// The bounds the measuring thread keeps to.
#[derive(Debug, Clone, Copy)]
pub struct DirUsageLimits {
    /// How often the list of volumes to measure is read again.
    pub relist: Duration,
    /// How old a figure gets before its volume is walked again.
    pub refresh: Duration,
    /// The longest one walk may take.
    pub walk_time: Duration,
    /// The deepest level walked (the root's entries are level 1).
    pub max_depth: usize,
    /// After a walk, the thread rests this many times as long as the walk
    /// took: 3 keeps it to a quarter of a core.
    pub rest_factor: u32,
}

impl DirUsageLimits {
    /// The defaults, with figures refreshed every `refresh`.
    pub fn every(refresh: Duration) -> DirUsageLimits {
        DirUsageLimits {
            relist: Duration::from_secs(5),
            refresh,
            walk_time: Duration::from_secs(60),
            max_depth: MAX_DEPTH,
            rest_factor: 3,
        }
    }
}

/// The ids and data directories of the volumes to measure, or why they
/// cannot be listed now.
pub type Listing = Result<Vec<(String, PathBuf)>, String>;

/// The directory volumes whose usage a process reports (with their data
/// directories): with `every_volume` (a controller, or `--mode all`) every
/// one in the pool, else those `node` has mounted under its kubelet
/// directory (none without a node side). Read by the measuring thread, not
/// by a scrape.
pub fn to_measure(pool: &Pool, node: Option<&Node>, every_volume: bool) -> Listing {
    let ids = if every_volume {
        pool.dir_volume_ids().map_err(|e| message_chain(&e))?
    } else if let Some(node) = node {
        node.staged_dir_volumes(pool)
            .map_err(|e| format!("read the mount table: {e}"))?
    } else {
        Vec::new()
    };
    Ok(ids
        .into_iter()
        .map(|id| {
            let data = pool.data_path(&id);
            (id, data)
        })
        .collect())
}

/// What a scrape reports of the directory volumes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DirUsageSummary {
    /// Bytes allocated by the trees walked (partial figures included).
    pub bytes: u64,
    /// Volumes whose last walk was complete.
    pub measured: usize,
    /// Volumes whose last walk stopped at a bound: their figure is a lower
    /// bound.
    pub partial: usize,
    /// Volumes listed but not walked yet (counted as nothing).
    pub pending: usize,
    /// Age of the oldest figure in `bytes`, if there is one.
    pub oldest: Option<Duration>,
}

/// One listed volume.
#[derive(Debug)]
struct Tracked {
    data: PathBuf,
    /// The last walk's result and when it ended.
    figure: Option<(TreeUsage, Instant)>,
}

/// What the thread and the scrapes share.
#[derive(Debug, Default)]
struct Shared {
    volumes: Mutex<BTreeMap<String, Tracked>>,
    stop: AtomicBool,
}

/// The measuring thread; stopped and joined when dropped.
#[derive(Debug)]
pub struct DirUsage {
    shared: Arc<Shared>,
    wake: Option<crossbeam_channel::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl DirUsage {
    /// Starts the thread: it measures the volumes `list` names, within
    /// `limits`.
    pub fn start(
        limits: DirUsageLimits,
        list: impl FnMut() -> Listing + Send + 'static,
    ) -> std::io::Result<DirUsage> {
        let shared = Arc::new(Shared::default());
        let (wake, woken) = crossbeam_channel::bounded::<()>(0);
        let thread = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("filevol-dir-usage".into())
                .spawn(move || measure_loop(&shared, limits, list, &woken))?
        };
        Ok(DirUsage {
            shared,
            wake: Some(wake),
            thread: Some(thread),
        })
    }

    /// The figures as they stand: O(volumes listed), no filesystem call.
    pub fn summary(&self) -> DirUsageSummary {
        summarize(&self.shared.volumes.lock(), Instant::now())
    }
}

impl Drop for DirUsage {
    fn drop(&mut self) {
        // A walk in progress sees the flag at its next entry; a rest ends
        // when the channel disconnects.
        self.shared.stop.store(true, Ordering::Relaxed);
        drop(self.wake.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn summarize(volumes: &BTreeMap<String, Tracked>, now: Instant) -> DirUsageSummary {
    let mut s = DirUsageSummary::default();
    for tracked in volumes.values() {
        let Some((usage, at)) = &tracked.figure else {
            s.pending += 1;
            continue;
        };
        s.bytes = s.bytes.saturating_add(usage.bytes);
        if usage.walked.complete() {
            s.measured += 1;
        } else {
            s.partial += 1;
        }
        let age = now.saturating_duration_since(*at);
        s.oldest = Some(s.oldest.map_or(age, |o| o.max(age)));
    }
    s
}

/// Lists, walks what is due, rests; until the stop flag or the channel
/// says to end.
fn measure_loop(
    shared: &Shared,
    limits: DirUsageLimits,
    mut list: impl FnMut() -> Listing,
    woken: &crossbeam_channel::Receiver<()>,
) {
    let mut listed: Option<Instant> = None;
    while !shared.stop.load(Ordering::Relaxed) {
        if listed.is_none_or(|at| at.elapsed() >= limits.relist) {
            match list() {
                Ok(volumes) => track(shared, volumes),
                Err(e) => log::warn!("metrics: directory volumes to measure: {e}"),
            }
            listed = Some(Instant::now());
        }
        let rest = match due(shared, limits.refresh) {
            Some((id, data)) => {
                let took = measure(shared, limits, &id, data);
                took.saturating_mul(limits.rest_factor)
            }
            None => limits.relist,
        };
        if !rest.is_zero() {
            match woken.recv_timeout(rest) {
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
                // The owner is gone (or, never, a message): stop.
                _ => return,
            }
        }
    }
}

/// Makes the tracked volumes those of `listed`, keeping the figures of
/// those still there.
fn track(shared: &Shared, listed: Vec<(String, PathBuf)>) {
    let mut volumes = shared.volumes.lock();
    let mut next = BTreeMap::new();
    for (id, data) in listed {
        let figure = volumes.remove(&id).and_then(|t| t.figure);
        next.insert(id, Tracked { data, figure });
    }
    *volumes = next;
}

/// The volume to walk next: one never walked, else the one with the oldest
/// figure once it is `refresh` old.
fn due(shared: &Shared, refresh: Duration) -> Option<(String, PathBuf)> {
    let volumes = shared.volumes.lock();
    let mut oldest: Option<(&String, &Tracked, Instant)> = None;
    for (id, tracked) in volumes.iter() {
        match tracked.figure {
            None => return Some((id.clone(), tracked.data.clone())),
            Some((_, at)) if oldest.is_none_or(|(_, _, o)| at < o) => {
                oldest = Some((id, tracked, at));
            }
            Some(_) => {}
        }
    }
    oldest
        .filter(|(_, _, at)| at.elapsed() >= refresh)
        .map(|(id, tracked, _)| (id.clone(), tracked.data.clone()))
}

/// Walks one volume's tree and keeps the figure (unless the volume left
/// the list meanwhile); returns how long the walk took.
fn measure(shared: &Shared, limits: DirUsageLimits, id: &str, data: PathBuf) -> Duration {
    let started = Instant::now();
    let bounds = WalkBounds {
        max_depth: limits.max_depth,
        deadline: Some(started + limits.walk_time),
        stop: Some(&shared.stop),
    };
    let result = tree_allocated(&data, bounds);
    let took = started.elapsed();
    let usage = match result {
        Ok(usage) => usage,
        Err(e) => {
            // Counted as nothing rather than kept pending, so that a tree
            // that cannot be read is retried at the refresh, not at once.
            log::warn!("metrics: volume {id}: walk {}: {e}", data.display());
            TreeUsage::default()
        }
    };
    if shared.stop.load(Ordering::Relaxed) {
        return took;
    }
    if !usage.walked.complete() {
        log::debug!(
            "metrics: volume {id}: walk of {} stopped at its bounds after {took:?} ({} directories too deep): {} bytes is a lower bound",
            data.display(),
            usage.walked.not_entered,
            usage.bytes
        );
    }
    if let Some(tracked) = shared.volumes.lock().get_mut(id) {
        tracked.figure = Some((usage, Instant::now()));
    }
    took
}

#[cfg(test)]
mod tests {
    use super::*;

    const PATIENCE: Duration = Duration::from_secs(10);

    fn limits() -> DirUsageLimits {
        DirUsageLimits {
            relist: Duration::from_millis(20),
            refresh: Duration::from_millis(50),
            rest_factor: 0,
            ..DirUsageLimits::every(Duration::from_secs(1))
        }
    }

    /// Waits until `check` holds of the summary.
    fn wait_for(usage: &DirUsage, check: impl Fn(&DirUsageSummary) -> bool) -> DirUsageSummary {
        let started = Instant::now();
        loop {
            let s = usage.summary();
            if check(&s) {
                return s;
            }
            assert!(started.elapsed() < PATIENCE, "never reached: {s:?}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn du_bytes(path: &std::path::Path) -> u64 {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::symlink_metadata(path).unwrap();
        let mut total = m.blocks() * 512;
        if m.is_dir() {
            for e in std::fs::read_dir(path).unwrap() {
                total += du_bytes(&e.unwrap().path());
            }
        }
        total
    }

    #[test]
    fn listed_volumes_are_measured_in_the_background_and_forgotten_when_unlisted() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        std::fs::write(a.path().join("f"), vec![1u8; 256 << 10]).unwrap();
        std::fs::create_dir(b.path().join("d")).unwrap();
        std::fs::write(b.path().join("d/g"), vec![2u8; 128 << 10]).unwrap();
        let listed = Arc::new(Mutex::new(vec![
            ("a".to_owned(), a.path().to_owned()),
            ("b".to_owned(), b.path().to_owned()),
            ("gone".to_owned(), a.path().join("missing")),
        ]));
        let list = {
            let listed = Arc::clone(&listed);
            move || Ok(listed.lock().clone())
        };
        let usage = DirUsage::start(limits(), list).unwrap();
        let expected = du_bytes(a.path()) + du_bytes(b.path());
        let s = wait_for(&usage, |s| s.measured == 3 && s.bytes == expected);
        assert_eq!((s.partial, s.pending), (0, 0));
        assert!(s.oldest.is_some_and(|o| o < PATIENCE));

        // Figures follow the tree at the next refresh.
        std::fs::write(a.path().join("more"), vec![3u8; 512 << 10]).unwrap();
        let grown = du_bytes(a.path()) + du_bytes(b.path());
        wait_for(&usage, |s| s.bytes == grown);

        listed.lock().retain(|(id, _)| id == "b");
        let s = wait_for(&usage, |s| s.measured == 1);
        assert_eq!(s.bytes, du_bytes(b.path()));
    }

    #[test]
    fn a_walk_cut_short_is_a_partial_figure() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("1/2/3")).unwrap();
        let shallow = DirUsageLimits {
            max_depth: 1,
            ..limits()
        };
        let root = dir.path().to_owned();
        let usage = DirUsage::start(shallow, move || Ok(vec![("v".into(), root.clone())])).unwrap();
        let s = wait_for(&usage, |s| s.partial == 1);
        assert_eq!((s.measured, s.pending), (0, 0));
        // The root and "1", not what is below.
        assert!(s.bytes > 0 && s.bytes < du_bytes(dir.path()), "{s:?}");
    }

    #[test]
    fn drop_stops_a_resting_thread_at_once() {
        let slow = DirUsageLimits {
            relist: Duration::from_secs(3600),
            ..limits()
        };
        let listed = Arc::new(AtomicBool::new(false));
        let seen = Arc::clone(&listed);
        let usage = DirUsage::start(slow, move || {
            seen.store(true, Ordering::SeqCst);
            Ok(Vec::new())
        })
        .unwrap();
        let started = Instant::now();
        while !listed.load(Ordering::SeqCst) {
            assert!(started.elapsed() < PATIENCE);
            std::thread::sleep(Duration::from_millis(5));
        }
        let started = Instant::now();
        drop(usage);
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
    }
}
