//! DNS discovery with hickory-resolver: `dns = "NAME:PORT"` (A records, or AAAA when there are
//! none) and `dns_srv = "NAME"` (SRV records, then the addresses of their targets).
//!
//! A lookup runs at once, then again every `interval` — or, when the answer's TTL runs out later
//! than that, when it does: a source is never asked faster than its records allow. Answers are
//! not cached by the resolver (every lookup asks the server), and `/etc/hosts` is not read. A
//! name that does not exist, or has no records of the type asked, is an empty answer; a timeout,
//! a refusal or a server failure is a failed read. For SRV, a failure to resolve any target fails
//! the whole read: a partial answer would drain healthy backends.

use std::net::{IpAddr, SocketAddr};
use std::sync::Weak;
use std::time::{Duration, Instant};

use hickory_resolver::config::{NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::NetError;
use hickory_resolver::proto::rr::{RData, RecordType};
use hickory_resolver::TokioResolver;
use tokio_util::sync::CancellationToken;

use super::{Answer, Found};
use crate::config::{DnsDiscovery, DnsQuery};
use crate::server::Server;

/// How long one query waits for the server, per attempt.
const QUERY_TIMEOUT: Duration = Duration::from_secs(2);
/// Queries sent again after one got no answer (UDP loses packets): a silent server fails a
/// lookup after about `(1 + QUERY_RETRIES) × QUERY_TIMEOUT`.
const QUERY_RETRIES: usize = 1;

/// Looks `config` up until `stop`, handing each answer to the server.
pub(crate) async fn run(
    server: Weak<Server>,
    pool: String,
    epoch: u64,
    config: DnsDiscovery,
    stop: CancellationToken,
) {
    let mut resolver = None;
    loop {
        let started = Instant::now();
        let mut next = started + config.interval;
        let answer = match built(&mut resolver, &config) {
            // No resolv.conf, say: a failing source, tried again next time.
            Err(error) => Answer::Failed(format!("cannot set up the resolver: {error}")),
            Ok(resolver) => {
                let looked_up = tokio::select! {
                    () = stop.cancelled() => return,
                    looked_up = lookup(resolver, &config.query) => looked_up,
                };
                match looked_up {
                    Ok((found, valid_until)) => {
                        // Never ask again before the records expire.
                        next = next.max(valid_until);
                        Answer::Members(found)
                    }
                    Err(error) => Answer::Failed(error),
                }
            }
        };
        let Some(server) = server.upgrade() else {
            return;
        };
        server.discovered(&pool, epoch, answer).await;
        drop(server);
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep_until(next.into()) => {}
        }
    }
}

/// The resolver in `slot`, built on first use.
fn built<'a>(
    slot: &'a mut Option<TokioResolver>,
    config: &DnsDiscovery,
) -> Result<&'a TokioResolver, NetError> {
    if slot.is_none() {
        *slot = Some(resolver(config)?);
    }
    Ok(slot.as_ref().expect("just built"))
}

/// A resolver asking `config.resolver`, or the servers of `/etc/resolv.conf`, with no cache.
fn resolver(config: &DnsDiscovery) -> Result<TokioResolver, NetError> {
    let mut builder = match config.resolver {
        Some(address) => {
            let mut server = NameServerConfig::udp_and_tcp(address.ip());
            for connection in &mut server.connections {
                connection.port = address.port();
            }
            TokioResolver::builder_with_config(
                ResolverConfig::from_name_servers(vec![server]),
                TokioRuntimeProvider::default(),
            )
        }
        None => TokioResolver::builder_tokio()?,
    };
    let options: &mut ResolverOpts = builder.options_mut();
    // Each lookup must reach the server: the loop, not a cache, decides when to ask again.
    options.cache_size = 0;
    options.use_hosts_file = ResolveHosts::Never;
    options.timeout = QUERY_TIMEOUT;
    options.attempts = QUERY_RETRIES;
    builder.build()
}

/// One lookup: the backends found, and when the answer's records expire.
async fn lookup(
    resolver: &TokioResolver,
    query: &DnsQuery,
) -> Result<(Vec<Found>, Instant), String> {
    match query {
        DnsQuery::Address { name, port, weight } => {
            let (addresses, valid_until) = addresses(resolver, name).await?;
            let found = addresses
                .into_iter()
                .map(|ip| Found {
                    address: SocketAddr::new(ip, *port),
                    weight: *weight,
                })
                .collect();
            Ok((found, valid_until))
        }
        DnsQuery::Srv { name } => srv(resolver, name).await,
    }
}

/// The addresses of `name` (A, or AAAA when there are no A records), and when they expire. No
/// records at all is an empty answer, not an error; a failed A query fails the lookup (it is
/// not a reason to ask for AAAA).
async fn addresses(resolver: &TokioResolver, name: &str) -> Result<(Vec<IpAddr>, Instant), String> {
    for record_type in [RecordType::A, RecordType::AAAA] {
        let lookup = match resolver.lookup(name, record_type).await {
            Ok(lookup) => lookup,
            Err(error) if error.is_no_records_found() => continue,
            Err(error) => return Err(format!("{name} ({record_type}): {error}")),
        };
        // CNAMEs on the way are in the answer too.
        let ips: Vec<IpAddr> = lookup
            .answers()
            .iter()
            .filter_map(|record| match &record.data {
                RData::A(a) => Some(IpAddr::V4(a.0)),
                RData::AAAA(aaaa) => Some(IpAddr::V6(aaaa.0)),
                _ => None,
            })
            .collect();
        if !ips.is_empty() {
            return Ok((ips, lookup.valid_until()));
        }
    }
    Ok((Vec::new(), Instant::now()))
}

/// The SRV records of `name` with the lowest priority (the others are backups, which switchyard
/// does not keep apart), each target at each of its addresses.
async fn srv(resolver: &TokioResolver, name: &str) -> Result<(Vec<Found>, Instant), String> {
    let lookup = match resolver.srv_lookup(name).await {
        Ok(lookup) => lookup,
        Err(error) if error.is_no_records_found() => return Ok((Vec::new(), Instant::now())),
        Err(error) => return Err(format!("{name}: {error}")),
    };
    let mut valid_until = lookup.valid_until();
    let records: Vec<_> = lookup
        .answers()
        .iter()
        .filter_map(|record| match &record.data {
            RData::SRV(srv) => Some(srv.clone()),
            _ => None,
        })
        // A target of "." says the service is not offered there.
        .filter(|srv| !srv.target.is_root())
        .collect();
    let Some(lowest) = records.iter().map(|srv| srv.priority).min() else {
        return Ok((Vec::new(), valid_until));
    };
    let mut found = Vec::new();
    for srv in records.iter().filter(|srv| srv.priority == lowest) {
        let target = srv.target.to_ascii();
        let (ips, expires) = addresses(resolver, &target).await?;
        if ips.is_empty() {
            tracing::debug!(srv = name, %target, "SRV target has no address");
        } else {
            valid_until = valid_until.min(expires);
        }
        // A weight of 0 ("rarely") becomes 1 with the others in `normalise`.
        let weight = u32::from(srv.weight);
        found.extend(ips.into_iter().map(|ip| Found {
            address: SocketAddr::new(ip, srv.port),
            weight,
        }));
    }
    Ok((found, valid_until))
}
