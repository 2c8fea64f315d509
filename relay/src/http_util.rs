//! Small HTTP helpers shared by the endpoints: JSON error answers in IoT
//! Hub's shape, and the server half of the WebSocket handshake.

use bytes::Bytes;
use http::{HeaderMap, Response, StatusCode};
use http_body_util::Full;

pub type Body = Full<Bytes>;

/// IoT Hub's code for "device not registered" (also used for a disabled one).
pub const DEVICE_NOT_FOUND: i64 = 404_001;

/// The IoT Hub error name of an error body. IoT Hub's service SDKs read it
/// from `"Message": "ErrorCode:<Name>;<text>"` to raise their typed errors
/// (`DeviceNotFoundError`, `UnauthorizedError`, `ThrottlingError`, …), so
/// the name follows from the numeric code the relay already sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorName {
    DeviceNotFound,
    DeviceNotOnline,
    IotHubUnauthorizedAccess,
    ArgumentInvalid,
    GatewayTimeout,
    ThrottlingException,
    ServerError,
    ServiceUnavailable,
    /// No such endpoint or stream: not a device error, so not
    /// `DeviceNotFound`, which would send an SDK user to the registry.
    NotFound,
}

impl ErrorName {
    /// The name for an IoT Hub-style code (status × 1000 + detail).
    pub fn for_code(error_code: i64) -> Self {
        match (error_code / 1000, error_code) {
            (_, DEVICE_NOT_FOUND) => Self::DeviceNotFound,
            (_, framing::headers::ERROR_DEVICE_NOT_ONLINE) => Self::DeviceNotOnline,
            (400, _) => Self::ArgumentInvalid,
            (401 | 403, _) => Self::IotHubUnauthorizedAccess,
            (404, _) => Self::NotFound,
            (429, _) => Self::ThrottlingException,
            (503, _) => Self::ServiceUnavailable,
            (504, _) => Self::GatewayTimeout,
            (status, _) if (400..500).contains(&status) => Self::ArgumentInvalid,
            _ => Self::ServerError,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::DeviceNotFound => "DeviceNotFound",
            Self::DeviceNotOnline => "DeviceNotOnline",
            Self::IotHubUnauthorizedAccess => "IotHubUnauthorizedAccess",
            Self::ArgumentInvalid => "ArgumentInvalid",
            Self::GatewayTimeout => "GatewayTimeout",
            Self::ThrottlingException => "ThrottlingException",
            Self::ServerError => "ServerError",
            Self::ServiceUnavailable => "ServiceUnavailable",
            Self::NotFound => "NotFound",
        }
    }
}

/// The JSON error body in both forms IoT Hub clients read (PROTOCOL.md,
/// "Error bodies"): the classic `Message` / `ExceptionMessage` pair and the
/// numeric `errorCode` / `message` pair.
pub fn error_body(error_code: i64, message: &str) -> String {
    // SDKs split `Message` at `;` and keep only the part after the first
    // one, so the text in it must not hold another.
    let classic_text = message.replace(';', ",");
    serde_json::json!({
        "Message": format!("ErrorCode:{};{classic_text}", ErrorName::for_code(error_code).as_str()),
        "ExceptionMessage": message,
        "errorCode": error_code,
        "message": message,
    })
    .to_string()
}

/// An error answer with the given status; see [`error_body`].
pub fn error_response(status: StatusCode, error_code: i64, message: &str) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(
            http::header::CONTENT_TYPE,
            "application/json; charset=utf-8",
        )
        .body(Full::new(Bytes::from(error_body(error_code, message))))
        .expect("a response built from constants is valid")
}

/// IoT Hub-style error codes: status × 1000 + detail.
pub fn error_code(status: StatusCode, detail: i64) -> i64 {
    status.as_u16() as i64 * 1000 + detail
}

/// A 429 with `Retry-After`.
pub fn throttled(message: &str, retry_after_seconds: u64) -> Response<Body> {
    let mut response = error_response(
        StatusCode::TOO_MANY_REQUESTS,
        error_code(StatusCode::TOO_MANY_REQUESTS, 1),
        message,
    );
    response.headers_mut().insert(
        http::header::RETRY_AFTER,
        http::HeaderValue::from_str(&retry_after_seconds.to_string())
            .expect("digits are a valid header value"),
    );
    response
}

/// Checks the upgrade headers of a WebSocket request and returns the
/// `Sec-WebSocket-Accept` value, or why the request is not one.
pub fn websocket_accept_key(headers: &HeaderMap) -> Result<String, &'static str> {
    if !offers(headers, http::header::CONNECTION, "upgrade")
        || !offers(headers, http::header::UPGRADE, "websocket")
    {
        return Err(
            "this endpoint needs a WebSocket upgrade (Connection: Upgrade, Upgrade: websocket)",
        );
    }
    if headers
        .get(http::header::SEC_WEBSOCKET_VERSION)
        .map(|v| v.as_bytes())
        != Some(b"13")
    {
        return Err("only WebSocket version 13 is supported");
    }
    let key = headers
        .get(http::header::SEC_WEBSOCKET_KEY)
        .ok_or("missing Sec-WebSocket-Key")?;
    Ok(tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes()))
}

/// The 101 answer. `subprotocol` is only ever set for MQTT over WebSocket;
/// the streaming endpoint never answers one (IoT Hub's Node client fails
/// when it gets one back). No extension is ever accepted, so
/// `permessage-deflate` is declined by omission.
pub fn switching_protocols(accept_key: &str, subprotocol: Option<&str>) -> Response<Body> {
    let mut builder = Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(http::header::CONNECTION, "Upgrade")
        .header(http::header::UPGRADE, "websocket")
        .header(http::header::SEC_WEBSOCKET_ACCEPT, accept_key);
    if let Some(subprotocol) = subprotocol {
        builder = builder.header(http::header::SEC_WEBSOCKET_PROTOCOL, subprotocol);
    }
    builder
        .body(Full::new(Bytes::new()))
        .expect("a response built from valid parts is valid")
}

/// Whether a comma-separated header offers `token`.
pub fn offers(headers: &HeaderMap, name: http::header::HeaderName, token: &str) -> bool {
    offered_spelling(headers, name, token).is_some()
}

/// The client's own spelling of `token` in a comma-separated header, matched
/// without regard to case: a subprotocol is answered exactly as offered
/// (IoT Hub's C SDK offers `MQTT`, Node's MQTT client `mqtt`).
pub fn offered_spelling(
    headers: &HeaderMap,
    name: http::header::HeaderName,
    token: &str,
) -> Option<String> {
    headers.get_all(name).iter().find_map(|value| {
        let value = value.to_str().ok()?;
        value
            .split(',')
            .map(str::trim)
            .find(|part| part.eq_ignore_ascii_case(token))
            .map(str::to_string)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(error_code: i64, message: &str) -> serde_json::Value {
        serde_json::from_str(&error_body(error_code, message)).unwrap()
    }

    #[test]
    fn error_bodies_carry_the_classic_and_the_numeric_form() {
        let value = body(404_103, "device d is not connected");
        assert_eq!(
            value["Message"],
            "ErrorCode:DeviceNotOnline;device d is not connected"
        );
        assert_eq!(value["ExceptionMessage"], "device d is not connected");
        assert_eq!(value["errorCode"], 404_103);
        assert_eq!(value["message"], "device d is not connected");
    }

    #[test]
    fn each_code_gets_iothubs_name() {
        for (code, name) in [
            (DEVICE_NOT_FOUND, "DeviceNotFound"),
            (404_103, "DeviceNotOnline"),
            (
                error_code(StatusCode::UNAUTHORIZED, 1),
                "IotHubUnauthorizedAccess",
            ),
            (error_code(StatusCode::BAD_REQUEST, 4), "ArgumentInvalid"),
            (error_code(StatusCode::GATEWAY_TIMEOUT, 1), "GatewayTimeout"),
            (
                error_code(StatusCode::TOO_MANY_REQUESTS, 1),
                "ThrottlingException",
            ),
            (500_001, "ServerError"),
            (503_001, "ServiceUnavailable"),
            (error_code(StatusCode::NOT_FOUND, 0), "NotFound"),
        ] {
            let value = body(code, "text");
            assert_eq!(value["Message"], format!("ErrorCode:{name};text"), "{code}");
        }
    }

    #[test]
    fn the_classic_message_holds_no_second_semicolon() {
        let value = body(401_001, "refused: bad signature; use the connection string");
        assert_eq!(
            value["Message"],
            "ErrorCode:IotHubUnauthorizedAccess;refused: bad signature, use the connection string"
        );
        assert_eq!(
            value["message"],
            "refused: bad signature; use the connection string"
        );
    }
}
