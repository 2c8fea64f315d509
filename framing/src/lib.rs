//! What every devstreams program must agree on: connection strings, SAS and
//! stream tokens, control-channel topics and MQTT transport, the data-plane
//! pump, and the small client API the proxies and the echo sample are built
//! on. No policy and no global state live here; the relay decides *whether*,
//! this crate only defines *how*.
#![forbid(unsafe_code)]

pub mod connection_string;
pub mod device_client;
pub mod headers;
pub mod mqtt;
pub mod pump;
pub mod sas;
pub mod service_client;
pub mod stream_token;
pub mod tls;
pub mod topics;
pub mod transport;
pub mod websocket;

pub use connection_string::ConnectionString;
pub use device_client::{DeviceClient, DeviceError, DeviceOptions};
pub use service_client::{CreateStreamError, ServiceClient, StreamInvitation, StreamOptions};
pub use topics::StreamRequest;

/// Opens the WebSocket of one side of a stream, presenting its token.
pub async fn connect_stream(
    url: &str,
    authorization_token: &str,
    tls: &std::sync::Arc<rustls::ClientConfig>,
) -> Result<websocket::ClientWebSocket, websocket::WebSocketConnectError> {
    let bearer = format!("Bearer {authorization_token}");
    websocket::connect(
        websocket::WebSocketRequest {
            url,
            authorization: Some(&bearer),
            subprotocol: None,
            max_message_size: websocket::DEFAULT_MAX_MESSAGE_SIZE,
            timeout: transport::DEFAULT_CONNECT_TIMEOUT,
        },
        tls,
    )
    .await
}
