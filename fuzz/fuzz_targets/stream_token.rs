//! Stream tokens: the `Authorization: Bearer` credential of the streaming
//! endpoint (and `$auth` of a stream request).
//!
//! The input is checked as a token; the same bytes also drive a token issued
//! for generated claims, which is then edited at one byte. Checked: no panic;
//! issued tokens verify to their claims, hold none of the characters IoT Hub
//! SDKs split topics on, and fail with another secret or once expired; a
//! text that verifies is byte for byte the token the relay would issue for
//! its claims, so no second spelling of a token (padding, case, extra dots)
//! is accepted.
#![no_main]

use std::sync::LazyLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arbitrary::{Result, Unstructured};
use framing::stream_token::{Side, StreamTokenError, StreamTokenKey};
use libfuzzer_sys::fuzz_target;

/// The secret the committed seed tokens were issued with (see FUZZING.md).
const SECRET: &[u8] = b"devstreams-fuzz-secret";

static KEY: LazyLock<StreamTokenKey> = LazyLock::new(|| StreamTokenKey::from_secret(SECRET));
static OTHER_KEY: LazyLock<StreamTokenKey> =
    LazyLock::new(|| StreamTokenKey::from_secret(b"another secret"));

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        check_text(text);
    }
    let _ = check_generated(&mut Unstructured::new(data));
});

fn check_text(text: &str) {
    if let Ok(claims) = KEY.verify(text) {
        let reissued = KEY.issue(
            &claims.stream_id,
            &claims.device_id,
            claims.side,
            UNIX_EPOCH + Duration::from_secs(claims.exp),
        );
        assert_eq!(text, reissued, "a second spelling of a token verifies");
    }
}

fn check_generated(input: &mut Unstructured) -> Result<()> {
    let stream_id: String = input.arbitrary()?;
    let device_id: String = input.arbitrary()?;
    let side = if input.arbitrary()? {
        Side::Device
    } else {
        Side::Service
    };
    let lifetime = Duration::from_secs(input.int_in_range(10..=3600)?);
    let token = KEY.issue(&stream_id, &device_id, side, SystemTime::now() + lifetime);
    assert!(
        !token.contains(['=', '&', '/', '+', '%', '?', '#', ' ']),
        "{token}"
    );
    if token.len() > 2048 {
        // Real ids are short; longer tokens are refused before decoding.
        assert!(KEY.verify(&token).is_err());
        return Ok(());
    }
    let claims = KEY.verify(&token).expect("an issued token verifies");
    assert_eq!(
        (
            claims.stream_id.as_str(),
            claims.device_id.as_str(),
            claims.side
        ),
        (stream_id.as_str(), device_id.as_str(), side)
    );
    assert!(matches!(
        OTHER_KEY.verify(&token),
        Err(StreamTokenError::Invalid(_))
    ));
    let expired = KEY.issue(
        &stream_id,
        &device_id,
        side,
        SystemTime::now() - StreamTokenKey::LEEWAY - lifetime,
    );
    assert_eq!(KEY.verify(&expired), Err(StreamTokenError::Expired));

    let mut edited = token.into_bytes();
    let position = input.choose_index(edited.len())?;
    edited[position] = input.arbitrary()?;
    if let Ok(edited) = String::from_utf8(edited) {
        check_text(&edited);
    }
    Ok(())
}
