//! Concurrency of the real `idemproxy` binary: 100 concurrent requests with one key reach the upstream
//! exactly once, in `on_in_flight = "reject"` mode (409 + Retry-After) and in `"wait"` mode (everyone gets the
//! one result); a mismatch while in flight is 422; a released first request lets exactly one waiter forward;
//! `wait_timeout`; a client that disconnects mid-request still gets its result recorded.
//!
//! No sleeps: the upstream's gate route holds the first request and reports its arrival, so every duplicate is
//! provably sent while the first is in flight.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::client::raw_request;
use common::{eventually, post_key, within, Proxy, RawConn, Resp, Upstream};
use tokio::task::JoinHandle;

const TEXT: (&str, &str) = ("Content-Type", "text/plain");

async fn start(up: &Upstream, defaults: &str) -> Proxy {
    Proxy::builder(up.url()).defaults(defaults).start().await
}

/// POST `path` with `key` and `body` from a spawned task.
fn spawn_post(
    addr: std::net::SocketAddr,
    path: &'static str,
    key: &'static str,
    body: &'static str,
) -> JoinHandle<Resp> {
    tokio::spawn(async move { post_key(addr, path, key, body).await })
}

/// Await every handle (bounded in total), in order.
async fn join_all(handles: Vec<JoinHandle<Resp>>, what: &str) -> Vec<Resp> {
    within(Duration::from_secs(30), what, async {
        let mut out = Vec::with_capacity(handles.len());
        for h in handles {
            out.push(h.await.unwrap());
        }
        out
    })
    .await
}

/// Write `n` copies of a request on `n` raw connections (each write done before this returns), then read the
/// responses from spawned tasks.
async fn raw_duplicates(
    addr: std::net::SocketAddr,
    n: usize,
    path: &str,
    key: &str,
    body: &str,
) -> Vec<JoinHandle<Resp>> {
    let req = raw_request(
        addr,
        "POST",
        path,
        &[("Idempotency-Key", key), TEXT],
        body.as_bytes(),
    );
    let mut conns = Vec::with_capacity(n);
    for _ in 0..n {
        let mut c = RawConn::connect(addr).await;
        c.write(&req).await;
        conns.push(c);
    }
    conns
        .into_iter()
        .map(|mut c| tokio::spawn(async move { c.read_response().await }))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reject_mode_hundred_concurrent_requests_reach_the_upstream_once() {
    let up = Upstream::start();
    let p = start(&up, "on_in_flight = \"reject\"\nlease = \"60s\"").await;
    let first = spawn_post(p.addr, "/gate/r", "conc-reject", "payload");
    up.wait_gate_arrivals("r", 1).await;

    let dups: Vec<_> = (0..99)
        .map(|_| spawn_post(p.addr, "/gate/r", "conc-reject", "payload"))
        .collect();
    let dups = join_all(dups, "99 duplicates to be rejected").await;
    for r in &dups {
        r.assert_problem(409, "in-flight");
        let secs = r.retry_after();
        assert!(
            (1..=60).contains(&secs),
            "Retry-After {secs} for a 60 s lease"
        );
    }
    assert_eq!(up.gate_arrivals("r"), 1);

    up.open("r");
    let first = within(Duration::from_secs(15), "the first request", first)
        .await
        .unwrap();
    first.assert_forwarded(200, b"gate:r#1");
    post_key(p.addr, "/gate/r", "conc-reject", "payload")
        .await
        .assert_replay(200, b"gate:r#1");
    assert_eq!(up.hits_key("conc-reject"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_mode_hundred_concurrent_requests_all_get_the_one_result() {
    let up = Upstream::start();
    let p = start(&up, "on_in_flight = \"wait\"\nwait_timeout = \"30s\"").await;
    let first = spawn_post(p.addr, "/gate/w", "conc-wait", "payload");
    up.wait_gate_arrivals("w", 1).await;

    let waiters = raw_duplicates(p.addr, 99, "/gate/w", "conc-wait", "payload").await;
    assert_eq!(up.gate_arrivals("w"), 1, "a waiter reached the upstream");
    assert!(
        waiters.iter().all(|h| !h.is_finished()),
        "a waiter was answered while the first is in flight"
    );
    up.open("w");

    let first = within(Duration::from_secs(15), "the first request", first)
        .await
        .unwrap();
    first.assert_forwarded(200, b"gate:w#1");
    for r in join_all(waiters, "99 waiters").await {
        r.assert_replay(200, b"gate:w#1");
    }
    assert_eq!(up.hits_key("conc-wait"), 1);
}

async fn mismatch_while_in_flight(mode: &str) {
    let up = Upstream::start();
    let p = start(&up, &format!("on_in_flight = \"{mode}\"")).await;
    let first = spawn_post(p.addr, "/gate/m", "conc-mm", "payload-a");
    up.wait_gate_arrivals("m", 1).await;

    post_key(p.addr, "/gate/m", "conc-mm", "payload-b")
        .await
        .assert_problem(422, "fingerprint-mismatch");
    if mode == "reject" {
        post_key(p.addr, "/gate/m", "conc-mm", "payload-a")
            .await
            .assert_problem(409, "in-flight");
    }

    up.open("m");
    within(Duration::from_secs(15), "the first request", first)
        .await
        .unwrap()
        .assert_forwarded(200, b"gate:m#1");
    post_key(p.addr, "/gate/m", "conc-mm", "payload-a")
        .await
        .assert_replay(200, b"gate:m#1");
    assert_eq!(up.gate_arrivals("m"), 1);
}

#[tokio::test]
async fn reject_mode_mismatch_while_in_flight_is_422() {
    mismatch_while_in_flight("reject").await;
}

#[tokio::test]
async fn wait_mode_mismatch_while_in_flight_is_422_without_waiting() {
    mismatch_while_in_flight("wait").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_mode_released_first_lets_exactly_one_waiter_forward() {
    let up = Upstream::start();
    let p = start(&up, "on_in_flight = \"wait\"\nwait_timeout = \"30s\"").await;
    let first = spawn_post(p.addr, "/gate/rel", "conc-release", "payload");
    up.wait_gate_arrivals("rel", 1).await;
    let waiters = raw_duplicates(p.addr, 5, "/gate/rel", "conc-release", "payload").await;

    up.release("rel", 503);
    within(Duration::from_secs(15), "the released first request", first)
        .await
        .unwrap()
        .assert_forwarded(503, b"gate:rel#1");
    up.wait_gate_arrivals("rel", 2).await;
    up.open("rel");

    let answers = join_all(waiters, "5 waiters").await;
    let forwarded = answers.iter().filter(|r| !r.replayed()).count();
    assert_eq!(forwarded, 1, "exactly one waiter forwards: {answers:?}");
    for r in &answers {
        assert_eq!((r.status, &r.body[..]), (200, &b"gate:rel#2"[..]), "{r:?}");
    }
    assert_eq!(up.gate_arrivals("rel"), 2);
}

#[tokio::test]
async fn wait_mode_gives_up_after_wait_timeout_with_409() {
    let up = Upstream::start();
    let p = start(&up, "on_in_flight = \"wait\"\nwait_timeout = \"500ms\"").await;
    let first = spawn_post(p.addr, "/gate/wt", "conc-wt", "payload");
    up.wait_gate_arrivals("wt", 1).await;

    let t = Instant::now();
    post_key(p.addr, "/gate/wt", "conc-wt", "payload")
        .await
        .assert_problem(409, "in-flight");
    assert!(
        t.elapsed() >= Duration::from_millis(400),
        "answered after {:?}, before wait_timeout",
        t.elapsed()
    );

    up.open("wt");
    within(Duration::from_secs(15), "the first request", first)
        .await
        .unwrap()
        .assert_forwarded(200, b"gate:wt#1");
    assert_eq!(up.gate_arrivals("wt"), 1);
}

#[tokio::test]
async fn result_is_recorded_when_the_client_disconnects_mid_request() {
    let up = Upstream::start();
    let p = start(&up, "on_in_flight = \"reject\"").await;
    let req = raw_request(
        p.addr,
        "POST",
        "/gate/dc",
        &[("Idempotency-Key", "conc-dc"), TEXT],
        b"payload",
    );
    let mut conn = RawConn::connect(p.addr).await;
    conn.write(&req).await;
    up.wait_gate_arrivals("dc", 1).await;
    drop(conn);
    up.open("dc");

    let addr = p.addr;
    let r = eventually(
        Duration::from_secs(10),
        "the abandoned request to be recorded",
        || async move {
            let r = post_key(addr, "/gate/dc", "conc-dc", "payload").await;
            (r.status != 409).then_some(r)
        },
    )
    .await;
    r.assert_replay(200, b"gate:dc#1");
    assert_eq!(up.gate_arrivals("dc"), 1);
}

#[tokio::test]
async fn different_keys_do_not_block_each_other() {
    let up = Upstream::start();
    let p = start(&up, "on_in_flight = \"reject\"").await;
    let first = spawn_post(p.addr, "/gate/k", "conc-k1", "payload");
    up.wait_gate_arrivals("k", 1).await;
    let second = spawn_post(p.addr, "/gate/k", "conc-k2", "payload");
    up.wait_gate_arrivals("k", 2).await;
    up.open("k");
    let a = within(Duration::from_secs(15), "first", first)
        .await
        .unwrap();
    let b = within(Duration::from_secs(15), "second", second)
        .await
        .unwrap();
    a.assert_forwarded(200, b"gate:k#1");
    b.assert_forwarded(200, b"gate:k#2");
}
