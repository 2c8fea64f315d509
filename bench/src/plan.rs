//! How much of each measurement a run does: counts and durations in one
//! place, so the whole run's length is visible and bounded. The full plan
//! takes about eleven minutes for six systems (each bulk round on fresh
//! processes); the quick plan is a smoke test of the harness whose figures
//! are not for BENCHMARKS.md.

use std::time::Duration;

/// One of the measurements; `--workload` picks a subset (for profiling one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Workload {
    PingPong,
    Setup,
    Bulk,
    Creations,
    Idle,
    /// Relay restarts under a resumed session (devstreams only).
    RestartRecovery,
}

impl Workload {
    pub const ALL: [Workload; 6] = [
        Workload::PingPong,
        Workload::Setup,
        Workload::Bulk,
        Workload::Creations,
        Workload::Idle,
        Workload::RestartRecovery,
    ];
}

#[derive(Debug, Clone)]
pub struct Plan {
    pub quick: bool,
    pub workloads: Vec<Workload>,
    /// Bulk: time to connect and leave slow start before counting.
    pub bulk_warm_up: Duration,
    /// Bulk: the measured window.
    pub bulk_window: Duration,
    pub bulk_parallel_streams: usize,
    /// Bulk: rounds of each measurement, the systems taking turns within a
    /// round; each system's median round is reported. One 2 s window on a
    /// shared machine varied by ±20 % from run to run, more than the
    /// differences the targets ask about.
    pub bulk_rounds: usize,
    /// Bulk: start every system's processes afresh before each of its
    /// rounds (see [`crate::systems::System::replace_processes`]); off to
    /// profile one set of PIDs (`bench/profile.sh`).
    pub bulk_fresh_processes: bool,
    /// Pause between runs, so one run's teardown is not the next one's load.
    pub pause_between_runs: Duration,
    pub ping_pong_round_trips: usize,
    pub ping_pong_time_limit: Duration,
    pub setup_connections: usize,
    pub setup_time_limit: Duration,
    pub creation_concurrency: usize,
    pub creation_duration: Duration,
    pub idle_streams: usize,
    /// Why `idle_streams` is lower than asked, when it is.
    pub idle_streams_cap: Option<String>,
    pub idle_concurrency: usize,
    pub idle_open_time_limit: Duration,
    /// How long the held streams' CPU is read: one whole ping interval
    /// (devstreams' default, 20 s) and a second more, so every stream pings
    /// once in it whatever time the opening took. A shorter window saw
    /// either no ping or the first streams' pings all at once.
    pub idle_cpu_window: Duration,
    /// Relay restarts in the restart-recovery measurement.
    pub relay_restarts: usize,
    /// Longest wait for data to flow again after one restart.
    pub restart_wait_limit: Duration,
}

impl Plan {
    pub fn full() -> Plan {
        Plan {
            quick: false,
            workloads: Workload::ALL.to_vec(),
            bulk_warm_up: Duration::from_millis(500),
            bulk_window: Duration::from_secs(2),
            bulk_parallel_streams: 8,
            bulk_rounds: 5,
            bulk_fresh_processes: true,
            pause_between_runs: Duration::from_millis(500),
            ping_pong_round_trips: 5_000,
            ping_pong_time_limit: Duration::from_secs(20),
            setup_connections: 500,
            setup_time_limit: Duration::from_secs(60),
            creation_concurrency: 32,
            creation_duration: Duration::from_secs(3),
            idle_streams: 10_000,
            idle_streams_cap: None,
            idle_concurrency: 64,
            idle_open_time_limit: Duration::from_secs(90),
            idle_cpu_window: Duration::from_secs(21),
            relay_restarts: 20,
            restart_wait_limit: Duration::from_secs(60),
        }
    }

    pub fn quick() -> Plan {
        Plan {
            quick: true,
            bulk_warm_up: Duration::from_millis(300),
            bulk_window: Duration::from_millis(700),
            bulk_rounds: 1,
            pause_between_runs: Duration::from_millis(200),
            ping_pong_round_trips: 500,
            ping_pong_time_limit: Duration::from_secs(5),
            setup_connections: 100,
            setup_time_limit: Duration::from_secs(15),
            creation_duration: Duration::from_secs(1),
            idle_streams: 500,
            idle_open_time_limit: Duration::from_secs(15),
            idle_cpu_window: Duration::from_secs(3),
            relay_restarts: 3,
            ..Plan::full()
        }
    }

    pub fn includes(&self, workload: Workload) -> bool {
        self.workloads.contains(&workload)
    }

    /// Open files the bench process needs: a client and a target socket per
    /// idle stream, plus room for everything else.
    pub fn open_files_needed(&self) -> u64 {
        self.idle_streams as u64 * 2 + 2_000
    }
}
