//! Active health checks: one task per checked backend address, sending an HTTP GET every
//! `interval` on a fresh connection, and the supervisor that starts and stops those tasks as
//! reloads change which addresses are checked and how.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, Weak};

use bytes::Bytes;
use http::header::{CONNECTION, HOST, USER_AGENT};
use http::{HeaderValue, Request};
use http_body_util::Empty;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::{report, Change, CheckOutcome};
use crate::config::{Config, HealthConfig};
use crate::state::Shared;

/// A running checker.
#[derive(Debug)]
struct Running {
    config: HealthConfig,
    stop: CancellationToken,
}

/// The checkers, by backend address.
#[derive(Debug, Default)]
pub struct Checks {
    running: Mutex<HashMap<SocketAddr, Running>>,
}

impl Checks {
    /// Makes the running checkers match `config`: one per backend of every pool with a
    /// `[health]` table. Checkers whose settings changed restart (the backend keeps its health);
    /// checkers of addresses no longer checked stop, and what they decided is dropped.
    /// `stop` (the server's shutdown) stops them all.
    pub(crate) fn reconcile(
        &self,
        shared: &Arc<Shared>,
        config: &Config,
        stop: &CancellationToken,
    ) {
        // Validation guarantees one health config per address.
        let mut wanted: HashMap<SocketAddr, &HealthConfig> = HashMap::new();
        for pool in config.pools.values() {
            if let Some(health) = &pool.health {
                for backend in &pool.backends {
                    wanted.entry(backend.address).or_insert(health);
                }
            }
        }
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        running.retain(|address, checker| {
            let keep = wanted.get(address).is_some_and(|c| **c == checker.config);
            if !keep {
                checker.stop.cancel();
                if !wanted.contains_key(address) {
                    if let Some(state) = shared.registry.get(*address) {
                        if state.health.forget_checks() {
                            report(shared, &state, &Change::Unchecked);
                        }
                    }
                }
            }
            keep
        });
        for (address, health) in wanted {
            if running.contains_key(&address) {
                continue;
            }
            if let Some(state) = shared.registry.get(address) {
                state.health.set_checked(true);
            }
            let token = stop.child_token();
            tokio::spawn(run(
                Arc::downgrade(shared),
                address,
                health.clone(),
                token.clone(),
            ));
            running.insert(
                address,
                Running {
                    config: health.clone(),
                    stop: token,
                },
            );
        }
    }
}

/// Checks `address` until `stop`: the first check at once, then every `interval` after the last
/// one ended.
async fn run(
    shared: Weak<Shared>,
    address: SocketAddr,
    config: HealthConfig,
    stop: CancellationToken,
) {
    let mut passes = 0u32;
    let mut failures = 0u32;
    loop {
        let outcome = tokio::select! {
            () = stop.cancelled() => return,
            outcome = probe(address, &config) => outcome,
        };
        let Some(shared) = shared.upgrade() else {
            return;
        };
        // Looked up each time: a backend removed and added back gets fresh state.
        if let Some(state) = shared.registry.get(address) {
            state.health.set_checked(true);
            let passed = outcome.passed;
            let reason = outcome.result.clone();
            let since_ejection = state.health.record_check(outcome);
            if passed {
                failures = 0;
                passes = passes.saturating_add(1);
                if passes >= config.healthy_threshold && state.health.mark_up() {
                    report(&shared, &state, &Change::Up);
                }
                if since_ejection >= config.healthy_threshold
                    && state.health.is_ejected()
                    && state.health.readmit(Some(state.health.generation()))
                {
                    report(&shared, &state, &Change::Readmitted { by: "checks" });
                }
            } else {
                passes = 0;
                failures = failures.saturating_add(1);
                tracing::debug!(backend = %address, reason = %reason, "health check failed");
                if failures >= config.unhealthy_threshold && state.health.mark_down() {
                    report(&shared, &state, &Change::Down { reason });
                }
            }
        }
        drop(shared);
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(config.interval) => {}
        }
    }
}

/// One check: connect, `GET path`, and compare the response status, all within `timeout`.
pub async fn probe(address: SocketAddr, config: &HealthConfig) -> CheckOutcome {
    let exchange = async {
        let stream = TcpStream::connect(address)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let (mut sender, conn) = http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        let conn = tokio::spawn(conn);
        let host = match &config.host {
            Some(host) => HeaderValue::from_str(host),
            None => HeaderValue::from_str(&address.to_string()),
        }
        .map_err(|e| format!("host: {e}"))?;
        let request = Request::get(config.path.as_str())
            .header(HOST, host)
            .header(USER_AGENT, "switchyard-health-check")
            .header(CONNECTION, "close")
            .body(Empty::new())
            .map_err(|e| format!("request: {e}"))?;
        let response = sender.send_request(request).await;
        // The status is all a check reads; the body and the connection are dropped.
        conn.abort();
        response
            .map(|r| r.status().as_u16())
            .map_err(|e| format!("request: {e}"))
    };
    match tokio::time::timeout(config.timeout, exchange).await {
        Err(_) => CheckOutcome {
            passed: false,
            result: format!(
                "timed out after {}",
                humantime::format_duration(config.timeout)
            ),
        },
        Ok(Err(error)) => CheckOutcome {
            passed: false,
            result: error,
        },
        Ok(Ok(status)) => CheckOutcome {
            passed: config.expects(status),
            result: status.to_string(),
        },
    }
}
