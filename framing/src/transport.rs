//! "A byte stream to the relay": one type for plain TCP and TLS, client or
//! server side, and the one place where sockets get their options and
//! outbound dials their deadlines.
//!
//! Everything above (REST, MQTT over WebSocket, streaming WebSocket) is built
//! on [`NetworkStream`], so TLS or plain is configuration, not a branch in each
//! client.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::TlsStream;

/// How long dialing (TCP + TLS) may take before it is abandoned.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot reach {address}: {source}; check the host name and port, and that the relay is running")]
    Tcp { address: String, source: io::Error },
    #[error("TLS handshake with {address} failed: {source}; if the relay uses a self-signed certificate pass it with --ca-cert")]
    Tls { address: String, source: io::Error },
    #[error("{address} is not a valid TLS server name")]
    ServerName { address: String },
    #[error("connecting to {address} took longer than {timeout:?}")]
    Timeout { address: String, timeout: Duration },
}

/// A connection to or from the relay, with or without TLS (either role).
pub enum NetworkStream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// Socket options for every devstreams TCP socket: no Nagle delay, because
/// WebSocket writes are whole frames and interactive sessions feel any delay.
pub fn configure_socket(stream: &TcpStream) {
    let _ = stream.set_nodelay(true);
}

/// Dials `host:port`, then TLS when `tls` is given.
pub async fn connect(
    host: &str,
    port: u16,
    tls: Option<&Arc<rustls::ClientConfig>>,
    timeout: Duration,
) -> Result<NetworkStream, ConnectError> {
    let address = format!("{host}:{port}");
    let dial = async {
        let tcp = TcpStream::connect((host, port))
            .await
            .map_err(|source| ConnectError::Tcp {
                address: address.clone(),
                source,
            })?;
        configure_socket(&tcp);
        match tls {
            None => Ok(NetworkStream::Plain(tcp)),
            Some(config) => {
                let server_name = ServerName::try_from(host.to_string()).map_err(|_| {
                    ConnectError::ServerName {
                        address: address.clone(),
                    }
                })?;
                let stream = TlsConnector::from(config.clone())
                    .connect(server_name, tcp)
                    .await
                    .map_err(|source| ConnectError::Tls {
                        address: address.clone(),
                        source,
                    })?;
                Ok(NetworkStream::Tls(Box::new(TlsStream::Client(stream))))
            }
        }
    };
    tokio::time::timeout(timeout, dial)
        .await
        .map_err(|_| ConnectError::Timeout {
            address: address.clone(),
            timeout,
        })?
}

impl AsyncRead for NetworkStream {
    fn poll_read(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buffer: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            NetworkStream::Plain(stream) => Pin::new(stream).poll_read(context, buffer),
            NetworkStream::Tls(stream) => Pin::new(stream.as_mut()).poll_read(context, buffer),
        }
    }
}

impl AsyncWrite for NetworkStream {
    fn poll_write(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            NetworkStream::Plain(stream) => Pin::new(stream).poll_write(context, data),
            NetworkStream::Tls(stream) => Pin::new(stream.as_mut()).poll_write(context, data),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            NetworkStream::Plain(stream) => Pin::new(stream).poll_flush(context),
            NetworkStream::Tls(stream) => Pin::new(stream.as_mut()).poll_flush(context),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            NetworkStream::Plain(stream) => Pin::new(stream).poll_shutdown(context),
            NetworkStream::Tls(stream) => Pin::new(stream.as_mut()).poll_shutdown(context),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buffers: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            NetworkStream::Plain(stream) => Pin::new(stream).poll_write_vectored(context, buffers),
            NetworkStream::Tls(stream) => {
                Pin::new(stream.as_mut()).poll_write_vectored(context, buffers)
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            NetworkStream::Plain(stream) => stream.is_write_vectored(),
            NetworkStream::Tls(stream) => stream.is_write_vectored(),
        }
    }
}
