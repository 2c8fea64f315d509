//! An operator's SSH session through the tunnel: real sshd, real ssh, real
//! relay, device-proxy and service-proxy processes, TLS on every relay leg.

use std::time::Duration;

use devstreams_tests::{
    require_sshd, sha256_hex, start_device_proxy, start_service_proxy, wait_until_device_connected,
    Process, Relay, Sshd,
};

struct Tunnel {
    sshd: Sshd,
    local_port: u16,
    _relay: Relay,
    _device_proxy: Process,
    _service_proxy: Process,
}

async fn tunnel_to_sshd() -> Tunnel {
    let sshd = Sshd::start().await;
    let relay = Relay::start(&[]).await;
    let device_connection_string = relay.add_device("MyDevice").await;
    let device_proxy = start_device_proxy(&relay, &device_connection_string, sshd.port, &[]).await;
    wait_until_device_connected(&relay, "MyDevice").await;
    let (service_proxy, local_port) = start_service_proxy(&relay, "MyDevice", &[]).await;
    Tunnel {
        sshd,
        local_port,
        _relay: relay,
        _device_proxy: device_proxy,
        _service_proxy: service_proxy,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_command_runs_on_the_device_through_the_tunnel() {
    if !require_sshd() {
        return;
    }
    let tunnel = tunnel_to_sshd().await;
    let output = tokio::time::timeout(
        Duration::from_secs(60),
        tunnel.sshd.ssh(tunnel.local_port, "echo ok").output(),
    )
    .await
    .expect("ssh finishes")
    .expect("ssh runs");
    assert!(
        output.status.success(),
        "ssh failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_mebibytes_cross_the_tunnel_both_ways_unchanged() {
    if !require_sshd() {
        return;
    }
    let tunnel = tunnel_to_sshd().await;
    let size = 16 * 1024 * 1024;
    let mut data = vec![0u8; size];
    let mut state = 0x9e3779b97f4a7c15u64;
    for chunk in data.chunks_mut(8) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
    }
    let expected = sha256_hex(&data);
    let local_file = tunnel.sshd.directory.path().join("upload.bin");
    let remote_file = tunnel.sshd.directory.path().join("received.bin");
    std::fs::write(&local_file, &data).expect("write the upload");

    // Upload: ssh's stdin is the file; the device writes it with cat.
    let mut upload = tunnel.sshd.ssh(
        tunnel.local_port,
        &format!("cat > {}", remote_file.display()),
    );
    upload.stdin(std::fs::File::open(&local_file).expect("open the upload"));
    let status = tokio::time::timeout(Duration::from_secs(120), upload.status())
        .await
        .expect("upload finishes")
        .expect("ssh runs");
    assert!(status.success(), "upload failed");
    assert_eq!(
        sha256_hex(&std::fs::read(&remote_file).expect("received file")),
        expected,
        "upload changed the bytes"
    );

    // Download: the device cats the file back to us.
    let output = tokio::time::timeout(
        Duration::from_secs(120),
        tunnel
            .sshd
            .ssh(tunnel.local_port, &format!("cat {}", remote_file.display()))
            .output(),
    )
    .await
    .expect("download finishes")
    .expect("ssh runs");
    assert!(
        output.status.success(),
        "download failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(output.stdout.len(), size);
    assert_eq!(
        sha256_hex(&output.stdout),
        expected,
        "download changed the bytes"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_ssh_sessions_at_once_all_succeed() {
    if !require_sshd() {
        return;
    }
    let tunnel = tunnel_to_sshd().await;
    let sessions: Vec<_> = (0..10)
        .map(|index| {
            let mut command = tunnel.sshd.ssh(
                tunnel.local_port,
                &format!("sleep 0.5; echo session-{index}"),
            );
            async move { (index, command.output().await) }
        })
        .collect();
    let results = tokio::time::timeout(
        Duration::from_secs(120),
        futures_util::future::join_all(sessions),
    )
    .await
    .expect("all sessions finish");
    for (index, output) in results {
        let output = output.expect("ssh runs");
        assert!(
            output.status.success(),
            "session {index} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&output.stdout).trim(),
            format!("session-{index}")
        );
    }
}
