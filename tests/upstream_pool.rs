//! The proxy's own HTTP/1.1 connections to a plain-http upstream: kept and reused between requests,
//! never reused after the upstream closed them, and a request is never sent twice on their account.
//!
//! The upstream here is a raw TCP server that counts its connections and can close each one right
//! after its response (without `Connection: close`), as an upstream with a short keep-alive does.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::{
    atomic::{AtomicUsize, Ordering},
    Arc,
};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use common::client::raw_request;
use common::{send, Proxy, RawConn};

/// What the raw upstream does after each response.
#[derive(Clone, Copy)]
enum After {
    KeepAlive,
    /// Closes the connection (no `Connection: close` header first).
    Close,
    /// Answers the first request of a connection; reads the second, then closes without answering.
    AnswerOnceThenDrop,
}

struct RawUpstream {
    addr: std::net::SocketAddr,
    connections: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl RawUpstream {
    fn start(after: After) -> Self {
        let connections = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(AtomicUsize::new(0));
        let (c, r) = (Arc::clone(&connections), Arc::clone(&requests));
        let (addr, stop) = common::server::spawn("raw-upstream", move |mut stream| {
            c.fetch_add(1, Ordering::SeqCst);
            let r = Arc::clone(&r);
            async move {
                let mut buf = Vec::new();
                let mut served = 0;
                loop {
                    // One request: its head, then a Content-Length body.
                    let head_end = loop {
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                        let mut chunk = [0u8; 4096];
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .map_or(0, |v| v.trim().parse().unwrap());
                    while buf.len() < head_end + len {
                        let mut chunk = [0u8; 4096];
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    buf.drain(..head_end + len);
                    let n = r.fetch_add(1, Ordering::SeqCst) + 1;
                    served += 1;
                    if matches!(after, After::AnswerOnceThenDrop) && served == 2 {
                        return;
                    }
                    let body = format!("answer {n}");
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\ncontent-type: text/plain\r\n\r\n{body}",
                        body.len()
                    );
                    if stream.write_all(resp.as_bytes()).await.is_err() {
                        return;
                    }
                    if let After::Close = after {
                        let _ = stream.shutdown().await;
                        return;
                    }
                }
            }
        });
        Self {
            addr,
            connections,
            requests,
            _stop: stop,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

#[tokio::test]
async fn sequential_requests_reuse_the_upstream_connections() {
    let up = RawUpstream::start(After::KeepAlive);
    let p = Proxy::builder(up.url())
        .defaults("required = false")
        .start()
        .await;
    for i in 0..40 {
        let method = if i % 2 == 0 { "GET" } else { "POST" };
        let r = send(p.addr, method, "/pool", &[], "x").await;
        assert_eq!(r.status, 200, "{r:?}");
    }
    // Each client connection lands on one serving thread; each thread keeps its own connections.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert_eq!(up.requests.load(Ordering::SeqCst), 40);
    let opened = up.connections.load(Ordering::SeqCst);
    assert!(
        opened <= cores,
        "{opened} upstream connections for 40 sequential requests"
    );
}

#[tokio::test]
async fn connections_the_upstream_closed_are_not_reused() {
    let up = RawUpstream::start(After::Close);
    let p = Proxy::builder(up.url())
        .defaults("required = false")
        .start()
        .await;
    for i in 0..30 {
        let key = format!("closed-{i}");
        let headers = [("Idempotency-Key", key.as_str())];
        let (method, hdrs): (&str, &[(&str, &str)]) = if i % 2 == 0 {
            ("GET", &[])
        } else {
            ("POST", &headers)
        };
        let r = send(p.addr, method, "/pool", hdrs, "x").await;
        assert_eq!(r.status, 200, "request {i}: {r:?}");
    }
    assert_eq!(up.requests.load(Ordering::SeqCst), 30);
    assert_eq!(up.connections.load(Ordering::SeqCst), 30);
}

/// The second request goes on the kept connection (one client connection stays on one serving
/// thread); the upstream reads it and drops the connection unanswered. It may have run: 502, and it
/// is not sent again on a new connection.
#[tokio::test]
async fn a_request_the_upstream_received_is_not_sent_again_on_another_connection() {
    let up = RawUpstream::start(After::AnswerOnceThenDrop);
    let p = Proxy::builder(up.url()).start().await;
    let mut client = RawConn::connect(p.addr).await;
    for (key, status) in [("first", 200), ("unanswered", 502)] {
        let req = raw_request(p.addr, "POST", "/pool", &[("Idempotency-Key", key)], b"x");
        client.write(&req).await;
        let r = client.read_response().await;
        assert_eq!(r.status, status, "{key}: {r:?}");
    }
    assert_eq!(
        up.requests.load(Ordering::SeqCst),
        2,
        "each request sent once"
    );
    assert_eq!(
        up.connections.load(Ordering::SeqCst),
        1,
        "no new connection"
    );
}
