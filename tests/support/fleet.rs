//! Several switchyard instances with one config, which must route every client the same way:
//! 1,000 client IPs (through an `ip_hash` pool, the IP given in `X-Forwarded-For` by a trusted
//! proxy on 127.0.0.1) and 1,000 affinity cookies (a `cookie` pool whose new clients are placed
//! by `ip_hash` too, so that even re-placements agree).

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::join_all;

use super::{client, get, members, send, ProxyProcess, SECRET};

/// Clients in each check.
pub const CLIENTS: usize = 1_000;

/// Requests in flight at once per instance.
const CONCURRENCY: usize = 50;

/// The config of every instance of a fleet: `/ip` → pool `hashed` (ip_hash), anything else →
/// pool `sticky` (cookie `sy`, placed by ip_hash, `drain_sticky = "move"`), both found by
/// `discovery` (the body of a `[discovery]` table), with an admin listener.
pub fn config(discovery: &str) -> String {
    format!(
        r#"
[admin]
listen = "127.0.0.1:0"

[[listeners]]
listen = "127.0.0.1:0"

[[routes]]
path_prefix = "/ip"
pool = "hashed"

[[routes]]
pool = "sticky"

[pools.hashed]
strategy = "ip_hash"
trusted_proxies = ["127.0.0.1"]

[pools.hashed.discovery]
{discovery}

[pools.sticky]
strategy = "cookie"
trusted_proxies = ["127.0.0.1"]
drain_sticky = "move"

[pools.sticky.cookie]
name = "sy"
secret = "{SECRET}"
fallback = "ip_hash"

[pools.sticky.discovery]
{discovery}
"#
    )
}

/// Client `i`'s IP.
pub fn client_ip(i: usize) -> String {
    format!("10.{}.{}.{}", i / 62_500, (i / 250) % 250, i % 250 + 1)
}

/// What one instance did with the clients, by client index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Routing {
    /// The backend each client IP was sent to by `ip_hash`.
    pub by_ip: Vec<String>,
    /// The backend each cookie was sent to.
    pub by_cookie: Vec<String>,
}

/// `GET path` from `proxy` as client `i`, with `cookie` if any; the backend and any new `sy`.
async fn ask(
    proxy: SocketAddr,
    path: &str,
    i: usize,
    cookie: Option<&str>,
) -> (String, Option<String>) {
    let ip = client_ip(i);
    let cookie = cookie.map(|c| format!("sy={c}"));
    let mut headers = vec![("x-forwarded-for", ip.as_str())];
    if let Some(cookie) = &cookie {
        headers.push(("cookie", cookie.as_str()));
    }
    let reply = send(&client(), proxy, "GET", path, &headers, Bytes::new()).await;
    assert_eq!(reply.status, 200, "client {i} via {proxy}: {}", reply.body);
    (reply.backend(), reply.cookie("sy"))
}

/// `CLIENTS` new clients ask `proxy` once without a cookie; each one's cookie and backend.
pub async fn issue_cookies(proxy: SocketAddr) -> Vec<(String, String)> {
    let mut issued = Vec::with_capacity(CLIENTS);
    for chunk in (0..CLIENTS).collect::<Vec<_>>().chunks(CONCURRENCY) {
        let replies = join_all(chunk.iter().map(|&i| ask(proxy, "/", i, None))).await;
        for (backend, cookie) in replies {
            issued.push((cookie.expect("a new client gets a cookie"), backend));
        }
    }
    issued
}

/// Where `proxy` sends each client IP and each of `cookies` (client `i` sends `cookies[i]`).
pub async fn route(proxy: SocketAddr, cookies: &[String]) -> Routing {
    let mut by_ip = Vec::with_capacity(CLIENTS);
    let mut by_cookie = Vec::with_capacity(cookies.len());
    let indexes: Vec<usize> = (0..CLIENTS).collect();
    for chunk in indexes.chunks(CONCURRENCY) {
        let replies = join_all(chunk.iter().map(|&i| ask(proxy, "/ip", i, None))).await;
        by_ip.extend(replies.into_iter().map(|(backend, _)| backend));
    }
    let indexes: Vec<usize> = (0..cookies.len()).collect();
    for chunk in indexes.chunks(CONCURRENCY) {
        let replies = join_all(
            chunk
                .iter()
                .map(|&i| ask(proxy, "/", i, Some(cookies[i].as_str()))),
        )
        .await;
        by_cookie.extend(replies.into_iter().map(|(backend, _)| backend));
    }
    Routing { by_ip, by_cookie }
}

/// Waits until both pools of every instance list exactly `left`, all active: the change applied
/// and the removed backend released (nothing is in flight on it, so its drain ends at once).
/// Waiting for the active set alone is not enough: a drain starts just before the new snapshot is
/// swapped in, and requests in between would still walk the old Maglev table.
pub async fn settle(processes: &[&ProxyProcess], left: &[SocketAddr], within: Duration) {
    let mut expected: Vec<(String, u64, String)> = left
        .iter()
        .map(|a| (a.to_string(), 1, "active".to_owned()))
        .collect();
    expected.sort();
    let started = tokio::time::Instant::now();
    for process in processes {
        for pool in ["hashed", "sticky"] {
            loop {
                let now = members(process.admin_addr(), pool).await;
                if now == expected {
                    break;
                }
                assert!(
                    started.elapsed() < within,
                    "{pool} of {}: {now:?}, never {expected:?} within {within:?}",
                    process.addr
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// Asserts that two instances routed every client alike, showing the first differences and,
/// when there are some, what the instances did besides: a retried request (after a failed
/// connection, say) legitimately lands elsewhere, and their logs and counters say so.
pub async fn assert_same(a: &Routing, b: &Routing, when: &str, processes: &[&ProxyProcess]) {
    let differ = |x: &[String], y: &[String]| -> Vec<String> {
        x.iter()
            .zip(y)
            .enumerate()
            .filter(|(_, (p, q))| p != q)
            .map(|(i, (p, q))| format!("client {i} ({}): {p} vs {q}", client_ip(i)))
            .collect()
    };
    let ips = differ(&a.by_ip, &b.by_ip);
    let cookies = differ(&a.by_cookie, &b.by_cookie);
    if !ips.is_empty() || !cookies.is_empty() {
        let mut context = String::new();
        for process in processes {
            let metrics = get(process.admin_addr(), "/metrics", &[]).await.body;
            let counters: Vec<&str> = metrics
                .lines()
                .filter(|l| l.starts_with("switchyard_retries_total"))
                .chain(
                    metrics
                        .lines()
                        .filter(|l| l.starts_with("switchyard_upstream_connect_errors_total")),
                )
                .collect();
            let log = process.log();
            let notable: Vec<&str> = log
                .lines()
                .filter(|l| l.contains("WARN") || l.contains("ERROR") || l.contains("changed"))
                .collect();
            let status = super::status(process.admin_addr()).await;
            context += &format!(
                "\ninstance {}: {counters:?}\n{}\nstatus: {}",
                process.addr,
                notable.join("\n"),
                status["pools"]
            );
        }
        panic!(
            "{when}: {} client IPs and {} cookies routed differently; first: {:?} {:?}{context}",
            ips.len(),
            cookies.len(),
            ips.iter().take(5).collect::<Vec<_>>(),
            cookies.iter().take(5).collect::<Vec<_>>()
        );
    }
    assert_eq!(a.by_ip.len(), CLIENTS);
}

/// How many clients each backend got, sorted by backend.
pub fn spread(backends: &[String]) -> Vec<(String, usize)> {
    let mut counts: std::collections::BTreeMap<String, usize> = Default::default();
    for backend in backends {
        *counts.entry(backend.clone()).or_default() += 1;
    }
    counts.into_iter().collect()
}
