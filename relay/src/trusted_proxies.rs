//! Who the client really is when the relay sits behind a reverse proxy or
//! a load balancer (`--trusted-proxy`).
//!
//! Behind nginx or HAProxy every connection comes from the balancer, so the
//! per-source limits, the failure slowdown and the logs would all see one
//! address for the whole fleet. The balancer says who the client is: in
//! `X-Forwarded-For` (nginx, HTTP) or in a PROXY protocol header (HAProxy,
//! TCP; see [`crate::proxy_protocol`]). Anyone can write those, so they are
//! believed only from the addresses the operator listed as trusted; from
//! every other peer they are ignored, and the peer is the client.
//!
//! `X-Forwarded-For` is read the usual way, from the right: each proxy
//! appends the address it received the request from, so the right-most
//! address that is not itself a trusted proxy is the client. Entries left of
//! it were written by the client and are never read. A malformed entry met
//! on the way makes the whole header unusable, and the peer is taken.

use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use http::HeaderMap;
use ipnet::IpNet;

/// Most `X-Forwarded-For` entries read; a longer chain is treated as malformed.
pub const MAX_FORWARDED_HOPS: usize = 32;

/// `X-Forwarded-For`: the addresses a request passed through, client first.
pub const FORWARDED_FOR: &str = "x-forwarded-for";
/// `X-Forwarded-Proto`: the scheme the client used (`https`, `http`).
pub const FORWARDED_PROTO: &str = "x-forwarded-proto";
/// `X-Forwarded-Host`: the host (and port) the client asked for.
pub const FORWARDED_HOST: &str = "x-forwarded-host";

/// Parses one `--trusted-proxy` value: a network in CIDR form
/// (`10.0.0.0/8`, `fd00::/8`) or a single address (`127.0.0.1`, `::1`).
pub fn parse_trusted_proxy(text: &str) -> Result<IpNet, String> {
    let text = text.trim();
    if let Ok(network) = IpNet::from_str(text) {
        return Ok(network.trunc());
    }
    IpAddr::from_str(text).map(IpNet::from).map_err(|_| {
        format!("{text:?} is neither an address nor a network: write e.g. 10.0.0.5, 10.0.0.0/8 or fd00::/8")
    })
}

/// The networks whose connections may say who the client is.
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies {
    networks: Vec<IpNet>,
}

impl TrustedProxies {
    pub fn new(networks: Vec<IpNet>) -> Self {
        Self { networks }
    }

    pub fn is_empty(&self) -> bool {
        self.networks.is_empty()
    }

    /// Whether `address` is a trusted proxy. An IPv4 peer of a dual-stack
    /// listener (`::ffff:10.0.0.5`) matches the IPv4 networks.
    pub fn contains(&self, address: IpAddr) -> bool {
        let address = address.to_canonical();
        self.networks
            .iter()
            .any(|network| network.contains(&address))
    }

    /// The client behind `hop` (the address that sent us this request: the
    /// TCP peer, or the client a PROXY header named): from `X-Forwarded-For`
    /// when `hop` is trusted and the header is well formed, else `hop`.
    /// The port is the one written in the header, or 0 when none was.
    pub fn forwarded_client(&self, hop: SocketAddr, headers: &HeaderMap) -> SocketAddr {
        if !self.contains(hop.ip()) {
            return hop;
        }
        match client_from_forwarded_for(self, headers) {
            Ok(Some(client)) => client,
            Ok(None) => hop,
            Err(reason) => {
                tracing::debug!(%hop, reason, "X-Forwarded-For ignored");
                hop
            }
        }
    }

    /// How the client reached us as far as its streaming URL is concerned:
    /// a trusted hop's `X-Forwarded-Proto` and `X-Forwarded-Host` (else the
    /// `Host` header) — what the balancer's clients use. From anyone else,
    /// only `Host`.
    pub fn origin(&self, hop: SocketAddr, headers: &HeaderMap) -> ClientOrigin {
        let host_header = header_text(headers, http::header::HOST.as_str());
        if !self.contains(hop.ip()) {
            return ClientOrigin {
                host: host_header.map(str::to_string),
                secure: None,
            };
        }
        let forwarded_host = header_text(headers, FORWARDED_HOST).and_then(first_value);
        let secure = header_text(headers, FORWARDED_PROTO)
            .and_then(first_value)
            .and_then(|scheme| match scheme.to_ascii_lowercase().as_str() {
                "https" | "wss" => Some(true),
                "http" | "ws" => Some(false),
                _ => None,
            });
        ClientOrigin {
            host: forwarded_host.or(host_header).map(str::to_string),
            secure,
        }
    }
}

/// How a client reached the relay, for the streaming URL handed to it
/// (unless `--public-url` says).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientOrigin {
    /// `host[:port]` the client asked for: `Host`, a trusted proxy's
    /// `X-Forwarded-Host`, or the TLS server name on the MQTT listener.
    pub host: Option<String>,
    /// Whether the client used TLS, when a trusted proxy said so
    /// (`X-Forwarded-Proto`); `None`: as the relay's own listener.
    pub secure: Option<bool>,
}

impl ClientOrigin {
    pub fn host(host: Option<String>) -> Self {
        Self { host, secure: None }
    }
}

fn header_text<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|value| value.to_str().ok())
}

/// The first of a comma-separated list (the value the client's side wrote
/// when proxies append), trimmed; `None` when empty.
fn first_value(text: &str) -> Option<&str> {
    text.split(',')
        .next()
        .map(str::trim)
        .filter(|value| !value.is_empty())
}

/// Walks `X-Forwarded-For` from the right. `Ok(None)`: no header.
fn client_from_forwarded_for(
    trusted: &TrustedProxies,
    headers: &HeaderMap,
) -> Result<Option<SocketAddr>, &'static str> {
    let mut entries = Vec::new();
    for value in headers.get_all(FORWARDED_FOR) {
        let text = value.to_str().map_err(|_| "not ASCII")?;
        entries.extend(text.split(',').map(str::trim));
        if entries.len() > MAX_FORWARDED_HOPS {
            return Err("too many entries");
        }
    }
    let mut leftmost = None;
    for entry in entries.iter().rev() {
        let address = parse_entry(entry).ok_or("an entry is not an IP address")?;
        if !trusted.contains(address.ip()) {
            return Ok(Some(canonical(address)));
        }
        leftmost = Some(address);
    }
    // Every entry is a trusted proxy: the first one is as close to the
    // client as the chain tells.
    Ok(leftmost.map(canonical))
}

fn canonical(address: SocketAddr) -> SocketAddr {
    SocketAddr::new(address.ip().to_canonical(), address.port())
}

/// One entry: `203.0.113.7`, `203.0.113.7:41234`, `2001:db8::7`,
/// `[2001:db8::7]` or `[2001:db8::7]:41234`.
fn parse_entry(entry: &str) -> Option<SocketAddr> {
    if let Ok(address) = IpAddr::from_str(entry) {
        return Some(SocketAddr::new(address, 0));
    }
    if let Ok(address) = SocketAddr::from_str(entry) {
        return Some(address);
    }
    let inner = entry.strip_prefix('[')?.strip_suffix(']')?;
    IpAddr::from_str(inner)
        .ok()
        .map(|address| SocketAddr::new(address, 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trusted(networks: &[&str]) -> TrustedProxies {
        TrustedProxies::new(
            networks
                .iter()
                .map(|text| parse_trusted_proxy(text).expect("a valid network"))
                .collect(),
        )
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.append(*name, value.parse().expect("a header value"));
        }
        headers
    }

    fn address(text: &str) -> SocketAddr {
        text.parse().expect("a socket address")
    }

    #[test]
    fn trusted_proxies_are_networks_or_single_addresses_of_either_family() {
        let proxies = trusted(&["10.0.0.0/8", "192.0.2.7", "fd00::/8", "::1"]);
        assert!(proxies.contains("10.200.1.1".parse().unwrap()));
        assert!(proxies.contains("192.0.2.7".parse().unwrap()));
        assert!(!proxies.contains("192.0.2.8".parse().unwrap()));
        assert!(proxies.contains("fd12::1".parse().unwrap()));
        assert!(proxies.contains("::1".parse().unwrap()));
        assert!(!proxies.contains("::2".parse().unwrap()));
        assert!(
            proxies.contains("::ffff:10.1.2.3".parse().unwrap()),
            "an IPv4 peer on a dual-stack listener"
        );
        assert_eq!(
            parse_trusted_proxy("10.1.2.3/8").unwrap().to_string(),
            "10.0.0.0/8"
        );
        for bad in ["", "10.0.0.0/33", "example.com", "10.0.0.1:80"] {
            assert!(parse_trusted_proxy(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn the_rightmost_untrusted_address_is_the_client() {
        let proxies = trusted(&["10.0.0.0/8"]);
        let hop = address("10.0.0.1:5000");
        let forwarded = headers(&[(FORWARDED_FOR, "198.51.100.9, 203.0.113.7, 10.0.0.2")]);
        assert_eq!(
            proxies.forwarded_client(hop, &forwarded),
            address("203.0.113.7:0"),
            "198.51.100.9 was written by the client itself and is not read"
        );
        let split = headers(&[
            (FORWARDED_FOR, "203.0.113.7"),
            (FORWARDED_FOR, "10.0.0.3, 10.0.0.2"),
        ]);
        assert_eq!(
            proxies.forwarded_client(hop, &split),
            address("203.0.113.7:0"),
            "several header lines are one list"
        );
        let with_ports = headers(&[(FORWARDED_FOR, "[2001:db8::7]:41234, 10.0.0.2:80")]);
        assert_eq!(
            proxies.forwarded_client(hop, &with_ports),
            address("[2001:db8::7]:41234")
        );
        let all_trusted = headers(&[(FORWARDED_FOR, "10.9.9.9, 10.0.0.2")]);
        assert_eq!(
            proxies.forwarded_client(hop, &all_trusted),
            address("10.9.9.9:0")
        );
    }

    #[test]
    fn forwarded_for_from_an_untrusted_peer_is_ignored() {
        let proxies = trusted(&["10.0.0.0/8"]);
        let hop = address("198.51.100.1:5000");
        let forwarded = headers(&[(FORWARDED_FOR, "203.0.113.7")]);
        assert_eq!(proxies.forwarded_client(hop, &forwarded), hop);
        assert_eq!(
            TrustedProxies::default().forwarded_client(hop, &forwarded),
            hop,
            "no --trusted-proxy: nobody is believed"
        );
    }

    #[test]
    fn a_malformed_or_missing_header_leaves_the_peer() {
        let proxies = trusted(&["10.0.0.0/8"]);
        let hop = address("10.0.0.1:5000");
        for value in ["unknown", "203.0.113.7, not-an-ip", "", "1.2.3.4 5.6.7.8"] {
            assert_eq!(
                proxies.forwarded_client(hop, &headers(&[(FORWARDED_FOR, value)])),
                hop,
                "{value:?}"
            );
        }
        assert_eq!(proxies.forwarded_client(hop, &HeaderMap::new()), hop);
        let long = vec!["10.0.0.9"; MAX_FORWARDED_HOPS + 1].join(",");
        assert_eq!(
            proxies.forwarded_client(hop, &headers(&[(FORWARDED_FOR, &long)])),
            hop
        );
        // Garbage left of the client is the client's own and is never read.
        assert_eq!(
            proxies.forwarded_client(
                hop,
                &headers(&[(FORWARDED_FOR, "garbage, 203.0.113.7, 10.0.0.2")])
            ),
            address("203.0.113.7:0")
        );
    }

    #[test]
    fn origin_follows_a_trusted_proxy_and_only_the_host_header_otherwise() {
        let proxies = trusted(&["10.0.0.0/8"]);
        let sent = headers(&[
            ("host", "relay-internal:8080"),
            (FORWARDED_PROTO, "https"),
            (FORWARDED_HOST, "relay.example.com:443"),
        ]);
        assert_eq!(
            proxies.origin(address("10.0.0.1:5000"), &sent),
            ClientOrigin {
                host: Some("relay.example.com:443".into()),
                secure: Some(true)
            }
        );
        assert_eq!(
            proxies.origin(address("198.51.100.1:5000"), &sent),
            ClientOrigin {
                host: Some("relay-internal:8080".into()),
                secure: None
            }
        );
        let proto_only = headers(&[("host", "relay.example.com"), (FORWARDED_PROTO, "http")]);
        assert_eq!(
            proxies.origin(address("10.0.0.1:5000"), &proto_only),
            ClientOrigin {
                host: Some("relay.example.com".into()),
                secure: Some(false)
            }
        );
    }
}
