//! DNS discovery against a DNS server in the test (tests/support/dns.rs) on loopback: A and SRV
//! answers become the pool, changes apply like a reload (new backends slow-start, vanished ones
//! drain, nothing fails under load), TTLs are honoured, a failing or empty source keeps the last
//! membership, a file reload keeps what was discovered, and two switchyard processes route 1,000
//! client IPs and 1,000 cookies alike before and after a change.

mod support;

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use support::dns::{Mode, Srv, TestDns};
use support::fleet;
use support::*;

const NAME: &str = "app.test";

/// A one-pool config (`app`, behind every path) with an admin listener: `pool_extra` in
/// `[pools.app]`, `discovery` as the body of `[pools.app.discovery]`, `tail` after it.
fn discovered(strategy: &str, pool_extra: &str, discovery: &str, tail: &str) -> String {
    format!(
        r#"
[admin]
listen = "127.0.0.1:0"

[[listeners]]
listen = "127.0.0.1:0"

[[routes]]
pool = "app"

[pools.app]
strategy = "{strategy}"
{pool_extra}

[pools.app.discovery]
{discovery}

{tail}
"#
    )
}

/// `dns = "app.test:PORT"` asked of `dns` every `interval`.
fn a_source(dns: &TestDns, port: u16, interval: &str) -> String {
    format!(
        "dns = \"{NAME}:{port}\"\nresolver = \"{}\"\ninterval = \"{interval}\"",
        dns.addr
    )
}

fn ip(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, last)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_records_become_the_pool_and_changes_apply_like_a_reload_under_load() {
    let dns = TestDns::start().await;
    let (apps, port) = apps_on_loopback_ips(3).await;
    let addrs: Vec<SocketAddr> = apps.iter().map(|a| a.addr()).collect();
    dns.set_a(NAME, &[ip(3), ip(2)]);
    let text = discovered(
        "round_robin",
        "slow_start = \"30s\"\ndrain_timeout = \"5s\"",
        &a_source(&dns, port, "100ms"),
        "[pools.app.health]\ninterval = \"200ms\"\n",
    );
    // The server starts once the source has answered, or failed once (it then serves anyway, and
    // the pool fills at a later answer). Under a loaded CI run the pool was once not yet active at
    // the first look (cause not found), so it is waited for rather than expected at once.
    let (server, proxy) = proxy(&text).await;
    let admin = server.admin_addr().unwrap();
    wait_for_active(admin, "app", &addrs[..2], Duration::from_secs(5)).await;
    let first = status(admin).await;
    let pool = pool_status(&first, "app");
    assert_eq!(pool["discovery"]["source"], format!("dns {NAME}:{port}"));
    assert_eq!(pool["discovery"]["state"], "ok");
    assert_eq!(pool["discovery"]["members"], 2);
    // The first membership of an empty pool does not ramp; the discovered backends are checked.
    for backend in pool["backends"].as_array().unwrap() {
        assert!(
            backend["health"]["slow_start_weight"].is_null(),
            "{backend}"
        );
        assert_eq!(backend["health"]["checked"], true, "{backend}");
    }

    let load = Load::start(proxy, 4);
    // A slow request in flight on app1 when it leaves (counted by `sleeping`: the load's quick
    // requests pass through `in_flight` too, and would end the drain before the change lands).
    let mut slow = Vec::new();
    while apps[0].sleeping() == 0 {
        slow.push(tokio::spawn(
            async move { get(proxy, "/sleep/3000", &[]).await },
        ));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    dns.set_a(NAME, &[ip(4), ip(3)]);
    let took = wait_for_active(admin, "app", &addrs[1..], Duration::from_secs(2)).await;
    assert!(took < Duration::from_secs(1), "applied after {took:?}");
    let listed = members(admin, "app").await;
    assert!(
        listed
            .iter()
            .any(|(a, _, state)| *a == addrs[0].to_string() && state == "draining"),
        "{listed:?}"
    );
    // The added backend ramps (its pool had backends to spare it).
    let status = status(admin).await;
    let added = pool_status(&status, "app")["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["address"] == addrs[2].to_string())
        .unwrap()
        .clone();
    assert!(
        added["health"]["slow_start_weight"].as_f64().unwrap() < 1.0,
        "{added}"
    );

    for request in slow {
        let reply = request.await.unwrap();
        assert_eq!(reply.status, 200, "{}", reply.body);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (ok, failed) = load.finish().await;
    assert_eq!(failed, 0, "failed requests while the membership changed");
    assert!(ok > 50, "load flowed: {ok}");
    assert!(apps[2].requests() > 0, "the added backend took work");
    // The removed one drained and was released; it gets nothing new.
    wait_for_active(admin, "app", &addrs[1..], Duration::from_secs(1)).await;
    let after = apps[0].requests();
    for _ in 0..10 {
        assert_eq!(get(proxy, "/", &[]).await.status, 200);
    }
    assert_eq!(apps[0].requests(), after);
    wait_for_members(admin, "app", 2).await;

    let changed = r#"switchyard_discovery_updates_total{pool="app",result="changed"}"#;
    assert_eq!(metric(admin, changed).await, Some(2.0));
    let unchanged = r#"switchyard_discovery_updates_total{pool="app",result="unchanged"}"#;
    assert!(metric(admin, unchanged).await.unwrap_or(0.0) >= 1.0);
    let up = r#"switchyard_discovery_source_up{pool="app"}"#;
    assert_eq!(metric(admin, up).await, Some(1.0));
    // A membership change is not a config reload.
    assert_eq!(
        metric(admin, r#"switchyard_config_reloads_total{result="ok"}"#).await,
        None
    );
    drop(server);
}

#[tokio::test]
async fn srv_records_give_ports_and_weights_from_the_lowest_priority() {
    let dns = TestDns::start().await;
    let apps = apps(3).await;
    let srv = "_http._tcp.app.test";
    let record = |priority, weight, app: &switchyard::demo::AppServer, target: &str| Srv {
        priority,
        weight,
        port: app.addr().port(),
        target: format!("{target}.test"),
    };
    for target in ["a", "b", "c"] {
        dns.set_a(&format!("{target}.test"), &[ip(1)]);
    }
    dns.set_srv(
        srv,
        &[
            record(10, 3, &apps[0], "a"),
            record(10, 1, &apps[1], "b"),
            // A backup: a higher priority value is only for when the others are gone.
            record(20, 5, &apps[2], "c"),
        ],
    );
    let source = format!(
        "dns_srv = \"{srv}\"\nresolver = \"{}\"\ninterval = \"100ms\"",
        dns.addr
    );
    let (server, _proxy) = proxy(&discovered("least_connections", "", &source, "")).await;
    let admin = server.admin_addr().unwrap();
    let (a, b, c) = (
        apps[0].addr().to_string(),
        apps[1].addr().to_string(),
        apps[2].addr().to_string(),
    );
    let mut expected = vec![
        (a.clone(), 3, "active".to_owned()),
        (b.clone(), 1, "active".to_owned()),
    ];
    expected.sort();
    assert_eq!(members(admin, "app").await, expected);

    // Weight 0 counts as 1, a re-weight applies in place, and once only backups are left they
    // are the lowest priority.
    dns.set_srv(
        srv,
        &[record(10, 0, &apps[0], "a"), record(20, 5, &apps[2], "c")],
    );
    wait_for_active(admin, "app", &[apps[0].addr()], Duration::from_secs(2)).await;
    let members_now = members(admin, "app").await;
    assert!(
        members_now.contains(&(a.clone(), 1, "active".to_owned())),
        "{members_now:?}"
    );
    dns.set_srv(srv, &[record(20, 5, &apps[2], "c")]);
    wait_for_active(admin, "app", &[apps[2].addr()], Duration::from_secs(2)).await;
    let members = members(admin, "app").await;
    assert!(
        members.contains(&(c, 5, "active".to_owned())),
        "{members:?}"
    );
    drop(server);
}

#[tokio::test]
async fn lookups_are_never_more_frequent_than_the_ttl_allows() {
    let dns = TestDns::start().await;
    let (_apps, port) = apps_on_loopback_ips(1).await;
    dns.set_ttl(2);
    dns.set_a(NAME, &[ip(2)]);
    let text = discovered("round_robin", "", &a_source(&dns, port, "100ms"), "");
    let (server, _proxy) = proxy(&text).await;
    // The answer holds for 2 s: 100 ms intervals ask nothing meanwhile.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(dns.asked(NAME), 1, "asked again before the TTL ran out");
    // Due at 2 s; polled, since a loaded machine may run the lookup a little late.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while dns.asked(NAME) < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never asked again after the TTL"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        dns.asked(NAME),
        2,
        "asked more than once when the TTL ran out"
    );
    // With a TTL of 0, the interval rules.
    dns.set_ttl(0);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let before = dns.asked(NAME);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let asked = dns.asked(NAME) - before;
    // At most one lookup per interval; a loaded machine may make fewer.
    assert!(
        (2..=12).contains(&asked),
        "{asked} lookups in 1 s at 100 ms"
    );
    drop(server);
}

#[test]
fn a_failing_source_keeps_the_pool_serving_logs_once_and_recovers() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dns = rt.block_on(TestDns::start());
    let (apps, port) = rt.block_on(apps_on_loopback_ips(3));
    dns.set_a(NAME, &[ip(2), ip(3)]);
    let dir = tempfile::tempdir().unwrap();
    let text = discovered("round_robin", "", &a_source(&dns, port, "100ms"), "");
    let path = write_config(dir.path(), "proxy.toml", &text);
    let process = ProxyProcess::start(&path);
    let (proxy, admin) = (process.addr, process.admin_addr());

    dns.set_mode(Mode::ServFail);
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    let discovery = loop {
        let status = rt.block_on(status(admin));
        let discovery = pool_status(&status, "app")["discovery"].clone();
        if discovery["state"] == "failing" {
            break discovery;
        }
        assert!(std::time::Instant::now() < deadline, "{discovery}");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        discovery["last_error"].as_str().unwrap().contains(NAME),
        "{discovery}"
    );
    // Many failed lookups later, the pool still serves from both backends.
    let errors = r#"switchyard_discovery_updates_total{pool="app",result="error"}"#;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while rt.block_on(metric(admin, errors)).unwrap_or(0.0) < 5.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "fewer than 5 failed lookups"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..20 {
        let reply = rt.block_on(get(proxy, "/", &[]));
        assert_eq!(reply.status, 200);
        seen.insert(reply.backend());
    }
    assert_eq!(seen.len(), 2, "{seen:?}");
    let up = r#"switchyard_discovery_source_up{pool="app"}"#;
    assert_eq!(rt.block_on(metric(admin, up)), Some(0.0));

    // Back, with a new answer: applied at once.
    dns.set_mode(Mode::Answer);
    dns.set_a(NAME, &[ip(4)]);
    rt.block_on(wait_for_active(
        admin,
        "app",
        &[apps[2].addr()],
        Duration::from_secs(2),
    ));
    assert_eq!(rt.block_on(metric(admin, up)), Some(1.0));
    let log = process.log();
    let failing = log.matches("discovery source failing").count();
    assert_eq!(failing, 1, "logged once per state change:\n{log}");
    assert_eq!(
        log.matches("discovery source answering again").count(),
        1,
        "{log}"
    );
    assert!(log.contains("pool membership changed"), "{log}");
    assert!(log.contains("draining"), "the diff is logged:\n{log}");
}

#[tokio::test]
async fn a_silent_source_is_failing_and_the_pool_keeps_serving() {
    let dns = TestDns::start().await;
    let (apps, port) = apps_on_loopback_ips(1).await;
    dns.set_a(NAME, &[ip(2)]);
    let text = discovered("round_robin", "", &a_source(&dns, port, "100ms"), "");
    let (server, proxy) = proxy(&text).await;
    let admin = server.admin_addr().unwrap();
    dns.set_mode(Mode::Silent);
    // Each lookup now waits out its timeouts (a few seconds).
    let started = tokio::time::Instant::now();
    let deadline = started + Duration::from_secs(15);
    loop {
        let status = status(admin).await;
        let discovery = &pool_status(&status, "app")["discovery"];
        if discovery["state"] == "failing" {
            assert!(
                discovery["last_error"]
                    .as_str()
                    .unwrap()
                    .contains("timed out"),
                "{discovery}"
            );
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{discovery}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("failing after {:?}", started.elapsed());
    assert_eq!(get(proxy, "/", &[]).await.status, 200);
    assert_eq!(active(admin, "app").await, vec![apps[0].addr().to_string()]);
    drop(server);
}

#[tokio::test]
async fn an_empty_answer_is_ignored_unless_the_pool_allows_it() {
    let dns = TestDns::start().await;
    let (apps, port) = apps_on_loopback_ips(2).await;
    dns.set_a(NAME, &[ip(2), ip(3)]);
    let source = a_source(&dns, port, "100ms");
    let (server, proxy) = proxy(&discovered("round_robin", "", &source, "")).await;
    let admin = server.admin_addr().unwrap();

    // NXDOMAIN from a server that answers: ignored.
    dns.remove(NAME);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    loop {
        let status = status(admin).await;
        if pool_status(&status, "app")["discovery"]["state"] == "empty" {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{status}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(get(proxy, "/", &[]).await.status, 200);
    assert_eq!(active(admin, "app").await.len(), 2);
    let ignored = r#"switchyard_discovery_updates_total{pool="app",result="empty_ignored"}"#;
    assert!(metric(admin, ignored).await.unwrap() >= 1.0);
    // A name with no A records is empty too.
    let ignored_before = metric(admin, ignored).await.unwrap();
    dns.set_a(NAME, &[]);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while metric(admin, ignored).await.unwrap() <= ignored_before {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the empty answer was never seen"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(active(admin, "app").await.len(), 2);

    // With allow_empty, the same answer empties the pool: its backends drain, requests get 503.
    let allowing = discovered(
        "round_robin",
        "",
        &format!("{source}\nallow_empty = true"),
        "",
    );
    let report = server.reload(config(&allowing)).await.unwrap();
    assert!(report.backends_removed.is_empty(), "{report}");
    wait_for_active(admin, "app", &[], Duration::from_secs(2)).await;
    assert_eq!(get(proxy, "/", &[]).await.status, 503);
    // And refills when the name is back.
    dns.set_a(NAME, &[ip(3)]);
    wait_for_active(admin, "app", &[apps[1].addr()], Duration::from_secs(2)).await;
    assert_eq!(get(proxy, "/", &[]).await.backend(), "app2");
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_reload_keeps_the_discovered_membership() {
    let dns = TestDns::start().await;
    let (apps, port) = apps_on_loopback_ips(3).await;
    dns.set_a(NAME, &[ip(2), ip(3)]);
    // An hour between lookups: only a (re)started task asks.
    let source = a_source(&dns, port, "1h");
    let (server, proxy) = proxy(&discovered("round_robin", "", &source, "")).await;
    let admin = server.admin_addr().unwrap();
    let both = [apps[0].addr(), apps[1].addr()];
    assert_eq!(dns.asked(NAME), 1);

    // Another setting of the pool: nothing about its backends changes, no new lookup.
    let retries = discovered("round_robin", "retries = 2", &source, "");
    let report = server.reload(config(&retries)).await.unwrap();
    assert!(
        report.backends_added.is_empty() && report.backends_removed.is_empty(),
        "{report}"
    );
    wait_for_active(admin, "app", &both, Duration::ZERO).await;
    assert_eq!(dns.asked(NAME), 1);

    // A changed discovery table restarts the task, which serves the old membership until the new
    // one answers.
    dns.set_a(NAME, &[ip(3), ip(4)]);
    let longer = discovered(
        "round_robin",
        "retries = 2",
        &a_source(&dns, port, "2h"),
        "",
    );
    let report = server.reload(config(&longer)).await.unwrap();
    assert!(report.backends_removed.is_empty(), "{report}");
    wait_for_active(
        admin,
        "app",
        &[apps[1].addr(), apps[2].addr()],
        Duration::from_secs(2),
    )
    .await;
    assert_eq!(dns.asked(NAME), 2);

    // A pool that switches from a list to discovery keeps its list until the first answer.
    let listed = one_pool(
        "round_robin",
        &[(apps[0].addr(), 1)],
        "[admin]\nlisten = \"127.0.0.1:0\"\n",
    );
    server.reload(config(&listed)).await.unwrap();
    wait_for_active(admin, "app", &[apps[0].addr()], Duration::from_secs(1)).await;
    dns.set_mode(Mode::Silent);
    let quick = discovered("round_robin", "", &a_source(&dns, port, "100ms"), "");
    let report = server.reload(config(&quick)).await.unwrap();
    assert!(report.backends_removed.is_empty(), "{report}");
    for _ in 0..5 {
        assert_eq!(get(proxy, "/", &[]).await.backend(), "app1");
    }
    // Once the silent lookup has timed out (a few seconds), the next one is answered.
    dns.set_mode(Mode::Answer);
    wait_for_active(
        admin,
        "app",
        &[apps[1].addr(), apps[2].addr()],
        Duration::from_secs(10),
    )
    .await;
    drop(server);
}

#[test]
fn two_instances_route_client_ips_and_cookies_alike_before_and_after_a_change() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dns = rt.block_on(TestDns::start());
    let apps = rt.block_on(apps(4));
    let srv = "_http._tcp.fleet.test";
    let records: Vec<Srv> = apps
        .iter()
        .enumerate()
        .map(|(i, app)| Srv {
            priority: 10,
            weight: 1,
            port: app.addr().port(),
            target: format!("app{}.test", i + 1),
        })
        .collect();
    for record in &records {
        dns.set_a(&record.target, &[ip(1)]);
    }
    dns.set_srv(srv, &records);
    let source = format!(
        "dns_srv = \"{srv}\"\nresolver = \"{}\"\ninterval = \"100ms\"",
        dns.addr
    );
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), "proxy.toml", &fleet::config(&source));
    let a = ProxyProcess::start(&path);
    let b = ProxyProcess::start(&path);

    let issued = rt.block_on(fleet::issue_cookies(a.addr));
    let cookies: Vec<String> = issued.iter().map(|(c, _)| c.clone()).collect();
    let before_a = rt.block_on(fleet::route(a.addr, &cookies));
    let before_b = rt.block_on(fleet::route(b.addr, &cookies));
    rt.block_on(fleet::assert_same(
        &before_a,
        &before_b,
        "before the change",
        &[&a, &b],
    ));
    // Each instance honours the cookies the other issued, and every backend has clients.
    let issued_to: Vec<String> = issued.iter().map(|(_, b)| b.clone()).collect();
    assert_eq!(before_b.by_cookie, issued_to);
    assert_eq!(fleet::spread(&before_a.by_ip).len(), 4);

    // app2 leaves the SRV answer; both instances see it.
    let remaining: Vec<Srv> = records
        .iter()
        .filter(|r| r.target != "app2.test")
        .cloned()
        .collect();
    dns.set_srv(srv, &remaining);
    let left: Vec<SocketAddr> = [0, 2, 3].iter().map(|&i| apps[i].addr()).collect();
    rt.block_on(fleet::settle(&[&a, &b], &left, Duration::from_secs(3)));
    let after_a = rt.block_on(fleet::route(a.addr, &cookies));
    let after_b = rt.block_on(fleet::route(b.addr, &cookies));
    rt.block_on(fleet::assert_same(
        &after_a,
        &after_b,
        "after the change",
        &[&a, &b],
    ));
    // Cookies move only when their backend left; client IPs mostly so (Maglev moves a few
    // others as the table is rebuilt).
    let mut others_moved = 0;
    for i in 0..fleet::CLIENTS {
        if before_a.by_ip[i] != "app2" && after_a.by_ip[i] != before_a.by_ip[i] {
            others_moved += 1;
        }
        assert_ne!(after_a.by_ip[i], "app2", "client {i}");
        if before_a.by_cookie[i] != "app2" {
            assert_eq!(after_a.by_cookie[i], before_a.by_cookie[i], "cookie {i}");
        } else {
            assert_ne!(after_a.by_cookie[i], "app2", "cookie {i}");
        }
    }
    eprintln!("client IPs of remaining backends that moved: {others_moved}");
    assert!(others_moved <= fleet::CLIENTS / 20, "{others_moved} moved");
    // New cookies issued by B after the change are honoured by A.
    let issued = rt.block_on(fleet::issue_cookies(b.addr));
    let cookies: Vec<String> = issued.iter().map(|(c, _)| c.clone()).collect();
    let by_a = rt.block_on(fleet::route(a.addr, &cookies));
    let issued_to: Vec<String> = issued.iter().map(|(_, b)| b.clone()).collect();
    assert_eq!(by_a.by_cookie, issued_to);
}
