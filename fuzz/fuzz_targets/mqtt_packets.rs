//! MQTT packets as the relay reads them from a device (8883 or WebSocket),
//! through our `MqttConnection` over an in-memory transport that hands the
//! bytes over in chunks chosen by the input, so packets split across reads
//! (and reads holding several packets) are fuzzed too.
//!
//! Input layout: byte 0 is a control byte: its low 3 bits count the
//! chunk-size bytes that follow (0 = everything in one read; each size byte
//! `n` means a read of `n + 1` bytes, used in turn), bit 3 selects a 256-byte
//! packet limit instead of the default 64 KiB. The rest is the byte stream.
//!
//! Checked: no panic; every read completes without waiting; the packets the
//! connection yields are exactly those a single `Packet::read` loop over the
//! whole stream yields, in order, however the stream is chunked; it ends
//! (closed or error) where that loop ends; what decodes re-encodes to bytes
//! that decode to the same packet. Decoded packets then go through what the
//! relay does with them: CONNECT's password as a SAS token, PUBLISH topics
//! as stream answers (and requests, as a device would).
#![no_main]

use bytes::{Bytes, BytesMut};
use framing::mqtt::{MqttConnection, MqttError, Packet, PacketTransport, DEFAULT_MAX_PACKET_SIZE};
use framing::sas::SasToken;
use framing::topics::{StreamRequest, StreamResponse};
use futures_util::FutureExt;
use libfuzzer_sys::fuzz_target;

const SMALL_MAX_PACKET_SIZE: usize = 256;

/// Yields `stream` in chunks of the given sizes (cycled), then end of stream.
struct ChunkedTransport {
    stream: Vec<u8>,
    position: usize,
    chunk_sizes: Vec<usize>,
    reads: usize,
}

impl PacketTransport for ChunkedTransport {
    async fn read_into(&mut self, buffer: &mut BytesMut) -> Result<usize, MqttError> {
        let remaining = self.stream.len() - self.position;
        let size = match self.chunk_sizes.is_empty() {
            true => remaining,
            false => self.chunk_sizes[self.reads % self.chunk_sizes.len()].min(remaining),
        };
        self.reads += 1;
        buffer.extend_from_slice(&self.stream[self.position..self.position + size]);
        self.position += size;
        Ok(size)
    }

    async fn write_bytes(&mut self, _bytes: Bytes) -> Result<(), MqttError> {
        Ok(())
    }

    async fn shutdown(&mut self) {}
}

/// How the single-buffer decoding loop ended.
#[derive(Debug, PartialEq)]
enum End {
    /// Only a partial packet (or nothing) was left.
    Incomplete,
    Error,
}

fn reference_decode(stream: &[u8], max_packet_size: usize) -> (Vec<Packet>, End) {
    let mut buffer = BytesMut::from(stream);
    let mut packets = Vec::new();
    loop {
        if buffer.is_empty() {
            return (packets, End::Incomplete);
        }
        match Packet::read(&mut buffer, max_packet_size) {
            Ok(packet) => packets.push(packet),
            Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {
                return (packets, End::Incomplete)
            }
            Err(_) => return (packets, End::Error),
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&control, rest)) = data.split_first() else {
        return;
    };
    let size_count = usize::from(control & 0b111).min(rest.len());
    let (sizes, stream) = rest.split_at(size_count);
    let max_packet_size = if control & 0b1000 != 0 {
        SMALL_MAX_PACKET_SIZE
    } else {
        DEFAULT_MAX_PACKET_SIZE
    };
    let (expected, expected_end) = reference_decode(stream, max_packet_size);

    let transport = ChunkedTransport {
        stream: stream.to_vec(),
        position: 0,
        chunk_sizes: sizes.iter().map(|&size| usize::from(size) + 1).collect(),
        reads: 0,
    };
    let mut connection = MqttConnection::new(transport, max_packet_size);
    let mut yielded = 0;
    loop {
        let result = connection
            .read_packet()
            .now_or_never()
            .expect("an in-memory transport never waits");
        match result {
            Ok(Some(packet)) => {
                assert_eq!(
                    Some(&packet),
                    expected.get(yielded),
                    "packet {yielded} differs from a whole-buffer read"
                );
                yielded += 1;
                follow_up(&packet, max_packet_size);
            }
            Ok(None) => {
                assert_eq!(
                    (yielded, &expected_end),
                    (expected.len(), &End::Incomplete),
                    "closed early or late"
                );
                break;
            }
            Err(error) => {
                assert_eq!(
                    (yielded, &expected_end),
                    (expected.len(), &End::Error),
                    "refused a valid stream: {error}"
                );
                break;
            }
        }
    }
});

/// Re-encoding, then what the relay (and a device) does with the packet.
fn follow_up(packet: &Packet, max_packet_size: usize) {
    let mut encoded = BytesMut::new();
    if packet.write(&mut encoded, max_packet_size).is_ok() {
        let decoded = Packet::read(&mut encoded, max_packet_size.max(packet.size()));
        assert_eq!(
            decoded.as_ref().ok(),
            Some(packet),
            "re-encoded packet decodes differently: {decoded:?}"
        );
        assert!(encoded.is_empty(), "re-encoding wrote more than one packet");
    }
    match packet {
        Packet::Connect(connect) => {
            if let Some(login) = &connect.login {
                if let Ok(token) = SasToken::parse(&login.password) {
                    let _ = token.device_path();
                }
            }
        }
        Packet::Publish(publish) => {
            let _ = StreamResponse::from_topic(&publish.topic);
            let _ = StreamRequest::from_topic(&publish.topic);
        }
        _ => {}
    }
}
