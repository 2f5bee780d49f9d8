//! What reaches the log: one line per mutating call, never a secret.

use filevol::proto::csi;
use filevol_kit::driver::{Driver, Opts};

use crate::BIN;

#[test]
fn secrets_never_reach_the_log_even_at_trace() {
    const SECRET: &str = "s3cr3t-value-that-must-not-leak";
    let mut d = Driver::start_with(BIN, Opts::default().args(&["--log-level", "trace"]));

    let mut create = csi::CreateVolumeRequest::new();
    create.name = "pvc-secret-test".into();
    create.secrets.insert("password".into(), SECRET.into());
    create.parameters.insert("layout".into(), "image".into());
    let _ = d.controller().create_volume(&create);

    let mut stage = csi::NodeStageVolumeRequest::new();
    stage.volume_id = "vol-secret-test".into();
    stage.secrets.insert("token".into(), SECRET.into());
    let _ = d.node().node_stage_volume(&stage);

    let mut publish = csi::NodePublishVolumeRequest::new();
    publish.volume_id = "vol-secret-test".into();
    publish.secrets.insert("token".into(), SECRET.into());
    let _ = d.node().node_publish_volume(&publish);

    assert!(d.stop().success());
    let log = d.log();
    // The requests were logged at trace...
    assert!(log.contains("CreateVolume request:"), "{log}");
    assert!(log.contains("pvc-secret-test"), "{log}");
    assert!(log.contains("password"), "the secret's key is shown: {log}");
    assert!(log.contains("NodePublishVolume request:"), "{log}");
    // ...without the secret, anywhere.
    assert!(!log.contains(SECRET), "secret leaked:\n{log}");
}

#[test]
fn one_info_line_per_mutating_call() {
    let mut d = Driver::start(BIN);
    // Deleting a volume that does not exist succeeds (idempotent) and
    // still gets its line.
    let mut req = csi::DeleteVolumeRequest::new();
    req.volume_id = "vol-logged".into();
    let _ = d.controller().delete_volume(&req);
    // Read-only calls stay out of the info log.
    let _ = d
        .identity()
        .get_plugin_info(&csi::GetPluginInfoRequest::new());
    assert!(d.stop().success());
    let log = d.log();
    let lines: Vec<&str> = log.lines().filter(|l| l.contains("DeleteVolume")).collect();
    assert_eq!(lines.len(), 1, "{log}");
    assert!(lines[0].contains("INFO"), "{}", lines[0]);
    assert!(lines[0].contains("volume/vol-logged"), "{}", lines[0]);
    assert!(lines[0].contains("outcome=OK"), "{}", lines[0]);
    assert!(lines[0].contains("duration="), "{}", lines[0]);
    assert!(!log.contains("GetPluginInfo"), "{log}");
}
