//! Pool logic on temporary directories, no root needed. Two `Pool`s opened
//! on one directory stand for two processes: their locks are OFD locks on
//! separate opens, which conflict exactly as between processes (and hosts).

use std::collections::BTreeMap;
use std::path::Path;

use super::store;
use super::*;
use crate::sys::lock::LockKind;
use crate::units::human_fine;
use crate::volume::meta::{
    AccessMode, AccessType, CopyMethod, FsType, GroupMeta, Layout, SnapshotMeta, FORMAT,
};

const MIB: u64 = 1 << 20;

fn opts(janitor: bool) -> PoolOptions {
    PoolOptions {
        reserve_bytes: 0,
        overcommit: 1000.0,
        topology: BTreeMap::new(),
        janitor,
    }
}

fn open(root: &Path, janitor: bool) -> Pool {
    Pool::open(root, opts(janitor)).unwrap()
}

fn spec(name: &str, bytes: u64) -> VolumeSpec {
    VolumeSpec {
        name: name.into(),
        layout: Layout::Image,
        capacity: CapacityRange {
            required: bytes,
            limit: 0,
        },
        access: AccessType::Block,
        fs_type: None,
        thick: false,
        mkfs_options: vec![],
        parameters: BTreeMap::new(),
        mutable_parameters: BTreeMap::new(),
        source: None,
        modes: vec![AccessMode::SingleNodeWriter],
    }
}

fn dir_spec(name: &str) -> VolumeSpec {
    VolumeSpec {
        layout: Layout::Dir,
        access: AccessType::Mount,
        ..spec(name, MIB)
    }
}

#[test]
fn every_process_sees_what_another_committed() {
    let dir = tempfile::tempdir().unwrap();
    let node = open(dir.path(), false);
    let controller = open(dir.path(), true);
    let v = controller.create_volume(&spec("a", 8 * MIB)).unwrap();
    assert_eq!(v.written, Some(false));
    // The node process opened the pool first and still sees the volume.
    assert_eq!(node.volume(&v.id).unwrap(), v);
    // An expansion before the first stage is what the node reads.
    controller
        .expand_volume(
            &v.id,
            CapacityRange {
                required: 16 * MIB,
                limit: 0,
            },
        )
        .unwrap();
    assert_eq!(node.volume(&v.id).unwrap().capacity_bytes, 16 * MIB);
    let (listed, _) = node.list_volumes(None, 0).unwrap();
    assert_eq!(listed[0].1.as_ref().unwrap().capacity_bytes, 16 * MIB);
    // A volume the node made (ephemeral) counts for the controller.
    let e = node.create_volume(&spec("ephemeral", 4 * MIB)).unwrap();
    let usage = controller.usage().unwrap();
    assert_eq!(
        (usage.volumes, usage.snapshots, usage.volume_bytes),
        (2, 0, 20 * MIB)
    );
    // Deleted by the node process: gone for the controller too.
    node.delete_volume(&e.id).unwrap();
    assert!(matches!(
        controller.volume(&e.id),
        Err(PoolError::NotFound { .. })
    ));
    assert_eq!(controller.list_volumes(None, 0).unwrap().0.len(), 1);
}

#[test]
fn a_create_retried_against_another_instance_returns_the_same_volume() {
    let dir = tempfile::tempdir().unwrap();
    let a = open(dir.path(), true);
    let b = open(dir.path(), true);
    let first = a.create_volume(&spec("pvc-1", 8 * MIB)).unwrap();
    let again = b.create_volume(&spec("pvc-1", 8 * MIB)).unwrap();
    assert_eq!(first, again);
    assert!(matches!(
        b.create_volume(&spec("pvc-1", 64 * MIB)),
        Err(PoolError::Incompatible { .. })
    ));
    // Deleted through the other instance: nothing is left in the pool, and
    // a retried create makes it anew.
    b.delete_volume(&first.id).unwrap();
    assert!(!dir.path().join("volumes").join(&first.id).exists());
    a.delete_volume(&first.id).unwrap();
    a.create_volume(&spec("pvc-1", 8 * MIB)).unwrap();
}

#[test]
fn concurrent_creates_of_one_name_commit_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let pools: Vec<Pool> = (0..4).map(|_| open(dir.path(), false)).collect();
    for round in 0..20 {
        let name = format!("race-{round}");
        let results: Vec<_> = std::thread::scope(|s| {
            let handles: Vec<_> = pools
                .iter()
                .map(|p| s.spawn(|| p.create_volume(&spec(&name, 4 * MIB))))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let first = results[0].as_ref().unwrap();
        for r in &results {
            assert_eq!(r.as_ref().unwrap(), first);
        }
    }
    assert_eq!(pools[0].list_volumes(None, 0).unwrap().0.len(), 20);
    // No build was left behind in any scratch directory.
    for entry in std::fs::read_dir(dir.path().join(".scratch")).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_dir() {
            assert_eq!(std::fs::read_dir(entry.path()).unwrap().count(), 0);
        }
    }
}

#[test]
fn mutations_of_one_volume_are_serialised_across_instances() {
    let dir = tempfile::tempdir().unwrap();
    let a = open(dir.path(), true);
    let b = open(dir.path(), true);
    let v = a.create_volume(&spec("v", 8 * MIB)).unwrap();
    let held = a.lock_volume(&v.id).unwrap();
    let grow = CapacityRange {
        required: 16 * MIB,
        limit: 0,
    };
    assert!(matches!(
        b.expand_volume(&v.id, grow),
        Err(PoolError::Busy { .. })
    ));
    assert!(matches!(
        b.delete_volume(&v.id),
        Err(PoolError::Busy { .. })
    ));
    drop(held);
    b.expand_volume(&v.id, grow).unwrap();
}

#[test]
fn a_staged_volume_is_never_deleted_or_byte_copied() {
    let dir = tempfile::tempdir().unwrap();
    let node = open(dir.path(), false);
    let controller = open(dir.path(), true);
    let image = controller.create_volume(&spec("image", 8 * MIB)).unwrap();
    let shared = controller.create_volume(&dir_spec("shared")).unwrap();

    let fence = node
        .fence_volume(&image.id, LockKind::Exclusive)
        .unwrap()
        .unwrap();
    let err = controller.delete_volume(&image.id).unwrap_err();
    assert!(matches!(err, PoolError::InUse(_)), "{err}");
    assert!(controller.image_path(&image.id).exists());
    // A byte copy (no reflink on this filesystem, or a refused one) of an
    // image staged for writing would be torn.
    assert!(matches!(
        controller.check_copyable(&Source::Volume(image.id.clone())),
        Err(PoolError::InUse(_))
    ));
    drop(fence);
    assert!(controller
        .check_copyable(&Source::Volume(image.id.clone()))
        .unwrap()
        .is_some());

    // Directory volumes too: a node-local plugin stages without any
    // ControllerPublish record.
    let fence = node
        .fence_volume(&shared.id, LockKind::Shared)
        .unwrap()
        .unwrap();
    assert!(matches!(
        controller.delete_volume(&shared.id),
        Err(PoolError::InUse(_))
    ));
    assert!(controller.data_path(&shared.id).is_dir());
    drop(fence);
    controller.delete_volume(&shared.id).unwrap();
    controller.delete_volume(&image.id).unwrap();
}

#[test]
fn attachments_recorded_by_one_replica_hold_for_another() {
    let dir = tempfile::tempdir().unwrap();
    let a = open(dir.path(), true);
    let b = open(dir.path(), true);
    for node in ["n1", "n2"] {
        a.register_node(&crate::volume::meta::NodeRecord {
            node_id: node.into(),
            topology: BTreeMap::new(),
            max_volumes: 0,
        })
        .unwrap();
    }
    let v = a.create_volume(&spec("v", 8 * MIB)).unwrap();
    a.publish(&v.id, "n1", AccessMode::SingleNodeWriter, false)
        .unwrap();
    assert!(matches!(
        b.publish(&v.id, "n2", AccessMode::SingleNodeWriter, false),
        Err(PoolError::AttachedElsewhere { .. })
    ));
    assert!(matches!(b.delete_volume(&v.id), Err(PoolError::InUse(_))));
    let nodes = |p: &Pool| -> Vec<String> {
        let v = p.volume(&v.id).unwrap();
        p.attachments()
            .unwrap()
            .of(&v)
            .into_iter()
            .map(|a| a.node_id)
            .collect()
    };
    assert_eq!(nodes(&b), ["n1"]);
    b.unpublish(&v.id, Some("n1")).unwrap();
    assert!(nodes(&a).is_empty());
    a.delete_volume(&v.id).unwrap();
}

fn register(pool: &Pool, node: &str, max_volumes: u32) {
    pool.register_node(&crate::volume::meta::NodeRecord {
        node_id: node.into(),
        topology: BTreeMap::new(),
        max_volumes,
    })
    .unwrap();
}

/// The names in `attachments/`, sorted.
fn records(root: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(root.join(attachments::DIR))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

#[test]
fn an_attachment_is_one_empty_file_named_by_its_record() {
    let dir = tempfile::tempdir().unwrap();
    let pool = open(dir.path(), true);
    register(&pool, "n1", 0);
    register(&pool, "n2", 0);
    let v = pool.create_volume(&dir_spec("shared")).unwrap();
    let rwx = AccessMode::MultiNodeMultiWriter;
    pool.publish(&v.id, "n1", rwx, false).unwrap();
    pool.publish(&v.id, "n2", rwx, true).unwrap();
    // A retry changes nothing; another mode on the same node is refused.
    pool.publish(&v.id, "n1", rwx, false).unwrap();
    assert!(matches!(
        pool.publish(&v.id, "n1", rwx, true),
        Err(PoolError::AttachedIncompatibly { .. })
    ));
    let stamp = v.created_unix_ms;
    assert_eq!(
        records(dir.path()),
        [
            format!("{}@{stamp}@n1@multi_node_multi_writer@rw", v.id),
            format!("{}@{stamp}@n2@multi_node_multi_writer@ro", v.id),
        ]
    );
    let path = dir
        .path()
        .join(attachments::DIR)
        .join(&records(dir.path())[0]);
    assert_eq!(std::fs::metadata(path).unwrap().len(), 0);
    // Read back as they were made; meta.json never holds them.
    let mut got = pool.attachments().unwrap().of(&v);
    got.sort_by(|a, b| a.node_id.cmp(&b.node_id));
    let want = |node: &str, readonly| meta::Attachment {
        node_id: node.into(),
        mode: rwx,
        readonly,
    };
    assert_eq!(got, [want("n1", false), want("n2", true)]);
    assert!(pool.volume(&v.id).unwrap().legacy_attachments.is_empty());
    pool.unpublish(&v.id, Some("n2")).unwrap();
    assert_eq!(pool.attachments().unwrap().of(&v), [want("n1", false)]);
    pool.unpublish(&v.id, None).unwrap();
    assert!(records(dir.path()).is_empty());
    pool.delete_volume(&v.id).unwrap();
}

#[test]
fn attachments_kept_in_meta_json_by_an_older_filevol_are_read_and_removable() {
    let dir = tempfile::tempdir().unwrap();
    let pool = open(dir.path(), false);
    register(&pool, "n1", 0);
    register(&pool, "n2", 0);
    let old = |id: &str, node: &str| {
        let mut v = pool.volume(id).unwrap();
        v.legacy_attachments.push(meta::Attachment {
            node_id: node.into(),
            mode: AccessMode::SingleNodeWriter,
            readonly: false,
        });
        let held = pool.lock_volume(id).unwrap();
        pool.update_volume(&v, &held).unwrap();
    };
    let v = pool.create_volume(&spec("old", 8 * MIB)).unwrap();
    old(&v.id, "n1");
    // The field keeps its name on disk.
    let json =
        std::fs::read_to_string(dir.path().join("volumes").join(&v.id).join("meta.json")).unwrap();
    assert!(
        json.contains("\"attachments\"") && json.contains("\"n1\""),
        "{json}"
    );
    // An old entry counts like a record: the volume is attached to n1.
    assert_eq!(
        pool.attachments()
            .unwrap()
            .of(&pool.volume(&v.id).unwrap())
            .len(),
        1
    );
    assert!(matches!(
        pool.publish(&v.id, "n2", AccessMode::SingleNodeWriter, false),
        Err(PoolError::AttachedElsewhere { .. })
    ));
    assert!(matches!(
        pool.delete_volume(&v.id),
        Err(PoolError::InUse(_))
    ));
    pool.publish(&v.id, "n1", AccessMode::SingleNodeWriter, false)
        .unwrap();
    assert!(records(dir.path()).is_empty(), "a retry adds no record");
    // Unpublish removes it from meta.json.
    pool.unpublish(&v.id, Some("n1")).unwrap();
    assert!(pool.volume(&v.id).unwrap().legacy_attachments.is_empty());
    pool.delete_volume(&v.id).unwrap();

    // A controller's start moves old entries into records.
    let w = pool.create_volume(&spec("moved", 8 * MIB)).unwrap();
    old(&w.id, "n2");
    let controller = open(dir.path(), true);
    let w = controller.volume(&w.id).unwrap();
    assert!(w.legacy_attachments.is_empty());
    assert_eq!(records(dir.path()).len(), 1);
    assert_eq!(controller.attachments().unwrap().of(&w)[0].node_id, "n2");
    // A crash between the record and meta.json leaves both: one attachment.
    old(&w.id, "n2");
    let both = controller.volume(&w.id).unwrap();
    assert_eq!(controller.attachments().unwrap().of(&both).len(), 1);
    controller.unpublish(&w.id, None).unwrap();
    assert!(records(dir.path()).is_empty());
    assert!(controller
        .volume(&w.id)
        .unwrap()
        .legacy_attachments
        .is_empty());
    controller.delete_volume(&w.id).unwrap();
}

#[test]
fn the_attach_limit_counts_a_node_s_records() {
    let dir = tempfile::tempdir().unwrap();
    let a = open(dir.path(), true);
    let b = open(dir.path(), true);
    register(&a, "n1", 2);
    register(&a, "n2", 0);
    let vols: Vec<_> = (0..4)
        .map(|i| a.create_volume(&spec(&format!("v{i}"), MIB)).unwrap())
        .collect();
    let rwo = AccessMode::SingleNodeWriter;
    a.publish(&vols[0].id, "n1", rwo, false).unwrap();
    b.publish(&vols[1].id, "n1", rwo, false).unwrap();
    // Other nodes' attachments do not count.
    a.publish(&vols[3].id, "n2", rwo, false).unwrap();
    for p in [&a, &b] {
        assert!(matches!(
            p.publish(&vols[2].id, "n1", rwo, false),
            Err(PoolError::AttachLimit { max: 2, .. })
        ));
    }
    // A retry of one that is there is no new attachment.
    b.publish(&vols[0].id, "n1", rwo, false).unwrap();
    b.unpublish(&vols[0].id, Some("n1")).unwrap();
    a.publish(&vols[2].id, "n1", rwo, false).unwrap();
    // A record whose volume went without it (removed by hand) does not
    // count: the node has room for one more again.
    std::fs::remove_dir_all(dir.path().join("volumes").join(&vols[1].id)).unwrap();
    b.publish(&vols[0].id, "n1", rwo, false).unwrap();
}

#[test]
fn a_record_left_by_a_volume_that_is_gone_never_holds_a_new_one() {
    let dir = tempfile::tempdir().unwrap();
    let pool = open(dir.path(), false);
    register(&pool, "n1", 0);
    register(&pool, "n2", 0);
    let rwo = AccessMode::SingleNodeWriter;
    let first = pool.create_volume(&spec("same-name", 8 * MIB)).unwrap();
    pool.publish(&first.id, "n1", rwo, false).unwrap();
    // The volume goes without its record (by hand, or by an older filevol
    // that knew no records), and the same name makes the same id again.
    std::fs::remove_dir_all(dir.path().join("volumes").join(&first.id)).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(2));
    let second = pool.create_volume(&spec("same-name", 8 * MIB)).unwrap();
    assert_eq!(second.id, first.id);
    assert_eq!(records(dir.path()).len(), 1);
    // The leftover is not the new volume's: not attached, free to go
    // anywhere, deletable.
    assert!(pool.attachments().unwrap().of(&second).is_empty());
    pool.publish(&second.id, "n2", rwo, false).unwrap();
    pool.unpublish(&second.id, None).unwrap();
    // A successful delete leaves no record of the id.
    pool.delete_volume(&second.id).unwrap();
    assert!(records(dir.path()).is_empty());

    // Nor does the delete of an id that is already gone.
    let third = pool.create_volume(&spec("same-name", 8 * MIB)).unwrap();
    pool.publish(&third.id, "n1", rwo, false).unwrap();
    std::fs::remove_dir_all(dir.path().join("volumes").join(&third.id)).unwrap();
    pool.delete_volume(&third.id).unwrap();
    assert!(records(dir.path()).is_empty());

    // And a controller's start removes leftovers of any id, never a
    // record of a volume that is there.
    let kept = pool.create_volume(&spec("kept", 8 * MIB)).unwrap();
    pool.publish(&kept.id, "n1", rwo, false).unwrap();
    let gone = pool.create_volume(&spec("gone", 8 * MIB)).unwrap();
    pool.publish(&gone.id, "n2", rwo, false).unwrap();
    std::fs::remove_dir_all(dir.path().join("volumes").join(&gone.id)).unwrap();
    assert_eq!(records(dir.path()).len(), 2);
    drop(open(dir.path(), true));
    assert_eq!(records(dir.path()).len(), 1);
    assert_eq!(pool.attachments().unwrap().of(&kept).len(), 1);
}

fn member(root: &Path, id: &str, group: &str) {
    let dir = root.join("snapshots").join(id);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("image"), b"").unwrap();
    store::write_json(
        &dir.join(store::META),
        &SnapshotMeta {
            format: FORMAT,
            id: id.into(),
            name: id.into(),
            source_volume_id: "v".into(),
            size_bytes: MIB,
            layout: Layout::Image,
            access: AccessType::Block,
            fs_type: None,
            method: meta::CopyMethod::Reflink,
            group_id: Some(group.into()),
            created_secs: 0,
            created_nanos: 0,
            written: Some(false),
            subvolume: false,
        },
    )
    .unwrap();
}

#[test]
fn members_of_a_group_still_being_made_survive_other_starts() {
    let dir = tempfile::tempdir().unwrap();
    let creator = open(dir.path(), true);
    // The creator holds the group's lock and has committed one member.
    let lock = creator.store.lock_group("g1").unwrap();
    member(dir.path(), "m1", "g1");
    // A node plugin restarting meanwhile cleans nothing at all, and
    // another controller starting does not touch a group whose creator
    // is at work.
    drop(open(dir.path(), false));
    drop(open(dir.path(), true));
    assert!(dir.path().join("snapshots/m1").exists());
    // The creator finishes: the member is reported.
    store::write_json(
        &creator.group_file("g1"),
        &GroupMeta {
            format: FORMAT,
            id: "g1".into(),
            name: "g1".into(),
            snapshot_ids: vec!["m1".into()],
            source_volume_ids: vec!["v".into()],
            created_secs: 0,
            created_nanos: 0,
        },
    )
    .unwrap();
    drop(lock);
    assert!(!dir.path().join("groups/g1.lock").exists());
    drop(open(dir.path(), true));
    assert_eq!(creator.group("g1").unwrap().snapshot_ids, ["m1"]);
    assert!(creator.snapshot("m1").is_ok());
}

#[test]
fn members_of_a_group_whose_creator_died_are_removed_by_a_controller_only() {
    let dir = tempfile::tempdir().unwrap();
    member(dir.path(), "m2", "g2");
    // No lock held: the creator is gone. A node plugin leaves it.
    drop(open(dir.path(), false));
    assert!(dir.path().join("snapshots/m2").exists());
    let controller = open(dir.path(), true);
    assert!(!dir.path().join("snapshots/m2").exists());
    assert!(matches!(
        controller.snapshot("m2"),
        Err(PoolError::NotFound { .. })
    ));
}

#[test]
fn a_damaged_record_is_reported_never_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let pool = open(dir.path(), true);
    let v = pool.create_volume(&spec("v", 8 * MIB)).unwrap();
    let meta = dir.path().join("volumes").join(&v.id).join(store::META);
    std::fs::write(&meta, b"{torn").unwrap();
    member(dir.path(), "m3", "g3");
    std::fs::write(dir.path().join("snapshots/m3/meta.json"), b"").unwrap();
    drop(open(dir.path(), true));
    assert!(meta.exists() && dir.path().join("snapshots/m3").exists());
    let (listed, _) = pool.list_volumes(None, 0).unwrap();
    assert!(listed[0].1.is_err());
    assert!(matches!(pool.volume(&v.id), Err(PoolError::Damaged { .. })));
    assert!(pool.image_path(&v.id).exists());
    // Only an explicit delete removes it, and not while a node has it.
    let fence = pool.fence_volume(&v.id, LockKind::Shared).unwrap().unwrap();
    assert!(matches!(
        pool.delete_volume(&v.id),
        Err(PoolError::InUse(_))
    ));
    drop(fence);
    pool.delete_volume(&v.id).unwrap();
    assert!(!pool.image_path(&v.id).exists());
}

#[test]
fn a_dead_instance_s_scratch_goes_only_with_a_controller() {
    let dir = tempfile::tempdir().unwrap();
    // What a killed process leaves: its scratch with a half-built volume,
    // and its lock file, which nobody holds any more.
    let base = dir.path().join(".scratch");
    let dead = base.join("host-4242-1");
    std::fs::create_dir_all(dead.join("volume-0")).unwrap();
    std::fs::write(base.join("host-4242-1.lock"), b"").unwrap();
    drop(open(dir.path(), false));
    assert!(dead.exists(), "a node plugin must not clean up");
    // A live instance's scratch is never touched.
    let live = open(dir.path(), false);
    let work = live.scratch_path("volume");
    std::fs::create_dir(&work).unwrap();
    drop(open(dir.path(), true));
    assert!(!dead.exists());
    assert!(work.exists());
}

/// What the promises leave: room before the free-space bound, which at
/// these tests' overcommit of 1000 is what binds, and which moves with
/// whatever else writes to the temporary directory's filesystem.
fn unpromised(pool: &Pool) -> u64 {
    pool.usage().unwrap().unpromised()
}

#[test]
fn promises_in_progress_count_in_every_instance() {
    let dir = tempfile::tempdir().unwrap();
    let a = open(dir.path(), true);
    let b = open(dir.path(), true);
    let before = unpromised(&b);
    let promise = a.promise(64 * MIB).unwrap();
    assert_eq!(b.usage().unwrap().in_progress, 64 * MIB);
    assert_eq!(unpromised(&b), before - 64 * MIB);
    drop(promise);
    assert_eq!(unpromised(&b), before);
    // A promise of an instance that died is void.
    let c = open(dir.path(), false);
    let promise = c.promise(32 * MIB).unwrap();
    std::mem::forget(promise);
    drop(c);
    assert_eq!(unpromised(&b), before);
    assert_eq!(b.usage().unwrap().in_progress, 0);
}

#[test]
fn clones_carry_whether_their_source_was_written() {
    let dir = tempfile::tempdir().unwrap();
    let pool = open(dir.path(), true);
    let v = pool.create_volume(&spec("src", 8 * MIB)).unwrap();
    let fresh = pool
        .create_volume(&VolumeSpec {
            source: Some(Source::Volume(v.id.clone())),
            ..spec("fresh-clone", 8 * MIB)
        })
        .unwrap();
    assert_eq!(fresh.written, Some(false));
    let lock = pool.lock_volume(&v.id).unwrap();
    pool.mark_written(&v.id, &lock).unwrap();
    drop(lock);
    let clone = pool
        .create_volume(&VolumeSpec {
            source: Some(Source::Volume(v.id.clone())),
            ..spec("clone", 8 * MIB)
        })
        .unwrap();
    assert_eq!(clone.written, Some(true));
    let snap = pool.create_snapshot("snap", &v.id).unwrap();
    assert_eq!(snap.written, Some(true));
    let restored = pool
        .create_volume(&VolumeSpec {
            source: Some(Source::Snapshot(snap.id.clone())),
            ..spec("restored", 8 * MIB)
        })
        .unwrap();
    assert_eq!(restored.written, Some(true));
    // Records without the field (older pools) stay unknown.
    let path = dir.path().join("volumes").join(&v.id).join(store::META);
    let text = std::fs::read_to_string(&path).unwrap();
    let mut json: serde_json::Value = serde_json::from_str(&text).unwrap();
    json.as_object_mut().unwrap().remove("written");
    std::fs::write(&path, serde_json::to_vec(&json).unwrap()).unwrap();
    assert_eq!(pool.volume(&v.id).unwrap().written, None);
}

#[test]
fn capacity_follows_what_other_instances_create_grow_and_delete() {
    let dir = tempfile::tempdir().unwrap();
    let a = open(dir.path(), true);
    let b = open(dir.path(), false);
    let empty = unpromised(&b);
    let v = a.create_volume(&spec("v", 8 * MIB)).unwrap();
    assert_eq!(unpromised(&b), empty - 8 * MIB);
    a.expand_volume(
        &v.id,
        CapacityRange {
            required: 24 * MIB,
            limit: 0,
        },
    )
    .unwrap();
    assert_eq!(unpromised(&b), empty - 24 * MIB);
    // A snapshot counts by the blocks it holds: 3 MiB written of 24.
    filevol_kit::files::fill(&a.image_path(&v.id), 5 * MIB, 3 << 20, 1);
    let s = a.create_snapshot("s", &v.id).unwrap();
    let held = allocated_of(&dir.path().join("snapshots").join(&s.id).join("image"));
    assert!((3 * MIB..24 * MIB).contains(&held), "{held}");
    assert_eq!(b.usage().unwrap().snapshot_bytes, held);
    assert_eq!(unpromised(&b), empty - 24 * MIB - held);
    a.delete_snapshot(&s.id).unwrap();
    a.delete_volume(&v.id).unwrap();
    assert_eq!(unpromised(&b), empty);
}

fn allocated_of(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().blocks() * 512
}

/// The kernel resizes a btrfs only at 256 MiB or more: no btrfs volume is
/// made smaller, and one an older version made smaller (114 MiB) grows at
/// least to that, or not at all.
#[test]
fn btrfs_volumes_are_never_smaller_than_the_kernel_resizes() {
    let dir = tempfile::tempdir().unwrap();
    let pool = open(dir.path(), true);
    let btrfs = VolumeSpec {
        access: AccessType::Mount,
        fs_type: Some(FsType::Btrfs),
        ..spec("small-btrfs", 100 * MIB)
    };
    let v = pool.create_volume(&btrfs).unwrap();
    assert_eq!(v.capacity_bytes, 256 * MIB);

    // Shrink its record and image to what an older version made.
    let image = pool.image_path(&v.id);
    {
        let lock = pool.lock_volume(&v.id).unwrap();
        let mut old = pool.volume(&v.id).unwrap();
        old.capacity_bytes = 114 * MIB;
        pool.update_volume(&old, &lock).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&image)
            .unwrap()
            .set_len(114 * MIB)
            .unwrap();
    }
    let limited = CapacityRange {
        required: 200 * MIB,
        limit: 200 * MIB,
    };
    assert!(matches!(
        pool.expand_volume(&v.id, limited),
        Err(PoolError::OutOfRange(_))
    ));
    assert_eq!(pool.volume(&v.id).unwrap().capacity_bytes, 114 * MIB);
    let grown = pool
        .expand_volume(
            &v.id,
            CapacityRange {
                required: 200 * MIB,
                limit: 0,
            },
        )
        .unwrap();
    assert_eq!(grown.capacity_bytes, 256 * MIB);
    assert_eq!(std::fs::metadata(&image).unwrap().len(), 256 * MIB);
}

#[test]
fn a_volume_made_again_under_its_id_is_sized_again() {
    let dir = tempfile::tempdir().unwrap();
    let a = open(dir.path(), true);
    let b = open(dir.path(), false);
    let empty = unpromised(&b);
    let v = a.create_volume(&spec("same-name", 8 * MIB)).unwrap();
    assert_eq!(unpromised(&b), empty - 8 * MIB);
    a.delete_volume(&v.id).unwrap();
    a.create_volume(&spec("same-name", 40 * MIB)).unwrap();
    assert_eq!(unpromised(&b), empty - 40 * MIB);
}

#[test]
fn a_copy_waits_for_its_source_s_lock() {
    // A node formatting the source at its first stage holds the source's
    // lock: a clone or snapshot then is refused (ABORTED, retried), never
    // taken of the blank image with the record of the formatted one.
    let dir = tempfile::tempdir().unwrap();
    let node = open(dir.path(), false);
    let controller = open(dir.path(), true);
    let v = controller.create_volume(&spec("src", 8 * MIB)).unwrap();
    let held = node.lock_volume(&v.id).unwrap();
    let clone = VolumeSpec {
        source: Some(Source::Volume(v.id.clone())),
        ..spec("clone", 8 * MIB)
    };
    assert!(matches!(
        controller.create_volume(&clone),
        Err(PoolError::Busy { .. })
    ));
    assert!(matches!(
        controller.create_snapshot("snap", &v.id),
        Err(PoolError::Busy { .. })
    ));
    drop(held);
    controller.create_volume(&clone).unwrap();
    controller.create_snapshot("snap", &v.id).unwrap();
    // Nothing half-made was left by the refused attempts.
    assert_eq!(controller.list_volumes(None, 0).unwrap().0.len(), 2);
}

/// Swaps two names in `dir` (RENAME_EXCHANGE) as fast as it can until
/// `stop`, as a pod that owns the directory can while a copy runs.
fn swap_until(dir: &Path, a: &str, b: &str, stop: &std::sync::atomic::AtomicBool) -> usize {
    let mut swaps = 0;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        rustix::fs::renameat_with(
            rustix::fs::CWD,
            dir.join(a),
            rustix::fs::CWD,
            dir.join(b),
            rustix::fs::RenameFlags::EXCHANGE,
        )
        .unwrap();
        swaps += 1;
    }
    swaps
}

/// Sets the flag when dropped: a swapping thread stops even when the test
/// panics (else the scope would wait for it forever).
struct StopOnDrop<'a>(&'a std::sync::atomic::AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Every path in `root`, without following links.
fn walk_names(root: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(root).unwrap() {
        let e = e.unwrap();
        out.push(e.path());
        if e.file_type().unwrap().is_dir() {
            walk_names(&e.path(), out);
        }
    }
}

#[test]
fn copies_of_a_dir_volume_never_follow_a_name_swapped_for_a_link() {
    use std::sync::atomic::AtomicBool;
    let dir = tempfile::tempdir().unwrap();
    // A host directory the pod must never get a copy of.
    let host = dir.path().join("host");
    std::fs::create_dir(&host).unwrap();
    std::fs::write(host.join("SENTINEL"), b"host data").unwrap();
    let root = dir.path().join("pool");
    std::fs::create_dir(&root).unwrap();
    let pool = open(&root, true);
    let v = pool.create_volume(&dir_spec("tenant")).unwrap();
    let data = pool.data_path(&v.id);
    std::fs::create_dir(data.join("sub")).unwrap();
    for i in 0..50 {
        std::fs::write(data.join("sub").join(format!("f{i}")), b"pod data").unwrap();
    }
    std::os::unix::fs::symlink(&host, data.join("link")).unwrap();
    let stop = AtomicBool::new(false);
    let (swaps, copies) = std::thread::scope(|s| {
        let swapper = s.spawn(|| swap_until(&data, "sub", "link", &stop));
        let stopper = StopOnDrop(&stop);
        let mut copies = Vec::new();
        for i in 0..30 {
            let snap = pool.create_snapshot(&format!("snap-{i}"), &v.id).unwrap();
            copies.push(pool.snapshot_dir(&snap.id).join("data"));
            let clone = pool
                .create_volume(&VolumeSpec {
                    source: Some(Source::Volume(v.id.clone())),
                    ..dir_spec(&format!("clone-{i}"))
                })
                .unwrap();
            copies.push(pool.data_path(&clone.id));
        }
        drop(stopper);
        (swapper.join().unwrap(), copies)
    });
    assert!(swaps > 0);
    for copy in copies {
        let mut names = Vec::new();
        walk_names(&copy, &mut names);
        assert!(
            !names.iter().any(|n| n.ends_with("SENTINEL")),
            "{} holds a copy of the host directory",
            copy.display()
        );
        // The copy is no instant (the pod's names move under it), but
        // whatever it caught is the pod's: its files, and the link copied
        // as a link.
        for n in &names {
            let m = std::fs::symlink_metadata(n).unwrap();
            if m.file_type().is_symlink() {
                assert_eq!(std::fs::read_link(n).unwrap(), host);
            } else if m.is_file() {
                assert_eq!(std::fs::read(n).unwrap(), b"pod data");
            }
        }
    }
}

#[test]
fn a_fifo_swapped_in_for_a_file_never_blocks_a_copy() {
    use std::os::unix::fs::OpenOptionsExt;
    use std::sync::atomic::{AtomicBool, Ordering};
    let dir = tempfile::tempdir().unwrap();
    let pool = open(dir.path(), true);
    let v = pool.create_volume(&dir_spec("fifo")).unwrap();
    let data = pool.data_path(&v.id);
    std::fs::write(data.join("file"), b"pod data").unwrap();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        data.join("pipe"),
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o640),
        0,
    )
    .unwrap();
    let stop = AtomicBool::new(false);
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::scope(|s| {
        let swapper = s.spawn(|| swap_until(&data, "file", "pipe", &stop));
        let stopper = StopOnDrop(&stop);
        s.spawn(|| {
            for i in 0..30 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let snap = pool.create_snapshot(&format!("s{i}"), &v.id).unwrap();
                let copy = pool.snapshot_dir(&snap.id).join("data");
                // Whatever each name was when the copy reached it: a FIFO
                // recreated as a FIFO (never read from), or the pod's file.
                use std::os::unix::fs::FileTypeExt;
                for name in ["file", "pipe"] {
                    let Ok(m) = std::fs::symlink_metadata(copy.join(name)) else {
                        continue;
                    };
                    if m.is_file() {
                        assert_eq!(std::fs::read(copy.join(name)).unwrap(), b"pod data");
                    } else {
                        assert!(m.file_type().is_fifo(), "{name}: {m:?}");
                    }
                }
            }
            done_tx.send(()).unwrap();
        });
        // A copy that opened the FIFO would wait for a writer forever.
        let finished = done_rx.recv_timeout(std::time::Duration::from_secs(120));
        drop(stopper);
        if finished.is_err() {
            // Free the blocked copy (a writer's open wakes it) so the test
            // fails instead of hanging.
            while done_rx
                .recv_timeout(std::time::Duration::from_millis(100))
                .is_err()
            {
                for name in ["file", "pipe"] {
                    let _ = std::fs::OpenOptions::new()
                        .write(true)
                        .custom_flags(libc::O_NONBLOCK)
                        .open(data.join(name));
                }
            }
        }
        assert!(swapper.join().unwrap() > 0);
        assert!(finished.is_ok(), "a copy blocked on the FIFO");
    });
}

#[test]
fn a_dir_volume_in_use_is_not_copied() {
    let dir = tempfile::tempdir().unwrap();
    let controller = open(dir.path(), true);
    let node = open(dir.path(), false);
    let v = controller.create_volume(&dir_spec("busy")).unwrap();
    // A node plugin has it staged (read-only stages hold the fence shared
    // too): no snapshot, no clone.
    let fence = node.fence_volume(&v.id, LockKind::Shared).unwrap().unwrap();
    let refused = controller.create_snapshot("busy-snap", &v.id).unwrap_err();
    assert!(matches!(refused, PoolError::InUse(_)), "{refused}");
    assert!(refused.to_string().contains("point-in-time"), "{refused}");
    let clone = VolumeSpec {
        source: Some(Source::Volume(v.id.clone())),
        ..dir_spec("busy-clone")
    };
    assert!(matches!(
        controller.create_volume(&clone),
        Err(PoolError::InUse(_))
    ));
    drop(fence);
    // Published for writing (the record says so even with no fence held,
    // as while a node plugin restarts): refused as well.
    controller
        .register_node(&crate::volume::meta::NodeRecord {
            node_id: "n1".into(),
            topology: BTreeMap::new(),
            max_volumes: 0,
        })
        .unwrap();
    controller
        .publish(&v.id, "n1", AccessMode::MultiNodeMultiWriter, false)
        .unwrap();
    assert!(matches!(
        controller.create_snapshot("busy-snap", &v.id),
        Err(PoolError::InUse(_))
    ));
    controller.unpublish(&v.id, None).unwrap();
    controller.create_snapshot("busy-snap", &v.id).unwrap();
    controller.create_volume(&clone).unwrap();
}

#[test]
fn an_image_attached_for_writing_is_not_byte_copied() {
    let dir = tempfile::tempdir().unwrap();
    let pool = open(dir.path(), true);
    // This test's pool cannot reflink (the byte copy is what is checked).
    let probe = pool.create_volume(&spec("probe", MIB)).unwrap();
    assert_eq!(
        pool.create_snapshot("probe", &probe.id).unwrap().method,
        CopyMethod::Sparse,
        "the temporary directory's filesystem can reflink; this test needs one that cannot"
    );
    pool.register_node(&crate::volume::meta::NodeRecord {
        node_id: "n1".into(),
        topology: BTreeMap::new(),
        max_volumes: 0,
    })
    .unwrap();
    let v = pool.create_volume(&spec("attached", 8 * MIB)).unwrap();
    pool.publish(&v.id, "n1", AccessMode::SingleNodeWriter, false)
        .unwrap();
    // No node plugin holds its fence (one restarting, say): the record
    // alone refuses the copy.
    let refused = pool.create_snapshot("torn", &v.id).unwrap_err();
    assert!(matches!(refused, PoolError::InUse(_)), "{refused}");
    pool.unpublish(&v.id, None).unwrap();
    // Attached read-only: nothing writes it, the copy is whole.
    pool.publish(&v.id, "n1", AccessMode::SingleNodeReaderOnly, true)
        .unwrap();
    pool.create_snapshot("whole", &v.id).unwrap();
}

// ---- capacity: what snapshots count as, room, the refusal ----

fn open_with(root: &Path, reserve_bytes: u64, overcommit: f64) -> Pool {
    Pool::open(
        root,
        PoolOptions {
            reserve_bytes,
            overcommit,
            ..opts(true)
        },
    )
    .unwrap()
}

/// Allocated bytes of a tree as `du` counts them, without the pool's walk:
/// every entry's blocks, a file with several links once.
fn du(path: &Path, seen: &mut std::collections::HashSet<u64>) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::symlink_metadata(path).unwrap();
    if !m.is_dir() && m.nlink() > 1 && !seen.insert(m.ino()) {
        return 0;
    }
    let mut total = m.blocks() * 512;
    if m.is_dir() {
        for e in std::fs::read_dir(path).unwrap() {
            total += du(&e.unwrap().path(), seen);
        }
    }
    total
}

#[test]
fn a_snapshot_counts_the_blocks_it_can_come_to_own_and_keeps_that_count() {
    let dir = tempfile::tempdir().unwrap();
    let a = open(dir.path(), true);
    let v = a.create_volume(&spec("src", 64 * MIB)).unwrap();
    let image = a.image_path(&v.id);
    filevol_kit::files::fill(&image, 0, 2 << 20, 1);
    filevol_kit::files::fill(&image, 40 * MIB, 1 << 20, 2);
    let s = a.create_snapshot("s", &v.id).unwrap();
    let snap_image = dir.path().join("snapshots").join(&s.id).join("image");
    let held = allocated_of(&snap_image);
    assert!((3 * MIB..64 * MIB).contains(&held), "{held}");
    let usage = a.usage().unwrap();
    assert_eq!(
        (usage.snapshots, usage.snapshot_bytes, usage.volume_bytes),
        (1, held, 64 * MIB),
        "the volume at its capacity, the snapshot at its blocks"
    );
    // The source goes on being written: the snapshot holds what it held,
    // for this process (which remembers) and for a new one (which reads).
    filevol_kit::files::fill(&image, 10 * MIB, 10 << 20, 3);
    assert_eq!(allocated_of(&snap_image), held);
    assert_eq!(a.usage().unwrap().snapshot_bytes, held);
    let b = open(dir.path(), false);
    assert_eq!(b.usage().unwrap().snapshot_bytes, held);
    // The same figure where the tools read it.
    assert_eq!(
        capacity::allocated(&dir.path().join("snapshots").join(&s.id)).unwrap(),
        held
    );

    // A directory snapshot counts its whole tree, a file linked twice once.
    let d = a.create_volume(&dir_spec("tree")).unwrap();
    let data = a.data_path(&d.id);
    std::fs::create_dir(data.join("sub")).unwrap();
    std::fs::write(data.join("a"), vec![7u8; 300 << 10]).unwrap();
    std::fs::write(data.join("sub/b"), vec![9u8; 200 << 10]).unwrap();
    std::os::unix::fs::symlink("a", data.join("link")).unwrap();
    let ds = a.create_snapshot("tree-snap", &d.id).unwrap();
    let snap_data = dir.path().join("snapshots").join(&ds.id).join("data");
    let tree = du(&snap_data, &mut Default::default());
    assert!(tree >= 500 << 10, "{tree}");
    assert_eq!(b.usage().unwrap().snapshot_bytes, held + tree);
    // The pool's walk against du's, on the volume with a second link.
    std::fs::hard_link(data.join("a"), data.join("a2")).unwrap();
    assert_eq!(
        capacity::allocated(&dir.path().join("volumes").join(&d.id)).unwrap(),
        du(&data, &mut Default::default())
    );
    // The metrics' figure reads the images and the snapshots' counts; the
    // directory volume's tree is not walked there (metrics::dir_usage is).
    assert_eq!(
        a.allocation().unwrap(),
        capacity::Allocation {
            volume_images: allocated_of(&image),
            snapshots: held + tree,
        }
    );
    assert_eq!(a.dir_volume_ids().unwrap(), vec![d.id.clone()]);
}

#[test]
fn an_image_snapshot_counts_at_most_its_size() {
    let meta = |layout| SnapshotMeta {
        format: FORMAT,
        id: "s".into(),
        name: "s".into(),
        source_volume_id: "v".into(),
        size_bytes: 8 * MIB,
        layout,
        access: AccessType::Block,
        fs_type: None,
        method: CopyMethod::Reflink,
        group_id: None,
        created_secs: 0,
        created_nanos: 0,
        written: None,
        subvolume: false,
    };
    assert_eq!(
        room::snapshot_counts(&meta(Layout::Image), 3 * MIB),
        3 * MIB
    );
    // Blocks past the end (speculative preallocation) are not the
    // snapshot's to own.
    assert_eq!(
        room::snapshot_counts(&meta(Layout::Image), 9 * MIB),
        8 * MIB
    );
    // A directory has no size to cap at.
    assert_eq!(room::snapshot_counts(&meta(Layout::Dir), 9 * MIB), 9 * MIB);
}

/// The figures of the report's pool: 2 GiB, the default reserve, one 1 GiB
/// volume and a reflinked snapshot of it holding 100 MiB.
fn two_gib_pool(overcommit: f64, fs_free: u64) -> room::Usage {
    room::Usage {
        fs_size: 2 << 30,
        fs_free,
        reserve: 64 * MIB,
        overcommit,
        volumes: 1,
        volume_bytes: 1 << 30,
        snapshots: 1,
        snapshot_bytes: 100 * MIB,
        templates: 0,
        template_bytes: 0,
        in_progress: 0,
    }
}

#[test]
fn room_is_what_the_promises_leave_and_above_ratio_one_what_the_filesystem_holds() {
    // Up to 1, free space is not consulted: what is counted can all be
    // written.
    let u = two_gib_pool(1.0, 50 * MIB);
    assert_eq!(u.usable(), 2048 * MIB - 64 * MIB);
    assert_eq!(u.room(), 2048 * MIB - 64 * MIB - 1024 * MIB - 100 * MIB);
    assert_eq!(u.free_bound(), None);
    assert!(!u.free_space_binds());
    // Above 1 the filesystem's free space less the reserve bounds it...
    let u = two_gib_pool(3.0, 500 * MIB);
    assert_eq!(u.unpromised(), 3 * 1984 * MIB - 1124 * MIB);
    assert_eq!(u.room(), 436 * MIB);
    assert!(u.free_space_binds());
    // ...and a full one leaves no room at all, whatever the ratio.
    assert_eq!(two_gib_pool(3.0, 10 * MIB).room(), 0);
    // When the promises are the tighter bound, they set the room.
    let u = two_gib_pool(1.5, 1950 * MIB);
    assert_eq!(u.room(), 2976 * MIB - 1124 * MIB);
    assert!(!u.free_space_binds());
    // In-progress creations count against the promises.
    let u = room::Usage {
        in_progress: 24 * MIB,
        ..two_gib_pool(1.0, 0)
    };
    assert_eq!(u.room(), 860 * MIB - 24 * MIB);
}

#[test]
fn above_ratio_one_a_real_pool_never_offers_more_than_its_free_space() {
    let dir = tempfile::tempdir().unwrap();
    let pool = open(dir.path(), true);
    let usage = pool.usage().unwrap();
    assert!(usage.free_space_binds(), "{usage:?}");
    // Read again, so the filesystem may have moved; still far below what
    // an overcommit of 1000 alone would offer.
    let room = pool.capacity().unwrap();
    assert!(
        room <= usage.fs_size && room < usage.unpromised(),
        "{room} {usage:?}"
    );
    let asked = align_up(usage.fs_free + (1 << 40));
    let e = pool.create_volume(&spec("too-big", asked)).unwrap_err();
    let PoolError::Exhausted { shortfall } = &e else {
        panic!("{e}");
    };
    assert_eq!(shortfall.need, room::Need::Capacity(asked));
    let text = e.to_string();
    for part in [
        "free space",
        "which binds",
        "raising --overcommit does not help",
    ] {
        assert!(text.contains(part), "{part:?} missing: {text}");
    }
    assert!(std::fs::read_dir(dir.path().join("volumes"))
        .unwrap()
        .next()
        .is_none());
}

#[test]
fn a_refusal_says_how_the_room_was_reached_and_what_makes_more() {
    let dir = tempfile::tempdir().unwrap();
    let pool = open_with(dir.path(), 0, 1.0);
    let v = pool.create_volume(&spec("v", 8 * MIB)).unwrap();
    filevol_kit::files::fill(&pool.image_path(&v.id), 0, 2 << 20, 4);
    let s = pool.create_snapshot("s", &v.id).unwrap();
    let held = allocated_of(&dir.path().join("snapshots").join(&s.id).join("image"));
    let room = pool.capacity().unwrap();
    let asked = align_up(room + (1 << 30));
    let e = pool.create_volume(&spec("too-big", asked)).unwrap_err();
    let PoolError::Exhausted { shortfall } = &e else {
        panic!("{e}");
    };
    assert_eq!(shortfall.need, room::Need::Capacity(asked));
    let u = &shortfall.usage;
    assert_eq!(
        (
            u.volumes,
            u.volume_bytes,
            u.snapshots,
            u.snapshot_bytes,
            u.in_progress
        ),
        (1, 8 * MIB, 1, held, 0)
    );
    assert_eq!(u.room(), room);
    let text = e.to_string();
    for part in [
        format!("cannot promise {} more", human_fine(asked)),
        "less 8.00 MiB promised to 1 volume".to_owned(),
        format!(
            "less {} counted for 1 snapshot (by the blocks",
            human_fine(held)
        ),
        "raise --overcommit (now 1.0)".to_owned(),
        "delete volumes or snapshots".to_owned(),
    ] {
        assert!(text.contains(&part), "{part:?} missing: {text}");
    }
    // Nothing was made.
    assert_eq!(pool.list_volumes(None, 0).unwrap().0.len(), 1);
}

#[test]
fn the_refusal_of_the_two_gib_pool_reads_in_full() {
    let refusal = |usage| PoolError::exhausted(room::Need::Capacity(1 << 30), usage).to_string();
    assert_eq!(
        refusal(two_gib_pool(1.0, 1900 * MIB)),
        "the pool cannot promise 1.00 GiB more: it has 860 MiB left. Room is the usable size 1.94 GiB (2.00 GiB less the reserve of 64.0 MiB) x overcommit 1.0 = 1.94 GiB, less 1.00 GiB promised to 1 volume, less 100 MiB counted for 1 snapshot (by the blocks they can come to own, not their size), less 0 B promised to creations in progress = 860 MiB. To make room: delete volumes or snapshots, grow the pool filesystem, or, for thin volumes, raise --overcommit (now 1.0)"
    );
    assert_eq!(
        refusal(two_gib_pool(3.0, 500 * MIB)),
        "the pool cannot promise 1.00 GiB more: it has 436 MiB left. Room is the usable size 1.94 GiB (2.00 GiB less the reserve of 64.0 MiB) x overcommit 3.0 = 5.81 GiB, less 1.00 GiB promised to 1 volume, less 100 MiB counted for 1 snapshot (by the blocks they can come to own, not their size), less 0 B promised to creations in progress = 4.71 GiB; above an overcommit of 1.0 room is also bounded by the pool filesystem's free space, 500 MiB less the reserve = 436 MiB, which binds. To make room: delete volumes or snapshots, or grow the pool filesystem; raising --overcommit does not help while free space binds"
    );
    // Templates count, and say so.
    let with_templates = room::Usage {
        templates: 2,
        template_bytes: 10 * MIB,
        ..two_gib_pool(1.0, 1900 * MIB)
    };
    assert_eq!(with_templates.room(), 850 * MIB);
    assert!(refusal(with_templates).contains(
        "not their size), less 10.0 MiB held by 2 formatted templates, less 0 B promised"
    ));
    let copy = PoolError::exhausted(room::Need::Space(600 * MIB), two_gib_pool(1.0, 500 * MIB));
    assert_eq!(
        copy.to_string(),
        "a byte copy needs 600 MiB of free space on the pool filesystem, which has 500 MiB free, 436 MiB beyond the reserve of 64.0 MiB. To make room: delete volumes or snapshots, or grow the pool filesystem (a pool that can reflink, xfs or btrfs, takes snapshots without copying; --overcommit does not help a copy)"
    );
}

// ---- errors are not absence: only ENOENT proves an object gone ----

/// Opens a janitor on `root` (a controller's start) and lets it finish.
fn janitor_pass(root: &Path) {
    drop(open(root, true));
}

#[test]
fn members_stay_while_their_group_record_cannot_be_looked_at() {
    let dir = tempfile::tempdir().unwrap();
    member(dir.path(), "m4", "g4");
    let kept = dir.path().join("snapshots/m4");
    // Every look at the group's record fails.
    {
        let _eio = crate::faults::inject_eio("groups/g4.json", 0);
        janitor_pass(dir.path());
        assert!(kept.join("meta.json").exists());
    }
    // The first look finds no record, the one under the group's lock fails:
    // that second look decides, and an error is not "no record".
    {
        let _eio = crate::faults::inject_eio("groups/g4.json", 1);
        janitor_pass(dir.path());
        assert!(kept.join("meta.json").exists());
    }
    // The group's lock cannot be taken (EISDIR): logged, the members stay,
    // and the rest of the clean-up still runs.
    std::fs::create_dir(dir.path().join("groups/g4.lock")).unwrap();
    janitor_pass(dir.path());
    assert!(kept.join("meta.json").exists());
    std::fs::remove_dir(dir.path().join("groups/g4.lock")).unwrap();
    // Proven absent, with its lock free: the creator is gone.
    janitor_pass(dir.path());
    assert!(!kept.exists());
}

#[test]
fn an_attachment_stays_while_its_volume_cannot_be_read() {
    let dir = tempfile::tempdir().unwrap();
    let pool = open(dir.path(), false);
    register(&pool, "n1", 0);
    let v = pool.create_volume(&spec("attached", 8 * MIB)).unwrap();
    pool.publish(&v.id, "n1", AccessMode::SingleNodeWriter, false)
        .unwrap();
    let vdir = dir.path().join("volumes").join(&v.id);
    let record = vdir.join(store::META);

    // Its record cannot be read (EIO).
    {
        let _eio = crate::faults::inject_eio(&format!("volumes/{}/meta.json", v.id), 0);
        janitor_pass(dir.path());
        assert_eq!(records(dir.path()).len(), 1);
    }
    // Its record is gone and its directory cannot be looked at: that is no
    // proof the volume is gone.
    std::fs::remove_file(&record).unwrap();
    {
        let _eio = crate::faults::inject_eio(&format!("volumes/{}", v.id), 0);
        assert!(matches!(pool.volume(&v.id), Err(PoolError::Io { .. })));
        janitor_pass(dir.path());
        assert_eq!(records(dir.path()).len(), 1);
        let (listed, _) = pool.list_volumes(None, 0).unwrap();
        assert!(listed[0]
            .1
            .as_ref()
            .unwrap_err()
            .contains("Input/output error"));
    }
    // A directory without its record: damaged, still attached.
    assert!(matches!(pool.volume(&v.id), Err(PoolError::Damaged { .. })));
    janitor_pass(dir.path());
    assert_eq!(records(dir.path()).len(), 1);
    // A path under it that is a file (ENOTDIR on every look): kept too.
    let aside = dir.path().join(".aside");
    std::fs::rename(&vdir, &aside).unwrap();
    std::fs::write(&vdir, b"").unwrap();
    janitor_pass(dir.path());
    assert_eq!(records(dir.path()).len(), 1);
    std::fs::remove_file(&vdir).unwrap();
    // Proven absent: stale for good.
    janitor_pass(dir.path());
    assert!(records(dir.path()).is_empty());
    drop(aside);
}

#[test]
fn a_delete_answers_ok_only_for_a_volume_proven_absent_or_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let pool = open(dir.path(), false);
    let v = pool.create_volume(&spec("kept", 8 * MIB)).unwrap();
    let vdir = dir.path().join("volumes").join(&v.id);
    let image = pool.image_path(&v.id);
    let record = vdir.join(store::META);
    let io_error = |r: Result<(), PoolError>| matches!(r, Err(PoolError::Io { .. }));

    // The record cannot be read.
    {
        let _eio = crate::faults::inject_eio(&format!("volumes/{}/meta.json", v.id), 0);
        assert!(io_error(pool.delete_volume(&v.id)));
    }
    assert!(image.exists() && record.exists());
    // Its image cannot be looked at: reported as unreadable, not missing.
    {
        let _eio = crate::faults::inject_eio(&format!("volumes/{}/image", v.id), 0);
        let h = pool.volume_health(&v);
        assert!(
            h.has(crate::health::Reason::DataUnreadable),
            "{}",
            h.message()
        );
    }
    // The record is gone (ENOENT) and the directory cannot be looked at.
    let saved = std::fs::read(&record).unwrap();
    std::fs::remove_file(&record).unwrap();
    {
        let _eio = crate::faults::inject_eio(&format!("volumes/{}", v.id), 0);
        assert!(io_error(pool.delete_volume(&v.id)));
    }
    assert!(image.exists());
    std::fs::write(&record, saved).unwrap();
    // Every path under the volume fails with ENOTDIR (its directory moved
    // aside, a file in its place): the lock cannot be taken.
    let aside = dir.path().join(".aside");
    std::fs::rename(&vdir, &aside).unwrap();
    std::fs::write(&vdir, b"").unwrap();
    match pool.delete_volume(&v.id) {
        Err(PoolError::Io { source, .. }) => {
            assert_eq!(source.raw_os_error(), Some(libc::ENOTDIR))
        }
        other => panic!("{other:?}"),
    }
    std::fs::remove_file(&vdir).unwrap();
    std::fs::rename(&aside, &vdir).unwrap();
    assert_eq!(pool.volume(&v.id).unwrap(), v);
    // With the faults lifted, the delete deletes; then the id is proven
    // absent and a retry answers OK.
    pool.delete_volume(&v.id).unwrap();
    assert!(!vdir.exists());
    pool.delete_volume(&v.id).unwrap();
}

#[test]
fn promises_of_an_instance_whose_lock_cannot_be_looked_at_are_not_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let pool = open(dir.path(), false);
    let other = open(dir.path(), false);
    let _promise = other.promise(64 * MIB).unwrap();
    assert_eq!(pool.usage().unwrap().in_progress, 64 * MIB);
    // `other`'s scratch lock cannot be looked at: it may be alive, so the
    // sum fails instead of leaving its promise out.
    let own = other.scratch_path("x");
    let instance = own.parent().unwrap().file_name().unwrap().to_str().unwrap();
    {
        let _eio = crate::faults::inject_eio(&format!(".scratch/{instance}.lock"), 0);
        assert!(matches!(pool.usage(), Err(PoolError::Io { .. })));
    }
    assert_eq!(pool.usage().unwrap().in_progress, 64 * MIB);
}

/// Templates count in capacity by their blocks, and no more than
/// `MAX_TEMPLATES` are kept: the least recently used go first, one unused
/// for a day goes whatever the count, and the one just made is spared.
#[test]
fn templates_count_their_blocks_and_the_least_recently_used_go_beyond_the_bound() {
    use std::time::{Duration, SystemTime};
    let dir = tempfile::tempdir().unwrap();
    let pool = open(dir.path(), false);
    let before = pool.usage().unwrap();
    assert_eq!((before.templates, before.template_bytes), (0, 0));
    let now = SystemTime::now();
    for i in 0..10u64 {
        let path = pool.template_path(&format!("ext4-{i}-x"));
        std::fs::write(&path, vec![1u8; 64 << 10]).unwrap();
        // Template i was last used i minutes ago.
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(now - Duration::from_secs(60 * i))
            .unwrap();
    }
    let usage = pool.usage().unwrap();
    assert_eq!(usage.templates, 10);
    assert!(usage.template_bytes >= 10 * (64 << 10), "{usage:?}");
    assert_eq!(
        usage.unpromised() + usage.template_bytes,
        before.unpromised()
    );

    // The oldest, 9, is spared (just made); 7 and 8 go.
    assert_eq!(
        pool.prune_templates(crate::pool::MAX_TEMPLATES, Some("ext4-9-x"))
            .unwrap(),
        2
    );
    let left = |pool: &Pool| {
        let mut names: Vec<String> = std::fs::read_dir(pool.root().join("templates"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    };
    assert_eq!(
        left(&pool),
        [
            "ext4-0-x", "ext4-1-x", "ext4-2-x", "ext4-3-x", "ext4-4-x", "ext4-5-x", "ext4-6-x",
            "ext4-9-x"
        ]
    );
    assert_eq!(pool.usage().unwrap().templates, crate::pool::MAX_TEMPLATES);
    // Idle for longer than a day: reclaimed, however few there are.
    let stale = pool.template_path("ext4-0-x");
    std::fs::File::options()
        .write(true)
        .open(&stale)
        .unwrap()
        .set_modified(now - crate::pool::TEMPLATE_IDLE - Duration::from_secs(1))
        .unwrap();
    assert_eq!(
        pool.prune_templates(crate::pool::MAX_TEMPLATES, None)
            .unwrap(),
        1
    );
    assert!(!stale.exists());
    assert_eq!(left(&pool).len(), 7);
}

#[test]
fn a_volume_whose_first_format_was_cut_short_is_not_snapshotted() {
    // Its image holds a half-made filesystem that only a stage of the
    // volume itself makes again: a restore of a snapshot of it would not
    // know to, so the snapshot is refused until the volume is staged.
    let dir = tempfile::tempdir().unwrap();
    let pool = open(dir.path(), true);
    let v = pool.create_volume(&spec("cut-short", 8 * MIB)).unwrap();
    {
        let held = pool.lock_volume(&v.id).unwrap();
        pool.mark_formatting(&v.id, &held).unwrap();
    }
    match pool.create_snapshot("snap", &v.id) {
        Err(PoolError::InUse(why)) => assert!(why.contains("cut short"), "{why}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(pool.all_snapshots().unwrap().is_empty());
}

/// `zeroFill`: a new thick image, and a thick clone of a thin one, leave
/// the build with zeros written over every hole (no unwritten extent for
/// the first write to convert), the clone keeping its source's data; a
/// thick image without it is preallocated only (all of it a hole to
/// SEEK_HOLE: unwritten).
#[test]
fn a_zero_filled_thick_image_has_no_hole_left() {
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().unwrap();
    let pool = open(dir.path(), false);
    let image = |id: &str| dir.path().join("volumes").join(id).join("image");
    let ranges = |id: &str| {
        let f = std::fs::File::open(image(id)).unwrap();
        crate::sys::extents::DataRanges::new(&f, 0, 16 * MIB)
            .collect::<std::io::Result<Vec<_>>>()
            .unwrap()
    };
    let thick = |name: &str, zero: bool| VolumeSpec {
        thick: true,
        parameters: BTreeMap::from([
            ("thick".to_owned(), "true".to_owned()),
            ("zeroFill".to_owned(), zero.to_string()),
        ]),
        ..spec(name, 16 * MIB)
    };
    let plain = pool.create_volume(&thick("plain", false)).unwrap();
    assert!(ranges(&plain.id).is_empty(), "preallocation only");
    let filled = pool.create_volume(&thick("filled", true)).unwrap();
    assert_eq!(ranges(&filled.id), [(0, 16 * MIB)]);
    assert!(allocated_of(&image(&filled.id)) >= 16 * MIB);

    let source = pool.create_volume(&spec("source", 16 * MIB)).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(image(&source.id))
        .unwrap()
        .write_all_at(&[0x5a; 4096], 4 * MIB)
        .unwrap();
    let clone = pool
        .create_volume(&VolumeSpec {
            source: Some(Source::Volume(source.id.clone())),
            ..thick("clone", true)
        })
        .unwrap();
    assert_eq!(ranges(&clone.id), [(0, 16 * MIB)]);
    let f = std::fs::File::open(image(&clone.id)).unwrap();
    let mut buf = [0u8; 8192];
    f.read_exact_at(&mut buf, 4 * MIB).unwrap();
    assert_eq!(buf[..4096], [0x5a; 4096], "the source's data");
    assert_eq!(buf[4096..], [0; 4096]);
}
