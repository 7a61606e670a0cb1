//! Client-connection idleness: a byte counter on the socket and a count of requests waiting for
//! their response headers. A connection that moved no byte for a whole `timeouts.idle` period while
//! no request waited on a backend is idle, and is closed gracefully (HTTP/2 gets a GOAWAY).
//! [`Watched`] is the connection's task: it applies that check and the server's stop, and puts a
//! parked plain-TCP connection to sleep without a task ([`super::dormant`]).

use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::{Body, Incoming};
use hyper::service::HttpService;
use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::WaitForCancellationFutureOwned;

use super::dormant::{Dormant, Sleeper};
use super::framing::{CheckedIo, Dormancy};
use super::serving::{Builders, Resting, ServeError, Serving};
use super::GaugeGuard;
use crate::proxy::ConnInfo;

/// How many times per `timeouts.idle` period a client connection is checked for idleness.
const IDLE_CHECKS: u32 = 4;

/// How long a parked connection keeps its task before it goes dormant. A client that pauses for
/// less (a script's loop, the requests of one page) is spared waking it, about 6,000 instructions
/// and a turn of the reactor; one that pauses longer lets go of its task and registration. A
/// second spared more pauses, but after a burst of new connections left the allocator's pages
/// fragmented: with 4,000 of 10,000 connections holding their tasks at once, 1.1–1.8 KiB per
/// idle connection stayed resident, against 0.5–0.7 with 100 ms (`BENCHMARKS.md`, session 8).
const DORMANT_AFTER: Duration = Duration::from_millis(100);

/// Periods of the idle check over which a response body's wait on the client is dated: enough
/// that the periods a body can be counted in (`IDLE_CHECKS + 2` of them) are never confused with
/// the one being checked, and a power of two, so that the period counter's wrapping (it starts
/// at 0, and `next_period` looks back from it) agrees with the ring's.
const DATED_PERIODS: usize = 8;
const _: () = assert!(DATED_PERIODS.is_power_of_two() && DATED_PERIODS >= IDLE_CHECKS as usize + 2);

/// What one client connection has been doing.
#[derive(Debug, Default)]
pub struct Activity {
    bytes: AtomicU64,
    waiting: AtomicU64,
    /// The idle check's periods so far, which date a response body's wait on the client.
    period: AtomicU32,
    /// Response bodies waiting on the client (they handed hyper a frame, and hyper has not asked
    /// for the next), by the period (modulo [`DATED_PERIODS`]) they began waiting in.
    on_client: [AtomicU32; DATED_PERIODS],
}

impl Activity {
    /// A response body handed hyper a frame, and waits for hyper to ask for the next: it is the
    /// client's turn to read. Returns the period to give [`Activity::client_read`].
    pub(crate) fn client_turn(&self) -> u32 {
        let period = self.period.load(Ordering::Relaxed);
        self.on_client[period as usize % DATED_PERIODS].fetch_add(1, Ordering::Relaxed);
        period
    }

    /// hyper asked the body waiting since `period` for its next frame (or dropped it).
    pub(crate) fn client_read(&self, period: u32) {
        self.on_client[period as usize % DATED_PERIODS].fetch_sub(1, Ordering::Relaxed);
    }

    /// Starts the idle check's next period, and tells whether a response body has waited on the
    /// client for `IDLE_CHECKS` whole periods (`timeouts.idle`).
    fn next_period(&self) -> bool {
        let period = self.period.fetch_add(1, Ordering::Relaxed).wrapping_add(1);
        let since = period.wrapping_sub(IDLE_CHECKS + 1);
        self.on_client[since as usize % DATED_PERIODS].load(Ordering::Relaxed) > 0
    }

    /// Bytes moved in either direction so far.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Whether a request is waiting for its response headers (its backend may be slow, not idle).
    pub fn is_waiting(&self) -> bool {
        self.waiting.load(Ordering::Relaxed) > 0
    }

    /// Counts a request as waiting until the guard is dropped.
    pub fn wait(self: &Arc<Self>) -> Waiting {
        self.waiting.fetch_add(1, Ordering::Relaxed);
        Waiting(Arc::clone(self))
    }
}

/// A request waiting for its response headers.
#[derive(Debug)]
pub struct Waiting(Arc<Activity>);

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::Relaxed);
    }
}

pin_project! {
    /// A socket that counts the bytes it moves.
    #[derive(Debug)]
    pub struct CountingIo<T> {
        #[pin]
        inner: T,
        activity: Arc<Activity>,
    }
}

impl<T> CountingIo<T> {
    /// Wraps `inner`, counting into `activity`.
    pub fn new(inner: T, activity: Arc<Activity>) -> Self {
        CountingIo { inner, activity }
    }
}

impl<T: AsyncRead> AsyncRead for CountingIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let polled = this.inner.poll_read(cx, buf);
        let read = (buf.filled().len() - before) as u64;
        if read > 0 {
            this.activity.bytes.fetch_add(read, Ordering::Relaxed);
        }
        polled
    }
}

impl<T: AsyncWrite> AsyncWrite for CountingIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let polled = this.inner.poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &polled {
            this.activity.bytes.fetch_add(*n as u64, Ordering::Relaxed);
        }
        polled
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let polled = this.inner.poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = &polled {
            this.activity.bytes.fetch_add(*n as u64, Ordering::Relaxed);
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}

/// A client connection's stream, as far as going dormant goes.
pub(crate) trait ClientStream: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// Whether a parked connection over it can sleep without its task: a plain TCP stream can;
    /// a TLS session stays with its task, whose stream type holds it.
    const CAN_SLEEP: bool;

    /// The socket, out of tokio's reactor, and its byte counter; called only when `CAN_SLEEP`.
    fn into_socket(self) -> io::Result<(std::net::TcpStream, Arc<Activity>)>;
}

impl ClientStream for CountingIo<TcpStream> {
    const CAN_SLEEP: bool = true;

    fn into_socket(self) -> io::Result<(std::net::TcpStream, Arc<Activity>)> {
        Ok((self.inner.into_std()?, self.activity))
    }
}

impl ClientStream for tokio_rustls::server::TlsStream<CountingIo<TcpStream>> {
    const CAN_SLEEP: bool = false;

    fn into_socket(self) -> io::Result<(std::net::TcpStream, Arc<Activity>)> {
        Err(io::Error::other(
            "a TLS connection does not sleep without its task",
        ))
    }
}

pin_project! {
    /// A client connection's task: serves it until it ends, closes it gracefully once it has been
    /// idle for `idle`, drops it if it still has not finished `idle` after that, and closes it
    /// gracefully when the server stops. `G` is held until the connection ends (what counts it).
    ///
    /// Written out rather than as an `async` block around `select!`: the block kept a pinning
    /// reference beside each of its timers and the select's own state, and every connection's
    /// task is as large as this future, idle ones included.
    pub(crate) struct Watched<I, S, G>
    where
        I: AsyncRead,
        I: AsyncWrite,
        I: Unpin,
        S: HttpService<Incoming>,
    {
        serving: Serving<I, S>,
        // Checked `IDLE_CHECKS` times per period, so a connection closes between 1 and 1.25 ×
        // `idle`; a sleep reset after each check, so a starved task never fires several quiet
        // checks back to back.
        #[pin]
        idle_check: Sleep,
        #[pin]
        stopping: WaitForCancellationFutureOwned,
        // Set just before the stop's token is cancelled (see `Server::shutdown`).
        stopped: Arc<AtomicBool>,
        activity: Arc<Activity>,
        info: Arc<ConnInfo>,
        idle: Duration,
        bytes_at_last_check: u64,
        quiet_checks: u32,
        // Closing gracefully (for idleness or the server's stop).
        closing: bool,
        // Closing for idleness: a connection that still does not finish (a client that stopped
        // reading) is dropped `idle` later, timed by the same sleep.
        hard_closing: bool,
        // The stop signal and the idle check hold this task's waker: polled once (and the sleep
        // again after each reset), they wake the task when they are due, so a wake-up in between
        // (several per request) only reads `stopped` and whether the sleep has elapsed.
        stop_armed: bool,
        idle_armed: bool,
        // Parked: goes dormant when the idle check's sleep next fires, if parked all along.
        dozing: bool,
        // The sleep was brought forward for that, ahead of the idle check's own schedule.
        doze_early: bool,
        // Taken when the connection goes dormant, and held by its sleeper.
        held: Option<G>,
        // Where a parked connection goes to sleep without this task (plain TCP only).
        dormant: Arc<Dormant>,
    }
}

impl<I, S, G> Watched<I, S, G>
where
    I: AsyncRead + AsyncWrite + Unpin,
    S: HttpService<Incoming>,
{
    /// Watches `serving`, whose bytes and waiting requests `activity` counts, over the client
    /// connection `info`; the server's stop (`dormant.stop`) closes it gracefully. Once parked, a
    /// connection over a stream that [can sleep](ClientStream) goes to `dormant`.
    pub(crate) fn new(
        serving: Serving<I, S>,
        activity: Arc<Activity>,
        info: Arc<ConnInfo>,
        idle: Duration,
        held: G,
        dormant: Arc<Dormant>,
    ) -> Self {
        Watched {
            serving,
            idle_check: tokio::time::sleep(check_period(idle)),
            stopping: dormant.stop.clone().cancelled_owned(),
            stopped: Arc::clone(&dormant.stopped),
            bytes_at_last_check: activity.bytes(),
            activity,
            info,
            idle,
            quiet_checks: 0,
            closing: false,
            hard_closing: false,
            stop_armed: false,
            idle_armed: false,
            dozing: false,
            doze_early: false,
            held: Some(held),
            dormant,
        }
    }
}

/// The time between two idleness checks.
fn check_period(idle: Duration) -> Duration {
    (idle / IDLE_CHECKS).max(Duration::from_millis(1))
}

impl<I, S, G> Future for Watched<I, S, G>
where
    I: ClientStream,
    G: Send + 'static,
    S: HttpService<Incoming> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<ServeError>,
    S::ResBody: Send + 'static,
    <S::ResBody as Body>::Data: Send,
    <S::ResBody as Body>::Error: Into<ServeError>,
{
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut this = self.project();
        // The connection first, then the stop, then the idle check, each time round; a step that
        // changed something goes round again, so that the connection sees it.
        loop {
            if let Poll::Ready(result) = Pin::new(&mut *this.serving).poll(cx) {
                if let Err(error) = result {
                    let peer = this.info.peer;
                    tracing::debug!(%peer, %error, "client connection ended with an error");
                }
                return Poll::Ready(());
            }
            if !*this.closing && (!*this.stop_armed || this.stopped.load(Ordering::Acquire)) {
                if this.stopping.as_mut().poll(cx).is_ready() {
                    *this.closing = true;
                    this.serving.graceful_shutdown();
                    continue;
                }
                *this.stop_armed = true;
            }
            if I::CAN_SLEEP
                && !*this.dozing
                && !*this.closing
                && this.serving.can_sleep()
                && this.dormant.is_working()
            {
                // Parked: dormant at the idle check's next firing, brought forward to
                // `DORMANT_AFTER` from now when the check is due later than that.
                *this.dozing = true;
                this.serving.take_served();
                let doze_until = Instant::now() + DORMANT_AFTER;
                if doze_until < this.idle_check.deadline() {
                    this.idle_check.as_mut().reset(doze_until);
                    *this.doze_early = true;
                    *this.idle_armed = false;
                }
            }
            if *this.closing && !*this.hard_closing {
                return Poll::Pending;
            }
            if *this.idle_armed && !this.idle_check.is_elapsed() {
                return Poll::Pending;
            }
            if this.idle_check.as_mut().poll(cx).is_pending() {
                *this.idle_armed = true;
                return Poll::Pending;
            }
            // Each path below resets the sleep or ends the task.
            *this.idle_armed = false;
            if std::mem::take(this.dozing) {
                let early = std::mem::take(this.doze_early);
                // Parked now, and all along: a client that sent a request meanwhile is parked
                // anew, and dozes again from now.
                let served = this.serving.take_served();
                if !served
                    && !*this.closing
                    && this.serving.can_sleep()
                    && this.dormant.is_working()
                {
                    let held = this.held.take();
                    if let (Some(resting), Some(held)) = (this.serving.take_resting(), held) {
                        fall_asleep(resting, held, this.info, *this.idle, this.dormant);
                    }
                    return Poll::Ready(());
                }
                if early {
                    // Served meanwhile: this was no idle check, and the next is a period away.
                    this.idle_check
                        .as_mut()
                        .reset(Instant::now() + check_period(*this.idle));
                    continue;
                }
            }
            let bytes = this.activity.bytes();
            if *this.hard_closing {
                // A stream opened before the client saw the GOAWAY may still be waiting on a
                // backend or moving bytes: give it another period.
                if this.activity.is_waiting() || bytes != *this.bytes_at_last_check {
                    *this.bytes_at_last_check = bytes;
                    this.idle_check.as_mut().reset(Instant::now() + *this.idle);
                    continue;
                }
                let peer = this.info.peer;
                tracing::debug!(%peer, "idle client connection did not close; dropping it");
                return Poll::Ready(());
            }
            if this.activity.next_period() {
                // A client that stops reading one response (an HTTP/2 stream whose window it
                // never opens, while it keeps the connection busy otherwise) would hold the
                // backend's request, and its drain, for as long as it likes; nginx's
                // `send_timeout` ends such a connection too.
                let peer = this.info.peer;
                tracing::debug!(%peer, "a response waited on the client for timeouts.idle; dropping the connection");
                return Poll::Ready(());
            }
            // On schedule, unless this check ran late (then a full period from now).
            let period = check_period(*this.idle);
            let now = Instant::now();
            let next = this.idle_check.deadline() + period;
            this.idle_check
                .as_mut()
                .reset(if next > now { next } else { now + period });
            if bytes == *this.bytes_at_last_check && !this.activity.is_waiting() {
                *this.quiet_checks += 1;
            } else {
                *this.quiet_checks = 0;
            }
            *this.bytes_at_last_check = bytes;
            if *this.quiet_checks >= IDLE_CHECKS {
                let peer = this.info.peer;
                tracing::debug!(%peer, "closing idle client connection");
                *this.closing = true;
                *this.hard_closing = true;
                this.idle_check.as_mut().reset(Instant::now() + *this.idle);
                this.serving.graceful_shutdown();
            }
        }
    }
}

/// Puts a parked connection to sleep in `dormant`; its task ends. It is closed instead if it
/// cannot sleep: its socket cannot leave tokio's reactor, or the server is stopping (which closes
/// parked connections).
fn fall_asleep<I, S, G>(
    resting: Resting<I, S>,
    held: G,
    info: &Arc<ConnInfo>,
    idle: Duration,
    dormant: &Arc<Dormant>,
) where
    I: ClientStream,
    G: Send + 'static,
    S: HttpService<Incoming> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<ServeError>,
    S::ResBody: Send + 'static,
    <S::ResBody as Body>::Data: Send,
    <S::ResBody as Body>::Error: Into<ServeError>,
{
    let Resting {
        io,
        service,
        builders,
        idle: idle_gauge,
        counted_idle,
    } = resting;
    let Some((stream, dormancy)) = io.into_dormant() else {
        return;
    };
    let (socket, activity) = match stream.into_socket() {
        Ok(socket) => socket,
        Err(error) => {
            let peer = info.peer;
            tracing::debug!(%peer, %error, "a parked connection could not go dormant; closing it");
            return;
        }
    };
    // The idle check's `idle` counts from the last byte moved, which was just before the park.
    let head_deadline = dormancy.head_deadline();
    let deadline = Instant::now()
        .checked_add(idle)
        .map_or(head_deadline, |idle_deadline| {
            head_deadline.min(idle_deadline)
        });
    let asleep = Box::new(Asleep {
        socket,
        activity,
        dormancy,
        service,
        builders,
        idle_gauge,
        counted_idle,
        info: Arc::clone(info),
        idle,
        held,
    });
    // Refused once the server stopped: dropped, the connection closes.
    let _ = dormant.sleep(asleep, deadline);
}

/// A dormant connection: a plain TCP socket out of tokio's reactor and what its task needs to
/// serve it again.
struct Asleep<S, G> {
    socket: std::net::TcpStream,
    activity: Arc<Activity>,
    dormancy: Dormancy,
    service: S,
    builders: Arc<Builders>,
    idle_gauge: Option<prometheus::IntGauge>,
    counted_idle: Option<GaugeGuard>,
    info: Arc<ConnInfo>,
    idle: Duration,
    held: G,
}

impl<S, G> Sleeper for Asleep<S, G>
where
    G: Send + 'static,
    S: HttpService<Incoming> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<ServeError>,
    S::ResBody: Send + 'static,
    <S::ResBody as Body>::Data: Send,
    <S::ResBody as Body>::Error: Into<ServeError>,
{
    fn socket(&self) -> RawFd {
        self.socket.as_raw_fd()
    }

    fn wake(self: Box<Self>, dormant: &Arc<Dormant>) {
        let Asleep {
            socket,
            activity,
            dormancy,
            service,
            builders,
            idle_gauge,
            counted_idle,
            info,
            idle,
            held,
        } = *self;
        let stream = match TcpStream::from_std(socket) {
            Ok(stream) => stream,
            Err(error) => {
                let peer = info.peer;
                tracing::debug!(%peer, %error, "a dormant connection could not wake; closing it");
                return;
            }
        };
        let io = CheckedIo::resume(CountingIo::new(stream, Arc::clone(&activity)), dormancy);
        let serving = Serving::from_resting(Resting {
            io,
            service,
            builders,
            idle: idle_gauge,
            counted_idle,
        });
        let watched = Watched::new(serving, activity, info, idle, held, Arc::clone(dormant));
        dormant.tracker.spawn(watched);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A body waiting on the client is flagged once it has waited `IDLE_CHECKS` whole periods,
    /// not before, from the connection's first period on and across the counter's wrap.
    #[test]
    fn a_wait_on_the_client_is_flagged_after_idle_checks_whole_periods() {
        for start in [0, u32::MAX - 2] {
            let activity = Activity::default();
            activity.period.store(start, Ordering::Relaxed);
            let since = activity.client_turn();
            for check in 1..=IDLE_CHECKS {
                assert!(
                    !activity.next_period(),
                    "start {start}: flagged at check {check}"
                );
            }
            assert!(activity.next_period(), "start {start}: not flagged");
            activity.client_read(since);
            assert!(
                !activity.next_period(),
                "start {start}: flagged after the read"
            );
        }
        // A wait that ends within a period is never flagged, however many there are.
        let activity = Activity::default();
        for _ in 0..100 {
            let since = activity.client_turn();
            activity.client_read(since);
            assert!(!activity.next_period());
        }
    }
}
