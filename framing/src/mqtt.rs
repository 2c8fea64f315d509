//! MQTT 3.1.1 packets over a transport, for both ends of the control channel.
//!
//! Packet encoding and decoding come from `rumqttc`'s codec; this module only
//! moves packets. A [`PacketTransport`] is either WebSocket messages (MQTT
//! over WebSocket, where one packet may span messages and one message may
//! hold several packets) or a plain byte stream (MQTT over TLS on 8883).
//! Reading is cancel-safe, so a connection can sit in a `select!` beside
//! timers and outgoing queues with a single owner.

use std::future::Future;
use std::io;

use bytes::{Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
pub use rumqttc::mqttbytes::v4::{
    ConnAck, Connect, ConnectReturnCode, Login, Packet, PubAck, Publish, SubAck, Subscribe,
    SubscribeFilter, SubscribeReasonCode, UnsubAck,
};
pub use rumqttc::mqttbytes::QoS;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// Largest MQTT packet accepted by default: stream requests are < 2 KiB.
pub const DEFAULT_MAX_PACKET_SIZE: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum MqttError {
    #[error("MQTT transport failed: {0}")]
    Io(#[from] io::Error),
    #[error("MQTT packet is malformed or too large: {0}")]
    Packet(rumqttc::mqttbytes::Error),
    #[error("MQTT over WebSocket needs binary messages, got a text message")]
    TextMessage,
}

/// Something MQTT packets can be read from and written to.
pub trait PacketTransport: Send {
    /// Appends received bytes to `buffer`; `Ok(0)` means the peer closed.
    fn read_into(
        &mut self,
        buffer: &mut BytesMut,
    ) -> impl Future<Output = Result<usize, MqttError>> + Send;
    fn write_bytes(&mut self, bytes: Bytes) -> impl Future<Output = Result<(), MqttError>> + Send;
    fn shutdown(&mut self) -> impl Future<Output = ()> + Send;
}

impl<S> PacketTransport for WebSocketStream<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    async fn read_into(&mut self, buffer: &mut BytesMut) -> Result<usize, MqttError> {
        loop {
            match self.next().await {
                None | Some(Ok(Message::Close(_))) => return Ok(0),
                Some(Ok(Message::Binary(data))) if !data.is_empty() => {
                    buffer.extend_from_slice(&data);
                    return Ok(data.len());
                }
                Some(Ok(Message::Text(_))) => return Err(MqttError::TextMessage),
                // Pings are answered by the WebSocket layer itself.
                Some(Ok(_)) => continue,
                Some(Err(error)) => return Err(MqttError::Io(io::Error::other(error))),
            }
        }
    }

    async fn write_bytes(&mut self, bytes: Bytes) -> Result<(), MqttError> {
        self.send(Message::Binary(bytes))
            .await
            .map_err(|error| MqttError::Io(io::Error::other(error)))
    }

    /// Closes with 1001 ("going away"): the peer should come back later,
    /// which is what a draining relay or a departing device means.
    async fn shutdown(&mut self) {
        let _ = self
            .close(Some(crate::pump::close_frame(
                crate::pump::CLOSE_GOING_AWAY,
                "",
            )))
            .await;
    }
}

/// MQTT directly on a byte stream (TLS on 8883).
pub struct ByteTransport<S>(pub S);

impl<S> PacketTransport for ByteTransport<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    async fn read_into(&mut self, buffer: &mut BytesMut) -> Result<usize, MqttError> {
        buffer.reserve(4096);
        Ok(self.0.read_buf(buffer).await?)
    }

    async fn write_bytes(&mut self, bytes: Bytes) -> Result<(), MqttError> {
        self.0.write_all(&bytes).await?;
        Ok(self.0.flush().await?)
    }

    async fn shutdown(&mut self) {
        let _ = self.0.shutdown().await;
    }
}

/// A transport plus the bytes received but not yet decoded.
pub struct MqttConnection<T> {
    transport: T,
    received: BytesMut,
    max_packet_size: usize,
}

impl<T: PacketTransport> MqttConnection<T> {
    pub fn new(transport: T, max_packet_size: usize) -> Self {
        Self {
            transport,
            received: BytesMut::new(),
            max_packet_size,
        }
    }

    /// The next packet, or `None` when the peer closed cleanly. Cancel-safe.
    pub async fn read_packet(&mut self) -> Result<Option<Packet>, MqttError> {
        loop {
            if !self.received.is_empty() {
                match Packet::read(&mut self.received, self.max_packet_size) {
                    Ok(packet) => return Ok(Some(packet)),
                    Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
                    Err(error) => return Err(MqttError::Packet(error)),
                }
            }
            if self.transport.read_into(&mut self.received).await? == 0 {
                return Ok(None);
            }
            if self.received.len() > self.max_packet_size + 8 {
                return Err(MqttError::Packet(
                    rumqttc::mqttbytes::Error::PayloadSizeLimitExceeded(self.received.len()),
                ));
            }
        }
    }

    pub async fn write_packet(&mut self, packet: &Packet) -> Result<(), MqttError> {
        let mut encoded = BytesMut::with_capacity(packet.size() + 5);
        packet
            .write(&mut encoded, self.max_packet_size)
            .map_err(MqttError::Packet)?;
        self.transport.write_bytes(encoded.freeze()).await
    }

    pub async fn shutdown(&mut self) {
        self.transport.shutdown().await;
    }
}
