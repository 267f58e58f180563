//! Header hygiene: hop-by-hop headers stripped both ways, `X-Forwarded-*` added, and the header
//! allowlist of recorded responses.

use std::net::IpAddr;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, HeaderValue};

/// Headers that describe one connection, never forwarded (RFC 9110 §7.6.1, plus the legacy ones).
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// Removes hop-by-hop headers, every header named in `Connection`, and `Upgrade`.
pub fn strip_hop_by_hop(h: &mut HeaderMap) {
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        h.remove(n);
    }
    for n in &HOP_BY_HOP {
        h.remove(n);
    }
    h.remove(header::UPGRADE);
}

const XFF: HeaderName = HeaderName::from_static("x-forwarded-for");
const XF_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const XF_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");

/// Sets the forwarding headers (contract rule 16). `X-Forwarded-For` always gets the peer appended. From
/// a peer that is not a trusted proxy, `X-Forwarded-Proto` and `-Host` are the proxy's own view (client
/// values replaced) and `Forwarded` and `X-Real-IP` are removed: a client cannot forge where it came
/// from. From a trusted proxy, its headers are kept (`Forwarded` gets this hop appended).
pub fn add_forwarded(
    h: &mut HeaderMap,
    peer: IpAddr,
    trusted: bool,
    proto: &'static str,
    host: Option<HeaderValue>,
) {
    let peer = peer.to_canonical();
    let prior: Vec<&[u8]> = h.get_all(&XFF).iter().map(HeaderValue::as_bytes).collect();
    let mut xff = prior.join(&b", "[..]);
    if !xff.is_empty() {
        xff.extend_from_slice(b", ");
    }
    xff.extend_from_slice(peer.to_string().as_bytes());
    if let Ok(v) = HeaderValue::from_bytes(&xff) {
        h.insert(&XFF, v);
    }
    if trusted {
        if !h.contains_key(&XF_PROTO) {
            h.insert(XF_PROTO, HeaderValue::from_static(proto));
        }
        if let Some(host) = host.as_ref().filter(|_| !h.contains_key(&XF_HOST)) {
            h.insert(XF_HOST, host.clone());
        }
        if h.contains_key(header::FORWARDED) {
            let node = match peer {
                IpAddr::V4(a) => a.to_string(),
                IpAddr::V6(a) => format!("\"[{a}]\""),
            };
            let mut hop = format!("for={node};proto={proto}");
            if let Some(host) = host.as_ref().and_then(|v| v.to_str().ok()) {
                hop.push_str(&format!(";host=\"{}\"", host.replace(['"', '\\'], "")));
            }
            let prior: Vec<&[u8]> = h
                .get_all(header::FORWARDED)
                .iter()
                .map(HeaderValue::as_bytes)
                .collect();
            let mut value = prior.join(&b", "[..]);
            value.extend_from_slice(b", ");
            value.extend_from_slice(hop.as_bytes());
            if let Ok(v) = HeaderValue::from_bytes(&value) {
                h.insert(header::FORWARDED, v);
            }
        }
    } else {
        h.insert(XF_PROTO, HeaderValue::from_static(proto));
        match host {
            Some(host) => {
                h.insert(XF_HOST, host);
            }
            None => {
                h.remove(&XF_HOST);
            }
        }
        h.remove(header::FORWARDED);
        h.remove(&X_REAL_IP);
    }
}

/// The headers of an upstream response that are recorded: end-to-end ones, minus `Set-Cookie`
/// (a session must never be handed to whoever retries) and `Content-Length` (recomputed on replay).
pub fn recordable(h: &HeaderMap) -> Vec<(String, Bytes)> {
    h.iter()
        .filter(|(n, _)| **n != header::SET_COOKIE && **n != header::CONTENT_LENGTH)
        .map(|(n, v)| (n.as_str().to_owned(), Bytes::copy_from_slice(v.as_bytes())))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_listed_and_connection_named_headers() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, X-Custom"),
        );
        h.insert("x-custom", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(
            header::PROXY_AUTHORIZATION,
            HeaderValue::from_static("Basic x"),
        );
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("idempotency-key", HeaderValue::from_static("k"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("idempotency-key"));
    }

    fn client_headers() -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
        h.insert("x-forwarded-proto", HeaderValue::from_static("https"));
        h.insert(
            "x-forwarded-host",
            HeaderValue::from_static("forged.example"),
        );
        h.insert("x-real-ip", HeaderValue::from_static("10.9.9.9"));
        h.insert("forwarded", HeaderValue::from_static("for=10.9.9.9"));
        h
    }

    /// Rule 16, untrusted peer: the chain is extended, everything else is the proxy's own view.
    #[test]
    fn an_untrusted_peer_cannot_forge_forwarding_headers() {
        let mut h = client_headers();
        add_forwarded(
            &mut h,
            "127.0.0.1".parse().unwrap(),
            false,
            "http",
            Some(HeaderValue::from_static("api.example")),
        );
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 127.0.0.1");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "api.example");
        assert!(!h.contains_key("x-real-ip"));
        assert!(!h.contains_key("forwarded"));
    }

    /// Rule 16, trusted peer: its headers are kept and extended.
    #[test]
    fn a_trusted_proxy_keeps_its_headers() {
        let mut h = client_headers();
        add_forwarded(
            &mut h,
            "::ffff:10.1.2.3".parse().unwrap(),
            true,
            "http",
            Some(HeaderValue::from_static("api.example")),
        );
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 10.1.2.3");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-host"], "forged.example");
        assert_eq!(h["x-real-ip"], "10.9.9.9");
        assert_eq!(
            h["forwarded"],
            "for=10.9.9.9, for=10.1.2.3;proto=http;host=\"api.example\""
        );
    }

    #[test]
    fn set_cookie_is_never_recorded() {
        let mut h = HeaderMap::new();
        h.insert(header::SET_COOKIE, HeaderValue::from_static("sid=1"));
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("3"));
        let r = recordable(&h);
        assert_eq!(
            r,
            vec![("content-type".to_owned(), Bytes::from_static(b"text/plain"))]
        );
    }
}
