//! Streams that outlive their timers. The proxies' dead-peer detection once
//! cut every stream after three ping intervals (60 s at the defaults), idle
//! or busy, because its deadline was never moved by what the relay sent:
//! short tests never saw it. Each test here holds a stream through the
//! proxies for several times the timer it is about.

use std::time::{Duration, Instant};

use devstreams_tests::{
    require_sshd, start_device_proxy, start_echo_server, start_service_proxy,
    wait_until_device_connected, Relay, Sshd,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Default ping interval of the proxies and the relay (20 s) times the
/// three silent intervals after which a peer is declared dead, plus margin.
const PAST_THREE_DEFAULT_PING_INTERVALS: Duration = Duration::from_secs(70);

/// An operator's ssh session that stays quiet for longer than three ping
/// intervals at default settings, then runs a command: the session must
/// still be there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiet_ssh_session_outlives_three_default_ping_intervals() {
    if !require_sshd() {
        return;
    }
    let sshd = Sshd::start().await;
    let relay = Relay::start(&[]).await;
    let device = relay.add_device("QuietDevice").await;
    let _device_proxy = start_device_proxy(&relay, &device, sshd.port, &[]).await;
    wait_until_device_connected(&relay, "QuietDevice").await;
    let (_service_proxy, local_port) = start_service_proxy(&relay, "QuietDevice", &[]).await;

    let quiet_seconds = PAST_THREE_DEFAULT_PING_INTERVALS.as_secs();
    let started = Instant::now();
    let output = tokio::time::timeout(
        PAST_THREE_DEFAULT_PING_INTERVALS + Duration::from_secs(60),
        sshd.ssh(
            local_port,
            &format!("echo before; sleep {quiet_seconds}; echo after"),
        )
        .output(),
    )
    .await
    .expect("ssh finishes")
    .expect("ssh runs");
    assert!(
        output.status.success(),
        "the quiet ssh session died after {:?}: {}",
        started.elapsed(),
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&output.stdout), "before\nafter\n");
}

/// A stream with data flowing both ways all the time, proxies pinging every
/// second (so a stale dead-peer deadline fires after 3 s), held for many
/// times that; then the same stream idle for several silence limits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_then_idle_stream_outlives_a_short_ping_interval() {
    let (echo_port, _echo) = start_echo_server().await;
    let relay = Relay::start(&[]).await;
    let device = relay.add_device("BusyDevice").await;
    let _device_proxy =
        start_device_proxy(&relay, &device, echo_port, &["--ping-interval", "1"]).await;
    wait_until_device_connected(&relay, "BusyDevice").await;
    let (_service_proxy, local_port) =
        start_service_proxy(&relay, "BusyDevice", &["--ping-interval", "1"]).await;

    let mut client = TcpStream::connect(("127.0.0.1", local_port))
        .await
        .expect("connect to service-proxy");
    let busy_for = Duration::from_secs(15);
    let started = Instant::now();
    let mut round = 0u64;
    while started.elapsed() < busy_for {
        let line = format!("busy line {round}\n");
        echo_once(&mut client, line.as_bytes(), started).await;
        round += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(round > 50, "only {round} echoes in {busy_for:?}");

    // Idle: nothing from the application for five silence limits (3 s each);
    // only the pings and pongs of the proxies and relay keep it alive.
    tokio::time::sleep(Duration::from_secs(15)).await;
    echo_once(&mut client, b"after the idle spell\n", started).await;
}

async fn echo_once(client: &mut TcpStream, line: &[u8], started: Instant) {
    client
        .write_all(line)
        .await
        .unwrap_or_else(|error| panic!("write failed after {:?}: {error}", started.elapsed()));
    let mut echoed = vec![0u8; line.len()];
    tokio::time::timeout(Duration::from_secs(10), client.read_exact(&mut echoed))
        .await
        .unwrap_or_else(|_| panic!("no echo after {:?}", started.elapsed()))
        .unwrap_or_else(|error| panic!("stream cut after {:?}: {error}", started.elapsed()));
    assert_eq!(echoed, line);
}
