//! The request pipeline. [`Proxy::handle`] takes any request and always answers, with the response and
//! its [`Outcome`]: pass-through traffic is streamed to the upstream untouched; requests under
//! idempotency rules go through the phases in `flow`, one function each: select route → read body →
//! derive key → claim → forward → record → respond.
//!
//! The proxy holds an `Arc<dyn Store>` and an `Arc<dyn` [`Forward`]`>`; it never sees sockets, TLS,
//! sled or Redis types, so tests drive the whole pipeline in-process with the memory store and a
//! scripted upstream. What a config reload may change (routes, rules, upstream, limits) lives in one
//! [`Live`] value swapped atomically: a request keeps the `Live` it started with.
mod derive;
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

use std::{sync::Arc, time::Duration};

use arc_swap::ArcSwap;
use http::Response;
use tokio_util::task::TaskTracker;

pub use error::ProxyError;

use crate::{
    body::Body,
    config::{Config, UpstreamConfig},
    metrics::Outcome,
    store::Store,
    upstream::{self, Forward, UpstreamSetupError},
};

/// A response, and the outcome it is counted under.
pub type Answer = (Response<Body>, Outcome);

/// Builds the upstream a config names (the network client; tests give a scripted one).
pub type MakeUpstream =
    Box<dyn Fn(&UpstreamConfig) -> Result<Arc<dyn Forward>, UpstreamSetupError> + Send + Sync>;

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
    upstream: Arc<dyn Forward>,
    /// `[upstream] timeout`: bound on one exchange (headers and recorded body).
    upstream_timeout: Duration,
    limits: Limits,
    /// Peers whose forwarding headers are believed (rule 16).
    trusted_proxies: Vec<ipnet::IpNet>,
    /// Upstream exchanges at once (shared by every `Live` of one proxy).
    limit: limit::UpstreamLimit,
}

impl Live {
    fn new(
        cfg: &Config,
        limit: limit::UpstreamLimit,
        make_upstream: &MakeUpstream,
    ) -> Result<Self, SetupError> {
        Ok(Self {
            rules: rules::Rules::new(cfg)?,
            upstream: make_upstream(&cfg.upstream)?,
            upstream_timeout: cfg.upstream.timeout,
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
pub struct Proxy {
    live: ArcSwap<Live>,
    store: Arc<dyn Store>,
    make_upstream: MakeUpstream,
    /// Upstream exchanges and recordings: run inline, and moved to a task of their own here if the
    /// client goes away first, so they finish either way; shutdown waits for them (see `detach`).
    tasks: TaskTracker,
    /// Large bodies being replayed now, shared by their readers.
    replays: shared_replays::SharedReplays,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("live", &self.live)
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
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
    /// Builds the proxy for a validated config, forwarding to the upstream it names.
    pub fn new(cfg: &Config, store: Arc<dyn Store>) -> Result<Self, SetupError> {
        Self::with_upstream(
            cfg,
            store,
            Box::new(|cfg| Ok(Arc::new(upstream::Upstream::new(cfg)?))),
        )
    }

    /// Builds the proxy with upstreams made by `make_upstream` (at start and on every reload).
    pub fn with_upstream(
        cfg: &Config,
        store: Arc<dyn Store>,
        make_upstream: MakeUpstream,
    ) -> Result<Self, SetupError> {
        let limit = limit::UpstreamLimit::new(cfg.upstream.max_concurrency);
        Ok(Self {
            live: ArcSwap::from_pointee(Live::new(cfg, limit, &make_upstream)?),
            store,
            make_upstream,
            tasks: TaskTracker::new(),
            replays: shared_replays::SharedReplays::default(),
        })
    }

    /// Applies a reloaded config to new requests; requests already running keep the old one.
    pub fn reload(&self, cfg: &Config) -> Result<(), SetupError> {
        // `upstream.max_concurrency` takes effect after a restart: the slots in use stay counted.
        let limit = self.live.load().limit.clone();
        self.live
            .store(Arc::new(Live::new(cfg, limit, &self.make_upstream)?));
        Ok(())
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
