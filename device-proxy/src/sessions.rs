//! The device's live resumable sessions, by session id, and the check a
//! resume must pass to reach one.
//!
//! A resume names a session and proves it knows the session's secret (an
//! HMAC over the id and a fresh nonce). The check happens here, before the
//! session sees anything, so a forged or replayed resume is refused and
//! cannot disturb the real session. Nonces already used are remembered (a
//! few per session), so a recorded resume cannot be played again.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use framing::session::{Offer, SessionKeys};
use framing::transport::NetworkStream;
use tokio::sync::mpsc;

/// Nonces remembered per session.
const REMEMBERED_NONCES: usize = 64;

/// Where a session's new carriers are handed in.
pub type OfferSender = mpsc::Sender<Offer<NetworkStream>>;

struct Entry {
    keys: SessionKeys,
    offers: OfferSender,
    used_nonces: VecDeque<String>,
}

/// What became of a resume.
pub enum Check {
    /// The proof checks: hand the new stream in here.
    Accepted(OfferSender),
    /// No such session (the process restarted, or the session ended).
    Unknown,
    /// The session exists but the proof does not check (or was used before).
    Refused(&'static str),
}

/// The sessions of this device-proxy. Bounded by `--max-streams`: every
/// session holds a stream permit for its whole life.
#[derive(Default)]
pub struct SessionTable {
    entries: Mutex<HashMap<String, Entry>>,
}

impl SessionTable {
    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Adds a session; false when its id is taken (a hello replayed).
    pub fn insert(&self, keys: SessionKeys, offers: OfferSender) -> bool {
        let mut entries = self.entries();
        if entries.contains_key(&keys.id) {
            return false;
        }
        entries.insert(
            keys.id.clone(),
            Entry {
                keys,
                offers,
                used_nonces: VecDeque::new(),
            },
        );
        true
    }

    pub fn remove(&self, session_id: &str) {
        self.entries().remove(session_id);
    }

    pub fn len(&self) -> usize {
        self.entries().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Checks a resume's proof against the named session.
    pub fn check(&self, session_id: &str, nonce: &str, proof: &str) -> Check {
        let mut entries = self.entries();
        let Some(entry) = entries.get_mut(session_id) else {
            return Check::Unknown;
        };
        if !entry.keys.check(nonce, proof) {
            return Check::Refused("the proof does not check");
        }
        if entry.used_nonces.iter().any(|used| used == nonce) {
            return Check::Refused("the nonce was used before (a replayed resume)");
        }
        if entry.used_nonces.len() == REMEMBERED_NONCES {
            entry.used_nonces.pop_front();
        }
        entry.used_nonces.push_back(nonce.to_string());
        Check::Accepted(entry.offers.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use framing::session::Control;

    fn resume_parts(control: Control) -> (String, String, String) {
        match control {
            Control::Resume {
                session,
                nonce,
                proof,
                ..
            } => (session, nonce, proof),
            other => panic!("not a resume: {other:?}"),
        }
    }

    #[test]
    fn a_right_proof_is_accepted_once_and_a_wrong_one_refused() {
        let table = SessionTable::default();
        let keys = SessionKeys::generate();
        let (sender, _receiver) = mpsc::channel(1);
        assert!(table.insert(keys.clone(), sender.clone()));
        assert!(!table.insert(keys.clone(), sender), "ids are unique");
        let (session, nonce, proof) = resume_parts(keys.resume(0));
        assert!(matches!(
            table.check(&session, &nonce, &proof),
            Check::Accepted(_)
        ));
        assert!(
            matches!(table.check(&session, &nonce, &proof), Check::Refused(_)),
            "a replayed resume is refused"
        );
        let other = SessionKeys::generate();
        let (_, forged_nonce, forged_proof) = resume_parts(other.resume(0));
        assert!(matches!(
            table.check(&session, &forged_nonce, &forged_proof),
            Check::Refused(_)
        ));
        assert!(matches!(
            table.check(&other.id, &forged_nonce, &forged_proof),
            Check::Unknown
        ));
        table.remove(&session);
        assert!(table.is_empty());
    }
}
