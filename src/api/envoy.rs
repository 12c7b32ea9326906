//! `envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit`: Envoy's external rate limiting,
//! answered per the rules with token buckets.
//!
//! Wire rules honoured (see SPEC section 3): always OK or OVER_LIMIT; one status per descriptor,
//! in order; an unmatched descriptor is OK without `current_limit`; a descriptor's own
//! `hits_addend` wins and its 0 means check-only, else the request's (0 means 1);
//! `is_negative_hits` refunds; a `limit` override replaces the rule; backend failures are
//! UNAVAILABLE (so Envoy's `failure_mode_deny` decides) unless FAILURE_MODE answers.

use std::{sync::Arc, time::Instant};

use tonic::{Request, Response, Status};

use super::ApiError;
use crate::backend::{Backend, BucketRequest};
use crate::core::{FailureMode, Op, Shape};
use crate::proto::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use crate::proto::envoy::service::ratelimit::v3::{
    RateLimitRequest, RateLimitResponse,
    rate_limit_response::{Code, DescriptorStatus, RateLimit, rate_limit},
    rate_limit_service_server::RateLimitService,
};
use crate::proto::envoy::r#type::v3::RateLimitUnit;
use crate::rules::{Limit, Rule, RulesHandle, Unit, descriptor_key};
use crate::telemetry::{DecisionMetrics, FailureModeMetrics};

/// Settings of the Envoy API.
#[derive(Clone, Debug)]
pub struct EnvoySettings {
    pub key_prefix: String,
    pub failure_mode: FailureMode,
    /// Global SHADOW_MODE: decide and count, but answer OK.
    pub shadow_mode: bool,
}

/// The Envoy RLS service over any backend.
pub struct EnvoyApi<B> {
    backend: B,
    rules: Arc<RulesHandle>,
    settings: EnvoySettings,
    metrics: DecisionMetrics,
    failure_metrics: FailureModeMetrics,
}

/// What one descriptor needs, once matched.
enum Plan {
    /// No rule, an `unlimited` rule, or a rule replaced by another: OK without touching a bucket.
    Free { unlimited: bool },
    /// `requests_per_unit: 0`: over the limit without touching a bucket (a refund is OK).
    Blocked {
        limit: RateLimit,
        unit: Unit,
        refund: bool,
    },
    /// A token bucket decision; `index` is its place in the backend batch.
    Bucket {
        rule: Option<Arc<Rule>>,
        limit: RateLimit,
        index: usize,
        hits: u64,
    },
}

impl<B: Backend> EnvoyApi<B> {
    pub fn new(backend: B, rules: Arc<RulesHandle>, settings: EnvoySettings) -> Self {
        Self {
            backend,
            rules,
            settings,
            metrics: DecisionMetrics::new("envoy"),
            failure_metrics: FailureModeMetrics::default(),
        }
    }

    /// The whole of ShouldRateLimit but the proto envelope.
    pub async fn should_rate_limit(
        &self,
        req: &RateLimitRequest,
    ) -> Result<RateLimitResponse, ApiError> {
        let started = Instant::now();
        validate(req)?;
        let rules = self.rules.current();

        // Match every descriptor first: `replaces` looks across the whole request.
        let matched: Vec<Option<(Arc<Rule>, String)>> = req
            .descriptors
            .iter()
            .map(|d| {
                let set = rules.as_deref()?;
                let entries = d.entries.iter().map(|e| (e.key.as_str(), e.value.as_str()));
                set.lookup(&self.settings.key_prefix, &req.domain, entries)
                    .map(|m| (m.rule, m.key))
            })
            .collect();
        let replaced = |rule: &Rule| {
            rule.name.as_deref().is_some_and(|name| {
                matched
                    .iter()
                    .flatten()
                    .any(|(other, _)| other.replaces.iter().any(|r| r == name))
            })
        };

        let mut keys: Vec<(String, Shape, Op)> = Vec::new();
        let mut plans = Vec::with_capacity(req.descriptors.len());
        for (i, (d, m)) in req.descriptors.iter().zip(&matched).enumerate() {
            let op = operation(d, req.hits_addend);
            let plan = if let Some(over) = &d.limit {
                // The override replaces any rule (as envoyproxy/ratelimit does); its bucket is the
                // descriptor's own.
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
                        let key = descriptor_key(&self.settings.key_prefix, &req.domain, entries);
                        keys.push((key, shape, op));
                        Plan::Bucket {
                            rule: None,
                            limit,
                            index: keys.len() - 1,
                            hits: op.cost(),
                        }
                    }
                    _ => Plan::Blocked {
                        limit,
                        unit,
                        refund: matches!(op, Op::Refund(_)),
                    },
                }
            } else {
                match m {
                    None => Plan::Free { unlimited: false },
                    Some((rule, _)) if replaced(rule) => Plan::Free { unlimited: false },
                    Some((rule, key)) => match rule.limit {
                        Limit::Unlimited => Plan::Free { unlimited: true },
                        Limit::Blocked { unit } => Plan::Blocked {
                            limit: current_limit(rule, 0, unit),
                            unit,
                            refund: matches!(op, Op::Refund(_)),
                        },
                        Limit::Bucket {
                            shape,
                            requests_per_unit,
                            unit,
                            ..
                        } => {
                            keys.push((key.clone(), shape, op));
                            Plan::Bucket {
                                rule: Some(rule.clone()),
                                limit: current_limit(rule, requests_per_unit, unit),
                                index: keys.len() - 1,
                                hits: op.cost(),
                            }
                        }
                    },
                }
            };
            plans.push(plan);
        }

        // Every bucket of the request goes to the backend at once (one pipeline on Redis).
        let batch: Vec<BucketRequest<'_>> = keys
            .iter()
            .map(|(key, shape, op)| BucketRequest {
                key,
                shape: *shape,
                op: *op,
            })
            .collect();
        let results = if batch.is_empty() {
            Vec::new()
        } else {
            self.backend.decide_many(&batch).await
        };
        let failed = results.iter().find_map(|r| r.as_ref().err()).cloned();
        let fallback = match &failed {
            None => None,
            Some(e) => match self.settings.failure_mode.fallback_allowed() {
                None => {
                    tracing::debug!(error = %e, "backend failed; answering UNAVAILABLE");
                    self.metrics.record(None, started);
                    return Err(ApiError::Backend(e.clone()));
                }
                Some(allowed) => {
                    tracing::debug!(error = %e, allowed, "backend failed; FAILURE_MODE answered");
                    self.failure_metrics.record(allowed);
                    Some(allowed)
                }
            },
        };

        let mut over = false;
        let statuses = plans
            .into_iter()
            .map(|plan| {
                let status = match plan {
                    Plan::Free { unlimited } => DescriptorStatus {
                        code: Code::Ok as i32,
                        limit_remaining: if unlimited { u32::MAX } else { 0 },
                        ..Default::default()
                    },
                    Plan::Blocked {
                        limit,
                        unit,
                        refund,
                    } => DescriptorStatus {
                        code: if refund { Code::Ok } else { Code::OverLimit } as i32,
                        current_limit: Some(limit),
                        limit_remaining: 0,
                        duration_until_reset: Some(duration_ms(unit.seconds() as u64 * 1000)),
                        quota: None,
                    },
                    Plan::Bucket {
                        rule,
                        limit,
                        index,
                        hits,
                    } => match (fallback, &results[index]) {
                        (Some(allowed), _) => DescriptorStatus {
                            code: if allowed { Code::Ok } else { Code::OverLimit } as i32,
                            current_limit: Some(limit),
                            ..Default::default()
                        },
                        (None, Err(_)) => unreachable!("a failed batch has a fallback or returned"),
                        (None, Ok(d)) => {
                            let shadow = rule.as_ref().is_some_and(|r| r.shadow_mode);
                            if let Some(rule) = &rule {
                                rule.metrics
                                    .record(d.allowed, shadow, hits, d.tokens_remaining);
                            }
                            let code = if d.allowed || shadow {
                                Code::Ok
                            } else {
                                Code::OverLimit
                            };
                            DescriptorStatus {
                                code: code as i32,
                                current_limit: Some(limit),
                                limit_remaining: d
                                    .tokens_remaining
                                    .floor()
                                    .clamp(0.0, f64::from(u32::MAX))
                                    as u32,
                                duration_until_reset: Some(duration_ms(if d.allowed {
                                    d.reset_after_ms
                                } else {
                                    d.retry_after_ms
                                })),
                                quota: None,
                            }
                        }
                    },
                };
                over |= status.code == Code::OverLimit as i32;
                status
            })
            .collect();

        self.metrics
            .record(if failed.is_some() { None } else { Some(!over) }, started);
        let overall = if over && !self.settings.shadow_mode {
            Code::OverLimit
        } else {
            Code::Ok
        };
        Ok(RateLimitResponse {
            overall_code: overall as i32,
            statuses,
            ..Default::default()
        })
    }
}

/// The checks Envoy's proto validation would make (it is never enforced on the wire).
fn validate(req: &RateLimitRequest) -> Result<(), ApiError> {
    if req.domain.is_empty() {
        return Err(ApiError::invalid("domain", "must not be empty"));
    }
    if req.descriptors.is_empty() {
        return Err(ApiError::invalid("descriptors", "must not be empty"));
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
/// `is_negative_hits` gives the hits back.
fn operation(d: &RateLimitDescriptor, request_hits: u32) -> Op {
    let hits = match d.hits_addend {
        Some(0) => return Op::Check(1),
        Some(n) => n,
        None => u64::from(request_hits.max(1)),
    };
    if d.is_negative_hits {
        Op::Refund(hits)
    } else {
        Op::Take(hits)
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

fn duration_ms(ms: u64) -> prost_types::Duration {
    prost_types::Duration {
        seconds: (ms / 1000) as i64,
        nanos: ((ms % 1000) * 1_000_000) as i32,
    }
}

#[tonic::async_trait]
impl<B: Backend> RateLimitService for EnvoyApi<B> {
    async fn should_rate_limit(
        &self,
        request: Request<RateLimitRequest>,
    ) -> Result<Response<RateLimitResponse>, Status> {
        let answer = EnvoyApi::should_rate_limit(self, request.get_ref()).await?;
        Ok(Response::new(answer))
    }
}
