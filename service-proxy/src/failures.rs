//! One line per failed stream, saying why and what to do.
//!
//! The person at the other end of a failed connection sees only a closed
//! socket (ssh prints "Connection closed"), so the proxy's log line is where
//! they learn the reason. Each kind of failure gets a sentence that names the
//! device and the next step, rather than a bare status code.

use framing::service_client::CreateStreamError;

/// Why the device said no; the relay's reason when it gave one.
pub fn describe_rejection(device_id: &str, reason: Option<&str>) -> String {
    let reason = relay_says_or(
        reason.unwrap_or_default(),
        "no reason given; the log of device-proxy on the device says why (a port it does not expose, see its --allow, or a local service that is down)",
    );
    one_line(format!(
        "stream to {device_id} rejected by the device: {reason}"
    ))
}

/// Why a stream could not be created at all. A devstreams relay's messages
/// already say what to do, so they are shown as they are; our own advice
/// stands in when a relay gives none.
pub fn describe_failure(device_id: &str, failure: &CreateStreamError) -> String {
    let cannot = format!("cannot create a stream to {device_id}");
    one_line(match failure {
        CreateStreamError::Connect(_) | CreateStreamError::Unauthorized(_) => format!("{cannot}: {failure}"),
        CreateStreamError::DeviceNotFound(message) => {
            let advice = "the relay knows no such device; check DEVICE_ID, `relay device list` shows the registered ones";
            format!("{cannot}: {}", relay_says_or(message, advice))
        }
        CreateStreamError::DeviceOffline(message) => {
            let advice = "the device is not connected to the relay; start device-proxy on it and check its network";
            format!("{cannot}: {}", relay_says_or(message, advice))
        }
        CreateStreamError::DeviceTimeout(message) => {
            let advice = "the device did not answer in time; check that device-proxy runs there, or raise --response-timeout";
            format!("{cannot}: {}", relay_says_or(message, advice))
        }
        CreateStreamError::Throttled { retry_after_seconds, message } => {
            let busy = relay_says_or(message, "the relay is busy");
            format!("{cannot}: {busy}; try again in {retry_after_seconds} s")
        }
        CreateStreamError::Timeout(limit) => format!(
            "{cannot}: the relay did not answer within {} s; check that the relay is running and reachable",
            limit.as_secs()
        ),
        CreateStreamError::Http(_) | CreateStreamError::Unexpected { .. } => {
            format!("{cannot}: {failure}; check that HostName in the connection string names a devstreams relay")
        }
    })
}

fn relay_says_or<'a>(message: &'a str, fallback: &'a str) -> &'a str {
    let message = message.trim();
    if message.is_empty() {
        fallback
    } else {
        message
    }
}

/// Messages come partly from the relay: keep them to one line, so a log
/// reader (or a hostile relay) cannot forge further log lines.
fn one_line(text: String) -> String {
    if text.chars().any(char::is_control) {
        text.chars()
            .map(|character| {
                if character.is_control() {
                    ' '
                } else {
                    character
                }
            })
            .collect()
    } else {
        text
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn rejection_names_the_device_and_the_reason() {
        let line = describe_rejection("MyDevice", Some("port 8080 is not exposed"));
        assert!(
            line.starts_with("stream to MyDevice rejected by the device: port 8080 is not exposed"),
            "{line}"
        );
        assert!(describe_rejection("MyDevice", Some("  ")).contains("no reason given"));
        assert!(describe_rejection("MyDevice", None).contains("no reason given"));
    }

    #[test]
    fn offline_device_without_a_relay_message_says_to_start_device_proxy() {
        let line = describe_failure("MyDevice", &CreateStreamError::DeviceOffline(String::new()));
        assert!(
            line.contains("MyDevice") && line.contains("not connected"),
            "{line}"
        );
        assert!(line.contains("start device-proxy"), "{line}");
    }

    #[test]
    fn relay_message_is_shown_as_it_is() {
        let message =
            "device MyDevice is not connected (waited 2 s): start device-proxy on the device";
        let line = describe_failure(
            "MyDevice",
            &CreateStreamError::DeviceOffline(message.into()),
        );
        assert_eq!(
            line,
            format!("cannot create a stream to MyDevice: {message}")
        );
    }

    #[test]
    fn every_failure_is_one_line_naming_the_device() {
        let failures = [
            CreateStreamError::Http("connection reset".into()),
            CreateStreamError::Unauthorized("bad signature".into()),
            CreateStreamError::DeviceNotFound("no device".into()),
            CreateStreamError::DeviceOffline("offline".into()),
            CreateStreamError::DeviceTimeout("silent".into()),
            CreateStreamError::Throttled {
                retry_after_seconds: 2,
                message: "slow down".into(),
            },
            CreateStreamError::Unexpected {
                status: 500,
                message: "oops\nsecond line".into(),
            },
            CreateStreamError::Timeout(Duration::from_secs(75)),
        ];
        for failure in &failures {
            let line = describe_failure("MyDevice", failure);
            assert!(line.contains("MyDevice"), "{line}");
            assert!(!line.contains('\n'), "{line}");
        }
    }
}
