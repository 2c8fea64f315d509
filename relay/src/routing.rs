//! Which endpoint a request's method and path name, decided from those two
//! alone. Paths are untrusted input; keeping their parsing apart from the
//! handlers (which need a running relay) lets tests and the fuzzer
//! (`fuzz/fuzz_targets/rest_route.rs`) drive it directly.

use framing::topics::validate_stream_name;
use http::Method;
use percent_encoding::percent_decode_str;

/// What a request asks for; `http_service` (main listener) and `admin`
/// (admin listener) turn each into a response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `POST /twins/{deviceId}[/modules/{moduleId}]/streams/{streamName}`.
    CreateStream {
        device_id: String,
        module_id: Option<String>,
        stream_name: String,
    },
    /// `GET /$iothub/websocket`: MQTT over WebSocket.
    ControlChannel,
    /// `GET /bridges/{hub}/{deviceId}/{streamId}`.
    Streaming {
        device_id: String,
        stream_id: String,
    },
    Health,
    /// Served on the admin listener only; 404 on the main listener.
    Metrics,
    /// A stream-creation path whose device id, module id or stream name does
    /// not decode to a valid one: 400.
    BadPath(&'static str),
    /// A streaming path whose device id does not decode to a valid one: 404
    /// "no such stream".
    UnknownStream,
    /// No endpoint has this method and path: 404.
    NoEndpoint,
}

/// Routes a request by its method and its path (without the query).
pub fn parse_route(method: &Method, path: &str) -> Route {
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match (method, segments.as_slice()) {
        (&Method::POST, ["twins", device, "streams", stream_name])
        | (&Method::POST, ["twins", device, "modules", _, "streams", stream_name]) => {
            let module_id = match segments.as_slice() {
                [_, _, _, module, _, _] => match decode_id(module) {
                    Some(module_id) => Some(module_id),
                    None => return Route::BadPath(BAD_MODULE_ID),
                },
                _ => None,
            };
            let Some(device_id) = decode_id(device) else {
                return Route::BadPath(BAD_DEVICE_ID);
            };
            let stream_name = match decode_stream_name(stream_name) {
                Ok(stream_name) => stream_name,
                Err(reason) => return Route::BadPath(reason),
            };
            Route::CreateStream {
                device_id,
                module_id,
                stream_name,
            }
        }
        (&Method::GET, ["$iothub", "websocket"]) => Route::ControlChannel,
        (&Method::GET, ["bridges", _hub, device, stream_id]) => match decode_id(device) {
            Some(device_id) => Route::Streaming {
                device_id,
                stream_id: stream_id.to_string(),
            },
            None => Route::UnknownStream,
        },
        (&Method::GET, ["health"]) => Route::Health,
        (&Method::GET, ["metrics"]) => Route::Metrics,
        _ => Route::NoEndpoint,
    }
}

const BAD_DEVICE_ID: &str = "the device id in the path is not a valid IoT Hub id: it must be 1-128 ASCII letters, \
     digits and - . + % _ # * ? ! ( ) , : = @ $ ', percent-encoded in the path (a '+' there means a space: write %2B)";
const BAD_MODULE_ID: &str = "the module id in the path is not a valid IoT Hub id: it must be 1-128 ASCII letters, \
     digits and - . + % _ # * ? ! ( ) , : = @ $ ', percent-encoded in the path (a '+' there means a space: write %2B)";

/// A path segment as IoT Hub clients encode it (`+` may stand for a space).
pub fn decode_segment(segment: &str) -> Option<String> {
    let spaced = segment.replace('+', " ");
    percent_decode_str(&spaced)
        .decode_utf8()
        .ok()
        .map(|text| text.into_owned())
}

/// A device or module id from a path segment: decoded, then checked
/// against IoT Hub's id rule, so only ids the registry could hold get
/// further.
fn decode_id(segment: &str) -> Option<String> {
    decode_segment(segment).filter(|id| framing::identity::validate_id(id).is_ok())
}

/// A stream name from its path segment: percent-decoded (clients encode it
/// like any path segment; a `+` stays a `+` and is then refused, as any
/// character that cannot be one MQTT topic level).
fn decode_stream_name(segment: &str) -> Result<String, &'static str> {
    let stream_name = percent_decode_str(segment)
        .decode_utf8()
        .map_err(|_| "the stream name in the path is not valid UTF-8 once percent-decoded")?
        .into_owned();
    validate_stream_name(&stream_name)?;
    Ok(stream_name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_creation_paths_decode_their_ids() {
        assert_eq!(
            parse_route(
                &Method::POST,
                "/twins/My%23Device%2B1/modules/m%3F1/streams/TestStream"
            ),
            Route::CreateStream {
                device_id: "My#Device+1".into(),
                module_id: Some("m?1".into()),
                stream_name: "TestStream".into()
            }
        );
        assert_eq!(
            parse_route(&Method::POST, "/twins/d/streams/s"),
            Route::CreateStream {
                device_id: "d".into(),
                module_id: None,
                stream_name: "s".into()
            }
        );
    }

    #[test]
    fn every_iothub_id_character_routes_when_percent_encoded() {
        let id = "a#b?c=d@e+f%g_h*i!j(k)l,m:n$o'p-q.r";
        let encoded = framing::identity::encode_path_segment(id);
        assert_eq!(
            parse_route(
                &Method::POST,
                &format!("/twins/{encoded}/modules/{encoded}/streams/Test%2DStream")
            ),
            Route::CreateStream {
                device_id: id.into(),
                module_id: Some(id.into()),
                stream_name: "Test-Stream".into()
            }
        );
        assert_eq!(
            parse_route(&Method::GET, &format!("/bridges/hub/{encoded}/0123")),
            Route::Streaming {
                device_id: id.into(),
                stream_id: "0123".into()
            }
        );
        assert_eq!(
            parse_route(
                &Method::GET,
                &format!("/bridges/hub/{}/0123", "x".repeat(129))
            ),
            Route::UnknownStream
        );
    }

    #[test]
    fn ids_and_stream_names_outside_the_rules_are_bad_paths() {
        for path in [
            "/twins/a%3Bb/streams/s",
            "/twins/a%2Fb/streams/s",
            "/twins/My+Device/streams/s",
            "/twins/d/modules/m%20n/streams/s",
            "/twins/d/streams/a%2Fb",
            "/twins/d/streams/a+b",
            "/twins/d/streams/a%23b",
        ] {
            assert!(
                matches!(parse_route(&Method::POST, path), Route::BadPath(_)),
                "{path}"
            );
        }
        let Route::BadPath(reason) = parse_route(&Method::POST, "/twins/a%3Bb/streams/s") else {
            unreachable!("checked above")
        };
        assert!(
            reason.contains("%2B") && reason.contains("# * ?"),
            "{reason}"
        );
    }

    #[test]
    fn undecodable_or_empty_ids_are_bad_paths() {
        assert!(matches!(
            parse_route(&Method::POST, "/twins/%FF/streams/s"),
            Route::BadPath(_)
        ));
        assert!(matches!(
            parse_route(&Method::POST, "/twins//streams/s"),
            Route::BadPath(_)
        ));
        assert!(matches!(
            parse_route(&Method::POST, "/twins/d/modules//streams/s"),
            Route::BadPath(_)
        ));
        assert_eq!(
            parse_route(&Method::GET, "/bridges/hub/%C3/0123"),
            Route::UnknownStream
        );
    }

    #[test]
    fn other_methods_and_paths_have_no_endpoint() {
        assert_eq!(
            parse_route(&Method::GET, "/twins/d/streams/s"),
            Route::NoEndpoint
        );
        assert_eq!(
            parse_route(&Method::POST, "/twins/d/streams/s/"),
            Route::NoEndpoint
        );
        assert_eq!(parse_route(&Method::GET, "/"), Route::NoEndpoint);
        assert_eq!(parse_route(&Method::GET, "//health"), Route::Health);
        assert_eq!(
            parse_route(&Method::GET, "/$iothub/websocket"),
            Route::ControlChannel
        );
    }
}
