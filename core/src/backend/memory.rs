//! Buckets in this process's memory, for a single replica or a laptop.
//!
//! Sharded maps behind short synchronous locks (never held across an `.await`). A bucket's key is
//! kept as a 128-bit keyed hash, not as text: 16 bytes whatever the key's length, and no
//! allocation per bucket. A bucket whose time-to-live has passed is absent (full), whether or not
//! the sweeper has dropped it yet. A cap on the number of buckets keeps a flood of new keys from
//! exhausting memory: when a shard is full, the bucket least worth keeping among a few sampled (as
//! Redis samples for eviction) is dropped: a full one first, then the one whose tokens come back
//! soonest for the longest it has been idle, so a flood cannot reset a bucket still being drained.
//!
//! Reservations (a Take recorded so that a Settle can give back at most what it took, once) live
//! in one map beside the buckets, bounded by the same cap, dropped when their TTL passes.
//!
//! What remains: a flood large enough to refill the whole cap with fresher drained keys between
//! two requests of a victim still evicts it; MEMORY_MAX_BUCKETS should leave room above the keys
//! in use, and `sluicegate_memory_evictions_total{bucket="partial"}` shows when it does not.

use std::{
    hash::{BuildHasher, BuildHasherDefault, Hash, Hasher},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use indexmap::IndexMap;
use parking_lot::{Mutex, MutexGuard};
use rand::Rng;

use super::{
    Backend, BackendError, BucketRequest, LeaseRequest, SettleRequest, Settled, settle_op,
};
use crate::{Ask, BucketState, Decision, InFlight, LeaseOp, Leases, apply, apply_group, ttl_ms};

/// How long a key's expired leases are kept to be counted (`lua/in_flight.lua`'s GRACE_MS).
const LEASE_GRACE_MS: f64 = 60_000.0;
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

/// A bucket's identity: two independent keyed 64-bit hashes of its key. A collision would need
/// 2^64 tries against secret keys; even then two buckets would share one, which only denies more.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct KeyId([u64; 2]);

impl Hash for KeyId {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // The first half picks the shard; the second, independent, places it in the shard's map.
        state.write_u64(self.0[1]);
    }
}

/// The map's hasher: the id is already a keyed hash, so it is used as is.
#[derive(Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only KeyId is hashed here, through write_u64; fold anything else in rather than panic.
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

struct Slot {
    state: BucketState,
    /// When it may be forgotten: its TTL (the full refill, longer in debt) has passed.
    expires_at: f64,
    /// When the bucket would be full again: dropping it would give back the tokens until then.
    /// (f32 ms: eviction ranks by it, a few ms of rounding do not matter.)
    full_at: f32,
    /// When it was last asked about, allowed or not.
    used_at: f32,
}

impl Slot {
    /// What keeping the bucket is worth: the refill it would give away if dropped, weighed by how
    /// recently it was asked about. A full one is worth nothing; of two equally drained buckets,
    /// the one idle longest goes first, so a flood of fresh keys that drain themselves cannot
    /// reset a bucket that is being drained right now.
    fn keep_score(&self, now: f64) -> f64 {
        let to_full = (f64::from(self.full_at) - now).max(0.0);
        let idle = (now - f64::from(self.used_at)).max(0.0);
        to_full / (idle + 1.0)
    }
}

type Map = IndexMap<KeyId, Slot, BuildHasherDefault<IdHasher>>;
type Shard = Mutex<Map>;

/// Counters of buckets dropped to respect MEMORY_MAX_BUCKETS, by whether they were full.
#[derive(Clone, Default)]
pub struct EvictionCounters {
    /// A full bucket was dropped: nothing lost.
    pub full: Option<metrics::Counter>,
    /// A bucket not yet full was dropped: its key starts full again next time.
    pub partial: Option<metrics::Counter>,
}

/// A Take recorded for a later Settle.
struct Reservation {
    /// The bucket it was taken from (key and shape: the key includes the shape).
    key: Box<str>,
    reserved: u64,
    expires_at: f64,
    /// The answer of its Settle, once settled: a second Settle answers the same.
    settled: Option<(f64, u64)>,
}

/// The in-memory backend.
pub struct MemoryBackend<C: Clock = MonotonicClock> {
    shards: Box<[Shard]>,
    per_shard: usize,
    /// Reservations by id; at most `max_reservations`.
    reservations: Mutex<std::collections::HashMap<Box<str>, Reservation>>,
    max_reservations: usize,
    /// In-flight leases by key; at most `max_reservations` keys (MEMORY_MAX_BUCKETS).
    leases: Mutex<std::collections::HashMap<Box<str>, Leases>>,
    hashers: [std::collections::hash_map::RandomState; 2],
    clock: C,
    partial_evictions: AtomicU64,
    counters: EvictionCounters,
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
            shards: (0..shards)
                .map(|_| Mutex::new(IndexMap::default()))
                .collect(),
            per_shard: max_buckets / shards,
            reservations: Mutex::new(std::collections::HashMap::new()),
            max_reservations: max_buckets,
            leases: Mutex::new(std::collections::HashMap::new()),
            hashers: Default::default(),
            clock,
            partial_evictions: AtomicU64::new(0),
            counters: EvictionCounters::default(),
        }
    }

    /// Counts evictions into these counters too (the server passes its Prometheus counters).
    pub fn with_eviction_counters(mut self, counters: EvictionCounters) -> Self {
        self.counters = counters;
        self
    }

    /// Buckets held now (expired ones included until swept).
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Buckets dropped before they were full, so far.
    pub fn evictions(&self) -> u64 {
        self.partial_evictions.load(Ordering::Relaxed)
    }

    fn id(&self, key: &str) -> KeyId {
        KeyId([self.hashers[0].hash_one(key), self.hashers[1].hash_one(key)])
    }

    fn shard_of(&self, id: KeyId) -> usize {
        (id.0[0] as usize) & (self.shards.len() - 1)
    }

    /// The live state of a bucket (an expired one is absent: full), marked as used now.
    fn load(
        map: &mut IndexMap<KeyId, Slot, BuildHasherDefault<IdHasher>>,
        id: KeyId,
        now: f64,
    ) -> Option<BucketState> {
        let slot = map.get_mut(&id).filter(|s| s.expires_at > now)?;
        slot.used_at = now as f32;
        Some(slot.state)
    }

    fn store(
        &self,
        map: &mut IndexMap<KeyId, Slot, BuildHasherDefault<IdHasher>>,
        id: KeyId,
        state: BucketState,
        decision: &Decision,
        req: &BucketRequest<'_>,
        now: f64,
    ) {
        let slot = Slot {
            state,
            expires_at: state.ts_ms + ttl_ms(decision, req.ask.shape) as f64,
            full_at: (state.ts_ms + decision.reset_after_ms as f64) as f32,
            used_at: now as f32,
        };
        match map.get_mut(&id) {
            Some(existing) => *existing = slot,
            None => {
                if map.len() >= self.per_shard {
                    self.evict_one(map, now);
                }
                map.insert(id, slot);
            }
        }
    }

    /// Decides synchronously; the lock is held only for the arithmetic.
    pub fn decide_now(&self, req: BucketRequest<'_>) -> Decision {
        let now = self.clock.now_ms();
        let id = self.id(req.key);
        let mut map = self.shards[self.shard_of(id)].lock();
        let (decision, write) = apply(
            Self::load(&mut map, id, now),
            now,
            req.ask.shape,
            req.ask.op,
        );
        if let Some(state) = write {
            self.store(&mut map, id, state, &decision, &req, now);
        }
        drop(map);
        self.record_reservation(&req, decision.granted, now);
        decision
    }

    /// Records the reservation of what a charged take took (`granted`: its cost, or what a
    /// take-up-to could give). The id is fresh (nobody can settle it yet), so this need not be
    /// atomic with the take. When the map is full even of live ones, the reservation is not kept:
    /// its Settle will be NOT_FOUND and the tokens stay spent (the safe side).
    fn record_reservation(&self, req: &BucketRequest<'_>, granted: u64, now: f64) {
        let Some(r) = req.reserve.filter(|_| granted > 0) else {
            return;
        };
        let mut all = self.reservations.lock();
        if all.len() >= self.max_reservations {
            all.retain(|_, r| r.expires_at > now);
            if all.len() >= self.max_reservations {
                return;
            }
        }
        all.insert(
            r.id.into(),
            Reservation {
                key: req.key.into(),
                reserved: granted,
                expires_at: now + f64::from(r.ttl_ms),
                settled: None,
            },
        );
    }

    /// Settles a reservation: atomic with marking it settled, since its entry stays locked
    /// through the bucket's arithmetic.
    pub fn settle_now(&self, req: SettleRequest<'_>) -> Settled {
        let now = self.clock.now_ms();
        let mut all = self.reservations.lock();
        let Some(r) = all
            .get_mut(req.id)
            .filter(|r| r.expires_at > now && *r.key == *req.key)
        else {
            return Settled::NotFound;
        };
        let (tokens_remaining, reset_after_ms) = match r.settled {
            Some(done) => done,
            None => {
                let op = settle_op(r.reserved, req.actual);
                let d = self.decide_now(BucketRequest::new(req.key, req.shape, op));
                r.settled = Some((d.tokens_remaining, d.reset_after_ms));
                (d.tokens_remaining, d.reset_after_ms)
            }
        };
        Settled::Done {
            tokens_remaining,
            reset_after_ms,
        }
    }

    /// Decides a group atomically: every shard it touches is locked (in shard order, so two groups
    /// cannot deadlock) for the arithmetic only.
    pub fn decide_group_now(
        &self,
        reqs: &[BucketRequest<'_>],
        all_or_nothing: bool,
    ) -> Vec<Decision> {
        let now = self.clock.now_ms();
        let ids: Vec<KeyId> = reqs.iter().map(|r| self.id(r.key)).collect();
        // One state slot per distinct bucket.
        let mut buckets: Vec<KeyId> = Vec::with_capacity(ids.len());
        let slots: Vec<usize> = ids
            .iter()
            .map(|id| match buckets.iter().position(|b| b == id) {
                Some(i) => i,
                None => {
                    buckets.push(*id);
                    buckets.len() - 1
                }
            })
            .collect();
        let (mut guards, guard_of) = self.lock_shards(&buckets);

        let mut states: Vec<Option<BucketState>> = buckets
            .iter()
            .zip(&guard_of)
            .map(|(&id, &g)| Self::load(&mut guards[g], id, now))
            .collect();
        let mut dirty = vec![false; buckets.len()];
        let group: Vec<Ask> = reqs.iter().map(|r| r.ask).collect();
        let decisions = apply_group(&mut states, &mut dirty, &slots, &group, now, all_or_nothing);
        for (b, &id) in buckets.iter().enumerate() {
            if let (true, Some(state)) = (dirty[b], states[b]) {
                // The figures of the last request on this bucket describe its stored state.
                let last = slots.iter().rposition(|&s| s == b).unwrap_or(0);
                let map = &mut guards[guard_of[b]];
                self.store(map, id, state, &decisions[last], &reqs[last], now);
            }
        }
        drop(guards);
        // A take its all-or-nothing group vetoed took nothing (granted 0): no reservation either.
        for (r, d) in reqs.iter().zip(&decisions) {
            self.record_reservation(r, d.granted, now);
        }
        decisions
    }

    /// Locks the shards holding `buckets`, in shard order (so two groups never deadlock), and
    /// says which guard holds each bucket.
    fn lock_shards(&self, buckets: &[KeyId]) -> (Vec<MutexGuard<'_, Map>>, Vec<usize>) {
        let mut shard_ids: Vec<usize> = buckets.iter().map(|id| self.shard_of(*id)).collect();
        shard_ids.sort_unstable();
        shard_ids.dedup();
        let guards = shard_ids.iter().map(|&s| self.shards[s].lock()).collect();
        let guard_of = buckets
            .iter()
            .map(|&id| {
                let s = self.shard_of(id);
                shard_ids.iter().position(|&g| g == s).unwrap_or(0)
            })
            .collect();
        (guards, guard_of)
    }

    /// Drops, among a few sampled buckets, the one least worth keeping (see [`Slot::keep_score`]).
    fn evict_one(&self, map: &mut IndexMap<KeyId, Slot, BuildHasherDefault<IdHasher>>, now: f64) {
        let mut rng = rand::rng();
        let mut best: Option<(usize, f64)> = None;
        for _ in 0..EVICTION_SAMPLES.min(map.len()) {
            let i = rng.random_range(0..map.len());
            let score = map[i].keep_score(now);
            if best.is_none_or(|(_, b)| score < b) {
                best = Some((i, score));
            }
        }
        if let Some((i, _)) = best {
            let full = f64::from(map[i].full_at) <= now;
            map.swap_remove_index(i);
            if !full {
                self.partial_evictions.fetch_add(1, Ordering::Relaxed);
                if let Some(c) = &self.counters.partial {
                    c.increment(1);
                }
            } else if let Some(c) = &self.counters.full {
                c.increment(1);
            }
        }
    }

    /// Drops every bucket whose TTL has passed (it would be full: nothing is lost).
    pub fn sweep(&self) -> usize {
        let now = self.clock.now_ms();
        let mut dropped = 0;
        for shard in self.shards.iter() {
            let mut map = shard.lock();
            let before = map.len();
            map.retain(|_, slot| slot.expires_at > now);
            dropped += before - map.len();
        }
        self.reservations.lock().retain(|_, r| r.expires_at > now);
        // As in Redis, a key's leases are kept a minute past their expiry, so that a later call
        // counts the ones that expired without a release.
        self.leases
            .lock()
            .retain(|_, l| l.expires_at() + LEASE_GRACE_MS > now);
        dropped
    }

    /// One lease operation, under the lease map's lock (held for the arithmetic only). A new key
    /// when MEMORY_MAX_BUCKETS keys hold live leases is refused: a flood of keys cannot grow
    /// memory, and refusing a slot is the safe side of an in-flight limit.
    pub fn lease_now(&self, req: LeaseRequest<'_>) -> InFlight {
        let now = self.clock.now_ms();
        let mut all = self.leases.lock();
        if let Some(leases) = all.get_mut(req.key) {
            let answer = leases.apply(now, req.id, req.op);
            if leases.is_empty() {
                all.remove(req.key);
            }
            return answer;
        }
        let nothing = InFlight {
            done: false,
            in_flight: 0,
            retry_after_ms: 0,
            expired: 0,
        };
        if !matches!(req.op, LeaseOp::Acquire { .. }) {
            return nothing;
        }
        if all.len() >= self.max_reservations {
            all.retain(|_, l| l.expires_at() > now);
            if all.len() >= self.max_reservations {
                return InFlight {
                    retry_after_ms: 1000,
                    ..nothing
                };
            }
        }
        let mut leases = Leases::default();
        let answer = leases.apply(now, req.id, req.op);
        all.insert(req.key.into(), leases);
        answer
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

    async fn decide_group(
        &self,
        reqs: &[BucketRequest<'_>],
        all_or_nothing: bool,
    ) -> Vec<Result<Decision, BackendError>> {
        self.decide_group_now(reqs, all_or_nothing)
            .into_iter()
            .map(Ok)
            .collect()
    }

    async fn settle(&self, req: SettleRequest<'_>) -> Result<Settled, BackendError> {
        Ok(self.settle_now(req))
    }

    async fn lease(&self, req: LeaseRequest<'_>) -> Result<InFlight, BackendError> {
        Ok(self.lease_now(req))
    }

    async fn ping(&self) -> Result<(), BackendError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Op, Shape};

    fn req(key: &str, op: Op) -> BucketRequest<'_> {
        BucketRequest::new(key, Shape::new(10.0, 1.0).unwrap(), op)
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
    fn a_flood_of_self_draining_keys_spares_a_bucket_drained_again_and_again() {
        // The attacker's keys drain themselves fully, like the victim's: all equally empty. The
        // victim's bucket, drained again every step, is always the one furthest from full.
        let clock = ManualClock::default();
        let backend = MemoryBackend::with_clock(64, clock.clone());
        let mut victim_allowed = 0;
        for i in 0..5_000u32 {
            clock.set_ms(f64::from(i) * 10.0);
            backend.decide_now(req(&format!("flood{i}"), Op::Take(10)));
            // The victim asks every 10 ms; its 10 tokens at 1/s give it one every second.
            if backend.decide_now(req("victim", Op::Take(1))).allowed {
                victim_allowed += 1;
            }
        }
        // 50 s: 10 at first, then one per second. A reset by the flood would give far more.
        assert!(victim_allowed <= 10 + 50 + 1, "{victim_allowed}");
    }

    #[test]
    fn an_expired_slot_is_absent_before_any_sweep() {
        let clock = ManualClock::default();
        let backend = MemoryBackend::with_clock(100, clock.clone());
        let small = Shape::new(2.0, 1.0).unwrap(); // TTL 2 s
        backend.decide_now(BucketRequest::new("k", small, Op::Take(2)));
        // 2.5 s later under a larger shape: the old state is gone (as in Redis), so the bucket is
        // full at the new capacity, not 2.5 tokens of it.
        clock.set_ms(2_500.0);
        let big = Shape::new(100.0, 1.0).unwrap();
        let d = backend.decide_now(BucketRequest::new("k", big, Op::Check(1)));
        assert_eq!(d.tokens_remaining, 100.0);
    }

    #[test]
    fn idle_buckets_are_swept_after_their_ttl() {
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
    fn check_and_denial_write_nothing() {
        let backend = MemoryBackend::new(10);
        backend.decide_now(req("k", Op::Check(3)));
        backend.decide_now(req("k", Op::Take(11)));
        assert!(backend.is_empty());
    }

    #[test]
    fn group_over_several_shards_is_all_or_nothing() {
        let backend = MemoryBackend::new(100_000);
        let keys: Vec<String> = (0..20).map(|i| format!("g{i}")).collect();
        backend.decide_now(req("g7", Op::Take(10)));
        let reqs: Vec<_> = keys.iter().map(|k| req(k, Op::Take(1))).collect();
        let d = backend.decide_group_now(&reqs, true);
        assert!(!d[7].allowed);
        assert!(d[0].allowed);
        assert_eq!(d[0].tokens_remaining, 10.0, "not charged");
        let d = backend.decide_now(req("g0", Op::Check(10)));
        assert!(d.allowed);
    }

    #[test]
    fn lease_keys_are_capped_and_expired_ones_make_room() {
        let clock = ManualClock::default();
        let backend = MemoryBackend::with_clock(4, clock.clone());
        let acquire = LeaseOp::Acquire {
            max: 1,
            ttl_ms: 100,
            paired: false,
        };
        let lease = |key: &'static str| LeaseRequest {
            key,
            id: "id",
            op: acquire,
        };
        for key in ["a", "b", "c", "d"] {
            assert!(backend.lease_now(lease(key)).done);
        }
        assert!(
            !backend.lease_now(lease("e")).done,
            "a fifth key is refused"
        );
        clock.set_ms(100.0);
        assert!(backend.lease_now(lease("e")).done, "expired keys make room");
        // A released key is forgotten at once.
        let release = LeaseRequest {
            op: LeaseOp::Release,
            ..lease("e")
        };
        assert!(backend.lease_now(release).done);
        assert!(!backend.leases.lock().contains_key("e"));
    }
}
