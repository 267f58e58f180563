//! Runs the anyonce core conformance vectors (third-party data, copied byte for byte under `tests/vectors/core`,
//! see `tests/vectors/SOURCE.md`) against the real `idemproxy` binary in front of the fixture upstream.
//!
//! Execution rules (from SOURCE.md): the counter is reset on the upstream directly before each vector; steps
//! run in order; a step that a later step names in `concurrentWith` is sent and left pending, the naming step
//! waits its `delayMs`, is sent while those are in flight, then the group is awaited; after each step (or
//! group) one `GET /counter` through the proxy checks `handlerInvocations`. Config: every POST/PATCH route
//! requires a key, `ttl = "2s"` (the `short-ttl` capability). A vector needing any other capability, or using
//! an expectation this runner does not know, fails instead of being skipped.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::Path;
use std::time::Duration;

use common::{send, within, Proxy, Resp, Upstream};
use serde_json::Value;

/// Capabilities this target has.
const SUPPORTED: &[&str] = &["short-ttl"];

fn vector_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vectors/core")
}

macro_rules! vectors {
    ($($name:ident => $file:literal,)*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                run_vector($file).await;
            }
        )*
        const FILES: &[&str] = &[$($file),*];
    };
}

vectors! {
    concurrent_409 => "concurrent-409.json",
    expiry_executes_again => "expiry-executes-again.json",
    get_ignored => "get-ignored.json",
    header_name_case_insensitive => "header-name-case-insensitive.json",
    key_missing_required => "key-missing-required.json",
    mismatch_422 => "mismatch-422.json",
    mismatch_does_not_poison => "mismatch-does-not-poison.json",
    post_executes_once => "post-executes-once.json",
    retry_replays => "retry-replays.json",
    sf_string_quoted_key => "sf-string-quoted-key.json",
    two_keys_execute_twice => "two-keys-execute-twice.json",
}

#[test]
fn every_core_vector_has_a_test() {
    let on_disk: BTreeSet<String> = std::fs::read_dir(vector_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".json"))
        .collect();
    let covered: BTreeSet<String> = FILES.iter().map(|s| s.to_string()).collect();
    assert_eq!(on_disk, covered, "vectors on disk vs vectors with a test");
}

#[test]
fn vector_copies_match_source_md() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vectors");
    let license = std::fs::read_to_string(root.join("LICENSE")).unwrap();
    assert!(
        license.contains("Apache License"),
        "LICENSE is not Apache-2.0"
    );
    let source = std::fs::read_to_string(root.join("SOURCE.md")).unwrap();
    let mut checked = 0;
    for line in source.lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        // | vectors/core/x.json | commit | bytes | blob |
        let Some(name) = cells.get(1).and_then(|c| c.strip_prefix("vectors/core/")) else {
            continue;
        };
        let bytes: u64 = cells[3].parse().unwrap();
        let len = std::fs::metadata(vector_dir().join(name)).unwrap().len();
        assert_eq!(len, bytes, "{name}: size differs from SOURCE.md");
        checked += 1;
    }
    assert!(checked >= 7, "SOURCE.md table not found");
}

/// Fail loudly on a key this runner does not interpret.
fn only_keys(v: &Value, allowed: &[&str], ctx: &str) {
    let obj = v
        .as_object()
        .unwrap_or_else(|| panic!("{ctx}: not an object"));
    for k in obj.keys() {
        assert!(
            allowed.contains(&k.as_str()),
            "{ctx}: unsupported member {k:?}"
        );
    }
}

async fn send_step(addr: std::net::SocketAddr, step: &Value, ctx: &str) -> Resp {
    let req = &step["request"];
    only_keys(req, &["method", "path", "headers", "body"], ctx);
    let method = req["method"].as_str().unwrap().to_string();
    let path = req["path"].as_str().unwrap().to_string();
    let headers: Vec<(String, String)> = req
        .get("headers")
        .and_then(Value::as_object)
        .map(|h| {
            h.iter()
                .map(|(k, v)| {
                    let v = v
                        .as_str()
                        .unwrap_or_else(|| panic!("{ctx}: header {k} is not a string"));
                    (k.clone(), v.to_string())
                })
                .collect()
        })
        .unwrap_or_default();
    let body = match req.get("body") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    };
    let hdrs: Vec<(&str, &str)> = headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    send(addr, &method, &path, &hdrs, body).await
}

/// `^literal`, `literal$`, `^literal$` or `literal`, with `\` escapes of punctuation; anything else panics.
fn regex_matches(pattern: &str, s: &str) -> bool {
    let (start, rest) = match pattern.strip_prefix('^') {
        Some(r) => (true, r),
        None => (false, pattern),
    };
    let mut literal = String::new();
    let mut end = false;
    let mut chars = rest.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                let n = chars
                    .next()
                    .unwrap_or_else(|| panic!("regex {pattern:?}: trailing backslash"));
                assert!(
                    n.is_ascii_punctuation(),
                    "regex {pattern:?}: escape \\{n} is not supported by this runner"
                );
                literal.push(n);
            }
            '$' if chars.peek().is_none() => end = true,
            '.' | '*' | '+' | '?' | '(' | ')' | '[' | ']' | '{' | '}' | '|' | '^' | '$' => {
                panic!("regex {pattern:?}: metacharacter {c:?} is not supported by this runner")
            }
            c => literal.push(c),
        }
    }
    match (start, end) {
        (true, true) => s == literal,
        (true, false) => s.starts_with(&literal),
        (false, true) => s.ends_with(&literal),
        (false, false) => s.contains(&literal),
    }
}

/// `expected` is a subset of `actual` (objects: every expected member present and matching).
fn json_subset(expected: &Value, actual: &Value) -> bool {
    match (expected, actual) {
        (Value::Object(e), Value::Object(a)) => e
            .iter()
            .all(|(k, v)| a.get(k).is_some_and(|av| json_subset(v, av))),
        (Value::Array(e), Value::Array(a)) => {
            e.len() == a.len() && e.iter().zip(a).all(|(x, y)| json_subset(x, y))
        }
        (Value::Number(e), Value::Number(a)) => e.as_f64() == a.as_f64(),
        (e, a) => e == a,
    }
}

fn check_expect(step: &Value, r: &Resp, earlier: &HashMap<String, Resp>, ctx: &str) {
    let Some(expect) = step.get("expect") else {
        return;
    };
    only_keys(
        expect,
        &[
            "status",
            "bodyEquals",
            "bodyJson",
            "headers",
            "handlerInvocations",
        ],
        ctx,
    );
    if let Some(status) = expect.get("status") {
        assert_eq!(
            u64::from(r.status),
            status.as_u64().unwrap(),
            "{ctx}: status; response {r:?} body {:?}",
            r.text()
        );
    }
    match expect.get("bodyEquals") {
        None => {}
        Some(Value::String(s)) => {
            assert_eq!(r.text(), *s, "{ctx}: bodyEquals");
        }
        Some(Value::Object(o)) if o.len() == 1 && o.contains_key("sameAs") => {
            let other = o["sameAs"].as_str().unwrap();
            let prev = earlier
                .get(other)
                .unwrap_or_else(|| panic!("{ctx}: sameAs {other:?} has no earlier response"));
            assert_eq!(
                r.body, prev.body,
                "{ctx}: body is not the same as {other}'s"
            );
        }
        Some(other) => panic!("{ctx}: unsupported bodyEquals {other}"),
    }
    if let Some(expected) = expect.get("bodyJson") {
        let actual = r.json();
        assert!(
            json_subset(expected, &actual),
            "{ctx}: bodyJson {expected} not matched by {actual}"
        );
    }
    if let Some(headers) = expect.get("headers") {
        let headers = headers
            .as_object()
            .unwrap_or_else(|| panic!("{ctx}: headers is not an object"));
        for (name, exp) in headers {
            let actual = r.header(name);
            match exp {
                Value::String(s) => {
                    assert_eq!(actual, Some(s.as_str()), "{ctx}: header {name}")
                }
                Value::Null => assert!(actual.is_none(), "{ctx}: header {name} must be absent"),
                Value::Object(o) if o.len() == 1 && o.contains_key("regex") => {
                    let pattern = o["regex"].as_str().unwrap();
                    let actual =
                        actual.unwrap_or_else(|| panic!("{ctx}: header {name} missing; {r:?}"));
                    assert!(
                        regex_matches(pattern, actual),
                        "{ctx}: header {name}: {actual:?} does not match {pattern:?}"
                    );
                }
                Value::Object(o) if o.len() == 1 && o.get("absent") == Some(&Value::Bool(true)) => {
                    assert!(actual.is_none(), "{ctx}: header {name} must be absent")
                }
                other => panic!("{ctx}: unsupported header expectation {other}"),
            }
        }
    }
}

async fn run_vector(file: &str) {
    let path = vector_dir().join(file);
    let text = std::fs::read_to_string(&path).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    let id = v["id"].as_str().unwrap().to_string();
    only_keys(
        &v,
        &[
            "id",
            "tier",
            "title",
            "draftRef",
            "description",
            "fixture",
            "requires",
            "steps",
        ],
        &id,
    );
    assert_eq!(v["tier"], "core", "{id}: not a core vector");
    for cap in v
        .get("requires")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let cap = cap.as_str().unwrap();
        assert!(
            SUPPORTED.contains(&cap),
            "{id}: requires capability {cap:?}, which this target does not declare"
        );
    }

    let up = Upstream::start();
    let p = Proxy::builder(up.url())
        .defaults("required = true\nttl = \"2s\"")
        .start()
        .await;
    let reset = send(up.addr(), "POST", "/reset", &[], "").await;
    assert_eq!(reset.status, 204, "{id}: reset on the upstream");

    let steps = v["steps"].as_array().unwrap();
    let by_id: HashMap<String, &Value> = steps
        .iter()
        .map(|s| (s["id"].as_str().unwrap().to_string(), s))
        .collect();
    let pending_ids: HashSet<String> = steps
        .iter()
        .filter_map(|s| s.get("concurrentWith").and_then(Value::as_array))
        .flatten()
        .map(|x| x.as_str().unwrap().to_string())
        .collect();

    let mut results: HashMap<String, Resp> = HashMap::new();
    let mut pending: HashMap<String, tokio::task::JoinHandle<Resp>> = HashMap::new();
    for step in steps {
        let sid = step["id"].as_str().unwrap().to_string();
        let ctx = format!("{id} step {sid}");
        only_keys(
            step,
            &["id", "request", "expect", "concurrentWith", "delayMs"],
            &ctx,
        );
        // The vector's own prescribed delay (part of its semantics, e.g. waiting out a TTL).
        if let Some(ms) = step.get("delayMs").and_then(Value::as_u64) {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        if pending_ids.contains(&sid) {
            let (addr, step, ctx) = (p.addr, (*step).clone(), ctx.clone());
            pending.insert(
                sid,
                tokio::spawn(async move { send_step(addr, &step, &ctx).await }),
            );
            continue;
        }
        let resp = send_step(p.addr, step, &ctx).await;
        let mut group = vec![(sid, resp)];
        for other in step
            .get("concurrentWith")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let other = other.as_str().unwrap().to_string();
            let handle = pending
                .remove(&other)
                .unwrap_or_else(|| panic!("{ctx}: concurrentWith {other:?} is not pending"));
            let r = within(
                Duration::from_secs(30),
                &format!("{id} step {other}"),
                handle,
            )
            .await
            .unwrap();
            group.push((other, r));
        }
        let mut invocations = Vec::new();
        for (gid, r) in group {
            let gstep = by_id[&gid];
            let gctx = format!("{id} step {gid}");
            check_expect(gstep, &r, &results, &gctx);
            if let Some(n) = gstep["expect"].get("handlerInvocations") {
                invocations.push((gctx, n.as_u64().unwrap()));
            }
            results.insert(gid, r);
        }
        if !invocations.is_empty() {
            let c = send(p.addr, "GET", "/counter", &[], "").await;
            assert_eq!(
                c.status, 200,
                "{ctx}: GET /counter through the proxy: {c:?}"
            );
            let count = c.json()["count"].as_u64().unwrap();
            for (gctx, n) in invocations {
                assert_eq!(count, n, "{gctx}: handlerInvocations");
            }
        }
    }
    assert!(
        pending.is_empty(),
        "{id}: steps left pending: {:?}",
        pending.keys()
    );
}

#[test]
fn tiny_regex_matcher() {
    assert!(regex_matches(
        r"^application/problem\+json",
        "application/problem+json; charset=utf-8"
    ));
    assert!(!regex_matches(r"^application/problem\+json", "text/plain"));
    assert!(!regex_matches(
        r"^application/problem\+json",
        "x-application/problem+json"
    ));
    assert!(std::panic::catch_unwind(|| regex_matches("^a.*b", "ab")).is_err());
}
