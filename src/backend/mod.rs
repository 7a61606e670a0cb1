//! Backends: what the config says about one ([`crate::config::BackendSpec`]), what is live about one
//! ([`BackendState`]: in-flight counts, drain state, pooled connections), and the [`Registry`] that
//! keeps live state by address so that it survives reloads.

mod h1;
mod pool;
mod registry;
mod state;

pub use h1::{bodiless, ResponseBody};
pub use pool::{bodiless_copy, ConnPool, PooledConn, SendError, Stream, Upload, UpstreamBody};
pub use registry::Registry;
pub use state::{BackendState, BackendStatus, Drain, DrainOutcome, InFlightGuard, UpgradeGuard};
