//! `switchyard simulate`: the real strategies of one pool, driven by a synthetic workload on a
//! virtual clock, with pool changes (remove, add, drain) applied the way a reload applies them.
//! It owns the workload ([`workload`]), the discrete-event run ([`engine`]), the figures
//! ([`Report`]) and the plot ([`plot`]).
//!
//! Nothing here copies a strategy: each run builds a [`crate::state::Snapshot`] from the pool's
//! config (with `strategy` replaced), chooses through [`crate::balance::Strategy::choose`] with
//! the same [`crate::balance::Candidates`] the proxy builds, and counts work with the backends'
//! real in-flight guards, so `least_connections` and `balance_factor` read live load.

mod engine;
pub mod plot;
pub mod workload;

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use serde::Serialize;

use crate::config::{Config, CookieConfig, PoolConfig, Secret, StrategyKind};

pub use workload::Shape;

/// The secret that signs affinity cookies when the simulated pool has no `cookie` table.
const SIMULATION_SECRET: &[u8] = b"switchyard-simulate-secret";

/// Strategies simulated when none is named, in this order.
const ALL: [StrategyKind; 4] = [
    StrategyKind::RoundRobin,
    StrategyKind::LeastConnections,
    StrategyKind::IpHash,
    StrategyKind::Cookie,
];

/// What to simulate. [`SimulateArgs::new`] gives the defaults of the command line.
#[derive(Debug, Clone)]
pub struct SimulateArgs {
    /// The pool to simulate; `None`: the first pool by name.
    pub pool: Option<String>,
    /// Strategies to run, in order; empty: all four.
    pub strategies: Vec<StrategyPick>,
    /// Clients, each with its own IP (10.0.0.0 + index) and one session (default 10,000).
    pub clients: u32,
    /// Requests over the whole run, split between the clients, at least one each (default 300,000).
    pub requests: u64,
    /// Virtual length of the run: clients arrive in its first three quarters, and every session
    /// ends inside it (default 60 s).
    pub duration: Duration,
    /// Seed of every random draw (default 1).
    pub seed: u64,
    /// Pool changes, applied in time order (ties in the order given).
    pub events: Vec<PoolEvent>,
    /// How session lengths and service times are drawn (default [`Shape::HeavyTailed`]).
    pub shape: Shape,
}

impl SimulateArgs {
    /// The command line's defaults: every strategy, 10,000 clients, 300,000 requests over 60 s,
    /// seed 1, heavy-tailed sessions, no events.
    pub fn new() -> Self {
        SimulateArgs {
            pool: None,
            strategies: Vec::new(),
            clients: 10_000,
            requests: 300_000,
            duration: Duration::from_secs(60),
            seed: 1,
            events: Vec::new(),
            shape: Shape::HeavyTailed,
        }
    }
}

impl Default for SimulateArgs {
    fn default() -> Self {
        Self::new()
    }
}

/// A strategy to simulate: one by name, or the one the pool's config names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StrategyPick {
    /// `pool`: the pool's own strategy.
    Pool,
    /// A strategy by its `proxy.toml` name.
    Kind(StrategyKind),
}

impl FromStr for StrategyPick {
    type Err = ParseStrategyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "pool" {
            return Ok(StrategyPick::Pool);
        }
        StrategyKind::parse(s)
            .map(StrategyPick::Kind)
            .ok_or_else(|| ParseStrategyError(s.to_owned()))
    }
}

/// A `--strategy` value that names no strategy.
#[derive(Debug, thiserror::Error)]
#[error("unknown strategy `{0}`: expected round_robin, least_connections, ip_hash, cookie or pool")]
pub struct ParseStrategyError(String);

/// What happens to a backend at an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// Leaves the config: a reload drains it (sticky clients may stay, per `drain_sticky`, until
    /// the drain ends), then it is gone.
    Remove,
    /// Joins the config (with its weight in the config if it was there, else 1).
    Add,
    /// Drained at runtime (the admin API): stays in the config, takes no new clients.
    Drain,
}

impl EventKind {
    /// The name used in `--event`.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Remove => "remove",
            EventKind::Add => "add",
            EventKind::Drain => "drain",
        }
    }
}

/// A pool change at a virtual time: `KIND:IP:PORT@T`, T in seconds (`30`, `2.5`) or a humantime
/// duration (`30s`, `1m30s`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolEvent {
    /// What happens.
    pub kind: EventKind,
    /// To which backend.
    pub address: SocketAddr,
    /// When, from the start of the run.
    pub at: Duration,
}

impl PoolEvent {
    /// The event as `--event` takes it: `remove:10.0.0.1:80@30s`.
    pub fn spec(&self) -> String {
        format!(
            "{}:{}@{}s",
            self.kind.as_str(),
            self.address,
            self.at.as_secs_f64()
        )
    }
}

impl fmt::Display for PoolEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.kind.as_str(), self.address)
    }
}

impl FromStr for PoolEvent {
    type Err = ParseEventError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (change, at) = s.rsplit_once('@').ok_or(ParseEventError::NoTime)?;
        let (kind, address) = change.split_once(':').ok_or(ParseEventError::NoKind)?;
        let kind = match kind {
            "remove" => EventKind::Remove,
            "add" => EventKind::Add,
            "drain" => EventKind::Drain,
            other => return Err(ParseEventError::Kind(other.to_owned())),
        };
        let address = address
            .parse()
            .map_err(|_| ParseEventError::Address(address.to_owned()))?;
        let at = match at.parse::<f64>() {
            Ok(seconds) => Duration::try_from_secs_f64(seconds)
                .map_err(|_| ParseEventError::Time(at.to_owned()))?,
            Err(_) => {
                humantime::parse_duration(at).map_err(|_| ParseEventError::Time(at.to_owned()))?
            }
        };
        Ok(PoolEvent { kind, address, at })
    }
}

/// An `--event` value that does not read as `KIND:IP:PORT@T`.
#[derive(Debug, thiserror::Error)]
pub enum ParseEventError {
    /// No `@T`.
    #[error("expected KIND:IP:PORT@T, e.g. remove:127.0.0.1:9002@30s (no `@T`)")]
    NoTime,
    /// No `KIND:`.
    #[error("expected KIND:IP:PORT@T, e.g. remove:127.0.0.1:9002@30s (no `KIND:`)")]
    NoKind,
    /// A kind other than remove, add or drain.
    #[error("unknown event `{0}`: expected remove, add or drain")]
    Kind(String),
    /// Not an `IP:port`.
    #[error("`{0}` is not an IP:port address")]
    Address(String),
    /// Neither seconds nor a humantime duration.
    #[error("`{0}` is not a time: seconds (30, 2.5) or a duration (30s, 1m30s)")]
    Time(String),
}

/// Why a simulation could not run or its plot could not be written.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `--pool` names no pool of the config.
    #[error("no pool named `{name}` in the config (pools: {known})")]
    UnknownPool {
        /// The name asked for.
        name: String,
        /// The config's pool names, comma-separated.
        known: String,
    },
    /// The config has no pools.
    #[error("the config has no pools to simulate")]
    NoPools,
    /// The pool's backends come from discovery, which a simulation does not contact.
    #[error(
        "pool `{pool}` finds its backends by discovery; simulate a pool with a `backends` list"
    )]
    Discovered {
        /// The pool.
        pool: String,
    },
    /// Fewer requests than clients: every client makes at least one.
    #[error("--requests ({requests}) must be at least --clients ({clients}): every client makes at least one request")]
    TooFewRequests {
        /// `--requests`.
        requests: u64,
        /// `--clients`.
        clients: u32,
    },
    /// A zero-length run.
    #[error("--duration must be more than zero")]
    ZeroDuration,
    /// An event at or after the end of the run.
    #[error("{}: after the end of the run ({}s); pass a longer --duration", .event.spec(), .duration.as_secs_f64())]
    EventAfterEnd {
        /// The event.
        event: PoolEvent,
        /// The run's length.
        duration: Duration,
    },
    /// `remove` or `drain` of an address not in the pool at that time, or `add` of one already in.
    #[error("{}: {} {why} pool `{pool}` at that time", .event.spec(), .event.address)]
    NotApplicable {
        /// The event.
        event: PoolEvent,
        /// `is not in` or `is already in`.
        why: &'static str,
        /// The pool.
        pool: String,
    },
    /// A drain of an address that is already drained.
    #[error("{}: {} is already drained", .event.spec(), .event.address)]
    AlreadyDrained {
        /// The event.
        event: PoolEvent,
    },
    /// Drawing the plot failed.
    #[error("cannot draw the plot")]
    Plot(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// Writing the plot failed.
    #[error("cannot write {path}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Every figure of a simulation: what `simulate` prints as tables, and as JSON with `--json`.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The config file simulated.
    pub config: PathBuf,
    /// The pool simulated.
    pub pool: String,
    /// The workload.
    pub workload: WorkloadSummary,
    /// The pool changes, in the order applied.
    pub events: Vec<EventSummary>,
    /// One run per strategy.
    pub runs: Vec<StrategyRun>,
}

/// The workload of a report.
#[derive(Debug, Clone, Serialize)]
pub struct WorkloadSummary {
    /// `heavy_tailed` or `uniform`.
    pub shape: Shape,
    /// Clients.
    pub clients: u32,
    /// Requests, all runs alike.
    pub requests: u64,
    /// Virtual length of the run, in seconds.
    pub duration_s: f64,
    /// The seed.
    pub seed: u64,
}

/// A pool change as applied.
#[derive(Debug, Clone, Serialize)]
pub struct EventSummary {
    /// `remove`, `add` or `drain`.
    pub kind: EventKind,
    /// The backend.
    pub address: SocketAddr,
    /// Virtual time, in seconds.
    pub at_s: f64,
}

/// One strategy's figures.
#[derive(Debug, Clone, Serialize)]
pub struct StrategyRun {
    /// The strategy's `proxy.toml` name.
    pub strategy: &'static str,
    /// For `cookie`: the strategy that places new clients.
    pub fallback: Option<&'static str>,
    /// The pool's `balance_factor`, when it applies to this strategy.
    pub balance_factor: Option<f64>,
    /// Decisions made (one per request).
    pub decisions: u64,
    /// Decisions per second of wall-clock time spent choosing (clock reads included).
    pub decisions_per_second: f64,
    /// The median decision's time, in nanoseconds (clock reads included).
    pub median_decision_ns: u32,
    /// Requests no backend could take (a 503 in the proxy).
    pub failed: u64,
    /// Every backend that was in the pool at some time, in config order, then added ones.
    pub backends: Vec<BackendFigures>,
    /// How much busier than the mean the busiest backend was (1.00 = even).
    pub imbalance: Imbalance,
    /// With `balance_factor`: placements that left the chosen backend above the bound (0 unless
    /// every backend was over it). Clients kept by their cookie are not placements.
    pub over_bound: Option<u64>,
    /// What each event did to the clients that were in a session across it.
    pub events: Vec<EventFigures>,
    /// Mean in-flight requests per backend over consecutive slices of the run, for the plot.
    pub series: Series,
}

/// One backend's figures in a run.
#[derive(Debug, Clone, Serialize)]
pub struct BackendFigures {
    /// Address.
    pub address: SocketAddr,
    /// Weight.
    pub weight: u32,
    /// Requests it took.
    pub requests: u64,
    /// Its share of all requests.
    pub request_share: f64,
    /// Its share of concurrent sessions, averaged over time (a session counts at the backend of its
    /// latest request, from its first request until its last one ends).
    pub session_share: f64,
    /// Its share of in-flight requests, averaged over time.
    pub in_flight_share: f64,
    /// Mean in-flight requests over the run.
    pub mean_in_flight: f64,
    /// Most in-flight requests at once.
    pub peak_in_flight: u64,
}

/// max / mean of each measure per unit of weight, over the backends in the pool for the whole run
/// (no event names them), so that a removal or an addition does not count as imbalance. `None`
/// when no backend stayed or nothing was measured.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Imbalance {
    /// Of requests.
    pub requests: Option<f64>,
    /// Of concurrent sessions, averaged over time.
    pub sessions: Option<f64>,
    /// Of in-flight requests, averaged over time.
    pub in_flight: Option<f64>,
}

/// What one event did, to the clients in a session across it: those with a request before the
/// event and one after it, before the next event.
#[derive(Debug, Clone, Serialize)]
pub struct EventFigures {
    /// `remove 10.0.0.1:80`.
    pub event: String,
    /// Virtual time, in seconds.
    pub at_s: f64,
    /// Clients in a session across the event.
    pub clients: u64,
    /// Of those, the ones on the backend that left (0 for `add`).
    pub on_leaving: u64,
    /// Of those, the ones served by another backend after the event than just before it.
    pub moved: u64,
    /// `moved / clients`.
    pub moved_share: f64,
    /// The least that must move: the leaving backend's weight share before the event, or the
    /// added one's after it (1/N for equal weights).
    pub ideal_share: f64,
    /// Moved because their backend left: for sticky clients, sessions broken.
    pub broken: u64,
    /// Moved although their backend stayed: rebalancing by the strategy.
    pub on_purpose: u64,
}

/// Mean in-flight requests per backend over equal slices of the run.
#[derive(Debug, Clone, Serialize)]
pub struct Series {
    /// Length of a slice, in seconds.
    pub step_s: f64,
    /// Per backend (same order as `backends`), one mean per slice.
    pub in_flight: Vec<Vec<f64>>,
}

/// Runs the simulation of `args` on `config`: one run per strategy, each on the same workload.
pub fn run(config: &Config, args: &SimulateArgs) -> Result<Report, Error> {
    let pool = pick_pool(config, args.pool.as_deref())?;
    if pool.discovery.is_some() {
        return Err(Error::Discovered {
            pool: pool.name.clone(),
        });
    }
    if args.duration.is_zero() {
        return Err(Error::ZeroDuration);
    }
    if args.requests < u64::from(args.clients) {
        return Err(Error::TooFewRequests {
            requests: args.requests,
            clients: args.clients,
        });
    }
    let events = ordered_events(pool, &args.events, args.duration)?;
    // least_connections draws from fastrand's thread-local generator on pools over 32 backends.
    fastrand::seed(args.seed);
    let workload = workload::Workload::generate(
        args.shape,
        args.clients,
        args.requests,
        args.duration,
        args.seed,
    );
    let kinds: Vec<StrategyKind> = if args.strategies.is_empty() {
        ALL.to_vec()
    } else {
        args.strategies
            .iter()
            .map(|pick| match pick {
                StrategyPick::Pool => pool.strategy,
                StrategyPick::Kind(kind) => *kind,
            })
            .collect()
    };
    let runs = kinds
        .into_iter()
        .map(|kind| {
            fastrand::seed(args.seed);
            engine::run(config, &pool_for(pool, kind), &workload, &events)
        })
        .collect();
    Ok(Report {
        config: config.path.clone(),
        pool: pool.name.clone(),
        workload: WorkloadSummary {
            shape: args.shape,
            clients: args.clients,
            requests: workload.requests(),
            duration_s: args.duration.as_secs_f64(),
            seed: args.seed,
        },
        events: events
            .iter()
            .map(|e| EventSummary {
                kind: e.kind,
                address: e.address,
                at_s: e.at.as_secs_f64(),
            })
            .collect(),
        runs,
    })
}

fn pick_pool<'a>(config: &'a Config, name: Option<&str>) -> Result<&'a PoolConfig, Error> {
    match name {
        Some(name) => config.pools.get(name).ok_or_else(|| Error::UnknownPool {
            name: name.to_owned(),
            known: config
                .pools
                .keys()
                .map(String::as_str)
                .collect::<Vec<_>>()
                .join(", "),
        }),
        None => config.pools.values().next().ok_or(Error::NoPools),
    }
}

/// The events in time order (stable for ties), each checked against the pool as it is then.
fn ordered_events(
    pool: &PoolConfig,
    events: &[PoolEvent],
    duration: Duration,
) -> Result<Vec<PoolEvent>, Error> {
    let mut events = events.to_vec();
    events.sort_by_key(|e| e.at);
    let mut listed: Vec<SocketAddr> = pool.backends.iter().map(|b| b.address).collect();
    let mut drained: Vec<SocketAddr> = Vec::new();
    for event in &events {
        if event.at >= duration {
            return Err(Error::EventAfterEnd {
                event: *event,
                duration,
            });
        }
        let is_listed = listed.contains(&event.address);
        let refuse = |why| Error::NotApplicable {
            event: *event,
            why,
            pool: pool.name.clone(),
        };
        match event.kind {
            EventKind::Remove if !is_listed => return Err(refuse("is not in")),
            EventKind::Drain if !is_listed => return Err(refuse("is not in")),
            EventKind::Add if is_listed => return Err(refuse("is already in")),
            EventKind::Remove => listed.retain(|a| *a != event.address),
            EventKind::Add => listed.push(event.address),
            EventKind::Drain => {
                if drained.contains(&event.address) {
                    return Err(Error::AlreadyDrained { event: *event });
                }
                drained.push(event.address);
            }
        }
    }
    Ok(events)
}

/// The pool's config as a valid config would have it with `strategy = kind`.
fn pool_for(pool: &PoolConfig, kind: StrategyKind) -> PoolConfig {
    let mut pool = pool.clone();
    pool.strategy = kind;
    // The ramp runs on the wall clock, which a virtual-time run cannot advance; and validation
    // refuses it where clients are placed by ip_hash anyway.
    pool.slow_start = None;
    // Health checks are not simulated: every backend stays healthy.
    pool.health = None;
    if !matches!(kind, StrategyKind::IpHash | StrategyKind::Cookie) {
        pool.balance_factor = None;
    }
    if kind == StrategyKind::Cookie {
        let cookie = pool.cookie.get_or_insert_with(|| CookieConfig {
            name: "switchyard".into(),
            secrets: Vec::new(),
            generated: false,
            fallback: StrategyKind::RoundRobin,
            max_age: None,
            secure: false,
        });
        if cookie.secrets.is_empty() {
            cookie.secrets.push(Secret::new(SIMULATION_SECRET));
        }
    }
    pool
}

impl fmt::Display for Report {
    /// The plain-text tables `simulate` prints.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let w = &self.workload;
        writeln!(
            f,
            "pool `{}` of {}: {} clients, {} requests, {} sessions, {}s virtual, seed {}",
            self.pool,
            self.config.display(),
            w.clients,
            w.requests,
            w.shape.as_str(),
            w.duration_s,
            w.seed
        )?;
        for run in &self.runs {
            writeln!(f)?;
            write!(f, "{}", run.strategy)?;
            if let Some(fallback) = run.fallback {
                write!(f, " (new clients: {fallback})")?;
            }
            if let Some(factor) = run.balance_factor {
                write!(f, ", balance_factor {factor}")?;
            }
            writeln!(f)?;
            let width = run
                .backends
                .iter()
                .map(|b| b.address.to_string().len())
                .max()
                .unwrap_or(7)
                .max(7);
            writeln!(
                f,
                "  {:<width$}  {:>6}  {:>8}  {:>8}  {:>9}  {:>4}",
                "backend", "weight", "requests", "sessions", "in flight", "peak"
            )?;
            for b in &run.backends {
                writeln!(
                    f,
                    "  {:<width$}  {:>6}  {:>7.1}%  {:>7.1}%  {:>8.1}%  {:>4}",
                    b.address.to_string(),
                    b.weight,
                    100.0 * b.request_share,
                    100.0 * b.session_share,
                    100.0 * b.in_flight_share,
                    b.peak_in_flight
                )?;
            }
            let ratio = |x: Option<f64>| x.map_or("-".to_owned(), |x| format!("{x:.2}"));
            writeln!(
                f,
                "  {:<width$}  {:>6}  {:>8}  {:>8}  {:>9}",
                "imbalance",
                "",
                ratio(run.imbalance.requests),
                ratio(run.imbalance.sessions),
                ratio(run.imbalance.in_flight)
            )?;
            if let Some(over) = run.over_bound {
                writeln!(f, "  placements over the balance_factor bound: {over}")?;
            }
            if !run.events.is_empty() {
                let ewidth = run.events.iter().map(|e| e.event.len()).max().unwrap_or(5);
                writeln!(
                    f,
                    "  {:<ewidth$}  {:>7}  {:>7}  {:>6}  {:>6}  {:>6}  {:>10}",
                    "event", "at", "clients", "moved", "ideal", "broken", "on purpose"
                )?;
                for e in &run.events {
                    writeln!(
                        f,
                        "  {:<ewidth$}  {:>6}s  {:>7}  {:>5.1}%  {:>5.1}%  {:>6}  {:>10}",
                        e.event,
                        e.at_s,
                        e.clients,
                        100.0 * e.moved_share,
                        100.0 * e.ideal_share,
                        e.broken,
                        e.on_purpose
                    )?;
                }
            }
            writeln!(
                f,
                "  decisions/s: {:.1} M ({} decisions; median {} ns each, clock reads included)",
                run.decisions_per_second / 1e6,
                run.decisions,
                run.median_decision_ns
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_read_kind_address_and_time() {
        let e: PoolEvent = "remove:127.0.0.1:9002@30s".parse().unwrap();
        assert_eq!(
            (e.kind, e.address.to_string(), e.at),
            (
                EventKind::Remove,
                "127.0.0.1:9002".into(),
                Duration::from_secs(30)
            )
        );
        let e: PoolEvent = "add:[::1]:80@2.5".parse().unwrap();
        assert_eq!(
            (e.kind, e.at),
            (EventKind::Add, Duration::from_millis(2500))
        );
        assert!(matches!(
            "remove:127.0.0.1@5s".parse::<PoolEvent>(),
            Err(ParseEventError::Address(_))
        ));
        assert!(matches!(
            "move:127.0.0.1:80@5s".parse::<PoolEvent>(),
            Err(ParseEventError::Kind(_))
        ));
        assert!(matches!(
            "drain:127.0.0.1:80".parse::<PoolEvent>(),
            Err(ParseEventError::NoTime)
        ));
        assert!(matches!(
            "drain:127.0.0.1:80@soon".parse::<PoolEvent>(),
            Err(ParseEventError::Time(_))
        ));
    }
}
