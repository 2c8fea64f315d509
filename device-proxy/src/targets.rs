//! Which local TCP services a stream may reach.
//!
//! The device decides, not the service: a service may *ask* for a port or a
//! `HOST:PORT` in its stream request, but only targets the operator exposed on
//! the command line (the positional target and every `--allow`) are ever
//! dialed. Anything else is refused with a reason the operator can act on, so
//! a compromised or mistaken service cannot turn the device into a pivot into
//! its local network.

use std::fmt;

use framing::connection_string::split_host_port;

/// One local TCP service, `host:port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub host: String,
    pub port: u16,
}

/// Why a `HOST:PORT` text is not a target.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TargetParseError {
    #[error("{0:?} is not HOST:PORT (for example localhost:22 or [::1]:22)")]
    NotHostPort(String),
    #[error("{0:?} has port 0; use a port between 1 and 65535")]
    PortZero(String),
}

impl Target {
    pub fn new(host: impl Into<String>, port: u16) -> Self {
        Self {
            host: host.into(),
            port,
        }
    }

    /// Parses `host:port` or `[v6-address]:port`.
    pub fn parse(text: &str) -> Result<Self, TargetParseError> {
        let (host, port) = split_host_port(text.trim());
        match port {
            Some(0) => Err(TargetParseError::PortZero(text.to_string())),
            // A host never holds white space or control characters; refusing
            // them keeps what is logged and compared exactly what was meant.
            Some(port)
                if !host.is_empty()
                    && !host.chars().any(|c| c.is_whitespace() || c.is_control()) =>
            {
                Ok(Self::new(host, port))
            }
            _ => Err(TargetParseError::NotHostPort(text.to_string())),
        }
    }

    /// Host names are compared without regard to case, as DNS does.
    fn same_as(&self, other: &Target) -> bool {
        self.port == other.port && self.host.eq_ignore_ascii_case(&other.host)
    }
}

impl fmt::Display for Target {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(formatter, "[{}]:{}", self.host, self.port)
        } else {
            write!(formatter, "{}:{}", self.host, self.port)
        }
    }
}

/// Why a stream request's target was refused; the message is logged on the
/// device and tells the operator how to expose the target if it is wanted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TargetRefusal {
    #[error("the service asked for {requested:?}, which is neither PORT nor HOST:PORT")]
    Malformed { requested: String },
    #[error("the service asked for {requested}, which this device does not expose (exposed: {exposed}); add it with --allow HOST:PORT if it should be reachable")]
    NotExposed { requested: String, exposed: String },
}

/// The targets this device exposes; the first is the default for requests
/// that name none.
#[derive(Debug, Clone)]
pub struct ExposedTargets {
    targets: Vec<Target>,
}

impl ExposedTargets {
    /// `default` first, then each allowed target not already listed.
    pub fn new(default: Target, allowed: impl IntoIterator<Item = Target>) -> Self {
        let mut targets = vec![default];
        for target in allowed {
            if !targets.iter().any(|known| known.same_as(&target)) {
                targets.push(target);
            }
        }
        Self { targets }
    }

    pub fn default_target(&self) -> &Target {
        &self.targets[0]
    }

    /// Picks the target for a request: none asked → the default; `PORT` →
    /// the first exposed target on that port; `HOST:PORT` → that exact
    /// exposed target.
    pub fn select(&self, requested: Option<&str>) -> Result<&Target, TargetRefusal> {
        let Some(requested) = requested else {
            return Ok(self.default_target());
        };
        let malformed = || TargetRefusal::Malformed {
            requested: requested.to_string(),
        };
        let not_exposed = || TargetRefusal::NotExposed {
            requested: requested.to_string(),
            exposed: self.to_string(),
        };
        if !requested.is_empty() && requested.bytes().all(|byte| byte.is_ascii_digit()) {
            let port: u16 = requested.parse().map_err(|_| malformed())?;
            if port == 0 {
                return Err(malformed());
            }
            return self
                .targets
                .iter()
                .find(|target| target.port == port)
                .ok_or_else(not_exposed);
        }
        let wanted = Target::parse(requested).map_err(|_| malformed())?;
        self.targets
            .iter()
            .find(|target| target.same_as(&wanted))
            .ok_or_else(not_exposed)
    }
}

impl fmt::Display for ExposedTargets {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, target) in self.targets.iter().enumerate() {
            if index > 0 {
                formatter.write_str(", ")?;
            }
            write!(formatter, "{target}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_with_white_space_or_control_characters_are_refused() {
        for text in ["[ x]:2", "a b:22", "x\u{7}:22", "[x\n]:80"] {
            assert!(Target::parse(text).is_err(), "{text:?}");
        }
    }

    fn exposed() -> ExposedTargets {
        ExposedTargets::new(
            Target::new("localhost", 22),
            [
                Target::new("127.0.0.1", 3389),
                Target::new("10.0.0.5", 22),
                Target::new("LOCALHOST", 22),
            ],
        )
    }

    #[test]
    fn request_without_target_gets_the_positional_target() {
        assert_eq!(
            exposed().select(None).unwrap(),
            &Target::new("localhost", 22)
        );
    }

    #[test]
    fn port_only_request_gets_the_first_target_on_that_port() {
        let targets = exposed();
        assert_eq!(
            targets.select(Some("22")).unwrap(),
            &Target::new("localhost", 22)
        );
        assert_eq!(
            targets.select(Some("3389")).unwrap(),
            &Target::new("127.0.0.1", 3389)
        );
    }

    #[test]
    fn host_and_port_request_must_match_an_exposed_target() {
        let targets = exposed();
        assert_eq!(
            targets.select(Some("10.0.0.5:22")).unwrap(),
            &Target::new("10.0.0.5", 22)
        );
        assert_eq!(
            targets.select(Some("LocalHost:22")).unwrap(),
            &Target::new("localhost", 22)
        );
        assert!(matches!(
            targets.select(Some("10.0.0.5:3389")),
            Err(TargetRefusal::NotExposed { .. })
        ));
        assert!(matches!(
            targets.select(Some("example.com:22")),
            Err(TargetRefusal::NotExposed { .. })
        ));
    }

    #[test]
    fn unexposed_port_is_refused_with_the_exposed_list() {
        let refusal = exposed().select(Some("8080")).unwrap_err();
        let message = refusal.to_string();
        assert!(
            message.contains("8080")
                && message.contains("localhost:22, 127.0.0.1:3389, 10.0.0.5:22"),
            "{message}"
        );
        assert!(message.contains("--allow"), "{message}");
    }

    #[test]
    fn malformed_requests_are_refused() {
        let targets = exposed();
        for requested in [
            "",
            "0",
            "70000",
            "localhost",
            "localhost:",
            ":22",
            "a:b",
            "localhost:0",
        ] {
            assert!(
                matches!(
                    targets.select(Some(requested)),
                    Err(TargetRefusal::Malformed { .. })
                ),
                "{requested:?} should be malformed"
            );
        }
    }

    #[test]
    fn duplicate_allowed_targets_are_listed_once() {
        assert_eq!(
            exposed().to_string(),
            "localhost:22, 127.0.0.1:3389, 10.0.0.5:22"
        );
    }

    #[test]
    fn targets_parse_and_print_ipv6() {
        let target = Target::parse("[::1]:22").unwrap();
        assert_eq!(target, Target::new("::1", 22));
        assert_eq!(target.to_string(), "[::1]:22");
        assert_eq!(
            Target::parse("localhost:0"),
            Err(TargetParseError::PortZero("localhost:0".into()))
        );
        assert!(Target::parse("localhost").is_err());
    }
}
