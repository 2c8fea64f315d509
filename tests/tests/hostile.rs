//! Hostile input: each case asserts the relay's exact answer (status, CONNACK
//! code, WebSocket close code, or time to close) and then that a normal echo
//! stream still works on the same, still running, relay.

use std::time::{Duration, Instant, SystemTime};

use devstreams_tests::{
    open_file_descriptors, raw_http, raw_https, resident_kib, start_device_proxy,
    start_echo_server, start_service_proxy, wait_until_device_connected, Process, Relay,
};
use framing::mqtt::{ConnectReturnCode, MqttConnection, Packet};
use framing::websocket::Message;
use framing::{
    ConnectionString, CreateStreamError, DeviceClient, DeviceError, DeviceOptions, ServiceClient,
    StreamOptions,
};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;

struct Fixture {
    relay: Relay,
    device_connection_string: String,
    device_proxy: Process,
    _echo: tokio::task::JoinHandle<()>,
}

async fn fixture(relay_arguments: &[&str]) -> Fixture {
    let relay = Relay::start(relay_arguments).await;
    let (echo_port, echo) = start_echo_server().await;
    let device_connection_string = relay.add_device("MyDevice").await;
    let device_proxy = start_device_proxy(&relay, &device_connection_string, echo_port, &[]).await;
    wait_until_device_connected(&relay, "MyDevice").await;
    Fixture {
        relay,
        device_connection_string,
        device_proxy,
        _echo: echo,
    }
}

fn service(relay: &Relay) -> ServiceClient {
    ServiceClient::new(
        ConnectionString::parse_service(&relay.service_connection_string).expect("service string"),
        relay.tls(),
    )
}

fn quick() -> StreamOptions {
    StreamOptions {
        connect_timeout: Duration::from_secs(5),
        response_timeout: Duration::from_secs(10),
        target: None,
        half_close: false,
    }
}

/// A normal stream, created and echoed through device-proxy.
async fn normal_echo_works(relay: &Relay) {
    let invitation = service(relay)
        .create_stream("MyDevice", "TestStream", &quick())
        .await
        .expect("the relay still creates streams");
    assert!(invitation.is_accepted);
    let mut socket = framing::connect_stream(
        &invitation.url,
        &invitation.authorization_token,
        &relay.tls(),
    )
    .await
    .expect("stream connects");
    socket
        .send(Message::Binary(b"still working".to_vec().into()))
        .await
        .expect("send");
    let echoed = tokio::time::timeout(Duration::from_secs(10), socket.next())
        .await
        .expect("echo in time");
    match echoed {
        Some(Ok(Message::Binary(data))) => assert_eq!(&data[..], b"still working"),
        other => panic!("expected the echo, got {other:?}"),
    }
    let _ = socket.close(None).await;
}

fn stream_request(relay: &Relay, device_id: &str, authorization: &str) -> String {
    format!(
        "POST /twins/{device_id}/streams/TestStream?api-version=2021-04-12 HTTP/1.1\r\nHost: localhost:{}\r\nAuthorization: {authorization}\r\n\
         iothub-streaming-connect-timeout-in-seconds: 5\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        relay.port()
    )
}

fn sign_service(relay: &Relay, expiry: SystemTime, policy: &str) -> String {
    let connection =
        ConnectionString::parse_service(&relay.service_connection_string).expect("service string");
    framing::sas::sign(
        &connection.host_name,
        connection.key(),
        expiry,
        Some(policy),
    )
}

/// Waits until the peer closes `stream`; returns how long it took.
async fn time_until_closed<S: tokio::io::AsyncRead + Unpin>(
    stream: &mut S,
    limit: Duration,
) -> Duration {
    let started = Instant::now();
    let mut buffer = [0u8; 1024];
    let closed = tokio::time::timeout(limit, async {
        loop {
            match stream.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "the relay kept the connection open past {limit:?}"
    );
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_tls_handshake_and_slow_headers_are_cut_at_their_deadlines() {
    let fixture = fixture(&["--tls-handshake-timeout", "1", "--header-read-timeout", "1"]).await;
    let mut silent_tcp = TcpStream::connect(("127.0.0.1", fixture.relay.port()))
        .await
        .expect("connect");
    let waited = time_until_closed(&mut silent_tcp, Duration::from_secs(5)).await;
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(3),
        "no TLS: cut after {waited:?}"
    );

    let mut silent_tls = framing::transport::connect(
        "localhost",
        fixture.relay.port(),
        Some(&fixture.relay.tls()),
        Duration::from_secs(5),
    )
    .await
    .expect("TLS");
    silent_tls
        .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("a partial request");
    let waited = time_until_closed(&mut silent_tls, Duration::from_secs(5)).await;
    assert!(
        waited < Duration::from_secs(3),
        "headers never finished: cut after {waited:?}"
    );
    normal_echo_works(&fixture.relay).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_malformed_http_requests_get_431_and_400() {
    let fixture = fixture(&[]).await;
    let huge = format!(
        "GET /health HTTP/1.1\r\nHost: x\r\nX-Padding: {}\r\nConnection: close\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    let (status, _, _) = raw_https(&fixture.relay, &huge).await;
    assert_eq!(status, 431);
    let (status, _, _) = raw_https(&fixture.relay, "THIS IS NOT HTTP\r\n\r\n").await;
    assert_eq!(status, 400);
    let (status, _, body) = raw_https(
        &fixture.relay,
        "GET /nowhere HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 404);
    assert!(body.contains("errorCode"));
    normal_echo_works(&fixture.relay).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_websocket_message_is_closed_with_1009() {
    let fixture = fixture(&["--max-message-size", "65536"]).await;
    let invitation = service(&fixture.relay)
        .create_stream("MyDevice", "TestStream", &quick())
        .await
        .expect("created");
    let mut socket = framing::connect_stream(
        &invitation.url,
        &invitation.authorization_token,
        &fixture.relay.tls(),
    )
    .await
    .expect("connects");
    // One message of 80,000 bytes in two fragments, each under the limit:
    // the relay has read every byte we sent when the message outgrows the
    // limit, so nothing unread turns its Close into a reset and the 1009
    // must arrive.
    for opcode in [Data::Binary, Data::Continue] {
        let fragment = Frame::message(vec![0u8; 40_000], OpCode::Data(opcode), false);
        socket
            .send(Message::Frame(fragment))
            .await
            .expect("a fragment under the limit is written");
    }
    let answer = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match socket.next().await {
                Some(Ok(Message::Close(frame))) => return frame.map(|f| u16::from(f.code)),
                Some(Ok(_)) => continue,
                other => panic!("the stream ended without a Close: {other:?}"),
            }
        }
    })
    .await
    .expect("the relay answers in time");
    assert_eq!(
        answer,
        Some(1009),
        "the relay closes an oversized message with 1009"
    );
    normal_echo_works(&fixture.relay).await;
}

async fn mqtt_socket(relay: &Relay) -> MqttConnection<framing::websocket::ClientWebSocket> {
    let url = format!("wss://localhost:{}/$iothub/websocket", relay.port());
    let socket = framing::websocket::connect(
        framing::websocket::WebSocketRequest {
            url: &url,
            authorization: None,
            subprotocol: Some("mqtt"),
            max_message_size: 1 << 20,
            timeout: Duration::from_secs(10),
        },
        &relay.tls(),
    )
    .await
    .expect("MQTT WebSocket opens");
    MqttConnection::new(socket, 1 << 20)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_or_oversized_mqtt_clients_are_cut() {
    let fixture = fixture(&[
        "--mqtt-connect-timeout",
        "1",
        "--max-mqtt-packet-size",
        "4096",
    ])
    .await;
    let mut silent = mqtt_socket(&fixture.relay).await;
    let started = Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(5), silent.read_packet())
        .await
        .expect("closed in time");
    assert!(matches!(ended, Ok(None) | Err(_)), "{ended:?}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "no CONNECT: cut after {:?}",
        started.elapsed()
    );

    let mut oversized = mqtt_socket(&fixture.relay).await;
    let mut connect = framing::mqtt::Connect::new("MyDevice");
    connect.set_login("localhost/MyDevice/?api-version=1", "x".repeat(10_000));
    oversized
        .write_packet(&Packet::Connect(connect))
        .await
        .expect("sent");
    let ended = tokio::time::timeout(Duration::from_secs(5), oversized.read_packet())
        .await
        .expect("closed in time");
    assert!(
        matches!(ended, Ok(None) | Err(_)),
        "a packet over the limit ends the connection: {ended:?}"
    );
    normal_echo_works(&fixture.relay).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_service_token_is_refused_with_401() {
    let fixture = fixture(&[]).await;
    let relay = &fixture.relay;
    let in_an_hour = SystemTime::now() + Duration::from_secs(3600);
    let cases = [
        (
            "bad signature",
            sign_service(relay, in_an_hour, "service").replace("sig=", "sig=AAAA"),
        ),
        (
            "expired",
            sign_service(
                relay,
                SystemTime::now() - Duration::from_secs(3600),
                "service",
            ),
        ),
        (
            "too far in the future",
            sign_service(
                relay,
                SystemTime::now() + Duration::from_secs(5 * 366 * 24 * 3600),
                "service",
            ),
        ),
        (
            "wrong policy",
            sign_service(relay, in_an_hour, "registryRead"),
        ),
        (
            "no policy",
            sign_service(relay, in_an_hour, "service").replace("&skn=service", ""),
        ),
        ("not a SAS token", "Bearer abc".to_string()),
    ];
    for (case, token) in cases {
        let (status, _, body) = raw_https(relay, &stream_request(relay, "MyDevice", &token)).await;
        assert_eq!(status, 401, "{case}: {body}");
        assert!(
            !body.contains("sig="),
            "{case}: the answer must not echo the token"
        );
    }
    normal_echo_works(relay).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_tokens_for_another_or_removed_device_get_connack_5() {
    let fixture = fixture(&[]).await;
    let relay = &fixture.relay;
    let other = ConnectionString::parse_device(&relay.add_device("OtherDevice").await)
        .expect("device string");
    // A token signed with MyDevice's key but presented as OtherDevice.
    let mine =
        ConnectionString::parse_device(&fixture.device_connection_string).expect("device string");
    let mut socket = mqtt_socket(relay).await;
    let password = framing::sas::sign(
        &format!("{}/devices/MyDevice", mine.host_name),
        mine.key(),
        SystemTime::now() + Duration::from_secs(600),
        None,
    );
    let mut connect = framing::mqtt::Connect::new("OtherDevice");
    connect.set_login(
        format!("{}/OtherDevice/?api-version=1", mine.host_name),
        password,
    );
    socket
        .write_packet(&Packet::Connect(connect))
        .await
        .expect("sent");
    match tokio::time::timeout(Duration::from_secs(5), socket.read_packet())
        .await
        .expect("answered")
    {
        Ok(Some(Packet::ConnAck(ack))) => assert_eq!(ack.code, ConnectReturnCode::NotAuthorized),
        other => panic!("expected CONNACK 5, got {other:?}"),
    }
    let output = relay.cli(&["device", "remove", "OtherDevice"]).await;
    assert!(output.status.success());
    let removed = DeviceClient::connect(&other, &relay.tls(), &DeviceOptions::default()).await;
    assert!(
        matches!(
            removed,
            Err(DeviceError::Refused(ConnectReturnCode::NotAuthorized))
        ),
        "{:?}",
        removed.err()
    );
    let result = service(relay)
        .create_stream("OtherDevice", "TestStream", &quick())
        .await;
    assert!(
        matches!(result, Err(CreateStreamError::DeviceNotFound(_))),
        "{result:?}"
    );
    normal_echo_works(relay).await;
}

/// Upgrades to the streaming endpoint with raw bytes; returns the status.
async fn upgrade_status(relay: &Relay, path: &str, token: &str) -> u16 {
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nAuthorization: Bearer {token}\r\n\r\n"
    );
    let tls = relay.tls();
    let mut stream = framing::transport::connect(
        "localhost",
        relay.port(),
        Some(&tls),
        Duration::from_secs(5),
    )
    .await
    .expect("TLS");
    stream.write_all(request.as_bytes()).await.expect("written");
    let mut head = vec![0u8; 512];
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut head))
        .await
        .expect("answer")
        .expect("read");
    let text = String::from_utf8_lossy(&head[..read]).to_string();
    text.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_tokens_work_once_on_their_own_stream_only() {
    let fixture = fixture(&[]).await;
    let relay = &fixture.relay;
    let first = service(relay)
        .create_stream("MyDevice", "TestStream", &quick())
        .await
        .expect("created");
    let second = service(relay)
        .create_stream("MyDevice", "TestStream", &quick())
        .await
        .expect("created");
    let first_path = first
        .url
        .split_once("://")
        .and_then(|(_, rest)| rest.find('/').map(|i| rest[i..].to_string()))
        .expect("path");
    let second_path = second
        .url
        .split_once("://")
        .and_then(|(_, rest)| rest.find('/').map(|i| rest[i..].to_string()))
        .expect("path");
    assert_eq!(
        upgrade_status(relay, &second_path, &first.authorization_token).await,
        401,
        "a token on another stream's path"
    );
    assert_eq!(
        upgrade_status(relay, &first_path, "not.a.token").await,
        401,
        "a forged token"
    );
    assert_eq!(
        upgrade_status(relay, &first_path, &first.authorization_token).await,
        101,
        "first use"
    );
    assert_eq!(
        upgrade_status(relay, &first_path, &first.authorization_token).await,
        401,
        "second use"
    );
    normal_echo_works(relay).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creation_rate_and_pending_limits_answer_429_with_retry_after() {
    let fixture = fixture(&[
        "--creations-per-second-per-device",
        "3",
        "--max-pending-streams",
        "4",
    ])
    .await;
    let relay = &fixture.relay;
    let token = sign_service(
        relay,
        SystemTime::now() + Duration::from_secs(600),
        "service",
    );
    let mut throttled = 0;
    for _ in 0..6 {
        let (status, headers, _) =
            raw_https(relay, &stream_request(relay, "MyDevice", &token)).await;
        if status == 429 {
            throttled += 1;
            assert!(headers
                .iter()
                .any(|(name, value)| name.eq_ignore_ascii_case("retry-after")
                    && value.parse::<u64>().is_ok()));
        } else {
            assert_eq!(status, 200);
        }
    }
    assert!(
        throttled >= 2,
        "only {throttled} of 6 quick creations were throttled at 3/s"
    );
    let pending_now = 6 - throttled;
    assert!(pending_now < 4, "{pending_now} streams pending");
    // Each accepted stream above waits for its service side, which never
    // connects; fill the pending table to its cap of 4, then one more.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    for _ in pending_now..4 {
        let filled = service(relay)
            .create_stream("MyDevice", "TestStream", &quick())
            .await
            .expect("room left");
        assert!(filled.is_accepted);
    }
    let result = service(relay)
        .create_stream("MyDevice", "TestStream", &quick())
        .await;
    assert!(
        matches!(result, Err(CreateStreamError::Throttled { .. })),
        "a full pending table answers 429: {result:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_per_source_are_capped_and_idle_ones_do_not_stop_streams() {
    let fixture = fixture(&["--max-connections-per-source", "600"]).await;
    let relay = &fixture.relay;
    let baseline_descriptors = open_file_descriptors(relay.process.pid());
    // 500 idle connections: half plain TCP, half with TLS done.
    let mut idle = Vec::new();
    for index in 0..500 {
        let tcp = TcpStream::connect(("127.0.0.1", relay.port()))
            .await
            .expect("connect");
        if index % 2 == 0 {
            idle.push(framing::transport::NetworkStream::Plain(tcp));
        } else {
            drop(tcp);
            let tls = framing::transport::connect(
                "localhost",
                relay.port(),
                Some(&relay.tls()),
                Duration::from_secs(10),
            )
            .await
            .expect("TLS");
            idle.push(tls);
        }
    }
    let started = Instant::now();
    normal_echo_works(relay).await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "a stream beside 500 idle connections took {:?}",
        started.elapsed()
    );
    // Past the per-source cap, a new connection is closed at once.
    for _ in 0..200 {
        idle.push(framing::transport::NetworkStream::Plain(
            TcpStream::connect(("127.0.0.1", relay.port()))
                .await
                .expect("connect"),
        ));
    }
    let mut refused = TcpStream::connect(("127.0.0.1", relay.port()))
        .await
        .expect("the kernel accepts");
    let waited = time_until_closed(&mut refused, Duration::from_secs(5)).await;
    assert!(
        waited < Duration::from_secs(1),
        "over the cap: closed after {waited:?}"
    );
    drop(idle);
    // The relay has closed its ends once its descriptors are back.
    let deadline = Instant::now() + Duration::from_secs(10);
    while open_file_descriptors(relay.process.pid()) > baseline_descriptors + 8 {
        assert!(
            Instant::now() < deadline,
            "the relay still holds the dropped connections"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    normal_echo_works(relay).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_authentication_failures_from_one_source_are_slowed_down() {
    let fixture = fixture(&[]).await;
    let relay = &fixture.relay;
    let bad = sign_service(
        relay,
        SystemTime::now() + Duration::from_secs(600),
        "service",
    )
    .replace("sig=", "sig=AAAA");
    let mut durations = Vec::new();
    for _ in 0..8 {
        let started = Instant::now();
        let (status, _, _) = raw_https(relay, &stream_request(relay, "MyDevice", &bad)).await;
        assert_eq!(status, 401);
        durations.push(started.elapsed());
    }
    assert!(
        durations[0] < Duration::from_millis(400),
        "the first failures are answered at once: {durations:?}"
    );
    assert!(
        durations[7] >= Duration::from_millis(1000),
        "later failures are slowed: {durations:?}"
    );
    normal_echo_works(relay).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_reader_holds_bounded_memory_and_other_streams_keep_their_speed() {
    let relay = Relay::start(&[]).await;
    // A target that accepts and never reads.
    let stalled = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let stalled_port = stalled.local_addr().expect("address").port();
    let _stalled = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = stalled.accept().await {
            held.push(socket);
        }
    });
    let (echo_port, _echo) = start_echo_server().await;
    let connection_string = relay.add_device("MyDevice").await;
    let allow = format!("127.0.0.1:{echo_port}");
    let device_proxy = start_device_proxy(
        &relay,
        &connection_string,
        stalled_port,
        &["--allow", &allow],
    )
    .await;
    wait_until_device_connected(&relay, "MyDevice").await;
    let (service_proxy, stalled_local) = start_service_proxy(&relay, "MyDevice", &[]).await;
    let echo_target = echo_port.to_string();
    let (_echo_proxy, echo_local) =
        start_service_proxy(&relay, "MyDevice", &["--target-port", &echo_target]).await;
    let pids = [relay.process.pid(), device_proxy.pid(), service_proxy.pid()];
    let before: Vec<u64> = pids.iter().map(|&pid| resident_kib(pid)).collect();

    // Push as much as the tunnel will take for three seconds.
    let mut writer = TcpStream::connect(("127.0.0.1", stalled_local))
        .await
        .expect("connect");
    let chunk = vec![1u8; 64 * 1024];
    let mut accepted_bytes = 0usize;
    let push_until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < push_until {
        match tokio::time::timeout(Duration::from_millis(200), writer.write(&chunk)).await {
            Ok(Ok(count)) => accepted_bytes += count,
            Ok(Err(error)) => panic!("write failed: {error}"),
            Err(_) => {}
        }
    }
    assert!(
        accepted_bytes < 64 * 1024 * 1024,
        "backpressure: {accepted_bytes} bytes were taken by a stream nobody reads"
    );

    // Meanwhile another stream moves a mebibyte at full speed.
    let started = Instant::now();
    let mut other = TcpStream::connect(("127.0.0.1", echo_local))
        .await
        .expect("connect");
    let payload = vec![7u8; 1024 * 1024];
    let (mut reader, mut writer_half) = other.split();
    let mut echoed = vec![0u8; payload.len()];
    let (written, read) = tokio::join!(
        writer_half.write_all(&payload),
        reader.read_exact(&mut echoed)
    );
    written.expect("write");
    read.expect("read");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the other stream took {:?}",
        started.elapsed()
    );

    for (index, &pid) in pids.iter().enumerate() {
        let grown = resident_kib(pid).saturating_sub(before[index]);
        assert!(
            grown < 48 * 1024,
            "process {index} grew by {grown} KiB holding a stalled stream"
        );
    }
    drop(writer);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_never_contain_keys_signatures_or_tokens() {
    let fixture = fixture(&[]).await;
    let relay = &fixture.relay;
    let (service_proxy, local_port) = start_service_proxy(relay, "MyDevice", &[]).await;
    let mut client = TcpStream::connect(("127.0.0.1", local_port))
        .await
        .expect("connect");
    client.write_all(b"hello").await.expect("write");
    let mut echoed = [0u8; 5];
    tokio::time::timeout(Duration::from_secs(10), client.read_exact(&mut echoed))
        .await
        .expect("echo")
        .expect("read");
    drop(client);
    // Failures log too: a bad token, a bad device key.
    let bad = sign_service(
        relay,
        SystemTime::now() + Duration::from_secs(600),
        "service",
    )
    .replace("sig=", "sig=AAAA");
    let _ = raw_https(relay, &stream_request(relay, "MyDevice", &bad)).await;
    // The relay has logged the stream's end and the refusal before the
    // logs are read.
    relay
        .process
        .wait_for_log("stream closed", Duration::from_secs(10))
        .await;
    relay
        .process
        .wait_for_log("bad service credentials", Duration::from_secs(10))
        .await;
    let secrets = [
        fixture
            .device_connection_string
            .split("SharedAccessKey=")
            .nth(1)
            .expect("device key")
            .to_string(),
        relay
            .service_connection_string
            .split("SharedAccessKey=")
            .nth(1)
            .expect("service key")
            .to_string(),
    ];
    for (name, log) in [
        ("relay", relay.process.log()),
        ("device-proxy", fixture.device_proxy.log()),
        ("service-proxy", service_proxy.log()),
    ] {
        assert!(
            log.contains("stream"),
            "{name} logged nothing about streams: the check would be empty"
        );
        for secret in &secrets {
            assert!(!log.contains(secret.as_str()), "{name} logged a key");
        }
        assert!(!log.contains("sig="), "{name} logged a SAS signature");
        assert!(
            !log.contains("SharedAccessSignature"),
            "{name} logged a SAS token"
        );
        assert!(!log.contains("eyJ"), "{name} logged a stream token (JWT)");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disabled_device_is_cut_refused_and_works_again_when_enabled() {
    let fixture = fixture(&[]).await;
    let relay = &fixture.relay;
    let connection =
        ConnectionString::parse_device(&relay.add_device("Paused").await).expect("device string");
    let mut device = DeviceClient::connect(&connection, &relay.tls(), &DeviceOptions::default())
        .await
        .expect("connects while enabled");
    assert!(relay
        .cli(&["device", "disable", "Paused"])
        .await
        .status
        .success());
    let ended = tokio::time::timeout(Duration::from_secs(5), device.next_request()).await;
    assert!(
        matches!(ended, Ok(Err(_))),
        "a disabled device's control channel is closed within seconds"
    );
    let refused = DeviceClient::connect(&connection, &relay.tls(), &DeviceOptions::default()).await;
    assert!(
        matches!(
            refused,
            Err(DeviceError::Refused(ConnectReturnCode::NotAuthorized))
        ),
        "{:?}",
        refused.err()
    );
    let result = service(relay)
        .create_stream("Paused", "TestStream", &quick())
        .await;
    assert!(
        matches!(result, Err(CreateStreamError::DeviceNotFound(_))),
        "{result:?}"
    );
    assert!(relay
        .cli(&["device", "enable", "Paused"])
        .await
        .status
        .success());
    DeviceClient::connect(&connection, &relay.tls(), &DeviceOptions::default())
        .await
        .expect("connects again once enabled, with the same key");
    normal_echo_works(relay).await;
}

type SourcedWebSocket =
    tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<TcpStream>>;

/// A WebSocket upgrade on the relay's main listener from a chosen loopback
/// source address (the relay sees each as a different client).
async fn websocket_from(
    relay: &Relay,
    source: std::net::Ipv4Addr,
    path: &str,
    header: (&'static str, &str),
) -> Result<SourcedWebSocket, String> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::http::HeaderValue;
    let attempt = async {
        let socket = tokio::net::TcpSocket::new_v4().map_err(|e| e.to_string())?;
        socket
            .bind((source, 0).into())
            .map_err(|e| format!("cannot bind {source}: {e}"))?;
        let tcp = socket
            .connect(([127, 0, 0, 1], relay.port()).into())
            .await
            .map_err(|e| format!("TCP: {e}"))?;
        let server_name =
            rustls_pki_types::ServerName::try_from("localhost").map_err(|e| e.to_string())?;
        let tls = tokio_rustls::TlsConnector::from(relay.tls())
            .connect(server_name, tcp)
            .await
            .map_err(|e| format!("TLS: {e}"))?;
        let mut request = format!("wss://localhost:{}{path}", relay.port())
            .into_client_request()
            .map_err(|e| e.to_string())?;
        let value = HeaderValue::from_str(header.1).map_err(|e| e.to_string())?;
        request.headers_mut().insert(header.0, value);
        let (socket, _) = tokio_tungstenite::client_async(request, tls)
            .await
            .map_err(|e| format!("WebSocket: {e}"))?;
        Ok(socket)
    };
    tokio::time::timeout(Duration::from_secs(10), attempt)
        .await
        .map_err(|_| "no answer within 10 s".to_string())?
}

/// An MQTT-over-WebSocket upgrade (`/$iothub/websocket`): no credentials
/// are needed before the 101.
async fn control_websocket_from(
    relay: &Relay,
    source: std::net::Ipv4Addr,
) -> Result<SourcedWebSocket, String> {
    websocket_from(
        relay,
        source,
        "/$iothub/websocket",
        ("Sec-WebSocket-Protocol", "mqtt"),
    )
    .await
}

/// The path of a streaming URL (`wss://host:port/bridges/…`).
fn url_path(url: &str) -> String {
    url.split_once("://")
        .and_then(|(_, rest)| rest.find('/').map(|index| rest[index..].to_string()))
        .unwrap_or_else(|| panic!("no path in {url}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgraded_websockets_count_against_the_per_source_cap() {
    // Sessions must outlive the test's own pace, so the CONNECT deadline
    // (not under test here) is long.
    let relay = Relay::start(&[
        "--max-connections-per-source",
        "4",
        "--mqtt-connect-timeout",
        "120",
    ])
    .await;
    let this_source = std::net::Ipv4Addr::new(127, 0, 0, 1);
    let other_source = std::net::Ipv4Addr::new(127, 0, 0, 2);
    let mut held = Vec::new();
    for index in 0..4 {
        let socket = control_websocket_from(&relay, this_source)
            .await
            .unwrap_or_else(|error| panic!("upgrade {index} under the cap refused: {error}"));
        held.push(socket);
    }
    let past_the_cap = control_websocket_from(&relay, this_source).await;
    assert!(
        past_the_cap.is_err(),
        "a fifth upgraded WebSocket from one address was served past --max-connections-per-source 4"
    );
    let other = control_websocket_from(&relay, other_source).await;
    assert!(
        other.is_ok(),
        "another address is refused while the first one is at its cap: {:?}",
        other.err()
    );
    // Closing one upgraded socket gives its place back.
    drop(held.pop());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match control_websocket_from(&relay, this_source).await {
            Ok(socket) => {
                held.push(socket);
                break;
            }
            Err(error) if Instant::now() > deadline => {
                panic!("the place of a closed WebSocket was never given back: {error}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paired_stream_sockets_count_against_the_per_source_cap() {
    let relay = Relay::start(&["--max-connections-per-source", "2"]).await;
    let connection = ConnectionString::parse_device(&relay.add_device("CapDevice").await)
        .expect("device string");
    let mut device = DeviceClient::connect(&connection, &relay.tls(), &DeviceOptions::default())
        .await
        .expect("device connects");
    let responder = device.responder();
    let answered = tokio::spawn(async move {
        let request = device.next_request().await.expect("a stream request");
        responder.accept(&request).await.expect("accepted");
        (device, request)
    });
    let invitation = service(&relay)
        .create_stream("CapDevice", "TestStream", &quick())
        .await
        .expect("stream created");
    let (_device, request) = tokio::time::timeout(Duration::from_secs(10), answered)
        .await
        .expect("the device answers in time")
        .expect("device task");
    // Both sides of the stream from one address, at its cap of 2: the
    // first waits for its peer, the second is handed over to the first.
    let source = std::net::Ipv4Addr::new(127, 0, 0, 3);
    let bearer = |token: &str| format!("Bearer {token}");
    let mut service_side = websocket_from(
        &relay,
        source,
        &url_path(&invitation.url),
        ("Authorization", &bearer(&invitation.authorization_token)),
    )
    .await
    .expect("service side connects");
    let mut device_side = websocket_from(
        &relay,
        source,
        &url_path(&request.url),
        ("Authorization", &bearer(&request.authorization_token)),
    )
    .await
    .expect("device side connects");
    service_side
        .send(Message::Binary(b"paired".to_vec().into()))
        .await
        .expect("send");
    match tokio::time::timeout(Duration::from_secs(10), device_side.next()).await {
        Ok(Some(Ok(Message::Binary(data)))) => assert_eq!(&data[..], b"paired"),
        other => panic!("the stream is not copying: {other:?}"),
    }
    let third = control_websocket_from(&relay, source).await;
    assert!(
        third.is_err(),
        "a third connection was served beside the two sockets of a live stream, past --max-connections-per-source 2"
    );
    assert!(
        control_websocket_from(&relay, std::net::Ipv4Addr::new(127, 0, 0, 4))
            .await
            .is_ok(),
        "another address is still served"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_served_on_the_admin_listener_only() {
    let relay = Relay::start(&[]).await;
    let get =
        |path: &str| format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    let (status, _, _) = raw_https(&relay, &get("/metrics")).await;
    assert_eq!(status, 404, "/metrics on the internet-facing listener");
    let (status, _, body) = raw_https(&relay, &get("/health")).await;
    assert_eq!(
        (status, body.as_str()),
        (200, "ok\n"),
        "/health stays public"
    );
    let (status, headers, body) = raw_http(&relay.admin_address, &get("/metrics")).await;
    assert_eq!(status, 200, "/metrics on the admin listener: {body}");
    assert!(
        headers
            .iter()
            .any(|(name, value)| name.eq_ignore_ascii_case("content-type")
                && value.starts_with("text/plain; version=0.0.4")),
        "Prometheus text content type: {headers:?}"
    );
    for name in [
        "devstreams_streams_requested_total 0",
        "devstreams_authentication_failures_total 0",
        "devstreams_streams_active 0",
        "devstreams_devices_connected 0",
    ] {
        assert!(
            body.lines().any(|line| line == name),
            "{name} missing:\n{body}"
        );
    }
    let (status, _, body) = raw_http(&relay.admin_address, &get("/health")).await;
    assert_eq!(
        (status, body.as_str()),
        (200, "ok\n"),
        "/health on the admin listener"
    );
    let (status, _, _) = raw_http(&relay.admin_address, &get("/twins/d/streams/s")).await;
    assert_eq!(status, 404, "the admin listener serves nothing else");
}

/// Dials an MQTT-over-TLS listener on loopback port `port` from `source`
/// (any 127/8 address is this machine), with the given socket receive
/// buffer when set; returns the connection and its local port.
async fn dial_mqtt_from(
    port: u16,
    tls: &std::sync::Arc<rustls::ClientConfig>,
    source: std::net::Ipv4Addr,
    receive_buffer: Option<u32>,
) -> std::io::Result<(devstreams_tests::iothub::MqttOverTls, u16)> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind((source, 0).into())?;
    if let Some(size) = receive_buffer {
        socket.set_recv_buffer_size(size)?;
    }
    let tcp = socket.connect(([127, 0, 0, 1], port).into()).await?;
    let local_port = tcp.local_addr()?.port();
    let name = rustls_pki_types::ServerName::try_from("localhost").expect("a valid server name");
    let tls = tokio_rustls::TlsConnector::from(tls.clone())
        .connect(name, tcp)
        .await?;
    let mqtt = MqttConnection::new(
        framing::mqtt::ByteTransport(framing::transport::NetworkStream::Tls(Box::new(
            tokio_rustls::TlsStream::Client(tls),
        ))),
        framing::mqtt::DEFAULT_MAX_PACKET_SIZE,
    );
    Ok((mqtt, local_port))
}

/// The C SDK's CONNECT for the device of `connection_string`, signed with `key`.
fn device_connect(connection_string: &str, key: &[u8]) -> framing::mqtt::Connect {
    let connection =
        ConnectionString::parse_device(connection_string).expect("a device connection string");
    let device_id = connection.device_id.clone().expect("a device id");
    devstreams_tests::iothub::c_sdk_connect(connection.host(), &device_id, None, key, 240)
}

/// CONNECT on `mqtt`; the CONNACK code, or `None` when the relay closed first.
async fn connack(
    mqtt: &mut devstreams_tests::iothub::MqttOverTls,
    connect: framing::mqtt::Connect,
) -> Option<ConnectReturnCode> {
    mqtt.write_packet(&Packet::Connect(connect)).await.ok()?;
    match tokio::time::timeout(Duration::from_secs(30), mqtt.read_packet()).await {
        Ok(Ok(Some(Packet::ConnAck(ack)))) => Some(ack.code),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_bad_connects_from_one_source_does_not_shed_real_devices() {
    // A small relay-wide budget, so the flood is far above it.
    let relay = Relay::start(&["--device-connects-per-second", "5"]).await;
    let real = relay.add_device("RealDevice").await;
    let attacked = relay.add_device("AttackedDevice").await;
    let attacker = std::net::Ipv4Addr::new(127, 0, 0, 2);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let answered = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut flood = tokio::task::JoinSet::new();
    // Each flooder loops: dial, CONNECT with a wrong key, read the answer.
    for _ in 0..200 {
        let (relay_port, tls) = (relay.mqtt_port(), relay.tls());
        let (stop, answered, attacked) = (stop.clone(), answered.clone(), attacked.clone());
        flood.spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let connect = device_connect(&attacked, b"not the device key");
                let dialed = dial_mqtt_from(relay_port, &tls, attacker, None).await;
                let Ok((mut mqtt, _)) = dialed else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                if connack(&mut mqtt, connect).await.is_some() {
                    answered.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
        });
    }
    // Let the flood get going: the relay has answered a few hundred attempts.
    let deadline = Instant::now() + Duration::from_secs(60);
    while answered.load(std::sync::atomic::Ordering::Relaxed) < 200 {
        assert!(Instant::now() < deadline, "the flood never got answers");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let key = ConnectionString::parse_device(&real)
        .expect("device string")
        .key()
        .to_vec();
    let mut codes = Vec::new();
    for _ in 0..5 {
        let (mut mqtt, _) = dial_mqtt_from(
            relay.mqtt_port(),
            &relay.tls(),
            std::net::Ipv4Addr::LOCALHOST,
            None,
        )
        .await
        .expect("the real device dials");
        codes.push(connack(&mut mqtt, device_connect(&real, &key)).await);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    flood.abort_all();
    assert!(
        codes
            .iter()
            .all(|code| *code == Some(ConnectReturnCode::Success)),
        "a real device connecting during a flood of bad CONNECTs from another source must be accepted: {codes:?}"
    );
}

/// A device over TLS that connects, subscribes and then never reads again;
/// its socket's receive buffer is small so the relay's writes back up soon.
/// Returns the device and its local port (the `peer` of its relay log lines).
async fn device_that_stops_reading(
    relay: &Relay,
    connection_string: &str,
) -> (devstreams_tests::iothub::CSdkDevice, u16) {
    let (mut mqtt, local_port) = dial_mqtt_from(
        relay.mqtt_port(),
        &relay.tls(),
        std::net::Ipv4Addr::LOCALHOST,
        Some(4096),
    )
    .await
    .expect("the device dials");
    let key = ConnectionString::parse_device(connection_string)
        .expect("device string")
        .key()
        .to_vec();
    assert_eq!(
        connack(&mut mqtt, device_connect(connection_string, &key)).await,
        Some(ConnectReturnCode::Success)
    );
    let mut device = devstreams_tests::iothub::CSdkDevice::from_connection(mqtt);
    device
        .subscribe(&[
            framing::topics::STREAM_REQUESTS_FILTER,
            framing::topics::STREAM_RESPONSES_FILTER,
        ])
        .await;
    (device, local_port)
}

/// Creates streams to `device_id` (which never reads) until its session's
/// writes are blocked: either the relay queued more stream-request bytes than
/// any loopback socket buffers hold (the kernel caps a send buffer at 4 MiB),
/// or the device's request queue stopped draining and refuses more.
async fn fill_control_channel(relay: &Relay, device_id: &str) {
    const TARGET_LENGTH: usize = 8_000;
    const REQUESTS: usize = 800;
    let queued = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let blocked = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut creators = tokio::task::JoinSet::new();
    for _ in 0..200 {
        let (service, queued, blocked) = (service(relay), queued.clone(), blocked.clone());
        let device_id = device_id.to_string();
        creators.spawn(async move {
            let options = StreamOptions {
                connect_timeout: Duration::from_secs(5),
                response_timeout: Duration::from_secs(1),
                target: Some("t".repeat(TARGET_LENGTH)),
                half_close: false,
            };
            while queued.load(std::sync::atomic::Ordering::Relaxed) < REQUESTS
                && !blocked.load(std::sync::atomic::Ordering::Relaxed)
            {
                match service.create_stream(&device_id, "Fill", &options).await {
                    // The request was queued for the device, which never answers.
                    Err(CreateStreamError::DeviceTimeout(_)) => {
                        queued.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    Err(CreateStreamError::Throttled { message, .. })
                        if message.contains("stream requests waiting") =>
                    {
                        blocked.store(true, std::sync::atomic::Ordering::Relaxed);
                    }
                    // The device's stream limit: wait for a slot.
                    Err(CreateStreamError::Throttled { .. }) => {
                        tokio::time::sleep(Duration::from_millis(200)).await
                    }
                    other => panic!("unexpected answer while filling: {other:?}"),
                }
            }
        });
    }
    let filled = tokio::time::timeout(Duration::from_secs(120), async {
        while let Some(result) = creators.join_next().await {
            result.expect("a creator does not panic");
        }
    })
    .await;
    assert!(
        filled.is_ok(),
        "{REQUESTS} stream requests were not queued within 120 s"
    );
}

/// Whether the relay logged the end of the control channel from local port `port`.
fn session_ended(relay: &Relay, port: u16) -> bool {
    let peer = format!("peer=127.0.0.1:{port}");
    relay
        .process
        .log()
        .lines()
        .any(|line| line.contains(&peer) && line.contains("device disconnected"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_stops_reading_does_not_block_its_replacement_or_the_drain() {
    let mut relay = Relay::start(&["--drain-timeout", "60"]).await;
    let replaced = relay.add_device("ReplacedDevice").await;
    let drained = relay.add_device("DrainedDevice").await;

    // Replacement: the old session must end, though its last write never
    // completes (if filling took longer than --write-timeout, the relay
    // already dropped it for not reading; either way it must be gone).
    let (_stalled, stalled_port) = device_that_stops_reading(&relay, &replaced).await;
    fill_control_channel(&relay, "ReplacedDevice").await;
    let tls = relay.tls();
    let mut replacement = devstreams_tests::iothub::CSdkDevice::connect(
        relay.mqtt_port(),
        &tls,
        &replaced,
        None,
        240,
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while !session_ended(&relay, stalled_port) {
        assert!(
            Instant::now() < deadline,
            "the replaced session of a device that stopped reading never ended; relay log:\n{}",
            relay.process.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The replacement is served.
    let service = service(&relay);
    let creation = tokio::spawn(async move {
        service
            .create_stream("ReplacedDevice", "AfterReplacement", &quick())
            .await
    });
    let request = replacement.next_stream_request().await;
    assert_eq!(request.stream_name, "AfterReplacement");
    replacement
        .answer(&request.request_id, 400, framing::mqtt::QoS::AtMostOnce)
        .await;
    let invitation = creation
        .await
        .expect("the creation task ends")
        .expect("the replacement answers");
    assert!(!invitation.is_accepted);

    // Drain: a session blocked on a device that does not read must not hold it up.
    let (_also_stalled, _) = device_that_stops_reading(&relay, &drained).await;
    fill_control_channel(&relay, "DrainedDevice").await;
    let started = Instant::now();
    relay.process.signal("TERM");
    let code = relay.process.wait_exit(Duration::from_secs(90)).await;
    assert_eq!(code, Some(0), "the relay drains and exits 0");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "draining waited {:?} for a device that does not read (--drain-timeout 60)",
        started.elapsed()
    );
}
