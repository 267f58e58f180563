//! TLS test kit: a throwaway PKI (rcgen: a CA and leaves with SANs, as PEM files), HTTPS clients over
//! tokio-rustls with a chosen ALPN (HTTP/1.1 or h2, optional client certificate), and a small HTTPS
//! upstream whose certificate can be swapped while it runs.
//!
//! Every rustls config here is built with `builder_with_provider(ring)`: no process-wide default
//! provider is needed (or installed). Every network wait is bounded.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio_rustls::{client::TlsStream, TlsAcceptor, TlsConnector};

use super::client::{Resp, REQUEST_TIMEOUT};

/// The crypto provider of every config built here (the one the proxy uses).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A certificate authority that signs leaves.
pub struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").finish_non_exhaustive()
    }
}

/// A leaf certificate and its private key.
#[derive(Debug, Clone)]
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
    pub der: CertificateDer<'static>,
    key_der: Vec<u8>,
}

/// What a leaf is for (its extended key usage).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    Server,
    Client,
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        Ca { issuer }
    }

    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    pub fn der(&self) -> CertificateDer<'static> {
        self.issuer.der().clone()
    }

    /// A leaf for `sans` (DNS names or IP addresses), signed by this CA.
    pub fn leaf(&self, sans: &[&str], usage: Usage) -> Leaf {
        let mut params =
            CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        params.distinguished_name.push(
            DnType::CommonName,
            sans.first().copied().unwrap_or("client"),
        );
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![match usage {
            Usage::Server => ExtendedKeyUsagePurpose::ServerAuth,
            Usage::Client => ExtendedKeyUsagePurpose::ClientAuth,
        }];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &*self.issuer).unwrap();
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().clone(),
            key_der: key.serialize_der(),
        }
    }

    /// A server leaf for 127.0.0.1 and localhost.
    pub fn server_leaf(&self) -> Leaf {
        self.leaf(&["127.0.0.1", "localhost"], Usage::Server)
    }

    /// A client leaf.
    pub fn client_leaf(&self, name: &str) -> Leaf {
        self.leaf(&[name], Usage::Client)
    }
}

impl Leaf {
    fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::try_from(self.key_der.clone()).unwrap()
    }

    /// Writes `{name}.crt` and `{name}.key` into `dir`; returns their paths.
    pub fn write(&self, dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let cert = write(dir, &format!("{name}.crt"), &self.cert_pem);
        let key = write(dir, &format!("{name}.key"), &self.key_pem);
        (cert, key)
    }
}

/// Writes `text` to `dir/name`; returns the path.
pub fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// A path as a TOML literal string.
pub fn toml_path(p: &Path) -> String {
    format!("'{}'", p.display())
}

/// A client config trusting `cas`, offering `alpn`, presenting `identity` if given.
pub fn client_config(cas: &[&Ca], alpn: &[&[u8]], identity: Option<&Leaf>) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for ca in cas {
        roots.add(ca.der()).unwrap();
    }
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let mut cfg = match identity {
        None => builder.with_no_client_auth(),
        Some(leaf) => builder
            .with_client_auth_cert(vec![leaf.der.clone()], leaf.key())
            .unwrap(),
    };
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(cfg)
}

/// A server config for `leaf`, offering `alpn`, requiring client certificates signed by `client_ca`.
pub fn server_config(leaf: &Leaf, alpn: &[&[u8]], client_ca: Option<&Ca>) -> ServerConfig {
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap();
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            roots.add(ca.der()).unwrap();
            let v = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider(),
            )
            .build()
            .unwrap();
            builder.with_client_cert_verifier(v)
        }
    };
    let mut cfg = builder
        .with_single_cert(vec![leaf.der.clone()], leaf.key())
        .unwrap();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    cfg
}

/// TLS-connects to `addr` (server name 127.0.0.1), bounded by [`REQUEST_TIMEOUT`].
pub async fn connect(
    addr: SocketAddr,
    cfg: &Arc<ClientConfig>,
) -> Result<TlsStream<TcpStream>, String> {
    let fut = async {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let name = ServerName::IpAddress(addr.ip().into());
        TlsConnector::from(Arc::clone(cfg))
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS handshake: {e}"))
    };
    match tokio::time::timeout(REQUEST_TIMEOUT, fut).await {
        Ok(r) => r,
        Err(_) => Err(format!("TLS connect timed out after {REQUEST_TIMEOUT:?}")),
    }
}

/// A response over TLS, with the protocol that carried it.
#[derive(Debug)]
pub struct TlsResp {
    pub resp: Resp,
    /// The ALPN protocol the server picked.
    pub alpn: Option<Vec<u8>>,
    pub version: http::Version,
}

/// One request over a new TLS connection: HTTP/2 if the server picked `h2` by ALPN, else HTTP/1.1.
/// Errors (handshake refused, connection reset by a rejecting server, timeout) are returned.
pub async fn https_send(
    addr: SocketAddr,
    cfg: &Arc<ClientConfig>,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<TlsResp, String> {
    let body = Bytes::copy_from_slice(body);
    let fut = async {
        let tls = connect(addr, cfg).await?;
        let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
        let mut builder = Request::builder().method(method);
        for (n, v) in headers {
            builder = builder.header(*n, *v);
        }
        let io = TokioIo::new(tls);
        let resp = if alpn.as_deref() == Some(b"h2") {
            let req = builder
                .uri(format!("https://{addr}{path}"))
                .body(Full::new(body))
                .unwrap();
            let (mut sender, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                    .await
                    .map_err(|e| format!("h2 handshake: {e}"))?;
            tokio::spawn(conn);
            sender
                .send_request(req)
                .await
                .map_err(|e| format!("send: {e:?}"))?
        } else {
            let req = builder
                .uri(path)
                .header("host", addr.to_string())
                .body(Full::new(body))
                .unwrap();
            let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
                .await
                .map_err(|e| format!("handshake: {e}"))?;
            tokio::spawn(conn);
            sender
                .send_request(req)
                .await
                .map_err(|e| format!("send: {e:?}"))?
        };
        let (parts, body) = resp.into_parts();
        let body = body
            .collect()
            .await
            .map_err(|e| format!("reading body: {e}"))?
            .to_bytes();
        Ok(TlsResp {
            resp: Resp {
                status: parts.status.as_u16(),
                headers: parts.headers,
                body,
            },
            alpn,
            version: parts.version,
        })
    };
    match tokio::time::timeout(REQUEST_TIMEOUT, fut).await {
        Ok(r) => r,
        Err(_) => Err(format!("timed out after {REQUEST_TIMEOUT:?}")),
    }
}

/// Like [`https_send`], panicking on error.
pub async fn https(
    addr: SocketAddr,
    cfg: &Arc<ClientConfig>,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> TlsResp {
    https_send(addr, cfg, method, path, headers, body)
        .await
        .unwrap_or_else(|e| panic!("{method} {path} over TLS to {addr} failed: {e}"))
}

/// The certificate a TLS server at `addr` presents (the first of its chain).
pub async fn peer_certificate(
    addr: SocketAddr,
    cfg: &Arc<ClientConfig>,
) -> CertificateDer<'static> {
    let tls = connect(addr, cfg)
        .await
        .unwrap_or_else(|e| panic!("TLS connect to {addr}: {e}"));
    tls.get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .cloned()
        .expect("server presented no certificate")
}

/// An HTTPS upstream on 127.0.0.1 that answers every request `200` with
/// `tls-upstream {HTTP version} {METHOD} {path} client-cert={bool} hit={n}`; its server config (certificate,
/// ALPN, client auth) can be replaced while it runs, for new connections. Stops when dropped.
pub struct TlsUpstream {
    pub addr: SocketAddr,
    config: Arc<Mutex<Arc<ServerConfig>>>,
    hits: Arc<AtomicUsize>,
    stop: Option<oneshot::Sender<()>>,
}

impl std::fmt::Debug for TlsUpstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsUpstream")
            .field("addr", &self.addr)
            .finish()
    }
}

impl TlsUpstream {
    /// Binds 127.0.0.1:0 and serves (on the calling runtime).
    pub async fn start(cfg: ServerConfig) -> TlsUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let config = Arc::new(Mutex::new(Arc::new(cfg)));
        let hits = Arc::new(AtomicUsize::new(0));
        let (stop_tx, mut stop_rx) = oneshot::channel::<()>();
        let (cfg2, hits2) = (config.clone(), hits.clone());
        tokio::spawn(async move {
            loop {
                let (tcp, _) = tokio::select! {
                    _ = &mut stop_rx => return,
                    a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
                };
                let acceptor = TlsAcceptor::from(cfg2.lock().unwrap().clone());
                let hits = hits2.clone();
                tokio::spawn(async move {
                    let accepted =
                        tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp));
                    let Ok(Ok(tls)) = accepted.await else { return };
                    let client_cert = tls.get_ref().1.peer_certificates().is_some();
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let hits = hits.clone();
                        async move {
                            let version = req.version();
                            let method = req.method().clone();
                            let path = req.uri().path().to_owned();
                            let _ = req.into_body().collect().await;
                            let n = hits.fetch_add(1, Ordering::SeqCst) + 1;
                            let body = format!(
                                "tls-upstream {version:?} {method} {path} client-cert={client_cert} hit={n}"
                            );
                            Ok::<_, std::convert::Infallible>(
                                Response::builder()
                                    .header("content-type", "text/plain")
                                    .body(Full::new(Bytes::from(body)))
                                    .unwrap(),
                            )
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        TlsUpstream {
            addr,
            config,
            hits,
            stop: Some(stop_tx),
        }
    }

    /// `https://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// Requests answered so far.
    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    /// Use `cfg` for every new connection from now on.
    pub fn set_config(&self, cfg: ServerConfig) {
        *self.config.lock().unwrap() = Arc::new(cfg);
    }
}

impl Drop for TlsUpstream {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}
