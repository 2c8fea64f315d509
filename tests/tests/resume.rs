//! Resumable sessions (PROTOCOL.md, "Resumable streams") with the real
//! binaries: a session between service-proxy and device-proxy outlives the
//! WebSocket that carries it — a relay killed and restarted, a drained
//! relay, a network path that drops — and ends promptly, with a reset, when
//! it cannot be resumed.

use std::time::{Duration, Instant};

use devstreams_tests::audit::{of_kind, wait_for_audit};
use devstreams_tests::{
    require_sshd, sha256_hex, start_device_proxy, start_echo_server, start_service_proxy,
    wait_until_device_connected, Process, Relay, Sshd,
};
use framing::session::{Control, SessionKeys};
use futures_util::SinkExt;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

/// Stops `relay` at once (SIGKILL), as a crash would; returns what a
/// restart needs.
fn kill_relay(relay: Relay) -> (tempfile::TempDir, String) {
    let Relay {
        process,
        directory,
        address,
        ..
    } = relay;
    drop(process);
    (directory, address)
}

async fn start_relay_again(directory: tempfile::TempDir, address: &str) -> Relay {
    Relay::start_in(directory, &["--listen", address]).await
}

/// Echo through the tunnel: writes a line, reads it back.
async fn echo_line(stream: &mut BufReader<TcpStream>, line: &str) -> String {
    stream
        .get_mut()
        .write_all(format!("{line}\n").as_bytes())
        .await
        .expect("write to the tunnel");
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(60), stream.read_line(&mut answer))
        .await
        .expect("the echo comes back within 60 s")
        .expect("read from the tunnel");
    answer.trim_end().to_string()
}

struct EchoTunnel {
    relay: Relay,
    device_proxy: Process,
    service_proxy: Process,
    local_port: u16,
    _echo: tokio::task::JoinHandle<()>,
}

async fn echo_tunnel(device_extra: &[&str], service_extra: &[&str]) -> EchoTunnel {
    let (echo_port, echo) = start_echo_server().await;
    let relay = Relay::start(&[]).await;
    let connection_string = relay.add_device("MyDevice").await;
    let device_proxy =
        start_device_proxy(&relay, &connection_string, echo_port, device_extra).await;
    wait_until_device_connected(&relay, "MyDevice").await;
    let (service_proxy, local_port) = start_service_proxy(&relay, "MyDevice", service_extra).await;
    EchoTunnel {
        relay,
        device_proxy,
        service_proxy,
        local_port,
        _echo: echo,
    }
}

async fn connect_tunnel(port: u16) -> BufReader<TcpStream> {
    BufReader::new(
        TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect to service-proxy"),
    )
}

/// Waits until `process`'s log holds `needle`.
async fn wait_for_log(process: &Process, needle: &str, timeout: Duration) -> String {
    process.wait_for_log(needle, timeout).await
}

/// Reads until the peer ends the connection; Err is a reset.
async fn read_until_end(stream: &mut BufReader<TcpStream>) -> std::io::Result<Vec<u8>> {
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).await.map(|_| rest)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_cat_of_a_large_file_survives_a_relay_kill_and_restart() {
    if !require_sshd() {
        return;
    }
    let sshd = Sshd::start().await;
    let relay = Relay::start(&[]).await;
    let connection_string = relay.add_device("MyDevice").await;
    let device_proxy = start_device_proxy(&relay, &connection_string, sshd.port, &[]).await;
    wait_until_device_connected(&relay, "MyDevice").await;
    let (service_proxy, local_port) = start_service_proxy(&relay, "MyDevice", &[]).await;
    let size = 256 * 1024 * 1024;
    let mut data = vec![0u8; size];
    let mut state = 0x2545f4914f6cdd1du64;
    for chunk in data.chunks_mut(8) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
    }
    let expected = sha256_hex(&data);
    let remote_file = sshd.directory.path().join("large.bin");
    std::fs::write(&remote_file, &data).expect("write the file");
    drop(data);
    let mut ssh = sshd.ssh(local_port, &format!("cat {}", remote_file.display()));
    ssh.stdout(std::process::Stdio::piped());
    let mut child = ssh.spawn().expect("ssh runs");
    let mut stdout = child.stdout.take().expect("piped stdout");
    let mut received = Vec::with_capacity(size);
    let mut buffer = vec![0u8; 256 * 1024];
    // Kill the relay once some 16 MiB have come through.
    while received.len() < 16 * 1024 * 1024 {
        let count = tokio::time::timeout(Duration::from_secs(60), stdout.read(&mut buffer))
            .await
            .expect("data flows")
            .expect("read ssh output");
        assert!(count > 0, "ssh output ended early");
        received.extend_from_slice(&buffer[..count]);
    }
    let (directory, address) = kill_relay(relay);
    let reader = tokio::spawn(async move {
        loop {
            let count = stdout.read(&mut buffer).await.expect("read ssh output");
            if count == 0 {
                break received;
            }
            received.extend_from_slice(&buffer[..count]);
        }
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    let _relay = start_relay_again(directory, &address).await;
    let received = tokio::time::timeout(Duration::from_secs(180), reader)
        .await
        .expect("the transfer finishes after the restart")
        .expect("reader task");
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("ssh exits")
        .expect("ssh status");
    assert!(
        status.success(),
        "ssh failed; service-proxy log:\n{}",
        service_proxy.log()
    );
    assert_eq!(received.len(), size);
    assert_eq!(sha256_hex(&received), expected, "the bytes changed");
    assert!(service_proxy.log().contains("session resumed"));
    // The device side sent the file: where did it keep what it sent?
    let closed = wait_for_log(&device_proxy, "session closed", Duration::from_secs(10)).await;
    let kept_in = format!("replay_kept_in=\"{}\"", expected_replay_place());
    assert!(
        closed.contains(&kept_in),
        "expected {kept_in} in the device-proxy's log:\n{closed}"
    );
}

/// Where the proxies keep unacknowledged bytes by default: in the local
/// socket's receive queue when the kernel can peek at an offset on TCP
/// (Linux 6.9) and lets a receive buffer hold the smallest window (2 MiB,
/// `net.core.rmem_max`); in memory otherwise. Read from the system, not
/// found by trying, so that a broken check in the proxies fails this test.
fn expected_replay_place() -> &'static str {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut numbers = release
        .trim()
        .split(|character: char| !character.is_ascii_digit())
        .map(|number| number.parse::<u32>().unwrap_or(0));
    let version = (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0));
    let rmem_max = std::fs::read_to_string("/proc/sys/net/core/rmem_max")
        .ok()
        .and_then(|text| text.trim().parse::<usize>().ok())
        .unwrap_or(0);
    if version >= (6, 9) && rmem_max >= 2 * 1024 * 1024 {
        "socket queue"
    } else {
        "memory"
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interactive_ssh_session_survives_a_relay_restart() {
    if !require_sshd() {
        return;
    }
    let sshd = Sshd::start().await;
    let relay = Relay::start(&[]).await;
    let connection_string = relay.add_device("MyDevice").await;
    let _device_proxy = start_device_proxy(&relay, &connection_string, sshd.port, &[]).await;
    wait_until_device_connected(&relay, "MyDevice").await;
    let (_service_proxy, local_port) = start_service_proxy(&relay, "MyDevice", &[]).await;
    let mut ssh = sshd.ssh(local_port, "sh");
    ssh.stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped());
    let mut child = ssh.spawn().expect("ssh runs");
    let mut stdin = child.stdin.take().expect("piped stdin");
    let mut stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
    let mut run = async |command: &str| {
        stdin
            .write_all(format!("{command}\n").as_bytes())
            .await
            .expect("write to ssh");
        let mut line = String::new();
        tokio::time::timeout(Duration::from_secs(60), stdout.read_line(&mut line))
            .await
            .expect("the shell answers")
            .expect("read from ssh");
        line.trim_end().to_string()
    };
    assert_eq!(run("echo before").await, "before");
    let (directory, address) = kill_relay(relay);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let _relay = start_relay_again(directory, &address).await;
    assert_eq!(run("echo after").await, "after");
    assert_eq!(run("echo $((6 * 7))").await, "42");
    stdin.write_all(b"exit\n").await.expect("write exit");
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("ssh exits")
        .expect("ssh status");
    assert!(status.success());
}

/// A TCP forwarder standing in for a network path: `cut` drops every
/// connection through it and stops listening, `restore` listens again on
/// the same port.
struct Forwarder {
    port: u16,
    target: String,
    tasks: JoinSet<()>,
}

impl Forwarder {
    async fn start(target: &str) -> Forwarder {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("address").port();
        let mut forwarder = Forwarder {
            port,
            target: target.to_string(),
            tasks: JoinSet::new(),
        };
        forwarder.serve(listener);
        forwarder
    }

    fn serve(&mut self, listener: TcpListener) {
        let target = self.target.clone();
        self.tasks.spawn(async move {
            let mut connections = JoinSet::new();
            while let Ok((mut inbound, _)) = listener.accept().await {
                let target = target.clone();
                connections.spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(&target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
    }

    fn cut(&mut self) {
        self.tasks.abort_all();
    }

    async fn restore(&mut self) {
        while self.tasks.join_next().await.is_some() {}
        let listener = TcpListener::bind(("127.0.0.1", self.port))
            .await
            .expect("the forwarder's port is free again");
        self.serve(listener);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_network_switch_on_either_side_does_not_end_the_session() {
    let (echo_port, _echo) = start_echo_server().await;
    let audit_directory = tempfile::tempdir().expect("temp dir");
    let audit_path = audit_directory.path().join("audit.log");
    let relay = Relay::start(&["--audit-log", &audit_path.to_string_lossy()]).await;
    let mut device_path = Forwarder::start(&relay.address).await;
    let mut service_path = Forwarder::start(&relay.address).await;
    let connection_string = relay.add_device("MyDevice").await;
    let device_string = devstreams_tests::through_port(&connection_string, device_path.port);
    let _device_proxy = start_device_proxy(&relay, &device_string, echo_port, &[]).await;
    wait_until_device_connected(&relay, "MyDevice").await;
    let ca = relay.ca_text();
    let service_string =
        devstreams_tests::through_port(&relay.service_connection_string, service_path.port);
    let mut service_proxy = Process::spawn(
        "service-proxy",
        &[&service_string, "MyDevice", "0", "--ca-cert", &ca],
        relay.directory.path(),
        &[],
    )
    .await;
    let local_port: u16 = service_proxy
        .wait_for_line("Listening on ")
        .await
        .rsplit(':')
        .next()
        .and_then(|port| port.parse().ok())
        .expect("a port");
    let mut tunnel = connect_tunnel(local_port).await;
    assert_eq!(echo_line(&mut tunnel, "first").await, "first");
    device_path.cut();
    tokio::time::sleep(Duration::from_secs(1)).await;
    device_path.restore().await;
    assert_eq!(
        echo_line(&mut tunnel, "after the device moved").await,
        "after the device moved"
    );
    service_path.cut();
    tokio::time::sleep(Duration::from_secs(1)).await;
    service_path.restore().await;
    assert_eq!(
        echo_line(&mut tunnel, "after the service moved").await,
        "after the service moved"
    );
    let log = service_proxy.log();
    assert!(log.matches("session resumed").count() >= 2, "{log}");

    // The audit log tells the session's streams apart: the first asked for
    // a new session, each later one continued it and was audited as resumed.
    let events = wait_for_audit(&audit_path, "two resumed streams", |events| {
        of_kind(events, "stream_resumed").len() >= 2
    })
    .await;
    let requested = of_kind(&events, "stream_requested");
    let resume_kinds: Vec<&str> = requested
        .iter()
        .filter_map(|event| event["resume"].as_str())
        .collect();
    assert_eq!(resume_kinds.first(), Some(&"new"), "{requested:?}");
    assert!(
        resume_kinds
            .iter()
            .filter(|kind| **kind == "continue")
            .count()
            >= 2,
        "{requested:?}"
    );
    for resumed in of_kind(&events, "stream_resumed") {
        assert_eq!(resumed["device_id"], "MyDevice", "{resumed}");
        let stream_id = resumed["stream_id"].as_str().expect("a stream id");
        assert!(
            requested
                .iter()
                .any(|event| event["stream_id"] == stream_id && event["resume"] == "continue"),
            "{stream_id} was requested as a continuation: {requested:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_relay_moves_sessions_at_once_and_exits_early() {
    let mut tunnel_setup = echo_tunnel(&[], &[]).await;
    let mut tunnel = connect_tunnel(tunnel_setup.local_port).await;
    assert_eq!(echo_line(&mut tunnel, "before").await, "before");
    let started = Instant::now();
    tunnel_setup.relay.process.signal("TERM");
    let code = tunnel_setup
        .relay
        .process
        .wait_exit(Duration::from_secs(20))
        .await;
    let drained_in = started.elapsed();
    assert_eq!(code, Some(0), "{}", tunnel_setup.relay.process.log());
    assert!(
        drained_in < Duration::from_secs(10),
        "the drain took {drained_in:?}; its deadline is far longer"
    );
    assert!(tunnel_setup.relay.process.log().contains("moved"));
    let (directory, address) = kill_relay(tunnel_setup.relay);
    let _relay = start_relay_again(directory, &address).await;
    assert_eq!(echo_line(&mut tunnel, "after").await, "after");
    drop(tunnel_setup.device_proxy);
    drop(tunnel_setup.service_proxy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_resume_window_the_local_client_sees_a_reset() {
    let setup = echo_tunnel(&["--resume-timeout", "3"], &["--resume-timeout", "3"]).await;
    let mut tunnel = connect_tunnel(setup.local_port).await;
    assert_eq!(echo_line(&mut tunnel, "hello").await, "hello");
    let started = Instant::now();
    let (_directory, _address) = kill_relay(setup.relay);
    let ended = tokio::time::timeout(Duration::from_secs(15), read_until_end(&mut tunnel))
        .await
        .expect("the connection ends within the window and a few seconds");
    let error = ended.expect_err("a reset, not a clean end");
    assert_eq!(error.kind(), std::io::ErrorKind::ConnectionReset);
    assert!(
        started.elapsed() >= Duration::from_secs(3),
        "not before the window"
    );
    // Two lines name the window: "session closed" first, then the error
    // line that says the local connection was reset. Wait for the second.
    let log = wait_for_log(
        &setup.service_proxy,
        "closed, the local connection was reset",
        Duration::from_secs(5),
    )
    .await;
    assert!(log.contains("--resume-timeout"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_device_proxy_makes_the_service_side_give_up_promptly() {
    let (echo_port, _echo) = start_echo_server().await;
    let relay = Relay::start(&[]).await;
    let connection_string = relay.add_device("MyDevice").await;
    let device_proxy = start_device_proxy(&relay, &connection_string, echo_port, &[]).await;
    wait_until_device_connected(&relay, "MyDevice").await;
    let (service_proxy, local_port) = start_service_proxy(&relay, "MyDevice", &[]).await;
    let mut tunnel = connect_tunnel(local_port).await;
    assert_eq!(echo_line(&mut tunnel, "hello").await, "hello");
    drop(device_proxy);
    let _device_proxy = start_device_proxy(&relay, &connection_string, echo_port, &[]).await;
    let started = Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(30), read_until_end(&mut tunnel))
        .await
        .expect("the service side gives up well before the 60 s window");
    assert!(ended.is_err(), "a reset, not a clean end");
    assert!(started.elapsed() < Duration::from_secs(30));
    let log = service_proxy.log();
    assert!(log.contains("no longer knows the session"), "{log}");
}

/// The session id from a "session started" line of service-proxy's log.
fn session_id_in(log: &str) -> String {
    let line = log
        .lines()
        .find(|line| line.contains("session started"))
        .expect("a session started");
    let start = line.find("session_id=").expect("a session id") + "session_id=".len();
    line[start..]
        .chars()
        .take_while(|character| character.is_ascii_hexdigit())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_resume_is_refused_and_the_real_session_keeps_working() {
    let setup = echo_tunnel(&[], &[]).await;
    let mut tunnel = connect_tunnel(setup.local_port).await;
    assert_eq!(echo_line(&mut tunnel, "hello").await, "hello");
    let session_id = session_id_in(&setup.service_proxy.log());
    assert_eq!(session_id.len(), 32, "{}", setup.service_proxy.log());
    // Another service (same credentials) names the session without its secret.
    let service = framing::ServiceClient::new(
        framing::ConnectionString::parse_service(&setup.relay.service_connection_string)
            .expect("service string"),
        setup.relay.tls(),
    );
    let invitation = service
        .create_resumable_stream(
            "MyDevice",
            "TestStream",
            &framing::StreamOptions::default(),
            framing::topics::ResumeAsk::Continue,
        )
        .await
        .expect("the relay creates the stream");
    assert!(invitation.is_accepted && invitation.resume);
    let mut websocket = framing::connect_stream_with(
        &invitation.url,
        &invitation.authorization_token,
        true,
        &setup.relay.tls(),
    )
    .await
    .expect("the stream opens");
    let forged = match SessionKeys::generate().resume(0) {
        Control::Resume {
            nonce,
            proof,
            received,
            ..
        } => Control::Resume {
            session: session_id.clone(),
            nonce,
            proof,
            received,
        },
        other => panic!("a resume: {other:?}"),
    };
    websocket.send(forged.to_message()).await.expect("send");
    let answer = framing::session::read_control(&mut websocket).await;
    assert_eq!(answer, Ok(Control::Refused));
    let log = wait_for_log(
        &setup.device_proxy,
        "proof does not check",
        Duration::from_secs(5),
    )
    .await;
    assert!(log.contains(&session_id));
    assert_eq!(echo_line(&mut tunnel, "still here").await, "still here");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_replay_buffer_stops_the_sender_and_nothing_is_lost() {
    let setup = echo_tunnel(&["--resume-buffer", "64"], &["--resume-buffer", "64"]).await;
    let mut tunnel = connect_tunnel(setup.local_port).await;
    assert_eq!(echo_line(&mut tunnel, "ready").await, "ready");
    let (mut reader, mut writer) = tunnel.into_inner().into_split();
    let (directory, address) = kill_relay(setup.relay);
    // Far more than the replay buffer and the socket buffers hold.
    let size = 24 * 1024 * 1024;
    let data: Vec<u8> = (0..size).map(|index| (index % 251) as u8).collect();
    let expected = sha256_hex(&data);
    let writing = tokio::spawn(async move {
        writer
            .write_all(&data)
            .await
            .expect("all written, eventually");
        writer
    });
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        !writing.is_finished(),
        "24 MiB were taken while the relay was away: the sender did not stop"
    );
    let _relay = start_relay_again(directory, &address).await;
    let mut echoed = vec![0u8; size];
    let started = Instant::now();
    let read = tokio::time::timeout(Duration::from_secs(120), reader.read_exact(&mut echoed)).await;
    if !matches!(read, Ok(Ok(_))) {
        panic!(
            "the echo did not all come back ({read:?} after {:?})\nservice-proxy log:\n{}\ndevice-proxy log:\n{}",
            started.elapsed(),
            setup.service_proxy.log(),
            setup.device_proxy.log()
        );
    }
    assert_eq!(
        sha256_hex(&echoed),
        expected,
        "bytes were lost or reordered"
    );
    let _writer = writing.await.expect("writer");
}
