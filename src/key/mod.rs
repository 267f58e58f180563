//! Keys: the client's idempotency key, the scoped store key derived from it, and request fingerprints.
//!
//! Invariants:
//! - An [`IdempotencyKey`] is 1..=255 bytes of visible ASCII (0x21..=0x7E); an RFC 8941 sf-string
//!   (`"abc"`) is unwrapped first, so `"abc"` and `abc` are the same key.
//! - A [`StoreKey`] is two SHA-256 digests: one of (route name, client key), one of the scope header
//!   values. Raw keys and credentials never reach the store; tenants never share a record; and every
//!   record of one (route, key) shares a prefix, so the admin API can list them across scopes.
//!
//! The module depends on no other of this crate: the config's `key` and `fingerprint` settings are
//! this module's own [`KeySource`] and [`FingerprintMode`].

mod fingerprint;
mod json;
pub mod path;

use std::fmt;

use http::{HeaderMap, HeaderName};
use sha2::{Digest, Sha256};

pub use fingerprint::{fingerprint, Fingerprint};
pub use json::{canonical_json, json_pointer_key, JsonKeyError};

/// Longest client key accepted, in bytes.
pub const MAX_KEY_LEN: usize = 255;

/// Where a route takes its keys from (`key = …` in the config).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// The key header.
    Header,
    /// SHA-256 of the request (method, path, fingerprint headers, body).
    Fingerprint,
    /// A field of a JSON body, by RFC 6901 pointer.
    Json(String),
}

/// What a fingerprint covers of the body (`fingerprint = …` in the config).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FingerprintMode {
    /// Body bytes as sent.
    Raw,
    /// Canonical JSON (key order and whitespace ignored); raw bytes when the body is not JSON.
    Json,
    /// No mismatch check.
    None,
}

/// A validated client key.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct IdempotencyKey(String);

/// Why a client key was refused (always a 400 `invalid-key`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// Zero bytes (or `""`).
    #[error("the key is empty")]
    Empty,
    /// More than 255 bytes.
    #[error("the key is longer than {MAX_KEY_LEN} bytes")]
    TooLong,
    /// A byte outside visible ASCII.
    #[error("the key may contain only visible ASCII characters (0x21-0x7E)")]
    InvalidChar,
    /// A quoted key that is not a well-formed sf-string.
    #[error("the key is not a valid structured-field string")]
    BadSfString,
    /// The key header was sent more than once.
    #[error("the key header was sent more than once")]
    Repeated,
}

impl IdempotencyKey {
    /// Validates a key given as plain text (e.g. taken from a JSON body).
    pub fn new(text: &str) -> Result<Self, KeyError> {
        if text.is_empty() {
            return Err(KeyError::Empty);
        }
        if text.len() > MAX_KEY_LEN {
            return Err(KeyError::TooLong);
        }
        if !text.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
            return Err(KeyError::InvalidChar);
        }
        Ok(Self(text.to_owned()))
    }

    /// Parses a header value: a bare token or an RFC 8941 sf-string (`"abc"`, with `\"` and `\\`).
    pub fn from_header(value: &[u8]) -> Result<Self, KeyError> {
        let v = trim_ows(value);
        if v.first() != Some(&b'"') {
            let text = std::str::from_utf8(v).map_err(|_| KeyError::InvalidChar)?;
            return Self::new(text);
        }
        // The value as one RFC 8941 item (sfv): a string, without parameters.
        let item: sfv::Item = sfv::Parser::new(v)
            .with_version(sfv::Version::Rfc8941)
            .parse()
            .map_err(|_| {
                if v.iter().any(|c| !(0x20..=0x7e).contains(c)) {
                    KeyError::InvalidChar
                } else {
                    KeyError::BadSfString
                }
            })?;
        match (item.bare_item.as_string(), item.params.is_empty()) {
            (Some(text), true) => Self::new(text.as_str()),
            _ => Err(KeyError::BadSfString),
        }
    }

    /// Reads the key header of a request: `Ok(None)` when absent.
    pub fn from_headers(headers: &HeaderMap, name: &HeaderName) -> Result<Option<Self>, KeyError> {
        let mut values = headers.get_all(name).iter();
        let Some(first) = values.next() else {
            return Ok(None);
        };
        if values.next().is_some() {
            return Err(KeyError::Repeated);
        }
        Self::from_header(first.as_bytes()).map(Some)
    }

    /// The key text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// At most the first 8 characters, for logs: keys are never logged whole.
    pub fn redacted(&self) -> &str {
        redact(&self.0)
    }
}

/// At most the first 8 characters of a key (all ASCII), for logs.
pub fn redact(key: &str) -> &str {
    key.get(..8).unwrap_or(key)
}

impl fmt::Debug for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "IdempotencyKey({}…)", self.redacted())
    }
}

fn trim_ows(v: &[u8]) -> &[u8] {
    let start = v
        .iter()
        .position(|b| !matches!(b, b' ' | b'\t'))
        .unwrap_or(v.len());
    let end = v
        .iter()
        .rposition(|b| !matches!(b, b' ' | b'\t'))
        .map_or(start, |e| e + 1);
    &v[start..end]
}

/// Where a record lives in the store: `SHA-256(route, key) ‖ SHA-256(scope header values)`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StoreKey {
    /// Digest of the route name and the client key (shared by every scope).
    pub id: [u8; 32],
    /// Digest of the scope header values (tenant).
    pub scope: [u8; 32],
}

impl StoreKey {
    /// Length of [`StoreKey::to_bytes`].
    pub const LEN: usize = 64;

    /// Derives the store key of a client key on a route, scoped by the given headers' values.
    pub fn derive(
        route: &str,
        key: &IdempotencyKey,
        scope_headers: &[HeaderName],
        headers: &HeaderMap,
    ) -> Self {
        Self::derive_scoped(route, key, scope_headers, &[], headers)
    }

    /// [`derive`](Self::derive), scoped by cookie values too (`scope_cookies`: for clients that
    /// authenticate with a session cookie rather than an `Authorization` header).
    pub fn derive_scoped(
        route: &str,
        key: &IdempotencyKey,
        scope_headers: &[HeaderName],
        scope_cookies: &[String],
        headers: &HeaderMap,
    ) -> Self {
        Self {
            id: Self::id_of(route, key.as_str()),
            scope: scope_digest(scope_headers, scope_cookies, headers),
        }
    }

    /// The digest shared by every scope of (route, key).
    pub fn id_of(route: &str, key: &str) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(b"idemproxy/key/v1\0");
        put(&mut h, route.as_bytes());
        put(&mut h, key.as_bytes());
        h.finalize().into()
    }

    /// The 64 bytes stored on disk.
    pub fn to_bytes(&self) -> [u8; 64] {
        let mut out = [0u8; 64];
        out[..32].copy_from_slice(&self.id);
        out[32..].copy_from_slice(&self.scope);
        out
    }

    /// Inverse of [`StoreKey::to_bytes`].
    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        if b.len() != Self::LEN {
            return None;
        }
        let mut k = Self {
            id: [0; 32],
            scope: [0; 32],
        };
        k.id.copy_from_slice(&b[..32]);
        k.scope.copy_from_slice(&b[32..]);
        Some(k)
    }

    /// A short hex prefix for logs.
    pub fn short(&self) -> String {
        hex::encode(&self.id[..4])
    }
}

impl fmt::Debug for StoreKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "StoreKey({}/{})",
            hex::encode(&self.id[..4]),
            hex::encode(&self.scope[..4])
        )
    }
}

fn scope_digest(names: &[HeaderName], cookies: &[String], headers: &HeaderMap) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"idemproxy/scope/v1\0");
    for name in names {
        put(&mut h, name.as_str().as_bytes());
        let values: Vec<_> = headers.get_all(name).iter().collect();
        h.update((values.len() as u64).to_be_bytes());
        for v in values {
            put(&mut h, v.as_bytes());
        }
    }
    // Without scope cookies the digest is what it always was (records made before stay found).
    if !cookies.is_empty() {
        h.update(b"\0cookies\0");
        for name in cookies {
            put(&mut h, name.as_bytes());
            let values: Vec<&[u8]> = cookie_values(headers, name).collect();
            h.update((values.len() as u64).to_be_bytes());
            for v in values {
                put(&mut h, v);
            }
        }
    }
    h.finalize().into()
}

/// The values of cookie `name` in every `Cookie` header, in order (RFC 6265 §5.4: `a=1; b=2`).
fn cookie_values<'a>(headers: &'a HeaderMap, name: &'a str) -> impl Iterator<Item = &'a [u8]> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b';'))
        .filter_map(move |pair| {
            let pair = trim_ows(pair);
            let eq = pair.iter().position(|&b| b == b'=')?;
            (trim_ows(&pair[..eq]) == name.as_bytes()).then(|| trim_ows(&pair[eq + 1..]))
        })
}

/// Feeds a length-prefixed field, so that field boundaries are unambiguous.
pub(crate) fn put(h: &mut Sha256, bytes: &[u8]) {
    h.update((bytes.len() as u64).to_be_bytes());
    h.update(bytes);
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn scope_cookies_separate_sessions() {
        let key = IdempotencyKey::new("k").unwrap();
        let cookies = vec!["session".to_owned()];
        let with = |cookie: &str| {
            let mut h = HeaderMap::new();
            h.insert(http::header::COOKIE, HeaderValue::from_str(cookie).unwrap());
            StoreKey::derive_scoped("r", &key, &[], &cookies, &h)
        };
        assert_ne!(with("session=alice"), with("session=bob"));
        assert_eq!(
            with("theme=dark; session=alice"),
            with("session=alice;theme=light")
        );
        assert_ne!(with("session=alice"), with("other=alice"));
        // No scope cookies: the digest of earlier versions.
        let h = HeaderMap::new();
        assert_eq!(
            StoreKey::derive_scoped("r", &key, &[], &[], &h),
            StoreKey::derive("r", &key, &[], &h)
        );
        assert_ne!(
            StoreKey::derive_scoped("r", &key, &[], &cookies, &h),
            StoreKey::derive("r", &key, &[], &h)
        );
    }

    #[test]
    fn bare_and_quoted_keys_are_the_same() {
        assert_eq!(IdempotencyKey::from_header(b"abc").unwrap().as_str(), "abc");
        assert_eq!(
            IdempotencyKey::from_header(b"\"abc\"").unwrap().as_str(),
            "abc"
        );
        assert_eq!(
            IdempotencyKey::from_header(b"  abc ").unwrap().as_str(),
            "abc"
        );
        assert_eq!(
            IdempotencyKey::from_header(br#""a\"b""#).unwrap().as_str(),
            "a\"b"
        );
    }

    #[test]
    fn invalid_keys() {
        assert_eq!(IdempotencyKey::from_header(b""), Err(KeyError::Empty));
        assert_eq!(IdempotencyKey::from_header(b"\"\""), Err(KeyError::Empty));
        assert_eq!(
            IdempotencyKey::from_header(b"a b"),
            Err(KeyError::InvalidChar)
        );
        assert_eq!(
            IdempotencyKey::from_header(b"\"a b\""),
            Err(KeyError::InvalidChar)
        );
        assert_eq!(
            IdempotencyKey::from_header(b"a\tb"),
            Err(KeyError::InvalidChar)
        );
        assert_eq!(
            IdempotencyKey::from_header("é".as_bytes()),
            Err(KeyError::InvalidChar)
        );
        assert_eq!(
            IdempotencyKey::from_header(b"\"abc"),
            Err(KeyError::BadSfString)
        );
        assert_eq!(
            IdempotencyKey::from_header(b"\"abc\"x"),
            Err(KeyError::BadSfString)
        );
        assert_eq!(
            IdempotencyKey::from_header(br#""a\b""#),
            Err(KeyError::BadSfString)
        );
        assert_eq!(
            IdempotencyKey::from_header(br#""abc";p=1"#),
            Err(KeyError::BadSfString),
            "an sf-string with parameters"
        );
        assert_eq!(
            IdempotencyKey::from_header(&[b'a'; 256]),
            Err(KeyError::TooLong)
        );
        assert!(IdempotencyKey::from_header(&[b'a'; 255]).is_ok());
    }

    #[test]
    fn repeated_header_is_refused() {
        let mut h = HeaderMap::new();
        let name = HeaderName::from_static("idempotency-key");
        assert_eq!(IdempotencyKey::from_headers(&h, &name), Ok(None));
        h.append(&name, HeaderValue::from_static("a"));
        h.append(&name, HeaderValue::from_static("b"));
        assert_eq!(
            IdempotencyKey::from_headers(&h, &name),
            Err(KeyError::Repeated)
        );
    }

    #[test]
    fn scope_separates_tenants_and_routes() {
        let key = IdempotencyKey::new("k1").unwrap();
        let auth = [http::header::AUTHORIZATION];
        let mut a = HeaderMap::new();
        a.insert(
            http::header::AUTHORIZATION,
            HeaderValue::from_static("Bearer a"),
        );
        let mut b = HeaderMap::new();
        b.insert(
            http::header::AUTHORIZATION,
            HeaderValue::from_static("Bearer b"),
        );
        let ka = StoreKey::derive("r", &key, &auth, &a);
        let kb = StoreKey::derive("r", &key, &auth, &b);
        assert_eq!(ka.id, kb.id);
        assert_ne!(ka.scope, kb.scope);
        assert_ne!(ka, StoreKey::derive("other", &key, &auth, &a));
        assert_eq!(StoreKey::from_bytes(&ka.to_bytes()), Some(ka));
        // Golden vector: the on-disk layout must not change silently.
        assert_eq!(hex::encode(StoreKey::id_of("default", "k1")), GOLDEN_ID);
    }

    const GOLDEN_ID: &str = "edf55c5981b048e6f832cec93e07f4244ded6d5f50908625b0bce6daf71c7bf2";

    #[test]
    fn redaction_keeps_eight_chars() {
        assert_eq!(redact("0123456789"), "01234567");
        assert_eq!(redact("abc"), "abc");
    }
}
