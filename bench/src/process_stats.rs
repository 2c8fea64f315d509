//! Reading a process's memory and CPU use from /proc, by PID.
//!
//! RSS comes from `VmRSS` in /proc/PID/status (KiB); CPU time from the
//! `utime` and `stime` fields of /proc/PID/stat (clock ticks, all threads).
//! Both are what an operator would see in `top`, which is the point: the
//! targets are about what a machine pays, not what an allocator reports.

use std::time::Duration;

/// Resident memory of a process, in KiB.
pub fn resident_kibibytes(pid: u32) -> Option<u64> {
    status_field(pid, "VmRSS:")
}

/// The anonymous part of resident memory (heap, stacks), in KiB: what a
/// process costs beyond the pages of its binary and libraries, which the
/// kernel shares and can drop.
pub fn anonymous_kibibytes(pid: u32) -> Option<u64> {
    status_field(pid, "RssAnon:")
}

fn status_field(pid: u32, name: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(name))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|number| number.parse().ok())
}

/// User plus system CPU time a process has used so far.
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses; the fields
    // after the last ')' are fixed: state is the first, utime the 12th.
    let after_name = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let user_ticks: u64 = fields.get(11)?.parse().ok()?;
    let system_ticks: u64 = fields.get(12)?.parse().ok()?;
    let ticks_per_second = clock_ticks_per_second();
    Some(Duration::from_secs_f64(
        (user_ticks + system_ticks) as f64 / ticks_per_second as f64,
    ))
}

/// Clock ticks per second, the unit of /proc CPU times.
pub fn clock_ticks_per_second() -> u64 {
    // SAFETY: sysconf has no preconditions; it only returns a value.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as u64
    } else {
        100
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_has_memory_and_cpu_time() {
        let pid = std::process::id();
        assert!(resident_kibibytes(pid).is_some_and(|kibibytes| kibibytes > 0));
        assert!(anonymous_kibibytes(pid).is_some_and(|kibibytes| kibibytes > 0));
        assert!(cpu_time(pid).is_some());
    }

    #[test]
    fn vanished_process_reads_as_none() {
        assert_eq!(resident_kibibytes(u32::MAX), None);
        assert_eq!(cpu_time(u32::MAX), None);
    }
}
