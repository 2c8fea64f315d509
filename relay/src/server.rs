//! The listeners: the main one (TLS, HTTP/1.1, routing to the endpoints) and
//! MQTT over TLS on 8883 for IoT Hub device SDKs, plus the background duties
//! of a serving relay (expiring unpaired streams, noticing removed devices).
//! Both listeners share one accept loop, so the TLS handshake deadline and
//! the connection limit are the same code for both; only what runs after
//! TLS differs. [`RunningRelay`] is the handle that owns all of it and shuts
//! it down in order: stop accepting, let streams drain, then cut.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use framing::mqtt::{ByteTransport, MqttConnection};
use framing::stream_token::StreamTokenKey;
use framing::transport::{configure_socket, NetworkStream};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::WebSocketStream;

use crate::config::{RelayConfig, TlsMode};
use crate::data_dir::{DataDir, HOST_NAME_SETTING, SERVICE_POLICY};
use crate::http_util::{
    error_code, error_response, offered_spelling, switching_protocols, websocket_accept_key, Body,
};
use crate::registry::{self, SnapshotRegistry, SqliteSource};
use crate::routing::{parse_route, Route};
use crate::state::RelayState;
use crate::{control, streaming, streams_api};

/// How often unpaired streams are expired.
const HOUSEKEEPING_INTERVAL: Duration = Duration::from_secs(1);

/// A serving relay.
pub struct RunningRelay {
    pub local_address: SocketAddr,
    /// The MQTT-over-TLS listener's address, when it is on.
    pub mqtt_address: Option<SocketAddr>,
    /// `host:port` that clients should use (connection strings' HostName).
    pub host_name: String,
    pub service_connection_string: String,
    /// The certificate clients pass as `--ca-cert`, when self-signed.
    pub certificate_path: Option<PathBuf>,
    /// Whether the listener speaks TLS.
    pub tls: bool,
    state: Arc<RelayState>,
}

impl RunningRelay {
    /// Stops accepting, closes control channels, lets live streams finish
    /// until the drain deadline, then cuts what is left.
    pub async fn shutdown(self) {
        let drain = self.state.config.limits.drain_timeout;
        self.state.stop_accepting.cancel();
        self.state.tasks.close();
        if tokio::time::timeout(drain, self.state.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                ?drain,
                "drain deadline passed; cutting the remaining streams"
            );
            self.state.stop_streams.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(5), self.state.tasks.wait()).await;
        }
    }

    pub fn active_streams(&self) -> usize {
        self.state.admission.active_streams()
    }
}

fn system_host_name() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|name| name.trim().to_string())
        .filter(|n| !n.is_empty())
}

/// `host` of a `wss://host:port/...` URL.
fn url_authority(url: &str) -> Option<&str> {
    let rest = url.split_once("://").map(|(_, rest)| rest)?;
    rest.split('/')
        .next()
        .filter(|authority| !authority.is_empty())
}

/// The TLS acceptors of both listeners, built from one certificate.
struct Acceptors {
    main: TlsAcceptor,
    mqtt: TlsAcceptor,
    /// The self-signed certificate clients must trust, when generated.
    generated_certificate: Option<PathBuf>,
}

fn tls_acceptors(
    config: &RelayConfig,
    data_dir: &DataDir,
    host_name: &str,
) -> anyhow::Result<Option<Acceptors>> {
    let (certificate_path, key_path, generated) = match &config.tls {
        TlsMode::Disabled => return Ok(None),
        TlsMode::Files {
            certificate,
            private_key,
        } => (certificate.clone(), private_key.clone(), false),
        TlsMode::SelfSigned => {
            let mut names = vec![
                "localhost".to_string(),
                "127.0.0.1".to_string(),
                "::1".to_string(),
            ];
            names.extend(system_host_name());
            names.push(
                framing::connection_string::split_host_port(host_name)
                    .0
                    .to_string(),
            );
            names.sort();
            names.dedup();
            data_dir.ensure_self_signed_certificate(&names)?;
            (
                data_dir.certificate_path(),
                data_dir.private_key_path(),
                true,
            )
        }
    };
    let certificates = CertificateDer::pem_file_iter(&certificate_path)
        .and_then(|certificates| certificates.collect::<Result<Vec<_>, _>>())
        .with_context(|| {
            format!(
                "cannot read the TLS certificate {}",
                certificate_path.display()
            )
        })?;
    if certificates.is_empty() {
        anyhow::bail!("{} holds no PEM certificate", certificate_path.display());
    }
    let key = PrivateKeyDer::from_pem_file(&key_path)
        .with_context(|| format!("cannot read the TLS private key {}", key_path.display()))?;
    let mqtt_config = rustls::ServerConfig::builder_with_provider(framing::tls::crypto_provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certificates, key)
        .context("the TLS certificate and private key do not match or are not supported")?;
    // MQTT clients differ in what ALPN they offer (nothing, "mqtt", ...); with
    // no protocol configured the server negotiates none and refuses nobody.
    let mut main_config = mqtt_config.clone();
    main_config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Some(Acceptors {
        main: TlsAcceptor::from(Arc::new(main_config)),
        mqtt: TlsAcceptor::from(Arc::new(mqtt_config)),
        generated_certificate: generated.then_some(certificate_path),
    }))
}

/// Opens the data dir, binds the listener and starts serving.
pub async fn start(config: RelayConfig) -> anyhow::Result<RunningRelay> {
    let data_dir = DataDir::create_or_open(&config.data_dir)?;
    let registry = data_dir.registry()?;
    let secret = data_dir.stream_token_secret()?;
    let listener = TcpListener::bind(config.listen).await.with_context(|| {
        format!(
            "cannot listen on {}: choose another --listen address or stop the program that uses it",
            config.listen
        )
    })?;
    let local_address = listener.local_addr()?;
    let mqtt_listener = match config.mqtt_listen {
        None => None,
        Some(address) => Some(TcpListener::bind(address).await.with_context(|| {
            format!(
                "cannot listen for MQTT on {address}: choose another --mqtt-listen address, stop the program that uses it, \
                 or turn the MQTT listener off with --no-mqtt"
            )
        })?),
    };
    let mqtt_address = match &mqtt_listener {
        Some(listener) => Some(listener.local_addr()?),
        None => None,
    };
    let host_name = match config.public_url.as_deref().and_then(url_authority) {
        Some(authority) => authority.to_string(),
        None if local_address.ip().is_loopback() || local_address.ip().is_unspecified() => {
            format!("localhost:{}", local_address.port())
        }
        None => local_address.to_string(),
    };
    registry.set_setting(HOST_NAME_SETTING, &host_name)?;
    let policy = registry.ensure_policy(SERVICE_POLICY)?;
    let service_connection_string =
        framing::ConnectionString::for_policy(&host_name, SERVICE_POLICY, &policy.primary_key)?
            .to_secret_string();
    let acceptors = tls_acceptors(&config, &data_dir, &host_name)?;
    let certificate_path = acceptors
        .as_ref()
        .and_then(|acceptors| acceptors.generated_certificate.clone());
    let mut config = config;
    config.listen = local_address;
    config.mqtt_listen = mqtt_address;
    // Loaded after this process's own writes above, so it holds them.
    let (registry_source, snapshot) =
        SqliteSource::open(&data_dir.registry_path()).context("cannot load the registry")?;
    let snapshot_registry = Arc::new(SnapshotRegistry::new(snapshot));
    let state = RelayState::new(
        config,
        snapshot_registry.clone(),
        StreamTokenKey::from_secret(&secret),
    );
    let tls = acceptors.is_some();
    let open_connections = Arc::new(AtomicUsize::new(0));
    let (main_acceptor, mqtt_acceptor) = match acceptors {
        Some(acceptors) => (Some(acceptors.main), Some(acceptors.mqtt)),
        None => (None, None),
    };
    state.tasks.spawn(accept_loop(
        state.clone(),
        listener,
        main_acceptor,
        Endpoint::Main,
        open_connections.clone(),
    ));
    if let Some(mqtt_listener) = mqtt_listener {
        state.tasks.spawn(accept_loop(
            state.clone(),
            mqtt_listener,
            mqtt_acceptor,
            Endpoint::Mqtt,
            open_connections,
        ));
    }
    state.tasks.spawn(housekeeping(state.clone()));
    state.tasks.spawn(registry::follow(
        state.clone(),
        snapshot_registry,
        registry_source,
    ));
    tracing::info!(%local_address, mqtt_address = ?mqtt_address, tls, "relay serving");
    Ok(RunningRelay {
        local_address,
        mqtt_address,
        host_name,
        service_connection_string,
        certificate_path,
        tls,
        state,
    })
}

/// Counts open connections; the slot is released when the guard drops.
struct ConnectionSlot(Arc<AtomicUsize>);

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What a listener serves once TLS is done.
#[derive(Debug, Clone, Copy)]
enum Endpoint {
    /// HTTP/1.1: REST, the streaming endpoint, MQTT over WebSocket.
    Main,
    /// MQTT 3.1.1 straight on the TLS stream (IoT Hub's port 8883).
    Mqtt,
}

/// Accepts connections until shutdown; `open_connections` is shared by all
/// listeners, because they share the process's file descriptors.
async fn accept_loop(
    state: Arc<RelayState>,
    listener: TcpListener,
    acceptor: Option<TlsAcceptor>,
    endpoint: Endpoint,
    open_connections: Arc<AtomicUsize>,
) {
    loop {
        let (tcp, peer) = tokio::select! {
            _ = state.stop_accepting.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and similar: back off instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        if open_connections.fetch_add(1, Ordering::Relaxed) >= state.config.limits.max_connections {
            open_connections.fetch_sub(1, Ordering::Relaxed);
            tracing::warn!(%peer, ?endpoint, limit = state.config.limits.max_connections, "connection refused: too many open connections");
            continue;
        }
        let slot = ConnectionSlot(open_connections.clone());
        let Some(source_slot) = state.sources.open(peer.ip()) else {
            tracing::warn!(
                %peer,
                ?endpoint,
                limit = state.config.limits.sources.max_connections_per_source,
                "connection refused: too many open connections from this address"
            );
            continue;
        };
        let connection =
            serve_connection(state.clone(), tcp, peer, acceptor.clone(), endpoint, slot);
        state.tasks.spawn(async move {
            connection.await;
            drop(source_slot);
        });
    }
}

/// TLS with its deadline, then the endpoint; the slot is held throughout.
async fn serve_connection(
    state: Arc<RelayState>,
    tcp: TcpStream,
    peer: SocketAddr,
    acceptor: Option<TlsAcceptor>,
    endpoint: Endpoint,
    slot: ConnectionSlot,
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
        Endpoint::Main => serve_http(state, stream, peer).await,
        Endpoint::Mqtt => serve_mqtt(state, stream, peer, server_name).await,
    }
    drop(slot);
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

async fn serve_http(state: Arc<RelayState>, stream: NetworkStream, peer: SocketAddr) {
    let limits = &state.config.limits;
    let service_state = state.clone();
    let service = hyper::service::service_fn(move |request| {
        let state = service_state.clone();
        async move { Ok::<_, Infallible>(route(state, request, peer).await) }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_size.max(8192));
    let connection = builder
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    tokio::pin!(connection);
    tokio::select! {
        result = connection.as_mut() => {
            if let Err(error) = result {
                tracing::debug!(%peer, %error, "HTTP connection ended with an error");
            }
        }
        _ = state.stop_accepting.cancelled() => {
            connection.as_mut().graceful_shutdown();
            tokio::select! {
                _ = connection.as_mut() => {}
                _ = state.stop_streams.cancelled() => {}
            }
        }
    }
}

fn not_found(message: &str) -> Response<Body> {
    error_response(
        StatusCode::NOT_FOUND,
        error_code(StatusCode::NOT_FOUND, 0),
        message,
    )
}

async fn route(
    state: Arc<RelayState>,
    mut request: Request<Incoming>,
    peer: SocketAddr,
) -> Response<Body> {
    let path = request.uri().path().to_string();
    let method = request.method().clone();
    match parse_route(&method, &path) {
        Route::CreateStream {
            device_id,
            module_id,
            stream_name,
        } => {
            let create = streams_api::CreateStream {
                device_id,
                module_id,
                stream_name,
                headers: std::mem::take(request.headers_mut()),
                peer,
            };
            streams_api::create(state, create).await
        }
        Route::BadPath(reason) => error_response(
            StatusCode::BAD_REQUEST,
            error_code(StatusCode::BAD_REQUEST, 4),
            reason,
        ),
        Route::ControlChannel => control_upgrade(&state, request, peer),
        Route::Streaming {
            device_id,
            stream_id,
        } => {
            let on_upgrade = hyper::upgrade::on(&mut request);
            streaming::upgrade(
                &state,
                request.headers(),
                on_upgrade,
                device_id,
                stream_id,
                peer,
            )
        }
        Route::UnknownStream => not_found("no such stream"),
        Route::Health => Response::new(Body::from("ok\n")),
        Route::Metrics => {
            let gauges = [
                (
                    "devstreams_streams_active",
                    "Streams created and not yet ended.",
                    state.admission.active_streams() as u64,
                ),
                (
                    "devstreams_streams_pending",
                    "Streams waiting for their sides to connect.",
                    state.pairing.pending_count() as u64,
                ),
                (
                    "devstreams_devices_connected",
                    "Devices with a control channel.",
                    state.presence.connected_count() as u64,
                ),
                (
                    "devstreams_tasks",
                    "Tasks the relay owns (connections, sessions, streams).",
                    state.tasks.len() as u64,
                ),
            ];
            let mut response = Response::new(Body::from(state.metrics.render(&gauges)));
            response.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            response
        }
        Route::NoEndpoint => not_found(&format!(
            "no endpoint {method} {path}: see PROTOCOL.md for the relay's paths"
        )),
    }
}

/// MQTT over WebSocket (`/$iothub/websocket`, subprotocol `mqtt`).
fn control_upgrade(
    state: &Arc<RelayState>,
    mut request: Request<Incoming>,
    peer: SocketAddr,
) -> Response<Body> {
    let accept_key = match websocket_accept_key(request.headers()) {
        Ok(key) => key,
        Err(reason) => {
            return error_response(
                StatusCode::BAD_REQUEST,
                error_code(StatusCode::BAD_REQUEST, 3),
                reason,
            )
        }
    };
    let subprotocol = offered_spelling(
        request.headers(),
        http::header::SEC_WEBSOCKET_PROTOCOL,
        "mqtt",
    );
    let host = request
        .headers()
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string);
    let on_upgrade = hyper::upgrade::on(&mut request);
    let task_state = state.clone();
    state.tasks.spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let max_packet = task_state.config.limits.max_mqtt_packet_size;
        let config = framing::websocket::config(max_packet * 2);
        let socket =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(config))
                .await;
        control::run_session(
            task_state,
            MqttConnection::new(socket, max_packet),
            peer,
            host,
        )
        .await;
    });
    switching_protocols(&accept_key, subprotocol.as_deref())
}

/// Expires unpaired streams. (Registry changes are followed by
/// `registry::follow`.)
async fn housekeeping(state: Arc<RelayState>) {
    let mut interval = tokio::time::interval(HOUSEKEEPING_INTERVAL);
    loop {
        tokio::select! {
            _ = state.stop_accepting.cancelled() => return,
            _ = interval.tick() => {}
        }
        let expired = state.pairing.sweep(Instant::now());
        if expired > 0 {
            tracing::debug!(expired, "expired unpaired streams");
        }
    }
}
