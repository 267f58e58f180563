//! Configuration: the TOML file, CLI/env overrides, and the validated, typed [`Config`].
//!
//! Pipeline (after sozu/rpxy): text → `toml::Table` → overrides applied → `validate` walks every key,
//! collecting *all* problems with their TOML paths → typed [`Config`]. Nothing downstream parses strings:
//! addresses, durations, sizes, header names and globs are checked here once.

pub mod bounds;
pub mod defaults;
mod file;
pub mod json_schema;
pub mod schema;
mod validate;
mod warnings;

use std::{fmt, net::SocketAddr, path::PathBuf, time::Duration};

use http::{HeaderName, Method, StatusCode, Uri};

use crate::key::{FingerprintMode, KeySource};

pub use validate::parse_size;

/// One problem in a config, with its TOML path (0-based indices: `routes[1].ttl`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Where: `routes[1].ttl`, `server.listen`, or `config` for the file as a whole.
    pub path: String,
    /// What is wrong with it.
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.reason)
    }
}

/// `url` with everything between the scheme and the last `@` replaced by `***`, for logs and error
/// messages (rule 17). The last `@` anywhere, not just in a well-formed authority: a password holding
/// `/`, `?` or `#` (`http://u:pa/ss@h`) makes a parser see the rest as a path, and would leak.
pub fn redact_url(url: &str) -> String {
    let (scheme, rest) = match url.find("://") {
        Some(i) => url.split_at(i + 3),
        None => ("", url),
    };
    match rest.rfind('@') {
        Some(at) => format!("{scheme}***{}", &rest[at..]),
        None => url.to_owned(),
    }
}

/// Every problem found in a config file; printed one per line.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
pub struct ConfigErrors(pub Vec<ConfigError>);

/// Values given on the command line or in `IDEMPROXY_*` variables; they win over the file.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--listen` / `IDEMPROXY_LISTEN`.
    pub listen: Option<String>,
    /// `--upstream` / `IDEMPROXY_UPSTREAM`.
    pub upstream: Option<String>,
    /// `--data-dir` / `IDEMPROXY_DATA_DIR`.
    pub data_dir: Option<String>,
    /// `--admin-listen` / `IDEMPROXY_ADMIN_LISTEN`.
    pub admin_listen: Option<String>,
    /// `IDEMPROXY_ADMIN_TOKEN`.
    pub admin_token: Option<String>,
    /// `--redis-url` / `IDEMPROXY_REDIS_URL`.
    pub redis_url: Option<String>,
}

/// The validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// `[server]`: the client-facing listener.
    pub server: ServerConfig,
    /// `[upstream]`: where requests go.
    pub upstream: UpstreamConfig,
    /// `[store]`: where keys and results are kept.
    pub store: StoreConfig,
    /// `[admin]`: health, readiness, metrics and key administration.
    pub admin: AdminConfig,
    /// `[telemetry]`: traces.
    pub telemetry: TelemetryConfig,
    /// `[defaults]`: the rule set of requests that match no route (route name `default`).
    pub defaults: Rule,
    /// `[[routes]]`, in file order: the first whose path matches wins.
    pub routes: Vec<Route>,
    /// Settings the validator found valid but without effect (part of [`Config::warnings`]).
    pub notes: Vec<ConfigError>,
}

/// `[server]`.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerConfig {
    /// Listen address.
    pub listen: SocketAddr,
    /// Largest request body buffered on idempotent routes.
    pub max_request_body: u64,
    /// Largest response body recorded for replay.
    pub max_response_body: u64,
    /// Bound on handling one request (waiting included).
    pub request_timeout: Duration,
    /// Bound on reading a request's headers.
    pub header_read_timeout: Duration,
    /// How long shutdown waits for requests in flight.
    pub shutdown_grace: Duration,
    /// A connection with no request in flight for this long is closed.
    pub idle_timeout: Duration,
    /// Connections served at once.
    pub max_connections: usize,
    /// Peers whose forwarding headers are believed (rule 16).
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// HTTPS listener (HTTP/2 and HTTP/1.1 by ALPN); `None`: plain HTTP.
    pub tls: Option<TlsConfig>,
}

/// `[server.tls]`. The files are read when the proxy starts and again on SIGHUP.
#[derive(Debug, Clone, PartialEq)]
pub struct TlsConfig {
    /// PEM certificate chain (leaf first).
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM CA bundle: when set, clients must present a certificate it signed.
    pub client_ca: Option<PathBuf>,
    /// Bound on a client's TLS handshake.
    pub handshake_timeout: Duration,
}

/// A PEM certificate chain and its private key (a client identity for mTLS).
#[derive(Debug, Clone, PartialEq)]
pub struct CertKey {
    /// PEM certificate chain (leaf first).
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
}

/// `[upstream]`.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamConfig {
    /// Base URL (scheme, authority, optional path prefix).
    pub url: Uri,
    /// TCP connect timeout.
    pub connect_timeout: Duration,
    /// Bound on one upstream exchange.
    pub timeout: Duration,
    /// Upstream exchanges at once, detached ones included.
    pub max_concurrency: usize,
    /// CA bundle for an HTTPS upstream: when set, only these CAs are trusted (else the bundled web roots).
    pub ca_file: Option<PathBuf>,
    /// Client certificate presented to an HTTPS upstream (`client_cert` + `client_key`).
    pub client_auth: Option<CertKey>,
}

/// `[store]`.
#[derive(Debug, Clone, PartialEq)]
pub struct StoreConfig {
    /// Which backend.
    pub backend: Backend,
    /// sled directory.
    pub path: PathBuf,
    /// Durability policy.
    pub sync: SyncPolicy,
    /// sled page cache size in bytes.
    pub cache_capacity: u64,
    /// How often expired records are swept.
    pub sweep_interval: Duration,
    /// Total size of live records before new keys are refused (`store-full`).
    pub max_size: u64,
    /// A store call slower than this is a store error.
    pub timeout: Duration,
    /// Redis URL (`redis://` or `rediss://`).
    pub redis_url: Option<String>,
    /// Redis Cluster seed nodes (instead of `redis_url`).
    pub redis_cluster: Vec<String>,
    /// Sentinels to ask for the primary (instead of `redis_url`).
    pub redis_sentinels: Vec<String>,
    /// The name the sentinels monitor the primary under (with `redis_sentinels`).
    pub redis_master_name: String,
    /// Prefix of every Redis key.
    pub key_prefix: String,
    /// Redis replicas that must acknowledge every claim and result (`WAIT`) before the proxy acts.
    pub redis_min_replicas: u32,
    /// Settings of the other backend that were given and are ignored (see [`Config::warnings`]).
    pub warnings: Vec<ConfigError>,
}

/// `[store] backend`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// Embedded sled database (one proxy per data dir).
    Sled,
    /// Redis shared by several proxies.
    Redis,
}

/// `[store] sync`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncPolicy {
    /// A claim and a result are durable before the proxy acts on them (group commit).
    Always,
    /// Writes become durable within [`defaults::DEFAULT_PERIODIC_FLUSH`].
    Periodic,
}

/// `[admin]`.
#[derive(Debug, Clone, PartialEq)]
pub struct AdminConfig {
    /// Listen address.
    pub listen: SocketAddr,
    /// Bearer token for `/admin/*`; `None` disables those endpoints.
    pub token: Option<String>,
}

/// `[telemetry]`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TelemetryConfig {
    /// OTLP/HTTP collector base URL (spans go to `{otlp_endpoint}/v1/traces`), without a trailing `/`.
    /// `None`: no traces, unless `OTEL_EXPORTER_OTLP_ENDPOINT` or `..._TRACES_ENDPOINT` is set.
    pub otlp_endpoint: Option<String>,
}

/// A `[[routes]]` entry: a path glob and its fully resolved rules.
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    /// Unique name; part of every store key, so renaming a route forgets its keys.
    pub name: String,
    /// Glob over the request path (`*` within a segment, `**` across segments).
    pub path: String,
    /// The rules, with every field the route did not set inherited from `[defaults]`.
    pub rule: Rule,
}

/// What happens to requests under one route (or `[defaults]`).
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    /// `false`: pure pass-through.
    pub enabled: bool,
    /// Methods under idempotency rules; others pass through.
    pub methods: Vec<Method>,
    /// Where the key comes from.
    pub key: KeySource,
    /// The key header (for `key = "header"`).
    pub header: HeaderName,
    /// A request without a key gets 400.
    pub required: bool,
    /// How long a completed result is replayed.
    pub ttl: Duration,
    /// How long an in-flight claim outlives a dead owner.
    pub lease: Duration,
    /// What a duplicate gets while the first is in flight.
    pub on_in_flight: InFlightMode,
    /// Bound on waiting (`on_in_flight = "wait"`).
    pub wait_timeout: Duration,
    /// Headers whose values scope the key.
    pub scope_headers: Vec<HeaderName>,
    /// Cookies whose values scope the key.
    pub scope_cookies: Vec<String>,
    /// Headers that are part of the fingerprint.
    pub fingerprint_headers: Vec<HeaderName>,
    /// How the body enters the fingerprint.
    pub fingerprint: FingerprintMode,
    /// Upstream statuses that free the key instead of being recorded.
    pub release_statuses: Vec<StatusCode>,
    /// `false`: remember only that the key was seen.
    pub store_response: bool,
    /// Status for duplicates when `store_response = false`.
    pub duplicate_status: StatusCode,
    /// What to do when the store fails.
    pub on_store_error: StoreErrorMode,
}

/// `on_in_flight = …`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InFlightMode {
    /// 409 + Retry-After.
    Reject,
    /// Wait for the first to finish, then replay.
    Wait,
}

/// `on_store_error = …`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreErrorMode {
    /// 503 + Retry-After.
    Reject,
    /// Forward unprotected, marked `Idempotency-Degraded: true`.
    Pass,
}

impl Config {
    /// Reads, overrides and validates a config file; `None` means built-in defaults.
    pub fn load(
        path: Option<&std::path::Path>,
        overrides: &Overrides,
    ) -> Result<Self, ConfigErrors> {
        let text = match path {
            Some(p) => std::fs::read_to_string(p).map_err(|e| {
                ConfigErrors(vec![ConfigError {
                    path: "config".into(),
                    reason: format!("cannot read {}: {e}", p.display()),
                }])
            })?,
            None => String::new(),
        };
        Self::parse(&text, overrides)
    }

    /// Parses and validates config text.
    pub fn parse(text: &str, overrides: &Overrides) -> Result<Self, ConfigErrors> {
        let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            ConfigErrors(vec![ConfigError {
                path: "config".into(),
                reason: format!(
                    "invalid TOML: {}",
                    e.to_string().trim_end().replace('\n', " ")
                ),
            }])
        })?;
        validate::build(table, overrides)
    }

    /// Settings that are valid but probably not what the operator meant, each with its TOML path.
    /// `check` prints them (and still exits 0); `run` logs them at startup and on reload.
    pub fn warnings(&self) -> Vec<ConfigError> {
        warnings::of(self)
    }

    /// The rules that apply to a route name (`default` for `[defaults]`).
    pub fn rule(&self, route: &str) -> Option<&Rule> {
        if route == defaults::DEFAULT_ROUTE_NAME {
            return Some(&self.defaults);
        }
        self.routes
            .iter()
            .find(|r| r.name == route)
            .map(|r| &r.rule)
    }
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn urls_never_show_their_credentials() {
        assert_eq!(
            redact_url("redis://user:secret@host:6379/0"),
            "redis://***@host:6379/0"
        );
        assert_eq!(redact_url("rediss://:secret@host/1"), "rediss://***@host/1");
        assert_eq!(redact_url("redis://host:6379"), "redis://host:6379");
        // Passwords a URL parser would read as a path, query or fragment.
        for url in [
            "http://user:pa/ss@127.0.0.1:3001",
            "http://user:pa?ss@127.0.0.1:3001",
            "http://user:pa#ss@127.0.0.1:3001",
            "redis://user:r3d/spw@127.0.0.1:6390/0",
        ] {
            let shown = redact_url(url);
            assert!(!shown.contains("ss") && !shown.contains("spw"), "{shown}");
            assert!(shown.ends_with("@127.0.0.1:3001") || shown.ends_with("@127.0.0.1:6390/0"));
        }
    }
}
