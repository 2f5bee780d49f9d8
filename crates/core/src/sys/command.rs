//! Programs run with an argument vector, never a shell: the filesystem
//! tools (`mkfs.*`, `resize2fs`, `xfs_growfs`, `btrfs`). A failure is a
//! [`CommandError`] naming the command line, its exit status and what it
//! printed on stderr; the node turns it into its own error (the text an
//! operator reads is this one).
//!
//! Tools run in the C locale, so what they print is what
//! [`CommandError::out_of_space`] reads: a tool that ran out of room (mkfs
//! writing its metadata into an image on a full pool) says so only in its
//! text. mke2fs, mkfs.xfs, mkfs.btrfs, resize2fs and xfs_growfs exit with 1
//! for every failure; no exit status means "no space".

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

/// What the C library prints for ENOSPC and EDQUOT (`strerror` in the C
/// locale), as the tools pass it on: `mkfs.ext4: No space left on device
/// while writing out and closing file system`, `mkfs.xfs: pwrite failed: No
/// space left on device`.
const OUT_OF_SPACE: [&str; 2] = ["No space left on device", "Disk quota exceeded"];

impl CommandError {
    /// Whether the program failed because a filesystem it wrote to was full
    /// or a quota was reached (ENOSPC, EDQUOT), as it reported: space to be
    /// made free, not a fault to mend. Known blind spot: mkfs.btrfs reports
    /// a full pool as "failed to zero device ...: Input/output error".
    pub fn out_of_space(&self) -> bool {
        OUT_OF_SPACE.iter().any(|s| self.stderr.contains(s))
    }
}

/// Runs `program` with `args`.
pub fn run(program: &str, args: &[&OsStr]) -> Result<(), CommandError> {
    output(program, args).map(drop)
}

/// Runs `program` with `args`; its standard output when it succeeds.
pub fn output(program: &str, args: &[&OsStr]) -> Result<String, CommandError> {
    let out = Command::new(program)
        .args(args)
        // Messages in English, whatever the host's locale: read by
        // `out_of_space`, and by an operator in the answer.
        .env("LC_ALL", "C")
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

#[cfg(test)]
mod tests {
    use super::*;

    fn failed(stderr: &str) -> CommandError {
        CommandError {
            command: "mkfs.xfs -q /pool/volumes/v/.image.mkfs".into(),
            status: "exit status: 1".into(),
            stderr: stderr.into(),
        }
    }

    #[test]
    fn a_tool_that_ran_out_of_space_is_told_by_what_it_printed() {
        // As mke2fs 1.47 and mkfs.xfs 6.x print it on a full filesystem.
        assert!(failed(
            "Warning: could not erase sector 2: No space left on device\n\
             mkfs.ext4: No space left on device while writing out and closing file system"
        )
        .out_of_space());
        assert!(failed("mkfs.xfs: pwrite failed: No space left on device").out_of_space());
        // A reached quota, in the C library's words.
        assert!(failed("resize2fs: Disk quota exceeded while trying to resize").out_of_space());
        assert!(!failed("mkfs.xfs: cannot open /x: Permission denied").out_of_space());
        assert!(!failed("").out_of_space());
    }

    #[test]
    fn a_tool_runs_in_the_c_locale() {
        let out = output("sh", &[OsStr::new("-c"), OsStr::new("echo $LC_ALL")]).unwrap();
        assert_eq!(out.trim(), "C");
        let e = run(
            "sh",
            &[OsStr::new("-c"), OsStr::new("echo no room >&2; exit 3")],
        )
        .unwrap_err();
        assert_eq!(e.stderr, "no room");
        assert!(e.command.starts_with("sh -c"), "{e}");
    }
}
