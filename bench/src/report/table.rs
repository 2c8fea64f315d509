//! The results table: one row per figure, one column per system, each
//! tunnel's figure followed by its ratio to direct TCP (and, for latencies,
//! the time it adds).

use std::fmt::Write as _;

use super::{RunReport, COLUMNS};
use crate::run::{micros, millis, SystemReport};
use crate::systems::{Role, SystemKind};
use crate::workloads::bulk::Direction;

pub(super) fn write_results_table(out: &mut String, report: &RunReport) {
    let present: Vec<SystemKind> = COLUMNS
        .iter()
        .copied()
        .filter(|kind| report.system(*kind).is_some())
        .collect();
    let _ = write!(out, "| measure |");
    for kind in &present {
        let _ = write!(out, " {} |", kind.label());
    }
    let _ = write!(out, "\n| --- |");
    for _ in &present {
        let _ = write!(out, " ---: |");
    }
    let _ = writeln!(out);
    let direct = report.system(SystemKind::Direct);
    let cores = report.machine.cores;
    let mut row = |name: String, cell: &dyn Fn(&SystemReport, Option<&SystemReport>) -> String| {
        let _ = write!(out, "| {name} |");
        for kind in &present {
            let text = report
                .system(*kind)
                .map(|system| cell(system, direct))
                .unwrap_or_default();
            let _ = write!(out, " {text} |");
        }
        let _ = writeln!(out);
    };

    let parallel = report.plan.bulk_parallel_streams;
    for (streams, direction) in [
        (1, Direction::Upload),
        (1, Direction::Download),
        (parallel, Direction::Upload),
        (parallel, Direction::Download),
    ] {
        let noun = if streams == 1 { "stream" } else { "streams" };
        let short = match direction {
            Direction::Upload => "upload",
            Direction::Download => "download",
        };
        row(
            format!("bulk, {streams} {noun}, {short} (MB/s)"),
            &|system, direct| {
                let value = system
                    .bulk(direction, streams)
                    .map(|run| run.megabytes_per_second());
                let baseline = direct
                    .and_then(|direct| direct.bulk(direction, streams))
                    .map(|run| run.megabytes_per_second());
                throughput_cell(system.kind, value, baseline)
            },
        );
    }
    for (name, pick) in [("p50", true), ("p99", false)] {
        row(
            format!("64-byte round trip {name} (µs)"),
            &|system, direct| {
                let value = system
                    .ping_pong
                    .map(|latency| micros(if pick { latency.p50 } else { latency.p99 }));
                let baseline = direct
                    .and_then(|direct| direct.ping_pong)
                    .map(|latency| micros(if pick { latency.p50 } else { latency.p99 }));
                latency_cell(system.kind, value, baseline, 0)
            },
        );
    }
    for (name, pick) in [("p50", true), ("p99", false)] {
        row(
            format!("set-up, connect → first echoed byte, {name} (ms)"),
            &|system, direct| {
                let value = latency_of_setup(system, pick);
                let baseline = direct.and_then(|direct| latency_of_setup(direct, pick));
                latency_cell(system.kind, value, baseline, 2)
            },
        );
    }
    row(
        "set-up connections (failed)".into(),
        &|system, _| match &system.setup {
            Some(setup) => format!("{} ({})", setup.attempted, setup.failures),
            None => "—".into(),
        },
    );
    row(
        "stream creations per second (failed)".into(),
        &|system, direct| match &system.creations {
            Some(created) => {
                let ratio = direct
                    .and_then(|direct| direct.creations.as_ref())
                    .filter(|_| system.kind != SystemKind::Direct)
                    .map(|direct| {
                        format!(
                            ", {:.2}×",
                            created.per_second() / direct.per_second().max(f64::EPSILON)
                        )
                    })
                    .unwrap_or_default();
                format!(
                    "{} ({}{ratio})",
                    thousands(created.per_second()),
                    created.failures
                )
            }
            None => "—".into(),
        },
    );
    for role in Role::ALL {
        row(
            format!("CPU-ms per stream creation, {}", role_phrase(role)),
            &|system, _| match system
                .creations
                .as_ref()
                .and_then(|created| created.cpu_milliseconds_per_stream(role))
            {
                Some(milliseconds) => format!("{milliseconds:.2}"),
                None => "—".into(),
            },
        );
    }
    row(
        format!("idle streams held of {} (failed)", report.plan.idle_streams),
        &|system, _| match &system.idle_streams {
            Some(held) => format!("{} ({})", held.opened, held.failures),
            None => "—".into(),
        },
    );
    row(
        "idle streams: all ended after the close within (s)".into(),
        &|system, _| match &system.idle_streams {
            Some(held) => match held.close_duration {
                Some(duration) => format!("{:.1}", duration.as_secs_f64()),
                None => "not within 30".into(),
            },
            None => "—".into(),
        },
    );
    for role in Role::ALL {
        row(
            format!("RSS per idle stream, {} (KiB)", role_phrase(role)),
            &|system, _| {
                let Some(held) = &system.idle_streams else {
                    return "—".into();
                };
                match held.memory(role) {
                    Some(memory) => format!("{:.1}", memory.kibibytes_per_stream(held.opened)),
                    None => "—".into(),
                }
            },
        );
    }
    for role in Role::ALL {
        row(
            format!(
                "CPU while the streams sit idle, {} (% of one core)",
                role_phrase(role)
            ),
            &|system, _| match system
                .idle_streams
                .as_ref()
                .and_then(|held| held.core_share_while_held(role))
            {
                Some(share) => format!("{:.1}", share * 100.0),
                None => "—".into(),
            },
        );
    }
    row(
        "server RSS before → held → after close (MiB)".into(),
        &|system, _| {
            let Some(memory) = system
                .idle_streams
                .as_ref()
                .and_then(|held| held.memory(Role::Server))
            else {
                return "—".into();
            };
            format!(
                "{:.1} → {:.1} → {:.1}",
                mebibytes(memory.before_kibibytes),
                mebibytes(memory.held_kibibytes),
                mebibytes(memory.after_kibibytes)
            )
        },
    );
    for role in Role::ALL {
        row(
            format!("idle RSS, {} (MiB; anonymous part)", role_phrase(role)),
            &|system, _| match (system.idle_rss(role), system.idle_anonymous(role)) {
                (Some(total), Some(anonymous)) => {
                    format!("{:.1} ({:.1})", mebibytes(total), mebibytes(anonymous))
                }
                (Some(total), None) => format!("{:.1}", mebibytes(total)),
                _ => "—".into(),
            },
        );
    }
    for role in Role::ALL {
        row(
            format!("CPU-seconds per GB, {}", role_phrase(role)),
            &|system, _| match system.cpu_seconds_per_gigabyte(role) {
                Some(seconds) => format!("{seconds:.2}"),
                None => "—".into(),
            },
        );
    }
    row(
        format!(
            "relay restart → data flowing again, p50 / p90 (ms; failed of {})",
            report.plan.relay_restarts
        ),
        &|system, _| {
            let Some(recovered) = &system.restart_recovery else {
                return "—".into();
            };
            match (recovered.percentile(50.0), recovered.percentile(90.0)) {
                (Some(p50), Some(p90)) => format!(
                    "{:.0} / {:.0} ({} of {})",
                    millis(p50),
                    millis(p90),
                    recovered.failures,
                    recovered.attempted
                ),
                _ => format!(
                    "none recovered ({} of {})",
                    recovered.failures, recovered.attempted
                ),
            }
        },
    );
    row(
        "other processes' share of the machine's CPU meanwhile (%)".into(),
        &|system, _| match system.foreign_load.share(cores) {
            Some(share) => format!("{:.0}", share * 100.0),
            None => "—".into(),
        },
    );
}

fn role_phrase(role: Role) -> &'static str {
    match role {
        Role::Server => "server (relay / peer server)",
        Role::DeviceSide => "device side (device-proxy / peer client)",
        Role::ServiceSide => "service side (service-proxy)",
    }
}

pub(super) fn latency_of_setup(system: &SystemReport, p50: bool) -> Option<f64> {
    let latency = system.setup.as_ref()?.latency?;
    Some(millis(if p50 { latency.p50 } else { latency.p99 }))
}

fn throughput_cell(kind: SystemKind, value: Option<f64>, direct: Option<f64>) -> String {
    let Some(value) = value else {
        return "—".into();
    };
    match direct {
        Some(direct) if kind != SystemKind::Direct && direct > 0.0 => {
            format!("{value:.0} ({:.2}×)", value / direct)
        }
        _ => format!("{value:.0}"),
    }
}

fn latency_cell(
    kind: SystemKind,
    value: Option<f64>,
    direct: Option<f64>,
    decimals: usize,
) -> String {
    let Some(value) = value else {
        return "—".into();
    };
    match direct {
        Some(direct) if kind != SystemKind::Direct && direct > 0.0 => {
            format!(
                "{value:.decimals$} ({:.1}×, {:+.decimals$})",
                value / direct,
                value - direct
            )
        }
        _ => format!("{value:.decimals$}"),
    }
}

pub(super) fn mebibytes(kibibytes: u64) -> f64 {
    kibibytes as f64 / 1024.0
}

/// 12345.6 → "12,346".
pub fn thousands(value: f64) -> String {
    let digits = format!("{:.0}", value.max(0.0));
    let mut grouped = String::new();
    for (index, digit) in digits.chars().enumerate() {
        if index > 0 && (digits.len() - index) % 3 == 0 {
            grouped.push(',');
        }
        grouped.push(digit);
    }
    grouped
}

/// Each target of issue 6 against this run's figures.
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_are_grouped() {
        assert_eq!(thousands(0.0), "0");
        assert_eq!(thousands(999.4), "999");
        assert_eq!(thousands(2450.0), "2,450");
        assert_eq!(thousands(1234567.0), "1,234,567");
    }

    #[test]
    fn latency_cells_show_ratio_and_added_time() {
        assert_eq!(
            latency_cell(SystemKind::Devstreams, Some(150.0), Some(50.0), 0),
            "150 (3.0×, +100)"
        );
        assert_eq!(
            latency_cell(SystemKind::Direct, Some(50.0), Some(50.0), 0),
            "50"
        );
        assert_eq!(
            throughput_cell(SystemKind::Bore, Some(500.0), Some(2000.0)),
            "500 (0.25×)"
        );
    }
}
