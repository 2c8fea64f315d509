//! Small HTTP helpers shared by the endpoints: JSON error answers in IoT
//! Hub's shape, and the server half of the WebSocket handshake.

use bytes::Bytes;
use http::{HeaderMap, Response, StatusCode};
use http_body_util::Full;

pub type Body = Full<Bytes>;

/// `{"errorCode": …, "message": …}` with the given status.
pub fn error_response(status: StatusCode, error_code: i64, message: &str) -> Response<Body> {
    let body = serde_json::json!({ "errorCode": error_code, "message": message }).to_string();
    Response::builder()
        .status(status)
        .header(
            http::header::CONTENT_TYPE,
            "application/json; charset=utf-8",
        )
        .body(Full::new(Bytes::from(body)))
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
