//! Interop, service side: IoT Hub's own published Node client code
//! (`azure-iothub@1.16.6`'s RestApiClient and `websocket-stream@5.5.2`, see
//! `tests/interop/node/service_echo.js`) creates a stream and echoes through
//! `echo-sample device` on a real relay.
//!
//! That client cannot take a port in `HostName`: it always dials 443. So the
//! relay listens on 127.0.0.1:443 and the script gets `HostName=localhost`
//! and the relay's certificate in `NODE_EXTRA_CA_CERTS`. Binding 443 needs
//! privileges; without them (or without node and the npm packages) the test
//! is skipped with the reason printed, except in CI (`CI=true`), where
//! `.ci/run` installs the packages and a skip would hide a broken setup.

use std::path::{Path, PathBuf};
use std::time::Duration;

use devstreams_tests::{wait_until_device_connected, Process, Relay};

const PRIVILEGED_PORT: u16 = 443;

fn script_directory() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("interop")
        .join("node")
}

/// `Some(reason)` when the test cannot run here; panics in CI instead.
fn reason_to_skip() -> Option<String> {
    let reason = if !std::process::Command::new("node")
        .arg("--version")
        .output()
        .is_ok_and(|output| output.status.success())
    {
        Some("node is not installed (Node 18 or newer)".to_string())
    } else if !script_directory()
        .join("node_modules")
        .join("azure-iothub")
        .exists()
        || !script_directory()
            .join("node_modules")
            .join("websocket-stream")
            .exists()
    {
        Some(format!(
            "the npm packages are not installed: run `npm ci` in {}",
            script_directory().display()
        ))
    } else {
        match std::net::TcpListener::bind(("127.0.0.1", PRIVILEGED_PORT)) {
            Ok(_) => None,
            Err(error) if error.kind() == std::io::ErrorKind::PermissionDenied => Some(format!(
                "binding 127.0.0.1:{PRIVILEGED_PORT} needs root (or CAP_NET_BIND_SERVICE)"
            )),
            Err(error) => panic!(
                "127.0.0.1:{PRIVILEGED_PORT} is not free ({error}): stop the program that uses it"
            ),
        }
    };
    if let Some(reason) = &reason {
        if std::env::var("CI").is_ok_and(|value| value == "true") {
            panic!("the Node interop test must run in CI, but {reason}; .ci/run installs the npm packages and runs as root");
        }
    }
    reason
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn iothub_node_service_client_echoes_through_echo_sample_device() {
    if let Some(reason) = reason_to_skip() {
        eprintln!("SKIPPED: {reason}");
        return;
    }
    let relay = Relay::start(&["--listen", &format!("127.0.0.1:{PRIVILEGED_PORT}")]).await;
    let device_connection_string = relay.add_device("MyDevice").await;
    let ca = relay.ca_text();
    let device = Process::spawn(
        "echo-sample",
        &["device", &device_connection_string, "--ca-cert", &ca],
        relay.directory.path(),
        &[],
    )
    .await;
    wait_until_device_connected(&relay, "MyDevice").await;

    // `HostName=localhost:443` → `HostName=localhost`, the only form the Node client takes.
    let service_connection_string = relay.service_connection_string.replace(
        &format!("HostName=localhost:{PRIVILEGED_PORT};"),
        "HostName=localhost;",
    );
    assert!(
        service_connection_string.starts_with("HostName=localhost;"),
        "{service_connection_string}"
    );
    let output = tokio::process::Command::new("node")
        .arg("service_echo.js")
        .current_dir(script_directory())
        .env("IOTHUB_CONNECTION_STRING", &service_connection_string)
        .env("STREAMING_TARGET_DEVICE", "MyDevice")
        .env("NODE_EXTRA_CA_CERTS", &ca)
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(60), output)
        .await
        .expect("the Node script finishes")
        .expect("node runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "stdout: {stdout}\nstderr: {stderr}\nrelay log:\n{}",
        relay.process.log()
    );
    assert!(
        stdout.contains("Stream response received: Name=TestStream IsAccepted=True"),
        "{stdout}"
    );
    assert!(
        stdout.contains("Received stream data: Streaming data over a stream..."),
        "{stdout}"
    );
    assert!(
        stdout.contains("Received stream data: a second message, echoed on its own"),
        "{stdout}"
    );
    drop(device);
}
