//! Shared by the integration tests: real app servers and the real proxy on 127.0.0.1 with ephemeral
//! ports, and a small HTTP client.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use switchyard::config::Config;
use switchyard::demo::AppServer;
use switchyard::server::Server;

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

/// A `backends = [...]` list for the given addresses and weights.
pub fn backends(addrs: &[(SocketAddr, u32)]) -> String {
    let items: Vec<String> = addrs
        .iter()
        .map(|(a, w)| format!("{{ address = \"{a}\", weight = {w} }}"))
        .collect();
    format!("[{}]", items.join(", "))
}

/// A one-pool config on an ephemeral listener; `pool_extra` goes into `[pools.app]`, `tail` after.
pub fn one_pool(strategy: &str, addrs: &[(SocketAddr, u32)], tail: &str) -> String {
    format!(
        r#"
[[listeners]]
listen = "127.0.0.1:0"

[[routes]]
pool = "app"

[pools.app]
strategy = "{strategy}"
backends = {backends}

[pools.app.cookie]
name = "sy"
secret = ["test-secret-0123456789"]

{tail}
"#,
        backends = backends(addrs)
    )
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
        request
            .headers_mut()
            .append(*k, HeaderValue::from_str(v).unwrap());
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
        let stderr_path = config_path.with_extension("stderr");
        let stderr = std::fs::File::create(&stderr_path).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .arg("--config")
            .arg(config_path)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("switchyard binary starts");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let log = std::fs::read_to_string(&stderr_path).unwrap_or_default();
            if let Some(addr) = log
                .lines()
                .find_map(|l| l.split("listen=").nth(1))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|a| a.trim_matches(|c| c == '"').parse().ok())
            {
                return ProxyProcess {
                    child,
                    addr,
                    stderr_path,
                };
            }
            assert!(std::time::Instant::now() < deadline, "no listening line in:\n{log}");
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
