//! Keeps a serving relay's [`SnapshotRegistry`] in step with the registry
//! file, and cuts the devices a change revokes.
//!
//! SQLite's `PRAGMA data_version` changes whenever another connection
//! commits, so checking it is cheap; only when it moved is the whole
//! registry read again into a new snapshot. The check runs on a blocking
//! thread (`spawn_blocking`), never on an async worker, because SQLite may
//! wait for another process's lock. It runs every [`POLL_INTERVAL`], and at
//! once when the file system reports a write to the registry files or a
//! writer closing them (a `relay device …` in another process, or a write
//! from this process), so a change is in force by the time the command that
//! made it has returned.
//!
//! A device that lost access in the new snapshot (removed, disabled, a key
//! rotated) loses its control channel and its live streams at once: a
//! session opened with a key that is no longer valid must not outlive it.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use notify::event::{AccessKind, AccessMode};
use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};

use super::{RegistryError, Snapshot, SnapshotRegistry, SqliteRegistry};
use crate::state::RelayState;

/// How often the registry file is checked for changes when the file system
/// reports none (a file system without change notifications, a missed
/// event): a change is picked up within this, well under a second.
pub const POLL_INTERVAL: Duration = Duration::from_millis(250);

/// Least time between two checks asked for by [`Registry::refresh`]
/// (refusals of unknown devices or bad keys): bounds the checks a flood of
/// bad CONNECTs can cause, at a few milliseconds of extra delay for them.
///
/// [`Registry::refresh`]: super::Registry::refresh
const MIN_ON_DEMAND_SPACING: Duration = Duration::from_millis(10);

/// The registry file a serving relay loads its snapshots from, through a
/// connection of its own that only blocking threads use.
pub struct SqliteSource {
    store: SqliteRegistry,
    path: PathBuf,
    /// `data_version` of the last snapshot loaded.
    loaded_version: i64,
}

impl SqliteSource {
    /// Opens the file and loads the first snapshot.
    pub fn open(path: &Path) -> Result<(Self, Snapshot), RegistryError> {
        let store = SqliteRegistry::open(path)?;
        let (snapshot, loaded_version) = store.load_snapshot()?;
        Ok((
            Self {
                store,
                path: path.to_path_buf(),
                loaded_version,
            },
            snapshot,
        ))
    }

    /// A new snapshot when the file changed since the last one; blocking.
    pub fn reload_if_changed(&mut self) -> Result<Option<Snapshot>, RegistryError> {
        if self.store.data_version()? == self.loaded_version {
            return Ok(None);
        }
        let (snapshot, version) = self.store.load_snapshot()?;
        self.loaded_version = version;
        Ok(Some(snapshot))
    }
}

/// Follows the registry file until the relay stops accepting.
pub async fn follow(state: Arc<RelayState>, registry: Arc<SnapshotRegistry>, source: SqliteSource) {
    let (wake, mut woken) = mpsc::channel::<()>(1);
    // Dropped with this task, which stops its thread.
    let _watcher = watch_registry_files(&source.path, registry.clone(), wake);
    let source = Arc::new(Mutex::new(source));
    let mut interval = tokio::time::interval(POLL_INTERVAL);
    interval.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut failing = false;
    let mut last_check: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = state.stop_accepting.cancelled() => return,
            _ = interval.tick() => {}
            Some(()) = woken.recv() => {}
            _ = registry.refresh_wanted() => {
                // Refusals ask for checks; a flood of them gets one check
                // per spacing, each covering every request before it.
                if let Some(last) = last_check {
                    tokio::time::sleep_until(last + MIN_ON_DEMAND_SPACING).await;
                }
            }
        }
        last_check = Some(Instant::now());
        let covers = registry.check_started();
        let source = source.clone();
        let reloaded = tokio::task::spawn_blocking(move || {
            source
                .lock()
                // A panic in a reload left no half-written state behind:
                // the source only records a version after a full load.
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .reload_if_changed()
        })
        .await;
        match reloaded {
            Ok(Ok(Some(snapshot))) => {
                failing = false;
                let devices = snapshot.device_count();
                let before = registry.current();
                let revoked = registry.replace(snapshot);
                audit_changes(&state, "data_dir", &before, &registry.current());
                tracing::debug!(devices, revoked = revoked.len(), "registry reloaded");
                cut(&state, &revoked);
            }
            Ok(Ok(None)) => failing = false,
            Ok(Err(error)) => {
                if !failing {
                    tracing::warn!(%error, "cannot reload the registry; serving the identities loaded last until it can");
                }
                failing = true;
            }
            Err(error) => {
                tracing::error!(%error, "the registry reload failed; serving the identities loaded last");
            }
        }
        registry.check_finished(covers);
    }
}

/// Records in the audit log what changed between two snapshots; `source`
/// says where the change came from (`data_dir`: a `relay` command on the
/// data dir, or an import; `cluster`: any node or command on the cluster).
pub(super) fn audit_changes(
    state: &RelayState,
    source: &'static str,
    before: &super::Snapshot,
    after: &super::Snapshot,
) {
    // Also without --audit-log: the console's Activity page shows them.
    for (kind, name, change) in before.changes_in(after) {
        state
            .audit
            .record(|| crate::audit::AuditEvent::RegistryChanged {
                source,
                kind,
                name,
                change,
            });
    }
}

/// Ends the control channels (the device's and its modules') and the live
/// streams of devices that lost access.
pub(super) fn cut(state: &RelayState, revoked: &[String]) {
    for device_id in revoked {
        tracing::info!(
            device_id,
            "device removed, disabled or its keys rotated: closing its control channel and streams"
        );
        state.presence.disconnect(device_id);
        state.admission.cancel_device(device_id);
    }
}

/// Wakes `wake` whenever a file of the registry (`registry.sqlite`, its
/// `-wal` and `-journal`) is written. Without change notifications (an
/// unsupported file system) polling alone keeps the registry current.
fn watch_registry_files(
    path: &Path,
    registry: Arc<SnapshotRegistry>,
    wake: mpsc::Sender<()>,
) -> Option<notify::RecommendedWatcher> {
    let directory = path.parent()?.to_path_buf();
    let file_name: OsString = path.file_name()?.to_os_string();
    let handler = move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        // A write to the WAL is reported before the commit is visible to
        // readers (that last step is in shared memory, which reports
        // nothing), so the writer closing the file is a wake too: it comes
        // after the commit. A writer that keeps its connection open is seen
        // by the poll, or by a refresh before a refusal.
        if !matches!(
            event.kind,
            EventKind::Modify(_)
                | EventKind::Create(_)
                | EventKind::Remove(_)
                | EventKind::Access(AccessKind::Close(AccessMode::Write))
        ) {
            return;
        }
        let registry_file = event.paths.iter().any(|changed| {
            changed.file_name().is_some_and(|name| {
                name.as_encoded_bytes()
                    .starts_with(file_name.as_encoded_bytes())
            })
        });
        if registry_file {
            // Until a check covers it, access is granted only after one.
            registry.change_reported();
            // A wake already pending covers this write too.
            let _ = wake.try_send(());
        }
    };
    let watcher = notify::recommended_watcher(handler).and_then(|mut watcher| {
        watcher.watch(&directory, RecursiveMode::NonRecursive)?;
        Ok(watcher)
    });
    match watcher {
        Ok(watcher) => Some(watcher),
        Err(error) => {
            tracing::info!(%error, interval = ?POLL_INTERVAL, "no change notifications for the registry file; polling it");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::Registry;

    #[test]
    fn a_source_reloads_only_when_another_connection_wrote() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("registry.sqlite");
        let writer = SqliteRegistry::open(&path).unwrap();
        writer.add_device("first").unwrap();
        let (mut source, snapshot) = SqliteSource::open(&path).unwrap();
        assert!(snapshot.device("first").is_some());
        assert!(source.reload_if_changed().unwrap().is_none());

        let rotated = writer.rotate_device_key("first", false).unwrap();
        writer.add_device("second").unwrap();
        let reloaded = source
            .reload_if_changed()
            .unwrap()
            .expect("a write was seen");
        assert_eq!(
            reloaded.device("first").unwrap().primary_key,
            rotated.primary_key
        );
        assert!(reloaded.device("second").is_some());
        assert_eq!(snapshot.revoked_in(&reloaded), ["first"]);
        assert!(source.reload_if_changed().unwrap().is_none());

        writer.remove_device("second").unwrap();
        let reloaded_again = source.reload_if_changed().unwrap().expect("a removal");
        assert_eq!(reloaded.revoked_in(&reloaded_again), ["second"]);
    }

    #[tokio::test]
    async fn a_write_wakes_the_watcher_at_once() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("registry.sqlite");
        let writer = SqliteRegistry::open(&path).unwrap();
        let (wake, mut woken) = mpsc::channel(1);
        let registry = Arc::new(SnapshotRegistry::new(Snapshot::default()));
        let Some(_watcher) = watch_registry_files(&path, registry.clone(), wake) else {
            eprintln!("SKIPPED: no file change notifications here; polling covers it");
            return;
        };
        writer.add_device("d").unwrap();
        tokio::time::timeout(Duration::from_secs(5), woken.recv())
            .await
            .expect("a write to the registry wakes the watcher")
            .expect("the watcher is alive");
        assert!(
            registry.change_pending(),
            "access waits for a check until one covers the write"
        );
    }
}
