//! Device control channels: MQTT 3.1.1 sessions and the presence table.
//!
//! A device is *present* once it has subscribed to stream requests; before
//! that a request published to it would be lost. Each session is one task
//! that owns its connection and answers everything itself (keep-alive,
//! subscriptions, stream answers), so a misbehaving device can only end its
//! own session. A second CONNECT for the same device replaces the first, as
//! in IoT Hub.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use framing::mqtt::{
    ConnAck, Connect, ConnectReturnCode, MqttConnection, Packet, PacketTransport, PubAck, Publish, QoS, SubAck,
    SubscribeReasonCode,
};
use framing::sas::{ExpiryPolicy, SasToken};
use framing::topics::{StreamRequest, StreamResponse, STREAM_REQUESTS_FILTER, STREAM_RESPONSES_FILTER};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::metrics::Metrics;
use crate::state::RelayState;

/// Stream requests queued for one device before creations are refused.
const REQUEST_QUEUE: usize = 256;
/// Longest silence allowed from a device that asked for no keep-alive.
const MAX_SILENCE: Duration = Duration::from_secs(30 * 60);

/// A stream request on its way to a device, with where its answer goes.
pub struct OutgoingRequest {
    pub request: StreamRequest,
    pub answer: oneshot::Sender<StreamResponse>,
}

/// The device's request queue is full, or its session just ended.
#[derive(Debug, thiserror::Error)]
#[error("the device's stream request queue is full or its session ended")]
pub struct RequestQueueFull;

/// How the rest of the relay reaches a connected device.
#[derive(Clone)]
pub struct SessionHandle {
    pub session_id: u64,
    /// The host the device used to reach us, for its streaming URL.
    pub host: Option<String>,
    requests: mpsc::Sender<OutgoingRequest>,
    cancel: CancellationToken,
}

impl SessionHandle {
    /// Queues a request; the receiver yields the device's answer, or an
    /// error if the session ends first.
    pub fn send_request(&self, request: StreamRequest) -> Result<oneshot::Receiver<StreamResponse>, RequestQueueFull> {
        let (answer, receiver) = oneshot::channel();
        self.requests.try_send(OutgoingRequest { request, answer }).map_err(|_| RequestQueueFull)?;
        Ok(receiver)
    }
}

/// Which devices are connected, and where.
pub struct Presence {
    sessions: Mutex<HashMap<String, SessionHandle>>,
    changes: watch::Sender<u64>,
    next_session_id: AtomicU64,
}

impl Default for Presence {
    fn default() -> Self {
        Self { sessions: Mutex::new(HashMap::new()), changes: watch::Sender::new(0), next_session_id: AtomicU64::new(1) }
    }
}

impl Presence {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, SessionHandle>> {
        self.sessions.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn register(&self, device_id: &str, handle: SessionHandle) {
        let replaced = self.lock().insert(device_id.to_string(), handle);
        if let Some(old) = replaced {
            tracing::info!(device_id, "a new connection replaces the device's previous control channel");
            old.cancel.cancel();
        }
        self.changes.send_modify(|version| *version += 1);
    }

    fn unregister(&self, device_id: &str, session_id: u64) {
        let mut sessions = self.lock();
        if sessions.get(device_id).is_some_and(|handle| handle.session_id == session_id) {
            sessions.remove(device_id);
        }
    }

    pub fn get(&self, device_id: &str) -> Option<SessionHandle> {
        self.lock().get(device_id).cloned()
    }

    pub fn connected_count(&self) -> usize {
        self.lock().len()
    }

    pub fn connected_devices(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }

    /// Waits up to `timeout` for the device to be present.
    pub async fn wait_for(&self, device_id: &str, timeout: Duration) -> Option<SessionHandle> {
        let mut changes = self.changes.subscribe();
        let wait = async {
            loop {
                if let Some(handle) = self.get(device_id) {
                    return handle;
                }
                if changes.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        };
        tokio::time::timeout(timeout, wait).await.ok()
    }

    /// Closes a device's control channel (device removed or disabled).
    pub fn disconnect(&self, device_id: &str) {
        if let Some(handle) = self.lock().remove(device_id) {
            handle.cancel.cancel();
        }
    }
}

/// Why a CONNECT was refused; the reason is logged, never the secret.
struct Refusal {
    code: ConnectReturnCode,
    reason: String,
}

fn refuse(code: ConnectReturnCode, reason: impl Into<String>) -> Refusal {
    Refusal { code, reason: reason.into() }
}

/// Checks a CONNECT: client id, username shape and the device SAS token.
fn authenticate(state: &RelayState, connect: &Connect) -> Result<(String, Option<String>), Refusal> {
    let (device_id, module_id) = match connect.client_id.split_once('/') {
        Some((device, module)) => (device.to_string(), Some(module.to_string())),
        None => (connect.client_id.clone(), None),
    };
    if device_id.is_empty() || module_id.as_deref() == Some("") {
        return Err(refuse(ConnectReturnCode::BadClientId, "client id must be deviceId or deviceId/moduleId"));
    }
    let login = connect
        .login
        .as_ref()
        .ok_or_else(|| refuse(ConnectReturnCode::BadUserNamePassword, "CONNECT has no username and password"))?;
    // `<host>/<clientId>/?api-version=…`; only the client id part is checked.
    let expected = format!("/{}/", connect.client_id);
    if !login.username.contains(&expected) {
        return Err(refuse(ConnectReturnCode::BadUserNamePassword, "username is not <host>/<deviceId>/?api-version=…"));
    }
    let token = SasToken::parse(&login.password)
        .map_err(|error| refuse(ConnectReturnCode::BadUserNamePassword, format!("password: {error}")))?;
    if token.key_name.is_some() {
        return Err(refuse(ConnectReturnCode::NotAuthorized, "device tokens must not name a policy (skn)"));
    }
    match token.device_path() {
        Some((token_device, token_module)) if token_device == device_id && token_module == module_id.as_deref() => {}
        _ => return Err(refuse(ConnectReturnCode::NotAuthorized, "the SAS token was signed for another device")),
    }
    let record = state
        .registry
        .device(&device_id)
        .map_err(|error| refuse(ConnectReturnCode::ServiceUnavailable, format!("registry: {error}")))?
        .ok_or_else(|| refuse(ConnectReturnCode::NotAuthorized, "unknown device"))?;
    if !record.enabled {
        return Err(refuse(ConnectReturnCode::NotAuthorized, "device is disabled"));
    }
    let keys = record.key_bytes();
    let key_slices: Vec<&[u8]> = keys.iter().map(Vec::as_slice).collect();
    let policy = ExpiryPolicy { clock_skew: state.config.limits.clock_skew, max_lifetime: state.config.limits.max_token_lifetime };
    token
        .verify(&key_slices, SystemTime::now(), policy)
        .map_err(|error| refuse(ConnectReturnCode::NotAuthorized, error.to_string()))?;
    Ok((device_id, module_id))
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
    let (device_id, module_id) = match authenticate(&state, &connect) {
        Ok(identity) => identity,
        Err(refusal) => {
            Metrics::add(&state.metrics.authentication_failures, 1);
            tracing::warn!(%peer, client_id = %connect.client_id, reason = %refusal.reason, "control channel refused");
            let _ = mqtt.write_packet(&Packet::ConnAck(ConnAck::new(refusal.code, false))).await;
            return mqtt.shutdown().await;
        }
    };
    if mqtt.write_packet(&Packet::ConnAck(ConnAck::new(ConnectReturnCode::Success, false))).await.is_err() {
        return;
    }
    Metrics::add(&state.metrics.control_channels_opened, 1);
    let span = tracing::info_span!("control", device_id = %device_id, module_id = module_id.as_deref().unwrap_or(""), %peer);
    let session = Session {
        session_id: state.presence.next_session_id.fetch_add(1, Ordering::Relaxed),
        device_id,
        keep_alive: connect.keep_alive,
        host,
    };
    async {
        tracing::info!(keep_alive = connect.keep_alive, "device connected");
        let end = session.serve(&state, &mut mqtt).await;
        state.presence.unregister(&session.device_id, session.session_id);
        tracing::info!(reason = %end, "device disconnected");
        mqtt.shutdown().await;
    }
    .instrument(span)
    .await
}

struct Session {
    session_id: u64,
    device_id: String,
    keep_alive: u16,
    host: Option<String>,
}

impl Session {
    /// The session loop; returns why it ended.
    async fn serve<T: PacketTransport>(&self, state: &RelayState, mqtt: &mut MqttConnection<T>) -> String {
        let silence_limit = match self.keep_alive {
            0 => MAX_SILENCE,
            seconds => Duration::from_secs(seconds as u64) * 3 / 2,
        };
        let cancel = state.stop_accepting.child_token();
        let (request_sender, mut requests) = mpsc::channel::<OutgoingRequest>(REQUEST_QUEUE);
        let handle = SessionHandle {
            session_id: self.session_id,
            host: self.host.clone(),
            requests: request_sender,
            cancel: cancel.clone(),
        };
        let mut pending: HashMap<String, oneshot::Sender<StreamResponse>> = HashMap::new();
        let mut present = false;
        loop {
            // Answers the REST side stopped waiting for are forgotten.
            pending.retain(|_, answer| !answer.is_closed());
            tokio::select! {
                _ = cancel.cancelled() => {
                    return "closed by the relay (device replaced, removed, or relay shutting down)".into();
                }
                _ = tokio::time::sleep(silence_limit) => {
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
                    let packet = match packet {
                        Ok(Some(packet)) => packet,
                        Ok(None) => return "connection closed by the device".into(),
                        Err(error) => return format!("protocol error: {error}"),
                    };
                    let reply = match packet {
                        Packet::PingReq => Some(Packet::PingResp),
                        Packet::Subscribe(subscribe) => {
                            let codes = subscribe
                                .filters
                                .iter()
                                .map(|filter| match filter.path.as_str() {
                                    STREAM_REQUESTS_FILTER | STREAM_RESPONSES_FILTER => SubscribeReasonCode::Success(QoS::AtMostOnce),
                                    _ => SubscribeReasonCode::Failure,
                                })
                                .collect();
                            if !present && subscribe.filters.iter().any(|f| f.path == STREAM_REQUESTS_FILTER) {
                                present = true;
                                state.presence.register(&self.device_id, handle.clone());
                            }
                            Some(Packet::SubAck(SubAck::new(subscribe.pkid, codes)))
                        }
                        Packet::Unsubscribe(unsubscribe) => {
                            Some(Packet::UnsubAck(framing::mqtt::UnsubAck { pkid: unsubscribe.pkid }))
                        }
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
