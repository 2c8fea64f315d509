//! service-proxy: the service side of devstreams.
//!
//! It listens on a local port and turns every accepted TCP connection into
//! its own stream to one device, so `ssh -p 2222 localhost` reaches the
//! device's sshd; with `--map` it listens on several ports, each for its own
//! device and port; with `--stdio` it carries one stream on its standard
//! input and output (an ssh ProxyCommand). `main.rs` only parses the
//! command line; the behaviour lives here so it can be exercised without
//! spawning a process:
//!
//! - [`listener`]: the local ports and their accept loops;
//! - [`connection`]: one local connection, one stream;
//! - [`stdio`]: `--stdio`, standard input and output as the one connection;
//! - [`failures`]: the one line that says why a stream failed;
//! - [`resume`]: a resumable session's start and its resumes;
//! - process plumbing (signals, logs) comes from `framing::process`.
#![forbid(unsafe_code)]

pub mod connection;
pub mod failures;
pub mod listener;
pub mod resume;
pub mod stdio;

use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use framing::proxy::ProxySettings;
use framing::{ConnectionString, Dialer, ServiceClient, StreamOptions};
use tokio::sync::Semaphore;
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
    /// WebSocket pings on stream sockets; a relay silent for three
    /// intervals ends the stream. `None` turns them off.
    pub ping_interval: Option<Duration>,
    /// Resumable sessions; `None` turns them off (`--no-resume`).
    pub resume: Option<resume::ResumeSettings>,
    /// Listening ports, or standard input and output.
    pub mode: Mode,
}

/// Where local connections come from.
pub enum Mode {
    /// Local TCP ports, one per [`Forward`].
    Listen {
        /// Local address to listen on.
        bind: IpAddr,
        forwards: Vec<Forward>,
        /// Name the device and port on each `Listening on` line (`--map`);
        /// the single-device form prints the bare address, as it always has.
        announce_targets: bool,
        /// Most local connections served at once, over all ports; more are
        /// closed at once.
        max_connections: usize,
    },
    /// One stream on standard input and output (`--stdio`).
    Stdio(Target),
}

/// A device and the port to ask it for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub device_id: String,
    /// `None` lets the device pick its default target.
    pub port: Option<u16>,
}

/// One local port and the device port it reaches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    /// 0 picks a free one (the chosen one is printed).
    pub local_port: u16,
    pub target: Target,
}

/// Runs until SIGINT or SIGTERM, then shuts down cleanly. With `--stdio`,
/// runs until the stream ends; a signal is then an error.
pub async fn run_until_signal(settings: Settings) -> anyhow::Result<()> {
    framing::process::run_until_signal(|shutdown| run(settings, shutdown))
        .await
        .context("cannot install the SIGINT/SIGTERM handlers")?
}

/// What every stream of this process shares, checked once at start.
struct Common {
    client: ServiceClient,
    /// TLS trust and proxy settings for every WebSocket to the relay.
    dialer: Dialer,
    relay: String,
    /// How the relay is reached: directly or through which proxy.
    route: String,
}

/// Checks the settings, then serves: binds the ports, prints one
/// `Listening on ADDRESS` line per port on stdout and serves connections
/// until `shutdown`; or carries standard input and output. Errors before
/// serving are startup errors; once listening, failures are per connection
/// and logged.
pub async fn run(settings: Settings, shutdown: CancellationToken) -> anyhow::Result<()> {
    let connection = ConnectionString::parse_service(&settings.connection_string).context(
        "invalid service connection string (first argument or SERVICE_CONNECTION_STRING)",
    )?;
    framing::topics::validate_stream_name(&settings.stream_name).map_err(|problem| {
        anyhow::anyhow!(
            "invalid --stream-name {:?}: {problem}",
            settings.stream_name
        )
    })?;
    let tls = framing::tls::client_config(settings.ca_cert.as_deref())?;
    let dialer = Dialer::new(tls, settings.proxies.clone());
    let common = Common {
        relay: connection.host_name.clone(),
        route: dialer
            .route(connection.host(), connection.port(), true)
            .to_string(),
        client: ServiceClient::new(connection, &dialer),
        dialer,
    };
    match &settings.mode {
        Mode::Stdio(target) => {
            check_device_id(&target.device_id)?;
            let context = context_for(&settings, &common, target);
            stdio::run(context, shutdown).await
        }
        Mode::Listen {
            bind,
            forwards,
            announce_targets,
            max_connections,
        } => {
            for forward in forwards {
                check_device_id(&forward.target.device_id)?;
            }
            listen(
                &settings,
                &common,
                *bind,
                forwards,
                *announce_targets,
                *max_connections,
                shutdown,
            )
            .await
        }
    }
}

fn check_device_id(device_id: &str) -> anyhow::Result<()> {
    if device_id.trim().is_empty() {
        anyhow::bail!(
            "the device id is empty: pass it as the second argument or set STREAMING_TARGET_DEVICE"
        );
    }
    framing::identity::validate_id(device_id)
        .map_err(|problem| anyhow::anyhow!("invalid device id {device_id:?}: {problem}"))
}

fn context_for(settings: &Settings, common: &Common, target: &Target) -> ConnectionContext {
    ConnectionContext {
        client: common.client.clone(),
        dialer: common.dialer.clone(),
        device_id: target.device_id.clone(),
        stream_name: settings.stream_name.clone(),
        stream_options: StreamOptions {
            connect_timeout: settings.connect_timeout,
            response_timeout: settings.response_timeout,
            target: target.port.map(|port| port.to_string()),
            half_close: settings.half_close,
        },
        ping_interval: settings.ping_interval,
        resume: settings.resume,
    }
}

/// Binds every port first (any failure is a startup error and nothing is
/// served), then serves them all until `shutdown`.
async fn listen(
    settings: &Settings,
    common: &Common,
    bind: IpAddr,
    forwards: &[Forward],
    announce_targets: bool,
    max_connections: usize,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut listeners = Vec::with_capacity(forwards.len());
    for forward in forwards {
        let listener = listener::bind(SocketAddr::new(bind, forward.local_port))
            .await
            .map_err(anyhow::Error::msg)?;
        let local_address = listener
            .local_addr()
            .context("cannot read the address of the listening socket")?;
        listeners.push((listener, local_address, forward));
    }
    let tracker = TaskTracker::new();
    let permits = Arc::new(Semaphore::new(max_connections));
    for (listener, local_address, forward) in listeners {
        announce(local_address, announce_targets.then_some(&forward.target));
        info!(
            device_id = %forward.target.device_id,
            relay = %common.relay,
            route = %common.route,
            listen = %local_address,
            stream_name = %settings.stream_name,
            target_port = forward.target.port,
            max_connections,
            "service-proxy listening"
        );
        let context = Arc::new(context_for(settings, common, &forward.target));
        let permits = permits.clone();
        let connections = tracker.clone();
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            listener::accept_loop(
                listener,
                permits,
                max_connections,
                context,
                &connections,
                &shutdown,
            )
            .await;
        });
    }
    shutdown.cancelled().await;
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

/// The one stdout line per port that scripts and tests wait for: the real
/// address, which matters when the port is 0, and with `--map` the device
/// and port it reaches. Flushed at once, because stdout may be a pipe. A
/// closed stdout is no reason to stop proxying.
fn announce(local_address: SocketAddr, target: Option<&Target>) {
    let reaches = match target {
        Some(Target {
            device_id,
            port: Some(port),
        }) => format!(" for {device_id}:{port}"),
        Some(Target {
            device_id,
            port: None,
        }) => format!(" for {device_id}"),
        None => String::new(),
    };
    let mut stdout = std::io::stdout().lock();
    if let Err(error) =
        writeln!(stdout, "Listening on {local_address}{reaches}").and_then(|()| stdout.flush())
    {
        warn!(%error, "cannot print the listening address on stdout");
    }
}
