//! The targets of issue 15 (performance, round two), 10 (the cluster) and
//! 11 (resumable sessions), each checked against this run's figures: met or
//! missed, and by how much. A target whose figures are missing (a peer not
//! installed, a workload not run) is "not measured", never met.

use super::table::{latency_of_setup, mebibytes, thousands};
use super::RunReport;
use crate::run::{micros, SystemReport};
use crate::systems::{Role, SystemKind};
use crate::workloads::bulk::Direction;

/// Issue 15's baseline (BENCHMARKS.md at commit 975d5e7, the run the issue
/// quotes), per role: relay, device-proxy, service-proxy.
const BASELINE_CPU_MS_PER_CREATION: [(Role, f64); 3] = [
    (Role::Server, 0.72),
    (Role::DeviceSide, 0.42),
    (Role::ServiceSide, 0.65),
];
const BASELINE_CPU_SECONDS_PER_GIGABYTE: [(Role, f64); 3] = [
    (Role::Server, 1.21),
    (Role::DeviceSide, 0.77),
    (Role::ServiceSide, 0.78),
];

/// One target, with its verdict.
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
    let direct = report.system(SystemKind::Direct);
    let mut verdicts = Vec::new();

    let parallel = report.plan.bulk_parallel_streams;
    let throughput = |system: Option<&SystemReport>, direction, streams| {
        system
            .and_then(|system| system.bulk(direction, streams))
            .map(|run| run.megabytes_per_second())
    };
    for (target, streams, factor) in [
        (
            "bulk, 1 stream, each direction ≥ 1.3× rathole over TLS",
            1,
            1.3,
        ),
        (
            "bulk, 8 streams, each direction ≥ 1.2× rathole over TLS",
            parallel,
            1.2,
        ),
    ] {
        let peer = rathole;
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
                throughput(devstreams, direction, streams),
                throughput(peer, direction, streams),
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

    for (target, p50) in [
        ("64-byte round trip, added p50 ≤ rathole's", true),
        ("64-byte round trip, added p99 ≤ rathole's", false),
    ] {
        let added = |system: Option<&SystemReport>| -> Option<f64> {
            let pick = |percentiles: &crate::statistics::Percentiles| {
                micros(if p50 {
                    percentiles.p50
                } else {
                    percentiles.p99
                })
            };
            Some(pick(system?.ping_pong.as_ref()?) - pick(direct?.ping_pong.as_ref()?))
        };
        verdicts.push(match (added(devstreams), added(rathole)) {
            (Some(ours), Some(theirs)) => TargetVerdict {
                target,
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
            _ => unmeasured(target),
        });
    }

    const SETUP_TARGET: &str = "set-up p50 ≤ rathole's";
    let setup = |system: Option<&SystemReport>, p50| system.and_then(|s| latency_of_setup(s, p50));
    verdicts.push(match (setup(devstreams, true), setup(rathole, true)) {
        (Some(ours), Some(theirs)) => TargetVerdict {
            target: SETUP_TARGET,
            measured: format!("{ours:.2} ms vs rathole {theirs:.2} ms"),
            met: Some(ours <= theirs),
            margin: format!(
                "{:.2} ms {}",
                (theirs - ours).abs(),
                if ours <= theirs { "to spare" } else { "over" }
            ),
        },
        _ => unmeasured(SETUP_TARGET),
    });
    const SPREAD_TARGET: &str = "set-up p99 ≤ 2× p50";
    verdicts.push(match (setup(devstreams, true), setup(devstreams, false)) {
        (Some(p50), Some(p99)) if p50 > 0.0 => TargetVerdict {
            target: SPREAD_TARGET,
            measured: format!("p99 {p99:.2} ms = {:.1}× p50 {p50:.2} ms", p99 / p50),
            met: Some(p99 <= 2.0 * p50),
            margin: format!(
                "{:.2} ms {}",
                (2.0 * p50 - p99).abs(),
                if p99 <= 2.0 * p50 { "to spare" } else { "over" }
            ),
        },
        _ => unmeasured(SPREAD_TARGET),
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

    verdicts.push(cpu_target(
        "CPU-ms per stream creation, each process, half of 975d5e7's or less",
        &BASELINE_CPU_MS_PER_CREATION,
        0.5,
        |role| {
            devstreams?
                .creations
                .as_ref()?
                .cpu_milliseconds_per_stream(role)
        },
    ));
    verdicts.push(cpu_target(
        "CPU-seconds per GB, each process, below 975d5e7's",
        &BASELINE_CPU_SECONDS_PER_GIGABYTE,
        1.0,
        |role| devstreams?.cpu_seconds_per_gigabyte(role),
    ));

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

/// The median of round-by-round ratios `on[n] / off[n]`: each pair was
/// measured seconds apart, so the machine's drift between rounds (which
/// moved a system's own rounds by 20 % and more on the bench's host)
/// cancels. `None` unless both have the same, non-zero number of rounds.
fn paired_ratio(on: &[f64], off: &[f64]) -> Option<f64> {
    if on.is_empty() || on.len() != off.len() || off.iter().any(|rate| *rate <= 0.0) {
        return None;
    }
    let mut ratios: Vec<f64> = on.iter().zip(off).map(|(on, off)| on / off).collect();
    ratios.sort_by(f64::total_cmp);
    let middle = ratios.len() / 2;
    Some(if ratios.len() % 2 == 1 {
        ratios[middle]
    } else {
        (ratios[middle - 1] + ratios[middle]) / 2.0
    })
}

/// Issue 11's target: resumable sessions cost at most 5 % of bulk
/// throughput, in every bulk run of the same bench run. Decided on the
/// median of paired rounds ([`paired_ratio`]); the ratio of the two
/// systems' median rounds is shown beside it, and decides only when the
/// rounds cannot be paired (a single round).
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
        let (Some(with), Some(without)) =
            (on.bulk(direction, streams), off.bulk(direction, streams))
        else {
            continue;
        };
        let (with_rate, without_rate) =
            (with.megabytes_per_second(), without.megabytes_per_second());
        if without_rate <= 0.0 {
            continue;
        }
        let of_medians = with_rate / without_rate;
        let name = format!("{streams}× {name}");
        let share = match paired_ratio(&with.round_rates, &without.round_rates) {
            Some(paired) => {
                parts.push(format!(
                    "{name}: {:.0} % paired ({} rounds; medians {with_rate:.0} vs {without_rate:.0} MB/s = {:.0} %)",
                    paired * 100.0,
                    with.round_rates.len(),
                    of_medians * 100.0
                ));
                paired
            }
            None => {
                parts.push(format!(
                    "{name}: {with_rate:.0} vs {without_rate:.0} MB/s = {:.0} %",
                    of_medians * 100.0
                ));
                of_medians
            }
        };
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
            "worst {:.0} %: {} {}",
            worst * 100.0,
            percentage_points((worst - 0.95) * 100.0),
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
                    "{} {}",
                    percentage_points((share - 0.7) * 100.0),
                    if share >= 0.7 { "to spare" } else { "short" }
                ),
            }
        }
        _ => unmeasured(RATE_TARGET),
    });
    verdicts
}

/// Each role's figure against `factor` times its baseline (strictly below
/// when the factor is 1: "lower than today").
fn cpu_target(
    target: &'static str,
    baseline: &[(Role, f64)],
    factor: f64,
    figure: impl Fn(Role) -> Option<f64>,
) -> TargetVerdict {
    let mut parts = Vec::new();
    let mut met = true;
    for &(role, before) in baseline {
        let Some(now) = figure(role) else {
            return unmeasured(target);
        };
        let bar = before * factor;
        let ok = if factor >= 1.0 { now < bar } else { now <= bar };
        met &= ok;
        let name = match role {
            Role::Server => "relay",
            Role::DeviceSide => "device-proxy",
            Role::ServiceSide => "service-proxy",
        };
        parts.push(format!("{name} {now:.2} (was {before:.2}, bar {bar:.2})"));
    }
    TargetVerdict {
        target,
        measured: parts.join("; "),
        met: Some(met),
        margin: String::new(),
    }
}

/// "1 point", "3 points": a difference of percentages, rounded.
fn percentage_points(difference: f64) -> String {
    let rounded = difference.abs().round();
    if rounded == 1.0 {
        "1 point".into()
    } else {
        format!("{rounded:.0} points")
    }
}

fn unmeasured(target: &'static str) -> TargetVerdict {
    TargetVerdict {
        target,
        measured: "not measured in this run".into(),
        met: None,
        margin: String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::{paired_ratio, percentage_points};

    #[test]
    fn one_point_is_singular() {
        assert_eq!(percentage_points(1.2), "1 point");
        assert_eq!(percentage_points(-0.6), "1 point");
        assert_eq!(percentage_points(3.4), "3 points");
        assert_eq!(percentage_points(0.2), "0 points");
    }

    #[test]
    fn paired_rounds_cancel_drift_that_medians_keep() {
        // The machine slows down round by round; each pair is 96 %.
        let off = [600.0, 500.0, 400.0, 300.0, 200.0];
        let on: Vec<f64> = off.iter().map(|rate| rate * 0.96).collect();
        let paired = paired_ratio(&on, &off).expect("pairs");
        assert!((paired - 0.96).abs() < 1e-9, "{paired}");
        // An even count takes the mean of the middle two.
        let paired = paired_ratio(&[90.0, 100.0, 110.0, 120.0], &[100.0; 4]).expect("pairs");
        assert!((paired - 1.05).abs() < 1e-9, "{paired}");
        assert_eq!(paired_ratio(&[1.0], &[1.0, 2.0]), None, "unequal rounds");
        assert_eq!(paired_ratio(&[], &[]), None);
        assert_eq!(paired_ratio(&[1.0], &[0.0]), None);
    }
}
