//! Bounded resources against the real binary (contract "Limits and hostile input"): what each limit lets
//! through, what it refuses, and that what it refuses costs the proxy nothing.
//!
//! - `[upstream] max_concurrency`: exchanges beyond it get 503 `upstream-busy` with `Retry-After`, reach
//!   nothing and free their key; clients that send and vanish cannot pile up detached exchanges.
//! - `[server] idle_timeout`: idle HTTP/1 keep-alive and HTTP/2 (h2c) connections are closed, a connection
//!   with a request in flight is not; an HTTP/2 client that never finishes its headers is dropped too.
//! - `[server] max_connections`: beyond it a connection waits in the backlog, unanswered, until a slot
//!   frees.
//! - Rule 18: slow readers of one recorded 8 MiB response share its bytes (RSS measured from `/proc`).
//! - Idle connections do not pile up file descriptors (fd count measured from `/proc`).
//!
//! Every wait is bounded; the only fixed waits (≤ 500 ms) show that something does *not* happen.

#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::client::{raw_request, Resp};
use common::{eventually, metrics, post_key, procstat, send, within, Proxy, Upstream};
use http::{HeaderMap, HeaderName, HeaderValue};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// Bound on any single step (a connect, a response, a close the test waits for).
const STEP: Duration = Duration::from_secs(15);
/// The fixed wait that shows something does not happen.
const QUIET: Duration = Duration::from_millis(500);
const TEXT: (&str, &str) = ("Content-Type", "text/plain");

/// Waits (bounded) until the proxy's metric `name` (summed over its labels) reads `want`.
async fn metric_becomes(p: &Proxy, name: &str, want: f64, what: &str) {
    eventually(
        Duration::from_secs(10),
        &format!("{what} ({name} = {want})"),
        || async move { (metrics::scrape(p, name).await == want).then_some(()) },
    )
    .await;
}

/// `idemproxy_connections{listener="proxy"}`: connections of the proxy listener only (the admin
/// listener's, the scrape's own among them, are a series of their own).
async fn proxy_connections_become(p: &Proxy, want: f64, what: &str) {
    eventually(
        Duration::from_secs(10),
        &format!("{what} (proxy connections = {want})"),
        || async move {
            let text = p.admin_get("/metrics").await.text();
            let value = text
                .lines()
                .find_map(|l| l.strip_prefix("idemproxy_connections{listener=\"proxy\"} "))
                .and_then(|v| v.parse::<f64>().ok());
            (value == Some(want)).then_some(())
        },
    )
    .await;
}

// ---------------------------------------------------------------------------------------------------------
// A raw HTTP/1.1 keep-alive connection that can tell "nothing yet" from "closed by the proxy".

/// What the proxy did on a connection within a bounded wait.
#[derive(Debug, PartialEq, Eq)]
enum Seen {
    /// No byte and no close.
    Nothing,
    /// Some bytes arrived (kept for the next response).
    Bytes,
    /// EOF or reset.
    Closed,
}

#[derive(Debug)]
struct H1 {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl H1 {
    async fn connect(addr: SocketAddr) -> H1 {
        let stream = within(STEP, "connect", TcpStream::connect(addr))
            .await
            .unwrap();
        H1 {
            stream,
            buf: Vec::new(),
        }
    }

    async fn write(&mut self, bytes: &[u8]) {
        within(STEP, "write", self.stream.write_all(bytes))
            .await
            .unwrap();
    }

    /// `GET path` (keep-alive).
    async fn get(&mut self, addr: SocketAddr, path: &str) {
        self.write(&raw_request(addr, "GET", path, &[], b"")).await;
    }

    /// Reads more bytes into the buffer; 0 on EOF or reset. Cancel-safe.
    async fn fill(&mut self) -> usize {
        let mut chunk = [0u8; 16 * 1024];
        match self.stream.read(&mut chunk).await {
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                n
            }
            Err(_) => 0,
        }
    }

    /// Waits up to `limit` for the proxy to send something or close.
    async fn watch(&mut self, limit: Duration) -> Seen {
        if !self.buf.is_empty() {
            return Seen::Bytes;
        }
        match tokio::time::timeout(limit, self.fill()).await {
            Err(_) => Seen::Nothing,
            Ok(0) => Seen::Closed,
            Ok(_) => Seen::Bytes,
        }
    }

    /// Waits (bounded by [`STEP`]) for the proxy to close the connection without sending anything more.
    async fn wait_closed(&mut self, what: &str) {
        match self.watch(STEP).await {
            Seen::Closed => {}
            other => panic!(
                "{what}: expected the proxy to close the connection, got {other:?} ({:?})",
                String::from_utf8_lossy(&self.buf)
            ),
        }
    }

    /// One response with a `Content-Length` body (bounded by [`STEP`]).
    async fn response(&mut self) -> Resp {
        within(STEP, "a response", self.response_inner()).await
    }

    async fn response_inner(&mut self) -> Resp {
        let end = loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i;
            }
            assert!(
                self.fill().await > 0,
                "EOF before a complete response head; have {:?}",
                String::from_utf8_lossy(&self.buf)
            );
        };
        let head: Vec<u8> = self.buf.drain(..end + 4).collect();
        let head = String::from_utf8(head).unwrap();
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap();
        let status = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
        let mut headers = HeaderMap::new();
        for line in lines.filter(|l| !l.is_empty()) {
            let (n, v) = line.split_once(':').unwrap();
            headers.append(
                HeaderName::from_bytes(n.trim().as_bytes()).unwrap(),
                HeaderValue::from_str(v.trim()).unwrap(),
            );
        }
        let len: usize = headers
            .get("content-length")
            .unwrap_or_else(|| panic!("no Content-Length in {head:?}"))
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        while self.buf.len() < len {
            assert!(self.fill().await > 0, "EOF inside a body: {head:?}");
        }
        let body = Bytes::from(self.buf.drain(..len).collect::<Vec<u8>>());
        Resp {
            status,
            headers,
            body,
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// A raw HTTP/2 (h2c, prior knowledge) client: just enough framing to send a GET or half a header block
// and to see the proxy's frames and its close.

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;

#[derive(Debug)]
struct Frame {
    kind: u8,
    flags: u8,
    stream: u32,
    payload: Vec<u8>,
}

fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).unwrap().to_be_bytes();
    let mut out = vec![len[1], len[2], len[3], kind, flags];
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// HPACK block of `GET path` on `authority` (static-table method and scheme, literal path and authority
/// without indexing and without Huffman coding).
fn h2_get_block(authority: &str, path: &str) -> Vec<u8> {
    let mut block = vec![0x82, 0x86]; // :method GET, :scheme http
    for (name_index, value) in [(4u8, path), (1u8, authority)] {
        block.push(name_index); // literal without indexing, indexed name (:path 4, :authority 1)
        block.push(u8::try_from(value.len()).unwrap()); // < 127: fits the 7-bit prefix
        block.extend_from_slice(value.as_bytes());
    }
    block
}

/// The next frame, or `None` on EOF or reset.
async fn read_frame(s: &mut TcpStream) -> Option<Frame> {
    let mut head = [0u8; 9];
    s.read_exact(&mut head).await.ok()?;
    let len = usize::try_from(u32::from_be_bytes([0, head[0], head[1], head[2]])).unwrap();
    let mut payload = vec![0u8; len];
    s.read_exact(&mut payload).await.ok()?;
    Some(Frame {
        kind: head[3],
        flags: head[4],
        stream: u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff,
        payload,
    })
}

/// A well-behaved client's answer to a frame: SETTINGS and PING are acknowledged.
async fn h2_ack(s: &mut TcpStream, f: &Frame) {
    let ack = match f.kind {
        SETTINGS if f.flags & ACK == 0 => h2_frame(SETTINGS, ACK, 0, &[]),
        PING if f.flags & ACK == 0 => h2_frame(PING, ACK, 0, &f.payload),
        _ => return,
    };
    // The proxy may be closing: a failed ack is not the test's concern.
    let _ = s.write_all(&ack).await;
}

// ---------------------------------------------------------------------------------------------------------
// [upstream] max_concurrency

/// With `max_concurrency = 2` and two exchanges held at the upstream, a third keyed request is refused
/// with 503 `upstream-busy` and `Retry-After`, reaches nothing, and leaves its key free: once the slots
/// free up the same request is forwarded and then replayed. A pass-through GET is refused the same way.
/// Without the bound the third request would be forwarded (the upstream would see a third arrival);
/// without freeing the key its retry would get 409 `in-flight` instead of being forwarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_concurrency_refuses_exchanges_beyond_it_with_upstream_busy_and_frees_the_key() {
    let up = Upstream::start();
    let p = Proxy::builder(up.url())
        .upstream("max_concurrency = 2")
        .start()
        .await;
    let addr = p.addr;
    let held: Vec<_> = ["busy-1", "busy-2"]
        .into_iter()
        .map(|key| tokio::spawn(async move { post_key(addr, "/gate/busy", key, "pay").await }))
        .collect();
    up.wait_gate_arrivals("busy", 2).await;
    metric_becomes(&p, "idemproxy_upstream_inflight", 2.0, "both slots taken").await;

    let third = post_key(addr, "/gate/busy", "busy-3", "pay").await;
    third.assert_problem(503, "upstream-busy");
    assert!(third.retry_after() >= 1, "Retry-After in {third:?}");
    let get = send(addr, "GET", "/passthrough", &[], b"").await;
    get.assert_problem(503, "upstream-busy");
    assert!(get.retry_after() >= 1, "Retry-After in {get:?}");
    assert_eq!(
        up.gate_arrivals("busy"),
        2,
        "the third request reached the upstream"
    );
    assert_eq!(up.hits_key("busy-3"), 0);
    assert_eq!(
        up.hits_path("/passthrough"),
        0,
        "the GET reached the upstream"
    );

    up.open("busy");
    let mut bodies = Vec::new();
    for h in held {
        let r = within(STEP, "a held request", h).await.unwrap();
        assert_eq!(r.status, 200, "{r:?}");
        bodies.push(r.text());
    }
    bodies.sort();
    assert_eq!(bodies, ["gate:busy#1", "gate:busy#2"]);
    metric_becomes(&p, "idemproxy_upstream_inflight", 0.0, "the slots freed").await;

    // The refused key was freed: forwarded now, then replayed.
    post_key(addr, "/gate/busy", "busy-3", "pay")
        .await
        .assert_forwarded(200, b"gate:busy#3");
    post_key(addr, "/gate/busy", "busy-3", "pay")
        .await
        .assert_replay(200, b"gate:busy#3");
    assert_eq!(up.hits_key("busy-3"), 1);
    send(addr, "GET", "/passthrough", &[], b"")
        .await
        .assert_forwarded(200, b"hit 1 GET /passthrough");
}

/// 30 clients each send a keyed POST and vanish at once while the upstream holds everything: the
/// detached exchanges (which must finish, to be recorded) stay within `max_concurrency = 4` — the
/// upstream never sees more than 4 arrivals, `idemproxy_upstream_inflight` reads 4 — and they are not
/// queued either: once the upstream answers, the gauge returns to 0, no further request arrives, and a
/// refused key is free. Without the bound every abandoned request would become an upstream call (30
/// arrivals), so clients that send and disconnect could pile up detached work without limit.
///
/// Each client sends its request followed by the first bytes of a pipelined next one, then drops the
/// connection: a bare send-and-close is noticed by hyper (unexpected EOF on a busy connection) and the
/// request is dropped before its claim, so it never becomes a detached exchange at all; with bytes still
/// buffered hyper does not look for the EOF, and every request is claimed and handed to the upstream path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_requests_cannot_pile_up_detached_upstream_exchanges() {
    const CLIENTS: usize = 30;
    let up = Upstream::start();
    let p = Proxy::builder(up.url())
        .upstream("max_concurrency = 4")
        .start()
        .await;
    let mut conns = Vec::new();
    for i in 0..CLIENTS {
        let key = format!("ab-{i}");
        let mut req = raw_request(
            p.addr,
            "POST",
            "/gate/abandon",
            &[("Idempotency-Key", &key), TEXT],
            b"pay",
        );
        req.extend_from_slice(b"POST /next HTTP/1.1\r\n");
        let mut c = H1::connect(p.addr).await;
        c.write(&req).await;
        conns.push(c);
    }
    drop(conns);

    up.wait_gate_arrivals("abandon", 4).await;
    metric_becomes(
        &p,
        "idemproxy_upstream_inflight",
        4.0,
        "4 detached exchanges",
    )
    .await;
    tokio::time::sleep(QUIET).await;
    assert_eq!(
        up.gate_arrivals("abandon"),
        4,
        "more abandoned requests reached the upstream than max_concurrency"
    );
    assert_eq!(
        metrics::scrape(&p, "idemproxy_upstream_inflight").await,
        4.0
    );

    up.open("abandon");
    // Every one of the 30 was handled to the end (4 forwarded, 26 refused), none dropped unclaimed.
    metric_becomes(
        &p,
        "idemproxy_requests_total",
        30.0,
        "all 30 abandoned requests handled",
    )
    .await;
    metric_becomes(
        &p,
        "idemproxy_upstream_inflight",
        0.0,
        "the detached exchanges ended",
    )
    .await;
    assert_eq!(
        up.gate_arrivals("abandon"),
        4,
        "refused requests were queued and forwarded later"
    );
    // A refused key was freed: its retry is forwarded.
    let refused = (0..CLIENTS)
        .map(|i| format!("ab-{i}"))
        .find(|k| up.hits_key(k) == 0)
        .unwrap();
    post_key(p.addr, "/gate/abandon", &refused, "pay")
        .await
        .assert_forwarded(200, b"gate:abandon#5");
}

// ---------------------------------------------------------------------------------------------------------
// [server] idle_timeout

/// With `idle_timeout = "300ms"` an HTTP/1 keep-alive connection that got its response and sends nothing
/// more is closed by the proxy about 300 ms later (not before 250 ms, well within 3 s); a connection whose
/// request is held at the upstream longer than that is not closed and gets its response. Without the
/// timeout idle keep-alive connections would hold a slot and an fd forever; if idleness ignored requests
/// in flight, a slow upstream answer would be cut off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_timeout_closes_idle_http1_connections_but_not_busy_ones() {
    let up = Upstream::start();
    let p = Proxy::builder(up.url())
        .server("idle_timeout = \"300ms\"")
        .start()
        .await;

    let mut idle = H1::connect(p.addr).await;
    idle.get(p.addr, "/idle").await;
    idle.response()
        .await
        .assert_forwarded(200, b"hit 1 GET /idle");
    let answered = Instant::now();
    idle.wait_closed("an idle keep-alive connection").await;
    let closed_after = answered.elapsed();
    eprintln!("idle HTTP/1 connection closed {closed_after:?} after its response");
    assert!(
        closed_after >= Duration::from_millis(250),
        "closed after {closed_after:?}, before idle_timeout"
    );
    assert!(
        closed_after < Duration::from_secs(3),
        "closed only after {closed_after:?}"
    );

    let mut busy = H1::connect(p.addr).await;
    let opened = Instant::now();
    busy.get(p.addr, "/gate/h1").await;
    up.wait_gate_arrivals("h1", 1).await;
    assert_eq!(
        busy.watch(QUIET).await,
        Seen::Nothing,
        "a connection with a request in flight was closed or answered"
    );
    assert!(opened.elapsed() > Duration::from_millis(300));
    up.release("h1", 200);
    busy.response().await.assert_forwarded(200, b"gate:h1#1");
    // Idle from here on: closed like the other one.
    busy.wait_closed("the connection once its response was sent")
        .await;
}

/// A connection that keeps sending requests, each within `idle_timeout` of the last answer, is never
/// idle for `idle_timeout`, however long it lives.
#[tokio::test]
async fn idle_timeout_counts_from_the_last_answer_not_from_the_connection_start() {
    let up = Upstream::start();
    let p = Proxy::builder(up.url())
        .server("idle_timeout = \"300ms\"")
        .start()
        .await;
    let mut conn = H1::connect(p.addr).await;
    let opened = Instant::now();
    let mut n = 0;
    while opened.elapsed() < Duration::from_millis(1200) {
        n += 1;
        conn.get(p.addr, "/steady").await;
        conn.response()
            .await
            .assert_forwarded(200, format!("hit {n} GET /steady").as_bytes());
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    assert!(n >= 5, "{n} requests");
    let answered = Instant::now();
    conn.wait_closed("the connection once it went idle").await;
    assert!(answered.elapsed() >= Duration::from_millis(100));
}

/// The same over HTTP/2 with prior knowledge (h2c): after a request is answered and `idle_timeout`
/// (300 ms) passes with nothing in flight, the proxy sends GOAWAY and closes the connection. Without it
/// an h2 connection would stay open as long as the client keeps answering pings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_timeout_sends_goaway_and_closes_idle_http2_connections() {
    let up = Upstream::start();
    let p = Proxy::builder(up.url())
        .server("idle_timeout = \"300ms\"")
        .start()
        .await;
    let mut s = within(STEP, "connect", TcpStream::connect(p.addr))
        .await
        .unwrap();
    let mut hello = H2_PREFACE.to_vec();
    hello.extend(h2_frame(SETTINGS, 0, 0, &[]));
    hello.extend(h2_frame(
        HEADERS,
        END_HEADERS | END_STREAM,
        1,
        &h2_get_block(&p.addr.to_string(), "/h2-idle"),
    ));
    s.write_all(&hello).await.unwrap();

    let (first_header_byte, body) = within(STEP, "the h2 response", async {
        let mut first = None;
        let mut body = Vec::new();
        loop {
            let f = read_frame(&mut s).await.expect("EOF before the response");
            h2_ack(&mut s, &f).await;
            assert_ne!(f.kind, GOAWAY, "GOAWAY before the response: {f:?}");
            if f.stream != 1 {
                continue;
            }
            match f.kind {
                HEADERS => first = first.or(f.payload.first().copied()),
                DATA => body.extend_from_slice(&f.payload),
                _ => {}
            }
            if f.flags & END_STREAM != 0 {
                return (first, body);
            }
        }
    })
    .await;
    let answered = Instant::now();
    // 0x88 is HPACK's static-table `:status: 200`.
    assert_eq!(first_header_byte, Some(0x88), "response status is not 200");
    assert_eq!(body, b"hit 1 GET /h2-idle");

    let goaway = within(STEP, "the proxy to close the idle h2 connection", async {
        let mut goaway = None;
        while let Some(f) = read_frame(&mut s).await {
            h2_ack(&mut s, &f).await;
            if f.kind == GOAWAY && goaway.is_none() {
                goaway = Some(answered.elapsed());
            }
        }
        goaway
    })
    .await;
    let closed_after = answered.elapsed();
    eprintln!(
        "idle h2 connection: GOAWAY after {goaway:?}, closed {closed_after:?} after its response"
    );
    let goaway = goaway.expect("the connection was closed without GOAWAY");
    assert!(
        goaway >= Duration::from_millis(250),
        "GOAWAY after {goaway:?}, before idle_timeout"
    );
    assert!(
        closed_after < Duration::from_secs(3),
        "closed only after {closed_after:?}"
    );
}

/// An HTTP/2 client that sends the preface, SETTINGS and a HEADERS frame without END_HEADERS, and never
/// the CONTINUATION, has no request in flight: it is disconnected within `idle_timeout` (300 ms) +
/// `header_read_timeout` (500 ms) plus slack, and nothing reaches the upstream. Without it (hyper's
/// header timer does not cover HTTP/2), such half-sent headers would hold a connection forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_half_sent_headers_are_disconnected_within_idle_plus_header_read_timeout() {
    let up = Upstream::start();
    let p = Proxy::builder(up.url())
        .server("idle_timeout = \"300ms\"\nheader_read_timeout = \"500ms\"")
        .start()
        .await;
    let mut s = within(STEP, "connect", TcpStream::connect(p.addr))
        .await
        .unwrap();
    let mut bytes = H2_PREFACE.to_vec();
    bytes.extend(h2_frame(SETTINGS, 0, 0, &[]));
    // END_STREAM but no END_HEADERS: the header block is never finished.
    let block = h2_get_block(&p.addr.to_string(), "/half");
    bytes.extend(h2_frame(HEADERS, END_STREAM, 1, &block[..4]));
    s.write_all(&bytes).await.unwrap();
    let sent = Instant::now();

    // A hostile client: reads whatever comes, acknowledges nothing.
    let frames = within(STEP, "the proxy to drop the half-sent headers", async {
        let mut kinds = Vec::new();
        while let Some(f) = read_frame(&mut s).await {
            kinds.push(f.kind);
        }
        kinds
    })
    .await;
    let closed_after = sent.elapsed();
    eprintln!("half-sent h2 headers: closed after {closed_after:?}; frame types seen {frames:?}");
    assert!(
        closed_after >= Duration::from_millis(250),
        "closed after {closed_after:?}, before idle_timeout"
    );
    assert!(
        closed_after < Duration::from_millis(800 + 1500),
        "closed only after {closed_after:?}"
    );
    assert_eq!(up.hits_total(), 0, "half a request reached the upstream");
}

// ---------------------------------------------------------------------------------------------------------
// [server] max_connections

/// With `max_connections = 2` and two keep-alive connections open, a third connection's request gets no
/// answer (it waits in the backlog; nothing reaches the upstream) and `idemproxy_connections` reads 2 for
/// the proxy listener; once the client closes one of the two, the third is served. Without the cap every
/// connection would be accepted and served at once; if the slot of a closed connection were not given
/// back, the third would never be served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_leaves_further_connections_waiting_until_one_closes() {
    let up = Upstream::start();
    let p = Proxy::builder(up.url())
        .server("max_connections = 2\nidle_timeout = \"30s\"")
        .start()
        .await;
    let mut open = Vec::new();
    for i in 1..=2 {
        let mut c = H1::connect(p.addr).await;
        let path = format!("/mc-{i}");
        c.get(p.addr, &path).await;
        c.response()
            .await
            .assert_forwarded(200, format!("hit 1 GET {path}").as_bytes());
        open.push(c);
    }

    let mut third = H1::connect(p.addr).await;
    third.get(p.addr, "/mc-3").await;
    assert_eq!(
        third.watch(QUIET).await,
        Seen::Nothing,
        "a third connection was served (or closed) beyond max_connections = 2"
    );
    assert_eq!(up.hits_path("/mc-3"), 0);
    proxy_connections_become(&p, 2.0, "2 proxy connections while capped").await;
    assert_eq!(up.hits_path("/mc-3"), 0);

    drop(open.remove(0));
    third
        .response()
        .await
        .assert_forwarded(200, b"hit 1 GET /mc-3");
    // The other one was still served all along (keep-alive, same connection).
    open[0].get(p.addr, "/mc-2").await;
    open[0]
        .response()
        .await
        .assert_forwarded(200, b"hit 2 GET /mc-2");
}

// ---------------------------------------------------------------------------------------------------------
// Rule 18 and fds

const MIB: u64 = 1024 * 1024;

/// A connection with a small receive buffer (no autotuning), so that the proxy cannot push a large
/// response into the kernel and be done with it.
async fn slow_reader(addr: SocketAddr) -> TcpStream {
    let sock = TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(16 * 1024).unwrap();
    within(STEP, "connect", sock.connect(addr)).await.unwrap()
}

/// 30 slow readers of one recorded 8 MiB response (each reads only its first 4 KiB) make the proxy's RSS
/// grow by less than 80 MiB: they share the stored bytes. A copy per replay would be 30 × 8 MiB = 240 MiB.
/// The readers' receive buffers are small, so the proxy cannot hand a whole response to the kernel and
/// must hold each body while its reader is slow. The replays are checked to be replays, and one more
/// replay, read in full while the 30 are open, to carry the recorded bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_readers_of_one_large_replay_share_its_bytes() {
    const SIZE: usize = 8 * 1024 * 1024;
    const READERS: usize = 30;
    let up = Upstream::start();
    let p = Proxy::builder(up.url()).start().await;
    let pid = p.pid();
    let path = format!("/large?bytes={SIZE}");
    let r = post_key(p.addr, &path, "big-1", "").await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body.len(), SIZE);
    assert!(!r.replayed());
    // One complete replay first, so the baseline includes whatever a replay allocates once.
    let r = post_key(p.addr, &path, "big-1", "").await;
    assert!(r.replayed(), "{:?}", r.headers);
    assert_eq!(r.body.len(), SIZE);
    let before = procstat::rss_bytes(pid).unwrap();
    // The kernel must not be able to take a whole response off the proxy's hands (send buffer at most
    // tcp_wmem's maximum, plus the reader's small receive buffer), or the figure would measure nothing.
    if let Ok(wmem) = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_wmem") {
        let max: usize = wmem.split_whitespace().nth(2).unwrap().parse().unwrap();
        assert!(
            max + 256 * 1024 < SIZE,
            "tcp_wmem max {max} lets the kernel buffer a whole response"
        );
    }

    let req = raw_request(
        p.addr,
        "POST",
        &path,
        &[("Idempotency-Key", "big-1"), TEXT],
        b"",
    );
    let mut readers = Vec::new();
    for _ in 0..READERS {
        let mut s = slow_reader(p.addr).await;
        s.write_all(&req).await.unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        within(STEP, "the first bytes of a replay", async {
            while got.len() < 4096 {
                let n = s.read(&mut buf).await.unwrap();
                assert!(n > 0, "EOF after {} bytes", got.len());
                got.extend_from_slice(&buf[..n]);
            }
        })
        .await;
        let head = String::from_utf8_lossy(&got[..got.len().min(512)]).to_ascii_lowercase();
        assert!(head.starts_with("http/1.1 200"), "{head:?}");
        assert!(head.contains("idempotent-replayed: true"), "{head:?}");
        readers.push(s);
    }
    // Sampled a few times while all 30 are open (the proxy writes what the sockets accept meanwhile).
    let mut with = 0;
    for _ in 0..5 {
        with = with.max(procstat::rss_bytes(pid).unwrap());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let growth = with.saturating_sub(before);
    eprintln!(
        "RSS before: {:.1} MiB; with {READERS} slow readers of an 8 MiB replay: {:.1} MiB (growth {:.1} MiB)",
        before as f64 / MIB as f64,
        with as f64 / MIB as f64,
        growth as f64 / MIB as f64,
    );
    assert_eq!(up.hits_path("/large"), 1, "a replay reached the upstream");
    assert!(
        growth < 80 * MIB,
        "RSS grew by {growth} bytes with {READERS} slow readers: the replays copy the body"
    );

    // A replay read in full while the 30 are still open (sharing the same bytes) has the recorded body.
    let r = post_key(p.addr, &path, "big-1", "").await;
    assert!(r.replayed(), "{:?}", r.headers);
    assert_eq!(r.body.len(), SIZE);
    assert!(r.body.iter().all(|b| *b == b'x'), "replayed body differs");
    drop(readers);
}

/// 150 keep-alive connections, each answered once (a replay, so the upstream's pool does not change the
/// count) and then left idle, hold about 150 of the proxy's fds; with `idle_timeout = "2s"` the count falls
/// back to near its baseline, without the clients closing anything, and every client sees its connection
/// closed. Without the timeout those fds would stay taken for as long as the clients keep the connections.
/// (2 s: the 150 must all be open at once before the first idles out; they are opened 50 at a time.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_and_do_not_pile_up_fds() {
    const CONNS: usize = 150;
    const IDLE: Duration = Duration::from_secs(2);
    let up = Upstream::start();
    let p = Proxy::builder(up.url())
        .server("idle_timeout = \"2s\"")
        .start()
        .await;
    let pid = p.pid();
    post_key(p.addr, "/fd", "fd-1", "pay")
        .await
        .assert_forwarded(200, b"hit 1 POST /fd");
    proxy_connections_become(&p, 0.0, "no client connection open").await;
    let before = procstat::fd_count(pid).unwrap();

    let req = raw_request(
        p.addr,
        "POST",
        "/fd",
        &[("Idempotency-Key", "fd-1"), TEXT],
        b"pay",
    );
    let started = Instant::now();
    let mut conns = Vec::new();
    for _ in 0..CONNS / 50 {
        conns.extend(
            join_all((0..50).map(|_| {
                let req = req.clone();
                let addr = p.addr;
                async move {
                    let mut c = H1::connect(addr).await;
                    c.write(&req).await;
                    c.response().await.assert_replay(200, b"hit 1 POST /fd");
                    c
                }
            }))
            .await,
        );
    }
    let with = procstat::fd_count(pid).unwrap();
    let built = started.elapsed();
    eprintln!("proxy fds: before {before}; with {CONNS} idle connections {with} (all answered within {built:?})");
    assert!(
        built < IDLE - Duration::from_millis(500),
        "opening the connections took {built:?}: the first may already have idled out"
    );
    // (The baseline may still include the scrape's admin connection: 2 fds of slack.)
    assert!(
        with + 2 >= before + CONNS,
        "{with} fds with {CONNS} connections open, {before} before"
    );

    let after = eventually(
        IDLE + Duration::from_secs(10),
        "the proxy's fd count to fall back near its baseline",
        || async move {
            let n = procstat::fd_count(pid).unwrap();
            (n <= before + 5).then_some(n)
        },
    )
    .await;
    eprintln!(
        "proxy fds after idle_timeout: {after} ({:?} after the connections were answered)",
        started.elapsed() - built
    );
    // The proxy closed them: every client sees EOF.
    for mut c in conns {
        c.wait_closed("an idle connection after idle_timeout").await;
    }
    assert_eq!(up.hits_path("/fd"), 1);
}

/// Runs the futures concurrently on this task's runtime (spawned) and returns their outputs in order.
async fn join_all<F>(futs: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futs.map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(within(STEP, "a spawned client", h).await.unwrap());
    }
    out
}
