//! From a request to a plan: the checks Envoy's proto validation would make, the bounds, the rule
//! each descriptor matches, and the bucket operations to send to the backend.

use std::{fmt::Write as _, sync::Arc};

use super::EnvoySettings;
use crate::api::ApiError;
use sluicegate_core::backend::BucketRequest;
use sluicegate_core::rules::{
    ACQUIRE_ENTRY, Limit, RELEASE_ENTRY, Rule, RuleSet, Unit, descriptor_key,
};
use sluicegate_core::{Ask, LeaseOp, Op, Shape, lease_id_ok};
use sluicegate_proto::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use sluicegate_proto::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::RateLimitOverride;
use sluicegate_proto::envoy::service::ratelimit::v3::{
    RateLimitRequest,
    rate_limit_response::{RateLimit, rate_limit},
};
use sluicegate_proto::envoy::r#type::v3::RateLimitUnit;

/// What one descriptor needs, once matched.
pub(super) enum Planned {
    /// No rule, or a rule replaced by another: OK, no `current_limit`.
    Free,
    /// Past sluicegate's bounds (MAX_DESCRIPTORS, entries per descriptor): OVER_LIMIT without any
    /// evaluation. Failing closed: Envoy lets an errored call through, so an error would be a bypass.
    Refused,
    /// An `unlimited` rule: OK, `limit_remaining` 2^32 - 1.
    Unlimited,
    /// `requests_per_unit: 0`: over the limit without touching a bucket, unless it gives hits back
    /// or asks about 0 hits (as envoyproxy/ratelimit answers them).
    Blocked {
        rule: Option<Arc<Rule>>,
        limit: RateLimit,
        unit: Unit,
        over: bool,
        hits: u64,
    },
    /// A token-bucket decision: `bucket` is its place in [`Plan::buckets`].
    Bucket {
        rule: Option<Arc<Rule>>,
        limit: RateLimit,
        bucket: usize,
    },
    /// A lease of a `concurrency` rule, acquired or released: `lease` is its place in
    /// [`Plan::leases`].
    Lease {
        rule: Arc<Rule>,
        limit: RateLimit,
        lease: usize,
    },
}

impl Planned {
    pub fn rule(&self) -> Option<&Arc<Rule>> {
        match self {
            Planned::Blocked { rule, .. } | Planned::Bucket { rule, .. } => rule.as_ref(),
            Planned::Lease { rule, .. } => Some(rule),
            Planned::Free | Planned::Refused | Planned::Unlimited => None,
        }
    }

    /// A shadow-mode rule: decided and counted, never enforced.
    pub fn shadow(&self) -> bool {
        self.rule().is_some_and(|r| r.shadow_mode)
    }
}

/// One bucket operation of the request.
pub(super) struct PlannedBucket {
    pub key: String,
    /// Its `veto` is false for shadow rules: their denial vetoes none of the request's charges.
    pub ask: Ask,
}

impl PlannedBucket {
    /// The backend's request for this bucket (no reservation: Envoy never settles).
    pub fn request(&self) -> BucketRequest<'_> {
        BucketRequest {
            key: &self.key,
            ask: self.ask,
            reserve: None,
        }
    }
}

/// One lease operation of the request.
pub(super) struct PlannedLease {
    /// The rule's key (the descriptor without its `acquire`/`release` entry), `|in_flight` after.
    pub key: String,
    /// The `acquire`/`release` entry's value: the request's id.
    pub id: String,
    pub op: LeaseOp,
    /// A shadow rule's refusal refuses nothing.
    pub veto: bool,
    /// The rule's id (its metrics).
    pub rule: usize,
}

impl PlannedLease {
    pub fn acquires(&self) -> bool {
        matches!(self.op, LeaseOp::Acquire { .. })
    }
}

pub(super) struct Plan {
    /// One per descriptor, in order.
    pub entries: Vec<Planned>,
    pub buckets: Vec<PlannedBucket>,
    pub leases: Vec<PlannedLease>,
    /// Over the limit whatever the buckets answer (an enforced `requests_per_unit: 0` rule, or a
    /// request past the bounds).
    pub over_without_backend: bool,
    /// What was answered without being evaluated as asked, with the descriptor's index: counted
    /// and logged by the caller.
    pub refusals: Vec<(Refusal, usize)>,
}

/// Why part of a request was not evaluated as asked. Each is answered (never an error: Envoy lets
/// a failed call through) and counted in `sluicegate_refused_total{api="envoy",reason}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// More descriptors than MAX_DESCRIPTORS: the whole request is OVER_LIMIT.
    Descriptors,
    /// A descriptor with more entries than [`MAX_ENTRIES`]: the whole request is OVER_LIMIT.
    Entries,
    /// A descriptor with no entries: OK with no limit, as envoyproxy/ratelimit answers it.
    EmptyDescriptor,
    /// A `limit` override with ALLOW_CLIENT_SHAPES=false, or with a unit that does not exist: the
    /// rule answers instead.
    Override,
    /// `is_negative_hits` with ALLOW_REFUNDS=false: OK, nothing given back.
    Refund,
    /// A `concurrency` rule's descriptor without its `acquire`/`release` entry (the Envoy config
    /// does not name the request): OK, no lease; or an acquire whose id is empty, longer than 128
    /// bytes, not UTF-8 or with control characters: OVER_LIMIT.
    LeaseId,
}

impl Refusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Descriptors => "descriptors",
            Refusal::Entries => "entries",
            Refusal::EmptyDescriptor => "empty_descriptor",
            Refusal::Override => "override",
            Refusal::Refund => "refund",
            Refusal::LeaseId => "lease_id",
        }
    }

    pub const ALL: [Refusal; 6] = [
        Refusal::Descriptors,
        Refusal::Entries,
        Refusal::EmptyDescriptor,
        Refusal::Override,
        Refusal::Refund,
        Refusal::LeaseId,
    ];
}

/// The most entries one descriptor may have. Envoy's descriptors are a few levels deep; a rule
/// tree deeper than this could never match, and the bound keeps a request's work linear in its
/// size.
pub const MAX_ENTRIES: usize = 64;

/// Checks the request, matches every descriptor and plans its bucket operations. The only errors
/// are for requests Envoy never sends (no domain, no descriptors); everything a client of Envoy
/// can put in a descriptor is answered.
pub(super) fn plan(
    req: &RateLimitRequest,
    rules: Option<&RuleSet>,
    settings: &EnvoySettings,
) -> Result<Plan, ApiError> {
    validate(req)?;
    let mut plan = Plan {
        entries: Vec::with_capacity(req.descriptors.len()),
        buckets: Vec::new(),
        leases: Vec::new(),
        over_without_backend: false,
        refusals: Vec::new(),
    };
    if let Some(refusal) = out_of_bounds(req, settings) {
        plan.refusals.push(refusal);
        plan.entries
            .extend(req.descriptors.iter().map(|_| Planned::Refused));
        plan.over_without_backend = true;
        return Ok(plan);
    }

    // Match every descriptor first: `replaces` looks across the whole request.
    let matched = match_all(req, rules, settings);
    for (i, (d, m)) in req.descriptors.iter().zip(&matched.rules).enumerate() {
        let replaced = matched.replaced[i];
        let entry = plan.descriptor(i, d, m.clone(), replaced, req, settings);
        if let Planned::Blocked { over: true, .. } = &entry {
            plan.over_without_backend |= !entry.shadow();
        }
        plan.entries.push(entry);
    }
    Ok(plan)
}

/// Each descriptor's rule and bucket key, and whether another matched rule `replaces` it.
struct Matched {
    rules: Vec<Option<(Arc<Rule>, String)>>,
    replaced: Vec<bool>,
}

/// The rule of a descriptor ending in an `acquire` or `release` entry whose other entries match a
/// `concurrency` rule: the rule and its key. Any other descriptor matches as usual.
fn lease_rule(
    d: &RateLimitDescriptor,
    rules: &RuleSet,
    domain: &str,
    settings: &EnvoySettings,
) -> Option<(Arc<Rule>, String)> {
    let (last, head) = d.entries.split_last()?;
    if head.is_empty()
        || (last.key != ACQUIRE_ENTRY.as_bytes() && last.key != RELEASE_ENTRY.as_bytes())
    {
        return None;
    }
    let entries = head.iter().map(|e| (&e.key, &e.value));
    let m = rules.lookup(&settings.key_prefix, domain, entries)?;
    matches!(m.rule.limit, Limit::InFlight { .. }).then_some((m.rule, m.key))
}

fn match_all(req: &RateLimitRequest, rules: Option<&RuleSet>, settings: &EnvoySettings) -> Matched {
    let rules: Vec<Option<(Arc<Rule>, String)>> = req
        .descriptors
        .iter()
        .map(|d| {
            let rules = rules?;
            lease_rule(d, rules, &req.domain, settings).or_else(|| {
                let entries = d.entries.iter().map(|e| (&e.key, &e.value));
                rules
                    .lookup(&settings.key_prefix, &req.domain, entries)
                    .map(|m| (m.rule, m.key))
            })
        })
        .collect();
    let replaced = rules
        .iter()
        .map(|m| {
            m.as_ref()
                .and_then(|(rule, _)| rule.name.as_deref())
                .is_some_and(|name| {
                    rules
                        .iter()
                        .flatten()
                        .any(|(other, _)| other.replaces.iter().any(|r| r == name))
                })
        })
        .collect();
    Matched { rules, replaced }
}

impl Plan {
    /// Plans descriptor `i` of `req`, matched to `rule` (None: no rule).
    fn descriptor(
        &mut self,
        i: usize,
        d: &RateLimitDescriptor,
        rule: Option<(Arc<Rule>, String)>,
        replaced: bool,
        req: &RateLimitRequest,
        settings: &EnvoySettings,
    ) -> Planned {
        if d.entries.is_empty() {
            self.refusals.push((Refusal::EmptyDescriptor, i));
            return Planned::Free;
        }
        let Some(op) = operation(d, req.hits_addend, settings) else {
            self.refusals.push((Refusal::Refund, i));
            return Planned::Free;
        };
        if let Some(over) = &d.limit {
            match override_unit(over.unit).filter(|_| settings.allow_client_shapes) {
                Some(unit) => return self.overridden(d, over, unit, op, req, settings),
                None => self.refusals.push((Refusal::Override, i)),
            }
        }
        match rule {
            None => Planned::Free,
            Some(_) if replaced => Planned::Free,
            Some((rule, key)) => match rule.limit {
                Limit::InFlight { max, lease_ms } => {
                    self.lease(i, d, rule, key, max, lease_ms, settings)
                }
                _ => self.ruled(rule, key, op, settings),
            },
        }
    }

    /// A descriptor of a `concurrency` rule: its last entry acquires or releases the lease its
    /// value names. Without that entry the request has no lease to hold: OK, counted.
    #[allow(clippy::too_many_arguments)]
    fn lease(
        &mut self,
        i: usize,
        d: &RateLimitDescriptor,
        rule: Arc<Rule>,
        key: String,
        max: u32,
        ttl_ms: u32,
        settings: &EnvoySettings,
    ) -> Planned {
        let marker = d
            .entries
            .last()
            .filter(|e| e.key == ACQUIRE_ENTRY.as_bytes() || e.key == RELEASE_ENTRY.as_bytes());
        let Some(marker) = marker else {
            self.refusals.push((Refusal::LeaseId, i));
            return Planned::Free;
        };
        let acquire = marker.key == ACQUIRE_ENTRY.as_bytes();
        let id = std::str::from_utf8(&marker.value)
            .ok()
            .filter(|id| lease_id_ok(id));
        let Some(id) = id else {
            self.refusals.push((Refusal::LeaseId, i));
            return unusable_id(rule, max, acquire);
        };
        let mut key = bounded_key(key, &settings.key_prefix, settings.max_key_bytes);
        key.push_str("|in_flight");
        self.leases.push(PlannedLease {
            key,
            id: id.to_string(),
            op: if acquire {
                // Envoy's stream-done call releases this id whatever the answer.
                LeaseOp::Acquire {
                    max,
                    ttl_ms,
                    paired: true,
                }
            } else {
                LeaseOp::Release
            },
            veto: !rule.shadow_mode,
            rule: rule.id,
        });
        Planned::Lease {
            limit: in_flight_limit(&rule, max),
            rule,
            lease: self.leases.len() - 1,
        }
    }

    /// A descriptor with a `limit` override: it replaces any rule (as envoyproxy/ratelimit does),
    /// in any domain. Its bucket is its own, the descriptor's key and the override's shape, so an
    /// override can neither refill nor drain the rule's bucket.
    fn overridden(
        &mut self,
        d: &RateLimitDescriptor,
        over: &RateLimitOverride,
        unit: Unit,
        op: Op,
        req: &RateLimitRequest,
        settings: &EnvoySettings,
    ) -> Planned {
        let limit = RateLimit {
            name: String::new(),
            requests_per_unit: over.requests_per_unit,
            unit: response_unit(unit) as i32,
        };
        match Limit::bucket(over.requests_per_unit, unit, 1, None) {
            Ok(Limit::Bucket { shape, .. }) => {
                let entries = d.entries.iter().map(|e| (&e.key, &e.value));
                let mut key = descriptor_key(&settings.key_prefix, &req.domain, entries);
                let _ = write!(key, "!{}/{}", over.requests_per_unit, unit.as_str());
                self.bucket(None, limit, key, shape, op, settings)
            }
            _ => blocked(None, limit, unit, op),
        }
    }

    /// A descriptor its rule decides.
    fn ruled(&mut self, rule: Arc<Rule>, key: String, op: Op, settings: &EnvoySettings) -> Planned {
        match rule.limit {
            // Planned by `lease`.
            Limit::InFlight { .. } => Planned::Free,
            Limit::Unlimited => Planned::Unlimited,
            Limit::Blocked { unit } => {
                let limit = current_limit(&rule, 0, unit);
                blocked(Some(rule), limit, unit, op)
            }
            Limit::Bucket {
                shape,
                requests_per_unit,
                unit,
                ..
            } => {
                let limit = current_limit(&rule, requests_per_unit, unit);
                // A `debt` rule's charges always land: what was spent is counted.
                let op = match op {
                    Op::Take(hits) if rule.debt => Op::Force(hits),
                    op => op,
                };
                self.bucket(Some(rule), limit, key, shape, op, settings)
            }
        }
    }

    fn bucket(
        &mut self,
        rule: Option<Arc<Rule>>,
        limit: RateLimit,
        key: String,
        shape: Shape,
        op: Op,
        settings: &EnvoySettings,
    ) -> Planned {
        let key = bounded_key(key, &settings.key_prefix, settings.max_key_bytes);
        let veto = !rule.as_ref().is_some_and(|r| r.shadow_mode);
        self.buckets.push(PlannedBucket {
            key,
            ask: Ask { shape, op, veto },
        });
        Planned::Bucket {
            rule,
            limit,
            bucket: self.buckets.len() - 1,
        }
    }
}

/// A bucket key of at most `max` bytes: a longer one (a long header value) becomes the prefix, `#`
/// and the SHA-256 of the whole key in hex. The same value always gives the same digest, so that
/// client keeps a bucket of its own; `#` never follows the prefix in a key built from parts (they
/// start with a length), so a digest cannot equal a short key.
pub(super) fn bounded_key(key: String, prefix: &str, max: usize) -> String {
    if key.len() <= max {
        return key;
    }
    let digest = ring::digest::digest(&ring::digest::SHA256, key.as_bytes());
    let mut short = String::with_capacity(prefix.len() + 1 + 64);
    short.push_str(prefix);
    short.push('#');
    for b in digest.as_ref() {
        let _ = write!(short, "{b:02x}");
    }
    short
}

fn blocked(rule: Option<Arc<Rule>>, limit: RateLimit, unit: Unit, op: Op) -> Planned {
    Planned::Blocked {
        rule,
        limit,
        unit,
        // A rule of 0 per unit blocks everything, checks (0 hits) included, as envoyproxy/ratelimit
        // answers them; only a refund is not over.
        over: !matches!(op, Op::Refund(_)),
        hits: op.cost(),
    }
}

/// The checks Envoy's proto validation would make (it is never enforced on the wire). Envoy never
/// sends a request without a domain or descriptors: these are a direct caller's mistakes.
fn validate(req: &RateLimitRequest) -> Result<(), ApiError> {
    if req.domain.is_empty() {
        return Err(ApiError::invalid("domain", "must not be empty"));
    }
    if req.descriptors.is_empty() {
        return Err(ApiError::invalid("descriptors", "must not be empty"));
    }
    Ok(())
}

/// The bounds, before any work: an oversized request costs nothing but this loop.
fn out_of_bounds(req: &RateLimitRequest, settings: &EnvoySettings) -> Option<(Refusal, usize)> {
    if req.descriptors.len() > settings.max_descriptors {
        return Some((Refusal::Descriptors, settings.max_descriptors));
    }
    let i = req
        .descriptors
        .iter()
        .position(|d| d.entries.len() > MAX_ENTRIES)?;
    Some((Refusal::Entries, i))
}

/// What a descriptor does: its own hits_addend wins (0: check only), else the request's (0: 1);
/// `is_negative_hits` gives the hits back. None: a refund with ALLOW_REFUNDS=false.
fn operation(d: &RateLimitDescriptor, request_hits: u32, settings: &EnvoySettings) -> Option<Op> {
    let hits = match d.hits_addend {
        Some(0) => return Some(Op::Check(0)),
        Some(n) => n,
        None => u64::from(request_hits.max(1)),
    };
    if !d.is_negative_hits {
        return Some(Op::Take(hits));
    }
    settings.allow_refunds.then_some(Op::Refund(hits))
}

/// A lease entry whose id cannot name a slot (empty, too long, not UTF-8, control characters).
/// Fail closed: an acquire without a usable id gets no slot (OVER_LIMIT, `plan` then charges
/// nothing); a release of it frees none.
fn unusable_id(rule: Arc<Rule>, max: u32, acquire: bool) -> Planned {
    if !acquire {
        return Planned::Free;
    }
    Planned::Blocked {
        limit: in_flight_limit(&rule, max),
        rule: Some(rule),
        unit: Unit::Second,
        over: true,
        hits: 1,
    }
}

/// What `current_limit` says of an in-flight limit: its maximum, with no unit (it is no rate).
fn in_flight_limit(rule: &Rule, max: u32) -> RateLimit {
    RateLimit {
        name: rule.name.clone().unwrap_or_default(),
        requests_per_unit: max,
        unit: rate_limit::Unit::Unknown as i32,
    }
}

fn current_limit(rule: &Rule, requests_per_unit: u32, unit: Unit) -> RateLimit {
    RateLimit {
        name: rule.name.clone().unwrap_or_default(),
        requests_per_unit,
        unit: response_unit(unit) as i32,
    }
}

fn response_unit(unit: Unit) -> rate_limit::Unit {
    match unit {
        Unit::Second => rate_limit::Unit::Second,
        Unit::Minute => rate_limit::Unit::Minute,
        Unit::Hour => rate_limit::Unit::Hour,
        Unit::Day => rate_limit::Unit::Day,
        Unit::Week => rate_limit::Unit::Week,
        Unit::Month => rate_limit::Unit::Month,
        Unit::Year => rate_limit::Unit::Year,
    }
}

/// `envoy.type.v3.RateLimitUnit` (which has no WEEK).
fn override_unit(unit: i32) -> Option<Unit> {
    Some(match RateLimitUnit::try_from(unit).ok()? {
        RateLimitUnit::Unknown => return None,
        RateLimitUnit::Second => Unit::Second,
        RateLimitUnit::Minute => Unit::Minute,
        RateLimitUnit::Hour => Unit::Hour,
        RateLimitUnit::Day => Unit::Day,
        RateLimitUnit::Month => Unit::Month,
        RateLimitUnit::Year => Unit::Year,
    })
}
