//! Load-balancing strategies behind one small trait. Selection state (sequences, lookup tables,
//! keys) is built once per snapshot; [`Strategy::choose`] reads only atomics and that state.
//!
//! A pool's members are laid out as the active backends, in config order, followed by backends that
//! are draining but still reachable by sticky clients. Strategies place new work on the active
//! prefix only; the caller's [`Candidates`] says which members may take work right now.

mod cookie;
mod ip_hash;
mod least_connections;
mod round_robin;

use std::fmt::Debug;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderValue;

pub use cookie::{CookieAffinity, TOKEN_COOKIE_VERSION};
pub use ip_hash::{ip_key, IpHash};
pub use least_connections::LeastConnections;
pub use round_robin::RoundRobin;

use crate::backend::BackendState;
use crate::config::{BackendSpec, DrainSticky, PoolConfig, StrategyKind};

/// The fixed seed of every hash that places clients or backends: every instance and every reload
/// must agree, so it is never random and never changes.
pub const HASH_SEED: u64 = 0x5357_4954_4348_5944; // "SWITCHYD"

/// One backend as a pool sees it: what the config says, and the shared live state.
#[derive(Debug, Clone)]
pub struct Member {
    /// Address and weight from the config.
    pub spec: BackendSpec,
    /// Live state, shared with every other pool and snapshot naming the same address.
    pub state: Arc<BackendState>,
}

/// What a strategy may look at in a request.
#[derive(Debug)]
pub struct RequestFacts<'a> {
    /// The client's IP: the peer, or the right-most untrusted `X-Forwarded-For` entry when the peer
    /// is one of the pool's `trusted_proxies`.
    pub client_ip: IpAddr,
    /// The request's `Cookie` header values (for `cookie` affinity; empty for other strategies).
    pub cookies: &'a [HeaderValue],
}

/// The pool's members and which of them may take this request.
#[derive(Debug, Clone, Copy)]
pub struct Candidates<'a> {
    members: &'a [Member],
    active: usize,
    tried: &'a [usize],
    slow_start: Option<Duration>,
    bound: Option<u64>,
}

impl<'a> Candidates<'a> {
    /// `members[..active]` are the active backends; `tried` were already tried for this request.
    pub fn new(members: &'a [Member], active: usize, tried: &'a [usize]) -> Self {
        debug_assert!(active <= members.len());
        Candidates {
            members,
            active,
            tried,
            slow_start: None,
            bound: None,
        }
    }

    /// The most load a backend may have to take a new client (bounded-load placement, see
    /// [`load_bound`]); `None`: no bound.
    pub fn with_bound(mut self, bound: Option<u64>) -> Self {
        self.bound = bound;
        self
    }

    /// Whether member `i` may take a *new* client: ready, and under the pool's load bound when it
    /// has one. Placement (round robin, hashing, a new cookie) asks this; a client already pinned
    /// by its cookie asks [`Candidates::is_ready`], so a bound never breaks a session.
    #[inline]
    pub fn accepts(&self, i: usize) -> bool {
        self.is_ready(i)
            && self
                .bound
                .is_none_or(|bound| self.members[i].state.load() < bound)
    }

    /// The pool's `slow_start` window, for [`Candidates::weight_permille`].
    pub fn with_slow_start(mut self, slow_start: Option<Duration>) -> Self {
        self.slow_start = slow_start;
        self
    }

    /// Number of active members (the ones new work is placed on).
    pub fn active(&self) -> usize {
        self.active
    }

    /// All members, draining ones included.
    pub fn members(&self) -> &'a [Member] {
        self.members
    }

    /// Whether member `i` may take new work: active, healthy, under its `max_connections` and
    /// not yet tried.
    #[inline]
    pub fn is_ready(&self, i: usize) -> bool {
        let member = &self.members[i];
        member.state.is_ready() && member.has_room() && !self.tried.contains(&i)
    }

    /// Whether member `i` is draining, healthy, under its `max_connections` and not yet tried, and
    /// its upgraded connections have not been cut yet: sticky clients may still be sent there.
    /// (After the cut, a WebSocket told to go away must reconnect elsewhere, not back here.)
    #[inline]
    pub fn is_draining(&self, i: usize) -> bool {
        let member = &self.members[i];
        member.state.is_draining()
            && !member.state.is_cut()
            && member.state.health.is_available()
            && member.has_room()
            && !self.tried.contains(&i)
    }

    /// The share of its weight member `i` takes now, in thousandths (less than 1000 while it
    /// ramps up under `slow_start`).
    #[inline]
    pub fn weight_permille(&self, i: usize) -> u64 {
        self.members[i]
            .state
            .health
            .weight_permille(self.slow_start)
    }

    /// Whether member `i`, offered a turn, takes it: always, unless it is ramping up, when it
    /// takes its share of turns (round robin's slow start).
    #[inline]
    pub fn admits(&self, i: usize) -> bool {
        let share = self.weight_permille(i);
        self.members[i].state.health.admits(share)
    }
}

/// The bound of consistent hashing with bounded loads (Mirrokni, Thorup and Zadimoghaddam, 2016):
/// a backend takes a new client only while its load is under `ceil(factor × (total + 1) / n)`,
/// where `total` is the pool's load and `n` its active backends. Since the average is below the
/// bound, some backend is always under it.
pub fn load_bound(factor: f64, total: u64, n: usize) -> u64 {
    let n = n.max(1) as f64;
    ((factor * (total + 1) as f64) / n).ceil() as u64
}

impl Member {
    /// Whether the member is under its `max_connections`, before a request is counted.
    #[inline]
    pub fn has_room(&self) -> bool {
        self.spec
            .max_connections
            .is_none_or(|max| self.state.load() < u64::from(max))
    }

    /// Whether the member went over its `max_connections` once a request was counted (others
    /// filled its last slot between the choice and the count).
    #[inline]
    pub fn over_limit(&self) -> bool {
        self.spec
            .max_connections
            .is_some_and(|max| self.state.load() > u64::from(max))
    }
}

/// How a request's affinity cookie was used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Affinity {
    /// The strategy is not cookie-based.
    None,
    /// A valid cookie named an available backend.
    Hit,
    /// No cookie: the client was placed and gets one.
    New,
    /// A valid cookie named a backend that is gone or unavailable: re-placed, new cookie.
    Reassigned,
    /// A cookie was present but tampered, expired or unreadable: placed as new, new cookie.
    Invalid,
}

impl Affinity {
    /// Label for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Affinity::None => "none",
            Affinity::Hit => "hit",
            Affinity::New => "new",
            Affinity::Reassigned => "reassigned",
            Affinity::Invalid => "invalid",
        }
    }
}

/// A strategy's decision.
#[derive(Debug, Clone)]
pub struct Choice {
    /// Index into the pool's members.
    pub index: usize,
    /// A `Set-Cookie` value to add to the response.
    pub set_cookie: Option<HeaderValue>,
    /// What happened to the affinity cookie.
    pub affinity: Affinity,
}

impl Choice {
    /// A plain choice with no cookie.
    pub fn plain(index: usize) -> Self {
        Choice {
            index,
            set_cookie: None,
            affinity: Affinity::None,
        }
    }
}

/// Picks a backend for a request.
pub trait Strategy: Send + Sync + Debug {
    /// Pick one of the ready candidates, or `None` when none is ready.
    fn choose(&self, request: &RequestFacts<'_>, candidates: &Candidates<'_>) -> Option<Choice>;
}

/// Builds the strategy a pool's config names, over `members[..active]`.
///
/// Cookie pools need their `cookie` table with at least one secret; validation guarantees that.
pub fn build(pool: &PoolConfig, members: &[Member], active: usize) -> Box<dyn Strategy> {
    let actives = &members[..active];
    match pool.strategy {
        StrategyKind::Cookie => {
            let cookie = pool
                .cookie
                .as_ref()
                .expect("validated: cookie strategy has a cookie table");
            let fallback = build_simple(cookie.fallback, actives);
            Box::new(CookieAffinity::new(
                cookie,
                members,
                fallback,
                pool.drain_sticky == DrainSticky::Keep,
            ))
        }
        kind => build_simple(kind, actives),
    }
}

fn build_simple(kind: StrategyKind, actives: &[Member]) -> Box<dyn Strategy> {
    let specs: Vec<&BackendSpec> = actives.iter().map(|m| &m.spec).collect();
    match kind {
        StrategyKind::RoundRobin => Box::new(RoundRobin::new(&specs)),
        StrategyKind::LeastConnections => Box::new(LeastConnections::new(&specs)),
        StrategyKind::IpHash => Box::new(IpHash::new(&specs)),
        StrategyKind::Cookie => unreachable!("validated: a cookie fallback is never cookie"),
    }
}

/// Greatest common divisor, to keep weighted schedules short.
fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

#[cfg(test)]
pub(crate) mod testing {
    //! Members with fresh live state, for unit tests of the strategies.
    use super::*;

    pub fn members(weights: &[u32]) -> Vec<Member> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &w)| {
                let address = format!("10.0.{}.{}:8080", i / 250, i % 250 + 1)
                    .parse()
                    .unwrap();
                Member {
                    spec: BackendSpec {
                        address,
                        weight: w,
                        max_connections: None,
                        tls: None,
                    },
                    state: BackendState::new(address),
                }
            })
            .collect()
    }

    pub fn facts(cookies: &[HeaderValue]) -> RequestFacts<'_> {
        RequestFacts {
            client_ip: "192.0.2.1".parse().unwrap(),
            cookies,
        }
    }
}
