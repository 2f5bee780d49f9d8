//! `filevol bench` against a real driver: every scenario leaves nothing
//! behind (no mount, no loop device, no volume, no directory of its own
//! under the kubelet directory), whatever the driver answers, and a run
//! that cannot undo what it made, has nothing to run on, or had calls
//! refused or failed, exits non-zero with the reason.

use std::process::{Command, Output};

use filevol_kit::node_env::NodeEnv;

use crate::BIN;

fn bench(env: &NodeEnv, scenario: &str, extra: &[&str]) -> Output {
    Command::new(BIN)
        .args(["bench", "--endpoint"])
        .arg(format!("unix://{}", env.d.socket.display()))
        .arg("--kubelet-dir")
        .arg(&env.kubelet)
        .args([
            "--scenario",
            scenario,
            "--size",
            "16Mi",
            "--fs-type",
            "ext4",
        ])
        .args(["--timeout", "60"])
        .args(extra)
        .output()
        .expect("run filevol bench")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Nothing of the run is left: no `bench-*` directory, no volume in the
/// pool. (Mounts and loop devices are checked when `env` is dropped.)
fn nothing_left(env: &NodeEnv) {
    let dirs: Vec<_> = std::fs::read_dir(&env.kubelet)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("bench-"))
        .collect();
    assert!(dirs.is_empty(), "left under the kubelet dir: {dirs:?}");
    let volumes = std::fs::read_dir(env.pool.join("volumes")).unwrap().count();
    assert_eq!(volumes, 0, "volumes left in the pool");
}

#[test]
#[ignore = "needs root"]
fn every_scenario_cleans_up_after_itself() {
    let env = NodeEnv::new(BIN, "xfs", 2048);
    // (scenario, flags, completed units of work expected)
    for (scenario, extra, expected) in [
        (
            "lifecycle",
            &["--volumes", "6", "--concurrency", "3"][..],
            6,
        ),
        (
            "publish-storm",
            &["--volumes", "3", "--concurrency", "3", "--cycles", "4"][..],
            12,
        ),
        // Half the threads on one hot volume: its publishes and unpublishes
        // meet ABORTED, which the tool must ask again, not leave mounted.
        (
            "contention",
            &["--volumes", "4", "--concurrency", "6", "--cycles", "8"][..],
            4,
        ),
    ] {
        let out = bench(&env, scenario, &[extra, &["--json"]].concat());
        assert!(out.status.success(), "{scenario}: {}", text(&out));
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(report["lifecycles"], expected, "{scenario}: {report}");
        assert_eq!(
            report["left_behind"],
            serde_json::json!([]),
            "{scenario}: {report}"
        );
        assert!(
            report["rpcs"]["NodePublishVolume"]["calls"]
                .as_u64()
                .unwrap()
                >= expected,
            "{scenario}: {report}"
        );
        nothing_left(&env);
    }
}

/// Every CreateVolume refused (an unknown parameter): the storm and the
/// contention scenario have nothing to run on, and say so; no panic, no
/// "check failed".
#[test]
#[ignore = "needs root"]
fn a_load_with_nothing_to_run_on_says_why() {
    let env = NodeEnv::new(BIN, "xfs", 1024);
    for scenario in ["publish-storm", "contention"] {
        let out = bench(&env, scenario, &["--volumes", "2", "--param", "bogus=1"]);
        assert!(!out.status.success(), "{scenario}: {}", text(&out));
        let t = text(&out);
        assert!(t.contains("nothing to run the load on"), "{scenario}: {t}");
        assert!(
            t.contains("CreateVolume INVALID_ARGUMENT"),
            "{scenario}: {t}"
        );
        assert!(!t.contains("panicked"), "{scenario}: {t}");
        nothing_left(&env);
    }
}

/// A driver that never deletes (every DeleteVolume panics, answered
/// INTERNAL): the run reports what it left and exits non-zero.
#[test]
#[ignore = "needs root"]
fn a_run_that_cannot_clean_up_fails_and_lists_what_is_left() {
    let env = NodeEnv::with_opts(BIN, "xfs", 1024, |o| o.faults("panic:DeleteVolume"));
    let out = bench(&env, "lifecycle", &["--volumes", "2", "--concurrency", "1"]);
    assert!(!out.status.success(), "{}", text(&out));
    let t = text(&out);
    assert!(t.contains("left behind: volume "), "{t}");
    assert!(t.contains("could not be cleaned up"), "{t}");
    // Everything but the volumes themselves was undone, the run's
    // directory included.
    let dirs = std::fs::read_dir(&env.kubelet)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("bench-"))
        .count();
    assert_eq!(dirs, 0, "{t}");
}

/// A driver that refuses every ControllerPublishVolume (each panics,
/// answered INTERNAL): no scenario has anything to measure, so each exits
/// non-zero naming the refused call, and leaves nothing behind (no volume,
/// no directory; no mount or loop device, checked when `env` is dropped).
#[test]
#[ignore = "needs root"]
fn a_refused_controller_publish_fails_the_run_and_leaves_nothing() {
    let env = NodeEnv::with_opts(BIN, "xfs", 1024, |o| {
        o.faults("panic:ControllerPublishVolume")
    });
    for scenario in ["lifecycle", "publish-storm", "contention"] {
        let out = bench(&env, scenario, &["--volumes", "2", "--concurrency", "2"]);
        let t = text(&out);
        assert!(!out.status.success(), "{scenario}: {t}");
        // The reason is in the error itself, not only in the report.
        let error = String::from_utf8_lossy(&out.stderr);
        assert!(
            error.contains("ControllerPublishVolume INTERNAL"),
            "{scenario}: {t}"
        );
        assert!(!t.contains("left behind"), "{scenario}: {t}");
        assert!(!t.contains("panicked"), "{scenario}: {t}");
        nothing_left(&env);
    }
}
