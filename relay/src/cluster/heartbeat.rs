//! Heartbeats: each node writes what it is and holds to the KV bucket
//! [`NODES_BUCKET`] (`devstreams-nodes`, created by [`super::Cluster::connect`] with a max age) every [`HEARTBEAT_PERIOD`], and `relay cluster status`
//! reads them back. The bucket's max age drops a node that stopped long
//! ago; one silent for [`GONE_AFTER`] is shown as gone before that.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::StreamExt;

use super::NODES_BUCKET;
use crate::state::RelayState;

/// How often a node writes its heartbeat.
pub const HEARTBEAT_PERIOD: Duration = Duration::from_secs(2);

/// A node whose last heartbeat is older than this is gone (3 periods).
pub const GONE_AFTER: Duration = Duration::from_secs(6);

/// How long the status command waits for NATS at each step.
const STATUS_TIMEOUT: Duration = Duration::from_secs(5);

/// One node's heartbeat (cluster-core's record in [`NODES_BUCKET`]).
pub type Heartbeat = super::NodeRecord;

fn count(value: usize) -> u64 {
    u64::try_from(value).unwrap_or(u64::MAX)
}

fn unix_seconds(time: SystemTime) -> u64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .map(|since| since.as_secs())
        .unwrap_or(0)
}

/// Writes this node's heartbeat every period until the relay stops
/// accepting. A missed write (NATS away) is only logged: the next one
/// follows one period later.
pub async fn run(state: Arc<RelayState>) {
    let Some(cluster) = state.cluster.clone() else {
        return;
    };
    let node_name = super::routing::node_name(&cluster).to_string();
    let key = super::encode_token(&node_name);
    let mut bucket = cluster.nodes_bucket().clone();
    let mut ticks = tokio::time::interval(HEARTBEAT_PERIOD);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = state.stop_accepting.cancelled() => return,
            _ = ticks.tick() => {}
        }
        // After a NATS outage every channel announces itself again: an
        // announcement written just as the connection broke is lost.
        state.presence.note_cluster_connects(
            cluster
                .client()
                .statistics()
                .connects
                .load(std::sync::atomic::Ordering::Relaxed),
        );
        let heartbeat = Heartbeat {
            name: node_name.clone(),
            node_url: super::routing::node_url(&cluster).to_string(),
            devices: count(state.presence.connected_count()),
            streams: count(state.admission.active_streams()),
            started_unix: cluster.started_unix(),
            heartbeat_unix: super::unix_now(),
        };
        let Ok(payload) = serde_json::to_vec(&heartbeat) else {
            continue;
        };
        match tokio::time::timeout(HEARTBEAT_PERIOD, bucket.put(&key, payload.into())).await {
            Ok(Ok(_)) => {}
            Ok(Err(error)) => {
                tracing::debug!(%error, "heartbeat not written");
                // A single nats-server keeps this memory bucket only while it
                // runs: after its restart the bucket is made again.
                if let Ok(Ok(again)) =
                    tokio::time::timeout(HEARTBEAT_PERIOD, recreate(cluster.jetstream())).await
                {
                    bucket = again;
                }
            }
            Err(_) => tracing::debug!("heartbeat not written in time"),
        }
    }
}

/// Opens the heartbeat bucket, creating it as the cluster does when it is
/// missing.
async fn recreate(
    jetstream: &async_nats::jetstream::Context,
) -> Result<async_nats::jetstream::kv::Store, super::ClusterError> {
    super::open_bucket(
        jetstream,
        NODES_BUCKET,
        "devstreams: node heartbeats",
        super::NODES_MAX_AGE,
        async_nats::jetstream::stream::StorageType::Memory,
        1,
    )
    .await
}

/// Every node's last heartbeat, by name.
pub async fn read_all(
    jetstream: &async_nats::jetstream::Context,
) -> anyhow::Result<Vec<Heartbeat>> {
    use anyhow::Context as _;
    let bucket = tokio::time::timeout(STATUS_TIMEOUT, jetstream.get_key_value(NODES_BUCKET))
        .await
        .context("NATS did not answer in time")?
        .with_context(|| {
            format!("no bucket {NODES_BUCKET}: no relay node has joined this cluster yet")
        })?;
    let keys: Vec<String> = tokio::time::timeout(STATUS_TIMEOUT, async {
        let mut keys = Vec::new();
        let mut listing = bucket.keys().await?;
        while let Some(key) = listing.next().await {
            keys.push(key?);
        }
        Ok::<_, anyhow::Error>(keys)
    })
    .await
    .context("NATS did not list the nodes in time")??;
    let mut heartbeats = Vec::new();
    for key in keys {
        let value = tokio::time::timeout(STATUS_TIMEOUT, bucket.get(&key))
            .await
            .context("NATS did not answer in time")??;
        if let Some(value) = value {
            match serde_json::from_slice::<Heartbeat>(&value) {
                Ok(heartbeat) => heartbeats.push(heartbeat),
                Err(error) => tracing::warn!(%error, key, "unreadable heartbeat"),
            }
        }
    }
    heartbeats.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(heartbeats)
}

/// `relay cluster status` as text: one line per node.
pub fn render_status(heartbeats: &[Heartbeat], now: SystemTime) -> String {
    let now = unix_seconds(now);
    let mut text = format!(
        "{:<24} {:<40} {:>8} {:>8} {:>10} {:>16}  {}\n",
        "NODE", "NODE URL", "DEVICES", "STREAMS", "UPTIME", "LAST HEARTBEAT", "STATE"
    );
    for heartbeat in heartbeats {
        let age = now.saturating_sub(heartbeat.heartbeat_unix);
        let uptime = heartbeat
            .heartbeat_unix
            .saturating_sub(heartbeat.started_unix);
        let state = if Duration::from_secs(age) > GONE_AFTER {
            "gone"
        } else {
            "up"
        };
        text.push_str(&format!(
            "{:<24} {:<40} {:>8} {:>8} {:>10} {:>16}  {state}\n",
            heartbeat.name,
            heartbeat.node_url,
            heartbeat.devices,
            heartbeat.streams,
            format!("{uptime}s"),
            format!("{age}s ago"),
        ));
    }
    if heartbeats.is_empty() {
        text.push_str("(no node has sent a heartbeat recently)\n");
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_silent_for_three_periods_is_gone() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let beat = |name: &str, last: u64| Heartbeat {
            name: name.into(),
            node_url: format!("wss://{name}:8443"),
            devices: 3,
            streams: 1,
            started_unix: 900,
            heartbeat_unix: last,
        };
        let text = render_status(&[beat("relay-1", 999), beat("relay-2", 990)], now);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(
            lines[1].starts_with("relay-1") && lines[1].ends_with(" up"),
            "{text}"
        );
        assert!(
            lines[2].starts_with("relay-2") && lines[2].ends_with(" gone"),
            "{text}"
        );
        assert!(lines[1].contains("99s"), "{text}");
    }
}
