//! One strategy's run: a discrete-event loop on a virtual clock, single-threaded. Requests start
//! and end, pool events reload the pool, and drains end when their backend is quiet or at the
//! pool's `drain_timeout` — each the way the proxy, a reload and a drain do it, but timed by the
//! virtual clock instead of tokio's.

use std::cmp::Ordering as CmpOrdering;
use std::collections::{BinaryHeap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::HeaderValue;
use tokio::sync::watch;

use super::workload::{SessionTimer, Workload};
use super::{BackendFigures, EventFigures, EventKind, Imbalance, PoolEvent, Series, StrategyRun};
use crate::backend::{BackendState, BackendStatus, Drain, InFlightGuard, Registry};
use crate::balance::{Affinity, Choice, RequestFacts};
use crate::config::{BackendSpec, Config, PoolConfig, StrategyKind};
use crate::drain;
use crate::metrics::Metrics;
use crate::state::{Pool, Snapshot};

/// Slices of the run the plot's series are averaged over.
const SLICES: u64 = 240;

/// Something due at a virtual time.
#[derive(Debug, Clone, Copy)]
enum Job {
    /// Pool event `i` (in time order).
    Event(usize),
    /// Client `i` sends its next request.
    Request(u32),
    /// The request held in slot `i` ends.
    End(usize),
    /// The drain of universe backend `i` reaches its deadline.
    Deadline(usize),
}

#[derive(Debug)]
struct Scheduled {
    at: u64,
    seq: u64,
    job: Job,
}

impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(other))
    }
}
impl Ord for Scheduled {
    // Reversed: BinaryHeap pops the greatest, and the earliest (then first scheduled) is due.
    fn cmp(&self, other: &Self) -> CmpOrdering {
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

/// Every backend that is ever in the pool, with its figures so far.
#[derive(Debug)]
struct Backend {
    spec: BackendSpec,
    requests: u64,
    in_flight: u64,
    sessions: u64,
    peak: u64,
    /// In-flight × µs and sessions × µs, up to `last_us`.
    in_flight_area: u64,
    session_area: u64,
    last_us: u64,
    /// `in_flight_area` at the start of the current plot slice.
    slice_area: u64,
    /// In the pool, taking new work, from the start to the end: the backends imbalance compares.
    stays: bool,
    series: Vec<f64>,
}

impl Backend {
    fn touch(&mut self, now: u64) {
        let dt = now.saturating_sub(self.last_us);
        self.in_flight_area += self.in_flight * dt;
        self.session_area += self.sessions * dt;
        self.last_us = self.last_us.max(now);
    }
}

/// A client's session as it goes.
#[derive(Debug)]
struct Client {
    ip: IpAddr,
    timer: SessionTimer,
    /// The backend (universe index) of its latest served request: where its session counts.
    backend: Option<usize>,
    /// The `name=value` pair of its affinity cookie, resent on every request.
    cookie: Option<HeaderValue>,
    /// The backend it was on when the current event happened, if it was in a session then.
    before: Option<usize>,
    seen_after: bool,
    moved: bool,
}

/// A request in flight.
#[derive(Debug)]
struct Held {
    _guard: InFlightGuard,
    backend: usize,
    client: u32,
    last: bool,
}

/// A drain under way on the virtual clock.
#[derive(Debug)]
struct Draining {
    state: Arc<BackendState>,
    drain: Drain,
    deadline_us: u64,
    // Kept so the drain's outcome channel stays open, as the drain task keeps it in the proxy.
    _done: watch::Sender<Option<crate::backend::DrainOutcome>>,
}

/// The current event's window: the clients it concerns are marked on [`Client`].
#[derive(Debug)]
struct Window {
    event: PoolEvent,
    leaving: Option<usize>,
    ideal_share: f64,
}

struct Sim<'a> {
    base: &'a Config,
    pool: PoolConfig,
    registry: Registry,
    metrics: Metrics,
    snapshot: Snapshot,
    /// Universe index of each member of the snapshot's pool.
    member_ids: Vec<usize>,
    universe: Vec<Backend>,
    index_of: HashMap<SocketAddr, usize>,
    drains: HashMap<usize, Draining>,
    queue: BinaryHeap<Scheduled>,
    seq: u64,
    now: u64,
    clients: Vec<Client>,
    held: Vec<Option<Held>>,
    free: Vec<usize>,
    cookies: Vec<HeaderValue>,
    // Figures.
    failed: u64,
    over_bound: u64,
    decisions: u64,
    choosing: Duration,
    /// Each decision's time, for the median: unlike the mean, it shrugs off the decisions the
    /// scheduler happened to interrupt on a busy machine.
    timings: Vec<u32>,
    window: Option<Window>,
    events: Vec<EventFigures>,
    slice_us: u64,
    next_slice: u64,
    duration_us: u64,
}

/// Runs `pool` (its strategy already chosen) through `workload` with `events`.
pub(super) fn run(
    base: &Config,
    pool: &PoolConfig,
    workload: &Workload,
    events: &[PoolEvent],
) -> StrategyRun {
    let mut sim = Sim::new(base, pool, workload, events);
    while let Some(Scheduled { at, job, .. }) = sim.queue.pop() {
        sim.advance(at);
        match job {
            Job::Event(i) => sim.apply(events[i]),
            Job::Request(c) => sim.request(c),
            Job::End(slot) => sim.end(slot),
            Job::Deadline(u) => sim.deadline(u),
        }
    }
    sim.finish()
}

impl<'a> Sim<'a> {
    fn new(base: &'a Config, pool: &PoolConfig, workload: &Workload, events: &[PoolEvent]) -> Self {
        let mut universe: Vec<Backend> = Vec::new();
        let mut index_of = HashMap::new();
        let mut enlist = |spec: BackendSpec| {
            index_of.entry(spec.address).or_insert_with(|| {
                let stays = !events.iter().any(|e| e.address == spec.address);
                universe.push(Backend {
                    spec,
                    requests: 0,
                    in_flight: 0,
                    sessions: 0,
                    peak: 0,
                    in_flight_area: 0,
                    session_area: 0,
                    last_us: 0,
                    slice_area: 0,
                    stays,
                    series: Vec::new(),
                });
                universe.len() - 1
            });
        };
        for spec in &pool.backends {
            enlist(spec.clone());
        }
        for event in events.iter().filter(|e| e.kind == EventKind::Add) {
            enlist(added_spec(pool, event.address));
        }
        let registry = Registry::new();
        let metrics = Metrics::new();
        let snapshot = Snapshot::build(
            Arc::new(one_pool(base, pool)),
            &registry,
            &metrics,
            None,
            &[],
        );
        let duration_us = workload.duration_us;
        let mut sim = Sim {
            base,
            pool: pool.clone(),
            registry,
            metrics,
            snapshot,
            member_ids: Vec::new(),
            universe,
            index_of,
            drains: HashMap::new(),
            queue: BinaryHeap::new(),
            seq: 0,
            now: 0,
            clients: Vec::with_capacity(workload.clients.len()),
            held: Vec::new(),
            free: Vec::new(),
            cookies: Vec::new(),
            failed: 0,
            over_bound: 0,
            decisions: 0,
            choosing: Duration::ZERO,
            timings: Vec::new(),
            window: None,
            events: Vec::new(),
            slice_us: (duration_us / SLICES).max(1),
            next_slice: (duration_us / SLICES).max(1),
            duration_us,
        };
        sim.map_members();
        // Events first: at equal times, the pool changes before the requests of that instant.
        for (i, event) in events.iter().enumerate() {
            sim.schedule(event.at.as_micros() as u64, Job::Event(i));
        }
        for i in 0..workload.clients.len() {
            let mut timer = workload.timer(i);
            let first = timer.next_request();
            sim.clients.push(Client {
                ip: workload.clients[i].ip,
                timer,
                backend: None,
                cookie: None,
                before: None,
                seen_after: false,
                moved: false,
            });
            if let Some(at) = first {
                sim.schedule(at, Job::Request(i as u32));
            }
        }
        sim
    }

    fn schedule(&mut self, at: u64, job: Job) {
        self.seq += 1;
        self.queue.push(Scheduled {
            at,
            seq: self.seq,
            job,
        });
    }

    fn current(&self) -> &Pool {
        &self.snapshot.pools[0]
    }

    fn map_members(&mut self) {
        self.member_ids = self.snapshot.pools[0]
            .members
            .iter()
            .map(|m| self.index_of[&m.spec.address])
            .collect();
    }

    /// Backends taking new work now, with their weights.
    fn actives(&self) -> Vec<(usize, u32)> {
        let pool = self.current();
        (0..pool.active)
            .filter(|&i| pool.members[i].state.is_ready())
            .map(|i| (self.member_ids[i], pool.members[i].spec.weight))
            .collect()
    }

    /// Moves the clock to `at`, closing the plot slices it passes.
    fn advance(&mut self, at: u64) {
        while self.next_slice <= at && self.next_slice <= self.duration_us {
            let t = self.next_slice;
            for b in &mut self.universe {
                b.touch(t);
                b.series
                    .push((b.in_flight_area - b.slice_area) as f64 / self.slice_us as f64);
                b.slice_area = b.in_flight_area;
            }
            self.next_slice += self.slice_us;
        }
        self.now = at;
    }

    fn count(&mut self, backend: usize, in_flight: i64, sessions: i64) {
        let now = self.now;
        let b = &mut self.universe[backend];
        b.touch(now);
        b.in_flight = b.in_flight.saturating_add_signed(in_flight);
        b.sessions = b.sessions.saturating_add_signed(sessions);
        b.peak = b.peak.max(b.in_flight);
    }

    /// What the proxy does to pick a backend ([`Pool::choose`], first try): the pool's bound and
    /// slow start, every member a candidate.
    fn choose(&self, client: u32) -> (Option<Choice>, Option<u64>) {
        let pool = self.current();
        // Read before choosing, as the proxy's choice reads it: the bound this decision met.
        let bound = pool.load_bound();
        let facts = RequestFacts {
            client_ip: self.clients[client as usize].ip,
            cookies: &self.cookies,
        };
        (pool.choose(&facts, &[]), bound)
    }

    fn request(&mut self, c: u32) {
        self.cookies.clear();
        if let Some(cookie) = self.clients[c as usize].cookie.clone() {
            self.cookies.push(cookie);
        }
        // Only the decision is timed: the clock is read around it, as close as it gets.
        let started = Instant::now();
        let (choice, bound) = self.choose(c);
        let took = started.elapsed();
        self.choosing += took;
        self.timings
            .push(u32::try_from(took.as_nanos()).unwrap_or(u32::MAX));
        self.decisions += 1;

        let timer = &mut self.clients[c as usize].timer;
        let next = timer.next_request();
        // Drawn whether or not a backend takes it, so every strategy sees the same draws.
        let service = timer.service_us();
        if let Some(at) = next {
            self.schedule(at, Job::Request(c));
        }
        let last = next.is_none();
        let Some(choice) = choice else {
            // No backend could take it: a 503 in the proxy. The session goes on.
            self.failed += 1;
            if last {
                self.end_session(c);
            }
            return;
        };
        let pool = &self.snapshot.pools[0];
        let member = &pool.members[choice.index];
        let mut guard = member.state.start_request();
        if let Some(load) = &pool.load {
            guard.count_in(load);
        }
        if bound.is_some_and(|b| member.state.load() > b) && choice.affinity != Affinity::Hit {
            self.over_bound += 1;
        }
        let backend = self.member_ids[choice.index];
        let client = &mut self.clients[c as usize];
        if let Some(set) = &choice.set_cookie {
            client.cookie = cookie_pair(set);
        }
        if client.before.is_some() {
            client.seen_after = true;
            client.moved |= client.before != Some(backend);
        }
        let previous = client.backend.replace(backend);
        match previous {
            None => self.count(backend, 0, 1),
            Some(p) if p != backend => {
                self.count(p, 0, -1);
                self.count(backend, 0, 1);
            }
            Some(_) => {}
        }
        self.count(backend, 1, 0);
        self.universe[backend].requests += 1;

        let slot = self.free.pop().unwrap_or_else(|| {
            self.held.push(None);
            self.held.len() - 1
        });
        self.held[slot] = Some(Held {
            _guard: guard,
            backend,
            client: c,
            last,
        });
        self.schedule(self.now + service, Job::End(slot));
    }

    fn end(&mut self, slot: usize) {
        let held = self.held[slot].take().expect("a request ends once");
        self.free.push(slot);
        let (backend, client, last) = (held.backend, held.client, held.last);
        // Releasing the guard is what the drain notices, as in the proxy.
        drop(held);
        self.count(backend, -1, 0);
        if last {
            self.end_session(client);
        }
        let quiet = self
            .drains
            .get(&backend)
            .is_some_and(|d| d.state.is_quiet());
        if quiet {
            self.end_drain(backend, false);
        }
    }

    fn end_session(&mut self, c: u32) {
        if let Some(backend) = self.clients[c as usize].backend {
            self.count(backend, 0, -1);
        }
    }

    /// Applies a pool event the way a reload (remove, add) or the admin API (drain) does.
    fn apply(&mut self, event: PoolEvent) {
        self.close_window();
        let leaving = matches!(event.kind, EventKind::Remove | EventKind::Drain)
            .then(|| self.index_of[&event.address]);
        let weight_of = |pool: &PoolConfig, address: SocketAddr| {
            pool.backends
                .iter()
                .find(|b| b.address == address)
                .map_or(0, |b| b.weight)
        };
        let listed_weight = |pool: &PoolConfig| pool.backends.iter().map(|b| b.weight).sum::<u32>();
        let ideal_share;
        match event.kind {
            EventKind::Remove => {
                let before = self.actives();
                let total: u32 = before.iter().map(|(_, w)| w).sum();
                ideal_share = f64::from(weight_of(&self.pool, event.address)) / f64::from(total);
                let mut pool = self.pool.clone();
                pool.backends.retain(|b| b.address != event.address);
                self.reload(pool);
            }
            EventKind::Add => {
                let mut pool = self.pool.clone();
                let spec = self.universe[self.index_of[&event.address]].spec.clone();
                let weight = spec.weight;
                pool.backends.push(spec);
                ideal_share = f64::from(weight) / f64::from(listed_weight(&pool));
                self.reload(pool);
            }
            EventKind::Drain => {
                let before = self.actives();
                let total: u32 = before.iter().map(|(_, w)| w).sum();
                ideal_share = f64::from(weight_of(&self.pool, event.address)) / f64::from(total);
                let u = self.index_of[&event.address];
                if let Some(state) = self.registry.get(event.address) {
                    self.start_drain(u, &state, false);
                }
            }
        }
        for client in &mut self.clients {
            let in_session = client.backend.is_some() && !client.timer.is_over();
            client.before = client.backend.filter(|_| in_session);
            client.seen_after = false;
            client.moved = false;
        }
        self.window = Some(Window {
            event,
            leaving,
            ideal_share,
        });
    }

    /// A reload to `pool`: backends that left start draining, ones that came back are active
    /// again, and the snapshot is rebuilt with the previous one's draining members after the
    /// active ones (`Server::reload`).
    fn reload(&mut self, pool: PoolConfig) {
        let gone: Vec<SocketAddr> = self
            .pool
            .backends
            .iter()
            .map(|b| b.address)
            .filter(|a| !pool.backends.iter().any(|b| b.address == *a))
            .collect();
        for address in gone {
            if let Some(state) = self.registry.get(address) {
                let u = self.index_of[&address];
                self.start_drain(u, &state, true);
            }
        }
        for spec in &pool.backends {
            if let Some(state) = self.registry.get(spec.address) {
                drain::return_to_config(&state);
            }
        }
        // A drain called off by the return is over for the clock too.
        self.drains
            .retain(|_, d| d.state.is_draining_with(&d.drain.done));
        self.pool = pool;
        self.rebuild();
    }

    fn rebuild(&mut self) {
        let config = Arc::new(one_pool(self.base, &self.pool));
        let snapshot = Snapshot::build(
            config,
            &self.registry,
            &self.metrics,
            Some(&self.snapshot),
            &[],
        );
        self.snapshot = snapshot;
        self.map_members();
    }

    /// `drain::start` without its tokio task: the virtual clock watches for quiet and the
    /// deadline instead.
    fn start_drain(&mut self, u: usize, state: &Arc<BackendState>, removed: bool) {
        let (done_tx, done_rx) = watch::channel(None);
        let started = state.begin_drain(removed, || {
            let now = Instant::now();
            Drain {
                started: now,
                deadline: now + self.pool.drain_timeout,
                removed,
                runtime: !removed,
                completed_at_start: state.completed(),
                cut_at_start: state.upgraded_cut(),
                upgrades_at_start: state.upgrades(),
                upgraded_at_start: state.upgraded(),
                done: done_rx,
            }
        });
        // Joined (already draining) or refused (Drained): nothing new to watch.
        let Ok((drain, true)) = started else {
            return;
        };
        let deadline_us = self.now + self.pool.drain_timeout.as_micros() as u64;
        self.drains.insert(
            u,
            Draining {
                state: Arc::clone(state),
                drain,
                deadline_us,
                _done: done_tx,
            },
        );
        self.schedule(deadline_us, Job::Deadline(u));
        if state.is_quiet() {
            self.end_drain(u, false);
        }
    }

    fn deadline(&mut self, u: usize) {
        // Not the deadline of an earlier drain of the same backend, called off since.
        if self
            .drains
            .get(&u)
            .is_some_and(|d| d.deadline_us == self.now)
        {
            self.end_drain(u, true);
        }
    }

    /// Ends the drain of `u` as `drain::run` does: cut upgraded connections at the deadline, then
    /// Retired (released, dropped from the snapshot) or Drained.
    fn end_drain(&mut self, u: usize, at_deadline: bool) {
        let Some(draining) = self.drains.remove(&u) else {
            return;
        };
        if at_deadline {
            draining.state.cut_upgraded();
        }
        if draining.state.end_drain(&draining.drain.done) == Some(BackendStatus::Retired) {
            self.registry
                .remove_if_same(draining.state.address(), &draining.state);
            self.rebuild();
        }
    }

    fn close_window(&mut self) {
        let Some(window) = self.window.take() else {
            return;
        };
        let mut figures = EventFigures {
            event: window.event.to_string(),
            at_s: window.event.at.as_secs_f64(),
            clients: 0,
            on_leaving: 0,
            moved: 0,
            moved_share: 0.0,
            ideal_share: window.ideal_share,
            broken: 0,
            on_purpose: 0,
        };
        for client in &self.clients {
            let Some(before) = client.before.filter(|_| client.seen_after) else {
                continue;
            };
            let left = window.leaving == Some(before);
            figures.clients += 1;
            figures.on_leaving += u64::from(left);
            if client.moved {
                figures.moved += 1;
                if left {
                    figures.broken += 1;
                } else {
                    figures.on_purpose += 1;
                }
            }
        }
        if figures.clients > 0 {
            figures.moved_share = figures.moved as f64 / figures.clients as f64;
        }
        self.events.push(figures);
    }

    fn finish(mut self) -> StrategyRun {
        self.advance(self.duration_us.max(self.now));
        self.close_window();
        let now = self.now;
        for b in &mut self.universe {
            b.touch(now);
        }
        let (requests, in_flight, sessions) = self.universe.iter().fold((0, 0, 0), |t, b| {
            (
                t.0 + b.requests,
                t.1 + b.in_flight_area,
                t.2 + b.session_area,
            )
        });
        let share = |x: u64, total: u64| {
            if total == 0 {
                0.0
            } else {
                x as f64 / total as f64
            }
        };
        // Per unit of weight, the busiest backend over the mean, among those that stayed.
        let worst = |load: &dyn Fn(&Backend) -> u64| {
            let stayed: Vec<f64> = self
                .universe
                .iter()
                .filter(|b| b.stays)
                .map(|b| load(b) as f64 / f64::from(b.spec.weight))
                .collect();
            let mean = stayed.iter().sum::<f64>() / stayed.len() as f64;
            (mean > 0.0).then(|| stayed.iter().copied().fold(0.0, f64::max) / mean)
        };
        let imbalance = Imbalance {
            requests: worst(&|b| b.requests),
            sessions: worst(&|b| b.session_area),
            in_flight: worst(&|b| b.in_flight_area),
        };
        let horizon = now.max(1) as f64;
        let backends = self
            .universe
            .iter()
            .map(|b| BackendFigures {
                address: b.spec.address,
                weight: b.spec.weight,
                requests: b.requests,
                request_share: share(b.requests, requests),
                session_share: share(b.session_area, sessions),
                in_flight_share: share(b.in_flight_area, in_flight),
                mean_in_flight: b.in_flight_area as f64 / horizon,
                peak_in_flight: b.peak,
            })
            .collect();
        let seconds = self.choosing.as_secs_f64();
        let middle = self.timings.len() / 2;
        let median_decision_ns = if self.timings.is_empty() {
            0
        } else {
            *self.timings.select_nth_unstable(middle).1
        };
        let pool = &self.pool;
        StrategyRun {
            strategy: pool.strategy.as_str(),
            fallback: (pool.strategy == StrategyKind::Cookie)
                .then(|| pool.cookie.as_ref().map(|c| c.fallback.as_str()))
                .flatten(),
            balance_factor: pool.balance_factor,
            decisions: self.decisions,
            decisions_per_second: if seconds > 0.0 {
                self.decisions as f64 / seconds
            } else {
                0.0
            },
            median_decision_ns,
            failed: self.failed,
            backends,
            imbalance,
            over_bound: pool.balance_factor.map(|_| self.over_bound),
            events: self.events,
            series: Series {
                step_s: self.slice_us as f64 / 1e6,
                in_flight: self.universe.into_iter().map(|b| b.series).collect(),
            },
        }
    }
}

/// The config with only `pool` in it and no routes: a snapshot of just the simulated pool.
fn one_pool(base: &Config, pool: &PoolConfig) -> Config {
    let mut config = base.clone();
    config.routes.clear();
    config.pools = [(pool.name.clone(), pool.clone())].into_iter().collect();
    config
}

/// What an added backend looks like: its config entry if it had one, else weight 1 and the
/// `max_connections` of the pool's first backend (the pool-wide setting, when there is one).
fn added_spec(pool: &PoolConfig, address: SocketAddr) -> BackendSpec {
    pool.backends
        .iter()
        .find(|b| b.address == address)
        .cloned()
        .unwrap_or_else(|| BackendSpec {
            address,
            weight: 1,
            max_connections: pool.backends.first().and_then(|b| b.max_connections),
            tls: None,
        })
}

/// The `name=value` pair a browser sends back for a `Set-Cookie` value.
fn cookie_pair(set_cookie: &HeaderValue) -> Option<HeaderValue> {
    let text = set_cookie.to_str().ok()?;
    let pair = text.split(';').next()?.trim();
    HeaderValue::from_str(pair).ok()
}
