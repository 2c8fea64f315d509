//! The headers of stream creation and of the WebSocket upgrades: the
//! timeout headers (`relay::streams_api::timeout_header`), the upgrade check
//! (`relay::http_util::websocket_accept_key`, `offers`), and the two bearer
//! credentials as the relay extracts them (SAS token, stream token).
//!
//! Input layout: header lines `name: value`, one per line (`\n`); lines
//! whose name is not a valid header name are skipped, values may hold any
//! byte a header value can. Checked: no panic; a timeout is positive and
//! never above its cap, and the cap when the header is absent; an accepted
//! upgrade really offered `Connection: upgrade`, `Upgrade: websocket` and
//! version 13, and its accept key is the 28-character base64 of a SHA-1.
#![no_main]

use std::time::Duration;

use framing::headers;
use framing::sas::SasToken;
use framing::stream_token::StreamTokenKey;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;
use relay::http_util::{offers, websocket_accept_key};
use relay::streams_api::timeout_header;

fuzz_target!(|data: &[u8]| {
    let mut header_map = HeaderMap::new();
    for line in data.split(|&byte| byte == b'\n') {
        let Some(colon) = line.iter().position(|&byte| byte == b':') else {
            continue;
        };
        let (name, value) = (&line[..colon], &line[colon + 1..]);
        let value = value.strip_prefix(b" ").unwrap_or(value);
        if let (Ok(name), Ok(value)) =
            (HeaderName::from_bytes(name), HeaderValue::from_bytes(value))
        {
            header_map.append(name, value);
        }
    }

    for cap in [
        Duration::from_secs(60),
        Duration::from_secs(1),
        Duration::MAX,
    ] {
        for name in [headers::CONNECT_TIMEOUT, headers::RESPONSE_TIMEOUT] {
            match timeout_header(&header_map, name, cap) {
                Ok(timeout) => {
                    assert!(
                        !timeout.is_zero() && timeout <= cap,
                        "{timeout:?} with cap {cap:?}"
                    );
                    if !header_map.contains_key(name) {
                        assert_eq!(timeout, cap);
                    }
                }
                Err(message) => assert!(message.starts_with(name)),
            }
        }
    }

    if let Ok(accept_key) = websocket_accept_key(&header_map) {
        assert!(offers(&header_map, http::header::CONNECTION, "upgrade"));
        assert!(offers(&header_map, http::header::UPGRADE, "websocket"));
        assert_eq!(
            header_map
                .get(http::header::SEC_WEBSOCKET_VERSION)
                .map(HeaderValue::as_bytes),
            Some(&b"13"[..])
        );
        assert_eq!(accept_key.len(), 28, "{accept_key}");
    }
    let _ = offers(&header_map, http::header::SEC_WEBSOCKET_PROTOCOL, "mqtt");

    // As `streams_api::authorize` and `streaming::upgrade` read them.
    if let Some(authorization) = header_map
        .get(http::header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
    {
        if let Ok(token) = SasToken::parse(authorization) {
            let _ = token.device_path();
        }
        if let Some(bearer) = authorization.strip_prefix("Bearer ") {
            let _ = StreamTokenKey::from_secret(b"devstreams-fuzz-secret").verify(bearer.trim());
        }
    }
    let _ = header_map
        .get(headers::TARGET)
        .and_then(|value| value.to_str().ok());
});
