//! The streaming endpoint `GET /bridges/{hub}/{deviceId}/{streamId}`: checks
//! a side's stream token, pairs it with the other side, then only copies.
//!
//! Tokens are checked before the WebSocket upgrade so a refused client gets
//! a plain HTTP 401 it can report. The answer never carries a subprotocol
//! or an extension (IoT Hub's Node client fails on either).

use std::sync::Arc;
use tokio::time::Instant;

use framing::pump::{self, close_frame, CLOSE_HANDSHAKE_TIMEOUT, CLOSE_PEER_LOST};
use framing::stream_token::Side;
use futures_util::StreamExt;
use http::{HeaderMap, Response, StatusCode};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tracing::Instrument;

use crate::audit::{AuditEvent, EndedBy};
use crate::copy::{self, Interruption, RelayEnd};
use crate::http_util::{
    error_code, error_response, switching_protocols, websocket_accept_key, Body,
};
use crate::listeners::ConnectionGuard;
use crate::live::StreamDetails;
use crate::metrics::Metrics;
use crate::pairing::{Arrival, Claim, ServerWebSocket};
use crate::state::RelayState;

pub fn upgrade(
    state: &Arc<RelayState>,
    headers: &HeaderMap,
    on_upgrade: OnUpgrade,
    device_id: String,
    stream_id: String,
    peer: std::net::SocketAddr,
    connection: Arc<ConnectionGuard>,
) -> Response<Body> {
    let unauthorized = |reason: &str| {
        Metrics::add(&state.metrics.authentication_failures, 1);
        state.sources.record_failure(peer.ip());
        tracing::warn!(%peer, device_id, stream_id, reason, "streaming connection refused");
        error_response(
            StatusCode::UNAUTHORIZED,
            error_code(StatusCode::UNAUTHORIZED, 2),
            reason,
        )
    };
    let token = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "));
    let Some(token) = token else {
        return unauthorized("missing 'Authorization: Bearer <stream token>' header");
    };
    let claims = match state.token_key.verify(token.trim()) {
        Ok(claims) => claims,
        Err(error) => return unauthorized(&error.to_string()),
    };
    if claims.stream_id != stream_id || claims.device_id != device_id {
        return unauthorized("the stream token was issued for another stream");
    }
    let accept_key = match websocket_accept_key(headers) {
        Ok(key) => key,
        Err(reason) => {
            return error_response(
                StatusCode::BAD_REQUEST,
                error_code(StatusCode::BAD_REQUEST, 3),
                reason,
            )
        }
    };
    let claim = match state.pairing.claim(&stream_id, &device_id, claims.side) {
        Ok(claim) => claim,
        Err(error) => return unauthorized(&error.to_string()),
    };
    let side = claims.side;
    // Our proxies say so when the stream carries a resumable session: a
    // draining relay then tells them to move at once instead of waiting.
    let resumable = headers
        .get(framing::headers::RESUME)
        .is_some_and(|value| value.as_bytes() == b"1");
    let span = tracing::info_span!("stream", device_id = %device_id, stream_id = %stream_id, side = side.as_str());
    let task_state = state.clone();
    let audited = AuditedStream {
        stream_id: stream_id.clone(),
        device_id: device_id.clone(),
        stream_name: String::new(),
    };
    state.tasks.spawn(
        async move {
            let upgraded = match on_upgrade.await {
                Ok(upgraded) => upgraded,
                Err(error) => {
                    tracing::debug!(%error, "WebSocket upgrade did not complete");
                    return;
                }
            };
            let config = framing::websocket::config(task_state.config.limits.max_message_size);
            let socket = WebSocketStream::from_raw_socket(
                TokioIo::new(upgraded),
                Role::Server,
                Some(config),
            )
            .await;
            // Boxed, so the task's state holds a pointer rather than the
            // socket at every level it passes through.
            settle(
                task_state,
                claim,
                Box::new(socket),
                connection,
                side,
                resumable,
                audited,
            )
            .await;
        }
        .instrument(span),
    );
    switching_protocols(&accept_key, None)
}

async fn close_with(mut socket: ServerWebSocket, code: u16, reason: &str) {
    copy::close_with(&mut socket, close_frame(code, reason)).await;
}

/// Which stream the audit log's lines are about.
struct AuditedStream {
    stream_id: String,
    device_id: String,
    /// Known once the first side has claimed the stream.
    stream_name: String,
}

impl AuditedStream {
    fn failed(&self, state: &RelayState, reason: &str) {
        state.audit.record(|| AuditEvent::StreamFailed {
            stream_id: self.stream_id.clone(),
            device_id: self.device_id.clone(),
            stream_name: self.stream_name.clone(),
            reason: reason.to_string(),
        });
    }
}

/// How the first side's wait for the second ended.
enum Waited {
    Paired(Box<Arrival>),
    /// The stream was removed before the other side came: its creation
    /// failed after all (the device refused, the service hung up).
    Cancelled,
    Expired,
    ShuttingDown,
    /// The relay is draining and the waiting side carries a resumable
    /// session: it is told to resume elsewhere (4012).
    Moved,
    /// The waiting side sent Close.
    ClosedByPeer,
    /// The waiting side vanished or broke the protocol.
    Lost,
    /// The waiting side sent a message over the size limit.
    TooBig,
}

/// Hands the socket over (second side) or waits and copies (first side);
/// `connection` keeps the socket under the connection caps wherever it goes.
async fn settle(
    state: Arc<RelayState>,
    claim: Claim,
    socket: Box<ServerWebSocket>,
    connection: Arc<ConnectionGuard>,
    side: Side,
    resumable: bool,
    mut audited: AuditedStream,
) {
    match claim {
        Claim::Join { sender, permit } => {
            if let Err(arrival) = sender.send(Arrival {
                socket: *socket,
                permit,
                guard: connection,
            }) {
                close_with(
                    arrival.socket,
                    CLOSE_PEER_LOST,
                    "the other side of the stream is gone",
                )
                .await;
            }
        }
        Claim::Wait {
            mut receiver,
            deadline,
            details,
            guard,
        } => {
            let stream_name = details.stream_name.clone();
            tracing::debug!(waiting_for = side.other().as_str(), "first side connected");
            audited.stream_name = stream_name.clone();
            let mut socket = socket;
            // The waiting side is read while it waits, so its pings and its
            // Close are answered. Its first data message (a server's banner,
            // say) is held, one message at most, and reading stops until the
            // other side comes to take it.
            let mut early: Option<Message> = None;
            let waited = loop {
                tokio::select! {
                    arrival = &mut receiver => break match arrival {
                        Ok(arrival) => Waited::Paired(Box::new(arrival)),
                        Err(_) if Instant::now() >= deadline => Waited::Expired,
                        Err(_) => Waited::Cancelled,
                    },
                    _ = tokio::time::sleep_until(deadline) => break Waited::Expired,
                    _ = state.stop_streams.cancelled() => break Waited::ShuttingDown,
                    // A resumable side need not wait out the drain: it moves.
                    _ = state.stop_accepting.cancelled(), if resumable => break Waited::Moved,
                    message = socket.next(), if early.is_none() => match message {
                        Some(Ok(Message::Close(_))) => break Waited::ClosedByPeer,
                        Some(Ok(message @ (Message::Binary(_) | Message::Text(_)))) => {
                            early = Some(message)
                        }
                        Some(Ok(_)) => {}
                        Some(Err(tokio_tungstenite::tungstenite::Error::Capacity(_))) => {
                            break Waited::TooBig
                        }
                        None | Some(Err(_)) => break Waited::Lost,
                    },
                }
            };
            let failure = match &waited {
                Waited::Paired(_) => None,
                Waited::Cancelled => {
                    Some("the stream was cancelled before the other side connected")
                }
                Waited::Expired => {
                    Some("the other side did not connect before the handshake deadline")
                }
                Waited::ShuttingDown => Some("the relay shut down before the other side connected"),
                Waited::Moved => {
                    Some("the relay is draining: the session resumes elsewhere (4012)")
                }
                Waited::ClosedByPeer => Some("the first side closed before the other connected"),
                Waited::Lost => Some("the first side disconnected before the other connected"),
                Waited::TooBig => Some("the first side sent a message over --max-message-size"),
            };
            if let Some(reason) = failure {
                audited.failed(&state, &format!("{} side: {reason}", side.as_str()));
            }
            if !matches!(waited, Waited::Paired(_)) {
                // The stream is over: nobody may join it any more, and a side
                // that joined just now is told so rather than dropped.
                drop(guard);
                receiver.close();
                if let Ok(arrival) = receiver.try_recv() {
                    close_with(
                        arrival.socket,
                        CLOSE_PEER_LOST,
                        "the other side of the stream is gone",
                    )
                    .await;
                }
            }
            match waited {
                Waited::Paired(arrival) => {
                    copy_stream(
                        &state,
                        socket,
                        arrival,
                        early,
                        side,
                        (details, &audited),
                        resumable,
                    )
                    .await
                }
                Waited::Expired => {
                    Metrics::add(&state.metrics.streams_expired, 1);
                    tracing::info!(stream_name, "stream failed: the other side did not connect before the handshake deadline");
                    close_with(
                        *socket,
                        CLOSE_HANDSHAKE_TIMEOUT,
                        "the other side did not connect before the handshake deadline",
                    )
                    .await
                }
                Waited::Cancelled => {
                    close_with(
                        *socket,
                        CLOSE_PEER_LOST,
                        "the stream was cancelled before the other side connected",
                    )
                    .await
                }
                Waited::ShuttingDown => {
                    close_with(
                        *socket,
                        pump::CLOSE_GOING_AWAY,
                        "the relay is shutting down",
                    )
                    .await
                }
                Waited::Moved => {
                    Metrics::add(&state.metrics.streams_moved, 1);
                    close_with(
                        *socket,
                        pump::CLOSE_MOVE,
                        "the relay is draining: resume elsewhere",
                    )
                    .await
                }
                Waited::ClosedByPeer => {
                    tracing::info!(
                        stream_name,
                        "stream ended: the first side closed before the other connected"
                    );
                    copy::answer_close(&mut *socket).await
                }
                Waited::TooBig => {
                    close_with(
                        *socket,
                        pump::CLOSE_MESSAGE_TOO_BIG,
                        "message larger than the relay accepts",
                    )
                    .await
                }
                Waited::Lost => tracing::info!(
                    stream_name,
                    "stream ended: the first side disconnected before the other connected"
                ),
            }
        }
    }
}

async fn copy_stream(
    state: &RelayState,
    mine: Box<ServerWebSocket>,
    arrival: Box<Arrival>,
    early: Option<Message>,
    my_side: Side,
    // The live stream's id is the audit log's: the one the creation made.
    (details, audited): (Arc<StreamDetails>, &AuditedStream),
    resumable: bool,
) {
    let stream_name = details.stream_name.clone();
    let Arrival {
        socket: theirs,
        permit,
        guard: _their_connection,
    } = *arrival;
    let started = Instant::now();
    state.metrics.stream_setup_seconds.observe(
        started
            .saturating_duration_since(details.requested)
            .as_secs_f64(),
    );
    let live = state
        .live_streams
        .insert(&audited.stream_id, details, my_side == Side::Device);
    Metrics::add(&state.metrics.streams_established, 1);
    tracing::info!(stream_name, "stream established");
    state.audit.record(|| AuditEvent::StreamEstablished {
        stream_id: audited.stream_id.clone(),
        device_id: audited.device_id.clone(),
        stream_name: stream_name.clone(),
    });
    let device_removed = async {
        match &permit {
            Some(permit) => permit.cancelled().await,
            None => std::future::pending().await,
        }
    };
    let early_bytes = early.as_ref().map_or(0, |message| message.len() as u64);
    // A drain moves a resumable session at once (4012); other streams keep
    // their drain deadline. An operator may close any stream.
    let move_now = async {
        if resumable {
            state.stop_accepting.cancelled().await
        } else {
            std::future::pending().await
        }
    };
    let interrupt = async {
        tokio::select! {
            _ = move_now => Interruption::Move,
            _ = live.stream.closed() => Interruption::CloseByOperator,
        }
    };
    // Takes both sockets now, before anything is awaited, so this state
    // keeps no copy of them.
    let relay = copy::relay_until_moved(
        *mine,
        theirs,
        early,
        state.config.limits.ping_interval,
        &live.stream.counters,
        interrupt,
    );
    // Bytes each way, device to service first, as `my_side` says.
    let by_direction = |first_to_second: u64, second_to_first: u64| match my_side {
        Side::Device => (first_to_second, second_to_first),
        Side::Service => (second_to_first, first_to_second),
    };
    let closed = |first_to_second: u64, second_to_first: u64, ended_by: EndedBy, reason: String| {
        let (device_to_service, service_to_device) = by_direction(first_to_second, second_to_first);
        state.audit.record(|| AuditEvent::StreamClosed {
            stream_id: audited.stream_id.clone(),
            device_id: audited.device_id.clone(),
            stream_name: stream_name.clone(),
            bytes_device_to_service: device_to_service,
            bytes_service_to_device: service_to_device,
            duration_ms: started.elapsed().as_millis() as u64,
            ended_by,
            reason,
        });
    };
    // A cut drops the copy: its bytes so far are the live stream's counters
    // (the ones the admin API shows), plus the early message sent first.
    let cut = |reason: &str| {
        let counters = &live.stream.counters;
        closed(
            counters
                .first_to_second
                .load(std::sync::atomic::Ordering::Relaxed)
                + early_bytes,
            counters
                .second_to_first
                .load(std::sync::atomic::Ordering::Relaxed),
            EndedBy::Relay,
            reason.to_string(),
        )
    };
    let report = tokio::select! {
        mut report = relay => {
            report.bytes_first_to_second += early_bytes;
            report
        }
        _ = device_removed => {
            tracing::info!(stream_name, "stream cut: the device was removed or disabled");
            cut("the device was removed, disabled or re-keyed");
            return;
        }
        _ = state.stop_streams.cancelled() => {
            tracing::info!(stream_name, "stream cut: the relay's drain deadline passed");
            cut("the relay's drain deadline passed");
            return;
        }
    };
    let (device_to_service, service_to_device) =
        by_direction(report.bytes_first_to_second, report.bytes_second_to_first);
    let side_of = |first: bool| {
        if first {
            my_side.as_str()
        } else {
            my_side.other().as_str()
        }
    };
    let side_named = |first: bool| match side_of(first) {
        "device" => EndedBy::Device,
        _ => EndedBy::Service,
    };
    let ended_by = match report.end {
        RelayEnd::Closed { by_first, .. } => side_named(by_first),
        RelayEnd::Lost { first_lost } => side_named(first_lost),
        RelayEnd::Moved => EndedBy::Relay,
        RelayEnd::ClosedByOperator => EndedBy::Operator,
        RelayEnd::MessageTooBig { from_first } => side_named(from_first),
    };
    let ended = match report.end {
        RelayEnd::Closed { by_first, code } => {
            format!("closed by the {} side (code {code})", side_of(by_first))
        }
        RelayEnd::Lost { first_lost } => format!(
            "the {} side disconnected without closing",
            side_of(first_lost)
        ),
        RelayEnd::ClosedByOperator => "closed by the relay's operator (admin API)".to_string(),
        RelayEnd::Moved => {
            Metrics::add(&state.metrics.streams_moved, 1);
            "moved: the relay is draining and the session resumes elsewhere (4012)".to_string()
        }
        RelayEnd::MessageTooBig { from_first } => {
            format!(
                "the {} side sent a message over --max-message-size",
                side_of(from_first)
            )
        }
    };
    Metrics::add(&state.metrics.streams_closed, 1);
    Metrics::add(&state.metrics.bytes_device_to_service, device_to_service);
    Metrics::add(&state.metrics.bytes_service_to_device, service_to_device);
    state
        .metrics
        .observe_stream_end(started.elapsed(), device_to_service, service_to_device);
    tracing::info!(
        stream_name,
        device_to_service,
        service_to_device,
        duration_ms = started.elapsed().as_millis() as u64,
        ended,
        "stream closed"
    );
    closed(
        report.bytes_first_to_second,
        report.bytes_second_to_first,
        ended_by,
        ended,
    );
    drop(permit);
}
