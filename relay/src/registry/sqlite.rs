//! The registry's store: one SQLite file in the data dir, in WAL mode so
//! the serving relay's reads never wait for `relay device …` writing from
//! another process. The CLI reads and writes it directly; a serving relay
//! only loads whole [`Snapshot`]s from it, off its async workers.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension};

use super::{
    generate_key, validate_device_id, validate_policy_name, DeviceRecord, PolicyRecord, Registry,
    RegistryError, Snapshot,
};
use crate::rights::Rights;

/// The schema this code writes (`PRAGMA user_version`). 0: the first one,
/// policies without rights. 1: policies have rights; every policy of an
/// older file keeps connecting to devices (service-connect).
const SCHEMA_VERSION: i64 = 1;

/// How long a statement waits for another process's write lock. Only the
/// CLI and the snapshot loader (a blocking thread) ever wait on it.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The SQLite registry.
pub struct SqliteRegistry {
    connection: Mutex<Connection>,
}

impl SqliteRegistry {
    /// Opens (creating when missing) the registry file.
    pub fn open(path: &Path) -> Result<Self, RegistryError> {
        let connection = Connection::open(path)?;
        connection.busy_timeout(BUSY_TIMEOUT)?;
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
        migrate(&connection)?;
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

    /// Writes a device whole (import), replacing any record of that id.
    pub fn put_device(&self, record: &DeviceRecord) -> Result<(), RegistryError> {
        validate_device_id(&record.device_id)?;
        self.with(|connection| {
            connection.execute(
                "INSERT INTO devices (device_id, primary_key, secondary_key, enabled) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(device_id) DO UPDATE SET primary_key = excluded.primary_key,
                     secondary_key = excluded.secondary_key, enabled = excluded.enabled",
                params![
                    record.device_id,
                    record.primary_key,
                    record.secondary_key,
                    record.enabled as i64
                ],
            )?;
            Ok(())
        })
    }

    /// Writes a policy whole (import), replacing any policy of that name.
    pub fn put_policy(&self, record: &PolicyRecord) -> Result<(), RegistryError> {
        self.with(|connection| {
            connection.execute(
                "INSERT INTO policies (name, primary_key, secondary_key, rights) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(name) DO UPDATE SET primary_key = excluded.primary_key,
                     secondary_key = excluded.secondary_key, rights = excluded.rights",
                params![record.name, record.primary_key, record.secondary_key, record.rights.to_string()],
            )?;
            Ok(())
        })
    }

    pub fn list_policies(&self) -> Result<Vec<PolicyRecord>, RegistryError> {
        self.with(|connection| {
            let mut statement = connection.prepare(
                "SELECT name, primary_key, secondary_key, rights FROM policies ORDER BY name",
            )?;
            let rows = statement.query_map([], policy_from_row)?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
    }

    /// Creates the policy with fresh keys and `rights` unless it exists
    /// (an existing one keeps its rights).
    pub fn ensure_policy(&self, name: &str, rights: Rights) -> Result<PolicyRecord, RegistryError> {
        self.with(|connection| {
            connection.execute(
                "INSERT OR IGNORE INTO policies (name, primary_key, secondary_key, rights) VALUES (?1, ?2, ?3, ?4)",
                params![name, generate_key(), generate_key(), rights.to_string()],
            )?;
            Ok(())
        })?;
        self.policy(name)?
            .ok_or_else(|| RegistryError::NoSuchPolicy(name.to_string()))
    }

    /// Creates a policy with fresh keys; an error when the name is taken.
    pub fn add_policy(&self, name: &str, rights: Rights) -> Result<PolicyRecord, RegistryError> {
        validate_policy_name(name)?;
        let inserted = self.with(|connection| {
            Ok(connection.execute(
                "INSERT OR IGNORE INTO policies (name, primary_key, secondary_key, rights) VALUES (?1, ?2, ?3, ?4)",
                params![name, generate_key(), generate_key(), rights.to_string()],
            )?)
        })?;
        if inserted == 0 {
            return Err(RegistryError::PolicyExists(name.to_string()));
        }
        self.policy(name)?
            .ok_or_else(|| RegistryError::NoSuchPolicy(name.to_string()))
    }

    pub fn remove_policy(&self, name: &str) -> Result<(), RegistryError> {
        self.with(|connection| {
            match connection.execute("DELETE FROM policies WHERE name = ?1", [name])? {
                0 => Err(RegistryError::NoSuchPolicy(name.to_string())),
                _ => Ok(()),
            }
        })
    }

    /// Replaces one key of a policy with a new one.
    pub fn rotate_policy_key(
        &self,
        name: &str,
        secondary: bool,
    ) -> Result<PolicyRecord, RegistryError> {
        let column = if secondary {
            "secondary_key"
        } else {
            "primary_key"
        };
        let key = generate_key();
        self.with(|connection| {
            let sql = format!("UPDATE policies SET {column} = ?1 WHERE name = ?2");
            if connection.execute(&sql, params![key, name])? == 0 {
                return Err(RegistryError::NoSuchPolicy(name.to_string()));
            }
            Ok(())
        })?;
        self.policy(name)?
            .ok_or_else(|| RegistryError::NoSuchPolicy(name.to_string()))
    }

    /// Changes whenever another connection (this process's or another's)
    /// commits a write; cheap, so it can be polled.
    pub fn data_version(&self) -> Result<i64, RegistryError> {
        self.with(|connection| {
            Ok(connection.query_row("PRAGMA data_version", [], |row| row.get(0))?)
        })
    }

    /// Every device and policy, read in one transaction so the snapshot is
    /// consistent, with the `data_version` it was read at.
    pub fn load_snapshot(&self) -> Result<(Snapshot, i64), RegistryError> {
        self.with(|connection| {
            let transaction = connection.unchecked_transaction()?;
            let version: i64 =
                transaction.query_row("PRAGMA data_version", [], |row| row.get(0))?;
            let devices = {
                let mut statement = transaction.prepare(
                    "SELECT device_id, primary_key, secondary_key, enabled FROM devices",
                )?;
                let rows = statement.query_map([], device_from_row)?;
                rows.map(|row| row.map(|record| (record.device_id.clone(), record)))
                    .collect::<Result<HashMap<_, _>, _>>()?
            };
            let policies = {
                let mut statement = transaction
                    .prepare("SELECT name, primary_key, secondary_key, rights FROM policies")?;
                let rows = statement.query_map([], policy_from_row)?;
                rows.map(|row| row.map(|record| (record.name.clone(), record)))
                    .collect::<Result<HashMap<_, _>, _>>()?
            };
            transaction.commit()?;
            Ok((Snapshot::new(devices, policies), version))
        })
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

fn policy_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<PolicyRecord> {
    let rights: String = row.get(3)?;
    Ok(PolicyRecord {
        name: row.get(0)?,
        primary_key: row.get(1)?,
        secondary_key: row.get(2)?,
        // A value this code cannot read grants nothing rather than failing
        // every load of the registry.
        rights: Rights::parse(&rights).unwrap_or_default(),
    })
}

/// Brings a file of an older schema up to [`SCHEMA_VERSION`], in place and
/// in one transaction, so a relay and a CLI opening it at once agree.
fn migrate(connection: &Connection) -> Result<(), RegistryError> {
    let version: i64 = connection.query_row("PRAGMA user_version", [], |row| row.get(0))?;
    if version >= SCHEMA_VERSION {
        return Ok(());
    }
    connection.execute_batch("BEGIN IMMEDIATE")?;
    let result = (|| -> Result<(), RegistryError> {
        let has_rights: bool = connection.query_row(
            "SELECT COUNT(*) FROM pragma_table_info('policies') WHERE name = 'rights'",
            [],
            |row| row.get::<_, i64>(0).map(|count| count > 0),
        )?;
        if !has_rights {
            // Every policy of an older file connected to devices: it still does.
            connection.execute(
                &format!(
                    "ALTER TABLE policies ADD COLUMN rights TEXT NOT NULL DEFAULT '{}'",
                    Rights::SERVICE_CONNECT
                ),
                [],
            )?;
        }
        connection.execute_batch(&format!("PRAGMA user_version = {SCHEMA_VERSION}"))?;
        Ok(())
    })();
    match result {
        Ok(()) => connection.execute_batch("COMMIT")?,
        Err(error) => {
            let _ = connection.execute_batch("ROLLBACK");
            return Err(error);
        }
    }
    Ok(())
}

/// The CLI's direct reads. A serving relay reads a [`Snapshot`] instead.
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
                    "SELECT name, primary_key, secondary_key, rights FROM policies WHERE name = ?1",
                    [name],
                    policy_from_row,
                )
                .optional()?)
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
    fn an_old_registry_gains_rights_and_its_policies_keep_connecting() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("r.sqlite");
        {
            let old = Connection::open(&path).unwrap();
            old.execute_batch(
                "CREATE TABLE policies (name TEXT PRIMARY KEY NOT NULL,
                     primary_key TEXT NOT NULL, secondary_key TEXT NOT NULL);
                 INSERT INTO policies VALUES ('service', 'a2V5', 'a2V5');",
            )
            .unwrap();
        }
        let registry = SqliteRegistry::open(&path).unwrap();
        let service = registry.policy("service").unwrap().unwrap();
        assert_eq!(service.rights, Rights::SERVICE_CONNECT);
        assert_eq!(service.primary_key, "a2V5");
        // Opening again (another process) finds it current.
        SqliteRegistry::open(&path).unwrap();
        let added = registry
            .add_policy("reader", Rights::parse("registry-read").unwrap())
            .unwrap();
        assert!(matches!(
            registry.add_policy("reader", Rights::ALL),
            Err(RegistryError::PolicyExists(_))
        ));
        let rotated = registry.rotate_policy_key("reader", true).unwrap();
        assert_eq!(rotated.primary_key, added.primary_key);
        assert_ne!(rotated.secondary_key, added.secondary_key);
        registry.remove_policy("reader").unwrap();
        assert!(registry.policy("reader").unwrap().is_none());
    }

    #[test]
    fn ids_with_every_iothub_character_are_stored() {
        let directory = tempfile::tempdir().unwrap();
        let registry = SqliteRegistry::open(&directory.path().join("r.sqlite")).unwrap();
        let id = "a#b?c=d@e+f%g_h*i!j(k)l,m:n$o'p-q.r";
        registry.add_device(id).unwrap();
        assert_eq!(registry.device(id).unwrap().unwrap().device_id, id);
        assert!(matches!(
            registry.add_device("a;b"),
            Err(RegistryError::InvalidDeviceId { .. })
        ));
    }

    #[test]
    fn another_connection_sees_writes_and_version_changes() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("r.sqlite");
        let serving = SqliteRegistry::open(&path).unwrap();
        let before = serving.data_version().unwrap();
        SqliteRegistry::open(&path)
            .unwrap()
            .add_device("late")
            .unwrap();
        assert!(serving.device("late").unwrap().is_some());
        assert_ne!(serving.data_version().unwrap(), before);
    }

    #[test]
    fn a_snapshot_holds_every_device_and_policy_and_its_version() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("r.sqlite");
        let serving = SqliteRegistry::open(&path).unwrap();
        let writer = SqliteRegistry::open(&path).unwrap();
        writer
            .ensure_policy("service", Rights::SERVICE_CONNECT)
            .unwrap();
        writer.add_device("one").unwrap();
        writer.add_device("two").unwrap();
        writer.set_device_enabled("two", false).unwrap();
        let (snapshot, version) = serving.load_snapshot().unwrap();
        assert_eq!(version, serving.data_version().unwrap());
        assert!(snapshot.device("one").is_some_and(|record| record.enabled));
        assert!(snapshot.device("two").is_some_and(|record| !record.enabled));
        assert!(snapshot.device("three").is_none());
        assert!(snapshot.policy("service").is_some());
        assert_eq!(snapshot.device_count(), 2);
    }
}
