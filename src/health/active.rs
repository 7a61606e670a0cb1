//! Active health checks: one task per checked backend address, sending an HTTP GET every
//! `interval` on a fresh connection, and the supervisor that starts and stops those tasks as
//! reloads change which addresses are checked and how.

use std::collections::{HashMap, HashSet};
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
use crate::backend::BackendState;
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
    /// Addresses that left the config while checked: their last verdict stays while they drain.
    kept: Mutex<HashSet<SocketAddr>>,
}

impl Checks {
    /// Makes the running checkers match `config`: one per backend of every pool with a
    /// `[health]` table. Checkers whose settings changed restart (the backend keeps its health).
    /// For a backend that stays in the config but is no longer checked, what the checks decided
    /// is dropped; for one that left the config, the verdict stays for as long as it drains (a
    /// dead backend stays down for its sticky clients). `stop` (the server's shutdown) stops all.
    pub(crate) fn reconcile(
        &self,
        shared: &Arc<Shared>,
        config: &Config,
        stop: &CancellationToken,
    ) {
        // Validation guarantees one health config per address.
        let mut wanted: HashMap<SocketAddr, &HealthConfig> = HashMap::new();
        let mut in_config: HashSet<SocketAddr> = HashSet::new();
        for pool in config.pools.values() {
            for backend in &pool.backends {
                in_config.insert(backend.address);
                if let Some(health) = &pool.health {
                    wanted.entry(backend.address).or_insert(health);
                }
            }
        }
        let forget = |address: SocketAddr| {
            if let Some(state) = shared.registry.get(address) {
                if state.health.forget_checks() {
                    report(shared, &state, &Change::Unchecked);
                }
            }
        };
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        let mut kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
        running.retain(|address, checker| {
            let keep = wanted.get(address).is_some_and(|c| **c == checker.config);
            if !keep {
                checker.stop.cancel();
                if !wanted.contains_key(address) {
                    if in_config.contains(address) {
                        forget(*address);
                    } else if let Some(state) = shared.registry.get(*address) {
                        state.health.stop_checks();
                        kept.insert(*address);
                    }
                }
            }
            keep
        });
        kept.retain(|address| {
            if wanted.contains_key(address) {
                // A new checker takes over below.
                return false;
            }
            if in_config.contains(address) {
                // Back in a pool without checks: nothing will revise the verdict, so drop it.
                forget(*address);
                return false;
            }
            shared.registry.get(*address).is_some()
        });
        for (address, health) in wanted {
            if running.contains_key(&address) {
                continue;
            }
            let Some(state) = shared.registry.get(address) else {
                continue;
            };
            let epoch = state.health.start_checks();
            let token = stop.child_token();
            tokio::spawn(run(
                Arc::downgrade(shared),
                state,
                epoch,
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

/// Checks `state`'s backend until `stop`: the first check at once, then every `interval` after
/// the last one ended. Its verdicts are written only while it is the checker of `epoch`.
async fn run(
    shared: Weak<Shared>,
    state: Arc<BackendState>,
    epoch: u64,
    config: HealthConfig,
    stop: CancellationToken,
) {
    let address = state.address();
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
        let passed = outcome.passed;
        if passed {
            failures = 0;
            passes = passes.saturating_add(1);
        } else {
            tracing::debug!(backend = %address, reason = %outcome.result, "health check failed");
            passes = 0;
            failures = failures.saturating_add(1);
        }
        let reason = outcome.result.clone();
        let verdict = state.health.as_checker(epoch, || {
            let since_ejection = state.health.record_check(outcome);
            let mut changes = Vec::new();
            if passed {
                if passes >= config.healthy_threshold && state.health.mark_up() {
                    changes.push(Change::Up);
                }
                if since_ejection >= config.healthy_threshold
                    && state.health.is_ejected()
                    && state.health.readmit(Some(state.health.generation()))
                {
                    changes.push(Change::Readmitted { by: "checks" });
                }
            } else if failures >= config.unhealthy_threshold && state.health.mark_down() {
                changes.push(Change::Down { reason });
            }
            changes
        });
        // Stopped or replaced meanwhile: another checker, or none, decides now.
        let Some(changes) = verdict else {
            return;
        };
        for change in &changes {
            report(&shared, &state, change);
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
