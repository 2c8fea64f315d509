//! The last few thousand audit events, kept in memory for the web console's
//! Activity page. Fed by [`crate::audit::Audit::record`], so it works with or
//! without `--audit-log`; bounded, so a busy relay forgets the oldest events
//! rather than growing. The audit log file stays the record to keep.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::SystemTime;

use crate::audit::AuditEvent;

/// Events kept; past it the oldest is forgotten.
pub const RECENT_EVENTS_KEPT: usize = 5_000;

/// A bounded ring of recent audit events, oldest first.
pub struct RecentEvents {
    events: Mutex<VecDeque<(SystemTime, AuditEvent)>>,
    capacity: usize,
}

impl Default for RecentEvents {
    fn default() -> Self {
        Self::with_capacity(RECENT_EVENTS_KEPT)
    }
}

impl RecentEvents {
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            events: Mutex::new(VecDeque::with_capacity(capacity.min(1024))),
            capacity: capacity.max(1),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<(SystemTime, AuditEvent)>> {
        self.events
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn push(&self, time: SystemTime, event: AuditEvent) {
        let mut events = self.lock();
        if events.len() >= self.capacity {
            events.pop_front();
        }
        events.push_back((time, event));
    }

    /// The events kept, newest first.
    pub fn newest_first(&self) -> Vec<(SystemTime, AuditEvent)> {
        self.lock().iter().rev().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(number: usize) -> AuditEvent {
        AuditEvent::StreamAccepted {
            stream_id: number.to_string(),
            device_id: "d".into(),
        }
    }

    #[test]
    fn the_ring_keeps_the_newest_events_up_to_its_bound() {
        let ring = RecentEvents::with_capacity(3);
        for number in 0..5 {
            ring.push(SystemTime::now(), event(number));
        }
        let ids: Vec<String> = ring
            .newest_first()
            .into_iter()
            .map(|(_, event)| match event {
                AuditEvent::StreamAccepted { stream_id, .. } => stream_id,
                _ => unreachable!("only accepted events were pushed"),
            })
            .collect();
        assert_eq!(ids, ["4", "3", "2"]);
    }
}
