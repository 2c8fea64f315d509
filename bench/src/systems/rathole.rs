//! rathole over its TLS transport: `rathole --server` on loopback with a
//! self-signed certificate (ECDSA P-256, like the relay's), `rathole
//! --client` trusting it and exposing the target. The operator's connection
//! reaches the server's service port in plain TCP (rathole has no local
//! proxy on the operator's side), so rathole carries one TLS leg where
//! devstreams carries two.
//!
//! rathole's native-TLS build reads its identity as PKCS#12, which the
//! `openssl` command writes; without it rathole is skipped with a reason.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;

use super::devstreams::strings;
use super::{free_port, Programs, Role, System, SystemKind};
use crate::child::{run_to_completion, ChildProcess, Stdout};

const PKCS12_PASSWORD: &str = "bench";
const SERVICE_TOKEN: &str = "bench-token";
const OPENSSL_TIMEOUT: Duration = Duration::from_secs(30);

pub async fn start(programs: &Programs, target: SocketAddr) -> anyhow::Result<System> {
    let rathole = programs.rathole.clone().map_err(anyhow::Error::msg)?;
    let directory = tempfile::Builder::new()
        .prefix("bench-rathole-")
        .tempdir()?;
    let certificate = directory.path().join("cert.pem");
    let private_key = directory.path().join("key.pem");
    let identity = directory.path().join("identity.p12");
    write_certificate(&certificate, &private_key, &identity).await?;

    let control_port = free_port()?;
    let service_port = free_port()?;
    let server_configuration = format!(
        "[server]\nbind_addr = \"127.0.0.1:{control_port}\"\n\n[server.transport]\ntype = \"tls\"\n\n\
         [server.transport.tls]\npkcs12 = \"{}\"\npkcs12_password = \"{PKCS12_PASSWORD}\"\n\n\
         [server.services.bench]\ntoken = \"{SERVICE_TOKEN}\"\nbind_addr = \"127.0.0.1:{service_port}\"\n",
        identity.display()
    );
    let client_configuration = format!(
        "[client]\nremote_addr = \"localhost:{control_port}\"\n\n[client.transport]\ntype = \"tls\"\n\n\
         [client.transport.tls]\ntrusted_root = \"{}\"\nhostname = \"localhost\"\n\n\
         [client.services.bench]\ntoken = \"{SERVICE_TOKEN}\"\nlocal_addr = \"{target}\"\n",
        certificate.display()
    );
    let server_path = directory.path().join("server.toml");
    let client_path = directory.path().join("client.toml");
    std::fs::write(&server_path, server_configuration)?;
    std::fs::write(&client_path, client_configuration)?;

    let environment = [("RUST_LOG", programs.log_level.as_str())];
    let server_arguments = vec![
        "--server".to_string(),
        server_path.to_string_lossy().to_string(),
    ];
    let server = ChildProcess::spawn(
        "rathole server",
        &rathole,
        &server_arguments,
        directory.path(),
        &environment,
        Stdout::Logged,
    )?;
    let client_arguments = vec![
        "--client".to_string(),
        client_path.to_string_lossy().to_string(),
    ];
    let client = ChildProcess::spawn(
        "rathole client",
        &rathole,
        &client_arguments,
        directory.path(),
        &environment,
        Stdout::Logged,
    )?;

    let entry = SocketAddr::from(([127, 0, 0, 1], service_port));
    let mut system = System::with_children(
        SystemKind::Rathole,
        entry,
        vec![(Role::Server, server), (Role::DeviceSide, client)],
        directory,
    );
    system.wait_until_ready().await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    Ok(system)
}

/// A self-signed certificate for localhost and its PKCS#12 bundle.
async fn write_certificate(
    certificate: &Path,
    private_key: &Path,
    identity: &Path,
) -> anyhow::Result<()> {
    let openssl = Path::new("openssl");
    let path = |path: &Path| path.to_string_lossy().to_string();
    run_to_completion(
        openssl,
        &strings(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-keyout",
            &path(private_key),
            "-out",
            &path(certificate),
        ]),
        OPENSSL_TIMEOUT,
    )
    .await
    .context("rathole needs a certificate and the `openssl` command to make one (apt-get install openssl)")?;
    run_to_completion(
        openssl,
        &strings(&[
            "pkcs12",
            "-export",
            "-inkey",
            &path(private_key),
            "-in",
            &path(certificate),
            "-out",
            &path(identity),
            "-passout",
            &format!("pass:{PKCS12_PASSWORD}"),
        ]),
        OPENSSL_TIMEOUT,
    )
    .await
    .context("openssl could not write the PKCS#12 identity rathole reads")?;
    Ok(())
}
