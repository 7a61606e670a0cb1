//! The admin listener: the status page at `GET /`, `GET /status`, `POST /reload`, runtime drain and
//! undrain of a backend, and `GET /metrics`. State-changing endpoints accept only POST.
//!
//! With `[admin] token`, every request but the status page's HTML must carry
//! `Authorization: Bearer <token>`; the token is read from the current snapshot on each request,
//! so a reload that changes it applies to the next request.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde_json::json;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::backend::BackendStatus;
use crate::balance::Member;
use crate::discovery::DiscoveryStatus;
use crate::drain;
use crate::reload::ReloadError;
use crate::server::Server;

/// Accepts admin connections until `stop` is cancelled.
pub(crate) async fn serve(server: Arc<Server>, listener: TcpListener, stop: CancellationToken) {
    loop {
        let (stream, _) = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let server = Arc::clone(&server);
        let stop = stop.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let server = Arc::clone(&server);
                async move { Ok::<_, Infallible>(handle(&server, request).await) }
            });
            let connection = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
            tokio::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                _ = stop.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                }
            }
        });
    }
}

type AdminResponse = Response<Full<Bytes>>;

/// The status page: static HTML, CSS and JS in one file, filled in from `/status` by the browser.
const STATUS_PAGE: &str = include_str!("status.html");

/// Inline script and style only (the page has no other kind), requests to this origin only, and no
/// framing, so the page cannot be made to load or leak anything elsewhere.
const STATUS_PAGE_CSP: &str = "default-src 'none'; script-src 'unsafe-inline'; \
    style-src 'unsafe-inline'; connect-src 'self'; img-src 'none'; base-uri 'none'; \
    form-action 'none'; frame-ancestors 'none'";

async fn handle(server: &Arc<Server>, request: Request<Incoming>) -> AdminResponse {
    let path = request.uri().path().to_owned();
    let query = request.uri().query().unwrap_or("").to_owned();
    let method = request.method().clone();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    // The page's HTML is served without the token: a browser's address bar cannot send a header,
    // and the HTML holds no data. The page takes the token from its URL fragment, which the
    // browser never sends, and presents it on its own `/status` requests, which do need it.
    if segments == [""] {
        return only(&method, "GET", status_page);
    }
    if !authorized(server, request.headers()) {
        return unauthorized();
    }
    match segments.as_slice() {
        ["status"] => only(&method, "GET", || {
            json_response(StatusCode::OK, &status(server))
        }),
        ["metrics"] => only(&method, "GET", || {
            let mut response = Response::new(Full::new(Bytes::from(server.metrics().render())));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            response
        }),
        ["reload"] => {
            if method != Method::POST {
                return method_not_allowed("POST");
            }
            match server.reload_from_file().await {
                Ok(report) => json_response(
                    StatusCode::OK,
                    &json!({ "ok": true, "summary": report.to_string(), "changes": report }),
                ),
                Err(error) => {
                    let status = match error {
                        ReloadError::Config(_) => StatusCode::BAD_REQUEST,
                        ReloadError::Bind { .. } => StatusCode::CONFLICT,
                    };
                    json_response(status, &json!({ "ok": false, "error": error.to_string() }))
                }
            }
        }
        ["pools", pool, "backends", address, action @ ("drain" | "undrain")] => {
            if method != Method::POST {
                return method_not_allowed("POST");
            }
            runtime_drain(server, pool, address, action, &query).await
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

async fn runtime_drain(
    server: &Arc<Server>,
    pool_name: &str,
    address: &str,
    action: &str,
    query: &str,
) -> AdminResponse {
    let snapshot = server.shared().snapshot.load_full();
    let Some(pool) = snapshot.pool(pool_name) else {
        return text(StatusCode::NOT_FOUND, "no such pool\n");
    };
    let address = address.replace("%5B", "[").replace("%5D", "]");
    let Ok(address) = address.parse::<SocketAddr>() else {
        return text(StatusCode::BAD_REQUEST, "backend must be IP:port\n");
    };
    let Some(member) = pool.members.iter().find(|m| m.spec.address == address) else {
        return text(StatusCode::NOT_FOUND, "no such backend in this pool\n");
    };
    let state = Arc::clone(&member.state);
    if action == "undrain" {
        if drain::undrain(&state).is_err() {
            return text(
                StatusCode::CONFLICT,
                "backend was removed from the config; add it back to proxy.toml instead\n",
            );
        }
        return json_response(
            StatusCode::OK,
            &backend_json(member, pool.config.slow_start),
        );
    }
    let wait = match parse_wait(query) {
        Ok(wait) => wait,
        Err(message) => return text(StatusCode::BAD_REQUEST, message),
    };
    let started = match drain::start(
        &state,
        pool.config.drain_timeout,
        false,
        server.drain_end_hook(),
    ) {
        Ok(started) => started,
        Err(BackendStatus::Drained) => {
            return json_response(
                StatusCode::OK,
                &backend_json(member, pool.config.slow_start),
            )
        }
        // Retired since this snapshot was loaded: it has left the pool.
        Err(_) => return text(StatusCode::NOT_FOUND, "no such backend in this pool\n"),
    };
    let mut done = started.done.clone();
    let finished = match wait {
        Some(wait) => tokio::time::timeout(wait, done.wait_for(|d| d.is_some()))
            .await
            .ok()
            .and_then(|r| r.ok().and_then(|d| d.clone())),
        None => None,
    };
    match finished {
        Some(outcome) => json_response(
            StatusCode::OK,
            &json!({ "address": address, "state": state.status(), "drain": outcome }),
        ),
        None => json_response(
            StatusCode::ACCEPTED,
            &backend_json(member, pool.config.slow_start),
        ),
    }
}

fn parse_wait(query: &str) -> Result<Option<Duration>, &'static str> {
    for pair in query.split('&') {
        if let Some(value) = pair.strip_prefix("wait=") {
            return humantime::parse_duration(value)
                .map(Some)
                .map_err(|_| "wait must be a duration such as 30s\n");
        }
    }
    Ok(None)
}

/// The `/status` document.
#[derive(Debug, Serialize)]
struct Status {
    pools: Vec<PoolStatus>,
}

#[derive(Debug, Serialize)]
struct PoolStatus {
    name: String,
    strategy: &'static str,
    /// For a discovered pool: its source and what it last did; `null` for a listed pool.
    discovery: Option<DiscoveryStatus>,
    /// Gone from the config, listed only while backends it had still drain.
    removed: bool,
    backends: Vec<serde_json::Value>,
}

fn status(server: &Server) -> Status {
    let snapshot = server.shared().snapshot.load();
    Status {
        pools: snapshot
            .pools
            .iter()
            .map(|pool| PoolStatus {
                name: pool.name().to_owned(),
                strategy: pool.config.strategy.as_str(),
                discovery: server.discovery.status(pool.name()),
                removed: pool.removed,
                backends: pool
                    .members
                    .iter()
                    .map(|m| backend_json(m, pool.config.slow_start))
                    .collect(),
            })
            .collect(),
    }
}

fn backend_json(member: &Member, slow_start: Option<Duration>) -> serde_json::Value {
    let state = &member.state;
    let drain = state.drain();
    json!({
        "address": state.address(),
        "tls": member.spec.tls.as_ref().map(|tls| tls.host.as_str()),
        "weight": member.spec.weight,
        "max_connections": member.spec.max_connections,
        "state": state.status(),
        "health": state.health.view(slow_start),
        "in_flight": state.in_flight(),
        "upgraded": state.upgraded(),
        "requests": state.requests(),
        "drain_removed": drain.as_ref().map(|d| d.removed),
        "drain_time_left_s": drain
            .as_ref()
            .map(|d| d.deadline.saturating_duration_since(Instant::now()).as_secs_f64()),
    })
}

/// Whether `headers` carry the admin token, or no token is configured.
fn authorized(server: &Server, headers: &HeaderMap) -> bool {
    let snapshot = server.shared().snapshot.load();
    let Some(token) = snapshot
        .config
        .admin
        .as_ref()
        .and_then(|a| a.token.as_ref())
    else {
        return true;
    };
    let Some(presented) = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| bearer(value.as_bytes()))
    else {
        return false;
    };
    // Comparing digests makes both sides 32 bytes, so the time taken reveals neither the token's
    // length nor how many of its leading bytes a guess got right.
    Sha256::digest(presented)
        .ct_eq(&Sha256::digest(token.expose()))
        .into()
}

/// The credentials of an `Authorization: Bearer …` value; the scheme is case-insensitive (RFC 9110).
fn bearer(value: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = value.split_at_checked(b"bearer ".len())?;
    scheme
        .eq_ignore_ascii_case(b"bearer ")
        .then(|| rest.trim_ascii())
}

fn unauthorized() -> AdminResponse {
    let mut response = text(
        StatusCode::UNAUTHORIZED,
        "the admin API needs Authorization: Bearer <token>\n",
    );
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"switchyard admin\""),
    );
    response
}

fn status_page() -> AdminResponse {
    let mut response = Response::new(Full::new(Bytes::from_static(STATUS_PAGE.as_bytes())));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(STATUS_PAGE_CSP),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

fn only(
    method: &Method,
    allowed: &'static str,
    respond: impl FnOnce() -> AdminResponse,
) -> AdminResponse {
    if method.as_str() == allowed {
        respond()
    } else {
        method_not_allowed(allowed)
    }
}

fn method_not_allowed(allow: &'static str) -> AdminResponse {
    let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
    response
        .headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    response
}

fn text(status: StatusCode, body: &'static str) -> AdminResponse {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

fn json_response(status: StatusCode, value: &impl Serialize) -> AdminResponse {
    let body = serde_json::to_vec_pretty(value).expect("status documents serialise");
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}
