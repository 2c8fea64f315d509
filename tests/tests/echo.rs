//! The echo sample programs against a real relay process, over TLS.

use std::time::Duration;

use devstreams_tests::{binary, echo_sample_service, wait_until_device_connected, Process, Relay};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_sample_device_and_service_round_trip_through_the_relay() {
    let relay = Relay::start(&[]).await;
    let device_connection_string = relay.add_device("MyDevice").await;
    let ca = relay.ca_text();
    let _device = Process::spawn(
        "echo-sample",
        &["device", &device_connection_string, "--ca-cert", &ca],
        relay.directory.path(),
        &[],
    )
    .await;
    wait_until_device_connected(&relay, "MyDevice").await;
    let stdout = echo_sample_service(
        &relay.service_connection_string,
        "MyDevice",
        &ca,
        &[],
        "hello through the relay",
    )
    .await;
    assert!(
        stdout.contains("Stream response received: Name=TestStream IsAccepted=True"),
        "{stdout}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_sample_demo_exits_zero_after_a_verified_echo() {
    let output = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(binary("echo-sample"))
            .arg("demo")
            .output(),
    )
    .await
    .expect("demo finishes within a minute")
    .expect("demo runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(
        output.status.code(),
        Some(0),
        "stdout: {stdout}\nstderr: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("Stream response received: Name=TestStream IsAccepted=True"),
        "{stdout}"
    );
    assert!(stdout.contains("[demo] echo verified"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_service_against_an_offline_device_fails_with_a_clear_message() {
    let relay = Relay::start(&[]).await;
    relay.add_device("Sleepy").await;
    let ca = relay.ca_text();
    let output = tokio::process::Command::new(binary("echo-sample"))
        .args([
            "service",
            &relay.service_connection_string,
            "Sleepy",
            "--ca-cert",
            &ca,
            "--connect-timeout",
            "3",
        ])
        .env("RUST_LOG", "off")
        .output();
    let output = tokio::time::timeout(Duration::from_secs(30), output)
        .await
        .expect("finishes")
        .expect("runs");
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("not connected"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "one clear line: {stderr}");
}
