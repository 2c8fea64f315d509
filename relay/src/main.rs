//! `relay`: serve, and manage the identity registry. Parsing only; the work
//! is in the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, CommandFactory, Parser, Subcommand};
use relay::data_dir::{DataDir, HOST_NAME_SETTING, SERVICE_POLICY};
use relay::registry::Registry;
use relay::{Limits, RelayConfig, TlsMode};

const EXAMPLES: &str = "\
Examples:
  relay serve                                   # TLS on 0.0.0.0:8443, MQTT/TLS on 0.0.0.0:8883, self-signed certificate in ./relay-data/tls
  relay serve --listen 127.0.0.1:8443 --public-url wss://relay.example.com:8443
  relay serve --listen 0.0.0.0:443 --mqtt-listen 0.0.0.0:8883   # ports IoT Hub SDK programs cannot change
  relay serve --no-mqtt                         # devices use MQTT over WebSocket on --listen only
  relay serve --admin-listen 127.0.0.1:9090     # Prometheus scrapes http://127.0.0.1:9090/metrics
                                                # web console: http://127.0.0.1:9090/console/ (sign in: relay policy show registryReadWrite)
  relay serve --admin-listen 10.0.0.5:9090 --admin-tls   # console and API over HTTPS for other machines
  relay serve --audit-log /var/log/devstreams/audit.log --audit-log-max-size 50 --audit-log-max-files 10
  relay serve --audit-log -                     # audit lines (JSON) on standard output, e.g. for journald
  relay serve --tls-cert fullchain.pem --tls-key privkey.pem
  relay serve --listen [::]:8443 --mqtt-listen [::]:8883   # IPv6 and IPv4 (dual-stack)
  relay serve --config /etc/devstreams/relay.toml   # keys: the flags' long names with _ for -
  relay config check --config /etc/devstreams/relay.toml   # validate it without serving
  relay device add MyDevice                     # prints the device connection string
  relay device list
  relay policy show                             # prints the service connection string
  relay completions bash > /usr/share/bash-completion/completions/relay
  relay man /usr/local/share/man/man1           # relay.1 and one page per subcommand
  relay policy add dashboard --rights registry-read   # a read-only key for the admin API
  relay policy list                             # names and rights
  relay device list                             # with --admin-listen running: online, since, address, streams
  relay stream list                             # live streams with bytes each way
  relay stream close 3f2a…                      # ends a live stream (both sides)

Behind nginx (TLS ends there; X-Forwarded-For) or HAProxy (send-proxy-v2):
  relay serve --no-tls --listen 127.0.0.1:8080 --trusted-proxy 127.0.0.1 --public-url wss://relay.example.com:443
  relay serve --trusted-proxy 10.0.0.0/24 --trusted-proxy fd00:10::/64   # the balancers' networks

Several relays as one (cluster mode, NATS with JetStream):
  relay serve --cluster nats://nats.internal:4222 --node-url wss://relay-2.example.com:8443
  relay device add MyDevice --cluster nats://nats.internal:4222   # from any machine that reaches NATS
  relay registry export registry.json                              # a single relay's registry (--data-dir) ...
  relay registry import registry.json --cluster nats://nats.internal:4222   # ... into the cluster

Environment: RELAY_LISTEN, RELAY_MQTT_LISTEN, RELAY_ADMIN_LISTEN, RELAY_AUDIT_LOG, RELAY_DATA_DIR, RELAY_ADMIN_URL, RELAY_TRUSTED_PROXIES,
  RELAY_CLUSTER, RELAY_CLUSTER_CREDS, RELAY_CLUSTER_CA, RELAY_NODE_URL, RELAY_NODE_NAME, RUST_LOG (e.g. RUST_LOG=debug),
  DEVSTREAMS_LOG_FORMAT (text|json)";

#[derive(Parser)]
#[command(name = "relay", version, about = "devstreams relay: pairs device and service WebSockets and copies bytes between them", after_help = EXAMPLES)]
struct Cli {
    /// Where the registry, secrets and TLS files live.
    #[arg(
        long,
        global = true,
        env = "RELAY_DATA_DIR",
        default_value = "./relay-data"
    )]
    data_dir: PathBuf,
    #[command(flatten)]
    cluster: ClusterArgs,
    #[command(subcommand)]
    command: Command,
}

/// How to reach a cluster; every command takes them, and with `--cluster`
/// acts on the cluster instead of the data dir's registry.
#[derive(Args)]
struct ClusterArgs {
    /// Join (serve) or manage (device, policy, registry) a cluster of relays through NATS with JetStream:
    /// nats://[USER:PASSWORD@]HOST:PORT, several separated by commas. Without it the data dir's registry is used.
    #[arg(long, global = true, env = "RELAY_CLUSTER", value_name = "URL")]
    cluster: Option<String>,
    /// NATS credentials file (.creds: JWT and NKey seed) for --cluster.
    #[arg(long, global = true, env = "RELAY_CLUSTER_CREDS", value_name = "FILE")]
    cluster_creds: Option<PathBuf>,
    /// PEM CA certificate to trust for TLS to NATS; setting it requires TLS.
    #[arg(long, global = true, env = "RELAY_CLUSTER_CA", value_name = "PEM")]
    cluster_ca: Option<PathBuf>,
    /// Seconds to reach NATS before giving up (at start and for each command).
    #[arg(long, global = true, default_value_t = relay::cluster::DEFAULT_CONNECT_TIMEOUT.as_secs(), value_name = "SECONDS",
          value_parser = clap::value_parser!(u64).range(1..=120))]
    cluster_connect_timeout: u64,
    /// With --cluster: HostName (host:port of the load balancer) in connection strings. `serve` records it
    /// for the whole cluster; device and policy commands print it (default: the one the nodes recorded).
    #[arg(long, global = true, value_name = "HOST:PORT")]
    host_name: Option<String>,
}

impl ClusterArgs {
    fn config(&self) -> Option<relay::cluster::ClusterConfig> {
        let url = self.cluster.as_ref()?;
        let mut config = relay::cluster::ClusterConfig::new(url.clone());
        config.credentials_file = self.cluster_creds.clone();
        config.ca_certificate = self.cluster_ca.clone();
        config.connect_timeout = Duration::from_secs(self.cluster_connect_timeout);
        config.host_name = self.host_name.clone();
        Some(config)
    }
}

#[derive(Subcommand)]
enum Command {
    /// Serve devices and services (creates the data dir on first start).
    Serve(Box<ServeArgs>),
    /// Manage device identities (works while `relay serve` runs).
    #[command(subcommand)]
    Device(DeviceCommand),
    /// Manage service policies and their rights (service-connect, registry-read, registry-write).
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Live streams of the running relay (through its admin API; see --admin-listen).
    #[command(subcommand)]
    Stream(StreamCommand),
    /// Move a registry between a single relay (--data-dir) and a cluster (--cluster), in either direction.
    #[command(subcommand)]
    Registry(RegistryCommand),
    /// Look at a cluster of relays (with --cluster).
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Print the shell completion script for SHELL (bash, zsh, fish, elvish, powershell).
    Completions {
        #[arg(value_enum)]
        shell: framing::manuals::Shell,
    },
    /// Write the man pages (relay.1 and relay-SUBCOMMAND.1) into DIRECTORY, naming each file;
    /// without DIRECTORY, print relay.1 (`relay man | man -l -`).
    Man { directory: Option<PathBuf> },
    /// Check a configuration file (--config FILE).
    #[command(subcommand)]
    Config(ConfigCommand),
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate --config FILE as `relay serve` would read it, without serving: prints OK or the error (exit 0/1).
    Check,
}

#[derive(Subcommand)]
enum ClusterCommand {
    /// List the cluster's nodes: name, node URL, devices held, live streams,
    /// uptime and last heartbeat; a node silent for three heartbeats is "gone".
    Status,
}

#[derive(Subcommand)]
enum RegistryCommand {
    /// Write the registry (devices with keys and state, policies, stream-token secret) to FILE
    /// (JSON, owner-only): from the cluster with --cluster, else from --data-dir.
    Export { file: PathBuf },
    /// Read FILE (from `relay registry export`) into the cluster with --cluster, else into --data-dir:
    /// its devices and policies replace those of the same name, others are kept; the stream-token
    /// secret is set only where none exists.
    Import { file: PathBuf },
}

#[derive(Args)]
struct ServeArgs {
    /// Address of the main listener (HTTPS + WSS).
    #[arg(long, env = "RELAY_LISTEN", default_value = "0.0.0.0:8443")]
    listen: SocketAddr,
    /// Address of the MQTT-over-TLS listener for IoT Hub device SDKs (their port is fixed at 8883).
    /// Same certificate, device credentials and topics as MQTT over WebSocket on --listen.
    #[arg(
        long,
        env = "RELAY_MQTT_LISTEN",
        default_value = "0.0.0.0:8883",
        conflicts_with = "no_mqtt"
    )]
    mqtt_listen: SocketAddr,
    /// Do not open the MQTT-over-TLS listener; devices then connect with MQTT over WebSocket on --listen.
    #[arg(long)]
    no_mqtt: bool,
    /// Address of the admin listener: /metrics (Prometheus), /health, /health/live, /health/ready and the
    /// JSON API under /api/ (SAS token of a policy with registry-read/-write) and the web console under
    /// /console/ (sign in with such a policy's name and key), on plain HTTP unless --admin-tls. Off by default;
    /// bind it to loopback or a private network, never the internet.
    #[arg(long, env = "RELAY_ADMIN_LISTEN", value_name = "ADDRESS")]
    admin_listen: Option<SocketAddr>,
    /// Serve the admin listener over HTTPS with the main listener's certificate, for a console or API reached
    /// from other machines (the console's cookie is then Secure). `relay device list` and `relay stream` follow
    /// on their own; a remote client must trust the certificate (the self-signed one is tls/cert.pem in the data dir).
    #[arg(
        long,
        env = "RELAY_ADMIN_TLS",
        requires = "admin_listen",
        conflicts_with = "no_tls"
    )]
    admin_tls: bool,
    /// Base URL of the streaming endpoint handed to clients, e.g. wss://relay.example.com:443.
    /// By default each client gets the host it used to reach the relay.
    #[arg(long)]
    public_url: Option<String>,
    /// PEM certificate chain (instead of the generated self-signed one).
    #[arg(long, requires = "tls_key", conflicts_with = "no_tls")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, requires = "tls_cert", conflicts_with = "no_tls")]
    tls_key: Option<PathBuf>,
    /// Serve plain HTTP/WS, for a relay behind a TLS-terminating load balancer.
    #[arg(long)]
    no_tls: bool,
    /// A reverse proxy or load balancer whose word on the client's address is believed (repeatable):
    /// an address (10.0.0.5, ::1) or a network (10.0.0.0/24, fd00::/8). Its connections may start with a
    /// PROXY protocol v1/v2 header (HAProxy send-proxy[-v2]; main and MQTT listeners) or carry
    /// X-Forwarded-For (nginx; X-Forwarded-Proto and X-Forwarded-Host also choose the streaming URL when
    /// --public-url is not set). Limits and logs then see the real client. Nobody else's headers count.
    #[arg(long, env = "RELAY_TRUSTED_PROXIES", value_delimiter = ',', value_name = "ADDRESS|CIDR",
          value_parser = relay::trusted_proxies::parse_trusted_proxy)]
    trusted_proxy: Vec<ipnet::IpNet>,
    /// Seconds from stream creation until both sides must be connected.
    #[arg(long, default_value_t = 60, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..=600))]
    handshake_timeout: u64,
    /// Largest WebSocket message on stream sockets, bytes.
    #[arg(long, default_value_t = Limits::default().max_message_size)]
    max_message_size: usize,
    /// Concurrent streams on this relay (in a cluster: on this node, counted where devices are held).
    #[arg(long, default_value_t = Limits::default().max_streams)]
    max_streams: usize,
    /// Concurrent streams of one device (in a cluster: enforced on the node holding it, so cluster-wide).
    #[arg(long, default_value_t = Limits::default().max_streams_per_device)]
    max_streams_per_device: usize,
    /// Stream creations per second on this relay (in a cluster: on this node, counted where devices are held).
    #[arg(long, default_value_t = Limits::default().creations_per_second)]
    creations_per_second: u32,
    /// Stream creations per second for one device (in a cluster: enforced on the node holding it, so cluster-wide).
    #[arg(long, default_value_t = Limits::default().creations_per_second_per_device)]
    creations_per_second_per_device: u32,
    /// Open connections on the main and MQTT listeners together.
    #[arg(long, default_value_t = Limits::default().max_connections)]
    max_connections: usize,
    /// Seconds live streams may run on after SIGTERM/SIGINT before they are cut.
    #[arg(long, default_value_t = 30, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(0..=3600))]
    drain_timeout: u64,
    /// Seconds a client has to finish the TLS handshake.
    #[arg(long, default_value_t = Limits::default().tls_handshake_timeout.as_secs(), value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..=300))]
    tls_handshake_timeout: u64,
    /// Seconds a client has to send its request headers (slow clients are cut).
    #[arg(long, default_value_t = Limits::default().header_read_timeout.as_secs(), value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..=300))]
    header_read_timeout: u64,
    /// Seconds a device has to send MQTT CONNECT after connecting.
    #[arg(long, default_value_t = Limits::default().mqtt_connect_timeout.as_secs(), value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..=300))]
    mqtt_connect_timeout: u64,
    /// Largest HTTP request head (request line and headers), bytes; larger ones get 431.
    #[arg(long, default_value_t = Limits::default().max_header_size)]
    max_header_size: usize,
    /// Largest MQTT packet from a device, bytes (MQTT allows at most 268435460).
    #[arg(long, default_value_t = Limits::default().max_mqtt_packet_size,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(2..=relay::config::MAX_MQTT_PACKET_SIZE as u64))]
    max_mqtt_packet_size: usize,
    /// Open connections one source address may hold.
    #[arg(long, default_value_t = Limits::default().sources.max_connections_per_source)]
    max_connections_per_source: usize,
    /// Authenticated device control channels accepted per second; past it devices are told to retry later (CONNACK 3).
    #[arg(long, default_value_t = Limits::default().device_connects_per_second)]
    device_connects_per_second: u32,
    /// Device connection attempts one source (IPv4 address or IPv6 prefix) may make per second, before
    /// authentication; past it the source is told to retry later and slowed down like a failed login.
    #[arg(long, env = "RELAY_DEVICE_CONNECTS_PER_SECOND_PER_SOURCE", default_value_t = Limits::default().sources.device_connects_per_second_per_source)]
    device_connects_per_second_per_source: u32,
    /// IPv6 addresses sharing this prefix length count as one source for every per-source limit.
    #[arg(long, env = "RELAY_IPV6_SOURCE_PREFIX", value_name = "BITS", default_value_t = Limits::default().sources.ipv6_prefix_length, value_parser = clap::value_parser!(u8).range(1..=128))]
    ipv6_source_prefix: u8,
    /// Seconds a write to a device's control channel may take; a device that stops reading is dropped.
    #[arg(long, env = "RELAY_WRITE_TIMEOUT", value_name = "SECONDS", default_value_t = Limits::default().write_timeout.as_secs(), value_parser = clap::value_parser!(u64).range(1..=300))]
    write_timeout: u64,
    /// Streams waiting for their two sides to connect.
    #[arg(long, default_value_t = Limits::default().max_pending_streams)]
    max_pending_streams: usize,
    /// With --cluster: this node's streaming URL, handed out for streams to devices it holds
    /// (e.g. wss://relay-2.example.com:8443); unique per node, required with --cluster.
    #[arg(long, env = "RELAY_NODE_URL", value_name = "URL")]
    node_url: Option<String>,
    /// With --cluster: this node's name, unique among live nodes (default: host name and --listen port).
    #[arg(long, env = "RELAY_NODE_NAME", value_name = "NAME")]
    node_name: Option<String>,
    /// With --cluster: replicas of the cluster's buckets when this node creates them (at most the NATS cluster's size).
    #[arg(long, default_value_t = 1, value_name = "N", value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=5))]
    cluster_replicas: usize,
    /// Append one JSON line per event (stream requested, accepted/rejected, established, closed with bytes,
    /// resumed; device connected/disconnected; registry changes) to FILE; `-` is standard output.
    /// Repeatable (e.g. a file and -) or comma-separated. Off by default.
    #[arg(long, env = "RELAY_AUDIT_LOG", value_delimiter = ',', value_name = "FILE|-",
          value_parser = relay::audit::AuditOutput::parse)]
    audit_log: Vec<relay::audit::AuditOutput>,
    /// Rotate an audit log file before it grows past this size: MiB, or with a unit (64KiB, 1GiB); 0 = never.
    #[arg(long, env = "RELAY_AUDIT_LOG_MAX_SIZE", value_name = "SIZE", default_value = "100",
          value_parser = relay::audit::parse_size)]
    audit_log_max_size: u64,
    /// Rotated audit log files kept (FILE.1 newest … FILE.N oldest); older ones are deleted.
    #[arg(long, env = "RELAY_AUDIT_LOG_MAX_FILES", value_name = "N", default_value_t = relay::audit::DEFAULT_MAX_FILES)]
    audit_log_max_files: usize,
    /// Seconds between WebSocket pings on stream sockets; a side silent for 3 intervals is dropped (0 = off).
    #[arg(long, default_value_t = framing::pump::DEFAULT_PING_INTERVAL.as_secs(), value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(0..=framing::pump::MAX_PING_INTERVAL.as_secs()))]
    ping_interval: u64,
}

#[derive(Subcommand)]
enum DeviceCommand {
    /// Register a device and print its connection string (one line).
    Add {
        /// 1-128 ASCII letters, digits and - . + % _ # * ? ! ( ) , : = @ $ ' (IoT Hub's set);
        /// quote it in the shell, e.g. 'a#b?c=d@e'.
        device_id: String,
    },
    /// List devices; with a running relay's admin API (--admin-listen), also online state,
    /// since when, from where, live streams and last seen; else the registry alone (noted on stderr).
    List {
        #[command(flatten)]
        admin: AdminUrlArgs,
    },
    /// Print a device's connection string (primary key).
    Show { device_id: String },
    /// Remove a device; a running relay cuts its control channel and streams.
    Remove { device_id: String },
    /// Disable a device: a running relay cuts its control channel and streams; its keys are kept.
    Disable { device_id: String },
    /// Enable a disabled device again.
    Enable { device_id: String },
    /// Replace one of a device's keys and print the new connection string; a running relay cuts
    /// the device's control channel and streams at once (the device reconnects with the new string).
    RotateKey {
        device_id: String,
        /// Rotate the secondary key instead of the primary.
        #[arg(long)]
        secondary: bool,
    },
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Print a policy's service connection string.
    Show {
        #[arg(default_value = SERVICE_POLICY)]
        name: String,
    },
    /// Create a policy with fresh keys and print its connection string.
    Add {
        /// 1-64 ASCII letters, digits and - . _
        name: String,
        /// Comma-separated: service-connect (create streams), registry-read (admin API reads),
        /// registry-write (admin API changes); IoT Hub's ServiceConnect, RegistryRead, RegistryWrite also work.
        #[arg(long, value_parser = relay::operator_cli::parse_rights, value_name = "RIGHTS")]
        rights: relay::rights::Rights,
    },
    /// List policies with their rights (no keys).
    List,
    /// Remove a policy; its tokens stop working on a running relay at once.
    Remove { name: String },
    /// Replace one of a policy's keys and print the new connection string.
    RotateKey {
        name: String,
        /// Rotate the secondary key instead of the primary.
        #[arg(long)]
        secondary: bool,
    },
}

#[derive(Subcommand)]
enum StreamCommand {
    /// List the running relay's live streams: id, device, name, service address, target, bytes each way.
    List {
        #[command(flatten)]
        admin: AdminUrlArgs,
    },
    /// Close a live stream (both sides get a normal close); the id is from `relay stream list`.
    Close {
        stream_id: String,
        #[command(flatten)]
        admin: AdminUrlArgs,
    },
}

/// Where the running relay's admin API is.
#[derive(Args)]
struct AdminUrlArgs {
    /// The running relay's admin listener, e.g. http://127.0.0.1:9090 or https://… (default: the address
    /// `relay serve --admin-listen` recorded in the data dir). Requests are signed with the
    /// registryReadWrite policy's key from the data dir.
    #[arg(long, env = "RELAY_ADMIN_URL", value_name = "URL")]
    admin_url: Option<String>,
}

fn main() -> ExitCode {
    framing::copy_tuning::restart_if_needed();
    let parsed = framing::config_file::parse::<Cli>(&CONFIG);
    let cli = parsed.arguments;
    // The NATS client logs every connection attempt by itself; the relay
    // reports what matters (lost, back) in its own words.
    framing::process::init_logging_as("info,async_nats=off", parsed.log_format);
    let result = match (cli.command, cli.cluster.config()) {
        (Command::Serve(arguments), cluster) => serve(cli.data_dir, cluster, *arguments, false),
        (Command::Config(ConfigCommand::Check), _) => config_check(parsed.config_path),
        (Command::Device(command), None) => device(&cli.data_dir, command),
        (Command::Device(command), Some(cluster)) => {
            cluster_command(cluster_device(&cluster, &cli.cluster, command))
        }
        (Command::Policy(PolicyCommand::Show { name }), None) => policy_show(&cli.data_dir, &name),
        (Command::Policy(PolicyCommand::Show { name }), Some(cluster)) => {
            cluster_command(cluster_policy_show(&cluster, &cli.cluster, &name))
        }
        (Command::Policy(command), cluster) => policy_command(&cli.data_dir, cluster, &cli.cluster, command),
        (Command::Stream(StreamCommand::List { admin }), _) => {
            relay::operator_cli::stream_command(&cli.data_dir, admin.admin_url.as_deref(), None)
        }
        (Command::Stream(StreamCommand::Close { stream_id, admin }), _) => {
            relay::operator_cli::stream_command(&cli.data_dir, admin.admin_url.as_deref(), Some(&stream_id))
        }
        (Command::Registry(command), cluster) => registry_command(&cli.data_dir, cluster, command),
        (Command::Cluster(ClusterCommand::Status), Some(cluster)) => cluster_status(&cluster),
        (Command::Cluster(ClusterCommand::Status), None) => Err(anyhow::anyhow!(
            "relay cluster status needs the cluster: add --cluster nats://HOST:PORT (or set RELAY_CLUSTER)"
        )),
        (Command::Completions { shell }, _) => {
            framing::manuals::write_completions(Cli::command(), shell, &mut std::io::stdout())
                .context("cannot write the completion script to stdout")
        }
        (Command::Man { directory }, _) => {
            framing::manuals::print_man_pages(Cli::command(), directory.as_deref())
                .context("cannot write the man pages (is the directory writable?)")
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("relay: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// How the relay reads --config: positionals of subcommands (a device id,
/// a file to import) never come from the file.
const CONFIG: framing::config_file::ProgramConfig = framing::config_file::ProgramConfig {
    default_path: None,
    positionals: framing::config_file::Positionals::Excluded,
};

/// `relay config check`: reads the file as `relay serve --config FILE`
/// would, and runs serve's own checks up to the point where it would start.
fn config_check(path: Option<PathBuf>) -> anyhow::Result<()> {
    let Some(path) = path else {
        anyhow::bail!("relay config check needs the file: relay config check --config FILE");
    };
    let command_line = [
        std::ffi::OsString::from("relay"),
        "--config".into(),
        path.clone().into(),
        "serve".into(),
    ];
    let parsed =
        framing::config_file::try_parse_from::<Cli>(&CONFIG, command_line).map_err(|error| {
            anyhow::anyhow!(
                "{}",
                error.to_string().trim_start_matches("error: ").trim_end()
            )
        })?;
    let cli = parsed.arguments;
    let Command::Serve(arguments) = cli.command else {
        unreachable!("the command line names the serve command");
    };
    serve(cli.data_dir, cli.cluster.config(), *arguments, true)
        .with_context(|| path.display().to_string())?;
    println!("{}: OK", path.display());
    Ok(())
}

/// Serves until a signal; with `check_only`, stops once the settings are
/// known to be usable (`relay config check`).
fn serve(
    data_dir: PathBuf,
    cluster: Option<relay::cluster::ClusterConfig>,
    arguments: ServeArgs,
    check_only: bool,
) -> anyhow::Result<()> {
    let mut config = RelayConfig::new(arguments.listen, data_dir);
    config.cluster = match cluster {
        None => {
            if arguments.node_url.is_some() || arguments.node_name.is_some() {
                anyhow::bail!("--node-url and --node-name only mean something with --cluster: add --cluster nats://HOST:PORT, or drop them");
            }
            None
        }
        Some(mut cluster) => {
            let Some(node_url) = arguments.node_url.clone() else {
                anyhow::bail!(
                    "--cluster needs --node-url (or RELAY_NODE_URL): the streaming URL this node hands out, \
                     e.g. --node-url wss://relay-2.example.com:{}",
                    arguments.listen.port()
                );
            };
            if !(node_url.starts_with("wss://") || node_url.starts_with("ws://")) {
                anyhow::bail!("--node-url {node_url:?} must start with wss:// (or ws:// behind a TLS-terminating proxy)");
            }
            let name = match arguments.node_name.clone() {
                Some(name) if !name.trim().is_empty() => name,
                Some(_) => anyhow::bail!("--node-name must not be empty"),
                None => format!("{}:{}", host_name_of_machine(), arguments.listen.port()),
            };
            cluster.replicas = arguments.cluster_replicas;
            cluster.node = Some(relay::cluster::NodeIdentity {
                name,
                url: node_url,
            });
            Some(cluster)
        }
    };
    config.mqtt_listen = (!arguments.no_mqtt).then_some(arguments.mqtt_listen);
    config.trusted_proxies =
        relay::trusted_proxies::TrustedProxies::new(arguments.trusted_proxy.clone());
    config.admin_listen = arguments.admin_listen;
    config.admin_tls = arguments.admin_tls;
    if !arguments.audit_log.is_empty() {
        let mut audit = relay::audit::AuditConfig::new(arguments.audit_log.clone());
        audit.max_file_size = arguments.audit_log_max_size;
        audit.max_files = arguments.audit_log_max_files;
        config.audit = Some(audit);
    }
    config.public_url = arguments.public_url;
    if let Some(url) = &config.public_url {
        if !(url.starts_with("wss://") || url.starts_with("ws://")) {
            anyhow::bail!("--public-url {url:?} must start with wss:// (or ws:// behind a TLS-terminating proxy)");
        }
    }
    // Clap checks these pairs on the command line only, not in a file.
    if arguments.tls_cert.is_some() != arguments.tls_key.is_some() {
        anyhow::bail!("tls_cert and tls_key go together: give both, or neither for the self-signed certificate");
    }
    if arguments.no_tls && arguments.tls_cert.is_some() {
        anyhow::bail!("no_tls and tls_cert/tls_key exclude each other: drop one");
    }
    config.tls = match (arguments.no_tls, arguments.tls_cert, arguments.tls_key) {
        (true, _, _) => TlsMode::Disabled,
        (false, Some(certificate), Some(private_key)) => TlsMode::Files {
            certificate,
            private_key,
        },
        _ => TlsMode::SelfSigned,
    };
    config.limits = Limits {
        handshake_timeout: Duration::from_secs(arguments.handshake_timeout),
        max_message_size: arguments.max_message_size,
        max_streams: arguments.max_streams,
        max_streams_per_device: arguments.max_streams_per_device,
        creations_per_second: arguments.creations_per_second,
        creations_per_second_per_device: arguments.creations_per_second_per_device,
        max_connections: arguments.max_connections,
        drain_timeout: Duration::from_secs(arguments.drain_timeout),
        ping_interval: (arguments.ping_interval > 0)
            .then(|| Duration::from_secs(arguments.ping_interval)),
        tls_handshake_timeout: Duration::from_secs(arguments.tls_handshake_timeout),
        header_read_timeout: Duration::from_secs(arguments.header_read_timeout),
        mqtt_connect_timeout: Duration::from_secs(arguments.mqtt_connect_timeout),
        max_header_size: arguments.max_header_size,
        max_mqtt_packet_size: arguments.max_mqtt_packet_size,
        max_pending_streams: arguments.max_pending_streams,
        device_connects_per_second: arguments.device_connects_per_second,
        write_timeout: Duration::from_secs(arguments.write_timeout),
        sources: relay::sources::SourcePolicy {
            max_connections_per_source: arguments.max_connections_per_source,
            device_connects_per_second_per_source: arguments.device_connects_per_second_per_source,
            ipv6_prefix_length: arguments.ipv6_source_prefix,
            ..Default::default()
        },
        ..Limits::default()
    };
    if check_only {
        return Ok(());
    }
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(async {
        // Installed before starting, so an early signal still drains cleanly.
        let mut signals = framing::process::Signals::install()
            .context("cannot install the SIGINT/SIGTERM handlers")?;
        let relay = relay::start(config).await?;
        let tls = if relay.tls {
            "TLS"
        } else {
            "plain HTTP, --no-tls"
        };
        println!("Listening on {} ({tls})", relay.local_address);
        if let Some(mqtt_address) = relay.mqtt_address {
            let mqtt_tls = if relay.tls {
                "TLS"
            } else {
                "plain TCP, --no-tls"
            };
            println!("MQTT listening on {mqtt_address} ({mqtt_tls})");
        }
        if let Some(admin_address) = relay.admin_address {
            let (kind, scheme) = if relay.admin_tls {
                ("TLS", "https")
            } else {
                ("plain HTTP", "http")
            };
            println!("Admin listening on {admin_address} ({kind}: /metrics, /health, /api/, web console at {scheme}://{admin_address}/console/)");
        }
        println!(
            "Service connection string: {}",
            relay.service_connection_string
        );
        if let Some(path) = &relay.certificate_path {
            let absolute = std::fs::canonicalize(path).unwrap_or_else(|_| path.clone());
            println!(
                "CA certificate for clients (--ca-cert): {}",
                absolute.display()
            );
        }
        if let Some(cluster) = &relay.cluster {
            println!("Cluster: {cluster}");
            println!("Add a device with: relay device add <DeviceId> --cluster <URL>");
        } else {
            println!("Add a device with: relay device add <DeviceId>");
        }
        // Type=notify units: serving now, and alive while the runtime is.
        framing::service_manager::ready(&format!("listening on {}", relay.local_address));
        let _watchdog = framing::service_manager::Watchdog::start();
        tokio::select! {
            _ = signals.received() => {}
            _ = return_freed_memory(&relay) => {}
        }
        framing::service_manager::stopping();
        tracing::info!("shutting down: no new connections, draining live streams");
        relay.shutdown().await;
        anyhow::Ok(())
    })
}

/// How often the live streams and control channels are counted: often
/// enough to see the peak of a burst that moves enough data to matter,
/// cheap (two locks).
const TRIM_CHECK_INTERVAL: Duration = Duration::from_millis(250);
/// At least this long between two trims, so a relay whose streams come and
/// go all the time walks its heap at most this often.
const MIN_TRIM_SPACING: Duration = Duration::from_secs(2);

/// When to give freed memory back, decided from the live connections
/// (streams and control channels) counted at each check.
///
/// A trim is due when they fell to half the peak seen since the last trim
/// (to zero after a single one), at most every [`MIN_TRIM_SPACING`]. One
/// more trim follows [`MIN_TRIM_SPACING`] later: a connection leaves the
/// count when it is over, but its task frees its buffers only once its
/// close handshake is done, so a trim right at the fall can miss most of
/// them, and the count, already low, would never ask again.
#[derive(Debug, Default)]
struct TrimSchedule {
    peak: usize,
    last_trim: Option<Duration>,
    follow_up: bool,
}

impl TrimSchedule {
    /// Records the count at `now` (time since the relay started) and says
    /// whether to trim now.
    fn trim_now(&mut self, active: usize, now: Duration) -> bool {
        self.peak = self.peak.max(active);
        let spaced = self
            .last_trim
            .is_none_or(|last| now.saturating_sub(last) >= MIN_TRIM_SPACING);
        let fell = self.peak > 0 && active <= self.peak / 2;
        if !spaced || !(fell || self.follow_up) {
            return false;
        }
        self.follow_up = fell;
        self.peak = active;
        self.last_trim = Some(now);
        true
    }
}

/// glibc keeps the memory of closed streams and control channels for reuse
/// instead of returning it: after a burst of large streams, or a fleet that
/// reconnected elsewhere, the relay would hold several times its idle size
/// for good (BENCHMARKS.md, SCALING.md). Whenever the live connections fall
/// by half from their peak, whatever its size, the free pages go back.
async fn return_freed_memory(relay: &relay::RunningRelay) {
    let started = tokio::time::Instant::now();
    let mut schedule = TrimSchedule::default();
    let mut interval = tokio::time::interval(TRIM_CHECK_INTERVAL);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let active = relay.active_streams() + relay.connected_devices();
        if schedule.trim_now(active, started.elapsed()) {
            trim_heap();
            tracing::debug!(active, "returned freed memory to the system");
        }
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim_heap() {
    // SAFETY: malloc_trim takes no pointers and only walks glibc's own free
    // lists, under glibc's own locks; it is safe to call from any thread.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim_heap() {}

fn host_name(data_dir: &DataDir) -> anyhow::Result<String> {
    Ok(match data_dir.registry()?.setting(HOST_NAME_SETTING)? {
        Some(host) => host,
        None => {
            eprintln!("relay: note: `relay serve` has not run on this data dir yet; assuming HostName=localhost:8443");
            "localhost:8443".to_string()
        }
    })
}

fn device(data_dir: &std::path::Path, command: DeviceCommand) -> anyhow::Result<()> {
    DataDir::refuse_if_cluster_node(data_dir)?;
    let data_dir = match command {
        DeviceCommand::Add { .. } => DataDir::create_or_open(data_dir)?,
        _ => DataDir::open_existing(data_dir)?,
    };
    let registry = data_dir.registry()?;
    let print_connection_string = |record: &relay::registry::DeviceRecord| -> anyhow::Result<()> {
        let host = host_name(&data_dir)?;
        let connection =
            framing::ConnectionString::for_device(&host, &record.device_id, &record.primary_key)?;
        println!("{}", connection.to_secret_string());
        Ok(())
    };
    match command {
        DeviceCommand::Add { device_id } => {
            print_connection_string(&registry.add_device(&device_id)?)
        }
        DeviceCommand::List { admin } => {
            relay::operator_cli::device_list(&data_dir, admin.admin_url.as_deref())
        }
        DeviceCommand::Show { device_id } => {
            let record = registry
                .device(&device_id)?
                .ok_or(relay::registry::RegistryError::NoSuchDevice(device_id))?;
            print_connection_string(&record)
        }
        DeviceCommand::Remove { device_id } => {
            registry.remove_device(&device_id)?;
            eprintln!("relay: removed device {device_id}");
            Ok(())
        }
        DeviceCommand::Disable { device_id } => {
            registry.set_device_enabled(&device_id, false)?;
            eprintln!("relay: disabled device {device_id}");
            Ok(())
        }
        DeviceCommand::Enable { device_id } => {
            registry.set_device_enabled(&device_id, true)?;
            eprintln!("relay: enabled device {device_id}");
            Ok(())
        }
        DeviceCommand::RotateKey {
            device_id,
            secondary,
        } => {
            let record = registry.rotate_device_key(&device_id, secondary)?;
            if secondary {
                let host = host_name(&data_dir)?;
                let connection = framing::ConnectionString::for_device(
                    &host,
                    &record.device_id,
                    &record.secondary_key,
                )?;
                println!("{}", connection.to_secret_string());
                Ok(())
            } else {
                print_connection_string(&record)
            }
        }
    }
}

/// The machine's host name, for the default node name.
fn host_name_of_machine() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|name| name.trim().to_string())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "relay".to_string())
}

/// Runs one command against the cluster on a runtime of its own.
fn cluster_command(
    work: impl std::future::Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(work)
}

/// The HostName for connection strings printed from the cluster.
async fn cluster_host_name(
    cluster: &relay::cluster::Cluster,
    arguments: &ClusterArgs,
) -> anyhow::Result<String> {
    if let Some(host) = &arguments.host_name {
        return Ok(host.clone());
    }
    Ok(match cluster.host_name().await? {
        Some(host) => host,
        None => {
            eprintln!("relay: note: no relay of this cluster has recorded a host name yet; assuming HostName=localhost:8443 (pass --host-name HOST:PORT)");
            "localhost:8443".to_string()
        }
    })
}

async fn cluster_device(
    config: &relay::cluster::ClusterConfig,
    arguments: &ClusterArgs,
    command: DeviceCommand,
) -> anyhow::Result<()> {
    let cluster = relay::cluster::Cluster::connect(config).await?;
    let print_key =
        |record: &relay::registry::DeviceRecord, host: &str, key: &str| -> anyhow::Result<()> {
            let connection = framing::ConnectionString::for_device(host, &record.device_id, key)?;
            println!("{}", connection.to_secret_string());
            Ok(())
        };
    match command {
        DeviceCommand::Add { device_id } => {
            let record = cluster.add_device(&device_id).await?;
            let host = cluster_host_name(&cluster, arguments).await?;
            print_key(&record, &host, &record.primary_key)
        }
        DeviceCommand::List { .. } => {
            for record in cluster.list_devices().await? {
                println!(
                    "{}{}",
                    record.device_id,
                    if record.enabled { "" } else { " (disabled)" }
                );
            }
            Ok(())
        }
        DeviceCommand::Show { device_id } => {
            let record = cluster
                .device(&device_id)
                .await?
                .ok_or(relay::registry::RegistryError::NoSuchDevice(device_id))?;
            let host = cluster_host_name(&cluster, arguments).await?;
            print_key(&record, &host, &record.primary_key)
        }
        DeviceCommand::Remove { device_id } => {
            cluster.remove_device(&device_id).await?;
            eprintln!("relay: removed device {device_id}");
            Ok(())
        }
        DeviceCommand::Disable { device_id } => {
            cluster.set_device_enabled(&device_id, false).await?;
            eprintln!("relay: disabled device {device_id}");
            Ok(())
        }
        DeviceCommand::Enable { device_id } => {
            cluster.set_device_enabled(&device_id, true).await?;
            eprintln!("relay: enabled device {device_id}");
            Ok(())
        }
        DeviceCommand::RotateKey {
            device_id,
            secondary,
        } => {
            let record = cluster.rotate_device_key(&device_id, secondary).await?;
            let host = cluster_host_name(&cluster, arguments).await?;
            let key = if secondary {
                &record.secondary_key
            } else {
                &record.primary_key
            };
            print_key(&record, &host, key)
        }
    }
}

async fn cluster_policy_show(
    config: &relay::cluster::ClusterConfig,
    arguments: &ClusterArgs,
    name: &str,
) -> anyhow::Result<()> {
    let cluster = relay::cluster::Cluster::connect(config).await?;
    let policy = cluster
        .policy(name)
        .await?
        .ok_or_else(|| relay::registry::RegistryError::NoSuchPolicy(name.to_string()))?;
    let host = cluster_host_name(&cluster, arguments).await?;
    println!(
        "{}",
        framing::ConnectionString::for_policy(&host, name, &policy.primary_key)?.to_secret_string()
    );
    Ok(())
}

fn registry_command(
    data_dir: &std::path::Path,
    cluster: Option<relay::cluster::ClusterConfig>,
    command: RegistryCommand,
) -> anyhow::Result<()> {
    use relay::cluster::transfer;
    match (command, cluster) {
        (RegistryCommand::Export { file }, None) => {
            DataDir::refuse_if_cluster_node(data_dir)?;
            let export = transfer::export_data_dir(&DataDir::open_existing(data_dir)?)?;
            write_export(&file, &export)
        }
        (RegistryCommand::Export { file }, Some(config)) => cluster_command(async {
            let cluster = relay::cluster::Cluster::connect(&config).await?;
            let export = transfer::export_cluster(&cluster).await?;
            write_export(&file, &export)
        }),
        (RegistryCommand::Import { file }, cluster) => {
            let text =
                std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
            let export = transfer::RegistryExport::parse(&text)
                .with_context(|| format!("{}", file.display()))?;
            let summary = match cluster {
                None => {
                    DataDir::refuse_if_cluster_node(data_dir)?;
                    transfer::import_data_dir(&DataDir::create_or_open(data_dir)?, &export)?
                }
                Some(config) => {
                    let mut summary = None;
                    cluster_command(async {
                        let cluster = relay::cluster::Cluster::connect(&config).await?;
                        summary = Some(transfer::import_cluster(&cluster, &export).await?);
                        Ok(())
                    })?;
                    summary.unwrap_or_default()
                }
            };
            eprintln!(
                "relay: imported {} devices and {} policies{}",
                summary.devices,
                summary.policies,
                if summary.secret_written {
                    " and the stream-token secret"
                } else {
                    " (the target's stream-token secret was kept)"
                }
            );
            Ok(())
        }
    }
}

/// Writes the export owner-only (it holds every key).
fn write_export(
    file: &std::path::Path,
    export: &relay::cluster::transfer::RegistryExport,
) -> anyhow::Result<()> {
    use std::io::Write;
    let text = serde_json::to_vec_pretty(export).context("cannot encode the export")?;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut output = options
        .open(file)
        .with_context(|| format!("cannot create {}", file.display()))?;
    output
        .write_all(&text)
        .with_context(|| format!("cannot write {}", file.display()))?;
    eprintln!(
        "relay: exported {} devices and {} policies to {} (it holds their keys: keep it private)",
        export.devices.len(),
        export.policies.len(),
        file.display()
    );
    Ok(())
}

/// `relay policy add|list|remove|rotate-key` (show has its own arm).
fn policy_command(
    data_dir: &std::path::Path,
    cluster: Option<relay::cluster::ClusterConfig>,
    arguments: &ClusterArgs,
    command: PolicyCommand,
) -> anyhow::Result<()> {
    use relay::operator_cli::PolicyAction;
    let action = match command {
        PolicyCommand::Add { name, rights } => PolicyAction::Add { name, rights },
        PolicyCommand::List => PolicyAction::List,
        PolicyCommand::Remove { name } => PolicyAction::Remove { name },
        PolicyCommand::RotateKey { name, secondary } => PolicyAction::RotateKey { name, secondary },
        PolicyCommand::Show { name } => return policy_show(data_dir, &name),
    };
    match cluster {
        None => {
            DataDir::refuse_if_cluster_node(data_dir)?;
            let data_dir = DataDir::open_existing(data_dir)?;
            relay::operator_cli::policy_in_data_dir(&data_dir, || host_name(&data_dir), action)
        }
        Some(config) => cluster_command(async {
            let cluster = relay::cluster::Cluster::connect(&config).await?;
            let host = cluster_host_name(&cluster, arguments).await?;
            relay::operator_cli::policy_in_cluster(&cluster, &host, action).await
        }),
    }
}

fn policy_show(data_dir: &std::path::Path, name: &str) -> anyhow::Result<()> {
    DataDir::refuse_if_cluster_node(data_dir)?;
    let data_dir = DataDir::open_existing(data_dir)?;
    let registry = data_dir.registry()?;
    let policy = registry
        .policy(name)?
        .ok_or_else(|| relay::registry::RegistryError::NoSuchPolicy(name.to_string()))?;
    let host = host_name(&data_dir)?;
    println!(
        "{}",
        framing::ConnectionString::for_policy(&host, name, &policy.primary_key)?.to_secret_string()
    );
    Ok(())
}

/// `relay cluster status`: reads every node's heartbeat from NATS.
fn cluster_status(config: &relay::cluster::ClusterConfig) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let cluster = relay::cluster::Cluster::connect(config).await?;
        let heartbeats = relay::cluster::heartbeat::read_all(cluster.jetstream()).await?;
        print!(
            "{}",
            relay::cluster::heartbeat::render_status(&heartbeats, std::time::SystemTime::now())
        );
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serve_arguments(extra: &[&str]) -> Result<ServeArgs, clap::Error> {
        let mut arguments = vec!["relay", "serve"];
        arguments.extend_from_slice(extra);
        match Cli::try_parse_from(arguments)?.command {
            Command::Serve(arguments) => Ok(*arguments),
            _ => unreachable!("the arguments name the serve command"),
        }
    }

    #[test]
    fn mqtt_packet_size_is_bounded_by_what_mqtt_allows() {
        let largest = relay::config::MAX_MQTT_PACKET_SIZE.to_string();
        let accepted = serve_arguments(&["--max-mqtt-packet-size", &largest]).expect("accepted");
        assert_eq!(
            accepted.max_mqtt_packet_size,
            relay::config::MAX_MQTT_PACKET_SIZE
        );
        let too_large = (relay::config::MAX_MQTT_PACKET_SIZE + 1).to_string();
        for refused in [too_large.as_str(), "18446744073709551615", "0"] {
            assert!(
                serve_arguments(&["--max-mqtt-packet-size", refused]).is_err(),
                "--max-mqtt-packet-size {refused} accepted"
            );
        }
    }

    #[test]
    fn trusted_proxies_take_addresses_and_networks_repeated_or_comma_separated() {
        let parsed = serve_arguments(&[
            "--trusted-proxy",
            "127.0.0.1",
            "--trusted-proxy",
            "10.0.0.0/8,fd00::/8",
        ])
        .expect("parses");
        let written: Vec<String> = parsed.trusted_proxy.iter().map(|n| n.to_string()).collect();
        assert_eq!(written, ["127.0.0.1/32", "10.0.0.0/8", "fd00::/8"]);
        assert!(serve_arguments(&["--trusted-proxy", "nginx.internal"]).is_err());
        assert!(serve_arguments(&[])
            .expect("parses")
            .trusted_proxy
            .is_empty());
    }

    #[test]
    fn listeners_take_ipv6_addresses() {
        let parsed = serve_arguments(&["--listen", "[::1]:8443", "--mqtt-listen", "[::]:8883"])
            .expect("parses");
        assert_eq!(parsed.listen, "[::1]:8443".parse().unwrap());
        assert_eq!(parsed.mqtt_listen, "[::]:8883".parse().unwrap());
    }

    #[test]
    fn admin_listener_is_off_unless_asked_for() {
        let default = serve_arguments(&[]).expect("defaults parse");
        assert_eq!(default.admin_listen, None);
        let asked = serve_arguments(&["--admin-listen", "127.0.0.1:9090"]).expect("parses");
        assert_eq!(asked.admin_listen, Some("127.0.0.1:9090".parse().unwrap()));
        assert!(!asked.admin_tls);
        let secured =
            serve_arguments(&["--admin-listen", "127.0.0.1:9090", "--admin-tls"]).expect("parses");
        assert!(secured.admin_tls);
        // TLS for a listener that is not there, or without a certificate.
        assert!(serve_arguments(&["--admin-tls"]).is_err());
        assert!(serve_arguments(&[
            "--admin-listen",
            "127.0.0.1:9090",
            "--admin-tls",
            "--no-tls"
        ])
        .is_err());
    }

    /// Feeds `counts`, one check every 250 ms, and returns the checks that
    /// trimmed.
    fn trims(counts: &[usize]) -> Vec<usize> {
        let mut schedule = TrimSchedule::default();
        (0..counts.len())
            .filter(|&check| schedule.trim_now(counts[check], TRIM_CHECK_INTERVAL * check as u32))
            .collect()
    }

    #[test]
    fn a_trim_follows_any_fall_to_half_the_peak_at_most_every_two_seconds() {
        assert_eq!(
            trims(&[1, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
            [1, 9],
            "one stream ended"
        );
        assert_eq!(
            trims(&[200, 100, 100, 100, 100, 100, 100, 100, 100, 100]),
            [1, 9],
            "half of it ended"
        );
        assert_eq!(
            trims(&[200, 101, 101]),
            [] as [usize; 0],
            "most of it still runs"
        );
        assert_eq!(
            trims(&[0, 0, 0]),
            [] as [usize; 0],
            "an idle relay is left alone"
        );
        assert_eq!(
            trims(&[5; 20]),
            [] as [usize; 0],
            "a steady load is left alone"
        );
        // A burst ends in steps: each fall waits out the spacing, and each
        // trim that a fall caused gets its follow-up.
        let mut burst = vec![200, 90, 40];
        burst.resize(30, 40);
        burst[15] = 10;
        assert_eq!(trims(&burst), [1, 9, 17]);
    }
}
