//! PEM files named in the config (listener certificate and key, client CA, upstream CA and client
//! identity), read into rustls types; an error names the config key of the file at fault.

use std::path::{Path, PathBuf};

use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};

/// Why a PEM file named by a config key could not be used. The cause is part of the message (not a
/// `source()`), so a chain printer does not repeat it.
#[derive(Debug, thiserror::Error)]
pub enum PemError {
    /// The file could not be read or parsed.
    #[error("{key}: cannot read {}: {cause}", path.display())]
    Read {
        /// Config key (`server.tls.cert`, `upstream.ca_file`, …).
        key: &'static str,
        /// The file.
        path: PathBuf,
        /// Cause (I/O or PEM syntax).
        cause: rustls::pki_types::pem::Error,
    },
    /// The file holds no item of the expected kind.
    #[error("{key}: no PEM {what} found in {}", path.display())]
    Empty {
        /// Config key.
        key: &'static str,
        /// The file.
        path: PathBuf,
        /// "certificate" or "private key".
        what: &'static str,
    },
}

/// Reads every certificate of a PEM file (at least one).
pub fn read_certs(
    key: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, PemError> {
    let read_err = |cause| PemError::Read {
        key,
        path: path.to_owned(),
        cause,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(read_err)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(read_err)?;
    if certs.is_empty() {
        return Err(PemError::Empty {
            key,
            path: path.to_owned(),
            what: "certificate",
        });
    }
    Ok(certs)
}

/// Reads the first private key of a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn read_key(key: &'static str, path: &Path) -> Result<PrivateKeyDer<'static>, PemError> {
    PrivateKeyDer::from_pem_file(path).map_err(|cause| match cause {
        rustls::pki_types::pem::Error::NoItemsFound => PemError::Empty {
            key,
            path: path.to_owned(),
            what: "private key",
        },
        cause => PemError::Read {
            key,
            path: path.to_owned(),
            cause,
        },
    })
}
