//! Whether the pool's locks reach other hosts, decided from what is known
//! when a pool opens: the mount that holds it, that mount's filesystem type
//! and its options.
//!
//! Every single-writer guarantee of a shared pool rests on OFD locks in the
//! pool's files (`sys::lock`): a node plugin holds a volume's `fence` while
//! the volume is staged, and a delete or a copy asks for it. Those locks
//! exclude a process on another host only when the filesystem hands them
//! to something every host asks (an NFS server, the CephFS MDS, a cluster
//! lock manager). On a filesystem that keeps them in this kernel they
//! exclude nothing elsewhere, and two hosts could each stage one volume for
//! writing. Which filesystems do what:
//!
//! - **NFS** (`nfs`, `nfs4`). The client sends byte-range locks, OFD locks
//!   among them, to the server (NLM for v2/v3, LOCK for v4.x) unless the
//!   mount makes them local. nfs(5): `local_lock=posix` and `local_lock=all`
//!   keep POSIX byte-range locks on the client, "exclusion only against
//!   other applications running on the same client"; `nolock` sets both
//!   local flags, and overrides any `local_lock=` given with it.
//!   `local_lock=flock` makes only `flock` local, which filevol does not
//!   use: its OFD locks still go to the server. The kernel shows the
//!   outcome in the super options as `local_lock=none|flock|posix|all`
//!   (and `nolock` on v2/v3), so the table says what the client does.
//! - **CephFS** (`ceph`, the kernel client; `fuse.ceph-fuse`, which
//!   implements FUSE's lock requests): POSIX locks are granted by the MDS,
//!   which every client of the filesystem asks.
//! - **gfs2**: POSIX locks go through the cluster's DLM, unless the mount
//!   says `localflocks` or `lockproto=lock_nolock`.
//! - **Other FUSE filesystems** (`fuse.bindfs`, `fuse.sshfs`, ...): the
//!   kernel sends lock requests to the daemon only if the daemon announced
//!   POSIX lock support when it started (`FUSE_POSIX_LOCKS` in its INIT
//!   reply); otherwise it keeps the locks itself, per mount, on this host.
//!   Nothing in the mount table says which, and asking would need a second
//!   host. So two bindfs views of one directory, even on one host, do not
//!   see each other's locks (the integration test `lock_reach` shows it).
//! - **Local filesystems** (ext4, xfs, btrfs, tmpfs, overlay, ...): locks
//!   are real and conflict between every process of this host, and reach no
//!   other host. Right for the node-local layout; a pool on them is not a
//!   shared pool whatever the topology says.
//! - **Anything else** (ocfs2, whose POSIX locks are cluster-wide only on
//!   the userspace cluster stack; SMB, 9p, virtiofs; filesystems filevol
//!   has not met) may keep them on this host.
//!
//! The rule that applies this is [`verdict`]: in the shared layout (an
//! empty `--topology`) a pool whose class is not [`Class::Shared`] is
//! refused unless the operator passes `--allow-host-local-locks`.

use std::fmt;
use std::path::{Path, PathBuf};

use crate::sys::mountinfo::{self, MountEntry};

/// The flag that lets a shared pool start on locks that may stay on one
/// host, as `filevol serve` and `filevol doctor` spell it.
pub const ALLOW_FLAG: &str = "--allow-host-local-locks";

/// Where a pool's locks reach.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Class {
    /// To every host that mounts the filesystem.
    Shared,
    /// A local filesystem: every process of this host, no other host.
    HostLocal,
    /// Perhaps only this host, or only this mount (the reason says why).
    MayStayOnHost,
}

impl fmt::Display for Class {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Class::Shared => "shared",
            Class::HostLocal => "host-local",
            Class::MayStayOnHost => "may-stay-on-host",
        })
    }
}

/// What was found about the pool's locks, and why.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LockReach {
    /// The class.
    pub class: Class,
    /// The filesystem type of the mount holding the pool (`nfs4`,
    /// `fuse.bindfs`); empty when no mount was found.
    pub fs_type: String,
    /// Where that mount is.
    pub mount_point: PathBuf,
    /// What it mounts (`server:/export`, `/dev/vdb`).
    pub source: String,
    /// Why the class follows from the type and options.
    pub reason: String,
}

impl fmt::Display for LockReach {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.fs_type.is_empty() {
            return write!(f, "locks {}: {}", self.class, self.reason);
        }
        write!(
            f,
            "{} ({} at {}), locks {}: {}",
            self.fs_type,
            self.source,
            self.mount_point.display(),
            self.class,
            self.reason
        )
    }
}

/// Local filesystems: their locks are this kernel's.
const LOCAL: &[&str] = &[
    "ext2", "ext3", "ext4", "xfs", "btrfs", "f2fs", "zfs", "bcachefs", "jfs", "reiserfs", "nilfs2",
    "tmpfs", "ramfs", "overlay", "vfat", "exfat", "ntfs3", "hfsplus",
];

/// The class of a mount with filesystem type `fs_type` and `options` (the
/// per-mount and super options together, comma-separated), and why.
pub fn classify(fs_type: &str, options: &str) -> (Class, String) {
    let has = |want: &str| options.split(',').any(|o| o == want);
    match fs_type {
        "nfs" | "nfs4" => classify_nfs(&has),
        "ceph" => (
            Class::Shared,
            "CephFS: the MDS grants POSIX and OFD locks to every client".into(),
        ),
        "fuse.ceph-fuse" => (
            Class::Shared,
            "ceph-fuse forwards POSIX and OFD locks to the CephFS MDS".into(),
        ),
        "gfs2" if has("localflocks") || has("lockproto=lock_nolock") => (
            Class::MayStayOnHost,
            "gfs2 mounted with localflocks or lock_nolock: the VFS of each host keeps the locks"
                .into(),
        ),
        "gfs2" => (
            Class::Shared,
            "gfs2 takes POSIX locks through the cluster's DLM".into(),
        ),
        t if t == "fuse" || t == "fuseblk" || t.starts_with("fuse.") => (
            Class::MayStayOnHost,
            "a FUSE filesystem: unless its daemon implements lock requests, the kernel keeps \
             the locks for this mount alone, and the mount table cannot say which"
                .into(),
        ),
        t if LOCAL.contains(&t) => (
            Class::HostLocal,
            "a local filesystem: its locks conflict between processes of this host only".into(),
        ),
        _ => (
            Class::MayStayOnHost,
            "not a filesystem filevol knows to carry locks to other hosts".into(),
        ),
    }
}

/// NFS: see the module documentation (nfs(5), `nolock` and `local_lock=`).
fn classify_nfs(has: &dyn Fn(&str) -> bool) -> (Class, String) {
    if has("nolock") {
        return (
            Class::MayStayOnHost,
            "NFS mounted nolock: locks are local to this client and exclude nothing on other \
             hosts (nfs(5))"
                .into(),
        );
    }
    for mode in ["all", "posix"] {
        if has(&format!("local_lock={mode}")) {
            return (
                Class::MayStayOnHost,
                format!(
                    "NFS mounted local_lock={mode}: POSIX and OFD locks are local to this \
                     client and exclude nothing on other hosts (nfs(5))"
                ),
            );
        }
    }
    let flock = if has("local_lock=flock") {
        " (local_lock=flock keeps only flock locks local, which filevol does not take)"
    } else {
        ""
    };
    (
        Class::Shared,
        format!("NFS sends POSIX and OFD locks to the server{flock}"),
    )
}

/// The mount that holds `path` (already resolved): the longest mount point
/// that is a prefix of it, the later line winning among mounts stacked on
/// one point (the table lists them in the order they were made).
pub fn holding_mount<'a>(path: &Path, table: &'a [MountEntry]) -> Option<&'a MountEntry> {
    let mut best: Option<&MountEntry> = None;
    for entry in table {
        if !path.starts_with(&entry.mount_point) {
            continue;
        }
        let len = entry.mount_point.as_os_str().len();
        if best.is_none_or(|b| len >= b.mount_point.as_os_str().len()) {
            best = Some(entry);
        }
    }
    best
}

/// The lock reach of the mount `entry`.
pub fn of_mount(entry: &MountEntry) -> LockReach {
    let options = format!("{},{}", entry.options, entry.super_options);
    let (class, reason) = classify(&entry.fs_type, &options);
    LockReach {
        class,
        fs_type: entry.fs_type.clone(),
        mount_point: entry.mount_point.clone(),
        source: entry.source.clone(),
        reason,
    }
}

/// The lock reach of resolved `path` in mount table `table`.
pub fn in_table(path: &Path, table: &[MountEntry]) -> LockReach {
    match holding_mount(path, table) {
        Some(entry) => of_mount(entry),
        None => LockReach {
            class: Class::MayStayOnHost,
            fs_type: String::new(),
            mount_point: PathBuf::new(),
            source: String::new(),
            reason: format!("no mount in /proc/self/mountinfo holds {}", path.display()),
        },
    }
}

/// The lock reach of the pool at `pool`, from this process's mount table.
pub fn of_pool(pool: &Path) -> std::io::Result<LockReach> {
    let resolved = pool.canonicalize()?;
    Ok(in_table(&resolved, &mountinfo::read()?))
}

/// What a process does about a pool's lock reach.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing to say: the locks reach where the layout needs them.
    Fine,
    /// The locks may stay on this host where the layout needs more, and
    /// the operator said to go on (or, for `doctor`, should look).
    Warn,
    /// The shared layout on locks that may stay on this host: refuse.
    Refuse,
}

/// The rule: the shared layout (`shared`: an empty topology, processes on
/// many hosts) needs [`Class::Shared`] and refuses anything else unless
/// `allowed` ([`ALLOW_FLAG`]); the node-local layout never refuses, since
/// all its processes are on one host.
pub fn verdict(class: Class, shared: bool, allowed: bool) -> Verdict {
    match (class, shared, allowed) {
        (Class::Shared, _, _) | (_, false, _) => Verdict::Fine,
        (_, true, true) => Verdict::Warn,
        (_, true, false) => Verdict::Refuse,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The class of one mountinfo line.
    fn class_of(line: &str) -> (Class, String) {
        let entry = mountinfo::parse_line(line).expect("a mountinfo line");
        let reach = of_mount(&entry);
        (reach.class, reach.reason)
    }

    const NFS4: &str = "120 30 0:52 / /mnt/filevol rw,relatime shared:70 - nfs4 srv:/export \
        rw,vers=4.2,rsize=1048576,wsize=1048576,namlen=255,hard,proto=tcp,timeo=600,\
        retrans=2,sec=sys,clientaddr=10.0.0.2,local_lock=none,addr=10.0.0.1";

    #[test]
    fn nfs_forwards_locks_unless_told_to_keep_them() {
        assert_eq!(class_of(NFS4).0, Class::Shared);
        let v3 = "121 30 0:53 / /mnt/v3 rw,relatime - nfs srv:/export \
            rw,vers=3,rsize=1048576,hard,proto=tcp,sec=sys,mountvers=3,mountport=20048,\
            mountproto=udp,local_lock=none,addr=10.0.0.1";
        assert_eq!(class_of(v3).0, Class::Shared);
        // nolock sets both local bits; the kernel shows both.
        let nolock = "122 30 0:54 / /mnt/v3 rw,relatime - nfs srv:/export \
            rw,vers=3,nolock,proto=tcp,sec=sys,local_lock=all,addr=10.0.0.1";
        let (class, reason) = class_of(nolock);
        assert_eq!(class, Class::MayStayOnHost);
        assert!(reason.contains("nolock"), "{reason}");
        for mode in ["all", "posix"] {
            let line = NFS4.replace("local_lock=none", &format!("local_lock={mode}"));
            let (class, reason) = class_of(&line);
            assert_eq!(class, Class::MayStayOnHost, "{mode}");
            assert!(reason.contains(&format!("local_lock={mode}")), "{reason}");
        }
        // flock locks local: OFD locks still go to the server.
        let (class, reason) = class_of(&NFS4.replace("local_lock=none", "local_lock=flock"));
        assert_eq!(class, Class::Shared);
        assert!(reason.contains("local_lock=flock"), "{reason}");
    }

    #[test]
    fn an_option_matches_whole() {
        // `nolockd` or a path containing "nolock" is not `nolock`.
        let (class, _) = classify("nfs4", "rw,vers=4.2,fsc=nolockcache,local_lock=none");
        assert_eq!(class, Class::Shared);
    }

    #[test]
    fn cephfs_is_shared_in_the_kernel_and_through_ceph_fuse() {
        let kernel = "130 30 0:60 / /mnt/cephfs rw,relatime - ceph 10.0.0.1:6789:/ \
            rw,name=admin,secret=<hidden>,acl";
        assert_eq!(class_of(kernel).0, Class::Shared);
        let fuse = "131 30 0:61 / /mnt/cephfs rw,nosuid,nodev,relatime - fuse.ceph-fuse \
            ceph-fuse rw,user_id=0,group_id=0,allow_other";
        assert_eq!(class_of(fuse).0, Class::Shared);
    }

    #[test]
    fn other_fuse_filesystems_may_keep_locks_to_themselves() {
        let bindfs = "140 30 0:62 / /tmp/x/share rw,nosuid,nodev,relatime - fuse.bindfs \
            /tmp/x/pool rw,user_id=0,group_id=0,default_permissions,allow_other";
        let (class, reason) = class_of(bindfs);
        assert_eq!(class, Class::MayStayOnHost);
        assert!(reason.contains("FUSE"), "{reason}");
        assert_eq!(classify("fuse.sshfs", "rw").0, Class::MayStayOnHost);
        assert_eq!(classify("fuse", "rw").0, Class::MayStayOnHost);
    }

    #[test]
    fn local_filesystems_reach_this_host() {
        let ext4 = "29 1 254:1 / / rw,relatime shared:1 - ext4 /dev/vda rw,discard";
        assert_eq!(class_of(ext4).0, Class::HostLocal);
        let xfs = "150 29 7:3 / /srv/pool rw,relatime - xfs /dev/loop3 \
            rw,attr2,inode64,logbufs=8,logbsize=32k,noquota";
        assert_eq!(class_of(xfs).0, Class::HostLocal);
        let overlay = "160 1 0:70 / / rw,relatime - overlay overlay \
            rw,lowerdir=/l,upperdir=/u,workdir=/w";
        assert_eq!(class_of(overlay).0, Class::HostLocal);
        assert_eq!(classify("tmpfs", "rw").0, Class::HostLocal);
    }

    #[test]
    fn unknown_and_half_known_filesystems_may_stay_on_host() {
        assert_eq!(classify("cifs", "rw").0, Class::MayStayOnHost);
        assert_eq!(classify("ocfs2", "rw").0, Class::MayStayOnHost);
        assert_eq!(classify("gfs2", "rw,lockproto=lock_dlm").0, Class::Shared);
        assert_eq!(classify("gfs2", "rw,localflocks").0, Class::MayStayOnHost);
    }

    #[test]
    fn the_longest_mount_point_holds_the_pool() {
        let table = mountinfo::parse(&format!(
            "29 1 254:1 / / rw,relatime - ext4 /dev/vda rw\n\
             {NFS4}\n\
             125 120 0:55 / /mnt/filevol/pool/sub rw - tmpfs tmpfs rw\n\
             126 29 0:56 / /mnt/filevolx rw - tmpfs tmpfs rw\n"
        ));
        let reach = in_table(Path::new("/mnt/filevol/pool"), &table);
        assert_eq!(reach.fs_type, "nfs4");
        assert_eq!(reach.mount_point, Path::new("/mnt/filevol"));
        assert_eq!(reach.source, "srv:/export");
        // A prefix by whole components: /mnt/filevolx does not hold it.
        let reach = in_table(Path::new("/mnt/filevol"), &table);
        assert_eq!(reach.fs_type, "nfs4");
        assert_eq!(in_table(Path::new("/srv"), &table).class, Class::HostLocal);
        // Stacked on one point: the later mount is the one seen.
        let stacked = mountinfo::parse(&format!(
            "{NFS4}\n127 120 0:57 / /mnt/filevol rw - fuse.bindfs /x rw\n"
        ));
        let reach = in_table(Path::new("/mnt/filevol/pool"), &stacked);
        assert_eq!(reach.fs_type, "fuse.bindfs");
        assert_eq!(reach.class, Class::MayStayOnHost);
        // No mount at all (a table that lost its root line).
        let reach = in_table(Path::new("/srv"), &stacked);
        assert_eq!(reach.class, Class::MayStayOnHost);
        assert!(reach.to_string().contains("no mount"), "{reach}");
    }

    #[test]
    fn only_the_shared_layout_refuses_and_the_flag_turns_it_into_a_warning() {
        for class in [Class::Shared, Class::HostLocal, Class::MayStayOnHost] {
            assert_eq!(verdict(class, false, false), Verdict::Fine, "{class}");
            assert_eq!(verdict(class, false, true), Verdict::Fine, "{class}");
        }
        assert_eq!(verdict(Class::Shared, true, false), Verdict::Fine);
        assert_eq!(verdict(Class::HostLocal, true, false), Verdict::Refuse);
        assert_eq!(verdict(Class::MayStayOnHost, true, false), Verdict::Refuse);
        assert_eq!(verdict(Class::HostLocal, true, true), Verdict::Warn);
        assert_eq!(verdict(Class::MayStayOnHost, true, true), Verdict::Warn);
    }

    #[test]
    fn this_hosts_pool_is_classified() {
        // The test's own temporary directory sits on some mount of this
        // host; whatever it is, it is found and named.
        let dir = tempfile::tempdir().unwrap();
        let reach = of_pool(dir.path()).unwrap();
        assert!(!reach.fs_type.is_empty(), "{reach}");
        assert!(dir
            .path()
            .canonicalize()
            .unwrap()
            .starts_with(&reach.mount_point));
    }
}
