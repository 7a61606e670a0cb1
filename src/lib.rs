//! Switchyard: an HTTP load balancer and reverse proxy with hot reload, draining and sticky
//! sessions.
//!
//! # Layout
//!
//! A request's path, top to bottom: [`server`] accepts a connection and serves HTTP/1.1 or HTTP/2 →
//! [`proxy::handle`] loads the current [`state::Snapshot`] once, matches a route → the route's
//! [`state::Pool`] asks its [`balance::Strategy`] to choose a member → the member's live
//! [`backend::BackendState`] counts the request and lends a pooled connection → the response
//! streams back, and failures become statuses in [`error`].
//!
//! - [`config`]: `proxy.toml`, parsed strictly ([`config::raw`]) then validated ([`config::validate`]).
//! - [`state`]: the immutable snapshot behind one `ArcSwap`, and what connections share.
//! - [`backend`]: live per-address state (in-flight, drain, connection pool) and its registry.
//! - [`balance`]: the strategy trait and the four strategies.
//! - [`health`]: active checks, passive ejection and slow start.
//! - [`proxy`]: the request path, header rules, response bodies, upgraded tunnels, the https
//!   redirect.
//! - [`server`]: listeners, TLS termination, connections, graceful shutdown; HTTP/1 request
//!   heads checked for ambiguous framing and size before hyper reads them
//!   ([`server::framing`]).
//! - [`tls`]: certificates and rustls configs, built when a config is loaded.
//! - [`reload`]: file watch / SIGHUP / admin → load → validate → reconcile → store.
//! - [`drain`]: the Active → Draining → Retired/Drained state machine.
//! - [`discovery`]: pools whose backends come from DNS or etcd, followed in the background and
//!   applied through the reload path.
//! - [`admin`]: the status page, `/status`, `/reload`, runtime drain and `/metrics`, behind an
//!   optional bearer token.
//! - [`metrics`]: metric names and handles in one place.
//! - [`demo`]: the example stateful app server used by the examples and the tests.
//! - [`simulate`]: `switchyard simulate`, the real strategies under a synthetic workload on a
//!   virtual clock, with tables, JSON and an SVG plot.

pub mod admin;
pub mod backend;
pub mod balance;
pub mod config;
pub mod demo;
pub mod discovery;
pub mod drain;
pub mod error;
pub mod health;
pub mod metrics;
pub mod proxy;
pub mod reload;
pub mod server;
pub mod simulate;
pub mod state;
pub mod tls;
