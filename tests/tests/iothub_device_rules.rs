//! IoT Hub's device-side rules (PROTOCOL.md, "Device side: the control
//! channel"), checked against a running relay on its MQTT-over-TLS listener
//! with a client that behaves like IoT Hub's C device SDK. Each test names
//! the rule it checks and fails if the relay breaks it.

use std::time::{Duration, Instant, SystemTime};

use devstreams_tests::iothub::{
    c_sdk_connect, header, receive, service_token, stream_creation_request, websocket_upgrade,
    CSdkDevice, Received, ANSWER_TIMEOUT, C_SDK_KEEP_ALIVE,
};
use devstreams_tests::{raw_https, Relay};
use framing::mqtt::{ConnectReturnCode, MqttConnection, Packet, QoS, SubscribeReasonCode};
use framing::ConnectionString;

const API_VERSION: &str = "2018-10-20-preview";

async fn relay_and_device(device_id: &str) -> (Relay, String) {
    let relay = Relay::start(&[]).await;
    let connection_string = relay.add_device(device_id).await;
    (relay, connection_string)
}

fn creation_request(relay: &Relay, path: &str) -> String {
    creation_request_with_timeouts(relay, path, 5, 10)
}

fn creation_request_with_timeouts(
    relay: &Relay,
    path: &str,
    connect_timeout: u64,
    response_timeout: u64,
) -> String {
    let token = service_token(&relay.service_connection_string);
    stream_creation_request(
        &format!("{path}?api-version={API_VERSION}"),
        relay.port(),
        &token,
        connect_timeout,
        response_timeout,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_takes_the_iothub_username_and_a_device_sas_without_policy() {
    let (relay, connection_string) = relay_and_device("MyDevice").await;
    let key = ConnectionString::parse_device(&connection_string)
        .expect("device string")
        .key()
        .to_vec();
    let (port, tls) = (relay.mqtt_port(), relay.tls());

    let connect = c_sdk_connect("localhost", "MyDevice", None, &key, C_SDK_KEEP_ALIVE);
    let login = connect.login.clone().expect("the C SDK always logs in");
    assert!(
        login
            .username
            .starts_with("localhost/MyDevice/?api-version=")
            && login.username.contains("&DeviceClientType=")
    );
    assert!(
        login.password.ends_with("&skn="),
        "older C SDKs end device tokens with an empty skn"
    );
    let (code, _accepted) = CSdkDevice::connect_raw(port, &tls, connect).await;
    assert_eq!(
        code,
        ConnectReturnCode::Success,
        "username <host>/<deviceId>/?api-version=…&DeviceClientType=… and a device SAS"
    );

    let mut policy_token = c_sdk_connect("localhost", "MyDevice", None, &key, C_SDK_KEEP_ALIVE);
    let expiry = SystemTime::now() + Duration::from_secs(3600);
    let signed_by_the_device_key_but_naming_a_policy =
        framing::sas::sign("localhost/devices/MyDevice", &key, expiry, Some("service"));
    let username = policy_token
        .login
        .as_ref()
        .map(|login| login.username.clone())
        .unwrap_or_default();
    policy_token.set_login(username, signed_by_the_device_key_but_naming_a_policy);
    let (code, mut refused) = CSdkDevice::connect_raw(port, &tls, policy_token).await;
    assert_eq!(
        code,
        ConnectReturnCode::NotAuthorized,
        "a token with skn is a service token, not a device password"
    );
    assert!(
        matches!(
            receive(&mut refused, Duration::from_secs(5)).await,
            Received::Closed
        ),
        "a refused CONNECT is closed"
    );

    let mut wrong_username = c_sdk_connect("localhost", "MyDevice", None, &key, C_SDK_KEEP_ALIVE);
    let password = wrong_username
        .login
        .as_ref()
        .map(|login| login.password.clone())
        .unwrap_or_default();
    wrong_username.set_login(
        format!("localhost/OtherDevice/?api-version={API_VERSION}"),
        password,
    );
    let (code, _) = CSdkDevice::connect_raw(port, &tls, wrong_username).await;
    assert_eq!(
        code,
        ConnectReturnCode::BadUserNamePassword,
        "the username must name the connecting device"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_request_topic_has_the_iothub_form_and_answers_never_come_back() {
    let (relay, connection_string) = relay_and_device("MyDevice").await;
    let mut device = CSdkDevice::connect(
        relay.mqtt_port(),
        &relay.tls(),
        &connection_string,
        None,
        C_SDK_KEEP_ALIVE,
    )
    .await;
    let request_text = creation_request(&relay, "/twins/MyDevice/streams/TestStream");
    let device_side = async {
        let request = device.next_stream_request().await;
        device
            .answer(&request.request_id, 400, QoS::AtMostOnce)
            .await;
        // Packets keep their order: had the relay delivered our `res` publish
        // back to us (we subscribe to `$iothub/streams/res/#`), it would
        // arrive before this PINGRESP.
        device.ping().await;
        request
    };
    let ((status, headers, _body), request) =
        tokio::join!(raw_https(&relay, &request_text), device_side);

    assert_eq!(
        request.topic.split('/').count(),
        5,
        "exactly five '/'-separated levels: {}",
        request.topic
    );
    assert_eq!(request.stream_name, "TestStream");
    let rid = &request.request_id;
    assert!(
        !rid.is_empty() && rid.len() <= 10 && rid.bytes().all(|b| b.is_ascii_digit()),
        "$rid is a short decimal: {rid:?}"
    );
    let raw_url = request.raw_value("$url").expect("$url present");
    assert!(
        !raw_url.contains('/') && !raw_url.contains(':'),
        "$url has '/' and ':' percent-encoded: {raw_url}"
    );
    let expected_base = format!("wss://localhost:{}/bridges/", relay.port());
    assert!(
        request.url.starts_with(&expected_base),
        "the streaming URL names the host the device asked for in TLS (SNI) and the main listener's port: {}",
        request.url
    );
    let auth = &request.authorization_token;
    assert!(!auth.is_empty(), "$auth present");
    assert!(
        !auth.contains(['=', '&', '/', '+', '%']),
        "$auth holds none of = & / + %: {auth}"
    );

    assert_eq!(status, 200, "a rejection is an answer, not an error");
    assert_eq!(
        header(&headers, "iothub-streaming-is-accepted"),
        Some("False")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_at_qos_0_and_qos_1_both_count_and_qos_1_is_acknowledged() {
    let (relay, connection_string) = relay_and_device("MyDevice").await;
    let mut device = CSdkDevice::connect(
        relay.mqtt_port(),
        &relay.tls(),
        &connection_string,
        None,
        C_SDK_KEEP_ALIVE,
    )
    .await;
    let cases = [
        (200, QoS::AtMostOnce, "True"),
        (200, QoS::AtLeastOnce, "True"),
        (400, QoS::AtMostOnce, "False"),
        (400, QoS::AtLeastOnce, "False"),
    ];
    for (status, qos, expected) in cases {
        let request_text = creation_request(&relay, "/twins/MyDevice/streams/TestStream");
        let device_side = async {
            let request = device.next_stream_request().await;
            // `answer` waits for the PUBACK of a QoS 1 answer and checks its packet id.
            device.answer(&request.request_id, status, qos).await;
        };
        let ((http_status, headers, body), ()) =
            tokio::join!(raw_https(&relay, &request_text), device_side);
        assert_eq!(http_status, 200, "answer {status} at {qos:?}: {body}");
        assert_eq!(
            header(&headers, "iothub-streaming-is-accepted"),
            Some(expected),
            "answer {status} at {qos:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_iothub_subscriptions_get_a_suback_and_the_connection_stays() {
    let (relay, connection_string) = relay_and_device("MyDevice").await;
    let mut device = CSdkDevice::connect(
        relay.mqtt_port(),
        &relay.tls(),
        &connection_string,
        None,
        C_SDK_KEEP_ALIVE,
    )
    .await;
    for filters in [
        vec!["$iothub/methods/POST/#"],
        vec![
            "$iothub/twin/res/#",
            "$iothub/twin/PATCH/properties/desired/#",
        ],
        vec![
            "$iothub/methods/POST/#",
            framing::topics::STREAM_REQUESTS_FILTER,
        ],
    ] {
        // `subscribe` panics unless a SUBACK with one code per filter arrives.
        let codes = device.subscribe(&filters).await;
        for (filter, code) in filters.iter().zip(&codes) {
            match *filter {
                framing::topics::STREAM_REQUESTS_FILTER => {
                    assert_eq!(*code, SubscribeReasonCode::Success(QoS::AtMostOnce))
                }
                _ => assert!(
                    matches!(
                        code,
                        SubscribeReasonCode::Success(_) | SubscribeReasonCode::Failure
                    ),
                    "{filter}: {code:?}"
                ),
            }
        }
    }
    device.ping().await;
    let request_text = creation_request(&relay, "/twins/MyDevice/streams/TestStream");
    let device_side = async {
        let request = device.next_stream_request().await;
        device
            .answer(&request.request_id, 200, QoS::AtMostOnce)
            .await;
    };
    let ((_, headers, _), ()) = tokio::join!(raw_https(&relay, &request_text), device_side);
    assert_eq!(
        header(&headers, "iothub-streaming-is-accepted"),
        Some("True"),
        "streams still work on the same connection"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_connection_with_the_same_device_id_closes_the_first() {
    let (relay, connection_string) = relay_and_device("MyDevice").await;
    let (port, tls) = (relay.mqtt_port(), relay.tls());
    let mut first =
        CSdkDevice::connect(port, &tls, &connection_string, None, C_SDK_KEEP_ALIVE).await;
    let key = ConnectionString::parse_device(&connection_string)
        .expect("device string")
        .key()
        .to_vec();
    let (code, second) = CSdkDevice::connect_raw(
        port,
        &tls,
        c_sdk_connect("localhost", "MyDevice", None, &key, C_SDK_KEEP_ALIVE),
    )
    .await;
    assert_eq!(code, ConnectReturnCode::Success);
    // At CONNECT already, not only once the new connection subscribes.
    assert!(
        matches!(
            receive(&mut first.mqtt, Duration::from_secs(5)).await,
            Received::Closed
        ),
        "the first connection is closed when the second is accepted"
    );
    let mut second = CSdkDevice::from_connection(second);
    second
        .subscribe(&[
            framing::topics::STREAM_REQUESTS_FILTER,
            framing::topics::STREAM_RESPONSES_FILTER,
        ])
        .await;
    let request_text = creation_request(&relay, "/twins/MyDevice/streams/TestStream");
    let device_side = async {
        let request = second.next_stream_request().await;
        second
            .answer(&request.request_id, 200, QoS::AtMostOnce)
            .await;
    };
    let ((_, headers, _), ()) = tokio::join!(raw_https(&relay, &request_text), device_side);
    assert_eq!(
        header(&headers, "iothub-streaming-is-accepted"),
        Some("True"),
        "requests go to the new connection"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_is_enforced_at_one_and_a_half_times() {
    const KEEP_ALIVE_SECONDS: u16 = 2;
    let (relay, connection_string) = relay_and_device("MyDevice").await;
    let mut device = CSdkDevice::connect(
        relay.mqtt_port(),
        &relay.tls(),
        &connection_string,
        None,
        KEEP_ALIVE_SECONDS,
    )
    .await;
    // Silent past 1 × keep-alive but within 1.5 ×: still connected.
    tokio::time::sleep(Duration::from_millis(2_600)).await;
    device.ping().await;
    let silent_since = Instant::now();
    // The relay keeps publishing stream requests to the silent device: what
    // the relay sends must not keep the device's session alive.
    let keep_asking = async {
        let request_text =
            creation_request_with_timeouts(&relay, "/twins/MyDevice/streams/TestStream", 1, 1);
        while silent_since.elapsed() < Duration::from_secs(4) {
            raw_https(&relay, &request_text).await;
        }
    };
    let wait_for_close = async {
        loop {
            let remaining = Duration::from_secs(6).saturating_sub(silent_since.elapsed());
            match receive(&mut device.mqtt, remaining).await {
                Received::Packet(framing::mqtt::Packet::Publish(_)) => continue,
                ended => return (ended, silent_since.elapsed()),
            }
        }
    };
    let ((), (ended, waited)) = tokio::join!(keep_asking, wait_for_close);
    assert!(
        matches!(ended, Received::Closed),
        "a silent device is disconnected: {ended:?}"
    );
    assert!(
        waited >= Duration::from_millis(2_700) && waited < Duration::from_millis(3_800),
        "closed {waited:?} after the last packet; 1.5 × {KEEP_ALIVE_SECONDS} s is 3 s"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn module_stream_requests_reach_the_module_and_device_requests_the_device() {
    let (relay, connection_string) = relay_and_device("MyDevice").await;
    let (port, tls) = (relay.mqtt_port(), relay.tls());
    let mut device =
        CSdkDevice::connect(port, &tls, &connection_string, None, C_SDK_KEEP_ALIVE).await;
    let mut module = CSdkDevice::connect(
        port,
        &tls,
        &connection_string,
        Some("edge"),
        C_SDK_KEEP_ALIVE,
    )
    .await;

    let request_text =
        creation_request(&relay, "/twins/MyDevice/modules/edge/streams/ModuleStream");
    let module_side = async {
        let request = module.next_stream_request().await;
        assert_eq!(request.stream_name, "ModuleStream");
        module
            .answer(&request.request_id, 200, QoS::AtMostOnce)
            .await;
    };
    let ((status, headers, body), ()) = tokio::join!(raw_https(&relay, &request_text), module_side);
    assert_eq!(
        (status, header(&headers, "iothub-streaming-is-accepted")),
        (200, Some("True")),
        "{body}"
    );
    // The device's own connection is alive and got no request (a PUBLISH would precede the PINGRESP).
    device.ping().await;

    let request_text = creation_request(&relay, "/twins/MyDevice/streams/DeviceStream");
    let device_side = async {
        let request = device.next_stream_request().await;
        assert_eq!(request.stream_name, "DeviceStream");
        device
            .answer(&request.request_id, 200, QoS::AtMostOnce)
            .await;
    };
    let ((status, headers, body), ()) = tokio::join!(raw_https(&relay, &request_text), device_side);
    assert_eq!(
        (status, header(&headers, "iothub-streaming-is-accepted")),
        (200, Some("True")),
        "{body}"
    );
    module.ping().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_over_websocket_answers_the_subprotocol_as_the_sdk_spelled_it() {
    let (relay, connection_string) = relay_and_device("MyDevice").await;
    let key = ConnectionString::parse_device(&connection_string)
        .expect("device string")
        .key()
        .to_vec();
    // IoT Hub's C SDK offers `MQTT`; a client that checks the answer byte for byte needs it back as offered.
    let url = format!("wss://localhost:{}/$iothub/websocket", relay.port());
    let answer = websocket_upgrade(
        relay.port(),
        &url,
        &[("Sec-WebSocket-Protocol", "MQTT")],
        &relay.tls(),
    )
    .await;
    assert_eq!(answer.status, 101, "{:?}", answer.headers);
    let subprotocol = answer
        .headers
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case("sec-websocket-protocol"));
    assert_eq!(
        subprotocol.map(|(_, value)| value.as_str()),
        Some("MQTT"),
        "{:?}",
        answer.headers
    );
    let socket = answer.socket.expect("a socket comes with 101");
    let mut mqtt = MqttConnection::new(socket, framing::mqtt::DEFAULT_MAX_PACKET_SIZE);
    mqtt.write_packet(&Packet::Connect(c_sdk_connect(
        "localhost",
        "MyDevice",
        None,
        &key,
        C_SDK_KEEP_ALIVE,
    )))
    .await
    .expect("CONNECT sent");
    match tokio::time::timeout(ANSWER_TIMEOUT, mqtt.read_packet()).await {
        Ok(Ok(Some(Packet::ConnAck(ack)))) => assert_eq!(ack.code, ConnectReturnCode::Success),
        other => panic!("expected CONNACK over WebSocket, got {other:?}"),
    }
}

/// IoT Hub allows `# ? = @ % +` and the rest of its set in device ids, and
/// SDKs write such an id three ways in their SAS resource: as it is (the C
/// SDK, resource unencoded), as it is inside an encoded resource (ours), or
/// encoded before the whole resource is encoded again (Node, C#); usernames
/// carry it as it is or encoded. Every form connects; a token for a
/// neighbouring id does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_with_url_characters_connect_in_every_sdk_form() {
    const DEVICE_ID: &str = "a#b?c=d@e%41+";
    let (relay, connection_string) = relay_and_device(DEVICE_ID).await;
    let key = ConnectionString::parse_device(&connection_string)
        .expect("device string")
        .key()
        .to_vec();
    let (port, tls) = (relay.mqtt_port(), relay.tls());
    let expiry = SystemTime::now() + Duration::from_secs(3600);
    let encoded = framing::identity::encode_path_segment(DEVICE_ID);

    let c_sdk = c_sdk_connect("localhost", DEVICE_ID, None, &key, C_SDK_KEEP_ALIVE);
    let (code, _c_sdk) = CSdkDevice::connect_raw(port, &tls, c_sdk).await;
    assert_eq!(
        code,
        ConnectReturnCode::Success,
        "the C SDK's unencoded form"
    );

    let username_as_is = format!("localhost/{DEVICE_ID}/?api-version={API_VERSION}");
    let username_encoded = format!("localhost/{encoded}/?api-version={API_VERSION}");
    for (form, resource, username) in [
        (
            "the id as it is in an encoded resource",
            format!("localhost/devices/{DEVICE_ID}"),
            &username_as_is,
        ),
        (
            "the id encoded, then the whole resource",
            format!("localhost/devices/{encoded}"),
            &username_as_is,
        ),
        (
            "an encoded id in the username",
            format!("localhost/devices/{DEVICE_ID}"),
            &username_encoded,
        ),
    ] {
        let mut connect = framing::mqtt::Connect::new(DEVICE_ID);
        connect.keep_alive = C_SDK_KEEP_ALIVE;
        connect.set_login(
            username.clone(),
            framing::sas::sign(&resource, &key, expiry, None),
        );
        let (code, _connection) = CSdkDevice::connect_raw(port, &tls, connect).await;
        assert_eq!(code, ConnectReturnCode::Success, "{form}");
    }

    let mut neighbour = framing::mqtt::Connect::new(DEVICE_ID);
    neighbour.set_login(
        username_as_is.clone(),
        framing::sas::sign("localhost/devices/a#b", &key, expiry, None),
    );
    let (code, _) = CSdkDevice::connect_raw(port, &tls, neighbour).await;
    assert_eq!(
        code,
        ConnectReturnCode::NotAuthorized,
        "a token naming another id is refused, even signed by this device's key"
    );
}
