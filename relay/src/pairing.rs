//! Pairing: the table of streams whose two WebSockets have not both arrived.
//!
//! A stream is registered when it is created, before the device even hears
//! of it, so either side may connect first. Each side's token may claim its
//! place once; the first arrival parks a channel in the entry and waits, the
//! second takes that channel and hands its socket over, and the entry is
//! gone. The table is bounded and the lock is held only for map operations,
//! never across an await.
//!
//! Nothing is cleaned up by hand. An entry (and the stream permit it holds,
//! which counts against the device's stream limit) is owned by guards: the
//! REST call that created it holds a [`Registration`] until the service has
//! been handed the stream, and the first side to connect holds its
//! [`Claim::Wait`]; whichever of them goes away first (an error, a client
//! that hung up, a side that closed before its peer came) takes the entry
//! with it. An entry nobody holds any more ends at its deadline, by a timer
//! of its own that stops as soon as the entry is gone for any other reason.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use framing::stream_token::Side;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::limits::StreamPermit;
use crate::live::StreamDetails;

/// A WebSocket accepted by the relay.
pub type ServerWebSocket = WebSocketStream<TokioIo<Upgraded>>;

/// What the second side hands to the first.
pub struct Arrival {
    pub socket: ServerWebSocket,
    pub permit: Option<StreamPermit>,
    /// Keeps the second side's socket under the connection caps.
    pub guard: std::sync::Arc<crate::listeners::ConnectionGuard>,
}

struct PendingStream {
    device_id: String,
    details: Arc<StreamDetails>,
    deadline: Instant,
    device_claimed: bool,
    service_claimed: bool,
    waiting: Option<(Side, oneshot::Sender<Arrival>)>,
    permit: Option<StreamPermit>,
    /// Stops this entry's expiry timer.
    expiry: CancellationToken,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ClaimError {
    #[error("the stream does not exist: it expired, was rejected, its other side left, or its token was already used")]
    Unknown,
    #[error("the stream token was already used")]
    AlreadyUsed,
    #[error("the stream token belongs to another device")]
    WrongDevice,
}

/// The result of a successful claim.
pub enum Claim {
    /// First side: wait for the other until the deadline. Dropping it (the
    /// side left, or gave up at the deadline) ends the stream.
    Wait {
        receiver: oneshot::Receiver<Arrival>,
        deadline: Instant,
        /// What the creation said (stream name, service address, …).
        details: Arc<StreamDetails>,
        guard: Registration,
    },
    /// Second side: hand the socket to the waiting side.
    Join {
        sender: oneshot::Sender<Arrival>,
        permit: Option<StreamPermit>,
    },
}

#[derive(Debug, thiserror::Error)]
#[error("too many streams are waiting to be paired ({0}); retry later")]
pub struct PairingFull(pub usize);

struct Shared {
    entries: Mutex<HashMap<String, PendingStream>>,
    max_pending: usize,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, PendingStream>> {
        self.entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Takes an entry out; its permit and channel are dropped after the lock
    /// is released, and its timer stops.
    fn remove(&self, stream_id: &str) {
        let removed = self.lock().remove(stream_id);
        if let Some(entry) = removed {
            entry.expiry.cancel();
        }
    }
}

pub struct PairingTable {
    shared: Arc<Shared>,
    /// Where the expiry timers run, so shutdown accounts for them.
    tasks: TaskTracker,
    /// Stops every expiry timer (the relay stops serving).
    stop: CancellationToken,
}

/// Holds a pending stream: dropping it removes the entry (and releases the
/// stream's permit) unless [`Registration::keep`] was called.
#[must_use = "dropping a Registration removes the stream at once"]
pub struct Registration {
    shared: Arc<Shared>,
    stream_id: String,
    armed: bool,
}

impl Registration {
    /// The stream was handed to the service: from now on only pairing or
    /// the deadline ends it.
    pub fn keep(mut self) {
        self.armed = false;
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if self.armed {
            self.shared.remove(&self.stream_id);
        }
    }
}

impl PairingTable {
    pub fn new(max_pending: usize, tasks: TaskTracker, stop: CancellationToken) -> Self {
        Self {
            shared: Arc::new(Shared {
                entries: Mutex::new(HashMap::new()),
                max_pending,
            }),
            tasks,
            stop,
        }
    }

    pub fn pending_count(&self) -> usize {
        self.shared.lock().len()
    }

    /// Registers a stream until `deadline`; the permit is released when the
    /// entry goes, whichever way it goes.
    pub fn register(
        &self,
        stream_id: &str,
        device_id: &str,
        details: Arc<StreamDetails>,
        deadline: Instant,
        permit: StreamPermit,
    ) -> Result<Registration, PairingFull> {
        let expiry = CancellationToken::new();
        {
            let mut entries = self.shared.lock();
            if entries.len() >= self.shared.max_pending {
                return Err(PairingFull(self.shared.max_pending));
            }
            entries.insert(
                stream_id.to_string(),
                PendingStream {
                    device_id: device_id.to_string(),
                    details,
                    deadline,
                    device_claimed: false,
                    service_claimed: false,
                    waiting: None,
                    permit: Some(permit),
                    expiry: expiry.clone(),
                },
            );
        }
        let shared = self.shared.clone();
        let timer_stream_id = stream_id.to_string();
        let stop = self.stop.clone();
        self.tasks.spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => shared.remove(&timer_stream_id),
                _ = expiry.cancelled() => {}
                _ = stop.cancelled() => {}
            }
        });
        Ok(Registration {
            shared: self.shared.clone(),
            stream_id: stream_id.to_string(),
            armed: true,
        })
    }

    /// Claims `side` of a stream for a connecting WebSocket.
    pub fn claim(&self, stream_id: &str, device_id: &str, side: Side) -> Result<Claim, ClaimError> {
        let mut entries = self.shared.lock();
        let entry = entries.get_mut(stream_id).ok_or(ClaimError::Unknown)?;
        if entry.device_id != device_id {
            return Err(ClaimError::WrongDevice);
        }
        if entry.deadline <= Instant::now() {
            if let Some(entry) = entries.remove(stream_id) {
                entry.expiry.cancel();
            }
            return Err(ClaimError::Unknown);
        }
        let claimed = match side {
            Side::Device => &mut entry.device_claimed,
            Side::Service => &mut entry.service_claimed,
        };
        if *claimed {
            return Err(ClaimError::AlreadyUsed);
        }
        *claimed = true;
        match entry.waiting.take() {
            Some((waiting_side, sender)) if waiting_side != side => {
                let permit = entry.permit.take();
                if let Some(entry) = entries.remove(stream_id) {
                    entry.expiry.cancel();
                }
                Ok(Claim::Join { sender, permit })
            }
            _ => {
                let (sender, receiver) = oneshot::channel();
                entry.waiting = Some((side, sender));
                Ok(Claim::Wait {
                    receiver,
                    deadline: entry.deadline,
                    details: entry.details.clone(),
                    guard: Registration {
                        shared: self.shared.clone(),
                        stream_id: stream_id.to_string(),
                        armed: true,
                    },
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Limits;
    use crate::limits::Admission;
    use std::time::Duration;

    fn details(stream_name: &str) -> Arc<StreamDetails> {
        Arc::new(StreamDetails {
            device_id: "d".into(),
            module_id: None,
            stream_name: stream_name.into(),
            target: None,
            service_address: "127.0.0.1:1".parse().expect("a valid address"),
            requested: Instant::now(),
        })
    }

    struct Fixture {
        table: PairingTable,
        admission: Arc<Admission>,
        tasks: TaskTracker,
    }

    impl Fixture {
        fn new(max_pending: usize) -> Self {
            let tasks = TaskTracker::new();
            Self {
                table: PairingTable::new(max_pending, tasks.clone(), CancellationToken::new()),
                admission: Admission::new(Limits::default()),
                tasks,
            }
        }

        fn register(&self, stream_id: &str, deadline: Instant) -> Registration {
            let permit = self.admission.admit("d").expect("within the limits");
            self.table
                .register(stream_id, "d", details("TestStream"), deadline, permit)
                .expect("the table has room")
        }

        /// Lets spawned timers run to their next await.
        async fn settle(&self) {
            for _ in 0..10 {
                tokio::task::yield_now().await;
            }
        }
    }

    fn in_a_minute() -> Instant {
        Instant::now() + Duration::from_secs(60)
    }

    #[tokio::test(start_paused = true)]
    async fn sides_pair_in_either_order_and_tokens_work_once() {
        for first in [Side::Device, Side::Service] {
            let fixture = Fixture::new(10);
            fixture.register("s", in_a_minute()).keep();
            let waiting = fixture.table.claim("s", "d", first);
            assert!(matches!(waiting, Ok(Claim::Wait { .. })));
            assert_eq!(
                fixture.table.claim("s", "d", first).err(),
                Some(ClaimError::AlreadyUsed)
            );
            let joined = fixture.table.claim("s", "d", first.other());
            let Ok(Claim::Join { sender, permit }) = joined else {
                panic!("the second side joins");
            };
            assert!(permit.is_some(), "the permit travels with the pair");
            assert_eq!(
                fixture.table.claim("s", "d", first.other()).err(),
                Some(ClaimError::Unknown)
            );
            assert_eq!(fixture.table.pending_count(), 0);
            fixture.settle().await;
            assert_eq!(fixture.tasks.len(), 0, "a paired stream leaves no timer");
            // The waiter still gets the arrival after the entry is gone.
            let Ok(Claim::Wait { receiver, .. }) = waiting else {
                unreachable!()
            };
            drop(sender);
            assert!(receiver.await.is_err());
            drop(permit);
            assert_eq!(fixture.admission.active_streams(), 0);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn foreign_device_and_expired_streams_are_refused() {
        let fixture = Fixture::new(10);
        fixture.register("s", in_a_minute()).keep();
        assert_eq!(
            fixture.table.claim("s", "other", Side::Device).err(),
            Some(ClaimError::WrongDevice)
        );
        assert_eq!(
            fixture.table.claim("nope", "d", Side::Device).err(),
            Some(ClaimError::Unknown)
        );
        fixture.register("old", Instant::now()).keep();
        assert_eq!(
            fixture.table.claim("old", "d", Side::Device).err(),
            Some(ClaimError::Unknown)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_unclaimed_stream_expires_at_its_deadline_and_frees_its_permit() {
        let fixture = Fixture::new(10);
        let deadline = in_a_minute();
        fixture.register("s", deadline).keep();
        fixture
            .register("later", deadline + Duration::from_secs(30))
            .keep();
        tokio::time::sleep_until(deadline - Duration::from_millis(1)).await;
        assert_eq!(fixture.table.pending_count(), 2, "not before the deadline");
        assert_eq!(fixture.admission.active_streams(), 2);
        tokio::time::sleep_until(deadline).await;
        fixture.settle().await;
        assert_eq!(
            fixture.table.pending_count(),
            1,
            "only the expired one goes"
        );
        assert_eq!(fixture.admission.active_streams(), 1, "its permit with it");
        assert_eq!(
            fixture.table.claim("s", "d", Side::Service).err(),
            Some(ClaimError::Unknown)
        );
        assert_eq!(fixture.tasks.len(), 1, "the expired stream's timer ended");
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiting_side_is_released_when_its_stream_expires() {
        let fixture = Fixture::new(10);
        let deadline = in_a_minute();
        fixture.register("s", deadline).keep();
        let Ok(Claim::Wait {
            receiver, guard, ..
        }) = fixture.table.claim("s", "d", Side::Device)
        else {
            panic!("the first side waits");
        };
        assert!(
            receiver.await.is_err(),
            "the channel closes at the deadline"
        );
        assert_eq!(Instant::now(), deadline);
        assert_eq!(fixture.admission.active_streams(), 0);
        drop(guard);
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_registration_removes_the_stream_and_frees_its_permit_at_once() {
        let fixture = Fixture::new(10);
        let registration = fixture.register("s", in_a_minute());
        assert_eq!(fixture.admission.active_streams(), 1);
        drop(registration);
        assert_eq!(fixture.table.pending_count(), 0);
        assert_eq!(fixture.admission.active_streams(), 0);
        fixture.settle().await;
        assert_eq!(fixture.tasks.len(), 0, "its timer stopped with it");
    }

    #[tokio::test(start_paused = true)]
    async fn a_first_side_that_leaves_takes_the_stream_with_it() {
        let fixture = Fixture::new(10);
        fixture.register("s", in_a_minute()).keep();
        let claim = fixture.table.claim("s", "d", Side::Service);
        assert!(matches!(claim, Ok(Claim::Wait { .. })));
        drop(claim);
        assert_eq!(fixture.table.pending_count(), 0);
        assert_eq!(fixture.admission.active_streams(), 0);
        assert_eq!(
            fixture.table.claim("s", "d", Side::Device).err(),
            Some(ClaimError::Unknown)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_kept_registration_survives_its_guard_until_pairing() {
        let fixture = Fixture::new(10);
        fixture.register("s", in_a_minute()).keep();
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert_eq!(fixture.table.pending_count(), 1);
        assert!(matches!(
            fixture.table.claim("s", "d", Side::Device),
            Ok(Claim::Wait { .. })
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn table_is_bounded() {
        let fixture = Fixture::new(1);
        let _first = fixture.register("a", in_a_minute());
        let permit = fixture.admission.admit("d").expect("within the limits");
        assert!(fixture
            .table
            .register("b", "d", details("n"), in_a_minute(), permit)
            .is_err());
        assert_eq!(
            fixture.admission.active_streams(),
            1,
            "a refused registration releases its permit"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn timers_stop_when_the_relay_stops() {
        let tasks = TaskTracker::new();
        let stop = CancellationToken::new();
        let table = PairingTable::new(10, tasks.clone(), stop.clone());
        let admission = Admission::new(Limits::default());
        table
            .register(
                "s",
                "d",
                details("n"),
                in_a_minute(),
                admission.admit("d").unwrap(),
            )
            .unwrap()
            .keep();
        assert_eq!(tasks.len(), 1);
        stop.cancel();
        tasks.close();
        tokio::time::timeout(Duration::from_secs(1), tasks.wait())
            .await
            .expect("the timer ends on stop");
    }
}
