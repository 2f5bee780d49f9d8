//! The node's logic against the recording fake kernel (`node::fake`): real
//! pool records and fences on a temporary directory, real staging and
//! target directories under a temporary kubelet directory, fake loop
//! devices and mounts. No root needed; the root tests in
//! `tests/integration/` run the same paths on the real kernel.
//!
//! What they pin down: a retry changes nothing, a step that fails gives
//! back everything taken before it, a rollback that fails keeps both
//! errors and the fence, and a device still held open is never attached a
//! second time.

use std::collections::BTreeMap;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustix::mount::MountFlags;

use super::fake::Recording;
use super::*;
use crate::pool::capability::Capability;
use crate::pool::{CapacityRange, PoolOptions, VolumeSpec};
use crate::sys::loopdev::LoopDevice;

/// The node id of the plugin under test.
const NODE: &str = "node-a";
use crate::volume::ids;
use crate::volume::meta::{FsType, Layout, VolumeMeta};

const MIB: u64 = 1 << 20;

/// A pool, a kubelet directory and a node acting on a fake kernel.
struct Bed {
    _dir: tempfile::TempDir,
    pool: Pool,
    kernel: Arc<Recording>,
    node: Node,
}

impl Bed {
    fn new() -> Bed {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("pool")).unwrap();
        std::fs::create_dir(dir.path().join("kubelet")).unwrap();
        let pool = Pool::open(
            &dir.path().join("pool"),
            PoolOptions {
                reserve_bytes: 0,
                overcommit: 1000.0,
                topology: BTreeMap::new(),
                janitor: false,
            },
        )
        .unwrap();
        let kernel = Arc::new(Recording::new());
        let node = Node::with_kernel(
            &dir.path().join("kubelet"),
            NODE,
            &pool,
            true,
            kernel.clone(),
        )
        .unwrap();
        Bed {
            _dir: dir,
            pool,
            kernel,
            node,
        }
    }

    /// The node plugin restarted on the same host (the same kernel): the
    /// old process, and its fences, are gone first.
    fn restart(self) -> Bed {
        let Bed {
            _dir,
            pool,
            kernel,
            node,
        } = self;
        let kubelet = node.kubelet_dir().to_owned();
        let ephemeral = node.ephemeral;
        drop(node);
        let node = Node::with_kernel(&kubelet, NODE, &pool, true, kernel.clone())
            .unwrap()
            .with_ephemeral(ephemeral);
        Bed {
            _dir,
            pool,
            kernel,
            node,
        }
    }

    /// This bed's node making ephemeral inline volumes within `limits`.
    fn ephemeral(self, limits: ephemeral::Limits) -> Bed {
        Bed {
            node: self.node.with_ephemeral(Some(limits)),
            ..self
        }
    }

    fn volume(&self, name: &str, layout: Layout, access: AccessType) -> VolumeMeta {
        self.volume_with(name, layout, access, &[])
    }

    /// A volume with `mkfs_options`.
    fn volume_with(
        &self,
        name: &str,
        layout: Layout,
        access: AccessType,
        mkfs_options: &[&str],
    ) -> VolumeMeta {
        self.pool
            .create_volume(&VolumeSpec {
                name: name.into(),
                layout,
                capacity: CapacityRange {
                    required: 16 * MIB,
                    limit: 0,
                },
                access,
                fs_type: (layout == Layout::Image && access == AccessType::Mount)
                    .then_some(FsType::Ext4),
                thick: false,
                mkfs_options: mkfs_options.iter().map(|&o| o.to_owned()).collect(),
                parameters: BTreeMap::new(),
                mutable_parameters: BTreeMap::new(),
                source: None,
                modes: vec![AccessMode::SingleNodeWriter],
            })
            .unwrap()
    }

    /// A clone of `v` (which must not be staged: the fake's pool cannot
    /// reflink), for read-only stages.
    fn clone_of(&self, v: &VolumeMeta, name: &str) -> VolumeMeta {
        self.pool
            .create_volume(&VolumeSpec {
                name: name.into(),
                layout: v.layout,
                capacity: CapacityRange {
                    required: v.capacity_bytes,
                    limit: 0,
                },
                access: v.access,
                fs_type: v.fs_type,
                thick: false,
                mkfs_options: vec![],
                parameters: BTreeMap::new(),
                mutable_parameters: BTreeMap::new(),
                source: Some(crate::volume::meta::Source::Volume(v.id.clone())),
                modes: vec![ROX],
            })
            .unwrap()
    }

    /// A thick ext4 volume of 16 MiB.
    fn thick(&self, name: &str) -> VolumeMeta {
        let v = self.volume(&format!("{name}-thin"), Layout::Image, AccessType::Mount);
        self.pool
            .create_volume(&VolumeSpec {
                name: name.into(),
                thick: true,
                ..spec_of(&v)
            })
            .unwrap()
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.node.kubelet_dir().join(rel)
    }

    fn stage(&self, v: &VolumeMeta, staging: &Path, mode: AccessMode) -> Result<(), NodeError> {
        // The service hands the node a fresh record at every call.
        let v = self.pool.volume(&v.id).unwrap();
        self.node
            .stage(&self.pool, &v, staging, &request(&v, mode, false))
    }

    fn publish(
        &self,
        v: &VolumeMeta,
        staging: &Path,
        target: &Path,
        mode: AccessMode,
        readonly: bool,
    ) -> Result<(), NodeError> {
        let v = self.pool.volume(&v.id).unwrap();
        let req = request(&v, mode, readonly);
        self.node.publish(&self.pool, &v, staging, target, &req)
    }

    fn fence(&self, v: &VolumeMeta) -> Option<LockKind> {
        self.node.fences.held(&v.id)
    }
}

/// A spec that makes a volume like `v` (its name, mount, ext4).
fn spec_of(v: &VolumeMeta) -> VolumeSpec {
    VolumeSpec {
        name: v.name.clone(),
        layout: v.layout,
        capacity: CapacityRange {
            required: v.capacity_bytes,
            limit: 0,
        },
        access: v.access,
        fs_type: v.fs_type,
        thick: v.thick,
        mkfs_options: v.mkfs_options.clone(),
        parameters: BTreeMap::new(),
        mutable_parameters: BTreeMap::new(),
        source: None,
        modes: vec![AccessMode::SingleNodeWriter],
    }
}

fn request(v: &VolumeMeta, mode: AccessMode, readonly: bool) -> Request {
    Request {
        volume_id: v.id.clone(),
        access: v.access,
        mode,
        mount_flags: vec![],
        mount_group: None,
        readonly,
    }
}

/// The error and its causes, as the gRPC status message gives them.
fn chain(e: &NodeError) -> String {
    crate::error_chain::message_chain(e)
}

const RWO: AccessMode = AccessMode::SingleNodeWriter;
const ROX: AccessMode = AccessMode::MultiNodeReaderOnly;

#[test]
fn a_blank_image_is_formatted_once_and_a_retried_stage_changes_nothing() {
    let bed = Bed::new();
    let v = bed.volume("a", Layout::Image, AccessType::Mount);
    let staging = bed.path("staging/a");
    bed.stage(&v, &staging, RWO).unwrap();
    // Formatted before it is attached: no device ever shows a half-made
    // filesystem. The first volume of its size made the template that it
    // is a copy of, with a UUID of its own. What it just made needs no
    // probe.
    assert_eq!(
        ops(&bed),
        [
            "mkfs",
            "renew_uuid",
            "attach",
            "drop_cached_blocks",
            "mount"
        ]
    );
    assert_eq!(bed.fence(&v), Some(LockKind::Exclusive));
    assert_eq!(bed.pool.volume(&v.id).unwrap().written, Some(true));
    // The mkfs ran on a scratch file that replaced the image.
    assert!(!bed
        .pool
        .image_path(&v.id)
        .with_file_name(".image.mkfs")
        .exists());

    // kubelet's retry, and a restarted plugin's: nothing is done again.
    bed.stage(&v, &staging, RWO).unwrap();
    let bed = bed.restart();
    assert_eq!(
        bed.fence(&v),
        Some(LockKind::Exclusive),
        "recovery re-took it"
    );
    bed.stage(&v, &staging, RWO).unwrap();
    assert_eq!(bed.kernel.count("mkfs"), 1);
    assert_eq!(bed.kernel.count("attach"), 1);
    assert_eq!(bed.kernel.count("mount"), 1);
    assert_eq!(bed.kernel.mounted(), vec![staging]);
}

#[test]
fn a_stage_whose_mount_fails_gives_back_the_device_and_the_fence() {
    let bed = Bed::new();
    let v = bed.volume("a", Layout::Image, AccessType::Mount);
    let staging = bed.path("staging/a");
    bed.kernel.fail_next("mount", ErrorKind::InvalidInput);
    let e = bed.stage(&v, &staging, RWO).unwrap_err();
    assert!(
        chain(&e).contains("injected failure of mount"),
        "{}",
        chain(&e)
    );
    assert!(bed.kernel.attached_images().is_empty(), "detached");
    assert!(bed.kernel.mounted().is_empty());
    assert_eq!(bed.fence(&v), None, "fence released");
    // Another process can take the fence now.
    assert!(bed
        .pool
        .fence_volume(&v.id, LockKind::Exclusive)
        .unwrap()
        .is_some());

    // The retry starts clean; the filesystem made before is kept.
    bed.stage(&v, &staging, RWO).unwrap();
    assert_eq!(bed.kernel.count("mkfs"), 1);
    assert_eq!(bed.kernel.count("attach"), 2);
    assert_eq!(bed.kernel.count("detach"), 1);
}

#[test]
fn a_rollback_that_fails_keeps_both_errors_and_the_fence() {
    let bed = Bed::new();
    let v = bed.volume("a", Layout::Image, AccessType::Mount);
    let staging = bed.path("staging/a");
    bed.kernel.fail_next("mount", ErrorKind::InvalidInput);
    bed.kernel.fail_next("detach", ErrorKind::ResourceBusy);
    let e = bed.stage(&v, &staging, RWO).unwrap_err();
    let text = chain(&e);
    assert!(matches!(e, NodeError::RollbackFailed { .. }), "{text}");
    assert!(text.contains("injected failure of mount"), "{text}");
    assert!(
        text.contains("detach /dev/loop900: injected failure of detach"),
        "{text}"
    );
    assert!(text.contains("stays held"), "{text}");
    // The device still backs the image: the fence keeps every other
    // node plugin from attaching it beside this one.
    assert_eq!(
        bed.kernel.attached_images(),
        vec![bed.pool.image_path(&v.id)]
    );
    assert_eq!(bed.fence(&v), Some(LockKind::Exclusive));
    assert!(bed
        .pool
        .fence_volume(&v.id, LockKind::Shared)
        .unwrap()
        .is_none());

    // An unstage (kubelet's, for an uncertain stage) cleans up and lets go.
    bed.node.unstage(&bed.pool, &v.id, &staging).unwrap();
    assert!(bed.kernel.attached_images().is_empty());
    assert_eq!(bed.fence(&v), None);
}

/// The kernel calls made so far, by name.
fn ops(bed: &Bed) -> Vec<String> {
    bed.kernel
        .calls()
        .iter()
        .map(|c| c.split(' ').next().unwrap().to_owned())
        .collect()
}

#[test]
fn volumes_of_one_size_are_copies_of_one_template_each_with_its_uuid() {
    let bed = Bed::new();
    let (a, b) = (
        bed.volume("a", Layout::Image, AccessType::Mount),
        bed.volume("b", Layout::Image, AccessType::Mount),
    );
    bed.stage(&a, &bed.path("staging/a"), RWO).unwrap();
    bed.stage(&b, &bed.path("staging/b"), RWO).unwrap();
    assert_eq!(bed.kernel.count("mkfs"), 1, "one template");
    assert_eq!(bed.kernel.count("renew_uuid"), 2);
    let (ia, ib) = (
        std::fs::read(bed.pool.image_path(&a.id)).unwrap(),
        std::fs::read(bed.pool.image_path(&b.id)).unwrap(),
    );
    assert_eq!(ia.len() as u64, 16 * MIB);
    assert_ne!(ia, ib, "each its own UUID");
    // The template is no volume.
    let templates: Vec<_> = std::fs::read_dir(bed.pool.root().join("templates"))
        .unwrap()
        .collect();
    assert_eq!(templates.len(), 1);
    assert_eq!(bed.pool.list_volumes(None, 0).unwrap().0.len(), 2);

    // Options of its own: a mkfs of its own, no template.
    let c = bed.volume_with("c", Layout::Image, AccessType::Mount, &["-m", "0"]);
    bed.stage(&c, &bed.path("staging/c"), RWO).unwrap();
    assert_eq!(bed.kernel.count("mkfs"), 2);
    assert_eq!(bed.kernel.count("renew_uuid"), 2);
}

/// A thick image gets its filesystem in its own blocks (the same inode,
/// no scratch file): from the template, written into it; a format cut
/// short (the record's `formatting` set, the image holding what it wrote)
/// is made again by a read-write stage, over its signatures, and refused
/// by a read-only one.
#[test]
fn a_thick_image_is_formatted_in_place_and_a_cut_short_format_is_made_again() {
    use std::os::unix::fs::MetadataExt;
    let bed = Bed::new();
    let a = bed.thick("a");
    let image = bed.pool.image_path(&a.id);
    let inode = std::fs::metadata(&image).unwrap().ino();
    bed.stage(&a, &bed.path("staging/a"), RWO).unwrap();
    // The template is made (its mkfs), written into the image and renewed.
    assert_eq!(
        ops(&bed),
        [
            "mkfs",
            "renew_uuid",
            "attach",
            "drop_cached_blocks",
            "mount"
        ]
    );
    assert_eq!(std::fs::metadata(&image).unwrap().ino(), inode, "in place");
    assert!(!image.with_file_name(".image.mkfs").exists());
    let after = bed.pool.volume(&a.id).unwrap();
    assert_eq!((after.written, after.formatting), (Some(true), false));

    // Cut short: the intent recorded, half a filesystem in the image.
    let b = bed.thick("b");
    let lock = bed.pool.lock_volume(&b.id).unwrap();
    bed.pool.mark_formatting(&b.id, &lock).unwrap();
    drop(lock);
    let image = bed.pool.image_path(&b.id);
    std::fs::write(&image, b"half a filesystem").unwrap();
    std::fs::File::options()
        .write(true)
        .open(&image)
        .unwrap()
        .set_len(b.capacity_bytes)
        .unwrap();
    let e = bed.stage(&b, &bed.path("staging/b-ro"), ROX).unwrap_err();
    assert!(chain(&e).contains("making was cut short"), "{}", chain(&e));
    let before = bed.kernel.calls().len();
    bed.stage(&b, &bed.path("staging/b"), RWO).unwrap();
    let calls = bed.kernel.calls()[before..].to_vec();
    // A mkfs of the image itself: no template over what is there, no
    // probe asked.
    assert!(
        calls[0].starts_with("mkfs") && calls[0].ends_with(&format!("{}/image", b.id)),
        "{calls:?}"
    );
    assert!(!calls.iter().any(|c| c.starts_with("probe")), "{calls:?}");
    let after = bed.pool.volume(&b.id).unwrap();
    assert_eq!((after.written, after.formatting), (Some(true), false));
    // Old records, without the field, read as not formatting.
    let text = std::fs::read_to_string(
        bed.pool
            .root()
            .join("volumes")
            .join(&b.id)
            .join("meta.json"),
    )
    .unwrap();
    assert!(!text.contains("formatting"), "{text}");
}

#[test]
fn a_template_that_fails_or_is_damaged_gives_way_to_a_mkfs_of_its_own() {
    let bed = Bed::new();
    let a = bed.volume("a", Layout::Image, AccessType::Mount);
    // The template's mkfs fails (an older mkfs that lacks its options): the
    // volume's own mkfs runs.
    bed.kernel.fail_next("mkfs", ErrorKind::Other);
    bed.stage(&a, &bed.path("staging/a"), RWO).unwrap();
    assert_eq!(ops(&bed)[..3], ["mkfs", "mkfs", "attach"]);
    assert_eq!(bed.pool.volume(&a.id).unwrap().written, Some(true));

    // A damaged template is removed, and the volume gets its own mkfs.
    let b = bed.volume("b", Layout::Image, AccessType::Mount);
    bed.stage(&b, &bed.path("staging/b"), RWO).unwrap();
    let dir = bed.pool.root().join("templates");
    let template = std::fs::read_dir(&dir)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    std::fs::write(&template, b"not a filesystem").unwrap();
    let c = bed.volume("c", Layout::Image, AccessType::Mount);
    let before = bed.kernel.count("mkfs");
    bed.stage(&c, &bed.path("staging/c"), RWO).unwrap();
    assert_eq!(bed.kernel.count("mkfs"), before + 1);
    assert!(!template.exists(), "the damaged template was removed");
    let image = std::fs::read(bed.pool.image_path(&c.id)).unwrap();
    assert!(image.starts_with(b"FAKE-FILESYSTEM ext4"));
    assert!(!bed
        .pool
        .image_path(&c.id)
        .with_file_name(".image.mkfs")
        .exists());
}

#[test]
fn a_failed_mkfs_leaves_the_image_blank_and_nothing_taken() {
    let bed = Bed::new();
    // mkfsOptions: no template, so the one mkfs is the volume's.
    let v = bed.volume_with("a", Layout::Image, AccessType::Mount, &["-m", "0"]);
    let staging = bed.path("staging/a");
    bed.kernel.fail_next("mkfs", ErrorKind::Other);
    bed.stage(&v, &staging, RWO).unwrap_err();
    let image = bed.pool.image_path(&v.id);
    assert!(
        !image.with_file_name(".image.mkfs").exists(),
        "scratch removed"
    );
    assert!(std::fs::read(&image).unwrap().iter().all(|&b| b == 0));
    assert_eq!(bed.pool.volume(&v.id).unwrap().written, Some(false));
    assert_eq!(bed.kernel.count("attach"), 0);
    assert_eq!(bed.fence(&v), None);
}

#[test]
fn a_read_only_stage_of_a_blank_volume_formats_nothing() {
    let bed = Bed::new();
    let v = bed.volume("a", Layout::Image, AccessType::Mount);
    let staging = bed.path("staging/a");
    let e = bed.stage(&v, &staging, ROX).unwrap_err();
    assert!(matches!(e, NodeError::WillNotFormat { .. }), "{e}");
    assert_eq!(bed.kernel.count("mkfs"), 0);
    assert!(bed.kernel.attached_images().is_empty());
    assert_eq!(bed.fence(&v), None);
}

#[test]
fn unstage_is_idempotent_and_refused_while_published() {
    let bed = Bed::new();
    let v = bed.volume("a", Layout::Image, AccessType::Mount);
    let (staging, target) = (bed.path("staging/a"), bed.path("pods/p/a"));
    bed.stage(&v, &staging, RWO).unwrap();
    bed.publish(&v, &staging, &target, RWO, false).unwrap();
    let e = bed.node.unstage(&bed.pool, &v.id, &staging).unwrap_err();
    assert!(matches!(e, NodeError::StillPublished { .. }), "{e}");
    assert_eq!(bed.fence(&v), Some(LockKind::Exclusive));

    bed.node.unpublish(&bed.pool, &v.id, &target).unwrap();
    assert!(!target.exists());
    bed.node.unpublish(&bed.pool, &v.id, &target).unwrap();
    bed.node.unstage(&bed.pool, &v.id, &staging).unwrap();
    bed.node.unstage(&bed.pool, &v.id, &staging).unwrap();
    assert!(bed.kernel.mounted().is_empty());
    assert!(bed.kernel.attached_images().is_empty());
    assert_eq!(bed.fence(&v), None);
    assert_eq!(bed.kernel.count("detach"), 1);
}

#[test]
fn a_device_held_open_is_waited_for_never_attached_beside() {
    let bed = Bed::new();
    let v = bed.volume("a", Layout::Image, AccessType::Mount);
    let staging = bed.path("staging/a");
    bed.stage(&v, &staging, RWO).unwrap();
    bed.kernel.hold_open(LoopDevice { number: 900 });
    let e = bed.node.unstage(&bed.pool, &v.id, &staging).unwrap_err();
    assert!(matches!(e, NodeError::DetachPending { .. }), "{e}");
    // Still writing the image until its last close: the fence stays.
    assert_eq!(bed.fence(&v), Some(LockKind::Exclusive));
    let e = bed.stage(&v, &staging, RWO).unwrap_err();
    assert!(matches!(e, NodeError::DetachPending { .. }), "{e}");
    assert_eq!(bed.kernel.count("attach"), 1, "no second device");
}

#[test]
fn publish_is_idempotent_and_a_failed_remount_unbinds() {
    let bed = Bed::new();
    let v = bed.volume("a", Layout::Image, AccessType::Mount);
    let (staging, target) = (bed.path("staging/a"), bed.path("pods/p/a"));
    let e = bed.publish(&v, &staging, &target, RWO, true).unwrap_err();
    assert!(matches!(e, NodeError::NotStaged { .. }), "{e}");
    bed.stage(&v, &staging, RWO).unwrap();

    bed.kernel
        .fail_next("remount_read_only", ErrorKind::PermissionDenied);
    bed.publish(&v, &staging, &target, RWO, true).unwrap_err();
    assert_eq!(bed.kernel.mounted(), vec![staging.clone()], "bind undone");

    bed.publish(&v, &staging, &target, RWO, true).unwrap();
    bed.publish(&v, &staging, &target, RWO, true).unwrap();
    assert_eq!(bed.kernel.count("bind"), 2, "the retry binds nothing");
    let e = bed.publish(&v, &staging, &target, RWO, false).unwrap_err();
    assert!(matches!(e, NodeError::Occupied { .. }), "{e}");
}

#[test]
fn a_single_writer_volume_is_published_once_wherever_the_target() {
    let bed = Bed::new();
    let v = bed.volume("a", Layout::Image, AccessType::Mount);
    let w = bed.volume("b", Layout::Image, AccessType::Mount);
    let sswo = AccessMode::SingleNodeSingleWriter;
    let (sa, sb) = (bed.path("staging/a"), bed.path("staging/b"));
    bed.stage(&v, &sa, sswo).unwrap();
    bed.stage(&w, &sb, sswo).unwrap();
    bed.publish(&v, &sa, &bed.path("elsewhere/a"), sswo, false)
        .unwrap();
    // Another volume does not count.
    bed.publish(&w, &sb, &bed.path("pods/p/b"), sswo, false)
        .unwrap();
    let e = bed
        .publish(&v, &sa, &bed.path("pods/q/a"), sswo, false)
        .unwrap_err();
    assert!(matches!(e, NodeError::SingleWriter { .. }), "{e}");
    assert!(!bed.kernel.mounted().contains(&bed.path("pods/q/a")));
}

#[test]
fn a_block_stage_binds_the_device_node_and_records_the_volume_written() {
    let bed = Bed::new();
    let v = bed.volume("a", Layout::Image, AccessType::Block);
    let staging = bed.path("staging/a");
    std::fs::create_dir_all(&staging).unwrap();
    bed.stage(&v, &staging, RWO).unwrap();
    assert_eq!(bed.kernel.count("mkfs"), 0);
    assert_eq!(bed.pool.volume(&v.id).unwrap().written, Some(true));
    assert_eq!(bed.kernel.mounted(), vec![staging.join("device")]);
    let target = bed.path("pods/p/dev");
    bed.publish(&v, &staging, &target, RWO, false).unwrap();
    assert!(target.is_file());

    bed.node.unpublish(&bed.pool, &v.id, &target).unwrap();
    bed.node.unstage(&bed.pool, &v.id, &staging).unwrap();
    assert!(!staging.join("device").exists());
    assert!(staging.is_dir(), "the staging directory is kubelet's");
    assert!(bed.kernel.attached_images().is_empty());
}

/// The gauges count by what is mounted: each volume with mounts under the
/// kubelet directory is staged once, its other mounts are publishes,
/// wherever kubelet puts them (block publishes are not under `pods/`).
#[test]
fn mount_counts_follow_what_each_volume_holds_not_where_it_is() {
    let bed = Bed::new();
    let a = bed.volume("a", Layout::Image, AccessType::Mount);
    let b = bed.volume("b", Layout::Image, AccessType::Mount);
    let c = bed.volume("c", Layout::Image, AccessType::Block);
    let d = bed.volume("d", Layout::Dir, AccessType::Mount);
    let (mut stagings, mut targets) = (Vec::new(), Vec::new());
    for (v, publishes) in [
        (&a, vec!["pods/p1/a", "pods/p2/a", "pods/p3/a"]),
        (&b, vec!["pods/p1/b", "pods/p4/b"]),
        (
            &c,
            vec![
                "pods/p5/volumeDevices/c",
                "plugins/kubernetes.io/csi/volumeDevices/publish/pv-c/pod-6",
            ],
        ),
        (&d, vec!["pods/p1/d", "pods/p7/d"]),
    ] {
        let staging = bed.path(&format!(
            "plugins/kubernetes.io/csi/filevol.csi.rs/{}/globalmount",
            v.name
        ));
        std::fs::create_dir_all(&staging).unwrap();
        bed.stage(v, &staging, RWO).unwrap();
        for t in publishes {
            bed.publish(v, &staging, &bed.path(t), RWO, false).unwrap();
            targets.push((v.id.clone(), bed.path(t)));
        }
        stagings.push((v.id.clone(), staging));
    }
    assert_eq!(bed.node.mount_counts(&bed.pool).unwrap(), (4, 9));
    // A mount of something else under the kubelet directory is no volume.
    let other = bed.path("pods/p9/other");
    std::fs::create_dir_all(&other).unwrap();
    let source = std::fs::File::open(bed.path("pods")).unwrap();
    let target = std::fs::File::open(&other).unwrap();
    bed.kernel.bind(source.as_fd(), target.as_fd()).unwrap();
    assert_eq!(bed.node.mount_counts(&bed.pool).unwrap(), (4, 9));
    bed.kernel.unmount(&other).unwrap();

    bed.node
        .unpublish(&bed.pool, &a.id, &bed.path("pods/p1/a"))
        .unwrap();
    bed.node
        .unpublish(
            &bed.pool,
            &c.id,
            &bed.path("plugins/kubernetes.io/csi/volumeDevices/publish/pv-c/pod-6"),
        )
        .unwrap();
    assert_eq!(bed.node.mount_counts(&bed.pool).unwrap(), (4, 7));
    for (id, t) in &targets {
        bed.node.unpublish(&bed.pool, id, t).unwrap();
    }
    assert_eq!(bed.node.mount_counts(&bed.pool).unwrap(), (4, 0));
    for (id, staging) in &stagings {
        bed.node.unstage(&bed.pool, id, staging).unwrap();
    }
    assert_eq!(bed.node.mount_counts(&bed.pool).unwrap(), (0, 0));
}

#[test]
fn a_dir_stage_that_fails_its_remount_unbinds_and_releases_the_fence() {
    let bed = Bed::new();
    let v = bed.volume("d", Layout::Dir, AccessType::Mount);
    let staging = bed.path("staging/d");
    bed.kernel
        .fail_next("remount_read_only", ErrorKind::PermissionDenied);
    bed.stage(&v, &staging, ROX).unwrap_err();
    assert!(bed.kernel.mounted().is_empty());
    assert_eq!(bed.fence(&v), None);

    bed.stage(&v, &staging, ROX).unwrap();
    assert_eq!(bed.fence(&v), Some(LockKind::Shared));
    let bed = bed.restart();
    assert_eq!(
        bed.fence(&v),
        Some(LockKind::Shared),
        "recovered from the mount table"
    );
}

#[test]
fn a_writer_stage_after_a_reader_upgrades_the_fence() {
    let bed = Bed::new();
    let v = bed.volume("a", Layout::Image, AccessType::Mount);
    bed.stage(&v, &bed.path("staging/w"), RWO).unwrap();
    bed.node
        .unstage(&bed.pool, &v.id, &bed.path("staging/w"))
        .unwrap();
    bed.stage(&v, &bed.path("staging/r"), ROX).unwrap();
    assert_eq!(bed.fence(&v), Some(LockKind::Shared));
    // Another process holding it shared blocks the upgrade.
    let other = bed
        .pool
        .fence_volume(&v.id, LockKind::Shared)
        .unwrap()
        .unwrap();
    let e = bed.stage(&v, &bed.path("staging/w"), RWO).unwrap_err();
    assert!(matches!(e, NodeError::Fenced { .. }), "{e}");
    drop(other);
}

#[test]
fn expansion_answers_with_the_device_size_not_the_request() {
    let bed = Bed::new();
    let v = bed.volume("a", Layout::Image, AccessType::Mount);
    let staging = bed.path("staging/a");
    bed.stage(&v, &staging, RWO).unwrap();
    let v = bed.pool.volume(&v.id).unwrap();
    let range = |required| CapacityRange { required, limit: 0 };
    let e = bed
        .node
        .expand(&bed.pool, &v, &staging, range(32 * MIB))
        .unwrap_err();
    assert!(
        matches!(e, NodeError::NotGrown { size, .. } if size == 16 * MIB),
        "{e}"
    );
    assert_eq!(bed.kernel.count("grow"), 0);
    assert_eq!(
        bed.node
            .expand(&bed.pool, &v, &staging, range(16 * MIB))
            .unwrap(),
        16 * MIB
    );
    assert_eq!(bed.kernel.count("refresh_capacity"), 2);
    assert_eq!(bed.kernel.count("grow"), 1);
}

// ---- ephemeral inline volumes ----

fn ephemeral_request(size: &str) -> (VolumeSpec, Request) {
    let cap = Capability::plain(AccessType::Mount, "ext4", RWO);
    let context = std::collections::HashMap::from([
        (ephemeral::EPHEMERAL_KEY.to_owned(), "true".to_owned()),
        ("csi.storage.k8s.io/pod.name".to_owned(), "p".to_owned()),
        (ephemeral::SIZE_KEY.to_owned(), size.to_owned()),
    ]);
    assert!(ephemeral::requested(&context));
    let spec = ephemeral::spec("csi-eph", &cap, &context).unwrap();
    let req = Request {
        volume_id: "csi-eph".into(),
        access: AccessType::Mount,
        mode: RWO,
        mount_flags: vec![],
        mount_group: None,
        readonly: false,
    };
    (spec, req)
}

#[test]
fn ephemeral_attributes_are_checked_before_anything_is_made() {
    let (spec, _) = ephemeral_request("64Mi");
    assert_eq!(spec.capacity.required, 64 * MIB);
    assert_eq!(spec.fs_type, Some(FsType::Ext4));
    let mut cap = Capability::plain(AccessType::Mount, "", RWO);
    let none = std::collections::HashMap::new();
    assert_eq!(
        ephemeral::spec("v", &cap, &none).unwrap().capacity.required,
        ephemeral::DEFAULT_SIZE
    );
    let bad = std::collections::HashMap::from([("color".to_owned(), "blue".to_owned())]);
    let e = ephemeral::spec("v", &cap, &bad).unwrap_err();
    assert_eq!(e.field, "volume_context");
    assert!(e.reason.contains("\"color\""), "{e}");
    let bad = std::collections::HashMap::from([("size".to_owned(), "lots".to_owned())]);
    assert_eq!(
        ephemeral::spec("v", &cap, &bad).unwrap_err().field,
        "volume_context"
    );
    cap.access = AccessType::Block;
    assert_eq!(
        ephemeral::spec("v", &cap, &none).unwrap_err().field,
        "volume_capability"
    );
    cap.access = AccessType::Mount;
    cap.fs_type = "ntfs".into();
    assert_eq!(
        ephemeral::spec("v", &cap, &none).unwrap_err().field,
        "volume_capability"
    );
}

#[test]
fn an_ephemeral_volume_lives_and_goes_with_its_publish() {
    let bed = Bed::new().ephemeral(ephemeral::Limits::default());
    let (spec, req) = ephemeral_request("16Mi");
    let staging = ephemeral::staging(bed.node.kubelet_dir(), "filevol.test", "csi-eph");
    let target = bed.path("pods/p/volumes/eph");
    bed.node
        .publish_ephemeral(&bed.pool, &spec, &staging, &target, &req)
        .unwrap();
    // kubelet's retry changes nothing.
    bed.node
        .publish_ephemeral(&bed.pool, &spec, &staging, &target, &req)
        .unwrap();
    let id = ids::derive(ids::Kind::Volume, "csi-eph");
    assert!(ephemeral::is_ephemeral(&bed.pool.volume(&id).unwrap()));
    assert_eq!(bed.kernel.mounted(), vec![staging.clone(), target.clone()]);
    assert_eq!(bed.kernel.count("attach"), 1);

    bed.node.unpublish(&bed.pool, &id, &target).unwrap();
    bed.node
        .remove_ephemeral(&bed.pool, "csi-eph", &staging)
        .unwrap();
    assert!(bed.pool.volume(&id).is_err(), "deleted");
    assert!(!staging.exists());
    assert!(bed.kernel.mounted().is_empty());
    assert!(bed.kernel.attached_images().is_empty());
    // Again (kubelet's retry), and for a volume that is not ephemeral.
    bed.node
        .remove_ephemeral(&bed.pool, "csi-eph", &staging)
        .unwrap();
    let v = bed.volume("kept", Layout::Image, AccessType::Mount);
    bed.node
        .remove_ephemeral(&bed.pool, "kept", &staging)
        .unwrap();
    assert!(bed.pool.volume(&v.id).is_ok());
}

#[test]
fn an_ephemeral_publish_that_fails_leaves_no_volume() {
    let bed = Bed::new().ephemeral(ephemeral::Limits::default());
    let (spec, req) = ephemeral_request("16Mi");
    let staging = ephemeral::staging(bed.node.kubelet_dir(), "filevol.test", "csi-eph");
    let target = bed.path("pods/p/volumes/eph");
    let id = ids::derive(ids::Kind::Volume, "csi-eph");
    // The publish step fails: the stage is undone, then the volume.
    bed.kernel.fail_next("bind", ErrorKind::PermissionDenied);
    bed.node
        .publish_ephemeral(&bed.pool, &spec, &staging, &target, &req)
        .unwrap_err();
    assert!(bed.pool.volume(&id).is_err(), "the volume made was deleted");
    assert!(!staging.exists());
    assert!(bed.kernel.mounted().is_empty());
    assert!(bed.kernel.attached_images().is_empty());
    assert_eq!(bed.node.fences.held(&id), None);
    // The stage step fails.
    bed.kernel.fail_next("mount", ErrorKind::InvalidInput);
    bed.node
        .publish_ephemeral(&bed.pool, &spec, &staging, &target, &req)
        .unwrap_err();
    assert!(bed.pool.volume(&id).is_err());
    assert!(!staging.exists());

    // A volume an earlier publish made stays when a retry fails.
    bed.node
        .publish_ephemeral(&bed.pool, &spec, &staging, &target, &req)
        .unwrap();
    bed.node.unpublish(&bed.pool, &id, &target).unwrap();
    bed.kernel.fail_next("bind", ErrorKind::PermissionDenied);
    bed.node
        .publish_ephemeral(&bed.pool, &spec, &staging, &target, &req)
        .unwrap_err();
    assert!(bed.pool.volume(&id).is_ok(), "not this call's to delete");
}

/// ephemeral_request's volume under kubelet's id `id`, of `size`.
fn ephemeral_named(id: &str, size: &str) -> (VolumeSpec, Request) {
    let (mut spec, mut req) = ephemeral_request(size);
    spec.name = id.to_owned();
    req.volume_id = id.to_owned();
    (spec, req)
}

#[test]
fn ephemeral_volumes_are_refused_unless_the_node_makes_them() {
    let bed = Bed::new();
    let (spec, req) = ephemeral_request("16Mi");
    let cap = Capability::plain(AccessType::Mount, "ext4", RWO);
    let context = std::collections::HashMap::from([
        (ephemeral::EPHEMERAL_KEY.to_owned(), "true".to_owned()),
        (ephemeral::SIZE_KEY.to_owned(), "16Mi".to_owned()),
    ]);
    match bed
        .node
        .plan_publish("filevol.test", &req, &cap, &context, "")
    {
        Err(PublishRefused::Node(NodeError::EphemeralOff { id })) => assert_eq!(id, "csi-eph"),
        other => panic!("{other:?}"),
    }
    // Asked of the node directly, too: nothing is made.
    let staging = ephemeral::staging(bed.node.kubelet_dir(), "filevol.test", "csi-eph");
    let target = bed.path("pods/p/volumes/eph");
    assert!(matches!(
        bed.node
            .publish_ephemeral(&bed.pool, &spec, &staging, &target, &req),
        Err(NodeError::EphemeralOff { .. })
    ));
    assert!(bed
        .pool
        .volume(&ids::derive(ids::Kind::Volume, "csi-eph"))
        .is_err());
    assert!(!staging.exists());
    assert!(bed.kernel.calls().is_empty(), "{:?}", bed.kernel.calls());
}

#[test]
fn ephemeral_volumes_are_bounded_each_and_on_the_node_across_a_restart() {
    let limits = ephemeral::Limits {
        max_size: 64 * MIB,
        max_per_node: 100 * MIB,
    };
    let bed = Bed::new().ephemeral(limits);
    let cap = Capability::plain(AccessType::Mount, "ext4", RWO);
    let kubelet = bed.node.kubelet_dir().to_owned();
    let staging = |id: &str| ephemeral::staging(&kubelet, "filevol.test", id);
    let target = |id: &str| kubelet.join(format!("pods/{id}/volumes/eph"));
    let publish = |bed: &Bed, id: &str, size: &str| {
        let (spec, req) = ephemeral_named(id, size);
        bed.node
            .publish_ephemeral(&bed.pool, &spec, &staging(id), &target(id), &req)
    };

    // One larger than one may be: refused when planned, before any work,
    // and by the node itself; rounded as the pool rounds (64Mi + 1 byte
    // takes 65 MiB).
    let mut context = std::collections::HashMap::from([
        (ephemeral::EPHEMERAL_KEY.to_owned(), "true".to_owned()),
        (ephemeral::SIZE_KEY.to_owned(), "65Mi".to_owned()),
    ]);
    let (_, req) = ephemeral_named("csi-big", "65Mi");
    match bed
        .node
        .plan_publish("filevol.test", &req, &cap, &context, "")
    {
        Err(PublishRefused::Node(NodeError::EphemeralTooLarge { size, max, .. })) => {
            assert_eq!((size, max), (65 * MIB, 64 * MIB));
        }
        other => panic!("{other:?}"),
    }
    context.insert(ephemeral::SIZE_KEY.to_owned(), "64Mi".to_owned());
    assert!(bed
        .node
        .plan_publish("filevol.test", &req, &cap, &context, "")
        .is_ok());
    let (big, _) = ephemeral_named("csi-big", &(64 * MIB + 1).to_string());
    assert_eq!(ephemeral::size_in_pool(&big), 65 * MIB);
    assert!(matches!(
        publish(&bed, "csi-big", &(64 * MIB + 1).to_string()),
        Err(NodeError::EphemeralTooLarge { .. })
    ));

    // 48 + 48 fit in 100; a third does not, and makes nothing.
    publish(&bed, "csi-a", "48Mi").unwrap();
    publish(&bed, "csi-b", "48Mi").unwrap();
    let dir = staging("csi-a").parent().unwrap().to_owned();
    assert_eq!(bed.node.ephemeral_bytes(&bed.pool, &dir).unwrap(), 96 * MIB);
    match publish(&bed, "csi-c", "8Mi") {
        Err(NodeError::EphemeralNodeFull {
            size, used, max, ..
        }) => assert_eq!((size, used, max), (8 * MIB, 96 * MIB, 100 * MIB)),
        other => panic!("{other:?}"),
    }
    assert!(bed
        .pool
        .volume(&ids::derive(ids::Kind::Volume, "csi-c"))
        .is_err());
    assert!(!staging("csi-c").exists());
    // kubelet's retry of one already made is not counted twice.
    publish(&bed, "csi-a", "48Mi").unwrap();

    // A volume of the pool that is not ephemeral, and a staging directory
    // left without its volume, count for nothing.
    bed.volume("persistent", Layout::Image, AccessType::Mount);
    std::fs::create_dir_all(staging("csi-gone")).unwrap();

    // A restarted plugin counts what it made before.
    let bed = bed.restart();
    assert_eq!(bed.node.ephemeral_bytes(&bed.pool, &dir).unwrap(), 96 * MIB);
    assert!(matches!(
        publish(&bed, "csi-c", "8Mi"),
        Err(NodeError::EphemeralNodeFull { .. })
    ));
    // Room comes back when one goes; 4 MiB still fits beside the rest.
    bed.node
        .unpublish_volume(&bed.pool, "filevol.test", "csi-b", &target("csi-b"))
        .unwrap();
    publish(&bed, "csi-c", "8Mi").unwrap();
    publish(&bed, "csi-d", "4Mi").unwrap();
    assert!(matches!(
        publish(&bed, "csi-e", "48Mi"),
        Err(NodeError::EphemeralNodeFull { .. })
    ));
    for id in ["csi-a", "csi-c", "csi-d"] {
        bed.node
            .unpublish_volume(&bed.pool, "filevol.test", id, &target(id))
            .unwrap();
    }
    assert_eq!(bed.node.ephemeral_bytes(&bed.pool, &dir).unwrap(), 0);
    assert!(bed.kernel.mounted().is_empty());
}

/// A device of the image on another host holds the image's lock (see
/// `sys::loopdev::attach`): the stage is refused and takes nothing.
#[test]
fn a_stage_whose_image_another_host_has_attached_is_refused_and_takes_nothing() {
    let bed = Bed::new();
    let v = bed.volume("a", Layout::Image, AccessType::Mount);
    let staging = bed.path("staging/a");
    bed.stage(&v, &staging, RWO).unwrap();
    bed.node.unstage(&bed.pool, &v.id, &staging).unwrap();
    bed.kernel.fence_elsewhere(&bed.pool.image_path(&v.id));
    let e = bed.stage(&v, &staging, RWO).unwrap_err();
    assert!(matches!(e, NodeError::ImageFenced { .. }), "{e}");
    assert!(chain(&e).contains("another host"), "{}", chain(&e));
    assert_eq!(bed.fence(&v), None);
    assert!(bed.kernel.attached_images().is_empty());
    assert!(bed.kernel.mounted().is_empty());
}

/// A device of the image that another node plugin on this host has
/// mounted (or one that died and left it) is not this plugin's: a stage
/// never attaches a second device beside it.
#[test]
fn a_device_another_plugin_has_mounted_is_never_doubled() {
    let bed = Bed::new();
    let v = bed.volume("a", Layout::Image, AccessType::Mount);
    let staging = bed.path("staging/a");
    bed.stage(&v, &staging, RWO).unwrap();
    bed.node.unstage(&bed.pool, &v.id, &staging).unwrap();
    // Another plugin's stage, under its own kubelet directory.
    let image = bed.pool.image_path(&v.id);
    let theirs = bed
        .kernel
        .attach(&image, false, true, NODE)
        .unwrap()
        .unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    let onto = std::fs::File::open(elsewhere.path()).unwrap();
    bed.kernel
        .mount_fs(
            &theirs.device.path(),
            onto.as_fd(),
            "ext4",
            MountFlags::empty(),
            "",
        )
        .unwrap();
    let e = bed.stage(&v, &staging, RWO).unwrap_err();
    assert!(matches!(e, NodeError::AttachedElsewhere { .. }), "{e}");
    assert_eq!(
        bed.kernel.attached_images(),
        vec![image.clone()],
        "theirs only"
    );
    assert_eq!(bed.fence(&v), None);
    // Its pods are left alone.
    assert_eq!(bed.kernel.mounted(), vec![elsewhere.path().to_owned()]);
    bed.kernel.unmount(elsewhere.path()).unwrap();
    bed.kernel.detach(theirs.device).unwrap();
}

/// A device of the image mounted nowhere (a stage that died between
/// attach and mount) is nobody's: it is detached, and the stage attaches
/// its own, fenced, device.
#[test]
fn a_device_mounted_nowhere_is_detached_before_the_stage_attaches() {
    let bed = Bed::new();
    let v = bed.volume("a", Layout::Image, AccessType::Mount);
    let staging = bed.path("staging/a");
    bed.stage(&v, &staging, RWO).unwrap();
    bed.node.unstage(&bed.pool, &v.id, &staging).unwrap();
    let image = bed.pool.image_path(&v.id);
    let orphan = bed
        .kernel
        .attach(&image, false, true, NODE)
        .unwrap()
        .unwrap();
    bed.stage(&v, &staging, RWO).unwrap();
    assert!(bed
        .kernel
        .calls()
        .contains(&format!("detach {}", orphan.device.path().display())));
    assert_eq!(bed.kernel.attached_images(), vec![image]);
    bed.node.unstage(&bed.pool, &v.id, &staging).unwrap();
}

/// Two nodes on one kernel (kind-style clusters): the other node's device
/// of the image shows here mounted nowhere, because its mounts are in its
/// own mount namespace. It is never detached from here, nor adopted by a
/// restart: the stage is refused until that device is gone.
#[test]
fn another_node_s_device_on_this_kernel_is_never_detached_or_adopted() {
    let bed = Bed::new();
    let v = bed.volume("a", Layout::Image, AccessType::Mount);
    let staging = bed.path("staging/a");
    let image = bed.pool.image_path(&v.id);
    let theirs = bed
        .kernel
        .attach(&image, false, true, "node-b")
        .unwrap()
        .unwrap();
    let e = bed.stage(&v, &staging, RWO).unwrap_err();
    assert!(matches!(e, NodeError::AttachedForAnotherNode { .. }), "{e}");
    let detach = format!("detach {}", theirs.device.path().display());
    assert!(!bed.kernel.calls().contains(&detach), "left alone");
    let bed = bed.restart();
    let custody = bed.node.custody_counts();
    assert_eq!(
        (custody.device, custody.process, custody.unproven),
        (0, 0, 0),
        "not adopted"
    );
    let e = bed.stage(&v, &staging, RWO).unwrap_err();
    assert!(matches!(e, NodeError::AttachedForAnotherNode { .. }), "{e}");
    assert!(!bed.kernel.calls().contains(&detach), "left alone");
    // That node unstaged (or rebooted): the stage goes through.
    bed.kernel.detach(theirs.device).unwrap();
    bed.stage(&v, &staging, RWO).unwrap();
    assert_eq!(bed.kernel.attached_images(), vec![image]);
    bed.node.unstage(&bed.pool, &v.id, &staging).unwrap();
}

/// This node's device went without the plugin hearing of it, and the
/// kernel handed its number to another node's device of the same image:
/// the plugin's table of its devices does not take that one for its own
/// (it would mount it, or detach it at the next unstage).
#[test]
fn a_device_number_handed_to_another_node_is_not_taken_for_this_node_s() {
    let bed = Bed::new();
    let v = bed.volume("a", Layout::Image, AccessType::Mount);
    let staging = bed.path("staging/a");
    let image = bed.pool.image_path(&v.id);
    bed.stage(&v, &staging, RWO).unwrap();
    let ours = bed.node.bound(&image).unwrap().unwrap().device;
    bed.kernel.unmount(&staging).unwrap();
    bed.kernel.detach(ours).unwrap();
    bed.kernel.reuse_number(ours.number);
    let theirs = bed
        .kernel
        .attach(&image, false, true, "node-b")
        .unwrap()
        .unwrap();
    assert_eq!(theirs.device, ours, "the number came back");
    assert_eq!(bed.node.bound(&image).unwrap(), None);
    let e = bed.stage(&v, &staging, RWO).unwrap_err();
    assert!(matches!(e, NodeError::AttachedForAnotherNode { .. }), "{e}");
    assert!(bed.kernel.mounted().is_empty(), "nothing mounted");
    assert_eq!(
        bed.kernel.count("detach"),
        1,
        "only this node's own device was detached"
    );
}

/// Stage, publish and unpublish act only on what is provably the named
/// volume's: another volume at the path, a mount of something else and a
/// file with data are refused, and nothing is unmounted or removed.
#[test]
fn node_calls_act_only_on_what_is_the_volume_s() {
    let bed = Bed::new();
    let a = bed.volume("a", Layout::Dir, AccessType::Mount);
    let b = bed.volume("b", Layout::Dir, AccessType::Mount);
    let (staging_a, target_a) = (bed.path("staging/a"), bed.path("pods/p/a"));
    bed.stage(&a, &staging_a, RWO).unwrap();
    bed.publish(&a, &staging_a, &target_a, RWO, false).unwrap();
    // B at A's staging path: A's directory is there, not B's.
    let e = bed.stage(&b, &staging_a, RWO).unwrap_err();
    assert!(matches!(e, NodeError::Occupied { .. }), "{e}");
    // Publishing B from A's stage would hand the pod A's files.
    let e = bed
        .publish(&b, &staging_a, &bed.path("pods/p/b"), RWO, false)
        .unwrap_err();
    assert!(matches!(e, NodeError::NotStaged { .. }), "{e}");
    assert!(!bed.path("pods/p/b").exists());
    // Unpublishing B at A's target would take A from its pod.
    let e = bed.node.unpublish(&bed.pool, &b.id, &target_a).unwrap_err();
    assert!(matches!(e, NodeError::NotThisVolume { .. }), "{e}");
    // Nor is A's stage B's to unstage.
    let e = bed.node.unstage(&bed.pool, &b.id, &staging_a).unwrap_err();
    assert!(matches!(e, NodeError::NotThisVolume { .. }), "{e}");
    assert_eq!(
        bed.kernel.mounted(),
        vec![staging_a.clone(), target_a.clone()]
    );
    // A secret's file under the kubelet directory is nobody's target.
    let secret = bed.path("pods/p/volumes/secret/token");
    std::fs::create_dir_all(secret.parent().unwrap()).unwrap();
    std::fs::write(&secret, b"s3cr3t").unwrap();
    let e = bed.node.unpublish(&bed.pool, &a.id, &secret).unwrap_err();
    assert!(matches!(e, NodeError::NotThisVolume { .. }), "{e}");
    assert_eq!(std::fs::read(&secret).unwrap(), b"s3cr3t");
    // A's own calls still work.
    bed.node.unpublish(&bed.pool, &a.id, &target_a).unwrap();
    bed.node.unstage(&bed.pool, &a.id, &staging_a).unwrap();
    assert!(bed.kernel.mounted().is_empty());
}

/// A restarted plugin finds its devices from the kernel. One that holds no
/// lock of its own (an older filevol attached it; the fake's never do) is
/// fenced by the process until its unstage.
#[test]
fn a_restarted_plugin_fences_a_device_that_holds_no_lock() {
    let bed = Bed::new();
    let v = bed.volume("a", Layout::Image, AccessType::Mount);
    let staging = bed.path("staging/a");
    bed.stage(&v, &staging, RWO).unwrap();
    let bed = bed.restart();
    let counts = bed.node.custody_counts();
    assert_eq!((counts.device, counts.process, counts.unproven), (0, 1, 0));
    assert!(bed.node.custody.holds(&v.id));
    assert!(matches!(
        bed.pool.lock_image(&v.id, LockKind::Shared).unwrap(),
        crate::pool::ImageLock::Busy
    ));
    // A retried stage converges on the device found.
    bed.stage(&v, &staging, RWO).unwrap();
    assert_eq!(bed.kernel.count("attach"), 1);
    bed.node.unstage(&bed.pool, &v.id, &staging).unwrap();
    assert!(matches!(
        bed.pool.lock_image(&v.id, LockKind::Exclusive).unwrap(),
        crate::pool::ImageLock::Held(_)
    ));
}

/// A device whose image's lock another holder has (another host attached
/// it after this one's lock was lost) is reported and never staged or
/// published again until its unstage.
#[test]
fn a_device_whose_fence_another_holds_is_reported_and_refused() {
    let bed = Bed::new();
    let v = bed.volume("a", Layout::Image, AccessType::Mount);
    let (staging, target) = (bed.path("staging/a"), bed.path("pods/p/a"));
    bed.stage(&v, &staging, RWO).unwrap();
    let node = bed.node;
    drop(node);
    let other = match bed.pool.lock_image(&v.id, LockKind::Exclusive).unwrap() {
        crate::pool::ImageLock::Held(file) => file,
        other => panic!("{other:?}"),
    };
    let node = Node::with_kernel(
        &bed._dir.path().join("kubelet"),
        NODE,
        &bed.pool,
        true,
        bed.kernel.clone(),
    )
    .unwrap();
    let bed = Bed { node, ..bed };
    assert_eq!(bed.node.custody_counts().unproven, 1);
    let e = bed.stage(&v, &staging, RWO).unwrap_err();
    assert!(matches!(e, NodeError::FenceUnproven { .. }), "{e}");
    let e = bed.publish(&v, &staging, &target, RWO, false).unwrap_err();
    assert!(matches!(e, NodeError::FenceUnproven { .. }), "{e}");
    let health = bed
        .node
        .volume_health(&bed.pool, &v, Some(&staging))
        .unwrap();
    assert!(
        health.has(crate::health::Reason::FenceUnproven),
        "{}",
        health.message()
    );
    assert!(
        health.message().contains("another host may be writing it"),
        "{}",
        health.message()
    );
    // The unstage is what resolves it.
    bed.node.unstage(&bed.pool, &v.id, &staging).unwrap();
    assert_eq!(bed.node.custody.unproven(&v.id), None);
    drop(other);
}

// ---- NodePublishVolume and NodeUnpublishVolume as the service asks ----

#[test]
fn a_publish_needs_a_stage_unless_its_context_makes_it_ephemeral() {
    let bed = Bed::new();
    let v = bed.volume("a", Layout::Image, AccessType::Mount);
    let cap = Capability::plain(AccessType::Mount, "ext4", RWO);
    let req = request(&v, RWO, false);
    let none = std::collections::HashMap::new();
    let plan = |staging: &str| {
        bed.node
            .plan_publish("filevol.test", &req, &cap, &none, staging)
    };
    // No staging path: the volume was not staged.
    match plan("") {
        Err(PublishRefused::Node(NodeError::NotStaged { id, path })) => {
            assert_eq!((id, path), (v.id.clone(), PathBuf::new()));
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        plan("/elsewhere/staging"),
        Err(PublishRefused::Node(NodeError::OutsideKubeletDir { .. }))
    ));
    let staging = bed.path("staging/a");
    let publication = plan(staging.to_str().unwrap()).unwrap();
    assert!(matches!(&publication, Publication::Staged { staging: s, .. } if *s == staging));

    let target = bed.path("pods/p/volumes/a");
    assert!(matches!(
        bed.node
            .publish_volume(&bed.pool, &publication, &target, &req),
        Err(NodeError::NotStaged { .. })
    ));
    bed.stage(&v, &staging, RWO).unwrap();
    bed.node
        .publish_volume(&bed.pool, &publication, &target, &req)
        .unwrap();
    assert_eq!(bed.kernel.mounted(), vec![staging.clone(), target.clone()]);
    // The record is read and checked against the capability at publish.
    let block = Capability::plain(AccessType::Block, "", RWO);
    let wrong = bed
        .node
        .plan_publish(
            "filevol.test",
            &req,
            &block,
            &none,
            staging.to_str().unwrap(),
        )
        .unwrap();
    assert!(matches!(
        bed.node.publish_volume(&bed.pool, &wrong, &target, &req),
        Err(NodeError::Pool(crate::pool::PoolError::Unsupported(_)))
    ));

    // A volume that is not ephemeral stays staged and in the pool.
    bed.node
        .unpublish_volume(&bed.pool, "filevol.test", &v.id, &target)
        .unwrap();
    assert_eq!(bed.kernel.mounted(), vec![staging]);
    assert!(bed.pool.volume(&v.id).is_ok());
}

#[test]
fn an_ephemeral_publish_is_staged_in_the_plugins_directory_and_goes_with_its_unpublish() {
    let bed = Bed::new().ephemeral(ephemeral::Limits::default());
    let (_, req) = ephemeral_request("16Mi");
    let cap = Capability::plain(AccessType::Mount, "ext4", RWO);
    let context = |extra: (&str, &str)| {
        std::collections::HashMap::from([
            (ephemeral::EPHEMERAL_KEY.to_owned(), "true".to_owned()),
            (extra.0.to_owned(), extra.1.to_owned()),
        ])
    };
    // kubelet gives no staging path for an ephemeral volume.
    let publication = bed
        .node
        .plan_publish("filevol.test", &req, &cap, &context(("size", "16Mi")), "")
        .unwrap();
    let staging = bed.path("plugins/filevol.test/ephemeral/csi-eph");
    match &publication {
        Publication::Ephemeral { spec, staging: s } => {
            assert_eq!(*s, staging);
            assert_eq!(spec.capacity.required, 16 * MIB);
        }
        other => panic!("{other:?}"),
    }
    // Attributes it cannot take are the request's fault, named.
    match bed
        .node
        .plan_publish("filevol.test", &req, &cap, &context(("color", "blue")), "")
    {
        Err(PublishRefused::Request(r)) => assert_eq!(r.field, "volume_context"),
        other => panic!("{other:?}"),
    }

    let target = bed.path("pods/p/volumes/eph");
    bed.node
        .publish_volume(&bed.pool, &publication, &target, &req)
        .unwrap();
    let id = ids::derive(ids::Kind::Volume, "csi-eph");
    assert_eq!(bed.kernel.mounted(), vec![staging.clone(), target.clone()]);
    // Unpublish by kubelet's id: unbind, unstage, delete, in that order.
    bed.node
        .unpublish_volume(&bed.pool, "filevol.test", "csi-eph", &target)
        .unwrap();
    assert!(bed.pool.volume(&id).is_err(), "deleted");
    assert!(!staging.exists());
    assert!(bed.kernel.mounted().is_empty());
    assert!(bed.kernel.attached_images().is_empty());
    // kubelet's retry finds nothing left to do.
    bed.node
        .unpublish_volume(&bed.pool, "filevol.test", "csi-eph", &target)
        .unwrap();
}

/// The fake writes its mount table as the kernel writes mountinfo, names
/// escaped, and the node's classifiers read it back: stages and publishes
/// at paths with a space, a tab and a backslash are found by what they
/// hold, across a restart, and undone.
#[test]
fn paths_the_mount_table_escapes_are_found_by_what_they_hold() {
    let bed = Bed::new();
    let a = bed.volume("a", Layout::Image, AccessType::Mount);
    let d = bed.volume("d", Layout::Dir, AccessType::Mount);
    let mut mounts = Vec::new();
    for v in [&a, &d] {
        let staging = bed.path(&format!("plugins/a {}/globalmount", v.name));
        let target = bed.path(&format!("pods/p\t1/volumes/pv\\{}/mount", v.name));
        bed.stage(v, &staging, RWO).unwrap();
        bed.publish(v, &staging, &target, RWO, false).unwrap();
        mounts.push((v.id.clone(), staging, target));
    }
    assert_eq!(bed.node.mount_counts(&bed.pool).unwrap(), (2, 2));
    let bed = bed.restart();
    assert_eq!(
        bed.node.staged_dir_volumes(&bed.pool).unwrap(),
        [d.id.as_str()]
    );
    assert_eq!(bed.fence(&a), Some(LockKind::Exclusive));
    assert_eq!(bed.fence(&d), Some(LockKind::Shared));
    for (id, staging, target) in &mounts {
        // An unstage before the unpublish finds the publish.
        assert!(matches!(
            bed.node.unstage(&bed.pool, id, staging),
            Err(NodeError::StillPublished { .. })
        ));
        bed.node.unpublish(&bed.pool, id, target).unwrap();
        bed.node.unstage(&bed.pool, id, staging).unwrap();
    }
    assert!(bed.kernel.mounted().is_empty());
    assert!(bed.kernel.attached_images().is_empty());
    assert_eq!(bed.node.mount_counts(&bed.pool).unwrap(), (0, 0));
}

/// A formatted volume, staged read-write once and unstaged, and a clone of
/// it: what a restore or clone of a mounted filesystem looks like to the
/// node.
fn formatted_and_cloned(bed: &Bed) -> (VolumeMeta, VolumeMeta) {
    let v = bed.volume("a", Layout::Image, AccessType::Mount);
    let staging = bed.path("staging/a");
    bed.stage(&v, &staging, RWO).unwrap();
    bed.node.unstage(&bed.pool, &v.id, &staging).unwrap();
    let clone = bed.clone_of(&v, "a-clone");
    assert!(clone.needs_settling());
    (v, clone)
}

#[test]
fn a_read_only_stage_of_a_clone_replays_its_journal_once_on_a_private_writable_device() {
    let bed = Bed::new();
    let (_, clone) = formatted_and_cloned(&bed);
    let before = bed.kernel.calls().len();
    let staging = bed.path("staging/clone");
    bed.stage(&clone, &staging, ROX).unwrap();
    let done: Vec<String> = ops(&bed).split_off(before);
    assert_eq!(
        done,
        [
            // The replay, on a writable device of its own, mounted nowhere.
            "attach",
            "drop_cached_blocks",
            "probe",
            "mount_unattached",
            "detach",
            // Then the read-only stage, as ever.
            "attach",
            "drop_cached_blocks",
            "probe",
            "mount",
        ]
    );
    assert!(bed.pool.volume(&clone.id).unwrap().settled);
    assert_eq!(bed.fence(&clone), Some(LockKind::Shared));
    assert_eq!(
        bed.kernel.attached_images(),
        [bed.pool.image_path(&clone.id)]
    );

    // A retry, and a later stage after an unstage: nothing replayed again.
    bed.stage(&clone, &staging, ROX).unwrap();
    bed.node.unstage(&bed.pool, &clone.id, &staging).unwrap();
    bed.stage(&clone, &staging, ROX).unwrap();
    assert_eq!(bed.kernel.count("mount_unattached"), 1);
}

#[test]
fn a_replay_that_fails_leaves_nothing_and_says_the_filesystem_will_not_mount() {
    let bed = Bed::new();
    let (_, clone) = formatted_and_cloned(&bed);
    let staging = bed.path("staging/clone");
    bed.kernel
        .fail_next("mount_unattached", ErrorKind::InvalidData);
    let e = bed.stage(&clone, &staging, ROX).unwrap_err();
    assert!(
        matches!(e, NodeError::Unmountable { how, .. } if how.contains("replay")),
        "{e}"
    );
    assert!(bed.kernel.attached_images().is_empty());
    assert!(bed.kernel.mounted().is_empty());
    assert_eq!(bed.fence(&clone), None);
    assert!(!bed.pool.volume(&clone.id).unwrap().settled);
    // Nothing is half done: the retry replays and stages.
    bed.stage(&clone, &staging, ROX).unwrap();
    assert!(bed.pool.volume(&clone.id).unwrap().settled);
}

#[test]
fn a_clone_that_readers_have_staged_already_is_staged_without_a_replay() {
    // A copy made before settling existed, already mounted read-only by
    // readers on other nodes (their fences are shared): a new reader is
    // neither locked out by them nor replays under them.
    let bed = Bed::new();
    let (_, clone) = formatted_and_cloned(&bed);
    let other_reader = bed
        .pool
        .fence_volume(&clone.id, LockKind::Shared)
        .unwrap()
        .expect("a shared fence");
    let started = std::time::Instant::now();
    bed.stage(&clone, &bed.path("staging/clone"), ROX).unwrap();
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    assert_eq!(bed.kernel.count("mount_unattached"), 0);
    assert!(!bed.pool.volume(&clone.id).unwrap().settled);
    drop(other_reader);
}

#[test]
fn a_read_write_stage_of_a_clone_replays_by_mounting_and_settles_nothing() {
    let bed = Bed::new();
    let (_, clone) = formatted_and_cloned(&bed);
    bed.stage(&clone, &bed.path("staging/clone"), RWO).unwrap();
    assert_eq!(bed.kernel.count("mount_unattached"), 0);
    assert!(!bed.pool.volume(&clone.id).unwrap().settled);
}

#[test]
fn a_read_only_mount_the_kernel_refuses_is_unmountable_and_undone() {
    let bed = Bed::new();
    let (v, _) = formatted_and_cloned(&bed);
    let staging = bed.path("staging/a");
    bed.kernel.fail_next("mount", ErrorKind::InvalidData);
    let e = bed.stage(&v, &staging, ROX).unwrap_err();
    assert!(
        matches!(
            e,
            NodeError::Unmountable {
                how: "read-only",
                ..
            }
        ),
        "{e}"
    );
    assert!(bed.kernel.attached_images().is_empty());
    assert_eq!(bed.fence(&v), None);
    // A read-write stage's failed mount stays what it was.
    bed.kernel.fail_next("mount", ErrorKind::InvalidData);
    let e = bed.stage(&v, &staging, RWO).unwrap_err();
    assert!(matches!(e, NodeError::Sys { step: "mount", .. }), "{e}");
}
