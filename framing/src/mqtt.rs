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
    ///
    /// The buffer needs no bound of its own: `Packet::read` refuses a packet
    /// whose announced length exceeds the limit as soon as its fixed header
    /// is in, so more is only read while the buffer holds less than one
    /// packet (at most `max_packet_size + 5` bytes). Bounding the buffer
    /// after a read instead would refuse a read that holds several small
    /// packets, as one WebSocket message may.
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Hands over one prepared chunk per read, then end of stream.
    struct Reads(std::collections::VecDeque<Vec<u8>>);

    impl PacketTransport for Reads {
        async fn read_into(&mut self, buffer: &mut BytesMut) -> Result<usize, MqttError> {
            let chunk = self.0.pop_front().unwrap_or_default();
            buffer.extend_from_slice(&chunk);
            Ok(chunk.len())
        }

        async fn write_bytes(&mut self, _bytes: Bytes) -> Result<(), MqttError> {
            Ok(())
        }

        async fn shutdown(&mut self) {}
    }

    fn connection(reads: Vec<Vec<u8>>, max_packet_size: usize) -> MqttConnection<Reads> {
        MqttConnection::new(Reads(reads.into()), max_packet_size)
    }

    /// Found by fuzzing (fuzz/fuzz_targets/mqtt_packets.rs): a read holding
    /// more bytes than one packet may have was refused, though each of its
    /// packets was small.
    #[tokio::test]
    async fn one_read_may_hold_many_small_packets() {
        const PINGREQ: [u8; 2] = [0xC0, 0x00];
        let mut mqtt = connection(vec![PINGREQ.repeat(200)], 256);
        for _ in 0..200 {
            assert_eq!(mqtt.read_packet().await.unwrap(), Some(Packet::PingReq));
        }
        assert_eq!(mqtt.read_packet().await.unwrap(), None);
    }

    #[tokio::test]
    async fn oversized_packet_is_refused_as_soon_as_its_header_arrives() {
        // PUBLISH announcing 300 bytes; only the fixed header is ever sent.
        let mut mqtt = connection(vec![vec![0x30, 0xAC, 0x02]], 256);
        assert!(matches!(
            mqtt.read_packet().await,
            Err(MqttError::Packet(
                rumqttc::mqttbytes::Error::PayloadSizeLimitExceeded(300)
            ))
        ));
    }

    #[tokio::test]
    async fn packet_split_across_reads_is_assembled() {
        let mut publish = Publish::new(
            "$iothub/streams/res/200/?$rid=5",
            QoS::AtLeastOnce,
            Vec::new(),
        );
        publish.pkid = 7;
        let mut encoded = BytesMut::new();
        Packet::Publish(publish)
            .write(&mut encoded, DEFAULT_MAX_PACKET_SIZE)
            .unwrap();
        let reads = encoded.chunks(3).map(<[u8]>::to_vec).collect();
        let mut mqtt = connection(reads, DEFAULT_MAX_PACKET_SIZE);
        assert!(
            matches!(mqtt.read_packet().await.unwrap(), Some(Packet::Publish(publish)) if publish.topic.ends_with("$rid=5"))
        );
        assert_eq!(mqtt.read_packet().await.unwrap(), None);
    }
}
