//! Routing a stream creation to the node that holds the device, by NATS
//! request/reply.
//!
//! The node holding an identity's control channel answers requests on that
//! identity's subject ([`streams_subject`]); any other node that receives
//! the REST call sends it there and maps the answer back to the very HTTP
//! answer the holding node produced. Only the negotiation crosses NATS: the
//! holding node registers the pending pair and puts its own `--node-url` in
//! the streaming URL, so both WebSockets meet there and no stream byte ever
//! crosses NATS or another node.
//!
//! "No responders" means no node holds the identity: the entry node keeps
//! asking (the device may be connecting) until the request's connect
//! timeout, then answers 404 / 404103 like the single relay. A node cut off
//! from NATS answers 503 at once instead of waiting for a request that
//! cannot be sent.

use std::sync::Arc;
use std::time::Duration;

use async_nats::client::RequestErrorKind;
use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::BodyExt;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::Cluster;
use crate::http_util::{error_code, error_response, Body};
use crate::presence::Identity;
use crate::state::RelayState;
use crate::streams_api::{Creation, CreationDeadlines, RemainingBudget};

/// How long the entry node waits before asking again when no node holds
/// the device yet (it may be connecting to one right now).
const NO_RESPONDER_RETRY: Duration = Duration::from_millis(200);

/// Taken off the answer budget sent to the holding node, so that its
/// answer (a 504 included) crosses NATS back before this node's request
/// times out.
const ANSWER_TRANSIT: Duration = Duration::from_millis(250);

/// The largest answer accepted from another node (headers and a short JSON
/// body; anything larger is not an answer this code produces).
const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// The subject on which the node holding `identity` answers stream creations.
pub fn streams_subject(identity: &Identity) -> String {
    format!(
        "devstreams.identity.{}.streams",
        super::encode_token(&identity.to_string())
    )
}

/// This node's name (empty for a CLI connection, which never routes).
pub fn node_name(cluster: &Cluster) -> &str {
    cluster
        .node()
        .map(|node| node.name.as_str())
        .unwrap_or_default()
}

/// The streaming URL base this node hands out (`--node-url`).
pub fn node_url(cluster: &Cluster) -> &str {
    cluster
        .node()
        .map(|node| node.url.trim_end_matches('/'))
        .unwrap_or_default()
}

/// A creation on its way to the holding node.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RoutedRequest {
    pub device_id: String,
    pub module_id: Option<String>,
    pub stream_name: String,
    pub target: Option<String>,
    pub half_close: bool,
    /// The resumable-session ask (`new` / `continue`), when there is one.
    #[serde(default)]
    pub resume: Option<String>,
    /// The entry node's id for this creation, the same on every ask, so
    /// that the holding node serves it once ([`super::routed_once`]).
    /// Empty from nodes older than that.
    #[serde(default)]
    pub request_id: String,
    /// The node the REST call arrived at, for the holding node's log.
    pub from_node: String,
    /// The service's address as the entry node saw it, for the same log.
    pub service_peer: std::net::SocketAddr,
    pub budget: RemainingBudget,
}

/// The holding node's HTTP answer, carried back whole.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoutedAnswer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl RoutedAnswer {
    /// Takes a response apart (its body is already whole in memory).
    pub async fn from_response(response: Response<Body>) -> Self {
        let (parts, body) = response.into_parts();
        let body = match body.collect().await {
            Ok(collected) => String::from_utf8_lossy(&collected.to_bytes()).into_owned(),
            Err(never) => match never {},
        };
        Self {
            status: parts.status.as_u16(),
            headers: parts
                .headers
                .iter()
                .filter_map(|(name, value)| {
                    Some((name.as_str().to_string(), value.to_str().ok()?.to_string()))
                })
                .collect(),
            body,
        }
    }

    /// The same HTTP answer again, on the entry node.
    pub fn into_response(self) -> Option<Response<Body>> {
        let mut builder = Response::builder().status(StatusCode::from_u16(self.status).ok()?);
        for (name, value) in &self.headers {
            builder = builder.header(name.as_str(), value.as_str());
        }
        builder.body(Body::from(Bytes::from(self.body))).ok()
    }
}

/// What routing made of a creation.
pub enum Routed {
    /// The answer for the service (from the holding node, or 404/503/504).
    Answered(Response<Body>),
    /// The device is (now) connected to this node: serve it here.
    HeldHere,
}

fn cluster_unavailable(what: &str) -> Response<Body> {
    error_response(
        StatusCode::SERVICE_UNAVAILABLE,
        error_code(StatusCode::SERVICE_UNAVAILABLE, 2),
        &format!(
            "{what}: this relay node has lost its connection to the cluster (NATS) and can only serve \
             devices connected to it; retry in a few seconds (another node, or this one once NATS is back)"
        ),
    )
}

/// Sends the creation to the node holding the device and waits for its
/// answer, within the creation's own deadlines.
///
/// The entry node's `stream_id` goes along as the request id, and the
/// holding node audits and serves the stream under it, so one stream has one
/// id in every node's audit log.
pub async fn route(
    state: &RelayState,
    cluster: &Arc<Cluster>,
    creation: &Creation,
    service_peer: std::net::SocketAddr,
    deadlines: &CreationDeadlines,
    stream_id: &str,
) -> Routed {
    let identity = &creation.identity;
    let subject = streams_subject(identity);
    let client = cluster.client();
    let request_id = stream_id.to_string();
    loop {
        if state.presence.get(identity).is_some() {
            return Routed::HeldHere;
        }
        if client.connection_state() != async_nats::connection::State::Connected {
            tracing::warn!(%identity, "stream creation refused: not connected to the cluster");
            return Routed::Answered(cluster_unavailable(&format!(
                "device {identity} is not connected to this node"
            )));
        }
        let now = Instant::now();
        let request = RoutedRequest {
            device_id: identity.device_id.clone(),
            module_id: identity.module_id.clone(),
            stream_name: creation.stream_name.clone(),
            target: creation.target.clone(),
            half_close: creation.half_close,
            resume: creation.resume.map(|ask| ask.as_str().to_string()),
            request_id: request_id.clone(),
            from_node: node_name(cluster).to_string(),
            service_peer,
            budget: {
                let mut budget = deadlines.remaining(now);
                budget.answer_within = budget.answer_within.saturating_sub(ANSWER_TRANSIT);
                budget
            },
        };
        let Ok(payload) = serde_json::to_vec(&request) else {
            return Routed::Answered(error_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                error_code(StatusCode::INTERNAL_SERVER_ERROR, 1),
                "could not encode the stream request for the cluster",
            ));
        };
        let wait = deadlines.answer_by.saturating_duration_since(now);
        // A request NATS delivered to a node just as the device left it (a
        // drain, a network switch) is never answered, and this wait would
        // last the whole answer deadline. The device announces itself when
        // it connects to another node: ask again then.
        let mut takeovers = cluster
            .takeovers()
            .listen(super::presence::takeover_subject(identity));
        let request = client.send_request(
            subject.clone(),
            async_nats::Request::new()
                .payload(payload.into())
                .timeout(Some(wait.max(Duration::from_millis(1)))),
        );
        let device_moved = async {
            takeovers.next().await;
        };
        let outcome = tokio::select! {
            // An answer that arrived with an announcement is taken.
            biased;
            outcome = request => outcome,
            () = device_moved => {
                // If the announcement came from the node serving this
                // creation, it joins the repeat to it (same request id).
                tracing::info!(%identity, "a channel of the device announced itself while its stream creation was pending: asking again");
                continue;
            }
        };
        drop(takeovers);
        match outcome {
            Ok(message) => {
                let answer = (message.payload.len() <= MAX_ANSWER_BYTES)
                    .then(|| serde_json::from_slice::<RoutedAnswer>(&message.payload).ok())
                    .flatten()
                    .and_then(RoutedAnswer::into_response);
                return Routed::Answered(answer.unwrap_or_else(|| {
                    tracing::warn!(%identity, "unreadable answer from the node holding the device");
                    error_response(
                        StatusCode::BAD_GATEWAY,
                        error_code(StatusCode::BAD_GATEWAY, 1),
                        &format!("the relay node holding device {identity} sent an unreadable answer; retry"),
                    )
                }));
            }
            Err(error) if error.kind() == RequestErrorKind::NoResponders => {
                let now = Instant::now();
                if now >= deadlines.online_by {
                    let waited = deadlines.connect_wait();
                    tracing::info!(%identity, ?waited, "stream failed: device not connected to any node");
                    return Routed::Answered(error_response(
                        StatusCode::NOT_FOUND,
                        framing::headers::ERROR_DEVICE_NOT_ONLINE,
                        &format!("device {identity} is not connected to any relay node (waited {} s): start device-proxy on the device and check its logs", waited.as_secs()),
                    ));
                }
                // Ask again soon, or serve here at once if it connects here.
                let pause = NO_RESPONDER_RETRY.min(deadlines.online_by - now);
                let _ = state.presence.wait_for(identity, pause).await;
            }
            Err(error) if error.kind() == RequestErrorKind::TimedOut => {
                if client.connection_state() != async_nats::connection::State::Connected {
                    return Routed::Answered(cluster_unavailable(&format!(
                        "device {identity} is not connected to this node"
                    )));
                }
                tracing::info!(%identity, ?wait, "stream failed: the holding node did not answer in time");
                return Routed::Answered(error_response(
                    StatusCode::GATEWAY_TIMEOUT,
                    error_code(StatusCode::GATEWAY_TIMEOUT, 1),
                    &format!(
                        "device {identity} did not answer the stream request within {} s",
                        wait.as_secs_f64().round()
                    ),
                ));
            }
            Err(error) => {
                tracing::warn!(%identity, %error, "stream creation could not be routed");
                return Routed::Answered(cluster_unavailable(&format!(
                    "device {identity} is not connected to this node"
                )));
            }
        }
    }
}

/// Serves one routed creation on the holding node and sends the answer
/// (to every ask of it: [`super::routed_once`]).
pub(super) async fn answer(state: Arc<RelayState>, message: async_nats::Message) {
    let Some(reply) = message.reply.clone() else {
        return;
    };
    let Some(cluster) = state.cluster.clone() else {
        return;
    };
    let request = match serde_json::from_slice::<RoutedRequest>(&message.payload) {
        Ok(request) => request,
        Err(error) => {
            tracing::warn!(%error, "unreadable routed stream request");
            let answer = RoutedAnswer::from_response(error_response(
                StatusCode::BAD_REQUEST,
                error_code(StatusCode::BAD_REQUEST, 1),
                "the relay node that received the request sent an unreadable stream request; are all nodes the same version?",
            ))
            .await;
            if let Some(payload) = encode_answer(&answer) {
                send_answer(&cluster, reply, payload).await;
            }
            return;
        }
    };
    let serving = match cluster
        .routed_once()
        .ask(&request.request_id, reply.clone())
    {
        super::routed_once::Turn::Serve(serving) => serving,
        super::routed_once::Turn::Joined => {
            tracing::info!(device_id = %request.device_id, from_node = %request.from_node, "stream creation asked again: joined to the one in progress");
            return;
        }
        super::routed_once::Turn::AnsweredAlready(payload) => {
            tracing::info!(device_id = %request.device_id, from_node = %request.from_node, "stream creation asked again: sending its answer again");
            send_answer(&cluster, reply, payload).await;
            return;
        }
    };
    tracing::info!(device_id = %request.device_id, from_node = %request.from_node, "stream creation routed here");
    let peer = request.service_peer;
    let deadlines = CreationDeadlines::from_remaining(Instant::now(), request.budget);
    let creation = Creation {
        identity: Identity {
            device_id: request.device_id,
            module_id: request.module_id,
        },
        stream_name: request.stream_name,
        target: request.target,
        half_close: request.half_close,
        resume: request
            .resume
            .as_deref()
            .and_then(framing::topics::ResumeAsk::parse),
        origin: Default::default(),
    };
    // The entry node's id for the stream (older nodes sent a fresh one).
    let stream_id = if crate::streams_api::is_stream_id(&request.request_id) {
        request.request_id.clone()
    } else {
        crate::streams_api::new_stream_id()
    };
    state
        .audit
        .record(|| crate::audit::AuditEvent::StreamRequested {
            stream_id: stream_id.clone(),
            policy: None,
            client_address: peer.to_string(),
            device_id: creation.identity.device_id.clone(),
            module_id: creation.identity.module_id.clone(),
            stream_name: creation.stream_name.clone(),
            target: creation.target.clone(),
            resume: creation.resume.map(framing::topics::ResumeAsk::as_str),
            routed_from: Some(request.from_node.clone()),
        });
    let response =
        crate::streams_api::create_here(state.clone(), creation, peer, deadlines, stream_id).await;
    let answer = RoutedAnswer::from_response(response).await;
    let Some(payload) = encode_answer(&answer) else {
        return;
    };
    for asker in serving.finish(payload.clone()) {
        send_answer(&cluster, asker, payload.clone()).await;
    }
}

fn encode_answer(answer: &RoutedAnswer) -> Option<Bytes> {
    match serde_json::to_vec(answer) {
        Ok(payload) => Some(payload.into()),
        Err(error) => {
            tracing::error!(%error, "could not encode a routed answer");
            None
        }
    }
}

async fn send_answer(cluster: &Cluster, reply: async_nats::Subject, payload: Bytes) {
    if let Err(error) = cluster.client().publish(reply, payload).await {
        tracing::warn!(%error, "could not send the answer to a routed stream creation");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_are_one_token_per_identity_whatever_the_id() {
        let device = Identity {
            device_id: "a.b*c>d e".into(),
            module_id: None,
        };
        let module = Identity {
            device_id: "a.b*c>d e".into(),
            module_id: Some("m".into()),
        };
        let subject = streams_subject(&device);
        assert_eq!(subject.split('.').count(), 4, "{subject}");
        assert!(!subject.contains(['*', '>', ' ']), "{subject}");
        assert_ne!(subject, streams_subject(&module));
    }

    #[tokio::test]
    async fn an_answer_crosses_the_cluster_unchanged() {
        let original = Response::builder()
            .status(StatusCode::OK)
            .header(framing::headers::IS_ACCEPTED, "True")
            .header(framing::headers::URL, "wss://relay-2:8443/bridges/h/d/1")
            .body(Body::from("{}"))
            .unwrap();
        let answer = RoutedAnswer::from_response(original).await;
        let payload = serde_json::to_vec(&answer).unwrap();
        let back: RoutedAnswer = serde_json::from_slice(&payload).unwrap();
        let response = back.clone().into_response().unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()[framing::headers::IS_ACCEPTED], "True");
        assert_eq!(RoutedAnswer::from_response(response).await, answer);
    }
}
