//! Keeping a resumable session alive from the service side: the session
//! runs in `framing::session`; this module starts it (the hello) and, each
//! time its stream is lost, creates a new stream to the same device that
//! resumes it.
//!
//! Retries follow the same jittered backoff as the device-proxy's re-dials,
//! within the resume window: a relay coming back after a restart, a device
//! re-dialing after a network switch, both take a few seconds. An answer
//! that can never turn into a resume (the device no longer knows the
//! session, or refuses its proof) ends the session at once.

use std::time::{Duration, Instant};

use framing::backoff::Backoff;
use framing::local::LocalConnection;
use framing::session::{
    self, Carrier, Control, Loss, Offer, SessionKeys, SessionOptions, SessionReport,
};
use framing::topics::ResumeAsk;
use framing::websocket::ClientWebSocket;
use futures_util::SinkExt;
use tokio::sync::mpsc;
use tracing::info;

use crate::connection::ConnectionContext;
use crate::failures::describe_failure;

/// Ceiling of the first wait between resume attempts.
const FIRST_RETRY_CEILING: Duration = Duration::from_millis(500);
/// Longest wait between resume attempts.
const MAX_RETRY_CEILING: Duration = Duration::from_secs(5);

/// How resumable sessions behave on this service-proxy.
#[derive(Debug, Clone, Copy)]
pub struct ResumeSettings {
    /// Unacknowledged bytes kept per session (`--resume-buffer`).
    pub replay_buffer: usize,
    /// How long a session whose stream broke keeps trying (`--resume-timeout`).
    pub resume_timeout: Duration,
}

/// Starts a session on `websocket` (the first stream, already accepted as
/// resumable) and carries it across as many streams as it takes.
pub async fn carry_session<L: LocalConnection>(
    local: L,
    mut websocket: ClientWebSocket,
    settings: ResumeSettings,
    context: &ConnectionContext,
) -> Result<(SessionKeys, SessionReport), String> {
    let keys = SessionKeys::generate();
    websocket
        .send(keys.hello().to_message())
        .await
        .map_err(|error| format!("cannot start the session: {error}"))?;
    tracing::Span::current().record("session_id", tracing::field::display(&keys.id));
    info!("session started");
    let (offers, offers_received) = mpsc::channel(1);
    let (losses, mut losses_received) = mpsc::channel(1);
    let options = SessionOptions {
        replay_buffer: settings.replay_buffer,
        resume_timeout: settings.resume_timeout,
        ping_interval: context.ping_interval,
        ..SessionOptions::default()
    };
    let first = Carrier {
        websocket,
        peer_received: 0,
        answer_resumed: false,
    };
    let session = session::run_session(local, first, options, offers_received, Some(losses));
    let resumer = async {
        while let Some(loss) = losses_received.recv().await {
            let offer = resume(&keys, loss, settings, context).await;
            if offers.send(offer).await.is_err() {
                break;
            }
        }
        std::future::pending::<()>().await
    };
    let report = tokio::select! {
        report = session => report,
        _ = resumer => unreachable!("the resumer never ends on its own"),
    };
    Ok((keys, report))
}

/// Why one attempt failed.
enum AttemptError {
    /// Worth another try (relay away, device re-dialing, a timeout).
    Transient(String),
    /// No try can succeed.
    Fatal(String),
}

/// Tries until the session is resumed, the window passes, or an answer
/// says it never will be.
async fn resume(
    keys: &SessionKeys,
    loss: Loss,
    settings: ResumeSettings,
    context: &ConnectionContext,
) -> Offer<framing::transport::NetworkStream> {
    let lost_at = Instant::now();
    let deadline = tokio::time::Instant::now() + settings.resume_timeout;
    let mut backoff = Backoff::new(FIRST_RETRY_CEILING, MAX_RETRY_CEILING);
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        info!(attempt, reason = %loss.reason, "resume attempted");
        let outcome =
            tokio::time::timeout_at(deadline, try_resume(keys, loss.received, context)).await;
        match outcome {
            Ok(Ok(carrier)) => {
                info!(
                    attempt,
                    downtime_ms = lost_at.elapsed().as_millis() as u64,
                    device_received = carrier.peer_received,
                    "session resumed"
                );
                return Offer::Carrier(Box::new(carrier));
            }
            Ok(Err(AttemptError::Fatal(reason))) => {
                info!(attempt, reason, "resume failed; giving up");
                return Offer::GiveUp(reason);
            }
            Ok(Err(AttemptError::Transient(reason))) => {
                info!(attempt, reason, "resume failed; retrying");
                let pause = backoff.next_delay();
                if tokio::time::timeout_at(deadline, tokio::time::sleep(pause))
                    .await
                    .is_err()
                {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    Offer::GiveUp(format!(
        "not resumed within {} s (--resume-timeout)",
        settings.resume_timeout.as_secs_f32()
    ))
}

async fn try_resume(
    keys: &SessionKeys,
    received: u64,
    context: &ConnectionContext,
) -> Result<Carrier<framing::transport::NetworkStream>, AttemptError> {
    let device_id = context.device_id.as_str();
    let invitation = context
        .client
        .create_resumable_stream(
            device_id,
            &context.stream_name,
            &context.stream_options,
            ResumeAsk::Continue,
        )
        .await
        .map_err(|failure| AttemptError::Transient(describe_failure(device_id, &failure)))?;
    if !invitation.is_accepted {
        return Err(AttemptError::Fatal(format!(
            "the device refused to resume the session: {}",
            invitation
                .rejection_reason
                .as_deref()
                .unwrap_or("no reason given")
        )));
    }
    if !invitation.resume {
        return Err(AttemptError::Fatal(
            "the device no longer offers resumable sessions (device-proxy --no-resume, or not a devstreams device-proxy)".into(),
        ));
    }
    let mut websocket = framing::connect_stream_with(
        &invitation.url,
        &invitation.authorization_token,
        true,
        &context.dialer,
    )
    .await
    .map_err(|error| {
        AttemptError::Transient(format!("cannot open the stream's WebSocket: {error}"))
    })?;
    websocket
        .send(keys.resume(received).to_message())
        .await
        .map_err(|error| AttemptError::Transient(format!("the new stream failed: {error}")))?;
    match session::read_control(&mut websocket).await {
        Ok(Control::Resumed { received }) => Ok(Carrier {
            websocket,
            peer_received: received,
            answer_resumed: false,
        }),
        Ok(Control::UnknownSession) => Err(AttemptError::Fatal(
            "the device no longer knows the session (its device-proxy restarted, or its --resume-timeout passed)".into(),
        )),
        Ok(Control::Refused) => Err(AttemptError::Fatal(
            "the device refused the session's proof".into(),
        )),
        Ok(other) => Err(AttemptError::Fatal(format!(
            "the device answered a resume with {other:?}"
        ))),
        Err(reason) => Err(AttemptError::Transient(reason)),
    }
}
