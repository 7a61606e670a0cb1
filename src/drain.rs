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

/// Starts draining `state`, for a removal from the config (`removed`) or at runtime, unless a
/// drain is already under way: that one is joined, keeping its deadline, and a removal then makes
/// it end Retired. `on_end` runs once a new drain has ended, with its outcome.
///
/// Refused with the backend's status when it is Retired (released, never to come back: a drain
/// through a stale snapshot's member) or, for a runtime drain, already Drained.
pub fn start<F>(
    state: &Arc<BackendState>,
    timeout: Duration,
    removed: bool,
    on_end: F,
) -> Result<Drain, BackendStatus>
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
            runtime: !removed,
            completed_at_start: state.completed(),
            cut_at_start: state.upgraded_cut(),
            upgrades_at_start: state.upgrades(),
            upgraded_at_start: state.upgraded(),
            done: done_rx,
        }
    })?;
    if !new {
        return Ok(drain);
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
    Ok(drain)
}

/// The backend is back in the config: a drain for its removal is called off, and the backend is
/// active again with its state intact; a runtime drain goes on (only `/undrain` ends it).
pub fn return_to_config(state: &BackendState) {
    if state.return_to_config() {
        tracing::info!(backend = %state.address(), "back in the config; drain called off");
    }
}

/// The operator's undrain: active again. Refused with the backend's status when it is leaving
/// the config (Draining for a removal, or Retired); only the config can bring it back.
pub fn undrain(state: &BackendState) -> Result<(), BackendStatus> {
    if state.undrain()? {
        tracing::info!(backend = %state.address(), "undrained; backend active");
    }
    Ok(())
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
    let ours = |s: &BackendState| s.is_draining_with(&drain.done);
    let hit_deadline = tokio::select! {
        _ = state.wait_until(|s| !ours(s) || s.is_quiet()) => false,
        _ = tokio::time::sleep_until(drain.deadline.into()) => true,
    };
    if hit_deadline && state.cut_upgraded_for(&drain.done) {
        let _ = tokio::time::timeout(
            CUT_GRACE,
            state.wait_until(|s| s.upgraded() == 0 || !ours(s)),
        )
        .await;
    }
    let result = match state.end_drain(&drain.done) {
        Some(_) => {
            // A response that ended just as the drain started may have returned its connection
            // after the pool was cleared, and a Drained backend keeps its pool until undrained.
            state.pool.clear();
            let end = if hit_deadline { "deadline" } else { "drained" };
            let result = outcome(&state, &drain, end);
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
            result
        }
        // Called off before it ended, possibly while upgraded connections were being cut.
        None => outcome(&state, &drain, "cancelled"),
    };
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

#[cfg(test)]
mod tests {
    use super::*;

    fn backend() -> Arc<BackendState> {
        BackendState::new("192.0.2.10:80".parse().unwrap())
    }

    fn begin(state: &Arc<BackendState>, removed: bool) -> Result<Drain, BackendStatus> {
        start(state, Duration::from_secs(30), removed, |_, _| {})
    }

    async fn ended(drain: &Drain) -> DrainOutcome {
        let mut done = drain.done.clone();
        let outcome = tokio::time::timeout(Duration::from_secs(5), done.wait_for(Option::is_some))
            .await
            .expect("the drain ends within 5s")
            .expect("the drain task reports its end");
        outcome.clone().expect("an outcome")
    }

    #[tokio::test]
    async fn retired_backend_is_never_drained_or_undrained_again() {
        let state = backend();
        assert_eq!(ended(&begin(&state, true).unwrap()).await.end, "drained");
        assert_eq!(state.status(), BackendStatus::Retired);

        // A runtime drain through an older snapshot's member, or a removal.
        assert_eq!(begin(&state, false).unwrap_err(), BackendStatus::Retired);
        assert_eq!(begin(&state, true).unwrap_err(), BackendStatus::Retired);
        assert_eq!(undrain(&state), Err(BackendStatus::Retired));
        assert_eq!(state.status(), BackendStatus::Retired);
        assert!(state.drain().is_none());
    }

    #[tokio::test]
    async fn runtime_drain_of_a_drained_backend_starts_nothing() {
        let state = backend();
        assert_eq!(ended(&begin(&state, false).unwrap()).await.end, "drained");
        assert_eq!(state.status(), BackendStatus::Drained);
        assert_eq!(begin(&state, false).unwrap_err(), BackendStatus::Drained);
        assert_eq!(state.status(), BackendStatus::Drained);
        assert!(state.drain().is_none());
    }

    #[tokio::test]
    async fn runtime_drain_joined_by_a_removal_goes_on_when_the_backend_returns() {
        let state = backend();
        let request = state.start_request();
        let drain = begin(&state, false).unwrap();
        let joined = begin(&state, true).unwrap();
        assert!(
            joined.done.same_channel(&drain.done),
            "a second drain started"
        );
        assert!(joined.removed && joined.runtime, "{joined:?}");

        return_to_config(&state);
        assert_eq!(state.status(), BackendStatus::Draining);
        assert!(state.drain().is_some_and(|d| !d.removed && d.runtime));
        drop(request);
        assert_eq!(ended(&drain).await.end, "drained");
        assert_eq!(state.status(), BackendStatus::Drained);
    }

    #[tokio::test]
    async fn removal_of_a_drained_backend_keeps_it_drained_and_out_of_reach() {
        let state = backend();
        ended(&begin(&state, false).unwrap()).await;
        // Left to its own timeout when the drain ended.
        let request = state.start_request();
        // Removing it starts no new drain: Draining would let sticky clients back in.
        assert_eq!(begin(&state, true).unwrap_err(), BackendStatus::Drained);
        assert_eq!(state.status(), BackendStatus::Drained);
        assert!(!state.is_draining() && !state.is_ready());
        // Back in the config, it is still the operator's to undrain.
        return_to_config(&state);
        assert_eq!(state.status(), BackendStatus::Drained);
        drop(request);
        assert_eq!(undrain(&state), Ok(()));
        assert_eq!(state.status(), BackendStatus::Active);
    }

    #[tokio::test]
    async fn removal_drain_is_called_off_when_the_backend_returns() {
        let state = backend();
        let request = state.start_request();
        let removal = begin(&state, true).unwrap();
        assert_eq!(
            undrain(&state),
            Err(BackendStatus::Draining),
            "undrained while leaving the config"
        );
        return_to_config(&state);
        assert_eq!(state.status(), BackendStatus::Active);
        assert_eq!(ended(&removal).await.end, "cancelled");
        drop(request);
        assert_eq!(state.status(), BackendStatus::Active);
    }

    /// A drain's deadline cuts upgraded connections only while that drain is in force: once the
    /// backend is back in the config, a late cut would stay, and close every later tunnel at once.
    #[tokio::test]
    async fn a_drain_called_off_cuts_nothing() {
        let state = backend();
        let removal = begin(&state, true).unwrap();
        return_to_config(&state);
        assert!(!state.cut_upgraded_for(&removal.done));
        assert!(!state.is_cut());
        let again = begin(&state, true).unwrap();
        assert!(
            state.cut_upgraded_for(&again.done),
            "the drain in force cuts"
        );
        assert!(state.is_cut());
        return_to_config(&state);
        assert!(
            !state.is_cut(),
            "back in the config, tunnels are left alone"
        );
    }
}
