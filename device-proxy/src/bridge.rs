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
use framing::session::{self, Carrier, Control, Offer, SessionEnd, SessionOptions};
use framing::topics::ResumeAsk;
use framing::StreamRequest;
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn, Instrument};

use crate::sessions::{Check, SessionTable};
use crate::targets::{ExposedTargets, Target};

/// How long sending an accept or reject over the control channel may take.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// What every stream task shares.
pub struct StreamContext {
    pub device_id: String,
    pub targets: ExposedTargets,
    /// TLS trust and proxy settings for every WebSocket to the relay.
    pub dialer: framing::Dialer,
    pub target_connect_timeout: Duration,
    /// One permit per live stream; `--max-streams` of them.
    pub stream_permits: Arc<Semaphore>,
    pub max_streams: usize,
    /// WebSocket pings on stream sockets; `None` turns them off.
    pub ping_interval: Option<Duration>,
    /// Resumable sessions, when not turned off (`--no-resume`).
    pub resume: Option<ResumeSettings>,
    /// Live resumable sessions.
    pub sessions: SessionTable,
}

/// How resumable sessions behave on this device.
#[derive(Debug, Clone, Copy)]
pub struct ResumeSettings {
    /// Unacknowledged bytes kept per session (`--resume-buffer`).
    pub replay_buffer: usize,
    /// How long a session waits for the service to resume it (`--resume-timeout`).
    pub resume_timeout: Duration,
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
        resume = request.resume.map(ResumeAsk::as_str),
        "stream requested"
    );
    let resume = context.resume.filter(|_| request.resume.is_some());
    if request.resume == Some(ResumeAsk::Continue) {
        match resume {
            Some(_) => continue_session(request, responder, context).await,
            None => {
                reject(
                    request,
                    responder,
                    "resumable sessions are off (--no-resume)",
                )
                .await
            }
        }
        return;
    }
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
    match tokio::time::timeout(
        ANSWER_TIMEOUT,
        responder.accept_with(request, resume.is_some()),
    )
    .await
    {
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
    let websocket = match framing::connect_stream_with(
        &request.url,
        &request.authorization_token,
        resume.is_some(),
        &context.dialer,
    )
    .await
    {
        Ok(websocket) => websocket,
        Err(error) => {
            warn!(%error, "stream closed before it was established: cannot open its WebSocket");
            return;
        }
    };
    info!(target = %target, "stream established");
    if let Some(settings) = resume {
        run_session(tcp, websocket, settings, context).await;
        return;
    }
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

/// A new resumable session: reads the service's hello, registers the
/// session, and carries it until it ends.
async fn run_session(
    tcp: TcpStream,
    mut websocket: framing::websocket::ClientWebSocket,
    settings: ResumeSettings,
    context: &StreamContext,
) {
    let keys = match session::read_control(&mut websocket).await {
        Ok(Control::Hello { session, secret }) => {
            framing::session::SessionKeys::from_hello(&session, &secret)
        }
        Ok(_) => None,
        Err(reason) => {
            warn!(
                reason,
                "stream closed: no session hello from the service side"
            );
            return;
        }
    };
    let Some(keys) = keys else {
        warn!("stream closed: the service side opened with something other than a valid session hello");
        return;
    };
    let session_id = keys.id.clone();
    let (offers, offers_received) = tokio::sync::mpsc::channel(1);
    if !context.sessions.insert(keys, offers) {
        warn!(
            session_id,
            "stream closed: a session with this id already exists"
        );
        return;
    }
    info!(session_id, "session started");
    let started = Instant::now();
    let report = session::run_session(
        tcp,
        Carrier {
            websocket,
            peer_received: 0,
            answer_resumed: false,
        },
        SessionOptions {
            replay_buffer: settings.replay_buffer,
            resume_timeout: settings.resume_timeout,
            ping_interval: context.ping_interval,
            ..SessionOptions::default()
        },
        offers_received,
        None,
    )
    .await;
    context.sessions.remove(&session_id);
    let end = describe_session_end(&report.end);
    let fields = (
        report.bytes_received,
        report.bytes_sent,
        report.resumes,
        report.bytes_replayed,
        started.elapsed().as_millis() as u64,
    );
    match report.end {
        SessionEnd::Completed | SessionEnd::PeerReset(_) | SessionEnd::LocalFailed(_) => info!(
            session_id,
            bytes_to_target = fields.0,
            bytes_to_service = fields.1,
            resumes = fields.2,
            bytes_replayed = fields.3,
            replay_kept_in = framing::session::replay_kept_in(report.replay_in_kernel),
            duration_ms = fields.4,
            end,
            "session closed"
        ),
        _ => warn!(
            session_id,
            bytes_to_target = fields.0,
            bytes_to_service = fields.1,
            resumes = fields.2,
            bytes_replayed = fields.3,
            replay_kept_in = framing::session::replay_kept_in(report.replay_in_kernel),
            duration_ms = fields.4,
            end,
            "session closed; the target connection was reset"
        ),
    }
}

/// A stream that continues a session: checks the service's proof and hands
/// the stream to the session, which answers with its count.
async fn continue_session(request: &StreamRequest, responder: &Responder, context: &StreamContext) {
    match tokio::time::timeout(ANSWER_TIMEOUT, responder.accept_with(request, true)).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => {
            warn!(%error, "resume dropped: could not send the accept to the relay");
            return;
        }
        Err(_) => {
            warn!("resume dropped: sending the accept to the relay timed out");
            return;
        }
    }
    let mut websocket = match framing::connect_stream_with(
        &request.url,
        &request.authorization_token,
        true,
        &context.dialer,
    )
    .await
    {
        Ok(websocket) => websocket,
        Err(error) => {
            warn!(%error, "resume failed: cannot open the stream's WebSocket");
            return;
        }
    };
    let (session_id, nonce, proof, peer_received) =
        match session::read_control(&mut websocket).await {
            Ok(Control::Resume {
                session,
                nonce,
                proof,
                received,
            }) => (session, nonce, proof, received),
            Ok(_) => {
                warn!("resume refused: the stream did not open with a resume request");
                refuse(websocket, Control::Refused).await;
                return;
            }
            Err(reason) => {
                warn!(
                    reason,
                    "resume failed: no resume request from the service side"
                );
                return;
            }
        };
    let offers = match context.sessions.check(&session_id, &nonce, &proof) {
        Check::Accepted(offers) => offers,
        Check::Unknown => {
            info!(
                session_id,
                "resume refused: no such session here (unknown or ended)"
            );
            refuse(websocket, Control::UnknownSession).await;
            return;
        }
        Check::Refused(reason) => {
            warn!(
                session_id,
                reason, "resume refused: the proof does not check; the session is untouched"
            );
            refuse(websocket, Control::Refused).await;
            return;
        }
    };
    info!(session_id, peer_received, "resume accepted");
    let offer = Offer::Carrier(Box::new(Carrier {
        websocket,
        peer_received,
        answer_resumed: true,
    }));
    if offers.send(offer).await.is_err() {
        info!(session_id, "resume came as the session ended");
    }
}

/// Answers a resume that cannot proceed, then closes the stream.
async fn refuse(mut websocket: framing::websocket::ClientWebSocket, answer: Control) {
    use futures_util::SinkExt;
    let _ = tokio::time::timeout(ANSWER_TIMEOUT, async {
        websocket.send(answer.to_message()).await?;
        websocket
            .send(pump::close_message(pump::CLOSE_NORMAL, ""))
            .await
    })
    .await;
}

/// A few words on how a session ended, for its "closed" log line.
pub fn describe_session_end(end: &SessionEnd) -> String {
    match end {
        SessionEnd::Completed => "completed".into(),
        SessionEnd::PeerReset(reason) => {
            format!("the service side's connection was reset ({reason})")
        }
        SessionEnd::LocalFailed(reason) => format!("target connection failed: {reason}"),
        SessionEnd::Expired(window) => format!(
            "the service side did not resume within {} s (--resume-timeout)",
            window.as_secs_f32()
        ),
        SessionEnd::Abandoned(reason) => format!("abandoned: {reason}"),
        SessionEnd::ProtocolError(reason) => format!("session protocol error: {reason}"),
    }
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
