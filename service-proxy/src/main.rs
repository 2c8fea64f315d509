//! Command line of service-proxy; the behaviour lives in the library.
//!
//! Three forms share one set of flags: the positional one of the quickstart
//! (`CONNECTION_STRING DEVICE_ID LOCAL_PORT`, one listening port), `--map`
//! (several ports, each for its own device and port) and `--stdio` (one
//! stream on standard input and output, for ssh's ProxyCommand). The two
//! newer forms name their devices themselves, so DEVICE_ID and LOCAL_PORT
//! are refused beside them, and their environment variables ignored.

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::error::ErrorKind;
use clap::parser::ValueSource;
use clap::{CommandFactory, Parser};
use service_proxy::{Forward, Mode, Settings, Target};

/// Read when SERVICE_CONNECTION_STRING is unset, as the IoT Hub Node sample does.
const FALLBACK_CONNECTION_STRING_VARIABLE: &str = "IOTHUB_CONNECTION_STRING";

/// Read (under $XDG_CONFIG_HOME/devstreams, else ~/.config/devstreams) when
/// no --config is given, so `service-proxy --stdio DEVICE` needs no flags.
const USER_CONFIG_FILE: &str = "service.toml";

const EXAMPLES: &str = "\
Examples:
  service-proxy \"HostName=relay.example.com:8443;SharedAccessKeyName=service;SharedAccessKey=<key>\" MyDevice 2222
  ssh -p 2222 user@localhost
  service-proxy \"<service connection string>\" MyDevice 2222 --ca-cert relay-data/tls/cert.pem
  service-proxy \"<service connection string>\" MyDevice 3389 --target-port 3389
  SERVICE_CONNECTION_STRING=\"<service connection string>\" STREAMING_TARGET_DEVICE=MyDevice PROXY_PORT=2222 service-proxy
  service-proxy \"<service connection string>\" MyDevice 2222 --proxy http://user:password@proxy.example.com:3128
  HTTPS_PROXY=socks5://10.0.0.1:1080 service-proxy \"<service connection string>\" MyDevice 2222
  service-proxy --completions zsh > ~/.zfunc/_service-proxy
  service-proxy --man ~/.local/share/man/man1     # writes service-proxy.1

  Several devices at once, one local port each (LOCAL_PORT=DEVICE:PORT):
  service-proxy --map 2201=kiosk-17:22 --map 3390=kiosk-17:3389 --map 2202=pump-3:22

  ssh to any device by name, no listening port (in ~/.ssh/config, with
  SERVICE_CONNECTION_STRING and DEVSTREAMS_CA_CERT set in the environment):
    Host *.devices
        ProxyCommand service-proxy --stdio %n --strip-suffix .devices
  then `ssh user@kiosk-17.devices` reaches device kiosk-17 (its default port;
  `--stdio %n %p` asks for ssh's port instead). %h works too, but ssh
  lowercases it, and device ids are case-sensitive.

  Settings in a file (keys are the flags' long names with _ for -; read by default
  from $XDG_CONFIG_HOME/devstreams/service.toml, else ~/.config/devstreams/service.toml):
    connection_string_file = \"/home/me/.config/devstreams/service.key\"
    ca_cert = \"/home/me/.config/devstreams/relay.pem\"
  then `service-proxy --stdio kiosk-17` needs no flags and no environment.

Environment:
  SERVICE_CONNECTION_STRING  service connection string, when not given as the first argument
  SERVICE_CONNECTION_STRING_FILE  file holding it (--connection-string-file)
                             (IOTHUB_CONNECTION_STRING is read when it is unset)
  STREAMING_TARGET_DEVICE    device id, when not given as the second argument
  PROXY_PORT                 local port, when not given as the third argument
  DEVSTREAMS_CA_CERT         PEM certificate of the relay, when not given with --ca-cert
  HTTPS_PROXY, ALL_PROXY     proxy for the relay, when not given with --proxy (also lowercase)
  NO_PROXY                   hosts reached without the proxy: names, .domains, addresses, CIDRs, *
  RUST_LOG                   log filter for stderr (default: info; warn with --stdio)
  DEVSTREAMS_LOG_FORMAT      text or json, when not given with --log-format

Once listening, it prints one line per port on stdout: `Listening on 127.0.0.1:2222`
(with --map: `Listening on 127.0.0.1:2201 for kiosk-17:22`).
With --stdio, stdout carries the stream and nothing else; a failure is one line on
stderr and exit code 1, a stream the device closed cleanly exits 0. Resumable
sessions work there too: an ssh session outlives a relay restart.
`relay policy show` prints the service connection string.";

/// Listens on a local port and turns every TCP connection into a devstreams
/// stream to one device (sshd on the device's port 22 by default); or serves
/// several devices at once (--map), or carries one stream on stdin/stdout
/// for ssh's ProxyCommand (--stdio).
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

    /// Read the service connection string from this file (trimmed), e.g. a systemd credential
    #[arg(long, value_name = "FILE", env = "SERVICE_CONNECTION_STRING_FILE")]
    connection_string_file: Option<PathBuf>,

    /// Read the SharedAccessKey from this file (trimmed) and add it to a connection string that has none
    #[arg(long, value_name = "FILE")]
    shared_access_key_file: Option<PathBuf>,

    /// Id of the device to reach
    #[arg(value_name = "DEVICE_ID", env = "STREAMING_TARGET_DEVICE")]
    device_id: Option<String>,

    /// Local port to listen on; 0 picks a free one
    #[arg(value_name = "LOCAL_PORT", env = "PROXY_PORT", default_value_t = 2222)]
    local_port: u16,

    /// Carry one stream on stdin/stdout instead of listening (ssh's ProxyCommand):
    /// the device, and optionally its port (else --target-port, else the device's
    /// default target). Resumable sessions work here too
    #[arg(
        long,
        num_args = 1..=2,
        value_names = ["DEVICE", "PORT"],
        conflicts_with_all = ["map", "bind", "max_connections"]
    )]
    stdio: Option<Vec<String>>,

    /// With --stdio: cut this suffix from DEVICE when it ends with it (any case), so
    /// `ssh kiosk-17.devices` reaches device kiosk-17
    #[arg(long, value_name = "SUFFIX", requires = "stdio")]
    strip_suffix: Option<String>,

    /// Listen on LOCAL_PORT for DEVICE's PORT; repeat it to serve several devices
    /// and ports at once (each LOCAL_PORT once; 0 picks a free one)
    #[arg(
        long,
        value_name = "LOCAL_PORT=DEVICE:PORT",
        value_parser = parse_forward,
        conflicts_with = "target_port"
    )]
    map: Vec<Forward>,

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

    /// Print the shell completion script for SHELL (bash, zsh, fish, elvish, powershell) and exit
    #[arg(long, value_name = "SHELL", value_enum, hide = true)]
    completions: Option<framing::manuals::Shell>,

    /// Write the man page service-proxy.1 into DIRECTORY and exit
    #[arg(long, value_name = "DIRECTORY", hide = true)]
    man: Option<PathBuf>,
}

fn main() -> ExitCode {
    framing::copy_tuning::restart_if_needed();
    let parsed = framing::config_file::parse::<Arguments>(&framing::config_file::ProgramConfig {
        default_path: framing::config_file::user_config_path(USER_CONFIG_FILE),
        positionals: framing::config_file::Positionals::Included,
    });
    let (arguments, matches) = (parsed.arguments, parsed.matches);
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
    let given = |id: &str| matches.value_source(id) == Some(ValueSource::CommandLine);
    let connection_string = match framing::config_file::value_or_file(
        &matches,
        "connection_string",
        "connection_string_file",
    ) {
        Ok(value) => value,
        Err(error) => return fail(&error),
    };
    let connection_string = connection_string
        .filter(|value| !value.is_empty())
        .or_else(|| {
            std::env::var(FALLBACK_CONNECTION_STRING_VARIABLE)
                .ok()
                .filter(|value| !value.is_empty())
        });
    let Some(mut connection_string) = connection_string else {
        return fail("no service connection string: pass it as the first argument, set SERVICE_CONNECTION_STRING or put connection_string in ~/.config/devstreams/service.toml (`relay policy show` prints one)");
    };
    if let Some(key_file) = &arguments.shared_access_key_file {
        connection_string =
            match framing::config_file::with_key_from_file(&connection_string, key_file) {
                Ok(value) => value,
                Err(error) => return fail(&error),
            };
    }
    let (mode, default_log_filter) = if let Some(values) = &arguments.stdio {
        if given("device_id") || given("local_port") {
            usage_error(
                ErrorKind::ArgumentConflict,
                "--stdio names the device itself: give no DEVICE_ID or LOCAL_PORT besides it",
            );
        }
        (Mode::Stdio(stdio_target(&arguments, values)), "warn")
    } else if !arguments.map.is_empty() {
        if given("device_id") || given("local_port") {
            usage_error(
                ErrorKind::ArgumentConflict,
                "--map names the devices and ports itself: give no DEVICE_ID or LOCAL_PORT besides it",
            );
        }
        if let Some(port) = duplicate_local_port(&arguments.map) {
            usage_error(
                ErrorKind::ValueValidation,
                &format!(
                    "--map: local port {port} is given twice; each listener needs its own port"
                ),
            );
        }
        let mode = Mode::Listen {
            bind: arguments.bind,
            forwards: arguments.map.clone(),
            announce_targets: true,
            max_connections: arguments.max_connections as usize,
        };
        (mode, "info")
    } else {
        let Some(device_id) = arguments
            .device_id
            .clone()
            .filter(|value| !value.is_empty())
        else {
            return fail(
                "no device id: pass it as the second argument or set STREAMING_TARGET_DEVICE",
            );
        };
        let mode = Mode::Listen {
            bind: arguments.bind,
            forwards: vec![Forward {
                local_port: arguments.local_port,
                target: Target {
                    device_id,
                    port: arguments.target_port,
                },
            }],
            announce_targets: false,
            max_connections: arguments.max_connections as usize,
        };
        (mode, "info")
    };
    let stdio = matches!(mode, Mode::Stdio(_));
    let proxies = match framing::proxy::ProxySettings::resolve(arguments.proxy.as_deref(), |name| {
        std::env::var(name).ok()
    }) {
        Ok(proxies) => proxies,
        Err(error) => return fail(&error.to_string()),
    };
    framing::process::init_logging_as(default_log_filter, parsed.log_format);
    let settings = Settings {
        connection_string,
        ca_cert: arguments.ca_cert,
        proxies,
        stream_name: arguments.stream_name,
        connect_timeout: Duration::from_secs(arguments.connect_timeout),
        response_timeout: Duration::from_secs(arguments.response_timeout),
        half_close: !arguments.no_half_close,
        ping_interval: (arguments.ping_interval > 0)
            .then(|| std::time::Duration::from_secs(arguments.ping_interval)),
        resume: (!arguments.no_resume).then(|| service_proxy::resume::ResumeSettings {
            replay_buffer: (arguments.resume_buffer * 1024) as usize,
            resume_timeout: Duration::from_secs(arguments.resume_timeout),
        }),
        mode,
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => return fail(&format!("cannot start the async runtime: {error}")),
    };
    let result = runtime.block_on(service_proxy::run_until_signal(settings));
    if stdio {
        // A read of a terminal or file on a blocking thread cannot be
        // cancelled; it must not keep the process alive once the stream ended.
        runtime.shutdown_background();
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => fail(&format!("{error:#}")),
    }
}

/// The device and port of `--stdio DEVICE [PORT]`.
fn stdio_target(arguments: &Arguments, values: &[String]) -> Target {
    let host = values.first().map(String::as_str).unwrap_or_default();
    let device_id = service_proxy::stdio::device_from_host(host, arguments.strip_suffix.as_deref());
    if device_id.is_empty() {
        usage_error(
            ErrorKind::InvalidValue,
            "--stdio: the device is empty (ssh's %n or %h)",
        );
    }
    let port = match values.get(1) {
        // Not echoed: a connection string put after --stdio by mistake
        // would land here, key and all.
        Some(text) => match text.parse::<u16>() {
            Ok(port) if port > 0 => Some(port),
            _ => usage_error(
                ErrorKind::InvalidValue,
                "--stdio DEVICE [PORT]: PORT must be a number from 1 to 65535",
            ),
        },
        None => arguments.target_port,
    };
    if values.len() > 1 && arguments.target_port.is_some() {
        usage_error(
            ErrorKind::ArgumentConflict,
            "--stdio DEVICE PORT and --target-port both name the port; give one",
        );
    }
    Target {
        device_id: device_id.to_string(),
        port,
    }
}

/// Parses `--map LOCAL_PORT=DEVICE:PORT`. The device id may hold `:` and
/// `=` (IoT Hub allows both), so the local port ends at the first `=` and
/// the device port starts after the last `:`.
fn parse_forward(text: &str) -> Result<Forward, String> {
    let example = "expected LOCAL_PORT=DEVICE:PORT, for example 2201=kiosk-17:22";
    let (local, target) = text.split_once('=').ok_or(example)?;
    let local_port = local
        .trim()
        .parse::<u16>()
        .map_err(|_| format!("LOCAL_PORT {local:?} is not a port from 0 to 65535 ({example})"))?;
    let (device_id, port) = target
        .rsplit_once(':')
        .ok_or_else(|| format!("no :PORT after the device {target:?} ({example})"))?;
    let port = match port.parse::<u16>() {
        Ok(port) if port > 0 => port,
        _ => {
            return Err(format!(
                "PORT {port:?} is not a port from 1 to 65535 ({example})"
            ))
        }
    };
    framing::identity::validate_id(device_id)
        .map_err(|problem| format!("device {device_id:?}: {problem}"))?;
    Ok(Forward {
        local_port,
        target: Target {
            device_id: device_id.to_string(),
            port: Some(port),
        },
    })
}

/// A local port (other than 0, "any free one") that two `--map`s share.
fn duplicate_local_port(forwards: &[Forward]) -> Option<u16> {
    let mut seen = std::collections::HashSet::new();
    forwards
        .iter()
        .map(|forward| forward.local_port)
        .filter(|&port| port != 0)
        .find(|&port| !seen.insert(port))
}

/// Exits 2 with clap's usage error, as for any other bad argument.
fn usage_error(kind: ErrorKind, message: &str) -> ! {
    Arguments::command().error(kind, message).exit()
}

/// Prints the one line a user reads on failure, and exits 1. A failed
/// write is no reason to panic: with `--stdio 2>&1`, stderr shares the
/// non-blocking pipe of the stream.
fn fail(message: &str) -> ExitCode {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "service-proxy: error: {message}");
    ExitCode::from(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_values_parse_and_device_ids_may_hold_colons() {
        let forward = parse_forward("2201=kiosk-17:22").unwrap();
        assert_eq!(forward.local_port, 2201);
        assert_eq!(forward.target.device_id, "kiosk-17");
        assert_eq!(forward.target.port, Some(22));
        let forward = parse_forward("0=site:a=b:3389").unwrap();
        assert_eq!(forward.target.device_id, "site:a=b");
        assert_eq!(forward.target.port, Some(3389));
    }

    #[test]
    fn bad_map_values_say_what_is_expected() {
        for bad in [
            "kiosk-17:22",
            "x=kiosk-17:22",
            "70000=kiosk-17:22",
            "2201=kiosk-17",
            "2201=kiosk-17:0",
            "2201=kiosk-17:ssh",
            "2201=:22",
            "2201=bad/id:22",
        ] {
            let error = parse_forward(bad).expect_err(bad);
            assert!(
                error.contains("LOCAL_PORT=DEVICE:PORT") || error.contains("device"),
                "{bad}: {error}"
            );
        }
    }

    #[test]
    fn only_a_real_port_given_twice_is_a_duplicate() {
        let forwards: Vec<Forward> = ["0=a:22", "0=b:22", "2201=c:22"]
            .iter()
            .map(|text| parse_forward(text).unwrap())
            .collect();
        assert_eq!(duplicate_local_port(&forwards), None);
        let mut twice = forwards.clone();
        twice.push(parse_forward("2201=d:22").unwrap());
        assert_eq!(duplicate_local_port(&twice), Some(2201));
    }
}
