//! The HTTP `CONNECT` exchange with a proxy (RFC 9110 §9.3.6): one request,
//! one answer head, then the socket is a tunnel.
//!
//! Written by hand because it is a dozen lines of HTTP that must hand the
//! raw socket back; the answer is parsed by `httparse`. The answer head is
//! bounded ([`MAX_ANSWER_HEAD`]) and the caller bounds the time. Nothing may
//! follow a 2xx head: the relay waits for the client to speak first (TLS
//! ClientHello, or the WebSocket upgrade), so bytes there would be a proxy
//! that is not tunnelling. A refusal's body is never read.
//!
//! A refusal of the credentials is a 407, or a 401 from some proxies
//! (tinyproxy answers wrong credentials so): to a CONNECT, only the proxy
//! can have answered, so both mean the proxy's credentials.

use base64::Engine;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{authority, Credentials, TunnelError};

/// Largest answer head read from a proxy.
pub const MAX_ANSWER_HEAD: usize = 16 * 1024;
/// Most header lines in that head.
const MAX_ANSWER_HEADERS: usize = 64;
/// Longest reason phrase quoted in an error.
const MAX_REASON: usize = 80;

pub(super) async fn open(
    mut tcp: TcpStream,
    credentials: Option<&Credentials>,
    host: &str,
    port: u16,
) -> Result<TcpStream, TunnelError> {
    let target = authority(host, port);
    let mut request = format!(
        "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nUser-Agent: devstreams/{}\r\n",
        env!("CARGO_PKG_VERSION")
    );
    if let Some(credentials) = credentials {
        let pair = format!("{}:{}", credentials.username(), credentials.password());
        let encoded = base64::engine::general_purpose::STANDARD.encode(pair);
        request.push_str(&format!("Proxy-Authorization: Basic {encoded}\r\n"));
    }
    request.push_str("\r\n");
    tcp.write_all(request.as_bytes()).await?;
    let (status, reason) = read_answer(&mut tcp).await?;
    match status {
        200..=299 => Ok(tcp),
        401 | 407 if credentials.is_some() => Err(TunnelError::CredentialsRefused(status)),
        401 | 407 => Err(TunnelError::CredentialsRequired(status)),
        status => Err(TunnelError::Refused { status, reason }),
    }
}

/// Reads the answer head; returns its status and (printable) reason.
async fn read_answer(tcp: &mut TcpStream) -> Result<(u16, String), TunnelError> {
    let mut head = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    loop {
        let room = MAX_ANSWER_HEAD + 1 - head.len();
        let read = tcp.read(&mut chunk[..room.min(1024)]).await?;
        if read == 0 {
            return Err(TunnelError::Closed);
        }
        head.extend_from_slice(&chunk[..read]);
        if let Some(answer) = parse_answer(&head)? {
            return Ok(answer);
        }
        if head.len() > MAX_ANSWER_HEAD {
            return Err(TunnelError::AnswerTooLong(MAX_ANSWER_HEAD));
        }
    }
}

/// `None` while the head is incomplete.
fn parse_answer(head: &[u8]) -> Result<Option<(u16, String)>, TunnelError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_ANSWER_HEADERS];
    let mut response = httparse::Response::new(&mut headers);
    match response.parse(head) {
        Ok(httparse::Status::Partial) => Ok(None),
        Ok(httparse::Status::Complete(length)) => {
            let status = response.code.unwrap_or_default();
            if (200..300).contains(&status) && length < head.len() {
                return Err(TunnelError::BytesAhead);
            }
            let reason: String = response
                .reason
                .unwrap_or_default()
                .chars()
                .filter(|character| !character.is_control())
                .take(MAX_REASON)
                .collect();
            Ok(Some((status, reason)))
        }
        Err(error) => Err(TunnelError::NotHttp(error.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_complete_head_gives_status_and_reason() {
        let answer = parse_answer(b"HTTP/1.0 200 Connection established\r\nProxy-agent: x\r\n\r\n")
            .expect("valid");
        assert_eq!(answer, Some((200, "Connection established".to_string())));
        let answer = parse_answer(b"HTTP/1.1 403 Access violation\r\n\r\n").expect("valid");
        assert_eq!(answer, Some((403, "Access violation".to_string())));
    }

    #[test]
    fn a_partial_head_asks_for_more() {
        assert!(matches!(
            parse_answer(b"HTTP/1.1 200 OK\r\nServer"),
            Ok(None)
        ));
    }

    #[test]
    fn bytes_after_the_head_and_non_http_answers_are_refused() {
        assert!(matches!(
            parse_answer(b"HTTP/1.1 200 OK\r\n\r\nhello"),
            Err(TunnelError::BytesAhead)
        ));
        assert!(matches!(
            parse_answer(b"\x05\x00\x00\x01"),
            Err(TunnelError::NotHttp(_))
        ));
    }

    #[test]
    fn a_refusal_may_carry_a_body() {
        let answer =
            parse_answer(b"HTTP/1.0 401 Unauthorized\r\nContent-Type: text/html\r\n\r\n<html>")
                .expect("valid");
        assert_eq!(answer, Some((401, "Unauthorized".to_string())));
    }

    /// A scripted proxy on loopback: reads the request, answers `answer`.
    async fn answering(answer: &'static [u8]) -> (u16, tokio::task::JoinHandle<String>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a loopback port");
        let port = listener.local_addr().expect("local address").port();
        let task = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.expect("accept");
            let mut request = Vec::new();
            let mut chunk = [0u8; 1024];
            while !request.ends_with(b"\r\n\r\n") {
                let read = socket.read(&mut chunk).await.expect("read");
                if read == 0 {
                    break;
                }
                request.extend_from_slice(&chunk[..read]);
            }
            socket.write_all(answer).await.expect("answer");
            String::from_utf8_lossy(&request).to_string()
        });
        (port, task)
    }

    async fn ask(port: u16, credentials: Option<&Credentials>) -> Result<TcpStream, TunnelError> {
        let tcp = TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect");
        open(tcp, credentials, "relay.example.com", 8443).await
    }

    #[tokio::test]
    async fn the_request_names_the_target_and_carries_basic_credentials() {
        let (port, proxy) = answering(b"HTTP/1.1 200 OK\r\n\r\n").await;
        let credentials = Credentials::new("alice".into(), "p@ss:word".into());
        ask(port, Some(&credentials)).await.expect("tunnel");
        let request = proxy.await.expect("proxy ran");
        assert!(
            request.starts_with("CONNECT relay.example.com:8443 HTTP/1.1\r\n"),
            "{request}"
        );
        assert!(
            request.contains("\r\nHost: relay.example.com:8443\r\n"),
            "{request}"
        );
        let expected = base64::engine::general_purpose::STANDARD.encode("alice:p@ss:word");
        assert!(
            request.contains(&format!("\r\nProxy-Authorization: Basic {expected}\r\n")),
            "{request}"
        );
    }

    #[tokio::test]
    async fn an_ipv6_target_is_written_in_brackets() {
        let (port, proxy) = answering(b"HTTP/1.1 200 OK\r\n\r\n").await;
        let tcp = TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect");
        open(tcp, None, "2001:db8::1", 443).await.expect("tunnel");
        let request = proxy.await.expect("proxy ran");
        assert!(
            request.starts_with("CONNECT [2001:db8::1]:443 HTTP/1.1\r\n"),
            "{request}"
        );
        assert!(!request.contains("Proxy-Authorization"), "{request}");
    }

    #[tokio::test]
    async fn a_407_asks_for_credentials_or_says_they_were_refused() {
        let answer = b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n";
        let (port, _proxy) = answering(answer).await;
        assert!(matches!(
            ask(port, None).await,
            Err(TunnelError::CredentialsRequired(407))
        ));
        let (port, _proxy) = answering(answer).await;
        let credentials = Credentials::new("alice".into(), "wrong".into());
        let error = match ask(port, Some(&credentials)).await {
            Err(error) => error,
            Ok(_) => panic!("a 407 is no tunnel"),
        };
        assert!(
            matches!(error, TunnelError::CredentialsRefused(407)),
            "{error:?}"
        );
        assert!(!error.to_string().contains("wrong"), "{error}");
    }

    /// tinyproxy answers wrong credentials with 401 and an HTML body.
    #[tokio::test]
    async fn a_401_with_a_body_after_credentials_is_a_refusal_of_them() {
        let answer = b"HTTP/1.0 401 Unauthorized\r\nContent-Type: text/html\r\n\r\n<html>no</html>";
        let (port, _proxy) = answering(answer).await;
        let credentials = Credentials::new("alice".into(), "wrong".into());
        let error = match ask(port, Some(&credentials)).await {
            Err(error) => error,
            Ok(_) => panic!("a 401 is no tunnel"),
        };
        assert!(
            matches!(error, TunnelError::CredentialsRefused(401)),
            "{error:?}"
        );
    }

    #[tokio::test]
    async fn another_refusal_quotes_status_and_reason() {
        let (port, _proxy) = answering(b"HTTP/1.1 403 Access violation\r\n\r\n").await;
        let error = match ask(port, None).await {
            Err(error) => error,
            Ok(_) => panic!("a 403 is no tunnel"),
        };
        assert_eq!(
            error.to_string(),
            "it refused the tunnel (HTTP 403 Access violation); check that the proxy allows CONNECT to that host and port"
        );
    }

    #[tokio::test]
    async fn an_endless_head_is_cut_at_the_bound() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a loopback port");
        let port = listener.local_addr().expect("local address").port();
        let _proxy = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.expect("accept");
            let _ = socket.write_all(b"HTTP/1.1 200 OK\r\nX-Filler: ").await;
            while socket.write_all(&[b'a'; 1024]).await.is_ok() {}
        });
        let error = match ask(port, None).await {
            Err(error) => error,
            Ok(_) => panic!("an endless head is no tunnel"),
        };
        assert!(
            matches!(error, TunnelError::AnswerTooLong(MAX_ANSWER_HEAD)),
            "{error:?}"
        );
    }

    #[tokio::test]
    async fn a_proxy_that_hangs_up_is_reported_as_closed() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a loopback port");
        let port = listener.local_addr().expect("local address").port();
        let _proxy = tokio::spawn(async move {
            let (socket, _) = listener.accept().await.expect("accept");
            drop(socket);
        });
        assert!(matches!(
            ask(port, None).await,
            Err(TunnelError::Closed | TunnelError::Io(_))
        ));
    }
}
