//! WebSocket settings and the client side of the WebSocket handshake.
//!
//! Both the MQTT control channel and data streams ride on WebSockets. Sizes
//! are bounded here: a peer can never make us buffer more than
//! `max_message_size` for one message, and the read buffer is kept small so
//! thousands of idle streams cost little memory.

use std::time::Duration;

use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
pub use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
pub use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::transport::{ConnectError, Dialer, NetworkStream};

/// Largest WebSocket message accepted by default (PROTOCOL.md leaves the
/// size to us; our proxies send at most [`crate::pump::DEFAULT_READ_CHUNK`]).
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 1024 * 1024;

/// Bytes read from the socket at a time. The WebSocket layer allocates this
/// much per socket up front and keeps it while the socket is idle, so it is
/// small: 10,000 idle streams hold 20,000 relay sockets. A larger frame gets
/// a buffer of its own size while it is read, so bulk transfers still move
/// whole frames; measured in BENCHMARKS.md.
pub const READ_BUFFER_SIZE: usize = 4 * 1024;

/// A client WebSocket to the relay.
pub type ClientWebSocket = WebSocketStream<NetworkStream>;

/// WebSocket settings with every size bounded.
pub fn config(max_message_size: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER_SIZE)
        .write_buffer_size(0)
        .max_write_buffer_size(max_message_size.saturating_mul(2).max(READ_BUFFER_SIZE * 4))
        .max_message_size(Some(max_message_size))
        .max_frame_size(Some(max_message_size))
}

#[derive(Debug, thiserror::Error)]
pub enum WebSocketConnectError {
    #[error("URL {0:?} is not a ws:// or wss:// URL with a host")]
    BadUrl(String),
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("the relay refused the WebSocket: HTTP {status}{detail}")]
    Refused { status: u16, detail: String },
    #[error("WebSocket handshake failed: {0}")]
    Handshake(String),
    #[error("WebSocket handshake took longer than {0:?}")]
    Timeout(Duration),
}

/// What a client needs to open a WebSocket to the relay.
pub struct WebSocketRequest<'a> {
    pub url: &'a str,
    pub authorization: Option<&'a str>,
    pub subprotocol: Option<&'a str>,
    pub max_message_size: usize,
    pub timeout: Duration,
}

/// Dials (through the dialer's proxy, if any), does TLS for `wss://`, and
/// completes the WebSocket handshake. `dialer` is a [`Dialer`] or a bare
/// TLS configuration (then the dial is direct).
pub async fn connect(
    request: WebSocketRequest<'_>,
    dialer: impl Into<Dialer>,
) -> Result<ClientWebSocket, WebSocketConnectError> {
    connect_with_headers(request, &[], dialer).await
}

/// [`connect`], with extra request headers (devstreams' own, such as
/// [`crate::headers::RESUME`]).
pub async fn connect_with_headers(
    request: WebSocketRequest<'_>,
    extra_headers: &[(&'static str, &str)],
    dialer: impl Into<Dialer>,
) -> Result<ClientWebSocket, WebSocketConnectError> {
    handshake(request, extra_headers, &dialer.into()).await
}

async fn handshake(
    request: WebSocketRequest<'_>,
    extra_headers: &[(&'static str, &str)],
    dialer: &Dialer,
) -> Result<ClientWebSocket, WebSocketConnectError> {
    let bad_url = || WebSocketConnectError::BadUrl(request.url.to_string());
    let (secure, rest) = if let Some(rest) = request.url.strip_prefix("wss://") {
        (true, rest)
    } else if let Some(rest) = request.url.strip_prefix("ws://") {
        (false, rest)
    } else {
        return Err(bad_url());
    };
    let authority = rest.split('/').next().unwrap_or_default();
    let (host, port) = crate::connection_string::split_host_port(authority);
    if host.is_empty() {
        return Err(bad_url());
    }
    let port = port.unwrap_or(if secure { 443 } else { 80 });
    let mut http_request = request.url.into_client_request().map_err(|_| bad_url())?;
    let headers = http_request.headers_mut();
    if let Some(authorization) = request.authorization {
        let value = HeaderValue::from_str(authorization).map_err(|_| {
            WebSocketConnectError::Handshake("authorization is not a valid header value".into())
        })?;
        headers.insert("authorization", value);
    }
    for (name, value) in extra_headers {
        let value = HeaderValue::from_str(value).map_err(|_| {
            WebSocketConnectError::Handshake(format!("{name} is not a valid header value"))
        })?;
        headers.insert(*name, value);
    }
    if let Some(subprotocol) = request.subprotocol {
        headers.insert(
            "sec-websocket-protocol",
            HeaderValue::from_str(subprotocol).map_err(|_| bad_url())?,
        );
    }
    let handshake = async {
        let stream = dialer.connect(host, port, secure, request.timeout).await?;
        tokio_tungstenite::client_async_with_config(
            http_request,
            stream,
            Some(config(request.max_message_size)),
        )
        .await
        .map(|(socket, _response)| socket)
        .map_err(|error| match error {
            tokio_tungstenite::tungstenite::Error::Http(response) => {
                let detail = response
                    .body()
                    .as_ref()
                    .map(|body| {
                        format!(
                            ": {}",
                            String::from_utf8_lossy(&body[..body.len().min(300)])
                        )
                    })
                    .unwrap_or_default();
                WebSocketConnectError::Refused {
                    status: response.status().as_u16(),
                    detail,
                }
            }
            other => WebSocketConnectError::Handshake(other.to_string()),
        })
    };
    tokio::time::timeout(request.timeout, handshake)
        .await
        .map_err(|_| WebSocketConnectError::Timeout(request.timeout))?
}
