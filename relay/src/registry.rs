//! The identity registry: devices with their two keys, and service policies.
//!
//! It lives in one SQLite file in the data dir so that `relay device add`
//! (another process) and a running `relay serve` see the same identities
//! without a restart. The relay reads it on every authentication instead of
//! caching, which makes a removal or a rotated key effective at once; the
//! reads are indexed lookups, far cheaper than the TLS handshake around them.
//! [`Registry`] is a trait so a shared database can replace the file when
//! several relays run behind a load balancer.

use std::path::Path;
use std::sync::Mutex;

use base64::Engine;
use rand::RngCore;
use rusqlite::{params, Connection, OptionalExtension};

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
    #[error("policy {0:?} does not exist; the relay creates the `service` policy on first start")]
    NoSuchPolicy(String),
    #[error("invalid device id {0:?}: use 1-128 characters from letters, digits and - . _ : @ $ ! ( ) , = + % ' *")]
    InvalidDeviceId(String),
}

/// A device identity.
#[derive(Clone)]
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

/// A service policy (shared access key name and key).
#[derive(Clone)]
pub struct PolicyRecord {
    pub name: String,
    pub primary_key: String,
    pub secondary_key: String,
}

impl PolicyRecord {
    pub fn key_bytes(&self) -> Vec<Vec<u8>> {
        [&self.primary_key, &self.secondary_key]
            .into_iter()
            .filter_map(|key| base64::engine::general_purpose::STANDARD.decode(key).ok())
            .collect()
    }
}

/// What the serving relay needs from a registry.
pub trait Registry: Send + Sync {
    fn device(&self, device_id: &str) -> Result<Option<DeviceRecord>, RegistryError>;
    fn policy(&self, name: &str) -> Result<Option<PolicyRecord>, RegistryError>;
    /// Changes whenever another process writes; lets the relay notice a
    /// removed device without polling every identity.
    fn version(&self) -> Result<i64, RegistryError>;
}

pub fn generate_key() -> String {
    let mut key = [0u8; KEY_LENGTH];
    rand::rng().fill_bytes(&mut key);
    base64::engine::general_purpose::STANDARD.encode(key)
}

/// IoT Hub's device id rule: up to 128 characters from a safe set.
pub fn validate_device_id(device_id: &str) -> Result<(), RegistryError> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || "-.:_@$!(),=+%'*".contains(c);
    if device_id.is_empty() || device_id.len() > 128 || !device_id.chars().all(allowed) {
        return Err(RegistryError::InvalidDeviceId(device_id.to_string()));
    }
    Ok(())
}

/// The SQLite registry.
pub struct SqliteRegistry {
    connection: Mutex<Connection>,
}

impl SqliteRegistry {
    /// Opens (creating when missing) the registry file.
    pub fn open(path: &Path) -> Result<Self, RegistryError> {
        let connection = Connection::open(path)?;
        connection.busy_timeout(std::time::Duration::from_secs(5))?;
        connection.pragma_update(None, "journal_mode", "WAL")?;
        connection.execute_batch(
            "CREATE TABLE IF NOT EXISTS devices (
                 device_id TEXT PRIMARY KEY NOT NULL,
                 primary_key TEXT NOT NULL,
                 secondary_key TEXT NOT NULL,
                 enabled INTEGER NOT NULL DEFAULT 1,
                 created_at INTEGER NOT NULL DEFAULT (strftime('%s','now')));
             CREATE TABLE IF NOT EXISTS policies (
                 name TEXT PRIMARY KEY NOT NULL,
                 primary_key TEXT NOT NULL,
                 secondary_key TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS settings (
                 name TEXT PRIMARY KEY NOT NULL,
                 value TEXT NOT NULL);",
        )?;
        Ok(Self {
            connection: Mutex::new(connection),
        })
    }

    fn with<T>(
        &self,
        work: impl FnOnce(&Connection) -> Result<T, RegistryError>,
    ) -> Result<T, RegistryError> {
        // A panic while holding the lock cannot leave SQLite inconsistent
        // (statements are atomic), so a poisoned lock is still usable.
        let connection = self
            .connection
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        work(&connection)
    }

    pub fn add_device(&self, device_id: &str) -> Result<DeviceRecord, RegistryError> {
        validate_device_id(device_id)?;
        let record = DeviceRecord {
            device_id: device_id.to_string(),
            primary_key: generate_key(),
            secondary_key: generate_key(),
            enabled: true,
        };
        self.with(|connection| {
            let inserted = connection.execute(
                "INSERT OR IGNORE INTO devices (device_id, primary_key, secondary_key) VALUES (?1, ?2, ?3)",
                params![record.device_id, record.primary_key, record.secondary_key],
            )?;
            if inserted == 0 {
                return Err(RegistryError::DeviceExists(device_id.to_string()));
            }
            Ok(record.clone())
        })
    }

    pub fn remove_device(&self, device_id: &str) -> Result<(), RegistryError> {
        self.with(|connection| {
            match connection.execute("DELETE FROM devices WHERE device_id = ?1", [device_id])? {
                0 => Err(RegistryError::NoSuchDevice(device_id.to_string())),
                _ => Ok(()),
            }
        })
    }

    /// Disables or re-enables a device; a disabled device can neither connect
    /// nor be streamed to, and keeps its keys.
    pub fn set_device_enabled(&self, device_id: &str, enabled: bool) -> Result<(), RegistryError> {
        self.with(|connection| {
            let changed = connection.execute(
                "UPDATE devices SET enabled = ?1 WHERE device_id = ?2",
                params![enabled as i64, device_id],
            )?;
            if changed == 0 {
                return Err(RegistryError::NoSuchDevice(device_id.to_string()));
            }
            Ok(())
        })
    }

    /// Replaces one key of a device (`primary` or `secondary`) with a new one.
    pub fn rotate_device_key(
        &self,
        device_id: &str,
        secondary: bool,
    ) -> Result<DeviceRecord, RegistryError> {
        let column = if secondary {
            "secondary_key"
        } else {
            "primary_key"
        };
        let key = generate_key();
        self.with(|connection| {
            let sql = format!("UPDATE devices SET {column} = ?1 WHERE device_id = ?2");
            if connection.execute(&sql, params![key, device_id])? == 0 {
                return Err(RegistryError::NoSuchDevice(device_id.to_string()));
            }
            Ok(())
        })?;
        self.device(device_id)?
            .ok_or_else(|| RegistryError::NoSuchDevice(device_id.to_string()))
    }

    pub fn list_devices(&self) -> Result<Vec<DeviceRecord>, RegistryError> {
        self.with(|connection| {
            let mut statement = connection
                .prepare("SELECT device_id, primary_key, secondary_key, enabled FROM devices ORDER BY device_id")?;
            let rows = statement.query_map([], device_from_row)?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
    }

    /// Creates the policy with fresh keys unless it exists.
    pub fn ensure_policy(&self, name: &str) -> Result<PolicyRecord, RegistryError> {
        self.with(|connection| {
            connection.execute(
                "INSERT OR IGNORE INTO policies (name, primary_key, secondary_key) VALUES (?1, ?2, ?3)",
                params![name, generate_key(), generate_key()],
            )?;
            Ok(())
        })?;
        self.policy(name)?
            .ok_or_else(|| RegistryError::NoSuchPolicy(name.to_string()))
    }

    pub fn setting(&self, name: &str) -> Result<Option<String>, RegistryError> {
        self.with(|connection| {
            Ok(connection
                .query_row(
                    "SELECT value FROM settings WHERE name = ?1",
                    [name],
                    |row| row.get(0),
                )
                .optional()?)
        })
    }

    pub fn set_setting(&self, name: &str, value: &str) -> Result<(), RegistryError> {
        self.with(|connection| {
            connection.execute(
                "INSERT INTO settings (name, value) VALUES (?1, ?2) ON CONFLICT(name) DO UPDATE SET value = excluded.value",
                params![name, value],
            )?;
            Ok(())
        })
    }
}

fn device_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<DeviceRecord> {
    Ok(DeviceRecord {
        device_id: row.get(0)?,
        primary_key: row.get(1)?,
        secondary_key: row.get(2)?,
        enabled: row.get::<_, i64>(3)? != 0,
    })
}

impl Registry for SqliteRegistry {
    fn device(&self, device_id: &str) -> Result<Option<DeviceRecord>, RegistryError> {
        self.with(|connection| {
            Ok(connection
                .query_row(
                    "SELECT device_id, primary_key, secondary_key, enabled FROM devices WHERE device_id = ?1",
                    [device_id],
                    device_from_row,
                )
                .optional()?)
        })
    }

    fn policy(&self, name: &str) -> Result<Option<PolicyRecord>, RegistryError> {
        self.with(|connection| {
            Ok(connection
                .query_row(
                    "SELECT name, primary_key, secondary_key FROM policies WHERE name = ?1",
                    [name],
                    |row| {
                        Ok(PolicyRecord {
                            name: row.get(0)?,
                            primary_key: row.get(1)?,
                            secondary_key: row.get(2)?,
                        })
                    },
                )
                .optional()?)
        })
    }

    fn version(&self) -> Result<i64, RegistryError> {
        self.with(|connection| {
            Ok(connection.query_row("PRAGMA data_version", [], |row| row.get(0))?)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_are_added_listed_rotated_and_removed() {
        let directory = tempfile::tempdir().unwrap();
        let registry = SqliteRegistry::open(&directory.path().join("r.sqlite")).unwrap();
        let added = registry.add_device("MyDevice").unwrap();
        assert!(matches!(
            registry.add_device("MyDevice"),
            Err(RegistryError::DeviceExists(_))
        ));
        assert_eq!(registry.list_devices().unwrap().len(), 1);
        let rotated = registry.rotate_device_key("MyDevice", false).unwrap();
        assert_ne!(rotated.primary_key, added.primary_key);
        assert_eq!(rotated.secondary_key, added.secondary_key);
        registry.remove_device("MyDevice").unwrap();
        assert!(registry.device("MyDevice").unwrap().is_none());
        assert!(matches!(
            registry.remove_device("MyDevice"),
            Err(RegistryError::NoSuchDevice(_))
        ));
    }

    #[test]
    fn another_connection_sees_writes_and_version_changes() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("r.sqlite");
        let serving = SqliteRegistry::open(&path).unwrap();
        let before = serving.version().unwrap();
        SqliteRegistry::open(&path)
            .unwrap()
            .add_device("late")
            .unwrap();
        assert!(serving.device("late").unwrap().is_some());
        assert_ne!(serving.version().unwrap(), before);
    }

    #[test]
    fn invalid_device_ids_are_refused() {
        for id in ["", "a/b", "a b", &"x".repeat(129)] {
            assert!(validate_device_id(id).is_err(), "{id:?}");
        }
        validate_device_id("My-Device_1.x").unwrap();
    }
}
