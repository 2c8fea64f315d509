//! The service side of stream creation: the IoT Hub REST call
//! `POST /twins/{deviceId}/streams/{streamName}`.
//!
//! Calls reuse keep-alive HTTP/1.1 connections ([`ConnectionPool`]): a
//! fleet reconnecting creates streams by the thousand, and a new TLS
//! connection per call cost the service side, the relay and the set-up time
//! a full handshake each. A pooled connection the relay has closed meanwhile
//! (its idle timeout, a restart) is never reported: the call is sent again,
//! once, on a fresh connection.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::time::Instant;

use crate::connection_string::ConnectionString;
use crate::headers;
use crate::identity::encode_path_segment;
use crate::sas;
use crate::transport::{self, ConnectError, Dialer};

/// Largest error body read from the relay.
const MAX_RESPONSE_BODY: usize = 64 * 1024;
/// Lifetime of the SAS token a call signs.
const TOKEN_LIFETIME: Duration = Duration::from_secs(3600);
/// How much longer than the relay's budget the client waits for the answer:
/// the relay's answer still has to travel, and both clocks start a network
/// hop apart.
pub const ANSWER_MARGIN: Duration = Duration::from_secs(5);

/// The longest a relay takes to answer a stream creation, from the moment
/// the request reaches it: the device must be connected within `connect`,
/// then answer within `response`. The relay's own handshake limit (which
/// also caps each timeout) can only make it shorter. The relay and this
/// client both derive their deadlines from it.
pub fn creation_budget(connect: Duration, response: Duration) -> Duration {
    connect.saturating_add(response)
}

/// A timeout as the request header carries it: whole seconds, at least 1.
fn header_seconds(timeout: Duration) -> u64 {
    timeout.as_secs().max(1)
}

/// How long the client waits for the relay's answer once the request is
/// sent: the budget of the timeouts it sent, plus [`ANSWER_MARGIN`].
pub fn answer_deadline(options: &StreamOptions) -> Duration {
    creation_budget(
        Duration::from_secs(header_seconds(options.connect_timeout)),
        Duration::from_secs(header_seconds(options.response_timeout)),
    )
    .saturating_add(ANSWER_MARGIN)
}

/// What the service asks for.
#[derive(Debug, Clone)]
pub struct StreamOptions {
    /// How long the relay may wait for the device to be connected.
    pub connect_timeout: Duration,
    /// How long the relay may wait for the device's answer.
    pub response_timeout: Duration,
    /// devstreams: the `HOST:PORT` or `PORT` the device should bridge to.
    pub target: Option<String>,
    /// devstreams: ask to carry TCP half-closes through the stream.
    pub half_close: bool,
}

impl Default for StreamOptions {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(60),
            response_timeout: Duration::from_secs(60),
            target: None,
            half_close: false,
        }
    }
}

/// The relay's answer when the device answered.
#[derive(Debug, Clone)]
pub struct StreamInvitation {
    pub stream_name: String,
    pub is_accepted: bool,
    /// Streaming endpoint, when accepted.
    pub url: String,
    /// Service-side stream token, when accepted.
    pub authorization_token: String,
    /// Both ends agreed to carry half-closes.
    pub half_close: bool,
    /// Both ends agreed to a resumable session.
    pub resume: bool,
    /// Why the device said no, when rejected.
    pub rejection_reason: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum CreateStreamError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("HTTP exchange with the relay failed: {0}")]
    Http(String),
    #[error("the relay refused the service credentials (401): {0}; check SERVICE_CONNECTION_STRING with `relay policy show`")]
    Unauthorized(String),
    #[error("device not found (404): {0}")]
    DeviceNotFound(String),
    #[error("device is not connected (404103): {0}")]
    DeviceOffline(String),
    #[error("the device did not answer in time (504): {0}")]
    DeviceTimeout(String),
    #[error("the relay is busy (429), retry after {retry_after_seconds} s: {message}")]
    Throttled {
        retry_after_seconds: u64,
        message: String,
    },
    #[error("the relay answered {status}: {message}")]
    Unexpected { status: u16, message: String },
    #[error("the relay did not answer within {0:?}")]
    Timeout(Duration),
}

/// Idle connections a client keeps for later calls, at most: enough for a
/// burst of concurrent creations to find one each time most are answered,
/// few enough that an idle service program holds next to nothing.
pub const MAX_IDLE_CONNECTIONS: usize = 8;

/// How long an idle connection is kept. Below the relay's header read
/// timeout (10 s by default), after which the relay closes a connection
/// that sent no request, so a call rarely picks one the relay is closing.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a pooled connection may take to be ready for the next request
/// (the previous answer is read whole before it is pooled, so it normally
/// is at once); past it the call opens a fresh connection.
const POOLED_READY_TIMEOUT: Duration = Duration::from_millis(200);

/// One HTTP/1.1 connection to the relay. Dropping it stops its task and
/// closes the socket, so a connection given up on (an error, a timeout, a
/// dropped client) leaves nothing behind.
struct RelayConnection {
    sender: SendRequest<Empty<Bytes>>,
    task: tokio::task::JoinHandle<()>,
}

impl RelayConnection {
    /// Starts HTTP/1.1 on a connected stream; its task runs until the
    /// connection is dropped or the relay closes it.
    async fn start<T>(stream: T) -> Result<Self, hyper::Error>
    where
        T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
    {
        let (sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        let task = tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "HTTP connection to the relay ended with an error");
            }
        });
        Ok(Self { sender, task })
    }
}

impl Drop for RelayConnection {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct IdleConnection {
    connection: RelayConnection,
    idle_since: Instant,
}

/// Keep-alive connections to one relay, shared by a client and its clones:
/// at most [`MAX_IDLE_CONNECTIONS`] idle, each for at most [`IDLE_TIMEOUT`]
/// (checked whenever a connection is taken or returned; the relay closes
/// idle ones of its own accord too, which ends their task). Only a
/// connection whose answer was read whole comes back here.
#[derive(Default)]
struct ConnectionPool {
    idle: Mutex<Vec<IdleConnection>>,
}

impl ConnectionPool {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<IdleConnection>> {
        self.idle
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The most recently used live connection, ready for a request.
    async fn take(&self) -> Option<RelayConnection> {
        loop {
            let candidate = {
                let mut idle = self.lock();
                let now = Instant::now();
                idle.retain(|entry| {
                    now.duration_since(entry.idle_since) < IDLE_TIMEOUT
                        && !entry.connection.sender.is_closed()
                });
                idle.pop()
            };
            let mut connection = candidate?.connection;
            let ready = tokio::time::timeout(POOLED_READY_TIMEOUT, connection.sender.ready()).await;
            if matches!(ready, Ok(Ok(()))) {
                return Some(connection);
            }
        }
    }

    fn put(&self, connection: RelayConnection) {
        if connection.sender.is_closed() {
            return;
        }
        let mut idle = self.lock();
        if idle.len() < MAX_IDLE_CONNECTIONS {
            idle.push(IdleConnection {
                connection,
                idle_since: Instant::now(),
            });
        }
    }

    #[cfg(test)]
    fn idle_count(&self) -> usize {
        self.lock().len()
    }
}

/// A client for one service connection string.
#[derive(Clone)]
pub struct ServiceClient {
    connection: ConnectionString,
    dialer: Dialer,
    pool: Arc<ConnectionPool>,
}

impl ServiceClient {
    /// `dialer` is a [`Dialer`] (TLS trust and proxy settings) or a bare
    /// TLS configuration (direct).
    pub fn new(connection: ConnectionString, dialer: impl Into<Dialer>) -> Self {
        Self {
            connection,
            dialer: dialer.into(),
            pool: Arc::default(),
        }
    }

    pub fn host_name(&self) -> &str {
        &self.connection.host_name
    }

    /// Asks the relay to create a stream to `device_id`, waiting for the
    /// device's decision: dialing has its own bound, then the answer must
    /// come within [`answer_deadline`].
    pub async fn create_stream(
        &self,
        device_id: &str,
        stream_name: &str,
        options: &StreamOptions,
    ) -> Result<StreamInvitation, CreateStreamError> {
        self.exchange(device_id, stream_name, options, None).await
    }

    /// [`ServiceClient::create_stream`], also asking for a resumable
    /// session (devstreams' own proxies only; PROTOCOL.md "Resumable
    /// streams"). The invitation says whether the device agreed.
    pub async fn create_resumable_stream(
        &self,
        device_id: &str,
        stream_name: &str,
        options: &StreamOptions,
        resume: crate::topics::ResumeAsk,
    ) -> Result<StreamInvitation, CreateStreamError> {
        self.exchange(device_id, stream_name, options, Some(resume))
            .await
    }

    async fn exchange(
        &self,
        device_id: &str,
        stream_name: &str,
        options: &StreamOptions,
        resume: Option<crate::topics::ResumeAsk>,
    ) -> Result<StreamInvitation, CreateStreamError> {
        let token = sas::sign(
            &self.connection.host_name,
            self.connection.key(),
            SystemTime::now() + TOKEN_LIFETIME,
            self.connection.shared_access_key_name.as_deref(),
        );
        let path = creation_path(device_id, stream_name);
        let build_request = || {
            let mut request = http::Request::post(&path)
                .header(http::header::HOST, &self.connection.host_name)
                .header(http::header::AUTHORIZATION, &token)
                .header(
                    headers::CONNECT_TIMEOUT,
                    header_seconds(options.connect_timeout).to_string(),
                )
                .header(
                    headers::RESPONSE_TIMEOUT,
                    header_seconds(options.response_timeout).to_string(),
                )
                .header(http::header::CONTENT_LENGTH, "0");
            if let Some(target) = &options.target {
                request = request.header(headers::TARGET, target);
            }
            if options.half_close {
                request = request.header(headers::HALF_CLOSE, "True");
            }
            if let Some(resume) = resume {
                request = request.header(headers::RESUME, resume.as_str());
            }
            request.body(Empty::<Bytes>::new()).map_err(|e| {
                CreateStreamError::Http(format!(
                    "cannot build the request (bad device id or stream name?): {e}"
                ))
            })
        };
        let timed_out = |_| CreateStreamError::Timeout(answer_deadline(options));
        let (response, connection, answer_by) = self.send(build_request, options).await?;
        let status = response.status().as_u16();
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|value| value.to_str().ok())
                .map(str::to_string)
        };
        let is_accepted = header(headers::IS_ACCEPTED);
        let url = header(headers::URL).unwrap_or_default();
        let authorization_token = header(headers::AUTH_TOKEN).unwrap_or_default();
        let half_close = header(headers::HALF_CLOSE).as_deref() == Some("True");
        let resume = resume.is_some() && header(headers::RESUME).as_deref() == Some("True");
        let retry_after_seconds = header("retry-after")
            .and_then(|v| v.parse().ok())
            .unwrap_or(1);
        let body = tokio::time::timeout_at(
            answer_by,
            Limited::new(response.into_body(), MAX_RESPONSE_BODY).collect(),
        )
        .await
        .map_err(timed_out)?;
        // Only a connection whose answer was read whole is ready for the
        // next call; one with an unread or oversized body is closed.
        let body = match body {
            Ok(collected) => {
                self.pool.put(connection);
                collected.to_bytes()
            }
            Err(_) => Bytes::new(),
        };
        let message = error_message(&body);
        match status {
            200 => {
                let is_accepted = match is_accepted.as_deref() {
                    Some("True") => true,
                    Some("False") => false,
                    other => {
                        return Err(CreateStreamError::Http(format!(
                            "the relay answered 200 without a valid {} header ({other:?})",
                            headers::IS_ACCEPTED
                        )))
                    }
                };
                if is_accepted && (url.is_empty() || authorization_token.is_empty()) {
                    return Err(CreateStreamError::Http(
                        "the relay accepted without a streaming URL or token".into(),
                    ));
                }
                Ok(StreamInvitation {
                    stream_name: stream_name.to_string(),
                    is_accepted,
                    url,
                    authorization_token,
                    half_close: is_accepted && half_close,
                    resume: is_accepted && resume,
                    rejection_reason: (!is_accepted).then_some(message),
                })
            }
            401 | 403 => Err(CreateStreamError::Unauthorized(message)),
            404 if body_error_code(&body) == Some(headers::ERROR_DEVICE_NOT_ONLINE) => {
                Err(CreateStreamError::DeviceOffline(message))
            }
            404 => Err(CreateStreamError::DeviceNotFound(message)),
            504 => Err(CreateStreamError::DeviceTimeout(message)),
            429 => Err(CreateStreamError::Throttled {
                retry_after_seconds,
                message,
            }),
            status => Err(CreateStreamError::Unexpected { status, message }),
        }
    }
}

impl ServiceClient {
    /// Sends the request on a pooled connection, or on a fresh one when
    /// none is idle. A pooled connection that fails before any answer came
    /// (the relay closed it as the request went out) is dropped and the
    /// request sent once more on a fresh connection: the relay never saw
    /// it, or dropped it with the connection.
    ///
    /// Dialing has its own bound; the answer's head and body must then come
    /// within [`answer_deadline`] of the request leaving (the relay's budget
    /// starts when it arrives). Returns that deadline with the answer.
    async fn send(
        &self,
        build_request: impl Fn() -> Result<http::Request<Empty<Bytes>>, CreateStreamError>,
        options: &StreamOptions,
    ) -> Result<
        (
            http::Response<hyper::body::Incoming>,
            RelayConnection,
            Instant,
        ),
        CreateStreamError,
    > {
        let timed_out = |_| CreateStreamError::Timeout(answer_deadline(options));
        if let Some(mut pooled) = self.pool.take().await {
            let answer_by = Instant::now() + answer_deadline(options);
            let sent =
                tokio::time::timeout_at(answer_by, pooled.sender.send_request(build_request()?))
                    .await
                    .map_err(timed_out)?;
            match sent {
                Ok(response) => return Ok((response, pooled, answer_by)),
                Err(error) => tracing::debug!(
                    %error,
                    "a pooled connection to the relay failed before any answer; sending again on a fresh one"
                ),
            }
        }
        let mut fresh = self.open().await?;
        let answer_by = Instant::now() + answer_deadline(options);
        let response =
            tokio::time::timeout_at(answer_by, fresh.sender.send_request(build_request()?))
                .await
                .map_err(timed_out)?
                .map_err(|e| CreateStreamError::Http(e.to_string()))?;
        Ok((response, fresh, answer_by))
    }

    /// Dials the relay (within the dialer's connect timeout) and starts an
    /// HTTP/1.1 connection on it.
    async fn open(&self) -> Result<RelayConnection, CreateStreamError> {
        let stream = self
            .dialer
            .connect(
                self.connection.host(),
                self.connection.port(),
                true,
                transport::DEFAULT_CONNECT_TIMEOUT,
            )
            .await?;
        RelayConnection::start(stream)
            .await
            .map_err(|e| CreateStreamError::Http(e.to_string()))
    }
}

/// `/twins/{deviceId}/streams/{streamName}?api-version=…`, both names
/// percent-encoded: ids may hold `#`, `?`, `%` and `+` (IoT Hub's set), and
/// the relay reads the path as IoT Hub does (percent-decoded, `+` a space).
fn creation_path(device_id: &str, stream_name: &str) -> String {
    format!(
        "/twins/{}/streams/{}?api-version={}",
        encode_path_segment(device_id),
        encode_path_segment(stream_name),
        headers::API_VERSION
    )
}

fn body_error_code(body: &[u8]) -> Option<i64> {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()?
        .get("errorCode")?
        .as_i64()
}

fn error_message(body: &[u8]) -> String {
    match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(value) => match value.get("message").and_then(|m| m.as_str()) {
            Some(message) => message.to_string(),
            None => value.to_string(),
        },
        Err(_) => String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(connect: Duration, response: Duration) -> StreamOptions {
        StreamOptions {
            connect_timeout: connect,
            response_timeout: response,
            ..StreamOptions::default()
        }
    }

    /// A pooled connection over an in-memory pipe (nothing answers on it;
    /// the pool only needs it open). The far end is returned to keep it so.
    async fn idle_connection() -> (RelayConnection, tokio::io::DuplexStream) {
        let (near, far) = tokio::io::duplex(1024);
        let connection = RelayConnection::start(near)
            .await
            .expect("HTTP/1.1 starts on a pipe");
        (connection, far)
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_is_reused_within_the_idle_timeout_and_closed_after_it() {
        let pool = ConnectionPool::default();
        let (connection, _far) = idle_connection().await;
        pool.put(connection);
        tokio::time::advance(IDLE_TIMEOUT - Duration::from_millis(10)).await;
        let connection = pool
            .take()
            .await
            .expect("a connection idle for less than the timeout is reused");
        pool.put(connection);
        assert_eq!(pool.idle_count(), 1);
        tokio::time::advance(IDLE_TIMEOUT).await;
        assert!(
            pool.take().await.is_none(),
            "a connection idle past the timeout is not reused"
        );
        assert_eq!(pool.idle_count(), 0, "and it is closed");
    }

    #[tokio::test]
    async fn the_pool_keeps_a_bounded_number_of_live_connections() {
        let pool = ConnectionPool::default();
        let mut far_ends = Vec::new();
        for _ in 0..MAX_IDLE_CONNECTIONS + 3 {
            let (connection, far) = idle_connection().await;
            pool.put(connection);
            far_ends.push(far);
        }
        assert_eq!(pool.idle_count(), MAX_IDLE_CONNECTIONS);
        // A connection whose peer went away is never handed out.
        far_ends.clear();
        assert!(pool.take().await.is_none());
    }

    #[test]
    fn the_budget_is_the_connect_wait_then_the_answer_wait() {
        let budget = creation_budget(Duration::from_secs(10), Duration::from_secs(20));
        assert_eq!(budget, Duration::from_secs(30));
        assert_eq!(
            creation_budget(Duration::MAX, Duration::from_secs(1)),
            Duration::MAX,
            "no overflow"
        );
    }

    #[test]
    fn the_client_waits_for_the_budget_of_what_it_sent_plus_a_margin() {
        let defaults = StreamOptions::default();
        assert_eq!(
            answer_deadline(&defaults),
            Duration::from_secs(60 + 60) + ANSWER_MARGIN
        );
        // Sub-second timeouts go out as 1 s, and the client waits for that.
        let short = options(Duration::from_millis(200), Duration::ZERO);
        assert_eq!(
            answer_deadline(&short),
            Duration::from_secs(2) + ANSWER_MARGIN
        );
        // Fractions are cut as the header cuts them, never waited for twice.
        let fractional = options(Duration::from_millis(2900), Duration::from_millis(1500));
        assert_eq!(
            answer_deadline(&fractional),
            Duration::from_secs(3) + ANSWER_MARGIN
        );
    }

    #[test]
    fn the_client_never_gives_up_before_the_relay_answers() {
        for connect in [1, 5, 60, 600] {
            for response in [1, 5, 60, 600] {
                let connect = Duration::from_secs(connect);
                let response = Duration::from_secs(response);
                let relay_answers_within = creation_budget(connect, response);
                assert!(
                    answer_deadline(&options(connect, response))
                        >= relay_answers_within + ANSWER_MARGIN
                );
            }
        }
    }

    #[test]
    fn creation_path_encodes_the_device_id_and_the_stream_name() {
        assert_eq!(
            creation_path("a#b?c=d@e", "Test Stream%1"),
            format!(
                "/twins/a%23b%3Fc%3Dd%40e/streams/Test%20Stream%251?api-version={}",
                headers::API_VERSION
            )
        );
        assert_eq!(
            creation_path("My+Device", "TestStream"),
            format!(
                "/twins/My%2BDevice/streams/TestStream?api-version={}",
                headers::API_VERSION
            )
        );
        let path = creation_path("d", "a/b?c#d");
        assert!(
            path.starts_with("/twins/d/streams/a%2Fb%3Fc%23d?"),
            "a stream name cannot add path segments or a query: {path}"
        );
    }
}
