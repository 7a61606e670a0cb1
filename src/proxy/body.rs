//! The response body handed to the client: either the backend's body streamed through, holding the
//! backend's in-flight guard and connection until its last byte, or a short local body. A backend
//! body that breaks off, stalls or is shorter than its Content-Length counts as a failure of the
//! backend (passive health), as a failure before its response headers would.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

use crate::backend::{InFlightGuard, PooledConn, ResponseBody};
use crate::health;
use crate::state::{Shared, Snapshot};

/// Errors a response body can end with; hyper then closes the client connection, so a truncated
/// body never looks complete.
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

/// The backend sent no byte of the response body for `timeouts.idle`.
#[derive(Debug, thiserror::Error)]
#[error("backend response body stalled for {0:?}")]
pub struct BodyStalled(pub Duration);

/// What is released when an upstream body ends: the in-flight count, and the connection back to
/// the pool (only when the body was read to its end, so the connection is clean).
#[derive(Debug)]
pub struct Finish {
    /// Holds the backend's in-flight count.
    pub guard: InFlightGuard,
    /// The connection the response came on.
    pub conn: Option<PooledConn>,
    /// Where to report how the body ended, when the response's outcome for passive health is
    /// decided by its body (anything but a 5xx, which counts as a failure at once).
    pub watch: Option<BodyWatch>,
}

/// The pool member a response body came from: the response counts as a success of the backend
/// when its body ends, and as a failure when the body breaks off, ends short or stalls (like a
/// failure before the headers). A body the client stopped reading counts as neither.
#[derive(Debug)]
pub struct BodyWatch {
    shared: Arc<Shared>,
    snapshot: Arc<Snapshot>,
    pool: usize,
    member: usize,
}

impl BodyWatch {
    /// Member `member` of the snapshot's pool number `pool`.
    pub fn new(shared: &Arc<Shared>, snapshot: &Arc<Snapshot>, pool: usize, member: usize) -> Self {
        BodyWatch {
            shared: Arc::clone(shared),
            snapshot: Arc::clone(snapshot),
            pool,
            member,
        }
    }

    fn observe(self, failed: bool) {
        let pool = &self.snapshot.pools[self.pool];
        health::observe(&self.shared, pool, self.member, failed);
    }
}

impl Finish {
    /// The backend's body failed (broke off, ended short, stalled): a failure of the backend,
    /// unless the client's upload had not ended, in which case the client may be the cause. The
    /// connection is not reused.
    pub fn failed(mut self) {
        let uploaded = self.conn.take().is_none_or(|conn| conn.request_done());
        if let (true, Some(watch)) = (uploaded, self.watch.take()) {
            watch.observe(true);
        }
    }

    /// As [`Finish::complete`], for a body read without hyper: `stream` is its connection, if it
    /// can carry another request.
    pub fn complete_with(mut self, stream: Option<Box<dyn crate::backend::Stream>>) {
        if let (Some(stream), Some(conn)) = (stream, self.conn.as_mut()) {
            conn.give_back(stream);
        }
        self.complete();
    }

    /// The body ended cleanly: the connection can carry another request, unless the backend's
    /// drain has ended (its pool was emptied then and must stay empty). While it drains, sticky
    /// clients may still reuse connections.
    pub fn complete(mut self) {
        if let Some(watch) = self.watch.take() {
            watch.observe(false);
        }
        let backend = self.guard.backend();
        if let Some(conn) = self.conn.take() {
            if !backend.is_out_of_rotation() {
                backend.pool.checkin(conn);
            }
        }
    }
}

pin_project! {
    /// The body of a response to the client.
    #[project = ProxyBodyProj]
    #[derive(Debug)]
    pub enum ProxyBody {
        /// Streamed from the backend.
        Upstream {
            #[pin]
            body: ResponseBody,
            finish: Option<Finish>,
            // Fires when the backend sends nothing for `stall_limit`; reset on every frame.
            #[pin]
            stall: Sleep,
            stall_limit: Duration,
            // A failure of the backend's body, held back for one turn (see `poll_frame`).
            failed: Option<BodyError>,
        },
        /// Generated here (errors, empty bodies).
        Local {
            data: Option<Bytes>,
        },
    }
}

impl ProxyBody {
    /// A body streamed from the backend, cut if it stalls for `stall_limit`.
    pub fn upstream(body: ResponseBody, finish: Finish, stall_limit: Duration) -> Self {
        ProxyBody::Upstream {
            body,
            finish: Some(finish),
            stall: tokio::time::sleep(stall_limit),
            stall_limit,
            failed: None,
        }
    }

    /// A local body.
    pub fn local(data: impl Into<Bytes>) -> Self {
        let data: Bytes = data.into();
        ProxyBody::Local {
            data: (!data.is_empty()).then_some(data),
        }
    }

    /// An empty body.
    pub fn empty() -> Self {
        ProxyBody::Local { data: None }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.project() {
            ProxyBodyProj::Upstream {
                mut body,
                finish,
                stall,
                stall_limit,
                failed,
            } => {
                if let Some(error) = failed.take() {
                    return Poll::Ready(Some(Err(error)));
                }
                match body.as_mut().poll_frame(cx) {
                    Poll::Ready(None) => {
                        if let Some(f) = finish.take() {
                            f.complete_with(body.get_mut().take_reusable());
                        }
                        Poll::Ready(None)
                    }
                    Poll::Ready(Some(Ok(frame))) => {
                        // The server may stop polling once it sees the end, so finish on the last frame.
                        if body.is_end_stream() {
                            if let Some(f) = finish.take() {
                                f.complete_with(body.get_mut().take_reusable());
                            }
                        } else {
                            stall.reset(Instant::now() + *stall_limit);
                        }
                        Poll::Ready(Some(Ok(frame)))
                    }
                    Poll::Ready(Some(Err(error))) => {
                        if let Some(f) = finish.take() {
                            f.failed();
                        }
                        // hyper's server drops what it has not yet written when a body fails (the
                        // head too, before the first frame), so the failure waits one turn: the
                        // client first gets what came (as from nginx), then the cut.
                        *failed = Some(error);
                        cx.waker().wake_by_ref();
                        Poll::Pending
                    }
                    Poll::Pending => match stall.poll(cx) {
                        Poll::Ready(()) => {
                            if let Some(f) = finish.take() {
                                f.failed();
                            }
                            Poll::Ready(Some(Err(BodyStalled(*stall_limit).into())))
                        }
                        Poll::Pending => Poll::Pending,
                    },
                }
            }
            ProxyBodyProj::Local { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            // Not while a failure waits: the server would end the body as if it were whole.
            ProxyBody::Upstream { body, failed, .. } => failed.is_none() && body.is_end_stream(),
            ProxyBody::Local { data } => data.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Upstream { body, .. } => body.size_hint(),
            ProxyBody::Local { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
        }
    }
}
