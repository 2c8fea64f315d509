//! The admin listener (`--admin-listen`, off by default): `/metrics`,
//! `/health` (`/health/live`, `/health/ready`), the JSON API
//! ([`crate::admin_api`], SAS-authenticated) and the web console
//! ([`crate::console`], under `/console`, sign-in with a policy key), for a
//! Prometheus scraper, probes and operators on a private network. The
//! counters say how busy the relay is and how often clients fail to
//! authenticate, which is no business of the internet, so the main listener
//! does not serve them.
//!
//! Plain HTTP by default, which is right on loopback. An operator who opens
//! the console from another machine would send a policy key and a session
//! cookie across the network in the clear, so `--admin-tls` serves it over
//! TLS with the main listener's certificate (and the console's cookie is
//! then `Secure`), and a plain listener on a reachable address is warned
//! about at start ([`exposed`]). Only the JSON API and the console ask for
//! credentials. It has the header deadline, the TLS handshake deadline and
//! its own small connection cap, so a stuck scraper cannot pile up sockets.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;

use crate::http_service::{health, not_found};
use crate::http_util::Body;
use crate::listeners::accept_until_stopped;
use crate::metrics::Gauges;
use crate::routing::{parse_route, Route};
use crate::state::RelayState;

/// What the admin listener answers with: a whole body, or the console's
/// stream of live updates.
pub type AdminBody = UnsyncBoxBody<Bytes, Infallible>;

/// Admin connections open at once; scrapers and probes need a handful.
const MAX_ADMIN_CONNECTIONS: usize = 64;

/// Whether a plain-HTTP admin listener on `address` is worth a warning: one
/// that other machines can reach (any address but loopback) without TLS.
pub(crate) fn exposed(address: SocketAddr, tls: bool) -> bool {
    !tls && !address.ip().is_loopback()
}

/// Accepts admin connections until the relay stops accepting; over TLS when
/// `acceptor` is given (`--admin-tls`).
pub(crate) async fn accept_loop(
    state: Arc<RelayState>,
    listener: TcpListener,
    acceptor: Option<TlsAcceptor>,
) {
    let permits = Arc::new(Semaphore::new(MAX_ADMIN_CONNECTIONS));
    while let Some((tcp, peer)) = accept_until_stopped(&state, &listener).await {
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::warn!(
                %peer,
                limit = MAX_ADMIN_CONNECTIONS,
                "admin connection refused: too many open admin connections"
            );
            continue;
        };
        let connection_state = state.clone();
        let acceptor = acceptor.clone();
        state.tasks.spawn(async move {
            framing::transport::configure_socket(&tcp);
            match acceptor {
                None => serve(connection_state, tcp, peer, false).await,
                Some(acceptor) => {
                    let deadline = connection_state.config.limits.tls_handshake_timeout;
                    match tokio::time::timeout(deadline, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => serve(connection_state, stream, peer, true).await,
                        Ok(Err(error)) => {
                            tracing::debug!(%peer, %error, "admin TLS handshake failed")
                        }
                        Err(_) => tracing::debug!(%peer, "admin TLS handshake timed out"),
                    }
                }
            }
            drop(permit);
        });
    }
}

/// Serves HTTP/1.1 on one admin connection; `secure` when it is TLS.
async fn serve<S>(state: Arc<RelayState>, io: S, peer: SocketAddr, secure: bool)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service_state = state.clone();
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        let state = service_state.clone();
        async move {
            let path = request.uri().path();
            if path == "/" || path == crate::console::ROOT || path.starts_with("/console/") {
                // The cookie is `Secure` only over TLS.
                return Ok::<_, Infallible>(
                    crate::console::handle(state, request, peer, secure).await,
                );
            }
            Ok(route(&state, &request).map(BodyExt::boxed_unsync))
        }
    });
    let limits = &state.config.limits;
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_size.max(8192));
    let connection = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(connection);
    tokio::select! {
        result = connection.as_mut() => {
            if let Err(error) = result {
                tracing::debug!(%peer, %error, "admin connection ended with an error");
            }
        }
        _ = state.stop_accepting.cancelled() => {}
    }
}

fn route(state: &RelayState, request: &Request<Incoming>) -> Response<Body> {
    let path = request.uri().path();
    if path.starts_with("/api/") {
        return crate::admin_api::handle(state, request.method(), path, request.headers());
    }
    if request.method() == http::Method::GET {
        match path {
            "/health/live" => return health(),
            "/health/ready" => return readiness(state),
            _ => {}
        }
    }
    match parse_route(request.method(), path) {
        Route::Health => health(),
        Route::Metrics => metrics(state),
        _ => not_found(&format!(
            "no endpoint {} {path} on the admin listener: it serves GET /metrics, GET /health, \
             GET /health/live, GET /health/ready, the JSON API under /api/ and the web console under \
             /console/ (README: Admin API, Web console)",
            request.method()
        )),
    }
}

/// `GET /health/ready`: 200 when the relay takes new work: its listeners
/// are open (not draining), its registry answers, and in a cluster NATS is
/// connected; else 503 saying which is not.
fn readiness(state: &RelayState) -> Response<Body> {
    let mut problems = Vec::new();
    if state.stop_accepting.is_cancelled() {
        problems.push("the relay is draining: its listeners no longer accept".to_string());
    }
    match state.registry.policy(crate::data_dir::SERVICE_POLICY) {
        Ok(Some(_)) => {}
        Ok(None) => problems.push("the registry holds no service policy yet".to_string()),
        Err(error) => problems.push(format!("the registry is not readable: {error}")),
    }
    if let Some(cluster) = &state.cluster {
        if !cluster.is_connected() {
            problems.push("not connected to the cluster's NATS".to_string());
        }
    }
    if problems.is_empty() {
        return Response::new(Body::from("ready\n"));
    }
    let mut response = Response::new(Body::from(format!("not ready: {}\n", problems.join("; "))));
    *response.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
    response
}

/// `GET /metrics`: Prometheus text, counters and the current gauges.
fn metrics(state: &RelayState) -> Response<Body> {
    let gauges = Gauges {
        streams_active: state.admission.active_streams(),
        streams_pending: state.pairing.pending_count(),
        devices_connected: state.presence.connected_count(),
        tasks: state.tasks.len(),
    };
    let mut response = Response::new(Body::from(state.metrics.render(&gauges)));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(crate::metrics::CONTENT_TYPE),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_plain_listener_other_machines_reach_is_exposed() {
        let at = |text: &str| text.parse::<SocketAddr>().expect("an address");
        assert!(!exposed(at("127.0.0.1:9090"), false));
        assert!(!exposed(at("127.0.0.5:9090"), false));
        assert!(!exposed(at("[::1]:9090"), false));
        assert!(exposed(at("0.0.0.0:9090"), false));
        assert!(exposed(at("[::]:9090"), false));
        assert!(exposed(at("10.0.0.5:9090"), false));
        assert!(!exposed(at("0.0.0.0:9090"), true));
        assert!(!exposed(at("10.0.0.5:9090"), true));
    }
}
