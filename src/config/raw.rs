//! The first stage of reading `proxy.toml`: serde structs that mirror the file key for key.
//!
//! Every table denies unknown keys, so a typo is an error instead of a silently ignored setting.
//! Anything [`validate`](super::validate) may reject is kept as a [`Spanned`] string or number,
//! so its error can point at a line and column; parsing into addresses, durations and enums is
//! left to validation, which reports every problem at once instead of stopping at the first.
//!
//! Keys the format requires (`listen`, `pool`, `strategy`, `backends`, `address`) are still
//! `Option` here for the same reason: a missing one becomes one error among all the others.
//!
//! Tables themselves are never wrapped in [`Spanned`]: toml gives no span for a table that is only
//! implied (`[pools.app.cookie]` without `[pools.app]`, or a dotted key such as `cookie.name`), and
//! a spanned table would then fail to deserialise. Array elements always have a span, so they are
//! wrapped.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::Deserialize;
use toml::Spanned;

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// `log_format`: `text` or `json`. A top-level key, so it must come before the first table.
    pub log_format: Option<Spanned<String>>,
    /// `[admin]`.
    pub admin: Option<RawAdmin>,
    /// `[[listeners]]`; `None` when absent, so an absent key and an empty list can be told apart.
    pub listeners: Option<Spanned<Vec<Spanned<RawListener>>>>,
    /// `[[routes]]`, in file order.
    #[serde(default)]
    pub routes: Vec<Spanned<RawRoute>>,
    /// `[pools.NAME]`; the key keeps its span because a pool table itself has none.
    #[serde(default)]
    pub pools: BTreeMap<Spanned<String>, RawPool>,
    /// `[timeouts]`.
    pub timeouts: Option<RawTimeouts>,
    /// `[runtime]`.
    pub runtime: Option<RawRuntime>,
    /// `[limits]`.
    pub limits: Option<RawLimits>,
}

/// `[runtime]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRuntime {
    /// `workers`: threads serving connections.
    pub workers: Option<Spanned<i64>>,
}

/// `[admin]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    /// `listen`: `IP:port`.
    pub listen: Option<Spanned<String>>,
    /// `token`: the Bearer token every admin request must carry.
    pub token: Option<Spanned<String>>,
    /// `token_env`: the environment variable holding the token, instead of `token`.
    pub token_env: Option<Spanned<String>>,
}

/// One `[[listeners]]` entry.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawListener {
    /// `listen`: `IP:port`.
    pub listen: Option<Spanned<String>>,
    /// `tls = { cert, key }`: one certificate for every connection.
    pub tls: Option<RawTls>,
    /// `certificates = [{ cert, key, server_names }]`: several, chosen by SNI.
    pub certificates: Option<Spanned<Vec<Spanned<RawCertificate>>>>,
    /// `redirect_https`: answer every request with a redirect to https.
    pub redirect_https: Option<Spanned<bool>>,
}

/// A listener's `tls` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    /// `cert`: path of the PEM certificate chain.
    pub cert: Option<Spanned<String>>,
    /// `key`: path of the PEM private key.
    pub key: Option<Spanned<String>>,
}

/// One entry of a listener's `certificates`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCertificate {
    /// `cert`: path of the PEM certificate chain.
    pub cert: Option<Spanned<String>>,
    /// `key`: path of the PEM private key.
    pub key: Option<Spanned<String>>,
    /// `server_names`: the SNI names it serves.
    pub server_names: Option<Vec<Spanned<String>>>,
}

/// One `[[routes]]` entry.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    /// `host`: exact Host header match, without a port.
    pub host: Option<Spanned<String>>,
    /// `path_prefix`: must start with `/`.
    pub path_prefix: Option<Spanned<String>>,
    /// `pool`: the name of a `[pools.NAME]` table.
    pub pool: Option<Spanned<String>>,
}

/// One `[pools.NAME]` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPool {
    /// `strategy`: `round_robin`, `least_connections`, `ip_hash` or `cookie`.
    pub strategy: Option<Spanned<String>>,
    /// `backends`: at least one, unless the pool has `[pools.NAME.discovery]` instead.
    pub backends: Option<Spanned<Vec<Spanned<RawBackend>>>>,
    /// `[pools.NAME.discovery]`: backends found in DNS or etcd instead of a static `backends`.
    pub discovery: Option<RawDiscovery>,
    /// `trusted_proxies`: CIDRs or bare IPs.
    pub trusted_proxies: Option<Vec<Spanned<String>>>,
    /// `drain_timeout`: a humantime duration.
    pub drain_timeout: Option<Spanned<String>>,
    /// `drain_sticky`: `keep` or `move`.
    pub drain_sticky: Option<Spanned<String>>,
    /// `[pools.NAME.cookie]`.
    pub cookie: Option<RawCookie>,
    /// `retries`: signed, so a negative count is reported by validation.
    pub retries: Option<Spanned<i64>>,
    /// `slow_start`: a humantime duration.
    pub slow_start: Option<Spanned<String>>,
    /// `max_connections`: the default for backends that set none.
    pub max_connections: Option<Spanned<i64>>,
    /// `balance_factor`: a number of at least 1.
    pub balance_factor: Option<Spanned<f64>>,
    /// `[pools.NAME.health]`.
    pub health: Option<RawHealth>,
    /// `[pools.NAME.passive]`.
    pub passive: Option<RawPassive>,
    /// `ca`: path of the PEM CA certificates for `https://` backends.
    pub ca: Option<Spanned<String>>,
}

/// `[pools.NAME.discovery]`: exactly one source (`dns`, `dns_srv` or `etcd`) and its settings.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDiscovery {
    /// `dns`: `NAME:PORT`, resolved to A (or AAAA) records.
    pub dns: Option<Spanned<String>>,
    /// `dns_srv`: the SRV name, e.g. `_http._tcp.app.internal`.
    pub dns_srv: Option<Spanned<String>>,
    /// `etcd = { endpoints, prefix }`.
    pub etcd: Option<RawEtcd>,
    /// `resolver`: `IP` or `IP:port` of the DNS server to ask instead of the system's.
    pub resolver: Option<Spanned<String>>,
    /// `interval`: a humantime duration between DNS lookups.
    pub interval: Option<Spanned<String>>,
    /// `weight`: the weight of every backend `dns` finds.
    pub weight: Option<Spanned<i64>>,
    /// `allow_empty`: honour an empty answer from a healthy source.
    pub allow_empty: Option<Spanned<bool>>,
}

/// `etcd = { endpoints = [...], prefix = "..." }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEtcd {
    /// `endpoints`: `http://HOST:PORT` URLs of etcd members.
    pub endpoints: Option<Spanned<Vec<Spanned<String>>>>,
    /// `prefix`: every key under it is one backend.
    pub prefix: Option<Spanned<String>>,
}

/// `[pools.NAME.health]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHealth {
    /// `path`: must start with `/`.
    pub path: Option<Spanned<String>>,
    /// `host`: the check's `Host` header.
    pub host: Option<Spanned<String>>,
    /// `interval`: a humantime duration.
    pub interval: Option<Spanned<String>>,
    /// `timeout`: a humantime duration.
    pub timeout: Option<Spanned<String>>,
    /// `unhealthy_threshold`.
    pub unhealthy_threshold: Option<Spanned<i64>>,
    /// `healthy_threshold`.
    pub healthy_threshold: Option<Spanned<i64>>,
    /// `expected_status`: e.g. `"200-399"` or `"200,204,300-308"`.
    pub expected_status: Option<Spanned<String>>,
}

/// `[pools.NAME.passive]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPassive {
    /// `enabled`.
    pub enabled: Option<bool>,
    /// `consecutive_failures`.
    pub consecutive_failures: Option<Spanned<i64>>,
    /// `ejection_time`: a humantime duration.
    pub ejection_time: Option<Spanned<String>>,
    /// `max_ejection_time`: a humantime duration.
    pub max_ejection_time: Option<Spanned<String>>,
    /// `max_ejected_percent`: 0 to 100.
    pub max_ejected_percent: Option<Spanned<i64>>,
}

/// One entry of a pool's `backends`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBackend {
    /// `address`: `IP:port`, or `https://HOST:port`.
    pub address: Option<Spanned<String>>,
    /// `weight`: signed, so that a negative weight is reported by validation with the others.
    pub weight: Option<Spanned<i64>>,
    /// `max_connections`.
    pub max_connections: Option<Spanned<i64>>,
}

/// `[pools.NAME.cookie]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCookie {
    /// `name`: the cookie's name.
    pub name: Option<Spanned<String>>,
    /// `secret`: one string or a list of strings.
    pub secret: Option<Spanned<RawSecret>>,
    /// `secret_env`: the environment variable holding comma-separated secrets.
    pub secret_env: Option<Spanned<String>>,
    /// `fallback`: the strategy for clients without a valid cookie.
    pub fallback: Option<Spanned<String>>,
    /// `max_age`: a humantime duration.
    pub max_age: Option<Spanned<String>>,
    /// `secure`.
    pub secure: Option<bool>,
}

/// `secret`: one string, or a list whose first entry signs and whose every entry verifies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RawSecret {
    /// `secret = "…"`; its span is the one around the whole [`RawSecret`].
    One(String),
    /// `secret = ["…", "…"]`, each with its own span.
    Many(Vec<Spanned<String>>),
}

// Hand-written because `#[serde(untagged)]` buffers the value, which loses the spans of the list's
// entries and replaces toml's type error with "did not match any variant".
impl<'de> Deserialize<'de> for RawSecret {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SecretVisitor;

        impl<'de> Visitor<'de> for SecretVisitor {
            type Value = RawSecret;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or a list of strings")
            }

            fn visit_str<E: de::Error>(self, value: &str) -> Result<RawSecret, E> {
                Ok(RawSecret::One(value.to_owned()))
            }

            fn visit_string<E: de::Error>(self, value: String) -> Result<RawSecret, E> {
                Ok(RawSecret::One(value))
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<RawSecret, A::Error> {
                let mut secrets = Vec::new();
                while let Some(secret) = seq.next_element::<Spanned<String>>()? {
                    secrets.push(secret);
                }
                Ok(RawSecret::Many(secrets))
            }
        }

        deserializer.deserialize_any(SecretVisitor)
    }
}

/// `[timeouts]`: each a humantime duration.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTimeouts {
    /// `connect`.
    pub connect: Option<Spanned<String>>,
    /// `response_header`.
    pub response_header: Option<Spanned<String>>,
    /// `client_header`.
    pub client_header: Option<Spanned<String>>,
    /// `idle`.
    pub idle: Option<Spanned<String>>,
    /// `shutdown`.
    pub shutdown: Option<Spanned<String>>,
    /// `upgraded_idle`.
    pub upgraded_idle: Option<Spanned<String>>,
}

/// `[limits]`: each a count, signed so that a negative one is reported by validation.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    /// `max_header_bytes`.
    pub max_header_bytes: Option<Spanned<i64>>,
    /// `max_headers`.
    pub max_headers: Option<Spanned<i64>>,
    /// `max_body_bytes`.
    pub max_body_bytes: Option<Spanned<i64>>,
    /// `max_connections`: per listener.
    pub max_connections: Option<Spanned<i64>>,
}
