//! The REST path: `relay::routing::parse_route`, which picks the endpoint
//! and decodes the ids in the path before anything else looks at them.
//!
//! The input is routed as a path (for each method), and as a request
//! target parsed by `http::Uri` the way hyper hands it over; the same bytes
//! also drive generated paths built the way our clients build them.
//! Checked: no panic; routed ids are non-empty and single segments where
//! the endpoint needs that; only POST creates streams and only GET reaches
//! the other endpoints; a generated path routes back to the ids it was
//! built from, whatever characters of IoT Hub's id set they hold.
#![no_main]

use arbitrary::{Result, Unstructured};
use framing::identity::validate_id;
use framing::sas::COMPONENT;
use framing::topics::validate_stream_name;
use http::Method;
use libfuzzer_sys::fuzz_target;
use percent_encoding::utf8_percent_encode;
use relay::routing::{parse_route, Route};

fuzz_target!(|data: &[u8]| {
    if let Ok(path) = std::str::from_utf8(data) {
        check_path(path);
    }
    if let Ok(uri) = http::Uri::try_from(data) {
        check_path(uri.path());
    }
    let _ = check_generated(&mut Unstructured::new(data));
});

fn check_path(path: &str) {
    for method in [Method::GET, Method::POST, Method::PUT, Method::DELETE] {
        let route = parse_route(&method, path);
        match &route {
            Route::CreateStream {
                device_id,
                module_id,
                stream_name,
            } => {
                assert_eq!(method, Method::POST);
                assert!(!device_id.is_empty());
                assert!(module_id.as_ref().is_none_or(|module| !module.is_empty()));
                assert!(!stream_name.contains('/'));
            }
            Route::BadPath(_) => assert_eq!(method, Method::POST),
            Route::Streaming { stream_id, .. } => {
                assert_eq!(method, Method::GET);
                assert!(!stream_id.contains('/'));
            }
            Route::ControlChannel | Route::Health | Route::Metrics | Route::UnknownStream => {
                assert_eq!(method, Method::GET)
            }
            Route::NoEndpoint => {}
        }
    }
}

fn encode(text: &str) -> String {
    utf8_percent_encode(text, COMPONENT).to_string()
}

/// Paths as `ServiceClient` and the relay's streaming URLs build them.
fn check_generated(input: &mut Unstructured) -> Result<()> {
    let device_id: String = input.arbitrary()?;
    let module_id: Option<String> = input.arbitrary()?;
    let stream_name: String = input.arbitrary()?;
    if validate_id(&device_id).is_err()
        || module_id.as_deref().is_some_and(|module_id| validate_id(module_id).is_err())
        || validate_stream_name(&stream_name).is_err()
    {
        return Ok(());
    }
    let path = match &module_id {
        Some(module_id) => format!(
            "/twins/{}/modules/{}/streams/{}",
            encode(&device_id),
            encode(module_id),
            encode(&stream_name)
        ),
        None => format!(
            "/twins/{}/streams/{}",
            encode(&device_id),
            encode(&stream_name)
        ),
    };
    let expected = Route::CreateStream {
        device_id: device_id.clone(),
        module_id,
        stream_name,
    };
    assert_eq!(parse_route(&Method::POST, &path), expected, "{path:?}");
    if let Ok(uri) =
        format!("{path}?api-version={}", framing::headers::API_VERSION).parse::<http::Uri>()
    {
        assert_eq!(parse_route(&Method::POST, uri.path()), expected, "{uri:?}");
    }

    let hub: String = input.arbitrary()?;
    let stream_id = format!("{:032x}", input.arbitrary::<u128>()?);
    let path = format!(
        "/bridges/{}/{}/{stream_id}",
        encode(&hub),
        encode(&device_id)
    );
    let expected = Route::Streaming {
        device_id,
        stream_id,
    };
    assert_eq!(parse_route(&Method::GET, &path), expected, "{path:?}");
    let uri = path
        .parse::<http::Uri>()
        .expect("a percent-encoded path is a valid URI");
    assert_eq!(parse_route(&Method::GET, uri.path()), expected, "{uri:?}");
    Ok(())
}
