//! Fault injection. Each fault has one defined outcome — the status the client sees, and whether the key is
//! freed or recorded — checked by a retry and by the upstream's hit count; and no claim outlives its lease.
//!
//! - Upstream faults (real binary, raw-TCP [`ChaosUpstream`]): reset before/after the head and mid-body,
//!   clean close mid-body, truncated or malformed chunking, garbage instead of HTTP, a malformed header
//!   line → `502 upstream-failed`, key freed (502 is a release status); with 502 removed from
//!   `release_statuses` the 502 is recorded and replayed instead. A stall before the head or mid-body →
//!   `504 upstream-timeout` after `upstream.timeout`, key freed (or recorded without 504 in the list).
//!   A body over `max_response_body` that breaks after the record was made stays recorded (status and
//!   headers, body omitted). An upstream slower than the lease keeps its claim (the owner is alive).
//! - Client faults (real binary): disconnect mid-upload (nothing claimed, nothing forwarded), mid-wait (the
//!   waiter stops waiting, the first request is unaffected), mid-download (the result was recorded before
//!   the first byte went out: the retry replays it).
//! - Store faults (in-process proxy over [`FailingStore`] on sled): claim fails with `on_store_error =
//!   "reject"` (503 `store-unavailable`, `Retry-After: 1`, nothing forwarded) and `"pass"` (forwarded,
//!   `Idempotency-Degraded: true`); complete fails after the upstream answered (the client still gets the
//!   answer; the claim holds the key at most until its lease ends); release fails (the same bound).

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::chaos::ChaosUpstream;
use common::client::raw_request;
use common::in_process::InProcess;
use common::{eventually, metrics, post_key, try_send, within, Proxy, RawConn, Resp, Upstream};
use idemproxy::store::testing::failing::{FailingStore, Op};
use idemproxy::{clock::SystemClock, config::SyncPolicy, store::Store};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TEXT: (&str, &str) = ("Content-Type", "text/plain");

/// Upstream faults that break the exchange after the request was sent.
const BROKEN: [&str; 9] = [
    "reset-before-response",
    "reset-after-headers",
    "reset-mid-body",
    "close-mid-body",
    "truncated-chunked",
    "bad-chunk",
    "garbage",
    "garbage-binary",
    "bad-header",
];

/// A proxy in front of the chaos upstream: `upstream.timeout = 1s`; `/rec/**` records 502 and 504 instead
/// of freeing the key.
async fn chaos_proxy(up: &ChaosUpstream) -> Proxy {
    Proxy::builder(up.url())
        .upstream("timeout = \"1s\"")
        .defaults("lease = \"30s\"")
        .extra("[[routes]]\nname = \"rec\"\npath = \"/rec/**\"\nrelease_statuses = [429, 503]")
        .start()
        .await
}

/// The key must be free: the retry is forwarded, not refused with 409.
fn assert_freed(r: &Resp, key: &str, hits: usize) {
    assert_ne!(
        r.status, 409,
        "{key}: the key is still claimed after the fault: {r:?}"
    );
    r.assert_forwarded(200, format!("ok {key} #{hits}").as_bytes());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_upstream_answers_are_502_and_free_the_key() {
    let up = ChaosUpstream::start();
    let p = chaos_proxy(&up).await;
    for mode in BROKEN {
        let key = format!("free-{mode}");
        let path = format!("/{mode}?fail=1");
        let r = post_key(p.addr, &path, &key, "pay").await;
        r.assert_problem(502, "upstream-failed");
        assert_eq!(
            up.hits_key(&key),
            1,
            "{mode}: sent once (no retry by the proxy's client)"
        );
        let retry = post_key(p.addr, &path, &key, "pay").await;
        assert_freed(&retry, &key, 2);
        post_key(p.addr, &path, &key, "pay")
            .await
            .assert_replay(200, format!("ok {key} #2").as_bytes());
        assert_eq!(up.hits_key(&key), 2, "{mode}");
    }
    assert_eq!(
        p.admin_get("/healthz").await.status,
        200,
        "alive after every fault"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_upstream_answers_are_recorded_when_502_is_not_a_release_status() {
    let up = ChaosUpstream::start();
    let p = chaos_proxy(&up).await;
    for mode in BROKEN {
        let key = format!("rec-{mode}");
        let path = format!("/rec/{mode}?fail=1");
        let first = post_key(p.addr, &path, &key, "pay").await;
        first.assert_problem(502, "upstream-failed");
        let again = post_key(p.addr, &path, &key, "pay").await;
        assert_eq!(
            again.status, 502,
            "{mode}: recorded 502 replayed: {again:?}"
        );
        assert!(again.replayed(), "{mode}: {again:?}");
        assert_eq!(again.body, first.body, "{mode}: same problem body");
        assert_eq!(up.hits_key(&key), 1, "{mode}: never forwarded again");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_upstream_is_504_after_the_timeout_and_frees_or_records_the_key() {
    let up = ChaosUpstream::start();
    let p = chaos_proxy(&up).await;
    for mode in ["stall-headers", "stall-body"] {
        // Freed (504 is a release status by default).
        let key = format!("free-{mode}");
        let path = format!("/{mode}?fail=1");
        let t0 = Instant::now();
        post_key(p.addr, &path, &key, "pay")
            .await
            .assert_problem(504, "upstream-timeout");
        let took = t0.elapsed();
        assert!(
            took >= Duration::from_millis(900) && took < Duration::from_secs(8),
            "{mode}: 504 after {took:?} with upstream.timeout = 1s"
        );
        assert_freed(&post_key(p.addr, &path, &key, "pay").await, &key, 2);
        assert_eq!(up.hits_key(&key), 2);

        // Recorded (504 removed from release_statuses).
        let key = format!("rec-{mode}");
        let path = format!("/rec/{mode}?fail=1");
        let first = post_key(p.addr, &path, &key, "pay").await;
        first.assert_problem(504, "upstream-timeout");
        let again = post_key(p.addr, &path, &key, "pay").await;
        assert_eq!((again.status, again.replayed()), (504, true), "{again:?}");
        assert_eq!(up.hits_key(&key), 1);
    }
}

/// Not defined by the README (reported): a response over `max_response_body` is recorded (status and
/// headers) before it is streamed; if the upstream then breaks mid-stream, the first client gets a broken
/// body, and the record stays — retries get the replay with the body omitted, never a second execution.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_response_that_breaks_mid_stream_stays_recorded_without_body() {
    let up = ChaosUpstream::start();
    let p = Proxy::builder(up.url())
        .server("max_response_body = \"16KiB\"")
        .start()
        .await;
    let first = try_send(
        p.addr,
        "POST",
        "/big-then-reset",
        &[("Idempotency-Key", "big-1"), TEXT],
        "pay",
    )
    .await;
    assert!(
        first.is_err(),
        "the first client must see the broken stream, got {first:?}"
    );
    let r = post_key(p.addr, "/big-then-reset", "big-1", "pay").await;
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.replayed(), "{r:?}");
    assert_eq!(r.header("idempotency-replay"), Some("omitted"), "{r:?}");
    assert!(r.body.is_empty());
    assert_eq!(up.hits_key("big-1"), 1);
}

/// An upstream slower than the lease: a live owner keeps its claim however long its upstream call runs
/// (the lease only bounds a dead owner), so a duplicate after the lease deadline is refused (reject) or
/// keeps waiting (wait) and is never forwarded a second time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_slower_than_the_lease_keeps_its_claim() {
    let up = Upstream::start();
    let p = Proxy::builder(up.url())
        .defaults("lease = \"1s\"\non_in_flight = \"reject\"")
        .extra("[[routes]]\nname = \"wait\"\npath = \"/gate/slw\"\non_in_flight = \"wait\"\nlease = \"1s\"")
        .start()
        .await;
    let addr = p.addr;
    let first = tokio::spawn(async move { post_key(addr, "/gate/sl", "slow-1", "pay").await });
    let first_w = tokio::spawn(async move { post_key(addr, "/gate/slw", "slow-2", "pay").await });
    up.wait_gate_arrivals("sl", 1).await;
    up.wait_gate_arrivals("slw", 1).await;
    // Nothing announces a lease deadline passing: let it pass.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    post_key(addr, "/gate/sl", "slow-1", "pay")
        .await
        .assert_problem(409, "in-flight");
    let waiter = tokio::spawn(async move { post_key(addr, "/gate/slw", "slow-2", "pay").await });
    metric_becomes(
        &p,
        "idemproxy_waiting",
        1.0,
        "the duplicate to wait past the lease",
    )
    .await;
    assert_eq!(
        (up.gate_arrivals("sl"), up.gate_arrivals("slw")),
        (1, 1),
        "a duplicate was forwarded while the first was still running"
    );
    up.open("sl");
    up.open("slw");
    within(Duration::from_secs(15), "the first requests", async {
        first.await.unwrap().assert_forwarded(200, b"gate:sl#1");
        first_w.await.unwrap().assert_forwarded(200, b"gate:slw#1");
        waiter.await.unwrap().assert_replay(200, b"gate:slw#1");
    })
    .await;
    post_key(addr, "/gate/sl", "slow-1", "pay")
        .await
        .assert_replay(200, b"gate:sl#1");
    assert_eq!((up.gate_arrivals("sl"), up.gate_arrivals("slw")), (1, 1));
}

// ---------------------------------------------------------------------------------------------------------
// Client faults.

/// Waits (bounded) until the proxy's metric `name` equals `want`.
async fn metric_becomes(p: &Proxy, name: &str, want: f64, what: &str) {
    eventually(Duration::from_secs(10), what, || async move {
        (metrics::scrape(p, name).await == want).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_disconnect_mid_upload_claims_nothing_and_forwards_nothing() {
    let up = Upstream::start();
    let p = Proxy::builder(up.url()).start().await;
    let heads = [
        // Content-Length body cut short.
        (
            "up-cl",
            "Content-Length: 1000\r\n\r\n0123456789".to_string(),
        ),
        // Chunked body without its last chunk.
        (
            "up-chunked",
            "Transfer-Encoding: chunked\r\n\r\na\r\n0123456789\r\n".to_string(),
        ),
    ];
    for (key, rest) in heads {
        let req = format!(
            "POST /echo HTTP/1.1\r\nHost: x\r\nIdempotency-Key: {key}\r\nContent-Type: text/plain\r\n{rest}"
        );
        let mut c = RawConn::connect(p.addr).await;
        c.write(req.as_bytes()).await;
        metric_becomes(
            &p,
            "idemproxy_inflight",
            1.0,
            "the upload to be in progress",
        )
        .await;
        drop(c);
        metric_becomes(
            &p,
            "idemproxy_inflight",
            0.0,
            "the proxy to drop the upload",
        )
        .await;
        assert_eq!(up.hits_key(key), 0, "{key}: a partial upload was forwarded");
        // Nothing was claimed: the complete request is forwarded at once, then replayed.
        post_key(p.addr, "/echo", key, "0123456789")
            .await
            .assert_forwarded(201, b"0123456789");
        post_key(p.addr, "/echo", key, "0123456789")
            .await
            .assert_replay(201, b"0123456789");
        assert_eq!(up.hits_key(key), 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_disconnect_mid_wait_stops_the_waiter_and_not_the_first_request() {
    let up = Upstream::start();
    let p = Proxy::builder(up.url())
        .defaults("on_in_flight = \"wait\"\nwait_timeout = \"30s\"")
        .start()
        .await;
    let addr = p.addr;
    let first = tokio::spawn(async move { post_key(addr, "/gate/mw", "mw-1", "pay").await });
    up.wait_gate_arrivals("mw", 1).await;

    let req = raw_request(
        addr,
        "POST",
        "/gate/mw",
        &[("Idempotency-Key", "mw-1"), TEXT],
        b"pay",
    );
    let mut waiter = RawConn::connect(addr).await;
    waiter.write(&req).await;
    metric_becomes(&p, "idemproxy_waiting", 1.0, "the duplicate to wait").await;
    drop(waiter);
    metric_becomes(
        &p,
        "idemproxy_waiting",
        0.0,
        "the disconnected waiter to stop waiting (long before wait_timeout = 30s)",
    )
    .await;
    assert_eq!(up.gate_waiting("mw"), 1, "the first request is still held");

    up.open("mw");
    within(Duration::from_secs(15), "the first request", first)
        .await
        .unwrap()
        .assert_forwarded(200, b"gate:mw#1");
    post_key(addr, "/gate/mw", "mw-1", "pay")
        .await
        .assert_replay(200, b"gate:mw#1");
    assert_eq!(up.gate_arrivals("mw"), 1);
}

/// Sends `POST path` with `key`, reads the response head and at least `bytes` of the body, then drops the
/// connection.
async fn download_partly(addr: std::net::SocketAddr, path: &str, key: &str, bytes: usize) {
    let req = raw_request(addr, "POST", path, &[("Idempotency-Key", key), TEXT], b"");
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(&req).await.unwrap();
    let mut got = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    within(
        Duration::from_secs(15),
        "the first bytes of the download",
        async {
            while got.len() < bytes {
                let n = s.read(&mut buf).await.unwrap();
                assert!(n > 0, "EOF after {} bytes", got.len());
                got.extend_from_slice(&buf[..n]);
            }
        },
    )
    .await;
    assert!(
        got.starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&got[..64])
    );
    drop(s);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_disconnect_mid_download_keeps_the_recorded_result() {
    const SIZE: usize = 4 * 1024 * 1024;
    let up = Upstream::start();
    let p = Proxy::builder(up.url()).start().await;
    let path = format!("/large?bytes={SIZE}");
    download_partly(p.addr, &path, "dl-1", 64 * 1024).await;
    let r = post_key(p.addr, &path, "dl-1", "").await;
    assert_eq!(r.status, 200);
    assert!(r.replayed(), "{:?}", r.headers);
    assert_eq!(r.body.len(), SIZE, "the whole body was recorded");
    assert_eq!(up.hits_path("/large"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_disconnect_mid_download_of_an_oversize_body_keeps_the_record_without_body() {
    const SIZE: usize = 4 * 1024 * 1024;
    let up = Upstream::start();
    let p = Proxy::builder(up.url())
        .server("max_response_body = \"64KiB\"")
        .start()
        .await;
    let path = format!("/large?bytes={SIZE}");
    download_partly(p.addr, &path, "dlo-1", 128 * 1024).await;
    metric_becomes(
        &p,
        "idemproxy_inflight",
        0.0,
        "the abandoned download to end",
    )
    .await;
    let r = post_key(p.addr, &path, "dlo-1", "").await;
    assert_eq!(r.status, 200);
    assert!(r.replayed(), "{:?}", r.headers);
    assert_eq!(r.header("idempotency-replay"), Some("omitted"));
    assert!(r.body.is_empty());
    assert_eq!(up.hits_path("/large"), 1);
}

// ---------------------------------------------------------------------------------------------------------
// Store faults, through the `Store` seam.

const LEASE: Duration = Duration::from_secs(1);

struct StoreRig {
    up: Upstream,
    store: Arc<FailingStore>,
    proxy: InProcess,
    _dir: tempfile::TempDir,
}

async fn store_rig(on_store_error: &str) -> StoreRig {
    let up = Upstream::start();
    let dir = tempfile::tempdir().unwrap();
    let sled =
        idemproxy::store::sled::open_default(dir.path(), SyncPolicy::Always, Arc::new(SystemClock))
            .unwrap();
    let store = FailingStore::new(Arc::new(sled));
    let config = format!(
        "[upstream]\nurl = \"{}\"\ntimeout = \"10s\"\n\n[defaults]\nlease = \"{}ms\"\non_store_error = \"{on_store_error}\"\n",
        up.url(),
        LEASE.as_millis()
    );
    let proxy = InProcess::start(&config, store.clone() as Arc<dyn Store>).await;
    StoreRig {
        up,
        store,
        proxy,
        _dir: dir,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claim_failure_with_reject_is_503_and_forwards_nothing() {
    let rig = store_rig("reject").await;
    let addr = rig.proxy.addr;
    rig.store.fail(Op::Claim, u32::MAX);
    for _ in 0..3 {
        let r = post_key(addr, "/echo", "sf-1", "pay").await;
        r.assert_problem(503, "store-unavailable");
        assert_eq!(r.retry_after(), 1);
    }
    assert_eq!(
        rig.up.hits_total(),
        0,
        "nothing forwarded while the store fails"
    );
    rig.store.heal();
    post_key(addr, "/echo", "sf-1", "pay")
        .await
        .assert_forwarded(201, b"pay");
    post_key(addr, "/echo", "sf-1", "pay")
        .await
        .assert_replay(201, b"pay");
    assert_eq!(rig.up.hits_key("sf-1"), 1);
    assert_eq!(rig.store.injected(Op::Claim), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claim_failure_with_pass_forwards_unprotected_and_marks_it_degraded() {
    let rig = store_rig("pass").await;
    let addr = rig.proxy.addr;
    rig.store.fail(Op::Claim, u32::MAX);
    for n in 1..=2 {
        let r = post_key(addr, "/echo", "sp-1", "pay").await;
        r.assert_forwarded(201, b"pay");
        assert_eq!(r.header("idempotency-degraded"), Some("true"), "{r:?}");
        assert_eq!(
            rig.up.hits_key("sp-1"),
            n,
            "unprotected: forwarded every time"
        );
    }
    rig.store.heal();
    let r = post_key(addr, "/echo", "sp-1", "pay").await;
    r.assert_forwarded(201, b"pay");
    assert_eq!(r.header("idempotency-degraded"), None);
    post_key(addr, "/echo", "sp-1", "pay")
        .await
        .assert_replay(201, b"pay");
    assert_eq!(rig.up.hits_key("sp-1"), 3);
}

/// Re-sends until the key is no longer held by a claim; the claim must not outlive its lease by more
/// than the margin. Returns the first answer that was not 409.
async fn freed_within_lease(addr: std::net::SocketAddr, key: &str, since: Instant) -> Resp {
    let margin = Duration::from_secs(4);
    let key = key.to_string();
    let r = eventually(
        LEASE + margin,
        &format!("the claim on {key} to end with its {LEASE:?} lease (it is stuck)"),
        || {
            let key = key.clone();
            async move {
                let r = post_key(addr, "/echo", &key, "pay").await;
                (r.status != 409).then_some(r)
            }
        },
    )
    .await;
    assert!(
        since.elapsed() >= LEASE,
        "freed after {:?}, inside the lease",
        since.elapsed()
    );
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn complete_failure_is_not_acknowledged_and_the_claim_ends_with_its_lease() {
    for mode in ["reject", "pass"] {
        let rig = store_rig(mode).await;
        let addr = rig.proxy.addr;
        let key = format!("cf-{mode}");
        rig.store.fail(Op::Complete, 1);
        let t0 = Instant::now();
        // The upstream answered, but the answer could not be made durable: it is not passed on
        // (rule 14: a result is acknowledged only once it is durable).
        let r = post_key(addr, "/echo", &key, "pay").await;
        r.assert_problem(503, "store-unavailable");
        assert_eq!(rig.up.hits_key(&key), 1, "{mode}");
        assert_eq!(rig.store.injected(Op::Complete), 1);
        // Unknown outcome on record: the key stays claimed (not forwarded again) ...
        let r = post_key(addr, "/echo", &key, "pay").await;
        if t0.elapsed() < LEASE {
            r.assert_problem(409, "in-flight");
        }
        // ... but only until its lease ends; then one retry takes it over.
        let r = freed_within_lease(addr, &key, t0).await;
        r.assert_forwarded(201, b"pay");
        post_key(addr, "/echo", &key, "pay")
            .await
            .assert_replay(201, b"pay");
        assert_eq!(rig.up.hits_key(&key), 2, "{mode}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn complete_failing_after_its_write_replays_the_written_result() {
    let rig = store_rig("reject").await;
    let addr = rig.proxy.addr;
    rig.store.complete_fails_after_write(true);
    rig.store.fail(Op::Complete, 1);
    // The store said it failed: the first client is not told of a result it cannot vouch for ...
    post_key(addr, "/echo", "cfa-1", "pay")
        .await
        .assert_problem(503, "store-unavailable");
    // ... and the write that did happen is replayed, never re-executed.
    post_key(addr, "/echo", "cfa-1", "pay")
        .await
        .assert_replay(201, b"pay");
    assert_eq!(rig.up.hits_key("cfa-1"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_failure_passes_the_answer_on_and_the_claim_ends_with_its_lease() {
    let rig = store_rig("reject").await;
    let addr = rig.proxy.addr;
    rig.store.fail(Op::Release, 1);
    let t0 = Instant::now();
    // 503 is a release status: the answer is passed on, the release fails.
    let r = send_status(addr, "rf-1").await;
    assert_eq!((r.status, r.text().as_str()), (503, "status:503"));
    assert_eq!(rig.store.injected(Op::Release), 1);
    assert!(
        rig.store.abandoned() >= 1,
        "the failed release abandons the claim"
    );
    let r = eventually(
        LEASE + Duration::from_secs(4),
        "the claim on rf-1 to end with its lease",
        || async move {
            let r = send_status(addr, "rf-1").await;
            (r.status != 409).then_some(r)
        },
    )
    .await;
    assert!(t0.elapsed() >= LEASE, "freed after {:?}", t0.elapsed());
    assert_eq!(r.status, 503, "forwarded again once free: {r:?}");
    assert_eq!(rig.up.hits_key("rf-1"), 2);
}

async fn send_status(addr: std::net::SocketAddr, key: &str) -> Resp {
    post_key(addr, "/status/503", key, "pay").await
}
