//! One local connection becomes one stream to the device.
//!
//! Every accepted connection runs in its own task, so one slow stream
//! creation (a device that takes its time to answer) never delays the next
//! connection. When the stream cannot be created the local socket is closed
//! at once and one error line says why: the local client (ssh, a browser)
//! only sees the connection close, so the log is the only place the reason
//! can go. [`carry`] does the work for any local connection, so `--stdio`
//! (standard input and output) shares it and prints that line itself.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use framing::local::LocalConnection;
use framing::pump::{self, PumpEnd, PumpOptions};
use framing::session::{replay_kept_in, SessionEnd};
use framing::topics::ResumeAsk;
use framing::{ServiceClient, StreamOptions};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, Instrument};

use crate::failures::{describe_failure, describe_rejection};
use crate::resume::{self, ResumeSettings};

/// What every connection task shares.
pub struct ConnectionContext {
    pub client: ServiceClient,
    /// For the stream WebSockets; the same configuration as `client`'s.
    /// TLS trust and proxy settings for every WebSocket to the relay.
    pub dialer: framing::Dialer,
    pub device_id: String,
    pub stream_name: String,
    /// Sent with every stream creation (`--target-port`, the timeouts,
    /// half-close).
    pub stream_options: StreamOptions,
    /// WebSocket pings on stream sockets; `None` turns them off.
    pub ping_interval: Option<std::time::Duration>,
    /// Resumable sessions, when not turned off (`--no-resume`).
    pub resume: Option<ResumeSettings>,
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
        session_id = tracing::field::Empty,
    );
    async move {
        tokio::select! {
            _ = shutdown.cancelled() => info!("stream cancelled: service-proxy is shutting down"),
            carried = carry(tcp, &context) => if let Err(reason) = carried {
                error!("{reason}");
            }
        }
    }
    .instrument(span)
    .await
}

/// Carries `local` through a new stream (or resumable session) to the
/// device until it ends. `Err` is the one line that says why the stream
/// could not start or ended abnormally; `Ok` is a clean end.
pub async fn carry<L: LocalConnection>(
    local: L,
    context: &ConnectionContext,
) -> Result<(), String> {
    let device_id = context.device_id.as_str();
    info!(
        target_port = context
            .stream_options
            .target
            .as_deref()
            .unwrap_or("(device default)"),
        half_close = context.stream_options.half_close,
        resume = context.resume.is_some(),
        "stream requested"
    );
    // On every early return, dropping `local` closes the local connection at
    // once (`--stdio` keeps its output open until its error line is out).
    let creation = match context.resume {
        Some(_) => {
            context
                .client
                .create_resumable_stream(
                    device_id,
                    &context.stream_name,
                    &context.stream_options,
                    ResumeAsk::New,
                )
                .await
        }
        None => {
            context
                .client
                .create_stream(device_id, &context.stream_name, &context.stream_options)
                .await
        }
    };
    let invitation = match creation {
        Ok(invitation) => invitation,
        Err(failure) => return Err(describe_failure(device_id, &failure)),
    };
    if !invitation.is_accepted {
        return Err(describe_rejection(
            device_id,
            invitation.rejection_reason.as_deref(),
        ));
    }
    tracing::Span::current().record(
        "stream_id",
        tracing::field::display(framing::stream_id_from_url(&invitation.url)),
    );
    info!(
        half_close = invitation.half_close,
        resume = invitation.resume,
        "stream accepted"
    );
    let websocket = match framing::connect_stream_with(
        &invitation.url,
        &invitation.authorization_token,
        invitation.resume,
        &context.dialer,
    )
    .await
    {
        Ok(websocket) => websocket,
        Err(failure) => {
            let opening = "was accepted, but its WebSocket could not be opened";
            return Err(format!("stream to {device_id} {opening}: {failure}"));
        }
    };
    info!("stream established");
    let started = Instant::now();
    if let Some(settings) = context.resume.filter(|_| invitation.resume) {
        let (_keys, report) = resume::carry_session(local, websocket, settings, context)
            .await
            .map_err(|reason| format!("session to {device_id} could not start: {reason}"))?;
        let end = describe_session_end(&report.end);
        info!(
            bytes_to_device = report.bytes_sent,
            bytes_from_device = report.bytes_received,
            resumes = report.resumes,
            bytes_replayed = report.bytes_replayed,
            replay_kept_in = replay_kept_in(report.replay_in_kernel),
            duration_ms = duration_ms(started.elapsed()),
            end,
            "session closed"
        );
        return match report.end {
            SessionEnd::Completed => Ok(()),
            _ => Err(format!(
                "session to {device_id} closed, the local connection was reset: {end}"
            )),
        };
    }
    let options = PumpOptions {
        half_close: invitation.half_close,
        ping_interval: context.ping_interval,
        ..PumpOptions::default()
    };
    let report = pump::pump(local, websocket, options).await;
    let end = describe_end(&report.end);
    info!(
        bytes_to_device = report.bytes_to_stream,
        bytes_from_device = report.bytes_to_tcp,
        duration_ms = duration_ms(started.elapsed()),
        end,
        "stream closed"
    );
    match report.end {
        PumpEnd::Completed => Ok(()),
        _ => Err(format!("stream to {device_id} ended abnormally: {end}")),
    }
}

fn duration_ms(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// A few words on how a session ended, for its "closed" log line.
pub fn describe_session_end(end: &SessionEnd) -> String {
    match end {
        SessionEnd::Completed => "completed".into(),
        SessionEnd::PeerReset(reason) => {
            format!("the device side's connection was reset ({reason})")
        }
        SessionEnd::LocalFailed(reason) => format!("local connection failed: {reason}"),
        SessionEnd::Expired(window) => format!(
            "the session was not resumed within {} s (--resume-timeout)",
            window.as_secs_f32()
        ),
        SessionEnd::Abandoned(reason) => reason.clone(),
        SessionEnd::ProtocolError(reason) => format!("session protocol error: {reason}"),
    }
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
