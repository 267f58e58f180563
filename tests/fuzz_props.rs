//! Property tests (proptest, stable Rust) over the parsers that take untrusted input, through the public
//! library API: client keys and sf-strings, JSON-pointer key extraction and canonical JSON, config text
//! (arbitrary, mutated and type-confused) and overrides, and stored record decoding.
//!
//! `cargo test --test fuzz_props` runs 256 cases per property; `PROPTEST_CASES=100000` runs a longer
//! fuzzing session. Failures print the minimal input (no regression files are written).

#![allow(clippy::unwrap_used)]

use bytes::Bytes;
use idemproxy::{
    config::{bounds, Config, ConfigErrors, Overrides},
    key::{canonical_json, json_pointer_key, Fingerprint, IdempotencyKey, JsonKeyError, StoreKey},
    store::{Completed, InFlight, Record},
};
use proptest::prelude::*;
use serde_json::Value;

fn config() -> ProptestConfig {
    ProptestConfig {
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn visible(b: u8) -> bool {
    (0x21..=0x7e).contains(&b)
}

/// RFC 8941 sf-string form of `key`.
fn sf_quote(key: &str) -> String {
    let mut s = String::from("\"");
    for c in key.chars() {
        if c == '"' || c == '\\' {
            s.push('\\');
        }
        s.push(c);
    }
    s.push('"');
    s
}

/// A valid bare key: 1..=255 visible ASCII characters, not starting with a quote (that would be an
/// sf-string).
fn bare_key() -> impl Strategy<Value = String> {
    "[!#-~][!-~]{0,254}"
}

// --------------------------------------------------------------------------------------------------------
// Keys.

proptest! {
    #![proptest_config(config())]

    #[test]
    fn key_parsing_never_panics_and_accepts_only_visible_ascii(raw in proptest::collection::vec(any::<u8>(), 0..400)) {
        if let Ok(k) = IdempotencyKey::from_header(&raw) {
            let s = k.as_str();
            prop_assert!((1..=255).contains(&s.len()), "accepted {} bytes", s.len());
            prop_assert!(s.bytes().all(visible), "accepted {s:?}");
            prop_assert!(k.redacted().len() <= 8 && s.starts_with(k.redacted()));
        }
    }

    #[test]
    fn key_parsing_of_near_valid_headers_never_panics(
        key in bare_key(),
        noise in proptest::collection::vec(any::<u8>(), 0..4),
        at in any::<prop::sample::Index>(),
        quoted: bool,
    ) {
        let mut raw = if quoted { sf_quote(&key) } else { key }.into_bytes();
        let i = at.index(raw.len() + 1);
        raw.splice(i..i, noise);
        if let Ok(k) = IdempotencyKey::from_header(&raw) {
            prop_assert!((1..=255).contains(&k.as_str().len()));
            prop_assert!(k.as_str().bytes().all(visible));
        }
    }

    #[test]
    fn bare_and_sf_string_forms_are_the_same_key(key in bare_key(), ows in "[ \t]{0,3}") {
        let bare = IdempotencyKey::from_header(format!("{ows}{key}{ows}").as_bytes());
        prop_assert_eq!(bare.as_ref().map(IdempotencyKey::as_str), Ok(key.as_str()));
        let quoted = IdempotencyKey::from_header(format!("{ows}{}{ows}", sf_quote(&key)).as_bytes());
        prop_assert_eq!(quoted, bare);
    }

    #[test]
    fn sf_strings_do_not_lift_the_key_rules(inner in "[ -~]{0,300}") {
        // Inside quotes any printable ASCII is well-formed sf-string content, but the key it carries must
        // still be 1..=255 visible characters.
        let r = IdempotencyKey::from_header(sf_quote(&inner).as_bytes());
        let valid = (1..=255).contains(&inner.len()) && inner.bytes().all(visible);
        prop_assert_eq!(r.is_ok(), valid, "{:?} -> {:?}", inner, r);
    }

    #[test]
    fn a_key_with_any_byte_outside_visible_ascii_is_refused(
        key in bare_key(),
        bad in prop_oneof![0u8..=0x20, 0x7fu8..=0xff],
        at in any::<prop::sample::Index>(),
        quoted: bool,
    ) {
        let mut k = key.into_bytes();
        if k.len() < 2 {
            k.push(b'x');
        }
        // Strictly inside: not where OWS trimming or the quote test looks.
        let i = 1 + at.index(k.len() - 1);
        k.insert(i, bad);
        let raw = if quoted {
            let mut q = vec![b'"'];
            q.extend_from_slice(&k);
            q.push(b'"');
            q
        } else {
            k
        };
        prop_assert!(IdempotencyKey::from_header(&raw).is_err(), "accepted {:?}", raw);
    }

    #[test]
    fn plain_text_keys_follow_the_same_rules(text in ".{0,300}") {
        let valid = (1..=255).contains(&text.len()) && text.bytes().all(visible);
        prop_assert_eq!(IdempotencyKey::new(&text).is_ok(), valid);
    }

    #[test]
    fn store_keys_roundtrip_and_separate_routes_and_scopes(
        key in bare_key(),
        route_a in "[a-z]{1,8}",
        route_b in "[a-z]{1,8}",
        tenant_a in "[ -~]{0,20}",
        tenant_b in "[ -~]{0,20}",
    ) {
        let k = IdempotencyKey::new(&key).unwrap();
        let auth = [http::header::AUTHORIZATION];
        let headers = |t: &str| {
            let mut h = http::HeaderMap::new();
            h.insert(http::header::AUTHORIZATION, http::HeaderValue::from_str(t).unwrap());
            h
        };
        let a = StoreKey::derive(&route_a, &k, &auth, &headers(&tenant_a));
        prop_assert_eq!(StoreKey::from_bytes(&a.to_bytes()), Some(a));
        prop_assert_eq!(a, StoreKey::derive(&route_a, &k, &auth, &headers(&tenant_a)));
        let b = StoreKey::derive(&route_b, &k, &auth, &headers(&tenant_b));
        prop_assert_eq!(a.id == b.id, route_a == route_b);
        prop_assert_eq!(a.scope == b.scope, tenant_a == tenant_b);
    }
}

// --------------------------------------------------------------------------------------------------------
// JSON.

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        (-1.0e6f64..1.0e6).prop_map(Value::from),
        "[a-z0-9~/ ]{0,8}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 5, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            proptest::collection::btree_map("[a-c~/0-2]{0,3}", inner, 0..5)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn escape_token(t: &str) -> String {
    t.replace('~', "~0").replace('/', "~1")
}

/// An RFC 6901 lookup written independently of serde_json's.
fn model_lookup<'a>(doc: &'a Value, pointer: &str) -> Option<&'a Value> {
    if pointer.is_empty() {
        return Some(doc);
    }
    let rest = pointer.strip_prefix('/')?;
    let mut cur = doc;
    for raw in rest.split('/') {
        let token = raw.replace("~1", "/").replace("~0", "~");
        cur = match cur {
            Value::Object(m) => m.get(&token)?,
            Value::Array(a) => {
                let canonical = token == "0" || (!token.starts_with('0') && !token.is_empty());
                if !canonical || !token.bytes().all(|b| b.is_ascii_digit()) {
                    return None;
                }
                a.get(token.parse::<usize>().ok()?)?
            }
            _ => return None,
        };
    }
    Some(cur)
}

/// Pointers into `doc` (existing paths) plus a few that miss.
fn pointers_into(doc: &Value, prefix: String, out: &mut Vec<String>) {
    out.push(prefix.clone());
    match doc {
        Value::Object(m) => {
            for (k, v) in m {
                pointers_into(v, format!("{prefix}/{}", escape_token(k)), out);
            }
            out.push(format!("{prefix}/missing~0~1"));
        }
        Value::Array(a) => {
            for (i, v) in a.iter().enumerate() {
                pointers_into(v, format!("{prefix}/{i}"), out);
            }
            out.push(format!("{prefix}/{}", a.len()));
            out.push(format!("{prefix}/01"));
        }
        _ => out.push(format!("{prefix}/x")),
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn json_pointer_extraction_never_panics(
        body in proptest::collection::vec(any::<u8>(), 0..300),
        pointer in ".{0,20}",
    ) {
        let _ = json_pointer_key(&body, &pointer);
        let _ = canonical_json(&body);
    }

    #[test]
    fn json_pointer_extraction_matches_rfc6901(doc in json_value(), pick in any::<prop::sample::Index>(), pretty: bool) {
        let mut ptrs = Vec::new();
        pointers_into(&doc, String::new(), &mut ptrs);
        let pointer = &ptrs[pick.index(ptrs.len())];
        let body = if pretty { serde_json::to_vec_pretty(&doc) } else { serde_json::to_vec(&doc) }.unwrap();
        let got = json_pointer_key(&body, pointer);
        let want = match model_lookup(&doc, pointer) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(Value::Number(n)) if n.is_i64() || n.is_u64() => Ok(Some(n.to_string())),
            Some(_) => Err(JsonKeyError::WrongType),
        };
        prop_assert_eq!(got, want, "pointer {:?} into {}", pointer, doc);
    }

    #[test]
    fn a_key_anywhere_is_found_whatever_its_field_names(
        names in proptest::collection::vec(".{0,6}", 1..5),
        key in "[!-~]{1,40}",
    ) {
        prop_assume!(!names.iter().any(|n| n == "other"));
        let mut doc = Value::String(key.clone());
        for n in names.iter().rev() {
            doc = serde_json::json!({ n.as_str(): doc, "other": [1, 2, 3] });
        }
        let pointer: String = names.iter().map(|n| format!("/{}", escape_token(n))).collect();
        let body = serde_json::to_vec(&doc).unwrap();
        prop_assert_eq!(json_pointer_key(&body, &pointer), Ok(Some(key)));
    }

    #[test]
    fn canonical_json_ignores_whitespace_and_key_order(doc in json_value()) {
        let compact = canonical_json(&serde_json::to_vec(&doc).unwrap()).unwrap();
        let pretty = canonical_json(&serde_json::to_vec_pretty(&doc).unwrap()).unwrap();
        prop_assert_eq!(&compact, &pretty);
        prop_assert_eq!(canonical_json(&compact).unwrap(), compact, "idempotent");
    }
}

// --------------------------------------------------------------------------------------------------------
// Config.

const REFERENCE: &str = include_str!("../config/idemproxy.toml");

/// Every error has a non-empty path and reason, and prints as `path: reason`.
fn check_errors(e: &ConfigErrors) -> Result<(), TestCaseError> {
    prop_assert!(!e.0.is_empty(), "an error without problems");
    for p in &e.0 {
        prop_assert!(!p.path.trim().is_empty(), "problem without a path: {:?}", p);
        prop_assert!(
            !p.reason.trim().is_empty(),
            "problem without a reason: {:?}",
            p
        );
        prop_assert_eq!(p.to_string(), format!("{}: {}", p.path, p.reason));
    }
    Ok(())
}

/// Values that are wrong, odd or extreme for most keys.
fn odd_value() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("\"1x\"".to_string()),
        Just("-1".to_string()),
        Just("0".to_string()),
        Just("9223372036854775807".to_string()),
        Just("1e309".to_string()),
        Just("true".to_string()),
        Just("[]".to_string()),
        Just("[1, \"a\", {}]".to_string()),
        Just("{}".to_string()),
        Just("\"\"".to_string()),
        Just("\"0.0.0.0:99999\"".to_string()),
        Just("\"10QiB\"".to_string()),
        Just("\"18446744073709551616 KiB\"".to_string()),
        Just("\"999999999999999999h\"".to_string()),
        Just("\"\\u0000\"".to_string()),
        Just("\"/**/[\"".to_string()),
        Just("1979-05-27T07:32:00Z".to_string()),
        "\"[ -~]{0,40}\"".prop_map(|s| s.replace('\\', "/")),
        "-?[0-9]{1,25}".prop_map(|s| s),
    ]
}

/// One mutation of a line-based config text.
#[derive(Debug, Clone)]
enum Mutation {
    DeleteLine(prop::sample::Index),
    DuplicateLine(prop::sample::Index),
    SwapLines(prop::sample::Index, prop::sample::Index),
    ReplaceValue(prop::sample::Index, String),
    InsertBytes(prop::sample::Index, String),
    Truncate(prop::sample::Index),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        any::<prop::sample::Index>().prop_map(Mutation::DeleteLine),
        any::<prop::sample::Index>().prop_map(Mutation::DuplicateLine),
        (any::<prop::sample::Index>(), any::<prop::sample::Index>())
            .prop_map(|(a, b)| Mutation::SwapLines(a, b)),
        (any::<prop::sample::Index>(), odd_value()).prop_map(|(i, v)| Mutation::ReplaceValue(i, v)),
        (
            any::<prop::sample::Index>(),
            "[\\[\\]{}=\"'#.,a-z0-9 \n\t-]{1,12}"
        )
            .prop_map(|(i, s)| Mutation::InsertBytes(i, s)),
        any::<prop::sample::Index>().prop_map(Mutation::Truncate),
    ]
}

fn apply(text: &str, m: &Mutation) -> String {
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    if lines.is_empty() {
        lines.push(String::new());
    }
    let n = lines.len();
    match m {
        Mutation::DeleteLine(i) => {
            lines.remove(i.index(n));
        }
        Mutation::DuplicateLine(i) => {
            let l = lines[i.index(n)].clone();
            lines.insert(i.index(n), l);
        }
        Mutation::SwapLines(a, b) => lines.swap(a.index(n), b.index(n)),
        Mutation::ReplaceValue(i, v) => {
            // The i-th `key = value` line gets another value (comments dropped).
            let assigns: Vec<usize> = (0..n)
                .filter(|&j| !lines[j].trim_start().starts_with('#') && lines[j].contains('='))
                .collect();
            if !assigns.is_empty() {
                let j = assigns[i.index(assigns.len())];
                let key = lines[j].split('=').next().unwrap().trim().to_string();
                lines[j] = format!("{key} = {v}");
            }
        }
        Mutation::InsertBytes(i, s) => {
            let mut t = lines.join("\n");
            let mut at = i.index(t.len() + 1);
            while !t.is_char_boundary(at) {
                at -= 1;
            }
            t.insert_str(at, s);
            return t;
        }
        Mutation::Truncate(i) => {
            let t = lines.join("\n");
            let mut at = i.index(t.len() + 1);
            while !t.is_char_boundary(at) {
                at -= 1;
            }
            return t[..at].to_string();
        }
    }
    lines.join("\n")
}

/// Keys of the config, by section, and a valid base config with two routes.
const SECTION_KEYS: &[(&str, &[&str])] = &[
    (
        "server",
        &[
            "listen",
            "max_request_body",
            "max_response_body",
            "request_timeout",
            "header_read_timeout",
            "shutdown_grace",
            "idle_timeout",
            "max_connections",
            "trusted_proxies",
            "tls",
        ],
    ),
    (
        "upstream",
        &[
            "url",
            "connect_timeout",
            "timeout",
            "max_concurrency",
            "ca_file",
        ],
    ),
    (
        "store",
        &[
            "backend",
            "path",
            "sync",
            "cache_capacity",
            "sweep_interval",
            "max_size",
            "timeout",
            "redis_url",
            "key_prefix",
        ],
    ),
    ("admin", &["listen", "token"]),
];

const RULE_KEYS: &[&str] = &[
    "methods",
    "key",
    "header",
    "json_pointer",
    "required",
    "ttl",
    "lease",
    "on_in_flight",
    "wait_timeout",
    "scope_headers",
    "scope_cookies",
    "fingerprint_headers",
    "fingerprint",
    "release_statuses",
    "store_response",
    "duplicate_status",
    "on_store_error",
];

fn base_config(section: &str, route: Option<usize>, line: &str) -> String {
    let mut out = String::new();
    for s in ["server", "upstream", "store", "admin", "defaults"] {
        out.push_str(&format!("[{s}]\n"));
        if s == section && route.is_none() {
            out.push_str(line);
            out.push('\n');
        }
    }
    for i in 0..2 {
        out.push_str(&format!(
            "[[routes]]\nname = \"r{i}\"\npath = \"/r{i}/**\"\n"
        ));
        if route == Some(i) {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn config_parsing_of_arbitrary_text_never_panics(text in ".{0,400}") {
        if let Err(e) = Config::parse(&text, &Overrides::default()) {
            check_errors(&e)?;
        }
    }

    #[test]
    fn config_parsing_of_mutated_reference_config_never_panics(
        muts in proptest::collection::vec(mutation(), 1..6),
    ) {
        prop_assert!(Config::parse(REFERENCE, &Overrides::default()).is_ok());
        let mut text = REFERENCE.to_string();
        for m in &muts {
            text = apply(&text, m);
        }
        if let Err(e) = Config::parse(&text, &Overrides::default()) {
            check_errors(&e)?;
        }
    }

    /// A wrong value under any key is reported under that key's path (a route's as `routes[i].key`).
    #[test]
    fn a_wrong_value_is_reported_at_its_path(
        pick in any::<prop::sample::Index>(),
        in_route in proptest::option::of(0usize..2),
        value in prop_oneof![Just("{ bogus = 1 }".to_string()), Just("[[1], [2]]".to_string())],
    ) {
        prop_assert!(Config::parse(&base_config("", None, ""), &Overrides::default()).is_ok());
        let (section, route, key) = match in_route {
            Some(i) => ("routes", Some(i), RULE_KEYS[pick.index(RULE_KEYS.len())]),
            None => {
                let all: Vec<(&str, &str)> = SECTION_KEYS
                    .iter()
                    .flat_map(|(s, ks)| ks.iter().map(move |k| (*s, *k)))
                    .chain(RULE_KEYS.iter().map(|k| ("defaults", *k)))
                    .collect();
                let (s, k) = all[pick.index(all.len())];
                (s, None, k)
            }
        };
        let text = base_config(section, route, &format!("{key} = {value}"));
        let path = match route {
            Some(i) => format!("routes[{i}].{key}"),
            None => format!("{section}.{key}"),
        };
        match Config::parse(&text, &Overrides::default()) {
            Ok(_) => prop_assert!(false, "{} = {} accepted:\n{}", path, value, text),
            Err(e) => {
                check_errors(&e)?;
                prop_assert!(
                    e.0.iter().any(|p| p.path == path
                        || p.path.starts_with(&format!("{path}."))
                        || p.path.starts_with(&format!("{path}["))),
                    "no problem at {}: {}", path, e
                );
            }
        }
    }

    #[test]
    fn overrides_never_panic(
        listen in proptest::option::of(".{0,30}"),
        upstream in proptest::option::of(".{0,40}"),
        data_dir in proptest::option::of(".{0,20}"),
        admin_listen in proptest::option::of(".{0,30}"),
        admin_token in proptest::option::of(".{0,20}"),
        redis_url in proptest::option::of(".{0,40}"),
    ) {
        let o = Overrides {
            listen,
            upstream,
            data_dir,
            admin_listen,
            admin_token,
            redis_url,
        };
        if let Err(e) = Config::parse(REFERENCE, &o) {
            check_errors(&e)?;
        }
    }
}

/// A duration as a config file may spell it: in range, zero, tiny, huge, or beyond what a `u64` holds.
fn any_duration() -> impl Strategy<Value = String> {
    prop_oneof![
        (0u64..5_000_000_000).prop_map(|ms| format!("{ms}ms")),
        (0u64..u64::MAX).prop_map(|ns| format!("{ns}ns")),
        (0u64..1_000_000_000).prop_map(|y| format!("{y}y")),
        Just("0s".to_string()),
        Just("1ns".to_string()),
        Just("18446744073709551615s".to_string()),
        Just("99999999999999999999999d".to_string()),
    ]
}

/// A size or count as a config file may spell it.
fn any_size() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        (0u64..100_000).prop_map(|n| format!("\"{n}GiB\"")),
        (0u64..u64::MAX).prop_map(|n| format!("\"{n}TiB\"")),
        Just("0".to_string()),
    ]
}

proptest! {
    #![proptest_config(config())]

    /// Every duration, size and count: a value out of its bounds (zero included) fails with that key's
    /// path; a value that is accepted is within the bounds; nothing panics.
    #[test]
    fn every_duration_size_and_count_is_bounded(
        d_pick in any::<prop::sample::Index>(),
        d in any_duration(),
        n_pick in any::<prop::sample::Index>(),
        n in any_size(),
    ) {
        let (key, b) = bounds::DURATIONS[d_pick.index(bounds::DURATIONS.len())];
        let text = keyed_config(key, &format!("\"{d}\""));
        match Config::parse(&text, &Overrides::default()) {
            Ok(c) => {
                let got = duration_of(&c, key);
                prop_assert!(b.contains(got), "{} = {} accepted as {:?}", key, d, got);
            }
            Err(e) => {
                check_errors(&e)?;
                prop_assert!(e.0.iter().any(|p| p.path == key), "{} = {}: {}", key, d, e);
            }
        }
        let sizes: Vec<(&str, bounds::Bounds<u64>)> =
            bounds::SIZES.iter().chain(bounds::COUNTS.iter()).copied().collect();
        let (key, b) = sizes[n_pick.index(sizes.len())];
        let text = keyed_config(key, &n);
        match Config::parse(&text, &Overrides::default()) {
            Ok(c) => {
                let got = size_of(&c, key);
                prop_assert!(b.contains(got), "{} = {} accepted as {}", key, n, got);
            }
            Err(e) => {
                check_errors(&e)?;
                prop_assert!(e.0.iter().any(|p| p.path == key), "{} = {}: {}", key, n, e);
            }
        }
    }
}

/// A config that sets `key` (`section.name` or `server.tls.name`) to `value`.
fn keyed_config(key: &str, value: &str) -> String {
    let (section, name) = key.rsplit_once('.').unwrap();
    if section == "server.tls" {
        return format!(
            "[server]\ntls = {{ cert = \"c.pem\", key = \"k.pem\", {name} = {value} }}\n"
        );
    }
    format!("[{section}]\n{name} = {value}\n")
}

fn duration_of(c: &Config, key: &str) -> std::time::Duration {
    match key {
        "server.request_timeout" => c.server.request_timeout,
        "server.header_read_timeout" => c.server.header_read_timeout,
        "server.shutdown_grace" => c.server.shutdown_grace,
        "server.idle_timeout" => c.server.idle_timeout,
        "server.tls.handshake_timeout" => c.server.tls.as_ref().unwrap().handshake_timeout,
        "upstream.connect_timeout" => c.upstream.connect_timeout,
        "upstream.timeout" => c.upstream.timeout,
        "store.sweep_interval" => c.store.sweep_interval,
        "store.timeout" => c.store.timeout,
        "defaults.ttl" => c.defaults.ttl,
        "defaults.lease" => c.defaults.lease,
        "defaults.wait_timeout" => c.defaults.wait_timeout,
        other => panic!("unknown duration key {other}"),
    }
}

fn size_of(c: &Config, key: &str) -> u64 {
    match key {
        "server.max_request_body" => c.server.max_request_body,
        "server.max_response_body" => c.server.max_response_body,
        "store.cache_capacity" => c.store.cache_capacity,
        "store.max_size" => c.store.max_size,
        "server.max_connections" => c.server.max_connections as u64,
        "upstream.max_concurrency" => c.upstream.max_concurrency as u64,
        other => panic!("unknown size key {other}"),
    }
}

// --------------------------------------------------------------------------------------------------------
// Records.

fn fingerprint() -> impl Strategy<Value = Fingerprint> {
    any::<[u8; 32]>().prop_map(Fingerprint)
}

fn record() -> impl Strategy<Value = Record> {
    let in_flight = (any::<u64>(), any::<u64>(), any::<u64>(), fingerprint()).prop_map(
        |(token, created_ms, deadline_ms, fingerprint)| {
            Record::InFlight(InFlight {
                token,
                created_ms,
                deadline_ms,
                fingerprint,
            })
        },
    );
    let header = (
        ".{0,24}",
        proptest::collection::vec(any::<u8>(), 0..64).prop_map(Bytes::from),
    );
    let completed = (
        (any::<u64>(), any::<u64>(), fingerprint(), any::<u16>()),
        proptest::collection::vec(header, 0..12),
        proptest::collection::vec(any::<u8>(), 0..2048).prop_map(Bytes::from),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(
            |(
                (created_ms, expires_ms, fingerprint, status),
                headers,
                body,
                body_omitted,
                seen_only,
            )| {
                Record::Completed(Completed {
                    created_ms,
                    expires_ms,
                    fingerprint,
                    status,
                    headers,
                    body,
                    body_omitted,
                    seen_only,
                })
            },
        );
    prop_oneof![in_flight, completed]
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn records_roundtrip(rec in record()) {
        prop_assert_eq!(Record::decode(&rec.encode()), Ok(rec));
    }

    #[test]
    fn record_decoding_of_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let _ = Record::decode(&bytes);
    }

    /// Corrupted encodings — flipped bytes, truncation, trailing junk, and length fields pointing far
    /// beyond the record — are errors or other valid records, never panics or huge allocations.
    #[test]
    fn record_decoding_of_corrupted_records_never_panics(
        rec in record(),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..6),
        cut in proptest::option::of(any::<prop::sample::Index>()),
        tail in proptest::collection::vec(any::<u8>(), 0..8),
        huge_at in proptest::option::of(any::<prop::sample::Index>()),
    ) {
        let mut b = rec.encode();
        for (i, v) in &flips {
            let i = i.index(b.len());
            b[i] ^= *v;
        }
        if let Some(at) = huge_at {
            let i = at.index(b.len());
            for j in i..(i + 4).min(b.len()) {
                b[j] = 0xff;
            }
        }
        if let Some(c) = cut {
            b.truncate(c.index(b.len() + 1));
        }
        b.extend_from_slice(&tail);
        if let Ok(other) = Record::decode(&b) {
            // Whatever decodes is a record like any other: it survives its own roundtrip.
            prop_assert_eq!(Record::decode(&other.encode()), Ok(other));
        }
    }
}
