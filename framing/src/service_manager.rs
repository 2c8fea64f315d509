//! Telling the service manager (systemd, `Type=notify`) how the program is
//! doing: READY=1 once it serves, STATUS= lines for `systemctl status`,
//! STOPPING=1 when it begins to shut down, and WATCHDOG=1 keep-alives while
//! it runs.
//!
//! The notification socket is a unix datagram socket named by
//! `NOTIFY_SOCKET`; the `sd-notify` crate does the sending. Without that
//! variable (a program started by hand, by a test, by ssh) every call here
//! does nothing, so the programs call these unconditionally.
//!
//! The watchdog keep-alive runs on the program's own runtime: a runtime
//! whose timers no longer fire (a blocked worker, a deadlock) stops sending
//! it, and systemd restarts the service after `WatchdogSec=`. It is sent at
//! half the interval systemd asks for (`WATCHDOG_USEC`, addressed to this
//! process by `WATCHDOG_PID`), as sd_watchdog_enabled(3) advises.
//!
//! A failed notification is logged and otherwise ignored: the service
//! manager's bookkeeping is never a reason to stop serving.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sd_notify::NotifyState;

/// The shortest keep-alive period honoured, so a nonsensical
/// `WATCHDOG_USEC=1` cannot turn the watchdog into a busy loop.
pub const MIN_WATCHDOG_PERIOD: Duration = Duration::from_millis(10);

/// Tells the service manager the program now serves (READY=1), with a
/// one-line status for `systemctl status`.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(&one_line(status))]);
}

/// Replaces the one-line status shown by `systemctl status`.
pub fn status(status: &str) {
    send(&[NotifyState::Status(&one_line(status))]);
}

/// Tells the service manager a clean shutdown has begun (STOPPING=1).
pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("shutting down")]);
}

/// How often to send WATCHDOG=1: half of `WATCHDOG_USEC` when the service
/// manager asked this process for keep-alives, else `None`.
pub fn watchdog_period() -> Option<Duration> {
    let interval = sd_notify::watchdog_enabled()?;
    if interval.is_zero() {
        return None;
    }
    Some((interval / 2).max(MIN_WATCHDOG_PERIOD))
}

/// The task that sends WATCHDOG=1 while the program runs; it ends when this
/// value is dropped, so the keep-alives stop with the work they vouch for.
pub struct Watchdog {
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Watchdog {
    /// Starts the keep-alives if the service manager asked for them (a
    /// no-op otherwise). Must run inside a Tokio runtime.
    pub fn start() -> Watchdog {
        let task = watchdog_period().map(|period| {
            tracing::debug!(?period, "sending systemd watchdog keep-alives");
            tokio::spawn(async move {
                let mut ticks = tokio::time::interval(period);
                ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    ticks.tick().await;
                    send(&[NotifyState::Watchdog]);
                }
            })
        });
        Watchdog { task }
    }

    /// Whether keep-alives are being sent.
    pub fn is_running(&self) -> bool {
        self.task.is_some()
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Sends `states`; the first failure is a warning (a wrong NOTIFY_SOCKET is
/// worth knowing about), later ones only debug lines, so a broken socket
/// cannot flood the log at the watchdog's pace.
fn send(states: &[NotifyState<'_>]) {
    static WARNED: AtomicBool = AtomicBool::new(false);
    if let Err(error) = sd_notify::notify(states) {
        if WARNED.swap(true, Ordering::Relaxed) {
            tracing::debug!("cannot notify the service manager: {error}");
        } else {
            tracing::warn!("cannot notify the service manager (NOTIFY_SOCKET): {error}");
        }
    }
}

/// A status is one line of the protocol's `KEY=VALUE` lines: a newline in
/// it would start a new, unintended assignment.
fn one_line(text: &str) -> String {
    text.replace(['\n', '\r'], " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_cannot_smuggle_in_another_assignment() {
        assert_eq!(one_line("up\nREADY=1"), "up READY=1");
        assert_eq!(
            one_line("listening on 127.0.0.1:8443"),
            "listening on 127.0.0.1:8443"
        );
    }
}
