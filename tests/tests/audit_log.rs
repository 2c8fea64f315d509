//! The relay's audit log (`--audit-log`): what a real ssh session through
//! device-proxy and service-proxy leaves in it, rejected requests, device
//! comings and goings, rotation by size, completeness after SIGTERM, a
//! stream closed by an operator (under the admin API's stream id), and
//! that no key, token or signature ever reaches it.

use std::path::Path;
use std::time::Duration;

use devstreams_tests::audit::{of_kind, read_audit, wait_for_audit};
use devstreams_tests::{
    relay_metric, require_sshd, start_device_proxy, start_echo_server, start_service_proxy,
    wait_until_device_connected, Relay, Sshd,
};
use serde_json::Value;

fn key_of(connection_string: &str) -> String {
    connection_string
        .split(';')
        .find_map(|pair| pair.strip_prefix("SharedAccessKey="))
        .expect("the connection string has a key")
        .to_string()
}

/// No key, token or signature in the text of the audit log.
fn assert_no_secret(path: &Path, keys: &[String]) {
    let directory = path.parent().expect("in a directory");
    for entry in std::fs::read_dir(directory).expect("audit directory") {
        let text = std::fs::read_to_string(entry.expect("entry").path()).unwrap_or_default();
        for key in keys {
            assert!(!text.contains(key.as_str()), "a key in the audit log");
        }
        for marker in ["SharedAccessSignature", "sig=", "Bearer", "eyJ"] {
            assert!(!text.contains(marker), "{marker:?} in the audit log");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ssh_session_is_audited_in_order_with_its_byte_counts() {
    if !require_sshd() {
        return;
    }
    let audit_directory = tempfile::tempdir().expect("temp dir");
    let audit_path = audit_directory.path().join("audit.log");
    let audit_text = audit_path.to_string_lossy().to_string();
    let sshd = Sshd::start().await;
    let relay = Relay::start(&["--audit-log", &audit_text]).await;
    let device_connection_string = relay.add_device("MyDevice").await;
    let device_proxy = start_device_proxy(&relay, &device_connection_string, sshd.port, &[]).await;
    // The harness's readiness probe asks for port 1, which the device does
    // not expose: a rejection with a reason.
    wait_until_device_connected(&relay, "MyDevice").await;
    let (service_proxy, local_port) = start_service_proxy(&relay, "MyDevice", &[]).await;

    let upload_size = 1024 * 1024;
    let upload = audit_directory.path().join("upload.bin");
    std::fs::write(&upload, vec![7u8; upload_size]).expect("write the upload");
    let mut ssh = sshd.ssh(local_port, "cat > /dev/null; echo done");
    ssh.stdin(std::fs::File::open(&upload).expect("open the upload"));
    let output = tokio::time::timeout(Duration::from_secs(60), ssh.output())
        .await
        .expect("ssh finishes")
        .expect("ssh runs");
    assert!(
        output.status.success(),
        "ssh failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "done");
    // The ssh stream ends when ssh does (service-proxy ends its stream).
    drop(service_proxy);
    let events = wait_for_audit(&audit_path, "the ssh stream's closed line", |events| {
        of_kind(events, "stream_closed").iter().any(|closed| {
            closed["bytes_service_to_device"].as_u64().unwrap_or(0) >= upload_size as u64
        })
    })
    .await;

    // Every line: an RFC 3339 UTC time, an event kind, no node (not clustered).
    for event in &events {
        let time = event["time"].as_str().expect("time");
        assert!(time.ends_with('Z') && time.contains('T'), "{time}");
        assert!(event["event"].is_string());
        assert!(event.get("node").is_none());
    }
    let connected = of_kind(&events, "device_connected");
    assert_eq!(connected[0]["device_id"], "MyDevice");
    assert!(connected[0]["address"]
        .as_str()
        .expect("address")
        .starts_with("127.0.0.1:"));

    let rejected = of_kind(&events, "stream_rejected");
    let probe = rejected
        .iter()
        .find(|event| event["status"] == 200)
        .expect("the readiness probe's rejection");
    assert!(
        probe["reason"]
            .as_str()
            .expect("reason")
            .contains("rejected by the device"),
        "{probe}"
    );

    let closed = of_kind(&events, "stream_closed")
        .into_iter()
        .find(|closed| {
            closed["bytes_service_to_device"].as_u64().unwrap_or(0) >= upload_size as u64
        })
        .expect("found above");
    let stream_id = closed["stream_id"].as_str().expect("stream id");
    let stream_events: Vec<&Value> = events
        .iter()
        .filter(|event| event["stream_id"] == stream_id)
        .collect();
    let kinds: Vec<&str> = stream_events
        .iter()
        .map(|event| event["event"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(
        kinds,
        [
            "stream_requested",
            "stream_accepted",
            "stream_established",
            "stream_closed"
        ]
    );
    let requested = stream_events[0];
    assert_eq!(requested["policy"], "service");
    assert_eq!(requested["device_id"], "MyDevice");
    assert!(requested["client_address"]
        .as_str()
        .expect("client address")
        .starts_with("127.0.0.1:"));
    assert!(requested["stream_name"].is_string());
    // ssh's server speaks first and answers: bytes flowed both ways.
    assert!(closed["bytes_device_to_service"].as_u64().expect("bytes") > 0);
    assert!(closed["duration_ms"].is_u64());
    assert!(
        ["device", "service", "relay"].contains(&closed["ended_by"].as_str().expect("ended_by"))
    );
    assert!(closed["reason"].is_string());

    // The relay's own counters agree with the sum of the closed lines.
    let sum = |field: &str| -> u64 {
        of_kind(&events, "stream_closed")
            .iter()
            .map(|closed| closed[field].as_u64().unwrap_or(0))
            .sum()
    };
    assert_eq!(
        relay_metric(&relay, "devstreams_bytes_service_to_device_total").await,
        sum("bytes_service_to_device")
    );
    assert_eq!(
        relay_metric(&relay, "devstreams_bytes_device_to_service_total").await,
        sum("bytes_device_to_service")
    );

    // The device goes away: its disconnection is recorded, with a reason.
    drop(device_proxy);
    let events = wait_for_audit(&audit_path, "the device's disconnection", |events| {
        of_kind(events, "device_disconnected")
            .iter()
            .any(|event| event["device_id"] == "MyDevice")
    })
    .await;
    let disconnected = of_kind(&events, "device_disconnected");
    assert!(disconnected[0]["reason"].is_string());
    assert!(disconnected[0]["address"].is_string());

    assert_no_secret(
        &audit_path,
        &[
            key_of(&device_connection_string),
            key_of(&relay.service_connection_string),
        ],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_requests_and_registry_changes_are_audited_with_reasons() {
    let audit_directory = tempfile::tempdir().expect("temp dir");
    let audit_path = audit_directory.path().join("audit.log");
    let audit_text = audit_path.to_string_lossy().to_string();
    let relay = Relay::start(&["--audit-log", &audit_text]).await;
    let service = framing::ServiceClient::new(
        framing::ConnectionString::parse_service(&relay.service_connection_string)
            .expect("service string"),
        relay.tls(),
    );
    let options = framing::StreamOptions::default();
    let unknown = service
        .create_stream("NoSuchDevice", "TestStream", &options)
        .await;
    assert!(matches!(
        unknown,
        Err(framing::CreateStreamError::DeviceNotFound(_))
    ));
    // A wrong key: refused as bad credentials, and no policy is named.
    let wrong_key = relay.service_connection_string.replace(
        &key_of(&relay.service_connection_string),
        "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
    );
    let intruder = framing::ServiceClient::new(
        framing::ConnectionString::parse_service(&wrong_key).expect("service string"),
        relay.tls(),
    );
    let refused = intruder
        .create_stream("NoSuchDevice", "TestStream", &options)
        .await;
    assert!(matches!(
        refused,
        Err(framing::CreateStreamError::Unauthorized(_))
    ));
    // Valid credentials of a policy without service-connect: refused, and
    // the policy is named. It is used once the relay has loaded it.
    let reader_output = relay
        .cli(&["policy", "add", "reader", "--rights", "registry-read"])
        .await;
    assert!(reader_output.status.success());
    let reader_string = String::from_utf8_lossy(&reader_output.stdout)
        .trim()
        .to_string();
    wait_for_audit(&audit_path, "the reader policy added", |events| {
        of_kind(events, "registry_changed")
            .iter()
            .any(|event| event["kind"] == "policy" && event["name"] == "reader")
    })
    .await;
    let reader = framing::ServiceClient::new(
        framing::ConnectionString::parse_service(&reader_string).expect("service string"),
        relay.tls(),
    );
    let lacking = reader
        .create_stream("NoSuchDevice", "TestStream", &options)
        .await;
    assert!(matches!(
        lacking,
        Err(framing::CreateStreamError::Unauthorized(_))
    ));
    // Registry changes made by the CLI while the relay runs.
    let device_connection_string = relay.add_device("Fresh").await;
    for arguments in [
        ["device", "disable", "Fresh"],
        ["device", "enable", "Fresh"],
        ["device", "rotate-key", "Fresh"],
        ["device", "remove", "Fresh"],
    ] {
        assert!(relay.cli(&arguments).await.status.success());
        // One change at a time, so each reload sees exactly one.
        let change = match arguments[1] {
            "disable" => "disabled",
            "enable" => "enabled",
            "rotate-key" => "key_rotated",
            _ => "removed",
        };
        wait_for_audit(&audit_path, change, |events| {
            of_kind(events, "registry_changed")
                .iter()
                .any(|event| event["change"] == change)
        })
        .await;
    }

    let events = read_audit(&audit_path);
    let rejected = of_kind(&events, "stream_rejected");
    assert_eq!(rejected.len(), 3, "{rejected:?}");
    assert_eq!(rejected[0]["status"], 404);
    assert_eq!(rejected[0]["reason"], "unknown device");
    assert_eq!(rejected[0]["device_id"], "NoSuchDevice");
    assert_eq!(rejected[1]["status"], 401);
    assert!(rejected[1]["reason"]
        .as_str()
        .expect("reason")
        .starts_with("service credentials refused"));
    assert_eq!(rejected[2]["status"], 401);
    let lacking_reason = rejected[2]["reason"].as_str().expect("reason");
    assert!(
        lacking_reason.contains("service-connect"),
        "names the missing right: {lacking_reason}"
    );
    let requested = of_kind(&events, "stream_requested");
    assert_eq!(requested.len(), 3);
    assert_eq!(requested[0]["policy"], "service");
    assert!(requested[1].get("policy").is_none(), "{}", requested[1]);
    assert_eq!(requested[2]["policy"], "reader");
    for (request, rejection) in requested.iter().zip(&rejected) {
        assert_eq!(request["stream_id"], rejection["stream_id"]);
    }
    let changes: Vec<(String, String)> = of_kind(&events, "registry_changed")
        .iter()
        .filter(|event| event["name"] == "Fresh")
        .map(|event| {
            assert_eq!(event["kind"], "device");
            assert_eq!(event["source"], "data_dir");
            (
                event["change"].as_str().unwrap_or_default().to_string(),
                event["name"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    let change_names: Vec<&str> = changes.iter().map(|(change, _)| change.as_str()).collect();
    assert_eq!(
        change_names,
        ["added", "disabled", "enabled", "key_rotated", "removed"]
    );
    assert_no_secret(
        &audit_path,
        &[
            key_of(&device_connection_string),
            key_of(&relay.service_connection_string),
            key_of(&reader_string),
        ],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_close_is_audited_under_the_admin_api_stream_id() {
    let audit_directory = tempfile::tempdir().expect("temp dir");
    let audit_path = audit_directory.path().join("audit.log");
    let audit_text = audit_path.to_string_lossy().to_string();
    let (echo_port, _echo) = start_echo_server().await;
    let relay = Relay::start(&["--audit-log", &audit_text]).await;
    let device_connection_string = relay.add_device("MyDevice").await;
    let _device_proxy = start_device_proxy(&relay, &device_connection_string, echo_port, &[]).await;
    wait_until_device_connected(&relay, "MyDevice").await;
    let (_service_proxy, local_port) = start_service_proxy(&relay, "MyDevice", &[]).await;
    let payload = b"closed by an operator";
    let _connection = devstreams_tests::echo_round_trip(local_port, payload)
        .await
        .expect("echo through the tunnel");

    // The admin API's id of the live stream (relay stream list, first column).
    let output = relay.cli(&["stream", "list"]).await;
    let listing = String::from_utf8_lossy(&output.stdout).to_string();
    assert!(output.status.success(), "relay stream list failed");
    let live: Vec<&str> = listing
        .lines()
        .skip(1)
        .filter(|line| line.split('\t').nth(1) == Some("MyDevice"))
        .collect();
    assert_eq!(live.len(), 1, "one live stream:\n{listing}");
    let stream_id = live[0].split('\t').next().expect("an id").to_string();
    assert!(
        relay
            .cli(&["stream", "close", &stream_id])
            .await
            .status
            .success(),
        "relay stream close {stream_id}"
    );

    let events = wait_for_audit(&audit_path, "the operator's close", |events| {
        of_kind(events, "stream_closed")
            .iter()
            .any(|event| event["stream_id"] == stream_id.as_str())
    })
    .await;
    let closed = of_kind(&events, "stream_closed");
    let closed = closed
        .iter()
        .find(|event| event["stream_id"] == stream_id.as_str())
        .expect("its closed line");
    assert_eq!(closed["ended_by"], "operator", "{closed}");
    // The payload each way, inside the proxies' session framing.
    let length = payload.len() as u64;
    for direction in ["bytes_service_to_device", "bytes_device_to_service"] {
        let bytes = closed[direction].as_u64().expect("a byte count");
        assert!(bytes >= length, "{direction} = {bytes}: {closed}");
    }
    // The same id from the creation on.
    for kind in ["stream_requested", "stream_accepted", "stream_established"] {
        assert!(
            of_kind(&events, kind)
                .iter()
                .any(|event| event["stream_id"] == stream_id.as_str()),
            "no {kind} line for {stream_id}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_bounds_the_files_and_never_splits_a_line() {
    let audit_directory = tempfile::tempdir().expect("temp dir");
    let audit_path = audit_directory.path().join("audit.log");
    let audit_text = audit_path.to_string_lossy().to_string();
    let max_size = 2048;
    let relay = Relay::start(&[
        "--audit-log",
        &audit_text,
        "--audit-log-max-size",
        "2KiB",
        "--audit-log-max-files",
        "3",
    ])
    .await;
    let service = framing::ServiceClient::new(
        framing::ConnectionString::parse_service(&relay.service_connection_string)
            .expect("service string"),
        relay.tls(),
    );
    // Each refused request writes two lines of about 200 bytes.
    let requests = 80;
    for index in 0..requests {
        let _ = service
            .create_stream(
                &format!("NoSuchDevice{index}"),
                "TestStream",
                &framing::StreamOptions::default(),
            )
            .await;
    }
    let last_device = format!("NoSuchDevice{}", requests - 1);
    let events = wait_for_audit(&audit_path, "the last rejection", |events| {
        of_kind(events, "stream_rejected")
            .iter()
            .any(|event| event["device_id"] == last_device.as_str())
    })
    .await;
    let mut names: Vec<String> = std::fs::read_dir(audit_directory.path())
        .expect("audit directory")
        .map(|entry| {
            entry
                .expect("entry")
                .file_name()
                .to_string_lossy()
                .to_string()
        })
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["audit.log", "audit.log.1", "audit.log.2", "audit.log.3"]
    );
    for name in &names {
        let size = std::fs::metadata(audit_directory.path().join(name))
            .expect("size")
            .len();
        assert!(size <= max_size, "{name} is {size} bytes");
    }
    // What is kept is the newest part, whole lines in order: the kept
    // rejections are the last ones made.
    let kept: Vec<u64> = of_kind(&events, "stream_rejected")
        .iter()
        .map(|event| {
            event["device_id"]
                .as_str()
                .and_then(|id| id.strip_prefix("NoSuchDevice"))
                .and_then(|index| index.parse().ok())
                .expect("a numbered device")
        })
        .collect();
    assert!(kept.len() > 5 && kept.len() < requests as usize, "{kept:?}");
    assert!(
        kept.windows(2).all(|pair| pair[1] == pair[0] + 1),
        "{kept:?}"
    );
    assert_eq!(kept.last(), Some(&(requests - 1)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_sigterm_every_established_stream_has_its_closed_line() {
    let audit_directory = tempfile::tempdir().expect("temp dir");
    let audit_path = audit_directory.path().join("audit.log");
    let audit_text = audit_path.to_string_lossy().to_string();
    let (echo_port, _echo) = start_echo_server().await;
    let mut relay = Relay::start(&["--audit-log", &audit_text, "--drain-timeout", "1"]).await;
    let device_connection_string = relay.add_device("MyDevice").await;
    let _device_proxy = start_device_proxy(&relay, &device_connection_string, echo_port, &[]).await;
    wait_until_device_connected(&relay, "MyDevice").await;
    let (_service_proxy, local_port) = start_service_proxy(&relay, "MyDevice", &[]).await;
    let streams = 20;
    let mut connections = Vec::new();
    for index in 0..streams {
        let payload = format!("stream {index}");
        connections.push(
            devstreams_tests::echo_round_trip(local_port, payload.as_bytes())
                .await
                .expect("echo through the tunnel"),
        );
    }
    // Half end just before the signal, half are still live at it.
    connections.truncate(streams / 2);
    relay.process.signal("TERM");
    assert_eq!(
        relay.process.wait_exit(Duration::from_secs(30)).await,
        Some(0)
    );
    drop(connections);

    let events = read_audit(&audit_path);
    let established: Vec<&str> = of_kind(&events, "stream_established")
        .iter()
        .filter_map(|event| event["stream_id"].as_str())
        .collect();
    assert!(
        established.len() >= streams,
        "{} established",
        established.len()
    );
    let closed: Vec<&Value> = of_kind(&events, "stream_closed");
    for stream_id in &established {
        let line = closed
            .iter()
            .find(|event| event["stream_id"] == *stream_id)
            .unwrap_or_else(|| panic!("stream {stream_id} has no closed line"));
        assert!(line["bytes_device_to_service"].as_u64().expect("bytes") > 0);
    }
}
