//! Draining: a backend stops taking new work (sticky clients aside, per `drain_sticky`), its idle
//! connections close, in-flight requests finish, and upgraded connections are cut at the deadline.
//! Then it is Retired (removed from the config: released) or Drained (runtime drain: kept, out of
//! rotation until undrained).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::backend::{BackendState, BackendStatus, Drain, DrainOutcome};

/// How long cut upgraded connections get to close (a WebSocket finishes its frame and says 1001).
const CUT_GRACE: Duration = Duration::from_secs(2);

/// Starts draining `state` unless a drain is already under way (a removal then upgrades a runtime
/// drain, keeping its deadline). `on_end` runs once the drain has ended, with its outcome.
pub fn start<F>(state: &Arc<BackendState>, timeout: Duration, removed: bool, on_end: F) -> Drain
where
    F: FnOnce(&Arc<BackendState>, &DrainOutcome) + Send + 'static,
{
    let (done_tx, done_rx) = watch::channel(None);
    let (drain, new) = state.begin_drain(removed, || {
        let now = Instant::now();
        Drain {
            started: now,
            deadline: now + timeout,
            removed,
            completed_at_start: state.completed(),
            cut_at_start: state.upgraded_cut(),
            upgrades_at_start: state.upgrades(),
            upgraded_at_start: state.upgraded(),
            done: done_rx,
        }
    });
    if !new {
        return drain;
    }
    // No new request will reuse them; closing them now frees the backend's sockets.
    state.pool.clear();
    tracing::info!(
        backend = %state.address(),
        in_flight = state.in_flight(),
        upgraded = state.upgraded(),
        timeout_s = timeout.as_secs_f64(),
        removed,
        "drain started"
    );
    tokio::spawn(run(Arc::clone(state), drain.clone(), done_tx, on_end));
    drain
}

/// Calls off a drain: the backend is active again with its state intact.
pub fn cancel(state: &BackendState) {
    if state.cancel_drain() {
        tracing::info!(backend = %state.address(), "drain called off; backend active");
    }
}

async fn run<F>(
    state: Arc<BackendState>,
    drain: Drain,
    done: watch::Sender<Option<DrainOutcome>>,
    on_end: F,
) where
    F: FnOnce(&Arc<BackendState>, &DrainOutcome) + Send + 'static,
{
    // This drain, not one started after it was called off (the state machine may have gone
    // Draining → Active → Draining before this task first ran).
    let still_draining = |s: &BackendState| {
        s.status() == BackendStatus::Draining
            && s.drain().is_some_and(|d| d.done.same_channel(&drain.done))
    };
    let hit_deadline = tokio::select! {
        _ = state.wait_until(|s| !still_draining(s) || s.is_quiet()) => false,
        _ = tokio::time::sleep_until(drain.deadline.into()) => true,
    };
    if hit_deadline && still_draining(&state) {
        state.cut_upgraded();
        let _ = tokio::time::timeout(
            CUT_GRACE,
            state.wait_until(|s| s.upgraded() == 0 || !still_draining(s)),
        )
        .await;
    }
    // Called off before it ended, possibly while upgraded connections were being cut.
    if !still_draining(&state) {
        let result = outcome(&state, &drain, "cancelled");
        on_end(&state, &result);
        done.send_replace(Some(result));
        return;
    }
    let result = outcome(
        &state,
        &drain,
        if hit_deadline { "deadline" } else { "drained" },
    );
    if state.end_drain(&drain.done).is_none() {
        // Called off between the check above and now.
        let result = outcome(&state, &drain, "cancelled");
        on_end(&state, &result);
        done.send_replace(Some(result));
        return;
    }
    tracing::info!(
        backend = %state.address(),
        end = result.end,
        requests_finished = result.requests_finished,
        requests_unfinished = result.requests_unfinished,
        upgraded_finished = result.upgraded_finished,
        upgraded_cut = result.upgraded_cut,
        seconds = result.seconds,
        "drain ended"
    );
    on_end(&state, &result);
    done.send_replace(Some(result));
}

fn outcome(state: &BackendState, drain: &Drain, end: &'static str) -> DrainOutcome {
    let cut = state.upgraded_cut() - drain.cut_at_start;
    let opened = drain.upgraded_at_start + (state.upgrades() - drain.upgrades_at_start);
    DrainOutcome {
        end,
        requests_finished: state.completed().saturating_sub(drain.completed_at_start),
        requests_unfinished: state.in_flight(),
        upgraded_finished: opened.saturating_sub(state.upgraded() + cut),
        upgraded_cut: cut,
        seconds: drain.started.elapsed().as_secs_f64(),
    }
}
