//! Identity service over the socket.

use filevol::proto::csi;
use filevol::proto::csi::plugin_capability::service::Type as ServiceType;
use grpcio::RpcStatusCode;

use crate::util::{code, status, Driver, Opts};

fn service_caps(d: &Driver) -> Vec<ServiceType> {
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
    let d = Driver::start();
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
    // provisioner must not be told to look for any.
    let d = Driver::start_with(Opts::default().args(&["--mode", "controller", "--topology="]));
    assert_eq!(service_caps(&d), [ServiceType::CONTROLLER_SERVICE]);
    let n = Driver::start_with(Opts::default().args(&["--mode", "node", "--topology="]));
    let info = n
        .node()
        .node_get_info(&csi::NodeGetInfoRequest::new())
        .unwrap();
    assert!(info.accessible_topology.is_none());
}

#[test]
fn driver_name_is_configurable() {
    let d = Driver::start_with(Opts::default().args(&["--driver-name", "pool-a.filevol.example"]));
    let info = d
        .identity()
        .get_plugin_info(&csi::GetPluginInfoRequest::new())
        .unwrap();
    assert_eq!(info.name, "pool-a.filevol.example");
}

#[test]
fn node_mode_serves_identity_and_node_only() {
    let d = Driver::start_with(Opts::default().args(&["--mode", "node"]));
    assert!(service_caps(&d).is_empty());
    // The Controller service is not registered at all in node mode.
    let err = d
        .controller()
        .controller_get_capabilities(&csi::ControllerGetCapabilitiesRequest::new());
    assert_eq!(code(err), RpcStatusCode::UNIMPLEMENTED);
}

#[test]
fn controller_mode_serves_no_node_service() {
    let d = Driver::start_with(Opts::default().args(&["--mode", "controller"]));
    assert!(service_caps(&d).contains(&ServiceType::CONTROLLER_SERVICE));
    let err = d.node().node_get_info(&csi::NodeGetInfoRequest::new());
    assert_eq!(code(err), RpcStatusCode::UNIMPLEMENTED);
}

#[test]
fn probe_reports_a_vanished_pool() {
    let d = Driver::start();
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
