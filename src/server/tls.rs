//! TLS termination for the client-facing listener: a rustls [`ServerConfig`] built from PEM files
//! (ring provider, ALPN `h2` then `http/1.1`, optional client-certificate verification), a bounded
//! handshake, and a reload that swaps the whole config atomically.
//!
//! Invariants:
//! - Every handshake uses the config that was current when it started; a reload never touches a
//!   connection that is already up.
//! - A reload that fails (missing file, bad PEM, key not matching the certificate, bad client CA) changes
//!   nothing: the running certificates stay in use and the error says which file is at fault.

use std::{fmt, io, path::PathBuf, sync::Arc, time::Duration};

use arc_swap::ArcSwap;
use rustls::{server::WebPkiClientVerifier, RootCertStore, ServerConfig};
use tokio::net::TcpStream;
use tokio_rustls::{server::TlsStream, TlsAcceptor};

use crate::{
    config::TlsConfig,
    pem::{read_certs, read_key, PemError},
};

/// ALPN protocols offered to clients, in order of preference.
pub const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// Why a TLS server config could not be built. Each variant names the config key of the file at fault.
/// The cause is part of the message (not a `source()`), so a chain printer does not repeat it.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or parsed, or holds no item of the expected kind.
    #[error(transparent)]
    Pem(#[from] PemError),
    /// rustls refused the certificate chain and key (e.g. the key does not match the certificate).
    #[error("server.tls: unusable certificate/key pair ({} / {}): {cause}", cert.display(), key.display())]
    CertKey {
        /// Certificate file.
        cert: PathBuf,
        /// Key file.
        key: PathBuf,
        /// Cause.
        cause: rustls::Error,
    },
    /// A client CA certificate was refused (not a valid X.509 CA certificate).
    #[error("server.tls.client_ca: unusable CA certificate in {}: {cause}", path.display())]
    ClientCa {
        /// The CA file.
        path: PathBuf,
        /// Cause.
        cause: rustls::Error,
    },
    /// The client-certificate verifier could not be built from the CA bundle.
    #[error("server.tls.client_ca: {cause}")]
    Verifier {
        /// Cause.
        cause: rustls::server::VerifierBuilderError,
    },
    /// The crypto provider refused the protocol versions (a build problem).
    #[error("TLS setup: {0}")]
    Setup(rustls::Error),
}

/// Builds the rustls config of the listener from the PEM files named in `cfg`.
pub fn server_config(cfg: &TlsConfig) -> Result<ServerConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs = read_certs("server.tls.cert", &cfg.cert)?;
    let key = read_key("server.tls.key", &cfg.key)?;
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Setup)?;
    let builder = match &cfg.client_ca {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for ca in read_certs("server.tls.client_ca", path)? {
                roots.add(ca).map_err(|source| TlsError::ClientCa {
                    path: path.clone(),
                    cause: source,
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|source| TlsError::Verifier { cause: source })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|source| TlsError::CertKey {
            cert: cfg.cert.clone(),
            key: cfg.key.clone(),
            cause: source,
        })?;
    config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// The listener's TLS side: the current rustls config (swapped by [`ServerTls::reload`]) and the
/// handshake bound. Cheap to clone; clones share the config.
#[derive(Clone)]
pub struct ServerTls {
    config: Arc<ArcSwap<ServerConfig>>,
    handshake_timeout: Duration,
    client_auth: bool,
}

impl fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerTls")
            .field("handshake_timeout", &self.handshake_timeout)
            .field("client_auth", &self.client_auth)
            .finish_non_exhaustive()
    }
}

impl ServerTls {
    /// Reads the files and builds the config (startup: any error is fatal).
    pub fn load(cfg: &TlsConfig) -> Result<Self, TlsError> {
        Ok(Self {
            config: Arc::new(ArcSwap::from_pointee(server_config(cfg)?)),
            handshake_timeout: cfg.handshake_timeout,
            client_auth: cfg.client_ca.is_some(),
        })
    }

    /// Reads the files again and, if they make a valid config, uses it for new connections. On error
    /// the current config stays in use. (The handshake timeout is fixed at startup.)
    pub fn reload(&self, cfg: &TlsConfig) -> Result<(), TlsError> {
        let new = server_config(cfg)?;
        self.config.store(Arc::new(new));
        Ok(())
    }

    /// Whether clients must present a certificate (as configured at startup).
    pub fn client_auth(&self) -> bool {
        self.client_auth
    }

    /// Bound on one handshake.
    pub fn handshake_timeout(&self) -> Duration {
        self.handshake_timeout
    }

    /// Runs the server side of a handshake with the current config, bounded by the handshake timeout.
    pub async fn accept(&self, tcp: TcpStream) -> io::Result<TlsStream<TcpStream>> {
        let acceptor = TlsAcceptor::from(self.config.load_full());
        match tokio::time::timeout(self.handshake_timeout, acceptor.accept(tcp)).await {
            Ok(r) => r,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no TLS handshake within {:?}", self.handshake_timeout),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Pki {
        dir: tempfile::TempDir,
    }

    impl Pki {
        fn new() -> Self {
            Self {
                dir: tempfile::tempdir().unwrap(),
            }
        }

        fn write(&self, name: &str, text: &str) -> PathBuf {
            let p = self.dir.path().join(name);
            std::fs::write(&p, text).unwrap();
            p
        }

        /// A CA, a leaf for 127.0.0.1 signed by it, and the leaf's key, as files named `{tag}-*.pem`.
        fn files(&self, tag: &str) -> TlsConfig {
            let ca_key = rcgen::KeyPair::generate().unwrap();
            let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            let ca = rcgen::CertifiedIssuer::self_signed(ca, ca_key).unwrap();
            let leaf_key = rcgen::KeyPair::generate().unwrap();
            let leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
                .unwrap()
                .signed_by(&leaf_key, &ca)
                .unwrap();
            TlsConfig {
                cert: self.write(&format!("{tag}-cert.pem"), &leaf.pem()),
                key: self.write(&format!("{tag}-key.pem"), &leaf_key.serialize_pem()),
                client_ca: Some(self.write(&format!("{tag}-ca.pem"), &ca.pem())),
                handshake_timeout: Duration::from_secs(1),
            }
        }
    }

    #[test]
    fn builds_with_alpn_and_client_auth() {
        let pki = Pki::new();
        let cfg = pki.files("a");
        let sc = server_config(&cfg).unwrap();
        assert_eq!(
            sc.alpn_protocols,
            vec![b"h2".to_vec(), b"http/1.1".to_vec()]
        );
        let tls = ServerTls::load(&cfg).unwrap();
        assert!(tls.client_auth());
    }

    #[test]
    fn errors_name_the_key_and_file() {
        let pki = Pki::new();
        let good = pki.files("a");
        let missing = TlsConfig {
            cert: pki.dir.path().join("nope.pem"),
            ..good.clone()
        };
        let e = server_config(&missing).unwrap_err().to_string();
        assert!(e.starts_with("server.tls.cert: cannot read "), "{e}");
        assert!(e.contains("nope.pem"), "{e}");

        let garbage = TlsConfig {
            key: pki.write("garbage.pem", "not a key\n"),
            ..good.clone()
        };
        let e = server_config(&garbage).unwrap_err().to_string();
        assert!(e.starts_with("server.tls.key: no PEM private key"), "{e}");

        let other = pki.files("b");
        let mismatched = TlsConfig {
            key: other.key,
            ..good.clone()
        };
        let e = server_config(&mismatched).unwrap_err().to_string();
        assert!(
            e.starts_with("server.tls: unusable certificate/key pair"),
            "{e}"
        );

        let empty = TlsConfig {
            cert: pki.write("empty.pem", ""),
            ..good
        };
        let e = server_config(&empty).unwrap_err().to_string();
        assert!(e.starts_with("server.tls.cert: no PEM certificate"), "{e}");
    }

    #[test]
    fn failed_reload_keeps_the_running_config() {
        let pki = Pki::new();
        let cfg = pki.files("a");
        let tls = ServerTls::load(&cfg).unwrap();
        let before = tls.config.load_full();
        let bad = TlsConfig {
            cert: pki.write("bad.pem", "-----BEGIN CERTIFICATE-----\n%%%\n"),
            ..cfg.clone()
        };
        assert!(tls.reload(&bad).is_err());
        assert!(Arc::ptr_eq(&before, &tls.config.load_full()));
        tls.reload(&cfg).unwrap();
        assert!(!Arc::ptr_eq(&before, &tls.config.load_full()));
    }
}
