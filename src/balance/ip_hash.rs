//! Consistent hashing of the client IP with a Maglev lookup table (Eisenbud et al., NSDI 2016),
//! weighted. Each backend's permutation comes from a seeded hash of its address, never its
//! position, so every instance and every reload builds the same table, and removing one of N
//! backends moves only about 1/N of clients.

use std::net::{IpAddr, SocketAddr};

use xxhash_rust::xxh3::xxh3_64_with_seed;

use super::{Candidates, Choice, RequestFacts, Strategy, HASH_SEED};
use crate::config::BackendSpec;

/// Table size: a prime, about 65 entries per backend at 1,000 backends (Envoy uses the same).
pub const TABLE_SIZE: usize = 65_537;

/// Maglev consistent hashing of the client IP.
#[derive(Debug)]
pub struct IpHash {
    table: Vec<u32>,
}

impl IpHash {
    /// Builds the lookup table for `backends`.
    pub fn new(backends: &[&BackendSpec]) -> Self {
        IpHash {
            table: maglev_table(backends, TABLE_SIZE),
        }
    }

    /// The member a key maps to before any availability is considered.
    pub fn lookup(&self, key: u64) -> Option<usize> {
        if self.table.is_empty() {
            return None;
        }
        Some(self.table[(key % self.table.len() as u64) as usize] as usize)
    }

    /// Walks the table from `key`'s slot to the first ready member: an unavailable backend's
    /// clients spread over the others rather than all landing on one neighbour.
    pub fn choose_key(&self, key: u64, candidates: &Candidates<'_>) -> Option<usize> {
        let len = self.table.len();
        if len == 0 {
            return None;
        }
        let start = (key % len as u64) as usize;
        let walk = |usable: &dyn Fn(usize) -> bool| {
            (0..len)
                .map(|step| self.table[(start + step) % len] as usize)
                .find(|&i| usable(i))
        };
        // Over its load bound (balance_factor), the first choice passes the client on to the next
        // backend in table order, the same one on every instance. Loads shared with other pools can
        // leave every backend over the bound; then the bound is waived.
        walk(&|i| candidates.accepts(i)).or_else(|| walk(&|i| candidates.is_ready(i)))
    }
}

/// The hash key of a client IP.
pub fn ip_key(ip: IpAddr) -> u64 {
    match ip {
        IpAddr::V4(v4) => xxh3_64_with_seed(&v4.octets(), HASH_SEED),
        // An IPv4-mapped IPv6 address is the same client as the plain IPv4 one.
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => xxh3_64_with_seed(&v4.octets(), HASH_SEED),
            None => xxh3_64_with_seed(&v6.octets(), HASH_SEED),
        },
    }
}

fn address_hash(address: SocketAddr, salt: u64) -> u64 {
    xxh3_64_with_seed(address.to_string().as_bytes(), HASH_SEED ^ salt)
}

/// Weighted Maglev population: in each round a backend places weight / max_weight entries (carrying
/// the remainder), each at the next free slot of its own permutation.
fn maglev_table(backends: &[&BackendSpec], size: usize) -> Vec<u32> {
    if backends.is_empty() {
        return Vec::new();
    }
    let m = size as u64;
    let perms: Vec<(u64, u64)> = backends
        .iter()
        .map(|b| {
            let offset = address_hash(b.address, 0x6f66_6673) % m;
            let skip = address_hash(b.address, 0x736b_6970) % (m - 1) + 1;
            (offset, skip)
        })
        .collect();
    let max_weight = backends
        .iter()
        .map(|b| u64::from(b.weight))
        .max()
        .unwrap_or(1);
    let mut next = vec![0u64; backends.len()];
    let mut credit = vec![0u64; backends.len()];
    let mut table = vec![u32::MAX; size];
    let mut filled = 0;
    'fill: loop {
        for (i, b) in backends.iter().enumerate() {
            credit[i] += u64::from(b.weight);
            while credit[i] >= max_weight {
                credit[i] -= max_weight;
                let (offset, skip) = perms[i];
                let slot = loop {
                    let slot = ((offset + next[i] * skip) % m) as usize;
                    next[i] += 1;
                    if table[slot] == u32::MAX {
                        break slot;
                    }
                };
                table[slot] = i as u32;
                filled += 1;
                if filled == size {
                    break 'fill;
                }
            }
        }
    }
    table
}

impl Strategy for IpHash {
    fn choose(&self, request: &RequestFacts<'_>, candidates: &Candidates<'_>) -> Option<Choice> {
        self.choose_key(ip_key(request.client_ip), candidates)
            .map(Choice::plain)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::testing::members;

    fn table_for(weights: &[u32]) -> (Vec<crate::balance::Member>, IpHash) {
        let members = members(weights);
        let specs: Vec<_> = members.iter().map(|m| &m.spec).collect();
        let h = IpHash::new(&specs);
        (members, h)
    }

    #[test]
    fn removing_one_of_ten_moves_about_a_tenth() {
        let members = members(&[1; 10]);
        let all: Vec<_> = members.iter().map(|m| &m.spec).collect();
        let before = IpHash::new(&all);
        // Remove the 4th backend; the rest keep their addresses but shift position.
        let rest: Vec<_> = all
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != 3)
            .map(|(_, s)| *s)
            .collect();
        let after = IpHash::new(&rest);
        let mut moved = 0;
        for k in 0..10_000u64 {
            let key = ip_key(IpAddr::from((0x0a00_0000u32 + k as u32).to_be_bytes()));
            let a = all[before.lookup(key).unwrap()].address;
            let b = rest[after.lookup(key).unwrap()].address;
            if a != b {
                moved += 1;
            }
        }
        // Ideal: 1/10 (the removed backend's clients). Issue 7's target: at most 12%.
        assert!(moved <= 1_200, "moved {moved} of 10000");
        assert!(
            moved >= 800,
            "the removed backend's clients must move: {moved}"
        );
    }

    #[test]
    fn one_hundred_thousand_clients_spread_within_five_percent_over_ten_backends() {
        let (_, h) = table_for(&[1; 10]);
        let mut counts = [0u32; 10];
        for k in 0..100_000u32 {
            let ip = IpAddr::from((0x0a00_0000 + k).to_be_bytes());
            counts[h.lookup(ip_key(ip)).unwrap()] += 1;
        }
        let max = *counts.iter().max().unwrap() as f64;
        let imbalance = max / 10_000.0;
        assert!(imbalance <= 1.05, "max/mean {imbalance:.3}: {counts:?}");
    }

    #[test]
    fn weights_are_honoured() {
        let (_, h) = table_for(&[3, 1]);
        let zeros = h.table.iter().filter(|&&i| i == 0).count() as f64;
        let share = zeros / h.table.len() as f64;
        assert!((share - 0.75).abs() < 0.01, "share {share}");
    }

    #[test]
    fn same_table_regardless_of_order() {
        let members = members(&[1, 2, 1]);
        let fwd: Vec<_> = members.iter().map(|m| &m.spec).collect();
        let rev: Vec<_> = fwd.iter().rev().copied().collect();
        let a = IpHash::new(&fwd);
        let b = IpHash::new(&rev);
        for k in 0..1000u64 {
            let key = ip_key(IpAddr::from((k as u32).to_be_bytes()));
            assert_eq!(
                fwd[a.lookup(key).unwrap()].address,
                rev[b.lookup(key).unwrap()].address
            );
        }
    }

    #[test]
    fn balance_factor_caps_each_backend_at_the_factor_times_the_average() {
        use crate::balance::load_bound;
        use std::sync::atomic::{AtomicU64, Ordering};
        use std::sync::Arc;

        let (members, h) = table_for(&[1; 10]);
        let pool = Arc::new(AtomicU64::new(0));
        // 2,000 long requests from 40 clients (offices behind NATs): plain hashing piles several
        // busy clients onto some backends.
        let place = |factor: Option<f64>| -> u64 {
            let mut held = Vec::new();
            for r in 0..2_000u32 {
                let ip = IpAddr::from([203, 0, 113, (r % 40) as u8]);
                let bound = factor.map(|f| load_bound(f, pool.load(Ordering::Relaxed), 10));
                let c = Candidates::new(&members, 10, &[]).with_bound(bound);
                let i = h.choose_key(ip_key(ip), &c).unwrap();
                let mut guard = members[i].state.start_request();
                guard.count_in(&pool);
                held.push(guard);
            }
            members.iter().map(|m| m.state.in_flight()).max().unwrap()
        };
        let plain = place(None);
        assert!(
            plain > 250,
            "plain hashing peaks at {plain}: the test needs a skew"
        );
        assert_eq!(
            pool.load(Ordering::Relaxed),
            0,
            "guards released the pool count"
        );
        let bounded = place(Some(1.25));
        assert!(
            bounded <= 250,
            "1.25 × the mean of 200 is 250, got {bounded}"
        );
        // The walk is deterministic: the same client lands on the same overflow backend.
        let c = Candidates::new(&members, 10, &[]).with_bound(Some(0));
        assert_eq!(h.choose_key(7, &c), h.choose_key(7, &c));
    }

    #[test]
    fn unavailable_backend_only_moves_its_own_clients() {
        let (members, h) = table_for(&[1; 5]);
        let all = Candidates::new(&members, 5, &[]);
        let without_2 = Candidates::new(&members, 5, &[2]);
        for k in 0..2000u64 {
            let first = h.choose_key(k * 7919, &all).unwrap();
            let second = h.choose_key(k * 7919, &without_2).unwrap();
            assert_ne!(second, 2);
            if first != 2 {
                assert_eq!(first, second);
            }
        }
    }
}
