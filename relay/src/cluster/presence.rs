//! Cluster presence: while a node holds an identity's control channel it
//! answers that identity's stream creations on NATS, and it makes sure the
//! channel is the identity's only one in the whole cluster.
//!
//! The single relay closes an identity's older channel at CONNECT
//! ([`crate::presence::Presence::connect`]); across nodes the same rule is
//! kept by announcements. Every new channel publishes a [`Takeover`] on
//! `devstreams.identity.<id>.takeover`. Channels are ordered by
//! [`ConnectOrder`] (connect time, then node name, then session number): a
//! holder that hears of a newer channel closes its own; one that hears of an
//! older channel announces itself again so the older holder closes. Every
//! node is subscribed to all takeover subjects before it serves anyone, so
//! of two racing connects at least one hears the other, and exactly one
//! channel stays.
//!
//! That subscription is one wildcard per node ([`TAKEOVER_SUBJECTS`]),
//! handed out here to the channels it concerns ([`TakeoverListeners`]),
//! rather than one subscription per connected identity: a subscription costs
//! the node's NATS client about 5 KB and every NATS server of the cluster
//! its interest, per identity, while every node hearing every announcement
//! costs a few thousand small messages per second at most (SCALING.md). Announcements published while NATS is away are buffered by the
//! client, but one written just as the connection broke is lost; so after
//! each reconnection (noticed by the heartbeat, [`super::heartbeat`]) every
//! channel announces itself again, and a takeover that raced an outage
//! still ends with one channel.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
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

/// Every identity's takeover subject (an identity is one subject token).
pub const TAKEOVER_SUBJECTS: &str = "devstreams.identity.*.takeover";

/// Announcements queued for one listener. A channel handles each at once,
/// so a full queue means a stalled task; further ones are dropped with a
/// warning, as NATS drops messages for a slow subscriber.
const LISTENER_BACKLOG: usize = 16;

/// Who on this node waits for which identity's announcements: the holding
/// channel's task, and routed creations waiting for the device to move.
/// A listener costs a table entry and a small queue that allocates only
/// while announcements wait in it.
#[derive(Default)]
pub struct TakeoverListeners {
    by_subject: Mutex<HashMap<String, Vec<Arc<Inbox>>>>,
}

/// One listener's waiting announcements.
#[derive(Default)]
struct Inbox {
    waiting: Mutex<VecDeque<Takeover>>,
    arrived: Notify,
}

/// One listener's announcements; dropping it stops them.
pub struct TakeoverListener {
    inbox: Arc<Inbox>,
    subject: String,
    listeners: Arc<TakeoverListeners>,
}

impl TakeoverListeners {
    /// Starts handing `subject`'s announcements to the returned listener.
    pub fn listen(self: &Arc<Self>, subject: String) -> TakeoverListener {
        let inbox = Arc::new(Inbox::default());
        lock(&self.by_subject)
            .entry(subject.clone())
            .or_default()
            .push(Arc::clone(&inbox));
        TakeoverListener {
            inbox,
            subject,
            listeners: Arc::clone(self),
        }
    }

    /// Hands one announcement to every listener of its subject; never waits.
    fn deliver(&self, subject: &str, takeover: &Takeover) {
        let table = lock(&self.by_subject);
        let Some(inboxes) = table.get(subject) else {
            return;
        };
        for inbox in inboxes {
            let mut waiting = lock(&inbox.waiting);
            if waiting.len() >= LISTENER_BACKLOG {
                tracing::warn!(
                    subject,
                    "a takeover announcement was dropped: its listener is {LISTENER_BACKLOG} behind"
                );
                continue;
            }
            waiting.push_back(takeover.clone());
            drop(waiting);
            inbox.arrived.notify_one();
        }
    }

    /// Subjects with at least one listener.
    #[cfg(test)]
    fn subjects(&self) -> usize {
        lock(&self.by_subject).len()
    }
}

impl TakeoverListener {
    /// The next announcement, waiting for one.
    pub async fn next(&mut self) -> Takeover {
        loop {
            if let Some(takeover) = lock(&self.inbox.waiting).pop_front() {
                return takeover;
            }
            // A notification sent since the check above is kept as a permit.
            self.inbox.arrived.notified().await;
        }
    }
}

impl Drop for TakeoverListener {
    fn drop(&mut self) {
        let mut table = lock(&self.listeners.by_subject);
        if let Some(inboxes) = table.get_mut(&self.subject) {
            inboxes.retain(|inbox| !Arc::ptr_eq(inbox, &self.inbox));
            if inboxes.is_empty() {
                table.remove(&self.subject);
            }
        }
    }
}

/// A lock that a panic elsewhere does not poison: every change under these
/// locks is a single push, pop or removal, consistent at any point.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Subscribes this node to every takeover announcement; done before the
/// node serves anyone, and confirmed by the server within
/// [`SUBSCRIBE_CONFIRM_TIMEOUT`] (else it is restored on reconnection).
pub async fn subscribe_takeovers(
    client: &async_nats::Client,
) -> Result<async_nats::Subscriber, async_nats::SubscribeError> {
    let subscriber = client.subscribe(TAKEOVER_SUBJECTS).await?;
    let _ = tokio::time::timeout(SUBSCRIBE_CONFIRM_TIMEOUT, client.flush()).await;
    Ok(subscriber)
}

/// Hands each announcement to this node's listeners of its identity, until
/// the relay stops accepting (its control channels then close).
pub async fn dispatch_takeovers(state: Arc<RelayState>, mut subscriber: async_nats::Subscriber) {
    let Some(cluster) = state.cluster.clone() else {
        return;
    };
    loop {
        let message = tokio::select! {
            _ = state.stop_accepting.cancelled() => return,
            message = subscriber.next() => message,
        };
        let Some(message) = message else {
            tracing::error!("the cluster's takeover subscription ended; control channels on other nodes can no longer replace this node's");
            return;
        };
        let Ok(takeover) = serde_json::from_slice::<Takeover>(&message.payload) else {
            tracing::warn!(subject = %message.subject, "unreadable takeover announcement");
            continue;
        };
        cluster
            .takeovers()
            .deliver(message.subject.as_str(), &takeover);
    }
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
    // Listening before announcing, so that of two racing channels at least
    // one hears the other (the node's subscription to all announcements is
    // older than any channel).
    let mut takeovers = cluster.takeovers().listen(takeover_subject.clone());
    let subscription = client.queue_subscribe(streams_subject.clone(), RESPONDERS.to_string());
    let mut requests = tokio::select! {
        _ = stop.cancelled() => return,
        subscribed = subscription => match subscribed {
            Ok(subscribed) => subscribed,
            Err(error) => {
                tracing::error!(%error, "could not subscribe the control channel's stream subject on NATS; the cluster cannot route streams to it");
                return;
            }
        },
    };
    // The stream subject is subscribed on the server before the announcement
    // sends routed creations here.
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
            heard = takeovers.next() => {
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
    // Dropping the subscriber unsubscribes; dropping the listener stops it.
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

    #[tokio::test]
    async fn announcements_reach_only_their_identitys_listeners_while_they_live() {
        let listeners = Arc::new(TakeoverListeners::default());
        let mut first = listeners.listen("a".into());
        let mut second = listeners.listen("a".into());
        let mut other = listeners.listen("b".into());
        let heard = Takeover {
            order: order(5, "relay-1", 1),
        };
        listeners.deliver("a", &heard);
        listeners.deliver("nobody", &heard);
        for listener in [&mut first, &mut second] {
            assert_eq!(listener.next().await.order, heard.order);
        }
        assert!(lock(&other.inbox.waiting).is_empty(), "b heard a's");
        // A listener that never reads loses announcements past its backlog,
        // and delivery never waits for it.
        for _ in 0..LISTENER_BACKLOG * 2 {
            listeners.deliver("b", &heard);
        }
        assert_eq!(lock(&other.inbox.waiting).len(), LISTENER_BACKLOG);
        for _ in 0..LISTENER_BACKLOG {
            other.next().await;
        }
        let pending = tokio::time::timeout(Duration::from_millis(50), other.next()).await;
        assert!(pending.is_err(), "nothing beyond the backlog was kept");
        drop(first);
        assert_eq!(listeners.subjects(), 2);
        drop(second);
        drop(other);
        assert_eq!(listeners.subjects(), 0, "no entry outlives its listeners");
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
        // The node's one wildcard subscription covers every identity's.
        let subject = takeover_subject(&Identity {
            device_id: "a.b*c>d e".into(),
            module_id: Some("m".into()),
        });
        let pattern: Vec<&str> = TAKEOVER_SUBJECTS.split('.').collect();
        let tokens: Vec<&str> = subject.split('.').collect();
        assert_eq!(tokens.len(), pattern.len(), "{subject}");
        for (token, wanted) in tokens.iter().zip(&pattern) {
            assert!(*wanted == "*" || token == wanted, "{subject}");
        }
    }
}
