//! Policy rights, as IoT Hub has them: a service policy may connect to
//! devices (create streams), read the registry and live state, or change
//! them. Each request to the relay needs one right; a policy without it is
//! answered 401 with the missing right named, so an operator knows which
//! connection string to use instead.
//!
//! Rights are stored as their names (`service-connect,registry-read`), so
//! the SQLite column, the cluster's bucket and registry exports read alike;
//! IoT Hub's spellings (`ServiceConnect`, `RegistryRead`, `RegistryWrite`)
//! are accepted wherever rights are parsed.

use std::time::SystemTime;

use framing::sas::{ExpiryPolicy, SasToken};
use http::HeaderMap;

use crate::registry::PolicyRecord;
use crate::state::RelayState;

/// One right of a policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Right {
    /// Create streams to devices (the REST call of service programs).
    ServiceConnect,
    /// Read devices, policies' names and live state (admin API reads).
    RegistryRead,
    /// Change them: close streams, disconnect devices (admin API changes).
    RegistryWrite,
}

impl Right {
    pub const ALL: [Right; 3] = [
        Right::ServiceConnect,
        Right::RegistryRead,
        Right::RegistryWrite,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Right::ServiceConnect => "service-connect",
            Right::RegistryRead => "registry-read",
            Right::RegistryWrite => "registry-write",
        }
    }

    fn bit(self) -> u8 {
        match self {
            Right::ServiceConnect => 1,
            Right::RegistryRead => 2,
            Right::RegistryWrite => 4,
        }
    }

    /// Parses our name or IoT Hub's (`ServiceConnect`), any case.
    pub fn parse(text: &str) -> Result<Right, String> {
        let folded: String = text
            .trim()
            .chars()
            .filter(|c| *c != '-' && *c != '_')
            .collect::<String>()
            .to_ascii_lowercase();
        Right::ALL
            .into_iter()
            .find(|right| right.name().replace('-', "") == folded)
            .ok_or_else(|| {
                format!(
                    "unknown right {text:?}: use service-connect, registry-read or registry-write"
                )
            })
    }
}

impl std::fmt::Display for Right {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(self.name())
    }
}

/// A set of rights.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct Rights(u8);

impl Rights {
    /// What every policy could do before rights existed: connect to devices.
    pub const SERVICE_CONNECT: Rights = Rights(1);
    /// `registryReadWrite`'s rights.
    pub const REGISTRY_READ_WRITE: Rights = Rights(2 | 4);
    pub const ALL: Rights = Rights(1 | 2 | 4);

    pub fn of(rights: &[Right]) -> Rights {
        Rights(rights.iter().fold(0, |bits, right| bits | right.bit()))
    }

    pub fn has(self, right: Right) -> bool {
        self.0 & right.bit() != 0
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// Parses a comma-separated list (`service-connect,registry-read`).
    pub fn parse(text: &str) -> Result<Rights, String> {
        let mut rights = Rights::default();
        for part in text.split(',').filter(|part| !part.trim().is_empty()) {
            rights.0 |= Right::parse(part)?.bit();
        }
        Ok(rights)
    }

    pub fn iter(self) -> impl Iterator<Item = Right> {
        Right::ALL.into_iter().filter(move |right| self.has(*right))
    }
}

impl std::fmt::Display for Rights {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.iter().map(Right::name).collect();
        formatter.write_str(&names.join(","))
    }
}

impl std::fmt::Debug for Rights {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(formatter, "Rights({self})")
    }
}

impl serde::Serialize for Rights {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_string())
    }
}

impl<'de> serde::Deserialize<'de> for Rights {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Rights::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// For records written before rights existed: those policies connected to
/// devices, and keep doing so.
pub fn legacy_rights() -> Rights {
    Rights::SERVICE_CONNECT
}

/// Why a request was refused.
#[derive(Debug)]
pub enum Refusal {
    /// No valid SAS token of a known policy.
    BadCredentials(String),
    /// A valid token of a policy that lacks the right.
    MissingRight { policy: String, right: Right },
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::BadCredentials(reason) => formatter.write_str(reason),
            Refusal::MissingRight { policy, right } => write!(
                formatter,
                "policy {policy:?} lacks the {right} right; use a policy that has it \
                 (`relay policy list` shows each policy's rights)"
            ),
        }
    }
}

/// Checks the `Authorization` SAS token: a known policy's key must have
/// signed it, and the policy must have `right`. Returns the policy.
pub fn authorize(
    state: &RelayState,
    headers: &HeaderMap,
    right: Right,
) -> Result<PolicyRecord, Refusal> {
    let policy = authenticate(state, headers).map_err(Refusal::BadCredentials)?;
    if !policy.rights.has(right) {
        return Err(Refusal::MissingRight {
            policy: policy.name,
            right,
        });
    }
    Ok(policy)
}

fn authenticate(state: &RelayState, headers: &HeaderMap) -> Result<PolicyRecord, String> {
    let text = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .ok_or("missing Authorization header")?;
    let token = SasToken::parse(text).map_err(|error| error.to_string())?;
    let policy_name = token
        .key_name
        .clone()
        .ok_or("the SAS token names no policy (skn): use a service connection string")?;
    let policy = state
        .registry
        .policy(&policy_name)
        .map_err(|error| format!("registry: {error}"))?
        .ok_or_else(|| format!("policy {policy_name:?} does not exist"))?;
    let keys = policy.key_bytes();
    let key_slices: Vec<&[u8]> = keys.iter().map(Vec::as_slice).collect();
    let expiry = ExpiryPolicy {
        clock_skew: state.config.limits.clock_skew,
        max_lifetime: state.config.limits.max_token_lifetime,
    };
    token
        .verify(&key_slices, SystemTime::now(), expiry)
        .map_err(|error| error.to_string())?;
    Ok(policy)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rights_parse_our_names_and_iothubs() {
        assert_eq!(
            Rights::parse("service-connect,registry-read").unwrap(),
            Rights::of(&[Right::ServiceConnect, Right::RegistryRead])
        );
        assert_eq!(
            Rights::parse("ServiceConnect, RegistryRead,RegistryWrite").unwrap(),
            Rights::ALL
        );
        assert_eq!(
            Rights::ALL.to_string(),
            "service-connect,registry-read,registry-write"
        );
        assert!(Rights::parse("registry-delete")
            .unwrap_err()
            .contains("registry-delete"));
        let json = serde_json::to_string(&Rights::REGISTRY_READ_WRITE).unwrap();
        assert_eq!(json, "\"registry-read,registry-write\"");
        assert_eq!(
            serde_json::from_str::<Rights>(&json).unwrap(),
            Rights::REGISTRY_READ_WRITE
        );
    }
}
