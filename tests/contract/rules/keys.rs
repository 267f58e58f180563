//! Keys and their lifetime: rules 2 (valid keys), 3 (store key and fingerprint), 4 (first seen),
//! 10 (TTL) and 11 (keys taken from a JSON body).

use std::sync::Arc;

use http::{HeaderValue, StatusCode};
use idemproxy::{metrics::Outcome, store::Record};

use crate::harness::{answer, request, Pipeline};

const TEXT: (&str, &str) = ("content-type", "text/plain");

/// Rule 2: an empty key, one over 255 bytes or one with anything but visible ASCII is 400
/// `invalid-key` and nothing is forwarded; a key sent as an RFC 8941 sf-string is the same key as
/// the bare token.
#[tokio::test]
async fn rule_02_an_invalid_key_is_400_and_an_sf_string_key_is_the_same_key_as_the_bare_token() {
    let p = Pipeline::new("");
    let too_long = "a".repeat(256);
    for (what, key) in [
        ("empty", ""),
        ("empty sf-string", "\"\""),
        ("256 bytes", too_long.as_str()),
        ("space inside", "ab cd"),
        ("tab inside", "ab\tcd"),
    ] {
        let r = p.post("/pay", Some(key), "x").await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{what} key {key:?}");
        r.assert_problem(400, "invalid-key");
        assert_eq!(r.outcome, Outcome::Rejected, "{what}");
    }
    // Not ASCII at all (obs-text bytes: a header value may carry them).
    let mut req = request("POST", "/pay", &[TEXT], "x");
    req.headers_mut().insert(
        "idempotency-key",
        HeaderValue::from_bytes("k\u{e9}y".as_bytes()).unwrap(),
    );
    p.send(req).await.assert_problem(400, "invalid-key");
    assert_eq!(p.upstream.hits(), 0, "an invalid key was forwarded");

    // 255 bytes is still a key.
    let longest = "a".repeat(255);
    let first = p.post("/pay", Some(&longest), "x").await;
    assert_eq!(first.outcome, Outcome::Forwarded);
    let again = p.post("/pay", Some(&longest), "x").await;
    assert_eq!(again.outcome, Outcome::Replayed);

    // `"abc"` and `abc` are one key, whichever comes first.
    let quoted = p.post("/pay", Some("\"abc\""), "y").await;
    assert_eq!(
        (quoted.outcome, quoted.text()),
        (Outcome::Forwarded, "hit 2")
    );
    let bare = p.post("/pay", Some("abc"), "y").await;
    assert_eq!((bare.outcome, bare.text()), (Outcome::Replayed, "hit 2"));
    p.post("/pay", Some("xyz"), "z").await;
    let quoted = p.post("/pay", Some("\"xyz\""), "z").await;
    assert_eq!(
        (quoted.outcome, quoted.text()),
        (Outcome::Replayed, "hit 3")
    );
    assert_eq!(p.upstream.hits(), 3);
}

/// Rule 3, store key: the route name, the scope header values and the client key make the store
/// key. One client key on two routes, or from two tenants, is two records; neither the raw key nor
/// the credential is stored.
#[tokio::test]
async fn rule_03_the_store_key_is_scoped_by_route_and_scope_headers_and_holds_no_raw_credential() {
    let p = Pipeline::new(
        "[defaults]\nscope_headers = [\"authorization\"]\n\n\
         [[routes]]\nname = \"a\"\npath = \"/a/**\"\n\n\
         [[routes]]\nname = \"b\"\npath = \"/b/**\"\n",
    );
    // Two routes: two keys.
    let a = p.post("/a/x", Some("shared"), "x").await;
    let b = p.post("/b/x", Some("shared"), "x").await;
    assert_eq!((a.outcome, a.text()), (Outcome::Forwarded, "hit 1"));
    assert_eq!((b.outcome, b.text()), (Outcome::Forwarded, "hit 2"));
    assert_eq!(p.post("/a/x", Some("shared"), "x").await.text(), "hit 1");
    assert_eq!(p.post("/b/x", Some("shared"), "x").await.text(), "hit 2");
    assert_eq!(p.records("a", "shared").await.len(), 1);
    assert_eq!(p.records("b", "shared").await.len(), 1);

    // Two tenants: two keys, each replayed to its own tenant.
    let tenant_a = "Bearer tenant-a-CREDENTIAL-7f3a9c";
    let tenant_b = "Bearer tenant-b-CREDENTIAL-0d2e6b";
    let as_tenant = |auth: &'static str| {
        request(
            "POST",
            "/t",
            &[
                ("idempotency-key", "tenant-key"),
                TEXT,
                ("authorization", auth),
            ],
            "x",
        )
    };
    let ra = p.send(as_tenant(tenant_a)).await;
    let rb = p.send(as_tenant(tenant_b)).await;
    assert_eq!((ra.outcome, ra.text()), (Outcome::Forwarded, "hit 3"));
    assert_eq!((rb.outcome, rb.text()), (Outcome::Forwarded, "hit 4"));
    assert_eq!(p.send(as_tenant(tenant_a)).await.text(), "hit 3");
    assert_eq!(p.send(as_tenant(tenant_b)).await.text(), "hit 4");
    assert_eq!(
        p.upstream.last().headers["authorization"],
        tenant_b,
        "the credential still reaches the upstream"
    );

    let records = p.records("default", "tenant-key").await;
    assert_eq!(records.len(), 2, "one record per tenant: {records:?}");
    assert_ne!(records[0].0.scope, records[1].0.scope);
    for (key, record) in &records {
        let stored = format!("{record:?}{:?}", key.to_bytes());
        for raw in [tenant_a, tenant_b, "CREDENTIAL", "tenant-key"] {
            assert!(!stored.contains(raw), "{raw:?} stored: {stored}");
        }
        for raw in [tenant_a.as_bytes(), b"tenant-key"] {
            assert!(!key.to_bytes().windows(raw.len()).any(|w| w == raw));
        }
    }
}

/// Rule 3, fingerprint: the method, the path and query, the `fingerprint_headers` and the body make
/// the fingerprint; the same key with any of them changed is 422 `fingerprint-mismatch`.
#[tokio::test]
async fn rule_03_the_fingerprint_covers_method_path_query_fingerprint_headers_and_body() {
    let p = Pipeline::new("");
    let send = |method: &str, path: &str, content_type: &str, body: &str| {
        p.send(request(
            method,
            path,
            &[("idempotency-key", "fp-1"), ("content-type", content_type)],
            body,
        ))
    };
    let first = send("POST", "/pay?x=1", "text/plain", "amount=5").await;
    assert_eq!(first.outcome, Outcome::Forwarded);
    for (what, method, path, content_type, body) in [
        ("body", "POST", "/pay?x=1", "text/plain", "amount=6"),
        ("query", "POST", "/pay?x=2", "text/plain", "amount=5"),
        ("path", "POST", "/pay/2?x=1", "text/plain", "amount=5"),
        ("method", "PATCH", "/pay?x=1", "text/plain", "amount=5"),
        ("Content-Type", "POST", "/pay?x=1", "text/csv", "amount=5"),
    ] {
        let r = send(method, path, content_type, body).await;
        r.assert_problem(422, "fingerprint-mismatch");
        assert_eq!(r.outcome, Outcome::Mismatch, "{what}");
    }
    let same = send("POST", "/pay?x=1", "text/plain", "amount=5").await;
    assert_eq!((same.outcome, same.text()), (Outcome::Replayed, "hit 1"));
    assert_eq!(p.upstream.hits(), 1);
}

/// Rule 4: a key seen for the first time is claimed (an in-flight record with a lease and an owner),
/// forwarded once, its result recorded, then answered; of concurrent requests with it, exactly one
/// is forwarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rule_04_a_first_seen_key_is_claimed_forwarded_once_recorded_and_answered() {
    let p = Arc::new(Pipeline::new("[defaults]\nlease = \"30s\"\n"));
    let gate = p.upstream.hold_next();
    let first = p.spawn(request(
        "POST",
        "/pay",
        &[("idempotency-key", "k4"), TEXT],
        "x",
    ));
    p.upstream.until_hits(1).await;
    // Claimed while at the upstream: in flight, with its lease and its owner's token.
    let records = p.records("default", "k4").await;
    let [(_, Record::InFlight(claim))] = records.as_slice() else {
        panic!("not one in-flight record: {records:?}");
    };
    assert_eq!(claim.deadline_ms - claim.created_ms, 30_000, "lease");
    assert!(claim.token > 0);
    let dups: Vec<_> = (0..4)
        .map(|_| {
            p.spawn(request(
                "POST",
                "/pay",
                &[("idempotency-key", "k4"), TEXT],
                "x",
            ))
        })
        .collect();
    gate.send(()).unwrap();
    let first = answer(first).await;
    assert_eq!((first.status, first.text()), (StatusCode::OK, "hit 1"));
    assert_eq!(first.outcome, Outcome::Forwarded);
    assert!(!first.replayed());
    for d in dups {
        let r = answer(d).await;
        assert!(
            matches!(r.outcome, Outcome::Conflict | Outcome::Replayed),
            "a duplicate was {:?}: {r:?}",
            r.outcome
        );
    }
    // Recorded: completed, and every later request is its replay.
    let records = p.records("default", "k4").await;
    let [(_, Record::Completed(done))] = records.as_slice() else {
        panic!("not one completed record: {records:?}");
    };
    assert_eq!((done.status, &done.body[..]), (200, &b"hit 1"[..]));
    let again = p.post("/pay", Some("k4"), "x").await;
    assert_eq!((again.outcome, again.text()), (Outcome::Replayed, "hit 1"));
    assert_eq!(p.upstream.hits(), 1, "forwarded once");
}

/// Rule 10: after `ttl` a key is forgotten and may be used again (the same request is forwarded
/// anew), and the expired record is swept.
#[tokio::test]
async fn rule_10_after_ttl_a_key_is_forgotten_and_its_record_swept() {
    let p = Pipeline::new("[defaults]\nttl = \"1h\"\n");
    let hour_ms = 3_600_000;
    assert_eq!(p.post("/pay", Some("t1"), "x").await.text(), "hit 1");
    assert_eq!(p.post("/pay", Some("t2"), "x").await.text(), "hit 2");
    p.clock.advance(hour_ms - 1);
    let r = p.post("/pay", Some("t1"), "x").await;
    assert_eq!(
        (r.outcome, r.text()),
        (Outcome::Replayed, "hit 1"),
        "within ttl"
    );
    p.clock.advance(1);
    assert_eq!(p.sweep().await, 2, "both records expired and swept");
    assert!(p.records("default", "t2").await.is_empty());
    let r = p.post("/pay", Some("t1"), "x").await;
    assert_eq!(
        (r.outcome, r.text()),
        (Outcome::Forwarded, "hit 3"),
        "after ttl"
    );
    let r = p.post("/pay", Some("t1"), "x").await;
    assert_eq!((r.outcome, r.text()), (Outcome::Replayed, "hit 3"));
}

/// Rule 11: with `key = "json"` the pointer's value (a string, or an integer as its decimal text) is
/// the key; a body that is not JSON, or a pointer to an object, array or bool, is 400
/// `invalid-json-key`; a JSON body without the pointer is a missing key (rule 1); the fingerprint
/// still applies unless `fingerprint = "none"`.
#[tokio::test]
async fn rule_11_a_json_key_is_a_string_or_integer_at_the_pointer_and_anything_else_is_400() {
    let json = "[defaults]\nkey = \"json\"\njson_pointer = \"/id\"\n";
    let p = Pipeline::new(&format!("{json}required = true\n"));
    let a = r#"{"id":"order-1","amount":5}"#;
    assert_eq!(p.post("/hook", None, a).await.outcome, Outcome::Forwarded);
    let r = p.post("/hook", None, a).await;
    assert_eq!((r.outcome, r.text()), (Outcome::Replayed, "hit 1"));
    p.post("/hook", None, r#"{"id":"order-1","amount":6}"#)
        .await
        .assert_problem(422, "fingerprint-mismatch");
    let n = r#"{"id":42}"#;
    assert_eq!(p.post("/hook", None, n).await.text(), "hit 2");
    assert_eq!(p.post("/hook", None, n).await.outcome, Outcome::Replayed);
    assert_eq!(
        p.records("default", "42").await.len(),
        1,
        "42 as its decimal text"
    );
    for body in [
        "not json",
        r#"{"id":{"a":1}}"#,
        r#"{"id":[1,2]}"#,
        r#"{"id":true}"#,
    ] {
        p.post("/hook", None, body)
            .await
            .assert_problem(400, "invalid-json-key");
    }
    p.post("/hook", None, r#"{"other":1}"#)
        .await
        .assert_problem(400, "missing-key");
    assert_eq!(p.upstream.hits(), 2);

    // Not required: a body without the pointer is forwarded every time.
    let lax = Pipeline::new(&format!("{json}fingerprint = \"none\"\n"));
    for n in 1..=2 {
        let r = lax.post("/hook", None, r#"{"other":1}"#).await;
        assert_eq!(
            (r.outcome, r.text()),
            (Outcome::Passthrough, format!("hit {n}").as_str())
        );
    }
    // Without a fingerprint, `42` and `"42"` are one key, whatever else the body says.
    assert_eq!(
        lax.post("/hook", None, r#"{"id":42}"#).await.text(),
        "hit 3"
    );
    let r = lax.post("/hook", None, r#"{"id":"42","note":"x"}"#).await;
    assert_eq!((r.outcome, r.text()), (Outcome::Replayed, "hit 3"));
}
