//! `[defaults]` and `[[routes]]`: a rule section as written, and how a route inherits from `[defaults]`.

use std::time::Duration;

use http::{HeaderName, Method, StatusCode};

use super::values::{header_name, opt_duration};
use crate::config::{
    bounds,
    defaults::*,
    file::{Problems, Section},
    InFlightMode, Rule, StoreErrorMode,
};
use crate::key::{FingerprintMode, KeySource};

/// A rule section as written: `None` where the file says nothing (so routes inherit).
#[derive(Debug, Default)]
pub(super) struct PartialRule {
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
    scope_cookies: Option<Vec<String>>,
    fingerprint_headers: Option<Vec<HeaderName>>,
    fingerprint: Option<FingerprintMode>,
    release_statuses: Option<Vec<StatusCode>>,
    store_response: Option<bool>,
    duplicate_status: Option<StatusCode>,
    on_store_error: Option<StoreErrorMode>,
}

pub(super) fn builtin_rule() -> Rule {
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
        scope_cookies: Vec::new(),
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

pub(super) fn read_rule(s: &mut Section, p: &mut Problems, is_route: bool) -> PartialRule {
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
    let ttl = opt_duration(s, "ttl", bounds::TTL, p);
    let lease = opt_duration(s, "lease", bounds::LEASE, p);
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
    let wait_timeout = opt_duration(s, "wait_timeout", bounds::WAIT_TIMEOUT, p);
    let scope_headers = header_list(s, "scope_headers", p);
    let scope_cookies = cookie_list(s, "scope_cookies", p);
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
        scope_cookies,
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
    pub(super) fn merge_onto(self, base: &Rule, path: &str, p: &mut Problems) -> Rule {
        let inherited_pointer = match &base.key {
            KeySource::Json(ptr) => Some(ptr.clone()),
            _ => None,
        };
        let pointer_given = self.json_pointer.is_some();
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
        if pointer_given && !matches!(key, KeySource::Json(_)) {
            p.warn(
                format!("{path}.json_pointer"),
                "ignored: the key does not come from the JSON body (set key = \"json\" to use it)",
            );
        }
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
            scope_cookies: self
                .scope_cookies
                .unwrap_or_else(|| base.scope_cookies.clone()),
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

/// Cookie names (RFC 6265 tokens: visible ASCII without separators).
fn cookie_list(s: &mut Section, key: &str, p: &mut Problems) -> Option<Vec<String>> {
    let list = s.take_str_list(key, p)?;
    let mut ok = true;
    for (i, c) in list.iter().enumerate() {
        let token = !c.is_empty()
            && c.bytes()
                .all(|b| (0x21..=0x7e).contains(&b) && !b"()<>@,;:\\\"/[]?={}".contains(&b));
        if !token {
            ok = false;
            p.push(
                format!("{}[{i}]", s.path_of(key)),
                format!("invalid cookie name \"{c}\""),
            );
        }
    }
    ok.then_some(list)
}

fn status(n: i64) -> Option<StatusCode> {
    u16::try_from(n)
        .ok()
        .filter(|n| (100..=599).contains(n))
        .and_then(|n| StatusCode::from_u16(n).ok())
}
