//! Keeps glibc's `memcpy` off `rep movsb` on AMD processors, by starting
//! the program once more with a glibc tunable set.
//!
//! Why: every byte a proxy or the relay receives is copied twice in user
//! space (rustls hands the decrypted record over, the WebSocket reader
//! takes it), and glibc copies anything above about 2 KiB with
//! `rep movsb`. On the bench's host (AMD EPYC, glibc 2.36) those copies
//! cost either as much as the AES work or four times as much, depending on
//! where a process's buffers happen to lie, and a process keeps its draw
//! for its whole life: one in two device-proxies receiving an upload spent
//! 1.1–1.6 CPU-s/GB instead of 0.6–0.8 and moved 10–25 % less
//! (BENCHMARKS.md, night of 2026-12-04). With
//! `glibc.cpu.x86_rep_movsb_threshold` raised past any copy, glibc uses its
//! vector loop instead, and no process fell into the slow mode again.
//!
//! Tunables are read only when a program starts, so [`restart_if_needed`]
//! starts the same executable again in the same process (same PID, same
//! arguments, same descriptors) with the tunable added to
//! `GLIBC_TUNABLES`. It does so only on x86-64 Linux with glibc, on an AMD
//! processor, when the operator has not set that tunable already, and
//! never twice (a marker variable, since glibc ignores tunables in
//! privileged programs). Setting `DEVSTREAMS_COPY_TUNING=off` keeps the
//! process as started; `on` restarts on any processor (for another vendor
//! showing the same, and so that a test can exercise the restart anywhere). Nothing here can stop the program: when the restart
//! fails, it runs as it was started.

/// The environment variable that turns the restart off (`off`), or on
/// whatever the processor (`on`).
pub const SWITCH_VARIABLE: &str = "DEVSTREAMS_COPY_TUNING";
/// Set in the restarted process, so that it never restarts again.
pub const MARKER_VARIABLE: &str = "DEVSTREAMS_COPY_TUNED";
/// glibc's variable holding tunables, `name=value` pairs joined by `:`.
const TUNABLES_VARIABLE: &str = "GLIBC_TUNABLES";
/// The tunable: copies at least this large use `rep movsb`.
const THRESHOLD_TUNABLE: &str = "glibc.cpu.x86_rep_movsb_threshold";
/// Larger than any copy a process makes.
const NEVER: &str = "0x7fffffffffffffff";

/// What the process's environment says about the restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Circumstances<'a> {
    /// `GLIBC_TUNABLES`, when set and valid UTF-8.
    tunables: Option<&'a str>,
    /// Whether [`SWITCH_VARIABLE`] is `off`.
    opted_out: bool,
    /// Whether [`MARKER_VARIABLE`] is set (this is the restarted process).
    restarted: bool,
    /// Whether the processor is AMD's, or [`SWITCH_VARIABLE`] is `on`.
    amd: bool,
}

/// The `GLIBC_TUNABLES` value to restart with, or `None` to run as is.
fn tuned_tunables(circumstances: Circumstances<'_>) -> Option<String> {
    if circumstances.opted_out || circumstances.restarted || !circumstances.amd {
        return None;
    }
    let ours = format!("{THRESHOLD_TUNABLE}={NEVER}");
    match circumstances.tunables.map(str::trim) {
        None | Some("") => Some(ours),
        Some(existing) => {
            let already_set = existing
                .split(':')
                .any(|pair| pair.split('=').next() == Some(THRESHOLD_TUNABLE));
            (!already_set).then(|| format!("{existing}:{ours}"))
        }
    }
}

/// Whether `/proc/cpuinfo` names AMD as the processor's vendor.
#[cfg(all(target_os = "linux", target_arch = "x86_64", target_env = "gnu"))]
fn processor_is_amd() -> bool {
    std::fs::read_to_string("/proc/cpuinfo").is_ok_and(|cpuinfo| {
        cpuinfo
            .lines()
            .find(|line| line.starts_with("vendor_id"))
            .is_some_and(|line| line.contains("AuthenticAMD"))
    })
}

/// Starts this executable again with the copy tunable, when it helps and
/// has not been done; returns (and the program goes on as started) when
/// not, or when the restart fails. Call it first thing in `main`, before
/// any thread or file is opened.
pub fn restart_if_needed() {
    #[cfg(all(target_os = "linux", target_arch = "x86_64", target_env = "gnu"))]
    restart_on_linux();
}

#[cfg(all(target_os = "linux", target_arch = "x86_64", target_env = "gnu"))]
fn restart_on_linux() {
    use std::os::unix::process::CommandExt;

    // A non-UTF-8 GLIBC_TUNABLES is the operator's business: leave it.
    let Ok(tunables) = std::env::var(TUNABLES_VARIABLE)
        .map(Some)
        .or_else(|error| match error {
            std::env::VarError::NotPresent => Ok(None),
            std::env::VarError::NotUnicode(_) => Err(()),
        })
    else {
        return;
    };
    let switch = std::env::var(SWITCH_VARIABLE).unwrap_or_default();
    let opted_out = switch == "off";
    let restarted = std::env::var_os(MARKER_VARIABLE).is_some();
    if opted_out || restarted {
        return;
    }
    let Some(value) = tuned_tunables(Circumstances {
        tunables: tunables.as_deref(),
        opted_out,
        restarted,
        amd: switch == "on" || processor_is_amd(),
    }) else {
        return;
    };
    // The executable's own path (not /proc/self/exe, which would name the
    // process "exe"); gone when the binary was replaced since it started.
    let Ok(executable) = std::env::current_exe() else {
        return;
    };
    if !executable.exists() {
        return;
    }
    let mut arguments = std::env::args_os();
    let Some(program_name) = arguments.next() else {
        return;
    };
    // Only returns when the exec failed; the program then runs as started.
    let _failed = std::process::Command::new(executable)
        .arg0(program_name)
        .args(arguments)
        .env(TUNABLES_VARIABLE, value)
        .env(MARKER_VARIABLE, "1")
        .exec();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn amd() -> Circumstances<'static> {
        Circumstances {
            tunables: None,
            opted_out: false,
            restarted: false,
            amd: true,
        }
    }

    #[test]
    fn an_amd_processor_gets_the_tunable_added_to_what_is_set() {
        assert_eq!(
            tuned_tunables(amd()).as_deref(),
            Some("glibc.cpu.x86_rep_movsb_threshold=0x7fffffffffffffff")
        );
        let with_other = Circumstances {
            tunables: Some("glibc.malloc.hugetlb=1"),
            ..amd()
        };
        assert_eq!(
            tuned_tunables(with_other).as_deref(),
            Some("glibc.malloc.hugetlb=1:glibc.cpu.x86_rep_movsb_threshold=0x7fffffffffffffff")
        );
    }

    #[test]
    fn nothing_changes_when_set_already_opted_out_restarted_or_not_amd() {
        let set_by_operator = Circumstances {
            tunables: Some("glibc.malloc.hugetlb=1:glibc.cpu.x86_rep_movsb_threshold=4096"),
            ..amd()
        };
        assert_eq!(tuned_tunables(set_by_operator), None);
        let opted_out = Circumstances {
            opted_out: true,
            ..amd()
        };
        assert_eq!(tuned_tunables(opted_out), None);
        let restarted = Circumstances {
            restarted: true,
            ..amd()
        };
        assert_eq!(tuned_tunables(restarted), None);
        let intel = Circumstances {
            amd: false,
            ..amd()
        };
        assert_eq!(tuned_tunables(intel), None);
    }
}
