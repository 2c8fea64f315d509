//! devstreams as a user runs it: `relay serve` with its self-signed
//! certificate (TLS on every relay leg), one registered device,
//! `device-proxy` exposing the target, `service-proxy` listening locally.
//!
//! The relay's admission limits are raised for the run: its defaults (500
//! stream creations per second and 200 concurrent streams per device, 1,024
//! connections per source address) exist to protect a production relay and
//! would otherwise be what the creation rate and idle-stream figures
//! measure, instead of the relay's capacity. The proxies' connection caps
//! are raised for the same reason.
//!
//! Resumable sessions are on by default; the same system with `--no-resume`
//! on both proxies is measured beside it, so their cost shows in one run.
//! The device-proxy re-dials with `--max-backoff 2` (instead of 30 s): its
//! backoff only starts over after a connection that lasted 60 s, so with the
//! default the restart-recovery measurement's 20 restarts a few seconds apart
//! would wait up to 30 s each. The relay keeps its address, so it can be
//! restarted on its data dir ([`RelayRestart`]).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;

use super::{Programs, Role, System, SystemKind, READY_TIMEOUT};
use crate::child::{run_to_completion, ChildProcess, Stdout};

/// The device id registered for the run.
pub(super) const DEVICE_ID: &str = "bench-device";

/// Concurrent streams allowed on every hop (above the 10,000 idle streams).
pub(super) const STREAM_CAPACITY: &str = "20000";

/// Creations per second allowed by the relay, global and per device.
pub(super) const CREATION_RATE_CAPACITY: &str = "1000000";

/// Connections the relay accepts, in all and from one address: every
/// connection of the run comes from 127.0.0.1, two per held stream.
pub(super) const CONNECTION_CAPACITY: &str = "60000";

/// The device-proxy's longest wait between re-dials of the relay, in seconds.
pub const DEVICE_MAX_BACKOFF: &str = "2";

/// How the relay of a started system is started again: the same program,
/// data dir and flags, listening on the address the first one got.
pub struct RelayRestart {
    program: PathBuf,
    arguments: Vec<String>,
    log_directory: PathBuf,
    log_level: String,
}

impl RelayRestart {
    pub(super) fn spawn(&self) -> anyhow::Result<ChildProcess> {
        ChildProcess::spawn(
            "relay",
            &self.program,
            &self.arguments,
            &self.log_directory,
            &[("RUST_LOG", self.log_level.as_str())],
            Stdout::Piped,
        )
    }
}

/// Starts devstreams; `resume` false gives both proxies `--no-resume`.
pub async fn start(
    programs: &Programs,
    target: SocketAddr,
    resume: bool,
) -> anyhow::Result<System> {
    let directory = tempfile::Builder::new()
        .prefix("bench-devstreams-")
        .tempdir()?;
    let data_dir = directory
        .path()
        .join("relay-data")
        .to_string_lossy()
        .to_string();
    let environment = [("RUST_LOG", programs.log_level.as_str())];
    let relay_arguments = [
        "serve",
        "--data-dir",
        &data_dir,
        "--listen",
        "127.0.0.1:0",
        // Devices use MQTT over WebSocket; no second listener on 0.0.0.0:8883.
        "--no-mqtt",
        "--max-streams",
        STREAM_CAPACITY,
        "--max-streams-per-device",
        STREAM_CAPACITY,
        "--creations-per-second",
        CREATION_RATE_CAPACITY,
        "--creations-per-second-per-device",
        CREATION_RATE_CAPACITY,
        "--max-connections",
        CONNECTION_CAPACITY,
        "--max-connections-per-source",
        CONNECTION_CAPACITY,
    ];
    let mut relay = ChildProcess::spawn(
        "relay",
        &programs.relay,
        &strings(&relay_arguments),
        directory.path(),
        &environment,
        Stdout::Piped,
    )?;
    let relay_listening = relay.wait_for_line("Listening on ", READY_TIMEOUT).await?;
    let relay_address: SocketAddr = relay_listening
        .split_whitespace()
        .next()
        .and_then(|address| address.parse().ok())
        .with_context(|| {
            format!("the relay printed an address the bench cannot read: {relay_listening:?}")
        })?;
    let relay_address = relay_address.to_string();
    let restart_arguments: Vec<String> = relay_arguments
        .iter()
        .map(|argument| match *argument {
            "127.0.0.1:0" => relay_address.clone(),
            other => other.to_string(),
        })
        .collect();
    let service_connection_string = relay
        .wait_for_line("Service connection string: ", READY_TIMEOUT)
        .await?;
    let ca_certificate = relay
        .wait_for_line("CA certificate for clients (--ca-cert): ", READY_TIMEOUT)
        .await?;
    relay.drain_stdout();

    let added = run_to_completion(
        &programs.relay,
        &strings(&["device", "add", DEVICE_ID, "--data-dir", &data_dir]),
        READY_TIMEOUT,
    )
    .await
    .context("relay device add")?;
    let device_connection_string = added
        .lines()
        .map(str::trim)
        .find(|line| line.starts_with("HostName="))
        .context("`relay device add` printed no connection string")?
        .to_string();

    let (device_proxy, service_proxy, entry) = start_proxies(
        programs,
        directory.path(),
        &device_connection_string,
        &service_connection_string,
        &ca_certificate,
        target,
        resume,
    )
    .await?;

    let restart = RelayRestart {
        program: programs.relay.clone(),
        arguments: restart_arguments,
        log_directory: directory.path().to_path_buf(),
        log_level: programs.log_level.clone(),
    };
    let kind = if resume {
        SystemKind::Devstreams
    } else {
        SystemKind::DevstreamsNoResume
    };
    let mut system = System::with_children(
        kind,
        entry,
        vec![
            (Role::Server, relay),
            (Role::DeviceSide, device_proxy),
            (Role::ServiceSide, service_proxy),
        ],
        directory,
    );
    system.relay_restart = Some(restart);
    system.wait_until_ready().await?;
    // Let the first stream's teardown finish before anything is measured.
    tokio::time::sleep(Duration::from_millis(500)).await;
    Ok(system)
}

/// The two proxies of a devstreams system, as a user runs them: the
/// device-proxy exposing `target`, the service-proxy on a free local port
/// (returned as the entry the clients use). Shared by the single relay and
/// the cluster, which differ only in what the connection strings name.
pub(super) async fn start_proxies(
    programs: &Programs,
    log_directory: &std::path::Path,
    device_connection_string: &str,
    service_connection_string: &str,
    ca_certificate: &str,
    target: SocketAddr,
    resume: bool,
) -> anyhow::Result<(ChildProcess, ChildProcess, SocketAddr)> {
    let environment = [("RUST_LOG", programs.log_level.as_str())];
    let target_port = target.port().to_string();
    let mut device_arguments = vec![
        device_connection_string,
        "127.0.0.1",
        &target_port,
        "--ca-cert",
        ca_certificate,
        "--max-streams",
        STREAM_CAPACITY,
        "--max-backoff",
        DEVICE_MAX_BACKOFF,
    ];
    let mut service_arguments = vec![
        service_connection_string,
        DEVICE_ID,
        "0",
        "--ca-cert",
        ca_certificate,
        "--max-connections",
        STREAM_CAPACITY,
    ];
    if !resume {
        device_arguments.push("--no-resume");
        service_arguments.push("--no-resume");
    }
    let device_proxy = ChildProcess::spawn(
        "device-proxy",
        &programs.device_proxy,
        &strings(&device_arguments),
        log_directory,
        &environment,
        Stdout::Logged,
    )?;
    let mut service_proxy = ChildProcess::spawn(
        "service-proxy",
        &programs.service_proxy,
        &strings(&service_arguments),
        log_directory,
        &environment,
        Stdout::Piped,
    )?;
    let listening = service_proxy
        .wait_for_line("Listening on ", READY_TIMEOUT)
        .await?;
    service_proxy.drain_stdout();
    let entry: SocketAddr = listening
        .split_whitespace()
        .next()
        .and_then(|address| address.parse().ok())
        .with_context(|| {
            format!("service-proxy printed an address the bench cannot read: {listening:?}")
        })?;
    Ok((device_proxy, service_proxy, entry))
}

pub(super) fn strings(arguments: &[&str]) -> Vec<String> {
    arguments
        .iter()
        .map(|argument| argument.to_string())
        .collect()
}
