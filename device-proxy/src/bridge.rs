//! One stream request, from decision to last byte.
//!
//! Each request runs in its own task, so a slow target or a slow answer never
//! holds up the next request. The local target is dialed *before* the device
//! accepts: if the target is down or not exposed, the service hears a
//! rejection at once instead of an accepted stream that closes without a
//! byte. After the accept, the stream's WebSocket is opened and the bytes are
//! pumped until either end closes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use framing::device_client::Responder;
use framing::pump::{self, PumpEnd, PumpOptions};
use framing::StreamRequest;
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn, Instrument};

use crate::targets::{ExposedTargets, Target};

/// How long sending an accept or reject over the control channel may take.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// What every stream task shares.
pub struct StreamContext {
    pub device_id: String,
    pub targets: ExposedTargets,
    pub tls: Arc<rustls::ClientConfig>,
    pub target_connect_timeout: Duration,
    /// One permit per live stream; `--max-streams` of them.
    pub stream_permits: Arc<Semaphore>,
    pub max_streams: usize,
    /// WebSocket pings on stream sockets; `None` turns them off.
    pub ping_interval: Option<Duration>,
}

/// Handles one stream request until the stream ends or `shutdown` fires.
pub async fn serve_request(
    request: StreamRequest,
    responder: Responder,
    context: Arc<StreamContext>,
    shutdown: CancellationToken,
) {
    let span = tracing::info_span!(
        "stream",
        device_id = %context.device_id,
        request_id = %request.request_id,
        stream_id = %framing::stream_id_from_url(&request.url),
        stream_name = %request.stream_name,
    );
    async move {
        tokio::select! {
            _ = shutdown.cancelled() => info!("stream cancelled: device-proxy is shutting down"),
            _ = bridge(&request, &responder, &context) => {}
        }
    }
    .instrument(span)
    .await
}

async fn bridge(request: &StreamRequest, responder: &Responder, context: &StreamContext) {
    info!(
        requested_target = request.target.as_deref().unwrap_or("(default)"),
        half_close = request.half_close,
        "stream requested"
    );
    let Ok(_permit) = context.stream_permits.clone().try_acquire_owned() else {
        let reason = format!(
            "{} streams are already open, the --max-streams limit; raise it if this device should carry more",
            context.max_streams
        );
        reject(request, responder, &reason).await;
        return;
    };
    let target = match context.targets.select(request.target.as_deref()) {
        Ok(target) => target,
        Err(refusal) => {
            reject(request, responder, &refusal.to_string()).await;
            return;
        }
    };
    let tcp = match connect_target(target, context.target_connect_timeout).await {
        Ok(tcp) => tcp,
        Err(reason) => {
            reject(request, responder, &reason).await;
            return;
        }
    };
    match tokio::time::timeout(ANSWER_TIMEOUT, responder.accept(request)).await {
        Ok(Ok(())) => info!(target = %target, "stream accepted"),
        Ok(Err(error)) => {
            warn!(%error, "stream dropped: could not send the accept to the relay");
            return;
        }
        Err(_) => {
            warn!(
                timeout_ms = ANSWER_TIMEOUT.as_millis() as u64,
                "stream dropped: sending the accept to the relay timed out"
            );
            return;
        }
    }
    let websocket =
        match framing::connect_stream(&request.url, &request.authorization_token, &context.tls)
            .await
        {
            Ok(websocket) => websocket,
            Err(error) => {
                warn!(%error, "stream closed before it was established: cannot open its WebSocket");
                return;
            }
        };
    info!(target = %target, "stream established");
    let started = Instant::now();
    let options = PumpOptions {
        half_close: request.half_close,
        ping_interval: context.ping_interval,
        ..PumpOptions::default()
    };
    let report = pump::pump_tcp(tcp, websocket, options).await;
    info!(
        bytes_to_service = report.bytes_to_stream,
        bytes_to_target = report.bytes_to_tcp,
        duration_ms = started.elapsed().as_millis() as u64,
        end = %describe_end(&report.end),
        "stream closed"
    );
}

/// Dials the local target; the error is the reason logged with the rejection.
async fn connect_target(target: &Target, timeout: Duration) -> Result<TcpStream, String> {
    match tokio::time::timeout(
        timeout,
        TcpStream::connect((target.host.as_str(), target.port)),
    )
    .await
    {
        Ok(Ok(tcp)) => Ok(tcp),
        Ok(Err(error)) => Err(format!(
            "cannot connect to the target {target}: {error}; check that the service runs there"
        )),
        Err(_) => Err(format!(
            "connecting to the target {target} took longer than {} s (--target-connect-timeout)",
            timeout.as_secs_f32()
        )),
    }
}

async fn reject(request: &StreamRequest, responder: &Responder, reason: &str) {
    warn!(reason, "stream rejected");
    match tokio::time::timeout(ANSWER_TIMEOUT, responder.reject(request)).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => warn!(%error, "could not send the rejection to the relay"),
        Err(_) => warn!(
            timeout_ms = ANSWER_TIMEOUT.as_millis() as u64,
            "sending the rejection to the relay timed out"
        ),
    }
}

/// A few words on how a stream ended, for its "closed" log line.
pub fn describe_end(end: &PumpEnd) -> String {
    match end {
        PumpEnd::Completed => "completed".to_string(),
        PumpEnd::RemoteClosed { code, reason } if reason.is_empty() => {
            format!("closed by the service side (code {code})")
        }
        PumpEnd::RemoteClosed { code, reason } => {
            format!("closed by the service side (code {code}: {reason})")
        }
        PumpEnd::StreamLost(reason) => format!("stream to the relay lost: {reason}"),
        PumpEnd::LocalFailed(reason) => format!("target connection failed: {reason}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unreachable_target_gives_a_reason_naming_it() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let reason = runtime.block_on(async {
            // Bind then drop, so the port is (almost certainly) closed.
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let port = listener.local_addr().unwrap().port();
            drop(listener);
            connect_target(&Target::new("127.0.0.1", port), Duration::from_secs(5))
                .await
                .unwrap_err()
        });
        assert!(
            reason.contains("cannot connect to the target 127.0.0.1:"),
            "{reason}"
        );
    }
}
