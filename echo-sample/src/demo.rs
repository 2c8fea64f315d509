//! `echo-sample demo`: a full loopback round trip with nothing to set up. A
//! relay with a fresh temporary data dir and TLS on, a registered device
//! running the echo device, and the echo service; every step is printed.
//! The relay runs in-process through [`relay::EmbeddedRelay`], the relay's
//! small public API for exactly this.

use anyhow::Context;
use framing::{DeviceClient, DeviceOptions, Dialer, ServiceClient};
use relay::EmbeddedRelay;
use tokio_util::sync::CancellationToken;

const DEVICE_ID: &str = "MyDevice";

pub async fn run() -> anyhow::Result<()> {
    let data_dir = tempfile::tempdir().context("cannot create a temporary data directory")?;
    let relay = EmbeddedRelay::start(data_dir.path()).await?;
    println!(
        "[demo] relay listening on {} (TLS, self-signed certificate)",
        relay.local_address()
    );
    // Everything is on loopback in this process: no proxy applies, whatever
    // the environment says.
    let dialer = Dialer::direct(relay.client_tls()?);
    let device_connection = relay.add_device(DEVICE_ID)?;
    println!("[demo] registered device {DEVICE_ID}");

    let client =
        DeviceClient::connect(&device_connection, &dialer, &DeviceOptions::default()).await?;
    println!("[demo] device {DEVICE_ID} connected to the relay over MQTT/WebSocket");
    let stop = CancellationToken::new();
    let device_task = tokio::spawn(crate::device::serve(
        client,
        dialer.clone(),
        "[device] ",
        stop.clone(),
    ));

    let service = ServiceClient::new(relay.service_connection_string()?, &dialer);
    let result = crate::service::echo_once(
        &service,
        &dialer,
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
