//! `relay registry export` / `import`: moves a registry between a single
//! relay's SQLite file and a cluster, in either direction, through one JSON
//! file (devices with their keys and enabled state, policies, the
//! stream-token secret).
//!
//! Import writes every device and policy of the file over what the target
//! holds (the file is the truth for what it names) and leaves other
//! identities alone. The stream-token secret is written only where the
//! target has none: replacing the secret of running relays would make them
//! refuse the tokens they issued a moment ago, and the secret only signs
//! tokens that live for one handshake, so nothing is lost by keeping it.
//! The file holds every key: it is written owner-only.

use anyhow::Context;
use base64::Engine;
use serde::{Deserialize, Serialize};

use super::Cluster;
use crate::data_dir::DataDir;
use crate::registry::{DeviceRecord, PolicyRecord};

/// What the file's `format` field says.
pub const FORMAT: &str = "devstreams-registry";
pub const VERSION: u32 = 1;

#[derive(Serialize, Deserialize)]
pub struct ExportedDevice {
    pub device_id: String,
    pub primary_key: String,
    pub secondary_key: String,
    pub enabled: bool,
}

#[derive(Serialize, Deserialize)]
pub struct ExportedPolicy {
    pub name: String,
    pub primary_key: String,
    pub secondary_key: String,
    /// Absent in exports written before policies had rights: those
    /// policies connected to devices and keep doing so.
    #[serde(default = "crate::rights::legacy_rights")]
    pub rights: crate::rights::Rights,
}

/// The whole registry as one document.
#[derive(Serialize, Deserialize)]
pub struct RegistryExport {
    pub format: String,
    pub version: u32,
    pub devices: Vec<ExportedDevice>,
    pub policies: Vec<ExportedPolicy>,
    /// Base64; absent when the source had none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_token_secret: Option<String>,
}

/// What an import changed, for the one line the CLI prints.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ImportSummary {
    pub devices: usize,
    pub policies: usize,
    pub secret_written: bool,
}

impl RegistryExport {
    fn new(
        devices: Vec<DeviceRecord>,
        policies: Vec<PolicyRecord>,
        secret: Option<Vec<u8>>,
    ) -> Self {
        Self {
            format: FORMAT.into(),
            version: VERSION,
            devices: devices
                .into_iter()
                .map(|record| ExportedDevice {
                    device_id: record.device_id,
                    primary_key: record.primary_key,
                    secondary_key: record.secondary_key,
                    enabled: record.enabled,
                })
                .collect(),
            policies: policies
                .into_iter()
                .map(|record| ExportedPolicy {
                    name: record.name,
                    primary_key: record.primary_key,
                    secondary_key: record.secondary_key,
                    rights: record.rights,
                })
                .collect(),
            stream_token_secret: secret
                .map(|secret| base64::engine::general_purpose::STANDARD.encode(secret)),
        }
    }

    /// Parses and checks a file's contents.
    pub fn parse(text: &[u8]) -> anyhow::Result<Self> {
        let export: Self = serde_json::from_slice(text)
            .context("not a registry export (expected the JSON `relay registry export` writes)")?;
        if export.format != FORMAT || export.version != VERSION {
            anyhow::bail!(
                "not a registry export this relay reads (format {:?} version {}; expected {FORMAT:?} version {VERSION})",
                export.format,
                export.version
            );
        }
        for device in &export.devices {
            crate::registry::validate_device_id(&device.device_id)?;
        }
        Ok(export)
    }

    fn secret(&self) -> anyhow::Result<Option<Vec<u8>>> {
        let Some(encoded) = &self.stream_token_secret else {
            return Ok(None);
        };
        let secret = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .context("the export's stream_token_secret is not base64")?;
        if secret.len() < 32 {
            anyhow::bail!("the export's stream_token_secret is shorter than 32 bytes");
        }
        Ok(Some(secret))
    }

    fn device_records(&self) -> Vec<DeviceRecord> {
        self.devices
            .iter()
            .map(|device| DeviceRecord {
                device_id: device.device_id.clone(),
                primary_key: device.primary_key.clone(),
                secondary_key: device.secondary_key.clone(),
                enabled: device.enabled,
            })
            .collect()
    }

    fn policy_records(&self) -> Vec<PolicyRecord> {
        self.policies
            .iter()
            .map(|policy| PolicyRecord {
                name: policy.name.clone(),
                primary_key: policy.primary_key.clone(),
                secondary_key: policy.secondary_key.clone(),
                rights: policy.rights,
            })
            .collect()
    }
}

/// The registry of a single relay's data dir.
pub fn export_data_dir(data_dir: &DataDir) -> anyhow::Result<RegistryExport> {
    let registry = data_dir.registry()?;
    let devices = registry.list_devices()?;
    let (snapshot_policies, secret) = (
        registry.list_policies()?,
        data_dir.existing_stream_token_secret()?,
    );
    Ok(RegistryExport::new(devices, snapshot_policies, secret))
}

/// The cluster's registry.
pub async fn export_cluster(cluster: &Cluster) -> anyhow::Result<RegistryExport> {
    let devices = cluster.list_devices().await?;
    let policies = cluster.list_policies().await?;
    let secret = cluster.stream_token_secret().await?;
    Ok(RegistryExport::new(devices, policies, secret))
}

/// Writes the export into a single relay's data dir (created if missing).
pub fn import_data_dir(
    data_dir: &DataDir,
    export: &RegistryExport,
) -> anyhow::Result<ImportSummary> {
    let registry = data_dir.registry()?;
    let mut summary = ImportSummary::default();
    for device in export.device_records() {
        registry.put_device(&device)?;
        summary.devices += 1;
    }
    for policy in export.policy_records() {
        registry.put_policy(&policy)?;
        summary.policies += 1;
    }
    if let Some(secret) = export.secret()? {
        summary.secret_written = data_dir.set_stream_token_secret_if_absent(&secret)?;
    }
    Ok(summary)
}

/// Writes the export into the cluster; running nodes pick it up through
/// their watch within a second.
pub async fn import_cluster(
    cluster: &Cluster,
    export: &RegistryExport,
) -> anyhow::Result<ImportSummary> {
    let mut summary = ImportSummary::default();
    for device in export.device_records() {
        cluster.put_device(&device).await?;
        summary.devices += 1;
    }
    for policy in export.policy_records() {
        cluster.put_policy(&policy).await?;
        summary.policies += 1;
    }
    if let Some(secret) = export.secret()? {
        let before = cluster.stream_token_secret().await?;
        let in_force = cluster.set_stream_token_secret_if_absent(&secret).await?;
        summary.secret_written = before.is_none() && in_force == secret;
    }
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_data_dir_round_trips_through_an_export() {
        let directory = tempfile::tempdir().unwrap();
        let source = DataDir::create_or_open(&directory.path().join("source")).unwrap();
        let registry = source.registry().unwrap();
        let kept = registry.add_device("a#b?c=d@e").unwrap();
        registry.add_device("off").unwrap();
        registry.set_device_enabled("off", false).unwrap();
        let secret = source.stream_token_secret().unwrap();
        let export = export_data_dir(&source).unwrap();
        let text = serde_json::to_vec(&export).unwrap();

        let target = DataDir::create_or_open(&directory.path().join("target")).unwrap();
        let summary = import_data_dir(&target, &RegistryExport::parse(&text).unwrap()).unwrap();
        assert_eq!(summary.devices, 2);
        assert!(summary.secret_written);
        let imported = target.registry().unwrap();
        use crate::registry::Registry;
        assert_eq!(
            imported.device("a#b?c=d@e").unwrap().unwrap().primary_key,
            kept.primary_key
        );
        assert!(!imported.device("off").unwrap().unwrap().enabled);
        assert_eq!(
            imported.policy("service").unwrap().unwrap().primary_key,
            registry.policy("service").unwrap().unwrap().primary_key
        );
        assert_eq!(target.stream_token_secret().unwrap(), secret);
    }

    #[test]
    fn a_foreign_file_is_refused_with_a_clear_message() {
        let error =
            RegistryExport::parse(br#"{"format":"other","version":1,"devices":[],"policies":[]}"#)
                .err()
                .unwrap();
        assert!(
            error.to_string().contains("not a registry export"),
            "{error}"
        );
        assert!(RegistryExport::parse(b"nonsense").is_err());
    }
}
