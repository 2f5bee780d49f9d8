//! Command-line interface. Every flag also reads an environment variable, so
//! a Kubernetes manifest can configure the driver either way.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// filevol: a CSI driver that turns a directory into sized Kubernetes
/// volumes (sparse images on loop devices, reflink snapshots).
#[derive(Debug, Parser)]
#[command(name = "filevol", version, propagate_version = true)]
pub struct Cli {
    /// Log level: off, error, warn, info, debug or trace.
    #[arg(long, global = true, env = "FILEVOL_LOG_LEVEL", default_value = "info")]
    pub log_level: log::LevelFilter,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the CSI driver on a UNIX socket. With no flags: mode `all` on a
    /// local default pool and socket, printed on stderr at start.
    Serve(ServeArgs),
    /// Make CSI calls by hand against any driver's socket.
    Client(crate::ops::client::ClientArgs),
    /// Inspect a pool directory (volumes, sizes, attachments, snapshots).
    Pool(crate::ops::report::PoolArgs),
    /// Check this host for what filevol needs, and say how to fix the rest.
    Doctor(crate::ops::doctor::DoctorArgs),
    /// Load-test any CSI driver's socket as a busy cluster would.
    Bench(crate::ops::bench::BenchArgs),
}

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
    /// An empty value means reachable from every node: a shared pool.
    #[arg(long, env = "FILEVOL_TOPOLOGY")]
    pub topology: Option<String>,

    /// Serve Prometheus metrics at http://ADDRESS/metrics (e.g.
    /// `0.0.0.0:9808`). Off when not given. The Kubernetes manifests pass
    /// `0.0.0.0:9808`, the `metrics` port of the controller's and the node
    /// plugin's `filevol` container (no host network): Prometheus in the
    /// cluster scrapes `<pod IP>:9808/metrics`.
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

    /// Volumes this node accepts (NodeGetInfo's max_volumes_per_node); 0
    /// reports no limit.
    #[arg(long, env = "FILEVOL_MAX_VOLUMES_PER_NODE", default_value_t = 0)]
    pub max_volumes_per_node: u32,

    /// Seconds in-flight calls get to finish after SIGTERM before they are
    /// cancelled.
    #[arg(long, env = "FILEVOL_SHUTDOWN_GRACE", default_value_t = 20)]
    pub shutdown_grace: u64,

    /// Seconds between clean-ups of what dead processes left in the pool
    /// (controller and `all` modes; also done at start). 0: only at start.
    #[arg(long, env = "FILEVOL_JANITOR_INTERVAL", default_value_t = 600)]
    pub janitor_interval: u64,
}

/// Parses a byte count with an optional binary suffix: `512`, `64Mi`, `2Gi`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let (digits, shift) = [("Ki", 10), ("Mi", 20), ("Gi", 30), ("Ti", 40)]
        .iter()
        .find_map(|(suffix, shift)| s.strip_suffix(suffix).map(|d| (d, *shift)))
        .unwrap_or((s, 0));
    let n: u64 = digits
        .parse()
        .map_err(|e| format!("{s:?} is not a size (bytes, or a number with Ki/Mi/Gi/Ti): {e}"))?;
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("{s:?} is too large"))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn serve_with_no_flags_runs_all() {
        let cli = Cli::try_parse_from(["filevol", "serve"]).unwrap();
        let Command::Serve(args) = cli.command else {
            panic!("not serve")
        };
        assert_eq!(args.mode, Mode::All);
        assert_eq!(args.socket_mode, 0o660);
        assert!(args.pool.is_none());
    }

    #[test]
    fn octal_modes() {
        assert_eq!(parse_octal_mode("0600").unwrap(), 0o600);
        assert_eq!(parse_octal_mode("0o640").unwrap(), 0o640);
        assert!(parse_octal_mode("0888").is_err());
        assert!(parse_octal_mode("10000").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512").unwrap(), 512);
        assert_eq!(parse_size("64Mi").unwrap(), 64 << 20);
        assert_eq!(parse_size("2Ti").unwrap(), 2 << 40);
        assert!(parse_size("1.5Gi").is_err());
        assert!(parse_size("99999999999Ti").is_err());
    }

    #[test]
    fn zero_workers_is_refused() {
        assert!(Cli::try_parse_from(["filevol", "serve", "--workers", "0"]).is_err());
    }
}
