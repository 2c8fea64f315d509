//! The relay's copy: moves messages between the two WebSockets of a paired
//! stream, message for message with opcodes and boundaries kept, then ends
//! both sockets with a complete close handshake.
//!
//! Only the relay copies WebSocket to WebSocket, so this lives here rather
//! than in `framing` (which holds what two programs must agree on: the close
//! codes used below come from [`framing::pump`]). Both directions run in one
//! task; a direction waiting on its writer never stops the other from being
//! read, and pings and pongs are hop-by-hop, never forwarded.
//!
//! Ending follows RFC 6455 §7.1 on both sockets: the side that sent a Close
//! gets ours in reply, the other side gets the Close passed on and a short
//! bounded wait for its reply, and then the relay, as the server, closes
//! each TCP connection first. Strict clients (and IoT Hub's SDKs) otherwise
//! sit out their own close timeout, or report an abnormal closure.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use framing::pump::{
    close_frame, CLOSE_MESSAGE_TOO_BIG, CLOSE_MOVE, CLOSE_PEER_LOST, SILENT_INTERVALS,
};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// How long the relay spends ending one socket: sending its Close, waiting
/// for the peer's, and closing TCP. A peer that does not answer by then is
/// cut; the wait is short because nothing is left to deliver.
pub const CLOSE_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);

/// How the relay's copy of one stream ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RelayEnd {
    /// One side sent Close with this code; it was passed to the other.
    Closed { by_first: bool, code: u16 },
    /// One side vanished without a Close; the other was closed with 1011.
    Lost { first_lost: bool },
    /// One side sent a message over the size limit: it was closed with
    /// 1009, the other side with 1011.
    MessageTooBig { from_first: bool },
    /// The relay told both sides to move (Close 4012): it is draining and
    /// the stream carries a resumable session.
    Moved,
    /// An operator closed the stream (admin API): both sides got Close 1000.
    ClosedByOperator,
}

/// Why the relay interrupts a copy from outside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interruption {
    /// Draining: both sides resume elsewhere (Close 4012).
    Move,
    /// An operator closed the stream: both sides end (Close 1000).
    CloseByOperator,
}

/// What a live copy has moved so far, readable while it runs (the admin
/// API's live streams). Updated once per message with relaxed atomics in
/// the copying task's own cache line, never per byte.
#[derive(Debug)]
pub struct CopyCounters {
    pub first_to_second: AtomicU64,
    pub second_to_first: AtomicU64,
    /// Milliseconds from `origin` to the last data message, either way.
    last_message_millis: AtomicU64,
    origin: Instant,
}

impl Default for CopyCounters {
    fn default() -> Self {
        Self {
            first_to_second: AtomicU64::new(0),
            second_to_first: AtomicU64::new(0),
            last_message_millis: AtomicU64::new(0),
            origin: Instant::now(),
        }
    }
}

impl CopyCounters {
    /// How long ago the last data message passed (or the copy started).
    pub fn idle_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_message_millis.load(Ordering::Relaxed));
        self.origin.elapsed().saturating_sub(last)
    }

    fn note_message(&self, counter: &AtomicU64, length: u64, now: Instant) {
        counter.fetch_add(length, Ordering::Relaxed);
        let millis = now.saturating_duration_since(self.origin).as_millis();
        self.last_message_millis
            .store(u64::try_from(millis).unwrap_or(u64::MAX), Ordering::Relaxed);
    }
}

/// Byte counts and outcome of one relayed stream.
#[derive(Debug, Clone)]
pub struct RelayReport {
    pub bytes_first_to_second: u64,
    pub bytes_second_to_first: u64,
    pub end: RelayEnd,
}

/// How one direction (source to destination) stopped.
enum DirectionEnd {
    /// The source sent this Close.
    Closed(CloseFrame),
    /// The source vanished, broke the protocol, or went silent.
    SourceLost,
    /// The source sent a message over the size limit.
    SourceTooBig,
    /// Writing to the destination failed.
    DestinationLost,
}

/// How the relay ends one socket once copying stopped.
enum Ending {
    /// It sent a Close: answer it (tungstenite queued the echo), then close TCP.
    AnswerClose,
    /// Send this Close, wait briefly for the reply, then close TCP.
    SendClose(CloseFrame),
    /// It is gone: there is no one to tell.
    Drop,
}

fn lost_frame() -> CloseFrame {
    close_frame(CLOSE_PEER_LOST, "the other side of the stream disconnected")
}

/// Copies messages between the two WebSockets of a stream, message for
/// message with opcodes and boundaries kept, until either side ends; then
/// ends both (see the module doc).
///
/// With a `ping_interval`, a side that has sent nothing for that long is
/// pinged, again each interval while it stays silent (pings and pongs are
/// hop-by-hop, never forwarded), and a side that sends nothing for
/// [`SILENT_INTERVALS`] intervals is treated as gone.
pub async fn relay<A, B>(
    first: WebSocketStream<A>,
    second: WebSocketStream<B>,
    ping_interval: Option<Duration>,
) -> RelayReport
where
    A: AsyncRead + AsyncWrite + Unpin + Send,
    B: AsyncRead + AsyncWrite + Unpin + Send,
{
    relay_until_moved(
        first,
        second,
        None,
        ping_interval,
        &CopyCounters::default(),
        std::future::pending(),
    )
    .await
}

/// [`relay`], counting into `counters`, until `interrupt` completes: then
/// both sides get Close 4012 ("move: resume elsewhere", for streams whose
/// proxies resume sessions) or, closed by an operator, Close 1000. `early`
/// is a message already read from `first` (a server's banner while the
/// other side was awaited): it reaches `second` before anything else.
///
/// Not an `async fn`: an async fn keeps its arguments in its state for its
/// whole life, and each socket is a few hundred bytes that `split` moves
/// onto the heap at once. Split here, only the halves (pointers) stay in
/// the copy's state: a relay holding thousands of idle streams holds one
/// such state per stream.
pub fn relay_until_moved<'a, A, B>(
    first: WebSocketStream<A>,
    second: WebSocketStream<B>,
    early: Option<Message>,
    ping_interval: Option<Duration>,
    counters: &'a CopyCounters,
    interrupt: impl std::future::Future<Output = Interruption> + 'a,
) -> impl std::future::Future<Output = RelayReport> + 'a
where
    A: AsyncRead + AsyncWrite + Unpin + Send + 'a,
    B: AsyncRead + AsyncWrite + Unpin + Send + 'a,
{
    let (first_sink, first_stream) = first.split();
    let (second_sink, second_stream) = second.split();
    relay_halves(
        (first_sink, first_stream),
        (second_sink, second_stream),
        early,
        ping_interval,
        counters,
        interrupt,
    )
}

/// One socket's two halves.
type Halves<S> = (
    SplitSink<WebSocketStream<S>, Message>,
    SplitStream<WebSocketStream<S>>,
);

async fn relay_halves<A, B>(
    (mut first_sink, mut first_stream): Halves<A>,
    (mut second_sink, mut second_stream): Halves<B>,
    early: Option<Message>,
    ping_interval: Option<Duration>,
    counters: &CopyCounters,
    interrupt: impl std::future::Future<Output = Interruption>,
) -> RelayReport
where
    A: AsyncRead + AsyncWrite + Unpin + Send,
    B: AsyncRead + AsyncWrite + Unpin + Send,
{
    if let Some(message) = early {
        // Nothing else has been read from `first` yet: order is kept. A
        // failure shows again on the next write, where it is handled.
        if let Err(error) = second_sink.send(message).await {
            tracing::debug!(%error, "the joining side failed at once");
        }
    }
    let origin = Instant::now();
    let (first_heard, second_heard) = (LastHeard::new(origin), LastHeard::new(origin));
    let (from_first, direction_end) = {
        let forward_first = forward(
            &mut first_stream,
            &mut second_sink,
            counters,
            &counters.first_to_second,
            ping_interval,
            (&first_heard, &second_heard),
        );
        let forward_second = forward(
            &mut second_stream,
            &mut first_sink,
            counters,
            &counters.second_to_first,
            ping_interval,
            (&second_heard, &first_heard),
        );
        tokio::select! {
            end = forward_first => (true, Ok(end)),
            end = forward_second => (false, Ok(end)),
            interruption = interrupt => (true, Err(interruption)),
        }
    };
    let bytes = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
    let direction_end = match direction_end {
        Ok(direction_end) => direction_end,
        Err(interruption) => {
            let (frame, end) = match interruption {
                Interruption::Move => (
                    close_frame(CLOSE_MOVE, "the relay is draining: resume elsewhere"),
                    RelayEnd::Moved,
                ),
                Interruption::CloseByOperator => (
                    close_frame(1000, "the relay's operator closed the stream"),
                    RelayEnd::ClosedByOperator,
                ),
            };
            end_both(
                ((first_sink, first_stream), Ending::SendClose(frame.clone())),
                ((second_sink, second_stream), Ending::SendClose(frame)),
            )
            .await;
            return RelayReport {
                bytes_first_to_second: bytes(&counters.first_to_second),
                bytes_second_to_first: bytes(&counters.second_to_first),
                end,
            };
        }
    };
    let (end, source_ending, destination_ending) = match direction_end {
        DirectionEnd::Closed(frame) => {
            let code = u16::from(frame.code);
            (
                RelayEnd::Closed {
                    by_first: from_first,
                    code,
                },
                Ending::AnswerClose,
                Ending::SendClose(frame),
            )
        }
        DirectionEnd::SourceLost => (
            RelayEnd::Lost {
                first_lost: from_first,
            },
            Ending::Drop,
            Ending::SendClose(lost_frame()),
        ),
        DirectionEnd::SourceTooBig => (
            RelayEnd::MessageTooBig { from_first },
            Ending::SendClose(close_frame(
                CLOSE_MESSAGE_TOO_BIG,
                "message larger than the relay accepts",
            )),
            Ending::SendClose(lost_frame()),
        ),
        DirectionEnd::DestinationLost => (
            RelayEnd::Lost {
                first_lost: !from_first,
            },
            Ending::SendClose(lost_frame()),
            Ending::Drop,
        ),
    };
    let (first_ending, second_ending) = if from_first {
        (source_ending, destination_ending)
    } else {
        (destination_ending, source_ending)
    };
    end_both(
        ((first_sink, first_stream), first_ending),
        ((second_sink, second_stream), second_ending),
    )
    .await;
    RelayReport {
        bytes_first_to_second: bytes(&counters.first_to_second),
        bytes_second_to_first: bytes(&counters.second_to_first),
        end,
    }
}

/// Ends both sockets at once. Boxed: the close handshakes are a large
/// state that only an ending stream needs, and a copy's state is kept for
/// as long as the stream lives.
async fn end_both<A, B>(
    ((first_sink, first_stream), first_ending): (Halves<A>, Ending),
    ((second_sink, second_stream), second_ending): (Halves<B>, Ending),
) where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    Box::pin(async move {
        tokio::join!(
            end_socket(first_sink, first_stream, first_ending),
            end_socket(second_sink, second_stream, second_ending),
        )
    })
    .await;
}

/// Ends one socket as `ending` says, within [`CLOSE_HANDSHAKE_TIMEOUT`].
async fn end_socket<S>(
    mut sink: SplitSink<WebSocketStream<S>, Message>,
    stream: SplitStream<WebSocketStream<S>>,
    ending: Ending,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    if matches!(ending, Ending::Drop) {
        return;
    }
    let handshake = async {
        // A message fed to the sink but not yet written goes out before the
        // Close (reuniting the halves would drop it).
        let _ = sink.flush().await;
        let Ok(mut socket) = stream.reunite(sink) else {
            return; // Not two halves of one socket: cannot happen.
        };
        match ending {
            Ending::Drop => {}
            Ending::AnswerClose => answer_close_unbounded(&mut socket).await,
            Ending::SendClose(frame) => close_with_unbounded(&mut socket, frame).await,
        }
    };
    let _ = tokio::time::timeout(CLOSE_HANDSHAKE_TIMEOUT, handshake).await;
}

/// Answers the Close `socket` sent, then closes TCP; within
/// [`CLOSE_HANDSHAKE_TIMEOUT`].
pub async fn answer_close<S>(socket: &mut WebSocketStream<S>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let _ = tokio::time::timeout(CLOSE_HANDSHAKE_TIMEOUT, answer_close_unbounded(socket)).await;
}

/// Sends `frame`, waits for the peer's Close, then closes TCP; within
/// [`CLOSE_HANDSHAKE_TIMEOUT`], after which the peer is simply cut.
pub async fn close_with<S>(socket: &mut WebSocketStream<S>, frame: CloseFrame)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let _ =
        tokio::time::timeout(CLOSE_HANDSHAKE_TIMEOUT, close_with_unbounded(socket, frame)).await;
}

async fn answer_close_unbounded<S>(socket: &mut WebSocketStream<S>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    // Tungstenite queued the echo of the peer's Close when it read it;
    // closing only flushes that reply.
    let _ = SinkExt::close(socket).await;
    close_tcp(socket).await;
}

async fn close_with_unbounded<S>(socket: &mut WebSocketStream<S>, frame: CloseFrame)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    if socket.send(Message::Close(Some(frame))).await.is_ok() {
        // Data the peer sent before it saw our Close is discarded
        // (RFC 6455 §1.4); its Close ends the wait.
        while let Some(Ok(message)) = socket.next().await {
            if message.is_close() {
                break;
            }
        }
    }
    close_tcp(socket).await;
}

/// The server closes TCP first (RFC 6455 §7.1.1); under TLS this also sends
/// close_notify, so the client sees a clean end rather than a truncation.
async fn close_tcp<S>(socket: &mut WebSocketStream<S>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let _ = socket.get_mut().shutdown().await;
}

/// When one socket last sent anything (data, a ping, a pong), as
/// nanoseconds after `origin`: written by the direction that reads it, read
/// by the direction that pings it. Both run in one task; atomic only so the
/// copy stays `Send`.
struct LastHeard {
    origin: Instant,
    nanos: AtomicU64,
}

impl LastHeard {
    fn new(origin: Instant) -> Self {
        Self {
            origin,
            nanos: AtomicU64::new(0),
        }
    }

    fn heard(&self, now: Instant) {
        let nanos = now.saturating_duration_since(self.origin).as_nanos();
        self.nanos
            .store(u64::try_from(nanos).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    fn at(&self) -> Instant {
        self.origin + Duration::from_nanos(self.nanos.load(Ordering::Relaxed))
    }
}

/// One direction: reads `from`, writes `to`, watches `from`, and pings
/// `to` when it has been silent for an interval: a socket that sends needs
/// no ping to prove it lives, and idle pings are what idle streams cost.
async fn forward<A, B>(
    from: &mut SplitStream<WebSocketStream<A>>,
    to: &mut SplitSink<WebSocketStream<B>, Message>,
    counters: &CopyCounters,
    bytes: &AtomicU64,
    ping_interval: Option<Duration>,
    heard: (&LastHeard, &LastHeard),
) -> DirectionEnd
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let (from_heard, to_heard) = heard;
    let mut last_ping = Instant::now();
    // Due an interval after the later of `to`'s last word and our last ping.
    let ping_due =
        |last_ping: Instant| ping_interval.map(|interval| to_heard.at().max(last_ping) + interval);
    loop {
        // Flush only when the source has nothing more ready: bulk transfers
        // batch their writes, interactive ones are flushed at once.
        let next = match from.next().now_or_never() {
            Some(next) => next,
            None => {
                if to.flush().await.is_err() {
                    return DirectionEnd::DestinationLost;
                }
                loop {
                    let (Some(interval), Some(ping_at)) = (ping_interval, ping_due(last_ping))
                    else {
                        break from.next().await;
                    };
                    let silent_at = from_heard.at() + interval * SILENT_INTERVALS;
                    tokio::select! {
                        next = from.next() => break next,
                        _ = tokio::time::sleep_until(ping_at.min(silent_at)) => {}
                    }
                    // Both deadlines may have moved meanwhile (the other
                    // direction hears `to`): only those that still hold count.
                    let now = Instant::now();
                    if now >= from_heard.at() + interval * SILENT_INTERVALS {
                        return DirectionEnd::SourceLost;
                    }
                    if ping_due(last_ping).is_some_and(|due| now >= due) {
                        if to.send(Message::Ping(bytes::Bytes::new())).await.is_err() {
                            return DirectionEnd::DestinationLost;
                        }
                        last_ping = now;
                    }
                }
            }
        };
        let now = Instant::now();
        from_heard.heard(now);
        // A destination that only receives must still be pinged, or the
        // other direction would find it silent during a long download.
        if ping_due(last_ping).is_some_and(|due| now >= due) {
            if to.feed(Message::Ping(bytes::Bytes::new())).await.is_err() {
                return DirectionEnd::DestinationLost;
            }
            last_ping = now;
        }
        match next {
            Some(Err(tokio_tungstenite::tungstenite::Error::Capacity(_))) => {
                return DirectionEnd::SourceTooBig;
            }
            None | Some(Err(_)) => return DirectionEnd::SourceLost,
            Some(Ok(Message::Close(frame))) => {
                return DirectionEnd::Closed(frame.unwrap_or(CloseFrame {
                    code: CloseCode::Normal,
                    reason: "".into(),
                }));
            }
            Some(Ok(message @ (Message::Binary(_) | Message::Text(_)))) => {
                counters.note_message(bytes, message.len() as u64, now);
                if to.feed(message).await.is_err() {
                    return DirectionEnd::DestinationLost;
                }
            }
            Some(Ok(_)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    //! Two clients on in-memory pipes, the relay's copy between them, in
    //! paused time: each test sees exactly what a strict client would.

    use super::*;
    use framing::pump::CLOSE_NORMAL;
    use tokio::io::DuplexStream;
    use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};

    type Socket = WebSocketStream<DuplexStream>;

    struct Pair {
        first: Socket,
        second: Socket,
        relay: tokio::task::JoinHandle<RelayReport>,
        started: Instant,
    }

    async fn socket_pair(relay_config: Option<WebSocketConfig>) -> (Socket, Socket) {
        let (client_end, relay_end) = tokio::io::duplex(256 * 1024);
        let client = WebSocketStream::from_raw_socket(client_end, Role::Client, None).await;
        let relay = WebSocketStream::from_raw_socket(relay_end, Role::Server, relay_config).await;
        (client, relay)
    }

    async fn start(ping_interval: Option<Duration>, relay_config: Option<WebSocketConfig>) -> Pair {
        let (first, first_relay_end) = socket_pair(relay_config).await;
        let (second, second_relay_end) = socket_pair(relay_config).await;
        Pair {
            first,
            second,
            relay: tokio::spawn(relay(first_relay_end, second_relay_end, ping_interval)),
            started: Instant::now(),
        }
    }

    /// The next message that is not a ping or pong; `None` when the
    /// connection ended.
    async fn next_non_control(socket: &mut Socket) -> Option<Message> {
        loop {
            match socket.next().await {
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

    /// Reads on until the relay ends the connection; the reads also send
    /// tungstenite's reply to a Close, as a client does.
    async fn ends(socket: &mut Socket) {
        while let Some(Ok(_)) = socket.next().await {}
    }

    #[tokio::test(start_paused = true)]
    async fn messages_cross_with_their_opcode_and_boundaries() {
        let mut pair = start(None, None).await;
        pair.first.send(Message::Text("one".into())).await.unwrap();
        pair.first
            .send(Message::Binary(bytes::Bytes::from_static(b"two")))
            .await
            .unwrap();
        assert_eq!(
            next_non_control(&mut pair.second).await,
            Some(Message::Text("one".into()))
        );
        assert_eq!(
            next_non_control(&mut pair.second).await,
            Some(Message::Binary(bytes::Bytes::from_static(b"two")))
        );
        pair.second
            .send(Message::Binary(bytes::Bytes::from_static(b"back")))
            .await
            .unwrap();
        assert_eq!(
            next_non_control(&mut pair.first).await,
            Some(Message::Binary(bytes::Bytes::from_static(b"back")))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_close_is_answered_passed_on_and_both_connections_end() {
        let mut pair = start(None, None).await;
        pair.first
            .send(Message::Binary(bytes::Bytes::from_static(b"data")))
            .await
            .unwrap();
        pair.first
            .send(Message::Close(Some(close_frame(CLOSE_NORMAL, "done"))))
            .await
            .unwrap();
        // The sender gets the relay's reply, then the end of its connection.
        let reply = next_non_control(&mut pair.first).await;
        assert_eq!(close_code(reply), Some(CLOSE_NORMAL));
        ends(&mut pair.first).await;
        // The other side gets the data, then the Close, and once it has
        // answered, the end of its connection.
        assert_eq!(
            next_non_control(&mut pair.second).await,
            Some(Message::Binary(bytes::Bytes::from_static(b"data")))
        );
        let passed_on = next_non_control(&mut pair.second).await;
        assert_eq!(close_code(passed_on), Some(CLOSE_NORMAL));
        ends(&mut pair.second).await;
        let report = pair.relay.await.unwrap();
        assert_eq!(
            report.end,
            RelayEnd::Closed {
                by_first: true,
                code: CLOSE_NORMAL
            }
        );
        assert_eq!(report.bytes_first_to_second, 4);
        assert_eq!(pair.started.elapsed(), Duration::ZERO, "nobody waited");
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_never_answers_the_close_is_cut_after_the_handshake_timeout() {
        let mut pair = start(None, None).await;
        pair.second
            .send(Message::Close(Some(close_frame(4000, "reset"))))
            .await
            .unwrap();
        // `first` never reads, so it never answers.
        let report = pair.relay.await.unwrap();
        assert_eq!(
            report.end,
            RelayEnd::Closed {
                by_first: false,
                code: 4000
            }
        );
        assert_eq!(pair.started.elapsed(), CLOSE_HANDSHAKE_TIMEOUT);
        let passed_on = next_non_control(&mut pair.first).await;
        assert_eq!(close_code(passed_on), Some(4000));
    }

    #[tokio::test(start_paused = true)]
    async fn a_vanished_side_makes_the_relay_close_the_other_with_1011() {
        let mut pair = start(None, None).await;
        drop(pair.first);
        let close = next_non_control(&mut pair.second).await;
        assert_eq!(close_code(close), Some(CLOSE_PEER_LOST));
        ends(&mut pair.second).await;
        assert_eq!(
            pair.relay.await.unwrap().end,
            RelayEnd::Lost { first_lost: true }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_oversized_message_is_closed_with_1009_and_the_other_side_with_1011() {
        let limit = 1024;
        let config = WebSocketConfig::default()
            .max_message_size(Some(limit))
            .max_frame_size(Some(limit));
        let mut pair = start(None, Some(config)).await;
        pair.first
            .send(Message::Binary(vec![7u8; limit * 2].into()))
            .await
            .unwrap();
        let too_big = next_non_control(&mut pair.first).await;
        assert_eq!(close_code(too_big), Some(CLOSE_MESSAGE_TOO_BIG));
        let lost = next_non_control(&mut pair.second).await;
        assert_eq!(close_code(lost), Some(CLOSE_PEER_LOST));
        assert_eq!(
            pair.relay.await.unwrap().end,
            RelayEnd::MessageTooBig { from_first: true }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_side_is_dropped_after_three_intervals_and_the_other_told_1011() {
        let interval = Duration::from_secs(10);
        let mut pair = start(Some(interval), None).await;
        // `second` answers pings by reading; `first` never reads or sends.
        let lost = next_non_control(&mut pair.second).await;
        assert_eq!(close_code(lost), Some(CLOSE_PEER_LOST));
        assert_eq!(pair.started.elapsed(), interval * SILENT_INTERVALS);
        assert_eq!(
            pair.relay.await.unwrap().end,
            RelayEnd::Lost { first_lost: true }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn only_a_silent_side_is_pinged() {
        let interval = Duration::from_secs(10);
        let mut pair = start(Some(interval), None).await;
        // `first` sends every 5 s for a minute; `second` only receives.
        let mut pings_to_second = 0;
        for _ in 0..12 {
            tokio::time::sleep(Duration::from_secs(5)).await;
            pair.first
                .send(Message::Binary(bytes::Bytes::from_static(b"tick")))
                .await
                .unwrap();
            loop {
                match pair.second.next().await {
                    Some(Ok(Message::Ping(_))) => pings_to_second += 1,
                    Some(Ok(Message::Binary(_))) => break,
                    other => panic!("expected a tick or a ping, got {other:?}"),
                }
            }
        }
        assert!(
            pings_to_second >= 5,
            "the side that only receives is still pinged: {pings_to_second}"
        );
        // Nothing was sent to `first` while it spoke: its first ping comes
        // an interval after it went quiet.
        let quiet_since = Instant::now();
        match pair.first.next().await {
            Some(Ok(Message::Ping(_))) => {}
            other => panic!("expected a ping, got {other:?}"),
        }
        assert_eq!(quiet_since.elapsed(), interval);
        assert!(!pair.relay.is_finished(), "both sides answered");
    }

    /// The relay spawns its copies, so a non-`Send` copy would only fail to
    /// compile there; this never runs, it makes the check happen here.
    #[allow(dead_code)]
    fn relay_future_is_send(first: Socket, second: Socket) {
        fn assert_send<T: Send>(_: T) {}
        assert_send(relay(first, second, None));
    }
}
