//! Programs run with an argument vector, never a shell: the filesystem
//! tools (`mkfs.*`, `resize2fs`, `xfs_growfs`, `btrfs`). A failure is a
//! [`CommandError`] naming the command line, its exit status and what it
//! printed on stderr; the node turns it into its own error (the text an
//! operator reads is this one).

use std::ffi::OsStr;
use std::process::Command;

/// A program that could not be started, exited with a failure, or printed
/// what its caller could not read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{command} exited with {status}: {stderr}")]
pub struct CommandError {
    /// The command line (program and arguments), or the program alone when
    /// it did not start.
    pub command: String,
    /// Its exit status (`no start` when it did not start).
    pub status: String,
    /// What it printed on stderr, or why it did not start.
    pub stderr: String,
}

/// Runs `program` with `args`.
pub fn run(program: &str, args: &[&OsStr]) -> Result<(), CommandError> {
    output(program, args).map(drop)
}

/// Runs `program` with `args`; its standard output when it succeeds.
pub fn output(program: &str, args: &[&OsStr]) -> Result<String, CommandError> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| CommandError {
            command: program.to_owned(),
            status: "no start".into(),
            stderr: e.to_string(),
        })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(CommandError {
            command: std::iter::once(program.to_owned())
                .chain(args.iter().map(|a| a.to_string_lossy().into_owned()))
                .collect::<Vec<_>>()
                .join(" "),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}
