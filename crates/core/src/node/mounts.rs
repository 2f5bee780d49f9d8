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

    /// Every volume of the pool with a settled loop device, as (id,
    /// device).
    pub fn volume_devices(&self) -> io::Result<Vec<(String, LoopDevice)>> {
        Ok(self
            .attached_images(true)?
            .into_iter()
            .map(|(dev, id)| (id, dev))
            .collect())
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

/// The classifiers on mount tables as the kernel writes them
/// (`/proc/self/mountinfo`, fields escaped), one node layout each. The node
/// tests (`node::tests`) run the same functions on the fake kernel's table.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::lock::parse_recorded;
    use crate::sys::mountinfo;
    use rustix::fs::makedev;

    const KUBELET: &str = "/var/lib/kubelet";

    fn loop_dev(number: u32) -> LoopDevice {
        LoopDevice { number }
    }

    fn paths(list: &[&str]) -> Vec<PathBuf> {
        list.iter().map(PathBuf::from).collect()
    }

    fn counts(list: &[(&str, usize)]) -> BTreeMap<String, usize> {
        list.iter().map(|&(id, n)| (id.to_owned(), n)).collect()
    }

    fn kubelet() -> &'static Path {
        Path::new(KUBELET)
    }

    /// An xfs pool on its own disk at /srv/filevol. Image volume `a` is on
    /// loop3 (ext4): staged, published to two pods, and a tmpfs mounted
    /// later over its second publish. Block volume `c` is on loop4: its
    /// node bound at the block staging file and a block publish. A pod
    /// also has loop40's node (another volume, a number that starts like
    /// loop4's).
    const XFS_POOL: &str = "\
22 1 259:2 / / rw,relatime shared:1 - ext4 /dev/nvme0n1p2 rw,errors=remount-ro
24 22 0:5 / /dev rw,nosuid,relatime shared:2 - devtmpfs udev rw,size=8046784k,nr_inodes=2011696,mode=755,inode64
60 22 259:5 / /srv/filevol rw,noatime shared:30 - xfs /dev/nvme1n1 rw,attr2,inode64,logbufs=8,logbsize=32k,noquota
81 22 7:3 / /var/lib/kubelet/plugins/kubernetes.io/csi/filevol.csi.rs/3f1a/globalmount rw,relatime shared:41 - ext4 /dev/loop3 rw
82 22 7:3 / /var/lib/kubelet/pods/0a1b/volumes/kubernetes.io~csi/pvc-a/mount rw,relatime shared:41 - ext4 /dev/loop3 rw
83 22 7:3 / /var/lib/kubelet/pods/0c2d/volumes/kubernetes.io~csi/pvc-a/mount rw,relatime shared:41 - ext4 /dev/loop3 rw
84 83 0:61 / /var/lib/kubelet/pods/0c2d/volumes/kubernetes.io~csi/pvc-a/mount rw,relatime shared:50 - tmpfs tmpfs rw,size=65536k,inode64
85 22 0:5 /loop4 /var/lib/kubelet/plugins/kubernetes.io/csi/volumeDevices/staging/pvc-c/device rw,nosuid,relatime shared:2 - devtmpfs udev rw,size=8046784k,nr_inodes=2011696,mode=755,inode64
86 22 0:5 /loop4 /var/lib/kubelet/plugins/kubernetes.io/csi/volumeDevices/publish/pvc-c/0e3f rw,nosuid,relatime shared:2 - devtmpfs udev rw,size=8046784k,nr_inodes=2011696,mode=755,inode64
87 22 0:5 /loop40 /var/lib/kubelet/pods/0e3f/volumeDevices/kubernetes.io~csi/pvc-z rw,nosuid,relatime shared:2 - devtmpfs udev rw,size=8046784k,nr_inodes=2011696,mode=755,inode64
";

    const STAGE_A: &str =
        "/var/lib/kubelet/plugins/kubernetes.io/csi/filevol.csi.rs/3f1a/globalmount";
    const PUBLISH_A1: &str = "/var/lib/kubelet/pods/0a1b/volumes/kubernetes.io~csi/pvc-a/mount";
    const PUBLISH_A2: &str = "/var/lib/kubelet/pods/0c2d/volumes/kubernetes.io~csi/pvc-a/mount";
    const STAGE_C: &str =
        "/var/lib/kubelet/plugins/kubernetes.io/csi/volumeDevices/staging/pvc-c/device";
    const PUBLISH_C: &str =
        "/var/lib/kubelet/plugins/kubernetes.io/csi/volumeDevices/publish/pvc-c/0e3f";

    #[test]
    fn an_image_volume_is_found_by_its_loop_device_wherever_it_is_mounted() {
        let table = mountinfo::parse(XFS_POOL);
        let pool = Path::new("/srv/filevol");
        // The publish with a tmpfs over it is not a's to unmount.
        assert_eq!(
            of_volume(&table, pool, "a", Some(loop_dev(3)), kubelet()),
            paths(&[STAGE_A, PUBLISH_A1])
        );
        // A block volume: its node's binds, loop40's not among them.
        assert_eq!(
            of_volume(&table, pool, "c", Some(loop_dev(4)), kubelet()),
            paths(&[STAGE_C, PUBLISH_C])
        );
        // No device: an image volume has nothing the table could show.
        assert!(of_volume(&table, pool, "a", None, kubelet()).is_empty());
        // Every mount of the device, the covered one too.
        assert_eq!(
            loop_mount_points(&table, loop_dev(3)),
            paths(&[STAGE_A, PUBLISH_A1, PUBLISH_A2])
        );
        assert_eq!(
            loop_mount_points(&table, loop_dev(40)),
            paths(&["/var/lib/kubelet/pods/0e3f/volumeDevices/kubernetes.io~csi/pvc-z"])
        );
        assert!(loop_mount_points(&table, loop_dev(9)).is_empty());
        // The gauges count every mount of the volume (the covered publish
        // too); loop40 is not the pool's.
        let loops = [(loop_dev(3), "a".to_owned()), (loop_dev(4), "c".to_owned())];
        assert_eq!(
            by_volume(&table, pool, kubelet(), &loops),
            counts(&[("a", 3), ("c", 2)])
        );
        // Trims: a's filesystem through its stage, c (block) not at all,
        // whatever order the table lists the mounts in.
        let stage = FsMount {
            id: "a".into(),
            device: loop_dev(3),
            mount_point: STAGE_A.into(),
            mount_id: 81,
        };
        let reversed: Vec<MountEntry> = table.iter().rev().cloned().collect();
        assert_eq!(
            filesystems(&reversed, kubelet(), &loops),
            std::slice::from_ref(&stage)
        );
        assert_eq!(filesystems(&table, kubelet(), &loops), [stage]);
        assert!(staged_dirs(&table, pool, kubelet()).is_empty());
    }

    #[test]
    fn the_pools_locks_are_those_on_the_device_the_table_names() {
        let table = mountinfo::parse(XFS_POOL);
        // /proc/locks writes major:minor in hex: 259:5 is 103:05.
        let records = parse_recorded(
            "\
1: OFDLCK ADVISORY  WRITE -1 103:05:131 0 EOF
2: OFDLCK ADVISORY  READ  -1 103:05:140 0 EOF
3: OFDLCK ADVISORY  WRITE -1 103:02:131 0 EOF
4: POSIX  ADVISORY  WRITE 812 103:05:150 0 EOF
",
        );
        assert_eq!(
            pool_locks(&table, Path::new("/srv/filevol"), &records).unwrap(),
            [(131, LockKind::Exclusive), (140, LockKind::Shared)]
        );
        // A pool no mount holds (an empty table): no locks, no error.
        assert!(pool_locks(&[], Path::new("/srv/filevol"), &records)
            .unwrap()
            .is_empty());
    }

    /// The same pool with directory volumes: `d` staged and published,
    /// then a subPath of its publish; a bind of `e`'s volume directory (not
    /// its data); `f`'s data in another pool on the root disk; `g`'s data
    /// bound outside any kubelet directory.
    const DIR_VOLUMES: &str = "\
22 1 259:2 / / rw,relatime shared:1 - ext4 /dev/nvme0n1p2 rw,errors=remount-ro
60 22 259:5 / /srv/filevol rw,noatime shared:30 - xfs /dev/nvme1n1 rw,attr2,inode64,logbufs=8,logbsize=32k,noquota
90 22 259:5 /volumes/d/data /var/lib/kubelet/plugins/kubernetes.io/csi/filevol.csi.rs/7c4e/globalmount rw,noatime shared:30 - xfs /dev/nvme1n1 rw,attr2,inode64,logbufs=8,logbsize=32k,noquota
91 22 259:5 /volumes/d/data /var/lib/kubelet/pods/1a2b/volumes/kubernetes.io~csi/pvc-d/mount ro,noatime shared:30 - xfs /dev/nvme1n1 rw,attr2,inode64,logbufs=8,logbsize=32k,noquota
92 22 259:5 /volumes/d/data/logs /var/lib/kubelet/pods/1a2b/volume-subpaths/pvc-d/app/0 rw,noatime shared:30 - xfs /dev/nvme1n1 rw,attr2,inode64,logbufs=8,logbsize=32k,noquota
93 22 259:5 /volumes/e /var/lib/kubelet/pods/3c4d/volumes/kubernetes.io~csi/pvc-e/mount rw,noatime shared:30 - xfs /dev/nvme1n1 rw,attr2,inode64,logbufs=8,logbsize=32k,noquota
94 22 259:2 /srv/other/volumes/f/data /var/lib/kubelet/pods/5e6f/volumes/kubernetes.io~csi/pvc-f/mount rw,relatime shared:1 - ext4 /dev/nvme0n1p2 rw,errors=remount-ro
95 22 259:5 /volumes/g/data /mnt/debug rw,noatime shared:30 - xfs /dev/nvme1n1 rw,attr2,inode64,logbufs=8,logbsize=32k,noquota
";

    #[test]
    fn a_dir_volume_is_found_by_the_root_of_its_binds() {
        let table = mountinfo::parse(DIR_VOLUMES);
        let pool = Path::new("/srv/filevol");
        assert_eq!(staged_dirs(&table, pool, kubelet()), ["d"]);
        assert_eq!(staged_dirs(&table, pool, Path::new("/")), ["d", "g"]);
        // The subPath bind kubelet makes of a subdirectory is kubelet's:
        // only binds of the data directory itself are the volume's.
        assert_eq!(
            of_volume(&table, pool, "d", None, kubelet()),
            paths(&[
                "/var/lib/kubelet/plugins/kubernetes.io/csi/filevol.csi.rs/7c4e/globalmount",
                "/var/lib/kubelet/pods/1a2b/volumes/kubernetes.io~csi/pvc-d/mount",
            ])
        );
        assert!(of_volume(&table, pool, "e", None, kubelet()).is_empty());
        // The same path inside another filesystem is another pool's.
        assert!(of_volume(&table, pool, "f", None, kubelet()).is_empty());
        assert_eq!(
            of_volume(&table, Path::new("/srv/other"), "f", None, kubelet()).len(),
            1
        );
        assert_eq!(by_volume(&table, pool, kubelet(), &[]), counts(&[("d", 2)]));
    }

    /// A btrfs pool in subvolume `/filevol` of /dev/sdb, mounted at
    /// /srv/pool: the table names the filesystem by its anonymous device
    /// 0:45 and paths inside it from the top of the filesystem, and stat
    /// of a file in the subvolume gives yet another device. Directory
    /// volume `d` is staged; image volume `b` holds a btrfs on loop7, which
    /// also shows an anonymous device.
    const BTRFS_POOL: &str = "\
22 1 259:2 / / rw,relatime shared:1 - ext4 /dev/nvme0n1p2 rw,errors=remount-ro
61 22 0:45 /filevol /srv/pool rw,relatime shared:31 - btrfs /dev/sdb rw,space_cache=v2,subvolid=256,subvol=/filevol
96 22 0:45 /filevol/volumes/d/data /var/lib/kubelet/plugins/kubernetes.io/csi/filevol.csi.rs/9a0b/globalmount rw,relatime shared:31 - btrfs /dev/sdb rw,space_cache=v2,subvolid=256,subvol=/filevol
97 22 0:52 / /var/lib/kubelet/plugins/kubernetes.io/csi/filevol.csi.rs/5d6e/globalmount rw,relatime shared:42 - btrfs /dev/loop7 rw,space_cache=v2,subvolid=5,subvol=/
98 22 0:52 / /var/lib/kubelet/pods/7f80/volumes/kubernetes.io~csi/pvc-b/mount rw,relatime shared:42 - btrfs /dev/loop7 rw,space_cache=v2,subvolid=5,subvol=/
";

    #[test]
    fn on_btrfs_the_table_names_what_stat_cannot() {
        let table = mountinfo::parse(BTRFS_POOL);
        let pool = Path::new("/srv/pool");
        let stage_b = "/var/lib/kubelet/plugins/kubernetes.io/csi/filevol.csi.rs/5d6e/globalmount";
        assert_eq!(staged_dirs(&table, pool, kubelet()), ["d"]);
        assert_eq!(
            of_volume(&table, pool, "d", None, kubelet()),
            paths(&["/var/lib/kubelet/plugins/kubernetes.io/csi/filevol.csi.rs/9a0b/globalmount"])
        );
        assert_eq!(
            of_volume(&table, pool, "b", Some(loop_dev(7)), kubelet()),
            paths(&[
                stage_b,
                "/var/lib/kubelet/pods/7f80/volumes/kubernetes.io~csi/pvc-b/mount"
            ])
        );
        assert_eq!(
            filesystems(&table, kubelet(), &[(loop_dev(7), "b".to_owned())]),
            [FsMount {
                id: "b".into(),
                device: loop_dev(7),
                mount_point: stage_b.into(),
                mount_id: 97,
            }]
        );
        // /proc/locks names the filesystem as the table does (0:45, hex
        // 00:2d), not as stat of a file in the subvolume would (0:46).
        let records = parse_recorded(
            "\
1: OFDLCK ADVISORY  WRITE -1 00:2d:300 0 EOF
2: OFDLCK ADVISORY  WRITE -1 00:2e:301 0 EOF
",
        );
        assert_eq!(
            pool_locks(&table, pool, &records).unwrap(),
            [(300, LockKind::Exclusive)]
        );
        // statx of b's stage shows an anonymous device, not loop7: only the
        // table can tell, so the fast path hands the question over.
        let at = Identity {
            dev: makedev(0, 53),
            ino: 256,
            block: None,
        };
        let node = Identity {
            dev: makedev(0, 5),
            ino: 7_100,
            block: Some(makedev(7, 7)),
        };
        assert!(!shows_device(&at, &node));
        assert!(anonymous(&at));
    }

    #[test]
    fn statx_proves_a_mount_of_the_device_or_the_data_directory() {
        let node = |n| Identity {
            dev: makedev(0, 5),
            ino: 7_000 + u64::from(n),
            block: Some(makedev(7, n)),
        };
        // A filesystem on loop3, at its root.
        let fs = Identity {
            dev: makedev(7, 3),
            ino: 2,
            block: None,
        };
        assert!(shows_device(&fs, &node(3)));
        assert!(!shows_device(&fs, &node(4)));
        assert!(!anonymous(&fs));
        // loop4's node bound onto a file.
        let bound = node(4);
        assert!(shows_device(&bound, &node(4)));
        assert!(!shows_device(&bound, &node(40)));
        // A path that is not a block device names no device.
        let not_a_node = Identity {
            block: None,
            ..node(3)
        };
        assert!(!shows_device(&fs, &not_a_node));
        // A bind of a data directory: the same inode on the same device.
        let data = Identity {
            dev: makedev(259, 5),
            ino: 131,
            block: None,
        };
        assert!(is_dir(&data, &data));
        assert!(!is_dir(&Identity { ino: 132, ..data }, &data));
        assert!(!is_dir(
            &Identity {
                dev: makedev(259, 2),
                ..data
            },
            &data
        ));
    }

    /// What the kernel writes for what was removed while mounted: `d`'s
    /// data directory deleted while bound at a publish (the root gets the
    /// kernel's `//deleted` mark), and loop3's stage, whose image was
    /// deleted (the table names the device, never the file behind it).
    const DELETED: &str = "\
22 1 259:2 / / rw,relatime shared:1 - ext4 /dev/nvme0n1p2 rw,errors=remount-ro
60 22 259:5 / /srv/filevol rw,noatime shared:30 - xfs /dev/nvme1n1 rw,attr2,inode64,logbufs=8,logbsize=32k,noquota
99 22 259:5 /volumes/d/data//deleted /var/lib/kubelet/pods/1a2b/volumes/kubernetes.io~csi/pvc-d/mount rw,noatime shared:30 - xfs /dev/nvme1n1 rw,attr2,inode64,logbufs=8,logbsize=32k,noquota
100 22 7:3 / /var/lib/kubelet/plugins/kubernetes.io/csi/filevol.csi.rs/3f1a/globalmount rw,relatime shared:41 - ext4 /dev/loop3 rw
";

    #[test]
    fn what_was_deleted_while_mounted() {
        let table = mountinfo::parse(DELETED);
        let pool = Path::new("/srv/filevol");
        // A bind of a removed directory is no volume's: the table cannot
        // tell it from any other directory that is gone.
        assert_eq!(
            table[2].root,
            PathBuf::from("/volumes/d/data//deleted"),
            "the mark is kept as the kernel wrote it"
        );
        assert!(staged_dirs(&table, pool, kubelet()).is_empty());
        assert!(of_volume(&table, pool, "d", None, kubelet()).is_empty());
        assert!(by_volume(&table, pool, kubelet(), &[]).is_empty());
        // The device still holds a volume whose image is gone.
        assert_eq!(
            of_volume(&table, pool, "a", Some(loop_dev(3)), kubelet()),
            paths(&[STAGE_A])
        );
    }

    /// Two node plugins on one host: this one's kubelet directory is
    /// /var/lib/kubelet, the other's /var/lib/kubelet-b (a name that
    /// starts like this one's). Image volume `a` is the other's, on loop5;
    /// directory volume `d` is staged read-only by both.
    const TWO_PLUGINS: &str = "\
22 1 259:2 / / rw,relatime shared:1 - ext4 /dev/nvme0n1p2 rw,errors=remount-ro
60 22 259:5 / /srv/filevol rw,noatime shared:30 - xfs /dev/nvme1n1 rw,attr2,inode64,logbufs=8,logbsize=32k,noquota
101 22 7:5 / /var/lib/kubelet-b/plugins/kubernetes.io/csi/filevol.csi.rs/aa11/globalmount rw,relatime shared:43 - ext4 /dev/loop5 rw
102 22 7:5 / /var/lib/kubelet-b/pods/bb22/volumes/kubernetes.io~csi/pvc-a/mount rw,relatime shared:43 - ext4 /dev/loop5 rw
103 22 259:5 /volumes/d/data /var/lib/kubelet-b/plugins/kubernetes.io/csi/filevol.csi.rs/cc33/globalmount ro,noatime shared:30 - xfs /dev/nvme1n1 rw,attr2,inode64,logbufs=8,logbsize=32k,noquota
104 22 259:5 /volumes/d/data /var/lib/kubelet/plugins/kubernetes.io/csi/filevol.csi.rs/cc33/globalmount ro,noatime shared:30 - xfs /dev/nvme1n1 rw,attr2,inode64,logbufs=8,logbsize=32k,noquota
";

    #[test]
    fn another_plugins_kubelet_directory_is_not_ours() {
        let table = mountinfo::parse(TWO_PLUGINS);
        let pool = Path::new("/srv/filevol");
        let other = Path::new("/var/lib/kubelet-b");
        let loops = [(loop_dev(5), "a".to_owned())];
        // This plugin sees none of a's mounts as its own...
        assert!(of_volume(&table, pool, "a", Some(loop_dev(5)), kubelet()).is_empty());
        assert!(filesystems(&table, kubelet(), &loops).is_empty());
        assert_eq!(
            by_volume(&table, pool, kubelet(), &loops),
            counts(&[("d", 1)])
        );
        // ...but sees that loop5 is mounted (so it adopts nothing of it).
        assert_eq!(loop_mount_points(&table, loop_dev(5)).len(), 2);
        // Each plugin has its own bind of d.
        assert_eq!(staged_dirs(&table, pool, kubelet()), ["d"]);
        assert_eq!(staged_dirs(&table, pool, other), ["d"]);
        assert_eq!(
            of_volume(&table, pool, "d", None, kubelet()),
            paths(&["/var/lib/kubelet/plugins/kubernetes.io/csi/filevol.csi.rs/cc33/globalmount"])
        );
        assert_eq!(
            filesystems(&table, other, &loops)
                .iter()
                .map(|m| m.mount_id)
                .collect::<Vec<_>>(),
            [101]
        );
    }

    /// Names with a space, a tab and a backslash, which the kernel writes as
    /// `\040`, `\011` and `\134`: a pool at "/srv/file vol" on the root
    /// disk, another at "/mnt/pool disk/filevol" on its own disk, and pod
    /// directories with such names.
    const ESCAPES: &str = r"22 1 259:2 / / rw,relatime shared:1 - ext4 /dev/nvme0n1p2 rw,errors=remount-ro
105 22 259:2 /srv/file\040vol/volumes/d/data /var/lib/kubelet/pods/1a\0402b/volumes/kubernetes.io~csi/pvc\134d/mount rw,relatime shared:1 - ext4 /dev/nvme0n1p2 rw,errors=remount-ro
106 22 7:6 / /var/lib/kubelet/pods/1a\0402b/volumes/kubernetes.io~csi/pvc\011a/mount rw,relatime shared:44 - ext4 /dev/loop6 rw
107 22 259:7 / /mnt/pool\040disk rw,noatime shared:32 - xfs /dev/sdc rw,attr2,inode64,noquota
108 22 259:7 /filevol/volumes/e/data /var/lib/kubelet/pods/9c8d/volumes/kubernetes.io~csi/pvc-e/mount rw,noatime shared:32 - xfs /dev/sdc rw,attr2,inode64,noquota
";

    #[test]
    fn escaped_names_are_compared_as_the_paths_they_stand_for() {
        let table = mountinfo::parse(ESCAPES);
        let pool = Path::new("/srv/file vol");
        assert_eq!(staged_dirs(&table, pool, kubelet()), ["d"]);
        assert_eq!(
            of_volume(&table, pool, "d", None, kubelet()),
            paths(&["/var/lib/kubelet/pods/1a 2b/volumes/kubernetes.io~csi/pvc\\d/mount"])
        );
        assert_eq!(
            of_volume(&table, pool, "a", Some(loop_dev(6)), kubelet()),
            paths(&["/var/lib/kubelet/pods/1a 2b/volumes/kubernetes.io~csi/pvc\ta/mount"])
        );
        let on_disk = Path::new("/mnt/pool disk/filevol");
        assert_eq!(staged_dirs(&table, on_disk, kubelet()), ["e"]);
        assert_eq!(
            by_volume(&table, on_disk, kubelet(), &[(loop_dev(6), "a".to_owned())]),
            counts(&[("a", 1), ("e", 1)])
        );
        // The escaped form is not the path.
        assert!(staged_dirs(&table, Path::new(r"/srv/file\040vol"), kubelet()).is_empty());
    }

    /// A node's mount table as the kernel writes it: a pool on /dev/sda1
    /// (8:1, mounted at /) at /pool, kubelet at /k; loop3 and loop4 back two
    /// of the pool's images, loop5 another pool's.
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
        assert_eq!(counted, counts(&[("a", 3), ("c", 3), ("d", 2)]));
    }
}
