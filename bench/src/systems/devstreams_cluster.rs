//! devstreams as a 3-node cluster on NATS, measured where a cluster costs
//! the most: the service's REST call lands on a node that does not hold the
//! device. A real `nats-server -js` (free loopback port, its own store),
//! three `relay serve --cluster` nodes sharing one certificate (each its own
//! `--node-url`), the device registered once with `relay device add
//! --cluster`, `device-proxy` connected to node 1, and `service-proxy`
//! sending its stream creations to node 2. Node 2 asks node 1 over NATS;
//! node 1 asks the device and answers with a streaming URL naming itself,
//! so both stream WebSockets meet on node 1 and no stream byte crosses NATS.
//!
//! The nodes get the same raised admission limits as the single relay
//! ([`super::devstreams`]), so the two columns differ by the cluster only.
//! Watched (memory and CPU in the report) are node 1 as the server (it
//! carries every stream) and the two proxies; the entry node, the third node
//! and NATS run with the system and are stopped by PID with it, but their
//! CPU is not in the per-process figures. Set-up latency and creation rate
//! are end to end, so they include every hop.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;

use super::devstreams::{
    start_proxies, strings, CONNECTION_CAPACITY, CREATION_RATE_CAPACITY, DEVICE_ID, STREAM_CAPACITY,
};
use super::{free_port, Programs, Role, System, SystemKind, READY_TIMEOUT};
use crate::child::{run_to_completion, ChildProcess, Stdout};

/// Nodes in the cluster.
const NODES: usize = 3;

/// Where `nats-server` is: on PATH, or where Debian installs it.
fn nats_server() -> anyhow::Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/local/sbin"].map(PathBuf::from))
        .map(|directory| directory.join("nats-server"))
        .find(|candidate| candidate.is_file())
        .context("nats-server is not installed (apt-get install nats-server)")
}

/// Replaces the `HostName=` of a connection string.
fn with_host_name(connection_string: &str, host_name: &str) -> String {
    connection_string
        .split(';')
        .map(|part| match part.split_once('=') {
            Some(("HostName", _)) => format!("HostName={host_name}"),
            _ => part.to_string(),
        })
        .collect::<Vec<_>>()
        .join(";")
}

/// One certificate for every node (`localhost`, `127.0.0.1`), which the
/// proxies trust as their CA; returns (certificate, key) paths.
fn shared_certificate(directory: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
    let generated =
        rcgen::generate_simple_self_signed(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .context("cannot generate the nodes' certificate")?;
    let certificate = directory.join("cluster-cert.pem");
    let key = directory.join("cluster-key.pem");
    std::fs::write(&certificate, generated.cert.pem())?;
    std::fs::write(&key, generated.signing_key.serialize_pem())?;
    Ok((certificate, key))
}

pub async fn start(programs: &Programs, target: SocketAddr) -> anyhow::Result<System> {
    let nats_program = nats_server()?;
    let directory = tempfile::Builder::new()
        .prefix("bench-devstreams-cluster-")
        .tempdir()?;
    let environment = [("RUST_LOG", programs.log_level.as_str())];

    let nats_port = free_port()?.to_string();
    let store = directory.path().join("nats-store");
    let nats = ChildProcess::spawn(
        "nats-server",
        &nats_program,
        &strings(&[
            "-js",
            "-a",
            "127.0.0.1",
            "-p",
            &nats_port,
            "-sd",
            &store.to_string_lossy(),
        ]),
        directory.path(),
        &[],
        Stdout::Logged,
    )?;
    let nats_url = format!("nats://127.0.0.1:{nats_port}");
    let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
    while tokio::net::TcpStream::connect(("127.0.0.1", nats_port.parse::<u16>()?))
        .await
        .is_err()
    {
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!("nats-server did not listen; its log:\n{}", nats.log_tail());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let (certificate, key) = shared_certificate(directory.path())?;
    let certificate_text = certificate.to_string_lossy().to_string();
    let key_text = key.to_string_lossy().to_string();
    let mut nodes = Vec::with_capacity(NODES);
    let mut service_strings = Vec::with_capacity(NODES);
    let mut hosts = Vec::with_capacity(NODES);
    for index in 1..=NODES {
        let port = free_port()?;
        let data_dir = directory
            .path()
            .join(format!("relay-{index}-data"))
            .to_string_lossy()
            .to_string();
        let listen = format!("127.0.0.1:{port}");
        let node_url = format!("wss://localhost:{port}");
        let name = format!("relay-{index}");
        let mut node = ChildProcess::spawn(
            &name,
            &programs.relay,
            &strings(&[
                "serve",
                "--data-dir",
                &data_dir,
                "--listen",
                &listen,
                "--no-mqtt",
                "--tls-cert",
                &certificate_text,
                "--tls-key",
                &key_text,
                "--cluster",
                &nats_url,
                "--node-url",
                &node_url,
                "--node-name",
                &name,
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
            ]),
            directory.path(),
            &environment,
            Stdout::Piped,
        )?;
        node.wait_for_line("Listening on ", READY_TIMEOUT).await?;
        service_strings.push(
            node.wait_for_line("Service connection string: ", READY_TIMEOUT)
                .await?,
        );
        node.drain_stdout();
        hosts.push(format!("localhost:{port}"));
        nodes.push(node);
    }

    let added = run_to_completion(
        &programs.relay,
        &strings(&["device", "add", DEVICE_ID, "--cluster", &nats_url]),
        READY_TIMEOUT,
    )
    .await
    .context("relay device add --cluster")?;
    let device_connection_string = added
        .lines()
        .map(str::trim)
        .find(|line| line.starts_with("HostName="))
        .context("`relay device add --cluster` printed no connection string")?;
    // The device dials node 1, which then holds it; the service asks node 2.
    let device_connection_string = with_host_name(device_connection_string, &hosts[0]);
    let service_connection_string = with_host_name(&service_strings[1], &hosts[1]);

    let (device_proxy, service_proxy, entry) = start_proxies(
        programs,
        directory.path(),
        &device_connection_string,
        &service_connection_string,
        &certificate_text,
        target,
        true,
    )
    .await?;

    let mut nodes = nodes.into_iter();
    let holding_node = nodes.next().context("the cluster has a first node")?;
    let children = vec![
        (Role::Server, holding_node),
        (Role::DeviceSide, device_proxy),
        (Role::ServiceSide, service_proxy),
    ];
    let mut system =
        System::with_children(SystemKind::DevstreamsCluster, entry, children, directory);
    // Kept running (and stopped by PID with the system), not watched: the
    // entry node, the third node and NATS.
    system.keep_unwatched(nodes.chain(std::iter::once(nats)).collect());
    system.wait_until_ready().await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    Ok(system)
}
