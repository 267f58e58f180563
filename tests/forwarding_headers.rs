//! Forwarding headers (contract rule 16) and private store files (rule 17), against the real binary.
//!
//! What this pins (each case behaved otherwise before): a client could forge where it came from — its
//! `X-Forwarded-Proto`/`-Host` were passed on (or added to), and `Forwarded` and `X-Real-IP` reached the
//! upstream untouched — while a real front proxy listed in `trusted_proxies` must have its headers kept
//! and extended; and the store's files were created with the default umask (world-readable records).

#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use common::upstream::Received;
use common::{post_key, send, Proxy, Upstream};

/// The forwarding headers a hostile (or a fronting) client sends, and the Host it asks for.
const CLIENT_HEADERS: [(&str, &str); 6] = [
    ("Host", "shop.example:8443"),
    ("X-Forwarded-For", "10.0.0.1"),
    ("X-Forwarded-Proto", "https"),
    ("X-Forwarded-Host", "evil.example"),
    ("X-Real-IP", "10.9.9.9"),
    ("Forwarded", "for=10.9.9.9"),
];

/// Sends a pass-through GET and a keyed POST with [`CLIENT_HEADERS`]; returns what the upstream got for
/// each, with a label.
async fn forwarded_requests(p: &Proxy, up: &Upstream) -> Vec<(&'static str, Received)> {
    let get = send(p.addr, "GET", "/fwd-get", &CLIENT_HEADERS, "").await;
    assert_eq!(get.status, 200, "{get:?}");
    let mut keyed = CLIENT_HEADERS.to_vec();
    keyed.push(("Idempotency-Key", "fwd-1"));
    let post = send(p.addr, "POST", "/fwd-post", &keyed, "x").await;
    assert_eq!(post.status, 200, "{post:?}");
    let reqs = up.requests();
    let find = |path: &str| {
        reqs.iter()
            .find(|r| r.path == path)
            .unwrap_or_else(|| panic!("{path} did not reach the upstream: {reqs:?}"))
            .clone()
    };
    vec![
        ("pass-through GET", find("/fwd-get")),
        ("keyed POST", find("/fwd-post")),
    ]
}

/// The single value of header `name`, panicking if it is repeated.
fn only(r: &Received, name: &str) -> Option<String> {
    let values: Vec<&String> = r
        .headers
        .iter()
        .filter(|(n, _)| n == name)
        .map(|(_, v)| v)
        .collect();
    assert!(
        values.len() <= 1,
        "{name} sent {} times: {r:?}",
        values.len()
    );
    values.first().map(|v| v.to_string())
}

/// From a peer not in `trusted_proxies` (the default: none), `X-Forwarded-For` gets the peer appended,
/// `X-Forwarded-Proto` and `-Host` are the proxy's own view, and `Forwarded` and `X-Real-IP` are removed.
#[tokio::test]
async fn an_untrusted_peer_cannot_forge_forwarding_headers() {
    let up = Upstream::start();
    let p = Proxy::builder(up.url()).start().await;
    for (what, r) in forwarded_requests(&p, &up).await {
        assert_eq!(
            only(&r, "x-forwarded-for").as_deref(),
            Some("10.0.0.1, 127.0.0.1"),
            "{what}: {r:?}"
        );
        assert_eq!(
            only(&r, "x-forwarded-proto").as_deref(),
            Some("http"),
            "{what}: {r:?}"
        );
        assert_eq!(
            only(&r, "x-forwarded-host").as_deref(),
            Some("shop.example:8443"),
            "{what}: X-Forwarded-Host must be the Host the client sent: {r:?}"
        );
        assert_eq!(only(&r, "x-real-ip"), None, "{what}: {r:?}");
        assert_eq!(only(&r, "forwarded"), None, "{what}: {r:?}");
    }
}

/// From a trusted proxy (`trusted_proxies = ["127.0.0.0/8"]`) the headers are kept, and the chains
/// (`X-Forwarded-For`, `Forwarded`) are extended with this hop.
#[tokio::test]
async fn a_trusted_proxy_keeps_and_extends_forwarding_headers() {
    let up = Upstream::start();
    let p = Proxy::builder(up.url())
        .server("trusted_proxies = [\"127.0.0.0/8\"]")
        .start()
        .await;
    for (what, r) in forwarded_requests(&p, &up).await {
        assert_eq!(
            only(&r, "x-forwarded-for").as_deref(),
            Some("10.0.0.1, 127.0.0.1"),
            "{what}: {r:?}"
        );
        assert_eq!(
            only(&r, "x-forwarded-proto").as_deref(),
            Some("https"),
            "{what}: {r:?}"
        );
        assert_eq!(
            only(&r, "x-forwarded-host").as_deref(),
            Some("evil.example"),
            "{what}: {r:?}"
        );
        assert_eq!(
            only(&r, "x-real-ip").as_deref(),
            Some("10.9.9.9"),
            "{what}: {r:?}"
        );
        let fwd = only(&r, "forwarded").unwrap_or_else(|| panic!("{what}: no Forwarded: {r:?}"));
        assert!(
            fwd.starts_with("for=10.9.9.9, for=127.0.0.1"),
            "{what}: Forwarded not extended with this hop: {fwd:?}"
        );
    }
}

/// Every directory under `root` (itself included) is 0700 and every file 0600; returns how many files.
fn assert_private(root: &Path, when: &str) -> usize {
    let mut files = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(
            mode,
            0o700,
            "{when}: directory {} is {mode:o}",
            dir.display()
        );
        for entry in std::fs::read_dir(&dir).unwrap() {
            let entry = entry.unwrap();
            let meta = std::fs::symlink_metadata(entry.path()).unwrap();
            if meta.is_dir() {
                stack.push(entry.path());
            } else if meta.is_file() {
                files += 1;
                let mode = meta.permissions().mode() & 0o777;
                assert_eq!(
                    mode,
                    0o600,
                    "{when}: file {} is {mode:o}",
                    entry.path().display()
                );
            }
        }
    }
    files
}

/// Rule 17: the store is readable by the proxy's user only (dirs 0700, files 0600), while it runs and
/// after a clean shutdown (which flushes).
#[tokio::test]
async fn store_files_are_private() {
    let up = Upstream::start();
    let mut p = Proxy::builder(up.url()).start().await;
    post_key(p.addr, "/private", "private-1", "secret order")
        .await
        .assert_forwarded(200, b"hit 1 POST /private");
    let files = assert_private(&p.data_dir(), "while running");
    assert!(files > 0, "no store files under {}", p.data_dir().display());
    let status = p.sigterm().await;
    assert!(status.success(), "exit: {status}");
    assert_private(&p.data_dir(), "after shutdown");
}

/// `upstream.url`'s path is a prefix of every forwarded path, keyed or passed through, and the query
/// goes along as sent.
#[tokio::test]
async fn the_upstream_url_path_is_prepended_to_every_request_path() {
    let up = Upstream::start();
    let p = Proxy::builder(format!("{}/base", up.url())).start().await;
    post_key(p.addr, "/pay?x=1", "prefix-1", "body").await;
    let r = send(p.addr, "GET", "/items/7?y=2", &[], "").await;
    assert_eq!(r.status, 200, "{r:?}");
    let seen: Vec<(String, Option<String>)> = up
        .requests()
        .into_iter()
        .map(|r| (r.path, r.query))
        .collect();
    assert_eq!(
        seen,
        [
            ("/base/pay".to_owned(), Some("x=1".to_owned())),
            ("/base/items/7".to_owned(), Some("y=2".to_owned())),
        ]
    );
}
