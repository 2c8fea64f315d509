//! Real nginx in front of a relay, as an operator would put it: TLS ends at
//! nginx, WebSocket upgrades pass through (`proxy_http_version 1.1`,
//! `Upgrade`, `Connection`), and the client's address goes in
//! `X-Forwarded-For`. nginx's own timeouts stay at their defaults
//! (`proxy_read_timeout 60s`), because idle streams must live with them.
//!
//! nginx runs in the foreground (`daemon off`) with its configuration, pid
//! file, logs and temp directories in a temp dir of its own, on a free
//! loopback port, and is killed by its PID when the test drops it. A
//! missing nginx is a SKIPPED line on a developer's machine and a panic
//! under `CI=true` (`.ci/run` installs `nginx-light`).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

use crate::cluster::{require_tool, tool_path};
use crate::{free_port, STARTUP_TIMEOUT};

/// The nginx binary (Debian package `nginx-light`).
pub const NGINX: &str = "nginx";
/// Attempts at finding a free port before giving up.
const PORT_ATTEMPTS: usize = 5;

/// Returns false (and says why) when the nginx tests must be skipped;
/// panics in CI, where a missing nginx is a broken setup.
pub fn require_nginx() -> bool {
    require_tool(NGINX, "nginx-light")
}

/// How nginx reaches the relay.
#[derive(Debug, Clone)]
pub struct NginxOptions {
    /// `host:port` of the relay's plain-HTTP main listener (`--no-tls`).
    pub upstream: String,
    /// PEM certificate and key nginx serves TLS with.
    pub certificate: PathBuf,
    pub private_key: PathBuf,
    /// `proxy_bind`: the address nginx connects to the relay from, so the
    /// relay can tell nginx (trusted) from clients on 127.0.0.1.
    pub bind_address: Option<String>,
}

/// A running nginx; killed by PID on drop.
pub struct Nginx {
    pub process: Child,
    pub directory: tempfile::TempDir,
    pub port: u16,
}

impl Nginx {
    pub async fn start(options: &NginxOptions) -> Nginx {
        let directory = tempfile::tempdir().expect("temp dir");
        let config_path = directory.path().join("nginx.conf");
        let log_path = directory.path().join("stderr.log");
        let mut last_log = String::new();
        for _attempt in 0..PORT_ATTEMPTS {
            let port = free_port();
            std::fs::write(&config_path, config(options, directory.path(), port))
                .expect("nginx.conf");
            let log = std::fs::File::create(&log_path).expect("nginx log file");
            let mut process = Command::new(tool_path(NGINX).unwrap_or_else(|| NGINX.into()))
                .arg("-c")
                .arg(&config_path)
                .arg("-p")
                .arg(directory.path())
                .arg("-e")
                .arg(directory.path().join("error.log"))
                .stdin(Stdio::null())
                .stdout(Stdio::from(log.try_clone().expect("nginx log file handle")))
                .stderr(Stdio::from(log))
                .kill_on_drop(true)
                .spawn()
                .unwrap_or_else(|error| panic!("cannot start {NGINX}: {error}"));
            let deadline = tokio::time::Instant::now() + STARTUP_TIMEOUT;
            while tokio::time::Instant::now() < deadline {
                if let Ok(Some(_)) = process.try_wait() {
                    break;
                }
                if tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .is_ok()
                {
                    return Nginx {
                        process,
                        directory,
                        port,
                    };
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let _ = process.kill().await;
            last_log = std::fs::read_to_string(&log_path).unwrap_or_default()
                + &std::fs::read_to_string(directory.path().join("error.log")).unwrap_or_default();
            if !last_log.contains("Address already in use") {
                break;
            }
        }
        panic!("nginx did not start; its log:\n{last_log}");
    }

    /// `localhost:PORT`: the HostName for connection strings through nginx.
    pub fn host_name(&self) -> String {
        format!("localhost:{}", self.port)
    }

    /// nginx's access log: one line per request, upgrades included.
    pub fn access_log(&self) -> String {
        std::fs::read_to_string(self.directory.path().join("access.log")).unwrap_or_default()
    }
}

/// Whether this process runs as root (nginx's workers then need `user root`
/// to read the certificate in our private temp dir).
fn running_as_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|output| String::from_utf8_lossy(&output.stdout).trim() == "0")
        .unwrap_or(false)
}

/// The whole configuration: one TLS server that forwards everything to the
/// relay with WebSocket upgrades and the forwarding headers, nginx's
/// timeouts at their defaults.
fn config(options: &NginxOptions, directory: &Path, port: u16) -> String {
    let path = |name: &str| directory.join(name).display().to_string();
    let user = match running_as_root() {
        true => "user root;\n",
        false => "",
    };
    let bind = options
        .bind_address
        .as_ref()
        .map(|address| format!("            proxy_bind {address};\n"))
        .unwrap_or_default();
    format!(
        "{user}daemon off;\n\
         worker_processes 1;\n\
         pid {pid};\n\
         error_log {error_log} info;\n\
         events {{ worker_connections 1024; }}\n\
         http {{\n\
         \x20   access_log {access_log};\n\
         \x20   client_body_temp_path {client_body};\n\
         \x20   proxy_temp_path {proxy_temp};\n\
         \x20   fastcgi_temp_path {fastcgi_temp};\n\
         \x20   uwsgi_temp_path {uwsgi_temp};\n\
         \x20   scgi_temp_path {scgi_temp};\n\
         \x20   map $http_upgrade $connection_upgrade {{\n\
         \x20       default upgrade;\n\
         \x20       ''      close;\n\
         \x20   }}\n\
         \x20   server {{\n\
         \x20       listen 127.0.0.1:{port} ssl;\n\
         \x20       ssl_certificate {certificate};\n\
         \x20       ssl_certificate_key {private_key};\n\
         \x20       location / {{\n\
         \x20           proxy_pass http://{upstream};\n\
         \x20           proxy_http_version 1.1;\n\
         \x20           proxy_set_header Upgrade $http_upgrade;\n\
         \x20           proxy_set_header Connection $connection_upgrade;\n\
         \x20           proxy_set_header Host $http_host;\n\
         \x20           proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;\n\
         \x20           proxy_set_header X-Forwarded-Proto $scheme;\n\
         \x20           proxy_set_header X-Forwarded-Host $http_host;\n\
         {bind}\
         \x20       }}\n\
         \x20   }}\n\
         }}\n",
        pid = path("nginx.pid"),
        error_log = path("error.log"),
        access_log = path("access.log"),
        client_body = path("client_body"),
        proxy_temp = path("proxy_temp"),
        fastcgi_temp = path("fastcgi_temp"),
        uwsgi_temp = path("uwsgi_temp"),
        scgi_temp = path("scgi_temp"),
        certificate = options.certificate.display(),
        private_key = options.private_key.display(),
        upstream = options.upstream,
    )
}
