//! A `filevol serve` process for one test: its own temporary directory,
//! socket, pool and log file, killed and cleaned up when dropped even if the
//! test panics.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use filevol::proto::csi;
use filevol::proto::grpc::{ControllerClient, IdentityClient, NodeClient};
use grpcio::{CallOption, ChannelBuilder, EnvBuilder, RpcStatusCode};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_filevol");

/// How to start a driver.
#[derive(Debug, Default)]
pub struct Opts {
    /// Extra flags after `serve`.
    pub args: Vec<String>,
    /// `FILEVOL_FAULTS` for the process.
    pub faults: String,
    /// Run as this uid/gid instead of root.
    pub user: Option<u32>,
    /// Do not pass --endpoint/--pool/--node-id (defaults test).
    pub no_paths: bool,
    /// Extra environment.
    pub env: Vec<(String, String)>,
    /// A command that runs the binary (`setpriv ... --`), if any.
    pub wrapper: Vec<String>,
}

impl Opts {
    pub fn args(mut self, args: &[&str]) -> Self {
        self.args.extend(args.iter().map(|s| s.to_string()));
        self
    }
    pub fn faults(mut self, f: &str) -> Self {
        self.faults = f.to_owned();
        self
    }
}

/// A running `filevol serve`.
pub struct Driver {
    child: Option<Child>,
    /// Owns the temporary directory: removed when the driver is dropped.
    _dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub pool: PathBuf,
    log: PathBuf,
    env: Arc<grpcio::Environment>,
}

impl Driver {
    /// Starts a driver in mode `all` and waits until it answers Probe.
    pub fn start() -> Driver {
        Driver::start_with(Opts::default())
    }

    /// Starts a driver with `opts` and waits until it answers Probe.
    pub fn start_with(opts: Opts) -> Driver {
        let mut d = Driver::spawn(opts);
        d.wait_ready();
        d
    }

    /// Starts a driver with `opts` without waiting for it.
    pub fn spawn(opts: Opts) -> Driver {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("csi.sock");
        let pool = dir.path().join("pool");
        std::fs::create_dir(&pool).unwrap();
        Driver::spawn_at(dir, socket, pool, opts)
    }

    /// Starts a driver (mode `all` unless `opts` says otherwise) on an
    /// existing pool directory and waits until it answers Probe.
    pub fn start_on(pool: &Path, opts: Opts) -> Driver {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("csi.sock");
        let mut d = Driver::spawn_at(dir, socket, pool.to_owned(), opts);
        d.wait_ready();
        d
    }

    /// Starts a driver on a given socket and pool inside `dir`.
    pub fn spawn_at(dir: tempfile::TempDir, socket: PathBuf, pool: PathBuf, opts: Opts) -> Driver {
        let log = dir.path().join(format!(
            "filevol-{}.log",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        let mut cmd = match opts.wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(BIN);
                c
            }
            None => Command::new(BIN),
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
                std::fs::create_dir_all(&kubelet).unwrap();
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
            .stderr(std::fs::File::create(&log).unwrap());
        if let Some(uid) = opts.user {
            cmd.uid(uid).gid(uid);
        }
        let child = cmd.spawn().expect("spawn filevol");
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
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
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

    fn channel(&self) -> grpcio::Channel {
        ChannelBuilder::new(Arc::clone(&self.env))
            .connect(&format!("unix:{}", self.socket.display()))
    }

    /// A fresh Identity client (its own connection).
    pub fn identity(&self) -> IdentityClient {
        IdentityClient::new(self.channel())
    }

    /// A fresh Controller client.
    pub fn controller(&self) -> ControllerClient {
        ControllerClient::new(self.channel())
    }

    /// A fresh GroupController client.
    pub fn group_controller(&self) -> filevol::proto::grpc::GroupControllerClient {
        filevol::proto::grpc::GroupControllerClient::new(self.channel())
    }

    /// A fresh Node client.
    pub fn node(&self) -> NodeClient {
        NodeClient::new(self.channel())
    }

    /// What the driver has written to stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The process id.
    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    /// Sends `sig` to the driver.
    pub fn signal(&self, sig: rustix::process::Signal) {
        let pid = rustix::process::Pid::from_raw(self.pid()).unwrap();
        rustix::process::kill_process(pid, sig).unwrap();
    }

    /// Waits for the process to exit (at most `timeout`).
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut().expect("still owned");
        loop {
            if let Some(status) = child.try_wait().unwrap() {
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

impl Drop for Driver {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The status code of a failed call (panics on success).
pub fn code<T: std::fmt::Debug>(result: grpcio::Result<T>) -> RpcStatusCode {
    match result {
        Err(grpcio::Error::RpcFailure(status)) => status.code(),
        other => panic!("expected an RPC failure, got {other:?}"),
    }
}

/// The status of a failed call (panics on success).
pub fn status<T: std::fmt::Debug>(result: grpcio::Result<T>) -> grpcio::RpcStatus {
    match result {
        Err(grpcio::Error::RpcFailure(status)) => status,
        other => panic!("expected an RPC failure, got {other:?}"),
    }
}

/// Whether `path` exists without following a symlink.
pub fn exists(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok()
}
