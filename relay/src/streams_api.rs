//! `POST /twins/{deviceId}/streams/{streamName}`: the service asks for a
//! stream, the relay asks the device, and the answer goes back in IoT Hub's
//! exact headers.
//!
//! The request is held open until the device decides or a deadline passes;
//! every outcome (unknown device, offline, silent, rejected, throttled) is a
//! distinct status with a message that says what to do, because a service
//! program can only react to what it is told.

use framing::topics::ResumeAsk;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use framing::headers;
use framing::stream_token::Side;
use framing::topics::{validate_stream_name, StreamRequest};
use http::{HeaderMap, Response, StatusCode};
use percent_encoding::utf8_percent_encode;
use rand::RngCore;
use tokio::time::Instant;
use tracing::Instrument;

use crate::audit::AuditEvent;
use crate::http_util::{error_code, error_response, throttled, Body, DEVICE_NOT_FOUND};
use crate::limits::AdmissionError;
use crate::metrics::Metrics;
use crate::presence::Identity;
use crate::rights::{Refusal, Right};
use crate::state::RelayState;
use crate::trusted_proxies::ClientOrigin;

/// The part of the request the handler needs.
pub struct CreateStream {
    pub device_id: String,
    pub module_id: Option<String>,
    pub stream_name: String,
    pub headers: HeaderMap,
    /// The client: the TCP peer, or who a trusted proxy says it is.
    pub peer: std::net::SocketAddr,
    /// How the client reached us, for its streaming URL.
    pub origin: ClientOrigin,
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|value| value.to_str().ok())
}

/// A timeout header in seconds, capped by the handshake limit.
pub fn timeout_header(headers: &HeaderMap, name: &str, cap: Duration) -> Result<Duration, String> {
    match header(headers, name) {
        None => Ok(cap),
        Some(text) => match text.trim().parse::<u64>() {
            Ok(seconds) if seconds > 0 => Ok(Duration::from_secs(seconds).min(cap)),
            _ => Err(format!("{name} must be a positive whole number of seconds")),
        },
    }
}

/// Records a refused or rejected creation in the audit log.
fn audit_rejected(
    state: &RelayState,
    stream_id: &str,
    device_id: &str,
    status: StatusCode,
    reason: &str,
) {
    state.audit.record(|| AuditEvent::StreamRejected {
        stream_id: stream_id.to_string(),
        device_id: device_id.to_string(),
        status: status.as_u16(),
        reason: reason.to_string(),
    });
}

/// A fresh stream id: also the audit log's correlation id of the creation.
pub fn new_stream_id() -> String {
    let mut bytes = [0u8; 16];
    rand::rng().fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether `text` has the shape [`new_stream_id`] gives (32 lowercase hex
/// digits): what a node takes from another node as a stream's id.
pub fn is_stream_id(text: &str) -> bool {
    text.len() == 32
        && text
            .bytes()
            .all(|byte| matches!(byte, b'0'..=b'9' | b'a'..=b'f'))
}

/// When each phase of one creation must be over. One budget, counted from
/// the moment the REST call arrived (DESIGN.md: the handshake limit covers
/// reaching the device, its answer, and both sides connecting): waiting for
/// the device to come online never adds to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CreationDeadlines {
    /// The device must be connected by then.
    pub online_by: Instant,
    /// The REST call is answered by then at the latest: the budget of the
    /// two timeouts the client sent, the same one the client waits for
    /// ([`framing::service_client::creation_budget`]), capped by the
    /// handshake limit.
    pub answer_by: Instant,
    /// Both sides must have connected by then; the stream tokens expire then.
    pub handshake_by: Instant,
    arrived: Instant,
    response_timeout: Duration,
}

impl CreationDeadlines {
    /// `connect` and `response` are the request's timeouts, each already
    /// capped by `handshake` (see [`timeout_header`]).
    pub fn new(
        arrived: Instant,
        connect: Duration,
        response: Duration,
        handshake: Duration,
    ) -> Self {
        let handshake_by = arrived + handshake;
        let answer_by =
            arrived + framing::service_client::creation_budget(connect, response).min(handshake);
        Self {
            online_by: (arrived + connect).min(answer_by),
            answer_by,
            handshake_by,
            arrived,
            response_timeout: response,
        }
    }

    /// How long the device is given to come online.
    pub fn connect_wait(&self) -> Duration {
        self.online_by - self.arrived
    }

    /// When a device asked at `asked` must have answered.
    pub fn device_answer_by(&self, asked: Instant) -> Instant {
        (asked + self.response_timeout).min(self.answer_by)
    }

    /// When the stream tokens expire: at the end of the handshake budget.
    pub fn token_expiry(&self) -> SystemTime {
        SystemTime::now() + self.handshake_by.saturating_duration_since(Instant::now())
    }

    /// What is left of each phase at `now`, to send to another node (clocks
    /// of two machines are not comparable; durations are).
    pub fn remaining(&self, now: Instant) -> RemainingBudget {
        RemainingBudget {
            online_within: self.online_by.saturating_duration_since(now),
            answer_within: self.answer_by.saturating_duration_since(now),
            handshake_within: self.handshake_by.saturating_duration_since(now),
            response_timeout: self.response_timeout,
        }
    }

    /// The deadlines of a creation received from another node at `now`.
    pub fn from_remaining(now: Instant, budget: RemainingBudget) -> Self {
        let handshake_by = now + budget.handshake_within;
        let answer_by = (now + budget.answer_within).min(handshake_by);
        Self {
            online_by: (now + budget.online_within).min(answer_by),
            answer_by,
            handshake_by,
            arrived: now,
            response_timeout: budget.response_timeout,
        }
    }
}

/// The rest of one creation's budget, as sent between nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RemainingBudget {
    pub online_within: Duration,
    pub answer_within: Duration,
    pub handshake_within: Duration,
    pub response_timeout: Duration,
}

pub async fn create(state: Arc<RelayState>, request: CreateStream) -> Response<Body> {
    let arrived = Instant::now();
    let CreateStream {
        device_id,
        module_id,
        stream_name,
        headers,
        peer,
        origin,
    } = request;
    // An address that keeps failing waits before each new attempt is judged.
    let delay = state.sources.failure_delay(peer.ip());
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let stream_id = new_stream_id();
    let authorized = crate::rights::authorize(&state, &headers, Right::ServiceConnect);
    let policy = match &authorized {
        Ok(policy) => Some(policy.name.clone()),
        Err(Refusal::MissingRight { policy, .. }) => Some(policy.clone()),
        Err(Refusal::BadCredentials(_)) => None,
    };
    state.audit.record(|| AuditEvent::StreamRequested {
        stream_id: stream_id.clone(),
        policy,
        client_address: peer.to_string(),
        device_id: device_id.clone(),
        module_id: module_id.clone(),
        stream_name: stream_name.clone(),
        target: header(&headers, headers::TARGET).map(str::to_string),
        resume: header(&headers, headers::RESUME)
            .and_then(ResumeAsk::parse)
            .map(ResumeAsk::as_str),
        routed_from: None,
    });
    let rejected = |status: StatusCode, reason: &str| {
        audit_rejected(&state, &stream_id, &device_id, status, reason)
    };
    match authorized {
        Ok(_) => {}
        Err(Refusal::BadCredentials(reason)) => {
            rejected(
                StatusCode::UNAUTHORIZED,
                &format!("service credentials refused: {reason}"),
            );
            Metrics::add(&state.metrics.authentication_failures, 1);
            state.sources.record_failure(peer.ip());
            tracing::warn!(%peer, device_id, %reason, "stream creation refused: bad service credentials");
            return error_response(
                StatusCode::UNAUTHORIZED,
                error_code(StatusCode::UNAUTHORIZED, 1),
                &format!("service credentials refused: {reason}; use the connection string printed by `relay policy show`"),
            );
        }
        Err(refusal @ Refusal::MissingRight { .. }) => {
            rejected(
                StatusCode::UNAUTHORIZED,
                &format!("service credentials refused: {refusal}"),
            );
            // Valid credentials: no slowdown, the client only used the wrong policy.
            tracing::warn!(%peer, device_id, %refusal, "stream creation refused: missing right");
            return error_response(
                StatusCode::UNAUTHORIZED,
                error_code(StatusCode::UNAUTHORIZED, 1),
                &format!("service credentials refused: {refusal}"),
            );
        }
    }
    if let Err(reason) = validate_stream_name(&stream_name) {
        rejected(StatusCode::BAD_REQUEST, reason);
        return error_response(
            StatusCode::BAD_REQUEST,
            error_code(StatusCode::BAD_REQUEST, 1),
            reason,
        );
    }
    let handshake_limit = state.config.limits.handshake_timeout;
    let (connect_timeout, response_timeout) = match (
        timeout_header(&headers, headers::CONNECT_TIMEOUT, handshake_limit),
        timeout_header(&headers, headers::RESPONSE_TIMEOUT, handshake_limit),
    ) {
        (Ok(connect), Ok(response)) => (connect, response),
        (Err(reason), _) | (_, Err(reason)) => {
            rejected(StatusCode::BAD_REQUEST, &reason);
            return error_response(
                StatusCode::BAD_REQUEST,
                error_code(StatusCode::BAD_REQUEST, 2),
                &reason,
            );
        }
    };
    if let Err((reason, refusal)) = check_device(&state, &device_id).await {
        rejected(refusal.status(), reason);
        return refusal;
    }
    let deadlines =
        CreationDeadlines::new(arrived, connect_timeout, response_timeout, handshake_limit);
    let creation = Creation {
        identity: Identity {
            device_id,
            module_id,
        },
        stream_name,
        target: header(&headers, headers::TARGET).map(str::to_string),
        half_close: header(&headers, headers::HALF_CLOSE) == Some("True"),
        resume: header(&headers, headers::RESUME).and_then(ResumeAsk::parse),
        origin,
    };
    // In a cluster the device's channel may be held by another node: that
    // node answers (and its own URL goes into the answer), unless the device
    // is, or comes, online here.
    if let Some(cluster) = state.cluster.clone() {
        if state.presence.get(&creation.identity).is_none() {
            if let crate::cluster::routing::Routed::Answered(response) =
                crate::cluster::routing::route(
                    &state, &cluster, &creation, peer, &deadlines, &stream_id,
                )
                .await
            {
                let accepted = response.status() == StatusCode::OK
                    && response
                        .headers()
                        .get(headers::IS_ACCEPTED)
                        .map(|v| v.as_bytes())
                        == Some(b"True");
                if accepted {
                    state.audit.record(|| AuditEvent::StreamAccepted {
                        stream_id: stream_id.clone(),
                        device_id: creation.identity.device_id.clone(),
                    });
                } else {
                    audit_rejected(
                        &state,
                        &stream_id,
                        &creation.identity.device_id,
                        response.status(),
                        "refused or rejected on the node holding the device (see its audit log)",
                    );
                }
                return response;
            }
        }
    }
    create_here(state, creation, peer, deadlines, stream_id).await
}

/// What a creation asks, apart from the credentials already checked: all a
/// node holding the device needs to serve it (also when sent over NATS).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Creation {
    pub identity: Identity,
    pub stream_name: String,
    /// The devstreams target header, if the service named one.
    pub target: Option<String>,
    /// The service asked for the half-close signal.
    pub half_close: bool,
    /// The service asked to start (or continue) a resumable session.
    pub resume: Option<ResumeAsk>,
    /// How the service reached us (for the streaming URL outside a cluster).
    pub origin: ClientOrigin,
}

/// The device must be registered and enabled (read from this node's copy).
/// A refusal comes with its reason for the audit log.
async fn check_device(
    state: &RelayState,
    device_id: &str,
) -> Result<(), (&'static str, Response<Body>)> {
    match crate::registry::usable_device(state.registry.as_ref(), device_id).await {
        Ok(Some(record)) if record.enabled => Ok(()),
        Ok(Some(_)) => Err((
            "device disabled",
            error_response(
                StatusCode::NOT_FOUND,
                DEVICE_NOT_FOUND,
                &format!("device {device_id} is disabled"),
            ),
        )),
        Ok(None) => Err((
            "unknown device",
            error_response(
                StatusCode::NOT_FOUND,
                DEVICE_NOT_FOUND,
                &format!(
                    "device {device_id} is not registered: add it with `relay device add {device_id}`"
                ),
            ),
        )),
        Err(error) => {
            tracing::error!(%error, "registry lookup failed");
            Err((
                "registry unavailable",
                error_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    503001,
                    "the relay's registry is unavailable; retry later",
                ),
            ))
        }
    }
}

/// Serves a creation on this node: the per-device limits (enforced where
/// the device's channel is, so they hold cluster-wide), the device's
/// answer, and the pending pair. A request routed from another node of the
/// cluster comes in here too, on the node holding the device.
pub async fn create_here(
    state: Arc<RelayState>,
    creation: Creation,
    peer: std::net::SocketAddr,
    deadlines: CreationDeadlines,
    stream_id: String,
) -> Response<Body> {
    let device_id = creation.identity.device_id.clone();
    if state.cluster.is_some() {
        // On the holding node the registry copy is checked again: the
        // device may have been disabled since the entry node looked.
        if let Err((reason, refusal)) = check_device(&state, &device_id).await {
            audit_rejected(&state, &stream_id, &device_id, refusal.status(), reason);
            return refusal;
        }
    }
    let permit = match state.admission.admit(&device_id) {
        Ok(permit) => permit,
        Err(error) => {
            audit_rejected(
                &state,
                &stream_id,
                &device_id,
                StatusCode::TOO_MANY_REQUESTS,
                &error.to_string(),
            );
            Metrics::add(&state.metrics.stream_creations_refused, 1);
            tracing::warn!(device_id, %error, "stream creation refused by limits");
            let retry_after = match error {
                AdmissionError::RelayRate(_) | AdmissionError::DeviceRate { .. } => 1,
                _ => 5,
            };
            return throttled(&error.to_string(), retry_after);
        }
    };
    let span = tracing::info_span!("stream", device_id = %device_id, stream_id = %stream_id, stream_name = %creation.stream_name);
    negotiate(state, creation, peer, stream_id, permit, deadlines)
        .instrument(span)
        .await
}

/// The base of streaming URLs this node hands out: in a cluster its own
/// `--node-url`, so both sides meet on the node that holds the device.
fn streaming_base(state: &RelayState, origin: &ClientOrigin) -> String {
    match &state.cluster {
        Some(cluster) => crate::cluster::routing::node_url(cluster).to_string(),
        None => state.streaming_base(origin),
    }
}

/// Reaches the device and waits for its decision, inside the stream's span.
async fn negotiate(
    state: Arc<RelayState>,
    creation: Creation,
    peer: std::net::SocketAddr,
    stream_id: String,
    permit: crate::limits::StreamPermit,
    deadlines: CreationDeadlines,
) -> Response<Body> {
    let Creation {
        identity,
        stream_name,
        target,
        half_close: half_close_asked,
        resume: resume_asked,
        origin,
    } = creation;
    let device_id = identity.device_id.clone();
    let module_id = identity.module_id.clone();
    let expiry = deadlines.token_expiry();
    let rejected = |status: StatusCode, reason: &str| {
        audit_rejected(&state, &stream_id, &device_id, status, reason)
    };
    Metrics::add(&state.metrics.streams_requested, 1);
    tracing::info!(%peer, module_id = module_id.as_deref().unwrap_or(""), "stream requested");

    let connect_wait = deadlines
        .online_by
        .saturating_duration_since(Instant::now());
    let Some(session) = state.presence.wait_for(&identity, connect_wait).await else {
        let waited = deadlines.connect_wait();
        tracing::info!(?waited, "stream failed: device not connected");
        rejected(
            StatusCode::NOT_FOUND,
            &format!("device not connected (waited {} s)", waited.as_secs()),
        );
        return error_response(
            StatusCode::NOT_FOUND,
            headers::ERROR_DEVICE_NOT_ONLINE,
            &format!("device {identity} is not connected (waited {} s): start device-proxy on the device and check its logs", waited.as_secs()),
        );
    };
    // Held until the service has its answer: any way out before that
    // (refusal, silence, a client that hung up) removes the stream and
    // releases its permit.
    let details = Arc::new(crate::live::StreamDetails {
        device_id: device_id.clone(),
        module_id: module_id.clone(),
        stream_name: stream_name.clone(),
        target: target.clone(),
        service_address: peer,
        requested: deadlines.arrived,
    });
    let registration = match state.pairing.register(
        &stream_id,
        &device_id,
        details,
        deadlines.handshake_by,
        permit,
    ) {
        Ok(registration) => registration,
        Err(full) => {
            Metrics::add(&state.metrics.stream_creations_refused, 1);
            rejected(StatusCode::TOO_MANY_REQUESTS, &full.to_string());
            return throttled(&full.to_string(), 5);
        }
    };
    let path = format!(
        "/bridges/{}/{}/{}",
        utf8_percent_encode(&state.config.hub_name, framing::sas::COMPONENT),
        utf8_percent_encode(&device_id, framing::sas::COMPONENT),
        stream_id
    );
    let service_url = format!("{}{path}", streaming_base(&state, &origin));
    let device_url = format!("{}{path}", streaming_base(&state, &session.origin));
    let stream_request = StreamRequest {
        stream_name: stream_name.clone(),
        request_id: state.next_request_id(),
        url: device_url,
        authorization_token: state
            .token_key
            .issue(&stream_id, &device_id, Side::Device, expiry),
        target: target.clone(),
        half_close: half_close_asked,
        resume: resume_asked,
    };
    let Ok(answer) = session.send_request(stream_request) else {
        rejected(
            StatusCode::TOO_MANY_REQUESTS,
            "the device has too many stream requests waiting",
        );
        return throttled(
            &format!("device {device_id} has too many stream requests waiting; retry later"),
            1,
        );
    };
    let asked = Instant::now();
    let answer_by = deadlines.device_answer_by(asked);
    let response = match tokio::time::timeout_at(answer_by, answer).await {
        Ok(Ok(response)) => response,
        Ok(Err(_)) => {
            tracing::info!("stream failed: device disconnected before answering");
            rejected(
                StatusCode::GATEWAY_TIMEOUT,
                "device disconnected before answering",
            );
            return error_response(
                StatusCode::GATEWAY_TIMEOUT,
                error_code(StatusCode::GATEWAY_TIMEOUT, 1),
                &format!(
                    "device {device_id} disconnected before answering the stream request; retry"
                ),
            );
        }
        Err(_) => {
            let waited = answer_by.saturating_duration_since(asked);
            tracing::info!(?waited, "stream failed: device did not answer");
            rejected(
                StatusCode::GATEWAY_TIMEOUT,
                &format!(
                    "device did not answer within {} s",
                    waited.as_secs_f64().round()
                ),
            );
            return error_response(
                StatusCode::GATEWAY_TIMEOUT,
                error_code(StatusCode::GATEWAY_TIMEOUT, 1),
                &format!(
                    "device {device_id} did not answer the stream request within {} s",
                    waited.as_secs_f64().round()
                ),
            );
        }
    };
    if response.status != 200 {
        Metrics::add(&state.metrics.streams_rejected, 1);
        let target = target.as_deref();
        tracing::info!(
            status = response.status,
            target,
            "stream rejected by the device"
        );
        let message = match target {
            Some(target) => format!("device {device_id} rejected stream {stream_name} (target {target}): the device does not expose that target, or the target refused the connection; see the device's log"),
            None => format!("device {device_id} rejected stream {stream_name}; see the device's log for why"),
        };
        rejected(
            StatusCode::OK,
            &match target {
                Some(target) => format!(
                    "rejected by the device (status {}, target {target})",
                    response.status
                ),
                None => format!("rejected by the device (status {})", response.status),
            },
        );
        let body = serde_json::json!({ "errorCode": 400_000 + i64::from(response.status % 1000), "message": message }).to_string();
        return Response::builder()
            .status(StatusCode::OK)
            .header(headers::IS_ACCEPTED, "False")
            .header(
                http::header::CONTENT_TYPE,
                "application/json; charset=utf-8",
            )
            .body(Body::from(body))
            .expect("a response built from valid parts is valid");
    }
    Metrics::add(&state.metrics.streams_accepted, 1);
    tracing::info!("stream accepted by the device");
    state.audit.record(|| AuditEvent::StreamAccepted {
        stream_id: stream_id.clone(),
        device_id: device_id.clone(),
    });
    if response.resume && resume_asked == Some(ResumeAsk::Continue) {
        state.audit.record(|| AuditEvent::StreamResumed {
            stream_id: stream_id.clone(),
            device_id: device_id.clone(),
        });
    }
    let service_token = state
        .token_key
        .issue(&stream_id, &device_id, Side::Service, expiry);
    let half_close = response.half_close && half_close_asked;
    let mut builder = Response::builder()
        .status(StatusCode::OK)
        .header(headers::IS_ACCEPTED, "True")
        .header(headers::URL, service_url)
        .header(headers::AUTH_TOKEN, service_token);
    if half_close {
        builder = builder.header(headers::HALF_CLOSE, "True");
    }
    if response.resume && resume_asked.is_some() {
        builder = builder.header(headers::RESUME, "True");
    }
    // The service has its answer (a client that hung up just now loses the
    // stream to the deadline, like one that never connects).
    registration.keep();
    builder
        .body(Body::default())
        .expect("a response built from valid parts is valid")
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    #[test]
    fn only_the_shape_of_a_fresh_stream_id_is_taken_from_another_node() {
        assert!(is_stream_id(&new_stream_id()));
        for other in [
            "",
            "0123",
            "0123456789ABCDEF0123456789abcdef",
            "0123456789abcdef0123456789abcde/",
            "0123456789abcdef0123456789abcdef0",
        ] {
            assert!(!is_stream_id(other), "{other:?}");
        }
    }

    #[test]
    fn one_budget_counts_from_the_request_not_from_the_device_coming_online() {
        let arrived = Instant::now();
        let deadlines = CreationDeadlines::new(arrived, 60 * SECOND, 60 * SECOND, 60 * SECOND);
        assert_eq!(deadlines.online_by, arrived + 60 * SECOND);
        assert_eq!(deadlines.answer_by, arrived + 60 * SECOND);
        assert_eq!(deadlines.handshake_by, arrived + 60 * SECOND);
        // A device that comes online at 50 s has the 10 s left, not 60 more.
        assert_eq!(
            deadlines.device_answer_by(arrived + 50 * SECOND),
            arrived + 60 * SECOND
        );
    }

    #[test]
    fn the_device_gets_its_response_timeout_from_the_moment_it_is_asked() {
        let arrived = Instant::now();
        let deadlines = CreationDeadlines::new(arrived, 10 * SECOND, 5 * SECOND, 60 * SECOND);
        assert_eq!(deadlines.online_by, arrived + 10 * SECOND);
        assert_eq!(deadlines.connect_wait(), 10 * SECOND);
        assert_eq!(deadlines.answer_by, arrived + 15 * SECOND);
        assert_eq!(
            deadlines.device_answer_by(arrived + SECOND),
            arrived + 6 * SECOND
        );
        assert_eq!(
            deadlines.device_answer_by(arrived + 10 * SECOND),
            arrived + 15 * SECOND
        );
        // Pairing keeps the full handshake budget: tokens outlive the answer.
        assert_eq!(deadlines.handshake_by, arrived + 60 * SECOND);
    }

    #[test]
    fn the_relay_answers_within_what_the_client_waits_for() {
        let arrived = Instant::now();
        for handshake in [SECOND, 4 * SECOND, 60 * SECOND, 600 * SECOND] {
            for connect in [1u32, 3, 60, 600] {
                for response in [1u32, 3, 60, 600] {
                    let options = framing::StreamOptions {
                        connect_timeout: connect * SECOND,
                        response_timeout: response * SECOND,
                        ..Default::default()
                    };
                    // What the relay makes of the headers: each capped.
                    let connect = (connect * SECOND).min(handshake);
                    let response = (response * SECOND).min(handshake);
                    let deadlines = CreationDeadlines::new(arrived, connect, response, handshake);
                    assert!(deadlines.online_by <= deadlines.answer_by);
                    assert!(deadlines.answer_by <= deadlines.handshake_by);
                    assert!(
                        deadlines.answer_by + framing::service_client::ANSWER_MARGIN
                            <= arrived + framing::service_client::answer_deadline(&options),
                        "handshake {handshake:?}, connect {connect:?}, response {response:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_budget_sent_to_another_node_keeps_every_deadline() {
        let arrived = Instant::now();
        let deadlines = CreationDeadlines::new(arrived, 10 * SECOND, 5 * SECOND, 60 * SECOND);
        let sent = arrived + 2 * SECOND;
        let budget = deadlines.remaining(sent);
        assert_eq!(budget.online_within, 8 * SECOND);
        // Received later, on another machine's clock: each phase ends as
        // long after receipt as it had left when sent.
        let received = Instant::now() + 100 * SECOND;
        let there = CreationDeadlines::from_remaining(received, budget);
        assert_eq!(there.online_by, received + 8 * SECOND);
        assert_eq!(there.answer_by, received + 13 * SECOND);
        assert_eq!(there.handshake_by, received + 58 * SECOND);
        assert_eq!(
            there.device_answer_by(received + SECOND),
            received + 6 * SECOND
        );
    }

    #[test]
    fn timeout_headers_are_capped_by_the_handshake_limit() {
        let mut headers = HeaderMap::new();
        headers.insert(headers::CONNECT_TIMEOUT, "600".parse().unwrap());
        assert_eq!(
            timeout_header(&headers, headers::CONNECT_TIMEOUT, 60 * SECOND),
            Ok(60 * SECOND)
        );
        assert_eq!(
            timeout_header(&headers, headers::RESPONSE_TIMEOUT, 60 * SECOND),
            Ok(60 * SECOND)
        );
        headers.insert(headers::RESPONSE_TIMEOUT, "0".parse().unwrap());
        assert!(timeout_header(&headers, headers::RESPONSE_TIMEOUT, 60 * SECOND).is_err());
    }
}
