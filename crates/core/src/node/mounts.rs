//! What the kernel's mount table says about the pool's volumes on this node.
//!
//! A mount is identified by what it holds, never by where it is: an image
//! volume's mounts are those whose source is its loop device (a filesystem on
//! the device, and every bind of it) or that bind the device node itself (a
//! block stage or publish: devtmpfs, root `/loopN`); a `dir` volume's are the
//! binds whose root is its data directory inside the pool's filesystem. So a
//! publish is found wherever its target is, a restarted plugin finds what it
//! staged, and another volume never counts.

use std::collections::{BTreeMap, HashMap};
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
    let root = pool.resolved_root();
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

/// How many mounts each of the pool's volumes has under `kubelet_dir`:
/// the mounts and binds of the loop device its image is attached to
/// (filesystem or block, wherever kubelet put the target), and the binds of
/// its data directory. Volumes with none are left out. Read once from the
/// mount table and the loop devices, whatever the number of volumes: the
/// metrics ask at every scrape.
pub fn by_volume(pool: &Pool, kubelet_dir: &Path) -> io::Result<BTreeMap<String, usize>> {
    let table = mountinfo::read()?;
    let loops = attached_images(pool)?;
    let dirs = volumes_inside(pool, &table)?;
    Ok(tally(&table, kubelet_dir, &loops, dirs.as_ref()))
}

/// The image of volume `id`, `None` when it has none (a dir volume, or one
/// deleted meanwhile: ENOENT). An image that cannot be looked at is an
/// error naming it, never a volume without mounts.
fn image_metadata(pool: &Pool, id: &str) -> io::Result<Option<std::fs::Metadata>> {
    let image = pool.image_path(id);
    crate::sys::fs::metadata_if_present(&image)
        .map_err(|e| io::Error::new(e.kind(), format!("stat {}: {e}", image.display())))
}

/// The loop devices attached to the pool's images, with their volume's id.
fn attached_images(pool: &Pool) -> io::Result<Vec<(LoopDevice, String)>> {
    let mut by_file: HashMap<(u64, u64), Vec<LoopDevice>> = HashMap::new();
    for (dev, backing) in loopdev::attached()? {
        by_file.entry(backing).or_default().push(dev);
    }
    let mut out = Vec::new();
    if by_file.is_empty() {
        return Ok(out);
    }
    // From the directory, not the records: an unreadable record does not
    // unmount a volume.
    for id in pool.store().ids(Kind::Volume).map_err(io::Error::other)? {
        let Some(meta) = image_metadata(pool, &id)? else {
            continue;
        };
        if let Some(devices) = by_file.get(&(meta.dev(), meta.ino())) {
            out.extend(devices.iter().map(|d| (*d, id.clone())));
        }
    }
    Ok(out)
}

/// The mounts under `kubelet_dir` in `table`, counted by the volume they
/// hold: one of `loops` (devices with their volume's id) or, by its data
/// directory, a directory volume (`dirs`: see [`volumes_inside`]).
fn tally(
    table: &[MountEntry],
    kubelet_dir: &Path,
    loops: &[(LoopDevice, String)],
    dirs: Option<&(String, PathBuf)>,
) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for e in table
        .iter()
        .filter(|e| e.mount_point.starts_with(kubelet_dir))
    {
        let id = loops
            .iter()
            .find(|(dev, _)| holds_loop(e, dev))
            .map(|(_, id)| id.clone())
            .or_else(|| dirs.and_then(|(device, volumes)| dir_volume_of(e, device, volumes)));
        if let Some(id) = id {
            *out.entry(id).or_insert(0) += 1;
        }
    }
    out
}

/// Whether the mount on top at `path` (a mount root under `kubelet_dir`)
/// holds volume `id`: a filesystem on `device` or a bind of it, a bind of
/// `device`'s node, or a bind of the volume's data directory. Answered by
/// one `statx` of the path where that proves it (the mount's device is the
/// loop device's, the bound node is the device, the mount's root is the
/// data directory's inode), and from the mount table otherwise ([`of_volume`]):
/// a filesystem whose mounts show an anonymous device (btrfs), a mount that
/// cannot be stat'ed (a dead one), or something that is not this volume's.
pub fn holds(
    pool: &Pool,
    id: &str,
    device: Option<LoopDevice>,
    kubelet_dir: &Path,
    path: &Path,
) -> io::Result<bool> {
    use rustix::fs::{makedev, statx, AtFlags, FileType, StatxFlags, CWD};
    let Ok(st) = statx(
        CWD,
        path,
        AtFlags::SYMLINK_NOFOLLOW,
        StatxFlags::BASIC_STATS,
    ) else {
        return Ok(of_volume(pool, id, device, kubelet_dir)?
            .iter()
            .any(|p| p == path));
    };
    let on = makedev(st.stx_dev_major, st.stx_dev_minor);
    if let Some(dev) = device {
        let node = std::fs::metadata(dev.path())?;
        let rdev = std::os::unix::fs::MetadataExt::rdev(&node);
        let kind = FileType::from_raw_mode(u32::from(st.stx_mode));
        let bound_node =
            kind == FileType::BlockDevice && makedev(st.stx_rdev_major, st.stx_rdev_minor) == rdev;
        if bound_node || on == rdev {
            return Ok(true);
        }
    }
    match std::fs::metadata(pool.data_path(id)) {
        Ok(data) if (data.dev(), data.ino()) == (on, st.stx_ino) => return Ok(true),
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    if device.is_some() && st.stx_dev_major == 0 {
        // An anonymous device: the mount table names the loop device.
        return Ok(of_volume(pool, id, device, kubelet_dir)?
            .iter()
            .any(|p| p == path));
    }
    Ok(false)
}

/// Every mount point of the loop device on this host (in this process's
/// mount namespace): filesystems on it, their binds, binds of its node.
pub fn loop_mount_points(dev: &LoopDevice) -> io::Result<Vec<PathBuf>> {
    Ok(mountinfo::read()?
        .into_iter()
        .filter(|e| holds_loop(e, dev))
        .map(|e| e.mount_point)
        .collect())
}

/// The OFD locks this host records on the filesystem that holds the pool,
/// as (inode, kind). The filesystem is named by the mount table's device,
/// which is what `/proc/locks` uses (on btrfs, stat's `st_dev` is a
/// subvolume's anonymous device instead).
pub fn pool_locks(pool: &Pool) -> io::Result<Vec<(u64, crate::sys::lock::LockKind)>> {
    let table = mountinfo::read()?;
    let Some((device, _)) = volumes_inside(pool, &table)? else {
        return Ok(Vec::new());
    };
    let Some(device) = parse_device(&device) else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("mount table device {device:?}"),
        ));
    };
    Ok(crate::sys::lock::recorded()?
        .into_iter()
        .filter(|r| r.device == device)
        .map(|r| (r.inode, r.kind))
        .collect())
}

/// `major:minor` (decimal, as the mount table writes it).
fn parse_device(text: &str) -> Option<(u32, u32)> {
    let (major, minor) = text.split_once(':')?;
    Some((major.parse().ok()?, minor.parse().ok()?))
}

/// Whether the loop device is mounted anywhere on this host (in this
/// process's mount namespace), under a kubelet directory or not.
pub fn loop_mounted(dev: &LoopDevice) -> io::Result<bool> {
    Ok(mountinfo::read()?.iter().any(|e| holds_loop(e, dev)))
}

/// Every mount point of volume `id` under `kubelet_dir` (stages and
/// publishes alike), by identity: mounts of `device` (its image's loop
/// device, if one serves it) and binds of its data directory. Both are
/// looked for, so the answer needs no record of the volume (an unstage
/// after a delete still finds its mounts).
pub fn of_volume(
    pool: &Pool,
    id: &str,
    device: Option<LoopDevice>,
    kubelet_dir: &Path,
) -> io::Result<Vec<PathBuf>> {
    let table = mountinfo::read()?;
    // Only the mount on top at each mount point is what the path shows: a
    // mount of something else stacked over this volume's is not this
    // volume's to unmount.
    let top = topmost(&table);
    let ours = |e: &&&MountEntry| e.mount_point.starts_with(kubelet_dir);
    let mut out = Vec::new();
    if let Some(dev) = device {
        out.extend(
            top.iter()
                .filter(ours)
                .filter(|e| holds_loop(e, &dev))
                .map(|e| e.mount_point.clone()),
        );
    }
    if let Some((device, volumes)) = volumes_inside(pool, &table)? {
        out.extend(
            top.iter()
                .filter(ours)
                .filter(|e| dir_volume_of(e, &device, &volumes).as_deref() == Some(id))
                .map(|e| e.mount_point.clone()),
        );
    }
    Ok(out)
}

/// The last mount made at each mount point of `table` (the kernel lists
/// mounts in the order they were made), in table order.
fn topmost(table: &[MountEntry]) -> Vec<&MountEntry> {
    let mut last: HashMap<&Path, usize> = HashMap::new();
    for (i, e) in table.iter().enumerate() {
        last.insert(e.mount_point.as_path(), i);
    }
    table
        .iter()
        .enumerate()
        .filter(|(i, e)| last.get(e.mount_point.as_path()) == Some(i))
        .map(|(_, e)| e)
        .collect()
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
        let Some(meta) = image_metadata(pool, &id)? else {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A node's mount table as the kernel writes it: a pool on /dev/sda1
    /// (8:1, mounted at /), kubelet at /k; loop3 and loop4 back two of the
    /// pool's images, loop5 another pool's.
    const TABLE: &str = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
30 22 7:3 / /k/plugins/kubernetes.io/csi/filevol.csi.rs/a/globalmount rw,relatime shared:20 - ext4 /dev/loop3 rw
31 22 7:3 / /k/pods/p1/volumes/kubernetes.io~csi/pv-a/mount rw,relatime shared:20 - ext4 /dev/loop3 rw
32 22 7:3 / /k/pods/p2/volumes/kubernetes.io~csi/pv-a/mount rw,relatime shared:20 - ext4 /dev/loop3 rw
33 22 0:5 /loop4 /k/plugins/kubernetes.io/csi/volumeDevices/staging/pv-c/device rw,nosuid shared:2 - devtmpfs udev rw,size=4096k
34 22 0:5 /loop4 /k/plugins/kubernetes.io/csi/volumeDevices/publish/pv-c/pod-6 rw,nosuid shared:2 - devtmpfs udev rw,size=4096k
35 22 0:5 /loop4 /k/pods/p5/volumeDevices/kubernetes.io~csi/pv-c rw,nosuid shared:2 - devtmpfs udev rw,size=4096k
36 22 8:1 /pool/volumes/d/data /k/plugins/kubernetes.io/csi/filevol.csi.rs/d/globalmount rw,relatime shared:1 - ext4 /dev/sda1 rw
37 22 8:1 /pool/volumes/d/data /k/pods/p1/volumes/kubernetes.io~csi/pv-d/mount rw,relatime shared:1 - ext4 /dev/sda1 rw
38 22 7:5 / /k/plugins/kubernetes.io/csi/other.csi/x/globalmount rw,relatime shared:30 - ext4 /dev/loop5 rw
39 22 8:1 /pool/volumes/d /k/pods/p1/volumes/kubernetes.io~csi/pv-e/mount rw,relatime shared:1 - ext4 /dev/sda1 rw
40 22 7:3 / /mnt/elsewhere rw,relatime shared:20 - ext4 /dev/loop3 rw
41 22 0:5 /loop0 /k/pods/p8/volumeDevices/kubernetes.io~csi/pv-z rw,nosuid shared:2 - devtmpfs udev rw,size=4096k
";

    #[test]
    fn mounts_are_counted_by_the_volume_they_hold() {
        let table = mountinfo::parse(TABLE);
        let loops = [
            (LoopDevice { number: 3 }, "a".to_owned()),
            (LoopDevice { number: 4 }, "c".to_owned()),
        ];
        let dirs = ("8:1".to_owned(), PathBuf::from("/pool/volumes"));
        let counted = tally(&table, Path::new("/k"), &loops, Some(&dirs));
        // a: its stage and two publishes; c: a block stage and publishes
        // under pods/ and under plugins/; d: a bind of its data. Another
        // pool's device, a bind of a volume's directory that is not its
        // data, another loop device's node and anything outside the
        // kubelet directory are not counted.
        let expected: BTreeMap<String, usize> = [("a", 3), ("c", 3), ("d", 2)]
            .into_iter()
            .map(|(id, n)| (id.to_owned(), n))
            .collect();
        assert_eq!(counted, expected);
    }
}
