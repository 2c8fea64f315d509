//! Program plumbing every devstreams binary shares: operator logs (text or
//! JSON lines) and the
//! termination signals. The library holds no state here; each program's
//! `main` calls these once.
//!
//! Logs are `tracing` events on stderr, filtered by `RUST_LOG`, so stdout
//! stays free for the lines scripts read. SIGINT and SIGTERM become one
//! awaitable event, installed before work starts, so an early signal still
//! means "stop cleanly" rather than the default abrupt exit.

use std::io::{self, IsTerminal};

use tracing_subscriber::EnvFilter;

/// How log lines are written (`--log-format`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One line for a person to read.
    #[default]
    Text,
    /// One JSON object per line, for log collectors: `timestamp`, `level`,
    /// `target` (the module), `fields` (the message and the event's fields
    /// as keys) and `span` (the current span's fields). Fields stay in their
    /// own object because some are named like the metadata (`target`).
    Json,
}

/// Installs the global log subscriber in text format; `default_filter`
/// applies when `RUST_LOG` is unset or invalid. A second call does nothing.
pub fn init_logging(default_filter: &str) {
    init_logging_as(default_filter, LogFormat::Text);
}

/// [`init_logging`] in the given format.
pub fn init_logging_as(default_filter: &str, format: LogFormat) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(io::stderr);
    let _ = match format {
        LogFormat::Text => builder.with_ansi(io::stderr().is_terminal()).try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(false)
            .with_current_span(true)
            .with_span_list(false)
            .with_ansi(false)
            .try_init(),
    };
}

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

/// Runs `work` until it ends by itself, or until SIGINT/SIGTERM, which
/// cancels the token `work` was built with and then waits for `work` to
/// wind down. The usual shape of a program's main loop.
pub async fn run_until_signal<F, T>(
    build: impl FnOnce(tokio_util::sync::CancellationToken) -> F,
) -> io::Result<T>
where
    F: std::future::Future<Output = T>,
{
    let mut signals = Signals::install()?;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let work = build(shutdown.clone());
    tokio::pin!(work);
    tokio::select! {
        result = &mut work => return Ok(result),
        _ = signals.received() => {
            tracing::info!("signal received; shutting down");
            shutdown.cancel();
        }
    }
    Ok(work.await)
}
