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

/// Stream requests queued for one device before creations are refused.
const REQUEST_QUEUE: usize = 256;
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
    let (device_id, module_id) = framing::identity::parse_client_id(&connect.client_id)
        .map(|(device, module)| (device.to_string(), module.map(str::to_string)))
        .map_err(|error| {
            refuse(
                ConnectReturnCode::BadClientId,
                format!("client id must be deviceId or deviceId/moduleId: {error}"),
            )
        })?;
    let login = connect.login.as_ref().ok_or_else(|| {
        refuse(
            ConnectReturnCode::BadUserNamePassword,
            "CONNECT has no username and password",
        )
    })?;
    // `<host>/<clientId>/?api-version=…`; only the client id part is checked.
    if !framing::identity::username_names_client_id(&login.username, &connect.client_id) {
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
    if !token.names_identity(&device_id, module_id.as_deref()) {
        return Err(refuse(
            ConnectReturnCode::NotAuthorized,
            "the SAS token was signed for another device",
        ));
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

/// Runs one control channel from its first byte to its end.
pub async fn run_session<T: PacketTransport>(
    state: Arc<RelayState>,
    mut mqtt: MqttConnection<T>,
    peer: std::net::SocketAddr,
    host: Option<String>,
) {
    let connect_timeout = state.config.limits.mqtt_connect_timeout;
    let connect = match tokio::time::timeout(connect_timeout, mqtt.read_packet()).await {
        Ok(Ok(Some(Packet::Connect(connect)))) => connect,
        Ok(Ok(Some(_))) => {
            tracing::warn!(%peer, "control channel refused: the first packet was not CONNECT");
            return mqtt.shutdown().await;
        }
        Ok(Ok(None)) => return,
        Ok(Err(error)) => {
            tracing::warn!(%peer, %error, "control channel refused: unreadable CONNECT");
            return mqtt.shutdown().await;
        }
        Err(_) => {
            tracing::warn!(%peer, timeout = ?connect_timeout, "control channel closed: no CONNECT in time");
            return mqtt.shutdown().await;
        }
    };
    // Under a reconnect storm, shed before the (costlier) authentication.
    if !state.admission.admit_device_connect() {
        tracing::info!(%peer, client_id = %connect.client_id, "control channel shed: too many device connections this second");
        let _ = mqtt
            .write_packet(&Packet::ConnAck(ConnAck::new(
                ConnectReturnCode::ServiceUnavailable,
                false,
            )))
            .await;
        return mqtt.shutdown().await;
    }
    // An address that keeps failing waits before each new attempt is judged.
    let delay = state.sources.failure_delay(peer.ip());
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let mut authenticated = authenticate(&state, &connect);
    if authenticated.is_err() || state.registry.change_pending() {
        // A device added, removed or re-keyed a moment ago may not be in
        // the registry snapshot yet: check the store once before answering.
        state.registry.refresh().await;
        authenticated = authenticate(&state, &connect);
    }
    let identity = match authenticated {
        Ok(identity) => identity,
        Err(refusal) => {
            Metrics::add(&state.metrics.authentication_failures, 1);
            state.sources.record_failure(peer.ip());
            tracing::warn!(%peer, client_id = %connect.client_id, reason = %refusal.reason, "control channel refused");
            let _ = mqtt
                .write_packet(&Packet::ConnAck(ConnAck::new(refusal.code, false)))
                .await;
            return mqtt.shutdown().await;
        }
    };
    if mqtt
        .write_packet(&Packet::ConnAck(ConnAck::new(
            ConnectReturnCode::Success,
            false,
        )))
        .await
        .is_err()
    {
        return;
    }
    Metrics::add(&state.metrics.control_channels_opened, 1);
    let span = tracing::info_span!(
        "control",
        device_id = %identity.device_id,
        module_id = identity.module_id.as_deref().unwrap_or(""),
        %peer
    );
    let (request_sender, requests) = mpsc::channel::<OutgoingRequest>(REQUEST_QUEUE);
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
        cancel,
    };
    async {
        tracing::info!(keep_alive = connect.keep_alive, "device connected");
        // Replaces (and closes) the identity's previous channel right away, as IoT Hub does.
        state.presence.connect(&session.identity, handle);
        // A registry change that revoked these credentials after they were
        // checked found no session to cut; now that it can be found, check again.
        if authenticate(&state, &connect).is_err() {
            session.cancel.cancel();
        }
        let end = session.serve(&state, &mut mqtt, requests).await;
        state
            .presence
            .unregister(&session.identity, session.session_id);
        tracing::info!(reason = %end, "device disconnected");
        mqtt.shutdown().await;
    }
    .instrument(span)
    .await
}

struct Session {
    session_id: u64,
    identity: Identity,
    keep_alive: u16,
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

    /// The session loop; returns why it ended.
    async fn serve<T: PacketTransport>(
        &self,
        state: &RelayState,
        mqtt: &mut MqttConnection<T>,
        mut requests: mpsc::Receiver<OutgoingRequest>,
    ) -> String {
        let silence_limit = self.silence_limit();
        // Only what the device sends counts: our own publishes keep nothing alive.
        let mut last_received = Instant::now();
        let mut pending: HashMap<String, oneshot::Sender<StreamResponse>> = HashMap::new();
        let mut ready = false;
        loop {
            // Answers the REST side stopped waiting for are forgotten.
            pending.retain(|_, answer| !answer.is_closed());
            tokio::select! {
                _ = self.cancel.cancelled() => {
                    return "closed by the relay (device replaced, removed, or relay shutting down)".into();
                }
                _ = tokio::time::sleep_until(last_received + silence_limit) => {
                    return format!("silent for {silence_limit:?}, past 1.5 x its keep-alive");
                }
                Some(outgoing) = requests.recv() => {
                    let topic = outgoing.request.to_topic();
                    pending.insert(outgoing.request.request_id.clone(), outgoing.answer);
                    if let Err(error) = mqtt.write_packet(&Packet::Publish(Publish::new(topic, QoS::AtMostOnce, Vec::new()))).await {
                        return format!("write failed: {error}");
                    }
                }
                packet = mqtt.read_packet() => {
                    last_received = Instant::now();
                    let packet = match packet {
                        Ok(Some(packet)) => packet,
                        Ok(None) => return "connection closed by the device".into(),
                        Err(error) => return format!("protocol error: {error}"),
                    };
                    let reply = match packet {
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
                        Packet::Disconnect => return "the device disconnected".into(),
                        Packet::Connect(_) => return "protocol error: a second CONNECT".into(),
                        _ => None,
                    };
                    if let Some(reply) = reply {
                        if let Err(error) = mqtt.write_packet(&reply).await {
                            return format!("write failed: {error}");
                        }
                    }
                }
            }
        }
    }
}
