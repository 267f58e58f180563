//! The phases of a request, in order:
//!
//! 0. (`Proxy::handle`) The path is normalized (400 `invalid-path` if it cannot be) and the route
//!    selected on it; the whole request is bounded by `request_timeout`, and [`Progress`] tells whose
//!    fault a timeout is: 408 body, 503 store, 409 waiting, 504 upstream.
//! 1. `handle_inner`: methods or routes not under rules → `Live::pass_through` (streamed, nothing stored;
//!    an `Upgrade` request becomes a tunnel, see `upgrade`). An `Upgrade` request under rules → 400.
//! 2. Buffer the body (413 over `max_request_body`), derive the key (scoped by headers and cookies) and
//!    the fingerprint (over the normalized path).
//! 3. `claim_and_forward`: claim the store key. Claimed → 4; completed → replay (or 422); in flight →
//!    409, or wait and claim again (or 422); store full → 503 `store-full`.
//! 4. `forward_claimed`: the upstream exchange and the recording run inline, and move to a task of
//!    their own if the client disconnects first (see `detach`), so they finish either way; the
//!    response goes back only after its record is durable. Every upstream exchange holds one of
//!    `max_concurrency` slots (none free: the key is freed, 503 `upstream-busy`).
//! 5. `exchange` / `settle_error`: release the key (release status, or nothing was sent) or record the
//!    result; a result the store cannot make durable is not passed on (503).
//!
//! Every successful response is tagged with its metrics [`Outcome`]; `Proxy::handle` counts it.

use std::{borrow::Cow, net::SocketAddr, sync::Arc, time::Instant};

use bytes::Bytes;
use http::{header, request::Parts, HeaderName, HeaderValue, Request, Response};
use hyper::body::Incoming;

use super::{
    detach::Detachable,
    error::ProxyError,
    forward::{into_proxy_error, upstream_request, upstream_response},
    headers::{recordable, strip_hop_by_hop},
    progress::{Phase, Progress},
    replay::replay,
    rules::RouteRules,
    shared_replays, tagged, upgrade, Live, Proxy,
};
use crate::body::{buffer_request, capture, full, stream, Body, BufferError, Captured, Prefixed};
use crate::upstream::UpstreamError;
use crate::{
    config::{FingerprintMode, InFlightMode, KeySource, Rule, StoreErrorMode},
    key::{fingerprint, json_pointer_key, path::key_form, Fingerprint, IdempotencyKey, StoreKey},
    metrics::{InflightGuard, Outcome},
    store::{ClaimOutcome, Committed, NewResult, Store, StoreError},
};

/// How much earlier than the request's own deadline a claimed exchange gives up (see `exchange`).
/// (Room for the release's durable sync, also on a loaded disk.)
const REQUEST_MARGIN: std::time::Duration = std::time::Duration::from_millis(50);

/// Marks responses forwarded without protection because the store failed (`on_store_error = "pass"`).
const DEGRADED: HeaderName = HeaderName::from_static("idempotency-degraded");

/// A request under rules, with its key derived, before the claim.
struct Pending {
    key: StoreKey,
    redacted: String,
    fp: Fingerprint,
    parts: Parts,
    body: Bytes,
    peer: SocketAddr,
}

/// A claimed key on its way through the upstream.
struct Claim {
    route: Arc<str>,
    /// The route's upstream-duration histogram.
    upstream_duration: metrics::Histogram,
    key: StoreKey,
    token: u64,
    redacted: String,
    /// Where the request stands (its client's timeout reads it).
    progress: Progress,
}

/// Abandons a claim whose task ended without completing or releasing it (a panic): the lease then
/// bounds how long the key stays blocked, exactly as if the process had died.
struct AbandonGuard {
    store: Arc<dyn Store>,
    token: u64,
    armed: bool,
}

impl Drop for AbandonGuard {
    fn drop(&mut self) {
        if self.armed {
            self.store.abandon(self.token);
        }
    }
}

impl Proxy {
    /// Phases 1 and 2.
    pub(super) async fn handle_inner(
        self: &Arc<Self>,
        live: &Arc<Live>,
        route: &RouteRules,
        req: Request<Incoming>,
        normal_path: &str,
        peer: SocketAddr,
        progress: &Progress,
    ) -> Result<Response<Body>, ProxyError> {
        let rule = &route.rule;
        if !rule.enabled || !rule.methods.contains(req.method()) {
            return live.pass_through(req, peer, progress).await;
        }
        if upgrade::requested(req.headers()).is_some() {
            // A tunnel's effects cannot be recorded or replayed: refused before anything is forwarded.
            return Err(ProxyError::UpgradeNotAllowed {
                method: req.method().clone(),
            });
        }
        let (parts, body) = req.into_parts();
        let limit = live.limits.max_request_body;
        let body = match buffer_request(&parts.headers, body, limit).await {
            Ok(b) => b,
            Err(BufferError::TooLarge) => return Err(ProxyError::BodyTooLarge { limit }),
            Err(BufferError::Read(e)) => return Err(ProxyError::BadRequestBody(e)),
        };
        progress.set(Phase::Store);
        // The fingerprint sees the normalized path, and the query as sent. With `key = "fingerprint"`
        // the fingerprint *is* the key, so it sees the path as route matching does (case, a trailing
        // `/`, `%2F`, `;params` and an empty query folded): a spelling that reaches the same route
        // reaches the same key, and never runs twice.
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
            // Optional key absent: forwarded as is, every time (nothing to fingerprint).
            progress.set(Phase::Upstream);
            return live.forward_unprotected(parts, body, peer, false).await;
        };
        // Hashed only once a key is known (the body may be up to `max_request_body`).
        let fp = key_fp.unwrap_or_else(|| fp_of(rule.fingerprint));
        let pending = Pending {
            key: StoreKey::derive_scoped(
                &route.name,
                &client_key,
                &rule.scope_headers,
                &rule.scope_cookies,
                &parts.headers,
            ),
            redacted: client_key.redacted().to_owned(),
            fp,
            parts,
            body,
            peer,
        };
        self.claim_and_forward(live, route, pending, progress).await
    }

    /// Phase 3: claim the key, and act on what the store says. In wait mode, loops until the first
    /// request finishes (replay), is released (claim it ourselves) or `wait_timeout` passes (409).
    async fn claim_and_forward(
        self: &Arc<Self>,
        live: &Arc<Live>,
        route: &RouteRules,
        req: Pending,
        progress: &Progress,
    ) -> Result<Response<Body>, ProxyError> {
        let rule = &route.rule;
        let give_up = tokio::time::Instant::now() + rule.wait_timeout;
        let mut waiting = None;
        loop {
            // Subscribe before claiming, so a completion between the two cannot be missed.
            let mut watch =
                (rule.on_in_flight == InFlightMode::Wait).then(|| self.store.watch(&req.key));
            let outcome = match self.store.claim(&req.key, req.fp, rule.lease).await {
                Ok(o) => o,
                Err(StoreError::Full(_)) => return Err(ProxyError::StoreFull),
                Err(e) => {
                    progress.set(Phase::Upstream);
                    return live
                        .store_failed(e, rule, req.parts, req.body, req.peer)
                        .await;
                }
            };
            match outcome {
                ClaimOutcome::Claimed { token } => {
                    tracing::debug!(route = %route.name, key = %req.redacted, token, "claimed");
                    let claim = Claim {
                        route: Arc::clone(&route.name),
                        upstream_duration: route.counters.upstream_duration(),
                        key: req.key,
                        token,
                        redacted: req.redacted,
                        progress: progress.clone(),
                    };
                    progress.set(Phase::Upstream);
                    return self
                        .forward_claimed(live, claim, rule.clone(), (req.parts, req.body, req.peer))
                        .await;
                }
                ClaimOutcome::Completed(rec) => {
                    if !rec.fingerprint.matches(&req.fp) {
                        return Err(ProxyError::FingerprintMismatch);
                    }
                    tracing::debug!(route = %route.name, key = %req.redacted, "replayed");
                    return Ok(tagged(
                        replay(
                            &shared_replays::share(&self.replays, &req.key, rec),
                            rule.duplicate_status,
                        ),
                        Outcome::Replayed,
                    ));
                }
                ClaimOutcome::InFlight {
                    fingerprint,
                    retry_after,
                } => {
                    if !fingerprint.matches(&req.fp) {
                        return Err(ProxyError::FingerprintMismatch);
                    }
                    let Some(w) = watch.as_mut() else {
                        return Err(ProxyError::InFlight { retry_after });
                    };
                    let now = tokio::time::Instant::now();
                    if now >= give_up {
                        return Err(ProxyError::InFlight { retry_after });
                    }
                    waiting.get_or_insert_with(InflightGuard::waiting);
                    progress.set(Phase::Waiting);
                    // Woken in-process when the key changes; the timer only covers an owner that died
                    // (its lease must run out) and the wait bound. No store resource is held meanwhile.
                    tokio::select! {
                        () = w.changed() => {}
                        () = tokio::time::sleep(retry_after.min(give_up - now)) => {}
                    }
                    progress.set(Phase::Store);
                }
            }
        }
    }

    /// Phase 4: exchange and record, inline; if the client goes away first (or the request's
    /// deadline fires), the rest runs detached, so the result is recorded either way.
    async fn forward_claimed(
        self: &Arc<Self>,
        live: &Arc<Live>,
        claim: Claim,
        rule: Rule,
        (parts, body, peer): (Parts, Bytes, SocketAddr),
    ) -> Result<Response<Body>, ProxyError> {
        let this = Arc::clone(self);
        let live = Arc::clone(live);
        Detachable::new(&self.tasks, async move {
            let mut guard = AbandonGuard {
                store: Arc::clone(&this.store),
                token: claim.token,
                armed: true,
            };
            let resp = this.exchange(&live, &claim, &rule, parts, body, peer).await;
            guard.armed = false;
            resp
        })
        .await
    }

    /// Phase 5: sends the claimed request and settles the claim from the outcome.
    async fn exchange(
        &self,
        live: &Live,
        claim: &Claim,
        rule: &Rule,
        mut parts: Parts,
        body: Bytes,
        peer: SocketAddr,
    ) -> Result<Response<Body>, ProxyError> {
        let progress = &claim.progress;
        let slot = match live.limit.try_take() {
            Ok(s) => s,
            Err(e) => {
                // Nothing was sent: the key is freed for the retry.
                self.release(claim).await;
                return Err(e);
            }
        };
        if let Err(e) = upstream_request(live, &mut parts, peer) {
            self.release(claim).await;
            return Err(e);
        }
        let started = Instant::now();
        // Bounded by what is left of `request_timeout` too (a little less, so this exchange times out,
        // frees the key and answers 504 before the request as a whole gives up): a client told 504
        // must find its key free, not held by an exchange that goes on and records its result later.
        let budget = live
            .upstream
            .timeout
            .min(progress.left().saturating_sub(REQUEST_MARGIN));
        let sent = live
            .upstream
            .send(Request::from_parts(parts, full(body)), budget)
            .await;
        let resp = match sent {
            Ok(r) => r,
            Err(UpstreamError::Connect(e)) => {
                // Nothing was sent: always free the key.
                self.release(claim).await;
                let e = ProxyError::UpstreamUnreachable(e);
                tracing::warn!(route = %claim.route, key = %claim.redacted, error = ?e, "upstream unreachable; key released");
                return Ok(tagged(e.response(), Outcome::Released));
            }
            Err(e) => {
                // A timeout stays the upstream's fault if the request's own deadline fires while the
                // key is being released (the release then finishes detached): 504, not 503.
                if !matches!(e, UpstreamError::Timeout) {
                    progress.set(Phase::Store);
                }
                return self.settle_error(claim, rule, into_proxy_error(e)).await;
            }
        };
        let (mut head, upstream_body) = resp.into_parts();
        strip_hop_by_hop(&mut head.headers);
        if rule.release_statuses.contains(&head.status) {
            claim
                .upstream_duration
                .record(started.elapsed().as_secs_f64());
            self.release(claim).await;
            tracing::debug!(route = %claim.route, key = %claim.redacted, status = head.status.as_u16(), "released on status");
            return Ok(tagged(
                Response::from_parts(head, slot.hold(stream(upstream_body))),
                Outcome::Released,
            ));
        }
        let left = budget.saturating_sub(started.elapsed());
        let captured =
            tokio::time::timeout(left, capture(upstream_body, live.limits.max_response_body)).await;
        claim
            .upstream_duration
            .record(started.elapsed().as_secs_f64());
        progress.set(Phase::Store);
        let captured = match captured {
            Err(_) => {
                return self
                    .settle_error(claim, rule, ProxyError::UpstreamTimeout)
                    .await
            }
            Ok(Err(e)) => {
                return self
                    .settle_error(claim, rule, ProxyError::UpstreamFailed(Box::new(e)))
                    .await
            }
            Ok(Ok(c)) => c,
        };
        let result = if !rule.store_response {
            NewResult {
                status: head.status.as_u16(),
                headers: Vec::new(),
                body: Bytes::new(),
                body_omitted: false,
                seen_only: true,
            }
        } else {
            let (body, body_omitted) = match &captured {
                Captured::Full(b) => (b.clone(), false),
                Captured::Over { .. } => (Bytes::new(), true),
            };
            NewResult {
                status: head.status.as_u16(),
                headers: recordable(&head.headers),
                body,
                body_omitted,
                seen_only: false,
            }
        };
        // Durable before the client sees a byte: a crash after this point replays, never re-executes.
        self.record(claim, rule, result).await?;
        let body = match captured {
            Captured::Full(b) => {
                drop(slot);
                head.headers
                    .insert(header::CONTENT_LENGTH, HeaderValue::from(b.len()));
                full(b)
            }
            Captured::Over { prefix, rest } => slot.hold(Prefixed::boxed_body(prefix, rest)),
        };
        Ok(tagged(Response::from_parts(head, body), Outcome::Forwarded))
    }

    /// A failure after the request may have reached the upstream: release if its status is listed in
    /// `release_statuses` (the default for 502/504), otherwise record the error as the result.
    async fn settle_error(
        &self,
        claim: &Claim,
        rule: &Rule,
        e: ProxyError,
    ) -> Result<Response<Body>, ProxyError> {
        let outcome = match e {
            ProxyError::UpstreamTimeout => Outcome::UpstreamTimeout,
            _ => Outcome::Released,
        };
        if rule.release_statuses.contains(&e.status()) {
            self.release(claim).await;
            tracing::warn!(route = %claim.route, key = %claim.redacted, error = ?e, "upstream failed; key released");
            return Ok(tagged(e.response(), outcome));
        }
        let resp = e.response();
        let result = NewResult {
            status: e.status().as_u16(),
            headers: recordable(resp.headers()),
            body: e.problem_body(),
            body_omitted: false,
            seen_only: !rule.store_response,
        };
        tracing::warn!(route = %claim.route, key = %claim.redacted, error = ?e, "upstream failed; recorded as the result");
        self.record(claim, rule, result).await?;
        Ok(tagged(
            resp,
            match outcome {
                Outcome::UpstreamTimeout => outcome,
                _ => Outcome::Forwarded,
            },
        ))
    }

    /// Records the result of a claim. A result the store cannot make durable is not acknowledged:
    /// the client gets 503 `store-unavailable` instead of the upstream's answer (contract rule 14).
    async fn record(
        &self,
        claim: &Claim,
        rule: &Rule,
        result: NewResult,
    ) -> Result<(), ProxyError> {
        match self
            .store
            .complete(&claim.key, claim.token, result, rule.ttl)
            .await
        {
            Ok(Committed::Done) => {
                tracing::debug!(route = %claim.route, key = %claim.redacted, "recorded");
                Ok(())
            }
            Ok(Committed::Stale) => {
                tracing::warn!(
                    route = %claim.route, key = %claim.redacted,
                    "claim was taken over or purged while in flight; result not recorded"
                );
                Ok(())
            }
            // The upstream already answered, but its answer is not durable, so it is not passed on (a
            // crash could take it back, and the retry would run again unannounced). The claim is left
            // to its lease (a retry within it gets 409, after it the request may run again): the store
            // could not say what it holds, and releasing at once would invite an immediate duplicate.
            Err(e) => {
                tracing::error!(route = %claim.route, key = %claim.redacted, error = %e, "could not record the result; answering 503, the key frees when its lease ends");
                self.store.abandon(claim.token);
                Err(ProxyError::StoreUnavailable(e))
            }
        }
    }

    async fn release(&self, claim: &Claim) {
        if let Err(e) = self.store.release(&claim.key, claim.token).await {
            tracing::error!(route = %claim.route, key = %claim.redacted, error = %e, "could not release the key; it frees when its lease ends");
            self.store.abandon(claim.token);
        }
    }
}

impl Live {
    /// The store failed before anything was claimed: refuse (503) or forward unprotected.
    async fn store_failed(
        &self,
        e: StoreError,
        rule: &Rule,
        parts: Parts,
        body: Bytes,
        peer: SocketAddr,
    ) -> Result<Response<Body>, ProxyError> {
        match rule.on_store_error {
            StoreErrorMode::Reject => Err(ProxyError::StoreUnavailable(e)),
            StoreErrorMode::Pass => {
                tracing::warn!(error = %e, "store failed; forwarding without idempotency protection");
                self.forward_unprotected(parts, body, peer, true).await
            }
        }
    }

    /// Forwards a buffered request without a claim (no key on an optional route, or degraded mode).
    async fn forward_unprotected(
        &self,
        mut parts: Parts,
        body: Bytes,
        peer: SocketAddr,
        degraded: bool,
    ) -> Result<Response<Body>, ProxyError> {
        let slot = self.limit.try_take()?;
        upstream_request(self, &mut parts, peer)?;
        let resp = self
            .upstream
            .send(
                Request::from_parts(parts, full(body)),
                self.upstream.timeout,
            )
            .await
            .map_err(into_proxy_error)?;
        let mut resp = upstream_response(resp, slot);
        if degraded {
            resp.headers_mut()
                .insert(DEGRADED, HeaderValue::from_static("true"));
        }
        Ok(resp)
    }

    /// Pass-through: body streamed both ways, no limit, nothing stored.
    pub(super) async fn pass_through(
        &self,
        req: Request<Incoming>,
        peer: SocketAddr,
        progress: &Progress,
    ) -> Result<Response<Body>, ProxyError> {
        if let Some(protocol) = upgrade::requested(req.headers()) {
            progress.set(Phase::Upstream);
            return self.tunnel(req, peer, protocol).await;
        }
        let slot = self.limit.try_take()?;
        let (mut parts, body) = req.into_parts();
        upstream_request(self, &mut parts, peer)?;
        let resp = self
            .upstream
            .send(
                Request::from_parts(parts, progress.stream_request(body)),
                self.upstream.timeout,
            )
            .await;
        match resp {
            Ok(resp) => Ok(upstream_response(resp, slot)),
            // The upstream waited for a body the client never finished sending: the client's doing.
            Err(UpstreamError::Timeout) if progress.get() == Phase::Body => {
                Err(ProxyError::RequestTimeout(self.upstream.timeout))
            }
            Err(e) => Err(into_proxy_error(e)),
        }
    }
}
