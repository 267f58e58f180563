//! The pipeline, one function per phase, in the order a request goes through them:
//!
//! 1. [`Proxy::handle`] **select route**: the path is normalized (400 `invalid-path` if it cannot be)
//!    and the route selected on it (rule 13). The rest is bounded by `request_timeout`, and
//!    [`Progress`] tells whose fault a timeout is: 408 body, 503 store, 409 waiting, 504 upstream.
//! 2. [`Proxy::run`]: methods or routes not under rules → `Live::pass_through` (streamed, nothing
//!    stored; an `Upgrade` request becomes a tunnel). An `Upgrade` request under rules → 400.
//! 3. **read body** (`derive::read_body`, 413 over `max_request_body`) and **derive key**
//!    (`derive::derive_key`: the store key, scoped by headers and cookies, and the fingerprint).
//! 4. [`Proxy::claim`]: claimed → 5; completed → replay (or 422); in flight → 409, or wait and claim
//!    again (or 422); store full → 503 `store-full`; store failed → 503 or forwarded unprotected.
//! 5. [`Proxy::forward`]: the upstream exchange, holding one of `max_concurrency` slots (none free:
//!    the key is freed, 503 `upstream-busy`); a release status, a failure or a timeout settles the
//!    claim here ([`Proxy::settle_error`]).
//! 6. [`Proxy::record`]: the result, durable before the client sees a byte; a result the store cannot
//!    make durable is not passed on (503).
//! 7. [`respond`]: the recorded response goes back; an error becomes problem+json; the outcome is
//!    counted and set on the request's span.
//!
//! Phases 5–7 run inline and move to a task of their own if the client disconnects first (see
//! `detach`), so a claimed exchange is forwarded and recorded either way.
//!
//! Each request runs in one `request` span carrying its method, route, outcome, status and redacted
//! key, with child spans `claim`, `upstream` (the exchange), `record` and `release`; log lines inside
//! it carry those fields, and with traces on they are exported (see `telemetry`: a client's
//! `traceparent` is continued, the upstream gets one naming the `upstream` span). The spans are at
//! debug level, so that they cost nothing unless asked for (`RUST_LOG=idemproxy=debug`, or traces);
//! the warnings and errors a request can log name their route and redacted key themselves.

use std::{net::SocketAddr, sync::Arc, time::Instant};

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response};
use tracing::{field::Empty, Instrument};

use super::{
    derive::{derive_key, read_body, Derived, Keyed},
    detach::{AbandonGuard, Detachable},
    error::ProxyError,
    forward::into_proxy_error,
    headers::{recordable, strip_hop_by_hop},
    limit::Slot,
    progress::{Phase, Progress},
    replay::replay,
    rules::RouteRules,
    shared_replays, upgrade, Answer, Live, Proxy,
};
use crate::body::{capture, full, stream, Body, Captured, Prefixed, RequestBody};
use crate::upstream::{ResponseBody, UpstreamError};
use crate::{
    config::{InFlightMode, Rule},
    key::StoreKey,
    metrics::{InflightGuard, Outcome},
    store::{ClaimOutcome, Committed, NewResult, StoreError},
};

/// On answers of `key = "fingerprint"` routes: the key the proxy derived, for the admin API.
const DERIVED_KEY: http::HeaderName = http::HeaderName::from_static("idempotency-derived-key");

/// How much earlier than the request's own deadline a claimed exchange gives up (see `forward`).
/// (Room for the release's durable sync, also on a loaded disk.)
const REQUEST_MARGIN: std::time::Duration = std::time::Duration::from_millis(50);

/// A request past phase 1: its route and normalized path, its peer, and where it stands.
struct Selected<'a> {
    route: &'a RouteRules,
    normal_path: &'a str,
    peer: SocketAddr,
    progress: &'a Progress,
    span: &'a tracing::Span,
}

/// What the claim phase decided.
enum Claimed {
    /// The key is ours: forward.
    Ours(Claim),
    /// Answered from the store (a replay).
    Answered(Answer),
    /// The store failed before anything was claimed.
    StoreFailed(StoreError),
}

/// A claimed key on its way through the upstream.
struct Claim {
    key: StoreKey,
    token: u64,
    /// For log lines: the route, and the client key as logs may show it (rule 9).
    route: Arc<str>,
    redacted: String,
    /// The route's upstream-duration histogram.
    upstream_duration: metrics::Histogram,
    /// Where the request stands (its client's timeout reads it).
    progress: Progress,
}

/// What the forward phase got: a response to record, or an answer that settled the claim already.
enum Forwarded {
    /// The upstream's head and its body as read for the record, with the slot its rest may still need.
    Captured(http::response::Parts, Captured<ResponseBody>, Slot),
    /// Released or recorded as an error: the answer.
    Settled(Answer),
}

impl Proxy {
    /// Answers one request, and says how it was answered. Never fails: errors become problem+json.
    pub async fn handle<B: RequestBody>(
        self: Arc<Self>,
        req: Request<B>,
        peer: SocketAddr,
    ) -> Answer {
        let _inflight = InflightGuard::request();
        let live = self.live.load_full();
        let span = tracing::debug_span!(
            "request",
            method = %req.method(),
            route = Empty,
            outcome = Empty,
            key = Empty,
            http.response.status_code = Empty,
            otel.kind = "server",
            otel.name = Empty,
            otel.status_code = Empty,
        );
        crate::telemetry::continue_trace(&span, req.headers());
        // Kept for the error log; a `Uri` clone shares its bytes (no copy).
        let uri = req.uri().clone();
        // Phase 1: select the route on the normalized path; the upstream gets the path as sent.
        let selected = crate::key::path::normalize(uri.path())
            .and_then(|normal| Ok((live.rules.select(&normal, req.method())?, normal)));
        let (route, normal) = match selected {
            Ok(s) => s,
            Err(e) => {
                let e = ProxyError::from(e);
                let route = live.rules.default_route();
                return respond(Err(e), route, &span, uri.path());
            }
        };
        span.record("route", &*route.name);
        if !span.is_disabled() {
            // Named as OpenTelemetry's HTTP conventions name server spans: method and route.
            span.record("otel.name", format!("{} {}", req.method(), route.name));
        }
        let limit = live.limits.request_timeout;
        let progress = Progress::new(tokio::time::Instant::now() + limit);
        let selected = Selected {
            route,
            normal_path: &normal,
            peer,
            progress: &progress,
            span: &span,
        };
        let run = self.run(&live, req, selected);
        let result = match tokio::time::timeout(limit, run.instrument(span.clone())).await {
            Ok(r) => r,
            // Whose fault the timeout is depends on where the request was (rule 15).
            Err(_) => Err(progress.timed_out(limit)),
        };
        respond(result, route, &span, uri.path())
    }

    /// Phases 2–7 for a request on `route`.
    async fn run<B: RequestBody>(
        self: &Arc<Self>,
        live: &Arc<Live>,
        req: Request<B>,
        selected: Selected<'_>,
    ) -> Result<Answer, ProxyError> {
        let Selected {
            route,
            normal_path,
            peer,
            progress,
            span,
        } = selected;
        // Phase 2: under rules? Anything else streams through untouched.
        let rule = &route.rule;
        if !route.protects(req.method()) {
            return live.pass_through(req, peer, progress).await;
        }
        if upgrade::requested(req.headers()).is_some() {
            // A tunnel's effects cannot be recorded or replayed: refused before anything is forwarded.
            return Err(ProxyError::UpgradeNotAllowed {
                method: req.method().clone(),
            });
        }
        // Phase 3: read the body, derive the key and the fingerprint.
        let (parts, body) = read_body(live, req).await?;
        progress.set(Phase::Store);
        let req = match derive_key(route, parts, body, normal_path)? {
            Derived::Keyed(k) => k,
            Derived::Unkeyed(parts, body) => {
                progress.set(Phase::Upstream);
                return live.forward_unprotected(parts, body, peer, false).await;
            }
        };
        span.record("key", req.redacted.as_str());
        let derived = req.derived.clone();
        let tell = |mut a: Answer| {
            if let Some(k) = &derived {
                a.0.headers_mut().insert(DERIVED_KEY, k.clone());
            }
            a
        };
        // Phase 4: claim the key.
        let claiming = self.claim(route, &req, progress);
        let claim = match claiming.instrument(tracing::debug_span!("claim")).await? {
            Claimed::Ours(c) => c,
            Claimed::Answered(a) => return Ok(tell(a)),
            Claimed::StoreFailed(e) => {
                progress.set(Phase::Upstream);
                return live.store_failed(e, rule, req.parts, req.body, peer).await;
            }
        };
        // Phases 5–7: forward, record, respond — finished even if the client goes away.
        progress.set(Phase::Upstream);
        let this = Arc::clone(self);
        let live = Arc::clone(live);
        let rule = rule.clone();
        let work = async move {
            let mut guard = AbandonGuard {
                store: Arc::clone(&this.store),
                token: claim.token,
                armed: true,
            };
            let answer = match this.forward(&live, &claim, &rule, req, peer).await {
                Ok(Forwarded::Captured(head, captured, slot)) => this
                    .record(&claim, &rule, &head, &captured)
                    .await
                    .map(|()| (respond_recorded(head, captured, slot), Outcome::Forwarded)),
                Ok(Forwarded::Settled(a)) => Ok(a),
                Err(e) => Err(e),
            };
            guard.armed = false;
            answer
        };
        Detachable::new(&self.tasks, work.instrument(span.clone()))
            .await
            .map(tell)
    }

    /// Phase 4: claim the key, and act on what the store says. In wait mode, loops until the first
    /// request finishes (replay), is released (claim it ourselves) or `wait_timeout` passes (409).
    async fn claim(
        &self,
        route: &RouteRules,
        req: &Keyed,
        progress: &Progress,
    ) -> Result<Claimed, ProxyError> {
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
                Err(e) => return Ok(Claimed::StoreFailed(e)),
            };
            match outcome {
                ClaimOutcome::Claimed { token } => {
                    tracing::debug!(token, "claimed");
                    return Ok(Claimed::Ours(Claim {
                        key: req.key,
                        token,
                        route: Arc::clone(&route.name),
                        redacted: req.redacted.clone(),
                        upstream_duration: route.counters.upstream_duration(),
                        progress: progress.clone(),
                    }));
                }
                ClaimOutcome::Completed(rec) => {
                    if !rec.fingerprint.matches(&req.fp) {
                        return Err(ProxyError::FingerprintMismatch);
                    }
                    tracing::debug!("replayed");
                    let rec = shared_replays::share(&self.replays, &req.key, rec);
                    let resp = replay(&rec, rule.duplicate_status);
                    return Ok(Claimed::Answered((resp, Outcome::Replayed)));
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

    /// Phase 5: sends the claimed request, and reads the response for the record. A release status,
    /// an upstream failure or a timeout settles the claim here.
    async fn forward(
        &self,
        live: &Live,
        claim: &Claim,
        rule: &Rule,
        req: Keyed,
        peer: SocketAddr,
    ) -> Result<Forwarded, ProxyError> {
        let progress = &claim.progress;
        let slot = match live.limit.try_take() {
            Ok(s) => s,
            Err(e) => {
                // Nothing was sent: the key is freed for the retry.
                self.release(claim).await;
                return Err(e);
            }
        };
        let started = Instant::now();
        // Bounded by what is left of `request_timeout` too (a little less, so this exchange times out,
        // frees the key and answers 504 before the request as a whole gives up): a client told 504
        // must find its key free, not held by an exchange that goes on and records its result later.
        let budget = live
            .upstream_timeout
            .min(progress.left().saturating_sub(REQUEST_MARGIN));
        let resp = match live.send(req.parts, full(req.body), peer, budget).await {
            Ok(r) => r,
            Err(UpstreamError::Connect(e)) => {
                // Nothing was sent: always free the key.
                self.release(claim).await;
                let e = ProxyError::UpstreamUnreachable(e);
                tracing::warn!(route = %claim.route, key = %claim.redacted, error = ?e, "upstream unreachable; key released");
                return Ok(Forwarded::Settled((e.response(), Outcome::Released)));
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
            tracing::debug!(status = head.status.as_u16(), "released on status");
            let resp = Response::from_parts(head, slot.hold(stream(upstream_body)));
            return Ok(Forwarded::Settled((resp, Outcome::Released)));
        }
        let left = budget.saturating_sub(started.elapsed());
        let captured =
            tokio::time::timeout(left, capture(upstream_body, live.limits.max_response_body)).await;
        claim
            .upstream_duration
            .record(started.elapsed().as_secs_f64());
        progress.set(Phase::Store);
        match captured {
            Err(_) => {
                self.settle_error(claim, rule, ProxyError::UpstreamTimeout)
                    .await
            }
            Ok(Err(e)) => {
                let e = ProxyError::UpstreamFailed(e);
                self.settle_error(claim, rule, e).await
            }
            Ok(Ok(c)) => Ok(Forwarded::Captured(head, c, slot)),
        }
    }

    /// A failure after the request may have reached the upstream: release if its status is listed in
    /// `release_statuses` (the default for 502/504), otherwise record the error as the result.
    async fn settle_error(
        &self,
        claim: &Claim,
        rule: &Rule,
        e: ProxyError,
    ) -> Result<Forwarded, ProxyError> {
        let timed_out = matches!(e, ProxyError::UpstreamTimeout);
        if rule.release_statuses.contains(&e.status()) {
            self.release(claim).await;
            tracing::warn!(route = %claim.route, key = %claim.redacted, error = ?e, "upstream failed; key released");
            let outcome = if timed_out {
                Outcome::UpstreamTimeout
            } else {
                Outcome::Released
            };
            return Ok(Forwarded::Settled((e.response(), outcome)));
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
        self.commit(claim, rule, result).await?;
        let outcome = if timed_out {
            Outcome::UpstreamTimeout
        } else {
            Outcome::Forwarded
        };
        Ok(Forwarded::Settled((resp, outcome)))
    }

    /// Phase 6: records the upstream's answer as the key's result (its status alone with
    /// `store_response = false`; without its body when that was over `max_response_body`).
    async fn record(
        &self,
        claim: &Claim,
        rule: &Rule,
        head: &http::response::Parts,
        captured: &Captured<ResponseBody>,
    ) -> Result<(), ProxyError> {
        let status = head.status.as_u16();
        let result = if !rule.store_response {
            NewResult {
                status,
                headers: Vec::new(),
                body: Bytes::new(),
                body_omitted: false,
                seen_only: true,
            }
        } else {
            let (body, body_omitted) = match captured {
                Captured::Full(b) => (b.clone(), false),
                Captured::Over { .. } => (Bytes::new(), true),
            };
            NewResult {
                status,
                headers: recordable(&head.headers),
                body,
                body_omitted,
                seen_only: false,
            }
        };
        // Durable before the client sees a byte: a crash after this point replays, never re-executes.
        self.commit(claim, rule, result).await
    }

    /// Completes a claim with its result. A result the store cannot make durable is not acknowledged:
    /// the client gets 503 `store-unavailable` instead of the upstream's answer (contract rule 14).
    async fn commit(
        &self,
        claim: &Claim,
        rule: &Rule,
        result: NewResult,
    ) -> Result<(), ProxyError> {
        let completing = self
            .store
            .complete(&claim.key, claim.token, result, rule.ttl);
        match completing.instrument(tracing::debug_span!("record")).await {
            Ok(Committed::Done) => {
                tracing::debug!("recorded");
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

    /// Frees a claimed key (nothing was sent, or the answer is not to be kept).
    async fn release(&self, claim: &Claim) {
        let releasing = self.store.release(&claim.key, claim.token);
        if let Err(e) = releasing.instrument(tracing::debug_span!("release")).await {
            tracing::error!(route = %claim.route, key = %claim.redacted, error = %e, "could not release the key; it frees when its lease ends");
            self.store.abandon(claim.token);
        }
    }
}

/// Phase 7 for a recorded answer: the upstream's response, sent only now that its record is durable.
/// A body over `max_response_body` streams on from where the record stopped, holding the slot.
fn respond_recorded(
    mut head: http::response::Parts,
    captured: Captured<ResponseBody>,
    slot: Slot,
) -> Response<Body> {
    let body = match captured {
        Captured::Full(b) => {
            drop(slot);
            head.headers
                .insert(header::CONTENT_LENGTH, HeaderValue::from(b.len()));
            full(b)
        }
        Captured::Over { prefix, rest } => slot.hold(Prefixed::boxed_body(prefix, rest)),
    };
    Response::from_parts(head, body)
}

/// Phase 7: the answer, or the error as problem+json (logged once, here); counted under the route and
/// set on the request's span.
fn respond(
    result: Result<Answer, ProxyError>,
    route: &RouteRules,
    span: &tracing::Span,
    path: &str,
) -> Answer {
    let (resp, outcome) = match result {
        Ok(answer) => answer,
        Err(e) => {
            let _entered = span.enter();
            if e.is_client_error() {
                tracing::debug!(
                    path,
                    status = e.status().as_u16(),
                    code = e.code(),
                    "refused: {e}"
                );
            } else {
                tracing::warn!(route = %route.name, path, status = e.status().as_u16(), code = e.code(), error = ?e, "failed: {e}");
            }
            (e.response(), e.outcome())
        }
    };
    span.record("outcome", outcome.as_str());
    span.record("http.response.status_code", resp.status().as_u16());
    if resp.status().is_server_error() {
        span.record("otel.status_code", "error");
    }
    route.counters.count(outcome);
    (resp, outcome)
}
