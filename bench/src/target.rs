//! The TCP server every tunnel ends at (the "sshd" of the benchmark). It
//! lives in the bench process so the bench can read its byte counter
//! directly, with no side channel that could itself cost time.
//!
//! The first byte a client sends picks what the connection does:
//! - `e`: echo. The byte is echoed at once (the "first echoed byte" of
//!   set-up latency), then everything else is echoed too.
//! - `u`: upload sink. Everything received is counted and dropped.
//! - `d`: download source. The server writes as fast as the path takes it.
//!
//! Every connection task is tracked and cancelled when the server is dropped,
//! and none outlives [`MAXIMUM_CONNECTION_LIFETIME`].

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub const MODE_ECHO: u8 = b'e';
pub const MODE_UPLOAD: u8 = b'u';
pub const MODE_DOWNLOAD: u8 = b'd';

/// Bytes per read and per write on bulk connections.
pub const CHUNK_SIZE: usize = 64 * 1024;

/// A connection must say what it wants within this.
const MODE_TIMEOUT: Duration = Duration::from_secs(30);

/// No connection lives longer than this, whatever the tunnel does.
const MAXIMUM_CONNECTION_LIFETIME: Duration = Duration::from_secs(300);

/// What the bench reads from the server while it runs.
#[derive(Default)]
pub struct TargetCounters {
    /// Bytes received on upload connections.
    pub bytes_uploaded: AtomicU64,
    /// Connections accepted and not yet ended.
    pub open_connections: AtomicUsize,
}

pub struct TargetServer {
    pub address: SocketAddr,
    pub counters: Arc<TargetCounters>,
    cancel: CancellationToken,
    tasks: TaskTracker,
}

impl TargetServer {
    pub async fn start() -> anyhow::Result<TargetServer> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        let counters = Arc::new(TargetCounters::default());
        let cancel = CancellationToken::new();
        let tasks = TaskTracker::new();
        let accept_counters = counters.clone();
        let accept_cancel = cancel.clone();
        let accept_tasks = tasks.clone();
        tasks.spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = accept_cancel.cancelled() => return,
                    accepted = listener.accept() => accepted,
                };
                let Ok((socket, _peer)) = accepted else {
                    // Out of file descriptors or a reset before accept: keep serving.
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                };
                let counters = accept_counters.clone();
                let cancel = accept_cancel.clone();
                accept_tasks.spawn(async move {
                    let _open = OpenConnection::new(&counters);
                    tokio::select! {
                        _ = cancel.cancelled() => {}
                        _ = tokio::time::timeout(MAXIMUM_CONNECTION_LIFETIME, serve(socket, &counters)) => {}
                    }
                });
            }
        });
        Ok(TargetServer {
            address,
            counters,
            cancel,
            tasks,
        })
    }

    pub fn open_connections(&self) -> usize {
        self.counters.open_connections.load(Ordering::Relaxed)
    }

    /// Cancels every connection and waits for their tasks to end.
    pub async fn stop(self) {
        self.cancel.cancel();
        self.tasks.close();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.tasks.wait()).await;
    }
}

impl Drop for TargetServer {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// Counts a connection as open for as long as it lives.
struct OpenConnection<'a>(&'a TargetCounters);

impl<'a> OpenConnection<'a> {
    fn new(counters: &'a TargetCounters) -> Self {
        counters.open_connections.fetch_add(1, Ordering::Relaxed);
        OpenConnection(counters)
    }
}

impl Drop for OpenConnection<'_> {
    fn drop(&mut self) {
        self.0.open_connections.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn serve(mut socket: TcpStream, counters: &TargetCounters) -> std::io::Result<()> {
    socket.set_nodelay(true)?;
    let mut mode = [0u8; 1];
    tokio::time::timeout(MODE_TIMEOUT, socket.read_exact(&mut mode)).await??;
    match mode[0] {
        MODE_ECHO => {
            socket.write_all(&mode).await?;
            let mut buffer = vec![0u8; CHUNK_SIZE];
            loop {
                let count = socket.read(&mut buffer).await?;
                if count == 0 {
                    return Ok(());
                }
                socket.write_all(&buffer[..count]).await?;
            }
        }
        MODE_UPLOAD => {
            let mut buffer = vec![0u8; CHUNK_SIZE];
            loop {
                let count = socket.read(&mut buffer).await?;
                if count == 0 {
                    return Ok(());
                }
                counters
                    .bytes_uploaded
                    .fetch_add(count as u64, Ordering::Relaxed);
            }
        }
        MODE_DOWNLOAD => {
            let chunk = payload_chunk();
            loop {
                socket.write_all(&chunk).await?;
            }
        }
        _ => Ok(()),
    }
}

/// Bulk payload: bytes that do not compress, so no layer can make the
/// transfer look cheaper than real data.
pub fn payload_chunk() -> Vec<u8> {
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..CHUNK_SIZE)
        .map(|_| {
            // xorshift64: fast, deterministic, incompressible enough.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn echo_answers_the_mode_byte_then_echoes() {
        let server = TargetServer::start().await.expect("target server starts");
        let mut client = TcpStream::connect(server.address).await.expect("connects");
        client.write_all(&[MODE_ECHO]).await.expect("mode written");
        let mut first = [0u8; 1];
        client
            .read_exact(&mut first)
            .await
            .expect("first byte echoed");
        assert_eq!(first[0], MODE_ECHO);
        client.write_all(b"ping").await.expect("written");
        let mut answer = [0u8; 4];
        client.read_exact(&mut answer).await.expect("echoed");
        assert_eq!(&answer, b"ping");
        server.stop().await;
    }

    #[tokio::test]
    async fn upload_bytes_are_counted() {
        let server = TargetServer::start().await.expect("target server starts");
        let mut client = TcpStream::connect(server.address).await.expect("connects");
        client
            .write_all(&[MODE_UPLOAD])
            .await
            .expect("mode written");
        client.write_all(&[7u8; 1000]).await.expect("written");
        drop(client);
        for _ in 0..100 {
            if server.counters.bytes_uploaded.load(Ordering::Relaxed) == 1000 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(server.counters.bytes_uploaded.load(Ordering::Relaxed), 1000);
        server.stop().await;
    }

    #[test]
    fn payload_is_not_constant() {
        let chunk = payload_chunk();
        assert_eq!(chunk.len(), CHUNK_SIZE);
        let distinct: std::collections::HashSet<u8> = chunk.iter().copied().collect();
        assert!(distinct.len() > 200);
    }
}
