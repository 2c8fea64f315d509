//! The systems under test, each started the way a user would start it, all
//! ending at the same in-process target server: direct TCP (the physical
//! limit), devstreams (relay + device-proxy + service-proxy, TLS on every
//! relay leg), and the open peers rathole (TLS transport) and bore (plain TCP).
//!
//! A [`System`] is an entry address (where a client connects) plus the
//! processes behind it, which the bench watches for memory and CPU and stops
//! by PID when it is done.

pub mod bore;
pub mod devstreams;
pub mod devstreams_cluster;
pub mod rathole;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::bail;

use crate::child::ChildProcess;
use crate::workloads::connection::open_echo;

/// Where a process sits on the path from client to target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The relay, or the peer's server: the process in the cloud.
    Server,
    /// device-proxy, or the peer's client: runs next to the target.
    DeviceSide,
    /// service-proxy: runs next to the operator (the peers have none; their
    /// server takes the operator's TCP connection itself).
    ServiceSide,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Server, Role::DeviceSide, Role::ServiceSide];
}

/// A process of a system, watched for RSS and CPU time.
#[derive(Debug, Clone)]
pub struct WatchedProcess {
    pub role: Role,
    pub name: String,
    pub pid: u32,
}

/// Which system; decides how the report labels and compares it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SystemKind {
    Direct,
    /// Resumable sessions on (the default of both proxies).
    Devstreams,
    /// The same with `--no-resume` on both proxies: the cost of sessions.
    DevstreamsNoResume,
    /// Three relays on NATS; the service's REST call lands on a node that
    /// does not hold the device.
    DevstreamsCluster,
    Rathole,
    Bore,
}

impl SystemKind {
    pub fn label(self) -> &'static str {
        match self {
            SystemKind::Direct => "direct TCP",
            SystemKind::Devstreams => "devstreams, resume on (TLS)",
            SystemKind::DevstreamsNoResume => "devstreams, resume off (TLS)",
            SystemKind::DevstreamsCluster => "devstreams 3-node cluster (TLS)",
            SystemKind::Rathole => "rathole (TLS)",
            SystemKind::Bore => "bore (plain TCP)",
        }
    }
}

pub struct System {
    pub kind: SystemKind,
    /// Where clients connect; the path ends at the target server.
    pub entry: SocketAddr,
    pub processes: Vec<WatchedProcess>,
    children: Vec<ChildProcess>,
    /// Processes the system needs but the bench does not measure (a
    /// cluster's other nodes and NATS); stopped by PID with the rest.
    unwatched: Vec<ChildProcess>,
    /// How to start the relay again on its data dir and address, for the
    /// restart-recovery measurement; None for the systems it does not apply to.
    relay_restart: Option<devstreams::RelayRestart>,
    /// Data dirs, configs and logs; held so they are removed with the system.
    _work_directory: Option<tempfile::TempDir>,
}

/// Paths of the programs the bench runs.
#[derive(Debug, Clone)]
pub struct Programs {
    pub relay: PathBuf,
    pub device_proxy: PathBuf,
    pub service_proxy: PathBuf,
    /// None when not installed; the reason is printed and reported.
    pub rathole: Result<PathBuf, String>,
    pub bore: Result<PathBuf, String>,
    /// RUST_LOG for every child (ours and the peers').
    pub log_level: String,
}

/// Starts a system of `kind` whose path ends at `target`.
pub async fn start(
    kind: SystemKind,
    programs: &Programs,
    target: SocketAddr,
) -> anyhow::Result<System> {
    match kind {
        SystemKind::Direct => Ok(System::direct(target)),
        SystemKind::Devstreams => devstreams::start(programs, target, true).await,
        SystemKind::DevstreamsNoResume => devstreams::start(programs, target, false).await,
        SystemKind::DevstreamsCluster => devstreams_cluster::start(programs, target).await,
        SystemKind::Rathole => rathole::start(programs, target).await,
        SystemKind::Bore => bore::start(programs, target).await,
    }
}

/// How long a started system may take to carry its first echo.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

impl System {
    pub fn direct(target: SocketAddr) -> System {
        System {
            kind: SystemKind::Direct,
            entry: target,
            processes: Vec::new(),
            children: Vec::new(),
            unwatched: Vec::new(),
            relay_restart: None,
            _work_directory: None,
        }
    }

    fn with_children(
        kind: SystemKind,
        entry: SocketAddr,
        children: Vec<(Role, ChildProcess)>,
        work_directory: tempfile::TempDir,
    ) -> System {
        let processes = children
            .iter()
            .map(|(role, child)| WatchedProcess {
                role: *role,
                name: child.name().to_string(),
                pid: child.pid(),
            })
            .collect();
        let children = children.into_iter().map(|(_, child)| child).collect();
        System {
            kind,
            entry,
            processes,
            children,
            unwatched: Vec::new(),
            relay_restart: None,
            _work_directory: Some(work_directory),
        }
    }

    /// Retries an echo through the system until one works: the peers accept
    /// a client before their device side is connected and then drop it.
    pub async fn wait_until_ready(&mut self) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
        let mut last_error = String::new();
        while tokio::time::Instant::now() < deadline {
            for child in self.children.iter_mut() {
                if child.has_exited() {
                    bail!(
                        "{} exited during start-up; its log:\n{}",
                        child.name(),
                        child.log_tail()
                    );
                }
            }
            match open_echo(self.entry, Duration::from_secs(10)).await {
                Ok(_) => return Ok(()),
                Err(error) => last_error = error.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!(
            "{} never carried an echo within {READY_TIMEOUT:?}: {last_error}",
            self.kind.label()
        )
    }

    /// Names of children that died while the system was in use.
    pub fn exited_children(&mut self) -> Vec<String> {
        let mut exited = Vec::new();
        for child in self.children.iter_mut().chain(self.unwatched.iter_mut()) {
            if child.has_exited() {
                exited.push(child.name().to_string());
            }
        }
        exited
    }

    /// Keeps `children` running with the system, unmeasured, and checks
    /// they stay up like the measured ones.
    pub fn keep_unwatched(&mut self, children: Vec<ChildProcess>) {
        self.unwatched.extend(children);
    }

    /// Whether [`System::restart_relay`] can be used.
    pub fn can_restart_relay(&self) -> bool {
        self.relay_restart.is_some()
    }

    /// `kill -9` the relay, start it again on the same data dir and address,
    /// and return when the new one printed its ready line ("Listening on").
    pub async fn restart_relay(&mut self) -> anyhow::Result<std::time::Instant> {
        let Some(restart) = &self.relay_restart else {
            bail!("{} has no restartable relay", self.kind.label());
        };
        let Some(index) = self
            .processes
            .iter()
            .position(|process| process.role == Role::Server)
        else {
            bail!("{} has no relay process", self.kind.label());
        };
        let old = self.children.remove(index);
        old.kill().await;
        let mut relay = match restart.spawn() {
            Ok(relay) => relay,
            Err(error) => {
                // Keep the lists aligned: the dead relay's place stays taken.
                self.processes.remove(index);
                return Err(error);
            }
        };
        let ready = relay.wait_for_line("Listening on ", READY_TIMEOUT).await;
        let ready_at = std::time::Instant::now();
        relay.drain_stdout();
        self.processes[index].pid = relay.pid();
        self.children.insert(index, relay);
        ready?;
        Ok(ready_at)
    }

    /// Replaces every process of the system with a freshly started one (a
    /// new work directory, ports and data dir); direct TCP has none. The
    /// new system is started before the old one is stopped, so a failed
    /// start leaves the old one in place and says why; bore, whose control
    /// port is fixed, is stopped first.
    ///
    /// Why: a process keeps for its whole life whatever made it fast or
    /// slow on this host. Two identical `--no-resume` setups measured in
    /// turns over ten rounds differed by 12 % (BENCHMARKS.md, 2026-12-04,
    /// evening), more than the 5 % a target asks about; fresh processes
    /// every round turn that into round-to-round noise, which the median
    /// round absorbs.
    pub async fn replace_processes(
        &mut self,
        programs: &Programs,
        target: SocketAddr,
    ) -> anyhow::Result<()> {
        match self.kind {
            SystemKind::Direct => Ok(()),
            SystemKind::Bore => {
                self.stop_processes().await;
                *self = start(self.kind, programs, target).await?;
                Ok(())
            }
            kind => {
                let fresh = start(kind, programs, target).await?;
                std::mem::replace(self, fresh).stop().await;
                Ok(())
            }
        }
    }

    /// Kills every child by PID and removes the work directory.
    pub async fn stop(mut self) {
        self.stop_processes().await;
    }

    /// Kills every child by PID; the system is left without processes.
    async fn stop_processes(&mut self) {
        for child in self.children.drain(..).chain(self.unwatched.drain(..)) {
            child.stop().await;
        }
    }
}

/// CPU time used so far by each process of a system.
pub type CpuSnapshot = Vec<(Role, Option<Duration>)>;

impl System {
    pub fn cpu_snapshot(&self) -> CpuSnapshot {
        self.processes
            .iter()
            .map(|process| (process.role, crate::process_stats::cpu_time(process.pid)))
            .collect()
    }
}

/// CPU time each process used between two snapshots of the same system.
pub fn cpu_used(before: &CpuSnapshot, after: &CpuSnapshot) -> Vec<(Role, Duration)> {
    before
        .iter()
        .zip(after)
        .filter_map(|((role, before), (_, after))| {
            Some((*role, after.as_ref()?.saturating_sub(*before.as_ref()?)))
        })
        .collect()
}

/// A loopback port nobody listens on right now (bind, read, release).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}
