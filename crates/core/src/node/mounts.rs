//! What the kernel's mount table says about the pool's volumes on this node.
//!
//! A mount is identified by what it holds, never by where it is: an image
//! volume's mounts are those whose source is its loop device (a filesystem on
//! the device, and every bind of it) or that bind the device node itself (a
//! block stage or publish: devtmpfs, root `/loopN`); a `dir` volume's are the
//! binds whose root is its data directory inside the pool's filesystem. So a
//! publish is found wherever its target is, a restarted plugin finds what it
//! staged, and another volume never counts.
//!
//! The module has two halves:
//!
//! - The classifiers: pure functions over a mount table (the parsed
//!   `/proc/self/mountinfo`, [`MountEntry`]), the lock records of
//!   `/proc/locks` and facts the caller has already gathered (the pool's
//!   resolved root, which loop device serves which volume). They do no
//!   I/O, so the unit tests below feed them literal tables, and the node's
//!   tests run them on the table the fake kernel writes (`node::fake`).
//! - [`Mounts`], the node's questions ("every mount of this volume", "does
//!   this mount hold it", "which directory volumes are bound"): each reads
//!   what it needs through the kernel seam (`Kernel::mount_table`,
//!   `Kernel::lock_records`, `Kernel::attached`, `Kernel::identity`) and the
//!   pool's directory, then asks a classifier.
//!
//! The table is read only where one `statx` cannot answer: "does the mount
//! at this path hold volume `id`" is asked at every publish and unpublish,
//! and a table read costs in proportion to the node's mounts, so
//! [`Mounts::holds`] decides from the identities of the path, the device
//! node and the data directory whenever they prove it, and reads the table
//! only for what they cannot (see [`Mounts::holds`]).

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::kernel::Kernel;
use super::Node;
use crate::pool::store::Kind;
use crate::pool::Pool;
use crate::sys::lock::{LockKind, Recorded};
use crate::sys::loopdev::LoopDevice;
use crate::sys::mount::Identity;
use crate::sys::mountinfo::MountEntry;

// ---- the classifiers: pure functions over the tables ----

/// Whether `entry` holds the loop device `dev`: a filesystem on it, a bind
/// of such a filesystem, or a bind of the device node.
fn holds_loop(entry: &MountEntry, dev: &LoopDevice) -> bool {
    let path = dev.path();
    let node = Path::new("/").join(path.file_name().unwrap_or_default());
    Path::new(&entry.source) == path || (entry.fs_type == "devtmpfs" && entry.root == node)
}

/// Where the pool's `volumes/` directory is, in the mount table's terms.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PoolPlace {
    /// The device (`major:minor`) of the mount that holds the pool, as the
    /// table and `/proc/locks` name it (on btrfs not stat's `st_dev`).
    device: String,
    /// The path of `volumes/` inside that filesystem: what a bind's `root`
    /// field shows.
    volumes: PathBuf,
}

/// Where the pool whose resolved root is `pool_root` lies in `table`:
/// inside the mount with the longest mount point above it.
fn pool_place(table: &[MountEntry], pool_root: &Path) -> Option<PoolPlace> {
    let holder = table
        .iter()
        .filter(|e| pool_root.starts_with(&e.mount_point))
        .max_by_key(|e| e.mount_point.as_os_str().len())?;
    let inside = holder.root.join(
        pool_root
            .strip_prefix(&holder.mount_point)
            .expect("the holder's mount point is a prefix of the pool"),
    );
    Some(PoolPlace {
        device: holder.device.clone(),
        volumes: inside.join("volumes"),
    })
}

/// The id of the pool's `dir` volume that `entry` binds, if it binds one:
/// its root is exactly `volumes/<id>/data` on the pool's device.
fn dir_volume_of(entry: &MountEntry, place: &PoolPlace) -> Option<String> {
    if entry.device != place.device {
        return None;
    }
    let rest = entry.root.strip_prefix(&place.volumes).ok()?;
    let mut parts = rest.components();
    let id = parts.next()?.as_os_str().to_str()?.to_owned();
    (parts.next()?.as_os_str() == "data" && parts.next().is_none()).then_some(id)
}

/// Ids of the directory volumes of the pool at `pool_root` bind-mounted
/// under `under` (one node plugin's kubelet directory), staged or
/// published, sorted, once each.
pub fn staged_dirs(table: &[MountEntry], pool_root: &Path, under: &Path) -> Vec<String> {
    let Some(place) = pool_place(table, pool_root) else {
        return Vec::new();
    };
    let mut ids: Vec<String> = table
        .iter()
        .filter(|e| e.mount_point.starts_with(under))
        .filter_map(|e| dir_volume_of(e, &place))
        .collect();
    ids.sort();
    ids.dedup();
    ids
}

/// The mounts under `kubelet_dir` in `table`, counted by the volume they
/// hold: one of `loops` (devices with their volume's id) or, by its data
/// directory, a directory volume of the pool at `pool_root`. Volumes with
/// none are left out.
pub fn by_volume(
    table: &[MountEntry],
    pool_root: &Path,
    kubelet_dir: &Path,
    loops: &[(LoopDevice, String)],
) -> BTreeMap<String, usize> {
    let place = pool_place(table, pool_root);
    let mut out = BTreeMap::new();
    for e in table
        .iter()
        .filter(|e| e.mount_point.starts_with(kubelet_dir))
    {
        let id = loops
            .iter()
            .find(|(dev, _)| holds_loop(e, dev))
            .map(|(_, id)| id.clone())
            .or_else(|| place.as_ref().and_then(|p| dir_volume_of(e, p)));
        if let Some(id) = id {
            *out.entry(id).or_insert(0) += 1;
        }
    }
    out
}

/// Every mount point of volume `id` (of the pool at `pool_root`) under
/// `kubelet_dir`, stages and publishes alike, by identity: mounts of
/// `device` (its image's loop device, if one serves it) and binds of its
/// data directory. Both are looked for, so the answer needs no record of
/// the volume (an unstage after a delete still finds its mounts). Only the
/// mount on top at each mount point counts: a mount of something else
/// stacked over this volume's is not this volume's to unmount.
pub fn of_volume(
    table: &[MountEntry],
    pool_root: &Path,
    id: &str,
    device: Option<LoopDevice>,
    kubelet_dir: &Path,
) -> Vec<PathBuf> {
    let top = topmost(table);
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
    if let Some(place) = pool_place(table, pool_root) {
        out.extend(
            top.iter()
                .filter(ours)
                .filter(|e| dir_volume_of(e, &place).as_deref() == Some(id))
                .map(|e| e.mount_point.clone()),
        );
    }
    out
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

/// Every mount point of the loop device in `table`, under a kubelet
/// directory or not: filesystems on it, their binds, binds of its node.
pub fn loop_mount_points(table: &[MountEntry], dev: LoopDevice) -> Vec<PathBuf> {
    table
        .iter()
        .filter(|e| holds_loop(e, &dev))
        .map(|e| e.mount_point.clone())
        .collect()
}

/// The OFD locks in `records` (`/proc/locks`) on the filesystem that holds
/// the pool at `pool_root`, as (inode, kind). The filesystem is named by the
/// mount table's device, which is what `/proc/locks` uses (on btrfs,
/// stat's `st_dev` is a subvolume's anonymous device instead). A table
/// device that is not `major:minor` is an error.
pub fn pool_locks(
    table: &[MountEntry],
    pool_root: &Path,
    records: &[Recorded],
) -> io::Result<Vec<(u64, LockKind)>> {
    let Some(place) = pool_place(table, pool_root) else {
        return Ok(Vec::new());
    };
    let Some(device) = parse_device(&place.device) else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("mount table device {:?}", place.device),
        ));
    };
    Ok(records
        .iter()
        .filter(|r| r.device == device)
        .map(|r| (r.inode, r.kind))
        .collect())
}

/// `major:minor` (decimal, as the mount table writes it).
fn parse_device(text: &str) -> Option<(u32, u32)> {
    let (major, minor) = text.split_once(':')?;
    Some((major.parse().ok()?, minor.parse().ok()?))
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

/// The volumes of `loops` (loop devices with their volume's id) whose
/// filesystem is mounted under `kubelet_dir`, in the order of `loops`. A
/// block volume (its device node bound, no filesystem mounted) is not
/// listed.
pub fn filesystems(
    table: &[MountEntry],
    kubelet_dir: &Path,
    loops: &[(LoopDevice, String)],
) -> Vec<FsMount> {
    let pods = kubelet_dir.join("pods");
    let mut out = Vec::new();
    for (device, id) in loops {
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
            id: id.clone(),
            device: *device,
            mount_point: entry.mount_point.clone(),
            mount_id: entry.id,
        });
    }
    out
}

/// Whether the object at a path (`at`) shows the loop device whose node's
/// identity is `node`: a filesystem on the device (its `st_dev`), or a bind
/// of the node itself (a block device of that number).
fn shows_device(at: &Identity, node: &Identity) -> bool {
    node.block
        .is_some_and(|rdev| at.dev == rdev || at.block == Some(rdev))
}

/// Whether the object at a path (`at`) is the directory whose identity is
/// `data`: a bind of it.
fn is_dir(at: &Identity, data: &Identity) -> bool {
    (at.dev, at.ino) == (data.dev, data.ino)
}

/// Whether the object at a path lies on an anonymous device (major 0):
/// a filesystem such as btrfs, whose mounts stat does not name by their
/// block device, so only the mount table can say what the mount holds.
fn anonymous(at: &Identity) -> bool {
    rustix::fs::major(at.dev) == 0
}

// ---- the node's questions: the kernel's tables, then a classifier ----

/// The mount questions of one node about one pool (see the module
/// documentation): what they need is read through the node's kernel.
#[derive(Debug, Clone, Copy)]
pub(super) struct Mounts<'a> {
    kernel: &'a dyn Kernel,
    pool: &'a Pool,
    kubelet_dir: &'a Path,
}

impl Node {
    /// The mount questions about `pool` under this node's kubelet
    /// directory.
    pub(super) fn mounts<'a>(&'a self, pool: &'a Pool) -> Mounts<'a> {
        Mounts {
            kernel: &*self.kernel,
            pool,
            kubelet_dir: &self.kubelet_dir,
        }
    }

    /// Every mount point of loop device `dev` in this mount namespace.
    pub(super) fn loop_mount_points(&self, dev: LoopDevice) -> io::Result<Vec<PathBuf>> {
        Ok(loop_mount_points(&self.kernel.mount_table()?, dev))
    }

    /// Whether loop device `dev` is mounted anywhere in this mount
    /// namespace, under a kubelet directory or not.
    pub(super) fn loop_mounted(&self, dev: LoopDevice) -> io::Result<bool> {
        Ok(!self.loop_mount_points(dev)?.is_empty())
    }
}

impl Mounts<'_> {
    /// See [`of_volume`].
    pub fn of_volume(&self, id: &str, device: Option<LoopDevice>) -> io::Result<Vec<PathBuf>> {
        let table = self.kernel.mount_table()?;
        Ok(of_volume(
            &table,
            self.pool.resolved_root(),
            id,
            device,
            self.kubelet_dir,
        ))
    }

    /// Whether the mount on top at `path` (a mount root under the kubelet
    /// directory) holds volume `id`: a filesystem on `device` or a bind of
    /// it, a bind of `device`'s node, or a bind of the volume's data
    /// directory. Answered by one `statx` of the path where that proves it
    /// (the mount's device is the loop device's, the bound node is the
    /// device, the mount's root is the data directory's inode), and from
    /// the mount table otherwise ([`of_volume`]): a filesystem whose mounts
    /// show an anonymous device (btrfs), a mount that cannot be stat'ed (a
    /// dead one), or something that is not this volume's.
    pub fn holds(&self, id: &str, device: Option<LoopDevice>, path: &Path) -> io::Result<bool> {
        let from_table = || Ok(self.of_volume(id, device)?.iter().any(|p| p == path));
        let Ok(at) = self.kernel.identity(path) else {
            return from_table();
        };
        if let Some(dev) = device {
            if shows_device(&at, &self.kernel.identity(&dev.path())?) {
                return Ok(true);
            }
        }
        match self.kernel.identity(&self.pool.data_path(id)) {
            Ok(data) if is_dir(&at, &data) => return Ok(true),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        if device.is_some() && anonymous(&at) {
            return from_table();
        }
        Ok(false)
    }

    /// See [`staged_dirs`].
    pub fn staged_dirs(&self) -> io::Result<Vec<String>> {
        let table = self.kernel.mount_table()?;
        Ok(staged_dirs(
            &table,
            self.pool.resolved_root(),
            self.kubelet_dir,
        ))
    }

    /// How many mounts each of the pool's volumes has under the kubelet
    /// directory ([`by_volume`]): the mounts and binds of the loop device
    /// its image is attached to (filesystem or block, wherever kubelet put
    /// the target), and the binds of its data directory. Read once from the
    /// mount table and the loop devices, whatever the number of volumes:
    /// the metrics ask at every scrape.
    pub fn by_volume(&self) -> io::Result<BTreeMap<String, usize>> {
        let table = self.kernel.mount_table()?;
        let loops = self.attached_images(false)?;
        Ok(by_volume(
            &table,
            self.pool.resolved_root(),
            self.kubelet_dir,
            &loops,
        ))
    }

    /// Every image volume of the pool whose filesystem is mounted under
    /// the kubelet directory, once each ([`filesystems`]). Found from the
    /// kernel (attached loop devices, their backing files, the mount
    /// table), never from records; a device whose detach is pending is not
    /// listed.
    pub fn filesystems(&self) -> io::Result<Vec<FsMount>> {
        let loops = self.attached_images(true)?;
        if loops.is_empty() {
            return Ok(Vec::new());
        }
        let table = self.kernel.mount_table()?;
        Ok(filesystems(&table, self.kubelet_dir, &loops))
    }

    /// The OFD locks this host records on the pool's filesystem
    /// ([`pool_locks`]), as (inode, kind) (see `node::custody`).
    pub fn pool_locks(&self) -> io::Result<Vec<(u64, LockKind)>> {
        let table = self.kernel.mount_table()?;
        pool_locks(
            &table,
            self.pool.resolved_root(),
            &self.kernel.lock_records()?,
        )
    }

    /// The loop devices attached to the pool's images, as (device, the
    /// volume's id), in id order. When `settled`, those with a detach
    /// pending are left out and each image has one device at most (the
    /// last the kernel lists).
    fn attached_images(&self, settled: bool) -> io::Result<Vec<(LoopDevice, String)>> {
        let mut by_file: HashMap<(u64, u64), Vec<LoopDevice>> = HashMap::new();
        for (bound, backing) in self.kernel.attached()? {
            let devices = by_file.entry(backing).or_default();
            if !settled {
                devices.push(bound.device);
            } else if !bound.detaching {
                *devices = vec![bound.device];
            }
        }
        by_file.retain(|_, devices| !devices.is_empty());
        let mut out = Vec::new();
        if by_file.is_empty() {
            return Ok(out);
        }
        // From the directory, not the records: an unreadable record does not
        // unmount a volume.
        for id in self
            .pool
            .store()
            .ids(Kind::Volume)
            .map_err(io::Error::other)?
        {
            let Some(meta) = image_metadata(self.pool, &id)? else {
                continue;
            };
            if let Some(devices) = by_file.get(&(meta.dev(), meta.ino())) {
                out.extend(devices.iter().map(|d| (*d, id.clone())));
            }
        }
        Ok(out)
    }
}

/// The image of volume `id`, `None` when it has none (a dir volume, or one
/// deleted meanwhile: ENOENT). An image that cannot be looked at is an
/// error naming it, never a volume without mounts.
fn image_metadata(pool: &Pool, id: &str) -> io::Result<Option<std::fs::Metadata>> {
    let image = pool.image_path(id);
    crate::sys::fs::metadata_if_present(&image)
        .map_err(|e| io::Error::new(e.kind(), format!("stat {}: {e}", image.display())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::mountinfo;

    /// A node's mount table as the kernel writes it: a pool on /dev/sda1
    /// (8:1, mounted at /) at /pool, kubelet at /k; loop3 and loop4 back two of the
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
        let counted = by_volume(&table, Path::new("/pool"), Path::new("/k"), &loops);
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
