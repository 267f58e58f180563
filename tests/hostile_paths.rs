//! Contract rule 13, normalized paths, against the real binary: route matching, the store key and the
//! fingerprint use the normalized path (RFC 3986 §6.2.2, plus case and a trailing `/` for matching), while
//! the upstream gets the path exactly as the client sent it.
//!
//! What this pins (each case failed before paths were normalized): a spelled path (`/v1//payments/a`,
//! `/v1/%70ayments/a`, …) slipped past a `required = true` route and reached the upstream without a key;
//! one key sent on two spellings of one path ran twice (or was a 422); a path that cannot be normalized
//! (malformed escape, encoded NUL) was forwarded instead of refused with 400 `invalid-path`; and a route
//! `path` with `?` or `#` (which can never match, since routes see the path only) was accepted by `check`.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::client::raw_request;
use common::{post_key, raw_exchange, run_cli, send, CliOutput, Proxy, Upstream};

const TEXT: (&str, &str) = ("Content-Type", "text/plain");

const PAYMENTS_ROUTE: &str = "[[routes]]\nname = \"payments\"\npath = \"/v1/payments/**\"\n\
                              methods = [\"POST\"]\nrequired = true\n";

async fn proxy(up: &Upstream) -> Proxy {
    Proxy::builder(up.url()).extra(PAYMENTS_ROUTE).start().await
}

/// Every spelling of `/v1/payments/a` is still under the `payments` route: a POST without a key is
/// 400 `missing-key` and never reaches the upstream. (A path outside the route is forwarded, so the
/// route does not simply match everything.)
#[tokio::test]
async fn spelled_paths_cannot_bypass_a_required_route() {
    let up = Upstream::start();
    let p = proxy(&up).await;
    for spelling in [
        "/v1//payments/a",
        "/v1/%70ayments/a",
        "/v1/./payments/a",
        "/v1/x/../payments/a",
        "/v1/payments/a/",
        "/V1/payments/a",
        "/v1%2Fpayments%2Fa",
        "/v1/payments;x=1/a",
    ] {
        let r = send(p.addr, "POST", spelling, &[TEXT], "no key").await;
        assert_eq!(
            r.status,
            400,
            "{spelling}: expected 400 missing-key, got {r:?} ({:?})",
            r.text()
        );
        r.assert_problem(400, "missing-key");
    }
    assert_eq!(
        up.hits_total(),
        0,
        "a spelled path reached the upstream without a key: {:?}",
        up.requests()
    );

    // Control: outside the route a POST without a key is forwarded ([defaults] has required = false).
    let r = send(p.addr, "POST", "/v2/payments/a", &[TEXT], "no key").await;
    r.assert_forwarded(200, b"hit 1 POST /v2/payments/a");
}

/// One key sent on two spellings of one path is one request: forwarded once, then replayed.
#[tokio::test]
async fn one_key_on_two_spellings_of_a_path_runs_once() {
    let up = Upstream::start();
    let p = proxy(&up).await;
    let first = post_key(p.addr, "/v1/payments/a", "spell-1", "amount=5").await;
    first.assert_forwarded(200, b"hit 1 POST /v1/payments/a");
    let second = post_key(p.addr, "/v1//payments/./a", "spell-1", "amount=5").await;
    second.assert_replay(200, b"hit 1 POST /v1/payments/a");
    assert_eq!(up.hits_key("spell-1"), 1, "{:?}", up.requests());
}

/// Normalization is for comparing only: the upstream receives the path byte for byte as sent.
#[tokio::test]
async fn the_upstream_receives_the_path_as_sent() {
    let up = Upstream::start();
    let p = proxy(&up).await;
    let spelled = "/v1//payments/./%62";
    post_key(p.addr, spelled, "as-sent-1", "x")
        .await
        .assert_forwarded(200, format!("hit 1 POST {spelled}").as_bytes());
    let reqs = up.requests();
    assert_eq!(reqs.len(), 1, "{reqs:?}");
    assert_eq!(reqs[0].path, spelled, "the upstream got a rewritten path");
}

/// A path that cannot be normalized (a malformed escape, an encoded NUL) is 400 `invalid-path`, with or
/// without a key and whatever the method, and nothing is forwarded. Sent over raw TCP: client libraries
/// may refuse to send such a target.
#[tokio::test]
async fn unnormalizable_paths_are_400_invalid_path() {
    let up = Upstream::start();
    let p = proxy(&up).await;
    for path in ["/v1/payments/%zz", "/a%", "/a%00b", "/v1/payments/%4"] {
        for (method, headers) in [
            ("POST", &[("Idempotency-Key", "bad-path-1"), TEXT][..]),
            ("POST", &[TEXT][..]),
            ("GET", &[][..]),
        ] {
            let req = raw_request(p.addr, method, path, headers, b"body");
            let r = raw_exchange(p.addr, &req).await;
            assert_eq!(
                r.status,
                400,
                "{method} {path}: expected 400 invalid-path, got {r:?} ({:?})",
                r.text()
            );
            r.assert_problem(400, "invalid-path");
        }
    }
    assert_eq!(
        up.hits_total(),
        0,
        "an unnormalizable path was forwarded: {:?}",
        up.requests()
    );
}

fn check_route_path(dir: &Path, route_path: &str) -> CliOutput {
    let cfg: PathBuf = dir.join("config.toml");
    std::fs::write(
        &cfg,
        format!(
            "[upstream]\nurl = \"http://127.0.0.1:3000\"\n\n\
             [[routes]]\nname = \"q\"\npath = \"{route_path}\"\n"
        ),
    )
    .unwrap();
    run_cli(
        &["check", "--config", cfg.to_str().unwrap()],
        &[],
        Duration::from_secs(20),
    )
}

/// A route `path` with a `?` or `#` is a config error with its path and a reason (routes see the path
/// only, so such a route could never match).
#[test]
fn check_refuses_a_route_path_with_a_query_or_fragment() {
    let dir = tempfile::tempdir().unwrap();
    let ok = check_route_path(dir.path(), "/q/**");
    assert_eq!(ok.code(), Some(0), "control config fails:\n{}", ok.stderr);
    for route_path in ["/q?y=1", "/q#top"] {
        let out = check_route_path(dir.path(), route_path);
        assert_eq!(
            out.code(),
            Some(2),
            "{route_path}: stdout:\n{}\nstderr:\n{}",
            out.stdout,
            out.stderr
        );
        let line = out
            .stderr_lines()
            .into_iter()
            .find(|l| l.trim_start().starts_with("routes[0].path: "))
            .unwrap_or_else(|| {
                panic!(
                    "{route_path}: no `routes[0].path: ...` line:\n{}",
                    out.stderr
                )
            });
        let reason = line.trim_start()["routes[0].path: ".len()..].trim();
        assert!(
            reason.len() > route_path.len() + 4,
            "{route_path}: no reason given: {line:?}"
        );
    }
}

/// A path that reads as two routes goes to the one that protects it: `/public/..%2Fv1/payments/z` is
/// `/public/**` (pass-through) to a strict reader and `/v1/payments/z` to an upstream that decodes
/// `%2F`, so it must not get through `public` without a key, nor run twice under two store keys.
/// (Found by review: the first route matching any reading used to win.)
#[tokio::test]
async fn a_path_read_as_two_routes_takes_the_protecting_one() {
    let up = Upstream::start();
    let p = Proxy::builder(up.url())
        .extra("[[routes]]\nname = \"public\"\npath = \"/public/**\"\nenabled = false\n")
        .extra(PAYMENTS_ROUTE)
        .start()
        .await;
    let (status, raw) = raw_status(p.addr, "POST", "/public/..%2Fv1/payments/z1", &[]).await;
    assert_eq!(status, 400, "{raw}");
    assert!(raw.contains("missing-key"), "{raw}");
    let keyed = [("Idempotency-Key", "two-routes")];
    let (first, _) = raw_status(p.addr, "POST", "/v1/payments/z2", &keyed).await;
    let (second, raw) = raw_status(p.addr, "POST", "/public/..%2Fv1/payments/z2", &keyed).await;
    assert_eq!(first, 200);
    assert_ne!(
        second, 200,
        "the same key on another spelling ran again: {raw}"
    );
    assert_eq!(up.hits_total(), 1, "{:?}", up.requests());
}

/// Two named routes that both protect a path's two readings would give one key two store keys:
/// refused with 400 `invalid-path`, nothing forwarded.
#[tokio::test]
async fn a_path_read_as_two_protecting_routes_is_invalid_path() {
    let up = Upstream::start();
    let p = Proxy::builder(up.url())
        .extra("[[routes]]\nname = \"a\"\npath = \"/a/**\"\n[[routes]]\nname = \"b\"\npath = \"/b/**\"\n")
        .start()
        .await;
    let (status, raw) =
        raw_status(p.addr, "POST", "/a/..%2Fb/x", &[("Idempotency-Key", "k")]).await;
    assert_eq!(status, 400, "{raw}");
    assert!(raw.contains("invalid-path"), "{raw}");
    assert_eq!(up.hits_total(), 0);
}

/// With `key = "fingerprint"` the request is its own key: every spelling that route matching folds
/// together (case, a trailing `/`, `%2F`, `;params`, an empty query) is the same key, replayed, never
/// run again. (Found by review: the key used to see only the strict normal form.)
#[tokio::test]
async fn fingerprint_keys_fold_the_spellings_routes_fold() {
    let up = Upstream::start();
    let p = Proxy::builder(up.url())
        .extra("[[routes]]\nname = \"fp\"\npath = \"/fp/**\"\nkey = \"fingerprint\"\n")
        .start()
        .await;
    let first = send(p.addr, "POST", "/fp/a", &[TEXT], "same").await;
    assert_eq!(first.status, 200);
    for spelling in [
        "/fp/a/", "/FP/a", "/fp/A", "/fp%2Fa", "/fp/a;x", "/fp/a?", "/fp//a", "/fp/%61",
    ] {
        let (status, raw) = raw_status(p.addr, "POST", spelling, &[]).await;
        assert_eq!(status, 200, "{spelling}: {raw}");
        assert!(
            raw.contains("\"idempotent-replayed\": \"true\""),
            "{spelling} was not replayed: {raw}"
        );
    }
    assert_eq!(up.hits_total(), 1, "{:?}", up.requests());
}

/// Sends one request over raw TCP (so the path goes out exactly as written) with body `same`;
/// the status and the raw response.
async fn raw_status(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, String) {
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: test\r\nContent-Type: text/plain\r\nContent-Length: 4\r\nConnection: close\r\n"
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\nsame");
    let r = raw_exchange(addr, head.as_bytes()).await;
    (
        r.status,
        String::from_utf8_lossy(&r.body).into_owned() + &format!("{:?}", r.headers),
    )
}
