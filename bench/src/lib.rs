//! Pieces shared by the bench's programs: `bench` (the benchmark that
//! writes BENCHMARKS.md) and `idle-devices` (the idle control channel
//! measurement behind SCALING.md). Starting and stopping children by PID,
//! reading their memory and CPU from /proc, and the open-file limit.

pub mod child;
pub mod file_limit;
pub mod process_stats;
