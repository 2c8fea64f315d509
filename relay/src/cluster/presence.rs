//! Cluster presence: while a node holds an identity's control channel it
//! answers that identity's stream creations on NATS, and it makes sure the
//! channel is the identity's only one in the whole cluster.
//!
//! The single relay closes an identity's older channel at CONNECT
//! ([`crate::presence::Presence::connect`]); across nodes the same rule is
//! kept by announcements. Every new channel publishes a [`Takeover`] on
//! `devstreams.identity.<id>.takeover` after subscribing to that subject.
//! Channels are ordered by [`ConnectOrder`] (connect time, then node name,
//! then session number): a holder that hears of a newer channel closes its
//! own; one that hears of an older channel announces itself again so the
//! older holder closes. Since each node subscribes before it announces, of
//! two racing connects at least one hears the other, so exactly one channel
//! stays. Announcements published while NATS is away are buffered by the
//! client, but one written just as the connection broke is lost; so after
//! each reconnection (noticed by the heartbeat, [`super::heartbeat`]) every
//! channel announces itself again, and a takeover that raced an outage
//! still ends with one channel.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::Instrument;

use crate::presence::Identity;
use crate::state::RelayState;

/// The queue group of stream-creation responders: if two nodes briefly
/// both hold an identity (a takeover under way), only one is asked.
const RESPONDERS: &str = "devstreams-holders";

/// How long announcing may wait for NATS to confirm the subscriptions
/// before it announces anyway (subscriptions are restored on reconnect).
const SUBSCRIBE_CONFIRM_TIMEOUT: Duration = Duration::from_secs(2);

/// The subject on which new channels of `identity` are announced.
pub fn takeover_subject(identity: &Identity) -> String {
    format!(
        "devstreams.identity.{}.takeover",
        super::encode_token(&identity.to_string())
    )
}

/// Which of two channels of one identity is newer: later connect time,
/// then the greater node name, then the greater session number.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ConnectOrder {
    pub connected_unix_nanos: u64,
    pub node: String,
    pub session_id: u64,
}

/// "A channel of this identity connected here": sent by each new channel.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Takeover {
    pub order: ConnectOrder,
}

/// What a holder does on hearing an announcement about its identity.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Its own announcement (or a repeat of it).
    Mine,
    /// A newer channel exists: close ours.
    Yield,
    /// An older channel still exists: announce ours again so it closes.
    Reassert,
}

pub fn judge(own: &ConnectOrder, heard: &ConnectOrder) -> Verdict {
    match heard.cmp(own) {
        std::cmp::Ordering::Equal => Verdict::Mine,
        std::cmp::Ordering::Greater => Verdict::Yield,
        std::cmp::Ordering::Less => Verdict::Reassert,
    }
}

/// Ends the identity's cluster presence when the session ends.
pub struct Membership {
    _stop: DropGuard,
}

/// Called when a session became the identity's channel on this node (after
/// [`crate::presence::Presence::connect`]). In cluster mode this starts the
/// responder and takeover task; `session_cancel` closes the session when a
/// newer channel elsewhere takes over. Dropping the result ends it all.
pub fn join(
    state: &Arc<RelayState>,
    identity: &Identity,
    session_id: u64,
    session_cancel: CancellationToken,
) -> Option<Membership> {
    let cluster = state.cluster.clone()?;
    let stop = CancellationToken::new();
    let order = ConnectOrder {
        connected_unix_nanos: SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|since| u64::try_from(since.as_nanos()).unwrap_or(u64::MAX))
            .unwrap_or(0),
        node: super::routing::node_name(&cluster).to_string(),
        session_id,
    };
    let span = tracing::info_span!("cluster_presence", %identity);
    state.tasks.spawn(
        hold(
            state.clone(),
            identity.clone(),
            order,
            session_cancel,
            stop.clone(),
        )
        .instrument(span),
    );
    Some(Membership {
        _stop: stop.drop_guard(),
    })
}

async fn announce(client: &async_nats::Client, subject: &str, order: &ConnectOrder) {
    let Ok(payload) = serde_json::to_vec(&Takeover {
        order: order.clone(),
    }) else {
        return;
    };
    if let Err(error) = client.publish(subject.to_string(), payload.into()).await {
        tracing::warn!(%error, "could not announce the control channel to the cluster");
    }
}

async fn hold(
    state: Arc<RelayState>,
    identity: Identity,
    order: ConnectOrder,
    session_cancel: CancellationToken,
    stop: CancellationToken,
) {
    let Some(cluster) = state.cluster.clone() else {
        return;
    };
    let client = cluster.client().clone();
    let takeover_subject = takeover_subject(&identity);
    let streams_subject = super::routing::streams_subject(&identity);
    let subscriptions = async {
        let takeovers = client.subscribe(takeover_subject.clone()).await?;
        let requests = client
            .queue_subscribe(streams_subject.clone(), RESPONDERS.to_string())
            .await?;
        Ok::<_, async_nats::SubscribeError>((takeovers, requests))
    };
    let (mut takeovers, mut requests) = tokio::select! {
        _ = stop.cancelled() => return,
        subscribed = subscriptions => match subscribed {
            Ok(subscribed) => subscribed,
            Err(error) => {
                tracing::error!(%error, "could not subscribe the control channel's subjects on NATS; the cluster cannot route streams to it");
                return;
            }
        },
    };
    // Subscribed on the server before announcing, so that of two racing
    // channels at least one hears the other.
    tokio::select! {
        _ = stop.cancelled() => return,
        _ = tokio::time::timeout(SUBSCRIBE_CONFIRM_TIMEOUT, client.flush()) => {}
    }
    let mut reconnects = state.presence.cluster_connects();
    reconnects.mark_unchanged();
    announce(&client, &takeover_subject, &order).await;
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            changed = reconnects.changed() => {
                if changed.is_err() {
                    break;
                }
                announce(&client, &takeover_subject, &order).await;
            }
            message = takeovers.next() => {
                let Some(message) = message else { break };
                let Ok(heard) = serde_json::from_slice::<Takeover>(&message.payload) else {
                    tracing::warn!("unreadable takeover announcement");
                    continue;
                };
                match judge(&order, &heard.order) {
                    Verdict::Mine => {}
                    Verdict::Yield => {
                        tracing::info!(node = %heard.order.node, "a newer connection on another node replaces this control channel");
                        session_cancel.cancel();
                        break;
                    }
                    Verdict::Reassert => announce(&client, &takeover_subject, &order).await,
                }
            }
            message = requests.next() => {
                let Some(message) = message else { break };
                state.tasks.spawn(super::routing::answer(state.clone(), message).in_current_span());
            }
        }
    }
    // Dropping the subscribers unsubscribes.
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(nanos: u64, node: &str, session_id: u64) -> ConnectOrder {
        ConnectOrder {
            connected_unix_nanos: nanos,
            node: node.into(),
            session_id,
        }
    }

    #[test]
    fn the_newer_channel_wins_and_ties_go_by_node_name() {
        let own = order(10, "relay-2", 1);
        assert_eq!(judge(&own, &own.clone()), Verdict::Mine);
        assert_eq!(judge(&own, &order(11, "relay-1", 1)), Verdict::Yield);
        assert_eq!(judge(&own, &order(9, "relay-3", 9)), Verdict::Reassert);
        assert_eq!(judge(&own, &order(10, "relay-3", 0)), Verdict::Yield);
        assert_eq!(judge(&own, &order(10, "relay-1", 9)), Verdict::Reassert);
        // Two racing channels judge each other oppositely: exactly one yields.
        let other = order(10, "relay-3", 0);
        assert_eq!(judge(&other, &own), Verdict::Reassert);
    }

    #[test]
    fn takeover_subjects_differ_from_stream_subjects() {
        let identity = Identity {
            device_id: "d".into(),
            module_id: None,
        };
        assert_ne!(
            takeover_subject(&identity),
            super::super::routing::streams_subject(&identity)
        );
    }
}
