//! `/metrics` after known traffic, parsed with a Prometheus text-format parser.

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use prometheus_parse::{Scrape, Value};
use support::*;

const ADMIN: &str = "[admin]\nlisten = \"127.0.0.1:0\"\n";

/// Scrapes and parses `/metrics`; panics if the text is not valid exposition format.
async fn scrape(admin: SocketAddr) -> Scrape {
    let reply = get(admin, "/metrics", &[]).await;
    assert_eq!(reply.status, 200);
    assert!(reply.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain; version=0.0.4"));
    let lines = reply.body.lines().map(|l| Ok(l.to_owned()));
    Scrape::parse(lines).expect("valid Prometheus text format")
}

/// The value of `name` whose labels include all of `labels`.
fn value(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .find(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match &s.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
            Value::Histogram(buckets) => buckets.last().map_or(0.0, |b| b.count),
            Value::Summary(_) => f64::NAN,
        })
}

#[tokio::test]
async fn requests_per_backend_and_code_and_durations() {
    let apps = apps(3).await;
    let text = one_pool("round_robin", &weight_one(&apps), ADMIN).replace(
        "[[routes]]\npool = \"app\"",
        "[[routes]]\nhost = \"app.test\"\npool = \"app\"",
    );
    let (server, proxy) = proxy(&text).await;
    let admin = server.admin_addr().unwrap();
    for _ in 0..9 {
        assert_eq!(get(proxy, "/", &[("host", "app.test")]).await.status, 200);
    }
    get(proxy, "/status/503", &[("host", "app.test")]).await;
    assert_eq!(get(proxy, "/", &[("host", "other.test")]).await.status, 404);

    let m = scrape(admin).await;
    let mut total_200 = 0.0;
    for app in &apps {
        let backend = app.addr().to_string();
        let ok = value(
            &m,
            "switchyard_requests_total",
            &[("pool", "app"), ("backend", &backend), ("code", "200")],
        )
        .unwrap_or(0.0);
        assert_eq!(ok, 3.0, "{backend}");
        total_200 += ok;
        let observed = value(
            &m,
            "switchyard_request_duration_seconds_count",
            &[("pool", "app"), ("backend", &backend)],
        );
        assert!(observed >= Some(3.0), "{backend}: {observed:?}");
        assert_eq!(
            value(
                &m,
                "switchyard_backend_state",
                &[("backend", &backend), ("state", "active")]
            ),
            Some(1.0)
        );
        assert_eq!(
            value(&m, "switchyard_backend_up", &[("backend", &backend)]),
            Some(1.0)
        );
    }
    assert_eq!(total_200, 9.0);
    let backend_503 = m
        .samples
        .iter()
        .find(|s| s.metric == "switchyard_requests_total" && s.labels.get("code") == Some("503"))
        .expect("the backend's 503 is counted");
    assert_eq!(backend_503.labels.get("pool"), Some("app"));
    assert_eq!(
        value(
            &m,
            "switchyard_requests_total",
            &[("pool", ""), ("code", "404")]
        ),
        Some(1.0),
        "unrouted requests are counted with empty pool and backend"
    );
}

#[tokio::test]
async fn affinity_outcomes_are_counted() {
    let apps = apps(2).await;
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        dir.path(),
        "proxy.toml",
        &one_pool("cookie", &weight_one(&apps), ADMIN),
    );
    let server =
        switchyard::server::Server::start(switchyard::config::Config::load(&path).unwrap())
            .await
            .unwrap();
    let (proxy, admin) = (server.listen_addrs()[0], server.admin_addr().unwrap());
    let first = get(proxy, "/", &[]).await;
    let token = first.cookie("sy").unwrap();
    let cookie = format!("sy={token}");
    for _ in 0..4 {
        get(proxy, "/", &[("cookie", &cookie)]).await;
    }
    get(proxy, "/", &[("cookie", "sy=forged")]).await;
    // Remove the pinned backend: its cookie holders are reassigned.
    let pinned = first.backend();
    let keep: Vec<_> = apps
        .iter()
        .filter(|a| a.name() != pinned)
        .map(|a| (a.addr(), 1))
        .collect();
    write_config(dir.path(), "proxy.toml", &one_pool("cookie", &keep, ADMIN));
    server.reload_from_file().await.unwrap();
    get(proxy, "/", &[("cookie", &cookie)]).await;

    let m = scrape(admin).await;
    let count = |outcome| {
        value(
            &m,
            "switchyard_affinity_total",
            &[("pool", "app"), ("outcome", outcome)],
        )
    };
    assert_eq!(count("new"), Some(1.0));
    assert_eq!(count("hit"), Some(4.0));
    assert_eq!(count("invalid"), Some(1.0));
    assert_eq!(count("reassigned"), Some(1.0));
}

#[tokio::test]
async fn retries_connect_errors_in_flight_and_connections() {
    let apps = apps(1).await;
    let dead = dead_addr().await;
    let (server, proxy) = proxy(&one_pool(
        "round_robin",
        &[(dead, 1), (apps[0].addr(), 1)],
        ADMIN,
    ))
    .await;
    let admin = server.admin_addr().unwrap();
    for _ in 0..4 {
        assert_eq!(get(proxy, "/", &[]).await.status, 200);
    }
    // A slow request in flight, on a kept-open client connection.
    let slow = tokio::spawn(async move { get(proxy, "/sleep/1000", &[]).await });
    wait_until("slow request at the backend", || apps[0].in_flight() == 1).await;

    let m = scrape(admin).await;
    let retries = value(&m, "switchyard_retries_total", &[("pool", "app")]).unwrap();
    assert!(retries >= 2.0, "{retries}");
    let dead_label = dead.to_string();
    let errors = value(
        &m,
        "switchyard_upstream_connect_errors_total",
        &[("backend", &dead_label)],
    )
    .unwrap();
    assert_eq!(
        errors, retries,
        "every retry here followed a refused connection"
    );
    let live = apps[0].addr().to_string();
    assert_eq!(
        value(&m, "switchyard_backend_in_flight", &[("backend", &live)]),
        Some(1.0)
    );
    let listener = proxy.to_string();
    let open = value(
        &m,
        "switchyard_downstream_connections",
        &[("listener", &listener)],
    );
    assert!(open >= Some(1.0), "{open:?}");
    assert_eq!(slow.await.unwrap().status, 200);
}

#[tokio::test]
async fn removed_backend_series_disappear_when_its_drain_ends() {
    let apps = apps(2).await;
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        dir.path(),
        "proxy.toml",
        &one_pool("round_robin", &weight_one(&apps), ADMIN),
    );
    let server =
        switchyard::server::Server::start(switchyard::config::Config::load(&path).unwrap())
            .await
            .unwrap();
    let (proxy, admin) = (server.listen_addrs()[0], server.admin_addr().unwrap());
    for _ in 0..4 {
        get(proxy, "/", &[]).await;
    }
    let gone = apps[0].addr().to_string();
    let body = get(admin, "/metrics", &[]).await.body;
    assert!(body.contains(&gone));
    write_config(
        dir.path(),
        "proxy.toml",
        &one_pool("round_robin", &[(apps[1].addr(), 1)], ADMIN),
    );
    server.reload_from_file().await.unwrap();
    let mut last = String::new();
    for _ in 0..100 {
        last = get(admin, "/metrics", &[]).await.body;
        if !last.contains(&gone) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        !last.contains(&gone),
        "series of the removed backend remain:\n{last}"
    );
    let m = scrape(admin).await;
    let kept = apps[1].addr().to_string();
    assert_eq!(
        value(
            &m,
            "switchyard_requests_total",
            &[("backend", &kept), ("code", "200")]
        ),
        Some(2.0),
        "the remaining backend keeps its counts across the reload"
    );
    let drains: HashMap<_, _> = m
        .samples
        .iter()
        .filter(|s| s.metric == "switchyard_backend_drains_total")
        .map(|s| (s.labels.get("end").unwrap().to_owned(), s.value.clone()))
        .collect();
    assert!(drains.contains_key("drained"), "{drains:?}");
}
