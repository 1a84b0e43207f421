//! A small HTTP/1.1 server for the scrape endpoints: `GET /metrics`, `/healthz`, `/`. One
//! thread accepts; each connection is answered on a thread of its own (at most
//! [`MAX_CONNECTIONS`] at once; more get 503), with a deadline on reading the request, and
//! closed after its response. Nothing a client sends can stall the accept loop or grow memory.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

/// Connections answered at once.
pub const MAX_CONNECTIONS: usize = 32;
/// The longest request head read.
const MAX_HEAD: usize = 16 * 1024;
/// How long a client may take to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// A parsed request: method, path (without the query), the `Accept` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub accept: Option<String>,
}

/// A response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
}

impl Response {
    pub fn text(status: u16, body: impl Into<String>) -> Self {
        Self {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into().into_bytes(),
        }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "",
    }
}

/// Parses a request head (up to the blank line); `None` if it is not HTTP.
pub fn parse_head(head: &str) -> Option<Request> {
    let mut lines = head.split("\r\n");
    let mut first = lines.next()?.split(' ');
    let method = first.next()?.to_owned();
    let target = first.next()?;
    let version = first.next()?;
    if !version.starts_with("HTTP/1.") || method.is_empty() || !target.starts_with('/') {
        return None;
    }
    let path = target.split('?').next().unwrap_or(target).to_owned();
    let accept = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("accept"))
        .map(|(_, v)| v.trim().to_owned());
    Some(Request {
        method,
        path,
        accept,
    })
}

/// Reads the request head off `stream`: `Err(status)` when it is too long, too slow or not
/// HTTP.
fn read_head(stream: &mut TcpStream) -> Result<Request, u16> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]);
            return parse_head(&head).ok_or(400);
        }
        if buf.len() > MAX_HEAD {
            return Err(431);
        }
        match stream.read(&mut chunk) {
            Ok(0) => return Err(400),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(408);
            }
            Err(_) => return Err(400),
        }
    }
}

fn write_response(stream: &mut TcpStream, r: &Response, head_only: bool) {
    let head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        r.status,
        reason(r.status),
        r.content_type,
        r.body.len()
    );
    let _ = stream.write_all(head.as_bytes());
    if !head_only {
        let _ = stream.write_all(&r.body);
    }
    let _ = stream.flush();
}

/// Answers connections on `listener` with `handler` until `stop` is set; returns once the
/// connections in flight are answered.
pub fn serve(
    listener: TcpListener,
    stop: Arc<AtomicBool>,
    handler: Arc<dyn Fn(&Request) -> Response + Send + Sync>,
) -> std::io::Result<()> {
    listener.set_nonblocking(true)?;
    let active = Arc::new(AtomicUsize::new(0));
    while !stop.load(Ordering::SeqCst) {
        let mut stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            // A connection reset before it was accepted, out of descriptors, …: go on.
            Err(_) => {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
        };
        let _ = stream.set_nonblocking(false);
        let _ = stream.set_read_timeout(Some(READ_TIMEOUT));
        let _ = stream.set_write_timeout(Some(READ_TIMEOUT));
        if active.load(Ordering::SeqCst) >= MAX_CONNECTIONS {
            write_response(
                &mut stream,
                &Response::text(503, "too many connections\n"),
                false,
            );
            continue;
        }
        active.fetch_add(1, Ordering::SeqCst);
        let (in_flight, handler) = (active.clone(), handler.clone());
        let spawned = std::thread::Builder::new()
            .name("tdpshare-http".into())
            .spawn(move || {
                match read_head(&mut stream) {
                    Ok(req) => {
                        let head_only = req.method == "HEAD";
                        let resp = if req.method == "GET" || head_only {
                            handler(&req)
                        } else {
                            Response::text(405, "only GET and HEAD\n")
                        };
                        write_response(&mut stream, &resp, head_only);
                    }
                    Err(status) => {
                        write_response(&mut stream, &Response::text(status, ""), false);
                    }
                }
                in_flight.fetch_sub(1, Ordering::SeqCst);
            });
        if spawned.is_err() {
            // The closure (and its count) is gone with the failed spawn.
            active.fetch_sub(1, Ordering::SeqCst);
        }
    }
    // Let the responses in flight finish (each is bounded by the timeouts).
    let deadline = std::time::Instant::now() + READ_TIMEOUT;
    while active.load(Ordering::SeqCst) > 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// A GET of `path` on `addr` (for tests and the load benchmark): status, headers, body.
pub fn get(
    addr: std::net::SocketAddr,
    path: &str,
    accept: Option<&str>,
) -> std::io::Result<(u16, String, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let accept = accept.map_or(String::new(), |a| format!("Accept: {a}\r\n"));
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{accept}Connection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((status, head.to_owned(), body.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_heads_parse_and_garbage_does_not() {
        let r = parse_head("GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\naccept: text/plain").unwrap();
        assert_eq!(r.method, "GET");
        assert_eq!(r.path, "/metrics");
        assert_eq!(r.accept.as_deref(), Some("text/plain"));
        assert!(parse_head("hello").is_none());
        assert!(parse_head("GET metrics HTTP/1.1").is_none());
        assert!(parse_head("GET / SPDY/3").is_none());
    }

    fn start() -> (
        std::net::SocketAddr,
        Arc<AtomicBool>,
        std::thread::JoinHandle<()>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let t = std::thread::spawn(move || {
            serve(
                listener,
                s,
                Arc::new(|r: &Request| Response::text(200, format!("you asked for {}", r.path))),
            )
            .unwrap()
        });
        (addr, stop, t)
    }

    #[test]
    fn answers_gets_refuses_posts_and_survives_bad_clients() {
        let (addr, stop, t) = start();
        let (status, _, body) = get(addr, "/x", None).unwrap();
        assert_eq!((status, body.as_str()), (200, "you asked for /x"));
        // A POST, garbage, a client that sends half a request and hangs up.
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(b"POST / HTTP/1.1\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        assert!(out.starts_with("HTTP/1.1 405"), "{out}");
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(b"\x00\x01garbage\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        assert!(out.starts_with("HTTP/1.1 400"), "{out}");
        drop(TcpStream::connect(addr).unwrap());
        // An endless head is cut off.
        let mut s = TcpStream::connect(addr).unwrap();
        let _ = s.write_all(&vec![b'a'; MAX_HEAD + 4096]);
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        assert!(out.starts_with("HTTP/1.1 431"), "{out}");
        // Still serving.
        assert_eq!(get(addr, "/y", None).unwrap().0, 200);
        stop.store(true, Ordering::SeqCst);
        t.join().unwrap();
    }
}
