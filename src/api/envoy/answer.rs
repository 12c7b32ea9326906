//! From decisions to the answer Envoy reads: one status per descriptor, in order; and on the way
//! out each descriptor's decision is counted (per rule, near the limit), logged and, when denied,
//! fed to the top-keys sketch.

use std::fmt;

use crate::telemetry::{Activity, DecisionMetrics, RuleMetrics, decision_log};
use sluicegate_core::Decision;
use sluicegate_core::backend::BackendError;
use sluicegate_proto::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry as DescEntry;
use sluicegate_proto::envoy::service::ratelimit::v3::RateLimitRequest;
use sluicegate_proto::envoy::service::ratelimit::v3::rate_limit_response::{
    Code, DescriptorStatus,
};

use super::plan::{Entry, Plan};

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
    results: &[Result<Decision, BackendError>],
    fallback: Option<bool>,
    seen: &Observers<'_>,
) -> Answer {
    let mut over = false;
    let mut fired = Vec::with_capacity(plan.entries.len());
    let statuses = plan
        .entries
        .iter()
        .zip(&req.descriptors)
        .enumerate()
        .map(|(i, (entry, descriptor))| {
            let shadow = entry.shadow();
            let rule_metrics = entry.rule().and_then(|r| seen.rules.get(r.id));
            let rule_label = entry.rule().map_or("override", |r| r.label.as_str());
            let entries = Entries(&descriptor.entries);
            let denied = |hits: u64, d: &Decision| {
                decision_log::envoy(
                    seen.activity.denial_sampler(),
                    &req.domain,
                    rule_label,
                    &entries,
                    hits,
                    d,
                    shadow,
                );
                // A shadow rule's "no" denies nobody: not a denied key.
                if !d.allowed && !shadow {
                    seen.activity
                        .denied(|| format!("{}: {}", req.domain, entries));
                }
            };
            let (code, status) = match entry {
                Entry::Free => (Code::Ok, DescriptorStatus::default()),
                Entry::Refused => (Code::OverLimit, DescriptorStatus::default()),
                Entry::Unlimited => (
                    Code::Ok,
                    DescriptorStatus {
                        limit_remaining: u32::MAX,
                        ..Default::default()
                    },
                ),
                Entry::Blocked {
                    limit,
                    unit,
                    over,
                    hits,
                    ..
                } => {
                    if let Some(m) = rule_metrics {
                        m.record(!over, shadow, *hits, None, false);
                    }
                    let d = Decision {
                        allowed: !over,
                        tokens_remaining: 0.0,
                        retry_after_ms: 0,
                        reset_after_ms: 0,
                        without_backend: true,
                    };
                    denied(*hits, &d);
                    fired.push(*over);
                    (
                        verdict(!over, shadow),
                        DescriptorStatus {
                            current_limit: Some(limit.clone()),
                            duration_until_reset: Some(duration_ms(unit.seconds() as u64 * 1000)),
                            ..Default::default()
                        },
                    )
                }
                Entry::Bucket { limit, bucket, .. } => match (&results[*bucket], fallback) {
                    (Ok(d), _) => {
                        let planned = &plan.buckets[*bucket];
                        let hits = planned.op.cost();
                        let near = seen.activity.is_near_limit(d, planned.shape.capacity());
                        if near {
                            seen.decisions.near_limit();
                        }
                        if let Some(m) = rule_metrics {
                            m.record(d.allowed, shadow, hits, Some(d.tokens_remaining), near);
                        }
                        denied(hits, d);
                        fired.push(!d.allowed);
                        (
                            verdict(d.allowed, shadow),
                            DescriptorStatus {
                                current_limit: Some(limit.clone()),
                                limit_remaining: if d.allowed {
                                    d.tokens_remaining.floor().clamp(0.0, f64::from(u32::MAX))
                                        as u32
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
                            },
                        )
                    }
                    (Err(_), allowed) => (
                        verdict(allowed.unwrap_or(false), shadow),
                        DescriptorStatus {
                            current_limit: Some(limit.clone()),
                            ..Default::default()
                        },
                    ),
                },
            };
            if fired.len() == i {
                // Free, unlimited, or answered by FAILURE_MODE: no rule said no.
                fired.push(false);
            }
            over |= code == Code::OverLimit;
            DescriptorStatus {
                code: code as i32,
                ..status
            }
        })
        .collect();
    Answer {
        statuses,
        over,
        fired,
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
