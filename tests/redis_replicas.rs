//! Several replicas, one truth: two real `idemproxy run` processes share one real `redis-server`
//! (`[store] backend = "redis"`), each with its own listener and admin port.
//!
//! - A 100-request same-key storm split across both replicas reaches the upstream exactly once, in
//!   `reject` mode (409 + Retry-After) and in `wait` mode (everyone gets the one result, woken across
//!   replicas by Redis pub/sub rather than by a timer).
//! - A retry sent to the other replica is replayed; a different body is 422.
//! - A replica killed while holding a claim: the other refuses the key while the owner lives (its lease is
//!   renewed), then takes it over once the lease lapses.
//! - Redis killed and restarted mid-traffic: 503 `store-unavailable` with `on_store_error = "reject"`,
//!   forwarded with `Idempotency-Degraded: true` with `"pass"`, `/readyz` 503 meanwhile, and recovery
//!   without restarting the proxies; what was recorded before is still replayed (Redis with AOF).
//!
//! No sleeps stand in for events: the upstream's gate route holds first requests and reports arrivals, and
//! waits on conditions (readiness, the waiting gauge) are bounded polls. `redis-server` must be installed:
//! without it these tests fail, they never skip.

#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::client::raw_request;
use common::redis::RedisServer;
use common::{eventually, post_key, try_send, within, Proxy, RawConn, Resp, Upstream};
use tokio::task::JoinHandle;

const TEXT: (&str, &str) = ("Content-Type", "text/plain");

/// A replica on `redis`, with `defaults` for `[defaults]` and `store` appended to `[store]`.
async fn replica(up: &Upstream, redis: &RedisServer, defaults: &str, store: &str) -> Proxy {
    Proxy::builder(up.url())
        .store(&format!(
            "backend = \"redis\"\nredis_url = \"{}\"\nkey_prefix = \"replicas:\"\n{store}",
            redis.url()
        ))
        .defaults(defaults)
        .start()
        .await
}

async fn pair(up: &Upstream, redis: &RedisServer, defaults: &str) -> (Proxy, Proxy) {
    let a = replica(up, redis, defaults, "").await;
    let b = replica(up, redis, defaults, "").await;
    (a, b)
}

fn spawn_post(
    addr: SocketAddr,
    path: &'static str,
    key: &str,
    body: &'static str,
) -> JoinHandle<Resp> {
    let key = key.to_owned();
    tokio::spawn(async move { post_key(addr, path, &key, body).await })
}

async fn join_all(handles: Vec<JoinHandle<Resp>>, limit: Duration, what: &str) -> Vec<Resp> {
    within(limit, what, async {
        let mut out = Vec::with_capacity(handles.len());
        for h in handles {
            out.push(h.await.unwrap());
        }
        out
    })
    .await
}

/// `n` copies of a request, alternating between `addrs`, each fully written on its own connection before
/// this returns; the responses are read by spawned tasks.
async fn raw_duplicates(
    addrs: &[SocketAddr],
    n: usize,
    path: &str,
    key: &str,
    body: &str,
) -> Vec<JoinHandle<Resp>> {
    let mut conns = Vec::with_capacity(n);
    for i in 0..n {
        let addr = addrs[i % addrs.len()];
        let req = raw_request(
            addr,
            "POST",
            path,
            &[("Idempotency-Key", key), TEXT],
            body.as_bytes(),
        );
        let mut c = RawConn::connect(addr).await;
        c.write(&req).await;
        conns.push(c);
    }
    conns
        .into_iter()
        .map(|mut c| tokio::spawn(async move { c.read_response().await }))
        .collect()
}

/// The value of an unlabelled gauge on a proxy's `/metrics` (0 when absent).
async fn gauge(p: &Proxy, name: &str) -> f64 {
    let m = p.admin_get("/metrics").await;
    assert_eq!(m.status, 200);
    m.text()
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reject_mode_storm_across_two_replicas_reaches_the_upstream_once() {
    let redis = RedisServer::start();
    let up = Upstream::start();
    let (a, b) = pair(&up, &redis, "on_in_flight = \"reject\"\nlease = \"60s\"").await;
    let first = spawn_post(a.addr, "/gate/r", "storm-reject", "payload");
    up.wait_gate_arrivals("r", 1).await;

    let dups: Vec<_> = (0..99)
        .map(|i| {
            let addr = if i % 2 == 0 { b.addr } else { a.addr };
            spawn_post(addr, "/gate/r", "storm-reject", "payload")
        })
        .collect();
    for r in join_all(dups, Duration::from_secs(30), "99 duplicates").await {
        r.assert_problem(409, "in-flight");
        let secs = r.retry_after();
        assert!(
            (1..=60).contains(&secs),
            "Retry-After {secs} for a 60 s lease"
        );
    }
    assert_eq!(up.gate_arrivals("r"), 1);

    up.open("r");
    within(Duration::from_secs(15), "the first request", first)
        .await
        .unwrap()
        .assert_forwarded(200, b"gate:r#1");
    for p in [&b, &a] {
        post_key(p.addr, "/gate/r", "storm-reject", "payload")
            .await
            .assert_replay(200, b"gate:r#1");
    }
    assert_eq!(up.hits_key("storm-reject"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_mode_storm_across_two_replicas_is_woken_by_the_one_result() {
    let redis = RedisServer::start();
    let up = Upstream::start();
    // A 60 s lease: a waiter that relied on its timer instead of the notification would still be
    // waiting (up to wait_timeout) long after the bound below.
    let (a, b) = pair(
        &up,
        &redis,
        "on_in_flight = \"wait\"\nwait_timeout = \"30s\"\nlease = \"60s\"",
    )
    .await;
    let first = spawn_post(a.addr, "/gate/w", "storm-wait", "payload");
    up.wait_gate_arrivals("w", 1).await;

    let waiters = raw_duplicates(&[b.addr, a.addr], 99, "/gate/w", "storm-wait", "payload").await;
    // Every duplicate is provably waiting, on both replicas, before the first is answered.
    eventually(
        Duration::from_secs(20),
        "99 waiters on the two replicas",
        || async {
            let (wa, wb) = (
                gauge(&a, "idemproxy_waiting").await,
                gauge(&b, "idemproxy_waiting").await,
            );
            (wa == 49.0 && wb == 50.0).then_some(())
        },
    )
    .await;
    assert_eq!(up.gate_arrivals("w"), 1, "a waiter reached the upstream");

    up.open("w");
    within(Duration::from_secs(15), "the first request", first)
        .await
        .unwrap()
        .assert_forwarded(200, b"gate:w#1");
    for r in join_all(
        waiters,
        Duration::from_secs(10),
        "99 waiters woken by the result",
    )
    .await
    {
        r.assert_replay(200, b"gate:w#1");
    }
    assert_eq!(up.hits_key("storm-wait"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_on_the_other_replica_is_replayed() {
    let redis = RedisServer::start();
    let up = Upstream::start();
    let (a, b) = pair(&up, &redis, "").await;
    for p in [&a, &b] {
        assert_eq!(p.admin_get("/readyz").await.status, 200);
    }
    post_key(a.addr, "/echo", "retry-other", "hello")
        .await
        .assert_forwarded(201, b"hello");
    post_key(b.addr, "/echo", "retry-other", "hello")
        .await
        .assert_replay(201, b"hello");
    post_key(b.addr, "/echo", "retry-other", "other body")
        .await
        .assert_problem(422, "fingerprint-mismatch");
    post_key(a.addr, "/echo", "retry-other", "hello")
        .await
        .assert_replay(201, b"hello");
    assert_eq!(up.hits_key("retry-other"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_replicas_claim_holds_while_renewed_then_is_taken_over() {
    let redis = RedisServer::start();
    let up = Upstream::start();
    let (mut a, b) = pair(&up, &redis, "on_in_flight = \"reject\"\nlease = \"1s\"").await;
    // The first request dies with its replica: its answer (an error) does not matter.
    let addr = a.addr;
    let _first = tokio::spawn(async move {
        try_send(
            addr,
            "POST",
            "/gate/t",
            &[("Idempotency-Key", "takeover"), TEXT],
            "payload",
        )
        .await
    });
    up.wait_gate_arrivals("t", 1).await;

    // Two and a half leases: the owner's process renews, so the other replica keeps refusing.
    let hold = tokio::time::Instant::now() + Duration::from_millis(2500);
    while tokio::time::Instant::now() < hold {
        post_key(b.addr, "/gate/t", "takeover", "payload")
            .await
            .assert_problem(409, "in-flight");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The owner's process dies: nothing renews the lease, and once it lapses the other replica forwards.
    a.sigkill().await;
    up.open("t");
    let taken = eventually(
        Duration::from_secs(10),
        "the key to be taken over",
        || async {
            let r = post_key(b.addr, "/gate/t", "takeover", "payload").await;
            (r.status != 409).then_some(r)
        },
    )
    .await;
    taken.assert_forwarded(200, b"gate:t#2");
    post_key(b.addr, "/gate/t", "takeover", "payload")
        .await
        .assert_replay(200, b"gate:t#2");
    assert_eq!(up.gate_arrivals("t"), 2);
}

/// One answer of the background traffic: which replica, and what came back.
#[derive(Debug)]
struct Seen {
    replica: char,
    status: u16,
    code: Option<String>,
    degraded: bool,
    replayed: bool,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_mid_traffic_rejects_or_passes_then_recovers() {
    // With AOF, so a restart keeps what was recorded.
    let mut redis = RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
    let up = Upstream::start();
    let a = replica(&up, &redis, "", "").await;
    let b = replica(&up, &redis, "on_store_error = \"pass\"", "").await;

    post_key(a.addr, "/echo", "kept", "before")
        .await
        .assert_forwarded(201, b"before");
    post_key(b.addr, "/echo", "kept", "before")
        .await
        .assert_replay(201, b"before");

    // Traffic on both replicas through the whole outage, each request with a key of its own.
    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(Vec::<Seen>::new()));
    let traffic = {
        let (stop, seen, a, b) = (Arc::clone(&stop), Arc::clone(&seen), a.addr, b.addr);
        tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) {
                i += 1;
                let (replica, addr) = if i % 2 == 0 { ('a', a) } else { ('b', b) };
                let key = format!("bg-{i}");
                let r = try_send(
                    addr,
                    "POST",
                    "/echo",
                    &[("Idempotency-Key", &key), TEXT],
                    "bg",
                )
                .await
                .unwrap_or_else(|e| panic!("request {key} to replica {replica}: {e}"));
                let code =
                    (r.status >= 400).then(|| r.json()["code"].as_str().unwrap_or("").to_owned());
                let s = Seen {
                    replica,
                    status: r.status,
                    code,
                    degraded: r.header("idempotency-degraded") == Some("true"),
                    replayed: r.replayed(),
                };
                seen.lock().unwrap().push(s);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    // Waits until at least `n` answers after `from` match `pred`.
    let answered = |from: usize, n: usize, what: &'static str, pred: fn(&Seen) -> bool| {
        let seen = Arc::clone(&seen);
        async move {
            eventually(Duration::from_secs(15), what, || {
                let seen = Arc::clone(&seen);
                async move {
                    let count = seen.lock().unwrap()[from..]
                        .iter()
                        .filter(|s| pred(s))
                        .count();
                    (count >= n).then_some(())
                }
            })
            .await
        }
    };
    answered(0, 4, "traffic before the outage", |s| s.status == 201).await;

    redis.stop();
    for p in [&a, &b] {
        eventually(
            Duration::from_secs(10),
            "/readyz 503 with Redis down",
            || async { (p.admin_get("/readyz").await.status == 503).then_some(()) },
        )
        .await;
    }
    let r = post_key(a.addr, "/echo", "down-a", "x").await;
    r.assert_problem(503, "store-unavailable");
    assert!(r.retry_after() >= 1);
    for n in 1..=2 {
        // Unprotected: each request is forwarded, marked degraded.
        let r = post_key(b.addr, "/echo", "down-b", "x").await;
        r.assert_forwarded(201, b"x");
        assert_eq!(r.header("idempotency-degraded"), Some("true"), "{r:?}");
        assert_eq!(up.hits_key("down-b"), n);
    }
    assert_eq!(up.hits_key("down-a"), 0);
    answered(0, 3, "rejections by a during the outage", |s| {
        s.status == 503
    })
    .await;
    answered(0, 3, "degraded answers by b during the outage", |s| {
        s.degraded
    })
    .await;

    redis.restart();
    for p in [&a, &b] {
        eventually(
            Duration::from_secs(15),
            "/readyz 200 after Redis is back",
            || async { (p.admin_get("/readyz").await.status == 200).then_some(()) },
        )
        .await;
    }
    // Protected again, on both replicas, without a restart; the record from before the outage is there.
    for p in [&a, &b] {
        let key = format!("after-{}", p.addr.port());
        post_key(p.addr, "/echo", &key, "y")
            .await
            .assert_forwarded(201, b"y");
        let r = post_key(p.addr, "/echo", &key, "y").await;
        r.assert_replay(201, b"y");
        assert_eq!(r.header("idempotency-degraded"), None);
        post_key(p.addr, "/echo", "kept", "before")
            .await
            .assert_replay(201, b"before");
    }
    assert_eq!(up.hits_key("kept"), 1);
    let mark = seen.lock().unwrap().len();
    answered(mark, 4, "protected traffic after the outage", |s| {
        s.status == 201 && !s.degraded
    })
    .await;

    stop.store(true, Ordering::SeqCst);
    within(Duration::from_secs(20), "the background traffic", traffic)
        .await
        .unwrap();
    let seen = std::mem::take(&mut *seen.lock().unwrap());
    let (mut rejected, mut passed) = (0, 0);
    for s in &seen {
        match (s.replica, s.status, s.code.as_deref(), s.degraded) {
            (_, 201, None, false) => assert!(!s.replayed, "{s:?}"),
            ('a', 503, Some("store-unavailable"), false) => rejected += 1,
            ('b', 201, None, true) => passed += 1,
            _ => panic!("unexpected answer during the outage: {s:?}"),
        }
    }
    eprintln!(
        "[test] background traffic: {} requests, {rejected} rejected by a, {passed} passed degraded by b",
        seen.len()
    );
}

/// A Redis restart closes every connection: the first keyed request afterwards is not the one that
/// pays for it (its command never left, so it is sent again on a fresh connection).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_request_after_a_redis_restart_is_answered() {
    let mut redis = RedisServer::start_with(&["--appendonly", "yes"]);
    let up = Upstream::start();
    let p = replica(&up, &redis, "", "").await;
    let first = post_key(p.addr, "/echo", "restart-1", "x").await;
    assert_eq!(first.status, 201, "{first:?}");
    redis.stop();
    redis.restart();
    // The proxy was idle through the restart: its connection is closed, and it does not know yet.
    let after = post_key(p.addr, "/echo", "restart-2", "y").await;
    assert_eq!(
        after.status, 201,
        "first request after the restart: {after:?}"
    );
    post_key(p.addr, "/echo", "restart-1", "x")
        .await
        .assert_replay(201, b"x");
}
