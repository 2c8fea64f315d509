//! Counters for operators, served as Prometheus text at `/metrics`.
//! Plain atomics: one relaxed add on events, never on the byte path.

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Default)]
pub struct Metrics {
    pub streams_requested: AtomicU64,
    pub streams_accepted: AtomicU64,
    pub streams_rejected: AtomicU64,
    pub streams_established: AtomicU64,
    pub streams_closed: AtomicU64,
    pub streams_expired: AtomicU64,
    pub stream_creations_refused: AtomicU64,
    pub authentication_failures: AtomicU64,
    pub bytes_device_to_service: AtomicU64,
    pub bytes_service_to_device: AtomicU64,
    pub control_channels_opened: AtomicU64,
}

impl Metrics {
    pub fn add(counter: &AtomicU64, value: u64) {
        counter.fetch_add(value, Ordering::Relaxed);
    }

    /// Prometheus exposition text; `gauges` are point-in-time values.
    pub fn render(&self, gauges: &[(&str, &str, u64)]) -> String {
        let counters: [(&str, &str, &AtomicU64); 11] = [
            (
                "devstreams_streams_requested_total",
                "Stream creation requests with valid credentials.",
                &self.streams_requested,
            ),
            (
                "devstreams_streams_accepted_total",
                "Streams accepted by their device.",
                &self.streams_accepted,
            ),
            (
                "devstreams_streams_rejected_total",
                "Streams rejected by their device.",
                &self.streams_rejected,
            ),
            (
                "devstreams_streams_established_total",
                "Streams whose two sides were paired.",
                &self.streams_established,
            ),
            (
                "devstreams_streams_closed_total",
                "Paired streams that ended.",
                &self.streams_closed,
            ),
            (
                "devstreams_streams_expired_total",
                "Streams not paired before the handshake deadline.",
                &self.streams_expired,
            ),
            (
                "devstreams_stream_creations_refused_total",
                "Creations refused by limits (429).",
                &self.stream_creations_refused,
            ),
            (
                "devstreams_authentication_failures_total",
                "Refused SAS or stream tokens.",
                &self.authentication_failures,
            ),
            (
                "devstreams_bytes_device_to_service_total",
                "Bytes relayed from devices to services.",
                &self.bytes_device_to_service,
            ),
            (
                "devstreams_bytes_service_to_device_total",
                "Bytes relayed from services to devices.",
                &self.bytes_service_to_device,
            ),
            (
                "devstreams_control_channels_opened_total",
                "Device control channels authenticated.",
                &self.control_channels_opened,
            ),
        ];
        let mut text = String::new();
        for (name, help, counter) in counters {
            text.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}\n",
                counter.load(Ordering::Relaxed)
            ));
        }
        for (name, help, value) in gauges {
            text.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}\n"
            ));
        }
        text
    }
}
