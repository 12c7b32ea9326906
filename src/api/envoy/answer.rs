//! From decisions to the answer Envoy reads: one status per descriptor, in order; and on the way
//! out each descriptor's decision is counted (per rule, near the limit), logged and, when denied,
//! fed to the top-keys sketch.

use std::fmt;

use crate::telemetry::{Activity, DecisionMetrics, RuleMetrics, decision_log};
use sluicegate_core::Decision;
use sluicegate_core::backend::BackendError;
use sluicegate_proto::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use sluicegate_proto::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry as DescEntry;
use sluicegate_proto::envoy::service::ratelimit::v3::RateLimitRequest;
use sluicegate_proto::envoy::service::ratelimit::v3::rate_limit_response::{
    Code, DescriptorStatus, RateLimit,
};

use super::leases::Leases;
use super::plan::{Plan, Planned};

/// The statuses, and whether any enforced descriptor is over its limit.
pub(super) struct Answer {
    pub statuses: Vec<DescriptorStatus>,
    pub over: bool,
    /// Per descriptor: its rule said no (shadow rules too, whose status is OK; not a
    /// FAILURE_MODE answer, which no rule gave).
    pub fired: Vec<bool>,
}

/// Where each descriptor's decision is reported.
pub(super) struct Observers<'a> {
    /// The per-rule metrics, by rule id.
    pub rules: &'a [RuleMetrics],
    pub decisions: &'a DecisionMetrics,
    pub activity: &'a Activity,
}

/// A descriptor's entries as `k="v", k2="v2"`, rendered only when a log line or the sketch needs
/// it. Keys and values are a client's bytes: escaped (quotes, control bytes, anything not ASCII),
/// so no value can forge a log line or a field.
pub(super) struct Entries<'a>(pub &'a [DescEntry]);

impl fmt::Display for Entries<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{}=\"{}\"", e.key.escape_ascii(), e.value.escape_ascii())?;
        }
        Ok(())
    }
}

/// Builds the statuses. `fallback` is FAILURE_MODE's verdict for the descriptors whose bucket
/// failed (None when none failed).
pub(super) fn answer(
    req: &RateLimitRequest,
    plan: &Plan,
    (results, leases): (&[Result<Decision, BackendError>], &Leases),
    fallback: Option<bool>,
    seen: &Observers<'_>,
) -> Answer {
    let at = Answering {
        req,
        plan,
        results,
        leases,
        fallback,
        seen,
    };
    let n = plan.entries.len();
    let mut answer = Answer {
        statuses: Vec::with_capacity(n),
        over: false,
        fired: Vec::with_capacity(n),
    };
    for (entry, descriptor) in plan.entries.iter().zip(&req.descriptors) {
        let (code, status, fired) = at.status(entry, descriptor);
        answer.over |= code == Code::OverLimit;
        answer.fired.push(fired);
        answer.statuses.push(DescriptorStatus {
            code: code as i32,
            ..status
        });
    }
    answer
}

/// What answering one request needs, for each of its descriptors.
struct Answering<'a> {
    req: &'a RateLimitRequest,
    plan: &'a Plan,
    results: &'a [Result<Decision, BackendError>],
    leases: &'a Leases,
    fallback: Option<bool>,
    seen: &'a Observers<'a>,
}

impl Answering<'_> {
    /// One descriptor's code and status, and whether its rule said no (shadow rules too; never
    /// for a free, unlimited or refused descriptor, nor a FAILURE_MODE answer, which no rule gave).
    fn status(
        &self,
        entry: &Planned,
        descriptor: &RateLimitDescriptor,
    ) -> (Code, DescriptorStatus, bool) {
        match entry {
            Planned::Free => (Code::Ok, DescriptorStatus::default(), false),
            Planned::Refused => (Code::OverLimit, DescriptorStatus::default(), false),
            Planned::Unlimited => {
                let status = DescriptorStatus {
                    limit_remaining: u32::MAX,
                    ..Default::default()
                };
                (Code::Ok, status, false)
            }
            Planned::Blocked {
                limit,
                unit,
                over,
                hits,
                ..
            } => {
                if let Some(m) = self.rule_metrics(entry) {
                    m.record(!over, entry.shadow(), *hits, None, false);
                }
                let d = Decision {
                    allowed: !over,
                    tokens_remaining: 0.0,
                    retry_after_ms: 0,
                    reset_after_ms: 0,
                    without_backend: true,
                    granted: 0,
                };
                self.report(entry, descriptor, *hits, &d);
                let status = DescriptorStatus {
                    current_limit: Some(limit.clone()),
                    duration_until_reset: Some(duration_ms(unit.seconds() as u64 * 1000)),
                    ..Default::default()
                };
                (verdict(!over, entry.shadow()), status, *over)
            }
            Planned::Lease { limit, lease, .. } => self.leased(entry, descriptor, *lease, limit),
            Planned::Bucket { limit, bucket, .. } => {
                match (&self.results[*bucket], self.fallback) {
                    (Ok(d), _) => self.decided(entry, descriptor, *bucket, d, limit),
                    (Err(_), allowed) => {
                        let status = DescriptorStatus {
                            current_limit: Some(limit.clone()),
                            ..Default::default()
                        };
                        (
                            verdict(allowed.unwrap_or(false), entry.shadow()),
                            status,
                            false,
                        )
                    }
                }
            }
        }
    }

    /// A descriptor whose bucket the backend decided.
    fn decided(
        &self,
        entry: &Planned,
        descriptor: &RateLimitDescriptor,
        bucket: usize,
        d: &Decision,
        limit: &RateLimit,
    ) -> (Code, DescriptorStatus, bool) {
        let planned = &self.plan.buckets[bucket];
        let hits = planned.ask.op.cost();
        let near = self
            .seen
            .activity
            .is_near_limit(d, planned.ask.shape.capacity());
        if near {
            self.seen.decisions.near_limit();
        }
        if let Some(m) = self.rule_metrics(entry) {
            m.record(
                d.allowed,
                entry.shadow(),
                hits,
                Some(d.tokens_remaining),
                near,
            );
        }
        self.report(entry, descriptor, hits, d);
        let status = DescriptorStatus {
            current_limit: Some(limit.clone()),
            limit_remaining: if d.allowed {
                d.tokens_remaining.floor().clamp(0.0, f64::from(u32::MAX)) as u32
            } else {
                0
            },
            duration_until_reset: Some(duration_ms(if d.allowed {
                d.reset_after_ms
            } else {
                whole_seconds(d.retry_after_ms)
            })),
            quota: None,
            code: 0,
        };
        (verdict(d.allowed, entry.shadow()), status, !d.allowed)
    }

    /// A descriptor of a `concurrency` rule. An acquire is allowed when its lease is held (or by
    /// FAILURE_MODE when the backend failed); a release is always OK (Envoy ignores the answer of
    /// its stream-done call).
    fn leased(
        &self,
        entry: &Planned,
        descriptor: &RateLimitDescriptor,
        lease: usize,
        limit: &RateLimit,
    ) -> (Code, DescriptorStatus, bool) {
        let planned = &self.plan.leases[lease];
        let status = DescriptorStatus {
            current_limit: Some(limit.clone()),
            ..Default::default()
        };
        if !planned.acquires() {
            return (Code::Ok, status, false);
        }
        let a = match &self.leases[lease] {
            Ok(a) => a,
            Err(_) => {
                let allowed = self.fallback.unwrap_or(false);
                return (verdict(allowed, entry.shadow()), status, false);
            }
        };
        if let Some(m) = self.rule_metrics(entry) {
            m.record(a.done, entry.shadow(), 1, None, false);
        }
        let d = Decision {
            allowed: a.done,
            tokens_remaining: f64::from(limit.requests_per_unit.saturating_sub(a.in_flight)),
            retry_after_ms: a.retry_after_ms,
            reset_after_ms: 0,
            without_backend: false,
            granted: 0,
        };
        self.report(entry, descriptor, 1, &d);
        let status = DescriptorStatus {
            limit_remaining: if a.done { d.tokens_remaining as u32 } else { 0 },
            duration_until_reset: (!a.done).then(|| duration_ms(whole_seconds(a.retry_after_ms))),
            ..status
        };
        (verdict(a.done, entry.shadow()), status, !a.done)
    }

    fn rule_metrics(&self, entry: &Planned) -> Option<&RuleMetrics> {
        entry.rule().and_then(|r| self.seen.rules.get(r.id))
    }

    /// Logs the decision (denials sampled) and feeds a denied key to the top-keys sketch; a
    /// shadow rule's "no" denies nobody, so it is not a denied key.
    fn report(&self, entry: &Planned, descriptor: &RateLimitDescriptor, hits: u64, d: &Decision) {
        let shadow = entry.shadow();
        let rule_label = entry.rule().map_or("override", |r| r.label.as_str());
        let entries = Entries(&descriptor.entries);
        let domain = &self.req.domain;
        let sampler = self.seen.activity.denial_sampler();
        decision_log::envoy(sampler, domain, rule_label, &entries, hits, d, shadow);
        if !d.allowed && !shadow {
            self.seen.activity.denied(|| format!("{domain}: {entries}"));
        }
    }
}

fn verdict(allowed: bool, shadow: bool) -> Code {
    if allowed || shadow {
        Code::Ok
    } else {
        Code::OverLimit
    }
}

/// A retry time as Envoy shows it: it floors `duration_until_reset` to whole seconds for
/// `x-ratelimit-reset`, so 80 ms would read 0 on a 429 and invite an immediate retry. Rounded up,
/// at least one second.
fn whole_seconds(ms: u64) -> u64 {
    ms.div_ceil(1000).max(1).saturating_mul(1000)
}

pub(super) fn duration_ms(ms: u64) -> prost_types::Duration {
    prost_types::Duration {
        seconds: (ms / 1000) as i64,
        nanos: ((ms % 1000) * 1_000_000) as i32,
    }
}
