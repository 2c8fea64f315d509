//! Pairing: the table of streams whose two WebSockets have not both arrived.
//!
//! A stream is registered when it is created, before the device even hears
//! of it, so either side may connect first. Each side's token may claim its
//! place once; the first arrival parks a channel in the entry and waits, the
//! second takes that channel and hands its socket over, and the entry is
//! gone. The table is bounded, entries expire at the handshake deadline, and
//! the lock is held only for map operations, never across an await.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use framing::stream_token::Side;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::sync::oneshot;
use tokio_tungstenite::WebSocketStream;

use crate::limits::StreamPermit;

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
    stream_name: String,
    deadline: Instant,
    device_claimed: bool,
    service_claimed: bool,
    waiting: Option<(Side, oneshot::Sender<Arrival>)>,
    permit: Option<StreamPermit>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ClaimError {
    #[error("the stream does not exist: it expired, was rejected, or its token was already used")]
    Unknown,
    #[error("the stream token was already used")]
    AlreadyUsed,
    #[error("the stream token belongs to another device")]
    WrongDevice,
}

/// The result of a successful claim.
pub enum Claim {
    /// First side: wait for the other until the deadline.
    Wait {
        receiver: oneshot::Receiver<Arrival>,
        deadline: Instant,
        stream_name: String,
    },
    /// Second side: hand the socket to the waiting side.
    Join {
        sender: oneshot::Sender<Arrival>,
        permit: Option<StreamPermit>,
    },
}

pub struct PairingTable {
    entries: Mutex<HashMap<String, PendingStream>>,
    max_pending: usize,
}

#[derive(Debug, thiserror::Error)]
#[error("too many streams are waiting to be paired ({0}); retry later")]
pub struct PairingFull(pub usize);

impl PairingTable {
    pub fn new(max_pending: usize) -> Self {
        Self {
            entries: Mutex::new(HashMap::new()),
            max_pending,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, PendingStream>> {
        self.entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn pending_count(&self) -> usize {
        self.lock().len()
    }

    pub fn register(
        &self,
        stream_id: &str,
        device_id: &str,
        stream_name: &str,
        deadline: Instant,
        permit: StreamPermit,
    ) -> Result<(), PairingFull> {
        let mut entries = self.lock();
        if entries.len() >= self.max_pending {
            return Err(PairingFull(self.max_pending));
        }
        entries.insert(
            stream_id.to_string(),
            PendingStream {
                device_id: device_id.to_string(),
                stream_name: stream_name.to_string(),
                deadline,
                device_claimed: false,
                service_claimed: false,
                waiting: None,
                permit: Some(permit),
            },
        );
        Ok(())
    }

    /// Forgets a stream (rejected, timed out); a side already waiting is
    /// released because its channel closes.
    pub fn remove(&self, stream_id: &str) {
        self.lock().remove(stream_id);
    }

    /// Claims `side` of a stream for a connecting WebSocket.
    pub fn claim(&self, stream_id: &str, device_id: &str, side: Side) -> Result<Claim, ClaimError> {
        let mut entries = self.lock();
        let entry = entries.get_mut(stream_id).ok_or(ClaimError::Unknown)?;
        if entry.device_id != device_id {
            return Err(ClaimError::WrongDevice);
        }
        if entry.deadline <= Instant::now() {
            entries.remove(stream_id);
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
                entries.remove(stream_id);
                Ok(Claim::Join { sender, permit })
            }
            _ => {
                let (sender, receiver) = oneshot::channel();
                entry.waiting = Some((side, sender));
                Ok(Claim::Wait {
                    receiver,
                    deadline: entry.deadline,
                    stream_name: entry.stream_name.clone(),
                })
            }
        }
    }

    /// Drops entries past their deadline; returns how many.
    pub fn sweep(&self, now: Instant) -> usize {
        let mut entries = self.lock();
        let before = entries.len();
        entries.retain(|_, entry| entry.deadline > now);
        before - entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Limits;
    use crate::limits::Admission;
    use std::time::Duration;

    fn table_with(stream_id: &str, deadline: Instant) -> PairingTable {
        let table = PairingTable::new(10);
        let permit = Admission::new(Limits::default()).admit("d").unwrap();
        table
            .register(stream_id, "d", "TestStream", deadline, permit)
            .unwrap();
        table
    }

    #[test]
    fn sides_pair_in_either_order_and_tokens_work_once() {
        for first in [Side::Device, Side::Service] {
            let table = table_with("s", Instant::now() + Duration::from_secs(60));
            assert!(matches!(
                table.claim("s", "d", first),
                Ok(Claim::Wait { .. })
            ));
            assert_eq!(
                table.claim("s", "d", first).err(),
                Some(ClaimError::AlreadyUsed)
            );
            assert!(matches!(
                table.claim("s", "d", first.other()),
                Ok(Claim::Join { .. })
            ));
            assert_eq!(
                table.claim("s", "d", first.other()).err(),
                Some(ClaimError::Unknown)
            );
            assert_eq!(table.pending_count(), 0);
        }
    }

    #[test]
    fn foreign_device_and_expired_streams_are_refused() {
        let table = table_with("s", Instant::now() + Duration::from_secs(60));
        assert_eq!(
            table.claim("s", "other", Side::Device).err(),
            Some(ClaimError::WrongDevice)
        );
        assert_eq!(
            table.claim("nope", "d", Side::Device).err(),
            Some(ClaimError::Unknown)
        );
        let expired = table_with("s", Instant::now());
        assert_eq!(
            expired.claim("s", "d", Side::Device).err(),
            Some(ClaimError::Unknown)
        );
    }

    #[test]
    fn sweep_removes_only_expired_entries() {
        let table = table_with("old", Instant::now());
        let permit = Admission::new(Limits::default()).admit("d").unwrap();
        table
            .register(
                "new",
                "d",
                "n",
                Instant::now() + Duration::from_secs(60),
                permit,
            )
            .unwrap();
        assert_eq!(table.sweep(Instant::now() + Duration::from_millis(1)), 1);
        assert_eq!(table.pending_count(), 1);
    }

    #[test]
    fn table_is_bounded() {
        let table = PairingTable::new(1);
        let admission = Admission::new(Limits::default());
        let later = Instant::now() + Duration::from_secs(60);
        table
            .register("a", "d", "n", later, admission.admit("d").unwrap())
            .unwrap();
        assert!(table
            .register("b", "d", "n", later, admission.admit("d").unwrap())
            .is_err());
    }
}
