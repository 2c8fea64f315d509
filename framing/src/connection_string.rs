//! IoT Hub connection strings: `HostName=…;DeviceId=…;SharedAccessKey=…`.
//!
//! One parser serves device and service strings, because IoT Hub tools hand
//! out both in the same `key=value;…` form. Values are base64 keys that may
//! contain `=`, so each pair is split at its *first* `=` only. Unknown keys are
//! ignored (IoT Hub adds keys such as `GatewayHostName` over time). The key is
//! never printed: `Debug` redacts it so a log line cannot leak it.

use std::fmt;

use base64::Engine;

/// Why a connection string was refused; each message says what to fix.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConnectionStringError {
    #[error(
        "connection string part {part:?} has no '=': expected key=value pairs separated by ';'"
    )]
    MissingEquals { part: String },
    #[error("connection string has no {key}: expected HostName=…;{expected}")]
    MissingKey {
        key: &'static str,
        expected: &'static str,
    },
    #[error("connection string SharedAccessKey is not valid base64: copy the whole key as printed by `relay device add` or `relay policy show`")]
    KeyNotBase64,
    #[error("connection string is a {found} connection string, but a {wanted} connection string is needed here")]
    WrongKind {
        found: &'static str,
        wanted: &'static str,
    },
    #[error("connection string HostName {0:?} is not a host name or host:port")]
    BadHostName(String),
    #[error("connection string {key} {id:?} is not a valid id: {reason}")]
    BadId {
        key: &'static str,
        id: String,
        reason: crate::identity::IdError,
    },
}

/// A parsed connection string; holds the decoded key bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct ConnectionString {
    /// `host` or `host:port` of the relay, as written.
    pub host_name: String,
    pub device_id: Option<String>,
    pub module_id: Option<String>,
    pub shared_access_key_name: Option<String>,
    /// The key as written (base64), kept so the string can be printed again.
    shared_access_key: String,
    key_bytes: Vec<u8>,
}

impl ConnectionString {
    pub fn parse(text: &str) -> Result<Self, ConnectionStringError> {
        let mut host_name = None;
        let mut device_id = None;
        let mut module_id = None;
        let mut key_name = None;
        let mut key = None;
        for part in text
            .trim()
            .split(';')
            .map(str::trim)
            .filter(|p| !p.is_empty())
        {
            let (name, value) = part.split_once('=').ok_or_else(|| {
                ConnectionStringError::MissingEquals {
                    // Never echo a whole part that may hold a key.
                    part: part.chars().take(24).collect(),
                }
            })?;
            let value = value.trim().to_string();
            match name.trim() {
                "HostName" => host_name = Some(value),
                "DeviceId" => device_id = Some(value),
                "ModuleId" => module_id = Some(value),
                "SharedAccessKeyName" => key_name = Some(value),
                "SharedAccessKey" => key = Some(value),
                _ => {}
            }
        }
        let host_name = host_name.filter(|h| !h.is_empty()).ok_or(ConnectionStringError::MissingKey {
            key: "HostName",
            expected: "DeviceId=…;SharedAccessKey=… or HostName=…;SharedAccessKeyName=…;SharedAccessKey=…",
        })?;
        if host_name.contains(['/', ' ', '@', '?', '#']) {
            return Err(ConnectionStringError::BadHostName(host_name));
        }
        let shared_access_key =
            key.filter(|k| !k.is_empty())
                .ok_or(ConnectionStringError::MissingKey {
                    key: "SharedAccessKey",
                    expected: "…;SharedAccessKey=<base64 key>",
                })?;
        let key_bytes = base64::engine::general_purpose::STANDARD
            .decode(&shared_access_key)
            .map_err(|_| ConnectionStringError::KeyNotBase64)?;
        // An empty value counts as absent, here as in the result: `DeviceId=;`
        // alone must not make a string that is neither device nor service.
        let device_id = device_id.filter(|d| !d.is_empty());
        let key_name = key_name.filter(|k| !k.is_empty());
        if device_id.is_none() && key_name.is_none() {
            return Err(ConnectionStringError::MissingKey {
                key: "DeviceId or SharedAccessKeyName",
                expected: "DeviceId=<device>;SharedAccessKey=… (device) or SharedAccessKeyName=service;SharedAccessKey=… (service)",
            });
        }
        let module_id = module_id.filter(|m| !m.is_empty());
        for (key, id) in [("DeviceId", &device_id), ("ModuleId", &module_id)] {
            if let Some(id) = id {
                crate::identity::validate_id(id).map_err(|reason| {
                    ConnectionStringError::BadId {
                        key,
                        id: id.clone(),
                        reason,
                    }
                })?;
            }
        }
        Ok(Self {
            host_name,
            device_id,
            module_id,
            shared_access_key_name: key_name,
            shared_access_key,
            key_bytes,
        })
    }

    /// Parses a string that must identify a device.
    pub fn parse_device(text: &str) -> Result<Self, ConnectionStringError> {
        let parsed = Self::parse(text)?;
        if parsed.device_id.is_none() {
            return Err(ConnectionStringError::WrongKind {
                found: "service",
                wanted: "device",
            });
        }
        Ok(parsed)
    }

    /// Parses a string that must carry a service policy.
    pub fn parse_service(text: &str) -> Result<Self, ConnectionStringError> {
        let parsed = Self::parse(text)?;
        if parsed.shared_access_key_name.is_none() || parsed.device_id.is_some() {
            return Err(ConnectionStringError::WrongKind {
                found: "device",
                wanted: "service",
            });
        }
        Ok(parsed)
    }

    /// Builds a device connection string from its parts.
    pub fn for_device(
        host_name: &str,
        device_id: &str,
        key_base64: &str,
    ) -> Result<Self, ConnectionStringError> {
        Self::parse(&format!(
            "HostName={host_name};DeviceId={device_id};SharedAccessKey={key_base64}"
        ))
    }

    /// Builds a service connection string from its parts.
    pub fn for_policy(
        host_name: &str,
        policy: &str,
        key_base64: &str,
    ) -> Result<Self, ConnectionStringError> {
        Self::parse(&format!(
            "HostName={host_name};SharedAccessKeyName={policy};SharedAccessKey={key_base64}"
        ))
    }

    pub fn key(&self) -> &[u8] {
        &self.key_bytes
    }

    /// The host without a port, for TLS server-name checks.
    pub fn host(&self) -> &str {
        split_host_port(&self.host_name).0
    }

    /// The port, or 443 when the string names none (IoT Hub's default).
    pub fn port(&self) -> u16 {
        split_host_port(&self.host_name).1.unwrap_or(443)
    }

    /// The whole string, key included, in canonical order: for printing to
    /// the operator who asked for it, never for logs.
    pub fn to_secret_string(&self) -> String {
        let mut text = format!("HostName={}", self.host_name);
        if let Some(device_id) = &self.device_id {
            text.push_str(&format!(";DeviceId={device_id}"));
        }
        if let Some(module_id) = &self.module_id {
            text.push_str(&format!(";ModuleId={module_id}"));
        }
        if let Some(name) = &self.shared_access_key_name {
            text.push_str(&format!(";SharedAccessKeyName={name}"));
        }
        text.push_str(&format!(";SharedAccessKey={}", self.shared_access_key));
        text
    }
}

impl fmt::Debug for ConnectionString {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("ConnectionString")
            .field("host_name", &self.host_name)
            .field("device_id", &self.device_id)
            .field("module_id", &self.module_id)
            .field("shared_access_key_name", &self.shared_access_key_name)
            .field("shared_access_key", &"<redacted>")
            .finish()
    }
}

/// Splits `host:port`, `[v6]:port`, `host` into host and optional port.
pub fn split_host_port(text: &str) -> (&str, Option<u16>) {
    if let Some(rest) = text.strip_prefix('[') {
        if let Some((host, after)) = rest.split_once(']') {
            let port = after.strip_prefix(':').and_then(|p| p.parse().ok());
            return (host, port);
        }
    }
    match text.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') => match port.parse() {
            Ok(port) => (host, Some(port)),
            Err(_) => (text, None),
        },
        _ => (text, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "c2VjcmV0LWtleS1ieXRlcw==";

    #[test]
    fn device_string_is_parsed_with_equals_in_key() {
        let parsed = ConnectionString::parse(&format!(
            "HostName=relay.example.com:8443;DeviceId=MyDevice;SharedAccessKey={KEY}"
        ))
        .unwrap();
        assert_eq!(parsed.host_name, "relay.example.com:8443");
        assert_eq!(parsed.host(), "relay.example.com");
        assert_eq!(parsed.port(), 8443);
        assert_eq!(parsed.device_id.as_deref(), Some("MyDevice"));
        assert_eq!(parsed.key(), b"secret-key-bytes");
    }

    #[test]
    fn unknown_keys_and_any_order_are_accepted() {
        let parsed = ConnectionString::parse_service(&format!(
            "SharedAccessKey={KEY};GatewayHostName=x;SharedAccessKeyName=service;HostName=hub"
        ))
        .unwrap();
        assert_eq!(parsed.shared_access_key_name.as_deref(), Some("service"));
        assert_eq!(parsed.port(), 443);
    }

    #[test]
    fn missing_parts_are_refused_with_a_reason() {
        assert!(matches!(
            ConnectionString::parse("DeviceId=a;SharedAccessKey=AA=="),
            Err(ConnectionStringError::MissingKey {
                key: "HostName",
                ..
            })
        ));
        assert!(matches!(
            ConnectionString::parse("HostName=h;DeviceId=a"),
            Err(ConnectionStringError::MissingKey {
                key: "SharedAccessKey",
                ..
            })
        ));
        assert_eq!(
            ConnectionString::parse("HostName=h;DeviceId=a;SharedAccessKey=!!"),
            Err(ConnectionStringError::KeyNotBase64)
        );
        assert!(matches!(
            ConnectionString::parse("garbage"),
            Err(ConnectionStringError::MissingEquals { .. })
        ));
        assert!(ConnectionString::parse_device(&format!(
            "HostName=h;SharedAccessKeyName=service;SharedAccessKey={KEY}"
        ))
        .is_err());
    }

    /// Found by fuzzing (fuzz/fuzz_targets/connection_string.rs): this parsed
    /// to a string with neither a device nor a policy, which printed back as
    /// a string that did not parse.
    #[test]
    fn empty_device_id_or_policy_counts_as_missing() {
        for text in [
            "HostName=h;DeviceId=;SharedAccessKey=AA==",
            "HostName=h;SharedAccessKeyName= ;SharedAccessKey=AA==",
        ] {
            assert!(
                matches!(
                    ConnectionString::parse(text),
                    Err(ConnectionStringError::MissingKey {
                        key: "DeviceId or SharedAccessKeyName",
                        ..
                    })
                ),
                "{text}"
            );
        }
    }

    #[test]
    fn parsed_string_prints_back_to_itself() {
        let parsed = ConnectionString::parse(&format!(
            " SharedAccessKey={KEY}; DeviceId = d ;ModuleId=;HostName=h:1;x=y"
        ))
        .unwrap();
        assert_eq!(
            parsed.to_secret_string(),
            format!("HostName=h:1;DeviceId=d;SharedAccessKey={KEY}")
        );
        assert_eq!(
            ConnectionString::parse(&parsed.to_secret_string()),
            Ok(parsed)
        );
    }

    #[test]
    fn ids_hold_any_of_iothubs_characters_and_nothing_else() {
        let parsed = ConnectionString::parse(&format!(
            "HostName=h;DeviceId=a#b?c=d@e;ModuleId=m(1)+%;SharedAccessKey={KEY}"
        ))
        .unwrap();
        assert_eq!(parsed.device_id.as_deref(), Some("a#b?c=d@e"));
        assert_eq!(parsed.module_id.as_deref(), Some("m(1)+%"));
        assert_eq!(
            ConnectionString::parse(&parsed.to_secret_string()),
            Ok(parsed)
        );
        for text in [
            format!("HostName=h;DeviceId=a b;SharedAccessKey={KEY}"),
            format!("HostName=h;DeviceId=d;ModuleId=m/n;SharedAccessKey={KEY}"),
        ] {
            assert!(
                matches!(
                    ConnectionString::parse(&text),
                    Err(ConnectionStringError::BadId { .. })
                ),
                "{text}"
            );
        }
        // A `;` cannot be in an id: it ends the value, so what follows is another pair.
        assert!(ConnectionString::for_device("h", "a;b", KEY).is_err());
    }

    #[test]
    fn debug_output_never_shows_the_key() {
        let parsed = ConnectionString::for_device("h", "d", KEY).unwrap();
        assert!(!format!("{parsed:?}").contains(KEY));
        assert!(parsed.to_secret_string().contains(KEY));
    }

    #[test]
    fn an_ipv6_host_name_is_a_bracketed_literal() {
        let parsed = ConnectionString::for_device("[::1]:8443", "d", KEY).unwrap();
        assert_eq!(
            parsed.host(),
            "::1",
            "the TLS server name is the IP address"
        );
        assert_eq!(parsed.port(), 8443);
        assert_eq!(
            parsed.to_secret_string(),
            format!("HostName=[::1]:8443;DeviceId=d;SharedAccessKey={KEY}")
        );
        let without_port = ConnectionString::for_device("[2001:db8::1]", "d", KEY).unwrap();
        assert_eq!(without_port.host(), "2001:db8::1");
        assert_eq!(without_port.port(), 443);
    }

    #[test]
    fn host_and_port_forms_split() {
        assert_eq!(split_host_port("[::1]:8443"), ("::1", Some(8443)));
        assert_eq!(split_host_port("127.0.0.1:1"), ("127.0.0.1", Some(1)));
        assert_eq!(split_host_port("localhost"), ("localhost", None));
        assert_eq!(split_host_port("::1"), ("::1", None));
    }
}
