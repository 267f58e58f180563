//! Hostile input over raw TCP against the real binary. Every case gets a clear 4xx or a closed connection
//! (or, where the HTTP spec defines a safe reading, exactly that reading and nothing more), never a panic
//! (the process stays up and `/healthz` answers after every case), and never a forwarded request it should
//! not forward (checked on the upstream's record of what it received).
//!
//! Cases: ambiguous framing (two Content-Lengths, a Content-Length list or sign, unknown or non-final
//! Transfer-Encoding, chunked HTTP/1.0), conflicting Content-Length + Transfer-Encoding and CL.TE / TE.CL
//! smuggling attempts, oversized header / header count / URI, garbage and TLS bytes on the plain port,
//! keys with invalid UTF-8, control bytes, folding or repetition, deeply nested JSON with `key = "json"`
//! and with `fingerprint = "json"`, Host / absolute-form URIs that try to redirect the upstream, a
//! slowloris header trickle (`server.header_read_timeout = "1s"`), and connections that send nothing.

#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::upstream::Received;
use common::{post_key, send, Proxy, Upstream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Bound on reading everything a connection returns.
const READ_LIMIT: Duration = Duration::from_secs(8);

/// What came back on one connection.
#[derive(Debug)]
struct Exchange {
    /// Status of every complete response, in order.
    statuses: Vec<u16>,
    /// Raw bytes of the responses.
    raw: Vec<u8>,
    /// The proxy closed the connection (EOF or reset) within [`READ_LIMIT`].
    closed: bool,
}

impl Exchange {
    /// Refused: the connection was closed, and whatever was answered before that is a 4xx.
    fn refused(&self) -> bool {
        self.closed && self.statuses.iter().all(|s| (400..500).contains(s))
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.raw).into_owned()
    }
}

/// Splits a byte stream into HTTP/1.1 responses (Content-Length or chunked bodies); returns the statuses of
/// the complete ones.
fn statuses(mut b: &[u8]) -> Vec<u16> {
    let mut out = Vec::new();
    while let Some(end) = b.windows(4).position(|w| w == b"\r\n\r\n") {
        let head = String::from_utf8_lossy(&b[..end]).to_ascii_lowercase();
        let Some(status) = head
            .strip_prefix("http/1.1 ")
            .and_then(|s| s.get(..3))
            .and_then(|s| s.parse::<u16>().ok())
        else {
            break;
        };
        let mut rest = &b[end + 4..];
        let header = |name: &str| {
            head.lines()
                .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()))
        };
        if header("transfer-encoding:").is_some_and(|v| v.contains("chunked")) {
            loop {
                let Some(i) = rest.windows(2).position(|w| w == b"\r\n") else {
                    return out;
                };
                let size = usize::from_str_radix(
                    String::from_utf8_lossy(&rest[..i])
                        .split(';')
                        .next()
                        .unwrap()
                        .trim(),
                    16,
                )
                .unwrap_or(0);
                if rest.len() < i + 2 + size + 2 {
                    return out;
                }
                rest = &rest[i + 2 + size + 2..];
                if size == 0 {
                    break;
                }
            }
        } else {
            let len: usize = header("content-length:")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            if rest.len() < len {
                return out;
            }
            rest = &rest[len..];
        }
        out.push(status);
        b = rest;
    }
    out
}

/// Writes `bytes` (a write error is fine: the proxy may close early) and reads until the proxy closes the
/// connection or [`READ_LIMIT`] passes.
async fn exchange(addr: SocketAddr, bytes: &[u8]) -> Exchange {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let _ = s.write_all(bytes).await;
    read_to_close(&mut s, READ_LIMIT).await
}

async fn read_to_close(s: &mut TcpStream, limit: Duration) -> Exchange {
    let mut raw = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    let closed = tokio::time::timeout(limit, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => raw.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .is_ok();
    Exchange {
        statuses: statuses(&raw),
        raw,
        closed,
    }
}

/// A request head with `Connection: close`, so that a served request also ends with a close.
fn req(line: &str, headers: &[&str], body: &[u8]) -> Vec<u8> {
    let mut out = format!("{line}\r\nHost: client.example\r\n").into_bytes();
    for h in headers {
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"Connection: close\r\n\r\n");
    out.extend_from_slice(body);
    out
}

/// The process is still running and its admin listener answers.
async fn assert_alive(p: &mut Proxy, after: &str) {
    assert!(
        p.try_exit_status().is_none(),
        "the proxy exited after {after}; log:\n{}",
        p.logs().join("\n")
    );
    assert_eq!(
        p.admin_get("/healthz").await.status,
        200,
        "/healthz after {after}"
    );
}

fn with_key<'a>(reqs: &'a [Received], key: &str) -> Vec<&'a Received> {
    reqs.iter()
        .filter(|r| r.header("idempotency-key") == Some(key))
        .collect()
}

async fn proxy(up: &Upstream) -> Proxy {
    Proxy::builder(up.url())
        .server("header_read_timeout = \"1s\"")
        .extra(
            "[[routes]]\nname = \"json\"\npath = \"/json/**\"\nkey = \"json\"\njson_pointer = \"/id\"\nfingerprint = \"json\"\n\n\
             [[routes]]\nname = \"jsonfp\"\npath = \"/jsonfp/**\"\nfingerprint = \"json\"",
        )
        .start()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ambiguous_framing_and_malformed_requests_are_refused() {
    let up = Upstream::start();
    let mut p = proxy(&up).await;
    let post = "POST /echo HTTP/1.1";
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "two different Content-Lengths",
            req(
                post,
                &[
                    "Idempotency-Key: hx-1",
                    "Content-Length: 5",
                    "Content-Length: 6",
                ],
                b"hello!",
            ),
        ),
        (
            "Content-Length list",
            req(
                post,
                &["Idempotency-Key: hx-2", "Content-Length: 5, 6"],
                b"hello!",
            ),
        ),
        (
            "negative Content-Length",
            req(post, &["Idempotency-Key: hx-3", "Content-Length: -1"], b""),
        ),
        (
            "signed Content-Length",
            req(
                post,
                &["Idempotency-Key: hx-4", "Content-Length: +5"],
                b"hello",
            ),
        ),
        (
            "Content-Length overflowing u64",
            req(
                post,
                &[
                    "Idempotency-Key: hx-5",
                    "Content-Length: 99999999999999999999999",
                ],
                b"hello",
            ),
        ),
        (
            "unknown Transfer-Encoding",
            req(
                post,
                &["Idempotency-Key: hx-6", "Transfer-Encoding: xchunked"],
                b"5\r\nhello\r\n0\r\n\r\n",
            ),
        ),
        (
            "space before the colon",
            req(
                post,
                &["Idempotency-Key: hx-7", "Transfer-Encoding : chunked"],
                b"5\r\nhello\r\n0\r\n\r\n",
            ),
        ),
        (
            "chunked not the final coding",
            req(
                post,
                &[
                    "Idempotency-Key: hx-8",
                    "Transfer-Encoding: chunked, identity",
                ],
                b"5\r\nhello\r\n0\r\n\r\n",
            ),
        ),
        (
            "chunked HTTP/1.0",
            req(
                "POST /echo HTTP/1.0",
                &["Idempotency-Key: hx-9", "Transfer-Encoding: chunked"],
                b"5\r\nhello\r\n0\r\n\r\n",
            ),
        ),
        (
            "malformed chunk size",
            req(
                post,
                &["Idempotency-Key: hx-10", "Transfer-Encoding: chunked"],
                b"zz\r\nhello\r\n0\r\n\r\n",
            ),
        ),
        (
            "obsolete line folding",
            req(
                post,
                &["Idempotency-Key: hx-11", " folded", "Content-Length: 0"],
                b"",
            ),
        ),
        (
            "header name with a space",
            req(post, &["Idempotency Key: hx-12", "Content-Length: 0"], b""),
        ),
        ("request line garbage", b"GARBAGE\r\n\r\n".to_vec()),
        (
            "TLS ClientHello on the plain port",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\x00\x01\x02\x03".to_vec(),
        ),
        (
            "HTTP/2 preface followed by a malformed frame",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x04\x00\x00\x00\x00\x00\x00garbage!"
                .to_vec(),
        ),
    ];
    for (what, bytes) in &cases {
        let ex = exchange(p.addr, bytes).await;
        assert!(
            ex.refused(),
            "{what}: expected a 4xx or a closed connection, got {ex:?} ({:?})",
            ex.text()
        );
        assert_alive(&mut p, what).await;
    }
    assert_eq!(
        up.hits_total(),
        0,
        "refused requests reached the upstream: {:?}",
        up.requests()
    );
}

/// Content-Length together with Transfer-Encoding, with a second request hidden in the body under one of
/// the two readings, and a probe request behind it. RFC 9112 §6.1: chunked wins, and the connection must
/// be closed after the response (or the request refused). Either way nothing hidden reaches the upstream:
/// the proxy re-frames every request it forwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflicting_length_and_smuggling_attempts_never_reach_the_upstream() {
    let up = Upstream::start();
    let mut p = proxy(&up).await;
    let hidden = "GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n";
    let probe = "GET /after-probe HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    let cl_te = format!(
        "POST /status/201 HTTP/1.1\r\nHost: x\r\nIdempotency-Key: sm-clte\r\nContent-Length: {}\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{hidden}{probe}",
        5 + hidden.len()
    );
    let te_cl = format!(
        "POST /status/201 HTTP/1.1\r\nHost: x\r\nIdempotency-Key: sm-tecl\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n{:x}\r\n{hidden}\r\n0\r\n\r\n{probe}",
        hidden.len()
    );
    let doubled_te = format!(
        "POST /status/201 HTTP/1.1\r\nHost: x\r\nIdempotency-Key: sm-tete\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: x\r\nContent-Length: 4\r\n\r\n0\r\n\r\n{hidden}{probe}"
    );
    for (what, key, bytes) in [
        ("CL.TE", "sm-clte", cl_te),
        ("TE.CL", "sm-tecl", te_cl),
        ("TE.TE", "sm-tete", doubled_te),
    ] {
        let ex = exchange(p.addr, bytes.as_bytes()).await;
        assert!(ex.closed, "{what}: the connection must be closed: {ex:?}");
        let reqs = up.requests();
        let forwarded = with_key(&reqs, key);
        if !ex.refused() {
            assert_eq!(
                ex.statuses,
                vec![201],
                "{what}: one response, then the connection closes ({:?})",
                ex.text()
            );
            assert_eq!(forwarded.len(), 1, "{what}");
            // Chunked framing won: the hidden request is never a body, nor a request.
            let body = &forwarded[0].body;
            assert!(
                body.is_empty() || body.as_ref() == hidden.as_bytes(),
                "{what}: forwarded body {body:?}"
            );
            eprintln!(
                "[hostile] {what}: answered with chunked framing and the connection closed (RFC 9112 §6.1)"
            );
        } else {
            assert!(forwarded.is_empty(), "{what}: refused but forwarded");
        }
        assert!(
            reqs.iter()
                .all(|r| r.path != "/smuggled" && r.path != "/after-probe"),
            "{what}: a hidden request reached the upstream: {reqs:?}"
        );
        assert_alive(&mut p, what).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_heads_are_refused() {
    let up = Upstream::start();
    let mut p = proxy(&up).await;
    let big_value = "a".repeat(1024 * 1024);
    let big = req(
        "POST /echo HTTP/1.1",
        &[
            "Idempotency-Key: big-1",
            &format!("X-Big: {big_value}"),
            "Content-Length: 0",
        ],
        b"",
    );
    let many_headers: Vec<String> = (0..500).map(|i| format!("X-H{i}: v")).collect();
    let mut many_refs: Vec<&str> = many_headers.iter().map(String::as_str).collect();
    many_refs.extend(["Idempotency-Key: big-2", "Content-Length: 0"]);
    let many = req("POST /echo HTTP/1.1", &many_refs, b"");
    let long_uri = req(
        &format!("POST /{} HTTP/1.1", "u".repeat(200 * 1024)),
        &["Idempotency-Key: big-3", "Content-Length: 0"],
        b"",
    );
    let huge_key = req(
        "POST /echo HTTP/1.1",
        &[
            &format!("Idempotency-Key: {}", "k".repeat(64 * 1024)),
            "Content-Length: 0",
        ],
        b"",
    );
    for (what, bytes, statuses) in [
        ("a 1 MiB header", big, &[431u16, 400][..]),
        ("500 headers", many, &[431, 400]),
        ("a 200 KiB URI", long_uri, &[414, 400]),
        ("a 64 KiB key", huge_key, &[400]),
    ] {
        let ex = exchange(p.addr, &bytes).await;
        assert!(ex.refused(), "{what}: {ex:?}");
        assert!(
            ex.statuses.iter().all(|s| statuses.contains(s)),
            "{what}: statuses {:?}, expected one of {statuses:?}",
            ex.statuses
        );
        assert_alive(&mut p, what).await;
    }
    assert_eq!(up.hits_total(), 0, "{:?}", up.requests());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_keys_are_400_and_never_forwarded() {
    let up = Upstream::start();
    let mut p = proxy(&up).await;
    let cases: [(&str, &[u8]); 7] = [
        ("invalid UTF-8", b"\xff\xfe\xfd"),
        ("Latin-1 byte inside", b"caf\xe9"),
        ("SOH control byte", b"a\x01b"),
        ("DEL", b"a\x7fb"),
        ("NUL", b"a\x00b"),
        ("bare CR", b"a\rb"),
        ("sf-string with a control byte", b"\"a\x02b\""),
    ];
    for (what, key) in cases {
        let mut bytes = b"POST /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 1\r\nIdempotency-Key: ".to_vec();
        bytes.extend_from_slice(key);
        bytes.extend_from_slice(b"\r\n\r\nx");
        let ex = exchange(p.addr, &bytes).await;
        assert!(ex.refused(), "{what}: {ex:?}");
        assert!(
            ex.statuses.iter().all(|s| *s == 400),
            "{what}: {:?}",
            ex.text()
        );
        if !ex.statuses.is_empty() && ex.text().contains("problem+json") {
            assert!(
                ex.text().contains("\"code\":\"invalid-key\""),
                "{what}: {}",
                ex.text()
            );
        }
        assert_alive(&mut p, what).await;
    }
    // A key header sent twice is ambiguous: refused, whatever the two values.
    let r = send(
        p.addr,
        "POST",
        "/echo",
        &[
            ("Idempotency-Key", "twice-a"),
            ("Idempotency-Key", "twice-b"),
        ],
        "x",
    )
    .await;
    r.assert_problem(400, "invalid-key");
    assert_eq!(up.hits_total(), 0, "{:?}", up.requests());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deeply_nested_json_is_refused_or_handled_never_a_crash() {
    let up = Upstream::start();
    let mut p = proxy(&up).await;
    let ct = ("Content-Type", "application/json");
    let nest = |depth: usize| format!("{}{}", "[".repeat(depth), "]".repeat(depth));
    // key = "json": documents nested past the parser's limit are not JSON to it → 400, not forwarded.
    for (what, body) in [
        ("100k open brackets", "[".repeat(100_000)),
        (
            "a key next to 5000 nested arrays",
            format!("{{\"id\":\"deep-a\",\"x\":{}}}", nest(5000)),
        ),
        (
            "100k nested objects",
            format!("{}1{}", "{\"a\":".repeat(100_000), "}".repeat(100_000)),
        ),
    ] {
        let r = send(p.addr, "POST", "/json/e", &[ct], &body).await;
        r.assert_problem(400, "invalid-json-key");
        assert_alive(&mut p, what).await;
    }
    assert_eq!(up.hits_total(), 0, "{:?}", up.requests());

    // Within the limit: an ordinary request.
    let ok = format!("{{\"id\":\"deep-ok\",\"x\":{}}}", nest(100));
    let r = send(p.addr, "POST", "/json/e", &[ct], &ok).await;
    assert_eq!((r.status, r.replayed()), (200, false), "{r:?}");
    let r = send(p.addr, "POST", "/json/e", &[ct], &ok).await;
    assert_eq!((r.status, r.replayed()), (200, true), "{r:?}");

    // fingerprint = "json" with a header key: a body too deep to canonicalise is fingerprinted raw.
    let deep = nest(50_000);
    for _ in 0..2 {
        let _ = post_key(p.addr, "/jsonfp/e", "deep-fp", &deep).await;
    }
    let r = post_key(p.addr, "/jsonfp/e", "deep-fp", &deep).await;
    assert!(r.replayed(), "{r:?}");
    assert_eq!(
        up.count(|r| r.header("idempotency-key") == Some("deep-fp")),
        1
    );
    assert_alive(&mut p, "deep JSON fingerprints").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_and_absolute_uris_cannot_redirect_the_upstream() {
    let up = Upstream::start();
    let mut p = proxy(&up).await;
    let admin_host = format!("Host: {}", p.admin);
    let cases: [(&str, &str, Vec<&str>); 4] = [
        (
            "a foreign Host",
            "POST /headers HTTP/1.1",
            vec!["Host: evil.example"],
        ),
        (
            "the admin listener as Host",
            "POST /headers HTTP/1.1",
            vec![admin_host.as_str()],
        ),
        (
            "an absolute-form URI",
            "POST http://evil.example:81/headers HTTP/1.1",
            vec!["Host: evil.example:81"],
        ),
        (
            "two Host headers",
            "POST /headers HTTP/1.1",
            vec!["Host: a.example", "Host: b.example"],
        ),
    ];
    for (i, (what, line, hosts)) in cases.iter().enumerate() {
        let key = format!("host-{i}");
        let mut bytes = format!("{line}\r\n").into_bytes();
        for h in hosts {
            bytes.extend_from_slice(format!("{h}\r\n").as_bytes());
        }
        bytes.extend_from_slice(
            format!("Idempotency-Key: {key}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        );
        let ex = exchange(p.addr, &bytes).await;
        let reqs = up.requests();
        let got = with_key(&reqs, &key);
        if ex.refused() {
            assert!(got.is_empty(), "{what}: refused but forwarded");
            continue;
        }
        assert_eq!(ex.statuses, vec![200], "{what}: {}", ex.text());
        assert_eq!(got.len(), 1, "{what}");
        let r = got[0];
        assert_eq!(r.path, "/headers", "{what}");
        assert_eq!(
            r.header("host"),
            Some(up.addr().to_string().as_str()),
            "{what}: the upstream must get its own authority as Host: {r:?}"
        );
        assert_eq!(
            r.headers.iter().filter(|(n, _)| n == "host").count(),
            1,
            "{what}: one Host"
        );
        assert_alive(&mut p, what).await;
    }
}

/// `server.header_read_timeout = "1s"`: a client trickling its head one byte at a time is cut off after
/// about a second, and other clients are served meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_header_trickle_is_cut_off() {
    let up = Upstream::start();
    let mut p = proxy(&up).await;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    let t0 = Instant::now();
    s.write_all(b"POST /echo HTTP/1.1\r\nHost: x\r\nIdempotency-Key: slow-1\r\n")
        .await
        .unwrap();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut buf = [0u8; 1024];
    let cut_off = loop {
        tokio::select! {
            _ = tick.tick() => {
                if s.write_all(b"X").await.is_err() {
                    break t0.elapsed();
                }
            }
            r = s.read(&mut buf) => match r {
                Ok(0) | Err(_) => break t0.elapsed(),
                Ok(n) => {
                    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                    assert!(text.starts_with("HTTP/1.1 4"), "slowloris got {text:?}");
                }
            },
        }
        assert!(
            t0.elapsed() < Duration::from_secs(6),
            "the trickling client is still connected after {:?}",
            t0.elapsed()
        );
    };
    assert!(
        cut_off >= Duration::from_millis(900),
        "cut off after {cut_off:?}, before header_read_timeout"
    );
    eprintln!("[hostile] slowloris cut off after {cut_off:?} (header_read_timeout = 1s)");
    // Others were not blocked by it.
    post_key(p.addr, "/echo", "after-slow", "x")
        .await
        .assert_forwarded(201, b"x");
    assert_eq!(
        up.count(|r| r.header("idempotency-key") == Some("slow-1")),
        0
    );
    assert_alive(&mut p, "slowloris").await;
}

/// A connection that sends nothing at all (or stops inside the HTTP/2 preface) must not be held forever:
/// `server.header_read_timeout` bounds the time to receive a request head (README, configuration
/// reference). Known gap in hyper-util's `auto` builder (hyperium/hyper#3756, #3962): the protocol sniffing
/// read runs before hyper's header timer starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_that_send_nothing_are_closed_after_the_header_timeout() {
    let up = Upstream::start();
    let mut p = proxy(&up).await;
    let limit = Duration::from_secs(4);
    let mut checks = tokio::task::JoinSet::new();
    for (what, prefix) in [
        ("no byte at all", &b""[..]),
        ("half an HTTP/2 preface", &b"PRI * HTTP/2.0\r\n"[..]),
        ("one byte of a request line", &b"P"[..]),
    ] {
        let addr = p.addr;
        checks.spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(prefix).await.unwrap();
            let t0 = Instant::now();
            let ex = read_to_close(&mut s, limit).await;
            (!ex.refused()).then(|| format!("{what}: still open after {:?}", t0.elapsed()))
        });
    }
    let mut held = Vec::new();
    while let Some(r) = checks.join_next().await {
        held.extend(r.unwrap());
    }
    assert_alive(&mut p, "idle connections").await;
    assert!(
        held.is_empty(),
        "connections held past header_read_timeout = 1s (+3 s margin):\n{}",
        held.join("\n")
    );
}
