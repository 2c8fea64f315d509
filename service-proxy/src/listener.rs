//! The local listening socket and its accept loop.
//!
//! The listener outlives any relay outage: it never dials the relay itself,
//! each accepted connection does (see [`crate::connection`]), so a relay that
//! is down fails those connections one by one, with a logged reason, and the
//! next connection after the relay returns simply works. A cap on concurrent
//! connections bounds what one flood of local clients can cost.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::warn;

use crate::connection::{self, ConnectionContext};

/// Pause after a failed accept (for example out of file descriptors), so the
/// loop does not spin while the condition lasts.
const ACCEPT_RETRY_DELAY: Duration = Duration::from_millis(100);

/// Binds the local port; the error is the one line the user reads.
pub async fn bind(address: SocketAddr) -> Result<TcpListener, String> {
    TcpListener::bind(address)
        .await
        .map_err(|error| bind_error_message(address, &error))
}

fn bind_error_message(address: SocketAddr, error: &io::Error) -> String {
    let port = address.port();
    let ip = address.ip();
    match error.kind() {
        io::ErrorKind::AddrInUse => format!("port {port} is in use on {ip}, choose another LOCAL_PORT (or PROXY_PORT)"),
        io::ErrorKind::PermissionDenied => format!(
            "not allowed to listen on port {port} (ports below 1024 need privileges), choose another LOCAL_PORT"
        ),
        io::ErrorKind::AddrNotAvailable => {
            format!("{ip} is not an address of this machine, choose another --bind (127.0.0.1 for local use)")
        }
        _ => format!("cannot listen on {address}: {error}"),
    }
}

/// Accepts connections until `shutdown`, each served by its own task on
/// `tracker` while it holds one of `permits` (`--max-connections`, shared by
/// all listeners). Dropping the listener on return stops listening.
pub async fn accept_loop(
    listener: TcpListener,
    permits: Arc<Semaphore>,
    max_connections: usize,
    context: Arc<ConnectionContext>,
    tracker: &TaskTracker,
    shutdown: &CancellationToken,
) {
    let mut connection_number: u64 = 0;
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((tcp, peer)) => {
                let Ok(permit) = permits.clone().try_acquire_owned() else {
                    warn!(
                        %peer,
                        "{max_connections} connections are already open, the --max-connections limit; closing this one"
                    );
                    continue;
                };
                connection_number += 1;
                tracker.spawn(connection::serve(
                    tcp,
                    peer,
                    connection_number,
                    permit,
                    context.clone(),
                    shutdown.clone(),
                ));
            }
            Err(error) => {
                warn!(%error, "accepting a local connection failed; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(ACCEPT_RETRY_DELAY) => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_in_use_says_to_choose_another_local_port() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let taken = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let address = taken.local_addr().unwrap();
            let message = bind(address).await.unwrap_err();
            assert!(
                message.starts_with(&format!("port {} is in use", address.port())),
                "{message}"
            );
            assert!(message.contains("choose another LOCAL_PORT"), "{message}");
        });
    }
}
