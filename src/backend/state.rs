//! Live state of one backend address, shared by every pool and every snapshot that names it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

use std::sync::Mutex;
use std::time::Instant;

use tokio::sync::{watch, Notify};

use super::pool::ConnPool;
use crate::health::HealthState;

/// Where a backend is in its life: Active → Draining → Retired when removed from the config, or
/// Active → Draining → Drained when drained at runtime (sozu's `BackendStatus`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BackendStatus {
    /// Takes new requests.
    Active,
    /// Takes no new requests (sticky clients aside, see `drain_sticky`); in-flight work finishes.
    Draining,
    /// Drained at runtime and still in the config: takes no work until undrained.
    Drained,
    /// Removed from the config and drained: released from the registry.
    Retired,
}

impl BackendStatus {
    /// The name used in `/status` and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            BackendStatus::Active => "active",
            BackendStatus::Draining => "draining",
            BackendStatus::Drained => "drained",
            BackendStatus::Retired => "retired",
        }
    }

    fn from_u8(v: u8) -> Self {
        match v {
            0 => BackendStatus::Active,
            1 => BackendStatus::Draining,
            2 => BackendStatus::Drained,
            _ => BackendStatus::Retired,
        }
    }
}

/// Live state of a backend. One per address, held by the [`super::Registry`] and by every snapshot
/// member with that address, so counts and connections carry over when the config is reloaded.
#[derive(Debug)]
pub struct BackendState {
    address: SocketAddr,
    status: AtomicU8,
    in_flight: AtomicU64,
    upgraded: AtomicU64,
    upgrades: AtomicU64,
    requests: AtomicU64,
    /// Woken whenever in-flight or upgraded counts drop, so a drain can notice zero.
    quiet: Notify,
    /// Flipped to true to cut upgraded connections at a drain deadline.
    cut: watch::Sender<bool>,
    /// Upgraded connections cut by a drain deadline since the process started.
    upgraded_cut: AtomicU64,
    /// The drain under way, if any.
    drain: Mutex<Option<Drain>>,
    /// Idle keep-alive connections to this backend.
    pub pool: Arc<ConnPool>,
    /// Active and passive health, and slow start.
    pub health: HealthState,
}

impl BackendState {
    /// A new, active backend with nothing in flight.
    pub fn new(address: SocketAddr) -> Arc<Self> {
        Arc::new(BackendState {
            address,
            status: AtomicU8::new(BackendStatus::Active as u8),
            in_flight: AtomicU64::new(0),
            upgraded: AtomicU64::new(0),
            upgrades: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            quiet: Notify::new(),
            cut: watch::channel(false).0,
            upgraded_cut: AtomicU64::new(0),
            drain: Mutex::new(None),
            pool: Arc::new(ConnPool::new(address)),
            health: HealthState::default(),
        })
    }

    /// The backend's address: its identity.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// The current life-cycle state.
    pub fn status(&self) -> BackendStatus {
        BackendStatus::from_u8(self.status.load(Ordering::Acquire))
    }

    /// Whether new work may be sent here: active (not draining) and healthy.
    #[inline]
    pub fn is_ready(&self) -> bool {
        self.status.load(Ordering::Relaxed) == BackendStatus::Active as u8
            && self.health.is_available()
    }

    /// In-flight requests plus upgraded connections: what `max_connections` limits and
    /// `least_connections` compares.
    #[inline]
    pub fn load(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed) + self.upgraded.load(Ordering::Relaxed)
    }

    /// Whether the backend is draining.
    pub fn is_draining(&self) -> bool {
        self.status.load(Ordering::Relaxed) == BackendStatus::Draining as u8
    }

    fn set_status(&self, status: BackendStatus) {
        // SeqCst, with the guards' release (`fetch_sub` then `released`) and the drain's
        // `is_quiet`: store-then-load on both sides is the store-buffer pattern, where weaker
        // orderings let the guard miss Draining (no wake-up) while the drain reads the count from
        // before the release (not quiet), and the drain would sit until its deadline.
        self.status.store(status as u8, Ordering::SeqCst);
        if status == BackendStatus::Active {
            self.cut.send_replace(false);
        }
        // Wake drain waiters so they notice a drain that was called off.
        self.quiet.notify_waiters();
    }

    fn lock_drain(&self) -> std::sync::MutexGuard<'_, Option<Drain>> {
        self.drain.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The drain under way, if any.
    pub fn drain(&self) -> Option<Drain> {
        self.lock_drain().clone()
    }

    // Drain transitions below hold the drain lock while they read and write the status, so a
    // drain ending, starting and being called off on different threads cannot interleave. Under
    // the lock, a drain is in the slot exactly while the status is Draining.

    /// Starts the drain `make` builds, for a removal from the config (`removed`) or at runtime.
    /// A drain already under way is joined instead, taking on this reason too. Returns the drain in
    /// force and whether it is new, or the status that refused it: Retired (released; it never
    /// comes back) or, for a runtime drain, Drained (nothing left to do).
    pub(crate) fn begin_drain(
        &self,
        removed: bool,
        make: impl FnOnce() -> Drain,
    ) -> Result<(Drain, bool), BackendStatus> {
        let mut slot = self.lock_drain();
        let status = self.status();
        // A Drained backend is already out of rotation: draining it again, even for a removal,
        // would make it Draining and so reachable by sticky clients once more. It stays Drained
        // (in the registry, out of every pool) until the operator undrains it.
        if matches!(status, BackendStatus::Retired | BackendStatus::Drained) {
            return Err(status);
        }
        if let Some(existing) = slot.as_mut() {
            if removed {
                existing.removed = true;
            } else {
                existing.runtime = true;
            }
            return Ok((existing.clone(), false));
        }
        let drain = make();
        *slot = Some(drain.clone());
        self.set_status(BackendStatus::Draining);
        Ok((drain, true))
    }

    /// Whether the backend is Draining under the drain whose outcome goes to `done`, not under one
    /// started after that one was called off.
    pub(crate) fn is_draining_with(&self, done: &watch::Receiver<Option<DrainOutcome>>) -> bool {
        self.in_force(&self.lock_drain(), done)
    }

    fn in_force(&self, slot: &Option<Drain>, done: &watch::Receiver<Option<DrainOutcome>>) -> bool {
        slot.as_ref().is_some_and(|d| d.done.same_channel(done))
            && self.status() == BackendStatus::Draining
    }

    /// Ends the drain whose outcome goes to `done`, if it is still the one in force: Retired when
    /// it was removed from the config, Drained otherwise. `None` when it was called off.
    pub(crate) fn end_drain(
        &self,
        done: &watch::Receiver<Option<DrainOutcome>>,
    ) -> Option<BackendStatus> {
        let mut slot = self.lock_drain();
        if !self.in_force(&slot, done) {
            return None;
        }
        let removed = slot.take().is_some_and(|d| d.removed);
        let to = if removed {
            BackendStatus::Retired
        } else {
            BackendStatus::Drained
        };
        self.set_status(to);
        Some(to)
    }

    /// Back in the config: a drain for the removal is called off (active again, returns true),
    /// unless the operator drained the backend too; that drain goes on and ends as Drained.
    pub(crate) fn return_to_config(&self) -> bool {
        let mut slot = self.lock_drain();
        let Some(drain) = slot.as_mut().filter(|d| d.removed) else {
            return false;
        };
        drain.removed = false;
        if drain.runtime {
            return false;
        }
        *slot = None;
        self.set_status(BackendStatus::Active);
        true
    }

    /// The operator's undrain: a runtime drain under way or ended is called off (active again,
    /// returns true). Refused with the status when the backend is leaving the config: Draining
    /// for a removal, or Retired.
    pub(crate) fn undrain(&self) -> Result<bool, BackendStatus> {
        let mut slot = self.lock_drain();
        let status = self.status();
        if status == BackendStatus::Retired || slot.as_ref().is_some_and(|d| d.removed) {
            return Err(status);
        }
        if !matches!(status, BackendStatus::Draining | BackendStatus::Drained) {
            return Ok(false);
        }
        *slot = None;
        self.set_status(BackendStatus::Active);
        Ok(true)
    }

    /// Requests finished since the process started (sent minus still in flight).
    pub fn completed(&self) -> u64 {
        self.requests().saturating_sub(self.in_flight())
    }

    /// Upgraded connections cut by drain deadlines since the process started.
    pub fn upgraded_cut(&self) -> u64 {
        self.upgraded_cut.load(Ordering::Relaxed)
    }

    pub(crate) fn count_cut(&self) {
        self.upgraded_cut.fetch_add(1, Ordering::Relaxed);
    }

    /// Whether a drain has ended (Drained or Retired): no request may start here now.
    pub fn is_out_of_rotation(&self) -> bool {
        matches!(
            BackendStatus::from_u8(self.status.load(Ordering::SeqCst)),
            BackendStatus::Drained | BackendStatus::Retired
        )
    }

    /// Requests in flight (headers sent, response body not yet finished).
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Upgraded connections (WebSocket and others) open through this backend.
    pub fn upgraded(&self) -> u64 {
        self.upgraded.load(Ordering::Relaxed)
    }

    /// Upgraded connections opened through this backend since the process started.
    pub fn upgrades(&self) -> u64 {
        self.upgrades.load(Ordering::Relaxed)
    }

    /// Requests sent here since the process started.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Counts a request until the returned guard is dropped (when the response body ends).
    pub fn start_request(self: &Arc<Self>) -> InFlightGuard {
        // SeqCst with the drain's quiet check and status store: a request counted after a drain
        // saw zero is turned away by the caller's `is_out_of_rotation` check, but for a window of
        // a few instructions; one that slips through still completes (the backend is out of
        // rotation, not gone).
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        self.requests.fetch_add(1, Ordering::Relaxed);
        InFlightGuard {
            state: Arc::clone(self),
            pool: None,
        }
    }

    /// Counts an upgraded connection until the returned guard is dropped.
    pub fn start_upgrade(self: &Arc<Self>) -> UpgradeGuard {
        self.upgraded.fetch_add(1, Ordering::Relaxed);
        self.upgrades.fetch_add(1, Ordering::Relaxed);
        UpgradeGuard {
            state: Arc::clone(self),
            pool: None,
        }
    }

    /// Resolves once `done(self)` holds, re-checking whenever work is released or the status
    /// changes.
    pub async fn wait_until(&self, done: impl Fn(&Self) -> bool) {
        loop {
            let notified = self.quiet.notified();
            tokio::pin!(notified);
            // Register before checking, so a release between the check and the await is not missed.
            notified.as_mut().enable();
            if done(self) {
                return;
            }
            notified.await;
        }
    }

    /// Whether nothing is in flight and no upgraded connection is open.
    pub fn is_quiet(&self) -> bool {
        // SeqCst: the drain's half of the pattern described in `set_status`.
        self.in_flight.load(Ordering::SeqCst) == 0 && self.upgraded.load(Ordering::SeqCst) == 0
    }

    /// A receiver that turns true when upgraded connections must be cut.
    pub fn cut_signal(&self) -> watch::Receiver<bool> {
        self.cut.subscribe()
    }

    /// Whether upgraded connections through this backend are being cut (a drain's deadline).
    pub fn is_cut(&self) -> bool {
        *self.cut.borrow()
    }

    /// Tells every upgraded connection through this backend to close.
    pub fn cut_upgraded(&self) {
        self.cut.send_replace(true);
    }

    /// Cuts upgraded connections for the drain whose outcome goes to `done`, if it is still the
    /// one in force (returns whether it was). Checked and cut under the drain's lock: a reload
    /// that calls the drain off in between would set the backend Active and clear the cut, and a
    /// cut after that would stay, closing every later tunnel at once.
    pub(crate) fn cut_upgraded_for(&self, done: &watch::Receiver<Option<DrainOutcome>>) -> bool {
        let slot = self.lock_drain();
        let in_force = self.in_force(&slot, done);
        if in_force {
            self.cut_upgraded();
        }
        in_force
    }

    fn released(&self) {
        // SeqCst: the guard's half of the pattern described in `set_status`.
        if self.status.load(Ordering::SeqCst) == BackendStatus::Draining as u8 {
            self.quiet.notify_waiters();
        }
    }
}

/// A drain under way: when it started and must end, and what was open when it started.
#[derive(Debug, Clone)]
pub struct Drain {
    /// When the drain started.
    pub started: Instant,
    /// When upgraded connections still open are cut.
    pub deadline: Instant,
    /// Whether the backend left the config: the drain ends Retired. Cleared when it comes back.
    pub removed: bool,
    /// Whether the operator drained it (admin API): kept across a removal and a return to the
    /// config, so it ends Drained unless removed, and only `/undrain` calls it off.
    pub runtime: bool,
    /// `completed()` when the drain started.
    pub completed_at_start: u64,
    /// `upgraded_cut()` when the drain started.
    pub cut_at_start: u64,
    /// `upgrades()` when the drain started.
    pub upgrades_at_start: u64,
    /// Upgraded connections open when the drain started.
    pub upgraded_at_start: u64,
    /// Turns to `Some` when the drain ends.
    pub done: watch::Receiver<Option<DrainOutcome>>,
}

/// How a drain ended.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct DrainOutcome {
    /// `drained` (nothing left in flight), `deadline` (the timeout cut what was left) or
    /// `cancelled` (undrained, or added back to the config, before it ended).
    pub end: &'static str,
    /// Requests that completed while draining.
    pub requests_finished: u64,
    /// Requests still in flight at the deadline (left to their own timeouts).
    pub requests_unfinished: u64,
    /// Upgraded connections that closed by themselves while draining.
    pub upgraded_finished: u64,
    /// Upgraded connections cut at the deadline.
    pub upgraded_cut: u64,
    /// How long the drain took, in seconds.
    pub seconds: f64,
}

/// Holds one in-flight request against a backend (and, for bounded-load pools, against the pool);
/// released when dropped.
#[derive(Debug)]
pub struct InFlightGuard {
    state: Arc<BackendState>,
    pool: Option<Arc<AtomicU64>>,
}

impl InFlightGuard {
    /// Counts the request in `pool` too, until the guard is dropped.
    pub fn count_in(&mut self, pool: &Arc<AtomicU64>) {
        pool.fetch_add(1, Ordering::Relaxed);
        self.pool = Some(Arc::clone(pool));
    }

    /// The backend this request went to.
    pub fn backend(&self) -> &Arc<BackendState> {
        &self.state
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        // SeqCst: see `BackendState::set_status`.
        self.state.in_flight.fetch_sub(1, Ordering::SeqCst);
        if let Some(pool) = &self.pool {
            pool.fetch_sub(1, Ordering::Relaxed);
        }
        self.state.released();
    }
}

/// Holds one upgraded connection against a backend (and, for bounded-load pools, against the
/// pool); released when dropped.
#[derive(Debug)]
pub struct UpgradeGuard {
    state: Arc<BackendState>,
    pool: Option<Arc<AtomicU64>>,
}

impl UpgradeGuard {
    /// Counts the connection in `pool` too, until the guard is dropped.
    pub fn count_in(&mut self, pool: &Arc<AtomicU64>) {
        pool.fetch_add(1, Ordering::Relaxed);
        self.pool = Some(Arc::clone(pool));
    }

    /// The backend this connection goes to.
    pub fn backend(&self) -> &Arc<BackendState> {
        &self.state
    }
}

impl Drop for UpgradeGuard {
    fn drop(&mut self) {
        // SeqCst: see `BackendState::set_status`.
        self.state.upgraded.fetch_sub(1, Ordering::SeqCst);
        if let Some(pool) = &self.pool {
            pool.fetch_sub(1, Ordering::Relaxed);
        }
        self.state.released();
    }
}
