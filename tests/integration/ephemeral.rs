//! CSI ephemeral inline volumes as the shipped split layout serves them: a
//! node plugin (`--mode node`, the DaemonSet) beside a controller
//! (`--mode controller`, the StatefulSet) on one pool. Off unless the node
//! plugin is started with `--ephemeral-inline` (a refusal makes nothing);
//! when on, bounded per volume and per node, the node's total read from
//! the pool and the kernel, so a restarted plugin still counts what it
//! made. Needs root (loop devices, mounts).

use std::path::{Path, PathBuf};
use std::time::Duration;

use filevol::ops::requests::{self as req, MIB};
use filevol::proto::csi;
use filevol::proto::csi::volume_capability::access_mode::Mode;
use filevol_core::volume::ids;
use filevol_kit::driver::{status, Driver};
use filevol_kit::files::digest;
use filevol_kit::leaks::{is_mounted, LeakGuard};
use filevol_kit::node_env::{node_opts, target_path};
use filevol_kit::scratch::{pool_on, LoopFs};
use filevol_kit::tempdir::TempDir;
use grpcio::RpcStatusCode;

use crate::BIN;

/// One node of the base layout: its node plugin (restartable, with the
/// flags it was given) and the controller, on one pool. Field order is
/// drop order: the processes stop, then the leak check runs, then the
/// directories and the pool's filesystem go.
struct Split {
    node: Driver,
    controller: Driver,
    _guard: LeakGuard,
    node_flags: Vec<String>,
    pool: PathBuf,
    kubelet: PathBuf,
    _kubelet_dir: TempDir,
    _fs: LoopFs,
}

impl Split {
    /// A 1 GiB xfs pool, its controller, and a node plugin with `flags`.
    fn new(flags: &[&str]) -> Split {
        let (fs, pool) = pool_on("xfs", 1024);
        let kubelet_dir = TempDir::new().unwrap();
        let kubelet = kubelet_dir.path().canonicalize().unwrap();
        let node_flags: Vec<String> = flags.iter().map(|&f| f.to_owned()).collect();
        Split {
            node: start_node(&pool, &kubelet, &node_flags),
            // As the base layout: the controller runs on the pool's node,
            // under its node id.
            controller: Driver::start_on(BIN, &pool, node_opts(&kubelet, "n1", "controller")),
            _guard: LeakGuard {
                kubelet: kubelet.clone(),
                pool: pool.clone(),
            },
            node_flags,
            pool,
            kubelet,
            _kubelet_dir: kubelet_dir,
            _fs: fs,
        }
    }

    /// The node plugin killed (SIGKILL: nothing it could tidy on the way
    /// out) and started again with the same flags. Its mounts stay.
    fn restart_node(&mut self) {
        self.node.signal(rustix::process::Signal::KILL);
        self.node.wait_exit(Duration::from_secs(10));
        self.node = start_node(&self.pool, &self.kubelet, &self.node_flags);
    }

    /// kubelet's NodePublishVolume of inline volume `id` of `size` for pod
    /// `id`.
    fn publish(&self, id: &str, size: &str) -> grpcio::Result<csi::NodePublishVolumeResponse> {
        self.node
            .node()
            .node_publish_volume(&inline(id, size, &self.target(id)))
    }

    fn unpublish(&self, id: &str) {
        self.node
            .node()
            .node_unpublish_volume(&req::unpublish(id, &self.target(id)))
            .unwrap();
    }

    fn target(&self, pod: &str) -> PathBuf {
        target_path(&self.kubelet, pod)
    }

    /// Where the node plugin stages inline volume `id`.
    fn staging(&self, id: &str) -> PathBuf {
        self.kubelet
            .join("plugins/filevol.csi.rs/ephemeral")
            .join(id)
    }

    /// The volumes the controller lists.
    fn volumes(&self) -> usize {
        self.controller
            .controller()
            .list_volumes(&req::list(0, ""))
            .unwrap()
            .entries
            .len()
    }

    fn available(&self) -> i64 {
        self.controller
            .controller()
            .get_capacity(&csi::GetCapacityRequest::new())
            .unwrap()
            .available_capacity
    }

    /// A refused publish of `id` made nothing: no volume in the pool, no
    /// staging directory, no mount, no target.
    fn assert_nothing_made(&self, id: &str) {
        let volume = self
            .pool
            .join("volumes")
            .join(ids::derive(ids::Kind::Volume, id));
        assert!(!volume.exists(), "{id}: volume {} made", volume.display());
        assert!(!self.staging(id).exists(), "{id}: staging directory made");
        assert!(!is_mounted(&self.target(id)), "{id}: target mounted");
        assert!(!self.target(id).exists(), "{id}: target made");
    }
}

fn start_node(pool: &Path, kubelet: &Path, flags: &[String]) -> Driver {
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    Driver::start_on(BIN, pool, node_opts(kubelet, "n1", "node").args(&flags))
}

/// NodePublishVolume as kubelet sends it for a pod's `csi:` volume.
fn inline(id: &str, size: &str, target: &Path) -> csi::NodePublishVolumeRequest {
    let mut p = csi::NodePublishVolumeRequest::new();
    p.volume_id = id.into();
    p.target_path = target.to_str().unwrap().into();
    p.volume_capability = Some(req::mount_cap(Mode::SINGLE_NODE_WRITER, "ext4")).into();
    for (k, v) in [
        ("csi.storage.k8s.io/ephemeral", "true"),
        ("csi.storage.k8s.io/pod.name", id),
        ("size", size),
    ] {
        p.volume_context.insert(k.into(), v.into());
    }
    p
}

fn write_data(path: &Path) -> u64 {
    std::fs::write(path, vec![7u8; 1 << 20]).unwrap();
    std::fs::File::open(path).unwrap().sync_all().unwrap();
    digest(path)
}

#[test]
#[ignore = "needs root"]
fn ephemeral_inline_volumes_are_refused_by_default() {
    let site = Split::new(&[]);
    let before = site.available();
    let st = status(site.publish("csi-pod-a", "64Mi"));
    assert_eq!(
        st.code(),
        RpcStatusCode::FAILED_PRECONDITION,
        "{}",
        st.message()
    );
    assert!(
        st.message().contains("--ephemeral-inline"),
        "{}",
        st.message()
    );
    site.assert_nothing_made("csi-pod-a");
    assert_eq!(site.volumes(), 0);
    assert_eq!(site.available(), before, "no capacity taken");
    // kubelet's unpublish of the pod that never started is answered.
    site.unpublish("csi-pod-a");

    // The volumes a controller makes are served as always.
    let id = site
        .controller
        .controller()
        .create_volume(&req::create_volume(
            "pvc-1",
            64 * MIB,
            req::mount_cap(Mode::SINGLE_NODE_WRITER, "ext4"),
        ))
        .unwrap()
        .volume
        .unwrap()
        .volume_id;
    let cap = req::mount_cap(Mode::SINGLE_NODE_WRITER, "ext4");
    let staging = filevol_kit::node_env::staging_path(&site.kubelet, &id);
    let target = site.target("pod-pvc");
    let n = site.node.node();
    n.node_stage_volume(&req::stage(&id, &staging, cap.clone()))
        .unwrap();
    n.node_publish_volume(&req::publish(&id, &staging, &target, cap, false))
        .unwrap();
    n.node_unpublish_volume(&req::unpublish(&id, &target))
        .unwrap();
    n.node_unstage_volume(&req::unstage(&id, &staging)).unwrap();
    site.controller
        .controller()
        .delete_volume(&req::delete(&id))
        .unwrap();
}

#[test]
#[ignore = "needs root"]
fn ephemeral_inline_volumes_are_bounded_per_volume_and_per_node_across_a_restart() {
    let mut site = Split::new(&[
        "--ephemeral-inline",
        "--ephemeral-max-size",
        "128Mi",
        "--ephemeral-max-per-node",
        "200Mi",
    ]);
    // Larger than one may be: OUT_OF_RANGE, nothing made.
    let st = status(site.publish("csi-big", "129Mi"));
    assert_eq!(st.code(), RpcStatusCode::OUT_OF_RANGE, "{}", st.message());
    assert!(
        st.message().contains("--ephemeral-max-size"),
        "{}",
        st.message()
    );
    site.assert_nothing_made("csi-big");

    // Two of 96 MiB fit in 200; a third of 16 does not: RESOURCE_EXHAUSTED,
    // nothing made.
    site.publish("csi-a", "96Mi").unwrap();
    let sum = write_data(&site.target("csi-a").join("data"));
    site.publish("csi-b", "96Mi").unwrap();
    assert_eq!(site.volumes(), 2);
    let st = status(site.publish("csi-c", "16Mi"));
    assert_eq!(
        st.code(),
        RpcStatusCode::RESOURCE_EXHAUSTED,
        "{}",
        st.message()
    );
    assert!(
        st.message().contains("--ephemeral-max-per-node"),
        "{}",
        st.message()
    );
    site.assert_nothing_made("csi-c");
    assert_eq!(site.volumes(), 2);
    // kubelet's retry of a publish that succeeded is not counted twice.
    site.publish("csi-a", "96Mi").unwrap();

    // A restarted node plugin counts what it made before.
    site.restart_node();
    let st = status(site.publish("csi-c", "16Mi"));
    assert_eq!(
        st.code(),
        RpcStatusCode::RESOURCE_EXHAUSTED,
        "{}",
        st.message()
    );
    site.assert_nothing_made("csi-c");
    assert_eq!(digest(&site.target("csi-a").join("data")), sum);

    // Room comes back with a pod that goes.
    site.unpublish("csi-b");
    assert_eq!(site.volumes(), 1);
    site.publish("csi-c", "16Mi").unwrap();
    for id in ["csi-a", "csi-c"] {
        site.unpublish(id);
    }
    assert_eq!(site.volumes(), 0);
    assert!(!site.staging("csi-a").exists());
}
