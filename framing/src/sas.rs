//! Shared access signatures, the IoT Hub credential on the wire.
//!
//! Keys never travel: a token carries a resource (`sr`), an expiry (`se`),
//! optionally a policy name (`skn`) and an HMAC-SHA256 signature over
//! `sr + "\n" + se`. Clients sign the `sr` text exactly as they put it in the
//! token (already URL-encoded), so verification signs the raw field as
//! received instead of re-encoding it: re-encoding would refuse honest tokens
//! that chose another (equally valid) escaping. Signature comparison is
//! constant-time (`Mac::verify_slice`).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use hmac::{Hmac, Mac};
use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// The characters a URL component keeps unescaped (RFC 3986 unreserved).
pub const COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// Longest token text accepted; real tokens are ~200 bytes.
pub const MAX_TOKEN_LENGTH: usize = 4096;

const PREFIX: &str = "SharedAccessSignature ";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SasError {
    #[error("SAS token is malformed: {0}")]
    Malformed(&'static str),
    #[error("SAS token signature does not match: the key is wrong or was rotated")]
    BadSignature,
    #[error("SAS token expired {0} seconds ago: create a new token (check the clock of the signing machine)")]
    Expired(u64),
    #[error("SAS token expiry is {0} seconds in the future, past the allowed maximum: sign a shorter-lived token")]
    TooFarInFuture(u64),
}

/// How strictly expiry is checked.
#[derive(Debug, Clone, Copy)]
pub struct ExpiryPolicy {
    /// Tokens are still accepted this long after `se`, for clock drift.
    pub clock_skew: Duration,
    /// Tokens whose `se` lies further ahead than this are refused.
    pub max_lifetime: Duration,
}

impl Default for ExpiryPolicy {
    fn default() -> Self {
        Self {
            clock_skew: Duration::from_secs(300),
            max_lifetime: Duration::from_secs(366 * 24 * 3600),
        }
    }
}

/// Creates a token for `resource` (e.g. `host/devices/MyDevice`).
pub fn sign(resource: &str, key: &[u8], expiry: SystemTime, key_name: Option<&str>) -> String {
    let encoded_resource = utf8_percent_encode(resource, COMPONENT).to_string();
    let expiry_seconds = unix_seconds(expiry);
    let signature = signature_over(key, &encoded_resource, &expiry_seconds.to_string());
    let mut token = format!(
        "{PREFIX}sr={encoded_resource}&sig={}&se={expiry_seconds}",
        utf8_percent_encode(&signature, COMPONENT)
    );
    if let Some(name) = key_name {
        token.push_str("&skn=");
        token.push_str(&utf8_percent_encode(name, COMPONENT).to_string());
    }
    token
}

fn signature_over(key: &[u8], signed_resource: &str, expiry_text: &str) -> String {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(signed_resource.as_bytes());
    mac.update(b"\n");
    mac.update(expiry_text.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// A parsed, not yet verified, token.
#[derive(Clone, PartialEq, Eq)]
pub struct SasToken {
    /// The decoded resource, e.g. `relay.example.com/devices/MyDevice`.
    pub resource: String,
    /// The `sr` field exactly as received: what the client signed.
    signed_resource: String,
    expiry_text: String,
    pub expiry_seconds: u64,
    pub key_name: Option<String>,
    signature: Vec<u8>,
}

impl std::fmt::Debug for SasToken {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("SasToken")
            .field("resource", &self.resource)
            .field("expiry_seconds", &self.expiry_seconds)
            .field("key_name", &self.key_name)
            .finish_non_exhaustive()
    }
}

impl SasToken {
    pub fn parse(text: &str) -> Result<Self, SasError> {
        if text.len() > MAX_TOKEN_LENGTH {
            return Err(SasError::Malformed("longer than 4096 bytes"));
        }
        let fields = text.trim().strip_prefix(PREFIX).ok_or(SasError::Malformed(
            "does not start with 'SharedAccessSignature '",
        ))?;
        let (mut signed_resource, mut signature, mut expiry_text, mut key_name) =
            (None, None, None, None);
        for field in fields.split('&').filter(|f| !f.is_empty()) {
            let (name, value) = field
                .split_once('=')
                .ok_or(SasError::Malformed("a field has no '='"))?;
            let slot = match name {
                "sr" => &mut signed_resource,
                "sig" => &mut signature,
                "se" => &mut expiry_text,
                "skn" => &mut key_name,
                _ => continue,
            };
            if slot.replace(value).is_some() {
                return Err(SasError::Malformed("a field appears twice"));
            }
        }
        let signed_resource = signed_resource.ok_or(SasError::Malformed("no sr field"))?;
        let expiry_text = expiry_text.ok_or(SasError::Malformed("no se field"))?;
        let signature = signature.ok_or(SasError::Malformed("no sig field"))?;
        let resource = percent_decode_str(signed_resource)
            .decode_utf8()
            .map_err(|_| SasError::Malformed("sr is not UTF-8"))?
            .into_owned();
        let expiry_seconds = expiry_text
            .parse()
            .map_err(|_| SasError::Malformed("se is not a number of seconds"))?;
        let signature_text = percent_decode_str(signature)
            .decode_utf8()
            .map_err(|_| SasError::Malformed("sig is not UTF-8"))?;
        let signature = base64::engine::general_purpose::STANDARD
            .decode(signature_text.as_bytes())
            .map_err(|_| SasError::Malformed("sig is not base64"))?;
        // Older IoT Hub C SDKs end device tokens with an empty `&skn=`: no policy.
        let key_name = match key_name.filter(|name| !name.is_empty()) {
            Some(name) => Some(
                percent_decode_str(name)
                    .decode_utf8()
                    .map_err(|_| SasError::Malformed("skn is not UTF-8"))?
                    .into_owned(),
            ),
            None => None,
        };
        Ok(Self {
            resource,
            signed_resource: signed_resource.to_string(),
            expiry_text: expiry_text.to_string(),
            expiry_seconds,
            key_name,
            signature,
        })
    }

    /// Checks expiry, then the signature against each candidate key (a
    /// device has a primary and a secondary key; either may sign).
    pub fn verify(
        &self,
        keys: &[&[u8]],
        now: SystemTime,
        policy: ExpiryPolicy,
    ) -> Result<(), SasError> {
        let now_seconds = unix_seconds(now);
        let expiry_with_skew = self
            .expiry_seconds
            .saturating_add(policy.clock_skew.as_secs());
        if now_seconds > expiry_with_skew {
            return Err(SasError::Expired(now_seconds - self.expiry_seconds));
        }
        let ahead = self.expiry_seconds.saturating_sub(now_seconds);
        if ahead > policy.max_lifetime.as_secs() {
            return Err(SasError::TooFarInFuture(ahead));
        }
        // Some SDKs sign the lower-cased encoding of the resource.
        let lowercase = self.signed_resource.to_lowercase();
        let candidates: &[&str] = if lowercase == self.signed_resource {
            &[&self.signed_resource]
        } else {
            &[&self.signed_resource, &lowercase]
        };
        let mut matched = false;
        for key in keys {
            for signed in candidates {
                let mut mac =
                    HmacSha256::new_from_slice(key).expect("HMAC takes keys of any length");
                mac.update(signed.as_bytes());
                mac.update(b"\n");
                mac.update(self.expiry_text.as_bytes());
                // Evaluate every candidate so timing does not tell which matched.
                matched |= mac.verify_slice(&self.signature).is_ok();
            }
        }
        if matched {
            Ok(())
        } else {
            Err(SasError::BadSignature)
        }
    }

    /// For a device token: the device (and module) named by the resource
    /// path `<host>/devices/<id>[/modules/<module>]`. The host is not trusted.
    pub fn device_path(&self) -> Option<(&str, Option<&str>)> {
        device_path_of(&self.resource)
    }

    /// Whether a device token's resource names this device (or this module
    /// of it). SDKs write an id three ways: as it is inside the encoded `sr`
    /// (ours, Node's `encodeURIComponent` of the whole resource), encoded
    /// once more before the whole resource is encoded (so `#` arrives as
    /// `%2523`), or not encoded at all (IoT Hub's C SDK, where an id holding
    /// `%` then reads differently once decoded). Each form is tried; the
    /// signature check still binds the token to this device's key.
    pub fn names_identity(&self, device_id: &str, module_id: Option<&str>) -> bool {
        [self.resource.as_str(), self.signed_resource.as_str()]
            .into_iter()
            .filter_map(device_path_of)
            .any(|(device, module)| {
                segment_names(device, device_id)
                    && match (module, module_id) {
                        (None, None) => true,
                        (Some(module), Some(module_id)) => segment_names(module, module_id),
                        _ => false,
                    }
            })
    }
}

fn device_path_of(resource: &str) -> Option<(&str, Option<&str>)> {
    let (_host, path) = resource.split_once("/devices/")?;
    match path.split_once("/modules/") {
        Some((device, module))
            if !device.is_empty() && !module.is_empty() && !module.contains('/') =>
        {
            Some((device, Some(module)))
        }
        Some(_) => None,
        None if !path.is_empty() && !path.contains('/') => Some((path, None)),
        None => None,
    }
}

/// A resource path segment names `id` as it is or once percent-decoded.
fn segment_names(segment: &str, id: &str) -> bool {
    segment == id
        || percent_decode_str(segment)
            .decode_utf8()
            .is_ok_and(|decoded| decoded == id)
}

pub fn unix_seconds(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn in_an_hour() -> SystemTime {
        SystemTime::now() + Duration::from_secs(3600)
    }

    #[test]
    fn signed_token_verifies() {
        let token = sign(
            "relay.example.com/devices/My Device",
            KEY,
            in_an_hour(),
            None,
        );
        let parsed = SasToken::parse(&token).unwrap();
        assert_eq!(parsed.resource, "relay.example.com/devices/My Device");
        assert_eq!(parsed.device_path(), Some(("My Device", None)));
        parsed
            .verify(&[KEY], SystemTime::now(), ExpiryPolicy::default())
            .unwrap();
    }

    #[test]
    fn fields_in_any_order_verify() {
        let token = sign("hub", KEY, in_an_hour(), Some("service"));
        let fields: Vec<&str> = token.strip_prefix(PREFIX).unwrap().split('&').collect();
        let reordered = format!(
            "{PREFIX}{}&{}&{}&{}",
            fields[3], fields[2], fields[0], fields[1]
        );
        let parsed = SasToken::parse(&reordered).unwrap();
        assert_eq!(parsed.key_name.as_deref(), Some("service"));
        parsed
            .verify(&[KEY], SystemTime::now(), ExpiryPolicy::default())
            .unwrap();
    }

    #[test]
    fn empty_key_name_means_no_policy() {
        let token = format!("{}&skn=", sign("hub/devices/d", KEY, in_an_hour(), None));
        let parsed = SasToken::parse(&token).unwrap();
        assert_eq!(parsed.key_name, None);
        parsed
            .verify(&[KEY], SystemTime::now(), ExpiryPolicy::default())
            .unwrap();
    }

    #[test]
    fn wrong_key_is_refused() {
        let token = SasToken::parse(&sign("hub", KEY, in_an_hour(), None)).unwrap();
        assert_eq!(
            token.verify(&[b"other"], SystemTime::now(), ExpiryPolicy::default()),
            Err(SasError::BadSignature)
        );
        token
            .verify(&[b"other", KEY], SystemTime::now(), ExpiryPolicy::default())
            .unwrap();
    }

    #[test]
    fn expired_token_is_refused_after_skew() {
        let past = SystemTime::now() - Duration::from_secs(600);
        let token = SasToken::parse(&sign("hub", KEY, past, None)).unwrap();
        assert!(matches!(
            token.verify(&[KEY], SystemTime::now(), ExpiryPolicy::default()),
            Err(SasError::Expired(_))
        ));
        let lenient = ExpiryPolicy {
            clock_skew: Duration::from_secs(900),
            ..ExpiryPolicy::default()
        };
        token.verify(&[KEY], SystemTime::now(), lenient).unwrap();
    }

    #[test]
    fn token_too_far_in_future_is_refused() {
        let far = SystemTime::now() + Duration::from_secs(10 * 366 * 24 * 3600);
        let token = SasToken::parse(&sign("hub", KEY, far, None)).unwrap();
        assert!(matches!(
            token.verify(&[KEY], SystemTime::now(), ExpiryPolicy::default()),
            Err(SasError::TooFarInFuture(_))
        ));
    }

    #[test]
    fn tampered_resource_is_refused() {
        let token =
            sign("hub/devices/a", KEY, in_an_hour(), None).replace("devices%2Fa", "devices%2Fb");
        let parsed = SasToken::parse(&token).unwrap();
        assert_eq!(
            parsed.verify(&[KEY], SystemTime::now(), ExpiryPolicy::default()),
            Err(SasError::BadSignature)
        );
    }

    #[test]
    fn malformed_tokens_are_errors_not_panics() {
        for text in [
            "",
            "SharedAccessSignature ",
            "SharedAccessSignature sr=a",
            "Bearer x",
            "SharedAccessSignature sr=a&se=x&sig=AA==",
            "SharedAccessSignature sr=a&sr=b&se=1&sig=AA==",
        ] {
            assert!(SasToken::parse(text).is_err(), "{text}");
        }
    }

    #[test]
    fn device_path_needs_a_device() {
        let parse =
            |resource: &str| SasToken::parse(&sign(resource, KEY, in_an_hour(), None)).unwrap();
        assert_eq!(
            parse("h/devices/d/modules/m").device_path(),
            Some(("d", Some("m")))
        );
        assert_eq!(parse("h").device_path(), None);
        assert_eq!(parse("h/devices/").device_path(), None);
        assert_eq!(parse("h/devices/a/b").device_path(), None);
        assert_eq!(parse("h/devices/d/modules/m/x").device_path(), None);
    }

    #[test]
    fn ids_with_url_characters_are_named_in_every_sdk_form() {
        let id = "a#b?c=d@e%41";
        let host = "relay.example.com";
        let once_encoded = format!("{host}/devices/{}", utf8_percent_encode(id, COMPONENT));
        let c_sdk_form = |resource: &str| {
            let expiry = unix_seconds(in_an_hour());
            let signature = signature_over(KEY, resource, &expiry.to_string());
            format!(
                "{PREFIX}sr={resource}&sig={}&se={expiry}&skn=",
                utf8_percent_encode(&signature, COMPONENT)
            )
        };
        for token in [
            // Ours: the id as it is, inside the encoded resource.
            sign(&format!("{host}/devices/{id}"), KEY, in_an_hour(), None),
            // The id encoded, then the whole resource encoded again.
            sign(&once_encoded, KEY, in_an_hour(), None),
        ] {
            let parsed = SasToken::parse(&token).unwrap();
            assert!(parsed.names_identity(id, None), "{token}");
            assert!(!parsed.names_identity("a#b", None));
            assert!(!parsed.names_identity(id, Some("m")));
            parsed
                .verify(&[KEY], SystemTime::now(), ExpiryPolicy::default())
                .unwrap();
        }
        // The C SDK puts the resource in unencoded; `%41` must not become `A`.
        let c_sdk = SasToken::parse(&c_sdk_form("h/devices/x%41?y")).unwrap();
        assert!(c_sdk.names_identity("x%41?y", None));
        let module =
            SasToken::parse(&sign("h/devices/d#1/modules/m?2", KEY, in_an_hour(), None)).unwrap();
        assert!(module.names_identity("d#1", Some("m?2")));
        assert!(!module.names_identity("d#1", None));
        assert!(!module.names_identity("d#1", Some("m")));
    }
}
