//! Stream creation, pairing and the relay's close handshake, seen from the
//! wire: a device that behaves like IoT Hub's C SDK (so the test decides when
//! it connects and whether it answers), framing's `ServiceClient` for the
//! REST call, and raw tokio-tungstenite sockets for both sides of a stream,
//! so every Close frame and the end of every TCP connection is observed as a
//! strict WebSocket client would observe it.

use std::time::{Duration, Instant};

use devstreams_tests::iothub::{
    websocket_upgrade, CSdkDevice, IotHubStreamRequest, C_SDK_KEEP_ALIVE,
};
use devstreams_tests::Relay;
use framing::mqtt::QoS;
use framing::pump::close_frame;
use framing::transport::NetworkStream;
use framing::websocket::Message;
use framing::{
    ConnectionString, CreateStreamError, ServiceClient, StreamInvitation, StreamOptions,
};
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::WebSocketStream;

type Socket = WebSocketStream<NetworkStream>;

/// How soon the relay must answer a Close: a strict client's own close
/// timeout is seconds, and the relay has nothing to wait for.
const CLOSE_ANSWER_LIMIT: Duration = Duration::from_secs(3);
/// How soon the relay must end the TCP connection once the handshake is done.
const TCP_END_LIMIT: Duration = Duration::from_secs(8);

fn service_client(relay: &Relay) -> ServiceClient {
    ServiceClient::new(
        ConnectionString::parse_service(&relay.service_connection_string)
            .expect("the relay prints a service connection string"),
        relay.tls(),
    )
}

fn options(connect: u64, response: u64) -> StreamOptions {
    StreamOptions {
        connect_timeout: Duration::from_secs(connect),
        response_timeout: Duration::from_secs(response),
        target: None,
        half_close: false,
    }
}

async fn c_sdk_device(relay: &Relay, connection_string: &str) -> CSdkDevice {
    CSdkDevice::connect(
        relay.mqtt_port(),
        &relay.tls(),
        connection_string,
        None,
        C_SDK_KEEP_ALIVE,
    )
    .await
}

/// Opens one side's WebSocket with its stream token; panics unless 101.
async fn open_side(relay: &Relay, url: &str, token: &str) -> Socket {
    let bearer = format!("Bearer {token}");
    let answer = websocket_upgrade(
        relay.port(),
        url,
        &[("Authorization", bearer.as_str())],
        &relay.tls(),
    )
    .await;
    assert_eq!(answer.status, 101, "upgrade refused: {:?}", answer.headers);
    answer.socket.expect("a socket comes with 101")
}

/// Creates a stream the device accepts; returns the invitation and the
/// device's request (its URL and token), neither side connected yet.
async fn accepted_stream(
    relay: &Relay,
    device: &mut CSdkDevice,
) -> (StreamInvitation, IotHubStreamRequest) {
    let service = service_client(relay);
    let accept = async {
        let request = device.next_stream_request().await;
        device
            .answer(&request.request_id, 200, QoS::AtMostOnce)
            .await;
        request
    };
    let options = options(10, 10);
    let (invitation, request) = tokio::join!(
        service.create_stream("MyDevice", "TestStream", &options),
        accept
    );
    let invitation = invitation.expect("the stream is created");
    assert!(invitation.is_accepted);
    (invitation, request)
}

/// The next frame that is not a ping or pong, within `limit`.
async fn next_non_control(socket: &mut Socket, limit: Duration) -> Option<Result<Message, String>> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let next = tokio::time::timeout_at(deadline, socket.next())
            .await
            .unwrap_or_else(|_| panic!("nothing came within {limit:?}"));
        match next {
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(message)) => return Some(Ok(message)),
            Some(Err(error)) => return Some(Err(error.to_string())),
            None => return None,
        }
    }
}

/// Reads until the connection ends; panics if it is still open after `limit`.
async fn connection_ends(socket: &mut Socket, limit: Duration, who: &str) {
    let ended = tokio::time::timeout(limit, async {
        while let Some(Ok(_)) = socket.next().await {}
    })
    .await;
    assert!(
        ended.is_ok(),
        "{who}: the relay kept the TCP connection open for {limit:?} after the close handshake"
    );
}

fn close_code(message: &Option<Result<Message, String>>) -> Option<u16> {
    match message {
        Some(Ok(Message::Close(Some(frame)))) => Some(u16::from(frame.code)),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_is_answered_to_its_sender_and_passed_on_and_both_connections_end() {
    let relay = Relay::start(&[]).await;
    let connection_string = relay.add_device("MyDevice").await;
    let mut device = c_sdk_device(&relay, &connection_string).await;
    let (invitation, request) = accepted_stream(&relay, &mut device).await;
    let mut service_side =
        open_side(&relay, &invitation.url, &invitation.authorization_token).await;
    let mut device_side = open_side(&relay, &request.url, &request.authorization_token).await;

    // Prove the pair copies before closing it.
    service_side
        .send(Message::Binary(b"ping".to_vec().into()))
        .await
        .expect("sent");
    let echoed = next_non_control(&mut device_side, Duration::from_secs(10)).await;
    assert!(
        matches!(&echoed, Some(Ok(Message::Binary(data))) if data.as_ref() == b"ping"),
        "{echoed:?}"
    );

    let started = Instant::now();
    service_side
        .send(Message::Close(Some(close_frame(1000, "done"))))
        .await
        .expect("Close sent");
    // The sender gets the relay's Close, as RFC 6455 §5.5.1 requires.
    let reply = next_non_control(&mut service_side, CLOSE_ANSWER_LIMIT).await;
    assert_eq!(
        close_code(&reply),
        Some(1000),
        "the service side got {reply:?} instead of the relay's Close reply, after {:?}",
        started.elapsed()
    );
    // The other side gets the Close, answers it (tungstenite replies while
    // reading on), and then the relay ends its TCP connection.
    let passed_on = next_non_control(&mut device_side, CLOSE_ANSWER_LIMIT).await;
    assert_eq!(close_code(&passed_on), Some(1000), "{passed_on:?}");
    connection_ends(&mut device_side, TCP_END_LIMIT, "device side").await;
    connection_ends(&mut service_side, TCP_END_LIMIT, "service side").await;
    // The relay logs the end once both handshakes are over.
    let logged = tokio::time::timeout(Duration::from_secs(5), async {
        while !relay
            .process
            .log()
            .contains("closed by the service side (code 1000)")
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(logged.is_ok(), "{}", relay.process.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unpaired_side_that_closes_gets_its_close_answered_at_once() {
    let relay = Relay::start(&[]).await;
    let connection_string = relay.add_device("MyDevice").await;
    let mut device = c_sdk_device(&relay, &connection_string).await;
    let (invitation, request) = accepted_stream(&relay, &mut device).await;
    let mut device_side = open_side(&relay, &request.url, &request.authorization_token).await;

    let started = Instant::now();
    device_side
        .send(Message::Close(Some(close_frame(1000, "changed my mind"))))
        .await
        .expect("Close sent");
    let reply = next_non_control(&mut device_side, CLOSE_ANSWER_LIMIT).await;
    assert_eq!(
        close_code(&reply),
        Some(1000),
        "the unpaired side got {reply:?} instead of a Close reply, after {:?}",
        started.elapsed()
    );
    connection_ends(&mut device_side, TCP_END_LIMIT, "device side").await;

    // The stream is over: the other side cannot open a half of it.
    let bearer = format!("Bearer {}", invitation.authorization_token);
    let late = websocket_upgrade(
        relay.port(),
        &invitation.url,
        &[("Authorization", bearer.as_str())],
        &relay.tls(),
    )
    .await;
    assert_eq!(late.status, 401, "{:?}", late.headers);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creation_answers_within_the_handshake_budget_when_the_device_comes_online_late() {
    let budget = Duration::from_secs(6);
    let relay = Relay::start(&["--handshake-timeout", "6"]).await;
    let connection_string = relay.add_device("MyDevice").await;
    let service = service_client(&relay);
    let started = Instant::now();
    let options = options(10, 10);
    let create = service.create_stream("MyDevice", "TestStream", &options);
    // The device connects halfway through the budget, takes the
    // request and never answers it.
    let silent_device = async {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let mut device = c_sdk_device(&relay, &connection_string).await;
        device.next_stream_request().await;
        device
    };
    let (result, _device) = tokio::join!(create, silent_device);
    let elapsed = started.elapsed();
    assert!(
        matches!(result, Err(CreateStreamError::DeviceTimeout(_))),
        "{result:?}"
    );
    assert!(
        elapsed >= budget - Duration::from_millis(500),
        "answered after {elapsed:?}, before the {budget:?} budget ran out"
    );
    assert!(
        elapsed < budget + Duration::from_millis(1500),
        "answered after {elapsed:?}: the {budget:?} handshake budget must count from the REST call, not from the device coming online"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_creation_abandoned_by_its_client_frees_the_device_stream_slot_at_once() {
    let relay = Relay::start(&["--max-streams-per-device", "1"]).await;
    let connection_string = relay.add_device("MyDevice").await;
    let mut device = c_sdk_device(&relay, &connection_string).await;
    let service = service_client(&relay);

    // The first request reaches the device, which stays silent; its client
    // gives up (drops the call, closing its connection).
    let abandoned = tokio::spawn({
        let service = service.clone();
        async move {
            service
                .create_stream("MyDevice", "Abandoned", &options(30, 30))
                .await
        }
    });
    device.next_stream_request().await;
    abandoned.abort();
    let _ = abandoned.await;

    // The slot is free again well before the 60 s handshake deadline: a
    // second creation gets to the device (which rejects it) instead of 429.
    let started = Instant::now();
    let options = options(10, 10);
    loop {
        let create = service.create_stream("MyDevice", "Second", &options);
        tokio::pin!(create);
        let result = tokio::select! {
            result = &mut create => result,
            request = device.next_stream_request() => {
                device.answer(&request.request_id, 400, QoS::AtMostOnce).await;
                create.await
            }
        };
        match result {
            Ok(invitation) => {
                assert!(!invitation.is_accepted, "the device rejected it");
                break;
            }
            Err(CreateStreamError::Throttled { .. })
                if started.elapsed() < Duration::from_secs(3) =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(error) => panic!(
                "{:?} after the first client gave up, a new creation still fails: {error}",
                started.elapsed()
            ),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_the_first_side_sends_before_the_second_arrives_is_delivered_in_order() {
    let relay = Relay::start(&[]).await;
    let connection_string = relay.add_device("MyDevice").await;
    let mut device = c_sdk_device(&relay, &connection_string).await;
    let (invitation, request) = accepted_stream(&relay, &mut device).await;
    // The device side speaks first, as a server's banner would.
    let mut device_side = open_side(&relay, &request.url, &request.authorization_token).await;
    for message in ["banner", "second line", "third line"] {
        device_side
            .send(Message::Text(message.into()))
            .await
            .expect("sent while unpaired");
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut service_side =
        open_side(&relay, &invitation.url, &invitation.authorization_token).await;
    for expected in ["banner", "second line", "third line"] {
        let message = next_non_control(&mut service_side, Duration::from_secs(10)).await;
        assert!(
            matches!(&message, Some(Ok(Message::Text(text))) if text.as_str() == expected),
            "expected {expected:?}, got {message:?}"
        );
    }
    service_side
        .send(Message::Binary(b"reply".to_vec().into()))
        .await
        .expect("sent");
    let reply = next_non_control(&mut device_side, Duration::from_secs(10)).await;
    assert!(
        matches!(&reply, Some(Ok(Message::Binary(data))) if data.as_ref() == b"reply"),
        "{reply:?}"
    );
}
