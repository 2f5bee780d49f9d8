//! A `filevol serve` process of its own: a temporary directory with its
//! socket, pool, kubelet directory and log file, killed and cleaned up when
//! dropped, even when the test or benchmark using it panics.
//!
//! The binary is a parameter: the library cannot name it, and its callers
//! can (`env!("CARGO_BIN_EXE_filevol")` in tests and benchmarks, which
//! cargo builds before them). Failures panic with the driver's log: the
//! caller is a test, and the log is what explains it.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use grpcio::{CallOption, ChannelBuilder, EnvBuilder, RpcStatusCode};

use super::tempdir::TempDir;
use filevol::proto::csi;
use filevol::proto::grpc::{
    ControllerClient, GroupControllerClient, IdentityClient, NodeClient, NodeMaintenanceClient,
    SnapshotMetadataClient,
};

/// How to start a driver.
#[derive(Debug, Default)]
pub struct Opts {
    /// Extra flags after `serve`.
    pub args: Vec<String>,
    /// `FILEVOL_FAULTS` for the process (see [`filevol_core::faults`]).
    pub faults: String,
    /// Run as this uid/gid instead of root.
    pub user: Option<u32>,
    /// Do not pass --endpoint/--pool/--node-id/--kubelet-dir (the defaults
    /// are what is tested).
    pub no_paths: bool,
    /// Extra environment.
    pub env: Vec<(String, String)>,
    /// A command that runs the binary (`setpriv ... --`), if any.
    pub wrapper: Vec<String>,
}

impl Opts {
    /// These flags too.
    pub fn args(mut self, args: &[&str]) -> Self {
        self.args.extend(args.iter().map(|s| (*s).to_owned()));
        self
    }

    /// These faults (`FILEVOL_FAULTS`) instead.
    pub fn faults(mut self, f: &str) -> Self {
        f.clone_into(&mut self.faults);
        self
    }
}

/// A running `filevol serve`.
pub struct Driver {
    child: Option<Child>,
    /// Owns the temporary directory: removed when the driver is dropped.
    _dir: TempDir,
    /// The socket it listens on.
    pub socket: PathBuf,
    /// Its pool directory.
    pub pool: PathBuf,
    log: PathBuf,
    env: Arc<grpcio::Environment>,
}

impl Driver {
    /// Starts `bin` in mode `all` on a new pool and waits until it answers
    /// Probe.
    pub fn start(bin: impl AsRef<Path>) -> Driver {
        Driver::start_with(bin, Opts::default())
    }

    /// Starts `bin` with `opts` on a new pool and waits until it answers
    /// Probe.
    pub fn start_with(bin: impl AsRef<Path>, opts: Opts) -> Driver {
        let mut d = Driver::spawn(bin, opts);
        d.wait_ready();
        d
    }

    /// Starts `bin` with `opts` on a new pool without waiting for it.
    pub fn spawn(bin: impl AsRef<Path>, opts: Opts) -> Driver {
        let dir = TempDir::new().expect("make a temporary directory");
        let socket = dir.path().join("csi.sock");
        let pool = dir.path().join("pool");
        std::fs::create_dir(&pool).expect("make the pool directory");
        Driver::spawn_at(bin, dir, socket, pool, opts)
    }

    /// Starts `bin` (mode `all` unless `opts` says otherwise) on an
    /// existing pool directory and waits until it answers Probe.
    pub fn start_on(bin: impl AsRef<Path>, pool: &Path, opts: Opts) -> Driver {
        let dir = TempDir::new().expect("make a temporary directory");
        let socket = dir.path().join("csi.sock");
        let mut d = Driver::spawn_at(bin, dir, socket, pool.to_owned(), opts);
        d.wait_ready();
        d
    }

    /// Starts `bin` on `socket` and `pool`, keeping its log (and, unless
    /// `opts` names one, its kubelet directory) in `dir`, without waiting.
    pub fn spawn_at(
        bin: impl AsRef<Path>,
        dir: TempDir,
        socket: PathBuf,
        pool: PathBuf,
        opts: Opts,
    ) -> Driver {
        let bin = bin.as_ref();
        // A name of its own: a driver restarted on the same directory keeps
        // the earlier one's log beside its own.
        let log = dir.path().join(format!(
            "filevol-{}.log",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos()
        ));
        let mut cmd = match opts.wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        cmd.arg("serve");
        if !opts.no_paths {
            cmd.arg("--endpoint")
                .arg(format!("unix://{}", socket.display()))
                .arg("--pool")
                .arg(&pool);
            if !opts.args.iter().any(|a| a == "--node-id") {
                cmd.args(["--node-id", "test-node"]);
            }
            if !opts.args.iter().any(|a| a == "--kubelet-dir") {
                let kubelet = dir.path().join("kubelet");
                std::fs::create_dir_all(&kubelet).expect("make the kubelet directory");
                cmd.arg("--kubelet-dir").arg(kubelet);
            }
        }
        cmd.args(&opts.args)
            .env_remove("CSI_ENDPOINT")
            .env_remove("FILEVOL_LOG_LEVEL")
            .env("FILEVOL_FAULTS", &opts.faults)
            .envs(opts.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("make the log file"));
        if let Some(uid) = opts.user {
            cmd.uid(uid).gid(uid);
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
        Driver {
            child: Some(child),
            _dir: dir,
            socket,
            pool,
            log,
            env: Arc::new(EnvBuilder::new().cq_count(1).build()),
        }
    }

    /// Polls Probe until it answers ready, or panics with the log.
    pub fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            let child = self.child.as_mut().expect("the driver was waited for");
            if let Some(status) = child.try_wait().expect("wait for the driver") {
                panic!("filevol exited early ({status}):\n{}", self.log());
            }
            if self.socket.exists() {
                let opt = CallOption::default().timeout(Duration::from_secs(2));
                if let Ok(resp) = self.identity().probe_opt(&csi::ProbeRequest::new(), opt) {
                    if resp.ready.value {
                        return;
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("filevol did not become ready:\n{}", self.log());
    }

    /// The gRPC address of its socket (`unix:<path>`), for a channel built
    /// by hand (a connection of its own, other message limits).
    pub fn address(&self) -> String {
        format!("unix:{}", self.socket.display())
    }

    fn channel(&self) -> grpcio::Channel {
        ChannelBuilder::new(Arc::clone(&self.env)).connect(&self.address())
    }

    /// A fresh Identity client.
    pub fn identity(&self) -> IdentityClient {
        IdentityClient::new(self.channel())
    }

    /// A fresh Controller client.
    pub fn controller(&self) -> ControllerClient {
        ControllerClient::new(self.channel())
    }

    /// A fresh GroupController client.
    pub fn group_controller(&self) -> GroupControllerClient {
        GroupControllerClient::new(self.channel())
    }

    /// A fresh Node client.
    pub fn node(&self) -> NodeClient {
        NodeClient::new(self.channel())
    }

    /// A fresh SnapshotMetadata client.
    pub fn snapshot_metadata(&self) -> SnapshotMetadataClient {
        SnapshotMetadataClient::new(self.channel())
    }

    /// A client of filevol's own node calls (`TrimVolumes`).
    pub fn node_maintenance(&self) -> NodeMaintenanceClient {
        NodeMaintenanceClient::new(self.channel())
    }

    /// What the driver has written to stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Where the driver serves `/metrics`, from its start-up log line:
    /// started with `--metrics-address 127.0.0.1:0`, it took a free port.
    pub fn metrics_address(&self) -> String {
        let log = self.log();
        log.split("metrics at http://")
            .nth(1)
            .and_then(|rest| rest.split("/metrics").next())
            .unwrap_or_else(|| panic!("no metrics address in the log:\n{log}"))
            .to_owned()
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("the driver was waited for").id()
    }

    /// Sends `sig` to the driver.
    pub fn signal(&self, sig: rustix::process::Signal) {
        let pid = i32::try_from(self.pid())
            .ok()
            .and_then(rustix::process::Pid::from_raw)
            .expect("a process id is a positive i32");
        rustix::process::kill_process(pid, sig).expect("signal the driver");
    }

    /// Waits for the process to exit (at most `timeout`).
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut().expect("the driver was waited for");
        loop {
            if let Some(status) = child.try_wait().expect("wait for the driver") {
                self.child = None;
                return status;
            }
            if Instant::now() > deadline {
                panic!("filevol did not exit within {timeout:?}:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGTERM, then wait for the exit.
    pub fn stop(&mut self) -> ExitStatus {
        self.signal(rustix::process::Signal::TERM);
        self.wait_exit(Duration::from_secs(30))
    }
}

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver")
            .field("pid", &self.child.as_ref().map(Child::id))
            .field("socket", &self.socket)
            .field("pool", &self.pool)
            .field("log", &self.log)
            .finish_non_exhaustive()
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Best effort: the process may be gone already.
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The Prometheus text a driver serves at `http://address/metrics`
/// (panics unless it answers 200).
pub fn scrape(address: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(address)
        .unwrap_or_else(|e| panic!("connect to the metrics at {address}: {e}"));
    write!(s, "GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n").expect("send the request");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read the answer");
    assert!(out.starts_with("HTTP/1.1 200 OK"), "{out}");
    out
}

/// The status code of a failed call (panics on success).
pub fn code<T: std::fmt::Debug>(result: grpcio::Result<T>) -> RpcStatusCode {
    status(result).code()
}

/// The status of a failed call (panics on success).
pub fn status<T: std::fmt::Debug>(result: grpcio::Result<T>) -> grpcio::RpcStatus {
    match result {
        Err(grpcio::Error::RpcFailure(status)) => status,
        other => panic!("expected an RPC failure, got {other:?}"),
    }
}
