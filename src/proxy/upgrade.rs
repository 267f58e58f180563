//! Protocol upgrades (WebSocket and friends) on pass-through traffic: a tunnel.
//!
//! An HTTP/1.1 request with `Connection: upgrade` and an `Upgrade` header that is *not* under
//! idempotency rules (e.g. the `GET` that opens a WebSocket) is forwarded over an HTTP/1.1 upstream
//! connection with exactly those two hop-by-hop headers restored. If the upstream answers `101`, the
//! client gets the `101` and both connections become one byte tunnel (`copy_bidirectional`) until either
//! side closes; any other answer is passed back as an ordinary response.
//!
//! A request under idempotency rules that asks for an upgrade is refused before anything is forwarded
//! (`upgrade-not-allowed`): a tunnel's effects cannot be recorded or replayed.
//!
//! Tunnels run on their own tasks, outside the request timeout and outside the drain: a WebSocket may
//! live for hours, and shutdown closes it rather than waiting for it.

use std::net::SocketAddr;

use http::{header, HeaderMap, HeaderValue, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

use super::{
    error::ProxyError, forward::into_proxy_error, headers::strip_hop_by_hop, Answer, Live,
};
use crate::body::{empty, stream, RequestBody};
use crate::metrics::Outcome;

/// The protocol a request asks to switch to: its `Upgrade` value, when `Connection` lists `upgrade`
/// (RFC 9110 §7.8: an `Upgrade` header not named in `Connection` is not an upgrade request).
///
/// `Upgrade: h2c` alone (what `curl --http2` sends over plain HTTP) is not treated as one: that upgrade
/// is deprecated (RFC 9113 §3.1) and optional, so the request is answered over HTTP/1.1 as if the header
/// were absent (hop-by-hop stripping removes it), exactly as a server that ignores it would.
pub(super) fn requested(headers: &HeaderMap) -> Option<HeaderValue> {
    let upgrade = headers.get(header::UPGRADE)?;
    let only_h2c = upgrade
        .to_str()
        .is_ok_and(|v| v.split(',').all(|p| p.trim().eq_ignore_ascii_case("h2c")));
    if only_h2c {
        return None;
    }
    let listed = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    listed.then(|| upgrade.clone())
}

impl Live {
    /// Forwards an upgrade request and, on `101`, joins the client and upstream connections.
    pub(super) async fn tunnel<B: RequestBody>(
        &self,
        mut req: Request<B>,
        peer: SocketAddr,
        protocol: HeaderValue,
    ) -> Result<Answer, ProxyError> {
        // Taken before the request is consumed: resolves once hyper has sent our 101 to the client.
        let client_side = hyper::upgrade::on(&mut req);
        // A tunnel counts against `max_concurrency` while its handshake is at the upstream.
        let _slot = self.limit.try_take()?;
        let (mut parts, body) = req.into_parts();
        self.prepare(&mut parts, peer);
        // Hop-by-hop stripping removed them; for this hop they are the point.
        set_upgrade_headers(&mut parts.headers, protocol);
        let mut resp = self
            .upstream
            .send_upgrade(
                Request::from_parts(parts, stream(body)),
                self.upstream_timeout,
            )
            .await
            .map_err(into_proxy_error)?;
        if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            // The upstream declined (e.g. 400, 426): an ordinary answer.
            let (mut head, body) = resp.into_parts();
            strip_hop_by_hop(&mut head.headers);
            return Ok((
                Response::from_parts(head, stream(body)),
                Outcome::Passthrough,
            ));
        }
        let accepted = resp.headers().get(header::UPGRADE).cloned();
        let upstream_side = hyper::upgrade::on(&mut resp);
        let (mut head, _) = resp.into_parts();
        strip_hop_by_hop(&mut head.headers);
        if let Some(p) = accepted {
            set_upgrade_headers(&mut head.headers, p);
        }
        tokio::spawn(async move {
            let (client, upstream) = match tokio::try_join!(client_side, upstream_side) {
                Ok(pair) => pair,
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "upgrade did not complete");
                    return;
                }
            };
            let mut client = TokioIo::new(client);
            let mut upstream = TokioIo::new(upstream);
            match tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
                Ok((up, down)) => {
                    tracing::debug!(%peer, bytes_up = up, bytes_down = down, "tunnel closed")
                }
                Err(e) => tracing::debug!(%peer, error = %e, "tunnel ended with an error"),
            }
        });
        Ok((Response::from_parts(head, empty()), Outcome::Passthrough))
    }
}

fn set_upgrade_headers(h: &mut HeaderMap, protocol: HeaderValue) {
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(header::UPGRADE, protocol);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.append(*n, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn an_upgrade_needs_both_headers() {
        let ws = headers(&[
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "websocket"),
        ]);
        assert_eq!(requested(&ws).unwrap(), "websocket");
        assert!(requested(&headers(&[("upgrade", "websocket")])).is_none());
        assert!(requested(&headers(&[("connection", "upgrade")])).is_none());
        let split = headers(&[
            ("connection", "keep-alive"),
            ("connection", "upgrade"),
            ("upgrade", "websocket"),
        ]);
        assert!(requested(&split).is_some());
        let h2c = headers(&[
            ("connection", "Upgrade, HTTP2-Settings"),
            ("upgrade", "h2c"),
        ]);
        assert!(requested(&h2c).is_none());
        let mixed = headers(&[("connection", "upgrade"), ("upgrade", "h2c, websocket")]);
        assert!(requested(&mixed).is_some());
    }
}
