//! Everything `relay serve` can be told, with the defaults `--help` shows.
//! Every wait has a deadline here and every buffer a bound.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// How the relay gets its TLS certificate.
#[derive(Debug, Clone)]
pub enum TlsMode {
    /// A self-signed certificate in `<data-dir>/tls`, created on first start.
    SelfSigned,
    /// The operator's certificate chain and private key (PEM).
    Files {
        certificate: PathBuf,
        private_key: PathBuf,
    },
    /// Plain HTTP/MQTT, for a relay behind a TLS-terminating load balancer.
    Disabled,
}

/// The largest `--max-mqtt-packet-size`: MQTT 3.1.1's own limit (a
/// remaining length of 268,435,455 bytes plus a 5-byte fixed header). It
/// keeps every size derived from the setting far from overflowing.
pub const MAX_MQTT_PACKET_SIZE: usize = 268_435_455 + 5;

#[derive(Debug, Clone)]
pub struct Limits {
    /// Create → both sides connected; also the cap of the REST timeouts.
    pub handshake_timeout: Duration,
    /// A client must finish TLS within this.
    pub tls_handshake_timeout: Duration,
    /// A client must send its request headers within this (slowloris).
    pub header_read_timeout: Duration,
    /// A device must send MQTT CONNECT within this after connecting.
    pub mqtt_connect_timeout: Duration,
    /// Largest request head (line + headers), bytes.
    pub max_header_size: usize,
    /// Largest WebSocket message (and frame) on stream sockets, bytes.
    pub max_message_size: usize,
    /// Largest MQTT packet from a device, bytes; at most
    /// [`MAX_MQTT_PACKET_SIZE`].
    pub max_mqtt_packet_size: usize,
    /// Concurrent streams (created, pairing or copying) on this relay.
    pub max_streams: usize,
    /// Concurrent streams of one device.
    pub max_streams_per_device: usize,
    /// Stream creations per second on this relay.
    pub creations_per_second: u32,
    /// Stream creations per second for one device.
    pub creations_per_second_per_device: u32,
    /// Open connections on the main and MQTT listeners together.
    pub max_connections: usize,
    /// SAS tokens are accepted this long past their expiry.
    pub clock_skew: Duration,
    /// SAS tokens expiring further ahead than this are refused.
    pub max_token_lifetime: Duration,
    /// Live streams get this long to finish on shutdown.
    pub drain_timeout: Duration,
    /// Per-address connection cap and authentication-failure slowdown.
    pub sources: crate::sources::SourcePolicy,
    /// Streams waiting for their two sides at once.
    pub max_pending_streams: usize,
    /// Authenticated device control channels accepted per second; past it
    /// devices get CONNACK 3 (retry later), which spreads a reconnect storm.
    /// Attempts are budgeted per source too (`sources`).
    pub device_connects_per_second: u32,
    /// Deadline for each write to a device's control channel (and for its
    /// polite close); a device that does not read for this long is dropped.
    pub write_timeout: Duration,
    /// Stream sockets are pinged this often; a side silent for three
    /// intervals is dropped. `None` turns it off.
    pub ping_interval: Option<Duration>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(60),
            tls_handshake_timeout: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(10),
            mqtt_connect_timeout: Duration::from_secs(10),
            max_header_size: 16 * 1024,
            max_message_size: framing::websocket::DEFAULT_MAX_MESSAGE_SIZE,
            max_mqtt_packet_size: framing::mqtt::DEFAULT_MAX_PACKET_SIZE,
            max_streams: 20_000,
            max_streams_per_device: 200,
            creations_per_second: 5_000,
            creations_per_second_per_device: 500,
            max_connections: 50_000,
            clock_skew: Duration::from_secs(300),
            max_token_lifetime: Duration::from_secs(366 * 24 * 3600),
            drain_timeout: Duration::from_secs(30),
            ping_interval: Some(framing::pump::DEFAULT_PING_INTERVAL),
            write_timeout: Duration::from_secs(10),
            sources: crate::sources::SourcePolicy::default(),
            max_pending_streams: 10_000,
            device_connects_per_second: 1_000,
        }
    }
}

impl Limits {
    /// Largest WebSocket message carrying MQTT (MQTT over WebSocket): twice
    /// the packet size, since a client may split packets across messages or
    /// pack several into one. Saturates rather than overflowing when a
    /// library caller sets a size past [`MAX_MQTT_PACKET_SIZE`].
    pub fn mqtt_websocket_message_size(&self) -> usize {
        self.max_mqtt_packet_size
            .min(MAX_MQTT_PACKET_SIZE)
            .saturating_mul(2)
    }
}

#[derive(Debug, Clone)]
pub struct RelayConfig {
    pub listen: SocketAddr,
    /// MQTT over TLS for IoT Hub device SDKs, whose port is fixed at 8883.
    /// `None` turns it off. `relay serve` defaults to `0.0.0.0:8883`; a
    /// relay run in-process (the echo demo, tests) opts in explicitly so it
    /// never competes for the well-known port.
    pub mqtt_listen: Option<SocketAddr>,
    /// Listener for `/metrics`, `/health`, the admin API and the console
    /// (`--admin-listen`); `None` (the default) turns it off. Never on the
    /// internet.
    pub admin_listen: Option<SocketAddr>,
    /// Serve the admin listener over TLS with the main listener's
    /// certificate (`--admin-tls`) instead of plain HTTP.
    pub admin_tls: bool,
    pub data_dir: PathBuf,
    /// Base URL of the streaming endpoint handed to clients (`wss://host:port`).
    /// When unset, each side gets the host it used to reach this relay.
    pub public_url: Option<String>,
    pub tls: TlsMode,
    /// The hub name in streaming URLs (`/bridges/{hub}/…`).
    pub hub_name: String,
    pub limits: Limits,
    /// Join a cluster through NATS (`--cluster`); `None` serves alone from
    /// the SQLite registry in the data dir.
    pub cluster: Option<crate::cluster::ClusterConfig>,
    /// Balancers and reverse proxies whose PROXY headers and
    /// `X-Forwarded-*` headers say who the client is (`--trusted-proxy`);
    /// empty: nobody's.
    pub trusted_proxies: crate::trusted_proxies::TrustedProxies,
    /// The audit log (`--audit-log`); `None`: no audit log.
    pub audit: Option<crate::audit::AuditConfig>,
}

impl RelayConfig {
    pub fn new(listen: SocketAddr, data_dir: PathBuf) -> Self {
        Self {
            listen,
            mqtt_listen: None,
            admin_listen: None,
            admin_tls: false,
            data_dir,
            public_url: None,
            tls: TlsMode::SelfSigned,
            hub_name: "devstreams".into(),
            limits: Limits::default(),
            cluster: None,
            trusted_proxies: crate::trusted_proxies::TrustedProxies::default(),
            audit: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mqtt_websocket_message_size_is_twice_the_packet_and_never_overflows() {
        let mut limits = Limits::default();
        assert_eq!(
            limits.mqtt_websocket_message_size(),
            2 * limits.max_mqtt_packet_size
        );
        limits.max_mqtt_packet_size = MAX_MQTT_PACKET_SIZE;
        assert_eq!(
            limits.mqtt_websocket_message_size(),
            2 * MAX_MQTT_PACKET_SIZE
        );
        limits.max_mqtt_packet_size = usize::MAX;
        assert_eq!(
            limits.mqtt_websocket_message_size(),
            2 * MAX_MQTT_PACKET_SIZE
        );
    }
}
