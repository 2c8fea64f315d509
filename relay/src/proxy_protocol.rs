//! The PROXY protocol header (v1 text, v2 binary) a TCP balancer such as
//! HAProxy (`send-proxy`, `send-proxy-v2`) puts before a connection's first
//! byte to say whose connection it is.
//!
//! Only a trusted peer's header is read (see [`crate::trusted_proxies`]);
//! from anyone else the bytes are left where they are and fail TLS, HTTP or
//! MQTT as the garbage they are. A trusted peer may also send no header at
//! all (nginx in front, speaking HTTP with `X-Forwarded-For`), so the header
//! is optional: the first bytes are *peeked*, and consumed only when they
//! are a PROXY header. That keeps the connection a plain `TcpStream` for
//! TLS and everything above, with nothing added to the data path.
//!
//! A peek that sees part of a header returns at once with the same bytes
//! until more arrive, so an incomplete header is peeked again after a short
//! pause rather than in a spin; the whole read has a deadline and the header
//! a size bound. Parsing the header itself is the `ppp` crate's.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// The v1 header starts with this.
const V1_SIGNATURE: &[u8] = b"PROXY ";
/// The v2 header starts with these 12 bytes.
const V2_SIGNATURE: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";
/// The longest v1 header, CRLF included (the specification's bound).
const V1_MAX_LENGTH: usize = 107;
/// The fixed part of a v2 header: signature, version and command, family,
/// and the length of what follows.
const V2_FIXED_LENGTH: usize = 16;
/// The largest header accepted. HAProxy's v2 header is 28 bytes for IPv4
/// and 52 for IPv6, plus the TLVs it is told to add (ALPN, authority, a
/// unique id, SSL details): a few hundred bytes at most.
pub const MAX_HEADER_LENGTH: usize = 1024;
/// Pause before peeking again at an incomplete header.
const PEEK_RETRY: Duration = Duration::from_millis(5);

/// What the first bytes of a trusted peer's connection said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyHeader {
    /// No PROXY header: the connection starts with the client's own bytes.
    Absent,
    /// A header naming the client's address (consumed).
    Client(SocketAddr),
    /// A header without a client address (consumed): v2 `LOCAL` (the
    /// balancer's own health check), v1 `UNKNOWN`, or a non-IP family.
    NoAddress,
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyHeaderError {
    #[error("no complete PROXY header within {0:?}")]
    Timeout(Duration),
    #[error("PROXY header longer than {MAX_HEADER_LENGTH} bytes")]
    TooLong,
    #[error("malformed PROXY header: {0}")]
    Malformed(String),
    #[error("connection closed before its first byte")]
    Closed,
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// How far the bytes seen so far go.
#[derive(Debug, PartialEq, Eq)]
enum Seen {
    /// Not a PROXY header.
    Other,
    /// A header, or the start of one, not yet complete.
    Incomplete,
    /// A complete header of this many bytes.
    Complete(usize),
    TooLong,
}

fn classify(bytes: &[u8]) -> Seen {
    let starts_like = |signature: &[u8]| {
        let common = bytes.len().min(signature.len());
        bytes[..common] == signature[..common]
    };
    if starts_like(V2_SIGNATURE) {
        if bytes.len() < V2_FIXED_LENGTH {
            return Seen::Incomplete;
        }
        let length = V2_FIXED_LENGTH + usize::from(u16::from_be_bytes([bytes[14], bytes[15]]));
        return match length {
            length if length > MAX_HEADER_LENGTH => Seen::TooLong,
            length if bytes.len() < length => Seen::Incomplete,
            length => Seen::Complete(length),
        };
    }
    if starts_like(V1_SIGNATURE) {
        let searched = &bytes[..bytes.len().min(V1_MAX_LENGTH)];
        return match searched.windows(2).position(|pair| pair == b"\r\n") {
            Some(end) => Seen::Complete(end + 2),
            None if bytes.len() >= V1_MAX_LENGTH => Seen::TooLong,
            None => Seen::Incomplete,
        };
    }
    Seen::Other
}

/// Reads a PROXY header from the start of `tcp` if there is one, within
/// `timeout`; leaves the stream untouched when there is none.
pub async fn read_header(
    tcp: &mut TcpStream,
    timeout: Duration,
) -> Result<ProxyHeader, ProxyHeaderError> {
    let length = tokio::time::timeout(timeout, header_length(tcp))
        .await
        .map_err(|_| ProxyHeaderError::Timeout(timeout))??;
    let Some(length) = length else {
        return Ok(ProxyHeader::Absent);
    };
    // The bytes are already here (peeked), so this does not wait.
    let mut header = vec![0u8; length];
    tcp.read_exact(&mut header).await?;
    parse(&header)
}

/// The length of the header at the start of `tcp`, `None` when there is none.
async fn header_length(tcp: &TcpStream) -> Result<Option<usize>, ProxyHeaderError> {
    let mut buffer = [0u8; MAX_HEADER_LENGTH];
    loop {
        let seen = tcp.peek(&mut buffer).await?;
        if seen == 0 {
            return Err(ProxyHeaderError::Closed);
        }
        match classify(&buffer[..seen]) {
            Seen::Other => return Ok(None),
            Seen::Complete(length) => return Ok(Some(length)),
            Seen::TooLong => return Err(ProxyHeaderError::TooLong),
            Seen::Incomplete => tokio::time::sleep(PEEK_RETRY).await,
        }
    }
}

/// The client a complete header names.
fn parse(header: &[u8]) -> Result<ProxyHeader, ProxyHeaderError> {
    use ppp::HeaderResult;
    match HeaderResult::parse(header) {
        HeaderResult::V1(Ok(header)) => Ok(match header.addresses {
            ppp::v1::Addresses::Tcp4(addresses) => ProxyHeader::Client(SocketAddr::new(
                addresses.source_address.into(),
                addresses.source_port,
            )),
            ppp::v1::Addresses::Tcp6(addresses) => ProxyHeader::Client(SocketAddr::new(
                addresses.source_address.into(),
                addresses.source_port,
            )),
            ppp::v1::Addresses::Unknown => ProxyHeader::NoAddress,
        }),
        HeaderResult::V2(Ok(header)) => {
            if header.command == ppp::v2::Command::Local {
                return Ok(ProxyHeader::NoAddress);
            }
            Ok(match header.addresses {
                ppp::v2::Addresses::IPv4(addresses) => ProxyHeader::Client(SocketAddr::new(
                    addresses.source_address.into(),
                    addresses.source_port,
                )),
                ppp::v2::Addresses::IPv6(addresses) => ProxyHeader::Client(SocketAddr::new(
                    addresses.source_address.into(),
                    addresses.source_port,
                )),
                ppp::v2::Addresses::Unspecified | ppp::v2::Addresses::Unix(_) => {
                    ProxyHeader::NoAddress
                }
            })
        }
        HeaderResult::V1(Err(error)) => Err(ProxyHeaderError::Malformed(error.to_string())),
        HeaderResult::V2(Err(error)) => Err(ProxyHeaderError::Malformed(error.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    /// A connected pair on loopback: (the side that writes, the relay's side).
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let dialed = TcpStream::connect(address).await.expect("connect");
        let (accepted, _) = listener.accept().await.expect("accept");
        (dialed, accepted)
    }

    fn v2_header(client: SocketAddr, server: SocketAddr) -> Vec<u8> {
        ppp::v2::Builder::with_addresses(
            ppp::v2::Version::Two | ppp::v2::Command::Proxy,
            ppp::v2::Protocol::Stream,
            (client, server),
        )
        .build()
        .expect("a v2 header")
    }

    const TIMEOUT: Duration = Duration::from_secs(2);

    #[tokio::test]
    async fn a_v1_header_names_the_client_and_the_bytes_after_it_stay() {
        let (mut balancer, mut relay) = pair().await;
        balancer
            .write_all(b"PROXY TCP4 203.0.113.7 10.0.0.1 41234 8443\r\nGET / HTTP/1.1\r\n")
            .await
            .unwrap();
        let header = read_header(&mut relay, TIMEOUT).await.unwrap();
        assert_eq!(
            header,
            ProxyHeader::Client("203.0.113.7:41234".parse().unwrap())
        );
        let mut rest = [0u8; 16];
        relay.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b"GET / HTTP/1.1\r\n");
    }

    #[tokio::test]
    async fn a_v2_header_sent_in_pieces_names_the_client() {
        let (mut balancer, mut relay) = pair().await;
        let header = v2_header(
            "[2001:db8::7]:41234".parse().unwrap(),
            "[2001:db8::1]:8443".parse().unwrap(),
        );
        let writer = tokio::spawn(async move {
            for piece in header.chunks(5) {
                balancer.write_all(piece).await.unwrap();
                tokio::time::sleep(Duration::from_millis(15)).await;
            }
            balancer.write_all(&[0x16, 0x03, 0x01]).await.unwrap();
            balancer
        });
        let read = read_header(&mut relay, TIMEOUT).await.unwrap();
        assert_eq!(
            read,
            ProxyHeader::Client("[2001:db8::7]:41234".parse().unwrap())
        );
        let _balancer = writer.await.unwrap();
        let mut rest = [0u8; 3];
        relay.read_exact(&mut rest).await.unwrap();
        assert_eq!(rest, [0x16, 0x03, 0x01], "the TLS record is untouched");
    }

    #[tokio::test]
    async fn a_connection_without_a_header_is_left_untouched() {
        for first_bytes in [&[0x16u8, 0x03, 0x01][..], b"GET / HTTP/1.1\r\n", b"POST /"] {
            let (mut client, mut relay) = pair().await;
            client.write_all(first_bytes).await.unwrap();
            assert_eq!(
                read_header(&mut relay, TIMEOUT).await.unwrap(),
                ProxyHeader::Absent
            );
            let mut rest = vec![0u8; first_bytes.len()];
            relay.read_exact(&mut rest).await.unwrap();
            assert_eq!(rest, first_bytes);
        }
    }

    #[tokio::test]
    async fn local_and_unknown_headers_name_no_client() {
        let (mut balancer, mut relay) = pair().await;
        balancer.write_all(b"PROXY UNKNOWN\r\n").await.unwrap();
        assert_eq!(
            read_header(&mut relay, TIMEOUT).await.unwrap(),
            ProxyHeader::NoAddress
        );
        let (mut balancer, mut relay) = pair().await;
        let local = ppp::v2::Builder::new(
            ppp::v2::Version::Two | ppp::v2::Command::Local,
            ppp::v2::AddressFamily::Unspecified | ppp::v2::Protocol::Unspecified,
        )
        .build()
        .expect("a LOCAL header");
        balancer.write_all(&local).await.unwrap();
        assert_eq!(
            read_header(&mut relay, TIMEOUT).await.unwrap(),
            ProxyHeader::NoAddress
        );
    }

    #[tokio::test]
    async fn an_unfinished_header_times_out_and_a_huge_or_broken_one_is_refused() {
        let (mut balancer, mut relay) = pair().await;
        balancer.write_all(b"PROXY TCP4 203.0.113.7").await.unwrap();
        let timeout = Duration::from_millis(200);
        assert!(matches!(
            read_header(&mut relay, timeout).await,
            Err(ProxyHeaderError::Timeout(_))
        ));

        let (mut balancer, mut relay) = pair().await;
        let mut huge = V2_SIGNATURE.to_vec();
        huge.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        balancer.write_all(&huge).await.unwrap();
        assert!(matches!(
            read_header(&mut relay, TIMEOUT).await,
            Err(ProxyHeaderError::TooLong)
        ));

        let (mut balancer, mut relay) = pair().await;
        balancer.write_all(&[b'P'; 200]).await.unwrap();
        assert!(
            matches!(
                read_header(&mut relay, TIMEOUT).await,
                Ok(ProxyHeader::Absent)
            ),
            "bytes that only start like a header are the client's own"
        );

        let (mut balancer, mut relay) = pair().await;
        balancer
            .write_all(b"PROXY TCP4 not-an-address 10.0.0.1 1 2\r\n")
            .await
            .unwrap();
        assert!(matches!(
            read_header(&mut relay, TIMEOUT).await,
            Err(ProxyHeaderError::Malformed(_))
        ));

        let (balancer, mut relay) = pair().await;
        drop(balancer);
        assert!(matches!(
            read_header(&mut relay, TIMEOUT).await,
            Err(ProxyHeaderError::Closed)
        ));
    }

    #[test]
    fn classification_needs_only_the_first_bytes() {
        assert_eq!(classify(b"\r\n\r\n"), Seen::Incomplete);
        assert_eq!(classify(b"PRO"), Seen::Incomplete);
        assert_eq!(classify(b"PUT /"), Seen::Other);
        assert_eq!(classify(b"PROXY UNKNOWN\r\nrest"), Seen::Complete(15));
        let long_v1 = [b"PROXY ".as_slice(), &[b'1'; 120]].concat();
        assert_eq!(classify(&long_v1), Seen::TooLong);
    }
}
