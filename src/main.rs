//! The `filevol` binary: parses the command line and runs a subcommand.

use clap::Parser;

use filevol::cli::{Cli, Command};
use filevol::config::Config;
use filevol::error_chain::message_chain;

fn main() {
    let cli = Cli::parse();
    filevol::logging::init(cli.log_level);
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
    };
    if let Err(err) = result {
        let err = err.as_ref();
        eprintln!("filevol: error: {}", message_chain(err));
        std::process::exit(1);
    }
}
