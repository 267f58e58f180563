//! Limits and hostile input: rules 14 (store errors), 15 (whose timeout), 17 (private files, config
//! bounds) and 18 (replays share the stored bytes).

use std::{os::unix::fs::PermissionsExt, path::Path, sync::Arc, time::Duration};

use http::StatusCode;
use idemproxy::{
    clock::{ManualClock, SystemClock},
    config::{Config, Overrides, SyncPolicy},
    metrics::Outcome,
    store::{memory::MemoryStore, sled, ClaimOutcome, Record, Store},
};

use crate::harness::{request, streaming, Copying, Pipeline};
use idemproxy::store::testing::failing::{FailingStore, Op};

const TEXT: (&str, &str) = ("content-type", "text/plain");

/// A memory store on its own manual clock, behind a [`FailingStore`].
fn failing_memory() -> (Arc<FailingStore>, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::new(1_000_000));
    let store = FailingStore::new(Arc::new(MemoryStore::new(clock.clone())));
    (store, clock)
}

/// Rule 14, `on_store_error = "reject"`: a keyed request the store cannot claim is 503
/// `store-unavailable` (with `Retry-After`) and nothing is forwarded, while pass-through goes on; a
/// result the store cannot record is not passed on (503), and its claim holds the key until its
/// lease ends; once the store works again the proxy resumes by itself.
#[tokio::test]
async fn rule_14_a_store_error_is_503_store_unavailable_and_the_proxy_resumes_when_it_heals() {
    let (store, clock) = failing_memory();
    let p = Pipeline::over("[defaults]\nlease = \"10s\"\n", store.clone());
    store.fail(Op::Claim, u32::MAX);
    for _ in 0..3 {
        let r = p.post("/pay", Some("sf-1"), "pay").await;
        r.assert_problem(503, "store-unavailable");
        assert_eq!(r.retry_after(), 1);
    }
    assert_eq!(p.upstream.hits(), 0, "forwarded while the store fails");
    let r = p.send(request("GET", "/pay", &[], "")).await;
    assert_eq!(
        (r.status, r.outcome),
        (StatusCode::OK, Outcome::Passthrough)
    );
    store.heal();
    let r = p.post("/pay", Some("sf-1"), "pay").await;
    assert_eq!((r.outcome, r.text()), (Outcome::Forwarded, "hit 2"));
    assert_eq!(
        p.post("/pay", Some("sf-1"), "pay").await.outcome,
        Outcome::Replayed
    );

    // The upstream answered, but the result could not be recorded: not acknowledged.
    store.fail(Op::Complete, 1);
    let r = p.post("/pay", Some("cf-1"), "pay").await;
    r.assert_problem(503, "store-unavailable");
    assert_ne!(r.text(), "hit 3", "the unrecorded answer was passed on");
    assert_eq!(p.upstream.hits(), 3);
    // The key stays claimed (not forwarded again) until its lease ends, then the retry runs.
    p.post("/pay", Some("cf-1"), "pay")
        .await
        .assert_problem(409, "in-flight");
    clock.advance(10_000);
    let r = p.post("/pay", Some("cf-1"), "pay").await;
    assert_eq!((r.outcome, r.text()), (Outcome::Forwarded, "hit 4"));
    assert_eq!(p.post("/pay", Some("cf-1"), "pay").await.text(), "hit 4");
}

/// Rule 14, `on_store_error = "pass"`: a keyed request the store cannot claim is forwarded
/// unprotected, marked `Idempotency-Degraded: true`; once the store heals, protection resumes.
#[tokio::test]
async fn rule_14_with_on_store_error_pass_a_store_error_forwards_marked_idempotency_degraded() {
    let (store, _clock) = failing_memory();
    let p = Pipeline::over("[defaults]\non_store_error = \"pass\"\n", store.clone());
    store.fail(Op::Claim, u32::MAX);
    for n in 1..=2 {
        let r = p.post("/pay", Some("sp-1"), "pay").await;
        assert_eq!(
            (r.status, r.text()),
            (StatusCode::OK, format!("hit {n}").as_str())
        );
        assert_eq!(r.header("idempotency-degraded"), "true");
    }
    store.heal();
    let r = p.post("/pay", Some("sp-1"), "pay").await;
    assert_eq!((r.outcome, r.text()), (Outcome::Forwarded, "hit 3"));
    assert_eq!(r.header("idempotency-degraded"), "");
    let r = p.post("/pay", Some("sp-1"), "pay").await;
    assert_eq!((r.outcome, r.text()), (Outcome::Replayed, "hit 3"));
}

/// Rule 15: a request body that stalls past `request_timeout` is 408 `request-timeout` (keyed or
/// passed through), nothing is forwarded and the key is free; 504 `upstream-timeout` means the
/// upstream, and only the upstream, was slow.
#[tokio::test]
async fn rule_15_a_stalled_request_body_is_408_and_only_a_slow_upstream_is_504() {
    let p = Pipeline::new("[server]\nrequest_timeout = \"200ms\"\n");
    for (method, key) in [("POST", Some("stall-1")), ("PUT", None), ("GET", None)] {
        let mut headers = vec![TEXT];
        if let Some(k) = key {
            headers.push(("idempotency-key", k));
        }
        let (req, body) = streaming(method, "/pay", &headers);
        body.send("0123456789").await;
        // `body` is kept: the rest never comes.
        let r = tokio::time::timeout(Duration::from_secs(10), p.send(req))
            .await
            .expect("answered within 10 s");
        r.assert_problem(408, "request-timeout");
        assert_eq!(r.outcome, Outcome::RequestTimeout, "{method}");
        drop(body);
    }
    assert_eq!(p.upstream.hits(), 0, "an incomplete body was forwarded");
    // The key is free.
    let r = p.post("/pay", Some("stall-1"), "0123456789").await;
    assert_eq!((r.outcome, r.text()), (Outcome::Forwarded, "hit 1"));

    // A body that arrives in pieces within the limit is fine.
    let (req, body) = streaming("POST", "/pay", &[TEXT, ("idempotency-key", "slow-ok")]);
    let sending = async {
        body.send("01234").await;
        body.send("56789").await;
        drop(body);
    };
    let (r, ()) = tokio::join!(p.send(req), sending);
    assert_eq!(r.outcome, Outcome::Forwarded);
    assert_eq!(&p.upstream.last().body[..], b"0123456789");

    // The upstream is slow, the request complete: 504, and the key is freed.
    let p = Pipeline::new("[server]\nrequest_timeout = \"300ms\"\n");
    for n in 1..=2 {
        let _gate = p.upstream.hold_next();
        let r = p.post("/pay", Some("slow-up"), "x").await;
        r.assert_problem(504, "upstream-timeout");
        assert_eq!(r.outcome, Outcome::UpstreamTimeout);
        assert_eq!(p.upstream.hits(), n, "the key was not freed");
    }
}

/// Every directory under `root` (itself included) is 0700 and every file 0600; returns how many
/// files.
fn assert_private(root: &Path) -> usize {
    let mut files = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700, "directory {} is {mode:o}", dir.display());
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            if meta.is_dir() {
                stack.push(path);
            } else if meta.is_file() {
                files += 1;
                let mode = meta.permissions().mode() & 0o777;
                assert_eq!(mode, 0o600, "file {} is {mode:o}", path.display());
            }
        }
    }
    files
}

/// Rule 17: the store's files are readable by the proxy's user only (dirs 0700, files 0600);
/// credentials in `[upstream] url` are refused without being printed; a zero or out-of-range
/// duration fails with its TOML path.
#[tokio::test]
async fn rule_17_store_files_are_private_and_credentials_and_out_of_range_values_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let store = sled::open_default(&data, SyncPolicy::Always, Arc::new(SystemClock)).unwrap();
    let p = Pipeline::over("", Arc::new(store));
    let r = p.post("/pay", Some("private-1"), "secret order").await;
    assert_eq!(r.outcome, Outcome::Forwarded);
    assert_eq!(
        p.post("/pay", Some("private-1"), "secret order")
            .await
            .outcome,
        Outcome::Replayed
    );
    p.flush().await;
    assert!(
        assert_private(&data) > 0,
        "no store files under {}",
        data.display()
    );
    drop(p);

    let base = "[upstream]\nurl = \"http://user:secret@upstream.test:8080\"\n";
    let errors = Config::parse(base, &Overrides::default()).unwrap_err();
    assert!(
        errors.0.iter().any(|e| e.path == "upstream.url"),
        "{errors}"
    );
    assert!(!errors.to_string().contains("secret"), "printed: {errors}");

    let url = "[upstream]\nurl = \"http://upstream.test:8080\"\n";
    for (section, key, path) in [
        ("upstream", "timeout", "upstream.timeout"),
        ("upstream", "connect_timeout", "upstream.connect_timeout"),
        ("server", "request_timeout", "server.request_timeout"),
        ("store", "timeout", "store.timeout"),
        ("defaults", "ttl", "defaults.ttl"),
        ("defaults", "lease", "defaults.lease"),
        ("defaults", "wait_timeout", "defaults.wait_timeout"),
        ("routes", "ttl", "routes[0].ttl"),
    ] {
        for value in ["0s", "1000000000y"] {
            let line = format!("{key} = \"{value}\"");
            let text = match section {
                "upstream" => format!("{url}{line}\n"),
                "routes" => format!("{url}[[routes]]\nname = \"r\"\npath = \"/r\"\n{line}\n"),
                _ => format!("{url}[{section}]\n{line}\n"),
            };
            let errors = Config::parse(&text, &Overrides::default())
                .err()
                .unwrap_or_else(|| panic!("{path} = {value:?} accepted"));
            assert!(
                errors.0.iter().any(|e| e.path == path),
                "{path} = {value:?}: {errors}"
            );
        }
    }
}

/// Rule 18: replays share the stored bytes. Two replays of one large record read at the same time
/// hand out one copy of its body, even from a store that sends a fresh copy for every read (as
/// Redis does): the bodies the two clients get point at the same memory. (Observable because
/// collecting a one-frame body is zero-copy: the `Bytes` a client reads is a view of the replayed
/// one.)
#[tokio::test]
async fn rule_18_replays_of_one_record_share_its_stored_bytes() {
    let clock = Arc::new(ManualClock::new(1_000_000));
    let copying: Arc<dyn Store> = Arc::new(Copying(Arc::new(MemoryStore::new(clock))));
    let p = Pipeline::over("", copying);
    let big = "r".repeat(256 * 1024);
    p.upstream.then_answer(200, &[], &big);
    assert_eq!(p.post("/pay", Some("big"), "x").await.body.len(), big.len());
    let a = p.post("/pay", Some("big"), "x").await;
    let b = p.post("/pay", Some("big"), "x").await;
    assert_eq!(
        (a.outcome, b.outcome),
        (Outcome::Replayed, Outcome::Replayed)
    );
    assert_eq!(a.body, big.as_bytes());
    assert_eq!(a.body, b.body);
    assert_eq!(
        a.body.as_ptr(),
        b.body.as_ptr(),
        "two replays read at once hold two copies of the body"
    );
    // Control: the store itself hands out a copy per read; the sharing is the proxy's.
    let records = p.records("default", "big").await;
    let [(key, Record::Completed(rec))] = records.as_slice() else {
        panic!("not one completed record: {records:?}");
    };
    let read = || async {
        match p
            .store
            .claim(key, rec.fingerprint, Duration::from_secs(60))
            .await
        {
            Ok(ClaimOutcome::Completed(c)) => c.body,
            other => panic!("not a completed record: {other:?}"),
        }
    };
    let (x, y) = (read().await, read().await);
    assert_eq!(x, y);
    assert_ne!(x.as_ptr(), y.as_ptr(), "the store under test does not copy");
    assert_eq!(p.upstream.hits(), 1);
}
