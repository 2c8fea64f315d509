//! The state one serving relay shares between its connections: the parts of
//! a relay that outlive a single request. Each piece is its own module; this
//! only ties them together and owns the two shutdown signals.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use framing::stream_token::StreamTokenKey;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cluster::Cluster;
use crate::config::{RelayConfig, TlsMode};
use crate::limits::Admission;
use crate::metrics::Metrics;
use crate::pairing::PairingTable;
use crate::presence::Presence;
use crate::registry::Registry;
use crate::sources::Sources;
use crate::trusted_proxies::ClientOrigin;

pub struct RelayState {
    pub config: RelayConfig,
    pub registry: Arc<dyn Registry>,
    pub token_key: StreamTokenKey,
    pub presence: Presence,
    pub pairing: PairingTable,
    pub admission: Arc<Admission>,
    /// Per-address connection caps and authentication-failure slowdown.
    pub sources: Arc<Sources>,
    pub metrics: Metrics,
    /// The streams being copied now, for the admin API.
    pub live_streams: Arc<crate::live::LiveStreams>,
    /// The audit log (`--audit-log`); does nothing when off.
    pub audit: crate::audit::Audit,
    /// The web console's sign-in sessions (in memory only).
    pub console: crate::console::sessions::Sessions,
    /// The cluster this node belongs to (`relay serve --cluster`); `None`
    /// for a single relay.
    pub cluster: Option<Arc<Cluster>>,
    /// Every task the relay spawns, so shutdown can wait for all of them.
    pub tasks: TaskTracker,
    /// Stop accepting and close control channels (start of a drain).
    pub stop_accepting: CancellationToken,
    /// Cut every live stream (end of the drain).
    pub stop_streams: CancellationToken,
    next_request_id: AtomicU64,
}

impl RelayState {
    pub fn new(
        config: RelayConfig,
        registry: Arc<dyn Registry>,
        token_key: StreamTokenKey,
    ) -> Arc<Self> {
        Self::new_in_cluster(config, registry, token_key, None)
    }

    /// A node of a cluster (or a single relay when `cluster` is `None`).
    pub fn new_in_cluster(
        config: RelayConfig,
        registry: Arc<dyn Registry>,
        token_key: StreamTokenKey,
        cluster: Option<Arc<Cluster>>,
    ) -> Arc<Self> {
        Self::assemble(
            config,
            registry,
            token_key,
            cluster,
            Metrics::default(),
            crate::audit::Audit::disabled(),
        )
    }

    /// A node with its metrics and audit log made beforehand (the audit
    /// log counts its drops in those metrics).
    pub fn assemble(
        config: RelayConfig,
        registry: Arc<dyn Registry>,
        token_key: StreamTokenKey,
        cluster: Option<Arc<Cluster>>,
        metrics: Metrics,
        audit: crate::audit::Audit,
    ) -> Arc<Self> {
        let admission = Admission::new(config.limits.clone());
        let max_pending = config.limits.max_pending_streams;
        let sources = Sources::new(config.limits.sources);
        let tasks = TaskTracker::new();
        let stop_accepting = CancellationToken::new();
        let pairing = PairingTable::new(max_pending, tasks.clone(), stop_accepting.clone());
        Arc::new(Self {
            config,
            registry,
            token_key,
            presence: Presence::default(),
            pairing,
            admission,
            sources,
            metrics,
            live_streams: Arc::default(),
            audit,
            console: Default::default(),
            cluster,
            tasks,
            stop_accepting,
            stop_streams: CancellationToken::new(),
            next_request_id: AtomicU64::new(1),
        })
    }

    /// A short decimal request id, as IoT Hub SDKs expect in `$rid`.
    pub fn next_request_id(&self) -> String {
        self.next_request_id
            .fetch_add(1, Ordering::Relaxed)
            .to_string()
    }

    /// The base of streaming URLs for a client that reached us as `origin`
    /// says: `--public-url` when set; else the host it asked for, with the
    /// scheme it used (a trusted proxy's word, or our own listener's).
    pub fn streaming_base(&self, origin: &ClientOrigin) -> String {
        if let Some(public_url) = &self.config.public_url {
            return public_url.trim_end_matches('/').to_string();
        }
        let secure = origin
            .secure
            .unwrap_or(!matches!(self.config.tls, TlsMode::Disabled));
        let scheme = if secure { "wss" } else { "ws" };
        let valid_host = origin.host.as_deref().filter(|h| {
            !h.is_empty()
                && h.len() < 256
                && h.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-.:[]".contains(c))
        });
        match valid_host {
            Some(host) => format!("{scheme}://{host}"),
            None => format!("{scheme}://localhost:{}", self.config.listen.port()),
        }
    }
}
