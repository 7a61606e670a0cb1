//! Configuration: `proxy.toml` is read in two stages. [`raw`] holds strict serde structs that mirror
//! the file (unknown keys are errors); [`validate`] checks them all at once and produces the [`Config`]
//! below, in which every value is already parsed (addresses, durations, CIDRs, secrets) and every
//! cross-reference (route → pool) is known to resolve.

pub mod raw;
pub mod validate;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;

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
    /// `log_format` (default `text`): how access-log lines are written.
    pub log_format: LogFormat,
}

/// `[admin]`.
#[derive(Debug, Clone, PartialEq)]
pub struct AdminConfig {
    /// `admin.listen`.
    pub listen: SocketAddr,
    /// `admin.token`, or the value of `admin.token_env`: when set, admin requests must carry it as
    /// `Authorization: Bearer …`. At least 16 bytes of printable ASCII without spaces.
    pub token: Option<Vec<u8>>,
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
    /// `backends`, in file order; addresses are unique within the pool.
    pub backends: Vec<BackendSpec>,
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
    /// `address`: `IP:port`.
    pub address: SocketAddr,
    /// `weight` (default 1, at least 1).
    pub weight: u32,
    /// `max_connections` (or the pool's `max_connections`): in-flight requests plus upgraded
    /// connections above which the backend takes no more work. `None`: no limit.
    pub max_connections: Option<u32>,
}

/// `[pools.NAME.cookie]`.
#[derive(Debug, Clone, PartialEq)]
pub struct CookieConfig {
    /// `name` (default `switchyard`).
    pub name: String,
    /// `secret` (a string or a list) or the value of `secret_env`: the first signs, every one verifies.
    /// Empty only when the pool's strategy is not `cookie` and the secret could not be resolved.
    pub secrets: Vec<Vec<u8>>,
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
    /// waiting on a backend, is closed; a pooled upstream connection idle this long is not reused.
    pub idle: Duration,
    /// `shutdown` (default 30s): how long SIGINT/SIGTERM waits for in-flight requests.
    pub shutdown: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(2),
            response_header: Duration::from_secs(30),
            client_header: Duration::from_secs(10),
            idle: Duration::from_secs(60),
            shutdown: Duration::from_secs(30),
        }
    }
}

impl Config {
    /// Reads, parses and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        validate::load(path)
    }

    /// Parses and validates `text` as if it were read from `path` (used for messages only).
    pub fn from_str(text: &str, path: &Path) -> Result<Config, ConfigErrors> {
        validate::parse(text, path)
    }
}
