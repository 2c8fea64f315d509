//! Control-channel topics: stream requests (parsed by devices), stream
//! answers (parsed by the relay from any device's PUBLISH), stream names
//! (from the REST path).
//!
//! The input is parsed as each kind of topic and as a stream name; the same
//! bytes also drive a generated request and answer. Checked: no panic; a
//! parsed topic prints back to a topic that parses to the same value; a
//! generated request or answer survives `to_topic` then `from_topic`, has
//! the five levels the C# SDK insists on, and holds no MQTT wildcard or NUL
//! (not allowed in a PUBLISH topic); `Debug` never shows the token.
#![no_main]

use arbitrary::{Result, Unstructured};
use framing::topics::{
    validate_stream_name, StreamRequest, StreamResponse, MAX_STREAM_NAME_LENGTH,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        check_parse(text);
    }
    let mut input = Unstructured::new(data);
    let _ = check_generated_request(&mut input);
    let _ = check_generated_response(&mut input);
});

fn check_parse(text: &str) {
    if validate_stream_name(text).is_ok() {
        assert!(!text.is_empty() && text.len() <= MAX_STREAM_NAME_LENGTH);
        assert!(!text.contains(['/', '+', '#', '?', '\0']));
    }
    if let Ok(request) = StreamRequest::from_topic(text) {
        assert!(validate_stream_name(&request.stream_name).is_ok());
        let topic = request.to_topic();
        assert_eq!(
            StreamRequest::from_topic(&topic).as_ref(),
            Ok(&request),
            "{text:?} printed as {topic:?}"
        );
        if !request.request_id.contains('/') && !request.authorization_token.contains('/') {
            assert_eq!(topic.split('/').count(), 5, "{topic:?}");
        }
        check_debug_hides_token(&request);
    }
    if let Ok(response) = StreamResponse::from_topic(text) {
        let topic = response.to_topic();
        assert_eq!(
            StreamResponse::from_topic(&topic).as_ref(),
            Ok(&response),
            "{text:?} printed as {topic:?}"
        );
    }
}

fn check_debug_hides_token(request: &StreamRequest) {
    let token = &request.authorization_token;
    let elsewhere = [&request.stream_name, &request.request_id, &request.url]
        .into_iter()
        .chain(&request.target)
        .any(|field| field.contains(token.as_str()));
    if token.len() >= 16 && !elsewhere {
        assert!(
            !format!("{request:?}").contains(token.as_str()),
            "Debug shows the token"
        );
    }
}

/// The characters of a JWT (base64url and dots), as stream tokens are.
const TOKEN_CHARACTERS: &[u8] =
    b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.";

/// A request as the relay publishes it.
fn check_generated_request(input: &mut Unstructured) -> Result<()> {
    let stream_name: String = input.arbitrary()?;
    if validate_stream_name(&stream_name).is_err() {
        return Ok(());
    }
    let url: String = input.arbitrary()?;
    let token_length = input.int_in_range(1..=512)?;
    let authorization_token = (0..token_length)
        .map(|_| input.choose(TOKEN_CHARACTERS).map(|&byte| byte as char))
        .collect::<Result<String>>()?;
    let request = StreamRequest {
        stream_name,
        request_id: input.arbitrary::<u64>()?.to_string(),
        url: if url.is_empty() {
            "wss://relay/bridges/hub/device/0".into()
        } else {
            url
        },
        authorization_token,
        target: input.arbitrary()?,
        half_close: input.arbitrary()?,
        resume: match input.int_in_range(0..=2u8)? {
            0 => None,
            1 => Some(framing::topics::ResumeAsk::New),
            _ => Some(framing::topics::ResumeAsk::Continue),
        },
    };
    let topic = request.to_topic();
    assert_eq!(
        StreamRequest::from_topic(&topic).as_ref(),
        Ok(&request),
        "{topic:?}"
    );
    assert_eq!(topic.split('/').count(), 5, "{topic:?}");
    assert!(
        !topic.contains(['+', '#', '\0']),
        "not a valid PUBLISH topic: {topic:?}"
    );
    check_debug_hides_token(&request);
    Ok(())
}

/// An answer as a device publishes it, echoing the request id.
fn check_generated_response(input: &mut Unstructured) -> Result<()> {
    let request_id: String = input.arbitrary()?;
    if request_id.is_empty() || request_id.contains('&') {
        return Ok(());
    }
    let response = StreamResponse {
        request_id,
        status: input.arbitrary()?,
        half_close: input.arbitrary()?,
        resume: input.arbitrary()?,
    };
    let topic = response.to_topic();
    assert_eq!(
        StreamResponse::from_topic(&topic).as_ref(),
        Ok(&response),
        "{topic:?}"
    );
    Ok(())
}
