//! Directory volumes on a real btrfs pool (root): subvolumes, their qgroup
//! limits, atomic snapshots and clones, and what a delete leaves.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use super::*;
use crate::volume::meta::{AccessMode, AccessType, CopyMethod, Layout};

const MIB: u64 = 1 << 20;

fn opts() -> PoolOptions {
    PoolOptions {
        reserve_bytes: 0,
        overcommit: 1000.0,
        topology: BTreeMap::new(),
        janitor: true,
    }
}

fn dir_spec(name: &str, bytes: u64, source: Option<Source>) -> VolumeSpec {
    VolumeSpec {
        name: name.into(),
        layout: Layout::Dir,
        capacity: CapacityRange {
            required: bytes,
            limit: 0,
        },
        access: AccessType::Mount,
        fs_type: None,
        thick: false,
        mkfs_options: vec![],
        parameters: BTreeMap::new(),
        mutable_parameters: BTreeMap::new(),
        source,
        modes: vec![AccessMode::MultiNodeMultiWriter],
    }
}

/// Writes `mib` MiB of incompressible bytes to `path`, synced; the error
/// of the first write or sync that fails.
fn write_mib(path: &Path, mib: u64) -> std::io::Result<()> {
    let mut f = std::fs::File::create(path)?;
    let mut block = vec![0u8; 1 << 20];
    for i in 0..mib {
        for (j, b) in block.iter_mut().enumerate() {
            // Bytes that differ per MiB: nothing for btrfs to share.
            *b = (j as u64 ^ i.wrapping_mul(2654435761)).to_le_bytes()[0];
        }
        f.write_all(&block)?;
    }
    f.sync_all()
}

/// The qgroup ids `btrfs qgroup show` lists on the filesystem at `mnt`.
fn qgroups(mnt: &Path) -> Vec<String> {
    let out = std::process::Command::new("btrfs")
        .args(["qgroup", "show", "--raw"])
        .arg(mnt)
        .output()
        .expect("run btrfs qgroup show");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|id| id.starts_with("0/"))
        .map(str::to_owned)
        .collect()
}

fn qgroup_of(data: &Path) -> String {
    let fd = crate::sys::untrusted::open_root(data).unwrap();
    format!(
        "0/{}",
        crate::sys::btrfs::subvolume_id(std::os::fd::AsFd::as_fd(&fd)).unwrap()
    )
}

fn is_quota_error(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EDQUOT) | Some(libc::ENOSPC))
}

#[test]
#[ignore = "needs root"]
fn dir_volumes_on_btrfs_are_subvolumes_with_their_size_enforced() {
    let (fs, root) = filevol_kit::scratch::pool_on("btrfs", 512);
    let pool = Pool::open(&root, opts()).unwrap();
    let v = pool.create_volume(&dir_spec("a", 16 * MIB, None)).unwrap();
    assert!(v.subvolume);
    let data = pool.data_path(&v.id);
    assert!(subvolumes::is_subvolume(&data).unwrap());
    let qgroup = qgroup_of(&data);
    assert!(qgroups(fs.path()).contains(&qgroup));

    // Past its size: refused.
    let e = write_mib(&data.join("big"), 24).unwrap_err();
    assert!(is_quota_error(&e), "{e}");
    std::fs::remove_file(data.join("big")).unwrap();
    write_mib(&data.join("fits"), 8).unwrap();
    // qgroup figures are those of the last transaction commit.
    rustix::fs::syncfs(std::fs::File::open(&data).unwrap()).unwrap();
    let used = subvolumes::usage(&data).unwrap();
    assert_eq!(used.max_referenced, Some(16 * MIB));
    assert!(used.referenced >= 8 * MIB, "{used:?}");

    // Expanded: the limit follows, and more fits.
    pool.expand_volume(
        &v.id,
        CapacityRange {
            required: 48 * MIB,
            limit: 0,
        },
    )
    .unwrap();
    assert_eq!(
        subvolumes::usage(&data).unwrap().max_referenced,
        Some(48 * MIB)
    );
    write_mib(&data.join("more"), 24).unwrap();

    // A snapshot is a read-only subvolume counted by its qgroup.
    let s = pool.create_snapshot("s", &v.id).unwrap();
    assert!(s.subvolume);
    assert_eq!(s.method, CopyMethod::Reflink);
    let snap_data = pool.snapshot_dir(&s.id).join("data");
    assert!(std::fs::File::create(snap_data.join("new")).is_err());
    let counted = capacity::allocated(&pool.snapshot_dir(&s.id)).unwrap();
    assert!(counted >= 32 * MIB, "{counted}");

    // A restore is writable, with its own limit.
    let r = pool
        .create_volume(&dir_spec(
            "r",
            64 * MIB,
            Some(Source::Snapshot(s.id.clone())),
        ))
        .unwrap();
    assert!(r.subvolume);
    let r_data = pool.data_path(&r.id);
    assert_eq!(
        std::fs::read(r_data.join("more")).unwrap(),
        std::fs::read(data.join("more")).unwrap()
    );
    assert_eq!(
        subvolumes::usage(&r_data).unwrap().max_referenced,
        Some(64 * MIB)
    );
    write_mib(&r_data.join("own"), 8).unwrap();

    // Deletes take the subvolume and its qgroup.
    let (r_q, s_q) = (qgroup_of(&r_data), qgroup_of(&snap_data));
    pool.delete_volume(&r.id).unwrap();
    pool.delete_snapshot(&s.id).unwrap();
    pool.delete_volume(&v.id).unwrap();
    let left = qgroups(fs.path());
    for q in [qgroup, r_q, s_q] {
        assert!(!left.contains(&q), "{q} is still in {left:?}");
    }
    drop(pool);
    drop(fs);
}

#[test]
#[ignore = "needs root"]
fn a_plain_directory_volume_from_before_stays_plain_on_btrfs() {
    let (fs, root) = filevol_kit::scratch::pool_on("btrfs", 512);
    let pool = Pool::open(&root, opts()).unwrap();
    // Made as an older filevol made it: a plain directory and a record
    // without the field.
    let v = pool.create_volume(&dir_spec("old", 8 * MIB, None)).unwrap();
    let dir = pool.volume_dir(&v.id);
    let json = std::fs::read_to_string(dir.join(store::META)).unwrap();
    let mut record: serde_json::Value = serde_json::from_str(&json).unwrap();
    record.as_object_mut().unwrap().remove("subvolume");
    pool.discard(&dir).unwrap();
    std::fs::create_dir_all(dir.join("data")).unwrap();
    std::fs::write(dir.join(store::META), record.to_string()).unwrap();
    std::fs::write(dir.join("data/f"), b"old data").unwrap();

    let old = pool.volume(&v.id).unwrap();
    assert!(!old.subvolume);
    // Unstaged, its copies are plain copies, as before.
    let s = pool.create_snapshot("old-s", &v.id).unwrap();
    assert!(!s.subvolume);
    assert_eq!(s.method, CopyMethod::Sparse);
    let c = pool
        .create_volume(&dir_spec(
            "old-c",
            8 * MIB,
            Some(Source::Volume(v.id.clone())),
        ))
        .unwrap();
    assert!(!c.subvolume);
    assert_eq!(
        std::fs::read(pool.data_path(&c.id).join("f")).unwrap(),
        b"old data"
    );
    // No limit: it holds more than its size, as a plain directory did.
    write_mib(&pool.data_path(&v.id).join("big"), 12).unwrap();
    for id in [&c.id, &v.id] {
        pool.delete_volume(id).unwrap();
    }
    pool.delete_snapshot(&s.id).unwrap();
    drop(pool);
    drop(fs);
}

#[test]
#[ignore = "needs root"]
fn dir_volumes_on_xfs_stay_plain_directories() {
    let (fs, root) = filevol_kit::scratch::pool_on("xfs", 512);
    let pool = Pool::open(&root, opts()).unwrap();
    let v = pool.create_volume(&dir_spec("x", 8 * MIB, None)).unwrap();
    assert!(!v.subvolume);
    write_mib(&pool.data_path(&v.id).join("big"), 12).unwrap();
    let s = pool.create_snapshot("xs", &v.id).unwrap();
    assert!(!s.subvolume);
    pool.delete_snapshot(&s.id).unwrap();
    pool.delete_volume(&v.id).unwrap();
    drop(pool);
    drop(fs);
}
