//! NATS decentralized authentication for the tests of `--cluster-creds`:
//! an operator, an account with JetStream and a user, as signed JWTs, the
//! `nats-server` configuration that trusts them, and the `.creds` file a
//! relay logs in with.
//!
//! Deployments that run NATS in operator mode (NGS, or their own operator
//! made with `nsc`) hand each client a `.creds` file rather than a user and
//! password; the relay must log in with one. `nsc` is not packaged for
//! Debian, so the tests sign the JWTs themselves with the same NKeys
//! `async-nats` uses: a JWT is `header.claims.signature`, each part
//! base64url without padding, signed by the issuer's ed25519 NKey over the
//! first two parts. The server checks the chain operator → account → user;
//! a user signed by any other account is refused.

use std::path::PathBuf;

use base64::Engine;
use nkeys::KeyPair;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// A `.creds` file's two armoured blocks, as `nsc` writes them.
fn creds_text(jwt: &str, seed: &str) -> String {
    format!(
        "-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n\
         ************************* IMPORTANT *************************\n\
         NKEY Seed printed below can be used to sign and prove identity.\n\
         NKEYs are sensitive and should be treated as secrets.\n\n\
         -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n\n\
         *************************************************************\n"
    )
}

/// A NATS JWT with `claims` about `subject`, issued and signed by `issuer`.
fn sign_jwt(issuer: &KeyPair, subject: &str, name: &str, claims: Value) -> String {
    let base64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let issued_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs())
        .unwrap_or(0);
    let mut body = json!({
        "iat": issued_at,
        "iss": issuer.public_key(),
        "name": name,
        "sub": subject,
        "nats": claims,
    });
    // The JWT id: any text unique to these claims.
    let id = hex_text(&Sha256::digest(body.to_string().as_bytes()));
    body["jti"] = Value::String(id);
    let header = base64.encode(r#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let payload = base64.encode(body.to_string());
    let signed = format!("{header}.{payload}");
    let signature = issuer
        .sign(signed.as_bytes())
        .expect("an NKey made here signs");
    format!("{signed}.{}", base64.encode(signature))
}

fn hex_text(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// A new account's key and its JWT, signed by `operator`.
fn new_account(operator: &KeyPair, name: &str, claims: Value) -> (KeyPair, String) {
    let account = KeyPair::new_account();
    let jwt = sign_jwt(operator, &account.public_key(), name, claims);
    (account, jwt)
}

/// An account's claims: no limits, JetStream on.
fn account_claims() -> Value {
    json!({
        "type": "account",
        "version": 2,
        "limits": {
            "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
            "wildcards": true, "conn": -1, "leaf": -1,
            "mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1
        },
        "default_permissions": { "pub": {}, "sub": {} }
    })
}

/// A user's claims: may publish and subscribe to anything.
fn user_claims() -> Value {
    json!({
        "type": "user",
        "version": 2,
        "pub": {}, "sub": {},
        "subs": -1, "data": -1, "payload": -1
    })
}

/// An operator, one account with JetStream and one user of it, written to
/// a directory of their own: `operator.jwt`, `server.conf` (include it
/// with `nats-server -c`) and `user.creds`.
pub struct NatsOperator {
    pub directory: tempfile::TempDir,
    account: KeyPair,
}

impl NatsOperator {
    /// Generates the keys and writes the files. The server configuration
    /// turns JetStream on; its store is `nats-server -sd`'s.
    pub fn generate() -> NatsOperator {
        let directory = tempfile::tempdir().expect("temp dir");
        let operator = KeyPair::new_operator();
        let operator_jwt = sign_jwt(
            &operator,
            &operator.public_key(),
            "devstreams-test-operator",
            json!({ "type": "operator", "version": 2 }),
        );
        let (account, account_jwt) = new_account(&operator, "devstreams", account_claims());
        // JetStream needs the server's own account for its requests.
        let (system, system_jwt) =
            new_account(&operator, "SYS", json!({ "type": "account", "version": 2 }));
        let operator_path = directory.path().join("operator.jwt");
        std::fs::write(&operator_path, &operator_jwt).expect("operator JWT written");
        let configuration = format!(
            "operator: {operator:?}\n\
             system_account: {system}\n\
             resolver: MEMORY\n\
             resolver_preload: {{\n  {account}: {account_jwt:?}\n  {system}: {system_jwt:?}\n}}\n\
             jetstream: enabled\n",
            operator = operator_path.to_string_lossy(),
            account = account.public_key(),
            system = system.public_key(),
        );
        std::fs::write(directory.path().join("server.conf"), configuration)
            .expect("server configuration written");
        let result = NatsOperator { directory, account };
        let creds = result.user_creds("relay");
        std::fs::write(result.creds(), creds).expect("creds written");
        result
    }

    /// `nats-server -c` this.
    pub fn server_configuration(&self) -> PathBuf {
        self.directory.path().join("server.conf")
    }

    /// The `.creds` file of a user of the account.
    pub fn creds(&self) -> PathBuf {
        self.directory.path().join("user.creds")
    }

    /// A `.creds` text for a new user of this operator's account.
    pub fn user_creds(&self, name: &str) -> String {
        let user = KeyPair::new_user();
        let jwt = sign_jwt(&self.account, &user.public_key(), name, user_claims());
        creds_text(&jwt, &user.seed().expect("a new user key has a seed"))
    }

    /// A `.creds` text that is well formed but signed by an account this
    /// server does not know: what a file from another deployment looks
    /// like.
    pub fn foreign_creds() -> String {
        let stranger = KeyPair::new_account();
        let user = KeyPair::new_user();
        let jwt = sign_jwt(&stranger, &user.public_key(), "stranger", user_claims());
        creds_text(&jwt, &user.seed().expect("a new user key has a seed"))
    }
}
