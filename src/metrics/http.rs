//! A small synchronous HTTP server for `/metrics`. No async runtime, no HTTP
//! framework: Prometheus needs a GET and one response per connection.
//!
//! Anything on the pod network can connect, so the server is built so that
//! one slow or hostile client cannot hold the endpoint, and no number of
//! clients makes it use unbounded memory or threads:
//!
//! - **A deadline per request**, not per read: the request line and headers
//!   must arrive within [`Limits::read_deadline`] (5 s) of accept. Each read
//!   waits at most the time left, so a client trickling a byte a second is
//!   cut off when the deadline passes instead of being kept alive by every
//!   byte. Writing the response has its own deadline,
//!   [`Limits::write_deadline`].
//! - **A header size limit**: request line and headers together get
//!   [`Limits::max_header_bytes`] (8 KiB), one buffer of that size per
//!   handler. A request that fills it without ending is answered
//!   `431 Request Header Fields Too Large` and nothing more is read.
//! - **A fixed set of handlers**: one accept thread hands connections to
//!   [`Limits::handlers`] (4) threads through a queue of
//!   [`Limits::queue`] (4). When every handler is busy and the queue is
//!   full, the new connection is answered `503 Service Unavailable` at once
//!   and closed: it neither waits nor gets a thread of its own.
//!
//! So a scrape is answered at once while fewer slow clients than handlers
//! are connected; enough of them to fill every handler and the queue make
//! scrapes fail fast with 503, never hang, until their deadlines pass.
//! Dropping the server stops and joins every thread.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError};

use crate::error::message_chain;

/// The longest one blocking read or write waits before its thread looks at
/// the deadline and the stop flag again: how long Drop can wait for a
/// handler in the middle of a slow connection.
const SLICE: Duration = Duration::from_millis(100);

/// What a handler throws away, at most, of a request it did not read before
/// closing (only what has already arrived; it never waits for more).
/// Closing a socket with unread data sends a reset, and a reset can make
/// the client lose the response it was sent.
const DRAIN_BYTES: usize = 64 * 1024;

/// The content type of every answer but the metrics.
const TEXT: &str = "text/plain; charset=utf-8";
/// The content type of the Prometheus text format.
const PROMETHEUS: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The bounds the server keeps to. [`MetricsServer::start`] uses the
/// defaults: 5 s to read, 5 s to write, 8 KiB of headers, 4 handlers and a
/// queue of 4.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Time from accept for the request line and every header to arrive.
    pub read_deadline: Duration,
    /// Time the response may take to be written.
    pub write_deadline: Duration,
    /// Bytes the request line and headers may take together.
    pub max_header_bytes: usize,
    /// Threads serving connections, so connections served at once (at
    /// least one).
    pub handlers: usize,
    /// Accepted connections that may wait for a handler; the next one is
    /// answered 503 (0: only when a handler is idle).
    pub queue: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            read_deadline: Duration::from_secs(5),
            write_deadline: Duration::from_secs(5),
            max_header_bytes: 8 * 1024,
            handlers: 4,
            queue: 4,
        }
    }
}

/// What renders the metrics text; called by every handler.
type Render = dyn Fn() -> String + Send + Sync;

/// A connection and when it was accepted (its deadline counts from then,
/// time in the queue included).
type Accepted = (TcpStream, Instant);

/// State the server's threads share.
#[derive(Debug, Default)]
struct Shared {
    /// Set by Drop: threads finish what they are doing and return.
    stop: AtomicBool,
    /// Handlers serving a connection now.
    busy: AtomicUsize,
}

/// A running metrics server.
#[derive(Debug)]
pub struct MetricsServer {
    /// Where it listens.
    address: SocketAddr,
    /// The stop flag and the busy count, shared with the threads.
    shared: Arc<Shared>,
    /// The accept thread and the handlers, joined on Drop.
    threads: Vec<JoinHandle<()>>,
}

/// Why a connection ended without a response.
#[derive(Debug, thiserror::Error)]
enum Dropped {
    #[error("request line and headers not complete by the deadline")]
    ReadDeadline,
    #[error("response not written by the deadline")]
    WriteDeadline,
    #[error("client closed before the end of its headers")]
    Closed,
    #[error("server stopping")]
    Stopping,
    #[error("reading the request")]
    Read(#[source] io::Error),
    #[error("writing the response")]
    Write(#[source] io::Error),
}

/// What arrived before the blank line.
#[derive(Debug)]
enum Head {
    /// The request line (the headers are not needed).
    Complete(String),
    /// The limit was reached without the end of the headers.
    TooLarge,
}

impl MetricsServer {
    /// Listens on `address` and answers `GET /metrics` with `render()`,
    /// within the default [`Limits`].
    pub fn start(
        address: &str,
        render: impl Fn() -> String + Send + Sync + 'static,
    ) -> io::Result<MetricsServer> {
        MetricsServer::start_with(address, Limits::default(), render)
    }

    /// [`MetricsServer::start`] within `limits`.
    pub fn start_with(
        address: &str,
        limits: Limits,
        render: impl Fn() -> String + Send + Sync + 'static,
    ) -> io::Result<MetricsServer> {
        let listener = TcpListener::bind(address)?;
        let address = listener.local_addr()?;
        let handlers = limits.handlers.max(1);
        let mut server = MetricsServer {
            address,
            shared: Arc::new(Shared::default()),
            threads: Vec::with_capacity(handlers + 1),
        };
        let (sender, receiver) = crossbeam_channel::bounded::<Accepted>(limits.queue);
        // The accept thread owns the only sender: when it returns, the
        // handlers' queue disconnects and they return too. Should a spawn
        // below fail, dropping `server` stops the threads already started.
        let shared = Arc::clone(&server.shared);
        server.threads.push(
            std::thread::Builder::new()
                .name("filevol-metrics".into())
                .spawn(move || accept_loop(&listener, &sender, &shared))?,
        );
        let render: Arc<Render> = Arc::new(render);
        for i in 0..handlers {
            let (receiver, shared, render) = (
                receiver.clone(),
                Arc::clone(&server.shared),
                Arc::clone(&render),
            );
            server.threads.push(
                std::thread::Builder::new()
                    .name(format!("filevol-metrics-{i}"))
                    .spawn(move || handle_loop(&receiver, &shared, &*render, limits))?,
            );
        }
        Ok(server)
    }

    /// Where it listens.
    pub fn address(&self) -> SocketAddr {
        self.address
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let mut wake = self.address;
        if wake.ip().is_unspecified() {
            wake.set_ip(match wake.ip() {
                IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
            });
        }
        let _ = TcpStream::connect_timeout(&wake, Duration::from_millis(200));
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Accepts connections and queues them for the handlers, or answers 503
/// when the queue is full. Never waits on a client.
fn accept_loop(listener: &TcpListener, sender: &Sender<Accepted>, shared: &Shared) {
    for conn in listener.incoming() {
        if shared.stop.load(Ordering::SeqCst) {
            break;
        }
        let stream = match conn {
            Ok(stream) => stream,
            Err(e) => {
                log::debug!("metrics: accept: {e}");
                // Out of file descriptors, say: do not spin on it.
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        match sender.try_send((stream, Instant::now())) {
            Ok(()) => {}
            Err(TrySendError::Full((stream, _))) => {
                log::debug!(
                    "metrics: {} handlers busy and {} connections waiting: answering 503",
                    shared.busy.load(Ordering::SeqCst),
                    sender.len()
                );
                refuse(stream);
            }
            // Every handler is gone: nothing left to serve.
            Err(TrySendError::Disconnected(_)) => break,
        }
    }
}

/// Answers 503 and closes, without blocking: a fresh socket's send buffer
/// takes the few bytes at once, and if it does not the client gets nothing.
fn refuse(stream: TcpStream) {
    if stream.set_nonblocking(true).is_ok() {
        let _ = (&stream).write_all(&response(
            "503 Service Unavailable",
            TEXT,
            "busy: try again\n",
        ));
    }
    close(stream);
}

/// Serves queued connections until the accept thread is gone.
fn handle_loop(receiver: &Receiver<Accepted>, shared: &Shared, render: &Render, limits: Limits) {
    for (stream, accepted) in receiver.iter() {
        if shared.stop.load(Ordering::SeqCst) {
            continue;
        }
        shared.busy.fetch_add(1, Ordering::SeqCst);
        let peer = stream
            .peer_addr()
            .map_or_else(|_| "?".to_owned(), |a| a.to_string());
        if let Err(e) = serve(stream, accepted, shared, render, limits) {
            log::debug!("metrics: {peer}: {}", message_chain(&e));
        }
        shared.busy.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Reads one request, writes its response and closes.
fn serve(
    stream: TcpStream,
    accepted: Instant,
    shared: &Shared,
    render: &Render,
    limits: Limits,
) -> Result<(), Dropped> {
    let deadline = accepted + limits.read_deadline;
    let head = read_head(&stream, deadline, limits.max_header_bytes, &shared.stop)?;
    let response = answer(&head, render);
    let deadline = Instant::now() + limits.write_deadline;
    let mut rest = &response[..];
    while !rest.is_empty() {
        let wait = time_left(deadline, &shared.stop, Dropped::WriteDeadline)?;
        stream
            .set_write_timeout(Some(wait))
            .map_err(Dropped::Write)?;
        match (&stream).write(rest) {
            Ok(0) => return Err(Dropped::Write(io::ErrorKind::WriteZero.into())),
            Ok(n) => rest = &rest[n..],
            Err(e) if waited(&e) => {}
            Err(e) => return Err(Dropped::Write(e)),
        }
    }
    close(stream);
    Ok(())
}

/// Reads up to the blank line that ends the headers, at most `limit` bytes,
/// by `deadline`.
fn read_head(
    mut stream: &TcpStream,
    deadline: Instant,
    limit: usize,
    stop: &AtomicBool,
) -> Result<Head, Dropped> {
    let mut buf = vec![0; limit];
    let (mut len, mut searched) = (0, 0);
    loop {
        // Look at the new bytes only (and the three before them, where a
        // blank line may have begun), not the whole buffer for every byte a
        // trickling client sends.
        if let Some(end) = end_of_head(&buf[..len], searched) {
            let line = buf[..end].split(|b| *b == b'\n').next().unwrap_or(&[]);
            return Ok(Head::Complete(
                String::from_utf8_lossy(line).trim().to_owned(),
            ));
        }
        if len == limit {
            return Ok(Head::TooLarge);
        }
        searched = len.saturating_sub(3);
        let wait = time_left(deadline, stop, Dropped::ReadDeadline)?;
        stream.set_read_timeout(Some(wait)).map_err(Dropped::Read)?;
        match stream.read(&mut buf[len..]) {
            Ok(0) => return Err(Dropped::Closed),
            Ok(n) => len += n,
            Err(e) if waited(&e) => {}
            Err(e) => return Err(Dropped::Read(e)),
        }
    }
}

/// Where the headers in `buf` end (after `\r\n\r\n`, or a bare `\n\n`),
/// looking from `from` on.
fn end_of_head(buf: &[u8], from: usize) -> Option<usize> {
    (from..buf.len()).find_map(|i| {
        let rest = &buf[i..];
        if rest.starts_with(b"\r\n\r\n") {
            Some(i + 4)
        } else if rest.starts_with(b"\n\n") {
            Some(i + 2)
        } else {
            None
        }
    })
}

/// How long the next read or write may wait: the time left before
/// `deadline`, at most [`SLICE`]; `late` once it has passed, `Stopping` when
/// the server is.
fn time_left(deadline: Instant, stop: &AtomicBool, late: Dropped) -> Result<Duration, Dropped> {
    if stop.load(Ordering::SeqCst) {
        return Err(Dropped::Stopping);
    }
    match deadline.saturating_duration_since(Instant::now()) {
        left if left.is_zero() => Err(late),
        left => Ok(left.min(SLICE)),
    }
}

/// Whether `e` only says a timed read or write waited its time out.
fn waited(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

/// The response to `head`.
fn answer(head: &Head, render: &Render) -> Vec<u8> {
    let line = match head {
        Head::TooLarge => {
            return response(
                "431 Request Header Fields Too Large",
                TEXT,
                "request line and headers too large\n",
            )
        }
        Head::Complete(line) => line,
    };
    let mut parts = line.split_whitespace();
    match (parts.next().unwrap_or(""), parts.next().unwrap_or("")) {
        // A panic while rendering costs this one response, not a handler.
        ("GET", "/metrics") => match panic::catch_unwind(AssertUnwindSafe(render)) {
            Ok(body) => response("200 OK", PROMETHEUS, &body),
            Err(_) => {
                log::warn!("metrics: rendering the metrics panicked");
                response(
                    "500 Internal Server Error",
                    TEXT,
                    "rendering the metrics failed\n",
                )
            }
        },
        ("GET", _) => response(
            "404 Not Found",
            TEXT,
            "not found: filevol serves /metrics\n",
        ),
        _ => response("405 Method Not Allowed", TEXT, "only GET\n"),
    }
}

/// A whole HTTP/1.1 response that closes the connection.
fn response(status: &str, content_type: &str, body: &str) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body.as_bytes());
    out
}

/// Closes after a response: a FIN after the response first, then what the
/// client sent that was not read is thrown away, as far as it has arrived
/// (never waiting, at most [`DRAIN_BYTES`]), so the close is not a reset.
fn close(stream: TcpStream) {
    let _ = stream.shutdown(Shutdown::Write);
    if stream.set_nonblocking(true).is_ok() {
        let mut scratch = [0; 4096];
        let mut drained = 0;
        while drained < DRAIN_BYTES {
            match (&stream).read(&mut scratch) {
                Ok(n) if n > 0 => drained += n,
                _ => break,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Longer than anything here should take, however loaded the machine:
    /// a server that does not answer fails the test instead of hanging it.
    const PATIENCE: Duration = Duration::from_secs(10);

    /// Sends `request` and reads the whole answer.
    fn send(addr: SocketAddr, request: &[u8]) -> io::Result<String> {
        let mut s = TcpStream::connect(addr)?;
        s.set_read_timeout(Some(PATIENCE))?;
        s.write_all(request)?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    }

    fn get(addr: SocketAddr, path: &str) -> String {
        send(
            addr,
            format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
        )
        .unwrap()
    }

    fn up() -> String {
        "filevol_up 1\n".into()
    }

    /// A connection that sends a request line, then one byte every 300 ms
    /// and never the end of its headers, until the server closes it or
    /// `PATIENCE` runs out. Returns how long after connecting it was closed.
    fn trickle(addr: SocketAddr) -> Option<Duration> {
        let started = Instant::now();
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\n").unwrap();
        s.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        while started.elapsed() < PATIENCE {
            if s.write_all(b"X").is_err() {
                return Some(started.elapsed());
            }
            match s.read(&mut [0; 512]) {
                Ok(0) => return Some(started.elapsed()),
                Ok(_) => panic!("an answer to headers that never ended"),
                Err(e) if waited(&e) => {}
                Err(_) => return Some(started.elapsed()),
            }
        }
        None
    }

    /// Waits until `n` handlers are serving a connection.
    fn wait_busy(server: &MetricsServer, n: usize) {
        let started = Instant::now();
        while server.shared.busy.load(Ordering::SeqCst) != n {
            assert!(started.elapsed() < PATIENCE, "never {n} handlers busy");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn serves_metrics_and_refuses_the_rest() {
        let server = MetricsServer::start("127.0.0.1:0", up).unwrap();
        let ok = get(server.address(), "/metrics");
        assert!(ok.starts_with("HTTP/1.1 200 OK"), "{ok}");
        assert!(ok.ends_with("filevol_up 1\n"));
        assert!(get(server.address(), "/").starts_with("HTTP/1.1 404"));
        let post = send(server.address(), b"POST /metrics HTTP/1.1\r\n\r\n").unwrap();
        assert!(post.starts_with("HTTP/1.1 405"), "{post}");
        // A client that connects and says nothing holds one handler, not
        // the server.
        let _idle = TcpStream::connect(server.address()).unwrap();
        assert!(get(server.address(), "/metrics").contains("200 OK"));
    }

    #[test]
    fn a_trickling_client_does_not_hold_up_a_scrape() {
        let server = MetricsServer::start("127.0.0.1:0", up).unwrap();
        let address = server.address();
        let slow = std::thread::spawn(move || trickle(address));
        wait_busy(&server, 1);
        let mut s = TcpStream::connect(server.address()).unwrap();
        // Well inside the 5 s deadline the trickling client is still under.
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        write!(s, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut out = String::new();
        let read = s.read_to_string(&mut out);
        assert!(read.is_ok(), "no answer while a client trickles: {read:?}");
        assert!(out.starts_with("HTTP/1.1 200 OK"), "{out}");
        drop(server);
        slow.join().unwrap();
    }

    #[test]
    fn a_trickling_client_is_dropped_at_the_deadline() {
        let limits = Limits {
            read_deadline: Duration::from_secs(1),
            ..Limits::default()
        };
        let server = MetricsServer::start_with("127.0.0.1:0", limits, up).unwrap();
        let closed = trickle(server.address()).expect("still open after 10 s");
        // Never before the deadline; the margin is for a loaded machine.
        assert!(
            closed >= Duration::from_secs(1) && closed < Duration::from_secs(5),
            "closed after {closed:?}"
        );
        assert!(get(server.address(), "/metrics").contains("200 OK"));
    }

    #[test]
    fn headers_over_the_limit_are_refused() {
        let server = MetricsServer::start("127.0.0.1:0", up).unwrap();
        let request = |header_bytes: usize| {
            let value = "a".repeat(header_bytes);
            send(
                server.address(),
                format!("GET /metrics HTTP/1.1\r\nX-Big: {value}\r\n\r\n").as_bytes(),
            )
            .unwrap()
        };
        let over = request(9000);
        assert!(
            over.starts_with("HTTP/1.1 431 Request Header Fields Too Large"),
            "{over}"
        );
        let under = request(7000);
        assert!(under.starts_with("HTTP/1.1 200 OK"), "{under}");
    }

    #[test]
    fn a_request_sent_byte_by_byte_is_served() {
        let server = MetricsServer::start("127.0.0.1:0", up).unwrap();
        let mut s = TcpStream::connect(server.address()).unwrap();
        s.set_read_timeout(Some(PATIENCE)).unwrap();
        s.set_nodelay(true).unwrap();
        for b in b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n" {
            s.write_all(&[*b]).unwrap();
            std::thread::sleep(Duration::from_millis(2));
        }
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        assert!(out.starts_with("HTTP/1.1 200 OK"), "{out}");
    }

    #[test]
    fn a_full_queue_is_answered_503_and_scrapes_work_once_clients_go() {
        let limits = Limits {
            read_deadline: Duration::from_secs(60),
            handlers: 2,
            queue: 1,
            ..Limits::default()
        };
        let server = MetricsServer::start_with("127.0.0.1:0", limits, up).unwrap();
        let mut idle = Vec::new();
        for n in 1..=2 {
            idle.push(TcpStream::connect(server.address()).unwrap());
            wait_busy(&server, n);
        }
        // Accepted in order: this one fills the queue, the next finds it full.
        idle.push(TcpStream::connect(server.address()).unwrap());
        let mut next = TcpStream::connect(server.address()).unwrap();
        next.set_read_timeout(Some(PATIENCE)).unwrap();
        let mut out = String::new();
        next.read_to_string(&mut out).unwrap();
        assert!(out.starts_with("HTTP/1.1 503 Service Unavailable"), "{out}");

        drop(idle);
        let started = Instant::now();
        loop {
            let out = get(server.address(), "/metrics");
            if out.starts_with("HTTP/1.1 200 OK") {
                break;
            }
            assert!(out.starts_with("HTTP/1.1 503"), "{out}");
            assert!(
                started.elapsed() < PATIENCE,
                "still 503 after the clients went"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    #[test]
    fn drop_does_not_wait_for_a_slow_client() {
        let limits = Limits {
            read_deadline: Duration::from_secs(60),
            ..Limits::default()
        };
        let server = MetricsServer::start_with("127.0.0.1:0", limits, up).unwrap();
        let address = server.address();
        let slow = std::thread::spawn(move || trickle(address));
        wait_busy(&server, 1);
        let started = Instant::now();
        drop(server);
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        assert!(
            slow.join().unwrap().is_some(),
            "the slow client was not closed"
        );
    }

    #[test]
    fn a_panic_while_rendering_is_a_500_not_a_dead_handler() {
        let limits = Limits {
            handlers: 1,
            ..Limits::default()
        };
        let first = AtomicBool::new(true);
        let render = move || {
            assert!(!first.swap(false, Ordering::SeqCst), "first render fails");
            up()
        };
        let server = MetricsServer::start_with("127.0.0.1:0", limits, render).unwrap();
        let failed = get(server.address(), "/metrics");
        assert!(failed.starts_with("HTTP/1.1 500"), "{failed}");
        assert!(get(server.address(), "/metrics").starts_with("HTTP/1.1 200 OK"));
    }
}
