//! The config's schema, declared once: every key of the file with its type, its default, its bounds and
//! what it means. The values themselves are the constants of [`defaults`](super::defaults) and
//! [`bounds`], named here, not repeated.
//!
//! What reads it:
//! - the validator: a key it reads that is not declared here is a bug (checked by a debug assertion
//!   in `file::Section`, so every config test checks it), and every key declared here is accepted
//!   (unit test below);
//! - the README's "Configuration reference" tables, which are rendered from it ([`markdown_table`])
//!   and checked against the README by a test (`UPDATE_README=1` rewrites them);
//! - each declared default is checked to be the one the validator really applies (unit test below).

use std::time::Duration;

use super::{
    bounds::{self, show_size, Bounds},
    defaults::*,
};

/// A key's type, with its bounds where it has some.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A table of further keys.
    Table,
    /// A humantime duration string (`"500ms"`, `"24h"`).
    Duration(Bounds<Duration>),
    /// Bytes: an integer or a string such as `"10MiB"`.
    Size(Bounds<u64>),
    /// A whole number.
    Count(Bounds<u64>),
    /// `true` or `false`.
    Bool,
    /// Any string.
    Str,
    /// `IP:PORT`.
    Address,
    /// An `http://` or `https://` URL (`redis://`, `rediss://` for Redis).
    Url,
    /// A path to a file or directory.
    Path,
    /// One of these strings.
    OneOf(&'static [&'static str]),
    /// A list of strings (header names, cookie names, methods, CIDR blocks).
    Strings,
    /// A list of HTTP status codes.
    Statuses,
    /// An HTTP status code.
    Status,
}

/// A default as the README shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shown {
    /// None: the setting is off or must be given.
    None,
    /// A duration.
    Duration(Duration),
    /// A size.
    Size(u64),
    /// A number.
    Count(u64),
    /// A boolean.
    Bool(bool),
    /// A string (shown as is).
    Str(&'static str),
    /// A list of strings.
    Strings(&'static [&'static str]),
    /// A list of statuses.
    Statuses(&'static [u16]),
    /// Not a single value: explained in words (Markdown).
    Explained(&'static str),
}

/// One key of the config file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Key {
    /// TOML path: `server.listen`; rule keys under `defaults.` (each `[[routes]]` entry has them too).
    pub path: &'static str,
    /// Type and bounds.
    pub kind: Kind,
    /// Built-in default.
    pub default: Shown,
    /// What it means (Markdown, one line).
    pub doc: &'static str,
}

const fn key(path: &'static str, kind: Kind, default: Shown, doc: &'static str) -> Key {
    Key {
        path,
        kind,
        default,
        doc,
    }
}

use Kind as K;
use Shown as D;

/// The sections and their keys, in the README's order.
pub const KEYS: &[Key] = &[
    key("server", K::Table, D::None, "the client-facing listener"),
    key("server.listen", K::Address, D::Str(DEFAULT_LISTEN), "proxy address"),
    key("server.max_request_body", K::Size(bounds::MAX_REQUEST_BODY), D::Size(DEFAULT_MAX_REQUEST_BODY), "largest body buffered on idempotent routes (413 beyond)"),
    key("server.max_response_body", K::Size(bounds::MAX_RESPONSE_BODY), D::Size(DEFAULT_MAX_RESPONSE_BODY), "largest response body recorded for replay"),
    key("server.request_timeout", K::Duration(bounds::REQUEST_TIMEOUT), D::Duration(DEFAULT_REQUEST_TIMEOUT), "bound on handling one request, waiting included"),
    key("server.header_read_timeout", K::Duration(bounds::HEADER_READ_TIMEOUT), D::Duration(DEFAULT_HEADER_READ_TIMEOUT), "bound on receiving request headers"),
    key("server.shutdown_grace", K::Duration(bounds::SHUTDOWN_GRACE), D::Duration(DEFAULT_SHUTDOWN_GRACE), "how long a shutdown waits for requests in flight"),
    key("server.idle_timeout", K::Duration(bounds::IDLE_TIMEOUT), D::Duration(DEFAULT_IDLE_TIMEOUT), "a connection with no request in flight this long is closed (HTTP/1 keep-alive and HTTP/2)"),
    key("server.max_connections", K::Count(bounds::MAX_CONNECTIONS), D::Count(DEFAULT_MAX_CONNECTIONS), "connections served at once; beyond it new ones wait in the listen backlog"),
    key("server.trusted_proxies", K::Strings, D::Strings(&[]), "addresses or CIDR blocks (`\"10.0.0.0/8\"`) whose forwarding headers are believed"),
    key("server.tls", K::Table, D::None, "HTTPS listener (see *TLS*); needs `cert` and `key`"),
    key("server.tls.cert", K::Path, D::None, "PEM certificate chain of the listener"),
    key("server.tls.key", K::Path, D::None, "PEM private key of the listener"),
    key("server.tls.client_ca", K::Path, D::None, "PEM CA bundle: clients must present a certificate it signed (mTLS)"),
    key("server.tls.handshake_timeout", K::Duration(bounds::HANDSHAKE_TIMEOUT), D::Duration(DEFAULT_TLS_HANDSHAKE_TIMEOUT), "bound on a client's TLS handshake"),
    key("upstream", K::Table, D::None, "where requests go"),
    key("upstream.url", K::Url, D::Str(DEFAULT_UPSTREAM), "upstream base URL; a path prefix is prepended to every request path"),
    key("upstream.connect_timeout", K::Duration(bounds::CONNECT_TIMEOUT), D::Duration(DEFAULT_CONNECT_TIMEOUT), "TCP connect timeout (and TLS handshake for an https upstream)"),
    key("upstream.timeout", K::Duration(bounds::UPSTREAM_TIMEOUT), D::Duration(DEFAULT_UPSTREAM_TIMEOUT), "bound on one upstream exchange"),
    key("upstream.max_concurrency", K::Count(bounds::MAX_CONCURRENCY), D::Count(DEFAULT_MAX_CONCURRENCY), "upstream exchanges at once, detached ones (client gone) included; beyond it 503 `upstream-busy`"),
    key("upstream.ca_file", K::Path, D::None, "PEM CA bundle that alone verifies an https upstream (default: bundled web roots)"),
    key("upstream.client_cert", K::Path, D::None, "PEM client certificate for mTLS to the upstream (with `client_key`)"),
    key("upstream.client_key", K::Path, D::None, "PEM private key of `client_cert`"),
    key("store", K::Table, D::None, "where keys and results are kept"),
    key("store.backend", K::OneOf(&["sled", "redis"]), D::Explained("`sled`, or `redis` when a Redis URL is given"), "`sled` (embedded, one proxy per data dir) or `redis` (shared by several proxies). A Redis URL (file, `--redis-url` or `IDEMPROXY_REDIS_URL`) selects Redis; next to `backend = \"sled\"` it is an error"),
    key("store.path", K::Path, D::Str(DEFAULT_STORE_PATH), "sled data directory"),
    key("store.sync", K::OneOf(&["always", "periodic"]), D::Str("always"), "`always` or `periodic` (see *Durability*)"),
    key("store.cache_capacity", K::Size(bounds::CACHE_CAPACITY), D::Size(DEFAULT_CACHE_CAPACITY), "sled page cache (RSS grows by ~2–3 MiB per MiB; see BENCHMARKS.md)"),
    key("store.sweep_interval", K::Duration(bounds::SWEEP_INTERVAL), D::Duration(DEFAULT_SWEEP_INTERVAL), "how often the sweeper deletes expired records (up to 50,000 looked at per sweep)"),
    key("store.max_size", K::Size(bounds::MAX_SIZE), D::Size(DEFAULT_MAX_SIZE), "sled: bytes of live records (keys, headers, bodies) beyond which new keys get 503 `store-full`, and a result that would pass it is kept without its body (replays say `Idempotency-Replay: omitted`); exact across restarts and sweeps (a clean shutdown saves the count; after a crash the records are counted again in the background while the proxy serves, and the cap applies again once they are: about a second per million records) Redis: use `maxmemory` with `noeviction` instead (its OOM answers become `store-full`)"),
    key("store.timeout", K::Duration(bounds::STORE_TIMEOUT), D::Duration(DEFAULT_STORE_TIMEOUT), "a store call slower than this is a store error (503 `store-unavailable`)"),
    key("store.redis_url", K::Url, D::None, "Redis backend: `redis://` or `rediss://` URL (see *Several replicas*)"),
    key("store.redis_cluster", K::Strings, D::None, "Redis backend on a Redis Cluster: seed node URLs (`[\"redis://h1:7000\", ...]`), instead of `redis_url` (see *Several replicas*)"),
    key("store.redis_sentinels", K::Strings, D::None, "Redis backend through Sentinel: sentinel URLs (`[\"redis://h:26379\"]`), instead of `redis_url`; the primary is asked of them, again after every failed operation, so a failover needs no restart"),
    key("store.redis_master_name", K::Str, D::None, "with `redis_sentinels`: the name the sentinels monitor the primary under"),
    key("store.key_prefix", K::Str, D::Str(DEFAULT_KEY_PREFIX), "Redis backend: prefix of every key"),
    key("store.redis_min_replicas", K::Count(bounds::REDIS_MIN_REPLICAS), D::Count(DEFAULT_REDIS_MIN_REPLICAS), "Redis backend: replicas that must acknowledge every claim and result (`WAIT`) before the proxy acts on it; fewer within `store.timeout` is a store error (503). See *Several replicas*"),
    key("admin", K::Table, D::None, "health, readiness, metrics and key administration"),
    key("admin.listen", K::Address, D::Str(DEFAULT_ADMIN_LISTEN), "admin listener (health, readiness, metrics, key API)"),
    key("admin.token", K::Str, D::None, "bearer token for `/admin/*` (or `IDEMPROXY_ADMIN_TOKEN`)"),
    key("telemetry", K::Table, D::None, "traces (see *Observe*)"),
    key("telemetry.otlp_endpoint", K::Url, D::None, "OpenTelemetry collector, OTLP over HTTP/protobuf: spans are posted to `{otlp_endpoint}/v1/traces` (e.g. `\"http://collector:4318\"`); off when unset, unless `OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set. Standard `OTEL_*` variables are honoured (service name, resource, sampler, headers, batching). A client's W3C `traceparent` is continued and sent on to the upstream"),
    key("defaults", K::Table, D::None, "the rules of requests that match no route (route name `default`)"),
];

/// The keys of a rule set: `[defaults]` and each `[[routes]]` entry (which also has `name` and
/// `path`). Paths are the bare key names.
pub const RULE_KEYS: &[Key] = &[
    key(
        "enabled",
        K::Bool,
        D::Bool(true),
        "routes only: `false` = pure pass-through",
    ),
    key(
        "methods",
        K::Strings,
        D::Strings(&DEFAULT_METHODS),
        "methods under idempotency rules",
    ),
    key(
        "key",
        K::OneOf(&["header", "fingerprint", "json"]),
        D::Str("header"),
        "`header`, `fingerprint` or `json`",
    ),
    key(
        "header",
        K::Str,
        D::Str(DEFAULT_KEY_HEADER),
        "the key header",
    ),
    key(
        "json_pointer",
        K::Str,
        D::None,
        "RFC 6901 pointer, required with `key = \"json\"`",
    ),
    key(
        "required",
        K::Bool,
        D::Bool(false),
        "a request without a key gets 400",
    ),
    key(
        "ttl",
        K::Duration(bounds::TTL),
        D::Duration(DEFAULT_TTL),
        "how long a result is replayed",
    ),
    key(
        "lease",
        K::Duration(bounds::LEASE),
        D::Duration(DEFAULT_LEASE),
        "how long a claim outlives a crashed proxy; keep it above `upstream.timeout`",
    ),
    key(
        "on_in_flight",
        K::OneOf(&["reject", "wait"]),
        D::Str("reject"),
        "`reject` (409) or `wait`",
    ),
    key(
        "wait_timeout",
        K::Duration(bounds::WAIT_TIMEOUT),
        D::Duration(DEFAULT_WAIT_TIMEOUT),
        "bound on waiting",
    ),
    key(
        "scope_headers",
        K::Strings,
        D::Strings(&DEFAULT_SCOPE_HEADERS),
        "headers whose values scope the key",
    ),
    key(
        "scope_cookies",
        K::Strings,
        D::Strings(&[]),
        "cookies whose values scope the key (session-cookie clients)",
    ),
    key(
        "fingerprint_headers",
        K::Strings,
        D::Strings(&DEFAULT_FINGERPRINT_HEADERS),
        "headers that are part of the fingerprint",
    ),
    key(
        "fingerprint",
        K::OneOf(&["raw", "json", "none"]),
        D::Str("raw"),
        "`raw`, `json` or `none`",
    ),
    key(
        "release_statuses",
        K::Statuses,
        D::Statuses(&DEFAULT_RELEASE_STATUSES),
        "upstream statuses that free the key instead of being recorded",
    ),
    key(
        "store_response",
        K::Bool,
        D::Bool(true),
        "`false`: remember only that the key was seen",
    ),
    key(
        "duplicate_status",
        K::Status,
        D::Count(DEFAULT_DUPLICATE_STATUS as u64),
        "duplicates' status with `store_response = false`",
    ),
    key(
        "on_store_error",
        K::OneOf(&["reject", "pass"]),
        D::Str("reject"),
        "`reject` (503) or `pass` (forward unprotected)",
    ),
];

/// The keys only a `[[routes]]` entry has, besides the rule keys.
pub const ROUTE_KEYS: &[Key] = &[
    key(
        "name",
        K::Str,
        D::None,
        "unique route name; part of every store key",
    ),
    key(
        "path",
        K::Str,
        D::None,
        "glob over the request path (`*` within a segment, `**` across segments)",
    ),
];

/// Whether the validator may read `path` (`routes[3].ttl` is read as a route's `ttl`).
pub fn declared(path: &str) -> bool {
    if path == "routes" || KEYS.iter().any(|k| k.path == path) {
        return true;
    }
    let rule_key = if let Some(k) = path.strip_prefix("defaults.") {
        k
    } else if let Some(rest) = path.strip_prefix("routes[") {
        match rest.split_once("].") {
            Some((i, k)) if i.bytes().all(|b| b.is_ascii_digit()) => {
                if ROUTE_KEYS.iter().any(|r| r.path == k) {
                    return true;
                }
                k
            }
            // `routes[3]` itself: the entry's table.
            _ => {
                return rest
                    .strip_suffix(']')
                    .is_some_and(|i| i.bytes().all(|b| b.is_ascii_digit()))
            }
        }
    } else {
        return false;
    };
    RULE_KEYS.iter().any(|r| r.path == rule_key)
}

impl Shown {
    /// As the README's tables show it.
    pub fn markdown(&self) -> String {
        let list = |items: Vec<String>| format!("`[{}]`", items.join(", "));
        match self {
            Self::None => "–".to_owned(),
            Self::Duration(d) => format!("`{}`", readable(*d)),
            Self::Size(n) => format!("`{}`", show_size(*n)),
            Self::Count(n) => format!("`{n}`"),
            Self::Bool(b) => format!("`{b}`"),
            Self::Str(s) => format!("`{s}`"),
            Self::Strings(v) => list(v.iter().map(|s| format!("\"{s}\"")).collect()),
            Self::Statuses(v) => list(v.iter().map(ToString::to_string).collect()),
            Self::Explained(s) => (*s).to_owned(),
        }
    }
}

/// A duration as a config file would write it: `500ms`, `60s`, `24h`, `7d`.
pub fn readable(d: Duration) -> String {
    let ms = d.as_millis();
    let s = d.as_secs();
    if ms % 1000 != 0 {
        format!("{ms}ms")
    } else if s >= 7 * 86_400 && s % 86_400 == 0 {
        format!("{}d", s / 86_400)
    } else if s >= 3600 && s % 3600 == 0 {
        format!("{}h", s / 3600)
    } else {
        format!("{s}s")
    }
}

/// A Markdown table of `keys` (tables left out), as the README's configuration reference shows it.
pub fn markdown_table(first_column: &str, keys: &[Key]) -> String {
    let mut out = format!("| {first_column} | default | meaning |\n|---|---|---|\n");
    for k in keys.iter().filter(|k| k.kind != Kind::Table) {
        out.push_str(&format!(
            "| `{}` | {} | {} |\n",
            k.path,
            k.default.markdown(),
            k.doc
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, Overrides};

    fn parse(text: &str) -> Config {
        Config::parse(text, &Overrides::default()).unwrap_or_else(|e| panic!("{e}\n---\n{text}"))
    }

    /// A TOML value of `kind` that the validator accepts (the default where there is one).
    fn sample(k: &Key) -> String {
        match (k.default, k.kind) {
            (D::Duration(d), _) => format!("\"{}\"", readable(d)),
            (D::Size(n) | D::Count(n), _) => n.to_string(),
            (D::Bool(b), _) => b.to_string(),
            (D::Str(s), _) => format!("\"{s}\""),
            (D::Strings(v), _) => format!(
                "[{}]",
                v.iter()
                    .map(|s| format!("\"{s}\""))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            (D::Statuses(v), _) => format!(
                "[{}]",
                v.iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            (_, K::OneOf(v)) => format!("\"{}\"", v[0]),
            (_, K::Path) => "\"/tmp/x.pem\"".to_owned(),
            (_, K::Url) => "\"redis://127.0.0.1:6379\"".to_owned(),
            _ => "\"x\"".to_owned(),
        }
    }

    /// `section.key = value` as TOML (one table per section).
    fn toml_of(keys: &[(&str, String)]) -> String {
        let mut out = String::new();
        for (path, value) in keys {
            let (section, key) = path.rsplit_once('.').unwrap();
            out.push_str(&format!("[{section}]\n{key} = {value}\n"));
        }
        out
    }

    #[test]
    fn every_declared_default_is_the_one_the_validator_applies() {
        let builtin = parse("");
        for k in KEYS.iter().chain(RULE_KEYS) {
            if matches!(k.default, D::None | D::Explained(_)) {
                continue;
            }
            let path = if k.path.starts_with("server.tls.")
                || matches!(k.path, "store.key_prefix" | "store.redis_min_replicas")
            {
                continue; // only with a certificate, or with Redis: checked below
            } else if KEYS.contains(k) {
                k.path.to_owned()
            } else if k.path == "enabled" {
                continue; // routes only: checked on a route below
            } else {
                format!("defaults.{}", k.path)
            };
            let text = toml_of(&[(path.as_str(), sample(k))]);
            assert!(
                parse(&text) == builtin,
                "{path}: declared default {} is not the built-in one",
                sample(k)
            );
        }
        let route = parse("[[routes]]\nname = \"r\"\npath = \"/r\"\nenabled = true\n");
        let plain = parse("[[routes]]\nname = \"r\"\npath = \"/r\"\n");
        assert!(
            route == plain,
            "routes[].enabled: declared default true is not the built-in one"
        );
        let tls = "[server.tls]\ncert = \"c.pem\"\nkey = \"k.pem\"\n";
        let timeout = KEYS
            .iter()
            .find(|k| k.path == "server.tls.handshake_timeout")
            .unwrap();
        let explicit = format!("{tls}handshake_timeout = {}\n", sample(timeout));
        assert!(
            parse(&explicit) == parse(tls),
            "server.tls.handshake_timeout: declared default is not the built-in one"
        );
        let redis = "[store]\nredis_url = \"redis://127.0.0.1:6379\"\n";
        let prefix = KEYS.iter().find(|k| k.path == "store.key_prefix").unwrap();
        let explicit = format!("{redis}key_prefix = {}\n", sample(prefix));
        assert!(
            parse(&explicit) == parse(redis),
            "store.key_prefix: declared default is not the built-in one"
        );
    }

    #[test]
    fn every_declared_key_is_accepted() {
        let mut text = String::new();
        for section in ["server", "upstream", "store", "admin", "telemetry"] {
            text.push_str(&format!("[{section}]\n"));
            for k in KEYS.iter().filter(|k| {
                k.kind != K::Table
                    && k.path
                        .strip_prefix(section)
                        .and_then(|r| r.strip_prefix('.'))
                        .is_some_and(|r| !r.contains('.'))
                    && !matches!(
                        k.path,
                        "store.redis_url" | "store.key_prefix" | "store.backend"
                    )
            }) {
                text.push_str(&format!(
                    "{} = {}\n",
                    &k.path[section.len() + 1..],
                    sample(k)
                ));
            }
        }
        text.push_str("[server.tls]\n");
        for k in KEYS.iter().filter(|k| k.path.starts_with("server.tls.")) {
            text.push_str(&format!(
                "{} = {}\n",
                &k.path["server.tls.".len()..],
                sample(k)
            ));
        }
        text.push_str("[defaults]\n");
        for k in RULE_KEYS.iter().filter(|k| k.path != "enabled") {
            text.push_str(&format!("{} = {}\n", k.path, sample(k)));
        }
        text.push_str("[[routes]]\nname = \"r\"\npath = \"/r\"\n");
        for k in RULE_KEYS {
            text.push_str(&format!("{} = {}\n", k.path, sample(k)));
        }
        let errors = match Config::parse(&text, &Overrides::default()) {
            Ok(_) => Vec::new(),
            Err(e) => e.0,
        };
        let unknown: Vec<_> = errors
            .iter()
            .filter(|e| e.reason.contains("unknown"))
            .collect();
        assert!(
            unknown.is_empty(),
            "declared keys refused as unknown: {unknown:?}\n---\n{text}"
        );
        // The Redis-only keys, with the Redis backend.
        parse("[store]\nbackend = \"redis\"\nredis_url = \"redis://127.0.0.1:6379\"\nkey_prefix = \"p:\"\nredis_min_replicas = 1\n");
    }

    #[test]
    fn declared_paths_cover_routes_and_nothing_else() {
        assert!(declared("routes[12].ttl"));
        assert!(declared("routes[0].name"));
        assert!(declared("routes[0]"));
        assert!(declared("defaults.scope_cookies"));
        assert!(!declared("defaults.name"));
        assert!(!declared("server.nope"));
        assert!(!declared("routes[x].ttl"));
    }
}
