//! The upstream's TLS client settings: trust (`ca_file`, else the bundled Mozilla roots) and the
//! optional client identity (mTLS), read from PEM files.

use std::sync::Arc;

use rustls::{ClientConfig, RootCertStore};

use super::UpstreamSetupError;
use crate::{
    config::UpstreamConfig,
    pem::{read_certs, read_key},
};

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
