//! Real proxies for the outbound-proxy tests: `tinyproxy` (HTTP CONNECT,
//! optionally with Basic authentication) and `microsocks` (SOCKS5,
//! optionally with user name and password), each on a free loopback port
//! with its own config and log in a temp dir, killed by PID on drop.
//!
//! Their logs are how a test proves traffic went through them: tinyproxy
//! writes `Established connection to host …` and microsocks `connected to
//! …` for each tunnel it opened.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
use tokio::process::{Child, Command};

use crate::cluster::{require_tool, tool_path};
use crate::{free_port, STARTUP_TIMEOUT};

/// Attempts at a free port before giving up (another test may take it).
const PORT_ATTEMPTS: usize = 5;

/// Returns false (and says why) when tinyproxy is missing; panics in CI.
pub fn require_tinyproxy() -> bool {
    require_tool("tinyproxy", "tinyproxy")
}

/// Returns false (and says why) when microsocks is missing; panics in CI.
pub fn require_microsocks() -> bool {
    require_tool("microsocks", "microsocks")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyProgram {
    /// HTTP CONNECT proxy.
    Tinyproxy,
    /// SOCKS5 server.
    Microsocks,
}

impl ProxyProgram {
    fn binary(self) -> &'static str {
        match self {
            ProxyProgram::Tinyproxy => "tinyproxy",
            ProxyProgram::Microsocks => "microsocks",
        }
    }

    fn scheme(self) -> &'static str {
        match self {
            ProxyProgram::Tinyproxy => "http",
            ProxyProgram::Microsocks => "socks5",
        }
    }

    /// The log line each opened tunnel leaves.
    fn tunnel_line(self) -> &'static str {
        match self {
            ProxyProgram::Tinyproxy => "Established connection to host",
            ProxyProgram::Microsocks => ": connected to ",
        }
    }
}

/// One running proxy.
pub struct ProxyServer {
    pub program: ProxyProgram,
    pub port: u16,
    process: Option<Child>,
    directory: tempfile::TempDir,
    /// The only port tinyproxy lets CONNECT reach (the relay's).
    allowed_port: u16,
    log_path: PathBuf,
}

impl ProxyServer {
    /// Starts `program` on a free loopback port, tunnelling to
    /// `allowed_port` only (tinyproxy's `ConnectPort`), asking for
    /// `credentials` (user name, password) when given.
    pub async fn start(
        program: ProxyProgram,
        allowed_port: u16,
        credentials: Option<(&str, &str)>,
    ) -> ProxyServer {
        let directory = tempfile::tempdir().expect("temp dir");
        let log_path = directory.path().join(format!("{}.log", program.binary()));
        let mut server = ProxyServer {
            program,
            port: 0,
            process: None,
            directory,
            allowed_port,
            log_path,
        };
        for _attempt in 0..PORT_ATTEMPTS {
            server.port = free_port();
            if server.launch(credentials).await {
                return server;
            }
        }
        panic!(
            "{} did not start on a free port; its log:\n{}",
            program.binary(),
            server.log()
        );
    }

    /// Stops the proxy and starts it again on the same port with other
    /// credentials, as an administrator fixing its configuration would.
    pub async fn restart(&mut self, credentials: Option<(&str, &str)>) {
        self.stop().await;
        // The port was ours a moment ago; retry briefly in case the kernel
        // still holds it.
        for _attempt in 0..PORT_ATTEMPTS {
            if self.launch(credentials).await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!(
            "{} did not start again on port {}; its log:\n{}",
            self.program.binary(),
            self.port,
            self.log()
        );
    }

    /// The URL a client passes (`--proxy`, `HTTPS_PROXY`), with the
    /// credentials percent-encoded when given.
    pub fn url(&self, credentials: Option<(&str, &str)>) -> String {
        let scheme = self.program.scheme();
        match credentials {
            Some((user, password)) => format!(
                "{scheme}://{}:{}@127.0.0.1:{}",
                utf8_percent_encode(user, NON_ALPHANUMERIC),
                utf8_percent_encode(password, NON_ALPHANUMERIC),
                self.port
            ),
            None => format!("{scheme}://127.0.0.1:{}", self.port),
        }
    }

    /// The proxy as devstreams shows it in logs and errors: no credentials.
    pub fn shown(&self) -> String {
        self.url(None)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Tunnels opened so far (across restarts).
    pub fn tunnels(&self) -> usize {
        self.log().matches(self.program.tunnel_line()).count()
    }

    /// Waits until at least `count` tunnels were opened; returns how many.
    pub async fn wait_for_tunnels(&self, count: usize, timeout: Duration) -> usize {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let tunnels = self.tunnels();
            if tunnels >= count {
                return tunnels;
            }
            if tokio::time::Instant::now() >= deadline {
                panic!(
                    "{} opened {tunnels} tunnels, not {count}, within {timeout:?}; its log:\n{}",
                    self.program.binary(),
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn stop(&mut self) {
        if let Some(mut process) = self.process.take() {
            let _ = process.kill().await;
        }
    }

    /// Starts the program on `self.port`; true once it accepts connections.
    async fn launch(&mut self, credentials: Option<(&str, &str)>) -> bool {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .expect("proxy log file in the test's temp dir");
        let binary = tool_path(self.program.binary())
            .unwrap_or_else(|| PathBuf::from(self.program.binary()));
        let mut command = Command::new(binary);
        match self.program {
            ProxyProgram::Tinyproxy => {
                let config =
                    tinyproxy_config(self.port, self.allowed_port, &self.log_path, credentials);
                let config_path = self.directory.path().join("tinyproxy.conf");
                std::fs::write(&config_path, config).expect("tinyproxy.conf");
                // -d: stay in the foreground, so the PID we hold is its own.
                command.arg("-d").arg("-c").arg(&config_path);
            }
            ProxyProgram::Microsocks => {
                command
                    .args(["-i", "127.0.0.1", "-p"])
                    .arg(self.port.to_string());
                if let Some((user, password)) = credentials {
                    command.args(["-u", user, "-P", password]);
                }
            }
        }
        let mut process = command
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().expect("log file handle")))
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|error| panic!("cannot start {}: {error}", self.program.binary()));
        let deadline = tokio::time::Instant::now() + STARTUP_TIMEOUT;
        while tokio::time::Instant::now() < deadline {
            if let Ok(Some(_)) = process.try_wait() {
                return false;
            }
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok()
            {
                self.process = Some(process);
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = process.kill().await;
        false
    }
}

/// tinyproxy's config: loopback only, CONNECT to `allowed_port` only, a
/// log line per connection, Basic authentication when asked. (tinyproxy
/// takes only plain words as user name and password.)
fn tinyproxy_config(
    port: u16,
    allowed_port: u16,
    log_path: &Path,
    credentials: Option<(&str, &str)>,
) -> String {
    let mut config = format!(
        "Port {port}\nListen 127.0.0.1\nTimeout 600\nMaxClients 100\nAllow 127.0.0.1\n\
         LogFile \"{}\"\nLogLevel Connect\nConnectPort {allowed_port}\n",
        log_path.display()
    );
    if let Some((user, password)) = credentials {
        config.push_str(&format!("BasicAuth {user} {password}\n"));
    }
    config
}
