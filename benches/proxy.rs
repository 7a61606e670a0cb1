//! End to end: requests per second of a hyper client → switchyard → an app server, all in this
//! process on loopback. One request at a time measures latency through the proxy; sixteen at once
//! measure throughput. The client and the app server share the machine with the proxy, so the
//! figures are for comparing versions of switchyard, not against other proxies (see
//! `benches/compare.sh` for that).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use switchyard::config::Config;
use switchyard::demo::AppServer;
use switchyard::server::Server;

/// A running proxy in front of three app servers, with its own runtime.
struct Setup {
    runtime: tokio::runtime::Runtime,
    proxy: SocketAddr,
    client: Client<HttpConnector, Full<Bytes>>,
    _apps: Vec<AppServer>,
    _server: Arc<Server>,
}

fn setup(strategy: &str) -> Setup {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (apps, server) = runtime.block_on(async {
        let mut apps = Vec::new();
        for i in 0..3 {
            let app = AppServer::start("127.0.0.1:0".parse().unwrap(), &format!("app{i}"))
                .await
                .unwrap();
            apps.push(app);
        }
        let backends: Vec<String> = apps
            .iter()
            .map(|a| format!("{{ address = \"{}\" }}", a.addr()))
            .collect();
        let text = format!(
            "[[listeners]]\nlisten = \"127.0.0.1:0\"\n[[routes]]\npool = \"app\"\n\
             [pools.app]\nstrategy = \"{strategy}\"\nbackends = [{}]\n\
             [pools.app.cookie]\nsecret = \"bench-secret-0123456789\"\n",
            backends.join(", ")
        );
        let config = Config::from_str(&text, std::path::Path::new("bench.toml")).unwrap();
        (apps, Server::start(config).await.unwrap())
    });
    let proxy = server.listen_addrs()[0];
    let client = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(64)
        .build_http();
    Setup {
        runtime,
        proxy,
        client,
        _apps: apps,
        _server: server,
    }
}

/// One request through the proxy, read whole. `/status/200` answers without touching the app's
/// session table, so the app does as little as possible.
async fn one(client: &Client<HttpConnector, Full<Bytes>>, uri: &http::Uri) {
    let response = client.get(uri.clone()).await.expect("the proxy answers");
    assert_eq!(response.status(), 200);
    response.into_body().collect().await.expect("body");
}

fn e2e(c: &mut Criterion) {
    let mut group = c.benchmark_group("e2e");
    group.throughput(Throughput::Elements(1));
    group.measurement_time(Duration::from_secs(5));
    for strategy in ["round_robin", "least_connections"] {
        let setup = setup(strategy);
        let uri: http::Uri = format!("http://{}/status/200", setup.proxy)
            .parse()
            .unwrap();
        for concurrency in [1u64, 16] {
            group.bench_with_input(
                BenchmarkId::new(strategy, format!("{concurrency}_at_once")),
                &concurrency,
                |b, &concurrency| {
                    b.iter_custom(|iters| {
                        setup.runtime.block_on(async {
                            let start = Instant::now();
                            let per_worker = iters.div_ceil(concurrency);
                            let workers: Vec<_> = (0..concurrency)
                                .map(|_| {
                                    let client = setup.client.clone();
                                    let uri = uri.clone();
                                    tokio::spawn(async move {
                                        for _ in 0..per_worker {
                                            one(&client, &uri).await;
                                        }
                                    })
                                })
                                .collect();
                            for worker in workers {
                                worker.await.unwrap();
                            }
                            // Scaled to `iters` when the workers' share was rounded up.
                            start
                                .elapsed()
                                .mul_f64(iters as f64 / (per_worker * concurrency) as f64)
                        })
                    })
                },
            );
        }
    }
    group.finish();
}

criterion_group!(benches, e2e);
criterion_main!(benches);
