//! Leased quota: decisions answered in this process from tokens taken from sluicegate in advance.
//!
//! For a hot key, a call to sluicegate per decision is most of the cost. [`LeasedClient`] takes a
//! slice of the key's bucket at once (an `up_to` reservation: as many tokens as the bucket can
//! give, up to the slice), answers the next decisions here by spending it, fetches the next slice
//! in the background before this one runs out, and when a lease ends (it is used up, or has lived
//! [`LeasePolicy::lifetime`]) settles it with what was spent: the rest goes back to the bucket.
//!
//! **The bound holds exactly.** Every token spent here was taken from the shared bucket first, in
//! one atomic step on sluicegate, so all clients and replicas together never admit more than the
//! bucket allows: a token is admitted at most once, no earlier than it was taken. What leases
//! cost is fairness: tokens held in one process's lease, unspent, are not available to the others
//! until the lease is settled. So slices follow the key's recent rate here (enough for about one
//! lifetime), at most [`LeasePolicy::max_slice`] and [`LeasePolicy::max_fraction`] of the
//! bucket; and once a grant comes back short (the bucket is nearly empty) the next leases ask only
//! for the decision's own cost, until a grant is whole again.
//!
//! **When sluicegate cannot be reached**, the client's [`FailureMode`](crate::FailureMode) answers
//! the decisions the leases cannot cover; what a lease holds is still spent here. A lease whose
//! Settle never arrives (a crash, an unreachable sluicegate) keeps its unspent tokens spent until
//! the bucket refills: the safe side. Call [`LeasedClient::close`] before exiting to give them back.
//!
//! A denial is remembered for its `retry_after`: until then the key is denied here, without a
//! call (the bucket had not even one token; nothing can be taken before then but by a refund).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::{Client, Decision, Error, Request, Reservation};

/// How [`LeasedClient`] sizes and keeps its leases.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LeasePolicy {
    /// The most tokens one lease asks for.
    pub max_slice: u32,
    /// The largest share of a bucket's capacity one lease asks for.
    pub max_fraction: f64,
    /// How long a lease is spent from: then what is left goes back. Tokens taken are admitted
    /// within this of being taken.
    pub lifetime: Duration,
}

impl Default for LeasePolicy {
    /// Slices of at most 1,000 tokens and a tenth of the bucket, each lived 250 ms.
    fn default() -> Self {
        Self {
            max_slice: 1000,
            max_fraction: 0.1,
            lifetime: Duration::from_millis(250),
        }
    }
}

/// A decision made by a [`LeasedClient`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LeasedDecision {
    /// The answer. For one spent from a lease: `tokens_remaining` is what the bucket held after the
    /// grant plus what is left of the lease; `granted` is the cost.
    pub decision: Decision,
    /// Answered in this process, without a call to sluicegate.
    pub local: bool,
    /// When allowed from a lease: when its tokens were taken from sluicegate's bucket (between
    /// the sending of the lease's call and its answer).
    pub taken: Option<(Instant, Instant)>,
}

/// Counts of what a [`LeasedClient`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LeaseStats {
    /// Decisions answered.
    pub decisions: u64,
    /// Of them, answered without a call.
    pub local: u64,
    /// Calls made to sluicegate: leases taken (or refused) and settled.
    pub calls: u64,
    /// Tokens taken by leases.
    pub leased: u64,
    /// Tokens given back unspent by settled leases.
    pub returned: u64,
}

/// Answers decisions from leased quota; see the [module docs](self).
pub struct LeasedClient {
    inner: Arc<Inner>,
    keys: Mutex<Keys>,
}

/// The keys seen, with what is held for each; idle ones are swept out as the map grows, so a
/// client that sees many keys over time holds only the live ones.
#[derive(Default)]
struct Keys {
    /// By key (looked up by `&str`: a decision allocates nothing), then by shape as asked
    /// (capacity and rate bits: another shape is another bucket), usually one.
    map: HashMap<String, Vec<(Shape, Arc<KeyLeases>)>>,
    /// The size at which idle keys are swept out next.
    sweep_at: usize,
}

/// The least size at which idle keys are swept out.
const SWEEP_FROM: usize = 1024;

/// What the background fetches and settles share with the client.
struct Inner {
    client: Client,
    policy: LeasePolicy,
    stats: Counters,
    /// Background fetches and settles in flight, and a wake-up when the last one ends
    /// ([`LeasedClient::close`] waits for them).
    pending: AtomicU64,
    idle: tokio::sync::Notify,
}

/// A bucket's shape as asked: capacity and rate, bit for bit.
type Shape = (u64, u64);

#[derive(Default)]
struct Counters {
    decisions: AtomicU64,
    local: AtomicU64,
    calls: AtomicU64,
    leased: AtomicU64,
    returned: AtomicU64,
}

#[derive(Default)]
struct KeyLeases {
    state: Mutex<State>,
    /// One lease call at a time per key: callers that find no lease wait for the one in flight.
    fetch: tokio::sync::Mutex<()>,
}

impl KeyLeases {
    /// Whether a key nobody is deciding for must stay: it holds a lease still running, is
    /// fetching one, or remembers a denial still running. Its leases that ended are settled.
    fn still_needed(&self, inner: &Arc<Inner>, now: Instant) -> bool {
        let Ok(mut s) = self.state.try_lock() else {
            return true;
        };
        let s = &mut *s;
        for lease in [&mut s.current, &mut s.next] {
            if lease.as_ref().is_some_and(|h| h.ends <= now) {
                inner.settle_later(lease.take().expect("just seen"));
            }
        }
        s.current.is_some()
            || s.next.is_some()
            || s.fetching
            || s.empty_until.is_some_and(|(until, _)| until > now)
    }
}

#[derive(Default)]
struct State {
    current: Option<Held>,
    /// Fetched in the background while `current` still had tokens.
    next: Option<Held>,
    /// A background fetch is in flight.
    fetching: bool,
    /// The bucket had nothing to give: denied here until then, with that denial's figures.
    empty_until: Option<(Instant, Decision)>,
    /// Tokens spent per second from this key's leases (an average over the recent ones).
    rate: f64,
    /// The last grant was short of what was asked: the bucket is nearly empty.
    short: bool,
    /// The bucket's capacity as sluicegate last applied it (0: not known yet).
    capacity: f64,
}

/// A lease held: what was granted, what is spent of it.
struct Held {
    reservation: Reservation,
    granted: u32,
    used: u32,
    taken: (Instant, Instant),
    ends: Instant,
}

impl Held {
    fn left(&self) -> u32 {
        self.granted - self.used
    }
}

/// A lease call's outcome for a caller who had nothing to spend.
enum Taken {
    /// A lease is in place: spend from it.
    Lease,
    /// The answer to give: a denial, or a failure mode's.
    Answer(LeasedDecision),
}

impl LeasedClient {
    /// Leased decisions over `client` (its deadline and failure mode apply to the lease calls).
    pub fn new(client: Client, policy: LeasePolicy) -> Self {
        Self {
            inner: Arc::new(Inner {
                client,
                policy,
                stats: Counters::default(),
                pending: AtomicU64::new(0),
                idle: tokio::sync::Notify::new(),
            }),
            keys: Mutex::default(),
        }
    }

    /// What this client did so far.
    pub fn stats(&self) -> LeaseStats {
        let s = &self.inner.stats;
        LeaseStats {
            decisions: s.decisions.load(Relaxed),
            local: s.local.load(Relaxed),
            calls: s.calls.load(Relaxed),
            leased: s.leased.load(Relaxed),
            returned: s.returned.load(Relaxed),
        }
    }

    /// May `req.key` spend `req.cost` tokens now? From a lease when one holds enough; else a new
    /// lease is taken (the caller waits for it). `dry_run` and `up_to` are not leased: such a
    /// request goes to sluicegate as it is.
    pub async fn decide(&self, req: Request<'_>) -> Result<LeasedDecision, Error> {
        let inner = &self.inner;
        inner.stats.decisions.fetch_add(1, Relaxed);
        if req.dry_run || req.up_to {
            inner.stats.calls.fetch_add(1, Relaxed);
            let decision = inner.client.check(req).await?;
            return Ok(LeasedDecision {
                decision,
                local: false,
                taken: None,
            });
        }
        let cost = req.cost.max(1);
        let leases = self.leases(&req);
        // A cost above the capacity could never be allowed: the error a plain take gets, whatever
        // the leases hold at the moment.
        let capacity = match req.capacity {
            c if c > 0.0 => c,
            _ => leases.state.lock().expect("poisoned").capacity,
        };
        if capacity > 0.0 && f64::from(cost) > capacity {
            return Err(above_capacity(cost, capacity));
        }
        // Whether this caller made a lease call (its answer is then not a local one).
        let mut called = false;
        let mut retired = Vec::new();
        loop {
            if let Some(d) = inner.from_lease(&leases, &req, cost, &mut retired) {
                retired.drain(..).for_each(|h| inner.settle_later(h));
                return Ok(inner.answered(d, called));
            }
            let _turn = leases.fetch.lock().await;
            // Another caller's lease may have landed while this one waited.
            if let Some(d) = inner.from_lease(&leases, &req, cost, &mut retired) {
                retired.drain(..).for_each(|h| inner.settle_later(h));
                return Ok(inner.answered(d, called));
            }
            // What the retired leases did not spend goes back before the lease call, which may
            // need it.
            for h in retired.drain(..) {
                inner.settle(h).await;
            }
            called = true;
            match inner.take(&req, &leases, cost).await? {
                Taken::Lease => continue,
                Taken::Answer(d) => return Ok(d),
            }
        }
    }

    /// How many keys this client holds state for (leases, remembered denials, rates).
    pub fn held_keys(&self) -> usize {
        self.keys
            .lock()
            .expect("poisoned")
            .map
            .values()
            .map(Vec::len)
            .sum()
    }

    /// Settles every lease held (what is left goes back), once the fetches running in the
    /// background have landed, and forgets every key. Call it before exiting.
    pub async fn close(&self) {
        let all: Vec<Arc<KeyLeases>> = {
            let mut keys = self.keys.lock().expect("poisoned");
            keys.map
                .drain()
                .flat_map(|(_, shapes)| shapes.into_iter().map(|(_, k)| k))
                .collect()
        };
        self.inner.wait_idle().await;
        for leases in all {
            let held: Vec<Held> = {
                let mut s = leases.state.lock().expect("poisoned");
                [s.current.take(), s.next.take()]
                    .into_iter()
                    .flatten()
                    .collect()
            };
            for h in held {
                self.inner.settle(h).await;
            }
        }
        self.inner.wait_idle().await;
    }

    fn leases(&self, req: &Request<'_>) -> Arc<KeyLeases> {
        let shape = (req.capacity.to_bits(), req.rate.to_bits());
        let mut keys = self.keys.lock().expect("poisoned");
        if let Some((_, k)) = keys
            .map
            .get(req.key)
            .and_then(|shapes| shapes.iter().find(|(s, _)| *s == shape))
        {
            return k.clone();
        }
        if keys.map.len() >= keys.sweep_at.max(SWEEP_FROM) {
            let now = Instant::now();
            let inner = &self.inner;
            keys.map.retain(|_, shapes| {
                shapes.retain(|(_, k)| Arc::strong_count(k) > 1 || k.still_needed(inner, now));
                !shapes.is_empty()
            });
            keys.sweep_at = 2 * keys.map.len();
        }
        let k = Arc::new(KeyLeases::default());
        let shapes = keys.map.entry(req.key.to_string()).or_default();
        shapes.push((shape, k.clone()));
        k
    }
}

impl Inner {
    /// A decision from a lease, counted local unless this caller made the lease call for it.
    fn answered(&self, d: LeasedDecision, called: bool) -> LeasedDecision {
        if called {
            return LeasedDecision { local: false, ..d };
        }
        self.stats.local.fetch_add(1, Relaxed);
        d
    }

    /// A decision from what this process holds: spent from a lease, or a denial remembered.
    /// Retires the leases that ended or cannot cover `cost` into `retired` (the caller settles
    /// them) and starts fetching the next when this one is running low.
    fn from_lease(
        self: &Arc<Self>,
        leases: &Arc<KeyLeases>,
        req: &Request<'_>,
        cost: u32,
        retired: &mut Vec<Held>,
    ) -> Option<LeasedDecision> {
        let now = Instant::now();
        let mut s = leases.state.lock().expect("poisoned");
        loop {
            let usable = (s.current.as_ref()).is_some_and(|h| h.ends > now && h.left() >= cost);
            if usable {
                break;
            }
            if let Some(h) = s.current.take() {
                s.rate = spent_rate(s.rate, &h, now);
                retired.push(h);
            }
            match s.next.take() {
                Some(next) => s.current = Some(next),
                None => break,
            }
        }
        let low = {
            let rate = s.rate;
            let Some(h) = s.current.as_mut() else {
                return s
                    .empty_until
                    .filter(|(until, _)| *until > now)
                    .map(|(until, d)| LeasedDecision {
                        decision: Decision {
                            retry_after: until - now,
                            ..d
                        },
                        local: true,
                        taken: None,
                    });
            };
            h.used += cost;
            // Running low (under half left, or less than a tenth of a lifetime at the key's
            // rate): the next slice now, while this one still answers.
            h.left() < h.granted / 2
                || f64::from(h.left()) < rate * self.policy.lifetime.as_secs_f64() / 10.0
        };
        let h = s.current.as_ref().expect("spent from above");
        let answer = LeasedDecision {
            decision: Decision {
                allowed: true,
                tokens_remaining: h.reservation.decision.tokens_remaining + f64::from(h.left()),
                granted: cost,
                ..h.reservation.decision
            },
            local: true,
            taken: Some(h.taken),
        };
        if low && !s.fetching && s.next.is_none() && !s.short {
            s.fetching = true;
            self.fetch_later(leases.clone(), req, cost);
        }
        Some(answer)
    }

    /// The lease call for a caller with nothing to spend: the lease is put in place (spend from
    /// it), or the answer to give comes back (a denial, a failure mode's).
    async fn take(
        self: &Arc<Self>,
        req: &Request<'_>,
        leases: &KeyLeases,
        cost: u32,
    ) -> Result<Taken, Error> {
        let ask = self.slice(leases, cost, req.capacity);
        let sent = Instant::now();
        self.stats.calls.fetch_add(1, Relaxed);
        let lease_req = Request {
            cost: ask,
            up_to: true,
            ..*req
        };
        let r = self
            .client
            .reserve(lease_req, self.reservation_ttl())
            .await?;
        let d = r.decision;
        let Some(held) = self.held(r, ask, sent, leases) else {
            if !d.allowed && !d.degraded {
                let mut s = leases.state.lock().expect("poisoned");
                s.empty_until = Some((Instant::now() + d.retry_after, d));
                s.capacity = d.capacity;
            }
            return Ok(Taken::Answer(LeasedDecision {
                decision: d,
                local: false,
                taken: None,
            }));
        };
        if held.granted < cost {
            // The bucket holds less than this caller's cost: a denial (or, for a cost above the
            // capacity, the error a plain take gets); what was taken goes back.
            let there = d.tokens_remaining + f64::from(held.granted);
            self.settle(held).await;
            if d.capacity > 0.0 && f64::from(cost) > d.capacity {
                return Err(above_capacity(cost, d.capacity));
            }
            let wait = (f64::from(cost) - there) / d.rate.max(f64::MIN_POSITIVE);
            return Ok(Taken::Answer(LeasedDecision {
                decision: Decision {
                    allowed: false,
                    granted: 0,
                    tokens_remaining: there,
                    retry_after: Duration::from_secs_f64(wait.clamp(0.001, 86_400.0)),
                    ..d
                },
                local: false,
                taken: None,
            }));
        }
        let old = leases.state.lock().expect("poisoned").current.replace(held);
        if let Some(old) = old {
            self.settle_later(old);
        }
        Ok(Taken::Lease)
    }

    /// A reservation's answer as a lease, when it granted tokens (and notes whether it granted
    /// all that was asked).
    fn held(&self, r: Reservation, ask: u32, sent: Instant, leases: &KeyLeases) -> Option<Held> {
        let d = r.decision;
        if d.degraded || !d.allowed || d.granted == 0 || r.id.is_none() {
            return None;
        }
        let done = Instant::now();
        self.stats.leased.fetch_add(u64::from(d.granted), Relaxed);
        let mut s = leases.state.lock().expect("poisoned");
        s.empty_until = None;
        s.short = d.granted < ask;
        s.capacity = d.capacity;
        Some(Held {
            granted: d.granted,
            used: 0,
            taken: (sent, done),
            ends: done + self.policy.lifetime,
            reservation: r,
        })
    }

    /// How many tokens to ask for: about one lifetime of this key's recent rate (at least four
    /// decisions' worth), at most the policy's slice and share of the bucket, at least `cost`;
    /// only `cost` while the bucket is nearly empty.
    fn slice(&self, leases: &KeyLeases, cost: u32, capacity: f64) -> u32 {
        let s = leases.state.lock().expect("poisoned");
        if s.short {
            return cost;
        }
        let p = &self.policy;
        let wanted = (s.rate * p.lifetime.as_secs_f64() * 1.5)
            .ceil()
            .max(f64::from(cost) * 4.0);
        // The bucket's size: as asked, else as sluicegate last said (0: the server's default,
        // unknown until the first answer).
        let size = if capacity > 0.0 { capacity } else { s.capacity };
        let mut most = f64::from(p.max_slice);
        if size > 0.0 {
            most = most.min((size * p.max_fraction).floor());
        }
        wanted.min(most).max(f64::from(cost)) as u32
    }

    /// A lease is settled when it ends: its reservation outlives that by the Settle's own trip.
    fn reservation_ttl(&self) -> Duration {
        self.policy.lifetime * 2 + Duration::from_secs(5)
    }

    /// The next lease, fetched in the background while the current one still answers.
    fn fetch_later(self: &Arc<Self>, leases: Arc<KeyLeases>, req: &Request<'_>, cost: u32) {
        let me = self.clone();
        let (key, capacity, rate) = (req.key.to_string(), req.capacity, req.rate);
        self.background(async move {
            let _turn = leases.fetch.lock().await;
            let ask = me.slice(&leases, cost, capacity);
            let sent = Instant::now();
            me.stats.calls.fetch_add(1, Relaxed);
            let req = Request {
                key: &key,
                cost: ask,
                capacity,
                rate,
                dry_run: false,
                up_to: true,
            };
            let r = me.client.reserve(req, me.reservation_ttl()).await;
            let held = r.ok().and_then(|r| me.held(r, ask, sent, &leases));
            let old = {
                let mut s = leases.state.lock().expect("poisoned");
                s.fetching = false;
                match held {
                    Some(h) => s.next.replace(h),
                    None => None,
                }
            };
            if let Some(old) = old {
                me.settle(old).await;
            }
        });
    }

    fn settle_later(self: &Arc<Self>, h: Held) {
        let me = self.clone();
        self.background(async move { me.settle(h).await });
    }

    /// Returns when no fetch or settle runs in the background.
    async fn wait_idle(&self) {
        loop {
            let idle = self.idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            if self.pending.load(Relaxed) == 0 {
                return;
            }
            idle.await;
        }
    }

    /// Runs `work` on its own task, counted in `pending` until it ends.
    fn background(self: &Arc<Self>, work: impl std::future::Future<Output = ()> + Send + 'static) {
        self.pending.fetch_add(1, Relaxed);
        let me = self.clone();
        tokio::spawn(async move {
            work.await;
            if me.pending.fetch_sub(1, Relaxed) == 1 {
                me.idle.notify_waiters();
            }
        });
    }

    /// Gives back what `h` did not spend (nothing to do when all was spent: the reservation
    /// expires).
    async fn settle(&self, h: Held) {
        if h.used >= h.granted {
            return;
        }
        self.stats.calls.fetch_add(1, Relaxed);
        let settled = self
            .client
            .settle_reservation(&h.reservation, u64::from(h.used))
            .await;
        if settled.is_ok() {
            self.stats.returned.fetch_add(u64::from(h.left()), Relaxed);
        }
    }
}

/// The error sluicegate gives a plain take whose cost exceeds the bucket's capacity.
fn above_capacity(cost: u32, capacity: f64) -> Error {
    Error::Rejected {
        code: tonic::Code::InvalidArgument,
        message: format!(
            "cost: {cost} exceeds the bucket capacity {capacity} and could never be allowed"
        ),
    }
}

/// The rate a key's leases are spent at: an average weighted towards the lease just retired.
fn spent_rate(before: f64, h: &Held, now: Instant) -> f64 {
    let lived = now
        .saturating_duration_since(h.taken.1)
        .as_secs_f64()
        .max(1e-3);
    let rate = f64::from(h.used) / lived;
    if before == 0.0 {
        rate
    } else {
        0.5 * before + 0.5 * rate
    }
}
