//! The SOCKS5 exchange (RFC 1928, user name and password by RFC 1929),
//! through `tokio-socks`.
//!
//! The relay's host *name* goes to the proxy (address type "domain name"),
//! so the proxy resolves it: a device behind a SOCKS server often has no
//! outside DNS. Only an address literal is sent as an address. The caller
//! dials the proxy itself (so the socket gets devstreams' options) and
//! bounds the time.

use tokio::net::TcpStream;
use tokio_socks::tcp::Socks5Stream;
use tokio_socks::Error as SocksError;

use super::{Credentials, TunnelError};

pub(super) async fn open(
    tcp: TcpStream,
    credentials: Option<&Credentials>,
    host: &str,
    port: u16,
) -> Result<TcpStream, TunnelError> {
    let opened = match credentials {
        Some(credentials) => {
            Socks5Stream::connect_with_password_and_socket(
                tcp,
                (host, port),
                credentials.username(),
                credentials.password(),
            )
            .await
        }
        None => Socks5Stream::connect_with_socket(tcp, (host, port)).await,
    };
    opened
        .map(Socks5Stream::into_inner)
        .map_err(|error| explain(error, credentials.is_some()))
}

/// Our wording for the proxy's answer: what it means for this connection
/// and what to fix. Reply codes are the SOCKS server's view of the relay.
fn explain(error: SocksError, sent_credentials: bool) -> TunnelError {
    let refused = |reason: &str| TunnelError::SocksRefused(reason.to_string());
    match error {
        SocksError::Io(error) if error.kind() == std::io::ErrorKind::UnexpectedEof => {
            TunnelError::Closed
        }
        SocksError::Io(error) => TunnelError::Io(error),
        SocksError::NoAcceptableAuthMethods | SocksError::AuthorizationRequired
            if !sent_credentials =>
        {
            TunnelError::SocksCredentialsRequired
        }
        SocksError::PasswordAuthFailure(_) => TunnelError::SocksCredentialsRefused,
        SocksError::ConnectionRefused => refused(
            "connection refused; check that the relay is running, and its host name and port",
        ),
        SocksError::HostUnreachable => refused("host unreachable"),
        SocksError::NetworkUnreachable => refused("network unreachable"),
        SocksError::TtlExpired => refused("TTL expired"),
        SocksError::GeneralSocksServerFailure => {
            refused("general failure (often: the proxy cannot resolve the host name)")
        }
        SocksError::ConnectionNotAllowedByRuleset => refused(
            "not allowed by the proxy's rules; ask its administrator to allow that host and port",
        ),
        other => TunnelError::Socks(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A scripted SOCKS5 server: checks the greeting and the optional
    /// password step, then answers the CONNECT with `reply`; returns the
    /// target it was asked for (address type, bytes).
    async fn scripted(
        password_status: Option<u8>,
        reply: u8,
    ) -> (u16, tokio::task::JoinHandle<(u8, Vec<u8>)>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a loopback port");
        let port = listener.local_addr().expect("local address").port();
        let task = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.expect("accept");
            let mut greeting = [0u8; 2];
            socket.read_exact(&mut greeting).await.expect("greeting");
            let mut methods = vec![0u8; greeting[1] as usize];
            socket.read_exact(&mut methods).await.expect("methods");
            if let Some(status) = password_status {
                socket.write_all(&[5, 2]).await.expect("choose password");
                let mut version_and_length = [0u8; 2];
                socket
                    .read_exact(&mut version_and_length)
                    .await
                    .expect("auth");
                let mut username = vec![0u8; version_and_length[1] as usize];
                socket.read_exact(&mut username).await.expect("user");
                let mut length = [0u8; 1];
                socket.read_exact(&mut length).await.expect("length");
                let mut password = vec![0u8; length[0] as usize];
                socket.read_exact(&mut password).await.expect("password");
                socket.write_all(&[1, status]).await.expect("auth answer");
                if status != 0 {
                    return (0, Vec::new());
                }
            } else {
                socket.write_all(&[5, 0]).await.expect("choose no auth");
            }
            let mut head = [0u8; 4];
            socket.read_exact(&mut head).await.expect("request");
            let target = match head[3] {
                3 => {
                    let mut length = [0u8; 1];
                    socket.read_exact(&mut length).await.expect("length");
                    let mut name = vec![0u8; length[0] as usize];
                    socket.read_exact(&mut name).await.expect("name");
                    name
                }
                1 => {
                    let mut address = vec![0u8; 4];
                    socket.read_exact(&mut address).await.expect("address");
                    address
                }
                _ => Vec::new(),
            };
            let mut port = [0u8; 2];
            socket.read_exact(&mut port).await.expect("port");
            socket
                .write_all(&[5, reply, 0, 1, 0, 0, 0, 0, 0, 0])
                .await
                .expect("reply");
            (head[3], target)
        });
        (port, task)
    }

    async fn ask(
        port: u16,
        credentials: Option<&Credentials>,
        host: &str,
    ) -> Result<TcpStream, TunnelError> {
        let tcp = TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect");
        open(tcp, credentials, host, 8443).await
    }

    #[tokio::test]
    async fn the_relay_name_is_sent_to_the_proxy_to_resolve() {
        let (port, server) = scripted(None, 0).await;
        ask(port, None, "relay.example.com").await.expect("tunnel");
        let (address_type, target) = server.await.expect("server ran");
        assert_eq!(address_type, 3, "domain name");
        assert_eq!(target, b"relay.example.com");
    }

    #[tokio::test]
    async fn an_address_literal_is_sent_as_an_address() {
        let (port, server) = scripted(None, 0).await;
        ask(port, None, "192.0.2.7").await.expect("tunnel");
        let (address_type, target) = server.await.expect("server ran");
        assert_eq!(address_type, 1, "IPv4");
        assert_eq!(target, vec![192, 0, 2, 7]);
    }

    #[tokio::test]
    async fn password_authentication_succeeds_and_a_refusal_says_so() {
        let credentials = Credentials::new("alice".into(), "s3cret".into());
        let (port, _server) = scripted(Some(0), 0).await;
        ask(port, Some(&credentials), "relay.example.com")
            .await
            .expect("tunnel");
        let (port, _server) = scripted(Some(1), 0).await;
        let error = match ask(port, Some(&credentials), "relay.example.com").await {
            Err(error) => error,
            Ok(_) => panic!("refused credentials give no tunnel"),
        };
        assert!(
            matches!(error, TunnelError::SocksCredentialsRefused),
            "{error:?}"
        );
        assert!(!error.to_string().contains("s3cret"), "{error}");
    }

    #[tokio::test]
    async fn a_connection_refused_reply_says_what_to_check() {
        let (port, _server) = scripted(None, 5).await;
        let error = match ask(port, None, "relay.example.com").await {
            Err(error) => error,
            Ok(_) => panic!("a refused connection is no tunnel"),
        };
        assert!(matches!(error, TunnelError::SocksRefused(_)), "{error:?}");
        let message = error.to_string();
        assert!(message.contains("connection refused"), "{message}");
        assert!(
            message.contains("check that the relay is running"),
            "{message}"
        );
    }
}
