//! The relay's data directory: registry, stream-token secret and TLS files.
//!
//! The first `relay serve` creates everything a working relay needs, so a new
//! user goes from nothing to a running relay with one command. Secrets are
//! written owner-only (0600, directory 0700) before any content lands in
//! them. The CLI subcommands (`relay device …`) open the same directory.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use rand::RngCore;

use crate::registry::SqliteRegistry;

pub const REGISTRY_FILE: &str = "registry.sqlite";
pub const SECRET_FILE: &str = "stream-token.secret";
pub const TLS_DIRECTORY: &str = "tls";
pub const CERTIFICATE_FILE: &str = "cert.pem";
pub const PRIVATE_KEY_FILE: &str = "key.pem";
/// The policy every relay has; service connection strings name it.
pub const SERVICE_POLICY: &str = "service";
/// The policy the registry CLI and the admin API's users sign with
/// (registry-read and registry-write), as IoT Hub names it.
pub const REGISTRY_POLICY: &str = "registryReadWrite";
/// Written by `relay serve` with `--admin-listen`: the admin listener's
/// address, so `relay device list` and `relay stream …` find the running relay.
pub const ADMIN_ADDRESS_FILE: &str = "admin-address";
/// Settings key under which `relay serve` records its public host name, so
/// that `relay device add` prints connection strings that reach it.
pub const HOST_NAME_SETTING: &str = "host_name";
/// Written by a cluster node (`relay serve --cluster`) into its data dir,
/// holding the NATS URL (no password): the registry of that node is in the
/// cluster, so registry commands on the data dir are sent there.
pub const CLUSTER_NODE_FILE: &str = "cluster-node";

pub struct DataDir {
    pub path: PathBuf,
}

impl DataDir {
    /// Opens an existing data dir (for the registry CLI).
    pub fn open_existing(path: &Path) -> anyhow::Result<Self> {
        if !path.join(REGISTRY_FILE).exists() {
            anyhow::bail!(
                "no relay data in {}: run `relay serve --data-dir {}` once to create it, or pass the right --data-dir",
                path.display(),
                path.display()
            );
        }
        Ok(Self {
            path: path.to_path_buf(),
        })
    }

    /// Opens the data dir, creating it and its registry when missing.
    pub fn create_or_open(path: &Path) -> anyhow::Result<Self> {
        create_private_directory(path)?;
        let data_dir = Self {
            path: path.to_path_buf(),
        };
        let registry_path = data_dir.path.join(REGISTRY_FILE);
        if !registry_path.exists() {
            // Create the file owner-only before SQLite writes keys into it.
            write_private_file(&registry_path, b"")?;
        }
        data_dir.ensure_default_policies()?;
        Ok(data_dir)
    }

    /// The policies every relay has: `service` (service-connect) and
    /// `registryReadWrite`. Also upgrades an older data dir: its `service`
    /// keeps its key, and `registryReadWrite` is added.
    pub fn ensure_default_policies(&self) -> anyhow::Result<()> {
        let registry = self.registry()?;
        registry.ensure_policy(SERVICE_POLICY, crate::rights::Rights::SERVICE_CONNECT)?;
        registry.ensure_policy(REGISTRY_POLICY, crate::rights::Rights::REGISTRY_READ_WRITE)?;
        Ok(())
    }

    /// Records the admin listener's URL for the CLI (`relay serve`):
    /// `http://ADDRESS`, or `https://ADDRESS` with `--admin-tls`.
    pub fn record_admin_address(
        &self,
        address: Option<std::net::SocketAddr>,
        tls: bool,
    ) -> anyhow::Result<()> {
        let path = self.path.join(ADMIN_ADDRESS_FILE);
        let scheme = if tls { "https" } else { "http" };
        match address {
            Some(address) => fs::write(&path, format!("{scheme}://{address}\n"))
                .with_context(|| format!("cannot write {}", path.display())),
            None => match fs::remove_file(&path) {
                Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
                    Err(error).with_context(|| format!("cannot remove {}", path.display()))
                }
                _ => Ok(()),
            },
        }
    }

    /// The admin listener's URL the running relay recorded, if any. A bare
    /// address (what relays before `--admin-tls` wrote) is plain HTTP.
    pub fn recorded_admin_url(path: &Path) -> Option<String> {
        let text = fs::read_to_string(path.join(ADMIN_ADDRESS_FILE)).ok()?;
        let text = text.trim();
        let (scheme, address) = match text.split_once("://") {
            Some((scheme @ ("http" | "https"), address)) => (scheme, address),
            Some(_) => return None,
            None => ("http", text),
        };
        let address: std::net::SocketAddr = address.parse().ok()?;
        Some(format!("{scheme}://{address}"))
    }

    /// Opens the data dir, creating the directory but no registry (a
    /// cluster node's: only its TLS files live here).
    pub fn create_without_registry(path: &Path) -> anyhow::Result<Self> {
        create_private_directory(path)?;
        Ok(Self {
            path: path.to_path_buf(),
        })
    }

    /// Records that a cluster node at `cluster_url` uses this data dir.
    pub fn mark_cluster_node(&self, cluster_url: &str) -> anyhow::Result<()> {
        write_private_file(&self.path.join(CLUSTER_NODE_FILE), cluster_url.as_bytes())
    }

    /// Forgets [`Self::mark_cluster_node`] (the dir serves a single relay again).
    pub fn clear_cluster_node_mark(&self) -> anyhow::Result<()> {
        let path = self.path.join(CLUSTER_NODE_FILE);
        match fs::remove_file(&path) {
            Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
                Err(error).with_context(|| format!("cannot remove {}", path.display()))
            }
            _ => Ok(()),
        }
    }

    /// Refuses registry commands without --cluster on a cluster node's
    /// data dir: its devices are in the cluster.
    pub fn refuse_if_cluster_node(path: &Path) -> anyhow::Result<()> {
        match fs::read_to_string(path.join(CLUSTER_NODE_FILE)) {
            Ok(url) => anyhow::bail!(
                "{} belongs to a relay of the cluster at {}: its registry is in the cluster; \
                 add --cluster {} (or set RELAY_CLUSTER)",
                path.display(),
                url.trim(),
                url.trim()
            ),
            Err(_) => Ok(()),
        }
    }

    pub fn registry(&self) -> anyhow::Result<SqliteRegistry> {
        let path = self.registry_path();
        SqliteRegistry::open(&path)
            .with_context(|| format!("cannot open the registry {}", path.display()))
    }

    pub fn registry_path(&self) -> PathBuf {
        self.path.join(REGISTRY_FILE)
    }

    /// The stream-token secret, created on first use.
    pub fn stream_token_secret(&self) -> anyhow::Result<Vec<u8>> {
        let path = self.path.join(SECRET_FILE);
        if !path.exists() {
            let mut secret = [0u8; 32];
            rand::rng().fill_bytes(&mut secret);
            write_private_file(&path, &secret)?;
        }
        let secret = fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
        if secret.len() < 32 {
            anyhow::bail!(
                "{} is shorter than 32 bytes: delete it and restart the relay to create a new one",
                path.display()
            );
        }
        Ok(secret)
    }

    /// The stream-token secret when one was created (export).
    pub fn existing_stream_token_secret(&self) -> anyhow::Result<Option<Vec<u8>>> {
        if !self.path.join(SECRET_FILE).exists() {
            return Ok(None);
        }
        self.stream_token_secret().map(Some)
    }

    /// Writes `secret` as the stream-token secret unless the data dir has
    /// one (import); whether it was written.
    pub fn set_stream_token_secret_if_absent(&self, secret: &[u8]) -> anyhow::Result<bool> {
        let path = self.path.join(SECRET_FILE);
        if path.exists() {
            return Ok(false);
        }
        write_private_file(&path, secret)?;
        Ok(true)
    }

    pub fn certificate_path(&self) -> PathBuf {
        self.path.join(TLS_DIRECTORY).join(CERTIFICATE_FILE)
    }

    pub fn private_key_path(&self) -> PathBuf {
        self.path.join(TLS_DIRECTORY).join(PRIVATE_KEY_FILE)
    }

    /// Writes a self-signed certificate for `names` unless one exists.
    pub fn ensure_self_signed_certificate(&self, names: &[String]) -> anyhow::Result<()> {
        let (certificate_path, key_path) = (self.certificate_path(), self.private_key_path());
        if certificate_path.exists() && key_path.exists() {
            return Ok(());
        }
        create_private_directory(&self.path.join(TLS_DIRECTORY))?;
        let generated = rcgen::generate_simple_self_signed(names.to_vec())
            .context("cannot generate a self-signed certificate")?;
        write_private_file(&key_path, generated.signing_key.serialize_pem().as_bytes())?;
        fs::write(&certificate_path, generated.cert.pem())
            .with_context(|| format!("cannot write {}", certificate_path.display()))?;
        Ok(())
    }
}

fn create_private_directory(path: &Path) -> anyhow::Result<()> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder
        .create(path)
        .with_context(|| format!("cannot create the data directory {}", path.display()))
}

fn write_private_file(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    file.write_all(contents)
        .with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::Registry;

    #[test]
    fn first_start_creates_private_registry_secret_and_certificate() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("relay-data");
        let data_dir = DataDir::create_or_open(&path).unwrap();
        let secret = data_dir.stream_token_secret().unwrap();
        assert_eq!(
            secret,
            data_dir.stream_token_secret().unwrap(),
            "the secret is stable across starts"
        );
        data_dir
            .ensure_self_signed_certificate(&["localhost".into(), "127.0.0.1".into()])
            .unwrap();
        assert!(data_dir.certificate_path().exists());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            for file in [
                path.join(REGISTRY_FILE),
                path.join(SECRET_FILE),
                data_dir.private_key_path(),
            ] {
                let mode = fs::metadata(&file).unwrap().permissions().mode() & 0o777;
                assert_eq!(mode, 0o600, "{}", file.display());
            }
        }
        assert!(data_dir
            .registry()
            .unwrap()
            .policy(REGISTRY_POLICY)
            .is_ok_and(|policy| {
                policy.is_some_and(|policy| {
                    policy.rights == crate::rights::Rights::REGISTRY_READ_WRITE
                })
            }));
    }

    #[test]
    fn the_recorded_admin_url_keeps_its_scheme_and_reads_an_older_bare_address() {
        let directory = tempfile::tempdir().unwrap();
        let data_dir = DataDir::create_or_open(&directory.path().join("relay-data")).unwrap();
        let address: std::net::SocketAddr = "127.0.0.1:9090".parse().unwrap();
        let recorded = || DataDir::recorded_admin_url(&data_dir.path);
        data_dir.record_admin_address(Some(address), true).unwrap();
        assert_eq!(recorded().as_deref(), Some("https://127.0.0.1:9090"));
        data_dir.record_admin_address(Some(address), false).unwrap();
        assert_eq!(recorded().as_deref(), Some("http://127.0.0.1:9090"));
        // What a relay before --admin-tls wrote.
        fs::write(data_dir.path.join(ADMIN_ADDRESS_FILE), "[::1]:9090\n").unwrap();
        assert_eq!(recorded().as_deref(), Some("http://[::1]:9090"));
        fs::write(
            data_dir.path.join(ADMIN_ADDRESS_FILE),
            "ftp://127.0.0.1:9090\n",
        )
        .unwrap();
        assert_eq!(recorded(), None, "an unknown scheme");
        data_dir.record_admin_address(None, false).unwrap();
        assert_eq!(recorded(), None, "removed when the listener is off");
    }

    #[test]
    fn missing_data_dir_is_a_clear_error() {
        let directory = tempfile::tempdir().unwrap();
        let error = DataDir::open_existing(&directory.path().join("nope"))
            .err()
            .unwrap();
        assert!(error.to_string().contains("relay serve"));
    }
}
