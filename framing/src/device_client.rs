//! The device side of the control channel: MQTT over WebSocket to the relay,
//! exactly as an IoT Hub device SDK would speak it.
//!
//! One background task owns the MQTT connection (reads, keep-alive pings,
//! answers), so the program can take its time deciding on one request while
//! the next arrives. [`DeviceClient`] holds that task and cancels it when
//! dropped; the connection's failure surfaces as the error of
//! [`DeviceClient::next_request`], which is the program's cue to re-dial.

use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::connection_string::ConnectionString;
use crate::mqtt::{
    Connect, ConnectReturnCode, MqttConnection, MqttError, Packet, Publish, QoS, Subscribe,
    SubscribeReasonCode,
};
use crate::topics::{
    StreamRequest, StreamResponse, STREAM_REQUESTS_FILTER, STREAM_RESPONSES_FILTER,
};
use crate::transport::Dialer;
use crate::websocket::{self, ClientWebSocket, WebSocketConnectError, WebSocketRequest};
use crate::{headers, sas};

/// Default bound of the stream requests waiting for the program: device-proxy's
/// default `--max-streams`, above the relay's default per-device limit (200),
/// so a burst the relay allows is never refused here.
pub const DEFAULT_MAX_WAITING_REQUESTS: usize = 256;

/// Default deadline for one write to the relay.
pub const DEFAULT_WRITE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct DeviceOptions {
    /// MQTT keep-alive; a ping goes out this often, and a relay silent for
    /// 1.5 × this long is declared dead.
    pub keep_alive: Duration,
    /// Deadline for dialing, TLS, WebSocket, CONNECT and SUBSCRIBE together.
    pub connect_timeout: Duration,
    /// Lifetime of the SAS token signed for each connection.
    pub token_lifetime: Duration,
    /// Stream requests received but not yet taken by the program; past it a
    /// request is rejected at once (400). Requests arrive in bursts (the
    /// relay sends a device's requests back to back, and a stalled network
    /// delivers them together), so this must be at least the number of
    /// streams the program will serve at once: device-proxy sets it to its
    /// `--max-streams`, which it would refuse past anyway.
    pub max_waiting_requests: usize,
    /// Deadline for each write to the relay; a relay that does not read
    /// for this long is given up (and re-dialed by the program).
    pub write_timeout: Duration,
}

impl Default for DeviceOptions {
    fn default() -> Self {
        Self {
            keep_alive: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(20),
            token_lifetime: Duration::from_secs(3600),
            max_waiting_requests: DEFAULT_MAX_WAITING_REQUESTS,
            write_timeout: DEFAULT_WRITE_TIMEOUT,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("cannot open the control channel: {0}")]
    WebSocket(#[from] WebSocketConnectError),
    #[error("control channel failed: {0}")]
    Mqtt(#[from] MqttError),
    #[error("the relay refused the device credentials (CONNACK {0:?}): check DEVICE_CONNECTION_STRING, `relay device show` prints the current one")]
    Refused(ConnectReturnCode),
    #[error("the relay refused the stream subscription")]
    SubscriptionRefused,
    #[error("the relay closed the control channel")]
    Closed,
    #[error("the relay stopped answering: nothing received for {0:?}")]
    RelaySilent(Duration),
    #[error("the relay stopped reading: a write took longer than {0:?}")]
    WriteTimeout(Duration),
    #[error("the relay did not complete the MQTT handshake within {0:?}")]
    HandshakeTimeout(Duration),
    #[error("the relay sent {0} during the handshake")]
    Unexpected(&'static str),
    #[error("the connection string has no DeviceId")]
    NoDeviceId,
}

enum Command {
    Answer(StreamResponse, oneshot::Sender<Result<(), ()>>),
}

/// A connected device.
pub struct DeviceClient {
    device_id: String,
    requests: mpsc::Receiver<StreamRequest>,
    commands: mpsc::Sender<Command>,
    cancel: CancellationToken,
    session: Option<JoinHandle<Result<(), DeviceError>>>,
}

impl DeviceClient {
    /// Dials the relay (through the dialer's proxy, if any) and completes
    /// CONNECT and SUBSCRIBE. `dialer` is a [`Dialer`] or a bare TLS
    /// configuration (direct).
    pub async fn connect(
        connection: &ConnectionString,
        dialer: impl Into<Dialer>,
        options: &DeviceOptions,
    ) -> Result<Self, DeviceError> {
        let dialer = dialer.into();
        let device_id = connection
            .device_id
            .clone()
            .ok_or(DeviceError::NoDeviceId)?;
        let handshake = Self::handshake(connection, &device_id, &dialer, options);
        let mqtt = tokio::time::timeout(options.connect_timeout, handshake)
            .await
            .map_err(|_| DeviceError::HandshakeTimeout(options.connect_timeout))??;
        let waiting = options.max_waiting_requests.max(1);
        let (request_sender, requests) = mpsc::channel(waiting);
        // Every answer belongs to a request taken from the queue above.
        let (commands, command_receiver) = mpsc::channel(waiting);
        let cancel = CancellationToken::new();
        let session = tokio::spawn(run_session(
            mqtt,
            request_sender,
            command_receiver,
            cancel.clone(),
            Timing {
                keep_alive: options.keep_alive,
                write_timeout: options.write_timeout,
            },
        ));
        Ok(Self {
            device_id,
            requests,
            commands,
            cancel,
            session: Some(session),
        })
    }

    async fn handshake(
        connection: &ConnectionString,
        device_id: &str,
        dialer: &Dialer,
        options: &DeviceOptions,
    ) -> Result<MqttConnection<ClientWebSocket>, DeviceError> {
        let url = format!("wss://{}/$iothub/websocket", connection.host_name);
        let socket = websocket::connect(
            WebSocketRequest {
                url: &url,
                authorization: None,
                subprotocol: Some("mqtt"),
                max_message_size: crate::mqtt::DEFAULT_MAX_PACKET_SIZE * 2,
                timeout: options.connect_timeout,
            },
            dialer,
        )
        .await?;
        let mut mqtt = MqttConnection::new(socket, crate::mqtt::DEFAULT_MAX_PACKET_SIZE);
        let (client_id, resource) = match &connection.module_id {
            Some(module) => (
                format!("{device_id}/{module}"),
                format!(
                    "{}/devices/{device_id}/modules/{module}",
                    connection.host_name
                ),
            ),
            None => (
                device_id.to_string(),
                format!("{}/devices/{device_id}", connection.host_name),
            ),
        };
        let password = sas::sign(
            &resource,
            connection.key(),
            SystemTime::now() + options.token_lifetime,
            None,
        );
        let mut connect = Connect::new(client_id.clone());
        connect.keep_alive = options.keep_alive.as_secs().clamp(1, u16::MAX as u64) as u16;
        connect.clean_session = false;
        connect.set_login(
            format!(
                "{}/{client_id}/?api-version={}&DeviceClientType=devstreams%2F{}",
                connection.host_name,
                headers::API_VERSION,
                env!("CARGO_PKG_VERSION")
            ),
            password,
        );
        mqtt.write_packet(&Packet::Connect(connect)).await?;
        match mqtt.read_packet().await? {
            Some(Packet::ConnAck(ack)) if ack.code == ConnectReturnCode::Success => {}
            Some(Packet::ConnAck(ack)) => return Err(DeviceError::Refused(ack.code)),
            Some(_) => return Err(DeviceError::Unexpected("a packet other than CONNACK")),
            None => return Err(DeviceError::Closed),
        }
        let subscribe = Subscribe::new_many([
            rumqttc::mqttbytes::v4::SubscribeFilter::new(
                STREAM_REQUESTS_FILTER.into(),
                QoS::AtMostOnce,
            ),
            rumqttc::mqttbytes::v4::SubscribeFilter::new(
                STREAM_RESPONSES_FILTER.into(),
                QoS::AtMostOnce,
            ),
        ]);
        let mut subscribe = subscribe;
        subscribe.pkid = 1;
        mqtt.write_packet(&Packet::Subscribe(subscribe)).await?;
        match mqtt.read_packet().await? {
            Some(Packet::SubAck(ack))
                if ack
                    .return_codes
                    .iter()
                    .all(|c| matches!(c, SubscribeReasonCode::Success(_))) => {}
            Some(Packet::SubAck(_)) => return Err(DeviceError::SubscriptionRefused),
            Some(_) => return Err(DeviceError::Unexpected("a packet other than SUBACK")),
            None => return Err(DeviceError::Closed),
        }
        Ok(mqtt)
    }

    pub fn device_id(&self) -> &str {
        &self.device_id
    }

    /// The next stream request; an error means the control channel is gone.
    pub async fn next_request(&mut self) -> Result<StreamRequest, DeviceError> {
        if let Some(request) = self.requests.recv().await {
            return Ok(request);
        }
        match self.session.take() {
            Some(session) => match session.await {
                Ok(Ok(())) => Err(DeviceError::Closed),
                Ok(Err(error)) => Err(error),
                Err(_) => Err(DeviceError::Closed),
            },
            None => Err(DeviceError::Closed),
        }
    }

    /// A handle that answers requests from other tasks.
    pub fn responder(&self) -> Responder {
        Responder {
            commands: self.commands.clone(),
        }
    }

    /// Closes the control channel politely (MQTT DISCONNECT).
    pub async fn disconnect(mut self) {
        self.cancel.cancel();
        if let Some(session) = self.session.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), session).await;
        }
    }
}

impl Drop for DeviceClient {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// Answers stream requests; cheap to clone.
#[derive(Clone)]
pub struct Responder {
    commands: mpsc::Sender<Command>,
}

impl Responder {
    /// Accepts; carries half-close when the service asked for it. Never
    /// agrees to a resumable session (see [`Responder::accept_with`]).
    pub async fn accept(&self, request: &StreamRequest) -> Result<(), DeviceError> {
        self.accept_with(request, false).await
    }

    /// Accepts, agreeing to a resumable session when the service asked for
    /// one and `resume` is true.
    pub async fn accept_with(
        &self,
        request: &StreamRequest,
        resume: bool,
    ) -> Result<(), DeviceError> {
        self.answer(StreamResponse {
            request_id: request.request_id.clone(),
            status: 200,
            half_close: request.half_close,
            resume: resume && request.resume.is_some(),
        })
        .await
    }

    /// Rejects (status 400).
    pub async fn reject(&self, request: &StreamRequest) -> Result<(), DeviceError> {
        self.answer(StreamResponse {
            request_id: request.request_id.clone(),
            status: 400,
            half_close: false,
            resume: false,
        })
        .await
    }

    async fn answer(&self, response: StreamResponse) -> Result<(), DeviceError> {
        let (done, written) = oneshot::channel();
        self.commands
            .send(Command::Answer(response, done))
            .await
            .map_err(|_| DeviceError::Closed)?;
        written
            .await
            .map_err(|_| DeviceError::Closed)?
            .map_err(|_| DeviceError::Closed)
    }
}

/// The session's clocks.
struct Timing {
    keep_alive: Duration,
    write_timeout: Duration,
}

/// Writes one packet within `write_timeout`: a relay that stops reading
/// must not wedge the session (it would never see cancel or its own silence).
async fn write_within(
    mqtt: &mut MqttConnection<ClientWebSocket>,
    packet: &Packet,
    write_timeout: Duration,
) -> Result<(), DeviceError> {
    match tokio::time::timeout(write_timeout, mqtt.write_packet(packet)).await {
        Ok(result) => Ok(result?),
        Err(_) => Err(DeviceError::WriteTimeout(write_timeout)),
    }
}

async fn run_session(
    mut mqtt: MqttConnection<ClientWebSocket>,
    requests: mpsc::Sender<StreamRequest>,
    mut commands: mpsc::Receiver<Command>,
    cancel: CancellationToken,
    timing: Timing,
) -> Result<(), DeviceError> {
    let Timing {
        keep_alive,
        write_timeout,
    } = timing;
    let silence_limit = keep_alive + keep_alive / 2;
    let mut last_received = Instant::now();
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + keep_alive, keep_alive);
    loop {
        let silence_deadline = tokio::time::Instant::from_std(last_received + silence_limit);
        tokio::select! {
            _ = cancel.cancelled() => {
                if write_within(&mut mqtt, &Packet::Disconnect, write_timeout.min(Duration::from_secs(2))).await.is_ok() {
                    let _ = tokio::time::timeout(write_timeout, mqtt.shutdown()).await;
                }
                return Ok(());
            }
            _ = tokio::time::sleep_until(silence_deadline) => return Err(DeviceError::RelaySilent(silence_limit)),
            _ = ping.tick() => write_within(&mut mqtt, &Packet::PingReq, write_timeout).await?,
            Some(Command::Answer(response, done)) = commands.recv() => {
                let publish = Publish::new(response.to_topic(), QoS::AtMostOnce, Vec::new());
                let result = write_within(&mut mqtt, &Packet::Publish(publish), write_timeout).await;
                let _ = done.send(result.as_ref().map(|_| ()).map_err(|_| ()));
                result?;
            }
            packet = mqtt.read_packet() => {
                last_received = Instant::now();
                match packet? {
                    None => return Err(DeviceError::Closed),
                    Some(Packet::Publish(publish)) => {
                        let Ok(request) = StreamRequest::from_topic(&publish.topic) else {
                            tracing::debug!(topic = %publish.topic.split('?').next().unwrap_or_default(), "ignoring a publish that is not a stream request");
                            continue;
                        };
                        if let Err(mpsc::error::TrySendError::Full(request)) = requests.try_send(request) {
                            tracing::warn!(request_id = %request.request_id, limit = requests.max_capacity(), "too many stream requests waiting; rejecting");
                            let response = StreamResponse { request_id: request.request_id, status: 400, half_close: false, resume: false };
                            write_within(&mut mqtt, &Packet::Publish(Publish::new(response.to_topic(), QoS::AtMostOnce, Vec::new())), write_timeout).await?;
                        }
                    }
                    Some(Packet::Disconnect) => return Err(DeviceError::Closed),
                    Some(_) => {}
                }
            }
        }
    }
}
