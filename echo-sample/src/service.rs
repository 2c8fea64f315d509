//! The echo service: opens a stream, sends one message, checks the echo.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use framing::proxy::ProxySettings;
use framing::pump::{close_message, CLOSE_NORMAL};
use framing::websocket::Message;
use framing::{ConnectionString, Dialer, ServiceClient, StreamOptions};
use futures_util::{SinkExt, StreamExt};

pub const DEFAULT_MESSAGE: &str = "Streaming data over a stream...";
pub const STREAM_NAME: &str = "TestStream";
/// How long to wait for the echo.
const ECHO_TIMEOUT: Duration = Duration::from_secs(30);

pub async fn run(
    connection_string: &str,
    device_id: &str,
    message: &str,
    ca_cert: Option<&Path>,
    proxies: ProxySettings,
    connect_timeout: Duration,
) -> anyhow::Result<()> {
    let connection = ConnectionString::parse_service(connection_string)?;
    let dialer = Dialer::new(framing::tls::client_config(ca_cert)?, proxies);
    let options = StreamOptions {
        connect_timeout,
        ..StreamOptions::default()
    };
    echo_once(
        &ServiceClient::new(connection, &dialer),
        &dialer,
        device_id,
        message,
        &options,
    )
    .await
}

/// One stream, one message, one verified echo.
pub async fn echo_once(
    client: &ServiceClient,
    dialer: &Dialer,
    device_id: &str,
    message: &str,
    options: &StreamOptions,
) -> anyhow::Result<()> {
    let invitation = client
        .create_stream(device_id, STREAM_NAME, options)
        .await
        .with_context(|| format!("cannot create a stream to {device_id}"))?;
    println!(
        "Stream response received: Name={} IsAccepted={}",
        invitation.stream_name,
        if invitation.is_accepted {
            "True"
        } else {
            "False"
        }
    );
    if !invitation.is_accepted {
        anyhow::bail!(
            "the device rejected the stream: {}",
            invitation.rejection_reason.unwrap_or_default()
        );
    }
    let mut socket =
        framing::connect_stream(&invitation.url, &invitation.authorization_token, dialer)
            .await
            .context("cannot connect to the streaming endpoint")?;
    socket
        .send(Message::Binary(message.as_bytes().to_vec().into()))
        .await?;
    println!("Sent stream data: {message}");
    let echoed = tokio::time::timeout(ECHO_TIMEOUT, async {
        loop {
            match socket.next().await {
                Some(Ok(Message::Binary(data))) => return Ok(data),
                Some(Ok(Message::Close(frame))) => {
                    anyhow::bail!("the stream closed before the echo arrived: {frame:?}")
                }
                Some(Ok(_)) => continue,
                Some(Err(error)) => return Err(error.into()),
                None => anyhow::bail!("the stream ended before the echo arrived"),
            }
        }
    })
    .await
    .map_err(|_| anyhow::anyhow!("no echo within {ECHO_TIMEOUT:?}"))??;
    println!("Received stream data: {}", String::from_utf8_lossy(&echoed));
    let _ = socket.send(close_message(CLOSE_NORMAL, "")).await;
    if echoed != message.as_bytes() {
        anyhow::bail!("the echo differs from what was sent");
    }
    Ok(())
}
