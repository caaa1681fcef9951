//! A small HTTP/1.1 server on 127.0.0.1 for the download tests: fixed routes, `Range`
//! requests, a route that drops the connection part way a given number of times, and a log of
//! every request. One request per connection, handled in turn; stopped and joined on drop.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// What the server answers on one method and path.
#[derive(Clone, Default)]
pub struct Route {
    /// The status; 200 (206 for a range) when `None`.
    pub status: Option<u16>,
    /// The body (its length is announced as `Content-Length`).
    pub body: Vec<u8>,
    /// Extra headers.
    pub headers: Vec<(String, String)>,
    /// The first this many answers stop after `cut_at` bytes of the body and close.
    pub drops: usize,
    /// See `drops`.
    pub cut_at: usize,
}

impl Route {
    /// A 200 with `body`, honouring ranges.
    pub fn file(body: &[u8]) -> Self {
        Self {
            body: body.to_vec(),
            ..Self::default()
        }
    }

    /// Adds a header.
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }
}

/// A running server.
pub struct TestServer {
    addr: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl TestServer {
    /// Serves `routes`, keyed `"METHOD /path"`; anything else is a 404.
    pub fn start(routes: HashMap<String, Route>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
        let addr = listener.local_addr().expect("local address");
        let log = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (log2, stop2) = (log.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut routes = routes;
            for stream in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(stream) = stream {
                    let _ = serve(stream, &mut routes, &log2);
                }
            }
        });
        Self {
            addr,
            log,
            stop,
            thread: Some(thread),
        }
    }

    /// `http://127.0.0.1:PORT` + `path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Every request so far, as `"METHOD /path RANGE"`.
    pub fn requests(&self) -> Vec<String> {
        self.log.lock().expect("log").clone()
    }

    /// How many requests had this method and path.
    pub fn count(&self, method: &str, path: &str) -> usize {
        let prefix = format!("{method} {path} ");
        self.requests()
            .iter()
            .filter(|r| r.starts_with(&prefix))
            .count()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(
    stream: TcpStream,
    routes: &mut HashMap<String, Route>,
    log: &Mutex<Vec<String>>,
) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut parts = request_line.split_whitespace();
    let (method, path) = match (parts.next(), parts.next()) {
        (Some(m), Some(p)) => (m.to_string(), p.to_string()),
        _ => return Ok(()), // the wake-up connection
    };
    let mut range = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.trim().eq_ignore_ascii_case("range") {
                range = Some(value.trim().to_string());
            }
        }
    }
    log.lock().expect("log").push(format!(
        "{method} {path} {}",
        range.as_deref().unwrap_or("-")
    ));
    let mut out = stream;
    let Some(route) = routes.get_mut(&format!("{method} {path}")) else {
        write!(
            out,
            "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )?;
        return Ok(());
    };
    let len = route.body.len();
    let start = range
        .as_deref()
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.split('-').next())
        .and_then(|s| s.parse::<usize>().ok());
    let mut head = String::new();
    let (status, body): (u16, &[u8]) = match (route.status, start) {
        (Some(s), _) => (s, &route.body),
        (None, Some(s)) if s >= len => {
            head.push_str(&format!("Content-Range: bytes */{len}\r\n"));
            (416, &[])
        }
        (None, Some(s)) => {
            head.push_str(&format!("Content-Range: bytes {s}-{}/{len}\r\n", len - 1));
            (206, &route.body[s..])
        }
        (None, None) => (200, &route.body),
    };
    for (name, value) in &route.headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    write!(
        out,
        "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n{head}\r\n",
        body.len()
    )?;
    if method == "HEAD" {
        return Ok(());
    }
    if route.drops > 0 {
        route.drops -= 1;
        out.write_all(&body[..route.cut_at.min(body.len())])?;
        out.flush()?;
        // Close without sending the rest.
        return Ok(());
    }
    out.write_all(body)?;
    out.flush()
}
