//! A shared pool needs locks that reach every host (`pool::lock_reach`).
//! Why, shown on this host: two bindfs (FUSE) views of one directory stand
//! for two hosts mounting a share whose locks stay where they are taken.
//! An OFD lock through one view does not conflict with one through the
//! other, so the single-writer fence would fence nothing; `filevol serve`
//! in the shared layout refuses such a pool unless told
//! `--allow-host-local-locks`, and `filevol doctor` says so.

use std::fs::{File, OpenOptions};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use filevol_core::sys::lock::{try_lock, LockKind};
use filevol_kit::driver::{Driver, Opts};
use filevol_kit::scratch::{pool_on, Bindfs};
use filevol_kit::tempdir::TempDir;

use crate::BIN;

fn open_rw(p: &Path) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(p)
        .unwrap_or_else(|e| panic!("open {}: {e}", p.display()))
}

/// Starts `filevol serve` with `args` on `pool` and waits for it to exit:
/// its status and log.
fn serve_until_exit(pool: &Path, args: &[&str]) -> (std::process::ExitStatus, String) {
    let dir = TempDir::new().unwrap();
    let socket = dir.path().join("csi.sock");
    let mut d = Driver::spawn_at(
        BIN,
        dir,
        socket.clone(),
        pool.to_owned(),
        Opts::default().args(args),
    );
    let status = d.wait_exit(Duration::from_secs(20));
    assert!(!socket.exists(), "a refused start left its socket");
    (status, d.log())
}

/// The reason for the check: through two views of one directory, OFD locks
/// do not see each other, while two opens through one view do conflict.
#[test]
#[ignore = "needs root"]
fn locks_through_two_fuse_views_do_not_conflict() {
    let (fs, dir) = pool_on("xfs", 512);
    let (a, b) = (Bindfs::new(fs.path()), Bindfs::new(fs.path()));
    std::fs::write(dir.join("fence"), b"").unwrap();
    let through = |view: &Bindfs| open_rw(&view.path().join("pool/fence"));

    let holder = through(&a);
    assert!(try_lock(&holder, LockKind::Exclusive).unwrap());
    // One view: the kernel keeps the lock for this FUSE mount, and a second
    // open through it conflicts, as on any filesystem.
    assert!(!try_lock(&through(&a), LockKind::Exclusive).unwrap());
    assert!(!try_lock(&through(&a), LockKind::Shared).unwrap());
    // The other view: a second writer is let in. This is the fence a
    // second host would get on a share that keeps locks local.
    let other = through(&b);
    assert!(
        try_lock(&other, LockKind::Exclusive).unwrap(),
        "bindfs forwarded the lock: the premise of the refusal no longer holds"
    );
    // Nor does the filesystem underneath see either of them.
    assert!(try_lock(&open_rw(&dir.join("fence")), LockKind::Exclusive).unwrap());
    drop((holder, other));
    drop((a, b));
}

/// The shared layout on a FUSE view is refused, names the filesystem and
/// the flag; with the flag it serves and warns once; the node-local layout
/// needs no flag.
#[test]
#[ignore = "needs root"]
fn a_shared_pool_on_a_fuse_view_needs_the_flag() {
    let (fs, _) = pool_on("xfs", 512);
    let view = Bindfs::new(fs.path());
    let pool = view.path().join("pool");

    let (status, log) = serve_until_exit(&pool, &["--mode", "node", "--topology="]);
    assert!(!status.success(), "{log}");
    for part in [
        "a shared pool (--topology=) needs locks that reach every host",
        "fuse.bindfs",
        "may-stay-on-host",
        "FUSE",
        "--allow-host-local-locks",
        "node-local layout",
    ] {
        assert!(log.contains(part), "no {part:?} in:\n{log}");
    }
    // Refused before it touched the pool.
    assert!(std::fs::read_dir(&pool).unwrap().next().is_none(), "{log}");

    let flag = "--allow-host-local-locks";
    let allowed = Driver::start_on(
        BIN,
        &pool,
        Opts::default().args(&["--mode", "node", "--topology=", flag]),
    );
    let log = allowed.log();
    let warning = format!("serving it as a shared pool because of {flag}");
    assert_eq!(log.matches(&warning).count(), 1, "{log}");
    assert!(log.contains("fuse.bindfs"), "{log}");
    drop(allowed);

    let node_local = Driver::start_on(BIN, &pool, Opts::default().args(&["--mode", "node"]));
    assert!(!node_local.log().contains(flag), "{}", node_local.log());
    drop(node_local);
    drop(view);
}

/// Every mode checks: a controller, or `all`, on a local pool in the shared
/// layout is refused the same way (host-local locks), and a node-local
/// pool on it is not. Needs no root: the pool is a temporary directory.
#[test]
fn a_shared_pool_on_a_local_filesystem_needs_the_flag_in_every_mode() {
    for mode in ["controller", "node", "all"] {
        let pool = tempfile::tempdir().unwrap();
        let (status, log) = serve_until_exit(pool.path(), &["--mode", mode, "--topology="]);
        assert!(!status.success(), "{mode}: {log}");
        assert!(log.contains("locks host-local"), "{mode}: {log}");
        assert!(log.contains("--allow-host-local-locks"), "{mode}: {log}");
    }
    let pool = tempfile::tempdir().unwrap();
    // The flag from the environment, as the manifests could set it.
    let mut opts = Opts::default().args(&["--mode", "all", "--topology="]);
    opts.env
        .push(("FILEVOL_ALLOW_HOST_LOCAL_LOCKS".into(), "true".into()));
    let d = Driver::start_on(BIN, pool.path(), opts);
    assert!(
        d.log().contains("because of --allow-host-local-locks"),
        "{}",
        d.log()
    );
}

/// `filevol doctor` reports the lock reach, judged for the layout given.
#[test]
#[ignore = "needs root"]
fn doctor_reports_the_lock_reach() {
    let (fs, real) = pool_on("xfs", 512);
    let view = Bindfs::new(fs.path());
    let shared_view = view.path().join("pool");
    let lock_check = |pool: &Path, extra: &[&str]| -> serde_json::Value {
        let out = Command::new(BIN)
            .args(["doctor", "--json", "--pool"])
            .arg(pool)
            .args(extra)
            .env_remove("FILEVOL_TOPOLOGY")
            .env_remove("FILEVOL_ALLOW_HOST_LOCAL_LOCKS")
            .output()
            .unwrap();
        let checks: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
        let found = checks.into_iter().find(|c| c["name"] == "lock reach");
        found.unwrap_or_else(|| panic!("no lock reach check for {}", pool.display()))
    };

    let c = lock_check(&real, &[]);
    assert_eq!(c["level"], "ok", "{c}");
    assert_eq!(c["lock_reach"]["class"], "host-local", "{c}");
    assert_eq!(c["lock_reach"]["fs_type"], "xfs", "{c}");
    assert_eq!(lock_check(&real, &["--topology="])["level"], "fail");

    let c = lock_check(&shared_view, &["--topology="]);
    assert_eq!(c["level"], "fail", "{c}");
    assert_eq!(c["lock_reach"]["class"], "may-stay-on-host", "{c}");
    assert_eq!(c["lock_reach"]["fs_type"], "fuse.bindfs", "{c}");
    assert!(
        c["fix"]
            .as_str()
            .unwrap()
            .contains("--allow-host-local-locks"),
        "{c}"
    );
    let c = lock_check(&shared_view, &["--topology=", "--allow-host-local-locks"]);
    assert_eq!(c["level"], "warn", "{c}");
    // Node-local through one FUSE mount works, with a warning.
    assert_eq!(lock_check(&shared_view, &[])["level"], "warn");
    drop(view);
}
