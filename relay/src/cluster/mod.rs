//! Cluster mode: several relays sharing one registry through NATS with
//! JetStream (`relay serve --cluster nats://…`).
//!
//! [`Cluster`] is the one connection a node (or a `relay device … --cluster`
//! command) holds: the NATS client, its JetStream context, the node's own
//! identity and the two key-value buckets every node agrees on —
//! [`REGISTRY_BUCKET`] (devices, policies, the stream-token secret; see
//! [`registry`]) and [`NODES_BUCKET`] (heartbeats, with a max age, so a dead
//! node's entry disappears by itself). [`Cluster::connect`] checks
//! everything a node needs before it serves — NATS reachable within a
//! deadline, the credentials accepted, JetStream on, the node's name and URL
//! not used by a live node — so a bad configuration fails at start with one
//! line instead of leaving a half-joined node.
//!
//! Device ids may hold characters NATS gives meaning to (`.`, `*`, `>`), or
//! that keys refuse; [`encode_token`] maps any id to one subject token and
//! key segment, injectively.

pub mod heartbeat;
pub mod presence;
pub mod registry;
pub mod routed_once;
pub mod routing;
pub mod transfer;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::{self, kv};
use serde::{Deserialize, Serialize};

/// The bucket of devices, policies and the stream-token secret.
pub const REGISTRY_BUCKET: &str = "devstreams-registry";
/// The bucket of node heartbeats (key: [`encode_token`] of the node name,
/// value: a [`NodeRecord`] in JSON). Entries expire after
/// [`NODES_MAX_AGE`], so a node that stopped heartbeating drops out.
pub const NODES_BUCKET: &str = "devstreams-nodes";
/// How long a heartbeat stays in [`NODES_BUCKET`].
pub const NODES_MAX_AGE: Duration = Duration::from_secs(15);
/// Default bound on reaching NATS at start.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on each JetStream call made while joining (account check, bucket
/// look-up, node claim), so start-up never hangs on a stuck server.
const JOIN_STEP_TIMEOUT: Duration = Duration::from_secs(5);

/// How to reach the cluster, and who this node is.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// `nats://[user:password@]host:port`, several separated by commas.
    pub url: String,
    /// A NATS `.creds` file (JWT and NKey seed).
    pub credentials_file: Option<PathBuf>,
    /// PEM CA certificate(s) to trust for TLS to NATS; setting it requires TLS.
    pub ca_certificate: Option<PathBuf>,
    /// Bound on reaching NATS and on each step of joining.
    pub connect_timeout: Duration,
    /// Replicas of the buckets this node creates when they are missing
    /// (buckets made beforehand with `nats kv add --replicas N` are used as
    /// they are).
    pub replicas: usize,
    /// The serving node's identity; `None` for CLI commands.
    pub node: Option<NodeIdentity>,
    /// HostName (`host:port` of the load balancer) for connection strings:
    /// a node records it for the whole cluster (`--host-name`).
    pub host_name: Option<String>,
}

impl ClusterConfig {
    /// A client-only configuration (CLI commands), defaults elsewhere.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            credentials_file: None,
            ca_certificate: None,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            replicas: 1,
            node: None,
            host_name: None,
        }
    }

    /// The URL(s) with any password removed, for messages and logs.
    pub fn redacted_url(&self) -> String {
        self.url
            .split(',')
            .map(|one| match one.trim().split_once('@') {
                Some((scheme_and_user, host)) => match scheme_and_user.split_once("://") {
                    Some((scheme, _)) => format!("{scheme}://***@{host}"),
                    None => format!("***@{host}"),
                },
                None => one.trim().to_string(),
            })
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// A serving node's name and the streaming URL it hands out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeIdentity {
    /// Unique among live nodes (`--node-name`, default host name + port).
    pub name: String,
    /// `wss://relay-N.example.com:8443` (`--node-url`): where streams to
    /// devices this node holds meet.
    pub url: String,
}

/// One node's heartbeat in [`NODES_BUCKET`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub name: String,
    pub node_url: String,
    pub devices: u64,
    pub streams: u64,
    pub started_unix: u64,
    pub heartbeat_unix: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("invalid --cluster URL {url:?}: {reason}; use nats://HOST:PORT")]
    InvalidUrl { url: String, reason: String },
    #[error("cannot read the NATS credentials file {path}: {source}; check --cluster-creds")]
    CredentialsFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot reach NATS at {url} within {timeout:?} ({reason}): start nats-server (with -js) there, or fix --cluster / RELAY_CLUSTER")]
    Unreachable {
        url: String,
        timeout: Duration,
        reason: String,
    },
    #[error("NATS at {url} refused the credentials ({reason}): check the user and password in --cluster, or the --cluster-creds file")]
    Refused { url: String, reason: String },
    #[error(
        "TLS to NATS at {url} failed ({reason}): check --cluster-ca and the server's certificate"
    )]
    Tls { url: String, reason: String },
    #[error("NATS at {url} has no JetStream ({reason}): start nats-server with -js, or enable JetStream for this account")]
    NoJetStream { url: String, reason: String },
    #[error("cannot open the JetStream bucket {bucket} ({reason}); check the NATS account's JetStream limits")]
    Bucket { bucket: String, reason: String },
    #[error("node name {name:?} is already used by a live node (heartbeat {age_seconds} s ago): give this node another --node-name, or stop the other node first")]
    NodeNameInUse { name: String, age_seconds: u64 },
    #[error("node URL {url:?} is already used by live node {other:?}: give each node its own --node-url")]
    NodeUrlInUse { url: String, other: String },
    #[error("NATS request failed: {0}; the cluster may be unreachable, try again")]
    Request(String),
}

/// The connection to the cluster: see the module doc.
#[derive(Clone)]
pub struct Cluster {
    client: async_nats::Client,
    jetstream: jetstream::Context,
    node: Option<NodeIdentity>,
    registry: kv::Store,
    nodes: kv::Store,
    url: String,
    started_unix: u64,
    /// Routed creations served here, so that each is served once.
    routed_once: Arc<routed_once::RoutedOnce>,
    /// This node's listeners for takeover announcements, fed by its one
    /// wildcard subscription ([`presence::dispatch_takeovers`]).
    takeovers: Arc<presence::TakeoverListeners>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Cluster")
            .field("url", &self.url)
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

impl Cluster {
    /// Connects, checks JetStream, opens (creating when missing) the
    /// buckets, and — for a serving node — claims its name in the nodes
    /// bucket after checking that no live node uses its name or URL.
    pub async fn connect(config: &ClusterConfig) -> Result<Cluster, ClusterError> {
        let url = config.redacted_url();
        let client = connect_client(config, &url).await?;
        let jetstream = jetstream::new(client.clone());
        check_jetstream(&client, &url).await?;
        let replicas = config.replicas.max(1);
        let registry = open_bucket(
            &jetstream,
            REGISTRY_BUCKET,
            "devstreams: devices, policies, stream-token secret",
            Duration::ZERO,
            jetstream::stream::StorageType::File,
            replicas,
        )
        .await?;
        let nodes = open_bucket(
            &jetstream,
            NODES_BUCKET,
            "devstreams: node heartbeats",
            NODES_MAX_AGE,
            jetstream::stream::StorageType::Memory,
            replicas,
        )
        .await?;
        let cluster = Cluster {
            client,
            jetstream,
            node: config.node.clone(),
            registry,
            nodes,
            url,
            started_unix: unix_now(),
            routed_once: Default::default(),
            takeovers: Default::default(),
        };
        if let Some(node) = &config.node {
            cluster.claim_node(node).await?;
        }
        Ok(cluster)
    }

    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    pub fn jetstream(&self) -> &jetstream::Context {
        &self.jetstream
    }

    /// The serving node's identity (`None` for a CLI connection).
    pub fn node(&self) -> Option<&NodeIdentity> {
        self.node.as_ref()
    }

    /// The registry bucket ([`REGISTRY_BUCKET`]).
    pub fn registry_bucket(&self) -> &kv::Store {
        &self.registry
    }

    /// The heartbeat bucket ([`NODES_BUCKET`]).
    pub fn nodes_bucket(&self) -> &kv::Store {
        &self.nodes
    }

    /// The NATS URL(s), without passwords.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The routed creations this node serves or just served.
    pub fn takeovers(&self) -> &Arc<presence::TakeoverListeners> {
        &self.takeovers
    }

    pub fn routed_once(&self) -> &Arc<routed_once::RoutedOnce> {
        &self.routed_once
    }

    /// When this node joined, in Unix seconds.
    pub fn started_unix(&self) -> u64 {
        self.started_unix
    }

    /// Whether the client is connected to NATS right now.
    pub fn is_connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    /// The live nodes' heartbeats (entries older than [`NODES_MAX_AGE`]
    /// by their own clock are left out even if NATS still holds them).
    pub async fn live_nodes(&self) -> Result<Vec<(String, NodeRecord)>, ClusterError> {
        use futures_util::StreamExt;
        let mut keys = self
            .nodes
            .keys()
            .await
            .map_err(|error| ClusterError::Request(error.to_string()))?;
        let mut nodes = Vec::new();
        let now = unix_now();
        while let Some(key) = keys.next().await {
            let key = key.map_err(|error| ClusterError::Request(error.to_string()))?;
            let Some(value) = self
                .nodes
                .get(key.as_str())
                .await
                .map_err(|error| ClusterError::Request(error.to_string()))?
            else {
                continue;
            };
            let Ok(record) = serde_json::from_slice::<NodeRecord>(&value) else {
                tracing::warn!(key, "ignoring an unreadable node heartbeat");
                continue;
            };
            if now.saturating_sub(record.heartbeat_unix) <= NODES_MAX_AGE.as_secs() {
                nodes.push((key, record));
            }
        }
        Ok(nodes)
    }

    /// Removes this node's heartbeat, so its name and URL are free at once
    /// (a restart after a drain, `systemctl restart`) rather than after
    /// [`NODES_MAX_AGE`]. Called last on a clean shutdown, once nothing of
    /// the node writes heartbeats any more; bounded, and harmless to skip
    /// (the entry expires by itself).
    pub async fn leave(&self) {
        let Some(node) = &self.node else { return };
        let key = encode_token(&node.name);
        let left = tokio::time::timeout(JOIN_STEP_TIMEOUT, async {
            self.nodes.purge(key.as_str()).await?;
            self.client.flush().await?;
            Ok::<(), async_nats::Error>(())
        })
        .await;
        match left {
            Ok(Ok(())) => tracing::info!(node = node.name, "left the cluster"),
            Ok(Err(error)) => {
                tracing::warn!(%error, "cannot remove this node's heartbeat; it expires by itself")
            }
            Err(_) => tracing::warn!(
                "NATS did not answer in time; this node's heartbeat expires by itself"
            ),
        }
    }

    /// Refuses a name or URL a live node uses, then writes this node's
    /// first heartbeat with an atomic create (or an update of a dead
    /// node's stale entry at its exact revision), so two nodes starting
    /// with one name at the same moment cannot both win.
    async fn claim_node(&self, node: &NodeIdentity) -> Result<(), ClusterError> {
        let step = async {
            let now = unix_now();
            let own_key = encode_token(&node.name);
            for (key, record) in self.live_nodes().await? {
                if key == own_key {
                    return Err(ClusterError::NodeNameInUse {
                        name: node.name.clone(),
                        age_seconds: now.saturating_sub(record.heartbeat_unix),
                    });
                }
                if record.node_url.trim_end_matches('/') == node.url.trim_end_matches('/') {
                    return Err(ClusterError::NodeUrlInUse {
                        url: node.url.clone(),
                        other: record.name,
                    });
                }
            }
            let record = NodeRecord {
                name: node.name.clone(),
                node_url: node.url.clone(),
                devices: 0,
                streams: 0,
                started_unix: self.started_unix,
                heartbeat_unix: now,
            };
            let value: bytes::Bytes = serde_json::to_vec(&record)
                .map_err(|error| ClusterError::Request(error.to_string()))?
                .into();
            match self.nodes.create(&own_key, value.clone()).await {
                Ok(_) => Ok(()),
                Err(error) if error.kind() == kv::CreateErrorKind::AlreadyExists => {
                    // A stale entry (live_nodes left it out): take it over
                    // only if nobody refreshed it since we looked.
                    let entry = self
                        .nodes
                        .entry(own_key.as_str())
                        .await
                        .map_err(|error| ClusterError::Request(error.to_string()))?;
                    let (revision, age_seconds) = match entry {
                        Some(entry) => {
                            let age = serde_json::from_slice::<NodeRecord>(&entry.value)
                                .map(|other| now.saturating_sub(other.heartbeat_unix))
                                .unwrap_or(u64::MAX);
                            (entry.revision, age)
                        }
                        None => (0, u64::MAX),
                    };
                    if age_seconds <= NODES_MAX_AGE.as_secs() {
                        return Err(ClusterError::NodeNameInUse {
                            name: node.name.clone(),
                            age_seconds,
                        });
                    }
                    self.nodes
                        .update(own_key.as_str(), value, revision)
                        .await
                        .map(|_| ())
                        .map_err(|_| ClusterError::NodeNameInUse {
                            name: node.name.clone(),
                            age_seconds: 0,
                        })
                }
                Err(error) => Err(ClusterError::Request(error.to_string())),
            }
        };
        match tokio::time::timeout(JOIN_STEP_TIMEOUT, step).await {
            Ok(result) => result,
            Err(_) => Err(ClusterError::Request(format!(
                "checking the live nodes took longer than {JOIN_STEP_TIMEOUT:?}"
            ))),
        }
    }
}

/// Seconds since the Unix epoch (0 on a clock before it).
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs())
        .unwrap_or(0)
}

async fn connect_client(
    config: &ClusterConfig,
    redacted_url: &str,
) -> Result<async_nats::Client, ClusterError> {
    let mut addresses = Vec::new();
    let mut user_and_password = None;
    for one in config
        .url
        .split(',')
        .map(str::trim)
        .filter(|one| !one.is_empty())
    {
        let address: async_nats::ServerAddr =
            one.parse()
                .map_err(|error: std::io::Error| ClusterError::InvalidUrl {
                    url: redacted_url.to_string(),
                    reason: error.to_string(),
                })?;
        // The client does not send credentials written in the URL by
        // itself; they are decoded here and sent as user and password.
        if let (Some(user), Some(password)) = (address.username(), address.password()) {
            let decode = |text: &str| {
                percent_encoding::percent_decode_str(text)
                    .decode_utf8_lossy()
                    .into_owned()
            };
            user_and_password = Some((decode(user), decode(password)));
        }
        addresses.push(address);
    }
    if addresses.is_empty() {
        return Err(ClusterError::InvalidUrl {
            url: redacted_url.to_string(),
            reason: "no server address".into(),
        });
    }
    let mut options = async_nats::ConnectOptions::new()
        .connection_timeout(config.connect_timeout)
        .name(match &config.node {
            Some(node) => format!("devstreams relay {}", node.name),
            None => "devstreams relay CLI".to_string(),
        })
        .event_callback({
            // The first connection is reported by the caller; later ones
            // are reconnections after a loss.
            let lost = Arc::new(AtomicBool::new(false));
            move |event| {
                let lost = lost.clone();
                async move {
                    match event {
                        async_nats::Event::Disconnected => {
                            lost.store(true, Ordering::Relaxed);
                            tracing::warn!("lost the connection to NATS; serving from the local copy and reconnecting");
                        }
                        async_nats::Event::Connected if lost.swap(false, Ordering::Relaxed) => {
                            tracing::info!("connected to NATS again")
                        }
                        other => tracing::debug!(event = %other, "NATS event"),
                    }
                }
            }
        });
    if let Some((user, password)) = user_and_password {
        options = options.user_and_password(user, password);
    }
    if let Some(path) = &config.credentials_file {
        options = options.credentials_file(path).await.map_err(|source| {
            ClusterError::CredentialsFile {
                path: path.clone(),
                source,
            }
        })?;
    }
    if let Some(path) = &config.ca_certificate {
        options = options
            .add_root_certificates(path.clone())
            .require_tls(true);
    }
    let url = redacted_url.to_string();
    // The client's own timeout covers each TCP connect; this one also
    // covers a server that accepts and then never says INFO.
    let connected = tokio::time::timeout(
        config.connect_timeout + Duration::from_secs(1),
        options.connect(addresses),
    )
    .await;
    match connected {
        Ok(Ok(client)) => Ok(client),
        Ok(Err(error)) => Err(match error.kind() {
            async_nats::ConnectErrorKind::AuthorizationViolation
            | async_nats::ConnectErrorKind::Authentication => ClusterError::Refused {
                url,
                reason: error.to_string(),
            },
            // A refused server certificate comes back as an I/O error.
            kind if kind == async_nats::ConnectErrorKind::Tls
                || error.to_string().contains("certificate") =>
            {
                ClusterError::Tls {
                    url,
                    reason: error.to_string(),
                }
            }
            async_nats::ConnectErrorKind::ServerParse => ClusterError::InvalidUrl {
                url,
                reason: error.to_string(),
            },
            _ => ClusterError::Unreachable {
                url,
                timeout: config.connect_timeout,
                reason: error.to_string(),
            },
        }),
        Err(_) => Err(ClusterError::Unreachable {
            url,
            timeout: config.connect_timeout,
            reason: "timed out".into(),
        }),
    }
}

/// Asks the server for the account's JetStream information (a plain
/// request: the client's own typed call expects fields nats-server 2.9
/// does not send). No responder, or an error answer, means no JetStream.
async fn check_jetstream(client: &async_nats::Client, url: &str) -> Result<(), ClusterError> {
    let no_jetstream = |reason: String| ClusterError::NoJetStream {
        url: url.to_string(),
        reason,
    };
    let answer = tokio::time::timeout(
        JOIN_STEP_TIMEOUT,
        client.request("$JS.API.INFO", bytes::Bytes::new()),
    )
    .await
    .map_err(|_| no_jetstream(format!("no answer within {JOIN_STEP_TIMEOUT:?}")))?
    .map_err(|error| no_jetstream(error.to_string()))?;
    let body: serde_json::Value = serde_json::from_slice(&answer.payload)
        .map_err(|error| no_jetstream(format!("unreadable answer: {error}")))?;
    if let Some(error) = body.get("error") {
        let description = error
            .get("description")
            .and_then(|description| description.as_str())
            .unwrap_or("refused");
        return Err(no_jetstream(description.to_string()));
    }
    Ok(())
}

/// Opens a bucket, creating its stream when missing with the settings
/// JetStream's key-value layer uses (one value per key, roll-ups allowed,
/// direct gets). Racing nodes both succeed: JetStream answers an identical
/// create with the existing stream. Made by hand rather than by the
/// client's `create_key_value`, whose account check fails on nats-server
/// 2.9.
pub(crate) async fn open_bucket(
    jetstream: &jetstream::Context,
    bucket: &str,
    description: &str,
    max_age: Duration,
    storage: jetstream::stream::StorageType,
    replicas: usize,
) -> Result<kv::Store, ClusterError> {
    let failed = |reason: String| ClusterError::Bucket {
        bucket: bucket.to_string(),
        reason,
    };
    let step = async {
        if let Ok(store) = jetstream.get_key_value(bucket).await {
            return Ok(store);
        }
        let created = jetstream
            .create_stream(jetstream::stream::Config {
                name: format!("KV_{bucket}"),
                description: Some(description.to_string()),
                subjects: vec![format!("$KV.{bucket}.>")],
                max_messages_per_subject: 1,
                max_age,
                storage,
                num_replicas: replicas,
                allow_rollup: true,
                deny_delete: true,
                allow_direct: true,
                discard: jetstream::stream::DiscardPolicy::New,
                ..Default::default()
            })
            .await;
        match jetstream.get_key_value(bucket).await {
            Ok(store) => Ok(store),
            Err(error) => Err(failed(match created {
                Err(create_error) => create_error.to_string(),
                Ok(_) => error.to_string(),
            })),
        }
    };
    tokio::time::timeout(JOIN_STEP_TIMEOUT, step)
        .await
        .unwrap_or_else(|_| Err(failed(format!("no answer within {JOIN_STEP_TIMEOUT:?}"))))
}

/// Encodes any text (a device id, `device/module`, a node name) as one NATS
/// subject token and key segment: ASCII letters, digits and `-` stay as
/// they are, every other byte becomes `_` and two upper-case hex digits
/// (`_` itself is `_5F`). The result uses only `[-_a-zA-Z0-9]`, which both
/// subjects and KV keys allow, never contains `.`, `*` or `>`, and two
/// different texts never share an encoding ([`decode_token`] inverts it).
pub fn encode_token(text: &str) -> String {
    let mut encoded = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || byte == b'-' {
            encoded.push(byte as char);
        } else {
            encoded.push('_');
            encoded.push_str(&format!("{byte:02X}"));
        }
    }
    encoded
}

/// The text [`encode_token`] encoded; `None` for anything it cannot have
/// produced.
pub fn decode_token(encoded: &str) -> Option<String> {
    let bytes = encoded.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        let byte = bytes[index];
        if byte.is_ascii_alphanumeric() || byte == b'-' {
            decoded.push(byte);
            index += 1;
        } else if byte == b'_' {
            let hex = encoded.get(index + 1..index + 3)?;
            if !hex
                .bytes()
                .all(|digit| digit.is_ascii_digit() || (b'A'..=b'F').contains(&digit))
            {
                return None;
            }
            let value = u8::from_str_radix(hex, 16).ok()?;
            if value.is_ascii_alphanumeric() || value == b'-' {
                // Would have been written as itself: not our encoding.
                return None;
            }
            decoded.push(value);
            index += 3;
        } else {
            return None;
        }
    }
    String::from_utf8(decoded).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_key_and_token_safe(encoded: &str) -> bool {
        !encoded.is_empty()
            && encoded
                .bytes()
                .all(|byte| byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'_')
    }

    #[test]
    fn every_allowed_id_character_encodes_to_a_safe_token_and_back() {
        let allowed: String = ('a'..='z')
            .chain('A'..='Z')
            .chain('0'..='9')
            .chain(framing::identity::ID_PUNCTUATION.chars())
            .collect();
        for character in allowed.chars() {
            let text = character.to_string();
            let encoded = encode_token(&text);
            assert!(is_key_and_token_safe(&encoded), "{text:?} → {encoded:?}");
            assert_eq!(decode_token(&encoded).as_deref(), Some(text.as_str()));
        }
        let encoded = encode_token(&allowed);
        assert!(is_key_and_token_safe(&encoded));
        assert_eq!(decode_token(&encoded).as_deref(), Some(allowed.as_str()));
        // Module identities and node names carry `/` and `:` too.
        for text in ["device/module", "relay-1:8443", "a.b*c>d", "_5F", "é"] {
            assert_eq!(decode_token(&encode_token(text)).as_deref(), Some(text));
        }
    }

    #[test]
    fn encoding_is_injective() {
        // Every pair of one- and two-character texts over the id set plus
        // the escape's own characters encodes differently.
        let alphabet: Vec<char> = "aZ09-_.=%+#*?!(),:@$'/5F"
            .chars()
            .chain(framing::identity::ID_PUNCTUATION.chars())
            .collect();
        let mut texts = std::collections::HashSet::new();
        for first in &alphabet {
            texts.insert(first.to_string());
            for second in &alphabet {
                texts.insert(format!("{first}{second}"));
                for third in ['_', 'F', '5'] {
                    texts.insert(format!("{first}{second}{third}"));
                }
            }
        }
        let mut encodings = std::collections::HashMap::new();
        for text in &texts {
            if let Some(other) = encodings.insert(encode_token(text), text) {
                panic!("{text:?} and {other:?} share an encoding");
            }
        }
    }

    #[test]
    fn malformed_encodings_are_refused() {
        for encoded in ["_", "_4", "_4g", "_61", "a.b", "a b", "_2d", "_2D"] {
            assert_eq!(decode_token(encoded), None, "{encoded:?}");
        }
    }

    #[test]
    fn passwords_never_appear_in_the_url_shown() {
        let config = ClusterConfig::new("nats://user:secret@a:4222, nats://b:4222");
        assert_eq!(config.redacted_url(), "nats://***@a:4222,nats://b:4222");
    }
}
