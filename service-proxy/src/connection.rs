//! One accepted local connection becomes one stream to the device.
//!
//! Every connection runs in its own task, so one slow stream creation (a
//! device that takes its time to answer) never delays the next connection.
//! When the stream cannot be created the local socket is closed at once and
//! one error line says why: the local client (ssh, a browser) only sees the
//! connection close, so the log is the only place the reason can go.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use framing::pump::{self, PumpEnd, PumpOptions};
use framing::{ServiceClient, StreamOptions};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, Instrument};

use crate::failures::{describe_failure, describe_rejection};

/// What every connection task shares.
pub struct ConnectionContext {
    pub client: ServiceClient,
    /// For the stream WebSockets; the same configuration as `client`'s.
    pub tls: Arc<rustls::ClientConfig>,
    pub device_id: String,
    pub stream_name: String,
    /// Sent with every stream creation (`--target-port`, the timeouts,
    /// half-close).
    pub stream_options: StreamOptions,
    /// WebSocket pings on stream sockets; `None` turns them off.
    pub ping_interval: Option<std::time::Duration>,
}

/// Serves one local connection until its stream ends or `shutdown` fires;
/// `_permit` holds its place under `--max-connections`.
pub async fn serve(
    tcp: TcpStream,
    peer: SocketAddr,
    connection_number: u64,
    _permit: OwnedSemaphorePermit,
    context: Arc<ConnectionContext>,
    shutdown: CancellationToken,
) {
    let span = tracing::info_span!(
        "stream",
        device_id = %context.device_id,
        connection = connection_number,
        peer = %peer,
        stream_name = %context.stream_name,
        stream_id = tracing::field::Empty,
    );
    async move {
        tokio::select! {
            _ = shutdown.cancelled() => info!("stream cancelled: service-proxy is shutting down"),
            _ = bridge(tcp, &context) => {}
        }
    }
    .instrument(span)
    .await
}

async fn bridge(tcp: TcpStream, context: &ConnectionContext) {
    let device_id = context.device_id.as_str();
    info!(
        target_port = context
            .stream_options
            .target
            .as_deref()
            .unwrap_or("(device default)"),
        half_close = context.stream_options.half_close,
        "stream requested"
    );
    // On every early return, dropping `tcp` closes the local connection at once.
    let creation = context
        .client
        .create_stream(device_id, &context.stream_name, &context.stream_options)
        .await;
    let invitation = match creation {
        Ok(invitation) => invitation,
        Err(failure) => {
            error!("{}", describe_failure(device_id, &failure));
            return;
        }
    };
    if !invitation.is_accepted {
        error!(
            "{}",
            describe_rejection(device_id, invitation.rejection_reason.as_deref())
        );
        return;
    }
    tracing::Span::current().record(
        "stream_id",
        tracing::field::display(framing::stream_id_from_url(&invitation.url)),
    );
    info!(half_close = invitation.half_close, "stream accepted");
    let websocket = match framing::connect_stream(
        &invitation.url,
        &invitation.authorization_token,
        &context.tls,
    )
    .await
    {
        Ok(websocket) => websocket,
        Err(failure) => {
            error!("stream to {device_id} was accepted, but its WebSocket could not be opened: {failure}");
            return;
        }
    };
    info!("stream established");
    let started = Instant::now();
    let options = PumpOptions {
        half_close: invitation.half_close,
        ping_interval: context.ping_interval,
        ..PumpOptions::default()
    };
    let report = pump::pump_tcp(tcp, websocket, options).await;
    info!(
        bytes_to_device = report.bytes_to_stream,
        bytes_from_device = report.bytes_to_tcp,
        duration_ms = duration_ms(started.elapsed()),
        end = %describe_end(&report.end),
        "stream closed"
    );
}

fn duration_ms(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// A few words on how a stream ended, for its "closed" log line.
pub fn describe_end(end: &PumpEnd) -> String {
    match end {
        PumpEnd::Completed => "completed".to_string(),
        PumpEnd::RemoteClosed { code, reason } if reason.is_empty() => {
            format!("closed by the device side (code {code})")
        }
        PumpEnd::RemoteClosed { code, reason } => {
            format!("closed by the device side (code {code}: {reason})")
        }
        PumpEnd::StreamLost(reason) => format!("stream to the relay lost: {reason}"),
        PumpEnd::LocalFailed(reason) => format!("local connection failed: {reason}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn abnormal_ends_name_the_side_that_failed() {
        assert_eq!(describe_end(&PumpEnd::Completed), "completed");
        assert!(describe_end(&PumpEnd::RemoteClosed {
            code: 4000,
            reason: "reset".into()
        })
        .contains("device side"));
        assert!(describe_end(&PumpEnd::LocalFailed("reset".into())).contains("local connection"));
    }
}
