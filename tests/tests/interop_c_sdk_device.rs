//! Interop, device side: a device that behaves exactly like IoT Hub's C
//! device SDK (MQTT over TLS on the 8883 listener, its CONNECT, its two QoS 0
//! subscriptions, `res/200` and `res/400` answers, then a WebSocket with
//! `Authorization: Bearer` to the streaming URL) against devstreams' own
//! `echo-sample service` and against a raw IoT Hub REST call. The device
//! echoes each WebSocket message as it came, so the service side checks
//! that message boundaries and opcodes survive the relay.

use std::time::Duration;

use devstreams_tests::iothub::{
    header, service_token, stream_creation_request, websocket_upgrade, CSdkDevice,
    IotHubStreamRequest, UpgradeAnswer, ANSWER_TIMEOUT, C_SDK_KEEP_ALIVE,
};
use devstreams_tests::{binary, raw_https, Relay};
use framing::mqtt::QoS;
use framing::transport::NetworkStream;
use framing::websocket::Message;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::WebSocketStream;

type Socket = WebSocketStream<NetworkStream>;

/// The device's streaming WebSocket, with the headers the C SDK sends
/// (it offers the `MQTT` subprotocol).
async fn device_websocket(relay: &Relay, request: &IotHubStreamRequest) -> Socket {
    let bearer = format!("Bearer {}", request.authorization_token);
    let answer = websocket_upgrade(
        relay.port(),
        &request.url,
        &[
            ("Authorization", &bearer),
            ("Sec-WebSocket-Protocol", "MQTT"),
        ],
        &relay.tls(),
    )
    .await;
    opened(answer, "device")
}

fn opened(answer: UpgradeAnswer, side: &str) -> Socket {
    assert_eq!(
        answer.status, 101,
        "the {side} side's WebSocket is accepted: {:?}",
        answer.headers
    );
    assert!(
        !answer.has_header("sec-websocket-protocol"),
        "no subprotocol is answered to the {side} side"
    );
    answer.socket.expect("a socket comes with 101")
}

/// Echoes every data message back as it came until the peer closes.
async fn echo(mut socket: Socket) -> usize {
    let mut echoed = 0;
    while let Ok(Some(message)) = tokio::time::timeout(Duration::from_secs(30), socket.next()).await
    {
        match message {
            Ok(message @ (Message::Binary(_) | Message::Text(_))) => {
                socket.send(message).await.expect("echo sent");
                echoed += 1;
            }
            Ok(Message::Close(_)) | Err(_) => break,
            Ok(_) => {}
        }
    }
    echoed
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c_sdk_style_device_rejects_then_echoes_for_echo_sample_service() {
    let relay = Relay::start(&[]).await;
    let connection_string = relay.add_device("MyDevice").await;
    let mut device = CSdkDevice::connect(
        relay.mqtt_port(),
        &relay.tls(),
        &connection_string,
        None,
        C_SDK_KEEP_ALIVE,
    )
    .await;
    let ca = relay.ca_text();
    let echo_service = |message: &'static str| {
        tokio::process::Command::new(binary("echo-sample"))
            .args([
                "service",
                &relay.service_connection_string,
                "MyDevice",
                "--ca-cert",
                &ca,
                "--message",
                message,
            ])
            .env("RUST_LOG", "off")
            .kill_on_drop(true)
            .output()
    };

    // Reject with 400: the service hears IsAccepted=False, not a timeout.
    let reject = async {
        let request = device.next_stream_request().await;
        device
            .answer(&request.request_id, 400, QoS::AtMostOnce)
            .await;
    };
    let (output, ()) = tokio::join!(
        tokio::time::timeout(Duration::from_secs(30), echo_service("unused")),
        reject
    );
    let output = output
        .expect("echo-sample service finishes")
        .expect("echo-sample service runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("Stream response received: Name=TestStream IsAccepted=False"),
        "{stdout}"
    );

    // Accept with 200 at QoS 1, then connect to the streaming URL and echo.
    let accept_and_echo = async {
        let request = device.next_stream_request().await;
        device
            .answer(&request.request_id, 200, QoS::AtLeastOnce)
            .await;
        echo(device_websocket(&relay, &request).await).await
    };
    let message = "hello from an IoT Hub style device";
    let (output, echoed) = tokio::join!(
        tokio::time::timeout(Duration::from_secs(30), echo_service(message)),
        accept_and_echo
    );
    let output = output
        .expect("echo-sample service finishes")
        .expect("echo-sample service runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "stdout: {stdout}\nstderr: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("Stream response received: Name=TestStream IsAccepted=True"),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("Received stream data: {message}")),
        "{stdout}"
    );
    assert_eq!(echoed, 1, "echo-sample service sends one message");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c_sdk_style_device_echoes_for_a_raw_rest_call_keeping_message_boundaries() {
    let relay = Relay::start(&[]).await;
    let connection_string = relay.add_device("MyDevice").await;
    let mut device = CSdkDevice::connect(
        relay.mqtt_port(),
        &relay.tls(),
        &connection_string,
        None,
        C_SDK_KEEP_ALIVE,
    )
    .await;
    let token = service_token(&relay.service_connection_string);
    let request_text = stream_creation_request(
        "/twins/MyDevice/streams/TestStream?api-version=2018-10-20-preview",
        relay.port(),
        &token,
        30,
        30,
    );

    // This time the device opens its WebSocket before its accept (QoS 0) goes out.
    let device_side = async {
        let request = device.next_stream_request().await;
        let socket = device_websocket(&relay, &request).await;
        device
            .answer(&request.request_id, 200, QoS::AtMostOnce)
            .await;
        socket
    };
    let ((status, headers, body), device_socket) =
        tokio::join!(raw_https(&relay, &request_text), device_side);
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        header(&headers, "iothub-streaming-is-accepted"),
        Some("True")
    );
    let url = header(&headers, "iothub-streaming-url")
        .expect("a streaming URL")
        .to_string();
    let bearer = format!(
        "Bearer {}",
        header(&headers, "iothub-streaming-auth-token").expect("a service token")
    );
    let echo_task = tokio::spawn(echo(device_socket));

    let mut service = opened(
        websocket_upgrade(
            relay.port(),
            &url,
            &[("Authorization", &bearer)],
            &relay.tls(),
        )
        .await,
        "service",
    );
    let messages = vec![
        Message::Text("first".into()),
        Message::Binary(vec![0u8, 1, 2, 255].into()),
        Message::Binary(
            (0..100_000u32)
                .map(|i| (i % 251) as u8)
                .collect::<Vec<u8>>()
                .into(),
        ),
        Message::Text("ünïcödé text".into()),
        Message::Binary(vec![42u8].into()),
    ];
    for message in &messages {
        service.send(message.clone()).await.expect("message sent");
    }
    for message in &messages {
        assert_eq!(
            &next_data_message(&mut service).await,
            message,
            "each message comes back whole, with its opcode"
        );
    }
    service
        .send(framing::pump::close_message(
            framing::pump::CLOSE_NORMAL,
            "",
        ))
        .await
        .expect("close sent");
    let echoed = tokio::time::timeout(ANSWER_TIMEOUT, echo_task)
        .await
        .expect("the device sees the close")
        .expect("echo task");
    assert_eq!(
        echoed,
        messages.len(),
        "the device received exactly as many messages as were sent"
    );
}
