//! The `echo-sample` command line. (Also makes `cargo test` build the binary
//! that the end-to-end tests in `tests/` run.)

use std::process::Command;

fn echo_sample() -> Command {
    Command::new(env!("CARGO_BIN_EXE_echo-sample"))
}

#[test]
fn help_shows_the_demo_example() {
    let output = echo_sample()
        .arg("--help")
        .output()
        .expect("echo-sample runs");
    assert!(output.status.success());
    assert!(String::from_utf8_lossy(&output.stdout).contains("echo-sample demo"));
}

#[test]
fn a_device_connection_string_for_the_service_is_refused_in_one_line() {
    let output = echo_sample()
        .args([
            "service",
            "HostName=localhost:1;DeviceId=d;SharedAccessKey=AAAA",
            "MyDevice",
        ])
        .output()
        .expect("echo-sample runs");
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("service connection string"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
}
