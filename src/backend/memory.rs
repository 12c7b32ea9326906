//! Buckets in this process's memory, for a single replica or a laptop.
//!
//! Sharded maps behind short synchronous locks (never held across an `.await`). Idle buckets are
//! swept once they would be full anyway; a cap on the number of buckets keeps a flood of new keys
//! from exhausting memory, and when the cap is hit the bucket nearest to full (among a few sampled,
//! as Redis samples for eviction) is dropped, so the flood cannot reset a drained bucket.

use std::{
    hash::BuildHasher,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use indexmap::IndexMap;
use parking_lot::Mutex;
use rand::Rng;

use super::{Backend, BackendError, BucketRequest};
use crate::core::{BucketState, Decision, Shape, apply};

/// The counter of buckets dropped to respect MEMORY_MAX_BUCKETS.
pub const EVICTIONS_METRIC: &str = "tollgate_memory_evictions_total";

/// How many buckets to look at when one must be dropped.
const EVICTION_SAMPLES: usize = 5;
const MAX_SHARDS: usize = 64;
const MIN_PER_SHARD: usize = 64;

/// A source of milliseconds that never runs backwards on its own; tests can step it by hand.
pub trait Clock: Send + Sync + 'static {
    fn now_ms(&self) -> f64;
}

/// The process's monotonic clock (tokio's, so `tokio::time::pause` drives it in tests).
#[derive(Debug)]
pub struct MonotonicClock {
    origin: tokio::time::Instant,
}

impl Default for MonotonicClock {
    fn default() -> Self {
        Self {
            origin: tokio::time::Instant::now(),
        }
    }
}

impl Clock for MonotonicClock {
    fn now_ms(&self) -> f64 {
        self.origin.elapsed().as_secs_f64() * 1000.0
    }
}

/// A clock set by hand: for tests of clock edge cases, including one that steps back.
#[derive(Debug, Default, Clone)]
pub struct ManualClock(Arc<AtomicU64>);

impl ManualClock {
    pub fn set_ms(&self, ms: f64) {
        self.0.store(ms.to_bits(), Ordering::Relaxed);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> f64 {
        f64::from_bits(self.0.load(Ordering::Relaxed))
    }
}

struct Slot {
    state: BucketState,
    shape: Shape,
}

impl Slot {
    fn expires_at(&self) -> f64 {
        self.state.ts_ms + self.shape.full_refill_ms() as f64
    }

    /// How full the bucket is now, 0..=1: the cost of dropping it is `1 - fullness`.
    fn fullness(&self, now_ms: f64) -> f64 {
        let elapsed = (now_ms - self.state.ts_ms).max(0.0);
        let tokens = self.state.tokens + self.shape.rate() * elapsed / 1000.0;
        (tokens / self.shape.capacity()).min(1.0)
    }
}

type Shard = Mutex<IndexMap<Box<str>, Slot>>;

/// The in-memory backend.
pub struct MemoryBackend<C: Clock = MonotonicClock> {
    shards: Box<[Shard]>,
    per_shard: usize,
    hasher: std::collections::hash_map::RandomState,
    clock: C,
    evictions: AtomicU64,
}

impl MemoryBackend<MonotonicClock> {
    /// A backend holding at most `max_buckets` buckets (at least 1).
    pub fn new(max_buckets: usize) -> Self {
        Self::with_clock(max_buckets, MonotonicClock::default())
    }
}

impl<C: Clock> MemoryBackend<C> {
    pub fn with_clock(max_buckets: usize, clock: C) -> Self {
        let max_buckets = max_buckets.max(1);
        // A power of two, so that per-shard caps add up to at most the cap, and few enough that each
        // shard holds a good number of buckets to choose an eviction from.
        let wanted = (max_buckets / MIN_PER_SHARD).clamp(1, MAX_SHARDS);
        let shards = 1 << wanted.ilog2();
        Self {
            shards: (0..shards).map(|_| Mutex::new(IndexMap::new())).collect(),
            per_shard: max_buckets / shards,
            hasher: Default::default(),
            clock,
            evictions: AtomicU64::new(0),
        }
    }

    /// Buckets held now.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Buckets dropped so far to respect the cap.
    pub fn evictions(&self) -> u64 {
        self.evictions.load(Ordering::Relaxed)
    }

    fn shard(&self, key: &str) -> &Shard {
        let h = self.hasher.hash_one(key) as usize;
        &self.shards[h & (self.shards.len() - 1)]
    }

    /// Decides synchronously; the lock is held only for the arithmetic.
    pub fn decide_now(&self, req: BucketRequest<'_>) -> Decision {
        let now = self.clock.now_ms();
        let mut map = self.shard(req.key).lock();
        let state = map.get(req.key).map(|s| s.state);
        let (decision, write) = apply(state, now, req.shape, req.op);
        if let Some(state) = write {
            let slot = Slot {
                state,
                shape: req.shape,
            };
            match map.get_mut(req.key) {
                Some(existing) => *existing = slot,
                None => {
                    if map.len() >= self.per_shard {
                        self.evict_one(&mut map, now);
                    }
                    map.insert(req.key.into(), slot);
                }
            }
        }
        decision
    }

    /// Drops the fullest of a few sampled buckets (a full one loses nothing).
    fn evict_one(&self, map: &mut IndexMap<Box<str>, Slot>, now: f64) {
        let mut rng = rand::rng();
        let mut best: Option<(usize, f64)> = None;
        for _ in 0..EVICTION_SAMPLES.min(map.len()) {
            let i = rng.random_range(0..map.len());
            let f = map[i].fullness(now);
            if best.is_none_or(|(_, bf)| f > bf) {
                best = Some((i, f));
            }
        }
        if let Some((i, fullness)) = best {
            map.swap_remove_index(i);
            if fullness < 1.0 {
                // Only a bucket that was not full loses something; those are the ones worth counting.
                self.evictions.fetch_add(1, Ordering::Relaxed);
                metrics::counter!(EVICTIONS_METRIC).increment(1);
            }
        }
    }

    /// Drops every bucket idle for its full-refill time (it would be full: nothing is lost).
    pub fn sweep(&self) -> usize {
        let now = self.clock.now_ms();
        let mut dropped = 0;
        for shard in self.shards.iter() {
            let mut map = shard.lock();
            let before = map.len();
            map.retain(|_, slot| slot.expires_at() > now);
            dropped += before - map.len();
        }
        dropped
    }
}

impl<C: Clock> MemoryBackend<C> {
    /// Sweeps idle buckets every `every` until `stop` fires.
    pub fn spawn_sweeper(
        self: &Arc<Self>,
        every: Duration,
        stop: tokio_util::sync::CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let backend = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let Some(backend) = backend.upgrade() else {
                    return;
                };
                backend.sweep();
            }
        })
    }
}

impl<C: Clock> Backend for MemoryBackend<C> {
    fn name(&self) -> &'static str {
        "memory"
    }

    async fn decide(&self, req: BucketRequest<'_>) -> Result<Decision, BackendError> {
        Ok(self.decide_now(req))
    }

    async fn ping(&self) -> Result<(), BackendError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::Op;

    fn req(key: &str, op: Op) -> BucketRequest<'_> {
        BucketRequest {
            key,
            shape: Shape::new(10.0, 1.0).unwrap(),
            op,
        }
    }

    #[test]
    fn cap_holds_and_drained_buckets_survive_a_flood() {
        let clock = ManualClock::default();
        let backend = MemoryBackend::with_clock(64, clock.clone());
        // Drain one bucket, then flood with new keys that each take one token (9 of 10 left: nearer
        // full than the drained bucket, so they are the ones to drop).
        assert!(backend.decide_now(req("drained", Op::Take(10))).allowed);
        for i in 0..10_000 {
            backend.decide_now(req(&format!("flood{i}"), Op::Take(1)));
            assert!(backend.len() <= 64);
        }
        let d = backend.decide_now(req("drained", Op::Check(1)));
        assert!(!d.allowed, "the drained bucket was reset by the flood");
        assert!(backend.evictions() > 0);
    }

    #[test]
    fn idle_buckets_are_swept_after_full_refill() {
        let clock = ManualClock::default();
        let backend = MemoryBackend::with_clock(100, clock.clone());
        backend.decide_now(req("a", Op::Take(5))); // full refill of 10 @ 1/s: 10 s
        clock.set_ms(9_999.0);
        assert_eq!(backend.sweep(), 0);
        clock.set_ms(10_000.0);
        assert_eq!(backend.sweep(), 1);
        assert!(backend.is_empty());
    }

    #[test]
    fn check_writes_nothing() {
        let backend = MemoryBackend::new(10);
        backend.decide_now(req("k", Op::Check(3)));
        assert!(backend.is_empty());
    }
}
