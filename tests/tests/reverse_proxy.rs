//! The relay behind a TLS-terminating reverse proxy (real nginx, with
//! `X-Forwarded-For`) and behind a TCP balancer (real HAProxy, with PROXY
//! protocol v2 on the main and the MQTT listener): streams work through
//! them, idle streams outlive nginx's default timeouts, and the relay's
//! logs and per-source limits see the real client, never the proxy.
//!
//! The proxies connect to the relay from an address of their own
//! (`proxy_bind 127.0.0.8`, HAProxy `source 127.0.0.7`) while every client
//! is on 127.0.0.1, so a log line or a limit that used the proxy's address
//! instead of the client's shows.

use std::time::Duration;

use devstreams_tests::cluster::{
    require_haproxy, with_host_name, Backend, ClusterCertificate, Haproxy, HaproxyOptions,
    MAIN_BACKEND, MQTT_BACKEND,
};
use devstreams_tests::iothub::{websocket_upgrade, CSdkDevice, C_SDK_KEEP_ALIVE};
use devstreams_tests::nginx::{require_nginx, Nginx, NginxOptions};
use devstreams_tests::{
    echo_sample_service, raw_http, raw_https, raw_https_to, require_sshd, spawn_device_proxy,
    spawn_service_proxy, start_echo_server, wait_until_connected, Process, Relay, Sshd,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The address nginx connects to the relay from (`proxy_bind`).
const NGINX_SOURCE: &str = "127.0.0.8";
/// The address HAProxy connects to the relay from (`source`).
const HAPROXY_SOURCE: &str = "127.0.0.7";
const ANSWER: Duration = Duration::from_secs(30);

/// A `relay --no-tls --trusted-proxy 127.0.0.8` with nginx in front of it,
/// terminating TLS with a certificate the clients trust.
struct BehindNginx {
    relay: Relay,
    nginx: Nginx,
    certificate: ClusterCertificate,
}

impl BehindNginx {
    async fn start(extra_relay_arguments: &[&str]) -> BehindNginx {
        let mut arguments = vec!["--no-tls", "--trusted-proxy", NGINX_SOURCE];
        arguments.extend_from_slice(extra_relay_arguments);
        let relay = Relay::start(&arguments).await;
        let certificate = ClusterCertificate::generate();
        let nginx = Nginx::start(&NginxOptions {
            upstream: relay.address.clone(),
            certificate: certificate.certificate.clone(),
            private_key: certificate.private_key.clone(),
            bind_address: Some(NGINX_SOURCE.to_string()),
        })
        .await;
        BehindNginx {
            relay,
            nginx,
            certificate,
        }
    }

    fn ca(&self) -> String {
        self.certificate.path_text()
    }

    fn service_connection_string(&self) -> String {
        with_host_name(
            &self.relay.service_connection_string,
            &self.nginx.host_name(),
        )
    }

    fn service_client(&self) -> framing::ServiceClient {
        framing::ServiceClient::new(
            framing::ConnectionString::parse_service(&self.service_connection_string())
                .expect("service string"),
            self.certificate.client_tls(),
        )
    }

    /// Registers a device; its connection string names nginx.
    async fn add_device(&self, device_id: &str) -> String {
        with_host_name(
            &self.relay.add_device(device_id).await,
            &self.nginx.host_name(),
        )
    }

    async fn device_proxy(&self, connection_string: &str, port: u16, extra: &[&str]) -> Process {
        spawn_device_proxy(
            &self.ca(),
            self.relay.directory.path(),
            connection_string,
            port,
            extra,
        )
        .await
    }

    async fn service_proxy(&self, device_id: &str, extra: &[&str]) -> (Process, u16) {
        spawn_service_proxy(
            &self.ca(),
            self.relay.directory.path(),
            &self.service_connection_string(),
            device_id,
            extra,
        )
        .await
    }
}

/// The relay's log lines that contain `needle`.
fn lines_with(log: &str, needle: &str) -> Vec<String> {
    log.lines()
        .filter(|line| line.contains(needle))
        .map(str::to_string)
        .collect()
}

/// Sends `message` through a local TCP connection and reads it back.
async fn echo_once(connection: &mut tokio::net::TcpStream, message: &[u8]) {
    connection.write_all(message).await.expect("write");
    let mut echoed = vec![0u8; message.len()];
    tokio::time::timeout(ANSWER, connection.read_exact(&mut echoed))
        .await
        .expect("the echo comes back in time")
        .expect("the connection is still open");
    assert_eq!(echoed, message);
}

/// Whether the server at `address` closes a fresh TCP connection at once
/// (a connection refused by the relay's limits) rather than waiting for
/// the client to speak.
async fn closed_at_once(address: &str) -> bool {
    let Ok(mut connection) = tokio::net::TcpStream::connect(address).await else {
        return true;
    };
    let mut byte = [0u8; 1];
    matches!(
        tokio::time::timeout(Duration::from_secs(2), connection.read(&mut byte)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

/// A stream creation with a wrong key, so the relay logs the refusal with
/// the client's address; `extra_headers` are sent as they are.
fn bad_creation_request(host: &str, extra_headers: &str) -> String {
    format!(
        "POST /twins/MyDevice/streams/TestStream?api-version=2021-04-12 HTTP/1.1\r\nHost: {host}\r\n\
         Authorization: SharedAccessSignature sr={host}&sig=AAAA&se=9999999999&skn=service\r\n\
         {extra_headers}Content-Length: 0\r\nConnection: close\r\n\r\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_and_the_echo_sample_work_through_nginx_and_the_relay_sees_the_forwarded_client() {
    if !require_nginx() || !require_sshd() {
        return;
    }
    let sshd = Sshd::start().await;
    let front = BehindNginx::start(&[]).await;
    let device = front.add_device("MyDevice").await;
    let _device_proxy = front.device_proxy(&device, sshd.port, &[]).await;
    wait_until_connected(&front.service_client(), "MyDevice").await;
    let (_service_proxy, local_port) = front.service_proxy("MyDevice", &[]).await;
    let output = tokio::time::timeout(
        Duration::from_secs(60),
        sshd.ssh(local_port, "echo ok").output(),
    )
    .await
    .expect("ssh finishes")
    .expect("ssh runs");
    assert!(
        output.status.success(),
        "ssh through nginx failed: {}\nrelay log:\n{}",
        String::from_utf8_lossy(&output.stderr),
        front.relay.process.log()
    );
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "ok");

    // The IoT Hub echo sample, both sides through nginx.
    let echo_device = front.add_device("EchoDevice").await;
    let _echo_device = Process::spawn(
        "echo-sample",
        &["device", &echo_device, "--ca-cert", &front.ca()],
        front.relay.directory.path(),
        &[],
    )
    .await;
    wait_until_connected(&front.service_client(), "EchoDevice").await;
    echo_sample_service(
        &front.service_connection_string(),
        "EchoDevice",
        &front.ca(),
        &[],
        "hello through nginx",
    )
    .await;

    // Every client is 127.0.0.1 (X-Forwarded-For); nginx is 127.0.0.8.
    let log = front.relay.process.log();
    let connected = lines_with(&log, "device connected");
    assert!(connected.len() >= 2, "{log}");
    assert!(
        connected
            .iter()
            .all(|line| line.contains("peer=127.0.0.1:0")),
        "{connected:#?}"
    );
    let requested = lines_with(&log, "stream requested");
    assert!(!requested.is_empty(), "{log}");
    assert!(
        requested
            .iter()
            .all(|line| line.contains("peer=127.0.0.1:0")),
        "{requested:#?}"
    );
    assert!(
        !log.contains(NGINX_SOURCE),
        "nginx's address in the log:\n{log}"
    );
    // The streams went through nginx: it logged their WebSocket upgrades
    // once they ended (the control channels are still open).
    let access = front.nginx.access_log();
    assert!(access.contains("GET /bridges/"), "{access}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_stream_through_nginx_survives_ninety_seconds_of_silence() {
    if !require_nginx() {
        return;
    }
    let (echo_port, _echo) = start_echo_server().await;
    let front = BehindNginx::start(&[]).await;
    let device = front.add_device("MyDevice").await;
    // Without resumable sessions a cut stream is a closed connection here,
    // not a transparent resume.
    let device_proxy = front
        .device_proxy(&device, echo_port, &["--no-resume"])
        .await;
    wait_until_connected(&front.service_client(), "MyDevice").await;
    let (service_proxy, local_port) = front.service_proxy("MyDevice", &["--no-resume"]).await;
    let mut connection = tokio::net::TcpStream::connect(("127.0.0.1", local_port))
        .await
        .expect("service-proxy accepts");
    echo_once(&mut connection, b"before the silence").await;
    // nginx's proxy_read_timeout is 60 s; the programs' pings (every 20 s)
    // and the device's MQTT keep-alive (30 s) must keep both sockets alive.
    tokio::time::sleep(Duration::from_secs(90)).await;
    echo_once(&mut connection, b"after ninety seconds of silence").await;
    let log = front.relay.process.log();
    assert_eq!(
        lines_with(&log, "device connected").len(),
        1,
        "the control channel was cut and re-dialed:\n{log}\ndevice-proxy:\n{}",
        device_proxy.log()
    );
    assert_eq!(
        lines_with(&log, "stream established").len(),
        1,
        "the stream was created again:\n{log}\nservice-proxy:\n{}",
        service_proxy.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_source_limits_and_failures_count_the_forwarded_client_not_nginx() {
    if !require_nginx() {
        return;
    }
    let (echo_port, _echo) = start_echo_server().await;
    let front = BehindNginx::start(&["--max-connections-per-source", "1"]).await;
    let device = front.add_device("MyDevice").await;
    let device_proxy = front.device_proxy(&device, echo_port, &[]).await;
    front
        .relay
        .process
        .wait_for_log("device connected", ANSWER)
        .await;

    // The control channel through nginx holds 127.0.0.1's only place, so
    // 127.0.0.1 coming directly is refused; were it charged to nginx's
    // 127.0.0.8, this would be served.
    assert!(
        closed_at_once(&front.relay.address).await,
        "a direct connection from 127.0.0.1 was served"
    );
    front
        .relay
        .process
        .wait_for_log("too many open connections from this address", ANSWER)
        .await;
    // A second WebSocket of the same client through nginx is refused too.
    let second = websocket_upgrade(
        front.nginx.port,
        &format!("wss://{}/$iothub/websocket", front.nginx.host_name()),
        &[("Sec-WebSocket-Protocol", "mqtt")],
        &front.certificate.client_tls(),
    )
    .await;
    assert_eq!(second.status, 429, "{:?}", second.headers);
    let log = front
        .relay
        .process
        .wait_for_log("WebSocket refused: too many open connections", ANSWER)
        .await;
    let refused = lines_with(&log, "too many open connections");
    assert!(
        refused.iter().all(|line| line.contains("peer=127.0.0.1")),
        "{refused:#?}"
    );

    // The client's own X-Forwarded-For is not believed: nginx appends the
    // address it saw, and that one is read.
    let (status, _, _) = raw_https_to(
        front.nginx.port,
        &front.certificate.client_tls(),
        &bad_creation_request(&front.nginx.host_name(), "X-Forwarded-For: 10.9.9.9\r\n"),
    )
    .await;
    assert_eq!(status, 401);
    let log = front
        .relay
        .process
        .wait_for_log("bad service credentials", ANSWER)
        .await;
    let refused = lines_with(&log, "bad service credentials");
    assert!(refused[0].contains("peer=127.0.0.1:0"), "{refused:#?}");
    assert!(!log.contains("10.9.9.9"), "{log}");

    // Once the device goes, its place is free for a direct connection.
    drop(device_proxy);
    let deadline = tokio::time::Instant::now() + ANSWER;
    loop {
        let request = "GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
        let (status, _, _) = raw_http(&front.relay.address, request).await;
        if status == 200 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the device's place was never released"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Failed logins through nginx are the client's: five are free, then
    // each adds half a second, and the same client coming directly waits.
    for _ in 0..7 {
        let (status, _, _) = raw_https_to(
            front.nginx.port,
            &front.certificate.client_tls(),
            &bad_creation_request(&front.nginx.host_name(), ""),
        )
        .await;
        assert_eq!(status, 401);
    }
    let started = tokio::time::Instant::now();
    let (status, _, _) = raw_http(
        &front.relay.address,
        &bad_creation_request(&front.relay.address, ""),
    )
    .await;
    assert_eq!(status, 401);
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "the direct attempt was not slowed down ({:?}): failures were charged to nginx",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_headers_from_a_client_that_is_not_a_trusted_proxy_are_ignored() {
    // The relay trusts 127.0.0.8 only; this client is 127.0.0.1.
    let relay = Relay::start(&["--trusted-proxy", NGINX_SOURCE]).await;
    let host = format!("localhost:{}", relay.port());
    let (status, _, _) = raw_https(
        &relay,
        &bad_creation_request(
            &host,
            "X-Forwarded-For: 10.9.9.9\r\nX-Forwarded-Proto: http\r\nX-Forwarded-Host: evil.example\r\n",
        ),
    )
    .await;
    assert_eq!(status, 401);
    let log = relay
        .process
        .wait_for_log("bad service credentials", ANSWER)
        .await;
    let refused = lines_with(&log, "bad service credentials");
    assert!(refused[0].contains("peer=127.0.0.1:"), "{refused:#?}");
    assert!(!log.contains("10.9.9.9"), "{log}");
}

/// A TLS relay trusting HAProxy, with HAProxy in TCP mode in front of both
/// listeners sending PROXY protocol v2 from its own address.
async fn behind_haproxy(extra_relay_arguments: &[&str]) -> (Relay, Haproxy) {
    let mut arguments = vec!["--trusted-proxy", HAPROXY_SOURCE];
    arguments.extend_from_slice(extra_relay_arguments);
    let relay = Relay::start(&arguments).await;
    let haproxy = Haproxy::start_with(
        &[Backend::for_relay("relay-1", &relay)],
        HaproxyOptions {
            send_proxy_v2: true,
            source_address: Some(HAPROXY_SOURCE.to_string()),
            ..HaproxyOptions::default()
        },
    )
    .await;
    for backend in [MAIN_BACKEND, MQTT_BACKEND] {
        haproxy
            .wait_for_server_state(backend, "relay-1", "UP", ANSWER)
            .await;
    }
    (relay, haproxy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_proxy_protocol_v2_names_the_client_on_the_main_and_mqtt_listeners() {
    if !require_haproxy() {
        return;
    }
    let (relay, haproxy) = behind_haproxy(&[]).await;
    let (echo_port, _echo) = start_echo_server().await;
    let device = with_host_name(&relay.add_device("MyDevice").await, &haproxy.host_name());
    let _device_proxy = spawn_device_proxy(
        &relay.ca_text(),
        relay.directory.path(),
        &device,
        echo_port,
        &[],
    )
    .await;
    let service_connection_string =
        with_host_name(&relay.service_connection_string, &haproxy.host_name());
    let service = framing::ServiceClient::new(
        framing::ConnectionString::parse_service(&service_connection_string)
            .expect("service string"),
        relay.tls(),
    );
    wait_until_connected(&service, "MyDevice").await;
    let (_service_proxy, local_port) = spawn_service_proxy(
        &relay.ca_text(),
        relay.directory.path(),
        &service_connection_string,
        "MyDevice",
        &[],
    )
    .await;
    let mut connection = tokio::net::TcpStream::connect(("127.0.0.1", local_port))
        .await
        .expect("service-proxy accepts");
    echo_once(&mut connection, b"through haproxy and back").await;

    // An IoT Hub SDK style device on the MQTT listener, through HAProxy too.
    let sdk_device = relay.add_device("SdkDevice").await;
    let _sdk = CSdkDevice::connect(
        haproxy.mqtt_port,
        &relay.tls(),
        &sdk_device,
        None,
        C_SDK_KEEP_ALIVE,
    )
    .await;
    let log = relay
        .process
        .wait_for_log("device_id=SdkDevice", ANSWER)
        .await;
    let connected = lines_with(&log, "device connected");
    assert_eq!(connected.len(), 2, "{log}");
    assert!(
        connected
            .iter()
            .all(|line| line.contains("peer=127.0.0.1:") && !line.contains("peer=127.0.0.1:0")),
        "the client's address and port from the PROXY header: {connected:#?}"
    );
    let requested = lines_with(&log, "stream requested");
    assert!(
        !requested.is_empty()
            && requested
                .iter()
                .all(|line| line.contains("peer=127.0.0.1:")),
        "{requested:#?}"
    );
    assert!(
        !log.contains(HAPROXY_SOURCE),
        "HAProxy's address in the log:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_clients_are_limited_by_their_own_address() {
    if !require_haproxy() {
        return;
    }
    let (relay, haproxy) = behind_haproxy(&["--max-connections-per-source", "1"]).await;
    let sdk_device = relay.add_device("SdkDevice").await;
    let sdk = CSdkDevice::connect(
        haproxy.mqtt_port,
        &relay.tls(),
        &sdk_device,
        None,
        C_SDK_KEEP_ALIVE,
    )
    .await;
    // The device's connection through HAProxy holds 127.0.0.1's only place:
    // 127.0.0.1 coming directly is refused on either listener. Charged to
    // HAProxy's 127.0.0.7 instead, these would be served.
    let main = relay.address.clone();
    let mqtt = relay.mqtt_address.clone().expect("the MQTT listener is on");
    assert!(
        closed_at_once(&main).await,
        "a direct connection was served"
    );
    assert!(
        closed_at_once(&mqtt).await,
        "a direct connection was served"
    );
    let log = relay
        .process
        .wait_for_log("too many open connections from this address", ANSWER)
        .await;
    let refused = lines_with(&log, "too many open connections from this address");
    assert!(
        refused.iter().all(|line| line.contains("peer=127.0.0.1:")),
        "{refused:#?}"
    );
    // HAProxy's health checks (PROXY LOCAL) are never charged or refused.
    assert!(!log.contains(HAPROXY_SOURCE), "{log}");
    drop(sdk);
    let deadline = tokio::time::Instant::now() + ANSWER;
    while closed_at_once(&main).await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the device's place was never released"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
