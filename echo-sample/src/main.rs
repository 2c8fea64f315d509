//! The device-streams echo sample, after IoT Hub's quickstarts: a device
//! that echoes every message back, a service that sends one message and
//! checks the echo, and `demo`, which runs a relay and both in one process.

mod demo;
mod device;
mod service;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

const EXAMPLES: &str = "\
Examples:
  echo-sample demo                                     # relay + device + service on loopback, nothing to set up
  echo-sample device \"HostName=localhost:8443;DeviceId=MyDevice;SharedAccessKey=…\" --ca-cert relay-data/tls/cert.pem
  echo-sample service \"HostName=localhost:8443;SharedAccessKeyName=service;SharedAccessKey=…\" MyDevice --ca-cert relay-data/tls/cert.pem
  echo-sample device \"<device connection string>\" --proxy socks5://user:password@10.0.0.1:1080
  echo-sample completions fish > ~/.config/fish/completions/echo-sample.fish
  echo-sample man /usr/local/share/man/man1         # echo-sample.1 and one page per subcommand
  echo-sample service --config echo.toml               # keys: connection_string, device_id, ca_cert, message, ...

Environment: DEVICE_CONNECTION_STRING, SERVICE_CONNECTION_STRING (or IOTHUB_CONNECTION_STRING),
STREAMING_TARGET_DEVICE, DEVSTREAMS_CA_CERT, HTTPS_PROXY / ALL_PROXY / NO_PROXY, RUST_LOG, DEVSTREAMS_LOG_FORMAT";

#[derive(Parser)]
#[command(name = "echo-sample", version, about = "Device streams echo sample: device, service, and an all-in-one demo", after_help = EXAMPLES)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Echo every message of every accepted stream back to the service.
    Device {
        /// Device connection string.
        #[arg(env = "DEVICE_CONNECTION_STRING", hide_env_values = true)]
        connection_string: String,
        /// Extra CA certificate (PEM) to trust, e.g. the relay's self-signed cert.pem.
        #[arg(long, env = "DEVSTREAMS_CA_CERT")]
        ca_cert: Option<PathBuf>,
        /// Reach the relay through this proxy (http://… or socks5://…, `none` for no proxy); default: HTTPS_PROXY / ALL_PROXY, NO_PROXY as curl reads them.
        #[arg(long, value_name = "URL")]
        proxy: Option<String>,
    },
    /// Open a stream to the device, send one message and check its echo.
    Service {
        /// Service connection string.
        #[arg(env = "SERVICE_CONNECTION_STRING", hide_env_values = true)]
        connection_string: Option<String>,
        /// Device to open the stream to.
        #[arg(env = "STREAMING_TARGET_DEVICE", default_value = "MyDevice")]
        device_id: String,
        /// Text to send.
        #[arg(long, default_value = service::DEFAULT_MESSAGE)]
        message: String,
        /// Extra CA certificate (PEM) to trust.
        #[arg(long, env = "DEVSTREAMS_CA_CERT")]
        ca_cert: Option<PathBuf>,
        /// Reach the relay through this proxy (http://… or socks5://…, `none` for no proxy); default: HTTPS_PROXY / ALL_PROXY, NO_PROXY as curl reads them.
        #[arg(long, value_name = "URL")]
        proxy: Option<String>,
        /// Seconds the relay may wait for the device to be connected.
        #[arg(long, default_value_t = 60, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..=600))]
        connect_timeout: u64,
    },
    /// Run a relay, an echo device and the echo service on loopback (TLS on).
    Demo,
    /// Print the shell completion script for SHELL (bash, zsh, fish, elvish, powershell).
    Completions {
        #[arg(value_enum)]
        shell: framing::manuals::Shell,
    },
    /// Write the man pages (echo-sample.1 and one per subcommand) into DIRECTORY, naming each
    /// file; without DIRECTORY, print echo-sample.1.
    Man { directory: Option<PathBuf> },
}

/// `--proxy`, else the proxy variables of the environment.
fn proxy_settings(flag: Option<&str>) -> anyhow::Result<framing::proxy::ProxySettings> {
    Ok(framing::proxy::ProxySettings::resolve(flag, |name| {
        std::env::var(name).ok()
    })?)
}

fn main() -> ExitCode {
    let parsed = framing::config_file::parse::<Cli>(&framing::config_file::ProgramConfig {
        default_path: None,
        positionals: framing::config_file::Positionals::Included,
    });
    let cli = parsed.arguments;
    let written = match &cli.command {
        Command::Completions { shell } => Some(framing::manuals::write_completions(
            Cli::command(),
            *shell,
            &mut std::io::stdout(),
        )),
        Command::Man { directory } => Some(framing::manuals::print_man_pages(
            Cli::command(),
            directory.as_deref(),
        )),
        _ => None,
    };
    if let Some(written) = written {
        return match written {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("echo-sample: cannot write the completion script or man pages: {error}");
                ExitCode::FAILURE
            }
        };
    }
    framing::process::init_logging_as("warn", parsed.log_format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("echo-sample: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Device { connection_string, ca_cert, proxy } => {
                device::run(&connection_string, ca_cert.as_deref(), proxy_settings(proxy.as_deref())?).await
            }
            Command::Service { connection_string, device_id, message, ca_cert, proxy, connect_timeout } => {
                let connection_string = connection_string
                    .or_else(|| std::env::var("IOTHUB_CONNECTION_STRING").ok())
                    .ok_or_else(|| anyhow::anyhow!("no service connection string: pass it as the first argument or set SERVICE_CONNECTION_STRING"))?;
                let connect_timeout = std::time::Duration::from_secs(connect_timeout);
                let proxies = proxy_settings(proxy.as_deref())?;
                service::run(&connection_string, &device_id, &message, ca_cert.as_deref(), proxies, connect_timeout).await
            }
            Command::Demo => demo::run().await,
            Command::Completions { .. } | Command::Man { .. } => Ok(()),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("echo-sample: {error:#}");
            ExitCode::FAILURE
        }
    }
}
