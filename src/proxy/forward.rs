//! The edge between a request and the upstream, shared by every path that forwards (claimed,
//! unprotected, pass-through, tunnels): the request head rewritten for the upstream (hop-by-hop headers
//! out, forwarding headers per rule 16, `Host` and URI pointed at the upstream), the response head
//! cleaned, and upstream errors mapped to the proxy's own.

use std::net::SocketAddr;

use http::{header, request::Parts, uri::Scheme, HeaderValue, Response};

use super::{
    error::ProxyError,
    headers::{add_forwarded, strip_hop_by_hop},
    limit::Slot,
    tagged, Live,
};
use crate::body::{stream, Body};
use crate::metrics::Outcome;
use crate::upstream::{ResponseBody, UpstreamError};

/// Rewrites a client request's head for the upstream: hop-by-hop headers out, `X-Forwarded-*` in,
/// `Host` and the URI pointed at the upstream (a client cannot redirect the proxy), HTTP/1.1.
pub(super) fn upstream_request(
    live: &Live,
    parts: &mut Parts,
    peer: SocketAddr,
) -> Result<(), ProxyError> {
    let up = &live.upstream;
    let host = parts.headers.get(header::HOST).cloned().or_else(|| {
        parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    });
    strip_hop_by_hop(&mut parts.headers);
    // The listener marks each request with the scheme the client connected with.
    let proto = if parts.extensions.get::<Scheme>() == Some(&Scheme::HTTPS) {
        "https"
    } else {
        "http"
    };
    let ip = peer.ip().to_canonical();
    let trusted = live.trusted_proxies.iter().any(|n| n.contains(&ip));
    add_forwarded(&mut parts.headers, peer.ip(), trusted, proto, host);
    parts.headers.insert(header::HOST, up.host());
    parts.uri = up
        .uri_for(parts.uri.path_and_query())
        .map_err(|e| ProxyError::BadRequestBody(Box::new(e)))?;
    // HTTP/1.1 whatever the client spoke: the upstream client picks h2 itself when ALPN offers it.
    parts.version = http::Version::HTTP_11;
    Ok(())
}

pub(super) fn upstream_response(resp: Response<ResponseBody>, slot: Slot) -> Response<Body> {
    let (mut head, body) = resp.into_parts();
    strip_hop_by_hop(&mut head.headers);
    tagged(
        Response::from_parts(head, slot.hold(stream(body))),
        Outcome::Passthrough,
    )
}

pub(super) fn into_proxy_error(e: UpstreamError) -> ProxyError {
    match e {
        UpstreamError::Connect(e) => ProxyError::UpstreamUnreachable(e),
        UpstreamError::Timeout => ProxyError::UpstreamTimeout,
        UpstreamError::Failed(e) => ProxyError::UpstreamFailed(e),
    }
}
