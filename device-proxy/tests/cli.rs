//! The real device-proxy binary: help, startup errors, and a clean SIGTERM
//! while the relay is unreachable. No relay is needed: the relay's address is
//! a closed port.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

const BINARY: &str = env!("CARGO_BIN_EXE_device-proxy");
const DEADLINE: Duration = Duration::from_secs(20);
/// Well-formed, but names a relay that is not there.
const UNREACHABLE_RELAY: &str =
    "HostName=127.0.0.1:1;DeviceId=MyDevice;SharedAccessKey=c2VjcmV0LWtleS1ieXRlcw==";

/// The binary with none of its environment variables inherited from the
/// developer's shell.
fn device_proxy() -> Command {
    let mut command = Command::new(BINARY);
    for variable in [
        "DEVICE_CONNECTION_STRING",
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
    let output = command.output().expect("device-proxy binary runs");
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
        if let Some(status) = child.try_wait().expect("waiting for device-proxy") {
            return status;
        }
        if started.elapsed() > DEADLINE {
            let _ = child.kill();
            panic!("device-proxy did not exit within {DEADLINE:?}");
        }
        thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn help_shows_the_seed_example_and_the_environment_and_exits_zero() {
    let (status, stdout, _) = run(device_proxy().arg("--help"));
    assert!(status.success());
    assert!(stdout.contains("Examples:"), "{stdout}");
    assert!(stdout.contains("localhost 22"), "{stdout}");
    for text in [
        "DEVICE_CONNECTION_STRING",
        "DEVSTREAMS_CA_CERT",
        "--allow",
        "--max-streams",
        "--proxy",
        "HTTPS_PROXY",
        "NO_PROXY",
    ] {
        assert!(
            stdout.contains(text),
            "--help does not mention {text}: {stdout}"
        );
    }
}

#[test]
fn help_never_shows_the_connection_string_from_the_environment() {
    let (status, stdout, _) = run(device_proxy()
        .arg("--help")
        .env("DEVICE_CONNECTION_STRING", UNREACHABLE_RELAY));
    assert!(status.success());
    assert!(!stdout.contains("c2VjcmV0LWtleS1ieXRlcw=="), "{stdout}");
}

#[test]
fn an_unsupported_proxy_url_exits_one_with_one_line_without_the_password() {
    let (status, _, stderr) = run(device_proxy().args([
        UNREACHABLE_RELAY,
        "localhost",
        "22",
        "--proxy",
        "https://user:hunter2@proxy.example.com:443",
    ]));
    assert_one_line_failure(
        status,
        &stderr,
        "--proxy: proxy URL https://***@proxy.example.com:443",
    );
    assert!(!stderr.contains("hunter2"), "{stderr}");
}

#[test]
fn a_bad_https_proxy_variable_is_named_in_the_one_line() {
    let (status, _, stderr) = run(device_proxy()
        .args([UNREACHABLE_RELAY, "localhost", "22"])
        .env("HTTPS_PROXY", "socks4://proxy.example.com"));
    assert_one_line_failure(status, &stderr, "HTTPS_PROXY: ");
}

#[test]
fn bad_connection_string_exits_one_with_one_line() {
    let (status, _, stderr) = run(device_proxy().args(["garbage", "localhost", "22"]));
    assert_one_line_failure(status, &stderr, "invalid device connection string");
}

#[test]
fn service_connection_string_is_refused_as_the_wrong_kind() {
    let service = "HostName=127.0.0.1:1;SharedAccessKeyName=service;SharedAccessKey=c2VjcmV0";
    let (status, _, stderr) = run(device_proxy().arg(service));
    assert_one_line_failure(status, &stderr, "a device connection string is needed");
}

#[test]
fn missing_connection_string_names_the_environment_variable() {
    let (status, _, stderr) = run(&mut device_proxy());
    assert_one_line_failure(status, &stderr, "DEVICE_CONNECTION_STRING");
}

#[test]
fn missing_ca_certificate_file_exits_one_naming_it() {
    let (status, _, stderr) =
        run(device_proxy().args([UNREACHABLE_RELAY, "--ca-cert", "/nonexistent/cert.pem"]));
    assert_one_line_failure(status, &stderr, "/nonexistent/cert.pem");
}

#[test]
fn malformed_allow_is_a_usage_error() {
    let (status, _, stderr) = run(device_proxy().args([UNREACHABLE_RELAY, "--allow", "localhost"]));
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("HOST:PORT"), "{stderr}");
}

#[test]
fn huge_ping_interval_is_a_usage_error_not_a_panic() {
    for value in ["18446744073709551615", "3601"] {
        let (status, _, stderr) =
            run(device_proxy().args([UNREACHABLE_RELAY, "--ping-interval", value]));
        assert_eq!(status.code(), Some(2), "{stderr}");
        assert!(stderr.contains("--ping-interval"), "{stderr}");
    }
}

#[test]
fn unreachable_relay_is_retried_and_sigterm_exits_zero() {
    let mut child = device_proxy()
        .args([UNREACHABLE_RELAY, "localhost", "22", "--max-backoff", "1"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("device-proxy starts");
    let stderr = lines_of(child.stderr.take().expect("stderr is piped"));
    let deadline = Instant::now() + DEADLINE;
    let mut failures = 0;
    while failures < 2 {
        let line = stderr
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("device-proxy keeps logging its re-dials");
        if line.contains("control channel failed") {
            assert!(line.contains("127.0.0.1:1"), "{line}");
            failures += 1;
        }
    }
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success(), "kill -TERM failed");
    assert_eq!(wait_with_deadline(&mut child).code(), Some(0));
}
