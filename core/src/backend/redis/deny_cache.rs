//! The local deny cache (LOCAL_DENY_CACHE; the README's "Scale out").
//!
//! When Redis answers that a bucket holds `t` tokens, decided after this replica sent the call at
//! local time `T`, the bucket cannot hold more than `t + rate * (now - T)` later: only refill and
//! refunds add tokens. While that bound is below a request's cost, the request is denied here
//! without calling Redis. Exact in the safe direction: it never allows one too many. Refunds
//! through this replica forget the key at once; refunds through any replica are published by the
//! script (channel [`REFUNDS_CHANNEL`]) and every replica forgets the key when it hears of it, a
//! round trip later (and forgets everything when its subscription was broken, since it may have
//! missed some). Bounded: at most `MAX_ENTRIES`, and an entry whose bound has
//! reached the capacity is useless and dropped.

use std::{
    collections::{HashMap, hash_map::RandomState},
    hash::BuildHasher,
};

use parking_lot::Mutex;
use tokio::time::Instant;

use crate::{Decision, Op, Shape, capped_ms};

const SHARDS: usize = 16;
/// Where `lua/token_bucket.lua` publishes the key of every bucket a refund filled.
pub const REFUNDS_CHANNEL: &str = "sluicegate:refunds";
/// About 64 bytes an entry: 6 MB at most.
const MAX_ENTRIES: usize = 100_000;

#[derive(Clone, Copy)]
struct Entry {
    tokens: f64,
    /// When the call that observed `tokens` was sent (before Redis decided it).
    at: Instant,
    shape: Shape,
}

impl Entry {
    /// The most tokens the bucket can hold at `now`.
    fn bound(&self, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        (self.tokens + self.shape.rate() * elapsed).min(self.shape.capacity())
    }
}

type Shard = Mutex<HashMap<[u64; 2], Entry>>;

/// Buckets Redis said were short of tokens, by key.
pub struct DenyCache {
    shards: Box<[Shard]>,
    hashers: [RandomState; 2],
}

impl Default for DenyCache {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hashers: Default::default(),
        }
    }
}

impl DenyCache {
    /// Two independent keyed hashes: two keys sharing an entry would wrongly deny one of them.
    fn id(&self, key: &str) -> [u64; 2] {
        [self.hashers[0].hash_one(key), self.hashers[1].hash_one(key)]
    }

    fn shard(&self, id: [u64; 2]) -> &Shard {
        &self.shards[(id[0] as usize) % SHARDS]
    }

    /// A local denial for `op` on `key`, if what is known proves it would be denied.
    pub fn deny(&self, key: &str, shape: Shape, op: Op) -> Option<Decision> {
        let cost = match op {
            Op::Take(_) | Op::TakeUpTo(_) | Op::Check(_) => op.need() as f64,
            // A forced charge lands whatever is left; a refund always goes through.
            Op::Force(_) | Op::Refund(_) => return None,
        };
        let id = self.id(key);
        let now = Instant::now();
        let mut shard = self.shard(id).lock();
        let entry = *shard.get(&id)?;
        let bound = entry.bound(now);
        if entry.shape != shape || bound >= shape.capacity() {
            shard.remove(&id);
            return None;
        }
        if bound >= cost {
            return None;
        }
        Some(Decision {
            allowed: false,
            // At most this many: the figures err towards "retry sooner", never towards allowing.
            tokens_remaining: bound,
            retry_after_ms: capped_ms((cost - bound) / shape.rate() * 1000.0),
            reset_after_ms: capped_ms((shape.capacity() - bound) / shape.rate() * 1000.0),
            without_backend: true,
            granted: 0,
        })
    }

    /// Learns from a Redis answer to a call sent at `sent`.
    pub fn observe(&self, key: &str, shape: Shape, op: Op, sent: Instant, d: &Decision) {
        match op {
            // More tokens than before: whatever was known no longer bounds the bucket.
            Op::Refund(_) => {
                let id = self.id(key);
                self.shard(id).lock().remove(&id);
            }
            Op::Take(_) | Op::TakeUpTo(_) | Op::Check(_) | Op::Force(_) => {
                // Worth remembering only if the same request would be denied now.
                if d.tokens_remaining >= op.need().max(1) as f64 {
                    return;
                }
                let id = self.id(key);
                let mut shard = self.shard(id).lock();
                if shard.len() >= MAX_ENTRIES / SHARDS && !shard.contains_key(&id) {
                    // Full: drop the entries that no longer deny anything, else one at random.
                    let now = Instant::now();
                    shard.retain(|_, e| e.bound(now) < e.shape.capacity() * 0.5);
                    if shard.len() >= MAX_ENTRIES / SHARDS
                        && let Some(k) = shard.keys().next().copied()
                    {
                        shard.remove(&k);
                    }
                }
                shard.insert(
                    id,
                    Entry {
                        tokens: d.tokens_remaining,
                        at: sent,
                        shape,
                    },
                );
            }
        }
    }

    /// Forgets what is known of `key` (a refund through another replica filled it).
    pub fn forget(&self, key: &[u8]) {
        let Ok(key) = std::str::from_utf8(key) else {
            return;
        };
        let id = self.id(key);
        self.shard(id).lock().remove(&id);
    }

    /// Forgets everything (refunds may have been missed).
    pub fn clear(&self) {
        for shard in self.shards.iter() {
            shard.lock().clear();
        }
    }

    /// Entries held now.
    pub fn entries(&self) -> usize {
        self.shards.iter().map(|s| s.lock().len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn decision(tokens: f64) -> Decision {
        Decision {
            allowed: false,
            tokens_remaining: tokens,
            retry_after_ms: 0,
            reset_after_ms: 0,
            without_backend: false,
            granted: 0,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn denies_while_the_refill_bound_is_below_the_cost() {
        let cache = DenyCache::default();
        let shape = Shape::new(10.0, 2.0).unwrap();
        let sent = Instant::now();
        cache.observe("k", shape, Op::Take(1), sent, &decision(0.0));
        let d = cache
            .deny("k", shape, Op::Take(1))
            .expect("0 tokens: denied");
        assert!(d.without_backend && !d.allowed);
        assert_eq!(d.retry_after_ms, 500);
        // 400 ms later at most 0.8 tokens: still denied; 500 ms: the bound reaches 1.
        tokio::time::advance(Duration::from_millis(400)).await;
        assert!(cache.deny("k", shape, Op::Take(1)).is_some());
        assert!(
            cache.deny("k", shape, Op::Check(0)).is_none(),
            "0 hits: not in debt"
        );
        tokio::time::advance(Duration::from_millis(100)).await;
        assert!(cache.deny("k", shape, Op::Take(1)).is_none());
        // A larger cost is still denied.
        assert!(cache.deny("k", shape, Op::Take(2)).is_some());
        // Another shape is not this entry's business; a forced charge always goes to Redis.
        assert!(
            cache
                .deny("k", Shape::new(10.0, 3.0).unwrap(), Op::Take(2))
                .is_none()
        );
        assert!(cache.deny("other", shape, Op::Take(1)).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn refunds_forget_and_useless_entries_go() {
        let cache = DenyCache::default();
        let shape = Shape::new(10.0, 1.0).unwrap();
        cache.observe("k", shape, Op::Take(5), Instant::now(), &decision(2.0));
        assert!(cache.deny("k", shape, Op::Take(5)).is_some());
        cache.observe("k", shape, Op::Refund(3), Instant::now(), &decision(5.0));
        assert!(cache.deny("k", shape, Op::Take(5)).is_none());
        // Enough tokens for the same request: nothing learnt.
        cache.observe("j", shape, Op::Take(1), Instant::now(), &decision(4.0));
        assert_eq!(cache.entries(), 0);
        cache.observe("j", shape, Op::Take(5), Instant::now(), &decision(0.0));
        tokio::time::advance(Duration::from_secs(11)).await;
        assert!(cache.deny("j", shape, Op::Take(5)).is_none());
        assert_eq!(cache.entries(), 0, "a full bucket's entry is dropped");
    }
}
