//! One writer, whatever dies: the fences of single-writer volumes outlive
//! the node plugins that took them, because a loop device holds its
//! image's lock itself (`sys::loopdev::attach`). Each test runs the layout
//! deploy/ ships on one pool: node plugins (`--mode node`, started first,
//! each with its kubelet directory) and a controller (`--mode
//! controller`), as separate processes; it kills node plugins while their
//! volumes are staged and a writer writes, and another node tries.

use std::path::{Path, PathBuf};
use std::time::Duration;

use filevol::ops::requests::{self as req, MIB};
use filevol::proto::csi;
use filevol::proto::csi::volume_capability::access_mode::Mode;
use filevol::proto::grpc::NodeClient;
use filevol_core::sys::lock::{self, LockKind};
use filevol_kit::driver::{status, Driver, Opts};
use filevol_kit::leaks::{is_mounted, loop_of, LeakGuard};
use filevol_kit::node_env::{staging_path, target_path};
use filevol_kit::scratch::{pool_on, LoopFs};
use filevol_kit::writer::{fsck_clean, verify, Writer};
use grpcio::RpcStatusCode;

use crate::BIN;

/// One pool, its processes, and guards. Field order is drop order:
/// processes, then the leak checks, then the pool's filesystem.
struct Site {
    procs: Vec<Option<Driver>>,
    guards: Vec<LeakGuard>,
    pool: PathBuf,
    kubelets: tempfile::TempDir,
    _fs: LoopFs,
}

impl Site {
    fn new() -> Site {
        let (fs, pool) = pool_on("xfs", 2048);
        Site {
            procs: Vec::new(),
            guards: Vec::new(),
            pool,
            kubelets: tempfile::tempdir().unwrap(),
            _fs: fs,
        }
    }

    fn kubelet(&self, node: &str) -> PathBuf {
        let k = self.kubelets.path().join(node);
        std::fs::create_dir_all(&k).unwrap();
        k.canonicalize().unwrap()
    }

    fn args(&self, mode: &str, node: &str) -> Opts {
        Opts::default().args(&[
            "--mode",
            mode,
            "--node-id",
            node,
            "--kubelet-dir",
            self.kubelet(node).to_str().unwrap(),
            // The shared-pool layout, on one host: its locks reach every
            // process that uses them, here.
            "--topology=",
            "--allow-host-local-locks",
            "--reserve",
            "0",
            "--log-level",
            "debug",
            "--fence-check-interval",
            "1s",
            "--metrics-address",
            "127.0.0.1:0",
        ])
    }

    /// Starts `bin` as `mode` for `node`; returns its index.
    fn start_bin(&mut self, bin: &Path, mode: &str, node: &str) -> usize {
        if mode == "node" {
            let kubelet = self.kubelet(node);
            if !self.guards.iter().any(|g| g.kubelet == kubelet) {
                self.guards.push(LeakGuard {
                    kubelet,
                    pool: self.pool.clone(),
                });
            }
        }
        let d = Driver::start_on(bin, &self.pool, self.args(mode, node));
        self.procs.push(Some(d));
        self.procs.len() - 1
    }

    fn start(&mut self, mode: &str, node: &str) -> usize {
        self.start_bin(Path::new(BIN), mode, node)
    }

    /// Starts a node plugin for `node` in a mount namespace of its own, as
    /// a second node on one kernel runs (kind-style clusters, the two-node
    /// e2e): the mounts under `hidden`'s kubelet directory (another
    /// node's) are taken out of its copy of the mount table, so it sees
    /// that node's loop devices but not where they are mounted. Into
    /// process slot `slot`, or a new one.
    fn start_beside(&mut self, node: &str, hidden: &str, slot: Option<usize>) -> usize {
        let mut opts = self.args("node", node);
        opts.wrapper = [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "--",
            "sh",
            "-c",
            r#"findmnt -rn -o TARGET | grep -F "$HIDE/" | sort -r | while read -r m; do umount -l "$m"; done; exec "$@""#,
            "sh",
        ]
        .map(str::to_owned)
        .to_vec();
        opts.env = vec![(
            "HIDE".to_owned(),
            self.kubelet(hidden).display().to_string(),
        )];
        let d = Driver::start_on(BIN, &self.pool, opts);
        match slot {
            Some(i) => {
                self.procs[i] = Some(d);
                i
            }
            None => {
                self.procs.push(Some(d));
                self.procs.len() - 1
            }
        }
    }

    /// Starts `bin` again as process `i`, in its place.
    fn restart(&mut self, i: usize, bin: &Path, node: &str) {
        let d = Driver::start_on(bin, &self.pool, self.args("node", node));
        self.procs[i] = Some(d);
    }

    fn d(&self, i: usize) -> &Driver {
        self.procs[i].as_ref().expect("a running process")
    }

    /// SIGKILLs process `i`, as the OOM killer does.
    fn kill(&mut self, i: usize) {
        let d = self.procs[i].as_mut().expect("a running process");
        d.signal(rustix::process::Signal::KILL);
        d.wait_exit(Duration::from_secs(10));
    }

    fn image(&self, id: &str) -> PathBuf {
        filevol_kit::files::image(&self.pool, id)
    }
}

fn rwo() -> csi::VolumeCapability {
    req::mount_cap(Mode::SINGLE_NODE_WRITER, "ext4")
}

fn create(site: &Site, c: usize, name: &str) -> String {
    let mut r = req::create(name, 256 * MIB);
    r.volume_capabilities[0] = rwo();
    site.d(c)
        .controller()
        .create_volume(&r)
        .unwrap()
        .volume
        .unwrap()
        .volume_id
}

/// NodeStage and NodePublish of a ReadWriteOnce ext4 volume; a retry of
/// both converges on what is there.
fn stage_and_publish(n: &NodeClient, id: &str, staging: &Path, target: &Path) {
    n.node_stage_volume(&req::stage(id, staging, rwo()))
        .unwrap();
    n.node_publish_volume(&req::publish(id, staging, target, rwo(), false))
        .unwrap();
}

/// ControllerPublish of volume `id` to `node` (through controller process
/// `c`), then NodeStage and NodePublish on its plugin (process `n`) for a
/// pod "pod-a": the volume in use there. Returns the staging and target
/// paths.
fn in_use_on(site: &Site, c: usize, n: usize, node: &str, id: &str) -> (PathBuf, PathBuf) {
    site.d(c)
        .controller()
        .controller_publish_volume(&req::controller_publish(id, node, rwo(), false))
        .unwrap();
    let staging = staging_path(&site.kubelet(node), id);
    let target = target_path(&site.kubelet(node), "pod-a");
    stage_and_publish(&site.d(n).node(), id, &staging, &target);
    (staging, target)
}

/// Whether anyone holds a lock on `image` that a writer's stage would
/// conflict with, asked from this test process.
fn image_locked(image: &Path) -> bool {
    let f = std::fs::File::open(image).unwrap();
    !lock::try_lock(&f, LockKind::Shared).unwrap()
}

fn assert_refused(what: &str, result: grpcio::Result<impl std::fmt::Debug>, says: &str) {
    let st = status(result);
    assert_eq!(
        st.code(),
        RpcStatusCode::FAILED_PRECONDITION,
        "{what}: {}",
        st.message()
    );
    assert!(st.message().contains(says), "{what}: {}", st.message());
}

/// Case 1 of issue 26: node-a's plugin dies with the volume staged and a
/// pod writing; the attach-detach controller force-detaches it and
/// attaches it to node-b. node-b's stage is refused for as long as
/// node-a's device exists; the restarted node-a plugin adopts its device
/// and serves the volume on.
#[test]
#[ignore = "needs root"]
fn a_dead_plugin_s_device_keeps_its_fence_against_another_node() {
    let mut site = Site::new();
    let a = site.start("node", "node-a");
    let b = site.start("node", "node-b");
    let c = site.start("controller", "controller-0");
    let id = create(&site, c, "rwo");
    let ctl = site.d(c).controller();
    let (sa, ta) = in_use_on(&site, c, a, "node-a", &id);
    std::fs::write(ta.join("before"), b"written on node-a").unwrap();

    site.kill(a);
    // The process is gone; the device and its lock are not.
    let image = site.image(&id);
    assert!(loop_of(&image).is_some());
    assert!(image_locked(&image), "the device holds the image's lock");
    // Force-detach after 6 minutes, then the attach to node-b.
    ctl.controller_unpublish_volume(&req::controller_unpublish(&id, "node-a"))
        .unwrap();
    ctl.controller_publish_volume(&req::controller_publish(&id, "node-b", rwo(), false))
        .unwrap();
    let sb = staging_path(&site.kubelet("node-b"), &id);
    let nb = site.d(b).node();
    assert_refused(
        "node-b's stage beside node-a's device",
        nb.node_stage_volume(&req::stage(&id, &sb, rwo())),
        "already attached",
    );
    assert!(!is_mounted(&sb));
    // node-a's plugin comes back and adopts its device: a retried stage and
    // publish converge, and the volume is healthy.
    site.restart(a, Path::new(BIN), "node-a");
    assert!(site.d(a).log().contains("adopted"), "{}", site.d(a).log());
    let na = site.d(a).node();
    stage_and_publish(&na, &id, &sa, &ta);
    let stats = na
        .node_get_volume_stats(&req::volume_stats(&id, &ta))
        .unwrap();
    assert!(
        !stats.volume_condition.abnormal,
        "{}",
        stats.volume_condition.message
    );
    assert_eq!(
        std::fs::read(ta.join("before")).unwrap(),
        b"written on node-a"
    );
    na.node_unpublish_volume(&req::unpublish(&id, &ta)).unwrap();
    na.node_unstage_volume(&req::unstage(&id, &sa)).unwrap();
    assert!(!image_locked(&image), "the unstage let go of the fence");
    fsck_clean(&image);
    // On another host, node-a's device would be invisible to node-b: its
    // lock is what refuses then. The same lock, held here by this process
    // as a device elsewhere holds it, refuses a stage that finds no
    // device.
    let elsewhere = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&image)
        .unwrap();
    assert!(lock::try_lock(&elsewhere, LockKind::Exclusive).unwrap());
    let nb = site.d(b).node();
    assert_refused(
        "node-b's stage while another host's device holds the lock",
        nb.node_stage_volume(&req::stage(&id, &sb, rwo())),
        "locked by another writer's fence",
    );
    assert_eq!(loop_of(&image), None, "nothing attached beside it");
    drop(elsewhere);
    // Now node-b may have it.
    nb.node_stage_volume(&req::stage(&id, &sb, rwo())).unwrap();
    nb.node_unstage_volume(&req::unstage(&id, &sb)).unwrap();
}

/// Two nodes on one kernel: node-b's plugin, in a mount namespace of its
/// own, sees node-a's loop device of a staged volume but none of its
/// mounts. It never takes that device for one a dead stage left: its
/// stage is refused saying the device is another node's, a restart does
/// not adopt it, the device is never set to detach, and node-a's pod
/// writes on. Once node-a unstages, node-b stages.
#[test]
#[ignore = "needs root"]
fn another_node_s_device_on_one_kernel_is_never_detached_or_adopted() {
    let mut site = Site::new();
    let a = site.start("node", "node-a");
    let b = site.start_beside("node-b", "node-a", None);
    let c = site.start("controller", "controller-0");
    let id = create(&site, c, "rwo");
    let ctl = site.d(c).controller();
    let (sa, ta) = in_use_on(&site, c, a, "node-a", &id);
    let image = site.image(&id);
    let device = loop_of(&image).expect("node-a's device");
    let autoclear = format!("/sys/block/{device}/loop/autoclear");
    // node-a stops answering (its plugin gone, its pod writing on), and
    // the attach-detach controller hands the volume to node-b after the
    // out-of-service taint.
    site.kill(a);
    ctl.controller_unpublish_volume(&req::controller_unpublish(&id, "node-a"))
        .unwrap();
    ctl.controller_publish_volume(&req::controller_publish(&id, "node-b", rwo(), false))
        .unwrap();
    let sb = staging_path(&site.kubelet("node-b"), &id);
    for round in ["node-b", "node-b restarted"] {
        let nb = site.d(b).node();
        assert_refused(
            &format!("{round}'s stage beside node-a's device"),
            nb.node_stage_volume(&req::stage(&id, &sb, rwo())),
            "for another node",
        );
        assert_eq!(loop_of(&image).as_deref(), Some(device.as_str()));
        assert_eq!(
            std::fs::read_to_string(&autoclear).unwrap().trim(),
            "0",
            "{round} set node-a's device to detach"
        );
        if round == "node-b" {
            site.kill(b);
            site.start_beside("node-b", "node-a", Some(b));
            let log = site.d(b).log();
            assert!(log.contains("attached for another node"), "{log}");
        }
    }
    std::fs::write(ta.join("after"), b"node-a writes on").unwrap();
    assert_eq!(
        std::fs::read(ta.join("after")).unwrap(),
        b"node-a writes on"
    );
    // node-a comes back, adopts its device and unstages.
    site.restart(a, Path::new(BIN), "node-a");
    let na = site.d(a).node();
    na.node_unpublish_volume(&req::unpublish(&id, &ta)).unwrap();
    na.node_unstage_volume(&req::unstage(&id, &sa)).unwrap();
    fsck_clean(&image);
    let nb = site.d(b).node();
    nb.node_stage_volume(&req::stage(&id, &sb, rwo())).unwrap();
    nb.node_unstage_volume(&req::unstage(&id, &sb)).unwrap();
    assert_eq!(loop_of(&image), None);
}

/// Case 2 of issue 26: a volume staged on a node whose plugin died is
/// never deleted; once the restarted plugin unstages it, it is.
#[test]
#[ignore = "needs root"]
fn a_volume_staged_by_a_dead_plugin_is_not_deleted() {
    let mut site = Site::new();
    let b = site.start("node", "node-b");
    let c = site.start("controller", "controller-0");
    let id = create(&site, c, "staged");
    let sb = staging_path(&site.kubelet("node-b"), &id);
    site.d(b)
        .node()
        .node_stage_volume(&req::stage(&id, &sb, rwo()))
        .unwrap();
    site.kill(b);
    assert_refused(
        "DeleteVolume of a volume staged by a dead plugin",
        site.d(c).controller().delete_volume(&req::delete(&id)),
        "still staged",
    );
    assert!(site.image(&id).exists());
    assert!(is_mounted(&sb));
    site.restart(b, Path::new(BIN), "node-b");
    site.d(b)
        .node()
        .node_unstage_volume(&req::unstage(&id, &sb))
        .unwrap();
    assert_eq!(loop_of(&site.image(&id)), None);
    site.d(c)
        .controller()
        .delete_volume(&req::delete(&id))
        .unwrap();
    assert!(!site.image(&id).exists());

    // A directory volume: its stage's fence is a loop device of its fence
    // file, which outlives the plugin as the image's device does.
    let mut r = req::create_with("shared", 64 * MIB, &[("layout", "dir")]);
    let cap = req::mount_cap(Mode::MULTI_NODE_MULTI_WRITER, "");
    r.volume_capabilities[0] = cap.clone();
    let dir = site
        .d(c)
        .controller()
        .create_volume(&r)
        .unwrap()
        .volume
        .unwrap()
        .volume_id;
    let fence = site.pool.join("volumes").join(&dir).join("fence");
    let sd = staging_path(&site.kubelet("node-b"), &dir);
    site.d(b)
        .node()
        .node_stage_volume(&req::stage(&dir, &sd, cap.clone()))
        .unwrap();
    assert!(loop_of(&fence).is_some(), "the stage's fence device");
    site.kill(b);
    assert_refused(
        "DeleteVolume of a directory volume staged by a dead plugin",
        site.d(c).controller().delete_volume(&req::delete(&dir)),
        "still staged",
    );
    assert!(site.pool.join("volumes").join(&dir).join("data").is_dir());
    site.restart(b, Path::new(BIN), "node-b");
    assert!(
        site.d(b).log().contains("fence device"),
        "{}",
        site.d(b).log()
    );
    site.d(b)
        .node()
        .node_unstage_volume(&req::unstage(&dir, &sd))
        .unwrap();
    assert_eq!(loop_of(&fence), None, "the unstage detached it");
    site.d(c)
        .controller()
        .delete_volume(&req::delete(&dir))
        .unwrap();
}

/// Case 5 of issue 26: node calls act only on what is provably the named
/// volume's. Nothing of another volume, a tmpfs or a file is unmounted or
/// removed.
#[test]
#[ignore = "needs root"]
fn node_calls_never_act_on_what_is_not_the_volume_s() {
    let mut site = Site::new();
    let n = site.start("node", "node-a");
    let c = site.start("controller", "controller-0");
    let a = create(&site, c, "a");
    let b = create(&site, c, "b");
    let k = site.kubelet("node-a");
    let sb = staging_path(&k, &b);
    let node = site.d(n).node();
    node.node_stage_volume(&req::stage(&b, &sb, rwo())).unwrap();
    std::fs::write(sb.join("b-file"), b"B's").unwrap();
    // A at B's staging path.
    let st = status(node.node_stage_volume(&req::stage(&a, &sb, rwo())));
    assert_eq!(st.code(), RpcStatusCode::ALREADY_EXISTS, "{}", st.message());
    assert_eq!(loop_of(&site.image(&a)), None, "nothing attached for A");
    // Publishing A from B's stage would hand a pod B's files.
    let ta = target_path(&k, "pod-a");
    assert_refused(
        "NodePublish(A) from B's staging path",
        node.node_publish_volume(&req::publish(&a, &sb, &ta, rwo(), false)),
        "not staged",
    );
    assert!(!ta.exists() || !is_mounted(&ta));
    // Unpublishing A where a secret's tmpfs is mounted, or a file lies.
    let secret = k.join("pods/pod-s/volumes/kubernetes.io~secret/token");
    std::fs::create_dir_all(&secret).unwrap();
    let ok = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "tmpfs"])
        .arg(&secret)
        .status()
        .unwrap();
    assert!(ok.success());
    std::fs::write(secret.join("token"), b"s3cr3t").unwrap();
    let file = k.join("pods/pod-f/volumes/kubernetes.io~csi/x/mount");
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    std::fs::write(&file, b"pod data").unwrap();
    let refused = [
        node.node_unpublish_volume(&req::unpublish(&a, &secret)),
        node.node_unpublish_volume(&req::unpublish(&a, &file)),
        node.node_unpublish_volume(&req::unpublish(&a, &sb)),
    ];
    let unmounted = std::process::Command::new("umount")
        .arg(&secret)
        .status()
        .unwrap();
    for r in refused {
        assert_refused("NodeUnpublish of what is not A's", r, "not volume");
    }
    assert!(unmounted.success(), "the tmpfs was still mounted");
    assert_eq!(std::fs::read(&file).unwrap(), b"pod data");
    assert_eq!(std::fs::read(sb.join("b-file")).unwrap(), b"B's");
    // Nor is B's stage A's to unstage.
    assert_refused(
        "NodeUnstage(A) at B's staging path",
        node.node_unstage_volume(&req::unstage(&a, &sb)),
        "not volume",
    );
    assert!(is_mounted(&sb));
    node.node_unstage_volume(&req::unstage(&b, &sb)).unwrap();
}

/// "The plugin dies under load": a writer inside a staged ext4 volume
/// keeps writing while its node plugin is SIGKILLed and restarted 20
/// times, then replaced by another binary (an upgrade: a copy of the
/// binary at a new path); in every gap a second node plugin tries to stage
/// the volume and is refused. At the end every acknowledged block reads
/// back and fsck finds the filesystem clean.
#[test]
#[ignore = "needs root"]
fn the_plugin_dies_under_load_and_no_second_writer_gets_in() {
    let mut site = Site::new();
    let a = site.start("node", "node-a");
    let b = site.start("node", "node-b");
    let c = site.start("controller", "controller-0");
    let id = create(&site, c, "busy");
    let (sa, ta) = (
        staging_path(&site.kubelet("node-a"), &id),
        target_path(&site.kubelet("node-a"), "pod-a"),
    );
    let na = site.d(a).node();
    stage_and_publish(&na, &id, &sa, &ta);
    let data = ta.join("data");
    let writer = Writer::start(&data);
    let sb = staging_path(&site.kubelet("node-b"), &id);
    let image = site.image(&id);

    // The next release, as a new file: a DaemonSet update replaces the
    // binary the plugin runs from.
    let next_dir = tempfile::tempdir().unwrap();
    let next = next_dir.path().join("filevol-next");
    std::fs::copy(BIN, &next).unwrap();

    for round in 0..=20 {
        site.kill(a);
        assert!(
            image_locked(&image),
            "round {round}: the fence went with the plugin"
        );
        assert_refused(
            &format!("round {round}: node-b's stage in the gap"),
            site.d(b)
                .node()
                .node_stage_volume(&req::stage(&id, &sb, rwo())),
            "already attached",
        );
        assert!(!is_mounted(&sb), "round {round}");
        let bin = if round == 20 {
            next.as_path()
        } else {
            Path::new(BIN)
        };
        site.restart(a, bin, "node-a");
        // kubelet's retries converge on what is there.
        let na = site.d(a).node();
        stage_and_publish(&na, &id, &sa, &ta);
    }
    let acked = writer.finish();
    let checked = verify(&data, &acked);
    eprintln!(
        "{} acknowledged writes, {checked} blocks read back as acknowledged",
        acked.writes
    );
    assert!(checked > 20, "the writer barely wrote: {checked} blocks");
    let na = site.d(a).node();
    let stats = na
        .node_get_volume_stats(&req::volume_stats(&id, &ta))
        .unwrap();
    assert!(
        !stats.volume_condition.abnormal,
        "{}",
        stats.volume_condition.message
    );
    let metrics = filevol_kit::driver::scrape(&site.d(a).metrics_address());
    assert!(
        metrics.contains("filevol_fences{holder=\"device\"} 1"),
        "{metrics}"
    );
    na.node_unpublish_volume(&req::unpublish(&id, &ta)).unwrap();
    na.node_unstage_volume(&req::unstage(&id, &sa)).unwrap();
    fsck_clean(&image);
}
