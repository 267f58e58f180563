//! Whose fault a timeout is (contract rule 15), against the real binary: a client whose request body
//! stalls past `[server] request_timeout` gets 408 `request-timeout` (nothing forwarded, the key free),
//! and 504 `upstream-timeout` means the upstream, and only the upstream, was slow. Each has its own
//! `idemproxy_requests_total` outcome.
//!
//! What this pins: before, a stalled body ran into the same timer as a slow upstream and was answered
//! 504 `upstream-timeout` (blaming the upstream, and counted as such), on keyed and pass-through requests
//! alike.

#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{post_key, within, Proxy, RawConn, Resp, Upstream};

/// The full body of the stalled requests: 100 bytes, of which only the first 10 are sent.
const BODY: &[u8; 100] = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789abcdefghijklmnopqrstuvwxyz!!";

/// Sends the head of `method path` with `Content-Length: 100` and 10 bytes of body, then nothing; returns
/// the proxy's answer and how long it took from the first byte sent.
async fn stalled(
    addr: SocketAddr,
    method: &str,
    path: &str,
    key: Option<&str>,
) -> (Resp, Duration) {
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n",
        BODY.len()
    );
    if let Some(key) = key {
        head.push_str(&format!("Idempotency-Key: {key}\r\n"));
    }
    head.push_str("\r\n");
    let mut conn = RawConn::connect(addr).await;
    // The proxy's timer cannot start before it has the head: `t0` is a lower bound of its start.
    let t0 = Instant::now();
    conn.write(head.as_bytes()).await;
    conn.write(&BODY[..10]).await;
    let resp = conn.read_response().await;
    (resp, t0.elapsed())
}

/// About `request_timeout` (1 s), and bounded.
fn assert_about_one_second(took: Duration, what: &str) {
    assert!(
        took >= Duration::from_millis(900) && took <= Duration::from_secs(8),
        "{what}: answered after {took:?}, expected about 1 s"
    );
}

/// The sum of `idemproxy_requests_total` over every series with `outcome="{outcome}"`.
async fn requests_with_outcome(p: &Proxy, outcome: &str) -> f64 {
    let r = p.admin_get("/metrics").await;
    assert_eq!(r.status, 200, "{r:?}");
    let label = format!("outcome=\"{outcome}\"");
    r.text()
        .lines()
        .filter(|l| l.starts_with("idemproxy_requests_total{") && l.contains(&label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn proxy_with_request_timeout(up: &Upstream) -> Proxy {
    Proxy::builder(up.url())
        .server("request_timeout = \"1s\"")
        .start()
        .await
}

/// A keyed POST whose body stalls gets 408 `request-timeout` after about `request_timeout`; nothing
/// reached the upstream and the key stayed free: the complete request sent afterwards is forwarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_body_is_408_and_the_key_stays_free() {
    let up = Upstream::start();
    let p = proxy_with_request_timeout(&up).await;
    let (r, took) = stalled(p.addr, "POST", "/echo", Some("stall-1")).await;
    r.assert_problem(408, "request-timeout");
    assert_about_one_second(took, "stalled keyed POST");
    assert_eq!(up.hits_total(), 0, "{:?}", up.requests());

    let body = std::str::from_utf8(BODY).unwrap();
    post_key(p.addr, "/echo", "stall-1", body)
        .await
        .assert_forwarded(201, BODY);
    post_key(p.addr, "/echo", "stall-1", body)
        .await
        .assert_replay(201, BODY);
    assert_eq!(up.hits_key("stall-1"), 1);
}

/// A pass-through request (a GET, a PUT: not under rules) whose body stalls is the client's fault too:
/// 408 `request-timeout`, not 504.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_pass_through_body_is_408_not_504() {
    let up = Upstream::start();
    let p = proxy_with_request_timeout(&up).await;
    for method in ["PUT", "GET"] {
        let (r, took) = stalled(p.addr, method, "/stall-pass", None).await;
        assert_ne!(
            r.status, 504,
            "{method}: a stalled client body blamed on the upstream"
        );
        r.assert_problem(408, "request-timeout");
        assert_about_one_second(took, method);
    }
    assert_eq!(
        up.hits_total(),
        0,
        "an incomplete body was delivered as a complete request: {:?}",
        up.requests()
    );
}

/// The 408 is counted under its own outcome, `request_timeout`, not as an upstream timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_body_is_counted_as_request_timeout() {
    let up = Upstream::start();
    let p = proxy_with_request_timeout(&up).await;
    assert_eq!(requests_with_outcome(&p, "request_timeout").await, 0.0);
    let (r, _) = stalled(p.addr, "POST", "/echo", Some("stall-metrics")).await;
    r.assert_problem(408, "request-timeout");
    assert_eq!(requests_with_outcome(&p, "request_timeout").await, 1.0);
    assert_eq!(requests_with_outcome(&p, "upstream_timeout").await, 0.0);
}

/// An upstream slower than `upstream.timeout` (a gate that is never opened) gives 504 `upstream-timeout`,
/// counted as `upstream_timeout`; the key is freed (a retry is forwarded again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_upstream_is_504_upstream_timeout() {
    let up = Upstream::start();
    let p = Proxy::builder(up.url())
        .upstream("timeout = \"1s\"")
        .start()
        .await;
    for attempt in 1..=2u64 {
        let t0 = Instant::now();
        let r = within(
            Duration::from_secs(10),
            "the answer to a request held by the upstream",
            post_key(p.addr, "/gate/never", "slow-up-1", "x"),
        )
        .await;
        r.assert_problem(504, "upstream-timeout");
        assert_about_one_second(t0.elapsed(), "slow upstream");
        assert_eq!(up.gate_arrivals("never"), attempt, "the key was not freed");
    }
    assert_eq!(requests_with_outcome(&p, "upstream_timeout").await, 2.0);
    assert_eq!(requests_with_outcome(&p, "request_timeout").await, 0.0);
}

/// `request_timeout` running out while the (complete) request is at the upstream is the upstream's
/// fault: 504 `upstream-timeout`, not 408.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_timeout_at_the_upstream_is_504_not_408() {
    let up = Upstream::start();
    let p = proxy_with_request_timeout(&up).await;
    let t0 = Instant::now();
    let r = post_key(p.addr, "/gate/held", "held-1", "x").await;
    r.assert_problem(504, "upstream-timeout");
    assert_about_one_second(t0.elapsed(), "request_timeout at the upstream");
    assert_eq!(up.gate_arrivals("held"), 1);
    assert_eq!(requests_with_outcome(&p, "upstream_timeout").await, 1.0);
    assert_eq!(requests_with_outcome(&p, "request_timeout").await, 0.0);
}

/// When `request_timeout` runs out while a claimed request is at the upstream, the 504 means what it
/// says everywhere else: the exchange was given up and the key is free, so the retry is forwarded,
/// not answered 409 and later replayed. (Found by review: the exchange used to go on, detached, and
/// record its late result.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_timeout_at_the_upstream_frees_the_key() {
    let up = Upstream::start();
    let p = Proxy::builder(up.url())
        .server("request_timeout = \"1s\"")
        .upstream("timeout = \"30s\"")
        .start()
        .await;
    post_key(p.addr, "/gate/late", "late-1", "x")
        .await
        .assert_problem(504, "upstream-timeout");
    let r = post_key(p.addr, "/gate/late", "late-1", "x").await;
    r.assert_problem(504, "upstream-timeout");
    assert_eq!(
        up.gate_arrivals("late"),
        2,
        "the retry after a 504 was not forwarded (key still held)"
    );
    up.open("late");
    // Nothing was recorded: the next retry is forwarded again and answered this time.
    let r = post_key(p.addr, "/gate/late", "late-1", "x").await;
    assert_eq!(r.status, 200, "{r:?}");
    assert!(!r.replayed());
}
