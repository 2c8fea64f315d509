//! Interop, service side: IoT Hub's own published Node client code
//! (`azure-iothub@1.16.6`'s RestApiClient and `websocket-stream@5.5.2`, see
//! `tests/interop/node/service_echo.js`) creates a stream and echoes through
//! `echo-sample device` on a real relay; and it raises IoT Hub's typed
//! errors (`DeviceNotFoundError`, `UnauthorizedError`, `ThrottlingError`)
//! for the relay's error answers (`tests/interop/node/service_errors.js`).
//!
//! That client cannot take a port in `HostName`: it always dials 443. So the
//! relay listens on 127.0.0.1:443 and the script gets `HostName=localhost`
//! and the relay's certificate in `NODE_EXTRA_CA_CERTS`. Binding 443 needs
//! privileges; without them (or without node and the npm packages) the test
//! is skipped with the reason printed, except in CI (`CI=true`), where
//! `.ci/run` installs the packages and a skip would hide a broken setup.
//! The tests here take turns on that one port.

use std::path::{Path, PathBuf};
use std::time::Duration;

use devstreams_tests::{wait_until_device_connected, Process, Relay};
use framing::{ConnectionString, DeviceClient, DeviceOptions, ServiceClient, StreamOptions};

const PRIVILEGED_PORT: u16 = 443;

/// Held by each test for as long as its relay listens on the privileged port.
static PRIVILEGED_PORT_IN_USE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

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
        // The other test's relay was killed when it ended and may still be
        // exiting: wait for the port (bounded) before calling it taken.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            match std::net::TcpListener::bind(("127.0.0.1", PRIVILEGED_PORT)) {
                Ok(_) => break None,
                Err(error) if error.kind() == std::io::ErrorKind::PermissionDenied => {
                    break Some(format!(
                        "binding 127.0.0.1:{PRIVILEGED_PORT} needs root (or CAP_NET_BIND_SERVICE)"
                    ))
                }
                Err(_) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Err(error) => panic!(
                    "127.0.0.1:{PRIVILEGED_PORT} is not free ({error}): stop the program that uses it"
                ),
            }
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
    let _port = PRIVILEGED_PORT_IN_USE.lock().await;
    if let Some(reason) = reason_to_skip() {
        eprintln!("SKIPPED: {reason}");
        return;
    }
    let relay = Relay::start(&["--listen", &format!("127.0.0.1:{PRIVILEGED_PORT}")]).await;
    // The second id takes IoT Hub's URL characters through the Node client's
    // encodeURIComponent, the relay's path decoding and the streaming URL.
    for device_id in ["MyDevice", "a#b?c=d@e"] {
        node_echo(&relay, device_id).await;
    }
}

/// `echo-sample device` as `device_id`, and `service_echo.js` through it.
async fn node_echo(relay: &Relay, device_id: &str) {
    let device_connection_string = relay.add_device(device_id).await;
    let ca = relay.ca_text();
    let device = Process::spawn(
        "echo-sample",
        &["device", &device_connection_string, "--ca-cert", &ca],
        relay.directory.path(),
        &[],
    )
    .await;
    wait_until_device_connected(relay, device_id).await;

    let service_connection_string = node_connection_string(relay);
    let output = tokio::process::Command::new("node")
        .arg("service_echo.js")
        .current_dir(script_directory())
        .env("IOTHUB_CONNECTION_STRING", &service_connection_string)
        .env("STREAMING_TARGET_DEVICE", device_id)
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
        "{device_id}: stdout: {stdout}\nstderr: {stderr}\nrelay log:\n{}",
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

/// `HostName=localhost:443` → `HostName=localhost`, the only form the Node client takes.
fn node_connection_string(relay: &Relay) -> String {
    let service_connection_string = relay.service_connection_string.replace(
        &format!("HostName=localhost:{PRIVILEGED_PORT};"),
        "HostName=localhost;",
    );
    assert!(
        service_connection_string.starts_with("HostName=localhost;"),
        "{service_connection_string}"
    );
    service_connection_string
}

/// What `service_errors.js` reports about the error the Node client raised
/// when asked for a stream to `device_id`.
async fn node_error(
    relay: &Relay,
    service_connection_string: &str,
    device_id: &str,
) -> serde_json::Value {
    let output = tokio::process::Command::new("node")
        .arg("service_errors.js")
        .current_dir(script_directory())
        .env("IOTHUB_CONNECTION_STRING", service_connection_string)
        .env("STREAMING_TARGET_DEVICE", device_id)
        .env("NODE_EXTRA_CA_CERTS", relay.ca_text())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(60), output)
        .await
        .expect("the Node script finishes")
        .expect("node runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "stdout: {stdout}\nstderr: {}\nrelay log:\n{}",
        String::from_utf8_lossy(&output.stderr),
        relay.process.log()
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|error| panic!("{error}: {stdout}"))
}

/// The Node client has no type for DeviceNotOnline: like IoT Hub's 404103,
/// it becomes its plain `Error: Not found`, and the body tells why.
async fn assert_offline(relay: &Relay, service_connection_string: &str, device_id: &str) {
    let offline = node_error(relay, service_connection_string, device_id).await;
    assert_eq!(offline["status"], 404, "{offline}");
    let body: serde_json::Value = serde_json::from_str(offline["body"].as_str().unwrap_or(""))
        .unwrap_or_else(|error| panic!("{error}: {offline}"));
    assert!(
        body["Message"]
            .as_str()
            .is_some_and(|message| message.starts_with("ErrorCode:DeviceNotOnline;")),
        "{body}"
    );
    assert_eq!(body["errorCode"], 404_103, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn iothub_node_service_client_raises_iothub_error_types() {
    let _port = PRIVILEGED_PORT_IN_USE.lock().await;
    if let Some(reason) = reason_to_skip() {
        eprintln!("SKIPPED: {reason}");
        return;
    }
    let relay = Relay::start(&[
        "--listen",
        &format!("127.0.0.1:{PRIVILEGED_PORT}"),
        "--max-streams-per-device",
        "1",
    ])
    .await;
    relay.add_device("Sleepy").await;
    relay.add_device("a#b?c=d@e").await;
    let service_connection_string = node_connection_string(&relay);

    let unknown = node_error(&relay, &service_connection_string, "Ghost").await;
    assert_eq!(unknown["name"], "DeviceNotFoundError", "{unknown}");
    assert_eq!(unknown["isDeviceNotFound"], true, "{unknown}");
    assert!(
        unknown["message"].as_str().is_some_and(
            |message| message.contains("Ghost") && message.contains("relay device add")
        ),
        "the relay's own words reach the SDK user: {unknown}"
    );
    let unknown_odd_id = node_error(&relay, &service_connection_string, "x#y?z").await;
    assert_eq!(
        unknown_odd_id["name"], "DeviceNotFoundError",
        "{unknown_odd_id}"
    );

    let wrong_key =
        ConnectionString::parse_service(&service_connection_string).expect("service string");
    let wrong_key = ConnectionString::for_policy(
        &wrong_key.host_name,
        "service",
        "d3JvbmctLWtleS0td3JvbmctLWtleS0td3Jvbmc=",
    )
    .expect("string")
    .to_secret_string();
    let unauthorized = node_error(&relay, &wrong_key, "Sleepy").await;
    assert_eq!(unauthorized["name"], "UnauthorizedError", "{unauthorized}");
    assert_eq!(unauthorized["isUnauthorized"], true, "{unauthorized}");

    assert_offline(&relay, &service_connection_string, "Sleepy").await;
    assert_offline(&relay, &service_connection_string, "a#b?c=d@e").await;

    // A device at its stream limit: one creation waits for its answer, the
    // next is throttled.
    let busy = ConnectionString::parse_device(&relay.add_device("Busy").await).expect("device");
    let mut device = DeviceClient::connect(&busy, &relay.tls(), &DeviceOptions::default())
        .await
        .expect("Busy connects");
    let service = ServiceClient::new(
        ConnectionString::parse_service(&relay.service_connection_string).expect("service"),
        relay.tls(),
    );
    let holding = tokio::spawn(async move {
        let options = StreamOptions {
            response_timeout: Duration::from_secs(30),
            ..StreamOptions::default()
        };
        service.create_stream("Busy", "Holding", &options).await
    });
    let request = tokio::time::timeout(Duration::from_secs(10), device.next_request())
        .await
        .expect("the holding request reaches the device")
        .expect("a stream request");
    let throttled = node_error(&relay, &service_connection_string, "Busy").await;
    assert_eq!(throttled["name"], "ThrottlingError", "{throttled}");
    assert_eq!(throttled["isThrottling"], true, "{throttled}");
    device.responder().reject(&request).await.expect("reject");
    let _ = holding.await;
}
