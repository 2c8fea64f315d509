//! The TLS acceptors of the main and MQTT listeners, built from one
//! certificate: the operator's files, or a self-signed one the relay makes
//! on first start for every name a client may use to reach it.
//!
//! Both listeners share the certificate and key; they differ only in ALPN,
//! because MQTT clients disagree on what to offer and must not be refused.
//!
//! Both hand out TLS 1.3 session tickets sealed by one ticketer (a key in
//! memory, rotated by rustls, never written anywhere), so a client that
//! comes back — a service-proxy creating stream after stream, a
//! device-proxy dialing each stream's WebSocket — resumes its session
//! instead of a full handshake, whatever number of clients came between.
//! A client keeps its tickets in its own TLS configuration, one per trust
//! setting, so a resumed session never skips a check a new trust setting
//! would make.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

use crate::config::{RelayConfig, TlsMode};
use crate::data_dir::DataDir;

/// The TLS acceptors of both listeners, built from one certificate.
pub(crate) struct Acceptors {
    pub main: TlsAcceptor,
    pub mqtt: TlsAcceptor,
    /// The self-signed certificate clients must trust, when generated.
    pub generated_certificate: Option<PathBuf>,
}

fn system_host_name() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|name| name.trim().to_string())
        .filter(|n| !n.is_empty())
}

/// The acceptors `config` asks for; `None` when TLS is off (`--no-tls`).
pub(crate) fn acceptors(
    config: &RelayConfig,
    data_dir: &DataDir,
    host_name: &str,
) -> anyhow::Result<Option<Acceptors>> {
    let (certificate_path, key_path, generated) = match &config.tls {
        TlsMode::Disabled => return Ok(None),
        TlsMode::Files {
            certificate,
            private_key,
        } => (certificate.clone(), private_key.clone(), false),
        TlsMode::SelfSigned => {
            let mut names = vec![
                "localhost".to_string(),
                "127.0.0.1".to_string(),
                "::1".to_string(),
            ];
            names.extend(system_host_name());
            names.push(
                framing::connection_string::split_host_port(host_name)
                    .0
                    .to_string(),
            );
            names.sort();
            names.dedup();
            data_dir.ensure_self_signed_certificate(&names)?;
            (
                data_dir.certificate_path(),
                data_dir.private_key_path(),
                true,
            )
        }
    };
    let certificates = CertificateDer::pem_file_iter(&certificate_path)
        .and_then(|certificates| certificates.collect::<Result<Vec<_>, _>>())
        .with_context(|| {
            format!(
                "cannot read the TLS certificate {}",
                certificate_path.display()
            )
        })?;
    if certificates.is_empty() {
        anyhow::bail!("{} holds no PEM certificate", certificate_path.display());
    }
    let key = PrivateKeyDer::from_pem_file(&key_path)
        .with_context(|| format!("cannot read the TLS private key {}", key_path.display()))?;
    let mut mqtt_config =
        rustls::ServerConfig::builder_with_provider(framing::tls::crypto_provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(certificates, key)
            .context("the TLS certificate and private key do not match or are not supported")?;
    mqtt_config.ticketer =
        rustls::crypto::ring::Ticketer::new().context("cannot make the TLS session ticket key")?;
    // MQTT clients differ in what ALPN they offer (nothing, "mqtt", ...); with
    // no protocol configured the server negotiates none and refuses nobody.
    let mut main_config = mqtt_config.clone();
    main_config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Some(Acceptors {
        main: TlsAcceptor::from(Arc::new(main_config)),
        mqtt: TlsAcceptor::from(Arc::new(mqtt_config)),
        generated_certificate: generated.then_some(certificate_path),
    }))
}
