//! The run: every measurement, one after the other, each across all systems,
//! collected into one [`SystemReport`] per system.
//!
//! The order is measurement by measurement, not system by system, so that
//! the figures of different systems are taken minutes apart at most, and the
//! latency measurements take turns between systems: whatever happens on the
//! machine meanwhile (a neighbour's job, idle CPUs going to sleep) falls on
//! all of them alike. The light measurements (latency, set-up) come first,
//! bulk next, and the idle streams, which leave the most state behind, last.
//! Other processes' CPU use is metered over each system's measurements.
//!
//! A measurement that fails is recorded as an error with its reason and the
//! run goes on: one broken figure should not cost the other thirty.

use std::time::Duration;

use crate::machine_load::{CpuAccount, ForeignLoad};

use crate::plan::{Plan, Workload};
use crate::process_stats::{anonymous_kibibytes, resident_kibibytes};
use crate::statistics::Percentiles;
use crate::systems::{Programs, Role, System, SystemKind};
use crate::target::TargetServer;
use crate::workloads::bulk::{self, BulkRun, Direction};
use crate::workloads::creations::{self, CreationResult};
use crate::workloads::idle::{self, IdleResult};
use crate::workloads::ping_pong;
use crate::workloads::restart::{self, RestartResult};
use crate::workloads::setup::{self, SetupResult};

#[derive(Debug, Clone)]
pub struct SystemReport {
    pub kind: SystemKind,
    /// Program name of each role (e.g. Server → "relay").
    pub process_names: Vec<(Role, String)>,
    /// RSS right after start-up and one stream, before any load.
    pub idle_rss_kibibytes: Vec<(Role, u64)>,
    /// The anonymous part of that RSS (heap and stacks, not binary pages).
    pub idle_anonymous_kibibytes: Vec<(Role, u64)>,
    pub bulk: Vec<BulkRun>,
    pub ping_pong: Option<Percentiles>,
    pub setup: Option<SetupResult>,
    pub creations: Option<CreationResult>,
    pub idle_streams: Option<IdleResult>,
    /// Relay restarts under one resumed stream (devstreams with resume on).
    pub restart_recovery: Option<RestartResult>,
    /// What went wrong, in words, for the report.
    pub errors: Vec<String>,
    /// CPU other processes used while this system was measured; see
    /// [`crate::machine_load`].
    pub foreign_load: ForeignLoad,
}

impl SystemReport {
    pub fn bulk(&self, direction: Direction, streams: usize) -> Option<&BulkRun> {
        self.bulk
            .iter()
            .find(|run| run.direction == direction && run.streams == streams)
    }

    pub fn process_name(&self, role: Role) -> Option<&str> {
        self.process_names
            .iter()
            .find(|(candidate, _)| *candidate == role)
            .map(|(_, name)| name.as_str())
    }

    pub fn idle_rss(&self, role: Role) -> Option<u64> {
        self.idle_rss_kibibytes
            .iter()
            .find(|(candidate, _)| *candidate == role)
            .map(|(_, kibibytes)| *kibibytes)
    }

    pub fn idle_anonymous(&self, role: Role) -> Option<u64> {
        self.idle_anonymous_kibibytes
            .iter()
            .find(|(candidate, _)| *candidate == role)
            .map(|(_, kibibytes)| *kibibytes)
    }

    /// CPU-seconds one role's process used per 10^9 bytes moved, over all
    /// bulk windows together.
    pub fn cpu_seconds_per_gigabyte(&self, role: Role) -> Option<f64> {
        let mut cpu = Duration::ZERO;
        let mut bytes = 0u64;
        for run in &self.bulk {
            cpu += run.cpu.iter().find(|(candidate, _)| *candidate == role)?.1;
            bytes += run.bytes;
        }
        (bytes > 0).then(|| cpu.as_secs_f64() / (bytes as f64 / 1e9))
    }
}

/// Runs every measurement the plan asks for against the started systems;
/// one report per system, in the same order. The restart-recovery
/// measurement comes last: it replaces the relay of the systems it runs on.
pub async fn measure_all(
    systems: &mut [System],
    target: &TargetServer,
    plan: &Plan,
    programs: &Programs,
) -> Vec<SystemReport> {
    let mut reports: Vec<SystemReport> = systems.iter().map(start_report).collect();
    let mut meter = LoadMeter::new(systems);
    let entries: Vec<_> = systems.iter().map(|system| system.entry).collect();

    if plan.includes(Workload::PingPong) {
        let before = meter.reading();
        let results = ping_pong::run(
            &entries,
            plan.ping_pong_round_trips,
            plan.ping_pong_time_limit,
        )
        .await;
        meter.charge_all(before, &mut reports);
        for ((system, report), result) in systems.iter().zip(&mut reports).zip(results) {
            record_ping_pong(system, report, result);
        }
    }
    if plan.includes(Workload::Setup) {
        let before = meter.reading();
        let results = setup::run(&entries, plan.setup_connections, plan.setup_time_limit).await;
        meter.charge_all(before, &mut reports);
        for ((system, report), result) in systems.iter().zip(&mut reports).zip(results) {
            record_setup(system, report, result);
        }
    }
    if plan.includes(Workload::Bulk) {
        for streams in [1, plan.bulk_parallel_streams] {
            for direction in [Direction::Upload, Direction::Download] {
                let mut rounds: Vec<Vec<BulkRun>> = systems.iter().map(|_| Vec::new()).collect();
                for round in 0..plan.bulk_rounds.max(1) {
                    // Each round starts with the next system, so that no
                    // system always runs first (after the pause) or right
                    // after the same neighbour.
                    for index in turn_order(systems.len(), round) {
                        if plan.bulk_fresh_processes {
                            match systems[index]
                                .replace_processes(programs, target.address)
                                .await
                            {
                                Ok(()) => print_processes(&systems[index]),
                                // The old processes go on serving the round
                                // (bore's were stopped first: its round fails).
                                Err(error) => reports[index].errors.push(format!(
                                    "bulk: could not start fresh processes for a round: {error:#}"
                                )),
                            }
                            meter = LoadMeter::new(systems);
                        }
                        let (system, report, runs) =
                            (&systems[index], &mut reports[index], &mut rounds[index]);
                        tokio::time::sleep(plan.pause_between_runs).await;
                        let before = meter.reading();
                        let run = bulk::run(
                            system,
                            target,
                            direction,
                            streams,
                            plan.bulk_warm_up,
                            plan.bulk_window,
                        )
                        .await;
                        meter.charge(before, report);
                        print_round(system, &run);
                        runs.push(run);
                    }
                }
                for ((system, report), runs) in systems.iter().zip(&mut reports).zip(rounds) {
                    if let Some(run) = median_run(runs) {
                        record_bulk(system, report, run);
                    }
                }
            }
        }
    }
    if plan.includes(Workload::Creations) {
        for (system, report) in systems.iter().zip(&mut reports) {
            tokio::time::sleep(plan.pause_between_runs).await;
            let before = meter.reading();
            let created =
                creations::run(system, plan.creation_concurrency, plan.creation_duration).await;
            meter.charge(before, report);
            record_creations(system, report, created);
        }
    }
    if plan.includes(Workload::Idle) && plan.idle_streams > 0 {
        for (system, report) in systems.iter().zip(&mut reports) {
            if system.kind == SystemKind::Direct {
                continue;
            }
            tokio::time::sleep(plan.pause_between_runs).await;
            let before = meter.reading();
            let held = idle::run(
                system,
                target,
                plan.idle_streams,
                plan.idle_concurrency,
                plan.idle_open_time_limit,
                plan.idle_cpu_window,
            )
            .await;
            meter.charge(before, report);
            record_idle(system, report, held);
        }
    }
    if plan.includes(Workload::RestartRecovery) {
        for (system, report) in systems.iter_mut().zip(&mut reports) {
            // Without resumable sessions no stream survives a restart.
            if system.kind != SystemKind::Devstreams || !system.can_restart_relay() {
                continue;
            }
            tokio::time::sleep(plan.pause_between_runs).await;
            let before = meter.reading();
            let recovered =
                restart::run(system, plan.relay_restarts, plan.restart_wait_limit).await;
            meter.charge(before, report);
            record_restart_recovery(system, report, recovered);
        }
    }
    reports
}

/// Meters other processes' CPU over a measurement, counting every live
/// child of every system as ours.
struct LoadMeter {
    children: Vec<u32>,
}

impl LoadMeter {
    fn new(systems: &[System]) -> LoadMeter {
        LoadMeter {
            children: systems
                .iter()
                .flat_map(|system| system.processes.iter().map(|process| process.pid))
                .collect(),
        }
    }

    fn reading(&self) -> Option<CpuAccount> {
        CpuAccount::now(&self.children)
    }

    fn charge(&self, before: Option<CpuAccount>, report: &mut SystemReport) {
        if let (Some(before), Some(after)) = (before, self.reading()) {
            report.foreign_load.add(after.foreign_since(&before));
        }
    }

    /// A measurement all systems took turns in is charged to each.
    fn charge_all(&self, before: Option<CpuAccount>, reports: &mut [SystemReport]) {
        if let (Some(before), Some(after)) = (before, self.reading()) {
            for report in reports {
                report.foreign_load.add(after.foreign_since(&before));
            }
        }
    }
}

fn start_report(system: &System) -> SystemReport {
    let label = system.kind.label();
    let report = SystemReport {
        kind: system.kind,
        process_names: system
            .processes
            .iter()
            .map(|process| (process.role, process.name.clone()))
            .collect(),
        idle_rss_kibibytes: system
            .processes
            .iter()
            .filter_map(|process| Some((process.role, resident_kibibytes(process.pid)?)))
            .collect(),
        idle_anonymous_kibibytes: system
            .processes
            .iter()
            .filter_map(|process| Some((process.role, anonymous_kibibytes(process.pid)?)))
            .collect(),
        bulk: Vec::new(),
        ping_pong: None,
        setup: None,
        creations: None,
        idle_streams: None,
        restart_recovery: None,
        errors: Vec::new(),
        foreign_load: ForeignLoad::default(),
    };
    for (role, kibibytes) in &report.idle_rss_kibibytes {
        let name = report.process_name(*role).unwrap_or("?");
        let anonymous = report.idle_anonymous(*role).unwrap_or_default();
        eprintln!(
            "{label}: idle RSS of {name}: {:.1} MiB ({:.1} MiB anonymous)",
            *kibibytes as f64 / 1024.0,
            anonymous as f64 / 1024.0
        );
    }
    report
}

fn record_ping_pong(
    system: &System,
    report: &mut SystemReport,
    result: anyhow::Result<Percentiles>,
) {
    let label = system.kind.label();
    match result {
        Ok(latency) => {
            eprintln!(
                "{label}: 64-byte round trip p50 {:.1} µs, p99 {:.1} µs ({} samples)",
                micros(latency.p50),
                micros(latency.p99),
                latency.samples
            );
            report.ping_pong = Some(latency);
        }
        Err(error) => report.errors.push(format!("ping-pong: {error:#}")),
    }
}

fn record_setup(system: &System, report: &mut SystemReport, setup: SetupResult) {
    let label = system.kind.label();
    if let Some(latency) = setup.latency {
        eprintln!(
            "{label}: set-up p50 {:.3} ms, p99 {:.3} ms over {} connections, {} failed",
            millis(latency.p50),
            millis(latency.p99),
            latency.samples,
            setup.failures
        );
    }
    if let Some(error) = &setup.first_error {
        report.errors.push(format!(
            "set-up: {} of {} failed, first: {error}",
            setup.failures, setup.attempted
        ));
    }
    report.setup = Some(setup);
}

/// The systems' order in bulk round `round`: all of them, starting one
/// further each round.
fn turn_order(systems: usize, round: usize) -> impl Iterator<Item = usize> {
    (0..systems).map(move |offset| (round + offset) % systems)
}

/// The PIDs of a system's fresh processes, on stderr.
fn print_processes(system: &System) {
    let processes: Vec<String> = system
        .processes
        .iter()
        .map(|process| format!("{} pid {}", process.name, process.pid))
        .collect();
    if !processes.is_empty() {
        eprintln!(
            "{}: fresh processes: {}",
            system.kind.label(),
            processes.join(", ")
        );
    }
}

/// One bulk round on stderr, with each process's CPU-seconds per GB and the
/// machine's idle share: the report keeps only the median round, and the
/// spread between rounds is what tells a real difference from the machine's
/// noise. A system whose rounds leave the machine idler than another's
/// waits somewhere (a window, an ack) rather than works.
fn print_round(system: &System, run: &BulkRun) {
    let gigabytes = run.bytes as f64 / 1e9;
    let cpu: Vec<String> = run
        .cpu
        .iter()
        .map(|(role, used)| {
            let per_gigabyte = used.as_secs_f64() / gigabytes.max(f64::MIN_POSITIVE);
            format!("{role:?} {per_gigabyte:.2}")
        })
        .collect();
    let idle = run.machine_idle.map_or_else(
        || "unknown".to_owned(),
        |share| format!("{:.1} %", share * 100.0),
    );
    eprintln!(
        "{}: bulk round, {} stream(s) {}: {:.0} MB/s; CPU-s/GB {}; machine idle {idle}",
        system.kind.label(),
        run.streams,
        run.direction.label(),
        run.megabytes_per_second(),
        cpu.join(", ")
    );
}

/// The round with the median throughput (the lower middle one of an even
/// count), its CPU figures with it; streams that failed in any round count,
/// and every round's throughput is kept in round order.
fn median_run(mut runs: Vec<BulkRun>) -> Option<BulkRun> {
    let failed: usize = runs.iter().map(|run| run.failed_streams).sum();
    let round_rates: Vec<f64> = runs.iter().map(BulkRun::megabytes_per_second).collect();
    runs.sort_by(|first, second| {
        first
            .megabytes_per_second()
            .total_cmp(&second.megabytes_per_second())
    });
    let middle = runs.len().checked_sub(1)? / 2;
    let mut run = runs.swap_remove(middle);
    run.failed_streams = failed;
    run.round_rates = round_rates;
    Some(run)
}

fn record_bulk(system: &System, report: &mut SystemReport, run: BulkRun) {
    let label = system.kind.label();
    eprintln!(
        "{label}: bulk {} stream(s) {}: {:.0} MB/s",
        run.streams,
        run.direction.label(),
        run.megabytes_per_second()
    );
    if run.failed_streams > 0 {
        report.errors.push(format!(
            "bulk {} × {}: {} stream(s) failed",
            run.streams,
            run.direction.label(),
            run.failed_streams
        ));
    }
    report.bulk.push(run);
}

fn record_creations(system: &System, report: &mut SystemReport, created: CreationResult) {
    let label = system.kind.label();
    eprintln!(
        "{label}: {:.0} stream creations/s ({} completed, {} failed, {} clients)",
        created.per_second(),
        created.completed,
        created.failures,
        created.concurrency
    );
    for (role, cpu) in &created.cpu {
        let name = report.process_name(*role).unwrap_or("?");
        eprintln!(
            "{label}: {name}: {:.2} CPU-ms per stream creation ({:.0}% of one core)",
            created
                .cpu_milliseconds_per_stream(*role)
                .unwrap_or_default(),
            cpu.as_secs_f64() / created.elapsed.as_secs_f64().max(f64::EPSILON) * 100.0
        );
    }
    if let Some(error) = &created.first_error {
        report.errors.push(format!(
            "stream creations: {} failed, first: {error}",
            created.failures
        ));
    }
    report.creations = Some(created);
}

fn record_idle(system: &System, report: &mut SystemReport, held: IdleResult) {
    let label = system.kind.label();
    eprintln!(
        "{label}: held {} of {} idle streams (opened in {:.1} s, {} failed; all ended {})",
        held.opened,
        held.requested,
        held.open_duration.as_secs_f64(),
        held.failures,
        match held.close_duration {
            Some(duration) => format!("{:.1} s after the close", duration.as_secs_f64()),
            None => "— not within 30 s of the close".to_string(),
        }
    );
    for memory in &held.memory {
        let name = report.process_name(memory.role).unwrap_or("?");
        eprintln!(
            "{label}: {name}: RSS {:.1} → {:.1} MiB held ({:.1} KiB/stream) → {:.1} MiB after close",
            memory.before_kibibytes as f64 / 1024.0,
            memory.held_kibibytes as f64 / 1024.0,
            memory.kibibytes_per_stream(held.opened),
            memory.after_kibibytes as f64 / 1024.0
        );
    }
    for (role, _) in &held.cpu_while_held {
        let name = report.process_name(*role).unwrap_or("?");
        eprintln!(
            "{label}: {name}: {:.1}% of one core while the streams sat idle",
            held.core_share_while_held(*role).unwrap_or_default() * 100.0
        );
    }
    if let Some(error) = &held.first_error {
        report.errors.push(format!(
            "idle streams: {} failed, first: {error}",
            held.failures
        ));
    }
    report.idle_streams = Some(held);
}

fn record_restart_recovery(system: &System, report: &mut SystemReport, recovered: RestartResult) {
    let label = system.kind.label();
    if let (Some(p50), Some(p90)) = (recovered.percentile(50.0), recovered.percentile(90.0)) {
        eprintln!(
            "{label}: relay restart → data flowing again p50 {:.0} ms, p90 {:.0} ms ({} of {} restarts failed)",
            millis(p50),
            millis(p90),
            recovered.failures,
            recovered.attempted
        );
    }
    if let Some(error) = &recovered.first_error {
        report.errors.push(format!(
            "restart recovery: {} of {} failed, first: {error}",
            recovered.failures, recovered.attempted
        ));
    }
    report.restart_recovery = Some(recovered);
}

pub fn micros(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e6
}

pub fn millis(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e3
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(megabytes: u64, failed_streams: usize) -> BulkRun {
        BulkRun {
            direction: Direction::Upload,
            streams: 1,
            bytes: megabytes * 1_000_000,
            window: Duration::from_secs(1),
            cpu: Vec::new(),
            failed_streams,
            machine_idle: None,
            round_rates: Vec::new(),
        }
    }

    #[test]
    fn every_bulk_round_starts_with_the_next_system() {
        let orders: Vec<Vec<usize>> = (0..4).map(|round| turn_order(3, round).collect()).collect();
        assert_eq!(
            orders,
            vec![vec![0, 1, 2], vec![1, 2, 0], vec![2, 0, 1], vec![0, 1, 2]]
        );
    }

    #[test]
    fn the_median_round_is_reported_and_every_failure_counts() {
        let median = median_run(vec![run(700, 0), run(300, 1), run(500, 0)]).expect("a round");
        assert_eq!(median.megabytes_per_second().round(), 500.0);
        assert_eq!(median.failed_streams, 1, "a failure in another round");
        assert_eq!(
            median.round_rates,
            vec![700.0, 300.0, 500.0],
            "in round order"
        );
        let even = median_run(vec![run(700, 0), run(300, 0)]).expect("a round");
        assert_eq!(
            even.megabytes_per_second().round(),
            300.0,
            "the lower middle"
        );
        assert!(median_run(Vec::new()).is_none());
    }
}
