//! New stream set-up: one connection at a time, from the start of the local
//! TCP connect to the first echoed byte. Through devstreams this includes the
//! whole create / notify device / accept / pair handshake.
//!
//! Systems take turns, one connection each, so every system meets the same
//! conditions on the machine (see [`super::ping_pong`]).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::connection::open_echo;
use crate::statistics::Percentiles;

const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct SetupResult {
    pub latency: Option<Percentiles>,
    pub attempted: usize,
    pub failures: usize,
    pub first_error: Option<String>,
}

/// Up to `count` sequential set-ups per entry, in turns, stopping early at
/// `time_limit`. One result per entry, in order.
pub async fn run(entries: &[SocketAddr], count: usize, time_limit: Duration) -> Vec<SetupResult> {
    let deadline = Instant::now() + time_limit;
    let mut samples: Vec<Vec<Duration>> =
        entries.iter().map(|_| Vec::with_capacity(count)).collect();
    let mut results: Vec<SetupResult> = entries
        .iter()
        .map(|_| SetupResult {
            latency: None,
            attempted: 0,
            failures: 0,
            first_error: None,
        })
        .collect();
    for _ in 0..count {
        if Instant::now() >= deadline {
            break;
        }
        for ((entry, result), taken) in entries
            .iter()
            .zip(results.iter_mut())
            .zip(samples.iter_mut())
        {
            result.attempted += 1;
            match open_echo(*entry, CONNECTION_TIMEOUT).await {
                Ok((socket, elapsed)) => {
                    taken.push(elapsed);
                    drop(socket);
                }
                Err(error) => {
                    result.failures += 1;
                    result
                        .first_error
                        .get_or_insert_with(|| format!("{error:#}"));
                }
            }
        }
    }
    for (result, taken) in results.iter_mut().zip(&samples) {
        result.latency = Percentiles::of(taken);
    }
    results
}
