//! Fault injection for tests, compiled into debug builds only.
//!
//! `FILEVOL_FAULTS` holds comma-separated rules, read once at start:
//! - `delay:<Rpc>:<ms>`: a worker sleeps before running the call, to hold a
//!   worker or a volume lock for a known time (back-pressure, contention,
//!   drain-on-shutdown tests);
//! - `panic:<Rpc>`: the call panics on its worker (the INTERNAL path).
//!
//! Release builds ignore the variable: nothing in production can be slowed
//! or crashed through it.

use crate::rpc::Rpc;

/// Runs the faults configured for `rpc`, if any. A no-op in release builds.
#[cfg(debug_assertions)]
pub fn before_work(rpc: Rpc) {
    use std::sync::OnceLock;
    static RULES: OnceLock<Vec<Rule>> = OnceLock::new();
    let rules = RULES.get_or_init(|| parse(&std::env::var("FILEVOL_FAULTS").unwrap_or_default()));
    for rule in rules.iter().filter(|r| r.rpc == rpc.to_string()) {
        match rule.action {
            Action::Delay(ms) => std::thread::sleep(std::time::Duration::from_millis(ms)),
            Action::Panic => panic!("fault injected into {rpc}"),
        }
    }
}

/// Runs the faults configured for `rpc`, if any. A no-op in release builds.
#[cfg(not(debug_assertions))]
pub fn before_work(_rpc: Rpc) {}

#[cfg_attr(not(debug_assertions), allow(dead_code))]
#[derive(Debug, PartialEq)]
struct Rule {
    rpc: String,
    action: Action,
}

#[cfg_attr(not(debug_assertions), allow(dead_code))]
#[derive(Debug, PartialEq)]
enum Action {
    Delay(u64),
    Panic,
}

#[cfg_attr(not(debug_assertions), allow(dead_code))]
fn parse(spec: &str) -> Vec<Rule> {
    spec.split(',')
        .filter(|s| !s.trim().is_empty())
        .filter_map(|rule| {
            let parts: Vec<&str> = rule.trim().split(':').collect();
            let parsed = match parts.as_slice() {
                ["delay", rpc, ms] => ms.parse().ok().map(|ms| Rule {
                    rpc: (*rpc).to_owned(),
                    action: Action::Delay(ms),
                }),
                ["panic", rpc] => Some(Rule {
                    rpc: (*rpc).to_owned(),
                    action: Action::Panic,
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
        let rules = parse("delay:GetPluginInfo:250, panic:Probe,bogus,delay:X:notanumber");
        assert_eq!(
            rules,
            vec![
                Rule {
                    rpc: "GetPluginInfo".into(),
                    action: Action::Delay(250)
                },
                Rule {
                    rpc: "Probe".into(),
                    action: Action::Panic
                },
            ]
        );
    }
}
