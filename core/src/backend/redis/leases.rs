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
//! starts when its call was sent, before Redis started its own, and Redis counts it for twice
//! LEASE_MS: this replica stops spending a lease before Redis stops counting it, and gives it back
//! (the sweep runs every quarter of LEASE_MS) while it is still counted. A return that comes
//! later anyway puts nothing back (the script's header says why).
//!
//! Pure but for the lock: time is passed in, so the unit tests drive it.

use std::{
    collections::{HashMap, hash_map::RandomState},
    hash::BuildHasher,
    time::Duration,
};

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use parking_lot::Mutex;
use tokio::time::Instant;

use crate::{Decision, Shape, capped_ms};

const SHARDS: usize = 16;
/// Keys followed at most (about 100 bytes each); beyond it a new key is decided without leases.
const MAX_ENTRIES: usize = 100_000;
/// The key's rate here is measured over windows this long.
const WINDOW: Duration = Duration::from_millis(100);
/// The smallest lease worth holding tokens others could use for.
const MIN_LEASE: u64 = 2;
/// Keys get an entry only when seen twice within this long (a key taken less often never gets a
/// lease): cold keys cost no allocation and no room in the table.
const SEEN_WITHIN_MS: u64 = 1_000;
/// Slots of that filter (8 bytes each): a key whose slot another key took meanwhile waits for its
/// next sighting.
const SEEN_SLOTS: usize = 1 << 16;
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

/// What this replica's leases have done since it started, and hold now (the status page).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct LeaseStats {
    /// Leases held now, and their unspent tokens.
    pub held: u64,
    pub unspent: u64,
    /// Leases granted, the tokens they took, the unspent tokens given back.
    pub granted: u64,
    pub leased_tokens: u64,
    pub returned_tokens: u64,
    /// Takes answered from a lease.
    pub answers: u64,
}

/// The running counts behind [`LeaseStats`].
#[derive(Default)]
pub struct Tally {
    granted: AtomicU64,
    leased_tokens: AtomicU64,
    returned_tokens: AtomicU64,
    answers: AtomicU64,
}

impl Tally {
    pub fn granted(&self, tokens: u64) {
        self.granted.fetch_add(1, Relaxed);
        self.leased_tokens.fetch_add(tokens, Relaxed);
    }

    pub fn returned(&self, tokens: u64) {
        self.returned_tokens.fetch_add(tokens, Relaxed);
    }

    pub fn answers(&self, n: u64) {
        self.answers.fetch_add(n, Relaxed);
    }
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

type Map = HashMap<Box<str>, Entry>;
type Shard = Mutex<Map>;

/// The leases this replica holds, and the recent rate of every key it decides.
pub struct Leases {
    settings: LeaseSettings,
    shards: Box<[Shard]>,
    hasher: RandomState,
    /// Leases replaced before they were spent (two calls granted one each): returned by the sweep.
    orphans: Mutex<Vec<Returned>>,
    serials: std::sync::atomic::AtomicU64,
    /// Every lease granted, by key and expiry, oldest first: the sweep visits leases, not keys.
    granted: Mutex<std::collections::VecDeque<(Box<str>, Instant, u64)>>,
    /// When quiet keys were last looked for.
    idle_sweep: Mutex<Instant>,
    pub tally: Tally,
    /// Per slot, the last key seen there (its hash's top half) and when (ms since `epoch`, low
    /// half): lossy, lock-free, and only ever delays a key's entry.
    seen: Box<[AtomicU64]>,
    epoch: Instant,
}

impl Leases {
    pub fn new(settings: LeaseSettings) -> Self {
        Self {
            settings,
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
            orphans: Mutex::new(Vec::new()),
            serials: std::sync::atomic::AtomicU64::new(0),
            granted: Mutex::new(std::collections::VecDeque::new()),
            idle_sweep: Mutex::new(Instant::now()),
            tally: Tally::default(),
            seen: (0..SEEN_SLOTS).map(|_| AtomicU64::new(0)).collect(),
            epoch: Instant::now(),
        }
    }

    /// Whether the key of hash `h` was seen within [`SEEN_WITHIN_MS`] before `now` (and notes
    /// this sighting).
    fn seen_twice(&self, h: u64, now: Instant) -> bool {
        let ms = now.saturating_duration_since(self.epoch).as_millis() as u64 & 0xffff_ffff;
        let tag = (h >> 32) | 1;
        let slot = &self.seen[(h >> 16) as usize % SEEN_SLOTS];
        let before = slot.swap(tag << 32 | ms, Relaxed);
        before >> 32 == tag && ms.wrapping_sub(before) & 0xffff_ffff <= SEEN_WITHIN_MS
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
        let h = self.hasher.hash_one(key);
        let mut shard = self.shards[(h as usize) % SHARDS].lock();
        let Some(entry) = self.follow(&mut shard, key, h, shape, cost, now) else {
            return Spend::Remote {
                give_back: None,
                want: 0,
            };
        };
        let mut give_back = reshape(entry, shape);
        if give_back.is_none() {
            match take_local(entry, shape, cost, now) {
                Ok(local) => return local,
                Err(lease) => give_back = lease,
            }
        }
        self.remote(entry, shape, cost, now, give_back)
    }

    /// The takes of an all-or-nothing group: answered from their leases only if every one can be
    /// (all [`Spend::Local`]); else none is spent, and each member's lease goes back in the group's
    /// call to Redis with a new one asked for in its place, so that the members' leases run out
    /// together and the next requests are answered whole. Atomic: every member's shard is locked
    /// (in order) throughout, so no lease changes between the check and the spend.
    pub fn spend_group(&self, takes: &[(&str, Shape, u64)], now: Instant) -> Vec<Spend> {
        let hashes: Vec<u64> = takes.iter().map(|t| self.hasher.hash_one(t.0)).collect();
        let mut order: Vec<usize> = hashes.iter().map(|&h| (h as usize) % SHARDS).collect();
        order.sort_unstable();
        order.dedup();
        let mut guards: Vec<_> = order.iter().map(|&i| (i, self.shards[i].lock())).collect();
        let mut out: Vec<Spend> = Vec::with_capacity(takes.len());
        let mut give_backs: Vec<Option<Lease>> = vec![None; takes.len()];
        let mut whole = true;
        for (i, (&(key, shape, cost), &h)) in takes.iter().zip(&hashes).enumerate() {
            let shard = locked(&mut guards, h);
            let Some(entry) = self.follow(shard, key, h, shape, cost, now) else {
                whole = false;
                continue;
            };
            give_backs[i] = reshape(entry, shape);
            if !whole || give_backs[i].is_some() {
                whole = false;
                continue;
            }
            match take_local(entry, shape, cost, now) {
                Ok(local) => out.push(local),
                Err(lease) => {
                    give_backs[i] = lease;
                    whole = false;
                }
            }
        }
        if whole {
            return out;
        }
        self.renew_all(&mut guards, takes, &hashes, &out, give_backs, now)
    }

    /// A group not answered whole: what was spent from its leases goes back on them (in order:
    /// the same lease may serve two members), then every member's lease goes back in the group's
    /// call with a new one asked for, under the locks `spend_group` holds.
    fn renew_all(
        &self,
        guards: &mut [(usize, parking_lot::MutexGuard<'_, Map>)],
        takes: &[(&str, Shape, u64)],
        hashes: &[u64],
        spent: &[Spend],
        give_backs: Vec<Option<Lease>>,
        now: Instant,
    ) -> Vec<Spend> {
        for (local, (&(key, _, cost), &h)) in spent.iter().zip(takes.iter().zip(hashes)) {
            if let Spend::Local { serial, .. } = local
                && let Some(lease) = locked(guards, h)
                    .get_mut(key)
                    .and_then(|e| e.lease.as_mut())
                    .filter(|l| l.serial == *serial)
            {
                lease.left += cost;
            }
        }
        takes
            .iter()
            .zip(hashes)
            .zip(give_backs)
            .map(|((&(key, shape, cost), &h), mut give_back)| {
                match locked(guards, h).get_mut(key) {
                    Some(entry) => {
                        if give_back.is_none() {
                            give_back = entry.lease.take();
                        }
                        self.remote(entry, shape, cost, now, give_back)
                    }
                    None => Spend::Remote { give_back, want: 0 },
                }
            })
            .collect()
    }

    /// The entry of `key` (hash `h`) in its shard, with `cost` counted in its rate; a key gets one
    /// once seen twice within [`SEEN_WITHIN_MS`] while the table has room. None: not followed.
    fn follow<'m>(
        &self,
        shard: &'m mut Map,
        key: &str,
        h: u64,
        shape: Shape,
        cost: u64,
        now: Instant,
    ) -> Option<&'m mut Entry> {
        if !shard.contains_key(key) {
            if shard.len() >= MAX_ENTRIES / SHARDS || !self.seen_twice(h, now) {
                return None;
            }
            shard.insert(
                key.into(),
                Entry {
                    shape,
                    window_tokens: 0,
                    window_start: now,
                    rate: 0.0,
                    last_seen: now,
                    asking: None,
                    lease: None,
                },
            );
        }
        let entry = shard.get_mut(key)?;
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
        Some(entry)
    }

    /// What goes to Redis for a take of an entry without a usable lease: `give_back`, and a new
    /// lease of the size its rate calls for unless one is being asked for already.
    fn remote(
        &self,
        entry: &mut Entry,
        shape: Shape,
        cost: u64,
        now: Instant,
        give_back: Option<Lease>,
    ) -> Spend {
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
        self.granted
            .lock()
            .push_back((key.into(), new.expires, new.serial));
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

    /// Takes out the leases to give back at `now`: expired ones and replaced ones; and, once a
    /// tenth of [`IDLE`], forgets the keys gone quiet (none holds a lease: it expired first).
    pub fn sweep(&self, now: Instant) -> Vec<Returned> {
        let mut out = std::mem::take(&mut *self.orphans.lock());
        loop {
            // One lease at a time: the list's lock is never held with a shard's.
            let next = {
                let mut granted = self.granted.lock();
                match granted.front() {
                    Some((_, expires, _)) if *expires <= now => granted.pop_front(),
                    _ => None,
                }
            };
            let Some((key, _, serial)) = next else { break };
            let mut shard = self.shard(&key).lock();
            let Some(e) = shard.get_mut(&*key) else {
                continue;
            };
            // The lease of this grant, if it is still there (not spent and given back meanwhile).
            if let Some(lease) = e.lease.filter(|l| l.serial == serial) {
                e.lease = None;
                out.push(Returned {
                    key: key.into(),
                    shape: e.shape,
                    lease,
                });
            }
        }
        let mut last = self.idle_sweep.lock();
        if now.saturating_duration_since(*last) >= IDLE / 10 {
            *last = now;
            drop(last);
            for shard in self.shards.iter() {
                shard.lock().retain(|_, e| {
                    e.lease.is_some() || now.saturating_duration_since(e.last_seen) < IDLE
                });
            }
        }
        out
    }

    /// Takes out every lease (shutdown), and forgets every key.
    pub fn drain(&self) -> Vec<Returned> {
        let mut out = std::mem::take(&mut *self.orphans.lock());
        self.granted.lock().clear();
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

    /// What the leases have done, and hold now.
    pub fn stats(&self) -> LeaseStats {
        let (held, unspent) = self.held();
        LeaseStats {
            held: held as u64,
            unspent,
            granted: self.tally.granted.load(Relaxed),
            leased_tokens: self.tally.leased_tokens.load(Relaxed),
            returned_tokens: self.tally.returned_tokens.load(Relaxed),
            answers: self.tally.answers.load(Relaxed),
        }
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

/// The map of hash `h`'s shard among the shards locked for a group.
fn locked<'g>(guards: &'g mut [(usize, parking_lot::MutexGuard<'_, Map>)], h: u64) -> &'g mut Map {
    let i = (h as usize) % SHARDS;
    let at = guards
        .iter()
        .position(|(j, _)| *j == i)
        .expect("every member's shard is locked");
    &mut guards[at].1
}

/// A shape change by the rules: the lease was of the old shape, and goes back.
fn reshape(entry: &mut Entry, shape: Shape) -> Option<Lease> {
    if entry.shape == shape {
        return None;
    }
    entry.shape = shape;
    entry.lease.take()
}

/// `cost` from the entry's lease, if it is live and holds that much; else the lease (if any),
/// taken out to go back in the call that decides the take.
fn take_local(
    entry: &mut Entry,
    shape: Shape,
    cost: u64,
    now: Instant,
) -> Result<Spend, Option<Lease>> {
    let Some(lease) = &mut entry.lease else {
        return Err(None);
    };
    if now >= lease.expires || lease.left < cost {
        // Expired, or short of this cost: back in this call, so the take sees its tokens.
        return Err(entry.lease.take());
    }
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
    Ok(Spend::Local {
        decision,
        serial: lease.serial,
    })
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
        // 2 takes a second: a lease of LEASE_MS would hold 1 token.
        for _ in 0..4 {
            let s = leases.spend("slow", shape, 1, Instant::now());
            assert_eq!(
                s,
                Spend::Remote {
                    give_back: None,
                    want: 0
                }
            );
            tokio::time::advance(Duration::from_millis(500)).await;
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
    async fn a_group_spends_from_its_leases_only_whole_and_renews_them_together() {
        let leases = Leases::new(settings());
        let shape = Shape::new(1000.0, 100.0).unwrap();
        warm(&leases, "a", shape, 200).await;
        warm(&leases, "b", shape, 200).await;
        leases.granted("a", shape, Instant::now(), Some(&grant(800.0, 100, 5)));
        leases.granted("b", shape, Instant::now(), Some(&grant(800.0, 3, 6)));
        let group = |cost_b| [("a", shape, 1), ("b", shape, cost_b)];
        // Both covered: both spent.
        let both = leases.spend_group(&group(2), Instant::now());
        assert!(
            both.iter().all(|s| matches!(s, Spend::Local { .. })),
            "{both:?}"
        );
        assert_eq!(leases.held(), (2, 99 + 1));
        // b cannot cover 2 more: nothing is spent, and both leases go back (a's whole, less
        // what it spent before), a new one asked for each.
        let renewed = leases.spend_group(&group(2), Instant::now());
        match &renewed[..] {
            [
                Spend::Remote {
                    give_back: Some(a),
                    want: wa,
                },
                Spend::Remote {
                    give_back: Some(b),
                    want: wb,
                },
            ] => {
                assert_eq!((a.size, a.left, a.generation), (100, 99, 5));
                assert_eq!((b.size, b.left, b.generation), (3, 1, 6));
                assert!(*wa > 0 && *wb > 0);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(leases.held(), (0, 0));
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
        // Seen once: not followed at all; twice: followed until quiet.
        leases.spend("c", shape, 1, Instant::now());
        assert_eq!(
            leases.shards.iter().map(|s| s.lock().len()).sum::<usize>(),
            0
        );
        tokio::time::advance(Duration::from_millis(1_001)).await;
        leases.spend("c", shape, 1, Instant::now());
        assert_eq!(
            leases.shards.iter().map(|s| s.lock().len()).sum::<usize>(),
            0
        );
        tokio::time::advance(Duration::from_millis(10)).await;
        leases.spend("c", shape, 1, Instant::now());
        assert_eq!(
            leases.shards.iter().map(|s| s.lock().len()).sum::<usize>(),
            1
        );
        tokio::time::advance(IDLE).await;
        assert!(leases.sweep(Instant::now()).is_empty());
        assert_eq!(
            leases.shards.iter().map(|s| s.lock().len()).sum::<usize>(),
            0
        );
    }
}
