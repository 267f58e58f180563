//! The edge between a request and the upstream, and the paths that forward without a claim.
//!
//! Every path that forwards (claimed, unprotected, pass-through, tunnels) goes through
//! [`Live::send`]: the head rewritten for the upstream (hop-by-hop headers out, forwarding headers per
//! rule 16, HTTP/1.1), then handed to the [`Forward`](crate::upstream::Forward) seam, which points it at
//! the upstream (`Host`, URI). Responses get their hop-by-hop headers stripped, and upstream errors
//! become the proxy's own in [`into_proxy_error`].

use std::{net::SocketAddr, time::Duration};

use bytes::Bytes;
use http::{header, request::Parts, uri::Scheme, HeaderName, HeaderValue, Request, Response};
use tracing::{field::Empty, Instrument};

use super::{
    error::ProxyError,
    headers::{add_forwarded, strip_hop_by_hop},
    limit::Slot,
    progress::{Phase, Progress},
    upgrade, Answer, Live,
};
use crate::body::{full, stream, Body, RequestBody};
use crate::config::{Rule, StoreErrorMode};
use crate::metrics::Outcome;
use crate::store::StoreError;
use crate::upstream::{ResponseBody, UpstreamError};

/// Marks responses forwarded without protection because the store failed (`on_store_error = "pass"`).
const DEGRADED: HeaderName = HeaderName::from_static("idempotency-degraded");

impl Live {
    /// Sends a client request to the upstream: its head rewritten for the upstream, then at most
    /// `timeout` for the response head.
    pub(super) async fn send(
        &self,
        mut parts: Parts,
        body: Body,
        peer: SocketAddr,
        timeout: Duration,
    ) -> Result<Response<ResponseBody>, UpstreamError> {
        self.prepare(&mut parts, peer);
        let span = tracing::debug_span!(
            "upstream",
            method = %parts.method,
            http.response.status_code = Empty,
            otel.kind = "client",
        );
        crate::telemetry::inject(&span, &mut parts.headers);
        let sending = self
            .upstream
            .send(Request::from_parts(parts, body), timeout);
        let resp = sending.instrument(span.clone()).await;
        if let Ok(r) = &resp {
            span.record("http.response.status_code", r.status().as_u16());
        }
        resp
    }

    /// Rewrites a client request's head for the upstream: hop-by-hop headers out, `X-Forwarded-*` in,
    /// HTTP/1.1 (the upstream client picks h2 itself when ALPN offers it). The forwarder sets `Host`
    /// and the URI (a client cannot redirect the proxy).
    pub(super) fn prepare(&self, parts: &mut Parts, peer: SocketAddr) {
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
        let trusted = self.trusted_proxies.iter().any(|n| n.contains(&ip));
        add_forwarded(&mut parts.headers, peer.ip(), trusted, proto, host);
        parts.version = http::Version::HTTP_11;
    }

    /// Pass-through: body streamed both ways, no limit, nothing stored.
    pub(super) async fn pass_through<B: RequestBody>(
        &self,
        req: Request<B>,
        peer: SocketAddr,
        progress: &Progress,
    ) -> Result<Answer, ProxyError> {
        if let Some(protocol) = upgrade::requested(req.headers()) {
            progress.set(Phase::Upstream);
            return self.tunnel(req, peer, protocol).await;
        }
        let slot = self.limit.try_take()?;
        let (parts, body) = req.into_parts();
        let body = progress.stream_request(body);
        match self.send(parts, body, peer, self.upstream_timeout).await {
            Ok(resp) => Ok((upstream_response(resp, slot), Outcome::Passthrough)),
            // The upstream waited for a body the client never finished sending: the client's doing.
            Err(UpstreamError::Timeout) if progress.get() == Phase::Body => {
                Err(ProxyError::RequestTimeout(self.upstream_timeout))
            }
            Err(e) => Err(into_proxy_error(e)),
        }
    }

    /// Forwards a buffered request without a claim (no key on an optional route, or degraded mode).
    pub(super) async fn forward_unprotected(
        &self,
        parts: Parts,
        body: Bytes,
        peer: SocketAddr,
        degraded: bool,
    ) -> Result<Answer, ProxyError> {
        let slot = self.limit.try_take()?;
        let resp = self
            .send(parts, full(body), peer, self.upstream_timeout)
            .await
            .map_err(into_proxy_error)?;
        let mut resp = upstream_response(resp, slot);
        if degraded {
            resp.headers_mut()
                .insert(DEGRADED, HeaderValue::from_static("true"));
        }
        Ok((resp, Outcome::Passthrough))
    }

    /// The store failed before anything was claimed: refuse (503) or forward unprotected.
    pub(super) async fn store_failed(
        &self,
        e: StoreError,
        rule: &Rule,
        parts: Parts,
        body: Bytes,
        peer: SocketAddr,
    ) -> Result<Answer, ProxyError> {
        match rule.on_store_error {
            StoreErrorMode::Reject => Err(ProxyError::StoreUnavailable(e)),
            StoreErrorMode::Pass => {
                tracing::warn!(error = %e, "store failed; forwarding without idempotency protection");
                self.forward_unprotected(parts, body, peer, true).await
            }
        }
    }
}

/// An upstream response as the client gets it when nothing is recorded: hop-by-hop headers out, the
/// body streamed, the upstream slot held until it ends.
pub(super) fn upstream_response(resp: Response<ResponseBody>, slot: Slot) -> Response<Body> {
    let (mut head, body) = resp.into_parts();
    strip_hop_by_hop(&mut head.headers);
    Response::from_parts(head, slot.hold(stream(body)))
}

/// What an upstream failure means for the client.
pub(super) fn into_proxy_error(e: UpstreamError) -> ProxyError {
    match e {
        UpstreamError::Connect(e) => ProxyError::UpstreamUnreachable(e),
        UpstreamError::Timeout => ProxyError::UpstreamTimeout,
        UpstreamError::Failed(e) => ProxyError::UpstreamFailed(e),
    }
}
