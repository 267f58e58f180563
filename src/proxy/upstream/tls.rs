//! The upstream's TLS client settings: trust (`ca_file`, else the bundled Mozilla roots) and the
//! optional client identity (mTLS), read from PEM files.

use std::sync::Arc;

use rustls::{
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer},
    ClientConfig, RootCertStore,
};

use super::UpstreamSetupError;
use crate::config::UpstreamConfig;

/// The rustls client config: trust (`ca_file` or the web roots) and the optional client identity. ALPN
/// is set by the connector builder.
pub(super) fn client_tls(cfg: &UpstreamConfig) -> Result<ClientConfig, UpstreamSetupError> {
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
