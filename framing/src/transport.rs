//! "A byte stream to the relay": one type for plain TCP and TLS, client or
//! server side, and the one place where sockets get their options and
//! outbound dials their deadlines and, when one is set, their proxy hop.
//!
//! Everything above (REST, MQTT over WebSocket, streaming WebSocket) is built
//! on [`NetworkStream`], so TLS or plain is configuration, not a branch in each
//! client. Clients dial through a [`Dialer`] (TLS trust plus proxy settings),
//! so a proxy applies to every dial or to none.

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

use crate::proxy::{ProxySettings, ProxyUrl, Route, TunnelError};

/// How long dialing (TCP + TLS) may take before it is abandoned.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot reach {address}: {source}; check the host name and port, and that the relay is running")]
    Tcp { address: String, source: io::Error },
    #[error("TLS handshake with {address} failed: {source}; if the relay uses a self-signed certificate pass it with --ca-cert")]
    Tls { address: String, source: io::Error },
    /// The peer went away in the middle of the TLS handshake: a relay that
    /// is stopping or restarting, not a certificate problem.
    #[error("cannot reach {address}: the connection ended during the TLS handshake ({source}); check that the relay is running and that this is its TLS port")]
    TlsInterrupted { address: String, source: io::Error },
    #[error("{address} is not a valid TLS server name")]
    ServerName { address: String },
    #[error("connecting to {address} took longer than {timeout:?}")]
    Timeout { address: String, timeout: Duration },
    #[error("cannot reach the proxy {proxy} ({origin}): {source}; check its host and port and that it is running, or turn it off with --proxy none")]
    ProxyUnreachable {
        proxy: String,
        origin: &'static str,
        source: io::Error,
    },
    #[error("proxy {proxy} ({origin}), asked for {address}: {source}")]
    Proxy {
        proxy: String,
        origin: &'static str,
        address: String,
        source: TunnelError,
    },
    #[error("connecting to {address} through the proxy {proxy} took longer than {timeout:?}; check that {proxy} is a proxy of the kind its URL says and that it can reach {address}")]
    ProxyTimeout {
        address: String,
        proxy: String,
        timeout: Duration,
    },
}

impl ConnectError {
    /// Failures a person must fix (certificate, credentials, a proxy that
    /// refuses), as opposed to a relay or network that is down for now.
    pub fn needs_operator(&self) -> bool {
        match self {
            ConnectError::Tls { .. } | ConnectError::ServerName { .. } => true,
            ConnectError::Proxy { source, .. } => source.needs_operator(),
            _ => false,
        }
    }
}

/// A connection to or from the relay, with or without TLS (either role).
pub enum NetworkStream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// Idle time before the kernel starts probing a silent TCP peer.
pub const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);
/// Time between keepalive probes.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// Unanswered probes after which the kernel drops the connection.
pub const KEEPALIVE_PROBES: u32 = 3;
/// How long sent data may stay unacknowledged before the kernel drops the
/// connection (Linux `TCP_USER_TIMEOUT`). Equal to the keepalive budget
/// (idle + probes × interval), so both ways of noticing a vanished peer
/// agree. A live peer that only reads slowly is not cut: its kernel still
/// answers zero-window probes.
pub const USER_TIMEOUT: Duration = Duration::from_secs(60);

/// Socket options for every devstreams TCP socket, accepted or dialed, in
/// the relay and both proxies:
/// - no Nagle delay, because WebSocket writes are whole frames and
///   interactive sessions feel any delay;
/// - TCP keepalive, so a peer that vanished without a FIN or RST (power
///   loss, NAT state dropped) is noticed on an idle connection too;
/// - `TCP_USER_TIMEOUT` on Linux, so one whose data goes unacknowledged is
///   dropped in [`USER_TIMEOUT`] instead of after ~15 minutes of retransmits.
///
/// Best effort: a socket that refuses an option still works, so a failure
/// is only logged.
pub fn configure_socket(stream: &TcpStream) {
    let socket = socket2::SockRef::from(stream);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_PROBES);
    let results = [
        ("TCP_NODELAY", stream.set_nodelay(true)),
        ("SO_KEEPALIVE", socket.set_tcp_keepalive(&keepalive)),
        #[cfg(target_os = "linux")]
        (
            "TCP_USER_TIMEOUT",
            socket.set_tcp_user_timeout(Some(USER_TIMEOUT)),
        ),
    ];
    for (option, result) in results {
        if let Err(error) = result {
            tracing::debug!(option, %error, "cannot set a socket option");
        }
    }
}

/// Tells a TLS refusal (the certificate, the protocol: rustls reports
/// those as invalid data) from a connection that simply ended mid-handshake.
fn tls_failure(address: String, source: io::Error) -> ConnectError {
    match source.kind() {
        io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::UnexpectedEof
        | io::ErrorKind::BrokenPipe => ConnectError::TlsInterrupted { address, source },
        _ => ConnectError::Tls { address, source },
    }
}

/// Dials `host:port` directly (no proxy), then TLS when `tls` is given.
/// For tests and tools that must reach a relay as it is; clients use a
/// [`Dialer`].
pub async fn connect(
    host: &str,
    port: u16,
    tls: Option<&Arc<rustls::ClientConfig>>,
    timeout: Duration,
) -> Result<NetworkStream, ConnectError> {
    dial(host, port, tls, Route::Direct, timeout).await
}

/// How a client reaches the relay: the TLS trust and the proxy settings
/// that every dial of the client follows. Cheap to clone.
///
/// A bare TLS configuration converts into a `Dialer` that dials directly,
/// so code that has no proxy to think of passes its `tls` as before.
#[derive(Clone)]
pub struct Dialer {
    tls: Arc<rustls::ClientConfig>,
    proxies: Arc<ProxySettings>,
}

impl Dialer {
    pub fn new(tls: Arc<rustls::ClientConfig>, proxies: ProxySettings) -> Self {
        Self {
            tls,
            proxies: Arc::new(proxies),
        }
    }

    /// No proxy, whatever the environment says.
    pub fn direct(tls: Arc<rustls::ClientConfig>) -> Self {
        Self::new(tls, ProxySettings::direct())
    }

    pub fn tls(&self) -> &Arc<rustls::ClientConfig> {
        &self.tls
    }

    pub fn proxies(&self) -> &ProxySettings {
        &self.proxies
    }

    /// How a dial to `host:port` goes (for logs: "through http://proxy:3128
    /// (HTTPS_PROXY)", "direct").
    pub fn route(&self, host: &str, port: u16, secure: bool) -> Route<'_> {
        self.proxies.route(host, port, secure)
    }

    /// Dials `host:port` (through the proxy its settings choose), then TLS
    /// when `secure`; all within `timeout`.
    pub async fn connect(
        &self,
        host: &str,
        port: u16,
        secure: bool,
        timeout: Duration,
    ) -> Result<NetworkStream, ConnectError> {
        let tls = secure.then_some(&self.tls);
        dial(host, port, tls, self.route(host, port, secure), timeout).await
    }
}

impl From<Arc<rustls::ClientConfig>> for Dialer {
    fn from(tls: Arc<rustls::ClientConfig>) -> Self {
        Dialer::direct(tls)
    }
}

impl From<&Arc<rustls::ClientConfig>> for Dialer {
    fn from(tls: &Arc<rustls::ClientConfig>) -> Self {
        Dialer::direct(tls.clone())
    }
}

impl From<&Dialer> for Dialer {
    fn from(dialer: &Dialer) -> Self {
        dialer.clone()
    }
}

/// The one place a client opens TCP: to `host:port`, or to the proxy and
/// through its tunnel; then TLS to the relay (its name checked against the
/// certificate, never the proxy's).
async fn dial(
    host: &str,
    port: u16,
    tls: Option<&Arc<rustls::ClientConfig>>,
    route: Route<'_>,
    timeout: Duration,
) -> Result<NetworkStream, ConnectError> {
    let address = crate::proxy::authority(host, port);
    let dial = async {
        let tcp = match route {
            Route::Through { proxy, origin } => tunnel(proxy, origin, host, port).await?,
            Route::Direct | Route::Exempt => {
                let tcp =
                    TcpStream::connect((host, port))
                        .await
                        .map_err(|source| ConnectError::Tcp {
                            address: address.clone(),
                            source,
                        })?;
                configure_socket(&tcp);
                tcp
            }
        };
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
                    .map_err(|source| tls_failure(address.clone(), source))?;
                Ok(NetworkStream::Tls(Box::new(TlsStream::Client(stream))))
            }
        }
    };
    tokio::time::timeout(timeout, dial)
        .await
        .map_err(|_| match route.proxy() {
            Some(proxy) => ConnectError::ProxyTimeout {
                address: address.clone(),
                proxy: proxy.to_string(),
                timeout,
            },
            None => ConnectError::Timeout {
                address: address.clone(),
                timeout,
            },
        })?
}

/// TCP to the proxy, then its tunnel to `host:port`.
async fn tunnel(
    proxy: &ProxyUrl,
    origin: &'static str,
    host: &str,
    port: u16,
) -> Result<TcpStream, ConnectError> {
    let tcp = TcpStream::connect((proxy.host(), proxy.port()))
        .await
        .map_err(|source| ConnectError::ProxyUnreachable {
            proxy: proxy.to_string(),
            origin,
            source,
        })?;
    configure_socket(&tcp);
    proxy
        .open_tunnel(tcp, host, port)
        .await
        .map_err(|source| ConnectError::Proxy {
            proxy: proxy.to_string(),
            origin,
            address: crate::proxy::authority(host, port),
            source,
        })
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A relay killed while the kernel still accepts on its port: the TCP
    /// connection opens, then is reset before TLS completes. That is "cannot
    /// reach", not a certificate to pass with --ca-cert.
    #[tokio::test]
    async fn a_reset_during_the_tls_handshake_is_not_called_a_certificate_problem() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a loopback port");
        let port = listener.local_addr().expect("local address").port();
        let resetter = tokio::spawn(async move {
            let (socket, _) = listener.accept().await.expect("accept");
            socket.set_zero_linger().expect("linger 0");
            drop(socket);
        });
        let tls = crate::tls::client_config(None).expect("system roots");
        let error = match connect("localhost", port, Some(&tls), Duration::from_secs(5)).await {
            Ok(_) => panic!("a reset connection cannot complete TLS"),
            Err(error) => error,
        };
        resetter.await.expect("resetter ran");
        assert!(
            matches!(error, ConnectError::TlsInterrupted { .. }),
            "{error:?}"
        );
        let message = error.to_string();
        assert!(message.starts_with("cannot reach"), "{message}");
        assert!(!message.contains("--ca-cert"), "{message}");
    }

    /// A proxy that accepts and then never answers CONNECT: the dial ends
    /// at its deadline, with a message naming the proxy.
    #[tokio::test]
    async fn a_silent_proxy_is_given_up_at_the_connect_deadline() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a loopback port");
        let port = listener.local_addr().expect("local address").port();
        let silent = tokio::spawn(async move {
            let (socket, _) = listener.accept().await.expect("accept");
            tokio::time::sleep(Duration::from_secs(30)).await;
            drop(socket);
        });
        let proxy = crate::proxy::ProxyUrl::parse(&format!("http://user:hunter2@127.0.0.1:{port}"))
            .expect("valid");
        let tls = crate::tls::client_config(None).expect("system roots");
        let dialer = Dialer::new(tls, ProxySettings::always(proxy));
        let timeout = Duration::from_millis(300);
        let started = std::time::Instant::now();
        let error = match dialer
            .connect("relay.example.com", 443, true, timeout)
            .await
        {
            Ok(_) => panic!("a silent proxy gives no connection"),
            Err(error) => error,
        };
        let waited = started.elapsed();
        silent.abort();
        assert!(
            matches!(error, ConnectError::ProxyTimeout { .. }),
            "{error:?}"
        );
        assert!(
            waited >= timeout && waited < Duration::from_secs(5),
            "{waited:?}"
        );
        let message = error.to_string();
        assert!(
            message.contains(&format!("http://127.0.0.1:{port}")),
            "{message}"
        );
        assert!(!message.contains("hunter2"), "{message}");
    }

    /// A host listed in NO_PROXY is dialed directly, the proxy untouched.
    #[tokio::test]
    async fn an_exempt_host_is_dialed_directly() {
        let target = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a loopback port");
        let port = target.local_addr().expect("local address").port();
        let proxies = ProxySettings::resolve(None, |name| match name {
            // Nothing listens on port 1.
            "http_proxy" => Some("http://127.0.0.1:1".to_string()),
            "NO_PROXY" => Some("127.0.0.0/8".to_string()),
            _ => None,
        })
        .expect("valid");
        let tls = crate::tls::client_config(None).expect("system roots");
        let dialer = Dialer::new(tls, proxies);
        assert_eq!(dialer.route("127.0.0.1", port, false), Route::Exempt);
        dialer
            .connect("127.0.0.1", port, false, Duration::from_secs(5))
            .await
            .expect("direct dial");
        target.accept().await.expect("the target saw the dial");
    }

    #[tokio::test]
    async fn configured_sockets_have_keepalive_and_a_user_timeout() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a loopback port");
        let address = listener.local_addr().expect("local address");
        let dialed = TcpStream::connect(address).await.expect("connect");
        let (accepted, _) = listener.accept().await.expect("accept");
        for stream in [&dialed, &accepted] {
            let socket = socket2::SockRef::from(stream);
            assert!(!socket.keepalive().expect("read SO_KEEPALIVE"));
            configure_socket(stream);
            assert!(socket.keepalive().expect("read SO_KEEPALIVE"));
            assert_eq!(
                socket.tcp_keepalive_time().expect("read TCP_KEEPIDLE"),
                KEEPALIVE_IDLE
            );
            assert_eq!(
                socket.tcp_keepalive_interval().expect("read TCP_KEEPINTVL"),
                KEEPALIVE_INTERVAL
            );
            assert_eq!(
                socket.tcp_keepalive_retries().expect("read TCP_KEEPCNT"),
                KEEPALIVE_PROBES
            );
            #[cfg(target_os = "linux")]
            assert_eq!(
                socket.tcp_user_timeout().expect("read TCP_USER_TIMEOUT"),
                Some(USER_TIMEOUT)
            );
            assert!(stream.nodelay().expect("read TCP_NODELAY"));
        }
    }
}
