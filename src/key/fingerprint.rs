//! Request fingerprints: what makes two requests under one key "the same request".
//!
//! `SHA-256(method, path and query, fingerprint_headers (name, values), body)`, every field
//! length-prefixed. With `fingerprint = "json"` the body enters as canonical JSON (sorted keys, no
//! whitespace), so a client that re-serialises the same object is not refused; a body that is not JSON
//! enters as raw bytes. With `fingerprint = "none"` every request matches.

use http::{HeaderMap, HeaderName, Method};
use sha2::{Digest, Sha256};

use super::{canonical_json, put, FingerprintMode};

/// A request digest; all zeros means "not checked" (`fingerprint = "none"`).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// The fingerprint of `fingerprint = "none"`: matches everything.
    pub const NONE: Fingerprint = Fingerprint([0; 32]);

    /// Whether a retry with fingerprint `other` is the same request as the one recorded with `self`.
    pub fn matches(&self, other: &Fingerprint) -> bool {
        *self == Self::NONE || *other == Self::NONE || self == other
    }

    /// Lowercase hex.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl std::fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Fingerprint({})", hex::encode(&self.0[..6]))
    }
}

/// Computes a request fingerprint.
pub fn fingerprint(
    mode: FingerprintMode,
    method: &Method,
    path_and_query: &str,
    header_names: &[HeaderName],
    headers: &HeaderMap,
    body: &[u8],
) -> Fingerprint {
    if mode == FingerprintMode::None {
        return Fingerprint::NONE;
    }
    let mut h = Sha256::new();
    h.update(b"idemproxy/fp/v1\0");
    put(&mut h, method.as_str().as_bytes());
    put(&mut h, path_and_query.as_bytes());
    for name in header_names {
        put(&mut h, name.as_str().as_bytes());
        let values: Vec<_> = headers.get_all(name).iter().collect();
        h.update((values.len() as u64).to_be_bytes());
        for v in values {
            put(&mut h, v.as_bytes());
        }
    }
    let canonical = match mode {
        FingerprintMode::Json => canonical_json(body),
        _ => None,
    };
    put(&mut h, canonical.as_deref().unwrap_or(body));
    let out: [u8; 32] = h.finalize().into();
    // Never collide with the all-zero "not checked" marker.
    if out == [0; 32] {
        return Fingerprint([1; 32]);
    }
    Fingerprint(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn fp(mode: FingerprintMode, ct: &'static str, body: &[u8]) -> Fingerprint {
        let mut h = HeaderMap::new();
        h.insert(http::header::CONTENT_TYPE, HeaderValue::from_static(ct));
        fingerprint(
            mode,
            &Method::POST,
            "/pay?x=1",
            &[http::header::CONTENT_TYPE],
            &h,
            body,
        )
    }

    #[test]
    fn body_and_content_type_matter() {
        let a = fp(FingerprintMode::Raw, "application/json", b"{\"a\":1}");
        assert_eq!(
            a,
            fp(FingerprintMode::Raw, "application/json", b"{\"a\":1}")
        );
        assert_ne!(
            a,
            fp(FingerprintMode::Raw, "application/json", b"{\"a\":2}")
        );
        assert_ne!(a, fp(FingerprintMode::Raw, "text/plain", b"{\"a\":1}"));
        assert!(!a.matches(&fp(FingerprintMode::Raw, "text/plain", b"{\"a\":1}")));
    }

    #[test]
    fn json_mode_ignores_key_order_and_whitespace() {
        let a = fp(
            FingerprintMode::Json,
            "application/json",
            b"{\"a\":1,\"b\":[1,2]}",
        );
        let b = fp(
            FingerprintMode::Json,
            "application/json",
            b"{ \"b\": [1, 2],\n \"a\": 1 }",
        );
        assert_eq!(a, b);
        assert_ne!(
            fp(
                FingerprintMode::Raw,
                "application/json",
                b"{\"a\":1,\"b\":[1,2]}"
            ),
            fp(
                FingerprintMode::Raw,
                "application/json",
                b"{ \"b\": [1, 2],\n \"a\": 1 }"
            )
        );
    }

    #[test]
    fn none_matches_everything() {
        let n = fp(FingerprintMode::None, "a/b", b"x");
        assert_eq!(n, Fingerprint::NONE);
        assert!(n.matches(&fp(FingerprintMode::Raw, "a/b", b"y")));
    }
}
