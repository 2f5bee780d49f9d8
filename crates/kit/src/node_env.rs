//! A node for one test: a pool on a loop-mounted filesystem of its own, a
//! kubelet directory, and a driver serving both. Dropping it unmounts
//! whatever is left under the kubelet directory and detaches every loop
//! device backed by the pool ([`super::leaks`]), even when the test fails,
//! failing a passing test that left anything; then it stops the driver and
//! removes the directories and the filesystem. Needs root.

use std::path::{Path, PathBuf};

use super::driver::{Driver, Opts};
use super::leaks::leak_check;
use super::scratch::{pool_on, LoopFs};
use super::tempdir::TempDir;
use filevol::ops::requests::{self as req, MIB};
use filevol::proto::csi::volume_capability::access_mode::Mode;

/// A pool on its own filesystem, a kubelet directory, and a driver.
#[derive(Debug)]
pub struct NodeEnv {
    /// The driver (mode `all`, node id `test-node`).
    pub d: Driver,
    /// The pool directory.
    pub pool: PathBuf,
    /// The kubelet directory (canonical: the driver compares paths).
    pub kubelet: PathBuf,
    _kubelet_dir: TempDir,
    _fs: LoopFs,
}

impl NodeEnv {
    /// A `mib` MiB pool of filesystem `pool_fs` served by `bin`.
    pub fn new(bin: impl AsRef<Path>, pool_fs: &str, mib: u64) -> NodeEnv {
        NodeEnv::with_args(bin, pool_fs, mib, &[])
    }

    /// The same, with extra `filevol serve` flags.
    pub fn with_args(bin: impl AsRef<Path>, pool_fs: &str, mib: u64, extra: &[&str]) -> NodeEnv {
        NodeEnv::with_opts(bin, pool_fs, mib, |o| o.args(extra))
    }

    /// The same, with the driver's options changed by `change` (faults, a
    /// wrapper, more flags).
    pub fn with_opts(
        bin: impl AsRef<Path>,
        pool_fs: &str,
        mib: u64,
        change: impl FnOnce(Opts) -> Opts,
    ) -> NodeEnv {
        let (fs, pool) = pool_on(pool_fs, mib);
        let kubelet_dir = TempDir::new().expect("make a temporary directory");
        let kubelet = kubelet_dir
            .path()
            .canonicalize()
            .expect("canonicalize the kubelet directory");
        let d = Driver::start_on(bin, &pool, change(node_opts(&kubelet, "test-node", "all")));
        NodeEnv {
            d,
            pool,
            kubelet,
            _kubelet_dir: kubelet_dir,
            _fs: fs,
        }
    }

    /// A staging path for volume `id`, made.
    pub fn staging(&self, id: &str) -> PathBuf {
        staging_path(&self.kubelet, id)
    }

    /// A target path for a pod, its parent made.
    pub fn target(&self, pod: &str) -> PathBuf {
        target_path(&self.kubelet, pod)
    }

    /// The image of volume `id`.
    pub fn image(&self, id: &str) -> PathBuf {
        super::files::image(&self.pool, id)
    }

    /// Creates a `mib` MiB ReadWriteOnce volume of filesystem `fs` through
    /// the controller; returns its id.
    pub fn create(&self, name: &str, mib: i64, fs: &str) -> String {
        let r = req::create_volume(
            name,
            mib * MIB,
            req::mount_cap(Mode::SINGLE_NODE_WRITER, fs),
        );
        self.d
            .controller()
            .create_volume(&r)
            .expect("CreateVolume")
            .volume
            .into_option()
            .expect("a volume in the answer")
            .volume_id
    }
}

impl Drop for NodeEnv {
    fn drop(&mut self) {
        leak_check(&self.kubelet, &self.pool);
    }
}

/// The flags of a node plugin (`mode` all or node) for node `node_id` on
/// `kubelet`: no reserve, overcommit 10.
pub fn node_opts(kubelet: &Path, node_id: &str, mode: &str) -> Opts {
    Opts::default().args(&[
        "--reserve",
        "0",
        "--overcommit",
        "10",
        "--node-id",
        node_id,
        "--mode",
        mode,
        "--kubelet-dir",
        &kubelet.to_string_lossy(),
    ])
}

/// Where kubelet stages volume `id` under `kubelet`, made.
pub fn staging_path(kubelet: &Path, id: &str) -> PathBuf {
    let p = kubelet
        .join("plugins/kubernetes.io/csi/filevol.csi.rs")
        .join(id)
        .join("globalmount");
    std::fs::create_dir_all(&p).expect("make the staging path");
    p
}

/// Where kubelet publishes a pod's volume under `kubelet`, its parent made
/// (the driver makes the target itself).
pub fn target_path(kubelet: &Path, pod: &str) -> PathBuf {
    let p = kubelet
        .join("pods")
        .join(pod)
        .join("volumes/kubernetes.io~csi/pv/mount");
    std::fs::create_dir_all(p.parent().expect("a target has a parent"))
        .expect("make the target's parent");
    p
}
