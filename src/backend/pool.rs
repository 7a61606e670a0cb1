//! Keep-alive HTTP/1.1 connections to one backend. Owned by the backend's live state, so a reload
//! keeps them and a drain can close them.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{Either, Empty};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use pin_project_lite::pin_project;
use tokio::net::TcpStream;

use crate::config::Timeouts;
use crate::error::ProxyError;

/// Idle connections kept per backend at most; more are closed when they return.
const MAX_IDLE: usize = 1024;

/// How far a request body has been sent: shared between the body, the exchange (whose
/// `response_header` clock runs from the body's last progress) and the connection (which is clean
/// for reuse only once the body has ended).
#[derive(Debug)]
pub struct Upload {
    // tokio's clock, like the deadline it extends, so a paused test clock governs both.
    start: tokio::time::Instant,
    last_progress_ns: AtomicU64,
    done: AtomicBool,
}

impl Upload {
    fn new() -> Self {
        Upload {
            start: tokio::time::Instant::now(),
            last_progress_ns: AtomicU64::new(0),
            done: AtomicBool::new(false),
        }
    }

    fn progressed(&self) {
        let ns = self.start.elapsed().as_nanos() as u64;
        self.last_progress_ns.store(ns, Ordering::Relaxed);
    }

    fn last_progress(&self) -> tokio::time::Instant {
        self.start + Duration::from_nanos(self.last_progress_ns.load(Ordering::Relaxed))
    }

    /// Whether the whole body has been handed to the connection.
    pub fn is_done(&self) -> bool {
        self.done.load(Ordering::Acquire)
    }
}

pin_project! {
    /// The body of a request sent upstream: the client's body streamed as it arrives, or nothing.
    #[derive(Debug)]
    pub struct UpstreamBody {
        #[pin]
        inner: Either<Incoming, Empty<Bytes>>,
        // None when there is no body to send, which spares bodiless requests an allocation.
        upload: Option<Arc<Upload>>,
    }
}

impl UpstreamBody {
    /// Streams the client's body.
    pub fn streaming(body: Incoming) -> Self {
        let upload = (!body.is_end_stream()).then(|| Arc::new(Upload::new()));
        UpstreamBody {
            inner: Either::Left(body),
            upload,
        }
    }

    /// No body.
    pub fn empty() -> Self {
        UpstreamBody {
            inner: Either::Right(Empty::new()),
            upload: None,
        }
    }

    /// The upload's progress, if there is a body to send.
    pub fn upload(&self) -> Option<Arc<Upload>> {
        self.upload.clone()
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let mut this = self.project();
        let polled = this.inner.as_mut().poll_frame(cx);
        if let Some(upload) = this.upload {
            match &polled {
                Poll::Ready(Some(Ok(_))) => {
                    upload.progressed();
                    if this.inner.is_end_stream() {
                        upload.done.store(true, Ordering::Release);
                    }
                }
                Poll::Ready(None) => {
                    upload.progressed();
                    upload.done.store(true, Ordering::Release);
                }
                _ => {}
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A connection whose response body has not been read to its end yet.
pub struct PooledConn {
    sender: SendRequest<UpstreamBody>,
    upload: Option<Arc<Upload>>,
    max_idle: Duration,
}

impl std::fmt::Debug for PooledConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PooledConn")
    }
}

impl PooledConn {
    /// Whether the request's body was sent whole, so the connection carries no leftover of it.
    fn request_done(&self) -> bool {
        self.upload.as_ref().is_none_or(|u| u.is_done())
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

/// A backend's idle keep-alive connections (LIFO, so the warmest is reused first; the oldest are
/// expired from the other end).
pub struct ConnPool {
    address: SocketAddr,
    idle: Mutex<VecDeque<Idle>>,
}

impl std::fmt::Debug for ConnPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnPool")
            .field("address", &self.address)
            .finish()
    }
}

impl ConnPool {
    /// An empty pool for `address`.
    pub fn new(address: SocketAddr) -> Self {
        ConnPool {
            address,
            idle: Mutex::new(VecDeque::new()),
        }
    }

    /// Closes every idle connection (a draining backend gets no new work to reuse them for).
    pub fn clear(&self) {
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    /// Returns a connection whose response was read to its end, so it can carry another request.
    /// One whose request body did not end (the backend answered early) is closed instead: the
    /// rest of that body would reach the next request.
    pub fn checkin(&self, conn: PooledConn) {
        if conn.sender.is_closed() || !conn.request_done() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        // Entries are in return order, so the expired ones are at the front.
        while idle
            .front()
            .is_some_and(|e| e.since.elapsed() >= conn.max_idle)
        {
            idle.pop_front();
        }
        if idle.len() < MAX_IDLE {
            idle.push_back(Idle {
                sender: conn.sender,
                since: Instant::now(),
            });
        }
    }

    fn checkout(&self, max_idle: Duration) -> Option<SendRequest<UpstreamBody>> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        while idle.front().is_some_and(|e| e.since.elapsed() >= max_idle) {
            idle.pop_front();
        }
        while let Some(entry) = idle.pop_back() {
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
        let upload = request.body().upload();
        while let Some(mut sender) = self.checkout(timeouts.idle) {
            // A pooled connection is ready at once or broken; never wait on one for long (and
            // build no timer in the common case where it is ready).
            if !sender.is_ready() {
                match tokio::time::timeout(timeouts.connect, sender.ready()).await {
                    Ok(Ok(())) => {}
                    _ => continue,
                }
            }
            match self.exchange(&mut sender, request, timeouts, &upload).await {
                Ok(response) => return Ok((response, self.pooled(sender, upload, timeouts))),
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
        let response = self
            .exchange(&mut sender, request, timeouts, &upload)
            .await?;
        Ok((response, self.pooled(sender, upload, timeouts)))
    }

    fn pooled(
        &self,
        sender: SendRequest<UpstreamBody>,
        upload: Option<Arc<Upload>>,
        timeouts: &Timeouts,
    ) -> PooledConn {
        PooledConn {
            sender,
            upload,
            max_idle: timeouts.idle,
        }
    }

    /// Sends the request and waits for the response headers. `response_header` runs from the
    /// request body's last progress, so a slow but steady upload is not cut, a stalled one is.
    async fn exchange(
        &self,
        sender: &mut SendRequest<UpstreamBody>,
        request: Request<UpstreamBody>,
        timeouts: &Timeouts,
        upload: &Option<Arc<Upload>>,
    ) -> Result<Response<Incoming>, SendError> {
        let backend = self.address;
        let sending = sender.try_send_request(request);
        tokio::pin!(sending);
        let mut deadline = tokio::time::Instant::now() + timeouts.response_header;
        let result = loop {
            tokio::select! {
                result = &mut sending => break result,
                _ = tokio::time::sleep_until(deadline) => {
                    let since_progress = upload
                        .as_ref()
                        .map(|u| u.last_progress() + timeouts.response_header)
                        .filter(|&d| d > tokio::time::Instant::now());
                    match since_progress {
                        Some(later) => deadline = later,
                        None => return Err(SendError::Failed(ProxyError::ResponseTimeout { backend })),
                    }
                }
            }
        };
        match result {
            Ok(response) => Ok(response),
            Err(mut e) => match e.take_message() {
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
            Ok(Ok(sender)) => Ok(sender),
        }
    }
}
