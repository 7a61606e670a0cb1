//! How fast each strategy chooses (one thread, and two threads choosing at once on one pool), and
//! how long building its selection state takes. Inputs (members, requests, cookies) are built
//! outside the measured loops.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion};
use http::HeaderValue;
use switchyard::backend::BackendState;
use switchyard::balance::{
    self, Candidates, CookieAffinity, IpHash, Member, RequestFacts, RoundRobin,
};
use switchyard::config::{
    BackendSpec, CookieConfig, DrainSticky, PassiveConfig, PoolConfig, Secret, StrategyKind,
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
        discovery: None,
        cookie: Some(CookieConfig {
            name: "sy".into(),
            secrets: vec![Secret::new(*b"bench-secret-0123456789")],
            generated: false,
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
        balance_factor: None,
        ca: None,
    }
}

/// One pool's strategy and the inputs of a returning client's requests.
struct Case {
    members: Vec<Member>,
    strategy: Box<dyn balance::Strategy>,
    /// One returning client per thread: two clients' cookies, as two users would send.
    cookies: [Vec<HeaderValue>; 2],
    ips: Vec<IpAddr>,
}

impl Case {
    fn new(kind: StrategyKind, n: usize) -> Case {
        let members = members(n);
        let config = pool(kind, &members);
        let strategy = balance::build(&config, &members, n);
        let mut cookies = [Vec::new(), Vec::new()];
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
            for (client, cookies) in cookies.iter_mut().enumerate() {
                let token = affinity.token_for(n / 2 + client, now);
                cookies.push(HeaderValue::from_str(&format!("sy={token}")).unwrap());
            }
        }
        let ips = (0..1024u32)
            .map(|i| IpAddr::from((0x0a00_0000 + i * 7919).to_be_bytes()))
            .collect();
        Case {
            members,
            strategy,
            cookies,
            ips,
        }
    }

    /// Runs `iters` decisions as client `client` (0 or 1), the `i`-th with the `i`-th client IP.
    fn run(&self, iters: u64, client: usize) {
        let candidates = Candidates::new(&self.members, self.members.len(), &[]);
        for i in 0..iters {
            let facts = RequestFacts {
                client_ip: self.ips[(i & 1023) as usize],
                cookies: &self.cookies[client],
            };
            black_box(self.strategy.choose(&facts, &candidates));
        }
    }
}

const KINDS: [StrategyKind; 4] = [
    StrategyKind::RoundRobin,
    StrategyKind::LeastConnections,
    StrategyKind::IpHash,
    StrategyKind::Cookie,
];

fn choose(c: &mut Criterion) {
    let mut group = c.benchmark_group("choose");
    for kind in KINDS {
        for n in SIZES {
            let case = Case::new(kind, n);
            group.bench_with_input(BenchmarkId::new(kind.as_str(), n), &n, |b, _| {
                b.iter_custom(|iters| {
                    let start = Instant::now();
                    case.run(iters, 0);
                    start.elapsed()
                })
            });
        }
    }
    group.finish();
}

/// Two threads choosing on the same pool at once: the time is per decision per thread, so a
/// figure equal to the one-thread figure means no contention at all.
fn choose_two_threads(c: &mut Criterion) {
    let mut group = c.benchmark_group("choose_2_threads");
    for kind in KINDS {
        for n in SIZES {
            let case = Case::new(kind, n);
            group.bench_with_input(BenchmarkId::new(kind.as_str(), n), &n, |b, _| {
                b.iter_custom(|iters| {
                    let barrier = std::sync::Barrier::new(2);
                    let elapsed: Vec<Duration> = std::thread::scope(|scope| {
                        let runs: Vec<_> = (0..2)
                            .map(|client| {
                                let (case, barrier) = (&case, &barrier);
                                scope.spawn(move || {
                                    barrier.wait();
                                    let start = Instant::now();
                                    case.run(iters, client);
                                    start.elapsed()
                                })
                            })
                            .collect();
                        runs.into_iter().map(|r| r.join().unwrap()).collect()
                    });
                    elapsed.into_iter().max().unwrap()
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
        let config = pool(StrategyKind::Cookie, &members);
        group.bench_with_input(BenchmarkId::new("cookie_ids", n), &n, |b, _| {
            b.iter(|| black_box(balance::build(&config, &members, n)))
        });
    }
    group.finish();
}

criterion_group!(benches, choose, choose_two_threads, build);
criterion_main!(benches);
