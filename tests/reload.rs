//! Hot reload under load: nothing lost, triggers, invalid configs, listeners, and live state that
//! survives.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use support::*;
use switchyard::config::Config;
use switchyard::server::Server;

/// Writes `text` to `dir/proxy.toml` and returns the path.
fn write(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("proxy.toml");
    // Write then rename, like an editor or a config manager, so a watcher never reads half a file.
    let tmp = dir.join("proxy.toml.tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    path
}

async fn start_from(path: &Path) -> Arc<Server> {
    Server::start(Config::load(path).unwrap()).await.unwrap()
}

const STRATEGIES: [&str; 4] = ["round_robin", "least_connections", "ip_hash", "cookie"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_reloads_under_load_lose_nothing() {
    let apps = apps(4).await;
    let dir = tempfile::tempdir().unwrap();
    let all: Vec<(SocketAddr, u32)> = apps.iter().map(|a| (a.addr(), 1)).collect();
    let path = write(dir.path(), &one_pool("round_robin", &all[..3], ""));
    let server = start_from(&path).await;
    let proxy = server.listen_addrs()[0];

    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    for c in 0..4 {
        let (stop, failures) = (Arc::clone(&stop), Arc::clone(&failures));
        clients.push(tokio::spawn(async move {
            let client = client();
            let mut ok = 0u64;
            let mut cookie = String::new();
            // Bounded: at most 1,500 requests per client, and it stops when the reloads are done.
            for i in 0..1_500 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let path = if i % 10 == 0 { "/sleep/20" } else { "/" };
                let headers: Vec<(&str, &str)> = if cookie.is_empty() {
                    vec![]
                } else {
                    vec![("cookie", cookie.as_str())]
                };
                let reply = send(&client, proxy, "GET", path, &headers, Bytes::new()).await;
                if reply.status == 200 {
                    ok += 1;
                } else {
                    failures.fetch_add(1, Ordering::Relaxed);
                    eprintln!("client {c}: {} {}", reply.status, reply.body);
                }
                if let Some(v) = reply.cookie("sy") {
                    cookie = format!("sy={v}");
                }
            }
            ok
        }));
    }

    for round in 0..20 {
        tokio::time::sleep(Duration::from_millis(60)).await;
        // Rotate membership (3 of 4 backends), weights and strategy on every round.
        let members: Vec<(SocketAddr, u32)> = (0..3)
            .map(|i| {
                let app = &apps[(round + i) % 4];
                (app.addr(), 1 + ((round + i) % 3) as u32)
            })
            .collect();
        let text = one_pool(STRATEGIES[round % 4], &members, "");
        write(dir.path(), &text);
        let report = server
            .reload_from_file()
            .await
            .expect("valid config reloads");
        assert!(!report.is_empty(), "round {round} changed something");
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    for client in clients {
        let ok = client.await.unwrap();
        assert!(ok > 20, "every client kept succeeding throughout: {ok}");
        total += ok;
    }
    assert_eq!(
        failures.load(Ordering::Relaxed),
        0,
        "failed requests during reloads"
    );
    assert!(total > 200, "load actually flowed: {total}");
    let metrics = server.metrics().render();
    assert!(
        metrics.contains("switchyard_config_reloads_total{result=\"ok\"} 20"),
        "{metrics}"
    );
}

#[tokio::test]
async fn in_flight_request_to_removed_backend_completes_and_no_new_work_reaches_it() {
    let apps = apps(2).await;
    let (a, b) = (apps[0].addr(), apps[1].addr());
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), &one_pool("round_robin", &[(a, 1)], ""));
    let server = start_from(&path).await;
    let proxy = server.listen_addrs()[0];

    let slow = tokio::spawn(async move { get(proxy, "/sleep/2000", &[]).await });
    while apps[0].sleeping() == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    write(dir.path(), &one_pool("round_robin", &[(b, 1)], ""));
    let report = server.reload_from_file().await.unwrap();
    assert_eq!(report.draining, vec![a]);
    let seen_by_a = apps[0].requests();
    for _ in 0..20 {
        let reply = get(proxy, "/", &[]).await;
        assert_eq!(
            (reply.status.as_u16(), reply.backend()),
            (200, "app2".to_owned())
        );
    }
    assert_eq!(
        apps[0].requests(),
        seen_by_a,
        "the removed backend got new requests"
    );
    let slow = slow.await.unwrap();
    assert_eq!(
        (slow.status.as_u16(), slow.backend()),
        (200, "app1".to_owned())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_config_mid_load_changes_nothing_and_is_reported() {
    let apps = apps(2).await;
    let dir = tempfile::tempdir().unwrap();
    let good = one_pool("round_robin", &[(apps[0].addr(), 1)], "");
    let path = write(dir.path(), &good);
    let server = start_from(&path).await;
    let proxy = server.listen_addrs()[0];

    let load = tokio::spawn(async move {
        let client = client();
        let mut statuses = Vec::new();
        for _ in 0..300 {
            let r = send(&client, proxy, "GET", "/", &[], Bytes::new()).await;
            statuses.push((r.status.as_u16(), r.backend()));
        }
        statuses
    });
    // A typo'd key and a backend with weight 0: both must be reported, nothing applied.
    let broken = one_pool("round_robin", &[(apps[1].addr(), 0)], "")
        .replace("strategy =", "stratgy = \"x\"\nstrategy =");
    write(dir.path(), &broken);
    let error = server
        .reload_from_file()
        .await
        .expect_err("broken config is refused");
    let message = error.to_string();
    assert!(message.contains("proxy.toml:"), "{message}");
    assert!(message.contains("pools.app.stratgy"), "{message}");
    let statuses = load.await.unwrap();
    assert!(
        statuses.iter().all(|(s, b)| *s == 200 && b == "app1"),
        "{statuses:?}"
    );
    let metrics = server.metrics().render();
    assert!(
        metrics.contains("switchyard_config_reloads_total{result=\"error\"} 1"),
        "{metrics}"
    );
    assert_eq!(get(proxy, "/", &[]).await.backend(), "app1");
}

#[tokio::test]
async fn strategy_toggle_applies_to_the_very_next_request() {
    let apps = apps(3).await;
    let members: Vec<_> = apps.iter().map(|a| (a.addr(), 1)).collect();
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), &one_pool("round_robin", &members, ""));
    let server = start_from(&path).await;
    let proxy = server.listen_addrs()[0];
    assert!(get(proxy, "/", &[]).await.cookie("sy").is_none());
    write(dir.path(), &one_pool("cookie", &members, ""));
    let report = server.reload_from_file().await.unwrap();
    assert_eq!(report.strategy_changed.len(), 1);
    assert!(get(proxy, "/", &[]).await.cookie("sy").is_some());
}

#[tokio::test]
async fn post_reload_on_admin_answers_with_the_changes() {
    let apps = apps(2).await;
    let dir = tempfile::tempdir().unwrap();
    let admin = "[admin]\nlisten = \"127.0.0.1:0\"\n";
    let path = write(
        dir.path(),
        &one_pool("round_robin", &[(apps[0].addr(), 1)], admin),
    );
    let server = start_from(&path).await;
    let (proxy, admin_addr) = (server.listen_addrs()[0], server.admin_addr().unwrap());
    write(
        dir.path(),
        &one_pool(
            "least_connections",
            &[(apps[0].addr(), 3), (apps[1].addr(), 1)],
            admin,
        ),
    );
    let reply = send(&client(), admin_addr, "POST", "/reload", &[], Bytes::new()).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let json: serde_json::Value = serde_json::from_str(&reply.body).unwrap();
    assert_eq!(
        json["changes"]["backends_added"][0]["address"],
        apps[1].addr().to_string()
    );
    assert_eq!(json["changes"]["reweighted"][0]["to"], 3);
    assert_eq!(
        json["changes"]["strategy_changed"][0]["to"],
        "least_connections"
    );
    // Least connections at 3:1 sends idle-time requests to the heavier backend; eight at once load
    // it enough that the new one takes some.
    let replies =
        futures_util::future::join_all((0..8).map(|_| get(proxy, "/sleep/300", &[]))).await;
    let seen: std::collections::BTreeSet<String> =
        replies.iter().map(|r| r.backend().to_owned()).collect();
    assert!(seen.contains("app2"), "{seen:?}");
    // GET is not allowed on a state-changing endpoint.
    let reply = get(admin_addr, "/reload", &[]).await;
    assert_eq!(reply.status, 405);
    // A broken file: 400 with the error, nothing changed.
    std::fs::write(&path, "[[listeners]]\nlisten = 5\n").unwrap();
    let reply = send(&client(), admin_addr, "POST", "/reload", &[], Bytes::new()).await;
    assert_eq!(reply.status, 400);
    assert!(reply.body.contains("listeners[0].listen"), "{}", reply.body);
    assert_eq!(get(proxy, "/", &[]).await.status, 200);
}

#[tokio::test]
async fn file_change_triggers_a_reload() {
    let apps = apps(2).await;
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        &one_pool("round_robin", &[(apps[0].addr(), 1)], ""),
    );
    let server = start_from(&path).await;
    server.watch_config_file().unwrap();
    let proxy = server.listen_addrs()[0];
    assert_eq!(get(proxy, "/", &[]).await.backend(), "app1");
    write(
        dir.path(),
        &one_pool("round_robin", &[(apps[1].addr(), 1)], ""),
    );
    let mut backend = String::new();
    for _ in 0..100 {
        backend = get(proxy, "/", &[]).await.backend();
        if backend == "app2" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        backend, "app2",
        "the file change was not picked up within 5s"
    );
}

/// A writer that pauses mid-file, the file open, is not read half-written, even when the half
/// is a valid config: the watcher waits for the file to be closed (or quiet for 2 s) before it
/// reads it. Then the whole file is applied.
#[tokio::test]
async fn a_file_written_with_a_pause_is_read_once_whole() {
    use std::io::Write;
    let apps = apps(2).await;
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        &one_pool("round_robin", &[(apps[0].addr(), 1)], ""),
    );
    let server = start_from(&path).await;
    server.watch_config_file().unwrap();
    let proxy = server.listen_addrs()[0];
    let idle = || server.shared().snapshot.load().config.timeouts.idle;
    assert_eq!(get(proxy, "/", &[]).await.backend(), "app1");

    // The first half alone is a valid config (app2, the default idle); the second sets `idle`.
    let mut file = std::fs::File::create(&path).unwrap();
    let half = one_pool("round_robin", &[(apps[1].addr(), 1)], "");
    file.write_all(half.as_bytes()).unwrap();
    file.flush().unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        get(proxy, "/", &[]).await.backend(),
        "app1",
        "the half-written file was applied"
    );
    file.write_all(b"[timeouts]\nidle = \"7s\"\n").unwrap();
    drop(file);
    wait_until("the whole file is applied", || {
        idle() == Duration::from_secs(7)
    })
    .await;
    assert_eq!(get(proxy, "/", &[]).await.backend(), "app2");
}

/// A Kubernetes ConfigMap volume updates the file by swapping the `..data` symlink it goes
/// through (a rename), never touching the file's own name: the watcher follows that too.
#[tokio::test]
async fn a_configmap_style_symlink_swap_triggers_a_reload() {
    use std::os::unix::fs::symlink;
    let apps = apps(2).await;
    let dir = tempfile::tempdir().unwrap();
    let version = |name: &str, app: &switchyard::demo::AppServer| {
        std::fs::create_dir(dir.path().join(name)).unwrap();
        let text = one_pool("round_robin", &[(app.addr(), 1)], "");
        std::fs::write(dir.path().join(name).join("proxy.toml"), text).unwrap();
    };
    version("..2026_11_23_a", &apps[0]);
    symlink("..2026_11_23_a", dir.path().join("..data")).unwrap();
    let path = dir.path().join("proxy.toml");
    symlink("..data/proxy.toml", &path).unwrap();
    let server = start_from(&path).await;
    server.watch_config_file().unwrap();
    let proxy = server.listen_addrs()[0];
    assert_eq!(get(proxy, "/", &[]).await.backend(), "app1");

    version("..2026_11_23_b", &apps[1]);
    symlink("..2026_11_23_b", dir.path().join("..data_tmp")).unwrap();
    std::fs::rename(dir.path().join("..data_tmp"), dir.path().join("..data")).unwrap();
    let mut backend = String::new();
    for _ in 0..100 {
        backend = get(proxy, "/", &[]).await.backend();
        if backend == "app2" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(backend, "app2", "the swap was not picked up within 5s");
}

#[test]
fn sighup_triggers_a_reload_of_the_binary() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let apps = rt.block_on(apps(2));
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        &one_pool("round_robin", &[(apps[0].addr(), 1)], ""),
    );
    let process = ProxyProcess::start(&path);
    let proxy = process.addr;
    assert_eq!(rt.block_on(get(proxy, "/", &[])).backend(), "app1");
    // Write in place (no rename) and signal at once; the watcher may also fire, which is harmless.
    std::fs::write(&path, one_pool("round_robin", &[(apps[1].addr(), 1)], "")).unwrap();
    process.signal("HUP");
    let mut backend = String::new();
    for _ in 0..100 {
        backend = rt.block_on(get(proxy, "/", &[])).backend();
        if backend == "app2" {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(backend, "app2", "log:\n{}", process.log());
    assert!(process.log().contains("SIGHUP"), "{}", process.log());
}

#[tokio::test]
async fn listeners_are_added_and_removed_and_a_bad_address_changes_nothing() {
    let apps = apps(1).await;
    let dir = tempfile::tempdir().unwrap();
    let base = one_pool("round_robin", &[(apps[0].addr(), 1)], "");
    let path = write(dir.path(), &base);
    let server = start_from(&path).await;
    let first = server.listen_addrs()[0];

    // A second listener on a port we reserve now.
    let reserve = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let second = reserve.local_addr().unwrap();
    drop(reserve);
    let two = format!("{base}\n[[listeners]]\nlisten = \"{second}\"\n");
    write(dir.path(), &two);
    let report = server.reload_from_file().await.unwrap();
    assert_eq!(report.listeners_added, vec![second]);
    assert_eq!(get(second, "/", &[]).await.status, 200);
    assert_eq!(
        get(first, "/", &[]).await.status,
        200,
        "the unchanged listener kept serving"
    );

    // An address that is taken: the reload fails and both listeners keep serving.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let three = format!(
        "{two}\n[[listeners]]\nlisten = \"{}\"\n",
        taken.local_addr().unwrap()
    );
    write(dir.path(), &three);
    let error = server.reload_from_file().await.expect_err("bind fails");
    // The file and the key, as config errors name them (the third listener is the one taken).
    assert!(
        error
            .to_string()
            .contains("proxy.toml: listeners[2].listen: cannot listen on"),
        "{error}"
    );
    assert_eq!(get(second, "/", &[]).await.status, 200);

    // Back to one listener: the second stops accepting.
    write(dir.path(), &base);
    let report = server.reload_from_file().await.unwrap();
    assert_eq!(report.listeners_removed, vec![second]);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(tokio::net::TcpStream::connect(second).await.is_err());
    assert_eq!(get(first, "/", &[]).await.status, 200);
}

#[tokio::test]
async fn live_state_survives_reloads_and_sticky_clients_stay_put() {
    let apps = apps(3).await;
    let dir = tempfile::tempdir().unwrap();
    let members: Vec<_> = apps.iter().map(|a| (a.addr(), 1)).collect();
    let path = write(dir.path(), &one_pool("cookie", &members, ""));
    let server = start_from(&path).await;
    let proxy = server.listen_addrs()[0];
    let first = get(proxy, "/", &[]).await;
    let cookie = format!("sy={}", first.cookie("sy").unwrap());
    let pinned = first.backend();
    let state_before = server.shared().registry.get(apps[0].addr()).unwrap();

    // Reverse the order and change every weight: the cookie still names the same backend.
    let reordered: Vec<_> = apps.iter().rev().map(|a| (a.addr(), 3)).collect();
    write(dir.path(), &one_pool("cookie", &reordered, ""));
    server.reload_from_file().await.unwrap();
    for _ in 0..10 {
        let reply = get(proxy, "/", &[("cookie", &cookie)]).await;
        assert_eq!(reply.backend(), pinned);
        assert!(reply.cookie("sy").is_none());
    }
    let state_after = server.shared().registry.get(apps[0].addr()).unwrap();
    assert!(
        Arc::ptr_eq(&state_before, &state_after),
        "live state was rebuilt, not kept"
    );
}

#[test]
fn check_diff_prints_the_changes_before_applying() {
    let dir = tempfile::tempdir().unwrap();
    let a: SocketAddr = "127.0.0.1:9001".parse().unwrap();
    let b: SocketAddr = "127.0.0.1:9002".parse().unwrap();
    let current = dir.path().join("current.toml");
    let new = dir.path().join("new.toml");
    std::fs::write(&current, one_pool("round_robin", &[(a, 1), (b, 1)], "")).unwrap();
    std::fs::write(&new, one_pool("cookie", &[(a, 2)], "")).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["check", "--config"])
        .arg(&new)
        .arg("--diff")
        .arg(&current)
        .output()
        .unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("draining: 127.0.0.1:9002"), "{stdout}");
    assert!(
        stdout.contains("re-weighted: app 127.0.0.1:9001 1→2"),
        "{stdout}"
    );
    assert!(
        stdout.contains("strategy: app round_robin→cookie"),
        "{stdout}"
    );
}
