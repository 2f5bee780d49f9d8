//! Writes filevol's manual pages and shell completions from its clap
//! definitions, for packaging (scripts/package/package.sh):
//!
//! ```text
//! cargo run --release --example generate-docs -- <out-dir>
//! ```
//!
//! makes `<out-dir>/man/filevol.1` and one page per subcommand at every
//! depth (`filevol-serve.1`, `filevol-client-identity.1`, ...), and
//! `<out-dir>/completions/` with `filevol.bash`, `_filevol` (zsh) and
//! `filevol.fish`.
//!
//! An example rather than a subcommand of the binary: clap_mangen and
//! clap_complete are dev-dependencies, so the shipped binary neither links
//! nor carries them, and its dependency tree stays what the book lists (docs/src/packaging.md).

use std::path::Path;
use std::process::ExitCode;

use clap::CommandFactory;
use clap_complete::Shell;

/// The shells the package installs completions for, with the file name each
/// one's completion directory expects.
const SHELLS: [(Shell, &str); 3] = [
    (Shell::Bash, "filevol.bash"),
    (Shell::Zsh, "_filevol"),
    (Shell::Fish, "filevol.fish"),
];

// A command-line tool: its errors go to stderr.
#[allow(clippy::print_stderr)]
fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    let (Some(out), None) = (args.next(), args.next()) else {
        eprintln!("usage: generate-docs <out-dir>");
        return ExitCode::from(2);
    };
    if let Err(err) = generate(Path::new(&out)) {
        eprintln!("generate-docs: {err}");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

/// Writes every page and completion file under `out`.
fn generate(out: &Path) -> std::io::Result<()> {
    let man = out.join("man");
    std::fs::create_dir_all(&man)?;
    let mut cli = filevol::cli::Cli::command().disable_help_subcommand(true);
    // Names every subcommand after its path (filevol-client-stage), which
    // is how man(1) looks the pages up.
    cli.build();
    write_pages(&cli, &man)?;

    let completions = out.join("completions");
    std::fs::create_dir_all(&completions)?;
    for (shell, file) in SHELLS {
        let mut cmd = filevol::cli::Cli::command();
        let mut f = std::fs::File::create(completions.join(file))?;
        clap_complete::generate(shell, &mut cmd, "filevol", &mut f);
    }
    Ok(())
}

/// One page for `cmd` and one for each visible subcommand, at every depth.
fn write_pages(cmd: &clap::Command, dir: &Path) -> std::io::Result<()> {
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        write_pages(sub, dir)?;
    }
    // Each page's footer names the program and version, not the subcommand.
    let version = cmd.get_version().unwrap_or(env!("CARGO_PKG_VERSION"));
    clap_mangen::Man::new(cmd.clone())
        .source(format!("filevol {version}"))
        .manual("filevol manual")
        .generate_to(dir)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    /// The page file names the package must hold: one per visible command path.
    fn expected_pages(cmd: &clap::Command, prefix: &str, pages: &mut Vec<PathBuf>) {
        let name = if prefix.is_empty() {
            cmd.get_name().to_owned()
        } else {
            format!("{prefix}-{}", cmd.get_name())
        };
        pages.push(PathBuf::from(format!("{name}.1")));
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
            if sub.get_name() != "help" {
                expected_pages(sub, &name, pages);
            }
        }
    }

    #[test]
    fn every_subcommand_has_a_page_and_every_shell_completes_them() {
        let out = tempfile::tempdir().unwrap();
        generate(out.path()).unwrap();

        let mut pages = Vec::new();
        expected_pages(&filevol::cli::Cli::command(), "", &mut pages);
        assert!(pages.contains(&PathBuf::from("filevol-serve.1")));
        assert!(pages.contains(&PathBuf::from("filevol-client-identity.1")));
        for page in &pages {
            let text = std::fs::read_to_string(out.path().join("man").join(page))
                .unwrap_or_else(|e| panic!("{}: {e}", page.display()));
            assert!(text.starts_with(".ie"), "{} is not roff", page.display());
            assert!(text.contains(".TH "), "{} has no title", page.display());
        }
        let made = std::fs::read_dir(out.path().join("man")).unwrap().count();
        assert_eq!(made, pages.len(), "pages for commands that do not exist");

        // The serve page documents the environment variables the systemd
        // units' /etc/default/filevol sets.
        let serve = std::fs::read_to_string(out.path().join("man/filevol-serve.1")).unwrap();
        assert!(serve.contains("FILEVOL_POOL"));

        for (_, file) in SHELLS {
            let text = std::fs::read_to_string(out.path().join("completions").join(file)).unwrap();
            for sub in ["serve", "client", "pool", "doctor", "bench"] {
                assert!(text.contains(sub), "{file} does not complete {sub}");
            }
        }
    }
}
