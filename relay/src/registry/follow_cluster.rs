//! Keeps a cluster node's [`SnapshotRegistry`] in step with the registry
//! bucket in NATS, as [`super::follow`] does with the SQLite file.
//!
//! A JetStream KV watch delivers the last value of every key, then every
//! change as it is written, in the bucket's order. The follower applies
//! them to its own maps and swaps in a new snapshot whenever it has caught
//! up with what was pending (so a bulk import rebuilds the snapshot once,
//! not once per device); devices the swap revokes are cut here as with the
//! file ([`super::follow::cut`]). A change is in force on every node within
//! the time NATS takes to deliver it — milliseconds.
//!
//! NATS may go away: the snapshot stays as it was (the node serves from its
//! copy), the watch resumes from the last revision applied once NATS is
//! back, and a [`Registry::refresh`](super::Registry::refresh) asked for
//! meanwhile is answered at once rather than waiting on the cluster.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::kv;
use futures_util::StreamExt;
use tokio::time::Instant;

use super::snapshot::CheckCovers;
use super::{DeviceRecord, PolicyRecord, RegistryError, Snapshot, SnapshotRegistry};
use crate::cluster::registry::{StoredDevice, StoredPolicy, DEVICE_PREFIX, POLICY_PREFIX};
use crate::cluster::{decode_token, Cluster};
use crate::state::RelayState;

/// Longest the first load of the bucket may take at start.
pub const INITIAL_LOAD_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on asking NATS how far the bucket goes (for a refresh).
const LAST_REVISION_TIMEOUT: Duration = Duration::from_millis(500);
/// Least time between two questions to NATS asked for by refreshes: a
/// flood of refused CONNECTs costs NATS at most one request per spacing.
const MIN_REFRESH_SPACING: Duration = Duration::from_millis(10);
/// Refreshes waiting for the watch at once (each is also bounded in time
/// by the caller).
const MAX_WAITING_REFRESHES: usize = 64;
/// Pause between attempts to re-create a watch that ended.
const REWATCH_DELAY: Duration = Duration::from_millis(500);

/// The registry bucket as this node has read it so far.
pub struct ClusterSource {
    store: kv::Store,
    devices: HashMap<String, DeviceRecord>,
    policies: HashMap<String, PolicyRecord>,
    /// Revision (stream sequence) of the last entry applied.
    applied_revision: u64,
    watch: Option<kv::Watch>,
}

impl ClusterSource {
    /// Reads every key of the bucket (bounded by [`INITIAL_LOAD_TIMEOUT`])
    /// and returns the source, still watching, with the first snapshot.
    pub async fn load(cluster: &Cluster) -> Result<(Self, Snapshot), RegistryError> {
        let store = cluster.registry_bucket().clone();
        let mut source = Self {
            store,
            devices: HashMap::new(),
            policies: HashMap::new(),
            applied_revision: 0,
            watch: None,
        };
        tokio::time::timeout(INITIAL_LOAD_TIMEOUT, source.load_all())
            .await
            .unwrap_or_else(|_| {
                Err(RegistryError::Cluster(format!(
                    "reading the registry bucket took longer than {INITIAL_LOAD_TIMEOUT:?}"
                )))
            })?;
        let snapshot = source.snapshot();
        Ok((source, snapshot))
    }

    async fn load_all(&mut self) -> Result<(), RegistryError> {
        let last_revision = self.last_revision().await?;
        let mut watch = self
            .store
            .watch_with_history(">")
            .await
            .map_err(|error| RegistryError::Cluster(error.to_string()))?;
        while self.applied_revision < last_revision {
            match watch.next().await {
                Some(Ok(entry)) => self.apply(&entry),
                Some(Err(error)) => return Err(RegistryError::Cluster(error.to_string())),
                None => {
                    return Err(RegistryError::Cluster(
                        "the registry watch ended while loading".into(),
                    ))
                }
            }
        }
        self.watch = Some(watch);
        Ok(())
    }

    /// The bucket's last revision (0 when empty).
    async fn last_revision(&self) -> Result<u64, RegistryError> {
        last_revision(&self.store).await
    }

    fn apply(&mut self, entry: &kv::Entry) {
        self.applied_revision = self.applied_revision.max(entry.revision);
        let removed = !matches!(entry.operation, kv::Operation::Put);
        if let Some(encoded) = entry.key.strip_prefix(DEVICE_PREFIX) {
            let Some(device_id) = decode_token(encoded) else {
                tracing::warn!(
                    key = entry.key,
                    "ignoring a registry key that is not a device id"
                );
                return;
            };
            if removed {
                self.devices.remove(&device_id);
                return;
            }
            match serde_json::from_slice::<StoredDevice>(&entry.value) {
                Ok(stored) if stored.device_id == device_id => {
                    self.devices.insert(device_id, stored.into());
                }
                // Unreadable: the device can no longer be trusted.
                _ => {
                    tracing::warn!(device_id, "unreadable device record in the cluster registry; treating the device as removed");
                    self.devices.remove(&device_id);
                }
            }
        } else if let Some(encoded) = entry.key.strip_prefix(POLICY_PREFIX) {
            let Some(name) = decode_token(encoded) else {
                return;
            };
            if removed {
                self.policies.remove(&name);
                return;
            }
            match serde_json::from_slice::<StoredPolicy>(&entry.value) {
                Ok(stored) if stored.name == name => {
                    self.policies.insert(name, stored.into());
                }
                _ => {
                    tracing::warn!(
                        policy = name,
                        "unreadable policy record in the cluster registry; treating it as removed"
                    );
                    self.policies.remove(&name);
                }
            }
        }
    }

    fn snapshot(&self) -> Snapshot {
        Snapshot::new(self.devices.clone(), self.policies.clone())
    }
}

/// The bucket's last revision (0 when empty).
async fn last_revision(store: &kv::Store) -> Result<u64, RegistryError> {
    let info = store
        .stream
        .get_info()
        .await
        .map_err(|error| RegistryError::Cluster(error.to_string()))?;
    Ok(info.state.last_sequence)
}

/// A watch from `revision` on, re-created after one ended (NATS gone a
/// long while, the consumer lost); `None` (after a pause) while NATS
/// cannot make one.
async fn rewatch(store: kv::Store, revision: u64) -> Option<kv::Watch> {
    match store.watch_all_from_revision(revision).await {
        Ok(watch) => Some(watch),
        Err(error) => {
            tracing::debug!(%error, "cannot watch the registry bucket yet; retrying");
            tokio::time::sleep(REWATCH_DELAY).await;
            None
        }
    }
}

/// A refresh waiting for the watch to reach a revision.
struct WaitingRefresh {
    covers: CheckCovers,
    revision: u64,
}

/// Follows the registry bucket until the relay stops accepting.
pub async fn follow_cluster(
    state: Arc<RelayState>,
    registry: Arc<SnapshotRegistry>,
    mut source: ClusterSource,
) {
    let mut waiting: Vec<WaitingRefresh> = Vec::new();
    let mut changed = false;
    let mut watch_slot = source.watch.take();
    let mut last_asked: Option<Instant> = None;
    loop {
        let Some(watch) = watch_slot.as_mut() else {
            tokio::select! {
                _ = state.stop_accepting.cancelled() => return,
                watch = rewatch(source.store.clone(), source.applied_revision + 1) => watch_slot = watch,
                _ = registry.refresh_wanted() => {
                    // No watch: answer from the copy at once.
                    let covers = registry.check_started();
                    registry.check_finished(covers);
                }
            }
            continue;
        };
        tokio::select! {
            _ = state.stop_accepting.cancelled() => return,
            next = watch.next() => match next {
                Some(Ok(entry)) => {
                    source.apply(&entry);
                    changed = true;
                    // Caught up with what was pending: publish once.
                    if entry.delta == 0 {
                        publish(&state, &registry, &source, &mut changed);
                        finish_waiting(&registry, &mut waiting, source.applied_revision);
                    }
                }
                Some(Err(error)) => {
                    tracing::warn!(%error, "registry watch error; the node serves its copy meanwhile");
                }
                None => {
                    tracing::warn!("registry watch ended; watching again from the last change applied");
                    publish(&state, &registry, &source, &mut changed);
                    for refresh in waiting.drain(..) {
                        registry.check_finished(refresh.covers);
                    }
                    watch_slot = None;
                }
            },
            _ = registry.refresh_wanted() => {
                if let Some(last) = last_asked {
                    tokio::time::sleep_until(last + MIN_REFRESH_SPACING).await;
                }
                let covers = registry.check_started();
                let asked = Instant::now();
                last_asked = Some(asked);
                let store = source.store.clone();
                match tokio::time::timeout(LAST_REVISION_TIMEOUT, last_revision(&store)).await {
                    Ok(Ok(revision)) if revision > source.applied_revision => {
                        if waiting.len() >= MAX_WAITING_REFRESHES {
                            // Refreshes are bounded in time anyway; the
                            // oldest gives up now rather than the list growing.
                            registry.check_finished(waiting.remove(0).covers);
                        }
                        waiting.push(WaitingRefresh { covers, revision });
                    }
                    Ok(Ok(_)) => {
                        publish(&state, &registry, &source, &mut changed);
                        registry.check_finished(covers);
                    }
                    _ => {
                        tracing::debug!(elapsed = ?asked.elapsed(), "NATS did not say how far the registry goes; answering from the copy");
                        registry.check_finished(covers);
                    }
                }
            }
        }
    }
}

fn publish(
    state: &RelayState,
    registry: &SnapshotRegistry,
    source: &ClusterSource,
    changed: &mut bool,
) {
    if !*changed {
        return;
    }
    *changed = false;
    let snapshot = source.snapshot();
    let devices = snapshot.device_count();
    let before = registry.current();
    let revoked = registry.replace(snapshot);
    super::follow::audit_changes(state, "cluster", &before, &registry.current());
    tracing::debug!(
        devices,
        revoked = revoked.len(),
        revision = source.applied_revision,
        "cluster registry changed"
    );
    super::follow::cut(state, &revoked);
}

fn finish_waiting(
    registry: &SnapshotRegistry,
    waiting: &mut Vec<WaitingRefresh>,
    applied_revision: u64,
) {
    waiting.retain(|refresh| {
        if refresh.revision <= applied_revision {
            registry.check_finished(refresh.covers);
            false
        } else {
            true
        }
    });
}
