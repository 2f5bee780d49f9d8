//! The driver's settings, resolved and checked from the command line before
//! anything starts: a bad flag is a clear start-up error, never a surprise at
//! the first call.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::cli::{Mode, ServeArgs};
use crate::server::socket::{Endpoint, SocketError};

/// Everything `filevol serve` runs with.
#[derive(Debug, Clone)]
pub struct Config {
    /// Services served.
    pub mode: Mode,
    /// Where the gRPC server listens.
    pub endpoint: Endpoint,
    /// Permission bits of the socket file.
    pub socket_mode: u32,
    /// The pool directory.
    pub pool: PathBuf,
    /// This node's id.
    pub node_id: String,
    /// Kubelet's root directory.
    pub kubelet_dir: PathBuf,
    /// The CSI driver name.
    pub driver_name: String,
    /// Worker threads.
    pub workers: usize,
    /// Calls that may wait for a worker.
    pub queue_depth: usize,
    /// Bytes of the pool never promised to volumes.
    pub reserve_bytes: u64,
    /// Thin-provisioning bound (times the usable size).
    pub overcommit: f64,
    /// The topology segment of the pool's volumes (empty: everywhere).
    pub topology: BTreeMap<String, String>,
    /// Seconds a connection gets to finish its handshake.
    pub grpc_handshake_timeout: u32,
    /// Direct I/O on loop devices where the pool allows it.
    pub loop_direct_io: bool,
    /// Where to serve metrics, if anywhere.
    pub metrics_address: Option<String>,
    /// NodeGetInfo's max_volumes_per_node (0: no limit).
    pub max_volumes_per_node: u32,
    /// Time in-flight calls get after SIGTERM.
    pub shutdown_grace: Duration,
    /// Time between clean-ups of the pool (None: only at start).
    pub janitor_interval: Option<Duration>,
    /// Settings that were not given and took their default, so start-up can
    /// tell a new user where things are.
    pub defaulted: Vec<String>,
}

/// A setting that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The endpoint is not a UNIX socket address filevol can use.
    #[error("--endpoint")]
    Endpoint(#[source] SocketError),
    /// The pool directory given does not exist or is not a directory.
    #[error("--pool {path}: {reason}")]
    Pool {
        /// The pool path given.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The default pool could not be created.
    #[error("create default pool {path}")]
    CreatePool {
        /// The default pool path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The driver name breaks the CSI naming rule.
    #[error("--driver-name {name:?}: {reason}")]
    DriverName {
        /// The name given.
        name: String,
        /// Which rule it breaks.
        reason: &'static str,
    },
    /// The node id is empty or too long.
    #[error("--node-id {id:?}: {reason}")]
    NodeId {
        /// The id given.
        id: String,
        /// Which rule it breaks.
        reason: &'static str,
    },
    /// The topology is not `key=value[,key=value]`.
    #[error("--topology {0:?}: expected key=value[,key=value]")]
    Topology(String),
    /// The overcommit ratio is not a positive number.
    #[error("--overcommit {0}: must be a positive number")]
    Overcommit(f64),
    /// The kubelet directory is not absolute.
    #[error("--kubelet-dir {0}: must be an absolute path")]
    KubeletDir(PathBuf),
}

impl Config {
    /// Resolves defaults and checks every setting.
    pub fn from_args(args: ServeArgs) -> Result<Config, ConfigError> {
        let root = rustix::process::getuid().is_root();
        let mut defaulted = Vec::new();

        let endpoint = match args.endpoint {
            Some(e) => Endpoint::parse(&e).map_err(ConfigError::Endpoint)?,
            None => {
                let ep = Endpoint::from_path(default_socket(root));
                defaulted.push(format!("endpoint {ep}"));
                ep
            }
        };

        let pool = match args.pool {
            Some(p) => {
                check_pool(&p)?;
                p
            }
            None => {
                let p = default_pool(root);
                std::fs::create_dir_all(&p).map_err(|source| ConfigError::CreatePool {
                    path: p.clone(),
                    source,
                })?;
                defaulted.push(format!("pool {}", p.display()));
                p
            }
        };

        let node_id = match args.node_id {
            Some(id) => id,
            None => {
                let host = rustix::system::uname()
                    .nodename()
                    .to_string_lossy()
                    .into_owned();
                defaulted.push(format!("node id {host:?} (the host name)"));
                host
            }
        };
        check_node_id(&node_id)?;
        check_driver_name(&args.driver_name)?;
        if !args.kubelet_dir.is_absolute() {
            return Err(ConfigError::KubeletDir(args.kubelet_dir));
        }

        let topology = match &args.topology {
            None => BTreeMap::from([(TOPOLOGY_NODE_KEY.to_owned(), node_id.clone())]),
            Some(spec) => parse_topology(spec)?,
        };
        if !(args.overcommit.is_finite() && args.overcommit > 0.0) {
            return Err(ConfigError::Overcommit(args.overcommit));
        }

        Ok(Config {
            mode: args.mode,
            reserve_bytes: args.reserve,
            max_volumes_per_node: args.max_volumes_per_node,
            metrics_address: args.metrics_address,
            grpc_handshake_timeout: args.grpc_handshake_timeout,
            loop_direct_io: args.loop_direct_io,
            overcommit: args.overcommit,
            topology,
            endpoint,
            socket_mode: args.socket_mode,
            pool,
            node_id,
            kubelet_dir: args.kubelet_dir,
            driver_name: args.driver_name,
            workers: usize::from(args.workers),
            queue_depth: usize::from(args.queue_depth),
            shutdown_grace: Duration::from_secs(args.shutdown_grace),
            janitor_interval: (args.janitor_interval > 0)
                .then(|| Duration::from_secs(args.janitor_interval)),
            defaulted,
        })
    }
}

/// The topology key of a node-local pool's segment.
pub const TOPOLOGY_NODE_KEY: &str = "topology.filevol.csi.rs/node";

fn parse_topology(spec: &str) -> Result<BTreeMap<String, String>, ConfigError> {
    let mut out = BTreeMap::new();
    for pair in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some((k, v)) if !k.is_empty() && !v.is_empty() => {
                out.insert(k.to_owned(), v.to_owned());
            }
            _ => return Err(ConfigError::Topology(spec.to_owned())),
        }
    }
    Ok(out)
}

fn default_socket(root: bool) -> PathBuf {
    if root {
        return PathBuf::from("/run/filevol/csi.sock");
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(dir) if Path::new(&dir).is_absolute() => Path::new(&dir).join("filevol/csi.sock"),
        _ => PathBuf::from(format!(
            "/tmp/filevol-{}/csi.sock",
            rustix::process::getuid().as_raw()
        )),
    }
}

fn default_pool(root: bool) -> PathBuf {
    match std::env::var_os("HOME") {
        Some(home) if !root && Path::new(&home).is_absolute() => {
            Path::new(&home).join(".local/share/filevol")
        }
        _ => PathBuf::from("/var/lib/filevol"),
    }
}

fn check_pool(path: &Path) -> Result<(), ConfigError> {
    let err = |reason: String| ConfigError::Pool {
        path: path.to_owned(),
        reason,
    };
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(err("not a directory".into())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(err(
            "does not exist; create it, or mount the shared filesystem there first".into(),
        )),
        Err(e) => Err(err(e.to_string())),
    }
}

/// The CSI spec: at most 63 characters, starting and ending with an
/// alphanumeric, with `-`, `.` and alphanumerics between (domain notation).
fn check_driver_name(name: &str) -> Result<(), ConfigError> {
    let err = |reason| {
        Err(ConfigError::DriverName {
            name: name.to_owned(),
            reason,
        })
    };
    if name.is_empty() || name.len() > 63 {
        return err("must be 1 to 63 characters");
    }
    let bytes = name.as_bytes();
    if !bytes[0].is_ascii_alphanumeric() || !bytes[bytes.len() - 1].is_ascii_alphanumeric() {
        return err("must begin and end with a letter or digit");
    }
    if !bytes
        .iter()
        .all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'.')
    {
        return err("may contain only letters, digits, '-' and '.'");
    }
    Ok(())
}

/// The CSI spec caps node ids at 256 bytes.
fn check_node_id(id: &str) -> Result<(), ConfigError> {
    let reason = if id.is_empty() {
        "must not be empty"
    } else if id.len() > 256 {
        "must be at most 256 bytes"
    } else if id.contains('\0') {
        "must not contain NUL"
    } else {
        return Ok(());
    };
    Err(ConfigError::NodeId {
        id: id.to_owned(),
        reason,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use clap::Parser;

    fn args(extra: &[&str]) -> ServeArgs {
        let mut argv = vec!["filevol", "serve"];
        argv.extend_from_slice(extra);
        let Command::Serve(args) = Cli::try_parse_from(argv).unwrap().command else {
            panic!("not serve")
        };
        args
    }

    #[test]
    fn driver_names_follow_the_spec() {
        assert!(check_driver_name("filevol.csi.rs").is_ok());
        assert!(check_driver_name("a").is_ok());
        assert!(check_driver_name("").is_err());
        assert!(check_driver_name("-filevol").is_err());
        assert!(check_driver_name("filevol.").is_err());
        assert!(check_driver_name("file_vol").is_err());
        assert!(check_driver_name(&"a".repeat(64)).is_err());
    }

    #[test]
    fn topology_forms() {
        assert!(parse_topology("").unwrap().is_empty());
        let t = parse_topology("zone=a, rack=r1").unwrap();
        assert_eq!(t["zone"], "a");
        assert_eq!(t["rack"], "r1");
        assert!(parse_topology("zone").is_err());
        assert!(parse_topology("=a").is_err());
    }

    #[test]
    fn node_ids_are_bounded() {
        assert!(check_node_id("node-1").is_ok());
        assert!(check_node_id("").is_err());
        assert!(check_node_id(&"n".repeat(257)).is_err());
    }

    #[test]
    fn an_explicit_pool_must_exist() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nfs-not-mounted");
        let err = Config::from_args(args(&[
            "--pool",
            missing.to_str().unwrap(),
            "--endpoint",
            "unix:///tmp/x.sock",
            "--node-id",
            "n1",
        ]))
        .unwrap_err();
        assert!(matches!(err, ConfigError::Pool { .. }), "{err}");
        assert!(!missing.exists(), "a missing pool must not be created");
    }

    #[test]
    fn explicit_settings_are_not_reported_as_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = Config::from_args(args(&[
            "--pool",
            dir.path().to_str().unwrap(),
            "--endpoint",
            "unix:///tmp/x.sock",
            "--node-id",
            "n1",
        ]))
        .unwrap();
        assert!(cfg.defaulted.is_empty(), "{:?}", cfg.defaulted);
        assert_eq!(cfg.topology[TOPOLOGY_NODE_KEY], "n1");
        assert_eq!(cfg.endpoint.path(), Path::new("/tmp/x.sock"));
        assert_eq!(cfg.workers, 8);
    }
}
