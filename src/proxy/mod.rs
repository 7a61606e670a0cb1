//! The request path: route → pool → strategy → backend → forward → classify the error. Read
//! [`handle`] top to bottom.

mod body;
pub mod headers;
mod tunnel;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use hyper::body::{Body, Incoming};

pub use body::{Finish, ProxyBody};

use crate::backend::{SendError, UpstreamBody};
use crate::balance::{Affinity, Candidates, Choice, RequestFacts};
use crate::config::{PoolConfig, StrategyKind};
use crate::error::ProxyError;
use crate::metrics::MemberMetrics;
use crate::state::{Pool, Shared, Snapshot};

/// How many backends one request may be tried on: the first, and one retry on another backend when
/// nothing of the request reached the first.
const MAX_ATTEMPTS: usize = 2;

/// What the request path knows about the client connection.
#[derive(Debug, Clone, Copy)]
pub struct ConnInfo {
    /// The client's address.
    pub peer: SocketAddr,
    /// `http` or `https`, for `X-Forwarded-Proto`.
    pub proto: &'static str,
}

/// Proxies one request and always returns a response: the backend's, or a short error. The
/// response body carries the request's [`Record`], which counts the request in the metrics and
/// writes its access-log line when the body has been sent (or dropped).
pub async fn handle(
    shared: &Shared,
    conn: &ConnInfo,
    request: Request<Incoming>,
) -> Response<LoggedBody> {
    let snapshot = shared.snapshot.load_full();
    let mut record = Record {
        start: Instant::now(),
        client: conn.peer,
        // Cheap clones (reference-counted), so logging costs nothing when the access log is off.
        method: request.method().clone(),
        uri: request.uri().clone(),
        metrics: Arc::clone(shared.metrics.unrouted()),
        affinity: Affinity::None,
        status: 0,
        bytes: 0,
    };
    let response = match forward(&snapshot, conn, request, &mut record).await {
        Ok(response) => response,
        Err(error) => {
            if error.status().is_server_error() {
                tracing::warn!(error = %error, source = ?std::error::Error::source(&error), "proxy error");
            }
            error_response(&error)
        }
    };
    record.status = response.status().as_u16();
    response.map(|body| LoggedBody {
        inner: body,
        record,
    })
}

/// What is known about one request, recorded when its response has been sent.
#[derive(Debug)]
pub struct Record {
    start: Instant,
    client: SocketAddr,
    method: http::Method,
    uri: Uri,
    /// The (pool, backend) handles: unrouted, the pool's "no backend", or the chosen member's.
    metrics: Arc<MemberMetrics>,
    affinity: Affinity,
    status: u16,
    bytes: u64,
}

impl Drop for Record {
    fn drop(&mut self) {
        let elapsed = self.start.elapsed();
        self.metrics.request(self.status, elapsed.as_secs_f64());
        tracing::info!(
            target: "switchyard::access",
            client = %self.client,
            method = %self.method,
            path = self.uri.path(),
            status = self.status,
            pool = or_dash(self.metrics.pool_label()),
            backend = or_dash(self.metrics.backend_label()),
            bytes = self.bytes,
            duration_ms = elapsed.as_secs_f64() * 1000.0,
            affinity = self.affinity.as_str(),
        );
    }
}

fn or_dash(label: &str) -> &str {
    if label.is_empty() {
        "-"
    } else {
        label
    }
}

pin_project_lite::pin_project! {
    /// The response body as sent to the client, counting its bytes for the request's [`Record`].
    #[derive(Debug)]
    pub struct LoggedBody {
        #[pin]
        inner: ProxyBody,
        record: Record,
    }
}

impl Body for LoggedBody {
    type Data = bytes::Bytes;
    type Error = body::BodyError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, Self::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        if let std::task::Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                this.record.bytes += data.len() as u64;
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

async fn forward(
    snapshot: &Snapshot,
    conn: &ConnInfo,
    mut request: Request<Incoming>,
    record: &mut Record,
) -> Result<Response<ProxyBody>, ProxyError> {
    if request.version() == Version::HTTP_11
        && request.uri().authority().is_none()
        && !request.headers().contains_key(header::HOST)
    {
        return Err(ProxyError::BadRequest {
            reason: "missing Host header",
        });
    }
    let host = headers::request_host(request.uri(), request.headers());
    let pool = snapshot
        .route(host, request.uri().path())
        .ok_or_else(|| ProxyError::NoRoute {
            host: host.unwrap_or_default().to_owned(),
            path: request.uri().path().to_owned(),
        })?;
    record.metrics = Arc::clone(&pool.metrics.unplaced);

    let client_ip = if hashes_client_ip(&pool.config) {
        headers::client_ip(
            conn.peer.ip(),
            request.headers(),
            &pool.config.trusted_proxies,
        )
    } else {
        conn.peer.ip()
    };
    let upgrading =
        request.version() == Version::HTTP_11 && headers::wants_upgrade(request.headers());
    let client_upgrade = upgrading.then(|| hyper::upgrade::on(&mut request));
    let wants_cookies = pool.config.strategy == StrategyKind::Cookie;
    let (facts_headers, upstream) = upstream_request(request, conn, upgrading, wants_cookies)?;
    let facts = RequestFacts {
        client_ip,
        headers: &facts_headers,
    };

    let mut upstream = upstream;
    let mut tried = [usize::MAX; MAX_ATTEMPTS];
    let mut attempts = 0;
    let mut last_error = None;
    loop {
        let Some(choice) = choose(pool, &facts, &tried[..attempts]) else {
            // No other backend to retry on: the client hears why the one it had failed (502).
            return Err(last_error.unwrap_or_else(|| ProxyError::NoBackend {
                pool: pool.name().to_owned(),
            }));
        };
        let member = &pool.members[choice.index];
        record.metrics = Arc::clone(&pool.member_metrics[choice.index]);
        record.affinity = choice.affinity;
        pool.metrics.affinity(choice.affinity);
        let guard = member.state.start_request();
        if member.state.is_out_of_rotation() {
            // Its drain ended between the choice and the count: choose again.
            drop(guard);
            tried[attempts] = choice.index;
            attempts += 1;
            if attempts == MAX_ATTEMPTS {
                return Err(last_error.unwrap_or_else(|| ProxyError::NoBackend {
                    pool: pool.name().to_owned(),
                }));
            }
            continue;
        }
        let timeouts = &snapshot.config.timeouts;
        match member.state.pool.send(upstream, timeouts).await {
            Ok((mut response, pooled)) => {
                let switching = response.status() == StatusCode::SWITCHING_PROTOCOLS;
                headers::strip_hop_by_hop(response.headers_mut(), switching && upgrading);
                if let Some(cookie) = choice.set_cookie {
                    response.headers_mut().append(header::SET_COOKIE, cookie);
                }
                if switching {
                    let Some(client_upgrade) = client_upgrade else {
                        // Switching protocols the client never asked for cannot be relayed.
                        return Err(ProxyError::UnexpectedUpgrade {
                            backend: member.spec.address,
                        });
                    };
                    {
                        let backend_upgrade = hyper::upgrade::on(&mut response);
                        let websocket = response
                            .headers()
                            .get(header::UPGRADE)
                            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
                        let upgrade_guard = member.state.start_upgrade();
                        let cut = member.state.cut_signal();
                        tokio::spawn(tunnel::run(
                            client_upgrade,
                            backend_upgrade,
                            websocket,
                            upgrade_guard,
                            cut,
                        ));
                    }
                    // The connection now belongs to the tunnel; it never returns to the pool.
                    return Ok(response.map(|_| ProxyBody::empty()));
                }
                let finish = Finish {
                    guard,
                    conn: Some(pooled),
                };
                return Ok(response.map(|body| {
                    if body.is_end_stream() {
                        finish.complete();
                        ProxyBody::empty()
                    } else {
                        ProxyBody::upstream(body, finish, timeouts.idle)
                    }
                }));
            }
            Err(SendError::NotSent { request, error }) => {
                if matches!(
                    error,
                    ProxyError::Connect { .. } | ProxyError::ConnectTimeout { .. }
                ) {
                    pool.member_metrics[choice.index].connect_error();
                }
                tried[attempts] = choice.index;
                attempts += 1;
                if attempts == MAX_ATTEMPTS {
                    return Err(error);
                }
                pool.metrics.retry();
                tracing::debug!(error = %error, "retrying on another backend");
                upstream = *request;
                last_error = Some(error);
            }
            Err(SendError::Failed(error)) => return Err(error),
        }
    }
}

fn choose(pool: &Pool, facts: &RequestFacts<'_>, tried: &[usize]) -> Option<Choice> {
    let candidates = Candidates::new(&pool.members, pool.active, tried);
    pool.strategy.choose(facts, &candidates)
}

/// Rewrites the client's request for the backend: origin-form target, HTTP/1.1, hop-by-hop headers
/// removed, forwarding headers set, body streamed as it arrives. With `wants_cookies`, also returns
/// the client's `Cookie` headers for the strategy, which chooses after the request has moved.
fn upstream_request(
    request: Request<Incoming>,
    conn: &ConnInfo,
    upgrading: bool,
    wants_cookies: bool,
) -> Result<(http::HeaderMap, Request<UpstreamBody>), ProxyError> {
    let (mut parts, body) = request.into_parts();
    let mut cookies = http::HeaderMap::new();
    if wants_cookies {
        for value in parts.headers.get_all(header::COOKIE) {
            cookies.append(header::COOKIE, value.clone());
        }
    }
    let authority_host = parts
        .uri
        .authority()
        .map(|a| HeaderValue::from_str(a.as_str()))
        .transpose()
        .map_err(|_| ProxyError::BadRequest {
            reason: "invalid authority",
        })?;
    if let Some(host) = authority_host {
        // HTTP/2 and absolute-form requests carry the host in the target; HTTP/1.1 needs it in Host.
        parts.headers.insert(header::HOST, host);
    }
    // Authority-form (CONNECT) has no path: switchyard is not a forward proxy.
    let target = parts.uri.path_and_query().ok_or(ProxyError::BadRequest {
        reason: "invalid target",
    })?;
    parts.uri = Uri::try_from(target.as_str()).map_err(|_| ProxyError::BadRequest {
        reason: "invalid target",
    })?;
    parts.version = Version::HTTP_11;
    headers::strip_hop_by_hop(&mut parts.headers, upgrading);
    headers::strip_proxy_credentials(&mut parts.headers);
    let host = parts.headers.get(header::HOST).cloned();
    // Each hop appends the peer it talked to, not the client it resolved for hashing.
    headers::set_forwarded(
        &mut parts.headers,
        conn.peer.ip(),
        conn.proto,
        host.as_ref(),
    );
    Ok((
        cookies,
        Request::from_parts(parts, UpstreamBody::streaming(body)),
    ))
}

/// Whether the pool's placement hashes the client IP (so `trusted_proxies` matters).
fn hashes_client_ip(pool: &PoolConfig) -> bool {
    pool.strategy == StrategyKind::IpHash
        || (pool.strategy == StrategyKind::Cookie
            && pool
                .cookie
                .as_ref()
                .is_some_and(|c| c.fallback == StrategyKind::IpHash))
}

/// A short plain-text error response.
pub fn error_response(error: &ProxyError) -> Response<ProxyBody> {
    let mut response = Response::new(ProxyBody::local(error.body()));
    *response.status_mut() = error.status();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if error.status() == StatusCode::SERVICE_UNAVAILABLE {
        headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    if matches!(error, ProxyError::BadRequest { .. }) {
        headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}
