//! The upstream client, and errors that say whether the upstream may have seen the request (pingora's
//! error provenance: it decides between "free the key" and "we cannot know, treat as executed").
//!
//! - A plain `http` upstream: our own HTTP/1.1 connections, pooled per serving thread (see `pool`).
//! - An `https` upstream: hyper-util's pooled client over a hyper-rustls connector (SNI from the URL
//!   host, HTTP/2 when the upstream's ALPN offers it), one per serving thread.
//! - Protocol upgrades (WebSocket): hyper-util's client, HTTP/1.1 only.
//!
//! One deadline bounds an exchange: `connect_timeout` the connection (TCP and TLS handshake), the
//! request's budget the whole exchange up to the response head.
//!
//! Trust for an https upstream: `ca_file` alone when set, else the bundled Mozilla roots
//! (webpki-roots); `client_auth` adds a client certificate (mTLS).
//!
//! The pipeline sees only the [`Forward`] trait (rust-rpxy's `ForwardRequest` seam): [`Upstream`] is
//! the network implementation; tests put a scripted one in its place and run the whole pipeline
//! in-process.
//!
//! Connect failures — TCP refused, TLS handshake failed (wrong CA, bad name) or no connection within
//! `connect_timeout` — all happen before a byte of the request leaves: they are
//! [`UpstreamError::Connect`], and the flow frees the key.

use std::{future::Future, pin::Pin, sync::Arc, time::Duration};

use http::{uri::PathAndQuery, HeaderValue, Request, Response, Uri};
use hyper::body::Incoming;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::{
    client::legacy::{
        connect::{capture_connection, HttpConnector},
        Client,
    },
    rt::{TokioExecutor, TokioTimer},
};
use rustls::ClientConfig;
use thread_local::ThreadLocal;
use tokio::time::{timeout_at, Instant};

mod pool;
mod tls;

pub use pool::ResponseBody;

use crate::body::{Body, BoxError};
use crate::config::UpstreamConfig;

type Connector = HttpsConnector<HttpConnector>;

/// What a [`Forward::send`] resolves to: the response head, or why there is none.
pub type SendFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Response<ResponseBody>, UpstreamError>> + Send + 'a>>;

/// Where forwarded requests go: the one seam between the pipeline and the network.
///
/// A request arrives with its head already prepared by the proxy (hop-by-hop headers out, forwarding
/// headers in) and its URI in the client's form (path and query as sent); the forwarder points it at
/// its upstream (URI, `Host`) and sends it. Its error says whether anything may have been sent
/// ([`UpstreamError::Connect`] means nothing was), which decides whether a key may be freed.
pub trait Forward: Send + Sync + std::fmt::Debug + 'static {
    /// Sends a request and waits (at most `timeout`) for the response head.
    fn send(&self, req: Request<Body>, timeout: Duration) -> SendFuture<'_>;

    /// Sends a protocol-upgrade request (`Connection: upgrade` restored by the caller); a `101`
    /// response can then be upgraded with `hyper::upgrade::on`. Forwarders that cannot tunnel refuse
    /// before sending anything.
    fn send_upgrade(&self, req: Request<Body>, timeout: Duration) -> SendFuture<'_> {
        let _ = (req, timeout);
        Box::pin(async {
            Err(UpstreamError::Connect(
                "this upstream does not tunnel".into(),
            ))
        })
    }
}

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

/// No connection within `connect_timeout` (TCP and TLS handshake together).
#[derive(Debug, thiserror::Error)]
#[error("no connection to the upstream within {0:?}")]
pub struct ConnectTimeout(pub Duration);

/// Why the upstream client could not be built (at startup or on reload).
/// The cause is part of the message (not a `source()`), so a chain printer does not repeat it.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamSetupError {
    /// A PEM file could not be read or parsed, or holds no item of the expected kind.
    #[error(transparent)]
    Pem(#[from] crate::pem::PemError),
    /// rustls refused a CA certificate, or the client certificate and key.
    #[error("{key}: {cause}")]
    Tls {
        /// Config key.
        key: &'static str,
        /// Cause.
        cause: rustls::Error,
    },
}

/// How forwarded requests reach the upstream.
#[derive(Debug, Clone)]
enum Transport {
    /// Plain http: our HTTP/1.1 pool.
    Http1(Arc<pool::Pool>),
    /// https: h2 or HTTP/1.1, as the upstream's ALPN decides; one pooled client per thread, built on a
    /// thread's first request from `settings`.
    Tls {
        clients: Arc<ThreadLocal<Client<Connector, Body>>>,
        settings: Arc<(UpstreamConfig, ClientConfig)>,
    },
}

/// The upstream: where every forwarded request goes.
#[derive(Debug, Clone)]
pub struct Upstream {
    transport: Transport,
    /// HTTP/1.1 only: protocol upgrades (WebSocket) exist only there.
    upgrade_client: Client<Connector, Body>,
    scheme: http::uri::Scheme,
    authority: http::uri::Authority,
    host: HeaderValue,
    base_path: String,
    connect_timeout: Duration,
}

impl Upstream {
    /// Builds the clients; reads the CA and client-certificate files.
    pub fn new(cfg: &UpstreamConfig) -> Result<Self, UpstreamSetupError> {
        let tls = tls::client_tls(cfg)?;
        let upgrade_client = build_client(cfg, tls.clone(), false);
        let authority = cfg
            .url
            .authority()
            .cloned()
            .unwrap_or_else(|| http::uri::Authority::from_static("localhost"));
        let host = HeaderValue::from_str(authority.as_str())
            .unwrap_or_else(|_| HeaderValue::from_static("localhost"));
        let scheme = cfg.url.scheme().cloned().unwrap_or(http::uri::Scheme::HTTP);
        let transport = if scheme == http::uri::Scheme::HTTP {
            Transport::Http1(pool::Pool::new())
        } else {
            Transport::Tls {
                clients: Arc::new(ThreadLocal::new()),
                settings: Arc::new((cfg.clone(), tls)),
            }
        };
        Ok(Self {
            transport,
            upgrade_client,
            scheme,
            authority,
            host,
            base_path: cfg.url.path().trim_end_matches('/').to_owned(),
            connect_timeout: cfg.connect_timeout,
        })
    }

    /// Points a request at the upstream: `Host` becomes its authority (whatever the client sent), and
    /// the URI its base path followed by the client's path and query. Nothing is sent yet.
    fn target(&self, req: &mut Request<Body>) -> Result<(), UpstreamError> {
        req.headers_mut()
            .insert(http::header::HOST, self.host.clone());
        *req.uri_mut() = self
            .uri_for(req.uri().path_and_query())
            .map_err(|e| UpstreamError::Connect(Box::new(e)))?;
        Ok(())
    }

    /// The URI of a request path on the upstream, built once in the form its transport sends: origin
    /// form (`/path?query`) for our HTTP/1.1 pool, absolute form for hyper-util's client. Without a
    /// base path, the client's path and query are reused as they are (no copy).
    fn uri_for(&self, pq: Option<&PathAndQuery>) -> Result<Uri, http::Error> {
        let pq = match pq {
            Some(pq) if self.base_path.is_empty() => pq.clone(),
            pq => PathAndQuery::try_from(format!(
                "{}{}",
                self.base_path,
                pq.map_or("/", PathAndQuery::as_str)
            ))?,
        };
        match self.transport {
            Transport::Http1(_) => Ok(Uri::from(pq)),
            Transport::Tls { .. } => self.absolute(pq),
        }
    }

    /// `pq` on the upstream, in absolute form.
    fn absolute(&self, pq: PathAndQuery) -> Result<Uri, http::Error> {
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(pq)
            .build()
    }

    /// Sends a request and waits (at most `timeout`) for the response head.
    async fn send_request(
        &self,
        mut req: Request<Body>,
        timeout: Duration,
    ) -> Result<Response<ResponseBody>, UpstreamError> {
        self.target(&mut req)?;
        match &self.transport {
            Transport::Http1(pool) => self.send_pooled(pool, req, timeout).await,
            Transport::Tls { clients, settings } => {
                let client = clients.get_or(|| build_client(&settings.0, settings.1.clone(), true));
                let resp = self.send_on(client, req, timeout).await?;
                Ok(resp.map(ResponseBody::unpooled))
            }
        }
    }

    /// Sends a protocol-upgrade request over HTTP/1.1, whatever ALPN would pick.
    async fn send_upgrade_request(
        &self,
        mut req: Request<Body>,
        timeout: Duration,
    ) -> Result<Response<ResponseBody>, UpstreamError> {
        self.target(&mut req)?;
        // hyper-util's client wants the absolute form (`uri_for` gives the pool's origin form).
        if req.uri().scheme().is_none() {
            let pq = req.uri().path_and_query().cloned();
            *req.uri_mut() = self
                .absolute(pq.unwrap_or_else(|| PathAndQuery::from_static("/")))
                .map_err(|e| UpstreamError::Connect(Box::new(e)))?;
        }
        // The response keeps its extensions, the connection's upgrade among them.
        let resp = self.send_on(&self.upgrade_client, req, timeout).await?;
        Ok(resp.map(ResponseBody::unpooled))
    }

    /// On our HTTP/1.1 pool: an idle connection of this thread, or a new one within
    /// `connect_timeout`. A request a stale idle connection could not send goes on the next one.
    async fn send_pooled(
        &self,
        pool: &Arc<pool::Pool>,
        mut req: Request<Body>,
        timeout: Duration,
    ) -> Result<Response<ResponseBody>, UpstreamError> {
        let now = Instant::now();
        let deadline = now + timeout;
        let first = self.connect_timeout.min(timeout);
        // The URI is in origin form already (`uri_for`); `Host` is set by the caller.
        loop {
            let (mut sender, reused) = match pool.checkout() {
                Some(s) => (s, true),
                None => match timeout_at(now + first, pool::Pool::connect(&self.authority)).await {
                    Ok(Ok(s)) => (s, false),
                    Ok(Err(e)) => return Err(UpstreamError::Connect(Box::new(e))),
                    Err(_) => return Err(UpstreamError::Connect(Box::new(ConnectTimeout(first)))),
                },
            };
            match timeout_at(deadline, sender.ready()).await {
                Ok(Ok(())) => {}
                // Closed while idle: the next one.
                Ok(Err(_)) if reused => continue,
                Ok(Err(e)) => return Err(UpstreamError::Connect(Box::new(e))),
                Err(_) => return Err(UpstreamError::Connect(Box::new(ConnectTimeout(timeout)))),
            }
            match timeout_at(deadline, sender.try_send_request(req)).await {
                Err(_) => return Err(UpstreamError::Timeout),
                Ok(Ok(resp)) => {
                    let (head, body) = resp.into_parts();
                    return Ok(Response::from_parts(head, pool.body(body, sender)));
                }
                Ok(Err(mut e)) => match e.take_message() {
                    // Not written: a stale idle connection; nothing was sent.
                    Some(r) if reused => req = r,
                    Some(_) => return Err(UpstreamError::Connect(Box::new(e.into_error()))),
                    None => return Err(UpstreamError::Failed(Box::new(e.into_error()))),
                },
            }
        }
    }

    async fn send_on(
        &self,
        client: &Client<Connector, Body>,
        mut req: Request<Body>,
        timeout: Duration,
    ) -> Result<Response<Incoming>, UpstreamError> {
        // Set once the client holds a connection, just before it writes the request: until then,
        // nothing has been sent, whatever goes wrong.
        let conn = capture_connection(&mut req);
        let fut = client.request(req);
        tokio::pin!(fut);
        let classify = |r: Result<Response<Incoming>, hyper_util::client::legacy::Error>| match r {
            Ok(resp) => Ok(resp),
            // A connect error (TCP or TLS handshake) means no byte of the request left this process.
            Err(e) if e.is_connect() => Err(UpstreamError::Connect(Box::new(e))),
            Err(e) => Err(UpstreamError::Failed(Box::new(e))),
        };
        // Phase 1: the connection. `connect_timeout` bounds TCP and TLS together; the HTTP connector's
        // own timeout only covers TCP, and a stalled TLS handshake would otherwise look like an
        // exchange that timed out after sending.
        let now = Instant::now();
        let first = self.connect_timeout.min(timeout);
        match timeout_at(now + first, &mut fut).await {
            Ok(r) => return classify(r),
            Err(_) if conn.connection_metadata().is_none() => {
                return Err(UpstreamError::Connect(Box::new(ConnectTimeout(first))));
            }
            Err(_) => {}
        }
        // Phase 2: connected, the request may be on its way; the rest of the budget applies.
        match timeout_at(now + timeout, &mut fut).await {
            Err(_) => Err(UpstreamError::Timeout),
            Ok(r) => classify(r),
        }
    }
}

impl Forward for Upstream {
    fn send(&self, req: Request<Body>, timeout: Duration) -> SendFuture<'_> {
        Box::pin(self.send_request(req, timeout))
    }

    fn send_upgrade(&self, req: Request<Body>, timeout: Duration) -> SendFuture<'_> {
        Box::pin(self.send_upgrade_request(req, timeout))
    }
}

/// One pooled client. `any_version`: offer h2 and http/1.1 by ALPN (HTTP/2 when the upstream picks
/// it); otherwise HTTP/1.1 only.
fn build_client(
    cfg: &UpstreamConfig,
    tls: ClientConfig,
    any_version: bool,
) -> Client<Connector, Body> {
    let mut http = HttpConnector::new();
    // The HTTPS connector checks the scheme; the HTTP one must let https URIs through to it.
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(cfg.connect_timeout));
    http.set_keepalive(Some(Duration::from_secs(60)));
    let builder = HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http();
    let connector = if any_version {
        builder.enable_all_versions().wrap_connector(http)
    } else {
        builder.enable_http1().wrap_connector(http)
    };
    Client::builder(TokioExecutor::new())
        // pool_idle_timeout is ignored without a timer (see DEPENDENCIES.md).
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(1024)
        .timer(TokioTimer::new())
        .build(connector)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::body::empty;

    fn upstream(url: &str) -> Upstream {
        let cfg = UpstreamConfig {
            url: url.parse().unwrap(),
            connect_timeout: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            max_concurrency: 1,
            ca_file: None,
            client_auth: None,
        };
        Upstream::new(&cfg).unwrap()
    }

    fn targeted(up: &Upstream, uri: &str) -> Request<Body> {
        let mut req = Request::post(uri)
            .header(http::header::HOST, "client.example")
            .body(empty())
            .unwrap();
        up.target(&mut req).unwrap();
        req
    }

    #[test]
    fn host_is_the_upstreams_authority_and_the_path_goes_under_its_base_path() {
        // Rule 9: `Host` becomes the upstream's authority, whatever the client sent.
        let plain = upstream("http://up.test:8080");
        let req = targeted(&plain, "/pay?x=1");
        assert_eq!(req.headers()[http::header::HOST], "up.test:8080");
        assert_eq!(req.uri(), "/pay?x=1", "origin form for the pool");

        let based = upstream("http://up.test:8080/base/");
        assert_eq!(targeted(&based, "/pay?x=1").uri(), "/base/pay?x=1");

        let tls = upstream("https://secure.test");
        let req = targeted(&tls, "/pay");
        assert_eq!(req.headers()[http::header::HOST], "secure.test");
        assert_eq!(
            req.uri(),
            "https://secure.test/pay",
            "absolute form for hyper-util"
        );
    }
}
