//! The measurements, one module each, all driven against a system's entry
//! address with plain TCP clients. Every loop is bounded by a count and a
//! deadline, and every connect or read by a timeout, so a system that stalls
//! costs the run seconds, never forever.

pub mod bulk;
pub mod connection;
pub mod creations;
pub mod idle;
pub mod ping_pong;
pub mod restart;
pub mod setup;
