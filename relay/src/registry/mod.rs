//! The identity registry: devices with their two keys, and service policies.
//!
//! The identities are stored in one SQLite file in the data dir
//! ([`SqliteRegistry`]), so that `relay device add` (another process) and a
//! running `relay serve` share them without a restart. A serving relay never
//! reads that file on a hot path: it answers every CONNECT and stream
//! creation from an immutable in-memory [`Snapshot`] ([`SnapshotRegistry`]),
//! swapped whole when the file changes ([`follow`]), so a lookup takes no
//! lock and waits on no disk. The same reload tells which devices lost
//! access (removed, disabled, keys rotated); their channels and streams are
//! cut at once.
//!
//! [`Registry`] is the seam the hot path reads through: a cluster node
//! keeps the same in-memory snapshot, fed by a watch on the cluster's
//! key-value bucket instead of by the file ([`follow_cluster`]).

mod follow;
pub mod follow_cluster;
mod snapshot;
mod sqlite;

use std::future::Future;
use std::pin::Pin;

use base64::Engine;
use rand::RngCore;

pub use follow::{follow, SqliteSource, POLL_INTERVAL};
pub use follow_cluster::{follow_cluster, ClusterSource};
pub use snapshot::REFRESH_TIMEOUT;
pub use snapshot::{Snapshot, SnapshotRegistry};
pub use sqlite::SqliteRegistry;

/// Length of generated keys, in bytes (IoT Hub uses 32).
pub const KEY_LENGTH: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("registry database error: {0}")]
    Database(#[from] rusqlite::Error),
    #[error("device {0:?} already exists; `relay device show {0}` prints its connection string")]
    DeviceExists(String),
    #[error("device {0:?} does not exist; `relay device list` shows the registered devices")]
    NoSuchDevice(String),
    #[error("policy {0:?} does not exist; `relay policy list` shows the policies")]
    NoSuchPolicy(String),
    #[error("policy {0:?} already exists; `relay policy show {0}` prints its connection string")]
    PolicyExists(String),
    #[error("invalid policy name {0:?}: use 1-64 ASCII letters, digits and - . _")]
    InvalidPolicyName(String),
    #[error("cluster registry: {0}")]
    Cluster(String),
    #[error("invalid device id {id:?}: {reason}")]
    InvalidDeviceId {
        id: String,
        reason: framing::identity::IdError,
    },
}

/// A device identity.
#[derive(Clone, PartialEq, Eq)]
pub struct DeviceRecord {
    pub device_id: String,
    pub primary_key: String,
    pub secondary_key: String,
    pub enabled: bool,
}

impl DeviceRecord {
    /// Decoded keys, primary first; a malformed stored key is skipped.
    pub fn key_bytes(&self) -> Vec<Vec<u8>> {
        [&self.primary_key, &self.secondary_key]
            .into_iter()
            .filter_map(|key| base64::engine::general_purpose::STANDARD.decode(key).ok())
            .collect()
    }
}

impl std::fmt::Debug for DeviceRecord {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("DeviceRecord")
            .field("device_id", &self.device_id)
            .field("enabled", &self.enabled)
            .finish_non_exhaustive()
    }
}

/// A service policy (shared access key name and key).
#[derive(Clone, PartialEq, Eq)]
pub struct PolicyRecord {
    pub name: String,
    pub primary_key: String,
    pub secondary_key: String,
    /// What the policy's tokens may do.
    pub rights: crate::rights::Rights,
}

impl PolicyRecord {
    pub fn key_bytes(&self) -> Vec<Vec<u8>> {
        [&self.primary_key, &self.secondary_key]
            .into_iter()
            .filter_map(|key| base64::engine::general_purpose::STANDARD.decode(key).ok())
            .collect()
    }
}

impl std::fmt::Debug for PolicyRecord {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("PolicyRecord")
            .field("name", &self.name)
            .field("rights", &self.rights)
            .finish_non_exhaustive()
    }
}

/// What the serving relay needs from a registry. The serving relay's
/// implementation ([`SnapshotRegistry`]) answers from memory and never
/// fails; the `Result` is for stores that can.
pub trait Registry: Send + Sync {
    fn device(&self, device_id: &str) -> Result<Option<DeviceRecord>, RegistryError>;
    fn policy(&self, name: &str) -> Result<Option<PolicyRecord>, RegistryError>;
    /// Returns once the registry holds every change committed before the
    /// call (or after a short bounded wait). Called before refusing an
    /// identity, so a device used right after `relay device add` or
    /// `rotate-key` returned is not refused by a copy a moment old.
    fn refresh(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(std::future::ready(()))
    }
    /// Whether the store reported a change the registry has not checked
    /// yet (a write in progress, seen a moment ago). Answered from memory:
    /// a caller about to grant access refreshes first, so a removal or a
    /// rotation that just happened is not missed.
    fn change_pending(&self) -> bool {
        false
    }
    /// Every device, sorted by id (the admin API's device list); a store
    /// that cannot list answers none.
    fn device_list(&self) -> Vec<DeviceRecord> {
        Vec::new()
    }
}

/// The device's record when it may be used, checking the store once more
/// before answering "unknown" or "disabled", or while a change is pending
/// (see [`Registry::refresh`]).
pub async fn usable_device(
    registry: &dyn Registry,
    device_id: &str,
) -> Result<Option<DeviceRecord>, RegistryError> {
    match registry.device(device_id)? {
        Some(record) if record.enabled && !registry.change_pending() => Ok(Some(record)),
        _ => {
            registry.refresh().await;
            registry.device(device_id)
        }
    }
}

pub fn generate_key() -> String {
    let mut key = [0u8; KEY_LENGTH];
    rand::rng().fill_bytes(&mut key);
    base64::engine::general_purpose::STANDARD.encode(key)
}

/// Policy names: short, and safe in a connection string and a SAS token.
pub fn validate_policy_name(name: &str) -> Result<(), RegistryError> {
    let valid = (1..=64).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-._".contains(c));
    if valid {
        Ok(())
    } else {
        Err(RegistryError::InvalidPolicyName(name.to_string()))
    }
}

/// IoT Hub's device id rule (see [`framing::identity`]).
pub fn validate_device_id(device_id: &str) -> Result<(), RegistryError> {
    framing::identity::validate_id(device_id).map_err(|reason| RegistryError::InvalidDeviceId {
        id: device_id.to_string(),
        reason,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_ids_follow_iothubs_rule() {
        for id in [
            "a#b?c=d@e",
            "My-Device_1.x",
            "(it's)+%*!,:$",
            &"x".repeat(128),
        ] {
            validate_device_id(id).unwrap_or_else(|error| panic!("{id:?}: {error}"));
        }
        for id in ["", "a/b", "a b", "a;b", "a&b", "é", &"x".repeat(129)] {
            assert!(validate_device_id(id).is_err(), "{id:?}");
        }
        let message = validate_device_id("a;b").unwrap_err().to_string();
        assert!(
            message.contains("\"a;b\"") && message.contains("connection string"),
            "{message}"
        );
    }

    #[test]
    fn records_never_print_their_keys() {
        let device = DeviceRecord {
            device_id: "d".into(),
            primary_key: "primary-secret".into(),
            secondary_key: "secondary-secret".into(),
            enabled: true,
        };
        let policy = PolicyRecord {
            name: "service".into(),
            primary_key: "primary-secret".into(),
            secondary_key: "secondary-secret".into(),
            rights: crate::rights::Rights::ALL,
        };
        for text in [format!("{device:?}"), format!("{policy:?}")] {
            assert!(!text.contains("secret"), "{text}");
        }
    }
}
