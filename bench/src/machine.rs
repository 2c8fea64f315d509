//! What the figures were measured on and with: cores, CPU, kernel, memory,
//! compiler, the commit under test and the versions of every program. A
//! benchmark figure without these cannot be compared with anything.

use std::path::Path;
use std::time::Duration;

use crate::child::run_to_completion;

#[derive(Debug, Clone)]
pub struct Machine {
    pub cores: usize,
    pub cpu_model: String,
    pub kernel: String,
    pub memory: String,
    pub rustc: String,
    pub commit: String,
}

const VERSION_TIMEOUT: Duration = Duration::from_secs(10);

impl Machine {
    pub async fn describe(workspace_root: &Path) -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|line| line.strip_prefix("model name"))
            .and_then(|rest| rest.split_once(':'))
            .map(|(_, model)| model.trim().to_string())
            .unwrap_or_else(|| "unknown".into());
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|text| text.trim().to_string())
            .unwrap_or_default();
        let memory = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|text| {
                let kibibytes: u64 = text
                    .lines()
                    .find_map(|line| line.strip_prefix("MemTotal:"))?
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()?;
                Some(format!("{:.1} GiB", kibibytes as f64 / 1024.0 / 1024.0))
            })
            .unwrap_or_default();
        let rustc = first_line(Path::new("rustc"), &["-V"]).await;
        let root = workspace_root.to_string_lossy().to_string();
        let head = first_line(
            Path::new("git"),
            &["-C", &root, "rev-parse", "--short", "HEAD"],
        )
        .await;
        let changes = run_to_completion(
            Path::new("git"),
            &["-C".into(), root, "status".into(), "--porcelain".into()],
            VERSION_TIMEOUT,
        )
        .await
        .map(|status| !status.trim().is_empty())
        .unwrap_or(false);
        let commit = if changes {
            format!("{head} + uncommitted changes")
        } else {
            head
        };
        Machine {
            cores: std::thread::available_parallelism()
                .map(|cores| cores.get())
                .unwrap_or(1),
            cpu_model,
            kernel,
            memory,
            rustc,
            commit,
        }
    }
}

/// The first line of a program's output, or "unknown".
pub async fn first_line(program: &Path, arguments: &[&str]) -> String {
    let arguments: Vec<String> = arguments
        .iter()
        .map(|argument| argument.to_string())
        .collect();
    run_to_completion(program, &arguments, VERSION_TIMEOUT)
        .await
        .ok()
        .and_then(|output| {
            output
                .lines()
                .map(str::trim)
                .find(|line| !line.is_empty())
                .map(str::to_string)
        })
        .unwrap_or_else(|| "unknown".into())
}

/// A program's version line; rathole prints a build table, from which the
/// `Build Version:` line is taken.
pub async fn program_version(program: &Path) -> String {
    let arguments = ["--version".to_string()];
    let Ok(output) = run_to_completion(program, &arguments, VERSION_TIMEOUT).await else {
        return "unknown".into();
    };
    if let Some(version) = output
        .lines()
        .find_map(|line| line.trim().strip_prefix("Build Version:"))
    {
        let name = program
            .file_name()
            .map(|name| name.to_string_lossy().to_string())
            .unwrap_or_default();
        return format!("{name} {}", version.trim());
    }
    output
        .lines()
        .map(str::trim)
        .find(|line| !line.is_empty())
        .unwrap_or("unknown")
        .to_string()
}
