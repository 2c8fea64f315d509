//! IoT Hub's service-side rules (PROTOCOL.md, "Service side" and
//! "Streaming endpoint"), checked against a running relay with raw requests
//! whose every header the test chooses, and a device that behaves like IoT
//! Hub's C device SDK. Each test names the rule it checks and fails if the
//! relay breaks it.

use std::time::{Duration, Instant};

use devstreams_tests::iothub::{
    header, service_token, stream_creation_request, websocket_upgrade, CSdkDevice, UpgradeAnswer,
    ANSWER_TIMEOUT, C_SDK_KEEP_ALIVE,
};
use devstreams_tests::{raw_https, Relay};
use framing::mqtt::QoS;
use framing::transport::NetworkStream;
use framing::websocket::Message;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::WebSocketStream;

type Socket = WebSocketStream<NetworkStream>;

async fn relay_and_device() -> (Relay, CSdkDevice) {
    let relay = Relay::start(&[]).await;
    let connection_string = relay.add_device("MyDevice").await;
    let device = CSdkDevice::connect(
        relay.mqtt_port(),
        &relay.tls(),
        &connection_string,
        None,
        C_SDK_KEEP_ALIVE,
    )
    .await;
    (relay, device)
}

/// Sends `request_text` while the device accepts (200) whatever arrives.
async fn create_accepted(
    relay: &Relay,
    device: &mut CSdkDevice,
    request_text: &str,
) -> (u16, Vec<(String, String)>, String) {
    let device_side = async {
        let request = device.next_stream_request().await;
        device
            .answer(&request.request_id, 200, QoS::AtMostOnce)
            .await;
    };
    let (answer, ()) = tokio::join!(raw_https(relay, request_text), device_side);
    answer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_creation_accepts_any_api_version() {
    let (relay, mut device) = relay_and_device().await;
    let token = service_token(&relay.service_connection_string);
    for query in [
        "?api-version=2018-10-20-preview",
        "?api-version=2021-04-12",
        "?api-version=2099-12-31-future",
        "?api-version=",
        "",
    ] {
        let request_text = stream_creation_request(
            &format!("/twins/MyDevice/streams/TestStream{query}"),
            relay.port(),
            &token,
            5,
            10,
        );
        let (status, headers, body) = create_accepted(&relay, &mut device, &request_text).await;
        assert_eq!(
            (status, header(&headers, "iothub-streaming-is-accepted")),
            (200, Some("True")),
            "{query:?}: {body}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_sas_fields_are_accepted_in_any_order() {
    let (relay, mut device) = relay_and_device().await;
    let token = service_token(&relay.service_connection_string);
    let fields: Vec<&str> = token
        .strip_prefix("SharedAccessSignature ")
        .expect("a SAS token")
        .split('&')
        .collect();
    let field = |name: &str| {
        *fields
            .iter()
            .find(|f| f.starts_with(&format!("{name}=")))
            .expect("field present")
    };
    for order in [
        ["sr", "sig", "se", "skn"],
        ["skn", "se", "sig", "sr"],
        ["se", "sr", "skn", "sig"],
        ["sig", "skn", "sr", "se"],
    ] {
        let reordered = format!("SharedAccessSignature {}", order.map(field).join("&"));
        let request_text = stream_creation_request(
            "/twins/MyDevice/streams/TestStream?api-version=2021-04-12",
            relay.port(),
            &reordered,
            5,
            10,
        );
        let (status, _, body) = create_accepted(&relay, &mut device, &request_text).await;
        assert_eq!(status, 200, "fields in the order {order:?}: {body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answer_headers_are_lowercase_with_true_and_false_exactly() {
    let (relay, mut device) = relay_and_device().await;
    let token = service_token(&relay.service_connection_string);
    for (status, expected) in [(200, "True"), (400, "False")] {
        let request_text = stream_creation_request(
            "/twins/MyDevice/streams/TestStream?api-version=2021-04-12",
            relay.port(),
            &token,
            5,
            10,
        );
        let device_side = async {
            let request = device.next_stream_request().await;
            device
                .answer(&request.request_id, status, QoS::AtLeastOnce)
                .await;
        };
        let ((http_status, headers, _), ()) =
            tokio::join!(raw_https(&relay, &request_text), device_side);
        assert_eq!(http_status, 200);
        for (name, _) in headers
            .iter()
            .filter(|(name, _)| name.to_ascii_lowercase().starts_with("iothub-"))
        {
            assert_eq!(
                name,
                &name.to_ascii_lowercase(),
                "answer header names are lowercase as written: {name}"
            );
        }
        assert_eq!(
            header(&headers, "iothub-streaming-is-accepted"),
            Some(expected),
            "{headers:?}"
        );
        if status == 200 {
            assert!(header(&headers, "iothub-streaming-url")
                .is_some_and(|url| url.starts_with("wss://") && url.contains("/bridges/")));
            assert!(header(&headers, "iothub-streaming-auth-token")
                .is_some_and(|token| !token.is_empty()));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_headers_are_honoured_and_capped_by_the_handshake_limit() {
    let relay = Relay::start(&["--handshake-timeout", "3"]).await;
    relay.add_device("Sleepy").await;
    let mute_connection_string = relay.add_device("Mute").await;
    // Connected and subscribed, but never answers.
    let _mute = CSdkDevice::connect(
        relay.mqtt_port(),
        &relay.tls(),
        &mute_connection_string,
        None,
        C_SDK_KEEP_ALIVE,
    )
    .await;
    let token = service_token(&relay.service_connection_string);
    let timed = |device: &'static str, connect_timeout: u64, response_timeout: u64| {
        let request_text = stream_creation_request(
            &format!("/twins/{device}/streams/TestStream?api-version=2021-04-12"),
            relay.port(),
            &token,
            connect_timeout,
            response_timeout,
        );
        let relay = &relay;
        async move {
            let started = Instant::now();
            let (status, _, body) = raw_https(relay, &request_text).await;
            (status, body, started.elapsed())
        }
    };
    let (offline_short, offline_capped, silent_short, silent_capped) = tokio::join!(
        timed("Sleepy", 1, 30),
        timed("Sleepy", 100, 30),
        timed("Mute", 30, 1),
        timed("Mute", 30, 100)
    );
    let within = |elapsed: Duration, low: u64, high_millis: u64| {
        elapsed >= Duration::from_secs(low) && elapsed < Duration::from_millis(high_millis)
    };
    for (name, (status, body, elapsed), expected_status, low) in [
        ("offline device, connect timeout 1 s", offline_short, 404, 1),
        (
            "offline device, connect timeout 100 s capped at 3 s",
            offline_capped,
            404,
            3,
        ),
        ("silent device, response timeout 1 s", silent_short, 504, 1),
        (
            "silent device, response timeout 100 s capped at 3 s",
            silent_capped,
            504,
            3,
        ),
    ] {
        assert_eq!(status, expected_status, "{name}: {body}");
        assert!(
            within(elapsed, low, low * 1000 + 1500),
            "{name}: answered after {elapsed:?}"
        );
    }
}

/// The order in which the device does its two steps.
#[derive(Debug, Clone, Copy)]
enum DeviceOrder {
    WebSocketThenAccept,
    AcceptThenWebSocket,
}

/// Creates an accepted stream and opens both WebSockets with the extra
/// headers given; returns both upgrade answers (service, device).
async fn open_stream(
    relay: &Relay,
    device: &mut CSdkDevice,
    order: DeviceOrder,
    service_headers: &[(&str, &str)],
    device_headers: &[(&str, &str)],
) -> (UpgradeAnswer, UpgradeAnswer) {
    let tls = relay.tls();
    let token = service_token(&relay.service_connection_string);
    let request_text = stream_creation_request(
        "/twins/MyDevice/streams/TestStream?api-version=2021-04-12",
        relay.port(),
        &token,
        5,
        30,
    );
    let device_upgrade = |url: String, authorization: String| {
        let tls = tls.clone();
        async move {
            let bearer = format!("Bearer {authorization}");
            let mut headers = vec![("Authorization", bearer.as_str())];
            headers.extend_from_slice(device_headers);
            websocket_upgrade(relay.port(), &url, &headers, &tls).await
        }
    };
    let device_side = async {
        let request = device.next_stream_request().await;
        match order {
            DeviceOrder::WebSocketThenAccept => {
                let answer =
                    device_upgrade(request.url.clone(), request.authorization_token.clone()).await;
                device
                    .answer(&request.request_id, 200, QoS::AtMostOnce)
                    .await;
                (request, Some(answer))
            }
            DeviceOrder::AcceptThenWebSocket => {
                device
                    .answer(&request.request_id, 200, QoS::AtMostOnce)
                    .await;
                (request, None)
            }
        }
    };
    let ((status, headers, body), (request, early_device_answer)) =
        tokio::join!(raw_https(relay, &request_text), device_side);
    assert_eq!(
        (status, header(&headers, "iothub-streaming-is-accepted")),
        (200, Some("True")),
        "{body}"
    );
    let url = header(&headers, "iothub-streaming-url")
        .expect("a streaming URL")
        .to_string();
    let bearer = format!(
        "Bearer {}",
        header(&headers, "iothub-streaming-auth-token").expect("a service token")
    );
    let mut all_service_headers = vec![("Authorization", bearer.as_str())];
    all_service_headers.extend_from_slice(service_headers);
    let service_upgrade = websocket_upgrade(relay.port(), &url, &all_service_headers, &tls);
    match early_device_answer {
        Some(device_answer) => (service_upgrade.await, device_answer),
        None => tokio::join!(
            service_upgrade,
            device_upgrade(request.url, request.authorization_token)
        ),
    }
}

fn socket(answer: UpgradeAnswer, side: &str) -> Socket {
    assert_eq!(
        answer.status, 101,
        "the {side} side's WebSocket is accepted: {:?}",
        answer.headers
    );
    answer.socket.expect("a socket comes with 101")
}

async fn next_data_message(socket: &mut Socket) -> Message {
    loop {
        match tokio::time::timeout(ANSWER_TIMEOUT, socket.next())
            .await
            .expect("a message in time")
        {
            Some(Ok(message @ (Message::Binary(_) | Message::Text(_)))) => return message,
            Some(Ok(Message::Close(frame))) => panic!("the stream closed early: {frame:?}"),
            Some(Ok(_)) => continue,
            other => panic!("the stream ended early: {other:?}"),
        }
    }
}

/// Sends all of `messages` on `from`, then checks `to` receives exactly them.
async fn assert_forwarded(from: &mut Socket, to: &mut Socket, messages: &[Message]) {
    for message in messages {
        from.send(message.clone()).await.expect("message sent");
    }
    for message in messages {
        assert_eq!(
            &next_data_message(to).await,
            message,
            "forwarded whole, with its opcode"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_endpoint_answers_no_subprotocol_and_no_extension_and_ignores_host() {
    let (relay, mut device) = relay_and_device().await;
    let deflate = (
        "Sec-WebSocket-Extensions",
        "permessage-deflate; client_max_window_bits",
    );
    let (service, device_answer) = open_stream(
        &relay,
        &mut device,
        DeviceOrder::AcceptThenWebSocket,
        &[
            ("Sec-WebSocket-Protocol", "MQTT"),
            deflate,
            ("Host", "not-the-relay.example.com:1234"),
        ],
        &[
            ("Sec-WebSocket-Protocol", "MQTT, mqtt"),
            deflate,
            ("Host", "10.9.8.7"),
        ],
    )
    .await;
    for (answer, side) in [(&service, "service"), (&device_answer, "device")] {
        assert_eq!(
            answer.status, 101,
            "{side}: offering MQTT and permessage-deflate with any Host is accepted: {:?}",
            answer.headers
        );
        assert!(
            !answer.has_header("sec-websocket-protocol"),
            "{side}: no subprotocol is ever answered: {:?}",
            answer.headers
        );
        assert!(
            !answer.has_header("sec-websocket-extensions"),
            "{side}: permessage-deflate is declined: {:?}",
            answer.headers
        );
    }
    let (mut service, mut device_socket) =
        (socket(service, "service"), socket(device_answer, "device"));
    // Uncompressed frames flow: the relay really did not negotiate deflate.
    assert_forwarded(
        &mut service,
        &mut device_socket,
        &[Message::Text("plain text, not deflated".into())],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_may_open_its_websocket_before_or_after_its_accept() {
    let (relay, mut device) = relay_and_device().await;
    for order in [
        DeviceOrder::WebSocketThenAccept,
        DeviceOrder::AcceptThenWebSocket,
    ] {
        let (service, device_answer) = open_stream(&relay, &mut device, order, &[], &[]).await;
        let (mut service, mut device_socket) =
            (socket(service, "service"), socket(device_answer, "device"));
        let message = Message::Text(format!("paired with {order:?}").into());
        assert_forwarded(
            &mut service,
            &mut device_socket,
            std::slice::from_ref(&message),
        )
        .await;
        assert_forwarded(&mut device_socket, &mut service, &[message]).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_and_binary_messages_keep_their_opcode_and_boundaries_both_ways() {
    let (relay, mut device) = relay_and_device().await;
    let (service, device_answer) = open_stream(
        &relay,
        &mut device,
        DeviceOrder::AcceptThenWebSocket,
        &[],
        &[],
    )
    .await;
    let (mut service, mut device_socket) =
        (socket(service, "service"), socket(device_answer, "device"));
    let messages = vec![
        Message::Text("a".into()),
        Message::Binary(vec![1u8].into()),
        Message::Binary(vec![7u8; 70_000].into()),
        Message::Text("é".repeat(1000).into()),
        Message::Binary(vec![0u8, 0, 0].into()),
        Message::Text("{\"last\": true}".into()),
    ];
    assert_forwarded(&mut service, &mut device_socket, &messages).await;
    assert_forwarded(&mut device_socket, &mut service, &messages).await;
}
