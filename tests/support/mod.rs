//! Shared by the integration tests: real app servers and the real proxy on 127.0.0.1 with ephemeral
//! ports, and a small HTTP client.
#![allow(dead_code)]

pub mod dns;
pub mod fleet;
pub mod tls;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Body, Frame};
use hyper::client::conn::http1::SendRequest;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use hyper_util::rt::TokioIo;
use switchyard::config::Config;
use switchyard::demo::AppServer;
use switchyard::server::Server;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Starts `n` app servers named app1..appN on ephemeral ports.
pub async fn apps(n: usize) -> Vec<AppServer> {
    let mut apps = Vec::new();
    for i in 0..n {
        let app = AppServer::start("127.0.0.1:0".parse().unwrap(), &format!("app{}", i + 1))
            .await
            .expect("app server starts");
        apps.push(app);
    }
    apps
}

/// Starts `n` app servers named app1..appN on one port at 127.0.0.2, 127.0.0.3, ... (Linux routes
/// all of 127.0.0.0/8 to loopback), as DNS A records can name them: addresses differ, the port
/// is shared.
pub async fn apps_on_loopback_ips(n: usize) -> (Vec<AppServer>, u16) {
    'attempt: for _ in 0..50 {
        let first = AppServer::start("127.0.0.2:0".parse().unwrap(), "app1")
            .await
            .expect("app server starts");
        let port = first.addr().port();
        let mut apps = vec![first];
        for i in 1..n {
            let addr = SocketAddr::from(([127, 0, 0, 2 + i as u8], port));
            match AppServer::start(addr, &format!("app{}", i + 1)).await {
                Ok(app) => apps.push(app),
                // Taken on that address: try another port.
                Err(_) => continue 'attempt,
            }
        }
        return (apps, port);
    }
    panic!("no port free on 127.0.0.2..{} after 50 tries", 1 + n);
}

/// `GET /status` from an admin listener, as JSON.
pub async fn status(admin: SocketAddr) -> serde_json::Value {
    let reply = get(admin, "/status", &[]).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    serde_json::from_str(&reply.body).expect("status is JSON")
}

/// Pool `name` of a `/status` document.
pub fn pool_status<'a>(status: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    status["pools"]
        .as_array()
        .expect("pools is a list")
        .iter()
        .find(|p| p["name"] == name)
        .unwrap_or_else(|| panic!("no pool {name} in {status}"))
}

/// The `(address, weight, state)` of every backend `/status` lists for pool `name`, sorted.
pub async fn members(admin: SocketAddr, name: &str) -> Vec<(String, u64, String)> {
    let status = status(admin).await;
    let mut members: Vec<(String, u64, String)> = pool_status(&status, name)["backends"]
        .as_array()
        .expect("backends is a list")
        .iter()
        .map(|b| {
            (
                b["address"].as_str().unwrap().to_owned(),
                b["weight"].as_u64().unwrap(),
                b["state"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    members.sort();
    members
}

/// The addresses of pool `name`'s active backends, sorted.
pub async fn active(admin: SocketAddr, name: &str) -> Vec<String> {
    members(admin, name)
        .await
        .into_iter()
        .filter(|(_, _, state)| state == "active")
        .map(|(address, _, _)| address)
        .collect()
}

/// Polls `/status` until pool `name` lists `count` backends in any state (a drained one
/// released); panics after 5 seconds.
pub async fn wait_for_members(admin: SocketAddr, name: &str, count: usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let listed = members(admin, name).await;
        if listed.len() == count {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "pool {name}: {listed:?}, never {count} backends"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Polls `/status` until pool `name`'s active backends are `expected` (any order); panics
/// after `within`, naming what it saw. Returns how long it took.
pub async fn wait_for_active(
    admin: SocketAddr,
    name: &str,
    expected: &[SocketAddr],
    within: Duration,
) -> Duration {
    let mut expected: Vec<String> = expected.iter().map(|a| a.to_string()).collect();
    expected.sort();
    let started = tokio::time::Instant::now();
    loop {
        let now = active(admin, name).await;
        if now == expected {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < within,
            "pool {name}: active {now:?}, never {expected:?} within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The value of the first series of `/metrics` whose line starts with `series`.
pub async fn metric(admin: SocketAddr, series: &str) -> Option<f64> {
    let reply = get(admin, "/metrics", &[]).await;
    reply.body.lines().find_map(|line| {
        line.strip_prefix(series)
            .and_then(|rest| rest.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    })
}

/// Clients sending requests until `stop`; counts successes and failures (printing each).
pub struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    pub fn start(proxy: SocketAddr, clients: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let tasks = (0..clients)
            .map(|c| {
                let (stop, ok, failed) = (Arc::clone(&stop), Arc::clone(&ok), Arc::clone(&failed));
                tokio::spawn(async move {
                    let client = client();
                    while !stop.load(Ordering::Relaxed) {
                        let reply = send(&client, proxy, "GET", "/", &[], Bytes::new()).await;
                        if reply.status == 200 {
                            ok.fetch_add(1, Ordering::Relaxed);
                        } else {
                            failed.fetch_add(1, Ordering::Relaxed);
                            eprintln!("client {c}: {} {}", reply.status, reply.body);
                        }
                    }
                })
            })
            .collect();
        Load {
            stop,
            ok,
            failed,
            tasks,
        }
    }

    /// Stops the clients; (succeeded, failed).
    pub async fn finish(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            task.await.unwrap();
        }
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}

/// A `backends = [...]` list for the given addresses and weights.
pub fn backends(addrs: &[(SocketAddr, u32)]) -> String {
    let items: Vec<String> = addrs
        .iter()
        .map(|(a, w)| format!("{{ address = \"{a}\", weight = {w} }}"))
        .collect();
    format!("[{}]", items.join(", "))
}

/// The cookie secret [`one_pool`] signs with.
pub const SECRET: &str = "test-secret-0123456789";

/// A one-pool config on an ephemeral listener, pool `app` with cookie `sy` signed by [`SECRET`];
/// `tail` goes after the pool (e.g. `[timeouts]`).
pub fn one_pool(strategy: &str, addrs: &[(SocketAddr, u32)], tail: &str) -> String {
    pool_with(strategy, addrs, "", &format!("[\"{SECRET}\"]"), tail)
}

/// Like [`one_pool`], with `pool_extra` inside `[pools.app]` (e.g. `trusted_proxies = [...]`) and
/// `secret` as the cookie table's `secret` value, written as TOML.
pub fn pool_with(
    strategy: &str,
    addrs: &[(SocketAddr, u32)],
    pool_extra: &str,
    secret: &str,
    tail: &str,
) -> String {
    format!(
        r#"
[[listeners]]
listen = "127.0.0.1:0"

[[routes]]
pool = "app"

[pools.app]
strategy = "{strategy}"
backends = {backends}
{pool_extra}

[pools.app.cookie]
name = "sy"
secret = {secret}

{tail}
"#,
        backends = backends(addrs)
    )
}

/// Each app's address with weight 1.
pub fn weight_one(apps: &[AppServer]) -> Vec<(SocketAddr, u32)> {
    apps.iter().map(|a| (a.addr(), 1)).collect()
}

/// Parses and validates a config given as text.
pub fn config(text: &str) -> Config {
    Config::from_str(text, Path::new("test.toml")).unwrap_or_else(|e| panic!("config: {e}\n{text}"))
}

/// Starts the proxy in this process; returns it and its first listener's address.
pub async fn proxy(text: &str) -> (Arc<Server>, SocketAddr) {
    let server = Server::start(config(text)).await.expect("proxy starts");
    let addr = server.listen_addrs()[0];
    (server, addr)
}

/// A pooled keep-alive HTTP/1.1 client.
pub fn client() -> Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

/// A response, read whole.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: String,
}

impl Reply {
    /// The `x-backend` header (which app served it).
    pub fn backend(&self) -> String {
        self.headers
            .get("x-backend")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default()
    }

    /// The value of the first `Set-Cookie` named `name`.
    pub fn cookie(&self, name: &str) -> Option<String> {
        self.headers.get_all("set-cookie").iter().find_map(|v| {
            let pair = v.to_str().ok()?.split(';').next()?;
            let (k, v) = pair.split_once('=')?;
            (k.trim() == name).then(|| v.trim().to_owned())
        })
    }
}

/// GET `path` from `addr` with extra headers.
pub async fn get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Reply {
    send(&client(), addr, "GET", path, headers, Bytes::new()).await
}

/// Sends one request with `client`.
pub async fn send(
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Reply {
    let mut request = Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"))
        .body(Full::new(body))
        .unwrap();
    for (k, v) in headers {
        request.headers_mut().append(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    let response = tokio::time::timeout(Duration::from_secs(30), client.request(request))
        .await
        .expect("response within 30s")
        .expect("request succeeds at the HTTP level");
    let (parts, body) = response.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

/// An address on which nothing listens (bound, then released).
pub async fn dead_addr() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    drop(l);
    a
}

/// An address that accepts connections but never answers.
pub async fn black_hole() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = l.accept().await {
            held.push(s);
        }
    });
    (a, task)
}

/// Keeps an empty body type handy for h2 clients.
pub fn empty() -> Empty<Bytes> {
    Empty::new()
}

/// A `switchyard` process started from the built binary; killed on drop if still running.
pub struct ProxyProcess {
    pub child: Child,
    pub addr: SocketAddr,
    pub stderr_path: PathBuf,
}

impl ProxyProcess {
    /// Starts `switchyard --config <file>` and waits for it to log its listening address.
    pub fn start(config_path: &Path) -> ProxyProcess {
        ProxyProcess::start_logging(config_path, "info")
    }

    /// [`ProxyProcess::start`] with `RUST_LOG` set to `rust_log`.
    pub fn start_logging(config_path: &Path, rust_log: &str) -> ProxyProcess {
        // One log per process: two processes may share a config file.
        static STARTED: AtomicUsize = AtomicUsize::new(0);
        let n = STARTED.fetch_add(1, Ordering::Relaxed);
        let stderr_path = config_path.with_extension(format!("{n}.stderr"));
        let stderr = std::fs::File::create(&stderr_path).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .arg("--config")
            .arg(config_path)
            .env("RUST_LOG", rust_log)
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("switchyard binary starts");
        // Owned by the guard at once, so a timeout below kills and reaps it on the way out.
        let mut process = ProxyProcess {
            child,
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            stderr_path,
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let log = process.log();
            if let Some(addr) = log
                .lines()
                // Text logs say `listen=ADDR`, JSON logs `"listen":"ADDR"`.
                .find_map(|l| {
                    l.split("listen=")
                        .nth(1)
                        .or_else(|| l.split("\"listen\":").nth(1))
                })
                .and_then(|rest| rest.split(|c: char| c.is_whitespace() || c == ',').next())
                .and_then(|a| a.trim_matches(|c| c == '"' || c == '}').parse().ok())
            {
                process.addr = addr;
                return process;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no listening line in:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends a signal (e.g. "TERM", "HUP") to the process.
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// The admin listener's address, from the process's `admin listening` log line (waited for:
    /// it may come a moment after the proxy listener's line that `spawn` waits for).
    pub fn admin_addr(&self) -> SocketAddr {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let log = self.log();
            let addr = log
                .lines()
                .find(|l| l.contains("admin listening"))
                .and_then(|l| l.split("admin=").nth(1))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|a| a.trim_matches('"').parse().ok());
            if let Some(addr) = addr {
                return addr;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no admin listening line in:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// What the process logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Cookies a browser would keep: the last value `Set-Cookie` gave each name.
#[derive(Debug, Default, Clone)]
pub struct CookieJar {
    cookies: Vec<(String, String)>,
}

impl CookieJar {
    /// Takes every `Set-Cookie` of `reply`.
    pub fn update(&mut self, reply: &Reply) {
        for value in reply.headers.get_all("set-cookie") {
            let pair = value.to_str().unwrap().split(';').next().unwrap();
            let (name, value) = pair.split_once('=').unwrap();
            self.set(name.trim(), value.trim());
        }
    }

    /// Sets one cookie.
    pub fn set(&mut self, name: &str, value: &str) {
        match self.cookies.iter_mut().find(|(n, _)| n == name) {
            Some(entry) => entry.1 = value.to_owned(),
            None => self.cookies.push((name.to_owned(), value.to_owned())),
        }
    }

    /// The value of cookie `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.cookies
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The `Cookie` request header value.
    pub fn header(&self) -> String {
        let pairs: Vec<String> = self
            .cookies
            .iter()
            .map(|(n, v)| format!("{n}={v}"))
            .collect();
        pairs.join("; ")
    }
}

/// One HTTP/1.1 client connection to `addr`, for tests that care which connection carries what.
pub async fn h1_connection<B>(addr: SocketAddr) -> SendRequest<B>
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender
}

/// A request body fed chunk by chunk through a channel; sent chunked since its length is unknown.
#[derive(Debug)]
pub struct ChannelBody(pub tokio::sync::mpsc::Receiver<Bytes>);

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|chunk| chunk.map(|c| Ok(Frame::data(c))))
    }
}

/// Writes `request` as raw bytes on a new connection and reads until the server closes it.
pub async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut response))
        .await
        .expect("the server answers and closes within 5s")
        .unwrap();
    String::from_utf8_lossy(&response).into_owned()
}

/// A backend that answers every request head it reads with `response`, verbatim, keeping the
/// connection open: for response headers the demo app never sends.
pub async fn raw_backend(response: &'static [u8]) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let Ok(n) = s.read(&mut chunk).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    // Bodiless requests only: every head ends one request.
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        buf.drain(..end + 4);
                        if s.write_all(response).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    (a, task)
}

/// Polls `condition` every few milliseconds until it holds; panics naming `what` after 5 seconds.
pub async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !condition() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Writes `text` to `name` in `dir` and returns the path.
pub fn write_config(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// Runs `switchyard check --config <path>`.
pub fn run_check(path: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .arg("check")
        .arg("--config")
        .arg(path)
        .env("NO_COLOR", "1")
        .output()
        .expect("switchyard binary runs")
}

/// One request as [`wire_backend`] read it off the wire: the head as sent (request line and
/// header lines, without the final empty line) and the body, de-chunked.
#[derive(Debug, Clone)]
pub struct Wire {
    pub head: String,
    pub body: Vec<u8>,
    /// Whether the body came chunked.
    pub chunked: bool,
}

impl Wire {
    /// The request line, e.g. `GET / HTTP/1.1`.
    pub fn request_line(&self) -> &str {
        self.head.lines().next().unwrap_or_default()
    }

    /// Every value of header `name` (case-insensitive), trimmed, in order.
    pub fn header(&self, name: &str) -> Vec<&str> {
        self.head
            .split("\r\n")
            .skip(1)
            .filter_map(|line| line.split_once(':'))
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim())
            .collect()
    }
}

/// A raw HTTP/1.1 backend that records every request it reads, exactly as it arrived, and answers
/// each with `200 ok`. It frames requests itself (Content-Length or chunked), so a test sees what
/// a backend would make of the bytes the proxy sent.
pub struct WireBackend {
    pub addr: SocketAddr,
    /// Whole requests, head and body.
    pub seen: Arc<std::sync::Mutex<Vec<Wire>>>,
    /// The request line of every head read, its body whole or not.
    pub heads: Arc<std::sync::Mutex<Vec<String>>>,
    pub connections: Arc<AtomicUsize>,
    _task: tokio::task::JoinHandle<()>,
}

impl WireBackend {
    /// The whole requests read so far.
    pub fn requests(&self) -> Vec<Wire> {
        self.seen.lock().unwrap().clone()
    }

    /// The request lines of the heads read so far, bodies whole or not.
    pub fn heads(&self) -> Vec<String> {
        self.heads.lock().unwrap().clone()
    }
}

/// Starts a [`WireBackend`] on an ephemeral port.
pub async fn wire_backend() -> WireBackend {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let heads = Arc::new(std::sync::Mutex::new(Vec::new()));
    let connections = Arc::new(AtomicUsize::new(0));
    let (record, lines, count) = (
        Arc::clone(&seen),
        Arc::clone(&heads),
        Arc::clone(&connections),
    );
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            let (record, lines) = (Arc::clone(&record), Arc::clone(&lines));
            tokio::spawn(async move {
                let mut buf = Vec::new();
                // Whether the head at the start of `buf` was noted already.
                let mut noted = false;
                loop {
                    loop {
                        if !noted && buf.windows(4).any(|w| w == b"\r\n\r\n") {
                            let head = String::from_utf8_lossy(&buf);
                            let line = head.lines().next().unwrap_or_default().to_owned();
                            lines.lock().unwrap().push(line);
                            noted = true;
                        }
                        let Some((seen, used)) = parse_request(&buf) else {
                            break;
                        };
                        buf.drain(..used);
                        noted = false;
                        record.lock().unwrap().push(seen);
                        let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                        if s.write_all(ok).await.is_err() {
                            return;
                        }
                    }
                    let mut chunk = [0u8; 4096];
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
            });
        }
    });
    WireBackend {
        addr,
        seen,
        heads,
        connections,
        _task: task,
    }
}

/// One whole request at the start of `buf`, and how many bytes it took; `None` until it has all
/// arrived.
fn parse_request(buf: &[u8]) -> Option<(Wire, usize)> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let mut seen = Wire {
        head,
        body: Vec::new(),
        chunked: false,
    };
    let mut at = end + 4;
    if seen
        .header("transfer-encoding")
        .iter()
        .any(|v| v.eq_ignore_ascii_case("chunked"))
    {
        seen.chunked = true;
        loop {
            let line = buf[at..].windows(2).position(|w| w == b"\r\n")?;
            let size = std::str::from_utf8(&buf[at..at + line]).ok()?;
            let size = usize::from_str_radix(size.split(';').next()?.trim(), 16).ok()?;
            at += line + 2;
            if size == 0 {
                // Trailers, then the empty line.
                loop {
                    let line = buf[at..].windows(2).position(|w| w == b"\r\n")?;
                    at += line + 2;
                    if line == 0 {
                        return Some((seen, at));
                    }
                }
            }
            if buf.len() < at + size + 2 {
                return None;
            }
            seen.body.extend_from_slice(&buf[at..at + size]);
            at += size + 2;
        }
    }
    let length: usize = seen
        .header("content-length")
        .first()
        .map_or(0, |v| v.parse().unwrap());
    if buf.len() < at + length {
        return None;
    }
    seen.body.extend_from_slice(&buf[at..at + length]);
    Some((seen, at + length))
}

/// Writes `request` on a new connection and reads the answer until the server closes the
/// connection; returns the answer and whether it was closed (rather than left open for 2s).
pub async fn raw_exchange_closed(addr: SocketAddr, request: &[u8]) -> (String, bool) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut response = Vec::new();
    let mut chunk = [0u8; 4096];
    let closed = loop {
        match tokio::time::timeout(Duration::from_secs(2), stream.read(&mut chunk)).await {
            Err(_) => break false,
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(n)) => response.extend_from_slice(&chunk[..n]),
        }
    };
    (String::from_utf8_lossy(&response).into_owned(), closed)
}

/// The status code of the first response in `answer` (raw HTTP/1.x text), or 0.
pub fn status_of(answer: &str) -> u16 {
    answer
        .strip_prefix("HTTP/1.1 ")
        .or_else(|| answer.strip_prefix("HTTP/1.0 "))
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .unwrap_or(0)
}
