//! Opening a client connection through a system and asking the target for a
//! mode (see [`crate::target`]). Set-up latency is measured here: from the
//! start of the TCP connect to the first echoed byte.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::target::MODE_ECHO;

/// Connects, asks for echo, and waits for the first echoed byte. Returns the
/// connection and the time that took.
pub async fn open_echo(
    address: SocketAddr,
    timeout: Duration,
) -> anyhow::Result<(TcpStream, Duration)> {
    let started = Instant::now();
    let opened = tokio::time::timeout(timeout, async {
        let mut socket = TcpStream::connect(address).await.context("connect")?;
        socket.set_nodelay(true)?;
        socket
            .write_all(&[MODE_ECHO])
            .await
            .context("write the mode byte")?;
        let mut first = [0u8; 1];
        socket
            .read_exact(&mut first)
            .await
            .context("read the first echoed byte")?;
        if first[0] != MODE_ECHO {
            bail!(
                "the first echoed byte was {:#04x}, not the one sent",
                first[0]
            );
        }
        anyhow::Ok(socket)
    })
    .await
    .with_context(|| format!("no echo through {address} within {timeout:?}"))??;
    Ok((opened, started.elapsed()))
}

/// Connects and sends a mode byte; for bulk modes, which answer nothing.
pub async fn open_mode(
    address: SocketAddr,
    mode: u8,
    timeout: Duration,
) -> anyhow::Result<TcpStream> {
    tokio::time::timeout(timeout, async {
        let mut socket = TcpStream::connect(address).await.context("connect")?;
        socket.set_nodelay(true)?;
        socket
            .write_all(&[mode])
            .await
            .context("write the mode byte")?;
        anyhow::Ok(socket)
    })
    .await
    .with_context(|| format!("connecting through {address} took longer than {timeout:?}"))?
}
