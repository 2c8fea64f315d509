//! The serving relay's registry: an immutable [`Snapshot`] of every identity,
//! swapped whole when the store changes.
//!
//! Readers load the current snapshot with one atomic pointer read
//! (`arc-swap`) and never wait: not for a lock, not for the disk, not for a
//! reload in progress, which builds the next snapshot aside and then swaps
//! it in. Comparing the old snapshot with the new one tells which devices
//! lost access, so the caller can cut exactly those.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::{watch, Notify};

use super::{DeviceRecord, PolicyRecord, Registry, RegistryError};

/// Every device and policy at one moment.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Snapshot {
    devices: HashMap<String, DeviceRecord>,
    policies: HashMap<String, PolicyRecord>,
}

impl Snapshot {
    pub fn new(
        devices: HashMap<String, DeviceRecord>,
        policies: HashMap<String, PolicyRecord>,
    ) -> Self {
        Self { devices, policies }
    }

    pub fn device(&self, device_id: &str) -> Option<&DeviceRecord> {
        self.devices.get(device_id)
    }

    pub fn policy(&self, name: &str) -> Option<&PolicyRecord> {
        self.policies.get(name)
    }

    /// Every device, sorted by id.
    pub fn devices(&self) -> Vec<DeviceRecord> {
        let mut devices: Vec<DeviceRecord> = self.devices.values().cloned().collect();
        devices.sort_by(|first, second| first.device_id.cmp(&second.device_id));
        devices
    }

    pub fn device_count(&self) -> usize {
        self.devices.len()
    }

    /// Devices that could connect with `self` and lost that in `next`:
    /// removed, disabled, or holding a key that is no longer one of theirs
    /// (a rotation). A session authenticated with the old state must end.
    /// Sorted, for stable logs.
    pub fn revoked_in(&self, next: &Snapshot) -> Vec<String> {
        let mut revoked: Vec<String> = self
            .devices
            .values()
            .filter(|before| before.enabled)
            .filter(|before| match next.devices.get(&before.device_id) {
                None => true,
                Some(after) => {
                    !after.enabled
                        || after.primary_key != before.primary_key
                        || after.secondary_key != before.secondary_key
                }
            })
            .map(|before| before.device_id.clone())
            .collect();
        revoked.sort();
        revoked
    }

    /// What changed from `self` to `next`, for the audit log: `(kind, name,
    /// change)` with kind `device` or `policy` and change `added`,
    /// `removed`, `enabled`, `disabled` or `key_rotated`. Sorted; no keys.
    pub fn changes_in(&self, next: &Snapshot) -> Vec<(&'static str, String, &'static str)> {
        let mut changes = Vec::new();
        for (device_id, after) in &next.devices {
            match self.devices.get(device_id) {
                None => changes.push(("device", device_id.clone(), "added")),
                Some(before) => {
                    if before.enabled != after.enabled {
                        let change = if after.enabled { "enabled" } else { "disabled" };
                        changes.push(("device", device_id.clone(), change));
                    }
                    if before.primary_key != after.primary_key
                        || before.secondary_key != after.secondary_key
                    {
                        changes.push(("device", device_id.clone(), "key_rotated"));
                    }
                }
            }
        }
        for device_id in self.devices.keys() {
            if !next.devices.contains_key(device_id) {
                changes.push(("device", device_id.clone(), "removed"));
            }
        }
        for (name, after) in &next.policies {
            match self.policies.get(name) {
                None => changes.push(("policy", name.clone(), "added")),
                Some(before) => {
                    if before.primary_key != after.primary_key
                        || before.secondary_key != after.secondary_key
                    {
                        changes.push(("policy", name.clone(), "key_rotated"));
                    } else if before != after {
                        changes.push(("policy", name.clone(), "changed"));
                    }
                }
            }
        }
        for name in self.policies.keys() {
            if !next.policies.contains_key(name) {
                changes.push(("policy", name.clone(), "removed"));
            }
        }
        changes.sort();
        changes
    }
}

/// What one check of the store answers for: the refreshes asked for and the
/// changes reported before it started.
#[derive(Debug, Clone, Copy)]
pub struct CheckCovers {
    refreshes: u64,
    changes: u64,
}

/// Longest a [`Registry::refresh`] waits for the store to be checked.
pub const REFRESH_TIMEOUT: Duration = Duration::from_secs(1);

/// The registry a serving relay reads: the current snapshot.
pub struct SnapshotRegistry {
    current: ArcSwap<Snapshot>,
    /// Refreshes asked for so far; each waits for a check that started
    /// after it asked.
    refreshes_requested: AtomicU64,
    refresh_wanted: Notify,
    /// The count of requests the last finished check covered.
    refreshes_done: watch::Sender<u64>,
    /// Changes the store reported (file events), and how many of them the
    /// last finished check covered.
    changes_reported: AtomicU64,
    changes_checked: AtomicU64,
}

impl SnapshotRegistry {
    pub fn new(snapshot: Snapshot) -> Self {
        Self {
            current: ArcSwap::from_pointee(snapshot),
            refreshes_requested: AtomicU64::new(0),
            refresh_wanted: Notify::new(),
            refreshes_done: watch::Sender::new(0),
            changes_reported: AtomicU64::new(0),
            changes_checked: AtomicU64::new(0),
        }
    }

    /// The store reported a change (called from the file watcher).
    pub fn change_reported(&self) {
        self.changes_reported.fetch_add(1, Ordering::SeqCst);
    }

    /// Resolves when some caller wants the store checked now.
    pub async fn refresh_wanted(&self) {
        self.refresh_wanted.notified().await
    }

    /// Called as a check of the store starts: what it covers.
    pub fn check_started(&self) -> CheckCovers {
        CheckCovers {
            refreshes: self.refreshes_requested.load(Ordering::SeqCst),
            changes: self.changes_reported.load(Ordering::SeqCst),
        }
    }

    /// Called when the check that started with [`Self::check_started`] has
    /// finished (its snapshot, if any, swapped in).
    pub fn check_finished(&self, covers: CheckCovers) {
        self.changes_checked
            .fetch_max(covers.changes, Ordering::SeqCst);
        self.refreshes_done.send_if_modified(|done| {
            let advanced = covers.refreshes > *done;
            *done = (*done).max(covers.refreshes);
            advanced
        });
    }

    /// The snapshot readers see now.
    pub fn current(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Makes `next` the current snapshot; returns the devices that lost
    /// access with it (see [`Snapshot::revoked_in`]). Only one task swaps,
    /// so the comparison is against exactly what readers saw before.
    pub fn replace(&self, next: Snapshot) -> Vec<String> {
        let next = Arc::new(next);
        let previous = self.current.swap(next.clone());
        previous.revoked_in(&next)
    }
}

impl Registry for SnapshotRegistry {
    fn device(&self, device_id: &str) -> Result<Option<DeviceRecord>, RegistryError> {
        Ok(self.current.load().device(device_id).cloned())
    }

    fn policy(&self, name: &str) -> Result<Option<PolicyRecord>, RegistryError> {
        Ok(self.current.load().policy(name).cloned())
    }

    fn refresh(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(async move {
            let wanted = self.refreshes_requested.fetch_add(1, Ordering::SeqCst) + 1;
            let mut done = self.refreshes_done.subscribe();
            self.refresh_wanted.notify_one();
            // Past the deadline (the follower is stopping, or the store is
            // stuck) the caller goes on with the snapshot it has.
            let _ =
                tokio::time::timeout(REFRESH_TIMEOUT, done.wait_for(|&done| done >= wanted)).await;
        })
    }

    fn device_list(&self) -> Vec<DeviceRecord> {
        self.current().devices()
    }

    fn change_pending(&self) -> bool {
        self.changes_reported.load(Ordering::SeqCst) > self.changes_checked.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(device_id: &str, primary_key: &str, enabled: bool) -> DeviceRecord {
        DeviceRecord {
            device_id: device_id.into(),
            primary_key: primary_key.into(),
            secondary_key: format!("{device_id}-secondary"),
            enabled,
        }
    }

    fn snapshot(devices: &[DeviceRecord]) -> Snapshot {
        Snapshot::new(
            devices
                .iter()
                .map(|record| (record.device_id.clone(), record.clone()))
                .collect(),
            HashMap::new(),
        )
    }

    #[test]
    fn removed_disabled_and_rotated_devices_are_revoked_and_others_are_not() {
        let before = snapshot(&[
            device("kept", "k", true),
            device("removed", "k", true),
            device("disabled", "k", true),
            device("rotated", "k", true),
            device("was-disabled", "k", false),
        ]);
        let mut secondary_rotated = device("kept", "k", true);
        secondary_rotated.secondary_key = "new".into();
        let after = snapshot(&[
            device("kept", "k", true),
            device("disabled", "k", false),
            device("rotated", "new", true),
            device("was-disabled", "k", true),
            device("added", "k", true),
        ]);
        assert_eq!(
            before.revoked_in(&after),
            ["disabled", "removed", "rotated"]
        );
        assert!(after.revoked_in(&after).is_empty());
        let secondary = snapshot(&[secondary_rotated]);
        assert_eq!(
            snapshot(&[device("kept", "k", true)]).revoked_in(&secondary),
            ["kept"],
            "rotating the secondary key revokes it too"
        );
    }

    #[test]
    fn readers_see_the_new_snapshot_after_replace() {
        let registry = SnapshotRegistry::new(snapshot(&[device("old", "k", true)]));
        let held = registry.current();
        assert!(registry.device("old").unwrap().is_some());
        assert!(registry.device("new").unwrap().is_none());
        let revoked = registry.replace(snapshot(&[device("new", "k", true)]));
        assert_eq!(revoked, ["old"]);
        assert!(registry.device("old").unwrap().is_none());
        assert_eq!(registry.device("new").unwrap().unwrap().primary_key, "k");
        assert!(
            held.device("old").is_some(),
            "a reader holding the old snapshot keeps a consistent view"
        );
    }

    #[tokio::test]
    async fn refresh_waits_for_a_check_that_started_after_it_asked() {
        let registry = Arc::new(SnapshotRegistry::new(Snapshot::default()));
        let follower = {
            let registry = registry.clone();
            tokio::spawn(async move {
                registry.refresh_wanted().await;
                let covers = registry.check_started();
                registry.replace(snapshot(&[device("late", "k", true)]));
                registry.check_finished(covers);
            })
        };
        tokio::time::timeout(Duration::from_millis(900), registry.refresh())
            .await
            .expect("the check answered before the refresh deadline");
        assert!(registry.device("late").unwrap().is_some());
        follower.await.unwrap();
    }

    #[test]
    fn a_reported_change_is_pending_until_a_check_that_started_after_it_finished() {
        let registry = SnapshotRegistry::new(Snapshot::default());
        assert!(!registry.change_pending());
        registry.change_reported();
        assert!(registry.change_pending());
        let covers = registry.check_started();
        registry.change_reported();
        registry.check_finished(covers);
        assert!(
            registry.change_pending(),
            "a change reported during a check needs another one"
        );
        let covers = registry.check_started();
        registry.check_finished(covers);
        assert!(!registry.change_pending());
    }

    #[tokio::test(start_paused = true)]
    async fn refresh_gives_up_after_its_deadline_without_a_follower() {
        let registry = SnapshotRegistry::new(Snapshot::default());
        let started = tokio::time::Instant::now();
        registry.refresh().await;
        assert_eq!(started.elapsed(), REFRESH_TIMEOUT);
    }
}
