//! Keep-alive HTTP/1.1 connections to one backend. Owned by the backend's live state, so a reload
//! keeps them and a drain can close them.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{Either, Empty};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::config::Timeouts;
use crate::error::ProxyError;

/// The body of a request sent upstream: the client's streamed body, or nothing.
pub type UpstreamBody = Either<Incoming, Empty<Bytes>>;

/// Idle connections kept per backend at most; more are closed when they return.
const MAX_IDLE: usize = 1024;

/// A connection whose response body has not been read to its end yet.
pub struct PooledConn(SendRequest<UpstreamBody>);

impl std::fmt::Debug for PooledConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PooledConn")
    }
}

struct Idle {
    sender: SendRequest<UpstreamBody>,
    since: Instant,
}

/// Why sending a request upstream failed.
#[derive(Debug)]
pub enum SendError {
    /// Nothing of the request reached the backend; it comes back so it can go elsewhere.
    NotSent {
        /// The request, untouched.
        request: Box<Request<UpstreamBody>>,
        /// Why.
        error: ProxyError,
    },
    /// The request was (maybe partly) sent; it must not be retried.
    Failed(ProxyError),
}

/// A backend's idle keep-alive connections (LIFO, so the warmest is reused first).
pub struct ConnPool {
    address: SocketAddr,
    idle: Mutex<Vec<Idle>>,
    opened: AtomicU64,
}

impl std::fmt::Debug for ConnPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnPool")
            .field("address", &self.address)
            .field("opened", &self.opened())
            .finish()
    }
}

impl ConnPool {
    /// An empty pool for `address`.
    pub fn new(address: SocketAddr) -> Self {
        ConnPool {
            address,
            idle: Mutex::new(Vec::new()),
            opened: AtomicU64::new(0),
        }
    }

    /// Connections opened to this backend since the process started.
    pub fn opened(&self) -> u64 {
        self.opened.load(Ordering::Relaxed)
    }

    /// Idle connections now held.
    pub fn idle_count(&self) -> usize {
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Closes every idle connection (a draining backend gets no new work to reuse them for).
    pub fn clear(&self) {
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    /// Returns a connection whose response was read to its end, so it can carry another request.
    pub fn checkin(&self, conn: PooledConn) {
        if conn.0.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < MAX_IDLE {
            idle.push(Idle {
                sender: conn.0,
                since: Instant::now(),
            });
        }
    }

    fn checkout(&self, max_idle: Duration) -> Option<SendRequest<UpstreamBody>> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(entry) = idle.pop() {
            if !entry.sender.is_closed() && entry.since.elapsed() < max_idle {
                return Some(entry.sender);
            }
        }
        None
    }

    /// Sends `request` on an idle connection, or a new one, and waits for the response headers.
    ///
    /// A pooled connection that turns out to be closed before the request was written is skipped,
    /// so the keep-alive race costs a reconnect rather than a failed request.
    pub async fn send(
        &self,
        mut request: Request<UpstreamBody>,
        timeouts: &Timeouts,
    ) -> Result<(Response<Incoming>, PooledConn), SendError> {
        while let Some(mut sender) = self.checkout(timeouts.idle) {
            if sender.ready().await.is_err() {
                continue;
            }
            match self.exchange(&mut sender, request, timeouts).await {
                Ok(response) => return Ok((response, PooledConn(sender))),
                Err(SendError::NotSent { request: r, .. }) => request = *r,
                Err(failed) => return Err(failed),
            }
        }
        let mut sender = match self.connect(timeouts.connect).await {
            Ok(sender) => sender,
            Err(error) => {
                return Err(SendError::NotSent {
                    request: Box::new(request),
                    error,
                })
            }
        };
        let response = self.exchange(&mut sender, request, timeouts).await?;
        Ok((response, PooledConn(sender)))
    }

    async fn exchange(
        &self,
        sender: &mut SendRequest<UpstreamBody>,
        request: Request<UpstreamBody>,
        timeouts: &Timeouts,
    ) -> Result<Response<Incoming>, SendError> {
        let backend = self.address;
        match tokio::time::timeout(timeouts.response_header, sender.try_send_request(request)).await
        {
            Err(_) => Err(SendError::Failed(ProxyError::ResponseTimeout { backend })),
            Ok(Ok(response)) => Ok(response),
            Ok(Err(mut e)) => match e.take_message() {
                Some(request) => Err(SendError::NotSent {
                    request: Box::new(request),
                    error: ProxyError::Upstream {
                        backend,
                        source: e.into_error(),
                    },
                }),
                None => Err(SendError::Failed(ProxyError::Upstream {
                    backend,
                    source: e.into_error(),
                })),
            },
        }
    }

    async fn connect(&self, limit: Duration) -> Result<SendRequest<UpstreamBody>, ProxyError> {
        let backend = self.address;
        let connecting = async {
            let stream = TcpStream::connect(backend).await?;
            stream.set_nodelay(true)?;
            let (sender, conn) = http1::Builder::new()
                .handshake(TokioIo::new(stream))
                .await
                .map_err(std::io::Error::other)?;
            tokio::spawn(async move {
                // Errors here surface on the request that used the connection.
                let _ = conn.with_upgrades().await;
            });
            Ok::<_, std::io::Error>(sender)
        };
        match tokio::time::timeout(limit, connecting).await {
            Err(_) => Err(ProxyError::ConnectTimeout { backend }),
            Ok(Err(source)) => Err(ProxyError::Connect { backend, source }),
            Ok(Ok(sender)) => {
                self.opened.fetch_add(1, Ordering::Relaxed);
                Ok(sender)
            }
        }
    }
}
