//! A small HTTP/1.1 server for the scrape endpoints: `GET /metrics`, `/healthz`, `/`. One
//! thread accepts; each connection is answered on a thread of its own (at most
//! [`MAX_CONNECTIONS`] at once; more get 503), with one deadline for reading the whole request
//! and one for writing the whole response, and closed after its response. Nothing a client
//! sends, or fails to read, can stall the accept loop, hold a connection for long, or grow
//! memory.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Connections answered at once.
pub const MAX_CONNECTIONS: usize = 32;
/// The longest request head read.
const MAX_HEAD: usize = 16 * 1024;
/// How long a client may take to send its request (all of it).
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a client may take to read its response (all of it).
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

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

/// Parses a request head (up to the blank line; lines end in CRLF or LF); `None` if it is not
/// HTTP.
pub fn parse_head(head: &str) -> Option<Request> {
    let mut lines = head.lines();
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

/// Where a request head ends: the blank line (`\r\n\r\n`, or bare `\n\n` from hand-typed
/// requests).
fn head_end(buf: &[u8]) -> Option<usize> {
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n");
    let lf = buf.windows(2).position(|w| w == b"\n\n");
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The time left until `deadline`, or `None` when it has passed.
fn left(deadline: Instant) -> Option<Duration> {
    deadline
        .checked_duration_since(Instant::now())
        .filter(|d| !d.is_zero())
}

/// Reads the request head off `stream` before `deadline` (one deadline for the whole head, not
/// per read: a client sending a byte now and then cannot hold the connection):
/// `Err(status)` when it is too long, too slow or not HTTP.
fn read_head(stream: &mut TcpStream, deadline: Instant) -> Result<Request, u16> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    loop {
        if let Some(end) = head_end(&buf) {
            return parse_head(&String::from_utf8_lossy(&buf[..end])).ok_or(400);
        }
        if buf.len() > MAX_HEAD {
            return Err(431);
        }
        let Some(wait) = left(deadline) else {
            return Err(408);
        };
        let _ = stream.set_read_timeout(Some(wait));
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

/// Writes all of `bytes` before `deadline` (a client that reads slowly cannot hold the
/// connection); false when it could not.
fn write_by(stream: &mut TcpStream, mut bytes: &[u8], deadline: Instant) -> bool {
    while !bytes.is_empty() {
        let Some(wait) = left(deadline) else {
            return false;
        };
        let _ = stream.set_write_timeout(Some(wait));
        match stream.write(bytes) {
            Ok(0) | Err(_) => return false,
            Ok(n) => bytes = &bytes[n..],
        }
    }
    true
}

/// Writes the response, then closes so that the client reads it: our side shut, what the
/// client still sends read and dropped for a moment (closing with unread input would reset
/// the connection and could lose the response, e.g. a 431 to an endless head).
fn respond(stream: &mut TcpStream, r: &Response, head_only: bool, deadline: Instant) {
    let head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nVary: Accept\r\n\
         Connection: close\r\n\r\n",
        r.status,
        reason(r.status),
        r.content_type,
        r.body.len()
    );
    if write_by(stream, head.as_bytes(), deadline) && !head_only {
        write_by(stream, &r.body, deadline);
    }
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let _ = stream.set_read_timeout(Some(Duration::from_millis(100)));
    let mut sink = [0u8; 4096];
    let mut drained = 0;
    while drained < 64 * 1024 {
        match stream.read(&mut sink) {
            Ok(0) | Err(_) => break,
            Ok(n) => drained += n,
        }
    }
}

/// Gives a connection slot back when its thread ends, however it ends.
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
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
        if active.load(Ordering::SeqCst) >= MAX_CONNECTIONS {
            // Answered on the accept thread: bounded to a moment, however the client reads.
            let soon = Instant::now() + Duration::from_millis(100);
            respond(
                &mut stream,
                &Response::text(503, "too many connections\n"),
                false,
                soon,
            );
            continue;
        }
        active.fetch_add(1, Ordering::SeqCst);
        let slot = Slot(active.clone());
        let handler = handler.clone();
        // The slot moves into the thread and is given back when it ends (a panicking
        // handler included) — or here, with the closure, when the thread cannot start.
        let _ = std::thread::Builder::new()
            .name("tdpshare-http".into())
            .spawn(move || {
                let _slot = slot;
                let deadline = Instant::now() + READ_TIMEOUT;
                match read_head(&mut stream, deadline) {
                    Ok(req) => {
                        let head_only = req.method == "HEAD";
                        let resp = if req.method == "GET" || head_only {
                            handler(&req)
                        } else {
                            Response::text(405, "only GET and HEAD\n")
                        };
                        // Rendering took what it took; the client gets as long again to read.
                        let deadline = Instant::now() + WRITE_TIMEOUT;
                        respond(&mut stream, &resp, head_only, deadline);
                    }
                    Err(status) => {
                        let deadline = Instant::now() + Duration::from_secs(1);
                        respond(&mut stream, &Response::text(status, ""), false, deadline);
                    }
                }
            });
    }
    // Let the responses in flight finish (each is bounded by the timeouts).
    let deadline = Instant::now() + READ_TIMEOUT + WRITE_TIMEOUT;
    while active.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
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
        let bare = parse_head("GET / HTTP/1.0\nAccept: x").unwrap();
        assert_eq!(bare.accept.as_deref(), Some("x"));
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
                Arc::new(|r: &Request| {
                    assert!(r.path != "/panic", "handler panics on /panic");
                    Response::text(200, format!("you asked for {}", r.path))
                }),
            )
            .unwrap()
        });
        (addr, stop, t)
    }

    #[test]
    fn a_trickling_client_is_cut_off_at_the_deadline_and_panics_free_their_slots() {
        let (addr, stop, t) = start();
        // One byte every 0.7 s: under any per-read timeout, but the whole head has 5 s.
        let mut s = TcpStream::connect(addr).unwrap();
        let begun = Instant::now();
        let mut answer = String::new();
        for b in b"GET /slow HTTP/1.1\r\nX: ".iter().cycle() {
            if s.write_all(&[*b]).is_err() || begun.elapsed() > Duration::from_secs(12) {
                break;
            }
            std::thread::sleep(Duration::from_millis(700));
            s.set_nonblocking(true).unwrap();
            let mut buf = [0u8; 256];
            if let Ok(n) = s.read(&mut buf) {
                answer.push_str(&String::from_utf8_lossy(&buf[..n]));
                break;
            }
            s.set_nonblocking(false).unwrap();
        }
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?}");
        assert!(
            begun.elapsed() < Duration::from_secs(8),
            "{:?}",
            begun.elapsed()
        );
        // More panicking requests than slots: each gives its slot back.
        for _ in 0..MAX_CONNECTIONS + 4 {
            let _ = get(addr, "/panic", None);
        }
        assert_eq!(get(addr, "/after", None).unwrap().0, 200);
        // A hand-typed request with bare newlines.
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(b"GET /nc HTTP/1.0\n\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        assert!(
            out.starts_with("HTTP/1.1 200") && out.ends_with("you asked for /nc"),
            "{out}"
        );
        stop.store(true, Ordering::SeqCst);
        t.join().unwrap();
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
