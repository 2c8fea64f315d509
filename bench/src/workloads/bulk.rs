//! Bulk throughput: N parallel streams pushing 64 KiB writes one way for a
//! fixed window, after a warm-up that absorbs connection set-up and TCP slow
//! start. Bytes are counted at the receiving end (the target for uploads,
//! the bench's clients for downloads), and CPU time of every process of the
//! system is read over exactly the same window, which gives CPU-seconds per
//! GB, as is the share of the machine left idle.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use super::connection::open_mode;
use crate::machine_load::IdleTicks;
use crate::systems::{cpu_used, Role, System};
use crate::target::{payload_chunk, TargetServer, CHUNK_SIZE, MODE_DOWNLOAD, MODE_UPLOAD};

/// How long a bulk stream may take to connect.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long stopped clients get to finish before they are aborted.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Operator → device (client writes, target reads).
    Upload,
    /// Device → operator (target writes, client reads).
    Download,
}

impl Direction {
    pub fn label(self) -> &'static str {
        match self {
            Direction::Upload => "upload (operator → device)",
            Direction::Download => "download (device → operator)",
        }
    }
}

#[derive(Debug, Clone)]
pub struct BulkRun {
    pub direction: Direction,
    pub streams: usize,
    pub bytes: u64,
    pub window: Duration,
    /// CPU time each process of the system used during the window.
    pub cpu: Vec<(Role, Duration)>,
    /// Streams that failed to connect or broke during the run.
    pub failed_streams: usize,
    /// Share of the machine (all cores) idle during the window, when
    /// /proc/stat could be read.
    pub machine_idle: Option<f64>,
    /// MB/s of every round of this system, in round order, when this is the
    /// median of several ([`crate::run`]); empty for a single run. Systems
    /// run one after the other in each round, so round `n` of two systems
    /// was measured seconds apart: their ratio is free of the machine's
    /// drift between rounds.
    pub round_rates: Vec<f64>,
}

impl BulkRun {
    /// Megabytes (10^6 bytes) per second.
    pub fn megabytes_per_second(&self) -> f64 {
        self.bytes as f64 / 1e6 / self.window.as_secs_f64()
    }
}

pub async fn run(
    system: &System,
    target: &TargetServer,
    direction: Direction,
    streams: usize,
    warm_up: Duration,
    window: Duration,
) -> BulkRun {
    let cancel = CancellationToken::new();
    let downloaded = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(AtomicU64::new(0));
    let chunk = Arc::new(payload_chunk());
    let mut clients = Vec::with_capacity(streams);
    for _ in 0..streams {
        let cancel = cancel.clone();
        let downloaded = downloaded.clone();
        let failures = failures.clone();
        let chunk = chunk.clone();
        let entry = system.entry;
        clients.push(tokio::spawn(async move {
            let mode = match direction {
                Direction::Upload => MODE_UPLOAD,
                Direction::Download => MODE_DOWNLOAD,
            };
            let Ok(mut socket) = open_mode(entry, mode, CONNECT_TIMEOUT).await else {
                failures.fetch_add(1, Ordering::Relaxed);
                return;
            };
            let mut buffer = vec![0u8; CHUNK_SIZE];
            loop {
                let step = async {
                    match direction {
                        Direction::Upload => socket.write_all(&chunk).await.map(|()| CHUNK_SIZE),
                        Direction::Download => socket.read(&mut buffer).await,
                    }
                };
                let result = tokio::select! {
                    _ = cancel.cancelled() => return,
                    result = step => result,
                };
                match result {
                    Ok(0) | Err(_) => {
                        failures.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                    Ok(count) if direction == Direction::Download => {
                        downloaded.fetch_add(count as u64, Ordering::Relaxed);
                    }
                    Ok(_) => {}
                }
            }
        }));
    }
    let received = || match direction {
        Direction::Upload => target.counters.bytes_uploaded.load(Ordering::Relaxed),
        Direction::Download => downloaded.load(Ordering::Relaxed),
    };

    tokio::time::sleep(warm_up).await;
    let idle_before = IdleTicks::now();
    let (bytes_before, cpu_before, started) = (received(), system.cpu_snapshot(), Instant::now());
    tokio::time::sleep(window).await;
    let (bytes_after, cpu_after, elapsed) = (received(), system.cpu_snapshot(), started.elapsed());
    let machine_idle = IdleTicks::now()
        .zip(idle_before)
        .and_then(|(after, before)| after.idle_share_since(&before));
    cancel.cancel();
    for client in clients {
        let abort = client.abort_handle();
        if tokio::time::timeout(STOP_TIMEOUT, client).await.is_err() {
            abort.abort();
        }
    }
    let cpu = cpu_used(&cpu_before, &cpu_after);
    BulkRun {
        direction,
        streams,
        bytes: bytes_after.saturating_sub(bytes_before),
        window: elapsed,
        cpu,
        failed_streams: failures.load(Ordering::Relaxed) as usize,
        machine_idle,
        round_rates: Vec::new(),
    }
}
