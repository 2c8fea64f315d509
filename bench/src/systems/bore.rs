//! bore: `bore server` bound to loopback and `bore local` exposing the
//! target. bore has no encryption at all, so it marks what a tunnel costs
//! without TLS. Its control port is fixed at 7835; when that port is taken,
//! bore is skipped with a reason.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::bail;

use super::devstreams::strings;
use super::{free_port, Programs, Role, System, SystemKind};
use crate::child::{ChildProcess, Stdout};

/// bore's control port (not configurable in bore 0.6).
const CONTROL_PORT: u16 = 7835;

pub async fn start(programs: &Programs, target: SocketAddr) -> anyhow::Result<System> {
    let bore = programs.bore.clone().map_err(anyhow::Error::msg)?;
    if std::net::TcpListener::bind(("127.0.0.1", CONTROL_PORT)).is_err() {
        bail!("bore's fixed control port {CONTROL_PORT} is in use on this machine");
    }
    let directory = tempfile::Builder::new().prefix("bench-bore-").tempdir()?;
    let tunnel_port = free_port()?.to_string();
    let environment = [("RUST_LOG", programs.log_level.as_str())];
    let server_arguments = strings(&[
        "server",
        "--bind-addr",
        "127.0.0.1",
        "--min-port",
        &tunnel_port,
        "--max-port",
        &tunnel_port,
    ]);
    let server = ChildProcess::spawn(
        "bore server",
        &bore,
        &server_arguments,
        directory.path(),
        &environment,
        Stdout::Logged,
    )?;
    // The client gives up at once when the server is not listening yet.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(("127.0.0.1", CONTROL_PORT))
        .await
        .is_err()
    {
        if tokio::time::Instant::now() > deadline {
            bail!(
                "bore server did not listen on {CONTROL_PORT}; its log:\n{}",
                server.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let target_port = target.port().to_string();
    let client_arguments = strings(&[
        "local",
        &target_port,
        "--local-host",
        "127.0.0.1",
        "--to",
        "127.0.0.1",
        "--port",
        &tunnel_port,
    ]);
    let client = ChildProcess::spawn(
        "bore client",
        &bore,
        &client_arguments,
        directory.path(),
        &environment,
        Stdout::Logged,
    )?;
    let entry = SocketAddr::from(([127, 0, 0, 1], tunnel_port.parse::<u16>()?));
    let mut system = System::with_children(
        SystemKind::Bore,
        entry,
        vec![(Role::Server, server), (Role::DeviceSide, client)],
        directory,
    );
    system.wait_until_ready().await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    Ok(system)
}
