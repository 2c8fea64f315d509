//! service-proxy: the service side of devstreams.
//!
//! It listens on a local port and turns every accepted TCP connection into
//! its own stream to one device, so `ssh -p 2222 localhost` reaches the
//! device's sshd. `main.rs` only parses the command line; the behaviour
//! lives here so it can be exercised without spawning a process:
//!
//! - [`listener`]: the local port and its accept loop;
//! - [`connection`]: one local connection, one stream;
//! - [`failures`]: the one line that says why a stream failed;
//! - [`resume`]: a resumable session's start and its resumes;
//! - process plumbing (signals, logs) comes from `framing::process`.
#![forbid(unsafe_code)]

pub mod connection;
pub mod failures;
pub mod listener;
pub mod resume;

use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use framing::proxy::ProxySettings;
use framing::{ConnectionString, Dialer, ServiceClient, StreamOptions};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::connection::ConnectionContext;

/// How long live streams get to wind down at shutdown.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Everything the command line decides. Not `Debug`: it holds the policy key.
pub struct Settings {
    /// The service connection string as given (parsed by [`run`]).
    pub connection_string: String,
    pub device_id: String,
    /// Local address to listen on.
    pub bind: IpAddr,
    /// Local port; 0 picks a free one (the chosen one is printed).
    pub local_port: u16,
    /// Port on the device to ask for; `None` lets the device pick its default.
    pub target_port: Option<u16>,
    /// Extra trusted CA certificate (PEM) for the relay.
    pub ca_cert: Option<PathBuf>,
    /// The proxy every dial to the relay takes (`--proxy`, HTTPS_PROXY, …).
    pub proxies: ProxySettings,
    pub stream_name: String,
    /// How long the relay may wait for the device to be connected.
    pub connect_timeout: Duration,
    /// How long the relay may wait for the device's answer.
    pub response_timeout: Duration,
    /// Ask to carry TCP half-closes through the stream.
    pub half_close: bool,
    /// Most local connections served at once; more are closed at once.
    pub max_connections: usize,
    /// WebSocket pings on stream sockets; a relay silent for three
    /// intervals ends the stream. `None` turns them off.
    pub ping_interval: Option<Duration>,
    /// Resumable sessions; `None` turns them off (`--no-resume`).
    pub resume: Option<resume::ResumeSettings>,
}

/// Runs until SIGINT or SIGTERM, then shuts down cleanly.
pub async fn run_until_signal(settings: Settings) -> anyhow::Result<()> {
    framing::process::run_until_signal(|shutdown| run(settings, shutdown))
        .await
        .context("cannot install the SIGINT/SIGTERM handlers")?
}

/// Checks the settings, binds the port, prints `Listening on ADDRESS` on
/// stdout and serves connections until `shutdown`. Errors are startup errors;
/// once listening, failures are per connection and logged.
pub async fn run(settings: Settings, shutdown: CancellationToken) -> anyhow::Result<()> {
    let connection = ConnectionString::parse_service(&settings.connection_string).context(
        "invalid service connection string (first argument or SERVICE_CONNECTION_STRING)",
    )?;
    if settings.device_id.trim().is_empty() {
        anyhow::bail!(
            "the device id is empty: pass it as the second argument or set STREAMING_TARGET_DEVICE"
        );
    }
    framing::topics::validate_stream_name(&settings.stream_name).map_err(|problem| {
        anyhow::anyhow!(
            "invalid --stream-name {:?}: {problem}",
            settings.stream_name
        )
    })?;
    let tls = framing::tls::client_config(settings.ca_cert.as_deref())?;
    let dialer = Dialer::new(tls, settings.proxies);
    let listener = listener::bind(SocketAddr::new(settings.bind, settings.local_port))
        .await
        .map_err(anyhow::Error::msg)?;
    let local_address = listener
        .local_addr()
        .context("cannot read the address of the listening socket")?;
    announce(local_address);
    info!(
        device_id = %settings.device_id,
        relay = %connection.host_name,
        route = %dialer.route(connection.host(), connection.port(), true),
        listen = %local_address,
        stream_name = %settings.stream_name,
        target_port = settings.target_port,
        max_connections = settings.max_connections,
        "service-proxy listening"
    );
    let context = Arc::new(ConnectionContext {
        client: ServiceClient::new(connection, &dialer),
        dialer,
        device_id: settings.device_id,
        stream_name: settings.stream_name,
        stream_options: StreamOptions {
            connect_timeout: settings.connect_timeout,
            response_timeout: settings.response_timeout,
            target: settings.target_port.map(|port| port.to_string()),
            half_close: settings.half_close,
        },
        ping_interval: settings.ping_interval,
        resume: settings.resume,
    });
    let tracker = TaskTracker::new();
    listener::accept_loop(
        listener,
        settings.max_connections,
        context,
        &tracker,
        &shutdown,
    )
    .await;
    shutdown.cancel();
    tracker.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, tracker.wait())
        .await
        .is_err()
    {
        warn!(
            streams = tracker.len(),
            "some streams did not end within {SHUTDOWN_GRACE:?}; exiting anyway"
        );
    }
    info!("service-proxy stopped");
    Ok(())
}

/// The one stdout line scripts and tests wait for: the real address, which
/// matters when LOCAL_PORT is 0. Flushed at once, because stdout may be a
/// pipe. A closed stdout is no reason to stop proxying.
fn announce(local_address: SocketAddr) {
    let mut stdout = std::io::stdout().lock();
    if let Err(error) =
        writeln!(stdout, "Listening on {local_address}").and_then(|()| stdout.flush())
    {
        warn!(%error, "cannot print the listening address on stdout");
    }
}
