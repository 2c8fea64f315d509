//! The local end of a stream: the application's byte stream that the pump
//! ([`crate::pump`]) and resumable sessions ([`crate::session`]) carry.
//!
//! Usually it is an accepted or dialed TCP socket; `service-proxy --stdio`
//! carries its standard input and output instead (an ssh ProxyCommand). The
//! data path only needs three things from it, so that is all this trait asks:
//! the two directions apart, a chunk read that is safe to cancel, and a way
//! to end abortively so the application sees an error, not a clean end.
//!
//! TCP waits for readability before it takes a read buffer, so an idle
//! stream holds none, and its abort is a reset (RST). Its read buffers are
//! sized from the last read: a keystroke is read on the stack and leaves as
//! a copy of its own few bytes, while a bulk transfer's reads double up to
//! the caller's limit within a handful of reads.

use std::future::Future;
use std::io;

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, Join};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

/// An application's byte stream, both directions.
pub trait LocalConnection: Send {
    type Reader: LocalReader;
    type Writer: AsyncWrite + Unpin + Send;

    /// Prepares the connection (socket options) and splits it in two.
    fn into_halves(self) -> (Self::Reader, Self::Writer);

    /// Ends the connection abortively, so the application sees an error
    /// rather than a truncated "success".
    fn abort(reader: Self::Reader, writer: Self::Writer);
}

/// The reading direction of a [`LocalConnection`].
pub trait LocalReader: Send {
    /// Waits for input, then reads at most `limit` bytes into a buffer from
    /// `buffer` (asked with the size the reader wants, at most `limit`; it
    /// may be larger); an empty chunk is the end of input. Cancel-safe: when the future is dropped, no byte is
    /// lost.
    /// Leaves what it reads in the kernel's receive queue from now on, until
    /// [`LocalReader::release`] or [`LocalReader::take_kept`] (see
    /// [`crate::kernel_replay`]); returns how many bytes the queue may be
    /// asked to keep, `None` (and nothing changes) when it cannot keep at
    /// least `least` of the `wanted`.
    fn keep_in_kernel(&mut self, wanted: usize, least: usize) -> Option<usize> {
        let _ = (wanted, least);
        None
    }

    /// Drops `count` kept bytes from the head of the queue.
    fn release(&mut self, count: u64) -> io::Result<()> {
        let _ = count;
        Ok(())
    }

    /// Takes `count` kept bytes from the head of the queue into memory.
    fn take_kept(&mut self, count: usize) -> io::Result<Bytes> {
        let _ = count;
        Err(io::Error::other(
            "this local connection keeps no bytes in the kernel",
        ))
    }

    fn read_chunk<F>(
        &mut self,
        limit: usize,
        buffer: F,
    ) -> impl Future<Output = io::Result<Bytes>> + Send
    where
        F: FnMut(usize) -> BytesMut + Send;
}

impl LocalConnection for TcpStream {
    type Reader = TcpReader;
    type Writer = OwnedWriteHalf;

    fn into_halves(self) -> (TcpReader, OwnedWriteHalf) {
        crate::transport::configure_socket(&self);
        let (half, writer) = self.into_split();
        (
            TcpReader {
                half,
                next_size: SMALL_READ,
                kept: false,
            },
            writer,
        )
    }

    fn abort(reader: TcpReader, writer: OwnedWriteHalf) {
        // Dropping a write half sends FIN; reunite first so the socket is
        // reset instead.
        if let Ok(tcp) = reader.half.reunite(writer) {
            let _ = tcp.set_zero_linger();
        }
    }
}

/// Reads of at most this many bytes go through a buffer on the stack and
/// leave as an exact-size copy, so interactive traffic allocates only what
/// it carries. It is also the first read's size.
pub const SMALL_READ: usize = 2 * 1024;

/// The reading half of a TCP connection; remembers how much the last read
/// brought, to size the next one.
pub struct TcpReader {
    half: OwnedReadHalf,
    /// Bytes to ask for next: twice the last read (twice its room when it
    /// filled it), at least [`SMALL_READ`].
    next_size: usize,
    /// Reads peek and leave the bytes queued ([`crate::kernel_replay`]).
    kept: bool,
}

/// The next read's size after a read of `count` bytes into `room`.
fn next_read_size(count: usize, room: usize, limit: usize) -> usize {
    // Smaller asks gain nothing: they are read on the stack anyway.
    let wanted = if count >= room { room } else { count };
    wanted.saturating_mul(2).max(SMALL_READ).min(limit.max(1))
}

impl LocalReader for TcpReader {
    fn keep_in_kernel(&mut self, wanted: usize, least: usize) -> Option<usize> {
        let limit = crate::kernel_replay::enable(self.half.as_ref(), wanted, least)?;
        self.kept = true;
        Some(limit)
    }

    fn release(&mut self, count: u64) -> io::Result<()> {
        crate::kernel_replay::discard(self.half.as_ref(), count)
    }

    fn take_kept(&mut self, count: usize) -> io::Result<Bytes> {
        crate::kernel_replay::take(self.half.as_ref(), count).map(Bytes::from)
    }

    async fn read_chunk<F>(&mut self, limit: usize, mut buffer: F) -> io::Result<Bytes>
    where
        F: FnMut(usize) -> BytesMut + Send,
    {
        let limit = limit.max(1);
        if self.kept {
            return self.peek_chunk(limit).await;
        }
        loop {
            // Wait for data before taking a buffer, so an idle stream holds none.
            self.half.readable().await?;
            let size = self.next_size.min(limit);
            let read = if size <= SMALL_READ {
                let mut small = [0u8; SMALL_READ];
                self.half
                    .try_read(&mut small[..size])
                    .map(|count| (Bytes::copy_from_slice(&small[..count]), size))
            } else {
                let mut buffer = buffer(size);
                // A caller's buffer may be larger (a recycled one): use it.
                let room = limit.min(buffer.capacity() - buffer.len()).max(size);
                self.half
                    .try_read_buf(&mut (&mut buffer).limit(room))
                    .map(|_| (buffer.freeze(), room))
            };
            match read {
                Ok((chunk, room)) => {
                    // A read the caller cut short and that filled its room
                    // says nothing of what the socket holds: keep the wish.
                    let cut_by_caller = size < self.next_size && chunk.len() >= room;
                    if !cut_by_caller {
                        self.next_size = next_read_size(chunk.len(), room, limit);
                    }
                    return Ok(chunk);
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => continue,
                Err(error) => return Err(error),
            }
        }
    }
}

impl TcpReader {
    /// Reads by peeking, into a new buffer: the allocator hands back memory
    /// freed a moment ago, still in the cache, as resume off's reads use.
    async fn peek_chunk(&mut self, limit: usize) -> io::Result<Bytes> {
        loop {
            self.half.readable().await?;
            let size = self.next_size.min(limit);
            let tcp: &TcpStream = self.half.as_ref();
            let peeked = tcp.try_io(tokio::io::Interest::READABLE, || {
                crate::kernel_replay::peek(tcp, size)
            });
            match peeked {
                Ok(buffer) => {
                    self.next_size = next_read_size(buffer.len(), size, limit);
                    return Ok(Bytes::from(buffer));
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => continue,
                Err(error) => return Err(error),
            }
        }
    }
}

/// Any reader and writer joined with [`tokio::io::join`] (standard input
/// and output, pipes): ends by closing both, as nothing better exists.
impl<R, W> LocalConnection for Join<R, W>
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
{
    type Reader = ChunkReader<R>;
    type Writer = W;

    fn into_halves(self) -> (ChunkReader<R>, W) {
        let (reader, writer) = self.into_inner();
        (ChunkReader(reader), writer)
    }

    fn abort(reader: ChunkReader<R>, writer: W) {
        drop((reader, writer));
    }
}

/// Reads any [`AsyncRead`] in chunks; holds a buffer while it waits.
pub struct ChunkReader<R>(pub R);

impl<R: AsyncRead + Unpin + Send> LocalReader for ChunkReader<R> {
    async fn read_chunk<F>(&mut self, limit: usize, mut buffer: F) -> io::Result<Bytes>
    where
        F: FnMut(usize) -> BytesMut + Send,
    {
        let mut buffer = buffer(limit);
        // `read_buf` is cancel-safe: dropped before it completes, it read nothing.
        self.0.read_buf(&mut (&mut buffer).limit(limit)).await?;
        Ok(buffer.freeze())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    #[test]
    fn the_next_read_doubles_after_a_full_one_and_follows_a_short_one() {
        assert_eq!(next_read_size(2048, 2048, 65536), 4096);
        assert_eq!(next_read_size(65536, 65536, 65536), 65536);
        assert_eq!(next_read_size(1, 65536, 65536), SMALL_READ);
        assert_eq!(next_read_size(0, 2048, 65536), SMALL_READ);
        assert_eq!(next_read_size(1, 2048, 100), 100);
        assert_eq!(next_read_size(30000, 65536, 65536), 60000);
    }

    /// One chunk, recording the size of each buffer the reader asks for.
    async fn read_recording(reader: &mut TcpReader, limit: usize, asked: &mut Vec<usize>) -> Bytes {
        reader
            .read_chunk(limit, |size| {
                asked.push(size);
                BytesMut::with_capacity(size)
            })
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn a_keystroke_is_read_small_and_a_burst_grows_the_reads_to_the_limit() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut application = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        let (mut reader, _writer) = accepted.into_halves();
        let limit = 64 * 1024;
        let mut asked = Vec::new();
        application.write_all(b"x").await.unwrap();
        let chunk = read_recording(&mut reader, limit, &mut asked).await;
        assert_eq!(&chunk[..], b"x");
        assert!(asked.is_empty(), "a keystroke takes no buffer: {asked:?}");

        let burst = vec![7u8; 1024 * 1024];
        let writer = tokio::spawn(async move {
            application.write_all(&burst).await.unwrap();
            application
        });
        let mut lengths = Vec::new();
        let mut total = 0;
        while total < 1024 * 1024 {
            let chunk = read_recording(&mut reader, limit, &mut asked).await;
            assert!(!chunk.is_empty() && chunk.len() <= limit);
            total += chunk.len();
            lengths.push(chunk.len());
        }
        let _application = writer.await.unwrap();
        assert!(asked.iter().all(|&size| size <= limit), "{asked:?}");
        assert!(
            lengths.iter().any(|&length| length > 16 * 1024),
            "reads grew under load: {lengths:?}"
        );
    }
}
