//! `idle-devices`: what one idle device control channel costs a relay.
//!
//! Starts one release `relay serve` (by PID, stopped at the end), registers
//! one device, and holds up to N control channels to it over MQTT over TLS
//! on its MQTT port, each a separate identity (`device/module-i`, signed
//! with the device's key, which the relay accepts as IoT Hub does), each
//! doing what an idle IoT Hub device does: CONNECT, subscribe to the two
//! stream topics, then only PINGREQ at its keep-alive. It reads the relay's
//! RSS and CPU (from /proc, by PID) before, while holding and after, and
//! the relay's own count of connected devices, and prints a table for
//! SCALING.md.
//!
//! Bounded in count (by the open-file limit, which this process and the
//! relay each need one descriptor per channel of), in time (opening has a
//! deadline, holding a fixed window), and in what it leaves behind: the
//! relay is stopped by its PID, the channels are dropped with this process.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context};
use bench::child::{run_to_completion, ChildProcess, Stdout};
use bench::file_limit::{raise_open_file_limit, WANTED_OPEN_FILES};
use bench::process_stats::{anonymous_kibibytes, cpu_time, resident_kibibytes};
use clap::Parser;
use framing::mqtt::{
    ByteTransport, Connect, ConnectReturnCode, MqttConnection, Packet, QoS, Subscribe,
    SubscribeFilter,
};
use framing::transport::NetworkStream;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

type Channel = MqttConnection<ByteTransport<NetworkStream>>;

/// The one registered device whose module identities hold the channels.
const DEVICE_ID: &str = "idle-fleet";
/// How long one channel may take to connect, CONNECT and subscribe.
const CHANNEL_TIMEOUT: Duration = Duration::from_secs(20);
/// How long the relay may take to print its ready lines.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Rest before each reading, so lazy buffers and the allocator settle.
const SETTLE_TIME: Duration = Duration::from_secs(5);
/// After the channels close, how long the relay has to see them all end.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(60);
/// Descriptors kept free in this process besides one per channel.
const RESERVED_DESCRIPTORS: u64 = 128;
/// The keep-alive the channels announce: the C SDK's default. They ping
/// more often (--ping-interval) so the hold window sees keep-alive traffic.
const KEEP_ALIVE_SECONDS: u16 = 240;

const EXAMPLES: &str = "\
Examples:
  cargo build --release -p relay -p bench
  target/release/idle-devices --channels 10000            # about 3 minutes
  target/release/idle-devices --channels 1000 --hold 20   # a quick look";

#[derive(Debug, Parser)]
#[command(
    name = "idle-devices",
    about = "Holds idle device control channels (MQTT over TLS) to one relay and measures its RSS and CPU per channel",
    after_help = EXAMPLES
)]
struct Arguments {
    /// Control channels to hold; capped by the open-file limit
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..=60_000))]
    channels: u32,
    /// Channels being opened at the same time
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=1024))]
    concurrency: u32,
    /// Seconds allowed for opening all channels; the rest are not opened
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..=1800))]
    open_time_limit: u64,
    /// Seconds the channels are held idle while the relay's CPU is measured
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(5..=600))]
    hold: u64,
    /// Seconds between one channel's PINGREQs (an idle device's only traffic)
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(5..=200))]
    ping_interval: u64,
    /// Directory holding the release `relay` (default: the directory of this program)
    #[arg(long, value_name = "DIR")]
    binaries: Option<PathBuf>,
    /// RUST_LOG for the relay
    #[arg(long, default_value = "warn")]
    log_level: String,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match run(Arguments::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("idle-devices: error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// What the relay looked like at one moment.
#[derive(Debug, Clone, Copy, Default)]
struct Reading {
    resident_kibibytes: u64,
    anonymous_kibibytes: u64,
    open_files: usize,
    devices_connected: u64,
}

async fn read_relay(pid: u32, admin_address: &str) -> Reading {
    Reading {
        resident_kibibytes: resident_kibibytes(pid).unwrap_or(0),
        anonymous_kibibytes: anonymous_kibibytes(pid).unwrap_or(0),
        open_files: std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|entries| entries.count())
            .unwrap_or(0),
        devices_connected: metric(admin_address, "devstreams_devices_connected")
            .await
            .unwrap_or(0),
    }
}

/// One gauge from the relay's /metrics on its admin listener.
async fn metric(admin_address: &str, name: &str) -> Option<u64> {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(admin_address).await.ok()?;
        let request = "GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut body = String::new();
        stream.read_to_string(&mut body).await.ok()?;
        body.lines().find_map(|line| {
            line.strip_prefix(name)
                .filter(|rest| rest.starts_with(' '))
                .and_then(|rest| rest.trim().parse::<f64>().ok())
                .map(|value| value as u64)
        })
    };
    tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .ok()
        .flatten()
}

async fn run(arguments: Arguments) -> anyhow::Result<()> {
    let open_files =
        raise_open_file_limit(WANTED_OPEN_FILES).context("cannot read the open-file limit")?;
    let allowed = open_files.saturating_sub(RESERVED_DESCRIPTORS + arguments.concurrency as u64);
    let channels = (arguments.channels as u64).min(allowed) as usize;
    if channels < arguments.channels as usize {
        eprintln!(
            "idle-devices: holding {channels} channels, not {}: the open-file limit is {open_files}",
            arguments.channels
        );
    }
    let binaries = match arguments.binaries {
        Some(directory) => directory,
        None => std::env::current_exe()?
            .parent()
            .context("this program has no directory")?
            .to_path_buf(),
    };
    let relay_program = binaries.join("relay");
    if !relay_program.exists() {
        bail!(
            "{} is missing: run `cargo build --release -p relay -p bench` first, or pass --binaries DIR",
            relay_program.display()
        );
    }

    let directory = tempfile::Builder::new().prefix("idle-devices-").tempdir()?;
    let data_dir = directory
        .path()
        .join("relay-data")
        .to_string_lossy()
        .to_string();
    // Every channel comes from 127.0.0.1, so the per-source and connect-rate
    // admission limits (there to protect a production relay) are raised:
    // this measures what a channel costs, not the admission policy.
    let capacity = (channels + 1_000).to_string();
    let relay_arguments: Vec<String> = [
        "serve",
        "--data-dir",
        &data_dir,
        "--listen",
        "127.0.0.1:0",
        "--mqtt-listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--max-connections",
        &capacity,
        "--max-connections-per-source",
        &capacity,
        "--device-connects-per-second",
        "100000",
        "--device-connects-per-second-per-source",
        "100000",
    ]
    .iter()
    .map(|argument| argument.to_string())
    .collect();
    let environment = [("RUST_LOG", arguments.log_level.as_str())];
    let mut relay = ChildProcess::spawn(
        "relay",
        &relay_program,
        &relay_arguments,
        directory.path(),
        &environment,
        Stdout::Piped,
    )?;
    let mqtt_address = first_word(
        &relay
            .wait_for_line("MQTT listening on ", READY_TIMEOUT)
            .await?,
    );
    let admin_address = first_word(
        &relay
            .wait_for_line("Admin listening on ", READY_TIMEOUT)
            .await?,
    );
    let ca_certificate = relay
        .wait_for_line("CA certificate for clients (--ca-cert): ", READY_TIMEOUT)
        .await?;
    relay.drain_stdout();
    let mqtt_port: u16 = mqtt_address
        .rsplit(':')
        .next()
        .and_then(|port| port.parse().ok())
        .with_context(|| {
            format!("the relay printed an MQTT address without a port: {mqtt_address:?}")
        })?;

    let added = run_to_completion(
        &relay_program,
        &[
            "device".into(),
            "add".into(),
            DEVICE_ID.into(),
            "--data-dir".into(),
            data_dir.clone(),
        ],
        READY_TIMEOUT,
    )
    .await
    .context("relay device add")?;
    let connection = framing::ConnectionString::parse_device(added.trim())
        .context("`relay device add` printed no device connection string")?;
    let tls = framing::tls::client_config(Some(std::path::Path::new(&ca_certificate)))
        .context("the relay's certificate does not load")?;
    let host_name = connection.host().to_string();
    let key = connection.key().to_vec();

    let pid = relay.pid();
    tokio::time::sleep(SETTLE_TIME).await;
    let before = read_relay(pid, &admin_address).await;
    let cpu_before_open = cpu_time(pid).unwrap_or_default();

    // Open the channels: `concurrency` openers take channel numbers until
    // all are taken or the deadline passes.
    let open_started = Instant::now();
    let deadline = open_started + Duration::from_secs(arguments.open_time_limit);
    let next = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(AtomicUsize::new(0));
    let opened_count = Arc::new(AtomicUsize::new(0));
    let first_error = Arc::new(std::sync::Mutex::new(None::<String>));
    let pings = Arc::new(AtomicU64::new(0));
    let lost = Arc::new(AtomicUsize::new(0));
    let stop = CancellationToken::new();
    let holders = tokio_util::task::TaskTracker::new();
    let ping_interval = Duration::from_secs(arguments.ping_interval);
    let mut openers = Vec::new();
    for _ in 0..arguments.concurrency {
        let (next, failures, first_error) = (next.clone(), failures.clone(), first_error.clone());
        let opened_count = opened_count.clone();
        let (pings, lost, stop, holders) =
            (pings.clone(), lost.clone(), stop.clone(), holders.clone());
        let (tls, host_name, key) = (tls.clone(), host_name.clone(), key.clone());
        openers.push(tokio::spawn(async move {
            loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                if index >= channels || Instant::now() >= deadline {
                    break;
                }
                let remaining = deadline.saturating_duration_since(Instant::now());
                let opened = tokio::time::timeout(
                    CHANNEL_TIMEOUT.min(remaining),
                    open_channel(mqtt_port, &tls, &host_name, &key, index),
                )
                .await;
                match opened {
                    Ok(Ok(channel)) => {
                        opened_count.fetch_add(1, Ordering::Relaxed);
                        let (pings, lost, stop) = (pings.clone(), lost.clone(), stop.clone());
                        holders.spawn(hold_channel(channel, ping_interval, pings, lost, stop));
                    }
                    Ok(Err(error)) => {
                        failures.fetch_add(1, Ordering::Relaxed);
                        if let Ok(mut first) = first_error.lock() {
                            first.get_or_insert(format!("{error:#}"));
                        }
                    }
                    Err(_) => {
                        failures.fetch_add(1, Ordering::Relaxed);
                        if let Ok(mut first) = first_error.lock() {
                            first.get_or_insert("timed out".into());
                        }
                    }
                }
            }
        }));
    }
    for opener in openers {
        let _ = opener.await;
    }
    let open_duration = open_started.elapsed();
    let opened = opened_count.load(Ordering::Relaxed);
    let cpu_after_open = cpu_time(pid).unwrap_or_default();
    eprintln!(
        "idle-devices: {opened} channels open in {:.1} s ({} failed)",
        open_duration.as_secs_f64(),
        failures.load(Ordering::Relaxed)
    );

    tokio::time::sleep(SETTLE_TIME).await;
    let pings_before = pings.load(Ordering::Relaxed);
    let hold_cpu_before = cpu_time(pid).unwrap_or_default();
    let hold_started = Instant::now();
    tokio::time::sleep(Duration::from_secs(arguments.hold)).await;
    let hold_cpu = cpu_time(pid)
        .unwrap_or_default()
        .saturating_sub(hold_cpu_before);
    let hold_window = hold_started.elapsed();
    let hold_pings = pings.load(Ordering::Relaxed) - pings_before;
    let held = read_relay(pid, &admin_address).await;
    let lost_while_held = lost.load(Ordering::Relaxed);

    stop.cancel();
    holders.close();
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, holders.wait()).await;
    let closing = Instant::now();
    while closing.elapsed() < CLOSE_TIMEOUT {
        if metric(&admin_address, "devstreams_devices_connected").await == Some(0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let close_duration = closing.elapsed();
    tokio::time::sleep(SETTLE_TIME).await;
    let after = read_relay(pid, &admin_address).await;
    relay.stop().await;

    let first_error = first_error.lock().ok().and_then(|first| first.clone());
    print_report(&Report {
        requested: arguments.channels as usize,
        channels,
        opened,
        failures: failures.load(Ordering::Relaxed),
        first_error,
        lost_while_held,
        open_duration,
        open_cpu: cpu_after_open.saturating_sub(cpu_before_open),
        hold_window,
        hold_cpu,
        hold_pings,
        ping_interval,
        close_duration,
        before,
        held,
        after,
    });
    Ok(())
}

/// TCP, TLS, CONNECT as `DEVICE_ID/module-INDEX` and the two stream
/// subscriptions, as an IoT Hub device SDK opens its channel.
async fn open_channel(
    port: u16,
    tls: &Arc<framing::rustls::ClientConfig>,
    host_name: &str,
    key: &[u8],
    index: usize,
) -> anyhow::Result<Channel> {
    let stream = framing::transport::connect("localhost", port, Some(tls), CHANNEL_TIMEOUT)
        .await
        .context("TCP and TLS to the MQTT listener")?;
    let mut mqtt = MqttConnection::new(
        ByteTransport(stream),
        framing::mqtt::DEFAULT_MAX_PACKET_SIZE,
    );
    let module = format!("module-{index}");
    let client_id = format!("{DEVICE_ID}/{module}");
    let resource = format!("{host_name}/devices/{DEVICE_ID}/modules/{module}");
    let password = framing::sas::sign(
        &resource,
        key,
        SystemTime::now() + Duration::from_secs(3600),
        None,
    );
    let mut connect = Connect::new(client_id.clone());
    connect.keep_alive = KEEP_ALIVE_SECONDS;
    connect.clean_session = false;
    connect.set_login(
        format!("{host_name}/{client_id}/?api-version=2020-09-30"),
        password,
    );
    mqtt.write_packet(&Packet::Connect(connect)).await?;
    match mqtt.read_packet().await? {
        Some(Packet::ConnAck(ack)) if ack.code == ConnectReturnCode::Success => {}
        Some(Packet::ConnAck(ack)) => bail!("CONNECT refused: {:?}", ack.code),
        other => bail!("expected CONNACK, got {other:?}"),
    }
    let mut subscribe = Subscribe::new_many([
        SubscribeFilter::new(
            framing::topics::STREAM_REQUESTS_FILTER.into(),
            QoS::AtMostOnce,
        ),
        SubscribeFilter::new(
            framing::topics::STREAM_RESPONSES_FILTER.into(),
            QoS::AtMostOnce,
        ),
    ]);
    subscribe.pkid = 1;
    mqtt.write_packet(&Packet::Subscribe(subscribe)).await?;
    match mqtt.read_packet().await? {
        Some(Packet::SubAck(_)) => Ok(mqtt),
        other => bail!("expected SUBACK, got {other:?}"),
    }
}

/// Keeps one channel idle: a PINGREQ every `interval`, its PINGRESP read
/// within a deadline; ends when `stop` fires (dropping the socket) or the
/// relay closes the channel (counted in `lost`).
async fn hold_channel(
    mut channel: Channel,
    interval: Duration,
    pings: Arc<AtomicU64>,
    lost: Arc<AtomicUsize>,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        let answered = async {
            channel.write_packet(&Packet::PingReq).await.ok()?;
            loop {
                match channel.read_packet().await {
                    Ok(Some(Packet::PingResp)) => return Some(()),
                    Ok(Some(_)) => continue,
                    _ => return None,
                }
            }
        };
        match tokio::time::timeout(CHANNEL_TIMEOUT, answered).await {
            Ok(Some(())) => {
                pings.fetch_add(1, Ordering::Relaxed);
            }
            _ => {
                lost.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
    }
}

fn first_word(text: &str) -> String {
    text.split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

struct Report {
    requested: usize,
    channels: usize,
    opened: usize,
    failures: usize,
    first_error: Option<String>,
    lost_while_held: usize,
    open_duration: Duration,
    open_cpu: Duration,
    hold_window: Duration,
    hold_cpu: Duration,
    hold_pings: u64,
    ping_interval: Duration,
    close_duration: Duration,
    before: Reading,
    held: Reading,
    after: Reading,
}

fn print_report(report: &Report) {
    let per_channel =
        |held: u64, before: u64| held.saturating_sub(before) as f64 / report.opened.max(1) as f64;
    let core_share = report.hold_cpu.as_secs_f64() / report.hold_window.as_secs_f64().max(1e-9);
    let cpu_per_ping_microseconds = match report.hold_pings {
        0 => 0.0,
        pings => report.hold_cpu.as_secs_f64() * 1e6 / pings as f64,
    };
    println!("## Idle device control channels on one relay\n");
    println!(
        "channels requested {}, allowed by the open-file limit {}, opened {} ({} failed{}), lost while held {}",
        report.requested,
        report.channels,
        report.opened,
        report.failures,
        report
            .first_error
            .as_deref()
            .map(|error| format!("; first error: {error}"))
            .unwrap_or_default(),
        report.lost_while_held
    );
    println!(
        "relay reports devices connected: {} before, {} held, {} after closing ({:.1} s)\n",
        report.before.devices_connected,
        report.held.devices_connected,
        report.after.devices_connected,
        report.close_duration.as_secs_f64()
    );
    println!("| relay | before | holding | after close | per channel |");
    println!("|---|---:|---:|---:|---:|");
    println!(
        "| RSS (KiB) | {} | {} | {} | {:.2} KiB |",
        report.before.resident_kibibytes,
        report.held.resident_kibibytes,
        report.after.resident_kibibytes,
        per_channel(
            report.held.resident_kibibytes,
            report.before.resident_kibibytes
        )
    );
    println!(
        "| anonymous RSS (KiB) | {} | {} | {} | {:.2} KiB |",
        report.before.anonymous_kibibytes,
        report.held.anonymous_kibibytes,
        report.after.anonymous_kibibytes,
        per_channel(
            report.held.anonymous_kibibytes,
            report.before.anonymous_kibibytes
        )
    );
    println!(
        "| open files | {} | {} | {} | {:.2} |",
        report.before.open_files,
        report.held.open_files,
        report.after.open_files,
        per_channel(
            report.held.open_files as u64,
            report.before.open_files as u64
        )
    );
    println!();
    println!(
        "opening: {:.1} s, relay CPU {:.2} s = {:.0} µs per channel (TCP + TLS handshake + CONNECT + SUBSCRIBE)",
        report.open_duration.as_secs_f64(),
        report.open_cpu.as_secs_f64(),
        report.open_cpu.as_secs_f64() * 1e6 / report.opened.max(1) as f64
    );
    println!(
        "holding: {:.1} s window, relay CPU {:.3} s = {:.2} % of one core; {} PINGREQs answered ({:.0} per s, one per channel every {} s) = {:.1} µs of relay CPU per ping",
        report.hold_window.as_secs_f64(),
        report.hold_cpu.as_secs_f64(),
        core_share * 100.0,
        report.hold_pings,
        report.hold_pings as f64 / report.hold_window.as_secs_f64().max(1e-9),
        report.ping_interval.as_secs(),
        cpu_per_ping_microseconds
    );
}
