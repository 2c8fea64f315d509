//! The MQTT topics of the device-streams control channel, in IoT Hub's exact
//! forms (PROTOCOL.md, "Device side").
//!
//! These strings are parsed by IoT Hub's own device SDKs, which are strict in
//! odd ways: the C# SDK wants exactly five `/`-separated levels, the C SDK
//! splits `$auth` on `=` and never decodes it. Building and parsing both live
//! here so the relay and our device client cannot drift apart.

use percent_encoding::{percent_decode_str, utf8_percent_encode};

use crate::sas::COMPONENT;

/// What a device subscribes to for stream requests.
pub const STREAM_REQUESTS_FILTER: &str = "$iothub/streams/POST/#";
/// What a device subscribes to for answers (IoT Hub SDKs subscribe to it).
pub const STREAM_RESPONSES_FILTER: &str = "$iothub/streams/res/#";
const REQUEST_PREFIX: &str = "$iothub/streams/POST/";
const RESPONSE_PREFIX: &str = "$iothub/streams/res/";

/// Longest stream name accepted.
pub const MAX_STREAM_NAME_LENGTH: usize = 128;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TopicError {
    #[error("topic is not a device-streams topic")]
    NotStreams,
    #[error("stream topic is malformed: {0}")]
    Malformed(&'static str),
}

/// Checks a stream name: it becomes one MQTT topic level, so it must not
/// hold a level separator, a wildcard or the query mark.
pub fn validate_stream_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("stream name is empty");
    }
    if name.len() > MAX_STREAM_NAME_LENGTH {
        return Err("stream name is longer than 128 bytes");
    }
    if name
        .chars()
        .any(|c| matches!(c, '/' | '+' | '#' | '?' | '\0') || c.is_control() || c.is_whitespace())
    {
        return Err("stream name holds '/', '+', '#', '?', white space or a control character");
    }
    Ok(())
}

/// A stream request as the relay publishes it to a device.
#[derive(Clone, PartialEq, Eq)]
pub struct StreamRequest {
    pub stream_name: String,
    /// Request id, a short decimal string; the answer echoes it.
    pub request_id: String,
    /// The streaming endpoint URL (`wss://…/bridges/…`).
    pub url: String,
    /// The device-side stream token.
    pub authorization_token: String,
    /// devstreams: the `HOST:PORT` or `PORT` the service asked for, if any.
    pub target: Option<String>,
    /// devstreams: the service side can carry a TCP half-close.
    pub half_close: bool,
    /// devstreams: the service side asks for a resumable session, new or
    /// continued (`$resume=new` / `$resume=continue`).
    pub resume: Option<ResumeAsk>,
}

/// What a service asks for about resumable sessions (PROTOCOL.md,
/// "Resumable streams"). Which session, and the proof, travel inside the
/// stream; the topic only says whether the stream starts or continues one,
/// so the device knows whether to dial its target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResumeAsk {
    /// Start a new resumable session.
    New,
    /// Carry an existing session; the stream opens with its proof.
    Continue,
}

impl ResumeAsk {
    /// The value of the `$resume` key and of the creation request's header.
    pub fn as_str(self) -> &'static str {
        match self {
            ResumeAsk::New => "new",
            ResumeAsk::Continue => "continue",
        }
    }

    /// Reads a `$resume` key or header value; anything else is no ask.
    pub fn parse(value: &str) -> Option<ResumeAsk> {
        match value {
            "new" => Some(ResumeAsk::New),
            "continue" => Some(ResumeAsk::Continue),
            _ => None,
        }
    }
}

impl std::fmt::Debug for StreamRequest {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("StreamRequest")
            .field("stream_name", &self.stream_name)
            .field("request_id", &self.request_id)
            .field("url", &self.url)
            .field("target", &self.target)
            .field("half_close", &self.half_close)
            .field("resume", &self.resume)
            .finish_non_exhaustive()
    }
}

impl StreamRequest {
    pub fn to_topic(&self) -> String {
        let mut topic = format!(
            "{REQUEST_PREFIX}{}/?$rid={}&$url={}&$auth={}",
            self.stream_name,
            self.request_id,
            utf8_percent_encode(&self.url, COMPONENT),
            self.authorization_token
        );
        if let Some(target) = &self.target {
            topic.push_str("&$target=");
            topic.push_str(&utf8_percent_encode(target, COMPONENT).to_string());
        }
        if self.half_close {
            topic.push_str("&$halfclose=1");
        }
        if let Some(resume) = self.resume {
            topic.push_str("&$resume=");
            topic.push_str(resume.as_str());
        }
        topic
    }

    pub fn from_topic(topic: &str) -> Result<Self, TopicError> {
        let rest = topic
            .strip_prefix(REQUEST_PREFIX)
            .ok_or(TopicError::NotStreams)?;
        let (stream_name, query) = rest
            .split_once("/?")
            .ok_or(TopicError::Malformed("no '/?' after the stream name"))?;
        validate_stream_name(stream_name).map_err(TopicError::Malformed)?;
        let mut request = StreamRequest {
            stream_name: stream_name.to_string(),
            request_id: String::new(),
            url: String::new(),
            authorization_token: String::new(),
            target: None,
            half_close: false,
            resume: None,
        };
        for (name, value) in query_pairs(query) {
            match name {
                "$rid" => request.request_id = value.to_string(),
                "$url" => request.url = decode(value)?,
                "$auth" => request.authorization_token = value.to_string(),
                "$target" => request.target = Some(decode(value)?),
                "$halfclose" => request.half_close = value == "1",
                "$resume" => request.resume = ResumeAsk::parse(value),
                _ => {}
            }
        }
        if request.request_id.is_empty()
            || request.url.is_empty()
            || request.authorization_token.is_empty()
        {
            return Err(TopicError::Malformed(
                "a stream request needs $rid, $url and $auth",
            ));
        }
        Ok(request)
    }
}

/// A device's answer to a stream request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamResponse {
    pub request_id: String,
    /// 200 accepts, 400 rejects.
    pub status: u16,
    /// devstreams: the device will carry a TCP half-close.
    pub half_close: bool,
    /// devstreams: the device agrees to a resumable session.
    pub resume: bool,
}

impl StreamResponse {
    pub fn to_topic(&self) -> String {
        let mut topic = format!("{RESPONSE_PREFIX}{}/?$rid={}", self.status, self.request_id);
        if self.half_close {
            topic.push_str("&$halfclose=1");
        }
        if self.resume {
            topic.push_str("&$resume=1");
        }
        topic
    }

    pub fn from_topic(topic: &str) -> Result<Self, TopicError> {
        let rest = topic
            .strip_prefix(RESPONSE_PREFIX)
            .ok_or(TopicError::NotStreams)?;
        let (status, query) = rest
            .split_once("/?")
            .ok_or(TopicError::Malformed("no '/?' after the status"))?;
        let status = status
            .parse()
            .map_err(|_| TopicError::Malformed("status is not a number"))?;
        let mut request_id = None;
        let mut half_close = false;
        let mut resume = false;
        for (name, value) in query_pairs(query) {
            match name {
                "$rid" => request_id = Some(value.to_string()),
                "$halfclose" => half_close = value == "1",
                "$resume" => resume = value == "1",
                _ => {}
            }
        }
        let request_id = request_id
            .filter(|r| !r.is_empty())
            .ok_or(TopicError::Malformed("no $rid"))?;
        Ok(StreamResponse {
            request_id,
            status,
            half_close,
            resume,
        })
    }
}

fn query_pairs(query: &str) -> impl Iterator<Item = (&str, &str)> {
    query.split('&').filter_map(|pair| pair.split_once('='))
}

fn decode(value: &str) -> Result<String, TopicError> {
    percent_decode_str(value)
        .decode_utf8()
        .map(|text| text.into_owned())
        .map_err(|_| TopicError::Malformed("a value is not UTF-8 after percent-decoding"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> StreamRequest {
        StreamRequest {
            stream_name: "TestStream".into(),
            request_id: "17".into(),
            url: "wss://relay.example.com:8443/bridges/hub/MyDevice/0123abcd".into(),
            authorization_token: "eyJhbGciOiJIUzI1NiJ9.eyJzIjoxfQ.c2lnbmF0dXJl_-".into(),
            target: Some("localhost:22".into()),
            half_close: true,
            resume: Some(ResumeAsk::Continue),
        }
    }

    #[test]
    fn request_topic_has_exactly_five_levels() {
        let topic = request().to_topic();
        assert_eq!(topic.split('/').count(), 5, "{topic}");
        assert!(
            topic.starts_with("$iothub/streams/POST/TestStream/?$rid=17&$url=wss%3A%2F%2Frelay")
        );
    }

    #[test]
    fn request_topic_round_trips() {
        assert_eq!(
            StreamRequest::from_topic(&request().to_topic()).unwrap(),
            request()
        );
    }

    #[test]
    fn request_auth_value_is_taken_verbatim_like_the_c_sdk() {
        let topic = request().to_topic();
        let auth = topic
            .split("$auth=")
            .nth(1)
            .unwrap()
            .split('&')
            .next()
            .unwrap();
        assert_eq!(auth, request().authorization_token);
    }

    #[test]
    fn a_request_without_resume_keys_asks_for_no_resume() {
        let plain = StreamRequest {
            resume: None,
            ..request()
        };
        assert!(!plain.to_topic().contains("$resume"));
        assert_eq!(StreamRequest::from_topic(&plain.to_topic()).unwrap(), plain);
        let odd = request()
            .to_topic()
            .replace("$resume=continue", "$resume=maybe");
        assert_eq!(StreamRequest::from_topic(&odd).unwrap().resume, None);
    }

    #[test]
    fn request_without_required_keys_is_refused() {
        assert!(StreamRequest::from_topic("$iothub/streams/POST/x/?$rid=1").is_err());
        assert!(StreamRequest::from_topic("$iothub/streams/POST/x").is_err());
        assert_eq!(
            StreamRequest::from_topic("$iothub/twin/x"),
            Err(TopicError::NotStreams)
        );
    }

    #[test]
    fn response_topics_round_trip() {
        let accepted = StreamResponse {
            request_id: "5".into(),
            status: 200,
            half_close: false,
            resume: false,
        };
        assert_eq!(accepted.to_topic(), "$iothub/streams/res/200/?$rid=5");
        let resumable = StreamResponse {
            resume: true,
            ..accepted.clone()
        };
        assert_eq!(
            StreamResponse::from_topic(&resumable.to_topic()).unwrap(),
            resumable
        );
        assert_eq!(
            StreamResponse::from_topic(&accepted.to_topic()).unwrap(),
            accepted
        );
        let rejected =
            StreamResponse::from_topic("$iothub/streams/res/400/?$rid=9&$other=x").unwrap();
        assert_eq!(rejected.status, 400);
        assert!(StreamResponse::from_topic("$iothub/streams/res/abc/?$rid=9").is_err());
        assert!(StreamResponse::from_topic("$iothub/streams/res/200/?x=1").is_err());
    }

    #[test]
    fn stream_names_that_break_topics_are_refused() {
        for name in ["", "a/b", "a+b", "a#", "a?b", "a b"] {
            assert!(validate_stream_name(name).is_err(), "{name:?}");
        }
        validate_stream_name("TestStream").unwrap();
    }
}
