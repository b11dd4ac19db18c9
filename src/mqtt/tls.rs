//! TLS to the broker (`mqtts://`): the rustls client configuration rumqttc
//! connects with, built once at startup so that a bad file fails the start,
//! not every reconnect.
//!
//! The broker's certificate is checked against `--mqtt-ca` when given, else
//! against the system's roots; `--mqtt-client-cert` / `--mqtt-client-key`
//! add a client certificate for brokers that authenticate clients by it
//! (AWS IoT style). One crypto provider (ring) for the whole process, passed
//! explicitly rather than installed as a global default.

use std::sync::Arc;

use rustls::{
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer},
    ClientConfig, RootCertStore,
};

/// Why the TLS configuration could not be built. Names the file's role,
/// never its contents.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{0}: no PEM certificate found")]
    NoCertificate(&'static str),
    #[error("{0}: {1}")]
    BadCertificate(&'static str, String),
    #[error("--mqtt-client-key: no PEM private key found")]
    NoKey,
    #[error("the system's root certificates could not be loaded ({0}); pass --mqtt-ca")]
    NoSystemRoots(String),
    #[error("TLS: {0}")]
    Rustls(#[from] rustls::Error),
}

/// A client certificate chain and its key, PEM.
pub struct ClientIdentity<'a> {
    pub cert_chain_pem: &'a [u8],
    pub key_pem: &'a [u8],
}

/// The client configuration for `mqtts://`: trust `ca_pem` (PEM, one or more
/// certificates) or, without it, the system's roots; present `identity`
/// when given.
pub fn client_config(
    ca_pem: Option<&[u8]>,
    identity: Option<ClientIdentity<'_>>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let mut roots = RootCertStore::empty();
    match ca_pem {
        Some(pem) => {
            for cert in certificates("--mqtt-ca", pem)? {
                roots
                    .add(cert)
                    .map_err(|e| TlsError::BadCertificate("--mqtt-ca", e.to_string()))?;
            }
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            let (added, _) = roots.add_parsable_certificates(native.certs);
            if added == 0 {
                let why = native
                    .errors
                    .first()
                    .map_or_else(|| "none found".to_owned(), ToString::to_string);
                return Err(TlsError::NoSystemRoots(why));
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    let config = match identity {
        Some(identity) => {
            let chain = certificates("--mqtt-client-cert", identity.cert_chain_pem)?;
            let key =
                PrivateKeyDer::from_pem_slice(identity.key_pem).map_err(|_| TlsError::NoKey)?;
            builder.with_client_auth_cert(chain, key)?
        }
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// Every certificate in `pem`; at least one.
fn certificates(role: &'static str, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::BadCertificate(role, e.to_string()))?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(role));
    }
    Ok(certs)
}
