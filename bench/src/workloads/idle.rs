//! Concurrent idle streams: open many streams (each confirmed end to end by
//! its first echoed byte), hold them, read every process's RSS, close them
//! all, and read RSS again once the target has seen every connection end.
//!
//! Per-stream memory is (RSS while holding − RSS just before opening) ÷
//! streams held, so what the earlier measurements left in the allocator is
//! not charged to the idle streams.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::TcpStream;

use super::connection::open_echo;
use crate::process_stats::resident_kibibytes;
use crate::systems::{cpu_used, Role, System};
use crate::target::TargetServer;

const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);
/// Held streams rest this long before RSS is read, so lazy buffers settle.
const SETTLE_TIME: Duration = Duration::from_secs(3);
/// After closing, how long the bench waits for every stream to end.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct ProcessMemory {
    pub role: Role,
    pub before_kibibytes: u64,
    pub held_kibibytes: u64,
    pub after_kibibytes: u64,
}

impl ProcessMemory {
    pub fn kibibytes_per_stream(&self, streams: usize) -> f64 {
        self.held_kibibytes.saturating_sub(self.before_kibibytes) as f64 / streams.max(1) as f64
    }
}

#[derive(Debug, Clone)]
pub struct IdleResult {
    pub requested: usize,
    pub opened: usize,
    pub failures: usize,
    pub first_error: Option<String>,
    pub open_duration: Duration,
    /// How long until the target saw every held stream end after the close.
    pub close_duration: Option<Duration>,
    pub memory: Vec<ProcessMemory>,
    /// CPU each process used while the streams were held, idle.
    pub cpu_while_held: Vec<(Role, Duration)>,
    pub held_window: Duration,
}

impl IdleResult {
    pub fn memory(&self, role: Role) -> Option<&ProcessMemory> {
        self.memory.iter().find(|memory| memory.role == role)
    }

    /// Share of one core a role's process used while the streams sat idle.
    pub fn core_share_while_held(&self, role: Role) -> Option<f64> {
        let cpu = self
            .cpu_while_held
            .iter()
            .find(|(candidate, _)| *candidate == role)?
            .1;
        Some(cpu.as_secs_f64() / self.held_window.as_secs_f64().max(f64::EPSILON))
    }
}

pub async fn run(
    system: &System,
    target: &TargetServer,
    count: usize,
    concurrency: usize,
    open_time_limit: Duration,
    cpu_window: Duration,
) -> IdleResult {
    let rss = || -> Vec<(Role, Option<u64>)> {
        system
            .processes
            .iter()
            .map(|process| (process.role, resident_kibibytes(process.pid)))
            .collect()
    };
    let before = rss();
    let baseline_connections = target.open_connections();

    let started = Instant::now();
    let deadline = started + open_time_limit;
    let next = Arc::new(AtomicUsize::new(0));
    let first_error = Arc::new(Mutex::new(None::<String>));
    let mut openers = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        let (next, first_error, entry) = (next.clone(), first_error.clone(), system.entry);
        openers.push(tokio::spawn(async move {
            open_many(entry, count, &next, deadline, &first_error).await
        }));
    }
    let mut held: Vec<TcpStream> = Vec::with_capacity(count);
    let mut failures = 0;
    for opener in openers {
        if let Ok((streams, failed)) = opener.await {
            held.extend(streams);
            failures += failed;
        }
    }
    let open_duration = started.elapsed();
    let opened = held.len();

    let (cpu_before_hold, hold_started) = (system.cpu_snapshot(), Instant::now());
    tokio::time::sleep(SETTLE_TIME.min(cpu_window)).await;
    let while_held = rss();
    // What idle streams cost is mostly their pings: the CPU is read over a
    // whole ping interval (`Plan::idle_cpu_window`).
    tokio::time::sleep(cpu_window.saturating_sub(hold_started.elapsed())).await;
    let cpu_while_held = cpu_used(&cpu_before_hold, &system.cpu_snapshot());
    let held_window = hold_started.elapsed();

    drop(held);
    let closing = Instant::now();
    let mut close_duration = None;
    while closing.elapsed() < CLOSE_TIMEOUT {
        if target.open_connections() <= baseline_connections {
            close_duration = Some(closing.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(SETTLE_TIME).await;
    let after = rss();

    let memory = before
        .iter()
        .zip(&while_held)
        .zip(&after)
        .filter_map(|(((role, before), (_, held)), (_, after))| {
            Some(ProcessMemory {
                role: *role,
                before_kibibytes: (*before)?,
                held_kibibytes: (*held)?,
                after_kibibytes: (*after)?,
            })
        })
        .collect();
    let first_error = first_error.lock().ok().and_then(|first| first.clone());
    IdleResult {
        requested: count,
        opened,
        failures,
        first_error,
        open_duration,
        close_duration,
        memory,
        cpu_while_held,
        held_window,
    }
}

/// One opener: takes stream numbers until `count` are taken or the deadline
/// passes; returns the streams it opened and how many failed.
async fn open_many(
    entry: SocketAddr,
    count: usize,
    next: &AtomicUsize,
    deadline: Instant,
    first_error: &Mutex<Option<String>>,
) -> (Vec<TcpStream>, usize) {
    let mut streams = Vec::new();
    let mut failures = 0;
    while Instant::now() < deadline && next.fetch_add(1, Ordering::Relaxed) < count {
        let remaining = deadline.saturating_duration_since(Instant::now());
        match open_echo(entry, CONNECTION_TIMEOUT.min(remaining)).await {
            Ok((socket, _)) => streams.push(socket),
            Err(error) => {
                failures += 1;
                if let Ok(mut first) = first_error.lock() {
                    first.get_or_insert_with(|| format!("{error:#}"));
                }
            }
        }
    }
    (streams, failures)
}
