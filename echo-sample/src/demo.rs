//! `echo-sample demo`: a full loopback round trip with nothing to set up. A
//! relay with a fresh temporary data dir and TLS on, a registered device
//! running the echo device, and the echo service; every step is printed.

use std::net::SocketAddr;

use anyhow::Context;
use framing::{ConnectionString, DeviceClient, DeviceOptions, ServiceClient};
use relay::data_dir::DataDir;
use relay::RelayConfig;
use tokio_util::sync::CancellationToken;

const DEVICE_ID: &str = "MyDevice";

pub async fn run() -> anyhow::Result<()> {
    let data_dir = tempfile::tempdir().context("cannot create a temporary data directory")?;
    let listen: SocketAddr = "127.0.0.1:0"
        .parse()
        .expect("a literal socket address parses");
    let relay = relay::start(RelayConfig::new(listen, data_dir.path().to_path_buf())).await?;
    println!(
        "[demo] relay listening on {} (TLS, self-signed certificate)",
        relay.local_address
    );
    let certificate = relay
        .certificate_path
        .clone()
        .context("the demo relay has no certificate")?;
    let tls = framing::tls::client_config(Some(&certificate))?;

    let record = DataDir::open_existing(data_dir.path())?
        .registry()?
        .add_device(DEVICE_ID)?;
    let device_connection =
        ConnectionString::for_device(&relay.host_name, DEVICE_ID, &record.primary_key)?;
    println!("[demo] registered device {DEVICE_ID}");

    let client = DeviceClient::connect(&device_connection, &tls, &DeviceOptions::default()).await?;
    println!("[demo] device {DEVICE_ID} connected to the relay over MQTT/WebSocket");
    let stop = CancellationToken::new();
    let device_task = tokio::spawn(crate::device::serve(
        client,
        tls.clone(),
        "[device] ",
        stop.clone(),
    ));

    let service = ServiceClient::new(
        ConnectionString::parse_service(&relay.service_connection_string)?,
        tls.clone(),
    );
    let result = crate::service::echo_once(
        &service,
        &tls,
        DEVICE_ID,
        crate::service::DEFAULT_MESSAGE,
        &Default::default(),
    )
    .await;
    stop.cancel();
    let _ = device_task.await;
    relay.shutdown().await;
    result?;
    println!("[demo] echo verified: the bytes came back unchanged through the relay");
    Ok(())
}
