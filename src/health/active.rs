//! Active health checks: one task per checked backend address, sending an HTTP/1.1 GET every
//! `interval` on a fresh connection (over TLS for an `https://` backend, verified like requests),
//! and the supervisor that starts and stops those tasks as reloads change which addresses are
//! checked and how.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, Weak};

use bytes::Bytes;
use http::header::{CONNECTION, HOST, USER_AGENT};
use http::{HeaderValue, Request};
use http_body_util::Empty;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;

use super::{report, Change, CheckOutcome};
use crate::backend::BackendState;
use crate::config::{Config, HealthConfig, UpstreamTls};
use crate::state::Shared;

/// A running checker.
#[derive(Debug)]
struct Running {
    config: HealthConfig,
    tls: Option<UpstreamTls>,
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
        // Validation guarantees one health config and one TLS setting per address.
        let mut wanted: HashMap<SocketAddr, (&HealthConfig, Option<&UpstreamTls>)> = HashMap::new();
        let mut in_config: HashSet<SocketAddr> = HashSet::new();
        for pool in config.pools.values() {
            for backend in &pool.backends {
                in_config.insert(backend.address);
                if let Some(health) = &pool.health {
                    wanted
                        .entry(backend.address)
                        .or_insert((health, backend.tls.as_ref()));
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
            let keep = wanted
                .get(address)
                .is_some_and(|(c, tls)| **c == checker.config && *tls == checker.tls.as_ref());
            if !keep {
                checker.stop.cancel();
                // No longer checked: the verdict is kept for now; below, it is dropped at once if
                // the address stays in the config, kept while it drains otherwise.
                if !wanted.contains_key(address) {
                    if let Some(state) = shared.registry.get(*address) {
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
        for (address, (health, tls)) in wanted {
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
                tls.cloned(),
                token.clone(),
            ));
            running.insert(
                address,
                Running {
                    config: health.clone(),
                    tls: tls.cloned(),
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
    tls: Option<UpstreamTls>,
    stop: CancellationToken,
) {
    let address = state.address();
    let mut passes = 0u32;
    let mut failures = 0u32;
    loop {
        let outcome = tokio::select! {
            () = stop.cancelled() => return,
            outcome = probe(address, &config, tls.as_ref()) => outcome,
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

/// One check: connect (and shake hands, for an `https://` backend), `GET path`, and compare the
/// response status, all within `timeout`. The `Host` header is the check's `host`, else the
/// backend's `HOST:port` for https, else its `IP:port`.
pub async fn probe(
    address: SocketAddr,
    config: &HealthConfig,
    tls: Option<&UpstreamTls>,
) -> CheckOutcome {
    let exchange = async {
        let stream = TcpStream::connect(address)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let host = match (&config.host, tls) {
            (Some(host), _) => HeaderValue::from_str(host),
            (None, Some(tls)) => HeaderValue::from_str(tls.authority.as_str()),
            (None, None) => HeaderValue::from_str(&address.to_string()),
        }
        .map_err(|e| format!("host: {e}"))?;
        match tls {
            None => get(stream, host, &config.path).await,
            Some(tls) => {
                let stream = TlsConnector::from(Arc::clone(&tls.client_http1))
                    .connect(tls.server_name.clone(), stream)
                    .await
                    .map_err(|e| format!("TLS: {e}"))?;
                get(stream, host, &config.path).await
            }
        }
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

/// `GET path` with `Connection: close` over `io`; the response's status.
async fn get<I>(io: I, host: HeaderValue, path: &str) -> Result<u16, String>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = http1::handshake::<_, Empty<Bytes>>(TokioIo::new(io))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let conn = tokio::spawn(conn);
    let request = Request::get(path)
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
}
