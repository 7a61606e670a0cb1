//! One client connection's HTTP server: HTTP/1.1 (with upgrades) or HTTP/2, chosen by what the
//! first request head turns out to be (see [`CheckedIo::poll_opening`]), then served by hyper.
//!
//! hyper-util's auto builder did this by reading the first 24 bytes on their own and handing them
//! back to hyper as a separate read, which made hyper grow (and keep) a 16 KiB read buffer on
//! every connection; here the checked first head is already whole when hyper first reads.
//!
//! An HTTP/1 connection whose stream [parks when idle](CheckedIo::parks_when_idle) goes back to
//! waiting for a head each time hyper lets go of it between requests, and a new hyper connection
//! serves the next head: an idle keep-alive connection holds no hyper state.

use std::error::Error as StdError;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use hyper::body::{Body, Incoming};
use hyper::server::conn::{http1, http2};
use hyper::service::HttpService;
use hyper_util::rt::{TokioExecutor, TokioIo};
use prometheus::IntGauge;
use tokio::io::{AsyncRead, AsyncWrite};

use super::framing::{CheckedIo, Opening, Verdicts};
use super::GaugeGuard;

/// A connection's error, from hyper or from reading a head.
pub(crate) type ServeError = Box<dyn StdError + Send + Sync>;

/// The two servers a connection may get, configured once and shared by connections.
#[derive(Debug)]
pub(crate) struct Builders {
    /// Used when the first head is an HTTP/1 request, and for each head after a park.
    pub(crate) http1: http1::Builder,
    /// Used when the first head is the HTTP/2 preface.
    pub(crate) http2: http2::Builder<TokioExecutor>,
}

/// A client connection being served: waiting for its first head, then by hyper; an HTTP/1 one
/// goes back to waiting each time it parks.
pub(crate) struct Serving<I, S>
where
    I: AsyncRead + AsyncWrite + Unpin,
    S: HttpService<Incoming>,
{
    state: State<I, S>,
    /// Says when hyper's HTTP/1 connection ended by parking.
    verdicts: Arc<Verdicts>,
    /// Counts the listener's parked connections.
    idle: Option<IntGauge>,
    /// Woken from dormancy and not served since: its socket's readiness is yet to reach tokio,
    /// so that it would look as idle as when it went to sleep.
    woken: bool,
    /// A head was handed to hyper since [`take_served`](Self::take_served) last looked.
    served: bool,
}

/// A parked connection taken out of its [`Serving`], to wait without a task.
pub(crate) struct Resting<I, S> {
    /// Its checked stream, waiting for the next head.
    pub(crate) io: CheckedIo<I>,
    /// Its service (which holds the connection's verdicts and activity).
    pub(crate) service: S,
    /// What serves its next head.
    pub(crate) builders: Arc<Builders>,
    /// The listener's gauge of parked connections.
    pub(crate) idle: Option<IntGauge>,
    /// Its count in that gauge.
    pub(crate) counted_idle: Option<GaugeGuard>,
}

/// hyper's HTTP/1 connection over a checked client stream.
type Http1Connection<I, S> = http1::UpgradeableConnection<TokioIo<CheckedIo<I>>, S>;
/// hyper's HTTP/2 connection over a checked client stream.
type Http2Connection<I, S> = http2::Connection<TokioIo<CheckedIo<I>>, S, TokioExecutor>;

// `Opening` is larger than the boxed connections, but every connection starts in it: boxing it
// would cost an allocation per connection to save room in a task that already has it.
#[allow(clippy::large_enum_variant)]
enum State<I, S>
where
    I: AsyncRead + AsyncWrite + Unpin,
    S: HttpService<Incoming>,
{
    Opening {
        io: CheckedIo<I>,
        service: S,
        builders: Arc<Builders>,
        /// Counts the connection as idle while it waits after a park.
        _idle: Option<GaugeGuard>,
    },
    // Boxed: hyper's connection state is large, and the task holding this enum then stays the
    // size of `Opening`. Kept beside it, the builders serve the next head after a park.
    Http1(Box<Http1Connection<I, S>>, Arc<Builders>),
    Http2(Pin<Box<Http2Connection<I, S>>>),
    /// A parked connection ending: its stream is shut down as hyper would have (over TLS, the
    /// close_notify).
    Closing(CheckedIo<I>),
    Done,
}

impl<I, S> Serving<I, S>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: HttpService<Incoming> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<ServeError>,
    S::ResBody: Send + 'static,
    <S::ResBody as Body>::Data: Send,
    <S::ResBody as Body>::Error: Into<ServeError>,
{
    /// Serves `io` with `service` once its first head says which protocol it speaks.
    pub(crate) fn new(
        io: CheckedIo<I>,
        service: S,
        builders: Arc<Builders>,
        idle: Option<IntGauge>,
    ) -> Self {
        Serving {
            verdicts: Arc::clone(io.verdicts()),
            idle,
            woken: false,
            served: false,
            state: State::Opening {
                io,
                service,
                builders,
                _idle: None,
            },
        }
    }

    /// Whether the connection parked and waits for its next head with nothing in hand, so that
    /// it can [rest](Self::take_resting) without its task.
    pub(crate) fn can_sleep(&self) -> bool {
        !self.woken && matches!(&self.state, State::Opening { io, .. } if io.can_sleep())
    }

    /// Whether a head was handed to hyper since the last call.
    pub(crate) fn take_served(&mut self) -> bool {
        std::mem::take(&mut self.served)
    }

    /// Takes apart a connection that [can sleep](Self::can_sleep); `None` (and the connection
    /// unchanged) otherwise.
    pub(crate) fn take_resting(&mut self) -> Option<Resting<I, S>> {
        if !self.can_sleep() {
            return None;
        }
        let State::Opening {
            io,
            service,
            builders,
            _idle,
        } = std::mem::replace(&mut self.state, State::Done)
        else {
            unreachable!("checked by can_sleep");
        };
        Some(Resting {
            io,
            service,
            builders,
            idle: self.idle.take(),
            counted_idle: _idle,
        })
    }

    /// A resting connection served again: it waits for its next head.
    pub(crate) fn from_resting(resting: Resting<I, S>) -> Self {
        Serving {
            verdicts: Arc::clone(resting.io.verdicts()),
            idle: resting.idle,
            woken: true,
            served: false,
            state: State::Opening {
                io: resting.io,
                service: resting.service,
                builders: resting.builders,
                _idle: resting.counted_idle,
            },
        }
    }

    /// Stops taking new requests and ends once those in flight are answered; a connection that
    /// has not sent its first head yet ends at once, and a parked one once its stream is shut
    /// down.
    pub(crate) fn graceful_shutdown(&mut self) {
        match &mut self.state {
            State::Opening { io, .. } if !io.has_served() => self.state = State::Done,
            State::Opening { .. } => {
                let State::Opening { io, .. } = std::mem::replace(&mut self.state, State::Done)
                else {
                    unreachable!("matched above");
                };
                self.state = State::Closing(io);
            }
            State::Http1(conn, _) => Pin::new(&mut **conn).graceful_shutdown(),
            State::Http2(conn) => conn.as_mut().graceful_shutdown(),
            State::Closing(_) | State::Done => {}
        }
    }
}

// The service is only ever moved (into hyper's boxed connection), never pinned, and hyper's
// connections are boxed: nothing here relies on staying in place.
impl<I, S> Unpin for Serving<I, S>
where
    I: AsyncRead + AsyncWrite + Unpin,
    S: HttpService<Incoming>,
{
}

impl<I, S> Future for Serving<I, S>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: HttpService<Incoming> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<ServeError>,
    S::ResBody: Send + 'static,
    <S::ResBody as Body>::Data: Send,
    <S::ResBody as Body>::Error: Into<ServeError>,
{
    type Output = Result<(), ServeError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        loop {
            match &mut this.state {
                State::Opening { io, .. } => {
                    let opening = match ready!(Pin::new(io).poll_opening(cx)) {
                        Ok(opening) => opening,
                        Err(error) => {
                            this.state = State::Done;
                            return Poll::Ready(Err(error.into()));
                        }
                    };
                    let State::Opening {
                        io,
                        service,
                        builders,
                        ..
                    } = std::mem::replace(&mut this.state, State::Done)
                    else {
                        unreachable!("matched above");
                    };
                    let io = TokioIo::new(io);
                    this.woken = false;
                    this.served = true;
                    this.state = match opening {
                        Opening::Http1 => State::Http1(
                            Box::new(builders.http1.serve_connection(io, service).with_upgrades()),
                            builders,
                        ),
                        Opening::Http2 => {
                            State::Http2(Box::pin(builders.http2.serve_connection(io, service)))
                        }
                        Opening::Closed => return Poll::Ready(Ok(())),
                    };
                }
                State::Http1(conn, _) => {
                    if let Err(error) = ready!(Pin::new(&mut **conn).poll(cx)) {
                        this.state = State::Done;
                        return Poll::Ready(Err(error.into()));
                    }
                    if !this.verdicts.take_parked() {
                        this.state = State::Done;
                        return Poll::Ready(Ok(()));
                    }
                    let State::Http1(conn, builders) =
                        std::mem::replace(&mut this.state, State::Done)
                    else {
                        unreachable!("matched above");
                    };
                    // A parked connection was neither upgraded nor left bytes in hyper's buffer
                    // (it parks between requests, with nothing queued for hyper).
                    let Some(parts) = (*conn).into_parts() else {
                        return Poll::Ready(Ok(()));
                    };
                    if !parts.read_buf.is_empty() {
                        return Poll::Ready(Ok(()));
                    }
                    let io = parts.io.into_inner();
                    this.state = State::Opening {
                        io,
                        service: parts.service,
                        builders,
                        _idle: this.idle.clone().map(GaugeGuard::new),
                    };
                }
                State::Http2(conn) => return conn.as_mut().poll(cx).map_err(Into::into),
                State::Closing(io) => {
                    let shut = ready!(Pin::new(io).poll_shutdown(cx));
                    this.state = State::Done;
                    return Poll::Ready(shut.map_err(Into::into));
                }
                State::Done => return Poll::Ready(Ok(())),
            }
        }
    }
}
