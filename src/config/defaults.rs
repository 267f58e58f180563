//! Built-in defaults: every value a config file may leave out, documented in one place.

use std::time::Duration;

/// Where the proxy listens when nothing else is configured.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// Where the admin listener (`/healthz`, `/readyz`) listens.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9090";
/// The upstream when none is configured (the conventional local app port).
pub const DEFAULT_UPSTREAM: &str = "http://127.0.0.1:3000";
/// Largest request body buffered on idempotent routes (10 MiB); larger ones get 413.
pub const DEFAULT_MAX_REQUEST_BODY: u64 = 10 * 1024 * 1024;
/// Largest response body recorded for replay (10 MiB); larger ones are streamed and recorded without body.
pub const DEFAULT_MAX_RESPONSE_BODY: u64 = 10 * 1024 * 1024;
/// Bound on the whole handling of one request, waiting included.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a client may take to send its request headers (slowloris bound).
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a graceful shutdown waits for requests in flight before giving up.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// A connection with no request in flight for this long is closed (HTTP/1 keep-alive and HTTP/2).
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Connections accepted at once; beyond it new ones wait in the listen backlog.
pub const DEFAULT_MAX_CONNECTIONS: u64 = 10_000;
/// Upstream exchanges at once (detached ones included); beyond it: 503 `upstream-busy`.
pub const DEFAULT_MAX_CONCURRENCY: u64 = 1024;
/// Total size of live records; beyond it a new key gets 503 `store-full`.
pub const DEFAULT_MAX_SIZE: u64 = 1 << 30;
/// A store call slower than this is a store error (503 `store-unavailable`).
pub const DEFAULT_STORE_TIMEOUT: Duration = Duration::from_secs(2);
/// Bound on a client's TLS handshake (`[server.tls] handshake_timeout`).
pub const DEFAULT_TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connect timeout to the upstream (TCP, plus the TLS handshake for an https upstream).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on one upstream exchange (headers and recorded body).
pub const DEFAULT_UPSTREAM_TIMEOUT: Duration = Duration::from_secs(60);
/// sled data directory.
pub const DEFAULT_STORE_PATH: &str = "data";
/// sled page cache; sled's own default (1 GiB) is far too large for a sidecar. sled's accounting
/// undercounts: RSS grows by about 2–3 MiB per MiB of cache, on top of ~60 bytes per stored record
/// (its page table). With 16 MiB a proxy holding 1,000,000 records uses 118–133 MB serving them and
/// peaks at ~150 MB while writing them (see BENCHMARKS.md).
pub const DEFAULT_CACHE_CAPACITY: u64 = 16 * 1024 * 1024;
/// How often expired records are swept from disk.
pub const DEFAULT_SWEEP_INTERVAL: Duration = Duration::from_secs(5);
/// How often `sync = "periodic"` makes writes durable.
pub const DEFAULT_PERIODIC_FLUSH: Duration = Duration::from_millis(500);
/// Redis replicas that must acknowledge each write: none (Redis replication stays asynchronous).
pub const DEFAULT_REDIS_MIN_REPLICAS: u64 = 0;
/// Key prefix of every Redis key.
pub const DEFAULT_KEY_PREFIX: &str = "idemproxy:";
/// Methods under idempotency rules.
pub const DEFAULT_METHODS: [&str; 2] = ["POST", "PATCH"];
/// The request header that carries the client's key.
pub const DEFAULT_KEY_HEADER: &str = "Idempotency-Key";
/// How long a completed result is replayed.
pub const DEFAULT_TTL: Duration = Duration::from_secs(24 * 3600);
/// How long an in-flight claim outlives a dead owner.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(60);
/// How long `on_in_flight = "wait"` waits for the first request.
pub const DEFAULT_WAIT_TIMEOUT: Duration = Duration::from_secs(30);
/// Headers whose values scope a key (tenants never share keys).
pub const DEFAULT_SCOPE_HEADERS: [&str; 1] = ["Authorization"];
/// Headers that are part of the request fingerprint.
pub const DEFAULT_FINGERPRINT_HEADERS: [&str; 1] = ["Content-Type"];
/// Upstream statuses that are not recorded: the key is freed for a retry. 401/403: the request never
/// ran, and a forged request must not burn a genuine id.
pub const DEFAULT_RELEASE_STATUSES: [u16; 7] = [401, 403, 408, 429, 502, 503, 504];
/// Status sent to duplicates when `store_response = false`.
pub const DEFAULT_DUPLICATE_STATUS: u16 = 200;
/// Name of the rule set used by requests that match no `[[routes]]` entry.
pub const DEFAULT_ROUTE_NAME: &str = "default";
