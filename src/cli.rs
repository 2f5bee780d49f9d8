//! The command line: the subcommands and where each one's flags are
//! defined (`serve`'s with the settings they become, in `config`; each
//! tool's beside the tool). Nothing in the library imports this module; it
//! only parses. Every flag also reads an environment variable, so a
//! Kubernetes manifest can configure the driver either way.

use clap::{Parser, Subcommand};

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
    Serve(crate::config::ServeArgs),
    /// Make CSI calls by hand against any driver's socket.
    Client(crate::ops::client::ClientArgs),
    /// Inspect a pool directory (volumes, sizes, attachments, snapshots).
    Pool(crate::ops::report::PoolArgs),
    /// Check this host for what filevol needs, and say how to fix the rest.
    Doctor(crate::ops::doctor::DoctorArgs),
    /// Load-test any CSI driver's socket as a busy cluster would.
    Bench(crate::ops::bench::BenchArgs),
    /// Trim a running node plugin's staged volumes now, giving the space
    /// freed inside them back to the pool.
    Trim(crate::ops::trim::TrimArgs),
    /// Internal: holds a group snapshot's freeze for a node plugin (see
    /// `filevol_core::node::freeze`). Started by the plugin, never by hand.
    #[command(hide = true)]
    FreezeGuard(FreezeGuardArgs),
}

/// What a node plugin hands its freeze guardian.
#[derive(Debug, clap::Args)]
pub struct FreezeGuardArgs {
    /// Thaw after this many milliseconds, whatever happens.
    #[arg(long)]
    pub max_ms: u64,
    /// The inherited descriptor of the answer's locked file.
    #[arg(long)]
    pub answer_fd: i32,
    /// Inherited descriptors of the mounts to freeze.
    #[arg(long = "fd")]
    pub fds: Vec<i32>,
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
        assert_eq!(args.mode, crate::config::Mode::All);
        assert_eq!(args.socket_mode, 0o660);
        assert!(args.pool.is_none());
    }

    #[test]
    fn zero_workers_is_refused() {
        assert!(Cli::try_parse_from(["filevol", "serve", "--workers", "0"]).is_err());
    }
}
