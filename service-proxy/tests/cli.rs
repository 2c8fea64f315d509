//! The real service-proxy binary: help, startup errors, the listening line,
//! a failed stream and a clean SIGTERM. No relay is needed: the relay's
//! address is a closed port.

use std::io::{BufRead, BufReader, Read};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

const BINARY: &str = env!("CARGO_BIN_EXE_service-proxy");
const DEADLINE: Duration = Duration::from_secs(20);
/// Well-formed, but names a relay that is not there.
const UNREACHABLE_RELAY: &str =
    "HostName=127.0.0.1:1;SharedAccessKeyName=service;SharedAccessKey=c2VjcmV0LWtleS1ieXRlcw==";

/// The binary with none of its environment variables inherited from the
/// developer's shell.
fn service_proxy() -> Command {
    let mut command = Command::new(BINARY);
    for variable in [
        "SERVICE_CONNECTION_STRING",
        "IOTHUB_CONNECTION_STRING",
        "STREAMING_TARGET_DEVICE",
        "PROXY_PORT",
        "DEVSTREAMS_CA_CERT",
        "RUST_LOG",
        "https_proxy",
        "HTTPS_PROXY",
        "http_proxy",
        "all_proxy",
        "ALL_PROXY",
        "no_proxy",
        "NO_PROXY",
    ] {
        command.env_remove(variable);
    }
    command.stdin(Stdio::null());
    command
}

fn run(command: &mut Command) -> (ExitStatus, String, String) {
    let output = command.output().expect("service-proxy binary runs");
    (
        output.status,
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn assert_one_line_failure(status: ExitStatus, stderr: &str, expected: &str) {
    assert_eq!(status.code(), Some(1), "stderr: {stderr}");
    assert_eq!(
        stderr.trim_end().lines().count(),
        1,
        "expected one line, got: {stderr}"
    );
    assert!(
        stderr.contains(expected),
        "expected {expected:?} in: {stderr}"
    );
}

/// Forwards a pipe's lines to a channel, so reads can have a deadline.
fn lines_of(pipe: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (sender, receiver) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(pipe).lines().map_while(Result::ok) {
            if sender.send(line).is_err() {
                break;
            }
        }
    });
    receiver
}

fn wait_with_deadline(child: &mut Child) -> ExitStatus {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("waiting for service-proxy") {
            return status;
        }
        if started.elapsed() > DEADLINE {
            let _ = child.kill();
            panic!("service-proxy did not exit within {DEADLINE:?}");
        }
        thread::sleep(Duration::from_millis(50));
    }
}

fn send_sigterm(child: &Child) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success(), "kill -TERM failed");
}

#[test]
fn help_shows_the_seed_example_and_the_environment_and_exits_zero() {
    let (status, stdout, _) = run(service_proxy().arg("--help"));
    assert!(status.success());
    assert!(stdout.contains("Examples:"), "{stdout}");
    assert!(stdout.contains("MyDevice 2222"), "{stdout}");
    for variable in [
        "SERVICE_CONNECTION_STRING",
        "IOTHUB_CONNECTION_STRING",
        "STREAMING_TARGET_DEVICE",
        "PROXY_PORT",
        "DEVSTREAMS_CA_CERT",
        "--proxy",
        "HTTPS_PROXY",
        "NO_PROXY",
    ] {
        assert!(
            stdout.contains(variable),
            "--help does not mention {variable}: {stdout}"
        );
    }
}

#[test]
fn help_never_shows_the_connection_string_from_the_environment() {
    let (status, stdout, _) = run(service_proxy()
        .arg("--help")
        .env("SERVICE_CONNECTION_STRING", UNREACHABLE_RELAY));
    assert!(status.success());
    assert!(!stdout.contains("c2VjcmV0LWtleS1ieXRlcw=="), "{stdout}");
}

#[test]
fn an_unsupported_proxy_url_exits_one_with_one_line_without_the_password() {
    let (status, _, stderr) = run(service_proxy().args([
        UNREACHABLE_RELAY,
        "MyDevice",
        "0",
        "--proxy",
        "socks4://user:hunter2@proxy.example.com:1080",
    ]));
    assert_one_line_failure(
        status,
        &stderr,
        "--proxy: proxy URL socks4://***@proxy.example.com:1080",
    );
    assert!(!stderr.contains("hunter2"), "{stderr}");
}

#[test]
fn bad_connection_string_exits_one_with_one_line() {
    let (status, _, stderr) = run(service_proxy().args(["garbage", "MyDevice", "0"]));
    assert_one_line_failure(status, &stderr, "invalid service connection string");
}

#[test]
fn device_connection_string_is_refused_as_the_wrong_kind() {
    let device = "HostName=127.0.0.1:1;DeviceId=MyDevice;SharedAccessKey=c2VjcmV0";
    let (status, _, stderr) = run(service_proxy().args([device, "MyDevice", "0"]));
    assert_one_line_failure(status, &stderr, "a service connection string is needed");
}

#[test]
fn iothub_connection_string_is_read_when_service_connection_string_is_unset() {
    let (status, _, stderr) = run(service_proxy()
        .env("IOTHUB_CONNECTION_STRING", "garbage")
        .env("STREAMING_TARGET_DEVICE", "MyDevice")
        .env("PROXY_PORT", "0"));
    assert_one_line_failure(status, &stderr, "invalid service connection string");
}

#[test]
fn missing_connection_string_names_the_environment_variable() {
    let (status, _, stderr) = run(&mut service_proxy());
    assert_one_line_failure(status, &stderr, "SERVICE_CONNECTION_STRING");
}

#[test]
fn missing_device_id_names_the_environment_variable() {
    let (status, _, stderr) = run(service_proxy().arg(UNREACHABLE_RELAY));
    assert_one_line_failure(status, &stderr, "STREAMING_TARGET_DEVICE");
}

#[test]
fn huge_ping_interval_is_a_usage_error_not_a_panic() {
    for value in ["18446744073709551615", "3601"] {
        let (status, _, stderr) = run(service_proxy().args([
            UNREACHABLE_RELAY,
            "MyDevice",
            "0",
            "--ping-interval",
            value,
        ]));
        assert_eq!(status.code(), Some(2), "{stderr}");
        assert!(stderr.contains("--ping-interval"), "{stderr}");
    }
}

#[test]
fn port_in_use_exits_one_saying_so() {
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind a port to occupy");
    let port = taken
        .local_addr()
        .expect("local address")
        .port()
        .to_string();
    let (status, stdout, stderr) =
        run(service_proxy().args([UNREACHABLE_RELAY, "MyDevice", &port]));
    assert_one_line_failure(status, &stderr, &format!("port {port} is in use"));
    assert!(stderr.contains("choose another LOCAL_PORT"), "{stderr}");
    assert!(stdout.is_empty(), "{stdout}");
}

#[test]
fn unreachable_relay_closes_the_local_connection_and_sigterm_exits_zero() {
    let mut child = service_proxy()
        .args([UNREACHABLE_RELAY, "MyDevice", "0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("service-proxy starts");
    let stdout = lines_of(child.stdout.take().expect("stdout is piped"));
    let stderr = lines_of(child.stderr.take().expect("stderr is piped"));
    let listening = stdout
        .recv_timeout(DEADLINE)
        .expect("service-proxy prints its listening line");
    let address = listening
        .strip_prefix("Listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {listening:?}"));
    assert!(address.starts_with("127.0.0.1:"), "{listening}");

    let mut local = TcpStream::connect(address).expect("connect to service-proxy");
    local
        .set_read_timeout(Some(DEADLINE))
        .expect("set a read timeout");
    let started = Instant::now();
    let mut buffer = [0u8; 16];
    // Closed (0) or reset (error) both count; a timeout does not.
    if let Err(error) = local.read(&mut buffer) {
        assert!(
            !matches!(
                error.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
            "{error}"
        );
    }
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "the local connection was not closed promptly"
    );

    let deadline = Instant::now() + DEADLINE;
    let reason = loop {
        let line = stderr
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("service-proxy logs why the stream failed");
        if line.contains("ERROR") {
            break line;
        }
    };
    assert!(
        reason.contains("cannot create a stream to MyDevice"),
        "{reason}"
    );

    send_sigterm(&child);
    let status = wait_with_deadline(&mut child);
    assert_eq!(status.code(), Some(0));
}
