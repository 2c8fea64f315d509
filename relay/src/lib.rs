//! The devstreams relay: device control channels (MQTT), stream creation
//! (REST), the streaming endpoint (pairing and copying), the identity
//! registry, and the limits that keep one client from hurting another.
//! `main.rs` only parses the command line; everything here is testable
//! in-process (the echo sample's demo runs a relay this way).
#![forbid(unsafe_code)]

pub mod admin;
pub mod admin_api;
pub mod admin_client;
pub mod audit;
pub mod cluster;
pub mod config;
pub mod console;
pub mod control;
pub mod control_websocket;
pub mod copy;
pub mod data_dir;
pub mod embedded;
pub mod http_service;
pub mod http_util;
pub mod limits;
pub mod listeners;
pub mod live;
pub mod metrics;
pub mod operator_cli;
pub mod pairing;
pub mod presence;
pub mod proxy_protocol;
pub mod recent_events;
pub mod registry;
pub mod rights;
pub mod routing;
pub mod server;
pub mod sources;
pub mod state;
pub mod streaming;
pub mod streams_api;
pub mod tls;
pub mod trusted_proxies;

pub use config::{Limits, RelayConfig, TlsMode};
pub use embedded::EmbeddedRelay;
pub use server::{start, RunningRelay};
