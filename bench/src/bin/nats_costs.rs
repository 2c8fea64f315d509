//! `nats-costs`: what cluster mode asks of NATS per device, measured on a
//! real `nats-server -js`.
//!
//! Cluster mode (DESIGN.md, "Several relays") keeps per device one key in
//! the `devstreams-registry` JetStream KV bucket, per connected identity one
//! queue subscription on `devstreams.identity.<id>.streams` on the holding
//! node's NATS connection, and per node one wildcard subscription to every
//! identity's takeover announcements (`devstreams.identity.*.takeover`).
//! This program does exactly that for N synthetic devices with the official
//! client (async-nats) and reads: the server's RSS per subscription and per
//! key, this client's own heap growth per subscription (what a node pays
//! on NATS for presence), the KV
//! store's size on disk per key, the put rate, and how fast a fresh client
//! reads the whole bucket with a watch (what a node does when it starts).
//!
//! Bounded: N is capped, every phase has a deadline, and the nats-server it
//! starts (free loopback port, store in a temp dir) is stopped by its PID.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use async_nats::jetstream::kv;
use bench::child::{ChildProcess, Stdout};
use bench::process_stats::{anonymous_kibibytes, resident_kibibytes};
use clap::Parser;
use futures_util::StreamExt;

/// The bucket name cluster mode uses.
const REGISTRY_BUCKET: &str = "devstreams-registry";
/// Puts in flight at once.
const PUT_CONCURRENCY: usize = 256;
/// Deadline of each phase (subscribing, putting, reading back).
const PHASE_TIMEOUT: Duration = Duration::from_secs(600);
/// Rest before a reading, so the server's buffers settle.
const SETTLE_TIME: Duration = Duration::from_secs(3);

#[derive(Debug, Parser)]
#[command(
    name = "nats-costs",
    about = "Measures NATS's cost per device in cluster mode: subscriptions, KV keys, start-up read"
)]
struct Arguments {
    /// Synthetic devices (one KV key and one subscription each)
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u32).range(1..=2_000_000))]
    devices: u32,
    /// The nats-server program (default: from PATH or /usr/sbin)
    #[arg(long, value_name = "PATH")]
    nats_server: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match run(Arguments::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("nats-costs: error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn find_nats_server() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/local/sbin"].map(PathBuf::from))
        .map(|directory| directory.join("nats-server"))
        .find(|candidate| candidate.is_file())
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Bytes of every file under `directory`.
fn directory_bytes(directory: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(directory) else {
        return 0;
    };
    entries
        .flatten()
        .map(|entry| match entry.metadata() {
            Ok(metadata) if metadata.is_dir() => directory_bytes(&entry.path()),
            Ok(metadata) => metadata.len(),
            Err(_) => 0,
        })
        .sum()
}

/// The subject token for a device id, as cluster mode encodes ids (any
/// character NATS gives meaning to is escaped); synthetic ids need none.
fn device_id(index: u32) -> String {
    format!("fleet-device-{index:07}")
}

async fn run(arguments: Arguments) -> anyhow::Result<()> {
    let devices = arguments.devices as usize;
    let program = arguments.nats_server.or_else(find_nats_server).context(
        "nats-server is not installed (apt-get install nats-server), or pass --nats-server PATH",
    )?;
    let directory = tempfile::Builder::new().prefix("nats-costs-").tempdir()?;
    let store = directory.path().join("store");
    let port = free_port()?;
    let server_arguments: Vec<String> = [
        "-js",
        "-a",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "-sd",
        &store.to_string_lossy(),
    ]
    .iter()
    .map(|argument| argument.to_string())
    .collect();
    let server = ChildProcess::spawn(
        "nats-server",
        &program,
        &server_arguments,
        directory.path(),
        &[],
        Stdout::Logged,
    )?;
    let result = measure(&server, port, &store, devices).await;
    server.stop().await;
    result
}

async fn measure(
    server: &ChildProcess,
    port: u16,
    store: &Path,
    devices: usize,
) -> anyhow::Result<()> {
    let url = format!("nats://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(30);
    let client = loop {
        match async_nats::connect(&url).await {
            Ok(client) => break client,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(error) => bail!(
                "nats-server did not accept a client: {error}; its log:\n{}",
                server.log_tail()
            ),
        }
    };
    let server_pid = server.pid();
    let own_pid = std::process::id();
    tokio::time::sleep(SETTLE_TIME).await;
    let server_before = resident_kibibytes(server_pid).unwrap_or(0);
    let client_before = anonymous_kibibytes(own_pid).unwrap_or(0);

    // Presence: the node's one takeover wildcard, and one queue subscription
    // per connected identity, on one connection.
    let started = Instant::now();
    let mut subscriptions = Vec::with_capacity(devices + 1);
    let subscribing = async {
        subscriptions.push(client.subscribe("devstreams.identity.*.takeover").await?);
        for index in 0..devices as u32 {
            let id = device_id(index);
            subscriptions.push(
                client
                    .queue_subscribe(
                        format!("devstreams.identity.{id}.streams"),
                        "devstreams-responders".to_string(),
                    )
                    .await?,
            );
        }
        client.flush().await?;
        anyhow::Ok(())
    };
    tokio::time::timeout(PHASE_TIMEOUT, subscribing)
        .await
        .context("subscribing took too long")??;
    let subscribe_duration = started.elapsed();
    tokio::time::sleep(SETTLE_TIME).await;
    let server_with_subscriptions = resident_kibibytes(server_pid).unwrap_or(0);
    let client_with_subscriptions = anonymous_kibibytes(own_pid).unwrap_or(0);

    // Registry: one key per device in a KV bucket (history 1, as cluster mode).
    let jetstream = async_nats::jetstream::new(client.clone());
    // The bucket's stream made by hand with the settings of JetStream's KV
    // layer, as cluster mode does: the client's `create_key_value` checks
    // the account in a way nats-server 2.9 (Debian) does not answer.
    jetstream
        .create_stream(async_nats::jetstream::stream::Config {
            name: format!("KV_{REGISTRY_BUCKET}"),
            subjects: vec![format!("$KV.{REGISTRY_BUCKET}.>")],
            max_messages_per_subject: 1,
            allow_rollup: true,
            deny_delete: true,
            allow_direct: true,
            discard: async_nats::jetstream::stream::DiscardPolicy::New,
            ..Default::default()
        })
        .await
        .context("cannot create the KV bucket's stream")?;
    let bucket: kv::Store = jetstream
        .get_key_value(REGISTRY_BUCKET)
        .await
        .context("cannot open the KV bucket")?;
    // A device record as the registry holds it: id, two base64 keys of 32
    // bytes, enabled.
    let key_text = "A".repeat(44);
    let started = Instant::now();
    let putting = futures_util::stream::iter(0..devices as u32)
        .map(|index| {
            let bucket = bucket.clone();
            let id = device_id(index);
            let value = format!(
                r#"{{"device_id":"{id}","primary_key":"{key_text}","secondary_key":"{key_text}","enabled":true}}"#
            );
            async move { bucket.put(format!("devices.{id}"), value.into()).await }
        })
        .buffer_unordered(PUT_CONCURRENCY)
        .fold(Ok::<usize, anyhow::Error>(0), |count, result| async move {
            match (count, result) {
                (Ok(count), Ok(_)) => Ok(count + 1),
                (Ok(_), Err(error)) => Err(anyhow::anyhow!("KV put failed: {error}")),
                (Err(error), _) => Err(error),
            }
        });
    let put_count = tokio::time::timeout(PHASE_TIMEOUT, putting)
        .await
        .context("putting took too long")??;
    let put_duration = started.elapsed();
    tokio::time::sleep(SETTLE_TIME).await;
    let server_with_keys = resident_kibibytes(server_pid).unwrap_or(0);
    let store_bytes = directory_bytes(store);
    let value_bytes = format!(
        r#"{{"device_id":"{}","primary_key":"{key_text}","secondary_key":"{key_text}","enabled":true}}"#,
        device_id(0)
    )
    .len();

    // A node starting: a fresh connection reads every key with a watch.
    let reader = async_nats::connect(&url).await?;
    let reader_bucket = async_nats::jetstream::new(reader)
        .get_key_value(REGISTRY_BUCKET)
        .await?;
    let started = Instant::now();
    let reading = async {
        let mut watch = reader_bucket.watch_with_history(">").await?;
        let mut read = 0usize;
        while let Some(entry) = watch.next().await {
            let entry = entry?;
            read += 1;
            if entry.delta == 0 {
                break;
            }
        }
        anyhow::Ok(read)
    };
    let read_count = tokio::time::timeout(PHASE_TIMEOUT, reading)
        .await
        .context("reading the bucket back took too long")??;
    let read_duration = started.elapsed();
    drop(subscriptions);

    let per = |after: u64, before: u64, count: usize| {
        after.saturating_sub(before) as f64 * 1024.0 / count.max(1) as f64
    };
    println!("## NATS per device (nats-server -js, one connection, {devices} devices)\n");
    println!("| what | measured | per device |");
    println!("|---|---:|---:|");
    println!(
        "| 1 subscription per identity: nats-server RSS | {} → {} KiB | {:.0} B |",
        server_before,
        server_with_subscriptions,
        per(server_with_subscriptions, server_before, devices)
    );
    println!(
        "| 1 subscription per identity: client (node) heap, async-nats | {} → {} KiB | {:.0} B |",
        client_before,
        client_with_subscriptions,
        per(client_with_subscriptions, client_before, devices)
    );
    println!(
        "| subscribing | {:.2} s | {:.1} µs |",
        subscribe_duration.as_secs_f64(),
        subscribe_duration.as_secs_f64() * 1e6 / devices.max(1) as f64
    );
    println!(
        "| 1 KV key ({value_bytes} B value): nats-server RSS | {} → {} KiB | {:.0} B |",
        server_with_subscriptions,
        server_with_keys,
        per(server_with_keys, server_with_subscriptions, put_count)
    );
    println!(
        "| 1 KV key: JetStream store on disk | {:.1} MiB | {:.0} B |",
        store_bytes as f64 / (1024.0 * 1024.0),
        store_bytes as f64 / put_count.max(1) as f64
    );
    println!(
        "| KV puts ({PUT_CONCURRENCY} in flight) | {put_count} in {:.2} s | {:.0} puts/s |",
        put_duration.as_secs_f64(),
        put_count as f64 / put_duration.as_secs_f64().max(1e-9)
    );
    println!(
        "| a starting node reads the bucket (watch with history) | {read_count} in {:.2} s | {:.1} µs |",
        read_duration.as_secs_f64(),
        read_duration.as_secs_f64() * 1e6 / read_count.max(1) as f64
    );
    Ok(())
}
