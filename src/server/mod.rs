//! Listeners and connections: the accept loops (bounded by `limits.max_connections`), TLS
//! termination, HTTP/1.1 and HTTP/2 (ALPN over TLS, prior knowledge in cleartext) on the same
//! socket with the `[limits]` applied, and graceful shutdown with a bounded wait. HTTP/1 request
//! heads are checked in [`framing`] before hyper reads them. Listeners are keyed by their configured address so that a reload starts and stops only
//! the ones that changed; what a kept listener serves (its certificates, its https redirect) is
//! swapped in place and applies to the connections it accepts next.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use futures_util::future::{self, FutureExt};
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use prometheus::IntGauge;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::either::Either;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin;
use crate::config::{Config, Limits, ListenerConfig, Timeouts};
use crate::discovery::Discovery;
use crate::health::active::Checks;
use crate::metrics::Metrics;
use crate::proxy::{self, ConnInfo, HttpsRedirect};
use crate::state::Shared;

mod dormant;
pub mod framing;
mod idle;
mod serving;

use dormant::Dormant;
use framing::{Answered, CheckedIo, HeadLimits, Verdict, Verdicts};
use idle::{Activity, ClientStream, CountingIo, Watched};
use serving::{Builders, Serving};

/// Connections the kernel queues for `accept` (capped by `net.core.somaxconn`). std and mio use
/// 128, which a burst of new connections overflows; nginx uses 511.
const LISTEN_BACKLOG: u32 = 1024;

/// Most concurrent HTTP/2 streams per client connection.
const H2_MAX_CONCURRENT_STREAMS: u32 = 256;
/// The smallest HTTP/1 buffer hyper takes.
const HYPER_MIN_BUF_SIZE: usize = 8192;
/// hyper's default of header fields per HTTP/1 request; setting another costs it a heap allocation
/// per request, so only another limit is set.
const HYPER_MAX_HEADERS: usize = 100;
/// Streams a client may open and reset before the server has even accepted them; past this the
/// connection gets GOAWAY (ENHANCE_YOUR_CALM): the HTTP/2 "rapid reset" attack (CVE-2023-44487).
const H2_MAX_PENDING_ACCEPT_RESET_STREAMS: usize = 20;
/// Streams the server may reset because the client broke the protocol on them before the
/// connection gets GOAWAY: the "MadeYouReset" variant (CVE-2025-8671).
const H2_MAX_LOCAL_ERROR_RESET_STREAMS: usize = 256;

/// How long a starting server waits for its discovery sources' first answers before it accepts
/// connections (already bound, they wait in the kernel's queue meanwhile).
const FIRST_ANSWERS_WAIT: Duration = Duration::from_secs(5);

/// What a listening socket serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Role {
    /// Client traffic, proxied.
    Proxy,
    /// The admin API.
    Admin,
}

/// A listener's identity across reloads: its role, its configured address, and which occurrence of
/// that address it is (several `127.0.0.1:0` listeners are distinct sockets).
pub(crate) type ListenerKey = (Role, SocketAddr, usize);

/// A bound listener, the token that stops its accept loop, and what it serves.
#[derive(Debug)]
struct Listener {
    local: SocketAddr,
    stop: CancellationToken,
    /// Read by the accept loop once per connection; replaced when a reload changes it.
    settings: Arc<ArcSwap<ListenerSettings>>,
}

/// How a proxy listener serves the connections it accepts.
#[derive(Debug, Default)]
struct ListenerSettings {
    /// TLS termination, with the certificates loaded by the current config.
    tls: Option<Arc<rustls::ServerConfig>>,
    /// `redirect_https`: every request gets a 308 to its https URL.
    redirect: Option<HttpsRedirect>,
}

/// A running proxy: its shared state, its listeners and its connections.
#[derive(Debug)]
pub struct Server {
    shared: Arc<Shared>,
    /// Keyed by role and *configured* address, so a reload keeps listeners whose line stayed.
    listeners: Mutex<BTreeMap<ListenerKey, Listener>>,
    shutdown: CancellationToken,
    /// Set just before `shutdown` is cancelled: a connection reads it at each wake-up, where the
    /// token's own `is_cancelled` would take the mutex all connections share.
    stopped: Arc<AtomicBool>,
    connections: TaskTracker,
    /// Reloads (and snapshot refreshes after a drain) happen one at a time.
    pub(crate) reload_lock: tokio::sync::Mutex<()>,
    /// File reloads (SIGHUP, the watcher, `POST /reload`) read and apply one at a time, so a
    /// slow read cannot apply an older file after a newer one.
    pub(crate) file_reload_lock: tokio::sync::Mutex<()>,
    /// Active health checkers, one per checked backend address.
    pub(crate) health_checks: Checks,
    /// Discovery tasks and the membership they found, one per discovered pool.
    pub(crate) discovery: Discovery,
    /// hyper's servers for the values connections last started with (see `Server::builders`).
    builders: ArcSwapOption<CachedBuilders>,
    /// Parked plain-TCP client connections, waiting without tasks.
    dormant: Arc<Dormant>,
}

/// What a client connection is served with, taken from the snapshot when it was accepted.
struct ConnSettings {
    /// `timeouts.client_header`.
    client_header: Duration,
    /// `timeouts.idle`.
    idle: Duration,
    head_limits: HeadLimits,
    builders: Arc<Builders>,
    /// Bytes moved and requests waiting on a backend, for the idle check.
    activity: Arc<Activity>,
    /// The listener's parked (idle keep-alive) connections.
    idle_gauge: Option<IntGauge>,
}

/// hyper's servers and the values they were configured from.
#[derive(Debug)]
struct CachedBuilders {
    key: BuildersKey,
    builders: Arc<Builders>,
}

/// What [`Builders`] are configured from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct BuildersKey {
    client_header: Duration,
    max_header_bytes: usize,
    max_headers: usize,
}

impl Server {
    /// Binds every listener of `config` (and the admin listener) and starts serving. Fails,
    /// binding nothing, if any address cannot be bound.
    ///
    /// Pools with `[discovery]` start empty; connections are accepted once every source has
    /// answered (or failed) once, or after 5 seconds, whichever comes first.
    pub async fn start(config: Config) -> std::io::Result<Arc<Server>> {
        let bound = bind_all(&config, &wanted_listeners(&config))?;
        for pool in config.generated_secrets() {
            crate::reload::warn_generated_secret(&pool);
        }
        let shutdown = CancellationToken::new();
        let stopped = Arc::new(AtomicBool::new(false));
        let connections = TaskTracker::new();
        let (dormant, watch_dormant) =
            Dormant::new(connections.clone(), shutdown.clone(), Arc::clone(&stopped))?;
        connections.spawn(watch_dormant);
        let server = Arc::new(Server {
            shared: Shared::new(config),
            listeners: Mutex::new(BTreeMap::new()),
            shutdown,
            stopped,
            connections,
            reload_lock: tokio::sync::Mutex::new(()),
            file_reload_lock: tokio::sync::Mutex::new(()),
            health_checks: Checks::default(),
            discovery: Discovery::default(),
            builders: ArcSwapOption::empty(),
            dormant,
        });
        server.metrics().loaded();
        tokio::spawn(timer_floor(server.shutdown_token()));
        server.reconcile_discovery();
        if !server.discovery.first_answers(FIRST_ANSWERS_WAIT).await {
            tracing::warn!(
                "discovery: not every source answered within {}s; serving anyway, their pools \
                 fill when they answer",
                FIRST_ANSWERS_WAIT.as_secs()
            );
        }
        // A source counts as answered before its membership is applied, which happens under the
        // reload lock: taking the lock waits for that, so no request finds the pool still empty.
        drop(server.reload_lock.lock().await);
        server.adopt_listeners(bound);
        server.reconcile_health_checks();
        Ok(server)
    }

    /// Starts, stops and restarts discovery tasks to match the current config.
    pub(crate) fn reconcile_discovery(self: &Arc<Self>) {
        let config = Arc::clone(&self.shared.snapshot.load().config);
        self.discovery
            .reconcile(self, &config, &self.shared.metrics, &self.shutdown);
    }

    /// Starts and stops health checkers to match the current config.
    pub(crate) fn reconcile_health_checks(&self) {
        let config = Arc::clone(&self.shared.snapshot.load().config);
        self.health_checks
            .reconcile(&self.shared, &config, &self.shutdown);
    }

    /// The shared snapshot and registry.
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// The server's metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    /// Cancelled when the server shuts down.
    pub(crate) fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Parked plain-TCP client connections waiting for their next request without a task of
    /// their own (all of them are also counted in `switchyard_downstream_idle_connections`).
    pub fn dormant_connections(&self) -> usize {
        self.dormant.len()
    }

    /// The bound address of each proxy listener, in the config's order (useful with port 0).
    pub fn listen_addrs(&self) -> Vec<SocketAddr> {
        self.bound(Role::Proxy)
    }

    /// The bound address of the admin listener, if configured.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.bound(Role::Admin).first().copied()
    }

    fn bound(&self, role: Role) -> Vec<SocketAddr> {
        let listeners = self.listeners.lock().unwrap_or_else(|e| e.into_inner());
        wanted_listeners(&self.shared.snapshot.load().config)
            .iter()
            .filter(|key| key.0 == role)
            .filter_map(|key| listeners.get(key).map(|l| l.local))
            .collect()
    }

    /// Binds the listeners `config` wants that are not open yet; all or nothing.
    pub(crate) async fn bind_new_listeners(
        &self,
        config: &Config,
    ) -> std::io::Result<Vec<(ListenerKey, TcpListener)>> {
        let missing: Vec<ListenerKey> = {
            let listeners = self.listeners.lock().unwrap_or_else(|e| e.into_inner());
            wanted_listeners(config)
                .into_iter()
                .filter(|key| !listeners.contains_key(key))
                .collect()
        };
        bind_all(config, &missing)
    }

    /// Stops the listeners the current snapshot's config no longer names.
    pub(crate) fn stop_removed_listeners(&self) {
        let wanted = wanted_listeners(&self.shared.snapshot.load().config);
        let mut listeners = self.listeners.lock().unwrap_or_else(|e| e.into_inner());
        listeners.retain(|key, listener| {
            let keep = wanted.contains(key);
            if !keep {
                tracing::info!(listen = %listener.local, "listener closed");
                listener.stop.cancel();
                if key.0 == Role::Proxy {
                    self.metrics().remove_downstream(listener.local);
                }
            }
            keep
        });
    }

    /// Starts accept loops for freshly bound listeners, after setting what every listener serves
    /// from the current snapshot's config (a new TLS listener never serves one connection in
    /// cleartext).
    pub(crate) fn adopt_listeners(self: &Arc<Self>, bound: Vec<(ListenerKey, TcpListener)>) {
        let mut listeners = self.listeners.lock().unwrap_or_else(|e| e.into_inner());
        let mut fresh = Vec::with_capacity(bound.len());
        for (key, listener) in bound {
            let local = listener.local_addr().unwrap_or(key.1);
            let stop = self.shutdown.child_token();
            let settings = Arc::new(ArcSwap::from_pointee(ListenerSettings::default()));
            listeners.insert(
                key,
                Listener {
                    local,
                    stop: stop.clone(),
                    settings: Arc::clone(&settings),
                },
            );
            fresh.push((key.0, listener, local, stop, settings));
        }
        self.configure_listeners(&listeners);
        for (role, listener, local, stop, settings) in fresh {
            match role {
                Role::Proxy => {
                    tracing::info!(listen = %local, "listening");
                    tokio::spawn(Arc::clone(self).accept_loop(listener, stop, settings));
                }
                Role::Admin => {
                    tracing::info!(admin = %local, "admin listening");
                    tokio::spawn(admin::serve(Arc::clone(self), listener, stop));
                }
            }
        }
    }

    /// Sets what each proxy listener serves from the current snapshot's config. Certificates
    /// are those the config loaded, so a reload that re-read them serves them to new connections
    /// without re-binding anything.
    fn configure_listeners(&self, listeners: &BTreeMap<ListenerKey, Listener>) {
        let snapshot = self.shared.snapshot.load();
        let configured = proxy_listeners(&snapshot.config);
        // Redirects go to the first TLS listener's port (its bound one, for port 0).
        let https_port = configured
            .iter()
            .find(|(_, config)| config.tls.is_some())
            .and_then(|(key, _)| listeners.get(key))
            .map(|listener| listener.local.port());
        for (key, config) in configured {
            if let Some(listener) = listeners.get(&key) {
                listener.settings.store(Arc::new(ListenerSettings {
                    tls: config
                        .tls
                        .as_ref()
                        .map(|tls| Arc::clone(&tls.server_config)),
                    redirect: config
                        .redirect_https
                        .then(|| HttpsRedirect::to_port(https_port)),
                }));
            }
        }
    }

    async fn accept_loop(
        self: Arc<Self>,
        listener: TcpListener,
        stop: CancellationToken,
        settings: Arc<ArcSwap<ListenerSettings>>,
    ) {
        let local = listener.local_addr().ok();
        // This listener's open connections, for `limits.max_connections`.
        let count = ListenerCount::new(local.map(|local| self.metrics().downstream(local)));
        let idle = local.map(|local| self.metrics().downstream_idle(local));
        // Made once: a fresh `cancelled()` per accepted connection registered a waiter each time.
        let stopped = stop.cancelled();
        tokio::pin!(stopped);
        loop {
            tokio::select! {
                biased;
                _ = &mut stopped => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        // Over the limit, a connection is accepted and closed at once: the client
                        // learns right away, and the kernel's backlog does not fill with clients
                        // waiting on a listener that will not take them.
                        let max = self.shared.snapshot.load().config.limits.max_connections;
                        if count.open_now() >= max {
                            self.metrics().downstream_refused(local);
                            tracing::debug!(%peer, max, "connection refused: listener at max_connections");
                            drop(stream);
                            continue;
                        }
                        let counted = count.count();
                        let server = Arc::clone(&self);
                        let settings = settings.load_full();
                        let idle = idle.clone();
                        // Set up by the task, on whichever worker runs it, not by this loop;
                        // `lazy` then `flatten` keeps no room for the captures beside the
                        // connection's future, as an `async` block awaiting it would.
                        self.connections.spawn(
                            future::lazy(move |_| {
                                server.serve_connection(stream, peer, settings, idle, counted)
                            })
                            .flatten(),
                        );
                    }
                    Err(error) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!(%error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        }
    }

    /// Serves one accepted connection. Not an `async fn`, so that the connection's task holds
    /// the serving future alone, not this function's arguments and locals beside it.
    fn serve_connection(
        self: Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
        settings: Arc<ListenerSettings>,
        idle: Option<IntGauge>,
        counted: Counted,
    ) -> impl Future<Output = ()> + Send {
        // Inherited from the listener on Linux (see `listen`).
        #[cfg(not(target_os = "linux"))]
        let _ = stream.set_nodelay(true);
        let conn = {
            let snapshot = self.shared.snapshot.load();
            let (timeouts, limits) = (&snapshot.config.timeouts, &snapshot.config.limits);
            ConnSettings {
                client_header: timeouts.client_header,
                idle: timeouts.idle,
                head_limits: HeadLimits {
                    max_bytes: limits.max_header_bytes,
                    max_fields: limits.max_headers,
                },
                builders: self.builders(timeouts, limits),
                // Counted below TLS, so a handshake that trickles in is activity too.
                activity: Arc::new(Activity::default()),
                idle_gauge: idle,
            }
        };
        let io = CountingIo::new(stream, Arc::clone(&conn.activity));
        let Some(server_config) = &settings.tls else {
            let info = ConnInfo {
                peer,
                peer_ip: proxy::headers::peer_ip_value(peer.ip()),
                proto: "http",
                redirect: settings.redirect,
                listener: counted.listener().clone(),
            };
            return Either::Left(self.serve_http(io, info, conn, true, counted));
        };
        // Boxed: the handshake's and the TLS stream's state would otherwise make room in every
        // connection's task, cleartext ones included.
        let server_config = Arc::clone(server_config);
        Either::Right(Box::pin(self.serve_tls(
            io,
            peer,
            server_config,
            conn,
            counted,
        )))
    }

    /// Accepts the TLS handshake within `client_header`, then serves HTTP over it.
    async fn serve_tls(
        self: Arc<Self>,
        io: CountingIo<TcpStream>,
        peer: SocketAddr,
        server_config: Arc<rustls::ServerConfig>,
        conn: ConnSettings,
        counted: Counted,
    ) {
        // A client gets `client_header` to finish the handshake, as it does to send its headers.
        let accepting = TlsAcceptor::from(server_config).accept(io);
        let handshake = tokio::select! {
            handshake = tokio::time::timeout(conn.client_header, accepting) => handshake,
            _ = self.shutdown.cancelled() => return,
        };
        let stream = match handshake {
            Ok(Ok(stream)) => stream,
            Ok(Err(error)) => {
                tracing::debug!(%peer, %error, "TLS handshake failed");
                return;
            }
            Err(_) => {
                tracing::debug!(%peer, "TLS handshake timed out");
                return;
            }
        };
        let info = ConnInfo {
            peer,
            peer_ip: proxy::headers::peer_ip_value(peer.ip()),
            proto: "https",
            redirect: None,
            listener: counted.listener().clone(),
        };
        self.serve_http(stream, info, conn, false, counted).await;
    }

    /// Serves HTTP/1.1 and HTTP/2 on one client connection until it ends, is idle for
    /// `timeouts.idle`, or the server shuts down. `plain_tcp`: `io` is the TCP stream itself, not
    /// TLS over it.
    ///
    /// Not an `async fn`: the setup runs here, and the future returned (which lives in the
    /// connection's task for as long as the connection) holds only what serving it needs, not
    /// this function's arguments as well.
    fn serve_http<I>(
        self: Arc<Self>,
        io: I,
        info: ConnInfo,
        conn: ConnSettings,
        plain_tcp: bool,
        counted: Counted,
    ) -> impl Future<Output = ()> + Send
    where
        I: ClientStream,
    {
        let ConnSettings {
            client_header,
            idle,
            head_limits,
            builders,
            activity,
            idle_gauge,
        } = conn;
        // HTTP/1 heads are checked before hyper reads them (see `framing`); the verdicts go to
        // the service, one per request.
        let verdicts = Arc::new(Verdicts::default());
        let mut io = CheckedIo::new(io, head_limits, Arc::clone(&verdicts), client_header);
        if plain_tcp {
            io = io.close_is_shutdown();
        }
        io = io.parks_when_idle();
        let shared = Arc::clone(&self.shared);
        let service_activity = Arc::clone(&activity);
        let info = Arc::new(info);
        let connection_info = Arc::clone(&info);
        let service = service_fn(move |mut request: hyper::Request<hyper::body::Incoming>| {
            let shared = Arc::clone(&shared);
            let info = Arc::clone(&info);
            let waiting = service_activity.wait();
            let verdict = if request.version() < http::Version::HTTP_2 {
                verdicts.next()
            } else {
                Verdict::default()
            };
            if let Some(rejection) = verdict.rejection {
                request.extensions_mut().insert(rejection);
            }
            let answered = Arc::clone(&verdicts);
            // Only an HTTP/2 response dates its waits on the client (see `framing::Answered`).
            let dated =
                (request.version() == http::Version::HTTP_2).then(|| Arc::clone(&service_activity));
            // Only a request that asked to switch protocols reports back how it was answered.
            let upgrade = verdict.upgrade.then(|| {
                (
                    Arc::clone(&verdicts),
                    request.method() == http::Method::CONNECT,
                )
            });
            async move {
                let response = proxy::handle(&shared, &info, request).await;
                if let Some((verdicts, connect)) = upgrade {
                    // Before hyper sends the answer: a 101 (or a 2xx to CONNECT) makes the rest
                    // of the connection a tunnel; anything else, more requests.
                    let status = response.status();
                    let switched = status == http::StatusCode::SWITCHING_PROTOCOLS
                        || (connect && status.is_success());
                    verdicts.switched(switched);
                }
                drop(waiting);
                Ok::<_, Infallible>(response.map(|body| Answered::new(body, answered, dated)))
            }
        });
        let serving = Serving::new(io, service, builders, idle_gauge);
        Watched::new(
            serving,
            activity,
            connection_info,
            idle,
            counted,
            Arc::clone(&self.dormant),
        )
    }

    /// hyper's servers as `timeouts` and `limits` configure them, shared by the connections that
    /// start under the same values: configuring them costs a dozen allocations (two timers, the
    /// HTTP/2 settings), which a connection then does not pay.
    fn builders(&self, timeouts: &Timeouts, limits: &Limits) -> Arc<Builders> {
        let key = BuildersKey {
            client_header: timeouts.client_header,
            max_header_bytes: limits.max_header_bytes,
            max_headers: limits.max_headers,
        };
        // Lock-free: every accepted connection reads it. Two connections finding it stale at
        // once both build, and the last one stored stays; either is right.
        if let Some(cached) = &*self.builders.load() {
            if cached.key == key {
                return Arc::clone(&cached.builders);
            }
        }
        // hyper starts this timer when an HTTP/1 connection goes idle too, so it also bounds idle
        // keep-alive connections (with `framing`'s clock once the connection parks); the idle
        // check (`idle::Watched`) covers HTTP/2 and longer `client_header` values. With it set,
        // hyper also reads at once when a response ends rather than waiting for readiness, which
        // is where an idle connection's park begins (`framing::CheckedIo::parks_when_idle`).
        let mut http1 = http1::Builder::new();
        http1
            .timer(TokioTimer::new())
            .header_read_timeout(timeouts.client_header)
            .keep_alive(true)
            // hyper's buffer holds one head at most, so the requests `framing` stepped aside from
            // (after a refused upgrade) are bounded too; hyper answers 431 past it.
            .max_buf_size(limits.max_header_bytes.max(HYPER_MIN_BUF_SIZE));
        if limits.max_headers != HYPER_MAX_HEADERS {
            http1.max_headers(limits.max_headers);
        }
        // The header list size bounds HTTP/2 heads (decoded, with the 32-byte per-field overhead
        // of RFC 9113 §6.5.2); a larger one gets `431`. The h2 crate also derives from it how
        // many CONTINUATION frames one header block may take (list size / frame size + 25%, at
        // least 5), and ends the connection with ENHANCE_YOUR_CALM past that: a CONTINUATION
        // flood costs it a bounded buffer, never unbounded memory or CPU.
        let header_list = u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX);
        let mut http2 = http2::Builder::new(TokioExecutor::new());
        http2
            .timer(TokioTimer::new())
            .max_concurrent_streams(H2_MAX_CONCURRENT_STREAMS)
            .max_header_list_size(header_list)
            .max_pending_accept_reset_streams(H2_MAX_PENDING_ACCEPT_RESET_STREAMS)
            .max_local_error_reset_streams(H2_MAX_LOCAL_ERROR_RESET_STREAMS);
        let builders = Arc::new(Builders { http1, http2 });
        self.builders.store(Some(Arc::new(CachedBuilders {
            key,
            builders: Arc::clone(&builders),
        })));
        builders
    }

    /// Stops accepting, lets in-flight requests finish for at most `limit`, closes upgraded
    /// connections (see [`Tunnels::stop`](crate::proxy::Tunnels::stop)), and reports whether every
    /// connection finished in time.
    pub async fn shutdown(&self, limit: Duration) -> bool {
        self.stopped.store(true, Ordering::Release);
        self.shutdown.cancel();
        self.connections.close();
        // Tunnels have no request to finish: they are closed now, a WebSocket with 1001.
        let tunnels = &self.shared.tunnels;
        tunnels.stop();
        let finished = tokio::time::timeout(limit, async {
            self.connections.wait().await;
            tunnels.stopped().await;
        })
        .await
        .is_ok();
        if !finished {
            tracing::warn!(
                remaining = self.connections.len(),
                tunnels = tunnels.len(),
                "shutdown timeout reached with connections still open"
            );
        }
        finished
    }
}

/// A listener's open client connections: its `switchyard_downstream_connections` gauge and the
/// figure its `max_connections` is checked against. Upgraded connections count here too, from the
/// request that switched protocols to the tunnel's end (see [`ListenerCount::count`]).
#[derive(Debug, Clone)]
pub(crate) struct ListenerCount {
    open: Option<IntGauge>,
    here: Arc<AtomicUsize>,
}

impl ListenerCount {
    fn new(open: Option<IntGauge>) -> Self {
        ListenerCount {
            open,
            here: Arc::new(AtomicUsize::new(0)),
        }
    }

    fn open_now(&self) -> usize {
        self.here.load(Ordering::Relaxed)
    }

    /// Counts one open connection until the result is dropped.
    pub(crate) fn count(&self) -> Counted {
        if let Some(open) = &self.open {
            open.inc();
        }
        self.here.fetch_add(1, Ordering::Relaxed);
        Counted(self.clone())
    }
}

/// One open client connection, counted in its listener until dropped.
#[derive(Debug)]
pub(crate) struct Counted(ListenerCount);

impl Counted {
    /// The listener it is counted in.
    fn listener(&self) -> &ListenerCount {
        &self.0
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        if let Some(open) = &self.0.open {
            open.dec();
        }
        self.0.here.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Counts one in a gauge until dropped: an open client connection in its listener's gauge, a
/// parked one in the idle gauge.
pub(crate) struct GaugeGuard(prometheus::IntGauge);

impl GaugeGuard {
    /// Counts one in `gauge` until the guard is dropped.
    pub(crate) fn new(gauge: prometheus::IntGauge) -> Self {
        gauge.inc();
        GaugeGuard(gauge)
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// How far ahead the runtime's timer always has something due; see [`timer_floor`].
const TIMER_FLOOR: Duration = Duration::from_secs(1);

/// Keeps a timer due within [`TIMER_FLOOR`] until `stop`. tokio's time driver wakes its I/O
/// driver (a `write` to an eventfd, so a syscall) whenever a timer is armed that is due before the
/// driver's next planned wake-up, even when the runtime's own thread is the one arming it. Each
/// connection and request arms timers seconds ahead (`client_header`, the idle checks,
/// `response_header`), and strace counted 0.18 of those writes per keep-alive request and 1.9 per
/// new connection. With a wake-up planned within a second, timers further ahead do not cause one;
/// a wake-up a second with nothing to do costs far less.
async fn timer_floor(stop: CancellationToken) {
    let mut tick = tokio::time::interval(TIMER_FLOOR);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
    }
}

/// Sleeps until `deadline`, or forever without one (for an optional `select!` branch).
pub(crate) async fn sleep_until_opt(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Every listener a config asks for: the proxy listeners in file order, then the admin one.
fn wanted_listeners(config: &Config) -> Vec<ListenerKey> {
    let mut keys: Vec<ListenerKey> = proxy_listeners(config)
        .into_iter()
        .map(|(key, _)| key)
        .collect();
    if let Some(admin) = &config.admin {
        keys.push((Role::Admin, admin.listen, 0));
    }
    keys
}

/// Each `[[listeners]]` entry with its key: several entries on `127.0.0.1:0` are told apart by
/// their order.
fn proxy_listeners(config: &Config) -> Vec<(ListenerKey, &ListenerConfig)> {
    let mut keyed: Vec<(ListenerKey, &ListenerConfig)> = Vec::with_capacity(config.listeners.len());
    for listener in &config.listeners {
        let seen = keyed
            .iter()
            .filter(|(key, _)| key.1 == listener.listen)
            .count();
        keyed.push(((Role::Proxy, listener.listen, seen), listener));
    }
    keyed
}

/// Binds every address, or none: a failure drops what was already bound.
fn bind_all(
    config: &Config,
    keys: &[ListenerKey],
) -> std::io::Result<Vec<(ListenerKey, TcpListener)>> {
    let mut bound = Vec::with_capacity(keys.len());
    for &key in keys {
        let address = key.1;
        let listener = listen(address).map_err(|e| {
            let (file, name) = (config.path.display(), key_name(config, key));
            std::io::Error::new(
                e.kind(),
                format!("{file}: {name}: cannot listen on {address}: {e}"),
            )
        })?;
        bound.push((key, listener));
    }
    Ok(bound)
}

/// The config key a listener comes from: `admin.listen`, or `listeners[i].listen`.
fn key_name(config: &Config, key: ListenerKey) -> String {
    let (role, address, seen) = key;
    if role == Role::Admin {
        return "admin.listen".to_owned();
    }
    config
        .listeners
        .iter()
        .enumerate()
        .filter(|(_, l)| l.listen == address)
        .nth(seen)
        .map_or_else(
            || "listeners".to_owned(),
            |(i, _)| format!("listeners[{i}].listen"),
        )
}

/// A listening socket as `TcpListener::bind` makes one on Unix (`SO_REUSEADDR`), with a backlog of
/// [`LISTEN_BACKLOG`] and `TCP_NODELAY` set: Linux copies it to every socket `accept` returns,
/// which saves a `setsockopt` per connection.
fn listen(address: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if address.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_nodelay(true)?;
    socket.bind(address)?;
    socket.listen(LISTEN_BACKLOG)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `serve_connection` relies on accepted sockets inheriting `TCP_NODELAY` from the listener.
    #[tokio::test]
    async fn accepted_sockets_have_nodelay() {
        let listener = listen("127.0.0.1:0".parse().unwrap()).unwrap();
        let address = listener.local_addr().unwrap();
        let client = TcpStream::connect(address).await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        assert!(accepted.nodelay().unwrap());
        drop(client);
    }
}
