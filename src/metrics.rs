//! Metric names and handles in one place, registered in one Prometheus registry per server.

use prometheus::{Encoder, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};

/// The server's metrics.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    /// `switchyard_config_reloads_total{result}`: `ok` or `error`.
    pub reloads: IntCounterVec,
    /// `switchyard_config_last_reload_success_timestamp_seconds`.
    pub last_reload_success: IntGauge,
    /// `switchyard_backend_drains_total{end}`: `drained`, `deadline` or `cancelled`.
    pub drains: IntCounterVec,
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let registry = Registry::new();
        let reloads = IntCounterVec::new(
            Opts::new(
                "switchyard_config_reloads_total",
                "Config reloads by result.",
            ),
            &["result"],
        )
        .expect("valid metric");
        let last_reload_success = IntGauge::new(
            "switchyard_config_last_reload_success_timestamp_seconds",
            "Unix time of the last successful config load.",
        )
        .expect("valid metric");
        let drains = IntCounterVec::new(
            Opts::new(
                "switchyard_backend_drains_total",
                "Backend drains ended, by how they ended.",
            ),
            &["end"],
        )
        .expect("valid metric");
        for collector in [
            Box::new(reloads.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(last_reload_success.clone()),
            Box::new(drains.clone()),
        ] {
            registry.register(collector).expect("unique metric names");
        }
        Metrics {
            registry,
            reloads,
            last_reload_success,
            drains,
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding to a Vec cannot fail");
        String::from_utf8(out).expect("the text format is UTF-8")
    }

    /// Records the config loaded at startup: the success timestamp only, since a start is not a
    /// reload.
    pub fn loaded(&self) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        self.last_reload_success.set(now);
    }

    /// Records a reload that was applied, now.
    pub fn reload_succeeded(&self) {
        self.reloads.with_label_values(&["ok"]).inc();
        self.loaded();
    }

    /// Records a reload that changed nothing (invalid file, or a listener that could not be bound).
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
}
