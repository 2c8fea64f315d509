//! The web console in a real browser: Debian's headless Chromium, driven
//! through chromedriver (WebDriver) with `fantoccini`, against a real relay,
//! device-proxy, service-proxy, sshd and ssh. Signing in (and being refused),
//! watching a device come online and an ssh session's bytes grow, ending
//! that session and disabling the device from the page, each checked on the
//! real processes; plus the CSRF and sign-in checks with a plain HTTP
//! client. Each page's screenshot lands in `target/console-screenshots/`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use devstreams_tests::cluster::{require_tool, tool_path};
use devstreams_tests::{
    free_port, raw_http, require_sshd, start_device_proxy, start_service_proxy, Relay, Sshd,
};
use fantoccini::{Client, ClientBuilder, Locator};
use tokio::process::{Child, Command};

/// Longest wait for anything the page should show (updates come every second).
const PAGE_DEADLINE: Duration = Duration::from_secs(20);

/// One browser test at a time: two Chromiums on a two-core machine starve
/// the relays under test.
static BROWSER_TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Whether the browser tests can run: skip with a reason, or fail in CI
/// (`.ci/run` installs chromium and chromium-driver).
fn require_browser() -> bool {
    require_tool("chromium", "chromium") && require_tool("chromedriver", "chromium-driver")
}

/// chromedriver on a loopback port with one headless Chromium session; both
/// are killed by PID when dropped.
struct Browser {
    client: Client,
    driver: Child,
    profile: tempfile::TempDir,
}

impl Browser {
    async fn start() -> Browser {
        let profile = tempfile::tempdir().expect("temp dir for the browser profile");
        let chromium = absolute_path("chromium");
        let chromedriver = absolute_path("chromedriver");
        let port = free_port();
        let log = std::fs::File::create(profile.path().join("chromedriver.log"))
            .expect("chromedriver log");
        let driver = Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .expect("chromedriver starts");
        let deadline = tokio::time::Instant::now() + PAGE_DEADLINE;
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "chromedriver did not listen on port {port}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let user_data_dir = profile.path().join("profile");
        let arguments = [
            "--headless".to_string(),
            "--no-sandbox".into(),
            "--disable-gpu".into(),
            "--disable-quic".into(),
            "--no-first-run".into(),
            "--disable-background-networking".into(),
            "--disable-component-update".into(),
            "--disable-sync".into(),
            format!("--user-data-dir={}", user_data_dir.display()),
            "--window-size=1280,800".into(),
        ];
        let mut capabilities = serde_json::Map::new();
        capabilities.insert(
            "goog:chromeOptions".into(),
            serde_json::json!({ "binary": chromium, "args": arguments }),
        );
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let client = tokio::time::timeout(
            Duration::from_secs(60),
            ClientBuilder::new(connector)
                .capabilities(capabilities)
                .connect(&format!("http://127.0.0.1:{port}")),
        )
        .await
        .expect("a Chromium session within a minute")
        .expect("chromedriver starts a Chromium session");
        Browser {
            client,
            driver,
            profile,
        }
    }

    async fn goto(&self, url: &str) {
        self.client.goto(url).await.expect("page loads");
    }

    async fn path(&self) -> String {
        self.client
            .current_url()
            .await
            .expect("current URL")
            .path()
            .to_string()
    }

    async fn fill(&self, selector: &str, text: &str) {
        let field = self
            .client
            .find(Locator::Css(selector))
            .await
            .unwrap_or_else(|error| panic!("{selector} on the page: {error}"));
        field.clear().await.expect("field clears");
        field.send_keys(text).await.expect("typing");
    }

    async fn click(&self, selector: &str) {
        self.client
            .find(Locator::Css(selector))
            .await
            .unwrap_or_else(|error| panic!("{selector} on the page: {error}"))
            .click()
            .await
            .expect("click");
    }

    /// Clicks a button that submits a form, and waits for the next page.
    async fn submit(&self, selector: &str) {
        self.client
            .execute("document.documentElement.dataset.before = 'yes';", vec![])
            .await
            .expect("marks the page");
        self.click(selector).await;
        let deadline = tokio::time::Instant::now() + PAGE_DEADLINE;
        loop {
            let loaded = self
                .client
                .execute(
                    "return document.readyState === 'complete' && document.documentElement.dataset.before !== 'yes';",
                    vec![],
                )
                .await;
            if matches!(loaded, Ok(serde_json::Value::Bool(true))) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no new page after clicking {selector}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn text(&self, selector: &str) -> String {
        self.client
            .find(Locator::Css(selector))
            .await
            .unwrap_or_else(|error| panic!("{selector} on the page: {error}"))
            .text()
            .await
            .expect("text")
    }

    /// An attribute of the first element `selector` finds, if both exist.
    async fn attribute(&self, selector: &str, name: &str) -> Option<String> {
        let element = self.client.find(Locator::Css(selector)).await.ok()?;
        element.attr(name).await.ok().flatten()
    }

    /// Polls `attribute` until `check` accepts it.
    async fn wait_for_attribute(
        &self,
        selector: &str,
        name: &str,
        what: &str,
        check: impl Fn(&str) -> bool,
    ) -> String {
        let deadline = tokio::time::Instant::now() + PAGE_DEADLINE;
        loop {
            if let Some(value) = self.attribute(selector, name).await {
                if check(&value) {
                    return value;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the page never showed {what} ({selector} [{name}])"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Saves a screenshot as `target/console-screenshots/NAME.png` and checks
    /// it is not blank.
    async fn screenshot(&self, name: &str) -> PathBuf {
        let png = self.client.screenshot().await.expect("screenshot");
        let directory = screenshot_directory();
        std::fs::create_dir_all(&directory).expect("screenshot directory");
        let path = directory.join(format!("{name}.png"));
        std::fs::write(&path, &png).expect("screenshot written");
        let colours = distinct_colours(&png);
        assert!(
            colours > 8,
            "the {name} screenshot is blank ({colours} colours): {}",
            path.display()
        );
        path
    }

    async fn sign_in(&self, relay: &Relay, key: &str) {
        self.goto(&console_url(relay, "/console/sign-in")).await;
        self.fill("#policy", "registryReadWrite").await;
        self.fill("#key", key).await;
        self.submit("#sign-in").await;
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // chromedriver goes by kill_on_drop; the Chromium it started is ours
        // too, found by its profile directory, and killed by PID.
        kill_processes_using(self.profile.path());
        let _ = self.driver.start_kill();
    }
}

/// Where `program` is, as a full path (chromedriver needs one for Chromium).
fn absolute_path(program: &str) -> PathBuf {
    let found = tool_path(program).unwrap_or_else(|| panic!("{program} (required above)"));
    if found.is_absolute() {
        return found;
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|directory| directory.join(program))
        .find(|path| path.is_file())
        .unwrap_or(found)
}

/// The processes whose command line names `directory`.
fn processes_using(directory: &Path) -> Vec<u32> {
    let needle = directory.to_string_lossy().to_string();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let pid = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let command_line = std::fs::read(entry.path().join("cmdline")).ok()?;
            String::from_utf8_lossy(&command_line)
                .contains(&needle)
                .then_some(pid)
        })
        .collect()
}

/// Gives the processes using `directory` a moment to exit on their own (a
/// closed browser session), then sends SIGKILL to those left, by PID.
fn kill_processes_using(directory: &Path) {
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while !processes_using(directory).is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    for pid in processes_using(directory) {
        let _ = std::process::Command::new("kill")
            .arg("-KILL")
            .arg(pid.to_string())
            .status();
    }
}

fn screenshot_directory() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("console-screenshots")
}

/// How many distinct RGBA values a PNG has (stops counting at 1000).
fn distinct_colours(png_bytes: &[u8]) -> usize {
    let decoder = png::Decoder::new(std::io::Cursor::new(png_bytes));
    let mut reader = decoder.read_info().expect("a PNG");
    let mut pixels = vec![0; reader.output_buffer_size()];
    let frame = reader.next_frame(&mut pixels).expect("PNG pixels");
    let channels = frame.color_type.samples();
    let mut seen = std::collections::HashSet::new();
    for pixel in pixels[..frame.buffer_size()].chunks(channels) {
        seen.insert(pixel.to_vec());
        if seen.len() >= 1000 {
            break;
        }
    }
    seen.len()
}

fn console_url(relay: &Relay, path: &str) -> String {
    format!("http://{}{path}", relay.admin_address)
}

/// The registryReadWrite policy's key, as `relay policy show` prints it.
async fn registry_key(relay: &Relay) -> String {
    let output = relay.cli(&["policy", "show", "registryReadWrite"]).await;
    assert!(output.status.success(), "relay policy show");
    let connection_string = String::from_utf8_lossy(&output.stdout).trim().to_string();
    connection_string
        .split(';')
        .find_map(|part| part.strip_prefix("SharedAccessKey="))
        .expect("a key in the connection string")
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_out_pages_redirect_a_wrong_key_is_refused_and_sign_out_ends_the_session() {
    if !require_browser() {
        return;
    }
    let _turn = BROWSER_TURN.lock().await;
    let relay = Relay::start(&[]).await;
    let browser = Browser::start().await;

    for page in [
        "/console/",
        "/console/devices",
        "/console/streams",
        "/console/activity",
        "/",
    ] {
        browser.goto(&console_url(&relay, page)).await;
        assert_eq!(
            browser.path().await,
            "/console/sign-in",
            "{page} signed out goes to sign-in"
        );
    }
    browser.screenshot("sign-in").await;

    browser
        .sign_in(&relay, "d3JvbmcgYnV0IHdlbGwtZm9ybWVkIGtleQ==")
        .await;
    assert_eq!(browser.path().await, "/console/sign-in");
    assert!(
        browser.text(".notice.failed").await.contains("refused"),
        "a wrong key is refused"
    );
    browser.goto(&console_url(&relay, "/console/devices")).await;
    assert_eq!(
        browser.path().await,
        "/console/sign-in",
        "and gets no session"
    );

    browser.sign_in(&relay, &registry_key(&relay).await).await;
    assert_eq!(browser.path().await, "/console/", "signed in: the overview");
    assert_eq!(browser.text("h1").await, "Overview");
    browser.submit(".sign-out button").await;
    assert_eq!(browser.path().await, "/console/sign-in");
    browser.goto(&console_url(&relay, "/console/streams")).await;
    assert_eq!(
        browser.path().await,
        "/console/sign-in",
        "signed out again: pages redirect"
    );
    browser
        .client
        .clone()
        .close()
        .await
        .expect("browser session ends");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_follows_a_device_and_an_ssh_session_ends_it_and_disables_the_device() {
    if !require_browser() || !require_sshd() {
        return;
    }
    let _turn = BROWSER_TURN.lock().await;
    let relay = Relay::start(&[]).await;
    let sshd = Sshd::start().await;
    let browser = Browser::start().await;
    browser.sign_in(&relay, &registry_key(&relay).await).await;
    assert_eq!(browser.path().await, "/console/");

    // Add the device on the page: its connection string is shown once.
    browser.goto(&console_url(&relay, "/console/devices")).await;
    browser.fill("#new-device", "Kiosk17").await;
    browser.submit("#add-device").await;
    let connection_string = browser
        .attribute("#connection-string", "value")
        .await
        .expect("the new device's connection string is shown");
    assert!(
        connection_string.contains("DeviceId=Kiosk17;SharedAccessKey="),
        "{connection_string}"
    );
    browser.goto(&console_url(&relay, "/console/devices")).await;
    assert!(
        browser
            .attribute("#connection-string", "value")
            .await
            .is_none(),
        "shown only once"
    );
    let row = "#devices tr[data-device-id=\"Kiosk17\"]";
    assert_eq!(
        browser.attribute(row, "data-online").await.as_deref(),
        Some("false")
    );

    // The device comes online on the open page (server-sent events).
    let device = start_device_proxy(&relay, &connection_string, sshd.port, &[]).await;
    browser
        .wait_for_attribute(row, "data-online", "the device online", |value| {
            value == "true"
        })
        .await;
    assert!(browser
        .text(&format!("{row} .address"))
        .await
        .starts_with("127.0.0.1:"));
    browser.screenshot("devices").await;

    // An ssh session that keeps talking, through service-proxy.
    let (_service_proxy, local_port) = start_service_proxy(&relay, "Kiosk17", &[]).await;
    let mut session = sshd
        .ssh(local_port, "while true; do echo tick; sleep 0.2; done")
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("ssh starts");

    browser.goto(&console_url(&relay, "/console/streams")).await;
    let stream_row = "#streams tbody tr";
    let bytes = format!("{stream_row} .to-service [data-bytes]");
    let first = browser
        .wait_for_attribute(&bytes, "data-bytes", "the ssh session", |value| {
            value.parse::<u64>().is_ok_and(|bytes| bytes > 0)
        })
        .await;
    let first: u64 = first.parse().expect("a byte count");
    browser
        .wait_for_attribute(&bytes, "data-bytes", "its bytes growing", |value| {
            value.parse::<u64>().is_ok_and(|bytes| bytes > first)
        })
        .await;
    assert_eq!(browser.text(&format!("{stream_row} th")).await, "Kiosk17");
    browser.screenshot("streams").await;
    browser.goto(&console_url(&relay, "/console/")).await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    browser.screenshot("overview").await;
    browser
        .client
        .set_window_size(390, 844)
        .await
        .expect("phone width");
    browser.screenshot("overview-phone").await;
    browser
        .client
        .set_window_size(1280, 800)
        .await
        .expect("desktop width");

    // End the session from the page: ssh sees it end.
    browser.goto(&console_url(&relay, "/console/streams")).await;
    browser
        .submit(&format!("{stream_row} button[data-action=\"end\"]"))
        .await;
    assert!(
        browser.text(".notice.done").await.contains("ended"),
        "the page says the session ended"
    );
    let ended = tokio::time::timeout(PAGE_DEADLINE, session.wait()).await;
    assert!(ended.is_ok(), "the ssh client saw its session end");

    // Disable the device from the page: its device-proxy is cut and refused.
    browser.goto(&console_url(&relay, "/console/devices")).await;
    browser
        .submit(&format!("{row} button[data-action=\"disable\"]"))
        .await;
    assert!(browser
        .text(".notice.done")
        .await
        .contains("Disabled Kiosk17"));
    device
        .wait_for_log("the relay refused the device credentials", PAGE_DEADLINE)
        .await;
    browser.goto(&console_url(&relay, "/console/devices")).await;
    browser
        .wait_for_attribute(row, "data-online", "the device offline", |value| {
            value == "false"
        })
        .await;
    assert!(browser
        .text(&format!("{row} .state"))
        .await
        .contains("disabled"));

    // Activity: the story so far, filterable by device and kind.
    browser
        .goto(&console_url(
            &relay,
            "/console/activity?device=Kiosk17&kind=stream_closed",
        ))
        .await;
    let closed = browser.text("#activity tbody").await;
    assert!(closed.contains("stream closed"), "{closed}");
    assert!(closed.contains("ended_by=operator"), "{closed}");
    browser
        .goto(&console_url(&relay, "/console/activity"))
        .await;
    let all = browser.text("#activity tbody").await;
    for kind in ["device connected", "stream established", "registry changed"] {
        assert!(all.contains(kind), "{kind} in the activity: {all}");
    }
    browser.screenshot("activity").await;
    browser
        .client
        .clone()
        .close()
        .await
        .expect("browser session ends");
}

/// A raw HTTP request to the admin listener, with an optional cookie and form.
async fn request(
    relay: &Relay,
    method: &str,
    path: &str,
    cookie: Option<&str>,
    form: &str,
) -> (u16, Vec<(String, String)>, String) {
    let cookie = cookie
        .map(|cookie| format!("Cookie: {cookie}\r\n"))
        .unwrap_or_default();
    raw_http(
        &relay.admin_address,
        &format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\n{cookie}Content-Type: application/x-www-form-urlencoded\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{form}",
            relay.admin_address,
            form.len()
        ),
    )
    .await
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(key, _)| key.eq_ignore_ascii_case(name))
        .map(|(_, value)| value.as_str())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_without_the_csrf_token_is_refused_and_data_needs_a_session() {
    let relay = Relay::start(&[]).await;
    relay.add_device("Stays").await;
    for path in ["/console/data", "/console/live"] {
        let (status, _, _) = request(&relay, "GET", path, None, "").await;
        assert_eq!(status, 401, "{path} without a session");
    }
    let (status, _, _) = request(&relay, "POST", "/console/devices/Stays/disable", None, "").await;
    assert_eq!(status, 401, "a change without a session");

    let key = registry_key(&relay).await;
    let form = format!(
        "policy=registryReadWrite&key={}",
        percent_encoding::utf8_percent_encode(&key, percent_encoding::NON_ALPHANUMERIC)
    );
    // A sign-in form posted from another site's page (login CSRF) is
    // refused; the browser says so in Sec-Fetch-Site, or in Origin alone.
    let own_origin = format!("http://{}", relay.admin_address);
    for (case, extra) in [
        (
            "Sec-Fetch-Site",
            "Sec-Fetch-Site: cross-site\r\n".to_string(),
        ),
        ("Origin", "Origin: http://attacker.example\r\n".to_string()),
        ("Origin null", "Origin: null\r\n".to_string()),
        (
            "same origin",
            format!("Origin: {own_origin}\r\nSec-Fetch-Site: same-origin\r\n"),
        ),
        (
            "same origin, Origin alone",
            format!("Origin: {own_origin}\r\n"),
        ),
    ] {
        let (status, headers, body) = raw_http(
            &relay.admin_address,
            &format!(
                "POST /console/sign-in HTTP/1.1\r\nHost: {}\r\n{extra}\
                 Content-Type: application/x-www-form-urlencoded\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n{form}",
                relay.admin_address,
                form.len()
            ),
        )
        .await;
        if case.starts_with("same origin") {
            assert_eq!(status, 303, "{case}: {body}");
            assert!(header(&headers, "set-cookie").is_some(), "{case}");
        } else {
            assert_eq!(status, 403, "{case}: {body}");
            assert!(header(&headers, "set-cookie").is_none(), "{case}");
            assert!(body.contains("another site"), "{case}: {body}");
        }
    }

    let (status, headers, _) = request(&relay, "POST", "/console/sign-in", None, &form).await;
    assert_eq!(status, 303);
    let set_cookie = header(&headers, "set-cookie").expect("a session cookie");
    for attribute in ["HttpOnly", "SameSite=Strict", "Path=/console"] {
        assert!(
            set_cookie.contains(attribute),
            "{attribute} in {set_cookie}"
        );
    }
    assert!(
        !set_cookie.contains("Secure"),
        "plain HTTP: not Secure ({set_cookie})"
    );
    let cookie = set_cookie
        .split(';')
        .next()
        .expect("name=value")
        .to_string();

    let (status, _, body) = request(&relay, "GET", "/console/data", Some(&cookie), "").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"deviceId\":\"Stays\""), "{body}");
    for form in ["", "csrf=", "csrf=not-the-token"] {
        let (status, _, _) = request(
            &relay,
            "POST",
            "/console/devices/Stays/disable",
            Some(&cookie),
            form,
        )
        .await;
        assert_eq!(status, 403, "a change with {form:?} is refused");
    }
    let (status, _, body) = request(&relay, "GET", "/console/data", Some(&cookie), "").await;
    assert_eq!(status, 200);
    assert!(
        body.contains("\"enabled\":true"),
        "the device is still enabled: {body}"
    );

    // With the page's token, the same change goes through.
    let (_, _, page) = request(&relay, "GET", "/console/devices", Some(&cookie), "").await;
    let token = page
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("a CSRF token in the page");
    let (status, _, body) = request(
        &relay,
        "POST",
        "/console/devices/Stays/disable",
        Some(&cookie),
        &format!("csrf={token}"),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("Disabled Stays"), "{body}");

    // Signing out ends the session on the relay, not only in the browser.
    let (status, _, _) = request(
        &relay,
        "POST",
        "/console/sign-out",
        Some(&cookie),
        &format!("csrf={token}"),
    )
    .await;
    assert_eq!(status, 303);
    let (status, _, _) = request(&relay, "GET", "/console/data", Some(&cookie), "").await;
    assert_eq!(
        status, 401,
        "the old cookie is worth nothing after sign-out"
    );

    // A policy with registry-read only may look, not change.
    let output = relay
        .cli(&["policy", "add", "looker", "--rights", "registry-read"])
        .await;
    assert!(output.status.success(), "relay policy add");
    let looker = String::from_utf8_lossy(&output.stdout).trim().to_string();
    let looker_key = looker
        .split(';')
        .find_map(|part| part.strip_prefix("SharedAccessKey="))
        .expect("a key");
    let form = format!(
        "policy=looker&key={}",
        percent_encoding::utf8_percent_encode(looker_key, percent_encoding::NON_ALPHANUMERIC)
    );
    let (status, headers, _) = request(&relay, "POST", "/console/sign-in", None, &form).await;
    assert_eq!(status, 303, "registry-read signs in");
    let looker_cookie = header(&headers, "set-cookie")
        .and_then(|cookie| cookie.split(';').next())
        .expect("a session cookie")
        .to_string();
    let (_, _, page) = request(&relay, "GET", "/console/devices", Some(&looker_cookie), "").await;
    let looker_token = page
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("a CSRF token in the page");
    let (status, _, body) = request(
        &relay,
        "POST",
        "/console/devices/Stays/enable",
        Some(&looker_cookie),
        &format!("csrf={looker_token}"),
    )
    .await;
    assert_eq!(status, 403, "registry-read may not change: {body}");
    assert!(body.contains("registry-write"), "names the right: {body}");

    // Failed sign-ins count as authentication failures (and slow the source down).
    let before = authentication_failures(&relay).await;
    let (status, _, _) = request(
        &relay,
        "POST",
        "/console/sign-in",
        None,
        "policy=registryReadWrite&key=AAAA",
    )
    .await;
    assert_eq!(status, 401);
    let (status, _, _) = request(
        &relay,
        "POST",
        "/console/sign-in",
        None,
        "policy=nobody&key=AAAA",
    )
    .await;
    assert_eq!(status, 401);
    assert_eq!(authentication_failures(&relay).await, before + 2);
    let log = relay.process.log();
    assert!(!log.contains(&key), "the key never reaches the log");
}

async fn authentication_failures(relay: &Relay) -> u64 {
    let (_, _, metrics) = request(relay, "GET", "/metrics", None, "").await;
    metrics
        .lines()
        .find_map(|line| line.strip_prefix("devstreams_authentication_failures_total "))
        .and_then(|value| value.trim().parse().ok())
        .expect("the authentication failures counter")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clustered_overview_lists_every_node() {
    if !devstreams_tests::cluster::require_nats_server() {
        return;
    }
    let cluster = devstreams_tests::cluster::TestCluster::start(2, &[]).await;
    let node = &cluster.nodes[0].relay;
    let output = node
        .cli(&[
            "policy",
            "show",
            "registryReadWrite",
            "--cluster",
            &cluster.nats.url(),
        ])
        .await;
    assert!(
        output.status.success(),
        "relay policy show --cluster: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let connection_string = String::from_utf8_lossy(&output.stdout).trim().to_string();
    let key = connection_string
        .split(';')
        .find_map(|part| part.strip_prefix("SharedAccessKey="))
        .expect("a key in the connection string");
    let form = format!(
        "policy=registryReadWrite&key={}",
        percent_encoding::utf8_percent_encode(key, percent_encoding::NON_ALPHANUMERIC)
    );
    let (status, headers, body) = request(node, "POST", "/console/sign-in", None, &form).await;
    assert_eq!(status, 303, "{body}");
    let cookie = header(&headers, "set-cookie")
        .and_then(|value| value.split(';').next())
        .expect("a session cookie")
        .to_string();
    // Heartbeats land within seconds of a node's start.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (status, _, body) = request(node, "GET", "/console", Some(&cookie), "").await;
        assert_eq!(status, 200, "{body}");
        if body.contains("Cluster nodes") && body.contains("relay-1") && body.contains("relay-2") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the overview never listed both nodes:\n{body}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
