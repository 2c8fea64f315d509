//! HTTP/1.1 on the main listener: hyper's connection with its deadlines and
//! size limits, and the dispatch from a parsed [`Route`] to the endpoint that
//! answers it. What each endpoint does lives in its own module; this only
//! connects them, so the list of what the internet-facing listener serves is
//! in one `match`.
//!
//! `/metrics` is not among them: it is served on the admin listener only
//! (`--admin-listen`, see [`crate::admin`]), and answers 404 here.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use framing::transport::NetworkStream;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};

use crate::control_websocket;
use crate::http_util::{error_code, error_response, throttled, Body};
use crate::listeners::ConnectionGuard;
use crate::routing::{parse_route, Route};
use crate::state::RelayState;
use crate::{streaming, streams_api};

/// Serves one HTTP connection until it ends, is upgraded, or the relay
/// drains. `guard` is handed to every upgrade so the socket stays counted.
/// `peer` is who sent the connection's bytes: the TCP peer, or the client a
/// trusted balancer's PROXY header named.
pub(crate) async fn serve_http(
    state: Arc<RelayState>,
    stream: NetworkStream,
    peer: SocketAddr,
    guard: Arc<ConnectionGuard>,
) {
    let limits = &state.config.limits;
    let service_state = state.clone();
    let service = hyper::service::service_fn(move |request| {
        let state = service_state.clone();
        let guard = guard.clone();
        async move { Ok::<_, Infallible>(route(state, request, peer, guard).await) }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_size.max(8192));
    let connection = builder
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    tokio::pin!(connection);
    tokio::select! {
        result = connection.as_mut() => {
            if let Err(error) = result {
                tracing::debug!(%peer, %error, "HTTP connection ended with an error");
            }
        }
        _ = state.stop_accepting.cancelled() => {
            connection.as_mut().graceful_shutdown();
            tokio::select! {
                _ = connection.as_mut() => {}
                _ = state.stop_streams.cancelled() => {}
            }
        }
    }
}

pub(crate) fn not_found(message: &str) -> Response<Body> {
    error_response(
        StatusCode::NOT_FOUND,
        error_code(StatusCode::NOT_FOUND, 0),
        message,
    )
}

/// `GET /health`: the relay is up and serving (for load balancers).
pub(crate) fn health() -> Response<Body> {
    Response::new(Body::from("ok\n"))
}

/// A WebSocket from a trusted proxy that names no client in a PROXY header
/// is charged to the client its upgrade request names; `false` when that
/// client's source is full (see [`crate::listeners`]).
fn charge_upgrade(state: &RelayState, guard: &ConnectionGuard, client: SocketAddr) -> bool {
    if guard.charge_source(&state.sources, client.ip()) {
        return true;
    }
    tracing::warn!(
        peer = %client,
        limit = state.config.limits.sources.max_connections_per_source,
        "WebSocket refused: too many open connections from this address"
    );
    false
}

fn too_many_from_this_address() -> Response<Body> {
    throttled(
        "too many open connections from this address; close some or retry later",
        5,
    )
}

/// Answers one request. `hop` sent it: the client itself, or a trusted
/// proxy whose `X-Forwarded-For` names the client.
async fn route(
    state: Arc<RelayState>,
    mut request: Request<Incoming>,
    hop: SocketAddr,
    guard: Arc<ConnectionGuard>,
) -> Response<Body> {
    let path = request.uri().path().to_string();
    let method = request.method().clone();
    let trusted_proxies = &state.config.trusted_proxies;
    let peer = trusted_proxies.forwarded_client(hop, request.headers());
    let origin = trusted_proxies.origin(hop, request.headers());
    match parse_route(&method, &path) {
        Route::CreateStream {
            device_id,
            module_id,
            stream_name,
        } => {
            let create = streams_api::CreateStream {
                device_id,
                module_id,
                stream_name,
                headers: std::mem::take(request.headers_mut()),
                peer,
                origin,
            };
            streams_api::create(state, create).await
        }
        Route::BadPath(reason) => error_response(
            StatusCode::BAD_REQUEST,
            error_code(StatusCode::BAD_REQUEST, 4),
            reason,
        ),
        Route::ControlChannel => {
            if !charge_upgrade(&state, &guard, peer) {
                return too_many_from_this_address();
            }
            control_websocket::upgrade(&state, request, peer, origin, guard)
        }
        Route::Streaming {
            device_id,
            stream_id,
        } => {
            if !charge_upgrade(&state, &guard, peer) {
                return too_many_from_this_address();
            }
            let on_upgrade = hyper::upgrade::on(&mut request);
            streaming::upgrade(
                &state,
                request.headers(),
                on_upgrade,
                device_id,
                stream_id,
                peer,
                guard,
            )
        }
        Route::UnknownStream => not_found("no such stream"),
        Route::Health => health(),
        Route::Metrics | Route::NoEndpoint => not_found(&format!(
            "no endpoint {method} {path}: see PROTOCOL.md for the relay's paths"
        )),
    }
}
