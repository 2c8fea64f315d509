//! TLS client configuration, decided in one place for every outbound
//! connection (REST, MQTT over WebSocket, streaming endpoint).
//!
//! Clients trust the system roots plus, optionally, one extra PEM file
//! (`--ca-cert`), which is how a self-hosted relay's self-signed certificate
//! is trusted without touching the system store.
//!
//! A program builds one configuration per trust setting and dials every
//! connection with it, because the configuration holds the TLS 1.3 session
//! tickets ([`TicketStore`]): a connection to a relay this configuration
//! has verified before resumes its session instead of a full handshake, and
//! a configuration with another trust setting starts from none.

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex};

use rustls::client::{ClientSessionStore, Tls12ClientSessionValue, Tls13ClientSessionValue};
use rustls::{NamedGroup, RootCertStore};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::ServerName;

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
    config.resumption = rustls::client::Resumption::store(Arc::new(TicketStore::default()));
    Ok(Arc::new(config))
}

/// TLS 1.3 tickets kept per server name. Each ticket resumes one
/// connection and each connection brings new ones, so this is how many
/// connections to one relay can resume at once: a service-proxy or
/// device-proxy opens a WebSocket per stream, dozens at a time when a fleet
/// reconnects, where rustls' own store keeps 8 and sends the rest through
/// full handshakes. A ticket is a few hundred bytes.
pub const TICKETS_PER_SERVER: usize = 64;

/// Server names remembered; a client talks to one relay (two names at
/// most: the connection string's and the streaming URL's).
const MAX_SERVERS: usize = 16;

#[derive(Default)]
struct ServerSessions {
    key_exchange_hint: Option<NamedGroup>,
    tls12: Option<Tls12ClientSessionValue>,
    tls13: VecDeque<Tls13ClientSessionValue>,
}

/// Session tickets of one client configuration, bounded by
/// [`TICKETS_PER_SERVER`] and [`MAX_SERVERS`].
#[derive(Default)]
struct TicketStore {
    servers: Mutex<HashMap<ServerName<'static>, ServerSessions>>,
}

impl std::fmt::Debug for TicketStore {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Tickets are secrets: never printed.
        formatter
            .debug_struct("TicketStore")
            .finish_non_exhaustive()
    }
}

impl TicketStore {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ServerName<'static>, ServerSessions>> {
        self.servers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn edit(&self, server_name: ServerName<'static>, change: impl FnOnce(&mut ServerSessions)) {
        let mut servers = self.lock();
        if !servers.contains_key(&server_name) && servers.len() >= MAX_SERVERS {
            if let Some(forgotten) = servers.keys().next().cloned() {
                servers.remove(&forgotten);
            }
        }
        change(servers.entry(server_name).or_default());
    }
}

impl ClientSessionStore for TicketStore {
    fn set_kx_hint(&self, server_name: ServerName<'static>, group: NamedGroup) {
        self.edit(server_name, |sessions| {
            sessions.key_exchange_hint = Some(group)
        });
    }

    fn kx_hint(&self, server_name: &ServerName<'_>) -> Option<NamedGroup> {
        self.lock()
            .get(server_name)
            .and_then(|sessions| sessions.key_exchange_hint)
    }

    fn set_tls12_session(&self, server_name: ServerName<'static>, value: Tls12ClientSessionValue) {
        self.edit(server_name, |sessions| sessions.tls12 = Some(value));
    }

    fn tls12_session(&self, server_name: &ServerName<'_>) -> Option<Tls12ClientSessionValue> {
        self.lock()
            .get(server_name)
            .and_then(|sessions| sessions.tls12.clone())
    }

    fn remove_tls12_session(&self, server_name: &ServerName<'static>) {
        if let Some(sessions) = self.lock().get_mut(server_name) {
            sessions.tls12 = None;
        }
    }

    fn insert_tls13_ticket(
        &self,
        server_name: ServerName<'static>,
        value: Tls13ClientSessionValue,
    ) {
        self.edit(server_name, |sessions| {
            if sessions.tls13.len() >= TICKETS_PER_SERVER {
                sessions.tls13.pop_front();
            }
            sessions.tls13.push_back(value);
        });
    }

    fn take_tls13_ticket(
        &self,
        server_name: &ServerName<'static>,
    ) -> Option<Tls13ClientSessionValue> {
        // The newest ticket: the likeliest to be still valid.
        self.lock()
            .get_mut(server_name)
            .and_then(|sessions| sessions.tls13.pop_back())
    }
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
