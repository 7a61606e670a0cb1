//! The response body handed to the client: either the backend's body streamed through, holding the
//! backend's in-flight guard and connection until its last byte, or a short local body.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use pin_project_lite::pin_project;

use crate::backend::{InFlightGuard, PooledConn};

/// What is released when an upstream body ends: the in-flight count, and the connection back to
/// the pool (only when the body was read to its end, so the connection is clean).
#[derive(Debug)]
pub struct Finish {
    /// Holds the backend's in-flight count.
    pub guard: InFlightGuard,
    /// The connection the response came on.
    pub conn: Option<PooledConn>,
}

impl Finish {
    /// The body ended cleanly: the connection can carry another request.
    pub fn complete(mut self) {
        if let Some(conn) = self.conn.take() {
            self.guard.backend().pool.checkin(conn);
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
            body: Incoming,
            finish: Option<Finish>,
        },
        /// Generated here (errors, empty bodies).
        Local {
            data: Option<Bytes>,
        },
    }
}

impl ProxyBody {
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
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.project() {
            ProxyBodyProj::Upstream { mut body, finish } => {
                let polled = body.as_mut().poll_frame(cx);
                match &polled {
                    Poll::Ready(None) => {
                        if let Some(f) = finish.take() {
                            f.complete();
                        }
                    }
                    // The server may stop polling once it sees the end, so finish on the last frame.
                    Poll::Ready(Some(Ok(_))) if body.is_end_stream() => {
                        if let Some(f) = finish.take() {
                            f.complete();
                        }
                    }
                    Poll::Ready(Some(Err(_))) => {
                        finish.take();
                    }
                    _ => {}
                }
                polled
            }
            ProxyBodyProj::Local { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Upstream { body, .. } => body.is_end_stream(),
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
