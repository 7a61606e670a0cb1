//! Reloads: a trigger (file change, SIGHUP, `POST /reload`) → load → validate → reconcile → store.
//! Only a valid config whose new listeners could all be bound is swapped in; anything else changes
//! nothing. Backends that leave every pool are drained; backends that come back are active again
//! with their live state intact. A discovered pool's membership change (see [`crate::discovery`])
//! takes the same path, one pool's backends replaced in the current config.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::Duration;

use serde::Serialize;

use crate::backend::{BackendState, BackendStatus, DrainOutcome};
use crate::config::{Config, ConfigErrors};
use crate::discovery::{self, Answer};
use crate::drain;
use crate::server::Server;
use crate::state::Snapshot;

/// Why a reload changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The file is not a valid config.
    #[error("{0}")]
    Config(#[from] ConfigErrors),
    /// A new listen address could not be bound.
    #[error("{path}: {source}")]
    Bind {
        /// The config file.
        path: PathBuf,
        /// The bind error (it names the address).
        #[source]
        source: std::io::Error,
    },
}

/// What a config is applied for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cause {
    /// A reload (file, SIGHUP, `POST /reload`): counted as one, may change listeners.
    Reload,
    /// A discovered pool's membership changed: only that pool's backends differ. `ramp`: new
    /// backends slow-start where the pool asks for it (not when the pool had none before, as
    /// at start: there is no warm backend to spare then, as with a listed pool at start).
    Discovery {
        /// Whether added backends slow-start.
        ramp: bool,
    },
}

/// A backend of a pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PoolBackend {
    /// The pool's name.
    pub pool: String,
    /// The backend's address.
    pub address: SocketAddr,
}

/// A backend whose weight changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Reweight {
    /// The pool's name.
    pub pool: String,
    /// The backend's address.
    pub address: SocketAddr,
    /// The old weight.
    pub from: u32,
    /// The new weight.
    pub to: u32,
}

/// A pool whose strategy changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StrategyChange {
    /// The pool's name.
    pub pool: String,
    /// The old strategy.
    pub from: &'static str,
    /// The new strategy.
    pub to: &'static str,
}

/// What a reload changes, computed from two configs alone (so `check --diff` can print it before
/// anything is applied).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ReloadReport {
    /// Pools only in the new config.
    pub pools_added: Vec<String>,
    /// Pools only in the old config.
    pub pools_removed: Vec<String>,
    /// Backends new to a pool.
    pub backends_added: Vec<PoolBackend>,
    /// Backends gone from a pool.
    pub backends_removed: Vec<PoolBackend>,
    /// Backends whose weight changed.
    pub reweighted: Vec<Reweight>,
    /// Pools whose strategy changed.
    pub strategy_changed: Vec<StrategyChange>,
    /// Addresses gone from every pool: they drain.
    pub draining: Vec<SocketAddr>,
    /// Listener addresses added.
    pub listeners_added: Vec<SocketAddr>,
    /// Listener addresses removed.
    pub listeners_removed: Vec<SocketAddr>,
    /// Listeners that stay but serve differently: TLS turned on or off, certificates whose files
    /// changed (re-read at every reload), server names, or `redirect_https`. New connections get
    /// the change; open ones keep what they started with.
    pub listeners_changed: Vec<SocketAddr>,
    /// Whether `[[routes]]` changed.
    pub routes_changed: bool,
    /// Whether anything else changed (timeouts, cookie settings, admin, drain settings...).
    pub other_changes: bool,
}

impl ReloadReport {
    /// The changes from `old` to `new`.
    pub fn between(old: &Config, new: &Config) -> Self {
        let mut report = ReloadReport::default();
        for name in new.pools.keys().filter(|n| !old.pools.contains_key(*n)) {
            report.pools_added.push(name.clone());
        }
        for name in old.pools.keys().filter(|n| !new.pools.contains_key(*n)) {
            report.pools_removed.push(name.clone());
        }
        let empty = Vec::new();
        let names: BTreeSet<&String> = old.pools.keys().chain(new.pools.keys()).collect();
        for name in names {
            let old_pool = old.pools.get(name);
            let new_pool = new.pools.get(name);
            let old_backends = old_pool.map_or(&empty, |p| &p.backends);
            let new_backends = new_pool.map_or(&empty, |p| &p.backends);
            let old_weights: BTreeMap<SocketAddr, u32> =
                old_backends.iter().map(|b| (b.address, b.weight)).collect();
            let new_weights: BTreeMap<SocketAddr, u32> =
                new_backends.iter().map(|b| (b.address, b.weight)).collect();
            for (&address, &to) in &new_weights {
                match old_weights.get(&address) {
                    None => report.backends_added.push(PoolBackend {
                        pool: name.clone(),
                        address,
                    }),
                    Some(&from) if from != to => report.reweighted.push(Reweight {
                        pool: name.clone(),
                        address,
                        from,
                        to,
                    }),
                    Some(_) => {}
                }
            }
            for &address in old_weights.keys().filter(|a| !new_weights.contains_key(a)) {
                report.backends_removed.push(PoolBackend {
                    pool: name.clone(),
                    address,
                });
            }
            if let (Some(o), Some(n)) = (old_pool, new_pool) {
                if o.strategy != n.strategy {
                    report.strategy_changed.push(StrategyChange {
                        pool: name.clone(),
                        from: o.strategy.as_str(),
                        to: n.strategy.as_str(),
                    });
                }
                // A backend that stays but changes its limit or how it is reached (additions and
                // removals are reported on their own).
                report.other_changes |= n.backends.iter().any(|b| {
                    o.backends.iter().any(|old| {
                        old.address == b.address
                            && (old.max_connections != b.max_connections || old.tls != b.tls)
                    })
                });
                let mut o = o.clone();
                o.backends.clone_from(&n.backends);
                o.strategy = n.strategy;
                report.other_changes |= o != *n;
            }
        }
        let new_addresses = all_backends(new);
        report.draining = all_backends(old)
            .into_iter()
            .filter(|a| !new_addresses.contains(a))
            .collect();
        let old_listen: BTreeSet<SocketAddr> = old.listeners.iter().map(|l| l.listen).collect();
        let new_listen: BTreeSet<SocketAddr> = new.listeners.iter().map(|l| l.listen).collect();
        report.listeners_added = new_listen.difference(&old_listen).copied().collect();
        report.listeners_removed = old_listen.difference(&new_listen).copied().collect();
        // The n-th listener on an address is the same listener in both (as the server keys them).
        for (i, listener) in new.listeners.iter().enumerate() {
            let nth = new.listeners[..i]
                .iter()
                .filter(|l| l.listen == listener.listen)
                .count();
            let before = old
                .listeners
                .iter()
                .filter(|l| l.listen == listener.listen)
                .nth(nth);
            if before.is_some_and(|before| before != listener) {
                report.listeners_changed.push(listener.listen);
            }
        }
        report.routes_changed = old.routes != new.routes;
        report.other_changes |=
            old.timeouts != new.timeouts || old.admin != new.admin || old.limits != new.limits;
        report
    }

    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        *self == ReloadReport::default()
    }
}

/// Says what `secret = "generate"` costs, once per key drawn.
pub(crate) fn warn_generated_secret(pool: &str) {
    tracing::warn!(
        pool,
        "cookie secret generated at random: affinity cookies will not survive a restart and \
         other switchyard instances will not accept them; set `secret` or `secret_env` to share one"
    );
}

fn all_backends(config: &Config) -> BTreeSet<SocketAddr> {
    config
        .pools
        .values()
        .flat_map(|p| p.backends.iter().map(|b| b.address))
        .collect()
}

impl fmt::Display for ReloadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("no changes");
        }
        let mut parts: Vec<String> = Vec::new();
        let list = |items: Vec<String>| items.join(", ");
        if !self.pools_added.is_empty() {
            parts.push(format!("pools added: {}", self.pools_added.join(", ")));
        }
        if !self.pools_removed.is_empty() {
            parts.push(format!("pools removed: {}", self.pools_removed.join(", ")));
        }
        let pb = |v: &[PoolBackend]| {
            list(
                v.iter()
                    .map(|b| format!("{} {}", b.pool, b.address))
                    .collect(),
            )
        };
        if !self.backends_added.is_empty() {
            parts.push(format!("backends added: {}", pb(&self.backends_added)));
        }
        if !self.backends_removed.is_empty() {
            parts.push(format!("backends removed: {}", pb(&self.backends_removed)));
        }
        if !self.draining.is_empty() {
            parts.push(format!(
                "draining: {}",
                list(self.draining.iter().map(|a| a.to_string()).collect())
            ));
        }
        if !self.reweighted.is_empty() {
            parts.push(format!(
                "re-weighted: {}",
                list(
                    self.reweighted
                        .iter()
                        .map(|r| format!("{} {} {}→{}", r.pool, r.address, r.from, r.to))
                        .collect()
                )
            ));
        }
        if !self.strategy_changed.is_empty() {
            parts.push(format!(
                "strategy: {}",
                list(
                    self.strategy_changed
                        .iter()
                        .map(|s| format!("{} {}→{}", s.pool, s.from, s.to))
                        .collect()
                )
            ));
        }
        let addrs = |v: &[SocketAddr]| list(v.iter().map(|a| a.to_string()).collect());
        if !self.listeners_added.is_empty() {
            parts.push(format!("listeners added: {}", addrs(&self.listeners_added)));
        }
        if !self.listeners_removed.is_empty() {
            parts.push(format!(
                "listeners removed: {}",
                addrs(&self.listeners_removed)
            ));
        }
        if !self.listeners_changed.is_empty() {
            parts.push(format!(
                "listeners changed (TLS, certificates or redirect): {}",
                addrs(&self.listeners_changed)
            ));
        }
        if self.routes_changed {
            parts.push("routes changed".to_owned());
        }
        if self.other_changes {
            parts.push("settings changed".to_owned());
        }
        f.write_str(&parts.join("; "))
    }
}

impl Server {
    /// Reads the config file the server runs with (or was last reloaded from) and applies it.
    pub async fn reload_from_file(self: &Arc<Self>) -> Result<ReloadReport, ReloadError> {
        let _one_file_reload_at_a_time = self.file_reload_lock.lock().await;
        let path = self.shared().snapshot.load().config.path.clone();
        // Off the runtime's threads: loading reads certificate files and may resolve the host
        // names of https backends.
        let loaded = tokio::task::spawn_blocking(move || Config::load(&path)).await;
        let loaded = match loaded {
            Ok(loaded) => loaded,
            Err(join) if join.is_panic() => std::panic::resume_unwind(join.into_panic()),
            // The runtime is shutting down: there is nothing left to reload.
            Err(_) => {
                return Err(ReloadError::Config(ConfigErrors(vec![
                    crate::config::ConfigError {
                        file: self.shared().snapshot.load().config.path.clone(),
                        line: None,
                        column: None,
                        key: String::new(),
                        message: "reload cancelled: the server is shutting down".to_owned(),
                    },
                ])))
            }
        };
        match loaded {
            Ok(config) => self.reload(config).await,
            Err(errors) => {
                self.metrics().reload_failed();
                tracing::error!(
                    "config reload failed, still serving the last good config:\n{errors}"
                );
                Err(ReloadError::Config(errors))
            }
        }
    }

    /// Applies a validated config: binds new listeners (or fails, changing nothing), drains
    /// backends that left every pool, re-activates ones that came back, swaps the snapshot, then
    /// stops listeners that were removed. Discovered pools keep the membership their sources
    /// last gave (see [`crate::discovery`]), and their discovery tasks follow the new config.
    pub async fn reload(self: &Arc<Self>, config: Config) -> Result<ReloadReport, ReloadError> {
        let _serialised = self.reload_lock.lock().await;
        let current = self.shared().snapshot.load_full();
        let config = self.discovery.merge(config, &current.config);
        if config.runtime != current.config.runtime
            || config.log_format != current.config.log_format
        {
            tracing::warn!(
                "[runtime] and log_format are read at start only; their change waits for a restart"
            );
        }
        let report = self.apply(config, Cause::Reload).await?;
        self.reconcile_discovery();
        Ok(report)
    }

    /// Applies one answer of pool `pool`'s discovery task of `epoch`: a changed membership goes
    /// through the reload path (the current config with that pool's backends replaced); a failed
    /// read, an ignored empty answer or an unchanged membership changes nothing but the source's
    /// state. The change is logged with its report and counted.
    pub(crate) async fn discovered(self: &Arc<Self>, pool: &str, epoch: u64, answer: Answer) {
        let _serialised = self.reload_lock.lock().await;
        let Some(found) = self.discovery.record(pool, epoch, answer, self.metrics()) else {
            return;
        };
        let old = self.shared().snapshot.load_full();
        let mut config = (*old.config).clone();
        let backends = discovery::backends_of(&config, pool, &found);
        let Some(pool_config) = config.pools.get_mut(pool) else {
            return;
        };
        let source = pool_config
            .discovery
            .as_ref()
            .map(|d| d.source.describe())
            .unwrap_or_default();
        let ramp = !pool_config.backends.is_empty();
        pool_config.backends = backends;
        match self.apply(config, Cause::Discovery { ramp }).await {
            Ok(report) if report.is_empty() => {}
            Ok(report) => {
                tracing::info!(pool, %source, changes = %report, "pool membership changed")
            }
            // Nothing to bind, so nothing can fail; kept honest all the same.
            Err(error) => tracing::error!(pool, %source, %error, "pool membership not applied"),
        }
    }

    /// Swaps in `config` (callers hold the reload lock): listeners first for a reload, then
    /// drains, the snapshot, slow start, health checks.
    async fn apply(
        self: &Arc<Self>,
        mut config: Config,
        cause: Cause,
    ) -> Result<ReloadReport, ReloadError> {
        let old = self.shared().snapshot.load_full();
        let fresh_secrets = config.keep_generated_secrets(&old.config);
        let report = ReloadReport::between(&old.config, &config);
        // A membership change leaves the listeners as they are: nothing to bind, nothing to stop.
        let new_listeners = match cause {
            Cause::Reload => match self.bind_new_listeners(&config).await {
                Ok(bound) => Some(bound),
                Err(source) => {
                    self.metrics().reload_failed();
                    let error = ReloadError::Bind {
                        path: config.path.clone(),
                        source,
                    };
                    tracing::error!(%error, "config reload failed, still serving the last good config");
                    return Err(error);
                }
            },
            Cause::Discovery { .. } => None,
        };

        // The snapshot is built first and swapped in right after the drains start: between the
        // two, requests still on the old snapshot see the leaving backends as unready, and the
        // Maglev tables they walk are not the ones the other instances settle on. Building the
        // tables (65,537 entries per pool) is the slow part, so it stays out of that window.
        let registry = &self.shared().registry;
        let snapshot = Snapshot::build(
            Arc::new(config),
            registry,
            &self.shared().metrics,
            Some(&old),
            &report.draining,
        );
        for address in &report.draining {
            let timeout = old
                .config
                .pools
                .values()
                .filter(|p| p.backends.iter().any(|b| b.address == *address))
                .map(|p| p.drain_timeout)
                .max()
                .unwrap_or(Duration::from_secs(30));
            if let Some(state) = registry.get(*address) {
                // A Retired one is being released already; nothing to drain.
                let _ = drain::start(&state, timeout, true, self.drain_end_hook());
            }
        }
        for address in all_backends(&snapshot.config) {
            if let Some(state) = registry.get(address) {
                drain::return_to_config(&state);
            }
        }
        // Connections made under the old TLS settings (or without TLS) were let go of by
        // `Snapshot::build`, before this store (`ConnPool::use_tls`).
        self.shared().snapshot.store(Arc::new(snapshot));
        // A backend new to the config starts cold: ramp it up where its pool asks for slow start.
        let old_addresses = all_backends(&old.config);
        let snapshot = self.shared().snapshot.load();
        let may_ramp = !matches!(cause, Cause::Discovery { ramp: false });
        for added in &report.backends_added {
            let ramps = may_ramp
                && snapshot
                    .pool(&added.pool)
                    .is_some_and(|p| p.config.slow_start.is_some());
            if ramps && !old_addresses.contains(&added.address) {
                if let Some(state) = registry.get(added.address) {
                    state.health.begin_slow_start();
                }
            }
        }
        drop(snapshot);
        self.reconcile_health_checks();
        crate::health::check_outages(self.shared(), None);
        if let Some(new_listeners) = new_listeners {
            self.adopt_listeners(new_listeners);
            self.stop_removed_listeners();
            self.metrics().reload_succeeded();
            tracing::info!(changes = %report, "config reloaded");
        }
        for pool in &fresh_secrets {
            warn_generated_secret(pool);
        }
        Ok(report)
    }

    /// Rebuilds the snapshot from the current config, dropping members whose drain has ended.
    pub(crate) async fn refresh(&self) {
        let _serialised = self.reload_lock.lock().await;
        let old = self.shared().snapshot.load_full();
        let snapshot = Snapshot::build(
            Arc::clone(&old.config),
            &self.shared().registry,
            &self.shared().metrics,
            Some(&old),
            &[],
        );
        self.shared().snapshot.store(Arc::new(snapshot));
        crate::health::check_outages(self.shared(), None);
    }

    /// What runs when a drain ends: count it, release a removed backend, drop it from the snapshot.
    pub(crate) fn drain_end_hook(
        self: &Arc<Self>,
    ) -> impl FnOnce(&Arc<BackendState>, &DrainOutcome) + Send + 'static {
        let server: Weak<Server> = Arc::downgrade(self);
        move |state, outcome| {
            let Some(server) = server.upgrade() else {
                return;
            };
            server
                .metrics()
                .drains
                .with_label_values(&[outcome.end])
                .inc();
            if state.status() == BackendStatus::Retired {
                server
                    .shared()
                    .registry
                    .remove_if_same(state.address(), state);
                let state = Arc::clone(state);
                tokio::spawn(async move {
                    server.refresh().await;
                    drop(state);
                });
            }
        }
    }

    /// Reloads whenever the config file changes on disk (debounced), until the server shuts down.
    ///
    /// The directory is watched, not the file, because editors and `kubectl` replace files by
    /// renaming a new one over them.
    pub fn watch_config_file(self: &Arc<Self>) -> notify::Result<()> {
        use notify::{RecursiveMode, Watcher};
        let path = self.shared().snapshot.load().config.path.clone();
        let file_name = path.file_name().map(|n| n.to_owned());
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_owned();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                let Ok(event) = event else { return };
                // `..data`: a Kubernetes ConfigMap or Secret volume, where the file is a symlink
                // through `..data`, which an update swaps by a rename.
                let ours = event.paths.iter().any(|p| {
                    let name = p.file_name();
                    name == file_name.as_deref() || name == Some(OsStr::new("..data"))
                });
                if let (true, Some(change)) = (ours, FileChange::of(&event.kind)) {
                    let _ = tx.send(change);
                }
            })?;
        watcher.watch(&dir, RecursiveMode::NonRecursive)?;
        let server = Arc::downgrade(self);
        let stop = self.shutdown_token();
        tokio::spawn(async move {
            let _watcher = watcher;
            loop {
                let mut change = tokio::select! {
                    _ = stop.cancelled() => return,
                    change = rx.recv() => match change {
                        Some(change) => change,
                        None => return,
                    },
                };
                // Writers often touch the file several times: read it once it has been quiet
                // for a while, a short one after a close or a rename, a long one while a write
                // is still open, so that a writer pausing mid-file is not read half-written.
                loop {
                    let quiet = match change {
                        FileChange::Settled => SETTLED_QUIET,
                        FileChange::Writing => WRITING_QUIET,
                    };
                    match tokio::time::timeout(quiet, rx.recv()).await {
                        Err(_) => break,
                        Ok(Some(next)) => change = next,
                        Ok(None) => return,
                    }
                }
                let Some(server) = server.upgrade() else {
                    return;
                };
                tracing::info!(path = %server.shared().snapshot.load().config.path.display(), "config file changed");
                let _ = server.reload_from_file().await;
            }
        });
        Ok(())
    }
}

/// How long the config file must be quiet after a close or a rename before it is read.
const SETTLED_QUIET: Duration = Duration::from_millis(200);
/// How long it must be quiet after a write while the writer still has it open: a writer that
/// never closes it (or a platform that reports no closes) is read after this.
const WRITING_QUIET: Duration = Duration::from_secs(2);

/// What a file event says of the config file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FileChange {
    /// Written and closed, or replaced (created, renamed into place, removed): whole.
    Settled,
    /// Written, and perhaps still being written.
    Writing,
}

impl FileChange {
    fn of(kind: &notify::EventKind) -> Option<FileChange> {
        use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind};
        match kind {
            EventKind::Access(AccessKind::Close(AccessMode::Write))
            | EventKind::Create(_)
            | EventKind::Remove(_)
            | EventKind::Modify(ModifyKind::Name(_)) => Some(FileChange::Settled),
            EventKind::Modify(_) | EventKind::Any | EventKind::Other => Some(FileChange::Writing),
            EventKind::Access(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(backends: &str) -> Config {
        let text = format!(
            "[[listeners]]\nlisten = \"127.0.0.1:0\"\n[pools.app]\nstrategy = \"round_robin\"\n\
             backends = [{backends}]\n"
        );
        Config::from_str(&text, Path::new("t.toml")).unwrap()
    }

    #[test]
    fn limit_changes_are_settings_but_removals_are_not() {
        let a = r#"{ address = "127.0.0.1:9001" }"#;
        let b = r#"{ address = "127.0.0.1:9002" }"#;
        let b_limited = r#"{ address = "127.0.0.1:9002", max_connections = 5 }"#;
        let both = config(&format!("{a}, {b}"));
        let removed = ReloadReport::between(&both, &config(a));
        assert_eq!(removed.backends_removed.len(), 1);
        assert!(!removed.other_changes, "{removed}");
        let limited = ReloadReport::between(&both, &config(&format!("{a}, {b_limited}")));
        assert!(limited.other_changes, "{limited}");
        assert_eq!(limited.to_string(), "settings changed");
    }

    #[test]
    fn a_change_of_limits_alone_is_reported() {
        let old = config(r#"{ address = "127.0.0.1:9001" }"#);
        let mut new = old.clone();
        new.limits.max_headers += 1;
        let report = ReloadReport::between(&old, &new);
        assert!(report.other_changes, "{report}");
        assert_eq!(report.to_string(), "settings changed");
    }
}
