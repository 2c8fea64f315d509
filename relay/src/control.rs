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
    origin: crate::trusted_proxies::ClientOrigin,
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
            state
                .audit
                .record(|| crate::audit::AuditEvent::DeviceRefused {
                    client_id: connect.client_id.clone(),
                    address: peer.to_string(),
                    reason: refusal.reason.clone(),
                });
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
    // A request is queued only for an admitted stream, so a queue as long as
    // the device's stream limit refuses nothing that limit allows.
    let queue = limits
        .max_streams_per_device
        .clamp(1, tokio::sync::Semaphore::MAX_PERMITS);
    let (request_sender, requests) = mpsc::channel::<OutgoingRequest>(queue);
    let cancel = state.stop_accepting.child_token();
    let handle = SessionHandle {
        session_id: state
            .presence
            .next_session_id
            .fetch_add(1, Ordering::Relaxed),
        origin,
        peer,
        connected_at: std::time::SystemTime::now(),
        last_activity: Default::default(),
        requests: request_sender,
        cancel: cancel.clone(),
    };
    let session = Session {
        session_id: handle.session_id,
        identity,
        keep_alive: connect.keep_alive,
        write_timeout,
        cancel,
        last_activity: handle.last_activity.clone(),
    };
    async {
        tracing::info!(keep_alive = connect.keep_alive, "device connected");
        state
            .audit
            .record(|| crate::audit::AuditEvent::DeviceConnected {
                device_id: session.identity.device_id.clone(),
                module_id: session.identity.module_id.clone(),
                address: peer.to_string(),
            });
        // Replaces (and closes) the identity's previous channel right away, as IoT Hub does.
        state.presence.connect(&session.identity, handle);
        // In a cluster: answer this identity's stream creations and close
        // its channel on any other node (ends when the session does).
        let _cluster_membership = crate::cluster::presence::join(
            &state,
            &session.identity,
            session.session_id,
            session.cancel.clone(),
        );
        // A registry change that revoked these credentials after they were
        // checked found no session to cut; now that it can be found, check again.
        if authenticate(&state, &connect).is_err() {
            session.cancel.cancel();
        }
        let end = session.serve(&state, &mut mqtt, requests).await;
        state
            .presence
            .unregister(&session.identity, session.session_id);
        state
            .audit
            .record(|| crate::audit::AuditEvent::DeviceDisconnected {
                device_id: session.identity.device_id.clone(),
                module_id: session.identity.module_id.clone(),
                address: peer.to_string(),
                reason: end.to_string(),
            });
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
    /// When the device last sent a packet (admin API's live state).
    last_activity: std::sync::Arc<crate::presence::ActivityClock>,
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
                    self.last_activity.touch();
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

#[cfg(test)]
mod tests {
    //! The session state machine driven in-process: a real [`run_session`]
    //! on one end of an in-memory pipe, a scripted device on the other.

    use super::*;
    use crate::config::{Limits, RelayConfig};
    use crate::data_dir::DataDir;
    use framing::mqtt::{ByteTransport, Subscribe, SubscribeFilter};
    use framing::stream_token::StreamTokenKey;
    use framing::topics::StreamRequest;
    use tokio::io::DuplexStream;
    use tokio::task::JoinHandle;

    type Device = MqttConnection<ByteTransport<DuplexStream>>;

    /// Deadline for anything the tests wait for.
    const PROMPTLY: Duration = Duration::from_secs(5);

    struct Relay {
        state: Arc<RelayState>,
        /// The primary key of device `d`, decoded.
        key: Vec<u8>,
        _directory: tempfile::TempDir,
    }

    fn relay(limits: Limits) -> Relay {
        let directory = tempfile::tempdir().expect("a temp dir");
        let data_dir = DataDir::create_or_open(directory.path()).expect("a data dir");
        let registry = data_dir.registry().expect("the registry opens");
        let record = registry.add_device("d").expect("device d is added");
        let secret = data_dir
            .stream_token_secret()
            .expect("a stream token secret");
        let mut config = RelayConfig::new(
            "127.0.0.1:0".parse().expect("an address"),
            directory.path().into(),
        );
        config.limits = limits;
        let state = RelayState::new(
            config,
            Arc::new(registry),
            StreamTokenKey::from_secret(&secret),
        );
        Relay {
            state,
            key: record.key_bytes().remove(0),
            _directory: directory,
        }
    }

    fn identity() -> Identity {
        Identity {
            device_id: "d".into(),
            module_id: None,
        }
    }

    /// A session on a pipe holding `buffer` bytes each way.
    fn start_session(relay: &Relay, buffer: usize) -> (JoinHandle<()>, Device) {
        let (relay_side, device_side) = tokio::io::duplex(buffer);
        let session = tokio::spawn(run_session(
            relay.state.clone(),
            MqttConnection::new(ByteTransport(relay_side), 64 * 1024),
            "127.0.0.1:5000".parse().expect("an address"),
            crate::trusted_proxies::ClientOrigin::host(Some("localhost:8443".into())),
        ));
        (
            session,
            MqttConnection::new(ByteTransport(device_side), 64 * 1024),
        )
    }

    fn connect_packet(key: &[u8]) -> Packet {
        let mut connect = Connect::new("d");
        connect.keep_alive = 60;
        connect.set_login(
            "localhost/d/?api-version=2021-04-12",
            framing::sas::sign(
                "localhost/devices/d",
                key,
                SystemTime::now() + Duration::from_secs(3600),
                None,
            ),
        );
        Packet::Connect(connect)
    }

    async fn receive(device: &mut Device) -> Option<Packet> {
        tokio::time::timeout(PROMPTLY, device.read_packet())
            .await
            .expect("the relay answers promptly")
            .ok()
            .flatten()
    }

    async fn connack(device: &mut Device, key: &[u8]) -> ConnectReturnCode {
        device
            .write_packet(&connect_packet(key))
            .await
            .expect("CONNECT is written");
        match receive(device).await {
            Some(Packet::ConnAck(ack)) => ack.code,
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    async fn subscribe(device: &mut Device) -> Vec<SubscribeReasonCode> {
        let mut subscribe = Subscribe::new_many([
            SubscribeFilter::new(STREAM_REQUESTS_FILTER.into(), QoS::AtMostOnce),
            SubscribeFilter::new(STREAM_RESPONSES_FILTER.into(), QoS::AtMostOnce),
            SubscribeFilter::new("$iothub/twin/res/#".into(), QoS::AtMostOnce),
        ]);
        subscribe.pkid = 1;
        device
            .write_packet(&Packet::Subscribe(subscribe))
            .await
            .expect("SUBSCRIBE is written");
        match receive(device).await {
            Some(Packet::SubAck(ack)) => ack.return_codes,
            other => panic!("expected SUBACK, got {other:?}"),
        }
    }

    /// A connected, subscribed device `d`.
    async fn ready_device(relay: &Relay, buffer: usize) -> (JoinHandle<()>, Device) {
        let (session, mut device) = start_session(relay, buffer);
        assert_eq!(
            connack(&mut device, &relay.key).await,
            ConnectReturnCode::Success
        );
        subscribe(&mut device).await;
        (session, device)
    }

    fn stream_request(request_id: &str) -> StreamRequest {
        StreamRequest {
            stream_name: "Stream".into(),
            request_id: request_id.into(),
            url: "wss://localhost:8443/bridges/devstreams/d/1".into(),
            authorization_token: "token".into(),
            target: None,
            half_close: false,
            resume: None,
        }
    }

    async fn ends_promptly(session: JoinHandle<()>, what: &str) {
        tokio::time::timeout(PROMPTLY, session)
            .await
            .unwrap_or_else(|_| panic!("the session did not end: {what}"))
            .expect("the session task does not panic");
    }

    /// Sends stream requests to a device that reads none, until the
    /// session's writes must be blocked on the full pipe.
    async fn block_the_session_on_writes(relay: &Relay) {
        let handle = relay.state.presence.get(&identity()).expect("d is ready");
        for index in 0..40 {
            // Each request is ~150 bytes: 40 of them overflow a 1 KiB pipe.
            let _answer = handle
                .send_request(stream_request(&index.to_string()))
                .expect("the queue has room");
        }
        // Let the session take them and write until the pipe is full.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    #[tokio::test]
    async fn connect_subscribe_request_answer_then_replaced_then_drained() {
        let relay = relay(Limits::default());
        let (first_session, mut first) = start_session(&relay, 64 * 1024);
        assert_eq!(
            connack(&mut first, &relay.key).await,
            ConnectReturnCode::Success
        );
        assert!(
            relay.state.presence.get(&identity()).is_none(),
            "not ready for stream requests before it subscribes"
        );
        assert_eq!(
            subscribe(&mut first).await,
            [
                SubscribeReasonCode::Success(QoS::AtMostOnce),
                SubscribeReasonCode::Success(QoS::AtMostOnce),
                SubscribeReasonCode::Failure,
            ],
            "stream topics granted at QoS 0, other IoT Hub topics refused one by one"
        );
        let handle = relay
            .state
            .presence
            .get(&identity())
            .expect("ready once subscribed");

        // A stream request reaches the device; its QoS 1 answer is acknowledged and delivered.
        let answer = handle
            .send_request(stream_request("7"))
            .expect("the queue has room");
        let topic = match receive(&mut first).await {
            Some(Packet::Publish(publish)) => publish.topic,
            other => panic!("expected the stream request, got {other:?}"),
        };
        assert_eq!(
            StreamRequest::from_topic(&topic)
                .expect("a stream request topic")
                .request_id,
            "7"
        );
        let mut response = Publish::new(
            "$iothub/streams/res/200/?$rid=7",
            QoS::AtLeastOnce,
            Vec::new(),
        );
        response.pkid = 9;
        first
            .write_packet(&Packet::Publish(response))
            .await
            .expect("answer written");
        match receive(&mut first).await {
            Some(Packet::PubAck(ack)) => assert_eq!(ack.pkid, 9),
            other => panic!("expected PUBACK, got {other:?}"),
        }
        let answer = tokio::time::timeout(PROMPTLY, answer)
            .await
            .expect("the answer is delivered promptly")
            .expect("the session delivers it");
        assert_eq!(answer.status, 200);
        first
            .write_packet(&Packet::PingReq)
            .await
            .expect("PINGREQ written");
        assert_eq!(receive(&mut first).await, Some(Packet::PingResp));

        // A second connection of the same device replaces the first.
        let (second_session, mut second) = start_session(&relay, 64 * 1024);
        assert_eq!(
            connack(&mut second, &relay.key).await,
            ConnectReturnCode::Success
        );
        ends_promptly(first_session, "replaced").await;
        assert_eq!(receive(&mut first).await, None, "the first is closed");
        assert!(
            relay.state.presence.get(&identity()).is_none(),
            "the replacement is not ready before it subscribes"
        );
        subscribe(&mut second).await;
        assert_eq!(
            relay.state.presence.get(&identity()).map(|h| h.session_id),
            Some(handle.session_id + 1)
        );

        // A drain closes it.
        relay.state.stop_accepting.cancel();
        ends_promptly(second_session, "drained").await;
        assert_eq!(receive(&mut second).await, None);
        assert_eq!(relay.state.presence.connected_count(), 0);
    }

    #[tokio::test]
    async fn a_wrong_key_gets_connack_5_and_slows_its_source_down() {
        let relay = relay(Limits::default());
        for _ in 0..6 {
            let (session, mut device) = start_session(&relay, 4096);
            assert_eq!(
                connack(&mut device, b"not the key").await,
                ConnectReturnCode::NotAuthorized
            );
            assert_eq!(receive(&mut device).await, None, "closed after CONNACK");
            ends_promptly(session, "refused").await;
        }
        assert!(
            !relay
                .state
                .sources
                .failure_delay("127.0.0.1".parse().expect("an address"))
                .is_zero(),
            "failures are charged to the source"
        );
    }

    #[tokio::test]
    async fn connects_that_fail_authentication_do_not_spend_the_relay_budget() {
        let relay = relay(Limits {
            device_connects_per_second: 1,
            ..Limits::default()
        });
        for _ in 0..3 {
            let (_session, mut device) = start_session(&relay, 4096);
            assert_eq!(
                connack(&mut device, b"not the key").await,
                ConnectReturnCode::NotAuthorized
            );
        }
        let (_session, mut device) = start_session(&relay, 4096);
        assert_eq!(
            connack(&mut device, &relay.key).await,
            ConnectReturnCode::Success,
            "the relay-wide budget is still there for the real device"
        );
        let (_session, mut device) = start_session(&relay, 4096);
        assert_eq!(
            connack(&mut device, &relay.key).await,
            ConnectReturnCode::ServiceUnavailable,
            "past the budget, authenticated devices are told to retry later"
        );
    }

    #[tokio::test]
    async fn a_source_over_its_connect_budget_is_told_to_retry_later() {
        let mut limits = Limits::default();
        limits.sources.device_connects_per_second_per_source = 2;
        let relay = relay(limits);
        for _ in 0..2 {
            let (_session, mut device) = start_session(&relay, 4096);
            assert_eq!(
                connack(&mut device, &relay.key).await,
                ConnectReturnCode::Success
            );
        }
        let (_session, mut device) = start_session(&relay, 4096);
        assert_eq!(
            connack(&mut device, &relay.key).await,
            ConnectReturnCode::ServiceUnavailable
        );
    }

    #[tokio::test]
    async fn a_device_that_does_not_read_is_dropped_at_the_write_deadline() {
        let relay = relay(Limits {
            write_timeout: Duration::from_millis(300),
            ..Limits::default()
        });
        let (session, _device) = ready_device(&relay, 1024).await;
        block_the_session_on_writes(&relay).await;
        ends_promptly(session, "dropped at the write deadline").await;
        assert_eq!(relay.state.presence.connected_count(), 0);
    }

    #[tokio::test]
    async fn cancel_reaches_a_session_blocked_on_a_device_that_does_not_read() {
        let relay = relay(Limits {
            write_timeout: Duration::from_secs(300),
            ..Limits::default()
        });
        let (session, _device) = ready_device(&relay, 1024).await;
        block_the_session_on_writes(&relay).await;
        assert!(!session.is_finished(), "the session waits on its write");
        relay.state.presence.disconnect("d");
        ends_promptly(session, "cancelled (device removed)").await;
    }
}
