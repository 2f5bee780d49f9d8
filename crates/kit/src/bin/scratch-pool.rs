//! `scratch-pool`: the test kit's scratch filesystems for the shell
//! benchmarks and csi-sanity (scripts/bench/lib.sh), so that a pool made for
//! a script is made exactly as one made for a Rust test
//! ([`filevol_kit::scratch`]).
//!
//! ```text
//! scratch-pool make WORK SIZE [FS]   a FS (xfs, the default; ext4; btrfs)
//!                                    of SIZE (4G, 512M, 8Gi, bytes)
//!                                    mounted at WORK/mnt, left mounted
//! scratch-pool remove WORK           detach, unmount and remove all under
//!                                    WORK (after a benchmark, however it
//!                                    ended)
//! ```
//!
//! Needs root.

use std::path::Path;
use std::process::ExitCode;

use filevol_core::units::parse_size;
use filevol_kit::scratch;

/// A size as `truncate` and the scripts write it (`8G`, `512M`), or in
/// filevol's own units (`8Gi`, bytes).
fn size(s: &str) -> Result<u64, String> {
    match s.strip_suffix(['K', 'M', 'G', 'T']) {
        Some(_) => parse_size(&format!("{s}i")),
        None => parse_size(s),
    }
}

fn run(args: &[String]) -> Result<(), String> {
    match args {
        [cmd, work, bytes, rest @ ..] if cmd == "make" && rest.len() <= 1 => {
            let fs = rest.first().map_or("xfs", String::as_str);
            scratch::make_at(Path::new(work), fs, size(bytes)?).map(drop)
        }
        [cmd, work] if cmd == "remove" => scratch::remove_tree(Path::new(work)),
        _ => Err(
            "usage: scratch-pool make WORK SIZE [xfs|ext4|btrfs] | scratch-pool remove WORK".into(),
        ),
    }
}

// A command-line tool: its errors go to stderr.
#[allow(clippy::print_stderr)]
fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("scratch-pool: {e}");
            ExitCode::FAILURE
        }
    }
}
