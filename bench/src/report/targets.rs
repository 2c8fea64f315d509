//! The targets of issues 6, 10 (the cluster) and 11 (resumable sessions), each checked against this run's figures: met or
//! missed, and by how much. A target whose figures are missing (a peer not
//! installed, a workload not run) is "not measured", never met.

use super::table::{latency_of_setup, mebibytes, thousands};
use super::RunReport;
use crate::run::{micros, SystemReport};
use crate::systems::{Role, SystemKind};
use crate::workloads::bulk::Direction;

/// The targets of issue 6, each with its verdict.
pub struct TargetVerdict {
    pub target: &'static str,
    pub measured: String,
    /// None when it could not be measured in this run.
    pub met: Option<bool>,
    pub margin: String,
}

pub fn targets(report: &RunReport) -> Vec<TargetVerdict> {
    let devstreams = report.system(SystemKind::Devstreams);
    let rathole = report.system(SystemKind::Rathole);
    let bore = report.system(SystemKind::Bore);
    let direct = report.system(SystemKind::Direct);
    let mut verdicts = Vec::new();

    let single_stream = |system: Option<&SystemReport>, direction| {
        system
            .and_then(|system| system.bulk(direction, 1))
            .map(|run| run.megabytes_per_second())
    };
    for (target, peer, factor) in [
        ("bulk, 1 stream, ≥ 1.5× rathole over TLS", rathole, 1.5),
        ("bulk, 1 stream, not below bore", bore, 1.0),
    ] {
        let mut parts = Vec::new();
        let mut margins = Vec::new();
        let mut met = Some(true);
        for direction in [Direction::Upload, Direction::Download] {
            let name = if direction == Direction::Upload {
                "upload"
            } else {
                "download"
            };
            match (
                single_stream(devstreams, direction),
                single_stream(peer, direction),
            ) {
                (Some(ours), Some(theirs)) if theirs > 0.0 => {
                    let ratio = ours / theirs;
                    parts.push(format!(
                        "{name} {ours:.0} vs {theirs:.0} MB/s = {ratio:.2}×"
                    ));
                    let needed = factor * theirs;
                    if ours >= needed {
                        margins.push(format!(
                            "{name}: {:+.0}% above the bar",
                            (ours / needed - 1.0) * 100.0
                        ));
                    } else {
                        met = Some(false);
                        margins.push(format!(
                            "{name}: needs {:.0} MB/s, {:.0}% short",
                            needed,
                            (1.0 - ours / needed) * 100.0
                        ));
                    }
                }
                _ => met = None,
            }
        }
        if met.is_none() {
            parts = vec!["peer not measured in this run".into()];
            margins.clear();
        }
        verdicts.push(TargetVerdict {
            target,
            measured: parts.join("; "),
            met,
            margin: margins.join("; "),
        });
    }

    let added_p50 = |system: Option<&SystemReport>| -> Option<f64> {
        Some(micros(system?.ping_pong?.p50) - micros(direct?.ping_pong?.p50))
    };
    verdicts.push(match (added_p50(devstreams), added_p50(rathole)) {
        (Some(ours), Some(theirs)) => TargetVerdict {
            target: "64-byte round trip, added p50 ≤ rathole's",
            measured: format!("+{ours:.0} µs vs rathole +{theirs:.0} µs"),
            met: Some(ours <= theirs),
            margin: if ours <= theirs {
                format!("{:.0} µs better", theirs - ours)
            } else {
                format!(
                    "{:.0} µs ({:.1}×) worse",
                    ours - theirs,
                    ours / theirs.max(f64::EPSILON)
                )
            },
        },
        _ => unmeasured("64-byte round trip, added p50 ≤ rathole's"),
    });

    let setup_p50 = devstreams.and_then(|system| latency_of_setup(system, true));
    verdicts.push(match setup_p50 {
        Some(p50) => TargetVerdict {
            target: "set-up p50 ≤ 2 ms",
            measured: format!("{p50:.2} ms"),
            met: Some(p50 <= 2.0),
            margin: format!(
                "{:.2} ms {}",
                (2.0 - p50).abs(),
                if p50 <= 2.0 { "to spare" } else { "over" }
            ),
        },
        None => unmeasured("set-up p50 ≤ 2 ms"),
    });

    verdicts.push(
        match devstreams.and_then(|system| system.creations.as_ref()) {
            Some(created) => {
                let rate = created.per_second();
                let met = rate >= 2000.0 && created.failures == 0;
                TargetVerdict {
                    target: "≥ 2,000 stream creations/s sustained, 0 failures",
                    measured: format!("{}/s, {} failed", thousands(rate), created.failures),
                    met: Some(met),
                    margin: if rate >= 2000.0 {
                        format!(
                            "{:+.0}% on rate{}",
                            (rate / 2000.0 - 1.0) * 100.0,
                            if created.failures > 0 {
                                "; failures > 0"
                            } else {
                                ""
                            }
                        )
                    } else {
                        format!("{:.0}% short", (1.0 - rate / 2000.0) * 100.0)
                    },
                }
            }
            None => unmeasured("≥ 2,000 stream creations/s sustained, 0 failures"),
        },
    );

    // When the machine's open-file limit caps the count, holding every
    // stream that fits is what can be asked of the relay here.
    let wanted_streams = match &report.plan.idle_streams_cap {
        Some(_) => report.plan.idle_streams.min(10_000),
        None => 10_000,
    };
    verdicts.push(
        match devstreams.and_then(|system| system.idle_streams.as_ref()) {
            Some(held) => match held.memory(Role::Server) {
                Some(memory) => {
                    let per_stream = memory.kibibytes_per_stream(held.opened);
                    let all_held = held.opened >= wanted_streams && held.failures == 0;
                    TargetVerdict {
                        target: "10,000 idle streams at ≤ 32 KiB relay RSS per stream",
                        measured: format!("{} held, {per_stream:.1} KiB per stream", held.opened),
                        met: Some(all_held && per_stream <= 32.0),
                        margin: format!(
                            "{}{}",
                            if per_stream <= 32.0 {
                                format!("{:.1} KiB to spare", 32.0 - per_stream)
                            } else {
                                format!(
                                    "{:.1} KiB ({:.0}%) over",
                                    per_stream - 32.0,
                                    (per_stream / 32.0 - 1.0) * 100.0
                                )
                            },
                            match (all_held, &report.plan.idle_streams_cap) {
                                (true, None) => String::new(),
                                (true, Some(_)) => format!(
                                    "; {} held, not 10,000: the most this machine's open-file limit allows",
                                    held.opened
                                ),
                                (false, _) => {
                                    format!("; only {} of {wanted_streams} held", held.opened)
                                }
                            }
                        ),
                    }
                }
                None => unmeasured("10,000 idle streams at ≤ 32 KiB relay RSS per stream"),
            },
            None => unmeasured("10,000 idle streams at ≤ 32 KiB relay RSS per stream"),
        },
    );

    verdicts.push(
        match devstreams.and_then(|system| system.idle_rss(Role::DeviceSide)) {
            Some(kibibytes) => {
                let mebibytes = mebibytes(kibibytes);
                TargetVerdict {
                    target: "device-proxy idle RSS ≤ 4 MiB",
                    measured: format!("{mebibytes:.1} MiB"),
                    met: Some(mebibytes <= 4.0),
                    margin: format!(
                        "{:.1} MiB {}",
                        (4.0 - mebibytes).abs(),
                        if mebibytes <= 4.0 { "to spare" } else { "over" }
                    ),
                }
            }
            None => unmeasured("device-proxy idle RSS ≤ 4 MiB"),
        },
    );
    verdicts.extend(cluster_targets(report));
    verdicts.push(resume_cost_target(report));
    verdicts
}

/// Issue 11's target: resumable sessions cost at most 5 % of bulk
/// throughput, in every bulk run of the same bench run.
fn resume_cost_target(report: &RunReport) -> TargetVerdict {
    const TARGET: &str = "bulk, resume on within 5 % of resume off";
    let (Some(on), Some(off)) = (
        report.system(SystemKind::Devstreams),
        report.system(SystemKind::DevstreamsNoResume),
    ) else {
        return unmeasured(TARGET);
    };
    let parallel = report.plan.bulk_parallel_streams;
    let mut parts = Vec::new();
    let mut worst: Option<f64> = None;
    for (streams, direction, name) in [
        (1, Direction::Upload, "up"),
        (1, Direction::Download, "down"),
        (parallel, Direction::Upload, "up"),
        (parallel, Direction::Download, "down"),
    ] {
        let (Some(with), Some(without)) = (
            on.bulk(direction, streams)
                .map(|run| run.megabytes_per_second()),
            off.bulk(direction, streams)
                .map(|run| run.megabytes_per_second()),
        ) else {
            continue;
        };
        if without <= 0.0 {
            continue;
        }
        let share = with / without;
        let name = format!("{streams}× {name}");
        parts.push(format!(
            "{name}: {with:.0} vs {without:.0} MB/s = {:.0} %",
            share * 100.0
        ));
        worst = Some(worst.map_or(share, |worst: f64| worst.min(share)));
    }
    let Some(worst) = worst else {
        return unmeasured(TARGET);
    };
    TargetVerdict {
        target: TARGET,
        measured: parts.join("; "),
        met: Some(worst >= 0.95),
        margin: format!(
            "worst {:.0} %: {:.0} points {}",
            worst * 100.0,
            ((worst - 0.95) * 100.0).abs(),
            if worst >= 0.95 { "to spare" } else { "short" }
        ),
    }
}

/// Issue 10's targets for the 3-node cluster, each against the single
/// relay of the same run: set-up p50 at most 0.5 ms more, creation rate at
/// least 70 % of the single relay's.
fn cluster_targets(report: &RunReport) -> Vec<TargetVerdict> {
    let single = report.system(SystemKind::Devstreams);
    let cluster = report.system(SystemKind::DevstreamsCluster);
    let mut verdicts = Vec::new();
    const SETUP_TARGET: &str = "cluster: set-up p50 ≤ single relay + 0.5 ms (REST on another node)";
    let setup = |system: Option<&SystemReport>| system.and_then(|s| latency_of_setup(s, true));
    verdicts.push(match (setup(cluster), setup(single)) {
        (Some(ours), Some(base)) => {
            let added = ours - base;
            TargetVerdict {
                target: SETUP_TARGET,
                measured: format!("{ours:.2} ms vs {base:.2} ms = +{added:.2} ms"),
                met: Some(added <= 0.5),
                margin: format!(
                    "{:.2} ms {}",
                    (0.5 - added).abs(),
                    if added <= 0.5 { "to spare" } else { "over" }
                ),
            }
        }
        _ => unmeasured(SETUP_TARGET),
    });
    const RATE_TARGET: &str = "cluster: ≥ 70 % of the single relay's creations/s";
    let rate = |system: Option<&SystemReport>| {
        system
            .and_then(|s| s.creations.as_ref())
            .map(|c| c.per_second())
    };
    verdicts.push(match (rate(cluster), rate(single)) {
        (Some(ours), Some(base)) if base > 0.0 => {
            let share = ours / base;
            TargetVerdict {
                target: RATE_TARGET,
                measured: format!(
                    "{}/s vs {}/s = {:.0} %",
                    thousands(ours),
                    thousands(base),
                    share * 100.0
                ),
                met: Some(share >= 0.7),
                margin: format!(
                    "{:.0} points {}",
                    ((share - 0.7) * 100.0).abs(),
                    if share >= 0.7 { "to spare" } else { "short" }
                ),
            }
        }
        _ => unmeasured(RATE_TARGET),
    });
    verdicts
}

fn unmeasured(target: &'static str) -> TargetVerdict {
    TargetVerdict {
        target,
        measured: "not measured in this run".into(),
        met: None,
        margin: String::new(),
    }
}
