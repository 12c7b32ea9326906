//! From decisions to the answer Envoy reads: one status per descriptor, in order, and the
//! per-rule metrics.

use crate::backend::BackendError;
use crate::core::Decision;
use crate::proto::envoy::service::ratelimit::v3::rate_limit_response::{Code, DescriptorStatus};
use crate::telemetry::RuleMetrics;

use super::plan::{Entry, Plan};

/// The statuses, and whether any enforced descriptor is over its limit.
pub(super) struct Answer {
    pub statuses: Vec<DescriptorStatus>,
    pub over: bool,
}

/// Builds the statuses. `fallback` is FAILURE_MODE's verdict for the descriptors whose bucket
/// failed (None when none failed); `metrics` holds the per-rule metrics by rule id.
pub(super) fn answer(
    plan: &Plan,
    results: &[Result<Decision, BackendError>],
    fallback: Option<bool>,
    metrics: &[RuleMetrics],
) -> Answer {
    let mut over = false;
    let statuses = plan
        .entries
        .iter()
        .map(|entry| {
            let shadow = entry.shadow();
            let rule_metrics = entry.rule().and_then(|r| metrics.get(r.id));
            let (code, status) = match entry {
                Entry::Free => (Code::Ok, DescriptorStatus::default()),
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
                        m.record(!over, shadow, *hits, None);
                    }
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
                        if let Some(m) = rule_metrics {
                            let hits = plan.buckets[*bucket].op.cost();
                            m.record(d.allowed, shadow, hits, Some(d.tokens_remaining));
                        }
                        (
                            verdict(d.allowed, shadow),
                            DescriptorStatus {
                                current_limit: Some(limit.clone()),
                                // As envoyproxy/ratelimit: 0 on a denial, whatever is left.
                                limit_remaining: if d.allowed {
                                    d.tokens_remaining.floor().clamp(0.0, f64::from(u32::MAX))
                                        as u32
                                } else {
                                    0
                                },
                                duration_until_reset: Some(duration_ms(if d.allowed {
                                    d.reset_after_ms
                                } else {
                                    d.retry_after_ms
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
            over |= code == Code::OverLimit;
            DescriptorStatus {
                code: code as i32,
                ..status
            }
        })
        .collect();
    Answer { statuses, over }
}

/// A denied shadow-mode descriptor is reported OK: decided and counted, never enforced.
fn verdict(allowed: bool, shadow: bool) -> Code {
    if allowed || shadow {
        Code::Ok
    } else {
        Code::OverLimit
    }
}

pub(super) fn duration_ms(ms: u64) -> prost_types::Duration {
    prost_types::Duration {
        seconds: (ms / 1000) as i64,
        nanos: ((ms % 1000) * 1_000_000) as i32,
    }
}
