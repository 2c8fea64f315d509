//! The streaming endpoint `GET /bridges/{hub}/{deviceId}/{streamId}`: checks
//! a side's stream token, pairs it with the other side, then only copies.
//!
//! Tokens are checked before the WebSocket upgrade so a refused client gets
//! a plain HTTP 401 it can report. The answer never carries a subprotocol
//! or an extension (IoT Hub's Node client fails on either).

use std::sync::Arc;
use std::time::Instant;

use framing::pump::{self, close_message, CLOSE_HANDSHAKE_TIMEOUT, CLOSE_PEER_LOST};
use framing::stream_token::Side;
use futures_util::SinkExt;
use http::{HeaderMap, Response, StatusCode};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::WebSocketStream;
use tracing::Instrument;

use crate::copy::{self, RelayEnd};
use crate::http_util::{
    error_code, error_response, switching_protocols, websocket_accept_key, Body,
};
use crate::limits::StreamPermit;
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
    let span = tracing::info_span!("stream", device_id = %device_id, stream_id = %stream_id, side = side.as_str());
    let task_state = state.clone();
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
            settle(task_state, claim, socket, side, stream_id).await;
        }
        .instrument(span),
    );
    switching_protocols(&accept_key, None)
}

async fn close_with(mut socket: ServerWebSocket, code: u16, reason: &str) {
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        socket.send(close_message(code, reason)),
    )
    .await;
}

/// Hands the socket over (second side) or waits and copies (first side).
async fn settle(
    state: Arc<RelayState>,
    claim: Claim,
    socket: ServerWebSocket,
    side: Side,
    stream_id: String,
) {
    match claim {
        Claim::Join { sender, permit } => {
            if let Err(arrival) = sender.send(Arrival { socket, permit }) {
                close_with(
                    arrival.socket,
                    CLOSE_PEER_LOST,
                    "the other side of the stream is gone",
                )
                .await;
            }
        }
        Claim::Wait {
            receiver,
            deadline,
            stream_name,
        } => {
            tracing::debug!(waiting_for = side.other().as_str(), "first side connected");
            let arrival = tokio::select! {
                arrival = receiver => arrival,
                _ = tokio::time::sleep_until(tokio::time::Instant::from_std(deadline)) => {
                    state.pairing.remove(&stream_id);
                    Metrics::add(&state.metrics.streams_expired, 1);
                    tracing::info!(stream_name, "stream failed: the other side did not connect before the handshake deadline");
                    return close_with(socket, CLOSE_HANDSHAKE_TIMEOUT, "the other side did not connect before the handshake deadline").await;
                }
                _ = state.stop_streams.cancelled() => {
                    return close_with(socket, pump::CLOSE_GOING_AWAY, "the relay is shutting down").await;
                }
            };
            match arrival {
                Ok(arrival) => {
                    copy_stream(
                        &state,
                        socket,
                        arrival.socket,
                        side,
                        arrival.permit,
                        stream_name,
                    )
                    .await
                }
                Err(_) => {
                    close_with(
                        socket,
                        CLOSE_PEER_LOST,
                        "the stream was cancelled before the other side connected",
                    )
                    .await
                }
            }
        }
    }
}

async fn copy_stream(
    state: &RelayState,
    mine: ServerWebSocket,
    theirs: ServerWebSocket,
    my_side: Side,
    permit: Option<StreamPermit>,
    stream_name: String,
) {
    let started = Instant::now();
    Metrics::add(&state.metrics.streams_established, 1);
    tracing::info!(stream_name, "stream established");
    let device_removed = async {
        match &permit {
            Some(permit) => permit.cancelled().await,
            None => std::future::pending().await,
        }
    };
    let report = tokio::select! {
        report = copy::relay(mine, theirs, state.config.limits.ping_interval) => report,
        _ = device_removed => {
            tracing::info!(stream_name, "stream cut: the device was removed or disabled");
            return;
        }
        _ = state.stop_streams.cancelled() => {
            tracing::info!(stream_name, "stream cut: the relay's drain deadline passed");
            return;
        }
    };
    let (device_to_service, service_to_device) = match my_side {
        Side::Device => (report.bytes_first_to_second, report.bytes_second_to_first),
        Side::Service => (report.bytes_second_to_first, report.bytes_first_to_second),
    };
    let side_of = |first: bool| {
        if first {
            my_side.as_str()
        } else {
            my_side.other().as_str()
        }
    };
    let ended = match report.end {
        RelayEnd::Closed { by_first, code } => {
            format!("closed by the {} side (code {code})", side_of(by_first))
        }
        RelayEnd::Lost { first_lost } => format!(
            "the {} side disconnected without closing",
            side_of(first_lost)
        ),
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
    tracing::info!(
        stream_name,
        device_to_service,
        service_to_device,
        duration_ms = started.elapsed().as_millis() as u64,
        ended,
        "stream closed"
    );
    drop(permit);
}
