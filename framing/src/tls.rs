//! TLS client configuration, decided in one place for every outbound
//! connection (REST, MQTT over WebSocket, streaming endpoint).
//!
//! Clients trust the system roots plus, optionally, one extra PEM file
//! (`--ca-cert`), which is how a self-hosted relay's self-signed certificate
//! is trusted without touching the system store.

use std::path::Path;
use std::sync::Arc;

use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    #[error("cannot read CA certificate {path}: {reason}; pass the relay's cert.pem (printed by `relay serve`) with --ca-cert")]
    CaCertificate { path: String, reason: String },
    #[error("no trusted root certificates: the system store is empty and no --ca-cert was given")]
    NoRoots,
    #[error("TLS configuration failed: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The crypto provider used by every devstreams TLS endpoint, with
/// AES-128-GCM/SHA-256 first: every stream byte is encrypted on two legs,
/// AES-128 has fewer rounds than AES-256, and SHA-256 has CPU instructions
/// where SHA-384 does not (BENCHMARKS.md profiles).
pub fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    let mut provider = rustls::crypto::ring::default_provider();
    let preferred = rustls::CipherSuite::TLS13_AES_128_GCM_SHA256;
    provider
        .cipher_suites
        .sort_by_key(|suite| suite.suite() != preferred);
    Arc::new(provider)
}

/// Reads all certificates of a PEM file.
pub fn load_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsConfigError> {
    let error = |reason: String| TlsConfigError::CaCertificate {
        path: path.display().to_string(),
        reason,
    };
    let certificates = CertificateDer::pem_file_iter(path)
        .map_err(|e| error(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| error(e.to_string()))?;
    if certificates.is_empty() {
        return Err(error("the file holds no PEM certificate".into()));
    }
    Ok(certificates)
}

/// Client configuration: system roots plus `extra_ca`; ALPN `http/1.1`
/// because every devstreams connection starts as HTTP/1.1.
pub fn client_config(extra_ca: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, TlsConfigError> {
    let mut roots = RootCertStore::empty();
    // Unreadable system certificates are skipped: one bad file must not stop
    // a device from trusting the rest.
    let native = rustls_native_certs::load_native_certs();
    for certificate in native.certs {
        let _ = roots.add(certificate);
    }
    if let Some(path) = extra_ca {
        for certificate in load_certificates(path)? {
            roots
                .add(certificate)
                .map_err(|e| TlsConfigError::CaCertificate {
                    path: path.display().to_string(),
                    reason: e.to_string(),
                })?;
        }
    }
    if roots.is_empty() {
        return Err(TlsConfigError::NoRoots);
    }
    let mut config = rustls::ClientConfig::builder_with_provider(crypto_provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aes_128_gcm_sha256_is_offered_and_chosen_first() {
        let provider = crypto_provider();
        assert_eq!(
            provider.cipher_suites[0].suite(),
            rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
        );
        assert!(
            provider.cipher_suites.len() > 1,
            "the other suites stay available"
        );
    }
}
