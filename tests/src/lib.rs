//! Harness for the end-to-end tests: starts the real binaries (relay,
//! device-proxy, service-proxy, echo-sample) and a real sshd on loopback,
//! reads the addresses they print, and kills each child by its PID when the
//! test drops it. Nothing here stands in for a part under test.
//!
//! The binaries come from the same `target/` directory as the test, built by
//! `cargo test --workspace` (each binary package has its own CLI test, which
//! makes cargo build it before any test runs).

pub mod audit;
pub mod cluster;
pub mod iothub;
pub mod nats_accounts;
pub mod nginx;
pub mod proxies;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStdout, Command};

/// Upper bound for any process to print its ready line.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);

/// Path of a workspace binary next to the running test.
pub fn binary(name: &str) -> PathBuf {
    let executable = std::env::current_exe().expect("the test knows its own path");
    let profile_directory = executable
        .parent()
        .and_then(|deps| deps.parent())
        .expect("tests run from target/<profile>/deps");
    let path = profile_directory.join(name);
    assert!(
        path.exists(),
        "{} is missing: run the suite with `cargo test --workspace` so the binaries are built",
        path.display()
    );
    path
}

/// Proxy variables a child must not inherit from the test's environment:
/// a program under test reads them (as curl does), so each test passes
/// exactly the ones it means.
const PROXY_VARIABLES: [&str; 8] = [
    "https_proxy",
    "HTTPS_PROXY",
    "http_proxy",
    "HTTP_PROXY",
    "all_proxy",
    "ALL_PROXY",
    "no_proxy",
    "NO_PROXY",
];

/// A child process whose stderr goes to a log file; killed on drop.
pub struct Process {
    pub child: Child,
    pub log_path: PathBuf,
    stdout: Option<tokio::io::Lines<BufReader<ChildStdout>>>,
}

impl Process {
    pub async fn spawn(
        name: &str,
        arguments: &[&str],
        log_directory: &Path,
        environment: &[(&str, &str)],
    ) -> Process {
        let log_path = log_directory.join(format!("{name}-{}.log", unique_number()));
        let log = std::fs::File::create(&log_path).expect("log file in the test's temp dir");
        let mut command = Command::new(binary(name));
        command
            .args(arguments)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .env("RUST_LOG", "info")
            .kill_on_drop(true);
        for name in PROXY_VARIABLES {
            command.env_remove(name);
        }
        for (key, value) in environment {
            command.env(key, value);
        }
        let mut child = command
            .spawn()
            .unwrap_or_else(|error| panic!("cannot start {name}: {error}"));
        let stdout = child
            .stdout
            .take()
            .map(|stdout| BufReader::new(stdout).lines());
        Process {
            child,
            log_path,
            stdout,
        }
    }

    /// Reads stdout until a line starting with `prefix`; returns the rest.
    pub async fn wait_for_line(&mut self, prefix: &str) -> String {
        match self.try_wait_for_line(prefix).await {
            Some(rest) => rest,
            None => panic!("process never printed {prefix:?}; its log:\n{}", self.log()),
        }
    }

    /// Like [`Self::wait_for_line`], but `None` when the process ended (or
    /// stayed silent for [`STARTUP_TIMEOUT`]) first, for a caller that
    /// retries, e.g. on a port another test took.
    pub async fn try_wait_for_line(&mut self, prefix: &str) -> Option<String> {
        let lines = self.stdout.as_mut().expect("stdout is piped");
        let found = tokio::time::timeout(STARTUP_TIMEOUT, async {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(rest) = line.strip_prefix(prefix) {
                    return Some(rest.trim().to_string());
                }
            }
            None
        })
        .await;
        found.ok().flatten()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Waits until the process's log contains `needle` (it writes lines as
    /// events happen, so this waits on the event itself, not a guess at how
    /// long it takes); returns the whole log then.
    pub async fn wait_for_log(&self, needle: &str, timeout: Duration) -> String {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let log = self.log();
            if log.contains(needle) {
                return log;
            }
            if tokio::time::Instant::now() >= deadline {
                panic!("no {needle:?} in the log within {timeout:?}:\n{log}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id().expect("the process is running")
    }

    /// Sends a signal to this process only, by PID.
    pub fn signal(&self, signal: &str) {
        let status = std::process::Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status();
        assert!(
            status.map(|s| s.success()).unwrap_or(false),
            "kill -{signal} {} failed",
            self.pid()
        );
    }

    /// Waits for the process to exit; returns its exit code.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        match tokio::time::timeout(timeout, self.child.wait()).await {
            Ok(Ok(status)) => status.code(),
            _ => panic!(
                "process did not exit within {timeout:?}; its log:\n{}",
                self.log()
            ),
        }
    }
}

fn unique_number() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// A `relay serve` on a free loopback port with a fresh data dir.
pub struct Relay {
    pub process: Process,
    pub directory: tempfile::TempDir,
    pub address: String,
    /// The MQTT-over-TLS listener (`MQTT listening on …`), unless `--no-mqtt`.
    pub mqtt_address: Option<String>,
    /// The admin listener (`Admin listening on …`): `/metrics`, plain HTTP.
    pub admin_address: String,
    pub service_connection_string: String,
    /// The self-signed certificate; empty with `--no-tls`.
    pub ca_certificate: PathBuf,
}

impl Relay {
    pub async fn start(extra_arguments: &[&str]) -> Relay {
        let directory = tempfile::tempdir().expect("temp dir");
        Self::start_in(directory, extra_arguments).await
    }

    /// [`Self::start`] with environment variables (e.g. `RUST_LOG=debug`).
    pub async fn start_with_environment(
        extra_arguments: &[&str],
        environment: &[(&str, &str)],
    ) -> Relay {
        let directory = tempfile::tempdir().expect("temp dir");
        Self::start_in_with_environment(directory, extra_arguments, environment).await
    }

    /// Starts on an existing data dir and address (a restart).
    pub async fn start_in(directory: tempfile::TempDir, extra_arguments: &[&str]) -> Relay {
        Self::start_in_with_environment(directory, extra_arguments, &[]).await
    }

    async fn start_in_with_environment(
        directory: tempfile::TempDir,
        extra_arguments: &[&str],
        environment: &[(&str, &str)],
    ) -> Relay {
        let data_dir = directory.path().join("relay-data");
        let data_dir_text = data_dir.to_string_lossy().to_string();
        let mut arguments = vec!["serve", "--data-dir", &data_dir_text];
        if !extra_arguments.contains(&"--listen") {
            arguments.extend(["--listen", "127.0.0.1:0"]);
        }
        // Never the CLI default 0.0.0.0:8883: tests run side by side.
        let mqtt = !extra_arguments.contains(&"--no-mqtt");
        if mqtt && !extra_arguments.contains(&"--mqtt-listen") {
            arguments.extend(["--mqtt-listen", "127.0.0.1:0"]);
        }
        // /metrics is only on the admin listener; tests read it there.
        if !extra_arguments.contains(&"--admin-listen") {
            arguments.extend(["--admin-listen", "127.0.0.1:0"]);
        }
        arguments.extend_from_slice(extra_arguments);
        let mut process = Process::spawn("relay", &arguments, directory.path(), environment).await;
        let address = process
            .wait_for_line("Listening on ")
            .await
            .split(' ')
            .next()
            .unwrap_or_default()
            .to_string();
        let mqtt_address = match mqtt {
            true => Some(
                process
                    .wait_for_line("MQTT listening on ")
                    .await
                    .split(' ')
                    .next()
                    .unwrap_or_default()
                    .to_string(),
            ),
            false => None,
        };
        let admin_address = process
            .wait_for_line("Admin listening on ")
            .await
            .split(' ')
            .next()
            .unwrap_or_default()
            .to_string();
        let service_connection_string = process.wait_for_line("Service connection string: ").await;
        // Plain HTTP behind a TLS-terminating proxy has no certificate to print.
        let ca_certificate = match extra_arguments.contains(&"--no-tls") {
            true => PathBuf::new(),
            false => PathBuf::from(
                process
                    .wait_for_line("CA certificate for clients (--ca-cert): ")
                    .await,
            ),
        };
        Relay {
            process,
            directory,
            address,
            mqtt_address,
            admin_address,
            service_connection_string,
            ca_certificate,
        }
    }

    /// Stops this relay (by PID, if still running) and starts a new one on
    /// the same data dir and address, as an operator restarting it would.
    pub async fn restart(self) -> Relay {
        let Relay {
            mut process,
            directory,
            address,
            ..
        } = self;
        // Killed and reaped, so its port is free before the new one binds.
        let _ = process.child.kill().await;
        Relay::start_in(directory, &["--listen", &address]).await
    }

    pub fn data_dir(&self) -> PathBuf {
        self.directory.path().join("relay-data")
    }

    pub fn port(&self) -> u16 {
        self.address
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("address has a port")
    }

    /// Port of the MQTT-over-TLS listener; panics when it was turned off.
    pub fn mqtt_port(&self) -> u16 {
        let address = self
            .mqtt_address
            .as_deref()
            .expect("the relay was started with its MQTT listener");
        address
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("MQTT address has a port")
    }

    /// Runs a `relay` registry subcommand against this relay's data dir.
    pub async fn cli(&self, arguments: &[&str]) -> std::process::Output {
        let data_dir = self.data_dir();
        Command::new(binary("relay"))
            .args(arguments)
            .arg("--data-dir")
            .arg(&data_dir)
            .output()
            .await
            .expect("relay CLI runs")
    }

    /// `relay device add ID`: the device connection string.
    pub async fn add_device(&self, device_id: &str) -> String {
        let output = self.cli(&["device", "add", device_id]).await;
        assert!(
            output.status.success(),
            "relay device add failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout)
            .expect("UTF-8")
            .trim()
            .to_string()
    }

    pub fn tls(&self) -> std::sync::Arc<rustls::ClientConfig> {
        framing::tls::client_config(Some(&self.ca_certificate))
            .expect("the relay certificate loads")
    }

    pub fn ca_text(&self) -> String {
        self.ca_certificate.to_string_lossy().to_string()
    }
}

/// `device-proxy CONN HOST PORT --ca-cert …`.
pub async fn start_device_proxy(
    relay: &Relay,
    connection_string: &str,
    target_port: u16,
    extra: &[&str],
) -> Process {
    spawn_device_proxy(
        &relay.ca_text(),
        relay.directory.path(),
        connection_string,
        target_port,
        extra,
    )
    .await
}

/// `device-proxy CONN 127.0.0.1 PORT --ca-cert CA …`, logging into `log_directory`.
pub async fn spawn_device_proxy(
    ca: &str,
    log_directory: &Path,
    connection_string: &str,
    target_port: u16,
    extra: &[&str],
) -> Process {
    spawn_device_proxy_with_environment(
        ca,
        log_directory,
        connection_string,
        target_port,
        extra,
        &[],
    )
    .await
}

/// [`spawn_device_proxy`] with environment variables (e.g. `HTTPS_PROXY`).
pub async fn spawn_device_proxy_with_environment(
    ca: &str,
    log_directory: &Path,
    connection_string: &str,
    target_port: u16,
    extra: &[&str],
    environment: &[(&str, &str)],
) -> Process {
    let port = target_port.to_string();
    let mut arguments = vec![connection_string, "127.0.0.1", &port, "--ca-cert", ca];
    arguments.extend_from_slice(extra);
    Process::spawn("device-proxy", &arguments, log_directory, environment).await
}

/// `service-proxy CONN DEVICE 0 --ca-cert …`; returns it and its local port.
pub async fn start_service_proxy(relay: &Relay, device_id: &str, extra: &[&str]) -> (Process, u16) {
    spawn_service_proxy(
        &relay.ca_text(),
        relay.directory.path(),
        &relay.service_connection_string,
        device_id,
        extra,
    )
    .await
}

/// `service-proxy CONN DEVICE 0 --ca-cert CA …`, logging into
/// `log_directory`; returns it and the local port it printed.
pub async fn spawn_service_proxy(
    ca: &str,
    log_directory: &Path,
    service_connection_string: &str,
    device_id: &str,
    extra: &[&str],
) -> (Process, u16) {
    spawn_service_proxy_with_environment(
        ca,
        log_directory,
        service_connection_string,
        device_id,
        extra,
        &[],
    )
    .await
}

/// [`spawn_service_proxy`] with environment variables (e.g. `HTTPS_PROXY`).
pub async fn spawn_service_proxy_with_environment(
    ca: &str,
    log_directory: &Path,
    service_connection_string: &str,
    device_id: &str,
    extra: &[&str],
    environment: &[(&str, &str)],
) -> (Process, u16) {
    let mut arguments = vec![service_connection_string, device_id, "0", "--ca-cert", ca];
    arguments.extend_from_slice(extra);
    let mut process = Process::spawn("service-proxy", &arguments, log_directory, environment).await;
    let address = process.wait_for_line("Listening on ").await;
    let port = address
        .split(' ')
        .next()
        .and_then(|a| a.rsplit(':').next())
        .and_then(|p| p.parse().ok());
    (
        process,
        port.unwrap_or_else(|| panic!("service-proxy printed no port: {address:?}")),
    )
}

/// Waits until `device_id` has a control channel on the relay, by asking the
/// relay to create a stream with a short connect timeout until it stops
/// answering "not connected". Returns once the device answered once.
pub async fn wait_until_device_connected(relay: &Relay, device_id: &str) {
    let service = framing::ServiceClient::new(
        framing::ConnectionString::parse_service(&relay.service_connection_string)
            .expect("service string"),
        relay.tls(),
    );
    wait_until_connected(&service, device_id).await;
}

/// [`wait_until_device_connected`] through any service client (a relay
/// behind a proxy or balancer, reached by the proxy's address).
pub async fn wait_until_connected(service: &framing::ServiceClient, device_id: &str) {
    let options = framing::StreamOptions {
        connect_timeout: Duration::from_secs(1),
        response_timeout: Duration::from_secs(5),
        target: Some("1".into()),
        half_close: false,
    };
    for _ in 0..30 {
        match service
            .create_stream(device_id, "ReadinessProbe", &options)
            .await
        {
            Ok(_) => return,
            Err(framing::CreateStreamError::DeviceOffline(_)) => continue,
            Err(error) => panic!("readiness probe failed: {error}"),
        }
    }
    panic!("device {device_id} never connected");
}

/// An in-process TCP echo server on loopback; returns its port.
pub async fn start_echo_server() -> (u16, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind echo server");
    let port = listener.local_addr().expect("local address").port();
    let task = tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut reader, mut writer) = socket.split();
                let _ = tokio::io::copy(&mut reader, &mut writer).await;
            });
        }
    });
    (port, task)
}

/// A real OpenSSH server on a free loopback port, with throwaway keys.
pub struct Sshd {
    pub process: Child,
    pub port: u16,
    pub directory: tempfile::TempDir,
    pub user: String,
}

/// Where Debian's sshd lives; `.ci/run` installs openssh-server.
pub const SSHD: &str = "/usr/sbin/sshd";

/// Whether sshd tests can run; in CI they must (the caller asserts).
pub fn sshd_available() -> bool {
    Path::new(SSHD).exists() && which("ssh") && which("ssh-keygen")
}

fn which(program: &str) -> bool {
    std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {program}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Returns false (and says why) when the SSH tests must be skipped; panics
/// in CI, where a missing sshd is a broken setup, not a reason to skip.
pub fn require_sshd() -> bool {
    if sshd_available() {
        return true;
    }
    if std::env::var("CI").is_ok_and(|value| value == "true") {
        panic!(
            "sshd/ssh are missing in CI: .ci/run must install openssh-server and openssh-client"
        );
    }
    eprintln!(
        "SKIPPED: {SSHD} or ssh not installed (apt-get install openssh-server openssh-client)"
    );
    false
}

/// Returns false (and says why) when a test that runs `rsync -e ssh` must
/// be skipped; panics in CI, where `.ci/run` installs rsync.
pub fn require_rsync() -> bool {
    cluster::require_tool("rsync", "rsync")
}

/// A loopback port that was free a moment ago (for servers that must be
/// told their port; retry on a clash).
/// The connection string with its HostName's port replaced (to reach the
/// relay through a forwarder the test controls).
pub fn through_port(connection_string: &str, port: u16) -> String {
    connection_string
        .split(';')
        .map(|pair| match pair.split_once('=') {
            Some(("HostName", host)) => {
                let host = host.rsplit_once(':').map_or(host, |(host, _)| host);
                format!("HostName={host}:{port}")
            }
            _ => pair.to_string(),
        })
        .collect::<Vec<_>>()
        .join(";")
}

/// A loopback port that refuses connections for as long as the returned
/// socket lives: bound and never listening, so no other program is given
/// it meanwhile. A port merely found free ([`free_port`]) can be handed to
/// the next listener bound to port 0, the program under test's own among
/// them, which then answers where a refusal was expected.
pub fn refusing_port() -> (u16, tokio::net::TcpSocket) {
    let socket = tokio::net::TcpSocket::new_v4().expect("TCP socket");
    socket
        .bind(std::net::SocketAddr::from(([127, 0, 0, 1], 0)))
        .expect("bind a loopback port");
    let port = socket.local_addr().expect("bound address").port();
    (port, socket)
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

impl Sshd {
    pub async fn start() -> Sshd {
        let directory = tempfile::tempdir().expect("temp dir");
        let path = |name: &str| directory.path().join(name);
        for (key, kind) in [("host_key", "ed25519"), ("client_key", "ed25519")] {
            let status = std::process::Command::new("ssh-keygen")
                .args(["-q", "-t", kind, "-N", "", "-f"])
                .arg(path(key))
                .status()
                .expect("ssh-keygen runs");
            assert!(status.success());
        }
        std::fs::copy(path("client_key.pub"), path("authorized_keys")).expect("authorized_keys");
        let _ = std::fs::create_dir_all("/run/sshd");
        let user = std::env::var("USER")
            .ok()
            .filter(|u| !u.is_empty())
            .unwrap_or_else(|| {
                String::from_utf8(
                    std::process::Command::new("id")
                        .arg("-un")
                        .output()
                        .expect("id runs")
                        .stdout,
                )
                .expect("UTF-8")
                .trim()
                .to_string()
            });
        let mut last_log = String::new();
        for _attempt in 0..5 {
            let port = free_port();
            let config = format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nAuthorizedKeysFile {}\nPidFile none\nStrictModes no\nUsePAM no\n\
                 PasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\nPermitRootLogin prohibit-password\n\
                 MaxSessions 64\nMaxStartups 64\nLogLevel ERROR\nSubsystem sftp internal-sftp\n",
                path("host_key").display(),
                path("authorized_keys").display()
            );
            std::fs::write(path("sshd_config"), config).expect("sshd_config");
            let log = std::fs::File::create(path("sshd.log")).expect("sshd log");
            let mut process = Command::new(SSHD)
                .arg("-D")
                .arg("-e")
                .arg("-f")
                .arg(path("sshd_config"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::from(log))
                .kill_on_drop(true)
                .spawn()
                .expect("sshd starts");
            for _ in 0..100 {
                if tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .is_ok()
                {
                    return Sshd {
                        process,
                        port,
                        directory,
                        user,
                    };
                }
                if let Ok(Some(_)) = process.try_wait() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            last_log = std::fs::read_to_string(path("sshd.log")).unwrap_or_default();
            let _ = process.kill().await;
        }
        panic!("sshd did not start: {last_log}");
    }

    /// An `ssh` command to `127.0.0.1:port` (the tunnel's local end).
    pub fn ssh(&self, port: u16, remote_command: &str) -> Command {
        let mut command = Command::new("ssh");
        command
            .arg("-p")
            .arg(port.to_string())
            .args(self.client_options())
            .arg(format!("{}@127.0.0.1", self.user))
            .arg(remote_command)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        command
    }

    /// The options every OpenSSH client here (ssh, scp, sftp) needs to log
    /// in to this sshd without a prompt: its key, no host-key checks, batch
    /// mode.
    pub fn client_options(&self) -> Vec<String> {
        let key = self.directory.path().join("client_key");
        [
            "-i",
            &key.to_string_lossy(),
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "LogLevel=ERROR",
            "-o",
            "ConnectTimeout=20",
        ]
        .map(String::from)
        .to_vec()
    }
}

/// SHA-256 of bytes, hex.
pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Sends raw HTTP/1.1 over TLS (the request should say `Connection: close`)
/// and returns status, headers with names exactly as sent, and body; for
/// checking answers byte for byte.
pub async fn raw_https(relay: &Relay, request: &str) -> (u16, Vec<(String, String)>, String) {
    raw_https_to(relay.port(), &relay.tls(), request).await
}

/// [`raw_https`] to any TLS server on `localhost:port` (a proxy in front of
/// a relay), trusting what `tls` trusts.
pub async fn raw_https_to(
    port: u16,
    tls: &std::sync::Arc<rustls::ClientConfig>,
    request: &str,
) -> (u16, Vec<(String, String)>, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream =
        framing::transport::connect("localhost", port, Some(tls), Duration::from_secs(10))
            .await
            .expect("TLS connection to the relay");
    // A relay refusing an oversized request answers and closes before the
    // whole request is written; the answer is still there to read.
    let _ = stream.write_all(request.as_bytes()).await;
    let mut response = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(90), stream.read_to_end(&mut response)).await;
    parse_response(&response)
}

/// Sends raw HTTP/1.1 without TLS to `address` (`host:port`), e.g. the
/// relay's admin listener; the request should say `Connection: close`.
pub async fn raw_http(address: &str, request: &str) -> (u16, Vec<(String, String)>, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::net::TcpStream::connect(address),
    )
    .await
    .unwrap_or_else(|_| panic!("connecting to {address} timed out"))
    .unwrap_or_else(|error| panic!("cannot connect to {address}: {error}"));
    let _ = stream.write_all(request.as_bytes()).await;
    let mut response = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(90), stream.read_to_end(&mut response)).await;
    parse_response(&response)
}

/// Status, headers (names as sent) and body of a raw HTTP/1.1 answer.
fn parse_response(response: &[u8]) -> (u16, Vec<(String, String)>, String) {
    let text = String::from_utf8_lossy(response).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|line| line.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.to_string(), value.trim().to_string()))
        .collect();
    (status, headers, body.to_string())
}

/// Open file descriptors of a process.
pub fn open_file_descriptors(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|entries| entries.count())
        .unwrap_or(0)
}

/// Resident memory of a process, KiB.
pub fn resident_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|line| line.starts_with("VmRSS:"))
                .and_then(|line| line.split_whitespace().nth(1))
                .and_then(|kib| kib.parse().ok())
        })
        .unwrap_or(0)
}

/// One value from the relay's `/metrics` (on its admin listener).
pub async fn relay_metric(relay: &Relay, name: &str) -> u64 {
    let request = "GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
    let (status, _, body) = raw_http(&relay.admin_address, request).await;
    assert_eq!(status, 200, "metrics answer");
    body.lines()
        .find_map(|line| {
            line.strip_prefix(name)
                .and_then(|rest| rest.trim().parse().ok())
        })
        .unwrap_or_else(|| panic!("metric {name} missing:\n{body}"))
}

/// Connects to `127.0.0.1:port` (a service-proxy's local end) and checks
/// that `payload` comes back unchanged within 30 s; returns the connection.
pub async fn echo_round_trip(port: u16, payload: &[u8]) -> std::io::Result<tokio::net::TcpStream> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut client = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    client.write_all(payload).await?;
    let mut echoed = vec![0u8; payload.len()];
    tokio::time::timeout(Duration::from_secs(30), client.read_exact(&mut echoed))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no echo within 30 s"))??;
    assert_eq!(echoed, payload);
    Ok(client)
}

/// A TCP echo server on a given loopback port (to bring a target back).
pub async fn start_echo_server_on(port: u16) -> tokio::task::JoinHandle<()> {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .expect("bind echo server again");
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut reader, mut writer) = socket.split();
                let _ = tokio::io::copy(&mut reader, &mut writer).await;
            });
        }
    })
}

/// Runs `echo-sample service` once against `device_id` (an echo-sample
/// device) with `message`, and checks it succeeded and the message came back;
/// returns its stdout for further checks. `extra` goes before `--message`
/// (e.g. `--proxy URL`).
pub async fn echo_sample_service(
    connection_string: &str,
    device_id: &str,
    ca: &str,
    extra: &[&str],
    message: &str,
) -> String {
    let mut arguments = vec!["service", connection_string, device_id, "--ca-cert", ca];
    arguments.extend_from_slice(extra);
    arguments.extend_from_slice(&["--message", message]);
    let output = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(binary("echo-sample"))
            .args(&arguments)
            .output(),
    )
    .await
    .expect("echo-sample service finishes")
    .expect("echo-sample service runs");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success() && stdout.contains(&format!("Received stream data: {message}")),
        "stdout: {stdout}\nstderr: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}
