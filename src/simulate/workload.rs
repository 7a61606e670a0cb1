//! The synthetic workload: clients with distinct IPs arriving over the run, each with one session
//! of requests. Everything is drawn from the seed, and each client's request and service times
//! from its own generator, so every strategy sees exactly the same requests at the same times.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use serde::Serialize;

/// Clients arrive during this share of the run.
const ARRIVAL_SHARE: f64 = 0.75;
/// A session of the mean length lasts this share of the run.
const SESSION_SHARE: f64 = 0.125;
/// Pareto shape of session lengths: finite mean, infinite variance; a few clients make dozens
/// of times the mean number of requests.
const PARETO_ALPHA: f64 = 1.5;
/// Mean (heavy-tailed: exponential) or fixed (uniform) service time of a request.
const SERVICE_US: f64 = 50_000.0;

/// How session lengths and service times are drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Shape {
    /// Session lengths from a Pareto distribution (α = 1.5): many short sessions, a few very long
    /// and busy ones, like WebSocket users. Arrivals and request times at random, exponential
    /// service times (mean 50 ms).
    HeavyTailed,
    /// Every session the same length, arrivals and requests evenly spaced, every request 50 ms:
    /// what is left is the strategy's own spread.
    Uniform,
}

impl Shape {
    /// The name used in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Shape::HeavyTailed => "heavy-tailed",
            Shape::Uniform => "uniform",
        }
    }
}

/// One client: where it comes from, and its session.
#[derive(Debug, Clone)]
pub struct Client {
    /// Distinct per client: 10.0.0.0 plus its index.
    pub ip: IpAddr,
    /// Virtual time of its first request, in microseconds.
    pub arrival_us: u64,
    /// Requests in its session.
    pub requests: u32,
    /// Length of the window its requests fall in, in microseconds.
    pub window_us: u64,
}

/// Every client of a run, and how their requests are timed.
#[derive(Debug, Clone)]
pub struct Workload {
    /// The clients, by index.
    pub clients: Vec<Client>,
    /// Shape of the draws.
    pub shape: Shape,
    /// Seed of the per-client generators.
    pub seed: u64,
    /// Virtual length of the run, in microseconds.
    pub duration_us: u64,
}

impl Workload {
    /// Draws `clients` sessions sharing exactly `requests` requests (at least one each; the
    /// caller checks `requests >= clients`), inside a run of `duration`.
    pub fn generate(
        shape: Shape,
        clients: u32,
        requests: u64,
        duration: Duration,
        seed: u64,
    ) -> Self {
        let duration_us = duration.as_micros().max(1) as u64;
        let n = clients as usize;
        let mut rng = fastrand::Rng::with_seed(seed);
        let weights: Vec<f64> = match shape {
            // Pareto by inversion; only the proportions matter, the scale is set below.
            Shape::HeavyTailed => (0..n)
                .map(|_| (1.0 - rng.f64()).powf(-1.0 / PARETO_ALPHA))
                .collect(),
            Shape::Uniform => vec![1.0; n],
        };
        let lengths = split(requests, &weights);
        let mean = requests as f64 / n.max(1) as f64;
        let arrivals_us = ARRIVAL_SHARE * duration_us as f64;
        let clients = lengths
            .into_iter()
            .enumerate()
            .map(|(i, length)| {
                let arrival = match shape {
                    Shape::HeavyTailed => rng.f64() * arrivals_us,
                    Shape::Uniform => i as f64 * arrivals_us / n as f64,
                };
                let left = duration_us as f64 - arrival;
                // A session of the mean length lasts SESSION_SHARE of the run; a longer one is
                // longer in proportion, but squeezed (its client made busier) to end by the end.
                let window = (SESSION_SHARE * duration_us as f64 * length as f64 / mean).min(left);
                Client {
                    ip: IpAddr::V4(Ipv4Addr::from(0x0a00_0000u32.wrapping_add(i as u32))),
                    arrival_us: arrival as u64,
                    requests: length,
                    window_us: window as u64,
                }
            })
            .collect();
        Workload {
            clients,
            shape,
            seed,
            duration_us,
        }
    }

    /// Requests over all sessions.
    pub fn requests(&self) -> u64 {
        self.clients.iter().map(|c| u64::from(c.requests)).sum()
    }

    /// The generator of client `index`'s request and service times.
    pub fn timer(&self, index: usize) -> SessionTimer {
        let client = &self.clients[index];
        SessionTimer {
            rng: fastrand::Rng::with_seed(
                self.seed ^ (index as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15),
            ),
            shape: self.shape,
            start_us: client.arrival_us,
            window_us: client.window_us,
            total: client.requests,
            sent: 0,
            position: 0.0,
        }
    }
}

/// Splits `total` into one share per weight, in proportion, at least 1 each, summing exactly to
/// `total` (largest remainders get the units left over).
fn split(total: u64, weights: &[f64]) -> Vec<u32> {
    let n = weights.len() as u64;
    let spare = total.saturating_sub(n) as f64;
    let sum: f64 = weights.iter().sum();
    let exact: Vec<f64> = weights.iter().map(|w| spare * w / sum).collect();
    let mut lengths: Vec<u64> = exact.iter().map(|x| 1 + x.floor() as u64).collect();
    let mut left = total.saturating_sub(lengths.iter().sum());
    let mut order: Vec<usize> = (0..weights.len()).collect();
    order.sort_by(|&a, &b| {
        let (fa, fb) = (exact[a].fract(), exact[b].fract());
        fb.total_cmp(&fa).then(a.cmp(&b))
    });
    for &i in order.iter().cycle() {
        if left == 0 {
            break;
        }
        lengths[i] += 1;
        left -= 1;
    }
    lengths
        .into_iter()
        .map(|l| u32::try_from(l).unwrap_or(u32::MAX))
        .collect()
}

/// One client's request times (in order) and service times.
#[derive(Debug, Clone)]
pub struct SessionTimer {
    rng: fastrand::Rng,
    shape: Shape,
    start_us: u64,
    window_us: u64,
    total: u32,
    sent: u32,
    /// Where in the window the last request fell, from 0 to 1.
    position: f64,
}

impl SessionTimer {
    /// The time of the next request, or `None` when the session is over.
    pub fn next_request(&mut self) -> Option<u64> {
        if self.sent == self.total {
            return None;
        }
        let at = match self.shape {
            Shape::Uniform => self.window_us * u64::from(self.sent) / u64::from(self.total),
            // The next of `remaining` sorted uniform points after `position`: its distance is
            // the minimum of `remaining` uniforms over what is left (so no list is kept).
            Shape::HeavyTailed => {
                let remaining = f64::from(self.total - self.sent);
                self.position +=
                    (1.0 - self.position) * (1.0 - (1.0 - self.rng.f64()).powf(1.0 / remaining));
                (self.position * self.window_us as f64) as u64
            }
        };
        self.sent += 1;
        Some(self.start_us + at)
    }

    /// Whether the request just returned by [`SessionTimer::next_request`] was the last.
    pub fn is_over(&self) -> bool {
        self.sent == self.total
    }

    /// How long a request holds its backend, in microseconds.
    pub fn service_us(&mut self) -> u64 {
        let us = match self.shape {
            Shape::Uniform => SERVICE_US,
            Shape::HeavyTailed => -(1.0 - self.rng.f64()).ln() * SERVICE_US,
        };
        (us as u64).max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_share_exactly_the_requests_and_stay_inside_the_run() {
        let w = Workload::generate(
            Shape::HeavyTailed,
            1_000,
            50_000,
            Duration::from_secs(60),
            7,
        );
        assert_eq!(w.requests(), 50_000);
        let longest = w.clients.iter().map(|c| c.requests).max().unwrap();
        assert!(longest > 500, "no heavy tail: longest session {longest}");
        assert!(w.clients.iter().all(|c| c.requests >= 1));
        for (i, c) in w.clients.iter().enumerate() {
            let mut timer = w.timer(i);
            let mut last = 0;
            while let Some(t) = timer.next_request() {
                assert!(t >= last && t <= w.duration_us, "{t} after {last}");
                last = t;
            }
            assert!(c.arrival_us + c.window_us <= w.duration_us);
        }
    }

    #[test]
    fn uniform_sessions_are_alike() {
        let w = Workload::generate(Shape::Uniform, 100, 1_000, Duration::from_secs(10), 1);
        assert!(w.clients.iter().all(|c| c.requests == 10));
        let mut timer = w.timer(3);
        assert_eq!(timer.service_us(), 50_000);
        let times: Vec<u64> = std::iter::from_fn(|| timer.next_request()).collect();
        assert_eq!(times.len(), 10);
        let step = times[1] - times[0];
        assert!(times.windows(2).all(|p| p[1] - p[0] == step), "{times:?}");
    }
}
