//! How fast each strategy chooses, and how long building its selection state takes.
//! Inputs (members, requests, cookies) are built outside the measured loops.

use std::net::{IpAddr, SocketAddr};

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion};
use http::header::COOKIE;
use http::{HeaderMap, HeaderValue};
use switchyard::backend::BackendState;
use switchyard::balance::{
    self, Candidates, CookieAffinity, IpHash, Member, RequestFacts, RoundRobin,
};
use switchyard::config::{
    BackendSpec, CookieConfig, DrainSticky, PassiveConfig, PoolConfig, StrategyKind,
};

const SIZES: [usize; 4] = [3, 10, 100, 1000];

fn members(n: usize) -> Vec<Member> {
    (0..n)
        .map(|i| {
            let address: SocketAddr =
                format!("10.{}.{}.{}:8080", i / 65536, (i / 256) % 256, i % 256)
                    .parse()
                    .unwrap();
            Member {
                spec: BackendSpec {
                    address,
                    weight: 1 + (i % 3) as u32,
                    max_connections: None,
                    tls: None,
                },
                state: BackendState::new(address),
            }
        })
        .collect()
}

fn pool(kind: StrategyKind, members: &[Member]) -> PoolConfig {
    PoolConfig {
        name: "bench".into(),
        strategy: kind,
        backends: members.iter().map(|m| m.spec.clone()).collect(),
        cookie: Some(CookieConfig {
            name: "sy".into(),
            secrets: vec![b"bench-secret-0123456789".to_vec()],
            fallback: StrategyKind::RoundRobin,
            max_age: None,
            secure: false,
        }),
        trusted_proxies: vec![],
        drain_timeout: std::time::Duration::from_secs(30),
        drain_sticky: DrainSticky::Keep,
        retries: 1,
        slow_start: None,
        health: None,
        passive: PassiveConfig::default(),
        ca: None,
    }
}

fn choose(c: &mut Criterion) {
    let mut group = c.benchmark_group("choose");
    for kind in [
        StrategyKind::RoundRobin,
        StrategyKind::LeastConnections,
        StrategyKind::IpHash,
        StrategyKind::Cookie,
    ] {
        for n in SIZES {
            let members = members(n);
            let config = pool(kind, &members);
            let strategy = balance::build(&config, &members, n);
            let mut headers = HeaderMap::new();
            if kind == StrategyKind::Cookie {
                // A returning client with a valid cookie: the common case.
                let specs: Vec<&BackendSpec> = members.iter().map(|m| &m.spec).collect();
                let affinity = CookieAffinity::new(
                    config.cookie.as_ref().unwrap(),
                    &members,
                    Box::new(RoundRobin::new(&specs)),
                    true,
                );
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_secs();
                let token = affinity.token_for(n / 2, now);
                headers.insert(
                    COOKIE,
                    HeaderValue::from_str(&format!("sy={token}")).unwrap(),
                );
            }
            let ips: Vec<IpAddr> = (0..1024u32)
                .map(|i| IpAddr::from((0x0a00_0000 + i * 7919).to_be_bytes()))
                .collect();
            let candidates = Candidates::new(&members, n, &[]);
            let mut i = 0usize;
            group.bench_with_input(BenchmarkId::new(kind.as_str(), n), &n, |b, _| {
                b.iter(|| {
                    i = (i + 1) & 1023;
                    let facts = RequestFacts {
                        client_ip: ips[i],
                        headers: &headers,
                    };
                    black_box(strategy.choose(&facts, &candidates))
                })
            });
        }
    }
    group.finish();
}

fn build(c: &mut Criterion) {
    let mut group = c.benchmark_group("build");
    for n in [10, 100, 1000] {
        let members = members(n);
        let specs: Vec<&BackendSpec> = members.iter().map(|m| &m.spec).collect();
        group.bench_with_input(BenchmarkId::new("ip_hash_maglev", n), &n, |b, _| {
            b.iter(|| black_box(IpHash::new(&specs)))
        });
        group.bench_with_input(BenchmarkId::new("round_robin_cycle", n), &n, |b, _| {
            b.iter(|| black_box(RoundRobin::new(&specs)))
        });
    }
    group.finish();
}

criterion_group!(benches, choose, build);
criterion_main!(benches);
