//! The echo device: accepts every stream and sends each message back as it
//! came (same opcode, same boundaries).

use std::path::Path;

use anyhow::Context;
use framing::device_client::Responder;
use framing::proxy::ProxySettings;
use framing::websocket::Message;
use framing::{ConnectionString, DeviceClient, DeviceOptions, Dialer, StreamRequest};
use futures_util::{SinkExt, StreamExt};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub async fn run(
    connection_string: &str,
    ca_cert: Option<&Path>,
    proxies: ProxySettings,
) -> anyhow::Result<()> {
    let connection = ConnectionString::parse_device(connection_string)?;
    let dialer = Dialer::new(framing::tls::client_config(ca_cert)?, proxies);
    let client = DeviceClient::connect(&connection, &dialer, &DeviceOptions::default())
        .await
        .with_context(|| {
            format!(
                "device {} cannot connect to {}",
                connection.device_id.as_deref().unwrap_or(""),
                connection.host_name
            )
        })?;
    println!(
        "Device {} connected; waiting for stream requests (Ctrl-C to stop)",
        client.device_id()
    );
    let stop = CancellationToken::new();
    tokio::select! {
        result = serve(client, dialer, "", stop.clone()) => result,
        _ = tokio::signal::ctrl_c() => {
            stop.cancel();
            Ok(())
        }
    }
}

/// Answers requests until the control channel ends or `stop` fires; each
/// stream is echoed in its own task.
pub async fn serve(
    mut client: DeviceClient,
    dialer: Dialer,
    prefix: &str,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let streams = TaskTracker::new();
    let responder = client.responder();
    let result = loop {
        let request = tokio::select! {
            request = client.next_request() => request,
            _ = stop.cancelled() => break Ok(()),
        };
        let request = match request {
            Ok(request) => request,
            Err(error) => break Err(anyhow::Error::new(error).context("the control channel ended")),
        };
        println!(
            "{prefix}Received stream request: Name={}",
            request.stream_name
        );
        let (responder, dialer, prefix, stop) = (
            responder.clone(),
            dialer.clone(),
            prefix.to_string(),
            stop.clone(),
        );
        streams.spawn(async move {
            tokio::select! {
                result = echo_stream(&responder, &request, &dialer, &prefix) => {
                    if let Err(error) = result {
                        eprintln!("{prefix}echo stream failed: {error:#}");
                    }
                }
                _ = stop.cancelled() => {}
            }
        });
    };
    streams.close();
    stop.cancel();
    streams.wait().await;
    client.disconnect().await;
    result
}

async fn echo_stream(
    responder: &Responder,
    request: &StreamRequest,
    dialer: &Dialer,
    prefix: &str,
) -> anyhow::Result<()> {
    responder.accept(request).await?;
    let mut socket =
        framing::connect_stream(&request.url, &request.authorization_token, dialer).await?;
    while let Some(message) = socket.next().await {
        match message? {
            Message::Close(_) => break,
            message @ (Message::Binary(_) | Message::Text(_)) => {
                println!(
                    "{prefix}Received stream data: {}",
                    String::from_utf8_lossy(&message.clone().into_data())
                );
                socket.send(message).await?;
            }
            _ => {}
        }
    }
    Ok(())
}
