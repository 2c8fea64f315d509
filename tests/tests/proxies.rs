//! Devices and operators behind an HTTP or SOCKS5 proxy: device-proxy and
//! service-proxy reach the relay only through a real tinyproxy or
//! microsocks on loopback, for the control channel, the stream creation and
//! every stream WebSocket; the proxy's own log proves the traffic went
//! through it. Refused credentials give one clear line per attempt and the
//! device keeps re-dialing until the proxy accepts it. Proxy variables are
//! read as curl reads them. No proxy password ever reaches a log.

use std::time::Duration;

use base64::Engine;
use devstreams_tests::proxies::{require_microsocks, require_tinyproxy, ProxyProgram, ProxyServer};
use devstreams_tests::{
    echo_round_trip, echo_sample_service, refusing_port, spawn_device_proxy_with_environment,
    spawn_service_proxy_with_environment, start_device_proxy, start_echo_server,
    start_service_proxy, Process, Relay,
};

const CONNECTED: &str = "control channel connected";
const WAIT: Duration = Duration::from_secs(30);

fn available(program: ProxyProgram) -> bool {
    match program {
        ProxyProgram::Tinyproxy => require_tinyproxy(),
        ProxyProgram::Microsocks => require_microsocks(),
    }
}

/// Asserts that no form of the credentials is in `log`: the password
/// as typed and percent-encoded, and the Basic header value.
fn assert_no_secret(log: &str, user: &str, password: &str) {
    let encoded =
        percent_encoding::utf8_percent_encode(password, percent_encoding::NON_ALPHANUMERIC)
            .to_string();
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    for secret in [password, encoded.as_str(), basic.as_str()] {
        assert!(
            !log.contains(secret),
            "a proxy secret is in the log:\n{log}"
        );
    }
}

/// device-proxy and service-proxy both with `--proxy URL`; one echo round
/// trip; then the proxy must have carried the control channel, the stream
/// creation and both stream WebSockets.
async fn round_trip_through(program: ProxyProgram, credentials: Option<(&str, &str)>) {
    if !available(program) {
        return;
    }
    let relay = Relay::start(&[]).await;
    let (echo_port, _echo) = start_echo_server().await;
    let device_connection_string = relay.add_device("MyDevice").await;
    let proxy = ProxyServer::start(program, relay.port(), credentials).await;
    let url = proxy.url(credentials);
    let device_proxy = start_device_proxy(
        &relay,
        &device_connection_string,
        echo_port,
        &["--proxy", &url, "--max-backoff", "1"],
    )
    .await;
    device_proxy.wait_for_log(CONNECTED, WAIT).await;
    let control_channel = proxy.wait_for_tunnels(1, WAIT).await;
    assert_eq!(control_channel, 1, "the control channel is one tunnel");
    let (service_proxy, local_port) =
        start_service_proxy(&relay, "MyDevice", &["--proxy", &url]).await;
    let payload = b"through the proxy and back, unchanged";
    echo_round_trip(local_port, payload)
        .await
        .expect("echo through the tunnel");
    // Control channel, stream creation, the service's and the device's
    // stream WebSocket: four tunnels at least.
    proxy.wait_for_tunnels(4, WAIT).await;

    let route = format!("through {} (--proxy)", proxy.shown());
    for (name, process) in [
        ("device-proxy", &device_proxy),
        ("service-proxy", &service_proxy),
    ] {
        let log = process.log();
        assert!(
            log.contains(&route),
            "{name} does not say its route {route:?}:\n{log}"
        );
        if let Some((user, password)) = credentials {
            assert_no_secret(&log, user, password);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_and_service_proxies_reach_the_relay_through_an_http_proxy() {
    round_trip_through(ProxyProgram::Tinyproxy, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_and_service_proxies_reach_the_relay_through_an_http_proxy_with_basic_authentication(
) {
    round_trip_through(
        ProxyProgram::Tinyproxy,
        Some(("alice", "Tiny-Proxy_pass.7")),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_and_service_proxies_reach_the_relay_through_a_socks5_server() {
    round_trip_through(ProxyProgram::Microsocks, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_and_service_proxies_reach_the_relay_through_a_socks5_server_with_a_password() {
    // '@', ':' and '/' travel percent-encoded in the URL.
    round_trip_through(ProxyProgram::Microsocks, Some(("bob", "s0cks@p:ss/word"))).await;
}

/// The device's proxy password is wrong: each attempt fails with one error
/// line that names the proxy (without credentials) and says what to fix,
/// and the device keeps re-dialing; once the proxy accepts that password
/// the device connects and a stream works.
async fn wrong_credentials_then_fixed(program: ProxyProgram, wrong_password: &str) {
    if !available(program) {
        return;
    }
    let relay = Relay::start(&[]).await;
    let (echo_port, _echo) = start_echo_server().await;
    let device_connection_string = relay.add_device("MyDevice").await;
    let mut proxy =
        ProxyServer::start(program, relay.port(), Some(("carol", "the-right-one"))).await;
    let url = proxy.url(Some(("carol", wrong_password)));
    let device_proxy = start_device_proxy(
        &relay,
        &device_connection_string,
        echo_port,
        &["--proxy", &url, "--max-backoff", "1"],
    )
    .await;
    let refused = "refused the user name and password";
    let log = wait_for_count(&device_proxy, refused, 2).await;
    let line = log
        .lines()
        .find(|line| line.contains(refused))
        .expect("the refusal line");
    assert!(line.contains("ERROR"), "logged as an error: {line}");
    assert!(
        line.contains(&format!("proxy {} (--proxy)", proxy.shown())),
        "names the proxy: {line}"
    );
    assert!(
        line.contains("correct them in the proxy URL"),
        "says what to fix: {line}"
    );
    assert!(!log.contains(CONNECTED), "{log}");

    proxy.restart(Some(("carol", wrong_password))).await;
    device_proxy.wait_for_log(CONNECTED, WAIT).await;
    let (_service_proxy, local_port) = start_service_proxy(&relay, "MyDevice", &[]).await;
    echo_round_trip(local_port, b"fixed")
        .await
        .expect("echo once the proxy accepts the device");
    // The control channel and the device's stream WebSocket.
    proxy.wait_for_tunnels(2, WAIT).await;
    let log = device_proxy.log();
    assert_no_secret(&log, "carol", wrong_password);
    assert!(
        !log.contains("carol"),
        "the proxy user name is in the log:\n{log}"
    );
}

/// Waits until `needle` is in the log `count` times; returns the log.
async fn wait_for_count(process: &Process, needle: &str, count: usize) -> String {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let log = process.log();
        if log.matches(needle).count() >= count {
            return log;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("{needle:?} is not {count} times in the log within {WAIT:?}:\n{log}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_http_proxy_credentials_are_reported_and_retried_until_the_proxy_accepts_them() {
    wrong_credentials_then_fixed(ProxyProgram::Tinyproxy, "Wrong-Pass_1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_socks5_credentials_are_reported_and_retried_until_the_proxy_accepts_them() {
    wrong_credentials_then_fixed(ProxyProgram::Microsocks, "wr0ng:p@ss").await;
}

/// HTTPS_PROXY is followed; NO_PROXY listing the relay's host and
/// `--proxy none` both go direct although HTTPS_PROXY names a dead proxy;
/// without them, loopback is not exempt (as in curl) and the dead proxy
/// gives one line naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_proxy_is_followed_and_no_proxy_or_proxy_none_go_direct() {
    if !require_tinyproxy() {
        return;
    }
    let relay = Relay::start(&[]).await;
    let (echo_port, _echo) = start_echo_server().await;
    let device_connection_string = relay.add_device("MyDevice").await;
    let proxy = ProxyServer::start(ProxyProgram::Tinyproxy, relay.port(), None).await;
    let ca = relay.ca_text();
    let directory = relay.directory.path();
    let proxy_url = proxy.url(None);
    let device_proxy = spawn_device_proxy_with_environment(
        &ca,
        directory,
        &device_connection_string,
        echo_port,
        &["--max-backoff", "1"],
        &[("HTTPS_PROXY", proxy_url.as_str())],
    )
    .await;
    device_proxy.wait_for_log(CONNECTED, WAIT).await;
    let route = format!("through {} (HTTPS_PROXY)", proxy.shown());
    assert!(
        device_proxy.log().contains(&route),
        "{}",
        device_proxy.log()
    );
    proxy.wait_for_tunnels(1, WAIT).await;

    let (dead_port, _reserved) = refusing_port();
    let dead_proxy = format!("http://127.0.0.1:{dead_port}");
    let service = &relay.service_connection_string;
    let (exempt, exempt_port) = spawn_service_proxy_with_environment(
        &ca,
        directory,
        service,
        "MyDevice",
        &[],
        &[
            ("HTTPS_PROXY", dead_proxy.as_str()),
            ("NO_PROXY", "example.org, .example.net,LOCALHOST"),
        ],
    )
    .await;
    echo_round_trip(exempt_port, b"NO_PROXY lists the relay")
        .await
        .expect("echo with NO_PROXY listing the relay host");
    assert!(
        exempt.log().contains("direct (NO_PROXY lists the host)"),
        "{}",
        exempt.log()
    );

    let (_off, off_port) = spawn_service_proxy_with_environment(
        &ca,
        directory,
        service,
        "MyDevice",
        &["--proxy", "none"],
        &[("HTTPS_PROXY", dead_proxy.as_str())],
    )
    .await;
    echo_round_trip(off_port, b"--proxy none")
        .await
        .expect("echo with --proxy none");

    let (dead, dead_port) = spawn_service_proxy_with_environment(
        &ca,
        directory,
        service,
        "MyDevice",
        &[],
        &[("https_proxy", dead_proxy.as_str())],
    )
    .await;
    assert!(
        echo_round_trip(dead_port, b"loopback is not exempt")
            .await
            .is_err(),
        "a dead proxy gives no stream"
    );
    dead.wait_for_log(
        &format!("cannot reach the proxy {dead_proxy} (https_proxy)"),
        WAIT,
    )
    .await;
}

/// The echo sample's device and service (the framing client API as a
/// program uses it) through a SOCKS5 server given in `ALL_PROXY`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_sample_device_and_service_round_trip_through_a_socks5_server() {
    if !require_microsocks() {
        return;
    }
    let relay = Relay::start(&[]).await;
    let device_connection_string = relay.add_device("MyDevice").await;
    let proxy = ProxyServer::start(ProxyProgram::Microsocks, relay.port(), None).await;
    let proxy_url = proxy.url(None);
    let ca = relay.ca_text();
    let _device = Process::spawn(
        "echo-sample",
        &["device", &device_connection_string, "--ca-cert", &ca],
        relay.directory.path(),
        &[("ALL_PROXY", proxy_url.as_str())],
    )
    .await;
    proxy.wait_for_tunnels(1, WAIT).await;
    echo_sample_service(
        &relay.service_connection_string,
        "MyDevice",
        &ca,
        &["--proxy", &proxy_url],
        "echo through SOCKS5",
    )
    .await;
    // Control channel, stream creation, both stream WebSockets.
    proxy.wait_for_tunnels(4, WAIT).await;
}
