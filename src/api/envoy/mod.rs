//! `envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit`: Envoy's external rate limiting,
//! answered per the rules with token buckets.
//!
//! A request goes through these steps:
//! - `plan.rs`: the rule each descriptor matches, the bucket operations, and what is answered
//!   without evaluation (past the bounds: OVER_LIMIT; no entries, a refused refund: OK);
//! - here: the decision, one backend group (all or nothing unless CHARGE_ON_DENY), and what a
//!   backend failure makes of it (`api::pipeline`: FAILURE_MODE, the compensation);
//! - `answer.rs`: one status per descriptor, in order; each decision counted, logged, and fed to
//!   the top-keys sketch;
//! - `leases.rs`: the leases of `concurrency` rules, acquired before the buckets are decided and
//!   given back when the request is refused;
//! - `annotate.rs`: the optional `RateLimit-*` headers and the dynamic metadata naming the rules
//!   that fired.
//!
//! Envoy lets a request through when the call fails, so nothing a client of Envoy controls may
//! fail it: descriptor keys and values are bytes, long keys are digested, requests past the bounds
//! are OVER_LIMIT. The only errors are INVALID_ARGUMENT for what Envoy never sends (no domain, no
//! descriptors) and UNAVAILABLE for a backend failure under FAILURE_MODE=error.
//!
//! Wire rules honoured (the README's "Request semantics"): always OK or OVER_LIMIT; one status per
//! descriptor, in order; an unmatched descriptor is OK without `current_limit`; a descriptor's own
//! `hits_addend` wins and its 0 means check-only, else the request's (0 means 1);
//! `is_negative_hits` refunds (with ALLOW_REFUNDS); a `limit` override replaces the rule, in a
//! bucket of its own; a request answered OVER_LIMIT charges none of its descriptors (but `debt`
//! rules); backend failures are UNAVAILABLE (so Envoy's `failure_mode_deny` decides) unless
//! FAILURE_MODE answers, and then only for the descriptors whose bucket failed.

mod annotate;
mod answer;
mod leases;
mod plan;

use std::{sync::Arc, time::Instant};

use tonic::{Request, Response, Status};

use super::ApiError;
use super::pipeline::{Fallback, compensate};
use crate::telemetry::{Activity, DecisionMetrics, RefusedMetrics};
use sluicegate_core::backend::{Backend, BucketRequest};
use sluicegate_core::rules::{RuleSet, RulesHandle};
use sluicegate_core::{FailureMode, Op};
use sluicegate_proto::envoy::service::ratelimit::v3::{
    RateLimitRequest, RateLimitResponse, rate_limit_response::Code,
    rate_limit_service_server::RateLimitService,
};

pub use annotate::HeaderNames;
pub use plan::MAX_ENTRIES as MAX_DESCRIPTOR_ENTRIES;

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
    /// ALLOW_REFUNDS: honour `is_negative_hits` (otherwise answered OK, nothing given back, counted).
    pub allow_refunds: bool,
    /// ALLOW_CLIENT_SHAPES: honour a descriptor's `limit` override (otherwise the rule answers).
    pub allow_client_shapes: bool,
    pub max_descriptors: usize,
    pub max_key_bytes: usize,
    /// LIMIT_RESPONSE_HEADERS_ENABLED: the headers' names; None: no headers.
    pub response_headers: Option<HeaderNames>,
    /// RESPONSE_DYNAMIC_METADATA: name the rules that fired in `dynamic_metadata`.
    pub dynamic_metadata: bool,
}

impl EnvoySettings {
    /// The README's defaults, with `key_prefix`.
    pub fn new(key_prefix: impl Into<String>) -> Self {
        Self {
            key_prefix: key_prefix.into(),
            failure_mode: FailureMode::Error,
            shadow_mode: false,
            charge_on_deny: false,
            allow_refunds: false,
            allow_client_shapes: true,
            max_descriptors: 64,
            max_key_bytes: 1024,
            response_headers: None,
            dynamic_metadata: false,
        }
    }
}

/// The Envoy RLS service over any backend.
pub struct EnvoyApi<B> {
    /// Shared with compensations that outlive their caller.
    backend: Arc<B>,
    rules: Arc<RulesHandle>,
    settings: EnvoySettings,
    /// Where decisions are seen (status page, top keys, near-limit ratio).
    activity: Arc<Activity>,
    metrics: DecisionMetrics,
    fallback: Fallback,
    refused: RefusedMetrics,
}

impl<B: Backend> EnvoyApi<B> {
    pub fn new(backend: B, rules: Arc<RulesHandle>, settings: EnvoySettings) -> Self {
        Self::with_activity(backend, rules, settings, Arc::default())
    }

    /// The same, reporting what it decides to `activity` (the status page's, shared with the
    /// other API).
    pub fn with_activity(
        backend: B,
        rules: Arc<RulesHandle>,
        settings: EnvoySettings,
        activity: Arc<Activity>,
    ) -> Self {
        Self {
            backend: Arc::new(backend),
            rules,
            metrics: DecisionMetrics::new("envoy", activity.clone()),
            fallback: Fallback::new(settings.failure_mode),
            refused: RefusedMetrics::new("envoy", &plan::Refusal::ALL.map(plan::Refusal::as_str)),
            settings,
            activity,
        }
    }

    /// The whole of ShouldRateLimit but the proto envelope.
    pub async fn should_rate_limit(
        &self,
        req: &RateLimitRequest,
    ) -> Result<RateLimitResponse, ApiError> {
        let started = Instant::now();
        let rules = self.rules.current();
        let mut plan = self.plan(req, rules.as_deref())?;
        let all_or_nothing = !self.settings.charge_on_deny;
        // Leases first: a refused one refuses the request, whose buckets are then only asked.
        let leases = leases::run(&*self.backend, &plan).await;
        if all_or_nothing && leases::refused(&plan, &leases) {
            only_ask(&mut plan);
        }
        let reqs: Vec<BucketRequest<'_>> = plan.buckets.iter().map(|b| b.request()).collect();
        let results = if reqs.is_empty() {
            Vec::new()
        } else {
            self.backend.decide_group(&reqs, all_or_nothing).await
        };

        // Denials the deny cache proved without Redis, counted as ShouldAllow counts them.
        self.metrics
            .local(results.iter().filter_map(|r| r.as_ref().ok()));
        let rule_metrics = rules.as_ref().map(|set| self.activity.rule_metrics(set));
        let rule_metrics = rule_metrics.as_deref().map_or(&[][..], |m| &m.metrics);
        leases::observe(&plan, &leases, rule_metrics);
        let failed = results
            .iter()
            .find_map(|r| r.as_ref().err())
            .or_else(|| leases::failure(&plan, &leases));
        let fallback = match failed.map(|e| (e, self.fallback.verdict(e))) {
            None => None,
            Some((_, Some(allowed))) => Some(allowed),
            Some((e, None)) => {
                self.metrics.record(None, started);
                // No answer: nothing of the group may stay charged (a lease is released by the
                // request's stream-done call).
                if all_or_nothing {
                    compensate(&self.backend, &reqs, &results).await;
                }
                return Err(ApiError::Backend(e.clone()));
            }
        };

        let observers = answer::Observers {
            rules: rule_metrics,
            decisions: &self.metrics,
            activity: &self.activity,
        };
        let answer = answer::answer(req, &plan, (&results, &leases), fallback, &observers);
        if all_or_nothing && answer.over && failed.is_some() {
            compensate(&self.backend, &reqs, &results).await;
        }
        self.metrics
            .record(failed.is_none().then_some(!answer.over), started);
        Ok(self.response(req, &plan, answer))
    }

    /// The plan of `req`, its refusals counted; a request already over its limit (and all or
    /// nothing) only asks its buckets, charging none but debt rules.
    fn plan(
        &self,
        req: &RateLimitRequest,
        rules: Option<&RuleSet>,
    ) -> Result<plan::Plan, ApiError> {
        let mut plan = plan::plan(req, rules, &self.settings)?;
        for &(refusal, i) in &plan.refusals {
            self.refused.record(refusal.as_str(), || {
                refusal_detail(refusal, i, req, &self.settings)
            });
        }
        if !self.settings.charge_on_deny && plan.over_without_backend {
            only_ask(&mut plan);
        }
        Ok(plan)
    }

    /// The response Envoy reads: the statuses, the overall code (OK in SHADOW_MODE), and the
    /// headers and metadata when asked for.
    fn response(
        &self,
        req: &RateLimitRequest,
        plan: &plan::Plan,
        answer: answer::Answer,
    ) -> RateLimitResponse {
        let overall = if answer.over && !self.settings.shadow_mode {
            Code::OverLimit
        } else {
            Code::Ok
        };
        let response_headers_to_add = match &self.settings.response_headers {
            Some(names) => annotate::headers(&answer.statuses, names),
            None => Vec::new(),
        };
        let dynamic_metadata = if self.settings.dynamic_metadata {
            annotate::metadata(req, plan, &answer.statuses, &answer.fired)
        } else {
            None
        };
        RateLimitResponse {
            overall_code: overall as i32,
            statuses: answer.statuses,
            response_headers_to_add,
            dynamic_metadata,
            ..Default::default()
        }
    }
}

/// A request already over its limit only asks its buckets, charging none but debt rules.
fn only_ask(plan: &mut plan::Plan) {
    for b in &mut plan.buckets {
        if let Op::Take(hits) = b.ask.op {
            b.ask.op = Op::Check(hits);
        }
    }
}

/// What a refusal's log line says: the bound and the request's size, never a value.
fn refusal_detail(
    refusal: plan::Refusal,
    i: usize,
    req: &RateLimitRequest,
    settings: &EnvoySettings,
) -> String {
    use plan::Refusal;
    let domain = req.domain.escape_debug();
    match refusal {
        Refusal::Descriptors => format!(
            "domain {domain}: {} descriptors, more than MAX_DESCRIPTORS ({}): answered OVER_LIMIT",
            req.descriptors.len(),
            settings.max_descriptors
        ),
        Refusal::Entries => format!(
            "domain {domain}: descriptor {i} has {} entries, more than {}: answered OVER_LIMIT",
            req.descriptors[i].entries.len(),
            plan::MAX_ENTRIES
        ),
        Refusal::EmptyDescriptor => {
            format!("domain {domain}: descriptor {i} has no entries: answered OK, no limit")
        }
        Refusal::Override => format!(
            "domain {domain}: descriptor {i}: its limit override was ignored (ALLOW_CLIENT_SHAPES=false, or an unknown unit): the rule answered"
        ),
        Refusal::Refund => format!(
            "domain {domain}: descriptor {i}: is_negative_hits refused (ALLOW_REFUNDS=false): answered OK, nothing given back"
        ),
        Refusal::LeaseId => format!(
            "domain {domain}: descriptor {i} matches a concurrency rule without a usable `acquire` or `release` entry (missing: answered OK, no lease; an empty, over-long or non-UTF-8 id on acquire: OVER_LIMIT)"
        ),
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
