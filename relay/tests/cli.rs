//! The `relay` command line as a user meets it. (Also makes `cargo test`
//! build the binary that the end-to-end tests in `tests/` run.)

use std::process::Command;

fn relay() -> Command {
    Command::new(env!("CARGO_BIN_EXE_relay"))
}

#[test]
fn help_shows_examples_and_limit_defaults() {
    let output = relay()
        .args(["serve", "--help"])
        .output()
        .expect("relay runs");
    assert!(output.status.success());
    let help = String::from_utf8_lossy(&output.stdout);
    assert!(
        help.contains("--handshake-timeout") && help.contains("[default: 60]"),
        "{help}"
    );
    let output = relay().arg("--help").output().expect("relay runs");
    assert!(String::from_utf8_lossy(&output.stdout).contains("relay device add MyDevice"));
}

#[test]
fn usage_errors_exit_2() {
    let output = relay()
        .args(["serve", "--listen", "not-an-address"])
        .output()
        .expect("relay runs");
    assert_eq!(output.status.code(), Some(2));
}

#[test]
fn huge_seconds_values_are_usage_errors_not_panics() {
    for flag in ["--ping-interval", "--drain-timeout"] {
        let output = relay()
            .args(["serve", flag, "18446744073709551615"])
            .output()
            .expect("relay runs");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{flag}: {stderr}");
        assert!(stderr.contains(flag), "{stderr}");
    }
}

#[test]
fn registry_commands_on_a_missing_data_dir_say_how_to_create_it() {
    let directory = tempfile::tempdir().expect("temp dir");
    let missing = directory.path().join("nothing-here");
    let output = relay()
        .args(["device", "list", "--data-dir"])
        .arg(&missing)
        .output()
        .expect("relay runs");
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("relay serve"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
}

#[test]
fn device_add_prints_one_connection_string_and_refuses_duplicates() {
    let directory = tempfile::tempdir().expect("temp dir");
    let add = |id: &str| {
        relay()
            .args(["device", "add", id, "--data-dir"])
            .arg(directory.path())
            .output()
            .expect("relay runs")
    };
    let output = add("MyDevice");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(stdout.trim().lines().count(), 1);
    assert!(
        stdout.starts_with("HostName=") && stdout.contains(";DeviceId=MyDevice;SharedAccessKey="),
        "{stdout}"
    );
    let again = add("MyDevice");
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));
    let invalid = add("bad/id");
    assert_eq!(invalid.status.code(), Some(1));
}
