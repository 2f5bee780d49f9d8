//! A small synchronous HTTP server for `/metrics`. No async runtime, no HTTP
//! framework: Prometheus needs a GET and one response per connection.
//!
//! Anything on the pod network can connect, so no client, and no number of
//! clients, may hold the endpoint or make the server use unbounded memory or
//! threads. One thread polls every socket (`poll(2)`), so an idle or slow
//! connection costs a descriptor and a few bytes, never a thread, and a
//! scrape is read and answered whatever the others are doing:
//!
//! - **A deadline per request**, not per read: the request line and headers
//!   must arrive within [`Limits::read_deadline`] (5 s) of accept, however
//!   the bytes trickle in; then the response (rendering included) must be
//!   written within [`Limits::write_deadline`] (5 s). A connection past its
//!   deadline is closed.
//! - **A header size limit**: request line and headers together get
//!   [`Limits::max_header_bytes`] (8 KiB), the most a connection buffers. A
//!   request that fills it without ending is answered
//!   `431 Request Header Fields Too Large` and nothing more is read.
//! - **A cap on connections**, [`Limits::max_connections`] (256). At the
//!   cap, a new connection closes the oldest one still sending its request
//!   (it has had the longest to send it; connections being answered are
//!   never closed for a newcomer). When every connection is being answered,
//!   the newcomer is answered `503 Service Unavailable` at once instead.
//! - **Rendering off the polling thread**: the text is rendered on a helper
//!   thread, one render at a time; scrapes that arrive together share one
//!   render, and a slow render delays only the scrapes waiting for it.
//!   What rendering reads is cached or O(volumes): directory volumes' trees
//!   are measured elsewhere ([`super::dir_usage`]).
//!
//! Dropping the server stops and joins both threads and closes every
//! connection.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, OwnedFd};
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TryRecvError};
use rustix::event::{EventfdFlags, PollFd, PollFlags, Timespec};

/// What a connection throws away, at most, of a request it did not read
/// before closing (only what has already arrived; it never waits for more).
/// Closing a socket with unread data sends a reset, and a reset can make
/// the client lose the response it was sent.
const DRAIN_BYTES: usize = 64 * 1024;

/// Connections accepted in one turn of the loop, at most: a flood of new
/// connections cannot keep the loop from serving those it has.
const ACCEPTS_PER_TURN: usize = 64;

/// Bytes read from a socket at once, into a buffer on the stack.
const READ_CHUNK: usize = 2048;

/// How long accepting pauses after an error other than "no connection
/// waiting" (out of descriptors, say), so the loop does not spin on it.
const ACCEPT_PAUSE: Duration = Duration::from_millis(10);

/// The content type of every answer but the metrics.
const TEXT: &str = "text/plain; charset=utf-8";
/// The content type of the Prometheus text format.
const PROMETHEUS: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The bounds the server keeps to. [`MetricsServer::start`] uses the
/// defaults: 5 s to read, 5 s to answer, 8 KiB of headers, 256 connections.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Time from accept for the request line and every header to arrive.
    pub read_deadline: Duration,
    /// Time from the end of the request for the response to be rendered
    /// and written.
    pub write_deadline: Duration,
    /// Bytes the request line and headers may take together.
    pub max_header_bytes: usize,
    /// Connections open at once (at least one); see the module
    /// documentation for what happens at the cap.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            read_deadline: Duration::from_secs(5),
            write_deadline: Duration::from_secs(5),
            max_header_bytes: 8 * 1024,
            max_connections: 256,
        }
    }
}

/// What renders the metrics text; called on the render thread.
type Render = dyn Fn() -> String + Send + Sync;

/// State the server's threads and its owner share.
#[derive(Debug)]
struct Shared {
    /// Set by Drop: the polling thread returns at its next turn.
    stop: AtomicBool,
    /// An eventfd the polling thread watches: written by Drop and by the
    /// render thread when a render is done.
    wake: OwnedFd,
    /// Connections open now.
    open: AtomicUsize,
}

impl Shared {
    fn wake(&self) {
        // A full counter (never, at 2^64 - 1) still leaves it readable.
        let _ = rustix::io::write(&self.wake, &1u64.to_ne_bytes());
    }
}

/// A running metrics server.
#[derive(Debug)]
pub struct MetricsServer {
    /// Where it listens.
    address: SocketAddr,
    /// The stop flag, the wake-up and the connection count.
    shared: Arc<Shared>,
    /// The render thread and the polling thread, joined on Drop.
    threads: Vec<JoinHandle<()>>,
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
        listener.set_nonblocking(true)?;
        let wake = rustix::event::eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?;
        let mut server = MetricsServer {
            address: listener.local_addr()?,
            shared: Arc::new(Shared {
                stop: AtomicBool::new(false),
                wake,
                open: AtomicUsize::new(0),
            }),
            threads: Vec::with_capacity(2),
        };
        // One render asked for at a time, one answer back at a time. The
        // polling thread owns the only request sender: when it returns, the
        // render thread's loop ends too. Should a spawn fail, dropping
        // `server` stops what was started.
        let (ask, asked) = crossbeam_channel::bounded::<()>(1);
        let (done, rendered) = crossbeam_channel::bounded::<Arc<[u8]>>(1);
        let render: Box<Render> = Box::new(render);
        let shared = Arc::clone(&server.shared);
        server.threads.push(
            std::thread::Builder::new()
                .name("filevol-metrics-render".into())
                .spawn(move || render_loop(&asked, &done, &shared, &*render))?,
        );
        let poller = Poller {
            listener,
            limits: Limits {
                max_connections: limits.max_connections.max(1),
                ..limits
            },
            shared: Arc::clone(&server.shared),
            ask,
            rendered,
            rendering: false,
            conns: Vec::new(),
            accept_paused: None,
        };
        server.threads.push(
            std::thread::Builder::new()
                .name("filevol-metrics".into())
                .spawn(move || poller.run())?,
        );
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
        self.shared.wake();
        // The polling thread first: its return ends the render thread's
        // loop (after the render in progress, if any).
        for t in self.threads.drain(..).rev() {
            let _ = t.join();
        }
    }
}

/// Renders whenever the polling thread asks, until it is gone. A panic while
/// rendering costs the scrapes waiting for that render a 500, not the
/// thread.
fn render_loop(asked: &Receiver<()>, done: &Sender<Arc<[u8]>>, shared: &Shared, render: &Render) {
    for () in asked.iter() {
        let answer = match panic::catch_unwind(AssertUnwindSafe(render)) {
            Ok(body) => response("200 OK", PROMETHEUS, &body),
            Err(_) => {
                log::warn!("metrics: rendering the metrics panicked");
                response(
                    "500 Internal Server Error",
                    TEXT,
                    "rendering the metrics failed\n",
                )
            }
        };
        if done.send(Arc::from(answer)).is_err() {
            return;
        }
        shared.wake();
    }
}

/// Where a connection is.
#[derive(Debug)]
enum Phase {
    /// Reading the request line and headers (due by accept + read
    /// deadline); `searched` is how far no end of headers was found.
    Reading { head: Vec<u8>, searched: usize },
    /// Asked for the metrics; waits for the next render.
    Queued { answer_by: Instant },
    /// Waits for the render running now.
    Rendering { answer_by: Instant },
    /// Writing its response.
    Writing {
        response: Arc<[u8]>,
        written: usize,
        answer_by: Instant,
    },
    /// Finished or given up on: closed at the end of the turn.
    Done,
}

/// One client connection.
#[derive(Debug)]
struct Conn {
    stream: TcpStream,
    accepted: Instant,
    phase: Phase,
}

impl Conn {
    /// When it is given up on.
    fn deadline(&self, limits: &Limits) -> Option<Instant> {
        match self.phase {
            Phase::Reading { .. } => Some(self.accepted + limits.read_deadline),
            Phase::Queued { answer_by }
            | Phase::Rendering { answer_by }
            | Phase::Writing { answer_by, .. } => Some(answer_by),
            Phase::Done => None,
        }
    }

    /// What it waits for from its socket, if anything: a connection waiting
    /// for a render is not polled (a hang-up would wake the loop at every
    /// turn until the render is done; its deadline bounds it).
    fn interest(&self) -> Option<PollFlags> {
        match self.phase {
            Phase::Reading { .. } => Some(PollFlags::IN),
            Phase::Writing { .. } => Some(PollFlags::OUT),
            Phase::Queued { .. } | Phase::Rendering { .. } | Phase::Done => None,
        }
    }

    fn peer(&self) -> String {
        self.stream
            .peer_addr()
            .map_or_else(|_| "?".to_owned(), |a| a.to_string())
    }

    /// Reads what has arrived, up to `limit` bytes of head; moves on once
    /// the head is complete or too large.
    fn read_head(&mut self, limits: &Limits) {
        let Phase::Reading { head, searched } = &mut self.phase else {
            return;
        };
        let mut chunk = [0u8; READ_CHUNK];
        loop {
            let room = limits.max_header_bytes.saturating_sub(head.len());
            match (&self.stream).read(&mut chunk[..room.min(READ_CHUNK)]) {
                Ok(0) => {
                    log::debug!(
                        "metrics: {}: client closed before the end of its headers",
                        self.peer()
                    );
                    self.phase = Phase::Done;
                    return;
                }
                Ok(n) => head.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    log::debug!("metrics: {}: reading the request: {e}", self.peer());
                    self.phase = Phase::Done;
                    return;
                }
            }
            // Look at the new bytes only (and the three before them, where
            // a blank line may have begun), not the whole buffer for every
            // byte a trickling client sends.
            if let Some(end) = end_of_head(head, *searched) {
                let line = head[..end].split(|b| *b == b'\n').next().unwrap_or(&[]);
                let line = String::from_utf8_lossy(line);
                self.phase = route(line.trim(), Instant::now() + limits.write_deadline);
                return;
            }
            if head.len() >= limits.max_header_bytes {
                self.phase = Phase::Writing {
                    response: Arc::from(response(
                        "431 Request Header Fields Too Large",
                        TEXT,
                        "request line and headers too large\n",
                    )),
                    written: 0,
                    answer_by: Instant::now() + limits.write_deadline,
                };
                return;
            }
            *searched = head.len().saturating_sub(3);
        }
    }

    /// Writes what the socket takes of the response; closes once all of it
    /// is written.
    fn write_response(&mut self) {
        let Phase::Writing {
            response, written, ..
        } = &mut self.phase
        else {
            return;
        };
        while *written < response.len() {
            match (&self.stream).write(&response[*written..]) {
                Ok(0) => {
                    self.phase = Phase::Done;
                    return;
                }
                Ok(n) => *written += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    log::debug!("metrics: {}: writing the response: {e}", self.peer());
                    self.phase = Phase::Done;
                    return;
                }
            }
        }
        close(&self.stream);
        self.phase = Phase::Done;
    }

    /// Gives up on it at its deadline: a scrape still waiting for its
    /// render is told so, if its socket takes the few bytes at once.
    fn expire(&mut self) {
        match self.phase {
            Phase::Reading { .. } => log::debug!(
                "metrics: {}: request line and headers not complete by the deadline",
                self.peer()
            ),
            Phase::Queued { .. } | Phase::Rendering { .. } => {
                log::debug!(
                    "metrics: {}: the metrics were not rendered in time",
                    self.peer()
                );
                let _ = (&self.stream).write_all(&response(
                    "503 Service Unavailable",
                    TEXT,
                    "the metrics were not rendered in time\n",
                ));
                close(&self.stream);
            }
            Phase::Writing { .. } => log::debug!(
                "metrics: {}: response not written by the deadline",
                self.peer()
            ),
            Phase::Done => {}
        }
        self.phase = Phase::Done;
    }
}

/// What a complete request line asks for.
fn route(line: &str, answer_by: Instant) -> Phase {
    let mut parts = line.split_whitespace();
    let fixed = |status, body| Phase::Writing {
        response: Arc::from(response(status, TEXT, body)),
        written: 0,
        answer_by,
    };
    match (parts.next().unwrap_or(""), parts.next().unwrap_or("")) {
        ("GET", "/metrics") => Phase::Queued { answer_by },
        ("GET", _) => fixed("404 Not Found", "not found: filevol serves /metrics\n"),
        _ => fixed("405 Method Not Allowed", "only GET\n"),
    }
}

/// The polling thread's state.
struct Poller {
    listener: TcpListener,
    limits: Limits,
    shared: Arc<Shared>,
    /// Asks the render thread for a render.
    ask: Sender<()>,
    /// The render thread's answers.
    rendered: Receiver<Arc<[u8]>>,
    /// A render is running for the connections in [`Phase::Rendering`].
    rendering: bool,
    conns: Vec<Conn>,
    /// Accepting waits until then after an accept error.
    accept_paused: Option<Instant>,
}

/// What one `poll` reported.
struct Ready {
    woken: bool,
    listener: bool,
    /// Connections (by index) with an event.
    conns: Vec<usize>,
}

impl Poller {
    fn run(mut self) {
        while !self.shared.stop.load(Ordering::SeqCst) {
            let ready = match self.poll() {
                Ok(ready) => ready,
                Err(e) => {
                    log::warn!("metrics: poll: {e}");
                    std::thread::sleep(ACCEPT_PAUSE);
                    continue;
                }
            };
            if ready.woken {
                let mut count = [0u8; 8];
                let _ = rustix::io::read(&self.shared.wake, &mut count);
            }
            self.collect_render();
            for i in ready.conns {
                let conn = &mut self.conns[i];
                match conn.phase {
                    Phase::Reading { .. } => conn.read_head(&self.limits),
                    Phase::Writing { .. } => conn.write_response(),
                    _ => {}
                }
            }
            if ready.listener {
                self.accept();
            }
            self.expire();
            self.start_render();
            self.conns.retain(|c| !matches!(c.phase, Phase::Done));
            self.shared.open.store(self.conns.len(), Ordering::SeqCst);
        }
        // Dropping the connections closes them; dropping `ask` ends the
        // render thread.
    }

    /// Waits for the wake-up, a connection to accept, a socket ready or
    /// the next deadline.
    fn poll(&self) -> io::Result<Ready> {
        let now = Instant::now();
        let accepting = self.accept_paused.is_none_or(|until| now >= until);
        let mut fds = Vec::with_capacity(self.conns.len() + 2);
        fds.push(PollFd::new(&self.shared.wake, PollFlags::IN));
        fds.push(PollFd::new(
            &self.listener,
            if accepting {
                PollFlags::IN
            } else {
                PollFlags::empty()
            },
        ));
        let mut polled = Vec::with_capacity(self.conns.len());
        for (i, conn) in self.conns.iter().enumerate() {
            if let Some(flags) = conn.interest() {
                fds.push(PollFd::from_borrowed_fd(conn.stream.as_fd(), flags));
                polled.push(i);
            }
        }
        let next = self
            .conns
            .iter()
            .filter_map(|c| c.deadline(&self.limits))
            .chain(self.accept_paused)
            .min();
        let timeout =
            next.and_then(|at| Timespec::try_from(at.saturating_duration_since(now)).ok());
        match rustix::event::poll(&mut fds, timeout.as_ref()) {
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => {
                return Ok(Ready {
                    woken: false,
                    listener: false,
                    conns: Vec::new(),
                })
            }
            Err(e) => return Err(e.into()),
        }
        Ok(Ready {
            woken: !fds[0].revents().is_empty(),
            listener: accepting && !fds[1].revents().is_empty(),
            conns: fds[2..]
                .iter()
                .zip(polled)
                .filter(|(fd, _)| !fd.revents().is_empty())
                .map(|(_, i)| i)
                .collect(),
        })
    }

    /// Accepts what is waiting, within the cap.
    fn accept(&mut self) {
        for _ in 0..ACCEPTS_PER_TURN {
            let stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::debug!("metrics: accept: {e}");
                    self.accept_paused = Some(Instant::now() + ACCEPT_PAUSE);
                    return;
                }
            };
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            if self.open() >= self.limits.max_connections && !self.evict_oldest_reading() {
                log::debug!(
                    "metrics: {} connections, all being answered: answering 503",
                    self.open()
                );
                refuse(&stream);
                continue;
            }
            let mut conn = Conn {
                stream,
                accepted: Instant::now(),
                phase: Phase::Reading {
                    head: Vec::new(),
                    searched: 0,
                },
            };
            // A scraper sends its request with the connection: read it now,
            // before a newer connection can make this one the oldest.
            conn.read_head(&self.limits);
            self.conns.push(conn);
        }
    }

    /// Connections not yet given up on.
    fn open(&self) -> usize {
        self.conns
            .iter()
            .filter(|c| !matches!(c.phase, Phase::Done))
            .count()
    }

    /// Closes the connection that has been sending its request the
    /// longest; false if every connection is past that.
    fn evict_oldest_reading(&mut self) -> bool {
        let oldest = self
            .conns
            .iter_mut()
            .filter(|c| matches!(c.phase, Phase::Reading { .. }))
            .min_by_key(|c| c.accepted);
        match oldest {
            Some(conn) => {
                log::debug!(
                    "metrics: at the cap of {} connections: closing {}, the oldest still sending its request",
                    self.limits.max_connections,
                    conn.peer()
                );
                conn.phase = Phase::Done;
                true
            }
            None => false,
        }
    }

    fn expire(&mut self) {
        let now = Instant::now();
        for conn in &mut self.conns {
            if conn.deadline(&self.limits).is_some_and(|at| now >= at) {
                conn.expire();
            }
        }
    }

    /// Asks for a render for every scrape queued, unless one is running.
    fn start_render(&mut self) {
        if self.rendering
            || !self
                .conns
                .iter()
                .any(|c| matches!(c.phase, Phase::Queued { .. }))
        {
            return;
        }
        if self.ask.try_send(()).is_err() {
            // The render thread is gone (it cannot be busy: one render at
            // a time): nothing will render.
            for conn in &mut self.conns {
                if let Phase::Queued { answer_by } = conn.phase {
                    conn.phase = Phase::Writing {
                        response: Arc::from(response(
                            "500 Internal Server Error",
                            TEXT,
                            "the metrics cannot be rendered\n",
                        )),
                        written: 0,
                        answer_by,
                    };
                }
            }
            return;
        }
        self.rendering = true;
        for conn in &mut self.conns {
            if let Phase::Queued { answer_by } = conn.phase {
                conn.phase = Phase::Rendering { answer_by };
            }
        }
    }

    /// Hands a finished render to the scrapes that waited for it, and
    /// writes what their sockets take at once.
    fn collect_render(&mut self) {
        let answer = match self.rendered.try_recv() {
            Ok(answer) => answer,
            Err(TryRecvError::Empty | TryRecvError::Disconnected) => return,
        };
        self.rendering = false;
        for conn in &mut self.conns {
            if let Phase::Rendering { answer_by } = conn.phase {
                conn.phase = Phase::Writing {
                    response: Arc::clone(&answer),
                    written: 0,
                    answer_by,
                };
                conn.write_response();
            }
        }
    }
}

/// Answers 503 and closes, without blocking: a fresh socket's send buffer
/// takes the few bytes at once, and if it does not the client gets nothing.
fn refuse(stream: &TcpStream) {
    let _ = (&*stream).write_all(&response(
        "503 Service Unavailable",
        TEXT,
        "busy: try again\n",
    ));
    close(stream);
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
fn close(stream: &TcpStream) {
    let _ = stream.shutdown(Shutdown::Write);
    if stream.set_nonblocking(true).is_ok() {
        let mut scratch = [0; 4096];
        let mut drained = 0;
        while drained < DRAIN_BYTES {
            match (&*stream).read(&mut scratch) {
                Ok(n) if n > 0 => drained += n,
                _ => break,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

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
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => return Some(started.elapsed()),
            }
        }
        None
    }

    /// Waits until the server holds `n` connections.
    fn wait_open(server: &MetricsServer, n: usize) {
        let started = Instant::now();
        while server.shared.open.load(Ordering::SeqCst) != n {
            assert!(
                started.elapsed() < PATIENCE,
                "never {n} connections open, {} are",
                server.shared.open.load(Ordering::SeqCst)
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Whether the server has closed `s` (EOF or reset), waiting up to
    /// `PATIENCE`.
    fn closed_by_server(s: &mut TcpStream) -> bool {
        s.set_read_timeout(Some(PATIENCE)).unwrap();
        !matches!(s.read(&mut [0; 64]), Err(ref e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut))
    }

    #[test]
    fn serves_metrics_and_refuses_the_rest() {
        let server = MetricsServer::start("127.0.0.1:0", up).unwrap();
        let ok = get(server.address(), "/metrics");
        assert!(ok.starts_with("HTTP/1.1 200 OK"), "{ok}");
        assert!(
            ok.contains("Content-Type: text/plain; version=0.0.4"),
            "{ok}"
        );
        assert!(ok.ends_with("\r\n\r\nfilevol_up 1\n"), "{ok}");
        assert!(get(server.address(), "/").starts_with("HTTP/1.1 404"));
        let post = send(server.address(), b"POST /metrics HTTP/1.1\r\n\r\n").unwrap();
        assert!(post.starts_with("HTTP/1.1 405"), "{post}");
    }

    #[test]
    fn a_scrape_is_answered_at_once_beside_a_hundred_idle_and_slow_connections() {
        let server = MetricsServer::start("127.0.0.1:0", up).unwrap();
        let mut held = Vec::new();
        for i in 0..100 {
            let mut s = TcpStream::connect(server.address()).unwrap();
            // Half say nothing, half begin a request and stop.
            if i % 2 == 1 {
                s.write_all(b"GET /metrics HTTP/1.1\r\nHost:").unwrap();
            }
            held.push(s);
        }
        wait_open(&server, 100);
        let started = Instant::now();
        let out = get(server.address(), "/metrics");
        let took = started.elapsed();
        assert!(out.starts_with("HTTP/1.1 200 OK"), "{out}");
        assert!(took < Duration::from_secs(1), "answered after {took:?}");
        // The hundred are still held (well inside their deadline).
        wait_open(&server, 100);
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
    fn at_the_cap_the_oldest_connection_still_sending_is_closed() {
        let limits = Limits {
            read_deadline: Duration::from_secs(60),
            max_connections: 3,
            ..Limits::default()
        };
        let server = MetricsServer::start_with("127.0.0.1:0", limits, up).unwrap();
        let mut idle = Vec::new();
        for n in 1..=3 {
            idle.push(TcpStream::connect(server.address()).unwrap());
            wait_open(&server, n);
        }
        // A fourth is served; the first (the oldest) made room for it.
        assert!(get(server.address(), "/metrics").starts_with("HTTP/1.1 200 OK"));
        assert!(closed_by_server(&mut idle[0]), "the oldest is still open");
        wait_open(&server, 2);
        idle[1]
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        assert!(
            matches!(idle[1].read(&mut [0; 8]), Err(ref e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut)),
            "a newer connection was closed"
        );
    }

    #[test]
    fn at_the_cap_with_every_connection_being_answered_a_newcomer_gets_503() {
        let limits = Limits {
            max_connections: 1,
            ..Limits::default()
        };
        let (entered, release) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicBool::new(false)),
        );
        let render = {
            let (entered, release) = (Arc::clone(&entered), Arc::clone(&release));
            move || {
                entered.store(true, Ordering::SeqCst);
                while !release.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(5));
                }
                up()
            }
        };
        let server = MetricsServer::start_with("127.0.0.1:0", limits, render).unwrap();
        let address = server.address();
        let waiting = std::thread::spawn(move || get(address, "/metrics"));
        let started = Instant::now();
        while !entered.load(Ordering::SeqCst) {
            assert!(started.elapsed() < PATIENCE, "never rendered");
            std::thread::sleep(Duration::from_millis(5));
        }
        let refused = get(server.address(), "/metrics");
        assert!(
            refused.starts_with("HTTP/1.1 503 Service Unavailable"),
            "{refused}"
        );
        release.store(true, Ordering::SeqCst);
        assert!(waiting.join().unwrap().starts_with("HTTP/1.1 200 OK"));
    }

    #[test]
    fn concurrent_scrapes_share_a_render_and_a_slow_render_holds_up_no_one_else() {
        let renders = Arc::new(AtomicU32::new(0));
        let render = {
            let renders = Arc::clone(&renders);
            move || {
                renders.fetch_add(1, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(500));
                up()
            }
        };
        let server = MetricsServer::start("127.0.0.1:0", render).unwrap();
        let address = server.address();
        let scrapes: Vec<_> = (0..4)
            .map(|_| std::thread::spawn(move || get(address, "/metrics")))
            .collect();
        // While the render sleeps, other requests are answered at once.
        std::thread::sleep(Duration::from_millis(100));
        let started = Instant::now();
        assert!(get(address, "/other").starts_with("HTTP/1.1 404"));
        assert!(
            started.elapsed() < Duration::from_millis(400),
            "{:?}",
            started.elapsed()
        );
        for s in scrapes {
            assert!(s.join().unwrap().starts_with("HTTP/1.1 200 OK"));
        }
        // Four scrapes, one render (two if one arrived after it began).
        assert!(renders.load(Ordering::SeqCst) <= 2, "{renders:?}");
    }

    /// Sets its flag when dropped.
    struct Dropped(Arc<AtomicBool>);

    impl Drop for Dropped {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    #[test]
    fn drop_closes_every_connection_and_joins_its_threads_without_waiting_for_clients() {
        let limits = Limits {
            read_deadline: Duration::from_secs(60),
            ..Limits::default()
        };
        let gone = Arc::new(AtomicBool::new(false));
        let guard = Dropped(Arc::clone(&gone));
        let render = move || {
            let _held = &guard;
            up()
        };
        let server = MetricsServer::start_with("127.0.0.1:0", limits, render).unwrap();
        let address = server.address();
        let slow = std::thread::spawn(move || trickle(address));
        let mut idle = TcpStream::connect(address).unwrap();
        wait_open(&server, 2);
        let started = Instant::now();
        drop(server);
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        // Both threads are joined: the render thread has dropped the
        // closure, which only happens when it returns.
        assert!(gone.load(Ordering::SeqCst), "the render thread still runs");
        assert!(closed_by_server(&mut idle), "an idle client was not closed");
        assert!(
            slow.join().unwrap().is_some(),
            "the slow client was not closed"
        );
        assert!(TcpStream::connect(address).is_err(), "still listening");
    }

    #[test]
    fn a_panic_while_rendering_is_a_500_not_a_dead_server() {
        let first = AtomicBool::new(true);
        let render = move || {
            assert!(!first.swap(false, Ordering::SeqCst), "first render fails");
            up()
        };
        let server = MetricsServer::start("127.0.0.1:0", render).unwrap();
        let failed = get(server.address(), "/metrics");
        assert!(failed.starts_with("HTTP/1.1 500"), "{failed}");
        assert!(get(server.address(), "/metrics").starts_with("HTTP/1.1 200 OK"));
    }

    #[test]
    fn a_render_slower_than_the_deadline_is_a_503() {
        let limits = Limits {
            write_deadline: Duration::from_millis(300),
            ..Limits::default()
        };
        let render = || {
            std::thread::sleep(Duration::from_secs(1));
            up()
        };
        let server = MetricsServer::start_with("127.0.0.1:0", limits, render).unwrap();
        let started = Instant::now();
        let out = get(server.address(), "/metrics");
        assert!(out.starts_with("HTTP/1.1 503"), "{out}");
        assert!(
            started.elapsed() < Duration::from_millis(900),
            "{:?}",
            started.elapsed()
        );
    }
}
