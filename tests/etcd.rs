//! etcd discovery against a real etcd (Debian's `etcd-server`), which each test starts on free
//! loopback ports with its own data directory and kills when done: keys added, removed and
//! re-weighted change the pool within a second with no failed request under load, a removed
//! backend drains, a bad value is skipped, an emptied prefix is ignored, etcd stopped mid-test
//! leaves the pool serving and watching resumes with a full read when it is back, and two
//! switchyard processes route 1,000 client IPs and 1,000 cookies alike before and after a change.
//!
//! Needs `--features etcd` (and `protoc` to build) and `etcd` on `PATH`; without the binary the
//! tests fail, they never skip.
#![cfg(feature = "etcd")]

mod support;

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use etcd_client::{Client, DeleteOptions};
use support::fleet;
use support::*;
use switchyard::demo::AppServer;

/// What to tell someone who has no `etcd`.
const INSTALL_HINT: &str = "install Debian's etcd-server (`sudo apt-get install etcd-server`), \
                            which puts etcd in /usr/bin";

/// An etcd this test started; killed by its PID when dropped.
struct Etcd {
    binary: PathBuf,
    child: Option<Child>,
    client_port: u16,
    peer_port: u16,
    dir: tempfile::TempDir,
}

fn free_port() -> u16 {
    // Bound then released: free unless something takes it in between, and then etcd's log says so.
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port()
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(name))
            .find(|candidate| candidate.is_file())
    })
}

impl Etcd {
    /// Starts the `etcd` on `PATH` on two free loopback ports, with a fresh data directory.
    async fn start() -> Etcd {
        let binary =
            find_on_path("etcd").unwrap_or_else(|| panic!("etcd is not on PATH; {INSTALL_HINT}"));
        let mut etcd = Etcd {
            binary,
            child: None,
            client_port: free_port(),
            peer_port: free_port(),
            dir: tempfile::tempdir().unwrap(),
        };
        etcd.run().await;
        etcd
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    /// Starts the process (again, on the same ports and data) and waits until it is healthy.
    async fn run(&mut self) {
        let client = self.endpoint();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        let child = Command::new(&self.binary)
            .args(["--name", "default", "--data-dir"])
            .arg(self.dir.path().join("data"))
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("default={peer}")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.binary.display()));
        self.child = Some(child);
        let address = SocketAddr::from(([127, 0, 0, 1], self.client_port));
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("etcd exited ({status}); its log:\n{}", self.log());
            }
            if healthy(address).await {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "etcd not healthy within 20s; its log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Kills the process (SIGKILL, as a crash would), keeping its data.
    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    async fn client(&self) -> Client {
        Client::connect([self.endpoint()], None)
            .await
            .expect("the test connects to its etcd")
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Whether etcd at `address` answers `GET /health` with `"health":"true"` (in raw HTTP/1.1, as
/// refused connections are expected while it starts).
async fn healthy(address: SocketAddr) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(address).await.ok()?;
        let request = "GET /health HTTP/1.1\r\nHost: etcd\r\nConnection: close\r\n\r\n";
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.ok()?;
        Some(String::from_utf8_lossy(&response).contains(r#""health":"true""#))
    };
    tokio::time::timeout(Duration::from_secs(1), exchange)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}

/// `{"address": ..., "weight": ...}`.
fn value(address: SocketAddr, weight: u32) -> String {
    format!(r#"{{"address": "{address}", "weight": {weight}}}"#)
}

async fn put(client: &mut Client, key: &str, value: &str) {
    client.put(key, value, None).await.expect("put");
}

async fn delete(client: &mut Client, key: &str) {
    client.delete(key, None).await.expect("delete");
}

/// `etcd = { ... }` with `prefix`.
fn source(etcd: &Etcd, prefix: &str) -> String {
    format!(
        "etcd = {{ endpoints = [\"{}\"], prefix = \"{prefix}\" }}",
        etcd.endpoint()
    )
}

/// Pool `app` (every path) found under `prefix`, with `pool_extra` and an admin listener.
fn discovered(etcd: &Etcd, prefix: &str, pool_extra: &str) -> String {
    format!(
        r#"
[admin]
listen = "127.0.0.1:0"

[[listeners]]
listen = "127.0.0.1:0"

[[routes]]
pool = "app"

[pools.app]
strategy = "round_robin"
{pool_extra}

[pools.app.discovery]
{}
"#,
        source(etcd, prefix)
    )
}

/// Polls `/status` until pool `app`'s discovery state is `state`.
async fn wait_for_state(admin: SocketAddr, state: &str, within: Duration) -> serde_json::Value {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let status = status(admin).await;
        let discovery = pool_status(&status, "app")["discovery"].clone();
        if discovery["state"] == state {
            return discovery;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never {state}: {discovery}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sends `GET /sleep/{ms}` until one of them is sleeping on `app` (not merely any request in flight:
/// the test's load passes through too).
async fn slow_request_on(
    proxy: SocketAddr,
    app: &AppServer,
    ms: u64,
) -> Vec<tokio::task::JoinHandle<Reply>> {
    let mut requests = Vec::new();
    while app.sleeping() == 0 {
        let path = format!("/sleep/{ms}");
        requests.push(tokio::spawn(async move { get(proxy, &path, &[]).await }));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    requests
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_added_removed_and_reweighted_change_the_pool_within_a_second_under_load() {
    let etcd = Etcd::start().await;
    let mut kv = etcd.client().await;
    let apps = apps(3).await;
    let prefix = "/switchyard/pools/app/";
    put(&mut kv, &format!("{prefix}a1"), &value(apps[0].addr(), 1)).await;
    put(&mut kv, &format!("{prefix}a2"), &value(apps[1].addr(), 1)).await;
    // Outside the prefix: not a backend.
    put(
        &mut kv,
        "/switchyard/pools/other/x",
        &value(apps[2].addr(), 1),
    )
    .await;
    let text = discovered(&etcd, prefix, "drain_timeout = \"10s\"");
    let (server, proxy) = proxy(&text).await;
    let admin = server.admin_addr().unwrap();
    wait_for_active(
        admin,
        "app",
        &[apps[0].addr(), apps[1].addr()],
        Duration::ZERO,
    )
    .await;
    let load = Load::start(proxy, 4);

    // Added.
    put(&mut kv, &format!("{prefix}a3"), &value(apps[2].addr(), 1)).await;
    let all: Vec<SocketAddr> = apps.iter().map(|a| a.addr()).collect();
    let took = wait_for_active(admin, "app", &all, Duration::from_secs(1)).await;
    eprintln!("added after {took:?}");

    // Re-weighted.
    put(&mut kv, &format!("{prefix}a1"), &value(apps[0].addr(), 3)).await;
    let started = tokio::time::Instant::now();
    loop {
        let listed = members(admin, "app").await;
        if listed.contains(&(apps[0].addr().to_string(), 3, "active".to_owned())) {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(1), "{listed:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    eprintln!("re-weighted after {:?}", started.elapsed());

    // Removed while a slow request is in flight on it: it drains, the request finishes.
    let slow = slow_request_on(proxy, &apps[1], 1500).await;
    delete(&mut kv, &format!("{prefix}a2")).await;
    let took = wait_for_active(
        admin,
        "app",
        &[apps[0].addr(), apps[2].addr()],
        Duration::from_secs(1),
    )
    .await;
    eprintln!("removed after {took:?}");
    let listed = members(admin, "app").await;
    assert!(
        listed.contains(&(apps[1].addr().to_string(), 1, "draining".to_owned())),
        "{listed:?}"
    );
    for request in slow {
        assert_eq!(request.await.unwrap().status, 200);
    }
    let drained = r#"switchyard_backend_drains_total{end="drained"}"#;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while metric(admin, drained).await != Some(1.0) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the drain never ended"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let seen = apps[1].requests();

    // A value that is not a backend is skipped; the others stand.
    put(&mut kv, &format!("{prefix}bad"), "10.0.0.9:80").await;
    let unchanged = r#"switchyard_discovery_updates_total{pool="app",result="unchanged"}"#;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while metric(admin, unchanged).await.unwrap_or(0.0) < 1.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the bad value was never seen"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        wait_for_state(admin, "ok", Duration::ZERO).await["members"],
        2
    );

    let (ok, failed) = load.finish().await;
    assert_eq!(failed, 0, "failed requests while the membership changed");
    assert!(ok > 100, "load flowed: {ok}");
    assert_eq!(apps[1].requests(), seen, "the removed backend got new work");
    let changed = r#"switchyard_discovery_updates_total{pool="app",result="changed"}"#;
    assert_eq!(metric(admin, changed).await, Some(4.0));
    assert_eq!(metric(admin, unchanged).await, Some(1.0));

    // Every key gone at once: an empty answer from a healthy source, ignored without
    // allow_empty.
    kv.delete(prefix, Some(DeleteOptions::new().with_prefix()))
        .await
        .expect("delete the prefix");
    wait_for_state(admin, "empty", Duration::from_secs(1)).await;
    assert_eq!(get(proxy, "/", &[]).await.status, 200);
    assert_eq!(active(admin, "app").await.len(), 2);
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_stopped_leaves_the_pool_serving_and_watching_resumes_with_a_full_read() {
    let mut etcd = Etcd::start().await;
    let mut kv = etcd.client().await;
    let apps = apps(3).await;
    let prefix = "/switchyard/pools/app/";
    put(&mut kv, &format!("{prefix}a1"), &value(apps[0].addr(), 1)).await;
    put(&mut kv, &format!("{prefix}a2"), &value(apps[1].addr(), 1)).await;
    drop(kv);
    let (server, proxy) = proxy(&discovered(&etcd, prefix, "")).await;
    let admin = server.admin_addr().unwrap();
    let first_two = [apps[0].addr(), apps[1].addr()];
    wait_for_active(admin, "app", &first_two, Duration::ZERO).await;

    etcd.stop();
    let discovery = wait_for_state(admin, "failing", Duration::from_secs(2)).await;
    assert!(discovery["last_error"].is_string(), "{discovery}");
    // Seconds of failed reconnections later, the last membership still serves.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..20 {
        let reply = get(proxy, "/", &[]).await;
        assert_eq!(reply.status, 200);
        seen.insert(reply.backend());
    }
    assert_eq!(seen.len(), 2, "{seen:?}");
    wait_for_active(admin, "app", &first_two, Duration::ZERO).await;
    let up = r#"switchyard_discovery_source_up{pool="app"}"#;
    assert_eq!(metric(admin, up).await, Some(0.0));
    let errors = r#"switchyard_discovery_updates_total{pool="app",result="error"}"#;
    assert!(metric(admin, errors).await.unwrap() >= 2.0);

    // Back, and changed before switchyard reconnects: its full read finds the change...
    etcd.run().await;
    let mut kv = etcd.client().await;
    delete(&mut kv, &format!("{prefix}a1")).await;
    put(&mut kv, &format!("{prefix}a3"), &value(apps[2].addr(), 1)).await;
    // (the back-off between attempts doubles up to 10 s)
    wait_for_active(
        admin,
        "app",
        &[apps[1].addr(), apps[2].addr()],
        Duration::from_secs(15),
    )
    .await;
    wait_for_state(admin, "ok", Duration::ZERO).await;
    assert_eq!(metric(admin, up).await, Some(1.0));
    // ...and the watch follows again.
    put(&mut kv, &format!("{prefix}a1"), &value(apps[0].addr(), 1)).await;
    let all: Vec<SocketAddr> = apps.iter().map(|a| a.addr()).collect();
    wait_for_active(admin, "app", &all, Duration::from_secs(1)).await;
    drop(server);
}

#[tokio::test]
async fn started_while_etcd_is_down_the_pool_is_empty_until_etcd_answers() {
    let mut etcd = Etcd::start().await;
    let mut kv = etcd.client().await;
    let apps = apps(1).await;
    let prefix = "/switchyard/pools/app/";
    put(&mut kv, &format!("{prefix}a1"), &value(apps[0].addr(), 1)).await;
    drop(kv);
    etcd.stop();
    // The server does not wait long for a source that refuses connections.
    let started = tokio::time::Instant::now();
    let (server, proxy) = proxy(&discovered(&etcd, prefix, "")).await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let admin = server.admin_addr().unwrap();
    let discovery = wait_for_state(admin, "failing", Duration::ZERO).await;
    assert!(discovery["members"].is_null(), "{discovery}");
    assert_eq!(get(proxy, "/", &[]).await.status, 503);
    etcd.run().await;
    wait_for_active(admin, "app", &[apps[0].addr()], Duration::from_secs(15)).await;
    assert_eq!(get(proxy, "/", &[]).await.status, 200);
    drop(server);
}

#[test]
fn two_instances_route_client_ips_and_cookies_alike_before_and_after_a_key_is_removed() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let etcd = rt.block_on(Etcd::start());
    let mut kv = rt.block_on(etcd.client());
    let apps = rt.block_on(apps(4));
    let prefix = "/switchyard/pools/fleet/";
    for (i, app) in apps.iter().enumerate() {
        rt.block_on(put(
            &mut kv,
            &format!("{prefix}app{}", i + 1),
            &value(app.addr(), 1),
        ));
    }
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        dir.path(),
        "proxy.toml",
        &fleet::config(&source(&etcd, prefix)),
    );
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
    let issued_to: Vec<String> = issued.iter().map(|(_, b)| b.clone()).collect();
    assert_eq!(before_b.by_cookie, issued_to);
    assert_eq!(fleet::spread(&before_a.by_ip).len(), 4);

    rt.block_on(delete(&mut kv, &format!("{prefix}app3")));
    let left: Vec<SocketAddr> = [0, 1, 3].iter().map(|&i| apps[i].addr()).collect();
    rt.block_on(fleet::settle(&[&a, &b], &left, Duration::from_secs(3)));
    let after_a = rt.block_on(fleet::route(a.addr, &cookies));
    let after_b = rt.block_on(fleet::route(b.addr, &cookies));
    rt.block_on(fleet::assert_same(
        &after_a,
        &after_b,
        "after the change",
        &[&a, &b],
    ));
    for i in 0..fleet::CLIENTS {
        assert_ne!(after_a.by_ip[i], "app3", "client {i}");
        if before_a.by_cookie[i] != "app3" {
            assert_eq!(after_a.by_cookie[i], before_a.by_cookie[i], "cookie {i}");
        } else {
            assert_ne!(after_a.by_cookie[i], "app3", "cookie {i}");
        }
    }
    let issued = rt.block_on(fleet::issue_cookies(b.addr));
    let cookies: Vec<String> = issued.iter().map(|(c, _)| c.clone()).collect();
    let by_a = rt.block_on(fleet::route(a.addr, &cookies));
    let issued_to: Vec<String> = issued.iter().map(|(_, b)| b.clone()).collect();
    assert_eq!(by_a.by_cookie, issued_to);
}
