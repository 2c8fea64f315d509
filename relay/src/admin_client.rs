//! The CLI's side of the admin API: `relay device list`, `relay stream
//! list|close` on the relay's host ask the running relay for live state.
//!
//! The address comes from `--admin-url`, else from the file `relay serve`
//! writes into the data dir ([`crate::data_dir::ADMIN_ADDRESS_FILE`]). An
//! `https://` listener (`--admin-tls`) must show a certificate the system
//! trusts or the data dir's self-signed one, for the host in the URL. The
//! CLI can read the registry, so it signs a short-lived SAS token with the
//! `registryReadWrite` policy's key: no credentials to pass around.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use base64::Engine;
use http_body_util::{BodyExt, Full};
use rustls_pki_types::ServerName;
use serde_json::Value;

use crate::registry::PolicyRecord;

/// How long the CLI waits for the relay (connect, request, answer).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest answer read (a fleet's device list).
const MAX_ANSWER_SIZE: usize = 64 * 1024 * 1024;
/// Lifetime of the CLI's tokens.
const TOKEN_LIFETIME: Duration = Duration::from_secs(300);

/// A running relay's admin API, as the CLI reaches it.
pub struct AdminClient {
    /// `host:port` of the admin listener.
    authority: String,
    authorization: String,
    /// With an `https://` URL: whom to trust, and the name to check.
    tls: Option<(Arc<rustls::ClientConfig>, ServerName<'static>)>,
}

impl AdminClient {
    /// `url` is `http://HOST:PORT`, `https://HOST:PORT` or just `HOST:PORT`
    /// (plain HTTP); `policy` signs. Over HTTPS the relay's certificate
    /// must chain to the system's roots or to `extra_ca` (the data dir's
    /// self-signed certificate).
    pub fn new(url: &str, policy: &PolicyRecord, extra_ca: Option<&Path>) -> anyhow::Result<Self> {
        let (https, authority) = match url.split_once("://") {
            Some(("http", rest)) => (false, rest),
            Some(("https", rest)) => (true, rest),
            Some(_) => {
                anyhow::bail!("--admin-url {url:?} must be http://HOST:PORT or https://HOST:PORT")
            }
            None => (false, url),
        };
        let authority = authority.trim_end_matches('/').to_string();
        let (host, _) = framing::connection_string::split_host_port(&authority);
        if authority.is_empty() || authority.contains('/') || host.is_empty() {
            anyhow::bail!("--admin-url {url:?} must be http://HOST:PORT or https://HOST:PORT");
        }
        let tls = if https {
            let config = framing::tls::client_config(extra_ca)
                .context("cannot set up TLS for the admin API")?;
            let name = host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string();
            let name = ServerName::try_from(name)
                .with_context(|| format!("--admin-url {url:?}: {host:?} is not a host name"))?;
            Some((config, name))
        } else {
            None
        };
        let key = base64::engine::general_purpose::STANDARD
            .decode(&policy.primary_key)
            .with_context(|| {
                format!("policy {} has a malformed key in the registry", policy.name)
            })?;
        let authorization = framing::sas::sign(
            &authority,
            &key,
            SystemTime::now() + TOKEN_LIFETIME,
            Some(&policy.name),
        );
        Ok(Self {
            authority,
            authorization,
            tls,
        })
    }

    pub fn authority(&self) -> &str {
        &self.authority
    }

    /// Sends one request; the JSON answer, or an error with the relay's message.
    pub async fn request(&self, method: http::Method, path: &str) -> anyhow::Result<Value> {
        tokio::time::timeout(REQUEST_TIMEOUT, self.request_unbounded(method, path))
            .await
            .map_err(|_| {
                anyhow::anyhow!(
                    "the relay's admin API at {} did not answer within {} s",
                    self.authority,
                    REQUEST_TIMEOUT.as_secs()
                )
            })?
    }

    async fn request_unbounded(&self, method: http::Method, path: &str) -> anyhow::Result<Value> {
        let tcp = tokio::net::TcpStream::connect(&self.authority)
            .await
            .with_context(|| format!("cannot reach the relay's admin API at {}", self.authority))?;
        match &self.tls {
            None => self.exchange(tcp, method, path).await,
            Some((config, name)) => {
                let stream = tokio_rustls::TlsConnector::from(config.clone())
                    .connect(name.clone(), tcp)
                    .await
                    .with_context(|| {
                        format!(
                            "TLS to the relay's admin API at {} failed: is it started with \
                             --admin-tls, and is its certificate trusted (the data dir's, or \
                             the system's)?",
                            self.authority
                        )
                    })?;
                self.exchange(stream, method, path).await
            }
        }
    }

    /// One request and its answer on a connection already made.
    async fn exchange<S>(&self, io: S, method: http::Method, path: &str) -> anyhow::Result<Value>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io))
                .await
                .context("admin API handshake failed")?;
        let driver = tokio::spawn(connection);
        let request = http::Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, &self.authority)
            .header(http::header::AUTHORIZATION, &self.authorization)
            .body(Full::new(bytes::Bytes::new()))
            .context("cannot build the admin request")?;
        let response = sender
            .send_request(request)
            .await
            .context("the admin API request failed")?;
        let status = response.status();
        let body = http_body_util::Limited::new(response.into_body(), MAX_ANSWER_SIZE)
            .collect()
            .await
            .map_err(|error| anyhow::anyhow!("cannot read the admin API's answer: {error}"))?
            .to_bytes();
        driver.abort();
        let value: Value = serde_json::from_slice(&body)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).trim().to_string()));
        if !status.is_success() {
            let message = value
                .get("message")
                .and_then(Value::as_str)
                .map(str::to_string)
                .unwrap_or_else(|| value.to_string());
            anyhow::bail!("the relay answered {status}: {message}");
        }
        Ok(value)
    }
}

/// `relay device list` from the admin API's answer: one line per device.
pub fn render_devices(answer: &Value, now: SystemTime) -> String {
    let mut text = String::new();
    let empty = Vec::new();
    let devices = answer
        .get("devices")
        .and_then(Value::as_array)
        .unwrap_or(&empty);
    text.push_str("DEVICE\tSTATE\tSINCE\tADDRESS\tSTREAMS\tLAST SEEN\n");
    for device in devices {
        let field = |name: &str| device.get(name).cloned().unwrap_or(Value::Null);
        let online = field("online").as_bool().unwrap_or(false);
        let mut state = if online { "online" } else { "offline" }.to_string();
        if !field("enabled").as_bool().unwrap_or(true) {
            state.push_str(" (disabled)");
        }
        let ago = |value: Value| {
            value
                .as_u64()
                .map(|seconds| describe_ago(now, seconds))
                .unwrap_or_else(|| "-".to_string())
        };
        text.push_str(&format!(
            "{}\t{}\t{}\t{}\t{}\t{}\n",
            field("deviceId").as_str().unwrap_or("?"),
            state,
            ago(field("connectedSince")),
            field("address").as_str().unwrap_or("-"),
            field("liveStreams").as_u64().unwrap_or(0),
            ago(field("lastSeen")),
        ));
    }
    text
}

/// `relay stream list` from the admin API's answer.
pub fn render_streams(answer: &Value, now: SystemTime) -> String {
    let mut text = String::from(
        "STREAM\tDEVICE\tNAME\tSERVICE\tTARGET\tSTARTED\tDEVICE->SERVICE\tSERVICE->DEVICE\n",
    );
    let empty = Vec::new();
    for stream in answer
        .get("streams")
        .and_then(Value::as_array)
        .unwrap_or(&empty)
    {
        let field = |name: &str| stream.get(name).cloned().unwrap_or(Value::Null);
        let device = match field("moduleId").as_str() {
            Some(module) => format!("{}/{module}", field("deviceId").as_str().unwrap_or("?")),
            None => field("deviceId").as_str().unwrap_or("?").to_string(),
        };
        text.push_str(&format!(
            "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\n",
            field("streamId").as_str().unwrap_or("?"),
            device,
            field("streamName").as_str().unwrap_or("?"),
            field("serviceAddress").as_str().unwrap_or("-"),
            field("target").as_str().unwrap_or("-"),
            field("started")
                .as_u64()
                .map(|seconds| describe_ago(now, seconds))
                .unwrap_or_else(|| "-".into()),
            field("bytesDeviceToService").as_u64().unwrap_or(0),
            field("bytesServiceToDevice").as_u64().unwrap_or(0),
        ));
    }
    text
}

/// "42s ago", "3m ago", "5h ago", "2d ago".
fn describe_ago(now: SystemTime, unix_seconds: u64) -> String {
    let then = SystemTime::UNIX_EPOCH + Duration::from_secs(unix_seconds);
    let seconds = now.duration_since(then).map_or(0, |since| since.as_secs());
    match seconds {
        0..=119 => format!("{seconds}s ago"),
        120..=7199 => format!("{}m ago", seconds / 60),
        7200..=172_799 => format!("{}h ago", seconds / 3600),
        _ => format!("{}d ago", seconds / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_render_one_line_each_with_state_and_age() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let answer = serde_json::json!({"devices": [
            {"deviceId": "kiosk", "online": true, "enabled": true, "connectedSince": 999_990,
             "address": "10.0.0.5:4000", "liveStreams": 2, "lastSeen": 999_999},
            {"deviceId": "old", "online": false, "enabled": false, "connectedSince": null,
             "address": null, "liveStreams": 0, "lastSeen": null},
        ]});
        let text = render_devices(&answer, now);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[1], "kiosk\tonline\t10s ago\t10.0.0.5:4000\t2\t1s ago");
        assert_eq!(lines[2], "old\toffline (disabled)\t-\t-\t0\t-");
    }
}
