//! Connection strings, as typed by users and printed by `relay device add`.
//!
//! The input is parsed as text; the same bytes also drive a generated
//! device or service string built the way the relay prints them. Checked:
//! no panic; what parses prints back to a string that parses to the same
//! value; `parse_device`/`parse_service` agree with the parsed kind; errors
//! never echo more than 24 characters of a part (it may hold a key); `Debug`
//! never shows the key; a string the relay prints parses to its parts.
#![no_main]

use arbitrary::{Result, Unstructured};
use base64::Engine;
use framing::connection_string::{split_host_port, ConnectionStringError};
use framing::ConnectionString;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        check_parse(text);
    }
    let _ = check_generated(&mut Unstructured::new(data));
});

fn check_parse(text: &str) {
    let parsed = match ConnectionString::parse(text) {
        Ok(parsed) => parsed,
        Err(ConnectionStringError::MissingEquals { part }) => {
            assert!(
                part.chars().count() <= 24,
                "error echoes a long part: {part:?}"
            );
            return;
        }
        Err(_) => return,
    };
    let printed = parsed.to_secret_string();
    assert_eq!(
        ConnectionString::parse(&printed).as_ref(),
        Ok(&parsed),
        "{text:?} printed as {printed:?}"
    );
    assert_eq!(
        ConnectionString::parse_device(text).is_ok(),
        parsed.device_id.is_some()
    );
    assert_eq!(
        ConnectionString::parse_service(text).is_ok(),
        parsed.shared_access_key_name.is_some() && parsed.device_id.is_none()
    );
    let _ = (
        parsed.host(),
        parsed.port(),
        split_host_port(&parsed.host_name),
    );

    let key_text = printed
        .rsplit_once(";SharedAccessKey=")
        .map(|(_, key)| key)
        .unwrap_or_default();
    let elsewhere = [
        Some(&parsed.host_name),
        parsed.device_id.as_ref(),
        parsed.module_id.as_ref(),
        parsed.shared_access_key_name.as_ref(),
    ]
    .into_iter()
    .flatten()
    .any(|field| field.contains(key_text));
    if key_text.len() >= 24 && !elsewhere {
        assert!(
            !format!("{parsed:?}").contains(key_text),
            "Debug shows the key"
        );
    }
}

/// A string as the relay prints it (`relay device add`, `relay policy show`).
fn check_generated(input: &mut Unstructured) -> Result<()> {
    let host = host_name(input)?;
    let key: Vec<u8> = (0..input.int_in_range(1..=64)?)
        .map(|_| input.arbitrary())
        .collect::<Result<_>>()?;
    let key_text = base64::engine::general_purpose::STANDARD.encode(&key);
    let parsed = if input.arbitrary()? {
        let device_id = from_alphabet(input, 1..=128, DEVICE_ID_CHARACTERS)?;
        assert!(
            relay::registry::validate_device_id(&device_id).is_ok(),
            "{device_id:?}"
        );
        let parsed = ConnectionString::for_device(&host, &device_id, &key_text)
            .expect("a registry device's string parses");
        assert_eq!(parsed.device_id.as_deref(), Some(device_id.as_str()));
        assert!(ConnectionString::parse_device(&parsed.to_secret_string()).is_ok());
        parsed
    } else {
        let policy = from_alphabet(input, 1..=32, POLICY_CHARACTERS)?;
        let parsed = ConnectionString::for_policy(&host, &policy, &key_text)
            .expect("a policy's string parses");
        assert_eq!(
            parsed.shared_access_key_name.as_deref(),
            Some(policy.as_str())
        );
        assert!(ConnectionString::parse_service(&parsed.to_secret_string()).is_ok());
        parsed
    };
    assert_eq!(parsed.host_name, host);
    assert_eq!(parsed.key(), key.as_slice());
    assert_eq!(
        ConnectionString::parse(&parsed.to_secret_string()).as_ref(),
        Ok(&parsed)
    );
    Ok(())
}

/// What `relay::registry::validate_device_id` allows.
const DEVICE_ID_CHARACTERS: &[u8] =
    b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-.:_@$!(),=+%'*";
const POLICY_CHARACTERS: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789-_";
const HOST_CHARACTERS: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789-.";

/// `host`, `host:port` or `[v6]:port`, as the relay derives its HostName.
fn host_name(input: &mut Unstructured) -> Result<String> {
    let port: u16 = input.arbitrary()?;
    Ok(match input.int_in_range(0..=2)? {
        0 => from_alphabet(input, 1..=64, HOST_CHARACTERS)?,
        1 => format!("{}:{port}", from_alphabet(input, 1..=64, HOST_CHARACTERS)?),
        _ => format!("[::1]:{port}"),
    })
}

fn from_alphabet(
    input: &mut Unstructured,
    length: std::ops::RangeInclusive<usize>,
    alphabet: &[u8],
) -> Result<String> {
    let length = input.int_in_range(length)?;
    (0..length)
        .map(|_| input.choose(alphabet).map(|&byte| byte as char))
        .collect()
}
