//! Errors on the request path, each keeping its source, and the one place that maps them to an
//! HTTP status: client side → 4xx, upstream → 502/504, nothing available → 503.

use std::net::SocketAddr;

use http::StatusCode;

use crate::server::framing::Rejection;

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
    /// The exchange with the backend failed after the request was sent, on a connection
    /// switchyard drives itself (see `backend::h1`): the backend closed it, or answered with a
    /// malformed response.
    #[error("backend {backend} failed")]
    UpstreamIo {
        /// The backend's address.
        backend: SocketAddr,
        /// What went wrong.
        #[source]
        source: std::io::Error,
    },
    /// The backend answered 101 to a request that did not ask to switch protocols.
    #[error("backend {backend} switched protocols unasked")]
    UnexpectedUpgrade {
        /// The backend's address.
        backend: SocketAddr,
    },
    /// The client's request cannot be forwarded as it is: ambiguous framing, a missing or
    /// repeated `Host`, a target that is not a path.
    #[error("bad request: {reason}")]
    BadRequest {
        /// A short, client-safe reason.
        reason: &'static str,
    },
    /// The client's request body broke off or was malformed (an invalid chunk) while it was being
    /// sent to the backend.
    #[error("request body to backend {backend} failed")]
    RequestBody {
        /// The backend's address.
        backend: SocketAddr,
        /// hyper's error, whose source is the body's.
        #[source]
        source: hyper::Error,
    },
    /// The request line is longer than `limits.max_header_bytes`.
    #[error("request line longer than {limit} bytes")]
    UriTooLong {
        /// `limits.max_header_bytes`.
        limit: usize,
    },
    /// The request's head is larger than `limits.max_header_bytes`, or has more fields than
    /// `limits.max_headers`.
    #[error("request header fields too large: {reason}")]
    HeadersTooLarge {
        /// Which limit.
        reason: &'static str,
    },
    /// The request body is larger than `limits.max_body_bytes`, by its `Content-Length` or as it
    /// arrived.
    #[error("request body larger than {limit} bytes")]
    BodyTooLarge {
        /// `limits.max_body_bytes`.
        limit: u64,
    },
}

impl From<Rejection> for ProxyError {
    /// A refused HTTP/1 head: 414 for its request line, 431 for its size or field count, 400 for
    /// its framing.
    fn from(rejection: Rejection) -> Self {
        match rejection {
            Rejection::RequestLineTooLong { limit } => ProxyError::UriTooLong { limit },
            Rejection::HeadTooLarge | Rejection::TooManyHeaders => ProxyError::HeadersTooLarge {
                reason: rejection.reason(),
            },
            _ => ProxyError::BadRequest {
                reason: rejection.reason(),
            },
        }
    }
}

impl ProxyError {
    /// The status the client gets.
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::NoRoute { .. } => StatusCode::NOT_FOUND,
            ProxyError::NoBackend { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::Connect { .. }
            | ProxyError::Upstream { .. }
            | ProxyError::UpstreamIo { .. }
            | ProxyError::UnexpectedUpgrade { .. } => StatusCode::BAD_GATEWAY,
            ProxyError::ConnectTimeout { .. } => StatusCode::BAD_GATEWAY,
            ProxyError::ResponseTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::BadRequest { .. } | ProxyError::RequestBody { .. } => {
                StatusCode::BAD_REQUEST
            }
            ProxyError::UriTooLong { .. } => StatusCode::URI_TOO_LONG,
            ProxyError::HeadersTooLarge { .. } => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ProxyError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
        }
    }

    /// Whether the client's connection must close after this answer: the client sent something
    /// that cannot be trusted to end where it says (a request whose framing was rejected, a body
    /// left unread), so nothing after it on the connection can be read as a request.
    pub fn closes_connection(&self) -> bool {
        matches!(
            self,
            ProxyError::BadRequest { .. }
                | ProxyError::RequestBody { .. }
                | ProxyError::UriTooLong { .. }
                | ProxyError::HeadersTooLarge { .. }
                | ProxyError::BodyTooLarge { .. }
        )
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
            ProxyError::Upstream { .. }
            | ProxyError::UpstreamIo { .. }
            | ProxyError::UnexpectedUpgrade { .. } => "backend error\n",
            ProxyError::BadRequest { .. } | ProxyError::RequestBody { .. } => "bad request\n",
            ProxyError::UriTooLong { .. } => "request line too long\n",
            ProxyError::HeadersTooLarge { .. } => "request header fields too large\n",
            ProxyError::BodyTooLarge { .. } => "request body too large\n",
        }
    }
}
