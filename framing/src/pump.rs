//! The proxies' data plane: moving bytes between a TCP socket and a stream
//! WebSocket, and the close codes every devstreams program agrees on. (The
//! relay's WebSocket-to-WebSocket copy is the relay's own, in `relay::copy`.)
//!
//! Both directions run concurrently and independently: a direction that waits
//! for its writer (backpressure) never stops the other direction from being
//! read, which is what keeps a stream with bulk traffic both ways from
//! deadlocking. Every buffer is bounded: at most one read chunk per direction
//! is in our hands, and the WebSocket layer's own buffers are capped by
//! [`crate::websocket::config`].
//!
//! Termination follows TCP. A clean close on one end (WebSocket Close 1000)
//! is a clean close on the other; anything else (a reset, a vanished peer) is
//! an abortive close (RST) on the other end, so a client sees an error rather
//! than a truncated "success". A half-close (FIN one way, data still flowing
//! the other) travels as an empty binary message, sent only when both ends
//! agreed to it in the stream request.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// Normal closure: the stream ended cleanly.
pub const CLOSE_NORMAL: u16 = 1000;
/// The relay is shutting down.
pub const CLOSE_GOING_AWAY: u16 = 1001;
/// The relay lost the other side of the stream without a Close.
pub const CLOSE_PEER_LOST: u16 = 1011;
/// A message was larger than the receiver accepts.
pub const CLOSE_MESSAGE_TOO_BIG: u16 = 1009;
/// devstreams: the sender's TCP connection was reset or failed.
pub const CLOSE_TCP_RESET: u16 = 4000;
/// devstreams: the stream was not paired before the handshake deadline.
pub const CLOSE_HANDSHAKE_TIMEOUT: u16 = 4008;

/// Bytes read from TCP per WebSocket message.
pub const DEFAULT_READ_CHUNK: usize = 64 * 1024;

/// How long to wait for a final Close frame to be written.
const CLOSE_WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// Builds a Close frame.
pub fn close_frame(code: u16, reason: &str) -> CloseFrame {
    CloseFrame {
        code: CloseCode::from(code),
        reason: reason.to_string().into(),
    }
}

/// Builds a Close message.
pub fn close_message(code: u16, reason: &str) -> Message {
    Message::Close(Some(close_frame(code, reason)))
}

/// How often a side pings its peer by default: well under the 60 s idle
/// timeouts of common corporate proxies and load balancers.
pub const DEFAULT_PING_INTERVAL: Duration = Duration::from_secs(20);

/// A peer that sends nothing (not even a pong) for this many ping intervals
/// is declared dead.
pub const SILENT_INTERVALS: u32 = 3;

#[derive(Debug, Clone, Copy)]
pub struct PumpOptions {
    /// Both ends agreed to carry half-closes as empty binary messages.
    pub half_close: bool,
    /// Bytes read from TCP per message.
    pub read_chunk: usize,
    /// Ping the relay this often; `None` turns dead-peer detection off.
    pub ping_interval: Option<Duration>,
}

impl Default for PumpOptions {
    fn default() -> Self {
        Self {
            half_close: false,
            read_chunk: DEFAULT_READ_CHUNK,
            ping_interval: Some(DEFAULT_PING_INTERVAL),
        }
    }
}

/// How a stream ended, from one proxy's point of view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PumpEnd {
    /// Both directions finished, or one end closed cleanly.
    Completed,
    /// The remote end closed the stream with this (non-normal) code.
    RemoteClosed { code: u16, reason: String },
    /// The WebSocket broke without a Close.
    StreamLost(String),
    /// The local TCP connection failed or was reset.
    LocalFailed(String),
}

/// Byte counts and outcome of one proxied stream.
#[derive(Debug, Clone)]
pub struct PumpReport {
    pub bytes_to_stream: u64,
    pub bytes_to_tcp: u64,
    pub end: PumpEnd,
}

enum UpstreamEnd {
    /// TCP FIN seen and passed on as a half-close.
    HalfClosed,
    /// TCP FIN seen, no half-close agreed: the stream ends.
    Eof,
    TcpFailed(io::Error),
    StreamFailed(String),
}

enum DownstreamEnd {
    /// The remote half-closed; our TCP write side is shut down.
    HalfClosed,
    RemoteClosed {
        code: u16,
        reason: String,
    },
    StreamLost(String),
    TcpFailed(io::Error),
}

/// Shared by the two halves of one proxied stream. Both halves run in one
/// task, so relaxed atomics suffice; they are atomics only because the
/// stream's future must be `Send`.
struct Liveness {
    started: Instant,
    last_received_nanos: AtomicU64,
    upstream_half_closed: AtomicBool,
    downstream_finished: AtomicBool,
}

impl Liveness {
    fn new() -> Self {
        Self {
            started: Instant::now(),
            last_received_nanos: AtomicU64::new(0),
            upstream_half_closed: AtomicBool::new(false),
            downstream_finished: AtomicBool::new(false),
        }
    }

    fn received(&self) {
        let nanos = self.started.elapsed().as_nanos() as u64;
        self.last_received_nanos.store(nanos, Ordering::Relaxed);
    }

    fn last_received(&self) -> Instant {
        self.started + Duration::from_nanos(self.last_received_nanos.load(Ordering::Relaxed))
    }

    fn set(flag: &AtomicBool) {
        flag.store(true, Ordering::Relaxed);
    }

    fn get(flag: &AtomicBool) -> bool {
        flag.load(Ordering::Relaxed)
    }
}

/// Moves bytes between `tcp` and `websocket` until the stream ends.
pub async fn pump_tcp<S>(
    tcp: TcpStream,
    websocket: WebSocketStream<S>,
    options: PumpOptions,
) -> PumpReport
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    crate::transport::configure_socket(&tcp);
    let (mut tcp_reader, mut tcp_writer) = tcp.into_split();
    let (mut sink, mut stream) = websocket.split();
    let mut bytes_to_stream = 0u64;
    let mut bytes_to_tcp = 0u64;
    let liveness = Liveness::new();
    enum Outcome {
        BothHalfClosed,
        Up(UpstreamEnd),
        Down(DownstreamEnd),
    }
    let outcome = {
        let upstream = upstream(
            &mut tcp_reader,
            &mut sink,
            options,
            &mut bytes_to_stream,
            &liveness,
        );
        let downstream = downstream(
            &mut stream,
            &mut tcp_writer,
            options,
            &mut bytes_to_tcp,
            &liveness,
        );
        tokio::pin!(upstream, downstream);
        let (mut up_finished, mut down_finished) = (false, false);
        let silence_limit = options
            .ping_interval
            .map(|interval| interval * SILENT_INTERVALS);
        loop {
            let silence_deadline = silence_limit.map(|limit| liveness.last_received() + limit);
            tokio::select! {
                end = &mut upstream, if !up_finished => match end {
                    UpstreamEnd::HalfClosed if down_finished => break Outcome::BothHalfClosed,
                    UpstreamEnd::HalfClosed => up_finished = true,
                    other => break Outcome::Up(other),
                },
                end = &mut downstream, if !down_finished => match end {
                    DownstreamEnd::HalfClosed if up_finished || Liveness::get(&liveness.upstream_half_closed) => {
                        break Outcome::BothHalfClosed
                    }
                    DownstreamEnd::HalfClosed => {
                        down_finished = true;
                        Liveness::set(&liveness.downstream_finished);
                    }
                    other => break Outcome::Down(other),
                },
                _ = sleep_until_optional(silence_deadline) => {
                    // The deadline above was computed when this loop last
                    // turned; anything received since (data, a pong, the
                    // relay's ping) moves it. Only a deadline that still
                    // holds now means the relay went silent.
                    let current = silence_limit.map(|limit| liveness.last_received() + limit);
                    if current.is_some_and(|deadline| Instant::now() >= deadline) {
                        break Outcome::Down(DownstreamEnd::StreamLost(format!(
                            "the relay sent nothing for {:?} ({SILENT_INTERVALS} ping intervals)",
                            silence_limit.unwrap_or_default()
                        )));
                    }
                }
            }
        }
    };
    let abort_tcp = |reader: OwnedReadHalf, writer: OwnedWriteHalf| {
        // Dropping a write half sends FIN; reunite first so the socket is
        // reset instead, and the local client sees an error.
        if let Ok(tcp) = reader.reunite(writer) {
            let _ = tcp.set_zero_linger();
        }
    };
    let end = match outcome {
        Outcome::BothHalfClosed | Outcome::Up(UpstreamEnd::Eof) => {
            send_close(&mut sink, close_message(CLOSE_NORMAL, "")).await;
            PumpEnd::Completed
        }
        Outcome::Up(UpstreamEnd::HalfClosed) | Outcome::Down(DownstreamEnd::HalfClosed) => {
            unreachable!("a lone half-close keeps the loop running")
        }
        Outcome::Up(UpstreamEnd::TcpFailed(error))
        | Outcome::Down(DownstreamEnd::TcpFailed(error)) => {
            send_close(
                &mut sink,
                close_message(
                    CLOSE_TCP_RESET,
                    "the TCP connection on the other end failed",
                ),
            )
            .await;
            abort_tcp(tcp_reader, tcp_writer);
            PumpEnd::LocalFailed(error.to_string())
        }
        Outcome::Up(UpstreamEnd::StreamFailed(reason))
        | Outcome::Down(DownstreamEnd::StreamLost(reason)) => {
            abort_tcp(tcp_reader, tcp_writer);
            PumpEnd::StreamLost(reason)
        }
        Outcome::Down(DownstreamEnd::RemoteClosed { code, reason }) => {
            if code == CLOSE_NORMAL {
                let _ = tcp_writer.shutdown().await;
                PumpEnd::Completed
            } else {
                abort_tcp(tcp_reader, tcp_writer);
                PumpEnd::RemoteClosed { code, reason }
            }
        }
    };
    PumpReport {
        bytes_to_stream,
        bytes_to_tcp,
        end,
    }
}

async fn send_close<S>(sink: &mut SplitSink<WebSocketStream<S>, Message>, message: Message)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let _ = tokio::time::timeout(CLOSE_WRITE_TIMEOUT, sink.send(message)).await;
}

/// Sleeps until `deadline`, or forever when there is none.
async fn sleep_until_optional(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(tokio::time::Instant::from_std(deadline)).await,
        None => std::future::pending().await,
    }
}

async fn upstream<S>(
    reader: &mut OwnedReadHalf,
    sink: &mut SplitSink<WebSocketStream<S>, Message>,
    options: PumpOptions,
    bytes: &mut u64,
    liveness: &Liveness,
) -> UpstreamEnd
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut next_ping = options
        .ping_interval
        .map(|interval| Instant::now() + interval);
    let mut finished_sending = false;
    loop {
        if finished_sending && (next_ping.is_none() || Liveness::get(&liveness.downstream_finished))
        {
            return UpstreamEnd::HalfClosed;
        }
        tokio::select! {
            // Wait for data before taking a buffer, so an idle stream holds none.
            readable = reader.readable(), if !finished_sending => {
                if let Err(error) = readable {
                    return UpstreamEnd::TcpFailed(error);
                }
                let mut buffer = BytesMut::with_capacity(options.read_chunk);
                match reader.try_read_buf(&mut buffer) {
                    Ok(0) if options.half_close => {
                        if let Err(error) = sink.send(Message::Binary(bytes::Bytes::new())).await {
                            return UpstreamEnd::StreamFailed(error.to_string());
                        }
                        finished_sending = true;
                        Liveness::set(&liveness.upstream_half_closed);
                    }
                    Ok(0) => return UpstreamEnd::Eof,
                    Ok(count) => {
                        *bytes += count as u64;
                        if let Err(error) = sink.send(Message::Binary(buffer.freeze())).await {
                            return UpstreamEnd::StreamFailed(error.to_string());
                        }
                    }
                    Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
                    Err(error) => return UpstreamEnd::TcpFailed(error),
                }
            }
            _ = sleep_until_optional(next_ping) => {
                if let Err(error) = sink.send(Message::Ping(bytes::Bytes::new())).await {
                    return UpstreamEnd::StreamFailed(error.to_string());
                }
                next_ping = options.ping_interval.map(|interval| Instant::now() + interval);
            }
        }
    }
}

async fn downstream<S>(
    stream: &mut SplitStream<WebSocketStream<S>>,
    writer: &mut OwnedWriteHalf,
    options: PumpOptions,
    bytes: &mut u64,
    liveness: &Liveness,
) -> DownstreamEnd
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    loop {
        let next = stream.next().await;
        liveness.received();
        let data = match next {
            None => {
                return DownstreamEnd::StreamLost(
                    "the relay connection ended without a Close".into(),
                )
            }
            Some(Err(error)) => return DownstreamEnd::StreamLost(error.to_string()),
            Some(Ok(Message::Close(frame))) => {
                let (code, reason) = frame
                    .map(|f| (u16::from(f.code), f.reason.to_string()))
                    .unwrap_or((CLOSE_NORMAL, String::new()));
                return DownstreamEnd::RemoteClosed { code, reason };
            }
            Some(Ok(Message::Binary(data))) => data,
            Some(Ok(Message::Text(text))) => bytes::Bytes::from(text),
            Some(Ok(_)) => continue,
        };
        if data.is_empty() {
            if options.half_close {
                return match writer.shutdown().await {
                    Ok(()) => DownstreamEnd::HalfClosed,
                    Err(error) => DownstreamEnd::TcpFailed(error),
                };
            }
            continue;
        }
        if let Err(error) = writer.write_all(&data).await {
            return DownstreamEnd::TcpFailed(error);
        }
        *bytes += data.len() as u64;
    }
}
