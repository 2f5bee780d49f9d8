//! What a test left on the machine, found and undone: mounts under its
//! kubelet directory and loop devices backed by files in its pool. A test
//! that mounts or attaches holds a [`LeakGuard`] (a `node_env::NodeEnv`
//! holds one for it), so the clean-up runs even when the test panics, and a
//! test that did not panic fails if there was anything to clean.

use std::path::{Path, PathBuf};

use filevol_core::sys::{loopdev, mount, mountinfo};

/// Unmounts whatever is left under `kubelet` (deepest first) and detaches
/// every loop device backed by a file under `pool`, then, unless the test
/// is already failing, asserts there was nothing to clean.
pub fn leak_check(kubelet: &Path, pool: &Path) {
    // Best effort: whatever was mounted is reported below, unmounted or not.
    let leaked_mounts: Vec<PathBuf> = unmount_under(kubelet)
        .unwrap_or_default()
        .into_iter()
        .map(|(p, _)| p)
        .collect();
    let leaked_loops = detach_loops_under(pool);
    if !std::thread::panicking() {
        assert!(
            leaked_mounts.is_empty(),
            "test left mounts: {leaked_mounts:?}"
        );
        assert!(
            leaked_loops.is_empty(),
            "test left loop devices: {leaked_loops:?}"
        );
    }
}

/// Unmounts, lazily, every mount at or below `dir`, deepest first: the
/// mount points, each once (one lazy unmount of a path takes every mount
/// stacked on it), with how each unmount went.
pub fn unmount_under(dir: &Path) -> std::io::Result<Vec<(PathBuf, std::io::Result<()>)>> {
    let mut points: Vec<PathBuf> = mountinfo::read()?
        .into_iter()
        .map(|e| e.mount_point)
        .filter(|p| p.starts_with(dir))
        .collect();
    points.sort();
    points.dedup();
    points.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
    Ok(points
        .into_iter()
        .map(|p| {
            let done = mount::unmount_lazily(&p);
            (p, done)
        })
        .collect())
}

/// Runs [`leak_check`] when dropped: declare it after the pool's
/// [`super::scratch::LoopFs`] so it runs first, even when the test panics.
#[derive(Debug)]
pub struct LeakGuard {
    /// The kubelet directory of the test.
    pub kubelet: PathBuf,
    /// The pool of the test.
    pub pool: PathBuf,
}

impl Drop for LeakGuard {
    fn drop(&mut self) {
        leak_check(&self.kubelet, &self.pool);
    }
}

/// Detaches the loop devices whose backing file lies under `dir` (by the
/// path the kernel recorded at attach, so an image deleted since still
/// counts); returns them (`/dev/loopN`).
pub fn detach_loops_under(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/sys/block") else {
        return found;
    };
    for e in entries.flatten() {
        let Some(number) = e
            .file_name()
            .to_str()
            .and_then(|n| n.strip_prefix("loop"))
            .and_then(|n| n.parse().ok())
        else {
            continue;
        };
        let backing = e.path().join("loop/backing_file");
        if let Ok(file) = std::fs::read_to_string(&backing) {
            if Path::new(file.trim()).starts_with(dir) {
                let device = loopdev::LoopDevice { number };
                // Best effort: a device that will not detach is still
                // reported as leaked.
                let _ = device.detach();
                found.push(device.path().display().to_string());
            }
        }
    }
    found
}

/// The loop device (`loopN`) backed by `image`, including one whose detach
/// is pending, if any.
pub fn loop_of(image: &Path) -> Option<String> {
    loopdev::find_bound(image)
        .ok()
        .flatten()
        .map(|d| format!("loop{}", d.number))
}

/// Whether something is mounted at `p`.
pub fn is_mounted(p: &Path) -> bool {
    mountinfo::read()
        .expect("read /proc/self/mountinfo")
        .iter()
        .any(|e| e.mount_point == p)
}
