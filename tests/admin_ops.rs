//! Operating the real `idemproxy` binary through its admin listener and signals:
//!
//! - drain: SIGTERM turns `/readyz` 503 (while `/healthz` stays 200 and the request held upstream finishes and
//!   is recorded), exit 0, and the key replays after a restart; a second signal during the drain exits 130;
//! - `/metrics`: every `idemproxy_requests_total{route,outcome}` counter moves by exactly what the requests
//!   caused, `idemproxy_inflight` returns to 0, `idemproxy_records_stored_total` counts the recorded results;
//! - `/admin/keys/{route}/{key}`: the bearer-token matrix (none configured, file token, env token), the key never
//!   logged whole, GET showing one record per scope (completed and in flight), DELETE purging them;
//! - SIGHUP reload: a valid file changes the rules for new requests (also on a keep-alive connection opened
//!   before), an invalid one is refused with every problem logged and the old config kept;
//! - signals sent right after the `listening on` line are handled (SIGHUP reloads, SIGTERM drains) instead of
//!   killing the process with the default action.
//!
//! No sleeps: the upstream's gate route reports each arrival, log lines are awaited as events, and conditions
//! no event announces (a listener going away) are polled with a deadline.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use common::client::raw_request;
use common::{
    eventually, post_key, send, try_send, within, Proxy, ProxyBuilder, RawConn, Resp, Upstream,
};
use tokio::task::JoinHandle;

const TEXT: (&str, &str) = ("Content-Type", "text/plain");
/// Bound on waiting for a log line or a state change of the process.
const EVENT: Duration = Duration::from_secs(15);

/// POST `path` with `key` (and extra headers) from a spawned task; the result is returned unchecked.
fn spawn_post(
    addr: SocketAddr,
    path: &str,
    key: &str,
    extra: &[(&str, &str)],
    body: &str,
) -> JoinHandle<Result<Resp, String>> {
    let path = path.to_string();
    let body = body.to_string();
    let mut headers: Vec<(String, String)> = vec![
        ("Idempotency-Key".into(), key.into()),
        (TEXT.0.into(), TEXT.1.into()),
    ];
    headers.extend(extra.iter().map(|(n, v)| (n.to_string(), v.to_string())));
    tokio::spawn(async move {
        let h: Vec<(&str, &str)> = headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        try_send(addr, "POST", &path, &h, body).await
    })
}

/// Await a spawned request (bounded).
async fn join(h: JoinHandle<Result<Resp, String>>, what: &str) -> Result<Resp, String> {
    within(Duration::from_secs(20), what, h).await.unwrap()
}

/// A request on the admin listener with an optional `Authorization` value.
async fn admin(p: &Proxy, method: &str, path: &str, auth: Option<&str>) -> Resp {
    let headers: Vec<(&str, &str)> = auth.map(|a| ("Authorization", a)).into_iter().collect();
    send(p.admin, method, path, &headers, b"").await
}

/// Percent-encode everything but RFC 3986 unreserved characters.
fn pct(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn keys_path(route: &str, key: &str) -> String {
    format!("/admin/keys/{}/{}", pct(route), pct(key))
}

// ---------------------------------------------------------------------------------------------------------
// Prometheus text

/// One scrape of `/metrics`: series (name plus sorted labels) → value.
#[derive(Debug, Clone)]
struct Scrape {
    series: HashMap<String, f64>,
    text: String,
}

fn series_id(name: &str, labels: &[(&str, &str)]) -> String {
    let sorted: BTreeMap<&str, &str> = labels.iter().copied().collect();
    let inner: Vec<String> = sorted.iter().map(|(k, v)| format!("{k}={v:?}")).collect();
    format!("{name}{{{}}}", inner.join(","))
}

impl Scrape {
    fn parse(text: &str) -> Scrape {
        let mut series = HashMap::new();
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (head, value) = line
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("unparsable metrics line {line:?}"));
            let value: f64 = value
                .parse()
                .unwrap_or_else(|_| panic!("unparsable value in metrics line {line:?}"));
            let (name, labels) = match head.split_once('{') {
                None => (head, Vec::new()),
                Some((name, rest)) => {
                    let rest = rest
                        .strip_suffix('}')
                        .unwrap_or_else(|| panic!("unterminated labels in {line:?}"));
                    let labels: Vec<(&str, &str)> = rest
                        .split(',')
                        .filter(|kv| !kv.is_empty())
                        .map(|kv| {
                            let (k, v) = kv
                                .split_once('=')
                                .unwrap_or_else(|| panic!("bad label {kv:?} in {line:?}"));
                            (k.trim(), v.trim().trim_matches('"'))
                        })
                        .collect();
                    (name, labels)
                }
            };
            series.insert(series_id(name, &labels), value);
        }
        Scrape {
            series,
            text: text.to_string(),
        }
    }

    /// The value of a series, 0 when absent (a counter not yet incremented).
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.series
            .get(&series_id(name, labels))
            .copied()
            .unwrap_or(0.0)
    }

    fn has(&self, name: &str, labels: &[(&str, &str)]) -> bool {
        self.series.contains_key(&series_id(name, labels))
    }
}

async fn scrape(p: &Proxy) -> Scrape {
    let r = p.admin_get("/metrics").await;
    assert_eq!(r.status, 200, "GET /metrics: {r:?}");
    let ct = r.header("content-type").unwrap_or("");
    assert!(ct.starts_with("text/plain"), "metrics Content-Type {ct:?}");
    Scrape::parse(&r.text())
}

const OUTCOMES: [&str; 7] = [
    "forwarded",
    "replayed",
    "conflict",
    "mismatch",
    "rejected",
    "passthrough",
    "released",
];

// ---------------------------------------------------------------------------------------------------------
// 1, 2: drain

/// Wait for a log line containing `text` after `mark`; if none comes, fail saying whether the process died.
async fn expect_log_or_report_exit(p: &mut Proxy, mark: usize, text: &str) {
    if p.try_wait_log(mark, EVENT, |l| l.contains(text))
        .await
        .is_none()
    {
        panic!(
            "no log line {text:?} within {EVENT:?}; process exit status: {:?}; lines since:\n{}",
            p.try_exit_status(),
            p.logs_since(mark).join("\n")
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_turns_readyz_503_finishes_the_held_request_and_it_replays_after_restart() {
    let up = Upstream::start();
    let mut p = Proxy::builder(up.url()).start().await;
    assert_eq!(p.admin_get("/readyz").await.status, 200, "ready at start");
    assert_eq!(p.admin_get("/healthz").await.status, 200);

    post_key(p.addr, "/echo", "drain-key-0", "before")
        .await
        .assert_forwarded(201, b"before");
    let held = spawn_post(p.addr, "/gate/drain", "drain-key-1", &[], "drain body");
    up.wait_gate_arrivals("drain", 1).await;

    let mark = p.log_mark();
    p.signal("TERM");
    expect_log_or_report_exit(&mut p, mark, "SIGTERM received").await;
    let admin_addr = p.admin;
    let ready = eventually(
        EVENT,
        "/readyz answering 503 during the drain",
        || async move {
            let r = try_send(admin_addr, "GET", "/readyz", &[], b"")
                .await
                .ok()?;
            (r.status == 503).then_some(r)
        },
    )
    .await;
    assert!(
        ready.text().contains("draining"),
        "/readyz body while draining: {:?}",
        ready.text()
    );
    // The process is still alive and says so; the request is still held upstream.
    let health = p.admin_get("/healthz").await;
    assert_eq!(health.status, 200, "/healthz during the drain: {health:?}");
    assert_eq!(up.gate_waiting("drain"), 1, "the request is still held");
    // The proxy listener stops accepting new connections.
    let proxy_addr = p.addr;
    eventually(
        EVENT,
        "the proxy listener to refuse connections",
        || async move {
            tokio::net::TcpStream::connect(proxy_addr)
                .await
                .err()
                .map(|_| ())
        },
    )
    .await;
    assert_eq!(
        p.admin_get("/readyz").await.status,
        503,
        "/readyz stays 503 while the request is in flight"
    );

    up.open("drain");
    let resp = join(held, "the held request's answer")
        .await
        .unwrap_or_else(|e| panic!("the request in flight during the drain failed: {e}"));
    resp.assert_forwarded(200, b"gate:drain#1");
    let status = p.wait_exit(Duration::from_secs(30)).await;
    assert_eq!(
        status.code(),
        Some(0),
        "exit status after the drain: {status}"
    );

    p.restart().await;
    assert_eq!(
        p.admin_get("/readyz").await.status,
        200,
        "ready after restart"
    );
    post_key(p.addr, "/gate/drain", "drain-key-1", "drain body")
        .await
        .assert_replay(200, b"gate:drain#1");
    assert_eq!(
        up.gate_arrivals("drain"),
        1,
        "the key was not forwarded again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_signal_during_the_drain_exits_130_at_once() {
    let up = Upstream::start();
    // A grace far beyond the wait below: only the forced exit can end the process in time.
    let mut p = Proxy::builder(up.url())
        .server("shutdown_grace = \"120s\"")
        .start()
        .await;
    post_key(p.addr, "/echo", "force-key-0", "before")
        .await
        .assert_forwarded(201, b"before");
    let held = spawn_post(p.addr, "/gate/force", "force-key-1", &[], "x");
    up.wait_gate_arrivals("force", 1).await;

    let mark = p.log_mark();
    p.signal("TERM");
    expect_log_or_report_exit(&mut p, mark, "SIGTERM received").await;
    let admin_addr = p.admin;
    eventually(
        EVENT,
        "/readyz answering 503 during the drain",
        || async move {
            let r = try_send(admin_addr, "GET", "/readyz", &[], b"")
                .await
                .ok()?;
            (r.status == 503).then_some(())
        },
    )
    .await;
    assert_eq!(up.gate_waiting("force"), 1, "the request is still held");

    p.signal("INT");
    let status = p.wait_exit(EVENT).await;
    assert_eq!(
        status.code(),
        Some(130),
        "exit status after a second signal: {status}"
    );
    // The held client's connection went away with the process.
    let r = join(held, "the held request to fail").await;
    assert!(
        r.is_err(),
        "the request held during a forced exit cannot have been answered: {r:?}"
    );
}

// ---------------------------------------------------------------------------------------------------------
// 3: metrics

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_every_outcome_per_route() {
    let up = Upstream::start();
    let p = Proxy::builder(up.url())
        .extra(
            "[[routes]]\nname = \"waity\"\npath = \"/gate/w*\"\non_in_flight = \"wait\"\n\n\
             [[routes]]\nname = \"gated\"\npath = \"/gate/**\"\n\n\
             [[routes]]\nname = \"strict\"\npath = \"/strict/**\"\nrequired = true\n",
        )
        .start()
        .await;
    let before = scrape(&p).await;

    // default: forwarded, replayed, mismatch, released, 2 × passthrough
    post_key(p.addr, "/echo", "met-1", "one")
        .await
        .assert_forwarded(201, b"one");
    post_key(p.addr, "/echo", "met-1", "one")
        .await
        .assert_replay(201, b"one");
    post_key(p.addr, "/echo", "met-1", "other")
        .await
        .assert_problem(422, "fingerprint-mismatch");
    let released = post_key(p.addr, "/status/503", "met-2", "x").await;
    assert_eq!(released.status, 503, "{released:?}");
    let get = send(p.addr, "GET", "/headers", &[], b"").await;
    assert_eq!(get.status, 200, "{get:?}");
    let nokey = send(p.addr, "POST", "/echo", &[TEXT], "no key").await;
    nokey.assert_forwarded(201, b"no key");

    // strict: 2 × rejected (missing key, invalid key)
    send(p.addr, "POST", "/strict/a", &[TEXT], "x")
        .await
        .assert_problem(400, "missing-key");
    let long = "k".repeat(256);
    send(
        p.addr,
        "POST",
        "/strict/a",
        &[TEXT, ("Idempotency-Key", long.as_str())],
        "x",
    )
    .await
    .assert_problem(400, "invalid-key");

    // gated: conflict while the first is held, then the first is forwarded
    let held = spawn_post(p.addr, "/gate/m", "met-3", &[], "held");
    up.wait_gate_arrivals("m", 1).await;
    let during = scrape(&p).await;
    assert_eq!(
        during.get("idemproxy_inflight", &[]),
        1.0,
        "idemproxy_inflight while one request is held:\n{}",
        during.text
    );
    post_key(p.addr, "/gate/m", "met-3", "held")
        .await
        .assert_problem(409, "in-flight");
    up.release("m", 200);
    join(held, "the held request")
        .await
        .unwrap()
        .assert_forwarded(200, b"gate:m#1");

    // waity: a duplicate waits (idemproxy_waiting = 1) and gets the replay
    let first = spawn_post(p.addr, "/gate/wq", "met-4", &[], "w");
    up.wait_gate_arrivals("wq", 1).await;
    let waiter = spawn_post(p.addr, "/gate/wq", "met-4", &[], "w");
    let admin_addr = p.admin;
    // No event announces that the duplicate started waiting: poll the gauge.
    eventually(EVENT, "idemproxy_waiting = 1", || async move {
        let r = try_send(admin_addr, "GET", "/metrics", &[], b"")
            .await
            .ok()?;
        (Scrape::parse(&r.text()).get("idemproxy_waiting", &[]) == 1.0).then_some(())
    })
    .await;
    assert_eq!(
        scrape(&p).await.get("idemproxy_inflight", &[]),
        2.0,
        "idemproxy_inflight with a held request and its waiting duplicate"
    );
    up.release("wq", 200);
    join(first, "the first waity request")
        .await
        .unwrap()
        .assert_forwarded(200, b"gate:wq#1");
    join(waiter, "the waiting duplicate")
        .await
        .unwrap()
        .assert_replay(200, b"gate:wq#1");

    let after = scrape(&p).await;
    let mut expected: HashMap<(&str, &str), f64> = HashMap::new();
    for (route, outcome, n) in [
        ("default", "forwarded", 1.0),
        ("default", "replayed", 1.0),
        ("default", "mismatch", 1.0),
        ("default", "released", 1.0),
        ("default", "passthrough", 2.0),
        ("strict", "rejected", 2.0),
        ("gated", "conflict", 1.0),
        ("gated", "forwarded", 1.0),
        ("waity", "forwarded", 1.0),
        ("waity", "replayed", 1.0),
    ] {
        expected.insert((route, outcome), n);
    }
    let mut wrong = Vec::new();
    for route in ["default", "gated", "strict", "waity"] {
        for outcome in OUTCOMES {
            let labels = [("route", route), ("outcome", outcome)];
            let delta = after.get("idemproxy_requests_total", &labels)
                - before.get("idemproxy_requests_total", &labels);
            let want = expected.get(&(route, outcome)).copied().unwrap_or(0.0);
            if delta != want {
                wrong.push(format!("{route}/{outcome}: +{delta}, expected +{want}"));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "idemproxy_requests_total moved wrongly: {wrong:#?}\nscrape:\n{}",
        after.text
    );
    assert_eq!(
        after.get("idemproxy_inflight", &[]),
        0.0,
        "idemproxy_inflight after every request finished:\n{}",
        after.text
    );
    assert_eq!(
        after.get("idemproxy_waiting", &[]),
        0.0,
        "idemproxy_waiting after the duplicate got its replay:\n{}",
        after.text
    );
    assert_eq!(
        after.get("idemproxy_records_stored_total", &[])
            - before.get("idemproxy_records_stored_total", &[]),
        3.0,
        "three results were recorded (default /echo, gated /gate/m, waity /gate/wq):\n{}",
        after.text
    );
    // Histograms exist and saw the claimed exchanges and store operations.
    let up_count = |s: &Scrape, route: &str| {
        s.get(
            "idemproxy_upstream_duration_seconds_count",
            &[("route", route)],
        )
    };
    assert!(
        up_count(&after, "default") - up_count(&before, "default") >= 2.0
            && up_count(&after, "gated") - up_count(&before, "gated") >= 1.0,
        "idemproxy_upstream_duration_seconds did not record the exchanges:\n{}",
        after.text
    );
    let store_count =
        |s: &Scrape, op: &str| s.get("idemproxy_store_duration_seconds_count", &[("op", op)]);
    assert!(
        store_count(&after, "claim") - store_count(&before, "claim") >= 8.0
            && store_count(&after, "complete") - store_count(&before, "complete") >= 3.0
            && store_count(&after, "release") - store_count(&before, "release") >= 1.0,
        "idemproxy_store_duration_seconds did not record claim/complete/release:\n{}",
        after.text
    );
    assert!(
        after.has(
            "idemproxy_upstream_duration_seconds_bucket",
            &[("route", "default"), ("le", "+Inf")]
        ),
        "upstream duration is not a histogram with buckets:\n{}",
        after.text
    );
}

// ---------------------------------------------------------------------------------------------------------
// 4: admin auth

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_keys_api_is_disabled_without_a_token() {
    let up = Upstream::start();
    let p = Proxy::builder(up.url()).start().await;
    post_key(p.addr, "/echo", "noauth-1", "x")
        .await
        .assert_forwarded(201, b"x");
    let path = keys_path("default", "noauth-1");
    for (method, auth) in [
        ("GET", None),
        ("GET", Some("Bearer anything")),
        ("DELETE", None),
        ("DELETE", Some("Bearer anything")),
    ] {
        let r = admin(&p, method, &path, auth).await;
        assert_eq!(
            r.status, 404,
            "{method} {path} with {auth:?} and no token: {r:?}"
        );
    }
    let r = admin(&p, "GET", "/admin/", Some("Bearer anything")).await;
    assert_eq!(r.status, 404, "GET /admin/ with no token: {r:?}");
    // Nothing was purged.
    post_key(p.addr, "/echo", "noauth-1", "x")
        .await
        .assert_replay(201, b"x");
    assert_eq!(p.admin_get("/healthz").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_keys_api_needs_the_bearer_token_and_never_logs_the_key_whole() {
    const TOKEN: &str = "file-token-7f3a";
    let up = Upstream::start();
    let p = Proxy::builder(up.url())
        .admin(&format!("token = \"{TOKEN}\""))
        .env("RUST_LOG", "info,idemproxy=debug")
        .start()
        .await;
    // A long, distinctive key with characters that must be percent-encoded in the admin URI.
    let key = "Qx7vK2pZ-order/2026?batch#7%-9f8e7d6c5b4a3928170605f4e3d2c1b0";
    let path = keys_path("default", key);
    let right = format!("Bearer {TOKEN}");

    let r = admin(&p, "GET", &path, None).await;
    assert_eq!(r.status, 401, "no Authorization header: {r:?}");
    assert!(
        r.header("www-authenticate")
            .is_some_and(|v| v.to_ascii_lowercase().starts_with("bearer")),
        "401 without a WWW-Authenticate: Bearer challenge: {r:?}"
    );
    for wrong in [
        "Bearer wrong",
        "Bearer file-token-7f3",
        "Bearer file-token-7f3aa",
    ] {
        let r = admin(&p, "GET", &path, Some(wrong)).await;
        assert_eq!(r.status, 403, "GET with {wrong:?}: {r:?}");
    }
    let r = admin(&p, "GET", &path, Some(&right)).await;
    assert_eq!(r.status, 404, "right token, nothing stored yet: {r:?}");

    post_key(p.addr, "/echo", key, "secret order")
        .await
        .assert_forwarded(201, b"secret order");
    let r = admin(&p, "GET", &path, Some(&right)).await;
    assert_eq!(r.status, 200, "right token after the request: {r:?}");
    let v = r.json();
    assert_eq!(v["route"], "default", "{v}");
    assert_eq!(v["key"], key, "the key, percent-decoded: {v}");
    assert_eq!(v["records"].as_array().map(Vec::len), Some(1), "{v}");

    let r = admin(&p, "GET", &keys_path("no-such-route", key), Some(&right)).await;
    assert_eq!(r.status, 404, "unknown route: {r:?}");

    // DELETE is guarded the same way and a refused one purges nothing.
    let r = admin(&p, "DELETE", &path, None).await;
    assert_eq!(r.status, 401, "DELETE without a token: {r:?}");
    let r = admin(&p, "DELETE", &path, Some("Bearer wrong")).await;
    assert_eq!(r.status, 403, "DELETE with a wrong token: {r:?}");
    assert_eq!(admin(&p, "GET", &path, Some(&right)).await.status, 200);

    let mark = p.log_mark();
    let r = admin(&p, "DELETE", &path, Some(&right)).await;
    assert_eq!(r.status, 200, "DELETE with the token: {r:?}");
    assert_eq!(r.json()["purged"], 1, "{}", r.text());
    p.wait_log(mark, EVENT, "the purge log line", |l| {
        l.contains("purged by admin")
    })
    .await;
    post_key(p.addr, "/echo", key, "secret order")
        .await
        .assert_forwarded(201, b"secret order");

    // Logs may carry at most 8 characters of the key: no 9-character prefix of it, in any form.
    let logs = p.logs();
    let encoded = pct(key);
    for needle in [&key[..9], &encoded[..9]] {
        let leaks: Vec<&String> = logs.iter().filter(|l| l.contains(needle)).collect();
        assert!(
            leaks.is_empty(),
            "more than 8 characters of the key ({needle:?}) appear in the log: {leaks:#?}"
        );
    }
    assert!(
        logs.iter()
            .any(|l| l.contains("purged by admin") && l.contains(&key[..8])),
        "the purge line should name the key by its first 8 characters; logs:\n{}",
        logs.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_token_from_the_environment_wins_over_the_file() {
    let up = Upstream::start();
    let p = Proxy::builder(up.url())
        .admin("token = \"token-in-file\"")
        .env("IDEMPROXY_ADMIN_TOKEN", "token-from-env")
        .start()
        .await;
    post_key(p.addr, "/echo", "env-1", "x")
        .await
        .assert_forwarded(201, b"x");
    let path = keys_path("default", "env-1");
    assert_eq!(admin(&p, "GET", &path, None).await.status, 401);
    assert_eq!(
        admin(&p, "GET", &path, Some("Bearer nope")).await.status,
        403
    );
    let r = admin(&p, "GET", &path, Some("Bearer token-in-file")).await;
    assert_eq!(
        r.status, 403,
        "IDEMPROXY_ADMIN_TOKEN overrides [admin] token: {r:?}"
    );
    let r = admin(&p, "GET", &path, Some("Bearer token-from-env")).await;
    assert_eq!(r.status, 200, "the env token: {r:?}");
    let r = admin(
        &p,
        "GET",
        &keys_path("default", "env-unknown"),
        Some("Bearer token-from-env"),
    )
    .await;
    assert_eq!(r.status, 404, "unknown key: {r:?}");
}

// ---------------------------------------------------------------------------------------------------------
// 5: records per scope, purge

fn time_of(v: &serde_json::Value, field: &str) -> SystemTime {
    let s = v[field]
        .as_str()
        .unwrap_or_else(|| panic!("{field} is not a string in {v}"));
    humantime::parse_rfc3339_weak(s)
        .unwrap_or_else(|e| panic!("{field} {s:?} is not RFC 3339: {e}"))
}

fn secs_between(a: SystemTime, b: SystemTime) -> f64 {
    b.duration_since(a)
        .unwrap_or_else(|_| panic!("{b:?} is before {a:?}"))
        .as_secs_f64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_get_shows_one_record_per_scope_and_delete_frees_the_key() {
    const TOKEN: &str = "scope-token";
    const KEY: &str = "shared-key-5";
    let up = Upstream::start();
    let p = Proxy::builder(up.url())
        .admin(&format!("token = \"{TOKEN}\""))
        .defaults("ttl = \"2h\"\nlease = \"90s\"")
        .start()
        .await;
    let auth = format!("Bearer {TOKEN}");
    let path = keys_path("default", KEY);
    let echo_hits =
        |up: &Upstream| up.count(|r| r.path == "/echo" && r.header("idempotency-key") == Some(KEY));

    // Tenant A completes; tenant B's request with the same key is held in flight.
    let a = [("Authorization", "Bearer tenant-a")];
    let b = [("Authorization", "Bearer tenant-b")];
    join(spawn_post(p.addr, "/echo", KEY, &a, "payload"), "A")
        .await
        .unwrap()
        .assert_forwarded(201, b"payload");
    let held_b = spawn_post(p.addr, "/gate/g5", KEY, &b, "payload");
    up.wait_gate_arrivals("g5", 1).await;

    let r = admin(&p, "GET", &path, Some(&auth)).await;
    assert_eq!(r.status, 200, "{r:?}");
    let v = r.json();
    assert_eq!(v["route"], "default", "{v}");
    assert_eq!(v["key"], KEY, "{v}");
    let records = v["records"].as_array().unwrap_or_else(|| panic!("{v}"));
    assert_eq!(records.len(), 2, "one record per scope: {v}");
    let completed: Vec<_> = records
        .iter()
        .filter(|r| r["state"] == "completed")
        .collect();
    let in_flight: Vec<_> = records
        .iter()
        .filter(|r| r["state"] == "in_flight")
        .collect();
    assert_eq!(
        (completed.len(), in_flight.len()),
        (1, 1),
        "one completed and one in-flight record: {v}"
    );
    let (c, f) = (completed[0], in_flight[0]);
    assert_eq!(c["status"], 201, "{v}");
    assert!(
        f["status"].is_null(),
        "an in-flight record has no status: {v}"
    );
    assert!(
        c["scope"].is_string() && f["scope"].is_string() && c["scope"] != f["scope"],
        "distinct scopes: {v}"
    );
    let now = SystemTime::now();
    for rec in [c, f] {
        let created = time_of(rec, "created");
        let age = now.duration_since(created).map_or(0.0, |d| d.as_secs_f64());
        assert!(age < 300.0, "created {age}s ago? {rec}");
    }
    let ttl = secs_between(time_of(c, "created"), time_of(c, "expires"));
    assert!(
        (ttl - 7200.0).abs() <= 2.0,
        "a completed record expires ttl (2h) after its creation, got {ttl}s: {c}"
    );
    let lease = secs_between(time_of(f, "created"), time_of(f, "expires"));
    assert!(
        (lease - 90.0).abs() <= 2.0,
        "an in-flight record's lease (90s) bounds it, got {lease}s: {f}"
    );

    // A plain DELETE refuses while a request holds the key (its result would go unrecorded), and
    // purges nothing.
    let r = admin(&p, "DELETE", &path, Some(&auth)).await;
    assert_eq!(r.status, 409, "DELETE of a key in flight: {r:?}");
    assert!(r.text().contains("force=true"), "{}", r.text());
    let r = admin(&p, "GET", &path, Some(&auth)).await;
    assert_eq!(
        r.json()["records"].as_array().map(Vec::len),
        Some(2),
        "{}",
        r.text()
    );
    // Forced, it purges both; the key is forgotten for both tenants.
    let r = admin(&p, "DELETE", &format!("{path}?force=true"), Some(&auth)).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["purged"], 2, "{}", r.text());
    let r = admin(&p, "GET", &path, Some(&auth)).await;
    assert_eq!(r.status, 404, "GET after the purge: {r:?}");

    // Tenant A is forwarded again (not replayed).
    join(spawn_post(p.addr, "/echo", KEY, &a, "payload"), "A again")
        .await
        .unwrap()
        .assert_forwarded(201, b"payload");
    assert_eq!(echo_hits(&up), 2, "A's retry reached the upstream again");

    // Tenant B's retry is no longer blocked by the purged claim: it is forwarded (not a 409).
    let retry_b = spawn_post(p.addr, "/gate/g5", KEY, &b, "payload");
    up.wait_gate_arrivals("g5", 2).await;
    up.open("g5");
    let first = join(held_b, "B's first request").await.unwrap();
    let second = join(retry_b, "B's retry").await.unwrap();
    first.assert_forwarded(200, b"gate:g5#1");
    second.assert_forwarded(200, b"gate:g5#2");
    // Only the claim that still existed records its result; the purged one's late result is dropped.
    let again = spawn_post(p.addr, "/gate/g5", KEY, &b, "payload");
    join(again, "B's third request")
        .await
        .unwrap()
        .assert_replay(200, b"gate:g5#2");
    assert_eq!(up.gate_arrivals("g5"), 2);

    let r = admin(&p, "GET", &path, Some(&auth)).await;
    assert_eq!(r.status, 200, "{r:?}");
    let v = r.json();
    let states: Vec<_> = v["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["state"].as_str().unwrap_or("?").to_string())
        .collect();
    assert_eq!(states, ["completed", "completed"], "{v}");
}

// ---------------------------------------------------------------------------------------------------------
// 6: SIGHUP reload

/// The config every reload test starts from; `header_read_timeout` is long so the keep-alive connection is
/// not closed for idleness while the test waits on reloads.
fn reload_base(up: &Upstream) -> ProxyBuilder {
    Proxy::builder(up.url()).server("header_read_timeout = \"300s\"")
}

/// One request on an existing keep-alive connection.
async fn on_conn(
    conn: &mut RawConn,
    addr: SocketAddr,
    path: &str,
    key: Option<&str>,
    body: &str,
) -> Resp {
    let mut headers = vec![TEXT];
    if let Some(k) = key {
        headers.push(("Idempotency-Key", k));
    }
    conn.write(&raw_request(addr, "POST", path, &headers, body.as_bytes()))
        .await;
    conn.read_response().await
}

/// SIGHUP, wait for the log line that ends the reload (`config reloaded` or `reload failed…`), and return every
/// line logged since the signal (the problems and restart notices come before that final line).
async fn hup_and_wait(p: &Proxy, what: &str) -> Vec<String> {
    let mark = p.log_mark();
    p.sighup();
    p.wait_log(mark, EVENT, what, |l| {
        l.contains("config reloaded") || l.contains("reload failed")
    })
    .await;
    p.logs_since(mark)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_a_valid_config_and_keeps_the_running_one_when_invalid() {
    let up = Upstream::start();
    let base = reload_base(&up);
    let p = base.clone().start().await;
    let admin_path = keys_path("strict", "r-1");

    // Before: /strict is under [defaults] (key optional) and /admin/* is disabled.
    let mut conn = RawConn::connect(p.addr).await;
    on_conn(&mut conn, p.addr, "/strict/a", None, "before")
        .await
        .assert_forwarded(200, b"hit 1 POST /strict/a");
    send(p.addr, "POST", "/strict/b", &[TEXT], "before")
        .await
        .assert_forwarded(200, b"hit 1 POST /strict/b");
    assert_eq!(admin(&p, "GET", &admin_path, None).await.status, 404);

    // A request in flight across the reload finishes on its connection.
    let held = spawn_post(p.addr, "/gate/reload", "r-held", &[], "held");
    up.wait_gate_arrivals("reload", 1).await;

    // Valid reload: a new route requiring a key, and an admin token.
    let valid = base
        .clone()
        .admin("token = \"reloaded-token\"")
        .extra("[[routes]]\nname = \"strict\"\npath = \"/strict/**\"\nrequired = true\n");
    p.write_config_from(&valid);
    let lines = hup_and_wait(&p, "the end of the reload of a valid file").await;
    assert!(
        lines.iter().any(|l| l.contains("config reloaded"))
            && !lines
                .iter()
                .any(|l| l.contains("reload") && (l.contains("failed") || l.contains("restart"))),
        "a valid file with no restart-only change; lines:\n{}",
        lines.join("\n")
    );
    send(p.addr, "POST", "/strict/c", &[TEXT], "after")
        .await
        .assert_problem(400, "missing-key");
    up.open("reload");
    join(held, "the request held across the reload")
        .await
        .unwrap_or_else(|e| panic!("a request in flight during the reload failed: {e}"))
        .assert_forwarded(200, b"gate:reload#1");
    // The keep-alive connection opened before the reload still works, under the new rules.
    on_conn(&mut conn, p.addr, "/strict/a", None, "after")
        .await
        .assert_problem(400, "missing-key");
    on_conn(&mut conn, p.addr, "/strict/a", Some("r-1"), "after")
        .await
        .assert_forwarded(200, b"hit 2 POST /strict/a");
    assert_eq!(admin(&p, "GET", &admin_path, None).await.status, 401);
    let r = admin(&p, "GET", &admin_path, Some("Bearer reloaded-token")).await;
    assert_eq!(r.status, 200, "the reloaded token and route: {r:?}");
    assert_eq!(up.hits_path("/strict/c"), 0);

    // Invalid reload: two problems (and the strict route gone); the running config is kept.
    let invalid = base.clone().extra(
        "[[routes]]\nname = \"bad\"\npath = \"/bad/**\"\nttl = \"1x\"\n\n\
             [[routes]]\nname = \"worse\"\npath = \"/worse/**\"\nlease = \"soon\"\n",
    );
    p.write_config_from(&invalid);
    let lines = hup_and_wait(&p, "the end of the reload of an invalid file").await;
    for problem in [
        "reload failed: the running config is kept",
        "reload: routes[0].ttl: invalid duration \"1x\"",
        "reload: routes[1].lease: invalid duration \"soon\"",
    ] {
        assert!(
            lines.iter().any(|l| l.contains(problem)),
            "missing log line {problem:?}; lines:\n{}",
            lines.join("\n")
        );
    }
    assert!(
        !lines.iter().any(|l| l.contains("config reloaded")),
        "an invalid file was reported as reloaded:\n{}",
        lines.join("\n")
    );
    send(p.addr, "POST", "/strict/d", &[TEXT], "kept")
        .await
        .assert_problem(400, "missing-key");
    on_conn(&mut conn, p.addr, "/strict/a", None, "kept")
        .await
        .assert_problem(400, "missing-key");
    on_conn(&mut conn, p.addr, "/strict/a", Some("r-1"), "after")
        .await
        .assert_replay(200, b"hit 2 POST /strict/a");
    assert_eq!(admin(&p, "GET", &admin_path, None).await.status, 401);
    assert_eq!(
        admin(&p, "GET", &admin_path, Some("Bearer reloaded-token"))
            .await
            .status,
        200
    );

    // A change that needs a restart is named; the rest applies, the proxy keeps its address.
    let other = common::dead_addr();
    let restart = valid
        .clone()
        .listen_in_file(&other.to_string())
        .extra("[[routes]]\nname = \"late\"\npath = \"/late/**\"\nrequired = true\n");
    p.write_config_from(&restart);
    let lines = hup_and_wait(&p, "the end of the reload with a listen change").await;
    assert!(
        lines
            .iter()
            .any(|l| l.contains("reload: server.listen changed; it takes effect after a restart")),
        "no restart notice for server.listen; lines:\n{}",
        lines.join("\n")
    );
    assert!(
        lines.iter().any(|l| l.contains("config reloaded")),
        "{}",
        lines.join("\n")
    );
    send(p.addr, "POST", "/late/x", &[TEXT], "x")
        .await
        .assert_problem(400, "missing-key");
    on_conn(&mut conn, p.addr, "/strict/a", Some("r-1"), "after")
        .await
        .assert_replay(200, b"hit 2 POST /strict/a");

    // Upstream and limits change for new requests too.
    let up2 = Upstream::start();
    let moved = Proxy::builder(up2.url())
        .server("header_read_timeout = \"300s\"\nmax_request_body = 16")
        .admin("token = \"reloaded-token\"")
        .extra("[[routes]]\nname = \"strict\"\npath = \"/strict/**\"\nrequired = true\n");
    p.write_config_from(&moved);
    let lines = hup_and_wait(&p, "the end of the reload to another upstream").await;
    assert!(
        lines.iter().any(|l| l.contains("config reloaded")),
        "{}",
        lines.join("\n")
    );
    // server.listen is back to what the process listens on: nothing waits for a restart any more.
    assert!(
        !lines.iter().any(|l| l.contains("server.listen changed")),
        "putting the running value back was reported as a change:\n{}",
        lines.join("\n")
    );
    on_conn(
        &mut conn,
        p.addr,
        "/strict/a",
        Some("r-2"),
        "17 bytes of body!",
    )
    .await
    .assert_problem(413, "body-too-large");
    on_conn(&mut conn, p.addr, "/strict/a", Some("r-2"), "small")
        .await
        .assert_forwarded(200, b"hit 1 POST /strict/a");
    assert_eq!(up2.hits_path("/strict/a"), 1, "the new upstream got it");
    assert_eq!(up.hits_path("/strict/a"), 2, "the old upstream did not");
}

// ---------------------------------------------------------------------------------------------------------
// Signals right after readiness

/// How many fresh processes each signal is tried on: the window between the `listening on` line and the
/// installation of a handler is short, so one try would rarely hit it.
const SIGNAL_TRIES: usize = 12;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_right_after_the_listening_line_reloads_instead_of_killing() {
    let up = Upstream::start();
    for i in 0..SIGNAL_TRIES {
        let mut p = Proxy::builder(up.url()).start().await;
        let mark = p.log_mark();
        p.sighup();
        // Wait for the reload line, checking between short waits whether the signal killed the process.
        let deadline = tokio::time::Instant::now() + EVENT;
        loop {
            let step = Duration::from_millis(200);
            if p.try_wait_log(mark, step, |l| l.contains("config reloaded"))
                .await
                .is_some()
            {
                break;
            }
            if let Some(status) = p.try_exit_status() {
                panic!(
                    "try {i}: a SIGHUP sent right after `listening on` ended the process ({status}) \
                     instead of reloading the config"
                );
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "try {i}: a SIGHUP sent right after `listening on` was ignored (no `config reloaded` \
                 within {EVENT:?}, process still running)"
            );
        }
        post_key(p.addr, "/echo", "hup-early", "x").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_right_after_the_listening_line_shuts_down_cleanly() {
    let up = Upstream::start();
    for i in 0..SIGNAL_TRIES {
        let mut p = Proxy::builder(up.url()).start().await;
        p.signal("TERM");
        let status = p.wait_exit(EVENT).await;
        assert_eq!(
            status.code(),
            Some(0),
            "try {i}: a SIGTERM sent right after `listening on` must drain and exit 0, got {status}"
        );
    }
}

/// Probes that use `HEAD` (some load balancers do) get what `GET` gets, without a body; other methods
/// get 405 with `Allow`.
#[tokio::test]
async fn health_endpoints_answer_head_as_get_and_say_what_they_allow() {
    let up = Upstream::start();
    let p = Proxy::builder(up.url()).start().await;
    for path in ["/healthz", "/readyz", "/metrics"] {
        let r = common::send(p.admin, "HEAD", path, &[], "").await;
        assert_eq!(r.status, 200, "HEAD {path}: {r:?}");
        assert!(r.body.is_empty(), "HEAD {path} sent a body");
    }
    let r = common::send(p.admin, "POST", "/healthz", &[], "").await;
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("GET, HEAD"));
}

/// The store's group-commit counters move with the traffic, as of each scrape, not at the next sweep.
#[tokio::test]
async fn store_commit_counters_move_at_each_scrape() {
    let up = Upstream::start();
    let p = Proxy::builder(up.url())
        .store("sweep_interval = \"1h\"")
        .start()
        .await;
    let before = common::metrics::scrape(&p, "idemproxy_store_durable_writes_total").await;
    for i in 0..5 {
        post_key(p.addr, "/echo", &format!("commit-{i}"), "x").await;
    }
    let writes = common::metrics::scrape(&p, "idemproxy_store_durable_writes_total").await;
    let flushes = common::metrics::scrape(&p, "idemproxy_store_flushes_total").await;
    assert!(
        writes >= before + 10.0,
        "5 claims and 5 results: {before} -> {writes}"
    );
    assert!(flushes >= 1.0, "no log sync counted: {flushes}");
}

/// A `key = "fingerprint"` route derives its keys from the request: every answer says which
/// (`Idempotency-Derived-Key`), so an operator can look the key up and purge it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fingerprint_keys_are_told_in_the_answer_and_can_be_looked_up_and_purged() {
    const TOKEN: &str = "fp-token";
    let up = Upstream::start();
    let p = Proxy::builder(up.url())
        .admin(&format!("token = \"{TOKEN}\""))
        .extra("[[routes]]\nname = \"hooks\"\npath = \"/echo\"\nkey = \"fingerprint\"\n")
        .start()
        .await;
    let auth = format!("Bearer {TOKEN}");
    let first = send(p.addr, "POST", "/echo", &[TEXT], "event-1").await;
    first.assert_forwarded(201, b"event-1");
    let key = first
        .header("idempotency-derived-key")
        .unwrap_or_else(|| panic!("no derived key: {first:?}"))
        .to_owned();
    assert!(
        key.len() == 64 && key.bytes().all(|b| b.is_ascii_hexdigit()),
        "{key}"
    );
    let again = send(p.addr, "POST", "/echo", &[TEXT], "event-1").await;
    again.assert_replay(201, b"event-1");
    assert_eq!(again.header("idempotency-derived-key"), Some(key.as_str()));
    // Keyed routes do not get it.
    let keyed = post_key(p.addr, "/other", "plain-1", "x").await;
    assert_eq!(keyed.header("idempotency-derived-key"), None);

    let path = keys_path("hooks", &key);
    let r = admin(&p, "GET", &path, Some(&auth)).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["records"][0]["state"], "completed", "{}", r.text());
    let r = admin(&p, "DELETE", &path, Some(&auth)).await;
    assert_eq!(r.status, 200, "{r:?}");
    send(p.addr, "POST", "/echo", &[TEXT], "event-1")
        .await
        .assert_forwarded(201, b"event-1");
}

/// A reload that changes `admin.listen` moves the admin listener (it is not left for a restart), so
/// `idemproxy health --config FILE` probes where the process listens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_moves_the_admin_listener_and_health_follows_the_file() {
    let up = Upstream::start();
    let p = Proxy::builder(up.url()).start().await;
    let old = p.admin;
    let new = common::dead_addr();
    let text = std::fs::read_to_string(p.config_path()).unwrap();
    let moved = text.replacen(
        "[admin]\nlisten = \"127.0.0.1:0\"",
        &format!("[admin]\nlisten = \"{new}\""),
        1,
    );
    assert_ne!(moved, text, "the test config has no [admin] listen line");
    p.write_config(&moved);
    let mark = p.log_mark();
    p.sighup();
    p.wait_log(mark, Duration::from_secs(10), "the reload", |l| {
        l.contains("config reloaded")
    })
    .await;
    let lines = p.logs_since(mark).join("\n");
    assert!(lines.contains("admin listener moved to"), "{lines}");
    assert!(
        !lines.contains("admin.listen changed"),
        "admin.listen was left for a restart: {lines}"
    );
    let r = send(new, "GET", "/healthz", &[], "").await;
    assert_eq!(r.status, 200, "the new admin address: {r:?}");
    assert!(
        try_send(old, "GET", "/healthz", &[], "").await.is_err(),
        "the old admin address still answers"
    );
    let cfg = p.config_path().display().to_string();
    let out = common::run_cli(&["health", "--config", &cfg], &[], Duration::from_secs(20));
    assert_eq!(
        out.code(),
        Some(0),
        "health --config after the move: {out:?}"
    );
}
