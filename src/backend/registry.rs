//! The registry: live backend state by address, outside any snapshot.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use super::state::BackendState;

/// Live state of every backend that is in the config or still draining, keyed by address.
/// Touched only when a snapshot is built, never per request.
#[derive(Debug, Default)]
pub struct Registry {
    backends: Mutex<HashMap<SocketAddr, Arc<BackendState>>>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// The state for `address`, created on first use; the same `Arc` for as long as it is held.
    pub fn get_or_create(&self, address: SocketAddr) -> Arc<BackendState> {
        let mut backends = self.backends.lock().unwrap_or_else(|e| e.into_inner());
        Arc::clone(
            backends
                .entry(address)
                .or_insert_with(|| BackendState::new(address)),
        )
    }

    /// The state for `address`, if it is known.
    pub fn get(&self, address: SocketAddr) -> Option<Arc<BackendState>> {
        let backends = self.backends.lock().unwrap_or_else(|e| e.into_inner());
        backends.get(&address).cloned()
    }

    /// Forgets `address`, so that a later use starts from fresh state.
    pub fn remove(&self, address: SocketAddr) -> Option<Arc<BackendState>> {
        let mut backends = self.backends.lock().unwrap_or_else(|e| e.into_inner());
        backends.remove(&address)
    }

    /// Every known backend, in address order.
    pub fn all(&self) -> Vec<Arc<BackendState>> {
        let backends = self.backends.lock().unwrap_or_else(|e| e.into_inner());
        let mut all: Vec<_> = backends.values().cloned().collect();
        all.sort_by_key(|b| b.address());
        all
    }
}
