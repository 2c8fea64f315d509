//! The web console on the admin listener (`--admin-listen`, under
//! `/console`): devices, live streams and recent activity at a glance, and
//! the few actions an operator takes on them, for people who would rather
//! look than compose CLI commands.
//!
//! Pages are rendered here as HTML; a small script ([`assets`]) keeps them
//! current from a server-sent-event stream. Everything is embedded in the
//! binary, so the console works on a network without internet. Sign-in is
//! with a policy name and key that has registry-read (registry-write to
//! change anything); see [`sessions`] for the cookie, the expiry and the
//! CSRF token every change carries.
//!
//! The console reads what the admin API reads ([`crate::admin_api`]) and
//! changes the registry the way `relay device …` does ([`actions`]), so the
//! running relay applies a change as it applies the CLI's.

pub mod actions;
pub mod assets;
pub mod live;
pub mod pages;
pub mod sessions;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use percent_encoding::percent_decode_str;
use tokio::time::Instant;

use crate::admin::AdminBody;
use crate::metrics::Metrics;
use crate::registry::PolicyRecord;
use crate::rights::Right;
use crate::state::RelayState;
use actions::DeviceChange;
use sessions::SignedIn;

/// Largest form the console accepts, bytes (a device id or a key).
const MAX_FORM_SIZE: usize = 16 * 1024;
/// A form's body must arrive within this.
const FORM_DEADLINE: Duration = Duration::from_secs(10);

/// Where the console's pages are.
pub const ROOT: &str = "/console";

/// Answers a request under `/console` (and `/`, sent to the console).
/// `secure` says whether the request came over TLS (the cookie's `Secure`).
pub async fn handle(
    state: Arc<RelayState>,
    request: Request<Incoming>,
    peer: SocketAddr,
    secure: bool,
) -> Response<AdminBody> {
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let query = request.uri().query().unwrap_or("").to_string();
    let segments: Vec<String> = path
        .trim_start_matches('/')
        .trim_end_matches('/')
        .split('/')
        .map(|segment| percent_decode_str(segment).decode_utf8_lossy().into_owned())
        .collect();
    let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
    let headers = request.headers().clone();

    // What needs no session: the way in, and the static assets.
    match (&method, segments.as_slice()) {
        (&Method::GET, [""]) => return redirect(&format!("{ROOT}/")),
        (&Method::GET, ["console", "assets", name]) => return assets::serve(name),
        (&Method::GET, ["console", "sign-in"]) => {
            if signed_in(&state, &headers).is_some() {
                return redirect(&format!("{ROOT}/"));
            }
            return html(StatusCode::OK, pages::sign_in(None));
        }
        (&Method::POST, ["console", "sign-in"]) => {
            if from_another_site(&headers) {
                tracing::warn!(%peer, "console sign-in refused: the form came from another site");
                return html(
                    StatusCode::FORBIDDEN,
                    pages::sign_in(Some(
                        "A sign-in from another site's page was refused. Sign in on this page.",
                    )),
                );
            }
            let form = match read_form(request).await {
                Ok(form) => form,
                Err(response) => return response,
            };
            return sign_in(&state, &form, peer, secure).await;
        }
        _ => {}
    }

    let Some((user, policy)) = signed_in(&state, &headers) else {
        let data = matches!(segments.as_slice(), ["console", "live" | "data", ..]);
        if data || method != Method::GET {
            return plain(
                StatusCode::UNAUTHORIZED,
                "sign in first: the console's data needs a session (POST /console/sign-in)\n",
            );
        }
        return redirect(&format!("{ROOT}/sign-in"));
    };

    if method == Method::GET {
        return match segments.as_slice() {
            ["console"] => {
                let nodes = cluster_nodes(&state).await;
                html(
                    StatusCode::OK,
                    pages::overview(&state, &user, nodes.as_deref()),
                )
            }
            ["console", "devices"] => {
                let search = query_value(&query, "q").unwrap_or_default();
                html(StatusCode::OK, pages::devices(&state, &user, &search, None))
            }
            ["console", "devices", device_id, "remove"] => {
                html(StatusCode::OK, pages::confirm_remove(&user, device_id))
            }
            ["console", "streams"] => html(StatusCode::OK, pages::streams(&state, &user, None)),
            ["console", "activity"] => {
                let filter = pages::ActivityFilter {
                    device: query_value(&query, "device").unwrap_or_default(),
                    kind: query_value(&query, "kind").unwrap_or_default(),
                    since_minutes: query_value(&query, "since").and_then(|text| text.parse().ok()),
                };
                html(StatusCode::OK, pages::activity(&state, &user, &filter))
            }
            ["console", "live"] => {
                let with_devices = query_value(&query, "devices").is_some();
                let session_id = sessions::session_id(&headers).unwrap_or_default();
                live::event_stream(state, session_id, with_devices)
            }
            ["console", "data"] => {
                let mut text = live::snapshot(&state, true).to_string();
                text.push('\n');
                response(StatusCode::OK, "application/json; charset=utf-8", text)
            }
            _ => html(StatusCode::NOT_FOUND, pages::not_found(&user, &path)),
        };
    }
    if method != Method::POST {
        return plain(
            StatusCode::METHOD_NOT_ALLOWED,
            "the console takes GET for pages and POST for changes\n",
        );
    }

    // Every change: a form with the session's CSRF token.
    let form = match read_form(request).await {
        Ok(form) => form,
        Err(response) => return response,
    };
    let token = form_value(&form, "csrf").unwrap_or_default();
    if !sessions::tokens_match(&user.csrf_token, &token) {
        tracing::warn!(%peer, policy = user.policy, path, "console change refused: missing or wrong CSRF token");
        return html(StatusCode::FORBIDDEN, pages::message(
            &user,
            "Refused",
            "The form's security token is missing or out of date: reload the page and try again.",
        ));
    }
    if let ["console", "sign-out"] = segments.as_slice() {
        if let Some(session_id) = sessions::session_id(&headers) {
            state.console.end(&session_id);
        }
        tracing::info!(%peer, policy = user.policy, "console sign-out");
        let mut answer = redirect(&format!("{ROOT}/sign-in"));
        set_cookie(&mut answer, &sessions::cleared_cookie(secure));
        return answer;
    }
    if !policy.rights.has(Right::RegistryWrite) {
        return html(
            StatusCode::FORBIDDEN,
            pages::message(
                &user,
                "Not allowed",
                &format!(
                    "Policy {} lacks the registry-write right: sign in with a policy that has it to make changes.",
                    user.policy
                ),
            ),
        );
    }
    match segments.as_slice() {
        ["console", "devices"] => {
            let device_id = form_value(&form, "device_id").unwrap_or_default();
            device_change(&state, &user, device_id.trim(), DeviceChange::Add).await
        }
        ["console", "devices", device_id, action] => {
            let change = match *action {
                "enable" => DeviceChange::Enable,
                "disable" => DeviceChange::Disable,
                "rotate-key" => DeviceChange::RotateKey,
                "remove" => DeviceChange::Remove,
                _ => return html(StatusCode::NOT_FOUND, pages::not_found(&user, &path)),
            };
            device_change(&state, &user, device_id, change).await
        }
        ["console", "streams", stream_id, "end"] => {
            let ended = state.live_streams.close(stream_id);
            if ended {
                tracing::info!(
                    stream_id,
                    policy = user.policy,
                    "stream closed by an operator (web console)"
                );
            }
            let notice = if ended {
                pages::Notice::Done(format!("Session {stream_id} ended."))
            } else {
                pages::Notice::Failed(format!(
                    "No live session {stream_id}: it had ended already."
                ))
            };
            html(StatusCode::OK, pages::streams(&state, &user, Some(notice)))
        }
        _ => html(StatusCode::NOT_FOUND, pages::not_found(&user, &path)),
    }
}

/// The session of the request and its policy's current record, when valid.
fn signed_in(state: &RelayState, headers: &HeaderMap) -> Option<(SignedIn, PolicyRecord)> {
    let session_id = sessions::session_id(headers)?;
    state.console.resume(&session_id, Instant::now(), |policy| {
        state
            .registry
            .policy(policy)
            .ok()
            .flatten()
            .filter(|record| record.rights.has(Right::RegistryRead))
    })
}

/// Whether a browser sent this form from another site's page: a login
/// CSRF, where a page elsewhere signs the visitor in as the attacker's
/// policy so that what they then do lands in the attacker's session. Later
/// changes carry the session's CSRF token; the sign-in has none yet.
///
/// Browsers say where a request comes from in `Sec-Fetch-Site`; older ones
/// only send `Origin`, which is compared with `Host`. A request with neither
/// (curl, a script) is no browser's cross-site form.
fn from_another_site(headers: &HeaderMap) -> bool {
    if let Some(site) = headers.get("sec-fetch-site") {
        return site.as_bytes().eq_ignore_ascii_case(b"cross-site");
    }
    let Some(origin) = headers.get(header::ORIGIN) else {
        return false;
    };
    let origin_authority = origin
        .to_str()
        .ok()
        .and_then(|origin| {
            origin
                .strip_prefix("http://")
                .or_else(|| origin.strip_prefix("https://"))
        })
        .map(|authority| authority.trim_end_matches('/'));
    let host = headers
        .get(header::HOST)
        .and_then(|host| host.to_str().ok());
    match (origin_authority, host) {
        (Some(origin), Some(host)) => !origin.eq_ignore_ascii_case(host),
        // `Origin: null` (a sandboxed frame, a redirect) or no Host to match.
        _ => true,
    }
}

/// `POST /console/sign-in`: a policy name and key (or a whole connection
/// string in the key field). A failure counts toward the source's slowdown
/// as a refused SAS token does.
async fn sign_in(
    state: &RelayState,
    form: &[(String, String)],
    peer: SocketAddr,
    secure: bool,
) -> Response<AdminBody> {
    let delay = state.sources.failure_delay(peer.ip());
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let mut policy_name = form_value(form, "policy")
        .unwrap_or_default()
        .trim()
        .to_string();
    let mut key_text = form_value(form, "key")
        .unwrap_or_default()
        .trim()
        .to_string();
    if key_text.contains("SharedAccessKey=") {
        for part in key_text.clone().split(';') {
            if let Some(name) = part.strip_prefix("SharedAccessKeyName=") {
                if policy_name.is_empty() {
                    policy_name = name.to_string();
                }
            } else if let Some(key) = part.strip_prefix("SharedAccessKey=") {
                key_text = key.to_string();
            }
        }
    }
    let key = base64::Engine::decode(&base64::engine::general_purpose::STANDARD, &key_text)
        .unwrap_or_default();
    let lookup = || {
        state
            .registry
            .policy(&policy_name)
            .ok()
            .flatten()
            .filter(|policy| !key.is_empty() && sessions::policy_has_key(policy, &key))
    };
    let mut accepted = lookup();
    if accepted.is_none() {
        // A policy added or re-keyed a moment ago: look once more, as the
        // relay does for a device before refusing it.
        state.registry.refresh().await;
        accepted = lookup();
    }
    let Some(policy) = accepted else {
        Metrics::add(&state.metrics.authentication_failures, 1);
        state.sources.record_failure(peer.ip());
        tracing::warn!(%peer, policy = policy_name, "console sign-in refused: unknown policy or wrong key");
        return html(
            StatusCode::UNAUTHORIZED,
            pages::sign_in(Some("That policy name and key were refused. Use a policy with the registry-read right (`relay policy show registryReadWrite` prints one).")),
        );
    };
    if !policy.rights.has(Right::RegistryRead) {
        tracing::warn!(%peer, policy = policy.name, "console sign-in refused: the policy lacks registry-read");
        return html(
            StatusCode::FORBIDDEN,
            pages::sign_in(Some(&format!(
                "Policy {} lacks the registry-read right the console needs: sign in with one that has it (`relay policy list` shows the rights).",
                policy.name
            ))),
        );
    }
    let session_id = state.console.start(&policy.name, key, Instant::now());
    tracing::info!(%peer, policy = policy.name, "console sign-in");
    let mut answer = redirect(&format!("{ROOT}/"));
    set_cookie(&mut answer, &sessions::session_cookie(&session_id, secure));
    answer
}

/// Makes a registry change and answers with the devices page saying how it went.
async fn device_change(
    state: &RelayState,
    user: &SignedIn,
    device_id: &str,
    change: DeviceChange,
) -> Response<AdminBody> {
    match actions::change_device(state, device_id, change).await {
        Ok(connection_string) => {
            tracing::info!(
                device_id,
                change = change.name(),
                policy = user.policy,
                "registry changed from the web console"
            );
            let notice = match connection_string {
                Some(connection_string) => pages::Notice::ConnectionString {
                    text: format!(
                        "{} {device_id}: its connection string is shown this once.",
                        change.done()
                    ),
                    connection_string,
                },
                None => pages::Notice::Done(format!("{} {device_id}.", change.done())),
            };
            html(
                StatusCode::OK,
                pages::devices(state, user, "", Some(notice)),
            )
        }
        Err(error) => html(
            StatusCode::BAD_REQUEST,
            pages::devices(state, user, "", Some(pages::Notice::Failed(error))),
        ),
    }
}

/// Reads a form body, bounded in size and time.
async fn read_form(
    request: Request<Incoming>,
) -> Result<Vec<(String, String)>, Response<AdminBody>> {
    let body = Limited::new(request.into_body(), MAX_FORM_SIZE);
    let bytes = match tokio::time::timeout(FORM_DEADLINE, body.collect()).await {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(_)) => {
            return Err(plain(
                StatusCode::PAYLOAD_TOO_LARGE,
                "the form is too large or was cut off\n",
            ))
        }
        Err(_) => {
            return Err(plain(
                StatusCode::REQUEST_TIMEOUT,
                "the form did not arrive in time\n",
            ))
        }
    };
    Ok(form_urlencoded::parse(&bytes).into_owned().collect())
}

fn form_value(form: &[(String, String)], name: &str) -> Option<String> {
    form.iter()
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.clone())
}

fn query_value(query: &str, name: &str) -> Option<String> {
    form_urlencoded::parse(query.as_bytes())
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.into_owned())
}

/// A response with the headers every console answer carries: no caching,
/// no framing, no sniffing, scripts and styles from the console only.
pub fn response(
    status: StatusCode,
    content_type: &str,
    body: impl Into<Bytes>,
) -> Response<AdminBody> {
    let mut answer = Response::new(
        Full::new(body.into())
            .map_err(|never: Infallible| match never {})
            .boxed_unsync(),
    );
    *answer.status_mut() = status;
    let headers = answer.headers_mut();
    let mut put = |name: header::HeaderName, value: &str| {
        if let Ok(value) = http::HeaderValue::from_str(value) {
            headers.insert(name, value);
        }
    };
    put(header::CONTENT_TYPE, content_type);
    put(header::CACHE_CONTROL, "no-store");
    put(header::X_CONTENT_TYPE_OPTIONS, "nosniff");
    put(header::X_FRAME_OPTIONS, "DENY");
    put(header::REFERRER_POLICY, "no-referrer");
    put(
        header::CONTENT_SECURITY_POLICY,
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
         connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    );
    answer
}

fn html(status: StatusCode, page: String) -> Response<AdminBody> {
    response(status, "text/html; charset=utf-8", page)
}

fn plain(status: StatusCode, text: &str) -> Response<AdminBody> {
    response(status, "text/plain; charset=utf-8", text.to_string())
}

/// 303 See Other: after a POST the browser GETs the new page.
fn redirect(location: &str) -> Response<AdminBody> {
    let mut answer = plain(StatusCode::SEE_OTHER, "");
    if let Ok(value) = http::HeaderValue::from_str(location) {
        answer.headers_mut().insert(header::LOCATION, value);
    }
    answer
}

fn set_cookie(answer: &mut Response<AdminBody>, cookie: &str) {
    if let Ok(value) = http::HeaderValue::from_str(cookie) {
        answer.headers_mut().append(header::SET_COOKIE, value);
    }
}

/// The cluster's nodes as `relay cluster status` prints them, for the
/// overview; `None` for a single relay. NATS gets a few seconds at most
/// (each read inside has its own deadline), and a failure is shown as such.
async fn cluster_nodes(state: &RelayState) -> Option<String> {
    let cluster = state.cluster.as_ref()?;
    Some(
        match crate::cluster::heartbeat::read_all(cluster.jetstream()).await {
            Ok(heartbeats) => {
                crate::cluster::heartbeat::render_status(&heartbeats, std::time::SystemTime::now())
            }
            Err(error) => format!("cannot read the cluster's nodes: {error:#}"),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.insert(*name, http::HeaderValue::from_static(value));
        }
        headers
    }

    #[test]
    fn a_sign_in_from_another_site_is_recognised() {
        let host = ("host", "127.0.0.1:9090");
        let cases = [
            (headers(&[host]), false),
            (headers(&[host, ("sec-fetch-site", "same-origin")]), false),
            (headers(&[host, ("sec-fetch-site", "none")]), false),
            (headers(&[host, ("sec-fetch-site", "cross-site")]), true),
            // The browser's own word wins over a proxy-rewritten Host.
            (
                headers(&[
                    host,
                    ("sec-fetch-site", "same-origin"),
                    ("origin", "https://console.example"),
                ]),
                false,
            ),
            (headers(&[host, ("origin", "http://127.0.0.1:9090")]), false),
            (headers(&[host, ("origin", "http://127.0.0.1:9091")]), true),
            (
                headers(&[host, ("origin", "https://attacker.example")]),
                true,
            ),
            (headers(&[host, ("origin", "null")]), true),
            (headers(&[("origin", "http://127.0.0.1:9090")]), true),
        ];
        for (index, (headers, expected)) in cases.iter().enumerate() {
            assert_eq!(
                from_another_site(headers),
                *expected,
                "case {index}: {headers:?}"
            );
        }
    }
}
