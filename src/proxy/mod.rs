//! The request path: route → pool → strategy → backend → forward → classify the error. Read
//! [`handle`] top to bottom.

mod body;
pub mod headers;
mod redirect;
mod tunnel;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use hyper::body::{Body, Incoming};

pub use body::{BodyWatch, Finish, ProxyBody};
pub use redirect::HttpsRedirect;
pub use tunnel::Tunnels;

use crate::backend::{SendError, UpstreamBody};
use crate::balance::{Affinity, RequestFacts};
use crate::config::{Limits, PoolConfig, StrategyKind};
use crate::error::ProxyError;
use crate::health;
use crate::metrics::MemberMetrics;
use crate::server::framing::Rejection;
use crate::server::ListenerCount;
use crate::state::{Pool, Shared, Snapshot};

/// What the request path knows about the client connection.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// The client's address.
    pub peer: SocketAddr,
    /// The client's IP as an `X-Forwarded-For` entry, formatted once for the connection.
    pub peer_ip: HeaderValue,
    /// `http` or `https`, for `X-Forwarded-Proto`.
    pub proto: &'static str,
    /// Set on a plain listener with `redirect_https`: every request is redirected, none proxied.
    pub redirect: Option<HttpsRedirect>,
    /// The listener's count of open connections, which an upgraded connection stays in.
    pub(crate) listener: ListenerCount,
}

/// Proxies one request and always returns a response: the backend's, or a short error. The
/// response body carries the request's [`Record`], which counts the request in the metrics and
/// writes its access-log line when the body has been sent (or dropped).
///
/// A request whose HTTP/1 head was refused below hyper carries the [`Rejection`] as an
/// extension, and is answered with it.
pub async fn handle(
    shared: &Arc<Shared>,
    conn: &ConnInfo,
    mut request: Request<Incoming>,
) -> Response<LoggedBody> {
    let snapshot = shared.snapshot.load_full();
    let rejection = request.extensions_mut().remove::<Rejection>();
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
    if rejection.is_some() {
        // The request is a stand-in for a head that was never handed on: log none of it.
        record.method = http::Method::from_bytes(b"-").unwrap_or_default();
        record.uri = Uri::from_static("*");
    }
    let admitted = match rejection {
        Some(rejection) => Err(ProxyError::from(rejection)),
        None => admit(&request, &snapshot.config.limits),
    };
    let result = match (admitted, conn.redirect) {
        (Err(error), _) => Err(error),
        (Ok(()), Some(redirect)) => redirect.respond(request.uri(), request.headers()),
        // Not boxed: it lives in the room hyper keeps for one request future per HTTP/1
        // connection, allocated once per hyper connection rather than once per request (3 KB).
        // An idle keep-alive connection lets go of hyper's connection, room included (see
        // `server::framing`), so it does not hold it.
        (Ok(()), None) => forward(shared, &snapshot, conn, request, &mut record).await,
    };
    let response = match result {
        Ok(response) => response,
        Err(error) => {
            // A pool with nothing available is logged when that starts and ends (see `health`),
            // not for each request it turns away.
            if error.status().is_server_error() && !matches!(error, ProxyError::NoBackend { .. }) {
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

/// The limits every request is held to before anything else, HTTP/1 or HTTP/2: its field count
/// (HTTP/1 heads were counted below hyper already) and the length its body declares.
fn admit(request: &Request<Incoming>, limits: &Limits) -> Result<(), ProxyError> {
    if request.headers().len() > limits.max_headers {
        return Err(Rejection::TooManyHeaders.into());
    }
    if let Some(limit) = limits.max_body_bytes {
        // A Content-Length (or an HTTP/2 content-length) over the limit is refused before any
        // backend is contacted; a body of unknown length is cut as it grows past it.
        if request.body().size_hint().lower() > limit {
            return Err(ProxyError::BodyTooLarge { limit });
        }
    }
    Ok(())
}

async fn forward(
    shared: &Arc<Shared>,
    snapshot: &Arc<Snapshot>,
    conn: &ConnInfo,
    mut request: Request<Incoming>,
    record: &mut Record,
) -> Result<Response<ProxyBody>, ProxyError> {
    headers::check_host(request.version(), request.headers())
        .and_then(|()| headers::check_authority(request.uri()))
        .map_err(|reason| ProxyError::BadRequest { reason })?;
    let host = headers::request_host(request.uri(), request.headers());
    let pool_index = snapshot
        .route_index(host, request.uri().path())
        .ok_or_else(|| ProxyError::NoRoute {
            host: host.unwrap_or_default().to_owned(),
            path: request.uri().path().to_owned(),
        })?;
    let pool = &snapshot.pools[pool_index];
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
    let max_body = snapshot.config.limits.max_body_bytes;
    let (cookies, upstream) = upstream_request(request, conn, upgrading, wants_cookies, max_body)?;
    let facts = RequestFacts {
        client_ip,
        cookies: cookies.as_slice(),
    };
    let retries = pool.config.retries;
    // Whether the request may be sent again after an answer or a failure: safe to repeat, and no
    // body (a body is streamed, never buffered, so it cannot be sent twice).
    let replayable = Replay::worth(&upstream, pool);
    // A bodiless GET or HEAD to a plain backend is only lent to the pool (see
    // `ConnPool::send_bodiless`), and is at hand to send again; any other request is given to
    // hyper's client, and a copy to send again is made just before (about 600 instructions,
    // spared the common case).
    let bodiless = !upgrading && crate::backend::bodiless(&upstream);
    let mut replay: Option<Replay> = None;
    // Some at each attempt: lent, given back unsent, or restored from `replay` for a retry.
    let mut upstream = Some(upstream);

    // Backends tried for this request; allocates only on a second attempt.
    let mut tried: Vec<usize> = Vec::new();
    let mut retried = 0;
    let mut last_error = None;
    let mut next = pool.choose(&facts, &tried);
    loop {
        let Some(choice) = next.take() else {
            // Nothing (else) to try: the client hears why the last backend failed (502), or 503.
            return Err(last_error.unwrap_or_else(|| ProxyError::NoBackend {
                pool: pool.name().to_owned(),
            }));
        };
        let member = &pool.members[choice.index];
        record.metrics = Arc::clone(&pool.member_metrics[choice.index]);
        record.affinity = choice.affinity;
        pool.metrics.affinity(choice.affinity);
        let mut guard = member.state.start_request();
        if let Some(load) = &pool.load {
            guard.count_in(load);
        }
        if member.state.is_out_of_rotation() || member.over_limit() {
            // Its drain ended, or others filled its last slot, between the choice and the count:
            // choose again (not a retry: nothing was sent).
            drop(guard);
            tried.push(choice.index);
            next = pool.choose(&facts, &tried);
            continue;
        }
        let timeouts = &snapshot.config.timeouts;
        let tls = member.spec.tls.as_ref();
        debug_assert!(
            upstream.is_some(),
            "the request is at hand for every attempt"
        );
        let Some(request) = upstream.take() else {
            return Err(last_error.unwrap_or_else(|| ProxyError::NoBackend {
                pool: pool.name().to_owned(),
            }));
        };
        // Kept to tell, if the exchange fails, whether the client's upload was to blame.
        let upload = request.body().upload();
        let sent = if bodiless && tls.is_none() {
            let sent = member.state.pool.send_bodiless(&request, timeouts).await;
            upstream = Some(request);
            sent
        } else {
            if replayable && replay.is_none() {
                replay = Some(Replay::of(&request));
            }
            let sent = member
                .state
                .pool
                .send(request, timeouts, tls, upgrading)
                .await;
            match sent {
                Err(SendError::NotSent { request, error }) => {
                    upstream = Some(*request);
                    Err(SendError::Unsent(error))
                }
                sent => sent,
            }
        };
        match sent {
            Ok((mut response, pooled)) => {
                let status = response.status();
                // A 5xx is a failure at once, a switch of protocols a success; any other answer
                // counts when its body has ended, whole or not (see `BodyWatch`).
                let settled = status.is_server_error() || status.is_informational();
                if settled {
                    health::observe(shared, pool, choice.index, status.is_server_error());
                }
                if matches!(
                    status,
                    StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE
                ) && retried < retries
                    && replayable
                {
                    tried.push(choice.index);
                    next = pool.choose(&facts, &tried);
                    if next.is_some() {
                        // The answer and its connection are dropped unread.
                        retried += 1;
                        pool.metrics.retry();
                        tracing::debug!(backend = %member.spec.address, %status, "retrying on another backend");
                        restore(&mut upstream, &replay);
                        continue;
                    }
                }
                let switching = status == StatusCode::SWITCHING_PROTOCOLS;
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
                        let mut upgrade_guard = member.state.start_upgrade();
                        if let Some(load) = &pool.load {
                            upgrade_guard.count_in(load);
                        }
                        let cut = member.state.cut_signal();
                        shared.tunnels.spawn(tunnel::run(
                            client_upgrade,
                            backend_upgrade,
                            websocket,
                            upgrade_guard,
                            conn.listener.count(),
                            cut,
                            shared.tunnels.stopping(),
                            timeouts.upgraded_idle,
                        ));
                    }
                    // The connection now belongs to the tunnel; it never returns to the pool.
                    return Ok(response.map(|_| ProxyBody::empty()));
                }
                let finish = Finish {
                    guard,
                    conn: Some(pooled),
                    watch: (!settled)
                        .then(|| BodyWatch::new(shared, snapshot, pool_index, choice.index)),
                };
                return Ok(response.map(|mut body| {
                    // Read whole with its head (see `backend::h1`): no stall to watch for.
                    if let Some(whole) = body.take_whole() {
                        finish.complete();
                        return whole.map_or_else(ProxyBody::empty, ProxyBody::local);
                    }
                    if body.is_end_stream() {
                        finish.complete();
                        ProxyBody::empty()
                    } else {
                        ProxyBody::upstream(body, finish, timeouts.idle)
                    }
                }));
            }
            Err(SendError::NotSent { error, .. } | SendError::Unsent(error)) => {
                if matches!(
                    error,
                    ProxyError::Connect { .. } | ProxyError::ConnectTimeout { .. }
                ) {
                    pool.member_metrics[choice.index].connect_error();
                }
                health::observe(shared, pool, choice.index, true);
                tried.push(choice.index);
                if retried == retries {
                    return Err(error);
                }
                // Nothing of it reached the backend, so any request may go elsewhere.
                next = pool.choose(&facts, &tried);
                if next.is_none() {
                    return Err(error);
                }
                retried += 1;
                pool.metrics.retry();
                tracing::debug!(error = %error, "retrying on another backend");
                last_error = Some(error);
            }
            Err(SendError::Failed(error)) => {
                // A client that stalls or aborts its upload makes the exchange fail too; that says
                // nothing about the backend, and must not let clients eject healthy backends.
                let client_side = upload.as_ref().is_some_and(|u| !u.is_done())
                    || matches!(&error, ProxyError::Upstream { source, .. } if source.is_user());
                if !client_side {
                    health::observe(shared, pool, choice.index, true);
                }
                // The client's own body ended the exchange: over the limit (413), or broken off
                // or malformed, such as an invalid chunk size (400).
                if let Some(upload) = &upload {
                    if upload.is_too_large() {
                        let limit = max_body.unwrap_or_default();
                        return Err(ProxyError::BodyTooLarge { limit });
                    }
                    if upload.is_broken() {
                        return Err(match error {
                            ProxyError::Upstream { backend, source } => {
                                ProxyError::RequestBody { backend, source }
                            }
                            other => other,
                        });
                    }
                }
                // A timeout is not retried: the backend may still be working on the request, and
                // the client has already waited the whole timeout once.
                let broken = matches!(
                    error,
                    ProxyError::Upstream { .. } | ProxyError::UpstreamIo { .. }
                );
                if !(replayable && broken && retried < retries) {
                    return Err(error);
                }
                tried.push(choice.index);
                next = pool.choose(&facts, &tried);
                if next.is_none() {
                    return Err(error);
                }
                retried += 1;
                pool.metrics.retry();
                tracing::debug!(error = %error, "retrying on another backend");
                restore(&mut upstream, &replay);
                last_error = Some(error);
            }
        }
    }
}

/// A copy of a bodiless, idempotent request, to send it again.
#[derive(Debug)]
struct Replay(Request<UpstreamBody>);

/// Puts the request back for another attempt, from its copy if hyper's client took it.
fn restore(upstream: &mut Option<Request<UpstreamBody>>, replay: &Option<Replay>) {
    if upstream.is_none() {
        *upstream = replay.as_ref().map(Replay::request);
    }
}

impl Replay {
    /// Whether `request` may be sent again on another backend: an idempotent method (RFC 9110
    /// §9.2.2), no body, and a pool with retries and another backend to use them on.
    fn worth(request: &Request<UpstreamBody>, pool: &Pool) -> bool {
        let idempotent = matches!(
            *request.method(),
            http::Method::GET
                | http::Method::HEAD
                | http::Method::OPTIONS
                | http::Method::TRACE
                | http::Method::PUT
                | http::Method::DELETE
        );
        let worth_it = pool.config.retries > 0 && pool.members.len() > 1;
        idempotent && worth_it && request.body().upload().is_none()
    }

    /// A copy of `request`, which [`Replay::worth`] allowed.
    fn of(request: &Request<UpstreamBody>) -> Replay {
        Replay(crate::backend::bodiless_copy(request))
    }

    fn request(&self) -> Request<UpstreamBody> {
        crate::backend::bodiless_copy(&self.0)
    }
}

/// Rewrites the client's request for the backend: origin-form target, HTTP/1.1, hop-by-hop headers
/// removed, forwarding headers set, body streamed as it arrives. With `wants_cookies`, also returns
/// the client's `Cookie` header values for the strategy, which chooses after the request has moved.
fn upstream_request(
    request: Request<Incoming>,
    conn: &ConnInfo,
    upgrading: bool,
    wants_cookies: bool,
    max_body: Option<u64>,
) -> Result<(CookieValues, Request<UpstreamBody>), ProxyError> {
    let (mut parts, body) = request.into_parts();
    if parts.version == Version::HTTP_2 {
        merge_cookies(&mut parts.headers);
    }
    let cookies = if wants_cookies {
        CookieValues::of(&parts.headers)
    } else {
        CookieValues::One(None)
    };
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
    if parts.uri.path_and_query().is_none() {
        return Err(ProxyError::BadRequest {
            reason: "invalid target",
        });
    }
    if parts.uri.scheme().is_some() || parts.uri.authority().is_some() {
        // Absolute form (and HTTP/2's pseudo-headers): the backend gets the origin form. An
        // origin-form target, the usual HTTP/1.1 case, is already that and is kept as parsed.
        let mut uri = std::mem::take(&mut parts.uri).into_parts();
        uri.scheme = None;
        uri.authority = None;
        parts.uri = Uri::from_parts(uri).map_err(|_| ProxyError::BadRequest {
            reason: "invalid target",
        })?;
    }
    parts.version = Version::HTTP_11;
    headers::strip_hop_by_hop(&mut parts.headers, upgrading);
    headers::strip_proxy_credentials(&mut parts.headers);
    let host = parts.headers.get(header::HOST).cloned();
    // Room for the three forwarding headers at once: a new connection's map is sized to the
    // client's headers, and growing it one insert at a time cost two rehashes (callgrind: about
    // 900 instructions per new connection). Kept-alive connections reuse a larger map: a no-op.
    parts.headers.reserve(3);
    // Each hop appends the peer it talked to, not the client it resolved for hashing.
    headers::set_forwarded(&mut parts.headers, &conn.peer_ip, conn.proto, host.as_ref());
    Ok((
        cookies,
        Request::from_parts(parts, UpstreamBody::streaming(body, max_body)),
    ))
}

/// A request's `Cookie` header values, copied for the strategy (a reference count each): almost
/// always none or one, held without an allocation (a `HeaderMap` here cost two, and hashing, per
/// request of a cookie pool).
enum CookieValues {
    One(Option<HeaderValue>),
    Many(Vec<HeaderValue>),
}

impl CookieValues {
    fn of(headers: &http::HeaderMap) -> Self {
        let mut values = headers.get_all(header::COOKIE).iter();
        match (values.next(), values.next()) {
            (first, None) => CookieValues::One(first.cloned()),
            _ => CookieValues::Many(headers.get_all(header::COOKIE).iter().cloned().collect()),
        }
    }

    fn as_slice(&self) -> &[HeaderValue] {
        match self {
            CookieValues::One(one) => one.as_slice(),
            CookieValues::Many(many) => many,
        }
    }
}

/// HTTP/2 clients may send each cookie as its own `cookie` field; over HTTP/1.1 they must travel
/// as one header joined by `"; "` (RFC 9113 §8.2.3), since many backends read only the first.
fn merge_cookies(headers: &mut http::HeaderMap) {
    let mut values = headers.get_all(header::COOKIE).iter();
    let Some(first) = values.next() else { return };
    if values.next().is_none() {
        return;
    }
    let mut joined = first.as_bytes().to_vec();
    for value in headers.get_all(header::COOKIE).iter().skip(1) {
        joined.extend_from_slice(b"; ");
        joined.extend_from_slice(value.as_bytes());
    }
    if let Ok(value) = HeaderValue::from_bytes(&joined) {
        headers.insert(header::COOKIE, value);
    }
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
    if error.closes_connection() {
        headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_cookie_header_reaches_the_strategy_in_order() {
        let mut headers = http::HeaderMap::new();
        assert!(CookieValues::of(&headers).as_slice().is_empty());
        headers.append(header::COOKIE, HeaderValue::from_static("a=1"));
        assert_eq!(CookieValues::of(&headers).as_slice(), ["a=1"]);
        headers.append(header::COOKIE, HeaderValue::from_static("sy=token"));
        headers.append(header::COOKIE, HeaderValue::from_static("b=2"));
        assert_eq!(
            CookieValues::of(&headers).as_slice(),
            ["a=1", "sy=token", "b=2"]
        );
    }

    #[test]
    fn http2_cookie_fields_become_one_header() {
        let mut headers = http::HeaderMap::new();
        headers.append(header::COOKIE, HeaderValue::from_static("a=1"));
        headers.append(header::COOKIE, HeaderValue::from_static("sy=token"));
        merge_cookies(&mut headers);
        let all: Vec<_> = headers.get_all(header::COOKIE).iter().collect();
        assert_eq!(all, ["a=1; sy=token"]);
        // One field stays as it is.
        merge_cookies(&mut headers);
        assert_eq!(headers[header::COOKIE], "a=1; sy=token");
    }
}
