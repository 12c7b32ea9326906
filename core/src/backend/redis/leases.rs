//! This replica's leases of Redis buckets (QUOTA_LEASES; the README's "Leased quota").
//!
//! A key this replica decides often gets a lease: the script call of an allowed take also takes a
//! slice of the bucket for this replica (`lua/token_bucket.lua`, mode 11), sized from the key's
//! recent rate here times LEASE_MS and at most LEASE_MAX_FRACTION of the capacity, and only while
//! the bucket keeps at least half its capacity after it. Later takes of that key and shape are
//! answered from the slice, without Redis, until it is spent or LEASE_MS old; then it goes back
//! (mode 12: its unspent tokens into the bucket, its size off what the bucket counts as leased
//! out), in the next call for the key or, for a key gone quiet, in a batch of returns.
//!
//! Why the bound stays exact: the script counts what is leased out and refills the bucket only up
//! to capacity minus that, so the bucket plus every unspent lease never holds more than capacity
//! and everything spent from a lease obeys the bucket's bound over any window. A lease's clock
//! starts when its call was sent, before Redis started its own, so this replica stops spending a
//! lease before Redis stops counting it.
//!
//! Pure but for the lock: time is passed in, so the unit tests drive it.

use std::{
    collections::{HashMap, hash_map::RandomState},
    hash::BuildHasher,
    time::Duration,
};

use parking_lot::Mutex;
use tokio::time::Instant;

use crate::{Decision, Shape, capped_ms};

const SHARDS: usize = 16;
/// Keys followed at most (about 100 bytes each); beyond it a new key is decided without leases.
const MAX_ENTRIES: usize = 100_000;
/// The key's rate here is measured over windows this long.
const WINDOW: Duration = Duration::from_millis(100);
/// The smallest lease worth holding tokens others could use for.
const MIN_LEASE: u64 = 4;
/// A key unseen this long is forgotten (its lease, if any, returned first).
const IDLE: Duration = Duration::from_secs(10);

/// QUOTA_LEASES' settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LeaseSettings {
    /// LEASE_MS: how long a lease is spent before it goes back.
    pub lease_ms: u32,
    /// LEASE_MAX_FRACTION: the largest share of a bucket's capacity one lease may be.
    pub max_fraction: f64,
}

/// A slice of a bucket held by this replica.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Lease {
    /// What the script leased (the bucket counts it as leased out until it is returned).
    pub size: u64,
    /// Not spent yet.
    pub left: u64,
    /// The script's name for the lease's generation, which its return must carry.
    pub generation: u64,
    /// Spent until then (the call's send time plus LEASE_MS).
    expires: Instant,
    /// The bucket's tokens as Redis said after granting it.
    remaining: f64,
    /// This replica's number for it (to put back what a group spent, on this lease only).
    serial: u64,
}

/// A lease to give back, with its bucket.
#[derive(Clone, Debug, PartialEq)]
pub struct Returned {
    pub key: String,
    pub shape: Shape,
    pub lease: Lease,
}

/// What to do with a take.
#[derive(Debug, PartialEq)]
pub enum Spend {
    /// Answered from this replica's lease (number `serial`).
    Local { decision: Decision, serial: u64 },
    /// Ask Redis: returning `give_back` first (in the same call, so the take sees its tokens), and
    /// asking for a lease of `want` tokens after the take (0: none).
    Remote { give_back: Option<Lease>, want: u64 },
}

struct Entry {
    shape: Shape,
    /// Tokens asked of this key here since `window_start`.
    window_tokens: u64,
    window_start: Instant,
    /// Tokens per second asked here, smoothed over windows (0 until the first window ends).
    rate: f64,
    last_seen: Instant,
    /// A call asking for a lease is in flight since then (one at a time per key).
    asking: Option<Instant>,
    lease: Option<Lease>,
}

type Shard = Mutex<HashMap<Box<str>, Entry>>;

/// The leases this replica holds, and the recent rate of every key it decides.
pub struct Leases {
    settings: LeaseSettings,
    shards: Box<[Shard]>,
    hasher: RandomState,
    /// Leases replaced before they were spent (two calls granted one each): returned by the sweep.
    orphans: Mutex<Vec<Returned>>,
    serials: std::sync::atomic::AtomicU64,
}

impl Leases {
    pub fn new(settings: LeaseSettings) -> Self {
        Self {
            settings,
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
            orphans: Mutex::new(Vec::new()),
            serials: std::sync::atomic::AtomicU64::new(0),
        }
    }

    pub fn settings(&self) -> LeaseSettings {
        self.settings
    }

    fn shard(&self, key: &str) -> &Shard {
        &self.shards[(self.hasher.hash_one(key) as usize) % SHARDS]
    }

    fn lease_for(&self) -> Duration {
        Duration::from_millis(u64::from(self.settings.lease_ms))
    }

    /// A take of `cost` from `key` at `now`: from the lease if it holds enough, else what the call
    /// to Redis carries besides the take.
    pub fn spend(&self, key: &str, shape: Shape, cost: u64, now: Instant) -> Spend {
        let mut shard = self.shard(key).lock();
        let entry = match shard.get_mut(key) {
            Some(e) => e,
            None => {
                if shard.len() >= MAX_ENTRIES / SHARDS {
                    return Spend::Remote {
                        give_back: None,
                        want: 0,
                    };
                }
                shard.entry(key.into()).or_insert(Entry {
                    shape,
                    window_tokens: 0,
                    window_start: now,
                    rate: 0.0,
                    last_seen: now,
                    asking: None,
                    lease: None,
                })
            }
        };
        entry.last_seen = now;
        entry.window_tokens = entry.window_tokens.saturating_add(cost);
        let span = now.saturating_duration_since(entry.window_start);
        if span >= WINDOW {
            let sample = entry.window_tokens as f64 / span.as_secs_f64();
            entry.rate = if entry.rate == 0.0 {
                sample
            } else {
                (entry.rate + sample) / 2.0
            };
            entry.window_tokens = 0;
            entry.window_start = now;
        }
        let mut give_back = None;
        if entry.shape != shape {
            // The rules changed the bucket's shape: the lease was of the old one.
            entry.shape = shape;
            give_back = entry.lease.take();
        }
        if let Some(lease) = &mut entry.lease {
            if now < lease.expires && lease.left >= cost {
                lease.left -= cost;
                // What this replica could still take: the bucket at the grant and the unspent lease.
                let tokens = lease.remaining + lease.left as f64;
                let decision = Decision {
                    allowed: true,
                    tokens_remaining: tokens,
                    retry_after_ms: 0,
                    reset_after_ms: capped_ms((shape.capacity() - tokens) / shape.rate() * 1000.0),
                    without_backend: true,
                    granted: cost,
                };
                return Spend::Local {
                    decision,
                    serial: lease.serial,
                };
            }
            // Expired, or short of this cost: back in this call, so the take sees its tokens.
            give_back = entry.lease.take();
        }
        let want = self.size(entry.rate, shape, cost);
        let asking = entry
            .asking
            .is_some_and(|since| now.saturating_duration_since(since) < self.lease_for());
        if want == 0 || asking {
            return Spend::Remote { give_back, want: 0 };
        }
        entry.asking = Some(now);
        Spend::Remote { give_back, want }
    }

    /// Puts `cost` back on lease `serial` of `key` (a group that could not be answered from its
    /// leases alone); nothing if that lease has gone meanwhile.
    pub fn unspend(&self, key: &str, cost: u64, serial: u64) {
        if let Some(lease) = self
            .shard(key)
            .lock()
            .get_mut(key)
            .and_then(|e| e.lease.as_mut())
            .filter(|l| l.serial == serial)
        {
            lease.left = (lease.left + cost).min(lease.size);
        }
    }

    /// The lease to ask for a key taken at `rate` tokens a second here: what LEASE_MS of that
    /// rate spends, at most LEASE_MAX_FRACTION of the capacity; none when it would not cover two
    /// takes of `cost` or [`MIN_LEASE`] tokens (not worth holding tokens others could use).
    fn size(&self, rate: f64, shape: Shape, cost: u64) -> u64 {
        let by_rate = (rate * f64::from(self.settings.lease_ms) / 1000.0).ceil();
        let cap = (shape.capacity() * self.settings.max_fraction).floor();
        let size = by_rate.min(cap);
        if size.is_finite() && size >= (2 * cost).max(MIN_LEASE) as f64 {
            size as u64
        } else {
            0
        }
    }

    /// The answer to a call that asked for a lease of `key`, sent at `sent`: `lease` is the
    /// script's answer for it (None: the call failed). A lease that came while another was held
    /// replaces it; the other goes back with the next sweep.
    pub fn granted(&self, key: &str, shape: Shape, sent: Instant, lease: Option<&Decision>) {
        let mut shard = self.shard(key).lock();
        let Some(entry) = shard.get_mut(key) else {
            // Forgotten meanwhile (the table was swept): give it back at once.
            drop(shard);
            if let Some(d) = lease.filter(|d| d.granted > 0) {
                self.orphans.lock().push(Returned {
                    key: key.to_string(),
                    shape,
                    lease: self.lease(sent, d),
                });
            }
            return;
        };
        entry.asking = None;
        let Some(d) = lease.filter(|d| d.granted > 0) else {
            return;
        };
        let new = self.lease(sent, d);
        if entry.shape != shape {
            self.orphans.lock().push(Returned {
                key: key.to_string(),
                shape,
                lease: new,
            });
            return;
        }
        if let Some(old) = entry.lease.replace(new) {
            self.orphans.lock().push(Returned {
                key: key.to_string(),
                shape: entry.shape,
                lease: old,
            });
        }
    }

    fn lease(&self, sent: Instant, d: &Decision) -> Lease {
        Lease {
            size: d.granted,
            left: d.granted,
            generation: d.reset_after_ms,
            expires: sent + self.lease_for(),
            remaining: d.tokens_remaining,
            serial: self
                .serials
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        }
    }

    /// Takes out the leases to give back at `now`: expired ones, replaced ones, and those of keys
    /// gone quiet (whose entries go too).
    pub fn sweep(&self, now: Instant) -> Vec<Returned> {
        let mut out = std::mem::take(&mut *self.orphans.lock());
        for shard in self.shards.iter() {
            shard.lock().retain(|key, e| {
                if let Some(lease) = e.lease.filter(|l| now >= l.expires) {
                    e.lease = None;
                    out.push(Returned {
                        key: key.to_string(),
                        shape: e.shape,
                        lease,
                    });
                }
                e.lease.is_some() || now.saturating_duration_since(e.last_seen) < IDLE
            });
        }
        out
    }

    /// Takes out every lease (shutdown), and forgets every key.
    pub fn drain(&self) -> Vec<Returned> {
        let mut out = std::mem::take(&mut *self.orphans.lock());
        for shard in self.shards.iter() {
            for (key, e) in shard.lock().drain() {
                if let Some(lease) = e.lease {
                    out.push(Returned {
                        key: key.into(),
                        shape: e.shape,
                        lease,
                    });
                }
            }
        }
        out
    }

    /// Leases held now, and their unspent tokens.
    pub fn held(&self) -> (usize, u64) {
        let mut held = (0, 0);
        for shard in self.shards.iter() {
            for lease in shard.lock().values().filter_map(|e| e.lease.as_ref()) {
                held.0 += 1;
                held.1 += lease.left;
            }
        }
        held
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> LeaseSettings {
        LeaseSettings {
            lease_ms: 250,
            max_fraction: 0.1,
        }
    }

    fn grant(tokens: f64, granted: u64, generation: u64) -> Decision {
        Decision {
            allowed: true,
            tokens_remaining: tokens,
            retry_after_ms: 0,
            reset_after_ms: generation,
            without_backend: false,
            granted,
        }
    }

    /// Takes of `cost` every ms for `ms` ms, all answered remotely (no lease yet).
    async fn warm(leases: &Leases, key: &str, shape: Shape, ms: u64) -> u64 {
        let mut want = 0;
        for _ in 0..ms {
            if let Spend::Remote { want: w, .. } = leases.spend(key, shape, 1, Instant::now()) {
                want = want.max(w);
                if w > 0 {
                    break;
                }
            }
            tokio::time::advance(Duration::from_millis(1)).await;
        }
        want
    }

    #[tokio::test(start_paused = true)]
    async fn a_lease_is_sized_from_the_rate_spent_locally_and_expires() {
        let leases = Leases::new(settings());
        let shape = Shape::new(1000.0, 100.0).unwrap();
        // 1,000 takes a second: 250 ms of it is 250, capped at a tenth of 1,000.
        let want = warm(&leases, "k", shape, 200).await;
        assert_eq!(want, 100);
        // One ask at a time.
        assert_eq!(
            leases.spend("k", shape, 1, Instant::now()),
            Spend::Remote {
                give_back: None,
                want: 0
            }
        );
        let sent = Instant::now();
        leases.granted("k", shape, sent, Some(&grant(800.0, 100, 7)));
        for i in 1..=100u64 {
            let Spend::Local { decision: d, .. } = leases.spend("k", shape, 1, Instant::now())
            else {
                panic!("take {i} should be answered from the lease");
            };
            assert!(d.allowed && d.without_backend && d.granted == 1);
            assert_eq!(d.tokens_remaining, 800.0 + (100 - i) as f64);
        }
        assert_eq!(leases.held(), (1, 0));
        // Spent: the next take goes to Redis, returning the spent lease (its size off the
        // bucket's leased count) and asking for another.
        match leases.spend("k", shape, 1, Instant::now()) {
            Spend::Remote {
                give_back: Some(l),
                want,
            } => {
                assert_eq!((l.size, l.left, l.generation), (100, 0, 7));
                assert!(want > 0);
            }
            other => panic!("{other:?}"),
        }
        // A lease is spent for LEASE_MS from its call's send time, then swept back.
        leases.granted("k", shape, Instant::now(), Some(&grant(700.0, 50, 8)));
        tokio::time::advance(Duration::from_millis(249)).await;
        assert!(matches!(
            leases.spend("k", shape, 1, Instant::now()),
            Spend::Local { .. }
        ));
        assert!(leases.sweep(Instant::now()).is_empty());
        tokio::time::advance(Duration::from_millis(1)).await;
        let back = leases.sweep(Instant::now());
        assert_eq!(back.len(), 1);
        assert_eq!((back[0].lease.size, back[0].lease.left), (50, 49));
        assert!(matches!(
            leases.spend("k", shape, 1, Instant::now()),
            Spend::Remote {
                give_back: None,
                ..
            }
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_key_or_a_large_cost_gets_no_lease() {
        let leases = Leases::new(settings());
        let shape = Shape::new(1000.0, 100.0).unwrap();
        // 4 takes a second: a lease of LEASE_MS would hold 1 token.
        for _ in 0..4 {
            let s = leases.spend("slow", shape, 1, Instant::now());
            assert_eq!(
                s,
                Spend::Remote {
                    give_back: None,
                    want: 0
                }
            );
            tokio::time::advance(Duration::from_millis(250)).await;
        }
        // A lease of 100 cannot cover two takes of 60.
        warm(&leases, "big", shape, 200).await;
        tokio::time::advance(Duration::from_millis(300)).await;
        assert!(matches!(
            leases.spend("big", shape, 60, Instant::now()),
            Spend::Remote { want: 0, .. }
        ));
        // A small bucket: a tenth of 10 is 1, less than two takes.
        let small = Shape::new(10.0, 100.0).unwrap();
        assert_eq!(warm(&leases, "small", small, 300).await, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_shape_change_or_a_short_lease_gives_it_back_in_the_next_call() {
        let leases = Leases::new(settings());
        let shape = Shape::new(1000.0, 100.0).unwrap();
        warm(&leases, "k", shape, 200).await;
        leases.granted("k", shape, Instant::now(), Some(&grant(800.0, 100, 3)));
        // A take of more than is left goes to Redis with the lease returned first.
        assert!(matches!(
            leases.spend("k", shape, 99, Instant::now()),
            Spend::Local { .. }
        ));
        match leases.spend("k", shape, 2, Instant::now()) {
            Spend::Remote {
                give_back: Some(l), ..
            } => assert_eq!(l.left, 1),
            other => panic!("{other:?}"),
        }
        leases.granted("k", shape, Instant::now(), Some(&grant(700.0, 100, 3)));
        // The rules changed the shape: the old shape's lease goes back, nothing is spent from it.
        let reshaped = Shape::new(500.0, 100.0).unwrap();
        match leases.spend("k", reshaped, 1, Instant::now()) {
            Spend::Remote {
                give_back: Some(l), ..
            } => assert_eq!((l.size, l.left), (100, 100)),
            other => panic!("{other:?}"),
        }
        // A lease granted for the old shape after the change goes back by the sweep.
        leases.granted("k", shape, Instant::now(), Some(&grant(700.0, 10, 4)));
        assert_eq!(leases.held(), (0, 0));
        let back = leases.sweep(Instant::now());
        assert_eq!((back.len(), back[0].lease.size), (1, 10));
    }

    #[tokio::test(start_paused = true)]
    async fn quiet_keys_are_forgotten_and_drain_takes_everything() {
        let leases = Leases::new(settings());
        let shape = Shape::new(1000.0, 100.0).unwrap();
        warm(&leases, "a", shape, 200).await;
        warm(&leases, "b", shape, 200).await;
        leases.granted("a", shape, Instant::now(), Some(&grant(800.0, 100, 1)));
        leases.granted("b", shape, Instant::now(), None);
        assert_eq!(leases.held(), (1, 100));
        let drained = leases.drain();
        assert_eq!(drained.len(), 1);
        assert_eq!(drained[0].key, "a");
        assert_eq!(leases.held(), (0, 0));
        leases.spend("c", shape, 1, Instant::now());
        tokio::time::advance(IDLE).await;
        assert!(leases.sweep(Instant::now()).is_empty());
        assert_eq!(
            leases.shards.iter().map(|s| s.lock().len()).sum::<usize>(),
            0
        );
    }
}
