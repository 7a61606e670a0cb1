//! Smooth weighted round robin (nginx's algorithm), precomputed per snapshot into one cycle that a
//! shared atomic cursor walks, so choosing takes no lock.

use std::sync::atomic::{AtomicUsize, Ordering};

use super::{gcd, Candidates, Choice, RequestFacts, Strategy};
use crate::config::BackendSpec;

/// Above this many steps × backends, the exact nginx schedule costs too much to build, and an
/// earliest-deadline interleaving (just as smooth, slightly different order) is used instead.
const EXACT_BUILD_LIMIT: u64 = 1 << 24;

/// Weighted round robin with nginx's smooth interleaving: weights 5,1,1 give a,a,b,a,c,a,a.
#[derive(Debug)]
pub struct RoundRobin {
    cycle: Vec<u32>,
    cursor: AtomicUsize,
}

impl RoundRobin {
    /// Builds the cycle for `backends` (weights reduced by their gcd, so the cycle is as short as it
    /// can be).
    pub fn new(backends: &[&BackendSpec]) -> Self {
        let weights: Vec<u64> = backends.iter().map(|b| u64::from(b.weight)).collect();
        let divisor = weights.iter().copied().fold(0, gcd).max(1);
        let weights: Vec<u64> = weights.iter().map(|w| w / divisor).collect();
        let total: u64 = weights.iter().sum();
        let cycle = if total.saturating_mul(weights.len() as u64) <= EXACT_BUILD_LIMIT {
            smooth_cycle(&weights, total)
        } else {
            deadline_cycle(&weights, total)
        };
        RoundRobin {
            cycle,
            cursor: AtomicUsize::new(0),
        }
    }

    /// The precomputed cycle of member indexes.
    pub fn cycle(&self) -> &[u32] {
        &self.cycle
    }
}

/// nginx's smooth weighted round robin, run for one full period.
fn smooth_cycle(weights: &[u64], total: u64) -> Vec<u32> {
    let mut current = vec![0i64; weights.len()];
    let mut cycle = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = 0;
        for (i, w) in weights.iter().enumerate() {
            current[i] += *w as i64;
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total as i64;
        cycle.push(best as u32);
    }
    cycle
}

/// Each backend's k-th turn is due at (k + 1/2) / weight; turns are taken in order of due time.
fn deadline_cycle(weights: &[u64], total: u64) -> Vec<u32> {
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;
    // Due times compared as fractions num/den without floating point: (2k + 1) / (2w).
    #[derive(PartialEq, Eq)]
    struct Due {
        num: u64,
        den: u64,
        index: u32,
    }
    impl Ord for Due {
        fn cmp(&self, other: &Self) -> std::cmp::Ordering {
            (u128::from(self.num) * u128::from(other.den))
                .cmp(&(u128::from(other.num) * u128::from(self.den)))
                .then(self.index.cmp(&other.index))
        }
    }
    impl PartialOrd for Due {
        fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
            Some(self.cmp(other))
        }
    }
    let mut heap: BinaryHeap<Reverse<Due>> = weights
        .iter()
        .enumerate()
        .map(|(i, &w)| {
            Reverse(Due {
                num: 1,
                den: 2 * w,
                index: i as u32,
            })
        })
        .collect();
    let mut cycle = Vec::with_capacity(total as usize);
    while cycle.len() < total as usize {
        let Reverse(mut due) = heap.pop().expect("weights are not empty");
        cycle.push(due.index);
        due.num += 2;
        heap.push(Reverse(due));
    }
    cycle
}

impl Strategy for RoundRobin {
    fn choose(&self, _: &RequestFacts<'_>, candidates: &Candidates<'_>) -> Option<Choice> {
        let len = self.cycle.len();
        if len == 0 {
            return None;
        }
        // An unavailable backend's turn is skipped, not handed to its neighbour in the cycle, so
        // the others keep their relative shares.
        // The first backend that declined its turn while ramping up (slow start): when every
        // ready backend is ramping, it takes the request, so they still share the work evenly.
        let mut declined = None;
        for _ in 0..len {
            let i = self.cycle[self.cursor.fetch_add(1, Ordering::Relaxed) % len] as usize;
            if !candidates.accepts(i) {
                continue;
            }
            // A ramping backend passes on the turns it does not take.
            if candidates.admits(i) {
                return Some(Choice::plain(i));
            }
            declined.get_or_insert(i);
        }
        if let Some(i) = declined {
            // A whole cycle went by, so the next request would start where this one did; one more
            // step makes the fallback rotate like the turns do.
            self.cursor.fetch_add(1, Ordering::Relaxed);
            return Some(Choice::plain(i));
        }
        // Other threads moved the cursor past the ready entries meanwhile: any ready one will do.
        (0..candidates.active().min(len))
            .find(|&i| candidates.accepts(i))
            .or_else(|| (0..candidates.active().min(len)).find(|&i| candidates.is_ready(i)))
            .map(Choice::plain)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::testing::{facts, members};

    fn picks(weights: &[u32], n: usize, tried: &[usize]) -> Vec<usize> {
        let members = members(weights);
        let specs: Vec<_> = members.iter().map(|m| &m.spec).collect();
        let rr = RoundRobin::new(&specs);
        let headers: Vec<http::HeaderValue> = Vec::new();
        let c = Candidates::new(&members, members.len(), tried);
        (0..n)
            .map(|_| rr.choose(&facts(&headers), &c).unwrap().index)
            .collect()
    }

    #[test]
    fn weights_5_1_1_interleave_like_nginx() {
        assert_eq!(picks(&[5, 1, 1], 7, &[]), vec![0, 0, 1, 0, 2, 0, 0]);
        assert_eq!(picks(&[5, 1, 1], 14, &[])[7..], [0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn equal_weights_alternate() {
        assert_eq!(picks(&[1, 1, 1], 6, &[]), vec![0, 1, 2, 0, 1, 2]);
        // gcd reduction keeps the same order for 2,2,2.
        assert_eq!(picks(&[2, 2, 2], 3, &[]), vec![0, 1, 2]);
    }

    #[test]
    fn unavailable_turn_passes_on() {
        let p = picks(&[1, 1, 1], 6, &[1]);
        assert_eq!(p, vec![0, 2, 0, 2, 0, 2]);
        let p = picks(&[2, 1, 1], 12, &[2]);
        assert_eq!(p.iter().filter(|&&i| i == 0).count(), 8, "{p:?}");
    }

    #[test]
    fn a_ramping_backend_takes_its_share_and_all_ramping_still_spread() {
        let members = members(&[1, 1, 1]);
        let specs: Vec<_> = members.iter().map(|m| &m.spec).collect();
        let rr = RoundRobin::new(&specs);
        let headers: Vec<http::HeaderValue> = Vec::new();
        let window = Some(std::time::Duration::from_secs(600));
        let c = Candidates::new(&members, 3, &[]).with_slow_start(window);
        let picks = |n: usize| -> Vec<usize> {
            let mut counts = vec![0; 3];
            for _ in 0..n {
                counts[rr.choose(&facts(&headers), &c).unwrap().index] += 1;
            }
            counts
        };
        // One ramping at 10%: it weighs a tenth of the others (0.1 / 2.1 of 3,000 is 143).
        members[2].state.health.begin_slow_start();
        let counts = picks(3_000);
        assert!((120..=170).contains(&counts[2]), "{counts:?}");
        // All ramping (say, a whole new set after a reload): they still share evenly.
        members[0].state.health.begin_slow_start();
        members[1].state.health.begin_slow_start();
        let counts = picks(3_000);
        assert!(
            counts.iter().all(|&n| (900..=1100).contains(&n)),
            "{counts:?}"
        );
    }

    #[test]
    fn large_pools_use_deadline_order_with_exact_shares() {
        let weights: Vec<u32> = (0..1000).map(|i| 1 + (i % 997) as u32).collect();
        let members = members(&weights);
        let specs: Vec<_> = members.iter().map(|m| &m.spec).collect();
        let rr = RoundRobin::new(&specs);
        let mut counts = vec![0u32; weights.len()];
        for &i in rr.cycle() {
            counts[i as usize] += 1;
        }
        assert_eq!(counts, weights);
    }
}
