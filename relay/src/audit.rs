//! The audit log (`--audit-log FILE|-`): one JSON line per event an
//! operator is asked about later — who asked for which stream, how it ended
//! and how many bytes it carried, which devices came and went, what changed
//! in the registry.
//!
//! Recording never waits: an event goes into a bounded queue read by one
//! writer thread; when the queue is full the event is dropped, counted
//! (`devstreams_audit_events_dropped_total`) and warned about, so a slow disk
//! can never stall a stream. The writer batches what is queued, flushes
//! after each batch, and rotates files by size (`FILE` → `FILE.1` → … →
//! `FILE.N`, the oldest deleted); a line is never split across files. On a
//! clean shutdown [`Audit::close`] runs after every stream has ended, so the
//! writer drains the queue, flushes and fsyncs before the process exits.
//!
//! Events carry ids, names, addresses, counts and reasons; they are built
//! from typed fields only, so no key, token or signature can reach the file.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use prometheus_client::metrics::counter::Counter;
use serde::Serialize;

/// Events queued for the writer at most; past it they are dropped (never
/// waited for). A burst of this many events fits while the disk catches up.
pub const DEFAULT_QUEUE_LENGTH: usize = 16 * 1024;

/// Default `--audit-log-max-size`: 100 MiB per file.
pub const DEFAULT_MAX_FILE_SIZE: u64 = 100 * 1024 * 1024;

/// Default `--audit-log-max-files`: rotated files kept beside the live one.
pub const DEFAULT_MAX_FILES: usize = 5;

/// How long shutdown waits for the writer to drain and fsync.
const CLOSE_DEADLINE: Duration = Duration::from_secs(10);

/// Where audit lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditOutput {
    /// The relay's standard output (`--audit-log -`), never rotated.
    Stdout,
    /// A file, appended to and rotated by size.
    File(PathBuf),
}

impl AuditOutput {
    /// `-` is standard output, anything else a file path.
    pub fn parse(text: &str) -> Result<AuditOutput, String> {
        match text {
            "" => Err("an empty path: give a file, or - for standard output".into()),
            "-" => Ok(AuditOutput::Stdout),
            path => Ok(AuditOutput::File(PathBuf::from(path))),
        }
    }
}

/// What `relay serve --audit-log …` asks for.
#[derive(Debug, Clone)]
pub struct AuditConfig {
    pub outputs: Vec<AuditOutput>,
    /// A file is rotated before a line would take it past this many bytes
    /// (0: never rotated).
    pub max_file_size: u64,
    /// Rotated files kept (`FILE.1` … `FILE.N`); the oldest is deleted.
    pub max_files: usize,
    pub queue_length: usize,
}

impl AuditConfig {
    pub fn new(outputs: Vec<AuditOutput>) -> Self {
        Self {
            outputs,
            max_file_size: DEFAULT_MAX_FILE_SIZE,
            max_files: DEFAULT_MAX_FILES,
            queue_length: DEFAULT_QUEUE_LENGTH,
        }
    }
}

/// Parses `--audit-log-max-size`: a number of MiB (`100`), or a number with
/// a unit (`64KiB`, `10MiB`, `1GiB`, `4096B`).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a size: write MiB as a number (100) or with a unit (64KiB, 10MiB, 1GiB)"))?;
    let multiplier: u64 = match unit.trim() {
        "" | "M" | "MiB" => 1024 * 1024,
        "B" => 1,
        "K" | "KiB" => 1024,
        "G" | "GiB" => 1024 * 1024 * 1024,
        other => {
            return Err(format!(
                "unknown size unit {other:?}: use B, KiB, MiB or GiB"
            ))
        }
    };
    number
        .checked_mul(multiplier)
        .ok_or_else(|| format!("{text:?} is too large"))
}

/// Who ended a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EndedBy {
    Device,
    Service,
    Relay,
    /// An operator closed it (admin API, `relay stream close`).
    Operator,
}

/// One audited event. Field names are the JSON keys.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum AuditEvent {
    /// A service asked for a stream (before any check but the credentials';
    /// `policy` is the one that signed the request, also when it lacks the
    /// right; absent when the credentials themselves were refused).
    StreamRequested {
        stream_id: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        policy: Option<String>,
        client_address: String,
        device_id: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        module_id: Option<String>,
        stream_name: String,
        /// devstreams' target header (host:port or port on the device).
        #[serde(skip_serializing_if = "Option::is_none")]
        target: Option<String>,
        /// `new` or `continue` for resumable sessions.
        #[serde(skip_serializing_if = "Option::is_none")]
        resume: Option<&'static str>,
        /// In a cluster: the node that received the request and routed it here.
        #[serde(skip_serializing_if = "Option::is_none")]
        routed_from: Option<String>,
    },
    StreamAccepted {
        stream_id: String,
        device_id: String,
    },
    /// Refused by the relay (credentials, unknown device, limits, offline,
    /// silent device) or rejected by the device; `status` is the HTTP status
    /// the service got (200 for a device's rejection, as IoT Hub answers).
    StreamRejected {
        stream_id: String,
        device_id: String,
        status: u16,
        reason: String,
    },
    /// An accepted stream continues a resumable session (`x-devstreams-resume: continue`).
    StreamResumed {
        stream_id: String,
        device_id: String,
    },
    /// Both sides connected; the relay copies from now on.
    StreamEstablished {
        stream_id: String,
        device_id: String,
        stream_name: String,
    },
    /// An established stream ended.
    StreamClosed {
        stream_id: String,
        device_id: String,
        stream_name: String,
        bytes_device_to_service: u64,
        bytes_service_to_device: u64,
        duration_ms: u64,
        ended_by: EndedBy,
        reason: String,
    },
    /// An accepted stream ended before both sides connected.
    StreamFailed {
        stream_id: String,
        device_id: String,
        stream_name: String,
        reason: String,
    },
    DeviceConnected {
        device_id: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        module_id: Option<String>,
        address: String,
    },
    DeviceDisconnected {
        device_id: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        module_id: Option<String>,
        address: String,
        reason: String,
    },
    /// A device's CONNECT was refused (bad credentials, unknown or disabled device).
    DeviceRefused {
        client_id: String,
        address: String,
        reason: String,
    },
    /// The relay saw the registry change (a `relay device|policy …` command,
    /// an import, or another cluster node's change).
    RegistryChanged {
        /// Where the change came from: `data_dir` or `cluster`.
        source: &'static str,
        /// `device` or `policy`.
        kind: &'static str,
        name: String,
        /// `added`, `removed`, `enabled`, `disabled`, `key_rotated`.
        change: &'static str,
    },
}

/// One line of the file.
#[derive(Serialize)]
struct Line<'a> {
    time: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    node: Option<&'a str>,
    #[serde(flatten)]
    event: &'a AuditEvent,
}

enum Message {
    /// Boxed, so the queue's slots stay small.
    Event(Box<(SystemTime, AuditEvent)>),
    /// Drain, flush, fsync and stop.
    Close,
}

struct Inner {
    sender: SyncSender<Message>,
    node: Option<String>,
    dropped: Counter,
    closed: AtomicBool,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// The relay's handle on its audit log: cheap to clone, off by default.
/// Whether on or off, the recent events are kept in memory for the web
/// console ([`crate::recent_events`]).
#[derive(Clone, Default)]
pub struct Audit {
    inner: Option<Arc<Inner>>,
    recent: Arc<crate::recent_events::RecentEvents>,
}

impl Audit {
    /// No audit log: recording does nothing and builds nothing.
    pub fn disabled() -> Self {
        Self::default()
    }

    /// Opens every output (a file that cannot be opened is an error now,
    /// not a silent loss later) and starts the writer thread. `node` is the
    /// cluster node name written on each line; `dropped` counts events lost
    /// to a full queue.
    pub fn open(
        config: &AuditConfig,
        node: Option<String>,
        dropped: Counter,
    ) -> anyhow::Result<Self> {
        if config.outputs.is_empty() {
            return Ok(Self::disabled());
        }
        let mut sinks = Vec::with_capacity(config.outputs.len());
        for output in &config.outputs {
            sinks.push(match output {
                AuditOutput::Stdout => Sink::Stdout,
                AuditOutput::File(path) => Sink::File(
                    RotatingFile::open(path, config.max_file_size, config.max_files)
                        .with_context(|| {
                            format!(
                                "cannot open the audit log {}: check the directory exists and is writable, or choose another --audit-log",
                                path.display()
                            )
                        })?,
                ),
            });
        }
        let (sender, receiver) = sync_channel(config.queue_length.max(1));
        let writer_node = node.clone();
        let writer = std::thread::Builder::new()
            .name("audit-log".into())
            .spawn(move || write_until_closed(receiver, sinks, writer_node))
            .context("cannot start the audit log writer")?;
        Ok(Self {
            recent: Arc::default(),
            inner: Some(Arc::new(Inner {
                sender,
                node,
                dropped,
                closed: AtomicBool::new(false),
                writer: Mutex::new(Some(writer)),
            })),
        })
    }

    pub fn is_enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// Keeps the event `build` makes among the recent events and queues it
    /// for the audit log when that is on, without ever waiting.
    pub fn record(&self, build: impl FnOnce() -> AuditEvent) {
        let event = build();
        self.recent.push(SystemTime::now(), event.clone());
        let Some(inner) = &self.inner else {
            return;
        };
        if inner.closed.load(Ordering::Acquire) {
            inner.dropped.inc();
            tracing::warn!(event = ?event, "audit event after the audit log was closed: not written");
            return;
        }
        match inner
            .sender
            .try_send(Message::Event(Box::new((SystemTime::now(), event))))
        {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                let dropped = inner.dropped.inc() + 1;
                // A warning for the first loss and then every thousandth, so
                // a disk that cannot keep up does not flood the log as well.
                if dropped % 1000 == 1 {
                    tracing::warn!(
                        dropped,
                        "audit log queue full (the disk does not keep up): events dropped; see devstreams_audit_events_dropped_total"
                    );
                }
            }
        }
    }

    /// Writes what is queued, flushes, fsyncs and stops the writer. Called
    /// once the relay has stopped (every stream ended and recorded); events
    /// recorded afterwards are counted as dropped.
    pub async fn close(&self) {
        let Some(inner) = self.inner.clone() else {
            return;
        };
        let finished = tokio::task::spawn_blocking(move || {
            if inner.closed.swap(true, Ordering::AcqRel) {
                return;
            }
            // Blocking is right here: the writer is draining, so there is
            // room soon, and nothing else is left to run.
            let _ = inner.sender.send(Message::Close);
            let writer = inner
                .writer
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .take();
            if let Some(writer) = writer {
                let _ = writer.join();
            }
        });
        if tokio::time::timeout(CLOSE_DEADLINE, finished)
            .await
            .is_err()
        {
            tracing::warn!(
                deadline = ?CLOSE_DEADLINE,
                "the audit log writer did not finish in time; its last lines may be missing"
            );
        }
    }

    /// The recent events (with or without an audit log), newest first.
    pub fn recent(&self) -> Vec<(SystemTime, AuditEvent)> {
        self.recent.newest_first()
    }

    /// The node name on each line, when clustered.
    pub fn node(&self) -> Option<&str> {
        self.inner.as_ref()?.node.as_deref()
    }
}

/// The writer thread: a batch is whatever is queued; each batch is flushed.
fn write_until_closed(receiver: Receiver<Message>, mut sinks: Vec<Sink>, node: Option<String>) {
    let mut line = Vec::with_capacity(512);
    let mut failing = false;
    let mut write = |sinks: &mut Vec<Sink>, at: SystemTime, event: &AuditEvent| {
        line.clear();
        let record = Line {
            time: rfc3339(at),
            node: node.as_deref(),
            event,
        };
        if serde_json::to_writer(&mut line, &record).is_err() {
            return;
        }
        line.push(b'\n');
        for sink in sinks.iter_mut() {
            if let Err(error) = sink.write_line(&line) {
                if !failing {
                    tracing::error!(%error, "cannot write the audit log; events are being lost");
                }
                failing = true;
            }
        }
    };
    loop {
        let mut closing = false;
        match receiver.recv() {
            Ok(Message::Event(event)) => write(&mut sinks, event.0, &event.1),
            Ok(Message::Close) | Err(_) => closing = true,
        }
        // The rest of the batch, and on close everything still queued.
        loop {
            match receiver.try_recv() {
                Ok(Message::Event(event)) => write(&mut sinks, event.0, &event.1),
                Ok(Message::Close) => closing = true,
                Err(_) => break,
            }
        }
        for sink in &mut sinks {
            let _ = sink.flush();
        }
        if closing {
            for sink in &mut sinks {
                let _ = sink.sync();
            }
            return;
        }
    }
}

/// `2024-05-01T12:00:00.123456Z`.
fn rfc3339(at: SystemTime) -> String {
    time::OffsetDateTime::from(at)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

enum Sink {
    Stdout,
    File(RotatingFile),
}

impl Sink {
    fn write_line(&mut self, line: &[u8]) -> std::io::Result<()> {
        match self {
            Sink::Stdout => std::io::stdout().lock().write_all(line),
            Sink::File(file) => file.write_line(line),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Sink::Stdout => std::io::stdout().lock().flush(),
            Sink::File(file) => file.output.flush(),
        }
    }

    fn sync(&mut self) -> std::io::Result<()> {
        match self {
            Sink::Stdout => Ok(()),
            Sink::File(file) => {
                file.output.flush()?;
                file.output.get_ref().sync_all()
            }
        }
    }
}

/// A file rotated by size: `path` → `path.1` → … → `path.{max_files}`.
struct RotatingFile {
    path: PathBuf,
    output: BufWriter<File>,
    size: u64,
    max_size: u64,
    max_files: usize,
}

impl RotatingFile {
    fn open(path: &Path, max_size: u64, max_files: usize) -> std::io::Result<Self> {
        let file = open_append(path)?;
        let size = file.metadata()?.len();
        Ok(Self {
            path: path.to_path_buf(),
            output: BufWriter::new(file),
            size,
            max_size,
            max_files,
        })
    }

    fn write_line(&mut self, line: &[u8]) -> std::io::Result<()> {
        let length = line.len() as u64;
        if self.max_size > 0 && self.size > 0 && self.size + length > self.max_size {
            self.rotate()?;
        }
        self.output.write_all(line)?;
        self.size += length;
        Ok(())
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        self.output.flush()?;
        self.output.get_ref().sync_all()?;
        let numbered = |index: usize| {
            let mut name = self.path.clone().into_os_string();
            name.push(format!(".{index}"));
            PathBuf::from(name)
        };
        if self.max_files == 0 {
            std::fs::remove_file(&self.path)?;
        } else {
            let _ = std::fs::remove_file(numbered(self.max_files));
            for index in (1..self.max_files).rev() {
                let from = numbered(index);
                if from.exists() {
                    std::fs::rename(&from, numbered(index + 1))?;
                }
            }
            std::fs::rename(&self.path, numbered(1))?;
        }
        self.output = BufWriter::new(open_append(&self.path)?);
        self.size = 0;
        Ok(())
    }
}

/// Appends, creating the file readable by its owner and group only: the
/// log says who reached which device from where.
fn open_append(path: &Path) -> std::io::Result<File> {
    let mut options = OpenOptions::new();
    options.append(true).create(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o640);
    }
    options.open(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_mebibytes_unless_a_unit_says_otherwise() {
        assert_eq!(parse_size("100"), Ok(100 * 1024 * 1024));
        assert_eq!(parse_size("64KiB"), Ok(64 * 1024));
        assert_eq!(parse_size("4096B"), Ok(4096));
        assert_eq!(parse_size("1GiB"), Ok(1024 * 1024 * 1024));
        assert!(parse_size("ten").is_err());
        assert!(parse_size("5TB").is_err());
        assert!(parse_size("99999999999999999999").is_err());
    }

    #[test]
    fn lines_carry_time_node_and_event_kind() {
        let event = AuditEvent::StreamAccepted {
            stream_id: "s".into(),
            device_id: "d".into(),
        };
        let line = Line {
            time: rfc3339(SystemTime::UNIX_EPOCH),
            node: Some("relay-1"),
            event: &event,
        };
        let text = serde_json::to_string(&line).unwrap();
        assert_eq!(
            text,
            r#"{"time":"1970-01-01T00:00:00Z","node":"relay-1","event":"stream_accepted","stream_id":"s","device_id":"d"}"#
        );
    }

    #[test]
    fn rotation_keeps_whole_lines_and_a_bounded_number_of_files() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("audit.log");
        let mut file = RotatingFile::open(&path, 100, 2).unwrap();
        for index in 0..50 {
            file.write_line(
                format!("{{\"line\":{index},\"pad\":\"{}\"}}\n", "x".repeat(20)).as_bytes(),
            )
            .unwrap();
        }
        file.output.flush().unwrap();
        let mut names: Vec<String> = std::fs::read_dir(directory.path())
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["audit.log", "audit.log.1", "audit.log.2"]);
        let mut last = None;
        for name in ["audit.log.2", "audit.log.1", "audit.log"] {
            let text = std::fs::read_to_string(directory.path().join(name)).unwrap();
            assert!(text.len() <= 100, "{name} is {} bytes", text.len());
            for line in text.lines() {
                let value: serde_json::Value = serde_json::from_str(line).unwrap();
                let index = value["line"].as_u64().unwrap();
                if let Some(last) = last {
                    assert_eq!(index, last + 1, "lines in order across files");
                }
                last = Some(index);
            }
        }
        assert_eq!(last, Some(49));
    }

    #[tokio::test]
    async fn a_full_queue_drops_and_counts_and_close_writes_everything_queued() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("audit.log");
        let mut config = AuditConfig::new(vec![AuditOutput::File(path.clone())]);
        config.queue_length = 4;
        let dropped = Counter::default();
        let audit = Audit::open(&config, None, dropped.clone()).unwrap();
        for index in 0..10_000 {
            audit.record(|| AuditEvent::StreamAccepted {
                stream_id: index.to_string(),
                device_id: "d".into(),
            });
        }
        audit.close().await;
        let written = std::fs::read_to_string(&path).unwrap().lines().count() as u64;
        assert_eq!(
            written + dropped.get(),
            10_000,
            "every event written or counted"
        );
        assert!(written >= 4);
        audit.record(|| AuditEvent::StreamAccepted {
            stream_id: "late".into(),
            device_id: "d".into(),
        });
        assert_eq!(dropped.get(), 10_000 - written + 1);
    }
}
