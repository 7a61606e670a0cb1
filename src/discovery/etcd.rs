//! etcd discovery (the `etcd` cargo feature): every key under the pool's `prefix` is one backend,
//! its value JSON such as `{"address": "10.0.0.5:8080", "weight": 2}` (`weight` optional, 1 to
//! 1000; other fields are ignored, so a registrator may add its own).
//!
//! The prefix is read whole, then followed with a watch from the revision after that read, so no
//! change between the two is missed. Each watch response (a transaction's events arrive together)
//! is one new membership. When the connection or the watch fails — etcd down, a partition caught
//! by HTTP/2 keep-alive, a compacted revision — the failure is reported and the source is tried
//! again after a back-off of 1 s doubling to 10 s, starting over with a full read.
//!
//! A value that is not valid JSON of that shape, or names an address that is not `IP:port`, is
//! logged and skipped: that key contributes no backend, the others are not affected. An address
//! under two keys is one backend, with the weight of the first key in key order.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Weak;
use std::time::Duration;

use etcd_client::{Client, ConnectOptions, EventType, GetOptions, KeyValue, WatchOptions};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use super::{Answer, Found, MAX_WEIGHT};
use crate::config::EtcdDiscovery;
use crate::server::Server;

/// First wait after a failure; it doubles up to [`MAX_BACKOFF`] while failures continue.
const MIN_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// Connecting, the full read and starting the watch must each finish within this.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// HTTP/2 pings on the connection, so a silent partition ends the watch. etcd refuses pings
/// more often than every 5 s by default (`--grpc-keepalive-min-time`).
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(5);

/// A key's value.
#[derive(Debug, Deserialize)]
struct Value {
    address: String,
    weight: Option<i64>,
}

/// Follows `config` until `stop`, handing each membership (and each failure) to the server.
pub(crate) async fn run(
    server: Weak<Server>,
    pool: String,
    epoch: u64,
    config: EtcdDiscovery,
    stop: CancellationToken,
) {
    let mut backoff = MIN_BACKOFF;
    loop {
        let followed = tokio::select! {
            () = stop.cancelled() => return,
            followed = follow(&server, &pool, epoch, &config, &mut backoff) => followed,
        };
        let error = match followed {
            Ok(()) => return,
            Err(error) => error,
        };
        let Some(strong) = server.upgrade() else {
            return;
        };
        strong.discovered(&pool, epoch, Answer::Failed(error)).await;
        drop(strong);
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Reads the prefix, reports it, then reports every change until the watch fails (`Err`, why)
/// or the server is gone (`Ok`). A successful read resets `backoff`.
async fn follow(
    server: &Weak<Server>,
    pool: &str,
    epoch: u64,
    config: &EtcdDiscovery,
    backoff: &mut Duration,
) -> Result<(), String> {
    let options = ConnectOptions::new()
        .with_connect_timeout(REQUEST_TIMEOUT)
        .with_keep_alive(KEEP_ALIVE_INTERVAL, KEEP_ALIVE_TIMEOUT)
        .with_keep_alive_while_idle(true);
    let mut client = within("connect", Client::connect(&config.endpoints, Some(options))).await?;
    let prefix = config.prefix.as_str();
    let read = within(
        "read",
        client.get(prefix, Some(GetOptions::new().with_prefix())),
    )
    .await?;
    let revision = read
        .header()
        .map(|header| header.revision())
        .ok_or_else(|| "read: the answer has no header".to_owned())?;
    let mut keys: BTreeMap<Vec<u8>, Found> = BTreeMap::new();
    for kv in read.kvs() {
        if let Some(found) = parse(pool, kv) {
            keys.insert(kv.key().to_vec(), found);
        }
    }
    if !report(server, pool, epoch, &keys).await {
        return Ok(());
    }
    *backoff = MIN_BACKOFF;

    let watch = WatchOptions::new()
        .with_prefix()
        .with_start_revision(revision + 1);
    let mut stream = within("watch", client.watch(prefix, Some(watch))).await?;
    loop {
        let response = stream
            .message()
            .await
            .map_err(|error| format!("watch: {error}"))?
            .ok_or_else(|| "watch: the stream ended".to_owned())?;
        if response.canceled() {
            // Compacted past our revision, most often: the next attempt reads everything again.
            return Err(format!(
                "watch cancelled by etcd (compact revision {}): {}",
                response.compact_revision(),
                response.cancel_reason()
            ));
        }
        if response.events().is_empty() {
            continue;
        }
        for event in response.events() {
            let Some(kv) = event.kv() else { continue };
            match event.event_type() {
                EventType::Put => match parse(pool, kv) {
                    Some(found) => {
                        keys.insert(kv.key().to_vec(), found);
                    }
                    None => {
                        keys.remove(kv.key());
                    }
                },
                EventType::Delete => {
                    keys.remove(kv.key());
                }
            }
        }
        if !report(server, pool, epoch, &keys).await {
            return Ok(());
        }
    }
}

/// Hands the membership in `keys` to the server; false when the server is gone.
async fn report(
    server: &Weak<Server>,
    pool: &str,
    epoch: u64,
    keys: &BTreeMap<Vec<u8>, Found>,
) -> bool {
    let Some(server) = server.upgrade() else {
        return false;
    };
    // Key order, so that of two keys naming one address, the first one's weight is kept.
    let mut found: Vec<Found> = Vec::with_capacity(keys.len());
    for f in keys.values() {
        if !found.iter().any(|seen| seen.address == f.address) {
            found.push(*f);
        }
    }
    server.discovered(pool, epoch, Answer::Members(found)).await;
    true
}

/// `what` within [`REQUEST_TIMEOUT`], its error described.
async fn within<T>(
    what: &str,
    request: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, String> {
    match tokio::time::timeout(REQUEST_TIMEOUT, request).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(format!("{what}: {error}")),
        Err(_) => Err(format!(
            "{what}: no answer within {}",
            humantime::format_duration(REQUEST_TIMEOUT)
        )),
    }
}

/// The backend a key's value names, or `None` (logged) when the value is not one.
fn parse(pool: &str, kv: &KeyValue) -> Option<Found> {
    let key = String::from_utf8_lossy(kv.key());
    match parse_value(kv.value()) {
        Ok(found) => Some(found),
        Err(problem) => {
            tracing::warn!(
                pool,
                %key,
                value = %String::from_utf8_lossy(kv.value()),
                %problem,
                "etcd key skipped: its value is not a backend"
            );
            None
        }
    }
}

fn parse_value(value: &[u8]) -> Result<Found, String> {
    let value: Value = serde_json::from_slice(value).map_err(|error| {
        format!("expected JSON such as {{\"address\": \"10.0.0.5:8080\", \"weight\": 2}}: {error}")
    })?;
    let address: SocketAddr = value
        .address
        .parse()
        .map_err(|_| format!("address `{}` is not IP:port", value.address))?;
    let weight = value.weight.unwrap_or(1);
    let weight = u32::try_from(weight)
        .ok()
        .filter(|w| (1..=MAX_WEIGHT).contains(w))
        .ok_or_else(|| format!("weight {weight} is out of range: expected 1 to {MAX_WEIGHT}"))?;
    Ok(Found { address, weight })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_backends_or_reasons() {
        let found = parse_value(br#"{"address": "10.0.0.5:8080", "weight": 2, "zone": "a"}"#);
        assert_eq!(
            found,
            Ok(Found {
                address: "10.0.0.5:8080".parse().unwrap(),
                weight: 2
            })
        );
        let found = parse_value(br#"{"address": "[::1]:80"}"#).unwrap();
        assert_eq!(found.weight, 1);
        for (value, why) in [
            (&b"10.0.0.5:8080"[..], "expected JSON"),
            (br#"{"weight": 2}"#, "missing field `address`"),
            (br#"{"address": "app:80"}"#, "not IP:port"),
            (
                br#"{"address": "10.0.0.5:80", "weight": 0}"#,
                "out of range",
            ),
            (
                br#"{"address": "10.0.0.5:80", "weight": 1001}"#,
                "out of range",
            ),
        ] {
            let error = parse_value(value).unwrap_err();
            assert!(error.contains(why), "{error}");
        }
    }
}
