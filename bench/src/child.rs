//! A process the bench started: its ready lines on stdout, its log file, and
//! its end.
//!
//! Every child is stopped by its own PID when the bench is done with it
//! (SIGTERM, then SIGKILL; or SIGKILL when the handle is dropped, should the
//! bench fail half-way), never by name: other people's processes on the machine are not ours to stop.
//! stderr (and, for the peers, stdout) goes to a log file, so a chatty
//! process can never block on a full pipe; our own binaries print their ready
//! lines on stdout, which is read line by line and then drained.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};
use tokio::task::JoinHandle;

/// Where a child's stdout goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stdout {
    /// Read by the bench for ready lines, then drained.
    Piped,
    /// Appended to the log file with stderr.
    Logged,
}

/// How long a child may take to exit on SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(5);

pub struct ChildProcess {
    name: String,
    child: Child,
    pid: u32,
    log_path: PathBuf,
    stdout_lines: Option<Lines<BufReader<ChildStdout>>>,
    drain: Option<JoinHandle<()>>,
}

impl ChildProcess {
    pub fn spawn(
        name: &str,
        program: &Path,
        arguments: &[String],
        log_directory: &Path,
        environment: &[(&str, &str)],
        stdout: Stdout,
    ) -> anyhow::Result<ChildProcess> {
        let log_path = log_directory.join(format!("{}.log", name.replace(' ', "-")));
        let log = std::fs::File::create(&log_path)
            .with_context(|| format!("cannot create {}", log_path.display()))?;
        let stdout_target = match stdout {
            Stdout::Piped => Stdio::piped(),
            Stdout::Logged => Stdio::from(
                log.try_clone()
                    .context("cannot share the log file with stdout")?,
            ),
        };
        let mut command = Command::new(program);
        command
            .args(arguments)
            .stdin(Stdio::null())
            .stdout(stdout_target)
            .stderr(Stdio::from(log))
            .kill_on_drop(true);
        for (key, value) in environment {
            command.env(key, value);
        }
        let mut child = command
            .spawn()
            .with_context(|| format!("cannot start {name} ({})", program.display()))?;
        let Some(pid) = child.id() else {
            bail!(
                "{name} exited as soon as it started; see {}",
                log_path.display()
            );
        };
        let stdout_lines = child
            .stdout
            .take()
            .map(|stdout| BufReader::new(stdout).lines());
        Ok(ChildProcess {
            name: name.to_string(),
            child,
            pid,
            log_path,
            stdout_lines,
            drain: None,
        })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads stdout until a line starting with `prefix`; returns the rest of
    /// that line, trimmed.
    pub async fn wait_for_line(
        &mut self,
        prefix: &str,
        timeout: Duration,
    ) -> anyhow::Result<String> {
        let Some(lines) = self.stdout_lines.as_mut() else {
            bail!("{}: stdout is not piped", self.name);
        };
        let found = tokio::time::timeout(timeout, async {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(rest) = line.strip_prefix(prefix) {
                    return Some(rest.trim().to_string());
                }
            }
            None
        })
        .await;
        match found {
            Ok(Some(rest)) => Ok(rest),
            Ok(None) => bail!(
                "{} exited before printing {prefix:?}; its log:\n{}",
                self.name,
                self.log_tail()
            ),
            Err(_) => bail!(
                "{} did not print {prefix:?} within {timeout:?}; its log:\n{}",
                self.name,
                self.log_tail()
            ),
        }
    }

    /// Discards the rest of stdout, so the child never blocks on a full pipe.
    pub fn drain_stdout(&mut self) {
        if let Some(mut lines) = self.stdout_lines.take() {
            self.drain = Some(tokio::spawn(async move {
                while let Ok(Some(_)) = lines.next_line().await {}
            }));
        }
    }

    /// Whether the child has exited (it should not have, while in use).
    pub fn has_exited(&mut self) -> bool {
        !matches!(self.child.try_wait(), Ok(None))
    }

    /// The last lines of the log, for error messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Stops this child: SIGTERM to its PID (so a profiler wrapping it can
    /// write its output), SIGKILL after [`STOP_GRACE`], then reaps it.
    pub async fn stop(mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            // SAFETY: kill(2) with our own child's PID; the child is not yet
            // reaped, so the PID cannot belong to anyone else.
            unsafe { libc::kill(self.pid as libc::pid_t, libc::SIGTERM) };
            if tokio::time::timeout(STOP_GRACE, self.child.wait())
                .await
                .is_err()
            {
                let _ = self.child.start_kill();
            }
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
        if let Some(drain) = self.drain.take() {
            drain.abort();
        }
    }
}

impl ChildProcess {
    /// `kill -9` this child by its PID (a crash, as a test would cause one)
    /// and reaps it.
    pub async fn kill(mut self) {
        let _ = self.child.start_kill();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
        if let Some(drain) = self.drain.take() {
            drain.abort();
        }
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        if let Some(drain) = self.drain.take() {
            drain.abort();
        }
    }
}

/// Runs a program to completion and returns its stdout; fails with its
/// stderr when it exits unsuccessfully.
pub async fn run_to_completion(
    program: &Path,
    arguments: &[String],
    timeout: Duration,
) -> anyhow::Result<String> {
    let mut command = Command::new(program);
    command
        .args(arguments)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let output = tokio::time::timeout(timeout, command.output())
        .await
        .with_context(|| {
            format!(
                "{} {} took longer than {timeout:?}",
                program.display(),
                arguments.join(" ")
            )
        })?
        .with_context(|| format!("cannot run {}", program.display()))?;
    if !output.status.success() {
        bail!(
            "{} {} failed: {}",
            program.display(),
            arguments.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).to_string())
}
