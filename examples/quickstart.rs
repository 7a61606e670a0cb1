//! Quickstart: three example app servers on 127.0.0.1:9001-9003, switchyard in front of them with
//! the repository's `proxy.toml`, a short burst of requests, then serving until Ctrl-C.
//!
//! ```text
//! cargo run --release --example quickstart
//! curl -i http://127.0.0.1:8080/
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;

use bytes::Bytes;
use http::header::{COOKIE, SET_COOKIE};
use http::{HeaderValue, Request};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use switchyard::config::Config;
use switchyard::demo::AppServer;
use switchyard::server::Server;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let config = Config::load(Path::new("proxy.toml"))?;
    let mut apps = Vec::new();
    for (i, port) in [9001u16, 9002, 9003].into_iter().enumerate() {
        let listen = SocketAddr::from(([127, 0, 0, 1], port));
        apps.push(AppServer::start(listen, &format!("app{}", i + 1)).await?);
    }
    let shutdown_limit = config.timeouts.shutdown;
    let server = Server::start(config).await?;
    let proxy = server.listen_addrs()[0];
    println!("switchyard listening on http://{proxy}/ (apps on :9001, :9002, :9003)\n");

    for (title, path) in [
        ("round_robin (path /), weights 2:1:1", "/"),
        ("cookie affinity (path /sticky)", "/sticky"),
    ] {
        let (served, last) = burst(proxy, path, 12).await?;
        println!("{title}: 12 requests from one client with a cookie jar");
        for (backend, count) in &served {
            println!("  {backend}: {count}");
        }
        println!("  last answer: {last}");
    }
    println!(
        "\nBehind round_robin the app's in-memory visit counter resets as requests hop between \
         instances; behind cookie affinity it climbs.\nTry: curl -i http://{proxy}/   — Ctrl-C to stop."
    );

    tokio::signal::ctrl_c().await?;
    server.shutdown(shutdown_limit).await;
    for app in apps {
        app.shutdown().await;
    }
    Ok(())
}

/// Sends `n` requests to `path` like a browser would (keeping cookies), and counts who served them.
async fn burst(
    proxy: SocketAddr,
    path: &str,
    n: usize,
) -> Result<(BTreeMap<String, usize>, String), Box<dyn std::error::Error>> {
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let mut jar: BTreeMap<String, String> = BTreeMap::new();
    let mut served = BTreeMap::new();
    let mut last = String::new();
    for _ in 0..n {
        let mut request = Request::get(format!("http://{proxy}{path}")).body(Empty::new())?;
        if !jar.is_empty() {
            let cookies: Vec<String> = jar.iter().map(|(k, v)| format!("{k}={v}")).collect();
            request
                .headers_mut()
                .insert(COOKIE, HeaderValue::from_str(&cookies.join("; "))?);
        }
        let response = client.request(request).await?;
        for set in response.headers().get_all(SET_COOKIE) {
            let pair = set.to_str()?.split(';').next().unwrap_or_default();
            if let Some((k, v)) = pair.split_once('=') {
                jar.insert(k.trim().to_owned(), v.trim().to_owned());
            }
        }
        let backend = response
            .headers()
            .get("x-backend")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("?")
            .to_owned();
        *served.entry(backend).or_insert(0) += 1;
        last = String::from_utf8_lossy(&response.into_body().collect().await?.to_bytes())
            .trim()
            .to_owned();
    }
    Ok((served, last))
}
