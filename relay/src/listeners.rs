//! The accept loop shared by the main and MQTT listeners, and the
//! connection caps (`--max-connections`, `--max-connections-per-source`).
//!
//! A connection's place under both caps is a [`ConnectionGuard`]. It is
//! taken before anything else happens on the socket and released only when
//! the last task using the socket ends. That matters for WebSockets: hyper
//! finishes serving an HTTP connection as soon as it hands the socket to an
//! upgrade, so a slot released there would leave every MQTT-over-WebSocket
//! control channel and every stream socket outside the caps. The guard is
//! shared (`Arc`) and moves into the upgraded task instead.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use framing::mqtt::{ByteTransport, MqttConnection};
use framing::transport::{configure_socket, NetworkStream};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

use crate::control;
use crate::http_service::serve_http;
use crate::sources::SourceSlot;
use crate::state::RelayState;

/// How long the accept loop pauses after a failed accept (out of file
/// descriptors and similar), instead of spinning.
const ACCEPT_RETRY_DELAY: Duration = Duration::from_millis(50);

/// What a listener serves once TLS is done.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Endpoint {
    /// HTTP/1.1: REST, the streaming endpoint, MQTT over WebSocket.
    Main,
    /// MQTT 3.1.1 straight on the TLS stream (IoT Hub's port 8883).
    Mqtt,
}

/// Open connections on all listeners together; shared by the listeners
/// because they share the process's file descriptors.
#[derive(Clone, Default)]
pub(crate) struct OpenConnections(Arc<AtomicUsize>);

/// One connection's place under the global and per-address caps, held by
/// every task that uses the connection's socket (see the module doc).
pub struct ConnectionGuard {
    open_connections: OpenConnections,
    _source: SourceSlot,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.open_connections.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Why a connection was refused a place.
#[derive(Debug, PartialEq, Eq)]
enum Refusal {
    TooManyConnections,
    TooManyFromThisAddress,
}

/// A place for a connection from `peer`, or why there is none.
fn admit(
    state: &RelayState,
    open_connections: &OpenConnections,
    peer: SocketAddr,
) -> Result<Arc<ConnectionGuard>, Refusal> {
    let limit = state.config.limits.max_connections;
    if open_connections.0.fetch_add(1, Ordering::Relaxed) >= limit {
        open_connections.0.fetch_sub(1, Ordering::Relaxed);
        return Err(Refusal::TooManyConnections);
    }
    match state.sources.open(peer.ip()) {
        Some(source) => Ok(Arc::new(ConnectionGuard {
            open_connections: open_connections.clone(),
            _source: source,
        })),
        None => {
            open_connections.0.fetch_sub(1, Ordering::Relaxed);
            Err(Refusal::TooManyFromThisAddress)
        }
    }
}

/// Accepts connections until shutdown.
/// The next connection on `listener`, or `None` once the relay stops
/// accepting. A failed accept (out of file descriptors, say) is logged and
/// retried after a pause rather than in a spin. Shared by every listener,
/// the admin one included.
pub(crate) async fn accept_until_stopped(
    state: &RelayState,
    listener: &TcpListener,
) -> Option<(TcpStream, SocketAddr)> {
    loop {
        tokio::select! {
            _ = state.stop_accepting.cancelled() => return None,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => return Some(accepted),
                Err(error) => {
                    let address = listener.local_addr().ok();
                    tracing::warn!(%error, ?address, "accept failed");
                    tokio::time::sleep(ACCEPT_RETRY_DELAY).await;
                }
            },
        }
    }
}

pub(crate) async fn accept_loop(
    state: Arc<RelayState>,
    listener: TcpListener,
    acceptor: Option<TlsAcceptor>,
    endpoint: Endpoint,
    open_connections: OpenConnections,
) {
    while let Some((tcp, peer)) = accept_until_stopped(&state, &listener).await {
        let guard = match admit(&state, &open_connections, peer) {
            Ok(guard) => guard,
            Err(Refusal::TooManyConnections) => {
                tracing::warn!(%peer, ?endpoint, limit = state.config.limits.max_connections, "connection refused: too many open connections");
                continue;
            }
            Err(Refusal::TooManyFromThisAddress) => {
                tracing::warn!(
                    %peer,
                    ?endpoint,
                    limit = state.config.limits.sources.max_connections_per_source,
                    "connection refused: too many open connections from this address"
                );
                continue;
            }
        };
        state.tasks.spawn(serve_connection(
            state.clone(),
            tcp,
            peer,
            acceptor.clone(),
            endpoint,
            guard,
        ));
    }
}

/// TLS with its deadline, then the endpoint. `guard` goes along to every
/// task that outlives this one with the socket (WebSocket upgrades).
async fn serve_connection(
    state: Arc<RelayState>,
    tcp: TcpStream,
    peer: SocketAddr,
    acceptor: Option<TlsAcceptor>,
    endpoint: Endpoint,
    guard: Arc<ConnectionGuard>,
) {
    configure_socket(&tcp);
    let limits = &state.config.limits;
    let (stream, server_name) = match acceptor {
        None => (NetworkStream::Plain(tcp), None),
        Some(acceptor) => {
            match tokio::time::timeout(limits.tls_handshake_timeout, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => {
                    let server_name = stream.get_ref().1.server_name().map(str::to_string);
                    (
                        NetworkStream::Tls(Box::new(tokio_rustls::TlsStream::Server(stream))),
                        server_name,
                    )
                }
                Ok(Err(error)) => {
                    tracing::debug!(%peer, ?endpoint, %error, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, ?endpoint, "TLS handshake timed out");
                    return;
                }
            }
        }
    };
    match endpoint {
        Endpoint::Main => serve_http(state, stream, peer, guard).await,
        Endpoint::Mqtt => serve_mqtt(state, stream, peer, server_name).await,
    }
}

/// MQTT on the TLS stream itself. The device never told us an HTTP `Host`,
/// so its streaming URL names the host it asked for in TLS (SNI) and the
/// main listener's port, where the streaming endpoint lives.
async fn serve_mqtt(
    state: Arc<RelayState>,
    stream: NetworkStream,
    peer: SocketAddr,
    server_name: Option<String>,
) {
    let host = format!(
        "{}:{}",
        server_name.as_deref().unwrap_or("localhost"),
        state.config.listen.port()
    );
    let max_packet = state.config.limits.max_mqtt_packet_size;
    control::run_session(
        state,
        MqttConnection::new(ByteTransport(stream), max_packet),
        peer,
        Some(host),
    )
    .await;
}
