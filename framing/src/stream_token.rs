//! Stream tokens: the bearer credential each side presents to the streaming
//! endpoint.
//!
//! A token is a JWT (HS256) signed with a secret that only relays hold. It
//! names one stream, one device and one side, and expires at the handshake
//! deadline, so a leaked token is worth one connection for under a minute.
//! Single use is enforced by the relay's pairing table, not here: the token
//! alone cannot know whether it was used.

use std::time::{Duration, SystemTime};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// Which end of a stream a token admits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    Device,
    Service,
}

impl Side {
    pub fn other(self) -> Self {
        match self {
            Side::Device => Side::Service,
            Side::Service => Side::Device,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Side::Device => "device",
            Side::Service => "service",
        }
    }
}

/// The claims of a stream token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamClaims {
    pub stream_id: String,
    pub device_id: String,
    pub side: Side,
    /// Expiry, Unix seconds (the JWT `exp` claim).
    pub exp: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StreamTokenError {
    #[error("stream token expired: the handshake deadline has passed, create a new stream")]
    Expired,
    #[error("stream token is not valid: {0}")]
    Invalid(String),
}

/// Signs and checks stream tokens with the relay's secret.
#[derive(Clone)]
pub struct StreamTokenKey {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
}

impl StreamTokenKey {
    /// Clock difference tolerated between relays that share the secret.
    pub const LEEWAY: Duration = Duration::from_secs(5);

    pub fn from_secret(secret: &[u8]) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = Self::LEEWAY.as_secs();
        validation.required_spec_claims = ["exp"].into_iter().map(String::from).collect();
        validation.validate_exp = true;
        Self {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation,
        }
    }

    pub fn issue(
        &self,
        stream_id: &str,
        device_id: &str,
        side: Side,
        expiry: SystemTime,
    ) -> String {
        let claims = StreamClaims {
            stream_id: stream_id.to_string(),
            device_id: device_id.to_string(),
            side,
            exp: crate::sas::unix_seconds(expiry),
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .expect("HS256 signing of a plain struct cannot fail")
    }

    pub fn verify(&self, token: &str) -> Result<StreamClaims, StreamTokenError> {
        if token.len() > 2048 {
            return Err(StreamTokenError::Invalid("longer than 2048 bytes".into()));
        }
        jsonwebtoken::decode::<StreamClaims>(token, &self.decoding, &self.validation)
            .map(|data| data.claims)
            .map_err(|error| match error.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => StreamTokenError::Expired,
                jsonwebtoken::errors::ErrorKind::InvalidSignature => {
                    StreamTokenError::Invalid("signature does not match".into())
                }
                other => StreamTokenError::Invalid(format!("{other:?}")),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_token_round_trips_and_has_no_forbidden_characters() {
        let key = StreamTokenKey::from_secret(b"secret");
        let token = key.issue(
            "abc",
            "MyDevice",
            Side::Device,
            SystemTime::now() + Duration::from_secs(60),
        );
        // The C SDK splits the request topic on these; the token must not hold them.
        assert!(!token.contains(['=', '&', '/', '+', '%']), "{token}");
        let claims = key.verify(&token).unwrap();
        assert_eq!(claims.stream_id, "abc");
        assert_eq!(claims.side, Side::Device);
    }

    #[test]
    fn expired_token_is_refused() {
        let key = StreamTokenKey::from_secret(b"secret");
        let token = key.issue(
            "abc",
            "d",
            Side::Service,
            SystemTime::now() - Duration::from_secs(60),
        );
        assert_eq!(key.verify(&token), Err(StreamTokenError::Expired));
    }

    #[test]
    fn token_from_another_secret_is_refused() {
        let token = StreamTokenKey::from_secret(b"a").issue(
            "s",
            "d",
            Side::Service,
            SystemTime::now() + Duration::from_secs(60),
        );
        assert!(matches!(
            StreamTokenKey::from_secret(b"b").verify(&token),
            Err(StreamTokenError::Invalid(_))
        ));
        assert!(StreamTokenKey::from_secret(b"b")
            .verify("not.a.jwt")
            .is_err());
    }
}
