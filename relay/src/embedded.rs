//! A relay inside another program: the whole relay on loopback with TLS and
//! a fresh data dir, behind the few calls a demo needs (register a device,
//! get the credentials and the certificate to trust, shut down).
//!
//! The echo sample's `demo` is built on this alone, so it does not reach
//! into the relay's registry or data-dir layout, and those can change (an
//! in-memory copy, a cluster registry) without touching the sample.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use framing::ConnectionString;

use crate::data_dir::DataDir;
use crate::{RelayConfig, RunningRelay};

/// A serving relay on `127.0.0.1` with a self-signed certificate.
pub struct EmbeddedRelay {
    running: RunningRelay,
    data_dir: PathBuf,
    certificate_path: PathBuf,
}

impl EmbeddedRelay {
    /// Starts a relay on a free loopback port, keeping its data in
    /// `data_dir` (created when missing; a temporary directory suits a demo).
    pub async fn start(data_dir: &Path) -> anyhow::Result<EmbeddedRelay> {
        let listen = SocketAddr::from(([127, 0, 0, 1], 0));
        let running = crate::start(RelayConfig::new(listen, data_dir.to_path_buf())).await?;
        let certificate_path = running
            .certificate_path
            .clone()
            .context("the embedded relay generated no certificate")?;
        Ok(EmbeddedRelay {
            running,
            data_dir: data_dir.to_path_buf(),
            certificate_path,
        })
    }

    /// The main listener's address.
    pub fn local_address(&self) -> SocketAddr {
        self.running.local_address
    }

    /// The connection string of the `service` policy.
    pub fn service_connection_string(&self) -> anyhow::Result<ConnectionString> {
        Ok(ConnectionString::parse_service(
            &self.running.service_connection_string,
        )?)
    }

    /// A TLS client configuration that trusts this relay's certificate.
    pub fn client_tls(&self) -> anyhow::Result<Arc<rustls::ClientConfig>> {
        Ok(framing::tls::client_config(Some(&self.certificate_path))?)
    }

    /// Registers a device and returns its connection string.
    pub fn add_device(&self, device_id: &str) -> anyhow::Result<ConnectionString> {
        let record = DataDir::open_existing(&self.data_dir)?
            .registry()?
            .add_device(device_id)?;
        Ok(ConnectionString::for_device(
            &self.running.host_name,
            device_id,
            &record.primary_key,
        )?)
    }

    /// Stops serving, letting live streams finish within the drain deadline.
    pub async fn shutdown(self) {
        self.running.shutdown().await;
    }
}
