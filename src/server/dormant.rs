//! Dormant client connections: plain-TCP keep-alive connections that have been parked (see
//! [`CheckedIo::parks_when_idle`](super::framing::CheckedIo::parks_when_idle)) for 100 ms and
//! wait for their next request with no task of their own.
//!
//! A parked connection's task held about a kilobyte (the task, its two timers, tokio's
//! registration of the socket) to wait for bytes that may not come for minutes. nginx and HAProxy
//! keep such a connection as a socket in their event loop and a small struct. Here its socket
//! leaves tokio's reactor for an epoll set of its own ([`Dormant`]), its state goes into one
//! boxed [`Sleeper`] of about 200 bytes, and its task ends. One task watches the whole set: when a
//! dormant socket turns readable, the connection goes back to tokio's reactor and gets a task
//! again, which reads the next head; when one reaches its deadline (`client_header` after its
//! last answer, or `timeouts.idle`, whichever comes first) the socket is closed, as the task
//! would have closed it; when the server stops, all of them are.
//!
//! The set is a `mio` poll (an epoll instance) registered in tokio's reactor through `AsyncFd`.
//! Going dormant and waking cost four `epoll_ctl` calls and about 6,000 instructions between
//! them, on connections that were idle for 110 ms already; a client that pauses for less keeps its
//! connection's task.

use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use mio::unix::SourceFd;
use mio::{Events, Interest, Token};
use tokio::io::unix::{AsyncFd, AsyncFdReadyMutGuard};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Readiness events taken from the set per `epoll_wait`.
const EVENTS: usize = 256;
/// Expired sleepers are looked for at most this often: the deadlines are checked by a scan of
/// all of them, so that many connections expiring in a row cost one scan per interval.
const SWEEP_GRAIN: Duration = Duration::from_millis(50);

/// One dormant connection: what it needs to be served again.
pub(crate) trait Sleeper: Send {
    /// Its socket, out of tokio's reactor.
    fn socket(&self) -> RawFd;
    /// Puts the socket back in tokio's reactor and spawns the connection's task on the set's
    /// tracker.
    fn wake(self: Box<Self>, dormant: &Arc<Dormant>);
}

/// The server's dormant connections, and what their tasks get when they wake.
pub(crate) struct Dormant {
    /// Registers and deregisters sockets in the set (a handle on the same epoll instance).
    registry: mio::Registry,
    slots: Mutex<Slots>,
    /// Tells the watching task a deadline earlier than the ones it knew arrived.
    sooner: Notify,
    /// Spawns woken connections' tasks, so that the server's shutdown waits for them.
    pub(crate) tracker: TaskTracker,
    /// The server's stop, for woken connections.
    pub(crate) stop: CancellationToken,
    /// Set just before `stop` is cancelled.
    pub(crate) stopped: Arc<AtomicBool>,
    /// Polling the set failed: nothing sleeps here any more.
    failed: AtomicBool,
}

impl std::fmt::Debug for Dormant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dormant")
            .field("sleeping", &self.slots().sleepers.len())
            .finish_non_exhaustive()
    }
}

/// The sleepers, by the token their socket is registered with.
#[derive(Default)]
struct Slots {
    sleepers: Vec<Option<Box<dyn Sleeper>>>,
    /// Each slot's deadline (a vacant one's is `None`), apart from the sleepers so that a sweep
    /// reads one dense array.
    deadlines: Vec<Option<Instant>>,
    vacant: Vec<usize>,
    /// The earliest deadline the watching task knows of.
    due: Option<Instant>,
    /// The server stopped: nothing sleeps any more.
    closed: bool,
}

impl Slots {
    /// Takes the sleeper registered as `index` out of the set, if it is still there.
    fn take(&mut self, index: usize) -> Option<Box<dyn Sleeper>> {
        let sleeper = self.sleepers.get_mut(index)?.take()?;
        self.deadlines[index] = None;
        self.vacant.push(index);
        Some(sleeper)
    }

    /// Takes every sleeper out of the set.
    fn take_all(&mut self) -> Vec<Box<dyn Sleeper>> {
        self.vacant.clear();
        self.deadlines.clear();
        self.due = None;
        std::mem::take(&mut self.sleepers)
            .into_iter()
            .flatten()
            .collect()
    }
}

impl Dormant {
    /// An empty set, and the task that watches it (to be spawned on `tracker`); fails if the
    /// epoll instance cannot be made.
    pub(crate) fn new(
        tracker: TaskTracker,
        stop: CancellationToken,
        stopped: Arc<AtomicBool>,
    ) -> io::Result<(Arc<Dormant>, impl std::future::Future<Output = ()> + Send)> {
        let poll = mio::Poll::new()?;
        let registry = poll.registry().try_clone()?;
        // SAFETY: the poll owns its epoll descriptor, which stays open and the same for as long as
        // the poll lives, and the `AsyncFd` owns the poll; nothing swaps it through `get_mut`.
        let poll = unsafe { AsyncFd::register_with_interest(poll, tokio::io::Interest::READABLE)? };
        let dormant = Arc::new(Dormant {
            registry,
            slots: Mutex::new(Slots::default()),
            sooner: Notify::new(),
            tracker,
            stop,
            stopped,
            failed: AtomicBool::new(false),
        });
        let watch = Arc::clone(&dormant).watch(poll);
        Ok((dormant, watch))
    }

    fn slots(&self) -> MutexGuard<'_, Slots> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Connections dormant now.
    pub(crate) fn len(&self) -> usize {
        let slots = self.slots();
        slots.sleepers.len() - slots.vacant.len()
    }

    /// Puts `sleeper` to sleep until its socket turns readable, or until `deadline`, when it is
    /// closed (a dormant connection has nothing in flight to finish). A server that has stopped
    /// takes nothing: the sleeper is handed back, to be closed. A socket the set cannot take is
    /// woken at once, back into a task.
    pub(crate) fn sleep(
        self: &Arc<Self>,
        sleeper: Box<dyn Sleeper>,
        deadline: Instant,
    ) -> Result<(), Box<dyn Sleeper>> {
        let fd = sleeper.socket();
        let mut slots = self.slots();
        if slots.closed {
            return Err(sleeper);
        }
        if !self.is_working() {
            drop(slots);
            sleeper.wake(self);
            return Ok(());
        }
        let index = match slots.vacant.pop() {
            Some(index) => index,
            None => {
                slots.sleepers.push(None);
                slots.deadlines.push(None);
                slots.sleepers.len() - 1
            }
        };
        // Registered under the lock, so that no readiness for this token is handled before the
        // slot holds the sleeper. A socket that already has bytes to read is reported at once.
        if let Err(error) =
            self.registry
                .register(&mut SourceFd(&fd), Token(index), Interest::READABLE)
        {
            slots.vacant.push(index);
            drop(slots);
            tracing::debug!(%error, "a parked connection could not go dormant; keeping its task");
            sleeper.wake(self);
            return Ok(());
        }
        slots.sleepers[index] = Some(sleeper);
        slots.deadlines[index] = Some(deadline);
        if slots.due.is_none_or(|due| deadline < due) {
            slots.due = Some(deadline);
            drop(slots);
            self.sooner.notify_one();
        }
        Ok(())
    }

    /// Watches the set until the server stops: wakes sleepers whose socket turned readable,
    /// closes those past their deadline, and at the stop closes the rest. Should polling the set
    /// ever fail, every sleeper is woken and parked connections keep their tasks from then on.
    async fn watch(self: Arc<Self>, mut poll: AsyncFd<mio::Poll>) {
        // Closes what still sleeps when the watch ends: at the stop, or by a panic.
        let _closing = CloseOnDrop(&self);
        let mut events = Events::with_capacity(EVENTS);
        let mut last_sweep = Instant::now();
        loop {
            let due = self
                .slots()
                .due
                .map(|due| due.max(last_sweep + SWEEP_GRAIN));
            // Checked here, not only by the timer below: a steady stream of wake-ups, polled
            // first, would put the timer off.
            if due.is_some_and(|due| due <= Instant::now()) {
                last_sweep = Instant::now();
                self.sweep(last_sweep);
                continue;
            }
            let failed = tokio::select! {
                biased;
                _ = self.stop.cancelled() => return,
                ready = poll.readable_mut() => match ready {
                    Ok(mut guard) => self.drain(&mut guard, &mut events).err(),
                    Err(error) => Some(error),
                },
                _ = super::sleep_until_opt(due) => None,
                _ = self.sooner.notified() => None,
            };
            if let Some(error) = failed {
                tracing::error!(
                    %error,
                    "dormant connections: polling failed; parked connections keep their tasks"
                );
                self.give_up();
                self.stop.cancelled().await;
                return;
            }
        }
    }

    /// Takes every readiness event from the set and wakes their sleepers, until none is left
    /// (which clears the set's readiness in tokio's reactor).
    fn drain(
        self: &Arc<Self>,
        guard: &mut AsyncFdReadyMutGuard<'_, mio::Poll>,
        events: &mut Events,
    ) -> io::Result<()> {
        loop {
            let polled = guard.try_io(|poll| {
                poll.get_mut().poll(events, Some(Duration::ZERO))?;
                if events.is_empty() {
                    return Err(io::ErrorKind::WouldBlock.into());
                }
                Ok(())
            });
            match polled {
                Ok(Ok(())) => self.wake_ready(events),
                Ok(Err(error)) if error.kind() == io::ErrorKind::Interrupted => {}
                Ok(Err(error)) => return Err(error),
                Err(_would_block) => return Ok(()),
            }
        }
    }

    /// Whether parked connections go to sleep here (they keep their tasks once polling failed).
    pub(crate) fn is_working(&self) -> bool {
        !self.failed.load(Ordering::Relaxed)
    }

    /// Wakes every sleeper into a task, for good.
    fn give_up(self: &Arc<Self>) {
        self.failed.store(true, Ordering::Relaxed);
        let all = self.slots().take_all();
        for sleeper in all {
            let fd = sleeper.socket();
            let _ = self.registry.deregister(&mut SourceFd(&fd));
            sleeper.wake(self);
        }
    }

    /// Wakes the sleepers whose sockets `events` reports readable (or closed: the woken task
    /// reads the end of the stream and ends).
    fn wake_ready(self: &Arc<Self>, events: &Events) {
        let woken: Vec<Box<dyn Sleeper>> = {
            let mut slots = self.slots();
            events
                .iter()
                .filter_map(|event| slots.take(event.token().0))
                .collect()
        };
        for sleeper in woken {
            // Out of this set before it goes back to tokio's: a socket in both would be reported
            // here again, under a token another sleeper may have by then.
            let fd = sleeper.socket();
            if let Err(error) = self.registry.deregister(&mut SourceFd(&fd)) {
                tracing::debug!(%error, "dormant connection: deregistering failed");
            }
            sleeper.wake(self);
        }
    }

    /// Closes the sleepers past their deadline, and notes the next deadline.
    fn sweep(&self, now: Instant) {
        let expired: Vec<Box<dyn Sleeper>> = {
            let mut slots = self.slots();
            let mut expired = Vec::new();
            let mut due: Option<Instant> = None;
            for index in 0..slots.deadlines.len() {
                match slots.deadlines[index] {
                    Some(deadline) if deadline <= now => {
                        if let Some(sleeper) = slots.take(index) {
                            expired.push(sleeper);
                        }
                    }
                    Some(deadline) => due = Some(due.map_or(deadline, |due| due.min(deadline))),
                    None => {}
                }
            }
            slots.due = due;
            shrink(&mut slots);
            expired
        };
        if !expired.is_empty() {
            tracing::debug!(closed = expired.len(), "closing idle dormant connections");
        }
        // Dropped outside the lock: closing a socket also takes it out of the epoll set.
        drop(expired);
    }

    /// Closes every sleeper and takes no more.
    fn close_all(&self) {
        let all = {
            let mut slots = self.slots();
            slots.closed = true;
            slots.take_all()
        };
        // Dropped outside the lock: each drop closes a socket.
        drop(all);
    }
}

/// Closes every sleeper of a set when dropped (see [`Dormant::watch`]).
struct CloseOnDrop<'a>(&'a Dormant);

impl Drop for CloseOnDrop<'_> {
    fn drop(&mut self) {
        self.0.close_all();
    }
}

/// Gives back the slots' memory after a crowd of sleepers left: the table is cut after its last
/// occupied slot when at most a quarter of it is in use.
fn shrink(slots: &mut Slots) {
    let used = slots.sleepers.len() - slots.vacant.len();
    if slots.sleepers.len() < 64 || used * 4 > slots.sleepers.len() {
        return;
    }
    let keep = slots
        .sleepers
        .iter()
        .rposition(Option::is_some)
        .map_or(0, |last| last + 1);
    slots.sleepers.truncate(keep);
    slots.deadlines.truncate(keep);
    slots.vacant.retain(|&index| index < keep);
    slots.sleepers.shrink_to(keep * 2);
    slots.deadlines.shrink_to(keep * 2);
    slots.vacant.shrink_to(keep * 2);
}
