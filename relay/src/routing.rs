//! Which endpoint a request's method and path name, decided from those two
//! alone. Paths are untrusted input; keeping their parsing apart from the
//! handlers (which need a running relay) lets tests and the fuzzer
//! (`fuzz/fuzz_targets/rest_route.rs`) drive it directly.

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
    /// A stream-creation path whose device or module id does not decode: 400.
    BadPath(&'static str),
    /// A streaming path whose device id does not decode: 404 "no such stream".
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
                [_, _, _, module, _, _] => match decode_segment(module).filter(|m| !m.is_empty()) {
                    Some(module_id) => Some(module_id),
                    None => {
                        return Route::BadPath(
                            "the module id in the path is empty or not valid UTF-8",
                        )
                    }
                },
                _ => None,
            };
            let Some(device_id) = decode_segment(device).filter(|d| !d.is_empty()) else {
                return Route::BadPath("the device id in the path is not valid UTF-8");
            };
            Route::CreateStream {
                device_id,
                module_id,
                stream_name: stream_name.to_string(),
            }
        }
        (&Method::GET, ["$iothub", "websocket"]) => Route::ControlChannel,
        (&Method::GET, ["bridges", _hub, device, stream_id]) => match decode_segment(device) {
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

/// A path segment as IoT Hub clients encode it (`+` may stand for a space).
pub fn decode_segment(segment: &str) -> Option<String> {
    let spaced = segment.replace('+', " ");
    percent_decode_str(&spaced)
        .decode_utf8()
        .ok()
        .map(|text| text.into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_creation_paths_decode_their_ids() {
        assert_eq!(
            parse_route(
                &Method::POST,
                "/twins/My%20Device%2B1/modules/m+1/streams/TestStream"
            ),
            Route::CreateStream {
                device_id: "My Device+1".into(),
                module_id: Some("m 1".into()),
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
