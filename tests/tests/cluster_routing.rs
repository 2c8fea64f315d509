//! Presence and routing in cluster mode (issue 10), with real parts: a real
//! `nats-server -js`, three relay nodes each with its own `--node-url`, real
//! HAProxy in TCP mode in front, and the real device-proxy / service-proxy.
//!
//! What is checked: a stream created on one node for a device held by
//! another meets on the holding node (its URL names that node) and carries
//! bytes; two connects of one device to two nodes leave exactly one live
//! channel; a device connected nowhere is answered 404103 after its connect
//! timeout; a killed holding node's device re-dials through the balancer and
//! streams work again; a nats-server restart is survived without restarting
//! any relay (meanwhile cluster-only work is answered 503, never a hang);
//! `relay cluster status` lists the nodes and marks a killed one gone.
//! Every process is stopped by its PID when its handle drops.

use std::time::{Duration, Instant};

use devstreams_tests::audit::{of_kind, wait_for_audit};
use devstreams_tests::cluster::{
    require_haproxy, require_nats_server, start_cluster_device_proxy, start_cluster_service_proxy,
    with_host_name, ClusterNode, TestCluster,
};
use devstreams_tests::iothub::{c_sdk_connect, receive, CSdkDevice, Received};
use devstreams_tests::{start_echo_server, Process};
use framing::mqtt::ConnectReturnCode;
use framing::{CreateStreamError, ServiceClient, StreamInvitation, StreamOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long a device-proxy may take to connect (or re-dial) somewhere.
const DEVICE_CONNECT_WITHIN: Duration = Duration::from_secs(30);

fn tools_present() -> bool {
    require_nats_server() && require_haproxy()
}

/// `localhost:PORT` of one node's main listener (the certificate names
/// `localhost`, and so does every `--node-url` of the harness).
fn node_host(node: &ClusterNode) -> String {
    format!("localhost:{}", node.relay.port())
}

/// A service client that reaches one node directly (not the balancer).
fn service_at(cluster: &TestCluster, node: &ClusterNode) -> ServiceClient {
    let connection = with_host_name(&cluster.service_connection_string(), &node_host(node));
    ServiceClient::new(
        framing::ConnectionString::parse_service(&connection).expect("service string"),
        cluster.certificate.client_tls(),
    )
}

fn options(connect_timeout: Duration) -> StreamOptions {
    StreamOptions {
        connect_timeout,
        response_timeout: Duration::from_secs(10),
        target: None,
        half_close: false,
    }
}

/// Asks for streams until the device accepts one (it is connected and
/// ready somewhere); returns the streaming URL of that accepted stream.
async fn accepted_stream_url(service: &ServiceClient, device_id: &str) -> String {
    accepted_stream_url_retrying(service, device_id, false).await
}

/// The same, right after a node died: a creation caught in the failover (a
/// request that reached the device's channel as it was being replaced) may
/// also end in a 504, and the service simply asks again, as a service
/// program would. Seen once in a full parallel run on 2 loaded cores.
async fn accepted_stream_url_after_failover(service: &ServiceClient, device_id: &str) -> String {
    accepted_stream_url_retrying(service, device_id, true).await
}

async fn accepted_stream_url_retrying(
    service: &ServiceClient,
    device_id: &str,
    retry_device_timeouts: bool,
) -> String {
    let deadline = Instant::now() + DEVICE_CONNECT_WITHIN;
    loop {
        match service
            .create_stream(device_id, "Probe", &options(Duration::from_secs(1)))
            .await
        {
            Ok(invitation) if invitation.is_accepted => return invitation.url,
            Ok(invitation) => panic!("the device rejected the probe: {invitation:?}"),
            Err(
                CreateStreamError::DeviceOffline(_)
                | CreateStreamError::Unexpected { status: 503, .. }
                | CreateStreamError::Connect(_),
            ) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(200)).await,
            Err(CreateStreamError::DeviceTimeout(_))
                if retry_device_timeouts && Instant::now() < deadline => {}
            Err(error) => {
                panic!("no stream to {device_id} within {DEVICE_CONNECT_WITHIN:?}: {error}")
            }
        }
    }
}

/// A C SDK style device connected straight to one node's MQTT listener.
async fn c_sdk_device_on(cluster: &TestCluster, node: &str, device_string: &str) -> CSdkDevice {
    CSdkDevice::connect(
        cluster.node(node).relay.mqtt_port(),
        &cluster.certificate.client_tls(),
        device_string,
        None,
        60,
    )
    .await
}

/// Starts a creation and leaves it waiting for the device's answer.
fn create_in_background(
    service: ServiceClient,
    device_id: &str,
    connect_timeout: Duration,
) -> tokio::task::JoinHandle<Result<StreamInvitation, CreateStreamError>> {
    let device_id = device_id.to_string();
    tokio::spawn(async move {
        service
            .create_stream(&device_id, "Probe", &options(connect_timeout))
            .await
    })
}

/// The device accepted, and the streaming URL names `node` (both
/// WebSockets meet on the node holding the device).
fn assert_accepted_on(cluster: &TestCluster, node: &str, invitation: &StreamInvitation) {
    assert!(invitation.is_accepted, "{invitation:?}");
    assert!(
        invitation.url.starts_with(&cluster.node(node).node_url),
        "{}",
        invitation.url
    );
}

/// Bytes sent into a service-proxy come back from the echo server behind
/// the device-proxy.
async fn echo_through(port: u16, message: &[u8]) {
    let exchange = async {
        let mut socket = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("service-proxy accepts");
        socket.write_all(message).await.expect("write");
        let mut back = vec![0u8; message.len()];
        socket.read_exact(&mut back).await.expect("echo read");
        assert_eq!(back, message, "the echo comes back unchanged");
    };
    tokio::time::timeout(Duration::from_secs(20), exchange)
        .await
        .expect("the echo came back in time");
}

/// An echo device (device-proxy in front of an echo server) whose
/// connection string names `host`.
async fn echo_device(
    cluster: &TestCluster,
    connection_string: &str,
    host: &str,
) -> (Process, tokio::task::JoinHandle<()>) {
    let (echo_port, echo) = start_echo_server().await;
    let connection = with_host_name(connection_string, host);
    let proxy = start_cluster_device_proxy(
        &cluster.certificate,
        cluster.nodes[0].relay.directory.path(),
        &connection,
        echo_port,
        &[],
    )
    .await;
    (proxy, echo)
}

#[tokio::test]
async fn a_stream_to_a_device_held_by_another_node_meets_on_the_holding_node() {
    if !tools_present() {
        return;
    }
    let cluster = TestCluster::start(3, &[]).await;
    let device_string = cluster.add_device("held-on-2").await;
    let holder = cluster.node("relay-2");
    let (_device_proxy, _echo) = echo_device(&cluster, &device_string, &node_host(holder)).await;

    // The service asks relay-1, which does not hold the device.
    let entry = cluster.node("relay-1");
    let url = accepted_stream_url(&service_at(&cluster, entry), "held-on-2").await;
    assert!(
        url.starts_with(&format!("{}/bridges/", holder.node_url)),
        "the streaming URL names the holding node ({}): {url}",
        holder.node_url
    );

    // And bytes flow: service-proxy through relay-1, device-proxy on relay-2.
    let entry_string = with_host_name(&cluster.service_connection_string(), &node_host(entry));
    let (_service_proxy, port) = start_cluster_service_proxy(
        &cluster.certificate,
        entry.relay.directory.path(),
        &entry_string,
        "held-on-2",
        &[],
    )
    .await;
    echo_through(port, b"across the cluster").await;

    // One stream, one id in both nodes' audit logs: the entry node's.
    let routed = wait_for_audit(
        &holder.audit_log(),
        "the routed stream established",
        |events| !of_kind(events, "stream_established").is_empty(),
    )
    .await;
    let established = of_kind(&routed, "stream_established")[0]["stream_id"].clone();
    let entry_events = wait_for_audit(
        &entry.audit_log(),
        "the accepted line of the stream relay-2 established",
        |events| {
            of_kind(events, "stream_accepted")
                .iter()
                .any(|accepted| accepted["stream_id"] == established)
        },
    )
    .await;
    let entry_requests = of_kind(&entry_events, "stream_requested");
    let routed_requests = of_kind(&routed, "stream_requested");
    assert!(routed_requests.len() >= 2, "{routed_requests:?}");
    for request in &routed_requests {
        assert_eq!(request["routed_from"], "relay-1", "{request}");
        let stream_id = &request["stream_id"];
        assert!(
            entry_requests
                .iter()
                .any(|entry_request| &entry_request["stream_id"] == stream_id),
            "relay-1 audited {stream_id} too: {entry_requests:?}"
        );
    }

    // Through the balancer too, whichever node it picks.
    let url = accepted_stream_url(&cluster.service_client(), "held-on-2").await;
    assert!(url.starts_with(&holder.node_url), "{url}");
}

#[tokio::test]
async fn a_device_connected_nowhere_is_answered_404103_after_its_connect_timeout() {
    if !tools_present() {
        return;
    }
    let cluster = TestCluster::start(3, &[]).await;
    cluster.add_device("never-connects").await;
    let started = Instant::now();
    let answer = cluster
        .service_client()
        .create_stream("never-connects", "Probe", &options(Duration::from_secs(2)))
        .await;
    let elapsed = started.elapsed();
    assert!(
        matches!(answer, Err(CreateStreamError::DeviceOffline(_))),
        "an offline device is 404103: {answer:?}"
    );
    assert!(
        elapsed >= Duration::from_millis(1900),
        "the connect timeout is waited for (a device may be connecting): {elapsed:?}"
    );
    assert!(
        elapsed < Duration::from_secs(8),
        "answered at the connect timeout, not a generic timeout: {elapsed:?}"
    );
}

/// Sends PINGREQ; true when PINGRESP comes back, false when the relay
/// closed the connection.
async fn alive(device: &mut CSdkDevice) -> bool {
    use framing::mqtt::Packet;
    if device.mqtt.write_packet(&Packet::PingReq).await.is_err() {
        return false;
    }
    loop {
        match receive(&mut device.mqtt, Duration::from_secs(5)).await {
            Received::Packet(Packet::PingResp) => return true,
            Received::Packet(_) => continue,
            Received::Closed => return false,
            Received::Nothing => panic!("the relay neither answered PINGREQ nor closed"),
        }
    }
}

#[tokio::test]
async fn a_connect_on_another_node_takes_over_and_a_race_leaves_one_channel() {
    if !tools_present() {
        return;
    }
    let cluster = TestCluster::start(3, &[]).await;
    let device_string = cluster.add_device("twice").await;
    let tls = cluster.certificate.client_tls();
    let mqtt_port = |name: &str| cluster.node(name).relay.mqtt_port();

    // One after the other: the newer channel (on relay-3) closes relay-2's.
    let mut older = CSdkDevice::connect(mqtt_port("relay-2"), &tls, &device_string, None, 60).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut newer = CSdkDevice::connect(mqtt_port("relay-3"), &tls, &device_string, None, 60).await;
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let Received::Closed = receive(&mut older.mqtt, Duration::from_secs(5)).await {
                return;
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the older channel on relay-2 was closed");
    assert!(
        alive(&mut newer).await,
        "the newer channel on relay-3 lives"
    );
    drop(newer);

    // A race, several times: exactly one of two simultaneous connects lives.
    // (CONNECT alone makes a channel the identity's; the loser may be closed
    // at any moment after its CONNACK.)
    let connection =
        framing::ConnectionString::parse_device(&device_string).expect("device string");
    let connect = || c_sdk_connect(connection.host(), "twice", None, connection.key(), 60);
    for round in 0..5 {
        let (first, second) = tokio::join!(
            CSdkDevice::connect_raw(mqtt_port("relay-1"), &tls, connect()),
            CSdkDevice::connect_raw(mqtt_port("relay-3"), &tls, connect()),
        );
        assert_eq!(first.0, ConnectReturnCode::Success, "round {round}");
        assert_eq!(second.0, ConnectReturnCode::Success, "round {round}");
        let mut first = CSdkDevice::from_connection(first.1);
        let mut second = CSdkDevice::from_connection(second.1);
        // Give the announcements time to cross NATS.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (first_alive, second_alive) = tokio::join!(alive(&mut first), alive(&mut second));
        assert!(
            first_alive != second_alive,
            "round {round}: exactly one channel lives (relay-1: {first_alive}, relay-3: {second_alive})"
        );
    }

    // A stream request reaches the one that lives, from any node.
    let mut device =
        CSdkDevice::connect(mqtt_port("relay-2"), &tls, &device_string, None, 60).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let service = service_at(&cluster, cluster.node("relay-1"));
    let creation = create_in_background(service, "twice", Duration::from_secs(5));
    let request = tokio::time::timeout(Duration::from_secs(10), device.next_stream_request())
        .await
        .expect("the stream request reached the live channel on relay-2");
    device.answer(&request.request_id, 200, rumqttc_qos()).await;
    let invitation = creation.await.expect("join").expect("accepted");
    assert_accepted_on(&cluster, "relay-2", &invitation);
}

fn rumqttc_qos() -> framing::mqtt::QoS {
    framing::mqtt::QoS::AtMostOnce
}

#[tokio::test]
async fn killing_the_holding_node_moves_the_device_and_streams_work_again() {
    if !tools_present() {
        return;
    }
    let cluster = TestCluster::start(3, &[]).await;
    let device_string = cluster.add_device("moving").await;
    // Through the balancer, as a fleet's device would.
    let (_device_proxy, _echo) =
        echo_device(&cluster, &device_string, &cluster.balancer.host_name()).await;
    let service = cluster.service_client();
    let url = accepted_stream_url(&service, "moving").await;
    let holder = cluster
        .nodes
        .iter()
        .find(|node| url.starts_with(&format!("{}/", node.node_url)))
        .unwrap_or_else(|| panic!("the URL {url} names one of the nodes"));
    holder.kill();

    let url = accepted_stream_url_after_failover(&service, "moving").await;
    assert!(
        !url.starts_with(&format!("{}/", holder.node_url)),
        "the new stream meets on a live node: {url}"
    );
    let (_service_proxy, port) = start_cluster_service_proxy(
        &cluster.certificate,
        cluster.nodes[0].relay.directory.path(),
        &cluster.service_connection_string(),
        "moving",
        &[],
    )
    .await;
    echo_through(port, b"after the node died").await;
}

#[tokio::test]
async fn a_nats_restart_is_survived_and_meanwhile_cluster_work_is_503() {
    if !tools_present() {
        return;
    }
    let mut cluster = TestCluster::start(3, &[]).await;
    let device_string = cluster.add_device("steady").await;
    let holder_host = node_host(cluster.node("relay-2"));
    let (_device_proxy, _echo) = echo_device(&cluster, &device_string, &holder_host).await;
    let from_relay_1 = service_at(&cluster, cluster.node("relay-1"));
    let from_relay_2 = service_at(&cluster, cluster.node("relay-2"));
    accepted_stream_url(&from_relay_1, "steady").await;

    cluster.nats.stop().await;
    // Give the nodes a moment to notice the lost connection.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let started = Instant::now();
    let answer = from_relay_1
        .create_stream("steady", "Probe", &options(Duration::from_secs(20)))
        .await;
    assert!(
        matches!(
            answer,
            Err(CreateStreamError::Unexpected { status: 503, .. })
        ),
        "a node without NATS answers 503 for a device it does not hold: {answer:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "and answers at once: {:?}",
        started.elapsed()
    );
    // The holding node still serves its own device.
    let url = accepted_stream_url(&from_relay_2, "steady").await;
    assert!(url.starts_with(&cluster.node("relay-2").node_url), "{url}");

    cluster.nats.start_again().await;
    // No relay restarted: relay-1 reaches relay-2's device again.
    let url = accepted_stream_url(&from_relay_1, "steady").await;
    assert!(url.starts_with(&cluster.node("relay-2").node_url), "{url}");
}

async fn cluster_status(cluster: &TestCluster) -> String {
    let output = cluster.cli(&["cluster", "status"]).await;
    assert!(
        output.status.success(),
        "relay cluster status failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn node_line<'a>(status: &'a str, name: &str) -> Option<&'a str> {
    status
        .lines()
        .find(|line| line.split_whitespace().next() == Some(name))
}

#[tokio::test]
async fn cluster_status_lists_the_nodes_and_marks_a_killed_one_gone() {
    if !tools_present() {
        return;
    }
    let cluster = TestCluster::start(3, &[]).await;
    let device_string = cluster.add_device("counted").await;
    let holder = cluster.node("relay-1");
    let (_device_proxy, _echo) = echo_device(&cluster, &device_string, &node_host(holder)).await;
    accepted_stream_url(&service_at(&cluster, holder), "counted").await;

    // Heartbeats every 2 s: the device shows up on relay-1's line.
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        let status = cluster_status(&cluster).await;
        let counted = node_line(&status, "relay-1").and_then(|line| line.split_whitespace().nth(2))
            == Some("1");
        if counted || Instant::now() > deadline {
            break status;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    for node in &cluster.nodes {
        let line = node_line(&status, &node.name)
            .unwrap_or_else(|| panic!("{} is listed:\n{status}", node.name));
        assert!(line.contains(&node.node_url), "{line}");
        assert!(line.ends_with(" up"), "{line}");
    }
    assert_eq!(
        node_line(&status, "relay-1").and_then(|line| line.split_whitespace().nth(2)),
        Some("1"),
        "relay-1 holds one device:\n{status}"
    );

    cluster.node("relay-3").kill();
    let deadline = Instant::now() + Duration::from_secs(12);
    loop {
        let status = cluster_status(&cluster).await;
        let gone = node_line(&status, "relay-3").is_some_and(|line| line.ends_with(" gone"));
        if gone {
            assert!(
                node_line(&status, "relay-1").is_some_and(|line| line.ends_with(" up")),
                "{status}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "relay-3 marked gone after it stopped heartbeating:\n{status}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test]
async fn per_device_limits_hold_across_entry_nodes() {
    if !tools_present() {
        return;
    }
    // One stream at a time per device, on every node.
    let cluster = TestCluster::start(3, &["--max-streams-per-device", "1"]).await;
    let device_string = cluster.add_device("limited").await;
    let holder = cluster.node("relay-2");
    let (_device_proxy, _echo) = echo_device(&cluster, &device_string, &node_host(holder)).await;
    // Accepted through relay-1: the stream is pending (nobody connects to
    // it) and holds the device's one permit until the handshake deadline.
    accepted_stream_url(&service_at(&cluster, cluster.node("relay-1")), "limited").await;
    // A second creation arriving at another node meets the same count.
    let answer = service_at(&cluster, cluster.node("relay-3"))
        .create_stream("limited", "Second", &options(Duration::from_secs(5)))
        .await;
    assert!(
        matches!(answer, Err(CreateStreamError::Throttled { .. })),
        "the device's limit counts streams created through every node: {answer:?}"
    );
}

/// The entry node asks the holding node again whenever a channel of the
/// device announces itself (the device may have moved). When the
/// announcement comes from the node already serving the creation, the
/// repeat must join that creation: before, it became a second creation,
/// and under a limit of one stream the service got 429 for its one
/// creation (CI, `per_device_limits_hold_across_entry_nodes`).
#[tokio::test]
async fn an_announcement_during_a_routed_creation_does_not_create_a_second_stream() {
    if !tools_present() {
        return;
    }
    let cluster = TestCluster::start(2, &["--max-streams-per-device", "1"]).await;
    let device_string = cluster.add_device("asked-twice").await;
    let mut device = c_sdk_device_on(&cluster, "relay-2", &device_string).await;
    let service = service_at(&cluster, cluster.node("relay-1"));
    let creation = create_in_background(service, "asked-twice", Duration::from_secs(20));
    let request = tokio::time::timeout(Duration::from_secs(15), device.next_stream_request())
        .await
        .expect("the routed request reached the device on relay-2");
    // An announcement of an older channel, as a node that lost NATS for a
    // moment sends on reconnection: relay-1 hears it and asks again, and
    // relay-2 (whose channel is newer) announces itself again as well.
    let older_channel = br#"{"order":{"connected_unix_nanos":1,"node":"relay-0","session_id":0}}"#;
    cluster
        .nats
        .publish("devstreams.identity.asked-twice.takeover", older_channel)
        .await;
    // The repeat reaches relay-2 while the device has not answered yet.
    assert!(
        matches!(
            receive(&mut device.mqtt, Duration::from_secs(2)).await,
            Received::Nothing
        ),
        "the device gets one stream request, not one per ask"
    );
    device
        .answer(&request.request_id, 200, framing::mqtt::QoS::AtMostOnce)
        .await;
    let invitation = tokio::time::timeout(Duration::from_secs(15), creation)
        .await
        .expect("the creation ended")
        .expect("join")
        .expect("the one creation is accepted, not throttled by its own repeat");
    assert_accepted_on(&cluster, "relay-2", &invitation);
}

#[tokio::test]
async fn a_takeover_during_a_nats_outage_still_ends_with_one_channel() {
    if !tools_present() {
        return;
    }
    let mut cluster = TestCluster::start(3, &[]).await;
    let device_string = cluster.add_device("outage").await;
    let tls = cluster.certificate.client_tls();
    let mut older = CSdkDevice::connect(
        cluster.node("relay-2").relay.mqtt_port(),
        &tls,
        &device_string,
        None,
        60,
    )
    .await;
    cluster.nats.stop().await;
    // The device comes back on relay-3 while NATS is away: relay-3 serves
    // it from its registry copy, but cannot tell relay-2 yet.
    let mut newer = CSdkDevice::connect(
        cluster.node("relay-3").relay.mqtt_port(),
        &tls,
        &device_string,
        None,
        60,
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    cluster.nats.start_again().await;
    let closed = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            if let Received::Closed = receive(&mut older.mqtt, Duration::from_secs(15)).await {
                return;
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "once NATS is back, the older channel on relay-2 is closed"
    );
    assert!(
        alive(&mut newer).await,
        "the newer channel on relay-3 lives"
    );
}

#[tokio::test]
async fn module_and_device_channels_on_different_nodes_are_each_routed_with_iothub_headers() {
    use devstreams_tests::iothub::{header, service_token, stream_creation_request};
    use devstreams_tests::raw_https;
    if !tools_present() {
        return;
    }
    let cluster = TestCluster::start(3, &[]).await;
    let device_string = cluster.add_device("MyDevice").await;
    let tls = cluster.certificate.client_tls();
    let mut device = CSdkDevice::connect(
        cluster.node("relay-2").relay.mqtt_port(),
        &tls,
        &device_string,
        None,
        60,
    )
    .await;
    let mut module = CSdkDevice::connect(
        cluster.node("relay-3").relay.mqtt_port(),
        &tls,
        &device_string,
        Some("edge"),
        60,
    )
    .await;
    let entry = cluster.node("relay-1");
    let token = service_token(&cluster.service_connection_string());
    let request = |path: &str| {
        stream_creation_request(
            &format!("{path}?api-version=2020-09-30"),
            entry.relay.port(),
            &token,
            5,
            10,
        )
    };

    // The module (held by relay-3) accepts: its node's URL, IoT Hub's headers.
    let module_side = async {
        let request = tokio::time::timeout(Duration::from_secs(10), module.next_stream_request())
            .await
            .expect("the module got the request");
        module
            .answer(&request.request_id, 200, framing::mqtt::QoS::AtMostOnce)
            .await;
    };
    let module_request = request("/twins/MyDevice/modules/edge/streams/ModuleStream");
    let ((status, headers, body), ()) =
        tokio::join!(raw_https(&entry.relay, &module_request), module_side);
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        header(&headers, "iothub-streaming-is-accepted"),
        Some("True")
    );
    let url = header(&headers, "iothub-streaming-url").unwrap_or_default();
    assert!(
        url.starts_with(&format!("{}/bridges/", cluster.node("relay-3").node_url)),
        "the module's stream meets on relay-3: {url}"
    );
    assert!(header(&headers, "iothub-streaming-auth-token").is_some_and(|t| !t.is_empty()));

    // The device (held by relay-2) rejects: 200, is-accepted False, a reason.
    let device_side = async {
        let request = tokio::time::timeout(Duration::from_secs(10), device.next_stream_request())
            .await
            .expect("the device got the request");
        device
            .answer(&request.request_id, 400, framing::mqtt::QoS::AtMostOnce)
            .await;
    };
    let device_request = request("/twins/MyDevice/streams/DeviceStream");
    let ((status, headers, body), ()) =
        tokio::join!(raw_https(&entry.relay, &device_request), device_side);
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        header(&headers, "iothub-streaming-is-accepted"),
        Some("False")
    );
    assert!(header(&headers, "iothub-streaming-url").is_none());
    assert!(body.contains("rejected"), "{body}");
}

#[tokio::test]
async fn a_creation_waits_for_a_device_that_connects_to_another_node_within_its_connect_timeout() {
    if !tools_present() {
        return;
    }
    let cluster = TestCluster::start(3, &[]).await;
    let device_string = cluster.add_device("late").await;
    let service = service_at(&cluster, cluster.node("relay-1"));
    let started = Instant::now();
    let creation = create_in_background(service, "late", Duration::from_secs(10));
    // Nobody holds the device yet: the entry node keeps asking.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut device = c_sdk_device_on(&cluster, "relay-2", &device_string).await;
    let request = tokio::time::timeout(Duration::from_secs(10), device.next_stream_request())
        .await
        .expect("the request reached the device once it connected");
    device
        .answer(&request.request_id, 200, framing::mqtt::QoS::AtMostOnce)
        .await;
    let invitation = creation.await.expect("join").expect("accepted");
    assert_accepted_on(&cluster, "relay-2", &invitation);
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "answered once the device connected, not at the timeout: {:?}",
        started.elapsed()
    );
}
