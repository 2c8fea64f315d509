//! A routed stream creation is served once on the holding node, however
//! often the entry node asks.
//!
//! The entry node asks again when it hears that the device's channel
//! announced itself ([`super::routing::route`]): a request that NATS
//! delivered to a node just as the device left it is never answered. But
//! the announcement may come from the very node already serving the first
//! ask: a channel announces itself right after it subscribes (a request can
//! slip in between), again after every NATS reconnection, and whenever it
//! hears of an older channel. Serving the repeat as a creation of its own
//! made a second stream: the device got two requests, and the first stream,
//! its answer no longer awaited, held one of the device's permits until its
//! handshake deadline. Under `--max-streams-per-device 1` the service got a
//! 429 for its one creation (seen in CI).
//!
//! So every routed request carries an id that the entry node keeps across
//! its asks, and the holding node serves each id once: a repeat joins the
//! creation in progress and gets the same answer, or gets that answer again
//! if the creation ended a moment ago.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_nats::Subject;
use bytes::Bytes;
use tokio::time::Instant;

/// How long a finished creation's answer is kept for a repeat that crossed
/// it on the way. A repeat follows its first ask by one NATS round trip
/// plus the entry node's reaction; seconds are plenty.
const KEEP_ANSWERS_FOR: Duration = Duration::from_secs(10);

/// The most finished answers kept at once (the oldest go first).
const MAX_KEPT_ANSWERS: usize = 4096;

/// The most askers one creation answers. The entry node asks again only
/// when it hears an announcement, so more than a few means a loop; the
/// rest are left to their own deadline.
const MAX_ASKERS: usize = 8;

/// The routed creations this node is serving or served a moment ago.
#[derive(Debug, Default)]
pub struct RoutedOnce {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    by_id: HashMap<String, Entry>,
    /// Finished ids, oldest first, for expiry.
    finished: VecDeque<(Instant, String)>,
}

#[derive(Debug)]
enum Entry {
    /// Being served; where to send the answer.
    Serving(Vec<Subject>),
    /// Served; the answer (a payload ready for NATS).
    Answered(Bytes),
}

/// What to do with one ask.
#[derive(Debug)]
pub enum Turn {
    /// The first ask: serve it, then [`Serving::finish`].
    Serve(Serving),
    /// A repeat of a creation in progress: its answer will be sent to this
    /// ask's reply subject too.
    Joined,
    /// A repeat of a creation that just ended: send this answer.
    AnsweredAlready(Bytes),
}

/// The duty to answer one creation. Dropped without [`Serving::finish`]
/// (the node is stopping), it forgets the id so nothing waits for it.
#[derive(Debug)]
pub struct Serving {
    once: Arc<RoutedOnce>,
    id: Option<String>,
    reply: Subject,
}

impl RoutedOnce {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Registers an ask with `id` (empty from nodes older than this
    /// feature: always served) and says what to do with it.
    pub fn ask(self: &Arc<Self>, id: &str, reply: Subject) -> Turn {
        if id.is_empty() {
            return Turn::Serve(Serving {
                once: self.clone(),
                id: None,
                reply,
            });
        }
        let mut state = self.lock();
        state.expire(Instant::now());
        match state.by_id.get_mut(id) {
            Some(Entry::Serving(askers)) => {
                if askers.len() < MAX_ASKERS {
                    askers.push(reply);
                }
                Turn::Joined
            }
            Some(Entry::Answered(answer)) => Turn::AnsweredAlready(answer.clone()),
            None => {
                state
                    .by_id
                    .insert(id.to_string(), Entry::Serving(vec![reply.clone()]));
                Turn::Serve(Serving {
                    once: self.clone(),
                    id: Some(id.to_string()),
                    reply,
                })
            }
        }
    }

    /// How many ids are remembered (serving or answered).
    #[cfg(test)]
    fn remembered(&self) -> usize {
        self.lock().by_id.len()
    }
}

impl State {
    fn expire(&mut self, now: Instant) {
        while let Some((finished_at, _)) = self.finished.front() {
            let expired = now.saturating_duration_since(*finished_at) >= KEEP_ANSWERS_FOR;
            if !expired && self.finished.len() <= MAX_KEPT_ANSWERS {
                break;
            }
            if let Some((_, id)) = self.finished.pop_front() {
                self.by_id.remove(&id);
            }
        }
    }
}

impl Serving {
    /// Keeps `answer` for repeats and returns every reply subject that
    /// waits for it (the first ask's included).
    pub fn finish(mut self, answer: Bytes) -> Vec<Subject> {
        let Some(id) = self.id.take() else {
            return vec![self.reply.clone()];
        };
        let mut state = self.once.lock();
        let askers = match state.by_id.insert(id.clone(), Entry::Answered(answer)) {
            Some(Entry::Serving(askers)) => askers,
            _ => vec![self.reply.clone()],
        };
        let now = Instant::now();
        state.finished.push_back((now, id));
        state.expire(now);
        askers
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        if let Some(id) = self.id.take() {
            self.once.lock().by_id.remove(&id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subject(name: &str) -> Subject {
        Subject::from(name)
    }

    #[tokio::test(start_paused = true)]
    async fn a_repeat_joins_the_creation_in_progress_and_both_get_its_answer() {
        let once = Arc::new(RoutedOnce::default());
        let Turn::Serve(serving) = once.ask("id-1", subject("reply.first")) else {
            panic!("the first ask is served");
        };
        assert!(matches!(
            once.ask("id-1", subject("reply.second")),
            Turn::Joined
        ));
        // Another creation is not confused with it.
        let Turn::Serve(_other) = once.ask("id-2", subject("reply.other")) else {
            panic!("a different id is served on its own");
        };
        let askers = serving.finish(Bytes::from_static(b"answer"));
        assert_eq!(
            askers,
            vec![subject("reply.first"), subject("reply.second")]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_repeat_that_crossed_the_answer_gets_it_again_for_a_while() {
        let once = Arc::new(RoutedOnce::default());
        let Turn::Serve(serving) = once.ask("id-1", subject("reply.first")) else {
            panic!("the first ask is served");
        };
        serving.finish(Bytes::from_static(b"answer"));
        match once.ask("id-1", subject("reply.late")) {
            Turn::AnsweredAlready(answer) => assert_eq!(&answer[..], b"answer"),
            other => panic!("expected the kept answer, got {other:?}"),
        }
        tokio::time::advance(KEEP_ANSWERS_FOR).await;
        assert!(
            matches!(
                once.ask("id-1", subject("reply.much-later")),
                Turn::Serve(_)
            ),
            "past the keeping time the id is forgotten"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn asks_without_an_id_are_always_served_and_nothing_is_kept() {
        let once = Arc::new(RoutedOnce::default());
        for _ in 0..2 {
            let Turn::Serve(serving) = once.ask("", subject("reply")) else {
                panic!("an ask without id is served");
            };
            assert_eq!(serving.finish(Bytes::new()), vec![subject("reply")]);
        }
        assert_eq!(once.remembered(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_creation_dropped_unanswered_is_forgotten() {
        let once = Arc::new(RoutedOnce::default());
        let Turn::Serve(serving) = once.ask("id-1", subject("reply")) else {
            panic!("the first ask is served");
        };
        drop(serving);
        assert_eq!(once.remembered(), 0);
        assert!(matches!(once.ask("id-1", subject("reply")), Turn::Serve(_)));
    }

    #[tokio::test(start_paused = true)]
    async fn kept_answers_and_askers_are_bounded() {
        let once = Arc::new(RoutedOnce::default());
        let Turn::Serve(serving) = once.ask("busy", subject("reply.0")) else {
            panic!("the first ask is served");
        };
        for index in 1..(MAX_ASKERS * 2) {
            once.ask("busy", subject(&format!("reply.{index}")));
        }
        assert_eq!(serving.finish(Bytes::new()).len(), MAX_ASKERS);
        for index in 0..(MAX_KEPT_ANSWERS + 10) {
            if let Turn::Serve(serving) = once.ask(&format!("id-{index}"), subject("reply")) {
                serving.finish(Bytes::new());
            }
        }
        assert!(once.remembered() <= MAX_KEPT_ANSWERS + 1);
    }
}
