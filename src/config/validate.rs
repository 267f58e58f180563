//! Turns the raw TOML table into a typed [`Config`], collecting every problem with its path.
//!
//! Each key is read and checked once ([`Section`] reports unknown keys and wrong types); `[defaults]` is
//! resolved over the built-in defaults, then each `[[routes]]` entry over `[defaults]`, and cross-field rules
//! (`key = "json"` needs `json_pointer`, unique route names, …) are checked on the merged result.

use std::{collections::HashSet, net::SocketAddr, path::PathBuf, time::Duration};

use globset::GlobBuilder;
use http::{HeaderName, Method, StatusCode, Uri};

use super::{
    defaults::*,
    file::{Problems, RawSize, Section},
    AdminConfig, Backend, CertKey, Config, ConfigErrors, FingerprintMode, InFlightMode, KeySource,
    Overrides, Route, Rule, ServerConfig, StoreConfig, StoreErrorMode, SyncPolicy, TlsConfig,
    UpstreamConfig,
};

/// Builds the typed config, or every problem found.
pub(super) fn build(mut table: toml::Table, o: &Overrides) -> Result<Config, ConfigErrors> {
    apply_overrides(&mut table, o);
    let mut p = Problems::default();
    let mut root = Section::new("", table);

    let server = root.take_table("server", &mut p);
    let upstream = root.take_table("upstream", &mut p);
    let store = root.take_table("store", &mut p);
    let admin = root.take_table("admin", &mut p);
    let defaults = root.take_table("defaults", &mut p);
    let routes = root.take_table_list("routes", &mut p);
    root.finish(&mut p);

    let server = read_server(
        server.unwrap_or_else(|| Section::new("server", Default::default())),
        &mut p,
    );
    let upstream = read_upstream(
        upstream.unwrap_or_else(|| Section::new("upstream", Default::default())),
        &mut p,
    );
    let store = read_store(
        store.unwrap_or_else(|| Section::new("store", Default::default())),
        &mut p,
    );
    let admin = read_admin(
        admin.unwrap_or_else(|| Section::new("admin", Default::default())),
        &mut p,
    );

    let builtin = builtin_rule();
    let mut dsec = defaults.unwrap_or_else(|| Section::new("defaults", Default::default()));
    let dpart = read_rule(&mut dsec, &mut p, false);
    dsec.finish(&mut p);
    let defaults = dpart.merge_onto(&builtin, "defaults", &mut p);

    let mut names = HashSet::new();
    let mut out_routes = Vec::with_capacity(routes.len());
    for mut sec in routes {
        let name = sec.take_str("name", &mut p);
        let path = sec.take_str("path", &mut p);
        let part = read_rule(&mut sec, &mut p, true);
        let base = sec.path_of("");
        let base = base.trim_end_matches('.').to_owned();
        let rule = part.merge_onto(&defaults, &base, &mut p);
        let name = match name {
            None => {
                p.push(
                    format!("{base}.name"),
                    "missing: every route needs a unique name",
                );
                None
            }
            Some(n) if n.is_empty() => {
                p.push(format!("{base}.name"), "must not be empty");
                None
            }
            Some(n) if n == DEFAULT_ROUTE_NAME => {
                p.push(
                    format!("{base}.name"),
                    "\"default\" is reserved for [defaults]",
                );
                None
            }
            Some(n) if !names.insert(n.clone()) => {
                p.push(
                    format!("{base}.name"),
                    format!("duplicate route name \"{n}\""),
                );
                None
            }
            Some(n) => Some(n),
        };
        let path = match path {
            None => {
                p.push(
                    format!("{base}.path"),
                    "missing: a glob such as \"/v1/payments/**\"",
                );
                None
            }
            Some(g) if !g.starts_with('/') => {
                p.push(format!("{base}.path"), format!("\"{g}\" must start with /"));
                None
            }
            Some(g) => match GlobBuilder::new(&g).literal_separator(true).build() {
                Ok(_) => Some(g),
                Err(e) => {
                    p.push(format!("{base}.path"), format!("invalid glob \"{g}\": {e}"));
                    None
                }
            },
        };
        sec.finish(&mut p);
        if let (Some(name), Some(path)) = (name, path) {
            out_routes.push(Route { name, path, rule });
        }
    }

    if !p.0.is_empty() {
        return Err(ConfigErrors(p.0));
    }
    match (server, upstream, store, admin) {
        (Some(server), Some(upstream), Some(store), Some(admin)) => Ok(Config {
            server,
            upstream,
            store,
            admin,
            defaults,
            routes: out_routes,
        }),
        // A section reader returns None only after recording a problem.
        _ => Err(ConfigErrors(vec![super::ConfigError {
            path: "config".into(),
            reason: "invalid".into(),
        }])),
    }
}

fn apply_overrides(table: &mut toml::Table, o: &Overrides) {
    fn set(table: &mut toml::Table, section: &str, key: &str, v: &Option<String>) {
        let Some(v) = v else { return };
        let entry = table
            .entry(section.to_owned())
            .or_insert_with(|| toml::Value::Table(Default::default()));
        if let toml::Value::Table(t) = entry {
            t.insert(key.to_owned(), toml::Value::String(v.clone()));
        }
        // A non-table section stays as it is; validation reports its type.
    }
    set(table, "server", "listen", &o.listen);
    set(table, "upstream", "url", &o.upstream);
    set(table, "store", "path", &o.data_dir);
    set(table, "admin", "listen", &o.admin_listen);
    set(table, "admin", "token", &o.admin_token);
    set(table, "store", "redis_url", &o.redis_url);
}

fn read_server(mut s: Section, p: &mut Problems) -> Option<ServerConfig> {
    let listen = addr(&mut s, "listen", DEFAULT_LISTEN, p);
    let max_request_body = size(&mut s, "max_request_body", DEFAULT_MAX_REQUEST_BODY, p);
    let max_response_body = size(&mut s, "max_response_body", DEFAULT_MAX_RESPONSE_BODY, p);
    let request_timeout = duration(&mut s, "request_timeout", p).unwrap_or(DEFAULT_REQUEST_TIMEOUT);
    let header_read_timeout =
        duration(&mut s, "header_read_timeout", p).unwrap_or(DEFAULT_HEADER_READ_TIMEOUT);
    let shutdown_grace = duration(&mut s, "shutdown_grace", p).unwrap_or(DEFAULT_SHUTDOWN_GRACE);
    let tls = s.take_table("tls", p).and_then(|mut t| {
        let cert = file_path(&mut t, "cert", p);
        let key = file_path(&mut t, "key", p);
        let client_ca = file_path(&mut t, "client_ca", p);
        let handshake_timeout = positive_duration(&mut t, "handshake_timeout", p)
            .unwrap_or(DEFAULT_TLS_HANDSHAKE_TIMEOUT);
        if cert.is_none() {
            p.push(t.path_of("cert"), "missing: TLS needs both cert and key");
        }
        if key.is_none() {
            p.push(t.path_of("key"), "missing: TLS needs both cert and key");
        }
        t.finish(p);
        Some(TlsConfig {
            cert: cert?,
            key: key?,
            client_ca,
            handshake_timeout,
        })
    });
    s.finish(p);
    Some(ServerConfig {
        listen: listen?,
        max_request_body: max_request_body?,
        max_response_body: max_response_body?,
        request_timeout,
        header_read_timeout,
        shutdown_grace,
        tls,
    })
}

fn read_upstream(mut s: Section, p: &mut Problems) -> Option<UpstreamConfig> {
    let raw = s
        .take_str("url", p)
        .unwrap_or_else(|| DEFAULT_UPSTREAM.to_owned());
    let url = match raw.parse::<Uri>() {
        Ok(u) if !matches!(u.scheme_str(), Some("http" | "https")) => {
            p.push(
                s.path_of("url"),
                format!("\"{raw}\": the scheme must be http or https"),
            );
            None
        }
        Ok(u) if u.authority().is_none() => {
            p.push(s.path_of("url"), format!("\"{raw}\": a host is required"));
            None
        }
        Ok(u) if u.query().is_some() => {
            p.push(
                s.path_of("url"),
                format!("\"{raw}\": a query is not allowed"),
            );
            None
        }
        Ok(u) => Some(u),
        Err(e) => {
            p.push(s.path_of("url"), format!("invalid URL \"{raw}\": {e}"));
            None
        }
    };
    let connect_timeout = duration(&mut s, "connect_timeout", p).unwrap_or(DEFAULT_CONNECT_TIMEOUT);
    let timeout = duration(&mut s, "timeout", p).unwrap_or(DEFAULT_UPSTREAM_TIMEOUT);
    let ca_file = file_path(&mut s, "ca_file", p);
    let client_cert = file_path(&mut s, "client_cert", p);
    let client_key = file_path(&mut s, "client_key", p);
    let client_auth = match (client_cert, client_key) {
        (Some(cert), Some(key)) => Some(CertKey { cert, key }),
        (Some(_), None) => {
            p.push(
                s.path_of("client_key"),
                "missing: client_cert needs client_key (both or neither)",
            );
            None
        }
        (None, Some(_)) => {
            p.push(
                s.path_of("client_cert"),
                "missing: client_key needs client_cert (both or neither)",
            );
            None
        }
        (None, None) => None,
    };
    s.finish(p);
    Some(UpstreamConfig {
        url: url?,
        connect_timeout,
        timeout,
        ca_file,
        client_auth,
    })
}

fn read_store(mut s: Section, p: &mut Problems) -> Option<StoreConfig> {
    let backend = match s.take_str("backend", p).as_deref() {
        None | Some("sled") => Some(Backend::Sled),
        Some("redis") => Some(Backend::Redis),
        Some(other) => {
            p.push(
                s.path_of("backend"),
                format!("\"{other}\": expected \"sled\" or \"redis\""),
            );
            None
        }
    };
    let path = s
        .take_str("path", p)
        .unwrap_or_else(|| DEFAULT_STORE_PATH.to_owned());
    if path.is_empty() {
        p.push(s.path_of("path"), "must not be empty");
    }
    let sync = match s.take_str("sync", p).as_deref() {
        None | Some("always") => Some(SyncPolicy::Always),
        Some("periodic") => Some(SyncPolicy::Periodic),
        Some(other) => {
            p.push(
                s.path_of("sync"),
                format!("\"{other}\": expected \"always\" or \"periodic\""),
            );
            None
        }
    };
    let cache_capacity = size(&mut s, "cache_capacity", DEFAULT_CACHE_CAPACITY, p);
    let sweep_interval = duration(&mut s, "sweep_interval", p).unwrap_or(DEFAULT_SWEEP_INTERVAL);
    let redis_url = s.take_str("redis_url", p);
    if let Some(u) = &redis_url {
        if !(u.starts_with("redis://") || u.starts_with("rediss://")) {
            p.push(
                s.path_of("redis_url"),
                format!("\"{u}\": expected redis:// or rediss://"),
            );
        }
    } else if backend == Some(Backend::Redis) {
        p.push(
            s.path_of("redis_url"),
            "missing: backend = \"redis\" needs redis_url",
        );
    }
    let key_prefix = s
        .take_str("key_prefix", p)
        .unwrap_or_else(|| DEFAULT_KEY_PREFIX.to_owned());
    s.finish(p);
    Some(StoreConfig {
        backend: backend?,
        path: PathBuf::from(path),
        sync: sync?,
        cache_capacity: cache_capacity?,
        sweep_interval,
        redis_url,
        key_prefix,
    })
}

fn read_admin(mut s: Section, p: &mut Problems) -> Option<AdminConfig> {
    let listen = addr(&mut s, "listen", DEFAULT_ADMIN_LISTEN, p);
    let token = s.take_str("token", p);
    if token.as_deref() == Some("") {
        p.push(
            s.path_of("token"),
            "must not be empty (leave it out to disable /admin/*)",
        );
    }
    s.finish(p);
    Some(AdminConfig {
        listen: listen?,
        token: token.filter(|t| !t.is_empty()),
    })
}

/// A rule section as written: `None` where the file says nothing (so routes inherit).
#[derive(Debug, Default)]
struct PartialRule {
    enabled: Option<bool>,
    methods: Option<Vec<Method>>,
    key: Option<&'static str>,
    json_pointer: Option<String>,
    header: Option<HeaderName>,
    required: Option<bool>,
    ttl: Option<Duration>,
    lease: Option<Duration>,
    on_in_flight: Option<InFlightMode>,
    wait_timeout: Option<Duration>,
    scope_headers: Option<Vec<HeaderName>>,
    fingerprint_headers: Option<Vec<HeaderName>>,
    fingerprint: Option<FingerprintMode>,
    release_statuses: Option<Vec<StatusCode>>,
    store_response: Option<bool>,
    duplicate_status: Option<StatusCode>,
    on_store_error: Option<StoreErrorMode>,
}

fn builtin_rule() -> Rule {
    Rule {
        enabled: true,
        methods: vec![Method::POST, Method::PATCH],
        key: KeySource::Header,
        header: HeaderName::from_static("idempotency-key"),
        required: false,
        ttl: DEFAULT_TTL,
        lease: DEFAULT_LEASE,
        on_in_flight: InFlightMode::Reject,
        wait_timeout: DEFAULT_WAIT_TIMEOUT,
        scope_headers: vec![http::header::AUTHORIZATION],
        fingerprint_headers: vec![http::header::CONTENT_TYPE],
        fingerprint: FingerprintMode::Raw,
        release_statuses: DEFAULT_RELEASE_STATUSES
            .iter()
            .filter_map(|s| StatusCode::from_u16(*s).ok())
            .collect(),
        store_response: true,
        duplicate_status: StatusCode::OK,
        on_store_error: StoreErrorMode::Reject,
    }
}

fn read_rule(s: &mut Section, p: &mut Problems, is_route: bool) -> PartialRule {
    let enabled = s.take_bool("enabled", p);
    if enabled.is_some() && !is_route {
        p.push(
            s.path_of("enabled"),
            "only [[routes]] entries can be disabled",
        );
    }
    let methods = s.take_str_list("methods", p).and_then(|list| {
        let mut out = Vec::new();
        let mut ok = true;
        for (i, m) in list.iter().enumerate() {
            match Method::from_bytes(m.to_ascii_uppercase().as_bytes()) {
                Ok(m) if !m.as_str().is_empty() => out.push(m),
                _ => {
                    ok = false;
                    p.push(
                        format!("{}[{i}]", s.path_of("methods")),
                        format!("invalid method \"{m}\""),
                    );
                }
            }
        }
        ok.then_some(out)
    });
    let key = match s.take_str("key", p).as_deref() {
        None => None,
        Some("header") => Some("header"),
        Some("fingerprint") => Some("fingerprint"),
        Some("json") => Some("json"),
        Some(other) => {
            p.push(
                s.path_of("key"),
                format!("\"{other}\": expected \"header\", \"fingerprint\" or \"json\""),
            );
            None
        }
    };
    let json_pointer = s.take_str("json_pointer", p);
    if let Some(ptr) = &json_pointer {
        if !ptr.is_empty() && !ptr.starts_with('/') {
            p.push(
                s.path_of("json_pointer"),
                format!("\"{ptr}\" is not an RFC 6901 pointer (it must start with /)"),
            );
        }
    }
    let header = s.take_str("header", p).and_then(|h| {
        header_name(&h).or_else(|| {
            p.push(s.path_of("header"), format!("invalid header name \"{h}\""));
            None
        })
    });
    let required = s.take_bool("required", p);
    let ttl = positive_duration(s, "ttl", p);
    let lease = positive_duration(s, "lease", p);
    let on_in_flight = match s.take_str("on_in_flight", p).as_deref() {
        None => None,
        Some("reject") => Some(InFlightMode::Reject),
        Some("wait") => Some(InFlightMode::Wait),
        Some(other) => {
            p.push(
                s.path_of("on_in_flight"),
                format!("\"{other}\": expected \"reject\" or \"wait\""),
            );
            None
        }
    };
    let wait_timeout = positive_duration(s, "wait_timeout", p);
    let scope_headers = header_list(s, "scope_headers", p);
    let fingerprint_headers = header_list(s, "fingerprint_headers", p);
    let fingerprint = match s.take_str("fingerprint", p).as_deref() {
        None => None,
        Some("raw") => Some(FingerprintMode::Raw),
        Some("json") => Some(FingerprintMode::Json),
        Some("none") => Some(FingerprintMode::None),
        Some(other) => {
            p.push(
                s.path_of("fingerprint"),
                format!("\"{other}\": expected \"raw\", \"json\" or \"none\""),
            );
            None
        }
    };
    let release_statuses = s.take_int_list("release_statuses", p).and_then(|list| {
        let mut out = Vec::new();
        let mut ok = true;
        for (i, n) in list.iter().enumerate() {
            match status(*n) {
                Some(st) => out.push(st),
                None => {
                    ok = false;
                    p.push(
                        format!("{}[{i}]", s.path_of("release_statuses")),
                        format!("{n} is not an HTTP status (100-599)"),
                    );
                }
            }
        }
        ok.then_some(out)
    });
    let store_response = s.take_bool("store_response", p);
    let duplicate_status = s.take_int("duplicate_status", p).and_then(|n| {
        status(n).or_else(|| {
            p.push(
                s.path_of("duplicate_status"),
                format!("{n} is not an HTTP status (100-599)"),
            );
            None
        })
    });
    let on_store_error = match s.take_str("on_store_error", p).as_deref() {
        None => None,
        Some("reject") => Some(StoreErrorMode::Reject),
        Some("pass") => Some(StoreErrorMode::Pass),
        Some(other) => {
            p.push(
                s.path_of("on_store_error"),
                format!("\"{other}\": expected \"reject\" or \"pass\""),
            );
            None
        }
    };
    PartialRule {
        enabled,
        methods,
        key,
        json_pointer,
        header,
        required,
        ttl,
        lease,
        on_in_flight,
        wait_timeout,
        scope_headers,
        fingerprint_headers,
        fingerprint,
        release_statuses,
        store_response,
        duplicate_status,
        on_store_error,
    }
}

impl PartialRule {
    /// The rule this section describes, inheriting what it leaves out from `base`.
    fn merge_onto(self, base: &Rule, path: &str, p: &mut Problems) -> Rule {
        let inherited_pointer = match &base.key {
            KeySource::Json(ptr) => Some(ptr.clone()),
            _ => None,
        };
        let key = match self.key {
            None => match (&base.key, self.json_pointer) {
                (KeySource::Json(_), Some(ptr)) => KeySource::Json(ptr),
                (k, _) => k.clone(),
            },
            Some("header") => KeySource::Header,
            Some("fingerprint") => KeySource::Fingerprint,
            Some(_) => match self.json_pointer.or(inherited_pointer) {
                Some(ptr) => KeySource::Json(ptr),
                None => {
                    p.push(
                        format!("{path}.json_pointer"),
                        "missing: key = \"json\" needs json_pointer",
                    );
                    KeySource::Json(String::new())
                }
            },
        };
        Rule {
            enabled: self.enabled.unwrap_or(base.enabled),
            methods: self.methods.unwrap_or_else(|| base.methods.clone()),
            key,
            header: self.header.unwrap_or_else(|| base.header.clone()),
            required: self.required.unwrap_or(base.required),
            ttl: self.ttl.unwrap_or(base.ttl),
            lease: self.lease.unwrap_or(base.lease),
            on_in_flight: self.on_in_flight.unwrap_or(base.on_in_flight),
            wait_timeout: self.wait_timeout.unwrap_or(base.wait_timeout),
            scope_headers: self
                .scope_headers
                .unwrap_or_else(|| base.scope_headers.clone()),
            fingerprint_headers: self
                .fingerprint_headers
                .unwrap_or_else(|| base.fingerprint_headers.clone()),
            fingerprint: self.fingerprint.unwrap_or(base.fingerprint),
            release_statuses: self
                .release_statuses
                .unwrap_or_else(|| base.release_statuses.clone()),
            store_response: self.store_response.unwrap_or(base.store_response),
            duplicate_status: self.duplicate_status.unwrap_or(base.duplicate_status),
            on_store_error: self.on_store_error.unwrap_or(base.on_store_error),
        }
    }
}

fn header_name(s: &str) -> Option<HeaderName> {
    HeaderName::from_bytes(s.as_bytes()).ok()
}

fn header_list(s: &mut Section, key: &str, p: &mut Problems) -> Option<Vec<HeaderName>> {
    let list = s.take_str_list(key, p)?;
    let mut out = Vec::new();
    let mut ok = true;
    for (i, h) in list.iter().enumerate() {
        match header_name(h) {
            Some(n) => out.push(n),
            None => {
                ok = false;
                p.push(
                    format!("{}[{i}]", s.path_of(key)),
                    format!("invalid header name \"{h}\""),
                );
            }
        }
    }
    ok.then_some(out)
}

fn status(n: i64) -> Option<StatusCode> {
    u16::try_from(n)
        .ok()
        .filter(|n| (100..=599).contains(n))
        .and_then(|n| StatusCode::from_u16(n).ok())
}

fn addr(s: &mut Section, key: &str, default: &str, p: &mut Problems) -> Option<SocketAddr> {
    let raw = s.take_str(key, p).unwrap_or_else(|| default.to_owned());
    match raw.parse() {
        Ok(a) => Some(a),
        Err(_) => {
            p.push(
                s.path_of(key),
                format!("invalid address \"{raw}\" (expected IP:PORT, e.g. \"127.0.0.1:8080\")"),
            );
            None
        }
    }
}

/// A file path (PEM files). The files themselves are read when the proxy starts, where a missing or
/// unparsable one is reported with this key's path.
fn file_path(s: &mut Section, key: &str, p: &mut Problems) -> Option<PathBuf> {
    let raw = s.take_str(key, p)?;
    if raw.is_empty() {
        p.push(s.path_of(key), "must not be empty (a path to a PEM file)");
    }
    Some(PathBuf::from(raw))
}

fn duration(s: &mut Section, key: &str, p: &mut Problems) -> Option<Duration> {
    let raw = s.take_str(key, p)?;
    match humantime::parse_duration(&raw) {
        Ok(d) => Some(d),
        Err(_) => {
            p.push(s.path_of(key), format!("invalid duration \"{raw}\""));
            None
        }
    }
}

fn positive_duration(s: &mut Section, key: &str, p: &mut Problems) -> Option<Duration> {
    let d = duration(s, key, p)?;
    if d.is_zero() {
        p.push(s.path_of(key), "must be greater than zero");
        return None;
    }
    Some(d)
}

fn size(s: &mut Section, key: &str, default: u64, p: &mut Problems) -> Option<u64> {
    let bytes = match s.take_size(key, p) {
        None if s.has(key) => return None,
        None => return Some(default),
        Some(RawSize::Bytes(n)) => u64::try_from(n).ok(),
        Some(RawSize::Text(t)) => parse_size(&t),
    };
    if bytes.is_none() {
        p.push(
            s.path_of(key),
            "invalid size (expected bytes or a string like \"10MiB\")",
        );
    }
    bytes
}

/// Parses `"10MiB"`, `"512KB"`, `"1024"`: B, KB/MB/GB (powers of 1000), KiB/MiB/GiB (powers of 1024).
pub fn parse_size(text: &str) -> Option<u64> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" | "k" => 1000,
        "kib" => 1 << 10,
        "mb" | "m" => 1_000_000,
        "mib" => 1 << 20,
        "gb" | "g" => 1_000_000_000,
        "gib" => 1 << 30,
        _ => return None,
    };
    n.checked_mul(mult)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors(text: &str) -> Vec<String> {
        match Config::parse(text, &Overrides::default()) {
            Ok(_) => Vec::new(),
            Err(e) => e.0.iter().map(ToString::to_string).collect(),
        }
    }

    #[test]
    fn empty_file_is_builtin_defaults() {
        let c = Config::parse("", &Overrides::default()).unwrap();
        assert_eq!(c.server.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(c.defaults.methods, vec![Method::POST, Method::PATCH]);
        assert_eq!(c.defaults.ttl, DEFAULT_TTL);
        assert_eq!(c.store.sync, SyncPolicy::Always);
        assert!(c.routes.is_empty());
    }

    #[test]
    fn reports_every_problem_with_its_path() {
        let e = errors(
            r#"
            [server]
            lisen = "x"
            max_request_body = "ten"
            [defaults]
            on_in_flight = "maybe"
            [[routes]]
            name = "a"
            path = "/a/**"
            [[routes]]
            name = "b"
            path = "/b"
            ttl = "1x"
            release_statuses = [503, 999]
            "#,
        );
        assert!(e.contains(&"server.lisen: unknown key".to_owned()), "{e:?}");
        assert!(
            e.iter()
                .any(|l| l.starts_with("server.max_request_body: invalid size")),
            "{e:?}"
        );
        assert!(
            e.iter()
                .any(|l| l.starts_with("defaults.on_in_flight: \"maybe\"")),
            "{e:?}"
        );
        assert!(
            e.contains(&"routes[1].ttl: invalid duration \"1x\"".to_owned()),
            "{e:?}"
        );
        assert!(
            e.iter()
                .any(|l| l.starts_with("routes[1].release_statuses[1]: 999")),
            "{e:?}"
        );
        assert_eq!(e.len(), 5, "{e:?}");
    }

    #[test]
    fn routes_inherit_defaults() {
        let c = Config::parse(
            r#"
            [defaults]
            ttl = "7d"
            on_in_flight = "wait"
            [[routes]]
            name = "pay"
            path = "/pay/**"
            required = true
            "#,
            &Overrides::default(),
        )
        .unwrap();
        let r = &c.routes[0].rule;
        assert!(r.required);
        assert_eq!(r.ttl, Duration::from_secs(7 * 86400));
        assert_eq!(r.on_in_flight, InFlightMode::Wait);
        assert!(!c.defaults.required);
    }

    #[test]
    fn json_key_needs_pointer_and_route_names_are_checked() {
        let e = errors(
            r#"
            [[routes]]
            name = "w"
            path = "/w"
            key = "json"
            [[routes]]
            name = "w"
            path = "nope"
            [[routes]]
            path = "/x"
            "#,
        );
        assert!(
            e.contains(
                &"routes[0].json_pointer: missing: key = \"json\" needs json_pointer".to_owned()
            ),
            "{e:?}"
        );
        assert!(
            e.iter().any(|l| l.starts_with("routes[1].name: duplicate")),
            "{e:?}"
        );
        assert!(
            e.iter()
                .any(|l| l.starts_with("routes[1].path: \"nope\" must start with /")),
            "{e:?}"
        );
        assert!(
            e.iter().any(|l| l.starts_with("routes[2].name: missing")),
            "{e:?}"
        );
    }

    #[test]
    fn wrong_types_and_bad_values() {
        let e = errors(
            r#"
            [upstream]
            url = "ftp://x"
            [store]
            backend = "redis"
            sync = "never"
            [defaults]
            required = "yes"
            methods = ["POST", 3]
            ttl = "0s"
            "#,
        );
        assert!(e.iter().any(|l| l.starts_with("upstream.url:")), "{e:?}");
        assert!(
            e.iter().any(|l| l.starts_with("store.redis_url: missing")),
            "{e:?}"
        );
        assert!(e.iter().any(|l| l.starts_with("store.sync:")), "{e:?}");
        assert!(
            e.contains(&"defaults.required: expected true or false, found string".to_owned()),
            "{e:?}"
        );
        assert!(
            e.contains(&"defaults.methods[1]: expected a string, found integer".to_owned()),
            "{e:?}"
        );
        assert!(
            e.contains(&"defaults.ttl: must be greater than zero".to_owned()),
            "{e:?}"
        );
    }

    #[test]
    fn overrides_win() {
        let o = Overrides {
            listen: Some("127.0.0.1:1".into()),
            upstream: Some("http://127.0.0.1:2".into()),
            ..Default::default()
        };
        let c = Config::parse("[server]\nlisten = \"127.0.0.1:9\"\n", &o).unwrap();
        assert_eq!(c.server.listen.port(), 1);
        assert_eq!(c.upstream.url.port_u16(), Some(2));
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("10MiB"), Some(10 << 20));
        assert_eq!(parse_size("1KB"), Some(1000));
        assert_eq!(parse_size("42"), Some(42));
        assert_eq!(parse_size("1x"), None);
        assert_eq!(parse_size(""), None);
    }

    #[test]
    fn tls_keys_and_upstream_client_identity() {
        let c = Config::parse(
            r#"
            [server]
            tls = { cert = "c.pem", key = "k.pem", client_ca = "ca.pem", handshake_timeout = "3s" }
            [upstream]
            url = "https://api.example"
            ca_file = "up-ca.pem"
            client_cert = "me.pem"
            client_key = "me.key"
            "#,
            &Overrides::default(),
        )
        .unwrap();
        let tls = c.server.tls.unwrap();
        assert_eq!(tls.handshake_timeout, Duration::from_secs(3));
        assert_eq!(tls.client_ca, Some(PathBuf::from("ca.pem")));
        let id = c.upstream.client_auth.unwrap();
        assert_eq!((id.cert, id.key), ("me.pem".into(), "me.key".into()));

        let d = Config::parse(
            "[server]\ntls = { cert = \"c.pem\", key = \"k.pem\" }\n",
            &Overrides::default(),
        )
        .unwrap();
        let tls = d.server.tls.unwrap();
        assert_eq!(tls.handshake_timeout, DEFAULT_TLS_HANDSHAKE_TIMEOUT);
        assert!(tls.client_ca.is_none());
        assert!(d.upstream.client_auth.is_none());

        let e = errors(
            r#"
            [server]
            tls = { cert = "", handshake_timeout = "0s" }
            [upstream]
            client_cert = "me.pem"
            "#,
        );
        assert!(
            e.contains(&"server.tls.cert: must not be empty (a path to a PEM file)".to_owned()),
            "{e:?}"
        );
        assert!(
            e.contains(&"server.tls.key: missing: TLS needs both cert and key".to_owned()),
            "{e:?}"
        );
        assert!(
            e.contains(&"server.tls.handshake_timeout: must be greater than zero".to_owned()),
            "{e:?}"
        );
        assert!(
            e.contains(
                &"upstream.client_key: missing: client_cert needs client_key (both or neither)"
                    .to_owned()
            ),
            "{e:?}"
        );
        assert_eq!(e.len(), 4, "{e:?}");
        let e = errors("[upstream]\nclient_key = \"me.key\"\n");
        assert_eq!(
            e,
            vec!["upstream.client_cert: missing: client_key needs client_cert (both or neither)"]
        );
    }

    #[test]
    fn syntax_error_is_one_problem() {
        let e = errors("[server\n");
        assert_eq!(e.len(), 1);
        assert!(e[0].starts_with("config: invalid TOML"), "{e:?}");
    }
}
