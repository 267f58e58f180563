//! Request handling of the real `idemproxy` binary, one request at a time: replay and its headers, keys
//! (optional, required, invalid, sf-string, fingerprint and JSON-pointer keys), fingerprint mismatches, TTL
//! expiry, tenant scoping (and no raw credential in the sled files), released statuses and upstream failures,
//! body limits, hop-by-hop headers, `Set-Cookie`, `store_response = false`, oversize responses, `[[routes]]`
//! matching, the admin listener and key redaction in logs.
//!
//! Each test runs its own upstream, proxy process, tempdir and ports.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::client::raw_request;
use common::{dead_addr, eventually, post_key, raw_exchange, send, Proxy, Resp, Upstream};

const TEXT: (&str, &str) = ("Content-Type", "text/plain");
const JSON: (&str, &str) = ("Content-Type", "application/json");

async fn start(up: &Upstream, defaults: &str) -> Proxy {
    Proxy::builder(up.url()).defaults(defaults).start().await
}

async fn post_json(p: &Proxy, body: &str) -> Resp {
    send(p.addr, "POST", "/echo", &[JSON], body).await
}

#[tokio::test]
async fn replay_returns_stored_status_body_and_content_type() {
    let up = Upstream::start();
    let p = start(&up, "").await;
    let body: Vec<u8> = b"{\"amount\": 42}\x00\xff\xfe binary tail\r\n".to_vec();
    let hdrs = [
        ("Idempotency-Key", "replay-1"),
        ("Content-Type", "application/vnd.test+json"),
    ];

    let first = send(p.addr, "POST", "/echo", &hdrs, &body).await;
    first.assert_forwarded(201, &body);
    assert_eq!(
        first.header("content-type"),
        Some("application/vnd.test+json")
    );
    assert!(first.header("idempotent-replayed").is_none());

    for _ in 0..2 {
        let again = send(p.addr, "POST", "/echo", &hdrs, &body).await;
        again.assert_replay(201, &body);
        assert_eq!(
            again.header("content-type"),
            Some("application/vnd.test+json")
        );
    }
    assert_eq!(up.hits_key("replay-1"), 1);
    assert_eq!(up.hits_path("/echo"), 1);
}

#[tokio::test]
async fn request_without_key_is_forwarded_every_time() {
    let up = Upstream::start();
    let p = start(&up, "required = false").await;
    for _ in 0..3 {
        send(p.addr, "POST", "/echo", &[TEXT], "same body")
            .await
            .assert_forwarded(201, b"same body");
    }
    assert_eq!(up.hits_path("/echo"), 3);
}

#[tokio::test]
async fn required_key_missing_is_400_problem_and_not_forwarded() {
    let up = Upstream::start();
    let p = start(&up, "required = true").await;
    for method in ["POST", "PATCH"] {
        let r = send(p.addr, method, "/echo", &[TEXT], "no key").await;
        r.assert_problem(400, "missing-key");
    }
    assert_eq!(up.hits_total(), 0, "nothing may reach the upstream");

    // Methods outside `methods` need no key.
    let r = send(p.addr, "GET", "/counter", &[], "").await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(up.hits_path("/counter"), 1);
}

#[tokio::test]
async fn get_and_put_with_a_key_are_passed_through_untouched() {
    let up = Upstream::start();
    let p = start(&up, "required = true").await;
    let key = [("Idempotency-Key", "get-1")];

    let before = send(p.addr, "GET", "/counter", &key, "").await;
    assert_eq!(before.status, 200);
    assert_eq!(before.json()["count"], 0);
    post_key(p.addr, "/echo", "get-other", "x")
        .await
        .assert_forwarded(201, b"x");
    let after = send(p.addr, "GET", "/counter", &key, "").await;
    assert_eq!(after.status, 200);
    assert!(!after.replayed(), "GET must not be replayed: {after:?}");
    assert_eq!(
        after.json()["count"],
        1,
        "second GET must reach the upstream"
    );

    for n in 1..=2 {
        let r = send(p.addr, "PUT", "/thing", &[("Idempotency-Key", "put-1")], "").await;
        r.assert_forwarded(200, format!("hit {n} PUT /thing").as_bytes());
    }
    assert_eq!(up.hits_path("/counter"), 2);
    assert_eq!(up.hits_path("/thing"), 2);
}

#[tokio::test]
async fn changed_body_is_422_and_the_record_is_untouched() {
    let up = Upstream::start();
    let p = start(&up, "").await;
    post_key(p.addr, "/echo", "mm-1", "payload-a")
        .await
        .assert_forwarded(201, b"payload-a");
    post_key(p.addr, "/echo", "mm-1", "payload-b")
        .await
        .assert_problem(422, "fingerprint-mismatch");
    post_key(p.addr, "/echo", "mm-1", "payload-a")
        .await
        .assert_replay(201, b"payload-a");
    assert_eq!(up.hits_key("mm-1"), 1);
}

#[tokio::test]
async fn changed_content_type_or_query_is_422() {
    let up = Upstream::start();
    let p = start(&up, "").await;
    let key = ("Idempotency-Key", "mm-ct");
    send(p.addr, "POST", "/echo", &[key, TEXT], "{}")
        .await
        .assert_forwarded(201, b"{}");
    send(p.addr, "POST", "/echo", &[key, JSON], "{}")
        .await
        .assert_problem(422, "fingerprint-mismatch");
    send(p.addr, "POST", "/echo?v=2", &[key, TEXT], "{}")
        .await
        .assert_problem(422, "fingerprint-mismatch");
    let r = send(p.addr, "POST", "/echo", &[key, TEXT], "{}").await;
    r.assert_replay(201, b"{}");
    assert_eq!(r.header("content-type"), Some("text/plain"));
    assert_eq!(up.hits_key("mm-ct"), 1);
}

#[tokio::test]
async fn invalid_keys_are_400_invalid_key() {
    let up = Upstream::start();
    let p = start(&up, "").await;
    let too_long = "a".repeat(256);
    let cases = [
        ("empty", ""),
        ("empty sf-string", "\"\""),
        ("256 bytes", too_long.as_str()),
        ("space inside", "ab cd"),
        ("tab inside", "ab\tcd"),
        ("non-ASCII", "k\u{e9}y"),
    ];
    for (what, key) in cases {
        let r = send(
            p.addr,
            "POST",
            "/echo",
            &[("Idempotency-Key", key), TEXT],
            "x",
        )
        .await;
        assert_eq!(r.status, 400, "{what} key {key:?} must be rejected: {r:?}");
        r.assert_problem(400, "invalid-key");
    }
    assert_eq!(up.hits_total(), 0, "invalid keys must not be forwarded");

    let longest = "a".repeat(255);
    post_key(p.addr, "/echo", &longest, "x")
        .await
        .assert_forwarded(201, b"x");
    post_key(p.addr, "/echo", &longest, "x")
        .await
        .assert_replay(201, b"x");
    assert_eq!(up.hits_path("/echo"), 1);
}

#[tokio::test]
async fn sf_string_key_is_the_same_key_as_the_bare_token() {
    let up = Upstream::start();
    let p = start(&up, "").await;
    post_key(p.addr, "/echo", "\"abc\"", "x")
        .await
        .assert_forwarded(201, b"x");
    post_key(p.addr, "/echo", "abc", "x")
        .await
        .assert_replay(201, b"x");
    post_key(p.addr, "/echo", "\"abc\"", "x")
        .await
        .assert_replay(201, b"x");

    post_key(p.addr, "/echo", "xyz", "y")
        .await
        .assert_forwarded(201, b"y");
    post_key(p.addr, "/echo", "\"xyz\"", "y")
        .await
        .assert_replay(201, b"y");
    assert_eq!(up.hits_path("/echo"), 2);
}

#[tokio::test]
async fn key_is_forgotten_after_ttl() {
    let up = Upstream::start();
    let p = start(&up, "ttl = \"1s\"").await;
    let t0 = Instant::now();
    post_key(p.addr, "/echo", "ttl-1", "v")
        .await
        .assert_forwarded(201, b"v");
    let r = post_key(p.addr, "/echo", "ttl-1", "v").await;
    if t0.elapsed() < Duration::from_millis(800) {
        r.assert_replay(201, b"v");
    }

    let addr = p.addr;
    let fresh = eventually(
        Duration::from_secs(10),
        "the key to expire",
        || async move {
            let r = post_key(addr, "/echo", "ttl-1", "v").await;
            (!r.replayed()).then_some(r)
        },
    )
    .await;
    fresh.assert_forwarded(201, b"v");
    assert!(
        t0.elapsed() >= Duration::from_secs(1),
        "expired after {:?}, before the 1 s TTL",
        t0.elapsed()
    );
    post_key(p.addr, "/echo", "ttl-1", "v")
        .await
        .assert_replay(201, b"v");
    assert_eq!(up.hits_key("ttl-1"), 2);
}

#[tokio::test]
async fn fingerprint_key_dedupes_identical_requests() {
    let up = Upstream::start();
    let p = start(&up, "key = \"fingerprint\"").await;
    send(p.addr, "POST", "/echo", &[TEXT], "order-1")
        .await
        .assert_forwarded(201, b"order-1");
    send(p.addr, "POST", "/echo", &[TEXT], "order-1")
        .await
        .assert_replay(201, b"order-1");
    send(p.addr, "POST", "/echo", &[TEXT], "order-2")
        .await
        .assert_forwarded(201, b"order-2");
    send(p.addr, "POST", "/echo", &[TEXT], "order-2")
        .await
        .assert_replay(201, b"order-2");
    assert_eq!(up.hits_path("/echo"), 2);
}

#[tokio::test]
async fn json_key_replays_by_pointer_value() {
    let up = Upstream::start();
    let p = start(
        &up,
        "key = \"json\"\njson_pointer = \"/id\"\nrequired = false",
    )
    .await;

    let a = r#"{"id":"evt_1","v":1}"#;
    post_json(&p, a).await.assert_forwarded(201, a.as_bytes());
    post_json(&p, a).await.assert_replay(201, a.as_bytes());
    post_json(&p, r#"{"id":"evt_1","v":2}"#)
        .await
        .assert_problem(422, "fingerprint-mismatch");

    // An integer id is its decimal text: 42 and "42" are the same key.
    let n = r#"{"id":42,"v":1}"#;
    post_json(&p, n).await.assert_forwarded(201, n.as_bytes());
    post_json(&p, n).await.assert_replay(201, n.as_bytes());
    post_json(&p, r#"{"id":"42","v":1}"#)
        .await
        .assert_problem(422, "fingerprint-mismatch");

    // No value at the pointer and not required: forwarded every time.
    let none = r#"{"other":1}"#;
    post_json(&p, none)
        .await
        .assert_forwarded(201, none.as_bytes());
    post_json(&p, none)
        .await
        .assert_forwarded(201, none.as_bytes());

    let hits = |b: &str| up.count(|r| r.body == b.as_bytes());
    assert_eq!((hits(a), hits(n), hits(none)), (1, 1, 2));
}

#[tokio::test]
async fn json_key_rejects_unusable_bodies() {
    let up = Upstream::start();
    let p = start(
        &up,
        "key = \"json\"\njson_pointer = \"/id\"\nrequired = true",
    )
    .await;
    for body in [
        "not json",
        r#"{"id":{"a":1}}"#,
        r#"{"id":[1,2]}"#,
        r#"{"id":true}"#,
    ] {
        let r = post_json(&p, body).await;
        assert_eq!(r.status, 400, "body {body:?}: {r:?}");
        r.assert_problem(400, "invalid-json-key");
    }
    post_json(&p, r#"{"other":1}"#)
        .await
        .assert_problem(400, "missing-key");
    assert_eq!(up.hits_total(), 0);
}

#[tokio::test]
async fn scope_headers_separate_tenants_and_raw_credentials_are_not_stored() {
    let up = Upstream::start();
    let mut p = start(&up, "scope_headers = [\"Authorization\"]").await;
    let tenant_a = "Bearer tenant-a-CREDENTIAL-7f3a9c";
    let tenant_b = "Bearer tenant-b-CREDENTIAL-0d2e6b";
    let addr = p.addr;
    let as_tenant = |auth: &'static str, body: &'static str| async move {
        send(
            addr,
            "POST",
            "/echo",
            &[
                ("Idempotency-Key", "shared-key"),
                TEXT,
                ("Authorization", auth),
            ],
            body,
        )
        .await
    };

    as_tenant(tenant_a, "from-a")
        .await
        .assert_forwarded(201, b"from-a");
    as_tenant(tenant_b, "from-b")
        .await
        .assert_forwarded(201, b"from-b");
    as_tenant(tenant_a, "from-a")
        .await
        .assert_replay(201, b"from-a");
    as_tenant(tenant_b, "from-b")
        .await
        .assert_replay(201, b"from-b");
    assert_eq!(up.hits_key("shared-key"), 2);
    assert_eq!(
        up.count(|r| r.header("authorization") == Some(tenant_a)),
        1,
        "Authorization is forwarded to the upstream"
    );

    let status = p.sigterm().await;
    assert!(status.success(), "exit status {status}");
    let mut files = 0;
    let mut bytes = 0;
    let mut stack = vec![p.data_dir()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let data = std::fs::read(&path).unwrap();
            files += 1;
            bytes += data.len();
            for needle in [tenant_a, tenant_b, "CREDENTIAL-7f3a9c", "CREDENTIAL-0d2e6b"] {
                assert!(
                    !data.windows(needle.len()).any(|w| w == needle.as_bytes()),
                    "raw credential {needle:?} found in {}",
                    path.display()
                );
            }
        }
    }
    assert!(
        files > 0 && bytes > 0,
        "the sled dir {} holds no data",
        p.data_dir().display()
    );
}

#[tokio::test]
async fn released_statuses_free_the_key_and_other_statuses_are_recorded() {
    let up = Upstream::start();
    let p = start(&up, "").await;
    for _ in 0..2 {
        post_key(p.addr, "/status/503", "rel-503", "x")
            .await
            .assert_forwarded(503, b"status:503");
    }
    assert_eq!(up.hits_key("rel-503"), 2, "a 503 must not be recorded");

    for code in [500u16, 404] {
        let key = format!("rec-{code}");
        let path = format!("/status/{code}");
        let body = format!("status:{code}");
        post_key(p.addr, &path, &key, "x")
            .await
            .assert_forwarded(code, body.as_bytes());
        post_key(p.addr, &path, &key, "x")
            .await
            .assert_replay(code, body.as_bytes());
        assert_eq!(up.hits_key(&key), 1, "a {code} is recorded");
    }
}

#[tokio::test]
async fn unreachable_upstream_is_502_and_frees_the_key() {
    let dead = dead_addr();
    let p = Proxy::builder(format!("http://{dead}"))
        .upstream("connect_timeout = \"1s\"")
        .start()
        .await;
    for _ in 0..2 {
        post_key(p.addr, "/echo", "unreach-1", "x")
            .await
            .assert_problem(502, "upstream-unreachable");
    }
}

#[tokio::test]
async fn upstream_timeout_is_504_and_frees_the_key() {
    let up = Upstream::start();
    let p = Proxy::builder(up.url())
        .upstream("timeout = \"500ms\"")
        .start()
        .await;
    for n in 1..=2 {
        post_key(p.addr, "/gate/t", "timeout-1", "x")
            .await
            .assert_problem(504, "upstream-timeout");
        assert_eq!(up.gate_arrivals("t"), n);
    }
    up.open("t");
}

#[tokio::test]
async fn request_body_over_the_limit_is_413_while_pass_through_streams_unlimited() {
    let up = Upstream::start();
    let p = Proxy::builder(up.url())
        .server("max_request_body = \"1KiB\"")
        .start()
        .await;

    let at_limit = vec![b'a'; 1024];
    send(
        p.addr,
        "POST",
        "/echo",
        &[("Idempotency-Key", "big-ok"), TEXT],
        &at_limit,
    )
    .await
    .assert_forwarded(201, &at_limit);

    let over = vec![b'b'; 1025];
    send(
        p.addr,
        "POST",
        "/echo",
        &[("Idempotency-Key", "big-1"), TEXT],
        &over,
    )
    .await
    .assert_problem(413, "body-too-large");

    // Chunked, so the proxy cannot trust a Content-Length.
    let chunk = "c".repeat(600);
    let mut req = format!(
        "POST /echo HTTP/1.1\r\nHost: {}\r\nIdempotency-Key: big-2\r\nContent-Type: text/plain\r\n\
         Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
        p.addr
    );
    for _ in 0..3 {
        req.push_str(&format!("{:x}\r\n{chunk}\r\n", chunk.len()));
    }
    req.push_str("0\r\n\r\n");
    raw_exchange(p.addr, req.as_bytes())
        .await
        .assert_problem(413, "body-too-large");
    assert_eq!(up.hits_key("big-1") + up.hits_key("big-2"), 0);

    // The rejected key was never claimed.
    send(
        p.addr,
        "POST",
        "/echo",
        &[("Idempotency-Key", "big-1"), TEXT],
        "small",
    )
    .await
    .assert_forwarded(201, b"small");

    // PUT is not protected: no limit.
    let large = vec![b'p'; 64 * 1024];
    send(
        p.addr,
        "PUT",
        "/echo",
        &[("Idempotency-Key", "big-put"), TEXT],
        &large,
    )
    .await
    .assert_forwarded(201, &large);
    assert_eq!(up.hits_path("/echo"), 3);
}

#[tokio::test]
async fn hop_by_hop_headers_are_stripped_and_forwarding_headers_set() {
    let up = Upstream::start();
    let p = start(&up, "").await;
    let r = send(
        p.addr,
        "POST",
        "/headers",
        &[
            ("Idempotency-Key", "hop-1"),
            TEXT,
            ("Connection", "X-Custom"),
            ("X-Custom", "1"),
            ("Keep-Alive", "timeout=5"),
            ("TE", "deflate"),
            ("Proxy-Authorization", "Basic c2VjcmV0"),
            ("X-Other", "kept"),
        ],
        "{}",
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    let seen = r.json();
    for h in ["x-custom", "keep-alive", "te", "proxy-authorization"] {
        assert!(seen.get(h).is_none(), "{h} reached the upstream: {seen}");
    }
    if let Some(conn) = seen.get("connection") {
        assert!(
            !conn.to_string().to_ascii_lowercase().contains("x-custom"),
            "Connection forwarded: {seen}"
        );
    }
    assert_eq!(seen["idempotency-key"][0], "hop-1", "{seen}");
    assert_eq!(seen["x-other"][0], "kept", "{seen}");
    assert_eq!(seen["host"][0], up.addr().to_string(), "{seen}");
    assert_eq!(seen["x-forwarded-proto"][0], "http", "{seen}");
    assert_eq!(seen["x-forwarded-host"][0], p.addr.to_string(), "{seen}");
    let xff = seen["x-forwarded-for"][0].as_str().unwrap_or_default();
    assert!(xff.contains("127.0.0.1"), "X-Forwarded-For {xff:?}: {seen}");

    // And on the way back, first answer and replay alike.
    let first = post_key(p.addr, "/hop", "hop-2", "x").await;
    first.assert_forwarded(200, b"hop");
    let replay = post_key(p.addr, "/hop", "hop-2", "x").await;
    replay.assert_replay(200, b"hop");
    for r in [&first, &replay] {
        assert!(r.header("x-hop").is_none(), "X-Hop leaked: {r:?}");
        assert!(r.header("keep-alive").is_none(), "Keep-Alive leaked: {r:?}");
        if let Some(conn) = r.header("connection") {
            assert!(!conn.to_ascii_lowercase().contains("x-hop"), "{r:?}");
        }
        assert_eq!(r.header("x-end"), Some("kept"), "{r:?}");
    }
}

#[tokio::test]
async fn set_cookie_is_not_replayed_but_other_headers_are() {
    let up = Upstream::start();
    let p = start(&up, "").await;
    let first = post_key(p.addr, "/cookie", "cookie-1", "x").await;
    first.assert_forwarded(200, b"cookie");
    assert!(first.header("set-cookie").is_some(), "{first:?}");
    let replay = post_key(p.addr, "/cookie", "cookie-1", "x").await;
    replay.assert_replay(200, b"cookie");
    assert!(
        replay.header("set-cookie").is_none(),
        "Set-Cookie replayed: {replay:?}"
    );
    assert_eq!(replay.header("x-cookie-route"), Some("1"));
    assert_eq!(up.hits_key("cookie-1"), 1);
}

#[tokio::test]
async fn store_response_false_answers_duplicates_with_duplicate_status() {
    let up = Upstream::start();
    let p = start(&up, "store_response = false\nduplicate_status = 202").await;
    post_key(p.addr, "/echo", "dedupe-1", "first")
        .await
        .assert_forwarded(201, b"first");
    for _ in 0..2 {
        post_key(p.addr, "/echo", "dedupe-1", "first")
            .await
            .assert_replay(202, b"");
    }
    assert_eq!(up.hits_key("dedupe-1"), 1);
}

#[tokio::test]
async fn oversize_response_is_streamed_and_replayed_without_body() {
    let up = Upstream::start();
    let p = Proxy::builder(up.url())
        .server("max_response_body = \"1KiB\"")
        .start()
        .await;
    let big = vec![b'x'; 5000];
    post_key(p.addr, "/large?bytes=5000", "large-1", "")
        .await
        .assert_forwarded(200, &big);
    let replay = post_key(p.addr, "/large?bytes=5000", "large-1", "").await;
    replay.assert_replay(200, b"");
    assert_eq!(
        replay.header("idempotency-replay"),
        Some("omitted"),
        "{replay:?}"
    );
    assert_eq!(replay.header("content-length"), Some("0"), "{replay:?}");
    assert_eq!(up.hits_key("large-1"), 1);

    let limit = vec![b'x'; 1024];
    post_key(p.addr, "/large?bytes=1024", "large-2", "")
        .await
        .assert_forwarded(200, &limit);
    let replay = post_key(p.addr, "/large?bytes=1024", "large-2", "").await;
    replay.assert_replay(200, &limit);
    assert!(replay.header("idempotency-replay").is_none(), "{replay:?}");
}

#[tokio::test]
async fn routes_first_match_wins_and_inherit_defaults() {
    let up = Upstream::start();
    let p = Proxy::builder(up.url())
        .defaults("header = \"X-Request-Key\"\nrequired = false")
        .extra(
            r#"
[[routes]]
name = "strict"
path = "/v1/payments/**"
required = true

[[routes]]
name = "broad"
path = "/v1/**"
methods = ["POST", "PUT"]

[[routes]]
name = "off"
path = "/internal/**"
enabled = false

[[routes]]
name = "star"
path = "/one/*/x"
required = true
"#,
        )
        .start()
        .await;
    let a = p.addr;
    let rk = |k: &'static str| [("X-Request-Key", k), TEXT];

    // strict matches before broad; the query is not part of the match.
    for path in ["/v1/payments/p1", "/v1/payments/p1?q=1", "/v1/payments/a/b"] {
        send(a, "POST", path, &[TEXT], "x")
            .await
            .assert_problem(400, "missing-key");
    }
    // strict inherits `header` from [defaults]: Idempotency-Key is not its key header.
    send(
        a,
        "POST",
        "/v1/payments/p1",
        &[("Idempotency-Key", "pay-x"), TEXT],
        "x",
    )
    .await
    .assert_problem(400, "missing-key");
    send(a, "POST", "/v1/payments/p1", &rk("pay-1"), "x")
        .await
        .assert_forwarded(200, b"hit 1 POST /v1/payments/p1");
    send(a, "POST", "/v1/payments/p1", &rk("pay-1"), "x")
        .await
        .assert_replay(200, b"hit 1 POST /v1/payments/p1");
    // strict inherits `methods` (POST, PATCH) from [defaults].
    send(a, "PATCH", "/v1/payments/p1", &[TEXT], "x")
        .await
        .assert_problem(400, "missing-key");

    // broad: not required (inherited), PUT protected.
    send(a, "POST", "/v1/other", &[TEXT], "x")
        .await
        .assert_forwarded(200, b"hit 1 POST /v1/other");
    send(a, "PUT", "/v1/other", &rk("put-1"), "x")
        .await
        .assert_forwarded(200, b"hit 2 PUT /v1/other");
    send(a, "PUT", "/v1/other", &rk("put-1"), "x")
        .await
        .assert_replay(200, b"hit 2 PUT /v1/other");
    // The same client key on another route is another record.
    send(a, "POST", "/v1/other", &rk("pay-1"), "x")
        .await
        .assert_forwarded(200, b"hit 3 POST /v1/other");

    // off: pure pass-through.
    for n in 1..=2 {
        send(a, "POST", "/internal/job", &rk("int-1"), "x")
            .await
            .assert_forwarded(200, format!("hit {n} POST /internal/job").as_bytes());
    }
    send(a, "POST", "/internal/job", &[TEXT], "x")
        .await
        .assert_forwarded(200, b"hit 3 POST /internal/job");

    // `*` stays within one segment.
    send(a, "POST", "/one/a/x", &[TEXT], "x")
        .await
        .assert_problem(400, "missing-key");
    send(a, "POST", "/one/a/b/x", &[TEXT], "x")
        .await
        .assert_forwarded(200, b"hit 1 POST /one/a/b/x");

    assert_eq!(up.hits_path("/v1/payments/p1"), 1);
    assert_eq!(up.hits_path("/one/a/x"), 0);
}

#[tokio::test]
async fn admin_listener_serves_health_and_readiness() {
    let up = Upstream::start();
    let p = start(&up, "").await;
    assert_eq!(p.admin_get("/healthz").await.status, 200);
    assert_eq!(p.admin_get("/readyz").await.status, 200);
    assert_ne!(p.admin, p.addr);
    // The proxy listener does not serve admin paths itself.
    let r = send(p.addr, "GET", "/healthz", &[], "").await;
    r.assert_forwarded(200, b"hit 1 GET /healthz");
}

#[tokio::test]
async fn keys_never_appear_whole_in_logs() {
    let up = Upstream::start();
    let mut p = Proxy::builder(up.url())
        .env("RUST_LOG", "idemproxy=trace,info")
        .start()
        .await;
    let key = "LOGSECRET-0123456789abcdef";
    post_key(p.addr, "/echo", key, "a")
        .await
        .assert_forwarded(201, b"a");
    post_key(p.addr, "/echo", key, "a")
        .await
        .assert_replay(201, b"a");
    post_key(p.addr, "/echo", key, "b")
        .await
        .assert_problem(422, "fingerprint-mismatch");
    let raw = raw_request(
        p.addr,
        "POST",
        "/echo",
        &[("Idempotency-Key", key), TEXT],
        b"a",
    );
    raw_exchange(p.addr, &raw).await.assert_replay(201, b"a");
    assert!(p.sigterm().await.success());
    let logs = p.logs();
    assert!(!logs.is_empty());
    for line in logs {
        assert!(
            !line.contains(&key[..9]),
            "more than 8 characters of the key in a log line: {line}"
        );
    }
}

/// Connections are served on one thread per core (`server::Workers`): the process has one
/// `idemproxy-serve-N` thread per core, and requests on many connections are all answered.
#[tokio::test]
async fn connections_are_served_on_one_thread_per_core() {
    let up = Upstream::start();
    let p = start(&up, "required = false").await;
    for i in 0..8 {
        send(p.addr, "POST", "/echo", &[TEXT], &format!("body {i}"))
            .await
            .assert_forwarded(201, format!("body {i}").as_bytes());
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let serving = std::fs::read_dir(format!("/proc/{}/task", p.pid()))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.unwrap().path().join("comm")).ok())
        .filter(|name| name.starts_with("idemproxy-serve"))
        .count();
    assert_eq!(serving, cores, "serving threads");
    assert_eq!(up.hits_path("/echo"), 8);
}
