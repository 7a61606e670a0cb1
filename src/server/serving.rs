//! One client connection's HTTP server: HTTP/1.1 (with upgrades) or HTTP/2, chosen by what the
//! first request head turns out to be (see [`CheckedIo::poll_opening`]), then served by hyper.
//!
//! hyper-util's auto builder did this by reading the first 24 bytes on their own and handing them
//! back to hyper as a separate read, which made hyper grow (and keep) a 16 KiB read buffer on
//! every connection; here the checked first head is already whole when hyper first reads.

use std::error::Error as StdError;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use hyper::body::{Body, Incoming};
use hyper::server::conn::{http1, http2};
use hyper::service::HttpService;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite};

use super::framing::{CheckedIo, Opening};

/// A connection's error, from hyper or from reading its first head.
pub(crate) type ServeError = Box<dyn StdError + Send + Sync>;

/// The two servers a connection may get, configured once per connection.
pub(crate) struct Builders {
    /// Used when the first head is an HTTP/1 request.
    pub(crate) http1: http1::Builder,
    /// Used when the first head is the HTTP/2 preface.
    pub(crate) http2: http2::Builder<TokioExecutor>,
}

/// A client connection being served: first waiting for its first head, then by hyper.
pub(crate) struct Serving<I, S>
where
    I: AsyncRead + AsyncWrite + Unpin,
    S: HttpService<Incoming>,
{
    state: State<I, S>,
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
        builders: Box<Builders>,
    },
    // Boxed (once per connection): hyper's connection state is large, and the task holding this
    // enum then stays the size of `Opening`.
    Http1(Pin<Box<Http1Connection<I, S>>>),
    Http2(Pin<Box<Http2Connection<I, S>>>),
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
    pub(crate) fn new(io: CheckedIo<I>, service: S, builders: Builders) -> Self {
        Serving {
            state: State::Opening {
                io,
                service,
                builders: Box::new(builders),
            },
        }
    }

    /// Stops taking new requests and ends once those in flight are answered; a connection that
    /// has not sent its first head yet ends at once.
    pub(crate) fn graceful_shutdown(&mut self) {
        match &mut self.state {
            State::Opening { .. } => self.state = State::Done,
            State::Http1(conn) => conn.as_mut().graceful_shutdown(),
            State::Http2(conn) => conn.as_mut().graceful_shutdown(),
            State::Done => {}
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
                    } = std::mem::replace(&mut this.state, State::Done)
                    else {
                        unreachable!("matched above");
                    };
                    let io = TokioIo::new(io);
                    this.state = match opening {
                        Opening::Http1 => State::Http1(Box::pin(
                            builders.http1.serve_connection(io, service).with_upgrades(),
                        )),
                        Opening::Http2 => {
                            State::Http2(Box::pin(builders.http2.serve_connection(io, service)))
                        }
                        Opening::Closed => return Poll::Ready(Ok(())),
                    };
                }
                State::Http1(conn) => return conn.as_mut().poll(cx).map_err(Into::into),
                State::Http2(conn) => return conn.as_mut().poll(cx).map_err(Into::into),
                State::Done => return Poll::Ready(Ok(())),
            }
        }
    }
}
