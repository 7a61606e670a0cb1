//! Errors on the request path, each keeping its source, and the one place that maps them to an
//! HTTP status: client side → 4xx, upstream → 502/504, nothing available → 503.

use std::net::SocketAddr;

use http::StatusCode;

/// Why a request could not be proxied.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// No `[[routes]]` entry matches the request's host and path.
    #[error("no route matches host {host:?} and path {path:?}")]
    NoRoute {
        /// The request's host, without a port.
        host: String,
        /// The request's path.
        path: String,
    },
    /// Every backend of the pool is draining, down or already tried.
    #[error("no backend available in pool {pool}")]
    NoBackend {
        /// The pool's name.
        pool: String,
    },
    /// The TCP connection (or HTTP handshake) to the backend failed.
    #[error("connect to backend {backend} failed")]
    Connect {
        /// The backend's address.
        backend: SocketAddr,
        /// What went wrong.
        #[source]
        source: std::io::Error,
    },
    /// The backend did not accept a connection within `timeouts.connect`.
    #[error("connect to backend {backend} timed out")]
    ConnectTimeout {
        /// The backend's address.
        backend: SocketAddr,
    },
    /// The backend sent no response headers within `timeouts.response_header`.
    #[error("backend {backend} sent no response headers in time")]
    ResponseTimeout {
        /// The backend's address.
        backend: SocketAddr,
    },
    /// The exchange with the backend failed after the request was (at least partly) sent.
    #[error("backend {backend} failed")]
    Upstream {
        /// The backend's address.
        backend: SocketAddr,
        /// hyper's error.
        #[source]
        source: hyper::Error,
    },
    /// The backend answered 101 to a request that did not ask to switch protocols.
    #[error("backend {backend} switched protocols unasked")]
    UnexpectedUpgrade {
        /// The backend's address.
        backend: SocketAddr,
    },
    /// The client's request cannot be forwarded as it is.
    #[error("bad request: {reason}")]
    BadRequest {
        /// A short, client-safe reason.
        reason: &'static str,
    },
}

impl ProxyError {
    /// The status the client gets.
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::NoRoute { .. } => StatusCode::NOT_FOUND,
            ProxyError::NoBackend { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::Connect { .. }
            | ProxyError::Upstream { .. }
            | ProxyError::UnexpectedUpgrade { .. } => StatusCode::BAD_GATEWAY,
            ProxyError::ConnectTimeout { .. } => StatusCode::BAD_GATEWAY,
            ProxyError::ResponseTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::BadRequest { .. } => StatusCode::BAD_REQUEST,
        }
    }

    /// The short plain-text body the client gets; never reveals a backend's address.
    pub fn body(&self) -> &'static str {
        match self {
            ProxyError::NoRoute { .. } => "no route\n",
            ProxyError::NoBackend { .. } => "no backend available\n",
            ProxyError::Connect { .. } | ProxyError::ConnectTimeout { .. } => {
                "backend unreachable\n"
            }
            ProxyError::ResponseTimeout { .. } => "backend timed out\n",
            ProxyError::Upstream { .. } | ProxyError::UnexpectedUpgrade { .. } => "backend error\n",
            ProxyError::BadRequest { .. } => "bad request\n",
        }
    }
}
