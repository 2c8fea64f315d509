//! Console sign-in sessions: who signed in (a policy), with which key, and
//! the CSRF token every change must carry.
//!
//! Sessions live in memory only (a restart signs everyone out), at most
//! [`MAX_SESSIONS`] of them: a new one pushes out the one idle longest. A
//! session ends after [`IDLE_TIMEOUT`] without a request or
//! [`MAX_LIFETIME`] after sign-in, on sign-out, and as soon as its policy
//! loses the key it signed in with (rotated or removed). Session ids and
//! CSRF tokens are 32 random bytes; the CSRF token is compared in constant
//! time.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use base64::Engine;
use rand::RngCore;
use subtle::ConstantTimeEq;
use tokio::time::Instant;

use crate::registry::PolicyRecord;

/// Sessions kept at once; a new sign-in past it ends the one idle longest.
pub const MAX_SESSIONS: usize = 256;
/// A session unused this long is over.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// A session is over this long after sign-in, however busy.
pub const MAX_LIFETIME: Duration = Duration::from_secs(8 * 3600);

/// The name of the session cookie.
pub const COOKIE_NAME: &str = "devstreams_console";

/// What a request's session says about its user.
#[derive(Debug, Clone)]
pub struct SignedIn {
    pub policy: String,
    pub csrf_token: String,
}

struct Session {
    policy: String,
    /// The policy key used to sign in: the session ends when the policy no
    /// longer has it. Kept in memory only, as the registry keeps it.
    key: Vec<u8>,
    csrf_token: String,
    created: Instant,
    last_used: Instant,
}

impl Session {
    fn expired(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.last_used) >= IDLE_TIMEOUT
            || now.saturating_duration_since(self.created) >= MAX_LIFETIME
    }
}

/// The console's sessions, by session id.
#[derive(Default)]
pub struct Sessions {
    sessions: Mutex<HashMap<String, Session>>,
}

fn random_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// Whether `key` is one of the policy's keys, in constant time per key.
pub fn policy_has_key(policy: &PolicyRecord, key: &[u8]) -> bool {
    policy.key_bytes().iter().fold(false, |found, candidate| {
        found | bool::from(candidate.as_slice().ct_eq(key))
    })
}

/// Whether two tokens are equal, in time independent of where they differ.
pub fn tokens_match(expected: &str, given: &str) -> bool {
    bool::from(expected.as_bytes().ct_eq(given.as_bytes()))
}

impl Sessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        self.sessions
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Starts a session for `policy` signed in with `key`; returns its id.
    pub fn start(&self, policy: &str, key: Vec<u8>, now: Instant) -> String {
        let mut sessions = self.lock();
        sessions.retain(|_, session| !session.expired(now));
        while sessions.len() >= MAX_SESSIONS {
            let Some(idle_longest) = sessions
                .iter()
                .min_by_key(|(_, session)| session.last_used)
                .map(|(id, _)| id.clone())
            else {
                break;
            };
            sessions.remove(&idle_longest);
        }
        let id = random_token();
        sessions.insert(
            id.clone(),
            Session {
                policy: policy.to_string(),
                key,
                csrf_token: random_token(),
                created: now,
                last_used: now,
            },
        );
        id
    }

    /// The session `id` names when it is still valid for `current_policy`
    /// (the registry's record of its policy now), marking it used; an
    /// expired or revoked session is ended.
    pub fn resume(
        &self,
        id: &str,
        now: Instant,
        current_policy: impl FnOnce(&str) -> Option<PolicyRecord>,
    ) -> Option<(SignedIn, PolicyRecord)> {
        let mut sessions = self.lock();
        let session = sessions.get_mut(id)?;
        let policy = if session.expired(now) {
            None
        } else {
            current_policy(&session.policy).filter(|policy| policy_has_key(policy, &session.key))
        };
        let Some(policy) = policy else {
            sessions.remove(id);
            return None;
        };
        session.last_used = now;
        Some((
            SignedIn {
                policy: session.policy.clone(),
                csrf_token: session.csrf_token.clone(),
            },
            policy,
        ))
    }

    /// Whether session `id` is still there and not expired, without using it
    /// (a live-update stream checks this, and must not keep a session alive).
    pub fn is_live(&self, id: &str, now: Instant) -> bool {
        self.lock()
            .get(id)
            .is_some_and(|session| !session.expired(now))
    }

    pub fn end(&self, id: &str) {
        self.lock().remove(id);
    }

    pub fn count(&self) -> usize {
        self.lock().len()
    }
}

/// The session id in a request's `Cookie` headers, if any.
pub fn session_id(headers: &http::HeaderMap) -> Option<String> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE_NAME)
        .map(|(_, value)| value.to_string())
        .filter(|value| !value.is_empty())
}

/// The `Set-Cookie` value for a new session (`secure` over TLS).
pub fn session_cookie(id: &str, secure: bool) -> String {
    format!(
        "{COOKIE_NAME}={id}; Path=/console; HttpOnly; SameSite=Strict; Max-Age={}{}",
        MAX_LIFETIME.as_secs(),
        if secure { "; Secure" } else { "" }
    )
}

/// The `Set-Cookie` value that removes the session cookie.
pub fn cleared_cookie(secure: bool) -> String {
    format!(
        "{COOKIE_NAME}=; Path=/console; HttpOnly; SameSite=Strict; Max-Age=0{}",
        if secure { "; Secure" } else { "" }
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rights::Rights;

    fn policy(key: &[u8]) -> PolicyRecord {
        let encoded = base64::engine::general_purpose::STANDARD.encode(key);
        PolicyRecord {
            name: "registryReadWrite".into(),
            primary_key: encoded.clone(),
            secondary_key: encoded,
            rights: Rights::REGISTRY_READ_WRITE,
        }
    }

    #[test]
    fn a_session_ends_when_idle_too_long_or_too_old() {
        let sessions = Sessions::default();
        let start = Instant::now();
        let current = |_: &str| Some(policy(b"key"));
        let id = sessions.start("registryReadWrite", b"key".to_vec(), start);
        let used = start + IDLE_TIMEOUT - Duration::from_secs(1);
        assert!(sessions.resume(&id, used, current).is_some());
        // Used just before, so still alive past the first idle deadline.
        assert!(sessions
            .resume(&id, used + IDLE_TIMEOUT / 2, current)
            .is_some());
        assert!(sessions
            .resume(&id, used + IDLE_TIMEOUT / 2 + IDLE_TIMEOUT, current)
            .is_none());
        assert_eq!(sessions.count(), 0, "an expired session is forgotten");

        let id = sessions.start("registryReadWrite", b"key".to_vec(), start);
        let mut now = start;
        while now < start + MAX_LIFETIME - IDLE_TIMEOUT {
            now += IDLE_TIMEOUT / 2;
            assert!(sessions.resume(&id, now, current).is_some());
        }
        assert!(sessions
            .resume(&id, start + MAX_LIFETIME, current)
            .is_none());
    }

    #[test]
    fn a_session_ends_when_its_key_is_rotated_or_its_policy_removed() {
        let sessions = Sessions::default();
        let now = Instant::now();
        let id = sessions.start("registryReadWrite", b"old".to_vec(), now);
        assert!(sessions
            .resume(&id, now, |_| Some(policy(b"new")))
            .is_none());
        let id = sessions.start("registryReadWrite", b"old".to_vec(), now);
        assert!(sessions.resume(&id, now, |_| None).is_none());
        assert!(sessions
            .resume("not-a-session", now, |_| Some(policy(b"old")))
            .is_none());
    }

    #[test]
    fn sessions_are_bounded_and_the_one_idle_longest_goes_first() {
        let sessions = Sessions::default();
        let start = Instant::now();
        let current = |_: &str| Some(policy(b"key"));
        let first = sessions.start("p", b"key".to_vec(), start);
        let second = sessions.start("p", b"key".to_vec(), start + Duration::from_secs(1));
        assert!(sessions
            .resume(&first, start + Duration::from_secs(2), current)
            .is_some());
        for offset in 3..(MAX_SESSIONS as u64 + 2) {
            sessions.start("p", b"key".to_vec(), start + Duration::from_secs(offset));
        }
        assert_eq!(sessions.count(), MAX_SESSIONS);
        let later = start + Duration::from_secs(MAX_SESSIONS as u64 + 3);
        assert!(sessions.resume(&second, later, current).is_none());
        assert!(sessions.resume(&first, later, current).is_some());
    }

    #[test]
    fn tokens_and_cookies() {
        assert!(tokens_match("abc", "abc"));
        assert!(!tokens_match("abc", "abd"));
        assert!(!tokens_match("abc", ""));
        let mut headers = http::HeaderMap::new();
        headers.insert(
            http::header::COOKIE,
            "other=1; devstreams_console=xyz".parse().unwrap(),
        );
        assert_eq!(session_id(&headers).as_deref(), Some("xyz"));
        assert!(session_cookie("xyz", false).contains("HttpOnly; SameSite=Strict"));
        assert!(!session_cookie("xyz", false).contains("Secure"));
        assert!(session_cookie("xyz", true).ends_with("; Secure"));
        assert!(policy_has_key(&policy(b"k"), b"k"));
        assert!(!policy_has_key(&policy(b"k"), b"j"));
    }
}
