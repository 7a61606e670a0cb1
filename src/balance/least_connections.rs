//! Least connections: the backend with the fewest open requests and upgraded connections relative
//! to its weight, read from the live state that every pool naming the same address shares.

use std::sync::atomic::{AtomicUsize, Ordering};

use super::{Candidates, Choice, RequestFacts, Strategy};
use crate::config::BackendSpec;

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
}

impl Strategy for LeastConnections {
    fn choose(&self, _: &RequestFacts<'_>, candidates: &Candidates<'_>) -> Option<Choice> {
        let n = self.weights.len();
        if n == 0 {
            return None;
        }
        let members = candidates.members();
        // Starting the scan at a rotating offset makes ties alternate instead of always going to the
        // first backend.
        let start = self.cursor.fetch_add(1, Ordering::Relaxed) % n;
        // (index, load + 1, effective weight)
        let mut best: Option<(usize, u64, u64)> = None;
        for step in 0..n {
            let i = (start + step) % n;
            if !candidates.is_ready(i) {
                continue;
            }
            // +1 counts the request being placed, so that weights matter even when idle (Envoy
            // and HAProxy do the same); slow start scales the weight down while ramping.
            let load = members[i].state.load() + 1;
            let weight = self.weights[i] * candidates.weight_permille(i);
            // load_i / w_i < load_b / w_b, compared without division.
            let better = match best {
                None => true,
                Some((_, load_b, weight_b)) => {
                    u128::from(load) * u128::from(weight_b)
                        < u128::from(load_b) * u128::from(weight)
                }
            };
            if better {
                best = Some((i, load, weight));
            }
        }
        best.map(|(i, _, _)| Choice::plain(i))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::testing::{facts, members};
    use http::HeaderMap;

    #[test]
    fn avoids_busy_backend_and_alternates_ties() {
        let members = members(&[1, 1, 1]);
        let specs: Vec<_> = members.iter().map(|m| &m.spec).collect();
        let lc = LeastConnections::new(&specs);
        let headers = HeaderMap::new();
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
        let headers = HeaderMap::new();
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
        let headers = HeaderMap::new();
        let c = Candidates::new(&members, 2, &[]);
        // Two WebSockets open on 0, one plain request in flight on 1: 1 is the less loaded.
        let _tunnels: Vec<_> = (0..2).map(|_| members[0].state.start_upgrade()).collect();
        let _request = members[1].state.start_request();
        for _ in 0..4 {
            assert_eq!(lc.choose(&facts(&headers), &c).unwrap().index, 1);
        }
    }

    #[test]
    fn none_when_nothing_ready() {
        let members = members(&[1, 1]);
        let specs: Vec<_> = members.iter().map(|m| &m.spec).collect();
        let lc = LeastConnections::new(&specs);
        let headers = HeaderMap::new();
        let c = Candidates::new(&members, 2, &[0, 1]);
        assert!(lc.choose(&facts(&headers), &c).is_none());
    }
}
