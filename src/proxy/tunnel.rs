//! Upgraded connections (WebSocket and any other `Upgrade`): after the 101, bytes are copied both
//! ways until either side closes, or until the backend's drain deadline cuts them. A WebSocket is
//! cut at a frame boundary of the backend→client stream with a close frame, status 1001 ("going
//! away"), so the client reconnects at once; other protocols are simply closed.

use std::time::Duration;

use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;

use crate::backend::UpgradeGuard;
use crate::server::sleep_until_opt;

/// How long a cut waits for the backend to finish the frame it is in the middle of; past it, the
/// connection is closed without a close frame.
const FRAME_GRACE: Duration = Duration::from_secs(1);
/// How long, past the frame grace, sending the close frame and closing may take. A client that
/// stops reading blocks every write to it; without this bound it would hold the tunnel open forever.
const CLOSE_GRACE: Duration = Duration::from_millis(500);
/// Server-to-client close frame: FIN + opcode 8, unmasked, 2-byte payload 1001.
const CLOSE_GOING_AWAY: [u8; 4] = [0x88, 0x02, 0x03, 0xE9];
const BUFFER: usize = 16 * 1024;

/// Runs one upgraded connection to its end. `guard` counts it against the backend; `cut` turns
/// true when the backend's drain deadline passes.
pub async fn run(
    client: OnUpgrade,
    backend: OnUpgrade,
    websocket: bool,
    guard: UpgradeGuard,
    cut: watch::Receiver<bool>,
) {
    let (client, backend) = match tokio::join!(client, backend) {
        (Ok(c), Ok(b)) => (c, b),
        (Err(e), _) | (_, Err(e)) => {
            tracing::debug!(error = %e, "upgrade did not complete");
            return;
        }
    };
    let client: TokioIo<Upgraded> = TokioIo::new(client);
    let backend: TokioIo<Upgraded> = TokioIo::new(backend);
    if splice(client, backend, websocket, cut).await == End::Cut {
        guard.backend().count_cut();
    }
}

#[derive(Debug, PartialEq, Eq)]
enum End {
    Closed,
    Cut,
}

async fn splice<C, B>(client: C, backend: B, websocket: bool, mut cut: watch::Receiver<bool>) -> End
where
    C: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let hard_stop = after_cut(cut.clone(), FRAME_GRACE + CLOSE_GRACE);
    let (mut client_rx, mut client_tx) = tokio::io::split(client);
    let (mut backend_rx, mut backend_tx) = tokio::io::split(backend);
    let upstream = async {
        // Client → backend: a plain copy; when the client stops sending, tell the backend.
        let _ = tokio::io::copy(&mut client_rx, &mut backend_tx).await;
        let _ = backend_tx.shutdown().await;
    };
    let downstream = async {
        let mut frames = FrameTracker::default();
        let mut buf = vec![0u8; BUFFER];
        let mut grace: Option<tokio::time::Instant> = None;
        let end = loop {
            if grace.is_none() && *cut.borrow_and_update() {
                if !websocket || frames.at_boundary() {
                    break End::Cut;
                }
                grace = Some(tokio::time::Instant::now() + FRAME_GRACE);
            }
            let read = tokio::select! {
                read = backend_rx.read(&mut buf) => read,
                _ = cut.changed(), if grace.is_none() => continue,
                _ = sleep_until_opt(grace) => break End::Cut,
            };
            let n = match read {
                Ok(0) | Err(_) => break End::Closed,
                Ok(n) => n,
            };
            // While cutting, forward only up to the end of the current frame.
            let take = if grace.is_some() {
                frames.until_boundary(&buf[..n])
            } else {
                frames.advance(&buf[..n]);
                n
            };
            if client_tx.write_all(&buf[..take]).await.is_err() {
                break End::Closed;
            }
            if grace.is_some() && frames.at_boundary() {
                break End::Cut;
            }
        };
        // A frame the backend never finished cannot be followed by a close frame: the client would
        // read the close frame's bytes as the rest of that frame's payload.
        if end == End::Cut && websocket && frames.at_boundary() {
            let _ = client_tx.write_all(&CLOSE_GOING_AWAY).await;
        }
        let _ = client_tx.shutdown().await;
        end
    };
    tokio::pin!(upstream, downstream, hard_stop);
    let mut upstream_done = false;
    loop {
        tokio::select! {
            end = &mut downstream => return end,
            _ = &mut upstream, if !upstream_done => upstream_done = true,
            // Dropping both halves closes both connections, whatever write is pending.
            _ = &mut hard_stop => return End::Cut,
        }
    }
}

/// Resolves `grace` after `cut` first turns true.
async fn after_cut(mut cut: watch::Receiver<bool>, grace: Duration) {
    if cut.wait_for(|cut| *cut).await.is_err() {
        std::future::pending::<()>().await;
    }
    tokio::time::sleep(grace).await;
}

/// Follows WebSocket frame boundaries (RFC 6455 §5.2) in one direction of a byte stream.
#[derive(Debug, Default)]
struct FrameTracker {
    /// Header bytes of the frame being read (at most 14).
    header: Vec<u8>,
    /// Payload bytes left in the current frame.
    remaining: u64,
}

impl FrameTracker {
    fn at_boundary(&self) -> bool {
        self.header.is_empty() && self.remaining == 0
    }

    /// Consumes all of `data`.
    fn advance(&mut self, data: &[u8]) {
        let mut rest = data;
        while !rest.is_empty() {
            rest = self.step(rest);
        }
    }

    /// Consumes `data` up to the end of the current frame and returns how many bytes that was
    /// (all of them if the frame does not end within `data`).
    fn until_boundary(&mut self, data: &[u8]) -> usize {
        if self.at_boundary() {
            return 0;
        }
        let mut rest = data;
        while !rest.is_empty() {
            rest = self.step(rest);
            if self.at_boundary() {
                break;
            }
        }
        data.len() - rest.len()
    }

    /// Consumes some of `data` (payload of the current frame, or header bytes) and returns the rest.
    fn step<'a>(&mut self, data: &'a [u8]) -> &'a [u8] {
        if self.remaining > 0 {
            let n = self.remaining.min(data.len() as u64) as usize;
            self.remaining -= n as u64;
            return &data[n..];
        }
        self.header.push(data[0]);
        if let Some(payload) = header_complete(&self.header) {
            self.header.clear();
            self.remaining = payload;
        }
        &data[1..]
    }
}

/// The payload length once `header` holds a whole frame header, else `None`.
fn header_complete(header: &[u8]) -> Option<u64> {
    if header.len() < 2 {
        return None;
    }
    let masked = header[1] & 0x80 != 0;
    let (len_bytes, short) = match header[1] & 0x7f {
        126 => (2, None),
        127 => (8, None),
        n => (0, Some(u64::from(n))),
    };
    let total = 2 + len_bytes + if masked { 4 } else { 0 };
    if header.len() < total {
        return None;
    }
    Some(short.unwrap_or_else(|| {
        header[2..2 + len_bytes]
            .iter()
            .fold(0u64, |acc, &b| (acc << 8) | u64::from(b))
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(payload_len: usize) -> Vec<u8> {
        let mut f = vec![0x82];
        match payload_len {
            n if n < 126 => f.push(n as u8),
            n if n < 65536 => {
                f.push(126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        f.extend(std::iter::repeat_n(7u8, payload_len));
        f
    }

    #[test]
    fn tracks_boundaries_across_chunks() {
        let mut stream = frame(5);
        stream.extend(frame(300));
        stream.extend(frame(70_000));
        let mut t = FrameTracker::default();
        for chunk in stream.chunks(7) {
            t.advance(chunk);
        }
        assert!(t.at_boundary());
        let mut t = FrameTracker::default();
        t.advance(&stream[..10]);
        assert!(!t.at_boundary());
    }

    #[test]
    fn until_boundary_stops_at_frame_end() {
        let mut stream = frame(5);
        let first = stream.len();
        stream.extend(frame(3));
        let mut t = FrameTracker::default();
        t.advance(&stream[..3]);
        let took = t.until_boundary(&stream[3..]);
        assert_eq!(3 + took, first);
        assert!(t.at_boundary());
    }

    #[test]
    fn masked_client_frames_parse() {
        let mut f = vec![0x81, 0x80 | 2, 1, 2, 3, 4, b'h', b'i'];
        f.extend(frame(1));
        let mut t = FrameTracker::default();
        assert_eq!(t.until_boundary(&f), 0, "nothing to finish at a boundary");
        t.advance(&f[..1]);
        assert_eq!(t.until_boundary(&f[1..]), 7);
        assert!(t.at_boundary());
    }
}
