//! Shared harness for the black-box tests of the `idemproxy` binary.
//!
//! - [`upstream`]: a real hyper HTTP/1.1 upstream on 127.0.0.1 (own thread and runtime) that counts every hit
//!   and offers the anyonce fixture routes plus test helpers (event-driven gates, header echo, cookies).
//! - [`proxy`]: spawns the real binary on a config written into a tempdir, waits for its `listening on` line,
//!   signals it (SIGTERM / SIGKILL) and restarts it on the same data dir.
//! - [`client`]: a bounded-time HTTP client over real TCP (hyper) and a raw-TCP client for odd requests.
//! - [`wait`]: bounded `eventually` polling and timeouts.
//! - [`tls`]: a throwaway PKI (rcgen), HTTPS clients (HTTP/1.1 or h2 by ALPN, optional client
//!   certificate) and a small HTTPS upstream.
//! - [`keyed`]: an upstream that counts requests per `Idempotency-Key` and tracks its open connections
//!   (crash matrix, soak).
//! - [`chaos`]: a raw-TCP upstream that misbehaves on purpose (resets, stalls, truncated or garbage
//!   answers).
//! - [`metrics`]: reading `/metrics` (Prometheus text) from the admin listener.
//! - [`procstat`]: RSS, open fds and directory sizes from `/proc`.
//! - [`rng`]: a seeded PRNG whose seed is printed, for reproducible chaos.
//! - [`server`]: the bind/thread/accept-loop skeleton the test upstreams share.
//! - [`in_process`]: a `Proxy` served in the test's own runtime over a store of the test's choosing
//!   (e.g. `idemproxy::store::testing::failing::FailingStore`).
//!
//! Every wait in here is bounded; nothing sleeps where an event can be awaited.

#![allow(dead_code, unreachable_pub, unused_imports)]

pub mod chaos;
pub mod client;
pub mod in_process;
pub mod keyed;
pub mod metrics;
pub mod procstat;
pub mod proxy;
pub mod redis;
pub mod rng;
pub mod server;
pub mod tls;
pub mod upstream;
pub mod wait;

pub use client::{raw_exchange, send, try_send, RawConn, Resp};
pub use proxy::{run_cli, CliOutput, Proxy, ProxyBuilder};
pub use upstream::{dead_addr, Upstream};
pub use wait::{eventually, within};

/// Shorthand for the most common call: a POST with an `Idempotency-Key` and a text body.
pub async fn post_key(addr: std::net::SocketAddr, path: &str, key: &str, body: &str) -> Resp {
    send(
        addr,
        "POST",
        path,
        &[("Idempotency-Key", key), ("Content-Type", "text/plain")],
        body,
    )
    .await
}
