//! The proxies' data plane: moving bytes between a TCP socket (or another
//! [`LocalConnection`], such as standard input and output) and a stream
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
use std::time::Duration;

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::local::{LocalConnection, LocalReader};

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
/// devstreams: "move: resume elsewhere". A draining relay closes streams
/// that carry resumable sessions with it; the proxies resume at once.
pub const CLOSE_MOVE: u16 = 4012;
/// devstreams: the stream was not paired before the handshake deadline.
pub const CLOSE_HANDSHAKE_TIMEOUT: u16 = 4008;

/// Bytes read from TCP per WebSocket message: 64 KiB less the 8-byte header
/// of a masked client frame of that size, so a whole frame is 64 KiB.
///
/// rustls takes at most 64 KiB of plaintext per write (its default buffer
/// limit). A 64 KiB payload made a 65,550-byte frame: four full TLS records
/// in one `writev`, then a second `writev` of one record carrying the last
/// 14 bytes, and the reader decrypting a fifth record, for every message of
/// a bulk transfer. The relay's unmasked frame of this payload is 65,532
/// bytes and fits too.
pub const DEFAULT_READ_CHUNK: usize = 64 * 1024 - CLIENT_FRAME_HEADER;

/// Header of a masked (client) WebSocket frame whose payload is 126 to
/// 65,535 bytes: opcode byte, length byte, 16-bit length, 4-byte mask.
const CLIENT_FRAME_HEADER: usize = 2 + 2 + 4;

/// How long to wait for a final Close frame to be written.
pub(crate) const CLOSE_WRITE_TIMEOUT: Duration = Duration::from_secs(5);

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

/// The longest ping interval a program accepts: an hour is far past any
/// proxy's idle timeout, and bounding it keeps `interval * SILENT_INTERVALS`
/// and `now + interval` from overflowing.
pub const MAX_PING_INTERVAL: Duration = Duration::from_secs(3600);

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
    /// Both directions are finished: the remote half-closed (our TCP write
    /// side is shut down) after our own half-close went out.
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
    pump(tcp, websocket, options).await
}

/// Moves bytes between `local` and `websocket` until the stream ends.
pub async fn pump<L, S>(local: L, websocket: WebSocketStream<S>, options: PumpOptions) -> PumpReport
where
    L: LocalConnection,
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let (mut tcp_reader, mut tcp_writer) = local.into_halves();
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
        let mut up_finished = false;
        let silence_limit = options
            .ping_interval
            .map(|interval| interval * SILENT_INTERVALS);
        loop {
            let silence_deadline = silence_limit.map(|limit| liveness.last_received() + limit);
            tokio::select! {
                end = &mut upstream, if !up_finished => match end {
                    UpstreamEnd::HalfClosed if Liveness::get(&liveness.downstream_finished) => {
                        break Outcome::BothHalfClosed
                    }
                    UpstreamEnd::HalfClosed => up_finished = true,
                    other => break Outcome::Up(other),
                },
                // Polled even after the relay's half-close: its Close (the
                // operator left) or a ping may still come, and a side that
                // stopped reading would pour data into a stream nobody
                // reads until the relay gives up on it.
                end = &mut downstream => match end {
                    DownstreamEnd::HalfClosed => break Outcome::BothHalfClosed,
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
    let end = match outcome {
        Outcome::BothHalfClosed | Outcome::Up(UpstreamEnd::Eof) => {
            close_handshake(&mut sink, &mut stream, close_message(CLOSE_NORMAL, "")).await;
            PumpEnd::Completed
        }
        Outcome::Up(UpstreamEnd::HalfClosed) | Outcome::Down(DownstreamEnd::HalfClosed) => {
            unreachable!("a lone half-close keeps the loop running")
        }
        Outcome::Up(UpstreamEnd::TcpFailed(error))
        | Outcome::Down(DownstreamEnd::TcpFailed(error)) => {
            // The local side hears of it first; the relay's answer may take
            // a moment.
            L::abort(tcp_reader, tcp_writer);
            close_handshake(
                &mut sink,
                &mut stream,
                close_message(
                    CLOSE_TCP_RESET,
                    "the TCP connection on the other end failed",
                ),
            )
            .await;
            PumpEnd::LocalFailed(error.to_string())
        }
        Outcome::Up(UpstreamEnd::StreamFailed(reason))
        | Outcome::Down(DownstreamEnd::StreamLost(reason)) => {
            L::abort(tcp_reader, tcp_writer);
            PumpEnd::StreamLost(reason)
        }
        Outcome::Down(DownstreamEnd::RemoteClosed { code, reason }) => {
            if code == CLOSE_NORMAL {
                let _ = tcp_writer.shutdown().await;
                PumpEnd::Completed
            } else {
                L::abort(tcp_reader, tcp_writer);
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

/// Sends our Close and waits, within [`CLOSE_WRITE_TIMEOUT`], for the
/// relay's answer, discarding what it sent before it saw ours (RFC 6455
/// §1.4).
///
/// Dropping the connection right after the Close is not enough: while the
/// relay still sends (a download whose client left), our socket holds
/// unread bytes, and closing such a socket makes the kernel send a reset,
/// which also discards whatever the relay had not read yet, our Close among
/// it. The relay then saw a vanished side (1011) instead of our code, and a
/// resumable session on the device kept its target open, waiting to resume.
pub(crate) async fn close_handshake<S>(
    sink: &mut SplitSink<WebSocketStream<S>, Message>,
    stream: &mut SplitStream<WebSocketStream<S>>,
    message: Message,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let handshake = async {
        if sink.send(message).await.is_err() {
            return;
        }
        while let Some(Ok(message)) = stream.next().await {
            if message.is_close() {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(CLOSE_WRITE_TIMEOUT, handshake).await;
}

/// Sleeps until `deadline`, or forever when there is none.
async fn sleep_until_optional(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Reads the local connection into the WebSocket, and pings the relay when
/// it has sent nothing for a ping interval (a socket that receives needs no
/// ping to prove it lives, and idle pings are what idle streams cost).
async fn upstream<R, S>(
    reader: &mut R,
    sink: &mut SplitSink<WebSocketStream<S>, Message>,
    options: PumpOptions,
    bytes: &mut u64,
    liveness: &Liveness,
) -> UpstreamEnd
where
    R: LocalReader,
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut last_ping = Instant::now();
    // Due an interval after the later of the last message received and
    // the last ping sent.
    let ping_due = |last_ping: Instant| {
        options
            .ping_interval
            .map(|interval| liveness.last_received().max(last_ping) + interval)
    };
    let mut finished_sending = false;
    // The memory of the last chunk sent, kept for the next read only while
    // reads fill their buffers (bulk data): an idle stream holds none.
    let mut spare: Option<bytes::BytesMut> = None;
    loop {
        if finished_sending
            && (options.ping_interval.is_none() || Liveness::get(&liveness.downstream_finished))
        {
            return UpstreamEnd::HalfClosed;
        }
        let take_buffer = |size: usize| match spare.take() {
            Some(mut buffer) => {
                // Moves the empty view back to the start of its memory;
                // allocates only when it is too small.
                buffer.reserve(size);
                buffer
            }
            None => bytes::BytesMut::with_capacity(size),
        };
        tokio::select! {
            // TCP waits for data before taking a buffer, so an idle stream holds none.
            chunk = reader.read_chunk(options.read_chunk, take_buffer), if !finished_sending => {
                match chunk {
                    Ok(chunk) if chunk.is_empty() && options.half_close => {
                        if let Err(error) = sink.send(Message::Binary(bytes::Bytes::new())).await {
                            return UpstreamEnd::StreamFailed(error.to_string());
                        }
                        finished_sending = true;
                        Liveness::set(&liveness.upstream_half_closed);
                    }
                    Ok(chunk) if chunk.is_empty() => return UpstreamEnd::Eof,
                    Ok(chunk) => {
                        *bytes += chunk.len() as u64;
                        let keep = (chunk.len() >= options.read_chunk).then(|| chunk.clone());
                        if let Err(error) = sink.send(Message::Binary(chunk)).await {
                            return UpstreamEnd::StreamFailed(error.to_string());
                        }
                        // The WebSocket layer copied the frame out, so the
                        // memory is ours again unless it still holds it.
                        spare = keep.and_then(|sent| sent.try_into_mut().ok()).map(|mut buffer| {
                            buffer.clear();
                            buffer
                        });
                    }
                    Err(error) => return UpstreamEnd::TcpFailed(error),
                }
            }
            _ = sleep_until_optional(ping_due(last_ping)) => {
                // The deadline was computed when this loop last turned;
                // anything received since moves it.
                if ping_due(last_ping).is_some_and(|due| Instant::now() >= due) {
                    if let Err(error) = sink.send(Message::Ping(bytes::Bytes::new())).await {
                        return UpstreamEnd::StreamFailed(error.to_string());
                    }
                    last_ping = Instant::now();
                }
            }
        }
    }
}

async fn downstream<W, S>(
    stream: &mut SplitStream<WebSocketStream<S>>,
    writer: &mut W,
    options: PumpOptions,
    bytes: &mut u64,
    liveness: &Liveness,
) -> DownstreamEnd
where
    W: AsyncWrite + Unpin,
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
        if Liveness::get(&liveness.downstream_finished) {
            return DownstreamEnd::StreamLost(
                "the relay sent data after the end of the stream".into(),
            );
        }
        if data.is_empty() {
            if options.half_close {
                if let Err(error) = writer.shutdown().await {
                    return DownstreamEnd::TcpFailed(error);
                }
                Liveness::set(&liveness.downstream_finished);
                if Liveness::get(&liveness.upstream_half_closed) {
                    return DownstreamEnd::HalfClosed;
                }
            }
            continue;
        }
        if let Err(error) = writer.write_all(&data).await {
            return DownstreamEnd::TcpFailed(error);
        }
        *bytes += data.len() as u64;
    }
}

#[cfg(test)]
mod tests {
    //! The pump against a real loopback TCP connection on one end and a
    //! tungstenite server on an in-memory pipe standing in for the relay on
    //! the other, in paused time: timers fire exactly when due, so ping and
    //! dead-peer deadlines are checked to the millisecond without waiting.

    use super::*;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, DuplexStream};
    use tokio::net::TcpListener;
    use tokio_tungstenite::tungstenite::protocol::Role;

    type Relay = WebSocketStream<DuplexStream>;

    struct Harness {
        /// The local application's end of the TCP connection.
        application: TcpStream,
        /// The relay's end of the stream WebSocket.
        relay: Relay,
        pump: tokio::task::JoinHandle<PumpReport>,
        started: Instant,
    }

    async fn start(options: PumpOptions) -> Harness {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let (application, accepted) = tokio::join!(TcpStream::connect(address), listener.accept());
        let (proxy_end, relay_end) = tokio::io::duplex(256 * 1024);
        let websocket = WebSocketStream::from_raw_socket(proxy_end, Role::Client, None).await;
        let relay = WebSocketStream::from_raw_socket(relay_end, Role::Server, None).await;
        let pump = tokio::spawn(pump_tcp(accepted.unwrap().0, websocket, options));
        Harness {
            application: application.unwrap(),
            relay,
            pump,
            started: Instant::now(),
        }
    }

    fn options(ping_interval: Option<Duration>, half_close: bool) -> PumpOptions {
        PumpOptions {
            half_close,
            ping_interval,
            ..PumpOptions::default()
        }
    }

    /// The relay side's next message that is not a ping or pong.
    async fn next_data_or_close(relay: &mut Relay) -> Option<Message> {
        loop {
            match relay.next().await {
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                Some(Ok(message)) => return Some(message),
                _ => return None,
            }
        }
    }

    fn close_code(message: Option<Message>) -> Option<u16> {
        match message {
            Some(Message::Close(Some(frame))) => Some(u16::from(frame.code)),
            _ => None,
        }
    }

    /// Reads the application's end to its end: Ok(bytes) on FIN, Err on reset.
    async fn read_to_end(application: &mut TcpStream) -> io::Result<Vec<u8>> {
        let mut received = Vec::new();
        application.read_to_end(&mut received).await?;
        Ok(received)
    }

    #[test]
    fn a_full_chunk_makes_a_frame_that_fits_one_tls_write() {
        use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
        use tokio_tungstenite::tungstenite::protocol::frame::Frame;
        let payload = vec![0u8; DEFAULT_READ_CHUNK];
        let mut from_a_proxy = Frame::message(payload.clone(), OpCode::Data(Data::Binary), true);
        from_a_proxy.header_mut().mask = Some([1, 2, 3, 4]);
        assert_eq!(from_a_proxy.len(), 64 * 1024, "a proxy's masked frame");
        let from_the_relay = Frame::message(payload, OpCode::Data(Data::Binary), true);
        assert!(
            from_the_relay.len() <= 64 * 1024,
            "the relay's unmasked frame"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn data_crosses_both_ways() {
        let mut harness = start(options(None, false)).await;
        harness.application.write_all(b"up").await.unwrap();
        let up = next_data_or_close(&mut harness.relay).await;
        assert_eq!(up, Some(Message::Binary(bytes::Bytes::from_static(b"up"))));
        harness
            .relay
            .send(Message::Binary(bytes::Bytes::from_static(b"down")))
            .await
            .unwrap();
        let mut down = [0u8; 4];
        harness.application.read_exact(&mut down).await.unwrap();
        assert_eq!(&down, b"down");
    }

    /// The application resets its connection: the pump resets nothing more
    /// locally, sends Close 4000 and waits for the relay's answer, at most
    /// [`CLOSE_WRITE_TIMEOUT`]; an answered Close ends it at once.
    #[tokio::test(start_paused = true)]
    async fn a_local_failure_waits_for_the_relays_close_answer_within_the_deadline() {
        for relay_answers in [true, false] {
            let mut harness = start(options(None, true)).await;
            harness.application.set_zero_linger().unwrap();
            drop(harness.application);
            if relay_answers {
                // Answered as the relay does: reading the Close queues the
                // echo, closing flushes it.
                let close = next_data_or_close(&mut harness.relay).await;
                assert_eq!(close_code(close), Some(CLOSE_TCP_RESET));
                let _ = SinkExt::close(&mut harness.relay).await;
                let report = harness.pump.await.unwrap();
                assert!(matches!(report.end, PumpEnd::LocalFailed(_)));
                assert!(
                    harness.started.elapsed() < Duration::from_millis(100),
                    "an answered Close ends the stream at once"
                );
            } else {
                // The relay reads nothing: no answer ever comes.
                let report = harness.pump.await.unwrap();
                assert!(matches!(report.end, PumpEnd::LocalFailed(_)));
                let waited = harness.started.elapsed();
                assert!(
                    waited >= CLOSE_WRITE_TIMEOUT
                        && waited < CLOSE_WRITE_TIMEOUT + Duration::from_millis(100),
                    "gave up after {waited:?}"
                );
                let close = next_data_or_close(&mut harness.relay).await;
                assert_eq!(
                    close_code(close),
                    Some(CLOSE_TCP_RESET),
                    "the Close was sent"
                );
            }
        }
    }

    /// After the relay's half-close the pump still reads the stream, so the
    /// relay's Close (the operator left) ends it, and the application's
    /// connection is reset, instead of going unseen while the application
    /// keeps sending.
    #[tokio::test(start_paused = true)]
    async fn a_close_after_the_relays_half_close_is_seen() {
        let mut harness = start(options(None, true)).await;
        harness
            .relay
            .send(Message::Binary(bytes::Bytes::new()))
            .await
            .unwrap();
        let received = read_to_end(&mut harness.application).await;
        assert_eq!(received.unwrap(), b"", "the half-close arrives as a FIN");
        harness
            .application
            .write_all(b"still sending")
            .await
            .unwrap();
        let up = next_data_or_close(&mut harness.relay).await;
        assert_eq!(
            up,
            Some(Message::Binary(bytes::Bytes::from_static(b"still sending")))
        );
        harness
            .relay
            .send(close_message(CLOSE_TCP_RESET, "the operator left"))
            .await
            .unwrap();
        let report = tokio::time::timeout(Duration::from_secs(1), harness.pump)
            .await
            .expect("the Close ends the stream")
            .unwrap();
        assert!(matches!(
            report.end,
            PumpEnd::RemoteClosed {
                code: CLOSE_TCP_RESET,
                ..
            }
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn remote_close_1000_is_a_fin_after_the_data() {
        let mut harness = start(options(None, false)).await;
        harness
            .relay
            .send(Message::Binary(bytes::Bytes::from_static(b"last words")))
            .await
            .unwrap();
        harness
            .relay
            .send(close_message(CLOSE_NORMAL, ""))
            .await
            .unwrap();
        let received = read_to_end(&mut harness.application).await;
        assert_eq!(received.unwrap(), b"last words");
        let report = harness.pump.await.unwrap();
        assert_eq!(report.end, PumpEnd::Completed);
        assert_eq!(report.bytes_to_tcp, 10);
    }

    #[tokio::test(start_paused = true)]
    async fn remote_close_4000_and_any_other_code_reset_the_tcp_connection() {
        for code in [CLOSE_TCP_RESET, CLOSE_PEER_LOST, CLOSE_GOING_AWAY, 4012] {
            let mut harness = start(options(None, false)).await;
            harness
                .relay
                .send(close_message(code, "gone"))
                .await
                .unwrap();
            let error = read_to_end(&mut harness.application)
                .await
                .expect_err("a reset, not a clean end");
            assert_eq!(error.kind(), io::ErrorKind::ConnectionReset, "code {code}");
            let report = harness.pump.await.unwrap();
            assert_eq!(
                report.end,
                PumpEnd::RemoteClosed {
                    code,
                    reason: "gone".into()
                }
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn local_fin_without_half_close_ends_the_stream_with_1000() {
        let mut harness = start(options(None, false)).await;
        harness.application.write_all(b"bye").await.unwrap();
        harness.application.shutdown().await.unwrap();
        let data = next_data_or_close(&mut harness.relay).await;
        assert_eq!(
            data,
            Some(Message::Binary(bytes::Bytes::from_static(b"bye")))
        );
        let close = next_data_or_close(&mut harness.relay).await;
        assert_eq!(close_code(close), Some(CLOSE_NORMAL));
        assert_eq!(harness.pump.await.unwrap().end, PumpEnd::Completed);
    }

    #[tokio::test(start_paused = true)]
    async fn local_reset_is_close_4000() {
        let mut harness = start(options(None, false)).await;
        harness.application.set_zero_linger().unwrap();
        drop(harness.application);
        let close = next_data_or_close(&mut harness.relay).await;
        assert_eq!(close_code(close), Some(CLOSE_TCP_RESET));
        assert!(matches!(
            harness.pump.await.unwrap().end,
            PumpEnd::LocalFailed(_)
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn the_relay_vanishing_resets_the_tcp_connection() {
        let mut harness = start(options(None, false)).await;
        drop(harness.relay);
        let error = read_to_end(&mut harness.application)
            .await
            .expect_err("a reset, not a clean end");
        assert_eq!(error.kind(), io::ErrorKind::ConnectionReset);
        assert!(matches!(
            harness.pump.await.unwrap().end,
            PumpEnd::StreamLost(_)
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn pings_go_out_at_the_interval() {
        let interval = Duration::from_secs(10);
        let mut harness = start(options(Some(interval), false)).await;
        for expected in 1..=3u32 {
            match harness.relay.next().await {
                Some(Ok(Message::Ping(_))) => {}
                other => panic!("expected a ping, got {other:?}"),
            }
            // Reading on sends our pong, as the relay does.
            assert_eq!(harness.started.elapsed(), interval * expected);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_relay_is_declared_dead_after_three_intervals_and_no_sooner() {
        let interval = Duration::from_secs(10);
        let mut harness = start(options(Some(interval), false)).await;
        // The relay side never reads, so never answers a ping.
        let report = harness.pump.await.unwrap();
        assert!(matches!(report.end, PumpEnd::StreamLost(_)), "{report:?}");
        assert_eq!(harness.started.elapsed(), interval * SILENT_INTERVALS);
        let error = read_to_end(&mut harness.application)
            .await
            .expect_err("reset");
        assert_eq!(error.kind(), io::ErrorKind::ConnectionReset);
    }

    /// Defect 0: the dead-peer deadline was computed once, so every stream
    /// was cut after three intervals however lively the relay was.
    #[tokio::test(start_paused = true)]
    async fn pongs_keep_the_stream_alive_and_silence_after_them_is_caught() {
        let interval = Duration::from_secs(10);
        let mut harness = start(options(Some(interval), false)).await;
        // Answered pings for 20 intervals (the last at 200 s), then silence.
        let lively_for = interval * 20 + interval / 2;
        let mut last_ping = None;
        let answer_pings = async {
            while let Some(Ok(message)) = harness.relay.next().await {
                if matches!(message, Message::Ping(_)) {
                    last_ping = Some(Instant::now());
                }
            }
        };
        let _ = tokio::time::timeout(lively_for, answer_pings).await;
        assert!(
            !harness.pump.is_finished(),
            "cut while the relay answered every ping"
        );
        let report = harness.pump.await.unwrap();
        assert!(matches!(report.end, PumpEnd::StreamLost(_)), "{report:?}");
        let last_pong = last_ping.expect("pings came");
        assert_eq!(last_pong, harness.started + interval * 20);
        assert_eq!(
            last_pong.elapsed(),
            interval * SILENT_INTERVALS,
            "declared dead exactly three intervals after the last pong"
        );
    }

    /// The relay sends `count` small messages 5 s apart, each read by the
    /// application before the next.
    async fn send_ticks(harness: &mut Harness, count: usize) {
        for _ in 0..count {
            tokio::time::sleep(Duration::from_secs(5)).await;
            harness
                .relay
                .send(Message::Binary(bytes::Bytes::from_static(b"tick")))
                .await
                .unwrap();
            let mut tick = [0u8; 4];
            harness.application.read_exact(&mut tick).await.unwrap();
        }
    }

    #[tokio::test(start_paused = true)]
    async fn data_from_the_relay_keeps_the_stream_alive_without_pongs() {
        let interval = Duration::from_secs(10);
        let mut harness = start(options(Some(interval), false)).await;
        send_ticks(&mut harness, 40).await;
        assert!(!harness.pump.is_finished(), "cut while data kept arriving");
    }

    #[tokio::test(start_paused = true)]
    async fn no_pings_while_the_relay_sends_and_one_an_interval_after_it_stops() {
        let interval = Duration::from_secs(10);
        let mut harness = start(options(Some(interval), false)).await;
        send_ticks(&mut harness, 12).await;
        // A ping sent while the relay spoke would be read at once here.
        let quiet_since = Instant::now();
        match harness.relay.next().await {
            Some(Ok(Message::Ping(_))) => {}
            other => panic!("expected a ping, got {other:?}"),
        }
        assert_eq!(quiet_since.elapsed(), interval);
    }

    #[tokio::test(start_paused = true)]
    async fn bulk_data_and_keystrokes_cross_in_order() {
        let mut harness = start(options(None, false)).await;
        let mut sent = Vec::new();
        for round in 0..4u8 {
            sent.extend_from_slice(&vec![round; 300 * 1024]);
            sent.push(b'k');
        }
        let (application, relay) = (&mut harness.application, &mut harness.relay);
        let write = async {
            for round in 0..4u8 {
                let block = vec![round; 300 * 1024];
                application.write_all(&block).await.unwrap();
                application.write_all(b"k").await.unwrap();
            }
        };
        let read = async {
            let mut received = Vec::new();
            while received.len() < sent.len() {
                match next_data_or_close(relay).await {
                    Some(Message::Binary(data)) => {
                        assert!(data.len() <= DEFAULT_READ_CHUNK);
                        received.extend_from_slice(&data);
                    }
                    other => panic!("expected data, got {other:?}"),
                }
            }
            received
        };
        let ((), received) = tokio::join!(write, read);
        assert!(received == sent, "bytes arrived changed or out of order");
    }

    #[tokio::test(start_paused = true)]
    async fn half_close_travels_both_ways_and_data_keeps_flowing_the_other_way() {
        let mut harness = start(options(None, true)).await;
        // The application finishes sending: the relay gets an empty message.
        harness.application.write_all(b"request").await.unwrap();
        harness.application.shutdown().await.unwrap();
        let request = next_data_or_close(&mut harness.relay).await;
        assert_eq!(
            request,
            Some(Message::Binary(bytes::Bytes::from_static(b"request")))
        );
        let half_close = next_data_or_close(&mut harness.relay).await;
        assert_eq!(half_close, Some(Message::Binary(bytes::Bytes::new())));
        // The answer still comes down, then the relay's half-close is a FIN.
        harness
            .relay
            .send(Message::Binary(bytes::Bytes::from_static(b"answer")))
            .await
            .unwrap();
        harness
            .relay
            .send(Message::Binary(bytes::Bytes::new()))
            .await
            .unwrap();
        let answer = read_to_end(&mut harness.application).await.unwrap();
        assert_eq!(answer, b"answer");
        // Both directions are done: the stream ends cleanly.
        let close = next_data_or_close(&mut harness.relay).await;
        assert_eq!(close_code(close), Some(CLOSE_NORMAL));
        assert_eq!(harness.pump.await.unwrap().end, PumpEnd::Completed);
    }

    #[tokio::test(start_paused = true)]
    async fn the_relay_half_closing_first_leaves_the_upload_open() {
        let mut harness = start(options(None, true)).await;
        harness
            .relay
            .send(Message::Binary(bytes::Bytes::new()))
            .await
            .unwrap();
        let nothing = read_to_end(&mut harness.application).await.unwrap();
        assert!(nothing.is_empty(), "FIN to the application");
        harness.application.write_all(b"still here").await.unwrap();
        let upload = next_data_or_close(&mut harness.relay).await;
        assert_eq!(
            upload,
            Some(Message::Binary(bytes::Bytes::from_static(b"still here")))
        );
        harness.application.shutdown().await.unwrap();
        let half_close = next_data_or_close(&mut harness.relay).await;
        assert_eq!(half_close, Some(Message::Binary(bytes::Bytes::new())));
        let close = next_data_or_close(&mut harness.relay).await;
        assert_eq!(close_code(close), Some(CLOSE_NORMAL));
        assert_eq!(harness.pump.await.unwrap().end, PumpEnd::Completed);
    }

    #[tokio::test(start_paused = true)]
    async fn an_empty_message_is_data_when_half_close_was_not_agreed() {
        let mut harness = start(options(None, false)).await;
        harness
            .relay
            .send(Message::Binary(bytes::Bytes::new()))
            .await
            .unwrap();
        harness
            .relay
            .send(Message::Binary(bytes::Bytes::from_static(b"more")))
            .await
            .unwrap();
        let mut more = [0u8; 4];
        harness.application.read_exact(&mut more).await.unwrap();
        assert_eq!(&more, b"more", "no FIN came before the data");
    }
}
