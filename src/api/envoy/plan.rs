//! From a request to a plan: the checks Envoy's proto validation would make, the bounds, the rule
//! each descriptor matches, and the bucket operations to send to the backend.

use std::sync::Arc;

use super::EnvoySettings;
use crate::api::ApiError;
use crate::core::{Op, Shape};
use crate::proto::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use crate::proto::envoy::service::ratelimit::v3::{
    RateLimitRequest,
    rate_limit_response::{RateLimit, rate_limit},
};
use crate::proto::envoy::r#type::v3::RateLimitUnit;
use crate::rules::{Limit, Rule, RuleSet, Unit, descriptor_key};

/// What one descriptor needs, once matched.
pub(super) enum Entry {
    /// No rule, or a rule replaced by another: OK, no `current_limit`.
    Free,
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
}

impl Entry {
    pub fn rule(&self) -> Option<&Arc<Rule>> {
        match self {
            Entry::Blocked { rule, .. } | Entry::Bucket { rule, .. } => rule.as_ref(),
            Entry::Free | Entry::Unlimited => None,
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
    pub shape: Shape,
    pub op: Op,
    /// Whether a denial vetoes the request's other charges (false for shadow rules).
    pub veto: bool,
}

pub(super) struct Plan {
    /// One per descriptor, in order.
    pub entries: Vec<Entry>,
    pub buckets: Vec<PlannedBucket>,
    /// Over the limit whatever the buckets answer (an enforced `requests_per_unit: 0` rule).
    pub over_without_backend: bool,
}

/// Checks the request, matches every descriptor and plans its bucket operations.
pub(super) fn plan(
    req: &RateLimitRequest,
    rules: Option<&RuleSet>,
    settings: &EnvoySettings,
) -> Result<Plan, ApiError> {
    validate(req, settings)?;

    // Match every descriptor first: `replaces` looks across the whole request.
    let matched: Vec<Option<(Arc<Rule>, String)>> = req
        .descriptors
        .iter()
        .map(|d| {
            let entries = d.entries.iter().map(|e| (e.key.as_str(), e.value.as_str()));
            rules?
                .lookup(&settings.key_prefix, &req.domain, entries)
                .map(|m| (m.rule, m.key))
        })
        .collect();
    let replaced: Vec<bool> = matched
        .iter()
        .map(|m| {
            m.as_ref()
                .and_then(|(rule, _)| rule.name.as_deref())
                .is_some_and(|name| {
                    matched
                        .iter()
                        .flatten()
                        .any(|(other, _)| other.replaces.iter().any(|r| r == name))
                })
        })
        .collect();

    let mut plan = Plan {
        entries: Vec::with_capacity(req.descriptors.len()),
        buckets: Vec::new(),
        over_without_backend: false,
    };
    for (i, (d, m)) in req.descriptors.iter().zip(matched).enumerate() {
        let op = operation(d, req.hits_addend, settings)?;
        let entry = match (&d.limit, m) {
            // The override replaces any rule (as envoyproxy/ratelimit does), in any domain; its
            // bucket is the descriptor's own.
            (Some(over), _) => {
                let unit = override_unit(over.unit).ok_or_else(|| {
                    ApiError::invalid(
                        "descriptors.limit.unit",
                        format!("descriptor {i}: unit {} is not a known unit", over.unit),
                    )
                })?;
                let limit = RateLimit {
                    name: String::new(),
                    requests_per_unit: over.requests_per_unit,
                    unit: response_unit(unit) as i32,
                };
                match Limit::bucket(over.requests_per_unit, unit, 1, None) {
                    Ok(Limit::Bucket { shape, .. }) => {
                        let entries = d.entries.iter().map(|e| (e.key.as_str(), e.value.as_str()));
                        let key = descriptor_key(&settings.key_prefix, &req.domain, entries);
                        plan.bucket(i, None, limit, key, shape, op, settings)?
                    }
                    _ => blocked(None, limit, unit, op),
                }
            }
            (None, None) => Entry::Free,
            (None, Some(_)) if replaced[i] => Entry::Free,
            (None, Some((rule, key))) => match rule.limit {
                Limit::Unlimited => Entry::Unlimited,
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
                    plan.bucket(i, Some(rule), limit, key, shape, op, settings)?
                }
            },
        };
        if let Entry::Blocked { over: true, .. } = &entry {
            plan.over_without_backend |= !entry.shadow();
        }
        plan.entries.push(entry);
    }
    Ok(plan)
}

impl Plan {
    #[allow(clippy::too_many_arguments)]
    fn bucket(
        &mut self,
        i: usize,
        rule: Option<Arc<Rule>>,
        limit: RateLimit,
        key: String,
        shape: Shape,
        op: Op,
        settings: &EnvoySettings,
    ) -> Result<Entry, ApiError> {
        if key.len() > settings.max_key_bytes {
            return Err(ApiError::out_of_bounds(
                "descriptors.entries",
                format!(
                    "descriptor {i}: its bucket key is {} bytes, more than MAX_KEY_BYTES ({})",
                    key.len(),
                    settings.max_key_bytes
                ),
            ));
        }
        let veto = !rule.as_ref().is_some_and(|r| r.shadow_mode);
        self.buckets.push(PlannedBucket {
            key,
            shape,
            op,
            veto,
        });
        Ok(Entry::Bucket {
            rule,
            limit,
            bucket: self.buckets.len() - 1,
        })
    }
}

fn blocked(rule: Option<Arc<Rule>>, limit: RateLimit, unit: Unit, op: Op) -> Entry {
    Entry::Blocked {
        rule,
        limit,
        unit,
        over: matches!(op, Op::Take(h) | Op::Force(h) if h > 0),
        hits: op.cost(),
    }
}

/// The checks Envoy's proto validation would make (it is never enforced on the wire), and the
/// bounds, all before any work: an oversized request costs nothing but this loop.
fn validate(req: &RateLimitRequest, settings: &EnvoySettings) -> Result<(), ApiError> {
    if req.domain.is_empty() {
        return Err(ApiError::invalid("domain", "must not be empty"));
    }
    if req.descriptors.is_empty() {
        return Err(ApiError::invalid("descriptors", "must not be empty"));
    }
    if req.descriptors.len() > settings.max_descriptors {
        return Err(ApiError::out_of_bounds(
            "descriptors",
            format!(
                "{} descriptors, more than MAX_DESCRIPTORS ({})",
                req.descriptors.len(),
                settings.max_descriptors
            ),
        ));
    }
    for (i, d) in req.descriptors.iter().enumerate() {
        if d.entries.is_empty() {
            return Err(ApiError::invalid(
                "descriptors.entries",
                format!("descriptor {i} has no entries"),
            ));
        }
        if let Some(j) = d.entries.iter().position(|e| e.key.is_empty()) {
            return Err(ApiError::invalid(
                "descriptors.entries.key",
                format!("descriptor {i}, entry {j}: key must not be empty"),
            ));
        }
    }
    Ok(())
}

/// What a descriptor does: its own hits_addend wins (0: check only), else the request's (0: 1);
/// `is_negative_hits` gives the hits back (refused with ALLOW_REFUNDS=false).
fn operation(
    d: &RateLimitDescriptor,
    request_hits: u32,
    settings: &EnvoySettings,
) -> Result<Op, ApiError> {
    let hits = match d.hits_addend {
        Some(0) => return Ok(Op::Check(0)),
        Some(n) => n,
        None => u64::from(request_hits.max(1)),
    };
    if !d.is_negative_hits {
        return Ok(Op::Take(hits));
    }
    if !settings.allow_refunds {
        return Err(ApiError::PermissionDenied(
            "descriptors.is_negative_hits: refunds are disabled on this server (ALLOW_REFUNDS=false)"
                .into(),
        ));
    }
    Ok(Op::Refund(hits))
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
