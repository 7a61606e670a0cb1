//! Least connections: the backend with the fewest open requests and upgraded connections relative
//! to its weight, read from the live state that every pool naming the same address shares.
//!
//! Small pools are scanned whole, which is exact and cheap. Large ones compare two backends drawn
//! at random ("power of two choices", Envoy's default for least request): O(1) per decision, and
//! within a small constant of the best backend's load, where a scan would cost O(n) per request.

use std::sync::atomic::{AtomicUsize, Ordering};

use super::{Candidates, Choice, RequestFacts, Strategy};
use crate::config::BackendSpec;

/// Pools up to this size are scanned whole; larger ones use two random choices.
pub const EXACT_SCAN_MAX: usize = 32;

/// Random draws before giving up on finding two ready backends and scanning instead.
const DRAWS: usize = 8;

/// Fewest in-flight requests plus open upgraded connections (WebSockets) per unit of weight;
/// equal backends take turns. Upgraded connections count because a tunnel stops being in flight
/// when its 101 is returned, yet holds the backend for as long as it stays open.
#[derive(Debug)]
pub struct LeastConnections {
    weights: Vec<u64>,
    cursor: AtomicUsize,
}

impl LeastConnections {
    /// A selector over `backends` (their weights).
    pub fn new(backends: &[&BackendSpec]) -> Self {
        LeastConnections {
            weights: backends.iter().map(|b| u64::from(b.weight)).collect(),
            cursor: AtomicUsize::new(0),
        }
    }

    /// (load + 1, weight) of member `i`. +1 counts the request being placed, so that weights
    /// matter even when idle (Envoy and HAProxy do the same).
    #[inline]
    fn score(&self, candidates: &Candidates<'_>, i: usize) -> (u64, u64) {
        let load = candidates.members()[i].state.load() + 1;
        (load, self.weights[i])
    }

    /// Whether member `i` takes part in this decision. A backend ramping up (slow start) takes
    /// part in its share of decisions only, so that it gets its share of the work whether the
    /// pool is idle (where it would lose every tie) or busy (where, being empty, it would win
    /// them all).
    #[inline]
    fn competes(candidates: &Candidates<'_>, i: usize, ramp: bool) -> bool {
        candidates.accepts(i) && (!ramp || candidates.admits(i))
    }

    /// Whether `a` is less loaded than `b` relative to weight, compared without division.
    #[inline]
    fn lighter(a: (u64, u64), b: (u64, u64)) -> bool {
        u128::from(a.0) * u128::from(b.1) < u128::from(b.0) * u128::from(a.1)
    }

    /// Every ready backend compared; the scan starts at a rotating offset so that ties alternate
    /// instead of always going to the first backend.
    fn scan(&self, candidates: &Candidates<'_>, ramp: bool) -> Option<Choice> {
        let n = self.weights.len();
        let start = self.cursor.fetch_add(1, Ordering::Relaxed) % n;
        let mut best: Option<(usize, (u64, u64))> = None;
        for step in 0..n {
            let i = (start + step) % n;
            if !Self::competes(candidates, i, ramp) {
                continue;
            }
            let score = self.score(candidates, i);
            if best.is_none_or(|(_, b)| Self::lighter(score, b)) {
                best = Some((i, score));
            }
        }
        best.map(|(i, _)| Choice::plain(i))
    }
}

impl Strategy for LeastConnections {
    fn choose(&self, _: &RequestFacts<'_>, candidates: &Candidates<'_>) -> Option<Choice> {
        let n = self.weights.len();
        if n == 0 {
            return None;
        }
        if n <= EXACT_SCAN_MAX {
            // Every ramping backend may have sat this decision out: then all compete.
            return self
                .scan(candidates, true)
                .or_else(|| self.scan(candidates, false));
        }
        let mut first: Option<usize> = None;
        for _ in 0..DRAWS {
            let i = fastrand::usize(..n);
            if first == Some(i) || !Self::competes(candidates, i, true) {
                continue;
            }
            let Some(a) = first else {
                first = Some(i);
                continue;
            };
            let (sa, si) = (self.score(candidates, a), self.score(candidates, i));
            return Some(Choice::plain(if Self::lighter(si, sa) { i } else { a }));
        }
        // Most backends are unavailable: a scan finds the few that are not.
        self.scan(candidates, true)
            .or_else(|| self.scan(candidates, false))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::testing::{facts, members};

    #[test]
    fn avoids_busy_backend_and_alternates_ties() {
        let members = members(&[1, 1, 1]);
        let specs: Vec<_> = members.iter().map(|m| &m.spec).collect();
        let lc = LeastConnections::new(&specs);
        let headers: Vec<http::HeaderValue> = Vec::new();
        let c = Candidates::new(&members, 3, &[]);
        // Idle and equal: they take turns.
        let idle: Vec<usize> = (0..6)
            .map(|_| lc.choose(&facts(&headers), &c).unwrap().index)
            .collect();
        assert_eq!(idle, vec![0, 1, 2, 0, 1, 2]);
        // Backend 0 is busy with 3 slow requests; new requests (held open) go to 1 and 2 evenly.
        let _busy: Vec<_> = (0..3).map(|_| members[0].state.start_request()).collect();
        let mut held = Vec::new();
        let mut picks = Vec::new();
        for _ in 0..6 {
            let i = lc.choose(&facts(&headers), &c).unwrap().index;
            held.push(members[i].state.start_request());
            picks.push(i);
        }
        assert!(!picks.contains(&0), "{picks:?}");
        assert_eq!(picks.iter().filter(|&&i| i == 1).count(), 3, "{picks:?}");
    }

    #[test]
    fn weight_scales_load() {
        let members = members(&[3, 1]);
        let specs: Vec<_> = members.iter().map(|m| &m.spec).collect();
        let lc = LeastConnections::new(&specs);
        let headers: Vec<http::HeaderValue> = Vec::new();
        let c = Candidates::new(&members, 2, &[]);
        // 2 in flight on a weight-3 backend (0.67) beats 1 on a weight-1 backend (1.0).
        let _a: Vec<_> = (0..2).map(|_| members[0].state.start_request()).collect();
        let _b = members[1].state.start_request();
        assert_eq!(lc.choose(&facts(&headers), &c).unwrap().index, 0);
    }

    #[test]
    fn open_upgraded_connections_count_as_load() {
        let members = members(&[1, 1]);
        let specs: Vec<_> = members.iter().map(|m| &m.spec).collect();
        let lc = LeastConnections::new(&specs);
        let headers: Vec<http::HeaderValue> = Vec::new();
        let c = Candidates::new(&members, 2, &[]);
        // Two WebSockets open on 0, one plain request in flight on 1: 1 is the less loaded.
        let _tunnels: Vec<_> = (0..2).map(|_| members[0].state.start_upgrade()).collect();
        let _request = members[1].state.start_request();
        for _ in 0..4 {
            assert_eq!(lc.choose(&facts(&headers), &c).unwrap().index, 1);
        }
    }

    #[test]
    fn large_pools_pick_the_lighter_of_two_and_spread_load() {
        let n = 200;
        let members = members(&vec![1; n]);
        let specs: Vec<_> = members.iter().map(|m| &m.spec).collect();
        let lc = LeastConnections::new(&specs);
        let headers: Vec<http::HeaderValue> = Vec::new();
        let c = Candidates::new(&members, n, &[]);
        // 20 requests held per backend on average: two random choices keep the busiest close to
        // the mean, where one random choice would leave some near 40.
        let mut held = Vec::new();
        for _ in 0..n * 20 {
            let i = lc.choose(&facts(&headers), &c).unwrap().index;
            held.push(members[i].state.start_request());
        }
        let loads: Vec<u64> = members.iter().map(|m| m.state.in_flight()).collect();
        let max = *loads.iter().max().unwrap();
        assert!(max <= 24, "busiest backend has {max} against a mean of 20");
        // Only one backend ready: found by the scan after the draws miss.
        let tried: Vec<usize> = (1..n).collect();
        let c = Candidates::new(&members, n, &tried);
        assert_eq!(lc.choose(&facts(&headers), &c).unwrap().index, 0);
    }

    #[test]
    fn a_ramping_backend_takes_its_share_idle_or_busy() {
        let members = members(&[1, 1]);
        let specs: Vec<_> = members.iter().map(|m| &m.spec).collect();
        let lc = LeastConnections::new(&specs);
        let headers: Vec<http::HeaderValue> = Vec::new();
        let window = Some(std::time::Duration::from_secs(600));
        let c = Candidates::new(&members, 2, &[]).with_slow_start(window);
        members[1].state.health.begin_slow_start();
        // Idle (each request ends before the next): it competes in a tenth of the decisions, far
        // from its even half.
        let idle = (0..2_000)
            .filter(|_| lc.choose(&facts(&headers), &c).unwrap().index == 1)
            .count();
        assert!((50..=250).contains(&idle), "idle: {idle} of 2000");
        // Busy, with the ramping backend empty: it still takes only part of the work.
        let _busy: Vec<_> = (0..50).map(|_| members[0].state.start_request()).collect();
        let busy = (0..1_000)
            .filter(|_| lc.choose(&facts(&headers), &c).unwrap().index == 1)
            .count();
        assert!((50..=150).contains(&busy), "busy: {busy} of 1000");
    }

    #[test]
    fn none_when_nothing_ready() {
        let members = members(&[1, 1]);
        let specs: Vec<_> = members.iter().map(|m| &m.spec).collect();
        let lc = LeastConnections::new(&specs);
        let headers: Vec<http::HeaderValue> = Vec::new();
        let c = Candidates::new(&members, 2, &[0, 1]);
        assert!(lc.choose(&facts(&headers), &c).is_none());
    }
}
