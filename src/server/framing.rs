//! HTTP/1 request framing, checked below hyper, where the client's bytes are still raw.
//!
//! hyper's parser (httparse) already refuses what it cannot read — obs-fold lines, a space before
//! the colon, Content-Lengths that differ, a Transfer-Encoding whose last coding is not
//! `chunked`, invalid chunk sizes — with `400` and a closed connection. What it accepts, as RFC
//! 9112 allows a server to, a proxy should refuse: lines ending in a bare LF, and Content-Length
//! together with Transfer-Encoding (hyper lets chunked win and drops Content-Length, so the
//! request is forwarded safely, but nothing of the conflict is left for the proxy to see). It
//! also answers any oversized head with `431`, an overlong request line included. So this layer
//! reads the client's bytes before hyper does: it collects each request head whole, checks it,
//! and only then hands it on. A head it refuses is replaced by a stand-in request that carries
//! nothing of it; the service answers the stand-in with the refusal's status and
//! `Connection: close`, and nothing the client sends after it is read.
//!
//! To know where each head starts, it follows the body framing it admitted: a Content-Length, or
//! a chunked body (whose syntax it reads as strictly as hyper does; on anything else hyper fails
//! the body and closes the connection, and this layer steps aside). After a request that asks to
//! switch protocols it reads nothing more until the service says how the request was answered:
//! a switch (`101`) makes the rest of the connection a tunnel, which it passes untouched; any
//! other answer and the next head is checked like the others. After the HTTP/2 preface it steps
//! aside for good: HTTP/2 frames its own requests.

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::mem::MaybeUninit;
use std::ops::Range;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll, Waker};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

use super::idle::Activity;

/// What replaces a refused head: a request hyper reads without trouble, with no body, that ends
/// the connection. The service never looks at it beyond its verdict.
const STAND_IN: &[u8] = b"GET / HTTP/1.1\r\nconnection: close\r\n\r\n";
/// The first line of the HTTP/2 connection preface (RFC 9113 §3.4).
const H2_PREFACE_LINE: &[u8] = b"PRI * HTTP/2.0";
/// What a head buffer starts with: most request heads fit.
const HEAD_CAPACITY: usize = 1024;
/// Bytes read from the socket at a time while a head is being collected.
const READ_CHUNK: usize = 8192;
/// Bytes read and dropped after a refused head, at most: enough for the client to read the
/// answer rather than a reset, not enough to keep reading a flood.
const DRAIN_LIMIT: usize = 1024 * 1024;

/// Why a request head was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// A line ended in a bare LF, or a CR was not followed by LF (RFC 9112 §2.2).
    LineEnding,
    /// Both Content-Length and Transfer-Encoding (RFC 9112 §6.1: a smuggling attempt).
    LengthAndChunked,
    /// Content-Length repeated, or not a decimal number.
    ContentLength,
    /// A Transfer-Encoding other than one `chunked` (another case, a tab, a list, a second
    /// line), or one in an HTTP/1.0 request.
    TransferEncoding,
    /// The request line alone is longer than the limit.
    RequestLineTooLong {
        /// `limits.max_header_bytes`.
        limit: usize,
    },
    /// The request line and header lines together are larger than the limit.
    HeadTooLarge,
    /// More header lines than the limit.
    TooManyHeaders,
}

impl Rejection {
    /// A short, client-safe reason.
    pub fn reason(self) -> &'static str {
        match self {
            Rejection::LineEnding => "line not ended by CRLF",
            Rejection::LengthAndChunked => "both Content-Length and Transfer-Encoding",
            Rejection::ContentLength => "invalid or repeated Content-Length",
            Rejection::TransferEncoding => "Transfer-Encoding other than one `chunked`",
            Rejection::RequestLineTooLong { .. } => "request line too long",
            Rejection::HeadTooLarge => "request head too large",
            Rejection::TooManyHeaders => "too many header fields",
        }
    }
}

/// How large a head may be.
#[derive(Debug, Clone, Copy)]
pub struct HeadLimits {
    /// Request line plus header lines, line endings and the empty line included.
    pub max_bytes: usize,
    /// Header lines.
    pub max_fields: usize,
}

/// What was decided about one request head.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Verdict {
    /// Why the head was refused; `None` when it passed.
    pub rejection: Option<Rejection>,
    /// The request asks to switch protocols: nothing after it is read until
    /// [`Verdicts::switched`] says how it was answered.
    pub upgrade: bool,
}

/// Between the reading side of one connection and its service: the verdicts on its request
/// heads, in order (hyper hands the service one request per head it was given, in the same
/// order, so the service takes one per HTTP/1 request), and how an upgrade request was answered.
#[derive(Debug, Default)]
pub struct Verdicts {
    heads: Mutex<VecDeque<Verdict>>,
    switch: Mutex<Switch>,
    /// Responses hyper has finished with (see [`Answered`]).
    answered: AtomicU64,
    /// The end of the stream hyper last read was the connection letting go of it while idle,
    /// not the client closing (see [`CheckedIo::parks_when_idle`]).
    parked: AtomicBool,
}

/// How the last upgrade request was answered, and who waits to know.
#[derive(Debug, Default)]
struct Switch {
    switched: Option<bool>,
    reader: Option<Waker>,
}

impl Verdicts {
    fn push(&self, verdict: Verdict) {
        self.heads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push_back(verdict);
    }

    /// The verdict on the next HTTP/1 request (a passing one when the layer had stepped aside).
    pub fn next(&self) -> Verdict {
        self.heads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop_front()
            .unwrap_or_default()
    }

    /// Says how a request whose verdict had `upgrade` was answered: `switched` when the
    /// connection became a tunnel. Called before the answer is handed to hyper.
    pub fn switched(&self, switched: bool) {
        let mut switch = self.switch.lock().unwrap_or_else(|e| e.into_inner());
        switch.switched = Some(switched);
        if let Some(reader) = switch.reader.take() {
            reader.wake();
        }
    }

    /// Frees the queue of verdicts, empty on a connection between requests, for a connection
    /// that waits long: a queue keeps its buffer when emptied.
    fn release(&self) {
        let mut heads = self.heads.lock().unwrap_or_else(|e| e.into_inner());
        if heads.is_empty() {
            *heads = VecDeque::new();
        }
    }

    /// Counts one response hyper has finished with: written whole into its buffer, or dropped.
    fn answer(&self) {
        // Read only by the connection's own task, which is also where HTTP/1 bodies are dropped
        // (HTTP/2 streams run in tasks of their own, but HTTP/2 connections never park): no
        // ordering with other memory is needed.
        self.answered.fetch_add(1, Ordering::Relaxed);
    }

    /// Whether hyper's connection ended because the stream let go of it while idle (see
    /// [`CheckedIo::parks_when_idle`]); resets it.
    pub(crate) fn take_parked(&self) -> bool {
        self.parked.swap(false, Ordering::Relaxed)
    }

    fn parked(&self) -> bool {
        self.parked.load(Ordering::Relaxed)
    }

    /// How the awaited upgrade was answered, once it was; until then `cx` is woken by it.
    fn take_switched(&self, cx: &Context<'_>) -> Option<bool> {
        let mut switch = self.switch.lock().unwrap_or_else(|e| e.into_inner());
        let switched = switch.switched.take();
        if switched.is_none() {
            switch.reader = Some(cx.waker().clone());
        }
        switched
    }
}

pin_project! {
    /// A response body that counts itself as answered in its connection's [`Verdicts`] when hyper
    /// drops it, which hyper does once the body's last frame is in its write buffer (or the
    /// response is abandoned). Until every request head handed on is answered, the connection
    /// is busy and does not let go of hyper (see [`CheckedIo::parks_when_idle`]).
    /// Over HTTP/2 it also tells the connection's idle check when it waits on the client to read
    /// (see [`Activity::client_turn`]).
    pub(crate) struct Answered<B> {
        #[pin]
        body: B,
        counted: AnswerOnDrop,
        turn: ClientTurn,
    }
}

/// Counts the answer when dropped, for [`Answered`].
struct AnswerOnDrop(Arc<Verdicts>);

impl Drop for AnswerOnDrop {
    fn drop(&mut self) {
        self.0.answer();
    }
}

/// Whether, and since which period, a response body waits on the client, for [`Answered`].
///
/// HTTP/2 only. hyper asks an HTTP/2 body for more as soon as its stream has window again, which
/// a client that reads at all, however slowly, keeps opening. An HTTP/1 body can wait on hyper's
/// write buffer (up to 16 frames) for longer while a slow client is reading steadily; there the
/// connection's own idle rule (no byte moved) is the one that tells a client that does not read.
struct ClientTurn {
    activity: Option<Arc<Activity>>,
    since: Option<u32>,
}

impl ClientTurn {
    fn begin(&mut self) {
        if let Some(activity) = &self.activity {
            self.since = Some(activity.client_turn());
        }
    }

    fn end(&mut self) {
        if let (Some(period), Some(activity)) = (self.since.take(), &self.activity) {
            activity.client_read(period);
        }
    }
}

impl Drop for ClientTurn {
    fn drop(&mut self) {
        self.end();
    }
}

impl<B> Answered<B> {
    /// Wraps the body of the answer to a request on the connection of `verdicts`; `activity` is
    /// the connection's for an HTTP/2 request, else none.
    pub(crate) fn new(body: B, verdicts: Arc<Verdicts>, activity: Option<Arc<Activity>>) -> Self {
        Answered {
            body,
            counted: AnswerOnDrop(verdicts),
            turn: ClientTurn {
                activity,
                since: None,
            },
        }
    }
}

impl<B: hyper::body::Body> hyper::body::Body for Answered<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<B::Data>, B::Error>>> {
        let mut this = self.project();
        this.turn.end();
        let polled = this.body.as_mut().poll_frame(cx);
        // hyper asks for the next frame once the client has room for it; after the last one it
        // does not ask again.
        if matches!(polled, Poll::Ready(Some(Ok(_)))) && !this.body.is_end_stream() {
            this.turn.begin();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

pin_project! {
    /// A client connection whose request heads are checked before hyper reads them.
    #[derive(Debug)]
    pub struct CheckedIo<T> {
        #[pin]
        inner: T,
        scanner: Scanner,
        clock: Clock,
        client_header: Duration,
        // Dropping `inner` ends the stream as a shutdown would (plain TCP).
        close_is_shutdown: bool,
        // Ends hyper's connection when it waits for a head with nothing to read.
        parks: bool,
        // hyper has written bytes since it last flushed: they may still sit in its buffer.
        unflushed: bool,
    }
}

impl<T> CheckedIo<T> {
    /// Wraps a client connection whose first head must arrive within `client_header`; verdicts
    /// go to `verdicts`.
    ///
    /// Later heads are timed by hyper, which starts its `header_read_timeout` when it starts
    /// waiting for one, or, once the connection has let go of hyper while idle, by this layer
    /// again. The first one is read before the server has even chosen HTTP/1 or HTTP/2 (see
    /// [`CheckedIo::poll_opening`]), and this layer holds its bytes back until it is whole, so
    /// nothing else would time it.
    pub fn new(
        inner: T,
        limits: HeadLimits,
        verdicts: Arc<Verdicts>,
        client_header: Duration,
    ) -> Self {
        CheckedIo {
            inner,
            scanner: Scanner::new(limits, verdicts),
            clock: Clock {
                sleep: Some(Box::pin(tokio::time::sleep(client_header))),
                timing: Timing::Head,
            },
            client_header,
            close_is_shutdown: false,
            parks: false,
            unflushed: false,
        }
    }

    /// Lets go of hyper whenever the connection is idle: when hyper waits for the next request
    /// head, every request is answered and flushed, and the client has sent nothing for 10 ms
    /// (`PARK_AFTER`; never after an upgrade answered without switching), hyper reads
    /// the end of the stream and ends its connection (gracefully, as for a client that closed),
    /// and this layer skips the shutdown that follows. The server then takes the stream back
    /// ([`Verdicts::take_parked`] says so) and waits for the next head with
    /// [`poll_opening`](Self::poll_opening). hyper keeps an 8 KiB read buffer and an 8 KiB
    /// write buffer for as long as its connection lives, sized by neither its caller nor the
    /// traffic; an idle keep-alive connection then holds neither, as nginx and HAProxy let go
    /// of their buffers on idle connections.
    pub fn parks_when_idle(mut self) -> Self {
        self.parks = true;
        self
    }

    /// Whether a request head has been handed on: in a connection waiting for a head, that it
    /// has parked rather than not yet been served.
    pub(crate) fn has_served(&self) -> bool {
        self.scanner.heads > 0
    }

    /// The verdicts on this connection's heads, shared with its service.
    pub(crate) fn verdicts(&self) -> &Arc<Verdicts> {
        &self.scanner.verdicts
    }

    /// Says that dropping the wrapped stream ends it just as shutting it down would (a plain
    /// TCP stream: `close` sends the FIN), so a final shutdown outside a tunnel can be skipped.
    pub fn close_is_shutdown(mut self) -> Self {
        self.close_is_shutdown = true;
        self
    }
}

/// What a parked connection's [`CheckedIo`] keeps while its stream sleeps without a task (see
/// [`CheckedIo::into_dormant`]): a parked connection has nothing in hand, so its limits, its
/// verdicts and the deadline of its next head are all there is.
#[derive(Debug)]
pub(crate) struct Dormancy {
    limits: HeadLimits,
    verdicts: Arc<Verdicts>,
    heads: u64,
    client_header: Duration,
    close_is_shutdown: bool,
    /// When the next head must be whole: `client_header` after the last answer.
    head_deadline: tokio::time::Instant,
}

impl Dormancy {
    /// When the next head must be whole; a connection still silent then is closed.
    pub(crate) fn head_deadline(&self) -> tokio::time::Instant {
        self.head_deadline
    }
}

impl<T> CheckedIo<T> {
    /// Whether the connection has parked (see [`parks_when_idle`](Self::parks_when_idle)) and
    /// has nothing in hand: no byte of a next head, nothing queued, every head answered.
    pub(crate) fn can_sleep(&self) -> bool {
        self.parks
            && self.scanner.heads > 0
            && self.clock.timing == Timing::Head
            && self.clock.sleep.is_some()
            && self.scanner.head.bytes.is_empty()
            && self.scanner.held.is_empty()
            && self.scanner.idle()
    }

    /// Takes a connection that [can sleep](Self::can_sleep) apart into its stream and what
    /// [`resume`](Self::resume) needs to check its next head; `None` (and the connection dropped)
    /// if it cannot sleep, which its caller has checked.
    pub(crate) fn into_dormant(self) -> Option<(T, Dormancy)> {
        if !self.can_sleep() {
            return None;
        }
        let head_deadline = self.clock.sleep.as_ref()?.deadline();
        let CheckedIo {
            inner,
            scanner,
            client_header,
            close_is_shutdown,
            ..
        } = self;
        scanner.verdicts.release();
        let dormancy = Dormancy {
            limits: scanner.limits,
            verdicts: scanner.verdicts,
            heads: scanner.heads,
            client_header,
            close_is_shutdown,
            head_deadline,
        };
        Some((inner, dormancy))
    }

    /// A dormant connection woken: waits for its next head as it did when it went dormant, by
    /// the same deadline, though with at least [`WAKE_GRACE`] to read what woke it.
    pub(crate) fn resume(inner: T, dormancy: Dormancy) -> Self {
        let now = tokio::time::Instant::now();
        let deadline = dormancy.head_deadline.max(now + WAKE_GRACE);
        let mut scanner = Scanner::new(dormancy.limits, dormancy.verdicts);
        scanner.heads = dormancy.heads;
        CheckedIo {
            inner,
            scanner,
            clock: Clock {
                sleep: Some(Box::pin(tokio::time::sleep_until(deadline))),
                timing: Timing::Head,
            },
            client_header: dormancy.client_header,
            close_is_shutdown: dormancy.close_is_shutdown,
            parks: true,
            unflushed: false,
        }
    }
}

/// What a client connection speaks, known from its first request head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opening {
    /// An HTTP/1 request head (checked, or refused and replaced by the stand-in).
    Http1,
    /// The HTTP/2 connection preface: prior knowledge, or what ALPN `h2` promised.
    Http2,
    /// The client closed before sending a whole head.
    Closed,
}

impl<T: AsyncRead> CheckedIo<T> {
    /// Reads until the first request head is whole (or, after a park, the next one), handing
    /// nothing on yet, and says what the connection speaks. Fails when the head does not arrive
    /// within `client_header`.
    ///
    /// This replaces hyper-util's version sniffing, which read the first 24 bytes on their own
    /// and gave them back to hyper as a separate read: hyper then had to grow its fresh 8 KiB
    /// read buffer to 16 KiB (copying it) to read the rest of the head, and kept the larger
    /// buffer for the connection's life.
    pub fn poll_opening(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<Opening>> {
        let mut this = self.project();
        loop {
            if this.scanner.has_queued() {
                return Poll::Ready(Ok(if this.scanner.http2 {
                    Opening::Http2
                } else {
                    Opening::Http1
                }));
            }
            if !ready!(read_head(this.inner.as_mut(), this.scanner, this.clock, cx))? {
                return Poll::Ready(Ok(Opening::Closed));
            }
        }
    }
}

/// Reads once from the socket into the head being collected (nothing of a head goes to hyper
/// before the whole head is checked); `false` at the end of the stream.
fn read_head<T: AsyncRead>(
    inner: Pin<&mut T>,
    scanner: &mut Scanner,
    clock: &mut Clock,
    cx: &mut Context<'_>,
) -> Poll<io::Result<bool>> {
    let mut scratch = [MaybeUninit::<u8>::uninit(); READ_CHUNK];
    let mut read = ReadBuf::uninit(&mut scratch);
    if inner.poll_read(cx, &mut read)?.is_pending() {
        if clock.timing == Timing::Head && clock.poll(cx).is_ready() {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "a request head did not arrive within client_header",
            )));
        }
        return Poll::Pending;
    }
    if read.filled().is_empty() {
        return Poll::Ready(Ok(false));
    }
    scanner.feed(read.filled(), false);
    match clock.timing {
        // The client is not idle any more.
        Timing::Idle => clock.timing = Timing::Off,
        // hyper times the rest, from when it waits for the next head.
        Timing::Head if scanner.has_queued() => {
            clock.timing = Timing::Off;
            if scanner.heads == 1 {
                // Often the only head (a client that closes after one request): the timer goes
                // with it. A connection that parked will be idle again, and keeps it.
                clock.sleep = None;
            }
        }
        _ => {}
    }
    Poll::Ready(Ok(true))
}

impl<T: AsyncRead> AsyncRead for CheckedIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let mut this = self.project();
        let scanner = this.scanner;
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            if scanner.hand_over(buf) {
                return Poll::Ready(Ok(()));
            }
            match scanner.state {
                State::Refused => {
                    // Read and drop what the client still sends, so that closing the socket after
                    // the answer does not reset the connection under it; never report the end of
                    // the stream, which could make hyper drop the answer.
                    let mut scratch = [MaybeUninit::<u8>::uninit(); READ_CHUNK];
                    while scanner.drained < DRAIN_LIMIT {
                        let mut dropped = ReadBuf::uninit(&mut scratch);
                        match this.inner.as_mut().poll_read(cx, &mut dropped) {
                            Poll::Ready(Ok(())) if !dropped.filled().is_empty() => {
                                scanner.drained += dropped.filled().len();
                            }
                            _ => break,
                        }
                    }
                    return Poll::Pending;
                }
                State::AwaitSwitch => {
                    let Some(switched) = scanner.verdicts.take_switched(cx) else {
                        return Poll::Pending;
                    };
                    scanner.resume(switched);
                }
                State::Head => {
                    match read_head(this.inner.as_mut(), scanner, this.clock, cx) {
                        Poll::Pending => {
                            let clock = this.clock;
                            if !(*this.parks && !*this.unflushed && scanner.idle())
                                || clock.timing == Timing::Head
                            {
                                return Poll::Pending;
                            }
                            if clock.timing == Timing::Off {
                                clock.set(PARK_AFTER, Timing::Idle);
                            }
                            if clock.poll(cx).is_pending() {
                                return Poll::Pending;
                            }
                            // Idle for PARK_AFTER: let go of hyper, to which the client closed
                            // between requests. `poll_opening` waits for the rest of the
                            // client_header that hyper started timing when it began to wait.
                            clock.set(this.client_header.saturating_sub(PARK_AFTER), Timing::Head);
                            // Empty lines a client sent after its last request (hyper would skip
                            // them) are dropped with their buffer.
                            scanner.head.reset();
                            scanner.verdicts.parked.store(true, Ordering::Relaxed);
                            return Poll::Ready(Ok(()));
                        }
                        Poll::Ready(result) => {
                            if !result? {
                                // The end of the stream; an unfinished head is dropped with it.
                                return Poll::Ready(Ok(()));
                            }
                        }
                    }
                }
                _ => {
                    // Body bytes stay where they were read, unless a head starts among them.
                    let before = buf.filled().len();
                    ready!(this.inner.as_mut().poll_read(cx, buf))?;
                    let read = buf.filled().len() - before;
                    if read == 0 {
                        return Poll::Ready(Ok(()));
                    }
                    let kept = scanner.feed(&buf.filled()[before..], true);
                    buf.set_filled(before + kept);
                    if kept > 0 {
                        return Poll::Ready(Ok(()));
                    }
                }
            }
        }
    }
}

impl<T: AsyncWrite> AsyncWrite for CheckedIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        *this.unflushed = true;
        this.inner.poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        *this.unflushed = true;
        this.inner.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        // hyper flushes only once its own buffer is written out.
        ready!(this.inner.poll_flush(cx))?;
        *this.unflushed = false;
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        if this.scanner.verdicts.parked() {
            // hyper ends a connection this layer let go of: the stream is taken back, not ended.
            return Poll::Ready(Ok(()));
        }
        // hyper shuts the write side down right before it drops a finished connection, and on a
        // plain TCP stream the `close` that follows sends the same FIN: one syscall per connection
        // saved. A shutdown is passed on in a tunnel (or one about to be: an upgrade whose answer
        // this layer has not read yet), where the other direction may still be copied, and over
        // TLS (its close_notify tells the client the response was not cut).
        let tunnel = this.scanner.tunnel || matches!(this.scanner.state, State::AwaitSwitch);
        if *this.close_is_shutdown && !tunnel {
            return Poll::Ready(Ok(()));
        }
        this.inner.poll_shutdown(cx)
    }
}

/// The least time a connection woken from dormancy has to read what woke it. Its socket's
/// readiness reaches tokio a reactor turn after the wake (a new registration starts not ready), and
/// a deadline passing meanwhile, or just before the wake, would close the connection with the
/// client's request unread.
const WAKE_GRACE: Duration = Duration::from_millis(100);

/// How long a keep-alive connection waits idle between requests before it lets go of hyper (see
/// [`CheckedIo::parks_when_idle`]). Letting go and taking up a new hyper connection for the next
/// head costs about 9,000 instructions (callgrind), a quarter of a request's, so a client sending
/// requests back to back keeps its hyper connection; a client that paused this long pays it
/// once, against the 16 KiB it no longer holds.
const PARK_AFTER: Duration = Duration::from_millis(10);

/// The one timer of a checked connection, and what it times now.
#[derive(Debug)]
struct Clock {
    /// Allocated when first needed; `None` while nothing is timed on a connection that never
    /// went idle.
    sleep: Option<Pin<Box<Sleep>>>,
    timing: Timing,
}

/// What [`Clock`] times.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Timing {
    /// Nothing: hyper has the connection and times it.
    Off,
    /// The head this layer waits for (the first, or the next after a park) must be whole by then.
    Head,
    /// hyper waits for the next head and the client sends nothing: the park is due then.
    Idle,
}

impl Clock {
    /// Times `timing`, due `after` from now. A later deadline than the armed one (the usual case
    /// for the idle timer, re-armed for each request) is recorded without touching the runtime's
    /// timer wheel.
    fn set(&mut self, after: Duration, timing: Timing) {
        let deadline = tokio::time::Instant::now() + after;
        match &mut self.sleep {
            Some(sleep) => sleep.as_mut().reset(deadline),
            None => self.sleep = Some(Box::pin(tokio::time::sleep_until(deadline))),
        }
        self.timing = timing;
    }

    /// Whether the timed moment has come; until then `cx` is woken by it.
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        match &mut self.sleep {
            Some(sleep) => sleep.as_mut().poll(cx),
            None => Poll::Pending,
        }
    }
}

/// Where the scanner is in the client's byte stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Collecting a request head.
    Head,
    /// Passing a Content-Length body: this many bytes are left.
    Body { left: u64, then: Then },
    /// Passing a chunked body.
    Chunked { chunk: Chunk, then: Then },
    /// Waiting to know whether an upgrade request switched protocols; what arrives meanwhile is
    /// held.
    AwaitSwitch,
    /// Stepped aside: HTTP/2, a tunnel, or a body hyper will refuse.
    Passing,
    /// A head was refused; the stand-in is the last thing hyper gets.
    Refused,
}

/// What follows a request's body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Then {
    /// The next request's head.
    Head,
    /// The answer decides: the request asked to switch protocols.
    AwaitSwitch,
}

impl Then {
    fn state(self) -> State {
        match self {
            Then::Head => State::Head,
            Then::AwaitSwitch => State::AwaitSwitch,
        }
    }
}

/// Where a chunked body is, as hyper's decoder reads it (RFC 9112 §7.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// The chunk size's hex digits; `digits` says whether one was seen.
    Size { size: u64, digits: bool },
    /// Spaces or tabs after the size.
    Space { size: u64 },
    /// A chunk extension, up to CR.
    Extension { size: u64 },
    /// The LF ending the size line.
    SizeLf { size: u64 },
    /// Chunk data: this many bytes are left.
    Data(u64),
    /// The CR after the data.
    DataCr,
    /// The LF after the data.
    DataLf,
    /// The start of a trailer line, or of the empty line that ends the body.
    LineStart,
    /// Inside a trailer line.
    Trailer,
    /// The LF ending a trailer line.
    TrailerLf,
    /// The LF of the empty line that ends the body.
    EndLf,
}

/// What one byte of chunk framing leads to.
enum Step {
    Next(Chunk),
    /// The body ended with this byte.
    Done,
    /// Not chunked syntax: hyper refuses the body.
    Broken,
}

impl Chunk {
    fn step(self, byte: u8) -> Step {
        use Chunk::*;
        let hex = (byte as char).to_digit(16).map(u64::from);
        match (self, byte) {
            (Size { size, .. }, _) if hex.is_some() => match size
                .checked_mul(16)
                .and_then(|s| s.checked_add(hex.unwrap_or_default()))
            {
                Some(size) => Step::Next(Size { size, digits: true }),
                None => Step::Broken,
            },
            (Size { digits: false, .. }, _) => Step::Broken,
            (Size { size, .. } | Space { size }, b' ' | b'\t') => Step::Next(Space { size }),
            (Size { size, .. } | Space { size }, b';') => Step::Next(Extension { size }),
            (Size { size, .. } | Space { size } | Extension { size }, b'\r') => {
                Step::Next(SizeLf { size })
            }
            (Size { .. } | Space { .. }, _) => Step::Broken,
            (Extension { .. }, b'\n') => Step::Broken,
            (Extension { size }, _) => Step::Next(Extension { size }),
            (SizeLf { size: 0 }, b'\n') => Step::Next(LineStart),
            (SizeLf { size }, b'\n') => Step::Next(Data(size)),
            (DataCr, b'\r') => Step::Next(DataLf),
            (DataLf, b'\n') => Step::Next(Size {
                size: 0,
                digits: false,
            }),
            (LineStart, b'\r') => Step::Next(EndLf),
            (Trailer, b'\r') => Step::Next(TrailerLf),
            (LineStart | Trailer, _) => Step::Next(Trailer),
            (TrailerLf, b'\n') => Step::Next(LineStart),
            (EndLf, b'\n') => Step::Done,
            _ => Step::Broken,
        }
    }
}

/// The head being collected, and what its lines said so far.
#[derive(Debug)]
struct Head {
    bytes: Vec<u8>,
    line_start: usize,
    request_line: Option<Range<usize>>,
    fields: usize,
    content_lengths: u32,
    /// `None` once a Content-Length was not a decimal number.
    length: Option<u64>,
    transfer_encodings: u32,
    chunked: bool,
    upgrade: bool,
}

impl Head {
    fn new() -> Self {
        Head {
            // Allocated when a head starts arriving, so an idle connection holds no buffer.
            bytes: Vec::new(),
            line_start: 0,
            request_line: None,
            fields: 0,
            content_lengths: 0,
            length: Some(0),
            transfer_encodings: 0,
            chunked: false,
            upgrade: false,
        }
    }

    /// Ready for the next head.
    fn reset(&mut self) {
        self.bytes = Vec::new();
        self.line_start = 0;
        self.request_line = None;
        self.fields = 0;
        self.content_lengths = 0;
        self.length = Some(0);
        self.transfer_encodings = 0;
        self.chunked = false;
        self.upgrade = false;
    }
}

/// The state machine behind [`CheckedIo`].
#[derive(Debug)]
struct Scanner {
    limits: HeadLimits,
    verdicts: Arc<Verdicts>,
    state: State,
    head: Head,
    /// Admitted bytes not yet handed to hyper, from `ready_at`.
    ready: Vec<u8>,
    ready_at: usize,
    /// Bytes that arrived while an upgrade's answer was awaited.
    held: Vec<u8>,
    /// Bytes read and dropped after a refusal.
    drained: usize,
    /// Heads completed (handed on or refused).
    heads: u64,
    /// The first head was the HTTP/2 preface's.
    http2: bool,
    /// An upgrade switched protocols: the connection is a tunnel now.
    tunnel: bool,
    /// An upgrade was answered without switching. hyper keeps such a request's pending upgrade
    /// until its connection ends, and would then hand the stream to it rather than end cleanly,
    /// so this connection never lets go of hyper.
    upgrade_refused: bool,
}

impl Scanner {
    fn new(limits: HeadLimits, verdicts: Arc<Verdicts>) -> Self {
        Scanner {
            limits,
            verdicts,
            state: State::Head,
            head: Head::new(),
            ready: Vec::new(),
            ready_at: 0,
            held: Vec::new(),
            drained: 0,
            heads: 0,
            http2: false,
            tunnel: false,
            upgrade_refused: false,
        }
    }

    /// Whether admitted bytes wait to be handed on: after a whole head, at least that head.
    fn has_queued(&self) -> bool {
        self.ready_at < self.ready.len()
    }

    /// Between requests with nothing in hand: no head begun (empty lines before a request line,
    /// which hyper skips, do not count), nothing queued for hyper, every head handed on answered,
    /// and no refused upgrade pending in hyper.
    fn idle(&self) -> bool {
        let head = &self.head;
        let blank = head.request_line.is_none() && head.line_start == head.bytes.len();
        self.state == State::Head
            && blank
            && !self.has_queued()
            && !self.upgrade_refused
            && self.verdicts.answered.load(Ordering::Relaxed) == self.heads
    }

    /// Copies admitted bytes into `buf`; whether there were any.
    fn hand_over(&mut self, buf: &mut ReadBuf<'_>) -> bool {
        let pending = &self.ready[self.ready_at..];
        if pending.is_empty() || buf.remaining() == 0 {
            return false;
        }
        let n = pending.len().min(buf.remaining());
        buf.put_slice(&pending[..n]);
        self.ready_at += n;
        if self.ready_at == self.ready.len() {
            // Let go, so that a connection waiting for its next request holds no buffer.
            self.ready = Vec::new();
            self.ready_at = 0;
        }
        true
    }

    /// Reads `data`, just taken from the socket. With `in_place`, the bytes before the first one
    /// that belongs to a head may stay where they are, and their count is returned; every other
    /// byte is taken (into the head, or admitted into `ready` behind it).
    fn feed(&mut self, data: &[u8], in_place: bool) -> usize {
        let mut kept = if in_place { None } else { Some(0) };
        let mut at = 0;
        while at < data.len() {
            let rest = &data[at..];
            let (used, admitted) = match self.state {
                State::Head => {
                    kept.get_or_insert(at);
                    (self.collect(rest), false)
                }
                State::Body { left, then } => {
                    let n = rest.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                    let left = left - n as u64;
                    self.state = if left == 0 {
                        then.state()
                    } else {
                        State::Body { left, then }
                    };
                    (n, true)
                }
                State::Chunked { chunk, then } => (self.chunked(chunk, then, rest), true),
                State::Passing => (rest.len(), true),
                State::AwaitSwitch => {
                    kept.get_or_insert(at);
                    self.held.extend_from_slice(rest);
                    (rest.len(), false)
                }
                // Nothing after a refused head reaches hyper.
                State::Refused => {
                    kept.get_or_insert(at);
                    (rest.len(), false)
                }
            };
            if admitted && kept.is_some() {
                self.ready.extend_from_slice(&rest[..used]);
            }
            at += used;
        }
        kept.unwrap_or(data.len())
    }

    /// Goes on after an upgrade request's answer: as a tunnel when it switched protocols, else
    /// with the next head; what was held meanwhile comes first.
    fn resume(&mut self, switched: bool) {
        let held = std::mem::take(&mut self.held);
        if switched {
            self.tunnel = true;
            self.state = State::Passing;
            self.ready.extend_from_slice(&held);
        } else {
            self.upgrade_refused = true;
            self.state = State::Head;
            self.feed(&held, false);
        }
    }

    /// Passes chunked body bytes from the start of `data`; returns how many.
    fn chunked(&mut self, chunk: Chunk, then: Then, data: &[u8]) -> usize {
        if let Chunk::Data(left) = chunk {
            let n = data.len().min(usize::try_from(left).unwrap_or(usize::MAX));
            let left = left - n as u64;
            let chunk = if left == 0 {
                Chunk::DataCr
            } else {
                Chunk::Data(left)
            };
            self.state = State::Chunked { chunk, then };
            return n;
        }
        let mut chunk = chunk;
        for (i, &byte) in data.iter().enumerate() {
            match chunk.step(byte) {
                Step::Next(Chunk::Data(size)) => {
                    self.state = State::Chunked {
                        chunk: Chunk::Data(size),
                        then,
                    };
                    return i + 1;
                }
                Step::Next(next) => chunk = next,
                Step::Done => {
                    self.state = then.state();
                    return i + 1;
                }
                Step::Broken => {
                    self.state = State::Passing;
                    return i + 1;
                }
            }
        }
        self.state = State::Chunked { chunk, then };
        data.len()
    }

    /// Takes head bytes from the start of `data` until the head is complete or refused; returns
    /// how many. Goes a line at a time (or to the end of `data`), finding line ends with `memchr`.
    fn collect(&mut self, data: &[u8]) -> usize {
        let mut at = 0;
        while at < data.len() {
            let rest = &data[at..];
            let take = if self.head.bytes.last() == Some(&b'\r') {
                // The last piece ended in a CR: its LF must come first.
                1
            } else {
                match memchr::memchr2(b'\r', b'\n', rest) {
                    None => rest.len(),
                    // A bare LF, refused below.
                    Some(i) if rest[i] == b'\n' => i + 1,
                    // Through the CR, and through its LF if that has come.
                    Some(i) => (i + 2).min(rest.len()),
                }
            };
            if self.head.bytes.capacity() == 0 {
                self.head.bytes.reserve(HEAD_CAPACITY.max(take));
            }
            self.head.bytes.extend_from_slice(&rest[..take]);
            at += take;
            if self.line_end() {
                return at;
            }
        }
        data.len()
    }

    /// Checks the bytes just added to the head: its size, its line endings, and the line they
    /// ended, if any. Whether the head is done with (handed on or refused).
    fn line_end(&mut self) -> bool {
        let head = &mut self.head;
        let len = head.bytes.len();
        if len > self.limits.max_bytes {
            let rejection = match head.request_line {
                None => Rejection::RequestLineTooLong {
                    limit: self.limits.max_bytes,
                },
                Some(_) => Rejection::HeadTooLarge,
            };
            self.refuse(rejection);
            return true;
        }
        // A CR must be followed by LF, and an LF preceded by CR.
        let last = head.bytes[len - 1];
        let after_cr = len >= 2 && head.bytes[len - 2] == b'\r';
        if (after_cr && last != b'\n') || (!after_cr && last == b'\n') {
            self.refuse(Rejection::LineEnding);
            return true;
        }
        if last != b'\n' {
            return false;
        }
        let line = head.line_start..len - 2;
        head.line_start = len;
        if !line.is_empty() {
            if head.request_line.is_none() {
                head.request_line = Some(line);
            } else if let Some(rejection) = self.field(line) {
                self.refuse(rejection);
                return true;
            }
            false
        } else if head.request_line.is_some() {
            self.complete();
            true
        } else {
            // Empty lines before the request line are ignored (RFC 9112 §2.2), as hyper does.
            false
        }
    }

    /// Notes what a header line says about framing; `Some` when it breaks a limit.
    fn field(&mut self, line: Range<usize>) -> Option<Rejection> {
        let head = &mut self.head;
        head.fields += 1;
        if head.fields > self.limits.max_fields {
            return Some(Rejection::TooManyHeaders);
        }
        let line = &head.bytes[line];
        // A line without a colon, or with space before it, is left to httparse, which refuses it.
        let colon = line.iter().position(|&b| b == b':')?;
        let (name, value) = (&line[..colon], &line[colon + 1..]);
        if name.eq_ignore_ascii_case(b"content-length") {
            head.content_lengths += 1;
            let digits = value.trim_ascii();
            head.length = head.length.zip(decimal(digits)).map(|(_, n)| n);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            head.transfer_encodings += 1;
            // Spaces around the value only: a tab there is what smuggling attempts use, and
            // real clients send exactly `chunked`.
            head.chunked = trim_spaces(value) == b"chunked";
        } else if name.eq_ignore_ascii_case(b"upgrade") {
            head.upgrade = true;
        }
        None
    }

    /// Checks a whole head and hands it on, or refuses it.
    fn complete(&mut self) {
        let head = &self.head;
        let line = &head.bytes[head.request_line.clone().unwrap_or_default()];
        if line == H2_PREFACE_LINE {
            // HTTP/2: the server's HTTP/2 connection takes it from here.
            self.http2 = self.heads == 0;
            self.heads += 1;
            self.admit_head();
            self.state = State::Passing;
            return;
        }
        let connect = line.starts_with(b"CONNECT ");
        let http11 = line.ends_with(b" HTTP/1.1");
        let te = head.transfer_encodings > 0;
        let rejection = if te && head.content_lengths > 0 {
            Some(Rejection::LengthAndChunked)
        } else if head.content_lengths > 1 || head.length.is_none() {
            Some(Rejection::ContentLength)
        } else if te && (head.transfer_encodings > 1 || !head.chunked || !http11) {
            Some(Rejection::TransferEncoding)
        } else {
            None
        };
        if let Some(rejection) = rejection {
            self.refuse(rejection);
            return;
        }
        // As hyper decides: an `Upgrade` in HTTP/1.1, or any CONNECT.
        let upgrade = (head.upgrade && http11) || connect;
        let then = if upgrade {
            Then::AwaitSwitch
        } else {
            Then::Head
        };
        self.state = match head.length {
            _ if te => State::Chunked {
                chunk: Chunk::Size {
                    size: 0,
                    digits: false,
                },
                then,
            },
            Some(left) if left > 0 => State::Body { left, then },
            _ => then.state(),
        };
        self.heads += 1;
        self.verdicts.push(Verdict {
            rejection: None,
            upgrade,
        });
        self.admit_head();
    }

    /// Queues the whole, checked head for hyper behind what is already queued, and starts the
    /// next one.
    fn admit_head(&mut self) {
        if self.ready.is_empty() {
            // The usual case: the head's buffer becomes the queue, nothing is copied.
            self.ready = std::mem::take(&mut self.head.bytes);
            self.ready_at = 0;
        } else {
            self.ready.extend_from_slice(&self.head.bytes);
        }
        self.head.reset();
    }

    /// Replaces the head being collected by the stand-in, and stops reading.
    fn refuse(&mut self, rejection: Rejection) {
        self.heads += 1;
        self.verdicts.push(Verdict {
            rejection: Some(rejection),
            upgrade: false,
        });
        self.ready.extend_from_slice(STAND_IN);
        self.head.reset();
        self.state = State::Refused;
    }
}

/// A Content-Length value: one or more ASCII digits that fit a u64.
fn decimal(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |n, &b| {
        let digit = (b as char).to_digit(10)?;
        n.checked_mul(10)?.checked_add(u64::from(digit))
    })
}

fn trim_spaces(mut value: &[u8]) -> &[u8] {
    while let [b' ', rest @ ..] = value {
        value = rest;
    }
    while let [rest @ .., b' '] = value {
        value = rest;
    }
    value
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: HeadLimits = HeadLimits {
        max_bytes: 256,
        max_fields: 4,
    };

    /// Feeds `input` in pieces of `piece` bytes (in place where allowed) and returns what hyper
    /// would get, and every verdict.
    fn run(input: &[u8], piece: usize) -> (Vec<u8>, Vec<Option<Rejection>>) {
        let verdicts = Arc::new(Verdicts::default());
        let mut scanner = Scanner::new(LIMITS, Arc::clone(&verdicts));
        let mut out = Vec::new();
        for data in input.chunks(piece) {
            let in_place = scanner.state != State::Head;
            if scanner.state == State::Refused {
                break;
            }
            let kept = scanner.feed(data, in_place);
            out.extend_from_slice(&data[..kept]);
            out.extend_from_slice(&scanner.ready[scanner.ready_at..]);
            scanner.ready.clear();
            scanner.ready_at = 0;
        }
        let verdicts = verdicts
            .heads
            .lock()
            .unwrap()
            .iter()
            .map(|v| v.rejection)
            .collect();
        (out, verdicts)
    }

    #[test]
    fn pipelined_requests_pass_unchanged_whatever_the_pieces() {
        let input: &[u8] = b"\r\nPOST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello\
            POST /b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding:  chunked \r\n\r\n\
            5;ext=1\r\nhello\r\nA \r\n0123456789\r\n0\r\nTrailer: 1\r\n\r\n\
            GET /c HTTP/1.1\r\nHost: x\r\n\r\n";
        for piece in [1, 2, 3, 7, 64, 4096] {
            let (out, verdicts) = run(input, piece);
            assert_eq!(out, input, "in pieces of {piece}");
            assert_eq!(verdicts, [None, None, None], "in pieces of {piece}");
        }
    }

    #[test]
    fn framing_that_could_be_read_two_ways_is_refused() {
        let cases: [(&[u8], Rejection); 10] = [
            (
                b"POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
                Rejection::LengthAndChunked,
            ),
            (
                b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
                Rejection::LengthAndChunked,
            ),
            (
                b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n",
                Rejection::ContentLength,
            ),
            (
                b"POST / HTTP/1.1\r\nContent-Length: +5\r\n\r\n",
                Rejection::ContentLength,
            ),
            (
                b"POST / HTTP/1.1\r\nTransfer-Encoding: Chunked\r\n\r\n",
                Rejection::TransferEncoding,
            ),
            (
                b"POST / HTTP/1.1\r\nTransfer-Encoding:\tchunked\r\n\r\n",
                Rejection::TransferEncoding,
            ),
            (
                b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
                Rejection::TransferEncoding,
            ),
            (
                b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
                Rejection::TransferEncoding,
            ),
            (b"GET / HTTP/1.1\nHost: x\n\n", Rejection::LineEnding),
            (
                b"GET / HTTP/1.1\r\nHost: x\rX: y\r\n\r\n",
                Rejection::LineEnding,
            ),
        ];
        for (input, rejection) in cases {
            let smuggled = [input, b"0\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n"].concat();
            let (out, verdicts) = run(&smuggled, 5);
            assert_eq!(out, STAND_IN, "{}", String::from_utf8_lossy(input));
            assert_eq!(verdicts, [Some(rejection)]);
        }
    }

    #[test]
    fn limits_tell_the_request_line_from_the_headers() {
        let long_line = [b"GET /".as_slice(), &[b'a'; 300]].concat();
        let (out, verdicts) = run(&long_line, 16);
        assert_eq!(out, STAND_IN);
        assert_eq!(
            verdicts,
            [Some(Rejection::RequestLineTooLong { limit: 256 })]
        );
        let long_header = [b"GET / HTTP/1.1\r\nX: ".as_slice(), &[b'a'; 300]].concat();
        assert_eq!(run(&long_header, 16).1, [Some(Rejection::HeadTooLarge)]);
        let many = b"GET / HTTP/1.1\r\nA: 1\r\nB: 1\r\nC: 1\r\nD: 1\r\nE: 1\r\n\r\n";
        assert_eq!(run(many, 16).1, [Some(Rejection::TooManyHeaders)]);
        let four = b"GET / HTTP/1.1\r\nA: 1\r\nB: 1\r\nC: 1\r\nD: 1\r\n\r\n";
        assert_eq!(run(four, 16), (four.to_vec(), vec![None]));
    }

    #[test]
    fn after_a_refused_head_nothing_passes() {
        let input =
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\nHost: x\n\nGET /c HTTP/1.1\r\n\r\n";
        let (out, verdicts) = run(input, 4096);
        let expected = [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".as_slice(), STAND_IN].concat();
        assert_eq!(out, expected);
        assert_eq!(verdicts, [None, Some(Rejection::LineEnding)]);
    }

    #[test]
    fn http2_steps_aside() {
        let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00\n\n";
        assert_eq!(run(preface, 3), (preface.to_vec(), vec![]));
    }

    #[test]
    fn after_an_upgrade_request_the_answer_decides() {
        let head = b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n";
        let after = b"\x81\x05\nbare\nGET /x HTTP/1.1\r\nhost: a\r\n\r\n";
        for switched in [true, false] {
            let verdicts = Arc::new(Verdicts::default());
            let mut scanner = Scanner::new(LIMITS, Arc::clone(&verdicts));
            scanner.feed(&[head.as_slice(), after].concat(), false);
            // The head goes on; what follows it waits for the answer.
            assert_eq!(scanner.ready, head);
            let verdict = verdicts.next();
            assert!(verdict.upgrade && verdict.rejection.is_none());
            scanner.ready.clear();
            scanner.resume(switched);
            if switched {
                // A tunnel: passed as it came, bare LFs and all.
                assert_eq!(scanner.ready, after);
                assert_eq!(scanner.state, State::Passing);
            } else {
                // Not switched: the bytes are a head again, and this one is refused.
                assert_eq!(scanner.ready, STAND_IN);
                assert_eq!(verdicts.next().rejection, Some(Rejection::LineEnding));
            }
        }
        // HTTP/1.0 cannot upgrade, as hyper sees it; CONNECT always asks to.
        let verdicts = Arc::new(Verdicts::default());
        let mut scanner = Scanner::new(LIMITS, Arc::clone(&verdicts));
        let heads = b"GET / HTTP/1.0\r\nUpgrade: x\r\n\r\nCONNECT a:1 HTTP/1.1\r\n\r\n";
        scanner.feed(heads, false);
        assert!(!verdicts.next().upgrade);
        assert!(verdicts.next().upgrade);
        assert_eq!(scanner.state, State::AwaitSwitch);
    }

    #[test]
    fn a_broken_chunked_body_is_left_to_hyper() {
        let input =
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nGET /x HTTP/1.1\n\n";
        let (out, verdicts) = run(input, 4096);
        assert_eq!(out, input);
        assert_eq!(verdicts, [None]);
        let overflow =
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1ffffffffffffffff\r\n";
        assert_eq!(run(overflow, 4096).0, overflow);
    }

    mod properties {
        //! The scanner under arbitrary input, and under valid requests cut anywhere.
        use proptest::prelude::*;

        use super::*;

        /// Feeds `input` in pieces of the given sizes (cycled).
        fn run_in(input: &[u8], pieces: &[usize]) -> (Vec<u8>, Vec<Option<Rejection>>) {
            let verdicts = Arc::new(Verdicts::default());
            let mut scanner = Scanner::new(LIMITS, Arc::clone(&verdicts));
            let mut out = Vec::new();
            let mut at = 0;
            for &piece in pieces.iter().cycle() {
                if at >= input.len() || scanner.state == State::Refused {
                    break;
                }
                if scanner.state == State::AwaitSwitch {
                    scanner.resume(false);
                }
                let data = &input[at..(at + piece).min(input.len())];
                at += data.len();
                let in_place = scanner.state != State::Head;
                let kept = scanner.feed(data, in_place);
                out.extend_from_slice(&data[..kept]);
                out.extend_from_slice(&scanner.ready[scanner.ready_at..]);
                scanner.ready.clear();
                scanner.ready_at = 0;
            }
            let verdicts = verdicts
                .heads
                .lock()
                .unwrap()
                .iter()
                .map(|v| v.rejection)
                .collect();
            (out, verdicts)
        }

        /// One valid request: a Content-Length body, a chunked one (with extensions and
        /// trailers now and then), or none.
        fn request() -> impl Strategy<Value = Vec<u8>> {
            let body = prop::collection::vec(any::<u8>(), 0..40);
            let chunks = prop::collection::vec(prop::collection::vec(any::<u8>(), 1..20), 0..4);
            (
                "[a-z/]{1,20}",
                prop::collection::vec(("[a-z-]{1,10}", "[ -~]{0,20}"), 0..3),
                prop_oneof![
                    Just(None),
                    body.prop_map(|b| Some((false, vec![b]))),
                    chunks.prop_map(|c| Some((true, c))),
                ],
                any::<bool>(),
            )
                .prop_map(|(path, fields, body, extras)| {
                    let mut r = format!("POST /{path} HTTP/1.1\r\nHost: a\r\n").into_bytes();
                    for (name, value) in fields {
                        r.extend(format!("x-{name}: {}\r\n", value.trim()).into_bytes());
                    }
                    match body {
                        None => r.extend(b"\r\n"),
                        Some((false, parts)) => {
                            r.extend(
                                format!("Content-Length: {}\r\n\r\n", parts[0].len()).into_bytes(),
                            );
                            r.extend(&parts[0]);
                        }
                        Some((true, parts)) => {
                            r.extend(b"Transfer-Encoding: chunked\r\n\r\n");
                            for part in parts {
                                let ext = if extras { ";e=1" } else { "" };
                                r.extend(format!("{:x}{ext}\r\n", part.len()).into_bytes());
                                r.extend(part);
                                r.extend(b"\r\n");
                            }
                            r.extend(b"0\r\n");
                            if extras {
                                r.extend(b"X-Trailer: 1\r\n");
                            }
                            r.extend(b"\r\n");
                        }
                    }
                    r
                })
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            /// Valid pipelined requests, cut anywhere, reach hyper unchanged, each with a
            /// passing verdict.
            #[test]
            fn valid_requests_pass_unchanged_however_they_are_cut(
                requests in prop::collection::vec(request(), 1..5),
                pieces in prop::collection::vec(1usize..50, 1..8),
            ) {
                let input = requests.concat();
                let (out, verdicts) = run_in(&input, &pieces);
                prop_assert_eq!(out, input);
                prop_assert_eq!(verdicts, vec![None; requests.len()]);
            }

            /// Any bytes, cut anywhere: no panic, and hyper gets a prefix of them, followed by
            /// the stand-in when a head was refused.
            #[test]
            fn any_bytes_give_hyper_a_prefix_or_a_prefix_and_the_stand_in(
                input in prop::collection::vec(any::<u8>(), 0..600),
                shaped in "(GET|POST) /[a-z]{0,5} HTTP/1\\.[01](\r?\n[A-Za-z-]{1,8}:[ \t]?[ -~]{0,8}){0,4}\r?\n\r?\n[ -~\r\n]{0,40}",
                pieces in prop::collection::vec(1usize..64, 1..6),
            ) {
                for input in [&input[..], shaped.as_bytes()] {
                    let (out, verdicts) = run_in(input, &pieces);
                    let refused = verdicts.iter().any(Option::is_some);
                    let passed = if refused {
                        prop_assert!(out.ends_with(STAND_IN));
                        &out[..out.len() - STAND_IN.len()]
                    } else {
                        &out[..]
                    };
                    prop_assert!(input.starts_with(passed));
                }
            }
        }
    }
}
