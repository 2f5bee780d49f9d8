//! The worker pool, back-pressure, per-volume locking and the probe lane,
//! seen from a client. Calls are held on a worker for a known time with the
//! debug build's fault injection (`FILEVOL_FAULTS=delay:<Rpc>:<ms>`).

use std::thread;
use std::time::{Duration, Instant};

use filevol::proto::csi;
use filevol_kit::driver::{code, Driver, Opts};
use grpcio::{CallOption, RpcStatusCode};

use crate::BIN;

/// Starts a GetPluginInfo call in the background; its outcome's code (OK
/// for success) arrives on the returned channel.
fn call_in_background(d: &Driver) -> crossbeam_channel::Receiver<RpcStatusCode> {
    let client = d.identity();
    let (tx, rx) = crossbeam_channel::bounded(1);
    thread::spawn(move || {
        let code = match client.get_plugin_info(&csi::GetPluginInfoRequest::new()) {
            Ok(_) => RpcStatusCode::OK,
            Err(e) => code::<()>(Err(e)),
        };
        let _ = tx.send(code);
    });
    rx
}

#[test]
fn full_queue_answers_resource_exhausted_then_recovers() {
    // Each GetPluginInfo holds its worker for 4 s. With 2 workers and 2
    // queue slots, exactly 4 calls fit; the calls are sent one by one, a
    // quarter second apart, so each accepted one has been picked up by an
    // idle worker (or queued) before the next arrives.
    let d = Driver::start_with(
        BIN,
        Opts::default()
            .args(&["--workers", "2", "--queue-depth", "2"])
            .faults("delay:GetPluginInfo:4000"),
    );
    let mut accepted = Vec::new();
    let refused = loop {
        let call = call_in_background(&d);
        match call.recv_timeout(Duration::from_millis(250)) {
            Err(_) => accepted.push(call), // still running: it got a place
            Ok(code) => break code,
        }
        assert!(
            accepted.len() <= 4,
            "more calls accepted than workers + queue"
        );
    };
    assert_eq!(refused, RpcStatusCode::RESOURCE_EXHAUSTED);
    assert_eq!(accepted.len(), 4);

    // Saturated: Probe, on its own lane, still answers at once.
    let probe = d
        .identity()
        .probe_opt(
            &csi::ProbeRequest::new(),
            CallOption::default().timeout(Duration::from_secs(1)),
        )
        .expect("probe answers while every worker is busy");
    assert!(probe.ready.value);

    // Every accepted call completes.
    for call in accepted {
        assert_eq!(
            call.recv_timeout(Duration::from_secs(20)).unwrap(),
            RpcStatusCode::OK
        );
    }
    // Recovered: the pool takes work again.
    d.identity()
        .get_plugin_info(&csi::GetPluginInfoRequest::new())
        .expect("accepted after the queue drained");
}

#[test]
fn same_volume_is_serialised_while_other_volumes_proceed() {
    // A ControllerExpandVolume on vol-a holds vol-a's lock (and one worker)
    // for 2 s. Other calls are not delayed.
    let d = Driver::start_with(
        BIN,
        Opts::default()
            .args(&["--workers", "4"])
            .faults("delay:ControllerExpandVolume:2000"),
    );
    let controller = d.controller();
    let slow = thread::spawn(move || {
        let mut req = csi::ControllerExpandVolumeRequest::new();
        req.volume_id = "vol-a".into();
        req.capacity_range = Some(csi::CapacityRange::new()).into();
        let r = controller.controller_expand_volume(&req);
        (Instant::now(), r.map(|_| ()))
    });
    thread::sleep(Duration::from_millis(300));

    let delete = |id: &str| {
        let mut req = csi::DeleteVolumeRequest::new();
        req.volume_id = id.into();
        d.controller().delete_volume(&req).map(|_| ())
    };
    // Same volume: ABORTED at once, so the CO retries later.
    assert_eq!(code(delete("vol-a")), RpcStatusCode::ABORTED);
    // Another volume goes straight through (deleting a volume that does
    // not exist succeeds).
    delete("vol-b").expect("vol-b is not held");
    let other_done = Instant::now();

    let (slow_done, slow_result) = slow.join().unwrap();
    assert_eq!(code(slow_result), RpcStatusCode::NOT_FOUND);
    assert!(
        other_done < slow_done,
        "vol-b waited for vol-a's call to finish"
    );
    // vol-a's lock is released with its call.
    delete("vol-a").expect("vol-a released");
}

#[test]
fn panic_in_a_call_answers_internal_and_keeps_the_worker() {
    let d = Driver::start_with(
        BIN,
        Opts::default()
            .args(&["--workers", "1"])
            .faults("panic:GetPluginCapabilities"),
    );
    let err = d
        .identity()
        .get_plugin_capabilities(&csi::GetPluginCapabilitiesRequest::new());
    assert_eq!(code(err), RpcStatusCode::INTERNAL);
    // The only worker is still there to run the next call.
    d.identity()
        .get_plugin_info(&csi::GetPluginInfoRequest::new())
        .expect("the worker survived the panic");
    assert!(
        d.identity()
            .probe(&csi::ProbeRequest::new())
            .unwrap()
            .ready
            .value
    );
}
