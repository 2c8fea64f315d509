//! Policies with rights, the admin JSON API and the live-state CLI, on real
//! relay, device-proxy, service-proxy, sshd and ssh processes: each right is
//! needed where it should be (401 naming it otherwise), the live device
//! list follows a device-proxy, `relay stream close` ends a live ssh
//! session, an old data dir upgrades in place, and the health endpoints
//! and histograms are served.

use std::time::{Duration, SystemTime};

use base64::Engine;
use devstreams_tests::{
    raw_http, raw_https, raw_https_to, require_sshd, start_device_proxy, start_service_proxy,
    wait_until_device_connected, Relay, Sshd,
};

/// A SAS token for a policy's connection string, as an admin API client makes it.
fn token_for(connection_string: &str) -> String {
    let field = |name: &str| {
        connection_string
            .split(';')
            .find_map(|part| part.strip_prefix(&format!("{name}=")))
            .unwrap_or_else(|| panic!("{name} in {connection_string}"))
            .to_string()
    };
    let key = base64::engine::general_purpose::STANDARD
        .decode(field("SharedAccessKey"))
        .expect("base64 key");
    framing::sas::sign(
        &field("HostName"),
        &key,
        SystemTime::now() + Duration::from_secs(600),
        Some(&field("SharedAccessKeyName")),
    )
}

async fn admin(relay: &Relay, method: &str, path: &str, token: Option<&str>) -> (u16, String) {
    let authorization = token
        .map(|token| format!("Authorization: {token}\r\n"))
        .unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\n{authorization}Content-Length: 0\r\nConnection: close\r\n\r\n"
    );
    let (status, _, body) = raw_http(&relay.admin_address, &request).await;
    (status, body)
}

async fn cli_ok(relay: &Relay, arguments: &[&str]) -> (String, String) {
    let output = relay.cli(arguments).await;
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    let stderr = String::from_utf8_lossy(&output.stderr).to_string();
    assert!(
        output.status.success(),
        "relay {arguments:?} failed: {stderr}"
    );
    (stdout, stderr)
}

async fn add_policy(relay: &Relay, name: &str, rights: &str) -> String {
    cli_ok(relay, &["policy", "add", name, "--rights", rights])
        .await
        .0
        .trim()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_reads_need_registry_read_and_changes_registry_write() {
    let relay = Relay::start(&[]).await;
    let reader = token_for(&add_policy(&relay, "reader", "registry-read").await);
    let writer = token_for(&add_policy(&relay, "writer", "RegistryWrite").await);
    let service = token_for(&relay.service_connection_string);
    let (lines, _) = cli_ok(&relay, &["policy", "list"]).await;
    assert!(lines.contains("reader\tregistry-read\n"), "{lines}");
    assert!(lines.contains("writer\tregistry-write\n"), "{lines}");
    assert!(lines.contains("service\tservice-connect\n"), "{lines}");
    assert!(
        lines.contains("registryReadWrite\tregistry-read,registry-write\n"),
        "{lines}"
    );

    let (status, body) = admin(&relay, "GET", "/api/devices", None).await;
    assert_eq!(status, 401, "no token: {body}");
    for path in ["/api/devices", "/api/streams"] {
        let (status, body) = admin(&relay, "GET", path, Some(&service)).await;
        assert_eq!(status, 401, "service policy reads {path}: {body}");
        assert!(body.contains("registry-read"), "names the right: {body}");
        let (status, body) = admin(&relay, "GET", path, Some(&writer)).await;
        assert_eq!(status, 401, "write-only policy reads {path}: {body}");
        let (status, body) = admin(&relay, "GET", path, Some(&reader)).await;
        assert_eq!(status, 200, "reader reads {path}: {body}");
        serde_json::from_str::<serde_json::Value>(&body).expect("JSON");
    }
    for (method, path) in [
        ("DELETE", "/api/streams/0123abcd"),
        ("POST", "/api/devices/MyDevice/disconnect"),
    ] {
        let (status, body) = admin(&relay, method, path, Some(&reader)).await;
        assert_eq!(status, 401, "reader changes {path}: {body}");
        assert!(body.contains("registry-write"), "names the right: {body}");
        let (status, body) = admin(&relay, method, path, Some(&writer)).await;
        assert_eq!(status, 404, "writer may, but nothing is there: {body}");
    }
    // A removed policy's tokens stop working.
    cli_ok(&relay, &["policy", "remove", "reader"]).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (status, _) = admin(&relay, "GET", "/api/devices", Some(&reader)).await;
        if status == 401 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "removed policy still works"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn create_stream_request(token: &str) -> String {
    format!(
        "POST /twins/NoSuchDevice/streams/TestStream?api-version=2016-11-14 HTTP/1.1\r\nHost: localhost\r\n\
         Authorization: {token}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_creation_needs_service_connect() {
    let relay = Relay::start(&[]).await;
    let reader = token_for(&add_policy(&relay, "reader", "registry-read,registry-write").await);
    let (status, _, body) = raw_https(&relay, &create_stream_request(&reader)).await;
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("service-connect"), "names the right: {body}");
    // The service policy passes the check (and meets the unknown device).
    let service = token_for(&relay.service_connection_string);
    let (status, _, body) = raw_https(&relay, &create_stream_request(&service)).await;
    assert_eq!(status, 404, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_data_dir_keeps_its_service_key_and_gains_registry_read_write() {
    let directory = tempfile::tempdir().expect("temp dir");
    let data_dir = directory.path().join("relay-data");
    std::fs::create_dir(&data_dir).expect("data dir");
    let old_key = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
    {
        // The registry exactly as the code before rights created it.
        let old = rusqlite::Connection::open(data_dir.join("registry.sqlite")).expect("sqlite");
        old.execute_batch(
            "CREATE TABLE devices (device_id TEXT PRIMARY KEY NOT NULL, primary_key TEXT NOT NULL,
                 secondary_key TEXT NOT NULL, enabled INTEGER NOT NULL DEFAULT 1,
                 created_at INTEGER NOT NULL DEFAULT (strftime('%s','now')));
             CREATE TABLE policies (name TEXT PRIMARY KEY NOT NULL, primary_key TEXT NOT NULL,
                 secondary_key TEXT NOT NULL);
             CREATE TABLE settings (name TEXT PRIMARY KEY NOT NULL, value TEXT NOT NULL);",
        )
        .expect("old schema");
        old.execute(
            "INSERT INTO policies (name, primary_key, secondary_key) VALUES ('service', ?1, ?1)",
            [&old_key],
        )
        .expect("old service policy");
    }
    let relay = Relay::start_in(directory, &[]).await;
    assert!(
        relay
            .service_connection_string
            .ends_with(&format!("SharedAccessKey={old_key}")),
        "the service key is kept: {}",
        relay.service_connection_string
    );
    let (lines, _) = cli_ok(&relay, &["policy", "list"]).await;
    assert!(lines.contains("service\tservice-connect\n"), "{lines}");
    assert!(
        lines.contains("registryReadWrite\tregistry-read,registry-write\n"),
        "{lines}"
    );
    let old_service = token_for(&relay.service_connection_string);
    let (status, _, body) = raw_https(&relay, &create_stream_request(&old_service)).await;
    assert_eq!(status, 404, "the old key still creates streams: {body}");
    let (shown, _) = cli_ok(&relay, &["policy", "show"]).await;
    assert_eq!(shown.trim(), relay.service_connection_string);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_live_and_ready_answer_on_the_admin_listener() {
    let relay = Relay::start(&[]).await;
    let (status, body) = admin(&relay, "GET", "/health/live", None).await;
    assert_eq!((status, body.trim()), (200, "ok"));
    let (status, body) = admin(&relay, "GET", "/health/ready", None).await;
    assert_eq!((status, body.trim()), (200, "ready"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_admin_tls_the_console_api_and_cli_speak_https() {
    let relay = Relay::start(&["--admin-tls"]).await;
    relay.add_device("Remote").await;
    let port = admin_port(&relay);
    let (status, _, body) = raw_https_to(
        port,
        &relay.tls(),
        "GET /health/live HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!((status, body.trim()), (200, "ok"), "health over TLS");
    let (status, _, body) = raw_http(
        &relay.admin_address,
        "GET /health/live HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 0, "no plain-HTTP answer on a TLS listener: {body}");

    // The console's session cookie is Secure over TLS.
    let (key, _) = cli_ok(&relay, &["policy", "show", "registryReadWrite"]).await;
    let key = key
        .trim()
        .split(';')
        .find_map(|part| part.strip_prefix("SharedAccessKey="))
        .expect("a key")
        .to_string();
    let form = format!(
        "policy=registryReadWrite&key={}",
        percent_encoding::utf8_percent_encode(&key, percent_encoding::NON_ALPHANUMERIC)
    );
    let (status, headers, body) = raw_https_to(
        port,
        &relay.tls(),
        &format!(
            "POST /console/sign-in HTTP/1.1\r\nHost: localhost:{port}\r\n\
             Origin: https://localhost:{port}\r\n\
             Content-Type: application/x-www-form-urlencoded\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{form}",
            form.len()
        ),
    )
    .await;
    assert_eq!(status, 303, "signed in: {body}");
    let cookie = headers
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case("set-cookie"))
        .map(|(_, value)| value.as_str())
        .expect("a session cookie");
    assert!(cookie.contains("; Secure"), "{cookie}");

    // The CLI finds the https URL in the data dir and trusts the data dir's
    // certificate: live state, not the registry-only fallback.
    let (listing, stderr) = cli_ok(&relay, &["device", "list"]).await;
    assert!(stderr.is_empty(), "no fallback note: {stderr}");
    assert!(listing.contains("Remote\toffline"), "{listing}");
    cli_ok(&relay, &["stream", "list"]).await;
    // Plain HTTP to it fails with the reason, and the registry is shown.
    let plain = format!("http://{}", relay.admin_address);
    let (listing, stderr) = cli_ok(&relay, &["device", "list", "--admin-url", &plain]).await;
    assert_eq!(listing, "Remote\n");
    assert!(stderr.contains("registry only"), "{stderr}");
}

/// The admin port of a relay's `Admin listening on` line.
fn admin_port(relay: &Relay) -> u16 {
    relay
        .admin_address
        .rsplit(':')
        .next()
        .and_then(|port| port.parse().ok())
        .expect("the admin port")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_client_of_the_tls_admin_listener_is_cut_at_the_default_handshake_deadline() {
    use tokio::io::AsyncReadExt;
    // The default --tls-handshake-timeout (10 s): the wait outlives it.
    let relay = Relay::start(&["--admin-tls"]).await;
    let mut silent = tokio::net::TcpStream::connect(&relay.admin_address)
        .await
        .expect("connect");
    let started = tokio::time::Instant::now();
    // Others are served meanwhile: the handshake waits in its own task.
    let (status, _, _) = raw_https_to(
        admin_port(&relay),
        &relay.tls(),
        "GET /health/live HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 200, "served beside a silent client");
    let mut byte = [0u8; 1];
    let closed = tokio::time::timeout(Duration::from_secs(20), silent.read(&mut byte)).await;
    let waited = started.elapsed();
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "the silent connection was not closed within 20 s: {closed:?}"
    );
    assert!(
        waited >= Duration::from_secs(9) && waited < Duration::from_secs(14),
        "cut after {waited:?}, not at the 10 s handshake deadline"
    );
}

/// Polls `relay device list` until `check` accepts its output.
async fn device_list_until(relay: &Relay, what: &str, check: impl Fn(&str) -> bool) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (stdout, stderr) = cli_ok(relay, &["device", "list"]).await;
        if check(&stdout) {
            assert!(stderr.is_empty(), "live list notes nothing: {stderr}");
            return stdout;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "relay device list never showed {what}:\n{stdout}{stderr}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn line_of<'a>(listing: &'a str, device_id: &str) -> &'a str {
    listing
        .lines()
        .find(|line| line.starts_with(&format!("{device_id}\t")))
        .unwrap_or_else(|| panic!("{device_id} not listed:\n{listing}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_list_follows_a_device_proxy_and_falls_back_to_the_registry() {
    let relay = Relay::start(&[]).await;
    let connection_string = relay.add_device("Kiosk").await;
    relay.add_device("Idle").await;
    let listing = device_list_until(&relay, "two offline devices", |text| {
        text.contains("Kiosk\toffline") && text.contains("Idle\toffline")
    })
    .await;
    assert!(listing.starts_with("DEVICE\tSTATE"), "{listing}");

    let (echo_port, _echo) = devstreams_tests::start_echo_server().await;
    let mut device_proxy = start_device_proxy(&relay, &connection_string, echo_port, &[]).await;
    let listing = device_list_until(&relay, "Kiosk online", |text| {
        text.contains("Kiosk\tonline")
    })
    .await;
    let kiosk = line_of(&listing, "Kiosk");
    assert!(kiosk.contains("\t127.0.0.1:"), "address shown: {kiosk}");
    assert!(line_of(&listing, "Idle").contains("\toffline"), "{listing}");
    // The API says the same in JSON.
    let registry_policy = cli_ok(&relay, &["policy", "show", "registryReadWrite"])
        .await
        .0;
    let reader = token_for(registry_policy.trim());
    let (status, body) = admin(&relay, "GET", "/api/devices", Some(&reader)).await;
    assert_eq!(status, 200, "{body}");
    let answer: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    let kiosk = answer["devices"]
        .as_array()
        .and_then(|devices| devices.iter().find(|device| device["deviceId"] == "Kiosk"))
        .unwrap_or_else(|| panic!("Kiosk in {body}"));
    assert_eq!(kiosk["online"], true, "{body}");
    assert!(kiosk["connectedSince"].is_u64(), "{body}");

    let _ = device_proxy.child.kill().await;
    let listing = device_list_until(&relay, "Kiosk offline again", |text| {
        text.contains("Kiosk\toffline")
    })
    .await;
    assert!(
        line_of(&listing, "Kiosk").ends_with(" ago"),
        "last seen shown: {listing}"
    );

    // Without a running relay: the registry alone, and a note on stderr.
    let mut relay = relay;
    let _ = relay.process.child.kill().await;
    let (stdout, stderr) = cli_ok(&relay, &["device", "list"]).await;
    assert_eq!(stdout, "Idle\nKiosk\n");
    assert!(stderr.contains("registry only"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_stream_close_ends_a_live_ssh_session_and_histograms_count_it() {
    if !require_sshd() {
        return;
    }
    let sshd = Sshd::start().await;
    let relay = Relay::start(&[]).await;
    let connection_string = relay.add_device("MyDevice").await;
    let _device_proxy = start_device_proxy(&relay, &connection_string, sshd.port, &[]).await;
    wait_until_device_connected(&relay, "MyDevice").await;
    let (_service_proxy, local_port) = start_service_proxy(&relay, "MyDevice", &[]).await;
    let mut session = sshd
        .ssh(local_port, "echo started; sleep 300")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("ssh starts");

    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let stream_id = loop {
        let (listing, _) = cli_ok(&relay, &["stream", "list"]).await;
        let live = listing
            .lines()
            .skip(1)
            .find(|line| line.split('\t').nth(1) == Some("MyDevice"));
        if let Some(line) = live {
            let fields: Vec<&str> = line.split('\t').collect();
            let from_device: u64 = fields[6].parse().expect("a byte count");
            // sshd's banner at least has crossed.
            if from_device > 0 {
                break fields[0].to_string();
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the ssh session never showed in relay stream list:\n{listing}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        tokio::time::timeout(Duration::from_secs(5), session.wait())
            .await
            .is_err(),
        "the session runs until closed"
    );
    cli_ok(&relay, &["stream", "close", &stream_id]).await;
    let status = tokio::time::timeout(Duration::from_secs(20), session.wait())
        .await
        .expect("ssh ends once its stream is closed")
        .expect("ssh exit status");
    assert!(!status.success(), "ssh did not finish its sleep: {status}");
    // The relay forgets the stream once both sockets' close handshakes end,
    // a moment after ssh has seen its connection close.
    let gone_by = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let output = relay.cli(&["stream", "close", &stream_id]).await;
        if !output.status.success() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < gone_by,
            "a closed stream is gone within seconds"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let (status, metrics) = admin(&relay, "GET", "/metrics", None).await;
    assert_eq!(status, 200);
    for name in [
        "devstreams_stream_setup_seconds_count",
        "devstreams_stream_duration_seconds_count",
        "devstreams_stream_bytes_device_to_service_count",
        "devstreams_stream_bytes_service_to_device_count",
    ] {
        let count: u64 = metrics
            .lines()
            .find_map(|line| line.strip_prefix(&format!("{name} ")))
            .and_then(|value| value.trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} missing:\n{metrics}"));
        assert!(count >= 1, "{name} = {count}");
    }
}
