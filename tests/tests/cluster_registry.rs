//! Cluster mode's shared registry, end to end: a real `nats-server -js` on a
//! random loopback port with its own store, real `relay serve --cluster`
//! nodes and the real `relay` CLI. A device added, disabled, re-keyed or
//! removed through one entry point is in force on every node within a
//! second; a single relay's registry moves into a cluster and back; every
//! bad cluster configuration stops `relay serve` at start with one line; a
//! `.creds` file logs nodes and the CLI in to NATS in operator mode.
//!
//! Skipped (with a note) where `nats-server` is not installed; under
//! `CI=true`, where `.ci/run` installs it, a missing one fails the tests.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use devstreams_tests::cluster::{require_nats_server, tool_path, NATS_SERVER};
use devstreams_tests::nats_accounts::NatsOperator;
use devstreams_tests::{binary, refusing_port, Relay};
use framing::mqtt::ConnectReturnCode;
use framing::{ConnectionString, DeviceClient, DeviceError, DeviceOptions};
use tokio::process::Command;

/// What "within a second" allows for: a change must be in force on the
/// other node by then (NATS delivers it in milliseconds).
const PROPAGATION: Duration = Duration::from_secs(1);

/// A `nats-server` of this test, stopped by PID on drop.
struct Nats {
    child: tokio::process::Child,
    port: u16,
    _store: tempfile::TempDir,
}

impl Nats {
    /// `nats-server -js` (unless `jetstream` is false) with `extra` flags.
    async fn start(jetstream: bool, extra: &[&str]) -> Option<Nats> {
        let store = tempfile::tempdir().expect("temp dir");
        Self::start_on(free_port(), store, jetstream, extra).await
    }

    /// Stops this server (kill -9, by PID) and starts a new one on the same
    /// port and store, as an operator restarting NATS would.
    async fn restart(mut self) -> Nats {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
        let port = self.port;
        let store = std::mem::replace(&mut self._store, tempfile::tempdir().expect("temp dir"));
        drop(self);
        Self::start_on(port, store, true, &[])
            .await
            .expect("nats-server starts again")
    }

    async fn start_on(
        port: u16,
        store: tempfile::TempDir,
        jetstream: bool,
        extra: &[&str],
    ) -> Option<Nats> {
        // Skipped on a developer's machine without it; a panic in CI.
        if !require_nats_server() {
            return None;
        }
        // In the store's directory, which a restart keeps.
        let log_path = store.path().join("nats-server.log");
        let port_text = port.to_string();
        let store_text = store.path().to_string_lossy().to_string();
        let mut arguments = vec!["-a", "127.0.0.1", "-p", &port_text, "-sd", &store_text];
        if jetstream {
            arguments.push("-js");
        }
        arguments.extend_from_slice(extra);
        let child = Command::new(tool_path(NATS_SERVER).unwrap_or_else(|| NATS_SERVER.into()))
            .args(&arguments)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::File::create(&log_path).expect("nats-server log file"),
            ))
            .kill_on_drop(true)
            .spawn()
            .expect("nats-server starts");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "nats-server never listened on {port}; its log:\n{}",
                std::fs::read_to_string(&log_path).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Some(Nats {
            child,
            port,
            _store: store,
        })
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        // By PID: this test's server only.
        let _ = self.child.start_kill();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .expect("a free loopback port")
}

/// A cluster node on its own port, whose `--node-url` names that port.
async fn start_node(nats: &Nats, name: &str) -> Relay {
    start_node_with(nats, name, &[]).await
}

async fn start_node_with(nats: &Nats, name: &str, extra: &[&str]) -> Relay {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let node_url = format!("wss://localhost:{port}");
    let url = nats.url();
    let mut arguments = vec![
        "--listen",
        &listen,
        "--no-mqtt",
        "--cluster",
        &url,
        "--node-url",
        &node_url,
        "--node-name",
        name,
    ];
    arguments.extend_from_slice(extra);
    Relay::start(&arguments).await
}

/// `relay ARGUMENTS` (no data dir); its output.
async fn relay_command(arguments: &[&str]) -> std::process::Output {
    tokio::time::timeout(
        Duration::from_secs(30),
        Command::new(binary("relay"))
            .args(arguments)
            .env_remove("RELAY_CLUSTER")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the relay command ends")
    .expect("the relay command runs")
}

/// The first stdout line of a cluster CLI command that must succeed.
async fn cluster_cli(nats: &Nats, arguments: &[&str]) -> String {
    let url = nats.url();
    let mut all = arguments.to_vec();
    all.extend(["--cluster", &url]);
    let output = relay_command(&all).await;
    assert!(
        output.status.success(),
        "relay {all:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

/// The device string of `relay device add|show|rotate-key … --cluster`,
/// with the HostName of `node`.
async fn device_string_for(nats: &Nats, node: &Relay, arguments: &[&str]) -> ConnectionString {
    let host = format!("localhost:{}", node.port());
    let mut all = arguments.to_vec();
    all.extend(["--host-name", &host]);
    let line = cluster_cli(nats, &all).await;
    ConnectionString::parse_device(&line).expect("a device connection string")
}

/// The same device credentials, naming `node` as HostName.
fn for_node(connection: &ConnectionString, device_id: &str, node: &Relay) -> ConnectionString {
    use base64::Engine;
    ConnectionString::for_device(
        &format!("localhost:{}", node.port()),
        device_id,
        &base64::engine::general_purpose::STANDARD.encode(connection.key()),
    )
    .expect("device string")
}

/// Connects, retrying refusals until `deadline` passes.
async fn connect_within(
    connection: &ConnectionString,
    node: &Relay,
    deadline: Duration,
) -> Result<DeviceClient, DeviceError> {
    let until = tokio::time::Instant::now() + deadline;
    loop {
        match DeviceClient::connect(connection, &node.tls(), &DeviceOptions::default()).await {
            Ok(device) => return Ok(device),
            Err(error) if tokio::time::Instant::now() >= until => return Err(error),
            Err(_) => tokio::time::sleep(Duration::from_millis(25)).await,
        }
    }
}

/// Asserts the device's control channel is closed within [`PROPAGATION`].
async fn assert_cut(device: &mut DeviceClient, what: &str) {
    let ended = tokio::time::timeout(PROPAGATION, device.next_request()).await;
    assert!(
        matches!(ended, Ok(Err(_))),
        "{what}: the device's channel on the holding node is closed within {PROPAGATION:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_added_on_the_cli_connects_to_another_node_within_a_second() {
    let Some(nats) = Nats::start(true, &[]).await else {
        return;
    };
    let first = start_node(&nats, "node-1").await;
    let second = start_node(&nats, "node-2").await;
    // An id with characters NATS gives meaning to (`.`, `*`, `>` is not
    // allowed by IoT Hub) and ones keys refuse.
    let device_id = "Dev.1*x#b?c=d@e";
    let connection = device_string_for(&nats, &second, &["device", "add", device_id]).await;
    connect_within(&connection, &second, PROPAGATION)
        .await
        .expect("the new device connects to the other node within a second");
    connect_within(
        &for_node(&connection, device_id, &first),
        &first,
        PROPAGATION,
    )
    .await
    .expect("and to the node it was not added on either");

    let listed = cluster_cli(&nats, &["device", "list"]).await;
    assert_eq!(listed, device_id);
    let shown = device_string_for(&nats, &second, &["device", "show", device_id]).await;
    assert_eq!(shown.key(), connection.key());
    // One policy for the whole cluster: both nodes print the same string.
    assert_eq!(
        first.service_connection_string,
        second.service_connection_string
    );
    let policy = cluster_cli(&nats, &["policy", "show"]).await;
    assert_eq!(policy, first.service_connection_string);

    // A node's data dir holds no registry: a command without --cluster on
    // it says where the registry is instead of writing one nobody reads.
    let output = second.cli(&["device", "add", "Lost"]).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("--cluster nats://127.0.0.1:"),
        "names the cluster to use: {stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_nats_is_used_with_cluster_ca_and_refused_without_it() {
    // The relay's own self-signed certificate (SANs localhost, 127.0.0.1)
    // serves as the NATS server's.
    let single = Relay::start(&["--no-mqtt"]).await;
    let certificate = single.ca_text();
    let key = single
        .data_dir()
        .join("tls")
        .join("key.pem")
        .to_string_lossy()
        .to_string();
    let Some(nats) = Nats::start(
        true,
        &["--tls", "--tlscert", &certificate, "--tlskey", &key],
    )
    .await
    else {
        return;
    };
    let url = format!("tls://localhost:{}", nats.port);
    assert_refused_at_start(
        &["--cluster", &url, "--node-url", "wss://localhost:1"],
        "TLS to NATS",
    )
    .await;
    let output = relay_command(&[
        "device",
        "add",
        "Secure",
        "--cluster",
        &url,
        "--cluster-ca",
        &certificate,
    ])
    .await;
    assert!(
        output.status.success(),
        "with --cluster-ca the CLI reaches NATS over TLS: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_creds_file_logs_nodes_and_the_cli_in_to_nats_in_operator_mode() {
    let store = tempfile::tempdir().expect("temp dir");
    let operator = NatsOperator::generate();
    let configuration = operator
        .server_configuration()
        .to_string_lossy()
        .to_string();
    // JetStream comes from the configuration, for the operator's account.
    let Some(nats) = Nats::start_on(free_port(), store, false, &["-c", &configuration]).await
    else {
        return;
    };
    let url = nats.url();
    let creds = operator.creds().to_string_lossy().to_string();

    // Without a creds file, or with one another deployment signed, NATS
    // refuses the login and the relay says which flag to check, without
    // printing the file's secret seed.
    let output = relay_command(&["device", "list", "--cluster", &url]).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("refused the credentials"), "{stderr}");
    let foreign_directory = tempfile::tempdir().expect("temp dir");
    let foreign = foreign_directory.path().join("foreign.creds");
    let foreign_text = NatsOperator::foreign_creds();
    std::fs::write(&foreign, &foreign_text).expect("creds written");
    let foreign = foreign.to_string_lossy().to_string();
    assert_refused_at_start(
        &[
            "--cluster",
            &url,
            "--cluster-creds",
            &foreign,
            "--node-url",
            "wss://localhost:1",
        ],
        "refused the credentials",
    )
    .await;
    let output = relay_command(&[
        "device",
        "list",
        "--cluster",
        &url,
        "--cluster-creds",
        &foreign,
    ])
    .await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    let seed = foreign_text
        .lines()
        .find(|line| line.starts_with("SU"))
        .expect("the creds hold a user seed");
    assert!(!stderr.contains(seed), "the seed leaked: {stderr}");
    let missing = foreign_directory.path().join("missing.creds");
    let missing = missing.to_string_lossy().to_string();
    assert_refused_at_start(
        &[
            "--cluster",
            &url,
            "--cluster-creds",
            &missing,
            "--node-url",
            "wss://localhost:1",
        ],
        "cannot read the NATS credentials file",
    )
    .await;

    // With the operator's user: the CLI writes the registry and a node
    // serves from it.
    let output = relay_command(&[
        "device",
        "add",
        "Operated",
        "--cluster",
        &url,
        "--cluster-creds",
        &creds,
        "--host-name",
        "localhost:1",
    ])
    .await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "the CLI logs in with --cluster-creds: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let added = ConnectionString::parse_device(stdout.trim()).expect("a device connection string");
    let node = start_node_with(&nats, "operated", &["--cluster-creds", &creds]).await;
    connect_within(&for_node(&added, "Operated", &node), &node, PROPAGATION)
        .await
        .expect("a device added through NATS in operator mode connects to the node");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disable_rotate_and_remove_on_the_cli_cut_the_session_on_the_holding_node() {
    let Some(nats) = Nats::start(true, &[]).await else {
        return;
    };
    let _first = start_node(&nats, "node-1").await;
    let holder = start_node(&nats, "node-2").await;
    let connection = device_string_for(&nats, &holder, &["device", "add", "Held"]).await;
    let mut device = connect_within(&connection, &holder, PROPAGATION)
        .await
        .expect("connects");

    cluster_cli(&nats, &["device", "disable", "Held"]).await;
    assert_cut(&mut device, "disable").await;
    let refused =
        DeviceClient::connect(&connection, &holder.tls(), &DeviceOptions::default()).await;
    assert!(
        matches!(
            refused,
            Err(DeviceError::Refused(ConnectReturnCode::NotAuthorized))
        ),
        "a disabled device is refused: {:?}",
        refused.err()
    );
    cluster_cli(&nats, &["device", "enable", "Held"]).await;
    let mut device = connect_within(&connection, &holder, PROPAGATION)
        .await
        .expect("connects again once enabled");

    let rotated = device_string_for(&nats, &holder, &["device", "rotate-key", "Held"]).await;
    assert_ne!(rotated.key(), connection.key());
    assert_cut(&mut device, "rotate-key").await;
    let old_key =
        DeviceClient::connect(&connection, &holder.tls(), &DeviceOptions::default()).await;
    assert!(
        matches!(old_key, Err(DeviceError::Refused(_))),
        "the rotated-out key is refused"
    );
    let mut device = connect_within(&rotated, &holder, PROPAGATION)
        .await
        .expect("the new key works");

    cluster_cli(&nats, &["device", "remove", "Held"]).await;
    assert_cut(&mut device, "remove").await;
    let removed = DeviceClient::connect(&rotated, &holder.tls(), &DeviceOptions::default()).await;
    assert!(matches!(removed, Err(DeviceError::Refused(_))));
    let listed = cluster_cli(&nats, &["device", "list"]).await;
    assert!(listed.is_empty(), "{listed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_serve_their_copy_while_nats_is_down_and_follow_again_after_a_restart() {
    let Some(nats) = Nats::start(true, &[]).await else {
        return;
    };
    let node = start_node(&nats, "node-1").await;
    let before = device_string_for(&nats, &node, &["device", "add", "Before"]).await;
    connect_within(&before, &node, PROPAGATION)
        .await
        .expect("connects");

    let nats = nats.restart().await;
    // Meanwhile the node kept its copy: a known device still connects.
    connect_within(&before, &node, PROPAGATION)
        .await
        .expect("a known device connects while NATS restarts");
    // Once the node is back on NATS (the client reconnects by itself, with
    // its own backoff), changes reach it again without restarting it.
    let after = device_string_for(&nats, &node, &["device", "add", "After"]).await;
    connect_within(&after, &node, Duration::from_secs(10))
        .await
        .expect("a device added after the NATS restart connects to the node");
    let mut device = connect_within(&before, &node, PROPAGATION)
        .await
        .expect("connects");
    cluster_cli(&nats, &["device", "disable", "Before"]).await;
    assert_cut(&mut device, "disable after a NATS restart").await;
}

fn data_dir_of(directory: &Path) -> PathBuf {
    directory.join("relay-data")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_relay_registry_moves_into_a_cluster_and_back() {
    let Some(nats) = Nats::start(true, &[]).await else {
        return;
    };
    // A single relay with a device, stopped.
    let single = Relay::start(&["--no-mqtt"]).await;
    let old_string = single.add_device("Moved#1").await;
    let old = ConnectionString::parse_device(&old_string).expect("device string");
    let single_directory = single.directory.path().to_path_buf();
    let single_service = single.service_connection_string.clone();
    let export_file = tempfile::tempdir().expect("temp dir");
    let exported = export_file.path().join("registry.json");
    let exported_text = exported.to_string_lossy().to_string();
    let single_data = data_dir_of(&single_directory).to_string_lossy().to_string();
    let output = relay_command(&[
        "registry",
        "export",
        &exported_text,
        "--data-dir",
        &single_data,
    ])
    .await;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&exported).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "the export holds keys: owner-only");
    }
    drop(single);

    cluster_cli(&nats, &["registry", "import", &exported_text]).await;
    let node = start_node(&nats, "node-1").await;
    let moved = for_node(&old, "Moved#1", &node);
    assert_eq!(moved.key(), old.key());
    connect_within(&moved, &node, PROPAGATION)
        .await
        .expect("the device connects to a cluster node with its old key");
    // The service policy came along too (same key, this node's HostName).
    let service_key = |text: &str| text.split("SharedAccessKey=").nth(1).map(str::to_string);
    assert_eq!(
        service_key(&node.service_connection_string),
        service_key(&single_service)
    );

    // And back: the cluster's registry into a new single relay's data dir.
    let back_file = export_file.path().join("back.json");
    let back_text = back_file.to_string_lossy().to_string();
    cluster_cli(&nats, &["registry", "export", &back_text]).await;
    let back_directory = tempfile::tempdir().expect("temp dir");
    let back_data = data_dir_of(back_directory.path())
        .to_string_lossy()
        .to_string();
    let output = relay_command(&["registry", "import", &back_text, "--data-dir", &back_data]).await;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let single_again = Relay::start_in(back_directory, &["--no-mqtt"]).await;
    let moved_back = for_node(&old, "Moved#1", &single_again);
    connect_within(&moved_back, &single_again, PROPAGATION)
        .await
        .expect("the device connects to the single relay made from the cluster's registry");
}

/// Runs `relay serve` with `arguments`; asserts it exits 1 within the
/// connect bound with exactly one line on stderr containing `expected`.
async fn assert_refused_at_start(arguments: &[&str], expected: &str) {
    let directory = tempfile::tempdir().expect("temp dir");
    let data_dir = data_dir_of(directory.path()).to_string_lossy().to_string();
    let mut all = vec![
        "serve",
        "--data-dir",
        &data_dir,
        "--listen",
        "127.0.0.1:0",
        "--no-mqtt",
        "--cluster-connect-timeout",
        "3",
    ];
    all.extend_from_slice(arguments);
    let output = relay_command(&all).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|line| !line.is_empty()).collect();
    assert_eq!(
        output.status.code(),
        Some(1),
        "{arguments:?} must exit 1: {stderr}"
    );
    assert_eq!(
        lines.len(),
        1,
        "{arguments:?}: one line on stderr, got:\n{stderr}"
    );
    assert!(
        lines[0].contains(expected),
        "{arguments:?}: {:?} does not say {expected:?}",
        lines[0]
    );
    assert!(
        !String::from_utf8_lossy(&output.stdout).contains("Listening on"),
        "{arguments:?}: nothing was served"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_bad_cluster_configuration_stops_serve_with_one_line() {
    let Some(nats) = Nats::start(true, &[]).await else {
        return;
    };
    let url = nats.url();
    let (unused_port, _reserved) = refusing_port();
    let unused = format!("nats://127.0.0.1:{unused_port}");
    assert_refused_at_start(
        &["--cluster", &unused, "--node-url", "wss://localhost:1"],
        "cannot reach NATS",
    )
    .await;

    let without_jetstream = Nats::start(false, &[]).await.expect("nats-server");
    assert_refused_at_start(
        &[
            "--cluster",
            &without_jetstream.url(),
            "--node-url",
            "wss://localhost:1",
        ],
        "no JetStream",
    )
    .await;

    let guarded = Nats::start(true, &["--user", "relay", "--pass", "right"])
        .await
        .expect("nats-server");
    let wrong = format!("nats://relay:wrong@127.0.0.1:{}", guarded.port);
    assert_refused_at_start(
        &["--cluster", &wrong, "--node-url", "wss://localhost:1"],
        "refused the credentials",
    )
    .await;
    // The password never reaches the output.
    let output = relay_command(&["device", "list", "--cluster", &wrong]).await;
    assert!(!String::from_utf8_lossy(&output.stderr).contains("wrong"));
    let right = format!("nats://relay:right@127.0.0.1:{}", guarded.port);
    let output = relay_command(&["device", "list", "--cluster", &right]).await;
    assert!(
        output.status.success(),
        "the right credentials work: {}",
        String::from_utf8_lossy(&output.stderr)
    );

    assert_refused_at_start(&["--cluster", &url], "--cluster needs --node-url").await;

    let live = start_node(&nats, "taken").await;
    assert_refused_at_start(
        &[
            "--cluster",
            &url,
            "--node-url",
            "wss://localhost:2",
            "--node-name",
            "taken",
        ],
        "already used by a live node",
    )
    .await;
    let live_url = format!("wss://localhost:{}", live.port());
    assert_refused_at_start(
        &[
            "--cluster",
            &url,
            "--node-url",
            &live_url,
            "--node-name",
            "another",
        ],
        "already used by live node",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_stopped_cleanly_frees_its_name_at_once() {
    let Some(nats) = Nats::start(true, &[]).await else {
        return;
    };
    let mut node = start_node(&nats, "restarted").await;
    node.process.signal("TERM");
    assert_eq!(
        node.process.wait_exit(Duration::from_secs(20)).await,
        Some(0)
    );
    // Well within the 15 s a crashed node's name stays taken.
    let again = start_node(&nats, "restarted").await;
    assert!(again.port() > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_strings_name_the_host_the_nodes_recorded() {
    let Some(nats) = Nats::start(true, &[]).await else {
        return;
    };
    let first = start_node(&nats, "node-1").await;
    let added = cluster_cli(&nats, &["device", "add", "Named"]).await;
    assert!(
        added.starts_with(&format!("HostName=localhost:{};", first.port())),
        "the first node's address by default: {added}"
    );
    let told = start_node_with(&nats, "node-2", &["--host-name", "lb.example.com:443"]).await;
    assert!(
        told.service_connection_string
            .starts_with("HostName=lb.example.com:443;"),
        "{}",
        told.service_connection_string
    );
    let shown = cluster_cli(&nats, &["device", "show", "Named"]).await;
    assert!(
        shown.starts_with("HostName=lb.example.com:443;DeviceId=Named;"),
        "a node told the balancer's address records it for everyone: {shown}"
    );
}
