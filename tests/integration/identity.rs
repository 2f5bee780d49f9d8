//! Identity service over the socket.

use filevol::ops::requests as req;
use filevol::proto::csi;
use filevol::proto::csi::plugin_capability::service::Type as ServiceType;
use filevol_kit::driver::{status, Driver, Opts};
use filevol_kit::scratch::pool_on;
use grpcio::RpcStatusCode;

use crate::BIN;

/// The services advertised, group snapshots aside: those depend on the
/// pool's filesystem (see `group_snapshots_are_advertised_where_the_pool_reflinks`),
/// and these tests run on the temporary directory's.
fn service_caps(d: &Driver) -> Vec<ServiceType> {
    all_service_caps(d)
        .into_iter()
        .filter(|t| *t != ServiceType::GROUP_CONTROLLER_SERVICE)
        .collect()
}

fn all_service_caps(d: &Driver) -> Vec<ServiceType> {
    d.identity()
        .get_plugin_capabilities(&csi::GetPluginCapabilitiesRequest::new())
        .unwrap()
        .capabilities
        .iter()
        .filter(|c| c.has_service())
        .map(|c| c.service().type_.enum_value().unwrap())
        .collect()
}

#[test]
fn plugin_info_and_probe() {
    let d = Driver::start(BIN);
    let info = d
        .identity()
        .get_plugin_info(&csi::GetPluginInfoRequest::new())
        .unwrap();
    assert_eq!(info.name, "filevol.csi.rs");
    assert_eq!(info.vendor_version, env!("CARGO_PKG_VERSION"));
    let probe = d.identity().probe(&csi::ProbeRequest::new()).unwrap();
    assert!(probe.ready.value);
    assert_eq!(
        service_caps(&d),
        [
            ServiceType::CONTROLLER_SERVICE,
            ServiceType::VOLUME_ACCESSIBILITY_CONSTRAINTS
        ]
    );
}

#[test]
fn a_shared_pool_advertises_no_topology() {
    // `--topology=`: no segment, so node plugins report no keys and the
    // provisioner must not be told to look for any. Both processes run on
    // this host, on a local pool: the flag accepts its host-local locks.
    let shared = ["--topology=", "--allow-host-local-locks"];
    let d = Driver::start_with(
        BIN,
        Opts::default()
            .args(&["--mode", "controller"])
            .args(&shared),
    );
    assert_eq!(service_caps(&d), [ServiceType::CONTROLLER_SERVICE]);
    let n = Driver::start_with(BIN, Opts::default().args(&["--mode", "node"]).args(&shared));
    let info = n
        .node()
        .node_get_info(&csi::NodeGetInfoRequest::new())
        .unwrap();
    assert!(info.accessible_topology.is_none());
}

#[test]
fn driver_name_is_configurable() {
    let d = Driver::start_with(
        BIN,
        Opts::default().args(&["--driver-name", "pool-a.filevol.example"]),
    );
    let info = d
        .identity()
        .get_plugin_info(&csi::GetPluginInfoRequest::new())
        .unwrap();
    assert_eq!(info.name, "pool-a.filevol.example");
}

#[test]
fn node_mode_serves_identity_and_node_only() {
    let d = Driver::start_with(BIN, Opts::default().args(&["--mode", "node"]));
    assert!(all_service_caps(&d).is_empty());
    // Controller and group calls are refused with the reason, not gRPC's
    // bare "unknown service".
    let st = status(
        d.controller()
            .controller_get_capabilities(&csi::ControllerGetCapabilitiesRequest::new()),
    );
    assert_eq!(st.code(), RpcStatusCode::UNIMPLEMENTED);
    assert!(
        st.message()
            .contains("--mode node and serves the Identity and Node services only"),
        "{}",
        st.message()
    );
    let st = status(d.controller().create_volume(&req::create("x", 1 << 20)));
    assert_eq!(st.code(), RpcStatusCode::UNIMPLEMENTED, "{}", st.message());
    assert!(
        st.message().contains("--mode controller"),
        "{}",
        st.message()
    );
    let st = status(
        d.group_controller()
            .group_controller_get_capabilities(&csi::GroupControllerGetCapabilitiesRequest::new()),
    );
    assert_eq!(st.code(), RpcStatusCode::UNIMPLEMENTED);
    assert!(st.message().contains("--mode node"), "{}", st.message());
    // Nothing was made.
    assert_eq!(
        std::fs::read_dir(d.pool.join("volumes")).unwrap().count(),
        0
    );
}

#[test]
fn controller_mode_serves_no_node_service() {
    let d = Driver::start_with(BIN, Opts::default().args(&["--mode", "controller"]));
    assert!(service_caps(&d).contains(&ServiceType::CONTROLLER_SERVICE));
    let st = status(d.node().node_get_info(&csi::NodeGetInfoRequest::new()));
    assert_eq!(st.code(), RpcStatusCode::UNIMPLEMENTED);
    assert!(
        st.message().contains("--mode controller") && st.message().contains("node plugin"),
        "{}",
        st.message()
    );
}

/// GROUP_CONTROLLER_SERVICE where the pool can reflink (xfs), and on a pool
/// that cannot (ext4) neither advertised nor served, with the reason.
#[test]
#[ignore = "needs root"]
fn group_snapshots_are_advertised_where_the_pool_reflinks() {
    let (_xfs, pool) = pool_on("xfs", 512);
    let d = Driver::start_on(BIN, &pool, Opts::default());
    assert!(all_service_caps(&d).contains(&ServiceType::GROUP_CONTROLLER_SERVICE));
    let caps = d
        .group_controller()
        .group_controller_get_capabilities(&csi::GroupControllerGetCapabilitiesRequest::new())
        .unwrap();
    assert_eq!(caps.capabilities.len(), 1);
    assert_eq!(
        caps.capabilities[0].rpc().type_.enum_value().unwrap(),
        csi::group_controller_service_capability::rpc::Type::CREATE_DELETE_GET_VOLUME_GROUP_SNAPSHOT
    );

    let (_ext4, pool) = pool_on("ext4", 256);
    let d = Driver::start_on(BIN, &pool, Opts::default());
    let caps = all_service_caps(&d);
    assert!(
        !caps.contains(&ServiceType::GROUP_CONTROLLER_SERVICE),
        "{caps:?}"
    );
    assert!(caps.contains(&ServiceType::CONTROLLER_SERVICE), "{caps:?}");
    let r = req::group_snapshot("g", ["v"]);
    let st = status(d.group_controller().create_volume_group_snapshot(&r));
    assert_eq!(st.code(), RpcStatusCode::UNIMPLEMENTED);
    assert!(st.message().contains("cannot reflink"), "{}", st.message());
    assert_eq!(std::fs::read_dir(pool.join("groups")).unwrap().count(), 0);
    // What exists can still be read and deleted (nothing here: NOT_FOUND,
    // and a delete of nothing succeeds).
    let mut get = csi::GetVolumeGroupSnapshotRequest::new();
    get.group_snapshot_id = "no-such-group".into();
    assert_eq!(
        status(d.group_controller().get_volume_group_snapshot(&get)).code(),
        RpcStatusCode::NOT_FOUND
    );
    let mut delete = csi::DeleteVolumeGroupSnapshotRequest::new();
    delete.group_snapshot_id = "no-such-group".into();
    d.group_controller()
        .delete_volume_group_snapshot(&delete)
        .unwrap();
}

#[test]
fn probe_reports_a_vanished_pool() {
    let d = Driver::start(BIN);
    let moved = d.pool.with_extension("moved");
    std::fs::rename(&d.pool, &moved).unwrap();
    let st = status(d.identity().probe(&csi::ProbeRequest::new()));
    assert_eq!(st.code(), RpcStatusCode::FAILED_PRECONDITION);
    assert!(
        st.message().contains(&d.pool.display().to_string()),
        "{}",
        st.message()
    );
    std::fs::rename(&moved, &d.pool).unwrap();
    assert!(
        d.identity()
            .probe(&csi::ProbeRequest::new())
            .unwrap()
            .ready
            .value
    );
}
