//! Discovery: pools whose backends are found in DNS or etcd instead of listed in `proxy.toml`.
//!
//! One task per discovered pool reads its source ([`dns`], [`etcd`]) and hands every answer to
//! [`Server::discovered`]. A changed membership becomes a new config — the current one with that
//! pool's `backends` replaced — applied through the reload path: new backends become active
//! (ramping where the pool has `slow_start`), vanished ones drain, and the live state of the
//! others is untouched. Membership is kept in address order, so every instance builds the same
//! hashing tables from the same answer, whatever order the source gave it in.
//!
//! The last accepted membership of each pool lives here, outside the snapshot (like the backend
//! registry), so that a file reload keeps it instead of emptying the pool. A source that cannot
//! be read, or that answers with nothing while the pool does not `allow_empty`, changes nothing:
//! the last membership keeps serving, and the state change is logged once and shown in `/status`
//! and in metrics. Tasks are started, stopped and restarted by [`Discovery::reconcile`] as
//! reloads change the pools, like the health checkers are.

pub mod dns;
#[cfg(feature = "etcd")]
pub mod etcd;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::{BackendSpec, Config, DiscoveryConfig, DiscoverySource, UpstreamTls};
use crate::metrics::Metrics;
use crate::server::Server;

pub use crate::config::MAX_WEIGHT;

/// One backend a source found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Found {
    /// Its address: its identity, as for a listed backend.
    pub address: SocketAddr,
    /// Its weight, 1 to [`MAX_WEIGHT`].
    pub weight: u32,
}

/// One reading of a source.
#[derive(Debug)]
pub enum Answer {
    /// The source answered with these backends (possibly none).
    Members(Vec<Found>),
    /// The source could not be read; why, for the log and `/status`.
    Failed(String),
}

/// What a pool's source last did, for `/status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceState {
    /// No answer yet since the task started.
    Starting,
    /// Answering; its membership is applied.
    Ok,
    /// Answering with no backends, which the pool ignores (no `allow_empty`).
    Empty,
    /// Not answering; the last membership keeps serving.
    Failing,
}

/// A discovered pool's task and what it found.
#[derive(Debug)]
struct Running {
    config: DiscoveryConfig,
    /// Which task may report: bumped on every (re)start, so a stopped task's late answer is
    /// dropped.
    epoch: u64,
    stop: CancellationToken,
    /// The last membership accepted, in address order; `None` before the first one. Kept across
    /// restarts of the task (a changed source serves the old membership until it answers).
    members: Option<Vec<Found>>,
    state: SourceState,
    since: SystemTime,
    last_answer: Option<SystemTime>,
    last_change: Option<SystemTime>,
    last_error: Option<(String, SystemTime)>,
}

/// `/status`'s `discovery` object of a pool.
#[derive(Debug, Clone, Serialize)]
pub struct DiscoveryStatus {
    /// `dns NAME:PORT`, `dns_srv NAME` or `etcd PREFIX`.
    pub source: String,
    /// `starting`, `ok`, `empty` or `failing`.
    pub state: SourceState,
    /// Unix time the state began.
    pub since: u64,
    /// Unix time of the last answer (an empty one included), if any.
    pub last_answer: Option<u64>,
    /// Unix time the membership last changed, if it has.
    pub last_change: Option<u64>,
    /// The last read that failed, if any, and when (it stays after the source recovers).
    pub last_error: Option<String>,
    /// Unix time of `last_error`.
    pub last_error_at: Option<u64>,
    /// Backends in the membership that serves; `None` before the first answer.
    pub members: Option<usize>,
}

/// The discovery tasks and memberships of every discovered pool, by pool name.
#[derive(Debug)]
pub struct Discovery {
    pools: Mutex<BTreeMap<String, Running>>,
    epochs: AtomicU64,
    /// Bumped when a source leaves `starting`, for [`Discovery::first_answers`].
    settled: watch::Sender<()>,
}

impl Default for Discovery {
    fn default() -> Self {
        Discovery {
            pools: Mutex::new(BTreeMap::new()),
            epochs: AtomicU64::new(0),
            settled: watch::Sender::new(()),
        }
    }
}

impl Discovery {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Running>> {
        self.pools.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `config` with each discovered pool's `backends` set to its last accepted membership. A
    /// pool with no answer yet keeps what it has in `current` (the listed backends of a pool that
    /// just switched to discovery, or nothing for a new pool), so a reload never empties a pool.
    pub(crate) fn merge(&self, mut config: Config, current: &Config) -> Config {
        let pools = self.lock();
        let discovered: Vec<String> = config
            .pools
            .iter()
            .filter(|(_, pool)| pool.discovery.is_some())
            .map(|(name, _)| name.clone())
            .collect();
        for name in discovered {
            let backends = match pools.get(&name).and_then(|r| r.members.as_ref()) {
                Some(found) => backends_of(&config, &name, found),
                // Kept as listed, but, as for discovered ones, not an address another pool of the
                // new config reaches differently: validation saw this pool without backends.
                None => current
                    .pools
                    .get(&name)
                    .map(|pool| pool.backends.clone())
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|b| {
                        let clash = reached_differently(&config, &name, b.address, b.tls.as_ref());
                        if clash {
                            tracing::warn!(
                                pool = name.as_str(),
                                backend = %b.address,
                                "listed backend left out: another pool reaches this address \
                                 differently (plain or https)"
                            );
                        }
                        !clash
                    })
                    .collect(),
            };
            if let Some(pool) = config.pools.get_mut(&name) {
                pool.backends = backends;
            }
        }
        config
    }

    /// Makes the running tasks match `config`: one per pool with a `[discovery]` table. A pool
    /// whose table changed gets a new task (keeping its membership until the new one answers);
    /// a pool that is gone, or lists its backends now, loses its task and membership. `stop`
    /// (the server's shutdown) stops all.
    pub(crate) fn reconcile(
        &self,
        server: &Arc<Server>,
        config: &Config,
        metrics: &Metrics,
        stop: &CancellationToken,
    ) {
        let wanted: BTreeMap<&String, &DiscoveryConfig> = config
            .pools
            .iter()
            .filter_map(|(name, pool)| pool.discovery.as_ref().map(|d| (name, d)))
            .collect();
        let mut pools = self.lock();
        pools.retain(|name, running| {
            let keep = wanted.contains_key(name);
            if !keep {
                running.stop.cancel();
                metrics.remove_discovery(name);
                tracing::info!(pool = %name, source = %running.config.source.describe(), "discovery stopped");
            }
            keep
        });
        for (name, discovery) in wanted {
            if pools.get(name).is_some_and(|r| r.config == *discovery) {
                continue;
            }
            let epoch = self.epochs.fetch_add(1, Ordering::Relaxed) + 1;
            let token = stop.child_token();
            match pools.get_mut(name) {
                Some(running) => {
                    running.stop.cancel();
                    running.config = discovery.clone();
                    running.epoch = epoch;
                    running.stop = token.clone();
                    running.state = SourceState::Starting;
                    running.since = SystemTime::now();
                }
                None => {
                    pools.insert(
                        name.clone(),
                        Running {
                            config: discovery.clone(),
                            epoch,
                            stop: token.clone(),
                            members: None,
                            state: SourceState::Starting,
                            since: SystemTime::now(),
                            last_answer: None,
                            last_change: None,
                            last_error: None,
                        },
                    );
                }
            }
            tracing::info!(pool = %name, source = %discovery.source.describe(), "discovery started");
            let weak = Arc::downgrade(server);
            let name = name.clone();
            match discovery.source.clone() {
                DiscoverySource::Dns(dns) => {
                    tokio::spawn(dns::run(weak, name, epoch, dns, token));
                }
                #[cfg(feature = "etcd")]
                DiscoverySource::Etcd(etcd) => {
                    tokio::spawn(etcd::run(weak, name, epoch, etcd, token));
                }
                // Validation refuses etcd sources in builds without the feature.
                #[cfg(not(feature = "etcd"))]
                DiscoverySource::Etcd(_) => {
                    tracing::error!(pool = %name, "etcd discovery needs a build with --features etcd");
                }
            }
        }
    }

    /// Waits until every source has answered or failed once, for at most `limit`; whether they
    /// all did.
    pub(crate) async fn first_answers(&self, limit: Duration) -> bool {
        let mut changes = self.settled.subscribe();
        let waiting = async {
            loop {
                if !self
                    .lock()
                    .values()
                    .any(|r| r.state == SourceState::Starting)
                {
                    return;
                }
                if changes.changed().await.is_err() {
                    return;
                }
            }
        };
        tokio::time::timeout(limit, waiting).await.is_ok()
    }

    /// Takes one answer of pool `pool`'s task of `epoch`: moves its source's state (logging each
    /// change once), counts it, and returns the membership to apply when it changed.
    pub(crate) fn record(
        &self,
        pool: &str,
        epoch: u64,
        answer: Answer,
        metrics: &Metrics,
    ) -> Option<Vec<Found>> {
        let mut pools = self.lock();
        // A stopped or replaced task's answer is not the pool's any more.
        let running = pools.get_mut(pool).filter(|r| r.epoch == epoch)?;
        let now = SystemTime::now();
        let source = running.config.source.describe();
        let before = running.state;
        let serving = running.members.as_ref().map(Vec::len);
        let result = match answer {
            Answer::Failed(error) => {
                metrics.discovery_update(pool, "error");
                metrics.discovery_source_up(pool, false);
                if before != SourceState::Failing {
                    tracing::warn!(
                        pool,
                        %source,
                        %error,
                        serving = serving.unwrap_or(0),
                        "discovery source failing; the last known membership keeps serving"
                    );
                    running.state = SourceState::Failing;
                    running.since = now;
                } else {
                    tracing::debug!(pool, %source, %error, "discovery source still failing");
                }
                running.last_error = Some((error, now));
                None
            }
            Answer::Members(found) => {
                let found = normalise(found);
                metrics.discovery_source_up(pool, true);
                running.last_answer = Some(now);
                if found.is_empty() && !running.config.allow_empty {
                    metrics.discovery_update(pool, "empty_ignored");
                    if before != SourceState::Empty {
                        tracing::warn!(
                            pool,
                            %source,
                            serving = serving.unwrap_or(0),
                            "discovery source answered with no backends; ignored without \
                             allow_empty = true, the last known membership keeps serving"
                        );
                        running.state = SourceState::Empty;
                        running.since = now;
                    }
                    None
                } else {
                    if before != SourceState::Ok {
                        let message = match before {
                            SourceState::Failing => "discovery source answering again",
                            SourceState::Empty => "discovery source has backends again",
                            _ => "discovery source answering",
                        };
                        tracing::info!(pool, %source, backends = found.len(), "{message}");
                        running.state = SourceState::Ok;
                        running.since = now;
                    }
                    if running.members.as_ref() == Some(&found) {
                        metrics.discovery_update(pool, "unchanged");
                        None
                    } else {
                        metrics.discovery_update(pool, "changed");
                        running.members = Some(found.clone());
                        running.last_change = Some(now);
                        Some(found)
                    }
                }
            }
        };
        if before == SourceState::Starting && running.state != SourceState::Starting {
            self.settled.send_replace(());
        }
        result
    }

    /// The `/status` object of pool `pool`, when it is discovered.
    pub fn status(&self, pool: &str) -> Option<DiscoveryStatus> {
        let pools = self.lock();
        let running = pools.get(pool)?;
        Some(DiscoveryStatus {
            source: running.config.source.describe(),
            state: running.state,
            since: unix(running.since),
            last_answer: running.last_answer.map(unix),
            last_change: running.last_change.map(unix),
            last_error: running.last_error.as_ref().map(|(e, _)| e.clone()),
            last_error_at: running.last_error.as_ref().map(|(_, at)| unix(*at)),
            members: running.members.as_ref().map(Vec::len),
        })
    }
}

/// Address order, one entry per address (the highest weight when a source names one twice; etcd
/// has already kept the first key's), weights within 1..=[`MAX_WEIGHT`].
fn normalise(mut found: Vec<Found>) -> Vec<Found> {
    for f in &mut found {
        f.weight = f.weight.clamp(1, MAX_WEIGHT);
    }
    // Highest weight first among equal addresses, so dedup keeps it.
    found.sort_by(|a, b| a.address.cmp(&b.address).then(b.weight.cmp(&a.weight)));
    found.dedup_by_key(|f| f.address);
    found
}

/// The backends of discovered pool `pool` in `config` for `found`. An address another pool
/// reaches over TLS is left out (and logged): one address has one connection pool, and a
/// discovered backend is plain HTTP.
pub(crate) fn backends_of(config: &Config, pool: &str, found: &[Found]) -> Vec<BackendSpec> {
    let Some(discovery) = config.pools.get(pool).and_then(|p| p.discovery.as_ref()) else {
        return Vec::new();
    };
    found
        .iter()
        .filter(|f| {
            let https_elsewhere = reached_differently(config, pool, f.address, None);
            if https_elsewhere {
                tracing::warn!(
                    pool,
                    backend = %f.address,
                    "discovered backend left out: another pool reaches this address over https"
                );
            }
            !https_elsewhere
        })
        .map(|f| BackendSpec {
            address: f.address,
            weight: f.weight,
            max_connections: discovery.max_connections,
            tls: None,
        })
        .collect()
}

/// Whether a pool of `config` other than `pool` reaches `address` with other TLS settings than
/// `tls`: one address has one connection pool, so the two cannot both have it.
fn reached_differently(
    config: &Config,
    pool: &str,
    address: SocketAddr,
    tls: Option<&UpstreamTls>,
) -> bool {
    config.pools.values().any(|other| {
        other.name != pool
            && other
                .backends
                .iter()
                .any(|b| b.address == address && b.tls.as_ref() != tls)
    })
}

fn unix(time: SystemTime) -> u64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found(address: &str, weight: u32) -> Found {
        Found {
            address: address.parse().unwrap(),
            weight,
        }
    }

    /// A pool that switches from listed backends to discovery keeps them until its source answers,
    /// but not one that a pool added in the same reload reaches over https.
    #[test]
    fn kept_backends_another_pool_reaches_differently_are_left_out() {
        let load = |text: &str| Config::from_str(text, std::path::Path::new("t.toml")).unwrap();
        let head = "[[listeners]]\nlisten = \"127.0.0.1:0\"\n[[routes]]\npool = \"p\"\n";
        let current = load(&format!(
            "{head}[pools.p]\nstrategy = \"round_robin\"\nbackends = \
             [{{ address = \"127.0.0.1:9001\" }}, {{ address = \"127.0.0.1:9002\" }}]\n"
        ));
        let next = load(&format!(
            "{head}[pools.p]\nstrategy = \"round_robin\"\n[pools.p.discovery]\n\
             dns = \"app.internal:9001\"\n\
             [pools.q]\nstrategy = \"round_robin\"\nbackends = \
             [{{ address = \"https://127.0.0.1:9001\" }}]\n"
        ));
        let merged = Discovery::default().merge(next, &current);
        let kept: Vec<String> = merged.pools["p"]
            .backends
            .iter()
            .map(|b| b.address.to_string())
            .collect();
        assert_eq!(kept, ["127.0.0.1:9002"]);
    }

    #[test]
    fn membership_is_in_address_order_whatever_the_answer_order() {
        let a = normalise(vec![
            found("10.0.0.3:80", 1),
            found("10.0.0.1:80", 2),
            found("10.0.0.2:80", 0),
        ]);
        let b = normalise(vec![
            found("10.0.0.2:80", 1),
            found("10.0.0.3:80", 1),
            found("10.0.0.1:80", 2),
        ]);
        assert_eq!(a, b);
        assert_eq!(a[0], found("10.0.0.1:80", 2));
        // Weight 0 counts as 1; the same address twice is one backend, with the higher weight.
        assert_eq!(
            normalise(vec![found("10.0.0.1:80", 3), found("10.0.0.1:80", 5000)]),
            vec![found("10.0.0.1:80", MAX_WEIGHT)]
        );
    }
}
