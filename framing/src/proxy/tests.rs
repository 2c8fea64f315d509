use std::collections::HashMap;

use super::*;

fn environment(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
    let table: HashMap<String, String> = pairs
        .iter()
        .map(|(name, value)| (name.to_string(), value.to_string()))
        .collect();
    move |name| table.get(name).cloned()
}

#[test]
fn http_and_socks5_urls_parse_with_host_port_and_decoded_credentials() {
    let proxy =
        ProxyUrl::parse("http://alice:p%40ss%3Aword@proxy.example.com:3128").expect("valid");
    assert_eq!(proxy.kind(), ProxyKind::HttpConnect);
    assert_eq!(proxy.host(), "proxy.example.com");
    assert_eq!(proxy.port(), 3128);
    let credentials = proxy.credentials().expect("credentials");
    assert_eq!(credentials.username(), "alice");
    assert_eq!(credentials.password(), "p@ss:word");

    for text in [
        "socks5://10.0.0.1:1080",
        "socks5h://10.0.0.1:1080/",
        "SOCKS5://10.0.0.1:1080",
    ] {
        let proxy = ProxyUrl::parse(text).expect(text);
        assert_eq!(proxy.kind(), ProxyKind::Socks5, "{text}");
        assert_eq!((proxy.host(), proxy.port()), ("10.0.0.1", 1080), "{text}");
        assert!(proxy.credentials().is_none(), "{text}");
    }
    let proxy = ProxyUrl::parse("socks5://[::1]:9050").expect("IPv6");
    assert_eq!(proxy.host(), "::1");
    assert_eq!(proxy.to_string(), "socks5://[::1]:9050");
}

#[test]
fn a_url_without_scheme_is_http_and_without_port_uses_1080_as_curl_does() {
    let proxy = ProxyUrl::parse("proxy.example.com").expect("valid");
    assert_eq!(proxy.kind(), ProxyKind::HttpConnect);
    assert_eq!(proxy.port(), DEFAULT_PROXY_PORT);
    let proxy = ProxyUrl::parse("user:pw@proxy.example.com:8080").expect("valid");
    assert_eq!(proxy.port(), 8080);
    assert_eq!(proxy.credentials().map(|c| c.username()), Some("user"));
}

#[test]
fn a_user_without_password_has_an_empty_password() {
    let proxy = ProxyUrl::parse("http://token@proxy:3128").expect("valid");
    let credentials = proxy.credentials().expect("credentials");
    assert_eq!(
        (credentials.username(), credentials.password()),
        ("token", "")
    );
}

#[test]
fn unsupported_and_malformed_urls_are_refused_with_what_to_write() {
    let error = ProxyUrl::parse("https://proxy:443").expect_err("https proxies");
    assert!(
        matches!(error, ProxyUrlError::UnsupportedScheme { .. }),
        "{error:?}"
    );
    assert!(error.to_string().contains("use http://"), "{error}");
    assert!(matches!(
        ProxyUrl::parse("socks4://proxy:1080"),
        Err(ProxyUrlError::UnsupportedScheme { .. })
    ));
    for text in [
        "http://",
        "http://proxy:99999",
        "http://proxy:3128/path",
        "http://proxy:3128/?q",
    ] {
        let error = ProxyUrl::parse(text).expect_err(text);
        assert!(
            matches!(error, ProxyUrlError::Invalid { .. }),
            "{text}: {error:?}"
        );
        assert!(
            error
                .to_string()
                .contains("http://[USER:PASSWORD@]HOST:PORT"),
            "{error}"
        );
    }
    let long = "x".repeat(256);
    assert!(matches!(
        ProxyUrl::parse(&format!("socks5://{long}:pw@proxy:1080")),
        Err(ProxyUrlError::CredentialsTooLong { .. })
    ));
    assert!(ProxyUrl::parse(&format!("http://{long}:pw@proxy:1080")).is_ok());
    assert!(matches!(
        ProxyUrl::parse("http://user:%FF@proxy:1080"),
        Err(ProxyUrlError::BadCredentialEncoding { .. })
    ));
}

#[test]
fn credentials_never_show_in_display_debug_or_errors() {
    let proxy = ProxyUrl::parse("http://alice:hunter2@proxy:3128").expect("valid");
    assert_eq!(proxy.to_string(), "http://proxy:3128");
    let debug = format!("{proxy:?} {:?}", proxy.credentials());
    assert!(
        !debug.contains("hunter2") && !debug.contains("alice"),
        "{debug}"
    );
    let settings =
        ProxySettings::resolve(Some("http://alice:hunter2@proxy:3128"), environment(&[]))
            .expect("valid");
    let debug = format!("{settings:?} {}", settings.route("relay", 443, true));
    assert!(
        !debug.contains("hunter2") && !debug.contains("alice"),
        "{debug}"
    );
    for bad in [
        "http://alice:hunter2@proxy:3128/path",
        "https://alice:hunter2@proxy:3128",
        "http://alice:hunter2@proxy:notaport",
        "http://alice:%FFhunter2@proxy:3128",
        "alice:hunter2@proxy:3128/x",
    ] {
        let message = ProxyUrl::parse(bad).expect_err(bad).to_string();
        assert!(
            !message.contains("hunter2") && !message.contains("alice"),
            "{message}"
        );
        assert!(message.contains("***@proxy"), "{message}");
    }
}

#[test]
fn redaction_keeps_scheme_host_and_tail() {
    assert_eq!(
        redact_url_text("http://a:b@host:1/x"),
        "http://***@host:1/x"
    );
    assert_eq!(redact_url_text("a:b@c@host:1"), "***@host:1");
    assert_eq!(redact_url_text("socks5://host:1"), "socks5://host:1");
    assert_eq!(redact_url_text("http://host/a@b"), "http://host/a@b");
}

#[test]
fn https_proxy_is_used_for_secure_dials_and_all_proxy_is_the_fallback() {
    let settings = ProxySettings::resolve(
        None,
        environment(&[
            ("HTTPS_PROXY", "http://secure:3128"),
            ("ALL_PROXY", "socks5://all:1080"),
        ]),
    )
    .expect("valid");
    let route = settings.route("relay.example.com", 443, true);
    assert_eq!(route.proxy().map(|p| p.host()), Some("secure"));
    assert_eq!(
        route.to_string(),
        "through http://secure:3128 (HTTPS_PROXY)"
    );
    // A plain ws:// URL reads http_proxy, else ALL_PROXY.
    let route = settings.route("relay.example.com", 80, false);
    assert_eq!(route.proxy().map(|p| p.host()), Some("all"));

    let settings =
        ProxySettings::resolve(None, environment(&[("all_proxy", "socks5h://all:1080")]))
            .expect("valid");
    assert_eq!(
        settings.route("relay", 443, true).to_string(),
        "through socks5://all:1080 (all_proxy)"
    );
}

#[test]
fn lowercase_variables_come_first_and_empty_ones_are_unset() {
    let settings = ProxySettings::resolve(
        None,
        environment(&[
            ("https_proxy", "http://lower:1"),
            ("HTTPS_PROXY", "http://upper:2"),
        ]),
    )
    .expect("valid");
    assert_eq!(
        settings.route("relay", 443, true).proxy().map(|p| p.host()),
        Some("lower")
    );
    let settings = ProxySettings::resolve(
        None,
        environment(&[("https_proxy", " "), ("HTTPS_PROXY", "http://upper:2")]),
    )
    .expect("valid");
    assert_eq!(
        settings.route("relay", 443, true).proxy().map(|p| p.host()),
        Some("upper")
    );
}

#[test]
fn upper_case_http_proxy_is_ignored_as_curl_does() {
    let settings = ProxySettings::resolve(None, environment(&[("HTTP_PROXY", "http://cgi:1")]))
        .expect("valid");
    assert_eq!(settings.route("relay", 80, false), Route::Direct);
    assert_eq!(settings.route("relay", 443, true), Route::Direct);
}

#[test]
fn the_flag_wins_over_the_environment_and_none_turns_every_proxy_off() {
    let env = [
        ("HTTPS_PROXY", "http://from-env:3128"),
        ("NO_PROXY", "other.example"),
    ];
    let settings =
        ProxySettings::resolve(Some("socks5://flag:1080"), environment(&env)).expect("valid");
    let route = settings.route("relay", 443, true);
    assert_eq!(route.to_string(), "through socks5://flag:1080 (--proxy)");
    for off in ["none", "NONE", ""] {
        let settings = ProxySettings::resolve(Some(off), environment(&env)).expect("valid");
        assert_eq!(settings.route("relay", 443, true), Route::Direct, "{off:?}");
    }
}

#[test]
fn no_proxy_exempts_the_relay_from_the_environment_proxy_and_from_the_flag() {
    let env = [
        ("HTTPS_PROXY", "http://proxy:3128"),
        ("no_proxy", "localhost,.internal"),
    ];
    let settings = ProxySettings::resolve(None, environment(&env)).expect("valid");
    assert_eq!(settings.route("localhost", 8443, true), Route::Exempt);
    assert_eq!(settings.route("relay.internal", 443, true), Route::Exempt);
    assert!(settings
        .route("relay.example.com", 443, true)
        .proxy()
        .is_some());
    let settings =
        ProxySettings::resolve(Some("http://proxy:3128"), environment(&env)).expect("valid");
    assert_eq!(settings.route("localhost", 8443, true), Route::Exempt);
    // Without NO_PROXY, loopback goes through the proxy (as in curl).
    let settings =
        ProxySettings::resolve(None, environment(&[("HTTPS_PROXY", "http://proxy:3128")]))
            .expect("valid");
    assert!(settings.route("localhost", 8443, true).proxy().is_some());
    assert!(settings.route("127.0.0.1", 8443, true).proxy().is_some());
}

#[test]
fn a_bad_proxy_variable_is_an_error_that_names_it() {
    let error = ProxySettings::resolve(None, environment(&[("HTTPS_PROXY", "ftp://proxy:21")]))
        .expect_err("ftp");
    assert_eq!(error.origin, "HTTPS_PROXY");
    assert!(error.to_string().starts_with("HTTPS_PROXY: "), "{error}");
    let error =
        ProxySettings::resolve(Some("http://proxy:0x"), environment(&[])).expect_err("bad port");
    assert!(error.to_string().starts_with("--proxy: "), "{error}");
}

#[test]
fn nothing_set_means_direct() {
    let settings = ProxySettings::resolve(None, environment(&[])).expect("valid");
    assert_eq!(settings.route("relay", 443, true), Route::Direct);
    assert_eq!(
        ProxySettings::direct().route("relay", 443, true),
        Route::Direct
    );
}
