//! Start-up and the handle of a serving relay: opens the data dir, binds
//! the listeners (main, MQTT over TLS, admin), starts their accept loops and
//! the registry follower (which cuts removed, disabled and re-keyed
//! devices). [`RunningRelay`] owns all of it and shuts it down in order:
//! stop accepting, let streams drain, then cut.
//!
//! What runs on a connection lives elsewhere: [`crate::tls`] builds the
//! acceptors, [`crate::listeners`] accepts and applies the connection caps,
//! [`crate::http_service`] routes HTTP, [`crate::admin`] serves `/metrics`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use framing::stream_token::StreamTokenKey;

use crate::cluster::Cluster;
use crate::config::RelayConfig;
use crate::data_dir::{DataDir, HOST_NAME_SETTING, REGISTRY_POLICY, SERVICE_POLICY};
use crate::listeners::{accept_loop, bind_listener, Endpoint, OpenConnections};
use crate::registry::{self, ClusterSource, SnapshotRegistry, SqliteSource};
use crate::rights::Rights;
use crate::state::RelayState;
use crate::{admin, tls};

/// A serving relay.
pub struct RunningRelay {
    pub local_address: SocketAddr,
    /// The MQTT-over-TLS listener's address, when it is on.
    pub mqtt_address: Option<SocketAddr>,
    /// The admin listener's address (`/metrics`), when it is on.
    pub admin_address: Option<SocketAddr>,
    /// Whether the admin listener speaks TLS (`--admin-tls`).
    pub admin_tls: bool,
    /// `host:port` that clients should use (connection strings' HostName).
    pub host_name: String,
    pub service_connection_string: String,
    /// The certificate clients pass as `--ca-cert`, when self-signed.
    pub certificate_path: Option<PathBuf>,
    /// Whether the listener speaks TLS.
    pub tls: bool,
    /// With --cluster: which cluster this node joined and as whom, for
    /// the start-up lines.
    pub cluster: Option<String>,
    state: Arc<RelayState>,
}

impl RunningRelay {
    /// Stops accepting, closes control channels, lets live streams finish
    /// until the drain deadline, then cuts what is left.
    pub async fn shutdown(self) {
        let drain = self.state.config.limits.drain_timeout;
        self.state.stop_accepting.cancel();
        self.state.tasks.close();
        if tokio::time::timeout(drain, self.state.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                ?drain,
                "drain deadline passed; cutting the remaining streams"
            );
            self.state.stop_streams.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(5), self.state.tasks.wait()).await;
        }
        if let Some(cluster) = &self.state.cluster {
            cluster.leave().await;
        }
        // Last: every stream has ended and recorded how.
        self.state.audit.close().await;
    }

    pub fn active_streams(&self) -> usize {
        self.state.admission.active_streams()
    }

    /// Control channels (devices and modules) connected to this relay.
    pub fn connected_devices(&self) -> usize {
        self.state.presence.connected_count()
    }
}

/// `host` of a `wss://host:port/...` URL.
fn url_authority(url: &str) -> Option<&str> {
    let rest = url.split_once("://").map(|(_, rest)| rest)?;
    rest.split('/')
        .next()
        .filter(|authority| !authority.is_empty())
}

/// Where the serving registry's snapshots come from.
enum RegistrySource {
    File(SqliteSource),
    Cluster(Box<ClusterSource>),
}

/// Where the identities are kept: a single relay's registry file (opened
/// before the listeners, as it always was: the order of a process's
/// descriptors decides which socket the kernel closes first when the relay
/// is killed, which tests of a killed relay see), or the cluster.
enum Store {
    File(crate::registry::SqliteRegistry),
    Cluster(Arc<Cluster>),
}

/// Opens the data dir, joins the cluster when configured, binds the
/// listeners and starts serving.
pub async fn start(config: RelayConfig) -> anyhow::Result<RunningRelay> {
    if config.admin_tls && matches!(config.tls, crate::config::TlsMode::Disabled) {
        anyhow::bail!(
            "--admin-tls uses the main listener's certificate, and --no-tls turned TLS off: \
             drop one of them"
        );
    }
    // Joined first: a bad cluster configuration fails before anything is
    // bound, with the one line ClusterError gives. A node's data dir holds
    // only its TLS files, and a mark that sends `relay device …` without
    // --cluster to the cluster instead of to a registry no node reads.
    let (data_dir, store) = match &config.cluster {
        Some(cluster_config) => {
            let data_dir = DataDir::create_without_registry(&config.data_dir)?;
            let cluster = Arc::new(Cluster::connect(cluster_config).await?);
            data_dir.mark_cluster_node(cluster.url())?;
            (data_dir, Store::Cluster(cluster))
        }
        None => {
            let data_dir = DataDir::create_or_open(&config.data_dir)?;
            data_dir.clear_cluster_node_mark()?;
            let registry = data_dir.registry()?;
            (data_dir, Store::File(registry))
        }
    };
    let cluster = match &store {
        Store::Cluster(cluster) => Some(cluster.clone()),
        Store::File(_) => None,
    };
    let secret = match &store {
        Store::Cluster(cluster) => cluster
            .ensure_stream_token_secret()
            .await
            .context("cannot read the cluster's stream-token secret")?,
        Store::File(_) => data_dir.stream_token_secret()?,
    };
    let listener = bind_listener(config.listen).with_context(|| {
        format!(
            "cannot listen on {}: choose another --listen address or stop the program that uses it",
            config.listen
        )
    })?;
    let local_address = listener.local_addr()?;
    let mqtt_listener = match config.mqtt_listen {
        None => None,
        Some(address) => Some(bind_listener(address).with_context(|| {
            format!(
                "cannot listen for MQTT on {address}: choose another --mqtt-listen address, stop the program that uses it, \
                 or turn the MQTT listener off with --no-mqtt"
            )
        })?),
    };
    let mqtt_address = match &mqtt_listener {
        Some(listener) => Some(listener.local_addr()?),
        None => None,
    };
    let admin_listener = match config.admin_listen {
        None => None,
        Some(address) => Some(bind_listener(address).with_context(|| {
            format!(
                "cannot listen for admin requests on {address}: choose another --admin-listen address \
                 or stop the program that uses it"
            )
        })?),
    };
    let admin_address = match &admin_listener {
        Some(listener) => Some(listener.local_addr()?),
        None => None,
    };
    let host_name = match config.public_url.as_deref().and_then(url_authority) {
        Some(authority) => authority.to_string(),
        // Clients on an IPv6-only loopback listener must not try 127.0.0.1.
        None if local_address.ip() == std::net::Ipv6Addr::LOCALHOST => {
            format!("[::1]:{}", local_address.port())
        }
        None if local_address.ip().is_loopback() || local_address.ip().is_unspecified() => {
            format!("localhost:{}", local_address.port())
        }
        None => local_address.to_string(),
    };
    let (host_name, policy) = match &store {
        Store::File(registry) => {
            registry.set_setting(HOST_NAME_SETTING, &host_name)?;
            (
                host_name,
                registry.ensure_policy(SERVICE_POLICY, Rights::SERVICE_CONNECT)?,
            )
        }
        Store::Cluster(cluster) => {
            // The first node records the HostName for connection strings;
            // a node told the balancer's name (--host-name, or --public-url)
            // replaces it.
            let told = config
                .cluster
                .as_ref()
                .and_then(|cluster| cluster.host_name.clone());
            let replace = told.is_some() || config.public_url.is_some();
            cluster
                .set_host_name(told.as_deref().unwrap_or(&host_name), replace)
                .await
                .context("cannot record the host name in the cluster")?;
            let host_name = cluster.host_name().await?.unwrap_or(host_name);
            let policy = cluster
                .ensure_policy(SERVICE_POLICY, Rights::SERVICE_CONNECT)
                .await
                .context("cannot read the service policy from the cluster")?;
            cluster
                .ensure_policy(REGISTRY_POLICY, Rights::REGISTRY_READ_WRITE)
                .await
                .context("cannot create the registryReadWrite policy in the cluster")?;
            (host_name, policy)
        }
    };
    let service_connection_string =
        framing::ConnectionString::for_policy(&host_name, SERVICE_POLICY, &policy.primary_key)?
            .to_secret_string();
    let acceptors = tls::acceptors(&config, &data_dir, &host_name)?;
    let certificate_path = acceptors
        .as_ref()
        .and_then(|acceptors| acceptors.generated_certificate.clone());
    let mut config = config;
    config.listen = local_address;
    config.mqtt_listen = mqtt_address;
    config.admin_listen = admin_address;
    // Loaded after this process's own writes above, so it holds them.
    let registry_source = match &store {
        Store::File(_) => {
            let (source, snapshot) = SqliteSource::open(&data_dir.registry_path())
                .context("cannot load the registry")?;
            (RegistrySource::File(source), snapshot)
        }
        Store::Cluster(cluster) => {
            let (source, snapshot) = ClusterSource::load(cluster)
                .await
                .context("cannot load the registry from the cluster")?;
            (RegistrySource::Cluster(Box::new(source)), snapshot)
        }
    };
    let (registry_source, snapshot) = registry_source;
    let snapshot_registry = Arc::new(SnapshotRegistry::new(snapshot));
    let metrics = crate::metrics::Metrics::default();
    let audit = match &config.audit {
        Some(audit_config) => crate::audit::Audit::open(
            audit_config,
            cluster
                .as_ref()
                .and_then(|cluster| cluster.node())
                .map(|node| node.name.clone()),
            metrics.audit_events_dropped.clone(),
        )?,
        None => crate::audit::Audit::disabled(),
    };
    let state = RelayState::assemble(
        config,
        snapshot_registry.clone(),
        StreamTokenKey::from_secret(&secret),
        cluster,
        metrics,
        audit,
    );
    let tls = acceptors.is_some();
    let cluster_description = state.cluster.as_ref().map(|cluster| match cluster.node() {
        Some(node) => format!(
            "joined {} as node {:?} (node URL {})",
            cluster.url(),
            node.name,
            node.url
        ),
        None => format!("joined {}", cluster.url()),
    });
    // Every takeover announcement reaches this node before it serves a
    // device (crate::cluster::presence).
    if let Some(cluster) = state.cluster.clone() {
        let takeovers = crate::cluster::presence::subscribe_takeovers(cluster.client())
            .await
            .context("cannot subscribe to the cluster's takeover announcements on NATS")?;
        state
            .tasks
            .spawn(crate::cluster::presence::dispatch_takeovers(
                state.clone(),
                takeovers,
            ));
    }
    let open_connections = OpenConnections::default();
    let (main_acceptor, mqtt_acceptor) = match acceptors {
        Some(acceptors) => (Some(acceptors.main), Some(acceptors.mqtt)),
        None => (None, None),
    };
    // Checked at the start: with --admin-tls there is a main acceptor.
    let admin_acceptor = main_acceptor
        .as_ref()
        .filter(|_| state.config.admin_tls)
        .cloned();
    let admin_tls = admin_acceptor.is_some();
    if let Some(address) = admin_address.filter(|address| admin::exposed(*address, admin_tls)) {
        tracing::warn!(
            %address,
            "the admin listener speaks plain HTTP on an address other machines can reach: \
             console sign-ins and API tokens cross the network unencrypted; add --admin-tls, \
             or bind --admin-listen to 127.0.0.1"
        );
    }
    state.tasks.spawn(accept_loop(
        state.clone(),
        listener,
        main_acceptor,
        Endpoint::Main,
        open_connections.clone(),
    ));
    if let Some(mqtt_listener) = mqtt_listener {
        state.tasks.spawn(accept_loop(
            state.clone(),
            mqtt_listener,
            mqtt_acceptor,
            Endpoint::Mqtt,
            open_connections,
        ));
    }
    if let Some(admin_listener) = admin_listener {
        state.tasks.spawn(admin::accept_loop(
            state.clone(),
            admin_listener,
            admin_acceptor,
        ));
    }
    // Registry changes (another process's `relay device …`) are followed
    // here; unpaired streams expire by their own timers (crate::pairing).
    if state.cluster.is_some() {
        state
            .tasks
            .spawn(crate::cluster::heartbeat::run(state.clone()));
    }
    match registry_source {
        RegistrySource::File(source) => {
            state
                .tasks
                .spawn(registry::follow(state.clone(), snapshot_registry, source));
        }
        RegistrySource::Cluster(source) => {
            state.tasks.spawn(registry::follow_cluster(
                state.clone(),
                snapshot_registry,
                *source,
            ));
        }
    }
    // For `relay device list` and `relay stream …` on this host.
    if let Err(error) = data_dir.record_admin_address(admin_address, admin_tls) {
        tracing::warn!(error = %format!("{error:#}"), "cannot record the admin address in the data dir");
    }
    tracing::info!(%local_address, mqtt_address = ?mqtt_address, admin_address = ?admin_address, tls, "relay serving");
    Ok(RunningRelay {
        local_address,
        mqtt_address,
        admin_address,
        admin_tls,
        host_name,
        service_connection_string,
        certificate_path,
        tls,
        cluster: cluster_description,
        state,
    })
}
