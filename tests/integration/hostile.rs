//! Hostile clients: overlong fields, oversized and malformed messages,
//! connections that never speak, thousands of connections. The driver must
//! refuse what it must, keep serving everyone else, and keep its memory
//! bounded.

use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use filevol::ops::requests::{self as req, MIB};
use filevol::ops::stats::memory_kib;
use filevol::proto::csi;
use filevol_kit::driver::{code, Driver, Opts};
use grpcio::{CallOption, ChannelBuilder, EnvBuilder, RpcStatusCode};

use crate::BIN;

fn rss_kib(pid: u32) -> u64 {
    memory_kib(pid, "VmRSS").unwrap()
}

fn probe_quickly(d: &Driver) {
    let started = Instant::now();
    let r = d.identity().probe_opt(
        &csi::ProbeRequest::new(),
        CallOption::default().timeout(Duration::from_secs(5)),
    );
    assert!(r.is_ok(), "probe failed: {r:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

/// Sends `payload` as the body of a call to `method`, bypassing protobuf
/// encoding on the client side.
fn raw_call(d: &Driver, method: &'static str, payload: Vec<u8>) -> grpcio::Result<Vec<u8>> {
    // The marshaller signature is fixed by grpcio: `fn(&T, ...)` with T = Vec<u8>.
    #[allow(clippy::ptr_arg)]
    fn ser(v: &Vec<u8>, buf: &mut grpcio::GrpcSlice) -> grpcio::Result<()> {
        *buf = grpcio::GrpcSlice::from(v.clone());
        Ok(())
    }
    fn de(mut r: grpcio::MessageReader) -> grpcio::Result<Vec<u8>> {
        let mut out = Vec::new();
        std::io::Read::read_to_end(&mut r, &mut out)
            .map_err(|e| grpcio::Error::Codec(Box::new(e)))?;
        Ok(out)
    }
    let m = grpcio::Method {
        ty: grpcio::MethodType::Unary,
        name: method,
        req_mar: grpcio::Marshaller { ser, de },
        resp_mar: grpcio::Marshaller { ser, de },
    };
    let env = Arc::new(EnvBuilder::new().cq_count(1).build());
    let ch = ChannelBuilder::new(env)
        .max_send_message_len(64 << 20)
        .connect(&format!("unix:{}", d.socket.display()));
    grpcio::Client::new(ch).unary_call(
        &m,
        &payload,
        CallOption::default().timeout(Duration::from_secs(10)),
    )
}

#[test]
fn overlong_and_oversized_requests_are_refused_and_change_nothing() {
    let d = Driver::start(BIN);
    let c = d.controller();
    // Overlong fields: refused by validation.
    assert_eq!(
        code(c.create_volume(&req::create(&"n".repeat(4096), 8 * MIB))),
        RpcStatusCode::INVALID_ARGUMENT
    );
    assert_eq!(
        code(c.delete_volume(&req::delete(&"v".repeat(100_000)))),
        RpcStatusCode::INVALID_ARGUMENT
    );
    // A message over the 1 MiB receive limit never reaches filevol's code.
    let mut huge = req::create("huge", 8 * MIB);
    huge.parameters.insert("layout".into(), "x".repeat(2 << 20));
    assert_eq!(
        code(c.create_volume(&huge)),
        RpcStatusCode::RESOURCE_EXHAUSTED
    );
    assert_eq!(
        std::fs::read_dir(d.pool.join("volumes")).unwrap().count(),
        0
    );
    probe_quickly(&d);
}

#[test]
fn malformed_and_deeply_nested_messages_do_not_hurt_the_server() {
    let d = Driver::start(BIN);
    // Not protobuf at all.
    assert!(raw_call(&d, "/csi.v1.Controller/CreateVolume", vec![0xff; 64]).is_err());
    // 10,000 levels of nested length-delimited unknown fields (field 99):
    // beyond the parser's recursion limit.
    let mut nested: Vec<u8> = Vec::new();
    for _ in 0..10_000 {
        let mut outer = vec![0x9a, 0x06]; // field 99, wire type 2
        let mut len = nested.len();
        loop {
            let byte = (len & 0x7f) as u8;
            len >>= 7;
            if len == 0 {
                outer.push(byte);
                break;
            }
            outer.push(byte | 0x80);
        }
        outer.extend_from_slice(&nested);
        nested = outer;
        if nested.len() > 900_000 {
            break;
        }
    }
    assert!(raw_call(&d, "/csi.v1.Controller/CreateVolume", nested).is_err());
    // A method that does not exist.
    assert!(raw_call(&d, "/csi.v1.Controller/Nope", vec![]).is_err());
    probe_quickly(&d);
    let mut r = req::create("after-garbage", 8 * MIB);
    r.parameters.insert("layout".into(), "image".into());
    d.controller().create_volume(&r).expect("still serving");
}

#[test]
fn silent_and_numerous_connections_neither_block_nor_bloat_the_server() {
    let d = Driver::start_with(
        BIN,
        Opts::default().args(&["--grpc-handshake-timeout", "2"]),
    );
    let before = rss_kib(d.pid());
    // A thousand connections that never send a byte.
    let idle: Vec<UnixStream> = (0..1000)
        .map(|_| UnixStream::connect(&d.socket).unwrap())
        .collect();
    probe_quickly(&d);
    d.controller()
        .create_volume(&req::create("amid-idle", 8 * MIB))
        .expect("served while a thousand connections sit idle");
    let during = rss_kib(d.pid());
    assert!(
        during < before + 64 * 1024,
        "RSS grew from {before} KiB to {during} KiB with 1000 idle connections"
    );
    // The server drops connections that never finish their handshake.
    std::thread::sleep(Duration::from_secs(4));
    let mut closed = 0;
    for mut s in idle {
        s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let mut buf = [0u8; 256];
        // Whatever the server said first (its SETTINGS frame), then EOF.
        for _ in 0..8 {
            match std::io::Read::read(&mut s, &mut buf) {
                Ok(0) => {
                    closed += 1;
                    break;
                }
                Ok(_) => continue,
                Err(_) => break,
            }
        }
    }
    assert!(
        closed >= 990,
        "only {closed} of 1000 silent connections were closed"
    );
    probe_quickly(&d);
}
