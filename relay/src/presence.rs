//! Presence: which identities (a device, or one module of a device) hold a
//! control channel on this relay, and how to reach each one.
//!
//! Two moments matter and they are kept apart. At CONNECT a session becomes
//! the identity's only control channel: the previous one is closed at once,
//! as IoT Hub does, even before the new one subscribes. Only once it has
//! subscribed to stream requests is it *ready*, because a request published
//! before that would be lost; stream creation waits for readiness. The lock
//! is held for map operations only, never across an await.
//!
//! A creation waiting for its device is woken by that device becoming
//! ready, never by another one: when a fleet reconnects, thousands of
//! devices become ready while creations wait for some of them, and one wake
//! per readiness per waiter would make that quadratic.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use framing::topics::{StreamRequest, StreamResponse};
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio_util::sync::CancellationToken;

/// Who a control channel speaks for. A module is its own identity: its
/// channel neither replaces nor is replaced by its device's.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Identity {
    pub device_id: String,
    pub module_id: Option<String>,
}

impl std::fmt::Display for Identity {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.module_id {
            Some(module_id) => write!(formatter, "{}/{module_id}", self.device_id),
            None => formatter.write_str(&self.device_id),
        }
    }
}

/// The time of the last packet, in Unix milliseconds, set by the session
/// per packet received and read by the admin API.
#[derive(Debug, Default)]
pub struct ActivityClock(AtomicU64);

impl ActivityClock {
    pub fn touch(&self) {
        let millis = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |since| since.as_millis());
        self.0
            .store(u64::try_from(millis).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// `None` before the first packet.
    pub fn last(&self) -> Option<SystemTime> {
        match self.0.load(Ordering::Relaxed) {
            0 => None,
            millis => Some(SystemTime::UNIX_EPOCH + Duration::from_millis(millis)),
        }
    }
}

/// A control channel as the admin API shows it.
#[derive(Debug, Clone)]
pub struct SessionInfo {
    pub identity: Identity,
    pub peer: std::net::SocketAddr,
    pub connected_at: SystemTime,
    pub last_activity: Option<SystemTime>,
    /// Subscribed to stream requests.
    pub ready: bool,
}

/// Devices remembered as last seen at most; past it the oldest is forgotten.
const MAX_REMEMBERED_DISCONNECTS: usize = 100_000;

/// A stream request on its way to a device, with where its answer goes.
pub struct OutgoingRequest {
    pub request: StreamRequest,
    pub answer: oneshot::Sender<StreamResponse>,
}

/// The device's request queue is full, or its session just ended.
#[derive(Debug, thiserror::Error)]
#[error("the device's stream request queue is full or its session ended")]
pub struct RequestQueueFull;

/// How the rest of the relay reaches a connected device.
#[derive(Clone)]
pub struct SessionHandle {
    pub session_id: u64,
    /// How the device reached us, for its streaming URL.
    pub origin: crate::trusted_proxies::ClientOrigin,
    /// The device's address (as a trusted proxy reported it).
    pub peer: std::net::SocketAddr,
    pub connected_at: SystemTime,
    /// When the device last sent a packet.
    pub last_activity: Arc<ActivityClock>,
    pub(crate) requests: mpsc::Sender<OutgoingRequest>,
    pub(crate) cancel: CancellationToken,
}

impl SessionHandle {
    /// Queues a request; the receiver yields the device's answer, or an
    /// error if the session ends first.
    pub fn send_request(
        &self,
        request: StreamRequest,
    ) -> Result<oneshot::Receiver<StreamResponse>, RequestQueueFull> {
        let (answer, receiver) = oneshot::channel();
        self.requests
            .try_send(OutgoingRequest { request, answer })
            .map_err(|_| RequestQueueFull)?;
        Ok(receiver)
    }
}

struct Entry {
    handle: SessionHandle,
    /// Subscribed to stream requests: requests may be sent.
    ready: bool,
}

/// Which identities are connected, and where.
pub struct Presence {
    sessions: Mutex<HashMap<Identity, Entry>>,
    /// One wake-up per identity that creations are waiting for; an entry
    /// lives as long as someone waits ([`Waiting`]).
    waiters: Mutex<HashMap<Identity, Arc<Notify>>>,
    /// In cluster mode: how many times this node has (re)connected to NATS,
    /// so each channel announces itself again after an outage
    /// ([`crate::cluster::presence`]).
    cluster_connects: watch::Sender<u64>,
    pub(crate) next_session_id: AtomicU64,
    /// When each identity's last channel on this relay ended.
    last_seen: Mutex<HashMap<Identity, SystemTime>>,
}

impl Default for Presence {
    fn default() -> Self {
        Self {
            sessions: Mutex::new(HashMap::new()),
            waiters: Mutex::new(HashMap::new()),
            cluster_connects: watch::Sender::new(0),
            next_session_id: AtomicU64::new(1),
            last_seen: Mutex::new(HashMap::new()),
        }
    }
}

impl Presence {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Identity, Entry>> {
        self.sessions
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// An authenticated connection becomes the identity's control channel;
    /// the previous one, if any, is closed.
    pub(crate) fn connect(&self, identity: &Identity, handle: SessionHandle) {
        let replaced = self.lock().insert(
            identity.clone(),
            Entry {
                handle,
                ready: false,
            },
        );
        if let Some(old) = replaced {
            tracing::info!(%identity, "a new connection replaces the previous control channel");
            old.handle.cancel.cancel();
        }
    }

    /// Records the NATS client's connection count; a change wakes every
    /// [`Self::cluster_connects`] receiver.
    pub(crate) fn note_cluster_connects(&self, connects: u64) {
        self.cluster_connects.send_if_modified(|known| {
            let changed = *known != connects;
            *known = connects;
            changed
        });
    }

    /// Changes when this node reconnects to NATS.
    pub(crate) fn cluster_connects(&self) -> watch::Receiver<u64> {
        self.cluster_connects.subscribe()
    }

    /// The session subscribed to stream requests.
    pub(crate) fn mark_ready(&self, identity: &Identity, session_id: u64) {
        if let Some(entry) = self
            .lock()
            .get_mut(identity)
            .filter(|entry| entry.handle.session_id == session_id)
        {
            entry.ready = true;
        }
        if let Some(waiting) = self.lock_waiters().get(identity) {
            waiting.notify_waiters();
        }
    }

    fn lock_waiters(&self) -> std::sync::MutexGuard<'_, HashMap<Identity, Arc<Notify>>> {
        self.waiters
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Forgets a session that ended, unless a newer one already took its place.
    pub(crate) fn unregister(&self, identity: &Identity, session_id: u64) {
        let mut sessions = self.lock();
        if sessions
            .get(identity)
            .is_some_and(|entry| entry.handle.session_id == session_id)
        {
            sessions.remove(identity);
            drop(sessions);
            let mut last_seen = self
                .last_seen
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            if last_seen.len() >= MAX_REMEMBERED_DISCONNECTS && !last_seen.contains_key(identity) {
                let oldest = last_seen
                    .iter()
                    .min_by_key(|(_, seen)| **seen)
                    .map(|(identity, _)| identity.clone());
                if let Some(oldest) = oldest {
                    last_seen.remove(&oldest);
                }
            }
            last_seen.insert(identity.clone(), SystemTime::now());
        }
    }

    /// Every control channel on this relay, sorted by identity.
    pub fn sessions(&self) -> Vec<SessionInfo> {
        let mut sessions: Vec<SessionInfo> = self
            .lock()
            .iter()
            .map(|(identity, entry)| SessionInfo {
                identity: identity.clone(),
                peer: entry.handle.peer,
                connected_at: entry.handle.connected_at,
                last_activity: entry.handle.last_activity.last(),
                ready: entry.ready,
            })
            .collect();
        sessions.sort_by_key(|session| session.identity.to_string());
        sessions
    }

    /// When the identity's last control channel on this relay ended, if it
    /// connected since the relay started.
    pub fn last_seen(&self, identity: &Identity) -> Option<SystemTime> {
        self.last_seen
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(identity)
            .copied()
    }

    /// The identity's session, once it is ready for stream requests.
    pub fn get(&self, identity: &Identity) -> Option<SessionHandle> {
        self.lock()
            .get(identity)
            .filter(|entry| entry.ready)
            .map(|entry| entry.handle.clone())
    }

    /// Control channels open, ready or not.
    pub fn connected_count(&self) -> usize {
        self.lock().len()
    }

    /// Devices with at least one control channel (their own or a module's).
    pub fn connected_devices(&self) -> Vec<String> {
        let mut devices: Vec<String> = self
            .lock()
            .keys()
            .map(|identity| identity.device_id.clone())
            .collect();
        devices.sort();
        devices.dedup();
        devices
    }

    /// Waits up to `timeout` for the identity to be ready.
    pub async fn wait_for(&self, identity: &Identity, timeout: Duration) -> Option<SessionHandle> {
        if let Some(handle) = self.get(identity) {
            return Some(handle);
        }
        let waiting = Waiting::new(self, identity);
        let wait = async {
            loop {
                // Registered before the look, so a readiness between the
                // look and the wait still wakes it.
                let ready = waiting.notify.notified();
                tokio::pin!(ready);
                ready.as_mut().enable();
                if let Some(handle) = self.get(identity) {
                    return handle;
                }
                ready.await;
            }
        };
        tokio::time::timeout(timeout, wait).await.ok()
    }

    /// Closes every control channel of a device and of its modules (the
    /// device was removed or disabled).
    pub fn disconnect(&self, device_id: &str) {
        self.lock().retain(|identity, entry| {
            let keep = identity.device_id != device_id;
            if !keep {
                entry.handle.cancel.cancel();
            }
            keep
        });
    }
}

/// One creation's wait for an identity: shares the identity's wake-up and
/// removes it when the last waiter leaves (done, timed out or cancelled).
struct Waiting<'a> {
    presence: &'a Presence,
    identity: &'a Identity,
    notify: Arc<Notify>,
}

impl<'a> Waiting<'a> {
    fn new(presence: &'a Presence, identity: &'a Identity) -> Self {
        let notify = presence
            .lock_waiters()
            .entry(identity.clone())
            .or_default()
            .clone();
        Self {
            presence,
            identity,
            notify,
        }
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut waiters = self.presence.lock_waiters();
        // Clones are only made under this lock: the map's and ours are the
        // last two when nobody else waits.
        if Arc::strong_count(&self.notify) <= 2 {
            waiters.remove(self.identity);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(device_id: &str, module_id: Option<&str>) -> Identity {
        Identity {
            device_id: device_id.into(),
            module_id: module_id.map(str::to_string),
        }
    }

    fn handle(presence: &Presence) -> SessionHandle {
        let (requests, _receiver) = mpsc::channel(1);
        SessionHandle {
            session_id: presence.next_session_id.fetch_add(1, Ordering::Relaxed),
            origin: Default::default(),
            peer: "127.0.0.1:1".parse().unwrap(),
            connected_at: SystemTime::now(),
            last_activity: Default::default(),
            requests,
            cancel: CancellationToken::new(),
        }
    }

    #[test]
    fn a_new_connection_closes_the_previous_one_before_it_subscribes() {
        let presence = Presence::default();
        let device = identity("d", None);
        let first = handle(&presence);
        presence.connect(&device, first.clone());
        presence.mark_ready(&device, first.session_id);
        let second = handle(&presence);
        presence.connect(&device, second.clone());
        assert!(first.cancel.is_cancelled());
        assert!(
            presence.get(&device).is_none(),
            "the new session is not ready before it subscribes"
        );
        presence.unregister(&device, first.session_id);
        presence.mark_ready(&device, second.session_id);
        assert_eq!(
            presence.get(&device).map(|h| h.session_id),
            Some(second.session_id)
        );
    }

    #[test]
    fn modules_are_identities_of_their_own() {
        let presence = Presence::default();
        let device = identity("d", None);
        let module = identity("d", Some("m"));
        let device_handle = handle(&presence);
        let module_handle = handle(&presence);
        presence.connect(&device, device_handle.clone());
        presence.connect(&module, module_handle.clone());
        assert!(!device_handle.cancel.is_cancelled());
        assert_eq!(presence.connected_devices(), vec!["d".to_string()]);
        presence.disconnect("d");
        assert!(device_handle.cancel.is_cancelled() && module_handle.cancel.is_cancelled());
        assert_eq!(presence.connected_count(), 0);
    }

    /// Counts wake-ups, to see who a readiness wakes.
    struct CountingWaker(std::sync::atomic::AtomicUsize);

    impl std::task::Wake for CountingWaker {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[tokio::test]
    async fn a_waiting_creation_is_woken_by_its_own_device_only_and_leaves_nothing_behind() {
        use std::future::Future;
        use std::task::{Context, Poll};
        let presence = Presence::default();
        let (wanted, other) = (identity("wanted", None), identity("other", None));
        let counter = Arc::new(CountingWaker(Default::default()));
        let waker = std::task::Waker::from(counter.clone());
        let mut context = Context::from_waker(&waker);
        let mut first = Box::pin(presence.wait_for(&wanted, Duration::from_secs(60)));
        let mut second = Box::pin(presence.wait_for(&wanted, Duration::from_secs(60)));
        assert!(first.as_mut().poll(&mut context).is_pending());
        assert!(second.as_mut().poll(&mut context).is_pending());
        // Another device connecting and becoming ready wakes nobody.
        let other_handle = handle(&presence);
        presence.connect(&other, other_handle.clone());
        presence.mark_ready(&other, other_handle.session_id);
        assert_eq!(counter.0.load(Ordering::SeqCst), 0);
        // Its own device connecting is not enough: only readiness wakes.
        let wanted_handle = handle(&presence);
        presence.connect(&wanted, wanted_handle.clone());
        assert_eq!(counter.0.load(Ordering::SeqCst), 0);
        presence.mark_ready(&wanted, wanted_handle.session_id);
        assert_eq!(counter.0.load(Ordering::SeqCst), 2, "both waiters woken");
        for wait in [&mut first, &mut second] {
            match wait.as_mut().poll(&mut context) {
                Poll::Ready(Some(found)) => assert_eq!(found.session_id, wanted_handle.session_id),
                _ => panic!("the waiter did not find its ready device"),
            }
        }
        assert!(presence.lock_waiters().is_empty());
        // A wait that ends without its device (cancelled here) also cleans up.
        let gone = identity("gone", None);
        let mut cancelled = Box::pin(presence.wait_for(&gone, Duration::from_secs(60)));
        assert!(cancelled.as_mut().poll(&mut context).is_pending());
        assert_eq!(presence.lock_waiters().len(), 1);
        drop(cancelled);
        assert!(presence.lock_waiters().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_for_a_device_that_never_comes_ends_at_its_timeout() {
        let presence = Presence::default();
        let absent = identity("absent", None);
        let started = tokio::time::Instant::now();
        assert!(presence
            .wait_for(&absent, Duration::from_secs(5))
            .await
            .is_none());
        assert_eq!(started.elapsed(), Duration::from_secs(5));
        assert!(presence.lock_waiters().is_empty());
    }
}
