//! SAS tokens: the `Authorization` header of stream creation and the MQTT
//! CONNECT password.
//!
//! The input is parsed as a token and checked against a key; the same bytes
//! also drive a generated token (any resource, key, expiry, policy name)
//! signed with `sas::sign` and then edited at one byte. Checked: no panic;
//! expiry answers follow the policy; `device_path` names a device the
//! resource really ends with; a signed token parses back to what was signed
//! and verifies with its key only; an edited token that still verifies
//! names the same resource (up to ASCII case, which the lower-cased-signature
//! leniency allows) and the same expiry.
#![no_main]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arbitrary::{Result, Unstructured};
use framing::sas::{self, ExpiryPolicy, SasError, SasToken};
use libfuzzer_sys::fuzz_target;

const KEY: &[u8] = b"0123456789abcdef0123456789abcdef";

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        check_parse(text);
    }
    let _ = check_generated(&mut Unstructured::new(data));
});

fn at(seconds: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(seconds)
}

fn check_parse(text: &str) {
    let Ok(token) = SasToken::parse(text) else {
        return;
    };
    assert!(text.len() <= sas::MAX_TOKEN_LENGTH);
    check_device_path(&token);
    let policy = ExpiryPolicy::default();
    let now = token.expiry_seconds.min(u64::from(u32::MAX));
    let late = now.saturating_add(policy.clock_skew.as_secs() + 1);
    match token.verify(&[KEY], at(late), policy) {
        Err(SasError::Expired(seconds)) => assert_eq!(seconds, late - token.expiry_seconds),
        other if token.expiry_seconds <= u64::from(u32::MAX) => {
            panic!("a token past its skew is not expired: {other:?}")
        }
        _ => {}
    }
    let _ = token.verify(&[KEY, b""], at(now), policy);
    let _ = format!("{token:?}");
}

fn check_device_path(token: &SasToken) {
    if let Some((device, module)) = token.device_path() {
        assert!(!device.is_empty());
        let suffix = match module {
            Some(module) => {
                assert!(!module.is_empty());
                format!("/devices/{device}/modules/{module}")
            }
            None => {
                assert!(!device.contains('/'));
                format!("/devices/{device}")
            }
        };
        assert!(
            token.resource.ends_with(&suffix),
            "{:?} does not end with {suffix:?}",
            token.resource
        );
    }
}

fn check_generated(input: &mut Unstructured) -> Result<()> {
    let resource: String = input.arbitrary()?;
    let key: Vec<u8> = input.arbitrary()?;
    let expiry = u64::from(input.arbitrary::<u32>()?);
    let key_name: Option<String> = input.arbitrary()?;
    let token_text = sas::sign(&resource, &key, at(expiry), key_name.as_deref());
    let policy = ExpiryPolicy::default();
    let token = match SasToken::parse(&token_text) {
        Ok(token) => token,
        Err(SasError::Malformed(_)) if token_text.len() > sas::MAX_TOKEN_LENGTH => return Ok(()),
        Err(error) => panic!("a signed token does not parse: {error}: {token_text:?}"),
    };
    assert_eq!(token.resource, resource);
    assert_eq!(token.expiry_seconds, expiry);
    assert_eq!(token.key_name, key_name.filter(|name| !name.is_empty()));
    check_device_path(&token);
    token
        .verify(&[&key], at(expiry), policy)
        .expect("a signed token verifies with its key");
    token
        .verify(&[b"other", &key], at(expiry), policy)
        .expect("any of the keys may have signed");
    let mut other_key = key.clone();
    match other_key.first_mut() {
        // HMAC pads short keys with zeros, so only a changed byte is another key.
        Some(first) => *first ^= 1,
        None => other_key.push(1),
    }
    assert_eq!(
        token.verify(&[&other_key], at(expiry), policy),
        Err(SasError::BadSignature)
    );
    let too_early = expiry.saturating_sub(policy.max_lifetime.as_secs() + 1);
    if too_early > 0 {
        assert!(matches!(
            token.verify(&[&key], at(too_early), policy),
            Err(SasError::TooFarInFuture(_))
        ));
    }

    // One byte edited: whatever still verifies must mean the same thing.
    let mut edited = token_text.into_bytes();
    let position = input.choose_index(edited.len())?;
    edited[position] = input.arbitrary()?;
    if let Ok(edited) = String::from_utf8(edited) {
        if let Ok(edited_token) = SasToken::parse(&edited) {
            if edited_token.verify(&[&key], at(expiry), policy).is_ok() {
                assert_eq!(
                    edited_token.resource.to_ascii_lowercase(),
                    resource.to_ascii_lowercase(),
                    "{edited:?}"
                );
                assert_eq!(edited_token.expiry_seconds, expiry, "{edited:?}");
            }
        }
    }
    Ok(())
}
