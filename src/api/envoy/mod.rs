//! `envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit`: Envoy's external rate limiting,
//! answered per the rules with token buckets.
//!
//! A request goes through three steps, one file each:
//! - `plan.rs`: checks and bounds, the rule each descriptor matches, the bucket operations;
//! - here: the decision, one backend group (all or nothing unless CHARGE_ON_DENY), and what a
//!   backend failure makes of it;
//! - `answer.rs`: one status per descriptor, in order, and the per-rule metrics.
//!
//! Wire rules honoured (SPEC section 3): always OK or OVER_LIMIT; one status per descriptor, in
//! order; an unmatched descriptor is OK without `current_limit`; a descriptor's own `hits_addend`
//! wins and its 0 means check-only, else the request's (0 means 1); `is_negative_hits` refunds; a
//! `limit` override replaces the rule; a request answered OVER_LIMIT charges none of its
//! descriptors (but `debt` rules); backend failures are UNAVAILABLE (so Envoy's
//! `failure_mode_deny` decides) unless FAILURE_MODE answers, and then only for the descriptors
//! whose bucket failed.

mod answer;
mod plan;

use std::{sync::Arc, time::Instant};

use arc_swap::ArcSwapOption;
use tonic::{Request, Response, Status};

use super::ApiError;
use crate::backend::{Backend, BucketRequest};
use crate::core::{FailureMode, Op};
use crate::proto::envoy::service::ratelimit::v3::{
    RateLimitRequest, RateLimitResponse, rate_limit_response::Code,
    rate_limit_service_server::RateLimitService,
};
use crate::rules::{RuleSet, RulesHandle};
use crate::telemetry::{DecisionMetrics, FailureModeMetrics, RuleMetrics, ShedMetrics};

/// Settings of the Envoy API.
#[derive(Clone, Debug)]
pub struct EnvoySettings {
    pub key_prefix: String,
    pub failure_mode: FailureMode,
    /// Global SHADOW_MODE: decide and count, but answer OK.
    pub shadow_mode: bool,
    /// CHARGE_ON_DENY: charge every descriptor within its limit even when the request is over
    /// (envoyproxy/ratelimit's behaviour); otherwise a request answered OVER_LIMIT charges none.
    pub charge_on_deny: bool,
    /// ALLOW_REFUNDS: honour `is_negative_hits`.
    pub allow_refunds: bool,
    pub max_descriptors: usize,
    pub max_key_bytes: usize,
}

impl EnvoySettings {
    /// The defaults of SPEC section 4, with `key_prefix`.
    pub fn new(key_prefix: impl Into<String>) -> Self {
        Self {
            key_prefix: key_prefix.into(),
            failure_mode: FailureMode::Error,
            shadow_mode: false,
            charge_on_deny: false,
            allow_refunds: true,
            max_descriptors: 64,
            max_key_bytes: 1024,
        }
    }
}

/// The per-rule metrics of one loaded rule set, by rule id.
struct RuleMetricsFor {
    set: Arc<RuleSet>,
    metrics: Vec<RuleMetrics>,
}

/// The Envoy RLS service over any backend.
pub struct EnvoyApi<B> {
    backend: B,
    rules: Arc<RulesHandle>,
    settings: EnvoySettings,
    metrics: DecisionMetrics,
    failure_metrics: FailureModeMetrics,
    shed: ShedMetrics,
    rule_metrics: ArcSwapOption<RuleMetricsFor>,
}

impl<B: Backend> EnvoyApi<B> {
    pub fn new(backend: B, rules: Arc<RulesHandle>, settings: EnvoySettings) -> Self {
        Self {
            backend,
            rules,
            settings,
            metrics: DecisionMetrics::new("envoy"),
            failure_metrics: FailureModeMetrics::default(),
            shed: ShedMetrics::default(),
            rule_metrics: ArcSwapOption::empty(),
        }
    }

    /// The metrics of the rules in force, registered once per loaded rule set.
    fn rule_metrics(&self, set: Option<&Arc<RuleSet>>) -> Option<Arc<RuleMetricsFor>> {
        let set = set?;
        if let Some(current) = self.rule_metrics.load_full()
            && Arc::ptr_eq(&current.set, set)
        {
            return Some(current);
        }
        let fresh = Arc::new(RuleMetricsFor {
            set: set.clone(),
            metrics: set
                .rules()
                .iter()
                .map(|r| RuleMetrics::new(&r.domain, &r.label))
                .collect(),
        });
        self.rule_metrics.store(Some(fresh.clone()));
        Some(fresh)
    }

    /// The whole of ShouldRateLimit but the proto envelope.
    pub async fn should_rate_limit(
        &self,
        req: &RateLimitRequest,
    ) -> Result<RateLimitResponse, ApiError> {
        let started = Instant::now();
        let rules = self.rules.current();
        let mut plan = plan::plan(req, rules.as_deref(), &self.settings).inspect_err(|e| {
            if let ApiError::OutOfBounds { .. } = e {
                self.shed.bounds.increment(1);
            }
        })?;

        let all_or_nothing = !self.settings.charge_on_deny;
        if all_or_nothing && plan.over_without_backend {
            // The request is over already: ask the buckets, charge none (but debt rules).
            for b in &mut plan.buckets {
                if let Op::Take(hits) = b.op {
                    b.op = Op::Check(hits);
                }
            }
        }
        let reqs: Vec<BucketRequest<'_>> = plan
            .buckets
            .iter()
            .map(|b| BucketRequest {
                key: &b.key,
                shape: b.shape,
                op: b.op,
                veto: b.veto,
            })
            .collect();
        let results = if reqs.is_empty() {
            Vec::new()
        } else {
            self.backend.decide_group(&reqs, all_or_nothing).await
        };

        let failed = results.iter().find_map(|r| r.as_ref().err());
        let fallback = match failed {
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

        let metrics = self.rule_metrics(rules.as_ref());
        let answer = answer::answer(
            &plan,
            &results,
            fallback,
            metrics.as_deref().map_or(&[], |m| &m.metrics),
        );

        if all_or_nothing && answer.over && failed.is_some() {
            super::group::refund_charges(&self.backend, &reqs, &results).await;
        }

        self.metrics.record(
            if failed.is_some() {
                None
            } else {
                Some(!answer.over)
            },
            started,
        );
        let overall = if answer.over && !self.settings.shadow_mode {
            Code::OverLimit
        } else {
            Code::Ok
        };
        Ok(RateLimitResponse {
            overall_code: overall as i32,
            statuses: answer.statuses,
            ..Default::default()
        })
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
