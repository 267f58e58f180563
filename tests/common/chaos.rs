//! A misbehaving upstream over raw TCP, for fault injection: it reads one request per connection (head and
//! `Content-Length` or chunked body), counts it, and then answers according to the request path:
//!
//! | path | what the proxy gets |
//! |---|---|
//! | `/ok` | `200`, `Content-Length`, body `ok {key} #{n}`, `Connection: close` |
//! | `/reset-before-response` | nothing, then a TCP reset |
//! | `/reset-after-headers` | a head announcing 100 bytes, then a reset |
//! | `/reset-mid-body` | the head and 10 of 100 bytes, then a reset |
//! | `/close-mid-body` | the head and 10 of 100 bytes, then a clean close (FIN) |
//! | `/truncated-chunked` | a chunked head and one chunk, then a clean close (no last chunk) |
//! | `/bad-chunk` | a chunked head, then a chunk-size line that is not hex |
//! | `/stall-headers` | nothing: the connection is held until the proxy closes it |
//! | `/stall-body` | the head and 10 of 100 bytes, then nothing until the proxy closes |
//! | `/garbage` | `THIS IS NOT HTTP` lines, then a close |
//! | `/garbage-binary` | 512 bytes of binary noise, then a close |
//! | `/bad-header` | a status line followed by a malformed header line |
//! | `/big-then-reset` | a head announcing 200000 bytes, 100000 of them, then a reset |
//!
//! Only the last path segment counts (`/any/prefix/garbage` is `/garbage`), so tests can route by prefix.
//! With `?fail=N` in the query a route misbehaves only for the first `N` requests of a key and answers like
//! `/ok` afterwards, so a test can tell "the key was freed and the retry forwarded" from "stuck".

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{oneshot, watch};

/// One request as the chaos upstream read it.
#[derive(Debug, Clone)]
pub struct ChaosHit {
    pub path: String,
    pub key: Option<String>,
    pub host: Option<String>,
    pub body: Vec<u8>,
}

#[derive(Default)]
struct State {
    hits: Mutex<Vec<ChaosHit>>,
}

/// The running chaos upstream; dropping it stops the server.
pub struct ChaosUpstream {
    addr: SocketAddr,
    state: Arc<State>,
    changed: Arc<watch::Sender<u64>>,
    stop: Option<oneshot::Sender<()>>,
}

impl std::fmt::Debug for ChaosUpstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChaosUpstream")
            .field("addr", &self.addr)
            .finish()
    }
}

impl ChaosUpstream {
    pub fn start() -> ChaosUpstream {
        let state = Arc::new(State::default());
        let changed = Arc::new(watch::channel(0u64).0);
        let (st, ch) = (state.clone(), changed.clone());
        let (addr, stop_tx) = super::server::spawn("chaos-upstream", move |stream| {
            serve(stream, st.clone(), ch.clone())
        });
        ChaosUpstream {
            addr,
            state,
            changed,
            stop: Some(stop_tx),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn hits(&self) -> Vec<ChaosHit> {
        self.state.hits.lock().unwrap().clone()
    }

    /// Requests that carried `Idempotency-Key: key`.
    pub fn hits_key(&self, key: &str) -> usize {
        self.state
            .hits
            .lock()
            .unwrap()
            .iter()
            .filter(|h| h.key.as_deref() == Some(key))
            .count()
    }

    pub fn hits_total(&self) -> usize {
        self.state.hits.lock().unwrap().len()
    }

    /// Event-driven wait (bounded) until at least `n` requests with `key` arrived.
    pub async fn wait_hits_key(&self, key: &str, n: usize, limit: Duration) {
        let mut rx = self.changed.subscribe();
        let fut = async {
            while self.hits_key(key) < n {
                rx.changed().await.unwrap();
            }
        };
        if tokio::time::timeout(limit, fut).await.is_err() {
            panic!(
                "chaos upstream: {} of {n} request(s) with key {key} after {limit:?}",
                self.hits_key(key)
            );
        }
    }
}

impl Drop for ChaosUpstream {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Head of a request: (path with query, lowercase headers).
type Head = (String, Vec<(String, String)>);

async fn read_request(s: &mut TcpStream) -> Option<(Head, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let mut rest = buf[end + 4..].to_vec();
    let mut lines = head.split("\r\n");
    let target = lines.next()?.split(' ').nth(1)?.to_string();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| {
            let (n, v) = l.split_once(':')?;
            Some((n.trim().to_ascii_lowercase(), v.trim().to_string()))
        })
        .collect();
    let get = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    };
    let body = if let Some(len) = get("content-length").and_then(|v| v.parse::<usize>().ok()) {
        while rest.len() < len {
            let n = s.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            rest.extend_from_slice(&chunk[..n]);
        }
        rest.truncate(len);
        rest
    } else if get("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked")) {
        // Good enough for the proxy's own well-formed chunking: read to the last chunk, keep it raw.
        while !rest.ends_with(b"0\r\n\r\n") {
            let n = s.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            rest.extend_from_slice(&chunk[..n]);
        }
        rest
    } else {
        Vec::new()
    };
    Some(((target, headers), body))
}

/// Holds the connection until the peer closes it (or 60 s pass).
async fn hold(mut s: TcpStream) {
    let mut sink = [0u8; 1024];
    let _ = tokio::time::timeout(Duration::from_secs(60), async {
        while matches!(s.read(&mut sink).await, Ok(n) if n > 0) {}
    })
    .await;
}

fn reset(s: TcpStream) {
    let _ = s.set_zero_linger();
    drop(s);
}

async fn serve(mut s: TcpStream, st: Arc<State>, changed: Arc<watch::Sender<u64>>) {
    let Some(((target, headers), body)) = read_request(&mut s).await else {
        return;
    };
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p.to_string(), Some(q.to_string())),
        None => (target.clone(), None),
    };
    let header = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    };
    let key = header("idempotency-key");
    let n = {
        let mut hits = st.hits.lock().unwrap();
        hits.push(ChaosHit {
            path: path.clone(),
            key: key.clone(),
            host: header("host"),
            body,
        });
        hits.iter()
            .filter(|h| h.key == key && h.path == path)
            .count()
    };
    changed.send_modify(|c| *c += 1);
    let fail: Option<usize> = query.as_deref().and_then(|q| {
        q.split('&')
            .find_map(|kv| kv.strip_prefix("fail=").and_then(|v| v.parse().ok()))
    });
    // The last path segment picks the behaviour, so routes (`/a/reset-mid-body`) can prefix it.
    let mode = if fail.is_some_and(|f| n > f) {
        "/ok"
    } else {
        &path[path.rfind('/').unwrap_or(0)..]
    };
    let head_100 = "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 100\r\n\r\n";
    let chunked =
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n";
    match mode {
        "/reset-before-response" => reset(s),
        "/reset-after-headers" => {
            let _ = s.write_all(head_100.as_bytes()).await;
            let _ = s.flush().await;
            reset(s);
        }
        "/reset-mid-body" => {
            let _ = s.write_all(head_100.as_bytes()).await;
            let _ = s.write_all(b"0123456789").await;
            let _ = s.flush().await;
            reset(s);
        }
        "/close-mid-body" => {
            let _ = s.write_all(head_100.as_bytes()).await;
            let _ = s.write_all(b"0123456789").await;
            let _ = s.shutdown().await;
        }
        "/truncated-chunked" => {
            let _ = s.write_all(chunked.as_bytes()).await;
            let _ = s.write_all(b"5\r\nhello\r\n").await;
            let _ = s.shutdown().await;
        }
        "/bad-chunk" => {
            let _ = s.write_all(chunked.as_bytes()).await;
            let _ = s.write_all(b"zz\r\nhello\r\n0\r\n\r\n").await;
            let _ = s.shutdown().await;
        }
        "/stall-headers" => hold(s).await,
        "/stall-body" => {
            let _ = s.write_all(head_100.as_bytes()).await;
            let _ = s.write_all(b"0123456789").await;
            let _ = s.flush().await;
            hold(s).await;
        }
        "/garbage" => {
            let _ = s
                .write_all(b"THIS IS NOT HTTP\r\nAT ALL\r\n\r\nreally not")
                .await;
            let _ = s.shutdown().await;
        }
        "/garbage-binary" => {
            let noise: Vec<u8> = (0..512u32)
                .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
                .collect();
            let _ = s.write_all(&noise).await;
            let _ = s.shutdown().await;
        }
        "/bad-header" => {
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nthis is no header\r\n\r\nok")
                .await;
            let _ = s.shutdown().await;
        }
        "/big-then-reset" => {
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: 200000\r\n\r\n")
                .await;
            let _ = s.write_all(&vec![b'x'; 100_000]).await;
            let _ = s.flush().await;
            reset(s);
        }
        _ => {
            let body = format!("ok {} #{n}", key.as_deref().unwrap_or("-"));
            let resp = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = s.write_all(resp.as_bytes()).await;
            let _ = s.shutdown().await;
        }
    }
}
