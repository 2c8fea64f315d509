//! Admission control for streams and device connections: concurrency caps
//! and rates, global and per key (device, source).
//!
//! A [`StreamPermit`] is taken when a stream is created and released when it
//! is dropped, wherever that happens (rejection, expiry, end of copying), so
//! the counts cannot leak. Rates are `governor`'s GCRA (a token bucket in one
//! timestamp): a rate of N per second allows a burst of N, then one every
//! 1/N s. Keyed rates ([`KeyedRate`]) forget keys idle long enough to be full
//! again, and hold at most a fixed number of keys, so a flood of new keys
//! cannot grow the table.

use std::collections::HashMap;
use std::hash::Hash;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};
use tokio_util::sync::CancellationToken;

use crate::config::Limits;

/// Keys one [`KeyedRate`] tracks at most (devices, sources).
pub const MAX_RATE_KEYS: usize = 100_000;
/// How often idle keys are forgotten.
const SWEEP_INTERVAL: Duration = Duration::from_secs(10);
/// Least time between two sweeps of a full table (a sweep visits every key).
const FULL_SWEEP_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AdmissionError {
    #[error("the relay is at its limit of {0} concurrent streams; retry later")]
    TooManyStreams(usize),
    #[error("device {device_id} is at its limit of {limit} concurrent streams; close some or retry later")]
    TooManyDeviceStreams { device_id: String, limit: usize },
    #[error("stream creations exceed {0} per second on this relay; retry in a second")]
    RelayRate(u32),
    #[error(
        "stream creations for device {device_id} exceed {limit} per second; retry in a second"
    )]
    DeviceRate { device_id: String, limit: u32 },
}

/// Events per second, with a burst of one second's worth. A rate of zero
/// admits nothing.
pub struct Rate {
    limiter: Option<DefaultDirectRateLimiter>,
}

impl Rate {
    pub fn per_second(rate: u32) -> Self {
        Self {
            limiter: NonZeroU32::new(rate).map(|rate| RateLimiter::direct(Quota::per_second(rate))),
        }
    }

    /// Takes one event if the rate allows it now.
    pub fn check(&self) -> bool {
        self.limiter
            .as_ref()
            .is_some_and(|limiter| limiter.check().is_ok())
    }
}

/// The same rate, kept separately for each key, in a bounded table.
pub struct KeyedRate<K: Hash + Eq + Clone> {
    limiter: Option<DefaultKeyedRateLimiter<K>>,
    max_keys: usize,
    last_sweep: Mutex<Instant>,
}

impl<K: Hash + Eq + Clone> KeyedRate<K> {
    pub fn per_second(rate: u32, max_keys: usize) -> Self {
        Self {
            limiter: NonZeroU32::new(rate).map(|rate| RateLimiter::keyed(Quota::per_second(rate))),
            max_keys,
            last_sweep: Mutex::new(Instant::now()),
        }
    }

    /// Takes one event for `key` if its rate allows it now.
    ///
    /// A table still full after forgetting its idle keys holds `max_keys`
    /// keys that were all active within one second: then new keys are not
    /// tracked and pass (the global limits still hold), rather than the
    /// table growing without bound or refusing every newcomer.
    pub fn check(&self, key: &K) -> bool {
        let Some(limiter) = &self.limiter else {
            return false;
        };
        let full = limiter.len() >= self.max_keys;
        self.forget_idle(limiter, full);
        if full && limiter.len() >= self.max_keys {
            return true;
        }
        limiter.check_key(key).is_ok()
    }

    /// Keys tracked now.
    pub fn tracked_keys(&self) -> usize {
        self.limiter.as_ref().map_or(0, |limiter| limiter.len())
    }

    fn forget_idle(&self, limiter: &DefaultKeyedRateLimiter<K>, full: bool) {
        let now = Instant::now();
        let mut last_sweep = self
            .last_sweep
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let since = now.saturating_duration_since(*last_sweep);
        if since >= SWEEP_INTERVAL || (full && since >= FULL_SWEEP_INTERVAL) {
            *last_sweep = now;
            drop(last_sweep);
            limiter.retain_recent();
            limiter.shrink_to_fit();
            if full && limiter.len() >= self.max_keys {
                tracing::warn!(
                    keys = self.max_keys,
                    "rate table full of active keys; new keys pass until some go idle"
                );
            }
        }
    }
}

struct DeviceStreams {
    count: usize,
    /// Cancelled when the device is removed, cutting its live streams.
    cancel: CancellationToken,
}

#[derive(Default)]
struct Counts {
    streams: usize,
    per_device: HashMap<String, DeviceStreams>,
}

pub struct Admission {
    limits: Limits,
    counts: Mutex<Counts>,
    relay_creations: Rate,
    device_creations: KeyedRate<String>,
    device_connects: Rate,
}

impl Admission {
    pub fn new(limits: Limits) -> Arc<Self> {
        Arc::new(Self {
            relay_creations: Rate::per_second(limits.creations_per_second),
            device_creations: KeyedRate::per_second(
                limits.creations_per_second_per_device,
                MAX_RATE_KEYS,
            ),
            device_connects: Rate::per_second(limits.device_connects_per_second),
            limits,
            counts: Mutex::new(Counts::default()),
        })
    }

    pub fn active_streams(&self) -> usize {
        self.lock().streams
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.counts
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Admits one stream creation for `device_id`.
    pub fn admit(self: &Arc<Self>, device_id: &str) -> Result<StreamPermit, AdmissionError> {
        let mut counts = self.lock();
        if counts.streams >= self.limits.max_streams {
            return Err(AdmissionError::TooManyStreams(self.limits.max_streams));
        }
        let device_streams = counts
            .per_device
            .get(device_id)
            .map_or(0, |device| device.count);
        if device_streams >= self.limits.max_streams_per_device {
            return Err(AdmissionError::TooManyDeviceStreams {
                device_id: device_id.to_string(),
                limit: self.limits.max_streams_per_device,
            });
        }
        // Under the lock, so a refused cap never spends a rate token.
        if !self.relay_creations.check() {
            return Err(AdmissionError::RelayRate(self.limits.creations_per_second));
        }
        if !self.device_creations.check(&device_id.to_string()) {
            return Err(AdmissionError::DeviceRate {
                device_id: device_id.to_string(),
                limit: self.limits.creations_per_second_per_device,
            });
        }
        counts.streams += 1;
        let device = counts
            .per_device
            .entry(device_id.to_string())
            .or_insert_with(|| DeviceStreams {
                count: 0,
                cancel: CancellationToken::new(),
            });
        device.count += 1;
        let cancel = device.cancel.clone();
        Ok(StreamPermit {
            admission: self.clone(),
            device_id: device_id.to_string(),
            cancel,
        })
    }

    /// Admits one authenticated device control channel, or says "shed it"
    /// (`--device-connects-per-second`). Only devices that proved their
    /// identity spend this budget, so nobody can use it up for them.
    pub fn admit_device_connect(&self) -> bool {
        self.device_connects.check()
    }

    /// Cuts every stream of a device (it was removed or disabled).
    pub fn cancel_device(&self, device_id: &str) {
        if let Some(device) = self.lock().per_device.get(device_id) {
            device.cancel.cancel();
        }
    }
}

/// One admitted stream; releases its slot when dropped.
pub struct StreamPermit {
    admission: Arc<Admission>,
    device_id: String,
    cancel: CancellationToken,
}

impl StreamPermit {
    /// Resolves when the device's streams must be cut.
    pub async fn cancelled(&self) {
        self.cancel.cancelled().await
    }
}

impl Drop for StreamPermit {
    fn drop(&mut self) {
        let mut counts = self.admission.lock();
        counts.streams = counts.streams.saturating_sub(1);
        if let Some(device) = counts.per_device.get_mut(&self.device_id) {
            device.count -= 1;
            if device.count == 0 {
                counts.per_device.remove(&self.device_id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_cap_is_enforced_and_released_on_drop() {
        let admission = Admission::new(Limits {
            max_streams_per_device: 2,
            ..Limits::default()
        });
        let first = admission.admit("d").unwrap();
        let _second = admission.admit("d").unwrap();
        assert!(matches!(
            admission.admit("d"),
            Err(AdmissionError::TooManyDeviceStreams { .. })
        ));
        admission.admit("other").unwrap();
        drop(first);
        admission.admit("d").unwrap();
        assert_eq!(
            admission.active_streams(),
            1,
            "only `_second` is still held: dropped permits release at once"
        );
    }

    #[test]
    fn creation_rate_is_enforced_per_device() {
        let admission = Admission::new(Limits {
            creations_per_second_per_device: 3,
            ..Limits::default()
        });
        for _ in 0..3 {
            admission.admit("d").unwrap();
        }
        assert!(matches!(
            admission.admit("d"),
            Err(AdmissionError::DeviceRate { .. })
        ));
        admission.admit("e").unwrap();
    }

    #[test]
    fn a_zero_rate_admits_nothing() {
        assert!(!Rate::per_second(0).check());
        assert!(!KeyedRate::per_second(0, 10).check(&"d"));
    }

    #[test]
    fn device_connects_have_a_relay_wide_budget() {
        let admission = Admission::new(Limits {
            device_connects_per_second: 2,
            ..Limits::default()
        });
        assert!(admission.admit_device_connect());
        assert!(admission.admit_device_connect());
        assert!(!admission.admit_device_connect());
    }

    #[test]
    fn a_refused_cap_spends_no_rate() {
        let admission = Admission::new(Limits {
            max_streams_per_device: 1,
            creations_per_second_per_device: 2,
            ..Limits::default()
        });
        let held = admission.admit("d").unwrap();
        for _ in 0..5 {
            assert!(matches!(
                admission.admit("d"),
                Err(AdmissionError::TooManyDeviceStreams { .. })
            ));
        }
        drop(held);
        admission
            .admit("d")
            .expect("the second token of the second is still there");
    }

    #[test]
    fn keyed_rates_hold_a_bounded_table_and_forget_idle_keys() {
        let rate = KeyedRate::per_second(1_000, 10);
        for key in 0..100u32 {
            assert!(rate.check(&key), "key {key} is fresh");
        }
        assert!(
            rate.tracked_keys() <= 11,
            "{} keys tracked past a bound of 10",
            rate.tracked_keys()
        );
        // At 1000 per second every key is full again after a millisecond;
        // the next sweep of a full table (at most once a second) forgets them.
        std::thread::sleep(FULL_SWEEP_INTERVAL + Duration::from_millis(50));
        assert!(rate.check(&1_000));
        assert!(
            rate.tracked_keys() <= 1,
            "idle keys are forgotten: {} left",
            rate.tracked_keys()
        );
    }

    #[test]
    fn global_cap_is_enforced() {
        let admission = Admission::new(Limits {
            max_streams: 1,
            ..Limits::default()
        });
        let _held = admission.admit("a").unwrap();
        assert_eq!(
            admission.admit("b").err(),
            Some(AdmissionError::TooManyStreams(1))
        );
    }
}
