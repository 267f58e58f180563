//! The request pipeline. [`Proxy::handle`] takes any request and always answers: pass-through traffic is
//! streamed to the upstream untouched; requests under idempotency rules go through the phases in
//! `flow`: select route → buffer body → derive key → claim → forward → record → respond.
//!
//! The proxy holds an `Arc<dyn Store>` and an [`upstream::Upstream`]; it never sees sockets, TLS, sled or
//! Redis types.

pub mod body;
pub mod error;
mod flow;
pub mod headers;
pub mod replay;
pub mod rules;
pub mod upstream;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use http::{Request, Response};
use hyper::body::Incoming;
use tokio_util::task::TaskTracker;

pub use body::Body;
pub use error::ProxyError;

use crate::{config::Config, store::Store};

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

/// The idempotency proxy.
#[derive(Debug)]
pub struct Proxy {
    rules: rules::Rules,
    store: Arc<dyn Store>,
    upstream: upstream::Upstream,
    limits: Limits,
    /// Upstream exchanges and recordings run here, detached from the client's connection, so they
    /// finish even if the client goes away; shutdown waits for them.
    tasks: TaskTracker,
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
            rules: rules::Rules::new(cfg)?,
            store,
            upstream: upstream::Upstream::new(&cfg.upstream)?,
            limits: Limits {
                max_request_body: cfg.server.max_request_body,
                max_response_body: cfg.server.max_response_body,
                request_timeout: cfg.server.request_timeout,
            },
            tasks: TaskTracker::new(),
        })
    }

    /// Answers one request (never fails: errors become problem+json responses).
    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        peer: SocketAddr,
    ) -> Response<Body> {
        let method = req.method().clone();
        let path = req.uri().path().to_owned();
        let result = match tokio::time::timeout(
            self.limits.request_timeout,
            Arc::clone(&self).handle_inner(req, peer),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => Err(ProxyError::UpstreamTimeout),
        };
        match result {
            Ok(resp) => resp,
            Err(e) => {
                // Logged once, here, where the error becomes a response.
                if e.is_client_error() {
                    tracing::debug!(%method, %path, status = e.status().as_u16(), code = e.code(), "refused: {e}");
                } else {
                    tracing::warn!(%method, %path, status = e.status().as_u16(), code = e.code(), error = ?e, "failed: {e}");
                }
                e.response()
            }
        }
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
