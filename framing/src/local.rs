//! The local end of a stream: the application's byte stream that the pump
//! ([`crate::pump`]) and resumable sessions ([`crate::session`]) carry.
//!
//! Usually it is an accepted or dialed TCP socket; `service-proxy --stdio`
//! carries its standard input and output instead (an ssh ProxyCommand). The
//! data path only needs three things from it, so that is all this trait asks:
//! the two directions apart, a chunk read that is safe to cancel, and a way
//! to end abortively so the application sees an error, not a clean end.
//!
//! TCP keeps its exact behaviour: it waits for readability before it takes a
//! read buffer, so an idle stream holds none, and its abort is a reset (RST).

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
    /// `buffer` (asked with `limit`; it may be larger); an empty chunk is the
    /// end of input. Cancel-safe: when the future is dropped, no byte is
    /// lost.
    fn read_chunk<F>(
        &mut self,
        limit: usize,
        buffer: F,
    ) -> impl Future<Output = io::Result<Bytes>> + Send
    where
        F: FnMut(usize) -> BytesMut + Send;
}

impl LocalConnection for TcpStream {
    type Reader = OwnedReadHalf;
    type Writer = OwnedWriteHalf;

    fn into_halves(self) -> (OwnedReadHalf, OwnedWriteHalf) {
        crate::transport::configure_socket(&self);
        self.into_split()
    }

    fn abort(reader: OwnedReadHalf, writer: OwnedWriteHalf) {
        // Dropping a write half sends FIN; reunite first so the socket is
        // reset instead.
        if let Ok(tcp) = reader.reunite(writer) {
            let _ = tcp.set_zero_linger();
        }
    }
}

impl LocalReader for OwnedReadHalf {
    async fn read_chunk<F>(&mut self, limit: usize, mut buffer: F) -> io::Result<Bytes>
    where
        F: FnMut(usize) -> BytesMut + Send,
    {
        loop {
            // Wait for data before taking a buffer, so an idle stream holds none.
            self.readable().await?;
            let mut buffer = buffer(limit);
            match self.try_read_buf(&mut (&mut buffer).limit(limit)) {
                Ok(_) => return Ok(buffer.freeze()),
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
