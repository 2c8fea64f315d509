//! What a packager and a service manager rely on: the systemd units under
//! `packaging/systemd/` pass `systemd-analyze verify`; the relay and
//! device-proxy speak the sd_notify protocol (READY=1 once serving,
//! WATCHDOG=1 within the interval asked for, STOPPING=1 on SIGTERM) on a
//! real unix datagram socket; every program writes shell completions and
//! man pages that name its subcommands and flags.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use devstreams_tests::cluster::{require_tool, tool_path};
use devstreams_tests::{binary, spawn_device_proxy_with_environment, Process, Relay};
use tokio::net::UnixDatagram;

/// Upper bound for any one notification to arrive.
const NOTIFICATION_TIMEOUT: Duration = Duration::from_secs(30);
/// The watchdog interval the tests ask for (WATCHDOG_USEC): short, so a
/// test sees several keep-alives, and each must come within it.
const WATCHDOG_INTERVAL: Duration = Duration::from_millis(1000);
/// Keep-alives a test waits for: several intervals, to outlive the timer.
const KEEP_ALIVES_EXPECTED: usize = 4;

/// The units as shipped, with ExecStart pointing at the binaries just built
/// (verify checks that the executables exist).
fn units_with_built_binaries(directory: &Path) -> Vec<PathBuf> {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/systemd");
    let built = binary("relay")
        .parent()
        .expect("binaries live in a directory")
        .to_string_lossy()
        .to_string();
    let mut units = Vec::new();
    for name in [
        "devstreams-relay.service",
        "devstreams-device-proxy.service",
    ] {
        let text = std::fs::read_to_string(source.join(name))
            .unwrap_or_else(|error| panic!("packaging/systemd/{name}: {error}"));
        assert!(
            text.contains("ExecStart=/usr/local/bin/"),
            "{name} no longer starts /usr/local/bin/…; update this test"
        );
        let path = directory.join(name);
        std::fs::write(&path, text.replace("/usr/local/bin/", &format!("{built}/")))
            .expect("unit copy written");
        units.push(path);
    }
    units
}

/// Runs `systemd-analyze verify` on `units`; returns its report when it
/// found a problem in one of them. `--man=no`: the pages are not installed
/// here. systemd only warns about an unknown key or a bad value ("…,
/// ignoring") and still exits 0, so every line naming one of our units is a
/// problem too; lines about the machine itself (no running systemd, a
/// missing target) are not ours and do not count.
fn verify_problems(units: &[PathBuf]) -> Option<String> {
    let analyze = tool_path("systemd-analyze").expect("the caller required it");
    let output = std::process::Command::new(&analyze)
        .args(["verify", "--man=no"])
        .args(units)
        .output()
        .expect("systemd-analyze runs");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let ours = report.lines().any(|line| line.contains("devstreams-"));
    (!output.status.success() || ours).then_some(report)
}

#[test]
fn systemd_units_pass_systemd_analyze_verify() {
    if !require_tool("systemd-analyze", "systemd") {
        return;
    }
    let directory = tempfile::tempdir().expect("temp dir");
    let units = units_with_built_binaries(directory.path());
    if let Some(report) = verify_problems(&units) {
        panic!("systemd-analyze verify found problems in packaging/systemd:\n{report}");
    }
}

#[test]
fn systemd_analyze_verify_catches_broken_units() {
    // The check above must be able to fail: a bad value (only a warning to
    // systemd), an unknown key, and a relative ExecStart (a fatal error).
    if !require_tool("systemd-analyze", "systemd") {
        return;
    }
    for (good, bad) in [
        ("ProtectSystem=strict", "ProtectSystem=strictly"),
        ("ProtectHome=yes", "ProtectHomes=yes"),
        ("ExecStart=/", "ExecStart="),
    ] {
        let directory = tempfile::tempdir().expect("temp dir");
        let units = units_with_built_binaries(directory.path());
        let text = std::fs::read_to_string(&units[0]).expect("copy readable");
        std::fs::write(&units[0], text.replacen(good, bad, 1)).expect("copy written");
        assert!(
            verify_problems(&units).is_some(),
            "{bad} (instead of {good}) went unnoticed"
        );
    }
}

#[test]
fn systemd_units_are_hardened_and_use_notify_with_a_watchdog() {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/systemd");
    let common = [
        "Type=notify",
        "WatchdogSec=",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
        "SystemCallFilter=@system-service",
    ];
    let relay = std::fs::read_to_string(source.join("devstreams-relay.service")).expect("unit");
    for line in common.iter().chain(&[
        "StateDirectory=devstreams-relay",
        "Environment=RELAY_DATA_DIR=/var/lib/devstreams-relay",
        "AmbientCapabilities=CAP_NET_BIND_SERVICE",
        "CapabilityBoundingSet=CAP_NET_BIND_SERVICE",
        "User=devstreams",
        "--listen 0.0.0.0:443",
    ]) {
        assert!(
            relay.contains(line),
            "devstreams-relay.service lacks {line}"
        );
    }
    let device =
        std::fs::read_to_string(source.join("devstreams-device-proxy.service")).expect("unit");
    for line in common.iter().chain(&[
        "DynamicUser=yes",
        "EnvironmentFile=/etc/devstreams/device-proxy.env",
    ]) {
        assert!(
            device.contains(line),
            "devstreams-device-proxy.service lacks {line}"
        );
    }
    // The device key comes from the environment file, never the command line.
    for line in device.lines().filter(|line| line.starts_with("ExecStart=")) {
        assert!(
            !line.contains("SharedAccessKey"),
            "key on the command line: {line}"
        );
    }
}

/// The test's end of NOTIFY_SOCKET: a unix datagram socket in a temp dir.
struct NotifySocket {
    socket: UnixDatagram,
    path: PathBuf,
    _directory: tempfile::TempDir,
}

impl NotifySocket {
    fn bind() -> NotifySocket {
        let directory = tempfile::tempdir().expect("temp dir");
        let path = directory.path().join("notify.sock");
        let socket = UnixDatagram::bind(&path).expect("notify socket bound");
        NotifySocket {
            socket,
            path,
            _directory: directory,
        }
    }

    fn path(&self) -> String {
        self.path.to_string_lossy().to_string()
    }

    /// The next datagram, as text; panics after [`NOTIFICATION_TIMEOUT`].
    async fn next(&self, waiting_for: &str, process: &Process) -> String {
        let mut buffer = vec![0u8; 4096];
        match tokio::time::timeout(NOTIFICATION_TIMEOUT, self.socket.recv(&mut buffer)).await {
            Ok(Ok(length)) => String::from_utf8_lossy(&buffer[..length]).to_string(),
            Ok(Err(error)) => panic!("notify socket: {error}"),
            Err(_) => panic!(
                "no notification within {NOTIFICATION_TIMEOUT:?} while waiting for {waiting_for}; log:\n{}",
                process.log()
            ),
        }
    }

    /// Datagrams until one holds `line`; returns it.
    async fn until(&self, line: &str, process: &Process) -> String {
        loop {
            let message = self.next(line, process).await;
            if message.lines().any(|each| each == line) {
                return message;
            }
        }
    }

    /// Waits for [`KEEP_ALIVES_EXPECTED`] WATCHDOG=1 and checks that none
    /// came later than [`WATCHDOG_INTERVAL`] after the one before.
    async fn keep_alives(&self, process: &Process) {
        self.until("WATCHDOG=1", process).await;
        let mut previous = Instant::now();
        let mut seen = 0;
        while seen < KEEP_ALIVES_EXPECTED {
            let message = self.next("WATCHDOG=1", process).await;
            if message.lines().any(|line| line == "WATCHDOG=1") {
                let gap = previous.elapsed();
                assert!(
                    gap < WATCHDOG_INTERVAL,
                    "a keep-alive came {gap:?} after the one before; systemd would have killed the service at {WATCHDOG_INTERVAL:?}"
                );
                previous = Instant::now();
                seen += 1;
            }
        }
    }
}

fn watchdog_microseconds() -> String {
    WATCHDOG_INTERVAL.as_micros().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_notifies_ready_once_listening_then_keep_alives_then_stopping() {
    let notify = NotifySocket::bind();
    let directory = tempfile::tempdir().expect("temp dir");
    let data_dir = directory.path().join("relay-data");
    let data_dir = data_dir.to_string_lossy();
    let socket_path = notify.path();
    let watchdog = watchdog_microseconds();
    let mut relay = Process::spawn(
        "relay",
        &[
            "serve",
            "--data-dir",
            &data_dir,
            "--listen",
            "127.0.0.1:0",
            "--no-mqtt",
            "--drain-timeout",
            "1",
        ],
        directory.path(),
        &[
            ("NOTIFY_SOCKET", socket_path.as_str()),
            ("WATCHDOG_USEC", watchdog.as_str()),
        ],
    )
    .await;
    let ready = notify.next("READY=1", &relay).await;
    assert!(
        ready.lines().any(|line| line == "READY=1"),
        "the first notification is not READY=1: {ready:?}"
    );
    assert!(
        ready.contains("STATUS=listening on 127.0.0.1:"),
        "{ready:?}"
    );
    // READY means serving: the main listener accepts at once.
    let address = relay.wait_for_line("Listening on ").await;
    let address = address.split(' ').next().unwrap_or_default().to_string();
    tokio::net::TcpStream::connect(&address)
        .await
        .unwrap_or_else(|error| panic!("READY=1 was sent but {address} refuses: {error}"));

    notify.keep_alives(&relay).await;

    relay.signal("TERM");
    notify.until("STOPPING=1", &relay).await;
    assert_eq!(relay.wait_exit(NOTIFICATION_TIMEOUT).await, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alives_are_sent_only_by_the_process_systemd_named() {
    // WATCHDOG_PID names another process (e.g. a parent that set up the
    // watchdog for itself): this one must not answer for it.
    let notify = NotifySocket::bind();
    let directory = tempfile::tempdir().expect("temp dir");
    let data_dir = directory.path().join("relay-data");
    let data_dir = data_dir.to_string_lossy();
    let socket_path = notify.path();
    let watchdog = watchdog_microseconds();
    let other_process = std::process::id().to_string();
    let mut relay = Process::spawn(
        "relay",
        &[
            "serve",
            "--data-dir",
            &data_dir,
            "--listen",
            "127.0.0.1:0",
            "--no-mqtt",
            "--drain-timeout",
            "1",
        ],
        directory.path(),
        &[
            ("NOTIFY_SOCKET", socket_path.as_str()),
            ("WATCHDOG_USEC", watchdog.as_str()),
            ("WATCHDOG_PID", other_process.as_str()),
        ],
    )
    .await;
    notify.until("READY=1", &relay).await;
    // Three intervals in which a keep-alive would have come.
    let silence = tokio::time::timeout(WATCHDOG_INTERVAL * 3, async {
        loop {
            let message = notify.next("nothing", &relay).await;
            if message.contains("WATCHDOG=1") {
                return message;
            }
        }
    })
    .await;
    assert!(
        silence.is_err(),
        "keep-alive sent for another PID: {silence:?}"
    );
    relay.signal("TERM");
    notify.until("STOPPING=1", &relay).await;
    assert_eq!(relay.wait_exit(NOTIFICATION_TIMEOUT).await, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_proxy_notifies_ready_connected_keep_alives_and_stopping() {
    let relay = Relay::start(&["--no-mqtt"]).await;
    let connection_string = relay.add_device("notified-device").await;
    let notify = NotifySocket::bind();
    let socket_path = notify.path();
    let watchdog = watchdog_microseconds();
    let mut device = spawn_device_proxy_with_environment(
        &relay.ca_text(),
        relay.directory.path(),
        &connection_string,
        22,
        &[],
        &[
            ("NOTIFY_SOCKET", socket_path.as_str()),
            ("WATCHDOG_USEC", watchdog.as_str()),
        ],
    )
    .await;
    let ready = notify.next("READY=1", &device).await;
    assert!(
        ready.lines().any(|line| line == "READY=1"),
        "the first notification is not READY=1: {ready:?}"
    );
    // The status line follows the control channel.
    let connected = notify.until_status_contains("connected to", &device).await;
    assert!(
        connected.contains(&format!(":{}", relay.port())),
        "the status names another relay: {connected:?}"
    );

    notify.keep_alives(&device).await;

    device.signal("TERM");
    notify.until("STOPPING=1", &device).await;
    assert_eq!(device.wait_exit(NOTIFICATION_TIMEOUT).await, Some(0));
}

impl NotifySocket {
    /// Datagrams until one carries a STATUS= containing `text`; returns it.
    async fn until_status_contains(&self, text: &str, process: &Process) -> String {
        loop {
            let message = self.next(text, process).await;
            if message
                .lines()
                .any(|line| line.starts_with("STATUS=") && line.contains(text))
            {
                return message;
            }
        }
    }
}

/// Runs a program to completion and returns its stdout; panics on failure.
fn run(program: &str, arguments: &[&str]) -> String {
    let output = std::process::Command::new(binary(program))
        .args(arguments)
        .output()
        .unwrap_or_else(|error| panic!("cannot run {program}: {error}"));
    assert!(
        output.status.success(),
        "{program} {arguments:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("utf-8 output")
}

/// Each program, how it is asked for completions and man pages, and words
/// its completions and pages must hold.
struct Program {
    name: &'static str,
    completions: &'static [&'static str],
    man: &'static [&'static str],
    words: &'static [&'static str],
}

const PROGRAMS: [Program; 4] = [
    Program {
        name: "relay",
        completions: &["completions"],
        man: &["man"],
        words: &["serve", "device", "policy", "--data-dir", "--listen"],
    },
    Program {
        name: "device-proxy",
        completions: &["--completions"],
        man: &["--man"],
        words: &["--allow", "--ca-cert", "--proxy"],
    },
    Program {
        name: "service-proxy",
        completions: &["--completions"],
        man: &["--man"],
        words: &["--map", "--stdio", "--bind"],
    },
    Program {
        name: "echo-sample",
        completions: &["completions"],
        man: &["man"],
        words: &["device", "service", "demo", "--ca-cert"],
    },
];

#[test]
fn every_program_writes_completions_for_bash_zsh_and_fish() {
    for program in &PROGRAMS {
        for shell in ["bash", "zsh", "fish"] {
            let mut arguments = program.completions.to_vec();
            arguments.push(shell);
            let script = run(program.name, &arguments);
            for word in program.words {
                // fish lists long flags without their dashes (`-l allow`).
                let word = match shell {
                    "fish" => word.trim_start_matches('-'),
                    _ => word,
                };
                assert!(
                    script.contains(word),
                    "{} {shell} completions lack {word}:\n{script}",
                    program.name
                );
            }
        }
    }
}

#[test]
fn an_unknown_shell_is_a_usage_error() {
    let output = std::process::Command::new(binary("relay"))
        .args(["completions", "tcsh"])
        .output()
        .expect("relay runs");
    assert_eq!(output.status.code(), Some(2));
    let output = std::process::Command::new(binary("device-proxy"))
        .args(["--completions", "tcsh"])
        .output()
        .expect("device-proxy runs");
    assert_eq!(output.status.code(), Some(2));
}

#[test]
fn every_program_writes_man_pages_with_its_flags() {
    let directory = tempfile::tempdir().expect("temp dir");
    for program in &PROGRAMS {
        let pages = directory.path().join(program.name);
        let mut arguments = program.man.to_vec();
        let pages_text = pages.to_string_lossy().to_string();
        arguments.push(&pages_text);
        let listed = run(program.name, &arguments);
        let top = pages.join(format!("{}.1", program.name));
        assert!(
            listed.lines().next() == Some(top.to_string_lossy().as_ref()),
            "{} did not name {} first:\n{listed}",
            program.name,
            top.display()
        );
        for path in listed.lines() {
            let page = std::fs::read_to_string(path)
                .unwrap_or_else(|error| panic!("{path} was named but cannot be read: {error}"));
            assert!(page.contains(".TH "), "{path} has no .TH line");
        }
        let page = std::fs::read_to_string(&top).expect("top page");
        assert!(
            page.contains(&format!(".TH {} 1", program.name)),
            "{}: {page}",
            top.display()
        );
        for word in program.words {
            // roff escapes every dash.
            let escaped = word.replace('-', "\\-");
            assert!(
                page.contains(&escaped),
                "{} lacks {word}:\n{page}",
                top.display()
            );
        }
    }
    // Subcommands get pages of their own.
    for page in [
        "relay/relay-serve.1",
        "relay/relay-device-add.1",
        "echo-sample/echo-sample-demo.1",
    ] {
        let text = std::fs::read_to_string(directory.path().join(page))
            .unwrap_or_else(|error| panic!("{page}: {error}"));
        assert!(text.contains(".TH "), "{page} has no .TH line");
    }
    let serve = std::fs::read_to_string(directory.path().join("relay/relay-serve.1"))
        .expect("relay-serve.1");
    assert!(
        serve.contains("\\-\\-mqtt\\-listen"),
        "relay-serve.1 lacks --mqtt-listen"
    );
}

#[test]
fn relay_man_without_a_directory_prints_the_top_page() {
    let page = run("relay", &["man"]);
    assert!(page.contains(".TH relay 1"), "{page}");
    assert!(page.contains("serve"), "{page}");
}

/// The environment a running process started with, as `NAME=value` lines.
fn environment_of(pid: u32) -> Vec<String> {
    let raw = std::fs::read(format!("/proc/{pid}/environ")).expect("/proc/PID/environ");
    raw.split(|byte| *byte == 0)
        .map(|entry| String::from_utf8_lossy(entry).into_owned())
        .collect()
}

/// Whether this machine is one where the programs restart themselves with
/// the copy tunable (framing::copy_tuning): x86-64 Linux, glibc, AMD.
fn copy_tuning_applies() -> bool {
    cfg!(all(
        target_os = "linux",
        target_arch = "x86_64",
        target_env = "gnu"
    )) && std::fs::read_to_string("/proc/cpuinfo").is_ok_and(|cpuinfo| {
        cpuinfo
            .lines()
            .find(|line| line.starts_with("vendor_id"))
            .is_some_and(|line| line.contains("AuthenticAMD"))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn programs_restart_with_the_copy_tunable_on_amd_unless_told_not_to() {
    const TUNABLE: &str = "GLIBC_TUNABLES=glibc.cpu.x86_rep_movsb_threshold=0x7fffffffffffffff";
    // As shipped: the relay serves, from a process that restarted itself
    // (same PID) with the tunable, on AMD; untouched elsewhere.
    let relay = Relay::start(&[]).await;
    let environment = environment_of(relay.process.pid());
    assert_eq!(
        environment.iter().any(|entry| entry == TUNABLE),
        copy_tuning_applies(),
        "tunable present exactly when it applies; environment: {environment:?}"
    );
    assert_eq!(
        environment
            .iter()
            .any(|entry| entry == "DEVSTREAMS_COPY_TUNED=1"),
        copy_tuning_applies()
    );
    // The operator's own setting of the tunable is kept as it is.
    let own = "glibc.cpu.x86_rep_movsb_threshold=4096";
    let relay_with_own = Relay::start_with_environment(&[], &[("GLIBC_TUNABLES", own)]).await;
    let environment = environment_of(relay_with_own.process.pid());
    assert!(
        environment
            .iter()
            .any(|entry| entry == &format!("GLIBC_TUNABLES={own}")),
        "{environment:?}"
    );
    assert!(!environment
        .iter()
        .any(|entry| entry.starts_with("DEVSTREAMS_COPY_TUNED")));
    // Asked for: the restart happens on any x86-64 glibc machine, so this
    // part holds whatever the processor of the machine running the test.
    if cfg!(all(
        target_os = "linux",
        target_arch = "x86_64",
        target_env = "gnu"
    )) {
        let relay_asked =
            Relay::start_with_environment(&[], &[("DEVSTREAMS_COPY_TUNING", "on")]).await;
        let environment = environment_of(relay_asked.process.pid());
        assert!(
            environment.iter().any(|entry| entry == TUNABLE)
                && environment
                    .iter()
                    .any(|entry| entry == "DEVSTREAMS_COPY_TUNED=1"),
            "{environment:?}"
        );
    }
    // Opted out: no restart at all.
    let relay_opted_out =
        Relay::start_with_environment(&[], &[("DEVSTREAMS_COPY_TUNING", "off")]).await;
    let environment = environment_of(relay_opted_out.process.pid());
    assert!(
        !environment
            .iter()
            .any(|entry| entry.starts_with("GLIBC_TUNABLES")
                || entry.starts_with("DEVSTREAMS_COPY_TUNED")),
        "{environment:?}"
    );
}
