//! What the relay answers: stream creation outcomes and their status codes,
//! credential refusals on REST and MQTT, and registry changes while serving.
//! Clients here are the real `framing` clients or raw bytes on TLS.

use std::time::{Duration, Instant, SystemTime};

use devstreams_tests::{
    raw_https, start_device_proxy, start_echo_server, start_service_proxy,
    wait_until_device_connected, Relay,
};
use framing::mqtt::{ConnectReturnCode, MqttConnection, Packet};
use framing::{
    ConnectionString, CreateStreamError, DeviceClient, DeviceError, DeviceOptions, ServiceClient,
    StreamOptions,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn service(relay: &Relay) -> ServiceClient {
    ServiceClient::new(
        ConnectionString::parse_service(&relay.service_connection_string).expect("service string"),
        relay.tls(),
    )
}

fn short_options(target: Option<&str>) -> StreamOptions {
    StreamOptions {
        connect_timeout: Duration::from_secs(2),
        response_timeout: Duration::from_secs(10),
        target: target.map(str::to_string),
        half_close: false,
    }
}

fn stream_request(
    relay: &Relay,
    device_id: &str,
    authorization: &str,
    connect_timeout_seconds: u64,
) -> String {
    format!(
        "POST /twins/{device_id}/streams/TestStream?api-version=2018-10-20-preview HTTP/1.1\r\nHost: localhost:{}\r\n\
         Authorization: {authorization}\r\niothub-streaming-connect-timeout-in-seconds: {connect_timeout_seconds}\r\n\
         iothub-streaming-response-timeout-in-seconds: 10\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        relay.port()
    )
}

fn service_token(relay: &Relay, expiry: SystemTime) -> String {
    let connection =
        ConnectionString::parse_service(&relay.service_connection_string).expect("service string");
    framing::sas::sign(
        &connection.host_name,
        connection.key(),
        expiry,
        Some("service"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_rejects_a_port_it_does_not_expose() {
    let relay = Relay::start(&[]).await;
    let (echo_port, _echo) = start_echo_server().await;
    let connection_string = relay.add_device("MyDevice").await;
    let _device_proxy = start_device_proxy(&relay, &connection_string, echo_port, &[]).await;
    wait_until_device_connected(&relay, "MyDevice").await;

    let invitation = service(&relay)
        .create_stream("MyDevice", "TestStream", &short_options(Some("1")))
        .await
        .expect("relay answers");
    assert!(!invitation.is_accepted, "port 1 is not exposed");
    assert!(invitation
        .rejection_reason
        .is_some_and(|reason| reason.contains("rejected")));

    let exposed = echo_port.to_string();
    let invitation = service(&relay)
        .create_stream("MyDevice", "TestStream", &short_options(Some(&exposed)))
        .await
        .expect("relay answers");
    assert!(invitation.is_accepted, "the exposed port is accepted");

    // Through service-proxy: a local connection is closed promptly, with a log line saying why.
    let (service_proxy, local_port) =
        start_service_proxy(&relay, "MyDevice", &["--target-port", "1"]).await;
    let mut local = tokio::net::TcpStream::connect(("127.0.0.1", local_port))
        .await
        .expect("service-proxy accepts");
    let started = Instant::now();
    let mut buffer = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(10), local.read(&mut buffer))
        .await
        .expect("closed promptly, not hanging");
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "no data arrives from a rejected stream"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    // service-proxy says why.
    service_proxy
        .wait_for_log("reject", Duration::from_secs(5))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_cross_service_proxy_and_device_proxy_to_a_tcp_echo_server() {
    let relay = Relay::start(&[]).await;
    let (echo_port, _echo) = start_echo_server().await;
    let connection_string = relay.add_device("MyDevice").await;
    let _device_proxy = start_device_proxy(&relay, &connection_string, echo_port, &[]).await;
    wait_until_device_connected(&relay, "MyDevice").await;
    let (_service_proxy, local_port) = start_service_proxy(&relay, "MyDevice", &[]).await;
    let mut local = tokio::net::TcpStream::connect(("127.0.0.1", local_port))
        .await
        .expect("connect");
    let payload: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let (mut reader, mut writer) = local.split();
    let write = async {
        writer.write_all(&payload).await.expect("write");
        // Half-close: the echo server sees EOF, finishes echoing, and closes.
        writer.shutdown().await.expect("shutdown write side");
    };
    let mut echoed = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(30), reader.read_to_end(&mut echoed));
    let (_, read) = tokio::join!(write, read);
    read.expect("echo completes").expect("read");
    assert_eq!(
        echoed.len(),
        payload.len(),
        "the whole response arrives after our half-close"
    );
    assert!(echoed == payload);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_service_key_is_refused_with_401() {
    let relay = Relay::start(&[]).await;
    relay.add_device("MyDevice").await;
    let host = ConnectionString::parse_service(&relay.service_connection_string)
        .expect("parse")
        .host_name;
    let wrong =
        ConnectionString::for_policy(&host, "service", "d3JvbmctLWtleS0td3JvbmctLWtleS0td3Jvbmc=")
            .expect("string");
    let result = ServiceClient::new(wrong, relay.tls())
        .create_stream("MyDevice", "TestStream", &short_options(None))
        .await;
    assert!(
        matches!(result, Err(CreateStreamError::Unauthorized(_))),
        "{result:?}"
    );

    let wrong_policy =
        ConnectionString::for_policy(&host, "nosuchpolicy", "d3Jvbmc=").expect("string");
    let result = ServiceClient::new(wrong_policy, relay.tls())
        .create_stream("MyDevice", "TestStream", &short_options(None))
        .await;
    assert!(
        matches!(result, Err(CreateStreamError::Unauthorized(_))),
        "{result:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_service_token_is_refused_with_401_and_a_json_reason() {
    let relay = Relay::start(&[]).await;
    relay.add_device("MyDevice").await;
    let expired = service_token(&relay, SystemTime::now() - Duration::from_secs(3600));
    let (status, _, body) =
        raw_https(&relay, &stream_request(&relay, "MyDevice", &expired, 2)).await;
    assert_eq!(status, 401);
    let body: serde_json::Value = serde_json::from_str(&body).expect("JSON error body");
    assert!(body["errorCode"].as_i64().is_some());
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|m| m.contains("expired")),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_device_is_404() {
    let relay = Relay::start(&[]).await;
    let result = service(&relay)
        .create_stream("Ghost", "TestStream", &short_options(None))
        .await;
    assert!(
        matches!(result, Err(CreateStreamError::DeviceNotFound(_))),
        "{result:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_device_is_404103_within_the_connect_timeout() {
    let relay = Relay::start(&[]).await;
    relay.add_device("Sleepy").await;
    let token = service_token(&relay, SystemTime::now() + Duration::from_secs(600));
    let started = Instant::now();
    let (status, _, body) = raw_https(&relay, &stream_request(&relay, "Sleepy", &token, 2)).await;
    let waited = started.elapsed();
    assert_eq!(status, 404);
    let body: serde_json::Value = serde_json::from_str(&body).expect("JSON error body");
    assert_eq!(body["errorCode"], 404103);
    assert!(
        waited >= Duration::from_secs(2) && waited < Duration::from_secs(6),
        "answered after {waited:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_stream_answer_has_iothub_headers_exactly() {
    let relay = Relay::start(&[]).await;
    let connection_string = relay.add_device("MyDevice").await;
    let device = DeviceClient::connect(
        &ConnectionString::parse_device(&connection_string).expect("device"),
        &relay.tls(),
        &DeviceOptions::default(),
    )
    .await
    .expect("device connects");
    let responder = device.responder();
    let accept_one = async move {
        let mut device = device;
        let request = device.next_request().await.expect("a request arrives");
        assert_eq!(request.stream_name, "TestStream");
        responder.accept(&request).await.expect("accepted");
        device
    };
    let token = service_token(&relay, SystemTime::now() + Duration::from_secs(600));
    let request = stream_request(&relay, "MyDevice", &token, 5);
    let (answer, _device) = tokio::join!(raw_https(&relay, &request), accept_one);
    let (status, headers, _) = answer;
    assert_eq!(status, 200);
    let header = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    };
    assert_eq!(
        header("iothub-streaming-is-accepted").as_deref(),
        Some("True")
    );
    assert!(header("iothub-streaming-url")
        .is_some_and(|url| url.starts_with("wss://") && url.contains("/bridges/")));
    assert!(
        header("iothub-streaming-auth-token").is_some_and(|token| token.split('.').count() == 3)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_device_key_gets_connack_not_authorized() {
    let relay = Relay::start(&[]).await;
    let real =
        ConnectionString::parse_device(&relay.add_device("MyDevice").await).expect("device string");
    let wrong = ConnectionString::for_device(
        &real.host_name,
        "MyDevice",
        "d3JvbmctLWtleS0td3JvbmctLWtleS0td3Jvbmc=",
    )
    .expect("string");
    let result = DeviceClient::connect(&wrong, &relay.tls(), &DeviceOptions::default()).await;
    assert!(
        matches!(
            result,
            Err(DeviceError::Refused(ConnectReturnCode::NotAuthorized))
        ),
        "{:?}",
        result.err()
    );
    let unknown =
        ConnectionString::for_device(&real.host_name, "Ghost", "d3Jvbmc=").expect("string");
    let result = DeviceClient::connect(&unknown, &relay.tls(), &DeviceOptions::default()).await;
    assert!(
        matches!(
            result,
            Err(DeviceError::Refused(ConnectReturnCode::NotAuthorized))
        ),
        "{:?}",
        result.err()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_device_token_gets_connack_refusal() {
    let relay = Relay::start(&[]).await;
    let device =
        ConnectionString::parse_device(&relay.add_device("MyDevice").await).expect("device string");
    let url = format!("wss://{}/$iothub/websocket", device.host_name);
    let socket = framing::websocket::connect(
        framing::websocket::WebSocketRequest {
            url: &url,
            authorization: None,
            subprotocol: Some("mqtt"),
            max_message_size: 65536,
            timeout: Duration::from_secs(10),
        },
        &relay.tls(),
    )
    .await
    .expect("WebSocket opens");
    let mut mqtt = MqttConnection::new(socket, 65536);
    let resource = format!("{}/devices/MyDevice", device.host_name);
    let password = framing::sas::sign(
        &resource,
        device.key(),
        SystemTime::now() - Duration::from_secs(3600),
        None,
    );
    let mut connect = framing::mqtt::Connect::new("MyDevice");
    connect.set_login(
        format!("{}/MyDevice/?api-version=2021-04-12", device.host_name),
        password,
    );
    mqtt.write_packet(&Packet::Connect(connect))
        .await
        .expect("CONNECT sent");
    match tokio::time::timeout(Duration::from_secs(10), mqtt.read_packet())
        .await
        .expect("answer in time")
    {
        Ok(Some(Packet::ConnAck(ack))) => assert_eq!(ack.code, ConnectReturnCode::NotAuthorized),
        other => panic!("expected a CONNACK refusal, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_added_while_the_relay_runs_connects_and_removed_device_is_cut() {
    let relay = Relay::start(&[]).await;
    let connection = ConnectionString::parse_device(&relay.add_device("LateDevice").await)
        .expect("device string");
    // At once, on the first attempt: the relay checks the registry file
    // again before it refuses an identity it does not know.
    let mut device = DeviceClient::connect(&connection, &relay.tls(), &DeviceOptions::default())
        .await
        .expect("a device added while the relay runs connects at once, without a restart");
    let output = relay.cli(&["device", "remove", "LateDevice"]).await;
    assert!(output.status.success());
    let ended = tokio::time::timeout(Duration::from_secs(5), device.next_request()).await;
    assert!(
        matches!(ended, Ok(Err(_))),
        "the removed device's control channel is closed within seconds"
    );
    let again = DeviceClient::connect(&connection, &relay.tls(), &DeviceOptions::default()).await;
    assert!(
        matches!(again, Err(DeviceError::Refused(_))),
        "a removed device cannot reconnect"
    );
}

/// The first line of a `relay` CLI command that must succeed.
async fn cli_line(relay: &Relay, arguments: &[&str]) -> String {
    let output = relay.cli(arguments).await;
    assert!(
        output.status.success(),
        "relay {arguments:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotating_a_key_cuts_the_session_opened_with_the_old_key_at_once() {
    let relay = Relay::start(&[]).await;
    let old_key =
        ConnectionString::parse_device(&relay.add_device("Rotated").await).expect("device string");
    let options = DeviceOptions::default();
    let mut device = DeviceClient::connect(&old_key, &relay.tls(), &options)
        .await
        .expect("the device connects with its first key");

    let rotated = cli_line(&relay, &["device", "rotate-key", "Rotated"]).await;
    let new_key = ConnectionString::parse_device(&rotated).expect("rotate-key prints a string");
    assert_ne!(new_key.key(), old_key.key());
    let ended = tokio::time::timeout(Duration::from_secs(2), device.next_request()).await;
    assert!(
        matches!(ended, Ok(Err(_))),
        "the session opened with the rotated-out key is closed within 2 s, not left usable: {:?}",
        ended.map(|result| result.map(|request| request.stream_name))
    );
    let again = DeviceClient::connect(&old_key, &relay.tls(), &options).await;
    assert!(
        matches!(
            again,
            Err(DeviceError::Refused(ConnectReturnCode::NotAuthorized))
        ),
        "the old key is refused with CONNACK 5: {:?}",
        again.err()
    );
    let mut device = DeviceClient::connect(&new_key, &relay.tls(), &options)
        .await
        .expect("the new key works at once");

    // The secondary key is the device's too: rotating it cuts as well.
    cli_line(&relay, &["device", "rotate-key", "Rotated", "--secondary"]).await;
    let ended = tokio::time::timeout(Duration::from_secs(2), device.next_request()).await;
    assert!(
        matches!(ended, Ok(Err(_))),
        "rotating the secondary key closes the device's session too"
    );
    DeviceClient::connect(&new_key, &relay.tls(), &options)
        .await
        .expect("the primary key, unchanged, still works");
}

/// IoT Hub allows `# ? = @` and the rest of its set in ids; each must work
/// end to end: the CLI, the device's CONNECT and SAS token, the REST path,
/// the streaming URL and the bytes through both proxies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_id_with_url_characters_streams_through_both_proxies() {
    const DEVICE_ID: &str = "a#b?c=d@e";
    let relay = Relay::start(&[]).await;
    let (echo_port, _echo) = start_echo_server().await;
    let connection_string = relay.add_device(DEVICE_ID).await;
    assert!(
        connection_string.contains(&format!(";DeviceId={DEVICE_ID};")),
        "the id is written as it is in the connection string: {connection_string}"
    );
    let listed = cli_line(&relay, &["device", "list"]).await;
    // With the relay running, the list is its live view: the id comes first.
    assert!(
        listed
            .lines()
            .any(|line| line.split('\t').next() == Some(DEVICE_ID)),
        "{listed}"
    );
    let _device_proxy = start_device_proxy(&relay, &connection_string, echo_port, &[]).await;
    wait_until_device_connected(&relay, DEVICE_ID).await;
    let (_service_proxy, local_port) = start_service_proxy(&relay, DEVICE_ID, &[]).await;
    let mut local = tokio::net::TcpStream::connect(("127.0.0.1", local_port))
        .await
        .expect("connect");
    let payload = b"bytes for a#b?c=d@e".repeat(1000);
    local.write_all(&payload).await.expect("write");
    let mut echoed = vec![0u8; payload.len()];
    tokio::time::timeout(Duration::from_secs(30), local.read_exact(&mut echoed))
        .await
        .expect("echo in time")
        .expect("read");
    assert!(echoed == payload);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_outside_iothubs_set_are_refused_with_the_rule() {
    let relay = Relay::start(&[]).await;
    for id in ["a;b", "a/b", "a b", &"x".repeat(129)] {
        let output = relay.cli(&["device", "add", id]).await;
        assert_eq!(output.status.code(), Some(1), "{id:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains("- . + % _ # * ? ! ( ) , : = @ $ '") || stderr.contains("128"),
            "{id:?}: {stderr}"
        );
    }
    let stderr =
        String::from_utf8_lossy(&relay.cli(&["device", "add", "a;b"]).await.stderr).to_string();
    assert!(stderr.contains("connection string"), "{stderr}");
    let token = service_token(&relay, SystemTime::now() + Duration::from_secs(600));
    let (status, _, body) = raw_https(&relay, &stream_request(&relay, "a%3Bb", &token, 1)).await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("ArgumentInvalid"), "{body}");
}
