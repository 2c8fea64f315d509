//! What the console's pages show live: one snapshot of the relay's state
//! (counts, cumulative counters for the rates, live streams, optionally the
//! devices), sent as server-sent events every [`UPDATE_INTERVAL`].
//!
//! The rates (stream creations per minute, bytes per second) are the
//! differences of cumulative counters between two events, worked out by
//! the page; the relay keeps no history for them. An event stream ends
//! when its session does (signed out, expired) and after [`MAX_STREAM_AGE`]
//! (the browser reconnects, and the session is checked anew).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use serde_json::{json, Value};
use tokio::time::Instant;

use crate::admin::AdminBody;
use crate::admin_api::{list_devices, list_streams, node_name};
use crate::live::unix_seconds;
use crate::state::RelayState;

/// Time between two events of a live stream.
pub const UPDATE_INTERVAL: Duration = Duration::from_secs(1);
/// An event stream ends after this; the browser opens a new one.
pub const MAX_STREAM_AGE: Duration = Duration::from_secs(10 * 60);

/// The state the console shows, as JSON.
pub fn snapshot(state: &RelayState, with_devices: bool) -> Value {
    let streams = list_streams(state)["streams"].take();
    let live_bytes: u64 = state
        .live_streams
        .list()
        .iter()
        .map(|stream| stream.bytes_device_to_service() + stream.bytes_service_to_device())
        .sum();
    let closed_bytes =
        state.metrics.bytes_device_to_service.get() + state.metrics.bytes_service_to_device.get();
    let mut online: Vec<String> = state
        .presence
        .sessions()
        .into_iter()
        .map(|session| session.identity.device_id)
        .collect();
    online.sort();
    online.dedup();
    let devices = if with_devices {
        list_devices(state)["devices"].take()
    } else {
        Value::Null
    };
    json!({
        "time": unix_seconds(SystemTime::now()),
        "node": node_name(state),
        "devicesRegistered": state.registry.device_list().len(),
        "devicesOnline": online.len(),
        "liveStreams": streams.as_array().map_or(0, Vec::len),
        "streamsRequested": state.metrics.streams_requested.get(),
        "bytesTotal": closed_bytes + live_bytes,
        "streams": streams,
        "devices": devices,
    })
}

/// `GET /console/live`: a `text/event-stream` of snapshots.
pub fn event_stream(
    state: Arc<RelayState>,
    session_id: String,
    with_devices: bool,
) -> Response<AdminBody> {
    let started = Instant::now();
    let mut interval = tokio::time::interval(UPDATE_INTERVAL);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let events = futures_util::stream::unfold(
        (state, interval, true),
        move |(state, mut interval, first)| {
            let session_id = session_id.clone();
            async move {
                interval.tick().await;
                let now = Instant::now();
                if now.saturating_duration_since(started) >= MAX_STREAM_AGE
                    || !state.console.is_live(&session_id, now)
                    || state.stop_accepting.is_cancelled()
                {
                    return None;
                }
                let mut text = String::new();
                if first {
                    text.push_str("retry: 2000\n");
                }
                text.push_str("data: ");
                text.push_str(&snapshot(&state, with_devices).to_string());
                text.push_str("\n\n");
                Some((
                    Ok::<_, Infallible>(Frame::data(Bytes::from(text))),
                    (state, interval, false),
                ))
            }
        },
    );
    let mut answer = super::response(StatusCode::OK, "text/event-stream", Bytes::new());
    *answer.body_mut() = StreamBody::new(events).boxed_unsync();
    answer
}
