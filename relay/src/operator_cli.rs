//! The operator's commands that go beyond the identity registry: policies
//! with rights (`relay policy …`), and live state from the running relay
//! (`relay device list`, `relay stream list|close`). `main.rs` parses;
//! the work is here, for a single relay's data dir or for a cluster.

use std::path::Path;
use std::time::SystemTime;

use anyhow::Context;

use crate::admin_client::{render_devices, render_streams, AdminClient};
use crate::cluster::Cluster;
use crate::data_dir::{DataDir, REGISTRY_POLICY};
use crate::registry::{generate_key, validate_policy_name, PolicyRecord, Registry, RegistryError};
use crate::rights::{Right, Rights};

/// What `relay policy …` asks.
pub enum PolicyAction {
    Add { name: String, rights: Rights },
    List,
    Remove { name: String },
    RotateKey { name: String, secondary: bool },
}

/// Parses `--rights`: a comma-separated list, at least one right.
pub fn parse_rights(text: &str) -> Result<Rights, String> {
    let rights = Rights::parse(text)?;
    if rights.is_empty() {
        return Err(
            "name at least one right: service-connect, registry-read, registry-write".into(),
        );
    }
    Ok(rights)
}

fn print_policy_line(policy: &PolicyRecord) {
    println!("{}\t{}", policy.name, policy.rights);
}

/// `relay policy add|list|remove|rotate-key` on a data dir. `add` and
/// `rotate-key` print the policy's connection string for `host`.
pub fn policy_in_data_dir(
    data_dir: &DataDir,
    host: impl Fn() -> anyhow::Result<String>,
    action: PolicyAction,
) -> anyhow::Result<()> {
    let registry = data_dir.registry()?;
    match action {
        PolicyAction::Add { name, rights } => {
            let policy = registry.add_policy(&name, rights)?;
            print_connection_string(&host()?, &policy, false)
        }
        PolicyAction::List => {
            for policy in registry.list_policies()? {
                print_policy_line(&policy);
            }
            Ok(())
        }
        PolicyAction::Remove { name } => {
            registry.remove_policy(&name)?;
            eprintln!("relay: removed policy {name}; its tokens stop working within a second");
            Ok(())
        }
        PolicyAction::RotateKey { name, secondary } => {
            let policy = registry.rotate_policy_key(&name, secondary)?;
            print_connection_string(&host()?, &policy, secondary)
        }
    }
}

/// The same on a cluster.
pub async fn policy_in_cluster(
    cluster: &Cluster,
    host: &str,
    action: PolicyAction,
) -> anyhow::Result<()> {
    match action {
        PolicyAction::Add { name, rights } => {
            validate_policy_name(&name)?;
            if cluster.policy(&name).await?.is_some() {
                return Err(RegistryError::PolicyExists(name).into());
            }
            let policy = PolicyRecord {
                name,
                primary_key: generate_key(),
                secondary_key: generate_key(),
                rights,
            };
            cluster.put_policy(&policy).await?;
            print_connection_string(host, &policy, false)
        }
        PolicyAction::List => {
            for policy in cluster.list_policies().await? {
                print_policy_line(&policy);
            }
            Ok(())
        }
        PolicyAction::Remove { name } => {
            cluster.remove_policy(&name).await?;
            eprintln!("relay: removed policy {name}; its tokens stop working within a second");
            Ok(())
        }
        PolicyAction::RotateKey { name, secondary } => {
            let mut policy = cluster
                .policy(&name)
                .await?
                .ok_or_else(|| RegistryError::NoSuchPolicy(name.clone()))?;
            if secondary {
                policy.secondary_key = generate_key();
            } else {
                policy.primary_key = generate_key();
            }
            cluster.put_policy(&policy).await?;
            print_connection_string(host, &policy, secondary)
        }
    }
}

fn print_connection_string(
    host: &str,
    policy: &PolicyRecord,
    secondary: bool,
) -> anyhow::Result<()> {
    let key = if secondary {
        &policy.secondary_key
    } else {
        &policy.primary_key
    };
    println!(
        "{}",
        framing::ConnectionString::for_policy(host, &policy.name, key)?.to_secret_string()
    );
    Ok(())
}

/// The admin API of the relay serving `data_dir`: `admin_url` when given,
/// else the address the relay recorded; `None` when neither is known.
fn admin_client(
    data_dir: &DataDir,
    admin_url: Option<&str>,
) -> anyhow::Result<Option<AdminClient>> {
    let url = match admin_url {
        Some(url) => url.to_string(),
        None => match DataDir::recorded_admin_url(&data_dir.path) {
            Some(url) => url,
            None => return Ok(None),
        },
    };
    let registry = data_dir.registry()?;
    let policy = registry
        .policy(REGISTRY_POLICY)?
        .filter(|policy| {
            policy.rights.has(Right::RegistryWrite) && policy.rights.has(Right::RegistryRead)
        })
        .ok_or_else(|| {
            anyhow::anyhow!(
            "the registry has no {REGISTRY_POLICY} policy with registry-read and registry-write: \
             start `relay serve` once on this data dir (it adds it), or \
             `relay policy add {REGISTRY_POLICY} --rights registry-read,registry-write`"
        )
        })?;
    // A self-signed relay's certificate is in its data dir.
    let certificate = data_dir.certificate_path();
    let extra_ca = certificate.is_file().then_some(certificate.as_path());
    AdminClient::new(&url, &policy, extra_ca).map(Some)
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// `relay device list`: live state from the running relay when it can be
/// reached; else the registry alone, saying so on stderr.
pub fn device_list(data_dir: &DataDir, admin_url: Option<&str>) -> anyhow::Result<()> {
    let client = admin_client(data_dir, admin_url)?;
    let fallback_reason = match &client {
        None => "no running relay with --admin-listen recorded its address in the data dir (pass --admin-url)".to_string(),
        Some(client) => match runtime()?.block_on(client.request(http::Method::GET, "/api/devices")) {
            Ok(answer) => {
                print!("{}", render_devices(&answer, SystemTime::now()));
                return Ok(());
            }
            Err(error) => format!("{error:#}"),
        },
    };
    eprintln!("relay: note: showing the registry only, without online state: {fallback_reason}");
    for record in data_dir.registry()?.list_devices()? {
        println!(
            "{}{}",
            record.device_id,
            if record.enabled { "" } else { " (disabled)" }
        );
    }
    Ok(())
}

/// `relay stream list` / `relay stream close ID`: need the running relay.
pub fn stream_command(
    data_dir_path: &Path,
    admin_url: Option<&str>,
    close: Option<&str>,
) -> anyhow::Result<()> {
    let data_dir = DataDir::open_existing(data_dir_path)?;
    let client = admin_client(&data_dir, admin_url)?.ok_or_else(|| {
        anyhow::anyhow!(
            "no running relay recorded its admin address in {}: start it with --admin-listen 127.0.0.1:9090, \
             or pass --admin-url http://HOST:PORT (https:// with --admin-tls)",
            data_dir_path.display()
        )
    })?;
    let runtime = runtime()?;
    match close {
        None => {
            let answer = runtime.block_on(client.request(http::Method::GET, "/api/streams"))?;
            print!("{}", render_streams(&answer, SystemTime::now()));
        }
        Some(stream_id) => {
            let path = format!(
                "/api/streams/{}",
                percent_encoding::utf8_percent_encode(stream_id, framing::sas::COMPONENT)
            );
            runtime.block_on(client.request(http::Method::DELETE, &path))?;
            eprintln!("relay: closed stream {stream_id}");
        }
    }
    Ok(())
}
