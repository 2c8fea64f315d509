//! Command line of service-proxy; the behaviour lives in the library.

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use service_proxy::Settings;

/// Read when SERVICE_CONNECTION_STRING is unset, as the IoT Hub Node sample does.
const FALLBACK_CONNECTION_STRING_VARIABLE: &str = "IOTHUB_CONNECTION_STRING";

const EXAMPLES: &str = "\
Examples:
  service-proxy \"HostName=relay.example.com:8443;SharedAccessKeyName=service;SharedAccessKey=<key>\" MyDevice 2222
  ssh -p 2222 user@localhost
  service-proxy \"<service connection string>\" MyDevice 2222 --ca-cert relay-data/tls/cert.pem
  service-proxy \"<service connection string>\" MyDevice 3389 --target-port 3389
  SERVICE_CONNECTION_STRING=\"<service connection string>\" STREAMING_TARGET_DEVICE=MyDevice PROXY_PORT=2222 service-proxy
  service-proxy \"<service connection string>\" MyDevice 2222 --proxy http://user:password@proxy.example.com:3128
  HTTPS_PROXY=socks5://10.0.0.1:1080 service-proxy \"<service connection string>\" MyDevice 2222

Environment:
  SERVICE_CONNECTION_STRING  service connection string, when not given as the first argument
                             (IOTHUB_CONNECTION_STRING is read when it is unset)
  STREAMING_TARGET_DEVICE    device id, when not given as the second argument
  PROXY_PORT                 local port, when not given as the third argument
  DEVSTREAMS_CA_CERT         PEM certificate of the relay, when not given with --ca-cert
  HTTPS_PROXY, ALL_PROXY     proxy for the relay, when not given with --proxy (also lowercase)
  NO_PROXY                   hosts reached without the proxy: names, .domains, addresses, CIDRs, *
  RUST_LOG                   log filter for stderr (default: info)

Once listening, it prints one line on stdout: `Listening on 127.0.0.1:2222`.
`relay policy show` prints the service connection string.";

/// Listens on a local port and turns every TCP connection into a devstreams
/// stream to one device (sshd on the device's port 22 by default).
#[derive(Debug, Parser)]
#[command(name = "service-proxy", version, after_help = EXAMPLES)]
struct Arguments {
    /// Service connection string: HostName=…;SharedAccessKeyName=…;SharedAccessKey=…
    #[arg(
        value_name = "CONNECTION_STRING",
        env = "SERVICE_CONNECTION_STRING",
        hide_env_values = true
    )]
    connection_string: Option<String>,

    /// Id of the device to reach
    #[arg(value_name = "DEVICE_ID", env = "STREAMING_TARGET_DEVICE")]
    device_id: Option<String>,

    /// Local port to listen on; 0 picks a free one
    #[arg(value_name = "LOCAL_PORT", env = "PROXY_PORT", default_value_t = 2222)]
    local_port: u16,

    /// Local address to listen on
    #[arg(long, value_name = "ADDRESS", default_value = "127.0.0.1")]
    bind: IpAddr,

    /// Port on the device to reach; without it the device uses its default target
    #[arg(long, value_name = "PORT", value_parser = clap::value_parser!(u16).range(1..))]
    target_port: Option<u16>,

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

    /// Stream name sent with every stream request
    #[arg(long, value_name = "NAME", default_value = "TestStream")]
    stream_name: String,

    /// How long the relay may wait for the device to be connected, in seconds
    /// (short, so an offline device is reported promptly; raise it to ride out
    /// a device's re-dial after an outage)
    #[arg(long, value_name = "SECONDS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    connect_timeout: u64,

    /// How long the relay may wait for the device to accept or reject, in
    /// seconds (device-proxy answers within its --target-connect-timeout)
    #[arg(long, value_name = "SECONDS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    response_timeout: u64,

    /// Do not ask to carry TCP half-closes through the stream
    #[arg(long)]
    no_half_close: bool,

    /// Most local connections served at once; more are closed at once
    #[arg(long, value_name = "N", default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    max_connections: u32,
    /// Seconds between WebSocket pings on stream sockets; a relay silent for 3 intervals ends the stream (0 = off)
    #[arg(long, value_name = "SECONDS", default_value_t = framing::pump::DEFAULT_PING_INTERVAL.as_secs(), value_parser = clap::value_parser!(u64).range(0..=framing::pump::MAX_PING_INTERVAL.as_secs()))]
    ping_interval: u64,

    /// Do not ask for resumable sessions (a connection then ends with its stream)
    #[arg(long)]
    no_resume: bool,

    /// Unacknowledged bytes kept per session and direction for a resume, in KiB; when full, reading the local connection pauses
    #[arg(long, value_name = "KIB", default_value_t = (framing::session::DEFAULT_REPLAY_BUFFER / 1024) as u64, value_parser = clap::value_parser!(u64).range(16..=1024 * 1024))]
    resume_buffer: u64,

    /// How long a session whose stream broke keeps trying to resume, in seconds; then the local connection is reset
    #[arg(long, value_name = "SECONDS", default_value_t = framing::session::DEFAULT_RESUME_TIMEOUT.as_secs(), value_parser = clap::value_parser!(u64).range(1..=86400))]
    resume_timeout: u64,
}

fn main() -> ExitCode {
    let arguments = Arguments::parse();
    let connection_string = arguments
        .connection_string
        .filter(|value| !value.is_empty())
        .or_else(|| {
            std::env::var(FALLBACK_CONNECTION_STRING_VARIABLE)
                .ok()
                .filter(|value| !value.is_empty())
        });
    let Some(connection_string) = connection_string else {
        return fail("no service connection string: pass it as the first argument or set SERVICE_CONNECTION_STRING (`relay policy show` prints one)");
    };
    let Some(device_id) = arguments.device_id.filter(|value| !value.is_empty()) else {
        return fail("no device id: pass it as the second argument or set STREAMING_TARGET_DEVICE");
    };
    let proxies = match framing::proxy::ProxySettings::resolve(arguments.proxy.as_deref(), |name| {
        std::env::var(name).ok()
    }) {
        Ok(proxies) => proxies,
        Err(error) => return fail(&error.to_string()),
    };
    framing::process::init_logging("info");
    let settings = Settings {
        connection_string,
        device_id,
        bind: arguments.bind,
        local_port: arguments.local_port,
        target_port: arguments.target_port,
        ca_cert: arguments.ca_cert,
        proxies,
        stream_name: arguments.stream_name,
        connect_timeout: Duration::from_secs(arguments.connect_timeout),
        response_timeout: Duration::from_secs(arguments.response_timeout),
        half_close: !arguments.no_half_close,
        max_connections: arguments.max_connections as usize,
        ping_interval: (arguments.ping_interval > 0)
            .then(|| std::time::Duration::from_secs(arguments.ping_interval)),
        resume: (!arguments.no_resume).then(|| service_proxy::resume::ResumeSettings {
            replay_buffer: (arguments.resume_buffer * 1024) as usize,
            resume_timeout: Duration::from_secs(arguments.resume_timeout),
        }),
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => return fail(&format!("cannot start the async runtime: {error}")),
    };
    match runtime.block_on(service_proxy::run_until_signal(settings)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => fail(&format!("{error:#}")),
    }
}

/// Prints the one line a user reads on failure, and exits 1.
fn fail(message: &str) -> ExitCode {
    eprintln!("service-proxy: error: {message}");
    ExitCode::from(1)
}
