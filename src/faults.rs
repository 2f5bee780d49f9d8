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
//!   prove a restart finds the pool consistent.
//!
//! Release builds ignore the variable: nothing in production can be slowed
//! or crashed through it.

use crate::rpc::Rpc;

#[cfg(debug_assertions)]
fn rules() -> &'static [Rule] {
    use std::sync::OnceLock;
    static RULES: OnceLock<Vec<Rule>> = OnceLock::new();
    RULES.get_or_init(|| parse(&std::env::var("FILEVOL_FAULTS").unwrap_or_default()))
}

/// Runs the faults configured for `rpc`, if any. A no-op in release builds.
#[cfg(debug_assertions)]
pub fn before_work(rpc: Rpc) {
    let name = rpc.to_string();
    for rule in rules().iter().filter(|r| r.target == name) {
        match rule.action {
            Action::Delay(ms) => std::thread::sleep(std::time::Duration::from_millis(ms)),
            Action::Panic => panic!("fault injected into {rpc}"),
            Action::Crash => {}
        }
    }
}

/// Runs the faults configured for `rpc`, if any. A no-op in release builds.
#[cfg(not(debug_assertions))]
pub fn before_work(_rpc: Rpc) {}

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
        eprintln!("FILEVOL_FAULTS: SIGKILL at {point}");
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
            "delay:GetPluginInfo:250, panic:Probe,bogus,delay:X:notanumber,crash:create.renamed",
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
            ]
        );
    }
}
