//! A small synchronous HTTP server for `/metrics`: one thread, one request
//! per connection, short timeouts, so a slow or hostile scraper cannot pin
//! it. No async runtime, no HTTP framework: Prometheus needs a GET.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The longest a connection may take to send its request line and headers.
const READ_TIMEOUT: Duration = Duration::from_secs(2);
/// Request lines and headers longer than this are refused.
const MAX_HEADER_BYTES: usize = 8192;

/// A running metrics server.
#[derive(Debug)]
pub struct MetricsServer {
    address: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl MetricsServer {
    /// Listens on `address` and answers `GET /metrics` with `render()`.
    pub fn start(
        address: &str,
        render: impl Fn() -> String + Send + 'static,
    ) -> std::io::Result<MetricsServer> {
        let listener = TcpListener::bind(address)?;
        let address = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("filevol-metrics".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if stopping.load(Ordering::SeqCst) {
                        break;
                    }
                    match conn {
                        Ok(stream) => {
                            if let Err(e) = serve(stream, &render) {
                                log::debug!("metrics: {e}");
                            }
                        }
                        Err(e) => log::debug!("metrics: accept: {e}"),
                    }
                }
            })?;
        Ok(MetricsServer {
            address,
            stop,
            thread: Some(thread),
        })
    }

    /// Where it listens.
    pub fn address(&self) -> SocketAddr {
        self.address
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect_timeout(&self.address, Duration::from_millis(200));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(stream: TcpStream, render: &impl Fn() -> String) -> std::io::Result<()> {
    stream.set_read_timeout(Some(READ_TIMEOUT))?;
    stream.set_write_timeout(Some(READ_TIMEOUT))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader
        .by_ref()
        .take(MAX_HEADER_BYTES as u64)
        .read_line(&mut request_line)?;
    // Drain the headers (bounded), up to the blank line.
    let mut total = request_line.len();
    loop {
        let mut line = String::new();
        let n = reader
            .by_ref()
            .take(MAX_HEADER_BYTES as u64)
            .read_line(&mut line)?;
        total += n;
        if n == 0 || line == "\r\n" || line == "\n" || total > MAX_HEADER_BYTES {
            break;
        }
    }
    let mut parts = request_line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let mut stream = stream;
    let (status, body, content_type) = match (method, path) {
        ("GET", "/metrics") => (
            "200 OK",
            render(),
            "text/plain; version=0.0.4; charset=utf-8",
        ),
        ("GET", _) => (
            "404 Not Found",
            "not found: filevol serves /metrics\n".to_owned(),
            "text/plain",
        ),
        _ => (
            "405 Method Not Allowed",
            "only GET\n".to_owned(),
            "text/plain",
        ),
    };
    write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    stream.write_all(body.as_bytes())?;
    stream.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = TcpStream::connect(addr).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    #[test]
    fn serves_metrics_and_refuses_the_rest() {
        let server = MetricsServer::start("127.0.0.1:0", || "filevol_up 1\n".into()).unwrap();
        let ok = get(server.address(), "/metrics");
        assert!(ok.starts_with("HTTP/1.1 200 OK"), "{ok}");
        assert!(ok.ends_with("filevol_up 1\n"));
        assert!(get(server.address(), "/").starts_with("HTTP/1.1 404"));
        // A client that connects and says nothing is dropped after the
        // timeout; the next scrape still works.
        let _idle = TcpStream::connect(server.address()).unwrap();
        assert!(get(server.address(), "/metrics").contains("200 OK"));
    }
}
