//! The `filevol` binary: parses the command line, runs a subcommand and
//! turns its outcome into the exit code. The only place filevol decides
//! one (`clippy::exit` holds the rest of the code to that).

use std::process::ExitCode;

use clap::Parser;

use filevol::cli::{Cli, Command};
use filevol::config::Config;
use filevol_core::error_chain::message_chain;

fn main() -> ExitCode {
    let cli = Cli::parse();
    filevol::logging::init(cli.log_level);
    if let Command::FreezeGuard(args) = &cli.command {
        // Its stdout is the protocol with its node plugin: nothing else
        // may write there.
        let thawed = filevol_core::node::freeze::guard(
            args.answer_fd,
            &args.fds,
            std::time::Duration::from_millis(args.max_ms),
        );
        return if thawed {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        };
    }
    let mut stdout = std::io::stdout().lock();
    let result: Result<(), Box<dyn std::error::Error>> = match cli.command {
        Command::Serve(args) => Config::from_args(args)
            .map_err(filevol::server::ServeError::from)
            .and_then(filevol::server::run)
            .map_err(Into::into),
        Command::Client(args) => filevol::ops::client::run(args, &mut stdout).map_err(Into::into),
        Command::Pool(args) => filevol::ops::report::run(args, &mut stdout).map_err(Into::into),
        Command::Doctor(args) => filevol::ops::doctor::run(args, &mut stdout).map_err(Into::into),
        Command::Bench(args) => filevol::ops::bench::run(args, &mut stdout).map_err(Into::into),
        Command::Trim(args) => filevol::ops::trim::run(args, &mut stdout).map_err(Into::into),
        Command::FreezeGuard(_) => unreachable!("handled above"),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // The one line an operator reads when a command fails: the
            // error and its causes, printed once, here at the edge.
            #[allow(clippy::print_stderr)]
            {
                eprintln!("filevol: error: {}", message_chain(err.as_ref()));
            }
            ExitCode::FAILURE
        }
    }
}
