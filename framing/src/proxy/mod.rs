//! Reaching the relay through a proxy: devices and operators on networks
//! whose only way out is an HTTP proxy (`CONNECT`) or a SOCKS5 server.
//!
//! The proxy is one hop *below* TLS: [`crate::transport`] dials the proxy,
//! asks it for a tunnel to the relay's host and port, and then speaks TLS to
//! the relay through that tunnel, so the proxy sees neither tokens nor bytes.
//! Every dial of a client (control channel, stream creation, each stream's
//! WebSocket) goes through [`crate::transport::Dialer`], so there is no way
//! to forget the proxy on one of them.
//!
//! Which proxy applies follows curl, because that is what operators already
//! know: `--proxy` wins, else `https_proxy`/`HTTPS_PROXY` (or `http_proxy`
//! for a plain `ws://` URL), else `all_proxy`/`ALL_PROXY`; `no_proxy` /
//! `NO_PROXY` ([`NoProxy`]) lists hosts reached directly. Unlike curl,
//! `socks5://` hands the relay's *name* to the proxy (like `socks5h://`): a
//! device behind a SOCKS server often cannot resolve outside names itself.
//!
//! Proxy passwords are secrets: [`ProxyUrl`] shows neither the user name nor
//! the password, in `Display` and in `Debug` alike, and no error message
//! carries them.

mod http_connect;
mod no_proxy;
mod socks;

use std::fmt;

use percent_encoding::percent_decode_str;
use tokio::net::TcpStream;

pub use no_proxy::NoProxy;

/// The port of a proxy URL that names none: curl's default for every kind.
pub const DEFAULT_PROXY_PORT: u16 = 1080;

/// How the tunnel is asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyKind {
    /// An HTTP proxy: `CONNECT host:port HTTP/1.1` (`http://`).
    HttpConnect,
    /// A SOCKS5 server, given the relay's host name (`socks5://`, `socks5h://`).
    Socks5,
}

/// User name and password for the proxy. Never shown: `Debug` redacts both.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    username: String,
    password: String,
}

impl Credentials {
    pub fn new(username: String, password: String) -> Self {
        Self { username, password }
    }
    pub fn username(&self) -> &str {
        &self.username
    }
    pub fn password(&self) -> &str {
        &self.password
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("Credentials(<redacted>)")
    }
}

/// One proxy, parsed from `http://[USER:PASSWORD@]HOST[:PORT]` or
/// `socks5://…` / `socks5h://…`. Shown as `scheme://HOST:PORT`, without the
/// credentials, so it can be logged and put in error messages.
#[derive(Clone, PartialEq, Eq)]
pub struct ProxyUrl {
    kind: ProxyKind,
    host: String,
    port: u16,
    credentials: Option<Credentials>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProxyUrlError {
    #[error("{url} is not a valid proxy URL ({reason}); write it as http://[USER:PASSWORD@]HOST:PORT or socks5://[USER:PASSWORD@]HOST:PORT")]
    Invalid { url: String, reason: String },
    #[error("proxy URL {url}: {scheme}:// proxies are not supported; use http:// (HTTP CONNECT) or socks5:// (SOCKS5)")]
    UnsupportedScheme { url: String, scheme: String },
    #[error("proxy URL {url}: the user name or password is not valid percent-encoded UTF-8; encode special characters, e.g. @ as %40 and : as %3A")]
    BadCredentialEncoding { url: String },
    #[error("proxy URL {url}: SOCKS5 allows at most 255 bytes of user name and of password")]
    CredentialsTooLong { url: String },
}

impl ProxyUrl {
    /// Parses a proxy URL. A URL without a scheme is an HTTP proxy, and
    /// one without a port uses [`DEFAULT_PROXY_PORT`], both as in curl.
    /// User name and password are percent-decoded.
    pub fn parse(text: &str) -> Result<Self, ProxyUrlError> {
        let text = text.trim();
        let shown = redact_url_text(text);
        let invalid = |reason: &str| ProxyUrlError::Invalid {
            url: shown.clone(),
            reason: reason.to_string(),
        };
        let with_scheme = if text.contains("://") {
            text.to_string()
        } else {
            format!("http://{text}")
        };
        let url = url::Url::parse(&with_scheme).map_err(|error| invalid(&error.to_string()))?;
        let kind = match url.scheme() {
            "http" => ProxyKind::HttpConnect,
            "socks5" | "socks5h" => ProxyKind::Socks5,
            other => {
                return Err(ProxyUrlError::UnsupportedScheme {
                    url: shown,
                    scheme: other.to_string(),
                })
            }
        };
        let host = match url.host() {
            Some(url::Host::Domain(name)) if !name.is_empty() => name.to_string(),
            Some(url::Host::Ipv4(address)) => address.to_string(),
            Some(url::Host::Ipv6(address)) => address.to_string(),
            _ => return Err(invalid("no host")),
        };
        if !matches!(url.path(), "" | "/") || url.query().is_some() || url.fragment().is_some() {
            return Err(invalid("a proxy URL has no path, query or fragment"));
        }
        let port = url.port().unwrap_or(DEFAULT_PROXY_PORT);
        let decode = |part: &str| {
            percent_decode_str(part)
                .decode_utf8()
                .map(|decoded| decoded.into_owned())
                .map_err(|_| ProxyUrlError::BadCredentialEncoding { url: shown.clone() })
        };
        let credentials = match (url.username(), url.password()) {
            ("", None) => None,
            (username, password) => Some(Credentials::new(
                decode(username)?,
                decode(password.unwrap_or_default())?,
            )),
        };
        if kind == ProxyKind::Socks5 {
            if let Some(credentials) = &credentials {
                if credentials.username.len() > 255 || credentials.password.len() > 255 {
                    return Err(ProxyUrlError::CredentialsTooLong { url: shown });
                }
            }
        }
        Ok(Self {
            kind,
            host,
            port,
            credentials,
        })
    }

    pub fn kind(&self) -> ProxyKind {
        self.kind
    }
    pub fn host(&self) -> &str {
        &self.host
    }
    pub fn port(&self) -> u16 {
        self.port
    }
    pub fn credentials(&self) -> Option<&Credentials> {
        self.credentials.as_ref()
    }

    fn scheme(&self) -> &'static str {
        match self.kind {
            ProxyKind::HttpConnect => "http",
            ProxyKind::Socks5 => "socks5",
        }
    }

    /// Asks the proxy, over `tcp` (already connected to it), for a tunnel
    /// to `host:port`; returns the socket, now a byte stream to the target.
    /// The caller bounds the time this takes.
    pub async fn open_tunnel(
        &self,
        tcp: TcpStream,
        host: &str,
        port: u16,
    ) -> Result<TcpStream, TunnelError> {
        match self.kind {
            ProxyKind::HttpConnect => http_connect::open(tcp, self.credentials(), host, port).await,
            ProxyKind::Socks5 => socks::open(tcp, self.credentials(), host, port).await,
        }
    }
}

impl fmt::Display for ProxyUrl {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(
                formatter,
                "{}://[{}]:{}",
                self.scheme(),
                self.host,
                self.port
            )
        } else {
            write!(formatter, "{}://{}:{}", self.scheme(), self.host, self.port)
        }
    }
}

impl fmt::Debug for ProxyUrl {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        let credentials = if self.credentials.is_some() {
            " (with credentials)"
        } else {
            ""
        };
        write!(formatter, "ProxyUrl({self}{credentials})")
    }
}

/// A proxy URL as typed, with anything before the host's `@` replaced by
/// `***`: for error messages about a URL that would not parse.
pub fn redact_url_text(text: &str) -> String {
    let (scheme, rest) = match text.split_once("://") {
        Some((scheme, rest)) => (Some(scheme), rest),
        None => (None, text),
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let authority = match authority.rfind('@') {
        Some(at) => format!("***{}", &authority[at..]),
        None => authority.to_string(),
    };
    match scheme {
        Some(scheme) => format!("{scheme}://{authority}{tail}"),
        None => format!("{authority}{tail}"),
    }
}

/// Why a proxy gave no tunnel. Each message says what to fix; the caller
/// names the proxy (without credentials) in front of it.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("it asks for a user name and password (HTTP {0}); put them in the proxy URL: http://USER:PASSWORD@HOST:PORT")]
    CredentialsRequired(u16),
    #[error("it refused the user name and password (HTTP {0}); correct them in the proxy URL")]
    CredentialsRefused(u16),
    #[error("it refused the tunnel (HTTP {status} {reason}); check that the proxy allows CONNECT to that host and port")]
    Refused { status: u16, reason: String },
    #[error("its answer is not an HTTP response ({0}); check that the proxy URL names an HTTP proxy, or use socks5:// for a SOCKS server")]
    NotHttp(String),
    #[error("its answer head is longer than {0} bytes")]
    AnswerTooLong(usize),
    #[error("it sent data ahead of the tunnel, before the client spoke; check that the proxy URL names an HTTP proxy")]
    BytesAhead,
    #[error("it closed the connection without answering")]
    Closed,
    #[error("it asks for a user name and password; put them in the proxy URL: socks5://USER:PASSWORD@HOST:PORT")]
    SocksCredentialsRequired,
    #[error("it refused the user name and password; correct them in the proxy URL")]
    SocksCredentialsRefused,
    #[error("it could not connect there: {0}")]
    SocksRefused(String),
    #[error("the SOCKS5 exchange failed: {0}; check that the proxy URL names a SOCKS5 server, or use http:// for an HTTP proxy")]
    Socks(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl TunnelError {
    /// Failures that retrying alone will not cure: the proxy's settings or
    /// the credentials need a person.
    pub fn needs_operator(&self) -> bool {
        !matches!(
            self,
            TunnelError::Closed | TunnelError::Io(_) | TunnelError::SocksRefused(_)
        )
    }
}

/// `host:port` as it goes in a CONNECT line or a message: IPv6 in brackets.
pub(crate) fn authority(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Which variable or flag a proxy came from, for logs and error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Chosen {
    url: ProxyUrl,
    origin: &'static str,
}

/// Which proxy, if any, each dial of a client takes.
#[derive(Debug, Clone, Default)]
pub struct ProxySettings {
    /// For `https://` and `wss://` (the relay's usual URLs).
    secure: Option<Chosen>,
    /// For `ws://` (a relay behind a TLS-terminating balancer).
    plain: Option<Chosen>,
    exceptions: NoProxy,
}

/// The command-line value that turns every proxy off, environment included.
pub const NO_PROXY_FLAG_VALUE: &str = "none";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{origin}: {error}")]
pub struct ProxySettingsError {
    pub origin: &'static str,
    pub error: ProxyUrlError,
}

/// How one dial goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route<'a> {
    Direct,
    /// A proxy is set, but `NO_PROXY` lists the host.
    Exempt,
    Through {
        proxy: &'a ProxyUrl,
        origin: &'static str,
    },
}

impl Route<'_> {
    pub fn proxy(&self) -> Option<&ProxyUrl> {
        match self {
            Route::Through { proxy, .. } => Some(proxy),
            _ => None,
        }
    }
}

impl fmt::Display for Route<'_> {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Route::Direct => formatter.write_str("direct"),
            Route::Exempt => formatter.write_str("direct (NO_PROXY lists the host)"),
            Route::Through { proxy, origin } => write!(formatter, "through {proxy} ({origin})"),
        }
    }
}

impl ProxySettings {
    /// No proxy for any host.
    pub fn direct() -> Self {
        Self::default()
    }

    /// One proxy for every host, no exceptions.
    pub fn always(proxy: ProxyUrl) -> Self {
        let chosen = Chosen {
            url: proxy,
            origin: "--proxy",
        };
        Self {
            secure: Some(chosen.clone()),
            plain: Some(chosen),
            exceptions: NoProxy::default(),
        }
    }

    /// The settings of a program: `flag` is its `--proxy` value, and
    /// `environment` reads a variable (`std::env::var(name).ok()` in a
    /// program; a table in tests). `--proxy none` (or an empty value) turns
    /// proxies off whatever the environment says; any other `--proxy` wins
    /// over the proxy variables; `NO_PROXY` applies either way, as in curl.
    pub fn resolve(
        flag: Option<&str>,
        environment: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ProxySettingsError> {
        let read = |name: &str| environment(name).filter(|value| !value.trim().is_empty());
        if let Some(flag) = flag {
            let flag = flag.trim();
            if flag.is_empty() || flag.eq_ignore_ascii_case(NO_PROXY_FLAG_VALUE) {
                return Ok(Self::direct());
            }
        }
        let exceptions = ["no_proxy", "NO_PROXY"]
            .into_iter()
            .find_map(&environment)
            .map(|list| NoProxy::parse(&list))
            .unwrap_or_default();
        let pick = |names: &[&'static str]| -> Result<Option<Chosen>, ProxySettingsError> {
            for origin in names {
                if let Some(value) = read(origin) {
                    let url = ProxyUrl::parse(&value)
                        .map_err(|error| ProxySettingsError { origin, error })?;
                    return Ok(Some(Chosen { url, origin }));
                }
            }
            Ok(None)
        };
        if let Some(flag) = flag {
            let url = ProxyUrl::parse(flag).map_err(|error| ProxySettingsError {
                origin: "--proxy",
                error,
            })?;
            let chosen = Chosen {
                url,
                origin: "--proxy",
            };
            return Ok(Self {
                secure: Some(chosen.clone()),
                plain: Some(chosen),
                exceptions,
            });
        }
        // curl reads only the lowercase http_proxy: in a CGI program the
        // upper-case name can be set by a request's `Proxy:` header.
        Ok(Self {
            secure: pick(&["https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"])?,
            plain: pick(&["http_proxy", "all_proxy", "ALL_PROXY"])?,
            exceptions,
        })
    }

    /// How a dial to `host:port` goes; `secure` is true for `https`/`wss`.
    pub fn route(&self, host: &str, port: u16, secure: bool) -> Route<'_> {
        let chosen = if secure { &self.secure } else { &self.plain };
        match chosen {
            None => Route::Direct,
            Some(_) if self.exceptions.matches(host, port) => Route::Exempt,
            Some(chosen) => Route::Through {
                proxy: &chosen.url,
                origin: chosen.origin,
            },
        }
    }
}

#[cfg(test)]
mod tests;
