//! The control channel's life: dial, take requests, re-dial.
//!
//! A device must come back on its own after any outage (relay restart, lost
//! network, expired token), so this loop never gives up: every failure is
//! logged and followed by a jittered backoff (see [`crate::backoff`]).
//! Failures that retrying cannot fix — refused credentials, an untrusted
//! certificate — are still retried (the operator may fix the relay side) but
//! logged at error level with what to check.
//!
//! Each request is handed to its own tracked task ([`crate::bridge`]); this
//! loop only dispatches, so it is always ready for the next request.

use std::sync::Arc;
use std::time::{Duration, Instant};

use framing::mqtt::ConnectReturnCode;
use framing::websocket::WebSocketConnectError;
use framing::{ConnectionString, DeviceClient, DeviceError, DeviceOptions};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::backoff::{Backoff, FIRST_CEILING, HEALTHY_CONNECTION};
use crate::bridge::{self, StreamContext};

/// How long a polite MQTT DISCONNECT may take at shutdown.
const DISCONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Keeps a control channel open until `shutdown`, spawning one task per
/// stream request on `tracker`.
pub async fn run(
    connection: &ConnectionString,
    options: &DeviceOptions,
    max_backoff: Duration,
    context: Arc<StreamContext>,
    tracker: &TaskTracker,
    shutdown: &CancellationToken,
) {
    let mut backoff = Backoff::new(FIRST_CEILING, max_backoff);
    while !shutdown.is_cancelled() {
        let connected = tokio::select! {
            _ = shutdown.cancelled() => return,
            connected = DeviceClient::connect(connection, &context.dialer, options) => connected,
        };
        let failure = match connected {
            Ok(client) => {
                info!(relay = %connection.host_name, "control channel connected; waiting for stream requests");
                framing::service_manager::status(&format!("connected to {}", connection.host_name));
                let connected_at = Instant::now();
                let ending = take_requests(client, &context, tracker, shutdown).await;
                if connected_at.elapsed() >= HEALTHY_CONNECTION {
                    backoff.reset();
                }
                match ending {
                    Some(failure) => failure,
                    None => return,
                }
            }
            Err(failure) => failure,
        };
        let delay = delay_after(&failure, &mut backoff);
        let retry_in_ms = delay.as_millis() as u64;
        framing::service_manager::status(&format!(
            "control channel to {} failed ({failure}); retrying in {} s",
            connection.host_name,
            delay.as_secs()
        ));
        if needs_operator(&failure) {
            error!(relay = %connection.host_name, retry_in_ms, "control channel failed: {failure}");
        } else {
            warn!(relay = %connection.host_name, retry_in_ms, "control channel failed: {failure}");
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// Dispatches requests until the channel fails (its error is returned) or
/// shutdown (`None`, after a polite disconnect).
async fn take_requests(
    mut client: DeviceClient,
    context: &Arc<StreamContext>,
    tracker: &TaskTracker,
    shutdown: &CancellationToken,
) -> Option<DeviceError> {
    let responder = client.responder();
    loop {
        let next = tokio::select! {
            _ = shutdown.cancelled() => None,
            next = client.next_request() => Some(next),
        };
        match next {
            None => {
                let _ = tokio::time::timeout(DISCONNECT_TIMEOUT, client.disconnect()).await;
                info!("control channel disconnected");
                return None;
            }
            Some(Err(failure)) => return Some(failure),
            Some(Ok(request)) => {
                tracker.spawn(bridge::serve_request(
                    request,
                    responder.clone(),
                    context.clone(),
                    shutdown.clone(),
                ));
            }
        }
    }
}

/// The wait before re-dialing after `failure`: the jittered backoff, but
/// never below the throttle floor when the relay said "retry later".
fn delay_after(failure: &DeviceError, backoff: &mut Backoff) -> Duration {
    let delay = backoff.next_delay();
    if is_throttle(failure) {
        // Still jittered, so throttled devices do not return together.
        return delay.max(THROTTLE_FLOOR + random_up_to(THROTTLE_JITTER));
    }
    delay
}

/// The least wait after the relay said "retry later".
const THROTTLE_FLOOR: Duration = Duration::from_secs(2);
/// Spread added to the floor.
const THROTTLE_JITTER: Duration = Duration::from_secs(3);

fn random_up_to(limit: Duration) -> Duration {
    use rand::Rng;
    Duration::from_millis(rand::rng().random_range(0..=limit.as_millis() as u64))
}

/// The relay shed our connection (CONNACK 3, or HTTP 429/503 on the upgrade).
fn is_throttle(failure: &DeviceError) -> bool {
    matches!(
        failure,
        DeviceError::Refused(ConnectReturnCode::ServiceUnavailable)
            | DeviceError::WebSocket(WebSocketConnectError::Refused {
                status: 429 | 503,
                ..
            })
    )
}

/// Failures a retry alone will not cure: the operator must look.
fn needs_operator(failure: &DeviceError) -> bool {
    match failure {
        DeviceError::Refused(ConnectReturnCode::ServiceUnavailable) => false,
        DeviceError::Refused(_) | DeviceError::NoDeviceId | DeviceError::SubscriptionRefused => {
            true
        }
        DeviceError::WebSocket(WebSocketConnectError::Connect(error)) => error.needs_operator(),
        DeviceError::WebSocket(WebSocketConnectError::Refused { status, .. }) => {
            matches!(status, 401 | 403 | 404)
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_throttled_device_waits_at_least_the_floor_and_the_waits_are_spread() {
        let throttled = DeviceError::Refused(ConnectReturnCode::ServiceUnavailable);
        let delays: Vec<Duration> = (0..50)
            .map(|_| {
                delay_after(
                    &throttled,
                    &mut Backoff::new(FIRST_CEILING, Duration::from_secs(30)),
                )
            })
            .collect();
        assert!(delays
            .iter()
            .all(|delay| (THROTTLE_FLOOR..=THROTTLE_FLOOR + THROTTLE_JITTER).contains(delay)));
        let distinct = delays
            .iter()
            .collect::<std::collections::HashSet<_>>()
            .len();
        assert!(distinct > 25, "only {distinct} distinct waits out of 50");
        let lost = delay_after(
            &DeviceError::Closed,
            &mut Backoff::new(FIRST_CEILING, Duration::from_secs(30)),
        );
        assert!(
            lost <= FIRST_CEILING,
            "other failures only back off: {lost:?}"
        );
    }

    fn proxy_failure(source: framing::proxy::TunnelError) -> DeviceError {
        DeviceError::WebSocket(WebSocketConnectError::Connect(
            framing::transport::ConnectError::Proxy {
                proxy: "http://127.0.0.1:3128".into(),
                origin: "--proxy",
                address: "relay.example.com:443".into(),
                source,
            },
        ))
    }

    #[test]
    fn a_proxy_refusing_the_credentials_or_the_tunnel_needs_the_operator() {
        use framing::proxy::TunnelError;
        assert!(needs_operator(&proxy_failure(
            TunnelError::CredentialsRefused(407)
        )));
        assert!(needs_operator(&proxy_failure(
            TunnelError::SocksCredentialsRefused
        )));
        assert!(needs_operator(&proxy_failure(TunnelError::Refused {
            status: 403,
            reason: "Forbidden".into()
        })));
        assert!(!needs_operator(&proxy_failure(TunnelError::Closed)));
        assert!(!needs_operator(&proxy_failure(TunnelError::SocksRefused(
            "connection refused".into()
        ))));
    }

    #[test]
    fn refused_credentials_need_the_operator_but_a_lost_channel_does_not() {
        assert!(needs_operator(&DeviceError::Refused(
            framing::mqtt::ConnectReturnCode::NotAuthorized
        )));
        assert!(!needs_operator(&DeviceError::Closed));
        assert!(!needs_operator(&DeviceError::RelaySilent(
            Duration::from_secs(45)
        )));
    }
}
