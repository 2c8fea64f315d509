//! Tests of the cluster harness itself (tests/src/cluster.rs): the real
//! `nats-server` comes up, answers, keeps its port and store across a
//! restart, honours JetStream and login options; real HAProxy forwards
//! stream creation and stream bytes to relays behind it and follows their
//! health. The cluster tests build on these pieces, so a broken piece fails
//! here first, by name.

use std::time::Duration;

use devstreams_tests::cluster::{
    require_haproxy, require_nats_server, start_cluster_device_proxy, start_cluster_service_proxy,
    with_host_name, ClusterCertificate, ClusterNode, Haproxy, NatsServer, TestCluster,
    MAIN_BACKEND, MQTT_BACKEND,
};
use devstreams_tests::iothub::CSdkDevice;
use devstreams_tests::start_echo_server;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn nats_server_restart_keeps_its_port_and_store() {
    if !require_nats_server() {
        return;
    }
    let mut nats = NatsServer::start().await;
    let port = nats.port();
    let (info, answer) = nats.probe(None).await;
    assert!(
        info.contains("\"jetstream\":true"),
        "JetStream is on: {info}"
    );
    assert_eq!(answer, "PONG", "the server answers PING");
    let first_pid = nats.pid();
    nats.restart().await;
    assert_eq!(nats.port(), port, "same port after the restart");
    assert_ne!(nats.pid(), first_pid, "a new process");
    let (info, answer) = nats.probe(None).await;
    assert!(info.contains("\"jetstream\":true"), "{info}");
    assert_eq!(answer, "PONG");
    assert!(
        nats.store_directory().join("jetstream").is_dir(),
        "JetStream keeps its store in the -sd directory:\n{}",
        nats.log()
    );
    assert!(
        nats.url().ends_with(&format!(":{port}")),
        "the URL names the port"
    );
}

#[tokio::test]
async fn nats_server_stopped_refuses_then_serves_again() {
    if !require_nats_server() {
        return;
    }
    let mut nats = NatsServer::start().await;
    nats.stop().await;
    assert!(
        tokio::net::TcpStream::connect(("127.0.0.1", nats.port()))
            .await
            .is_err(),
        "a stopped server refuses connections"
    );
    nats.start_again().await;
    let (_, answer) = nats.probe(None).await;
    assert_eq!(answer, "PONG");
}

#[tokio::test]
async fn nats_server_options_without_jetstream_and_with_login() {
    if !require_nats_server() {
        return;
    }
    let plain = NatsServer::start_without_jetstream().await;
    let (info, answer) = plain.probe(None).await;
    assert!(
        !info.contains("\"jetstream\":true"),
        "JetStream is off: {info}"
    );
    assert_eq!(answer, "PONG");

    let guarded = NatsServer::start_with_credentials("relay", "s3cret").await;
    assert_eq!(
        guarded.url(),
        format!("nats://relay:s3cret@127.0.0.1:{}", guarded.port())
    );
    let (_, answer) = guarded.probe(Some(("relay", "wrong"))).await;
    assert!(
        answer.starts_with("-ERR") && answer.contains("Authorization"),
        "a wrong password is refused: {answer:?}"
    );
    let (_, answer) = guarded.probe(Some(("relay", "s3cret"))).await;
    assert_eq!(answer, "PONG", "the right password is accepted");
}

#[tokio::test]
async fn haproxy_forwards_stream_creation_and_echo_to_a_relay_behind_it() {
    if !require_haproxy() {
        return;
    }
    let certificate = ClusterCertificate::generate();
    let node = ClusterNode::start(None, &certificate, "relay-1", &[]).await;
    let balancer = Haproxy::start(&[node.backend()]).await;
    let log_directory = node.relay.directory.path();

    // Device and service both know only the balancer's address; the
    // streaming URL the relay hands out names the host they used, so both
    // stream WebSockets go through HAProxy too.
    let device_string = with_host_name(
        &node.relay.add_device("behind-balancer").await,
        &balancer.host_name(),
    );
    let service_string =
        with_host_name(&node.relay.service_connection_string, &balancer.host_name());
    let (echo_port, _echo) = start_echo_server().await;
    let _device =
        start_cluster_device_proxy(&certificate, log_directory, &device_string, echo_port, &[])
            .await;
    let (_service, local_port) = start_cluster_service_proxy(
        &certificate,
        log_directory,
        &service_string,
        "behind-balancer",
        &["--connect-timeout", "5"],
    )
    .await;

    let message = b"through haproxy and back";
    let mut received = Vec::new();
    // The device may still be dialing: a stream refused as offline closes
    // the local connection, and the next attempt finds it connected.
    for _attempt in 0..20 {
        let mut local = tokio::net::TcpStream::connect(("127.0.0.1", local_port))
            .await
            .expect("service-proxy accepts");
        local.write_all(message).await.expect("written");
        let mut buffer = vec![0u8; message.len()];
        let read =
            tokio::time::timeout(Duration::from_secs(15), local.read_exact(&mut buffer)).await;
        if let Ok(Ok(_)) = read {
            received = buffer;
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(
        received,
        message,
        "echoed through the balancer; haproxy log:\n{}\nrelay log:\n{}",
        balancer.log(),
        node.relay.process.log()
    );
}

#[tokio::test]
async fn haproxy_mqtt_frontend_reaches_the_relay_mqtt_listener() {
    if !require_haproxy() {
        return;
    }
    let certificate = ClusterCertificate::generate();
    let node = ClusterNode::start(None, &certificate, "relay-1", &[]).await;
    let balancer = Haproxy::start(&[node.backend()]).await;
    let device_string = node.relay.add_device("mqtt-behind-balancer").await;
    // A C SDK style device over TLS on the balancer's 8883-style port: the
    // CONNACK and SUBACKs come from the relay, through HAProxy untouched.
    let _device = CSdkDevice::connect(
        balancer.mqtt_port,
        &certificate.client_tls(),
        &device_string,
        None,
        240,
    )
    .await;
}

#[tokio::test]
async fn haproxy_health_checks_take_a_killed_node_out_and_keep_forwarding() {
    if !require_haproxy() {
        return;
    }
    let certificate = ClusterCertificate::generate();
    let first = ClusterNode::start(None, &certificate, "relay-1", &[]).await;
    let second = ClusterNode::start(None, &certificate, "relay-2", &[]).await;
    let balancer = Haproxy::start(&[first.backend(), second.backend()]).await;
    for backend in [MAIN_BACKEND, MQTT_BACKEND] {
        for server in ["relay-1", "relay-2"] {
            balancer
                .wait_for_server_state(backend, server, "UP", Duration::from_secs(10))
                .await;
        }
    }
    first.kill();
    balancer
        .wait_for_server_state(MAIN_BACKEND, "relay-1", "DOWN", Duration::from_secs(10))
        .await;
    balancer
        .wait_for_server_state(MAIN_BACKEND, "relay-2", "UP", Duration::from_secs(1))
        .await;
    // Every new connection now reaches the live node: TLS completes with
    // the shared certificate each time.
    let tls = certificate.client_tls();
    for _ in 0..4 {
        let stream = framing::transport::connect(
            "localhost",
            balancer.main_port,
            Some(&tls),
            Duration::from_secs(10),
        )
        .await;
        assert!(
            stream.is_ok(),
            "TLS through the balancer to the live node: {:?}",
            stream.err()
        );
    }
}

/// The whole harness at once: NATS, three `relay serve --cluster` nodes and
/// HAProxy in front; a device and a service that know only the balancer.
#[tokio::test]
async fn three_nodes_join_one_nats_behind_haproxy() {
    if !require_nats_server() || !require_haproxy() {
        return;
    }
    let cluster = TestCluster::start(3, &[]).await;
    for node in &cluster.nodes {
        cluster
            .balancer
            .wait_for_server_state(MAIN_BACKEND, &node.name, "UP", Duration::from_secs(10))
            .await;
    }
    let device_string = cluster.add_device("clustered").await;
    let (echo_port, _echo) = start_echo_server().await;
    let log_directory = cluster.certificate.directory.path();
    let _device = start_cluster_device_proxy(
        &cluster.certificate,
        log_directory,
        &device_string,
        echo_port,
        &[],
    )
    .await;
    let (_service, local_port) = start_cluster_service_proxy(
        &cluster.certificate,
        log_directory,
        &cluster.service_connection_string(),
        "clustered",
        &["--connect-timeout", "5"],
    )
    .await;
    let message = b"across the cluster";
    let mut received = Vec::new();
    for _attempt in 0..20 {
        let mut local = tokio::net::TcpStream::connect(("127.0.0.1", local_port))
            .await
            .expect("service-proxy accepts");
        local.write_all(message).await.expect("written");
        let mut buffer = vec![0u8; message.len()];
        let read =
            tokio::time::timeout(Duration::from_secs(15), local.read_exact(&mut buffer)).await;
        if let Ok(Ok(_)) = read {
            received = buffer;
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(received, message, "echoed through the cluster");
}
