//! Routes, paths and headers: rules 9 (headers both ways), 12 (body limit, globs, the default
//! route), 13 (normalized paths) and 16 (forwarding headers).

use http::{uri::Scheme, StatusCode};
use idemproxy::{
    config::{Config, Overrides},
    metrics::Outcome,
};

use crate::harness::{request, Pipeline, Seen, PEER};

const TEXT: (&str, &str) = ("content-type", "text/plain");

/// The single value of header `name` the upstream got (`None` if absent; panics if repeated).
fn only(seen: &Seen, name: &str) -> Option<String> {
    let values: Vec<_> = seen.headers.get_all(name).iter().collect();
    assert!(
        values.len() <= 1,
        "{name} sent {} times: {seen:?}",
        values.len()
    );
    values.first().map(|v| v.to_str().unwrap().to_owned())
}

/// Rule 9: hop-by-hop headers (and those named in `Connection`) are stripped both ways, on the first
/// answer and on its replay; the key header reaches the upstream; X-Forwarded-For/-Proto/-Host carry
/// the client's. (`Host` becoming the upstream's authority is the network forwarder's job,
/// `Upstream::target`, behind the `Forward` seam these tests replace: not checked here. Log redaction
/// is not checked here either.)
#[tokio::test]
async fn rule_09_hop_by_hop_headers_are_stripped_both_ways_and_the_key_header_is_forwarded() {
    let p = Pipeline::new("");
    p.upstream.then_answer(
        200,
        &[
            ("connection", "x-hop"),
            ("x-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("proxy-authenticate", "Basic"),
            ("x-end", "kept"),
        ],
        "hop",
    );
    let req = request(
        "POST",
        "/headers",
        &[
            ("host", "shop.example"),
            ("idempotency-key", "hop-1"),
            TEXT,
            ("connection", "x-custom"),
            ("x-custom", "1"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("proxy-authorization", "Basic c2VjcmV0"),
            ("proxy-connection", "keep-alive"),
            ("x-other", "kept"),
        ],
        "{}",
    );
    let first = p.send(req).await;
    assert_eq!(first.outcome, Outcome::Forwarded, "{first:?}");
    let seen = p.upstream.last();
    for h in [
        "connection",
        "x-custom",
        "keep-alive",
        "te",
        "transfer-encoding",
        "upgrade",
        "proxy-authorization",
        "proxy-connection",
    ] {
        assert_eq!(only(&seen, h), None, "{h} reached the upstream");
    }
    assert_eq!(only(&seen, "idempotency-key").as_deref(), Some("hop-1"));
    assert_eq!(only(&seen, "x-other").as_deref(), Some("kept"));
    assert_eq!(
        only(&seen, "x-forwarded-host").as_deref(),
        Some("shop.example")
    );
    assert_eq!(only(&seen, "x-forwarded-proto").as_deref(), Some("http"));
    assert_eq!(
        only(&seen, "x-forwarded-for").as_deref(),
        Some("203.0.113.7")
    );

    let replay = p
        .send(request(
            "POST",
            "/headers",
            &[("host", "shop.example"), ("idempotency-key", "hop-1"), TEXT],
            "{}",
        ))
        .await;
    assert_eq!(replay.outcome, Outcome::Replayed);
    for r in [&first, &replay] {
        for h in ["connection", "x-hop", "keep-alive", "proxy-authenticate"] {
            assert!(
                !r.headers.contains_key(h),
                "{h} leaked to the client: {r:?}"
            );
        }
        assert_eq!(r.header("x-end"), "kept");
        assert_eq!(r.text(), "hop");
    }
}

/// Rule 12: `max_request_body` applies to requests under rules (413 `body-too-large`, nothing
/// forwarded), while pass-through streams unlimited; route paths are globs (`*` within a segment,
/// `**` across); a request matching no route is under `[defaults]` with the route name `default`.
#[tokio::test]
async fn rule_12_the_body_limit_applies_under_rules_only_and_routes_are_globs_with_a_default() {
    let p = Pipeline::new(
        "[server]\nmax_request_body = \"1KiB\"\n\
         [[routes]]\nname = \"one\"\npath = \"/one/*/x\"\nrequired = true\n\
         [[routes]]\nname = \"deep\"\npath = \"/deep/**\"\nrequired = true\n",
    );
    let at_limit = "a".repeat(1024);
    let over = "a".repeat(1025);
    let r = p.post("/pay", Some("big-0"), &at_limit).await;
    assert_eq!(r.outcome, Outcome::Forwarded);
    p.post("/pay", Some("big-1"), &over)
        .await
        .assert_problem(413, "body-too-large");
    p.post("/pay", None, &over)
        .await
        .assert_problem(413, "body-too-large");
    assert_eq!(p.upstream.hits(), 1, "an oversize body was forwarded");
    assert!(p.records("default", "big-1").await.is_empty());

    // Pass-through: a GET, and a method not in `methods`, with a body far over the limit.
    let large = "b".repeat(64 * 1024);
    for method in ["GET", "PUT"] {
        let r = p.send(request(method, "/pay", &[TEXT], &large)).await;
        assert_eq!(
            (r.status, r.outcome),
            (StatusCode::OK, Outcome::Passthrough)
        );
        assert_eq!(p.upstream.last().body.len(), large.len(), "{method}");
    }

    // `*` stays within one segment, `**` crosses them.
    p.post("/one/a/x", None, "x")
        .await
        .assert_problem(400, "missing-key");
    let r = p.post("/one/a/b/x", None, "x").await;
    assert_eq!(
        r.outcome,
        Outcome::Passthrough,
        "/one/*/x matched two segments"
    );
    for path in ["/deep/a", "/deep/a/b/c"] {
        p.post(path, None, "x")
            .await
            .assert_problem(400, "missing-key");
    }
    // No route matched: `[defaults]`, under the route name `default`.
    p.post("/elsewhere", Some("dflt"), "x").await;
    assert_eq!(p.records("default", "dflt").await.len(), 1);
    p.post("/deep/a", Some("in-deep"), "x").await;
    assert_eq!(p.records("deep", "in-deep").await.len(), 1);
    assert!(p.records("default", "in-deep").await.is_empty());
}

/// Rule 13: route matching, the store key and the fingerprint use the normalized path, route
/// matching ignoring case and a trailing `/` too; the upstream gets the path as sent; one key on two
/// spellings of one path never runs twice; a path that cannot be normalized is 400 `invalid-path`;
/// a route `path` with `?` or `#` is a config error.
#[tokio::test]
async fn rule_13_one_key_on_two_spellings_of_a_path_runs_once_and_goes_upstream_as_sent() {
    let p = Pipeline::new(
        "[[routes]]\nname = \"pay\"\npath = \"/pay/**\"\nmethods = [\"POST\"]\nrequired = true\n",
    );
    let spelled = "/pay//./%61bc?q=1";
    let first = p.post(spelled, Some("spell-1"), "amount=5").await;
    assert_eq!(first.outcome, Outcome::Forwarded);
    assert_eq!(
        p.upstream.last().uri.to_string(),
        spelled,
        "the path as sent"
    );
    for same in [
        "/pay/abc?q=1",
        "/pay/%61bc?q=1",
        "/pay//abc?q=1",
        "/x/../pay/abc?q=1",
    ] {
        let r = p.post(same, Some("spell-1"), "amount=5").await;
        assert_eq!(
            (r.outcome, r.text()),
            (Outcome::Replayed, "hit 1"),
            "{same}"
        );
    }
    // Case and a trailing `/` only matter to route matching: the route still applies ...
    for path in ["/PAY/abc", "/Pay/abc/", "/pay%2Fabc", "/pay/abc/"] {
        p.post(path, None, "x")
            .await
            .assert_problem(400, "missing-key");
    }
    // ... and the key never runs twice on them.
    for path in ["/PAY/abc?q=1", "/pay/abc/?q=1"] {
        let r = p.post(path, Some("spell-1"), "amount=5").await;
        assert!(
            matches!(r.outcome, Outcome::Replayed | Outcome::Mismatch),
            "{path}: {r:?}"
        );
    }
    assert_eq!(p.upstream.hits(), 1, "{:?}", p.upstream.seen());

    // A path that cannot be normalized: 400, whatever the method, nothing forwarded.
    for path in ["/pay/%zz", "/a%", "/a%00b", "/pay/%4"] {
        for (method, key) in [("POST", Some("bad-path")), ("POST", None), ("GET", None)] {
            let mut headers = vec![TEXT];
            if let Some(k) = key {
                headers.push(("idempotency-key", k));
            }
            p.send(request(method, path, &headers, "x"))
                .await
                .assert_problem(400, "invalid-path");
        }
    }
    assert_eq!(p.upstream.hits(), 1, "an invalid path was forwarded");

    // A route path with a query or a fragment can never match: a config error with its path.
    for route_path in ["/q?y=1", "/q#top"] {
        let text = format!(
            "[upstream]\nurl = \"http://upstream.test:8080\"\n\
             [[routes]]\nname = \"q\"\npath = \"{route_path}\"\n"
        );
        let errors = Config::parse(&text, &Overrides::default()).unwrap_err();
        assert!(
            errors.0.iter().any(|e| e.path == "routes[0].path"),
            "{route_path}: {errors}"
        );
    }
    // A Redis-only setting next to `backend = "sled"` is an error too.
    let text = "[upstream]\nurl = \"http://upstream.test:8080\"\n\
                [store]\nbackend = \"sled\"\nredis_url = \"redis://127.0.0.1:6379/0\"\n";
    let errors = Config::parse(text, &Overrides::default()).unwrap_err();
    assert!(
        errors.0.iter().any(|e| e.to_string().contains("redis_url")),
        "{errors}"
    );
}

/// The forwarding headers a hostile (or a fronting) client sends.
const CLIENT_HEADERS: [(&str, &str); 6] = [
    ("host", "shop.example:8443"),
    ("x-forwarded-for", "10.0.0.1"),
    ("x-forwarded-proto", "https"),
    ("x-forwarded-host", "evil.example"),
    ("x-real-ip", "10.9.9.9"),
    ("forwarded", "for=10.9.9.9"),
];

/// A pass-through GET and a keyed POST with [`CLIENT_HEADERS`] from `peer`: what the upstream got.
async fn forwarded(p: &Pipeline, peer: &str, scheme: Scheme) -> Vec<Seen> {
    let mut keyed = CLIENT_HEADERS.to_vec();
    keyed.push(("idempotency-key", "fwd-1"));
    for (method, headers) in [("GET", &CLIENT_HEADERS[..]), ("POST", &keyed[..])] {
        let mut req = request(method, "/fwd", headers, "x");
        req.extensions_mut().insert(scheme.clone());
        let r = p.send_from(peer.parse().unwrap(), req).await;
        assert_eq!(r.status, StatusCode::OK, "{method}: {r:?}");
    }
    p.upstream.seen()
}

/// Rule 16: from a peer not in `trusted_proxies`, `X-Forwarded-For` gets the peer appended,
/// `X-Forwarded-Proto` and `-Host` are the proxy's own (client values replaced), `Forwarded` and
/// `X-Real-IP` are removed; from a trusted peer they are kept and extended.
#[tokio::test]
async fn rule_16_forwarding_headers_are_replaced_for_untrusted_peers_and_kept_for_trusted() {
    let p = Pipeline::new("[server]\ntrusted_proxies = [\"10.0.0.0/8\"]\n");
    assert!(
        !PEER.starts_with("10."),
        "the default peer must be untrusted"
    );
    for seen in forwarded(&p, PEER, Scheme::HTTPS).await {
        let what = seen.method.clone();
        assert_eq!(
            only(&seen, "x-forwarded-for").as_deref(),
            Some("10.0.0.1, 203.0.113.7"),
            "{what}"
        );
        // The scheme the client connected with (the listener marks it), not the client's claim.
        assert_eq!(
            only(&seen, "x-forwarded-proto").as_deref(),
            Some("https"),
            "{what}"
        );
        assert_eq!(
            only(&seen, "x-forwarded-host").as_deref(),
            Some("shop.example:8443"),
            "{what}: the Host the client sent"
        );
        assert_eq!(only(&seen, "x-real-ip"), None, "{what}");
        assert_eq!(only(&seen, "forwarded"), None, "{what}");
    }
    let plain = Pipeline::new("");
    for seen in forwarded(&plain, PEER, Scheme::HTTP).await {
        assert_eq!(only(&seen, "x-forwarded-proto").as_deref(), Some("http"));
    }

    let p = Pipeline::new("[server]\ntrusted_proxies = [\"10.0.0.0/8\"]\n");
    for seen in forwarded(&p, "10.1.2.3:5555", Scheme::HTTP).await {
        let what = seen.method.clone();
        assert_eq!(
            only(&seen, "x-forwarded-for").as_deref(),
            Some("10.0.0.1, 10.1.2.3"),
            "{what}"
        );
        assert_eq!(
            only(&seen, "x-forwarded-proto").as_deref(),
            Some("https"),
            "{what}"
        );
        assert_eq!(
            only(&seen, "x-forwarded-host").as_deref(),
            Some("evil.example"),
            "{what}"
        );
        assert_eq!(
            only(&seen, "x-real-ip").as_deref(),
            Some("10.9.9.9"),
            "{what}"
        );
        let fwd = only(&seen, "forwarded").unwrap_or_default();
        assert!(
            fwd.starts_with("for=10.9.9.9, for=10.1.2.3"),
            "{what}: Forwarded not extended with this hop: {fwd:?}"
        );
    }
}
