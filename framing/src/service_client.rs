//! The service side of stream creation: the IoT Hub REST call
//! `POST /twins/{deviceId}/streams/{streamName}`.
//!
//! One call opens one HTTP/1.1 connection: stream creation is rare next to the
//! bytes a stream moves, and a fresh connection per call keeps no idle state
//! that could go stale across relay restarts.

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;

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

/// A client for one service connection string.
#[derive(Clone)]
pub struct ServiceClient {
    connection: ConnectionString,
    dialer: Dialer,
}

impl ServiceClient {
    /// `dialer` is a [`Dialer`] (TLS trust and proxy settings) or a bare
    /// TLS configuration (direct).
    pub fn new(connection: ConnectionString, dialer: impl Into<Dialer>) -> Self {
        Self {
            connection,
            dialer: dialer.into(),
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
        let stream = self
            .dialer
            .connect(
                self.connection.host(),
                self.connection.port(),
                true,
                transport::DEFAULT_CONNECT_TIMEOUT,
            )
            .await?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| CreateStreamError::Http(e.to_string()))?;
        // The connection task ends with the exchange: dropping `sender` closes it.
        let connection_task = tokio::spawn(connection);
        let token = sas::sign(
            &self.connection.host_name,
            self.connection.key(),
            SystemTime::now() + TOKEN_LIFETIME,
            self.connection.shared_access_key_name.as_deref(),
        );
        let path = creation_path(device_id, stream_name);
        let mut request = http::Request::post(path)
            .header(http::header::HOST, &self.connection.host_name)
            .header(http::header::AUTHORIZATION, token)
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
        let request = request.body(Empty::<Bytes>::new()).map_err(|e| {
            CreateStreamError::Http(format!(
                "cannot build the request (bad device id or stream name?): {e}"
            ))
        })?;
        // The relay's budget starts when the request reaches it; ours when
        // it leaves, and covers the answer's head and body alike.
        let answer_by = tokio::time::Instant::now() + answer_deadline(options);
        let timed_out = |_| CreateStreamError::Timeout(answer_deadline(options));
        let response = tokio::time::timeout_at(answer_by, sender.send_request(request))
            .await
            .map_err(timed_out)?
            .map_err(|e| CreateStreamError::Http(e.to_string()))?;
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
        .map_err(timed_out)?
        .map(|collected| collected.to_bytes())
        .unwrap_or_default();
        drop(sender);
        connection_task.abort();
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
