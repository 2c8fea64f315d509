//! Command line of device-proxy; the behaviour lives in the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::CommandFactory;
use device_proxy::targets::Target;
use device_proxy::Settings;

const EXAMPLES: &str = "\
Examples:
  device-proxy \"HostName=relay.example.com:8443;DeviceId=MyDevice;SharedAccessKey=<key>\" localhost 22
  device-proxy \"<device connection string>\" localhost 22 --ca-cert relay-data/tls/cert.pem
  device-proxy \"<device connection string>\" localhost 22 --allow localhost:3389 --allow 192.168.1.20:80
  DEVICE_CONNECTION_STRING=\"<device connection string>\" device-proxy
  device-proxy \"<device connection string>\" localhost 22 --proxy http://proxy.example.com:3128
  device-proxy \"<device connection string>\" localhost 22 --proxy socks5://user:password@10.0.0.1:1080
  HTTPS_PROXY=http://proxy.example.com:3128 NO_PROXY=.internal device-proxy \"<device connection string>\"
  device-proxy --completions bash > /usr/share/bash-completion/completions/device-proxy
  device-proxy --man /usr/local/share/man/man1     # writes device-proxy.1

  device-proxy --config /etc/devstreams/device-proxy.toml   # keys: connection_string, target_port, allow = [...], ...

Environment:
  DEVICE_CONNECTION_STRING  device connection string, when not given as the first argument
  DEVICE_CONNECTION_STRING_FILE  file holding it (--connection-string-file)
  DEVSTREAMS_CA_CERT        PEM certificate of the relay, when not given with --ca-cert
  HTTPS_PROXY, ALL_PROXY    proxy for the relay, when not given with --proxy (also lowercase)
  NO_PROXY                  hosts reached without the proxy: names, .domains, addresses, CIDRs, *
  RUST_LOG                  log filter for stderr (default: info)
  DEVSTREAMS_LOG_FORMAT     text or json, when not given with --log-format

`relay device add MyDevice` prints the device connection string.";

/// Bridges devstreams streams to local TCP services (sshd on port 22 by
/// default), dialing out to the relay; no inbound port is needed.
#[derive(Debug, clap::Parser)]
#[command(name = "device-proxy", version, after_help = EXAMPLES)]
struct Arguments {
    /// Device connection string: HostName=…;DeviceId=…;SharedAccessKey=…
    #[arg(
        value_name = "CONNECTION_STRING",
        env = "DEVICE_CONNECTION_STRING",
        hide_env_values = true
    )]
    connection_string: Option<String>,

    /// Read the device connection string from this file (trimmed), e.g. a systemd credential
    #[arg(long, value_name = "FILE", env = "DEVICE_CONNECTION_STRING_FILE")]
    connection_string_file: Option<PathBuf>,

    /// Read the SharedAccessKey from this file (trimmed) and add it to a connection string that has none
    #[arg(long, value_name = "FILE")]
    shared_access_key_file: Option<PathBuf>,

    /// Host of the local service that streams reach when they name no target
    #[arg(value_name = "TARGET_HOST", default_value = "localhost")]
    target_host: String,

    /// Port of that service
    #[arg(value_name = "TARGET_PORT", default_value_t = 22, value_parser = clap::value_parser!(u16).range(1..))]
    target_port: u16,

    /// Also expose this HOST:PORT to services that ask for it (repeatable)
    #[arg(long = "allow", value_name = "HOST:PORT", value_parser = parse_target)]
    allow: Vec<Target>,

    /// PEM certificate to trust for the relay, besides the system roots
    #[arg(long, value_name = "PEM", env = "DEVSTREAMS_CA_CERT")]
    ca_cert: Option<PathBuf>,

    /// Reach the relay through this proxy: http://[USER:PASSWORD@]HOST:PORT
    /// (HTTP CONNECT) or socks5://[USER:PASSWORD@]HOST:PORT (SOCKS5; the
    /// proxy resolves the relay's name). `none` turns proxies off. Without
    /// it, HTTPS_PROXY and ALL_PROXY are read as curl reads them; NO_PROXY
    /// lists hosts reached directly
    #[arg(long, value_name = "URL")]
    proxy: Option<String>,

    /// MQTT keep-alive of the control channel, in seconds
    #[arg(long, value_name = "SECONDS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=65535))]
    keep_alive: u64,

    /// Longest wait between re-dials of the relay, in seconds
    #[arg(long, value_name = "SECONDS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=86400))]
    max_backoff: u64,

    /// Deadline for connecting to a local target, in seconds
    #[arg(long, value_name = "SECONDS", default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=3600))]
    target_connect_timeout: u64,

    /// Most streams open at once; further requests are rejected
    #[arg(long, value_name = "N", default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    max_streams: u32,
    /// Seconds between WebSocket pings on stream sockets; a relay silent for 3 intervals ends the stream (0 = off)
    #[arg(long, value_name = "SECONDS", default_value_t = framing::pump::DEFAULT_PING_INTERVAL.as_secs(), value_parser = clap::value_parser!(u64).range(0..=framing::pump::MAX_PING_INTERVAL.as_secs()))]
    ping_interval: u64,

    /// Do not agree to resumable sessions (a stream then ends with its WebSocket)
    #[arg(long)]
    no_resume: bool,

    /// Unacknowledged bytes kept per session and direction for a resume, in KiB; when full, reading the target pauses
    #[arg(long, value_name = "KIB", default_value_t = (framing::session::DEFAULT_REPLAY_BUFFER / 1024) as u64, value_parser = clap::value_parser!(u64).range(16..=1024 * 1024))]
    resume_buffer: u64,

    /// How long a session whose stream broke waits for the service side to resume it, in seconds; then the target connection is reset
    #[arg(long, value_name = "SECONDS", default_value_t = framing::session::DEFAULT_RESUME_TIMEOUT.as_secs(), value_parser = clap::value_parser!(u64).range(1..=86400))]
    resume_timeout: u64,

    /// Print the shell completion script for SHELL (bash, zsh, fish, elvish, powershell) and exit
    #[arg(long, value_name = "SHELL", value_enum, hide = true)]
    completions: Option<framing::manuals::Shell>,

    /// Write the man page device-proxy.1 into DIRECTORY and exit
    #[arg(long, value_name = "DIRECTORY", hide = true)]
    man: Option<PathBuf>,
}

fn parse_target(text: &str) -> Result<Target, String> {
    Target::parse(text).map_err(|error| error.to_string())
}

fn main() -> ExitCode {
    framing::copy_tuning::restart_if_needed();
    let parsed = framing::config_file::parse::<Arguments>(&framing::config_file::ProgramConfig {
        default_path: None,
        positionals: framing::config_file::Positionals::Included,
    });
    let arguments = parsed.arguments;
    if let Some(answered) = framing::manuals::answer_manual_flags(
        Arguments::command(),
        arguments.completions,
        arguments.man.as_deref(),
    ) {
        return match answered {
            Ok(()) => ExitCode::SUCCESS,
            Err(message) => fail(&message),
        };
    }
    let connection_string = match framing::config_file::value_or_file(
        &parsed.matches,
        "connection_string",
        "connection_string_file",
    ) {
        Ok(value) => value,
        Err(error) => return fail(&error),
    };
    let Some(mut connection_string) = connection_string else {
        return fail("no device connection string: pass it as the first argument, set DEVICE_CONNECTION_STRING or use connection_string_file (`relay device add ID` prints one)");
    };
    if let Some(key_file) = &arguments.shared_access_key_file {
        connection_string =
            match framing::config_file::with_key_from_file(&connection_string, key_file) {
                Ok(value) => value,
                Err(error) => return fail(&error),
            };
    }
    let proxies = match framing::proxy::ProxySettings::resolve(arguments.proxy.as_deref(), |name| {
        std::env::var(name).ok()
    }) {
        Ok(proxies) => proxies,
        Err(error) => return fail(&error.to_string()),
    };
    framing::process::init_logging_as("info", parsed.log_format);
    let settings = Settings {
        connection_string,
        target: Target::new(arguments.target_host, arguments.target_port),
        allowed: arguments.allow,
        ca_cert: arguments.ca_cert,
        proxies,
        keep_alive: Duration::from_secs(arguments.keep_alive),
        max_backoff: Duration::from_secs(arguments.max_backoff),
        target_connect_timeout: Duration::from_secs(arguments.target_connect_timeout),
        max_streams: arguments.max_streams as usize,
        ping_interval: (arguments.ping_interval > 0)
            .then(|| std::time::Duration::from_secs(arguments.ping_interval)),
        resume: (!arguments.no_resume).then(|| device_proxy::bridge::ResumeSettings {
            replay_buffer: (arguments.resume_buffer * 1024) as usize,
            resume_timeout: Duration::from_secs(arguments.resume_timeout),
        }),
    };
    // One thread runs every stream: a device-proxy moves one device's
    // traffic, which one core keeps up with, and each worker thread costs
    // its stack and the multi-thread scheduler's code (issue 15: idle RSS).
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => return fail(&format!("cannot start the async runtime: {error}")),
    };
    match runtime.block_on(device_proxy::run_until_signal(settings)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => fail(&format!("{error:#}")),
    }
}

/// Prints the one line a user reads on failure, and exits 1.
fn fail(message: &str) -> ExitCode {
    eprintln!("device-proxy: error: {message}");
    ExitCode::from(1)
}
