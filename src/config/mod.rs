//! Configuration: `proxy.toml` is read in two stages. [`raw`] holds strict serde structs that mirror
//! the file (unknown keys are errors); [`validate`] checks them all at once and produces the [`Config`]
//! below, in which every value is already parsed (addresses, durations, CIDRs, secrets) and every
//! cross-reference (route → pool) is known to resolve.

pub mod raw;
pub mod validate;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use rustls_pki_types::ServerName;

use crate::tls::LoadedKey;

pub use validate::{ConfigError, ConfigErrors};

/// A validated configuration: everything a snapshot is built from.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The file it was read from, for messages.
    pub path: PathBuf,
    /// The admin listener, when `[admin]` is present.
    pub admin: Option<AdminConfig>,
    /// Client-facing listeners, in file order; addresses are unique.
    pub listeners: Vec<ListenerConfig>,
    /// Routes in file order; the first match wins.
    pub routes: Vec<RouteConfig>,
    /// Pools by name.
    pub pools: BTreeMap<String, PoolConfig>,
    /// Timeouts shared by every listener and pool.
    pub timeouts: Timeouts,
    /// `[limits]`: what one client may send, and how many clients a listener serves at once.
    pub limits: Limits,
    /// `log_format` (default `text`): how access-log lines are written.
    pub log_format: LogFormat,
    /// `[runtime]`: read at start only.
    pub runtime: RuntimeConfig,
}

/// The highest `weight` a backend may have, listed or discovered.
pub const MAX_WEIGHT: u32 = 1000;

/// `[runtime]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RuntimeConfig {
    /// `workers` (default: the number of CPUs): threads serving connections, like nginx's
    /// `worker_processes` and HAProxy's `nbthread`. One worker runs everything on one thread with
    /// no work stealing.
    pub workers: Option<usize>,
}

impl RuntimeConfig {
    /// The worker count in force: `workers`, or the CPUs this process may use.
    pub fn worker_threads(&self) -> usize {
        self.workers.unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
        })
    }
}

/// `[admin]`.
#[derive(Debug, Clone, PartialEq)]
pub struct AdminConfig {
    /// `admin.listen`.
    pub listen: SocketAddr,
    /// `admin.token`, or the value of `admin.token_env`: when set, admin requests must carry it as
    /// `Authorization: Bearer …`. At least 16 bytes of printable ASCII without spaces.
    pub token: Option<Secret>,
}

/// A secret from the config: a cookie signing key or the admin token. Its bytes are reached only
/// through [`Secret::expose`], and its `Debug` prints `[redacted]`, so neither a log line nor an
/// error built from a config (`?config`) can carry it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Vec<u8>);

impl Secret {
    /// Wraps the secret's bytes.
    pub fn new(bytes: impl Into<Vec<u8>>) -> Self {
        Secret(bytes.into())
    }

    /// The secret's bytes, for signing or comparing; never for printing.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

/// `log_format`: how access-log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// `text`: `tracing`'s human-readable lines.
    #[default]
    Text,
    /// `json`: one JSON object per line, for log shippers.
    Json,
}

impl LogFormat {
    /// The name used in `proxy.toml`.
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }

    /// Parses a `proxy.toml` log format name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "text" => Some(LogFormat::Text),
            "json" => Some(LogFormat::Json),
            _ => None,
        }
    }
}

/// One `[[listeners]]` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct ListenerConfig {
    /// `listeners[i].listen`.
    pub listen: SocketAddr,
    /// `tls` or `certificates`: the listener terminates TLS with these.
    pub tls: Option<ListenerTls>,
    /// `redirect_https` (default false): every request gets a `308` to its https URL. Never set
    /// on a TLS listener.
    pub redirect_https: bool,
}

/// A TLS listener's certificates, read from their files when the config was loaded, and the
/// rustls config that serves them.
#[derive(Debug, Clone)]
pub struct ListenerTls {
    /// `tls` (one certificate, no names) or `certificates`, in file order; the first is the
    /// default when the client's SNI matches no `server_names`.
    pub certificates: Vec<CertificateConfig>,
    /// Built from `certificates`: SNI selection, ALPN `h2` and `http/1.1`, TLS 1.2 and 1.3.
    pub server_config: Arc<rustls::ServerConfig>,
}

impl PartialEq for ListenerTls {
    /// Equal when the same files hold the same bytes for the same names (`server_config` is
    /// built from them).
    fn eq(&self, other: &Self) -> bool {
        self.certificates == other.certificates
    }
}

/// One certificate of a TLS listener.
#[derive(Debug, Clone)]
pub struct CertificateConfig {
    /// `cert`: the PEM chain, leaf first; relative paths are resolved from the config's directory.
    pub cert: PathBuf,
    /// `key`: the PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// `server_names`, lower-cased: SNI names this certificate is chosen for (`*.example.com`
    /// matches one label). Empty for `tls = { cert, key }`.
    pub server_names: Vec<String>,
    /// What the files held when the config was loaded.
    pub loaded: LoadedKey,
}

impl PartialEq for CertificateConfig {
    fn eq(&self, other: &Self) -> bool {
        self.cert == other.cert
            && self.key == other.key
            && self.server_names == other.server_names
            && self.loaded.fingerprint == other.loaded.fingerprint
    }
}

/// One `[[routes]]` entry. Both matchers are optional; a route with neither matches everything.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteConfig {
    /// Exact host, lower-cased, without a port.
    pub host: Option<String>,
    /// Plain string prefix of the request path.
    pub path_prefix: Option<String>,
    /// Name of a pool that exists in [`Config::pools`].
    pub pool: String,
}

/// How a pool picks a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StrategyKind {
    /// `round_robin`: smooth weighted round robin.
    RoundRobin,
    /// `least_connections`: fewest in-flight requests relative to weight.
    LeastConnections,
    /// `ip_hash`: consistent hashing (Maglev) of the client IP.
    IpHash,
    /// `cookie`: signed affinity cookie.
    Cookie,
}

impl StrategyKind {
    /// The name used in `proxy.toml`.
    pub fn as_str(self) -> &'static str {
        match self {
            StrategyKind::RoundRobin => "round_robin",
            StrategyKind::LeastConnections => "least_connections",
            StrategyKind::IpHash => "ip_hash",
            StrategyKind::Cookie => "cookie",
        }
    }

    /// Parses a `proxy.toml` strategy name.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "round_robin" => StrategyKind::RoundRobin,
            "least_connections" => StrategyKind::LeastConnections,
            "ip_hash" => StrategyKind::IpHash,
            "cookie" => StrategyKind::Cookie,
            _ => return None,
        })
    }
}

/// What happens to clients pinned (by cookie) to a draining backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DrainSticky {
    /// Keep sending them to the draining backend until the drain ends (HAProxy's drain).
    #[default]
    Keep,
    /// Re-place them at once, with a new cookie.
    Move,
}

/// One `[pools.NAME]` table.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolConfig {
    /// The pool's name (the table key).
    pub name: String,
    /// `strategy`.
    pub strategy: StrategyKind,
    /// `backends`, in file order; addresses are unique within the pool. For a pool with
    /// `discovery`, the membership last discovered, in address order (empty when the file is
    /// read: a source is never contacted by validation).
    pub backends: Vec<BackendSpec>,
    /// `[pools.NAME.discovery]`: where the backends come from, instead of a static list.
    pub discovery: Option<DiscoveryConfig>,
    /// `[pools.NAME.cookie]`, when present. Required (with a secret) when `strategy = "cookie"`.
    pub cookie: Option<CookieConfig>,
    /// `trusted_proxies`: peers whose `X-Forwarded-For` is believed for `ip_hash`.
    pub trusted_proxies: Vec<IpNet>,
    /// `drain_timeout` (default 30s): how long a removed backend may take to finish its work.
    pub drain_timeout: Duration,
    /// `drain_sticky` (default `keep`).
    pub drain_sticky: DrainSticky,
    /// `retries` (default 1): how many other backends a failed request may be tried on.
    pub retries: u32,
    /// `slow_start` (default off): how long a new or recovered backend takes to reach its full
    /// weight. Never set on pools that place clients by `ip_hash`.
    pub slow_start: Option<Duration>,
    /// `[pools.NAME.health]`: active checks, when present.
    pub health: Option<HealthConfig>,
    /// `[pools.NAME.passive]`: outlier ejection (on by default).
    pub passive: PassiveConfig,
    /// `balance_factor` (`ip_hash` and `cookie` only; default none): consistent hashing with
    /// bounded loads — no backend takes new clients above this factor times the pool's average load.
    pub balance_factor: Option<f64>,
    /// `ca`: the PEM file of the CA certificates its `https://` backends are verified against,
    /// instead of Mozilla's roots.
    pub ca: Option<PathBuf>,
}

/// `[pools.NAME.discovery]`: a pool whose backends are followed in DNS or etcd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiscoveryConfig {
    /// `dns`, `dns_srv` or `etcd`: exactly one.
    pub source: DiscoverySource,
    /// `allow_empty` (default false): whether an empty answer from a source that answers empties
    /// the pool. When false, it is ignored and the last membership keeps serving.
    pub allow_empty: bool,
    /// The pool's `max_connections`, given to every backend found.
    pub max_connections: Option<u32>,
}

/// Where a pool's backends are found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiscoverySource {
    /// `dns` or `dns_srv`, looked up again every `interval` (or when the answer's TTL runs out,
    /// if later).
    Dns(DnsDiscovery),
    /// `etcd = { endpoints, prefix }`: read whole, then watched.
    Etcd(EtcdDiscovery),
}

impl DiscoverySource {
    /// What `/status` and logs call the source: `dns NAME:PORT`, `dns_srv NAME` or
    /// `etcd PREFIX`.
    pub fn describe(&self) -> String {
        match self {
            DiscoverySource::Dns(dns) => match &dns.query {
                DnsQuery::Address { name, port, .. } => format!("dns {name}:{port}"),
                DnsQuery::Srv { name } => format!("dns_srv {name}"),
            },
            DiscoverySource::Etcd(etcd) => format!("etcd {}", etcd.prefix),
        }
    }
}

/// A DNS source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsDiscovery {
    /// What to ask.
    pub query: DnsQuery,
    /// `resolver`: the DNS server asked (port 53 unless given); `None`: the system's, from
    /// `/etc/resolv.conf`.
    pub resolver: Option<SocketAddr>,
    /// `interval` (default 5s): between lookups, stretched to the answer's TTL when that is
    /// longer.
    pub interval: Duration,
}

/// A DNS question.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DnsQuery {
    /// `dns = "NAME:PORT"`: each A record (or AAAA, when there are no A records) is one backend
    /// on `port`, with `weight`.
    Address {
        /// The name, lower-cased.
        name: String,
        /// The port of every backend.
        port: u16,
        /// `weight` (default 1).
        weight: u32,
    },
    /// `dns_srv = "NAME"`: each target of the SRV records with the lowest priority, at each of
    /// its addresses, on the record's port, weighted by the record's weight (0 counts as 1).
    Srv {
        /// The SRV name, lower-cased.
        name: String,
    },
}

/// An etcd source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdDiscovery {
    /// `endpoints`: `http://HOST:PORT` of etcd members.
    pub endpoints: Vec<String>,
    /// `prefix`: each key under it holds one backend as JSON, `{"address": "IP:port",
    /// "weight": N}`.
    pub prefix: String,
}

/// `[pools.NAME.health]`: an HTTP GET to each backend, in the background.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthConfig {
    /// `path` (default `/`): path and query of the check request.
    pub path: String,
    /// `host`: the check's `Host` header (default: the backend's address).
    pub host: Option<String>,
    /// `interval` (default 2s): from the end of one check to the start of the next.
    pub interval: Duration,
    /// `timeout` (default 1s): connect plus response headers.
    pub timeout: Duration,
    /// `unhealthy_threshold` (default 3): consecutive failed checks that mark a backend down.
    pub unhealthy_threshold: u32,
    /// `healthy_threshold` (default 2): consecutive passed checks that bring it back.
    pub healthy_threshold: u32,
    /// `expected_status` (default `"200-399"`): inclusive ranges of statuses that pass.
    pub expected_status: Vec<(u16, u16)>,
}

impl HealthConfig {
    /// Whether `status` passes the check.
    pub fn expects(&self, status: u16) -> bool {
        self.expected_status
            .iter()
            .any(|&(low, high)| (low..=high).contains(&status))
    }
}

/// `[pools.NAME.passive]`: ejects backends that fail requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PassiveConfig {
    /// `enabled` (default true).
    pub enabled: bool,
    /// `consecutive_failures` (default 5): connection errors, timeouts or 5xx answers in a row
    /// that eject a backend.
    pub consecutive_failures: u32,
    /// `ejection_time` (default 10s): the first ejection's length; each one after it doubles.
    pub ejection_time: Duration,
    /// `max_ejection_time` (default 300s): the cap on the doubling.
    pub max_ejection_time: Duration,
    /// `max_ejected_percent` (default 50): at most this share of the pool's backends may be out
    /// (ejected or down) because of ejections.
    pub max_ejected_percent: u32,
}

impl Default for PassiveConfig {
    fn default() -> Self {
        PassiveConfig {
            enabled: true,
            consecutive_failures: 5,
            ejection_time: Duration::from_secs(10),
            max_ejection_time: Duration::from_secs(300),
            max_ejected_percent: 50,
        }
    }
}

/// What the config says about one backend of a pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendSpec {
    /// `address`: `IP:port`, or for `https://HOST:port` the address HOST resolved to when the
    /// config was loaded. Its identity: live state, hashing, cookies and metrics go by it.
    pub address: SocketAddr,
    /// `weight` (default 1, at least 1).
    pub weight: u32,
    /// `max_connections` (or the pool's `max_connections`): in-flight requests plus upgraded
    /// connections above which the backend takes no more work. `None`: no limit.
    pub max_connections: Option<u32>,
    /// For an `https://` address: how to speak TLS to it.
    pub tls: Option<UpstreamTls>,
}

/// TLS to an `https://HOST:port` backend: SNI and certificate verification for HOST, against
/// the pool's `ca` or Mozilla's roots.
#[derive(Clone)]
pub struct UpstreamTls {
    /// HOST as written (lower-cased; an IPv6 address without brackets).
    pub host: String,
    /// What the certificate must name, and the SNI sent (rustls sends none for an IP address).
    pub server_name: ServerName<'static>,
    /// `HOST:port`: the `:authority` of HTTP/2 requests that arrived without a host.
    pub authority: http::uri::Authority,
    /// The pool's `ca`, if any.
    pub ca: Option<PathBuf>,
    /// SHA-256 of the `ca` file, so a rotated CA counts as a change.
    pub ca_fingerprint: Option<[u8; 32]>,
    /// Offers ALPN `h2` and `http/1.1`: for requests.
    pub client: Arc<rustls::ClientConfig>,
    /// Offers only `http/1.1`: for upgrades (HTTP/2 cannot carry them) and health checks.
    pub client_http1: Arc<rustls::ClientConfig>,
    /// [`UpstreamTls::settings_id`], computed once: every request to the backend reads it.
    id: u64,
}

impl PartialEq for UpstreamTls {
    fn eq(&self, other: &Self) -> bool {
        self.host == other.host
            && self.authority == other.authority
            && self.ca == other.ca
            && self.ca_fingerprint == other.ca_fingerprint
    }
}

impl Eq for UpstreamTls {}

impl UpstreamTls {
    /// A digest of what `==` compares, never 0 (which stands for plain TCP): tells connections
    /// made under these settings from those made under others.
    pub fn settings_id(&self) -> u64 {
        self.id
    }

    /// Sets [`UpstreamTls::settings_id`] from the fields, once they are all in place.
    fn with_id(mut self) -> Self {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::hash::DefaultHasher::new();
        (&self.host, &self.authority, &self.ca, &self.ca_fingerprint).hash(&mut hasher);
        self.id = hasher.finish() | 1;
        self
    }
}

impl std::fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamTls")
            .field("host", &self.host)
            .field("ca", &self.ca)
            .finish_non_exhaustive()
    }
}

/// `[pools.NAME.cookie]`.
#[derive(Debug, Clone, PartialEq)]
pub struct CookieConfig {
    /// `name` (default `switchyard`).
    pub name: String,
    /// `secret` (a string or a list) or the value of `secret_env`: the first signs, every one verifies.
    /// Empty only when the pool's strategy is not `cookie` and the secret could not be resolved.
    pub secrets: Vec<Secret>,
    /// `secret = "generate"`: `secrets` holds one random 32-byte key drawn when the config was
    /// loaded. A reload that still says so keeps the running key ([`Config::keep_generated_secrets`]).
    pub generated: bool,
    /// `fallback` (default `round_robin`): how clients without a valid cookie are placed.
    /// Never `Cookie`.
    pub fallback: StrategyKind,
    /// `max_age`; `None` makes a session cookie with no server-side expiry.
    pub max_age: Option<Duration>,
    /// `secure` (default false).
    pub secure: bool,
}

/// `[timeouts]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timeouts {
    /// `connect` (default 2s): TCP connect to a backend.
    pub connect: Duration,
    /// `response_header` (default 30s): from the request being sent to the backend's response headers.
    pub response_header: Duration,
    /// `client_header` (default 10s): for a client to send a request's headers.
    pub client_header: Duration,
    /// `idle` (default 60s): a client connection that moved no byte for this long, with no request
    /// waiting on a backend, is closed; so is a pooled upstream connection idle this long.
    pub idle: Duration,
    /// `shutdown` (default 30s): how long SIGINT/SIGTERM waits for in-flight requests.
    pub shutdown: Duration,
    /// `upgraded_idle` (default none): an upgraded connection (WebSocket) that moved no byte
    /// either way for this long is closed.
    pub upgraded_idle: Option<Duration>,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(2),
            response_header: Duration::from_secs(30),
            client_header: Duration::from_secs(10),
            idle: Duration::from_secs(60),
            shutdown: Duration::from_secs(30),
            upgraded_idle: None,
        }
    }
}

/// `[limits]`: bounds on what one client may send, checked before anything reaches a backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// `max_header_bytes` (default 64 KiB): an HTTP/1 request line plus its header lines, or an
    /// HTTP/2 header list (decoded, 32 bytes of overhead per field). A longer request line gets
    /// `414`, a larger head `431`.
    pub max_header_bytes: usize,
    /// `max_headers` (default 100): header fields per request, else `431`.
    pub max_headers: usize,
    /// `max_body_bytes` (default none): a request body larger than this gets `413`, whether its
    /// `Content-Length` says so or a chunked (or HTTP/2) body grows past it.
    pub max_body_bytes: Option<u64>,
    /// `max_connections` (default 10,000): open client connections per listener; one more is
    /// accepted and closed at once.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_header_bytes: 64 * 1024,
            max_headers: 100,
            max_body_bytes: None,
            max_connections: 10_000,
        }
    }
}

impl Config {
    /// Takes the running key of every cookie pool that says `secret = "generate"` in both `old`
    /// and `self`, so a reload does not invalidate every affinity cookie; returns the names of the
    /// pools whose key is new (they start over, and say so in the log).
    pub fn keep_generated_secrets(&mut self, old: &Config) -> Vec<String> {
        let mut fresh = Vec::new();
        for (name, pool) in &mut self.pools {
            let Some(cookie) = pool.cookie.as_mut().filter(|c| c.generated) else {
                continue;
            };
            let running = old
                .pools
                .get(name)
                .and_then(|p| p.cookie.as_ref())
                .filter(|c| c.generated);
            match running {
                Some(running) => cookie.secrets.clone_from(&running.secrets),
                None => fresh.push(name.clone()),
            }
        }
        fresh
    }

    /// The pools whose cookie key was generated when this config was loaded.
    pub fn generated_secrets(&self) -> Vec<String> {
        self.pools
            .iter()
            .filter(|(_, p)| p.cookie.as_ref().is_some_and(|c| c.generated))
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// Reads, parses and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        validate::load(path)
    }

    /// Parses and validates `text` as if it were read from `path` (used for messages only).
    pub fn from_str(text: &str, path: &Path) -> Result<Config, ConfigErrors> {
        validate::parse(text, path)
    }
}
