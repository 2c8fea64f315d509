//! device-proxy: the device side of devstreams.
//!
//! It keeps a control channel open to the relay and, for each stream request,
//! bridges the stream to one of the local TCP services the operator exposed
//! (sshd on 22 by default). `main.rs` only parses the command line; the
//! behaviour lives here so it can be exercised without spawning a process:
//!
//! - [`targets`]: which local services a request may reach;
//! - [`control`]: the control channel's dial / re-dial loop;
//! - [`backoff`]: how long to wait between dials;
//! - [`bridge`]: one stream, from decision to last byte;
//! - [`sessions`]: the live resumable sessions and the check a resume passes;
//! - process plumbing (signals, logs) comes from `framing::process`.
#![forbid(unsafe_code)]

pub use framing::backoff;
pub mod bridge;
pub mod control;
pub mod sessions;
pub mod targets;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use framing::proxy::ProxySettings;
use framing::{ConnectionString, DeviceOptions, Dialer};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::bridge::{ResumeSettings, StreamContext};
use crate::targets::{ExposedTargets, Target};

/// How long live streams get to wind down at shutdown.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Everything the command line decides. Not `Debug`: it holds the device key.
pub struct Settings {
    /// The device connection string as given (parsed by [`run`]).
    pub connection_string: String,
    /// The positional target, used when a request names none.
    pub target: Target,
    /// Further targets a request may name (`--allow`).
    pub allowed: Vec<Target>,
    /// Extra trusted CA certificate (PEM) for the relay.
    pub ca_cert: Option<PathBuf>,
    /// The proxy every dial to the relay takes (`--proxy`, HTTPS_PROXY, …).
    pub proxies: ProxySettings,
    /// MQTT keep-alive of the control channel.
    pub keep_alive: Duration,
    /// Longest wait between re-dials.
    pub max_backoff: Duration,
    /// Deadline for dialing a local target.
    pub target_connect_timeout: Duration,
    /// Most streams open at once; more are rejected.
    pub max_streams: usize,
    /// WebSocket pings on stream sockets; a relay silent for three
    /// intervals ends the stream. `None` turns them off.
    pub ping_interval: Option<Duration>,
    /// Resumable sessions; `None` turns them off (`--no-resume`).
    pub resume: Option<ResumeSettings>,
}

/// Runs until SIGINT or SIGTERM, then shuts down cleanly.
pub async fn run_until_signal(settings: Settings) -> anyhow::Result<()> {
    framing::process::run_until_signal(|shutdown| run(settings, shutdown))
        .await
        .context("cannot install the SIGINT/SIGTERM handlers")?
}

/// Checks the settings, then serves stream requests until `shutdown`.
/// Errors are startup errors (bad connection string, bad CA file); once
/// running, failures are logged and retried.
pub async fn run(settings: Settings, shutdown: CancellationToken) -> anyhow::Result<()> {
    let connection = ConnectionString::parse_device(&settings.connection_string)
        .context("invalid device connection string (first argument or DEVICE_CONNECTION_STRING)")?;
    let device_id = connection
        .device_id
        .clone()
        .context("the device connection string has no DeviceId")?;
    let tls = framing::tls::client_config(settings.ca_cert.as_deref())?;
    let dialer = Dialer::new(tls, settings.proxies);
    let targets = ExposedTargets::new(settings.target, settings.allowed);
    info!(
        device_id = %device_id,
        relay = %connection.host_name,
        route = %dialer.route(connection.host(), connection.port(), true),
        targets = %targets,
        max_streams = settings.max_streams,
        "device-proxy starting"
    );
    let options = DeviceOptions {
        keep_alive: settings.keep_alive,
        // A request past --max-streams is refused by the bridge anyway; up to
        // it, a burst arriving at once must wait its turn, not be refused.
        max_waiting_requests: settings.max_streams,
        ..DeviceOptions::default()
    };
    let context = Arc::new(StreamContext {
        device_id,
        targets,
        dialer,
        target_connect_timeout: settings.target_connect_timeout,
        stream_permits: Arc::new(Semaphore::new(settings.max_streams)),
        max_streams: settings.max_streams,
        ping_interval: settings.ping_interval,
        resume: settings.resume,
        sessions: Default::default(),
    });
    let tracker = TaskTracker::new();
    // Type=notify units: the settings are good and the dial loop starts;
    // the loop itself keeps the status line current (connected, retrying).
    framing::service_manager::ready(&format!("connecting to {}", connection.host_name));
    let _watchdog = framing::service_manager::Watchdog::start();
    control::run(
        &connection,
        &options,
        settings.max_backoff,
        context,
        &tracker,
        &shutdown,
    )
    .await;
    // The loop only returns on shutdown; make sure every stream hears it.
    framing::service_manager::stopping();
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
    info!("device-proxy stopped");
    Ok(())
}
