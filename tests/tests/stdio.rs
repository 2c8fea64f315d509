//! Reaching devices by name: `service-proxy --stdio` as OpenSSH's
//! ProxyCommand (ssh, scp, sftp, rsync through a real sshd on the "device"),
//! its failures as one line on stderr, and `--map`, one service-proxy
//! serving several devices on their own ports at once. Real relay, real
//! device-proxies, TLS on every relay leg.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use devstreams_tests::{
    binary, require_rsync, require_sshd, sha256_hex, start_device_proxy, start_echo_server,
    wait_until_device_connected, Process, Relay, Sshd,
};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::Command;

/// A generous bound for one ssh/scp/sftp/rsync run on a loaded machine.
const CLIENT_DEADLINE: Duration = Duration::from_secs(120);

/// A relay and device `kiosk-17` whose device-proxy exposes a real sshd.
struct DeviceWithSshd {
    sshd: Sshd,
    relay: Relay,
    _device_proxy: Process,
}

async fn device_with_sshd() -> DeviceWithSshd {
    let sshd = Sshd::start().await;
    let relay = Relay::start(&[]).await;
    let device_connection_string = relay.add_device("kiosk-17").await;
    let device_proxy = start_device_proxy(&relay, &device_connection_string, sshd.port, &[]).await;
    wait_until_device_connected(&relay, "kiosk-17").await;
    DeviceWithSshd {
        sshd,
        relay,
        _device_proxy: device_proxy,
    }
}

/// `'…/service-proxy' --stdio HOST_TOKEN EXTRA`, as a ProxyCommand line.
fn proxy_command(host_token: &str, extra: &str) -> String {
    format!(
        "'{}' --stdio {host_token} {extra}",
        binary("service-proxy").display()
    )
}

impl DeviceWithSshd {
    /// An OpenSSH client program (ssh, scp, sftp) that reaches hosts through
    /// `service-proxy --stdio`, with the connection string and the relay's
    /// CA in the environment, as a user's shell would have them.
    fn openssh(&self, program: &str, proxy_command: &str) -> Command {
        let mut command = Command::new(program);
        command
            .args(self.sshd.client_options())
            .arg("-o")
            .arg(format!("ProxyCommand={proxy_command}"));
        self.with_relay_environment(&mut command);
        command
    }

    fn with_relay_environment(&self, command: &mut Command) {
        command
            .env(
                "SERVICE_CONNECTION_STRING",
                &self.relay.service_connection_string,
            )
            .env("DEVSTREAMS_CA_CERT", self.relay.ca_text())
            .env_remove("IOTHUB_CONNECTION_STRING")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .kill_on_drop(true);
    }

    /// `user@host` for this sshd's user.
    fn login(&self, host: &str) -> String {
        format!("{}@{host}", self.sshd.user)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.sshd.directory.path().join(name)
    }

    /// An ssh_config with one `Host *.devices` entry that reaches devices by
    /// name through `--stdio HOST_TOKEN --strip-suffix .devices`. (ssh
    /// matches `Host` patterns with case, so `*.DEVICES` is listed too.)
    fn ssh_config(&self, host_token: &str) -> PathBuf {
        let config = format!(
            "Host *.devices *.DEVICES\n    User {user}\n    IdentityFile {key}\n    StrictHostKeyChecking no\n    \
             UserKnownHostsFile /dev/null\n    BatchMode yes\n    LogLevel ERROR\n    \
             ProxyCommand {proxy}\n",
            user = self.sshd.user,
            key = self.path("client_key").display(),
            proxy = proxy_command(host_token, "--strip-suffix .devices"),
        );
        let path = self.path(&format!(
            "ssh_config_{}",
            host_token.trim_start_matches('%')
        ));
        std::fs::write(&path, config).expect("write ssh_config");
        path
    }
}

async fn finish(command: &mut Command, what: &str) -> std::process::Output {
    tokio::time::timeout(CLIENT_DEADLINE, command.output())
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {CLIENT_DEADLINE:?}"))
        .unwrap_or_else(|error| panic!("{what} cannot run: {error}"))
}

fn assert_succeeded(output: &std::process::Output, what: &str) {
    assert!(
        output.status.success(),
        "{what} failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Incompressible test data (xorshift), so nothing on the way can shrink it.
fn random_bytes(size: usize, seed: u64) -> Vec<u8> {
    let mut data = vec![0u8; size];
    let mut state = 0x9e37_79b9_7f4a_7c15u64 ^ seed;
    for chunk in data.chunks_mut(8) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
    }
    data
}

fn file_sha256(path: &Path) -> String {
    sha256_hex(
        &std::fs::read(path)
            .unwrap_or_else(|error| panic!("cannot read {}: {error}", path.display())),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_runs_a_command_on_a_device_reached_by_name() {
    if !require_sshd() {
        return;
    }
    let device = device_with_sshd().await;
    let output = finish(
        device
            .openssh("ssh", &proxy_command("%n", ""))
            .arg(device.login("kiosk-17"))
            .arg("echo ok"),
        "ssh",
    )
    .await;
    assert_succeeded(&output, "ssh");
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "ok");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !stderr.contains("service-proxy"),
        "a clean session prints nothing from the proxy: {stderr}"
    );
    // ssh hangs up on its ProxyCommand as it exits; the stream still ends
    // cleanly, so the device does not hold the session open for a resume.
    let log = device
        ._device_proxy
        .wait_for_log("session closed", Duration::from_secs(10))
        .await;
    assert!(log.contains("completed"), "{log}");
    // With `%n %p`, ssh's port is the port asked of the device.
    let output = finish(
        device
            .openssh("ssh", &proxy_command("%n %p", ""))
            .arg("-p")
            .arg(device.sshd.port.to_string())
            .arg(device.login("kiosk-17"))
            .arg("echo port"),
        "ssh -p",
    )
    .await;
    assert_succeeded(&output, "ssh -p");
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "port");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scp_copies_mebibytes_both_ways_unchanged() {
    if !require_sshd() {
        return;
    }
    let device = device_with_sshd().await;
    let upload = device.path("upload.bin");
    std::fs::write(&upload, random_bytes(5 * 1024 * 1024 + 123, 1)).expect("write the upload");
    let on_device = device.path("on-device.bin");
    let downloaded = device.path("downloaded.bin");
    let output = finish(
        device
            .openssh("scp", &proxy_command("%n", ""))
            .arg(&upload)
            .arg(format!(
                "{}:{}",
                device.login("kiosk-17"),
                on_device.display()
            )),
        "scp upload",
    )
    .await;
    assert_succeeded(&output, "scp upload");
    assert_eq!(file_sha256(&on_device), file_sha256(&upload), "upload");
    let output = finish(
        device
            .openssh("scp", &proxy_command("%n", ""))
            .arg(format!(
                "{}:{}",
                device.login("kiosk-17"),
                on_device.display()
            ))
            .arg(&downloaded),
        "scp download",
    )
    .await;
    assert_succeeded(&output, "scp download");
    assert_eq!(file_sha256(&downloaded), file_sha256(&upload), "download");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sftp_puts_and_gets_in_batch_mode() {
    if !require_sshd() {
        return;
    }
    let device = device_with_sshd().await;
    let upload = device.path("sftp-upload.bin");
    std::fs::write(&upload, random_bytes(3 * 1024 * 1024 + 7, 2)).expect("write the upload");
    let on_device = device.path("sftp-on-device.bin");
    let downloaded = device.path("sftp-downloaded.bin");
    let batch = device.path("sftp-batch");
    std::fs::write(
        &batch,
        format!(
            "put {} {}\nget {} {}\n",
            upload.display(),
            on_device.display(),
            on_device.display(),
            downloaded.display()
        ),
    )
    .expect("write the batch file");
    let output = finish(
        device
            .openssh("sftp", &proxy_command("%n", ""))
            .arg("-b")
            .arg(&batch)
            .arg(device.login("kiosk-17")),
        "sftp",
    )
    .await;
    assert_succeeded(&output, "sftp");
    assert_eq!(file_sha256(&on_device), file_sha256(&upload), "put");
    assert_eq!(file_sha256(&downloaded), file_sha256(&upload), "get");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rsync_over_ssh_copies_a_tree_through_a_host_pattern() {
    if !require_sshd() || !require_rsync() {
        return;
    }
    let device = device_with_sshd().await;
    let source = device.path("tree");
    std::fs::create_dir_all(source.join("nested")).expect("source tree");
    for (index, name) in ["a.bin", "b.bin", "nested/c.bin"].iter().enumerate() {
        std::fs::write(
            source.join(name),
            random_bytes(700 * 1024 + index, index as u64),
        )
        .expect("source file");
    }
    let destination = device.path("tree-copy");
    let config = device.ssh_config("%n");
    let mut rsync = Command::new("rsync");
    rsync
        .arg("-a")
        .arg("-e")
        .arg(format!("ssh -F {}", config.display()))
        .arg(format!("{}/", source.display()))
        .arg(format!("kiosk-17.devices:{}/", destination.display()));
    device.with_relay_environment(&mut rsync);
    let output = finish(&mut rsync, "rsync").await;
    assert_succeeded(&output, "rsync");
    for name in ["a.bin", "b.bin", "nested/c.bin"] {
        assert_eq!(
            file_sha256(&destination.join(name)),
            file_sha256(&source.join(name)),
            "{name}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strip_suffix_reaches_the_device_with_percent_n_and_percent_h() {
    if !require_sshd() {
        return;
    }
    let device = device_with_sshd().await;
    for (token, host) in [("%n", "kiosk-17.devices"), ("%h", "kiosk-17.DEVICES")] {
        let config = device.ssh_config(token);
        let mut ssh = Command::new("ssh");
        ssh.arg("-F").arg(&config).arg(host).arg("echo by-name");
        device.with_relay_environment(&mut ssh);
        let output = finish(&mut ssh, host).await;
        assert_succeeded(&output, &format!("ssh {host} with {token}"));
        assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "by-name");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_device_fails_ssh_within_seconds_with_the_reason_on_stderr() {
    if !require_sshd() {
        return;
    }
    let device = device_with_sshd().await;
    device.relay.add_device("offline-1").await;
    let started = Instant::now();
    let output = finish(
        device
            .openssh("ssh", &proxy_command("%n", "--connect-timeout 2"))
            .arg(device.login("offline-1"))
            .arg("echo never"),
        "ssh to an offline device",
    )
    .await;
    let elapsed = started.elapsed();
    assert!(
        !output.status.success(),
        "ssh succeeded to an offline device"
    );
    assert!(
        elapsed < Duration::from_secs(15),
        "ssh took {elapsed:?} to fail"
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    let reason = stderr
        .lines()
        .find(|line| line.starts_with("service-proxy: error: "))
        .unwrap_or_else(|| panic!("no service-proxy error line on stderr: {stderr}"));
    assert!(
        reason.contains("offline-1") && reason.contains("not connected"),
        "{reason}"
    );
    assert_eq!(
        stderr.matches("service-proxy").count(),
        1,
        "one line from the proxy: {stderr}"
    );
}

/// `service-proxy --stdio ARGUMENTS` with `stdin` as its standard input,
/// run to its end; its environment holds only what is given.
async fn run_stdio(
    arguments: &[&str],
    environment: &[(&str, &str)],
    stdin: Stdio,
) -> std::process::Output {
    let mut command = Command::new(binary("service-proxy"));
    command
        .arg("--stdio")
        .args(arguments)
        .env_clear()
        .envs(environment.iter().copied())
        .stdin(stdin)
        .kill_on_drop(true);
    finish(&mut command, "service-proxy --stdio").await
}

fn assert_one_error_line(output: &std::process::Output, expected: &[&str]) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "stderr: {stderr}");
    assert!(output.stdout.is_empty(), "stdout must stay clean");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line: {stderr}");
    assert!(lines[0].starts_with("service-proxy: error: "), "{stderr}");
    for needle in expected {
        assert!(lines[0].contains(needle), "{needle:?} not in {stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_failure_is_one_line_on_stderr_and_exit_one_never_a_hang() {
    let (echo_port, _echo) = start_echo_server().await;
    let relay = Relay::start(&[]).await;
    let connection_string = relay.add_device("echo-1").await;
    let _device_proxy = start_device_proxy(&relay, &connection_string, echo_port, &[]).await;
    wait_until_device_connected(&relay, "echo-1").await;
    relay.add_device("offline-2").await;
    let ca = relay.ca_text();
    let service = relay.service_connection_string.as_str();
    let environment = [
        ("SERVICE_CONNECTION_STRING", service),
        ("DEVSTREAMS_CA_CERT", ca.as_str()),
    ];

    let started = Instant::now();
    let output = run_stdio(
        &["offline-2", "--connect-timeout", "1"],
        &environment,
        Stdio::null(),
    )
    .await;
    assert_one_error_line(&output, &["offline-2", "not connected"]);
    assert!(started.elapsed() < Duration::from_secs(10));

    let output = run_stdio(&["echo-1", "1"], &environment, Stdio::null()).await;
    assert_one_error_line(&output, &["echo-1", "rejected by the device"]);

    let output = run_stdio(&["no-such-device"], &environment, Stdio::null()).await;
    assert_one_error_line(&output, &["no-such-device"]);

    let wrong_key = service
        .split(';')
        .map(|pair| match pair.split_once('=') {
            Some(("SharedAccessKey", _)) => "SharedAccessKey=d3Jvbmcta2V5LWJ5dGVz".to_string(),
            _ => pair.to_string(),
        })
        .collect::<Vec<_>>()
        .join(";");
    let output = run_stdio(
        &["echo-1"],
        &[
            ("SERVICE_CONNECTION_STRING", wrong_key.as_str()),
            ("DEVSTREAMS_CA_CERT", ca.as_str()),
        ],
        Stdio::null(),
    )
    .await;
    assert_one_error_line(&output, &["echo-1"]);
    assert!(
        !String::from_utf8_lossy(&output.stderr).contains("d3Jvbmcta2V5LWJ5dGVz"),
        "the key is never printed"
    );

    // A relay that is not there: a closed port.
    let closed_port = {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        listener.local_addr().expect("address").port()
    };
    let unreachable = format!(
        "HostName=127.0.0.1:{closed_port};SharedAccessKeyName=service;SharedAccessKey=c2VjcmV0"
    );
    let output = run_stdio(
        &["echo-1"],
        &[("IOTHUB_CONNECTION_STRING", unreachable.as_str())],
        Stdio::null(),
    )
    .await;
    assert_one_error_line(&output, &["cannot create a stream to echo-1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn end_of_input_is_a_half_close_and_the_device_closing_exits_zero() {
    let (echo_port, _echo) = start_echo_server().await;
    let relay = Relay::start(&[]).await;
    let connection_string = relay.add_device("echo-1").await;
    let _device_proxy = start_device_proxy(&relay, &connection_string, echo_port, &[]).await;
    wait_until_device_connected(&relay, "echo-1").await;
    let ca = relay.ca_text();
    let environment = [
        (
            "SERVICE_CONNECTION_STRING",
            relay.service_connection_string.as_str(),
        ),
        ("DEVSTREAMS_CA_CERT", ca.as_str()),
    ];
    let data = random_bytes(2 * 1024 * 1024 + 5, 3);
    let directory = tempfile::tempdir().expect("temp dir");

    // A file on stdin (read on a blocking thread), with and without
    // resumable sessions: everything comes back, then a clean exit.
    let input = directory.path().join("input.bin");
    std::fs::write(&input, &data).expect("write the input");
    for extra in [&[][..], &["--no-resume"][..]] {
        let mut arguments = vec!["echo-1"];
        arguments.extend_from_slice(extra);
        let file = std::fs::File::open(&input).expect("open the input");
        let output = run_stdio(&arguments, &environment, Stdio::from(file)).await;
        assert_eq!(
            output.status.code(),
            Some(0),
            "{extra:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert_eq!(output.stdout.len(), data.len(), "{extra:?}");
        assert!(output.stdout == data, "{extra:?}: the echo differs");
        assert!(output.stderr.is_empty(), "{extra:?}: quiet by default");
    }

    // A pipe on stdin (ssh's case): the answer keeps coming after our end
    // of input, then the device's half-close is an EOF on stdout.
    let mut child = Command::new(binary("service-proxy"))
        .args(["--stdio", "echo-1"])
        .env_clear()
        .envs(environment.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("service-proxy starts");
    let mut stdin = child.stdin.take().expect("piped stdin");
    let mut stdout = child.stdout.take().expect("piped stdout");
    let writer = {
        let data = data.clone();
        async move {
            stdin.write_all(&data).await.expect("write to stdin");
            drop(stdin);
        }
    };
    let reader = async {
        let mut received = Vec::new();
        stdout
            .read_to_end(&mut received)
            .await
            .expect("read stdout");
        received
    };
    let ((), received) =
        tokio::time::timeout(CLIENT_DEADLINE, async { tokio::join!(writer, reader) })
            .await
            .expect("the echo ends");
    assert!(received == data, "the echo through pipes differs");
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .expect("service-proxy exits once the stream ended")
        .expect("wait");
    assert_eq!(status.code(), Some(0));
}

/// Writes a line to ssh's stdin and reads the device's echo of it.
async fn echo_line(
    to_device: &mut tokio::process::ChildStdin,
    from_device: &mut BufReader<tokio::process::ChildStdout>,
    line: &str,
) -> String {
    to_device
        .write_all(format!("{line}\n").as_bytes())
        .await
        .expect("write to ssh");
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(90), from_device.read_line(&mut answer))
        .await
        .unwrap_or_else(|_| panic!("no echo of {line:?} within 90 s"))
        .expect("read from ssh");
    answer.trim_end().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ssh_session_through_stdio_survives_a_relay_restart() {
    if !require_sshd() {
        return;
    }
    let device = device_with_sshd().await;
    let mut ssh = device.openssh("ssh", &proxy_command("%n", ""));
    ssh.arg(device.login("kiosk-17"))
        .arg("cat")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = ssh.spawn().expect("ssh starts");
    let mut to_device = child.stdin.take().expect("piped stdin");
    let mut from_device = BufReader::new(child.stdout.take().expect("piped stdout"));
    assert_eq!(
        echo_line(&mut to_device, &mut from_device, "before").await,
        "before"
    );
    let DeviceWithSshd {
        sshd,
        relay,
        _device_proxy,
    } = device;
    let relay = relay.restart().await;
    assert_eq!(
        echo_line(&mut to_device, &mut from_device, "after the restart").await,
        "after the restart"
    );
    drop(to_device);
    let status = tokio::time::timeout(CLIENT_DEADLINE, child.wait())
        .await
        .expect("ssh ends once its input ended")
        .expect("wait");
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        let _ = pipe.read_to_string(&mut stderr).await;
    }
    assert!(status.success(), "ssh failed: {stderr}");
    drop((sshd, relay, _device_proxy));
}

/// Connects to a mapped port, checks the greeting names `device`, and
/// that a line comes back.
async fn talk(port: u16, device: &str, round: usize) {
    let stream = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect to a mapped port");
    let mut stream = BufReader::new(stream);
    let mut greeting = String::new();
    stream.read_line(&mut greeting).await.expect("greeting");
    assert_eq!(
        greeting.trim_end(),
        device,
        "port {port} reached the wrong device"
    );
    let line = format!("{device} round {round}\n");
    stream
        .get_mut()
        .write_all(line.as_bytes())
        .await
        .expect("write");
    let mut answer = String::new();
    stream.read_line(&mut answer).await.expect("echo");
    assert_eq!(answer, line);
}

/// A TCP server that greets each connection with `name`, then echoes.
async fn start_greeting_server(name: &'static str) -> (u16, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("address").port();
    let task = tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                if socket
                    .write_all(format!("{name}\n").as_bytes())
                    .await
                    .is_ok()
                {
                    let (mut reader, mut writer) = socket.split();
                    let _ = tokio::io::copy(&mut reader, &mut writer).await;
                }
            });
        }
    });
    (port, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn map_serves_two_devices_on_their_own_ports_at_once() {
    let (kiosk_port, _kiosk) = start_greeting_server("kiosk-17").await;
    let (pump_port, _pump) = start_greeting_server("pump-3").await;
    let relay = Relay::start(&[]).await;
    let kiosk_connection = relay.add_device("kiosk-17").await;
    let pump_connection = relay.add_device("pump-3").await;
    let _kiosk_proxy = start_device_proxy(&relay, &kiosk_connection, kiosk_port, &[]).await;
    let _pump_proxy = start_device_proxy(&relay, &pump_connection, pump_port, &[]).await;
    wait_until_device_connected(&relay, "kiosk-17").await;
    wait_until_device_connected(&relay, "pump-3").await;

    let kiosk_map = format!("0=kiosk-17:{kiosk_port}");
    let pump_map = format!("0=pump-3:{pump_port}");
    let ca = relay.ca_text();
    let mut service_proxy = Process::spawn(
        "service-proxy",
        &[
            &relay.service_connection_string,
            "--map",
            &kiosk_map,
            "--map",
            &pump_map,
            "--ca-cert",
            &ca,
        ],
        relay.directory.path(),
        &[],
    )
    .await;
    let mut ports = Vec::new();
    for expected in [
        format!("kiosk-17:{kiosk_port}"),
        format!("pump-3:{pump_port}"),
    ] {
        let line = service_proxy.wait_for_line("Listening on ").await;
        assert!(line.ends_with(&format!(" for {expected}")), "{line}");
        let port: u16 = line
            .split(' ')
            .next()
            .and_then(|address| address.rsplit(':').next())
            .and_then(|port| port.parse().ok())
            .unwrap_or_else(|| panic!("no port in {line:?}"));
        ports.push(port);
    }
    assert_ne!(ports[0], ports[1]);

    // Both at once: each port reaches its own device, several times over.
    let conversations = (0..3).flat_map(|round| {
        [
            talk(ports[0], "kiosk-17", round),
            talk(ports[1], "pump-3", round),
        ]
    });
    tokio::time::timeout(
        CLIENT_DEADLINE,
        futures_util::future::join_all(conversations),
    )
    .await
    .expect("all conversations finish");
}

#[tokio::test]
async fn bad_map_values_and_mixed_forms_are_usage_errors() {
    let connection = "HostName=127.0.0.1:1;SharedAccessKeyName=service;SharedAccessKey=c2VjcmV0";
    let cases: [(&[&str], &str); 6] = [
        (&["--map", "2201=kiosk-17"], "LOCAL_PORT=DEVICE:PORT"),
        (&["--map", "x=kiosk-17:22"], "LOCAL_PORT"),
        (
            &["--map", "2201=kiosk-17:22", "--map", "2201=pump-3:22"],
            "given twice",
        ),
        (&["MyDevice", "--map", "2201=kiosk-17:22"], "DEVICE_ID"),
        (
            &["--stdio", "kiosk-17", "--map", "2201=kiosk-17:22"],
            "--map",
        ),
        (
            &["--stdio", "kiosk-17", "22", "--target-port", "22"],
            "--target-port",
        ),
    ];
    for (arguments, expected) in cases {
        let output = Command::new(binary("service-proxy"))
            .arg(connection)
            .args(arguments)
            .env_clear()
            .stdin(Stdio::null())
            .output()
            .await
            .expect("service-proxy runs");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{arguments:?}: {stderr}");
        assert!(stderr.contains(expected), "{arguments:?}: {stderr}");
        assert!(output.stdout.is_empty(), "{arguments:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hangup_leaves_the_stream_a_grace_period_then_the_process_exits() {
    let (echo_port, _echo) = start_echo_server().await;
    let relay = Relay::start(&[]).await;
    let connection_string = relay.add_device("echo-1").await;
    let _device_proxy = start_device_proxy(&relay, &connection_string, echo_port, &[]).await;
    wait_until_device_connected(&relay, "echo-1").await;
    let ca = relay.ca_text();
    let mut child = Command::new(binary("service-proxy"))
        .args(["--stdio", "echo-1"])
        .env_clear()
        .env(
            "SERVICE_CONNECTION_STRING",
            &relay.service_connection_string,
        )
        .env("DEVSTREAMS_CA_CERT", &ca)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("service-proxy starts");
    // Input stays open and the echo never closes: only the grace period
    // can end this stream once the hangup came.
    let mut stdin = child.stdin.take().expect("piped stdin");
    let mut stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
    stdin.write_all(b"ping\n").await.expect("write");
    let mut line = String::new();
    tokio::time::timeout(Duration::from_secs(30), stdout.read_line(&mut line))
        .await
        .expect("the echo comes back")
        .expect("read");
    assert_eq!(line, "ping\n");
    let pid = child.id().expect("running").to_string();
    let status = std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .expect("kill runs");
    assert!(status.success());
    let hung_up = Instant::now();
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .expect("service-proxy exits after its grace period")
        .expect("wait");
    let waited = hung_up.elapsed();
    assert_eq!(status.code(), Some(0), "a hangup is not an error");
    assert!(
        waited >= Duration::from_secs(4),
        "exited after {waited:?}, before the 5 s grace period"
    );
    drop(stdin);
}
