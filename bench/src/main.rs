//! `bench`: measures devstreams (relay, device-proxy, service-proxy on
//! loopback, TLS on every relay leg) next to direct TCP and the open peers
//! rathole and bore, in one run, and writes BENCHMARKS.md with a chart.
//!
//! This file parses the command line and runs the systems one after the
//! other; the measurements live in `workloads`, the systems in `systems`,
//! the report in `report` and `chart`.

mod binaries;
mod chart;
mod machine;
mod machine_load;
mod plan;
mod report;
mod run;
mod statistics;
mod systems;
mod target;
mod workloads;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use bench::{child, file_limit, process_stats};
use clap::{Parser, ValueEnum};

use crate::plan::Plan;
use crate::report::RunReport;
use crate::systems::{Programs, SystemKind};
use crate::target::TargetServer;

const EXAMPLES: &str = "\
Examples:
  bench/install-peers.sh                                   # once: rathole and bore into bench/peers/
  cargo run --release -p bench -- --output BENCHMARKS.md   # the benchmark (about 11 minutes)
  cargo run --release -p bench -- --quick                  # smoke test of the harness, report on stdout
  cargo run --release -p bench -- --only devstreams --only direct --no-build

The bench first runs `cargo build --release -p relay -p device-proxy -p service-proxy`
into its own target directory (CARGO_TARGET_DIR is honoured), unless --no-build.";

/// How long the machine is watched, idle, before the run.
const BACKGROUND_SAMPLE: Duration = Duration::from_secs(2);

/// Above this share of the CPU used by others, the run is flagged.
const BUSY_MACHINE_SHARE: f64 = 0.10;

/// How often a busy machine is sampled again under --wait-for-quiet.
const QUIET_POLL_INTERVAL: Duration = Duration::from_secs(5);

#[derive(Debug, Parser)]
#[command(name = "bench", about = "devstreams benchmark: devstreams next to direct TCP, rathole and bore, on loopback", after_help = EXAMPLES)]
struct Arguments {
    /// Write the report here (e.g. BENCHMARKS.md), keeping its hand-written part; it is always printed too
    #[arg(long, value_name = "PATH")]
    output: Option<PathBuf>,

    /// Where to write the chart; by default bench/chart.svg beside --output
    #[arg(long, value_name = "PATH")]
    chart: Option<PathBuf>,

    /// Do not run `cargo build --release` first; use the binaries already built
    #[arg(long)]
    no_build: bool,

    /// Directory holding relay, device-proxy and service-proxy (default: <target dir>/release)
    #[arg(long, value_name = "DIR")]
    binaries: Option<PathBuf>,

    /// Directory holding the peers' binaries (default: bench/peers/bin)
    #[arg(long, value_name = "DIR")]
    peers: Option<PathBuf>,

    /// Measure only this system (repeatable; default: all)
    #[arg(long = "only", value_enum, value_name = "SYSTEM")]
    only: Vec<Choice>,

    /// Short smoke run of the harness; its figures are not the benchmark
    #[arg(long)]
    quick: bool,

    /// Idle streams to hold (default: 10000, or 500 with --quick)
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(0..=15_000))]
    idle_streams: Option<u32>,

    /// Run only this measurement (repeatable; default: all), e.g. to profile one
    #[arg(long = "workload", value_enum, value_name = "WORKLOAD")]
    workloads: Vec<plan::Workload>,

    /// Rounds of each bulk measurement; each system's median round is
    /// reported (default: 5, or 1 with --quick). More rounds resolve smaller
    /// differences on a noisy machine, e.g. `--bulk-rounds 7`
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=25))]
    bulk_rounds: Option<u32>,

    /// Keep each system's processes for all its bulk rounds instead of
    /// starting them afresh before every round (the default), e.g. to profile
    /// one set of PIDs as bench/profile.sh does
    #[arg(long)]
    bulk_same_processes: bool,

    /// Clients opening streams at once in the creation-rate measurement (default: 32)
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1024))]
    creation_clients: Option<u32>,

    /// Before each system, wait while other processes use over 10% of the CPU
    /// (a shared machine's builds and fuzzers); at most this many seconds in all
    #[arg(long, value_name = "SECONDS", value_parser = clap::value_parser!(u32).range(1..=7200))]
    wait_for_quiet: Option<u32>,

    /// RUST_LOG given to every child process
    #[arg(long, value_name = "FILTER", default_value = "warn")]
    log_level: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Choice {
    Direct,
    /// devstreams with resumable sessions (the default)
    Devstreams,
    /// devstreams with `--no-resume` on both proxies
    DevstreamsNoResume,
    /// Three relays on NATS (needs nats-server), REST on a node not holding the device
    DevstreamsCluster,
    Rathole,
    Bore,
}

impl Choice {
    fn kind(self) -> SystemKind {
        match self {
            Choice::Direct => SystemKind::Direct,
            Choice::Devstreams => SystemKind::Devstreams,
            Choice::DevstreamsNoResume => SystemKind::DevstreamsNoResume,
            Choice::DevstreamsCluster => SystemKind::DevstreamsCluster,
            Choice::Rathole => SystemKind::Rathole,
            Choice::Bore => SystemKind::Bore,
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let arguments = Arguments::parse();
    match run(arguments).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("bench: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(arguments: Arguments) -> anyhow::Result<()> {
    let run_started = Instant::now();
    let mut plan = if arguments.quick {
        Plan::quick()
    } else {
        Plan::full()
    };
    if !arguments.workloads.is_empty() {
        plan.workloads = arguments.workloads.clone();
    }
    if let Some(rounds) = arguments.bulk_rounds {
        plan.bulk_rounds = rounds as usize;
    }
    if arguments.bulk_same_processes {
        plan.bulk_fresh_processes = false;
    }
    if let Some(clients) = arguments.creation_clients {
        plan.creation_concurrency = clients as usize;
    }
    if let Some(count) = arguments.idle_streams {
        plan.idle_streams = count as usize;
    }
    let wanted_files = file_limit::WANTED_OPEN_FILES.max(plan.open_files_needed());
    match file_limit::raise_open_file_limit(wanted_files) {
        Ok(limit) => {
            let allowed = file_limit::idle_streams_allowed(limit, plan.idle_concurrency);
            if allowed < plan.idle_streams {
                let reason = format!(
                    "the open-file limit is {limit} per process and cannot be raised here (no CAP_SYS_RESOURCE); \
                     with two sockets per stream in every process, {allowed} idle streams fit"
                );
                eprintln!(
                    "bench: holding {allowed} idle streams instead of {}: {reason}",
                    plan.idle_streams
                );
                plan.idle_streams = allowed;
                plan.idle_streams_cap = Some(reason);
            }
        }
        Err(error) => eprintln!("bench: warning: cannot read the open-file limit: {error}"),
    }

    let workspace_root = binaries::workspace_root();
    let binary_directory = match &arguments.binaries {
        Some(directory) => directory.clone(),
        None => binaries::target_directory()?.join("release"),
    };
    if !arguments.no_build {
        let target_directory = binary_directory
            .parent()
            .map(Path::to_path_buf)
            .context("--binaries has no parent directory")?;
        binaries::build_release(&target_directory).await?;
    }
    let peers_directory = arguments
        .peers
        .clone()
        .unwrap_or_else(|| workspace_root.join("bench").join("peers").join("bin"));
    let programs = Programs {
        relay: binaries::our_binary(&binary_directory, "relay")?,
        device_proxy: binaries::our_binary(&binary_directory, "device-proxy")?,
        service_proxy: binaries::our_binary(&binary_directory, "service-proxy")?,
        rathole: binaries::peer_binary(&peers_directory, "rathole"),
        bore: binaries::peer_binary(&peers_directory, "bore"),
        log_level: arguments.log_level.clone(),
    };

    let machine = machine::Machine::describe(&workspace_root).await;
    let mut versions = Vec::new();
    for (name, path) in [
        ("relay", &programs.relay),
        ("device-proxy", &programs.device_proxy),
        ("service-proxy", &programs.service_proxy),
    ] {
        versions.push((name.to_string(), machine::program_version(path).await));
    }
    for (name, path) in [("rathole", &programs.rathole), ("bore", &programs.bore)] {
        let version = match path {
            Ok(path) => machine::program_version(path).await,
            Err(reason) => format!("not installed: {reason}"),
        };
        versions.push((name.to_string(), version));
    }
    let date = machine::first_line(Path::new("date"), &["-u", "+%Y-%m-%d %H:%M UTC"]).await;

    // --wait-for-quiet is one budget for the whole run, spent before any
    // system whose turn comes while the machine is busy.
    let quiet_deadline = arguments
        .wait_for_quiet
        .map(|seconds| Instant::now() + Duration::from_secs(seconds.into()));
    let background = wait_for_quiet_machine(quiet_deadline, machine.cores).await;
    if let Some(share) = background {
        eprintln!(
            "bench: other processes use {:.0}% of the machine's CPU right now",
            share * 100.0
        );
        if share > BUSY_MACHINE_SHARE {
            eprintln!(
                "bench: warning: the machine is busy; the figures will not be representative"
            );
        }
    }

    let target = TargetServer::start()
        .await
        .context("cannot start the target server on 127.0.0.1")?;
    let chosen: Vec<SystemKind> = if arguments.only.is_empty() {
        report::COLUMNS.to_vec()
    } else {
        report::COLUMNS
            .iter()
            .copied()
            .filter(|kind| arguments.only.iter().any(|choice| choice.kind() == *kind))
            .collect()
    };
    let mut running = Vec::new();
    let mut skipped = Vec::new();
    for kind in chosen {
        eprintln!("bench: starting {}", kind.label());
        let started_system = systems::start(kind, &programs, target.address).await;
        match started_system {
            Ok(system) => {
                for process in &system.processes {
                    // bench/profile.sh reads these lines to split a profile by process.
                    eprintln!("bench: {} pid {}", process.name, process.pid);
                }
                running.push(system);
            }
            Err(error) => {
                eprintln!("bench: skipping {}: {error:#}", kind.label());
                skipped.push((kind, format!("{error:#}")));
            }
        }
    }
    if quiet_deadline.is_some() {
        wait_for_quiet_machine(quiet_deadline, machine.cores).await;
    }
    let mut systems = run::measure_all(&mut running, &target, &plan, &programs).await;
    for (system, report) in running.iter_mut().zip(&mut systems) {
        let exited = system.exited_children();
        if !exited.is_empty() {
            report
                .errors
                .push(format!("exited during the run: {}", exited.join(", ")));
        }
        if let Some(share) = report.foreign_load.share(machine.cores) {
            eprintln!(
                "bench: {}: other processes used {:.0}% of the machine's CPU during its measurements",
                system.kind.label(),
                share * 100.0
            );
        }
    }
    for system in running {
        system.stop().await;
    }
    target.stop().await;

    let chart_path = arguments.chart.clone().or_else(|| {
        let output = arguments.output.as_ref()?;
        Some(
            output
                .parent()
                .unwrap_or(Path::new(""))
                .join("bench")
                .join("chart.svg"),
        )
    });
    let chart_link = match (&chart_path, &arguments.output) {
        (Some(chart), Some(output)) => Some(relative_link(chart, output)),
        _ => None,
    };
    let command = format!(
        "cargo run --release -p bench -- {}",
        std::env::args().skip(1).collect::<Vec<_>>().join(" ")
    );
    let report = RunReport {
        background_cpu_share: background,
        machine,
        versions,
        command: command.trim_end().to_string(),
        date,
        duration: run_started.elapsed(),
        plan,
        log_level: arguments.log_level.clone(),
        systems,
        skipped,
        chart_link,
    };
    let existing = arguments
        .output
        .as_ref()
        .and_then(|output| std::fs::read_to_string(output).ok());
    let markdown = report::render(
        &report,
        existing.as_deref().and_then(report::hand_written_part),
    );
    println!("{markdown}");
    if let Some(chart) = &chart_path {
        if let Some(directory) = chart
            .parent()
            .filter(|directory| !directory.as_os_str().is_empty())
        {
            std::fs::create_dir_all(directory)
                .with_context(|| format!("cannot create {}", directory.display()))?;
        }
        std::fs::write(chart, chart::render(&report))
            .with_context(|| format!("cannot write {}", chart.display()))?;
        eprintln!("bench: wrote {}", chart.display());
    }
    if let Some(output) = &arguments.output {
        std::fs::write(output, markdown)
            .with_context(|| format!("cannot write {}", output.display()))?;
        eprintln!("bench: wrote {}", output.display());
    }
    Ok(())
}

/// Samples the CPU other processes use; while it is above
/// [`BUSY_MACHINE_SHARE`] and `deadline` (if any) is ahead, waits and samples
/// again. Returns the last sample.
async fn wait_for_quiet_machine(deadline: Option<Instant>, cores: usize) -> Option<f64> {
    let mut share = machine_load::background_share(BACKGROUND_SAMPLE, cores).await;
    while let Some(deadline) = deadline {
        if !share.is_some_and(|share| share > BUSY_MACHINE_SHARE) || Instant::now() >= deadline {
            break;
        }
        eprintln!(
            "bench: other processes use {:.0}% of the CPU; waiting for a quiet machine (--wait-for-quiet)",
            share.unwrap_or_default() * 100.0
        );
        tokio::time::sleep(QUIET_POLL_INTERVAL).await;
        share = machine_load::background_share(BACKGROUND_SAMPLE, cores).await;
    }
    share
}

/// The chart's path as BENCHMARKS.md links it: relative when it sits below
/// the report's directory, absolute otherwise.
fn relative_link(chart: &Path, output: &Path) -> String {
    // `BENCHMARKS.md` has the parent "", which `absolute` refuses: use ".".
    let base = output
        .parent()
        .filter(|parent| !parent.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let absolute = |path: &Path| std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let (chart, base) = (absolute(chart), absolute(base));
    chart
        .strip_prefix(&base)
        .unwrap_or(&chart)
        .to_string_lossy()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chart_link_is_relative_to_the_report() {
        assert_eq!(
            relative_link(Path::new("bench/chart.svg"), Path::new("BENCHMARKS.md")),
            "bench/chart.svg"
        );
        assert_eq!(
            relative_link(
                Path::new("/tmp/out/bench/chart.svg"),
                Path::new("/tmp/out/BENCHMARKS.md")
            ),
            "bench/chart.svg"
        );
        assert_eq!(
            relative_link(
                Path::new("/elsewhere/chart.svg"),
                Path::new("/tmp/out/BENCHMARKS.md")
            ),
            "/elsewhere/chart.svg"
        );
    }
}
