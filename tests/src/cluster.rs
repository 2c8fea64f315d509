//! Harness for the cluster tests: a real `nats-server` (JetStream on, its
//! own store directory), real HAProxy in TCP mode (TLS passthrough) as the
//! one address devices and services use, and relay nodes sharing one
//! certificate valid for every name the tests use.
//!
//! Every process is started on free loopback ports, waited for on the event
//! that says it is ready (its log line, or its port accepting), and killed by
//! its PID when the test drops it. A missing `nats-server` or `haproxy` is a
//! loud SKIPPED line on a developer's machine and a panic under `CI=true`,
//! where `.ci/run` installs both: a cluster test that passes without its
//! tools would be a defect.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};

use crate::{free_port, which, Process, Relay, STARTUP_TIMEOUT};

/// The NATS server binary (Debian package `nats-server`).
pub const NATS_SERVER: &str = "nats-server";
/// The HAProxy binary (Debian package `haproxy`).
pub const HAPROXY: &str = "haproxy";
/// Attempts at finding free ports before giving up: another test on the
/// machine may take a port between our probe and the child's bind.
const PORT_ATTEMPTS: usize = 5;
/// How long a stopped process may take to exit on SIGTERM before SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Returns false (and says why) when the NATS tests must be skipped; panics
/// in CI, where a missing `nats-server` is a broken setup.
pub fn require_nats_server() -> bool {
    require_tool(NATS_SERVER, "nats-server")
}

/// Returns false (and says why) when the HAProxy tests must be skipped;
/// panics in CI, where a missing `haproxy` is a broken setup.
pub fn require_haproxy() -> bool {
    require_tool(HAPROXY, "haproxy")
}

/// Where `program` is: on PATH, or in the sbin directories Debian installs
/// daemons to (not on a normal user's PATH).
pub fn tool_path(program: &str) -> Option<PathBuf> {
    if which(program) {
        return Some(PathBuf::from(program));
    }
    ["/usr/sbin", "/usr/local/sbin", "/sbin"]
        .iter()
        .map(|directory| Path::new(directory).join(program))
        .find(|path| path.is_file())
}

/// Returns false (and says why) when `program` is missing and the tests
/// that need it must be skipped; panics in CI, where `.ci/run` must have
/// installed `package`.
pub fn require_tool(program: &str, package: &str) -> bool {
    if tool_path(program).is_some() {
        return true;
    }
    if std::env::var("CI").is_ok_and(|value| value == "true") {
        panic!("{program} is missing in CI: .ci/run must install the {package} package");
    }
    eprintln!("SKIPPED: {program} is not installed (apt-get install {package})");
    false
}

/// Sends `signal` to one process by its PID.
fn send_signal(pid: u32, signal: &str) {
    let _ = std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status();
}

/// SIGTERM, then SIGKILL if the child has not exited within [`STOP_TIMEOUT`].
async fn stop_child(child: &mut Child) {
    if let Some(pid) = child.id() {
        send_signal(pid, "TERM");
        if tokio::time::timeout(STOP_TIMEOUT, child.wait())
            .await
            .is_ok()
        {
            return;
        }
    }
    let _ = child.kill().await;
}

fn read_from(path: &Path, offset: u64) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let start = (offset as usize).min(text.len());
    String::from_utf8_lossy(&text[start..]).to_string()
}

/// Which `nats-server` to run.
#[derive(Debug, Clone, Default)]
pub struct NatsOptions {
    /// `-js`: JetStream on (the cluster needs it; off to test the refusal).
    pub jetstream: bool,
    /// `--user/--pass`: clients must log in.
    pub credentials: Option<(String, String)>,
}

/// A real `nats-server` on a free loopback port with its own store
/// directory; restartable on the same port and store; killed on drop.
pub struct NatsServer {
    process: Option<Child>,
    port: u16,
    options: NatsOptions,
    pub directory: tempfile::TempDir,
    pub log_path: PathBuf,
}

impl NatsServer {
    /// `nats-server -js` (what the cluster needs).
    pub async fn start() -> NatsServer {
        Self::start_with(NatsOptions {
            jetstream: true,
            credentials: None,
        })
        .await
    }

    /// Without JetStream: a relay must refuse to join it.
    pub async fn start_without_jetstream() -> NatsServer {
        Self::start_with(NatsOptions::default()).await
    }

    /// JetStream on, and clients must log in with `user`/`password`.
    pub async fn start_with_credentials(user: &str, password: &str) -> NatsServer {
        Self::start_with(NatsOptions {
            jetstream: true,
            credentials: Some((user.to_string(), password.to_string())),
        })
        .await
    }

    pub async fn start_with(options: NatsOptions) -> NatsServer {
        let directory = tempfile::tempdir().expect("temp dir");
        let log_path = directory.path().join("nats-server.log");
        let mut server = NatsServer {
            process: None,
            port: 0,
            options,
            directory,
            log_path,
        };
        let mut last_log = String::new();
        for _attempt in 0..PORT_ATTEMPTS {
            server.port = free_port();
            match server.launch().await {
                Ok(()) => return server,
                Err(log) if log.contains("address already in use") => last_log = log,
                Err(log) => panic!("nats-server did not start; its log:\n{log}"),
            }
        }
        panic!("nats-server found no free port; its last log:\n{last_log}");
    }

    /// Starts the process on `self.port` and waits for "Server is ready";
    /// on failure returns what it logged.
    async fn launch(&mut self) -> Result<(), String> {
        let store = self.directory.path().join("store");
        let offset = std::fs::metadata(&self.log_path)
            .map(|m| m.len())
            .unwrap_or(0);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .expect("nats-server log file");
        let mut command =
            Command::new(tool_path(NATS_SERVER).unwrap_or_else(|| NATS_SERVER.into()));
        command
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-n", &format!("nats-test-{}", self.port)])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .kill_on_drop(true);
        if self.options.jetstream {
            command.arg("-js").arg("-sd").arg(&store);
        }
        if let Some((user, password)) = &self.options.credentials {
            command.args(["--user", user, "--pass", password]);
        }
        let mut child = command
            .spawn()
            .unwrap_or_else(|error| panic!("cannot start {NATS_SERVER}: {error}"));
        let deadline = tokio::time::Instant::now() + STARTUP_TIMEOUT;
        loop {
            let log = read_from(&self.log_path, offset);
            if log.contains("Server is ready") {
                self.process = Some(child);
                return Ok(());
            }
            if let Ok(Some(_)) = child.try_wait() {
                return Err(read_from(&self.log_path, offset));
            }
            if tokio::time::Instant::now() >= deadline {
                let _ = child.kill().await;
                return Err(format!("(not ready within {STARTUP_TIMEOUT:?})\n{log}"));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `nats://[user:password@]127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        match &self.options.credentials {
            Some((user, password)) => format!("nats://{user}:{password}@127.0.0.1:{}", self.port),
            None => self.url_without_credentials(),
        }
    }

    /// `nats://127.0.0.1:PORT`, even when the server wants a login.
    pub fn url_without_credentials(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The JetStream store directory (`-sd`).
    pub fn store_directory(&self) -> PathBuf {
        self.directory.path().join("store")
    }

    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().and_then(|child| child.id())
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.process.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Stops the server as an operator would (SIGTERM, SIGKILL after
    /// [`STOP_TIMEOUT`]); its port and store stay for [`Self::start_again`].
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.process.take() {
            stop_child(&mut child).await;
        }
    }

    /// Kills the server at once (SIGKILL), as a crash would.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.process.take() {
            let _ = child.kill().await;
        }
    }

    /// Starts a stopped server again on the same port and store.
    pub async fn start_again(&mut self) {
        assert!(self.process.is_none(), "nats-server is still running");
        // The port was ours a moment ago; only a test racing for it could
        // take it, so a few tries cover a slow release by the kernel.
        let mut last_log = String::new();
        for _attempt in 0..PORT_ATTEMPTS {
            match self.launch().await {
                Ok(()) => return,
                Err(log) => last_log = log,
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!(
            "nats-server did not start again on port {}:\n{last_log}",
            self.port
        );
    }

    /// Stop, then start again on the same port and store.
    pub async fn restart(&mut self) {
        self.stop().await;
        self.start_again().await;
    }

    /// A plain TCP connection to the server, as lines to read and a half
    /// to write (the server speaks first: INFO).
    async fn dial(
        &self,
    ) -> (
        tokio::io::Lines<BufReader<tokio::net::tcp::OwnedReadHalf>>,
        tokio::net::tcp::OwnedWriteHalf,
    ) {
        let stream = tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .expect("nats-server accepts TCP");
        let (reader, writer) = stream.into_split();
        (BufReader::new(reader).lines(), writer)
    }

    /// Publishes one message as a plain NATS client would (CONNECT, PUB,
    /// then PING; returns once the server's PONG says it took the PUB), so
    /// a test can speak on a subject the nodes listen to.
    pub async fn publish(&self, subject: &str, payload: &[u8]) {
        let exchange = async {
            let (mut lines, mut writer) = self.dial().await;
            lines.next_line().await.expect("nats-server sends INFO");
            let mut message = format!(
                "CONNECT {{\"verbose\":false,\"pedantic\":false}}\r\nPUB {subject} {}\r\n",
                payload.len()
            )
            .into_bytes();
            message.extend_from_slice(payload);
            message.extend_from_slice(b"\r\nPING\r\n");
            writer.write_all(&message).await.expect("PUB sent");
            loop {
                let line = lines
                    .next_line()
                    .await
                    .expect("nats-server answers")
                    .expect("nats-server keeps the connection open");
                assert!(
                    !line.starts_with("-ERR"),
                    "nats-server refused the PUB: {line}"
                );
                if line == "PONG" {
                    break;
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(10), exchange)
            .await
            .unwrap_or_else(|_| panic!("nats-server on {} did not take the PUB", self.port))
    }

    /// Speaks the NATS client protocol just far enough to check the server
    /// answers: reads INFO, sends CONNECT (with `credentials` if given) and
    /// PING, and returns the INFO JSON and the first answer line (`PONG`, or
    /// `-ERR …` when the login is refused).
    pub async fn probe(&self, credentials: Option<(&str, &str)>) -> (String, String) {
        let exchange = async {
            let (mut lines, mut writer) = self.dial().await;
            let info = lines.next_line().await.ok().flatten().unwrap_or_default();
            let info = info.strip_prefix("INFO ").unwrap_or(&info).to_string();
            let login = match credentials {
                Some((user, password)) => {
                    format!(r#","user":{user:?},"pass":{password:?}"#)
                }
                None => String::new(),
            };
            let connect =
                format!("CONNECT {{\"verbose\":false,\"pedantic\":false{login}}}\r\nPING\r\n");
            writer
                .write_all(connect.as_bytes())
                .await
                .expect("CONNECT sent");
            let answer = lines.next_line().await.ok().flatten().unwrap_or_default();
            (info, answer)
        };
        tokio::time::timeout(Duration::from_secs(10), exchange)
            .await
            .unwrap_or_else(|_| panic!("nats-server on {} did not answer", self.port))
    }
}

/// How HAProxy spreads connections over the nodes.
#[derive(Debug, Clone, Copy, Default)]
pub enum Balance {
    #[default]
    RoundRobin,
    LeastConnections,
}

/// HAProxy's configuration beyond the backends.
#[derive(Debug, Clone, Default)]
pub struct HaproxyOptions {
    pub balance: Balance,
    /// `send-proxy-v2` to every node (and to health checks): only for nodes
    /// that trust PROXY protocol from the balancer.
    pub send_proxy_v2: bool,
    /// The address HAProxy connects to the nodes from (`source`), e.g.
    /// `127.0.0.7`, so the nodes can tell it from clients on 127.0.0.1.
    pub source_address: Option<String>,
}

/// One node as HAProxy sees it: its main listener (REST, WSS, MQTT over
/// WebSocket) and its MQTT-over-TLS listener.
#[derive(Debug, Clone)]
pub struct Backend {
    /// HAProxy's server name for it (`relay-1`), used by [`Haproxy::server_state`].
    pub name: String,
    /// `127.0.0.1:PORT` of the main listener.
    pub main_address: String,
    /// `127.0.0.1:PORT` of the MQTT-over-TLS listener, if it has one.
    pub mqtt_address: Option<String>,
}

impl Backend {
    /// The backend for a started relay (named `name`).
    pub fn for_relay(name: &str, relay: &Relay) -> Backend {
        Backend {
            name: name.to_string(),
            main_address: relay.address.clone(),
            mqtt_address: relay.mqtt_address.clone(),
        }
    }
}

/// Real HAProxy in TCP mode in front of the nodes: one frontend for the
/// main port, one for MQTT over TLS (8883-style); TLS passes through to the
/// nodes untouched. Runs in the foreground; killed by PID on drop.
pub struct Haproxy {
    pub process: Child,
    pub directory: tempfile::TempDir,
    pub main_port: u16,
    pub mqtt_port: u16,
    pub log_path: PathBuf,
    socket_path: PathBuf,
}

/// The names of HAProxy's two backends (for [`Haproxy::server_state`]).
pub const MAIN_BACKEND: &str = "relays_main";
pub const MQTT_BACKEND: &str = "relays_mqtt";

impl Haproxy {
    pub async fn start(backends: &[Backend]) -> Haproxy {
        Self::start_with(backends, HaproxyOptions::default()).await
    }

    pub async fn start_with(backends: &[Backend], options: HaproxyOptions) -> Haproxy {
        let directory = tempfile::tempdir().expect("temp dir");
        let socket_path = directory.path().join("admin.sock");
        let config_path = directory.path().join("haproxy.cfg");
        let log_path = directory.path().join("haproxy.log");
        let mut last_log = String::new();
        for _attempt in 0..PORT_ATTEMPTS {
            let main_port = free_port();
            let mqtt_port = free_port();
            let config = haproxy_config(backends, &options, main_port, mqtt_port, &socket_path);
            std::fs::write(&config_path, config).expect("haproxy.cfg");
            let log = std::fs::File::create(&log_path).expect("haproxy log file");
            // -db: stay in the foreground, so the PID we hold is HAProxy's.
            let mut process = Command::new(tool_path(HAPROXY).unwrap_or_else(|| HAPROXY.into()))
                .arg("-db")
                .arg("-f")
                .arg(&config_path)
                .stdin(Stdio::null())
                .stdout(Stdio::from(
                    log.try_clone().expect("haproxy log file handle"),
                ))
                .stderr(Stdio::from(log))
                .kill_on_drop(true)
                .spawn()
                .unwrap_or_else(|error| panic!("cannot start {HAPROXY}: {error}"));
            let deadline = tokio::time::Instant::now() + STARTUP_TIMEOUT;
            let mut ready = false;
            while tokio::time::Instant::now() < deadline {
                if let Ok(Some(_)) = process.try_wait() {
                    break;
                }
                let main = tokio::net::TcpStream::connect(("127.0.0.1", main_port)).await;
                let mqtt = tokio::net::TcpStream::connect(("127.0.0.1", mqtt_port)).await;
                if main.is_ok() && mqtt.is_ok() && socket_path.exists() {
                    ready = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            if ready {
                return Haproxy {
                    process,
                    directory,
                    main_port,
                    mqtt_port,
                    log_path,
                    socket_path,
                };
            }
            let _ = process.kill().await;
            last_log = std::fs::read_to_string(&log_path).unwrap_or_default();
            if !last_log.contains("cannot bind") {
                break;
            }
        }
        panic!("haproxy did not start; its log:\n{last_log}");
    }

    /// `localhost:PORT` of the main frontend: the HostName for connection
    /// strings (the certificate names `localhost`).
    pub fn host_name(&self) -> String {
        format!("localhost:{}", self.main_port)
    }

    pub fn main_address(&self) -> String {
        format!("127.0.0.1:{}", self.main_port)
    }

    pub fn mqtt_address(&self) -> String {
        format!("127.0.0.1:{}", self.mqtt_port)
    }

    pub fn pid(&self) -> u32 {
        self.process.id().expect("haproxy is running")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Sends one command to HAProxy's admin socket; returns its answer.
    pub async fn admin_command(&self, command: &str) -> String {
        let exchange = async {
            let mut socket = tokio::net::UnixStream::connect(&self.socket_path)
                .await
                .expect("haproxy admin socket");
            socket
                .write_all(format!("{command}\n").as_bytes())
                .await
                .expect("command sent to haproxy");
            let mut answer = String::new();
            let _ = socket.read_to_string(&mut answer).await;
            answer
        };
        tokio::time::timeout(Duration::from_secs(10), exchange)
            .await
            .unwrap_or_else(|_| panic!("haproxy admin socket did not answer {command:?}"))
    }

    /// The health state HAProxy gives server `server` of `backend`
    /// ([`MAIN_BACKEND`] or [`MQTT_BACKEND`]): `UP`, `DOWN`, `MAINT`, …
    pub async fn server_state(&self, backend: &str, server: &str) -> Option<String> {
        // `show stat` is CSV: pxname, svname, … with status in column 18.
        let stat = self.admin_command("show stat").await;
        stat.lines().find_map(|line| {
            let fields: Vec<&str> = line.split(',').collect();
            (fields.first() == Some(&backend) && fields.get(1) == Some(&server))
                .then(|| fields.get(17).map(|status| status.to_string()))
                .flatten()
        })
    }

    /// Waits until HAProxy's health checks put `server` of `backend` in a
    /// state starting with `state` (`UP`, `DOWN`); panics at `timeout`.
    pub async fn wait_for_server_state(
        &self,
        backend: &str,
        server: &str,
        state: &str,
        timeout: Duration,
    ) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let current = self.server_state(backend, server).await;
            if current.as_deref().is_some_and(|s| s.starts_with(state)) {
                return;
            }
            if tokio::time::Instant::now() >= deadline {
                panic!("haproxy never saw {backend}/{server} {state} within {timeout:?} (now {current:?})");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// HAProxy's configuration for the tests.
fn haproxy_config(
    backends: &[Backend],
    options: &HaproxyOptions,
    main_port: u16,
    mqtt_port: u16,
    socket_path: &Path,
) -> String {
    let balance = match options.balance {
        Balance::RoundRobin => "roundrobin",
        Balance::LeastConnections => "leastconn",
    };
    // Health checks every 500 ms, down after 2 failures, up after 1 success:
    // a killed node leaves the rotation within about a second. The check is
    // a TCP connect only (TLS passes through, HAProxy cannot speak it).
    let mut proxy = match options.send_proxy_v2 {
        true => " send-proxy-v2 check-send-proxy".to_string(),
        false => String::new(),
    };
    if let Some(source) = &options.source_address {
        proxy.push_str(&format!(" source {source}"));
    }
    let servers = |mqtt: bool| -> String {
        backends
            .iter()
            .filter_map(|backend| {
                let address = match mqtt {
                    true => backend.mqtt_address.as_deref()?,
                    false => backend.main_address.as_str(),
                };
                Some(format!(
                    "    server {} {address} check inter 500ms fall 2 rise 1{proxy}\n",
                    backend.name
                ))
            })
            .collect()
    };
    format!(
        "global\n\
         \x20   stats socket {socket} mode 600 level admin\n\
         \x20   nbthread 1\n\
         \n\
         defaults\n\
         \x20   mode tcp\n\
         \x20   timeout connect 2s\n\
         \x20   timeout check 1s\n\
         \x20   # Long on purpose: an idle device control channel or an idle stream\n\
         \x20   # may send nothing for minutes (MQTT keep-alive up to 240 s in the C\n\
         \x20   # SDK); a short timeout would cut it at the balancer, not in the relay.\n\
         \x20   timeout client 1h\n\
         \x20   timeout server 1h\n\
         \x20   # A connection to a node that died but is not marked down yet goes\n\
         \x20   # to another node instead of failing.\n\
         \x20   retries 2\n\
         \x20   option redispatch\n\
         \n\
         frontend main\n\
         \x20   bind 127.0.0.1:{main_port}\n\
         \x20   default_backend {MAIN_BACKEND}\n\
         \n\
         frontend mqtt\n\
         \x20   bind 127.0.0.1:{mqtt_port}\n\
         \x20   default_backend {MQTT_BACKEND}\n\
         \n\
         backend {MAIN_BACKEND}\n\
         \x20   balance {balance}\n\
         {main_servers}\
         \n\
         backend {MQTT_BACKEND}\n\
         \x20   balance {balance}\n\
         {mqtt_servers}",
        socket = socket_path.display(),
        main_servers = servers(false),
        mqtt_servers = servers(true),
    )
}

/// One self-signed certificate valid for every name the cluster tests use
/// (`localhost`, `127.0.0.1`, `relay-1.localhost` … `relay-9.localhost`),
/// shared by all nodes; clients trust it as their CA (`--ca-cert`).
pub struct ClusterCertificate {
    pub directory: tempfile::TempDir,
    pub certificate: PathBuf,
    pub private_key: PathBuf,
}

impl ClusterCertificate {
    pub fn generate() -> ClusterCertificate {
        let mut names: Vec<String> = vec!["localhost".into(), "127.0.0.1".into()];
        names.extend((1..=9).map(|n| format!("relay-{n}.localhost")));
        let generated = rcgen::generate_simple_self_signed(names)
            .expect("rcgen makes a certificate for valid names");
        let directory = tempfile::tempdir().expect("temp dir");
        let certificate = directory.path().join("cluster-cert.pem");
        let private_key = directory.path().join("cluster-key.pem");
        std::fs::write(&certificate, generated.cert.pem()).expect("certificate written");
        std::fs::write(&private_key, generated.signing_key.serialize_pem()).expect("key written");
        ClusterCertificate {
            directory,
            certificate,
            private_key,
        }
    }

    /// A client TLS configuration that trusts this certificate.
    pub fn client_tls(&self) -> Arc<rustls::ClientConfig> {
        framing::tls::client_config(Some(&self.certificate)).expect("the certificate loads")
    }

    pub fn path_text(&self) -> String {
        self.certificate.to_string_lossy().to_string()
    }
}

/// A relay node: a [`Relay`] with the shared certificate on a port chosen
/// before it starts, so its `--node-url` can name that port.
pub struct ClusterNode {
    pub relay: Relay,
    /// `--node-name`.
    pub name: String,
    /// `--node-url`: `wss://localhost:PORT`.
    pub node_url: String,
    /// The NATS URL it joined (`--cluster`), if any.
    pub cluster_url: Option<String>,
    extra_arguments: Vec<String>,
}

/// Each node's audit log, in its directory ([`ClusterNode::audit_log`]).
const AUDIT_LOG: &str = "audit.log";

impl ClusterNode {
    /// This node's audit log (`--audit-log`, which every node is given).
    pub fn audit_log(&self) -> PathBuf {
        self.relay.directory.path().join(AUDIT_LOG)
    }

    /// Starts a node. With `cluster_url` it gets `--cluster URL --node-url
    /// wss://localhost:PORT --node-name NAME`; without, it is a single relay
    /// with the shared certificate (for testing the balancer alone).
    pub async fn start(
        cluster_url: Option<&str>,
        certificate: &ClusterCertificate,
        name: &str,
        extra_arguments: &[&str],
    ) -> ClusterNode {
        let directory = tempfile::tempdir().expect("temp dir");
        let extra_arguments: Vec<String> = extra_arguments.iter().map(|a| a.to_string()).collect();
        let mut last_log = String::new();
        let mut directory = Some(directory);
        for _attempt in 0..PORT_ATTEMPTS {
            let port = free_port();
            let owned = directory
                .take()
                .expect("the directory is back after a failed try");
            match Self::launch(
                owned,
                cluster_url,
                certificate,
                name,
                port,
                &extra_arguments,
            )
            .await
            {
                Ok(node) => return node,
                Err((returned, log)) => {
                    directory = Some(returned);
                    let port_taken = log.contains("Address already in use")
                        || log.contains("address already in use");
                    last_log = log;
                    if !port_taken {
                        break;
                    }
                }
            }
        }
        panic!("relay node {name} did not start; its log:\n{last_log}");
    }

    /// Stops this node by its PID (SIGKILL, as a crash) and starts it again
    /// on the same data dir, port, name and flags.
    pub async fn restart(self) -> ClusterNode {
        let ClusterNode {
            relay,
            name,
            cluster_url,
            extra_arguments,
            ..
        } = self;
        let port = relay.port();
        let ca = relay.ca_certificate.clone();
        let Relay {
            process, directory, ..
        } = relay;
        drop(process);
        let certificate = ClusterCertificateRef::from_ca(&ca);
        let mut directory = Some(directory);
        let mut last_log = String::new();
        for _attempt in 0..PORT_ATTEMPTS {
            let owned = directory
                .take()
                .expect("the directory is back after a failed try");
            match Self::launch_with_files(
                owned,
                cluster_url.as_deref(),
                &certificate,
                &name,
                port,
                &extra_arguments,
            )
            .await
            {
                Ok(node) => return node,
                Err((returned, log)) => {
                    directory = Some(returned);
                    last_log = log;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
        panic!("relay node {name} did not start again on port {port}:\n{last_log}");
    }

    async fn launch(
        directory: tempfile::TempDir,
        cluster_url: Option<&str>,
        certificate: &ClusterCertificate,
        name: &str,
        port: u16,
        extra_arguments: &[String],
    ) -> Result<ClusterNode, (tempfile::TempDir, String)> {
        let files = ClusterCertificateRef {
            certificate: certificate.certificate.clone(),
            private_key: certificate.private_key.clone(),
        };
        Self::launch_with_files(directory, cluster_url, &files, name, port, extra_arguments).await
    }

    async fn launch_with_files(
        directory: tempfile::TempDir,
        cluster_url: Option<&str>,
        certificate: &ClusterCertificateRef,
        name: &str,
        port: u16,
        extra_arguments: &[String],
    ) -> Result<ClusterNode, (tempfile::TempDir, String)> {
        let data_dir = directory.path().join("relay-data");
        let audit_log = directory.path().join(AUDIT_LOG);
        let listen = format!("127.0.0.1:{port}");
        let node_url = format!("wss://localhost:{port}");
        let mut arguments: Vec<String> = vec![
            "serve".into(),
            "--data-dir".into(),
            data_dir.to_string_lossy().to_string(),
            "--listen".into(),
            listen,
            "--mqtt-listen".into(),
            "127.0.0.1:0".into(),
            "--admin-listen".into(),
            "127.0.0.1:0".into(),
            "--tls-cert".into(),
            certificate.certificate.to_string_lossy().to_string(),
            "--tls-key".into(),
            certificate.private_key.to_string_lossy().to_string(),
            "--audit-log".into(),
            audit_log.to_string_lossy().to_string(),
        ];
        if let Some(url) = cluster_url {
            arguments.extend([
                "--cluster".into(),
                url.to_string(),
                "--node-url".into(),
                node_url.clone(),
                "--node-name".into(),
                name.to_string(),
            ]);
        }
        arguments.extend(extra_arguments.iter().cloned());
        let argument_slices: Vec<&str> = arguments.iter().map(String::as_str).collect();
        let mut process = Process::spawn("relay", &argument_slices, directory.path(), &[]).await;
        // The relay prints its ready lines in this order once it serves.
        let mut found = Vec::new();
        for prefix in [
            "Listening on ",
            "MQTT listening on ",
            "Admin listening on ",
            "Service connection string: ",
        ] {
            match process.try_wait_for_line(prefix).await {
                Some(rest) => found.push(rest),
                None => {
                    let log = process.log();
                    drop(process);
                    return Err((directory, log));
                }
            }
        }
        let first_word = |text: &str| text.split(' ').next().unwrap_or_default().to_string();
        let relay = Relay {
            address: first_word(&found[0]),
            mqtt_address: Some(first_word(&found[1])),
            admin_address: first_word(&found[2]),
            service_connection_string: found[3].clone(),
            ca_certificate: certificate.certificate.clone(),
            process,
            directory,
        };
        Ok(ClusterNode {
            relay,
            name: name.to_string(),
            node_url,
            cluster_url: cluster_url.map(str::to_string),
            extra_arguments: extra_arguments.to_vec(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.relay.process.pid()
    }

    /// Kills the node at once (SIGKILL by its PID), as a crash would.
    pub fn kill(&self) {
        self.relay.process.signal("KILL");
    }

    pub fn backend(&self) -> Backend {
        Backend::for_relay(&self.name, &self.relay)
    }
}

/// The certificate files a node is started with (kept by the node so a
/// restart does not need the [`ClusterCertificate`] again).
struct ClusterCertificateRef {
    certificate: PathBuf,
    private_key: PathBuf,
}

impl ClusterCertificateRef {
    /// The key sits next to the certificate, as [`ClusterCertificate`] writes them.
    fn from_ca(certificate: &Path) -> ClusterCertificateRef {
        let private_key = certificate.with_file_name("cluster-key.pem");
        ClusterCertificateRef {
            certificate: certificate.to_path_buf(),
            private_key,
        }
    }
}

/// Replaces the `HostName=` of a connection string, e.g. with the
/// balancer's `localhost:PORT`, so a device or service goes through it.
pub fn with_host_name(connection_string: &str, host_name: &str) -> String {
    connection_string
        .split(';')
        .map(|part| match part.split_once('=') {
            Some(("HostName", _)) => format!("HostName={host_name}"),
            _ => part.to_string(),
        })
        .collect::<Vec<_>>()
        .join(";")
}

/// NATS, N nodes joined to it with one certificate, and HAProxy in front:
/// the whole cluster a test needs, stopped by PID when dropped.
pub struct TestCluster {
    pub nats: NatsServer,
    pub certificate: ClusterCertificate,
    pub nodes: Vec<ClusterNode>,
    pub balancer: Haproxy,
}

impl TestCluster {
    /// Starts NATS with JetStream, `node_count` nodes named `relay-1` …
    /// (each with `extra_arguments`), and HAProxy in front of them all.
    pub async fn start(node_count: usize, extra_arguments: &[&str]) -> TestCluster {
        let nats = NatsServer::start().await;
        let certificate = ClusterCertificate::generate();
        let mut nodes = Vec::with_capacity(node_count);
        for index in 1..=node_count {
            let name = format!("relay-{index}");
            let url = nats.url();
            nodes.push(ClusterNode::start(Some(&url), &certificate, &name, extra_arguments).await);
        }
        let backends: Vec<Backend> = nodes.iter().map(ClusterNode::backend).collect();
        let balancer = Haproxy::start(&backends).await;
        TestCluster {
            nats,
            certificate,
            nodes,
            balancer,
        }
    }

    /// The service connection string through the balancer.
    pub fn service_connection_string(&self) -> String {
        with_host_name(
            &self.nodes[0].relay.service_connection_string,
            &self.balancer.host_name(),
        )
    }

    /// A service client that reaches the cluster through the balancer.
    pub fn service_client(&self) -> framing::ServiceClient {
        framing::ServiceClient::new(
            framing::ConnectionString::parse_service(&self.service_connection_string())
                .expect("service string"),
            self.certificate.client_tls(),
        )
    }

    /// Runs `relay ARGUMENTS --cluster URL` (a registry or cluster command
    /// from "any machine that reaches NATS").
    pub async fn cli(&self, arguments: &[&str]) -> std::process::Output {
        Command::new(crate::binary("relay"))
            .args(arguments)
            .arg("--cluster")
            .arg(self.nats.url())
            .output()
            .await
            .expect("relay CLI runs")
    }

    /// `relay device add ID --cluster URL`; the device connection string
    /// with the balancer as its HostName.
    pub async fn add_device(&self, device_id: &str) -> String {
        let output = self.cli(&["device", "add", device_id]).await;
        assert!(
            output.status.success(),
            "relay device add --cluster failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let connection_string = String::from_utf8_lossy(&output.stdout).trim().to_string();
        with_host_name(&connection_string, &self.balancer.host_name())
    }

    /// The node whose name is `name`.
    pub fn node(&self, name: &str) -> &ClusterNode {
        self.nodes
            .iter()
            .find(|node| node.name == name)
            .unwrap_or_else(|| panic!("no node named {name}"))
    }
}

/// A `device-proxy` for `connection_string` trusting the cluster certificate.
pub async fn start_cluster_device_proxy(
    certificate: &ClusterCertificate,
    log_directory: &Path,
    connection_string: &str,
    target_port: u16,
    extra: &[&str],
) -> Process {
    crate::spawn_device_proxy(
        &certificate.path_text(),
        log_directory,
        connection_string,
        target_port,
        extra,
    )
    .await
}

/// A `service-proxy` on a free local port; returns it and that port.
pub async fn start_cluster_service_proxy(
    certificate: &ClusterCertificate,
    log_directory: &Path,
    service_connection_string: &str,
    device_id: &str,
    extra: &[&str],
) -> (Process, u16) {
    crate::spawn_service_proxy(
        &certificate.path_text(),
        log_directory,
        service_connection_string,
        device_id,
        extra,
    )
    .await
}
