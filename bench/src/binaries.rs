//! Finding (and building) the programs the bench runs.
//!
//! The relay and the proxies are measured as users run them: release
//! binaries, built here with `cargo build --release` into the same target
//! directory as the bench itself (so `CARGO_TARGET_DIR` is honoured). The
//! peers come from `bench/peers/bin`, where `bench/install-peers.sh` puts
//! them; a missing peer is a reason string, printed and reported, not an error.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};

/// A release build with fat LTO takes minutes on two cores; this bounds it.
const BUILD_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// The workspace root (the bench crate's parent directory).
pub fn workspace_root() -> PathBuf {
    let manifest_directory = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_directory
        .parent()
        .unwrap_or(manifest_directory)
        .to_path_buf()
}

/// The target directory the running bench was built into: the bench lives
/// at `<target>/<profile>/bench`.
pub fn target_directory() -> anyhow::Result<PathBuf> {
    let executable = std::env::current_exe().context("the bench cannot find its own path")?;
    executable
        .parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .context("the bench is not inside a cargo target directory; pass --binaries DIR")
}

/// `cargo build --release -p relay -p device-proxy -p service-proxy`.
pub async fn build_release(target_directory: &Path) -> anyhow::Result<()> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    eprintln!(
        "bench: building release binaries: cargo build --release -p relay -p device-proxy -p service-proxy --target-dir {}",
        target_directory.display()
    );
    let mut command = tokio::process::Command::new(cargo);
    command
        .args([
            "build",
            "--release",
            "-p",
            "relay",
            "-p",
            "device-proxy",
            "-p",
            "service-proxy",
            "--target-dir",
        ])
        .arg(target_directory)
        .current_dir(workspace_root())
        .kill_on_drop(true);
    let status = tokio::time::timeout(BUILD_TIMEOUT, command.status())
        .await
        .context("the release build took longer than 30 minutes")?
        .context("cannot run cargo")?;
    if !status.success() {
        bail!("cargo build --release failed ({status}); fix the build or pass --no-build with --binaries DIR");
    }
    Ok(())
}

/// One of our binaries in `directory`, which must exist.
pub fn our_binary(directory: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let path = directory.join(name);
    if !path.is_file() {
        bail!(
            "{} is missing; build it with `cargo build --release -p {name}` or drop --no-build",
            path.display()
        );
    }
    Ok(path)
}

/// A peer's binary, or the reason it will be skipped.
pub fn peer_binary(peers_directory: &Path, name: &str) -> Result<PathBuf, String> {
    let path = peers_directory.join(name);
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!(
            "{name} is not installed at {} (run bench/install-peers.sh)",
            path.display()
        ))
    }
}
