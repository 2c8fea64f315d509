//! The admin JSON API on the admin listener (`--admin-listen`): live state
//! for operators and for a web console — which devices are online, which
//! streams run — and two actions: close a stream, disconnect a device.
//!
//! Requests carry a SAS token of a policy (`Authorization:
//! SharedAccessSignature sr=…&sig=…&se=…&skn=NAME`, the same form as the
//! stream-creation call): reads need registry-read, actions registry-write;
//! without the right the answer is 401 naming it. All answers are JSON.
//! Everything is answered from memory (presence, live streams, the
//! registry snapshot); with a cluster, each node shows its own view.
//!
//! | method and path                        | right          |
//! |----------------------------------------|----------------|
//! | `GET /api/devices`                     | registry-read  |
//! | `GET /api/streams`                     | registry-read  |
//! | `DELETE /api/streams/{streamId}`       | registry-write |
//! | `POST /api/devices/{deviceId}/disconnect` | registry-write |

use std::collections::BTreeMap;

use http::{HeaderMap, Method, Response, StatusCode};
use percent_encoding::percent_decode_str;
use serde_json::{json, Value};

use crate::http_util::{error_code, error_response, Body};
use crate::live::unix_seconds;
use crate::metrics::Metrics;
use crate::presence::SessionInfo;
use crate::rights::{authorize, Refusal, Right};
use crate::state::RelayState;

/// Answers a request under `/api/`.
pub fn handle(
    state: &RelayState,
    method: &Method,
    path: &str,
    headers: &HeaderMap,
) -> Response<Body> {
    let segments: Vec<String> = path
        .trim_start_matches('/')
        .split('/')
        .map(|segment| percent_decode_str(segment).decode_utf8_lossy().into_owned())
        .collect();
    let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
    let (right, action): (Right, Action) = match (method, segments.as_slice()) {
        (&Method::GET, ["api", "devices"]) => (Right::RegistryRead, Action::ListDevices),
        (&Method::GET, ["api", "streams"]) => (Right::RegistryRead, Action::ListStreams),
        (&Method::DELETE, ["api", "streams", stream_id]) => {
            (Right::RegistryWrite, Action::CloseStream(stream_id))
        }
        (&Method::POST, ["api", "devices", device_id, "disconnect"]) => {
            (Right::RegistryWrite, Action::Disconnect(device_id))
        }
        _ => {
            return error_response(
                StatusCode::NOT_FOUND,
                error_code(StatusCode::NOT_FOUND, 0),
                &format!(
                    "no endpoint {method} {path}: the admin API serves GET /api/devices, GET /api/streams, \
                     DELETE /api/streams/{{streamId}} and POST /api/devices/{{deviceId}}/disconnect"
                ),
            )
        }
    };
    if let Err(refusal) = authorize(state, headers, right) {
        if matches!(refusal, Refusal::BadCredentials(_)) {
            Metrics::add(&state.metrics.authentication_failures, 1);
        }
        tracing::warn!(%refusal, %method, path, "admin API request refused");
        return error_response(
            StatusCode::UNAUTHORIZED,
            error_code(StatusCode::UNAUTHORIZED, 3),
            &format!("admin API credentials refused: {refusal}"),
        );
    }
    match action {
        Action::ListDevices => json_response(StatusCode::OK, list_devices(state)),
        Action::ListStreams => json_response(StatusCode::OK, list_streams(state)),
        Action::CloseStream(stream_id) => {
            if state.live_streams.close(stream_id) {
                tracing::info!(stream_id, "stream closed by an operator (admin API)");
                json_response(StatusCode::OK, json!({ "closed": stream_id }))
            } else {
                error_response(
                    StatusCode::NOT_FOUND,
                    error_code(StatusCode::NOT_FOUND, 5),
                    &format!(
                        "no live stream {stream_id} on this relay: GET /api/streams lists them"
                    ),
                )
            }
        }
        Action::Disconnect(device_id) => {
            let channels = state
                .presence
                .sessions()
                .iter()
                .filter(|session| session.identity.device_id == device_id)
                .count();
            if channels == 0 {
                return error_response(
                    StatusCode::NOT_FOUND,
                    error_code(StatusCode::NOT_FOUND, 6),
                    &format!("device {device_id} has no control channel on this relay"),
                );
            }
            state.presence.disconnect(device_id);
            tracing::info!(
                device_id,
                channels,
                "device disconnected by an operator (admin API)"
            );
            json_response(
                StatusCode::OK,
                json!({ "disconnected": device_id, "controlChannels": channels }),
            )
        }
    }
}

enum Action<'a> {
    ListDevices,
    ListStreams,
    CloseStream(&'a str),
    Disconnect(&'a str),
}

fn json_response(status: StatusCode, value: Value) -> Response<Body> {
    let mut text = value.to_string();
    text.push('\n');
    Response::builder()
        .status(status)
        .header(
            http::header::CONTENT_TYPE,
            "application/json; charset=utf-8",
        )
        .body(Body::from(text))
        .expect("a response built from valid parts is valid")
}

pub(crate) fn node_name(state: &RelayState) -> Value {
    state
        .cluster
        .as_ref()
        .and_then(|cluster| cluster.node())
        .map_or(Value::Null, |node| Value::from(node.name.clone()))
}

/// Registered devices and any connected identity, with live state.
pub(crate) fn list_devices(state: &RelayState) -> Value {
    let mut connections: BTreeMap<String, Vec<SessionInfo>> = BTreeMap::new();
    for session in state.presence.sessions() {
        connections
            .entry(session.identity.device_id.clone())
            .or_default()
            .push(session);
    }
    let mut streams: BTreeMap<String, (usize, std::time::SystemTime)> = BTreeMap::new();
    for stream in state.live_streams.list() {
        let entry = streams
            .entry(stream.details.device_id.clone())
            .or_insert((0, stream.started));
        entry.0 += 1;
        entry.1 = entry.1.max(stream.last_activity());
    }
    let mut devices: BTreeMap<String, Option<bool>> = state
        .registry
        .device_list()
        .into_iter()
        .map(|record| (record.device_id, Some(record.enabled)))
        .collect();
    for device_id in connections.keys() {
        devices.entry(device_id.clone()).or_insert(None);
    }
    let list: Vec<Value> = devices
        .into_iter()
        .map(|(device_id, enabled)| {
            let channels = connections
                .get(&device_id)
                .map(Vec::as_slice)
                .unwrap_or(&[]);
            let own = channels
                .iter()
                .find(|session| session.identity.module_id.is_none())
                .or(channels.first());
            let (stream_count, stream_activity) = streams
                .get(&device_id)
                .map_or((0, None), |(count, last)| (*count, Some(*last)));
            let channel_activity = channels
                .iter()
                .filter_map(|session| session.last_activity.or(Some(session.connected_at)))
                .max();
            let last_activity = channel_activity.max(stream_activity);
            let identity = crate::presence::Identity {
                device_id: device_id.clone(),
                module_id: None,
            };
            let last_seen = if channels.is_empty() {
                state.presence.last_seen(&identity)
            } else {
                last_activity
            };
            json!({
                "deviceId": device_id,
                "registered": enabled.is_some(),
                "enabled": enabled.unwrap_or(false),
                "online": !channels.is_empty(),
                "connectedSince": own.map(|session| unix_seconds(session.connected_at)),
                "address": own.map(|session| session.peer.to_string()),
                "liveStreams": stream_count,
                "lastActivity": last_activity.map(unix_seconds),
                "lastSeen": last_seen.map(unix_seconds),
                "connections": channels.iter().map(|session| json!({
                    "moduleId": session.identity.module_id,
                    "address": session.peer.to_string(),
                    "connectedSince": unix_seconds(session.connected_at),
                    "lastActivity": session.last_activity.map(unix_seconds),
                    "ready": session.ready,
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({ "node": node_name(state), "devices": list })
}

pub(crate) fn list_streams(state: &RelayState) -> Value {
    let now = std::time::SystemTime::now();
    let list: Vec<Value> = state
        .live_streams
        .list()
        .iter()
        .map(|stream| {
            let details = &stream.details;
            json!({
                "streamId": stream.stream_id,
                "deviceId": details.device_id,
                "moduleId": details.module_id,
                "streamName": details.stream_name,
                "serviceAddress": details.service_address.to_string(),
                "target": details.target,
                "targetPort": details.target_port(),
                "started": unix_seconds(stream.started),
                "durationSeconds": now.duration_since(stream.started).map_or(0, |since| since.as_secs()),
                "bytesDeviceToService": stream.bytes_device_to_service(),
                "bytesServiceToDevice": stream.bytes_service_to_device(),
                "lastActivity": unix_seconds(stream.last_activity()),
            })
        })
        .collect();
    json!({ "node": node_name(state), "streams": list })
}
