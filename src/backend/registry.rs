//! The registry: live backend state by address, outside any snapshot.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use super::state::{BackendState, BackendStatus};

/// Live state of every backend that is in the config or still draining, keyed by address.
/// Touched only when a snapshot is built, never per request.
#[derive(Debug, Default)]
pub struct Registry {
    backends: Mutex<HashMap<SocketAddr, Arc<BackendState>>>,
    /// Work in flight per pool name, for pools with bounded loads (`balance_factor`).
    pool_loads: Mutex<HashMap<String, Arc<AtomicU64>>>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// The state for `address`, created on first use; the same `Arc` for as long as it is held.
    /// A Retired entry is replaced by a fresh one: its drain has ended and the drain's end hook is
    /// about to release it, so a reload adding the address back in between must not pick it up
    /// (Retired takes no work, ever).
    pub fn get_or_create(&self, address: SocketAddr) -> Arc<BackendState> {
        let mut backends = self.backends.lock().unwrap_or_else(|e| e.into_inner());
        let state = backends
            .entry(address)
            .and_modify(|state| {
                if state.status() == BackendStatus::Retired {
                    *state = BackendState::new(address);
                }
            })
            .or_insert_with(|| BackendState::new(address));
        Arc::clone(state)
    }

    /// The state for `address`, if it is known.
    pub fn get(&self, address: SocketAddr) -> Option<Arc<BackendState>> {
        let backends = self.backends.lock().unwrap_or_else(|e| e.into_inner());
        backends.get(&address).cloned()
    }

    /// Forgets `address` if its state is still `state` (checked and removed under one lock, so a
    /// fresh state created meanwhile for the same address is kept).
    pub fn remove_if_same(&self, address: SocketAddr, state: &Arc<BackendState>) {
        let mut backends = self.backends.lock().unwrap_or_else(|e| e.into_inner());
        if backends
            .get(&address)
            .is_some_and(|s| Arc::ptr_eq(s, state))
        {
            backends.remove(&address);
        }
    }

    /// The in-flight counter of pool `name`, the same one for as long as a pool of that name
    /// asks for it, so its count carries over reloads. Only names in `keep` are kept.
    pub fn pool_load(&self, name: &str) -> Arc<AtomicU64> {
        let mut loads = self.pool_loads.lock().unwrap_or_else(|e| e.into_inner());
        Arc::clone(loads.entry(name.to_owned()).or_default())
    }

    /// Forgets the pool counters of names not in `keep`.
    pub fn retain_pool_loads(&self, keep: &[&str]) {
        let mut loads = self.pool_loads.lock().unwrap_or_else(|e| e.into_inner());
        loads.retain(|name, _| keep.contains(&name.as_str()));
    }

    /// Forgets `address`, so that a later use starts from fresh state.
    pub fn remove(&self, address: SocketAddr) -> Option<Arc<BackendState>> {
        let mut backends = self.backends.lock().unwrap_or_else(|e| e.into_inner());
        backends.remove(&address)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn retired_entry_is_replaced_not_reused() {
        let registry = Registry::new();
        let address = "192.0.2.10:80".parse().unwrap();
        let first = registry.get_or_create(address);
        assert!(Arc::ptr_eq(&first, &registry.get_or_create(address)));

        // The drain ends without the hook that would release it: the moment a reload may see it.
        let drain = crate::drain::start(&first, Duration::from_secs(5), true, |_, _| {}).unwrap();
        let mut done = drain.done.clone();
        done.wait_for(Option::is_some).await.unwrap();
        assert_eq!(first.status(), BackendStatus::Retired);

        let again = registry.get_or_create(address);
        assert!(!Arc::ptr_eq(&first, &again), "the retired state was reused");
        assert_eq!(again.status(), BackendStatus::Active);
        assert!(Arc::ptr_eq(&again, &registry.get(address).unwrap()));
    }
}
