//! Device control channels: one MQTT 3.1.1 session, from CONNECT to its end.
//!
//! The session does not care how its packets travel: MQTT over WebSocket on
//! the main listener and MQTT over TLS on 8883 both end up in
//! [`run_session`]. Each session is one task that owns its connection and
//! answers everything itself (keep-alive, subscriptions, stream answers), so
//! a misbehaving device can only end its own session. Where IoT Hub device
//! SDKs expect a particular answer (other hubs' topics refused with 0x80, not
//! a dropped connection; QoS 1 answers acknowledged; a second connection
//! replacing the first) this module gives exactly that answer.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use framing::mqtt::{
    ConnAck, Connect, ConnectReturnCode, MqttConnection, Packet, PacketTransport, PubAck, Publish,
    QoS, SubAck, SubscribeReasonCode,
};
use framing::sas::{ExpiryPolicy, SasToken};
use framing::topics::{StreamResponse, STREAM_REQUESTS_FILTER, STREAM_RESPONSES_FILTER};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::metrics::Metrics;
use crate::presence::{Identity, OutgoingRequest, SessionHandle};
use crate::state::RelayState;

/// Longest silence allowed from a device that asked for no keep-alive.
const MAX_SILENCE: Duration = Duration::from_secs(30 * 60);

/// Why a CONNECT was refused; the reason is logged, never the secret.
struct Refusal {
    code: ConnectReturnCode,
    reason: String,
}

fn refuse(code: ConnectReturnCode, reason: impl Into<String>) -> Refusal {
    Refusal {
        code,
        reason: reason.into(),
    }
}

/// Checks a CONNECT: client id, username shape and the device SAS token.
fn authenticate(state: &RelayState, connect: &Connect) -> Result<Identity, Refusal> {
    let (device_id, module_id) = match connect.client_id.split_once('/') {
        Some((device, module)) => (device.to_string(), Some(module.to_string())),
        None => (connect.client_id.clone(), None),
    };
    if device_id.is_empty() || module_id.as_deref() == Some("") {
        return Err(refuse(
            ConnectReturnCode::BadClientId,
            "client id must be deviceId or deviceId/moduleId",
        ));
    }
    let login = connect.login.as_ref().ok_or_else(|| {
        refuse(
            ConnectReturnCode::BadUserNamePassword,
            "CONNECT has no username and password",
        )
    })?;
    // `<host>/<clientId>/?api-version=…`; only the client id part is checked.
    let expected = format!("/{}/", connect.client_id);
    if !login.username.contains(&expected) {
        return Err(refuse(
            ConnectReturnCode::BadUserNamePassword,
            "username is not <host>/<deviceId>/?api-version=…",
        ));
    }
    let token = SasToken::parse(&login.password).map_err(|error| {
        refuse(
            ConnectReturnCode::BadUserNamePassword,
            format!("password: {error}"),
        )
    })?;
    if token.key_name.is_some() {
        return Err(refuse(
            ConnectReturnCode::NotAuthorized,
            "device tokens must not name a policy (skn)",
        ));
    }
    match token.device_path() {
        Some((token_device, token_module))
            if token_device == device_id && token_module == module_id.as_deref() => {}
        _ => {
            return Err(refuse(
                ConnectReturnCode::NotAuthorized,
                "the SAS token was signed for another device",
            ))
        }
    }
    let record = state
        .registry
        .device(&device_id)
        .map_err(|error| {
            refuse(
                ConnectReturnCode::ServiceUnavailable,
                format!("registry: {error}"),
            )
        })?
        .ok_or_else(|| refuse(ConnectReturnCode::NotAuthorized, "unknown device"))?;
    if !record.enabled {
        return Err(refuse(
            ConnectReturnCode::NotAuthorized,
            "device is disabled",
        ));
    }
    let keys = record.key_bytes();
    let key_slices: Vec<&[u8]> = keys.iter().map(Vec::as_slice).collect();
    let policy = ExpiryPolicy {
        clock_skew: state.config.limits.clock_skew,
        max_lifetime: state.config.limits.max_token_lifetime,
    };
    token
        .verify(&key_slices, SystemTime::now(), policy)
        .map_err(|error| refuse(ConnectReturnCode::NotAuthorized, error.to_string()))?;
    Ok(Identity {
        device_id,
        module_id,
    })
}

/// Sends a refusing CONNACK, then closes; each within the write deadline.
async fn refuse_connect<T: PacketTransport>(
    mqtt: &mut MqttConnection<T>,
    code: ConnectReturnCode,
    write_timeout: Duration,
) {
    let connack = Packet::ConnAck(ConnAck::new(code, false));
    if let Ok(Ok(())) = tokio::time::timeout(write_timeout, mqtt.write_packet(&connack)).await {
        close_politely(mqtt, write_timeout).await;
    }
}

/// Closes the transport politely (WebSocket Close, TLS close_notify), but
/// never waits longer than `write_timeout` for a peer that does not read.
async fn close_politely<T: PacketTransport>(mqtt: &mut MqttConnection<T>, write_timeout: Duration) {
    let _ = tokio::time::timeout(write_timeout, mqtt.shutdown()).await;
}

/// Runs one control channel from its first byte to its end.
///
/// Admission, in this order: the source's failure slowdown, the source's own
/// connect budget, authentication (an HMAC and a registry read), and only
/// then the relay-wide connect budget, so that a flood of CONNECTs that
/// cannot authenticate never spends what real devices need.
pub async fn run_session<T: PacketTransport>(
    state: Arc<RelayState>,
    mut mqtt: MqttConnection<T>,
    peer: std::net::SocketAddr,
    host: Option<String>,
) {
    let limits = &state.config.limits;
    let write_timeout = limits.write_timeout;
    let connect_timeout = limits.mqtt_connect_timeout;
    let connect = match tokio::time::timeout(connect_timeout, mqtt.read_packet()).await {
        Ok(Ok(Some(Packet::Connect(connect)))) => connect,
        Ok(Ok(Some(_))) => {
            tracing::warn!(%peer, "control channel refused: the first packet was not CONNECT");
            return close_politely(&mut mqtt, write_timeout).await;
        }
        Ok(Ok(None)) => return,
        Ok(Err(error)) => {
            tracing::warn!(%peer, %error, "control channel refused: unreadable CONNECT");
            return close_politely(&mut mqtt, write_timeout).await;
        }
        Err(_) => {
            tracing::warn!(%peer, timeout = ?connect_timeout, "control channel closed: no CONNECT in time");
            return close_politely(&mut mqtt, write_timeout).await;
        }
    };
    // A source that keeps failing waits before each new attempt is judged.
    let delay = state.sources.failure_delay(peer.ip());
    if !delay.is_zero() {
        tokio::select! {
            _ = state.stop_accepting.cancelled() => return close_politely(&mut mqtt, write_timeout).await,
            _ = tokio::time::sleep(delay) => {}
        }
    }
    if !state.sources.admit_device_connect(peer.ip()) {
        state.sources.record_failure(peer.ip());
        tracing::info!(%peer, client_id = %connect.client_id, limit = limits.sources.device_connects_per_second_per_source,
            "control channel shed: too many device connections from this source this second");
        return refuse_connect(
            &mut mqtt,
            ConnectReturnCode::ServiceUnavailable,
            write_timeout,
        )
        .await;
    }
    let identity = match authenticate(&state, &connect) {
        Ok(identity) => identity,
        Err(refusal) => {
            Metrics::add(&state.metrics.authentication_failures, 1);
            state.sources.record_failure(peer.ip());
            tracing::warn!(%peer, client_id = %connect.client_id, reason = %refusal.reason, "control channel refused");
            return refuse_connect(&mut mqtt, refusal.code, write_timeout).await;
        }
    };
    // Under a reconnect storm of real devices, spread them out.
    if !state.admission.admit_device_connect() {
        tracing::info!(%peer, client_id = %connect.client_id, limit = limits.device_connects_per_second,
            "control channel shed: too many device connections this second");
        return refuse_connect(
            &mut mqtt,
            ConnectReturnCode::ServiceUnavailable,
            write_timeout,
        )
        .await;
    }
    let connack = Packet::ConnAck(ConnAck::new(ConnectReturnCode::Success, false));
    match tokio::time::timeout(write_timeout, mqtt.write_packet(&connack)).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => {
            tracing::debug!(%peer, %error, "control channel lost before CONNACK");
            return;
        }
        Err(_) => {
            tracing::warn!(%peer, ?write_timeout, "control channel dropped: the device does not read its CONNACK");
            return;
        }
    }
    Metrics::add(&state.metrics.control_channels_opened, 1);
    let span = tracing::info_span!(
        "control",
        device_id = %identity.device_id,
        module_id = identity.module_id.as_deref().unwrap_or(""),
        %peer
    );
    // Every request in the queue holds a stream permit, so a queue as long as
    // the device's stream limit refuses nothing the limit allows.
    let queue = limits.max_streams_per_device.max(1);
    let (request_sender, requests) = mpsc::channel::<OutgoingRequest>(queue);
    let cancel = state.stop_accepting.child_token();
    let handle = SessionHandle {
        session_id: state
            .presence
            .next_session_id
            .fetch_add(1, Ordering::Relaxed),
        host,
        requests: request_sender,
        cancel: cancel.clone(),
    };
    let session = Session {
        session_id: handle.session_id,
        identity,
        keep_alive: connect.keep_alive,
        write_timeout,
        cancel,
    };
    async {
        tracing::info!(keep_alive = connect.keep_alive, "device connected");
        // Replaces (and closes) the identity's previous channel right away, as IoT Hub does.
        state.presence.connect(&session.identity, handle);
        let end = session.serve(&state, &mut mqtt, requests).await;
        state
            .presence
            .unregister(&session.identity, session.session_id);
        if end.peer_stalled() {
            tracing::warn!(reason = %end, "device disconnected");
        } else {
            tracing::info!(reason = %end, "device disconnected");
            close_politely(&mut mqtt, write_timeout).await;
        }
    }
    .instrument(span)
    .await
}

/// Why a session ended.
#[derive(Debug)]
enum End {
    /// Replaced, removed, disabled, or the relay is draining.
    Cancelled,
    /// Cancelled while a write was still waiting for the device to read.
    CancelledWhileWriting,
    Silent(Duration),
    /// A write did not finish within the deadline: the device stopped reading.
    Stalled(Duration),
    WriteFailed(String),
    Closed,
    Disconnected,
    Protocol(String),
}

impl End {
    /// The device is not reading, so a polite close would only wait.
    fn peer_stalled(&self) -> bool {
        matches!(
            self,
            End::Stalled(_) | End::CancelledWhileWriting | End::WriteFailed(_)
        )
    }
}

impl std::fmt::Display for End {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            End::Cancelled => formatter.write_str(
                "closed by the relay (device replaced, removed, or relay shutting down)",
            ),
            End::CancelledWhileWriting => formatter.write_str(
                "closed by the relay (device replaced, removed, or relay shutting down) while the device was not reading",
            ),
            End::Silent(limit) => write!(formatter, "silent for {limit:?}, past 1.5 x its keep-alive"),
            End::Stalled(timeout) => write!(
                formatter,
                "dropped: the device stopped reading (a write took longer than {timeout:?}, --write-timeout)"
            ),
            End::WriteFailed(error) => write!(formatter, "write failed: {error}"),
            End::Closed => formatter.write_str("connection closed by the device"),
            End::Disconnected => formatter.write_str("the device disconnected"),
            End::Protocol(error) => write!(formatter, "protocol error: {error}"),
        }
    }
}

struct Session {
    session_id: u64,
    identity: Identity,
    keep_alive: u16,
    write_timeout: Duration,
    cancel: CancellationToken,
}

impl Session {
    /// How long the device may stay silent: 1.5 × its keep-alive (MQTT 3.1.1, 3.1.2.10).
    fn silence_limit(&self) -> Duration {
        match self.keep_alive {
            0 => MAX_SILENCE,
            seconds => Duration::from_secs(u64::from(seconds)) * 3 / 2,
        }
    }

    /// Writes one packet, within the write deadline and giving way to
    /// cancellation: a device that stops reading must not keep its session
    /// from hearing that it was replaced, removed or drained.
    async fn send<T: PacketTransport>(
        &self,
        mqtt: &mut MqttConnection<T>,
        packet: &Packet,
    ) -> Result<(), End> {
        if self.cancel.is_cancelled() {
            return Err(End::Cancelled);
        }
        tokio::select! {
            biased;
            _ = self.cancel.cancelled() => Err(End::CancelledWhileWriting),
            written = tokio::time::timeout(self.write_timeout, mqtt.write_packet(packet)) => match written {
                Ok(Ok(())) => Ok(()),
                Ok(Err(error)) => Err(End::WriteFailed(error.to_string())),
                Err(_) => Err(End::Stalled(self.write_timeout)),
            },
        }
    }

    /// The session loop; returns why it ended.
    async fn serve<T: PacketTransport>(
        &self,
        state: &RelayState,
        mqtt: &mut MqttConnection<T>,
        mut requests: mpsc::Receiver<OutgoingRequest>,
    ) -> End {
        let silence_limit = self.silence_limit();
        // Only what the device sends counts: our own publishes keep nothing alive.
        let mut last_received = Instant::now();
        let mut pending: HashMap<String, oneshot::Sender<StreamResponse>> = HashMap::new();
        let mut ready = false;
        loop {
            // Answers the REST side stopped waiting for are forgotten.
            pending.retain(|_, answer| !answer.is_closed());
            let reply = tokio::select! {
                _ = self.cancel.cancelled() => return End::Cancelled,
                _ = tokio::time::sleep_until(last_received + silence_limit) => {
                    return End::Silent(silence_limit);
                }
                Some(outgoing) = requests.recv() => {
                    let topic = outgoing.request.to_topic();
                    pending.insert(outgoing.request.request_id.clone(), outgoing.answer);
                    Some(Packet::Publish(Publish::new(topic, QoS::AtMostOnce, Vec::new())))
                }
                packet = mqtt.read_packet() => {
                    last_received = Instant::now();
                    let packet = match packet {
                        Ok(Some(packet)) => packet,
                        Ok(None) => return End::Closed,
                        Err(error) => return End::Protocol(error.to_string()),
                    };
                    match packet {
                        Packet::PingReq => Some(Packet::PingResp),
                        Packet::Subscribe(subscribe) => {
                            // Topics of other IoT Hub features (methods, twin) are refused
                            // one by one with 0x80; the connection stays up.
                            let codes = subscribe
                                .filters
                                .iter()
                                .map(|filter| match filter.path.as_str() {
                                    STREAM_REQUESTS_FILTER | STREAM_RESPONSES_FILTER => SubscribeReasonCode::Success(QoS::AtMostOnce),
                                    _ => SubscribeReasonCode::Failure,
                                })
                                .collect();
                            if !ready && subscribe.filters.iter().any(|f| f.path == STREAM_REQUESTS_FILTER) {
                                ready = true;
                                state.presence.mark_ready(&self.identity, self.session_id);
                            }
                            Some(Packet::SubAck(SubAck::new(subscribe.pkid, codes)))
                        }
                        Packet::Unsubscribe(unsubscribe) => {
                            Some(Packet::UnsubAck(framing::mqtt::UnsubAck { pkid: unsubscribe.pkid }))
                        }
                        // A device's publish is consumed here and never delivered to any
                        // subscriber, the device itself included.
                        Packet::Publish(publish) => {
                            match StreamResponse::from_topic(&publish.topic) {
                                Ok(response) => match pending.remove(&response.request_id) {
                                    Some(answer) => {
                                        let _ = answer.send(response);
                                    }
                                    None => tracing::debug!(request_id = %response.request_id, "answer to an unknown or expired request"),
                                },
                                Err(_) => tracing::debug!("ignoring a publish that is not a stream answer"),
                            }
                            (publish.qos == QoS::AtLeastOnce).then(|| Packet::PubAck(PubAck::new(publish.pkid)))
                        }
                        Packet::Disconnect => return End::Disconnected,
                        Packet::Connect(_) => return End::Protocol("a second CONNECT".into()),
                        _ => None,
                    }
                }
            };
            if let Some(reply) = reply {
                if let Err(end) = self.send(mqtt, &reply).await {
                    return end;
                }
            }
        }
    }
}
