//! Fault injection for tests, compiled into debug builds only.
//!
//! `FILEVOL_FAULTS` holds comma-separated rules, read once at start:
//! - `delay:<Rpc>:<ms>`: a worker sleeps before running the call, to hold a
//!   worker or a volume lock for a known time (back-pressure, contention,
//!   drain-on-shutdown tests); `delay:<point>:<ms>` sleeps at a named point
//!   of a pool operation instead (see [`crash_point`]), to hold an operation
//!   half-way while another process acts;
//! - `panic:<Rpc>`: the call panics on its worker (the INTERNAL path);
//! - `crash:<point>`: the process SIGKILLs itself when it reaches a
//!   named point of a multi-step pool operation (see [`crash_point`]), to
//!   prove a restart finds the pool consistent;
//! - `eio:<path>` / `eio:<path>:<n>`: every look at a path ending with the
//!   components `<path>` (`volumes/<id>`, `groups/<id>.json`) made through
//!   `sys::fs`'s presence checks fails with EIO, after the first `<n>` looks
//!   (default 0): an I/O error on one path only, where the kernel would give
//!   one on a whole filesystem, and at a chosen look, such as the second
//!   look a clean-up takes under a lock.
//!
//! Release builds ignore the variable: nothing in production can be slowed
//! or crashed through it.

use std::io;
use std::path::Path;

#[cfg(debug_assertions)]
fn rules() -> &'static [Rule] {
    use std::sync::OnceLock;
    static RULES: OnceLock<Vec<Rule>> = OnceLock::new();
    RULES.get_or_init(|| parse(&std::env::var("FILEVOL_FAULTS").unwrap_or_default()))
}

/// Runs the faults configured for the call `rpc` (named by its CSI method),
/// if any. A no-op in release builds.
#[cfg(debug_assertions)]
pub fn before_work(rpc: impl std::fmt::Display) {
    let rpc = rpc.to_string();
    for rule in rules().iter().filter(|r| r.target == rpc) {
        match rule.action {
            Action::Delay(ms) => std::thread::sleep(std::time::Duration::from_millis(ms)),
            Action::Panic => panic!("fault injected into {rpc}"),
            Action::Crash | Action::Eio { .. } => {}
        }
    }
}

/// Runs the faults configured for the call `rpc` (named by its CSI method),
/// if any. A no-op in release builds.
#[cfg(not(debug_assertions))]
pub fn before_work(_rpc: impl std::fmt::Display) {}

/// Marks a point between two steps of a pool operation; aborts the process
/// there when `crash:<point>` is configured. A no-op in release builds.
#[cfg(debug_assertions)]
pub fn crash_point(point: &str) {
    for rule in rules().iter().filter(|r| r.target == point) {
        if let Action::Delay(ms) = rule.action {
            std::thread::sleep(std::time::Duration::from_millis(ms));
        }
    }
    if rules()
        .iter()
        .any(|r| r.action == Action::Crash && r.target == point)
    {
        // Straight to stderr: a logger's buffer would die with the process.
        #[allow(clippy::print_stderr)]
        {
            eprintln!("FILEVOL_FAULTS: SIGKILL at {point}");
        }
        // SIGKILL, not abort(): no core file, no unwinding, exactly what an
        // OOM kill or a node losing power does to the process.
        let _ =
            rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::KILL);
        unreachable!("SIGKILL is not delivered late");
    }
}

/// Marks a point between two steps of a pool operation; aborts the process
/// there when `crash:<point>` is configured. A no-op in release builds.
#[cfg(not(debug_assertions))]
pub fn crash_point(_point: &str) {}

/// Fails with EIO when an `eio:` rule (or, in unit tests, `inject_eio`)
/// names `path` and its looks to let through are used up. Called by the
/// presence checks in `sys::fs`. Always `Ok` in release builds.
#[cfg(debug_assertions)]
pub fn io_error_at(path: &Path) -> io::Result<()> {
    use std::collections::BTreeMap;
    use std::sync::Mutex;
    // Looks seen per rule (by its index), for the rules' `<n>`.
    static LOOKS: Mutex<BTreeMap<usize, usize>> = Mutex::new(BTreeMap::new());
    let mut fail = false;
    for (i, rule) in rules().iter().enumerate() {
        let Action::Eio { skip } = rule.action else {
            continue;
        };
        if path.ends_with(&rule.target) {
            let mut looks = LOOKS.lock().unwrap_or_else(|e| e.into_inner());
            let seen = looks.entry(i).or_insert(0);
            *seen += 1;
            fail |= *seen > skip;
        }
    }
    fail |= injected::hit(path);
    if fail {
        return Err(io::Error::from_raw_os_error(libc::EIO));
    }
    Ok(())
}

/// Fails with EIO when an `eio:` rule names `path`. Always `Ok` in release
/// builds.
#[cfg(not(debug_assertions))]
#[inline]
pub fn io_error_at(_path: &Path) -> io::Result<()> {
    Ok(())
}

/// Makes every look at a path ending with `path` fail with EIO on this
/// thread, after the first `skip` looks, until the guard is dropped: the
/// unit tests' `eio:` rule (the environment is read once per process, and
/// tests share the process). Debug builds only, as every rule is; the
/// driver crate's unit tests use it too, so it is not `cfg(test)`.
#[cfg(debug_assertions)]
pub fn inject_eio(path: &str, skip: usize) -> injected::Guard {
    injected::add(path, skip)
}

#[cfg(debug_assertions)]
pub mod injected {
    //! The unit tests' `eio:` rules, per thread.
    use std::cell::RefCell;
    use std::path::{Path, PathBuf};

    thread_local! {
        /// (path, looks still let through)
        static RULES: RefCell<Vec<(PathBuf, usize)>> = const { RefCell::new(Vec::new()) };
    }

    /// Removes the rule when dropped.
    #[derive(Debug)]
    pub struct Guard(PathBuf);

    impl Drop for Guard {
        fn drop(&mut self) {
            RULES.with(|r| r.borrow_mut().retain(|(p, _)| *p != self.0));
        }
    }

    pub(super) fn add(path: &str, skip: usize) -> Guard {
        RULES.with(|r| r.borrow_mut().push((PathBuf::from(path), skip)));
        Guard(PathBuf::from(path))
    }

    pub(super) fn hit(path: &Path) -> bool {
        RULES.with(|r| {
            let mut fail = false;
            for (target, skip) in r.borrow_mut().iter_mut() {
                if path.ends_with(&*target) {
                    if *skip == 0 {
                        fail = true;
                    } else {
                        *skip -= 1;
                    }
                }
            }
            fail
        })
    }
}

#[cfg_attr(not(debug_assertions), allow(dead_code))]
#[derive(Debug, PartialEq)]
struct Rule {
    target: String,
    action: Action,
}

#[cfg_attr(not(debug_assertions), allow(dead_code))]
#[derive(Debug, PartialEq)]
enum Action {
    Delay(u64),
    Panic,
    Crash,
    /// Looks fail with EIO after the first `skip`.
    Eio {
        skip: usize,
    },
}

#[cfg_attr(not(debug_assertions), allow(dead_code))]
fn parse(spec: &str) -> Vec<Rule> {
    spec.split(',')
        .filter(|s| !s.trim().is_empty())
        .filter_map(|rule| {
            let parts: Vec<&str> = rule.trim().split(':').collect();
            let parsed = match parts.as_slice() {
                ["delay", rpc, ms] => ms.parse().ok().map(|ms| Rule {
                    target: (*rpc).to_owned(),
                    action: Action::Delay(ms),
                }),
                ["panic", rpc] => Some(Rule {
                    target: (*rpc).to_owned(),
                    action: Action::Panic,
                }),
                ["crash", point] => Some(Rule {
                    target: (*point).to_owned(),
                    action: Action::Crash,
                }),
                ["eio", path] => Some(Rule {
                    target: (*path).to_owned(),
                    action: Action::Eio { skip: 0 },
                }),
                ["eio", path, skip] => skip.parse().ok().map(|skip| Rule {
                    target: (*path).to_owned(),
                    action: Action::Eio { skip },
                }),
                _ => None,
            };
            if parsed.is_none() {
                log::warn!("FILEVOL_FAULTS: ignoring malformed rule {rule:?}");
            }
            parsed
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_rules_and_skips_malformed_ones() {
        let rules = parse(
            "delay:GetPluginInfo:250, panic:Probe,bogus,delay:X:notanumber,crash:create.renamed,eio:groups/g.json,eio:volumes/v:1,eio:x:y",
        );
        assert_eq!(
            rules,
            vec![
                Rule {
                    target: "GetPluginInfo".into(),
                    action: Action::Delay(250)
                },
                Rule {
                    target: "Probe".into(),
                    action: Action::Panic
                },
                Rule {
                    target: "create.renamed".into(),
                    action: Action::Crash
                },
                Rule {
                    target: "groups/g.json".into(),
                    action: Action::Eio { skip: 0 }
                },
                Rule {
                    target: "volumes/v".into(),
                    action: Action::Eio { skip: 1 }
                },
            ]
        );
    }
}
