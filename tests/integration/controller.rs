//! The Controller service over the socket, on real pools: loop-mounted xfs
//! (reflink), ext4 (no reflink) and tiny filesystems (pool full). Needs root
//! for the mounts: those tests carry `#[ignore = "needs root"]` (see
//! `filevol_kit::needs`).

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use filevol::ops::requests::{self as req, GIB, MIB};
use filevol::proto::csi;
use filevol::proto::csi::volume_capability::access_mode::Mode;
use filevol_kit::driver::{code, status, Driver, Opts};
use filevol_kit::files::{allocated, digest, fill, image};
use filevol_kit::scratch::{pool_on, Bindfs};
use grpcio::RpcStatusCode;

use crate::BIN;

/// Holds a volume's fence exclusively, as a node plugin with the volume
/// staged for writing does, until the returned file is dropped.
fn hold_fence(pool: &Path, id: &str) -> File {
    let path = pool.join("volumes").join(id).join("fence");
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .unwrap();
    assert!(
        filevol_core::sys::lock::try_lock(&f, filevol_core::sys::lock::LockKind::Exclusive)
            .unwrap()
    );
    f
}

fn snapshot_image(pool: &Path, id: &str) -> PathBuf {
    pool.join("snapshots").join(id).join("image")
}

fn free_bytes(path: &Path) -> u64 {
    let st = rustix::fs::statvfs(path).unwrap();
    st.f_bavail * st.f_frsize
}

fn no_reserve() -> Opts {
    Opts::default().args(&["--reserve", "0"])
}

#[test]
#[ignore = "needs root"]
fn create_is_idempotent_sparse_and_refuses_incompatible_retries() {
    let (_fs, pool) = pool_on("ext4", 256);
    let d = Driver::start_on(BIN, &pool, no_reserve().args(&["--overcommit", "100"]));
    let c = d.controller();
    // Overcommitted, thin volumes may together pass the pool's size, but
    // none may pass what its filesystem has free (GetCapacity's room).
    let free = free_bytes(&pool) as i64;
    assert_eq!(
        code(c.create_volume(&req::create("pvc-sparse", 10 * GIB))),
        RpcStatusCode::RESOURCE_EXHAUSTED
    );
    let v = c
        .create_volume(&req::create("pvc-sparse", 128 * MIB))
        .unwrap()
        .volume
        .unwrap();
    assert_eq!(v.capacity_bytes, 128 * MIB);
    assert!(v.volume_id.starts_with("pvc-sparse-"), "{}", v.volume_id);
    let img = image(&pool, &v.volume_id);
    assert_eq!(std::fs::metadata(&img).unwrap().len(), 128 << 20);
    assert!(allocated(&img) < 1 << 20, "a new image is sparse");
    // The next one is promised as much again: the promises pass the free
    // space, the images do not take it.
    let w = c
        .create_volume(&req::create("pvc-sparse-2", 128 * MIB))
        .unwrap()
        .volume
        .unwrap();
    assert!(2 * 128 * MIB > free, "{free}");
    c.delete_volume(&req::delete(&w.volume_id)).unwrap();
    // Node-local pool: pinned to its node.
    assert_eq!(
        v.accessible_topology[0].segments["topology.filevol.csi.rs/node"],
        "test-node"
    );

    let again = c
        .create_volume(&req::create("pvc-sparse", 128 * MIB))
        .unwrap()
        .volume
        .unwrap();
    assert_eq!(again.volume_id, v.volume_id);
    let err = c.create_volume(&req::create("pvc-sparse", 20 * GIB));
    assert_eq!(code(err), RpcStatusCode::ALREADY_EXISTS);
    let err = c.create_volume(&req::create_with(
        "pvc-sparse",
        128 * MIB,
        &[("layout", "dir")],
    ));
    assert_eq!(code(err), RpcStatusCode::ALREADY_EXISTS);

    c.delete_volume(&req::delete(&v.volume_id)).unwrap();
    c.delete_volume(&req::delete(&v.volume_id)).unwrap();
    assert!(!pool.join("volumes").join(&v.volume_id).exists());
    assert_eq!(
        code(c.delete_volume(&req::delete(""))),
        RpcStatusCode::INVALID_ARGUMENT
    );
}

#[test]
#[ignore = "needs root"]
fn requests_are_checked_before_anything_is_made() {
    // Room for the 1 GiB a request without a range gets (below).
    let (_fs, pool) = pool_on("ext4", 2048);
    let d = Driver::start_on(BIN, &pool, no_reserve().args(&["--overcommit", "10"]));
    let c = d.controller();
    let invalid = |r: csi::CreateVolumeRequest| {
        let st = status(c.create_volume(&r));
        assert_eq!(
            st.code(),
            RpcStatusCode::INVALID_ARGUMENT,
            "{}",
            st.message()
        );
    };
    invalid(req::create_with("p1", 64 * MIB, &[("colour", "blue")]));
    invalid(req::create_with("p1", 64 * MIB, &[("layout", "lvm")]));
    invalid(req::create_with("p1", 64 * MIB, &[("thick", "maybe")]));
    let mut r = req::create("p1", 64 * MIB);
    r.volume_capabilities[0] = req::mount_cap(Mode::SINGLE_NODE_WRITER, "ntfs");
    invalid(r);
    let mut r = req::create_with("p1", 64 * MIB, &[("layout", "dir")]);
    r.volume_capabilities[0] = req::block_cap(Mode::SINGLE_NODE_WRITER);
    invalid(r);
    let mut r = req::create("p1", 64 * MIB);
    r.volume_capabilities[0] = req::mount_cap(Mode::MULTI_NODE_MULTI_WRITER, "ext4");
    invalid(r);
    let mut r = req::create("p1", 64 * MIB);
    r.mutable_parameters.insert("iops".into(), "100".into());
    invalid(r);
    let mut r = req::create("", 64 * MIB);
    invalid(r.clone());
    r.name = "p1".into();
    r.volume_capabilities.clear();
    invalid(r);

    // Limits below what is required, or below the filesystem's minimum.
    let mut r = req::create("p1", 64 * MIB);
    r.capacity_range.as_mut().unwrap().limit_bytes = 32 * MIB;
    assert_eq!(code(c.create_volume(&r)), RpcStatusCode::OUT_OF_RANGE);
    let mut r = req::create("p1", 64 * MIB);
    r.volume_capabilities[0] = req::mount_cap(Mode::SINGLE_NODE_WRITER, "xfs");
    r.capacity_range.as_mut().unwrap().limit_bytes = 100 * MIB;
    assert_eq!(code(c.create_volume(&r)), RpcStatusCode::OUT_OF_RANGE);

    // A missing source is NOT_FOUND.
    assert_eq!(
        code(c.create_volume(&req::restore("p2", 64 * MIB, "no-such-snapshot"))),
        RpcStatusCode::NOT_FOUND
    );
    assert_eq!(
        code(c.create_volume(&req::clone("p2", 64 * MIB, "no-such-volume"))),
        RpcStatusCode::NOT_FOUND
    );
    assert_eq!(std::fs::read_dir(pool.join("volumes")).unwrap().count(), 0);

    // Unaligned sizes round up to whole MiB; xfs gets its minimum.
    let v = c
        .create_volume(&req::create("p3", 5 * MIB + 1))
        .unwrap()
        .volume
        .unwrap();
    assert_eq!(v.capacity_bytes, 6 * MIB);
    let mut r = req::create("p4", 0);
    r.volume_capabilities[0] = req::mount_cap(Mode::SINGLE_NODE_WRITER, "xfs");
    r.capacity_range = protobuf::MessageField::none();
    let v = c.create_volume(&r).unwrap().volume.unwrap();
    assert_eq!(v.capacity_bytes, GIB, "no range: the 1 GiB default");
}

#[test]
#[ignore = "needs root"]
fn thick_images_and_directory_volumes() {
    let (_fs, pool) = pool_on("ext4", 256);
    let d = Driver::start_on(BIN, &pool, no_reserve());
    let c = d.controller();
    let v = c
        .create_volume(&req::create_with("thick", 64 * MIB, &[("thick", "true")]))
        .unwrap()
        .volume
        .unwrap();
    assert!(allocated(&image(&pool, &v.volume_id)) >= 64 << 20);

    let mut r = req::create_with("shared", 64 * MIB, &[("layout", "dir")]);
    r.volume_capabilities[0] = req::mount_cap(Mode::MULTI_NODE_MULTI_WRITER, "");
    let v = c.create_volume(&r).unwrap().volume.unwrap();
    let data = pool.join("volumes").join(&v.volume_id).join("data");
    assert!(data.is_dir());
    assert_eq!(
        std::fs::metadata(&data).unwrap().permissions().mode() & 0o777,
        0o777
    );
    assert_eq!(v.volume_context["layout"], "dir");
}

/// Bytes of `path`'s first `len` bytes that FIEMAP reports shared with
/// another file (a reflink's blocks not yet written by either).
fn shared_bytes(path: &Path, len: u64) -> u64 {
    use filevol_core::sys::extents::ExtentMap;
    const FIEMAP_EXTENT_SHARED: u32 = 0x2000;
    ExtentMap::new(File::open(path).unwrap(), 0, len)
        .map(|e| e.unwrap())
        .filter(|e| e.flags & FIEMAP_EXTENT_SHARED != 0)
        .map(|e| e.length)
        .sum()
}

/// A thick restore or clone owns its blocks on a pool that can reflink:
/// none is shared with its source (xfs unshares them in the kernel, btrfs
/// by rewriting the new image's data before it is committed), every byte
/// of its size is allocated, and it holds the source's data. A thin one
/// stays a cheap reflink. On xfs, ControllerModifyVolume `thick=true`
/// unshares a thin clone too.
#[test]
#[ignore = "needs root"]
fn thick_restores_and_clones_own_their_blocks() {
    for fs in ["xfs", "btrfs"] {
        let (_fs, pool) = pool_on(fs, 1024);
        // The controller process of the shipped layouts, which makes them.
        let d = Driver::start_on(
            BIN,
            &pool,
            no_reserve().args(&["--mode", "controller", "--overcommit", "4"]),
        );
        let c = d.controller();
        let src = c
            .create_volume(&req::create("src", 64 * MIB))
            .unwrap()
            .volume
            .unwrap();
        let src_image = image(&pool, &src.volume_id);
        fill(&src_image, 4 << 20, 24 << 20, 7);
        let snap = c
            .create_snapshot(&req::snapshot("snap", &src.volume_id))
            .unwrap()
            .snapshot
            .unwrap();
        let len = 64u64 << 20;

        let thin = c
            .create_volume(&req::restore("thin", 64 * MIB, &snap.snapshot_id))
            .unwrap()
            .volume
            .unwrap();
        let thin_image = image(&pool, &thin.volume_id);
        assert!(
            shared_bytes(&thin_image, len) >= 24 << 20,
            "{fs}: a thin restore is a reflink"
        );

        let mut restore = req::restore("thick-restore", 64 * MIB, &snap.snapshot_id);
        restore.parameters.insert("thick".into(), "true".into());
        let mut clone = req::clone("thick-clone", 64 * MIB, &src.volume_id);
        clone.parameters.insert("thick".into(), "true".into());
        for r in [restore, clone] {
            let v = c.create_volume(&r).unwrap().volume.unwrap();
            let img = image(&pool, &v.volume_id);
            assert_eq!(shared_bytes(&img, len), 0, "{fs} {}: shares blocks", r.name);
            assert!(
                allocated(&img) >= len,
                "{fs} {}: {} allocated",
                r.name,
                allocated(&img)
            );
            assert_eq!(digest(&img), digest(&src_image), "{fs} {}: data", r.name);
        }

        if fs == "xfs" {
            let mut m = csi::ControllerModifyVolumeRequest::new();
            m.volume_id = thin.volume_id.clone();
            m.mutable_parameters.insert("thick".into(), "true".into());
            c.controller_modify_volume(&m).unwrap();
            assert_eq!(
                shared_bytes(&thin_image, len),
                0,
                "modified thick: shares blocks"
            );
            assert!(allocated(&thin_image) >= len);
            assert_eq!(digest(&thin_image), digest(&src_image));
        }
    }
}

#[test]
#[ignore = "needs root"]
fn snapshots_are_reflinks_on_xfs() {
    let (_fs, pool) = pool_on("xfs", 1024);
    let d = Driver::start_on(BIN, &pool, no_reserve().args(&["--overcommit", "4"]));
    let c = d.controller();
    let v = c
        .create_volume(&req::create("src", 256 * MIB))
        .unwrap()
        .volume
        .unwrap();
    let img = image(&pool, &v.volume_id);
    fill(&img, 16 << 20, 64 << 20, 1);
    let before = free_bytes(&pool);

    // A node holding the image staged (exclusive lock) does not stop a
    // reflink: it is atomic.
    let staged = hold_fence(&pool, &v.volume_id);
    let s = c
        .create_snapshot(&req::snapshot("snap-1", &v.volume_id))
        .unwrap()
        .snapshot
        .unwrap();
    drop(staged);
    assert!(s.ready_to_use);
    assert_eq!(s.size_bytes, 256 * MIB);
    assert_eq!(s.source_volume_id, v.volume_id);
    let used = before.saturating_sub(free_bytes(&pool));
    assert!(
        used < 8 << 20,
        "a reflink snapshot of 64 MiB of data used {used} bytes"
    );
    assert_eq!(digest(&snapshot_image(&pool, &s.snapshot_id)), digest(&img));
    let again = c
        .create_snapshot(&req::snapshot("snap-1", &v.volume_id))
        .unwrap()
        .snapshot
        .unwrap();
    assert_eq!(again.snapshot_id, s.snapshot_id);

    // Restore (larger) and clone carry the data.
    let r = c
        .create_volume(&req::restore("restored", 512 * MIB, &s.snapshot_id))
        .unwrap()
        .volume
        .unwrap();
    assert_eq!(r.capacity_bytes, 512 * MIB);
    let restored = image(&pool, &r.volume_id);
    assert_eq!(std::fs::metadata(&restored).unwrap().len(), 512 << 20);
    let mut a = vec![0u8; 80 << 20];
    let mut b = vec![0u8; 80 << 20];
    File::open(&img).unwrap().read_exact(&mut a).unwrap();
    File::open(&restored).unwrap().read_exact(&mut b).unwrap();
    assert!(a == b, "restored data differs");
    assert_eq!(
        code(c.create_volume(
            &req::restore("too-small", 128 * MIB, &s.snapshot_id).tap_limit(128 * MIB)
        )),
        RpcStatusCode::OUT_OF_RANGE
    );
    let cl = c
        .create_volume(&req::clone("cloned", 256 * MIB, &v.volume_id))
        .unwrap()
        .volume
        .unwrap();
    assert_eq!(digest(&image(&pool, &cl.volume_id)), digest(&img));

    // Deleting the source leaves the snapshot intact.
    c.delete_volume(&req::delete(&v.volume_id)).unwrap();
    let listed = c.list_snapshots(&csi::ListSnapshotsRequest::new()).unwrap();
    assert_eq!(listed.entries.len(), 1);
    let mut get = csi::GetSnapshotRequest::new();
    get.snapshot_id = s.snapshot_id.clone();
    assert!(c.get_snapshot(&get).unwrap().snapshot.ready_to_use);
    c.delete_snapshot(&req::delete_snapshot(&s.snapshot_id))
        .unwrap();
    c.delete_snapshot(&req::delete_snapshot(&s.snapshot_id))
        .unwrap();
    assert_eq!(code(c.get_snapshot(&get)), RpcStatusCode::NOT_FOUND);
}

#[test]
#[ignore = "needs root"]
fn group_snapshots_reflink_every_member() {
    let (_fs, pool) = pool_on("xfs", 1024);
    let d = Driver::start_on(BIN, &pool, no_reserve());
    let c = d.controller();
    let g = d.group_controller();
    let a = c
        .create_volume(&req::create("db-data", 64 * MIB))
        .unwrap()
        .volume
        .unwrap();
    let b = c
        .create_volume(&req::create("db-wal", 64 * MIB))
        .unwrap()
        .volume
        .unwrap();
    fill(&image(&pool, &a.volume_id), 0, 4 << 20, 7);
    let r = req::group_snapshot("db-backup", [a.volume_id.clone(), b.volume_id.clone()]);
    let group = g
        .create_volume_group_snapshot(&r)
        .unwrap()
        .group_snapshot
        .unwrap();
    assert_eq!(group.snapshots.len(), 2);
    assert!(group.ready_to_use);
    for s in &group.snapshots {
        assert_eq!(s.group_snapshot_id, group.group_snapshot_id);
    }
    let again = g
        .create_volume_group_snapshot(&r)
        .unwrap()
        .group_snapshot
        .unwrap();
    assert_eq!(again.group_snapshot_id, group.group_snapshot_id);
    // A member goes only with its group.
    let member = &group.snapshots[0].snapshot_id;
    assert_eq!(
        code(c.delete_snapshot(&req::delete_snapshot(member))),
        RpcStatusCode::INVALID_ARGUMENT
    );
    let mut del = csi::DeleteVolumeGroupSnapshotRequest::new();
    del.group_snapshot_id = group.group_snapshot_id.clone();
    del.snapshot_ids = vec!["wrong".into()];
    assert_eq!(
        code(g.delete_volume_group_snapshot(&del)),
        RpcStatusCode::INVALID_ARGUMENT
    );
    del.snapshot_ids = group
        .snapshots
        .iter()
        .map(|s| s.snapshot_id.clone())
        .collect();
    g.delete_volume_group_snapshot(&del).unwrap();
    assert_eq!(
        std::fs::read_dir(pool.join("snapshots")).unwrap().count(),
        0
    );
    let mut get = csi::GetVolumeGroupSnapshotRequest::new();
    get.group_snapshot_id = group.group_snapshot_id.clone();
    assert_eq!(
        code(g.get_volume_group_snapshot(&get)),
        RpcStatusCode::NOT_FOUND
    );
}

#[test]
#[ignore = "needs root"]
fn without_reflink_snapshots_are_sparse_copies_and_refuse_staged_images() {
    let (_fs, pool) = pool_on("ext4", 512);
    let d = Driver::start_on(BIN, &pool, no_reserve().args(&["--overcommit", "4"]));
    let c = d.controller();
    let v = c
        .create_volume(&req::create("src", 256 * MIB))
        .unwrap()
        .volume
        .unwrap();
    let img = image(&pool, &v.volume_id);
    fill(&img, 100 << 20, 32 << 20, 3);

    let staged = hold_fence(&pool, &v.volume_id);
    let st = status(c.create_snapshot(&req::snapshot("torn", &v.volume_id)));
    assert_eq!(st.code(), RpcStatusCode::FAILED_PRECONDITION);
    assert!(st.message().contains("staged"), "{}", st.message());
    let st = status(c.create_volume(&req::clone("torn-clone", 256 * MIB, &v.volume_id)));
    assert_eq!(
        st.code(),
        RpcStatusCode::FAILED_PRECONDITION,
        "{}",
        st.message()
    );
    drop(staged);

    let s = c
        .create_snapshot(&req::snapshot("copy", &v.volume_id))
        .unwrap()
        .snapshot
        .unwrap();
    let snap = snapshot_image(&pool, &s.snapshot_id);
    assert_eq!(digest(&snap), digest(&img));
    let alloc = allocated(&snap);
    assert!(
        (32 << 20..40 << 20).contains(&alloc),
        "holes kept: {alloc} bytes allocated"
    );

    // Group snapshots need reflink: the service is not offered here, and
    // its calls say why.
    let r = req::group_snapshot("g", [v.volume_id.clone()]);
    let st = status(d.group_controller().create_volume_group_snapshot(&r));
    assert_eq!(st.code(), RpcStatusCode::UNIMPLEMENTED, "{}", st.message());
    assert!(st.message().contains("cannot reflink"), "{}", st.message());
    assert_eq!(
        std::fs::read_dir(pool.join("snapshots")).unwrap().count(),
        1
    );
    assert_eq!(std::fs::read_dir(pool.join("groups")).unwrap().count(), 0);
}

#[test]
#[ignore = "needs root"]
fn directory_volumes_snapshot_and_restore_as_trees() {
    let (_fs, pool) = pool_on("xfs", 512);
    let d = Driver::start_on(BIN, &pool, no_reserve());
    let c = d.controller();
    let dir_create = |name: &str| {
        let mut r = req::create_with(name, 8 * MIB, &[("layout", "dir")]);
        r.volume_capabilities[0] = req::mount_cap(Mode::MULTI_NODE_MULTI_WRITER, "");
        r
    };
    let v = c
        .create_volume(&dir_create("shared-src"))
        .unwrap()
        .volume
        .unwrap();
    let data = pool.join("volumes").join(&v.volume_id).join("data");
    std::fs::create_dir(data.join("sub")).unwrap();
    std::fs::write(data.join("sub/file"), b"hello").unwrap();
    std::os::unix::fs::symlink("sub/file", data.join("link")).unwrap();
    let s = c
        .create_snapshot(&req::snapshot("shared-snap", &v.volume_id))
        .unwrap()
        .snapshot
        .unwrap();
    let mut r = dir_create("shared-restored");
    let mut src = csi::volume_content_source::SnapshotSource::new();
    src.snapshot_id = s.snapshot_id.clone();
    let mut cs = csi::VolumeContentSource::new();
    cs.set_snapshot(src);
    r.volume_content_source = Some(cs).into();
    let restored = c.create_volume(&r).unwrap().volume.unwrap();
    let out = pool.join("volumes").join(&restored.volume_id).join("data");
    assert_eq!(std::fs::read(out.join("sub/file")).unwrap(), b"hello");
    assert_eq!(
        std::fs::read_link(out.join("link")).unwrap(),
        Path::new("sub/file")
    );
    assert_eq!(
        std::fs::metadata(&out).unwrap().permissions().mode() & 0o777,
        0o777
    );
    // An image volume cannot be restored from a directory snapshot.
    let st = status(c.create_volume(&req::restore("wrong-shape", 8 * MIB, &s.snapshot_id)));
    assert_eq!(
        st.code(),
        RpcStatusCode::INVALID_ARGUMENT,
        "{}",
        st.message()
    );
}

#[test]
#[ignore = "needs root"]
fn list_volumes_paginates_and_refuses_foreign_tokens() {
    let (_fs, pool) = pool_on("ext4", 256);
    let d = Driver::start_on(BIN, &pool, no_reserve());
    let c = d.controller();
    let mut made: Vec<String> = (0..7)
        .map(|i| {
            c.create_volume(&req::create(&format!("vol-{i}"), 8 * MIB))
                .unwrap()
                .volume
                .unwrap()
                .volume_id
        })
        .collect();
    made.sort();
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = c.list_volumes(&req::list(3, &token)).unwrap();
        assert!(page.entries.len() <= 3);
        seen.extend(page.entries.iter().map(|e| e.volume.volume_id.clone()));
        pages += 1;
        if page.next_token.is_empty() {
            break;
        }
        token = page.next_token;
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, made);
    assert_eq!(
        code(c.list_volumes(&req::list(3, "invalid-token"))),
        RpcStatusCode::ABORTED
    );
    assert_eq!(
        code(c.list_volumes(&req::list(-1, ""))),
        RpcStatusCode::INVALID_ARGUMENT
    );
}

#[test]
#[ignore = "needs root"]
fn volume_condition_turns_abnormal_when_the_image_goes() {
    let (_fs, pool) = pool_on("ext4", 256);
    let d = Driver::start_on(BIN, &pool, no_reserve());
    let c = d.controller();
    let v = c
        .create_volume(&req::create("watched", 8 * MIB))
        .unwrap()
        .volume
        .unwrap();
    let got = c
        .controller_get_volume(&req::get_volume(&v.volume_id))
        .unwrap();
    assert!(!got.status.volume_condition.abnormal);
    std::fs::remove_file(image(&pool, &v.volume_id)).unwrap();
    let got = c
        .controller_get_volume(&req::get_volume(&v.volume_id))
        .unwrap();
    assert!(got.status.volume_condition.abnormal);
    assert!(
        got.status.volume_condition.message.contains("image"),
        "{}",
        got.status.volume_condition.message
    );
    let listed = c.list_volumes(&req::list(0, "")).unwrap();
    assert!(listed.entries[0].status.volume_condition.abnormal);
    // Damaged metadata is found at start and reported, not hidden.
    let v2 = c
        .create_volume(&req::create("damaged", 8 * MIB))
        .unwrap()
        .volume
        .unwrap();
    drop(c);
    drop(d);
    std::fs::write(
        pool.join("volumes").join(&v2.volume_id).join("meta.json"),
        b"{ not json",
    )
    .unwrap();
    let d = Driver::start_on(BIN, &pool, no_reserve());
    let c = d.controller();
    let got = c
        .controller_get_volume(&req::get_volume(&v2.volume_id))
        .unwrap();
    assert!(got.status.volume_condition.abnormal);
    assert!(
        got.status.volume_condition.message.contains("damaged"),
        "{}",
        got.status.volume_condition.message
    );
    c.delete_volume(&req::delete(&v2.volume_id)).unwrap();
    assert!(!pool.join("volumes").join(&v2.volume_id).exists());
    assert_eq!(
        code(c.controller_get_volume(&req::get_volume("no-such-volume"))),
        RpcStatusCode::NOT_FOUND
    );
}

#[test]
#[ignore = "needs root"]
fn capacity_counts_what_volumes_were_promised() {
    let (_fs, pool) = pool_on("ext4", 512);
    let d = Driver::start_on(BIN, &pool, Opts::default().args(&["--reserve", "64Mi"]));
    let c = d.controller();
    let cap = || {
        c.get_capacity(&csi::GetCapacityRequest::new())
            .unwrap()
            .available_capacity
    };
    let before = cap();
    let st = rustix::fs::statvfs(&pool).unwrap();
    assert_eq!(
        before,
        (st.f_blocks * st.f_frsize) as i64 - 64 * MIB,
        "size less the reserve"
    );
    c.create_volume(&req::create("a", 100 * MIB)).unwrap();
    let after = cap();
    assert!(before - after >= 100 * MIB, "{before} -> {after}");
    // Thin, overcommit 1.0: a volume larger than what remains is refused.
    let st = status(c.create_volume(&req::create("b", after + 64 * MIB)));
    assert_eq!(
        st.code(),
        RpcStatusCode::RESOURCE_EXHAUSTED,
        "{}",
        st.message()
    );
    // Another node's topology has nothing here.
    let mut r = csi::GetCapacityRequest::new();
    let mut t = csi::Topology::new();
    t.segments
        .insert("topology.filevol.csi.rs/node".into(), "elsewhere".into());
    r.accessible_topology = Some(t.clone()).into();
    assert_eq!(c.get_capacity(&r).unwrap().available_capacity, 0);
    // Nor is a volume made for it: the refusal names both segments.
    let mut r = req::create("c", 8 * MIB);
    let mut need = csi::TopologyRequirement::new();
    need.requisite.push(t);
    r.accessibility_requirements = Some(need).into();
    let st = status(c.create_volume(&r));
    assert_eq!(st.code(), RpcStatusCode::RESOURCE_EXHAUSTED);
    assert_eq!(
        st.message(),
        "the pool's volumes are reachable only from topology {topology.filevol.csi.rs/node=test-node}; \
         the request requires one of {topology.filevol.csi.rs/node=elsewhere}"
    );
}

#[test]
#[ignore = "needs root"]
fn attachments_follow_the_access_mode() {
    let (_fs, pool) = pool_on("ext4", 256);
    let d = Driver::start_on(BIN, &pool, no_reserve());
    // A second node plugin on the same (shared) pool registers node-b.
    let _node_b = Driver::start_on(
        BIN,
        &pool,
        Opts::default().args(&["--mode", "node", "--node-id", "node-b"]),
    );
    let c = d.controller();
    let v = c
        .create_volume(&req::create("rwo", 8 * MIB))
        .unwrap()
        .volume
        .unwrap();
    let id = &v.volume_id;
    let ctx = c
        .controller_publish_volume(&req::controller_publish(
            id,
            "test-node",
            req::mount_cap(Mode::SINGLE_NODE_WRITER, ""),
            false,
        ))
        .unwrap();
    assert_eq!(ctx.publish_context["fsType"], "ext4");
    c.controller_publish_volume(&req::controller_publish(
        id,
        "test-node",
        req::mount_cap(Mode::SINGLE_NODE_WRITER, ""),
        false,
    ))
    .unwrap();
    assert_eq!(
        code(c.controller_publish_volume(&req::controller_publish(
            id,
            "test-node",
            req::mount_cap(Mode::SINGLE_NODE_WRITER, ""),
            true
        ))),
        RpcStatusCode::ALREADY_EXISTS
    );
    assert_eq!(
        code(c.controller_publish_volume(&req::controller_publish(
            id,
            "node-b",
            req::mount_cap(Mode::SINGLE_NODE_WRITER, ""),
            false
        ))),
        RpcStatusCode::FAILED_PRECONDITION
    );
    assert_eq!(
        code(c.controller_publish_volume(&req::controller_publish(
            id,
            "no-such-node",
            req::mount_cap(Mode::SINGLE_NODE_WRITER, ""),
            false
        ))),
        RpcStatusCode::NOT_FOUND
    );
    assert_eq!(
        code(c.controller_publish_volume(&req::controller_publish(
            "no-such-volume",
            "test-node",
            req::mount_cap(Mode::SINGLE_NODE_WRITER, ""),
            false
        ))),
        RpcStatusCode::NOT_FOUND
    );
    let got = c.controller_get_volume(&req::get_volume(id)).unwrap();
    assert_eq!(got.status.published_node_ids, ["test-node"]);
    assert_eq!(
        code(c.delete_volume(&req::delete(id))),
        RpcStatusCode::FAILED_PRECONDITION
    );
    c.controller_unpublish_volume(&req::controller_unpublish(id, "test-node"))
        .unwrap();
    c.controller_unpublish_volume(&req::controller_unpublish(id, "test-node"))
        .unwrap();
    c.controller_unpublish_volume(&req::controller_unpublish("no-such-volume", "test-node"))
        .unwrap();
    c.delete_volume(&req::delete(id)).unwrap();

    // Read-only many: several nodes.
    let v = c
        .create_volume(&req::create("rox", 8 * MIB))
        .unwrap()
        .volume
        .unwrap();
    c.controller_publish_volume(&req::controller_publish(
        &v.volume_id,
        "test-node",
        req::mount_cap(Mode::MULTI_NODE_READER_ONLY, ""),
        true,
    ))
    .unwrap();
    c.controller_publish_volume(&req::controller_publish(
        &v.volume_id,
        "node-b",
        req::mount_cap(Mode::MULTI_NODE_READER_ONLY, ""),
        true,
    ))
    .unwrap();
}

#[test]
#[ignore = "needs root"]
fn expansion_grows_and_never_shrinks_and_modify_preallocates() {
    let (_fs, pool) = pool_on("ext4", 512);
    let d = Driver::start_on(BIN, &pool, no_reserve());
    let c = d.controller();
    let v = c
        .create_volume(&req::create("grow", 100 * MIB))
        .unwrap()
        .volume
        .unwrap();
    let id = &v.volume_id;
    let r = c
        .controller_expand_volume(&req::expand(id, 200 * MIB))
        .unwrap();
    assert_eq!(r.capacity_bytes, 200 * MIB);
    assert!(r.node_expansion_required);
    assert_eq!(
        std::fs::metadata(image(&pool, id)).unwrap().len(),
        200 << 20
    );
    let r = c
        .controller_expand_volume(&req::expand(id, 150 * MIB))
        .unwrap();
    assert_eq!(r.capacity_bytes, 200 * MIB, "never shrinks");
    let mut over = req::expand(id, 300 * MIB);
    over.capacity_range.as_mut().unwrap().limit_bytes = 250 * MIB;
    assert_eq!(
        code(c.controller_expand_volume(&over)),
        RpcStatusCode::OUT_OF_RANGE
    );
    assert_eq!(
        code(c.controller_expand_volume(&req::expand("no-such-volume", GIB))),
        RpcStatusCode::NOT_FOUND
    );

    let mut m = csi::ControllerModifyVolumeRequest::new();
    m.volume_id = id.clone();
    m.mutable_parameters.insert("thick".into(), "true".into());
    c.controller_modify_volume(&m).unwrap();
    assert!(allocated(&image(&pool, id)) >= 200 << 20);
    m.mutable_parameters.insert("iops".into(), "5".into());
    assert_eq!(
        code(c.controller_modify_volume(&m)),
        RpcStatusCode::INVALID_ARGUMENT
    );
}

#[test]
#[ignore = "needs root"]
fn a_full_pool_refuses_and_leaves_no_partial_files() {
    let (fs, pool) = pool_on("ext4", 64);
    // Overcommitted: thin volumes may be promised more than the filesystem
    // holds, but no one volume more than it has free, so a creation meets a
    // full filesystem only when something else fills it between the
    // promise and the writes (a pod writing into its volume). The delay
    // holds every creation there while this test plays that writer.
    let d = Driver::start_on(
        BIN,
        &pool,
        no_reserve()
            .args(&["--overcommit", "50"])
            .faults("delay:create.promised:1500"),
    );
    let c = d.controller();
    let st = status(c.create_volume(&req::create_with(
        "too-thick",
        512 * MIB,
        &[("thick", "true")],
    )));
    assert_eq!(
        st.code(),
        RpcStatusCode::RESOURCE_EXHAUSTED,
        "{}",
        st.message()
    );
    assert!(st.message().contains("free space"), "{}", st.message());
    let thick = std::thread::spawn({
        let c = d.controller();
        move || c.create_volume(&req::create_with("thick", 24 * MIB, &[("thick", "true")]))
    });
    std::thread::sleep(std::time::Duration::from_millis(500));
    let filler = fs.path().join("filler");
    let left = free_bytes(&pool).saturating_sub(8 << 20);
    std::fs::File::create(&filler).unwrap();
    fill(&filler, 0, left as usize, 9);
    let st = status(thick.join().unwrap());
    assert_eq!(
        st.code(),
        RpcStatusCode::RESOURCE_EXHAUSTED,
        "{}",
        st.message()
    );
    assert!(st.message().contains("full"), "{}", st.message());
    std::fs::remove_file(&filler).unwrap();

    let v = c
        .create_volume(&req::create("data", 40 * MIB))
        .unwrap()
        .volume
        .unwrap();
    fill(&image(&pool, &v.volume_id), 0, 30 << 20, 5);
    let st = status(c.create_snapshot(&req::snapshot("no-room", &v.volume_id)));
    assert_eq!(
        st.code(),
        RpcStatusCode::RESOURCE_EXHAUSTED,
        "{}",
        st.message()
    );
    assert!(
        st.message().contains("a byte copy needs"),
        "{}",
        st.message()
    );
    let st = status(c.create_volume(&req::clone("no-room-clone", 40 * MIB, &v.volume_id)));
    assert_eq!(
        st.code(),
        RpcStatusCode::RESOURCE_EXHAUSTED,
        "{}",
        st.message()
    );

    let volumes: Vec<_> = std::fs::read_dir(pool.join("volumes")).unwrap().collect();
    assert_eq!(volumes.len(), 1, "only the one good volume");
    assert_eq!(
        std::fs::read_dir(pool.join("snapshots")).unwrap().count(),
        0
    );
    for entry in std::fs::read_dir(pool.join(".scratch")).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            assert_eq!(
                std::fs::read_dir(&path).unwrap().count(),
                0,
                "debris in {}",
                path.display()
            );
        }
    }
}

#[test]
#[ignore = "needs root"]
fn hostile_names_and_ids_stay_inside_the_pool() {
    let (fs, pool) = pool_on("ext4", 256);
    let outside = fs.path().join("outside");
    std::fs::write(&outside, b"keep").unwrap();
    let d = Driver::start_on(BIN, &pool, no_reserve());
    let c = d.controller();
    for name in [
        "../outside",
        "../../etc/evil",
        "/abs/name",
        "a/../../b",
        &"n".repeat(900),
    ] {
        let v = c
            .create_volume(&req::create(name, 8 * MIB))
            .unwrap()
            .volume
            .unwrap();
        assert!(
            pool.join("volumes")
                .join(&v.volume_id)
                .join("meta.json")
                .is_file(),
            "{name}"
        );
        c.delete_volume(&req::delete(&v.volume_id)).unwrap();
    }
    for id in ["../outside", "..", "/etc/passwd", "a\0b", &"x".repeat(200)] {
        assert_eq!(
            code(c.delete_volume(&req::delete(id))),
            RpcStatusCode::INVALID_ARGUMENT,
            "{id:?}"
        );
        assert_eq!(
            code(c.delete_snapshot(&req::delete_snapshot(id))),
            RpcStatusCode::INVALID_ARGUMENT,
            "{id:?}"
        );
        assert_eq!(
            code(c.create_snapshot(&req::snapshot("s", id))),
            RpcStatusCode::INVALID_ARGUMENT,
            "{id:?}"
        );
    }
    assert_eq!(
        code(c.create_volume(&req::create(&"n".repeat(2000), 8 * MIB))),
        RpcStatusCode::INVALID_ARGUMENT
    );
    assert_eq!(std::fs::read(&outside).unwrap(), b"keep");
    assert_eq!(
        std::fs::read_dir(fs.path()).unwrap().count(),
        3,
        "pool, outside, lost+found"
    );
}

#[test]
#[ignore = "needs root"]
fn a_restarted_controller_sees_the_same_pool() {
    let (_fs, pool) = pool_on("xfs", 512);
    let mut d = Driver::start_on(BIN, &pool, no_reserve());
    let c = d.controller();
    for i in 0..3 {
        c.create_volume(&req::create(&format!("keep-{i}"), 8 * MIB))
            .unwrap();
    }
    let first = c.list_volumes(&req::list(0, "")).unwrap().entries[0]
        .volume
        .volume_id
        .clone();
    c.create_snapshot(&req::snapshot("keep-snap", &first))
        .unwrap();
    c.controller_publish_volume(&req::controller_publish(
        &first,
        "test-node",
        req::mount_cap(Mode::SINGLE_NODE_WRITER, ""),
        false,
    ))
    .unwrap();
    let volumes = c.list_volumes(&req::list(0, "")).unwrap();
    let snapshots = c.list_snapshots(&csi::ListSnapshotsRequest::new()).unwrap();
    assert!(d.stop().success());

    let d = Driver::start_on(BIN, &pool, no_reserve());
    let c = d.controller();
    assert_eq!(c.list_volumes(&req::list(0, "")).unwrap(), volumes);
    assert_eq!(
        c.list_snapshots(&csi::ListSnapshotsRequest::new()).unwrap(),
        snapshots
    );
}

/// `limit_bytes` on a request, fluently.
trait TapLimit {
    fn tap_limit(self, limit: i64) -> Self;
}

impl TapLimit for csi::CreateVolumeRequest {
    fn tap_limit(mut self, limit: i64) -> Self {
        self.capacity_range.as_mut().unwrap().limit_bytes = limit;
        self
    }
}

#[test]
#[ignore = "needs root"]
fn a_node_takes_no_more_volumes_than_it_accepts() {
    let (_fs, pool) = pool_on("ext4", 256);
    let d = Driver::start_on(
        BIN,
        &pool,
        no_reserve().args(&["--max-volumes-per-node", "2"]),
    );
    let c = d.controller();
    let ids: Vec<String> = (0..3)
        .map(|i| {
            c.create_volume(&req::create(&format!("lim-{i}"), 8 * MIB))
                .unwrap()
                .volume
                .unwrap()
                .volume_id
        })
        .collect();
    for id in &ids[..2] {
        c.controller_publish_volume(&req::controller_publish(
            id,
            "test-node",
            req::mount_cap(Mode::SINGLE_NODE_WRITER, ""),
            false,
        ))
        .unwrap();
    }
    let st = status(c.controller_publish_volume(&req::controller_publish(
        &ids[2],
        "test-node",
        req::mount_cap(Mode::SINGLE_NODE_WRITER, ""),
        false,
    )));
    assert_eq!(
        st.code(),
        RpcStatusCode::RESOURCE_EXHAUSTED,
        "{}",
        st.message()
    );
    // Re-publishing an attached volume is not a new attachment.
    c.controller_publish_volume(&req::controller_publish(
        &ids[0],
        "test-node",
        req::mount_cap(Mode::SINGLE_NODE_WRITER, ""),
        false,
    ))
    .unwrap();
    c.controller_unpublish_volume(&req::controller_unpublish(&ids[0], "test-node"))
        .unwrap();
    c.controller_publish_volume(&req::controller_publish(
        &ids[2],
        "test-node",
        req::mount_cap(Mode::SINGLE_NODE_WRITER, ""),
        false,
    ))
    .unwrap();
}

/// DeleteVolume on a pool that answers every call with ENOTCONN (a bindfs
/// view whose daemon died, as a network share whose server went away)
/// answers UNAVAILABLE, never OK, and deletes nothing: once the share is
/// back, the volume is whole, and a retried delete deletes it.
#[test]
#[ignore = "needs root"]
fn delete_on_an_unreachable_pool_is_unavailable_and_deletes_nothing() {
    let real = tempfile::tempdir().unwrap();
    let mut view = Bindfs::killable(real.path());
    let pool = view.path().join("pool");
    std::fs::create_dir(&pool).unwrap();
    let d = Driver::start_on(BIN, &pool, no_reserve().args(&["--mode", "controller"]));
    let c = d.controller();
    let id = c
        .create_volume(&req::create("pvc-unreachable", 16 * MIB))
        .unwrap()
        .volume
        .unwrap()
        .volume_id;
    let files = real.path().join("pool/volumes").join(&id);
    fill(&files.join("image"), 0, 4096, 7);
    let before = digest(&files.join("image"));

    view.kill_daemon();
    let st = status(c.delete_volume(&req::delete(&id)));
    assert_eq!(st.code(), RpcStatusCode::UNAVAILABLE, "{}", st.message());
    assert!(
        st.message().contains(&id) && st.message().contains("not connected"),
        "the answer names the step and the cause: {}",
        st.message()
    );

    view.restart();
    assert!(files.join("meta.json").is_file());
    assert_eq!(digest(&files.join("image")), before);
    c.delete_volume(&req::delete(&id)).unwrap();
    assert!(!files.exists());
}

/// DeleteVolume of a volume whose record is gone (ENOENT) and whose
/// directory cannot be looked at (EIO, injected on that path only) answers
/// INTERNAL, not OK: a directory that cannot be looked at is no proof the
/// volume is gone. With the fault lifted, the delete removes it (a
/// directory without its record is damaged, and the CO asked for it to go).
#[test]
fn delete_answers_an_error_when_the_volume_directory_cannot_be_looked_at() {
    let dir = tempfile::tempdir().unwrap();
    let pool = dir.path().join("pool");
    std::fs::create_dir(&pool).unwrap();
    let name = "pvc-eio";
    let id = filevol_core::volume::ids::derive(filevol_core::volume::ids::Kind::Volume, name);
    let files = pool.join("volumes").join(&id);
    {
        let d = Driver::start_on(BIN, &pool, no_reserve().args(&["--mode", "controller"]));
        d.controller()
            .create_volume(&req::create(name, 8 * MIB))
            .unwrap();
    }
    std::fs::remove_file(files.join("meta.json")).unwrap();

    let faulty = no_reserve()
        .args(&["--mode", "controller"])
        .faults(&format!("eio:volumes/{id}"));
    {
        let d = Driver::start_on(BIN, &pool, faulty);
        let st = status(d.controller().delete_volume(&req::delete(&id)));
        assert_eq!(st.code(), RpcStatusCode::INTERNAL, "{}", st.message());
        assert!(
            st.message().contains("Input/output error"),
            "{}",
            st.message()
        );
    }
    assert!(files.join("image").is_file());

    let d = Driver::start_on(BIN, &pool, no_reserve().args(&["--mode", "controller"]));
    d.controller().delete_volume(&req::delete(&id)).unwrap();
    assert!(!files.exists());
}
