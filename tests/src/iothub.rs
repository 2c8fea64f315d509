//! Clients that behave like IoT Hub's published SDKs, for the interop tests.
//!
//! [`CSdkDevice`] speaks MQTT 3.1.1 over TLS to the relay's 8883 listener
//! exactly as IoT Hub's C device SDK does: its CONNECT fields, its SAS token
//! (resource not encoded, an empty `&skn=` at the end, as the SDK's
//! `SASToken_Create` built it for device keys), its two QoS 0
//! subscriptions, and its own reading of the stream request topic. The
//! topic is parsed here independently of `framing::topics`, strictly, so a
//! relay that drifted from IoT Hub's form fails these tests rather than
//! pass against its own parser.
//!
//! [`websocket_upgrade`] sends a WebSocket upgrade whose every header the
//! test chooses and returns the answer head as sent, for checking the
//! streaming endpoint byte for byte.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::Engine;
use framing::mqtt::{
    ByteTransport, Connect, ConnectReturnCode, MqttConnection, MqttError, Packet, Publish, QoS,
    Subscribe, SubscribeFilter, SubscribeReasonCode,
};
use framing::transport::NetworkStream;
use hmac::{Hmac, Mac};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::WebSocketStream;

/// The api-version in the C SDK's MQTT username.
pub const C_SDK_API_VERSION: &str = "2020-09-30";
/// The C SDK's `DeviceClientType`, URL-encoded as it sends it.
pub const C_SDK_CLIENT_TYPE: &str = "iothubclient%2f1.6.0%20(native%3b%20Linux%3b%20x86_64)";
/// The C SDK's default MQTT keep-alive, seconds.
pub const C_SDK_KEEP_ALIVE: u16 = 240;
/// Deadline for any single answer the tests wait for.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// An MQTT connection over TLS to the relay's MQTT listener.
pub type MqttOverTls = MqttConnection<ByteTransport<NetworkStream>>;

/// A device SAS token as the C SDK signs it for a device key.
pub fn c_sdk_device_token(resource: &str, key: &[u8], expiry: SystemTime) -> String {
    let expiry_seconds = expiry
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(format!("{resource}\n{expiry_seconds}").as_bytes());
    let signature = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    let signature =
        percent_encoding::utf8_percent_encode(&signature, percent_encoding::NON_ALPHANUMERIC);
    format!("SharedAccessSignature sr={resource}&sig={signature}&se={expiry_seconds}&skn=")
}

/// The CONNECT the C SDK sends for a device (or a module when `module_id` is set).
pub fn c_sdk_connect(
    host_name: &str,
    device_id: &str,
    module_id: Option<&str>,
    key: &[u8],
    keep_alive: u16,
) -> Connect {
    let (client_id, resource) = match module_id {
        Some(module_id) => (
            format!("{device_id}/{module_id}"),
            format!("{host_name}/devices/{device_id}/modules/{module_id}"),
        ),
        None => (
            device_id.to_string(),
            format!("{host_name}/devices/{device_id}"),
        ),
    };
    let mut connect = Connect::new(client_id.clone());
    connect.keep_alive = keep_alive;
    connect.clean_session = false;
    let username = format!("{host_name}/{client_id}/?api-version={C_SDK_API_VERSION}&DeviceClientType={C_SDK_CLIENT_TYPE}");
    connect.set_login(
        username,
        c_sdk_device_token(
            &resource,
            key,
            SystemTime::now() + Duration::from_secs(3600),
        ),
    );
    connect
}

/// Dials the MQTT listener on loopback with TLS, presenting `server_name` (SNI).
pub async fn dial_mqtt(
    port: u16,
    server_name: &str,
    tls: &Arc<rustls::ClientConfig>,
) -> MqttOverTls {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("the MQTT listener accepts TCP");
    let name = rustls_pki_types::ServerName::try_from(server_name.to_string())
        .expect("a valid TLS server name");
    let stream = tokio_rustls::TlsConnector::from(tls.clone())
        .connect(name, tcp)
        .await
        .expect("TLS with the relay's certificate on the MQTT listener");
    let stream = NetworkStream::Tls(Box::new(tokio_rustls::TlsStream::Client(stream)));
    MqttConnection::new(
        ByteTransport(stream),
        framing::mqtt::DEFAULT_MAX_PACKET_SIZE,
    )
}

/// What the next read gave, within a deadline.
#[derive(Debug)]
pub enum Received {
    Packet(Packet),
    /// The relay closed the connection (cleanly or not).
    Closed,
    /// Nothing within the deadline.
    Nothing,
}

/// Reads one packet, or says the connection closed, or that nothing came.
pub async fn receive(mqtt: &mut MqttOverTls, timeout: Duration) -> Received {
    match tokio::time::timeout(timeout, mqtt.read_packet()).await {
        Ok(Ok(Some(packet))) => Received::Packet(packet),
        Ok(Ok(None)) | Ok(Err(MqttError::Io(_))) => Received::Closed,
        Ok(Err(error)) => panic!("the relay sent something that is not MQTT: {error}"),
        Err(_) => Received::Nothing,
    }
}

/// A stream request as the C SDK reads it from the topic.
#[derive(Debug, Clone)]
pub struct IotHubStreamRequest {
    pub topic: String,
    pub stream_name: String,
    pub request_id: String,
    /// `$url` after percent-decoding.
    pub url: String,
    /// `$auth` verbatim: the C SDK never decodes it.
    pub authorization_token: String,
}

impl IotHubStreamRequest {
    /// Parses strictly: five levels, `?key=value` pairs split on `&` and `=`,
    /// and exactly one `=` per pair (a `=` inside a value breaks splitters).
    pub fn parse(topic: &str) -> Result<Self, String> {
        let levels: Vec<&str> = topic.split('/').collect();
        let [dollar_iothub, streams, post, stream_name, query] = levels.as_slice() else {
            return Err(format!(
                "topic has {} '/'-separated levels, IoT Hub SDKs need exactly 5: {topic}",
                levels.len()
            ));
        };
        if (*dollar_iothub, *streams, *post) != ("$iothub", "streams", "POST") {
            return Err(format!("not a stream request topic: {topic}"));
        }
        let query = query
            .strip_prefix('?')
            .ok_or_else(|| format!("the fifth level does not start with '?': {topic}"))?;
        let (mut request_id, mut url, mut authorization_token) = (None, None, None);
        for pair in query.split('&') {
            let parts: Vec<&str> = pair.split('=').collect();
            let [name, value] = parts.as_slice() else {
                return Err(format!(
                    "query pair {pair:?} does not split into exactly key=value"
                ));
            };
            match *name {
                "$rid" => request_id = Some(value.to_string()),
                "$url" => {
                    let decoded = percent_encoding::percent_decode_str(value)
                        .decode_utf8()
                        .map_err(|_| "$url is not UTF-8")?;
                    url = Some(decoded.into_owned());
                }
                "$auth" => authorization_token = Some(value.to_string()),
                _ => {}
            }
        }
        Ok(Self {
            topic: topic.to_string(),
            stream_name: stream_name.to_string(),
            request_id: request_id.ok_or("no $rid")?,
            url: url.ok_or("no $url")?,
            authorization_token: authorization_token.ok_or("no $auth")?,
        })
    }

    /// A query value exactly as it appears in the topic (not decoded).
    pub fn raw_value(&self, name: &str) -> Option<&str> {
        let query = self.topic.rsplit('/').next()?.strip_prefix('?')?;
        query.split('&').find_map(|pair| {
            pair.strip_prefix(name)
                .and_then(|rest| rest.strip_prefix('='))
        })
    }
}

/// A device that behaves like IoT Hub's C device SDK, over TLS on 8883.
pub struct CSdkDevice {
    pub mqtt: MqttOverTls,
    next_packet_id: u16,
}

impl CSdkDevice {
    /// Dials, sends the C SDK's CONNECT and returns the CONNACK code with the connection.
    pub async fn connect_raw(
        port: u16,
        tls: &Arc<rustls::ClientConfig>,
        connect: Connect,
    ) -> (ConnectReturnCode, MqttOverTls) {
        let mut mqtt = dial_mqtt(port, "localhost", tls).await;
        mqtt.write_packet(&Packet::Connect(connect))
            .await
            .expect("CONNECT sent");
        match receive(&mut mqtt, ANSWER_TIMEOUT).await {
            Received::Packet(Packet::ConnAck(ack)) => (ack.code, mqtt),
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    /// CONNECT as the C SDK (accepted), then its two QoS 0 subscriptions.
    pub async fn connect(
        port: u16,
        tls: &Arc<rustls::ClientConfig>,
        connection_string: &str,
        module_id: Option<&str>,
        keep_alive: u16,
    ) -> CSdkDevice {
        let connection = framing::ConnectionString::parse_device(connection_string)
            .expect("a device connection string");
        let device_id = connection
            .device_id
            .clone()
            .expect("the connection string names a device");
        // The C SDK cannot take a port: its HostName is the bare host.
        let host = connection.host().to_string();
        let connect = c_sdk_connect(&host, &device_id, module_id, connection.key(), keep_alive);
        let (code, mqtt) = Self::connect_raw(port, tls, connect).await;
        assert_eq!(
            code,
            ConnectReturnCode::Success,
            "a C SDK style CONNECT is accepted"
        );
        let mut device = CSdkDevice::from_connection(mqtt);
        let codes = device
            .subscribe(&[
                framing::topics::STREAM_REQUESTS_FILTER,
                framing::topics::STREAM_RESPONSES_FILTER,
            ])
            .await;
        assert!(
            codes
                .iter()
                .all(|code| *code == SubscribeReasonCode::Success(QoS::AtMostOnce)),
            "both stream subscriptions are granted at QoS 0: {codes:?}"
        );
        device
    }

    /// Takes over a connection whose CONNECT was already accepted.
    pub fn from_connection(mqtt: MqttOverTls) -> CSdkDevice {
        CSdkDevice {
            mqtt,
            next_packet_id: 1,
        }
    }

    fn packet_id(&mut self) -> u16 {
        let id = self.next_packet_id;
        self.next_packet_id = self.next_packet_id.checked_add(1).unwrap_or(1);
        id
    }

    /// One SUBSCRIBE at QoS 0 for all `filters`; returns the SUBACK codes.
    pub async fn subscribe(&mut self, filters: &[&str]) -> Vec<SubscribeReasonCode> {
        let mut subscribe = Subscribe::new_many(
            filters
                .iter()
                .map(|filter| SubscribeFilter::new(filter.to_string(), QoS::AtMostOnce)),
        );
        subscribe.pkid = self.packet_id();
        self.mqtt
            .write_packet(&Packet::Subscribe(subscribe.clone()))
            .await
            .expect("SUBSCRIBE sent");
        match receive(&mut self.mqtt, ANSWER_TIMEOUT).await {
            Received::Packet(Packet::SubAck(ack)) => {
                assert_eq!(ack.pkid, subscribe.pkid, "SUBACK answers our SUBSCRIBE");
                assert_eq!(
                    ack.return_codes.len(),
                    filters.len(),
                    "one SUBACK code per filter"
                );
                ack.return_codes
            }
            other => panic!("expected SUBACK, got {other:?}"),
        }
    }

    /// The next stream request, skipping PINGRESPs; panics on anything else.
    pub async fn next_stream_request(&mut self) -> IotHubStreamRequest {
        loop {
            match receive(&mut self.mqtt, ANSWER_TIMEOUT * 3).await {
                Received::Packet(Packet::Publish(publish)) => {
                    assert_eq!(
                        publish.qos,
                        QoS::AtMostOnce,
                        "stream requests come at QoS 0"
                    );
                    assert!(
                        publish.payload.is_empty(),
                        "stream requests have an empty payload"
                    );
                    return IotHubStreamRequest::parse(&publish.topic)
                        .unwrap_or_else(|reason| panic!("{reason}"));
                }
                Received::Packet(Packet::PingResp) => continue,
                other => panic!("expected a stream request, got {other:?}"),
            }
        }
    }

    /// Publishes `$iothub/streams/res/{status}/?$rid={rid}`; at QoS 1 waits
    /// for the PUBACK of that packet id.
    pub async fn answer(&mut self, request_id: &str, status: u16, qos: QoS) {
        let mut publish = Publish::new(
            format!("$iothub/streams/res/{status}/?$rid={request_id}"),
            qos,
            Vec::new(),
        );
        if qos != QoS::AtMostOnce {
            publish.pkid = self.packet_id();
        }
        self.mqtt
            .write_packet(&Packet::Publish(publish.clone()))
            .await
            .expect("answer sent");
        if qos == QoS::AtLeastOnce {
            match receive(&mut self.mqtt, ANSWER_TIMEOUT).await {
                Received::Packet(Packet::PubAck(ack)) => {
                    assert_eq!(ack.pkid, publish.pkid, "PUBACK names our packet id")
                }
                other => panic!("expected PUBACK for a QoS 1 answer, got {other:?}"),
            }
        }
    }

    /// PINGREQ, and the very next packet must be PINGRESP.
    pub async fn ping(&mut self) {
        self.mqtt
            .write_packet(&Packet::PingReq)
            .await
            .expect("PINGREQ sent");
        match receive(&mut self.mqtt, ANSWER_TIMEOUT).await {
            Received::Packet(Packet::PingResp) => {}
            other => panic!("expected PINGRESP, got {other:?}"),
        }
    }
}

/// A WebSocket upgrade's answer: status, headers exactly as sent, and the socket on 101.
pub struct UpgradeAnswer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub socket: Option<WebSocketStream<NetworkStream>>,
}

impl UpgradeAnswer {
    /// Whether a header is present, its name compared case-insensitively.
    pub fn has_header(&self, name: &str) -> bool {
        self.headers
            .iter()
            .any(|(header, _)| header.eq_ignore_ascii_case(name))
    }
}

/// The `Sec-WebSocket-Key` our raw upgrades send, and the accept it implies (RFC 6455 §1.3).
const WEBSOCKET_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
const WEBSOCKET_ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

/// Sends `GET <path of url>` with the upgrade headers plus `headers` (a
/// `Host` in `headers` replaces the default) over TLS to the relay's main port.
pub async fn websocket_upgrade(
    port: u16,
    url: &str,
    headers: &[(&str, &str)],
    tls: &Arc<rustls::ClientConfig>,
) -> UpgradeAnswer {
    let path = url
        .split_once("://")
        .and_then(|(_, rest)| rest.find('/').map(|slash| &rest[slash..]))
        .unwrap_or("/");
    let mut request = format!(
        "GET {path} HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {WEBSOCKET_KEY}\r\n"
    );
    if !headers
        .iter()
        .any(|(name, _)| name.eq_ignore_ascii_case("host"))
    {
        request.push_str(&format!("Host: localhost:{port}\r\n"));
    }
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    let mut stream = framing::transport::connect("localhost", port, Some(tls), ANSWER_TIMEOUT)
        .await
        .expect("TLS connection to the relay's main port");
    stream
        .write_all(request.as_bytes())
        .await
        .expect("upgrade request written");
    // Byte by byte up to the blank line, so no WebSocket frame is read early.
    let mut head = Vec::new();
    let read_head = async {
        while !head.ends_with(b"\r\n\r\n") && head.len() < 16 * 1024 {
            match stream.read_u8().await {
                Ok(byte) => head.push(byte),
                Err(_) => break,
            }
        }
    };
    tokio::time::timeout(ANSWER_TIMEOUT, read_head)
        .await
        .expect("the relay answers the upgrade in time");
    let text = String::from_utf8_lossy(&head).to_string();
    let mut lines = text.split("\r\n");
    let status = lines
        .next()
        .and_then(|line| line.split(' ').nth(1))
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.to_string(), value.trim().to_string()))
        .collect();
    let socket = match status {
        101 => {
            let accept = headers
                .iter()
                .find(|(name, _)| name.eq_ignore_ascii_case("sec-websocket-accept"))
                .map(|(_, v)| v.as_str());
            assert_eq!(
                accept,
                Some(WEBSOCKET_ACCEPT),
                "Sec-WebSocket-Accept answers our key"
            );
            Some(WebSocketStream::from_raw_socket(stream, Role::Client, None).await)
        }
        _ => None,
    };
    UpgradeAnswer {
        status,
        headers,
        socket,
    }
}

/// The stream-creation request IoT Hub's service SDKs send, with both
/// timeout headers; `authorization` is the service SAS token.
pub fn stream_creation_request(
    path_and_query: &str,
    port: u16,
    authorization: &str,
    connect_timeout: u64,
    response_timeout: u64,
) -> String {
    format!(
        "POST {path_and_query} HTTP/1.1\r\nHost: localhost:{port}\r\nAuthorization: {authorization}\r\n\
         iothub-streaming-connect-timeout-in-seconds: {connect_timeout}\r\n\
         iothub-streaming-response-timeout-in-seconds: {response_timeout}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
}

/// A service SAS token for the relay's `service` policy.
pub fn service_token(service_connection_string: &str) -> String {
    let connection = framing::ConnectionString::parse_service(service_connection_string)
        .expect("service string");
    framing::sas::sign(
        &connection.host_name,
        connection.key(),
        SystemTime::now() + Duration::from_secs(3600),
        Some("service"),
    )
}

/// A header's value by exact (case-sensitive) name.
pub fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(header, _)| header == name)
        .map(|(_, value)| value.as_str())
}
