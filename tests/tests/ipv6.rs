//! The whole path on IPv6 loopback: a relay listening on `[::1]`, its
//! self-signed certificate valid for the IP address `::1`, connection
//! strings and `--public-url` with a bracketed IPv6 literal, and device-
//! proxy, service-proxy, a real sshd/ssh and the echo sample through it.
//! Skipped (with a message) on a machine without `::1`; a failure in CI.

use std::time::Duration;

use devstreams_tests::{
    echo_sample_service, require_sshd, start_device_proxy, start_service_proxy,
    wait_until_device_connected, Process, Relay, Sshd,
};

/// Whether this machine has IPv6 loopback; panics in CI, which must.
fn require_ipv6_loopback() -> bool {
    if std::net::TcpListener::bind("[::1]:0").is_ok() {
        return true;
    }
    if std::env::var("CI").is_ok_and(|value| value == "true") {
        panic!("no IPv6 loopback (::1) in CI: the IPv6 tests need it");
    }
    eprintln!("SKIPPED: this machine has no IPv6 loopback (::1; see `ip -6 addr show lo`)");
    false
}

/// A port free on `::1` now, for a relay whose `--public-url` must name it.
fn free_ipv6_port() -> u16 {
    std::net::TcpListener::bind("[::1]:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .expect("a free port on ::1")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_and_the_echo_sample_work_over_ipv6_loopback() {
    if !require_ipv6_loopback() || !require_sshd() {
        return;
    }
    let port = free_ipv6_port();
    let listen = format!("[::1]:{port}");
    let public_url = format!("wss://[::1]:{port}");
    let relay = Relay::start(&[
        "--listen",
        &listen,
        "--mqtt-listen",
        "[::1]:0",
        "--admin-listen",
        "[::1]:0",
        "--public-url",
        &public_url,
    ])
    .await;
    assert!(
        relay
            .service_connection_string
            .starts_with(&format!("HostName=[::1]:{port};")),
        "{}",
        relay.service_connection_string
    );
    let device = relay.add_device("MyDevice").await;
    assert!(
        device.starts_with(&format!("HostName=[::1]:{port};")),
        "{device}"
    );

    let sshd = Sshd::start().await;
    let _device_proxy = start_device_proxy(&relay, &device, sshd.port, &[]).await;
    wait_until_device_connected(&relay, "MyDevice").await;
    let (_service_proxy, local_port) = start_service_proxy(&relay, "MyDevice", &[]).await;
    let output = tokio::time::timeout(
        Duration::from_secs(60),
        sshd.ssh(local_port, "echo ok").output(),
    )
    .await
    .expect("ssh finishes")
    .expect("ssh runs");
    assert!(
        output.status.success(),
        "ssh over ::1 failed: {}\nrelay log:\n{}",
        String::from_utf8_lossy(&output.stderr),
        relay.process.log()
    );
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "ok");

    let echo_device = relay.add_device("EchoDevice").await;
    let ca = relay.ca_text();
    let _echo_device = Process::spawn(
        "echo-sample",
        &["device", &echo_device, "--ca-cert", &ca],
        relay.directory.path(),
        &[],
    )
    .await;
    wait_until_device_connected(&relay, "EchoDevice").await;
    echo_sample_service(
        &relay.service_connection_string,
        "EchoDevice",
        &ca,
        &[],
        "hello over ipv6",
    )
    .await;
    let log = relay.process.log();
    assert!(log.contains("peer=[::1]:"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_public_url_an_ipv6_relay_names_itself_by_its_address() {
    if !require_ipv6_loopback() {
        return;
    }
    let relay = Relay::start(&[
        "--listen",
        "[::1]:0",
        "--mqtt-listen",
        "[::1]:0",
        "--admin-listen",
        "[::1]:0",
    ])
    .await;
    let port = relay.port();
    assert!(
        relay
            .service_connection_string
            .starts_with(&format!("HostName=[::1]:{port};")),
        "{}",
        relay.service_connection_string
    );
    // The streaming URL comes from the Host the service used, `[::1]:PORT`.
    let device = relay.add_device("MyDevice").await;
    let tls = relay.tls();
    let connection = framing::ConnectionString::parse_device(&device).expect("device string");
    let mut device_client =
        framing::DeviceClient::connect(&connection, &tls, &framing::DeviceOptions::default())
            .await
            .expect("the device connects over ::1, trusting the certificate's IP address");
    let service = framing::ServiceClient::new(
        framing::ConnectionString::parse_service(&relay.service_connection_string)
            .expect("service string"),
        tls,
    );
    let creation = tokio::spawn(async move {
        service
            .create_stream("MyDevice", "TestStream", &framing::StreamOptions::default())
            .await
    });
    let request = tokio::time::timeout(Duration::from_secs(30), device_client.next_request())
        .await
        .expect("a stream request in time")
        .expect("a stream request");
    assert!(
        request
            .url
            .starts_with(&format!("wss://[::1]:{port}/bridges/")),
        "{}",
        request.url
    );
    device_client
        .responder()
        .reject(&request)
        .await
        .expect("rejected");
    let answer = creation
        .await
        .expect("the creation task")
        .expect("an answer");
    assert!(!answer.is_accepted);
}
