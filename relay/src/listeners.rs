//! The accept loop shared by the main and MQTT listeners, the connection
//! caps (`--max-connections`, `--max-connections-per-source`), and the
//! binding of every listener (dual-stack for `[::]`).
//!
//! A connection's place under both caps is a [`ConnectionGuard`]. Its place
//! under the global cap is taken before anything else happens on the socket
//! and released only when the last task using the socket ends. That matters
//! for WebSockets: hyper finishes serving an HTTP connection as soon as it
//! hands the socket to an upgrade, so a slot released there would leave
//! every MQTT-over-WebSocket control channel and every stream socket outside
//! the caps. The guard is shared (`Arc`) and moves into the upgraded task
//! instead.
//!
//! Its place under the per-source cap is charged to the *client*, which is
//! not always the TCP peer (see [`crate::trusted_proxies`]): from an
//! untrusted peer it is the peer, charged at accept; from a trusted
//! balancer that sends a PROXY header, the client the header names, charged
//! once the header is read; from a trusted proxy that sends none (nginx,
//! which names the client per request in `X-Forwarded-For`), the forwarded
//! client of the request that upgrades the connection to a WebSocket —
//! the long-lived sockets — see [`ConnectionGuard::charge_source`].

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use framing::mqtt::{ByteTransport, MqttConnection};
use framing::transport::{configure_socket, NetworkStream};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

use crate::control;
use crate::http_service::serve_http;
use crate::proxy_protocol::{self, ProxyHeader};
use crate::sources::{SourceSlot, Sources};
use crate::state::RelayState;
use crate::trusted_proxies::ClientOrigin;

/// How long the accept loop pauses after a failed accept (out of file
/// descriptors and similar), instead of spinning.
const ACCEPT_RETRY_DELAY: Duration = Duration::from_millis(50);
/// Connections waiting to be accepted (the same backlog tokio's own bind uses).
const LISTEN_BACKLOG: i32 = 1024;

/// Binds a listener on `address`. An IPv6 wildcard (`[::]:port`) also
/// accepts IPv4 (dual-stack) wherever the OS allows it, whatever the
/// system's default (`net.ipv6.bindv6only`) says; `[::1]`, IPv4 and
/// specific addresses bind as written.
pub(crate) fn bind_listener(address: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(address),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    // As tokio's bind: a restarted relay binds its port again at once.
    #[cfg(unix)]
    socket.set_reuse_address(true)?;
    if address.is_ipv6() && address.ip().is_unspecified() {
        if let Err(error) = socket.set_only_v6(false) {
            tracing::warn!(%address, %error, "cannot accept IPv4 on the IPv6 wildcard; listening on IPv6 only");
        }
    }
    socket.set_nonblocking(true)?;
    socket.bind(&address.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    TcpListener::from_std(socket.into())
}

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

/// One connection's place under the global and per-source caps, held by
/// every task that uses the connection's socket (see the module doc).
pub struct ConnectionGuard {
    open_connections: OpenConnections,
    /// Set once the connection's client is known (see the module doc).
    source: OnceLock<SourceSlot>,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.open_connections.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl ConnectionGuard {
    /// Charges this connection to `client`'s source, unless it already is
    /// charged to a source; `false` when that source holds too many.
    pub(crate) fn charge_source(&self, sources: &Arc<Sources>, client: IpAddr) -> bool {
        if self.source.get().is_some() {
            return true;
        }
        match sources.open(client) {
            Some(slot) => {
                // A slot set meanwhile by another request of this connection
                // wins; this one is released as it drops.
                let _ = self.source.set(slot);
                true
            }
            None => false,
        }
    }
}

/// Why a connection was refused a place.
#[derive(Debug, PartialEq, Eq)]
enum Refusal {
    TooManyConnections,
    TooManyFromThisAddress,
}

/// A place under the global cap, not yet charged to a source.
fn admit(
    state: &RelayState,
    open_connections: &OpenConnections,
) -> Result<Arc<ConnectionGuard>, Refusal> {
    let limit = state.config.limits.max_connections;
    if open_connections.0.fetch_add(1, Ordering::Relaxed) >= limit {
        open_connections.0.fetch_sub(1, Ordering::Relaxed);
        return Err(Refusal::TooManyConnections);
    }
    Ok(Arc::new(ConnectionGuard {
        open_connections: open_connections.clone(),
        source: OnceLock::new(),
    }))
}

fn log_refusal(state: &RelayState, refusal: Refusal, client: SocketAddr, endpoint: Endpoint) {
    match refusal {
        Refusal::TooManyConnections => {
            tracing::warn!(peer = %client, ?endpoint, limit = state.config.limits.max_connections, "connection refused: too many open connections");
        }
        Refusal::TooManyFromThisAddress => {
            tracing::warn!(
                peer = %client,
                ?endpoint,
                limit = state.config.limits.sources.max_connections_per_source,
                "connection refused: too many open connections from this address"
            );
        }
    }
}

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

/// Accepts connections until shutdown.
pub(crate) async fn accept_loop(
    state: Arc<RelayState>,
    listener: TcpListener,
    acceptor: Option<TlsAcceptor>,
    endpoint: Endpoint,
    open_connections: OpenConnections,
) {
    while let Some((tcp, peer)) = accept_until_stopped(&state, &listener).await {
        // An IPv4 client of a dual-stack listener is shown and counted as IPv4.
        let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
        let guard = match admit(&state, &open_connections) {
            Ok(guard) => guard,
            Err(refusal) => {
                log_refusal(&state, refusal, peer, endpoint);
                continue;
            }
        };
        let trusted = state.config.trusted_proxies.contains(peer.ip());
        if !trusted && !guard.charge_source(&state.sources, peer.ip()) {
            log_refusal(&state, Refusal::TooManyFromThisAddress, peer, endpoint);
            continue;
        }
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

/// A trusted peer's PROXY header, if it sent one: the client it names
/// (charged to its source), or the peer itself. `None`: the connection is
/// refused (a broken header, or the client's source is full).
async fn client_behind_proxy(
    state: &RelayState,
    tcp: &mut TcpStream,
    peer: SocketAddr,
    endpoint: Endpoint,
    guard: &ConnectionGuard,
) -> Option<SocketAddr> {
    let timeout = state.config.limits.header_read_timeout;
    match proxy_protocol::read_header(tcp, timeout).await {
        Ok(ProxyHeader::Client(client)) => {
            let client = SocketAddr::new(client.ip().to_canonical(), client.port());
            if !guard.charge_source(&state.sources, client.ip()) {
                log_refusal(state, Refusal::TooManyFromThisAddress, client, endpoint);
                return None;
            }
            tracing::debug!(%client, proxy = %peer, ?endpoint, "client named by a PROXY header");
            Some(client)
        }
        Ok(ProxyHeader::Absent) | Ok(ProxyHeader::NoAddress) => Some(peer),
        // A balancer's TCP health check: connect, close.
        Err(proxy_protocol::ProxyHeaderError::Closed) => None,
        Err(error) => {
            tracing::warn!(proxy = %peer, ?endpoint, %error, "connection from a trusted proxy dropped: unusable PROXY header");
            None
        }
    }
}

/// The PROXY header of a trusted peer, TLS with its deadline, then the
/// endpoint. `guard` goes along to every task that outlives this one with
/// the socket (WebSocket upgrades).
async fn serve_connection(
    state: Arc<RelayState>,
    mut tcp: TcpStream,
    peer: SocketAddr,
    acceptor: Option<TlsAcceptor>,
    endpoint: Endpoint,
    guard: Arc<ConnectionGuard>,
) {
    configure_socket(&tcp);
    // The address the connection's bytes come from, as far as we can
    // tell: the TCP peer, or the client a trusted balancer names.
    let client = match state.config.trusted_proxies.contains(peer.ip()) {
        true => match client_behind_proxy(&state, &mut tcp, peer, endpoint, &guard).await {
            Some(client) => client,
            None => return,
        },
        false => peer,
    };
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
                    tracing::debug!(peer = %client, ?endpoint, %error, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(peer = %client, ?endpoint, "TLS handshake timed out");
                    return;
                }
            }
        }
    };
    match endpoint {
        Endpoint::Main => serve_http(state, stream, client, guard).await,
        Endpoint::Mqtt => serve_mqtt(state, stream, client, server_name).await,
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
    let host = match server_name.as_deref() {
        Some(name) => format!("{name}:{}", state.config.listen.port()),
        None => format!("localhost:{}", state.config.listen.port()),
    };
    let max_packet = state.config.limits.max_mqtt_packet_size;
    control::run_session(
        state,
        MqttConnection::new(ByteTransport(stream), max_packet),
        peer,
        ClientOrigin::host(Some(host)),
    )
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether this machine has IPv6 loopback; CI's must.
    fn ipv6_loopback() -> bool {
        if std::net::TcpListener::bind("[::1]:0").is_ok() {
            return true;
        }
        assert!(
            std::env::var("CI").map_or(true, |value| value != "true"),
            "CI has no IPv6 loopback (::1)"
        );
        eprintln!("SKIPPED: no IPv6 loopback (::1) on this machine");
        false
    }

    #[tokio::test]
    async fn the_ipv6_wildcard_also_accepts_ipv4() {
        if !ipv6_loopback() {
            return;
        }
        let listener = bind_listener("[::]:0".parse().unwrap()).expect("bind [::]:0");
        let port = listener.local_addr().expect("address").port();
        for address in ["127.0.0.1", "::1"] {
            let dialed = TcpStream::connect((address, port)).await;
            assert!(dialed.is_ok(), "{address}: {dialed:?}");
            let (_, peer) = listener.accept().await.expect("accepted");
            assert_eq!(peer.ip().to_canonical().to_string(), address);
        }
    }

    #[tokio::test]
    async fn ipv6_loopback_and_ipv4_bind_as_written() {
        if !ipv6_loopback() {
            return;
        }
        let listener = bind_listener("[::1]:0".parse().unwrap()).expect("bind [::1]:0");
        let port = listener.local_addr().expect("address").port();
        assert!(TcpStream::connect(("::1", port)).await.is_ok());
        assert!(TcpStream::connect(("127.0.0.1", port)).await.is_err());
        let listener = bind_listener("127.0.0.1:0".parse().unwrap()).expect("bind 127.0.0.1:0");
        assert!(listener.local_addr().expect("address").is_ipv4());
    }
}
