//! The example app server that the quickstart, the walkthrough, `examples/app_server.rs` and the
//! integration tests put behind the proxy.
//!
//! It owns nothing the proxy uses. It exists for two reasons: tests need a backend they can ask what it
//! saw (requests, connections, in-flight requests, open WebSockets, the last request's headers), and
//! the examples need an app whose sessions can live in one process or in a shared store, so that
//! affinity visibly matters: with [`Sessions::memory`] (the default) the visit counter only climbs
//! while a client keeps landing on the same instance; with a shared store it climbs on any instance.
//!
//! # Endpoints (any method unless said)
//! - `/sleep/{ms}`: waits `ms` milliseconds, then answers like `/`.
//! - `/headers`: the request's headers, one `name: value` per line.
//! - `/echo`: streams the request body back as it arrives.
//! - `/status/{code}`: answers with that status and body `{name}\n`.
//! - `/close`: answers 200 with `Connection: close` and closes the connection (HTTP/1 only).
//! - `/ws`: a WebSocket (HTTP/1.1 `GET` upgrade) that greets with `{name}` and echoes messages;
//!   anything else there gets `426`.
//! - anything else: `{name} visits={n}\n`, counted per signed `app_session` cookie; `503` when the
//!   session store fails.
//!
//! Every response carries `x-backend: {name}`; all but the `101` carry `content-type: text/plain`.

mod sessions;
mod websocket;

pub use sessions::{
    MemorySessions, SessionSigner, SessionStore, Sessions, StoreError, StoreFuture,
    DEMO_SESSION_SECRET, SESSION_COOKIE,
};

use std::convert::Infallible;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{
    HeaderValue, CONNECTION, CONTENT_TYPE, COOKIE, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_VERSION,
    SET_COOKIE, UPGRADE,
};
use http::{HeaderMap, Request, Response, StatusCode, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Process-wide so that two servers with the same name never mint the same session id.
static SESSIONS_ISSUED: AtomicU64 = AtomicU64::new(0);

/// Handle to a running app server; dropping it leaves the server running, [`AppServer::shutdown`] stops it.
pub struct AppServer {
    addr: SocketAddr,
    app: Arc<App>,
    stop: oneshot::Sender<()>,
    accept_loop: JoinHandle<()>,
}

impl AppServer {
    /// Binds `listen` (use 127.0.0.1:0 in tests) and serves until shut down, with sessions in this
    /// process's memory ([`Sessions::memory`]).
    ///
    /// Serves HTTP/1.1 with keep-alive and h2c on the same port. Fails with `InvalidInput` if `name`
    /// cannot be a header value, since it is sent in `x-backend`.
    pub async fn start(listen: SocketAddr, name: &str) -> io::Result<AppServer> {
        Self::start_with(listen, name, Sessions::memory()).await
    }

    /// Like [`AppServer::start`], with visit counters kept and session ids signed by `sessions`.
    pub async fn start_with(
        listen: SocketAddr,
        name: &str,
        sessions: Sessions,
    ) -> io::Result<AppServer> {
        let x_backend = HeaderValue::from_str(name)
            .map_err(|err| io::Error::new(io::ErrorKind::InvalidInput, err))?;
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let app = Arc::new(App {
            name: name.to_owned(),
            x_backend,
            requests: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            sleeping: AtomicU64::new(0),
            websockets: AtomicU64::new(0),
            last_request_headers: Mutex::new(HeaderMap::new()),
            sessions,
        });
        let (stop, stopped) = oneshot::channel();
        let accept_loop = tokio::spawn(accept_loop(listener, Arc::clone(&app), stopped));
        Ok(AppServer {
            addr,
            app,
            stop,
            accept_loop,
        })
    }

    /// The bound address, with the real port when `listen` asked for port 0.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The name sent in `x-backend` and in response bodies.
    pub fn name(&self) -> &str {
        &self.app.name
    }

    /// Requests received so far, counted when the request arrives.
    pub fn requests(&self) -> u64 {
        self.app.requests.load(Ordering::Relaxed)
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.app.connections.load(Ordering::Relaxed)
    }

    /// Requests currently being handled, up to the end of their response body.
    pub fn in_flight(&self) -> u64 {
        self.app.in_flight.load(Ordering::Relaxed)
    }

    /// `/sleep/MS` requests currently sleeping: unlike [`AppServer::in_flight`], never a quick
    /// request that happens to be passing through, so a test can tell its slow request arrived.
    pub fn sleeping(&self) -> u64 {
        self.app.sleeping.load(Ordering::Relaxed)
    }

    /// WebSockets on `/ws` currently open.
    pub fn websockets(&self) -> u64 {
        self.app.websockets.load(Ordering::Relaxed)
    }

    /// Headers of the most recently arrived request (empty before the first one).
    pub fn last_request_headers(&self) -> HeaderMap {
        lock(&self.app.last_request_headers).clone()
    }

    /// Stops accepting and closes the listener (connections already open may finish); after it returns the port refuses connections.
    ///
    /// Open connections finish the request they are serving and then close, so a proxy's pooled
    /// keep-alive connections notice the server is gone; this does not wait for them. WebSockets
    /// stay open until their client closes them.
    pub async fn shutdown(self) {
        // The accept loop may already have ended if it panicked; either way the listener is dropped
        // once the join below returns.
        let _ = self.stop.send(());
        let _ = self.accept_loop.await;
    }
}

impl fmt::Debug for AppServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AppServer")
            .field("name", &self.app.name)
            .field("addr", &self.addr)
            .field("requests", &self.requests())
            .field("connections", &self.connections())
            .field("in_flight", &self.in_flight())
            .field("sleeping", &self.sleeping())
            .field("websockets", &self.websockets())
            .field("sessions", &self.app.sessions.kind())
            .finish()
    }
}

/// Runs until Ctrl-C (for the example binary).
pub async fn run_forever(listen: SocketAddr, name: &str, sessions: Sessions) -> io::Result<()> {
    let kind = sessions.kind();
    let server = AppServer::start_with(listen, name, sessions).await?;
    tracing::info!(addr = %server.addr(), name, sessions = kind, "app server listening");
    tokio::signal::ctrl_c().await?;
    tracing::info!(name, "ctrl-c received, shutting down");
    server.shutdown().await;
    Ok(())
}

/// State shared by the accept loop, every connection and the handle.
struct App {
    name: String,
    x_backend: HeaderValue,
    requests: AtomicU64,
    connections: AtomicU64,
    in_flight: AtomicU64,
    sleeping: AtomicU64,
    websockets: AtomicU64,
    last_request_headers: Mutex<HeaderMap>,
    sessions: Sessions,
}

type InnerBody = BoxBody<Bytes, hyper::Error>;

async fn accept_loop(listener: TcpListener, app: Arc<App>, stopped: oneshot::Receiver<()>) {
    let builder = auto::Builder::new(TokioExecutor::new());
    let graceful = GracefulShutdown::new();
    // A dropped handle means "detach", not "stop": only an explicit shutdown ends the loop.
    let stop = async {
        if stopped.await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    tokio::pin!(stop);

    loop {
        let stream = tokio::select! {
            () = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => stream,
                Err(err) => {
                    // Usually fd exhaustion; spinning on it would only make that worse.
                    tracing::warn!(name = %app.name, error = %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        app.connections.fetch_add(1, Ordering::Relaxed);
        // Small echo chunks should reach the client as they are written.
        let _ = stream.set_nodelay(true);

        let conn_app = Arc::clone(&app);
        let service = service_fn(move |request| {
            let app = Arc::clone(&conn_app);
            async move { Ok::<_, Infallible>(app.handle(request).await) }
        });
        let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
        let conn = graceful.watch(conn.into_owned());
        let name = app.name.clone();
        tokio::spawn(async move {
            if let Err(err) = conn.await {
                tracing::debug!(%name, error = %err, "connection ended with an error");
            }
        });
    }

    drop(listener);
    tokio::spawn(graceful.shutdown());
}

impl App {
    async fn handle(self: Arc<Self>, request: Request<Incoming>) -> Response<InFlightBody> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let in_flight = InFlight::enter(&self);
        *lock(&self.last_request_headers) = request.headers().clone();
        tracing::debug!(name = %self.name, method = %request.method(), uri = %request.uri(), "request");

        let mut response = self.route(request).await;
        let switching = response.status() == StatusCode::SWITCHING_PROTOCOLS;
        let headers = response.headers_mut();
        headers.insert("x-backend", self.x_backend.clone());
        if !switching {
            headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        }
        response.map(|inner| InFlightBody {
            inner,
            _in_flight: in_flight,
        })
    }

    async fn route(self: &Arc<Self>, request: Request<Incoming>) -> Response<InnerBody> {
        let path = request.uri().path();
        if path == "/ws" {
            return self.websocket(request);
        }
        if path == "/echo" {
            return echo(request.into_body()).await;
        }
        if path == "/headers" {
            return text(StatusCode::OK, headers_text(request.headers()));
        }
        if path == "/close" {
            let mut response = text(StatusCode::OK, format!("{}\n", self.name));
            // HTTP/2 forbids connection headers; hyper would strip it with a warning.
            if request.version() <= Version::HTTP_11 {
                response
                    .headers_mut()
                    .insert(CONNECTION, HeaderValue::from_static("close"));
            }
            return response;
        }
        if let Some(code) = path.strip_prefix("/status/") {
            return self.status(code);
        }
        if let Some(ms) = path.strip_prefix("/sleep/") {
            let Ok(ms) = ms.parse::<u64>() else {
                return text(
                    StatusCode::BAD_REQUEST,
                    format!("{}: bad sleep duration {ms:?}\n", self.name),
                );
            };
            let _sleeping = Counted::enter(&self.sleeping);
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        self.visit(request.headers()).await
    }

    /// Answers a WebSocket handshake with `101` and serves the socket once hyper hands it over.
    fn websocket(self: &Arc<Self>, mut request: Request<Incoming>) -> Response<InnerBody> {
        let accept = websocket::accept(request.method(), request.version(), request.headers());
        let accept = match accept {
            Ok(accept) => accept,
            Err(refusal) => {
                let (status, why) = match refusal {
                    websocket::Refusal::NotAnUpgrade => (
                        StatusCode::UPGRADE_REQUIRED,
                        "needs an HTTP/1.1 GET with Upgrade: websocket",
                    ),
                    websocket::Refusal::Version => (
                        StatusCode::UPGRADE_REQUIRED,
                        "needs Sec-WebSocket-Version: 13",
                    ),
                    websocket::Refusal::Key => (StatusCode::BAD_REQUEST, "bad Sec-WebSocket-Key"),
                };
                let mut response = text(status, format!("{}: /ws {why}\n", self.name));
                let headers = response.headers_mut();
                headers.insert(UPGRADE, HeaderValue::from_static("websocket"));
                headers.insert(SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"));
                return response;
            }
        };
        let upgrade = hyper::upgrade::on(&mut request);
        let app = Arc::clone(self);
        tokio::spawn(async move {
            match upgrade.await {
                Ok(upgraded) => {
                    let _open = OpenWebSocket::enter(&app);
                    websocket::serve(TokioIo::new(upgraded), &app.name).await;
                }
                Err(err) => tracing::debug!(name = %app.name, error = %err, "upgrade failed"),
            }
        });
        let mut response = Response::new(Empty::new().map_err(|never| match never {}).boxed());
        *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let headers = response.headers_mut();
        headers.insert(UPGRADE, HeaderValue::from_static("websocket"));
        headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
        let accept = HeaderValue::from_str(&accept).expect("base64 is a valid header value");
        headers.insert(SEC_WEBSOCKET_ACCEPT, accept);
        response
    }

    fn status(&self, code: &str) -> Response<InnerBody> {
        // A 1xx as a final response would wedge the client, so treat it as invalid.
        let status = code
            .parse::<u16>()
            .ok()
            .and_then(|code| StatusCode::from_u16(code).ok())
            .filter(|status| !status.is_informational());
        match status {
            Some(status @ (StatusCode::NO_CONTENT | StatusCode::NOT_MODIFIED)) => {
                text(status, String::new())
            }
            Some(status) => text(status, format!("{}\n", self.name)),
            None => text(
                StatusCode::BAD_REQUEST,
                format!("{}: bad status code {code:?}\n", self.name),
            ),
        }
    }

    /// The stateful part: a per-session counter in the session store. A cookie counts only when
    /// its signature is ours and the store knows its session; otherwise a new session starts.
    async fn visit(&self, headers: &HeaderMap) -> Response<InnerBody> {
        let Sessions { store, signer } = &self.sessions;
        for id in session_ids(headers).filter_map(|value| signer.verify(value)) {
            match store.visit(id).await {
                Ok(Some(visits)) => {
                    return text(StatusCode::OK, format!("{} visits={visits}\n", self.name))
                }
                Ok(None) => {}
                Err(err) => return self.store_failed(&*err),
            }
        }

        let id = self.new_session_id();
        if let Err(err) = store.create(&id).await {
            return self.store_failed(&*err);
        }
        let mut response = text(StatusCode::OK, format!("{} visits=1\n", self.name));
        let cookie = format!("{SESSION_COOKIE}={}; Path=/; HttpOnly", signer.sign(&id));
        let cookie = HeaderValue::from_str(&cookie).expect("hex and base64url are header-safe");
        response.headers_mut().insert(SET_COOKIE, cookie);
        response
    }

    fn store_failed(&self, err: &(dyn std::error::Error + 'static)) -> Response<InnerBody> {
        tracing::warn!(name = %self.name, error = %err, "session store failed");
        text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{}: session store unavailable\n", self.name),
        )
    }

    /// Random-looking so that ids from different instances do not collide; the signature, not the
    /// id, is what makes it unforgeable.
    fn new_session_id(&self) -> String {
        let seq = SESSIONS_ISSUED.fetch_add(1, Ordering::Relaxed);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |since| since.as_nanos());
        let mut seed = Vec::with_capacity(self.name.len() + 32);
        seed.extend_from_slice(self.name.as_bytes());
        seed.extend_from_slice(&seq.to_le_bytes());
        seed.extend_from_slice(&nanos.to_le_bytes());
        seed.extend_from_slice(&std::process::id().to_le_bytes());
        format!("{:032x}", xxhash_rust::xxh3::xxh3_128(&seed))
    }
}

/// Streams `body` back as it arrives.
///
/// Waits for the first frame before answering because hyper sends `100 Continue` only while no
/// response has been started; answering first would stall `Expect: 100-continue` clients (curl) until
/// their own timeout.
async fn echo(mut body: Incoming) -> Response<InnerBody> {
    let body = match body.frame().await {
        None => Empty::new().map_err(|never| match never {}).boxed(),
        Some(first) => Echo {
            first: Some(first),
            rest: body,
        }
        .boxed(),
    };
    Response::new(body)
}

/// The request body with its already-read first frame put back in front.
struct Echo {
    first: Option<Result<Frame<Bytes>, hyper::Error>>,
    rest: Incoming,
}

impl Body for Echo {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.first.take() {
            Some(first) => Poll::Ready(Some(first)),
            None => Pin::new(&mut self.rest).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.first.is_none() && self.rest.is_end_stream()
    }
}

/// Values of every `app_session` cookie across all `Cookie` headers, in order.
fn session_ids(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.split_once('='))
        .filter(|(name, _)| name.trim() == SESSION_COOKIE)
        .map(|(_, value)| value.trim().trim_matches('"'))
}

/// One `name: value` per line; `HeaderMap` groups repeated names at their first occurrence.
fn headers_text(headers: &HeaderMap) -> String {
    let mut text = String::new();
    for (name, value) in headers {
        text.push_str(name.as_str());
        text.push_str(": ");
        text.push_str(&String::from_utf8_lossy(value.as_bytes()));
        text.push('\n');
    }
    text
}

fn text(status: StatusCode, body: String) -> Response<InnerBody> {
    let body = Full::new(Bytes::from(body))
        .map_err(|never: Infallible| match never {})
        .boxed();
    let mut response = Response::new(body);
    *response.status_mut() = status;
    response
}

/// A poisoned lock only means another request panicked; the counters are still usable.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Counts one WebSocket as open until dropped.
struct OpenWebSocket(Arc<App>);

impl OpenWebSocket {
    fn enter(app: &Arc<App>) -> Self {
        app.websockets.fetch_add(1, Ordering::Relaxed);
        Self(Arc::clone(app))
    }
}

impl Drop for OpenWebSocket {
    fn drop(&mut self) {
        self.0.websockets.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Counts one request as in flight until dropped.
struct InFlight(Arc<App>);

impl InFlight {
    fn enter(app: &Arc<App>) -> Self {
        app.in_flight.fetch_add(1, Ordering::Relaxed);
        Self(Arc::clone(app))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Counts one thing in `counter` until dropped, so a cancelled request stops counting too.
struct Counted<'a>(&'a AtomicU64);

impl<'a> Counted<'a> {
    fn enter(counter: &'a AtomicU64) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        Self(counter)
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Response body that keeps its request in flight until hyper has finished with (dropped) it, so a
/// streaming `/echo` counts for as long as it streams.
struct InFlightBody {
    inner: InnerBody,
    _in_flight: InFlight,
}

impl Body for InFlightBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::time::Instant;

    use http_body_util::Empty;
    use hyper::client::conn::http1;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;
    use tokio::sync::mpsc;

    const ANY_PORT: &str = "127.0.0.1:0";

    async fn start(name: &str) -> AppServer {
        AppServer::start(ANY_PORT.parse().unwrap(), name)
            .await
            .unwrap()
    }

    /// Opens one HTTP/1.1 connection; the join handle resolves when the connection closes.
    async fn connect<B>(addr: SocketAddr) -> (http1::SendRequest<B>, JoinHandle<hyper::Result<()>>)
    where
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let stream = TcpStream::connect(addr).await.unwrap();
        let (sender, conn) = http1::handshake(TokioIo::new(stream)).await.unwrap();
        (sender, tokio::spawn(conn))
    }

    async fn get(
        sender: &mut http1::SendRequest<Empty<Bytes>>,
        path: &str,
        cookies: &[&str],
    ) -> (http::response::Parts, String) {
        let mut request = Request::builder().uri(path).header("host", "app.test");
        for cookie in cookies {
            request = request.header(COOKIE, *cookie);
        }
        let response = sender
            .send_request(request.body(Empty::new()).unwrap())
            .await
            .unwrap();
        let (parts, body) = response.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        (parts, String::from_utf8(body.to_vec()).unwrap())
    }

    fn session_cookie(parts: &http::response::Parts) -> Option<String> {
        let set_cookie = parts.headers.get(SET_COOKIE)?.to_str().unwrap();
        let (pair, attributes) = set_cookie.split_once(';').unwrap();
        assert_eq!(attributes, " Path=/; HttpOnly");
        Some(pair.to_owned())
    }

    /// The in-flight guard is released when hyper drops the body, which may be just after the
    /// client has read it.
    async fn wait_idle(server: &AppServer) {
        for _ in 0..100 {
            if server.in_flight() == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("{} requests still in flight", server.in_flight());
    }

    /// A request body the test feeds chunk by chunk, to prove `/echo` does not buffer.
    struct ChannelBody(mpsc::Receiver<Bytes>);

    impl Body for ChannelBody {
        type Data = Bytes;
        type Error = Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            self.0
                .poll_recv(cx)
                .map(|chunk| chunk.map(|chunk| Ok(Frame::data(chunk))))
        }
    }

    #[tokio::test]
    async fn session_counter_climbs_with_cookie_and_resets_without() {
        let server = start("app1").await;
        let (mut sender, _conn) = connect(server.addr()).await;

        let (parts, body) = get(&mut sender, "/", &[]).await;
        assert_eq!(parts.status, StatusCode::OK);
        assert_eq!(body, "app1 visits=1\n");
        assert_eq!(parts.headers["x-backend"], "app1");
        assert_eq!(parts.headers[CONTENT_TYPE], "text/plain");
        let cookie = session_cookie(&parts).expect("a new session sets its cookie");

        // Alongside a proxy's affinity cookie, in one header.
        let with_affinity = format!("lb=abc.def; {cookie}");
        let (parts, body) = get(&mut sender, "/cart", &[&with_affinity]).await;
        assert_eq!(body, "app1 visits=2\n");
        assert_eq!(session_cookie(&parts), None);

        // Split across several Cookie headers.
        let (_, body) = get(&mut sender, "/", &["lb=abc", &cookie, "theme=dark"]).await;
        assert_eq!(body, "app1 visits=3\n");

        let (parts, body) = get(&mut sender, "/", &["lb=abc"]).await;
        assert_eq!(body, "app1 visits=1\n");
        let other = session_cookie(&parts).unwrap();
        assert_ne!(other, cookie);

        // An id this process never issued (another instance's) starts over.
        let (parts, body) = get(&mut sender, "/", &["app_session=0123456789abcdef"]).await;
        assert_eq!(body, "app1 visits=1\n");
        assert!(session_cookie(&parts).is_some());

        let (_, body) = get(&mut sender, "/", &[&cookie]).await;
        assert_eq!(body, "app1 visits=4\n");
    }

    #[tokio::test]
    async fn sleep_waits_and_counts_as_in_flight() {
        let server = start("slow").await;
        let (mut sender, _conn) = connect(server.addr()).await;

        let started = Instant::now();
        let request = tokio::spawn(async move { get(&mut sender, "/sleep/200", &[]).await });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(server.in_flight(), 1);
        assert_eq!(server.sleeping(), 1);
        assert_eq!(server.requests(), 1);

        let (parts, body) = request.await.unwrap();
        assert!(started.elapsed() >= Duration::from_millis(200));
        assert_eq!(parts.status, StatusCode::OK);
        assert_eq!(body, "slow visits=1\n");
        assert_eq!(server.sleeping(), 0);
        wait_idle(&server).await;

        // A client that gives up stops the sleep counting.
        let (mut sender, conn) = connect(server.addr()).await;
        let request = tokio::spawn(async move { get(&mut sender, "/sleep/10000", &[]).await });
        while server.sleeping() == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        request.abort();
        conn.abort();
        wait_idle(&server).await;
        assert_eq!(server.sleeping(), 0);

        let (mut sender, _conn) = connect(server.addr()).await;
        let (parts, _) = get(&mut sender, "/sleep/soon", &[]).await;
        assert_eq!(parts.status, StatusCode::BAD_REQUEST);
    }

    #[tokio::test]
    async fn echo_streams_the_body_back() {
        let server = start("echo").await;
        let (mut sender, _conn) = connect(server.addr()).await;
        let (chunks, body) = mpsc::channel(1);
        let request = Request::post("/echo")
            .header("host", "app.test")
            .body(ChannelBody(body))
            .unwrap();

        chunks.send(Bytes::from_static(b"hello ")).await.unwrap();
        let response = sender.send_request(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["x-backend"], "echo");
        let mut body = response.into_body();

        // The first chunk comes back while the request body is still open.
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(first, "hello ");
        assert_eq!(server.in_flight(), 1);

        chunks.send(Bytes::from_static(b"world")).await.unwrap();
        drop(chunks);
        let rest = body.collect().await.unwrap().to_bytes();
        assert_eq!(rest, "world");
        wait_idle(&server).await;
    }

    #[tokio::test]
    async fn echo_of_an_empty_body_is_empty() {
        let server = start("echo").await;
        let (mut sender, _conn) = connect(server.addr()).await;
        let (parts, body) = get(&mut sender, "/echo", &[]).await;
        assert_eq!(parts.status, StatusCode::OK);
        assert_eq!(body, "");
    }

    #[tokio::test]
    async fn echo_answers_expect_continue_before_the_body_is_sent() {
        let server = start("echo").await;
        let mut stream = TcpStream::connect(server.addr()).await.unwrap();
        stream
            .write_all(
                b"POST /echo HTTP/1.1\r\nhost: app.test\r\ncontent-length: 3\r\n\
                  expect: 100-continue\r\n\r\n",
            )
            .await
            .unwrap();
        let mut buf = vec![0; 1024];
        let n = tokio::time::timeout(Duration::from_secs(1), stream.read(&mut buf))
            .await
            .expect("100 Continue arrives without the body")
            .unwrap();
        let interim = b"HTTP/1.1 100 Continue\r\n\r\n";
        assert!(buf[..n].starts_with(interim));

        stream.write_all(b"abc").await.unwrap();
        let mut response = buf[interim.len()..n].to_vec();
        while !response.ends_with(b"\r\n0\r\n\r\n") {
            let n = stream.read(&mut buf).await.unwrap();
            assert_ne!(n, 0, "connection closed early");
            response.extend_from_slice(&buf[..n]);
        }
        let response = String::from_utf8(response).unwrap();
        assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
        assert!(response.contains("\r\n3\r\nabc\r\n"), "{response}");
    }

    #[tokio::test]
    async fn counters_and_headers_are_recorded() {
        let server = start("app2").await;
        assert_eq!(server.name(), "app2");
        assert_eq!(server.requests(), 0);
        assert!(server.last_request_headers().is_empty());

        let (mut first, _conn) = connect(server.addr()).await;
        get(&mut first, "/", &[]).await;
        get(&mut first, "/", &[]).await;
        let (mut second, _conn) = connect(server.addr()).await;
        let request = Request::get("/headers")
            .header("host", "app.test")
            .header("x-forwarded-for", "192.0.2.7")
            .header("X-Trace", "one")
            .header("x-trace", "two")
            .body(Empty::<Bytes>::new())
            .unwrap();
        let response = second.send_request(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(
            body,
            "host: app.test\nx-forwarded-for: 192.0.2.7\nx-trace: one\nx-trace: two\n"
        );

        assert_eq!(server.requests(), 3);
        assert_eq!(server.connections(), 2);
        let last = server.last_request_headers();
        assert_eq!(last["x-forwarded-for"], "192.0.2.7");
        let traces: Vec<_> = last.get_all("x-trace").iter().collect();
        assert_eq!(traces, ["one", "two"]);
        wait_idle(&server).await;
    }

    #[tokio::test]
    async fn status_answers_with_the_code_asked_for() {
        let server = start("app3").await;
        let (mut sender, _conn) = connect(server.addr()).await;

        let (parts, body) = get(&mut sender, "/status/503", &[]).await;
        assert_eq!(parts.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body, "app3\n");
        assert_eq!(parts.headers["x-backend"], "app3");

        let (parts, body) = get(&mut sender, "/status/204", &[]).await;
        assert_eq!(parts.status, StatusCode::NO_CONTENT);
        assert_eq!(body, "");

        for bad in ["/status/abc", "/status/100", "/status/1000"] {
            let (parts, _) = get(&mut sender, bad, &[]).await;
            assert_eq!(parts.status, StatusCode::BAD_REQUEST, "{bad}");
        }
        assert_eq!(server.connections(), 1);
    }

    #[tokio::test]
    async fn close_ends_the_connection() {
        let server = start("app4").await;
        let (mut sender, conn) = connect(server.addr()).await;

        let (parts, body) = get(&mut sender, "/close", &[]).await;
        assert_eq!(parts.status, StatusCode::OK);
        assert_eq!(parts.headers[CONNECTION], "close");
        assert_eq!(body, "app4\n");
        tokio::time::timeout(Duration::from_secs(5), conn)
            .await
            .expect("server closes the connection")
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn shutdown_refuses_new_connections_and_finishes_open_requests() {
        let server = start("app5").await;
        let addr = server.addr();
        let (mut sender, _conn) = connect(addr).await;
        let request = tokio::spawn(async move { get(&mut sender, "/sleep/200", &[]).await });
        tokio::time::sleep(Duration::from_millis(50)).await;

        server.shutdown().await;
        let refused = TcpStream::connect(addr).await;
        assert_eq!(
            refused.unwrap_err().kind(),
            io::ErrorKind::ConnectionRefused
        );

        let (parts, body) = request.await.unwrap();
        assert_eq!(parts.status, StatusCode::OK);
        assert_eq!(body, "app5 visits=1\n");
    }

    #[tokio::test]
    async fn a_name_that_is_not_a_header_value_is_rejected() {
        let err = AppServer::start(ANY_PORT.parse().unwrap(), "bad\nname")
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }

    #[tokio::test]
    async fn a_shared_store_and_secret_let_any_instance_continue_a_session() {
        let shared = Sessions::new(Arc::new(MemorySessions::new()), b"shared secret");
        let any = ANY_PORT.parse().unwrap();
        let one = AppServer::start_with(any, "one", shared.clone())
            .await
            .unwrap();
        let two = AppServer::start_with(any, "two", shared).await.unwrap();
        let (mut to_one, _conn) = connect(one.addr()).await;
        let (mut to_two, _conn) = connect(two.addr()).await;

        let (parts, body) = get(&mut to_one, "/", &[]).await;
        assert_eq!(body, "one visits=1\n");
        let cookie = session_cookie(&parts).unwrap();
        let (parts, body) = get(&mut to_two, "/", &[&cookie]).await;
        assert_eq!(body, "two visits=2\n");
        assert_eq!(session_cookie(&parts), None);
        let (_, body) = get(&mut to_one, "/", &[&cookie]).await;
        assert_eq!(body, "one visits=3\n");
    }

    #[tokio::test]
    async fn a_forged_or_foreign_session_id_starts_a_new_session() {
        let store: Arc<MemorySessions> = Arc::new(MemorySessions::new());
        let any = ANY_PORT.parse().unwrap();
        let ours = Sessions::new(Arc::clone(&store) as Arc<dyn SessionStore>, b"our secret");
        let server = AppServer::start_with(any, "app", ours).await.unwrap();
        let (mut sender, _conn) = connect(server.addr()).await;
        let (parts, _) = get(&mut sender, "/", &[]).await;
        let cookie = session_cookie(&parts).unwrap();
        let (id, _tag) = cookie["app_session=".len()..].split_once('.').unwrap();

        // The store knows the id, but without our signature it is not a session.
        let unsigned = format!("app_session={id}");
        let foreign = format!(
            "app_session={}",
            SessionSigner::new(b"another secret").sign(id)
        );
        for bad in [unsigned, foreign] {
            let (parts, body) = get(&mut sender, "/", &[&bad]).await;
            assert_eq!(body, "app visits=1\n", "{bad}");
            assert!(session_cookie(&parts).is_some(), "{bad}");
        }
        let (_, body) = get(&mut sender, "/", &[&cookie]).await;
        assert_eq!(body, "app visits=2\n");
    }

    /// A store that always fails, as Redis does when it is down.
    struct BrokenStore;

    impl SessionStore for BrokenStore {
        fn visit<'a>(&'a self, _id: &'a str) -> StoreFuture<'a, Option<u64>> {
            Box::pin(async { Err(io::Error::from(io::ErrorKind::ConnectionRefused).into()) })
        }

        fn create<'a>(&'a self, _id: &'a str) -> StoreFuture<'a, ()> {
            Box::pin(async { Err(io::Error::from(io::ErrorKind::ConnectionRefused).into()) })
        }

        fn kind(&self) -> &'static str {
            "broken"
        }
    }

    #[tokio::test]
    async fn a_failing_store_answers_503_and_sets_no_cookie() {
        let sessions = Sessions::new(Arc::new(BrokenStore), DEMO_SESSION_SECRET.as_bytes());
        let server = AppServer::start_with(ANY_PORT.parse().unwrap(), "app", sessions)
            .await
            .unwrap();
        let (mut sender, _conn) = connect(server.addr()).await;
        let (parts, body) = get(&mut sender, "/", &[]).await;
        assert_eq!(parts.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body, "app: session store unavailable\n");
        assert_eq!(parts.headers.get(SET_COOKIE), None);
        // Endpoints without sessions still work.
        let (parts, _) = get(&mut sender, "/status/200", &[]).await;
        assert_eq!(parts.status, StatusCode::OK);
    }

    #[tokio::test]
    async fn websocket_greets_with_the_name_echoes_and_is_counted_while_open() {
        use futures_util::{SinkExt, StreamExt};
        use tokio_tungstenite::tungstenite::Message;

        let server = start("app6").await;
        let addr = server.addr();
        let (mut ws, response) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws"))
            .await
            .expect("handshake");
        assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
        assert_eq!(response.headers()["x-backend"], "app6");
        assert_eq!(response.headers().get(CONTENT_TYPE), None);
        let greeting = ws.next().await.unwrap().unwrap();
        assert_eq!(greeting, Message::text("app6"));
        assert_eq!(server.websockets(), 1);

        for message in [Message::text("hello"), Message::binary(vec![0u8; 70_000])] {
            ws.send(message.clone()).await.unwrap();
            assert_eq!(ws.next().await.unwrap().unwrap(), message);
        }
        ws.send(Message::Ping(b"p".to_vec().into())).await.unwrap();
        let pong = ws.next().await.unwrap().unwrap();
        assert_eq!(pong, Message::Pong(b"p".to_vec().into()));

        ws.close(None).await.unwrap();
        while let Some(Ok(_)) = ws.next().await {}
        for _ in 0..100 {
            if server.websockets() == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(server.websockets(), 0);
    }

    #[tokio::test]
    async fn ws_without_an_upgrade_is_426() {
        let server = start("app8").await;
        let (mut sender, _conn) = connect(server.addr()).await;
        let (parts, body) = get(&mut sender, "/ws", &[]).await;
        assert_eq!(parts.status, StatusCode::UPGRADE_REQUIRED);
        assert_eq!(parts.headers[UPGRADE], "websocket");
        assert_eq!(
            body,
            "app8: /ws needs an HTTP/1.1 GET with Upgrade: websocket\n"
        );
        assert_eq!(server.websockets(), 0);
    }
}
