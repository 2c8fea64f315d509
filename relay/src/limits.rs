//! Admission control for streams: concurrency caps and creation rates,
//! global and per device.
//!
//! A [`StreamPermit`] is taken when a stream is created and released when it
//! is dropped, wherever that happens (rejection, expiry, end of copying), so
//! the counts cannot leak. Rates use a token bucket per key; buckets of idle
//! devices are forgotten so the table stays bounded by active devices.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::config::Limits;

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

struct Bucket {
    tokens: f64,
    updated: Instant,
}

impl Bucket {
    fn take(&mut self, rate: u32, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate as f64).min(rate as f64);
        self.updated = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
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
    relay_bucket: Option<Bucket>,
    device_connect_bucket: Option<Bucket>,
    device_buckets: HashMap<String, Bucket>,
    last_sweep: Option<Instant>,
}

pub struct Admission {
    limits: Limits,
    counts: Mutex<Counts>,
}

impl Admission {
    pub fn new(limits: Limits) -> Arc<Self> {
        Arc::new(Self {
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
        let now = Instant::now();
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
        let relay_rate = self.limits.creations_per_second;
        let relay_bucket = counts.relay_bucket.get_or_insert(Bucket {
            tokens: relay_rate as f64,
            updated: now,
        });
        if !relay_bucket.take(relay_rate, now) {
            return Err(AdmissionError::RelayRate(relay_rate));
        }
        let device_rate = self.limits.creations_per_second_per_device;
        if counts
            .last_sweep
            .is_none_or(|last| now.duration_since(last) > Duration::from_secs(10))
        {
            // A bucket idle long enough to be full again carries no state.
            counts
                .device_buckets
                .retain(|_, bucket| now.duration_since(bucket.updated) < Duration::from_secs(10));
            counts.last_sweep = Some(now);
        }
        let device_bucket = counts
            .device_buckets
            .entry(device_id.to_string())
            .or_insert(Bucket {
                tokens: device_rate as f64,
                updated: now,
            });
        if !device_bucket.take(device_rate, now) {
            return Err(AdmissionError::DeviceRate {
                device_id: device_id.to_string(),
                limit: device_rate,
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

    /// Admits one device control-channel connection, or says "shed it".
    pub fn admit_device_connect(&self) -> bool {
        let now = Instant::now();
        let rate = self.limits.device_connects_per_second;
        let mut counts = self.lock();
        counts
            .device_connect_bucket
            .get_or_insert(Bucket {
                tokens: rate as f64,
                updated: now,
            })
            .take(rate, now)
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
