//! The driver's settings, resolved and checked from the command line before
//! anything starts: a bad flag is a clear start-up error, never a surprise at
//! the first call.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, ValueEnum};

use crate::endpoint::{Endpoint, EndpointError};
use filevol_core::units::{parse_duration, parse_size};

/// Which CSI services a process serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// Identity + Controller + GroupController (the StatefulSet).
    Controller,
    /// Identity + Node (the DaemonSet).
    Node,
    /// Everything on one socket: single node, csi-sanity, development.
    All,
}

impl Mode {
    /// Whether this mode serves the Controller and GroupController services.
    pub fn serves_controller(self) -> bool {
        matches!(self, Mode::Controller | Mode::All)
    }

    /// Whether this mode serves the Node service.
    pub fn serves_node(self) -> bool {
        matches!(self, Mode::Node | Mode::All)
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Controller => "controller",
            Mode::Node => "node",
            Mode::All => "all",
        })
    }
}

/// Flags of `filevol serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Services to serve.
    #[arg(long, env = "FILEVOL_MODE", value_enum, default_value_t = Mode::All)]
    pub mode: Mode,

    /// gRPC endpoint: `unix:///absolute/path.sock` (UNIX sockets only).
    /// Default: /run/filevol/csi.sock as root, else under $XDG_RUNTIME_DIR
    /// or /tmp/filevol-$UID.
    #[arg(long, env = "CSI_ENDPOINT")]
    pub endpoint: Option<String>,

    /// Permissions of the socket file, in octal.
    #[arg(long, env = "FILEVOL_SOCKET_MODE", default_value = "0660", value_parser = parse_octal_mode)]
    pub socket_mode: u32,

    /// The pool directory that holds volumes, snapshots and their metadata.
    /// It must exist (a missing shared mount must not silently become a
    /// directory on the root disk). Default: /var/lib/filevol as root, else
    /// ~/.local/share/filevol, created when missing.
    #[arg(long, env = "FILEVOL_POOL")]
    pub pool: Option<PathBuf>,

    /// This node's id, as the CO knows it (spec.nodeName). Default: the host
    /// name.
    #[arg(long, env = "FILEVOL_NODE_ID")]
    pub node_id: Option<String>,

    /// Kubelet's root directory; staging and target paths must lie under it.
    #[arg(long, env = "FILEVOL_KUBELET_DIR", default_value = "/var/lib/kubelet")]
    pub kubelet_dir: PathBuf,

    /// The CSI driver name (the CSIDriver object's name).
    #[arg(long, env = "FILEVOL_DRIVER_NAME", default_value = "filevol.csi.rs")]
    pub driver_name: String,

    /// Worker threads that make the blocking syscalls.
    #[arg(long, env = "FILEVOL_WORKERS", default_value_t = 8,
          value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub workers: u16,

    /// Calls that may wait for a worker before new ones get
    /// RESOURCE_EXHAUSTED.
    #[arg(long, env = "FILEVOL_QUEUE_DEPTH", default_value_t = 64,
          value_parser = clap::value_parser!(u16).range(0..=16384))]
    pub queue_depth: u16,

    /// Bytes of the pool filesystem never promised to volumes (suffixes Ki,
    /// Mi, Gi, Ti).
    #[arg(long, env = "FILEVOL_RESERVE", default_value = "64Mi", value_parser = parse_size)]
    pub reserve: u64,

    /// How many times its usable size the pool may promise to thin volumes
    /// (1.0: never more than it can write).
    #[arg(long, env = "FILEVOL_OVERCOMMIT", default_value_t = 1.0)]
    pub overcommit: f64,

    /// The topology segment of this pool's volumes, `key=value[,key=value]`.
    /// Default: `topology.filevol.csi.rs/node=<node id>`, a node-local pool.
    /// An empty value means reachable from every node: a shared pool, whose
    /// filesystem must carry locks to every host (see
    /// `--allow-host-local-locks`).
    #[arg(long, env = "FILEVOL_TOPOLOGY")]
    pub topology: Option<String>,

    /// Start a shared pool (an empty `--topology`) even where its
    /// filesystem may keep locks on this host (a local filesystem, NFS
    /// mounted `nolock` or `local_lock=all|posix`, FUSE without lock
    /// forwarding). Its fences then exclude nothing on other hosts: two
    /// hosts can stage one single-writer volume at once. Only for pools
    /// whose processes all run on this one host.
    #[arg(long, env = "FILEVOL_ALLOW_HOST_LOCAL_LOCKS")]
    pub allow_host_local_locks: bool,

    /// Serve Prometheus metrics at http://ADDRESS/metrics (e.g.
    /// `0.0.0.0:9808`). Off when not given. The Kubernetes manifests pass
    /// `0.0.0.0:9808` to the controller and the node plugin (no host
    /// network): Prometheus in the cluster scrapes `<pod IP>:9808/metrics`.
    #[arg(long, env = "FILEVOL_METRICS_ADDRESS")]
    pub metrics_address: Option<String>,

    /// Seconds a new connection gets to complete its HTTP/2 handshake
    /// before the server drops it (clients that connect and never speak).
    #[arg(long, env = "FILEVOL_GRPC_HANDSHAKE_TIMEOUT", default_value_t = 10,
          value_parser = clap::value_parser!(u32).range(1..=3600))]
    pub grpc_handshake_timeout: u32,

    /// Use direct I/O on the loop devices where the pool filesystem allows
    /// it (no double caching of volume data in the page cache).
    #[arg(long, env = "FILEVOL_LOOP_DIRECT_IO", default_value_t = true, action = clap::ArgAction::Set)]
    pub loop_direct_io: bool,

    /// Serve the CSI v1.12 volume condition: the `volume_condition` of
    /// NodeGetVolumeStats, ListVolumes and ControllerGetVolume and the
    /// VOLUME_CONDITION capabilities, which external-health-monitor
    /// (v0.18 and before) needs.
    #[arg(long, env = "FILEVOL_VOLUME_CONDITION", default_value_t = true, action = clap::ArgAction::Set)]
    pub volume_condition: bool,

    /// Serve the CSI v1.13 health calls (NodeGetVolumeHealth,
    /// NodeGetStorageHealth, ControllerGetVolumeHealth,
    /// ControllerListVolumeHealth) and their capabilities, which kubelet
    /// reads behind its CSIVolumeHealth feature gate.
    #[arg(long, env = "FILEVOL_VOLUME_HEALTH", default_value_t = true, action = clap::ArgAction::Set)]
    pub volume_health: bool,

    /// Seconds between probes of the pool's health, and how long a probe
    /// or a volume's health check may take before the pool counts as
    /// unreachable.
    #[arg(long, env = "FILEVOL_HEALTH_INTERVAL", default_value_t = 10,
          value_parser = clap::value_parser!(u32).range(1..=600))]
    pub health_interval: u32,

    /// Volumes this node accepts (NodeGetInfo's max_volumes_per_node); 0
    /// reports no limit.
    #[arg(long, env = "FILEVOL_MAX_VOLUMES_PER_NODE", default_value_t = 0)]
    pub max_volumes_per_node: u32,

    /// Make CSI ephemeral inline volumes (a pod's `csi:` volume, sized by
    /// its `size` attribute). Off by default: any pod author names the
    /// size, so an operator decides whether this node makes them, within
    /// `--ephemeral-max-size` and `--ephemeral-max-per-node`. The CSIDriver
    /// must also list the `Ephemeral` lifecycle mode (the Kubernetes
    /// overlay `ephemeral-inline` does both).
    #[arg(long, env = "FILEVOL_EPHEMERAL_INLINE")]
    pub ephemeral_inline: bool,

    /// The most one ephemeral inline volume may take in the pool (its
    /// size rounded up to whole MiB and its filesystem's minimum; suffixes
    /// Ki, Mi, Gi, Ti). A larger one is refused with OUT_OF_RANGE.
    #[arg(long, env = "FILEVOL_EPHEMERAL_MAX_SIZE", default_value = "1Gi", value_parser = parse_size)]
    pub ephemeral_max_size: u64,

    /// The most this node's ephemeral inline volumes may take in the pool
    /// together; a new one beyond it is refused with RESOURCE_EXHAUSTED.
    #[arg(long, env = "FILEVOL_EPHEMERAL_MAX_PER_NODE", default_value = "10Gi", value_parser = parse_size)]
    pub ephemeral_max_per_node: u64,

    /// Seconds in-flight calls get to finish after SIGTERM before they are
    /// cancelled.
    #[arg(long, env = "FILEVOL_SHUTDOWN_GRACE", default_value_t = 20)]
    pub shutdown_grace: u64,

    /// Seconds between clean-ups of what dead processes left in the pool
    /// (controller and `all` modes; also done at start). 0: only at start.
    #[arg(long, env = "FILEVOL_JANITOR_INTERVAL", default_value_t = 600)]
    pub janitor_interval: u64,

    /// Seconds after which a directory volume's usage is measured again for
    /// the metrics (a background walk of its tree, never at scrape time;
    /// at least 1). Only where `--metrics-address` is set.
    #[arg(long, env = "FILEVOL_DIR_USAGE_INTERVAL", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub dir_usage_interval: u64,

    /// How often the node plugin trims (FITRIM) each staged, writable
    /// filesystem volume, so space freed inside it goes back to the pool:
    /// `1w` as util-linux's fstrim.timer (`OnCalendar=weekly`); units s, m,
    /// h, d, w. 0: never (`filevol trim` still trims on demand).
    #[arg(long, env = "FILEVOL_TRIM_INTERVAL", default_value = "1w", value_parser = parse_duration)]
    pub trim_interval: Duration,

    /// The spread of the periodic trims: each volume trims at its own fixed
    /// offset within this window after each interval starts (fstrim.timer's
    /// `RandomizedDelaySec=100min`), so volumes do not all trim at once.
    #[arg(long, env = "FILEVOL_TRIM_JITTER", default_value = "100m", value_parser = parse_duration)]
    pub trim_jitter: Duration,

    /// How often the node plugin checks that every loop device it has
    /// still holds its image's fence (a lock can be lost with an NFS lease
    /// or a CephFS eviction); one that does not is reported abnormal and
    /// its volume is not staged or published again until it is unstaged.
    /// Units s, m, h, d, w. 0: only at start.
    #[arg(long, env = "FILEVOL_FENCE_CHECK_INTERVAL", default_value = "30s", value_parser = parse_duration)]
    pub fence_check_interval: Duration,
}

fn parse_octal_mode(s: &str) -> Result<u32, String> {
    let mode = u32::from_str_radix(s.trim_start_matches("0o"), 8)
        .map_err(|e| format!("{s:?} is not an octal mode: {e}"))?;
    if mode & !0o777 != 0 {
        return Err(format!(
            "{s:?}: only permission bits (0 to 0777) are allowed"
        ));
    }
    Ok(mode)
}

impl ServeArgs {
    /// Parses `serve`'s flags alone (tests and fuzzing build settings this
    /// way); `flags` leaves out the program and subcommand names.
    pub fn try_parse_from<I, T>(flags: I) -> Result<ServeArgs, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        #[derive(clap::Parser)]
        struct Serve {
            #[command(flatten)]
            args: ServeArgs,
        }
        let argv = std::iter::once(std::ffi::OsString::from("filevol serve"))
            .chain(flags.into_iter().map(Into::into));
        <Serve as clap::Parser>::try_parse_from(argv).map(|s| s.args)
    }
}

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
    /// Serve a shared pool whose locks may stay on this host.
    pub allow_host_local_locks: bool,
    /// Seconds a connection gets to finish its handshake.
    pub grpc_handshake_timeout: u32,
    /// Direct I/O on loop devices where the pool allows it.
    pub loop_direct_io: bool,
    /// Serve the v1.12 volume condition.
    pub volume_condition: bool,
    /// Serve the v1.13 health calls.
    pub volume_health: bool,
    /// Between pool health probes, and their deadline.
    pub health_interval: Duration,
    /// Where to serve metrics, if anywhere.
    pub metrics_address: Option<String>,
    /// NodeGetInfo's max_volumes_per_node (0: no limit).
    pub max_volumes_per_node: u32,
    /// Ephemeral inline volumes: made within these limits, or refused
    /// (None).
    pub ephemeral: Option<filevol_core::node::ephemeral::Limits>,
    /// Time in-flight calls get after SIGTERM.
    pub shutdown_grace: Duration,
    /// Time between clean-ups of the pool (None: only at start).
    pub janitor_interval: Option<Duration>,
    /// How old a directory volume's usage figure gets before it is
    /// measured again.
    pub dir_usage_interval: Duration,
    /// Periodic trims of staged volumes (None: on demand only).
    pub trim: Option<filevol_core::node::trim::Schedule>,
    /// Time between checks of the node's fences (None: only at start).
    pub fence_check_interval: Option<Duration>,
    /// Settings that were not given and took their default, so start-up can
    /// tell a new user where things are.
    pub defaulted: Vec<String>,
}

/// A setting that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The endpoint is not a UNIX socket address filevol can use.
    #[error("--endpoint")]
    Endpoint(#[source] EndpointError),
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
    /// The ephemeral volume limits admit no volume, or one larger than
    /// all of them together.
    #[error("--ephemeral-max-size {max_size} bytes: {reason} (--ephemeral-max-per-node is {max_per_node} bytes)")]
    EphemeralLimits {
        /// The per-volume limit given.
        max_size: u64,
        /// The per-node limit given.
        max_per_node: u64,
        /// What is wrong with them.
        reason: &'static str,
    },
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
                let p = default_pool_for(root);
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
        let ephemeral = ephemeral_limits(
            args.ephemeral_inline,
            args.ephemeral_max_size,
            args.ephemeral_max_per_node,
        )?;

        Ok(Config {
            mode: args.mode,
            reserve_bytes: args.reserve,
            max_volumes_per_node: args.max_volumes_per_node,
            ephemeral,
            metrics_address: args.metrics_address,
            grpc_handshake_timeout: args.grpc_handshake_timeout,
            loop_direct_io: args.loop_direct_io,
            volume_condition: args.volume_condition,
            volume_health: args.volume_health,
            health_interval: Duration::from_secs(args.health_interval.into()),
            overcommit: args.overcommit,
            topology,
            allow_host_local_locks: args.allow_host_local_locks,
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
            dir_usage_interval: Duration::from_secs(args.dir_usage_interval),
            trim: filevol_core::node::trim::Schedule::new(args.trim_interval, args.trim_jitter),
            fence_check_interval: (!args.fence_check_interval.is_zero())
                .then_some(args.fence_check_interval),
            defaulted,
        })
    }
}

/// The ephemeral inline volume limits, checked, where `on`
/// (`--ephemeral-inline`). Checked even when off, so that turning them on
/// later cannot meet a bad value for the first time.
fn ephemeral_limits(
    on: bool,
    max_size: u64,
    max_per_node: u64,
) -> Result<Option<filevol_core::node::ephemeral::Limits>, ConfigError> {
    let bad = |reason| ConfigError::EphemeralLimits {
        max_size,
        max_per_node,
        reason,
    };
    if max_size < filevol_core::pool::ALIGN {
        return Err(bad("must be at least 1Mi, the smallest volume"));
    }
    if max_size > max_per_node {
        return Err(bad("must not be more than --ephemeral-max-per-node"));
    }
    Ok(on.then_some(filevol_core::node::ephemeral::Limits {
        max_size,
        max_per_node,
    }))
}

/// The topology key of a node-local pool's segment.
pub const TOPOLOGY_NODE_KEY: &str = "topology.filevol.csi.rs/node";

/// Parses `key=value[,key=value]`; an empty spec is the empty segment of
/// a shared pool.
pub fn parse_topology(spec: &str) -> Result<BTreeMap<String, String>, ConfigError> {
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

/// The endpoint `filevol serve` listens on when given none (see
/// `ServeArgs::endpoint`); the tools default to it too.
pub fn default_endpoint() -> Endpoint {
    Endpoint::from_path(default_socket(rustix::process::geteuid().is_root()))
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

/// The pool `filevol serve` uses when given none: /var/lib/filevol as
/// root, else ~/.local/share/filevol. The tools default to it too.
pub fn default_pool() -> PathBuf {
    default_pool_for(rustix::process::geteuid().is_root())
}

fn default_pool_for(root: bool) -> PathBuf {
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

    fn args(extra: &[&str]) -> ServeArgs {
        ServeArgs::try_parse_from(extra).unwrap()
    }

    #[test]
    fn octal_modes() {
        assert_eq!(parse_octal_mode("0600").unwrap(), 0o600);
        assert_eq!(parse_octal_mode("0o640").unwrap(), 0o640);
        assert!(parse_octal_mode("0888").is_err());
        assert!(parse_octal_mode("10000").is_err());
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
    fn host_local_locks_are_allowed_only_when_asked() {
        let dir = tempfile::tempdir().unwrap();
        let pool = dir.path().to_str().unwrap();
        let cfg = Config::from_args(args(&[
            "--pool",
            pool,
            "--topology=",
            "--allow-host-local-locks",
        ]))
        .unwrap();
        assert!(cfg.allow_host_local_locks);
        assert!(cfg.topology.is_empty());
        // A switch: it takes no value on the command line.
        assert!(ServeArgs::try_parse_from(["--allow-host-local-locks", "yes"]).is_err());
    }

    #[test]
    fn ephemeral_inline_volumes_are_off_unless_turned_on_and_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let pool = dir.path().to_str().unwrap();
        let cfg = |extra: &[&str]| {
            let mut flags = vec!["--pool", pool];
            flags.extend_from_slice(extra);
            Config::from_args(args(&flags))
        };
        assert_eq!(cfg(&[]).unwrap().ephemeral, None);
        let on = cfg(&["--ephemeral-inline"]).unwrap().ephemeral.unwrap();
        assert_eq!((on.max_size, on.max_per_node), (1 << 30, 10 << 30));
        let on = cfg(&[
            "--ephemeral-inline",
            "--ephemeral-max-size=256Mi",
            "--ephemeral-max-per-node",
            "2Gi",
        ])
        .unwrap()
        .ephemeral
        .unwrap();
        assert_eq!((on.max_size, on.max_per_node), (256 << 20, 2 << 30));
        // Limits that admit nothing, or a volume larger than all together.
        for bad in [
            &["--ephemeral-max-size=4Gi", "--ephemeral-max-per-node=2Gi"][..],
            &["--ephemeral-max-size=0"][..],
        ] {
            let err = cfg(bad).unwrap_err();
            assert!(matches!(err, ConfigError::EphemeralLimits { .. }), "{err}");
        }
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
        assert!(!cfg.allow_host_local_locks);
        assert_eq!(cfg.topology[TOPOLOGY_NODE_KEY], "n1");
        assert_eq!(cfg.endpoint.path(), Path::new("/tmp/x.sock"));
        assert_eq!(cfg.workers, 8);
    }
}
