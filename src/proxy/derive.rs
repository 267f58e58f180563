//! The "read body" and "derive key" phases: a request under rules is buffered (413 over
//! `max_request_body`), then from the buffered request come its store key (scoped by route, headers
//! and cookies) and its fingerprint (contract rules 1–3, 11, 13).
//!
//! The fingerprint sees the normalized path and the query as sent. With `key = "fingerprint"` the
//! fingerprint *is* the key, so it sees the path as route matching does (case, a trailing `/`, `%2F`,
//! `;params` and an empty query folded): a spelling that reaches the same route reaches the same key,
//! and never runs twice.

use std::borrow::Cow;

use bytes::Bytes;
use http::request::Parts;

use http::Request;

use super::{error::ProxyError, rules::RouteRules, Live};
use crate::body::{buffer_request, BufferError, RequestBody};
use crate::key::{
    fingerprint, json_pointer_key, path::key_form, Fingerprint, FingerprintMode, IdempotencyKey,
    KeySource, StoreKey,
};

/// A request under rules, with its key derived, before the claim.
pub(super) struct Keyed {
    pub(super) key: StoreKey,
    /// The client key as logs may show it (rule 9).
    pub(super) redacted: String,
    /// With `key = "fingerprint"`, the key the proxy derived (the request's SHA-256, hex): answers
    /// carry it, so an operator can look the key up or purge it in the admin API.
    pub(super) derived: Option<http::HeaderValue>,
    pub(super) fp: Fingerprint,
    pub(super) parts: Parts,
    pub(super) body: Bytes,
}

/// What the request's key turned out to be.
pub(super) enum Derived {
    /// A key: the request goes on to the claim.
    Keyed(Keyed),
    /// No key on a route where it is optional: forwarded as is, every time (rule 1).
    Unkeyed(Parts, Bytes),
}

/// Derives the key and fingerprint of `parts` + `body` on `route` (`normal_path`: the normalized path).
pub(super) fn derive_key(
    route: &RouteRules,
    parts: Parts,
    body: Bytes,
    normal_path: &str,
) -> Result<Derived, ProxyError> {
    let rule = &route.rule;
    let pq = if rule.key == KeySource::Fingerprint {
        let p = key_form(normal_path);
        match parts.uri.query().filter(|q| !q.is_empty()) {
            None => Cow::Owned(p),
            Some(q) => Cow::Owned(format!("{p}?{q}")),
        }
    } else {
        match parts.uri.query() {
            None => Cow::Borrowed(normal_path),
            Some(q) => Cow::Owned(format!("{normal_path}?{q}")),
        }
    };
    let fp_of = |mode| {
        fingerprint(
            mode,
            &parts.method,
            &pq,
            &rule.fingerprint_headers,
            &parts.headers,
            &body,
        )
    };
    // With `key = "fingerprint"` the key's hash is usually the fingerprint too: hash once.
    let mut key_fp = None;
    let client_key = match &rule.key {
        KeySource::Header => IdempotencyKey::from_headers(&parts.headers, &rule.header)?,
        KeySource::Json(ptr) => json_pointer_key(&body, ptr)?
            .map(|k| IdempotencyKey::new(&k))
            .transpose()?,
        KeySource::Fingerprint => {
            // The key is the request itself; with `fingerprint = "none"` the raw request is hashed.
            let whole = fp_of(match rule.fingerprint {
                FingerprintMode::None => FingerprintMode::Raw,
                m => m,
            });
            if rule.fingerprint != FingerprintMode::None {
                key_fp = Some(whole);
            }
            Some(IdempotencyKey::new(&whole.to_hex())?)
        }
    };
    let Some(client_key) = client_key else {
        if rule.required {
            return Err(ProxyError::MissingKey);
        }
        return Ok(Derived::Unkeyed(parts, body));
    };
    // Hashed only once a key is known (the body may be up to `max_request_body`).
    let fp = key_fp.unwrap_or_else(|| fp_of(rule.fingerprint));
    Ok(Derived::Keyed(Keyed {
        key: StoreKey::derive_scoped(
            &route.name,
            &client_key,
            &rule.scope_headers,
            &rule.scope_cookies,
            &parts.headers,
        ),
        redacted: client_key.redacted().to_owned(),
        derived: (rule.key == KeySource::Fingerprint)
            .then(|| http::HeaderValue::from_str(client_key.as_str()).ok())
            .flatten(),
        fp,
        parts,
        body,
    }))
}

/// Phase 3a: buffers the body of a request under rules (413 over `max_request_body`).
pub(super) async fn read_body<B: RequestBody>(
    live: &Live,
    req: Request<B>,
) -> Result<(Parts, Bytes), ProxyError> {
    let (parts, body) = req.into_parts();
    let limit = live.limits.max_request_body;
    match buffer_request(&parts.headers, body, limit).await {
        Ok(b) => Ok((parts, b)),
        Err(BufferError::TooLarge) => Err(ProxyError::BodyTooLarge { limit }),
        Err(BufferError::Read(e)) => Err(ProxyError::BadRequestBody(e)),
    }
}
