//! Start-up and shutdown: socket claiming, permissions, signals, defaults.

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::Command;
use std::thread;
use std::time::Duration;

use filevol::proto::csi;
use filevol_kit::driver::{Driver, Opts};
use filevol_kit::tempdir::TempDir;
use rustix::process::Signal;

use crate::BIN;

#[test]
fn sigterm_drains_in_flight_calls_and_removes_the_socket() {
    let mut d = Driver::start_with(BIN, Opts::default().faults("delay:GetPluginInfo:1500"));
    let client = d.identity();
    let in_flight =
        thread::spawn(move || client.get_plugin_info(&csi::GetPluginInfoRequest::new()));
    thread::sleep(Duration::from_millis(300));
    d.signal(Signal::TERM);
    thread::sleep(Duration::from_millis(200));

    // New calls are refused while the old one finishes.
    assert!(
        d.identity().probe(&csi::ProbeRequest::new()).is_err(),
        "a call was accepted after SIGTERM"
    );
    let answered = in_flight.join().unwrap();
    assert!(answered.is_ok(), "in-flight call lost: {answered:?}");

    let status = d.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "exit {status}:\n{}", d.log());
    assert!(!exists(&d.socket), "socket left behind");
    assert!(d.log().contains("SIGTERM received"), "{}", d.log());
}

#[test]
fn second_signal_exits_at_once() {
    let mut d = Driver::start_with(
        BIN,
        Opts::default()
            .faults("delay:GetPluginInfo:30000")
            .args(&["--shutdown-grace", "60"]),
    );
    let client = d.identity();
    let _stuck = thread::spawn(move || client.get_plugin_info(&csi::GetPluginInfoRequest::new()));
    thread::sleep(Duration::from_millis(300));
    d.signal(Signal::TERM);
    thread::sleep(Duration::from_millis(300));
    d.signal(Signal::INT);
    let status = d.wait_exit(Duration::from_secs(5));
    assert!(!status.success(), "a forced exit must not report success");
}

#[test]
fn stale_socket_from_a_crash_is_replaced() {
    let mut d = Driver::start(BIN);
    d.signal(Signal::KILL);
    d.wait_exit(Duration::from_secs(5));
    assert!(exists(&d.socket), "SIGKILL leaves the socket file");

    let dir = TempDir::new().unwrap();
    let socket = d.socket.clone();
    let pool = d.pool.clone();
    let mut again = Driver::spawn_at(BIN, dir, socket, pool, Opts::default());
    again.wait_ready();
    assert!(
        again.log().contains("removing stale socket"),
        "{}",
        again.log()
    );
}

#[test]
fn live_socket_is_not_stolen() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("csi.sock");
    let pool = dir.path().join("pool");
    std::fs::create_dir(&pool).unwrap();
    let _other_server = UnixListener::bind(&socket).unwrap();

    let out = Command::new(BIN)
        .args(["serve", "--node-id", "n1", "--endpoint"])
        .arg(format!("unix://{}", socket.display()))
        .arg("--pool")
        .arg(&pool)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("a live server is listening"), "{stderr}");
    assert!(
        std::fs::symlink_metadata(&socket)
            .unwrap()
            .file_type()
            .is_socket(),
        "the other server's socket was touched"
    );
}

#[test]
fn a_second_filevol_on_the_same_socket_is_refused() {
    let first = Driver::start(BIN);
    let out = Command::new(BIN)
        .args(["serve", "--node-id", "n1", "--endpoint"])
        .arg(format!("unix://{}", first.socket.display()))
        .arg("--pool")
        .arg(&first.pool)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("another filevol process"), "{stderr}");
    // The first one still serves.
    assert!(
        first
            .identity()
            .probe(&csi::ProbeRequest::new())
            .unwrap()
            .ready
            .value
    );
}

#[test]
fn a_file_that_is_not_a_socket_is_never_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("csi.sock");
    std::fs::write(&socket, b"operator notes").unwrap();
    let out = Command::new(BIN)
        .args(["serve", "--node-id", "n1", "--endpoint"])
        .arg(format!("unix://{}", socket.display()))
        .arg("--pool")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("is not a socket"), "{stderr}");
    assert_eq!(std::fs::read(&socket).unwrap(), b"operator notes");
}

#[test]
fn socket_permissions_are_restrictive_and_configurable() {
    let d = Driver::start(BIN);
    let mode = std::fs::metadata(&d.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660);
    let d = Driver::start_with(BIN, Opts::default().args(&["--socket-mode", "0600"]));
    let mode = std::fs::metadata(&d.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
}

#[test]
fn bad_flags_fail_clearly() {
    for (args, expect) in [
        (
            &["serve", "--endpoint", "tcp://127.0.0.1:9000"][..],
            "not a UNIX socket endpoint",
        ),
        (
            &["serve", "--pool", "/nonexistent/filevol-pool"][..],
            "does not exist",
        ),
        (&["serve", "--driver-name", "bad_name"][..], "--driver-name"),
    ] {
        let out = Command::new(BIN)
            .args(args)
            .env("CSI_ENDPOINT", "unix:///tmp/filevol-badflags-never.sock")
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} succeeded");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(expect), "{args:?}: {stderr}");
    }
    assert!(!exists(std::path::Path::new(
        "/tmp/filevol-badflags-never.sock"
    )));
    assert!(!exists(std::path::Path::new("/nonexistent/filevol-pool")));
}

/// `filevol serve` with no flags works for a new user and says where its
/// socket and pool are. Run as `nobody` with a temporary HOME so the
/// defaults land in the test's directory, not the machine's.
#[test]
fn no_flags_serves_on_defaults_and_says_where() {
    const NOBODY: u32 = 65534;
    let dir = TempDir::new().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let home = dir.path().join("home");
    let runtime = dir.path().join("run");
    for p in [&home, &runtime] {
        std::fs::create_dir(p).unwrap();
        std::os::unix::fs::chown(p, Some(NOBODY), Some(NOBODY)).unwrap();
    }
    let socket = runtime.join("filevol/csi.sock");
    let pool = home.join(".local/share/filevol");
    let mut d = Driver::spawn_at(
        BIN,
        dir,
        socket.clone(),
        pool.clone(),
        Opts {
            user: Some(NOBODY),
            no_paths: true,
            env: vec![
                ("HOME".into(), home.display().to_string()),
                ("XDG_RUNTIME_DIR".into(), runtime.display().to_string()),
            ],
            ..Opts::default()
        },
    );
    d.wait_ready();
    let log = d.log();
    assert!(log.contains(&socket.display().to_string()), "{log}");
    assert!(log.contains(&pool.display().to_string()), "{log}");
    assert!(pool.is_dir());
    assert_eq!(std::fs::metadata(&socket).unwrap().uid(), NOBODY);
    assert!(d.stop().success());
}

/// Whether `path` exists without following a symlink.
fn exists(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok()
}
