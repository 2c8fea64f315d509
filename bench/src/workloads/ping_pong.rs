//! Request/response latency: 64 bytes out, the same 64 bytes back, one at a
//! time over one established stream, as an interactive session (a keystroke
//! and its echo) does. The first round trips warm the path and are not kept.
//!
//! All systems are measured in turns, a block of round trips each, so that a
//! change on the machine (a neighbour's job starting, idle CPUs going to
//! sleep) falls on every system alike instead of on whichever ran then.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::connection::open_echo;
use crate::statistics::Percentiles;

pub const MESSAGE_SIZE: usize = 64;
const WARM_UP_ROUND_TRIPS: usize = 200;
/// Round trips one system does before the next system's turn.
const BLOCK: usize = 50;
const ROUND_TRIP_TIMEOUT: Duration = Duration::from_secs(5);

/// Up to `round_trips` measured round trips per entry, in turns, stopping
/// early at `time_limit`. One result per entry, in order.
pub async fn run(
    entries: &[SocketAddr],
    round_trips: usize,
    time_limit: Duration,
) -> Vec<anyhow::Result<Percentiles>> {
    let deadline = Instant::now() + time_limit;
    let mut streams: Vec<anyhow::Result<TcpStream>> = Vec::with_capacity(entries.len());
    for entry in entries {
        let opened = async {
            let (mut socket, _) = open_echo(*entry, Duration::from_secs(10)).await?;
            for _ in 0..WARM_UP_ROUND_TRIPS {
                round_trip(&mut socket).await?;
            }
            anyhow::Ok(socket)
        };
        streams.push(opened.await);
    }
    let mut samples: Vec<Vec<Duration>> = entries
        .iter()
        .map(|_| Vec::with_capacity(round_trips))
        .collect();
    while Instant::now() < deadline
        && samples
            .iter()
            .zip(&streams)
            .any(|(taken, stream)| stream.is_ok() && taken.len() < round_trips)
    {
        for (stream, taken) in streams.iter_mut().zip(samples.iter_mut()) {
            let Ok(socket) = stream else { continue };
            for _ in 0..BLOCK.min(round_trips - taken.len()) {
                let started = Instant::now();
                if let Err(error) = round_trip(socket).await {
                    *stream = Err(error);
                    break;
                }
                taken.push(started.elapsed());
            }
        }
    }
    streams
        .into_iter()
        .zip(samples)
        .map(|(stream, taken)| {
            stream?;
            Percentiles::of(&taken).context("no round trip completed")
        })
        .collect()
}

async fn round_trip(socket: &mut TcpStream) -> anyhow::Result<()> {
    let message = [b'p'; MESSAGE_SIZE];
    let mut answer = [0u8; MESSAGE_SIZE];
    tokio::time::timeout(ROUND_TRIP_TIMEOUT, async {
        socket.write_all(&message).await?;
        socket.read_exact(&mut answer).await
    })
    .await
    .context("a 64-byte round trip took longer than 5 s")?
    .context("the stream broke during the ping-pong")?;
    Ok(())
}
