//! The second stage of reading `proxy.toml`: checks a [`RawConfig`] as a whole and builds the
//! [`Config`], or returns every problem found, each with its file, line, column and dotted key.
//!
//! Syntax errors, type errors and unknown keys are found by toml while deserialising and stop
//! there (the document cannot be trusted past them), so they arrive one at a time. Everything
//! else — addresses, durations, references, limits — is checked here, and all of it is reported
//! together so that one edit can fix one whole config.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use toml::Spanned;

use rustls_pki_types::{CertificateDer, ServerName};

use super::raw::{
    RawAdmin, RawBackend, RawCertificate, RawConfig, RawCookie, RawDiscovery, RawEtcd, RawHealth,
    RawLimits, RawListener, RawPassive, RawPool, RawRoute, RawSecret, RawTimeouts,
};
use super::{
    AdminConfig, BackendSpec, CertificateConfig, Config, CookieConfig, DiscoveryConfig,
    DiscoverySource, DnsDiscovery, DnsQuery, DrainSticky, EtcdDiscovery, HealthConfig, Limits,
    ListenerConfig, ListenerTls, LogFormat, PassiveConfig, PoolConfig, RouteConfig, RuntimeConfig,
    Secret, StrategyKind, Timeouts, UpstreamTls,
};
use crate::tls::{self, LoadedKey, SniCertificate};

/// The longest duration a config may give: far beyond any timeout's use, and short enough that
/// the current time plus it, or a cookie's `Max-Age` in seconds, never overflows. Ten years as
/// humantime counts them (`"10y"`, years of 365.25 days).
const MAX_DURATION: Duration = Duration::from_secs(10 * 31_557_600);

/// Signing keys shorter than this are guessable; HMAC-SHA256 wants at least this much entropy.
/// The admin token shares the floor: it guards the same proxy.
const MIN_SECRET_BYTES: usize = 16;
/// `secret = "generate"`: too short to be a secret itself, so it can mean nothing else.
const GENERATE: &str = "generate";
/// Bytes of a generated cookie key: HMAC-SHA256's block-size-safe, full-strength key length.
const GENERATED_SECRET_BYTES: usize = 32;
/// `[limits]` bounds: a head must hold a request line and a Host; past 1 MiB it is no longer a
/// header but an upload, and hyper's read buffer is sized from it.
const MIN_HEADER_BYTES: i64 = 1024;
const MAX_HEADER_BYTES: i64 = 1024 * 1024;
const MAX_HEADERS: i64 = 10_000;
const MAX_WEIGHT: i64 = super::MAX_WEIGHT as i64;
const DEFAULT_WEIGHT: u32 = 1;
const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_RETRIES: u32 = 1;
/// More worker threads than this is a typo, not a machine.
const MAX_WORKERS: i64 = 1024;
const MAX_CONNECTIONS: i64 = 1_000_000;
/// More retries than this only multiply the load a failing request puts on a pool.
const MAX_RETRIES: i64 = 10;
const DEFAULT_COOKIE_NAME: &str = "switchyard";
/// How often a DNS source is asked again unless its TTL says later.
const DEFAULT_DISCOVERY_INTERVAL: Duration = Duration::from_secs(5);
const DNS_PORT: u16 = 53;
const STRATEGIES: &str = "`round_robin`, `least_connections`, `ip_hash`, `cookie`";
const FALLBACKS: &str = "`round_robin`, `least_connections`, `ip_hash`";

/// One problem in a config file, located by line, column and dotted key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file, as it was given.
    pub file: PathBuf,
    /// 1-based line, when the problem has a place in the file.
    pub line: Option<usize>,
    /// 1-based column in characters, when the problem has a place in the file.
    pub column: Option<usize>,
    /// Dotted path with indexes, such as `pools.app.backends[1].weight`; empty for the whole file.
    pub key: String,
    /// What is wrong, for a person.
    pub message: String,
}

impl fmt::Display for ConfigError {
    /// `FILE[:LINE:COLUMN]: [KEY: ]MESSAGE`, the shape compilers use, so editors can jump to it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(column) = self.column {
                write!(f, ":{column}")?;
            }
        }
        if !self.key.is_empty() {
            write!(f, ": {}", self.key)?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ConfigError {}

/// Every problem found in one config file, in file order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    /// One error per line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Reads the file at `path`, then [`parse`]s it.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    let text = std::fs::read_to_string(path).map_err(|error| {
        ConfigErrors(vec![ConfigError {
            file: path.to_path_buf(),
            line: None,
            column: None,
            key: String::new(),
            message: format!("cannot read the config file: {error}"),
        }])
    })?;
    parse(&text, path)
}

/// Parses and validates `text`; `path` is only used in [`Config::path`] and in messages.
pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigErrors> {
    // A value that is not UTF-8 cannot be a secret written in a config; treat it as unset.
    parse_with_env(text, path, &|name| std::env::var(name).ok())
}

/// [`parse`] with the environment passed in, so tests need not mutate the process environment.
fn parse_with_env(
    text: &str,
    path: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Config, ConfigErrors> {
    let raw: RawConfig =
        toml::from_str(text).map_err(|error| ConfigErrors(vec![toml_error(text, path, &error)]))?;
    let mut checker = Checker {
        text,
        file: path,
        env,
        errors: Vec::new(),
    };
    let config = checker.config(&raw);
    if checker.errors.is_empty() {
        Ok(config)
    } else {
        // Pools are checked in name order; people read and fix in file order.
        checker.errors.sort_by_key(|e| (e.line, e.column));
        Err(ConfigErrors(checker.errors))
    }
}

/// A pool's `ca`, read.
struct LoadedCa {
    path: PathBuf,
    certificates: Vec<CertificateDer<'static>>,
    fingerprint: [u8; 32],
}

/// The client configs of a pool's https backends (see [`tls::client_configs`]).
type ClientConfigs = (Arc<rustls::ClientConfig>, Arc<rustls::ClientConfig>);

/// The host of an `https://` backend address.
struct HttpsTarget {
    host: String,
    server_name: ServerName<'static>,
    authority: http::uri::Authority,
}

impl HttpsTarget {
    fn new(host: String, server_name: ServerName<'static>, port: u16) -> Option<Self> {
        let authority = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        Some(HttpsTarget {
            authority: authority.parse().ok()?,
            host,
            server_name,
        })
    }
}

/// Collects errors while building a [`Config`] whose values are only meaningful if none were found.
struct Checker<'a> {
    text: &'a str,
    file: &'a Path,
    env: &'a dyn Fn(&str) -> Option<String>,
    errors: Vec<ConfigError>,
}

impl Checker<'_> {
    fn report(&mut self, key: &str, span: Option<Range<usize>>, message: String) {
        let (line, column) = span.map(|span| line_col(self.text, span.start)).unzip();
        self.errors.push(ConfigError {
            file: self.file.to_path_buf(),
            line,
            column,
            key: key.to_owned(),
            message,
        });
    }

    fn config(&mut self, raw: &RawConfig) -> Config {
        let admin = raw.admin.as_ref().and_then(|admin| self.admin(admin));
        let listeners = self.listeners(raw.listeners.as_ref(), admin.as_ref());
        let routes = self.routes(&raw.routes, &raw.pools);
        let pools: BTreeMap<String, PoolConfig> = raw
            .pools
            .iter()
            .map(|(name, pool)| (name.get_ref().clone(), self.pool(name, pool)))
            .collect();
        self.one_health_check_per_address(raw, &pools);
        self.one_tls_setting_per_address(raw, &pools);
        self.one_cookie_per_name_and_host(raw, &pools, &routes);
        let timeouts = self.timeouts(raw.timeouts.as_ref());
        let limits = self.limits(raw.limits.as_ref());
        let log_format = self.log_format(raw.log_format.as_ref());
        let runtime = RuntimeConfig {
            workers: raw
                .runtime
                .as_ref()
                .and_then(|r| r.workers.as_ref())
                .and_then(|w| self.count("runtime.workers", w, 1, MAX_WORKERS))
                .map(|w| w as usize),
        };
        Config {
            path: self.file.to_path_buf(),
            admin,
            listeners,
            routes,
            pools,
            timeouts,
            limits,
            log_format,
            runtime,
        }
    }

    fn log_format(&mut self, raw: Option<&Spanned<String>>) -> LogFormat {
        let Some(raw) = raw else {
            return LogFormat::default();
        };
        LogFormat::parse(raw.get_ref()).unwrap_or_else(|| {
            let message = format!(
                "unknown log_format `{}`; expected `text` or `json`",
                raw.get_ref()
            );
            self.report("log_format", Some(raw.span()), message);
            LogFormat::default()
        })
    }

    fn admin(&mut self, raw: &RawAdmin) -> Option<AdminConfig> {
        // Checked before `listen` so that a missing listen does not hide token errors.
        let token = self.admin_token(raw);
        let Some(listen) = &raw.listen else {
            self.report(
                "admin.listen",
                None,
                "[admin] needs `listen`, an IP:port address".to_owned(),
            );
            return None;
        };
        let listen = self.socket_addr("admin.listen", listen)?;
        Some(AdminConfig { listen, token })
    }

    /// `admin.token` or the value of `admin.token_env`; `None` when neither is set, and after the
    /// problems that leave no token to check.
    fn admin_token(&mut self, raw: &RawAdmin) -> Option<Secret> {
        let (key, span, what, token) = match (&raw.token, &raw.token_env) {
            (None, None) => return None,
            (Some(_), Some(var)) => {
                let message = "`token` and `token_env` are both set; keep one".to_owned();
                self.report("admin.token_env", Some(var.span()), message);
                return None;
            }
            (Some(token), None) => (
                "admin.token",
                token.span(),
                "token".to_owned(),
                token.get_ref().clone(),
            ),
            (None, Some(var)) => {
                let name = var.get_ref();
                if name.is_empty() {
                    let message = "token_env must name an environment variable".to_owned();
                    self.report("admin.token_env", Some(var.span()), message);
                    return None;
                }
                // Unlike a cookie secret, an unset token is always an error: running the admin
                // API open because a deploy forgot a variable is the failure the key prevents.
                let Some(value) = (self.env)(name).filter(|value| !value.is_empty()) else {
                    let message = format!("environment variable `{name}` is unset or empty");
                    self.report("admin.token_env", Some(var.span()), message);
                    return None;
                };
                (
                    "admin.token_env",
                    var.span(),
                    format!("the token in `{name}`"),
                    value,
                )
            }
        };
        self.check_secret_length(key, span.clone(), &what, &token);
        // A header value cannot carry control characters, and HTTP strips surrounding spaces, so
        // such a token could never match.
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            let message = format!(
                "{what} must be printable ASCII without spaces, as it is sent in an \
                 Authorization header"
            );
            self.report(key, Some(span), message);
        }
        Some(Secret::new(token))
    }

    fn listeners(
        &mut self,
        raw: Option<&Spanned<Vec<Spanned<RawListener>>>>,
        admin: Option<&AdminConfig>,
    ) -> Vec<ListenerConfig> {
        let needed = "at least one [[listeners]] entry is required".to_owned();
        let Some(raw) = raw else {
            self.report("listeners", None, needed);
            return Vec::new();
        };
        if raw.get_ref().is_empty() {
            self.report("listeners", Some(raw.span()), needed);
        }
        let mut taken: HashMap<SocketAddr, String> = HashMap::new();
        if let Some(admin) = admin {
            taken.insert(admin.listen, "admin.listen".to_owned());
        }
        let mut listeners = Vec::new();
        for (i, listener) in raw.get_ref().iter().enumerate() {
            let key = format!("listeners[{i}].listen");
            let Some(listen) = &listener.get_ref().listen else {
                self.report(
                    &key,
                    Some(listener.span()),
                    "`listen` is required".to_owned(),
                );
                continue;
            };
            let Some(address) = self.socket_addr(&key, listen) else {
                continue;
            };
            // Port 0 asks the OS for a fresh port on every bind, so two of them never clash.
            if address.port() != 0 {
                if let Some((other, first)) = taken.iter().find(|(a, _)| binds_over(**a, address)) {
                    let message = if *other == address {
                        format!("address {address} is already used by {first}")
                    } else {
                        format!(
                            "address {address} overlaps {other} ({first}): an unspecified address \
                             takes its port on every interface, so one of them could not be bound"
                        )
                    };
                    self.report(&key, Some(listen.span()), message);
                } else {
                    taken.insert(address, key);
                }
            }
            let tls = self.listener_tls(i, listener);
            let terminates_tls =
                listener.get_ref().tls.is_some() || listener.get_ref().certificates.is_some();
            let redirect_https = match &listener.get_ref().redirect_https {
                Some(redirect) if *redirect.get_ref() && terminates_tls => {
                    let message = "redirect_https is for plain listeners; this one terminates TLS \
                                   itself"
                        .to_owned();
                    let key = format!("listeners[{i}].redirect_https");
                    self.report(&key, Some(redirect.span()), message);
                    false
                }
                Some(redirect) => *redirect.get_ref(),
                None => false,
            };
            listeners.push(ListenerConfig {
                listen: address,
                tls,
                redirect_https,
            });
        }
        listeners
    }

    /// A listener's `tls` or `certificates`, with every file read and checked now, so that a bad
    /// certificate fails `check` and a reload (which then keeps the old one serving).
    fn listener_tls(&mut self, i: usize, raw: &Spanned<RawListener>) -> Option<ListenerTls> {
        let key = format!("listeners[{i}]");
        let anchor = raw.span();
        let raw = raw.get_ref();
        let certificates = match (&raw.tls, &raw.certificates) {
            (None, None) => return None,
            (Some(_), Some(list)) => {
                let message = "`tls` and `certificates` are both set; use `tls` for one \
                               certificate, `certificates` for several chosen by SNI"
                    .to_owned();
                self.report(&format!("{key}.certificates"), Some(list.span()), message);
                return None;
            }
            (Some(tls), None) => {
                let key = format!("{key}.tls");
                let (cert, key, loaded) =
                    self.key_pair(&key, tls.cert.as_ref(), tls.key.as_ref(), anchor.clone())?;
                vec![CertificateConfig {
                    cert,
                    key,
                    server_names: Vec::new(),
                    loaded,
                }]
            }
            (None, Some(list)) => self.sni_certificates(&format!("{key}.certificates"), list)?,
        };
        let sni: Vec<SniCertificate<'_>> = certificates
            .iter()
            .map(|c| SniCertificate {
                key: &c.loaded,
                server_names: &c.server_names,
            })
            .collect();
        match tls::server_config(&sni) {
            Ok(server_config) => Some(ListenerTls {
                certificates,
                server_config,
            }),
            Err(error) => {
                let which = if raw.tls.is_some() {
                    "tls"
                } else {
                    "certificates"
                };
                let message = format!("cannot build a TLS configuration: {error}");
                self.report(&format!("{key}.{which}"), Some(anchor), message);
                None
            }
        }
    }

    /// `certificates = [{ cert, key, server_names }]`: each needs names, and no name may be
    /// claimed twice. `None` after any error.
    fn sni_certificates(
        &mut self,
        key: &str,
        list: &Spanned<Vec<Spanned<RawCertificate>>>,
    ) -> Option<Vec<CertificateConfig>> {
        if list.get_ref().is_empty() {
            let message = "`certificates` needs at least one entry".to_owned();
            self.report(key, Some(list.span()), message);
            return None;
        }
        let errors_before = self.errors.len();
        let mut claimed: HashMap<String, usize> = HashMap::new();
        let mut certificates = Vec::new();
        for (j, entry) in list.get_ref().iter().enumerate() {
            let key = format!("{key}[{j}]");
            let raw = entry.get_ref();
            let mut server_names = Vec::new();
            match &raw.server_names {
                None => {
                    let message = "`server_names` is required: the SNI names this certificate \
                                   is chosen for (the first certificate also serves clients \
                                   whose name matches none)"
                        .to_owned();
                    self.report(&format!("{key}.server_names"), Some(entry.span()), message);
                }
                Some(names) if names.is_empty() => {
                    let message = "`server_names` must name at least one host".to_owned();
                    self.report(&format!("{key}.server_names"), Some(entry.span()), message);
                }
                Some(names) => {
                    for (n, name) in names.iter().enumerate() {
                        let name_key = format!("{key}.server_names[{n}]");
                        let lower = name.get_ref().to_ascii_lowercase();
                        if !tls::is_server_name(&lower) {
                            let message = format!(
                                "`{}` is not a server name: write a DNS name such as \
                                 `example.com`, or `*.example.com` for one label under it",
                                name.get_ref()
                            );
                            self.report(&name_key, Some(name.span()), message);
                        } else if let Some(first) = claimed.get(&lower) {
                            let message =
                                format!("`{lower}` is already served by certificates[{first}]");
                            self.report(&name_key, Some(name.span()), message);
                        } else {
                            claimed.insert(lower.clone(), j);
                        }
                        server_names.push(lower);
                    }
                }
            }
            if let Some((cert, key, loaded)) =
                self.key_pair(&key, raw.cert.as_ref(), raw.key.as_ref(), entry.span())
            {
                certificates.push(CertificateConfig {
                    cert,
                    key,
                    server_names,
                    loaded,
                });
            }
        }
        (self.errors.len() == errors_before).then_some(certificates)
    }

    /// Reads a certificate chain and its key; errors name `{key}.cert` or `{key}.key`.
    fn key_pair(
        &mut self,
        key: &str,
        cert: Option<&Spanned<String>>,
        private: Option<&Spanned<String>>,
        anchor: Range<usize>,
    ) -> Option<(PathBuf, PathBuf, LoadedKey)> {
        let cert_path = self.file_path(
            &format!("{key}.cert"),
            cert,
            &anchor,
            "the PEM certificate chain",
        );
        let key_path = self.file_path(
            &format!("{key}.key"),
            private,
            &anchor,
            "the PEM private key",
        );
        let (cert_path, key_path) = (cert_path?, key_path?);
        match tls::load_key_pair(&cert_path, &key_path) {
            Ok(loaded) => Some((cert_path, key_path, loaded)),
            Err(error) => {
                // Certificate and key may be one file: then a problem is the certificate's
                // unless it is the key's by nature.
                let about_key = if cert_path == key_path {
                    matches!(
                        error,
                        tls::PemError::NoKey { .. } | tls::PemError::Unusable { .. }
                    )
                } else {
                    error.file() == key_path
                };
                let (which, span) = if about_key {
                    ("key", private.map(Spanned::span))
                } else {
                    ("cert", cert.map(Spanned::span))
                };
                self.report(&format!("{key}.{which}"), span, error.to_string());
                None
            }
        }
    }

    /// A required file path, resolved from the config file's directory when relative.
    fn file_path(
        &mut self,
        key: &str,
        raw: Option<&Spanned<String>>,
        anchor: &Range<usize>,
        what: &str,
    ) -> Option<PathBuf> {
        let Some(raw) = raw else {
            let name = key.rsplit('.').next().unwrap_or(key);
            let message = format!("`{name}` is required: the path of {what}");
            self.report(key, Some(anchor.clone()), message);
            return None;
        };
        if raw.get_ref().is_empty() {
            self.report(
                key,
                Some(raw.span()),
                "the path must not be empty".to_owned(),
            );
            return None;
        }
        Some(self.resolve(raw.get_ref()))
    }

    /// `path` as written when absolute, else relative to the config file's directory (so a
    /// config and its certificates can move together, whatever the working directory).
    fn resolve(&self, path: &str) -> PathBuf {
        let path = Path::new(path);
        match self.file.parent() {
            Some(dir) if path.is_relative() => dir.join(path),
            _ => path.to_path_buf(),
        }
    }

    fn routes(
        &mut self,
        raw: &[Spanned<RawRoute>],
        pools: &BTreeMap<Spanned<String>, RawPool>,
    ) -> Vec<RouteConfig> {
        let mut routes = Vec::new();
        for (i, route) in raw.iter().enumerate() {
            let key = format!("routes[{i}]");
            let host = route
                .get_ref()
                .host
                .as_ref()
                .map(|host| self.host(&format!("{key}.host"), host));
            let path_prefix = route.get_ref().path_prefix.as_ref().map(|prefix| {
                if !prefix.get_ref().starts_with('/') {
                    let message = format!("path_prefix `{}` must start with `/`", prefix.get_ref());
                    self.report(&format!("{key}.path_prefix"), Some(prefix.span()), message);
                }
                prefix.get_ref().clone()
            });
            let pool = match &route.get_ref().pool {
                None => {
                    let message = "`pool` is required: the pool this route sends to".to_owned();
                    self.report(&format!("{key}.pool"), Some(route.span()), message);
                    String::new()
                }
                Some(pool) => {
                    // Spanned compares by value alone, so a bare name can be looked up.
                    if !pools.contains_key(pool) {
                        let name = pool.get_ref();
                        let message = format!(
                            "route sends to pool `{name}`, but there is no [pools.{}]",
                            key_segment(name)
                        );
                        self.report(&format!("{key}.pool"), Some(pool.span()), message);
                    }
                    pool.get_ref().clone()
                }
            };
            routes.push(RouteConfig {
                host,
                path_prefix,
                pool,
            });
        }
        routes
    }

    fn host(&mut self, key: &str, raw: &Spanned<String>) -> String {
        let host = raw.get_ref();
        // An IPv6 literal carries colons of its own; only text after its `]` can be a port.
        let has_port = match host.strip_prefix('[') {
            Some(rest) => !rest.ends_with(']'),
            None => host.contains(':'),
        };
        if host.is_empty() {
            let message = "host must not be empty; leave `host` out to match every host";
            self.report(key, Some(raw.span()), message.to_owned());
        } else if has_port {
            let message = format!(
                "host `{host}` must not contain a port (routes match the Host header without it; \
                 an IPv6 address goes in brackets)"
            );
            self.report(key, Some(raw.span()), message);
        }
        host.to_ascii_lowercase()
    }

    fn pool(&mut self, name: &Spanned<String>, raw: &RawPool) -> PoolConfig {
        let key = format!("pools.{}", key_segment(name.get_ref()));
        if name.get_ref().is_empty() {
            self.report(
                &key,
                Some(name.span()),
                "pool name must not be empty".to_owned(),
            );
        } else if !is_bare_key(name.get_ref()) {
            let message = format!(
                "pool name `{}` may contain only ASCII letters, digits, `_` and `-`",
                name.get_ref()
            );
            self.report(&key, Some(name.span()), message);
        }

        let strategy = match &raw.strategy {
            None => {
                let message = format!("`strategy` is required; expected one of {STRATEGIES}");
                self.report(&format!("{key}.strategy"), Some(name.span()), message);
                None
            }
            Some(strategy) => {
                let parsed = StrategyKind::parse(strategy.get_ref());
                if parsed.is_none() {
                    let message = format!(
                        "unknown strategy `{}`; expected one of {STRATEGIES}",
                        strategy.get_ref()
                    );
                    self.report(&format!("{key}.strategy"), Some(strategy.span()), message);
                }
                parsed
            }
        };

        let default_max_connections = raw.max_connections.as_ref().and_then(|value| {
            self.count(&format!("{key}.max_connections"), value, 1, MAX_CONNECTIONS)
        });
        let ca_key = format!("{key}.ca");
        let ca = raw.ca.as_ref().map(|ca| self.ca(&ca_key, ca));
        let discovery = raw
            .discovery
            .as_ref()
            .and_then(|discovery| self.discovery(&key, name, discovery, default_max_connections));
        let backends = match (&raw.backends, &raw.discovery) {
            // Backends come from the source, once the server runs.
            (None, Some(_)) => Vec::new(),
            (Some(listed), Some(_)) => {
                let message = format!(
                    "`backends` and [{key}.discovery] are both set; a pool's backends are either \
                     listed or discovered"
                );
                self.report(&format!("{key}.backends"), Some(listed.span()), message);
                Vec::new()
            }
            (listed, None) => self.backends(
                &key,
                name,
                listed.as_ref(),
                default_max_connections,
                ca.as_ref(),
            ),
        };

        let mut trusted_proxies = Vec::new();
        for (i, proxy) in raw.trusted_proxies.iter().flatten().enumerate() {
            let text = proxy.get_ref();
            let parsed = text
                .parse::<IpNet>()
                .ok()
                .or_else(|| text.parse::<IpAddr>().ok().map(IpNet::from));
            match parsed {
                Some(net) => trusted_proxies.push(net),
                None => {
                    let message = format!("`{text}` is neither a CIDR nor an IP address");
                    let key = format!("{key}.trusted_proxies[{i}]");
                    self.report(&key, Some(proxy.span()), message);
                }
            }
        }

        let drain_timeout = raw
            .drain_timeout
            .as_ref()
            .and_then(|value| self.duration(&format!("{key}.drain_timeout"), value))
            .unwrap_or(DEFAULT_DRAIN_TIMEOUT);

        let drain_sticky = match raw.drain_sticky.as_ref() {
            None => DrainSticky::default(),
            Some(value) => match value.get_ref().as_str() {
                "keep" => DrainSticky::Keep,
                "move" => DrainSticky::Move,
                other => {
                    let message =
                        format!("unknown drain_sticky `{other}`; expected `keep` or `move`");
                    self.report(&format!("{key}.drain_sticky"), Some(value.span()), message);
                    DrainSticky::default()
                }
            },
        };

        let wants_cookie = strategy == Some(StrategyKind::Cookie);
        let cookie = match &raw.cookie {
            Some(cookie) => Some(self.cookie(&key, name, cookie, wants_cookie)),
            None => {
                if let (true, Some(strategy)) = (wants_cookie, &raw.strategy) {
                    let message =
                        format!("strategy `cookie` needs a [{key}.cookie] table with a secret");
                    self.report(&format!("{key}.cookie"), Some(strategy.span()), message);
                }
                None
            }
        };

        let retries = raw.retries.as_ref().map_or(DEFAULT_RETRIES, |value| {
            self.count(&format!("{key}.retries"), value, 0, MAX_RETRIES)
                .unwrap_or(DEFAULT_RETRIES)
        });

        let slow_start = raw
            .slow_start
            .as_ref()
            .and_then(|value| self.duration(&format!("{key}.slow_start"), value));
        let hashes = strategy == Some(StrategyKind::IpHash)
            || (strategy == Some(StrategyKind::Cookie)
                && cookie
                    .as_ref()
                    .is_some_and(|c| c.fallback == StrategyKind::IpHash));
        if let (Some(value), true) = (raw.slow_start.as_ref(), hashes) {
            let message = "slow_start does not work with ip_hash placement: ramping a backend's \
                           share would move clients back and forth between backends"
                .to_owned();
            self.report(&format!("{key}.slow_start"), Some(value.span()), message);
        }

        let balance_factor = raw.balance_factor.as_ref().and_then(|value| {
            let factor = *value.get_ref();
            let key = format!("{key}.balance_factor");
            if !(1.0..=100.0).contains(&factor) {
                let message =
                    format!("{factor} is out of range: expected 1.0 to 100.0 (e.g. 1.25)");
                self.report(&key, Some(value.span()), message);
                return None;
            }
            if matches!(
                strategy,
                Some(StrategyKind::RoundRobin | StrategyKind::LeastConnections)
            ) {
                let message = "balance_factor bounds hashed and sticky placement; it applies to \
                               `ip_hash` and `cookie` pools only"
                    .to_owned();
                self.report(&key, Some(value.span()), message);
                return None;
            }
            Some(factor)
        });

        let health = raw
            .health
            .as_ref()
            .map(|health| self.health(&format!("{key}.health"), health));
        let passive = raw
            .passive
            .as_ref()
            .map_or_else(PassiveConfig::default, |passive| {
                self.passive(&format!("{key}.passive"), passive)
            });

        PoolConfig {
            name: name.get_ref().clone(),
            // Only read when there are no errors, and then the strategy is known.
            strategy: strategy.unwrap_or(StrategyKind::RoundRobin),
            backends,
            discovery,
            cookie,
            trusted_proxies,
            drain_timeout,
            drain_sticky,
            retries,
            slow_start,
            health,
            passive,
            balance_factor,
            ca: raw.ca.as_ref().map(|ca| self.resolve(ca.get_ref())),
        }
    }

    /// A pool's `ca` file, read and checked; `Err` after reporting why it cannot be used.
    fn ca(&mut self, key: &str, raw: &Spanned<String>) -> Result<LoadedCa, ()> {
        let path = self
            .file_path(key, Some(raw), &raw.span(), "the PEM CA certificates")
            .ok_or(())?;
        match tls::load_ca(&path) {
            Ok((certificates, fingerprint)) => Ok(LoadedCa {
                path,
                certificates,
                fingerprint,
            }),
            Err(error) => {
                self.report(key, Some(raw.span()), error.to_string());
                Err(())
            }
        }
    }

    /// A backend has one connection pool, so every pool naming its address must speak to it the
    /// same way: plain or TLS, with the same host and `ca`.
    /// Two `cookie` pools a browser can reach on one host must name their cookies apart: the
    /// cookie is the host's (`Path=/`, no `Domain`), so each pool would take the other's for a
    /// forgery, and a client of both would be placed anew on every switch.
    fn one_cookie_per_name_and_host(
        &mut self,
        raw: &RawConfig,
        pools: &BTreeMap<String, PoolConfig>,
        routes: &[RouteConfig],
    ) {
        // The hosts routed to each cookie pool; `None` in the list is every host.
        let hosts = |name: &str| -> Vec<Option<String>> {
            routes
                .iter()
                .filter(|r| r.pool == name)
                .map(|r| r.host.as_ref().map(|h| h.to_ascii_lowercase()))
                .collect()
        };
        let shared = |a: &[Option<String>], b: &[Option<String>]| {
            a.iter()
                .any(|x| b.iter().any(|y| x.is_none() || y.is_none() || x == y))
        };
        let sticky: Vec<(&String, &CookieConfig)> = pools
            .iter()
            .filter(|(_, pool)| pool.strategy == StrategyKind::Cookie)
            .filter_map(|(name, pool)| Some((name, pool.cookie.as_ref()?)))
            .collect();
        for (i, (name, cookie)) in sticky.iter().enumerate() {
            let clash = sticky[..i].iter().find(|(other, theirs)| {
                theirs.name == cookie.name && shared(&hosts(other), &hosts(name))
            });
            let Some((other, _)) = clash else { continue };
            let message = format!(
                "cookie `{}` is also pool `{other}`'s, on a host both are routed from: a client of \
                 both would lose its place in one each time it used the other; give each pool its \
                 own cookie name",
                cookie.name
            );
            let span = raw
                .pools
                .iter()
                .find(|(k, _)| k.get_ref() == *name)
                .map(|(k, pool)| {
                    pool.cookie
                        .as_ref()
                        .and_then(|c| c.name.as_ref())
                        .map_or(k.span(), Spanned::span)
                });
            let key = format!("pools.{}.cookie.name", key_segment(name));
            self.report(&key, span, message);
        }
    }

    fn one_tls_setting_per_address(
        &mut self,
        raw: &RawConfig,
        pools: &BTreeMap<String, PoolConfig>,
    ) {
        let mut first: HashMap<SocketAddr, (&str, Option<&UpstreamTls>)> = HashMap::new();
        for (name, pool) in pools {
            for (i, backend) in pool.backends.iter().enumerate() {
                let tls = backend.tls.as_ref();
                match first.get(&backend.address) {
                    None => {
                        first.insert(backend.address, (name, tls));
                    }
                    Some((other, theirs)) if *theirs != tls => {
                        let message = format!(
                            "backend {} is also in pool `{other}`, which reaches it differently \
                             (plain or https, host, or ca); a backend has one connection pool, so \
                             they must be the same",
                            backend.address
                        );
                        let span = raw
                            .pools
                            .iter()
                            .find(|(k, _)| k.get_ref() == name)
                            .and_then(|(k, pool)| {
                                let raw_backend = pool.backends.as_ref()?.get_ref().get(i)?;
                                Some(
                                    raw_backend
                                        .get_ref()
                                        .address
                                        .as_ref()
                                        .map_or(k.span(), Spanned::span),
                                )
                            });
                        let key = format!("pools.{}.backends[{i}].address", key_segment(name));
                        self.report(&key, span, message);
                    }
                    Some(_) => {}
                }
            }
        }
    }

    /// Health is kept per backend address, so every pool that checks an address must check it the
    /// same way.
    fn one_health_check_per_address(
        &mut self,
        raw: &RawConfig,
        pools: &BTreeMap<String, PoolConfig>,
    ) {
        let mut checked: HashMap<SocketAddr, (&str, &HealthConfig)> = HashMap::new();
        for (name, pool) in pools {
            let Some(health) = &pool.health else { continue };
            for backend in &pool.backends {
                match checked.get(&backend.address) {
                    None => {
                        checked.insert(backend.address, (name, health));
                    }
                    Some((first, theirs)) if *theirs != health => {
                        let message = format!(
                            "backend {} is also in pool `{first}`, whose health check differs; \
                             a backend has one health state, so its checks must be the same",
                            backend.address
                        );
                        let span = raw
                            .pools
                            .keys()
                            .find(|k| k.get_ref() == name)
                            .map(|k| k.span());
                        let key = format!("pools.{}.health", key_segment(name));
                        self.report(&key, span, message);
                        break;
                    }
                    Some(_) => {}
                }
            }
        }
    }

    /// `[pools.NAME.discovery]`: one source and the keys that apply to it. Nothing is contacted
    /// here, so `check` and a reload work while the source is down. `None` after an error that
    /// leaves no source.
    fn discovery(
        &mut self,
        pool_key: &str,
        pool_name: &Spanned<String>,
        raw: &RawDiscovery,
        max_connections: Option<u32>,
    ) -> Option<DiscoveryConfig> {
        let key = format!("{pool_key}.discovery");
        // The table itself has no span; point at its first key, else at the pool.
        let anchor = [&raw.dns, &raw.dns_srv, &raw.resolver, &raw.interval]
            .into_iter()
            .flatten()
            .map(Spanned::span)
            .chain(raw.etcd.iter().flat_map(|etcd| {
                let endpoints = etcd.endpoints.as_ref().map(Spanned::span);
                let prefix = etcd.prefix.as_ref().map(Spanned::span);
                endpoints.into_iter().chain(prefix)
            }))
            .chain(raw.weight.as_ref().map(Spanned::span))
            .chain(raw.allow_empty.as_ref().map(Spanned::span))
            .min_by_key(|span| span.start)
            .unwrap_or_else(|| pool_name.span());
        let allow_empty = raw.allow_empty.as_ref().is_some_and(|b| *b.get_ref());

        let mut named: Vec<&str> = Vec::new();
        if raw.dns.is_some() {
            named.push("dns");
        }
        if raw.dns_srv.is_some() {
            named.push("dns_srv");
        }
        if raw.etcd.is_some() {
            named.push("etcd");
        }
        match named.as_slice() {
            [] => {
                let message =
                    "a discovery table needs one source: `dns`, `dns_srv` or `etcd`".to_owned();
                self.report(&key, Some(anchor), message);
                return None;
            }
            [_] => {}
            [first, second, ..] => {
                let message = format!(
                    "`{first}` and `{second}` are both set; a pool has one discovery source"
                );
                self.report(&format!("{key}.{second}"), Some(anchor), message);
                return None;
            }
        }

        if let Some(etcd) = &raw.etcd {
            // Keys that only DNS reads are mistakes next to etcd, not settings to ignore.
            for (name, span) in [
                ("resolver", raw.resolver.as_ref().map(Spanned::span)),
                ("interval", raw.interval.as_ref().map(Spanned::span)),
                ("weight", raw.weight.as_ref().map(Spanned::span)),
            ] {
                if let Some(span) = span {
                    let message = format!(
                        "`{name}` applies to DNS discovery; etcd is watched, and each key's value \
                         holds its backend's weight"
                    );
                    self.report(&format!("{key}.{name}"), Some(span), message);
                }
            }
            let etcd = self.etcd(&key, etcd, anchor)?;
            return Some(DiscoveryConfig {
                source: DiscoverySource::Etcd(etcd),
                allow_empty,
                max_connections,
            });
        }

        let resolver = raw.resolver.as_ref().and_then(|resolver| {
            let text = resolver.get_ref();
            let parsed = text.parse::<SocketAddr>().ok().or_else(|| {
                text.parse::<IpAddr>()
                    .ok()
                    .map(|ip| SocketAddr::new(ip, DNS_PORT))
            });
            if parsed.is_none() {
                let message = format!(
                    "`{text}` is not an IP or IP:port address of a DNS server (port 53 if left out)"
                );
                self.report(&format!("{key}.resolver"), Some(resolver.span()), message);
            }
            parsed
        });
        let interval = raw
            .interval
            .as_ref()
            .and_then(|value| self.duration(&format!("{key}.interval"), value))
            .unwrap_or(DEFAULT_DISCOVERY_INTERVAL);
        let query = if let Some(dns) = &raw.dns {
            let weight = raw.weight.as_ref().map_or(Some(DEFAULT_WEIGHT), |weight| {
                self.count(&format!("{key}.weight"), weight, 1, MAX_WEIGHT)
            });
            let address = self.dns_name_and_port(&format!("{key}.dns"), dns);
            let (name, port) = address?;
            DnsQuery::Address {
                name,
                port,
                weight: weight?,
            }
        } else {
            let srv = raw.dns_srv.as_ref()?;
            if let Some(weight) = &raw.weight {
                let message =
                    "`weight` applies to `dns`; SRV records carry their own weights".to_owned();
                self.report(&format!("{key}.weight"), Some(weight.span()), message);
            }
            let name = srv.get_ref().to_ascii_lowercase();
            if !is_dns_name(&name) {
                let message = format!(
                    "`{}` is not a DNS name; write the SRV name, e.g. \"_http._tcp.app.internal\"",
                    srv.get_ref()
                );
                self.report(&format!("{key}.dns_srv"), Some(srv.span()), message);
                return None;
            }
            DnsQuery::Srv { name }
        };
        Some(DiscoveryConfig {
            source: DiscoverySource::Dns(DnsDiscovery {
                query,
                resolver,
                interval,
            }),
            allow_empty,
            max_connections,
        })
    }

    /// `dns = "NAME:PORT"`.
    fn dns_name_and_port(&mut self, key: &str, raw: &Spanned<String>) -> Option<(String, u16)> {
        let text = raw.get_ref();
        let bad = |detail: &str| format!("`{text}` is not a NAME:PORT to resolve: {detail}");
        let Some((name, port)) = text.rsplit_once(':') else {
            let message = bad("the port is missing (e.g. \"app.internal:8080\")");
            self.report(key, Some(raw.span()), message);
            return None;
        };
        let port = match port.parse::<u16>() {
            Ok(port) if port != 0 => port,
            _ => {
                let message = bad("the port must be a number from 1 to 65535");
                self.report(key, Some(raw.span()), message);
                return None;
            }
        };
        let name = name.to_ascii_lowercase();
        if name.parse::<IpAddr>().is_ok() || name.starts_with('[') {
            let message = bad("an IP address needs no discovery; list it in `backends`");
            self.report(key, Some(raw.span()), message);
            return None;
        }
        if !is_dns_name(&name) {
            self.report(key, Some(raw.span()), bad("the name is not a DNS name"));
            return None;
        }
        Some((name, port))
    }

    /// `etcd = { endpoints, prefix }`. Builds without the `etcd` feature reject it: a pool that
    /// could never find a backend is a config error, not a silent empty pool.
    fn etcd(&mut self, key: &str, raw: &RawEtcd, anchor: Range<usize>) -> Option<EtcdDiscovery> {
        let key = format!("{key}.etcd");
        let mut endpoints = Vec::new();
        match &raw.endpoints {
            None => {
                let message = "`endpoints` is required: the etcd URLs, e.g. \
                               [\"http://127.0.0.1:2379\"]"
                    .to_owned();
                self.report(&format!("{key}.endpoints"), Some(anchor.clone()), message);
            }
            Some(list) if list.get_ref().is_empty() => {
                let message = "`endpoints` needs at least one etcd URL".to_owned();
                self.report(&format!("{key}.endpoints"), Some(list.span()), message);
            }
            Some(list) => {
                for (i, endpoint) in list.get_ref().iter().enumerate() {
                    let text = endpoint.get_ref();
                    let valid = text
                        .parse::<http::Uri>()
                        .ok()
                        .filter(|uri| uri.scheme_str() == Some("http"))
                        .filter(|uri| uri.port_u16().is_some())
                        .filter(|uri| uri.host().is_some_and(|h| !h.is_empty()))
                        .is_some_and(|uri| uri.path() == "/" && uri.query().is_none());
                    if valid {
                        endpoints.push(text.trim_end_matches('/').to_owned());
                    } else {
                        let message = format!(
                            "`{text}` is not an etcd endpoint: write http://HOST:PORT (TLS to etcd \
                             is not supported)"
                        );
                        let key = format!("{key}.endpoints[{i}]");
                        self.report(&key, Some(endpoint.span()), message);
                    }
                }
            }
        }
        let prefix = match &raw.prefix {
            None => {
                let message =
                    "`prefix` is required: the key prefix under which each key is one backend"
                        .to_owned();
                self.report(&format!("{key}.prefix"), Some(anchor.clone()), message);
                None
            }
            Some(prefix) if prefix.get_ref().is_empty() => {
                let message =
                    "`prefix` must not be empty: it would take every key in etcd".to_owned();
                self.report(&format!("{key}.prefix"), Some(prefix.span()), message);
                None
            }
            Some(prefix) => Some(prefix.get_ref().clone()),
        };
        if !cfg!(feature = "etcd") {
            let message = "this switchyard was built without etcd support; build it with \
                           `--features etcd`"
                .to_owned();
            self.report(&key, Some(anchor), message);
            return None;
        }
        Some(EtcdDiscovery {
            endpoints,
            prefix: prefix?,
        })
    }

    fn health(&mut self, key: &str, raw: &RawHealth) -> HealthConfig {
        let path = match &raw.path {
            None => "/".to_owned(),
            Some(path) => {
                let text = path.get_ref();
                let valid = text.starts_with('/')
                    && text
                        .parse::<http::uri::PathAndQuery>()
                        .is_ok_and(|p| p.as_str() == text);
                if !valid {
                    let message = format!(
                        "`{text}` is not a path: it must start with `/` and be a valid URI path"
                    );
                    self.report(&format!("{key}.path"), Some(path.span()), message);
                }
                text.clone()
            }
        };
        let host = raw.host.as_ref().map(|host| {
            let text = host.get_ref();
            if text.is_empty() || http::HeaderValue::from_str(text).is_err() {
                let message = format!("`{text}` cannot be a Host header");
                self.report(&format!("{key}.host"), Some(host.span()), message);
            }
            text.clone()
        });
        let mut duration = |name: &str, value: &Option<Spanned<String>>, default: Duration| {
            value
                .as_ref()
                .and_then(|value| self.duration(&format!("{key}.{name}"), value))
                .unwrap_or(default)
        };
        let interval = duration("interval", &raw.interval, Duration::from_secs(2));
        let timeout = duration("timeout", &raw.timeout, Duration::from_secs(1));
        let unhealthy_threshold = raw.unhealthy_threshold.as_ref().map_or(3, |value| {
            self.count(&format!("{key}.unhealthy_threshold"), value, 1, 100)
                .unwrap_or(3)
        });
        let healthy_threshold = raw.healthy_threshold.as_ref().map_or(2, |value| {
            self.count(&format!("{key}.healthy_threshold"), value, 1, 100)
                .unwrap_or(2)
        });
        let expected_status = match &raw.expected_status {
            None => vec![(200, 399)],
            Some(value) => match parse_status_ranges(value.get_ref()) {
                Ok(ranges) => ranges,
                Err(message) => {
                    self.report(
                        &format!("{key}.expected_status"),
                        Some(value.span()),
                        message,
                    );
                    vec![(200, 399)]
                }
            },
        };
        HealthConfig {
            path,
            host,
            interval,
            timeout,
            unhealthy_threshold,
            healthy_threshold,
            expected_status,
        }
    }

    fn passive(&mut self, key: &str, raw: &RawPassive) -> PassiveConfig {
        let defaults = PassiveConfig::default();
        let consecutive_failures =
            raw.consecutive_failures
                .as_ref()
                .map_or(defaults.consecutive_failures, |value| {
                    self.count(&format!("{key}.consecutive_failures"), value, 1, 1000)
                        .unwrap_or(defaults.consecutive_failures)
                });
        let ejection_time = raw
            .ejection_time
            .as_ref()
            .and_then(|value| self.duration(&format!("{key}.ejection_time"), value))
            .unwrap_or(defaults.ejection_time);
        let max_ejection_time = match &raw.max_ejection_time {
            None => defaults.max_ejection_time.max(ejection_time),
            Some(value) => {
                let parsed = self.duration(&format!("{key}.max_ejection_time"), value);
                if let Some(max) = parsed.filter(|max| *max < ejection_time) {
                    let message = format!(
                        "max_ejection_time ({}) is shorter than ejection_time ({})",
                        humantime::format_duration(max),
                        humantime::format_duration(ejection_time)
                    );
                    self.report(
                        &format!("{key}.max_ejection_time"),
                        Some(value.span()),
                        message,
                    );
                }
                parsed.unwrap_or(defaults.max_ejection_time)
            }
        };
        let max_ejected_percent =
            raw.max_ejected_percent
                .as_ref()
                .map_or(defaults.max_ejected_percent, |value| {
                    self.count(&format!("{key}.max_ejected_percent"), value, 0, 100)
                        .unwrap_or(defaults.max_ejected_percent)
                });
        PassiveConfig {
            enabled: raw.enabled.unwrap_or(defaults.enabled),
            consecutive_failures,
            ejection_time,
            max_ejection_time,
            max_ejected_percent,
        }
    }

    /// An integer within `min..=max`, or an error naming the bounds.
    fn count(&mut self, key: &str, raw: &Spanned<i64>, min: i64, max: i64) -> Option<u32> {
        self.bounded(key, raw, min, max)
            .and_then(|n| u32::try_from(n).ok())
    }

    fn backends(
        &mut self,
        pool_key: &str,
        name: &Spanned<String>,
        raw: Option<&Spanned<Vec<Spanned<RawBackend>>>>,
        default_max_connections: Option<u32>,
        ca: Option<&Result<LoadedCa, ()>>,
    ) -> Vec<BackendSpec> {
        let key = format!("{pool_key}.backends");
        // Built for the first https backend, shared by the others.
        let mut clients: Option<ClientConfigs> = None;
        let needed = format!(
            "a pool needs at least one backend, or a [{pool_key}.discovery] table to find them"
        );
        let Some(raw) = raw else {
            self.report(&key, Some(name.span()), needed);
            return Vec::new();
        };
        if raw.get_ref().is_empty() {
            self.report(&key, Some(raw.span()), needed);
        }
        let mut seen: HashMap<SocketAddr, usize> = HashMap::new();
        let mut backends = Vec::new();
        for (i, backend) in raw.get_ref().iter().enumerate() {
            let weight = match &backend.get_ref().weight {
                None => DEFAULT_WEIGHT,
                Some(weight) => {
                    let value = *weight.get_ref();
                    let problem = if value < 1 {
                        Some("weight must be at least 1".to_owned())
                    } else if value > MAX_WEIGHT {
                        Some(format!("weight must be at most {MAX_WEIGHT}"))
                    } else {
                        None
                    };
                    if let Some(message) = problem {
                        self.report(&format!("{key}[{i}].weight"), Some(weight.span()), message);
                    }
                    u32::try_from(value).unwrap_or(DEFAULT_WEIGHT)
                }
            };
            let address_key = format!("{key}[{i}].address");
            let Some(address) = &backend.get_ref().address else {
                let message = "`address` is required, as IP:port or https://HOST:port".to_owned();
                self.report(&address_key, Some(backend.span()), message);
                continue;
            };
            let Some((parsed, https)) = self.backend_address(&address_key, address) else {
                continue;
            };
            let tls = match (https, ca) {
                (None, _) => None,
                // The CA is unusable and was reported; there is nothing to verify against.
                (Some(_), Some(Err(()))) => None,
                (Some(target), ca) => {
                    let ca = ca.and_then(|ca| ca.as_ref().ok());
                    if clients.is_none() {
                        match tls::client_configs(ca.map(|ca| ca.certificates.as_slice())) {
                            Ok(built) => clients = Some(built),
                            Err(error) => {
                                let message =
                                    format!("cannot build a TLS client configuration: {error}");
                                self.report(&address_key, Some(address.span()), message);
                            }
                        }
                    }
                    clients.as_ref().map(|(client, client_http1)| {
                        UpstreamTls {
                            host: target.host,
                            server_name: target.server_name,
                            authority: target.authority,
                            ca: ca.map(|ca| ca.path.clone()),
                            ca_fingerprint: ca.map(|ca| ca.fingerprint),
                            client: Arc::clone(client),
                            client_http1: Arc::clone(client_http1),
                            id: 0,
                        }
                        .with_id()
                    })
                }
            };
            if let Some(first) = seen.get(&parsed) {
                let message = format!("address {parsed} is already backends[{first}] of this pool");
                self.report(&address_key, Some(address.span()), message);
            } else {
                seen.insert(parsed, i);
            }
            let max_connections = match &backend.get_ref().max_connections {
                None => default_max_connections,
                Some(value) => self.count(
                    &format!("{key}[{i}].max_connections"),
                    value,
                    1,
                    MAX_CONNECTIONS,
                ),
            };
            backends.push(BackendSpec {
                address: parsed,
                weight,
                max_connections,
                tls,
            });
        }
        backends
    }

    fn cookie(
        &mut self,
        pool_key: &str,
        pool_name: &Spanned<String>,
        raw: &RawCookie,
        required: bool,
    ) -> CookieConfig {
        let key = format!("{pool_key}.cookie");

        let name = match &raw.name {
            None => DEFAULT_COOKIE_NAME.to_owned(),
            Some(name) => {
                if !is_cookie_token(name.get_ref()) {
                    let message = format!(
                        "`{}` is not a valid cookie name: use ASCII letters, digits and \
                         !#$%&'*+-.^_`|~ (an RFC 6265 token)",
                        name.get_ref()
                    );
                    self.report(&format!("{key}.name"), Some(name.span()), message);
                }
                name.get_ref().clone()
            }
        };

        let generated = raw
            .secret
            .as_ref()
            .is_some_and(|s| *s.get_ref() == RawSecret::One(GENERATE.to_owned()));
        let secrets = match (&raw.secret, &raw.secret_env) {
            (Some(_), Some(env)) => {
                let message = "`secret` and `secret_env` are both set; keep one".to_owned();
                self.report(&format!("{key}.secret_env"), Some(env.span()), message);
                Vec::new()
            }
            (None, None) => {
                // The cookie table itself has no span; point at its first key, else at the pool.
                let anchor = [&raw.name, &raw.fallback, &raw.max_age]
                    .into_iter()
                    .flatten()
                    .map(|value| value.span())
                    .min_by_key(|span| span.start)
                    .unwrap_or_else(|| pool_name.span());
                let message = "a secret is required: set `secret` or `secret_env`, or \
                               `secret = \"generate\"` for a random one that lives as long as the \
                               process"
                    .to_owned();
                self.report(&format!("{key}.secret"), Some(anchor), message);
                Vec::new()
            }
            (Some(secret), None) if generated => self.generated_secret(&key, secret),
            (Some(secret), None) => self.literal_secrets(&format!("{key}.secret"), secret),
            (None, Some(env)) => self.env_secrets(&format!("{key}.secret_env"), env, required),
        };

        let fallback = match &raw.fallback {
            None => StrategyKind::RoundRobin,
            Some(fallback) => match StrategyKind::parse(fallback.get_ref()) {
                Some(StrategyKind::Cookie) => {
                    let message = format!(
                        "fallback cannot be `cookie`: it places clients that have no valid \
                         cookie; expected one of {FALLBACKS}"
                    );
                    self.report(&format!("{key}.fallback"), Some(fallback.span()), message);
                    StrategyKind::RoundRobin
                }
                Some(kind) => kind,
                None => {
                    let message = format!(
                        "unknown fallback `{}`; expected one of {FALLBACKS}",
                        fallback.get_ref()
                    );
                    self.report(&format!("{key}.fallback"), Some(fallback.span()), message);
                    StrategyKind::RoundRobin
                }
            },
        };

        let max_age = raw
            .max_age
            .as_ref()
            .and_then(|value| self.duration(&format!("{key}.max_age"), value));

        CookieConfig {
            name,
            secrets,
            generated,
            fallback,
            max_age,
            secure: raw.secure.unwrap_or(false),
        }
    }

    /// `secret = "generate"`: one random key, drawn from the operating system's CSPRNG (through
    /// rustls' provider, already linked for TLS).
    fn generated_secret(&mut self, key: &str, raw: &Spanned<RawSecret>) -> Vec<Secret> {
        let mut secret = vec![0u8; GENERATED_SECRET_BYTES];
        let random = rustls::crypto::ring::default_provider().secure_random;
        if random.fill(&mut secret).is_err() {
            let message = "cannot draw a random secret from the operating system".to_owned();
            self.report(&format!("{key}.secret"), Some(raw.span()), message);
            return Vec::new();
        }
        vec![Secret::new(secret)]
    }

    fn literal_secrets(&mut self, key: &str, raw: &Spanned<RawSecret>) -> Vec<Secret> {
        match raw.get_ref() {
            RawSecret::One(secret) => {
                self.check_secret_length(key, raw.span(), "secret", secret);
                vec![Secret::new(secret.as_bytes())]
            }
            RawSecret::Many(secrets) => {
                if secrets.is_empty() {
                    let message = "the secret list is empty; give at least one secret".to_owned();
                    self.report(key, Some(raw.span()), message);
                }
                for (i, secret) in secrets.iter().enumerate() {
                    let key = format!("{key}[{i}]");
                    self.check_secret_length(&key, secret.span(), "secret", secret.get_ref());
                }
                secrets
                    .iter()
                    .map(|secret| Secret::new(secret.get_ref().as_bytes()))
                    .collect()
            }
        }
    }

    fn env_secrets(&mut self, key: &str, var: &Spanned<String>, required: bool) -> Vec<Secret> {
        let name = var.get_ref();
        if name.is_empty() {
            let message = "secret_env must name an environment variable".to_owned();
            self.report(key, Some(var.span()), message);
            return Vec::new();
        }
        let value = (self.env)(name).unwrap_or_default();
        // Spaces after the commas are for legibility, not part of a secret.
        let secrets: Vec<&str> = value
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect();
        if secrets.is_empty() {
            // Only an error for `cookie`: switching a pool to another strategy and back should
            // be a one-word edit, not also a change to the environment.
            if required {
                let message = format!(
                    "environment variable `{name}` is unset or empty, and strategy `cookie` \
                     needs a secret"
                );
                self.report(key, Some(var.span()), message);
            }
            return Vec::new();
        }
        for (i, secret) in secrets.iter().enumerate() {
            let what = format!("secret {} of `{name}`", i + 1);
            self.check_secret_length(key, var.span(), &what, secret);
        }
        secrets.iter().map(|s| Secret::new(s.as_bytes())).collect()
    }

    /// Reports a secret that is too short, saying how long it is but never what it is.
    fn check_secret_length(&mut self, key: &str, span: Range<usize>, what: &str, secret: &str) {
        if secret.len() < MIN_SECRET_BYTES {
            let message = format!(
                "{what} is {} bytes; it must be at least {MIN_SECRET_BYTES}",
                secret.len()
            );
            self.report(key, Some(span), message);
        }
    }

    fn timeouts(&mut self, raw: Option<&RawTimeouts>) -> Timeouts {
        let mut timeouts = Timeouts::default();
        let Some(raw) = raw else {
            return timeouts;
        };
        let slots = [
            ("connect", &raw.connect, &mut timeouts.connect),
            (
                "response_header",
                &raw.response_header,
                &mut timeouts.response_header,
            ),
            (
                "client_header",
                &raw.client_header,
                &mut timeouts.client_header,
            ),
            ("idle", &raw.idle, &mut timeouts.idle),
            ("shutdown", &raw.shutdown, &mut timeouts.shutdown),
        ];
        for (name, value, slot) in slots {
            if let Some(value) = value {
                if let Some(duration) = self.duration(&format!("timeouts.{name}"), value) {
                    *slot = duration;
                }
            }
        }
        timeouts.upgraded_idle = raw
            .upgraded_idle
            .as_ref()
            .and_then(|value| self.duration("timeouts.upgraded_idle", value));
        timeouts
    }

    fn limits(&mut self, raw: Option<&RawLimits>) -> Limits {
        let mut limits = Limits::default();
        let Some(raw) = raw else {
            return limits;
        };
        if let Some(value) = &raw.max_header_bytes {
            let key = "limits.max_header_bytes";
            if let Some(n) = self.bounded(key, value, MIN_HEADER_BYTES, MAX_HEADER_BYTES) {
                limits.max_header_bytes = n as usize;
            }
        }
        if let Some(value) = &raw.max_headers {
            if let Some(n) = self.bounded("limits.max_headers", value, 1, MAX_HEADERS) {
                limits.max_headers = n as usize;
            }
        }
        if let Some(value) = &raw.max_body_bytes {
            limits.max_body_bytes = self.bounded("limits.max_body_bytes", value, 1, i64::MAX);
        }
        if let Some(value) = &raw.max_connections {
            let key = "limits.max_connections";
            if let Some(n) = self.bounded(key, value, 1, MAX_CONNECTIONS) {
                limits.max_connections = n as usize;
            }
        }
        limits
    }

    /// An integer within `min..=max` (`min` ≥ 0), or an error naming the bounds.
    fn bounded(&mut self, key: &str, raw: &Spanned<i64>, min: i64, max: i64) -> Option<u64> {
        let value = *raw.get_ref();
        if (min..=max).contains(&value) {
            u64::try_from(value).ok()
        } else {
            let message = format!("{value} is out of range: expected {min} to {max}");
            self.report(key, Some(raw.span()), message);
            None
        }
    }

    /// A backend's `address`: `IP:port` (or `http://IP:port`), or `https://HOST[:port]` (port
    /// 443 by default) where HOST is an IP address or a DNS name. A name is resolved here, once
    /// per load, and the backend is known by the first address it resolves to; HOST itself is
    /// kept for SNI and certificate verification.
    fn backend_address(
        &mut self,
        key: &str,
        raw: &Spanned<String>,
    ) -> Option<(SocketAddr, Option<HttpsTarget>)> {
        let text = raw.get_ref();
        let Some(rest) = text.strip_prefix("https://") else {
            let plain = text.strip_prefix("http://").unwrap_or(text);
            let plain = Spanned::new(raw.span(), plain.to_owned());
            let address = self.socket_addr(key, &plain)?;
            // A listener may take port 0 (any free port); nothing can be reached there.
            if address.port() == 0 {
                let message = format!("`{text}` has port 0, where no backend can listen");
                self.report(key, Some(raw.span()), message);
                return None;
            }
            return Some((address, None));
        };
        let bad = |detail: &str| format!("`{text}` is not an https://HOST:port address: {detail}");
        let (host, port) = match rest.rsplit_once(':') {
            // Not `[v6]` alone, whose colons are the address's own.
            Some((host, port)) if !rest.ends_with(']') => match port.parse::<u16>() {
                Ok(port) if port != 0 => (host, port),
                _ => {
                    self.report(
                        key,
                        Some(raw.span()),
                        bad("the port must be a number from 1 to 65535"),
                    );
                    return None;
                }
            },
            _ => (rest, 443),
        };
        let bracketed = host.strip_prefix('[').and_then(|h| h.strip_suffix(']'));
        if bracketed.is_none() && host.contains(':') {
            self.report(
                key,
                Some(raw.span()),
                bad("an IPv6 address goes in brackets"),
            );
            return None;
        }
        let unbracketed = bracketed.unwrap_or(host);
        if let Ok(ip) = unbracketed.parse::<IpAddr>() {
            let target = HttpsTarget::new(ip.to_string(), ServerName::IpAddress(ip.into()), port)?;
            return Some((SocketAddr::new(ip, port), Some(target)));
        }
        let host = host.to_ascii_lowercase();
        let server_name = match ServerName::try_from(host.clone()) {
            Ok(name @ ServerName::DnsName(_)) => name,
            _ => {
                let detail = format!(
                    "`{host}` is neither an IP address nor a DNS name (and \
                                      there is no path after the port)"
                );
                self.report(key, Some(raw.span()), bad(&detail));
                return None;
            }
        };
        let resolved = std::net::ToSocketAddrs::to_socket_addrs(&(host.as_str(), port))
            .map(|mut addresses| addresses.next());
        let address = match resolved {
            Ok(Some(address)) => address,
            Ok(None) => {
                let message = format!("`{host}` resolves to no address");
                self.report(key, Some(raw.span()), message);
                return None;
            }
            Err(error) => {
                let message = format!("cannot resolve `{host}`: {error}");
                self.report(key, Some(raw.span()), message);
                return None;
            }
        };
        let Some(target) = HttpsTarget::new(host.clone(), server_name, port) else {
            self.report(key, Some(raw.span()), bad("not a valid authority"));
            return None;
        };
        Some((address, Some(target)))
    }

    fn socket_addr(&mut self, key: &str, raw: &Spanned<String>) -> Option<SocketAddr> {
        match raw.get_ref().parse() {
            Ok(address) => Some(address),
            Err(_) => {
                let message = format!(
                    "`{}` is not an IP:port address (host names are not resolved)",
                    raw.get_ref()
                );
                self.report(key, Some(raw.span()), message);
                None
            }
        }
    }

    /// Parses a humantime duration; zero is rejected because every duration here bounds a wait,
    /// and so is one over [`MAX_DURATION`]: added to the current time, a large enough one
    /// overflows, which would panic at the reload that starts a drain or on every connection.
    fn duration(&mut self, key: &str, raw: &Spanned<String>) -> Option<Duration> {
        match humantime::parse_duration(raw.get_ref()) {
            Ok(duration) if duration.is_zero() => {
                let message = "duration must be greater than zero".to_owned();
                self.report(key, Some(raw.span()), message);
                None
            }
            Ok(duration) if duration > MAX_DURATION => {
                let message = format!(
                    "`{}` is too long: a duration may be at most 10 years",
                    raw.get_ref()
                );
                self.report(key, Some(raw.span()), message);
                None
            }
            Ok(duration) => Some(duration),
            Err(error) => {
                let message = format!(
                    "`{}` is not a duration ({error}); write e.g. \"250ms\", \"5s\", \"2m\", \"24h\"",
                    raw.get_ref()
                );
                self.report(key, Some(raw.span()), message);
                None
            }
        }
    }
}

/// Whether binding `a` and `b` at once fails: the same address, or the same port where one of them
/// is unspecified (`0.0.0.0` takes the port on every IPv4 address; `[::]`, dual-stack by default
/// on Linux, on every address of both families).
fn binds_over(a: SocketAddr, b: SocketAddr) -> bool {
    if a.port() != b.port() {
        return false;
    }
    let covers = |wide: SocketAddr, other: SocketAddr| {
        wide.ip().is_unspecified() && (wide.is_ipv6() || other.is_ipv4())
    };
    a == b || covers(a, b) || covers(b, a)
}

/// Parses `expected_status`: comma-separated statuses (`200`) or inclusive ranges (`200-399`).
fn parse_status_ranges(text: &str) -> Result<Vec<(u16, u16)>, String> {
    let bad = |part: &str| {
        format!(
            "`{part}` is not a status or a range of statuses (100 to 599); write e.g. \"200-399\" \
             or \"200,204\""
        )
    };
    let status = |part: &str| {
        part.trim()
            .parse::<u16>()
            .ok()
            .filter(|s| (100..=599).contains(s))
    };
    text.split(',')
        .map(|part| {
            let range = match part.split_once('-') {
                None => status(part).map(|s| (s, s)),
                Some((low, high)) => status(low).zip(status(high)).filter(|(l, h)| l <= h),
            };
            range.ok_or_else(|| bad(part.trim()))
        })
        .collect()
}

/// Turns toml's first error into a [`ConfigError`] that names the key it is about.
fn toml_error(text: &str, file: &Path, error: &toml::de::Error) -> ConfigError {
    let offset = error.span().map(|span| span.start);
    let mut key = offset
        .map(|offset| {
            header_at(text, offset)
                .or_else(|| locate(text, offset))
                .unwrap_or_else(|| scan_key(text, offset))
        })
        .unwrap_or_default();
    let mut message = describe(error.message());
    // toml cannot span a table that is only implied (`secret.value = …`), so where a spanned
    // value is expected it fails on the table's first key with this odd message.
    if message.ends_with("expected a borrowed string") {
        if let Some((parent, _)) = key.rsplit_once('.') {
            key = parent.to_owned();
        }
        message = "expected a value, found a table".to_owned();
    }
    let (line, column) = offset.map(|offset| line_col(text, offset)).unzip();
    ConfigError {
        file: file.to_path_buf(),
        line,
        column,
        key,
        message,
    }
}

/// Rewords serde's unknown-field message in the file's terms and keeps any message on one line.
fn describe(message: &str) -> String {
    if let Some((field, expected)) = message
        .strip_prefix("unknown field `")
        .and_then(|rest| rest.split_once('`'))
    {
        // serde quotes each expected field in backticks: ", expected `a` or `b`".
        let names: Vec<String> = expected
            .split('`')
            .skip(1)
            .step_by(2)
            .map(|name| format!("`{name}`"))
            .collect();
        return match names.as_slice() {
            [] => format!("unknown key `{field}`; this table takes no keys"),
            [one] => format!("unknown key `{field}`; expected {one}"),
            _ => format!(
                "unknown key `{field}`; expected one of {}",
                names.join(", ")
            ),
        };
    }
    let mut message = message
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .collect::<Vec<_>>()
        .join("; ");
    // serde names the Rust type it wanted; the reader knows tables and integers, not `RawPool`.
    if let Some(at) = message.find("expected struct Raw") {
        message.replace_range(at.., "expected a table");
    } else if let Some(stripped) = message.strip_suffix("expected i64") {
        message = format!("{stripped}expected an integer");
    }
    message
}

/// The dotted key at byte `offset` of a document that is valid TOML (but may not fit
/// [`RawConfig`]): the key or array element that starts last at or before `offset`. toml's errors
/// start at the offending key (unknown keys) or value (type errors), and a value follows its key.
fn locate(text: &str, offset: usize) -> Option<String> {
    let tree: Node = toml::from_str(text).ok()?;
    let mut marks = Vec::new();
    tree.marks("", &mut marks);
    marks
        .into_iter()
        .filter(|(span, _)| span.start <= offset)
        // On a tie the narrower span is the deeper, more precise one.
        .max_by(|(a, _), (b, _)| a.start.cmp(&b.start).then(b.len().cmp(&a.len())))
        .map(|(_, key)| key)
}

/// The table an error at `offset` is about when it points into a table header (`[pools.app]`
/// twice, `[listeners]` where `[[listeners]]` is meant): the header's own name, not the last key
/// before it. An array header's entry is numbered as [`scan_key`] numbers it.
/// An error about one part of a dotted header (`[pool.app]`: unknown `pool`) names that far.
fn header_at(text: &str, offset: usize) -> Option<String> {
    let offset = floor_char_boundary(text, offset);
    let line_start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
    let line_end = line_start
        + text[line_start..]
            .find('\n')
            .unwrap_or(text.len() - line_start);
    let line = &text[line_start..line_end];
    let indent = line.len() - line.trim_start().len();
    let brackets = line[indent..].bytes().take_while(|&b| b == b'[').count();
    if brackets == 0 {
        return None;
    }
    let name_start = line_start + indent + brackets;
    let name_end = line_start + line.find(']')?;
    let whole = || Some(table_before(&text[..line_end])).filter(|table| !table.is_empty());
    if offset < name_start || offset >= name_end {
        return whole();
    }
    match text[offset..name_end].find('.') {
        Some(dot) => Some(dotted(&text[name_start..offset + dot])),
        None => whole(),
    }
}

/// The table the last header in `text` opens (`pools.app`, `listeners[1]`), or empty.
fn table_before(text: &str) -> String {
    let mut table = String::new();
    let mut array_counts: HashMap<String, usize> = HashMap::new();
    for line in text.lines() {
        let line = line.trim_start();
        if let Some((name, _)) = line.strip_prefix("[[").and_then(|r| r.split_once("]]")) {
            let name = dotted(name);
            let count = array_counts.entry(name.clone()).or_default();
            table = format!("{name}[{count}]");
            *count += 1;
        } else if let Some((name, _)) = line.strip_prefix('[').and_then(|r| r.split_once(']')) {
            table = dotted(name);
        }
    }
    table
}

/// Best-effort key for a syntax error, when the document cannot be parsed at all: the last
/// table header before the error's line plus the key written on that line, if any.
fn scan_key(text: &str, offset: usize) -> String {
    let offset = floor_char_boundary(text, offset);
    let line_start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
    let table = table_before(&text[..line_start]);
    let key = text[line_start..]
        .lines()
        .next()
        .and_then(|line| line.split_once('='))
        .map(|(key, _)| dotted(key))
        .filter(|key| key.split('.').all(is_bare_key));
    match key {
        Some(key) if table.is_empty() => key,
        Some(key) => format!("{table}.{key}"),
        None => table,
    }
}

fn dotted(key: &str) -> String {
    key.split('.').map(str::trim).collect::<Vec<_>>().join(".")
}

/// 1-based line and column (in characters) of byte `offset`.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..floor_char_boundary(text, offset)];
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let line = before.matches('\n').count() + 1;
    (line, before[line_start..].chars().count() + 1)
}

fn floor_char_boundary(text: &str, offset: usize) -> usize {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    offset
}

/// Whether `key` can be written unquoted in TOML (and so is a valid pool name).
fn is_bare_key(key: &str) -> bool {
    !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// One segment of a dotted key, quoted when TOML would need quotes.
fn key_segment(key: &str) -> String {
    if is_bare_key(key) {
        key.to_owned()
    } else {
        format!("{key:?}")
    }
}

/// A DNS name as a resolver takes it: dot-separated labels of letters, digits, `-` and `_` (SRV
/// names start with `_`), 1 to 63 bytes each and 253 in all, with an optional final dot.
fn is_dns_name(name: &str) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            (1..=63).contains(&label.len())
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// RFC 6265 `cookie-name`, which is an RFC 2616 `token`.
fn is_cookie_token(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// A TOML document reduced to its shape and the spans of its keys and array elements, so that a
/// byte offset from toml's error can be turned into a dotted key.
enum Node {
    Table(Vec<(Spanned<String>, Node)>),
    // Only array elements are spanned: a table value may be implied by a dotted key or a deeper
    // header, and toml has no span to give one.
    Array(Vec<Spanned<Node>>),
    Leaf,
}

impl Node {
    fn marks(&self, path: &str, out: &mut Vec<(Range<usize>, String)>) {
        match self {
            Node::Table(entries) => {
                for (key, value) in entries {
                    let segment = key_segment(key.get_ref());
                    let path = if path.is_empty() {
                        segment
                    } else {
                        format!("{path}.{segment}")
                    };
                    out.push((key.span(), path.clone()));
                    value.marks(&path, out);
                }
            }
            Node::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    let path = format!("{path}[{i}]");
                    out.push((item.span(), path.clone()));
                    item.get_ref().marks(&path, out);
                }
            }
            Node::Leaf => {}
        }
    }
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(NodeVisitor)
    }
}

struct NodeVisitor;

impl<'de> Visitor<'de> for NodeVisitor {
    type Value = Node;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any TOML value")
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Node, E> {
        Ok(Node::Leaf)
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Node, E> {
        Ok(Node::Leaf)
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Node, E> {
        Ok(Node::Leaf)
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Node, E> {
        Ok(Node::Leaf)
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<Node, E> {
        Ok(Node::Leaf)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element::<Spanned<Node>>()? {
            items.push(item);
        }
        Ok(Node::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Node, A::Error> {
        let mut entries = Vec::new();
        loop {
            // toml hands a datetime over as a one-entry map whose key has no span; a datetime
            // is a leaf as far as keys are concerned.
            let Ok(key) = map.next_key::<Spanned<String>>() else {
                return Ok(Node::Leaf);
            };
            let Some(key) = key else {
                break;
            };
            entries.push((key, map.next_value::<Node>()?));
        }
        Ok(Node::Table(entries))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET_ENV: &str = "TEST_SWITCHYARD_SECRET";

    fn check(text: &str) -> Result<Config, ConfigErrors> {
        parse_with_env(text, Path::new("proxy.toml"), &|name| {
            (name == SECRET_ENV).then(|| "0123456789abcdef, fedcba9876543210".to_owned())
        })
    }

    /// Asserts that `text` is rejected with exactly one error, at `key` on `line`.
    #[track_caller]
    fn only_error(text: &str, key: &str, line: Option<usize>) -> ConfigError {
        let errors = check(text).expect_err("the config should be rejected");
        assert_eq!(errors.0.len(), 1, "expected one error, got:\n{errors}");
        let error = errors.0.into_iter().next().unwrap();
        assert_eq!(error.key, key, "{error}");
        assert_eq!(error.line, line, "{error}");
        let shown = error.to_string();
        assert!(shown.starts_with("proxy.toml"), "{shown}");
        assert!(shown.contains(&format!(": {key}: ")), "{shown}");
        error
    }

    const EXAMPLE: &str = r#"
log_format = "json"          # text | json

[admin]                      # optional
listen = "127.0.0.1:9901"
token = "0123456789abcdef-admin"

[[listeners]]                # at least one
listen = "127.0.0.1:8080"
redirect_https = true

[[routes]]                   # first match wins; both matchers optional
host = "API.example.com"     # exact Host match; must not contain a port; stored lower-cased
path_prefix = "/api"         # must start with "/"
pool = "app"                 # must name a pool that exists

[pools.app]
strategy = "round_robin"     # round_robin | least_connections | ip_hash | cookie (required)
backends = [                 # at least one; addresses unique within the pool
  { address = "127.0.0.1:9001", weight = 2, max_connections = 50 },
  { address = "127.0.0.1:9002" },
]
trusted_proxies = ["10.0.0.0/8", "127.0.0.1"]
drain_timeout = "45s"
drain_sticky = "move"
retries = 2
slow_start = "30s"
max_connections = 100

[pools.app.health]
path = "/healthz?full=1"
host = "app.internal"
interval = "5s"
timeout = "500ms"
unhealthy_threshold = 4
healthy_threshold = 3
expected_status = "200-299, 404"

[pools.app.passive]
enabled = true
consecutive_failures = 7
ejection_time = "20s"
max_ejection_time = "2m"
max_ejected_percent = 30

[pools.app.cookie]
name = "sy_affinity"
secret = ["0123456789abcdef0123", "fedcba9876543210"]
fallback = "least_connections"
max_age = "24h"
secure = true

[timeouts]
connect = "250ms"
response_header = "5s"
client_header = "2m"
idle = "24h"
shutdown = "1s"
upgraded_idle = "10m"

[limits]
max_header_bytes = 16384
max_headers = 50
max_body_bytes = 10485760
max_connections = 500
"#;

    #[test]
    fn example_parses() {
        let config = check(EXAMPLE).unwrap();
        assert_eq!(config.path, Path::new("proxy.toml"));
        assert_eq!(
            config.admin,
            Some(AdminConfig {
                listen: "127.0.0.1:9901".parse().unwrap(),
                token: Some(Secret::new(*b"0123456789abcdef-admin")),
            })
        );
        assert_eq!(config.log_format, LogFormat::Json);
        assert_eq!(
            config.listeners,
            [ListenerConfig {
                listen: "127.0.0.1:8080".parse().unwrap(),
                tls: None,
                redirect_https: true,
            }]
        );
        assert_eq!(
            config.routes,
            [RouteConfig {
                host: Some("api.example.com".to_owned()),
                path_prefix: Some("/api".to_owned()),
                pool: "app".to_owned(),
            }]
        );
        let pool = &config.pools["app"];
        assert_eq!(pool.name, "app");
        assert_eq!(pool.strategy, StrategyKind::RoundRobin);
        assert_eq!(
            pool.backends,
            [
                BackendSpec {
                    address: "127.0.0.1:9001".parse().unwrap(),
                    weight: 2,
                    max_connections: Some(50),
                    tls: None,
                },
                BackendSpec {
                    address: "127.0.0.1:9002".parse().unwrap(),
                    weight: 1,
                    max_connections: Some(100),
                    tls: None,
                },
            ]
        );
        assert_eq!(
            pool.trusted_proxies,
            [
                "10.0.0.0/8".parse::<IpNet>().unwrap(),
                "127.0.0.1/32".parse().unwrap()
            ]
        );
        assert_eq!(pool.drain_timeout, Duration::from_secs(45));
        assert_eq!(pool.drain_sticky, DrainSticky::Move);
        assert_eq!(pool.retries, 2);
        assert_eq!(pool.slow_start, Some(Duration::from_secs(30)));
        assert_eq!(
            pool.health,
            Some(HealthConfig {
                path: "/healthz?full=1".into(),
                host: Some("app.internal".into()),
                interval: Duration::from_secs(5),
                timeout: Duration::from_millis(500),
                unhealthy_threshold: 4,
                healthy_threshold: 3,
                expected_status: vec![(200, 299), (404, 404)],
            })
        );
        assert_eq!(
            pool.passive,
            PassiveConfig {
                enabled: true,
                consecutive_failures: 7,
                ejection_time: Duration::from_secs(20),
                max_ejection_time: Duration::from_secs(120),
                max_ejected_percent: 30,
            }
        );
        assert_eq!(
            pool.cookie,
            Some(CookieConfig {
                name: "sy_affinity".to_owned(),
                secrets: vec![
                    Secret::new(*b"0123456789abcdef0123"),
                    Secret::new(*b"fedcba9876543210")
                ],
                generated: false,
                fallback: StrategyKind::LeastConnections,
                max_age: Some(Duration::from_secs(24 * 3600)),
                secure: true,
            })
        );
        assert_eq!(
            config.timeouts,
            Timeouts {
                connect: Duration::from_millis(250),
                response_header: Duration::from_secs(5),
                client_header: Duration::from_secs(120),
                idle: Duration::from_secs(24 * 3600),
                shutdown: Duration::from_secs(1),
                upgraded_idle: Some(Duration::from_secs(600)),
            }
        );
        assert_eq!(
            config.limits,
            Limits {
                max_header_bytes: 16384,
                max_headers: 50,
                max_body_bytes: Some(10 * 1024 * 1024),
                max_connections: 500,
            }
        );
    }

    #[test]
    fn defaults_fill_every_optional_key() {
        let config = check(
            r#"
[[listeners]]
listen = "[::1]:8080"

[pools.app]
strategy = "cookie"
backends = [{ address = "[::1]:9001" }]

[pools.app.cookie]
secret = "0123456789abcdef"
"#,
        )
        .unwrap();
        assert_eq!(config.admin, None);
        assert_eq!(config.log_format, LogFormat::Text);
        assert!(config.routes.is_empty());
        assert_eq!(
            config.timeouts,
            Timeouts {
                connect: Duration::from_secs(2),
                response_header: Duration::from_secs(30),
                client_header: Duration::from_secs(10),
                idle: Duration::from_secs(60),
                shutdown: Duration::from_secs(30),
                upgraded_idle: None,
            }
        );
        assert_eq!(
            config.limits,
            Limits {
                max_header_bytes: 65536,
                max_headers: 100,
                max_body_bytes: None,
                max_connections: 10_000,
            }
        );
        let pool = &config.pools["app"];
        assert_eq!(pool.backends[0].weight, 1);
        assert!(pool.trusted_proxies.is_empty());
        assert_eq!(pool.drain_timeout, Duration::from_secs(30));
        assert_eq!(pool.drain_sticky, DrainSticky::Keep);
        assert_eq!(pool.retries, 1);
        assert_eq!(pool.slow_start, None);
        assert_eq!(pool.health, None);
        assert_eq!(pool.passive, PassiveConfig::default());
        assert_eq!(pool.backends[0].max_connections, None);
        assert_eq!(
            pool.cookie,
            Some(CookieConfig {
                name: "switchyard".to_owned(),
                secrets: vec![Secret::new(*b"0123456789abcdef")],
                generated: false,
                fallback: StrategyKind::RoundRobin,
                max_age: None,
                secure: false,
            })
        );
    }

    const ADMIN: &str = r#"
[[listeners]]
listen = "127.0.0.1:8080"

[pools.app]
strategy = "round_robin"
backends = [{ address = "127.0.0.1:9001" }]

[admin]
listen = "127.0.0.1:9901"
"#;

    #[test]
    fn admin_token_is_optional() {
        let admin = check(ADMIN).unwrap().admin.unwrap();
        assert_eq!(admin.token, None);
    }

    #[test]
    fn admin_token_env_is_read() {
        let config = parse_with_env(
            &format!("{ADMIN}token_env = \"ADMIN_TOKEN\"\n"),
            Path::new("proxy.toml"),
            &|name| (name == "ADMIN_TOKEN").then(|| "0123456789abcdef,fedcba".to_owned()),
        )
        .unwrap();
        // Unlike a cookie secret, the token is the whole value: a comma is not a separator.
        assert_eq!(
            config.admin.unwrap().token.as_ref().map(Secret::expose),
            Some(&b"0123456789abcdef,fedcba"[..])
        );
    }

    #[test]
    fn rejects_short_admin_token() {
        let error = only_error(
            &format!("{ADMIN}token = \"fifteen-bytes!!\"\n"),
            "admin.token",
            Some(11),
        );
        assert_eq!(error.message, "token is 15 bytes; it must be at least 16");
        assert!(check(&format!("{ADMIN}token = \"sixteen-bytes!!!\"\n")).is_ok());
    }

    #[test]
    fn rejects_admin_token_that_cannot_be_a_header() {
        let error = only_error(
            &format!("{ADMIN}token = \"sixteen bytes!!!\"\n"),
            "admin.token",
            Some(11),
        );
        assert!(error.message.contains("printable ASCII"), "{error}");
        only_error(
            &format!("{ADMIN}token = \"sixteen-bytes-\\u00e9\"\n"),
            "admin.token",
            Some(11),
        );
    }

    #[test]
    fn rejects_both_admin_token_keys() {
        let error = only_error(
            &format!("{ADMIN}token = \"0123456789abcdef\"\ntoken_env = \"{SECRET_ENV}\"\n"),
            "admin.token_env",
            Some(12),
        );
        assert!(error.message.contains("both set"), "{error}");
    }

    #[test]
    fn rejects_unset_empty_or_short_admin_token_env() {
        let error = only_error(
            &format!("{ADMIN}token_env = \"TEST_SWITCHYARD_UNSET\"\n"),
            "admin.token_env",
            Some(11),
        );
        assert_eq!(
            error.message,
            "environment variable `TEST_SWITCHYARD_UNSET` is unset or empty"
        );
        let with_env = |value: &'static str| {
            parse_with_env(
                &format!("{ADMIN}token_env = \"ADMIN_TOKEN\"\n"),
                Path::new("proxy.toml"),
                &move |name| (name == "ADMIN_TOKEN").then(|| value.to_owned()),
            )
            .unwrap_err()
            .0
        };
        let errors = with_env("");
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].key, "admin.token_env");
        assert!(
            errors[0].message.contains("unset or empty"),
            "{}",
            errors[0]
        );
        let errors = with_env("short");
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].key, "admin.token_env");
        // Says how long the token is, never what it is.
        assert_eq!(
            errors[0].message,
            "the token in `ADMIN_TOKEN` is 5 bytes; it must be at least 16"
        );
        only_error(
            &format!("{ADMIN}token_env = \"\"\n"),
            "admin.token_env",
            Some(11),
        );
    }

    #[test]
    fn admin_token_errors_are_reported_without_listen() {
        let text = ADMIN.replace("listen = \"127.0.0.1:9901\"\n", "token = \"short\"\n");
        let errors = check(&text).unwrap_err();
        let keys: Vec<&str> = errors.0.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(keys, ["admin.listen", "admin.token"]);
    }

    #[test]
    fn rejects_unknown_log_format() {
        let text = r#"log_format = "xml"

[[listeners]]
listen = "127.0.0.1:8080"

[pools.app]
strategy = "round_robin"
backends = [{ address = "127.0.0.1:9001" }]
"#;
        let error = only_error(text, "log_format", Some(1));
        assert_eq!(
            error.message,
            "unknown log_format `xml`; expected `text` or `json`"
        );
        let config = check(&text.replace("xml", "text")).unwrap();
        assert_eq!(config.log_format, LogFormat::Text);
    }

    #[test]
    fn display_is_file_line_column_key_message() {
        let text = r#"[[listeners]]
listen = "127.0.0.1:8080"

[pools.app]
strategy = "round_robin"
backends = [
  { address = "127.0.0.1:9001" },
  { address = "127.0.0.1:9002", weight = 0 },
]
"#;
        let error = only_error(text, "pools.app.backends[1].weight", Some(8));
        assert_eq!(
            error.to_string(),
            "proxy.toml:8:42: pools.app.backends[1].weight: weight must be at least 1"
        );
    }

    #[test]
    fn rejects_missing_listeners() {
        let pool = "[pools.app]\nstrategy = \"round_robin\"\nbackends = [{ address = \"127.0.0.1:9001\" }]\n";
        let error = only_error(pool, "listeners", None);
        assert_eq!(
            error.to_string(),
            "proxy.toml: listeners: at least one [[listeners]] entry is required"
        );
        only_error(&format!("listeners = []\n{pool}"), "listeners", Some(1));
    }

    #[test]
    fn rejects_unparsable_addresses() {
        let error = only_error(
            r#"
[admin]
listen = "localhost:9901"

[[listeners]]
listen = "127.0.0.1:8080"

[pools.app]
strategy = "round_robin"
backends = [{ address = "127.0.0.1:9001" }]
"#,
            "admin.listen",
            Some(3),
        );
        assert!(error.message.contains("`localhost:9901`"), "{error}");
        assert_eq!(error.column, Some(10));

        only_error(
            r#"
[[listeners]]
listen = "127.0.0.1"

[pools.app]
strategy = "round_robin"
backends = [{ address = "127.0.0.1:9001" }]
"#,
            "listeners[0].listen",
            Some(3),
        );

        only_error(
            r#"
[[listeners]]
listen = "127.0.0.1:8080"

[pools.app]
strategy = "round_robin"
backends = [
  { address = "127.0.0.1:9001" },
  { address = "backend.internal:9002" },
]
"#,
            "pools.app.backends[1].address",
            Some(9),
        );
    }

    #[test]
    fn rejects_duplicate_listener_addresses() {
        let error = only_error(
            r#"
[[listeners]]
listen = "127.0.0.1:8080"

[[listeners]]
listen = "127.0.0.1:8080"

[pools.app]
strategy = "round_robin"
backends = [{ address = "127.0.0.1:9001" }]
"#,
            "listeners[1].listen",
            Some(6),
        );
        assert!(error.message.contains("listeners[0].listen"), "{error}");

        let error = only_error(
            r#"
[admin]
listen = "127.0.0.1:8080"

[[listeners]]
listen = "127.0.0.1:8080"

[pools.app]
strategy = "round_robin"
backends = [{ address = "127.0.0.1:9001" }]
"#,
            "listeners[0].listen",
            Some(6),
        );
        assert!(error.message.contains("admin.listen"), "{error}");
    }

    #[test]
    fn port_zero_listeners_do_not_clash() {
        let config = check(
            r#"
[[listeners]]
listen = "127.0.0.1:0"

[[listeners]]
listen = "127.0.0.1:0"

[pools.app]
strategy = "round_robin"
backends = [{ address = "127.0.0.1:9001" }]
"#,
        )
        .unwrap();
        assert_eq!(config.listeners.len(), 2);
    }

    #[test]
    fn rejects_route_to_unknown_pool() {
        let error = only_error(
            r#"
[[listeners]]
listen = "127.0.0.1:8080"

[[routes]]
pool = "app"

[[routes]]
path_prefix = "/"
pool = "web"

[pools.app]
strategy = "round_robin"
backends = [{ address = "127.0.0.1:9001" }]
"#,
            "routes[1].pool",
            Some(10),
        );
        assert!(error.message.contains("`web`"), "{error}");
    }

    #[test]
    fn rejects_route_host_with_port_or_empty() {
        let with_port = r#"
[[listeners]]
listen = "127.0.0.1:8080"

[[routes]]
host = "api.example.com:8080"
pool = "app"

[pools.app]
strategy = "round_robin"
backends = [{ address = "127.0.0.1:9001" }]
"#;
        let error = only_error(with_port, "routes[0].host", Some(6));
        assert!(error.message.contains("port"), "{error}");
        only_error(
            &with_port.replace("api.example.com:8080", "[::1]:8080"),
            "routes[0].host",
            Some(6),
        );
        only_error(
            &with_port.replace("api.example.com:8080", ""),
            "routes[0].host",
            Some(6),
        );
        let config = check(&with_port.replace("api.example.com:8080", "[::1]")).unwrap();
        assert_eq!(config.routes[0].host.as_deref(), Some("[::1]"));
    }

    #[test]
    fn rejects_path_prefix_without_slash() {
        only_error(
            r#"
[[listeners]]
listen = "127.0.0.1:8080"

[[routes]]
path_prefix = "api"
pool = "app"

[pools.app]
strategy = "round_robin"
backends = [{ address = "127.0.0.1:9001" }]
"#,
            "routes[0].path_prefix",
            Some(6),
        );
    }

    #[test]
    fn rejects_pool_without_backends() {
        only_error(
            r#"
[[listeners]]
listen = "127.0.0.1:8080"

[pools.app]
strategy = "round_robin"
backends = []
"#,
            "pools.app.backends",
            Some(7),
        );
        only_error(
            r#"
[[listeners]]
listen = "127.0.0.1:8080"

[pools.app]
strategy = "round_robin"
"#,
            "pools.app.backends",
            Some(5),
        );
    }

    #[test]
    fn rejects_duplicate_backend_address() {
        let error = only_error(
            r#"
[[listeners]]
listen = "127.0.0.1:8080"

[pools.app]
strategy = "round_robin"
backends = [
  { address = "127.0.0.1:9001" },
  { address = "127.0.0.1:9002" },
  { address = "127.0.0.1:9001", weight = 3 },
]

[pools.other]
strategy = "round_robin"
backends = [{ address = "127.0.0.1:9001" }]
"#,
            "pools.app.backends[2].address",
            Some(10),
        );
        assert!(error.message.contains("backends[0]"), "{error}");
    }

    #[test]
    fn rejects_weight_out_of_range() {
        let text = r#"
[[listeners]]
listen = "127.0.0.1:8080"

[pools.app]
strategy = "round_robin"
backends = [{ address = "127.0.0.1:9001", weight = 1001 }]
"#;
        let error = only_error(text, "pools.app.backends[0].weight", Some(7));
        assert_eq!(error.message, "weight must be at most 1000");
        assert!(check(&text.replace("1001", "1000")).is_ok());
        let error = only_error(
            &text.replace("1001", "-1"),
            "pools.app.backends[0].weight",
            Some(7),
        );
        assert_eq!(error.message, "weight must be at least 1");
    }

    #[test]
    fn rejects_unknown_strategy() {
        let error = only_error(
            r#"
[[listeners]]
listen = "127.0.0.1:8080"

[pools.app]
strategy = "random"
backends = [{ address = "127.0.0.1:9001" }]
"#,
            "pools.app.strategy",
            Some(6),
        );
        assert_eq!(
            error.message,
            "unknown strategy `random`; expected one of `round_robin`, `least_connections`, \
             `ip_hash`, `cookie`"
        );
    }

    #[test]
    fn rejects_bad_health_keys_all_at_once() {
        let errors = check(
            r#"
[[listeners]]
listen = "127.0.0.1:8080"

[pools.app]
strategy = "round_robin"
backends = [{ address = "127.0.0.1:9001", max_connections = 0 }]
retries = -1

[pools.app.health]
path = "healthz"
interval = "soon"
unhealthy_threshold = 0
expected_status = "200-99"

[pools.app.passive]
ejection_time = "30s"
max_ejection_time = "10s"
max_ejected_percent = 101
"#,
        )
        .expect_err("rejected");
        let keys: Vec<(&str, Option<usize>)> =
            errors.0.iter().map(|e| (e.key.as_str(), e.line)).collect();
        assert_eq!(
            keys,
            [
                ("pools.app.backends[0].max_connections", Some(7)),
                ("pools.app.retries", Some(8)),
                ("pools.app.health.path", Some(11)),
                ("pools.app.health.interval", Some(12)),
                ("pools.app.health.unhealthy_threshold", Some(13)),
                ("pools.app.health.expected_status", Some(14)),
                ("pools.app.passive.max_ejection_time", Some(18)),
                ("pools.app.passive.max_ejected_percent", Some(19)),
            ],
            "{errors}"
        );
        let shown = errors.to_string();
        assert!(
            shown.contains("-1 is out of range: expected 0 to 10"),
            "{shown}"
        );
        assert!(
            shown.contains("max_ejection_time (10s) is shorter than ejection_time (30s)"),
            "{shown}"
        );
    }

    #[test]
    fn balance_factor_is_for_hashed_and_sticky_pools_and_at_least_one() {
        let pool = |strategy: &str, factor: &str| {
            format!(
                "[[listeners]]\nlisten = \"127.0.0.1:8080\"\n[pools.app]\nstrategy = \"{strategy}\"\n\
                 backends = [{{ address = \"127.0.0.1:9001\" }}]\nbalance_factor = {factor}\n\
                 [pools.app.cookie]\nsecret = \"0123456789abcdef\"\n"
            )
        };
        let config = check(&pool("ip_hash", "1.25")).unwrap();
        assert_eq!(config.pools["app"].balance_factor, Some(1.25));
        assert_eq!(
            check(&pool("cookie", "2")).unwrap().pools["app"].balance_factor,
            Some(2.0)
        );
        only_error(
            &pool("round_robin", "1.25"),
            "pools.app.balance_factor",
            Some(6),
        );
        let error = only_error(&pool("ip_hash", "0.9"), "pools.app.balance_factor", Some(6));
        assert!(error.message.contains("expected 1.0 to 100.0"), "{error}");
    }

    #[test]
    fn rejects_slow_start_with_ip_hash_placement() {
        let error = only_error(
            r#"
[[listeners]]
listen = "127.0.0.1:8080"

[pools.app]
strategy = "cookie"
backends = [{ address = "127.0.0.1:9001" }]
slow_start = "30s"

[pools.app.cookie]
secret = "0123456789abcdef"
fallback = "ip_hash"
"#,
            "pools.app.slow_start",
            Some(8),
        );
        assert!(error.message.contains("ip_hash"), "{error}");
    }

    #[test]
    fn rejects_two_health_checks_for_one_address() {
        let text = r#"
[[listeners]]
listen = "127.0.0.1:8080"

[pools.a]
strategy = "round_robin"
backends = [{ address = "127.0.0.1:9001" }]
[pools.a.health]
path = "/a"

[pools.b]
strategy = "round_robin"
backends = [{ address = "127.0.0.1:9001" }]
[pools.b.health]
path = "/b"
"#;
        let error = only_error(text, "pools.b.health", Some(11));
        assert!(error.message.contains("pool `a`"), "{error}");
        // The same check in both pools is fine.
        check(&text.replace("\"/b\"", "\"/a\"")).expect("same check twice");
    }

    #[test]
    fn expected_status_takes_lists_and_ranges() {
        assert_eq!(
            parse_status_ranges("200, 204,300-308"),
            Ok(vec![(200, 200), (204, 204), (300, 308)])
        );
        for bad in ["", "2xx", "99", "600", "300-200", "200-"] {
            assert!(parse_status_ranges(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn rejects_missing_strategy() {
        only_error(
            r#"
[[listeners]]
listen = "127.0.0.1:8080"

[pools.app]
backends = [{ address = "127.0.0.1:9001" }]
"#,
            "pools.app.strategy",
            Some(5),
        );
    }

    #[test]
    fn rejects_cookie_strategy_without_cookie_table() {
        only_error(
            r#"
[[listeners]]
listen = "127.0.0.1:8080"

[pools.app]
backends = [{ address = "127.0.0.1:9001" }]
strategy = "cookie"
"#,
            "pools.app.cookie",
            Some(7),
        );
    }

    const COOKIE_POOL: &str = r#"
[[listeners]]
listen = "127.0.0.1:8080"

[pools.app]
strategy = "cookie"
backends = [{ address = "127.0.0.1:9001" }]

[pools.app.cookie]
"#;

    #[test]
    fn rejects_short_secrets() {
        let error = only_error(
            &format!("{COOKIE_POOL}secret = \"fifteen-bytes!!\"\n"),
            "pools.app.cookie.secret",
            Some(10),
        );
        assert_eq!(error.message, "secret is 15 bytes; it must be at least 16");
        only_error(
            &format!("{COOKIE_POOL}secret = [\n  \"0123456789abcdef\",\n  \"short\",\n]\n"),
            "pools.app.cookie.secret[1]",
            Some(12),
        );
        only_error(
            &format!("{COOKIE_POOL}secret = []\n"),
            "pools.app.cookie.secret",
            Some(10),
        );
    }

    #[test]
    fn rejects_both_or_neither_secret_sources() {
        only_error(
            &format!("{COOKIE_POOL}secret = \"0123456789abcdef\"\nsecret_env = \"{SECRET_ENV}\"\n"),
            "pools.app.cookie.secret_env",
            Some(11),
        );
        only_error(
            &format!("{COOKIE_POOL}secure = true\nname = \"sy\"\n"),
            "pools.app.cookie.secret",
            Some(11),
        );
        only_error(COOKIE_POOL, "pools.app.cookie.secret", Some(5));
    }

    #[test]
    fn generate_draws_a_random_secret_and_a_reload_keeps_it() {
        let text = format!("{COOKIE_POOL}secret = \"generate\"\n");
        let first = check(&text).unwrap();
        let cookie = first.pools["app"].cookie.as_ref().unwrap();
        assert!(cookie.generated);
        assert_eq!(cookie.secrets.len(), 1);
        assert_eq!(cookie.secrets[0].expose().len(), 32);
        assert_eq!(first.generated_secrets(), ["app"]);
        // Each load draws its own key...
        let mut second = check(&text).unwrap();
        assert_ne!(second.pools["app"].cookie, first.pools["app"].cookie);
        // ...and a reload that still says "generate" keeps the running one.
        assert!(second.keep_generated_secrets(&first).is_empty());
        assert_eq!(second.pools["app"].cookie, first.pools["app"].cookie);
        // One that had a literal secret before starts a new key, and says so.
        let literal = check(&format!("{COOKIE_POOL}secret = \"0123456789abcdef\"\n")).unwrap();
        let mut third = check(&text).unwrap();
        assert_eq!(third.keep_generated_secrets(&literal), ["app"]);
        // "generate" in a list is no keyword: it is a secret, and too short.
        only_error(
            &format!("{COOKIE_POOL}secret = [\"generate\"]\n"),
            "pools.app.cookie.secret[0]",
            Some(10),
        );
    }

    #[test]
    fn secrets_are_redacted_in_debug_and_never_echoed_in_errors() {
        let config = check(&format!("{ADMIN}token = \"admin-token-SEEKRIT-0001\"\n")).unwrap();
        assert!(!format!("{config:?}").contains("SEEKRIT"));
        let text = format!("{COOKIE_POOL}secret = \"cookie-SEEKRIT-02\"\nmax_age = \"soon\"\n");
        let config = check(&text.replace("max_age = \"soon\"\n", "")).unwrap();
        assert!(!format!("{config:?}").contains("SEEKRIT"), "{config:?}");
        // Errors about secrets, and next to them, give lengths and names, never values.
        let too_short = [
            format!("{COOKIE_POOL}secret = \"SEEKRIT\"\n"),
            format!("{COOKIE_POOL}secret = [\"0123456789abcdef\", \"SEEKRIT\"]\n"),
            format!("{ADMIN}token = \"SEEKRIT\"\n"),
            format!("{ADMIN}token = \"SEEKRIT SEEKRIT SEEKRIT\"\n"),
            format!("{ADMIN}token = \"SEEKRIT-0123456789\"\ntoken_env = \"X\"\n"),
            format!("{COOKIE_POOL}secret = \"SEEKRIT-0123456789\"\nsecret_env = \"X\"\n"),
            text,
        ];
        for text in too_short {
            let errors = check(&text).expect_err(&text);
            assert!(!errors.to_string().contains("SEEKRIT"), "{errors}");
            assert!(!format!("{errors:?}").contains("SEEKRIT"), "{errors:?}");
        }
    }

    #[test]
    fn limits_are_checked_with_their_keys() {
        let base = "[[listeners]]\nlisten = \"127.0.0.1:8080\"\n\n[limits]\n";
        let cases = [
            ("max_header_bytes = 1023", "limits.max_header_bytes"),
            ("max_header_bytes = 2000000", "limits.max_header_bytes"),
            ("max_headers = 0", "limits.max_headers"),
            ("max_body_bytes = 0", "limits.max_body_bytes"),
            ("max_body_bytes = -5", "limits.max_body_bytes"),
            ("max_connections = 0", "limits.max_connections"),
        ];
        for (line, key) in cases {
            let error = only_error(&format!("{base}{line}\n"), key, Some(5));
            assert!(error.message.contains("out of range"), "{error}");
        }
        let error = only_error(&format!("{base}max_body = 5\n"), "limits.max_body", Some(5));
        assert!(error.message.contains("unknown key"), "{error}");
    }

    #[test]
    fn secret_env_is_read_and_split() {
        let config = check(&format!("{COOKIE_POOL}secret_env = \"{SECRET_ENV}\"\n")).unwrap();
        let cookie = config.pools["app"].cookie.as_ref().unwrap();
        assert_eq!(
            cookie.secrets,
            [
                Secret::new(*b"0123456789abcdef"),
                Secret::new(*b"fedcba9876543210")
            ]
        );
    }

    #[test]
    fn unset_secret_env_is_an_error_only_for_cookie_strategy() {
        let text = format!("{COOKIE_POOL}secret_env = \"TEST_SWITCHYARD_UNSET\"\n");
        let error = only_error(&text, "pools.app.cookie.secret_env", Some(10));
        assert!(error.message.contains("TEST_SWITCHYARD_UNSET"), "{error}");

        let config = check(&text.replace("\"cookie\"", "\"ip_hash\"")).unwrap();
        let pool = &config.pools["app"];
        assert_eq!(pool.strategy, StrategyKind::IpHash);
        assert!(pool.cookie.as_ref().unwrap().secrets.is_empty());
    }

    #[test]
    fn rejects_bad_fallback() {
        let text = format!("{COOKIE_POOL}secret = \"0123456789abcdef\"\nfallback = \"cookie\"\n");
        let error = only_error(&text, "pools.app.cookie.fallback", Some(11));
        assert!(error.message.contains("cannot be `cookie`"), "{error}");
        let error = only_error(
            &text.replace("fallback = \"cookie\"", "fallback = \"fastest\""),
            "pools.app.cookie.fallback",
            Some(11),
        );
        assert!(
            error.message.contains("unknown fallback `fastest`"),
            "{error}"
        );
    }

    #[test]
    fn rejects_bad_cookie_name() {
        let text = format!("{COOKIE_POOL}secret = \"0123456789abcdef\"\nname = \"my cookie\"\n");
        only_error(&text, "pools.app.cookie.name", Some(11));
        only_error(
            &text.replace("my cookie", "a=b"),
            "pools.app.cookie.name",
            Some(11),
        );
        only_error(
            &text.replace("my cookie", ""),
            "pools.app.cookie.name",
            Some(11),
        );
        assert!(check(&text.replace("my cookie", "__Host-sy.id")).is_ok());
    }

    #[test]
    fn rejects_bad_durations() {
        let pool = r#"
[[listeners]]
listen = "127.0.0.1:8080"

[pools.app]
strategy = "round_robin"
backends = [{ address = "127.0.0.1:9001" }]
"#;
        let error = only_error(
            &format!("{pool}drain_timeout = \"soon\"\n"),
            "pools.app.drain_timeout",
            Some(8),
        );
        assert!(
            error.message.contains("`soon` is not a duration"),
            "{error}"
        );
        let error = only_error(
            &format!("{pool}drain_timeout = \"0s\"\n"),
            "pools.app.drain_timeout",
            Some(8),
        );
        assert_eq!(error.message, "duration must be greater than zero");
        only_error(
            &format!(
                "{pool}[pools.app.cookie]\nsecret = \"0123456789abcdef\"\nmax_age = \"0ms\"\n"
            ),
            "pools.app.cookie.max_age",
            Some(10),
        );
        // Added to the current time, these would overflow (a panic at the reload that starts a
        // drain); as a cookie's Max-Age, the largest would turn negative.
        for (key, text, line) in [
            (
                "pools.app.drain_timeout",
                "drain_timeout = \"18446744073709551615s\"\n",
                8,
            ),
            ("pools.app.drain_timeout", "drain_timeout = \"11y\"\n", 8),
            (
                "timeouts.client_header",
                "[timeouts]\nclient_header = \"300000000000y\"\n",
                9,
            ),
        ] {
            let error = only_error(&format!("{pool}{text}"), key, Some(line));
            assert!(error.message.contains("at most 10 years"), "{error}");
        }
        assert!(check(&format!("{pool}drain_timeout = \"10y\"\n")).is_ok());
        for (i, name) in [
            "connect",
            "response_header",
            "client_header",
            "idle",
            "shutdown",
        ]
        .into_iter()
        .enumerate()
        {
            let mut timeouts = String::from("[timeouts]\n");
            for (j, other) in [
                "connect",
                "response_header",
                "client_header",
                "idle",
                "shutdown",
            ]
            .into_iter()
            .enumerate()
            {
                let value = if i == j { "5 parsecs" } else { "1s" };
                timeouts.push_str(&format!("{other} = \"{value}\"\n"));
            }
            only_error(
                &format!("{pool}{timeouts}"),
                &format!("timeouts.{name}"),
                Some(9 + i),
            );
        }
    }

    #[test]
    fn rejects_bad_cidr() {
        let error = only_error(
            r#"
[[listeners]]
listen = "127.0.0.1:8080"

[pools.app]
strategy = "ip_hash"
backends = [{ address = "127.0.0.1:9001" }]
trusted_proxies = [
  "10.0.0.0/8",
  "10.0.0.0/33",
]
"#,
            "pools.app.trusted_proxies[1]",
            Some(10),
        );
        assert!(error.message.contains("`10.0.0.0/33`"), "{error}");
    }

    #[test]
    fn rejects_bad_drain_sticky() {
        only_error(
            r#"
[[listeners]]
listen = "127.0.0.1:8080"

[pools.app]
strategy = "round_robin"
backends = [{ address = "127.0.0.1:9001" }]
drain_sticky = "stay"
"#,
            "pools.app.drain_sticky",
            Some(8),
        );
    }

    #[test]
    fn rejects_bad_pool_names() {
        let text = r#"
[[listeners]]
listen = "127.0.0.1:8080"

[pools."my pool"]
strategy = "round_robin"
backends = [{ address = "127.0.0.1:9001" }]
"#;
        only_error(text, "pools.\"my pool\"", Some(5));
        only_error(&text.replace("my pool", ""), "pools.\"\"", Some(5));
    }

    #[test]
    fn reports_every_error_at_once() {
        let errors = check(
            r#"
[[routes]]
pool = "missing"

[pools.app]
strategy = "round_robin"
backends = [{ address = "127.0.0.1:9001", weight = 0 }]
drain_timeout = "forever"

[pools.bad]
strategy = "sticky"
backends = []

[timeouts]
idle = "0s"
"#,
        )
        .unwrap_err();
        let found: Vec<(&str, Option<usize>)> =
            errors.0.iter().map(|e| (e.key.as_str(), e.line)).collect();
        assert_eq!(
            found,
            [
                ("listeners", None),
                ("routes[0].pool", Some(3)),
                ("pools.app.backends[0].weight", Some(7)),
                ("pools.app.drain_timeout", Some(8)),
                ("pools.bad.strategy", Some(11)),
                ("pools.bad.backends", Some(12)),
                ("timeouts.idle", Some(15)),
            ]
        );
        assert_eq!(errors.to_string().lines().count(), 7);
    }

    #[test]
    fn unknown_keys_name_their_full_path() {
        let error = only_error(
            r#"
[[listeners]]
listen = "127.0.0.1:8080"

[pools.app]
strategy = "round_robin"
backends = [
  { address = "127.0.0.1:9001" },
  { address = "127.0.0.1:9002", wieght = 2 },
]
"#,
            "pools.app.backends[1].wieght",
            Some(9),
        );
        assert_eq!(error.column, Some(33));
        assert_eq!(
            error.message,
            "unknown key `wieght`; expected one of `address`, `weight`, `max_connections`"
        );

        let error = only_error(
            r#"
[[listeners]]
listen = "127.0.0.1:8080"

[[listeners]]
address = "127.0.0.1:8081"
"#,
            "listeners[1].address",
            Some(6),
        );
        assert_eq!(
            error.message,
            "unknown key `address`; expected one of `listen`, `tls`, `certificates`, \
             `redirect_https`"
        );

        only_error(
            "[timeouts]\nconnect = \"1s\"\nconect = \"1s\"\n",
            "timeouts.conect",
            Some(3),
        );
        only_error("[pool.app]\nstrategy = \"ip_hash\"\n", "pool", Some(1));
        let error = only_error(
            "[pools.app.cookie]\nsecret.value = \"0123456789abcdef\"\n",
            "pools.app.cookie.secret",
            Some(2),
        );
        assert_eq!(error.message, "expected a value, found a table");
    }

    #[test]
    fn type_and_syntax_errors_name_their_key() {
        let error = only_error(
            "[[listeners]]\nlisten = \"127.0.0.1:8080\"\n\n[pools.app]\nstrategy = \"ip_hash\"\n\
             backends = [{ address = \"127.0.0.1:9001\", weight = \"2\" }]\n",
            "pools.app.backends[0].weight",
            Some(6),
        );
        assert_eq!(
            error.message,
            "invalid type: string \"2\", expected an integer"
        );

        let error = only_error(
            "listeners = [{ listen = \"127.0.0.1:8080\" }, 5]\n",
            "listeners[1]",
            Some(1),
        );
        assert_eq!(error.message, "invalid type: integer `5`, expected a table");

        only_error(
            "[pools.app]\nstrategy = \"ip_hash\"\ndrain_timeout = 1979-05-27\n",
            "pools.app.drain_timeout",
            Some(3),
        );

        let error = only_error(
            "[[listeners]]\nlisten = \"127.0.0.1:8080\"\n[[listeners]]\nlisten = \n",
            "listeners[1].listen",
            Some(4),
        );
        assert!(!error.message.contains('\n'), "{error}");
    }

    /// Writes a self-signed certificate for `names` and its key into `dir` as `{stem}.crt` and
    /// `{stem}.key`.
    fn write_cert(dir: &Path, stem: &str, names: &[&str]) {
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let certified = rcgen::generate_simple_self_signed(names).unwrap();
        std::fs::write(dir.join(format!("{stem}.crt")), certified.cert.pem()).unwrap();
        std::fs::write(
            dir.join(format!("{stem}.key")),
            certified.signing_key.serialize_pem(),
        )
        .unwrap();
    }

    /// Checks `text` as if it were `dir/proxy.toml`, so relative paths resolve into `dir`.
    fn check_in(dir: &Path, text: &str) -> Result<Config, ConfigErrors> {
        parse_with_env(text, &dir.join("proxy.toml"), &|_| None)
    }

    /// The one error of `text` checked in `dir`, asserted to be at `key` on `line`.
    #[track_caller]
    fn only_error_in(dir: &Path, text: &str, key: &str, line: usize) -> ConfigError {
        let errors = check_in(dir, text).expect_err("the config should be rejected");
        assert_eq!(errors.0.len(), 1, "expected one error, got:\n{errors}");
        let error = errors.0.into_iter().next().unwrap();
        assert_eq!(
            (error.key.as_str(), error.line),
            (key, Some(line)),
            "{error}"
        );
        error
    }

    const POOL: &str = r#"
[pools.app]
strategy = "round_robin"
backends = [{ address = "127.0.0.1:9001" }]
"#;

    #[test]
    fn tls_listener_loads_its_certificate_relative_to_the_config() {
        let dir = tempfile::tempdir().unwrap();
        write_cert(dir.path(), "site", &["site.example"]);
        let config = check_in(
            dir.path(),
            &format!(
                "[[listeners]]\nlisten = \"127.0.0.1:8443\"\n\
                 tls = {{ cert = \"site.crt\", key = \"site.key\" }}\n{POOL}"
            ),
        )
        .unwrap();
        let tls = config.listeners[0].tls.as_ref().expect("a TLS listener");
        assert_eq!(tls.certificates.len(), 1);
        assert_eq!(tls.certificates[0].cert, dir.path().join("site.crt"));
        assert!(tls.certificates[0].server_names.is_empty());
        assert_eq!(
            tls.server_config.alpn_protocols,
            [b"h2".to_vec(), b"http/1.1".to_vec()]
        );
        assert!(!config.listeners[0].redirect_https);

        // Loaded again from the same files: equal. Rotated in place: not.
        let again = check_in(
            dir.path(),
            &format!(
                "[[listeners]]\nlisten = \"127.0.0.1:8443\"\n\
                 tls = {{ cert = \"site.crt\", key = \"site.key\" }}\n{POOL}"
            ),
        )
        .unwrap();
        assert_eq!(again.listeners, config.listeners);
        write_cert(dir.path(), "site", &["site.example"]);
        let rotated = check_in(
            dir.path(),
            &format!(
                "[[listeners]]\nlisten = \"127.0.0.1:8443\"\n\
                 tls = {{ cert = \"site.crt\", key = \"site.key\" }}\n{POOL}"
            ),
        )
        .unwrap();
        assert_ne!(rotated.listeners, config.listeners);
    }

    #[test]
    fn listeners_that_could_not_all_be_bound_are_refused() {
        let two = |a: &str, b: &str| {
            format!(
                "[[listeners]]\nlisten = \"{a}\"\n\n[[listeners]]\nlisten = \"{b}\"\n\n\
                 [pools.app]\nstrategy = \"round_robin\"\nbackends = [{{ address = \"127.0.0.1:9001\" }}]\n"
            )
        };
        for (a, b) in [
            ("127.0.0.1:8080", "0.0.0.0:8080"),
            ("0.0.0.0:8080", "127.0.0.1:8080"),
            ("[::]:8080", "127.0.0.1:8080"),
            ("[::1]:8080", "[::]:8080"),
        ] {
            let error = only_error(&two(a, b), "listeners[1].listen", Some(5));
            assert!(error.message.contains("overlaps"), "{a} {b}: {error}");
        }
        for (a, b) in [
            ("127.0.0.1:8080", "127.0.0.2:8080"),
            ("0.0.0.0:8080", "[::1]:8080"),
            ("0.0.0.0:8080", "0.0.0.0:8081"),
            ("0.0.0.0:0", "127.0.0.1:0"),
        ] {
            assert!(check(&two(a, b)).is_ok(), "{a} {b}");
        }
    }

    #[test]
    fn an_error_in_a_table_header_names_that_table() {
        let pool = "[pools.app]\nstrategy = \"round_robin\"\nbackends = [{ address = \"127.0.0.1:9001\" }]\n";
        let listener = "[[listeners]]\nlisten = \"127.0.0.1:8080\"\n";
        let error = only_error(&format!("{listener}\n{pool}\n{pool}"), "pools.app", Some(8));
        assert!(error.message.contains("duplicate key"), "{error}");
        let admin = "[admin]\nlisten = \"127.0.0.1:9901\"\n";
        let error = only_error(
            &format!("{admin}\n[listeners]\nlisten = \"127.0.0.1:8080\"\n\n{pool}"),
            "listeners",
            Some(4),
        );
        assert!(error.message.contains("expected a sequence"), "{error}");
    }

    #[test]
    fn cookie_pools_reachable_on_one_host_need_their_own_cookie_names() {
        let text = |a_host: &str, b_host: &str, b_cookie: &str| {
            format!(
                "[[listeners]]\nlisten = \"127.0.0.1:8080\"\n\n\
                 [[routes]]\n{a_host}path_prefix = \"/a\"\npool = \"a\"\n\n\
                 [[routes]]\n{b_host}pool = \"b\"\n\n\
                 [pools.a]\nstrategy = \"cookie\"\nbackends = [{{ address = \"127.0.0.1:9001\" }}]\n\
                 [pools.a.cookie]\nsecret = \"0123456789abcdef-a\"\n\n\
                 [pools.b]\nstrategy = \"cookie\"\nbackends = [{{ address = \"127.0.0.1:9002\" }}]\n\
                 [pools.b.cookie]\nsecret = \"0123456789abcdef-b\"\n{b_cookie}"
            )
        };
        // Both under the default name, on every host: the second pool's name is the error.
        let error = only_error(&text("", "", ""), "pools.b.cookie.name", Some(17));
        assert!(error.message.contains("also pool `a`'s"), "{error}");
        // One host in common.
        only_error(
            &text("host = \"A.example\"\n", "host = \"a.example\"\n", ""),
            "pools.b.cookie.name",
            Some(19),
        );
        // Named apart, or on hosts apart (a cookie without Domain is its host's alone): fine.
        assert!(check(&text("", "", "name = \"b_affinity\"\n")).is_ok());
        assert!(check(&text(
            "host = \"a.example\"\n",
            "host = \"b.example\"\n",
            ""
        ))
        .is_ok());
    }

    #[test]
    fn unusable_certificates_are_errors_that_name_the_key() {
        let dir = tempfile::tempdir().unwrap();
        write_cert(dir.path(), "a", &["a.example"]);
        write_cert(dir.path(), "b", &["b.example"]);
        let listener =
            |tls: &str| format!("[[listeners]]\nlisten = \"127.0.0.1:8443\"\ntls = {tls}\n{POOL}");
        let error = only_error_in(
            dir.path(),
            &listener(r#"{ cert = "missing.crt", key = "a.key" }"#),
            "listeners[0].tls.cert",
            3,
        );
        assert!(error.message.starts_with("cannot read "), "{error}");
        assert!(error.message.contains("missing.crt"), "{error}");

        // A key file with no key in it (here: a certificate).
        let error = only_error_in(
            dir.path(),
            &listener(r#"{ cert = "a.crt", key = "b.crt" }"#),
            "listeners[0].tls.key",
            3,
        );
        assert!(
            error.message.starts_with("no private key found in "),
            "{error}"
        );

        let error = only_error_in(
            dir.path(),
            &listener(r#"{ cert = "a.key", key = "a.key" }"#),
            "listeners[0].tls.cert",
            3,
        );
        assert!(
            error.message.starts_with("no certificate found in "),
            "{error}"
        );

        // Another certificate's key.
        let error = only_error_in(
            dir.path(),
            &listener(r#"{ cert = "a.crt", key = "b.key" }"#),
            "listeners[0].tls.key",
            3,
        );
        assert!(error.message.contains("cannot be used with"), "{error}");

        // A key file that cannot be read, or is not PEM, is the key's problem too.
        let error = only_error_in(
            dir.path(),
            &listener(r#"{ cert = "a.crt", key = "missing.key" }"#),
            "listeners[0].tls.key",
            3,
        );
        assert!(error.message.contains("missing.key"), "{error}");
        std::fs::write(
            dir.path().join("broken.key"),
            "-----BEGIN PRIVATE KEY-----\n!!!\n",
        )
        .unwrap();
        only_error_in(
            dir.path(),
            &listener(r#"{ cert = "a.crt", key = "broken.key" }"#),
            "listeners[0].tls.key",
            3,
        );

        only_error_in(
            dir.path(),
            &listener(r#"{ cert = "a.crt" }"#),
            "listeners[0].tls.key",
            1,
        );
    }

    #[test]
    fn sni_certificates_need_distinct_valid_names() {
        let dir = tempfile::tempdir().unwrap();
        write_cert(dir.path(), "a", &["a.example"]);
        write_cert(dir.path(), "b", &["b.example"]);
        let listener = |certificates: &str| {
            format!("[[listeners]]\nlisten = \"127.0.0.1:8443\"\ncertificates = [\n{certificates}\n]\n{POOL}")
        };
        let config = check_in(
            dir.path(),
            &listener(
                r#"{ cert = "a.crt", key = "a.key", server_names = ["A.example", "*.a.example"] },
{ cert = "b.crt", key = "b.key", server_names = ["b.example"] },"#,
            ),
        )
        .unwrap();
        let tls = config.listeners[0].tls.as_ref().unwrap();
        assert_eq!(
            tls.certificates[0].server_names,
            ["a.example", "*.a.example"]
        );
        assert_eq!(tls.certificates[1].server_names, ["b.example"]);

        let error = only_error_in(
            dir.path(),
            &listener(
                r#"{ cert = "a.crt", key = "a.key", server_names = ["a.example"] },
{ cert = "b.crt", key = "b.key", server_names = ["A.EXAMPLE"] },"#,
            ),
            "listeners[0].certificates[1].server_names[0]",
            5,
        );
        assert!(error.message.contains("certificates[0]"), "{error}");
        only_error_in(
            dir.path(),
            &listener(r#"{ cert = "a.crt", key = "a.key", server_names = ["a.*.example"] },"#),
            "listeners[0].certificates[0].server_names[0]",
            4,
        );
        only_error_in(
            dir.path(),
            &listener(r#"{ cert = "a.crt", key = "a.key" },"#),
            "listeners[0].certificates[0].server_names",
            4,
        );
        only_error_in(
            dir.path(),
            &format!(
                "[[listeners]]\nlisten = \"127.0.0.1:8443\"\ntls = {{ cert = \"a.crt\", key = \"a.key\" }}\n\
                 certificates = [{{ cert = \"b.crt\", key = \"b.key\", server_names = [\"b.example\"] }}]\n{POOL}"
            ),
            "listeners[0].certificates",
            4,
        );
    }

    #[test]
    fn redirect_https_is_for_plain_listeners_only() {
        let dir = tempfile::tempdir().unwrap();
        write_cert(dir.path(), "a", &["a.example"]);
        only_error_in(
            dir.path(),
            &format!(
                "[[listeners]]\nlisten = \"127.0.0.1:8443\"\ntls = {{ cert = \"a.crt\", key = \"a.key\" }}\n\
                 redirect_https = true\n{POOL}"
            ),
            "listeners[0].redirect_https",
            4,
        );
        let config = check_in(
            dir.path(),
            &format!("[[listeners]]\nlisten = \"127.0.0.1:8080\"\nredirect_https = true\n{POOL}"),
        )
        .unwrap();
        assert!(config.listeners[0].redirect_https);
    }

    #[test]
    fn https_backends_keep_their_host_for_sni() {
        let dir = tempfile::tempdir().unwrap();
        write_cert(dir.path(), "ca", &["ca.example"]);
        let text = r#"
[[listeners]]
listen = "127.0.0.1:8080"

[pools.app]
strategy = "round_robin"
ca = "ca.crt"
backends = [
  { address = "https://127.0.0.1:9443" },
  { address = "https://LOCALHOST:9444" },
  { address = "https://[::1]" },
  { address = "http://127.0.0.1:9001" },
]
"#;
        let config = check_in(dir.path(), text).unwrap();
        let pool = &config.pools["app"];
        assert_eq!(
            pool.ca.as_deref(),
            Some(dir.path().join("ca.crt").as_path())
        );
        let backends = &pool.backends;
        assert_eq!(backends[0].address, "127.0.0.1:9443".parse().unwrap());
        let tls = backends[0].tls.as_ref().unwrap();
        assert_eq!(tls.host, "127.0.0.1");
        assert!(matches!(tls.server_name, ServerName::IpAddress(_)));
        assert_eq!(tls.ca.as_deref(), pool.ca.as_deref());
        // A name is resolved at load; it stays the SNI name and the certificate's subject.
        assert!(backends[1].address.ip().is_loopback());
        assert_eq!(backends[1].address.port(), 9444);
        let tls = backends[1].tls.as_ref().unwrap();
        assert_eq!(tls.host, "localhost");
        assert_eq!(tls.authority.as_str(), "localhost:9444");
        assert!(matches!(tls.server_name, ServerName::DnsName(_)));
        assert_eq!(backends[2].address, "[::1]:443".parse().unwrap());
        assert_eq!(
            backends[2].tls.as_ref().unwrap().authority.as_str(),
            "[::1]:443"
        );
        assert_eq!(backends[3].address, "127.0.0.1:9001".parse().unwrap());
        assert!(backends[3].tls.is_none());
    }

    #[test]
    fn rejects_bad_https_backends_and_cas() {
        let dir = tempfile::tempdir().unwrap();
        write_cert(dir.path(), "ca", &["ca.example"]);
        let pool = |backends: &str, extra: &str| {
            format!(
                "[[listeners]]\nlisten = \"127.0.0.1:8080\"\n\n[pools.app]\nstrategy = \"round_robin\"\n\
                 backends = [{backends}]\n{extra}"
            )
        };
        for bad in [
            "https://127.0.0.1:9443/api",
            "https://ex ample:1",
            "https://a.example:http",
            // Port 0 is "any free port" to a listener; no backend can be reached there.
            "https://127.0.0.1:0",
            "127.0.0.1:0",
            "http://127.0.0.1:0",
        ] {
            let text = pool(&format!("{{ address = \"{bad}\" }}"), "");
            let error = only_error_in(dir.path(), &text, "pools.app.backends[0].address", 6);
            assert!(error.message.contains(bad), "{error}");
        }
        let error = only_error_in(
            dir.path(),
            &pool(
                r#"{ address = "https://127.0.0.1:9443" }"#,
                "ca = \"nope.crt\"\n",
            ),
            "pools.app.ca",
            7,
        );
        assert!(error.message.starts_with("cannot read "), "{error}");
        only_error_in(
            dir.path(),
            &pool(
                r#"{ address = "https://127.0.0.1:9443" }"#,
                "ca = \"ca.key\"\n",
            ),
            "pools.app.ca",
            7,
        );
        // One address, reached two ways by two pools.
        let text = format!(
            "{}\n[pools.other]\nstrategy = \"round_robin\"\nbackends = [{{ address = \"127.0.0.1:9443\" }}]\n",
            pool(r#"{ address = "https://127.0.0.1:9443" }"#, "")
        );
        let error = only_error_in(dir.path(), &text, "pools.other.backends[0].address", 10);
        assert!(error.message.contains("pool `app`"), "{error}");
    }

    #[test]
    fn unreadable_file_is_one_error_without_a_key() {
        let path = Path::new("/nonexistent/switchyard/proxy.toml");
        let errors = load(path).unwrap_err();
        assert_eq!(errors.0.len(), 1);
        let error = &errors.0[0];
        assert_eq!((error.key.as_str(), error.line), ("", None));
        assert!(
            error
                .to_string()
                .starts_with("/nonexistent/switchyard/proxy.toml: cannot read the config file: "),
            "{error}"
        );
    }

    mod properties {
        //! The loader under arbitrary input: any text, a valid file with a few bytes changed, or
        //! any structure of the file's own keys with values of any type. It answers a config or
        //! errors, never a panic, and every error has a key or a place.
        use proptest::prelude::*;
        use toml::value::{Table, Value};

        use super::*;

        fn load(text: &str) {
            let result = parse_with_env(text, Path::new("proxy.toml"), &|_| None);
            if let Err(errors) = result {
                assert!(!errors.0.is_empty());
                for error in &errors.0 {
                    let shown = error.to_string();
                    assert!(shown.starts_with("proxy.toml"), "{shown}");
                    if let Some(line) = error.line {
                        assert!(
                            line >= 1 && line <= text.lines().count().max(1) + 1,
                            "{shown}"
                        );
                    }
                }
            }
        }

        /// A string as the file might hold one: plausible values (no host names, which would be
        /// resolved, and no paths outside the working directory), or any short text.
        fn string() -> impl Strategy<Value = Value> {
            let words = prop::sample::select(vec![
                "127.0.0.1:0",
                "127.0.0.1:9001",
                "[::1]:80",
                "https://127.0.0.1:1",
                "round_robin",
                "least_connections",
                "ip_hash",
                "cookie",
                "generate",
                "5s",
                "0s",
                "250ms",
                "24h",
                "/",
                "/api",
                "200-399",
                "200,204",
                "keep",
                "move",
                "json",
                "text",
                "10.0.0.0/8",
                "0123456789abcdef",
                "app",
                "",
                "*.example.com",
            ]);
            prop_oneof![
                3 => words.prop_map(|w| Value::String(w.to_owned())),
                1 => "[a-z0-9:. _-]{0,12}".prop_map(Value::String),
            ]
        }

        /// Any value but a table or a list.
        fn leaf() -> impl Strategy<Value = Value> {
            prop_oneof![
                string(),
                any::<i64>().prop_map(Value::Integer),
                any::<f64>().prop_map(Value::Float),
                any::<bool>().prop_map(Value::Boolean),
            ]
        }

        /// What a key holds.
        #[derive(Clone, Copy)]
        enum Kind {
            Str,
            Int,
            Float,
            Flag,
            /// A list of strings.
            Strs,
            /// A string or a list of strings (`secret`).
            OneOrMore,
            /// A table of these keys.
            Of(&'static [(&'static str, Kind)]),
            /// A list of tables of these keys (`[[listeners]]`, `backends`).
            Many(&'static [(&'static str, Kind)]),
        }

        use Kind::*;

        const TLS: &[(&str, Kind)] = &[("cert", Str), ("key", Str)];
        const CERTIFICATE: &[(&str, Kind)] = &[("cert", Str), ("key", Str), ("server_names", Strs)];
        const LISTENER: &[(&str, Kind)] = &[
            ("listen", Str),
            ("tls", Of(TLS)),
            ("certificates", Many(CERTIFICATE)),
            ("redirect_https", Flag),
        ];
        const ROUTE: &[(&str, Kind)] = &[("host", Str), ("path_prefix", Str), ("pool", Str)];
        const BACKEND: &[(&str, Kind)] =
            &[("address", Str), ("weight", Int), ("max_connections", Int)];
        const COOKIE: &[(&str, Kind)] = &[
            ("name", Str),
            ("secret", OneOrMore),
            ("secret_env", Str),
            ("fallback", Str),
            ("max_age", Str),
            ("secure", Flag),
        ];
        const HEALTH: &[(&str, Kind)] = &[
            ("path", Str),
            ("host", Str),
            ("interval", Str),
            ("timeout", Str),
            ("unhealthy_threshold", Int),
            ("healthy_threshold", Int),
            ("expected_status", Str),
        ];
        const PASSIVE: &[(&str, Kind)] = &[
            ("enabled", Flag),
            ("consecutive_failures", Int),
            ("ejection_time", Str),
            ("max_ejection_time", Str),
            ("max_ejected_percent", Int),
        ];
        const POOL: &[(&str, Kind)] = &[
            ("strategy", Str),
            ("backends", Many(BACKEND)),
            ("trusted_proxies", Strs),
            ("drain_timeout", Str),
            ("drain_sticky", Str),
            ("cookie", Of(COOKIE)),
            ("retries", Int),
            ("slow_start", Str),
            ("max_connections", Int),
            ("balance_factor", Float),
            ("health", Of(HEALTH)),
            ("passive", Of(PASSIVE)),
            ("ca", Str),
        ];
        const ADMIN_KEYS: &[(&str, Kind)] = &[("listen", Str), ("token", Str), ("token_env", Str)];
        const TIMEOUTS: &[(&str, Kind)] = &[
            ("connect", Str),
            ("response_header", Str),
            ("client_header", Str),
            ("idle", Str),
            ("shutdown", Str),
            ("upgraded_idle", Str),
        ];
        const LIMITS: &[(&str, Kind)] = &[
            ("max_header_bytes", Int),
            ("max_headers", Int),
            ("max_body_bytes", Int),
            ("max_connections", Int),
        ];

        /// Mostly a value of the kind the key takes, sometimes any value.
        fn typed(kind: Kind) -> BoxedStrategy<Value> {
            let right = match kind {
                Str => string().boxed(),
                Int => prop_oneof![(-2i64..70_000), any::<i64>()]
                    .prop_map(Value::Integer)
                    .boxed(),
                Float => prop_oneof![0.5f64..120.0, any::<f64>()]
                    .prop_map(Value::Float)
                    .boxed(),
                Flag => any::<bool>().prop_map(Value::Boolean).boxed(),
                Strs => prop::collection::vec(typed(Str), 0..4)
                    .prop_map(Value::Array)
                    .boxed(),
                OneOrMore => prop_oneof![typed(Str), typed(Strs)].boxed(),
                Of(keys) => table(keys),
                Many(keys) => prop::collection::vec(table(keys), 0..3)
                    .prop_map(Value::Array)
                    .boxed(),
            };
            prop_oneof![30 => right, 1 => leaf()].boxed()
        }

        /// A table with some of `keys` (and now and then one it does not take).
        fn table(keys: &'static [(&'static str, Kind)]) -> BoxedStrategy<Value> {
            let fields: Vec<_> = keys
                .iter()
                .map(|&(key, kind)| {
                    prop::option::weighted(0.6, typed(kind))
                        .prop_map(move |v| v.map(|v| (key.to_owned(), v)))
                })
                .collect();
            (fields, prop::option::weighted(0.02, leaf()))
                .prop_map(|(fields, bogus)| {
                    let mut table: Table = fields.into_iter().flatten().collect();
                    if let Some(bogus) = bogus {
                        table.insert("bogus".to_owned(), bogus);
                    }
                    Value::Table(table)
                })
                .boxed()
        }

        /// A whole file shaped like `proxy.toml`, values mostly of the right kinds.
        fn document() -> impl Strategy<Value = Value> {
            let pools = prop::collection::btree_map(
                prop::sample::select(vec!["app", "api", "x"]),
                table(POOL),
                0..3,
            );
            (
                prop::option::weighted(0.3, typed(Str)),
                prop::option::weighted(0.5, table(ADMIN_KEYS)),
                prop::option::weighted(0.9, typed(Many(LISTENER))),
                prop::option::weighted(0.7, typed(Many(ROUTE))),
                pools,
                prop::option::weighted(0.5, table(TIMEOUTS)),
                prop::option::weighted(0.5, table(LIMITS)),
            )
                .prop_map(
                    |(log_format, admin, listeners, routes, pools, timeouts, limits)| {
                        let mut doc = Table::new();
                        let sections = [
                            ("log_format", log_format),
                            ("admin", admin),
                            ("listeners", listeners),
                            ("routes", routes),
                            ("timeouts", timeouts),
                            ("limits", limits),
                        ];
                        for (name, section) in sections {
                            if let Some(section) = section {
                                doc.insert(name.to_owned(), section);
                            }
                        }
                        let pools = pools.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
                        doc.insert("pools".to_owned(), Value::Table(pools));
                        Value::Table(doc)
                    },
                )
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            #[test]
            fn any_text_is_a_config_or_errors(text in any::<String>()) {
                load(&text);
            }

            #[test]
            fn toml_like_text_is_a_config_or_errors(
                text in r#"(\[{1,2}[a-z.]{0,12}\]{1,2}\n|[a-z_]{1,12} ?= ?("[ -~]{0,10}"|[0-9-]{1,5}|\[\]|\{\}|true)\n){0,12}"#,
            ) {
                load(&text);
            }

            /// The complete example with up to four bytes changed, inserted or removed.
            #[test]
            fn a_valid_file_with_a_few_bytes_changed_is_a_config_or_errors(
                edits in prop::collection::vec((any::<prop::sample::Index>(), 0u8..3, 0x20u8..0x7f), 1..5),
            ) {
                let mut bytes = EXAMPLE.as_bytes().to_vec();
                for (at, kind, byte) in edits {
                    let at = at.index(bytes.len());
                    match kind {
                        0 => bytes[at] = byte,
                        1 => bytes.insert(at, byte),
                        _ => {
                            bytes.remove(at);
                        }
                    }
                }
                load(&String::from_utf8_lossy(&bytes));
            }

            #[test]
            fn any_structure_of_its_keys_is_a_config_or_errors(doc in document()) {
                let Ok(text) = toml::to_string(&doc) else {
                    return Ok(());
                };
                load(&text);
            }
        }
    }

    #[test]
    fn runtime_workers_is_optional_and_bounded() {
        let base = "[[listeners]]\nlisten = \"127.0.0.1:8080\"\n";
        let config = check(base).unwrap();
        assert_eq!(config.runtime.workers, None);
        assert!(config.runtime.worker_threads() >= 1);
        let config = check(&format!("{base}[runtime]\nworkers = 1\n")).unwrap();
        assert_eq!(config.runtime.worker_threads(), 1);
        only_error(
            &format!("{base}[runtime]\nworkers = 0\n"),
            "runtime.workers",
            Some(4),
        );
    }

    /// A one-pool config whose pool has `pool_keys` and the discovery table `discovery`.
    fn discovered(pool_keys: &str, discovery: &str) -> String {
        format!(
            "[[listeners]]\nlisten = \"127.0.0.1:0\"\n\n[pools.app]\nstrategy = \"ip_hash\"\n\
             {pool_keys}\n[pools.app.discovery]\n{discovery}\n"
        )
    }

    #[test]
    fn discovery_defaults_and_each_source() {
        let config = check(&discovered(
            "max_connections = 7",
            "dns = \"App.Internal:8080\"",
        ))
        .unwrap_or_else(|e| panic!("{e}"));
        let pool = &config.pools["app"];
        assert!(
            pool.backends.is_empty(),
            "nothing is resolved by validation"
        );
        let discovery = pool.discovery.as_ref().unwrap();
        assert!(!discovery.allow_empty);
        assert_eq!(discovery.max_connections, Some(7));
        assert_eq!(
            discovery.source,
            DiscoverySource::Dns(DnsDiscovery {
                query: DnsQuery::Address {
                    name: "app.internal".into(),
                    port: 8080,
                    weight: 1,
                },
                resolver: None,
                interval: Duration::from_secs(5),
            })
        );
        assert_eq!(discovery.source.describe(), "dns app.internal:8080");

        let config = check(&discovered(
            "",
            "dns_srv = \"_http._tcp.app.internal\"\nresolver = \"127.0.0.1\"\ninterval = \"250ms\"\n\
             allow_empty = true",
        ))
        .unwrap();
        let discovery = config.pools["app"].discovery.clone().unwrap();
        assert!(discovery.allow_empty);
        let DiscoverySource::Dns(dns) = discovery.source else {
            panic!("{discovery:?}")
        };
        assert_eq!(dns.resolver, Some("127.0.0.1:53".parse().unwrap()));
        assert_eq!(dns.interval, Duration::from_millis(250));
        assert_eq!(
            dns.query,
            DnsQuery::Srv {
                name: "_http._tcp.app.internal".into()
            }
        );
    }

    #[cfg(feature = "etcd")]
    #[test]
    fn etcd_discovery_is_read_when_the_feature_is_on() {
        let config = check(&discovered(
            "",
            "etcd = { endpoints = [\"http://127.0.0.1:2379/\"], prefix = \"/switchyard/app/\" }",
        ))
        .unwrap_or_else(|e| panic!("{e}"));
        let source = &config.pools["app"].discovery.as_ref().unwrap().source;
        assert_eq!(
            *source,
            DiscoverySource::Etcd(EtcdDiscovery {
                endpoints: vec!["http://127.0.0.1:2379".into()],
                prefix: "/switchyard/app/".into(),
            })
        );
    }

    #[cfg(not(feature = "etcd"))]
    #[test]
    fn etcd_discovery_needs_the_feature() {
        let text = discovered(
            "",
            "etcd = { endpoints = [\"http://127.0.0.1:2379\"], prefix = \"/switchyard/app/\" }",
        );
        let error = only_error(&text, "pools.app.discovery.etcd", Some(8));
        assert!(error.message.contains("--features etcd"), "{error}");
    }

    #[test]
    fn discovery_errors_name_their_keys() {
        // Both a list and a source.
        let text = discovered(
            "backends = [{ address = \"127.0.0.1:9001\" }]",
            "dns = \"app.internal:80\"",
        );
        let error = only_error(&text, "pools.app.backends", Some(6));
        assert!(error.message.contains("either"), "{error}");
        // Neither.
        let text =
            "[[listeners]]\nlisten = \"127.0.0.1:0\"\n[pools.app]\nstrategy = \"round_robin\"\n";
        let error = only_error(text, "pools.app.backends", Some(3));
        assert!(error.message.contains("[pools.app.discovery]"), "{error}");
        // No source, two sources.
        let error = only_error(
            &discovered("", "allow_empty = true"),
            "pools.app.discovery",
            Some(8),
        );
        assert!(error.message.contains("one source"), "{error}");
        only_error(
            &discovered(
                "",
                "dns = \"a.internal:80\"\ndns_srv = \"_http._tcp.a.internal\"",
            ),
            "pools.app.discovery.dns_srv",
            Some(8),
        );
        // Malformed values.
        for (value, why) in [
            ("app.internal", "port is missing"),
            ("app.internal:0", "1 to 65535"),
            ("10.0.0.1:80", "list it in `backends`"),
            ("bad name!:80", "not a DNS name"),
        ] {
            let text = discovered("", &format!("dns = \"{value}\""));
            let error = only_error(&text, "pools.app.discovery.dns", Some(8));
            assert!(error.message.contains(why), "{value}: {error}");
        }
        only_error(
            &discovered("", "dns = \"a.internal:80\"\nweight = 0"),
            "pools.app.discovery.weight",
            Some(9),
        );
        only_error(
            &discovered("", "dns = \"a.internal:80\"\nresolver = \"dns.internal\""),
            "pools.app.discovery.resolver",
            Some(9),
        );
        only_error(
            &discovered("", "dns = \"a.internal:80\"\ninterval = \"0s\""),
            "pools.app.discovery.interval",
            Some(9),
        );
        let error = only_error(
            &discovered("", "dns_srv = \"_http._tcp.a.internal\"\nweight = 2"),
            "pools.app.discovery.weight",
            Some(9),
        );
        assert!(error.message.contains("SRV"), "{error}");
        // etcd: DNS keys next to it, a bad endpoint, no prefix (with or without the feature, the
        // shape is checked first).
        let text = discovered(
            "",
            "etcd = { endpoints = [\"https://10.0.0.1:2379\"] }\ninterval = \"1s\"",
        );
        let errors = check(&text).unwrap_err();
        let keys: Vec<&str> = errors.0.iter().map(|e| e.key.as_str()).collect();
        assert!(keys.contains(&"pools.app.discovery.interval"), "{errors}");
        assert!(
            keys.contains(&"pools.app.discovery.etcd.endpoints[0]"),
            "{errors}"
        );
        assert!(
            keys.contains(&"pools.app.discovery.etcd.prefix"),
            "{errors}"
        );
        // An unknown key in the table.
        let error = only_error(
            &discovered("", "dns = \"a.internal:80\"\nttl = \"5s\""),
            "pools.app.discovery.ttl",
            Some(9),
        );
        assert!(error.message.contains("unknown key `ttl`"), "{error}");
    }
}
