//! The quota state of one replica: the Envoy streams open here, each one's buckets with their
//! latest demand and the assignment last sent, and each rule bucket's demand over the fleet as
//! the last exchange told it.
//!
//! Three things change it, each under one short lock (never held across an `.await`):
//! - a report: the stream's buckets are matched to rules (new ones at once), their demand
//!   measured, and every reported bucket answered with its assignment (which refreshes the TTL);
//! - an exchange (every [`EXCHANGE_EVERY`]): this replica's demand per rule bucket is published,
//!   the fleet's read back, and the buckets whose share moved past the hysteresis are pushed
//!   their new assignment; idle buckets are abandoned, and a rules reload re-matches every bucket;
//! - a stream's end: its buckets leave the fleet at the next exchange.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use sluicegate_core::quota::{Fleet, TokenBucket, counted_demand, share};
use sluicegate_core::rules::{Limit, Rule, RuleSet, RulesHandle};
use sluicegate_proto::envoy::service::rate_limit_quota::v3::{
    BucketId, RateLimitQuotaResponse, RateLimitQuotaUsageReports,
    rate_limit_quota_response::BucketAction, rate_limit_quota_usage_reports::BucketQuotaUsage,
};
use tokio::sync::mpsc;

use super::assign::{Assignment, abandon, assign};
use crate::telemetry::{Activity, DecisionMetrics, names};

/// How often this replica exchanges demand with the others and rebalances.
pub const EXCHANGE_EVERY: Duration = Duration::from_secs(1);
/// How long a replica's published demand counts without a new exchange.
pub const PUBLISHED_TTL: Duration = Duration::from_secs(5);
/// Envoy 1.40 reports every 5 s whatever its configuration says; until a stream shows its own
/// cadence, assume that.
const DEFAULT_REPORT_EVERY: Duration = Duration::from_secs(5);
/// Assignments live this many report intervals, so one lost report does not expire them.
const TTL_REPORTS: u32 = 3;
const MIN_TTL: Duration = Duration::from_secs(15);
const MAX_TTL: Duration = Duration::from_secs(600);
/// A bucket with no requests for this long is abandoned: Envoy forgets it, and so do we.
const IDLE_ABANDON: Duration = Duration::from_secs(60);
/// Reports closer together than this measure noise, not a rate.
const MIN_ELAPSED: Duration = Duration::from_millis(200);
/// The most buckets one replica tracks. Past it a new bucket is still assigned, a floor share of
/// its rule (as an idle participant gets), but not tracked: bucket ids carry request attributes,
/// and their number is the Envoys' clients' to choose.
pub const MAX_TRACKED: usize = 100_000;
/// Responses waiting to be written to one stream; a stream that does not read them misses
/// pushes (its next report is answered in full).
pub const STREAM_BUFFER: usize = 64;

pub type Outbox = mpsc::Sender<Result<RateLimitQuotaResponse, tonic::Status>>;

/// The buckets' pairs in key order: one Envoy bucket, whatever order its pairs came in.
type Pairs = Vec<(Vec<u8>, Vec<u8>)>;

/// What a matched bucket gets.
#[derive(Clone)]
enum Policy {
    /// No rule matched: ALLOW_ALL, counted.
    Unmatched,
    /// `unlimited`, a `concurrency` rule (not for quota), or 0 per unit.
    Blanket(Arc<Rule>, Assignment),
    /// A share of the rule's bucket, whose fleet key is `key`; with `shadow_mode`, ALLOW_ALL
    /// while the would-be denials are counted.
    Share { rule: Arc<Rule>, key: String },
}

struct Participant {
    id: BucketId,
    policy: Policy,
    /// Requests per second, allowed plus denied, from the latest report.
    demand: f64,
    /// The demand this participant is counted with in its rule bucket's fleet (as published, or
    /// since): a share replaces it with the latest.
    in_fleet: f64,
    last_report: Instant,
    /// When it last had a request; None while it has.
    idle_since: Option<Instant>,
    sent: Option<Assignment>,
}

impl Participant {
    fn new(id: BucketId, policy: Policy, now: Instant) -> Self {
        Participant {
            id,
            policy,
            demand: f64::NAN,
            in_fleet: 0.0,
            last_report: now,
            idle_since: None,
            sent: None,
        }
    }
}

/// What the buckets of one report share.
struct Reported<'a> {
    now: Instant,
    stale: bool,
    ttl: Duration,
    rules: Option<&'a Arc<RuleSet>>,
    buckets: &'a mut HashMap<String, RuleBucket>,
    tracked: &'a mut usize,
}

struct Stream {
    peer: String,
    domain: String,
    outbox: Outbox,
    opened: Instant,
    last_report: Option<Instant>,
    report_every: Duration,
    buckets: HashMap<Pairs, Participant>,
}

impl Stream {
    fn ttl(&self) -> Duration {
        (self.report_every * TTL_REPORTS).clamp(MIN_TTL, MAX_TTL)
    }

    /// Forgets the buckets idle for [`IDLE_ABANDON`] (their abandon actions are returned, to
    /// send) and those its Envoy stopped reporting (a stream open but silent past an
    /// assignment's TTL), which leave the fleet so the others get their share back. Returns the
    /// actions and how many buckets went.
    fn drop_idle(&mut self, now: Instant) -> (Vec<BucketAction>, usize) {
        let silent_after = self.ttl();
        let before = self.buckets.len();
        let mut abandoned = Vec::new();
        self.buckets.retain(|_, p| {
            let idle = p
                .idle_since
                .is_some_and(|t| now.duration_since(t) >= IDLE_ABANDON);
            if idle {
                abandoned.push(abandon(&p.id));
            }
            !idle && now.saturating_duration_since(p.last_report) <= silent_after
        });
        (abandoned, before - self.buckets.len())
    }
}

/// A rule bucket as this replica knows the fleet's demand for it.
#[derive(Default)]
struct RuleBucket {
    /// The fleet at the last exchange.
    fleet: Option<Fleet>,
    /// Participants that arrived since (their counted demand), so a new Envoy's share at once
    /// accounts for it.
    since: Fleet,
    /// Published with participants at the last exchange (so it must be withdrawn when none is
    /// left).
    published: bool,
}

impl RuleBucket {
    fn fleet(&self) -> Fleet {
        let f = self.fleet.unwrap_or_default();
        Fleet {
            demand: f.demand + self.since.demand,
            participants: f.participants + self.since.participants,
        }
    }
}

struct State {
    streams: HashMap<u64, Stream>,
    buckets: HashMap<String, RuleBucket>,
    tracked: usize,
    rules: Option<Arc<RuleSet>>,
    /// The last exchange that succeeded (at first, the start): shares older than an
    /// assignment's TTL are not sent.
    exchanged: Instant,
}

/// One replica's quota state, shared by the streams and the exchange task.
pub struct Quotas {
    state: Mutex<State>,
    rules: Arc<RulesHandle>,
    /// The fleet keys' prefix: a Redis hash tag, so one exchange is one script call on one node.
    prefix: String,
    /// This process's id among the replicas.
    pub replica: String,
    next_stream: std::sync::atomic::AtomicU64,
    decisions: DecisionMetrics,
    activity: Arc<Activity>,
}

/// A stream's buckets to push, and where.
pub type Pushes = Vec<(Outbox, RateLimitQuotaResponse)>;

impl Quotas {
    /// `key_prefix` is RLS_KEY_PREFIX: fleet keys live beside the Envoy API's buckets.
    pub fn new(rules: Arc<RulesHandle>, key_prefix: &str, activity: Arc<Activity>) -> Self {
        Self {
            state: Mutex::new(State {
                streams: HashMap::new(),
                buckets: HashMap::new(),
                tracked: 0,
                rules: None,
                exchanged: Instant::now(),
            }),
            rules,
            prefix: format!("{{{key_prefix}rlqs}}"),
            replica: format!("{:016x}", rand::random::<u64>()),
            next_stream: Default::default(),
            decisions: DecisionMetrics::new("rlqs", activity.clone()),
            activity,
        }
    }

    /// Registers a stream from `peer`; its responses go to `outbox`.
    pub fn open(&self, peer: String, outbox: Outbox) -> u64 {
        let id = self
            .next_stream
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut state = self.state.lock();
        state.streams.insert(
            id,
            Stream {
                peer,
                domain: String::new(),
                outbox,
                opened: Instant::now(),
                last_report: None,
                report_every: DEFAULT_REPORT_EVERY,
                buckets: HashMap::new(),
            },
        );
        metrics::gauge!(names::RLQS_STREAMS).set(state.streams.len() as f64);
        id
    }

    /// Forgets a stream; its buckets leave the fleet at the next exchange.
    pub fn close(&self, id: u64) {
        let mut state = self.state.lock();
        if let Some(stream) = state.streams.remove(&id) {
            state.tracked -= stream.buckets.len();
        }
        metrics::gauge!(names::RLQS_STREAMS).set(state.streams.len() as f64);
        metrics::gauge!(names::RLQS_BUCKETS).set(state.tracked as f64);
    }

    /// Takes one report of stream `id`: every bucket in it is answered with its assignment (None
    /// when none is to be sent: shares gone stale while the backend is down).
    pub fn report(
        &self,
        id: u64,
        reports: RateLimitQuotaUsageReports,
    ) -> Option<RateLimitQuotaResponse> {
        let now = Instant::now();
        let rules = self.rules.current();
        let mut guard = self.state.lock();
        let state = &mut *guard;
        let stream = state.streams.get_mut(&id)?;
        if !reports.domain.is_empty() {
            stream.domain = reports.domain;
        }
        stream.last_report = Some(now);
        // The stream's cadence: the gap between two reports of one bucket (first reports of new
        // buckets come between the periodic ones, so the gap between any two reports says
        // nothing).
        let cadence = reports
            .bucket_quota_usages
            .iter()
            .filter_map(|u| stream.buckets.get(&pairs(u.bucket_id.as_ref()?)))
            .map(|p| now.saturating_duration_since(p.last_report))
            .max();
        if let Some(gap) = cadence.filter(|g| *g >= Duration::from_secs(1)) {
            stream.report_every = gap;
        }
        let mut at = Reported {
            now,
            stale: stale(state.exchanged, now),
            ttl: stream.ttl(),
            rules: rules.as_ref(),
            buckets: &mut state.buckets,
            tracked: &mut state.tracked,
        };
        let actions: Vec<_> = reports
            .bucket_quota_usages
            .into_iter()
            .filter_map(|usage| self.answer(stream, &mut at, usage))
            .collect();
        metrics::gauge!(names::RLQS_BUCKETS).set(state.tracked as f64);
        (!actions.is_empty()).then_some(RateLimitQuotaResponse {
            bucket_action: actions,
        })
    }

    /// One bucket of a report: matched (when new), measured, counted, and answered.
    fn answer(
        &self,
        stream: &mut Stream,
        at: &mut Reported<'_>,
        usage: BucketQuotaUsage,
    ) -> Option<BucketAction> {
        let id = usage.bucket_id.clone()?;
        let pairs = pairs(&id);
        // Envoy 1.40 cannot read an assignment naming bytes that are not UTF-8: it fails the
        // whole message and resets the stream, and with it every bucket's assignment. Such a
        // bucket (a header value an attacker chose) gets no answer, so the others keep theirs;
        // the Envoy config's matcher should keep such values out of its buckets.
        if pairs.is_empty() || !utf8(&pairs) {
            metrics::counter!(names::REFUSED, "api" => "rlqs", "reason" => "not_utf8")
                .increment(u64::from(!pairs.is_empty()));
            return None;
        }
        if !stream.buckets.contains_key(&pairs) && *at.tracked >= MAX_TRACKED {
            let policy = self.policy(at.rules.map(|r| &**r), &stream.domain, &pairs);
            self.count(&policy, &stream.domain, &usage, None, at.rules);
            return Some(assign(&id, untracked(&policy), at.ttl));
        }
        let p = match stream.buckets.entry(pairs) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                let policy = self.policy(at.rules.map(|r| &**r), &stream.domain, e.key());
                *at.tracked += 1;
                e.insert(Participant::new(id, policy, at.now))
            }
        };
        let would_deny = measure(p, &usage, at.now, at.buckets);
        self.count(&p.policy, &stream.domain, &usage, would_deny, at.rules);
        let a = assignment(p, at.buckets, at.stale)?;
        p.sent = Some(a);
        count_assignment(&p.policy);
        Some(assign(&p.id, a, at.ttl))
    }

    /// The rule a bucket gets in `domain`, and what it means for quota.
    fn policy(&self, rules: Option<&RuleSet>, domain: &str, pairs: &Pairs) -> Policy {
        let Some(m) = rules.and_then(|r| r.lookup_bucket(&self.prefix, domain, pairs)) else {
            return Policy::Unmatched;
        };
        match m.rule.limit {
            Limit::Bucket { .. } => Policy::Share {
                rule: m.rule,
                key: m.key,
            },
            Limit::Blocked { .. } => Policy::Blanket(m.rule, Assignment::DenyAll),
            Limit::Unlimited | Limit::InFlight { .. } => {
                Policy::Blanket(m.rule, Assignment::AllowAll)
            }
        }
    }

    /// Counts a report's requests per API, rule and result, under the rules the report was
    /// matched with.
    fn count(
        &self,
        policy: &Policy,
        domain: &str,
        usage: &BucketQuotaUsage,
        would_deny: Option<u64>,
        rules: Option<&Arc<RuleSet>>,
    ) {
        let (allowed, denied) = (usage.num_requests_allowed, usage.num_requests_denied);
        self.decisions.count_many(true, allowed);
        self.decisions.count_many(false, denied);
        let (domain, rule) = labels(policy, domain, rules.map(|r| &**r));
        for (result, n) in [("allowed", allowed), ("denied", denied)] {
            if n > 0 {
                metrics::counter!(names::RLQS_REPORTS, "domain" => domain.clone(), "rule" => rule.clone(), "result" => result).increment(n);
            }
        }
        let (Policy::Share { rule, .. } | Policy::Blanket(rule, _)) = policy else {
            return;
        };
        let Some(set) = rules else {
            return;
        };
        let per_rule = self.activity.rule_metrics(set);
        let Some(m) = per_rule
            .metrics
            .get(rule.id)
            .filter(|_| Arc::ptr_eq(&per_rule.set, set))
        else {
            return;
        };
        if allowed > 0 {
            m.record(true, false, allowed, None, false);
        }
        if denied > 0 {
            m.record(false, false, denied, None, false);
        }
        if let Some(n) = would_deny.filter(|&n| n > 0) {
            m.record(false, true, n, None, false);
        }
    }

    /// This replica's demand per rule bucket, to publish; re-matches every bucket after a rules
    /// reload and drops idle buckets first (their abandon actions are returned to be sent).
    pub fn demand(&self) -> (Vec<(String, f64, u32)>, Pushes) {
        let now = Instant::now();
        let rules = self.rules.current();
        let mut guard = self.state.lock();
        let state = &mut *guard;
        let reloaded = match (&state.rules, &rules) {
            (Some(a), Some(b)) => !Arc::ptr_eq(a, b),
            (None, None) => false,
            _ => true,
        };
        state.rules = rules.clone();
        let mut pushes = Vec::new();
        let mut sums: HashMap<String, (f64, u32)> = HashMap::new();
        for stream in state.streams.values_mut() {
            let (abandoned, dropped) = stream.drop_idle(now);
            state.tracked -= dropped;
            if !abandoned.is_empty() {
                let (domain, _) = labels(&Policy::Unmatched, &stream.domain, rules.as_deref());
                metrics::counter!(names::RLQS_ASSIGNMENTS, "domain" => domain, "rule" => "abandon")
                    .increment(abandoned.len() as u64);
                pushes.push((
                    stream.outbox.clone(),
                    RateLimitQuotaResponse {
                        bucket_action: abandoned,
                    },
                ));
            }
            for (pairs, p) in &mut stream.buckets {
                if reloaded {
                    p.policy = self.policy(rules.as_deref(), &stream.domain, pairs);
                    p.sent = None;
                }
                if let Policy::Share { rule, key } = &p.policy {
                    let shape = bucket_shape(rule);
                    let sum = sums.entry(key.clone()).or_default();
                    p.in_fleet = counted_demand(known(p.demand), shape);
                    sum.0 += p.in_fleet;
                    sum.1 += 1;
                }
            }
        }
        for (key, bucket) in &mut state.buckets {
            bucket.since = Fleet::default();
            if bucket.published && !sums.contains_key(key) {
                sums.insert(key.clone(), (0.0, 0));
            }
        }
        metrics::gauge!(names::RLQS_BUCKETS).set(state.tracked as f64);
        let demand = sums.into_iter().map(|(k, (d, n))| (k, d, n)).collect();
        (demand, pushes)
    }

    /// Takes the fleet's demand per rule bucket (None: the exchange failed; shares stand until
    /// they go stale) and returns the assignments that moved past the hysteresis, to push.
    pub fn rebalance(&self, fleets: Option<Vec<(String, u32, Fleet)>>) -> Pushes {
        let now = Instant::now();
        let mut guard = self.state.lock();
        let state = &mut *guard;
        if let Some(fleets) = fleets {
            state.exchanged = now;
            for (key, published, fleet) in fleets {
                // No Envoy of this replica is in it any more: nothing to keep.
                if published == 0 {
                    state.buckets.remove(&key);
                    continue;
                }
                let bucket = state.buckets.entry(key).or_default();
                bucket.fleet = Some(fleet);
                bucket.published = published > 0;
            }
        }
        let stale = stale(state.exchanged, now);
        let mut pushes = Vec::new();
        for stream in state.streams.values_mut() {
            let ttl = stream.ttl();
            let mut actions = Vec::new();
            for p in stream.buckets.values_mut() {
                let Some(a) = assignment(p, &state.buckets, stale) else {
                    continue;
                };
                if p.sent.is_some_and(|sent| sent.keeps(&a)) {
                    continue;
                }
                p.sent = Some(a);
                actions.push(assign(&p.id, a, ttl));
                count_assignment(&p.policy);
            }
            if !actions.is_empty() {
                pushes.push((
                    stream.outbox.clone(),
                    RateLimitQuotaResponse {
                        bucket_action: actions,
                    },
                ));
            }
        }
        pushes
    }

    /// The streams open here, with each one's busiest buckets (at most `per_stream`): what the
    /// status page lists.
    pub fn snapshot(&self, per_stream: usize) -> Vec<StreamView> {
        let now = Instant::now();
        let state = self.state.lock();
        let mut views: Vec<StreamView> = state
            .streams
            .values()
            .map(|s| {
                let mut buckets: Vec<BucketView> = s
                    .buckets
                    .iter()
                    .map(|(pairs, p)| bucket_view(pairs, p))
                    .collect();
                buckets.sort_by(|a, b| b.demand.total_cmp(&a.demand));
                let total = buckets.len();
                buckets.truncate(per_stream);
                StreamView {
                    peer: s.peer.clone(),
                    domain: s.domain.clone(),
                    open_s: now.duration_since(s.opened).as_secs(),
                    report_every_s: s.report_every.as_secs_f64(),
                    total_buckets: total,
                    buckets,
                }
            })
            .collect();
        views.sort_by(|a, b| a.peer.cmp(&b.peer));
        views
    }
}

/// One stream, for the status page.
#[derive(Debug, serde::Serialize)]
pub struct StreamView {
    pub peer: String,
    pub domain: String,
    pub open_s: u64,
    pub report_every_s: f64,
    pub total_buckets: usize,
    pub buckets: Vec<BucketView>,
}

/// One bucket of a stream, for the status page.
#[derive(Debug, serde::Serialize)]
pub struct BucketView {
    /// `key=value` pairs, in key order (values are shown as the page shows keys).
    pub pairs: Vec<(String, String)>,
    pub rule: Option<String>,
    pub demand: f64,
    pub assignment: Option<&'static str>,
    /// The share of a token-bucket assignment, tokens per second, and its depth.
    pub rate: Option<f64>,
    pub max_tokens: Option<u32>,
}

fn bucket_view(pairs: &Pairs, p: &Participant) -> BucketView {
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    let rule = match &p.policy {
        Policy::Unmatched => None,
        Policy::Blanket(rule, _) | Policy::Share { rule, .. } => Some(rule.label.clone()),
    };
    let (rate, max_tokens) = match p.sent {
        Some(Assignment::Bucket(b)) => (Some(b.rate()), Some(b.max_tokens)),
        _ => (None, None),
    };
    BucketView {
        pairs: pairs.iter().map(|(k, v)| (text(k), text(v))).collect(),
        rule,
        demand: known(p.demand),
        assignment: p.sent.map(|a| a.kind()),
        rate,
        max_tokens,
    }
}

fn utf8(pairs: &Pairs) -> bool {
    pairs
        .iter()
        .all(|(k, v)| std::str::from_utf8(k).is_ok() && std::str::from_utf8(v).is_ok())
}

/// A bucket id's pairs in key order.
fn pairs(id: &BucketId) -> Pairs {
    let mut pairs: Pairs = id
        .bucket
        .iter()
        .map(|e| (e.key.clone(), e.value.clone()))
        .collect();
    pairs.sort();
    // A map has one value per key; a repeated key on the wire means the last one.
    pairs.dedup_by(|later, earlier| {
        if later.0 == earlier.0 {
            std::mem::swap(later, earlier);
            true
        } else {
            false
        }
    });
    pairs
}

/// Updates a participant's demand from its report, and its rule bucket's count of new
/// participants. Returns the requests a shadow-mode rule would have denied.
fn measure(
    p: &mut Participant,
    usage: &BucketQuotaUsage,
    now: Instant,
    buckets: &mut HashMap<String, RuleBucket>,
) -> Option<u64> {
    let count = usage.num_requests_allowed + usage.num_requests_denied;
    if count > 0 {
        p.idle_since = None;
    } else if p.idle_since.is_none() {
        p.idle_since = Some(now);
    }
    let first = p.demand.is_nan();
    // Envoy's own figure is in whole seconds (0 on a bucket's first report): ours is finer.
    let elapsed = if first {
        usage
            .time_elapsed
            .map(|d| Duration::new(d.seconds.max(0) as u64, 0))
            .filter(|d| *d >= MIN_ELAPSED)
    } else {
        Some(now.saturating_duration_since(p.last_report)).filter(|d| *d >= MIN_ELAPSED)
    };
    p.last_report = now;
    let Policy::Share { rule, key } = &p.policy else {
        p.demand = elapsed.map_or(0.0, |e| count as f64 / e.as_secs_f64());
        return None;
    };
    let shape = bucket_shape(rule);
    let bucket = buckets.entry(key.clone()).or_default();
    match elapsed {
        Some(e) => p.demand = count as f64 / e.as_secs_f64(),
        None if first => {
            // A new Envoy bucket has told us one request: until its next report, count it
            // with the fleet's mean demand, so its share is fair from the start.
            let f = bucket.fleet();
            p.demand = if f.participants > 0 {
                f.demand / f64::from(f.participants)
            } else {
                count as f64
            };
        }
        None => {}
    }
    if first {
        p.in_fleet = counted_demand(p.demand, shape);
        bucket.since.demand += p.in_fleet;
        bucket.since.participants += 1;
    }
    // Shadow mode: what this Envoy's share would not have let through.
    rule.shadow_mode.then(|| {
        let rate = share_of(p, bucket, shape);
        let allowed_in = rate * elapsed.map_or(0.0, |e| e.as_secs_f64()) + shape.capacity();
        (count as f64 - allowed_in).max(0.0) as u64
    })
}

/// The assignment for a participant now; None for a share when the fleet's demand is stale (the
/// Envoy's assignment then runs to its TTL, and its `expired_assignment_behavior` takes over).
fn assignment(
    p: &Participant,
    buckets: &HashMap<String, RuleBucket>,
    stale: bool,
) -> Option<Assignment> {
    match &p.policy {
        Policy::Unmatched => Some(Assignment::AllowAll),
        Policy::Blanket(_, a) => Some(*a),
        Policy::Share { rule, .. } if rule.shadow_mode => Some(Assignment::AllowAll),
        Policy::Share { .. } if stale => None,
        Policy::Share { rule, key } => {
            let shape = bucket_shape(rule);
            let rate = match buckets.get(key) {
                Some(bucket) => share_of(p, bucket, shape),
                None => share(
                    counted_demand(known(p.demand), shape),
                    Fleet::default(),
                    shape,
                ),
            };
            Some(Assignment::Bucket(TokenBucket::for_share(rate, shape)))
        }
    }
}

/// A participant's share of its rule bucket, its latest demand in place of the one the fleet
/// counts it with (its own report must not find it competing with its former self).
fn share_of(p: &Participant, bucket: &RuleBucket, shape: sluicegate_core::Shape) -> f64 {
    let demand = counted_demand(known(p.demand), shape);
    let mut fleet = bucket.fleet();
    fleet.demand = (fleet.demand - p.in_fleet).max(0.0) + demand;
    share(demand, fleet, shape)
}

/// A bucket past [`MAX_TRACKED`]: a floor share, never more.
fn untracked(policy: &Policy) -> Assignment {
    match policy {
        Policy::Unmatched => Assignment::AllowAll,
        Policy::Blanket(_, a) => *a,
        Policy::Share { rule, .. } if rule.shadow_mode => Assignment::AllowAll,
        Policy::Share { rule, .. } => {
            let shape = bucket_shape(rule);
            let floor = counted_demand(0.0, shape);
            Assignment::Bucket(TokenBucket::for_share(floor, shape))
        }
    }
}

fn bucket_shape(rule: &Rule) -> sluicegate_core::Shape {
    match rule.limit {
        Limit::Bucket { shape, .. } => shape,
        // Only Share policies ask, and they hold bucket rules.
        _ => unreachable!("a quota share of a rule without a bucket"),
    }
}

/// Whether shares may no longer be sent: the fleet's demand was last heard longer ago than the
/// shortest assignment TTL.
fn stale(exchanged: Instant, now: Instant) -> bool {
    now.saturating_duration_since(exchanged) > MIN_TTL
}

/// A demand not yet measured counts as none.
fn known(demand: f64) -> f64 {
    if demand.is_nan() { 0.0 } else { demand }
}

/// The metric labels of a bucket's rule: bounded by the rules files, never by traffic. A
/// stream's domain is a label only when it has rules (any client may open a stream).
fn labels(policy: &Policy, domain: &str, rules: Option<&RuleSet>) -> (String, String) {
    match policy {
        Policy::Unmatched => {
            let known = rules.is_some_and(|r| r.domains().any(|d| d == domain));
            let domain = if known { domain } else { "other" };
            (domain.to_string(), "unmatched".to_string())
        }
        Policy::Blanket(rule, _) | Policy::Share { rule, .. } => {
            (rule.domain.clone(), rule.label.clone())
        }
    }
}

fn count_assignment(policy: &Policy) {
    let (domain, rule) = labels(policy, "", None);
    let domain = if matches!(policy, Policy::Unmatched) {
        "any".to_string()
    } else {
        domain
    };
    metrics::counter!(names::RLQS_ASSIGNMENTS, "domain" => domain, "rule" => rule).increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluicegate_core::rules::parse_text;
    use sluicegate_proto::envoy::service::rate_limit_quota::v3::{
        bucket_id::BucketEntry, rate_limit_quota_response::bucket_action,
    };
    use sluicegate_proto::envoy::r#type::v3::rate_limit_strategy::Strategy;

    const RULES: &str = "domain: quota\ndescriptors:\n  - key: name\n    value: edge\n    rate_limit: { unit: second, requests_per_unit: 100 }\n";

    fn replica() -> (
        Quotas,
        u64,
        mpsc::Receiver<Result<RateLimitQuotaResponse, tonic::Status>>,
    ) {
        let rules = Arc::new(RulesHandle::fixed(parse_text("q.yaml", RULES).unwrap()));
        let quotas = Quotas::new(rules, "tb:rls:", Arc::new(Activity::default()));
        let (tx, rx) = mpsc::channel(8);
        let id = quotas.open("127.0.0.1:1".into(), tx);
        (quotas, id, rx)
    }

    /// A first report of the edge bucket: `requests` over the 5 s Envoy says elapsed.
    fn report(requests: u64) -> RateLimitQuotaUsageReports {
        RateLimitQuotaUsageReports {
            domain: "quota".into(),
            bucket_quota_usages: vec![BucketQuotaUsage {
                bucket_id: Some(BucketId {
                    bucket: vec![BucketEntry {
                        key: b"name".to_vec(),
                        value: b"edge".to_vec(),
                    }],
                }),
                time_elapsed: Some(prost_types::Duration {
                    seconds: 5,
                    nanos: 0,
                }),
                num_requests_allowed: requests / 4,
                num_requests_denied: requests - requests / 4,
            }],
        }
    }

    fn rate(r: &RateLimitQuotaResponse) -> f64 {
        let Some(bucket_action::BucketAction::QuotaAssignmentAction(q)) =
            &r.bucket_action[0].bucket_action
        else {
            panic!("not an assignment")
        };
        let Some(Strategy::TokenBucket(t)) = &q.rate_limit_strategy.as_ref().unwrap().strategy
        else {
            panic!("not a token bucket")
        };
        f64::from(t.tokens_per_fill.unwrap()) / t.fill_interval.unwrap().seconds as f64
    }

    /// What a shared backend would answer both replicas: the sum of what each published.
    fn fleet(all: &[&[(String, f64, u32)]]) -> Vec<(String, u32, Fleet)> {
        let mut out = Vec::new();
        for (key, _, n) in all[0] {
            let (demand, participants) = all
                .iter()
                .flat_map(|d| d.iter().filter(|(k, _, _)| k == key))
                .fold((0.0, 0), |(d, p), (_, dd, pp)| (d + dd, p + pp));
            out.push((
                key.clone(),
                *n,
                Fleet {
                    demand,
                    participants,
                },
            ));
        }
        out
    }

    #[test]
    fn two_replicas_split_the_rate_by_demand() {
        let (a, a_id, mut a_rx) = replica();
        let (b, b_id, mut b_rx) = replica();
        // Each alone at first: the whole rate, until the exchange.
        let first_a = a.report(a_id, report(1_500)).unwrap();
        let first_b = b.report(b_id, report(500)).unwrap();
        assert!((rate(&first_a) - 100.0).abs() < 0.1, "{}", rate(&first_a));
        assert!((rate(&first_b) - 100.0).abs() < 0.1);

        let (da, _) = a.demand();
        let (db, _) = b.demand();
        assert_eq!(da.len(), 1);
        assert!(
            da[0].0.starts_with("{tb:rls:rlqs}"),
            "one hash tag: {}",
            da[0].0
        );
        for (q, mine, theirs) in [(&a, &da, &db), (&b, &db, &da)] {
            for (outbox, response) in q.rebalance(Some(fleet(&[mine, theirs]))) {
                outbox.try_send(Ok(response)).unwrap();
            }
        }
        let pushed_a = rate(&a_rx.try_recv().unwrap().unwrap());
        let pushed_b = rate(&b_rx.try_recv().unwrap().unwrap());
        assert!((pushed_a - 75.0).abs() < 0.1, "A's share {pushed_a}");
        assert!((pushed_b - 25.0).abs() < 0.1, "B's share {pushed_b}");
        // An unchanged share is not pushed again (Envoy would rebuild its bucket).
        let (da, _) = a.demand();
        let (db, _) = b.demand();
        assert!(a.rebalance(Some(fleet(&[&da, &db]))).is_empty());

        // B's Envoy leaves: A gets the whole rate at the next exchange.
        b.close(b_id);
        let (db, _) = b.demand();
        assert_eq!(
            db,
            vec![(da[0].0.clone(), 0.0, 0)],
            "B withdraws its figures"
        );
        let (da, _) = a.demand();
        let pushes = a.rebalance(Some(fleet(&[&da, &db])));
        assert_eq!(pushes.len(), 1);
        assert!((rate(&pushes[0].1) - 100.0).abs() < 0.1);
    }

    #[test]
    fn a_bucket_id_that_is_not_utf8_gets_no_answer() {
        let (a, id, _rx) = replica();
        let mut r = report(10);
        r.bucket_quota_usages[0].bucket_id = Some(BucketId {
            bucket: vec![BucketEntry {
                key: b"name".to_vec(),
                value: b"\xff".to_vec(),
            }],
        });
        assert!(a.report(id, r).is_none());
        assert!(a.snapshot(10)[0].buckets.is_empty());
    }
}
