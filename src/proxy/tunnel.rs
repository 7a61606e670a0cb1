//! Upgraded connections (WebSocket and any other `Upgrade`): after the 101, bytes are copied both
//! ways until either side closes, until the backend's drain deadline cuts them, or until they
//! have moved nothing for `timeouts.upgraded_idle`. A WebSocket closed by the proxy is closed at a
//! frame boundary of the backend→client stream with a close frame, status 1001 ("going away"), so
//! the client reconnects at once; other protocols are simply closed. A shutdown closes every
//! tunnel the same way, and waits for them as for requests in flight.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tokio_util::task::TaskTracker;

use crate::backend::UpgradeGuard;
use crate::server::{sleep_until_opt, Counted};

/// How long a cut waits for the backend to finish the frame it is in the middle of; past it, the
/// connection is closed without a close frame.
const FRAME_GRACE: Duration = Duration::from_secs(1);
/// How long, past the frame grace, sending the close frame and closing may take. A client that
/// stops reading blocks every write to it; without this bound it would hold the tunnel open forever.
const CLOSE_GRACE: Duration = Duration::from_millis(500);
/// Server-to-client close frame: FIN + opcode 8, unmasked, 2-byte payload 1001.
const CLOSE_GOING_AWAY: [u8; 4] = [0x88, 0x02, 0x03, 0xE9];
const BUFFER: usize = 16 * 1024;
/// How many times per `upgraded_idle` period a tunnel is checked for idleness.
const IDLE_CHECKS: u32 = 4;

/// A proxy's upgraded connections, which outlive the requests that opened them: tracked, so that a
/// shutdown waits for them, and told to close when it begins.
#[derive(Debug, Default)]
pub struct Tunnels {
    tracker: TaskTracker,
    stop: CancellationToken,
}

impl Tunnels {
    /// Runs `tunnel` (from [`run`]) as one of these.
    pub(crate) fn spawn<F>(&self, tunnel: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        self.tracker.spawn(tunnel);
    }

    /// What a tunnel waits on for the shutdown.
    pub(crate) fn stopping(&self) -> WaitForCancellationFutureOwned {
        self.stop.clone().cancelled_owned()
    }

    /// Closes every tunnel, and any opened from now on, as a drain's deadline does.
    pub fn stop(&self) {
        self.stop.cancel();
        self.tracker.close();
    }

    /// Resolves once every tunnel has ended, after [`Tunnels::stop`].
    pub async fn stopped(&self) {
        self.tracker.wait().await;
    }

    /// How many are open.
    pub fn len(&self) -> usize {
        self.tracker.len()
    }

    /// Whether none is open.
    pub fn is_empty(&self) -> bool {
        self.tracker.is_empty()
    }
}

/// Runs one upgraded connection to its end. `guard` counts it against the backend and `counted`
/// in its listener's open connections; `cut` turns true when the backend's drain deadline passes;
/// `stopping` resolves when the proxy shuts down; `idle` is `timeouts.upgraded_idle`.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    client: OnUpgrade,
    backend: OnUpgrade,
    websocket: bool,
    guard: UpgradeGuard,
    counted: Counted,
    cut: watch::Receiver<bool>,
    stopping: WaitForCancellationFutureOwned,
    idle: Option<Duration>,
) {
    // The client's connection stays open, and counted, until the tunnel ends.
    let _counted = counted;
    let (client, backend) = match tokio::join!(client, backend) {
        (Ok(c), Ok(b)) => (c, b),
        (Err(e), _) | (_, Err(e)) => {
            tracing::debug!(error = %e, "upgrade did not complete");
            return;
        }
    };
    let client: TokioIo<Upgraded> = TokioIo::new(client);
    let backend: TokioIo<Upgraded> = TokioIo::new(backend);
    match splice(client, backend, websocket, cut, stopping, idle).await {
        End::Cut => guard.backend().count_cut(),
        End::Stopped => tracing::debug!(
            backend = %guard.backend().address(),
            "upgraded connection closed for the shutdown"
        ),
        End::Idle => tracing::debug!(
            backend = %guard.backend().address(),
            "upgraded connection idle for timeouts.upgraded_idle; closed"
        ),
        End::Closed => {}
    }
}

/// How a tunnel ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// One side closed it.
    Closed,
    /// The backend's drain deadline cut it.
    Cut,
    /// The proxy shut down.
    Stopped,
    /// It moved nothing for `upgraded_idle`.
    Idle,
}

async fn splice<C, B>(
    client: C,
    backend: B,
    websocket: bool,
    mut cut: watch::Receiver<bool>,
    stopping: WaitForCancellationFutureOwned,
    idle: Option<Duration>,
) -> End
where
    C: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    // Bytes moved either way, for the idle check.
    let moved = AtomicU64::new(0);
    // Set once, to `Cut` or `Idle`, when the proxy decides to close the tunnel.
    let (stop_tx, stop_rx) = watch::channel(None::<End>);
    let (mut client_rx, mut client_tx) = tokio::io::split(client);
    let (mut backend_rx, mut backend_tx) = tokio::io::split(backend);
    let upstream = async {
        // Client → backend: a plain copy; when the client stops sending, tell the backend.
        let mut buf = vec![0u8; BUFFER];
        loop {
            let n = match client_rx.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            moved.fetch_add(n as u64, Ordering::Relaxed);
            if backend_tx.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = backend_tx.shutdown().await;
    };
    let downstream = async {
        let mut stop = stop_rx;
        let mut frames = FrameTracker::default();
        let mut buf = vec![0u8; BUFFER];
        let mut grace: Option<tokio::time::Instant> = None;
        let mut stopping = End::Closed;
        let end = loop {
            if grace.is_none() {
                if let Some(reason) = *stop.borrow_and_update() {
                    if !websocket || frames.at_boundary() {
                        break reason;
                    }
                    stopping = reason;
                    grace = Some(tokio::time::Instant::now() + FRAME_GRACE);
                }
            }
            let read = tokio::select! {
                read = backend_rx.read(&mut buf) => read,
                _ = stop.changed(), if grace.is_none() => continue,
                _ = sleep_until_opt(grace) => break stopping,
            };
            let n = match read {
                Ok(0) | Err(_) => break End::Closed,
                Ok(n) => n,
            };
            moved.fetch_add(n as u64, Ordering::Relaxed);
            // While stopping, forward only up to the end of the current frame.
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
                break stopping;
            }
        };
        // A frame the backend never finished cannot be followed by a close frame: the client would
        // read the close frame's bytes as the rest of that frame's payload.
        if end != End::Closed && websocket && frames.at_boundary() {
            let _ = client_tx.write_all(&CLOSE_GOING_AWAY).await;
        }
        let _ = client_tx.shutdown().await;
        end
    };
    let reason = async {
        tokio::select! {
            () = cut_requested(&mut cut) => End::Cut,
            () = stopping => End::Stopped,
            () = idle_for(&moved, idle) => End::Idle,
        }
    };
    tokio::pin!(upstream, downstream, reason);
    let mut upstream_done = false;
    let mut stopped: Option<(End, tokio::time::Instant)> = None;
    loop {
        tokio::select! {
            end = &mut downstream => return end,
            _ = &mut upstream, if !upstream_done => upstream_done = true,
            reason = &mut reason, if stopped.is_none() => {
                stop_tx.send_replace(Some(reason));
                let hard_stop = tokio::time::Instant::now() + FRAME_GRACE + CLOSE_GRACE;
                stopped = Some((reason, hard_stop));
            }
            // Dropping both halves closes both connections, whatever write is pending.
            _ = sleep_until_opt(stopped.map(|(_, at)| at)) => {
                return stopped.map_or(End::Closed, |(reason, _)| reason);
            }
        }
    }
}

/// Resolves when `cut` turns true (never, if the backend's state is gone).
async fn cut_requested(cut: &mut watch::Receiver<bool>) {
    if cut.wait_for(|cut| *cut).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Resolves once `moved` has not changed for `idle` (checked [`IDLE_CHECKS`] times per period,
/// so between 1 and 1.25 × `idle`); never without an `idle`.
async fn idle_for(moved: &AtomicU64, idle: Option<Duration>) {
    let Some(idle) = idle else {
        return std::future::pending().await;
    };
    let period = (idle / IDLE_CHECKS).max(Duration::from_millis(1));
    let mut check = tokio::time::interval(period);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    check.tick().await;
    let mut last = moved.load(Ordering::Relaxed);
    let mut quiet = 0;
    while quiet < IDLE_CHECKS {
        check.tick().await;
        let now = moved.load(Ordering::Relaxed);
        quiet = if now == last { quiet + 1 } else { 0 };
        last = now;
    }
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

    /// A tunnel that moves nothing for `upgraded_idle` is closed, a WebSocket with a 1001 close
    /// frame; one that keeps moving bytes is not.
    #[tokio::test(start_paused = true)]
    async fn idle_tunnels_are_closed_with_going_away() {
        use tokio::io::duplex;
        let (client_proxy, mut client) = duplex(1024);
        let (backend_proxy, mut backend) = duplex(1024);
        let (_cut_tx, cut) = watch::channel(false);
        let idle = Some(Duration::from_secs(10));
        let stopping = CancellationToken::new().cancelled_owned();
        let tunnel = tokio::spawn(splice(
            client_proxy,
            backend_proxy,
            true,
            cut,
            stopping,
            idle,
        ));

        // Busy for 30s: a frame each way every 5s.
        for _ in 0..6 {
            tokio::time::sleep(Duration::from_secs(5)).await;
            client.write_all(&[0x81, 0x80, 1, 2, 3, 4]).await.unwrap();
            backend.write_all(&frame(1)).await.unwrap();
            let mut echoed = [0u8; 3];
            client.read_exact(&mut echoed).await.unwrap();
        }
        assert!(!tunnel.is_finished(), "closed while busy");

        // Quiet: closed between 10 and 12.5s later, with a close frame.
        let quiet = tokio::time::Instant::now();
        let mut close = [0u8; 4];
        client.read_exact(&mut close).await.unwrap();
        assert_eq!(close, CLOSE_GOING_AWAY);
        assert_eq!(tunnel.await.unwrap(), End::Idle);
        let took = quiet.elapsed();
        assert!(
            took >= Duration::from_secs(10) && took <= Duration::from_millis(12_500),
            "{took:?}"
        );
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty(), "{rest:?}");
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
