//! The metrics endpoint: `GET /metrics` and `GET /healthz`, on a thread of its own so a
//! scrape (which reads every namespace's counters) never holds up the event loop.

// Hand-written HTTP/1.1 on tokio, already a dependency: one request per connection for two
// GET paths does not need hyper's dozen crates on the build graph.

use std::{sync::Arc, time::Duration};

use anyhow::{Context as _, Result};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};

use super::Metrics;

/// A request head larger than this is refused (Prometheus sends a few hundred bytes).
const HEAD_MAX: usize = 8 << 10;
/// A client that has not sent its request head by then is dropped.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `metrics` on `listener` from a new thread, for the rest of the process's life.
pub fn spawn(listener: std::net::TcpListener, metrics: Arc<Metrics>) -> Result<()> {
    listener
        .set_nonblocking(true)
        .context("setting the metrics socket non-blocking")?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .context("starting the metrics thread's runtime")?;
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            rt.block_on(async move {
                let listener = match TcpListener::from_std(listener) {
                    Ok(l) => l,
                    Err(e) => {
                        eprintln!("conntrack-trace: metrics: {e}");
                        return;
                    }
                };
                loop {
                    match listener.accept().await {
                        Ok((stream, _)) => {
                            let m = metrics.clone();
                            tokio::spawn(async move { serve(stream, &m).await });
                        }
                        // Out of fds and the like: back off instead of spinning.
                        Err(e) => {
                            log::warn!("metrics: accept: {e}");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
            })
        })
        .context("starting the metrics thread")?;
    Ok(())
}

async fn serve(mut stream: TcpStream, metrics: &Metrics) {
    let mut head = Vec::with_capacity(1024);
    let read = tokio::time::timeout(READ_TIMEOUT, read_head(&mut stream, &mut head)).await;
    let response = match read {
        Ok(Ok(true)) => respond(&head, metrics),
        Ok(Ok(false)) => Response::text(431, "Request Header Fields Too Large", "too large\n"),
        // Timed out or the peer went away: nothing to answer.
        _ => return,
    };
    let _ = stream.write_all(&response.bytes()).await;
    let _ = stream.shutdown().await;
}

/// Reads up to the blank line ending the head; false when it does not fit in HEAD_MAX.
async fn read_head(stream: &mut TcpStream, head: &mut Vec<u8>) -> std::io::Result<bool> {
    let mut buf = [0u8; 1024];
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        head.extend_from_slice(&buf[..n]);
        if memchr::memmem::find(head, b"\r\n\r\n").is_some() {
            return Ok(true);
        }
        if head.len() > HEAD_MAX {
            return Ok(false);
        }
    }
}

struct Response {
    status: u16,
    reason: &'static str,
    content_type: &'static str,
    allow: bool,
    body: String,
}

impl Response {
    fn text(status: u16, reason: &'static str, body: &str) -> Self {
        Self {
            status,
            reason,
            content_type: "text/plain; charset=utf-8",
            allow: false,
            body: body.into(),
        }
    }

    fn bytes(&self) -> Vec<u8> {
        let mut out = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n{}\r\n",
            self.status,
            self.reason,
            self.content_type,
            self.body.len(),
            if self.allow { "Allow: GET\r\n" } else { "" },
        )
        .into_bytes();
        out.extend_from_slice(self.body.as_bytes());
        out
    }
}

fn respond(head: &[u8], metrics: &Metrics) -> Response {
    let Ok(head) = std::str::from_utf8(head) else {
        return Response::text(400, "Bad Request", "bad request\n");
    };
    let mut lines = head.split("\r\n");
    let mut request = lines.next().unwrap_or_default().split(' ');
    let (Some(method), Some(target), Some(version), None) = (
        request.next(),
        request.next(),
        request.next(),
        request.next(),
    ) else {
        return Response::text(400, "Bad Request", "bad request\n");
    };
    if !version.starts_with("HTTP/1.") {
        return Response::text(400, "Bad Request", "bad request\n");
    }
    let path = target.split('?').next().unwrap_or_default();
    if path != "/metrics" && path != "/healthz" {
        return Response::text(404, "Not Found", "not found: try /metrics or /healthz\n");
    }
    if method != "GET" {
        let mut r = Response::text(405, "Method Not Allowed", "only GET\n");
        r.allow = true;
        return r;
    }
    if path == "/healthz" {
        return Response::text(200, "OK", "ok\n");
    }
    let openmetrics = lines
        .filter_map(|l| l.split_once(':'))
        .any(|(name, value)| {
            name.trim().eq_ignore_ascii_case("accept")
                && value.contains("application/openmetrics-text")
        });
    let (body, content_type) = metrics.encode(openmetrics);
    Response {
        status: 200,
        reason: "OK",
        content_type,
        allow: false,
        body,
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read as _, Write as _};

    use super::*;

    /// One request over a real socket to a served endpoint; the whole response.
    fn ask(addr: std::net::SocketAddr, request: &[u8]) -> String {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.write_all(request).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    #[test]
    fn serves_two_paths_to_get_only() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        spawn(listener, Metrics::new()).unwrap();

        let r = ask(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
        assert!(r.contains("Content-Type: text/plain; version=0.0.4"), "{r}");
        assert!(r.contains("# TYPE conntrack_trace_attached gauge"), "{r}");
        let (head, body) = r.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("Content-Length: {}\r\n", body.len())));

        let r = ask(
            addr,
            b"GET /metrics?x=1 HTTP/1.1\r\naccept: application/openmetrics-text;version=1.0.0,text/plain;q=0.5\r\n\r\n",
        );
        assert!(
            r.contains("Content-Type: application/openmetrics-text"),
            "{r}"
        );
        assert!(r.ends_with("# EOF\n"));

        let r = ask(addr, b"GET /healthz HTTP/1.0\r\n\r\n");
        assert!(
            r.starts_with("HTTP/1.1 200 OK\r\n") && r.ends_with("\r\n\r\nok\n"),
            "{r}"
        );

        let r = ask(addr, b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
        assert!(
            r.starts_with("HTTP/1.1 405 ") && r.contains("Allow: GET\r\n"),
            "{r}"
        );
        assert!(ask(addr, b"HEAD /healthz HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 405 "));
        assert!(ask(addr, b"GET / HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404 "));
        assert!(ask(addr, b"GET /metricsx HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404 "));
        assert!(ask(addr, b"hello\r\n\r\n").starts_with("HTTP/1.1 400 "));
        let huge = format!("GET /metrics HTTP/1.1\r\nX: {}\r\n", "a".repeat(HEAD_MAX));
        assert!(ask(addr, huge.as_bytes()).starts_with("HTTP/1.1 431 "));
    }
}
