//! The last few minutes, second by second, for the status page: decisions allowed, denied and
//! failed per API, near-limit decisions, and a latency histogram per second (for its p99).
//!
//! A ring of one slot per second, written with relaxed atomics: the hot path takes no lock. A slot
//! is claimed for a new second by a compare-and-swap on its tag and then zeroed, so a count that
//! lands in the few nanoseconds between the two can be lost: figures for a page, not for billing
//! (Prometheus has the exact counters).

use std::{
    sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed},
    time::{Duration, Instant},
};

/// Seconds kept.
pub const WINDOW: usize = 300;
/// Latency buckets: four per power of two of microseconds, from 1 us to about 70 s.
const BUCKETS: usize = 104;

/// Which API a decision came through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Api {
    ShouldAllow = 0,
    Envoy = 1,
    /// Acquire (in-flight limits).
    Concurrency = 2,
    /// Envoy's quota protocol: the requests Envoys reported deciding from their assignments.
    Rlqs = 3,
}

#[derive(Default)]
struct Counts {
    allowed: AtomicU64,
    denied: AtomicU64,
    errors: AtomicU64,
}

impl Counts {
    fn add(&self, outcome: Option<bool>, n: u64) {
        match outcome {
            Some(true) => &self.allowed,
            Some(false) => &self.denied,
            None => &self.errors,
        }
        .fetch_add(n, Relaxed);
    }

    fn clear(&self) {
        self.allowed.store(0, Relaxed);
        self.denied.store(0, Relaxed);
        self.errors.store(0, Relaxed);
    }

    fn read(&self) -> (u64, u64, u64) {
        (
            self.allowed.load(Relaxed),
            self.denied.load(Relaxed),
            self.errors.load(Relaxed),
        )
    }
}

struct Slot {
    /// The second (since start) this slot holds, plus one; 0: never used.
    tag: AtomicU64,
    apis: [Counts; 4],
    near_limit: AtomicU64,
    latency: [AtomicU32; BUCKETS],
}

impl Slot {
    fn new() -> Self {
        Self {
            tag: AtomicU64::new(0),
            apis: Default::default(),
            near_limit: AtomicU64::new(0),
            latency: std::array::from_fn(|_| AtomicU32::new(0)),
        }
    }
}

/// One completed second.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct Second {
    /// Seconds since the Unix epoch.
    pub t: u64,
    pub allowed: u64,
    pub denied: u64,
    pub errors: u64,
    pub near_limit: u64,
    /// The 99th percentile of call latency in that second (the upper edge of its bucket), or
    /// null without calls.
    pub p99_ms: Option<f64>,
}

/// Decisions since start, per API.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct Totals {
    pub allowed: u64,
    pub denied: u64,
    pub errors: u64,
}

/// Per-second activity over the last [`WINDOW`] seconds, and totals since start.
pub struct LiveStats {
    started: Instant,
    /// The Unix time of `started`, to label seconds.
    started_unix: u64,
    slots: Box<[Slot]>,
    totals: [Counts; 4],
}

impl Default for LiveStats {
    fn default() -> Self {
        Self::new()
    }
}

impl LiveStats {
    pub fn new() -> Self {
        Self {
            started: Instant::now(),
            started_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            slots: (0..WINDOW).map(|_| Slot::new()).collect(),
            totals: Default::default(),
        }
    }

    /// The slot of the current second, claimed and zeroed if it held an older one.
    fn slot(&self, now: Instant) -> &Slot {
        let second = now.saturating_duration_since(self.started).as_secs();
        let slot = &self.slots[(second % WINDOW as u64) as usize];
        let tag = slot.tag.load(Relaxed);
        if tag < second + 1
            && slot
                .tag
                .compare_exchange(tag, second + 1, Relaxed, Relaxed)
                .is_ok()
        {
            slot.apis.iter().for_each(Counts::clear);
            slot.near_limit.store(0, Relaxed);
            slot.latency.iter().for_each(|b| b.store(0, Relaxed));
        }
        slot
    }

    /// Counts `n` decisions of one outcome (None: the backend failed).
    pub fn count(&self, api: Api, outcome: Option<bool>, n: u64) {
        self.slot(Instant::now()).apis[api as usize].add(outcome, n);
        self.totals[api as usize].add(outcome, n);
    }

    /// Counts a decision that left the bucket near its limit.
    pub fn near_limit(&self) {
        self.slot(Instant::now()).near_limit.fetch_add(1, Relaxed);
    }

    /// Records how long one call took.
    pub fn latency(&self, took: Duration) {
        self.slot(Instant::now()).latency[bucket(took)].fetch_add(1, Relaxed);
    }

    /// The last `n` completed seconds (oldest first); seconds without activity are zeros.
    pub fn seconds(&self, n: usize) -> Vec<Second> {
        self.seconds_at(n, Instant::now())
    }

    pub(crate) fn seconds_at(&self, n: usize, now: Instant) -> Vec<Second> {
        let current = now.saturating_duration_since(self.started).as_secs();
        let n = n.min(WINDOW - 1) as u64;
        (current.saturating_sub(n)..current)
            .map(|second| {
                let slot = &self.slots[(second % WINDOW as u64) as usize];
                let mut out = Second {
                    t: self.started_unix + second,
                    ..Default::default()
                };
                if slot.tag.load(Relaxed) != second + 1 {
                    return out;
                }
                for c in &slot.apis {
                    let (a, d, e) = c.read();
                    out.allowed += a;
                    out.denied += d;
                    out.errors += e;
                }
                out.near_limit = slot.near_limit.load(Relaxed);
                out.p99_ms = p99_ms(&slot.latency);
                out
            })
            .collect()
    }

    pub fn totals(&self, api: Api) -> Totals {
        let (allowed, denied, errors) = self.totals[api as usize].read();
        Totals {
            allowed,
            denied,
            errors,
        }
    }

    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }
}

/// Four buckets per doubling: bucket i holds latencies up to 2^((i + 1) / 4) microseconds.
fn bucket(took: Duration) -> usize {
    let us = took.as_micros().max(1) as f64;
    ((us.log2() * 4.0) as usize).min(BUCKETS - 1)
}

fn upper_edge_ms(bucket: usize) -> f64 {
    2f64.powf((bucket + 1) as f64 / 4.0) / 1000.0
}

fn p99_ms(latency: &[AtomicU32; BUCKETS]) -> Option<f64> {
    let counts: Vec<u64> = latency.iter().map(|b| u64::from(b.load(Relaxed))).collect();
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return None;
    }
    // The smallest bucket with at least 99% of the calls at or below it.
    let rank = (total * 99).div_ceil(100);
    let mut seen = 0;
    for (i, c) in counts.iter().enumerate() {
        seen += c;
        if seen >= rank {
            return Some((upper_edge_ms(i) * 1000.0).round() / 1000.0);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_land_in_their_second_and_old_seconds_are_zeroed() {
        let live = LiveStats::new();
        let t0 = live.started;
        // Second 0: 3 allowed, 1 denied; second 2: 5 errors.
        for _ in 0..3 {
            live.slot(t0).apis[0].add(Some(true), 1);
        }
        live.slot(t0).apis[1].add(Some(false), 1);
        let t2 = t0 + Duration::from_millis(2_500);
        live.slot(t2).apis[0].add(None, 5);
        let s = live.seconds_at(3, t0 + Duration::from_millis(3_100));
        assert_eq!(s.len(), 3);
        assert_eq!((s[0].allowed, s[0].denied, s[0].errors), (3, 1, 0));
        assert_eq!((s[1].allowed, s[1].denied, s[1].errors), (0, 0, 0));
        assert_eq!(s[2].errors, 5);
        assert_eq!(s[1].t, s[0].t + 1);
        // A full window later the slot of second 0 is reused: the old counts are gone.
        let later = t0 + Duration::from_secs(WINDOW as u64);
        live.slot(later).apis[0].add(Some(true), 1);
        let s = live.seconds_at(1, later + Duration::from_secs(1));
        assert_eq!((s[0].allowed, s[0].denied), (1, 0));
    }

    #[test]
    fn p99_is_the_bucket_edge_above_99_percent() {
        let live = LiveStats::new();
        let t0 = live.started;
        let slot = live.slot(t0);
        for _ in 0..990 {
            slot.latency[bucket(Duration::from_micros(100))].fetch_add(1, Relaxed);
        }
        for _ in 0..10 {
            slot.latency[bucket(Duration::from_millis(20))].fetch_add(1, Relaxed);
        }
        let s = live.seconds_at(1, t0 + Duration::from_secs(1));
        let p99 = s[0].p99_ms.unwrap();
        // 100 us sits in a bucket whose upper edge is under 0.12 ms.
        assert!((0.1..0.12).contains(&p99), "{p99}");
        for _ in 0..20 {
            slot.latency[bucket(Duration::from_millis(20))].fetch_add(1, Relaxed);
        }
        let p99 = live.seconds_at(1, t0 + Duration::from_secs(1))[0]
            .p99_ms
            .unwrap();
        assert!((20.0..24.0).contains(&p99), "{p99}");
    }

    #[test]
    fn buckets_cover_microseconds_to_minutes() {
        assert_eq!(bucket(Duration::ZERO), 0);
        assert!(upper_edge_ms(bucket(Duration::from_secs(60))) >= 60_000.0);
        assert_eq!(bucket(Duration::from_secs(3600)), BUCKETS - 1);
    }
}
