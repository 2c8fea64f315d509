//! The console's HTML, rendered on the server: one layout (navigation,
//! sign-out, the CSRF token for the script) and a function per page. Every
//! value from the registry, the network or the request is escaped with
//! [`escape`]; the pages work without the script, which only keeps their
//! numbers current ([`super::assets`]).

use std::fmt::Write;
use std::time::{Duration, SystemTime};

use serde_json::Value;

use super::sessions::SignedIn;
use super::ROOT;
use crate::live::unix_seconds;
use crate::state::RelayState;

/// Activity rows shown at most (the newest).
const MAX_ACTIVITY_ROWS: usize = 500;

/// What the last action did, shown at the top of the next page.
pub enum Notice {
    Done(String),
    Failed(String),
    /// A new key: shown once, with a copy button.
    ConnectionString {
        text: String,
        connection_string: String,
    },
}

/// The Activity page's filters (from its query string).
#[derive(Default)]
pub struct ActivityFilter {
    pub device: String,
    pub kind: String,
    pub since_minutes: Option<u64>,
}

/// The audit event kinds, for the Activity filter.
const EVENT_KINDS: &[&str] = &[
    "stream_requested",
    "stream_accepted",
    "stream_rejected",
    "stream_resumed",
    "stream_established",
    "stream_closed",
    "stream_failed",
    "device_connected",
    "device_disconnected",
    "device_refused",
    "registry_changed",
];

/// HTML-escapes text for element content and quoted attributes.
pub fn escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for character in text.chars() {
        match character {
            '&' => escaped.push_str("&amp;"),
            '<' => escaped.push_str("&lt;"),
            '>' => escaped.push_str("&gt;"),
            '"' => escaped.push_str("&quot;"),
            '\'' => escaped.push_str("&#39;"),
            other => escaped.push(other),
        }
    }
    escaped
}

/// A path segment for a URL inside an attribute.
fn segment(text: &str) -> String {
    percent_encoding::utf8_percent_encode(text, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// `2026-12-02 04:40:52 UTC` for Unix seconds.
pub fn format_time(unix: u64) -> String {
    let time = time::OffsetDateTime::from_unix_timestamp(unix as i64)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02} UTC",
        time.year(),
        u8::from(time.month()),
        time.day(),
        time.hour(),
        time.minute(),
        time.second()
    )
}

fn time_cell(value: &Value) -> String {
    match value.as_u64() {
        Some(unix) => format!("<time data-unix=\"{unix}\">{}</time>", format_time(unix)),
        None => "—".to_string(),
    }
}

/// `1.5 MiB` for a byte count.
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

fn bytes_cell(value: &Value) -> String {
    let bytes = value.as_u64().unwrap_or(0);
    format!(
        "<span data-bytes=\"{bytes}\">{}</span>",
        format_bytes(bytes)
    )
}

fn csrf_field(user: &SignedIn) -> String {
    format!(
        "<input type=\"hidden\" name=\"csrf\" value=\"{}\">",
        escape(&user.csrf_token)
    )
}

/// The page around `content`; `page` names the navigation entry and tells
/// the script what to keep current.
fn layout(
    title: &str,
    page: &str,
    user: Option<&SignedIn>,
    notice: Option<&Notice>,
    content: &str,
) -> String {
    let mut html = String::new();
    let _ = write!(
        html,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{title} · devstreams console</title>\
         <link rel=\"stylesheet\" href=\"{ROOT}/assets/console.css\">",
        title = escape(title)
    );
    if let Some(user) = user {
        let _ = write!(
            html,
            "<meta name=\"csrf-token\" content=\"{}\"><script src=\"{ROOT}/assets/console.js\" defer></script>",
            escape(&user.csrf_token)
        );
    }
    let _ = write!(
        html,
        "</head><body data-page=\"{page}\"><a class=\"skip\" href=\"#main\">Skip to content</a><header><span class=\"brand\">devstreams</span>"
    );
    if let Some(user) = user {
        html.push_str("<nav aria-label=\"Console\"><ul>");
        for (id, label, href) in [
            ("overview", "Overview", format!("{ROOT}/")),
            ("devices", "Devices", format!("{ROOT}/devices")),
            ("streams", "Live streams", format!("{ROOT}/streams")),
            ("activity", "Activity", format!("{ROOT}/activity")),
        ] {
            let current = if id == page {
                " aria-current=\"page\""
            } else {
                ""
            };
            let _ = write!(html, "<li><a href=\"{href}\"{current}>{label}</a></li>");
        }
        let _ = write!(
            html,
            "</ul></nav><form class=\"sign-out\" method=\"post\" action=\"{ROOT}/sign-out\">{}\
             <span class=\"who\">{}</span> <button type=\"submit\">Sign out</button></form>",
            csrf_field(user),
            escape(&user.policy)
        );
    }
    let _ = write!(
        html,
        "</header><main id=\"main\"><h1>{}</h1>",
        escape(title)
    );
    if let Some(notice) = notice {
        html.push_str(&notice_html(notice));
    }
    html.push_str(content);
    html.push_str("</main></body></html>\n");
    html
}

fn notice_html(notice: &Notice) -> String {
    match notice {
        Notice::Done(text) => format!("<p class=\"notice done\" role=\"status\">{}</p>", escape(text)),
        Notice::Failed(text) => format!("<p class=\"notice failed\" role=\"alert\">{}</p>", escape(text)),
        Notice::ConnectionString {
            text,
            connection_string,
        } => format!(
            "<div class=\"notice done\" role=\"status\"><p>{}</p>\
             <p><label for=\"connection-string\">Connection string</label>\
             <input id=\"connection-string\" class=\"secret\" readonly value=\"{}\"> \
             <button type=\"button\" id=\"copy\" data-copy=\"connection-string\">Copy</button></p></div>",
            escape(text),
            escape(connection_string)
        ),
    }
}

pub fn sign_in(problem: Option<&str>) -> String {
    let notice = problem.map(|text| Notice::Failed(text.to_string()));
    let content = format!(
        "<form class=\"panel sign-in\" method=\"post\" action=\"{ROOT}/sign-in\">\
         <p>Sign in with a policy that has the registry-read right (registry-write to make changes), \
         such as <code>registryReadWrite</code>: <code>relay policy show registryReadWrite</code> prints its key.</p>\
         <p><label for=\"policy\">Policy name</label><input id=\"policy\" name=\"policy\" autocomplete=\"username\" required value=\"registryReadWrite\"></p>\
         <p><label for=\"key\">Key (or the whole connection string)</label><input id=\"key\" name=\"key\" type=\"password\" autocomplete=\"current-password\" required></p>\
         <p><button type=\"submit\" id=\"sign-in\">Sign in</button></p></form>"
    );
    layout("Sign in", "sign-in", None, notice.as_ref(), &content)
}

pub fn message(user: &SignedIn, title: &str, text: &str) -> String {
    layout(
        title,
        "message",
        Some(user),
        Some(&Notice::Failed(text.to_string())),
        "",
    )
}

pub fn not_found(user: &SignedIn, path: &str) -> String {
    message(
        user,
        "Not found",
        &format!("The console has no page {path}."),
    )
}

pub fn overview(state: &RelayState, user: &SignedIn, cluster_nodes: Option<&str>) -> String {
    let snapshot = super::live::snapshot(state, false);
    let number = |key: &str| snapshot[key].as_u64().unwrap_or(0);
    let mut content = String::new();
    let _ = write!(
        content,
        "<section class=\"cards\" aria-label=\"Now\">\
         <div class=\"card\"><h2>Devices online</h2><p><span id=\"devices-online\">{}</span> / <span id=\"devices-registered\">{}</span> registered</p></div>\
         <div class=\"card\"><h2>Live streams</h2><p id=\"live-streams\">{}</p></div>\
         <div class=\"card\"><h2>Stream creations</h2><p><span id=\"creations-rate\">—</span> per minute</p></div>\
         <div class=\"card\"><h2>Throughput</h2><p><span id=\"bytes-rate\">—</span> per second</p></div></section>",
        number("devicesOnline"),
        number("devicesRegistered"),
        number("liveStreams")
    );
    content.push_str(
        "<section class=\"panel\"><h2>Last minutes</h2>\
         <figure><svg id=\"chart\" viewBox=\"0 0 600 160\" preserveAspectRatio=\"none\" role=\"img\" \
         aria-label=\"Bytes per second and stream creations per minute over the last minutes\">\
         <line class=\"axis\" x1=\"0\" y1=\"159\" x2=\"600\" y2=\"159\"></line>\
         <polyline id=\"chart-bytes\" class=\"series-bytes\" points=\"\"></polyline>\
         <polyline id=\"chart-creations\" class=\"series-creations\" points=\"\"></polyline></svg>\
         <figcaption><span class=\"key-bytes\">■</span> bytes per second (peak <span id=\"chart-bytes-peak\">—</span>) \
         <span class=\"key-creations\">■</span> stream creations per minute (peak <span id=\"chart-creations-peak\">—</span>)</figcaption></figure></section>",
    );
    let node = snapshot["node"]
        .as_str()
        .map(|name| {
            format!(
                "This node: <strong>{}</strong> (each node shows its own devices and streams).",
                escape(name)
            )
        })
        .unwrap_or_else(|| "A single relay (not clustered).".to_string());
    let _ = write!(content, "<p class=\"node\">{node}</p>");
    if let Some(nodes) = cluster_nodes {
        let _ = write!(
            content,
            "<section class=\"panel\"><h2>Cluster nodes</h2><pre id=\"cluster-nodes\">{}</pre></section>",
            escape(nodes)
        );
    }
    layout("Overview", "overview", Some(user), None, &content)
}

pub fn devices(
    state: &RelayState,
    user: &SignedIn,
    search: &str,
    notice: Option<Notice>,
) -> String {
    let list = crate::admin_api::list_devices(state);
    let devices = list["devices"].as_array().cloned().unwrap_or_default();
    let search_lower = search.to_lowercase();
    let mut content = String::new();
    let _ = write!(
        content,
        "<div class=\"toolbar\"><form method=\"get\" action=\"{ROOT}/devices\" role=\"search\">\
         <label for=\"search\">Search devices</label> <input id=\"search\" name=\"q\" type=\"search\" value=\"{}\"> \
         <button type=\"submit\">Search</button></form>\
         <form method=\"post\" action=\"{ROOT}/devices\">{}\
         <label for=\"new-device\">New device id</label> <input id=\"new-device\" name=\"device_id\" required maxlength=\"128\"> \
         <button type=\"submit\" id=\"add-device\">Add device</button></form></div>",
        escape(search),
        csrf_field(user)
    );
    content.push_str(
        "<div class=\"table-wrap\"><table id=\"devices\"><thead><tr><th scope=\"col\">Device</th><th scope=\"col\">State</th>\
         <th scope=\"col\">Since</th><th scope=\"col\">Address</th><th scope=\"col\">Live streams</th>\
         <th scope=\"col\">Last activity</th><th scope=\"col\">Actions</th></tr></thead><tbody>",
    );
    let mut shown = 0;
    for device in &devices {
        let device_id = device["deviceId"].as_str().unwrap_or_default();
        if !search_lower.is_empty() && !device_id.to_lowercase().contains(&search_lower) {
            continue;
        }
        shown += 1;
        let online = device["online"].as_bool().unwrap_or(false);
        let enabled = device["enabled"].as_bool().unwrap_or(false);
        let registered = device["registered"].as_bool().unwrap_or(false);
        let state_text = match (online, enabled, registered) {
            (_, _, false) => "online, not registered",
            (true, true, _) => "online",
            (false, true, _) => "offline",
            (true, false, _) => "online, disabled",
            (false, false, _) => "offline, disabled",
        };
        let path = format!("{ROOT}/devices/{}", segment(device_id));
        let toggle = if enabled {
            ("disable", "Disable")
        } else {
            ("enable", "Enable")
        };
        let actions = if registered {
            format!(
                "<form method=\"post\" action=\"{path}/{action}\">{csrf}<button type=\"submit\" data-action=\"{action}\">{label}</button></form>\
                 <form method=\"post\" action=\"{path}/rotate-key\">{csrf}<button type=\"submit\" data-action=\"rotate-key\">Rotate key</button></form>\
                 <a class=\"button danger\" href=\"{path}/remove\" data-action=\"remove\">Remove…</a>",
                action = toggle.0,
                label = toggle.1,
                csrf = csrf_field(user),
            )
        } else {
            String::new()
        };
        let _ = write!(
            content,
            "<tr data-device-id=\"{id}\" data-online=\"{online}\" data-enabled=\"{enabled}\"><th scope=\"row\">{id}</th>\
             <td class=\"state\"><span class=\"badge {badge}\">{state_text}</span></td><td class=\"since\">{since}</td>\
             <td class=\"address\">{address}</td><td class=\"streams\">{streams}</td><td class=\"activity\">{activity}</td>\
             <td class=\"actions\">{actions}</td></tr>",
            id = escape(device_id),
            badge = if online { "online" } else { "offline" },
            since = if online { time_cell(&device["connectedSince"]) } else { time_cell(&device["lastSeen"]) },
            address = escape(device["address"].as_str().unwrap_or("—")),
            streams = device["liveStreams"].as_u64().unwrap_or(0),
            activity = time_cell(&device["lastActivity"]),
        );
    }
    content.push_str("</tbody></table></div>");
    if shown == 0 {
        content.push_str("<p class=\"empty\">No devices match. Add one above, or with <code>relay device add NAME</code>.</p>");
    }
    layout("Devices", "devices", Some(user), notice.as_ref(), &content)
}

pub fn confirm_remove(user: &SignedIn, device_id: &str) -> String {
    let content = format!(
        "<form class=\"panel\" method=\"post\" action=\"{ROOT}/devices/{path}/remove\">{csrf}\
         <p>Remove device <strong>{id}</strong>? Its keys are deleted, and its control channel and live streams are cut at once. \
         This cannot be undone (adding it again makes new keys).</p>\
         <p><button type=\"submit\" class=\"danger\" id=\"confirm-remove\">Remove {id}</button> \
         <a class=\"button\" href=\"{ROOT}/devices\">Keep it</a></p></form>",
        path = segment(device_id),
        csrf = csrf_field(user),
        id = escape(device_id)
    );
    layout("Remove a device", "devices", Some(user), None, &content)
}

pub fn streams(state: &RelayState, user: &SignedIn, notice: Option<Notice>) -> String {
    let list = crate::admin_api::list_streams(state);
    let streams = list["streams"].as_array().cloned().unwrap_or_default();
    let mut content = String::from(
        "<div class=\"table-wrap\"><table id=\"streams\"><thead><tr><th scope=\"col\">Device</th><th scope=\"col\">Service address</th>\
         <th scope=\"col\">Stream</th><th scope=\"col\">Target port</th><th scope=\"col\">Started</th>\
         <th scope=\"col\">Device → service</th><th scope=\"col\">Service → device</th><th scope=\"col\">Actions</th></tr></thead><tbody>",
    );
    for stream in &streams {
        content.push_str(&stream_row(user, stream));
    }
    content.push_str("</tbody></table></div>");
    let _ = write!(
        content,
        "<p class=\"empty\" id=\"no-streams\"{}>No live streams.</p>",
        if streams.is_empty() { "" } else { " hidden" }
    );
    layout(
        "Live streams",
        "streams",
        Some(user),
        notice.as_ref(),
        &content,
    )
}

/// One live stream's row (the script builds the same for new streams).
fn stream_row(user: &SignedIn, stream: &Value) -> String {
    let stream_id = stream["streamId"].as_str().unwrap_or_default();
    let device = match stream["moduleId"].as_str() {
        Some(module) => format!(
            "{}/{}",
            stream["deviceId"].as_str().unwrap_or_default(),
            module
        ),
        None => stream["deviceId"].as_str().unwrap_or_default().to_string(),
    };
    format!(
        "<tr data-stream-id=\"{id}\"><th scope=\"row\">{device}</th><td>{service}</td><td>{name}</td><td>{port}</td>\
         <td>{started}</td><td class=\"to-service\">{to_service}</td><td class=\"to-device\">{to_device}</td>\
         <td><form method=\"post\" action=\"{ROOT}/streams/{path}/end\">{csrf}<button type=\"submit\" class=\"danger\" data-action=\"end\">End session</button></form></td></tr>",
        id = escape(stream_id),
        device = escape(&device),
        service = escape(stream["serviceAddress"].as_str().unwrap_or_default()),
        name = escape(stream["streamName"].as_str().unwrap_or_default()),
        port = stream["targetPort"].as_u64().map_or("—".to_string(), |port| port.to_string()),
        started = time_cell(&stream["started"]),
        to_service = bytes_cell(&stream["bytesDeviceToService"]),
        to_device = bytes_cell(&stream["bytesServiceToDevice"]),
        path = segment(stream_id),
        csrf = csrf_field(user),
    )
}

pub fn activity(state: &RelayState, user: &SignedIn, filter: &ActivityFilter) -> String {
    let since = filter.since_minutes.and_then(|minutes| {
        SystemTime::now().checked_sub(Duration::from_secs(minutes.saturating_mul(60)))
    });
    let device_lower = filter.device.to_lowercase();
    let mut content = String::new();
    let _ = write!(
        content,
        "<form class=\"toolbar\" method=\"get\" action=\"{ROOT}/activity\" role=\"search\">\
         <label for=\"filter-device\">Device</label> <input id=\"filter-device\" name=\"device\" value=\"{}\"> \
         <label for=\"filter-kind\">Event</label> <select id=\"filter-kind\" name=\"kind\"><option value=\"\">any</option>",
        escape(&filter.device)
    );
    for kind in EVENT_KINDS {
        let selected = if *kind == filter.kind {
            " selected"
        } else {
            ""
        };
        let _ = write!(
            content,
            "<option value=\"{kind}\"{selected}>{}</option>",
            kind.replace('_', " ")
        );
    }
    content.push_str("</select> <label for=\"filter-since\">Since</label> <select id=\"filter-since\" name=\"since\"><option value=\"\">all kept</option>");
    for (minutes, label) in [(15, "15 minutes"), (60, "1 hour"), (1440, "24 hours")] {
        let selected = if filter.since_minutes == Some(minutes) {
            " selected"
        } else {
            ""
        };
        let _ = write!(
            content,
            "<option value=\"{minutes}\"{selected}>{label}</option>"
        );
    }
    content.push_str(
        "</select> <button type=\"submit\">Filter</button></form>\
         <div class=\"table-wrap\"><table id=\"activity\"><thead><tr><th scope=\"col\">Time</th><th scope=\"col\">Event</th>\
         <th scope=\"col\">Device</th><th scope=\"col\">Details</th></tr></thead><tbody>",
    );
    let mut shown = 0;
    for (time, event) in state.audit.recent() {
        if shown >= MAX_ACTIVITY_ROWS || since.is_some_and(|since| time < since) {
            break;
        }
        let Ok(Value::Object(fields)) = serde_json::to_value(&event) else {
            continue;
        };
        let kind = fields
            .get("event")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let device = ["device_id", "client_id"]
            .iter()
            .find_map(|key| fields.get(*key).and_then(Value::as_str))
            .or_else(|| {
                (fields.get("kind").and_then(Value::as_str) == Some("device"))
                    .then(|| fields.get("name").and_then(Value::as_str))
                    .flatten()
            })
            .unwrap_or_default();
        if !filter.kind.is_empty() && kind != filter.kind {
            continue;
        }
        if !device_lower.is_empty() && !device.to_lowercase().contains(&device_lower) {
            continue;
        }
        shown += 1;
        let details: Vec<String> = fields
            .iter()
            .filter(|(key, _)| !matches!(key.as_str(), "event" | "device_id" | "client_id"))
            .map(|(key, value)| {
                let value = value
                    .as_str()
                    .map_or_else(|| value.to_string(), str::to_string);
                format!("{}={}", escape(key), escape(&value))
            })
            .collect();
        let _ = write!(
            content,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td class=\"details\">{}</td></tr>",
            time_cell(&Value::from(unix_seconds(time))),
            escape(&kind.replace('_', " ")),
            escape(device),
            details.join(" ")
        );
    }
    content.push_str("</tbody></table></div>");
    if shown == 0 {
        content.push_str("<p class=\"empty\">No events match (the relay keeps the latest few thousand in memory; the audit log file keeps them all).</p>");
    }
    layout("Activity", "activity", Some(user), None, &content)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_and_formats() {
        assert_eq!(
            escape("<a href=\"x\">'&'</a>"),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
        assert_eq!(format_time(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(format_bytes(512), "512 B");
        assert_eq!(format_bytes(1536), "1.5 KiB");
        assert_eq!(segment("a/b c"), "a%2Fb%20c");
    }
}
