//! The `filevol` binary: parses the command line and runs a subcommand.

use clap::Parser;

use filevol::cli::{Cli, Command};
use filevol::config::Config;
use filevol::error::message_chain;

fn main() {
    let cli = Cli::parse();
    filevol::logging::init(cli.log_level);
    let result = match cli.command {
        Command::Serve(args) => Config::from_args(args)
            .map_err(filevol::server::ServeError::from)
            .and_then(filevol::server::run),
    };
    if let Err(err) = result {
        log::error!("{}", message_chain(&err));
        eprintln!("filevol: error: {}", message_chain(&err));
        std::process::exit(1);
    }
}
