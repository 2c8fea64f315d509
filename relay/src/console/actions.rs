//! The console's registry changes, made the way `relay device …` makes
//! them: a single relay writes its data dir's registry file (which the
//! serving relay follows, cutting a disabled, removed or re-keyed device at
//! once), a cluster node writes the cluster's registry. The SQLite work
//! runs on a blocking thread, never on an async worker.

use std::sync::Arc;

use crate::data_dir::{HOST_NAME_SETTING, REGISTRY_FILE};
use crate::registry::{DeviceRecord, RegistryError, SqliteRegistry};
use crate::state::RelayState;

/// Used for connection strings when the registry records no host name yet.
const FALLBACK_HOST_NAME: &str = "localhost:8443";

/// What an operator can do to a device from the console.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceChange {
    Add,
    Enable,
    Disable,
    RotateKey,
    Remove,
}

impl DeviceChange {
    pub fn name(self) -> &'static str {
        match self {
            DeviceChange::Add => "add",
            DeviceChange::Enable => "enable",
            DeviceChange::Disable => "disable",
            DeviceChange::RotateKey => "rotate-key",
            DeviceChange::Remove => "remove",
        }
    }

    /// How the console says it was done ("Disabled MyDevice.").
    pub fn done(self) -> &'static str {
        match self {
            DeviceChange::Add => "Added",
            DeviceChange::Enable => "Enabled",
            DeviceChange::Disable => "Disabled",
            DeviceChange::RotateKey => "Rotated the primary key of",
            DeviceChange::Remove => "Removed",
        }
    }

    /// Whether the change hands out a new key (shown once).
    fn shows_key(self) -> bool {
        matches!(self, DeviceChange::Add | DeviceChange::RotateKey)
    }
}

/// Makes the change; for an added or re-keyed device, returns its new
/// connection string. Errors are one line for the page.
pub async fn change_device(
    state: &RelayState,
    device_id: &str,
    change: DeviceChange,
) -> Result<Option<String>, String> {
    let changed: Result<_, String> = match &state.cluster {
        Some(cluster) => in_cluster(cluster.clone(), device_id, change)
            .await
            .map_err(|error| error.to_string()),
        None => {
            let path = state.config.data_dir.join(REGISTRY_FILE);
            let device_id = device_id.to_string();
            tokio::task::spawn_blocking(move || in_file(&path, &device_id, change))
                .await
                .map_err(|error| format!("the registry change did not finish: {error}"))
                .and_then(|result| result.map_err(|error| error.to_string()))
        }
    };
    let (record, host_name) = changed?;
    // The relay follows the store; wait until it holds this change, so the
    // page shown next (and the device) see it.
    state.registry.refresh().await;
    match record.filter(|_| change.shows_key()) {
        Some(record) => framing::ConnectionString::for_device(
            &host_name,
            &record.device_id,
            &record.primary_key,
        )
        .map(|connection| Some(connection.to_secret_string()))
        .map_err(|error| format!("cannot make the connection string: {error}")),
        None => Ok(None),
    }
}

type Changed = Result<(Option<DeviceRecord>, String), RegistryError>;

fn in_file(path: &std::path::Path, device_id: &str, change: DeviceChange) -> Changed {
    let registry = SqliteRegistry::open(path)?;
    let record = match change {
        DeviceChange::Add => Some(registry.add_device(device_id)?),
        DeviceChange::Enable => registry.set_device_enabled(device_id, true).map(|_| None)?,
        DeviceChange::Disable => registry
            .set_device_enabled(device_id, false)
            .map(|_| None)?,
        DeviceChange::RotateKey => Some(registry.rotate_device_key(device_id, false)?),
        DeviceChange::Remove => registry.remove_device(device_id).map(|_| None)?,
    };
    let host_name = registry
        .setting(HOST_NAME_SETTING)?
        .unwrap_or_else(|| FALLBACK_HOST_NAME.to_string());
    Ok((record, host_name))
}

async fn in_cluster(
    cluster: Arc<crate::cluster::Cluster>,
    device_id: &str,
    change: DeviceChange,
) -> Changed {
    let record = match change {
        DeviceChange::Add => Some(cluster.add_device(device_id).await?),
        DeviceChange::Enable => cluster
            .set_device_enabled(device_id, true)
            .await
            .map(|_| None)?,
        DeviceChange::Disable => cluster
            .set_device_enabled(device_id, false)
            .await
            .map(|_| None)?,
        DeviceChange::RotateKey => Some(cluster.rotate_device_key(device_id, false).await?),
        DeviceChange::Remove => cluster.remove_device(device_id).await.map(|_| None)?,
    };
    let host_name = cluster
        .host_name()
        .await?
        .unwrap_or_else(|| FALLBACK_HOST_NAME.to_string());
    Ok((record, host_name))
}
