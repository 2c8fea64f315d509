//! Per-source-address limits: how many connections one address may hold,
//! and how much one address is slowed down after failing to authenticate.
//!
//! A single client (or attacker) must not be able to use up the relay's
//! connection budget or guess keys at line rate. Both tables are keyed by IP
//! address and bounded: an address leaves the connection table when its last
//! connection closes, and failure records expire after a window and are
//! capped in number, the oldest dropped first.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Failure records kept at most; past this the oldest are forgotten.
const MAX_FAILURE_RECORDS: usize = 10_000;

#[derive(Debug, Clone, Copy)]
pub struct SourcePolicy {
    /// Open connections one address may hold.
    pub max_connections_per_source: usize,
    /// Failures tolerated in `failure_window` before answers slow down.
    pub free_failures: u32,
    /// Failures older than this are forgotten.
    pub failure_window: Duration,
    /// Added per failure past the free ones, up to `max_failure_delay`.
    pub failure_delay_step: Duration,
    pub max_failure_delay: Duration,
}

impl Default for SourcePolicy {
    fn default() -> Self {
        Self {
            max_connections_per_source: 1024,
            free_failures: 5,
            failure_window: Duration::from_secs(60),
            failure_delay_step: Duration::from_millis(500),
            max_failure_delay: Duration::from_secs(5),
        }
    }
}

struct FailureRecord {
    count: u32,
    window_start: Instant,
}

#[derive(Default)]
struct Tables {
    connections: HashMap<IpAddr, usize>,
    failures: HashMap<IpAddr, FailureRecord>,
}

pub struct Sources {
    policy: SourcePolicy,
    tables: Mutex<Tables>,
}

/// One open connection of an address; released when dropped.
pub struct SourceSlot {
    sources: Arc<Sources>,
    address: IpAddr,
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut tables = self.sources.lock();
        if let Some(count) = tables.connections.get_mut(&self.address) {
            *count -= 1;
            if *count == 0 {
                tables.connections.remove(&self.address);
            }
        }
    }
}

impl Sources {
    pub fn new(policy: SourcePolicy) -> Arc<Self> {
        Arc::new(Self {
            policy,
            tables: Mutex::new(Tables::default()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Tables> {
        self.tables
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A connection slot for `address`, or `None` when it holds too many.
    pub fn open(self: &Arc<Self>, address: IpAddr) -> Option<SourceSlot> {
        let mut tables = self.lock();
        let count = tables.connections.entry(address).or_insert(0);
        if *count >= self.policy.max_connections_per_source {
            return None;
        }
        *count += 1;
        Some(SourceSlot {
            sources: self.clone(),
            address,
        })
    }

    /// Records a failed authentication from `address`.
    pub fn record_failure(&self, address: IpAddr) {
        let now = Instant::now();
        let mut tables = self.lock();
        if tables.failures.len() >= MAX_FAILURE_RECORDS && !tables.failures.contains_key(&address) {
            let window = self.policy.failure_window;
            tables
                .failures
                .retain(|_, record| now.duration_since(record.window_start) < window);
            if tables.failures.len() >= MAX_FAILURE_RECORDS {
                if let Some(oldest) = tables
                    .failures
                    .iter()
                    .min_by_key(|(_, r)| r.window_start)
                    .map(|(a, _)| *a)
                {
                    tables.failures.remove(&oldest);
                }
            }
        }
        let record = tables.failures.entry(address).or_insert(FailureRecord {
            count: 0,
            window_start: now,
        });
        if now.duration_since(record.window_start) >= self.policy.failure_window {
            *record = FailureRecord {
                count: 0,
                window_start: now,
            };
        }
        record.count = record.count.saturating_add(1);
    }

    /// How long to hold an authentication attempt from `address` before
    /// answering it: zero until it has failed more than the free number of
    /// times within the window.
    pub fn failure_delay(&self, address: IpAddr) -> Duration {
        let tables = self.lock();
        let Some(record) = tables.failures.get(&address) else {
            return Duration::ZERO;
        };
        if record.window_start.elapsed() >= self.policy.failure_window
            || record.count <= self.policy.free_failures
        {
            return Duration::ZERO;
        }
        let excess = record.count - self.policy.free_failures;
        (self.policy.failure_delay_step * excess).min(self.policy.max_failure_delay)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn address(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    #[test]
    fn connections_per_source_are_capped_and_released() {
        let sources = Sources::new(SourcePolicy {
            max_connections_per_source: 2,
            ..SourcePolicy::default()
        });
        let first = sources.open(address(1)).unwrap();
        let _second = sources.open(address(1)).unwrap();
        assert!(sources.open(address(1)).is_none());
        assert!(
            sources.open(address(2)).is_some(),
            "other sources are not affected"
        );
        drop(first);
        assert!(sources.open(address(1)).is_some());
    }

    #[test]
    fn failures_past_the_free_ones_slow_answers_down_up_to_a_cap() {
        let sources = Sources::new(SourcePolicy::default());
        for _ in 0..5 {
            sources.record_failure(address(1));
        }
        assert_eq!(sources.failure_delay(address(1)), Duration::ZERO);
        sources.record_failure(address(1));
        assert_eq!(
            sources.failure_delay(address(1)),
            Duration::from_millis(500)
        );
        for _ in 0..100 {
            sources.record_failure(address(1));
        }
        assert_eq!(sources.failure_delay(address(1)), Duration::from_secs(5));
        assert_eq!(sources.failure_delay(address(2)), Duration::ZERO);
    }

    #[test]
    fn failure_table_is_bounded() {
        let sources = Sources::new(SourcePolicy::default());
        for index in 0..(MAX_FAILURE_RECORDS as u32 + 50) {
            sources.record_failure(IpAddr::from(index.to_be_bytes()));
        }
        assert!(sources.lock().failures.len() <= MAX_FAILURE_RECORDS);
    }
}
