//! What the kernel's mount table says about the pool's volumes on this node.
//!
//! A mount is identified by what it holds, never by where it is: an image
//! volume's mounts are those whose source is its loop device (a filesystem on
//! the device, and every bind of it) or that bind the device node itself (a
//! block stage or publish: devtmpfs, root `/loopN`); a `dir` volume's are the
//! binds whose root is its data directory inside the pool's filesystem. So a
//! publish is found wherever its target is, a restarted plugin finds what it
//! staged, and another volume never counts.

use std::collections::HashMap;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::pool::store::Kind;
use crate::pool::Pool;
use crate::sys::loopdev::{self, LoopDevice};
use crate::sys::mountinfo::{self, MountEntry};

/// Whether `entry` holds the loop device `dev`: a filesystem on it, a bind
/// of such a filesystem, or a bind of the device node.
fn holds_loop(entry: &MountEntry, dev: &LoopDevice) -> bool {
    let path = dev.path();
    let node = Path::new("/").join(path.file_name().unwrap_or_default());
    Path::new(&entry.source) == path || (entry.fs_type == "devtmpfs" && entry.root == node)
}

/// Where the pool's `volumes/` directory is, as the mount table names paths
/// inside the filesystem that holds the pool: (the holder's device, the
/// path of `volumes/` inside it). A bind's `root` field is such a path.
fn volumes_inside(pool: &Pool, table: &[MountEntry]) -> io::Result<Option<(String, PathBuf)>> {
    let root = pool.root().canonicalize()?;
    // The mount that holds the pool: the longest mount point above it.
    let Some(holder) = table
        .iter()
        .filter(|e| root.starts_with(&e.mount_point))
        .max_by_key(|e| e.mount_point.as_os_str().len())
    else {
        return Ok(None);
    };
    let inside = holder.root.join(
        root.strip_prefix(&holder.mount_point)
            .expect("the holder's mount point is a prefix of the pool"),
    );
    Ok(Some((holder.device.clone(), inside.join("volumes"))))
}

/// The id of the pool's `dir` volume that `entry` binds, if it binds one.
fn dir_volume_of(entry: &MountEntry, device: &str, volumes: &Path) -> Option<String> {
    if entry.device != device {
        return None;
    }
    let rest = entry.root.strip_prefix(volumes).ok()?;
    let mut parts = rest.components();
    let id = parts.next()?.as_os_str().to_str()?.to_owned();
    (parts.next()?.as_os_str() == "data" && parts.next().is_none()).then_some(id)
}

/// Ids of the pool's directory volumes bind-mounted on this host (staged or
/// published; under `under` only, when given: one node plugin's kubelet
/// directory).
pub fn staged_dirs(pool: &Pool, under: Option<&Path>) -> io::Result<Vec<String>> {
    let table = mountinfo::read()?;
    let Some((device, volumes)) = volumes_inside(pool, &table)? else {
        return Ok(Vec::new());
    };
    let mut ids: Vec<String> = table
        .iter()
        .filter(|e| under.is_none_or(|dir| e.mount_point.starts_with(dir)))
        .filter_map(|e| dir_volume_of(e, &device, &volumes))
        .collect();
    ids.sort();
    ids.dedup();
    Ok(ids)
}

/// Whether the loop device is mounted anywhere on this host (in this
/// process's mount namespace), under a kubelet directory or not.
pub fn loop_mounted(dev: &LoopDevice) -> io::Result<bool> {
    Ok(mountinfo::read()?.iter().any(|e| holds_loop(e, dev)))
}

/// Every mount point of volume `id` under `kubelet_dir` (stages and
/// publishes alike), by identity: mounts of its image's loop device and
/// binds of its data directory. Both are looked for, so the answer needs no
/// record of the volume (an unstage after a delete still finds its mounts).
pub fn of_volume(pool: &Pool, id: &str, kubelet_dir: &Path) -> io::Result<Vec<PathBuf>> {
    let table = mountinfo::read()?;
    let ours = |e: &&MountEntry| e.mount_point.starts_with(kubelet_dir);
    let mut out = Vec::new();
    if let Some(dev) = loopdev::find_bound(&pool.image_path(id))? {
        out.extend(
            table
                .iter()
                .filter(ours)
                .filter(|e| holds_loop(e, &dev))
                .map(|e| e.mount_point.clone()),
        );
    }
    if let Some((device, volumes)) = volumes_inside(pool, &table)? {
        out.extend(
            table
                .iter()
                .filter(ours)
                .filter(|e| dir_volume_of(e, &device, &volumes).as_deref() == Some(id))
                .map(|e| e.mount_point.clone()),
        );
    }
    Ok(out)
}

/// A filesystem on one of the pool's images, mounted under a kubelet
/// directory: what a trim acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsMount {
    /// The volume.
    pub id: String,
    /// The loop device the filesystem is on.
    pub device: LoopDevice,
    /// One mount of it: the stage where the table shows one (a mount
    /// outside `<kubelet>/pods/`), else a publish.
    pub mount_point: PathBuf,
    /// That mount's id, to prove a descriptor opened later is on it.
    pub mount_id: u64,
}

/// Every image volume of the pool whose filesystem is mounted under
/// `kubelet_dir`, once each. Found from the kernel (attached loop devices,
/// their backing files, the mount table), never from records: a block
/// volume (its device node bound, no filesystem mounted) and a device whose
/// detach is pending are not listed.
pub fn filesystems(pool: &Pool, kubelet_dir: &Path) -> io::Result<Vec<FsMount>> {
    let by_backing: HashMap<(u64, u64), LoopDevice> = loopdev::attached()?
        .into_iter()
        .filter(|(dev, _)| !dev.detaching())
        .map(|(dev, backing)| (backing, dev))
        .collect();
    if by_backing.is_empty() {
        return Ok(Vec::new());
    }
    let table = mountinfo::read()?;
    let pods = kubelet_dir.join("pods");
    let mut out = Vec::new();
    for id in pool.store().ids(Kind::Volume).map_err(io::Error::other)? {
        let Ok(meta) = std::fs::metadata(pool.image_path(&id)) else {
            continue;
        };
        let Some(&device) = by_backing.get(&(meta.dev(), meta.ino())) else {
            continue;
        };
        let source = device.path();
        // The stage first: its path is kubelet's own, where a publish
        // target lies in a pod's directory.
        let Some(entry) = table
            .iter()
            .filter(|e| e.mount_point.starts_with(kubelet_dir) && Path::new(&e.source) == source)
            .min_by_key(|e| e.mount_point.starts_with(&pods))
        else {
            continue;
        };
        out.push(FsMount {
            id,
            device,
            mount_point: entry.mount_point.clone(),
            mount_id: entry.id,
        });
    }
    Ok(out)
}
