//! `NO_PROXY`: the hosts a client reaches directly although a proxy is set.
//!
//! Read as curl reads it, since operators copy these values between tools:
//! entries separated by commas (spaces around them ignored); `*` exempts
//! every host; a host name exempts itself and every name below it, with or
//! without a leading dot (`example.com` and `.example.com` both exempt
//! `relay.example.com`, never `badexample.com`); an IP address or a CIDR
//! block (`10.0.0.0/8`, `fd00::/8`) exempts hosts *written* as addresses in
//! it. Names are never resolved to check them against addresses, and
//! loopback is not exempt unless listed (curl neither). An entry may end in
//! `:PORT`, and then exempts only that port. Comparison ignores case and a
//! name's trailing dot.

use std::net::IpAddr;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NoProxy {
    everything: bool,
    entries: Vec<Entry>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Entry {
    Network {
        address: IpAddr,
        prefix: u8,
        port: Option<u16>,
    },
    Domain {
        name: String,
        port: Option<u16>,
    },
}

impl NoProxy {
    /// Parses a `NO_PROXY` value. Nothing is refused: an entry that is not
    /// an address is taken as a name, as curl does.
    pub fn parse(list: &str) -> Self {
        let mut parsed = Self::default();
        for entry in list
            .split(',')
            .map(str::trim)
            .filter(|entry| !entry.is_empty())
        {
            if entry == "*" {
                parsed.everything = true;
            } else if let Some(entry) = parse_entry(entry) {
                parsed.entries.push(entry);
            }
        }
        parsed
    }

    pub fn is_empty(&self) -> bool {
        !self.everything && self.entries.is_empty()
    }

    /// Whether a dial to `host:port` skips the proxy. `host` is a name or
    /// an address, IPv6 with or without brackets.
    pub fn matches(&self, host: &str, port: u16) -> bool {
        if self.everything {
            return true;
        }
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let port_matches = |wanted: &Option<u16>| wanted.is_none_or(|wanted| wanted == port);
        if let Ok(host_address) = host.parse::<IpAddr>() {
            return self.entries.iter().any(|entry| match entry {
                Entry::Network {
                    address,
                    prefix,
                    port: wanted,
                } => port_matches(wanted) && in_network(host_address, *address, *prefix),
                Entry::Domain { .. } => false,
            });
        }
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        self.entries.iter().any(|entry| match entry {
            Entry::Domain { name, port: wanted } => {
                port_matches(wanted)
                    && (host == *name
                        || host
                            .strip_suffix(name.as_str())
                            .is_some_and(|rest| rest.ends_with('.')))
            }
            Entry::Network { .. } => false,
        })
    }
}

fn parse_entry(entry: &str) -> Option<Entry> {
    // [v6], [v6]:port, [v6]/prefix
    if let Some(rest) = entry.strip_prefix('[') {
        let (inside, after) = rest.split_once(']')?;
        let address: IpAddr = inside.parse().ok()?;
        let port = match after.strip_prefix(':') {
            Some(port) => Some(port.parse().ok()?),
            None if after.is_empty() => None,
            None => return network_entry(&format!("{inside}{after}"), None),
        };
        return Some(Entry::Network {
            address,
            prefix: full_prefix(address),
            port,
        });
    }
    if let Some(entry) = network_entry(entry, None) {
        return Some(entry);
    }
    // v4:port or name:port; a bare IPv6 address has several colons and was
    // taken above.
    let (host, port) = match entry.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') => (host, Some(port.parse().ok()?)),
        _ => (entry, None),
    };
    if let Some(entry) = network_entry(host, port) {
        return Some(entry);
    }
    let name = host
        .trim_start_matches("*.")
        .trim_start_matches('.')
        .trim_end_matches('.')
        .to_ascii_lowercase();
    (!name.is_empty()).then_some(Entry::Domain { name, port })
}

/// An address or a CIDR block.
fn network_entry(text: &str, port: Option<u16>) -> Option<Entry> {
    let (address, prefix) = match text.split_once('/') {
        Some((address, prefix)) => {
            let address: IpAddr = address.parse().ok()?;
            let prefix: u8 = prefix.parse().ok()?;
            (prefix <= full_prefix(address)).then_some((address, prefix))?
        }
        None => {
            let address: IpAddr = text.parse().ok()?;
            (address, full_prefix(address))
        }
    };
    Some(Entry::Network {
        address,
        prefix,
        port,
    })
}

fn full_prefix(address: IpAddr) -> u8 {
    match address {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    }
}

fn in_network(host: IpAddr, network: IpAddr, prefix: u8) -> bool {
    match (host, network) {
        (IpAddr::V4(host), IpAddr::V4(network)) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            u32::from(host) & mask == u32::from(network) & mask
        }
        (IpAddr::V6(host), IpAddr::V6(network)) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            u128::from(host) & mask == u128::from(network) & mask
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_exempts_itself_and_the_names_below_it_with_or_without_a_leading_dot() {
        for list in [
            "example.com",
            ".example.com",
            "*.example.com",
            "EXAMPLE.com.",
        ] {
            let no_proxy = NoProxy::parse(list);
            assert!(no_proxy.matches("example.com", 443), "{list}");
            assert!(no_proxy.matches("relay.example.com", 443), "{list}");
            assert!(no_proxy.matches("Relay.Example.COM.", 443), "{list}");
            assert!(!no_proxy.matches("badexample.com", 443), "{list}");
            assert!(!no_proxy.matches("example.com.evil.net", 443), "{list}");
            assert!(!no_proxy.matches("com", 443), "{list}");
        }
    }

    #[test]
    fn entries_are_separated_by_commas_and_spaces_around_them_are_ignored() {
        let no_proxy = NoProxy::parse(" intranet.local , ,relay.example.com,10.0.0.0/8 ");
        assert!(no_proxy.matches("intranet.local", 443));
        assert!(no_proxy.matches("relay.example.com", 8443));
        assert!(no_proxy.matches("10.1.2.3", 443));
        assert!(!no_proxy.matches("example.com", 443));
    }

    #[test]
    fn a_star_exempts_every_host() {
        let no_proxy = NoProxy::parse("*");
        assert!(no_proxy.matches("relay.example.com", 443));
        assert!(no_proxy.matches("192.0.2.1", 443));
        assert!(NoProxy::parse("localhost, *").matches("example.org", 1));
    }

    #[test]
    fn addresses_and_cidr_blocks_exempt_hosts_written_as_addresses() {
        let no_proxy = NoProxy::parse("192.168.0.0/16,10.1.2.3,::1,fd00::/8,[2001:db8::1]");
        assert!(no_proxy.matches("192.168.44.5", 443));
        assert!(!no_proxy.matches("192.169.0.1", 443));
        assert!(no_proxy.matches("10.1.2.3", 443));
        assert!(!no_proxy.matches("10.1.2.4", 443));
        assert!(no_proxy.matches("::1", 443));
        assert!(no_proxy.matches("[::1]", 443));
        assert!(no_proxy.matches("fd12:3456::7", 443));
        assert!(no_proxy.matches("2001:db8::1", 443));
        assert!(!no_proxy.matches("2001:db8::2", 443));
        assert!(NoProxy::parse("0.0.0.0/0").matches("203.0.113.9", 1));
        assert!(!NoProxy::parse("0.0.0.0/0").matches("::1", 1));
    }

    #[test]
    fn names_are_not_resolved_so_loopback_is_exempt_only_when_listed() {
        assert!(!NoProxy::parse("127.0.0.1").matches("localhost", 443));
        assert!(!NoProxy::parse("localhost").matches("127.0.0.1", 443));
        assert!(!NoProxy::parse("").matches("localhost", 443));
        assert!(NoProxy::parse("").is_empty());
        assert!(NoProxy::parse("localhost,127.0.0.0/8").matches("127.0.0.1", 443));
    }

    #[test]
    fn an_entry_with_a_port_exempts_that_port_only() {
        let no_proxy = NoProxy::parse("relay.example.com:8443,10.0.0.1:443,[::1]:8443");
        assert!(no_proxy.matches("relay.example.com", 8443));
        assert!(!no_proxy.matches("relay.example.com", 443));
        assert!(no_proxy.matches("10.0.0.1", 443));
        assert!(!no_proxy.matches("10.0.0.1", 8443));
        assert!(no_proxy.matches("::1", 8443));
        assert!(!no_proxy.matches("::1", 443));
    }

    #[test]
    fn malformed_entries_exempt_nothing() {
        let no_proxy = NoProxy::parse("10.0.0.0/40,host:notaport,[::1,.");
        assert!(!no_proxy.matches("10.0.0.1", 443));
        assert!(!no_proxy.matches("host", 443));
        assert!(!no_proxy.matches("::1", 443));
        assert!(!no_proxy.matches("example.com", 443));
    }
}
