//! Draining a backend, by removing it from the config or through the admin API: no new work, work
//! already sent finishes, upgraded connections are cut at the deadline (WebSocket with a 1001 close
//! frame at a frame boundary), sticky clients per `drain_sticky`, and what `/status` and `/metrics`
//! report about it.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::StatusCode;
use serde_json::Value;
use support::*;
use switchyard::backend::BackendStatus;
use switchyard::server::Server;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

/// Every test's admin listener.
const ADMIN: &str = "[admin]\nlisten = \"127.0.0.1:0\"\n";

/// Pool `app` (cookie `sy`, see [`one_pool`]) with `pool_extra` in it, and an admin listener.
fn drain_config(strategy: &str, addrs: &[(SocketAddr, u32)], pool_extra: &str) -> String {
    pool_with(
        strategy,
        addrs,
        pool_extra,
        &format!("[\"{SECRET}\"]"),
        ADMIN,
    )
}

/// The running proxy: the server, its proxy listener and its admin listener.
struct Running {
    server: Arc<Server>,
    proxy: SocketAddr,
    admin: SocketAddr,
}

impl Running {
    async fn start(strategy: &str, addrs: &[(SocketAddr, u32)], pool_extra: &str) -> Running {
        let (server, proxy) = proxy(&drain_config(strategy, addrs, pool_extra)).await;
        let admin = server.admin_addr().expect("admin listener configured");
        Running {
            server,
            proxy,
            admin,
        }
    }

    /// Applies a new config with the same shape, e.g. fewer backends.
    async fn reload(&self, strategy: &str, addrs: &[(SocketAddr, u32)], pool_extra: &str) {
        self.server
            .reload(config(&drain_config(strategy, addrs, pool_extra)))
            .await
            .expect("reload succeeds");
    }

    /// Sends `method path` to the admin listener; returns the status and the body as JSON (or as a
    /// JSON string when it is not JSON).
    async fn admin(&self, method: &str, path: &str) -> (StatusCode, Value) {
        let reply = send(&client(), self.admin, method, path, &[], Bytes::new()).await;
        let body = serde_json::from_str(&reply.body).unwrap_or(Value::String(reply.body));
        (reply.status, body)
    }

    /// `POST /pools/app/backends/{backend}/{action}{query}`.
    async fn runtime(&self, backend: SocketAddr, action: &str, query: &str) -> (StatusCode, Value) {
        self.admin(
            "POST",
            &format!("/pools/app/backends/{backend}/{action}{query}"),
        )
        .await
    }

    /// `GET /status`.
    async fn status(&self) -> Value {
        let (status, body) = self.admin("GET", "/status").await;
        assert_eq!(status, 200, "{body}");
        body
    }

    /// The `/status` entry of `backend` in pool `app`, if listed.
    async fn backend_status(&self, backend: SocketAddr) -> Option<Value> {
        let status = self.status().await;
        let pool = status["pools"]
            .as_array()
            .expect("pools is a list")
            .iter()
            .find(|p| p["name"] == "app")
            .expect("pool app listed")
            .clone();
        pool["backends"]
            .as_array()
            .expect("backends is a list")
            .iter()
            .find(|b| b["address"] == backend.to_string())
            .cloned()
    }

    /// The `state` `/status` gives `backend` in pool `pool`, or `"unlisted"`.
    async fn state_of_in(&self, pool: &str, backend: SocketAddr) -> String {
        let status = self.status().await;
        status["pools"]
            .as_array()
            .expect("pools is a list")
            .iter()
            .filter(|p| p["name"] == pool)
            .flat_map(|p| p["backends"].as_array().cloned().unwrap_or_default())
            .find(|b| b["address"] == backend.to_string())
            .map_or_else(
                || "unlisted".to_owned(),
                |b| b["state"].as_str().expect("state is a string").to_owned(),
            )
    }

    /// The `state` `/status` gives `backend`, or `"unlisted"`.
    async fn state_of(&self, backend: SocketAddr) -> String {
        self.backend_status(backend).await.map_or_else(
            || "unlisted".to_owned(),
            |b| b["state"].as_str().expect("state is a string").to_owned(),
        )
    }

    /// Polls `/status` until `backend` is in `state` (or unlisted, for `"unlisted"`).
    async fn wait_for_state(&self, backend: SocketAddr, state: &str) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let now = self.state_of(backend).await;
            if now == state {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{backend} still {now}, never {state}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// `switchyard_backend_drains_total{end="<end>"}` from `GET /metrics` (0 when absent).
    async fn drains(&self, end: &str) -> u64 {
        let (status, body) = self.admin("GET", "/metrics").await;
        assert_eq!(status, 200);
        let text = body.as_str().expect("metrics are text");
        let series = format!("switchyard_backend_drains_total{{end=\"{end}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(series.as_str()))
            .map_or(0, |v| v.trim().parse().expect("counter value"))
    }

    /// Polls `/metrics` until `drains(end)` reaches `n`.
    async fn wait_for_drains(&self, end: &str, n: u64) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let now = self.drains(end).await;
            if now >= n {
                assert_eq!(now, n, "drains ending {end}");
                return;
            }
            assert!(
                Instant::now() < deadline,
                "drains ending {end}: {now}, never {n}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Live status of `backend`, read from the registry.
    fn live_status(&self, backend: SocketAddr) -> Option<BackendStatus> {
        self.server
            .shared()
            .registry
            .get(backend)
            .map(|s| s.status())
    }
}

/// Sends `GET path` in the background and waits until one of `apps` is handling it; returns the
/// request and the index of that app.
async fn in_flight(
    proxy: SocketAddr,
    apps: &[switchyard::demo::AppServer],
    path: &str,
    headers: &[(&str, &str)],
) -> (JoinHandle<Reply>, usize) {
    let path = path.to_owned();
    let headers: Vec<(String, String)> = headers
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    let request = tokio::spawn(async move {
        let headers: Vec<(&str, &str)> = headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        get(proxy, &path, &headers).await
    });
    wait_until("a backend is handling the slow request", || {
        apps.iter().any(|a| a.in_flight() == 1)
    })
    .await;
    let index = apps.iter().position(|a| a.in_flight() == 1).unwrap();
    (request, index)
}

/// `n` plain requests; returns the `x-backend` of each.
async fn backends_of(proxy: SocketAddr, n: usize) -> Vec<String> {
    let mut seen = Vec::new();
    for _ in 0..n {
        let reply = get(proxy, "/", &[]).await;
        assert_eq!(reply.status, 200, "{reply:?}");
        seen.push(reply.backend());
    }
    seen
}

/// A WebSocket backend that echoes text and binary messages; counts the connections it accepted.
async fn ws_echo_backend() -> (SocketAddr, Arc<AtomicU64>, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicU64::new(0));
    let count = Arc::clone(&accepted);
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
                while let Some(Ok(message)) = ws.next().await {
                    if (message.is_text() || message.is_binary()) && ws.send(message).await.is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    (addr, accepted, task)
}

/// A WebSocket backend that, once the client's first message arrives, writes the first 4 payload
/// bytes of an 8-byte binary frame, and writes the other 4 only when `finish` fires (never, if it
/// is dropped).
async fn ws_half_frame_backend() -> (SocketAddr, tokio::sync::oneshot::Sender<()>, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (finish, finished) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let mut ws = tokio_tungstenite::accept_async(stream).await.unwrap();
        let _ = ws.next().await;
        let raw = ws.get_mut();
        raw.write_all(&[0x82, 8, b'h', b'a', b'l', b'f'])
            .await
            .unwrap();
        if finished.await.is_ok() {
            raw.write_all(b"done").await.unwrap();
        }
        // Hold the connection open until the proxy closes it.
        let mut sink = [0u8; 64];
        while matches!(raw.read(&mut sink).await, Ok(n) if n > 0) {}
    });
    (addr, finish, task)
}

/// A backend that answers any request with `101 Switching Protocols` to protocol `foo`, then
/// echoes raw bytes.
async fn raw_upgrade_backend() -> (SocketAddr, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                if read_head(&mut stream).await.is_none() {
                    return;
                }
                let switch = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: foo\r\n\
                               Connection: upgrade\r\n\r\n";
                if stream.write_all(switch).await.is_err() {
                    return;
                }
                let mut buf = [0u8; 4096];
                loop {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if stream.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    (addr, task)
}

/// A keep-alive HTTP/1.1 backend that answers every request `ok`, `GET /sleep/{ms}` after that
/// long; counts the connections open to it (accepted and not yet closed by the other end).
async fn counting_backend() -> (SocketAddr, Arc<AtomicU64>, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let open = Arc::new(AtomicU64::new(0));
    let count = Arc::clone(&open);
    let task = tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            let count = Arc::clone(&count);
            tokio::spawn(async move {
                while let Some(head) = read_head(&mut stream).await {
                    let sleep = head
                        .strip_prefix("GET /sleep/")
                        .and_then(|rest| rest.split(' ').next())
                        .and_then(|ms| ms.parse().ok());
                    if let Some(ms) = sleep {
                        tokio::time::sleep(Duration::from_millis(ms)).await;
                    }
                    let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
                    if stream.write_all(ok).await.is_err() {
                        break;
                    }
                }
                count.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });
    (addr, open, task)
}

/// Reads one HTTP head, byte by byte so nothing after it is consumed.
async fn read_head(stream: &mut TcpStream) -> Option<String> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte).await.ok()? == 0 {
            return None;
        }
        head.push(byte[0]);
    }
    Some(String::from_utf8_lossy(&head).into_owned())
}

/// Opens a WebSocket to `ws://{proxy}/ws`.
async fn ws_connect(proxy: SocketAddr) -> tokio_tungstenite::WebSocketStream<TcpStream> {
    let stream = TcpStream::connect(proxy).await.unwrap();
    let (ws, response) = tokio_tungstenite::client_async(format!("ws://{proxy}/ws"), stream)
        .await
        .expect("WebSocket handshake through the proxy");
    assert_eq!(response.status(), 101);
    ws
}

/// Sends `text` and expects it echoed.
async fn ws_echo(ws: &mut tokio_tungstenite::WebSocketStream<TcpStream>, text: &str) {
    ws.send(Message::text(text)).await.expect("send");
    let echoed = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .expect("echo within 5s")
        .expect("socket open")
        .expect("a message");
    assert_eq!(echoed, Message::text(text));
}

// ---------------------------------------------------------------------------------------------
// Removed by a reload
// ---------------------------------------------------------------------------------------------

/// Two pools, `app` for everything and `other` for `/sleep`, each with one backend, and an
/// admin listener; without `other` when `with_other` is false.
fn two_pools(app: SocketAddr, other: SocketAddr, with_other: bool) -> String {
    let other_pool = format!(
        "[[routes]]\npath_prefix = \"/sleep\"\npool = \"other\"\n\n\
         [pools.other]\nstrategy = \"round_robin\"\ndrain_timeout = \"5s\"\n\
         backends = [{{ address = \"{other}\" }}]\n\n"
    );
    format!(
        "{ADMIN}\n[[listeners]]\nlisten = \"127.0.0.1:0\"\n\n{}[[routes]]\npool = \"app\"\n\n\
         [pools.app]\nstrategy = \"round_robin\"\nbackends = [{{ address = \"{app}\" }}]\n",
        if with_other { other_pool.as_str() } else { "" }
    )
}

/// A backend whose whole pool a reload removes still drains, and stays visible while it does: its
/// pool is listed in `/status` as `removed`, with the backend draining and its request in flight,
/// and its metric series stay; once the drain ends, the pool, the backend and the series go.
#[tokio::test]
async fn a_backend_of_a_removed_pool_is_visible_until_its_drain_ends() {
    let apps = apps(2).await;
    let (app, other) = (apps[0].addr(), apps[1].addr());
    let (server, proxy) = proxy(&two_pools(app, other, true)).await;
    let run = Running {
        admin: server.admin_addr().unwrap(),
        server,
        proxy,
    };
    let slow = tokio::spawn(async move { get(proxy, "/sleep/1000", &[]).await });
    wait_until("the slow request is in flight", || apps[1].in_flight() == 1).await;

    run.server
        .reload(config(&two_pools(app, other, false)))
        .await
        .expect("reload succeeds");
    let status = run.status().await;
    let pool = status["pools"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "other")
        .unwrap_or_else(|| panic!("the removed pool is listed while it drains: {status}"))
        .clone();
    assert_eq!(pool["removed"], true, "{pool}");
    let backend = &pool["backends"][0];
    assert_eq!(backend["address"], other.to_string(), "{pool}");
    assert_eq!(backend["state"], "draining", "{pool}");
    assert_eq!(backend["in_flight"], 1, "{pool}");
    let series = "pool=\"other\"";
    let (_, metrics) = run.admin("GET", "/metrics").await;
    assert!(metrics.as_str().unwrap().contains(series), "{metrics}");
    // Nothing routes to it: every request goes to `app`, `/sleep` included.
    assert_eq!(get(proxy, "/sleep/1", &[]).await.backend(), "app1");

    assert_eq!(slow.await.unwrap().status, 200);
    run.wait_for_drains("drained", 1).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let status = run.status().await;
        let pools = status["pools"].as_array().unwrap();
        if pools.iter().all(|p| p["name"] != "other") {
            break;
        }
        assert!(Instant::now() < deadline, "the pool stayed: {status}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (_, metrics) = run.admin("GET", "/metrics").await;
    let metrics = metrics.as_str().unwrap().to_owned();
    assert!(
        !metrics
            .lines()
            .any(|l| l.contains(series) && l.contains(&other.to_string())),
        "{metrics}"
    );
}

/// A backend of a removed pool that a later reload lists again, in another pool, is called off
/// its drain and shown only there: the removed pool goes with that reload.
#[tokio::test]
async fn a_removed_pools_backend_listed_again_elsewhere_leaves_the_removed_pool() {
    let apps = apps(2).await;
    let (app, other) = (apps[0].addr(), apps[1].addr());
    let (server, proxy) = proxy(&two_pools(app, other, true)).await;
    let run = Running {
        admin: server.admin_addr().unwrap(),
        server,
        proxy,
    };
    let slow = tokio::spawn(async move { get(proxy, "/sleep/1500", &[]).await });
    wait_until("the slow request is in flight", || apps[1].in_flight() == 1).await;
    run.server
        .reload(config(&two_pools(app, other, false)))
        .await
        .expect("reload succeeds");
    assert_eq!(run.state_of_in("other", other).await, "draining");

    // `other`'s backend joins pool `app`.
    let both = two_pools(app, other, false).replace(
        &format!("backends = [{{ address = \"{app}\" }}]"),
        &format!("backends = [{{ address = \"{app}\" }}, {{ address = \"{other}\" }}]"),
    );
    run.server
        .reload(config(&both))
        .await
        .expect("reload succeeds");
    let status = run.status().await;
    let names: Vec<&str> = status["pools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["app"], "{status}");
    assert_eq!(run.state_of_in("app", other).await, "active");
    assert_eq!(slow.await.unwrap().status, 200);
}

#[tokio::test]
async fn removed_backend_takes_no_new_requests_and_finishes_the_one_it_has() {
    let apps = apps(2).await;
    let run = Running::start("round_robin", &weight_one(&apps), "drain_timeout = \"5s\"").await;
    let (slow, x) = in_flight(run.proxy, &apps, "/sleep/1000", &[]).await;
    let y = 1 - x;
    let before = apps[x].requests();

    run.reload(
        "round_robin",
        &[(apps[y].addr(), 1)],
        "drain_timeout = \"5s\"",
    )
    .await;
    let draining = run.backend_status(apps[x].addr()).await.expect("listed");
    assert_eq!(draining["state"], "draining", "{draining}");
    assert_eq!(draining["in_flight"], 1, "{draining}");
    assert_eq!(draining["drain_removed"], true, "{draining}");

    let seen = backends_of(run.proxy, 6).await;
    assert!(seen.iter().all(|b| b == apps[y].name()), "{seen:?}");
    assert_eq!(
        apps[x].requests(),
        before,
        "the removed backend got new work"
    );

    let reply = slow.await.unwrap();
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.backend(), apps[x].name());

    // Nothing left in flight: the drain ends well before its 5s timeout and the backend is released.
    run.wait_for_state(apps[x].addr(), "unlisted").await;
    run.wait_for_drains("drained", 1).await;
    assert_eq!(run.drains("deadline").await, 0);
    assert_eq!(
        run.live_status(apps[x].addr()),
        None,
        "still in the registry"
    );
}

#[tokio::test]
async fn removed_backend_with_nothing_in_flight_is_released_at_once() {
    let apps = apps(2).await;
    let run = Running::start("round_robin", &weight_one(&apps), "drain_timeout = \"30s\"").await;
    backends_of(run.proxy, 2).await;
    let state = run.server.shared().registry.get(apps[0].addr()).unwrap();

    run.reload(
        "round_robin",
        &[(apps[1].addr(), 1)],
        "drain_timeout = \"30s\"",
    )
    .await;
    run.wait_for_drains("drained", 1).await;
    assert_eq!(state.status(), BackendStatus::Retired);
    run.wait_for_state(apps[0].addr(), "unlisted").await;
}

#[tokio::test]
async fn deadline_ends_the_drain_but_lets_a_plain_request_finish() {
    let apps = apps(2).await;
    let run = Running::start("round_robin", &weight_one(&apps), "drain_timeout = \"1s\"").await;
    let (slow, x) = in_flight(run.proxy, &apps, "/sleep/2000", &[]).await;
    run.reload(
        "round_robin",
        &[(apps[1 - x].addr(), 1)],
        "drain_timeout = \"1s\"",
    )
    .await;

    run.wait_for_drains("deadline", 1).await;
    assert_eq!(run.drains("drained").await, 0);
    assert_eq!(apps[x].in_flight(), 1, "the request was cut with the drain");
    let reply = slow.await.unwrap();
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.backend(), apps[x].name());
}

#[tokio::test]
async fn backend_added_back_while_draining_is_active_with_its_state_intact() {
    let apps = apps(2).await;
    let (a, b) = (apps[0].addr(), apps[1].addr());
    let run = Running::start("round_robin", &[(a, 1)], "drain_timeout = \"5s\"").await;
    backends_of(run.proxy, 3).await;
    let (slow, x) = in_flight(run.proxy, &apps[..1], "/sleep/1000", &[]).await;
    assert_eq!(x, 0);
    let state = run.server.shared().registry.get(a).unwrap();

    run.reload("round_robin", &[(b, 1)], "drain_timeout = \"5s\"")
        .await;
    assert_eq!(run.state_of(a).await, "draining");
    run.reload("round_robin", &[(a, 1), (b, 1)], "drain_timeout = \"5s\"")
        .await;

    let back = run.backend_status(a).await.expect("listed");
    assert_eq!(back["state"], "active", "{back}");
    assert_eq!(back["requests"], 4, "{back}");
    assert_eq!(
        back["in_flight"], 1,
        "the slow request is still counted: {back}"
    );
    assert_eq!(back["drain_time_left_s"], Value::Null, "{back}");
    let again = run.server.shared().registry.get(a).unwrap();
    assert!(
        Arc::ptr_eq(&state, &again),
        "a new state replaced the old one"
    );

    let seen = backends_of(run.proxy, 4).await;
    assert_eq!(
        seen.iter().filter(|s| *s == apps[0].name()).count(),
        2,
        "{seen:?}"
    );
    assert_eq!(run.backend_status(a).await.unwrap()["requests"], 6);

    assert_eq!(slow.await.unwrap().status, 200);
    // Called off, the drain never ends by itself: still active after the slow request finished.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(run.state_of(a).await, "active");
    assert_eq!(run.drains("drained").await, 0);
    assert_eq!(run.drains("deadline").await, 0);
}

// ---------------------------------------------------------------------------------------------
// Upgraded connections
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn websocket_through_a_removed_backend_stays_open_then_gets_1001_at_the_deadline() {
    let apps = apps(1).await;
    let (ws_backend, accepted, _task) = ws_echo_backend().await;
    let run = Running::start("round_robin", &[(ws_backend, 1)], "drain_timeout = \"1s\"").await;
    let mut ws = ws_connect(run.proxy).await;
    ws_echo(&mut ws, "before").await;

    let reloaded = Instant::now();
    run.reload(
        "round_robin",
        &[(apps[0].addr(), 1)],
        "drain_timeout = \"1s\"",
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    ws_echo(&mut ws, "while draining").await;
    let draining = run.backend_status(ws_backend).await.expect("listed");
    assert_eq!(draining["state"], "draining", "{draining}");
    assert_eq!(draining["upgraded"], 1, "{draining}");
    assert_eq!(draining["in_flight"], 0, "{draining}");
    let left = draining["drain_time_left_s"].as_f64().expect("time left");
    assert!(left > 0.0 && left <= 1.0, "{draining}");
    // New work goes elsewhere, WebSockets included.
    assert_eq!(get(run.proxy, "/", &[]).await.backend(), apps[0].name());
    assert_eq!(accepted.load(Ordering::Relaxed), 1);

    let close = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .expect("closed within 5s of the reload")
        .expect("a close frame before the end")
        .expect("a message");
    assert!(
        reloaded.elapsed() >= Duration::from_millis(950),
        "cut before the deadline"
    );
    let Message::Close(Some(frame)) = close else {
        panic!("expected a close frame, got {close:?}");
    };
    assert_eq!(frame.code, CloseCode::Away);
    let after = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .expect("connection ends after the close frame");
    assert!(
        matches!(after, None | Some(Err(_))),
        "still open: {after:?}"
    );

    run.wait_for_drains("deadline", 1).await;
    run.wait_for_state(ws_backend, "unlisted").await;
}

#[tokio::test]
async fn raw_upgrade_through_a_removed_backend_is_closed_at_the_deadline_without_a_close_frame() {
    let apps = apps(1).await;
    let (backend, _task) = raw_upgrade_backend().await;
    let run = Running::start("round_robin", &[(backend, 1)], "drain_timeout = \"1s\"").await;
    let mut stream = TcpStream::connect(run.proxy).await.unwrap();
    stream
        .write_all(
            b"GET /raw HTTP/1.1\r\nHost: raw.test\r\nConnection: upgrade\r\nUpgrade: foo\r\n\r\n",
        )
        .await
        .unwrap();
    let head = read_head(&mut stream).await.expect("a response head");
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let mut echo = [0u8; 4];
    stream.write_all(b"ping").await.unwrap();
    stream.read_exact(&mut echo).await.unwrap();
    assert_eq!(&echo, b"ping");

    let reloaded = Instant::now();
    run.reload(
        "round_robin",
        &[(apps[0].addr(), 1)],
        "drain_timeout = \"1s\"",
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stream.write_all(b"pong").await.unwrap();
    stream.read_exact(&mut echo).await.unwrap();
    assert_eq!(&echo, b"pong", "still echoing while draining");
    assert_eq!(run.state_of(backend).await, "draining");

    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest))
        .await
        .expect("closed within 5s of the reload")
        .expect("a clean end of stream");
    assert!(
        reloaded.elapsed() >= Duration::from_millis(950),
        "cut before the deadline"
    );
    assert!(rest.is_empty(), "bytes before the end: {rest:?}");
    run.wait_for_drains("deadline", 1).await;
}

#[tokio::test]
async fn websocket_cut_waits_for_the_frame_in_progress() {
    let apps = apps(1).await;
    let (backend, finish, _task) = ws_half_frame_backend().await;
    let run = Running::start("round_robin", &[(backend, 1)], "drain_timeout = \"1s\"").await;
    let mut ws = ws_connect(run.proxy).await;
    ws.send(Message::text("go")).await.unwrap();
    wait_until("half a frame has left the backend", || {
        run.server
            .shared()
            .registry
            .get(backend)
            .is_some_and(|s| s.upgraded() == 1)
    })
    .await;

    let reloaded = Instant::now();
    run.reload(
        "round_robin",
        &[(apps[0].addr(), 1)],
        "drain_timeout = \"1s\"",
    )
    .await;
    // Past the deadline (1s) but inside the grace a cut gives the frame in progress (1s more).
    tokio::time::sleep_until(reloaded + Duration::from_millis(1300)).await;
    finish.send(()).unwrap();

    let first = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .expect("a message within 5s")
        .expect("socket open")
        .expect("a whole frame");
    assert_eq!(first, Message::binary(&b"halfdone"[..]));
    let close = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .expect("closed within 5s")
        .expect("a close frame")
        .expect("a message");
    let Message::Close(Some(frame)) = close else {
        panic!("expected a close frame, got {close:?}");
    };
    assert_eq!(frame.code, CloseCode::Away);
}

#[tokio::test]
async fn websocket_frame_never_finished_is_closed_without_a_frame_spliced_into_it() {
    let apps = apps(1).await;
    let (backend, finish, _task) = ws_half_frame_backend().await;
    let run = Running::start("round_robin", &[(backend, 1)], "drain_timeout = \"1s\"").await;
    let mut ws = ws_connect(run.proxy).await;
    ws.send(Message::text("go")).await.unwrap();
    wait_until("the upgrade is counted", || {
        run.server
            .shared()
            .registry
            .get(backend)
            .is_some_and(|s| s.upgraded() == 1)
    })
    .await;
    // Give the half frame time to reach the client side of the proxy.
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(finish);

    run.reload(
        "round_robin",
        &[(apps[0].addr(), 1)],
        "drain_timeout = \"1s\"",
    )
    .await;
    // 4 payload bytes are missing; a close frame (4 bytes) written now would complete the frame
    // with garbage, which the client would take for a message.
    let next = tokio::time::timeout(Duration::from_secs(6), ws.next())
        .await
        .expect("the connection ends within 6s");
    assert!(
        matches!(next, None | Some(Err(_))),
        "the client got {next:?}"
    );
    run.wait_for_drains("deadline", 1).await;
}

#[tokio::test]
async fn upgraded_client_that_stops_reading_is_still_cut_at_the_deadline() {
    let apps = apps(1).await;
    // After the 101, the backend writes as fast as it can until its connection is closed.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = listener.local_addr().unwrap();
    let (closed_tx, closed) = tokio::sync::oneshot::channel::<()>();
    let _task = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        read_head(&mut stream).await.unwrap();
        stream
            .write_all(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: foo\r\nConnection: upgrade\r\n\r\n",
            )
            .await
            .unwrap();
        let chunk = vec![b'x'; 64 * 1024];
        while stream.write_all(&chunk).await.is_ok() {}
        let _ = closed_tx.send(());
    });
    let run = Running::start("round_robin", &[(backend, 1)], "drain_timeout = \"1s\"").await;
    let mut stream = TcpStream::connect(run.proxy).await.unwrap();
    stream
        .write_all(b"GET /flood HTTP/1.1\r\nHost: flood.test\r\nConnection: upgrade\r\nUpgrade: foo\r\n\r\n")
        .await
        .unwrap();
    let head = read_head(&mut stream).await.expect("a response head");
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let state = run.server.shared().registry.get(backend).unwrap();
    assert_eq!(state.upgraded(), 1);
    // The client reads nothing more: every buffer between it and the backend fills up.
    tokio::time::sleep(Duration::from_millis(200)).await;

    run.reload(
        "round_robin",
        &[(apps[0].addr(), 1)],
        "drain_timeout = \"1s\"",
    )
    .await;
    tokio::time::timeout(Duration::from_secs(5), closed)
        .await
        .expect("the proxy closed the backend's connection within 5s of the reload")
        .unwrap();
    wait_until("the tunnel is gone", || state.upgraded() == 0).await;
    run.wait_for_drains("deadline", 1).await;
    drop(stream);
}

// ---------------------------------------------------------------------------------------------
// Runtime drain through the admin API
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn runtime_drain_with_nothing_in_flight_ends_at_once_and_undrain_restores() {
    let apps = apps(2).await;
    let run = Running::start("round_robin", &weight_one(&apps), "drain_timeout = \"30s\"").await;
    let x = apps[0].addr();

    let (status, body) = run.runtime(x, "drain", "?wait=5s").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["drain"]["end"], "drained", "{body}");
    assert_eq!(body["drain"]["requests_unfinished"], 0, "{body}");
    assert_eq!(body["state"], "drained", "{body}");
    assert_eq!(run.state_of(x).await, "drained");
    assert_eq!(run.drains("drained").await, 1);

    let before = apps[0].requests();
    let seen = backends_of(run.proxy, 6).await;
    assert!(seen.iter().all(|b| b == apps[1].name()), "{seen:?}");
    assert_eq!(apps[0].requests(), before);

    // Draining again is a no-op on a drained backend.
    let (status, body) = run.runtime(x, "drain", "?wait=5s").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(run.drains("drained").await, 1);

    let (status, body) = run.runtime(x, "undrain", "").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["state"], "active", "{body}");
    let seen = backends_of(run.proxy, 6).await;
    assert_eq!(
        seen.iter().filter(|b| *b == apps[0].name()).count(),
        3,
        "{seen:?}"
    );
    assert_eq!(apps[0].requests(), before + 3);
}

#[tokio::test]
async fn drain_wait_answers_when_the_request_in_flight_has_finished() {
    let apps = apps(2).await;
    let run = Running::start("round_robin", &weight_one(&apps), "drain_timeout = \"30s\"").await;
    let (slow, x) = in_flight(run.proxy, &apps, "/sleep/1000", &[]).await;

    let (status, body) = run.runtime(apps[x].addr(), "drain", "?wait=10s").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["drain"]["end"], "drained", "{body}");
    assert!(
        body["drain"]["requests_finished"].as_u64().unwrap() >= 1,
        "{body}"
    );
    assert_eq!(body["drain"]["requests_unfinished"], 0, "{body}");
    let reply = slow.await.unwrap();
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.backend(), apps[x].name());
    assert_eq!(run.state_of(apps[x].addr()).await, "drained");
    assert_eq!(run.drains("drained").await, 1);
}

#[tokio::test]
async fn drain_wait_shorter_than_the_work_answers_202_and_the_drain_goes_on() {
    let apps = apps(2).await;
    let run = Running::start("round_robin", &weight_one(&apps), "drain_timeout = \"30s\"").await;
    let (slow, x) = in_flight(run.proxy, &apps, "/sleep/1500", &[]).await;
    let addr = apps[x].addr();

    let (status, body) = run.runtime(addr, "drain", "?wait=100ms").await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["state"], "draining", "{body}");
    assert_eq!(body["in_flight"], 1, "{body}");
    assert!(body["drain_time_left_s"].as_f64().unwrap() > 0.0, "{body}");

    let before = apps[x].requests();
    let seen = backends_of(run.proxy, 4).await;
    assert!(seen.iter().all(|b| b == apps[1 - x].name()), "{seen:?}");
    assert_eq!(
        apps[x].requests(),
        before,
        "a draining backend got new work"
    );

    let reply = slow.await.unwrap();
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.backend(), apps[x].name());
    run.wait_for_state(addr, "drained").await;
    run.wait_for_drains("drained", 1).await;
}

#[tokio::test]
async fn runtime_drain_rejects_unknown_targets_and_bad_waits() {
    let apps = apps(1).await;
    let run = Running::start("round_robin", &weight_one(&apps), "").await;
    let x = apps[0].addr();
    let (status, _) = run
        .admin("POST", &format!("/pools/nope/backends/{x}/drain"))
        .await;
    assert_eq!(status, 404);
    let other = dead_addr().await;
    assert_eq!(run.runtime(other, "drain", "").await.0, 404);
    assert_eq!(run.runtime(x, "drain", "?wait=soon").await.0, 400);
    let (status, _) = run
        .admin("GET", &format!("/pools/app/backends/{x}/drain"))
        .await;
    assert_eq!(status, 405);
    assert_eq!(
        run.state_of(x).await,
        "active",
        "a rejected drain changed state"
    );
}

#[tokio::test]
async fn drain_closes_the_backends_idle_pooled_connections_at_once() {
    let (backend, open, _task) = counting_backend().await;
    let run = Running::start("round_robin", &[(backend, 1)], "drain_timeout = \"30s\"").await;
    // Two requests at once open two connections, which the proxy then keeps, idle.
    let (a, b) = tokio::join!(
        get(run.proxy, "/sleep/200", &[]),
        get(run.proxy, "/sleep/200", &[])
    );
    assert_eq!((a.status.as_u16(), b.status.as_u16()), (200, 200));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(open.load(Ordering::SeqCst), 2);
    // One carries a slow request, which keeps the drain going; the other stays idle.
    let proxy = run.proxy;
    let slow = tokio::spawn(async move { get(proxy, "/sleep/1500", &[]).await });
    let state = run.server.shared().registry.get(backend).unwrap();
    wait_until("the slow request is in flight", || state.in_flight() == 1).await;
    assert_eq!(
        open.load(Ordering::SeqCst),
        2,
        "the slow request reconnected"
    );

    assert_eq!(run.runtime(backend, "drain", "").await.0, 202);
    wait_until("the backend sees its idle connection closed", || {
        open.load(Ordering::SeqCst) == 1
    })
    .await;
    assert!(!slow.is_finished(), "closed only when the drain ended");
    assert_eq!(run.state_of(backend).await, "draining");

    // The busy connection is not pooled again once its response ends.
    assert_eq!(slow.await.unwrap().status, 200);
    run.wait_for_state(backend, "drained").await;
    wait_until("the backend sees the last connection closed", || {
        open.load(Ordering::SeqCst) == 0
    })
    .await;
}

/// A connection parked in the pool (idle for a second) is closed by a drain as a ready one is.
#[tokio::test]
async fn drain_closes_the_backends_parked_connections_too() {
    let (backend, open, _task) = counting_backend().await;
    let run = Running::start("round_robin", &[(backend, 1)], "drain_timeout = \"30s\"").await;
    assert_eq!(get(run.proxy, "/", &[]).await.status, 200);
    let state = run.server.shared().registry.get(backend).unwrap();
    wait_until("the idle connection is parked", || {
        state.pool.idle_connections() == (0, 1)
    })
    .await;
    assert_eq!(open.load(Ordering::SeqCst), 1);
    assert_eq!(run.runtime(backend, "drain", "").await.0, 202);
    wait_until("the backend sees the parked connection closed", || {
        open.load(Ordering::SeqCst) == 0
    })
    .await;
    assert_eq!(state.pool.idle_connections(), (0, 0));
}

#[tokio::test]
async fn runtime_drained_backend_stays_drained_across_an_unrelated_reload() {
    let apps = apps(2).await;
    let run = Running::start("round_robin", &weight_one(&apps), "drain_timeout = \"30s\"").await;
    let x = apps[0].addr();
    assert_eq!(run.runtime(x, "drain", "?wait=5s").await.0, 200);

    // Re-weights the other backend and changes the strategy; x stays in the config as it was.
    run.reload(
        "least_connections",
        &[(x, 1), (apps[1].addr(), 3)],
        "drain_timeout = \"30s\"",
    )
    .await;
    assert_eq!(run.state_of(x).await, "drained");
    let before = apps[0].requests();
    let seen = backends_of(run.proxy, 6).await;
    assert!(seen.iter().all(|b| b == apps[1].name()), "{seen:?}");
    assert_eq!(apps[0].requests(), before);

    assert_eq!(run.runtime(x, "undrain", "").await.0, 200);
    // Least connections at weights 1:3 sends idle-time requests to the heavier backend; eight at
    // once load it enough that x takes some.
    let proxy = run.proxy;
    let replies =
        futures_util::future::join_all((0..8).map(|_| get(proxy, "/sleep/300", &[]))).await;
    let seen: Vec<String> = replies.iter().map(|r| r.backend().to_owned()).collect();
    assert!(seen.iter().any(|b| b == apps[0].name()), "{seen:?}");
}

#[tokio::test]
async fn runtime_drain_survives_the_backend_being_removed_and_added_back() {
    let apps = apps(2).await;
    let extra = "drain_timeout = \"30s\"";
    let run = Running::start("round_robin", &weight_one(&apps), extra).await;
    let (slow, x) = in_flight(run.proxy, &apps, "/sleep/1000", &[]).await;
    let addr = apps[x].addr();
    assert_eq!(run.runtime(addr, "drain", "").await.0, 202);

    // Removed from the file while the operator's drain is under way, then added back.
    run.reload("round_robin", &[(apps[1 - x].addr(), 1)], extra)
        .await;
    run.reload("round_robin", &weight_one(&apps), extra).await;
    let entry = run.backend_status(addr).await.expect("listed");
    assert_eq!(entry["state"], "draining", "{entry}");
    assert_eq!(entry["drain_removed"], false, "{entry}");

    assert_eq!(slow.await.unwrap().status, 200);
    run.wait_for_state(addr, "drained").await;
    run.wait_for_drains("drained", 1).await;
    assert_eq!(run.drains("cancelled").await, 0);
    let before = apps[x].requests();
    let seen = backends_of(run.proxy, 4).await;
    assert!(seen.iter().all(|b| b == apps[1 - x].name()), "{seen:?}");
    assert_eq!(apps[x].requests(), before, "a drained backend got work");

    assert_eq!(run.runtime(addr, "undrain", "").await.0, 200);
    let seen = backends_of(run.proxy, 4).await;
    assert!(seen.iter().any(|b| b == apps[x].name()), "{seen:?}");
}

// ---------------------------------------------------------------------------------------------
// Sticky clients of a draining backend
// ---------------------------------------------------------------------------------------------

/// Places a client by cookie, keeps its backend draining with a slow request, removes that
/// backend; returns what the same client and a new client get, and the slow request.
async fn sticky_after_removal(
    drain_sticky: &str,
) -> (
    Vec<switchyard::demo::AppServer>,
    usize,
    String,
    Reply,
    Reply,
) {
    let apps = apps(2).await;
    let extra = format!("drain_timeout = \"5s\"\ndrain_sticky = \"{drain_sticky}\"");
    let run = Running::start("cookie", &weight_one(&apps), &extra).await;
    let first = get(run.proxy, "/", &[]).await;
    let token = first.cookie("sy").expect("placed with a cookie");
    let x = apps
        .iter()
        .position(|a| a.name() == first.backend())
        .unwrap();
    let cookie = format!("sy={token}");
    let (slow, slow_on) = in_flight(run.proxy, &apps, "/sleep/1500", &[("cookie", &cookie)]).await;
    assert_eq!(
        slow_on, x,
        "the cookie holder's slow request went elsewhere"
    );

    run.reload("cookie", &[(apps[1 - x].addr(), 1)], &extra)
        .await;
    let same = get(run.proxy, "/", &[("cookie", &cookie)]).await;
    let fresh = get(run.proxy, "/", &[]).await;
    assert_eq!(
        run.live_status(apps[x].addr()),
        Some(BackendStatus::Draining),
        "the drain ended too soon for this test to mean anything"
    );
    // A backend removed from the config cannot be undrained through the API.
    assert_eq!(run.runtime(apps[x].addr(), "undrain", "").await.0, 409);

    let reply = slow.await.unwrap();
    assert_eq!(reply.status, 200, "{reply:?}");
    run.wait_for_state(apps[x].addr(), "unlisted").await;
    // Released, it has left the pool: there is nothing to undrain.
    assert_eq!(run.runtime(apps[x].addr(), "undrain", "").await.0, 404);
    (apps, x, token, same, fresh)
}

#[tokio::test]
async fn sticky_client_keeps_reaching_its_draining_backend_by_default() {
    let (apps, x, _token, same, fresh) = sticky_after_removal("keep").await;
    assert_eq!(same.status, 200, "{same:?}");
    assert_eq!(same.backend(), apps[x].name(), "{same:?}");
    assert_eq!(same.cookie("sy"), None, "re-placed: {same:?}");
    assert_eq!(fresh.backend(), apps[1 - x].name(), "{fresh:?}");
    assert!(fresh.cookie("sy").is_some(), "{fresh:?}");
}

#[tokio::test]
async fn sticky_client_is_moved_off_its_draining_backend_with_drain_sticky_move() {
    let (apps, x, token, same, fresh) = sticky_after_removal("move").await;
    assert_eq!(same.status, 200, "{same:?}");
    assert_eq!(same.backend(), apps[1 - x].name(), "{same:?}");
    let moved = same.cookie("sy").expect("a new cookie for the new backend");
    assert_ne!(moved, token);
    assert_eq!(fresh.backend(), apps[1 - x].name(), "{fresh:?}");
}

// ---------------------------------------------------------------------------------------------
// /status
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn status_lists_each_pool_with_its_backends_and_drain_time_left() {
    let apps = apps(2).await;
    let (a, b) = (apps[0].addr(), apps[1].addr());
    let run = Running::start(
        "least_connections",
        &[(a, 3), (b, 1)],
        "drain_timeout = \"20s\"",
    )
    .await;
    let status = run.status().await;
    let pools = status["pools"].as_array().unwrap();
    assert_eq!(pools.len(), 1, "{status}");
    assert_eq!(pools[0]["name"], "app");
    assert_eq!(pools[0]["strategy"], "least_connections");
    let backends = pools[0]["backends"].as_array().unwrap();
    assert_eq!(backends.len(), 2, "{status}");
    for (entry, (addr, weight)) in backends.iter().zip([(a, 3), (b, 1)]) {
        assert_eq!(entry["address"], addr.to_string(), "{entry}");
        assert_eq!(entry["weight"], weight, "{entry}");
        assert_eq!(entry["state"], "active", "{entry}");
        assert_eq!(entry["in_flight"], 0, "{entry}");
        assert_eq!(entry["upgraded"], 0, "{entry}");
        assert_eq!(entry["drain_time_left_s"], Value::Null, "{entry}");
    }

    let (slow, x) = in_flight(run.proxy, &apps, "/sleep/1000", &[]).await;
    let (status, _) = run.runtime(apps[x].addr(), "drain", "").await;
    assert_eq!(status, 202);
    let draining = run.backend_status(apps[x].addr()).await.unwrap();
    assert_eq!(draining["state"], "draining", "{draining}");
    assert_eq!(draining["in_flight"], 1, "{draining}");
    let left = draining["drain_time_left_s"].as_f64().expect("a number");
    assert!(left > 0.0 && left <= 20.0, "{draining}");
    let other = run.backend_status(apps[1 - x].addr()).await.unwrap();
    assert_eq!(other["state"], "active", "{other}");

    assert_eq!(slow.await.unwrap().status, 200);
    run.wait_for_state(apps[x].addr(), "drained").await;
    let drained = run.backend_status(apps[x].addr()).await.unwrap();
    assert_eq!(drained["in_flight"], 0, "{drained}");
    assert_eq!(drained["drain_time_left_s"], Value::Null, "{drained}");
}

// ---------------------------------------------------------------------------------------------
// Metrics
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn undrain_during_a_drain_calls_it_off_and_counts_it() {
    let apps = apps(2).await;
    let run = Running::start("round_robin", &weight_one(&apps), "drain_timeout = \"30s\"").await;
    let (slow, x) = in_flight(run.proxy, &apps, "/sleep/1000", &[]).await;
    let addr = apps[x].addr();
    assert_eq!(run.runtime(addr, "drain", "").await.0, 202);
    let (status, body) = run.runtime(addr, "undrain", "").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["state"], "active", "{body}");
    run.wait_for_drains("cancelled", 1).await;

    assert_eq!(slow.await.unwrap().status, 200);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(run.state_of(addr).await, "active");
    assert_eq!(
        run.drains("drained").await,
        0,
        "a called-off drain ended later"
    );
}

// ---------------------------------------------------------------------------------------------
// Drains called off and started again
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn drain_started_again_right_after_being_called_off_keeps_its_own_deadline() {
    let apps = apps(2).await;
    let run = Running::start("round_robin", &weight_one(&apps), "drain_timeout = \"1s\"").await;
    let (slow, x) = in_flight(run.proxy, &apps, "/sleep/2000", &[]).await;
    let (gone, both) = ([(apps[1 - x].addr(), 1)], weight_one(&apps));
    let started = Instant::now();
    // Removed (drain of 1s, the old config's), added back, removed again (drain of 30s).
    run.reload("round_robin", &gone, "drain_timeout = \"30s\"")
        .await;
    run.reload("round_robin", &both, "drain_timeout = \"30s\"")
        .await;
    run.reload("round_robin", &gone, "drain_timeout = \"30s\"")
        .await;

    // Past the first drain's deadline, with the request still in flight.
    tokio::time::sleep_until(started + Duration::from_millis(1400)).await;
    assert_eq!(apps[x].in_flight(), 1);
    let entry = run.backend_status(apps[x].addr()).await;
    let entry = entry.expect("the second drain ended at the first one's deadline");
    assert_eq!(entry["state"], "draining", "{entry}");
    assert!(
        entry["drain_time_left_s"].as_f64().unwrap() > 20.0,
        "{entry}"
    );
    assert_eq!(run.drains("deadline").await, 0);

    assert_eq!(slow.await.unwrap().status, 200);
    run.wait_for_state(apps[x].addr(), "unlisted").await;
    run.wait_for_drains("drained", 1).await;
    assert_eq!(run.drains("cancelled").await, 1);
    assert_eq!(run.drains("deadline").await, 0);
}

#[tokio::test]
async fn backend_added_back_while_its_upgrades_are_being_cut_stays_active() {
    let apps = apps(1).await;
    let (backend, finish, _task) = ws_half_frame_backend().await;
    let run = Running::start("round_robin", &[(backend, 1)], "drain_timeout = \"1s\"").await;
    let mut ws = ws_connect(run.proxy).await;
    ws.send(Message::text("go")).await.unwrap();
    wait_until("the upgrade is counted", || {
        run.server
            .shared()
            .registry
            .get(backend)
            .is_some_and(|s| s.upgraded() == 1)
    })
    .await;
    let state = run.server.shared().registry.get(backend).unwrap();

    let removed = Instant::now();
    run.reload(
        "round_robin",
        &[(apps[0].addr(), 1)],
        "drain_timeout = \"1s\"",
    )
    .await;
    // Past the deadline: the cut waits (up to 1s) for the backend to finish its frame.
    tokio::time::sleep_until(removed + Duration::from_millis(1300)).await;
    assert_eq!(state.upgraded(), 1, "the half frame was cut early");
    run.reload(
        "round_robin",
        &[(apps[0].addr(), 1), (backend, 1)],
        "drain_timeout = \"1s\"",
    )
    .await;
    finish.send(()).unwrap();
    let message = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .expect("a message within 5s");
    assert!(
        matches!(&message, Some(Ok(Message::Binary(b))) if b.as_ref() == b"halfdone"),
        "{message:?}"
    );

    // Whatever became of that connection, the backend is back in the config and stays active.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(run.state_of(backend).await, "active");
    let again = run
        .server
        .shared()
        .registry
        .get(backend)
        .expect("registered");
    assert!(Arc::ptr_eq(&state, &again), "its live state was replaced");
    run.wait_for_drains("cancelled", 1).await;
    assert_eq!(run.drains("deadline").await, 0);
}
