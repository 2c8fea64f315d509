//! The cluster's registry in the [`REGISTRY_BUCKET`](super::REGISTRY_BUCKET)
//! key-value bucket: what `relay device … --cluster` writes and what every
//! node's watch (see [`crate::registry::follow_cluster`]) reads.
//!
//! Keys: `device.<id>` and `policy.<name>` (each encoded with
//! [`encode_token`]), `secret.stream-token` (every node signs and checks
//! stream tokens with it, so a token one node issued is good on every node),
//! `settings.host-name` (the HostName printed in connection strings). Values
//! are JSON. Changes to one device use the entry's revision
//! (compare-and-set), so two commands changing the same device at once never
//! lose one another's change.

use std::time::Duration;

use async_nats::jetstream::kv;
use base64::Engine;
use bytes::Bytes;
use futures_util::StreamExt;
use rand::RngCore;
use serde::{Deserialize, Serialize};

use super::{encode_token, Cluster};
use crate::registry::{
    generate_key, validate_device_id, DeviceRecord, PolicyRecord, RegistryError,
};

pub const DEVICE_PREFIX: &str = "device.";
pub const POLICY_PREFIX: &str = "policy.";
pub const SECRET_KEY: &str = "secret.stream-token";
pub const HOST_NAME_KEY: &str = "settings.host-name";
/// Bound on each registry call to NATS from the CLI and at start.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Compare-and-set attempts before giving up on a device changed by
/// others all the time.
const UPDATE_ATTEMPTS: usize = 5;

pub fn device_key(device_id: &str) -> String {
    format!("{DEVICE_PREFIX}{}", encode_token(device_id))
}

pub fn policy_key(name: &str) -> String {
    format!("{POLICY_PREFIX}{}", encode_token(name))
}

/// A device as stored in the bucket.
#[derive(Serialize, Deserialize)]
pub struct StoredDevice {
    pub device_id: String,
    pub primary_key: String,
    pub secondary_key: String,
    pub enabled: bool,
}

impl From<&DeviceRecord> for StoredDevice {
    fn from(record: &DeviceRecord) -> Self {
        Self {
            device_id: record.device_id.clone(),
            primary_key: record.primary_key.clone(),
            secondary_key: record.secondary_key.clone(),
            enabled: record.enabled,
        }
    }
}

impl From<StoredDevice> for DeviceRecord {
    fn from(stored: StoredDevice) -> Self {
        Self {
            device_id: stored.device_id,
            primary_key: stored.primary_key,
            secondary_key: stored.secondary_key,
            enabled: stored.enabled,
        }
    }
}

/// A policy as stored in the bucket.
#[derive(Serialize, Deserialize)]
pub struct StoredPolicy {
    pub name: String,
    pub primary_key: String,
    pub secondary_key: String,
    /// Absent in entries written before policies had rights: those
    /// policies connected to devices and keep doing so.
    #[serde(default = "crate::rights::legacy_rights")]
    pub rights: crate::rights::Rights,
}

impl From<&PolicyRecord> for StoredPolicy {
    fn from(record: &PolicyRecord) -> Self {
        Self {
            name: record.name.clone(),
            primary_key: record.primary_key.clone(),
            secondary_key: record.secondary_key.clone(),
            rights: record.rights,
        }
    }
}

impl From<StoredPolicy> for PolicyRecord {
    fn from(stored: StoredPolicy) -> Self {
        Self {
            name: stored.name,
            primary_key: stored.primary_key,
            secondary_key: stored.secondary_key,
            rights: stored.rights,
        }
    }
}

fn cluster_error(error: impl std::fmt::Display) -> RegistryError {
    RegistryError::Cluster(error.to_string())
}

fn to_json<T: Serialize>(value: &T) -> Result<Bytes, RegistryError> {
    serde_json::to_vec(value)
        .map(Bytes::from)
        .map_err(cluster_error)
}

/// Runs one registry call under [`REQUEST_TIMEOUT`].
async fn bounded<T>(
    call: impl std::future::Future<Output = Result<T, RegistryError>>,
) -> Result<T, RegistryError> {
    tokio::time::timeout(REQUEST_TIMEOUT, call)
        .await
        .unwrap_or_else(|_| {
            Err(RegistryError::Cluster(format!(
                "NATS did not answer within {REQUEST_TIMEOUT:?}"
            )))
        })
}

impl Cluster {
    /// Registers a device with fresh keys; refuses an id already taken.
    pub async fn add_device(&self, device_id: &str) -> Result<DeviceRecord, RegistryError> {
        validate_device_id(device_id)?;
        let record = DeviceRecord {
            device_id: device_id.to_string(),
            primary_key: generate_key(),
            secondary_key: generate_key(),
            enabled: true,
        };
        let value = to_json(&StoredDevice::from(&record))?;
        bounded(async {
            match self.registry.create(device_key(device_id), value).await {
                Ok(_) => Ok(record.clone()),
                Err(error) if error.kind() == kv::CreateErrorKind::AlreadyExists => {
                    Err(RegistryError::DeviceExists(device_id.to_string()))
                }
                Err(error) => Err(cluster_error(error)),
            }
        })
        .await
    }

    /// Writes a device whole (import), replacing any record of that id.
    pub async fn put_device(&self, record: &DeviceRecord) -> Result<(), RegistryError> {
        validate_device_id(&record.device_id)?;
        let value = to_json(&StoredDevice::from(record))?;
        bounded(async {
            self.registry
                .put(device_key(&record.device_id), value)
                .await
                .map(|_| ())
                .map_err(cluster_error)
        })
        .await
    }

    /// The device's record with its revision, for compare-and-set.
    async fn device_entry(
        &self,
        device_id: &str,
    ) -> Result<Option<(DeviceRecord, u64)>, RegistryError> {
        let entry = self
            .registry
            .entry(device_key(device_id))
            .await
            .map_err(cluster_error)?;
        match entry {
            Some(entry) if entry.operation == kv::Operation::Put => {
                let stored: StoredDevice =
                    serde_json::from_slice(&entry.value).map_err(cluster_error)?;
                Ok(Some((stored.into(), entry.revision)))
            }
            _ => Ok(None),
        }
    }

    pub async fn device(&self, device_id: &str) -> Result<Option<DeviceRecord>, RegistryError> {
        bounded(async {
            Ok(self
                .device_entry(device_id)
                .await?
                .map(|(record, _)| record))
        })
        .await
    }

    /// Every device, sorted by id.
    pub async fn list_devices(&self) -> Result<Vec<DeviceRecord>, RegistryError> {
        let mut devices = Vec::new();
        for key in bounded(self.registry_keys(DEVICE_PREFIX)).await? {
            let value =
                bounded(async { self.registry.get(key).await.map_err(cluster_error) }).await?;
            if let Some(value) = value {
                let stored: StoredDevice = serde_json::from_slice(&value).map_err(cluster_error)?;
                devices.push(DeviceRecord::from(stored));
            }
        }
        devices.sort_by(|first, second| first.device_id.cmp(&second.device_id));
        Ok(devices)
    }

    async fn registry_keys(&self, prefix: &str) -> Result<Vec<String>, RegistryError> {
        let mut keys = match self.registry.keys().await {
            Ok(keys) => keys,
            Err(error) => return Err(cluster_error(error)),
        };
        let mut matching = Vec::new();
        while let Some(key) = keys.next().await {
            let key = key.map_err(cluster_error)?;
            if key.starts_with(prefix) {
                matching.push(key);
            }
        }
        Ok(matching)
    }

    pub async fn remove_device(&self, device_id: &str) -> Result<(), RegistryError> {
        bounded(async {
            match self.device_entry(device_id).await? {
                None => Err(RegistryError::NoSuchDevice(device_id.to_string())),
                Some(_) => self
                    .registry
                    .delete(device_key(device_id))
                    .await
                    .map_err(cluster_error),
            }
        })
        .await
    }

    /// Changes one device with compare-and-set on its revision, retrying a
    /// few times when another writer changed it in between.
    async fn change_device(
        &self,
        device_id: &str,
        change: impl Fn(&mut DeviceRecord),
    ) -> Result<DeviceRecord, RegistryError> {
        bounded(async {
            for _ in 0..UPDATE_ATTEMPTS {
                let Some((mut record, revision)) = self.device_entry(device_id).await? else {
                    return Err(RegistryError::NoSuchDevice(device_id.to_string()));
                };
                change(&mut record);
                let value = to_json(&StoredDevice::from(&record))?;
                match self
                    .registry
                    .update(device_key(device_id), value, revision)
                    .await
                {
                    Ok(_) => return Ok(record),
                    Err(error) if error.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                        continue
                    }
                    Err(error) => return Err(cluster_error(error)),
                }
            }
            Err(RegistryError::Cluster(format!(
                "device {device_id:?} kept changing under this command; try again"
            )))
        })
        .await
    }

    pub async fn set_device_enabled(
        &self,
        device_id: &str,
        enabled: bool,
    ) -> Result<(), RegistryError> {
        self.change_device(device_id, |record| record.enabled = enabled)
            .await
            .map(|_| ())
    }

    /// Replaces one key of a device (the primary, or the secondary).
    pub async fn rotate_device_key(
        &self,
        device_id: &str,
        secondary: bool,
    ) -> Result<DeviceRecord, RegistryError> {
        self.change_device(device_id, |record| {
            if secondary {
                record.secondary_key = generate_key();
            } else {
                record.primary_key = generate_key();
            }
        })
        .await
    }

    pub async fn policy(&self, name: &str) -> Result<Option<PolicyRecord>, RegistryError> {
        bounded(async {
            match self
                .registry
                .get(policy_key(name))
                .await
                .map_err(cluster_error)?
            {
                Some(value) => {
                    let stored: StoredPolicy =
                        serde_json::from_slice(&value).map_err(cluster_error)?;
                    Ok(Some(stored.into()))
                }
                None => Ok(None),
            }
        })
        .await
    }

    /// Every policy, sorted by name.
    pub async fn list_policies(&self) -> Result<Vec<PolicyRecord>, RegistryError> {
        let mut policies = Vec::new();
        for key in bounded(self.registry_keys(POLICY_PREFIX)).await? {
            let value =
                bounded(async { self.registry.get(key).await.map_err(cluster_error) }).await?;
            if let Some(value) = value {
                let stored: StoredPolicy = serde_json::from_slice(&value).map_err(cluster_error)?;
                policies.push(PolicyRecord::from(stored));
            }
        }
        policies.sort_by(|first, second| first.name.cmp(&second.name));
        Ok(policies)
    }

    /// The policy, created with fresh keys when missing (the first node
    /// to start creates `service`; the others read it).
    pub async fn ensure_policy(
        &self,
        name: &str,
        rights: crate::rights::Rights,
    ) -> Result<PolicyRecord, RegistryError> {
        if let Some(policy) = self.policy(name).await? {
            return Ok(policy);
        }
        let record = PolicyRecord {
            name: name.to_string(),
            primary_key: generate_key(),
            secondary_key: generate_key(),
            rights,
        };
        let value = to_json(&StoredPolicy::from(&record))?;
        let created = bounded(async {
            match self.registry.create(policy_key(name), value).await {
                Ok(_) => Ok(true),
                Err(error) if error.kind() == kv::CreateErrorKind::AlreadyExists => Ok(false),
                Err(error) => Err(cluster_error(error)),
            }
        })
        .await?;
        if created {
            return Ok(record);
        }
        self.policy(name)
            .await?
            .ok_or_else(|| RegistryError::NoSuchPolicy(name.to_string()))
    }

    /// Removes a policy; its tokens stop working on every node.
    pub async fn remove_policy(&self, name: &str) -> Result<(), RegistryError> {
        if self.policy(name).await?.is_none() {
            return Err(RegistryError::NoSuchPolicy(name.to_string()));
        }
        bounded(async {
            self.registry
                .delete(policy_key(name))
                .await
                .map_err(cluster_error)
        })
        .await
    }

    /// Writes a policy whole (import).
    pub async fn put_policy(&self, record: &PolicyRecord) -> Result<(), RegistryError> {
        let value = to_json(&StoredPolicy::from(record))?;
        bounded(async {
            self.registry
                .put(policy_key(&record.name), value)
                .await
                .map(|_| ())
                .map_err(cluster_error)
        })
        .await
    }

    /// The cluster's stream-token secret, if one was set.
    pub async fn stream_token_secret(&self) -> Result<Option<Vec<u8>>, RegistryError> {
        bounded(async {
            match self.registry.get(SECRET_KEY).await.map_err(cluster_error)? {
                None => Ok(None),
                Some(value) => {
                    let secret = base64::engine::general_purpose::STANDARD
                        .decode(&value)
                        .map_err(cluster_error)?;
                    if secret.len() < 32 {
                        return Err(RegistryError::Cluster(format!(
                            "{SECRET_KEY} in {} is shorter than 32 bytes; delete it (`nats kv del {} {SECRET_KEY}`) and restart the nodes",
                            super::REGISTRY_BUCKET,
                            super::REGISTRY_BUCKET
                        )));
                    }
                    Ok(Some(secret))
                }
            }
        })
        .await
    }

    /// Sets the stream-token secret unless the cluster has one; returns
    /// the one in force. Every node signs with it, so it is never replaced
    /// while nodes run: a node with another secret would refuse the
    /// others' tokens.
    pub async fn set_stream_token_secret_if_absent(
        &self,
        secret: &[u8],
    ) -> Result<Vec<u8>, RegistryError> {
        let value = Bytes::from(base64::engine::general_purpose::STANDARD.encode(secret));
        bounded(async {
            match self.registry.create(SECRET_KEY, value).await {
                Ok(_) => Ok(()),
                Err(error) if error.kind() == kv::CreateErrorKind::AlreadyExists => Ok(()),
                Err(error) => Err(cluster_error(error)),
            }
        })
        .await?;
        self.stream_token_secret()
            .await?
            .ok_or_else(|| RegistryError::Cluster(format!("{SECRET_KEY} vanished; try again")))
    }

    /// The secret in force, created at random by the first node.
    pub async fn ensure_stream_token_secret(&self) -> Result<Vec<u8>, RegistryError> {
        if let Some(secret) = self.stream_token_secret().await? {
            return Ok(secret);
        }
        let mut secret = [0u8; 32];
        rand::rng().fill_bytes(&mut secret);
        self.set_stream_token_secret_if_absent(&secret).await
    }

    /// The HostName connection strings name (`settings.host-name`).
    pub async fn host_name(&self) -> Result<Option<String>, RegistryError> {
        bounded(async {
            Ok(self
                .registry
                .get(HOST_NAME_KEY)
                .await
                .map_err(cluster_error)?
                .map(|value| String::from_utf8_lossy(&value).into_owned()))
        })
        .await
    }

    /// Records the HostName: always when `replace`, else only when none is
    /// recorded yet (the first node to start).
    pub async fn set_host_name(&self, host_name: &str, replace: bool) -> Result<(), RegistryError> {
        let value = Bytes::from(host_name.to_string());
        bounded(async {
            if replace {
                return self
                    .registry
                    .put(HOST_NAME_KEY, value)
                    .await
                    .map(|_| ())
                    .map_err(cluster_error);
            }
            match self.registry.create(HOST_NAME_KEY, value).await {
                Err(error) if error.kind() == kv::CreateErrorKind::AlreadyExists => Ok(()),
                other => other.map(|_| ()).map_err(cluster_error),
            }
        })
        .await
    }
}
