//! TLS both ways, against the real binary: the HTTPS listener (HTTP/1.1 and h2 by ALPN,
//! `X-Forwarded-Proto: https`), client-certificate verification, certificate reload on SIGHUP, the
//! handshake timeout and shutdown with a handshake pending, startup errors for bad PEM files, and
//! HTTPS upstreams (custom CA, HTTP/2 by ALPN, wrong CA → 502 with the key released, mTLS).
//!
//! Every certificate comes from a throwaway rcgen CA made by the test.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::tls::{
    client_config, https, https_send, peer_certificate, server_config, toml_path, write, Ca, Leaf,
    TlsUpstream,
};
use common::{eventually, run_cli, send, within, Proxy, ProxyBuilder, Upstream};

const H1: &[&[u8]] = &[b"http/1.1"];
const H2: &[&[u8]] = &[b"h2"];
const BOTH: &[&[u8]] = &[b"h2", b"http/1.1"];

/// `tls = { .. }` for `[server]`, with the listener's files written into `dir`.
fn tls_line(dir: &Path, leaf: &Leaf, client_ca: Option<&Ca>, extra: &str) -> String {
    let (cert, key) = leaf.write(dir, "server");
    let ca = client_ca
        .map(|ca| {
            format!(
                ", client_ca = {}",
                toml_path(&write(dir, "client-ca.pem", &ca.pem()))
            )
        })
        .unwrap_or_default();
    format!(
        "tls = {{ cert = {}, key = {}{ca}{extra} }}",
        toml_path(&cert),
        toml_path(&key)
    )
}

async fn tls_proxy(up: &Upstream, dir: &Path, leaf: &Leaf, client_ca: Option<&Ca>) -> Proxy {
    Proxy::builder(up.url())
        .server(&tls_line(dir, leaf, client_ca, ""))
        .start()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_listener_speaks_http1_and_h2_and_marks_https() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("listener CA");
    let up = Upstream::start();
    let p = tls_proxy(&up, dir.path(), &ca.server_leaf(), None).await;
    assert!(
        p.logs().iter().any(|l| l.contains("TLS enabled")),
        "no TLS banner"
    );
    let hdrs = [("Idempotency-Key", "tls-1"), ("Content-Type", "text/plain")];

    let h1 = https(
        p.addr,
        &client_config(&[&ca], H1, None),
        "POST",
        "/echo",
        &hdrs,
        b"pay",
    )
    .await;
    assert_eq!(h1.alpn.as_deref(), Some(&b"http/1.1"[..]));
    assert_eq!(h1.version, http::Version::HTTP_11);
    h1.resp.assert_forwarded(201, b"pay");

    let h2 = https(
        p.addr,
        &client_config(&[&ca], H2, None),
        "POST",
        "/echo",
        &hdrs,
        b"pay",
    )
    .await;
    assert_eq!(h2.alpn.as_deref(), Some(&b"h2"[..]));
    assert_eq!(h2.version, http::Version::HTTP_2);
    h2.resp.assert_replay(201, b"pay");
    assert_eq!(up.hits_key("tls-1"), 1);

    // A client offering both gets h2 (the server's preference).
    let both = client_config(&[&ca], BOTH, None);
    let h = https(p.addr, &both, "GET", "/headers", &[], b"").await;
    assert_eq!(h.alpn.as_deref(), Some(&b"h2"[..]));
    let seen = h.resp.json();
    assert_eq!(seen["x-forwarded-proto"][0], "https", "{seen}");
    // Plain HTTP on the TLS port gets no HTTP answer.
    assert!(common::try_send(p.addr, "GET", "/x", &[], b"")
        .await
        .is_err());
    // A client that trusts another CA refuses the listener's certificate.
    let stranger = client_config(&[&Ca::new("other")], BOTH, None);
    let e = https_send(p.addr, &stranger, "GET", "/x", &[], b"")
        .await
        .unwrap_err();
    assert!(e.contains("TLS handshake"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_are_verified_against_client_ca() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("listener CA");
    let clients = Ca::new("client CA");
    let up = Upstream::start();
    let p = tls_proxy(&up, dir.path(), &ca.server_leaf(), Some(&clients)).await;

    let good = clients.client_leaf("billing");
    for alpn in [H1, H2] {
        let cfg = client_config(&[&ca], alpn, Some(&good));
        let r = https(p.addr, &cfg, "GET", "/hello", &[], b"").await;
        assert_eq!(r.resp.status, 200, "{:?}", r.resp);
    }

    let none = client_config(&[&ca], H1, None);
    let e = https_send(p.addr, &none, "GET", "/hello", &[], b"").await;
    assert!(
        e.is_err(),
        "a client without a certificate was served: {e:?}"
    );

    let stranger = Ca::new("stranger CA").client_leaf("billing");
    let wrong = client_config(&[&ca], H2, Some(&stranger));
    let e = https_send(p.addr, &wrong, "GET", "/hello", &[], b"").await;
    assert!(
        e.is_err(),
        "a certificate from another CA was accepted: {e:?}"
    );

    // Refused clients did not reach the upstream, and the listener still serves good ones.
    assert_eq!(up.hits_path("/hello"), 2);
    let cfg = client_config(&[&ca], H1, Some(&good));
    assert_eq!(
        https(p.addr, &cfg, "GET", "/hello", &[], b"")
            .await
            .resp
            .status,
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_certificates_and_keeps_them_when_invalid() {
    let dir = tempfile::tempdir().unwrap();
    let (ca1, ca2) = (Ca::new("first CA"), Ca::new("second CA"));
    let (first, second) = (ca1.server_leaf(), ca2.server_leaf());
    let up = Upstream::start();
    let p = tls_proxy(&up, dir.path(), &first, None).await;
    let trusting_both = client_config(&[&ca1, &ca2], H1, None);
    assert_eq!(peer_certificate(p.addr, &trusting_both).await, first.der);

    // A broken certificate file: the reload fails, says why, and the old certificate stays.
    write(
        dir.path(),
        "server.crt",
        "-----BEGIN CERTIFICATE-----\nnot base64\n",
    );
    let mark = p.logs().len();
    p.signal("HUP");
    let line = eventually(Duration::from_secs(10), "a failed TLS reload", || {
        let lines = p.logs();
        async move {
            lines[mark..]
                .iter()
                .find(|l| l.contains("TLS reload failed"))
                .cloned()
        }
    })
    .await;
    assert!(line.contains("server.tls.cert"), "{line}");
    assert_eq!(peer_certificate(p.addr, &trusting_both).await, first.der);
    let r = https(p.addr, &trusting_both, "GET", "/after-bad", &[], b"").await;
    assert_eq!(r.resp.status, 200);

    // New valid files: new connections get the new certificate.
    second.write(dir.path(), "server");
    let mark = p.logs().len();
    p.signal("HUP");
    eventually(Duration::from_secs(10), "a TLS reload", || {
        let lines = p.logs();
        async move {
            lines[mark..]
                .iter()
                .any(|l| l.contains("TLS certificates reloaded"))
                .then_some(())
        }
    })
    .await;
    assert_eq!(peer_certificate(p.addr, &trusting_both).await, second.der);
    let only_second = client_config(&[&ca2], H2, None);
    let r = https(p.addr, &only_second, "GET", "/after-good", &[], b"").await;
    assert_eq!(r.resp.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_handshake_times_out_and_never_delays_shutdown() {
    use tokio::io::AsyncReadExt;

    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("listener CA");
    let leaf = ca.server_leaf();
    let up = Upstream::start();

    // A client that connects and never says hello is dropped after the handshake timeout.
    let p = Proxy::builder(up.url())
        .server(&tls_line(
            dir.path(),
            &leaf,
            None,
            ", handshake_timeout = \"300ms\"",
        ))
        .start()
        .await;
    let mut idle = tokio::net::TcpStream::connect(p.addr).await.unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 16];
    let n = within(
        Duration::from_secs(10),
        "the stalled handshake to be dropped",
        idle.read(&mut buf),
    )
    .await
    .unwrap_or(0);
    assert_eq!(n, 0, "expected the server to close the connection");
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "closed too early"
    );
    drop(p);

    // With a long handshake timeout, a pending handshake does not hold up SIGTERM (grace is 30 s).
    let mut p = Proxy::builder(up.url())
        .server(&tls_line(
            dir.path(),
            &leaf,
            None,
            ", handshake_timeout = \"60s\"",
        ))
        .start()
        .await;
    let _idle = tokio::net::TcpStream::connect(p.addr).await.unwrap();
    // Let the proxy accept it (a handshake in progress), then shut down.
    let cfg = client_config(&[&ca], H1, None);
    assert_eq!(
        https(p.addr, &cfg, "GET", "/x", &[], b"").await.resp.status,
        200
    );
    let started = Instant::now();
    let status = p.sigterm().await;
    assert!(status.success(), "exit status {status}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "shutdown took {:?}",
        started.elapsed()
    );
}

#[test]
fn bad_pem_files_stop_the_start_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("listener CA");
    let leaf = ca.server_leaf();
    let other = ca.server_leaf();
    let (cert, key) = leaf.write(dir.path(), "server");
    let (_, other_key) = other.write(dir.path(), "other");
    let missing = dir.path().join("missing.pem");
    let garbage = write(dir.path(), "garbage.pem", "hello\n");
    let cases = [
        (
            format!(
                "tls = {{ cert = {}, key = {} }}",
                toml_path(&missing),
                toml_path(&key)
            ),
            "",
            "server.tls.cert: cannot read",
        ),
        (
            format!(
                "tls = {{ cert = {}, key = {} }}",
                toml_path(&cert),
                toml_path(&garbage)
            ),
            "",
            "server.tls.key: no PEM private key",
        ),
        (
            format!(
                "tls = {{ cert = {}, key = {} }}",
                toml_path(&cert),
                toml_path(&other_key)
            ),
            "",
            "server.tls: unusable certificate/key pair",
        ),
        (
            format!(
                "tls = {{ cert = {}, key = {}, client_ca = {} }}",
                toml_path(&cert),
                toml_path(&key),
                toml_path(&garbage)
            ),
            "",
            "server.tls.client_ca: no PEM certificate",
        ),
        (
            String::new(),
            "ca_file = 'MISSING'",
            "upstream.ca_file: cannot read",
        ),
        (
            String::new(),
            "client_cert = 'CERT'\nclient_key = 'GARBAGE'",
            "upstream.client_key: no PEM private key",
        ),
    ];
    for (i, (server, upstream, expected)) in cases.iter().enumerate() {
        let upstream = upstream
            .replace("MISSING", &missing.display().to_string())
            .replace("CERT", &cert.display().to_string())
            .replace("GARBAGE", &garbage.display().to_string());
        let text = ProxyBuilder::new("https://127.0.0.1:9")
            .server(server)
            .upstream(&upstream)
            .config_text(&dir.path().join(format!("data-{i}")));
        let file = write(dir.path(), &format!("case-{i}.toml"), &text);
        let out = run_cli(
            &["run", "--config", &file.display().to_string()],
            &[],
            Duration::from_secs(20),
        );
        assert!(
            out.code().is_some_and(|c| c != 0),
            "case {i}: exit {:?}; stderr:\n{}",
            out.code(),
            out.stderr
        );
        assert!(
            out.stderr.contains(expected),
            "case {i}: expected {expected:?} in stderr:\n{}",
            out.stderr
        );
        assert!(!out.stderr.contains("listening on"), "case {i}");
    }
}

/// `[upstream]` lines trusting only `ca` (written into `dir`).
fn upstream_ca(dir: &Path, ca: &Ca) -> String {
    format!(
        "ca_file = {}",
        toml_path(&write(dir, "upstream-ca.pem", &ca.pem()))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_upstream_with_custom_ca_uses_h2_when_offered() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("upstream CA");
    let leaf = ca.server_leaf();

    let h2_up = TlsUpstream::start(server_config(&leaf, BOTH, None)).await;
    let p = Proxy::builder(h2_up.url())
        .upstream(&upstream_ca(dir.path(), &ca))
        .start()
        .await;
    let hdrs = [("Idempotency-Key", "up-1"), ("Content-Type", "text/plain")];
    let first = send(p.addr, "POST", "/pay", &hdrs, "x").await;
    first.assert_forwarded(
        200,
        b"tls-upstream HTTP/2.0 POST /pay client-cert=false hit=1",
    );
    let again = send(p.addr, "POST", "/pay", &hdrs, "x").await;
    again.assert_replay(
        200,
        b"tls-upstream HTTP/2.0 POST /pay client-cert=false hit=1",
    );
    let get = send(p.addr, "GET", "/page", &[], "").await;
    assert_eq!(
        get.text(),
        "tls-upstream HTTP/2.0 GET /page client-cert=false hit=2"
    );
    assert_eq!(h2_up.hits(), 2);

    // An upstream that offers only HTTP/1.1 gets HTTP/1.1.
    let h1_up = TlsUpstream::start(server_config(&leaf, H1, None)).await;
    let p1 = Proxy::builder(h1_up.url())
        .upstream(&upstream_ca(dir.path(), &ca))
        .start()
        .await;
    let get = send(p1.addr, "GET", "/page", &[], "").await;
    assert_eq!(
        get.text(),
        "tls-upstream HTTP/1.1 GET /page client-cert=false hit=1"
    );

    // Without ca_file only the bundled web roots are trusted: the test CA is not among them.
    let p2 = Proxy::builder(h2_up.url()).start().await;
    send(p2.addr, "GET", "/page", &[], "")
        .await
        .assert_problem(502, "upstream-unreachable");
    assert_eq!(h2_up.hits(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_upstream_ca_is_unreachable_and_frees_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let trusted = Ca::new("trusted CA");
    let impostor = Ca::new("impostor CA");
    let up = TlsUpstream::start(server_config(&impostor.server_leaf(), BOTH, None)).await;
    let p = Proxy::builder(up.url())
        .upstream(&upstream_ca(dir.path(), &trusted))
        .start()
        .await;
    let hdrs = [
        ("Idempotency-Key", "wrong-ca"),
        ("Content-Type", "text/plain"),
    ];

    let r = send(p.addr, "POST", "/pay", &hdrs, "x").await;
    let problem = r.assert_problem(502, "upstream-unreachable");
    assert!(problem["detail"].is_string());
    assert_eq!(
        up.hits(),
        0,
        "nothing may reach an upstream that failed verification"
    );

    // The upstream gets a certificate the proxy trusts: the same key runs now (it was released).
    up.set_config(server_config(&trusted.server_leaf(), BOTH, None));
    let r = send(p.addr, "POST", "/pay", &hdrs, "x").await;
    r.assert_forwarded(
        200,
        b"tls-upstream HTTP/2.0 POST /pay client-cert=false hit=1",
    );
    let r = send(p.addr, "POST", "/pay", &hdrs, "x").await;
    r.assert_replay(
        200,
        b"tls-upstream HTTP/2.0 POST /pay client-cert=false hit=1",
    );
    assert_eq!(up.hits(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_upstream_gets_the_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("upstream CA");
    let clients = Ca::new("upstream's client CA");
    let up = TlsUpstream::start(server_config(&ca.server_leaf(), BOTH, Some(&clients))).await;
    let (cert, key) = clients
        .client_leaf("idemproxy")
        .write(dir.path(), "proxy-client");
    let p = Proxy::builder(up.url())
        .upstream(&upstream_ca(dir.path(), &ca))
        .upstream(&format!(
            "client_cert = {}\nclient_key = {}",
            toml_path(&cert),
            toml_path(&key)
        ))
        .start()
        .await;
    let r = send(p.addr, "GET", "/whoami", &[], "").await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        r.text(),
        "tls-upstream HTTP/2.0 GET /whoami client-cert=true hit=1"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_listener_in_front_of_tls_upstream() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("one CA");
    let up = TlsUpstream::start(server_config(&ca.server_leaf(), H1, None)).await;
    let p = Proxy::builder(up.url())
        .server(&tls_line(dir.path(), &ca.server_leaf(), None, ""))
        .upstream(&upstream_ca(dir.path(), &ca))
        .start()
        .await;
    let cfg: Arc<_> = client_config(&[&ca], H2, None);
    let hdrs = [("Idempotency-Key", "both-ways")];
    let r = https(p.addr, &cfg, "PATCH", "/item", &hdrs, b"{}").await;
    assert_eq!(r.version, http::Version::HTTP_2);
    r.resp.assert_forwarded(
        200,
        b"tls-upstream HTTP/1.1 PATCH /item client-cert=false hit=1",
    );
    let r = https(p.addr, &cfg, "PATCH", "/item", &hdrs, b"{}").await;
    r.resp.assert_replay(
        200,
        b"tls-upstream HTTP/1.1 PATCH /item client-cert=false hit=1",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_upstream_handshake_is_a_connect_failure() {
    // Accepts TCP and never answers the ClientHello: the connection is never ready, nothing is sent.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let held = Arc::new(std::sync::Mutex::new(Vec::new()));
    let h = held.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            h.lock().unwrap().push(tcp);
        }
    });
    let p = Proxy::builder(format!("https://{addr}"))
        .upstream("connect_timeout = \"300ms\"\ntimeout = \"20s\"")
        .start()
        .await;
    let hdrs = [
        ("Idempotency-Key", "stalled"),
        ("Content-Type", "text/plain"),
    ];
    for attempt in 0..2 {
        let started = Instant::now();
        let r = send(p.addr, "POST", "/pay", &hdrs, "x").await;
        // 502 upstream-unreachable (not 504, not 409 on the retry): the key was freed each time.
        r.assert_problem(502, "upstream-unreachable");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "attempt {attempt} took {:?}",
            started.elapsed()
        );
    }
    assert!(held.lock().unwrap().len() >= 2, "each attempt connected");
}
