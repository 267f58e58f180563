//! The request pipeline. [`Proxy::handle`] takes any request and always answers: pass-through traffic is
//! streamed to the upstream untouched; requests under idempotency rules go through the phases in
//! `flow`: select route → buffer body → derive key → claim → forward → record → respond.
//!
//! The proxy holds an `Arc<dyn Store>` and an [`upstream::Upstream`]; it never sees sockets, TLS, sled or
//! Redis types. What a config reload may change (routes, rules, upstream, limits) lives in one [`Live`]
//! value swapped atomically: a request keeps the `Live` it started with.

mod detach;
pub mod error;
mod flow;
mod forward;
pub mod headers;
mod limit;
mod progress;
pub mod replay;
pub mod rules;
mod shared_replays;
mod upgrade;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use arc_swap::ArcSwap;
use http::{Request, Response};
use hyper::body::Incoming;
use tokio_util::task::TaskTracker;

pub use error::ProxyError;

use progress::Progress;

use crate::{
    body::Body,
    config::Config,
    metrics::{InflightGuard, Outcome},
    store::Store,
    upstream,
};

/// Size and time limits of the pipeline.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest request body buffered on idempotent routes.
    pub max_request_body: u64,
    /// Largest response body recorded.
    pub max_response_body: u64,
    /// Bound on handling one request.
    pub request_timeout: Duration,
}

/// Everything a reload replaces at once.
#[derive(Debug)]
pub struct Live {
    rules: rules::Rules,
    upstream: upstream::Upstream,
    limits: Limits,
    /// Peers whose forwarding headers are believed (rule 16).
    trusted_proxies: Vec<ipnet::IpNet>,
    /// Upstream exchanges at once (shared by every `Live` of one proxy).
    limit: limit::UpstreamLimit,
}

impl Live {
    fn new(cfg: &Config, limit: limit::UpstreamLimit) -> Result<Self, SetupError> {
        Ok(Self {
            rules: rules::Rules::new(cfg)?,
            upstream: upstream::Upstream::new(&cfg.upstream)?,
            limits: Limits {
                max_request_body: cfg.server.max_request_body,
                max_response_body: cfg.server.max_response_body,
                request_timeout: cfg.server.request_timeout,
            },
            trusted_proxies: cfg.server.trusted_proxies.clone(),
            limit,
        })
    }
}

/// The idempotency proxy.
#[derive(Debug)]
pub struct Proxy {
    live: ArcSwap<Live>,
    store: Arc<dyn Store>,
    /// Upstream exchanges and recordings: run inline, and moved to a task of their own here if the
    /// client goes away first, so they finish either way; shutdown waits for them (see `detach`).
    tasks: TaskTracker,
    /// Large bodies being replayed now, shared by their readers.
    replays: shared_replays::SharedReplays,
}

/// Why the proxy could not be built.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// A route glob did not compile (validation should have caught it).
    #[error("route glob: {0}")]
    Glob(#[from] globset::Error),
    /// The upstream client could not be built.
    #[error(transparent)]
    Upstream(#[from] upstream::UpstreamSetupError),
}

impl Proxy {
    /// Builds the proxy for a validated config.
    pub fn new(cfg: &Config, store: Arc<dyn Store>) -> Result<Self, SetupError> {
        Ok(Self {
            live: ArcSwap::from_pointee(Live::new(
                cfg,
                limit::UpstreamLimit::new(cfg.upstream.max_concurrency),
            )?),
            store,
            tasks: TaskTracker::new(),
            replays: shared_replays::SharedReplays::default(),
        })
    }

    /// Applies a reloaded config to new requests; requests already running keep the old one.
    pub fn reload(&self, cfg: &Config) -> Result<(), SetupError> {
        // `upstream.max_concurrency` takes effect after a restart: the slots in use stay counted.
        let limit = self.live.load().limit.clone();
        self.live.store(Arc::new(Live::new(cfg, limit)?));
        Ok(())
    }

    /// Answers one request (never fails: errors become problem+json responses).
    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        peer: SocketAddr,
    ) -> Response<Body> {
        let _inflight = InflightGuard::request();
        let live = self.live.load_full();
        let method = req.method().clone();
        // Kept for the error log; a `Uri` clone shares its bytes (no copy).
        let uri = req.uri().clone();
        // Rule 13: routes and fingerprints see the normalized path; the upstream gets it as sent.
        let selected = crate::key::path::normalize(uri.path())
            .and_then(|normal| Ok((live.rules.select(&normal, &method)?, normal)));
        let (route, normal) = match selected {
            Ok(s) => s,
            Err(e) => {
                let e = ProxyError::from(e);
                tracing::debug!(%method, status = 400, code = e.code(), "refused: {e}");
                live.rules.default_route().counters.count(Outcome::Rejected);
                return e.response();
            }
        };
        let limit = live.limits.request_timeout;
        let progress = Progress::new(tokio::time::Instant::now() + limit);
        let result = match tokio::time::timeout(
            limit,
            self.handle_inner(&live, route, req, &normal, peer, &progress),
        )
        .await
        {
            Ok(r) => r,
            // Whose fault the timeout is depends on where the request was (rule 15).
            Err(_) => Err(progress.timed_out(limit)),
        };
        let (resp, outcome) = match result {
            Ok(mut resp) => {
                let outcome = resp
                    .extensions_mut()
                    .remove::<Outcome>()
                    .unwrap_or(Outcome::Passthrough);
                (resp, outcome)
            }
            Err(e) => {
                // Logged once, here, where the error becomes a response.
                if e.is_client_error() {
                    tracing::debug!(%method, path = uri.path(), status = e.status().as_u16(), code = e.code(), "refused: {e}");
                } else {
                    tracing::warn!(%method, path = uri.path(), status = e.status().as_u16(), code = e.code(), error = ?e, "failed: {e}");
                }
                (e.response(), e.outcome())
            }
        };
        route.counters.count(outcome);
        resp
    }

    /// The store behind the proxy.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Stops accepting detached work and waits for what is running (shutdown).
    pub async fn drain_tasks(&self) {
        self.tasks.close();
        self.tasks.wait().await;
    }
}

impl ProxyError {
    /// The metrics outcome of a request that ended in this error (errors of claimed requests are
    /// settled, and counted, in `flow`).
    fn outcome(&self) -> Outcome {
        match self {
            Self::FingerprintMismatch => Outcome::Mismatch,
            Self::InFlight { .. } => Outcome::Conflict,
            Self::RequestTimeout(_) => Outcome::RequestTimeout,
            Self::UpstreamTimeout => Outcome::UpstreamTimeout,
            Self::StoreUnavailable(_) => Outcome::StoreUnavailable,
            Self::UpstreamUnreachable(_) | Self::UpstreamFailed(_) => Outcome::Passthrough,
            _ => Outcome::Rejected,
        }
    }
}

/// Tags a response with its outcome for the request counter.
fn tagged(mut resp: Response<Body>, outcome: Outcome) -> Response<Body> {
    resp.extensions_mut().insert(outcome);
    resp
}
