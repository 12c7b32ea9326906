//! The metric handles the hot path increments, registered once (each series exists at 0 from the
//! start): per API, FAILURE_MODE answers, reloads, shedding, refusals, and the backends' own.

use std::sync::Arc;

use metrics::{Counter, Histogram};

use super::activity::Activity;
use super::live::Api;
use super::recorder::names;

/// The decision metrics of one API, registered once so the hot path only increments.
#[derive(Clone)]
pub struct DecisionMetrics {
    allowed: Counter,
    denied: Counter,
    error: Counter,
    local: Counter,
    near_limit: Counter,
    duration: Histogram,
    api: Api,
    activity: Arc<Activity>,
}

impl DecisionMetrics {
    /// `api` is `should_allow`, `envoy`, `concurrency` or `rlqs`; `activity` sees every decision too (the status page).
    pub fn new(api: &'static str, activity: Arc<Activity>) -> Self {
        let c = |result: &'static str| metrics::counter!(names::DECISIONS, "api" => api, "result" => result);
        Self {
            allowed: c("allowed"),
            denied: c("denied"),
            error: c("error"),
            local: metrics::counter!(names::LOCAL_ANSWERS, "api" => api),
            near_limit: metrics::counter!(names::NEAR_LIMIT, "api" => api),
            duration: metrics::histogram!(names::DECISION_DURATION, "api" => api),
            api: match api {
                "envoy" => Api::Envoy,
                "concurrency" => Api::Concurrency,
                "rlqs" => Api::Rlqs,
                _ => Api::ShouldAllow,
            },
            activity,
        }
    }

    /// Counts one decision (None: the backend failed) and times the call.
    pub fn record(&self, outcome: Option<bool>, started: std::time::Instant) {
        self.count(outcome);
        self.time(started);
    }

    /// Counts one decision of a call that makes several.
    pub fn count(&self, outcome: Option<bool>) {
        match outcome {
            Some(true) => self.allowed.increment(1),
            Some(false) => self.denied.increment(1),
            None => self.error.increment(1),
        }
        self.activity.live.count(self.api, outcome, 1);
    }

    /// Counts `n` decisions of one outcome made elsewhere (Envoys deciding from RLQS assignments).
    pub fn count_many(&self, allowed: bool, n: u64) {
        if n == 0 {
            return;
        }
        if allowed {
            self.allowed.increment(n);
        } else {
            self.denied.increment(n);
        }
        self.activity.live.count(self.api, Some(allowed), n);
    }

    /// Counts a decision that left its bucket near the limit.
    pub fn near_limit(&self) {
        self.near_limit.increment(1);
        self.activity.live.near_limit();
    }

    /// Counts the decisions the deny cache answered without the backend.
    pub fn local<'a>(&self, decisions: impl IntoIterator<Item = &'a sluicegate_core::Decision>) {
        let n = decisions.into_iter().filter(|d| d.without_backend).count();
        if n > 0 {
            self.local.increment(n as u64);
        }
    }

    /// Times one call.
    pub fn time(&self, started: std::time::Instant) {
        let took = started.elapsed();
        self.duration.record(took.as_secs_f64());
        self.activity.live.latency(took);
    }
}

/// Counts answers given by FAILURE_MODE.
#[derive(Clone)]
pub struct FailureModeMetrics {
    allow: Counter,
    deny: Counter,
}

impl Default for FailureModeMetrics {
    fn default() -> Self {
        Self {
            allow: metrics::counter!(names::FAILURE_MODE, "mode" => "allow"),
            deny: metrics::counter!(names::FAILURE_MODE, "mode" => "deny"),
        }
    }
}

impl FailureModeMetrics {
    pub fn record(&self, allowed: bool) {
        if allowed {
            self.allow.increment(1)
        } else {
            self.deny.increment(1)
        }
    }
}

/// Counts rules reloads by outcome.
#[derive(Clone)]
pub struct ReloadMetrics {
    ok: Counter,
    error: Counter,
}

impl Default for ReloadMetrics {
    fn default() -> Self {
        Self {
            ok: metrics::counter!(names::RULES_RELOADS, "outcome" => "ok"),
            error: metrics::counter!(names::RULES_RELOADS, "outcome" => "error"),
        }
    }
}

impl ReloadMetrics {
    pub fn record(&self, ok: bool) {
        if ok {
            self.ok.increment(1)
        } else {
            self.error.increment(1)
        }
    }
}

/// Calls refused before any work, by reason.
#[derive(Clone)]
pub struct ShedMetrics {
    pub concurrency: Counter,
    pub message_size: Counter,
    pub bounds: Counter,
    /// A call whose deadline left no time to decide.
    pub deadline: Counter,
    /// A call that waited for its turn longer than MAX_QUEUE_MS.
    pub queue: Counter,
    /// A call beyond the adaptive concurrency limit.
    pub adaptive: Counter,
    /// A TLS connection closed at once: its peer had its share of handshakes in progress.
    pub handshake: Counter,
    /// A TLS handshake in progress cut so that a newer one could start (the gate was full).
    pub handshake_cut: Counter,
}

impl Default for ShedMetrics {
    fn default() -> Self {
        let c = |reason: &'static str| metrics::counter!(names::SHED, "reason" => reason);
        Self {
            concurrency: c("concurrency"),
            message_size: c("message_size"),
            bounds: c("bounds"),
            deadline: c("deadline"),
            queue: c("queue"),
            adaptive: c("adaptive"),
            handshake: c("handshake"),
            handshake_cut: c("handshake_cut"),
        }
    }
}

/// Parts of requests answered without being evaluated as asked: one counter per reason,
/// registered (at 0) up front, and a warning line, sampled so a flood cannot flood the log.
pub struct RefusedMetrics {
    api: &'static str,
    counters: Vec<(&'static str, Counter)>,
    sampler: super::decision_log::DenialSampler,
}

impl RefusedMetrics {
    pub fn new(api: &'static str, reasons: &[&'static str]) -> Self {
        Self {
            api,
            counters: reasons
                .iter()
                .map(|&r| {
                    (
                        r,
                        metrics::counter!(names::REFUSED, "api" => api, "reason" => r),
                    )
                })
                .collect(),
            sampler: super::decision_log::DenialSampler::new(
                super::decision_log::DENIALS_PER_SECOND,
            ),
        }
    }

    /// Counts one refusal of `reason` (one of those given to `new`) and may log `detail`.
    pub fn record(&self, reason: &'static str, detail: impl FnOnce() -> String) {
        if let Some((_, c)) = self.counters.iter().find(|(r, _)| *r == reason) {
            c.increment(1);
        }
        if let Some(left_out) = self.sampler.admit() {
            tracing::warn!(
                api = self.api,
                reason,
                detail = detail(),
                left_out,
                "request answered without evaluating it as asked"
            );
        }
    }
}

/// The memory backend's eviction counters, registered (at 0) from the start.
pub fn eviction_counters() -> sluicegate_core::backend::memory::EvictionCounters {
    let c = |bucket: &'static str| metrics::counter!(names::MEMORY_EVICTIONS, "bucket" => bucket);
    sluicegate_core::backend::memory::EvictionCounters {
        full: Some(c("full")),
        partial: Some(c("partial")),
    }
}

/// The Redis backend's metric handles: batch sizes and a breaker gauge per node.
/// The breaker gauges also tell `activity`, for the status page.
pub fn redis_metrics(activity: Arc<Activity>) -> sluicegate_core::backend::redis::RedisMetrics {
    sluicegate_core::backend::redis::RedisMetrics {
        batch_size: Some(metrics::histogram!(names::BATCH_SIZE, "backend" => "redis")),
        circuit: Some(Arc::new(move |node: &str| {
            activity.circuit_gauge(
                node,
                metrics::gauge!(names::CIRCUIT_OPEN, "node" => node.to_string()),
            )
        })),
        gone: Some(metrics::counter!(names::GONE_REFUNDS, "backend" => "redis")),
        queue_shed: Some(metrics::counter!(names::SHED, "reason" => "queue")),
        leases: Some(lease_counters()),
    }
}

/// The lease counters (QUOTA_LEASES), each existing at 0 from the start.
pub fn lease_counters() -> sluicegate_core::backend::redis::LeaseCounters {
    sluicegate_core::backend::redis::LeaseCounters {
        granted: metrics::counter!(names::LEASES),
        tokens: metrics::counter!(names::LEASED_TOKENS),
        returned: metrics::counter!(names::LEASE_RETURNED_TOKENS),
        answers: metrics::counter!(names::LEASE_ANSWERS),
    }
}
