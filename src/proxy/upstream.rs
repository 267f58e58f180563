//! The upstream client: a pooled hyper-util HTTP/1.1 client, and errors that say whether the upstream
//! may have seen the request (pingora's error provenance: it decides between "free the key" and "we
//! cannot know, treat as executed").

use std::time::Duration;

use http::{uri::PathAndQuery, HeaderValue, Request, Response, Uri};
use hyper::body::Incoming;
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client},
    rt::{TokioExecutor, TokioTimer},
};

use super::body::{Body, BoxError};
use crate::config::UpstreamConfig;

/// How an upstream exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// No connection could be made: nothing was sent.
    #[error("connect failed: {0}")]
    Connect(#[source] BoxError),
    /// No answer within the timeout (the request may have been processed).
    #[error("timed out")]
    Timeout,
    /// The exchange broke after sending began (the request may have been processed).
    #[error("exchange failed: {0}")]
    Failed(#[source] BoxError),
}

/// Why the upstream client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamSetupError {
    /// `https://` upstreams need the TLS client, which this build does not include yet.
    #[error("upstream {0}: https upstreams are not supported by this build yet (use http://)")]
    HttpsUnsupported(String),
}

/// The upstream: where every forwarded request goes.
#[derive(Debug, Clone)]
pub struct Upstream {
    client: Client<HttpConnector, Body>,
    scheme: http::uri::Scheme,
    authority: http::uri::Authority,
    host: HeaderValue,
    base_path: String,
    /// Bound on one exchange (headers and recorded body).
    pub timeout: Duration,
}

impl Upstream {
    /// Builds the pooled client.
    pub fn new(cfg: &UpstreamConfig) -> Result<Self, UpstreamSetupError> {
        if cfg.url.scheme_str() == Some("https") {
            return Err(UpstreamSetupError::HttpsUnsupported(cfg.url.to_string()));
        }
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(cfg.connect_timeout));
        connector.set_keepalive(Some(Duration::from_secs(60)));
        let client = Client::builder(TokioExecutor::new())
            // pool_idle_timeout is ignored without a timer (see DEPENDENCIES.md).
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(1024)
            .build(connector);
        let authority = cfg
            .url
            .authority()
            .cloned()
            .unwrap_or_else(|| http::uri::Authority::from_static("localhost"));
        let host = HeaderValue::from_str(authority.as_str())
            .unwrap_or_else(|_| HeaderValue::from_static("localhost"));
        Ok(Self {
            client,
            scheme: cfg.url.scheme().cloned().unwrap_or(http::uri::Scheme::HTTP),
            authority,
            host,
            base_path: cfg.url.path().trim_end_matches('/').to_owned(),
            timeout: cfg.timeout,
        })
    }

    /// The `Host` the upstream gets (its own authority, whatever the client sent).
    pub fn host(&self) -> HeaderValue {
        self.host.clone()
    }

    /// The absolute URI of a request path on the upstream.
    pub fn uri_for(&self, pq: Option<&PathAndQuery>) -> Result<Uri, http::Error> {
        let pq = pq.map_or("/", PathAndQuery::as_str);
        let full = if self.base_path.is_empty() {
            pq.to_owned()
        } else {
            format!("{}{pq}", self.base_path)
        };
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(full)
            .build()
    }

    /// Sends a request and waits (at most `timeout`) for the response head.
    pub async fn send(
        &self,
        req: Request<Body>,
        timeout: Duration,
    ) -> Result<Response<Incoming>, UpstreamError> {
        match tokio::time::timeout(timeout, self.client.request(req)).await {
            Err(_) => Err(UpstreamError::Timeout),
            Ok(Ok(resp)) => Ok(resp),
            // A connect error means no byte of the request left this process.
            Ok(Err(e)) if e.is_connect() => Err(UpstreamError::Connect(Box::new(e))),
            Ok(Err(e)) => Err(UpstreamError::Failed(Box::new(e))),
        }
    }
}
