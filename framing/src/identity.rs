//! Device and module ids, by IoT Hub's rule: 1 to 128 ASCII characters from
//! letters, digits and `- . + % _ # * ? ! ( ) , : = @ $ '`, case-sensitive.
//!
//! The relay, its registry CLI and the clients all check ids with this one
//! rule, so an id IoT Hub tools accept works everywhere here too. Several of
//! those characters mean something in a URL (`#`, `?`, `%`, `+`), so an id
//! in a URL path is always percent-encoded ([`encode_path_segment`]); `;` is
//! not in the set, which is what lets a connection string
//! (`…;DeviceId=<id>;…`) hold any valid id as it is.

use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

/// Longest id, in characters (all ASCII, so also in bytes).
pub const MAX_ID_LENGTH: usize = 128;

/// The characters besides ASCII letters and digits that an id may hold.
pub const ID_PUNCTUATION: &str = "-.+%_#*?!(),:=@$'";

/// What a URL path segment keeps unescaped: RFC 3986's unreserved
/// characters. Everything else in an id (`#`, `?`, `%`, `+`, …) is escaped,
/// so a server that reads `+` as a space still gets the id back.
pub const PATH_SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// Why an id was refused; the message lists the allowed set.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum IdError {
    #[error("an id must not be empty")]
    Empty,
    #[error("an id is at most 128 characters; this one has {0}")]
    TooLong(usize),
    #[error(
        "an id may not contain {0:?}: use ASCII letters, digits and - . + % _ # * ? ! ( ) , : = @ $ ' \
         (IoT Hub's set; ';', '/', '&', spaces and non-ASCII characters are not allowed, \
         and a connection string could not hold ';' in a value anyway)"
    )]
    Character(char),
}

/// Checks a device or module id against IoT Hub's rule.
pub fn validate_id(id: &str) -> Result<(), IdError> {
    if id.is_empty() {
        return Err(IdError::Empty);
    }
    if let Some(refused) = id
        .chars()
        .find(|&c| !(c.is_ascii_alphanumeric() || ID_PUNCTUATION.contains(c)))
    {
        return Err(IdError::Character(refused));
    }
    if id.len() > MAX_ID_LENGTH {
        return Err(IdError::TooLong(id.len()));
    }
    Ok(())
}

/// An id (or any text) as one percent-encoded URL path segment.
pub fn encode_path_segment(text: &str) -> String {
    utf8_percent_encode(text, PATH_SEGMENT).to_string()
}

/// Splits an MQTT client id (`deviceId` or `deviceId/moduleId`, as IoT Hub
/// SDKs send it) and checks both ids.
pub fn parse_client_id(client_id: &str) -> Result<(&str, Option<&str>), IdError> {
    let (device_id, module_id) = match client_id.split_once('/') {
        Some((device_id, module_id)) => (device_id, Some(module_id)),
        None => (client_id, None),
    };
    validate_id(device_id)?;
    if let Some(module_id) = module_id {
        validate_id(module_id)?;
    }
    Ok((device_id, module_id))
}

/// Whether an MQTT username (`<host>/<clientId>/?api-version=…`, IoT Hub's
/// form) names this client id, written as it is (IoT Hub's SDKs) or with
/// each id percent-encoded. Only the client id part is checked.
pub fn username_names_client_id(username: &str, client_id: &str) -> bool {
    if username.contains(&format!("/{client_id}/")) {
        return true;
    }
    let encoded: Vec<String> = client_id.split('/').map(encode_path_segment).collect();
    username.contains(&format!("/{}/", encoded.join("/")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_character_of_iothubs_set_is_allowed() {
        let letters_and_digits: String = ('a'..='z').chain('A'..='Z').chain('0'..='9').collect();
        validate_id(&letters_and_digits).unwrap();
        for allowed in ID_PUNCTUATION.chars() {
            validate_id(&format!("a{allowed}b"))
                .unwrap_or_else(|error| panic!("{allowed:?}: {error}"));
            validate_id(&allowed.to_string()).unwrap();
        }
        validate_id("a#b?c=d@e").unwrap();
        validate_id("it's(1),x:y=$z*!").unwrap();
    }

    #[test]
    fn every_other_character_is_refused() {
        for refused in (0u8..=127)
            .map(char::from)
            .filter(|c| !c.is_ascii_alphanumeric() && !ID_PUNCTUATION.contains(*c))
            .chain(['é', 'ß', '€', '\u{1F600}'])
        {
            assert_eq!(
                validate_id(&format!("a{refused}b")),
                Err(IdError::Character(refused)),
                "{refused:?}"
            );
        }
        // Spot checks of the ones that matter most.
        for id in ["a;b", "a/b", "a b", "a&b", "a\\b", "a\"b", "a~b", "a<b"] {
            assert!(validate_id(id).is_err(), "{id:?}");
        }
    }

    #[test]
    fn ids_are_1_to_128_characters() {
        assert_eq!(validate_id(""), Err(IdError::Empty));
        validate_id("x").unwrap();
        validate_id(&"x".repeat(128)).unwrap();
        assert_eq!(validate_id(&"x".repeat(129)), Err(IdError::TooLong(129)));
    }

    #[test]
    fn refusal_says_what_is_allowed_and_why_semicolons_cannot_be() {
        let message = validate_id("a;b").unwrap_err().to_string();
        assert!(message.contains("';'"), "{message}");
        assert!(
            message.contains("- . + % _ # * ? ! ( ) , : = @ $ '"),
            "{message}"
        );
        assert!(message.contains("connection string"), "{message}");
    }

    #[test]
    fn path_segments_escape_every_url_meaningful_character() {
        assert_eq!(encode_path_segment("a#b?c=d@e"), "a%23b%3Fc%3Dd%40e");
        assert_eq!(encode_path_segment("a+b%c/d e"), "a%2Bb%25c%2Fd%20e");
        assert_eq!(encode_path_segment("My-Device_1.x"), "My-Device_1.x");
    }

    #[test]
    fn usernames_name_the_client_id_as_it_is_or_encoded() {
        let host = "relay.example.com:8443";
        for username in [
            format!("{host}/a#b?c/?api-version=2020-09-30"),
            format!("{host}/a%23b%3Fc/?api-version=2020-09-30&DeviceClientType=x"),
        ] {
            assert!(username_names_client_id(&username, "a#b?c"), "{username}");
            assert!(!username_names_client_id(&username, "a#b"), "{username}");
        }
        assert!(username_names_client_id(
            &format!("{host}/d%40/m%3D/?api-version=1"),
            "d@/m="
        ));
        assert!(!username_names_client_id(
            &format!("{host}/other/?api-version=1"),
            "d"
        ));
    }

    #[test]
    fn client_ids_name_a_device_and_maybe_a_module() {
        assert_eq!(parse_client_id("a#b?c"), Ok(("a#b?c", None)));
        assert_eq!(parse_client_id("d/m=1"), Ok(("d", Some("m=1"))));
        assert_eq!(parse_client_id("d/"), Err(IdError::Empty));
        assert_eq!(parse_client_id("/m"), Err(IdError::Empty));
        assert_eq!(parse_client_id("d/m/x"), Err(IdError::Character('/')));
        assert_eq!(parse_client_id("a b"), Err(IdError::Character(' ')));
    }
}
