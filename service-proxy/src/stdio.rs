//! `--stdio`: one stream carried on standard input and output, so OpenSSH
//! reaches any device by name without a listening port
//! (`ProxyCommand service-proxy --stdio %n`).
//!
//! Standard output *is* the ssh byte stream here, so nothing else may ever
//! reach it: the process keeps its own copy of the descriptor for the stream
//! and points descriptor 1 at /dev/null, so a stray print cannot corrupt the
//! stream, and closing that copy is an end of stream the reader really sees
//! (the device's half-close reaches ssh as EOF). Logs go to stderr, and
//! every failure becomes one `service-proxy: error: …` line there and a
//! non-zero exit, never a hang: each step before the stream (relay, device,
//! WebSocket) has its own deadline. On a failure stdout stays open until
//! the process exits: ssh ends (and kills its ProxyCommand) as soon as it
//! sees EOF, and the line that says why must be out by then. And as ssh
//! exits it closes our input and output and sends SIGHUP at once: a hangup
//! here gives the stream a few seconds to end cleanly (our end of input
//! reaches the device), so the device does not keep a dead session open,
//! waiting for a resume that will never come.
//!
//! Pipes (what ssh gives a ProxyCommand) are read and written without
//! blocking a thread; anything else (a file, a terminal) goes through
//! Tokio's blocking file I/O.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::AsyncWrite;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::connection::{self, ConnectionContext};

/// How long the stream may take to end after a hangup (ssh exited).
const HANGUP_GRACE: Duration = Duration::from_secs(5);

/// Carries standard input and output through one stream to the device.
/// `Ok` when the stream ended cleanly (the device closed it, or both sides
/// finished); `Err` is the one line that says why not.
pub async fn run(context: ConnectionContext, shutdown: CancellationToken) -> anyhow::Result<()> {
    let mut hangup = Hangup::install();
    let local = standard_streams()
        .map_err(|error| anyhow::anyhow!("cannot carry standard input and output: {error}"))?;
    let span = tracing::info_span!(
        "stream",
        device_id = %context.device_id,
        stdio = true,
        stream_name = %context.stream_name,
        stream_id = tracing::field::Empty,
        session_id = tracing::field::Empty,
    );
    let carrying = connection::carry(local, &context).instrument(span);
    tokio::pin!(carrying);
    tokio::select! {
        _ = shutdown.cancelled() => anyhow::bail!(
            "stopped by a signal before the stream to {} ended",
            context.device_id
        ),
        carried = &mut carrying => carried.map_err(anyhow::Error::msg),
        () = hangup.received() => {
            // Nobody reads an error line or an exit code any more.
            let _ = tokio::time::timeout(HANGUP_GRACE, &mut carrying).await;
            Ok(())
        }
    }
}

/// SIGHUP, caught rather than fatal; never arrives where it cannot be
/// installed (or does not exist).
struct Hangup {
    #[cfg(unix)]
    signal: Option<tokio::signal::unix::Signal>,
}

impl Hangup {
    fn install() -> Self {
        Self {
            #[cfg(unix)]
            signal: tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok(),
        }
    }

    async fn received(&mut self) {
        #[cfg(unix)]
        if let Some(signal) = self.signal.as_mut() {
            signal.recv().await;
            return;
        }
        std::future::pending::<()>().await
    }
}

/// The device id in an ssh host name: `kiosk-17.devices` with the suffix
/// `.devices` is `kiosk-17`. The suffix is matched without regard to case,
/// because ssh lowercases `%h`; a name without it is taken as it is.
pub fn device_from_host<'a>(host: &'a str, suffix: Option<&str>) -> &'a str {
    let Some(suffix) = suffix.filter(|suffix| !suffix.is_empty()) else {
        return host;
    };
    let Some(cut) = host.len().checked_sub(suffix.len()) else {
        return host;
    };
    match host.get(cut..) {
        Some(end) if cut > 0 && end.eq_ignore_ascii_case(suffix) => &host[..cut],
        _ => host,
    }
}

#[cfg(unix)]
type Input = tokio_util::either::Either<tokio::net::unix::pipe::Receiver, tokio::fs::File>;
#[cfg(unix)]
type Output = tokio_util::either::Either<tokio::net::unix::pipe::Sender, tokio::fs::File>;

/// Standard input and output as the stream's local connection; afterwards
/// descriptor 1 is /dev/null (see the module comment).
#[cfg(unix)]
fn standard_streams() -> io::Result<tokio::io::Join<Input, ClosingWriter<Output>>> {
    use std::os::fd::AsFd;
    use std::os::unix::fs::FileTypeExt;
    use tokio::net::unix::pipe;
    use tokio_util::either::Either;

    let input = std::fs::File::from(std::io::stdin().as_fd().try_clone_to_owned()?);
    let output = std::fs::File::from(std::io::stdout().as_fd().try_clone_to_owned()?);
    let null = std::fs::OpenOptions::new().write(true).open("/dev/null")?;
    rustix::stdio::dup2_stdout(&null)?;
    let input = if input.metadata()?.file_type().is_fifo() {
        Either::Left(pipe::Receiver::from_file(input)?)
    } else {
        Either::Right(tokio::fs::File::from_std(input))
    };
    let keeper = output.try_clone()?.into();
    let output = if output.metadata()?.file_type().is_fifo() {
        Either::Left(pipe::Sender::from_file(output)?)
    } else {
        Either::Right(tokio::fs::File::from_std(output))
    };
    Ok(tokio::io::join(input, ClosingWriter::new(output, keeper)))
}

#[cfg(not(unix))]
fn standard_streams(
) -> io::Result<tokio::io::Join<tokio::io::Stdin, ClosingWriter<tokio::io::Stdout>>> {
    Ok(tokio::io::join(
        tokio::io::stdin(),
        ClosingWriter::new(tokio::io::stdout()),
    ))
}

/// A writer whose shutdown really closes it: flushed, then dropped, so a
/// half-close from the device is an EOF for the process reading our output.
/// Writing after that is a broken pipe. Dropped without a shutdown (the
/// stream failed), it leaves the output open until the process exits, so
/// the error line comes out before the reader sees the end.
pub struct ClosingWriter<W> {
    inner: Option<W>,
    /// Another descriptor of the same output, closed only by a shutdown.
    #[cfg(unix)]
    keeper: Option<std::os::fd::OwnedFd>,
}

impl<W> ClosingWriter<W> {
    #[cfg(unix)]
    fn new(inner: W, keeper: std::os::fd::OwnedFd) -> Self {
        Self {
            inner: Some(inner),
            keeper: Some(keeper),
        }
    }

    #[cfg(not(unix))]
    fn new(inner: W) -> Self {
        Self { inner: Some(inner) }
    }
}

impl<W> Drop for ClosingWriter<W> {
    fn drop(&mut self) {
        // Open until exit; the process ends right after a failed stream.
        #[cfg(unix)]
        std::mem::forget(self.keeper.take());
    }
}

impl<W: AsyncWrite + Unpin> ClosingWriter<W> {
    fn inner(&mut self) -> io::Result<&mut W> {
        self.inner.as_mut().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::BrokenPipe,
                "standard output is already closed",
            )
        })
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for ClosingWriter<W> {
    fn poll_write(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut().inner() {
            Ok(inner) => Pin::new(inner).poll_write(context, data),
            Err(error) => Poll::Ready(Err(error)),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut().inner.as_mut() {
            Some(inner) => Pin::new(inner).poll_flush(context),
            None => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        let result = std::task::ready!(Pin::new(inner).poll_shutdown(context));
        this.inner = None;
        #[cfg(unix)]
        {
            this.keeper = None;
        }
        Poll::Ready(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn the_suffix_is_cut_from_the_host_name_whatever_its_case() {
        assert_eq!(
            device_from_host("kiosk-17.devices", Some(".devices")),
            "kiosk-17"
        );
        assert_eq!(
            device_from_host("Kiosk-17.DEVICES", Some(".devices")),
            "Kiosk-17"
        );
        assert_eq!(device_from_host("kiosk-17", Some(".devices")), "kiosk-17");
        assert_eq!(device_from_host(".devices", Some(".devices")), ".devices");
        assert_eq!(device_from_host("s", Some(".devices")), "s");
        assert_eq!(
            device_from_host("kiosk-17.devices", None),
            "kiosk-17.devices"
        );
        assert_eq!(
            device_from_host("kiosk-17.devices", Some("")),
            "kiosk-17.devices"
        );
        // Multi-byte characters never split a character.
        assert_eq!(device_from_host("añb", Some("b")), "añ");
        assert_eq!(device_from_host("añ", Some("x")), "añ");
    }

    #[tokio::test]
    async fn shutting_down_closes_the_writer_so_the_reader_sees_the_end() {
        let (writer, mut reader) = tokio::io::duplex(64);
        let keeper = std::fs::File::open("/dev/null").unwrap().into();
        let mut closing = ClosingWriter::new(writer, keeper);
        closing.write_all(b"last").await.unwrap();
        closing.shutdown().await.unwrap();
        let mut received = Vec::new();
        reader.read_to_end(&mut received).await.unwrap();
        assert_eq!(received, b"last");
        let error = closing.write_all(b"more").await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::BrokenPipe);
    }
}
