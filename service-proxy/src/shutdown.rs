//! Turns SIGINT and SIGTERM into one cancellation.
//!
//! The handlers are installed before the proxy starts working, so a signal
//! that arrives early still means "stop cleanly" rather than the default
//! abrupt exit. Everything else listens to one `CancellationToken`, the only
//! shutdown mechanism in the program.

use std::io;

/// The process's termination signals, installed and ready to be awaited.
pub struct Signals {
    #[cfg(unix)]
    interrupt: tokio::signal::unix::Signal,
    #[cfg(unix)]
    terminate: tokio::signal::unix::Signal,
}

impl Signals {
    /// Installs the handlers; must run inside a Tokio runtime.
    pub fn install() -> io::Result<Self> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Ok(Self {
                interrupt: signal(SignalKind::interrupt())?,
                terminate: signal(SignalKind::terminate())?,
            })
        }
        #[cfg(not(unix))]
        {
            Ok(Self {})
        }
    }

    /// Completes when SIGINT or SIGTERM arrives.
    pub async fn received(&mut self) {
        #[cfg(unix)]
        {
            tokio::select! {
                _ = self.interrupt.recv() => {}
                _ = self.terminate.recv() => {}
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
