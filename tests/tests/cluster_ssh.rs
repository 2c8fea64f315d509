//! An operator's real `ssh` through a three-node cluster: the device dials
//! the balancer (HAProxy), the service-proxy asks a node that does not hold
//! the device, and the session meets on the holder. Then the holding node
//! is killed: the device re-dials through the balancer to a live node and a
//! new `ssh` works, with no proxy restarted.

use std::time::{Duration, Instant};

use devstreams_tests::cluster::{
    require_haproxy, require_nats_server, start_cluster_device_proxy, start_cluster_service_proxy,
    with_host_name, ClusterNode, TestCluster,
};
use devstreams_tests::{require_sshd, Sshd};
use framing::{CreateStreamError, ServiceClient, StreamOptions};

/// How long a device may take to (re)connect somewhere in the cluster:
/// device-proxy's backoff after its node dies, plus the balancer noticing.
const DEVICE_CONNECT_WITHIN: Duration = Duration::from_secs(40);

fn service_at(cluster: &TestCluster, node: &ClusterNode) -> ServiceClient {
    let connection = with_host_name(
        &cluster.service_connection_string(),
        &format!("localhost:{}", node.relay.port()),
    );
    ServiceClient::new(
        framing::ConnectionString::parse_service(&connection).expect("service string"),
        cluster.certificate.client_tls(),
    )
}

/// The node (index) a new stream to `device_id` meets on, once the device
/// is connected somewhere; asked through `service`.
async fn holder_index(cluster: &TestCluster, service: &ServiceClient, device_id: &str) -> usize {
    let options = StreamOptions {
        connect_timeout: Duration::from_secs(1),
        response_timeout: Duration::from_secs(10),
        target: None,
        half_close: false,
    };
    let deadline = Instant::now() + DEVICE_CONNECT_WITHIN;
    let url = loop {
        match service.create_stream(device_id, "Probe", &options).await {
            Ok(invitation) if invitation.is_accepted => break invitation.url,
            Ok(invitation) => panic!("the device rejected the probe: {invitation:?}"),
            Err(
                CreateStreamError::DeviceOffline(_)
                | CreateStreamError::Unexpected { status: 503, .. }
                | CreateStreamError::Connect(_),
            ) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(200)).await,
            // A creation caught in a failover (the device's channel being
            // replaced as the request reached it) may end in a 504; a
            // service asks again.
            Err(CreateStreamError::DeviceTimeout(_)) if Instant::now() < deadline => {}
            Err(error) => {
                panic!("no stream to {device_id} within {DEVICE_CONNECT_WITHIN:?}: {error}")
            }
        }
    };
    cluster
        .nodes
        .iter()
        .position(|node| url.starts_with(&format!("{}/", node.node_url)))
        .unwrap_or_else(|| panic!("the streaming URL {url} names none of the nodes"))
}

async fn ssh_echo(sshd: &Sshd, port: u16, word: &str) {
    let output = tokio::time::timeout(
        Duration::from_secs(60),
        sshd.ssh(port, &format!("echo {word}")).output(),
    )
    .await
    .expect("ssh finishes")
    .expect("ssh runs");
    assert!(
        output.status.success(),
        "ssh failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), word);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_reaches_a_device_held_by_another_node_and_again_after_that_node_dies() {
    let tools = require_nats_server() & require_haproxy() & require_sshd();
    if !tools {
        return;
    }
    let sshd = Sshd::start().await;
    let cluster = TestCluster::start(3, &[]).await;
    let device_string = cluster.add_device("ssh-device").await;
    let log_directory = cluster.nodes[0].relay.directory.path();
    // The device dials the balancer, as a fleet's device would.
    let _device_proxy = start_cluster_device_proxy(
        &cluster.certificate,
        log_directory,
        &device_string,
        sshd.port,
        &[],
    )
    .await;
    let first_holder = holder_index(&cluster, &cluster.service_client(), "ssh-device").await;

    // The operator's service-proxy asks a node that does not hold the device.
    let entry = (first_holder + 1) % cluster.nodes.len();
    let entry_connection = with_host_name(
        &cluster.service_connection_string(),
        &format!("localhost:{}", cluster.nodes[entry].relay.port()),
    );
    let (_service_proxy, local_port) = start_cluster_service_proxy(
        &cluster.certificate,
        log_directory,
        &entry_connection,
        "ssh-device",
        &[],
    )
    .await;
    ssh_echo(&sshd, local_port, "across-nodes").await;

    // kill -9 the holding node: the device moves through the balancer.
    cluster.nodes[first_holder].kill();
    let entry_service = service_at(&cluster, &cluster.nodes[entry]);
    let second_holder = holder_index(&cluster, &entry_service, "ssh-device").await;
    assert_ne!(
        second_holder, first_holder,
        "the device is held by a live node after the kill"
    );
    ssh_echo(&sshd, local_port, "after-the-node-died").await;
}

/// SIGTERM on the node that holds a device: it drains as a single relay
/// does (the device is told to go away, the node exits 0) and the device
/// moves through the balancer to another node, where streams work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_on_the_holding_node_moves_its_device_to_another_node() {
    let tools = require_nats_server() & require_haproxy() & require_sshd();
    if !tools {
        return;
    }
    let sshd = Sshd::start().await;
    let mut cluster = TestCluster::start(3, &["--drain-timeout", "5"]).await;
    let device_string = cluster.add_device("drained-device").await;
    let log_directory = cluster.nodes[0].relay.directory.path().to_path_buf();
    let _device_proxy = start_cluster_device_proxy(
        &cluster.certificate,
        &log_directory,
        &device_string,
        sshd.port,
        &[],
    )
    .await;
    let first_holder = holder_index(&cluster, &cluster.service_client(), "drained-device").await;
    let entry = (first_holder + 1) % cluster.nodes.len();
    let entry_service = service_at(&cluster, &cluster.nodes[entry]);

    let stopping = Instant::now();
    cluster.nodes[first_holder].relay.process.signal("TERM");
    let exit = cluster.nodes[first_holder]
        .relay
        .process
        .wait_exit(Duration::from_secs(30))
        .await;
    assert_eq!(exit, Some(0), "a drained node exits 0");
    assert!(
        stopping.elapsed() < Duration::from_secs(15),
        "the drain took {:?}",
        stopping.elapsed()
    );
    let second_holder = holder_index(&cluster, &entry_service, "drained-device").await;
    assert_ne!(
        second_holder, first_holder,
        "the device moved to a live node"
    );

    let entry_connection = with_host_name(
        &cluster.service_connection_string(),
        &format!("localhost:{}", cluster.nodes[entry].relay.port()),
    );
    let (_service_proxy, local_port) = start_cluster_service_proxy(
        &cluster.certificate,
        &log_directory,
        &entry_connection,
        "drained-device",
        &[],
    )
    .await;
    ssh_echo(&sshd, local_port, "after-the-drain").await;
}
