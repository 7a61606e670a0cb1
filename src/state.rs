//! The snapshot: everything a request reads (routes, pools, strategies), immutable, behind one
//! `ArcSwap`. A request loads it once and finishes on it, whatever reloads happen meanwhile.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::backend::Registry;
use crate::balance::{self, Candidates, Choice, Member, RequestFacts, Strategy};
use crate::config::{Config, PoolConfig, UpstreamTls};
use crate::health::Monitor;
use crate::metrics::{MemberMetrics, Metrics, PoolMetrics};
use crate::proxy::Tunnels;

/// One pool as built for a snapshot.
#[derive(Debug)]
pub struct Pool {
    /// The pool's config.
    pub config: PoolConfig,
    /// Active members in config order, then members that are draining but still reachable by sticky
    /// clients.
    pub members: Vec<Member>,
    /// How many of `members` are active.
    pub active: usize,
    /// The selection state built for exactly these members.
    pub strategy: Box<dyn Strategy>,
    /// The pool's metric handles.
    pub metrics: Arc<PoolMetrics>,
    /// Each member's metric handles, by the same index as `members`.
    pub member_metrics: Vec<Arc<MemberMetrics>>,
    /// This pool's requests and upgraded connections in flight, counted only for pools with a
    /// `balance_factor` (their bound is a multiple of the average).
    pub load: Option<Arc<AtomicU64>>,
    /// Gone from the config: kept, with no route to it, only while backends it had still drain,
    /// so that their state and metrics stay visible until their drains end.
    pub removed: bool,
}

impl Pool {
    /// The pool's name.
    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// The load bound of bounded-load placement (`balance_factor`) right now, if the pool has one.
    pub fn load_bound(&self) -> Option<u64> {
        self.config
            .balance_factor
            .zip(self.load.as_ref())
            .map(|(factor, load)| {
                balance::load_bound(factor, load.load(Ordering::Relaxed), self.active)
            })
    }

    /// Asks the strategy for a backend, with the pool's slow start and load bound, passing over
    /// the members in `tried`. The one way a backend is chosen, for the proxy and `simulate` alike.
    pub fn choose(&self, facts: &RequestFacts<'_>, tried: &[usize]) -> Option<Choice> {
        let candidates = Candidates::new(&self.members, self.active, tried)
            .with_slow_start(self.config.slow_start)
            .with_bound(self.load_bound());
        self.strategy.choose(facts, &candidates)
    }
}

/// A route, with its pool resolved to an index.
#[derive(Debug)]
struct Route {
    host: Option<String>,
    path_prefix: Option<String>,
    pool: usize,
}

/// An immutable view of the config plus the selection state built from it.
#[derive(Debug)]
pub struct Snapshot {
    /// The config this snapshot was built from.
    pub config: Arc<Config>,
    /// Pools in name order.
    pub pools: Vec<Pool>,
    routes: Vec<Route>,
}

impl Snapshot {
    /// Builds a snapshot, taking each backend's live state from `registry` (creating it for new
    /// addresses) and its metric handles from `metrics` (dropping the series of pairs that are gone).
    /// Members of `previous` that are draining, or in `leaving` (about to be drained by the
    /// caller), stay: reachable after the active ones where their pool still exists, and in a
    /// pool kept as [`Pool::removed`] where it does not.
    pub fn build(
        config: Arc<Config>,
        registry: &Registry,
        metrics: &Metrics,
        previous: Option<&Snapshot>,
        leaving: &[SocketAddr],
    ) -> Self {
        // A backend the config lists (here or in another pool) is shown where it is listed: a
        // drain for its removal is called off by the caller right after this build.
        let listed = |a: SocketAddr| {
            config
                .pools
                .values()
                .any(|p| p.backends.iter().any(|b| b.address == a))
        };
        // An old member stays while it drains, or is about to, and no pool lists it.
        let carried = |m: &&Member| {
            let address = m.spec.address;
            (m.state.is_draining() || leaving.contains(&address)) && !listed(address)
        };
        let mut pools: Vec<Pool> = config
            .pools
            .values()
            .map(|pool_config| {
                let mut members: Vec<Member> = pool_config
                    .backends
                    .iter()
                    .map(|spec| Member {
                        spec: spec.clone(),
                        state: registry.get_or_create(spec.address),
                    })
                    .collect();
                let active = members.len();
                if let Some(old) = previous.and_then(|p| p.pool(&pool_config.name)) {
                    members.extend(old.members.iter().filter(carried).cloned());
                }
                let strategy = balance::build(pool_config, &members, active);
                let member_metrics = members
                    .iter()
                    .map(|m| metrics.member(&pool_config.name, m.spec.address))
                    .collect();
                Pool {
                    load: pool_config
                        .balance_factor
                        .map(|_| registry.pool_load(&pool_config.name)),
                    config: pool_config.clone(),
                    members,
                    active,
                    strategy,
                    metrics: metrics.pool(&pool_config.name),
                    member_metrics,
                    removed: false,
                }
            })
            .collect();
        let removed = previous
            .iter()
            .flat_map(|p| &p.pools)
            .filter(|old| !config.pools.contains_key(old.name()));
        for old in removed {
            let members: Vec<Member> = old.members.iter().filter(carried).cloned().collect();
            if members.is_empty() {
                continue;
            }
            pools.push(Pool {
                strategy: balance::build(&old.config, &members, 0),
                member_metrics: members
                    .iter()
                    .map(|m| metrics.member(old.name(), m.spec.address))
                    .collect(),
                config: old.config.clone(),
                members,
                active: 0,
                metrics: metrics.pool(old.name()),
                load: None,
                removed: true,
            });
        }
        // Name order, as the config's (routes are resolved by name below).
        pools.sort_by(|a, b| a.name().cmp(b.name()));
        // Last, once the slow part (the strategies' tables) is done, and before the snapshot is
        // published: a backend whose TLS settings changed closes its idle connections, and pools
        // none that requests routed on the old snapshot make (`ConnPool::use_tls`). Members
        // carried over while draining keep the settings they had.
        for pool in &pools {
            for member in &pool.members[..pool.active] {
                let tls_id = member.spec.tls.as_ref().map_or(0, UpstreamTls::settings_id);
                member.state.pool.use_tls(tls_id);
            }
        }
        let live_pools: Vec<&str> = pools.iter().map(|p| p.name()).collect();
        let live_members: Vec<(&str, SocketAddr)> = pools
            .iter()
            .flat_map(|p| p.members.iter().map(move |m| (p.name(), m.spec.address)))
            .collect();
        metrics.retain(&live_pools, &live_members);
        let bounded: Vec<&str> = pools
            .iter()
            .filter(|p| p.load.is_some())
            .map(|p| p.name())
            .collect();
        registry.retain_pool_loads(&bounded);
        let routes = config
            .routes
            .iter()
            .map(|r| Route {
                host: r.host.clone(),
                path_prefix: r.path_prefix.clone(),
                pool: pools
                    .iter()
                    .position(|p| p.config.name == r.pool)
                    .expect("validated: routes name existing pools"),
            })
            .collect();
        Snapshot {
            config,
            pools,
            routes,
        }
    }

    /// The pool of the first route matching `host` (without a port) and `path`.
    pub fn route(&self, host: Option<&str>, path: &str) -> Option<&Pool> {
        self.route_index(host, path).map(|i| &self.pools[i])
    }

    /// Like [`Snapshot::route`], the pool's index in [`Snapshot::pools`].
    pub fn route_index(&self, host: Option<&str>, path: &str) -> Option<usize> {
        self.routes
            .iter()
            .find(|r| {
                r.host
                    .as_deref()
                    .is_none_or(|h| host.is_some_and(|host| host.eq_ignore_ascii_case(h)))
                    && r.path_prefix.as_deref().is_none_or(|p| path.starts_with(p))
            })
            .map(|r| r.pool)
    }

    /// The pool named `name`.
    pub fn pool(&self, name: &str) -> Option<&Pool> {
        self.pools.iter().find(|p| p.config.name == name)
    }
}

/// What every connection shares: the current snapshot and the live backend registry.
#[derive(Debug)]
pub struct Shared {
    /// The current snapshot, swapped whole on reload.
    pub snapshot: ArcSwap<Snapshot>,
    /// Live backend state by address.
    pub registry: Registry,
    /// Every metric, with handles resolved per snapshot.
    pub metrics: Metrics,
    /// Pool-level bookkeeping of backend health changes.
    pub health: Monitor,
    /// Upgraded connections (WebSockets and other tunnels).
    pub tunnels: Tunnels,
}

impl Shared {
    /// Shared state serving `config`.
    pub fn new(config: Config) -> Arc<Self> {
        let registry = Registry::new();
        let metrics = Metrics::new();
        let snapshot = Snapshot::build(Arc::new(config), &registry, &metrics, None, &[]);
        let shared = Arc::new(Shared {
            snapshot: ArcSwap::from_pointee(snapshot),
            registry,
            metrics,
            health: Monitor::default(),
            tunnels: Tunnels::default(),
        });
        shared.metrics.attach(&shared);
        shared
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(routes: &str) -> Snapshot {
        let text = format!(
            r#"
[[listeners]]
listen = "127.0.0.1:0"
{routes}
[pools.api]
strategy = "round_robin"
backends = [{{ address = "127.0.0.1:9001" }}]

[pools.web]
strategy = "round_robin"
backends = [{{ address = "127.0.0.1:9002" }}]
"#
        );
        let config = Config::from_str(&text, std::path::Path::new("t.toml")).unwrap();
        Snapshot::build(
            Arc::new(config),
            &Registry::new(),
            &Metrics::new(),
            None,
            &[],
        )
    }

    fn pool_for(s: &Snapshot, host: Option<&str>, path: &str) -> Option<String> {
        s.route(host, path).map(|p| p.name().to_owned())
    }

    #[test]
    fn first_matching_route_wins_with_host_and_prefix() {
        let s = snapshot(
            r#"
[[routes]]
host = "api.example.com"
path_prefix = "/api"
pool = "api"

[[routes]]
path_prefix = "/api"
pool = "web"
"#,
        );
        assert_eq!(
            pool_for(&s, Some("API.Example.com"), "/api/x").as_deref(),
            Some("api")
        );
        // A plain string prefix: "/api" also matches "/apis".
        assert_eq!(
            pool_for(&s, Some("api.example.com"), "/apis").as_deref(),
            Some("api")
        );
        // Other host: the second route.
        assert_eq!(
            pool_for(&s, Some("other.example"), "/api").as_deref(),
            Some("web")
        );
        assert_eq!(pool_for(&s, None, "/api").as_deref(), Some("web"));
        // Nothing matches: no pool (404).
        assert_eq!(pool_for(&s, Some("api.example.com"), "/"), None);
    }

    #[test]
    fn route_without_matchers_matches_everything() {
        let s = snapshot("[[routes]]\npool = \"web\"\n");
        assert_eq!(pool_for(&s, None, "/anything").as_deref(), Some("web"));
    }

    /// A draining backend is shown in every pool that lists it, and in no other: not in the pool
    /// it left for another one, whether that pool stays or is removed.
    #[test]
    fn a_draining_backend_is_shown_only_where_it_is_listed() {
        let build = |pools: &str, previous: Option<&Snapshot>, registry: &Registry| {
            let text = format!("[[listeners]]\nlisten = \"127.0.0.1:0\"\n{pools}");
            let config = Config::from_str(&text, std::path::Path::new("t.toml")).unwrap();
            Snapshot::build(Arc::new(config), registry, &Metrics::new(), previous, &[])
        };
        let pool = |name: &str, ports: &[u16]| {
            let backends: Vec<String> = ports
                .iter()
                .map(|p| format!("{{ address = \"127.0.0.1:{p}\" }}"))
                .collect();
            format!(
                "[pools.{name}]\nstrategy = \"round_robin\"\nbackends = [{}]\n",
                backends.join(", ")
            )
        };
        let members = |s: &Snapshot| -> Vec<(String, Vec<u16>)> {
            s.pools
                .iter()
                .map(|p| {
                    let ports = p.members.iter().map(|m| m.spec.address.port()).collect();
                    (p.name().to_owned(), ports)
                })
                .collect()
        };
        let registry = Registry::new();
        let first = build(
            &(pool("api", &[9001]) + &pool("web", &[9002, 9003])),
            None,
            &registry,
        );
        // An operator's drain of 9003 (held open: its `done` never turns).
        let moved = registry.get("127.0.0.1:9003".parse().unwrap()).unwrap();
        let (_done, done) = tokio::sync::watch::channel(None);
        let now = std::time::Instant::now();
        let drain = crate::backend::Drain {
            started: now,
            deadline: now + std::time::Duration::from_secs(30),
            removed: false,
            runtime: true,
            completed_at_start: 0,
            cut_at_start: 0,
            upgrades_at_start: 0,
            upgraded_at_start: 0,
            done,
        };
        moved.begin_drain(false, || drain).unwrap();
        assert!(moved.is_draining());
        // 9003 moves from `web` to `api`, still draining: shown in `api` only.
        let second = build(
            &(pool("api", &[9001, 9003]) + &pool("web", &[9002])),
            Some(&first),
            &registry,
        );
        assert_eq!(
            members(&second),
            [("api".into(), vec![9001, 9003]), ("web".into(), vec![9002])]
        );
        // `web` removed: nothing of it is kept, 9003 being listed in `api`.
        let third = build(&pool("api", &[9001, 9003]), Some(&second), &registry);
        assert_eq!(members(&third), [("api".into(), vec![9001, 9003])]);
    }
}
