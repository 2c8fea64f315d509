//! A resumable session through a three-node cluster outlives the node it
//! runs on: SIGTERM on the holding node tells the stream to move (4012),
//! the device re-dials through the balancer to another node, the
//! service-proxy resumes the session there, and the operator's TCP
//! connection never notices beyond a pause. The node exits long before its
//! drain deadline.

use std::time::{Duration, Instant};

use devstreams_tests::cluster::{
    require_haproxy, require_nats_server, start_cluster_device_proxy, start_cluster_service_proxy,
    TestCluster,
};
use devstreams_tests::start_echo_server;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The drain deadline of every node: a session that waited it out instead
/// of moving would show as a node exiting after it.
const DRAIN_DEADLINE_SECONDS: u64 = 60;

async fn echo_once(client: &mut TcpStream, line: &[u8]) {
    client.write_all(line).await.expect("write on the session");
    let mut echoed = vec![0u8; line.len()];
    tokio::time::timeout(Duration::from_secs(30), client.read_exact(&mut echoed))
        .await
        .expect("the echo comes back within 30 s")
        .expect("the operator's connection is still open");
    assert_eq!(echoed, line);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_moves_to_another_node_when_its_node_drains() {
    if !(require_nats_server() & require_haproxy()) {
        return;
    }
    let drain = DRAIN_DEADLINE_SECONDS.to_string();
    let mut cluster = TestCluster::start(3, &["--drain-timeout", &drain]).await;
    let device_string = cluster.add_device("moving-session").await;
    let log_directory = cluster.nodes[0].relay.directory.path().to_path_buf();
    let (echo_port, _echo) = start_echo_server().await;
    // Both proxies reach the cluster through the balancer only.
    let _device_proxy = start_cluster_device_proxy(
        &cluster.certificate,
        &log_directory,
        &device_string,
        echo_port,
        &["--max-backoff", "2"],
    )
    .await;
    let (service_proxy, local_port) = start_cluster_service_proxy(
        &cluster.certificate,
        &log_directory,
        &cluster.service_connection_string(),
        "moving-session",
        &[],
    )
    .await;
    // The device may still be connecting: retry the first connection.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut client = loop {
        let mut client = TcpStream::connect(("127.0.0.1", local_port))
            .await
            .expect("service-proxy listens");
        let mut echoed = [0u8; 6];
        let attempt = async {
            client.write_all(b"hello\n").await?;
            client.read_exact(&mut echoed).await
        };
        match tokio::time::timeout(Duration::from_secs(5), attempt).await {
            Ok(Ok(_)) if &echoed == b"hello\n" => break client,
            _ if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(200)).await,
            other => panic!("no session through the cluster: {other:?}"),
        }
    };

    // The node where the session's stream runs is the one whose log has it.
    let holder = cluster
        .nodes
        .iter()
        .position(|node| node.relay.process.log().contains("stream established"))
        .expect("one node carries the stream");
    let stopping = Instant::now();
    cluster.nodes[holder].relay.process.signal("TERM");
    let exit = cluster.nodes[holder]
        .relay
        .process
        .wait_exit(Duration::from_secs(DRAIN_DEADLINE_SECONDS + 30))
        .await;
    assert_eq!(exit, Some(0), "a drained node exits 0");
    assert!(
        stopping.elapsed() < Duration::from_secs(15),
        "the node waited {:?} for a session that should have moved",
        stopping.elapsed()
    );

    // Same TCP connection, same session, now on another node.
    echo_once(&mut client, b"after the node drained\n").await;
    service_proxy
        .wait_for_log("session resumed", Duration::from_secs(10))
        .await;
    let moved_to = cluster
        .nodes
        .iter()
        .enumerate()
        .filter(|(index, _)| *index != holder)
        .any(|(_, node)| node.relay.process.log().contains("stream established"));
    assert!(moved_to, "another node carries the resumed stream");
}
