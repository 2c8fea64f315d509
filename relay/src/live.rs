//! Live state for operators: the streams this relay is copying right now,
//! each with an id, who asked for it, and its byte counters, so the admin
//! API can list them and close one.
//!
//! A stream enters the table when its two sides are paired and leaves it
//! when the copy ends (a guard removes it, whatever the way out). The table
//! is touched twice per stream; the counters are the copy's own atomics
//! ([`crate::copy::CopyCounters`]), read only when someone asks. With a
//! cluster each node knows its own streams only.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::copy::CopyCounters;

/// What the creation of a stream said about it, kept with the pending
/// stream until it is paired.
#[derive(Debug, Clone)]
pub struct StreamDetails {
    pub device_id: String,
    pub module_id: Option<String>,
    pub stream_name: String,
    /// The devstreams target header (`host:port` or a port), if sent.
    pub target: Option<String>,
    /// The service program's address (as a trusted proxy reported it).
    pub service_address: SocketAddr,
    /// When the creation request arrived (for the set-up time).
    pub requested: Instant,
}

impl StreamDetails {
    /// The port of [`Self::target`], when it names one.
    pub fn target_port(&self) -> Option<u16> {
        let target = self.target.as_deref()?;
        let port = target.rsplit_once(':').map_or(target, |(_, port)| port);
        port.trim().parse().ok()
    }
}

/// One paired stream being copied.
pub struct LiveStream {
    pub stream_id: String,
    pub details: Arc<StreamDetails>,
    pub started: SystemTime,
    pub counters: CopyCounters,
    /// The copy's first socket is the device's.
    pub first_is_device: bool,
    close: CancellationToken,
}

impl LiveStream {
    pub fn bytes_device_to_service(&self) -> u64 {
        self.direction(self.first_is_device)
    }

    pub fn bytes_service_to_device(&self) -> u64 {
        self.direction(!self.first_is_device)
    }

    fn direction(&self, first_to_second: bool) -> u64 {
        let counter = if first_to_second {
            &self.counters.first_to_second
        } else {
            &self.counters.second_to_first
        };
        counter.load(Ordering::Relaxed)
    }

    /// When the last data message passed, either way.
    pub fn last_activity(&self) -> SystemTime {
        SystemTime::now()
            .checked_sub(self.counters.idle_for())
            .unwrap_or(self.started)
            .max(self.started)
    }

    /// Completes when an operator closes the stream.
    pub async fn closed(&self) {
        self.close.cancelled().await
    }
}

/// The live streams of this relay, by stream id.
#[derive(Default)]
pub struct LiveStreams {
    streams: Mutex<HashMap<String, Arc<LiveStream>>>,
}

/// Removes its stream from the table when dropped.
pub struct LiveEntry {
    table: Arc<LiveStreams>,
    pub stream: Arc<LiveStream>,
}

impl Drop for LiveEntry {
    fn drop(&mut self) {
        self.table.lock().remove(&self.stream.stream_id);
    }
}

impl LiveStreams {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<LiveStream>>> {
        self.streams
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A paired stream starts; it is listed until the entry is dropped.
    pub fn insert(
        self: &Arc<Self>,
        stream_id: &str,
        details: Arc<StreamDetails>,
        first_is_device: bool,
    ) -> LiveEntry {
        let stream = Arc::new(LiveStream {
            stream_id: stream_id.to_string(),
            details,
            started: SystemTime::now(),
            counters: CopyCounters::default(),
            first_is_device,
            close: CancellationToken::new(),
        });
        self.lock().insert(stream_id.to_string(), stream.clone());
        LiveEntry {
            table: self.clone(),
            stream,
        }
    }

    /// Every live stream, oldest first.
    pub fn list(&self) -> Vec<Arc<LiveStream>> {
        let mut streams: Vec<_> = self.lock().values().cloned().collect();
        streams.sort_by_key(|stream| stream.started);
        streams
    }

    /// Asks the stream's copy to end both sides; whether it was live.
    pub fn close(&self, stream_id: &str) -> bool {
        match self.lock().get(stream_id) {
            Some(stream) => {
                stream.close.cancel();
                true
            }
            None => false,
        }
    }
}

/// Seconds since the Unix epoch, for JSON.
pub fn unix_seconds(time: SystemTime) -> u64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn details(target: Option<&str>) -> Arc<StreamDetails> {
        Arc::new(StreamDetails {
            device_id: "d".into(),
            module_id: None,
            stream_name: "ssh".into(),
            target: target.map(str::to_string),
            service_address: "127.0.0.1:5000".parse().unwrap(),
            requested: Instant::now(),
        })
    }

    #[test]
    fn a_stream_is_listed_until_its_entry_drops_and_can_be_closed() {
        let table = Arc::new(LiveStreams::default());
        let entry = table.insert("s1", details(Some("localhost:22")), true);
        assert_eq!(table.list().len(), 1);
        assert_eq!(entry.stream.details.target_port(), Some(22));
        assert!(table.close("s1"));
        assert!(!table.close("s2"));
        assert!(entry.stream.closed().now_or_never().is_some());
        drop(entry);
        assert!(table.list().is_empty());
        assert!(!table.close("s1"));
    }

    use futures_util::FutureExt;
}
