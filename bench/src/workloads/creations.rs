//! Sustained stream creations: a fixed number of clients, each opening a
//! stream, waiting for its first echoed byte and closing it, over and over
//! for a fixed time. The rate counts only streams that carried their echo;
//! any failure (refused, reset, timed out) is counted separately, because
//! the target is a rate reached with none.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::connection::open_echo;
use crate::systems::{cpu_used, Role, System};

const CONNECTION_TIMEOUT: Duration = Duration::from_secs(5);
/// A client that failed waits this long before trying again, so a broken
/// system is not hammered in a tight loop.
const RETRY_PAUSE: Duration = Duration::from_millis(10);

#[derive(Debug, Clone)]
pub struct CreationResult {
    pub completed: u64,
    pub failures: u64,
    pub elapsed: Duration,
    pub concurrency: usize,
    pub first_error: Option<String>,
    /// CPU time each process of the system used over the whole run.
    pub cpu: Vec<(Role, Duration)>,
}

impl CreationResult {
    pub fn per_second(&self) -> f64 {
        self.completed as f64 / self.elapsed.as_secs_f64().max(f64::EPSILON)
    }

    /// CPU milliseconds one role's process spent per completed stream.
    pub fn cpu_milliseconds_per_stream(&self, role: Role) -> Option<f64> {
        let cpu = self.cpu.iter().find(|(candidate, _)| *candidate == role)?.1;
        (self.completed > 0).then(|| cpu.as_secs_f64() * 1e3 / self.completed as f64)
    }
}

pub async fn run(system: &System, concurrency: usize, duration: Duration) -> CreationResult {
    let entry = system.entry;
    let cpu_before = system.cpu_snapshot();
    let completed = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(AtomicU64::new(0));
    let first_error = Arc::new(Mutex::new(None::<String>));
    let started = Instant::now();
    let deadline = started + duration;
    let mut clients = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        let (completed, failures, first_error) =
            (completed.clone(), failures.clone(), first_error.clone());
        clients.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                match open_echo(entry, CONNECTION_TIMEOUT).await {
                    Ok((socket, _)) => {
                        completed.fetch_add(1, Ordering::Relaxed);
                        drop(socket);
                    }
                    Err(error) => {
                        failures.fetch_add(1, Ordering::Relaxed);
                        if let Ok(mut first) = first_error.lock() {
                            first.get_or_insert_with(|| format!("{error:#}"));
                        }
                        tokio::time::sleep(RETRY_PAUSE).await;
                    }
                }
            }
        }));
    }
    for client in clients {
        let _ = client.await;
    }
    let cpu = cpu_used(&cpu_before, &system.cpu_snapshot());
    let first_error = first_error.lock().ok().and_then(|first| first.clone());
    CreationResult {
        cpu,
        completed: completed.load(Ordering::Relaxed),
        failures: failures.load(Ordering::Relaxed),
        elapsed: started.elapsed(),
        concurrency,
        first_error,
    }
}
