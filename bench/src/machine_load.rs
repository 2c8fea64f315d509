//! How much of the machine other processes used while the bench measured.
//!
//! On a shared two-core machine one busy neighbour (a build, a fuzzer)
//! halves what the systems under test can use, and with the kernel's
//! autogroup scheduling even a `nice`d neighbour takes a full core. The
//! figures are only comparable when that share is small, so the report says
//! how large it was: all CPU time the kernel counted as busy (/proc/stat),
//! minus what the bench itself, its reaped children (/proc/self/stat) and its
//! live children (their /proc/PID/stat) used.

use std::time::{Duration, Instant};

use crate::process_stats::{clock_ticks_per_second, cpu_time};

#[derive(Debug, Clone, Copy)]
pub struct CpuAccount {
    machine_busy: Duration,
    ours: Duration,
    at: Instant,
}

/// Busy CPU time of other processes over a stretch of wall time.
#[derive(Debug, Clone, Copy, Default)]
pub struct ForeignLoad {
    pub busy: Duration,
    pub wall: Duration,
}

impl ForeignLoad {
    pub fn add(&mut self, other: ForeignLoad) {
        self.busy += other.busy;
        self.wall += other.wall;
    }

    /// Share of the whole machine (all cores), from 0 to 1.
    pub fn share(&self, cores: usize) -> Option<f64> {
        let capacity = self.wall.as_secs_f64() * cores.max(1) as f64;
        (capacity > 0.0).then(|| (self.busy.as_secs_f64() / capacity).clamp(0.0, 1.0))
    }
}

impl CpuAccount {
    /// A reading now; `live_children` are the PIDs of our running children.
    pub fn now(live_children: &[u32]) -> Option<CpuAccount> {
        let ticks = clock_ticks_per_second() as f64;
        let fields = aggregate_cpu_ticks(&std::fs::read_to_string("/proc/stat").ok()?)?;
        // user nice system idle iowait irq softirq steal (guest is inside user).
        let busy: u64 = [0, 1, 2, 5, 6, 7]
            .iter()
            .filter_map(|index| fields.get(*index))
            .sum();
        let own = std::fs::read_to_string("/proc/self/stat").ok()?;
        let after_name = &own[own.rfind(')')? + 1..];
        let own_fields: Vec<&str> = after_name.split_whitespace().collect();
        // utime, stime, cutime, cstime: fields 14–17, i.e. 11–14 after the name.
        let own_ticks: u64 = (11..=14)
            .filter_map(|index| own_fields.get(index)?.parse::<u64>().ok())
            .sum();
        let children: Duration = live_children.iter().filter_map(|pid| cpu_time(*pid)).sum();
        Some(CpuAccount {
            machine_busy: Duration::from_secs_f64(busy as f64 / ticks),
            ours: Duration::from_secs_f64(own_ticks as f64 / ticks) + children,
            at: Instant::now(),
        })
    }

    /// What other processes used since `earlier`.
    pub fn foreign_since(&self, earlier: &CpuAccount) -> ForeignLoad {
        let busy = self.machine_busy.saturating_sub(earlier.machine_busy);
        let ours = self.ours.saturating_sub(earlier.ours);
        ForeignLoad {
            busy: busy.saturating_sub(ours),
            wall: self.at.saturating_duration_since(earlier.at),
        }
    }
}

/// The tick counts of /proc/stat's first line, the whole machine's (`cpu `,
/// not `cpu0`); none when a field is not a number.
fn aggregate_cpu_ticks(stat: &str) -> Option<Vec<u64>> {
    stat.lines()
        .next()?
        .strip_prefix("cpu ")?
        .split_whitespace()
        .map(|field| field.parse().ok())
        .collect()
}

/// The machine's idle and total CPU time so far (all cores, /proc/stat),
/// read on both sides of a bulk window: the idle share between two readings
/// tells a pipeline that waits (on a window, an ack, a full buffer) from one
/// that keeps every core busy, which throughput alone cannot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdleTicks {
    idle: u64,
    total: u64,
}

impl IdleTicks {
    pub fn now() -> Option<IdleTicks> {
        IdleTicks::parse(&std::fs::read_to_string("/proc/stat").ok()?)
    }

    /// Reads the aggregate `cpu` line: idle and iowait count as idle,
    /// everything else (user, nice, system, irq, softirq, steal) as busy;
    /// guest time is already inside user.
    fn parse(stat: &str) -> Option<IdleTicks> {
        let fields = aggregate_cpu_ticks(stat)?;
        let total = fields.iter().take(8).sum();
        let idle = fields.get(3)? + fields.get(4)?;
        Some(IdleTicks { idle, total })
    }

    /// Share of the machine left idle since `earlier`, from 0 to 1.
    pub fn idle_share_since(&self, earlier: &IdleTicks) -> Option<f64> {
        let total = self.total.checked_sub(earlier.total)?;
        let idle = self.idle.checked_sub(earlier.idle)?;
        (total > 0).then(|| (idle as f64 / total as f64).clamp(0.0, 1.0))
    }
}

/// Samples the machine for `duration` while nothing of ours runs: the share
/// of CPU others use right now.
pub async fn background_share(duration: Duration, cores: usize) -> Option<f64> {
    let before = CpuAccount::now(&[])?;
    tokio::time::sleep(duration).await;
    CpuAccount::now(&[])?.foreign_since(&before).share(cores)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn foreign_share_is_busy_time_over_capacity() {
        let load = ForeignLoad {
            busy: Duration::from_secs(1),
            wall: Duration::from_secs(1),
        };
        assert_eq!(load.share(2), Some(0.5));
        assert_eq!(ForeignLoad::default().share(2), None);
    }

    #[test]
    fn idle_share_counts_idle_and_iowait_over_all_ticks() {
        let before =
            IdleTicks::parse("cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 1 2 3\n").expect("a cpu line");
        // 100 more ticks: 20 idle, 10 iowait, 70 busy (user, system, steal).
        let after = IdleTicks::parse("cpu  150 0 60 820 60 0 0 10 5 0\n").expect("a cpu line");
        let share = after.idle_share_since(&before).expect("ticks passed");
        assert!((share - 0.3).abs() < 1e-9, "{share}");
        assert_eq!(before.idle_share_since(&before), None, "no time passed");
        assert_eq!(before.idle_share_since(&after), None, "readings swapped");
        assert_eq!(IdleTicks::parse("cpu0 1 2 3\n"), None, "no aggregate line");
        assert_eq!(
            IdleTicks::parse("cpu  1 2 x 4 5\n"),
            None,
            "a field not a number"
        );
        assert_eq!(IdleTicks::parse("cpu  1 2 3\n"), None, "too few fields");
    }
}
