//! Replays and failures: rules 5 (in flight), 6 (replay), 7 (released answers and upstream failures)
//! and 8 (the proxy's own errors).

use std::{sync::Arc, time::Duration};

use http::StatusCode;
use idemproxy::{clock::ManualClock, metrics::Outcome, store::memory::MemoryStore};

use crate::harness::{answer, request, settle, Pipeline, Script};
use idemproxy::store::testing::failing::{FailingStore, Op};

const TEXT: (&str, &str) = ("content-type", "text/plain");

fn keyed(key: &str, body: &str) -> http::Request<http_body_util::Full<bytes::Bytes>> {
    request("POST", "/pay", &[("idempotency-key", key), TEXT], body)
}

/// Rule 5, `reject`: the same key while the first request is in flight is 409 `in-flight` with
/// `Retry-After` = seconds left on the lease (at least 1); a live owner keeps its claim past its
/// lease; another request with the key is 422 even then.
#[tokio::test]
async fn rule_05_a_key_in_flight_is_409_with_retry_after_when_on_in_flight_is_reject() {
    let p = Arc::new(Pipeline::new(
        "[defaults]\non_in_flight = \"reject\"\nlease = \"30s\"\n",
    ));
    let gate = p.upstream.hold_next();
    let first = p.spawn(keyed("k5", "x"));
    p.upstream.until_hits(1).await;

    let dup = p.send(keyed("k5", "x")).await;
    dup.assert_problem(409, "in-flight");
    assert_eq!(dup.outcome, Outcome::Conflict);
    assert_eq!(dup.retry_after(), 30, "seconds left on the lease");
    p.clock.advance(29_500);
    assert_eq!(
        p.send(keyed("k5", "x")).await.retry_after(),
        1,
        "rounded up"
    );
    // Past its lease the owner is still alive (its upstream call runs): it keeps the key.
    p.clock.advance(60_000);
    let late = p.send(keyed("k5", "x")).await;
    late.assert_problem(409, "in-flight");
    assert!(late.retry_after() >= 1);
    // Another request with the key: 422, also while the first is in flight.
    let other = p.send(keyed("k5", "y")).await;
    other.assert_problem(422, "fingerprint-mismatch");

    gate.send(()).unwrap();
    let first = answer(first).await;
    assert_eq!((first.outcome, first.text()), (Outcome::Forwarded, "hit 1"));
    let r = p.send(keyed("k5", "x")).await;
    assert_eq!((r.outcome, r.text()), (Outcome::Replayed, "hit 1"));
    assert_eq!(p.upstream.hits(), 1);
}

/// Rule 5, `wait`: a duplicate waits for the first request and gets its replay; one that waits
/// longer than `wait_timeout` gets 409; if the first is released, one waiter claims and forwards
/// and the others wait on and replay its answer.
#[tokio::test]
async fn rule_05_a_key_in_flight_is_waited_for_then_replayed_when_on_in_flight_is_wait() {
    let p = Arc::new(Pipeline::new(
        "[defaults]\non_in_flight = \"wait\"\nwait_timeout = \"10s\"\n",
    ));
    let gate = p.upstream.hold_next();
    let first = p.spawn(keyed("w1", "x"));
    p.upstream.until_hits(1).await;
    let waiter = p.spawn(keyed("w1", "x"));
    settle().await;
    assert!(!waiter.is_finished(), "the duplicate did not wait");
    // A different request with the key does not wait: 422 at once.
    p.send(keyed("w1", "other"))
        .await
        .assert_problem(422, "fingerprint-mismatch");
    gate.send(()).unwrap();
    let first = answer(first).await;
    let waiter = answer(waiter).await;
    assert_eq!((first.outcome, first.text()), (Outcome::Forwarded, "hit 1"));
    assert_eq!(
        (waiter.outcome, waiter.text()),
        (Outcome::Replayed, "hit 1")
    );
    assert!(waiter.replayed());

    // Released first: one waiter forwards, the other replays that.
    let gate = p.upstream.hold_next_then(503, "try later");
    let first = p.spawn(keyed("w2", "x"));
    p.upstream.until_hits(2).await;
    let waiters = [p.spawn(keyed("w2", "x")), p.spawn(keyed("w2", "x"))];
    settle().await;
    assert!(waiters.iter().all(|w| !w.is_finished()), "did not wait");
    gate.send(()).unwrap();
    let first = answer(first).await;
    assert_eq!(
        (first.status.as_u16(), first.outcome),
        (503, Outcome::Released)
    );
    let mut got = Vec::new();
    for w in waiters {
        let r = answer(w).await;
        assert_eq!(r.text(), "hit 3", "{r:?}");
        got.push(r.outcome);
    }
    got.sort_by_key(|o| o.as_str());
    assert_eq!(got, [Outcome::Forwarded, Outcome::Replayed]);
    assert_eq!(p.upstream.hits(), 3);

    // Waiting longer than `wait_timeout`: 409.
    let short = Arc::new(Pipeline::new(
        "[defaults]\non_in_flight = \"wait\"\nwait_timeout = \"100ms\"\n",
    ));
    let gate = short.upstream.hold_next();
    let first = short.spawn(keyed("w3", "x"));
    short.upstream.until_hits(1).await;
    let r = tokio::time::timeout(Duration::from_secs(10), short.send(keyed("w3", "x")))
        .await
        .expect("the waiter gave up within 10 s");
    r.assert_problem(409, "in-flight");
    gate.send(()).unwrap();
    answer(first).await;
}

/// Rule 6: the same key after completion, same fingerprint: the stored status, headers and body,
/// plus `Idempotent-Replayed: true`, never `Set-Cookie`; another request with the key is 422 and the
/// record is untouched; the exchange and the record finish even if the client goes away.
#[tokio::test]
async fn rule_06_a_completed_key_replays_the_stored_status_headers_and_body() {
    let p = Arc::new(Pipeline::new(""));
    p.upstream.then_answer(
        201,
        &[
            ("content-type", "application/json"),
            ("x-order", "o-1"),
            ("set-cookie", "sid=secret"),
        ],
        r#"{"id":1}"#,
    );
    let first = p.send(keyed("k6", "x")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(
        first.header("set-cookie"),
        "sid=secret",
        "the first client gets it"
    );
    assert!(!first.replayed());
    let record = p.records("default", "k6").await;
    for _ in 0..2 {
        let r = p.send(keyed("k6", "x")).await;
        assert_eq!(r.outcome, Outcome::Replayed);
        assert_eq!(r.status, StatusCode::CREATED);
        assert_eq!(r.text(), r#"{"id":1}"#);
        assert_eq!(r.header("content-type"), "application/json");
        assert_eq!(r.header("x-order"), "o-1");
        assert_eq!(r.header("idempotent-replayed"), "true");
        assert!(
            !r.headers.contains_key("set-cookie"),
            "Set-Cookie replayed: {r:?}"
        );
    }
    let other = p.send(keyed("k6", "y")).await;
    other.assert_problem(422, "fingerprint-mismatch");
    assert_eq!(
        p.records("default", "k6").await,
        record,
        "the record changed"
    );
    assert!(
        !format!("{record:?}").contains("sid=secret"),
        "Set-Cookie stored"
    );
    assert_eq!(p.upstream.hits(), 1);

    // The client goes away while the upstream works: the exchange and the record finish anyway.
    let gate = p.upstream.hold_next();
    let gone = p.spawn(keyed("k6-gone", "x"));
    p.upstream.until_hits(2).await;
    gone.abort();
    assert!(gone.await.unwrap_err().is_cancelled());
    gate.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), p.proxy.drain_tasks())
        .await
        .expect("the detached exchange finished within 10 s");
    let r = p.send(keyed("k6-gone", "x")).await;
    assert_eq!((r.outcome, r.text()), (Outcome::Replayed, "hit 2"));
}

/// Rule 6, `store_response = false`: a duplicate gets `duplicate_status`, an empty body and
/// `Idempotent-Replayed: true`.
#[tokio::test]
async fn rule_06_without_store_response_a_duplicate_gets_duplicate_status_and_an_empty_body() {
    let p = Pipeline::new("[defaults]\nstore_response = false\nduplicate_status = 202\n");
    p.upstream
        .then_answer(201, &[("x-order", "o-1")], "created");
    let first = p.send(keyed("dedupe", "x")).await;
    assert_eq!((first.status.as_u16(), first.text()), (201, "created"));
    for _ in 0..2 {
        let r = p.send(keyed("dedupe", "x")).await;
        assert_eq!((r.status.as_u16(), r.text()), (202, ""));
        assert!(r.replayed());
        assert_eq!(r.outcome, Outcome::Replayed);
    }
    assert_eq!(p.upstream.hits(), 1);
}

/// Rule 6, a response body over `max_response_body`: passed on whole to the first client; only its
/// status and headers are recorded, and its replay says `Idempotency-Replay: omitted` with an empty
/// body (`Content-Length: 0`). A body at the limit is recorded whole.
#[tokio::test]
async fn rule_06_a_body_over_max_response_body_is_streamed_and_replayed_as_omitted() {
    let p = Pipeline::new("[server]\nmax_response_body = \"1KiB\"\n");
    let big = "x".repeat(5000);
    p.upstream.then_answer(200, &[("x-big", "1")], &big);
    let first = p.send(keyed("large", "")).await;
    assert_eq!(
        (first.outcome, first.text()),
        (Outcome::Forwarded, big.as_str())
    );
    let r = p.send(keyed("large", "")).await;
    assert_eq!((r.status, r.outcome), (StatusCode::OK, Outcome::Replayed));
    assert_eq!(r.header("idempotency-replay"), "omitted");
    assert_eq!(r.header("content-length"), "0");
    assert_eq!(r.header("x-big"), "1");
    assert!(r.body.is_empty());

    let limit = "y".repeat(1024);
    p.upstream.then_answer(200, &[], &limit);
    p.send(keyed("at-limit", "")).await;
    let r = p.send(keyed("at-limit", "")).await;
    assert_eq!((r.outcome, r.text()), (Outcome::Replayed, limit.as_str()));
    assert_eq!(r.header("idempotency-replay"), "");
    assert_eq!(p.upstream.hits(), 2);
}

/// Rule 7: an answer in `release_statuses`, a timeout (504) or a failure after sending (502) is
/// passed on, nothing is recorded and the key is freed; an upstream that could not be reached (502
/// `upstream-unreachable`) frees the key even when 502 is not a release status, while a failure
/// after sending is then recorded.
#[tokio::test]
async fn rule_07_released_statuses_and_upstream_failures_are_passed_on_and_free_the_key() {
    let p = Pipeline::new("[upstream]\nurl = \"http://upstream.test:8080\"\ntimeout = \"100ms\"\n");
    let cases: [(&str, Script, u16, Option<&str>); 3] = [
        (
            "503",
            Script::Answer(StatusCode::SERVICE_UNAVAILABLE, Vec::new(), "busy".into()),
            503,
            None,
        ),
        ("stall", Script::Stall, 504, Some("upstream-timeout")),
        ("broken", Script::Broken, 502, Some("upstream-failed")),
    ];
    for (n, (what, script, status, code)) in cases.into_iter().enumerate() {
        let key = format!("rel-{what}");
        p.upstream.then(script);
        let r = p.send(keyed(&key, "x")).await;
        match code {
            Some(code) => r.assert_problem(status, code),
            None => assert_eq!((r.status.as_u16(), r.text()), (status, "busy"), "passed on"),
        }
        assert_ne!(r.outcome, Outcome::Forwarded, "{what}");
        assert!(
            p.records("default", &key).await.is_empty(),
            "{what}: recorded"
        );
        let retry = p.send(keyed(&key, "x")).await;
        assert_eq!(
            (retry.outcome, retry.text()),
            (Outcome::Forwarded, format!("hit {}", 2 * n + 2).as_str()),
            "{what}: the key was not freed"
        );
    }

    // 502 and 504 not released: unreachable still frees the key; a failure after sending is kept.
    let strict = Pipeline::new(
        "[upstream]\nurl = \"http://upstream.test:8080\"\ntimeout = \"100ms\"\n\
         [defaults]\nrelease_statuses = [503]\n",
    );
    strict.upstream.then(Script::Unreachable);
    let r = strict.send(keyed("unreach", "x")).await;
    r.assert_problem(502, "upstream-unreachable");
    assert_eq!(r.outcome, Outcome::Released);
    assert_eq!(strict.upstream.hits(), 0, "nothing was sent");
    let retry = strict.send(keyed("unreach", "x")).await;
    assert_eq!((retry.outcome, retry.text()), (Outcome::Forwarded, "hit 1"));

    strict.upstream.then(Script::Broken);
    strict
        .send(keyed("kept", "x"))
        .await
        .assert_problem(502, "upstream-failed");
    let replay = strict.send(keyed("kept", "x")).await;
    replay.assert_problem(502, "upstream-failed");
    assert!(
        replay.replayed(),
        "a 502 not in release_statuses is recorded"
    );
    strict.upstream.then(Script::Stall);
    strict
        .send(keyed("slow", "x"))
        .await
        .assert_problem(504, "upstream-timeout");
    let replay = strict.send(keyed("slow", "x")).await;
    assert!(
        replay.replayed(),
        "a 504 not in release_statuses is recorded"
    );
    assert_eq!(strict.upstream.hits(), 3);
}

/// Rule 8: every error the proxy makes itself is `application/problem+json` with type, title,
/// status, detail and its stable `code`.
#[tokio::test]
async fn rule_08_the_proxys_own_errors_are_problem_json_with_a_stable_code() {
    let p = Pipeline::new(
        "[server]\nmax_request_body = 16\n\
         [upstream]\nurl = \"http://upstream.test:8080\"\ntimeout = \"50ms\"\n\
         [defaults]\nrequired = true\n\
         [[routes]]\nname = \"json\"\npath = \"/json\"\nkey = \"json\"\njson_pointer = \"/id\"\n",
    );
    p.post("/pay", None, "x")
        .await
        .assert_problem(400, "missing-key");
    p.post("/pay", Some(""), "x")
        .await
        .assert_problem(400, "invalid-key");
    p.post("/pay", Some("k8"), "x").await;
    p.post("/pay", Some("k8"), "y")
        .await
        .assert_problem(422, "fingerprint-mismatch");
    p.post("/pay", Some("k8-big"), &"z".repeat(17))
        .await
        .assert_problem(413, "body-too-large");
    p.post("/json", None, "not json")
        .await
        .assert_problem(400, "invalid-json-key");
    p.upstream.then(Script::Unreachable);
    p.post("/pay", Some("k8-down"), "x")
        .await
        .assert_problem(502, "upstream-unreachable");
    p.upstream.then(Script::Stall);
    p.post("/pay", Some("k8-slow"), "x")
        .await
        .assert_problem(504, "upstream-timeout");

    let held = Arc::new(Pipeline::new(""));
    let gate = held.upstream.hold_next();
    let first = held.spawn(keyed("k8", "x"));
    held.upstream.until_hits(1).await;
    held.send(keyed("k8", "x"))
        .await
        .assert_problem(409, "in-flight");
    gate.send(()).unwrap();
    answer(first).await;

    let store = FailingStore::new(Arc::new(MemoryStore::new(Arc::new(ManualClock::new(1)))));
    store.fail(Op::Claim, 1);
    let failing = Pipeline::over("", store);
    failing
        .post("/pay", Some("k8"), "x")
        .await
        .assert_problem(503, "store-unavailable");
}
