//! Counters for operators, served as Prometheus text at `/metrics` on the
//! admin listener. The exposition format is `prometheus-client`'s: one relaxed
//! atomic add per event, never on the byte path; the gauges are read from
//! the relay's state when scraped.
//!
//! Counter names keep the `_total` suffix dashboards already use
//! (`devstreams_streams_requested_total`, …): the crate adds it to the names
//! registered here.

use prometheus_client::encoding::prometheus_text;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

/// The `Content-Type` of [`Metrics::render`]'s text.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

type UnsignedGauge = Gauge<u64, AtomicU64>;

pub struct Metrics {
    pub streams_requested: Counter,
    pub streams_accepted: Counter,
    pub streams_rejected: Counter,
    pub streams_established: Counter,
    pub streams_closed: Counter,
    pub streams_expired: Counter,
    /// Resumable streams told to move (Close 4012) by a drain.
    pub streams_moved: Counter,
    pub stream_creations_refused: Counter,
    pub authentication_failures: Counter,
    pub bytes_device_to_service: Counter,
    pub bytes_service_to_device: Counter,
    pub control_channels_opened: Counter,
    /// Audit events lost to a full queue (the disk did not keep up).
    pub audit_events_dropped: Counter,
    streams_active: UnsignedGauge,
    streams_pending: UnsignedGauge,
    devices_connected: UnsignedGauge,
    tasks: UnsignedGauge,
    /// From the creation request to both sides paired.
    pub stream_setup_seconds: Histogram,
    /// From paired to closed.
    pub stream_duration_seconds: Histogram,
    /// Bytes one stream carried, per direction.
    pub stream_bytes_device_to_service: Histogram,
    pub stream_bytes_service_to_device: Histogram,
    registry: Registry,
}

/// 5 ms to about 40 s: a set-up waits for a device's answer and two TLS
/// handshakes, bounded by the handshake deadline (60 s by default).
fn setup_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.005, 2.0, 14)
}

/// 1 s to about 4.5 days: from a quick command to a long-lived tunnel.
fn duration_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(1.0, 3.0, 12)
}

/// 1 KiB to 1 TiB, a factor of 4 apart.
fn byte_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(1024.0, 4.0, 16)
}

/// Point-in-time values, read from the relay's state at each scrape.
#[derive(Debug, Clone, Copy, Default)]
pub struct Gauges {
    pub streams_active: usize,
    pub streams_pending: usize,
    pub devices_connected: usize,
    pub tasks: usize,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut metrics = Self {
            streams_requested: Counter::default(),
            streams_accepted: Counter::default(),
            streams_rejected: Counter::default(),
            streams_established: Counter::default(),
            streams_closed: Counter::default(),
            streams_expired: Counter::default(),
            streams_moved: Counter::default(),
            stream_creations_refused: Counter::default(),
            authentication_failures: Counter::default(),
            bytes_device_to_service: Counter::default(),
            bytes_service_to_device: Counter::default(),
            control_channels_opened: Counter::default(),
            audit_events_dropped: Counter::default(),
            streams_active: UnsignedGauge::default(),
            streams_pending: UnsignedGauge::default(),
            devices_connected: UnsignedGauge::default(),
            tasks: UnsignedGauge::default(),
            stream_setup_seconds: Histogram::new(setup_buckets()),
            stream_duration_seconds: Histogram::new(duration_buckets()),
            stream_bytes_device_to_service: Histogram::new(byte_buckets()),
            stream_bytes_service_to_device: Histogram::new(byte_buckets()),
            registry: Registry::default(),
        };
        // The crate ends help texts with a full stop and counter names with
        // `_total`; neither is written here.
        let counters = [
            (
                "devstreams_streams_requested",
                "Stream creation requests with valid credentials",
                &metrics.streams_requested,
            ),
            (
                "devstreams_streams_accepted",
                "Streams accepted by their device",
                &metrics.streams_accepted,
            ),
            (
                "devstreams_streams_rejected",
                "Streams rejected by their device",
                &metrics.streams_rejected,
            ),
            (
                "devstreams_streams_established",
                "Streams whose two sides were paired",
                &metrics.streams_established,
            ),
            (
                "devstreams_streams_closed",
                "Paired streams that ended",
                &metrics.streams_closed,
            ),
            (
                "devstreams_streams_expired",
                "Streams not paired before the handshake deadline",
                &metrics.streams_expired,
            ),
            (
                "devstreams_streams_moved",
                "Resumable streams told to resume elsewhere (Close 4012) by a drain",
                &metrics.streams_moved,
            ),
            (
                "devstreams_stream_creations_refused",
                "Creations refused by limits (429)",
                &metrics.stream_creations_refused,
            ),
            (
                "devstreams_authentication_failures",
                "Refused SAS or stream tokens",
                &metrics.authentication_failures,
            ),
            (
                "devstreams_bytes_device_to_service",
                "Bytes relayed from devices to services",
                &metrics.bytes_device_to_service,
            ),
            (
                "devstreams_bytes_service_to_device",
                "Bytes relayed from services to devices",
                &metrics.bytes_service_to_device,
            ),
            (
                "devstreams_control_channels_opened",
                "Device control channels authenticated",
                &metrics.control_channels_opened,
            ),
            (
                "devstreams_audit_events_dropped",
                "Audit events dropped because the audit log writer fell behind",
                &metrics.audit_events_dropped,
            ),
        ];
        let mut registry = Registry::default();
        for (name, help, counter) in counters {
            registry.register(name, help, counter.clone());
        }
        let gauges = [
            (
                "devstreams_streams_active",
                "Streams created and not yet ended",
                &metrics.streams_active,
            ),
            (
                "devstreams_streams_pending",
                "Streams waiting for their sides to connect",
                &metrics.streams_pending,
            ),
            (
                "devstreams_devices_connected",
                "Devices with a control channel",
                &metrics.devices_connected,
            ),
            (
                "devstreams_tasks",
                "Tasks the relay owns (connections, sessions, streams)",
                &metrics.tasks,
            ),
        ];
        for (name, help, gauge) in gauges {
            registry.register(name, help, gauge.clone());
        }
        let histograms = [
            (
                "devstreams_stream_setup_seconds",
                "Seconds from a stream's creation request until its two sides were paired",
                &metrics.stream_setup_seconds,
            ),
            (
                "devstreams_stream_duration_seconds",
                "Seconds paired streams lasted, counted when they ended",
                &metrics.stream_duration_seconds,
            ),
            (
                "devstreams_stream_bytes_device_to_service",
                "Bytes one stream carried from device to service, counted when it ended",
                &metrics.stream_bytes_device_to_service,
            ),
            (
                "devstreams_stream_bytes_service_to_device",
                "Bytes one stream carried from service to device, counted when it ended",
                &metrics.stream_bytes_service_to_device,
            ),
        ];
        for (name, help, histogram) in histograms {
            registry.register(name, help, histogram.clone());
        }
        metrics.registry = registry;
        metrics
    }
}

impl Metrics {
    pub fn add(counter: &Counter, value: u64) {
        counter.inc_by(value);
    }

    /// A paired stream ended after `duration`, having carried these bytes.
    pub fn observe_stream_end(
        &self,
        duration: std::time::Duration,
        device_to_service: u64,
        service_to_device: u64,
    ) {
        self.stream_duration_seconds.observe(duration.as_secs_f64());
        self.stream_bytes_device_to_service
            .observe(device_to_service as f64);
        self.stream_bytes_service_to_device
            .observe(service_to_device as f64);
    }

    /// Prometheus exposition text (format 0.0.4, [`CONTENT_TYPE`]), with
    /// `gauges` as the current values of the gauges.
    pub fn render(&self, gauges: &Gauges) -> String {
        let as_u64 = |value: usize| u64::try_from(value).unwrap_or(u64::MAX);
        self.streams_active.set(as_u64(gauges.streams_active));
        self.streams_pending.set(as_u64(gauges.streams_pending));
        self.devices_connected.set(as_u64(gauges.devices_connected));
        self.tasks.set(as_u64(gauges.tasks));
        let mut text = String::new();
        // Writing into a String cannot fail; an error would mean a metric
        // failed to encode, and a partial answer is still worth serving.
        if let Err(error) = prometheus_text::encode(&mut text, &self.registry) {
            tracing::warn!(%error, "encoding the metrics failed");
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_keeps_its_name_and_value() {
        let metrics = Metrics::default();
        Metrics::add(&metrics.streams_requested, 3);
        Metrics::add(&metrics.bytes_device_to_service, 1 << 40);
        let text = metrics.render(&Gauges {
            streams_active: 2,
            streams_pending: 1,
            devices_connected: 5,
            tasks: 9,
        });
        let value = |name: &str| {
            text.lines()
                .find_map(|line| line.strip_prefix(&format!("{name} ")))
                .map(str::to_string)
        };
        for (name, expected) in [
            ("devstreams_streams_requested_total", "3"),
            ("devstreams_streams_accepted_total", "0"),
            ("devstreams_streams_rejected_total", "0"),
            ("devstreams_streams_established_total", "0"),
            ("devstreams_streams_closed_total", "0"),
            ("devstreams_streams_expired_total", "0"),
            ("devstreams_stream_creations_refused_total", "0"),
            ("devstreams_authentication_failures_total", "0"),
            ("devstreams_bytes_device_to_service_total", "1099511627776"),
            ("devstreams_bytes_service_to_device_total", "0"),
            ("devstreams_control_channels_opened_total", "0"),
            ("devstreams_streams_active", "2"),
            ("devstreams_streams_pending", "1"),
            ("devstreams_devices_connected", "5"),
            ("devstreams_tasks", "9"),
        ] {
            assert_eq!(value(name).as_deref(), Some(expected), "{name} in:\n{text}");
        }
        assert!(text.contains("# TYPE devstreams_streams_requested_total counter"));
        assert!(text.contains("# TYPE devstreams_tasks gauge"));
        assert!(text.contains("# HELP devstreams_tasks Tasks the relay owns"));
        metrics.observe_stream_end(std::time::Duration::from_secs(2), 5000, 10);
        let text = metrics.render(&Gauges::default());
        assert!(text.contains("# TYPE devstreams_stream_duration_seconds histogram"));
        assert!(
            text.contains("devstreams_stream_duration_seconds_count 1"),
            "{text}"
        );
        assert!(
            text.contains("devstreams_stream_bytes_device_to_service_sum 5000"),
            "{text}"
        );
        assert!(text.contains("# TYPE devstreams_stream_setup_seconds histogram"));
    }
}
