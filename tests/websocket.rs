//! Protocol upgrades through the real binary: a WebSocket handshake on a pass-through route becomes a
//! byte tunnel (both directions, large payloads, clean close), also behind the TLS listener; an upgrade the
//! upstream declines is an ordinary response; an upgrade on a method under idempotency rules is refused
//! with `upgrade-not-allowed` and nothing is forwarded.
//!
//! The upstream is a raw TCP server: it answers `Upgrade: websocket` with `101`, greets, then echoes every
//! byte. No WebSocket framing is needed to prove the tunnel.

#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::client::raw_request;
use common::tls::{client_config, Ca};
use common::{raw_exchange, within, Proxy};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const LIMIT: Duration = Duration::from_secs(10);
const GREETING: &[u8] = b"hello from upstream\n";

/// A raw upstream: `101` + greeting + echo for `Upgrade: websocket`, `426` for any other request.
/// Keeps every request head it received.
struct EchoUpstream {
    addr: SocketAddr,
    heads: Arc<Mutex<Vec<String>>>,
}

impl EchoUpstream {
    async fn start() -> EchoUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let heads = Arc::new(Mutex::new(Vec::new()));
        let h = heads.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                tokio::spawn(serve_one(tcp, h.clone()));
            }
        });
        EchoUpstream { addr, heads }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn heads(&self) -> Vec<String> {
        self.heads.lock().unwrap().clone()
    }
}

async fn serve_one(mut tcp: TcpStream, heads: Arc<Mutex<Vec<String>>>) {
    let Ok((head, _rest)) = read_head(&mut tcp).await else {
        return;
    };
    heads.lock().unwrap().push(head.clone());
    let lower = head.to_ascii_lowercase();
    if lower.contains("\r\nupgrade: websocket") {
        let resp =
            "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
                    Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\nX-Upstream: echo\r\n\r\n";
        // Head and greeting in one write: the proxy must keep bytes that arrive with the 101.
        let mut out = resp.as_bytes().to_vec();
        out.extend_from_slice(GREETING);
        if tcp.write_all(&out).await.is_err() {
            return;
        }
        let (mut r, mut w) = tcp.split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
        let _ = w.shutdown().await;
    } else {
        let body = "no upgrade here";
        let resp = format!(
            "HTTP/1.1 426 Upgrade Required\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = tcp.write_all(resp.as_bytes()).await;
    }
}

/// Reads up to the blank line; returns the head and any bytes read past it.
async fn read_head<S: AsyncRead + Unpin>(s: &mut S) -> Result<(String, Vec<u8>), String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..i + 4]).into_owned();
            return Ok((head, buf[i + 4..].to_vec()));
        }
        let n = s.read(&mut chunk).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err(format!(
                "EOF before the end of the head: {:?}",
                String::from_utf8_lossy(&buf)
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.split("\r\n").skip(1).find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

fn ws_request(addr: SocketAddr, method: &str, path: &str, extra: &str) -> String {
    format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: keep-alive, Upgrade\r\n\
         Upgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\n{extra}\r\n"
    )
}

/// Reads exactly `n` bytes, starting with `pending` (bytes that came with the head).
async fn read_n<S: AsyncRead + Unpin>(s: &mut S, pending: &mut Vec<u8>, n: usize) -> Vec<u8> {
    within(LIMIT, "tunnel bytes", async {
        while pending.len() < n {
            let mut chunk = vec![0u8; 65536];
            let got = s.read(&mut chunk).await.unwrap();
            assert!(
                got > 0,
                "tunnel closed after {} of {n} bytes",
                pending.len()
            );
            pending.extend_from_slice(&chunk[..got]);
        }
    })
    .await;
    pending.drain(..n).collect()
}

/// The WebSocket handshake through the proxy, then greeting, echo both ways (small and large), close.
async fn handshake_and_echo<S>(mut s: S, addr: SocketAddr)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    s.write_all(ws_request(addr, "GET", "/ws/chat?room=1", "").as_bytes())
        .await
        .unwrap();
    let (head, mut pending) = within(LIMIT, "the 101", read_head(&mut s)).await.unwrap();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert_eq!(header(&head, "upgrade"), Some("websocket"), "{head}");
    assert!(
        header(&head, "connection").is_some_and(|v| v.eq_ignore_ascii_case("upgrade")),
        "{head}"
    );
    assert_eq!(
        header(&head, "sec-websocket-accept"),
        Some("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
    );
    assert_eq!(header(&head, "x-upstream"), Some("echo"));

    assert_eq!(read_n(&mut s, &mut pending, GREETING.len()).await, GREETING);
    s.write_all(b"ping-1").await.unwrap();
    assert_eq!(read_n(&mut s, &mut pending, 6).await, b"ping-1");
    let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let (mut r, mut w) = tokio::io::split(s);
    let writer = tokio::spawn(async move {
        w.write_all(&big).await.unwrap();
        w.flush().await.unwrap();
        (w, big)
    });
    let echoed = read_n(&mut r, &mut pending, 300_000).await;
    let (mut w, big) = within(LIMIT, "the big write", writer).await.unwrap();
    assert!(echoed == big, "the large payload came back altered");

    // Closing our side closes the upstream's, which closes ours: the tunnel ends cleanly.
    w.shutdown().await.unwrap();
    let mut rest = Vec::new();
    within(LIMIT, "the tunnel to close", r.read_to_end(&mut rest))
        .await
        .unwrap();
    assert!(
        rest.is_empty() && pending.is_empty(),
        "extra bytes {rest:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_on_a_pass_through_route_is_tunnelled() {
    let up = EchoUpstream::start().await;
    let p = Proxy::builder(up.url()).start().await;
    let tcp = TcpStream::connect(p.addr).await.unwrap();
    handshake_and_echo(tcp, p.addr).await;

    let heads = up.heads();
    assert_eq!(heads.len(), 1, "{heads:?}");
    let h = &heads[0];
    assert!(h.starts_with("GET /ws/chat?room=1 HTTP/1.1\r\n"), "{h}");
    assert_eq!(header(h, "upgrade"), Some("websocket"), "{h}");
    assert!(
        header(h, "connection").is_some_and(|v| v.eq_ignore_ascii_case("upgrade")),
        "only the upgrade token goes upstream: {h}"
    );
    assert_eq!(
        header(h, "sec-websocket-key"),
        Some("dGhlIHNhbXBsZSBub25jZQ==")
    );
    assert_eq!(header(h, "host"), Some(up.addr.to_string().as_str()));
    assert_eq!(header(h, "x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(header(h, "x-forwarded-proto"), Some("http"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_through_the_tls_listener() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("listener CA");
    let (cert, key) = ca.server_leaf().write(dir.path(), "server");
    let up = EchoUpstream::start().await;
    let p = Proxy::builder(up.url())
        .server(&format!(
            "tls = {{ cert = '{}', key = '{}' }}",
            cert.display(),
            key.display()
        ))
        .start()
        .await;
    // WebSocket over TLS is HTTP/1.1 (RFC 6455): the client offers only http/1.1.
    let tls = common::tls::connect(p.addr, &client_config(&[&ca], &[b"http/1.1"], None))
        .await
        .unwrap();
    handshake_and_echo(tls, p.addr).await;
    let heads = up.heads();
    assert_eq!(header(&heads[0], "x-forwarded-proto"), Some("https"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declined_upgrade_is_an_ordinary_response() {
    let up = EchoUpstream::start().await;
    let p = Proxy::builder(up.url()).start().await;
    let req = ws_request(p.addr, "GET", "/ws", "").replace("Upgrade: websocket", "Upgrade: foo/1");
    let r = raw_exchange(p.addr, req.as_bytes()).await;
    assert_eq!(r.status, 426, "{r:?}");
    assert_eq!(r.text(), "no upgrade here");
    assert!(r.header("upgrade").is_none());
    assert_eq!(up.heads().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_under_idempotency_rules_is_refused() {
    let up = EchoUpstream::start().await;
    let p = Proxy::builder(up.url())
        .extra("[[routes]]\nname = \"internal\"\npath = \"/internal/**\"\nenabled = false\n")
        .start()
        .await;
    for (method, extra) in [
        ("POST", "Idempotency-Key: ws-1\r\nContent-Length: 0\r\n"),
        ("PATCH", "Content-Length: 0\r\n"),
    ] {
        let req = ws_request(p.addr, method, "/ws", extra);
        let r = raw_exchange(p.addr, req.as_bytes()).await;
        let v = r.assert_problem(400, "upgrade-not-allowed");
        assert!(v["detail"].as_str().unwrap().contains(method), "{v}");
    }
    // Without the Upgrade header, the same POST is an ordinary protected request.
    let plain = raw_request(p.addr, "POST", "/ws", &[("Idempotency-Key", "ws-2")], b"");
    assert_eq!(raw_exchange(p.addr, &plain).await.status, 426);
    assert_eq!(
        up.heads().len(),
        1,
        "refused upgrades must not reach the upstream"
    );
    // `Upgrade: h2c` (curl --http2 on http://) is ignored, not refused: the POST is served over HTTP/1.1.
    let h2c = raw_request(
        p.addr,
        "POST",
        "/h2c",
        &[
            ("Idempotency-Key", "ws-3"),
            ("Connection", "Upgrade, HTTP2-Settings"),
            ("Upgrade", "h2c"),
            ("HTTP2-Settings", "AAMAAABkAAQCAAAAAAIAAAAA"),
        ],
        b"",
    );
    assert_eq!(raw_exchange(p.addr, &h2c).await.status, 426);
    let heads = up.heads();
    assert_eq!(heads.len(), 2);
    assert!(header(&heads[1], "upgrade").is_none(), "{}", heads[1]);
    assert!(
        header(&heads[1], "http2-settings").is_none(),
        "{}",
        heads[1]
    );

    // On a route without rules, a POST upgrade is a tunnel like any other.
    let mut tcp = TcpStream::connect(p.addr).await.unwrap();
    let req = ws_request(p.addr, "POST", "/internal/ws", "Content-Length: 0\r\n");
    tcp.write_all(req.as_bytes()).await.unwrap();
    let (head, mut pending) = within(LIMIT, "the 101", read_head(&mut tcp)).await.unwrap();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert_eq!(
        read_n(&mut tcp, &mut pending, GREETING.len()).await,
        GREETING
    );
}
