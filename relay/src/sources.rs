//! Per-source limits: how many connections one source may hold, how many
//! device control channels it may open per second, and how much it is slowed
//! down after failing to authenticate.
//!
//! A single client (or attacker) must not be able to use up the relay's
//! connection budget, the device-connect budget real devices need, or guess
//! keys at line rate. A *source* is an IPv4 address, or an IPv6 prefix (a
//! /64 unless configured otherwise): one IPv6 host is usually handed a whole
//! /64, so keying by full address would give it 2^64 identities.
//!
//! Every table is bounded. An entry leaves the connection table when its last
//! connection closes; failure records expire after a window and are capped
//! in number, the least recently failing forgotten first (an LRU list, so
//! recording a failure is O(1) and never scans the table under the lock);
//! the connect rate is a bounded [`KeyedRate`].

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lru::LruCache;

use crate::limits::{KeyedRate, MAX_RATE_KEYS};

/// Failure records kept at most; past this the least recently failing are forgotten.
const MAX_FAILURE_RECORDS: usize = 10_000;

#[derive(Debug, Clone, Copy)]
pub struct SourcePolicy {
    /// Open connections one source may hold.
    pub max_connections_per_source: usize,
    /// Device control channels one source may open per second (authenticated
    /// or not); past it the source is told to retry later (CONNACK 3) and the
    /// attempt counts as a failure.
    pub device_connects_per_second_per_source: u32,
    /// IPv6 addresses sharing this many leading bits are one source.
    pub ipv6_prefix_length: u8,
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
            device_connects_per_second_per_source: 100,
            ipv6_prefix_length: 64,
            free_failures: 5,
            failure_window: Duration::from_secs(60),
            failure_delay_step: Duration::from_millis(500),
            max_failure_delay: Duration::from_secs(5),
        }
    }
}

/// The source an address belongs to: IPv4 addresses (also when written as
/// IPv4-mapped IPv6) stand for themselves, IPv6 addresses for their prefix.
pub fn source_of(address: IpAddr, ipv6_prefix_length: u8) -> IpAddr {
    match address.to_canonical() {
        IpAddr::V4(address) => IpAddr::V4(address),
        IpAddr::V6(address) => {
            let prefix_length = u32::from(ipv6_prefix_length.min(128));
            let mask = u128::MAX.checked_shl(128 - prefix_length).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(u128::from(address) & mask))
        }
    }
}

struct FailureRecord {
    count: u32,
    window_start: Instant,
}

struct Tables {
    connections: HashMap<IpAddr, usize>,
    failures: LruCache<IpAddr, FailureRecord>,
}

pub struct Sources {
    policy: SourcePolicy,
    tables: Mutex<Tables>,
    device_connects: KeyedRate<IpAddr>,
}

/// One open connection of a source; released when dropped.
pub struct SourceSlot {
    sources: Arc<Sources>,
    source: IpAddr,
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut tables = self.sources.lock();
        if let Some(count) = tables.connections.get_mut(&self.source) {
            *count -= 1;
            if *count == 0 {
                tables.connections.remove(&self.source);
            }
        }
    }
}

impl Sources {
    pub fn new(policy: SourcePolicy) -> Arc<Self> {
        Self::with_failure_capacity(policy, MAX_FAILURE_RECORDS)
    }

    fn with_failure_capacity(policy: SourcePolicy, failure_capacity: usize) -> Arc<Self> {
        let capacity = NonZeroUsize::new(failure_capacity).unwrap_or(NonZeroUsize::MIN);
        Arc::new(Self {
            policy,
            tables: Mutex::new(Tables {
                connections: HashMap::new(),
                failures: LruCache::new(capacity),
            }),
            device_connects: KeyedRate::per_second(
                policy.device_connects_per_second_per_source,
                MAX_RATE_KEYS,
            ),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Tables> {
        self.tables
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn source(&self, address: IpAddr) -> IpAddr {
        source_of(address, self.policy.ipv6_prefix_length)
    }

    /// A connection slot for `address`'s source, or `None` when it holds too many.
    pub fn open(self: &Arc<Self>, address: IpAddr) -> Option<SourceSlot> {
        let source = self.source(address);
        let mut tables = self.lock();
        let count = tables.connections.entry(source).or_insert(0);
        if *count >= self.policy.max_connections_per_source {
            return None;
        }
        *count += 1;
        Some(SourceSlot {
            sources: self.clone(),
            source,
        })
    }

    /// Takes one device connection attempt from `address`'s source, or says
    /// it exceeds the per-source rate.
    pub fn admit_device_connect(&self, address: IpAddr) -> bool {
        self.device_connects.check(&self.source(address))
    }

    /// Records a failed authentication (or an attempt over a per-source
    /// budget) from `address`'s source. O(1): the table is an LRU list.
    pub fn record_failure(&self, address: IpAddr) {
        let source = self.source(address);
        let now = Instant::now();
        let window = self.policy.failure_window;
        let mut tables = self.lock();
        match tables.failures.get_mut(&source) {
            Some(record) if now.saturating_duration_since(record.window_start) < window => {
                record.count = record.count.saturating_add(1);
            }
            Some(record) => {
                *record = FailureRecord {
                    count: 1,
                    window_start: now,
                };
            }
            None => {
                // Full: the least recently failing source is forgotten.
                tables.failures.push(
                    source,
                    FailureRecord {
                        count: 1,
                        window_start: now,
                    },
                );
            }
        }
    }

    /// How long to hold an authentication attempt from `address` before
    /// answering it: zero until its source has failed more than the free
    /// number of times within the window.
    pub fn failure_delay(&self, address: IpAddr) -> Duration {
        let source = self.source(address);
        let tables = self.lock();
        let Some(record) = tables.failures.peek(&source) else {
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

    fn v6(text: &str) -> IpAddr {
        text.parse().expect("an IPv6 address")
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
    fn ipv6_addresses_of_one_slash_64_are_one_source() {
        assert_eq!(
            source_of(v6("2001:db8:1:2:aaaa:bbbb:cccc:dddd"), 64),
            v6("2001:db8:1:2::")
        );
        assert_eq!(
            source_of(v6("2001:db8:1:2:aaaa:bbbb:cccc:dddd"), 48),
            v6("2001:db8:1::")
        );
        assert_eq!(source_of(v6("2001:db8::1"), 128), v6("2001:db8::1"));
        assert_eq!(source_of(v6("2001:db8::1"), 0), v6("::"));
        assert_eq!(
            source_of(v6("::ffff:192.0.2.7"), 64),
            IpAddr::from([192, 0, 2, 7]),
            "an IPv4-mapped address is its IPv4 source"
        );

        let sources = Sources::new(SourcePolicy {
            max_connections_per_source: 2,
            ..SourcePolicy::default()
        });
        let _first = sources.open(v6("2001:db8:0:1::1")).unwrap();
        let _second = sources.open(v6("2001:db8:0:1:ffff::2")).unwrap();
        assert!(
            sources
                .open(v6("2001:db8:0:1:1234:5678:9abc:def0"))
                .is_none(),
            "a third address of the same /64 shares its cap"
        );
        assert!(
            sources.open(v6("2001:db8:0:2::1")).is_some(),
            "the next /64 is another source"
        );
    }

    #[test]
    fn failures_are_charged_to_the_whole_slash_64() {
        let sources = Sources::new(SourcePolicy::default());
        for host in 1..=6u16 {
            sources.record_failure(IpAddr::V6(Ipv6Addr::new(
                0x2001, 0xdb8, 0, 7, 0, 0, 0, host,
            )));
        }
        assert_eq!(
            sources.failure_delay(v6("2001:db8:0:7::ffff")),
            Duration::from_millis(500),
            "six failures from six addresses of one /64 count as six from one source"
        );
        assert_eq!(sources.failure_delay(v6("2001:db8:0:8::1")), Duration::ZERO);
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
    fn failures_older_than_the_window_are_forgotten() {
        let sources = Sources::new(SourcePolicy {
            failure_window: Duration::from_millis(50),
            ..SourcePolicy::default()
        });
        for _ in 0..10 {
            sources.record_failure(address(1));
        }
        assert!(sources.failure_delay(address(1)) > Duration::ZERO);
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(sources.failure_delay(address(1)), Duration::ZERO);
        sources.record_failure(address(1));
        assert_eq!(
            sources.failure_delay(address(1)),
            Duration::ZERO,
            "a failure after the window starts a new count"
        );
    }

    #[test]
    fn a_full_failure_table_forgets_the_least_recently_failing_source() {
        let sources = Sources::with_failure_capacity(SourcePolicy::default(), 3);
        for _ in 0..10 {
            sources.record_failure(address(1));
        }
        sources.record_failure(address(2));
        sources.record_failure(address(3));
        // Source 1 fails again, so source 2 is now the least recent.
        sources.record_failure(address(1));
        sources.record_failure(address(4));
        let tables = sources.lock();
        assert_eq!(tables.failures.len(), 3);
        assert!(
            tables.failures.contains(&address(1)),
            "the persistent one stays"
        );
        assert!(!tables.failures.contains(&address(2)));
        assert!(tables.failures.contains(&address(4)));
    }

    #[test]
    fn failure_table_is_bounded() {
        let sources = Sources::new(SourcePolicy::default());
        for index in 0..(MAX_FAILURE_RECORDS as u32 + 50) {
            sources.record_failure(IpAddr::from(index.to_be_bytes()));
        }
        assert_eq!(sources.lock().failures.len(), MAX_FAILURE_RECORDS);
    }

    #[test]
    fn device_connects_are_budgeted_per_source() {
        let sources = Sources::new(SourcePolicy {
            device_connects_per_second_per_source: 3,
            ..SourcePolicy::default()
        });
        for _ in 0..3 {
            assert!(sources.admit_device_connect(v6("2001:db8:0:9::1")));
        }
        assert!(
            !sources.admit_device_connect(v6("2001:db8:0:9::2")),
            "the budget belongs to the /64, not to one address"
        );
        assert!(
            sources.admit_device_connect(address(1)),
            "other sources keep theirs"
        );
    }
}
