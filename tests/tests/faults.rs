//! Faults: killed and frozen processes, a stopped target, resets, a relay
//! draining on SIGTERM, and churn. Every process is a real one, stopped by
//! its PID; every wait has a deadline.

use std::time::{Duration, Instant};

use devstreams_tests::{
    echo_round_trip, open_file_descriptors, relay_metric, resident_kib, start_device_proxy,
    start_echo_server, start_echo_server_on, start_service_proxy, wait_until_device_connected,
    Process, Relay,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Relay + device-proxy (fast re-dial) + service-proxy in front of a TCP echo server.
struct Tunnel {
    relay: Relay,
    device_proxy: Process,
    service_proxy: Process,
    local_port: u16,
    echo_port: u16,
    echo: tokio::task::JoinHandle<()>,
}

impl Tunnel {
    /// The same tunnel with its relay restarted on the same data dir and
    /// address; neither proxy is touched.
    async fn with_relay_restarted(self) -> Tunnel {
        let Tunnel {
            relay,
            device_proxy,
            service_proxy,
            local_port,
            echo_port,
            echo,
        } = self;
        Tunnel {
            relay: relay.restart().await,
            device_proxy,
            service_proxy,
            local_port,
            echo_port,
            echo,
        }
    }
}

/// A tunnel whose streams are not resumable (`--no-resume`): these tests
/// check how a plain stream ends; resumable sessions are tests/resume.rs.
async fn tunnel(relay_arguments: &[&str]) -> Tunnel {
    let relay = Relay::start(relay_arguments).await;
    let (echo_port, echo) = start_echo_server().await;
    let connection_string = relay.add_device("MyDevice").await;
    let device_proxy = start_device_proxy(
        &relay,
        &connection_string,
        echo_port,
        &["--max-backoff", "1", "--no-resume"],
    )
    .await;
    wait_until_device_connected(&relay, "MyDevice").await;
    let (service_proxy, local_port) =
        start_service_proxy(&relay, "MyDevice", &["--no-resume"]).await;
    Tunnel {
        relay,
        device_proxy,
        service_proxy,
        local_port,
        echo_port,
        echo,
    }
}

/// Reads until the connection fails or ends; returns how long that took.
async fn time_until_broken(client: &mut TcpStream, limit: Duration) -> Duration {
    let started = Instant::now();
    let mut buffer = [0u8; 4096];
    let broken = tokio::time::timeout(limit, async {
        loop {
            match client.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    })
    .await;
    assert!(
        broken.is_ok(),
        "the client connection still hangs after {limit:?}"
    );
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_relay_breaks_streams_promptly_and_a_restart_restores_service() {
    let mut tunnel = tunnel(&[]).await;
    let mut client = echo_round_trip(tunnel.local_port, b"before the crash")
        .await
        .expect("tunnel works");
    // Keep bytes flowing while the relay dies.
    client
        .write_all(&vec![7u8; 256 * 1024])
        .await
        .expect("write during transfer");
    tunnel.relay.process.signal("KILL");
    let waited = time_until_broken(&mut client, Duration::from_secs(10)).await;
    assert!(
        waited < Duration::from_secs(5),
        "the client noticed after {waited:?}"
    );

    // A killed process's listening socket closes only once the kernel has
    // torn the process down (a larger process takes longer): the outage
    // starts then.
    tunnel
        .relay
        .process
        .wait_exit(Duration::from_secs(10))
        .await;
    // While the relay is down, service-proxy keeps listening and turns each
    // new connection away at once, with a line that says why.
    let mut refused = TcpStream::connect(("127.0.0.1", tunnel.local_port))
        .await
        .expect("service-proxy still listens");
    let waited = time_until_broken(&mut refused, Duration::from_secs(10)).await;
    assert!(
        waited < Duration::from_secs(2),
        "a connection during the outage was closed after {waited:?}"
    );
    // service-proxy says the relay is unreachable.
    tunnel
        .service_proxy
        .wait_for_log("cannot reach", Duration::from_secs(5))
        .await;
    let tunnel = tunnel.with_relay_restarted().await;
    let local_port = tunnel.local_port;
    let back = Instant::now();
    // Neither proxy is restarted: the device re-dials by itself, the
    // service-proxy kept listening.
    echo_round_trip(local_port, b"after the restart")
        .await
        .expect("the tunnel works again");
    assert!(
        back.elapsed() < Duration::from_secs(2),
        "service came back after {:?}",
        back.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_device_proxy_makes_the_client_fail_within_three_seconds() {
    let tunnel = tunnel(&[]).await;
    let mut client = echo_round_trip(tunnel.local_port, b"hello")
        .await
        .expect("tunnel works");
    tunnel.device_proxy.signal("KILL");
    let waited = time_until_broken(&mut client, Duration::from_secs(10)).await;
    assert!(
        waited < Duration::from_secs(3),
        "the client noticed after {waited:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopped_target_fails_new_streams_fast_and_they_work_when_it_returns() {
    let tunnel = tunnel(&[]).await;
    echo_round_trip(tunnel.local_port, b"target up")
        .await
        .expect("tunnel works");
    // Once the aborted task is awaited its listener is closed.
    tunnel.echo.abort();
    let _ = tunnel.echo.await;
    let mut client = TcpStream::connect(("127.0.0.1", tunnel.local_port))
        .await
        .expect("service-proxy still listens");
    let waited = time_until_broken(&mut client, Duration::from_secs(10)).await;
    assert!(
        waited < Duration::from_secs(3),
        "a refused target was reported after {waited:?}"
    );
    let device_log = tunnel.device_proxy.log();
    assert!(
        device_log.contains("refused") || device_log.contains("reject"),
        "device-proxy says why:\n{device_log}"
    );

    let _echo_again = start_echo_server_on(tunnel.echo_port).await;
    echo_round_trip(tunnel.local_port, b"target back")
        .await
        .expect("streams work again once the target returns");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_device_proxy_is_detected_within_three_ping_intervals() {
    let tunnel = tunnel(&["--ping-interval", "1"]).await;
    let mut client = echo_round_trip(tunnel.local_port, b"hello")
        .await
        .expect("tunnel works");
    tunnel.device_proxy.signal("STOP");
    let waited = time_until_broken(&mut client, Duration::from_secs(15)).await;
    tunnel.device_proxy.signal("CONT");
    assert!(
        waited < Duration::from_secs(5),
        "a frozen peer was detected after {waited:?} (3 intervals = 3 s)"
    );
    // The relay writes its line once the other side's close handshake is
    // over (at most 3 s), which may be just after the client saw the break.
    tunnel
        .relay
        .process
        .wait_for_log("disconnected without closing", Duration::from_secs(5))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_on_the_target_side_is_a_reset_on_the_client_side() {
    let relay = Relay::start(&[]).await;
    // A target that reads a request, then resets the connection.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let target_port = listener.local_addr().expect("address").port();
    let _target = tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let mut buffer = [0u8; 5];
            let _ = socket.read_exact(&mut buffer).await;
            let _ = socket.set_zero_linger();
            drop(socket);
        }
    });
    let connection_string = relay.add_device("MyDevice").await;
    let _device_proxy = start_device_proxy(&relay, &connection_string, target_port, &[]).await;
    wait_until_device_connected(&relay, "MyDevice").await;
    let (_service_proxy, local_port) = start_service_proxy(&relay, "MyDevice", &[]).await;
    let mut client = TcpStream::connect(("127.0.0.1", local_port))
        .await
        .expect("connect");
    client.write_all(b"hello").await.expect("write");
    let mut buffer = [0u8; 16];
    let result = tokio::time::timeout(Duration::from_secs(10), client.read(&mut buffer))
        .await
        .expect("answered");
    match result {
        Err(error) => assert_eq!(error.kind(), std::io::ErrorKind::ConnectionReset, "{error}"),
        Ok(count) => panic!("expected a reset, got a clean read of {count} bytes"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_a_live_stream_finish_then_the_relay_exits_zero_and_devices_return() {
    let mut tunnel = tunnel(&["--drain-timeout", "20"]).await;
    let mut client = echo_round_trip(tunnel.local_port, b"start")
        .await
        .expect("tunnel works");
    tunnel.relay.process.signal("TERM");
    // The live stream keeps working during the drain.
    for round in 0..5u8 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let payload = [round; 1000];
        client
            .write_all(&payload)
            .await
            .expect("write during drain");
        let mut echoed = [0u8; 1000];
        tokio::time::timeout(Duration::from_secs(10), client.read_exact(&mut echoed))
            .await
            .expect("echo during drain")
            .expect("read during drain");
        assert_eq!(echoed, payload);
    }
    drop(client);
    let code = tunnel
        .relay
        .process
        .wait_exit(Duration::from_secs(15))
        .await;
    assert_eq!(code, Some(0), "relay log:\n{}", tunnel.relay.process.log());

    let tunnel = tunnel.with_relay_restarted().await;
    let local_port = tunnel.local_port;
    echo_round_trip(local_port, b"next relay")
        .await
        .expect("the device reconnected to the next relay start");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_of_short_streams_leaves_no_descriptors_tasks_or_memory_behind() {
    let tunnel = tunnel(&[
        "--creations-per-second-per-device",
        "100000",
        "--max-streams-per-device",
        "10000",
    ])
    .await;
    let pids = [
        tunnel.relay.process.pid(),
        tunnel.device_proxy.pid(),
        tunnel.service_proxy.pid(),
    ];
    echo_round_trip(tunnel.local_port, b"warm up")
        .await
        .expect("tunnel works");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let baseline_descriptors: Vec<usize> =
        pids.iter().map(|&pid| open_file_descriptors(pid)).collect();
    let baseline_memory: Vec<u64> = pids.iter().map(|&pid| resident_kib(pid)).collect();
    let baseline_tasks = relay_metric(&tunnel.relay, "devstreams_tasks").await;

    // Some long streams stay open through the churn.
    let mut long_streams = Vec::new();
    for index in 0..5u8 {
        long_streams.push(
            echo_round_trip(tunnel.local_port, &[index; 100])
                .await
                .expect("long stream"),
        );
    }
    let started = Instant::now();
    let short_streams = 1500;
    let workers: Vec<_> = (0..10)
        .map(|worker| {
            let port = tunnel.local_port;
            tokio::spawn(async move {
                for index in 0..short_streams / 10 {
                    let payload = format!("worker {worker} stream {index}");
                    let client = echo_round_trip(port, payload.as_bytes())
                        .await
                        .expect("short stream");
                    drop(client);
                }
            })
        })
        .collect();
    for worker in workers {
        tokio::time::timeout(Duration::from_secs(180), worker)
            .await
            .expect("churn finishes")
            .expect("worker");
    }
    let churn_time = started.elapsed();
    for (index, stream) in long_streams.iter_mut().enumerate() {
        let payload = [index as u8 + 100; 100];
        stream
            .write_all(&payload)
            .await
            .expect("long stream still works");
        let mut echoed = [0u8; 100];
        stream
            .read_exact(&mut echoed)
            .await
            .expect("long stream echo");
        assert_eq!(echoed, payload);
    }
    drop(long_streams);

    // Closing takes a moment to travel through three processes, and a
    // stream's task ends a moment after its sockets are closed.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let descriptors: Vec<usize> = pids.iter().map(|&pid| open_file_descriptors(pid)).collect();
        let tasks = relay_metric(&tunnel.relay, "devstreams_tasks").await;
        let settled = descriptors
            .iter()
            .zip(&baseline_descriptors)
            .all(|(now, before)| *now <= before + 4);
        if settled && tasks <= baseline_tasks + 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "descriptors stay open or tasks keep running: descriptors before {baseline_descriptors:?}, after {descriptors:?}; relay tasks before {baseline_tasks}, after {tasks}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for (index, &pid) in pids.iter().enumerate() {
        let memory = resident_kib(pid);
        // Allocators keep some freed memory; a leak of ~1 KiB per stream
        // would show as more than this.
        assert!(
            memory <= baseline_memory[index] + 8 * 1024,
            "process {index} grew from {} KiB to {memory} KiB after {short_streams} streams",
            baseline_memory[index]
        );
    }
    eprintln!("churn: {short_streams} streams in {churn_time:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_burst_is_shed_with_retry_later_and_every_device_gets_in() {
    let relay = Relay::start(&["--device-connects-per-second", "2"]).await;
    let (echo_port, _echo) = start_echo_server().await;
    let mut proxies = Vec::new();
    for index in 0..6 {
        let device_id = format!("Burst{index}");
        let connection_string = relay.add_device(&device_id).await;
        proxies.push((
            device_id,
            start_device_proxy(
                &relay,
                &connection_string,
                echo_port,
                &["--max-backoff", "2"],
            )
            .await,
        ));
    }
    // Six devices at 2 per second: some are told to come back, all get in.
    for (device_id, _) in &proxies {
        wait_until_device_connected(&relay, device_id).await;
    }
    let shed = proxies
        .iter()
        .filter(|(_, proxy)| proxy.log().contains("ServiceUnavailable"))
        .count();
    assert!(
        shed >= 1,
        "no device was told to retry later at 2 connections per second"
    );
    assert!(
        relay.process.log().contains("control channel shed"),
        "the relay logs the shedding"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_exit_zero_promptly_on_sigterm_even_with_a_live_stream() {
    let mut tunnel = tunnel(&[]).await;
    let _client = echo_round_trip(tunnel.local_port, b"live")
        .await
        .expect("tunnel works");
    for process in [&mut tunnel.service_proxy, &mut tunnel.device_proxy] {
        process.signal("TERM");
        let started = Instant::now();
        let code = process.wait_exit(Duration::from_secs(10)).await;
        assert_eq!(code, Some(0), "log:\n{}", process.log());
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "took {:?}",
            started.elapsed()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_memory_returns_near_its_baseline_after_a_moderate_burst() {
    let tunnel = tunnel(&[]).await;
    let relay_pid = tunnel.relay.process.pid();
    echo_round_trip(tunnel.local_port, b"warm up")
        .await
        .expect("tunnel works");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let baseline = resident_kib(relay_pid);

    // 100 streams open at once, then each echoes 1 MiB concurrently.
    let streams = 100;
    let payload_size = 1024 * 1024;
    let mut clients = Vec::new();
    for wave in 0..streams / 25 {
        let opened: Vec<_> = (0..25)
            .map(|index| {
                let port = tunnel.local_port;
                tokio::spawn(async move {
                    let payload = format!("stream {wave}/{index}");
                    echo_round_trip(port, payload.as_bytes()).await
                })
            })
            .collect();
        for task in opened {
            clients.push(task.await.expect("task").expect("stream opens"));
        }
    }
    let transfers: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(index, client)| {
            tokio::spawn(async move {
                let payload = vec![index as u8; payload_size];
                let (mut reader, mut writer) = client.into_split();
                let write = async {
                    writer.write_all(&payload).await.expect("upload");
                    writer
                };
                let read = async {
                    let mut echoed = vec![0u8; payload_size];
                    reader.read_exact(&mut echoed).await.expect("echo");
                    assert!(echoed.iter().all(|byte| *byte == index as u8));
                };
                let (writer, ()) = tokio::join!(write, read);
                drop(writer);
            })
        })
        .collect();
    for transfer in transfers {
        tokio::time::timeout(Duration::from_secs(120), transfer)
            .await
            .expect("transfers finish")
            .expect("transfer");
    }
    let peak = resident_kib(relay_pid);

    // Every stream has ended; within a few seconds the relay is back near
    // where it started (glibc would keep the freed heap without a trim).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let memory = resident_kib(relay_pid);
        if memory <= baseline * 2
            && tunnel.relay.process.log().matches("stream closed").count() > streams
        {
            eprintln!("relay memory: baseline {baseline} KiB, after the burst {peak} KiB, settled {memory} KiB");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "relay memory stays at {memory} KiB after the burst ended (baseline {baseline} KiB, right after the burst {peak} KiB)"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A fleet that leaves (reconnects elsewhere, or the network blinks) must
/// not leave the relay at the size of the fleet: control channels count
/// toward the heap trim like streams do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_memory_returns_after_many_control_channels_close() {
    let relay = Relay::start(&[
        "--device-connects-per-second",
        "10000",
        "--device-connects-per-second-per-source",
        "10000",
    ])
    .await;
    let relay_pid = relay.process.pid();
    let device = framing::ConnectionString::parse_device(&relay.add_device("Fleet").await)
        .expect("device string");
    let tls = relay.tls();
    let options = framing::DeviceOptions::default();
    // One channel first, so what the TLS and MQTT code allocate once is in
    // the baseline.
    let mut warm_up = device.clone();
    warm_up.module_id = Some("warm-up".into());
    let warm_up = framing::DeviceClient::connect(&warm_up, &tls, &options)
        .await
        .expect("a module connects");
    let baseline = resident_kib(relay_pid);

    let channels = 600;
    // 2 events per channel in the console's activity ring, a few hundred
    // bytes each.
    const ACTIVITY_RING_ALLOWANCE_KIB: u64 = 1024;
    let mut clients = Vec::with_capacity(channels);
    for batch in 0..channels / 50 {
        let connects: Vec<_> = (0..50)
            .map(|index| {
                let mut module = device.clone();
                module.module_id = Some(format!("module-{batch}-{index}"));
                let (tls, options) = (tls.clone(), options.clone());
                tokio::spawn(async move {
                    framing::DeviceClient::connect(&module, &tls, &options).await
                })
            })
            .collect();
        for connect in connects {
            clients.push(connect.await.expect("task").expect("a module connects"));
        }
    }
    let peak = resident_kib(relay_pid);
    assert!(
        peak > baseline + 4 * 1024,
        "{channels} channels should cost the relay megabytes: baseline {baseline} KiB, with them {peak} KiB"
    );
    drop(clients);

    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let memory = resident_kib(relay_pid);
        // The console's activity ring keeps the channels' connected and
        // disconnected events (bounded at 5,000 events): that much stays.
        if memory <= baseline + (peak - baseline) / 2 + ACTIVITY_RING_ALLOWANCE_KIB {
            eprintln!("relay memory: baseline {baseline} KiB, with {channels} channels {peak} KiB, after {memory} KiB");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "relay memory stays at {memory} KiB after {channels} channels closed (baseline {baseline} KiB, with them {peak} KiB)"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(warm_up);
}

/// A target that writes without end to every connection and reports how
/// long after `started` each connection's writes began to fail.
async fn start_firehose() -> (u16, tokio::sync::mpsc::UnboundedReceiver<Instant>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the firehose");
    let port = listener.local_addr().expect("address").port();
    let (ended, endings) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let ended = ended.clone();
            tokio::spawn(async move {
                let chunk = vec![0x5au8; 64 * 1024];
                while socket.write_all(&chunk).await.is_ok() {}
                let _ = ended.send(Instant::now());
            });
        }
    });
    (port, endings)
}

/// An operator who leaves a download mid-transfer must free the device's
/// side at once: the device-proxy stops reading its target within a second,
/// rather than pouring data into a stream nobody reads until the relay's
/// close-handshake deadline (3 s) cuts it, or a resumable session waits out
/// its resume window. With and without resumable sessions, and for both ways
/// a client leaves: a plain close with unread data (a reset), and a
/// half-close first (the device sees the end of the upload, then the reset).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_leaving_a_busy_download_frees_the_target_at_once() {
    for resume in [false, true] {
        let relay = Relay::start(&[]).await;
        let (firehose_port, mut endings) = start_firehose().await;
        let connection_string = relay.add_device("MyDevice").await;
        let mode: &[&str] = if resume { &[] } else { &["--no-resume"] };
        let device_proxy =
            start_device_proxy(&relay, &connection_string, firehose_port, mode).await;
        wait_until_device_connected(&relay, "MyDevice").await;
        let (service_proxy, local_port) = start_service_proxy(&relay, "MyDevice", mode).await;
        for half_close_first in [false, true, false, true] {
            let mut client = TcpStream::connect(("127.0.0.1", local_port))
                .await
                .expect("connect to the service-proxy");
            let mut buffer = vec![0u8; 64 * 1024];
            let mut received = 0usize;
            while received < 16 * 1024 * 1024 {
                let count = tokio::time::timeout(Duration::from_secs(10), client.read(&mut buffer))
                    .await
                    .expect("the download flows")
                    .expect("read");
                assert!(count > 0, "the download ended early");
                received += count;
            }
            if half_close_first {
                client.shutdown().await.expect("half-close");
            }
            // Unread data piles up, so the close below is a reset.
            tokio::time::sleep(Duration::from_millis(100)).await;
            let left = Instant::now();
            drop(client);
            let ended = tokio::time::timeout(Duration::from_secs(10), endings.recv()).await;
            let after = match ended {
                Ok(Some(ended)) => ended.saturating_duration_since(left),
                _ => Duration::MAX,
            };
            let shown = if after == Duration::MAX {
                "more than 10 s".to_string()
            } else {
                format!("{after:?}")
            };
            assert!(
                after < Duration::from_millis(1500),
                "resume {resume}, half-close first {half_close_first}: the target was written to \
                 for {shown} after the client left\n--- device-proxy\n{}\n--- relay\n{}\n\
                 --- service-proxy\n{}",
                device_proxy.log(),
                relay.process.log(),
                service_proxy.log()
            );
        }
    }
}
