//! Resumable sessions: one local TCP connection (or another
//! [`LocalConnection`]) carried by a succession of stream WebSockets
//! (PROTOCOL.md, "Resumable streams").
//!
//! A session outlives the WebSocket that carries it. Each side counts the
//! bytes it has received and tells the other (an *ack*, a text message: data
//! stays in binary messages, so acks are told apart without looking at
//! application bytes). What was read from the local socket but not yet acked
//! stays in a bounded replay buffer; when the buffer is full the session
//! stops reading its local socket, which is TCP's own backpressure, so
//! nothing is ever dropped. When a carrier breaks, the local socket stays
//! open; the next carrier starts with both counts, and each side resends
//! exactly what the other has not received.
//!
//! A TCP half-close (FIN) always travels in-band as an empty binary message,
//! and takes one position in the byte count, so a FIN lost with a carrier is
//! resent like data. The session ends cleanly once both FINs are delivered
//! and acknowledged (then Close 1000), and abortively on a local reset or
//! the peer's Close 4000.
//!
//! The I/O loop is [`run_session`]; the messages of the handshake and the
//! proof are [`Control`] and [`SessionKeys`]. Who finds the next carrier is
//! policy and lives in the proxies: they hand carriers in as [`Offer`]s.

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::local::{LocalConnection, LocalReader};
use crate::pump::{
    close_message, CLOSE_NORMAL, CLOSE_TCP_RESET, DEFAULT_READ_CHUNK, SILENT_INTERVALS,
};
use crate::same_task;

/// Most unacknowledged bytes kept per direction by default. A session
/// reaches it only when it moves bulk data alone; sessions that do so at
/// the same time share [`IN_FLIGHT_BUDGET`] (see [`Ledger::window`]).
pub const DEFAULT_REPLAY_BUFFER: usize = 16 * 1024 * 1024;
/// How long a session waits for a new carrier by default.
pub const DEFAULT_RESUME_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the first message of a stream (hello, resume, the answer to a
/// resume) may take to arrive.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Received bytes are acknowledged at most this long after they arrived, so
/// an interactive session's replay buffers hold almost nothing.
pub const ACK_DELAY: Duration = Duration::from_millis(20);
/// Bulk transfers are acknowledged at least every this many bytes (or a
/// quarter of the replay buffer, when that is smaller).
///
/// Every ack wakes three processes (the receiver, the relay, the sender)
/// for a few bytes, and in a bulk transfer nothing else travels that way to
/// carry it. At 128 KiB the acks cost the sending proxy 25–50 % more CPU
/// per byte than the plain pump. At 512 KiB, a quarter of the smallest
/// window, they are cheap enough, and a window shared among eight bulk
/// streams can be small (see [`IN_FLIGHT_BUDGET`] and BENCHMARKS.md).
pub const ACK_EVERY: u64 = 512 * 1024;
/// Least unacknowledged bytes a session may keep in flight (when its
/// replay buffer is at least that large); see [`Ledger::window`]. Four
/// acks' worth, so a sender waits for an ack only when the path holds
/// more than three.
const MIN_WINDOW: usize = 2 * 1024 * 1024;
/// Unacknowledged bytes that the sessions of one process holding any keep
/// in flight between them, each at least [`MIN_WINDOW`].
///
/// The path between the proxies buffers far more than a round trip needs:
/// on Linux a socket's receive buffer grows to `tcp_rmem`'s maximum (32 MiB
/// on the bench's host), and data waits there in front of the busiest hop
/// (the relay). A session whose window is smaller than what the path holds
/// stops at it and waits for an ack every few MiB: with one bulk stream at
/// 4 MiB, the machine stood idle 13–17 % of the time against 6–12 % with
/// resume off, and throughput fell by as much (issue 11). At 16 MiB the idle
/// time was that of resume off. But every byte in flight is also a byte
/// the sender copied into memory it has not touched for that long, and with
/// eight streams at 16 MiB each those copies made the sending proxy cost a
/// quarter more CPU per byte. Sharing one budget gives a lone bulk stream
/// the large window, and eight streams at least 2 MiB each.
///
/// Under load the round-trip term of [`Ledger::window`] decides instead:
/// eight bulk streams on a busy two-core host measure 5–60 ms ack round
/// trips (mostly waiting for a core) and keep 5–16 MiB in flight each.
/// Sharing the round-trip term as well held them to about 2 MiB, but left
/// the machine idle more often and cost as much CPU per byte
/// (BENCHMARKS.md, afternoon of 2026-12-03), so each session keeps its
/// own.
const IN_FLIGHT_BUDGET: usize = 16 * 1024 * 1024;
/// Sessions of this process holding unacknowledged data: they share
/// [`IN_FLIGHT_BUDGET`].
static SESSIONS_IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);
/// The fastest path the in-flight window is sized for, in bytes per
/// second: the window is the ack round trip times this, so a path with a
/// longer round trip gets a larger window (up to the replay buffer).
const WINDOW_RATE: f64 = 1e9;
/// How long the shortest ack round trip seen stays the estimate; a newer
/// sample replaces it after this even when longer (the path changed).
const ROUND_TRIP_MEMORY: Duration = Duration::from_secs(10);
/// Most send times remembered for round-trip samples.
const MAX_SEND_MARKS: usize = 256;
/// Most acknowledged read buffers a session keeps for reuse: enough for a
/// whole [`IN_FLIGHT_BUDGET`] of full reads, so a lone bulk stream never
/// frees and allocates its buffers anew.
const MAX_SPARE_BUFFERS: usize = IN_FLIGHT_BUDGET / DEFAULT_READ_CHUNK + 1;
/// How long spare read buffers outlive the last unacknowledged byte: long
/// enough to ride over a pause in a transfer, short enough that a session
/// gone quiet soon holds nothing.
const SPARE_LINGER: Duration = Duration::from_secs(1);
#[cfg(test)]
thread_local! {
    /// Spare buffers the ledger last held, for tests on this thread.
    static SPARES_HELD: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Largest text (control) message a session accepts.
const MAX_CONTROL_MESSAGE: usize = 1024;

type HmacSha256 = Hmac<Sha256>;

/// The session id and the per-session secret, agreed inside the first
/// stream. Not `Debug`/`Display` beyond the id: the secret is never logged.
#[derive(Clone)]
pub struct SessionKeys {
    pub id: String,
    secret: [u8; 32],
}

impl std::fmt::Debug for SessionKeys {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("SessionKeys")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|index| u8::from_str_radix(text.get(index..index + 2)?, 16).ok())
        .collect()
}

impl SessionKeys {
    /// A fresh session: random 128-bit id, random 256-bit secret.
    pub fn generate() -> Self {
        let id: [u8; 16] = rand::random();
        Self {
            id: hex(&id),
            secret: rand::random(),
        }
    }

    /// The hello that starts a session, carrying both.
    pub fn hello(&self) -> Control {
        Control::Hello {
            session: self.id.clone(),
            secret: hex(&self.secret),
        }
    }

    /// The keys a hello carries; `None` when it is malformed.
    pub fn from_hello(session: &str, secret: &str) -> Option<Self> {
        let secret: [u8; 32] = unhex(secret)?.try_into().ok()?;
        (session.len() == 32 && unhex(session).is_some()).then(|| Self {
            id: session.to_string(),
            secret,
        })
    }

    fn mac(&self, nonce: &str) -> HmacSha256 {
        let mut mac =
            HmacSha256::new_from_slice(&self.secret).expect("HMAC accepts keys of any length");
        mac.update(b"devstreams-resume\n");
        mac.update(self.id.as_bytes());
        mac.update(b"\n");
        mac.update(nonce.as_bytes());
        mac
    }

    /// A resume request with a fresh nonce and its proof.
    pub fn resume(&self, received: u64) -> Control {
        let nonce = hex(&rand::random::<[u8; 16]>());
        let proof = hex(&self.mac(&nonce).finalize().into_bytes());
        Control::Resume {
            session: self.id.clone(),
            nonce,
            proof,
            received,
        }
    }

    /// Checks a proof in constant time.
    pub fn check(&self, nonce: &str, proof: &str) -> bool {
        match unhex(proof) {
            Some(proof) => self.mac(nonce).verify_slice(&proof).is_ok(),
            None => false,
        }
    }
}

/// The session's control messages, sent as WebSocket text messages (JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Control {
    /// Service → device, first message of a new session.
    Hello { session: String, secret: String },
    /// Service → device, first message of a stream that continues a session.
    Resume {
        session: String,
        nonce: String,
        proof: String,
        received: u64,
    },
    /// Device → service: the resume is accepted; the device's count.
    Resumed { received: u64 },
    /// Device → service: no such session here (its process restarted, or
    /// the window passed).
    UnknownSession,
    /// Device → service: the proof did not check.
    Refused,
    /// Either way: bytes received so far (a FIN counts as one).
    Ack { received: u64 },
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("control message is longer than {MAX_CONTROL_MESSAGE} bytes")]
    TooLong,
    #[error("control message is not understood: {0}")]
    Malformed(String),
}

impl Control {
    pub fn to_message(&self) -> Message {
        let text = serde_json::to_string(self).expect("control messages always serialize");
        Message::Text(text.into())
    }

    pub fn parse(text: &str) -> Result<Control, ControlError> {
        if text.len() > MAX_CONTROL_MESSAGE {
            return Err(ControlError::TooLong);
        }
        serde_json::from_str(text).map_err(|error| ControlError::Malformed(error.to_string()))
    }
}

/// Reads the first control message of a stream (pings skipped), within
/// [`HANDSHAKE_TIMEOUT`].
pub async fn read_control<S>(websocket: &mut WebSocketStream<S>) -> Result<Control, String>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let read = async {
        loop {
            match websocket.next().await {
                Some(Ok(Message::Text(text))) => {
                    return Control::parse(text.as_str()).map_err(|error| error.to_string())
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                Some(Ok(Message::Close(frame))) => {
                    return Err(match frame {
                        Some(frame) => format!("the stream was closed (code {})", frame.code),
                        None => "the stream was closed".into(),
                    })
                }
                Some(Ok(_)) => return Err("the stream did not open with a control message".into()),
                Some(Err(error)) => return Err(error.to_string()),
                None => return Err("the stream ended".into()),
            }
        }
    };
    tokio::time::timeout(HANDSHAKE_TIMEOUT, read)
        .await
        .map_err(|_| format!("no control message within {HANDSHAKE_TIMEOUT:?}"))?
}

#[derive(Debug, Clone, Copy)]
pub struct SessionOptions {
    /// Most unacknowledged bytes kept; reading the local socket stops there.
    pub replay_buffer: usize,
    /// How long to wait for a new carrier after one is lost.
    pub resume_timeout: Duration,
    /// Ping the relay this often; `None` turns dead-peer detection off.
    pub ping_interval: Option<Duration>,
    /// Bytes read from the local socket per message.
    pub read_chunk: usize,
    /// Keep unacknowledged bytes in the local socket's receive queue when
    /// it can hold at least this many ([`crate::kernel_replay`]); `None`
    /// keeps them in memory always.
    pub kernel_replay_least: Option<usize>,
}

impl Default for SessionOptions {
    fn default() -> Self {
        Self {
            replay_buffer: DEFAULT_REPLAY_BUFFER,
            resume_timeout: DEFAULT_RESUME_TIMEOUT,
            ping_interval: Some(crate::pump::DEFAULT_PING_INTERVAL),
            read_chunk: DEFAULT_READ_CHUNK,
            kernel_replay_least: kernel_replay_default(),
        }
    }
}

/// Environment variable that turns [`crate::kernel_replay`] off (`off`).
pub const KERNEL_REPLAY_VARIABLE: &str = "DEVSTREAMS_KERNEL_REPLAY";

/// The replay in the local socket's queue when that queue can be given at
/// least [`MIN_WINDOW`], unless [`KERNEL_REPLAY_VARIABLE`] says `off`.
fn kernel_replay_default() -> Option<usize> {
    let off =
        std::env::var(KERNEL_REPLAY_VARIABLE).is_ok_and(|value| value.eq_ignore_ascii_case("off"));
    (!off).then_some(MIN_WINDOW)
}

/// Where a session kept its unacknowledged bytes, for its closing log line.
pub fn replay_kept_in(in_kernel: bool) -> &'static str {
    if in_kernel {
        "socket queue"
    } else {
        "memory"
    }
}

/// A WebSocket that is to carry the session, with the peer's count.
pub struct Carrier<S> {
    pub websocket: WebSocketStream<S>,
    /// Bytes the peer has received; sending restarts there.
    pub peer_received: u64,
    /// Send [`Control::Resumed`] with our count first (the device side).
    pub answer_resumed: bool,
}

/// What the proxy hands the session.
pub enum Offer<S> {
    Carrier(Box<Carrier<S>>),
    /// No carrier will come; the reason is logged and the session reset.
    GiveUp(String),
}

/// Told to the proxy when a carrier is lost: what the session has received,
/// for its resume request.
#[derive(Debug, Clone)]
pub struct Loss {
    pub received: u64,
    pub reason: String,
}

/// How a session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEnd {
    /// Both directions finished and were acknowledged, or the peer closed
    /// with 1000.
    Completed,
    /// The peer's local connection failed (Close 4000).
    PeerReset(String),
    /// Our local connection failed or was reset.
    LocalFailed(String),
    /// No new carrier came within the resume window.
    Expired(Duration),
    /// The proxy gave up resuming (unknown session, refused proof, …).
    Abandoned(String),
    /// The peer broke the session protocol.
    ProtocolError(String),
}

/// Counts and outcome of one session.
#[derive(Debug, Clone)]
pub struct SessionReport {
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub resumes: u32,
    pub bytes_replayed: u64,
    /// Whether the local socket's receive queue kept the unacknowledged
    /// bytes ([`crate::kernel_replay`]).
    pub replay_in_kernel: bool,
    pub end: SessionEnd,
}

/// What both directions of a session share. Both run in one task; the lock
/// is held only for bookkeeping, never across an await.
struct Ledger {
    /// Read from the local socket, not yet acknowledged, starting at `acked`.
    replay: VecDeque<Held>,
    /// Set when the local socket's receive queue keeps what was read (see
    /// [`crate::kernel_replay`]).
    kernel: Option<KernelQueue>,
    replay_bytes: usize,
    acked: u64,
    /// Data bytes read from the local socket.
    read_total: u64,
    local_fin: bool,
    /// Positions received from the peer (data bytes, plus one for its FIN).
    received: u64,
    remote_fin: bool,
    ack_sent: u64,
    unacked_since: Option<Instant>,
    /// Acknowledged read buffers kept for the next reads while data flows.
    /// Freeing each and allocating anew made the allocator hand memory back
    /// to the system and fault it in again, page by page: a quarter more CPU
    /// per byte in bulk transfers than the plain pump. Emptied whenever the
    /// replay buffer has stayed empty for [`SPARE_LINGER`], so a quiet
    /// session holds none.
    spare: Vec<BytesMut>,
    /// When the replay buffer last became empty with spares kept.
    emptied_at: Option<Instant>,
    /// (position after a data message, when it was handed to the carrier):
    /// the oldest ones answered by each ack give a round-trip sample.
    send_marks: VecDeque<(u64, Instant)>,
    /// Shortest ack round trip on this carrier lately, and when it was seen.
    round_trip: Option<(Duration, Instant)>,
    /// Whether this session is counted in [`SESSIONS_IN_FLIGHT`]: while its
    /// replay buffer holds anything.
    counted_in_flight: bool,
}

impl Ledger {
    /// A session's start: nothing read, sent or received.
    fn new() -> Self {
        Self {
            replay: VecDeque::new(),
            kernel: None,
            replay_bytes: 0,
            acked: 0,
            read_total: 0,
            local_fin: false,
            received: 0,
            remote_fin: false,
            ack_sent: 0,
            unacked_since: None,
            spare: Vec::new(),
            emptied_at: None,
            send_marks: VecDeque::new(),
            round_trip: None,
            counted_in_flight: false,
        }
    }

    /// Keeps a chunk read from the local socket until it is acknowledged.
    fn hold(&mut self, chunk: Bytes) {
        self.read_total += chunk.len() as u64;
        self.replay_bytes += chunk.len();
        self.replay.push_back(Held {
            length: chunk.len(),
            bytes: Some(chunk),
        });
        self.emptied_at = None;
        self.count_in_flight();
    }

    /// Keeps [`SESSIONS_IN_FLIGHT`] in step with whether the replay buffer
    /// holds anything; called after each change to it.
    fn count_in_flight(&mut self) {
        let holds = !self.replay.is_empty();
        if holds != self.counted_in_flight {
            if holds {
                SESSIONS_IN_FLIGHT.fetch_add(1, Ordering::Relaxed);
            } else {
                SESSIONS_IN_FLIGHT.fetch_sub(1, Ordering::Relaxed);
            }
            self.counted_in_flight = holds;
        }
    }

    /// Sessions sharing [`IN_FLIGHT_BUDGET`] with this one, this one
    /// included.
    fn sharing(&self) -> usize {
        let others = SESSIONS_IN_FLIGHT
            .load(Ordering::Relaxed)
            .saturating_sub(usize::from(self.counted_in_flight));
        others + 1
    }

    /// The end of our sequence: data, plus one for the FIN once read.
    fn sequence_end(&self) -> u64 {
        self.read_total + u64::from(self.local_fin)
    }

    /// Frees everything below `count`; false when `count` is beyond what we
    /// ever sent.
    fn acknowledge(&mut self, count: u64) -> bool {
        if count > self.sequence_end() {
            return false;
        }
        while count > self.acked {
            let Some(front) = self.replay.front_mut() else {
                // Only the FIN is left to acknowledge.
                self.acked = count;
                break;
            };
            let drop_bytes = (count - self.acked).min(front.length as u64) as usize;
            if drop_bytes == front.length {
                if let Some(Held {
                    bytes: Some(chunk), ..
                }) = self.replay.pop_front()
                {
                    if self.kernel.is_none() {
                        self.recycle(chunk);
                    }
                }
            } else {
                front.length -= drop_bytes;
                if let Some(bytes) = &mut front.bytes {
                    *bytes = bytes.slice(drop_bytes..);
                }
            }
            self.replay_bytes -= drop_bytes;
            self.acked += drop_bytes as u64;
            if drop_bytes == 0 {
                self.acked = count;
            }
        }
        if self.replay.is_empty() && !self.spare.is_empty() && self.emptied_at.is_none() {
            self.emptied_at = Some(Instant::now());
        }
        self.count_in_flight();
        true
    }

    /// Most unacknowledged bytes to keep, when `sharing` sessions of the
    /// process (this one included) hold some.
    ///
    /// The larger of this session's share of [`IN_FLIGHT_BUDGET`] and the
    /// shortest ack round trip times [`WINDOW_RATE`] (a long path needs a
    /// large window whoever else is busy); at least [`MIN_WINDOW`] and at
    /// most the replay buffer. A smaller window (512 KiB) needed acks four
    /// times as often, and those cost more than the memory they saved.
    fn window(&self, capacity: usize, sharing: usize) -> usize {
        let needed = self.round_trip.map_or(0.0, |(round_trip, _)| {
            round_trip.as_secs_f64() * WINDOW_RATE
        });
        let share = IN_FLIGHT_BUDGET / sharing.max(1);
        (needed as usize)
            .max(share)
            .clamp(MIN_WINDOW.min(capacity), capacity)
    }

    /// The carrier is gone; returns the bytes received so far. The round
    /// trip measured on it goes too: until a new carrier is measured the
    /// window is the session's share of the budget, so sessions waiting out
    /// an outage together fill their shares, not a window sized for a path
    /// that no longer exists.
    fn detach(&mut self) -> u64 {
        self.send_marks.clear();
        self.round_trip = None;
        self.received
    }

    /// Remembers when the data up to `position` went out.
    fn mark_sent(&mut self, position: u64, now: Instant) {
        if self.send_marks.len() < MAX_SEND_MARKS {
            self.send_marks.push_back((position, now));
        }
    }

    /// Takes a round-trip sample from an ack of `count` received at `now`.
    fn sample_round_trip(&mut self, count: u64, now: Instant) {
        let mut answered = None;
        while let Some(&(position, sent_at)) = self.send_marks.front() {
            if position > count {
                break;
            }
            answered = Some(sent_at);
            self.send_marks.pop_front();
        }
        let Some(sent_at) = answered else { return };
        let sample = now.saturating_duration_since(sent_at);
        let keep = self.round_trip.is_some_and(|(shortest, seen)| {
            shortest <= sample && now.saturating_duration_since(seen) < ROUND_TRIP_MEMORY
        });
        if !keep {
            self.round_trip = Some((sample, now));
        }
    }

    /// Keeps an acknowledged chunk's memory for a later read, when nothing
    /// else (a WebSocket frame being written) still holds it.
    fn recycle(&mut self, chunk: Bytes) {
        if self.spare.len() >= MAX_SPARE_BUFFERS {
            return;
        }
        if let Ok(mut buffer) = chunk.try_into_mut() {
            buffer.clear();
            self.spare.push(buffer);
        }
        self.report_spares();
    }

    /// A buffer for one read of up to `size` bytes: a spare one when there
    /// is one, else a new one.
    fn read_buffer(&mut self, size: usize) -> BytesMut {
        match self.spare.pop() {
            Some(mut buffer) => {
                // Moves the (empty) view back to the start of its memory;
                // allocates only when the spare one is too small.
                buffer.reserve(size);
                buffer
            }
            None => BytesMut::with_capacity(size),
        }
    }

    /// Drops the spare read buffers once the replay buffer has stayed empty
    /// for [`SPARE_LINGER`]; until then, returns when to look again.
    fn expire_spares(&mut self, now: Instant) -> Option<Instant> {
        if !self.replay.is_empty() {
            return None;
        }
        let expiry = self.emptied_at? + SPARE_LINGER;
        if expiry > now {
            return Some(expiry);
        }
        self.spare = Vec::new();
        self.emptied_at = None;
        self.report_spares();
        None
    }

    #[cfg(test)]
    fn report_spares(&self) {
        SPARES_HELD.with(|held| held.set(self.spare.len()));
    }

    #[cfg(not(test))]
    fn report_spares(&self) {}

    /// Up to `limit` bytes starting at `offset`, from the replay buffer.
    ///
    /// Searched from the newest chunk: in a bulk transfer the next data to
    /// send was read last, behind a whole window of chunks sent and not yet
    /// acknowledged (256 of them in a 16 MiB window). A chunk that the local
    /// socket's queue keeps lets go of its memory once sent to its end.
    fn data_from(&mut self, offset: u64, limit: usize) -> Slice {
        if offset < self.acked || offset >= self.read_total {
            return Slice::Nothing;
        }
        let kernel_head = self.kernel.as_ref().map(|kernel| kernel.head);
        let mut end = self.read_total;
        for held in self.replay.iter_mut().rev() {
            let start_position = end - held.length as u64;
            if offset >= start_position {
                let Some(bytes) = &held.bytes else {
                    return Slice::InKernel;
                };
                let start = (offset - start_position) as usize;
                let stop = held.length.min(start + limit);
                let data = bytes.slice(start..stop);
                if stop == held.length && kernel_head.is_some_and(|head| head <= start_position) {
                    held.bytes = None;
                }
                return Slice::Data(data);
            }
            end = start_position;
        }
        Slice::Nothing
    }

    /// Drops from the local socket's queue what the peer acknowledged.
    fn release_acknowledged<R: LocalReader>(&mut self, reader: &mut R) -> io::Result<()> {
        let acknowledged = self.acked.min(self.read_total);
        let Some(kernel) = &mut self.kernel else {
            return Ok(());
        };
        if acknowledged > kernel.head {
            reader.release(acknowledged - kernel.head)?;
            kernel.head = acknowledged;
        }
        Ok(())
    }

    /// Takes everything the local socket's queue keeps into memory: to send
    /// it again on a new carrier, or before the socket closes (unread bytes
    /// would make it reset the connection).
    fn take_into_memory<R: LocalReader>(&mut self, reader: &mut R) -> io::Result<()> {
        self.release_acknowledged(reader)?;
        let Some(kernel) = &mut self.kernel else {
            return Ok(());
        };
        let mut start_position = self.acked.min(self.read_total);
        for held in &mut self.replay {
            if kernel.head == self.read_total {
                break;
            }
            let end_position = start_position + held.length as u64;
            if start_position >= kernel.head {
                if held.bytes.is_some() {
                    // Not sent yet: its memory is still here.
                    reader.release(held.length as u64)?;
                } else {
                    held.bytes = Some(reader.take_kept(held.length)?);
                }
                kernel.head = end_position;
            }
            start_position = end_position;
        }
        Ok(())
    }

    fn complete(&self) -> bool {
        self.local_fin
            && self.acked > self.read_total
            && self.remote_fin
            && self.ack_sent >= self.received
    }
}

/// A chunk read from the local socket and not yet acknowledged.
struct Held {
    /// Its bytes; `None` once sent while the local socket's receive queue
    /// keeps them.
    bytes: Option<Bytes>,
    length: usize,
}

/// The local socket's receive queue, when it keeps what the session read.
struct KernelQueue {
    /// Most bytes the queue is asked to keep; past it, the oldest are taken
    /// into memory.
    limit: usize,
    /// Position in the stream of the queue's first byte.
    head: u64,
}

/// What [`Ledger::data_from`] found.
enum Slice {
    Data(Bytes),
    /// The bytes are only in the local socket's queue: take them into
    /// memory first.
    InKernel,
    Nothing,
}

#[cfg(test)]
impl Slice {
    fn data(self) -> Option<Bytes> {
        match self {
            Slice::Data(data) => Some(data),
            Slice::InKernel | Slice::Nothing => None,
        }
    }
}

impl Drop for Ledger {
    /// A session that ends holding data leaves the budget to the others.
    fn drop(&mut self) {
        if self.counted_in_flight {
            SESSIONS_IN_FLIGHT.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// The session's shared state and its wake-ups.
struct Shared {
    ledger: Mutex<Ledger>,
    /// The sender waits here for room, something to ack or to end.
    work: Notify,
    capacity: usize,
    ack_every: u64,
    read_chunk: usize,
}

impl Shared {
    /// Room left in the session's window, and the window; no room once the
    /// local FIN was read. With many sessions holding data, or waiting out
    /// an outage together, each fills its share, not its whole buffer.
    fn read_room(&self, ledger: &Ledger) -> (usize, usize) {
        if ledger.local_fin {
            return (0, 0);
        }
        let mut limit = ledger.window(self.capacity, ledger.sharing());
        if let Some(kernel) = &ledger.kernel {
            // Taking the oldest bytes into memory to read past the queue
            // would copy them twice: the queue's size is the window.
            limit = limit.min(kernel.limit);
        }
        (limit.saturating_sub(ledger.replay_bytes), limit)
    }

    fn ledger(&self) -> std::sync::MutexGuard<'_, Ledger> {
        // A panic while holding the lock would already have ended the task.
        self.ledger
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// How one carrier stopped.
enum CarrierEnd {
    Lost(String),
    Completed,
    PeerClosedNormally,
    PeerReset(String),
    LocalFailed(String),
    ProtocolError(String),
}

/// Moves bytes between `tcp` and successive carriers until the session
/// ends. Carriers after the first come from `offers`; each loss is told to
/// `losses` (the service side uses it to start a resume).
pub async fn run_session<L, S>(
    tcp: L,
    first: Carrier<S>,
    options: SessionOptions,
    mut offers: mpsc::Receiver<Offer<S>>,
    losses: Option<mpsc::Sender<Loss>>,
) -> SessionReport
where
    L: LocalConnection,
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let (mut tcp_reader, mut tcp_writer) = tcp.into_halves();
    let capacity = options.replay_buffer.max(1);
    let mut ledger = Ledger::new();
    if let Some(least) = options.kernel_replay_least {
        ledger.kernel = tcp_reader
            .keep_in_kernel(capacity, least)
            .map(|limit| KernelQueue {
                limit: kernel_limit_for_tests(limit),
                head: 0,
            });
    }
    let replay_in_kernel = ledger.kernel.is_some();
    let shared = Shared {
        ledger: Mutex::new(ledger),
        work: Notify::new(),
        capacity,
        ack_every: ACK_EVERY.min((capacity as u64 / 4).max(1)),
        read_chunk: options.read_chunk.max(1),
    };
    let mut resumes = 0u32;
    let mut bytes_replayed = 0u64;
    let mut carrier = Some(first);
    let (end, closing) = {
        'session: loop {
            let Some(Carrier {
                mut websocket,
                peer_received,
                answer_resumed,
            }) = carrier.take()
            else {
                unreachable!("every turn starts with a carrier");
            };
            let attach = {
                let mut ledger = shared.ledger();
                if peer_received < ledger.acked || !ledger.acknowledge(peer_received) {
                    Err(format!(
                        "the peer's count {peer_received} is outside what was sent ({}..={})",
                        ledger.acked,
                        ledger.sequence_end()
                    ))
                } else {
                    if resumes > 0 {
                        let resend = ledger.read_total.saturating_sub(peer_received);
                        bytes_replayed += resend;
                        tracing::info!(
                            received = ledger.received,
                            peer_received,
                            bytes_to_resend = resend,
                            "session resumed on a new stream"
                        );
                    }
                    Ok(ledger.received)
                }
            };
            let received = match attach {
                Ok(received) => received,
                Err(reason) => break 'session (SessionEnd::ProtocolError(reason), None),
            };
            if answer_resumed {
                let answer = Control::Resumed { received }.to_message();
                if let Err(error) = websocket.send(answer).await {
                    // The new carrier failed at once: wait for another.
                    let lost = format!("the new stream failed: {error}");
                    match wait_for_carrier(
                        &mut tcp_reader,
                        &mut offers,
                        losses.as_ref(),
                        &shared,
                        options.resume_timeout,
                        lost,
                    )
                    .await
                    {
                        Ok(next) => {
                            carrier = Some(next);
                            resumes += 1;
                            continue 'session;
                        }
                        Err(end) => break 'session (end, None),
                    }
                }
            }
            {
                let mut ledger = shared.ledger();
                ledger.ack_sent = received;
                // The peer knows our count: nothing is waiting for an ack.
                // A time left from the last carrier would keep the receiver
                // from waking the sender for the next bytes, and with a
                // window below an ack's worth the two would wait on each
                // other.
                ledger.unacked_since = None;
                // A new carrier is a new path: measure it afresh.
                ledger.send_marks.clear();
                ledger.round_trip = None;
            }
            let (mut sink, mut stream) = websocket.split();
            let outcome = {
                let sending = send_loop(
                    &mut sink,
                    &mut tcp_reader,
                    &shared,
                    peer_received,
                    options.ping_interval,
                );
                let receiving =
                    receive_loop(&mut stream, &mut tcp_writer, &shared, options.ping_interval);
                tokio::pin!(sending, receiving);
                // The receiver wakes the sender for acks: kept inside the
                // task, not a trip through the scheduler.
                same_task::absorb(async {
                    tokio::select! {
                        end = &mut sending => Ok(end),
                        end = &mut receiving => Ok(end),
                        offer = offers.recv() => Err(offer),
                    }
                })
                .await
            };
            let carrier_end = match outcome {
                Ok(end) => end,
                Err(Some(Offer::Carrier(next))) => {
                    // A newer stream replaces this one (the other side saw
                    // it break first); its counts were taken just now.
                    tracing::info!("session moved to a new stream");
                    carrier = Some(*next);
                    resumes += 1;
                    continue 'session;
                }
                Err(Some(Offer::GiveUp(reason))) => {
                    let closing = Closing::new(sink, stream, CLOSE_TCP_RESET, &reason);
                    break 'session (SessionEnd::Abandoned(reason), Some(closing));
                }
                Err(None) => {
                    let closing =
                        Closing::new(sink, stream, CLOSE_TCP_RESET, "the session was dropped");
                    let end = SessionEnd::Abandoned("the proxy dropped the session".into());
                    break 'session (end, Some(closing));
                }
            };
            match carrier_end {
                CarrierEnd::Completed => {
                    let closing = Closing::new(sink, stream, CLOSE_NORMAL, "");
                    break 'session (SessionEnd::Completed, Some(closing));
                }
                CarrierEnd::PeerClosedNormally => break 'session (SessionEnd::Completed, None),
                CarrierEnd::PeerReset(reason) => {
                    break 'session (SessionEnd::PeerReset(reason), None)
                }
                CarrierEnd::LocalFailed(reason) => {
                    let closing = Closing::new(
                        sink,
                        stream,
                        CLOSE_TCP_RESET,
                        "the TCP connection on the other end failed",
                    );
                    break 'session (SessionEnd::LocalFailed(reason), Some(closing));
                }
                CarrierEnd::ProtocolError(reason) => {
                    let closing =
                        Closing::new(sink, stream, CLOSE_TCP_RESET, "session protocol error");
                    break 'session (SessionEnd::ProtocolError(reason), Some(closing));
                }
                CarrierEnd::Lost(reason) => {
                    drop((sink, stream));
                    match wait_for_carrier(
                        &mut tcp_reader,
                        &mut offers,
                        losses.as_ref(),
                        &shared,
                        options.resume_timeout,
                        reason,
                    )
                    .await
                    {
                        Ok(next) => {
                            carrier = Some(next);
                            resumes += 1;
                        }
                        Err(end) => break 'session (end, None),
                    }
                }
            }
        }
    };
    let (bytes_sent, bytes_received) = {
        let ledger = shared.ledger();
        let fin = u64::from(ledger.remote_fin);
        (ledger.read_total, ledger.received - fin)
    };
    match &end {
        SessionEnd::Completed => {
            // Normally empty by now (the local FIN was read).
            if let Err(error) = shared.ledger().take_into_memory(&mut tcp_reader) {
                tracing::debug!(%error, "cannot empty the local socket's queue");
            }
            if let Some(closing) = closing {
                closing.finish().await;
            }
            let _ = tcp_writer.shutdown().await;
        }
        _ => {
            // A reset rather than a FIN, so the local client sees an error;
            // first, because the Close handshake may wait on a frozen relay
            // for up to its deadline.
            L::abort(tcp_reader, tcp_writer);
            if let Some(closing) = closing {
                closing.finish().await;
            }
        }
    }
    SessionReport {
        bytes_sent,
        bytes_received,
        resumes,
        bytes_replayed,
        replay_in_kernel,
        end,
    }
}

#[cfg(test)]
thread_local! {
    /// A smaller limit for the local socket's queue, for tests on this
    /// thread that make the session take bytes into memory.
    static KERNEL_LIMIT_CAP: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

#[cfg(test)]
fn kernel_limit_for_tests(limit: usize) -> usize {
    KERNEL_LIMIT_CAP.with(|cap| cap.get().map_or(limit, |cap| cap.min(limit)))
}

#[cfg(not(test))]
fn kernel_limit_for_tests(limit: usize) -> usize {
    limit
}

/// Waits for the next carrier within the resume window, reading the local
/// socket into the replay buffer meanwhile (up to the session's window).
async fn wait_for_carrier<S, R: LocalReader>(
    reader: &mut R,
    offers: &mut mpsc::Receiver<Offer<S>>,
    losses: Option<&mpsc::Sender<Loss>>,
    shared: &Shared,
    resume_timeout: Duration,
    reason: String,
) -> Result<Carrier<S>, SessionEnd> {
    let received = shared.ledger().detach();
    tracing::info!(%reason, received, "session stream lost; waiting to resume");
    if let Some(losses) = losses {
        if losses.try_send(Loss { received, reason }).is_err() {
            return Err(SessionEnd::Abandoned(
                "the proxy is no longer resuming this session".into(),
            ));
        }
    }
    let deadline = Instant::now() + resume_timeout;
    let local = read_local(reader, shared);
    tokio::pin!(local);
    tokio::select! {
        offer = offers.recv() => match offer {
            Some(Offer::Carrier(next)) => Ok(*next),
            Some(Offer::GiveUp(reason)) => Err(SessionEnd::Abandoned(reason)),
            None => Err(SessionEnd::Abandoned("the proxy dropped the session".into())),
        },
        failed = &mut local => Err(SessionEnd::LocalFailed(failed.to_string())),
        _ = tokio::time::sleep_until(deadline) => Err(SessionEnd::Expired(resume_timeout)),
    }
}

/// The Close still owed on the carrier a session ended with: our code, then
/// the relay's answer ([`crate::pump::close_handshake`] says why the answer
/// is awaited). Kept apart from the end itself so that the local connection
/// can be reset before the wait.
struct Closing<S> {
    sink: SplitSink<WebSocketStream<S>, Message>,
    stream: SplitStream<WebSocketStream<S>>,
    message: Message,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Closing<S> {
    fn new(
        sink: SplitSink<WebSocketStream<S>, Message>,
        stream: SplitStream<WebSocketStream<S>>,
        code: u16,
        reason: &str,
    ) -> Self {
        Self {
            sink,
            stream,
            message: close_message(code, reason),
        }
    }

    /// Sends the Close and waits (bounded) for the relay's answer.
    async fn finish(mut self) {
        crate::pump::close_handshake(&mut self.sink, &mut self.stream, self.message).await;
    }
}

/// Reads the local socket into the replay buffer while no carrier is
/// attached, up to the session's window; returns only when the socket
/// fails. It is dropped when a carrier comes (a read is cancel-safe): while
/// one is attached, [`send_loop`] reads.
async fn read_local<R: LocalReader>(reader: &mut R, shared: &Shared) -> io::Error {
    loop {
        let (room, _) = shared.read_room(&shared.ledger());
        if room == 0 {
            // Nothing frees room before a carrier comes.
            std::future::pending::<()>().await;
        }
        if let Err(error) = read_into_ledger(reader, shared, room).await {
            return error;
        }
    }
}

/// Reads one chunk of at most `room` bytes (and at most a read chunk) into
/// the replay buffer, or the local FIN. Cancel-safe, as the read is: nothing
/// is awaited after it.
async fn read_into_ledger<R: LocalReader>(
    reader: &mut R,
    shared: &Shared,
    room: usize,
) -> io::Result<()> {
    let size = shared.read_chunk.min(room).max(1);
    shared.ledger().release_acknowledged(reader)?;
    let take_buffer = |size| shared.ledger().read_buffer(size);
    let chunk = reader.read_chunk(size, take_buffer).await?;
    let mut ledger = shared.ledger();
    if chunk.is_empty() {
        ledger.local_fin = true;
        // Nothing is read from here on: empty the queue, so that closing
        // the socket sends a FIN, not the reset unread bytes would cause.
        ledger.take_into_memory(reader)?;
    } else {
        ledger.hold(chunk);
    }
    Ok(())
}

/// What the sender does next.
enum Step {
    Data(Bytes),
    /// Take what the local socket's queue keeps into memory, to send again.
    TakeIntoMemory,
    Fin,
    Ack(u64),
    Complete,
    /// Nothing to send: wait for the local socket (when `read_room` is not
    /// zero), an ack, or `wake_at`.
    Idle {
        wake_at: Option<Instant>,
        read_room: usize,
    },
}

/// Sends data from `next` on, the FIN, acks and pings on one carrier, and
/// reads the local socket into the replay buffer whenever it has nothing
/// else to send.
///
/// One loop reads and sends, as the plain pump does: a chunk read is sent
/// in the same pass, from memory just written. A reader of its own, handing
/// chunks over through a wake-up, cost the sending proxy a second pass of
/// the whole session's futures for every chunk (issue 11).
async fn send_loop<S, R>(
    sink: &mut SplitSink<WebSocketStream<S>, Message>,
    reader: &mut R,
    shared: &Shared,
    mut next: u64,
    ping_interval: Option<Duration>,
) -> CarrierEnd
where
    S: AsyncRead + AsyncWrite + Unpin,
    R: LocalReader,
{
    // Two timers for the whole carrier, moved rather than made anew each
    // time the sender goes idle (once per message in a bulk transfer).
    let far_future = Instant::now() + Duration::from_secs(86_400 * 365);
    let ping_timer = tokio::time::sleep_until(
        ping_interval.map_or(far_future, |interval| Instant::now() + interval),
    );
    let wake_timer = tokio::time::sleep_until(far_future);
    tokio::pin!(ping_timer, wake_timer);
    let lost = |error: tokio_tungstenite::tungstenite::Error| CarrierEnd::Lost(error.to_string());
    loop {
        let step = {
            let mut ledger = shared.ledger();
            let ack_due = ledger.received > ledger.ack_sent
                && (ledger.received - ledger.ack_sent >= shared.ack_every
                    || ledger.remote_fin
                    || ledger
                        .unacked_since
                        .is_some_and(|since| since + ACK_DELAY <= Instant::now()));
            if ack_due {
                Step::Ack(ledger.received)
            } else if let Some(step) = match ledger.data_from(next, DEFAULT_READ_CHUNK) {
                Slice::Data(data) => {
                    let sent = next + data.len() as u64;
                    ledger.mark_sent(sent, Instant::now());
                    Some(Step::Data(data))
                }
                // Sent before, on a carrier since lost.
                Slice::InKernel => Some(Step::TakeIntoMemory),
                Slice::Nothing => None,
            } {
                step
            } else if ledger.local_fin && next == ledger.read_total {
                Step::Fin
            } else if ledger.complete() {
                Step::Complete
            } else {
                let ack_at = (ledger.received > ledger.ack_sent)
                    .then(|| ledger.unacked_since.map(|since| since + ACK_DELAY))
                    .flatten();
                let spare_expiry = ledger.expire_spares(Instant::now());
                let (room, limit) = shared.read_room(&ledger);
                // Wait for room for a whole read rather than read the sliver
                // an ack freed: slivers became a stream of small messages
                // under bulk load.
                let read_room = if room < shared.read_chunk.min(limit) {
                    0
                } else {
                    room
                };
                Step::Idle {
                    wake_at: earliest(ack_at, spare_expiry),
                    read_room,
                }
            }
        };
        match step {
            Step::Ack(received) => {
                {
                    let mut ledger = shared.ledger();
                    ledger.ack_sent = received;
                    ledger.unacked_since = None;
                }
                if let Err(error) = sink.send(Control::Ack { received }.to_message()).await {
                    return lost(error);
                }
            }
            Step::Data(data) => {
                next += data.len() as u64;
                if let Err(error) = sink.send(Message::Binary(data)).await {
                    return lost(error);
                }
            }
            Step::Fin => {
                next += 1;
                if let Err(error) = sink.send(Message::Binary(Bytes::new())).await {
                    return lost(error);
                }
            }
            Step::TakeIntoMemory => {
                if let Err(error) = shared.ledger().take_into_memory(reader) {
                    return CarrierEnd::LocalFailed(error.to_string());
                }
            }
            Step::Complete => return CarrierEnd::Completed,
            Step::Idle { wake_at, read_room } => {
                if let Some(wake_at) = wake_at {
                    if wake_timer.deadline() != wake_at {
                        wake_timer.as_mut().reset(wake_at);
                    }
                }
                tokio::select! {
                    read = read_into_ledger(reader, shared, read_room), if read_room > 0 => {
                        if let Err(error) = read {
                            return CarrierEnd::LocalFailed(error.to_string());
                        }
                    }
                    _ = shared.work.notified() => {}
                    () = &mut wake_timer, if wake_at.is_some() => {}
                    () = &mut ping_timer, if ping_interval.is_some() => {
                        if let Err(error) = sink.send(Message::Ping(Bytes::new())).await {
                            return lost(error);
                        }
                        let interval = ping_interval.unwrap_or_default();
                        ping_timer.as_mut().reset(Instant::now() + interval);
                    }
                }
            }
        }
    }
}

/// The earlier of two optional deadlines.
fn earliest(first: Option<Instant>, second: Option<Instant>) -> Option<Instant> {
    match (first, second) {
        (Some(first), Some(second)) => Some(first.min(second)),
        (first, second) => first.or(second),
    }
}

/// Reads one carrier: data to the local socket, acks into the ledger.
///
/// Acks share the carrier with data, so the carrier is read on while a
/// write to the local socket waits, into a queue that holds what the peer
/// may have unacknowledged (its window, at most one replay buffer). Were the
/// carrier read only between local writes, an application that answers
/// what it is sent (an echo, a shell, a database) could close a circle: its
/// socket full because our sender stopped reading it, our sender waiting
/// for an ack that sits behind data in the carrier, that data waiting for
/// room in the application's socket. Each side would wait for good.
///
/// With pings on, a relay that sends nothing (not even a pong) for
/// [`SILENT_INTERVALS`] ping intervals has lost the carrier; the time the
/// queue is full and the carrier is not read does not count.
async fn receive_loop<W, S>(
    stream: &mut SplitStream<WebSocketStream<S>>,
    writer: &mut W,
    shared: &Shared,
    ping_interval: Option<Duration>,
) -> CarrierEnd
where
    W: AsyncWrite + Unpin,
    S: AsyncRead + AsyncWrite + Unpin,
{
    let silence_limit = ping_interval.map(|interval| interval * SILENT_INTERVALS);
    // One timer for the whole carrier, moved only when it fires early: a
    // timeout per message would register and cancel a timer for each.
    let mut last_heard = Instant::now();
    let silence = tokio::time::sleep(silence_limit.unwrap_or(Duration::MAX / 4));
    tokio::pin!(silence);
    let mut queue = Incoming::new(shared.capacity.saturating_add(DEFAULT_READ_CHUNK));
    loop {
        let front = queue.front();
        let next = tokio::select! {
            written = write_some(writer, front.as_ref()), if front.is_some() => {
                let was_full = queue.full();
                let end = match written {
                    Ok(Written::Data(count)) => {
                        queue.consume(count);
                        shared.count_written(count);
                        None
                    }
                    Ok(Written::Fin) => {
                        queue.consume(0);
                        shared.count_fin();
                        None
                    }
                    Err(end) => Some(end),
                };
                if let Some(end) = end {
                    return end;
                }
                if was_full && !queue.full() {
                    // Listening again: the silence counts from now.
                    last_heard = Instant::now();
                }
                continue;
            }
            next = stream.next(), if !queue.full() => next,
            () = &mut silence, if silence_limit.is_some() && !queue.full() => {
                let limit = silence_limit.unwrap_or_default();
                let deadline = last_heard + limit;
                if Instant::now() >= deadline {
                    return CarrierEnd::Lost(format!(
                        "the relay sent nothing for {limit:?} ({SILENT_INTERVALS} ping intervals)"
                    ));
                }
                silence.as_mut().reset(deadline);
                continue;
            }
        };
        last_heard = Instant::now();
        let data = match next {
            None => return CarrierEnd::Lost("the relay connection ended without a Close".into()),
            Some(Err(error)) => return CarrierEnd::Lost(error.to_string()),
            Some(Ok(Message::Close(frame))) => {
                let (code, reason) = frame
                    .map(|frame| (u16::from(frame.code), frame.reason.to_string()))
                    .unwrap_or((CLOSE_NORMAL, String::new()));
                return match code {
                    // The peer ends normally only once it has our acks for
                    // all it sent: nothing is queued.
                    CLOSE_NORMAL => CarrierEnd::PeerClosedNormally,
                    CLOSE_TCP_RESET => CarrierEnd::PeerReset(reason),
                    // 4012 (move), 1001, 1011 and anything else: the carrier
                    // is gone, the session is not. What is queued and not
                    // written is not acknowledged: the peer sends it again.
                    code => {
                        CarrierEnd::Lost(format!("the stream was closed with code {code} {reason}"))
                    }
                };
            }
            Some(Ok(Message::Binary(data))) => data,
            Some(Ok(Message::Text(text))) => {
                match Control::parse(text.as_str()) {
                    Ok(Control::Ack { received }) => {
                        let valid = {
                            let mut ledger = shared.ledger();
                            ledger.sample_round_trip(received, Instant::now());
                            ledger.acknowledge(received)
                        };
                        if !valid {
                            return CarrierEnd::ProtocolError(format!(
                                "the peer acknowledged {received} bytes, more than were sent"
                            ));
                        }
                        shared.work.notify_one();
                    }
                    Ok(other) => tracing::debug!(?other, "ignoring a control message mid-stream"),
                    Err(error) => return CarrierEnd::ProtocolError(error.to_string()),
                }
                continue;
            }
            Some(Ok(_)) => continue,
        };
        if queue.fin_queued || shared.ledger().remote_fin {
            return CarrierEnd::ProtocolError(if data.is_empty() {
                "a second FIN from the peer".into()
            } else {
                "data after the peer's FIN".into()
            });
        }
        queue.push(data);
    }
}

/// Messages read from the carrier and not yet written to the local socket.
struct Incoming {
    /// Data in order; an empty one is the peer's FIN.
    messages: VecDeque<Bytes>,
    bytes: usize,
    /// Past this many bytes the carrier is not read: more than a peer with
    /// our replay buffer can have unacknowledged, which only a peer with a
    /// larger one, or a broken one, sends.
    bound: usize,
    fin_queued: bool,
}

impl Incoming {
    fn new(bound: usize) -> Self {
        Self {
            messages: VecDeque::new(),
            bytes: 0,
            bound,
            fin_queued: false,
        }
    }

    fn full(&self) -> bool {
        self.bytes >= self.bound
    }

    /// The next message to write (a cheap handle, so the write does not
    /// borrow the queue).
    fn front(&self) -> Option<Bytes> {
        self.messages.front().cloned()
    }

    fn push(&mut self, data: Bytes) {
        self.fin_queued |= data.is_empty();
        // The FIN counts as a byte, as in the session's counts.
        self.bytes += data.len().max(1);
        self.messages.push_back(data);
    }

    /// Drops `count` written bytes from the front (0 for the FIN).
    fn consume(&mut self, count: usize) {
        let Some(front) = self.messages.front_mut() else {
            return;
        };
        if front.is_empty() || count >= front.len() {
            self.bytes -= front.len().max(1);
            self.messages.pop_front();
        } else {
            *front = front.slice(count..);
            self.bytes -= count;
        }
    }
}

/// What [`write_some`] did.
enum Written {
    Data(usize),
    Fin,
}

/// Writes some of `message` to the local socket, or shuts its writing half
/// for the peer's FIN. Cancel-safe for sockets: a write that has not
/// completed has written nothing.
async fn write_some<W: AsyncWrite + Unpin>(
    writer: &mut W,
    message: Option<&Bytes>,
) -> Result<Written, CarrierEnd> {
    let Some(message) = message else {
        return Err(CarrierEnd::ProtocolError("nothing to write".into()));
    };
    if message.is_empty() {
        return match writer.shutdown().await {
            Ok(()) => Ok(Written::Fin),
            Err(error) => Err(CarrierEnd::LocalFailed(error.to_string())),
        };
    }
    match writer.write(message).await {
        Ok(0) => Err(CarrierEnd::LocalFailed(
            "the local connection took no more bytes".into(),
        )),
        Ok(count) => Ok(Written::Data(count)),
        Err(error) => Err(CarrierEnd::LocalFailed(error.to_string())),
    }
}

impl Shared {
    /// Counts bytes written to the local socket, which the next ack reports.
    /// Counted write by write, so a carrier dropped mid-message (a newer one
    /// replaced it) leaves an exact count behind.
    fn count_written(&self, count: usize) {
        let mut ledger = self.ledger();
        let first_unacked = ledger.unacked_since.is_none();
        if first_unacked {
            ledger.unacked_since = Some(Instant::now());
        }
        let before = ledger.received - ledger.ack_sent;
        ledger.received += count as u64;
        // Due just now, not for every write after it: the sender acks
        // everything received when it gets to it.
        let due_now =
            before < self.ack_every && ledger.received - ledger.ack_sent >= self.ack_every;
        drop(ledger);
        // Wake the sender for the first unacked byte (to arm its timer) and
        // when an ack falls due at once; not for each message of a bulk
        // transfer.
        if first_unacked || due_now {
            self.work.notify_one();
        }
    }

    /// Counts the peer's FIN, written as a shutdown of the local socket (a
    /// second one is refused before it is queued).
    fn count_fin(&self) {
        let mut ledger = self.ledger();
        ledger.remote_fin = true;
        ledger.received += 1;
        drop(ledger);
        self.work.notify_one();
    }
}

#[cfg(test)]
mod tests {
    //! The ledger's arithmetic on its own, and two whole sessions over
    //! loopback TCP joined by in-memory WebSockets through a forwarder the
    //! test can cut, standing in for the relay.

    use super::*;
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, DuplexStream};
    use tokio::net::{TcpListener, TcpStream};
    use tokio_tungstenite::tungstenite::protocol::Role;

    fn ledger() -> Ledger {
        Ledger::new()
    }

    fn push(ledger: &mut Ledger, data: &'static [u8]) {
        ledger.hold(Bytes::from_static(data));
    }

    #[test]
    fn acknowledged_read_buffers_are_reused_while_data_flows() {
        let mut ledger = ledger();
        for _ in 0..3 {
            let mut buffer = ledger.read_buffer(1024);
            buffer.extend_from_slice(&[7u8; 1000]);
            let chunk = buffer.freeze();
            ledger.read_total += chunk.len() as u64;
            ledger.replay_bytes += chunk.len();
            ledger.replay.push_back(Held {
                length: chunk.len(),
                bytes: Some(chunk),
            });
        }
        // Sent in two pieces, as the sender slices a chunk; the pieces are
        // dropped once written.
        let first = ledger.data_from(0, 400).data().expect("data");
        let rest = ledger.data_from(400, 4096).data().expect("data");
        assert_eq!((first.len(), rest.len()), (400, 600));
        drop((first, rest));
        assert!(ledger.acknowledge(500));
        assert!(
            ledger.spare.is_empty(),
            "the first chunk is half acknowledged"
        );
        assert!(ledger.acknowledge(2000));
        assert_eq!(ledger.spare.len(), 2, "two whole chunks acknowledged");
        let reused = ledger.read_buffer(1024);
        assert!(reused.is_empty() && reused.capacity() >= 1024);
        assert_eq!(ledger.spare.len(), 1);
        assert!(ledger.acknowledge(3000));
        assert_eq!(ledger.spare.len(), 2, "kept a moment after the last ack");
        let emptied = ledger.emptied_at.expect("their expiry is set");
        assert_eq!(
            ledger.expire_spares(emptied + SPARE_LINGER - Duration::from_millis(1)),
            Some(emptied + SPARE_LINGER),
            "still within the linger: look again when it ends"
        );
        assert_eq!(ledger.spare.len(), 2);
        assert_eq!(ledger.expire_spares(emptied + SPARE_LINGER), None);
        assert!(
            ledger.spare.is_empty() && ledger.spare.capacity() == 0,
            "a session gone quiet holds no read buffers"
        );
    }

    /// The send loop's own timer drops the spares in real time: a session
    /// that moved data and then went quiet for longer than the linger holds
    /// none, with no further traffic to trigger it.
    #[tokio::test]
    async fn spare_buffers_are_dropped_after_the_linger_in_a_quiet_session() {
        // Spares are for replay kept in memory; the kernel's queue needs none.
        let options = SessionOptions {
            ping_interval: None,
            kernel_replay_least: None,
            ..SessionOptions::default()
        };
        let (mut application, local) = tcp_pair().await;
        let (websocket, mut peer, forwarder) = carrier_pair().await;
        let (_offers_sender, offers) = mpsc::channel(1);
        SPARES_HELD.with(|held| held.set(0));
        let session = tokio::spawn(run_session(
            local,
            Carrier {
                websocket,
                peer_received: 0,
                answer_resumed: false,
            },
            options,
            offers,
            None,
        ));
        // The peer: read the data, acknowledging as it goes (as a real
        // peer does, or the window would stop the sender).
        let block = pattern(64 * 1024, 3);
        let writer = tokio::spawn(async move {
            for _ in 0..8 {
                application.write_all(&block).await.unwrap();
            }
            application
        });
        let mut received = 0usize;
        while received < 8 * 64 * 1024 {
            if let Some(Ok(Message::Binary(data))) = peer.next().await {
                received += data.len();
                let ack = Control::Ack {
                    received: received as u64,
                };
                peer.send(ack.to_message()).await.unwrap();
            }
        }
        let _application = writer.await.unwrap();
        // Within the linger the spares are kept; past it, gone, with no
        // traffic to trigger it. The session task runs on this test's
        // thread (a current-thread runtime), where the ledger reports.
        tokio::time::sleep(SPARE_LINGER / 2).await;
        assert!(
            SPARES_HELD.with(|held| held.get()) > 0,
            "acknowledged buffers are kept for reuse"
        );
        tokio::time::sleep(SPARE_LINGER).await;
        assert_eq!(
            SPARES_HELD.with(|held| held.get()),
            0,
            "none kept after the linger"
        );
        session.abort();
        forwarder.abort();
    }

    #[test]
    fn the_in_flight_window_follows_the_shortest_ack_round_trip() {
        let capacity = 64 * 1024 * 1024;
        // Sixteen busy sessions: each one's share is below the minimum, so
        // the round trip decides.
        let busy = 16;
        let mut ledger = ledger();
        assert_eq!(
            ledger.window(capacity, busy),
            MIN_WINDOW,
            "nothing measured yet"
        );
        assert_eq!(
            ledger.window(64 * 1024, busy),
            64 * 1024,
            "never above the buffer"
        );
        let start = Instant::now();
        ledger.mark_sent(100, start);
        ledger.mark_sent(200, start + Duration::from_millis(1));
        ledger.mark_sent(300, start + Duration::from_millis(2));
        // An ack of 250 answers the marks up to 200: sent at +1 ms.
        ledger.sample_round_trip(250, start + Duration::from_millis(9));
        assert_eq!(ledger.send_marks.len(), 1);
        let round_trip = ledger.round_trip.expect("a sample").0;
        assert_eq!(round_trip, Duration::from_millis(8));
        // 8 ms at 1 GB/s is 8 MB: a long path gets a large window.
        assert_eq!(ledger.window(capacity, busy), 8_000_000);
        assert_eq!(
            ledger.window(capacity, 1),
            IN_FLIGHT_BUDGET,
            "alone, the whole budget when it is larger"
        );
        // A longer sample does not replace a shorter one soon after...
        ledger.mark_sent(400, start + Duration::from_millis(10));
        ledger.sample_round_trip(400, start + Duration::from_millis(40));
        assert_eq!(ledger.round_trip.expect("kept").0, round_trip);
        // ...but does once the shortest is old: the path changed.
        ledger.mark_sent(500, start + Duration::from_secs(20));
        ledger.sample_round_trip(500, start + Duration::from_secs(21));
        assert_eq!(ledger.round_trip.expect("new").0, Duration::from_secs(1));
        assert_eq!(
            ledger.window(capacity, busy),
            capacity,
            "at most the buffer"
        );
        // Loopback: 100 µs is 100 kB, below the minimum.
        ledger.mark_sent(600, start + Duration::from_secs(22));
        ledger.sample_round_trip(
            600,
            start + Duration::from_secs(22) + Duration::from_micros(100),
        );
        assert_eq!(ledger.window(capacity, busy), MIN_WINDOW);
        // An ack that answers no mark takes no sample.
        ledger.sample_round_trip(600, start + Duration::from_secs(30));
        assert_eq!(
            ledger.round_trip.expect("kept").0,
            Duration::from_micros(100)
        );
        for position in 0..(MAX_SEND_MARKS as u64 + 10) {
            ledger.mark_sent(1000 + position, start);
        }
        assert_eq!(ledger.send_marks.len(), MAX_SEND_MARKS, "bounded");
    }

    #[test]
    fn a_detached_session_reads_only_its_share_of_the_budget() {
        let capacity = 64 * 1024 * 1024;
        let busy = 8;
        let mut ledger = ledger();
        ledger.received = 1234;
        let start = Instant::now();
        ledger.mark_sent(100, start);
        // A 40 ms round trip, as eight bulk streams on a busy host measure.
        ledger.sample_round_trip(100, start + Duration::from_millis(40));
        assert_eq!(ledger.window(capacity, busy), 40_000_000);
        ledger.mark_sent(200, start);
        assert_eq!(ledger.detach(), 1234);
        assert!(
            ledger.send_marks.is_empty(),
            "no sample from a lost carrier"
        );
        assert_eq!(
            ledger.window(capacity, busy),
            MIN_WINDOW,
            "the share of the budget, not the old path's window"
        );
        assert_eq!(ledger.window(capacity, 1), IN_FLIGHT_BUDGET);
    }

    #[test]
    fn sessions_holding_data_share_the_in_flight_budget() {
        let capacity = 64 * 1024 * 1024;
        let alone = ledger();
        assert_eq!(alone.window(capacity, 1), IN_FLIGHT_BUDGET);
        assert_eq!(alone.window(capacity, 2), IN_FLIGHT_BUDGET / 2);
        assert_eq!(
            alone.window(capacity, 8),
            MIN_WINDOW,
            "never below the minimum"
        );
        assert_eq!(
            alone.window(2 * 1024 * 1024, 1),
            2 * 1024 * 1024,
            "nor above the replay buffer"
        );

        // Other tests run sessions at the same time, so only what this one
        // adds is certain.
        let mut first = ledger();
        let second = ledger();
        assert!(!first.counted_in_flight);
        push(&mut first, b"unacknowledged");
        assert!(first.counted_in_flight, "holding data, it takes a share");
        assert!(second.sharing() >= 2, "the other one sees it");
        assert!(first.acknowledge(10));
        assert!(first.counted_in_flight, "four bytes still held");
        assert!(first.acknowledge(14));
        assert!(!first.counted_in_flight, "all acknowledged: it leaves");
    }

    #[test]
    fn acks_free_the_replay_buffer_and_data_is_found_by_offset() {
        let mut ledger = ledger();
        push(&mut ledger, b"hello ");
        push(&mut ledger, b"world");
        assert_eq!(
            ledger.data_from(3, 100).data().as_deref(),
            Some(&b"lo "[..])
        );
        assert_eq!(ledger.data_from(6, 2).data().as_deref(), Some(&b"wo"[..]));
        assert!(ledger.acknowledge(8));
        assert_eq!(ledger.acked, 8);
        assert_eq!(ledger.replay_bytes, 3);
        assert_eq!(
            ledger.data_from(8, 100).data().as_deref(),
            Some(&b"rld"[..])
        );
        assert_eq!(
            ledger.data_from(7, 100).data(),
            None,
            "acknowledged bytes are gone"
        );
        assert!(!ledger.acknowledge(12), "beyond what was sent");
        ledger.local_fin = true;
        assert!(ledger.acknowledge(12), "the FIN takes one position");
        assert_eq!(ledger.replay_bytes, 0);
        assert!(!ledger.complete(), "the peer's FIN has not come");
        ledger.remote_fin = true;
        ledger.received = 1;
        assert!(!ledger.complete(), "its FIN is not acknowledged yet");
        ledger.ack_sent = 1;
        assert!(ledger.complete());

        // Found from the newest chunk back, whatever the oldest was cut to.
        let mut cut = Ledger::new();
        push(&mut cut, b"abc");
        push(&mut cut, b"def");
        push(&mut cut, b"ghi");
        assert!(cut.acknowledge(2));
        assert_eq!(
            cut.data_from(2, 100).data().as_deref(),
            Some(&b"c"[..]),
            "the rest of a partly acknowledged chunk"
        );
        assert_eq!(cut.data_from(4, 100).data().as_deref(), Some(&b"ef"[..]));
        assert_eq!(cut.data_from(8, 100).data().as_deref(), Some(&b"i"[..]));
        assert_eq!(cut.data_from(9, 100).data(), None, "nothing read there yet");
    }

    #[test]
    fn only_the_secret_makes_a_proof() {
        let keys = SessionKeys::generate();
        let Control::Resume { nonce, proof, .. } = keys.resume(7) else {
            panic!("a resume")
        };
        assert!(keys.check(&nonce, &proof));
        assert!(!keys.check("other nonce", &proof));
        assert!(!keys.check(&nonce, "00"));
        let Control::Hello { session, secret } = keys.hello() else {
            panic!("a hello")
        };
        let copy = SessionKeys::from_hello(&session, &secret).expect("valid hello");
        assert!(copy.check(&nonce, &proof));
        assert!(!SessionKeys::generate().check(&nonce, &proof));
        assert!(
            !format!("{keys:?}").contains(&secret),
            "Debug hides the secret"
        );
    }

    #[test]
    fn control_messages_round_trip_and_garbage_is_an_error() {
        let ack = Control::Ack { received: 42 };
        let Message::Text(text) = ack.to_message() else {
            panic!("text")
        };
        assert_eq!(Control::parse(text.as_str()).unwrap(), ack);
        assert!(Control::parse("{\"type\":\"nonsense\"}").is_err());
        assert!(Control::parse(&"x".repeat(5000)).is_err());
    }

    type Pipe = WebSocketStream<DuplexStream>;

    /// Two WebSocket ends joined through a byte forwarder task; aborting
    /// the task cuts both like a vanished relay.
    async fn carrier_pair() -> (Pipe, Pipe, tokio::task::JoinHandle<()>) {
        let (a, mut a_relay) = tokio::io::duplex(64 * 1024);
        let (b, mut b_relay) = tokio::io::duplex(64 * 1024);
        let forwarder = tokio::spawn(async move {
            let _ = tokio::io::copy_bidirectional(&mut a_relay, &mut b_relay).await;
        });
        let a = WebSocketStream::from_raw_socket(a, Role::Client, None).await;
        let b = WebSocketStream::from_raw_socket(b, Role::Server, None).await;
        (a, b, forwarder)
    }

    /// Runs a session on its first carrier, with no resumer behind it.
    fn start_session(
        tcp: TcpStream,
        websocket: Pipe,
        options: SessionOptions,
        offers: mpsc::Receiver<Offer<DuplexStream>>,
    ) -> tokio::task::JoinHandle<SessionReport> {
        let first = Carrier {
            websocket,
            peer_received: 0,
            answer_resumed: false,
        };
        tokio::spawn(run_session(tcp, first, options, offers, None))
    }

    /// Whether this kernel lets TCP sockets peek at an offset (Linux 6.9
    /// added `SO_PEEK_OFF` for TCP): read from its release, not by trying,
    /// so that a broken [`crate::kernel_replay::enable`] fails the tests.
    fn kernel_peeks_tcp_at_an_offset() -> bool {
        let Ok(release) = std::fs::read_to_string("/proc/sys/kernel/osrelease") else {
            return false;
        };
        let mut numbers = release
            .trim()
            .split(|character: char| !character.is_ascii_digit())
            .map(|number| number.parse::<u32>().unwrap_or(0));
        let major = numbers.next().unwrap_or(0);
        let minor = numbers.next().unwrap_or(0);
        (major, minor) >= (6, 9)
    }

    async fn tcp_pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let (application, accepted) = tokio::join!(TcpStream::connect(address), listener.accept());
        (application.unwrap(), accepted.unwrap().0)
    }

    fn pattern(size: usize, seed: u8) -> Vec<u8> {
        (0..size)
            .map(|index| (index as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    /// Writes `data` then FIN, and reads everything until FIN, counting
    /// what it has read in `progress`.
    async fn exchange(
        mut application: TcpStream,
        data: Vec<u8>,
        progress: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    ) -> Vec<u8> {
        let (mut reader, mut writer) = application.split();
        let write = async {
            writer.write_all(&data).await.unwrap();
            writer.shutdown().await.unwrap();
        };
        let read = async {
            let mut received = Vec::new();
            let mut buffer = vec![0u8; 16 * 1024];
            loop {
                let count = reader.read(&mut buffer).await.unwrap();
                if count == 0 {
                    break received;
                }
                received.extend_from_slice(&buffer[..count]);
                progress.store(received.len(), std::sync::atomic::Ordering::Relaxed);
            }
        };
        let ((), received) = tokio::join!(write, read);
        received
    }

    #[tokio::test]
    async fn bytes_cross_a_cut_carrier_once_and_in_order_and_the_session_ends_cleanly() {
        cut_carrier_mid_transfer(None, None, true).await;
    }

    /// The same with the local sockets' receive queues keeping the replay,
    /// as they do by default on Linux 6.9 and later.
    #[tokio::test]
    async fn bytes_cross_a_cut_carrier_once_and_in_order_with_the_replay_in_the_kernel() {
        cut_carrier_mid_transfer(Some(1), None, true).await;
    }

    /// And with queues smaller than the replay buffer: they are the window.
    #[tokio::test]
    async fn bytes_cross_a_cut_carrier_when_the_kernel_keeps_less_than_the_replay_buffer() {
        cut_carrier_mid_transfer(Some(1), Some(160 * 1024), true).await;
    }

    /// A window smaller than an ack's worth (64 KiB here) is acknowledged on
    /// the ack timer. After a resume the receiver once failed to wake the
    /// sender for that timer (a time left from the lost carrier), and both
    /// sides waited for each other for good. Acks that slow leave nothing
    /// in flight at the cut most of the time, so nothing to send again.
    #[tokio::test]
    async fn a_window_below_an_acks_worth_keeps_moving_after_a_resume() {
        cut_carrier_mid_transfer(Some(1), Some(40 * 1024), false).await;
    }

    /// An application that answers what it is sent (here an echo) behind
    /// small replay buffers: the device side's window fills while its
    /// application's socket is full, and the ack that would free the window
    /// comes behind data in the carrier. The receiver once read the carrier
    /// only between local writes, and both sides waited for good.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_echo_behind_small_replay_buffers_keeps_moving() {
        let options = SessionOptions {
            replay_buffer: 64 * 1024,
            resume_timeout: Duration::from_secs(20),
            ping_interval: None,
            read_chunk: DEFAULT_READ_CHUNK,
            kernel_replay_least: None,
        };
        let (service_application, service_tcp) = tcp_pair().await;
        let (device_application, device_tcp) = tcp_pair().await;
        let (service_ws, device_ws, _forwarder) = carrier_pair().await;
        // Small socket buffers between the device side and its application,
        // so that the echo's path fills within an ack's delay.
        for socket in [&device_tcp, &device_application] {
            let socket = socket2::SockRef::from(socket);
            socket.set_recv_buffer_size(64 * 1024).unwrap();
            socket.set_send_buffer_size(64 * 1024).unwrap();
        }
        let (_service_offers, service_offers_received) = mpsc::channel(1);
        let (_device_offers, device_offers_received) = mpsc::channel(1);
        for (tcp, websocket, offers) in [
            (service_tcp, service_ws, service_offers_received),
            (device_tcp, device_ws, device_offers_received),
        ] {
            let carrier = Carrier {
                websocket,
                peer_received: 0,
                answer_resumed: false,
            };
            tokio::spawn(run_session(tcp, carrier, options, offers, None));
        }
        let echo = tokio::spawn(async move {
            let (mut reader, mut writer) = device_application.into_split();
            tokio::io::copy(&mut reader, &mut writer).await
        });
        let data = pattern(8 * 1024 * 1024, 3);
        let (mut reader, mut writer) = service_application.into_split();
        let sent = data.clone();
        let writing = tokio::spawn(async move { writer.write_all(&sent).await.map(|()| writer) });
        let mut echoed = vec![0u8; data.len()];
        let mut got = 0;
        while got < echoed.len() {
            match tokio::time::timeout(Duration::from_secs(10), reader.read(&mut echoed[got..]))
                .await
            {
                Ok(Ok(count)) if count > 0 => got += count,
                other => panic!(
                    "the echo stopped at {got} of {} bytes: {other:?}",
                    echoed.len()
                ),
            }
        }
        assert!(echoed == data, "the echo differs");
        drop(writing.await.unwrap().unwrap());
        echo.abort();
    }

    /// A receiver whose application takes nothing, facing a peer with a
    /// larger replay buffer, fills its queue and stops reading the carrier
    /// (pings included) on purpose. That pause is not the relay's silence:
    /// held for more than three ping intervals, the carrier must survive it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_receive_queue_outlives_three_ping_intervals_without_losing_the_carrier() {
        let ping_interval = Duration::from_millis(100);
        let small = SessionOptions {
            replay_buffer: 64 * 1024,
            resume_timeout: Duration::from_secs(20),
            ping_interval: Some(ping_interval),
            read_chunk: DEFAULT_READ_CHUNK,
            kernel_replay_least: None,
        };
        let large = SessionOptions {
            replay_buffer: 4 * 1024 * 1024,
            ..small
        };
        let (service_application, service_tcp) = tcp_pair().await;
        let (device_application, device_tcp) = tcp_pair().await;
        // Small socket buffers, so the device side's local writes stop early.
        for socket in [&device_tcp, &device_application] {
            let socket = socket2::SockRef::from(socket);
            socket.set_recv_buffer_size(16 * 1024).unwrap();
            socket.set_send_buffer_size(16 * 1024).unwrap();
        }
        let (service_ws, device_ws, _forwarder) = carrier_pair().await;
        let (_service_offers, service_offers_received) = mpsc::channel(1);
        let (_device_offers, device_offers_received) = mpsc::channel(1);
        let (losses, mut losses_received) = mpsc::channel(4);
        let carrier = |websocket| Carrier {
            websocket,
            peer_received: 0,
            answer_resumed: false,
        };
        tokio::spawn(run_session(
            service_tcp,
            carrier(service_ws),
            large,
            service_offers_received,
            Some(losses.clone()),
        ));
        tokio::spawn(run_session(
            device_tcp,
            carrier(device_ws),
            small,
            device_offers_received,
            Some(losses),
        ));
        let data = pattern(3 * 1024 * 1024, 5);
        let sent = data.clone();
        let (_service_reader, mut service_writer) = service_application.into_split();
        tokio::spawn(async move {
            service_writer
                .write_all(&sent)
                .await
                .map(|()| service_writer)
        });
        // Ten ping intervals with the device's application taking nothing.
        tokio::time::sleep(ping_interval * 10).await;
        assert!(
            losses_received.try_recv().is_err(),
            "a carrier was declared lost while the receive queue was full"
        );
        let mut device_application = device_application;
        let mut received = vec![0u8; data.len()];
        tokio::time::timeout(
            Duration::from_secs(30),
            device_application.read_exact(&mut received),
        )
        .await
        .expect("everything arrives once the application reads")
        .expect("read");
        assert!(received == data, "the bytes differ");
        assert!(
            losses_received.try_recv().is_err(),
            "a carrier was declared lost after the application read again"
        );
    }

    async fn cut_carrier_mid_transfer(
        kernel_replay_least: Option<usize>,
        kernel_cap: Option<usize>,
        expect_replay: bool,
    ) {
        KERNEL_LIMIT_CAP.with(|cap| cap.set(kernel_cap));
        let options = SessionOptions {
            replay_buffer: 256 * 1024,
            resume_timeout: Duration::from_secs(20),
            ping_interval: None,
            read_chunk: 16 * 1024,
            kernel_replay_least,
        };
        let (service_application, service_tcp) = tcp_pair().await;
        let (device_application, device_tcp) = tcp_pair().await;
        let (service_ws, device_ws, forwarder) = carrier_pair().await;
        let (service_offers, service_offers_received) = mpsc::channel(1);
        let (device_offers, device_offers_received) = mpsc::channel(1);
        let (losses, mut losses_received) = mpsc::channel(1);
        let service = tokio::spawn(run_session(
            service_tcp,
            Carrier {
                websocket: service_ws,
                peer_received: 0,
                answer_resumed: false,
            },
            options,
            service_offers_received,
            Some(losses),
        ));
        let device = tokio::spawn(run_session(
            device_tcp,
            Carrier {
                websocket: device_ws,
                peer_received: 0,
                answer_resumed: false,
            },
            options,
            device_offers_received,
            None,
        ));
        let up = pattern(8 * 1024 * 1024, 1);
        let down = pattern(6 * 1024 * 1024 + 17, 2);
        let device_progress = std::sync::Arc::default();
        let service_progress = std::sync::Arc::<std::sync::atomic::AtomicUsize>::default();
        let service_side = tokio::spawn(exchange(
            service_application,
            up.clone(),
            std::sync::Arc::clone(&service_progress),
        ));
        let device_side = tokio::spawn(exchange(
            device_application,
            down.clone(),
            std::sync::Arc::clone(&device_progress),
        ));
        // Cut the carrier mid-transfer, then resume as the proxies do.
        let started = Instant::now();
        while device_progress.load(std::sync::atomic::Ordering::Relaxed) < 1024 * 1024 {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "stalled before the cut: device {} service {}",
                device_progress.load(std::sync::atomic::Ordering::Relaxed),
                service_progress.load(std::sync::atomic::Ordering::Relaxed)
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        forwarder.abort();
        let loss = tokio::time::timeout(Duration::from_secs(10), losses_received.recv())
            .await
            .expect("the service side notices");
        let Some(loss) = loss else {
            panic!("no loss; the session ended: {:?}", service.await.unwrap());
        };
        let (mut service_ws, device_ws, _forwarder) = carrier_pair().await;
        device_offers
            .send(Offer::Carrier(Box::new(Carrier {
                websocket: device_ws,
                peer_received: loss.received,
                answer_resumed: true,
            })))
            .await
            .unwrap();
        let Ok(Control::Resumed { received }) = read_control(&mut service_ws).await else {
            panic!("the device side answers with its count")
        };
        service_offers
            .send(Offer::Carrier(Box::new(Carrier {
                websocket: service_ws,
                peer_received: received,
                answer_resumed: false,
            })))
            .await
            .unwrap();
        let at_device = match tokio::time::timeout(Duration::from_secs(30), device_side).await {
            Ok(result) => result.unwrap(),
            Err(_) => panic!(
                "device side stuck at {} bytes (service side at {}); service session: {:?}; device session finished: {}",
                device_progress.load(std::sync::atomic::Ordering::Relaxed),
                service_progress.load(std::sync::atomic::Ordering::Relaxed),
                tokio::time::timeout(Duration::from_secs(5), service).await,
                device.is_finished()
            ),
        };
        let at_service = match tokio::time::timeout(Duration::from_secs(30), service_side).await {
            Ok(result) => result.unwrap(),
            Err(_) => panic!(
                "service side stuck at {} bytes; device session: {:?}; service session finished: {}",
                service_progress.load(std::sync::atomic::Ordering::Relaxed),
                tokio::time::timeout(Duration::from_secs(5), device).await,
                service.is_finished()
            ),
        };
        assert!(
            at_device == up,
            "upload intact ({} of {} bytes)",
            at_device.len(),
            up.len()
        );
        assert!(
            at_service == down,
            "download intact ({} of {} bytes)",
            at_service.len(),
            down.len()
        );
        let service_report = match tokio::time::timeout(Duration::from_secs(30), service).await {
            Ok(report) => report.unwrap(),
            Err(_) => panic!(
                "the service session did not end; device session finished: {}",
                device.is_finished()
            ),
        };
        let device_report = tokio::time::timeout(Duration::from_secs(30), device)
            .await
            .expect("the device session ends")
            .unwrap();
        assert_eq!(
            service_report.end,
            SessionEnd::Completed,
            "{service_report:?}"
        );
        assert_eq!(
            device_report.end,
            SessionEnd::Completed,
            "{device_report:?}"
        );
        assert_eq!(service_report.resumes, 1);
        assert_eq!(device_report.bytes_received, up.len() as u64);
        assert!(
            !expect_replay || service_report.bytes_replayed + device_report.bytes_replayed > 0,
            "the cut left bytes to send again"
        );
        let in_kernel = kernel_replay_least.is_some() && kernel_peeks_tcp_at_an_offset();
        assert_eq!(
            (
                service_report.replay_in_kernel,
                device_report.replay_in_kernel
            ),
            (in_kernel, in_kernel),
            "where the replay was kept"
        );
    }

    #[tokio::test]
    async fn a_full_replay_buffer_stops_reading_the_local_socket() {
        full_replay_buffer_stops_reading(None).await;
    }

    #[tokio::test]
    async fn a_full_replay_buffer_in_the_kernel_stops_reading_the_local_socket() {
        full_replay_buffer_stops_reading(Some(1)).await;
    }

    async fn full_replay_buffer_stops_reading(kernel_replay_least: Option<usize>) {
        let replay_buffer = 64 * 1024;
        let options = SessionOptions {
            replay_buffer,
            resume_timeout: Duration::from_secs(20),
            ping_interval: None,
            read_chunk: 16 * 1024,
            kernel_replay_least,
        };
        let (mut application, tcp) = tcp_pair().await;
        // The peer takes every message and never acknowledges one, so only
        // the replay buffer, not a full carrier, can stop the reading.
        let (websocket, mut peer, _forwarder) = carrier_pair().await;
        let delivered = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&delivered);
        let _reader = tokio::spawn(async move {
            while let Some(Ok(message)) = peer.next().await {
                if let Message::Binary(data) = message {
                    counter.fetch_add(data.len(), Ordering::SeqCst);
                }
            }
        });
        let (_offers, offers_received) = mpsc::channel(1);
        let _session = start_session(tcp, websocket, options, offers_received);
        let mut written = 0usize;
        let chunk = vec![7u8; 64 * 1024];
        while tokio::time::timeout(Duration::from_millis(500), application.write_all(&chunk))
            .await
            .is_ok()
        {
            written += chunk.len();
            assert!(
                written < 64 * 1024 * 1024,
                "the session kept reading without acks"
            );
        }
        let sent = delivered.load(Ordering::SeqCst);
        assert!(sent > 0, "data flowed until the buffer filled");
        assert!(
            sent <= replay_buffer,
            "{sent} bytes sent without an ack, more than the {replay_buffer}-byte replay buffer"
        );
        assert!(written > sent, "the rest waits in the socket buffers");
    }

    /// A session that ends in error resets the local connection at once, not
    /// after the Close handshake, which waits up to its deadline on a relay
    /// that never answers (here: a peer that never reads).
    #[tokio::test]
    async fn an_error_end_resets_the_local_connection_before_the_close_handshake() {
        use crate::pump::CLOSE_WRITE_TIMEOUT;
        let reset_within = Duration::from_secs(3);
        assert!(
            reset_within < CLOSE_WRITE_TIMEOUT,
            "else the test cannot fail"
        );
        for case in ["a protocol error", "giving up"] {
            let options = SessionOptions {
                replay_buffer: 64 * 1024,
                resume_timeout: Duration::from_secs(20),
                ping_interval: None,
                read_chunk: 16 * 1024,
                kernel_replay_least: None,
            };
            let (mut application, tcp) = tcp_pair().await;
            let (websocket, mut peer, forwarder) = carrier_pair().await;
            let (offers, offers_received) = mpsc::channel(1);
            let session = start_session(tcp, websocket, options, offers_received);
            if case == "giving up" {
                let offer = Offer::GiveUp("the test gives up".into());
                assert!(offers.send(offer).await.is_ok(), "the session takes offers");
            } else {
                peer.send(Message::Text("not a control message".into()))
                    .await
                    .unwrap();
            }
            let started = std::time::Instant::now();
            let mut buffer = [0u8; 16];
            let read = tokio::time::timeout(reset_within, application.read(&mut buffer)).await;
            assert!(
                matches!(&read, Ok(Err(error)) if error.kind() == io::ErrorKind::ConnectionReset),
                "{case}: the application read {read:?} after {:?}, not a reset within {reset_within:?} \
                 (the Close handshake waits {CLOSE_WRITE_TIMEOUT:?})",
                started.elapsed()
            );
            // The peer goes away, which ends the Close handshake.
            drop(peer);
            let report = session.await.unwrap();
            assert!(
                matches!(
                    report.end,
                    SessionEnd::ProtocolError(_) | SessionEnd::Abandoned(_)
                ),
                "{case}: {:?}",
                report.end
            );
            forwarder.abort();
        }
    }
}
