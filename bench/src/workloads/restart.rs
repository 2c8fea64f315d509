//! Restart recovery: how long after a relay restart data flows again on a
//! session that outlived it. One stream through the system carries an
//! 8-byte numbered ping every 10 ms; the relay is `kill -9`ed and started
//! again on its data dir and address, over and over, and each time the
//! bench measures from the new relay's ready line to the first echo that
//! arrives after it. The client's TCP connection must never break, and the
//! echoes must come back in order, each exactly once: a resumed session
//! delivers every byte once, as TCP would.
//!
//! Each wait is bounded; a restart whose data does not flow within it is a
//! failure, and a broken stream ends the measurement (the rest count as
//! failed).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

use super::connection::open_echo;
use crate::systems::System;

/// Time between two pings.
const PING_INTERVAL: Duration = Duration::from_millis(10);

/// Pause after a recovery before the next kill, so the next restart does
/// not land on a half-finished resume.
const SETTLE: Duration = Duration::from_millis(500);

#[derive(Debug, Clone, Default)]
pub struct RestartResult {
    pub attempted: usize,
    /// Ready line → first echo after it, one per recovered restart.
    pub recoveries: Vec<Duration>,
    pub failures: usize,
    pub first_error: Option<String>,
}

impl RestartResult {
    /// Nearest-rank percentile of the recoveries, None without any.
    pub fn percentile(&self, percentile: f64) -> Option<Duration> {
        if self.recoveries.is_empty() {
            return None;
        }
        let mut sorted = self.recoveries.clone();
        sorted.sort_unstable();
        let rank = ((percentile / 100.0) * sorted.len() as f64).ceil() as usize;
        Some(sorted[rank.clamp(1, sorted.len()) - 1])
    }
}

/// What the reader saw last: when the latest echo arrived, or why the
/// stream broke.
type EchoState = Result<Option<Instant>, Arc<String>>;

/// `restarts` relay restarts under one pinging stream, each waited for at
/// most `wait_limit`.
pub async fn run(system: &mut System, restarts: usize, wait_limit: Duration) -> RestartResult {
    let mut result = RestartResult {
        attempted: restarts,
        ..RestartResult::default()
    };
    if let Err(error) = measure(system, restarts, wait_limit, &mut result).await {
        result.failures = restarts - result.recoveries.len();
        result.first_error = Some(match result.first_error.take() {
            Some(earlier) => format!("{earlier}; then {error:#}"),
            None => format!("{error:#}"),
        });
    }
    result
}

async fn measure(
    system: &mut System,
    restarts: usize,
    wait_limit: Duration,
    result: &mut RestartResult,
) -> anyhow::Result<()> {
    let (socket, _) = open_echo(system.entry, Duration::from_secs(10)).await?;
    let (reader, writer) = socket.into_split();
    let (echo_sender, mut echoes) = watch::channel::<EchoState>(Ok(None));
    let pinger = tokio::spawn(ping(writer));
    let echo_reader = tokio::spawn(read_echoes(reader, echo_sender));
    let outcome = restart_loop(system, restarts, wait_limit, &mut echoes, result).await;
    pinger.abort();
    echo_reader.abort();
    outcome
}

async fn restart_loop(
    system: &mut System,
    restarts: usize,
    wait_limit: Duration,
    echoes: &mut watch::Receiver<EchoState>,
    result: &mut RestartResult,
) -> anyhow::Result<()> {
    let entry = system.entry;
    // The stream carries pings before the first restart.
    wait_for_echo_after(echoes, Instant::now(), wait_limit)
        .await
        .map_err(|error| {
            anyhow::anyhow!("no ping echoed through {entry} before any restart: {error}")
        })?;
    for restart in 1..=restarts {
        let ready_at = match system.restart_relay().await {
            Ok(ready_at) => ready_at,
            Err(error) => bail!("restart {restart}: the relay did not come back: {error:#}"),
        };
        match wait_for_echo_after(echoes, ready_at, wait_limit).await {
            Ok(echoed_at) => {
                let recovery = echoed_at.saturating_duration_since(ready_at);
                eprintln!(
                    "{}: restart {restart}: data flowing again {:.0} ms after the relay's ready line",
                    system.kind.label(),
                    recovery.as_secs_f64() * 1e3
                );
                result.recoveries.push(recovery);
            }
            Err(WaitError::TimedOut) => {
                result.failures += 1;
                result.first_error.get_or_insert(format!(
                    "restart {restart}: no echo within {wait_limit:?} of the relay's ready line"
                ));
                // Give the session the rest of its chance before the next kill.
                wait_for_echo_after(echoes, Instant::now(), wait_limit)
                    .await
                    .map_err(|error| anyhow::anyhow!("restart {restart}: {error}"))?;
            }
            Err(WaitError::Broken(reason)) => {
                bail!("restart {restart}: the stream broke: {reason}")
            }
        }
        tokio::time::sleep(SETTLE).await;
    }
    Ok(())
}

#[derive(Debug)]
enum WaitError {
    TimedOut,
    Broken(String),
}

impl std::fmt::Display for WaitError {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WaitError::TimedOut => write!(formatter, "no echo within the wait limit"),
            WaitError::Broken(reason) => write!(formatter, "the stream broke: {reason}"),
        }
    }
}

/// Waits until an echo arrives after `after`; returns when it did.
async fn wait_for_echo_after(
    echoes: &mut watch::Receiver<EchoState>,
    after: Instant,
    wait_limit: Duration,
) -> Result<Instant, WaitError> {
    let waited = tokio::time::timeout(wait_limit, async {
        loop {
            match &*echoes.borrow_and_update() {
                Ok(Some(echoed_at)) if *echoed_at > after => return Ok(*echoed_at),
                Ok(_) => {}
                Err(reason) => return Err(WaitError::Broken(reason.to_string())),
            }
            if echoes.changed().await.is_err() {
                return Err(WaitError::Broken("the echo reader ended".into()));
            }
        }
    })
    .await;
    waited.unwrap_or(Err(WaitError::TimedOut))
}

/// Writes ping n (its number, 8 bytes) every [`PING_INTERVAL`] until the
/// stream breaks or the task is aborted.
async fn ping(mut writer: tokio::net::tcp::OwnedWriteHalf) {
    let mut interval = tokio::time::interval(PING_INTERVAL);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut number = 0u64;
    loop {
        interval.tick().await;
        if writer.write_all(&number.to_be_bytes()).await.is_err() {
            return;
        }
        number += 1;
    }
}

/// Reads the echoed pings, checks they come back in order and each once,
/// and publishes the arrival time of the latest.
async fn read_echoes(mut reader: tokio::net::tcp::OwnedReadHalf, echoes: watch::Sender<EchoState>) {
    let mut expected = 0u64;
    let mut echo = [0u8; 8];
    loop {
        if let Err(error) = reader.read_exact(&mut echo).await {
            let _ = echoes.send(Err(Arc::new(format!(
                "the client's connection ended after {expected} echoed pings: {error}"
            ))));
            return;
        }
        let number = u64::from_be_bytes(echo);
        if number != expected {
            let _ = echoes.send(Err(Arc::new(format!(
                "ping {number} came back where {expected} was due: a byte was lost or repeated"
            ))));
            return;
        }
        expected += 1;
        let _ = echoes.send(Ok(Some(Instant::now())));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_observed_recoveries() {
        let result = RestartResult {
            attempted: 20,
            recoveries: (1..=20).rev().map(Duration::from_millis).collect(),
            failures: 0,
            first_error: None,
        };
        assert_eq!(result.percentile(50.0), Some(Duration::from_millis(10)));
        assert_eq!(result.percentile(90.0), Some(Duration::from_millis(18)));
        assert_eq!(RestartResult::default().percentile(50.0), None);
    }
}
