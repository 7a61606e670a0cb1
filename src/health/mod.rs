//! Backend health: whether a backend may take work, apart from its drain state.
//!
//! Three things decide it, all kept per backend address in [`HealthState`] (part of the backend's
//! live state, so it survives reloads like in-flight counts do):
//! - active checks ([`active`]): an HTTP GET in the background marks a backend down after
//!   `unhealthy_threshold` failures and up after `healthy_threshold` passes;
//! - passive checks ([`observe`], on the request path): `consecutive_failures` connection errors,
//!   timeouts, 5xx answers or response bodies that break off (counted when the body ends, by
//!   [`crate::proxy::BodyWatch`]) eject a backend for `ejection_time`, doubling on repeated ejections,
//!   never ejecting more than `max_ejected_percent` of a pool. With active checks configured, the
//!   checks readmit an ejected backend (HAProxy's `observe` + `rise`); without, a timer does;
//! - slow start: a backend that was added or came back ramps its share of new work from
//!   [`SLOW_START_FLOOR`] to full over the pool's `slow_start`.
//!
//! Every change is reported once through [`report`]: logged, counted, and checked against the
//! pools it belongs to, so that a pool left with no available backend is logged once when it
//! happens and once when it ends, not on every request it turns away.

pub mod active;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, Instant, SystemTime};

use crate::backend::BackendState;
use crate::config::PassiveConfig;
use crate::state::{Pool, Shared};

/// Active checks say the backend is down.
const DOWN: u8 = 1;
/// Passive checks ejected the backend.
const EJECTED: u8 = 2;

/// Where slow start begins, in thousandths of the full weight (Envoy's default minimum, 10%).
pub const SLOW_START_FLOOR: u64 = 100;

/// Full weight, in thousandths.
pub const FULL_WEIGHT: u64 = 1000;

/// A process-wide origin for timestamps kept in atomics.
fn now_ns() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = *EPOCH.get_or_init(Instant::now);
    // +1 so that 0 can mean "never".
    epoch.elapsed().as_nanos() as u64 + 1
}

/// Health of one backend address. The hot path reads one atomic ([`HealthState::is_available`]);
/// the details behind a mutex are for `/status` and change only when the health does.
#[derive(Debug, Default)]
pub struct HealthState {
    flags: AtomicU8,
    /// Whether active checks run for this address (then they, not a timer, end ejections).
    checked: AtomicBool,
    /// Failed requests in a row, as passive checks count them.
    failures: AtomicU32,
    /// Passed active checks since the last ejection.
    passes_since_ejection: AtomicU32,
    /// Bumped by each ejection, so a stale timer cannot end a later one.
    generation: AtomicU64,
    /// Which checker may write its verdicts: bumped when checks start, restart or stop, and
    /// held while a verdict is written, so a checker that was stopped cannot write after.
    checker: Mutex<u64>,
    /// [`now_ns`] when slow start began; 0 when not ramping.
    slow_start_since: AtomicU64,
    /// Turns offered to the backend while ramping, for its admission schedule.
    offered: AtomicU64,
    detail: Mutex<Detail>,
}

/// What `/status` shows beyond the flags.
#[derive(Debug, Default)]
struct Detail {
    last_check: Option<CheckOutcome>,
    ejected_until: Option<Instant>,
    /// Ejections in a row, for the doubling; decays while the backend stays in.
    streak: u32,
    readmitted: Option<Instant>,
    ejections: u64,
    changed: Option<SystemTime>,
}

/// The result of one active check.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CheckOutcome {
    /// Whether the check passed.
    pub passed: bool,
    /// The status (`"200"`), or what went wrong (`"connect: Connection refused"`).
    pub result: String,
}

/// A change in a backend's health, as logged and counted.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// Active checks failed `unhealthy_threshold` times.
    Down {
        /// The last check's result.
        reason: String,
    },
    /// Active checks passed `healthy_threshold` times.
    Up,
    /// Passive checks saw `consecutive_failures` failures.
    Ejected {
        /// Until readmitted by a timer (`Some`) or by active checks (`None`).
        time: Option<Duration>,
        /// The failures in a row that ejected it.
        failures: u32,
    },
    /// An ejection ended.
    Readmitted {
        /// `timer` or `checks`.
        by: &'static str,
    },
    /// Active checks stopped (the pool's `[health]` went away): whatever they decided is dropped.
    Unchecked,
}

impl Change {
    /// The metric label.
    pub fn as_str(&self) -> &'static str {
        match self {
            Change::Down { .. } => "down",
            Change::Up => "up",
            Change::Ejected { .. } => "ejected",
            Change::Readmitted { .. } => "readmitted",
            Change::Unchecked => "unchecked",
        }
    }
}

impl HealthState {
    fn detail(&self) -> MutexGuard<'_, Detail> {
        self.detail.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Neither down nor ejected.
    #[inline]
    pub fn is_available(&self) -> bool {
        self.flags.load(Ordering::Relaxed) == 0
    }

    /// Whether active checks marked the backend down.
    pub fn is_down(&self) -> bool {
        self.flags.load(Ordering::Relaxed) & DOWN != 0
    }

    /// Whether passive checks ejected the backend.
    pub fn is_ejected(&self) -> bool {
        self.flags.load(Ordering::Relaxed) & EJECTED != 0
    }

    /// Whether active checks run for this address.
    pub fn is_checked(&self) -> bool {
        self.checked.load(Ordering::Relaxed)
    }

    /// The name `/status` shows: `healthy`, `down`, `ejected` or `down, ejected`.
    pub fn label(&self) -> &'static str {
        match self.flags.load(Ordering::Relaxed) {
            0 => "healthy",
            DOWN => "down",
            EJECTED => "ejected",
            _ => "down, ejected",
        }
    }

    /// Sets a flag; true when it was not set.
    fn set(&self, flag: u8) -> bool {
        self.flags.fetch_or(flag, Ordering::SeqCst) & flag == 0
    }

    /// Clears a flag; true when it was set.
    fn clear(&self, flag: u8) -> bool {
        self.flags.fetch_and(!flag, Ordering::SeqCst) & flag != 0
    }

    fn changed(&self) {
        self.detail().changed = Some(SystemTime::now());
    }

    /// Marks the backend down (active checks); true when it was up.
    pub(crate) fn mark_down(&self) -> bool {
        let changed = self.set(DOWN);
        if changed {
            self.changed();
        }
        changed
    }

    /// Marks the backend up (active checks); true when it was down.
    pub(crate) fn mark_up(&self) -> bool {
        let changed = self.clear(DOWN);
        if changed {
            self.changed();
            self.begin_slow_start();
        }
        changed
    }

    /// Records an active check's result; returns how many checks passed since the last ejection.
    pub(crate) fn record_check(&self, outcome: CheckOutcome) -> u32 {
        let since_ejection = if outcome.passed {
            self.passes_since_ejection.fetch_add(1, Ordering::Relaxed) + 1
        } else {
            self.passes_since_ejection.store(0, Ordering::Relaxed);
            0
        };
        self.detail().last_check = Some(outcome);
        since_ejection
    }

    fn set_checked(&self, checked: bool) {
        self.checked.store(checked, Ordering::Relaxed);
        if !checked {
            self.detail().last_check = None;
        }
    }

    fn lock_checker(&self) -> MutexGuard<'_, u64> {
        self.checker.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Hands checks of this address to a new checker; returns its epoch. An older checker's
    /// verdicts are refused from now on.
    pub(crate) fn start_checks(&self) -> u64 {
        let mut epoch = self.lock_checker();
        *epoch += 1;
        self.set_checked(true);
        *epoch
    }

    /// Runs `verdict` (a checker's writes) only if the checker of `epoch` is still the current
    /// one, holding the epoch so that checks cannot stop or restart meanwhile.
    pub(crate) fn as_checker<R>(&self, epoch: u64, verdict: impl FnOnce() -> R) -> Option<R> {
        let current = self.lock_checker();
        (*current == epoch).then(verdict)
    }

    /// Checks stop, for a backend leaving the config: the last verdict stays (a dead draining
    /// backend stays down for its sticky clients) but no checker may write any more.
    pub(crate) fn stop_checks(&self) {
        let mut epoch = self.lock_checker();
        *epoch += 1;
        self.set_checked(false);
    }

    /// A request succeeded: the failure streak ends.
    #[inline]
    pub(crate) fn succeeded(&self) {
        // Read first: a store on every request would bounce the cache line between cores.
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
        }
    }

    /// A request failed; returns the failures in a row.
    pub(crate) fn failed(&self) -> u32 {
        self.failures.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Failed requests in a row, as passive checks count them.
    pub fn consecutive_failures(&self) -> u32 {
        self.failures.load(Ordering::Relaxed)
    }

    /// Ejects the backend for `config.ejection_time`, doubled for each ejection in the current
    /// streak, at most `config.max_ejection_time`; `timed` when a timer will end it (otherwise
    /// active checks do). Returns the ejection's generation and length, or `None` when it was
    /// ejected already.
    pub(crate) fn eject(&self, config: &PassiveConfig, timed: bool) -> Option<(u64, Duration)> {
        let mut detail = self.detail();
        if !self.set(EJECTED) {
            return None;
        }
        let now = Instant::now();
        // The streak decays by one for each ejection_time the backend stayed in since it came back.
        if let Some(back) = detail.readmitted {
            let stayed = now.duration_since(back).as_nanos();
            let decay = stayed / config.ejection_time.as_nanos().max(1);
            detail.streak = detail
                .streak
                .saturating_sub(u32::try_from(decay).unwrap_or(u32::MAX));
        }
        detail.streak = detail.streak.saturating_add(1);
        let doubling = 1u32 << (detail.streak - 1).min(16);
        let time = config
            .ejection_time
            .saturating_mul(doubling)
            .min(config.max_ejection_time);
        detail.ejected_until = timed.then(|| now + time);
        detail.ejections += 1;
        detail.changed = Some(SystemTime::now());
        self.passes_since_ejection.store(0, Ordering::Relaxed);
        self.failures.store(0, Ordering::Relaxed);
        let generation = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        Some((generation, time))
    }

    /// Ends the ejection `generation` (or any ejection, with `None`); true when it was in force.
    pub(crate) fn readmit(&self, generation: Option<u64>) -> bool {
        let mut detail = self.detail();
        if generation.is_some_and(|g| g != self.generation.load(Ordering::SeqCst)) {
            return false;
        }
        if !self.clear(EJECTED) {
            return false;
        }
        detail.ejected_until = None;
        detail.readmitted = Some(Instant::now());
        // Failures of requests that were in flight during the ejection do not count against it
        // once it is back.
        self.failures.store(0, Ordering::Relaxed);
        detail.changed = Some(SystemTime::now());
        drop(detail);
        self.begin_slow_start();
        true
    }

    /// The current ejection's generation.
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// Drops what active checks decided, when they stop for this address; true when it was down
    /// or ejected.
    pub(crate) fn forget_checks(&self) -> bool {
        let mut epoch = self.lock_checker();
        *epoch += 1;
        self.set_checked(false);
        let was_down = self.clear(DOWN);
        let was_ejected = self.readmit(None);
        drop(epoch);
        was_down || was_ejected
    }

    /// Starts ramping this backend's share of new work (new in a pool, or back from down or
    /// ejected). Pools without `slow_start` ignore it.
    pub(crate) fn begin_slow_start(&self) {
        self.offered.store(0, Ordering::Relaxed);
        self.slow_start_since.store(now_ns(), Ordering::Relaxed);
    }

    /// The share of its weight the backend takes now, in thousandths: [`FULL_WEIGHT`] unless it
    /// is ramping within a `slow_start` window, from [`SLOW_START_FLOOR`] up, linearly.
    #[inline]
    pub fn weight_permille(&self, slow_start: Option<Duration>) -> u64 {
        let Some(window) = slow_start else {
            return FULL_WEIGHT;
        };
        let since = self.slow_start_since.load(Ordering::Relaxed);
        if since == 0 {
            return FULL_WEIGHT;
        }
        let elapsed = now_ns().saturating_sub(since);
        let window = window.as_nanos().max(1) as u64;
        if elapsed >= window {
            // Ramp over: spare later calls the clock. (Pools sharing this address with a longer
            // window end their ramp here too.)
            let _ = self.slow_start_since.compare_exchange(
                since,
                0,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
            return FULL_WEIGHT;
        }
        let ramp = (u128::from(elapsed) * u128::from(FULL_WEIGHT) / u128::from(window)) as u64;
        ramp.max(SLOW_START_FLOOR)
    }

    /// Whether a turn offered to a ramping backend is taken, so that it takes `permille`
    /// thousandths of the turns it is offered, evenly spread (a Bresenham schedule).
    #[inline]
    pub fn admits(&self, permille: u64) -> bool {
        if permille >= FULL_WEIGHT {
            return true;
        }
        let n = self.offered.fetch_add(1, Ordering::Relaxed);
        (n + 1) * permille / FULL_WEIGHT > n * permille / FULL_WEIGHT
    }

    /// A serialisable view for `/status`.
    pub fn view(&self, slow_start: Option<Duration>) -> HealthView {
        let detail = self.detail();
        let now = Instant::now();
        let weight = self.weight_permille(slow_start);
        HealthView {
            state: self.label(),
            checked: self.is_checked(),
            last_check: detail.last_check.clone(),
            consecutive_failures: self.consecutive_failures(),
            ejections: detail.ejections,
            ejected_seconds_left: detail
                .ejected_until
                .filter(|_| self.is_ejected())
                .map(|until| until.saturating_duration_since(now).as_secs_f64()),
            slow_start_weight: (weight < FULL_WEIGHT).then(|| weight as f64 / 1000.0),
            since: detail
                .changed
                .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
                .map(|d| d.as_secs()),
        }
    }
}

/// A backend's health as `/status` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct HealthView {
    /// `healthy`, `down`, `ejected` or `down, ejected`.
    pub state: &'static str,
    /// Whether active checks run.
    pub checked: bool,
    /// The last active check, if any.
    pub last_check: Option<CheckOutcome>,
    /// Failed requests in a row.
    pub consecutive_failures: u32,
    /// Ejections since the process started.
    pub ejections: u64,
    /// Seconds until a timed ejection ends (none when active checks will end it).
    pub ejected_seconds_left: Option<f64>,
    /// The share of its weight a ramping backend takes (0.1 to 1), or none.
    pub slow_start_weight: Option<f64>,
    /// Unix time of the last health change.
    pub since: Option<u64>,
}

/// Pool-level bookkeeping of health changes, shared by the request path and the checkers.
#[derive(Debug, Default)]
pub struct Monitor {
    /// Pools that have no available backend right now (logged when they enter and leave).
    outages: Mutex<HashSet<String>>,
    /// Ejection decisions are taken one at a time, so two failing backends cannot both pass the
    /// `max_ejected_percent` check and overshoot it.
    ejecting: Mutex<()>,
}

/// Passive checks: counts the outcome of a request to `pool.members[index]` (`failed`: a
/// connection error, a timeout or a 5xx answer), ejecting the backend when it has failed
/// `consecutive_failures` times in a row and the pool can spare it.
pub(crate) fn observe(shared: &Arc<Shared>, pool: &Pool, index: usize, failed: bool) {
    let config = &pool.config.passive;
    if !config.enabled {
        return;
    }
    let state = &pool.members[index].state;
    if !failed {
        state.health.succeeded();
        return;
    }
    let failures = state.health.failed();
    if failures < config.consecutive_failures || state.health.is_ejected() {
        return;
    }
    // Read once: the ejection's record and its timer must agree even if checks start meanwhile.
    let timed = !state.health.is_checked();
    let ejected = {
        let _one_at_a_time = shared
            .health
            .ejecting
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let actives = &pool.members[..pool.active.min(pool.members.len())];
        let out = actives
            .iter()
            .filter(|m| !m.state.health.is_available())
            .count();
        let allowed = actives.len() * config.max_ejected_percent as usize / 100;
        if out >= allowed {
            if failures == config.consecutive_failures {
                tracing::warn!(
                    pool = pool.name(),
                    backend = %state.address(),
                    failures,
                    unavailable = out,
                    max_ejected_percent = config.max_ejected_percent,
                    "backend failing but not ejected: the pool's ejection cap is reached"
                );
            }
            return;
        }
        state.health.eject(config, timed)
    };
    let Some((generation, time)) = ejected else {
        return;
    };
    report(
        shared,
        state,
        &Change::Ejected {
            time: timed.then_some(time),
            failures,
        },
    );
    if timed {
        // Weak: a backend (or a whole server) dropped meanwhile is not kept alive by its timer.
        let state = Arc::downgrade(state);
        let shared = Arc::downgrade(shared);
        tokio::spawn(async move {
            tokio::time::sleep(time).await;
            if let Some(state) = state.upgrade() {
                readmit_after_timer(&shared, &state, generation);
            }
        });
    }
}

fn readmit_after_timer(shared: &Weak<Shared>, state: &Arc<BackendState>, generation: u64) {
    // With checks started meanwhile, they decide; the ejection stays until they pass.
    if state.health.is_checked() {
        return;
    }
    if state.health.readmit(Some(generation)) {
        if let Some(shared) = shared.upgrade() {
            report(&shared, state, &Change::Readmitted { by: "timer" });
        }
    }
}

/// Logs and counts a health change, then logs pools that lost their last available backend or got
/// one back.
pub(crate) fn report(shared: &Shared, state: &BackendState, change: &Change) {
    let backend = state.address();
    match change {
        Change::Down { reason } => {
            tracing::warn!(%backend, reason = %reason, "backend down: health checks failing")
        }
        Change::Up => tracing::info!(%backend, "backend up: health checks passing"),
        Change::Ejected {
            time: Some(time),
            failures,
        } => tracing::warn!(
            %backend,
            failures,
            ejected_for = %humantime::format_duration(*time),
            "backend ejected: requests failing"
        ),
        Change::Ejected {
            time: None,
            failures,
        } => tracing::warn!(
            %backend,
            failures,
            "backend ejected: requests failing; health checks will readmit it"
        ),
        Change::Readmitted { by } => tracing::info!(%backend, by, "backend readmitted"),
        Change::Unchecked => {
            tracing::info!(%backend, "health checks stopped; the backend takes work again")
        }
    }
    shared.metrics.health_change(backend, change.as_str());
    check_outages(shared, Some(backend));
}

/// Logs each pool (naming `backend`, or every pool) that now has no available backend, or has one
/// again. Run after each health change and each reload, which can end an outage or start one by
/// changing membership; pools that no longer exist are forgotten.
pub(crate) fn check_outages(shared: &Shared, backend: Option<SocketAddr>) {
    let snapshot = shared.snapshot.load();
    let mut outages = shared
        .health
        .outages
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if backend.is_none() {
        outages.retain(|name| snapshot.pool(name).is_some_and(|p| !p.removed));
    }
    for pool in snapshot.pools.iter().filter(|p| !p.removed) {
        let actives = &pool.members[..pool.active];
        if backend.is_some_and(|b| !actives.iter().any(|m| m.spec.address == b)) {
            continue;
        }
        let available = actives.iter().filter(|m| m.state.is_ready()).count();
        if available == 0 {
            if outages.insert(pool.name().to_owned()) {
                tracing::error!(
                    pool = pool.name(),
                    "no backend available: the pool answers 503 until one recovers"
                );
            }
        } else if outages.remove(pool.name()) {
            tracing::info!(
                pool = pool.name(),
                available,
                "pool has available backends again"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn passive(ejection: u64, max: u64) -> PassiveConfig {
        PassiveConfig {
            ejection_time: Duration::from_secs(ejection),
            max_ejection_time: Duration::from_secs(max),
            ..PassiveConfig::default()
        }
    }

    #[test]
    fn ejections_double_up_to_the_cap() {
        let health = HealthState::default();
        let config = passive(10, 35);
        let mut times = Vec::new();
        for _ in 0..4 {
            let (generation, time) = health.eject(&config, true).unwrap();
            assert!(health.eject(&config, true).is_none(), "ejected twice");
            assert!(!health.is_available());
            times.push(time.as_secs());
            assert!(health.readmit(Some(generation)));
        }
        assert_eq!(times, [10, 20, 35, 35]);
        assert!(health.is_available());
    }

    #[test]
    fn a_stale_timer_does_not_end_a_later_ejection() {
        let health = HealthState::default();
        let config = passive(10, 300);
        let (first, _) = health.eject(&config, true).unwrap();
        assert!(health.readmit(Some(first)));
        let (second, _) = health.eject(&config, true).unwrap();
        assert!(!health.readmit(Some(first)));
        assert!(health.is_ejected());
        assert!(health.readmit(Some(second)));
    }

    #[test]
    fn down_and_ejected_are_separate_flags() {
        let health = HealthState::default();
        assert!(health.mark_down());
        assert!(!health.mark_down());
        let (generation, _) = health.eject(&passive(1, 1), true).unwrap();
        assert_eq!(health.label(), "down, ejected");
        assert!(health.readmit(Some(generation)));
        assert_eq!(health.label(), "down");
        assert!(health.mark_up());
        assert!(health.is_available());
    }

    #[test]
    fn slow_start_admits_its_share_of_turns() {
        let health = HealthState::default();
        let taken = (0..1000).filter(|_| health.admits(250)).count();
        assert_eq!(taken, 250);
        assert!(health.admits(FULL_WEIGHT));
    }

    #[test]
    fn slow_start_ramps_from_the_floor_to_full() {
        let health = HealthState::default();
        let window = Some(Duration::from_millis(200));
        assert_eq!(health.weight_permille(window), FULL_WEIGHT, "not ramping");
        health.begin_slow_start();
        let early = health.weight_permille(window);
        assert!((SLOW_START_FLOOR..500).contains(&early), "{early}");
        assert_eq!(
            health.weight_permille(None),
            FULL_WEIGHT,
            "pool without slow_start"
        );
        std::thread::sleep(Duration::from_millis(120));
        let later = health.weight_permille(window);
        assert!(later > early && later < FULL_WEIGHT, "{early} → {later}");
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(health.weight_permille(window), FULL_WEIGHT);
    }
}
