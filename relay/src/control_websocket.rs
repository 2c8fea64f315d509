//! MQTT over WebSocket (`GET /$iothub/websocket`, subprotocol `mqtt`): the
//! upgrade that turns an HTTP request on the main listener into a device
//! control channel, for devices that can only reach port 443.
//!
//! The session runs in its own task after hyper hands the socket over; that
//! task holds the connection's [`ConnectionGuard`], so the channel stays
//! under the connection caps for as long as it lives.

use std::net::SocketAddr;
use std::sync::Arc;

use framing::mqtt::MqttConnection;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::WebSocketStream;

use crate::control;
use crate::http_util::{
    error_code, error_response, offered_spelling, switching_protocols, websocket_accept_key, Body,
};
use crate::listeners::ConnectionGuard;
use crate::state::RelayState;
use crate::trusted_proxies::ClientOrigin;

/// Answers the upgrade request and starts the session once upgraded.
pub(crate) fn upgrade(
    state: &Arc<RelayState>,
    mut request: Request<Incoming>,
    peer: SocketAddr,
    origin: ClientOrigin,
    guard: Arc<ConnectionGuard>,
) -> Response<Body> {
    let accept_key = match websocket_accept_key(request.headers()) {
        Ok(key) => key,
        Err(reason) => {
            return error_response(
                StatusCode::BAD_REQUEST,
                error_code(StatusCode::BAD_REQUEST, 3),
                reason,
            )
        }
    };
    let subprotocol = offered_spelling(
        request.headers(),
        http::header::SEC_WEBSOCKET_PROTOCOL,
        "mqtt",
    );
    let on_upgrade = hyper::upgrade::on(&mut request);
    let task_state = state.clone();
    state.tasks.spawn(async move {
        let _guard = guard;
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let limits = &task_state.config.limits;
        let max_packet = limits.max_mqtt_packet_size;
        let config = framing::websocket::config(limits.mqtt_websocket_message_size());
        let socket =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(config))
                .await;
        control::run_session(
            task_state,
            MqttConnection::new(socket, max_packet),
            peer,
            origin,
        )
        .await;
    });
    switching_protocols(&accept_key, subprotocol.as_deref())
}
