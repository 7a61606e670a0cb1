//! Health checks, outlier ejection, retries, max_connections and slow start, against real backends
//! that fail on purpose.

mod support;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use support::*;
use switchyard::server::Server;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinSet;

/// A backend whose answers the test sets: `/health` answers `health` (200 at first), anything
/// else answers `status` (200 at first) with `x-backend: name`. It counts both kinds of request.
struct Flaky {
    addr: SocketAddr,
    name: String,
    status: Arc<AtomicU16>,
    health: Arc<AtomicU16>,
    requests: Arc<AtomicU64>,
    checks: Arc<AtomicU64>,
    check_host: Arc<Mutex<String>>,
    tasks: JoinSet<()>,
}

impl Flaky {
    async fn start(name: &str) -> Flaky {
        Flaky::start_at("127.0.0.1:0".parse().unwrap(), name).await
    }

    async fn start_at(addr: SocketAddr, name: &str) -> Flaky {
        let listener = TcpListener::bind(addr).await.expect("bind");
        let addr = listener.local_addr().unwrap();
        let status = Arc::new(AtomicU16::new(200));
        let health = Arc::new(AtomicU16::new(200));
        let requests = Arc::new(AtomicU64::new(0));
        let checks = Arc::new(AtomicU64::new(0));
        let check_host = Arc::new(Mutex::new(String::new()));
        let mut tasks = JoinSet::new();
        let (s, h, r, c, host, n) = (
            status.clone(),
            health.clone(),
            requests.clone(),
            checks.clone(),
            check_host.clone(),
            name.to_owned(),
        );
        tasks.spawn(async move {
            let mut connections = JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                let (s, h, r, c, host, n) = (
                    s.clone(),
                    h.clone(),
                    r.clone(),
                    c.clone(),
                    host.clone(),
                    n.clone(),
                );
                let service = service_fn(move |request: Request<Incoming>| {
                    let (s, h, r, c, host, n) = (
                        s.clone(),
                        h.clone(),
                        r.clone(),
                        c.clone(),
                        host.clone(),
                        n.clone(),
                    );
                    async move {
                        let code = if request.uri().path() == "/health" {
                            c.fetch_add(1, Ordering::SeqCst);
                            *host.lock().unwrap() = request
                                .headers()
                                .get("host")
                                .map(|v| v.to_str().unwrap_or("").to_owned())
                                .unwrap_or_default();
                            h.load(Ordering::SeqCst)
                        } else {
                            r.fetch_add(1, Ordering::SeqCst);
                            s.load(Ordering::SeqCst)
                        };
                        let _ = request.into_body().collect().await;
                        let response = Response::builder()
                            .status(code)
                            .header("x-backend", n.as_str())
                            .body(Full::new(Bytes::from(format!("{n}\n"))))
                            .unwrap();
                        Ok::<_, Infallible>(response)
                    }
                });
                connections.spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Flaky {
            addr,
            name: name.to_owned(),
            status,
            health,
            requests,
            checks,
            check_host,
            tasks,
        }
    }

    /// Stops listening and drops every connection, like a killed process.
    async fn kill(mut self) -> SocketAddr {
        self.tasks.shutdown().await;
        self.addr
    }

    fn answer(&self, status: u16) {
        self.status.store(status, Ordering::SeqCst);
    }

    fn health(&self, status: u16) {
        self.health.store(status, Ordering::SeqCst);
    }

    fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }

    fn checks(&self) -> u64 {
        self.checks.load(Ordering::SeqCst)
    }
}

fn addrs(backends: &[&Flaky]) -> Vec<(SocketAddr, u32)> {
    backends.iter().map(|b| (b.addr, 1)).collect()
}

/// Fast active checks: every 50ms, down after 2 failures, up after 2 passes.
const FAST_CHECKS: &str = r#"
[pools.app.health]
path = "/health"
interval = "50ms"
timeout = "200ms"
unhealthy_threshold = 2
healthy_threshold = 2
"#;

/// The health of `backend` in pool `app`, from `/status`.
fn health_of(server: &Server, backend: SocketAddr) -> Value {
    let snapshot = server.shared().snapshot.load();
    let pool = snapshot.pool("app").expect("pool app");
    let member = pool
        .members
        .iter()
        .find(|m| m.spec.address == backend)
        .expect("member");
    serde_json::to_value(member.state.health.view(pool.config.slow_start)).unwrap()
}

async fn status_json(admin: SocketAddr) -> Value {
    serde_json::from_str(&get(admin, "/status", &[]).await.body).unwrap()
}

fn health_state(server: &Server, backend: SocketAddr) -> String {
    health_of(server, backend)["state"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// Waits until the backend's health is `state`, or includes it (`down` matches `down, ejected`).
async fn wait_for_health(server: &Server, backend: SocketAddr, state: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let now = health_state(server, backend);
        if now.split(", ").any(|s| s == state) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{backend} is {now}, not {state}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Who served each of `n` GETs of `/`, one after another.
async fn served(proxy: SocketAddr, n: usize) -> Vec<String> {
    let mut seen = Vec::new();
    for _ in 0..n {
        let reply = get(proxy, "/", &[]).await;
        assert_eq!(reply.status, 200, "{reply:?}");
        seen.push(reply.backend());
    }
    seen
}

fn counts(seen: &[String]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for name in seen {
        *counts.entry(name.clone()).or_default() += 1;
    }
    counts
}

#[tokio::test]
async fn killed_backend_is_skipped_within_the_check_window_and_no_request_fails() {
    let (a, b, c) = (
        Flaky::start("a").await,
        Flaky::start("b").await,
        Flaky::start("c").await,
    );
    let (server, proxy) = proxy(&pool_with(
        "round_robin",
        &addrs(&[&a, &b, &c]),
        "",
        &format!("\"{SECRET}\""),
        FAST_CHECKS,
    ))
    .await;
    wait_until("the first checks ran", || c.checks() > 0).await;
    assert_eq!(*c.check_host.lock().unwrap(), c.addr.to_string());

    // Traffic flows all along, from a task, while c dies.
    let load = tokio::spawn(async move {
        let client = client();
        let mut failures = Vec::new();
        let start = Instant::now();
        while start.elapsed() < Duration::from_millis(1200) {
            let reply = send(&client, proxy, "GET", "/", &[], Bytes::new()).await;
            if reply.status != 200 {
                failures.push(reply.status);
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        failures
    });
    tokio::time::sleep(Duration::from_millis(150)).await;
    let killed_at = Instant::now();
    let c_addr = c.kill().await;
    // Passive checks may eject it first (refused connections count); the checks mark it down.
    wait_for_health(&server, c_addr, "down").await;
    // 2 failed checks 50ms apart, each failing at once (connection refused), plus scheduling.
    let took = killed_at.elapsed();
    assert!(
        took < Duration::from_millis(600),
        "marked down after {took:?}"
    );
    let failures: Vec<StatusCode> = load.await.unwrap();
    assert!(failures.is_empty(), "client requests failed: {failures:?}");

    // Down: no request tries it any more, so no new connection errors.
    let errors = |text: &str| -> String {
        text.lines()
            .find(|l| {
                l.starts_with("switchyard_upstream_connect_errors_total")
                    && l.contains(&c_addr.to_string())
            })
            .map(str::to_owned)
            .unwrap_or_default()
    };
    let before = errors(&server.metrics().render());
    let seen = served(proxy, 30).await;
    assert!(!seen.contains(&"c".to_owned()), "{seen:?}");
    assert_eq!(errors(&server.metrics().render()), before);

    // Back on the same address: up after 2 passing checks (which also end an ejection), and it
    // takes its share again.
    let c = Flaky::start_at(c_addr, "c").await;
    wait_for_health(&server, c.addr, "healthy").await;
    let seen = counts(&served(proxy, 30).await);
    assert_eq!(seen.get("c"), Some(&10), "{seen:?}");
    let metrics = server.metrics().render();
    let changes = format!("switchyard_backend_health_changes_total{{backend=\"{c_addr}\"");
    assert!(
        metrics.contains(&format!("{changes},change=\"down\"}} 1")),
        "{metrics}"
    );
    assert!(metrics.contains(&format!("{changes},change=\"up\"}} 1")));
}

#[tokio::test]
async fn backend_answering_500s_is_ejected_and_returns_after_ejection_time() {
    let (bad, good) = (Flaky::start("bad").await, Flaky::start("good").await);
    bad.answer(500);
    let passive = r#"
[pools.app.passive]
consecutive_failures = 3
ejection_time = "400ms"
"#;
    let (server, proxy) = proxy(&pool_with(
        "round_robin",
        &addrs(&[&bad, &good]),
        "retries = 0",
        &format!("\"{SECRET}\""),
        passive,
    ))
    .await;
    let mut statuses = Vec::new();
    for _ in 0..20 {
        statuses.push(get(proxy, "/", &[]).await.status.as_u16());
    }
    // Round robin alternates until the third 500 ejects it; then only the good one answers.
    assert_eq!(bad.requests(), 3, "{statuses:?}");
    assert_eq!(statuses.iter().filter(|&&s| s == 500).count(), 3);
    assert_eq!(health_state(&server, bad.addr), "ejected");
    let view = health_of(&server, bad.addr);
    assert!(
        view["ejected_seconds_left"].as_f64().unwrap() > 0.0,
        "{view}"
    );

    // It recovers meanwhile; the timer readmits it.
    bad.answer(200);
    wait_for_health(&server, bad.addr, "healthy").await;
    let seen = counts(&served(proxy, 10).await);
    assert_eq!(seen.get("bad"), Some(&5), "{seen:?}");

    // Failing again: a second ejection in a row lasts twice as long.
    bad.answer(503);
    for _ in 0..8 {
        get(proxy, "/", &[]).await;
    }
    assert_eq!(health_state(&server, bad.addr), "ejected");
    let left = health_of(&server, bad.addr)["ejected_seconds_left"]
        .as_f64()
        .unwrap();
    assert!(left > 0.5 && left <= 0.8, "second ejection: {left}s left");
    let metrics = server.metrics().render();
    let ejected = format!(
        "switchyard_backend_health_changes_total{{backend=\"{}\",change=\"ejected\"}} 2",
        bad.addr
    );
    assert!(metrics.contains(&ejected), "{metrics}");
}

#[tokio::test]
async fn ejection_cap_keeps_half_of_the_pool() {
    let backends = [
        Flaky::start("f1").await,
        Flaky::start("f2").await,
        Flaky::start("f3").await,
        Flaky::start("ok").await,
    ];
    for failing in &backends[..3] {
        failing.answer(500);
    }
    let passive = r#"
[pools.app.passive]
consecutive_failures = 2
ejection_time = "30s"
"#;
    let refs: Vec<&Flaky> = backends.iter().collect();
    let (server, proxy) = proxy(&pool_with(
        "round_robin",
        &addrs(&refs),
        "retries = 0",
        &format!("\"{SECRET}\""),
        passive,
    ))
    .await;
    for _ in 0..40 {
        get(proxy, "/", &[]).await;
    }
    let states: Vec<String> = backends
        .iter()
        .map(|b| health_state(&server, b.addr))
        .collect();
    let ejected = states.iter().filter(|s| *s == "ejected").count();
    // 50% of 4: two may be out; the third failing one keeps taking requests.
    assert_eq!(ejected, 2, "{states:?}");
    assert_eq!(states[3], "healthy");
    let still_in = backends[..3]
        .iter()
        .find(|b| health_state(&server, b.addr) == "healthy")
        .unwrap();
    let before = still_in.requests();
    for _ in 0..10 {
        get(proxy, "/", &[]).await;
    }
    assert_eq!(still_in.requests(), before + 5);
}

#[tokio::test]
async fn active_checks_readmit_an_ejected_backend_at_once() {
    let (bad, good) = (Flaky::start("bad").await, Flaky::start("good").await);
    let pool_extra = "retries = 0";
    let tail = format!(
        "{FAST_CHECKS}\n[pools.app.passive]\nconsecutive_failures = 2\nejection_time = \"1h\"\n"
    );
    let (server, proxy) = proxy(&pool_with(
        "round_robin",
        &addrs(&[&bad, &good]),
        pool_extra,
        &format!("\"{SECRET}\""),
        &tail,
    ))
    .await;
    bad.answer(500);
    for _ in 0..6 {
        get(proxy, "/", &[]).await;
    }
    assert_eq!(health_state(&server, bad.addr), "ejected");
    let view = health_of(&server, bad.addr);
    assert!(
        view["ejected_seconds_left"].is_null(),
        "checks decide: {view}"
    );
    // Its health endpoint passes all along, so two checks later it is back, not in an hour.
    bad.answer(200);
    wait_for_health(&server, bad.addr, "healthy").await;
    let seen = counts(&served(proxy, 10).await);
    assert_eq!(seen.get("bad"), Some(&5), "{seen:?}");
}

#[tokio::test]
async fn every_backend_down_answers_503_at_once_and_logs_it_once() {
    let dir = tempfile::tempdir().unwrap();
    let dead = dead_addr().await;
    let text = one_pool("round_robin", &[(dead, 1)], FAST_CHECKS);
    let path = write_config(dir.path(), "proxy.toml", &text);
    let process = ProxyProcess::start(&path);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !process.log().contains("backend down") {
        assert!(Instant::now() < deadline, "{}", process.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let started = Instant::now();
    for _ in 0..20 {
        let reply = get(process.addr, "/", &[]).await;
        assert_eq!(reply.status, 503);
        assert_eq!(reply.headers["retry-after"], "1");
        assert_eq!(reply.body, "no backend available\n");
    }
    assert!(started.elapsed() < Duration::from_secs(2));
    let log = process.log();
    let outages = log.matches("no backend available").count();
    assert_eq!(outages, 1, "{log}");
    assert_eq!(log.matches("backend down").count(), 1, "{log}");
    assert!(!log.contains("proxy error"), "{log}");
}

#[tokio::test]
async fn get_is_retried_on_another_backend_after_a_503_but_post_with_a_body_is_not() {
    let (bad, good) = (Flaky::start("bad").await, Flaky::start("good").await);
    bad.answer(503);
    let (server, proxy) = proxy(&one_pool(
        "round_robin",
        &addrs(&[&bad, &good]),
        "[pools.app.passive]\nenabled = false",
    ))
    .await;
    let client = client();
    for _ in 0..4 {
        let reply = send(&client, proxy, "GET", "/", &[], Bytes::new()).await;
        assert_eq!(reply.status, 200);
        assert_eq!(reply.backend(), "good");
    }
    // Each GET met bad first (its retry took the good one's turn, so the next began at bad).
    assert_eq!(bad.requests(), 4);

    let mut posts = Vec::new();
    for _ in 0..4 {
        let reply = send(
            &client,
            proxy,
            "POST",
            "/",
            &[],
            Bytes::from_static(b"order=1"),
        )
        .await;
        posts.push((reply.status.as_u16(), reply.backend()));
    }
    // A POST that met bad got its 503: each POST reached exactly one backend.
    let refused = posts.iter().filter(|p| p.0 == 503).count();
    assert!(refused > 0, "{posts:?}");
    assert!(posts
        .iter()
        .all(|p| *p == (503, "bad".to_owned()) || *p == (200, "good".to_owned())));
    assert_eq!(bad.requests(), 4 + refused as u64);
    assert_eq!(good.requests(), 4 + (4 - refused) as u64);
    let metrics = server.metrics().render();
    assert!(
        metrics.contains("switchyard_retries_total{pool=\"app\"} 4"),
        "{metrics}"
    );
}

/// A bodiless request other than a GET or HEAD goes through hyper's client, which takes the
/// request it sends: a DELETE is idempotent, and its retry after a 503 is sent from the copy made
/// before it went out.
#[tokio::test]
async fn a_bodiless_delete_is_retried_from_its_copy() {
    let (bad, good) = (Flaky::start("bad").await, Flaky::start("good").await);
    bad.answer(503);
    let (_server, proxy) = proxy(&one_pool(
        "round_robin",
        &addrs(&[&bad, &good]),
        "[pools.app.passive]\nenabled = false",
    ))
    .await;
    let client = client();
    for _ in 0..4 {
        let reply = send(&client, proxy, "DELETE", "/item/7", &[], Bytes::new()).await;
        assert_eq!(
            (reply.status.as_u16(), reply.backend()),
            (200, "good".into())
        );
    }
    assert_eq!(
        bad.requests(),
        4,
        "each DELETE met bad first, then went to good"
    );
    assert_eq!(good.requests(), 4);
}

#[tokio::test]
async fn retries_zero_passes_the_backends_answer_through() {
    let (bad, good) = (Flaky::start("bad").await, Flaky::start("good").await);
    bad.answer(503);
    let (_server, proxy) = proxy(&pool_with(
        "round_robin",
        &addrs(&[&bad, &good]),
        "retries = 0",
        &format!("\"{SECRET}\""),
        "",
    ))
    .await;
    let statuses: Vec<u16> = futures_util::future::join_all((0..4).map(|_| get(proxy, "/", &[])))
        .await
        .iter()
        .map(|r| r.status.as_u16())
        .collect();
    assert_eq!(statuses.iter().filter(|&&s| s == 503).count(), 2);
}

/// A backend that reads a request (headers and a `Content-Length` body), then hangs up without an
/// answer. Counts the requests it read.
async fn hang_up_backend() -> (SocketAddr, Arc<AtomicU64>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let read = Arc::new(AtomicU64::new(0));
    let counter = read.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let counter = counter.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let Ok(n) = stream.read(&mut chunk).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&buf).to_lowercase();
                    if let Some(end) = text.find("\r\n\r\n") {
                        let length: usize = text
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .map_or(0, |v| v.trim().parse().unwrap_or(0));
                        if buf.len() >= end + 4 + length {
                            counter.fetch_add(1, Ordering::SeqCst);
                            let _ = stream.shutdown().await;
                            return;
                        }
                    }
                }
            });
        }
    });
    (addr, read)
}

#[tokio::test]
async fn post_whose_body_was_sent_is_never_retried_but_get_is() {
    let (broken, read) = hang_up_backend().await;
    let good = Flaky::start("good").await;
    let (_server, proxy) = proxy(&one_pool(
        "round_robin",
        &[(broken, 1), (good.addr, 1)],
        "[pools.app.passive]\nenabled = false",
    ))
    .await;
    let client = client();
    // Round robin begins at the broken backend: it reads the GET and hangs up; the GET is sent
    // again to the good one.
    let reply = send(&client, proxy, "GET", "/", &[], Bytes::new()).await;
    assert_eq!(
        (reply.status.as_u16(), reply.backend()),
        (200, "good".to_owned())
    );
    assert_eq!(read.load(Ordering::SeqCst), 1);
    assert_eq!(good.requests(), 1);
    // The POST's turn is the broken one's again: it reads the body whole and hangs up. The
    // client hears 502; the POST is not repeated anywhere.
    let reply = send(
        &client,
        proxy,
        "POST",
        "/",
        &[],
        Bytes::from_static(b"charge=100"),
    )
    .await;
    assert_eq!(reply.status, 502, "{reply:?}");
    assert_eq!(read.load(Ordering::SeqCst), 2);
    assert_eq!(good.requests(), 1, "the POST reached the good backend too");
}

#[tokio::test]
async fn post_to_a_refused_backend_is_retried_since_nothing_was_sent() {
    let dead = dead_addr().await;
    let good = Flaky::start("good").await;
    let (_server, proxy) = proxy(&one_pool("round_robin", &[(dead, 1), (good.addr, 1)], "")).await;
    let client = client();
    for _ in 0..4 {
        let reply = send(&client, proxy, "POST", "/", &[], Bytes::from_static(b"x=1")).await;
        assert_eq!(reply.status, 200);
    }
    assert_eq!(good.requests(), 4);
}

#[tokio::test]
async fn max_connections_sends_overflow_elsewhere_or_503() {
    let apps = apps(2).await;
    let pool = format!(
        "backends = [{{ address = \"{}\", max_connections = 1 }}, {{ address = \"{}\" }}]",
        apps[0].addr(),
        apps[1].addr()
    );
    let text = one_pool("round_robin", &[], "").replace("backends = []", &pool);
    let (_server, proxy) = proxy(&text).await;
    // The first request holds app1's one slot.
    let slow = tokio::spawn(async move { get(proxy, "/sleep/800", &[]).await });
    wait_until("app1 busy", || apps[0].in_flight() == 1).await;
    let seen = served(proxy, 6).await;
    assert!(seen.iter().all(|b| b == "app2"), "{seen:?}");
    assert_eq!(slow.await.unwrap().backend(), "app1");
    let seen = counts(&served(proxy, 6).await);
    assert_eq!(seen.get("app1"), Some(&3), "free again: {seen:?}");

    // One backend with a pool-wide limit of 1: the second concurrent request is 503 at once.
    let single = one_pool("round_robin", &[(apps[0].addr(), 1)], "")
        .replace("strategy = ", "max_connections = 1\nstrategy = ");
    let (_single_server, single_proxy) = support::proxy(&single).await;
    let proxy = single_proxy;
    let slow = tokio::spawn(async move { get(proxy, "/sleep/800", &[]).await });
    wait_until("app1 busy", || apps[0].in_flight() == 1).await;
    let started = Instant::now();
    let reply = get(proxy, "/", &[]).await;
    assert_eq!(reply.status, 503);
    assert_eq!(reply.headers["retry-after"], "1");
    assert!(started.elapsed() < Duration::from_millis(500));
    assert_eq!(slow.await.unwrap().status, 200);
    assert_eq!(get(proxy, "/", &[]).await.status, 200);
}

#[tokio::test]
async fn slow_start_ramps_a_new_backend_up_measurably() {
    let apps = apps(3).await;
    let dir = tempfile::tempdir().unwrap();
    let two = pool_with(
        "round_robin",
        &weight_one(&apps[..2]),
        "slow_start = \"3s\"",
        &format!("\"{SECRET}\""),
        "",
    );
    let path = write_config(dir.path(), "proxy.toml", &two);
    let server = Server::start(switchyard::config::Config::load(&path).unwrap())
        .await
        .unwrap();
    let proxy = server.listen_addrs()[0];
    let three = pool_with(
        "round_robin",
        &weight_one(&apps),
        "slow_start = \"3s\"",
        &format!("\"{SECRET}\""),
        "",
    );
    write_config(dir.path(), "proxy.toml", &three);
    server.reload_from_file().await.unwrap();

    // Within its first few hundred milliseconds it takes 10–25% of its weight: a third of the
    // turns, of which it keeps that share.
    let early = counts(&served(proxy, 90).await);
    let new = early.get("app3").copied().unwrap_or(0);
    assert!((1..=12).contains(&new), "early: {early:?}");
    let ramp = health_of(&server, apps[2].addr())["slow_start_weight"]
        .as_f64()
        .unwrap();
    assert!((0.1..0.6).contains(&ramp), "{ramp}");

    tokio::time::sleep(Duration::from_millis(3100)).await;
    let later = counts(&served(proxy, 90).await);
    assert_eq!(later.get("app3"), Some(&30), "full weight: {later:?}");
    assert!(health_of(&server, apps[2].addr())["slow_start_weight"].is_null());
}

#[tokio::test]
async fn ip_hash_moves_only_the_down_backends_clients_and_brings_them_back() {
    let backends = [
        Flaky::start("h1").await,
        Flaky::start("h2").await,
        Flaky::start("h3").await,
    ];
    let refs: Vec<&Flaky> = backends.iter().collect();
    let (server, proxy) = proxy(&pool_with(
        "ip_hash",
        &addrs(&refs),
        "trusted_proxies = [\"127.0.0.1\"]",
        &format!("\"{SECRET}\""),
        FAST_CHECKS,
    ))
    .await;
    let clients: Vec<String> = (1..=60).map(|i| format!("198.51.100.{i}")).collect();
    let placement = || async {
        let mut placed = Vec::new();
        for ip in &clients {
            let reply = get(proxy, "/", &[("x-forwarded-for", ip)]).await;
            assert_eq!(reply.status, 200);
            placed.push(reply.backend());
        }
        placed
    };
    let before = placement().await;
    let victim = &backends[1];
    assert!(before.contains(&victim.name), "{before:?}");

    victim.health(503);
    wait_for_health(&server, victim.addr, "down").await;
    let during = placement().await;
    for (b, d) in before.iter().zip(&during) {
        if *b == victim.name {
            assert_ne!(d, b);
        } else {
            assert_eq!(d, b, "a client of a healthy backend moved");
        }
    }

    victim.health(200);
    wait_for_health(&server, victim.addr, "healthy").await;
    assert_eq!(placement().await, before, "clients return when it recovers");
}

#[tokio::test]
async fn cookie_clients_of_a_down_backend_move_and_keep_their_new_backend() {
    let backends = [Flaky::start("k1").await, Flaky::start("k2").await];
    let refs: Vec<&Flaky> = backends.iter().collect();
    let (server, proxy) = proxy(&pool_with(
        "cookie",
        &addrs(&refs),
        "",
        &format!("\"{SECRET}\""),
        FAST_CHECKS,
    ))
    .await;
    let mut jar = CookieJar::default();
    let first = get(proxy, "/", &[]).await;
    jar.update(&first);
    let home = first.backend();
    let victim = backends.iter().find(|b| b.name == home).unwrap();

    victim.health(500);
    wait_for_health(&server, victim.addr, "down").await;
    let moved = get(proxy, "/", &[("cookie", &jar.header())]).await;
    assert_eq!(moved.status, 200);
    assert_ne!(moved.backend(), home);
    assert!(
        moved.cookie("sy").is_some(),
        "a new cookie for the new backend"
    );
    jar.update(&moved);

    victim.health(200);
    wait_for_health(&server, victim.addr, "healthy").await;
    for _ in 0..5 {
        let reply = get(proxy, "/", &[("cookie", &jar.header())]).await;
        assert_eq!(
            reply.backend(),
            moved.backend(),
            "the client keeps its new backend"
        );
    }
}

#[tokio::test]
async fn checks_stop_for_removed_backends_and_start_for_added_ones() {
    let (a, b) = (Flaky::start("a").await, Flaky::start("b").await);
    let dir = tempfile::tempdir().unwrap();
    let admin = "[admin]\nlisten = \"127.0.0.1:0\"\n";
    let with = |list: &[&Flaky]| {
        pool_with(
            "round_robin",
            &addrs(list),
            "drain_timeout = \"100ms\"",
            &format!("\"{SECRET}\""),
            &format!("{FAST_CHECKS}\n{admin}"),
        )
    };
    let path = write_config(dir.path(), "proxy.toml", &with(&[&a]));
    let server = Server::start(switchyard::config::Config::load(&path).unwrap())
        .await
        .unwrap();
    wait_until("a is checked", || a.checks() >= 2).await;
    assert_eq!(b.checks(), 0);

    write_config(dir.path(), "proxy.toml", &with(&[&b]));
    server.reload_from_file().await.unwrap();
    wait_until("b is checked", || b.checks() >= 2).await;
    let stopped_at = a.checks();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(a.checks() <= stopped_at + 1, "checks of a went on");

    // `/status` shows each backend's health and its last check.
    let status = status_json(server.admin_addr().unwrap()).await;
    let backend = &status["pools"][0]["backends"][0];
    assert_eq!(backend["health"]["state"], "healthy", "{status}");
    assert_eq!(backend["health"]["checked"], true);
    assert_eq!(backend["health"]["last_check"]["result"], "200");
}

#[tokio::test]
async fn a_client_stalling_its_upload_does_not_eject_the_backend() {
    let (a, b) = (Flaky::start("a").await, Flaky::start("b").await);
    let tail = "[pools.app.passive]\nconsecutive_failures = 2\n\n[timeouts]\nresponse_header = \"200ms\"\n";
    let (server, proxy) = proxy(&one_pool("round_robin", &addrs(&[&a, &b]), tail)).await;
    let mut senders = Vec::new();
    for _ in 0..4 {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let mut conn = h1_connection::<ChannelBody>(proxy).await;
        let request = Request::post("/upload")
            .header("host", "up.test")
            .body(ChannelBody(rx))
            .unwrap();
        // A first chunk, then nothing: the client, not the backend, stalls.
        tx.send(Bytes::from_static(b"part")).await.unwrap();
        let response = tokio::time::timeout(Duration::from_secs(5), conn.send_request(request))
            .await
            .expect("answered within 5s")
            .unwrap();
        assert_eq!(response.status(), 504);
        senders.push(tx);
    }
    for backend in [&a, &b] {
        let view = health_of(&server, backend.addr);
        assert_eq!(view["state"], "healthy", "{view}");
        assert_eq!(view["consecutive_failures"], 0, "{view}");
    }
}

#[tokio::test]
async fn put_with_a_body_is_not_replayed_after_a_503() {
    let (bad, good) = (Flaky::start("bad").await, Flaky::start("good").await);
    bad.answer(503);
    let (_server, proxy) = proxy(&one_pool(
        "round_robin",
        &addrs(&[&bad, &good]),
        "[pools.app.passive]\nenabled = false",
    ))
    .await;
    let client = client();
    let mut statuses = Vec::new();
    for _ in 0..4 {
        let reply = send(
            &client,
            proxy,
            "PUT",
            "/doc",
            &[],
            Bytes::from_static(b"v=2"),
        )
        .await;
        statuses.push(reply.status.as_u16());
    }
    // Each PUT reached exactly one backend: the ones that met bad got its 503.
    assert_eq!(bad.requests() + good.requests(), 4, "{statuses:?}");
    assert_eq!(
        statuses.iter().filter(|&&s| s == 503).count() as u64,
        bad.requests()
    );
    assert!(bad.requests() > 0);
}

#[tokio::test]
async fn removing_the_health_table_drops_the_verdict_but_removing_the_backend_keeps_it() {
    let (a, b) = (Flaky::start("a").await, Flaky::start("b").await);
    let dir = tempfile::tempdir().unwrap();
    let write = |list: &[&Flaky], checks: bool| {
        let text = pool_with(
            "round_robin",
            &addrs(list),
            "drain_timeout = \"30s\"",
            &format!("\"{SECRET}\""),
            if checks { FAST_CHECKS } else { "" },
        );
        write_config(dir.path(), "proxy.toml", &text)
    };
    let path = write(&[&a, &b], true);
    let server = Server::start(switchyard::config::Config::load(&path).unwrap())
        .await
        .unwrap();
    let proxy = server.listen_addrs()[0];
    a.health(500);
    wait_for_health(&server, a.addr, "down").await;

    // No more checks, a still in the pool: nothing would ever bring it back, so it is back now.
    write(&[&a, &b], false);
    server.reload_from_file().await.unwrap();
    assert_eq!(health_state(&server, a.addr), "healthy");
    let seen = counts(&served(proxy, 10).await);
    assert_eq!(seen.get("a"), Some(&5), "{seen:?}");

    // Checked again, down again; then removed: while it drains it stays down.
    write(&[&a, &b], true);
    server.reload_from_file().await.unwrap();
    wait_for_health(&server, a.addr, "down").await;
    write(&[&b], true);
    server.reload_from_file().await.unwrap();
    let state = server.shared().registry.get(a.addr).expect("draining");
    assert_eq!(state.health.label(), "down");
    let checks = a.checks();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        a.checks() <= checks + 1,
        "checks of a removed backend went on"
    );
    assert_eq!(state.health.label(), "down");
}
