//! What every devstreams program must agree on: connection strings, SAS and
//! stream tokens, control-channel topics and MQTT transport, the proxies'
//! TCP-to-WebSocket pump and the close codes, and the small client API the
//! proxies and the echo sample are built on. No policy and no global state live here; the relay decides *whether*,
//! this crate only defines *how*.
// `unsafe` is allowed in one place only: `kernel_replay`'s `setsockopt`.
#![deny(unsafe_code)]

pub mod backoff;
pub mod config_file;
pub mod connection_string;
pub mod copy_tuning;
pub mod device_client;
pub mod headers;
pub mod identity;
pub mod kernel_replay;
pub mod local;
pub mod manuals;
pub mod mqtt;
pub mod process;
pub mod proxy;
pub mod pump;
pub mod same_task;
pub mod sas;
pub mod service_client;
pub mod service_manager;
pub mod session;
pub mod stream_token;
pub mod tls;
pub mod topics;
pub mod transport;
pub mod websocket;

pub use connection_string::ConnectionString;
pub use device_client::{DeviceClient, DeviceError, DeviceOptions};
/// The TLS library every client configuration here is built with.
pub use rustls;
pub use service_client::{CreateStreamError, ServiceClient, StreamInvitation, StreamOptions};
pub use topics::StreamRequest;
pub use transport::Dialer;

/// The stream id of a streaming URL (`wss://host/bridges/{hub}/{deviceId}/{streamId}`):
/// its last path segment. Logged so the relay's, the device's and the
/// service's lines for one stream can be matched.
pub fn stream_id_from_url(url: &str) -> &str {
    let path = url.split(['?', '#']).next().unwrap_or_default();
    path.rsplit('/').next().unwrap_or_default()
}

/// Opens the WebSocket of one side of a stream, presenting its token.
/// `dialer` is a [`transport::Dialer`] (with its proxy settings) or a bare
/// TLS configuration (direct).
pub async fn connect_stream(
    url: &str,
    authorization_token: &str,
    dialer: impl Into<transport::Dialer>,
) -> Result<websocket::ClientWebSocket, websocket::WebSocketConnectError> {
    connect_stream_with(url, authorization_token, false, dialer).await
}

/// [`connect_stream`]; `resumable` tells the relay (header
/// [`headers::RESUME`]) that this stream carries a resumable session, so a
/// draining relay closes it at once with [`pump::CLOSE_MOVE`].
pub async fn connect_stream_with(
    url: &str,
    authorization_token: &str,
    resumable: bool,
    dialer: impl Into<transport::Dialer>,
) -> Result<websocket::ClientWebSocket, websocket::WebSocketConnectError> {
    let bearer = format!("Bearer {authorization_token}");
    let extra: &[(&'static str, &str)] = if resumable {
        &[(headers::RESUME, "1")]
    } else {
        &[]
    };
    websocket::connect_with_headers(
        websocket::WebSocketRequest {
            url,
            authorization: Some(&bearer),
            subprotocol: None,
            max_message_size: websocket::DEFAULT_MAX_MESSAGE_SIZE,
            timeout: transport::DEFAULT_CONNECT_TIMEOUT,
        },
        extra,
        dialer,
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_id_is_the_last_path_segment() {
        assert_eq!(
            stream_id_from_url("wss://relay:8443/bridges/hub/MyDevice/0123abcd"),
            "0123abcd"
        );
        assert_eq!(
            stream_id_from_url("wss://relay/bridges/hub/MyDevice/42?x=1"),
            "42"
        );
        assert_eq!(stream_id_from_url(""), "");
    }

    /// Proxies spawn their pumps, so a non-`Send` pump would only fail to
    /// compile there; this never runs, it makes the check happen here.
    #[allow(dead_code)]
    fn pump_futures_are_send(tcp: tokio::net::TcpStream, first: websocket::ClientWebSocket) {
        fn assert_send<T: Send>(_: T) {}
        assert_send(pump::pump_tcp(tcp, first, pump::PumpOptions::default()));
    }
}
