//! `filevol doctor`: checks the host for what filevol needs and says how to
//! fix what is missing. Read-only apart from two small test files inside
//! the pool, removed before it returns.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use clap::Args;

use super::OpsError;
use filevol_core::pool::lock_reach::{self, Class, LockReach, Verdict};
use filevol_core::sys::fs as sysfs;

/// Flags of `filevol doctor`.
#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// The pool directory to check. Default: the one `filevol serve` uses
    /// when given none (/var/lib/filevol as root).
    #[arg(long, env = "FILEVOL_POOL")]
    pub pool: Option<PathBuf>,
    /// JSON (a list of checks) instead of lines.
    #[arg(long)]
    pub json: bool,
    /// Kubelet's root directory.
    #[arg(long, env = "FILEVOL_KUBELET_DIR", default_value = "/var/lib/kubelet")]
    pub kubelet_dir: PathBuf,
    /// The pool's topology as `filevol serve` gets it: an empty value is a
    /// shared pool, whose locks must reach every host. Default: node-local.
    #[arg(long, env = "FILEVOL_TOPOLOGY")]
    pub topology: Option<String>,
    /// As `filevol serve --allow-host-local-locks`: a shared pool whose
    /// locks may stay on this host is a warning, not a failure.
    #[arg(long, env = "FILEVOL_ALLOW_HOST_LOCAL_LOCKS")]
    pub allow_host_local_locks: bool,
}

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    /// Fine.
    Ok,
    /// Works, with a limitation.
    Warn,
    /// filevol cannot work like this.
    Fail,
}

/// One check's outcome.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Check {
    /// What was checked.
    pub name: &'static str,
    /// The outcome.
    pub level: Level,
    /// What was found.
    pub detail: String,
    /// How to fix it (for Warn and Fail).
    pub fix: Option<String>,
    /// For the lock reach check: what was found, field by field.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lock_reach: Option<LockReach>,
}

fn check(name: &'static str, level: Level, detail: impl Into<String>, fix: Option<&str>) -> Check {
    Check {
        name,
        level,
        detail: detail.into(),
        fix: fix.map(str::to_owned),
        lock_reach: None,
    }
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
        .unwrap_or(false)
}

/// Runs every check.
pub fn checks(args: &DoctorArgs) -> Vec<Check> {
    let mut out = Vec::new();
    let loop_fix = Some("load the loop module (modprobe loop); in a container, run privileged with /dev from the host");
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/loop-control")
    {
        Ok(_) => out.push(check(
            "loop devices",
            Level::Ok,
            "/dev/loop-control is usable",
            None,
        )),
        Err(e) => out.push(check(
            "loop devices",
            Level::Fail,
            format!("/dev/loop-control: {e}"),
            loop_fix,
        )),
    }
    match filevol_core::sys::loopdev::free_device() {
        Ok(n) => out.push(check(
            "free loop device",
            Level::Ok,
            format!("/dev/loop{n} is free"),
            None,
        )),
        Err(e) => out.push(check(
            "free loop device",
            Level::Fail,
            format!("no free loop device: {e}"),
            loop_fix,
        )),
    }

    let tools_fix = Some("apt-get install e2fsprogs xfsprogs btrfs-progs util-linux (or your distribution's equivalents)");
    for (program, needed_for, level) in [
        (
            "blkid",
            "the probe that keeps filevol from formatting data",
            Level::Fail,
        ),
        ("mkfs.ext4", "ext4 volumes (the default)", Level::Fail),
        ("resize2fs", "growing ext4 volumes", Level::Warn),
        ("mkfs.xfs", "xfs volumes", Level::Warn),
        ("xfs_growfs", "growing xfs volumes", Level::Warn),
        ("mkfs.btrfs", "btrfs volumes", Level::Warn),
        ("btrfs", "growing btrfs volumes", Level::Warn),
    ] {
        if on_path(program) {
            out.push(check("tool", Level::Ok, format!("{program} found"), None));
        } else {
            out.push(check(
                "tool",
                level,
                format!("{program} is missing: needed for {needed_for}"),
                tools_fix,
            ));
        }
    }

    out.push(propagation(&args.kubelet_dir));
    let pool = args
        .pool
        .clone()
        .unwrap_or_else(crate::config::default_pool);
    out.extend(pool_checks(&pool));
    let shared = match args.topology.as_deref().map(crate::config::parse_topology) {
        Some(Ok(segment)) => segment.is_empty(),
        Some(Err(e)) => {
            out.push(check("topology", Level::Fail, e.to_string(), None));
            false
        }
        None => false,
    };
    out.push(lock_reach_check(&pool, shared, args.allow_host_local_locks));
    out.push(
        if filevol_core::sys::caps::effective(filevol_core::sys::caps::SYS_RESOURCE) {
            check(
                "CAP_SYS_RESOURCE",
                Level::Ok,
                "present: ext4 volumes can grow while mounted",
                None,
            )
        } else {
            check(
            "CAP_SYS_RESOURCE",
            Level::Warn,
            "missing: a mounted ext4 volume cannot grow (the kernel's rule for EXT4_IOC_RESIZE_FS)",
            Some("run the node plugin privileged (or add CAP_SYS_RESOURCE)"),
        )
        },
    );
    out
}

/// The kubelet directory must sit on a shared mount, or the mounts the
/// plugin makes in its container never reach kubelet and the pods.
fn propagation(kubelet_dir: &Path) -> Check {
    let name = "mount propagation";
    let Ok(dir) = kubelet_dir.canonicalize() else {
        return check(
            name,
            Level::Warn,
            format!("{} does not exist on this host", kubelet_dir.display()),
            Some("pass --kubelet-dir, or run this on a Kubernetes node"),
        );
    };
    let Ok(table) = filevol_core::sys::mountinfo::read() else {
        return check(name, Level::Warn, "cannot read /proc/self/mountinfo", None);
    };
    // The mount holding the directory: the longest mount point that is a
    // prefix of it, the last such entry winning.
    let mut best: Option<(usize, bool)> = None;
    for entry in table {
        if dir.starts_with(&entry.mount_point) {
            let shared = entry.optional.iter().any(|f| f.starts_with("shared:"));
            let len = entry.mount_point.as_os_str().len();
            if best.is_none_or(|(l, _)| len >= l) {
                best = Some((len, shared));
            }
        }
    }
    match best {
        Some((_, true)) => check(name, Level::Ok, format!("{} is on a shared mount", dir.display()), None),
        _ => check(
            name,
            Level::Warn,
            format!("{} is not on a shared mount: mounts made by the node plugin will not reach kubelet", dir.display()),
            Some("mount --make-rshared / on the host, and give the plugin's kubelet volumes mountPropagation: Bidirectional"),
        ),
    }
}

/// Whether the pool's locks reach other hosts, judged as `filevol serve`
/// would for the layout given (`shared`: an empty `--topology`).
fn lock_reach_check(pool: &Path, shared: bool, allowed: bool) -> Check {
    let name = "lock reach";
    let reach = match lock_reach::of_pool(pool) {
        Ok(reach) => reach,
        Err(e) => {
            return check(
                name,
                if shared { Level::Fail } else { Level::Warn },
                format!(
                    "cannot tell where the locks of {} reach: {e}",
                    pool.display()
                ),
                None,
            )
        }
    };
    let (level, detail, fix) = lock_reach_outcome(&reach, shared, allowed);
    Check {
        lock_reach: Some(reach),
        ..check(name, level, detail, fix.as_deref())
    }
}

/// The level, detail and fix of the lock reach check.
fn lock_reach_outcome(
    reach: &LockReach,
    shared: bool,
    allowed: bool,
) -> (Level, String, Option<String>) {
    let remedies = format!(
        "mount the share so that its locks reach every host (NFS without nolock and without local_lock=all|posix, CephFS), \
         or use the node-local layout (a --topology segment); pass {} only if every process of this pool runs on this one host",
        lock_reach::ALLOW_FLAG
    );
    match (lock_reach::verdict(reach.class, shared, allowed), reach.class) {
        (Verdict::Refuse, _) => (
            Level::Fail,
            format!("{reach}; `filevol serve --topology=` refuses this pool: two hosts could stage one single-writer volume at once"),
            Some(remedies),
        ),
        (Verdict::Warn, _) => (
            Level::Warn,
            format!("{reach}; served as a shared pool because of {}: its fences exclude nothing on other hosts", lock_reach::ALLOW_FLAG),
            Some(remedies),
        ),
        (Verdict::Fine, Class::Shared) => (Level::Ok, reach.to_string(), None),
        (Verdict::Fine, Class::HostLocal) => (
            Level::Ok,
            format!("{reach}; fine for a node-local pool, not for a shared one (`--topology=` refuses it)"),
            None,
        ),
        (Verdict::Fine, Class::MayStayOnHost) => (
            Level::Warn,
            format!("{reach}; a node-local pool is fine while every process sees it through this one mount, a shared one (`--topology=`) is refused"),
            Some(remedies),
        ),
    }
}

fn pool_checks(pool: &Path) -> Vec<Check> {
    let mut out = Vec::new();
    if let Err(e) = rustix::fs::access(
        pool,
        rustix::fs::Access::READ_OK | rustix::fs::Access::WRITE_OK,
    ) {
        out.push(check("pool", Level::Fail, format!("{}: {}", pool.display(), std::io::Error::from(e)), Some("create the pool directory (or mount the shared filesystem there) and make it writable")));
        return out;
    }
    out.push(check(
        "pool",
        Level::Ok,
        format!("{} is writable", pool.display()),
        None,
    ));

    let a = pool.join(format!(".doctor-{}-a", std::process::id()));
    let b = pool.join(format!(".doctor-{}-b", std::process::id()));
    let result = sysfs::probe_reflink(&a, &b);
    out.push(match result {
        Ok(true) => check("reflink", Level::Ok, "the pool shares blocks: snapshots and clones are instant", None),
        Ok(false) => check(
            "reflink",
            Level::Warn,
            "the pool cannot reflink: snapshots and clones are byte copies, and a staged volume cannot be snapshotted",
            Some("put the pool on xfs (mkfs.xfs -m reflink=1) or btrfs"),
        ),
        Err(e) => check("reflink", Level::Warn, format!("could not test: {e}"), None),
    });
    let dio = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_DIRECT)
        .open(&a);
    out.push(match dio {
        Ok(_) => check(
            "direct I/O",
            Level::Ok,
            "the pool takes O_DIRECT: loop devices skip the double page cache",
            None,
        ),
        Err(e) => check(
            "direct I/O",
            Level::Warn,
            format!("O_DIRECT refused ({e}): loop devices will be buffered"),
            None,
        ),
    });
    let _ = std::fs::remove_file(&a);

    match sysfs::space(pool) {
        Ok(s) if s.total > 0 && s.available * 10 < s.total => out.push(check(
            "free space",
            Level::Warn,
            format!(
                "{} of {} free",
                filevol_core::units::human(s.available),
                filevol_core::units::human(s.total)
            ),
            Some("grow the pool filesystem or delete volumes and snapshots"),
        )),
        Ok(s) => out.push(check(
            "free space",
            Level::Ok,
            format!(
                "{} of {} free",
                filevol_core::units::human(s.available),
                filevol_core::units::human(s.total)
            ),
            None,
        )),
        Err(e) => out.push(check(
            "free space",
            Level::Fail,
            format!("statvfs: {e}"),
            None,
        )),
    }
    out
}

/// Runs the checks, prints them to `out`, fails when any failed.
pub fn run(args: DoctorArgs, out: &mut dyn Write) -> Result<(), OpsError> {
    let results = checks(&args);
    if args.json {
        let text = serde_json::to_string_pretty(&results).expect("checks serialise");
        writeln!(out, "{text}").map_err(OpsError::Output)?;
    }
    for c in results.iter().filter(|_| !args.json) {
        let tag = match c.level {
            Level::Ok => " ok ",
            Level::Warn => "warn",
            Level::Fail => "FAIL",
        };
        writeln!(out, "[{tag}] {}: {}", c.name, c.detail).map_err(OpsError::Output)?;
        if let (Some(fix), false) = (&c.fix, c.level == Level::Ok) {
            writeln!(out, "       fix: {fix}").map_err(OpsError::Output)?;
        }
    }
    match results.iter().filter(|c| c.level == Level::Fail).count() {
        0 => Ok(()),
        n => Err(OpsError::ChecksFailed(n)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reach(class: Class) -> LockReach {
        LockReach {
            class,
            fs_type: "fuse.bindfs".into(),
            mount_point: PathBuf::from("/mnt/share"),
            source: "/srv/pool".into(),
            reason: "why".into(),
        }
    }

    #[test]
    fn the_lock_reach_is_judged_for_the_layout_given() {
        let level = |class, shared, allowed| lock_reach_outcome(&reach(class), shared, allowed).0;
        // The shared layout: only shared locks pass; the flag makes a
        // warning of the failure.
        assert_eq!(level(Class::Shared, true, false), Level::Ok);
        assert_eq!(level(Class::HostLocal, true, false), Level::Fail);
        assert_eq!(level(Class::MayStayOnHost, true, false), Level::Fail);
        assert_eq!(level(Class::MayStayOnHost, true, true), Level::Warn);
        // Node-local: a local filesystem is what it wants; a FUSE mount
        // works only through that one mount, which is worth a look.
        assert_eq!(level(Class::HostLocal, false, false), Level::Ok);
        assert_eq!(level(Class::MayStayOnHost, false, false), Level::Warn);
        let (_, detail, fix) = lock_reach_outcome(&reach(Class::MayStayOnHost), true, false);
        assert!(
            detail.contains("fuse.bindfs") && detail.contains("why"),
            "{detail}"
        );
        assert!(fix.unwrap().contains(lock_reach::ALLOW_FLAG));
    }
}
