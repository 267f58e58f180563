//! The upstream client: pooled hyper-util clients over a hyper-rustls connector (plain HTTP, or HTTPS
//! with SNI from the URL host and HTTP/2 when the upstream's ALPN offers it), and errors that say
//! whether the upstream may have seen the request (pingora's error provenance: it decides between
//! "free the key" and "we cannot know, treat as executed").
//!
//! Trust for an https upstream: `ca_file` alone when set, else the bundled Mozilla roots
//! (webpki-roots); `client_auth` adds a client certificate (mTLS).
//!
//! Connect failures — TCP refused, TLS handshake failed (wrong CA, bad name) or no connection within
//! `connect_timeout` — all happen before a byte of the request leaves: they are
//! [`UpstreamError::Connect`], and the flow frees the key.

use std::{sync::Arc, time::Duration};

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
use rustls::{
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer},
    ClientConfig, RootCertStore,
};

use thread_local::ThreadLocal;

use super::body::{Body, BoxError};
use crate::config::UpstreamConfig;

type Connector = HttpsConnector<HttpConnector>;

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
    /// A PEM file could not be read or parsed.
    #[error("{key}: cannot read {path}: {cause}")]
    Read {
        /// Config key (`upstream.ca_file`, …).
        key: &'static str,
        /// The file.
        path: String,
        /// Cause.
        cause: rustls::pki_types::pem::Error,
    },
    /// The file holds no item of the expected kind.
    #[error("{key}: no PEM {what} found in {path}")]
    Empty {
        /// Config key.
        key: &'static str,
        /// The file.
        path: String,
        /// "certificate" or "private key".
        what: &'static str,
    },
    /// rustls refused a CA certificate, or the client certificate and key.
    #[error("{key}: {cause}")]
    Tls {
        /// Config key.
        key: &'static str,
        /// Cause.
        cause: rustls::Error,
    },
}

/// The upstream: where every forwarded request goes.
#[derive(Debug, Clone)]
pub struct Upstream {
    /// h2 or HTTP/1.1, as the upstream's ALPN decides (HTTP/1.1 for plain http): one pool per
    /// thread, so a request and its upstream connection run on the same serving thread (see
    /// `server::Workers`); built on a thread's first request.
    clients: Arc<ThreadLocal<Client<Connector, Body>>>,
    /// What the per-thread clients are built from.
    settings: Arc<(UpstreamConfig, ClientConfig)>,
    /// HTTP/1.1 only: protocol upgrades (WebSocket) exist only there.
    upgrade_client: Client<Connector, Body>,
    scheme: http::uri::Scheme,
    authority: http::uri::Authority,
    host: HeaderValue,
    base_path: String,
    connect_timeout: Duration,
    /// Bound on one exchange (headers and recorded body).
    pub timeout: Duration,
}

impl Upstream {
    /// Builds the pooled clients; reads the CA and client-certificate files.
    pub fn new(cfg: &UpstreamConfig) -> Result<Self, UpstreamSetupError> {
        let tls = client_tls(cfg)?;
        let upgrade_client = build_client(cfg, tls.clone(), false);
        let authority = cfg
            .url
            .authority()
            .cloned()
            .unwrap_or_else(|| http::uri::Authority::from_static("localhost"));
        let host = HeaderValue::from_str(authority.as_str())
            .unwrap_or_else(|_| HeaderValue::from_static("localhost"));
        Ok(Self {
            clients: Arc::new(ThreadLocal::new()),
            settings: Arc::new((cfg.clone(), tls)),
            upgrade_client,
            scheme: cfg.url.scheme().cloned().unwrap_or(http::uri::Scheme::HTTP),
            authority,
            host,
            base_path: cfg.url.path().trim_end_matches('/').to_owned(),
            connect_timeout: cfg.connect_timeout,
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
        let client = self
            .clients
            .get_or(|| build_client(&self.settings.0, self.settings.1.clone(), true));
        self.send_on(client, req, timeout).await
    }

    /// Sends a protocol-upgrade request over HTTP/1.1 (whatever ALPN would pick) and waits (at most
    /// `timeout`) for the response head; a `101` response can then be upgraded with
    /// `hyper::upgrade::on`.
    pub async fn send_upgrade(
        &self,
        req: Request<Body>,
        timeout: Duration,
    ) -> Result<Response<Incoming>, UpstreamError> {
        self.send_on(&self.upgrade_client, req, timeout).await
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
        let first = self.connect_timeout.min(timeout);
        match tokio::time::timeout(first, &mut fut).await {
            Ok(r) => return classify(r),
            Err(_) if conn.connection_metadata().is_none() => {
                return Err(UpstreamError::Connect(Box::new(ConnectTimeout(first))));
            }
            Err(_) => {}
        }
        // Phase 2: connected, the request may be on its way; the rest of the budget applies.
        match tokio::time::timeout(timeout.saturating_sub(first), &mut fut).await {
            Err(_) => Err(UpstreamError::Timeout),
            Ok(r) => classify(r),
        }
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

/// The rustls client config: trust (`ca_file` or the web roots) and the optional client identity. ALPN
/// is set by the connector builder.
fn client_tls(cfg: &UpstreamConfig) -> Result<ClientConfig, UpstreamSetupError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    match &cfg.ca_file {
        Some(path) => {
            for ca in read_certs("upstream.ca_file", path)? {
                roots.add(ca).map_err(|source| UpstreamSetupError::Tls {
                    key: "upstream.ca_file",
                    cause: source,
                })?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|source| UpstreamSetupError::Tls {
            key: "upstream",
            cause: source,
        })?
        .with_root_certificates(roots);
    match &cfg.client_auth {
        None => Ok(builder.with_no_client_auth()),
        Some(id) => {
            let certs = read_certs("upstream.client_cert", &id.cert)?;
            let key = read_key("upstream.client_key", &id.key)?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|source| UpstreamSetupError::Tls {
                    key: "upstream.client_cert",
                    cause: source,
                })
        }
    }
}

fn read_certs(
    key: &'static str,
    path: &std::path::Path,
) -> Result<Vec<CertificateDer<'static>>, UpstreamSetupError> {
    let read_err = |source| UpstreamSetupError::Read {
        key,
        path: path.display().to_string(),
        cause: source,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(read_err)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(read_err)?;
    if certs.is_empty() {
        return Err(UpstreamSetupError::Empty {
            key,
            path: path.display().to_string(),
            what: "certificate",
        });
    }
    Ok(certs)
}

fn read_key(
    key: &'static str,
    path: &std::path::Path,
) -> Result<PrivateKeyDer<'static>, UpstreamSetupError> {
    PrivateKeyDer::from_pem_file(path).map_err(|source| match source {
        rustls::pki_types::pem::Error::NoItemsFound => UpstreamSetupError::Empty {
            key,
            path: path.display().to_string(),
            what: "private key",
        },
        source => UpstreamSetupError::Read {
            key,
            path: path.display().to_string(),
            cause: source,
        },
    })
}
