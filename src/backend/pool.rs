//! Connections to one backend: keep-alive HTTP/1.1 connections, and for an `https://` backend that
//! negotiates `h2` by ALPN, one shared HTTP/2 connection that multiplexes every request. Owned by
//! the backend's live state, so a reload keeps them and a drain can close them.
//!
//! An HTTP/1.1 connection idle in the pool for `PARK_AFTER` is parked: hyper's connection over it
//! ends, with its read and write buffers and its task (about 30 KiB), and the pool keeps the
//! stream: the socket, and over TLS rustls's session. The next request that needs it starts a new
//! hyper connection over the stream. nginx and HAProxy likewise hold no buffers for an idle
//! upstream keep-alive connection. Only a burst leaves many connections idle, and the next burst
//! reuses the warm ones first (the lists are LIFO). A sweep every `SWEEP_EVERY` parks, closes
//! parked streams the backend closed or wrote to, and expires connections idle for
//! `timeouts.idle`, with or without traffic.
//!
//! A bodiless GET or HEAD to a plain backend ([`ConnPool::send_bodiless`]) is exchanged without
//! hyper (see `h1`), on a parked stream or a new one; its stream, which no task drives, is parked
//! again as soon as its response has been read to the end.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::uri::Authority;
use http::{Request, Response, Uri, Version};
use http_body_util::{Either, Empty};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::{self, SendRequest};
use hyper::client::conn::{http2, TrySendError};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
// tokio's clock, as `Upload`'s: a paused test clock governs idle times too.
use tokio::time::Instant;
use tokio_rustls::TlsConnector;

use super::h1::{self, ResponseBody};
use crate::config::{Timeouts, UpstreamTls};
use crate::error::ProxyError;

/// Idle connections kept per backend at most; more are closed when they return.
const MAX_IDLE: usize = 1024;

/// How long an HTTP/1.1 connection stays idle in the pool, ready at once, before it is parked.
const PARK_AFTER: Duration = Duration::from_secs(1);

/// How often a pool with idle connections parks and expires them, traffic or not.
const SWEEP_EVERY: Duration = Duration::from_millis(500);

/// How far a request body has been sent: shared between the body, the exchange (whose
/// `response_header` clock runs from the body's last progress), the connection (which is clean
/// for reuse only once the body has ended) and the request path (which tells the client's
/// failures from the backend's).
#[derive(Debug)]
pub struct Upload {
    // tokio's clock, like the deadline it extends, so a paused test clock governs both.
    start: tokio::time::Instant,
    last_progress_ns: AtomicU64,
    done: AtomicBool,
    /// `UPLOAD_OK`, `UPLOAD_BROKEN` or `UPLOAD_TOO_LARGE`.
    outcome: AtomicU8,
}

const UPLOAD_OK: u8 = 0;
const UPLOAD_BROKEN: u8 = 1;
const UPLOAD_TOO_LARGE: u8 = 2;

/// A request body that grew past `limits.max_body_bytes`.
#[derive(Debug, thiserror::Error)]
#[error("request body larger than {0} bytes")]
pub struct BodyTooLarge(pub u64);

impl Upload {
    fn new() -> Self {
        Upload {
            start: tokio::time::Instant::now(),
            last_progress_ns: AtomicU64::new(0),
            done: AtomicBool::new(false),
            outcome: AtomicU8::new(UPLOAD_OK),
        }
    }

    /// Whether the client's body failed: it broke off, or its framing was invalid.
    pub fn is_broken(&self) -> bool {
        self.outcome.load(Ordering::Acquire) == UPLOAD_BROKEN
    }

    /// Whether the client's body was cut at `limits.max_body_bytes`.
    pub fn is_too_large(&self) -> bool {
        self.outcome.load(Ordering::Acquire) == UPLOAD_TOO_LARGE
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
        // `limits.max_body_bytes`, and the bytes sent so far.
        limit: Option<u64>,
        sent: u64,
    }
}

impl UpstreamBody {
    /// Streams the client's body, failing it once more than `limit` bytes arrive.
    pub fn streaming(body: Incoming, limit: Option<u64>) -> Self {
        let upload = (!body.is_end_stream()).then(|| Arc::new(Upload::new()));
        UpstreamBody {
            inner: Either::Left(body),
            upload,
            limit,
            sent: 0,
        }
    }

    /// No body.
    pub fn empty() -> Self {
        UpstreamBody {
            inner: Either::Right(Empty::new()),
            upload: None,
            limit: None,
            sent: 0,
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
                Poll::Ready(Some(Ok(frame))) => {
                    *this.sent += frame.data_ref().map_or(0, |d| d.len() as u64);
                    if let Some(limit) = this.limit.filter(|&limit| *this.sent > limit) {
                        // Cut: the backend gets a body that never ends, and its connection is
                        // not reused.
                        upload.outcome.store(UPLOAD_TOO_LARGE, Ordering::Release);
                        return Poll::Ready(Some(Err(BodyTooLarge(limit).into())));
                    }
                    upload.progressed();
                    if this.inner.is_end_stream() {
                        upload.done.store(true, Ordering::Release);
                    }
                }
                Poll::Ready(None) => {
                    upload.progressed();
                    upload.done.store(true, Ordering::Release);
                }
                Poll::Ready(Some(Err(_))) => {
                    upload.outcome.store(UPLOAD_BROKEN, Ordering::Release);
                }
                Poll::Pending => {}
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
    sender: Sender,
    upload: Option<Arc<Upload>>,
    max_idle: Duration,
    /// The pool's generation when the request started (the connection's, since the lists hold
    /// only the current generation's): one from before a `clear` never comes back.
    generation: u64,
}

/// One HTTP/1.1 connection, or a stream of the shared HTTP/2 one (which its own task keeps open
/// while the stream is).
enum Sender {
    Http1(Http1Sender),
    Http2,
    /// Driven by switchyard itself ([`super::h1`]): the stream, once the response has been read
    /// to its end and the connection can carry another request.
    Raw(Option<Box<dyn Stream>>),
}

/// The sending half of an HTTP/1.1 connection.
struct Http1Sender {
    send: SendRequest<UpstreamBody>,
    /// Set, to when the connection went idle, by the pool that parks it; its task then hands the
    /// stream back to the pool instead of closing it when the sender is dropped. None for a
    /// connection that can carry an upgrade, whose task hands the stream to the upgrade instead.
    park: Option<Arc<OnceLock<Instant>>>,
}

impl std::fmt::Debug for PooledConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self.sender {
            Sender::Http1(_) => "PooledConn(HTTP/1.1)",
            Sender::Http2 => "PooledConn(HTTP/2)",
            Sender::Raw(_) => "PooledConn(HTTP/1.1, raw)",
        })
    }
}

impl PooledConn {
    /// Whether the request's body was sent whole, so the connection carries no leftover of it.
    pub fn request_done(&self) -> bool {
        self.upload.as_ref().is_none_or(|u| u.is_done())
    }

    /// Hands back the stream of a response body read here to its end, for [`ConnPool::checkin`].
    pub fn give_back(&mut self, stream: Box<dyn Stream>) {
        if let Sender::Raw(slot) = &mut self.sender {
            *slot = Some(stream);
        }
    }
}

struct Idle {
    sender: Http1Sender,
    since: Instant,
}

/// A parked connection: the stream, idle since `since`.
struct Parked {
    stream: Box<dyn Stream>,
    since: Instant,
}

/// Ends parked streams as hyper ends a connection: over TLS a close_notify first (one attempt,
/// not waited for), then the TCP close. Called with the pool's lock released.
#[inline(always)]
fn close_parked(closing: Vec<Parked>) {
    // Almost always empty, and called twice per request: the test is inlined, the loop is not.
    if !closing.is_empty() {
        close_each(closing);
    }
}

fn close_each(closing: Vec<Parked>) {
    let mut cx = Context::from_waker(Waker::noop());
    for mut parked in closing {
        let _ = Pin::new(&mut parked.stream).poll_shutdown(&mut cx);
    }
}

/// A backend's idle HTTP/1.1 connections, oldest first in each list (see [`ConnPool::park`]).
#[derive(Default)]
struct Idles {
    ready: VecDeque<Idle>,
    parked: VecDeque<Parked>,
    /// `timeouts.idle` as the pool's last user saw it, for the sweeps.
    max_idle: Duration,
    /// A sweeping task runs; it ends once both lists are empty.
    sweeping: bool,
}

impl Idles {
    /// Drops the connections idle for `max_idle` or longer (a ready one's task then shuts it
    /// down); parked ones go to `closing`. Both lists are oldest first (see [`ConnPool::park`]),
    /// so the expired ones are at the front.
    #[inline(always)]
    fn expire(&mut self, now: Instant, max_idle: Duration, closing: &mut Vec<Parked>) {
        // One subtraction, then plain comparisons: this runs twice per request.
        let Some(cutoff) = now.checked_sub(max_idle) else {
            return;
        };
        while self.ready.front().is_some_and(|e| e.since <= cutoff) {
            self.ready.pop_front();
        }
        while self.parked.front().is_some_and(|e| e.since <= cutoff) {
            closing.extend(self.parked.pop_front());
        }
    }

    /// Expires; moves the parked streams the backend closed or wrote to into `closing` (as hyper
    /// closes a ready connection whose backend closed it); parks the ready connections idle for
    /// `PARK_AFTER`: their senders are dropped, and each one's task hands its stream back
    /// ([`ConnPool::park`]). Whether any idle connection is left to sweep later.
    fn sweep(&mut self, now: Instant, closing: &mut Vec<Parked>) -> bool {
        self.expire(now, self.max_idle, closing);
        for at in (0..self.parked.len()).rev() {
            if !still_quiet(&*self.parked[at].stream) {
                closing.extend(self.parked.remove(at));
            }
        }
        self.ready.retain(|e| {
            let Some(park) = &e.sender.park else {
                return true;
            };
            if now.saturating_duration_since(e.since) < PARK_AFTER {
                return true;
            }
            let _ = park.set(e.since);
            false
        });
        !(self.ready.is_empty() && self.parked.is_empty())
    }
}

/// An idle connection taken from the pool.
enum Checkout {
    Ready(Http1Sender),
    Parked(Box<dyn Stream>),
}

/// A stream to a backend that can be parked: plain TCP or TLS over it.
pub trait Stream: AsyncRead + AsyncWrite + Send + Unpin + 'static {
    /// The TCP socket underneath.
    fn tcp(&self) -> &TcpStream;
    /// Boxed for the pool's list of parked streams.
    fn boxed(self) -> Box<dyn Stream>;
}

impl Stream for TcpStream {
    fn tcp(&self) -> &TcpStream {
        self
    }

    fn boxed(self) -> Box<dyn Stream> {
        Box::new(self)
    }
}

impl Stream for tokio_rustls::client::TlsStream<TcpStream> {
    fn tcp(&self) -> &TcpStream {
        self.get_ref().0
    }

    fn boxed(self) -> Box<dyn Stream> {
        Box::new(self)
    }
}

impl Stream for Box<dyn Stream> {
    fn tcp(&self) -> &TcpStream {
        (**self).tcp()
    }

    fn boxed(self) -> Box<dyn Stream> {
        self
    }
}

/// Whether a parked stream can carry a request: the backend neither closed it nor sent anything
/// unasked while it was parked (a close, a TLS alert); nothing is read from it.
fn still_quiet(stream: &dyn Stream) -> bool {
    let mut byte = [0u8; 1];
    let mut buf = ReadBuf::new(&mut byte);
    let mut cx = Context::from_waker(Waker::noop());
    stream.tcp().poll_peek(&mut cx, &mut buf).is_pending()
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
    /// Nothing of the request reached the backend; the caller still has it
    /// ([`ConnPool::send_bodiless`] only borrows it).
    Unsent(ProxyError),
    /// The request was (maybe partly) sent; it must not be retried.
    Failed(ProxyError),
}

/// A backend's idle keep-alive connections (LIFO, so the warmest is reused first; the oldest are
/// expired from the other end), and its shared HTTP/2 connection, if it speaks h2.
pub struct ConnPool {
    address: SocketAddr,
    idle: Mutex<Idles>,
    /// Set once a TLS backend negotiated `h2`; every request but upgrades then shares it. Cleared
    /// when it closes, and by a drain.
    shared_h2: Mutex<Option<http2::SendRequest<UpstreamBody>>>,
    /// Bumped by `clear`: connections from before (still carrying a request, or still being
    /// made) are not pooled or shared afterwards.
    generation: AtomicU64,
    /// The TLS settings the backend is reached with now ([`UpstreamTls::settings_id`], 0 for
    /// plain TCP): a request routed under others makes connections that are not pooled.
    tls_id: AtomicU64,
}

/// The generation of a request whose TLS settings are no longer the backend's: never current.
const STALE: u64 = u64::MAX;

impl std::fmt::Debug for ConnPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnPool")
            .field("address", &self.address)
            .finish()
    }
}

/// A new connection, in the protocol the backend chose.
enum Connected {
    Http1(Http1Sender),
    Http2(http2::SendRequest<UpstreamBody>),
}

impl ConnPool {
    /// An empty pool for `address`.
    pub fn new(address: SocketAddr) -> Self {
        ConnPool {
            address,
            idle: Mutex::new(Idles::default()),
            shared_h2: Mutex::new(None),
            generation: AtomicU64::new(0),
            tls_id: AtomicU64::new(0),
        }
    }

    /// Takes `id` ([`UpstreamTls::settings_id`], 0 for plain TCP) as the TLS settings the backend
    /// is reached with from now on, before a snapshot with them is published. On a change the
    /// idle connections close: they were made under the old settings, and so are those of the
    /// requests routed before the change (see `generation_for`).
    pub fn use_tls(&self, id: u64) {
        if self.tls_id.load(Ordering::SeqCst) != id {
            // Stored before `clear` moves the generation on: a request that reads the new
            // generation then reads the new settings too.
            self.tls_id.store(id, Ordering::SeqCst);
            self.clear();
        }
    }

    /// An idle connection for a request of `generation`: none for a [`STALE`] one, whose TLS
    /// settings are not those the pool's connections were made under; it connects under its own.
    fn checkout_for(&self, generation: u64, idle: Duration, upgrade: bool) -> Option<Checkout> {
        if generation == STALE {
            return None;
        }
        self.checkout(idle, upgrade)
    }

    /// The generation a request's connections belong to: the pool's, or [`STALE`] when the
    /// request was routed under TLS settings (`tls_id`) the backend no longer has, so that what
    /// it connects is used once and never pooled. Without this, a request routed just before a
    /// reload that read the generation just after its `clear` would pool a connection made under
    /// the old settings.
    fn generation_for(&self, tls_id: u64) -> u64 {
        // The generation first: `use_tls` stores the settings before it moves the generation on.
        let generation = self.generation.load(Ordering::SeqCst);
        if self.tls_id.load(Ordering::SeqCst) == tls_id {
            generation
        } else {
            STALE
        }
    }

    /// Closes every idle connection, and lets go of the shared HTTP/2 one (it closes when its
    /// last request ends): a draining backend gets no new work to reuse them for, and a backend
    /// whose TLS settings changed must not be reached over the old ones.
    pub fn clear(&self) {
        let mut idle = self.lock_idle();
        // Moved on under the lock, so that a request that read the new generation finds the
        // lists already empty.
        self.generation.fetch_add(1, Ordering::SeqCst);
        idle.ready.clear();
        let closing: Vec<Parked> = idle.parked.drain(..).collect();
        drop(idle);
        close_parked(closing);
        self.lock_h2().take();
    }

    /// Idle HTTP/1.1 connections: how many are ready, and how many parked.
    pub fn idle_connections(&self) -> (usize, usize) {
        let idle = self.lock_idle();
        (idle.ready.len(), idle.parked.len())
    }

    fn lock_idle(&self) -> std::sync::MutexGuard<'_, Idles> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_h2(&self) -> std::sync::MutexGuard<'_, Option<http2::SendRequest<UpstreamBody>>> {
        self.shared_h2.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Returns a connection whose response was read to its end, so it can carry another request.
    /// One whose request body did not end (the backend answered early) is closed instead: the
    /// rest of that body would reach the next request. The HTTP/2 connection stays shared
    /// whatever its streams do.
    pub fn checkin(self: &Arc<Self>, conn: PooledConn) {
        if !conn.request_done() {
            return;
        }
        let sender = match conn.sender {
            Sender::Http1(sender) if !sender.send.is_closed() => Ok(sender),
            // Checked as a parked stream is, which also leaves a no-op waker in its read
            // registration in place of the request's task, that would otherwise stay pinned.
            Sender::Raw(Some(stream)) if still_quiet(&*stream) => Err(stream),
            _ => return,
        };
        let mut idle = self.lock_idle();
        // Compared under the lock, which `clear` holds while it moves the generation on and
        // empties the lists: a connection from before a `clear` never slips in after it.
        if conn.generation != self.generation.load(Ordering::SeqCst) {
            return;
        }
        // One clock read for the whole list (a read per entry was two per request).
        let now = Instant::now();
        idle.max_idle = conn.max_idle;
        let mut closing = Vec::new();
        idle.expire(now, conn.max_idle, &mut closing);
        if idle.ready.len() + idle.parked.len() < MAX_IDLE {
            match sender {
                Ok(sender) => idle.ready.push_back(Idle { sender, since: now }),
                // Nothing to end: the stream has no task, so it is parked at once.
                Err(stream) => idle.parked.push_back(Parked { stream, since: now }),
            }
        }
        let start_sweeping = !std::mem::replace(&mut idle.sweeping, true);
        drop(idle);
        close_parked(closing);
        if start_sweeping {
            self.spawn_sweeper();
        }
    }

    /// A ready connection if there is one (for an `upgrade`, one that can carry it), else, for
    /// any other request, a parked one that is still quiet.
    fn checkout(&self, max_idle: Duration, upgrade: bool) -> Option<Checkout> {
        let mut closing = Vec::new();
        let mut idle = self.lock_idle();
        let now = Instant::now();
        idle.max_idle = max_idle;
        idle.expire(now, max_idle, &mut closing);
        let found = 'found: {
            if upgrade {
                // Parked streams and the connections that would park are driven without hyper's
                // upgrade support; only a connection opened for an upgrade has it.
                while let Some(at) = idle.ready.iter().rposition(|e| e.sender.park.is_none()) {
                    let entry = idle.ready.remove(at).expect("found above");
                    if !entry.sender.send.is_closed() {
                        break 'found Some(Checkout::Ready(entry.sender));
                    }
                }
                break 'found None;
            }
            while let Some(entry) = idle.ready.pop_back() {
                if !entry.sender.send.is_closed() {
                    break 'found Some(Checkout::Ready(entry.sender));
                }
            }
            while let Some(entry) = idle.parked.pop_back() {
                // The list is oldest first only to within a sweep, so the age is checked here
                // too.
                let young = now.saturating_duration_since(entry.since) < max_idle;
                if young && still_quiet(&*entry.stream) {
                    break 'found Some(Checkout::Parked(entry.stream));
                }
                closing.push(entry);
            }
            None
        };
        drop(idle);
        close_parked(closing);
        found
    }

    /// Takes back the stream of a connection parked by [`Idles::sweep`], unless a `clear` came
    /// after it was made.
    fn park(self: &Arc<Self>, stream: Box<dyn Stream>, since: Instant, generation: u64) {
        let mut idle = self.lock_idle();
        if generation != self.generation.load(Ordering::SeqCst) {
            return;
        }
        // The streams one sweep parks come back in any order, but all went idle within one
        // `SWEEP_EVERY` of each other: the list stays oldest first to within that, which can
        // delay an expiry by as much.
        idle.parked.push_back(Parked { stream, since });
        // The sweep that parked it may have found both lists empty meanwhile, and stopped.
        let start_sweeping = !std::mem::replace(&mut idle.sweeping, true);
        drop(idle);
        if start_sweeping {
            self.spawn_sweeper();
        }
    }

    /// Parks and expires idle connections every `SWEEP_EVERY`, even with no traffic to do it,
    /// until there are none; holds the pool only while it sweeps.
    fn spawn_sweeper(self: &Arc<Self>) {
        let pool = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(SWEEP_EVERY).await;
                let Some(pool) = pool.upgrade() else {
                    return;
                };
                let mut closing = Vec::new();
                let mut idle = pool.lock_idle();
                let more = idle.sweep(Instant::now(), &mut closing);
                if !more {
                    idle.sweeping = false;
                }
                drop(idle);
                close_parked(closing);
                if !more {
                    return;
                }
            }
        });
    }

    /// The shared HTTP/2 connection, if there is one still open.
    fn checkout_h2(&self) -> Option<http2::SendRequest<UpstreamBody>> {
        let mut shared = self.lock_h2();
        match shared.as_ref() {
            Some(sender) if !sender.is_closed() => Some(sender.clone()),
            Some(_) => {
                *shared = None;
                None
            }
            None => None,
        }
    }

    /// Sends `request` on the shared HTTP/2 connection, an idle HTTP/1.1 one, or a new one, and
    /// waits for the response headers. `tls` is the backend's, for an `https://` address; an
    /// `upgrade` (WebSocket) always goes over HTTP/1.1, which is the only one that can carry it.
    ///
    /// A pooled connection that turns out to be closed before the request was written is skipped,
    /// so the keep-alive race costs a reconnect rather than a failed request.
    pub async fn send(
        self: &Arc<Self>,
        mut request: Request<UpstreamBody>,
        timeouts: &Timeouts,
        tls: Option<&UpstreamTls>,
        upgrade: bool,
    ) -> Result<(Response<ResponseBody>, PooledConn), SendError> {
        let upload = request.body().upload();
        let generation = self.generation_for(tls.map_or(0, UpstreamTls::settings_id));
        // Only TLS backends can have negotiated h2, so plain ones never take this lock.
        if let (Some(tls), false) = (tls, upgrade || generation == STALE) {
            if let Some(mut sender) = self.checkout_h2() {
                into_http2(&mut request, tls);
                let sending = sender.try_send_request(request);
                match self.exchange(sending, timeouts, &upload).await {
                    Ok(response) => {
                        return Ok((
                            from_http2(response).map(ResponseBody::Hyper),
                            self.pooled(Sender::Http2, upload, timeouts, generation),
                        ))
                    }
                    Err(SendError::NotSent { request: mut r, .. }) => {
                        into_http1(&mut r);
                        request = *r;
                    }
                    Err(failed) => {
                        // A connection that timed out or broke may be dead without having been
                        // closed (a silent partition): the next request opens a fresh one. Not
                        // when the client's own upload stalled or broke the stream: that says
                        // nothing of a connection every other request shares.
                        if upload.as_ref().is_none_or(|u| u.is_done()) {
                            self.lock_h2().take();
                        }
                        return Err(failed);
                    }
                }
            }
        }
        while let Some(checkout) = self.checkout_for(generation, timeouts.idle, upgrade) {
            let (mut sender, fresh) = match checkout {
                Checkout::Ready(sender) => (sender, false),
                Checkout::Parked(stream) => {
                    match self.handshake_http1(stream, true, generation).await {
                        Ok(sender) => (sender, true),
                        Err(_) => continue,
                    }
                }
            };
            // A pooled connection is ready at once or broken; never wait on one for long (and
            // build no timer in the common case where it is ready). A connection just started
            // over a parked stream takes the request as a new one does: a stream that turns out
            // closed gives it back unsent.
            if !fresh && !sender.send.is_ready() {
                match tokio::time::timeout(timeouts.connect, sender.send.ready()).await {
                    Ok(Ok(())) => {}
                    _ => continue,
                }
            }
            let sending = sender.send.try_send_request(request);
            match self.exchange(sending, timeouts, &upload).await {
                Ok(response) => {
                    return Ok((
                        response.map(ResponseBody::Hyper),
                        self.pooled(Sender::Http1(sender), upload, timeouts, generation),
                    ))
                }
                Err(SendError::NotSent { request: r, .. }) => request = *r,
                Err(failed) => return Err(failed),
            }
        }
        // Boxed: connecting (TCP, TLS, the HTTP/2 handshake) is the largest state this future
        // can be in, and the rarest, so it is kept out of the request's future, which is moved
        // into a box for every request (see `handle`).
        let connecting = self.connect(timeouts.connect, tls, upgrade, generation);
        let connected = match Box::pin(connecting).await {
            Ok(connected) => connected,
            Err(error) => {
                return Err(SendError::NotSent {
                    request: Box::new(request),
                    error,
                })
            }
        };
        match connected {
            Connected::Http1(mut sender) => {
                let sending = sender.send.try_send_request(request);
                let response = self.exchange(sending, timeouts, &upload).await?;
                Ok((
                    response.map(ResponseBody::Hyper),
                    self.pooled(Sender::Http1(sender), upload, timeouts, generation),
                ))
            }
            Connected::Http2(mut sender) => {
                // Only TLS backends negotiate h2.
                if let Some(tls) = tls {
                    into_http2(&mut request, tls);
                }
                {
                    // Shared only if no `clear` (a TLS settings change) came while connecting.
                    let mut shared = self.lock_h2();
                    if generation == self.generation.load(Ordering::SeqCst) {
                        *shared = Some(sender.clone());
                    }
                }
                let sending = sender.try_send_request(request);
                match self.exchange(sending, timeouts, &upload).await {
                    Ok(response) => Ok((
                        from_http2(response).map(ResponseBody::Hyper),
                        self.pooled(Sender::Http2, upload, timeouts, generation),
                    )),
                    Err(SendError::NotSent { mut request, error }) => {
                        into_http1(&mut request);
                        Err(SendError::NotSent { request, error })
                    }
                    Err(failed) => Err(failed),
                }
            }
        }
    }

    /// Sends a bodiless GET or HEAD ([`h1::bodiless`]) to a plain backend, exchanged without
    /// hyper (see `h1`) on a parked or new connection, and waits for the response headers. A
    /// ready connection hyper drives (one that last carried a request with a body) still takes
    /// it first, as a copy. The request is only borrowed, so the caller can send it again
    /// without having copied it beforehand.
    pub async fn send_bodiless(
        self: &Arc<Self>,
        request: &Request<UpstreamBody>,
        timeouts: &Timeouts,
    ) -> Result<(Response<ResponseBody>, PooledConn), SendError> {
        // Plain TCP only (see `h1`).
        let generation = self.generation_for(0);
        // A pooled stream the backend closed as the request went out (no answer came) is the
        // keep-alive race: the request goes again, once, on the next one. A second such close is
        // the backend's failure, like any other.
        let mut raced = false;
        while let Some(checkout) = self.checkout_for(generation, timeouts.idle, false) {
            match checkout {
                Checkout::Parked(stream) => {
                    match self
                        .exchange_raw(stream, request, timeouts, generation)
                        .await
                    {
                        Ok(exchanged) => return Ok(exchanged),
                        Err(h1::Failure::Closed(_)) if !raced => raced = true,
                        Err(failure) => return Err(SendError::Failed(self.raw_error(failure))),
                    }
                }
                Checkout::Ready(mut sender) => {
                    // As in `send`: ready at once or broken.
                    if !sender.send.is_ready() {
                        match tokio::time::timeout(timeouts.connect, sender.send.ready()).await {
                            Ok(Ok(())) => {}
                            _ => continue,
                        }
                    }
                    let sending = sender.send.try_send_request(bodiless_copy(request));
                    match self.exchange(sending, timeouts, &None).await {
                        Ok(response) => {
                            return Ok((
                                response.map(ResponseBody::Hyper),
                                self.pooled(Sender::Http1(sender), None, timeouts, generation),
                            ))
                        }
                        Err(SendError::NotSent { .. }) => {}
                        Err(failed) => return Err(failed),
                    }
                }
            }
        }
        self.connect_raw(request, timeouts, generation).await
    }

    /// Opens a plain TCP connection and exchanges a bodiless GET or HEAD on it (see `h1`).
    async fn connect_raw(
        &self,
        request: &Request<UpstreamBody>,
        timeouts: &Timeouts,
        generation: u64,
    ) -> Result<(Response<ResponseBody>, PooledConn), SendError> {
        let backend = self.address;
        let stream = match tokio::time::timeout(timeouts.connect, open_tcp(backend)).await {
            Ok(Ok(stream)) => stream,
            failed => {
                let error = match failed {
                    Ok(Err(source)) => ProxyError::Connect { backend, source },
                    _ => ProxyError::ConnectTimeout { backend },
                };
                return Err(SendError::Unsent(error));
            }
        };
        match self
            .exchange_raw(Box::new(stream), request, timeouts, generation)
            .await
        {
            Ok(exchanged) => Ok(exchanged),
            // On a new connection, a close is the backend's failure: it may have seen the request.
            Err(failure) => Err(SendError::Failed(self.raw_error(failure))),
        }
    }

    fn raw_error(&self, failure: h1::Failure) -> ProxyError {
        let backend = self.address;
        match failure {
            h1::Failure::Closed(source) | h1::Failure::Broken(source) => {
                ProxyError::UpstreamIo { backend, source }
            }
            h1::Failure::TimedOut => ProxyError::ResponseTimeout { backend },
        }
    }

    /// Exchanges `request` on `stream` (see `h1`), waiting `response_header` for the head; a
    /// timeout is a failure like a broken response.
    async fn exchange_raw(
        &self,
        stream: Box<dyn Stream>,
        request: &Request<UpstreamBody>,
        timeouts: &Timeouts,
        generation: u64,
    ) -> Result<(Response<ResponseBody>, PooledConn), h1::Failure> {
        let exchanging = h1::exchange(stream, request);
        match tokio::time::timeout(timeouts.response_header, exchanging).await {
            Ok(Ok((response, reusable))) => Ok((
                response,
                self.pooled(Sender::Raw(reusable), None, timeouts, generation),
            )),
            Ok(Err(failure)) => Err(failure),
            Err(_) => Err(h1::Failure::TimedOut),
        }
    }

    fn pooled(
        &self,
        sender: Sender,
        upload: Option<Arc<Upload>>,
        timeouts: &Timeouts,
        generation: u64,
    ) -> PooledConn {
        PooledConn {
            sender,
            upload,
            max_idle: timeouts.idle,
            generation,
        }
    }

    /// Waits for the response headers of a request being sent. `response_header` runs from the
    /// request body's last progress, so a slow but steady upload is not cut, a stalled one is.
    async fn exchange(
        &self,
        sending: impl std::future::Future<
            Output = Result<Response<Incoming>, TrySendError<Request<UpstreamBody>>>,
        >,
        timeouts: &Timeouts,
        upload: &Option<Arc<Upload>>,
    ) -> Result<Response<Incoming>, SendError> {
        let backend = self.address;
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

    /// Connects, over TLS for an `https://` backend, in HTTP/2 when it chose `h2` by ALPN.
    async fn connect(
        self: &Arc<Self>,
        limit: Duration,
        tls: Option<&UpstreamTls>,
        upgrade: bool,
        generation: u64,
    ) -> Result<Connected, ProxyError> {
        let backend = self.address;
        let connecting = async {
            let stream = open_tcp(backend).await?;
            // A connection opened for an upgrade keeps hyper's upgrade support, and so never parks.
            let parks = !upgrade;
            let Some(tls) = tls else {
                return self
                    .handshake_http1(stream, parks, generation)
                    .await
                    .map(Connected::Http1);
            };
            let config = if upgrade {
                &tls.client_http1
            } else {
                &tls.client
            };
            let stream = TlsConnector::from(Arc::clone(config))
                .connect(tls.server_name.clone(), stream)
                .await?;
            if stream.get_ref().1.alpn_protocol() == Some(b"h2") {
                handshake_http2(stream).await.map(Connected::Http2)
            } else {
                self.handshake_http1(stream, parks, generation)
                    .await
                    .map(Connected::Http1)
            }
        };
        match tokio::time::timeout(limit, connecting).await {
            Err(_) => Err(ProxyError::ConnectTimeout { backend }),
            Ok(Err(source)) => Err(ProxyError::Connect { backend, source }),
            Ok(Ok(connected)) => Ok(connected),
        }
    }

    /// Starts an HTTP/1.1 connection over `stream` (new, or parked) for a request that started
    /// in the pool's `generation`. One that `parks` can be parked by the pool, but cannot carry
    /// an upgrade.
    async fn handshake_http1<I: Stream>(
        self: &Arc<Self>,
        stream: I,
        parks: bool,
        generation: u64,
    ) -> std::io::Result<Http1Sender> {
        let (send, conn) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(std::io::Error::other)?;
        if !parks {
            tokio::spawn(async move {
                // Errors here surface on the request that used the connection.
                let _ = conn.with_upgrades().await;
            });
            return Ok(Http1Sender { send, park: None });
        }
        let park = Arc::new(OnceLock::new());
        let parked = Arc::clone(&park);
        let pool = Arc::downgrade(self);
        tokio::spawn(drive_parkable(conn, parked, pool, generation));
        Ok(Http1Sender {
            send,
            park: Some(park),
        })
    }
}

/// A TCP connection to `backend`, with Nagle off: a request's head must not wait for an ACK.
async fn open_tcp(backend: SocketAddr) -> std::io::Result<TcpStream> {
    let stream = TcpStream::connect(backend).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Runs an HTTP/1.1 connection until its sender is dropped (or it fails, or the backend closes
/// it), then, if the pool dropped the sender to park it, hands the bare stream back; otherwise
/// shuts the stream down, as hyper would have.
async fn drive_parkable<I: Stream>(
    mut conn: http1::Connection<TokioIo<I>, UpstreamBody>,
    park: Arc<OnceLock<Instant>>,
    pool: Weak<ConnPool>,
    generation: u64,
) {
    // Errors here surface on the request that used the connection.
    if std::future::poll_fn(|cx| conn.poll_without_shutdown(cx))
        .await
        .is_err()
    {
        return;
    }
    let parts = conn.into_parts();
    let mut stream = parts.io.into_inner();
    // Unread bytes would belong to no request (nothing is in flight on a parked connection). The
    // peek also puts a no-op waker in the socket's read registration in place of this task's:
    // that waker would keep the finished task's memory (1.6 KiB) for as long as the stream stays
    // parked.
    if let (Some(&since), true) = (park.get(), parts.read_buf.is_empty()) {
        if let (true, Some(pool)) = (still_quiet(&stream), pool.upgrade()) {
            pool.park(stream.boxed(), since, generation);
            return;
        }
    }
    let _ = stream.shutdown().await;
}

async fn handshake_http2<I>(io: I) -> std::io::Result<http2::SendRequest<UpstreamBody>>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        // A shared connection that went silent (a partition, a backend that died without a FIN)
        // is found by its pings within half a minute, not by the kernel after a quarter hour.
        .keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true)
        .handshake(TokioIo::new(io))
        .await
        .map_err(std::io::Error::other)?;
    tokio::spawn(async move {
        // Errors here surface on the requests in flight on the connection.
        let _ = conn.await;
    });
    Ok(sender)
}

/// Rewrites a request made for HTTP/1.1 (origin-form target, `Host` header) for HTTP/2, whose
/// `:authority` takes the place of `Host` and which needs `:scheme` (RFC 9113 §8.3.1). A request
/// without a usable `Host` is addressed to the backend's own `HOST:port`.
fn into_http2(request: &mut Request<UpstreamBody>, tls: &UpstreamTls) {
    let authority = request
        .headers_mut()
        .remove(header::HOST)
        .and_then(|host| Authority::try_from(host.as_bytes()).ok())
        .unwrap_or_else(|| tls.authority.clone());
    let mut parts = std::mem::take(request.uri_mut()).into_parts();
    parts.scheme = Some(http::uri::Scheme::HTTPS);
    parts.authority = Some(authority);
    if parts.path_and_query.is_none() {
        parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
    }
    // Scheme, authority and path are all set, which is all `from_parts` asks.
    *request.uri_mut() = Uri::from_parts(parts).unwrap_or_default();
    *request.version_mut() = Version::HTTP_2;
}

/// A bodiless request's copy: for a connection hyper drives (which takes the request it sends),
/// and for a retry.
pub fn bodiless_copy(request: &Request<UpstreamBody>) -> Request<UpstreamBody> {
    let mut copy = Request::new(UpstreamBody::empty());
    *copy.method_mut() = request.method().clone();
    *copy.uri_mut() = request.uri().clone();
    *copy.version_mut() = request.version();
    *copy.headers_mut() = request.headers().clone();
    copy
}

/// Undoes [`into_http2`] for a request that was not sent, so it can go over HTTP/1.1 (to this
/// backend or, as a retry, to another).
fn into_http1(request: &mut Request<UpstreamBody>) {
    if let Some(authority) = request.uri().authority() {
        if let Ok(host) = HeaderValue::from_str(authority.as_str()) {
            request.headers_mut().insert(header::HOST, host);
        }
    }
    let path = request.uri().path_and_query().cloned();
    *request.uri_mut() = path.map_or_else(Uri::default, Uri::from);
    *request.version_mut() = Version::HTTP_11;
}

/// A response that came over HTTP/2, labelled HTTP/1.1 like every other upstream response (the
/// client's own connection decides the version it is sent in).
fn from_http2(mut response: Response<Incoming>) -> Response<Incoming> {
    *response.version_mut() = Version::HTTP_11;
    response
}
