//! Configuration files (`--config FILE`) and log formats of the four
//! programs, run as real processes: precedence (flag > environment > file >
//! default), every kind of file mistake named by file, line and key,
//! `relay config check`, secrets read from files, service-proxy's per-user
//! default file, and logs (text and JSON) free of keys, signatures and
//! stream tokens at debug level.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use devstreams_tests::{
    binary, echo_round_trip, free_port, start_echo_server, wait_until_device_connected, Process,
    Relay,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

/// Bound for one short-lived program run (a check, a failed start).
const RUN_DEADLINE: Duration = Duration::from_secs(30);

/// Runs a workspace program to its end; returns exit code and stderr.
async fn run(
    program: &str,
    arguments: &[&str],
    environment: &[(&str, &str)],
) -> (i32, String, String) {
    let mut command = Command::new(binary(program));
    command
        .args(arguments)
        .stdin(Stdio::null())
        .env_remove("RUST_LOG")
        .env_remove("DEVSTREAMS_CA_CERT")
        .env_remove("DEVICE_CONNECTION_STRING")
        .env_remove("SERVICE_CONNECTION_STRING")
        .env_remove("IOTHUB_CONNECTION_STRING")
        .env_remove("XDG_CONFIG_HOME")
        .kill_on_drop(true);
    for (key, value) in environment {
        command.env(key, value);
    }
    let output = tokio::time::timeout(RUN_DEADLINE, command.output())
        .await
        .unwrap_or_else(|_| panic!("{program} {arguments:?} did not end within {RUN_DEADLINE:?}"))
        .expect("the program runs");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).to_string(),
        String::from_utf8_lossy(&output.stderr).to_string(),
    )
}

fn write(directory: &Path, name: &str, text: &str) -> PathBuf {
    let path = directory.join(name);
    std::fs::write(&path, text).expect("write into the test's temp dir");
    path
}

const DEVICE: &str = "HostName=127.0.0.1:1;DeviceId=d;SharedAccessKey=YWJj";
const SERVICE: &str = "HostName=127.0.0.1:1;SharedAccessKeyName=service;SharedAccessKey=YWJj";

/// The CA path a program complains about tells which source won: each
/// level names a different (missing) file.
#[tokio::test]
async fn flag_beats_environment_beats_file_beats_default_in_every_proxy() {
    let directory = tempfile::tempdir().expect("temp dir");
    let file = write(
        directory.path(),
        "settings.toml",
        "ca_cert = \"/nonexistent/from-file.pem\"\n",
    );
    let file = file.to_str().expect("UTF-8 path");
    let cases: [(&str, Vec<&str>); 3] = [
        ("device-proxy", vec![DEVICE]),
        ("service-proxy", vec![SERVICE, "dev", "0"]),
        ("echo-sample", vec!["device", DEVICE]),
    ];
    for (program, positionals) in cases {
        let mut with_file = positionals.clone();
        with_file.extend(["--config", file]);
        let (code, _, stderr) = run(program, &with_file, &[]).await;
        assert_eq!(code, 1, "{program}: {stderr}");
        assert!(
            stderr.contains("/nonexistent/from-file.pem"),
            "{program} file: {stderr}"
        );

        let environment = [("DEVSTREAMS_CA_CERT", "/nonexistent/from-environment.pem")];
        let (_, _, stderr) = run(program, &with_file, &environment).await;
        assert!(
            stderr.contains("/nonexistent/from-environment.pem"),
            "{program} environment: {stderr}"
        );

        let mut with_flag = with_file.clone();
        with_flag.extend(["--ca-cert", "/nonexistent/from-flag.pem"]);
        let (_, _, stderr) = run(program, &with_flag, &environment).await;
        assert!(
            stderr.contains("/nonexistent/from-flag.pem"),
            "{program} flag: {stderr}"
        );
    }
}

/// Extra flags, environment, and the port the relay should then listen on.
type RelayCase<'a> = (Vec<&'a str>, Vec<(&'a str, &'a str)>, u16);

/// The relay's --listen from its file, from RELAY_LISTEN over the file, and
/// from the flag over both: the address it prints says which won.
#[tokio::test]
async fn relay_listen_address_follows_flag_environment_file() {
    let directory = tempfile::tempdir().expect("temp dir");
    let data_dir = directory.path().join("relay-data");
    let data_dir = data_dir.to_str().expect("UTF-8 path");
    let [file_port, environment_port, flag_port] = [free_port(), free_port(), free_port()];
    let file = write(
        directory.path(),
        "relay.toml",
        &format!(
            "# the relay of this test\nlisten = \"127.0.0.1:{file_port}\"\nno_mqtt = true\nadmin-listen = \"127.0.0.1:0\"\ntrusted_proxy = [\"10.0.0.0/8\", \"::1\"]\nmax_streams = 50\n"
        ),
    );
    let file = file.to_str().expect("UTF-8 path");
    let environment_listen = format!("127.0.0.1:{environment_port}");
    let flag_listen = format!("127.0.0.1:{flag_port}");
    let cases: [RelayCase; 3] = [
        (vec![], vec![], file_port),
        (
            vec![],
            vec![("RELAY_LISTEN", environment_listen.as_str())],
            environment_port,
        ),
        (
            vec!["--listen", flag_listen.as_str()],
            vec![("RELAY_LISTEN", environment_listen.as_str())],
            flag_port,
        ),
    ];
    for (extra, environment, expected_port) in cases {
        let mut arguments = vec!["serve", "--data-dir", data_dir, "--config", file];
        arguments.extend(extra);
        let mut relay = Process::spawn("relay", &arguments, directory.path(), &environment).await;
        let listening = relay.wait_for_line("Listening on ").await;
        assert!(
            listening.starts_with(&format!("127.0.0.1:{expected_port} ")),
            "expected port {expected_port}: {listening}"
        );
        let _ = relay.child.kill().await;
    }
}

/// Each kind of mistake in a file is one line naming the file, the line
/// and (but for the file itself) the key, and the program does not start.
#[tokio::test]
async fn every_config_mistake_names_file_line_and_key() {
    let directory = tempfile::tempdir().expect("temp dir");
    let cases = [
        (
            "unknown.toml",
            "ca_cert = \"a.pem\"\nmax_stream = 3\n",
            ":2: key `max_stream`: unknown key",
        ),
        (
            "type.toml",
            "\n\nkeep_alive = \"30\"\n",
            ":3: key `keep_alive`: expected a number, found a string",
        ),
        (
            "array.toml",
            "proxy = [\"none\", \"none\"]\n",
            ":1: key `proxy`: expected one value, found an array",
        ),
        (
            "value.toml",
            "max_backoff = 0\n",
            ":1: key `max_backoff`: bad value \"0\"",
        ),
        (
            "switch.toml",
            "no_resume = 1\n",
            ":1: key `no_resume`: expected true or false",
        ),
        ("syntax.toml", "keep_alive = 30\nallow = [\"a:1\"\n", ":2:"),
    ];
    for (name, text, expected) in cases {
        let path = write(directory.path(), name, text);
        let path = path.to_str().expect("UTF-8 path");
        let (code, _, stderr) = run("device-proxy", &[DEVICE, "--config", path], &[]).await;
        assert_eq!(code, 1, "{name}: {stderr}");
        assert!(
            stderr.contains(&format!("{path}{expected}")),
            "{name}: {stderr}"
        );
        assert_eq!(
            stderr.trim().lines().count(),
            1,
            "{name}: one line: {stderr}"
        );
    }
    let missing = directory.path().join("missing.toml");
    let missing = missing.to_str().expect("UTF-8 path");
    let (code, _, stderr) = run(
        "service-proxy",
        &["--config", missing, SERVICE, "d", "0"],
        &[],
    )
    .await;
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains(&format!("cannot read the config file {missing}")),
        "{stderr}"
    );
    // A connection string is a secret: a refused one is not repeated.
    let secret = write(directory.path(), "secret.toml", "connection_string = 42\n");
    let (_, _, stderr) = run("device-proxy", &["--config", secret.to_str().unwrap()], &[]).await;
    assert!(
        stderr.contains(":1: key `connection_string`: expected a string"),
        "{stderr}"
    );
}

#[tokio::test]
async fn relay_config_check_says_ok_or_the_error() {
    let directory = tempfile::tempdir().expect("temp dir");
    let good = write(
        directory.path(),
        "good.toml",
        "listen = \"127.0.0.1:8443\"\nmqtt_listen = \"127.0.0.1:8883\"\nhandshake_timeout = 30\ndrain_timeout = 10\nlog_format = \"json\"\n",
    );
    let good = good.to_str().unwrap();
    let (code, stdout, stderr) = run("relay", &["config", "check", "--config", good], &[]).await;
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(stdout.trim(), format!("{good}: OK"));

    // PATH stands for the file's path in the expected error.
    let refused = [
        (
            "bad.toml",
            "listen = \"127.0.0.1:8443\"\nhandshake_timeout = 6000\n",
            "PATH:2: key `handshake_timeout`: bad value",
        ),
        // What only serve itself checks is checked too.
        (
            "half.toml",
            "tls_cert = \"cert.pem\"\n",
            "tls_cert and tls_key go together",
        ),
        // Two keys that cannot go together: neither is silently dropped.
        (
            "conflict.toml",
            "mqtt_listen = \"127.0.0.1:8883\"\nno_mqtt = true\n",
            "PATH:2: key `no_mqtt`: cannot be used with `mqtt_listen` (line 1)",
        ),
    ];
    for (name, text, expected) in refused {
        let path = write(directory.path(), name, text);
        let path = path.to_str().unwrap();
        let (code, _, stderr) = run("relay", &["config", "check", "--config", path], &[]).await;
        assert_eq!(code, 1, "{name}: {stderr}");
        let expected = expected.replace("PATH", path);
        assert!(stderr.contains(&expected), "{name}: {stderr}");
    }

    let (code, _, stderr) = run("relay", &["config", "check"], &[]).await;
    assert_eq!(code, 1);
    assert!(stderr.contains("--config FILE"), "{stderr}");
}

/// The connection string without its key in the device-proxy's file, the
/// key in a file of its own; the service's whole string in a file: a
/// stream runs, and value and file together are refused.
#[tokio::test]
async fn secrets_come_from_files() {
    let relay = Relay::start(&[]).await;
    let directory = relay.directory.path();
    let device_string = relay.add_device("secret-files").await;
    let (without_key, key) = device_string
        .rsplit_once(";SharedAccessKey=")
        .expect("a device string ends with its key");
    let key_file = write(directory, "device.key", &format!("{key}\n"));
    let (echo_port, _echo) = start_echo_server().await;
    let device_config = write(
        directory,
        "device-proxy.toml",
        &format!(
            "connection_string = \"{without_key}\"\nshared_access_key_file = \"{}\"\ntarget_host = \"127.0.0.1\"\ntarget_port = {echo_port}\nca_cert = \"{}\"\n",
            key_file.display(),
            relay.ca_text()
        ),
    );
    let _device = Process::spawn(
        "device-proxy",
        &["--config", device_config.to_str().unwrap()],
        directory,
        &[],
    )
    .await;
    wait_until_device_connected(&relay, "secret-files").await;

    let service_file = write(
        directory,
        "service.conn",
        &format!("  {}\n", relay.service_connection_string),
    );
    let local_port = free_port();
    let service_config = write(
        directory,
        "service-proxy.toml",
        &format!(
            "connection_string_file = \"{}\"\ndevice_id = \"secret-files\"\nlocal_port = {local_port}\nca_cert = \"{}\"\n",
            service_file.display(),
            relay.ca_text()
        ),
    );
    let mut service = Process::spawn(
        "service-proxy",
        &["--config", service_config.to_str().unwrap()],
        directory,
        &[],
    )
    .await;
    service.wait_for_line("Listening on ").await;
    echo_round_trip(local_port, b"keys from files")
        .await
        .expect("echo through the stream");

    let both = write(
        directory,
        "both.toml",
        &format!(
            "connection_string = \"{}\"\nconnection_string_file = \"{}\"\n",
            relay.service_connection_string,
            service_file.display()
        ),
    );
    let (code, _, stderr) = run(
        "service-proxy",
        &["--config", both.to_str().unwrap(), "--stdio", "x"],
        &[],
    )
    .await;
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("both connection_string and connection_string_file"),
        "{stderr}"
    );
    let (code, _, stderr) = run(
        "device-proxy",
        &[
            &device_string,
            "--shared-access-key-file",
            key_file.to_str().unwrap(),
        ],
        &[],
    )
    .await;
    assert_eq!(code, 1);
    assert!(
        stderr.contains("has a SharedAccessKey and shared_access_key_file"),
        "{stderr}"
    );
    let (code, _, stderr) = run(
        "device-proxy",
        &["--connection-string-file", "/nonexistent/device.conn"],
        &[],
    )
    .await;
    assert_eq!(code, 1);
    assert!(
        stderr.contains("cannot read the secret file /nonexistent/device.conn"),
        "{stderr}"
    );
}

/// `service-proxy --stdio DEVICE` with nothing else: the connection
/// string and CA come from $XDG_CONFIG_HOME/devstreams/service.toml.
#[tokio::test]
async fn service_proxy_stdio_needs_no_flags_with_the_user_config() {
    let relay = Relay::start(&[]).await;
    let directory = relay.directory.path();
    let device_string = relay.add_device("kiosk-17").await;
    let (echo_port, _echo) = start_echo_server().await;
    let _device =
        devstreams_tests::start_device_proxy(&relay, &device_string, echo_port, &[]).await;
    wait_until_device_connected(&relay, "kiosk-17").await;

    let config_home = directory.join("config-home");
    std::fs::create_dir_all(config_home.join("devstreams")).unwrap();
    let key_file = write(directory, "service.conn", &relay.service_connection_string);
    write(
        &config_home.join("devstreams"),
        "service.toml",
        &format!(
            "connection_string_file = \"{}\"\nca_cert = \"{}\"\n",
            key_file.display(),
            relay.ca_text()
        ),
    );
    let mut child = Command::new(binary("service-proxy"))
        .args(["--stdio", "kiosk-17"])
        .env("XDG_CONFIG_HOME", &config_home)
        .env_remove("SERVICE_CONNECTION_STRING")
        .env_remove("IOTHUB_CONNECTION_STRING")
        .env_remove("DEVSTREAMS_CA_CERT")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("service-proxy starts");
    let mut stdin = child.stdin.take().expect("piped");
    let mut stdout = child.stdout.take().expect("piped");
    stdin.write_all(b"hello from stdio").await.unwrap();
    let mut echoed = vec![0u8; 16];
    tokio::time::timeout(RUN_DEADLINE, stdout.read_exact(&mut echoed))
        .await
        .expect("the echo comes back in time")
        .expect("the echo comes back");
    assert_eq!(&echoed, b"hello from stdio");
    drop(stdin);
    let status = tokio::time::timeout(RUN_DEADLINE, child.wait())
        .await
        .expect("exits")
        .unwrap();
    assert!(status.success(), "{status:?}");
}

/// What must never be in a log: both keys, SAS signatures, JWT stream tokens.
fn assert_no_secret(name: &str, log: &str, keys: &[&str]) {
    for key in keys {
        assert!(!log.contains(key), "{name} logged a key:\n{log}");
        let encoded = percent_encode(key);
        assert!(
            !log.contains(&encoded),
            "{name} logged an encoded key:\n{log}"
        );
    }
    for marker in [
        "sig=",
        "SharedAccessSignature sr",
        "eyJ",
        "SharedAccessKey=",
    ] {
        assert!(!log.contains(marker), "{name} logged {marker:?}:\n{log}");
    }
}

fn percent_encode(text: &str) -> String {
    text.replace('+', "%2B")
        .replace('/', "%2F")
        .replace('=', "%3D")
}

fn key_of(connection_string: &str) -> String {
    connection_string
        .split(';')
        .find_map(|part| part.strip_prefix("SharedAccessKey="))
        .expect("the connection string has a key")
        .to_string()
}

/// A whole session at debug level in one format: relay, device-proxy and
/// service-proxy, each told the format a different way (flag, environment,
/// file). Returns the three logs.
async fn session_logs(format: &str) -> (Vec<(String, String)>, Vec<String>) {
    let directory = tempfile::tempdir().expect("temp dir");
    let config = write(
        directory.path(),
        "relay.toml",
        &format!("log_format = \"{format}\"\n"),
    );
    let relay = Relay::start_with_environment(
        &["--config", config.to_str().unwrap()],
        &[("RUST_LOG", "debug")],
    )
    .await;
    let device_string = relay.add_device("logged").await;
    let (echo_port, _echo) = start_echo_server().await;
    let debug = [("RUST_LOG", "debug"), ("DEVSTREAMS_LOG_FORMAT", format)];
    let device = devstreams_tests::spawn_device_proxy_with_environment(
        &relay.ca_text(),
        relay.directory.path(),
        &device_string,
        echo_port,
        &[],
        &debug,
    )
    .await;
    wait_until_device_connected(&relay, "logged").await;
    let (service, port) = devstreams_tests::spawn_service_proxy_with_environment(
        &relay.ca_text(),
        relay.directory.path(),
        &relay.service_connection_string,
        "logged",
        &["--log-format", format],
        &[("RUST_LOG", "debug")],
    )
    .await;
    let stream = echo_round_trip(port, b"log me").await.expect("echo");
    drop(stream);
    service
        .wait_for_log("stream established", Duration::from_secs(10))
        .await;
    let keys = vec![
        key_of(&device_string),
        key_of(&relay.service_connection_string),
    ];
    let logs = vec![
        ("relay".to_string(), relay.process.log()),
        ("device-proxy".to_string(), device.log()),
        ("service-proxy".to_string(), service.log()),
    ];
    (logs, keys)
}

#[tokio::test]
async fn json_logs_are_one_object_per_line_without_secrets() {
    let (logs, keys) = session_logs("json").await;
    let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
    for (name, log) in &logs {
        assert!(
            log.lines().count() > 3,
            "{name} logged little at debug:\n{log}"
        );
        for line in log.lines() {
            let value: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|error| panic!("{name}: not JSON ({error}): {line}"));
            assert!(
                value.get("level").is_some()
                    && value.get("timestamp").is_some()
                    && value["fields"].get("message").is_some(),
                "{name}: {line}"
            );
        }
        assert_no_secret(name, log, &keys);
    }
    let relay_log = &logs[0].1;
    assert!(
        relay_log
            .lines()
            .any(|line| line.contains("\"device_id\":\"logged\"")),
        "fields are keys: {relay_log}"
    );
}

#[tokio::test]
async fn text_logs_at_debug_hold_no_secret() {
    let (logs, keys) = session_logs("text").await;
    let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
    for (name, log) in &logs {
        assert!(
            log.lines().count() > 3,
            "{name} logged little at debug:\n{log}"
        );
        assert!(serde_json::from_str::<serde_json::Value>(log.lines().next().unwrap()).is_err());
        assert_no_secret(name, log, &keys);
    }
}
