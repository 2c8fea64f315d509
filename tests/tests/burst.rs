//! Bursts inside the documented limits: everything the limits allow at once
//! must be served, not refused by a smaller buffer somewhere on the way.
//!
//! The numbers are the defaults: device-proxy `--max-streams 256`,
//! service-proxy `--max-connections 256`, relay `--max-streams-per-device 200`.

use std::time::Duration;

use devstreams_tests::{
    relay_metric, start_device_proxy, start_echo_server, start_service_proxy,
    wait_until_device_connected, Relay,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The relay's default per-device stream limit: the largest burst one tunnel is promised.
const BURST: usize = 200;
/// Deadline for every connection of the burst to echo; generous for two shared cores.
const BURST_DEADLINE: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_connections_opened_at_once_through_one_tunnel_all_echo() {
    let relay = Relay::start(&[]).await;
    let (echo_port, _echo) = start_echo_server().await;
    let connection_string = relay.add_device("MyDevice").await;
    let device_proxy = start_device_proxy(&relay, &connection_string, echo_port, &[]).await;
    wait_until_device_connected(&relay, "MyDevice").await;
    let (service_proxy, local_port) = start_service_proxy(&relay, "MyDevice", &[]).await;

    // The device-proxy is frozen while the burst is opened, so the 200
    // stream requests reach it together, as after any stall of the device or
    // its network; every request then waits in one place at once.
    device_proxy.signal("STOP");
    let mut clients = Vec::with_capacity(BURST);
    for _ in 0..BURST {
        clients.push(
            TcpStream::connect(("127.0.0.1", local_port))
                .await
                .expect("service-proxy accepts"),
        );
    }
    let mut tasks = tokio::task::JoinSet::new();
    for (index, mut client) in clients.into_iter().enumerate() {
        tasks.spawn(async move {
            let payload = format!("connection {index} of the burst\n").into_bytes();
            let mut echoed = vec![0u8; payload.len()];
            let round_trip = async {
                client.write_all(&payload).await?;
                client.read_exact(&mut echoed).await?;
                std::io::Result::Ok(())
            };
            match tokio::time::timeout(BURST_DEADLINE, round_trip).await {
                Ok(Ok(())) if echoed == payload => Ok(()),
                Ok(Ok(())) => Err(format!("connection {index}: wrong echo")),
                Ok(Err(error)) => Err(format!("connection {index}: {error}")),
                Err(_) => Err(format!(
                    "connection {index}: no echo within {BURST_DEADLINE:?}"
                )),
            }
        });
    }
    wait_for_pending_streams(&relay, BURST).await;
    device_proxy.signal("CONT");
    let mut failures = Vec::new();
    while let Some(result) = tasks.join_next().await {
        if let Err(failure) = result.expect("the echo task does not panic") {
            failures.push(failure);
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {BURST} connections failed, first: {:?}\ndevice-proxy log (rejections):\n{}\nservice-proxy log:\n{}",
        failures.len(),
        failures.first(),
        device_proxy
            .log()
            .lines()
            .filter(|line| line.contains("reject"))
            .take(5)
            .collect::<Vec<_>>()
            .join("\n"),
        service_proxy.log().lines().rev().take(10).collect::<Vec<_>>().join("\n"),
    );
}

/// Waits until the relay holds `count` streams waiting for their device.
async fn wait_for_pending_streams(relay: &Relay, count: usize) {
    let deadline = tokio::time::Instant::now() + BURST_DEADLINE;
    loop {
        let pending = relay_metric(relay, "devstreams_streams_pending").await;
        if pending >= count as u64 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {pending} of {count} streams reached the relay within {BURST_DEADLINE:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
