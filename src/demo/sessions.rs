//! The demo app's sessions: a signed id in the `app_session` cookie, and the store that holds each
//! session's visit counter.
//!
//! The store decides whether the app is stateful or stateless. [`MemorySessions`] keeps counters in
//! the process, so a session exists only on the instance that started it; a shared store (the
//! examples' Redis store) lets every instance serve every session. The id is signed with a secret
//! the instances share, so any of them accepts an id another one issued, and a forged or unsigned id
//! counts as no session at all.

use std::collections::HashMap;
use std::error::Error;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::lock;

/// Name of the app's own session cookie; every other cookie (a proxy's affinity cookie) is ignored.
pub const SESSION_COOKIE: &str = "app_session";

/// The secret session ids are signed with unless told otherwise; fine for a demo on loopback only.
pub const DEMO_SESSION_SECRET: &str = "switchyard-demo-session-secret";

/// A session store's failure, with its source kept (e.g. a Redis error).
pub type StoreError = Box<dyn Error + Send + Sync>;

/// What a [`SessionStore`] method returns: boxed, so stores can sit behind `dyn`.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// Where visit counters live.
pub trait SessionStore: Send + Sync + 'static {
    /// Adds one visit to session `id` and returns its count, or `None` when the store has no such
    /// session (never started here, or expired).
    fn visit<'a>(&'a self, id: &'a str) -> StoreFuture<'a, Option<u64>>;

    /// Records the new session `id` with its first visit.
    fn create<'a>(&'a self, id: &'a str) -> StoreFuture<'a, ()>;

    /// A word for logs and status lines, e.g. `memory` or `redis`.
    fn kind(&self) -> &'static str;
}

/// Counters in this process's memory: the classic stateful app. Sessions live as long as the process.
#[derive(Debug, Default)]
pub struct MemorySessions {
    visits: Mutex<HashMap<String, u64>>,
}

impl MemorySessions {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }
}

impl SessionStore for MemorySessions {
    fn visit<'a>(&'a self, id: &'a str) -> StoreFuture<'a, Option<u64>> {
        let mut visits = lock(&self.visits);
        let count = visits.get_mut(id).map(|count| {
            *count += 1;
            *count
        });
        Box::pin(std::future::ready(Ok(count)))
    }

    fn create<'a>(&'a self, id: &'a str) -> StoreFuture<'a, ()> {
        lock(&self.visits).insert(id.to_owned(), 1);
        Box::pin(std::future::ready(Ok(())))
    }

    fn kind(&self) -> &'static str {
        "memory"
    }
}

/// Signs session ids as `{id}.{base64url(HMAC-SHA256(secret, id))}` and checks them.
#[derive(Clone)]
pub struct SessionSigner {
    key: Hmac<Sha256>,
}

impl SessionSigner {
    /// A signer keyed with `secret` (HMAC takes a key of any length).
    pub fn new(secret: &[u8]) -> Self {
        let key = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC accepts a key of any length");
        Self { key }
    }

    /// The cookie value for session `id`; `id` must not contain a `.`.
    pub fn sign(&self, id: &str) -> String {
        let mut mac = self.key.clone();
        mac.update(id.as_bytes());
        let tag = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
        format!("{id}.{tag}")
    }

    /// The session id inside `value` when its signature is ours; `None` for a forged, unsigned or
    /// malformed value.
    pub fn verify<'v>(&self, value: &'v str) -> Option<&'v str> {
        let (id, tag) = value.split_once('.')?;
        let tag = URL_SAFE_NO_PAD.decode(tag).ok()?;
        let mut mac = self.key.clone();
        mac.update(id.as_bytes());
        // Constant-time, so the comparison does not leak how much of a guessed tag was right.
        mac.verify_slice(&tag).ok()?;
        Some(id)
    }
}

impl fmt::Debug for SessionSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SessionSigner { .. }")
    }
}

/// How an app server keeps sessions: the store of counters and the signer of session ids. Give
/// every instance the same store and secret to make the app stateless.
#[derive(Clone)]
pub struct Sessions {
    pub(super) store: Arc<dyn SessionStore>,
    pub(super) signer: SessionSigner,
}

impl Sessions {
    /// Counters in this process only ([`MemorySessions`]), ids signed with [`DEMO_SESSION_SECRET`].
    pub fn memory() -> Self {
        Self::new(
            Arc::new(MemorySessions::new()),
            DEMO_SESSION_SECRET.as_bytes(),
        )
    }

    /// Counters in `store`, ids signed with `secret`.
    pub fn new(store: Arc<dyn SessionStore>, secret: &[u8]) -> Self {
        Self {
            store,
            signer: SessionSigner::new(secret),
        }
    }

    /// The store's kind, e.g. `memory`.
    pub fn kind(&self) -> &'static str {
        self.store.kind()
    }
}

impl fmt::Debug for Sessions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sessions")
            .field("store", &self.store.kind())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signed_id_verifies_under_the_same_secret_only() {
        let signer = SessionSigner::new(b"one secret");
        let value = signer.sign("0123abcd");
        assert_eq!(signer.verify(&value), Some("0123abcd"));
        // Another instance with the same secret accepts it.
        assert_eq!(
            SessionSigner::new(b"one secret").verify(&value),
            Some("0123abcd")
        );
        assert_eq!(SessionSigner::new(b"other secret").verify(&value), None);
    }

    #[test]
    fn forged_unsigned_and_malformed_values_are_rejected() {
        let signer = SessionSigner::new(DEMO_SESSION_SECRET.as_bytes());
        let value = signer.sign("0123abcd");
        let (_, tag) = value.split_once('.').unwrap();
        for bad in [
            "0123abcd".to_owned(),
            format!("0123abce.{tag}"),
            format!("0123abcd.{}", &tag[1..]),
            format!("0123abcd.{tag}x"),
            "0123abcd.".to_owned(),
            "0123abcd.!!!".to_owned(),
            String::new(),
        ] {
            assert_eq!(signer.verify(&bad), None, "{bad:?}");
        }
    }

    #[tokio::test]
    async fn memory_store_counts_only_sessions_it_created() {
        let store = MemorySessions::new();
        assert_eq!(store.visit("a").await.unwrap(), None);
        store.create("a").await.unwrap();
        assert_eq!(store.visit("a").await.unwrap(), Some(2));
        assert_eq!(store.visit("a").await.unwrap(), Some(3));
        assert_eq!(MemorySessions::new().visit("a").await.unwrap(), None);
    }
}
