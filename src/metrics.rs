//! Metric names and handles in one place, registered in one Prometheus registry per server.
//!
//! The request path never looks a series up by its labels: each (pool, backend) pair and each pool
//! gets pre-resolved handles when a snapshot is built ([`MemberMetrics`], [`PoolMetrics`]), kept in
//! a table keyed by their labels so that counts carry over reloads, and removed with their series
//! once the pair leaves the snapshot (for a removed backend: when its drain has ended). Live gauges
//! (in-flight, state, up, upgraded connections) are read from the snapshot at scrape time, so the
//! request path does not maintain them at all.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock, Weak};

use prometheus::core::Collector;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::backend::BackendStatus;
use crate::balance::Affinity;
use crate::state::Shared;

/// Request duration buckets, 100 µs to 30 s.
const DURATION_BUCKETS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    10.0, 30.0,
];

/// Status codes whose `requests_total` series get a lock-free slot; others take the vector's lock.
const COMMON_CODES: [u16; 24] = [
    101, 200, 201, 202, 204, 206, 301, 302, 303, 304, 307, 308, 400, 401, 403, 404, 405, 409, 413,
    429, 500, 502, 503, 504,
];

/// The label vectors, shared by every handle so a handle can remove its own series.
#[derive(Debug)]
struct Vecs {
    requests: IntCounterVec,
    duration: HistogramVec,
    affinity: IntCounterVec,
    retries: IntCounterVec,
    connect_errors: IntCounterVec,
    health_changes: IntCounterVec,
    in_flight: IntGaugeVec,
    healthy: IntGaugeVec,
    state: IntGaugeVec,
    up: IntGaugeVec,
    upgraded: IntGaugeVec,
    downstream: IntGaugeVec,
    downstream_idle: IntGaugeVec,
    downstream_refused: IntCounterVec,
}

/// The server's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    vecs: Arc<Vecs>,
    /// `switchyard_config_reloads_total{result}`: `ok` or `error`.
    pub reloads: IntCounterVec,
    /// `switchyard_config_last_reload_success_timestamp_seconds`.
    pub last_reload_success: IntGauge,
    /// `switchyard_backend_drains_total{end}`: `drained`, `deadline` or `cancelled`.
    pub drains: IntCounterVec,
    /// `switchyard_discovery_updates_total{pool,result}`: `changed`, `unchanged`,
    /// `empty_ignored` or `error`.
    discovery_updates: IntCounterVec,
    /// `switchyard_discovery_source_up{pool}`: 1 while the pool's source answers.
    discovery_up: IntGaugeVec,
    members: Mutex<HashMap<(String, SocketAddr), Arc<MemberMetrics>>>,
    pools: Mutex<HashMap<String, Arc<PoolMetrics>>>,
    unrouted: Arc<MemberMetrics>,
    shared: OnceLock<Weak<Shared>>,
}

/// Pre-resolved handles for one backend of one pool (or, with an empty backend label, for requests
/// of a pool that reached no backend).
#[derive(Debug)]
pub struct MemberMetrics {
    pool: String,
    backend: String,
    vecs: Arc<Vecs>,
    duration: Histogram,
    codes: [OnceLock<IntCounter>; COMMON_CODES.len()],
    other_codes: Mutex<Vec<u16>>,
    connect_errors: Option<IntCounter>,
}

impl MemberMetrics {
    fn new(vecs: &Arc<Vecs>, pool: &str, backend: Option<SocketAddr>) -> Self {
        let backend_label = backend.map(|b| b.to_string()).unwrap_or_default();
        MemberMetrics {
            duration: vecs.duration.with_label_values(&[pool, &backend_label]),
            connect_errors: backend
                .map(|_| vecs.connect_errors.with_label_values(&[&backend_label])),
            pool: pool.to_owned(),
            backend: backend_label,
            vecs: Arc::clone(vecs),
            codes: std::array::from_fn(|_| OnceLock::new()),
            other_codes: Mutex::new(Vec::new()),
        }
    }

    /// Counts a finished request: its status code and how long it took, in seconds.
    pub fn request(&self, code: u16, seconds: f64) {
        self.duration.observe(seconds);
        let labels = |code: u16| [self.pool.clone(), self.backend.clone(), code.to_string()];
        match COMMON_CODES.iter().position(|&c| c == code) {
            Some(slot) => self.codes[slot]
                .get_or_init(|| {
                    let [p, b, c] = labels(code);
                    self.vecs.requests.with_label_values(&[&p, &b, &c])
                })
                .inc(),
            None => {
                let mut other = self.other_codes.lock().unwrap_or_else(|e| e.into_inner());
                if !other.contains(&code) {
                    other.push(code);
                }
                let [p, b, c] = labels(code);
                self.vecs.requests.with_label_values(&[&p, &b, &c]).inc();
            }
        }
    }

    /// The `pool` label (empty for requests that matched no route).
    pub fn pool_label(&self) -> &str {
        &self.pool
    }

    /// The `backend` label (empty when no backend was reached).
    pub fn backend_label(&self) -> &str {
        &self.backend
    }

    /// Counts a failed connection attempt to this backend.
    pub fn connect_error(&self) {
        if let Some(counter) = &self.connect_errors {
            counter.inc();
        }
    }

    fn remove_series(&self) {
        let mut used: Vec<u16> = COMMON_CODES
            .iter()
            .zip(&self.codes)
            .filter(|(_, slot)| slot.get().is_some())
            .map(|(code, _)| *code)
            .collect();
        used.extend(
            self.other_codes
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter(),
        );
        for code in used {
            let code = code.to_string();
            let _ = self
                .vecs
                .requests
                .remove_label_values(&[&self.pool, &self.backend, &code]);
        }
        let _ = self
            .vecs
            .duration
            .remove_label_values(&[&self.pool, &self.backend]);
    }
}

/// Pre-resolved handles for one pool.
#[derive(Debug)]
pub struct PoolMetrics {
    name: String,
    vecs: Arc<Vecs>,
    affinity: [IntCounter; 4],
    retries: IntCounter,
    /// Requests of this pool that reached no backend (503).
    pub unplaced: Arc<MemberMetrics>,
}

impl PoolMetrics {
    fn new(vecs: &Arc<Vecs>, name: &str) -> Self {
        let affinity = ["hit", "new", "reassigned", "invalid"]
            .map(|outcome| vecs.affinity.with_label_values(&[name, outcome]));
        PoolMetrics {
            name: name.to_owned(),
            vecs: Arc::clone(vecs),
            affinity,
            retries: vecs.retries.with_label_values(&[name]),
            unplaced: Arc::new(MemberMetrics::new(vecs, name, None)),
        }
    }

    /// Counts how a request's affinity cookie was used.
    pub fn affinity(&self, outcome: Affinity) {
        let slot = match outcome {
            Affinity::None => return,
            Affinity::Hit => 0,
            Affinity::New => 1,
            Affinity::Reassigned => 2,
            Affinity::Invalid => 3,
        };
        self.affinity[slot].inc();
    }

    /// Counts a retry on another backend.
    pub fn retry(&self) {
        self.retries.inc();
    }

    fn remove_series(&self) {
        for outcome in ["hit", "new", "reassigned", "invalid"] {
            let _ = self
                .vecs
                .affinity
                .remove_label_values(&[&self.name, outcome]);
        }
        let _ = self.vecs.retries.remove_label_values(&[&self.name]);
        self.unplaced.remove_series();
    }
}

/// Removes the series of `vec` (labelled by `backend` first) whose backend is not live.
fn remove_stale_backends(vec: &IntCounterVec, live: &[SocketAddr]) {
    let stale: Vec<Vec<String>> = vec
        .collect()
        .iter()
        .flat_map(|family| family.get_metric())
        .map(|m| {
            // Exposition order is by label name; `backend` sorts first in both vectors.
            m.get_label()
                .iter()
                .map(|l| l.value().to_owned())
                .collect::<Vec<_>>()
        })
        .filter(|labels| {
            labels
                .first()
                .is_some_and(|b| b.parse().is_ok_and(|b: SocketAddr| !live.contains(&b)))
        })
        .collect();
    for labels in stale {
        let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
        let _ = vec.remove_label_values(&labels);
    }
}

fn counter_vec(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric")
}

fn gauge_vec(name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric")
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let registry = Registry::new();
        let vecs = Arc::new(Vecs {
            requests: counter_vec(
                "switchyard_requests_total",
                "Requests answered, by pool, backend (empty: none reached) and status code.",
                &["pool", "backend", "code"],
            ),
            duration: HistogramVec::new(
                HistogramOpts::new(
                    "switchyard_request_duration_seconds",
                    "Time from request to the end of the response body.",
                )
                .buckets(DURATION_BUCKETS.to_vec()),
                &["pool", "backend"],
            )
            .expect("valid metric"),
            affinity: counter_vec(
                "switchyard_affinity_total",
                "Affinity cookie outcomes: hit, new, reassigned, invalid.",
                &["pool", "outcome"],
            ),
            retries: counter_vec(
                "switchyard_retries_total",
                "Requests retried on another backend.",
                &["pool"],
            ),
            connect_errors: counter_vec(
                "switchyard_upstream_connect_errors_total",
                "Failed or timed-out connection attempts to a backend.",
                &["backend"],
            ),
            health_changes: counter_vec(
                "switchyard_backend_health_changes_total",
                "Health changes of a backend: down, up, ejected, readmitted, unchecked.",
                &["backend", "change"],
            ),
            healthy: gauge_vec(
                "switchyard_backend_healthy",
                "1 when the backend is neither down (active checks) nor ejected (passive checks).",
                &["pool", "backend"],
            ),
            in_flight: gauge_vec(
                "switchyard_backend_in_flight",
                "Requests in flight to a backend (shared by every pool naming it).",
                &["pool", "backend"],
            ),
            state: gauge_vec(
                "switchyard_backend_state",
                "1 for the backend's current state, 0 for the others.",
                &["pool", "backend", "state"],
            ),
            up: gauge_vec(
                "switchyard_backend_up",
                "1 when the backend takes new requests: active (not draining) and healthy.",
                &["pool", "backend"],
            ),
            upgraded: gauge_vec(
                "switchyard_upgraded_connections",
                "Open upgraded (WebSocket) connections through a backend.",
                &["pool", "backend"],
            ),
            downstream: gauge_vec(
                "switchyard_downstream_connections",
                "Open client connections, by listener.",
                &["listener"],
            ),
            downstream_idle: gauge_vec(
                "switchyard_downstream_idle_connections",
                "Keep-alive client connections waiting for their next request, holding no \
                 HTTP/1 buffers, by listener.",
                &["listener"],
            ),
            downstream_refused: counter_vec(
                "switchyard_downstream_refused_total",
                "Client connections closed at once because the listener was at \
                 limits.max_connections.",
                &["listener"],
            ),
        });
        let reloads = counter_vec(
            "switchyard_config_reloads_total",
            "Config reloads by result.",
            &["result"],
        );
        let last_reload_success = IntGauge::new(
            "switchyard_config_last_reload_success_timestamp_seconds",
            "Unix time of the last successful config load.",
        )
        .expect("valid metric");
        let drains = counter_vec(
            "switchyard_backend_drains_total",
            "Backend drains ended, by how they ended.",
            &["end"],
        );
        let discovery_updates = counter_vec(
            "switchyard_discovery_updates_total",
            "Answers of a pool's discovery source: changed (membership applied), unchanged, \
             empty_ignored (no backends, without allow_empty) or error (not read).",
            &["pool", "result"],
        );
        let discovery_up = gauge_vec(
            "switchyard_discovery_source_up",
            "1 when the pool's discovery source answered its last read, 0 when it failed.",
            &["pool"],
        );
        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(vecs.requests.clone()),
            Box::new(vecs.duration.clone()),
            Box::new(vecs.affinity.clone()),
            Box::new(vecs.retries.clone()),
            Box::new(vecs.connect_errors.clone()),
            Box::new(vecs.health_changes.clone()),
            Box::new(vecs.healthy.clone()),
            Box::new(vecs.in_flight.clone()),
            Box::new(vecs.state.clone()),
            Box::new(vecs.up.clone()),
            Box::new(vecs.upgraded.clone()),
            Box::new(vecs.downstream.clone()),
            Box::new(vecs.downstream_idle.clone()),
            Box::new(vecs.downstream_refused.clone()),
            Box::new(reloads.clone()),
            Box::new(last_reload_success.clone()),
            Box::new(drains.clone()),
            Box::new(discovery_updates.clone()),
            Box::new(discovery_up.clone()),
        ];
        for collector in collectors {
            registry.register(collector).expect("unique metric names");
        }
        let unrouted = Arc::new(MemberMetrics::new(&vecs, "", None));
        Metrics {
            registry,
            vecs,
            reloads,
            last_reload_success,
            drains,
            discovery_updates,
            discovery_up,
            members: Mutex::new(HashMap::new()),
            pools: Mutex::new(HashMap::new()),
            unrouted,
            shared: OnceLock::new(),
        }
    }

    /// Lets scrapes read live gauges from the snapshot.
    pub(crate) fn attach(&self, shared: &Arc<Shared>) {
        let _ = self.shared.set(Arc::downgrade(shared));
    }

    /// Handles for requests that matched no route.
    pub fn unrouted(&self) -> &Arc<MemberMetrics> {
        &self.unrouted
    }

    /// Handles for `backend` in `pool`, the same ones for as long as the pair stays configured.
    pub(crate) fn member(&self, pool: &str, backend: SocketAddr) -> Arc<MemberMetrics> {
        let mut members = self.members.lock().unwrap_or_else(|e| e.into_inner());
        Arc::clone(
            members
                .entry((pool.to_owned(), backend))
                .or_insert_with(|| Arc::new(MemberMetrics::new(&self.vecs, pool, Some(backend)))),
        )
    }

    /// Handles for `pool`.
    pub(crate) fn pool(&self, name: &str) -> Arc<PoolMetrics> {
        let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        Arc::clone(
            pools
                .entry(name.to_owned())
                .or_insert_with(|| Arc::new(PoolMetrics::new(&self.vecs, name))),
        )
    }

    /// Drops the series of every pool and (pool, backend) pair not in `live`, so a removed backend's
    /// series disappear once it has left the snapshot.
    pub(crate) fn retain(&self, live_pools: &[&str], live_members: &[(&str, SocketAddr)]) {
        let mut members = self.members.lock().unwrap_or_else(|e| e.into_inner());
        members.retain(|(pool, backend), handles| {
            let keep = live_members.iter().any(|(p, b)| p == pool && b == backend);
            if !keep {
                handles.remove_series();
            }
            keep
        });
        let live_backends: Vec<SocketAddr> = live_members.iter().map(|(_, b)| *b).collect();
        for vec in [&self.vecs.connect_errors, &self.vecs.health_changes] {
            remove_stale_backends(vec, &live_backends);
        }
        let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        pools.retain(|name, handles| {
            let keep = live_pools.contains(&name.as_str());
            if !keep {
                handles.remove_series();
            }
            keep
        });
    }

    /// Counts a health change of `backend` (`down`, `up`, `ejected`, `readmitted`, `unchecked`).
    pub fn health_change(&self, backend: SocketAddr, change: &str) {
        self.vecs
            .health_changes
            .with_label_values(&[&backend.to_string(), change])
            .inc();
    }

    /// The open-connections gauge of the listener bound at `local`.
    pub fn downstream(&self, local: SocketAddr) -> IntGauge {
        self.vecs
            .downstream
            .with_label_values(&[&local.to_string()])
    }

    /// The idle-connections gauge of the listener bound at `local`: keep-alive connections
    /// parked between requests.
    pub fn downstream_idle(&self, local: SocketAddr) -> IntGauge {
        self.vecs
            .downstream_idle
            .with_label_values(&[&local.to_string()])
    }

    /// Forgets the series of a listener that was closed.
    pub(crate) fn remove_downstream(&self, local: SocketAddr) {
        let label = local.to_string();
        let _ = self.vecs.downstream.remove_label_values(&[&label]);
        let _ = self.vecs.downstream_idle.remove_label_values(&[&label]);
        let _ = self.vecs.downstream_refused.remove_label_values(&[&label]);
    }

    /// Counts a connection the listener bound at `local` closed at once, at its
    /// `max_connections`.
    pub(crate) fn downstream_refused(&self, local: Option<SocketAddr>) {
        let label = local.map(|l| l.to_string()).unwrap_or_default();
        self.vecs
            .downstream_refused
            .with_label_values(&[&label])
            .inc();
    }

    /// The Prometheus text exposition of every metric, live gauges read from the current snapshot.
    pub fn render(&self) -> String {
        self.refresh_live();
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding to a Vec cannot fail");
        String::from_utf8(out).expect("the text format is UTF-8")
    }

    fn refresh_live(&self) {
        let v = &self.vecs;
        for gauge in [&v.in_flight, &v.state, &v.up, &v.upgraded, &v.healthy] {
            gauge.reset();
        }
        let Some(shared) = self.shared.get().and_then(Weak::upgrade) else {
            return;
        };
        let snapshot = shared.snapshot.load();
        for pool in &snapshot.pools {
            for member in &pool.members {
                let (p, b) = (pool.name(), member.spec.address.to_string());
                let state = &member.state;
                v.in_flight
                    .with_label_values(&[p, &b])
                    .set(state.in_flight() as i64);
                v.upgraded
                    .with_label_values(&[p, &b])
                    .set(state.upgraded() as i64);
                v.up.with_label_values(&[p, &b])
                    .set(i64::from(state.is_ready()));
                v.healthy
                    .with_label_values(&[p, &b])
                    .set(i64::from(state.health.is_available()));
                let current = state.status();
                for status in [
                    BackendStatus::Active,
                    BackendStatus::Draining,
                    BackendStatus::Drained,
                ] {
                    v.state
                        .with_label_values(&[p, &b, status.as_str()])
                        .set(i64::from(current == status));
                }
            }
        }
    }

    /// Counts an answer of `pool`'s discovery source: `changed`, `unchanged`, `empty_ignored` or
    /// `error`.
    pub fn discovery_update(&self, pool: &str, result: &str) {
        self.discovery_updates
            .with_label_values(&[pool, result])
            .inc();
    }

    /// Whether `pool`'s discovery source answered its last read.
    pub fn discovery_source_up(&self, pool: &str, up: bool) {
        self.discovery_up
            .with_label_values(&[pool])
            .set(i64::from(up));
    }

    /// Drops the discovery series of a pool that is no longer discovered.
    pub(crate) fn remove_discovery(&self, pool: &str) {
        for result in ["changed", "unchanged", "empty_ignored", "error"] {
            let _ = self.discovery_updates.remove_label_values(&[pool, result]);
        }
        let _ = self.discovery_up.remove_label_values(&[pool]);
    }

    /// Records the config loaded at startup: the success timestamp only, since a start is not a
    /// reload.
    pub fn loaded(&self) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        self.last_reload_success.set(now);
    }

    /// Records that a reload applied a new config now.
    pub fn reload_succeeded(&self) {
        self.reloads.with_label_values(&["ok"]).inc();
        self.loaded();
    }

    /// Records a reload that changed nothing because the config was refused.
    pub fn reload_failed(&self) {
        self.reloads.with_label_values(&["error"]).inc();
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(metrics: &Metrics, name: &str) -> Option<String> {
        metrics.render().lines().find_map(|l| {
            l.strip_prefix(name)
                .and_then(|rest| rest.strip_prefix(' '))
                .map(str::to_owned)
        })
    }

    #[test]
    fn a_start_is_not_counted_as_a_reload() {
        let metrics = Metrics::new();
        metrics.loaded();
        let stamp = "switchyard_config_last_reload_success_timestamp_seconds";
        assert!(series(&metrics, stamp).is_some_and(|v| v != "0"));
        let ok = "switchyard_config_reloads_total{result=\"ok\"}";
        assert_eq!(series(&metrics, ok), None);

        metrics.reload_succeeded();
        metrics.reload_failed();
        metrics.reload_failed();
        assert_eq!(series(&metrics, ok).as_deref(), Some("1"));
        let error = "switchyard_config_reloads_total{result=\"error\"}";
        assert_eq!(series(&metrics, error).as_deref(), Some("2"));
    }

    #[test]
    fn member_series_count_codes_and_disappear_when_retired() {
        let metrics = Metrics::new();
        let backend: SocketAddr = "127.0.0.1:9001".parse().unwrap();
        let member = metrics.member("app", backend);
        member.request(200, 0.001);
        member.request(200, 0.002);
        member.request(418, 0.003);
        member.connect_error();
        let ok = r#"switchyard_requests_total{backend="127.0.0.1:9001",code="200",pool="app"}"#;
        let teapot = r#"switchyard_requests_total{backend="127.0.0.1:9001",code="418",pool="app"}"#;
        assert_eq!(series(&metrics, ok).as_deref(), Some("2"));
        assert_eq!(series(&metrics, teapot).as_deref(), Some("1"));
        // The same handles come back while the pair stays.
        assert!(Arc::ptr_eq(&member, &metrics.member("app", backend)));
        metrics.retain(&["app"], &[]);
        let text = metrics.render();
        assert!(!text.contains("127.0.0.1:9001"), "{text}");
    }
}
