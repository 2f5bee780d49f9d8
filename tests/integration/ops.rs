//! Operations: the metrics endpoint, `filevol client`, `filevol pool ls`
//! and `filevol doctor`, against real pools, loop devices and mounts.

use std::path::Path;
use std::process::{Command, Output};

use filevol::ops::requests as req;
use filevol::proto::csi::volume_capability::access_mode::Mode;
use filevol_kit::driver::scrape;
use filevol_kit::node_env::NodeEnv;
use filevol_kit::scratch::pool_on;

use crate::BIN;

#[test]
#[ignore = "needs root"]
fn metrics_count_calls_and_report_the_pool_and_the_node() {
    let env = NodeEnv::with_args(BIN, "xfs", 1024, &["--metrics-address", "127.0.0.1:0"]);
    let address = env.d.metrics_address();
    let id = env.create("scraped", 64, "ext4");
    let cap = req::mount_cap(Mode::SINGLE_NODE_WRITER, "ext4");
    let (staging, target) = (env.staging(&id), env.target("pod-m"));
    let n = env.d.node();
    n.node_stage_volume(&req::stage(&id, &staging, cap.clone()))
        .unwrap();
    n.node_publish_volume(&req::publish(&id, &staging, &target, cap, false))
        .unwrap();
    let _ = env.d.controller().delete_volume(&req::delete("../bad"));

    let text = scrape(&address);
    for expected in [
        "filevol_rpc_requests_total{rpc=\"CreateVolume\",code=\"OK\"} 1",
        "filevol_rpc_requests_total{rpc=\"DeleteVolume\",code=\"INVALID_ARGUMENT\"} 1",
        "filevol_rpc_duration_seconds_count{rpc=\"NodeStageVolume\"} 1",
        "filevol_rpc_duration_seconds_bucket{rpc=\"NodePublishVolume\",le=\"+Inf\"} 1",
        "filevol_pool_volumes 1",
        "filevol_pool_provisioned_bytes 67108864",
        "filevol_volumes_staged 1",
        "filevol_volumes_published 1",
        "filevol_worker_queue_depth 0",
    ] {
        assert!(text.contains(expected), "{expected} missing:\n{text}");
    }
    n.node_unpublish_volume(&req::unpublish(&id, &target))
        .unwrap();
    n.node_unstage_volume(&req::unstage(&id, &staging)).unwrap();
    let text = scrape(&address);
    assert!(
        text.contains("filevol_volumes_staged 0") && text.contains("filevol_volumes_published 0"),
        "{text}"
    );
}

/// The value of the one-line gauge `name` in a scrape.
fn gauge(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
}

/// kubelet's paths for a block volume: staged under `volumeDevices/staging`,
/// published to a file under `volumeDevices/publish` (and, for the pod's
/// view, under `pods/`): neither under the filesystem volumes' directories.
fn block_paths(kubelet: &Path, pv: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let devices = kubelet.join("plugins/kubernetes.io/csi/volumeDevices");
    let staging = devices.join("staging").join(pv);
    let publish = devices.join("publish").join(pv).join("pod-uid-6");
    std::fs::create_dir_all(&staging).unwrap();
    std::fs::create_dir_all(publish.parent().unwrap()).unwrap();
    (staging, publish)
}

#[test]
#[ignore = "needs root"]
fn the_staged_and_published_gauges_count_volumes_by_what_their_mounts_hold() {
    let env = NodeEnv::with_args(BIN, "xfs", 1024, &["--metrics-address", "127.0.0.1:0"]);
    let address = env.d.metrics_address();
    let (c, n) = (env.d.controller(), env.d.node());
    let ext4 = req::mount_cap(Mode::SINGLE_NODE_WRITER, "ext4");
    let block = req::block_cap(Mode::SINGLE_NODE_WRITER);
    let shared = req::mount_cap(Mode::MULTI_NODE_MULTI_WRITER, "");
    let a = env.create("gauge-a", 64, "ext4");
    let b = env.create("gauge-b", 64, "ext4");
    let dev = c
        .create_volume(&req::create_volume("gauge-c", 64 << 20, block.clone()))
        .unwrap()
        .volume
        .unwrap()
        .volume_id;
    let mut r = req::create_with("gauge-d", 64 << 20, &[("layout", "dir")]);
    r.volume_capabilities[0] = shared.clone();
    let dir = c.create_volume(&r).unwrap().volume.unwrap().volume_id;

    let (dev_staging, dev_publish) = block_paths(&env.kubelet, "pv-gauge-c");
    let volumes = [
        (
            &a,
            env.staging(&a),
            ext4.clone(),
            vec![
                env.target("pod-1"),
                env.target("pod-2"),
                env.target("pod-3"),
            ],
        ),
        (
            &b,
            env.staging(&b),
            ext4.clone(),
            vec![env.target("pod-4"), env.target("pod-5")],
        ),
        (
            &dev,
            dev_staging,
            block.clone(),
            vec![dev_publish, env.target("pod-6")],
        ),
        (
            &dir,
            env.staging(&dir),
            shared.clone(),
            vec![env.target("pod-7"), env.target("pod-8")],
        ),
    ];
    for (id, staging, cap, targets) in &volumes {
        n.node_stage_volume(&req::stage(id, staging, cap.clone()))
            .unwrap();
        for t in targets {
            n.node_publish_volume(&req::publish(id, staging, t, cap.clone(), false))
                .unwrap();
        }
    }
    let text = scrape(&address);
    assert_eq!(
        (
            gauge(&text, "filevol_volumes_staged"),
            gauge(&text, "filevol_volumes_published")
        ),
        (4, 9),
        "{text}"
    );

    for (id, staging, _, targets) in &volumes {
        for t in targets {
            n.node_unpublish_volume(&req::unpublish(id, t)).unwrap();
        }
        n.node_unstage_volume(&req::unstage(id, staging)).unwrap();
    }
    let text = scrape(&address);
    assert_eq!(
        (
            gauge(&text, "filevol_volumes_staged"),
            gauge(&text, "filevol_volumes_published")
        ),
        (0, 0),
        "{text}"
    );
}

fn client(socket: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(["client", "--endpoint"])
        .arg(format!("unix://{}", socket.display()))
        .args(args)
        .output()
        .unwrap()
}

fn ok(out: Output) -> String {
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// The first `key: "value"` in protobuf text output.
fn field(text: &str, key: &str) -> String {
    text.lines()
        .find_map(|l| l.trim().strip_prefix(&format!("{key}: \"")))
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or_else(|| panic!("no {key} in:\n{text}"))
        .to_owned()
}

#[test]
#[ignore = "needs root"]
fn the_client_drives_a_whole_lifecycle_and_pool_ls_reports_it() {
    let env = NodeEnv::new(BIN, "xfs", 1024);
    let sock = env.d.socket.clone();
    assert!(ok(client(&sock, &["identity"])).contains("filevol.csi.rs"));
    let created = ok(client(
        &sock,
        &[
            "create-volume",
            "cli-vol",
            "--size",
            "64Mi",
            "--fs-type",
            "xfs",
        ],
    ));
    let id = field(&created, "volume_id");
    assert!(
        created.contains("capacity_bytes: 314572800"),
        "xfs minimum applied:\n{created}"
    );
    assert!(ok(client(&sock, &["list-volumes"])).contains(&id));
    assert!(ok(client(&sock, &["capacity"])).contains("available_capacity"));
    let staging = env.staging(&id);
    let target = env.target("pod-cli");
    let (staging, target) = (staging.to_str().unwrap(), target.to_str().unwrap());
    ok(client(
        &sock,
        &["stage", &id, "--staging-path", staging, "--fs-type", "xfs"],
    ));
    ok(client(
        &sock,
        &[
            "publish",
            &id,
            "--staging-path",
            staging,
            "--target-path",
            target,
            "--fs-type",
            "xfs",
        ],
    ));
    assert!(ok(client(&sock, &["stats", &id, "--volume-path", target])).contains("BYTES"));
    let snap = field(
        &ok(client(
            &sock,
            &["create-snapshot", "cli-snap", "--source", &id],
        )),
        "snapshot_id",
    );
    assert!(ok(client(&sock, &["list-snapshots"])).contains(&snap));

    let pool = env.pool.to_str().unwrap();
    let json = Command::new(BIN)
        .args(["pool", "ls", "--json", "--pool", pool])
        .output()
        .unwrap();
    let report: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(report["volumes"][0]["id"], id.as_str());
    assert_eq!(report["volumes"][0]["kind"], "xfs");
    assert_eq!(report["volumes"][0]["snapshots"], 1);
    assert_eq!(report["snapshots"][0]["method"], "reflink");
    let table = ok(Command::new(BIN)
        .args(["pool", "ls", "--pool", pool])
        .output()
        .unwrap());
    assert!(
        table.contains(&id) && table.contains("cli-vol") && table.contains("300.0 MiB"),
        "{table}"
    );

    ok(client(&sock, &["unpublish", &id, "--target-path", target]));
    ok(client(&sock, &["unstage", &id, "--staging-path", staging]));
    ok(client(&sock, &["delete-snapshot", &snap]));
    ok(client(&sock, &["delete-volume", &id]));
    assert!(ok(client(&sock, &["node-info"])).contains("test-node"));
    let refused = client(&sock, &["delete-volume", "../escape"]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("INVALID_ARGUMENT"));
}

#[test]
#[ignore = "needs root"]
fn doctor_reports_reflink_and_the_tools() {
    for (fs, reflink) in [("xfs", true), ("ext4", false)] {
        let (_fs, pool) = pool_on(fs, 512);
        let kubelet = tempfile::tempdir().unwrap();
        let out = Command::new(BIN)
            .args(["doctor", "--pool"])
            .arg(&pool)
            .arg("--kubelet-dir")
            .arg(kubelet.path())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{text}");
        assert!(text.contains("[ ok ] loop devices"), "{text}");
        assert!(text.contains("[ ok ] tool: blkid found"), "{text}");
        let line = text.lines().find(|l| l.contains("reflink:")).unwrap();
        assert_eq!(line.starts_with("[ ok ]"), reflink, "{fs}: {line}");
        assert!(
            std::fs::read_dir(&pool).unwrap().next().is_none(),
            "doctor left files in the pool"
        );
    }
    // A missing pool is a failure with a fix, and a non-zero exit.
    let out = Command::new(BIN)
        .args(["doctor", "--pool", "/nonexistent/pool"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("[FAIL] pool") && text.contains("fix:"),
        "{text}"
    );
}

fn json_lines(out: Output) -> Vec<serde_json::Value> {
    ok(out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// `filevol client` as a user meets it: stage and publish take the
/// volume's own filesystem when none is given, a clone gets its source's
/// size, the controller publish and node expansion calls finish a lifecycle
/// by hand, and `--json` answers for scripts.
#[test]
#[ignore = "needs root"]
fn the_client_follows_the_volume_and_answers_in_json() {
    let env = NodeEnv::new(BIN, "xfs", 2048);
    let sock = env.d.socket.clone();
    let created = json_lines(client(
        &sock,
        &[
            "--json",
            "create-volume",
            "cli-src",
            "--size",
            "320Mi",
            "--fs-type",
            "xfs",
        ],
    ));
    assert_eq!(created[0]["call"], "CreateVolume");
    let id = created[0]["response"]["volume"]["volumeId"]
        .as_str()
        .unwrap()
        .to_owned();
    let staging = env.staging(&id);
    let target = env.target("pod-cli-json");
    let (staging, target) = (staging.to_str().unwrap(), target.to_str().unwrap());
    ok(client(
        &sock,
        &["controller-publish", &id, "--node-id", "test-node"],
    ));
    // No --fs-type: the volume's own (xfs), from ControllerGetVolume.
    ok(client(&sock, &["stage", &id, "--staging-path", staging]));
    ok(client(
        &sock,
        &[
            "publish",
            &id,
            "--staging-path",
            staging,
            "--target-path",
            target,
        ],
    ));
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    assert!(
        mounts
            .lines()
            .any(|l| l.split(' ').nth(1) == Some(target) && l.split(' ').nth(2) == Some("xfs")),
        "not an xfs mount at {target}"
    );
    ok(client(&sock, &["expand", &id, "640Mi"]));
    let grown = json_lines(client(
        &sock,
        &[
            "--json",
            "node-expand",
            &id,
            "--volume-path",
            target,
            "640Mi",
        ],
    ));
    assert_eq!(grown[0]["response"]["capacityBytes"], 640u64 << 20);
    // A clone with no size gets its source's.
    let clone = json_lines(client(
        &sock,
        &["--json", "create-volume", "cli-clone", "--from-volume", &id],
    ));
    let clone_id = clone[0]["response"]["volume"]["volumeId"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        clone[0]["response"]["volume"]["capacityBytes"],
        640u64 << 20
    );
    ok(client(&sock, &["unpublish", &id, "--target-path", target]));
    ok(client(&sock, &["unstage", &id, "--staging-path", staging]));
    ok(client(
        &sock,
        &["controller-unpublish", &id, "--node-id", "test-node"],
    ));
    ok(client(&sock, &["delete-volume", &clone_id]));
    ok(client(&sock, &["delete-volume", &id]));
    let listed = json_lines(client(&sock, &["--json", "list-volumes"]));
    assert_eq!(listed[0]["response"]["entries"], serde_json::json!([]));

    // `pool ls` on a directory that is not a pool says so.
    let not_a_pool = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args(["pool", "ls", "--pool"])
        .arg(not_a_pool.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is not a filevol pool"), "{err}");

    // `doctor --json`: the checks as a list.
    let out = Command::new(BIN)
        .args(["doctor", "--json", "--pool"])
        .arg(&env.pool)
        .arg("--kubelet-dir")
        .arg(&env.kubelet)
        .output()
        .unwrap();
    let checks: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let reflink = checks
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "reflink")
        .unwrap();
    assert_eq!(reflink["level"], "ok", "{checks}");
}
