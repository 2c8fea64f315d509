//! The relay's copy: moves messages between the two WebSockets of a paired
//! stream, message for message with opcodes and boundaries kept.
//!
//! Only the relay copies WebSocket to WebSocket, so this lives here rather
//! than in `framing` (which holds what two programs must agree on: the close
//! codes used below come from [`framing::pump`]). Both directions run in one
//! task; a direction waiting on its writer never stops the other from being
//! read, and pings and pongs are hop-by-hop, never forwarded.

use std::time::{Duration, Instant};

use framing::pump::{
    close_message, CLOSE_MESSAGE_TOO_BIG, CLOSE_PEER_LOST, CLOSE_WRITE_TIMEOUT, SILENT_INTERVALS,
};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

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
}

/// Byte counts and outcome of one relayed stream.
#[derive(Debug, Clone)]
pub struct RelayReport {
    pub bytes_first_to_second: u64,
    pub bytes_second_to_first: u64,
    pub end: RelayEnd,
}

enum DirectionEnd {
    Closed(u16),
    SourceLost,
    SourceTooBig,
    DestinationLost,
}

/// Copies messages between the two WebSockets of a stream, message for
/// message with opcodes and boundaries kept, until either side ends.
///
/// With a `ping_interval`, each side is pinged that often (pings and pongs
/// are hop-by-hop, never forwarded), and a side that sends nothing for
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
    let (mut first_sink, mut first_stream) = first.split();
    let (mut second_sink, mut second_stream) = second.split();
    let (mut bytes_first_to_second, mut bytes_second_to_first) = (0u64, 0u64);
    let (from_first, end) = {
        let forward_first = forward(
            &mut first_stream,
            &mut second_sink,
            &mut bytes_first_to_second,
            ping_interval,
        );
        let forward_second = forward(
            &mut second_stream,
            &mut first_sink,
            &mut bytes_second_to_first,
            ping_interval,
        );
        tokio::select! {
            end = forward_first => (true, end),
            end = forward_second => (false, end),
        }
    };
    let lost = close_message(CLOSE_PEER_LOST, "the other side of the stream disconnected");
    let end = match end {
        DirectionEnd::Closed(code) => RelayEnd::Closed {
            by_first: from_first,
            code,
        },
        DirectionEnd::SourceLost => RelayEnd::Lost {
            first_lost: from_first,
        },
        DirectionEnd::SourceTooBig => {
            let too_big = close_message(
                CLOSE_MESSAGE_TOO_BIG,
                "message larger than the relay accepts",
            );
            if from_first {
                let _ = tokio::time::timeout(CLOSE_WRITE_TIMEOUT, first_sink.send(too_big)).await;
            } else {
                let _ = tokio::time::timeout(CLOSE_WRITE_TIMEOUT, second_sink.send(too_big)).await;
            }
            RelayEnd::MessageTooBig { from_first }
        }
        DirectionEnd::DestinationLost => {
            // The destination is gone: close the source, which is still there.
            if from_first {
                let _ = tokio::time::timeout(CLOSE_WRITE_TIMEOUT, first_sink.send(lost)).await;
            } else {
                let _ = tokio::time::timeout(CLOSE_WRITE_TIMEOUT, second_sink.send(lost)).await;
            }
            RelayEnd::Lost {
                first_lost: !from_first,
            }
        }
    };
    RelayReport {
        bytes_first_to_second,
        bytes_second_to_first,
        end,
    }
}

/// One direction: reads `from`, writes `to`, pings `to`, watches `from`.
async fn forward<A, B>(
    from: &mut SplitStream<WebSocketStream<A>>,
    to: &mut SplitSink<WebSocketStream<B>, Message>,
    bytes: &mut u64,
    ping_interval: Option<Duration>,
) -> DirectionEnd
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let mut last_received = Instant::now();
    let mut next_ping = ping_interval.map(|interval| last_received + interval);
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
                    let (Some(interval), Some(ping_at)) = (ping_interval, next_ping) else {
                        break from.next().await;
                    };
                    let silent_at = last_received + interval * SILENT_INTERVALS;
                    tokio::select! {
                        next = from.next() => break next,
                        _ = tokio::time::sleep_until(tokio::time::Instant::from_std(ping_at.min(silent_at))) => {}
                    }
                    let now = Instant::now();
                    if now >= silent_at {
                        return source_lost(to).await;
                    }
                    if now >= ping_at {
                        if to.send(Message::Ping(bytes::Bytes::new())).await.is_err() {
                            return DirectionEnd::DestinationLost;
                        }
                        next_ping = Some(now + interval);
                    }
                }
            }
        };
        let now = Instant::now();
        last_received = now;
        // A destination that only receives must still be pinged, or the
        // other direction would find it silent during a long download.
        if let (Some(interval), Some(ping_at)) = (ping_interval, next_ping) {
            if now >= ping_at {
                if to.feed(Message::Ping(bytes::Bytes::new())).await.is_err() {
                    return DirectionEnd::DestinationLost;
                }
                next_ping = Some(now + interval);
            }
        }
        match next {
            Some(Err(tokio_tungstenite::tungstenite::Error::Capacity(_))) => {
                source_lost(to).await;
                return DirectionEnd::SourceTooBig;
            }
            None | Some(Err(_)) => return source_lost(to).await,
            Some(Ok(Message::Close(frame))) => {
                let frame = frame.unwrap_or(CloseFrame {
                    code: CloseCode::Normal,
                    reason: "".into(),
                });
                let code = u16::from(frame.code);
                let _ =
                    tokio::time::timeout(CLOSE_WRITE_TIMEOUT, to.send(Message::Close(Some(frame))))
                        .await;
                return DirectionEnd::Closed(code);
            }
            Some(Ok(message @ (Message::Binary(_) | Message::Text(_)))) => {
                *bytes += message.len() as u64;
                if to.feed(message).await.is_err() {
                    return DirectionEnd::DestinationLost;
                }
            }
            Some(Ok(_)) => {}
        }
    }
}

/// The source vanished: tell the destination with 1011.
async fn source_lost<B>(to: &mut SplitSink<WebSocketStream<B>, Message>) -> DirectionEnd
where
    B: AsyncRead + AsyncWrite + Unpin,
{
    let lost = close_message(CLOSE_PEER_LOST, "the other side of the stream disconnected");
    let _ = tokio::time::timeout(CLOSE_WRITE_TIMEOUT, to.send(lost)).await;
    DirectionEnd::SourceLost
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The relay spawns its copies, so a non-`Send` copy would only fail to
    /// compile there; this never runs, it makes the check happen here.
    #[allow(dead_code)]
    fn relay_future_is_send(
        first: WebSocketStream<tokio::io::DuplexStream>,
        second: WebSocketStream<tokio::io::DuplexStream>,
    ) {
        fn assert_send<T: Send>(_: T) {}
        assert_send(relay(first, second, None));
    }
}
