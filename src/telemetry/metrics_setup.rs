//! The Prometheus recorder and the metric names, each described once.

use std::sync::{
    Arc, OnceLock,
    atomic::{AtomicU64, Ordering::Relaxed},
};

use metrics::{Counter, Histogram, describe_counter, describe_gauge, describe_histogram};

use super::activity::Activity;
use super::live::Api;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Metric names (the README's "Operating it"): promises to dashboards, never renamed.
pub mod names {
    pub const DECISIONS: &str = "sluicegate_decisions_total";
    pub const DECISION_DURATION: &str = "sluicegate_decision_duration_seconds";
    pub const BACKEND_DURATION: &str = "sluicegate_backend_duration_seconds";
    pub const BACKEND_ERRORS: &str = "sluicegate_backend_errors_total";
    pub const FAILURE_MODE: &str = "sluicegate_failure_mode_total";
    pub const BUILD_INFO: &str = "sluicegate_build_info";
    pub const RULE_DECISIONS: &str = "sluicegate_rule_decisions_total";
    pub const TOKENS_REMAINING: &str = "sluicegate_tokens_remaining";
    pub const RULES_RELOADS: &str = "sluicegate_rules_reloads_total";
    pub const SHED: &str = "sluicegate_shed_total";
    pub const LOCAL_ANSWERS: &str = "sluicegate_local_answers_total";
    pub const BATCH_SIZE: &str = "sluicegate_backend_batch_size";
    pub const CIRCUIT_OPEN: &str = "sluicegate_backend_circuit_open";
    pub const MEMORY_EVICTIONS: &str = "sluicegate_memory_evictions_total";
    pub const NEAR_LIMIT: &str = "sluicegate_near_limit_total";
    pub const REFUSED: &str = "sluicegate_refused_total";
}

/// Histogram buckets in seconds: fine below a millisecond (memory decisions take microseconds)
/// up to 100 ms and a little beyond (a Redis timeout shows up in the top buckets).
const LATENCY_BUCKETS: &[f64] = &[
    0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1,
    0.25, 1.0,
];

/// Decisions per script call: 1 when idle, up to the cap (128) under load.
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0];

/// Renders the Prometheus text; cheap to clone.
#[derive(Clone)]
pub struct MetricsHandle {
    prometheus: PrometheusHandle,
    process: &'static metrics_process::Collector,
}

impl MetricsHandle {
    /// The exposition text, with process metrics refreshed first.
    pub fn render(&self) -> String {
        self.process.collect();
        self.prometheus.render()
    }

    /// Drains histogram samples into their buckets; run periodically.
    pub fn run_upkeep(&self) {
        self.prometheus.run_upkeep();
    }
}

/// Installs the global recorder for sluicegate (once per process; later calls return the same
/// handle) and describes every metric.
pub fn install_metrics() -> MetricsHandle {
    install_recorder(|| {
        describe();
        metrics::gauge!(names::BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    })
}

/// Installs the Prometheus recorder with process metrics; `describe` runs once, after it.
pub fn install_recorder(describe: fn()) -> MetricsHandle {
    static HANDLE: OnceLock<MetricsHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Full(names::BATCH_SIZE.into()), BATCH_BUCKETS)
                })
                .expect("the bucket lists are not empty")
                .build_recorder();
            let prometheus = recorder.handle();
            // Another recorder may be installed already (an embedding application); keep ours
            // rendering what it can rather than failing the server.
            let _ = metrics::set_global_recorder(recorder);
            let process: &'static _ = Box::leak(Box::new(metrics_process::Collector::default()));
            process.describe();
            describe();
            MetricsHandle {
                prometheus,
                process,
            }
        })
        .clone()
}

fn describe() {
    use metrics::Unit;
    describe_counter!(names::DECISIONS, "Decisions answered, by API and result.");
    describe_histogram!(
        names::DECISION_DURATION,
        Unit::Seconds,
        "Time to answer one decision call, by API."
    );
    describe_histogram!(
        names::BACKEND_DURATION,
        Unit::Seconds,
        "Time of one backend call, by backend."
    );
    describe_counter!(
        names::BACKEND_ERRORS,
        "Failed backend calls, by backend and kind."
    );
    describe_counter!(
        names::FAILURE_MODE,
        "Answers decided by FAILURE_MODE because the backend failed, by mode."
    );
    describe_gauge!(
        names::BUILD_INFO,
        "Always 1; the version label says which build runs."
    );
    describe_counter!(
        names::RULE_DECISIONS,
        "Hits decided per Envoy rule, by domain, rule and result (allowed, denied, shadow_denied; near_limit counts allowed hits that left the bucket near its limit)."
    );
    describe_counter!(
        names::NEAR_LIMIT,
        "Allowed decisions that left less than (1 - NEAR_LIMIT_RATIO) of the capacity, by API."
    );
    describe_gauge!(
        names::TOKENS_REMAINING,
        "Tokens left after the latest decision of the rule, by domain and rule."
    );
    describe_counter!(
        names::RULES_RELOADS,
        "Rules loads and reloads, by outcome (ok, error)."
    );
    describe_counter!(
        names::MEMORY_EVICTIONS,
        "Memory buckets dropped because MEMORY_MAX_BUCKETS was reached, by whether they were full (nothing lost) or partial (the key starts full again)."
    );
    describe_counter!(
        names::LOCAL_ANSWERS,
        "Decisions answered by the local deny cache without calling Redis, by API."
    );
    describe_histogram!(
        names::BATCH_SIZE,
        "Bucket decisions per Redis script call, by backend."
    );
    describe_gauge!(
        names::CIRCUIT_OPEN,
        "1 while the circuit breaker of a Redis node is open (calls answered at once), by node."
    );
    describe_counter!(
        names::REFUSED,
        "Requests answered without evaluating all of them as asked (past the bounds, a descriptor with no entries, an ignored override, a refused refund), by API and reason."
    );
    describe_counter!(
        names::SHED,
        "Calls refused before any work, by reason (concurrency, message_size, bounds)."
    );
}

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
    /// `api` is `should_allow` or `envoy`; `activity` sees every decision too (the status page).
    pub fn new(api: &'static str, activity: Arc<Activity>) -> Self {
        let c = |result: &'static str| metrics::counter!(names::DECISIONS, "api" => api, "result" => result);
        Self {
            allowed: c("allowed"),
            denied: c("denied"),
            error: c("error"),
            local: metrics::counter!(names::LOCAL_ANSWERS, "api" => api),
            near_limit: metrics::counter!(names::NEAR_LIMIT, "api" => api),
            duration: metrics::histogram!(names::DECISION_DURATION, "api" => api),
            api: if api == "envoy" {
                Api::Envoy
            } else {
                Api::ShouldAllow
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

    /// Counts a decision that left its bucket near the limit.
    pub fn near_limit(&self) {
        self.near_limit.increment(1);
        self.activity.live.near_limit();
    }

    /// Counts the decisions the deny cache answered without the backend.
    pub fn local(&self, decisions: &[&sluicegate_core::Decision]) {
        let n = decisions.iter().filter(|d| d.without_backend).count();
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

/// The per-rule metrics, registered when a rule is loaded so that each series exists (at 0) from
/// then on and the hot path only increments. The counts are kept here too, for the status page.
#[derive(Clone)]
pub struct RuleMetrics {
    allowed: Counter,
    denied: Counter,
    shadow_denied: Counter,
    near_limit: Counter,
    tokens: metrics::Gauge,
    counts: Arc<[AtomicU64; 4]>,
}

/// A rule's hits by result since its rules were loaded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuleCounts {
    pub allowed: u64,
    pub denied: u64,
    pub shadow_denied: u64,
    pub near_limit: u64,
}

impl RuleMetrics {
    pub fn new(domain: &str, rule: &str) -> Self {
        let c = |result: &'static str| metrics::counter!(names::RULE_DECISIONS, "domain" => domain.to_string(), "rule" => rule.to_string(), "result" => result);
        Self {
            allowed: c("allowed"),
            denied: c("denied"),
            shadow_denied: c("shadow_denied"),
            near_limit: c("near_limit"),
            tokens: metrics::gauge!(names::TOKENS_REMAINING, "domain" => domain.to_string(), "rule" => rule.to_string()),
            counts: Arc::new(Default::default()),
        }
    }

    /// Counts one decision (`hits` is the cost) and the tokens left after it, when a bucket was
    /// asked. `near` (an allowed decision that left the bucket near its limit) counts in
    /// `near_limit` as well as in `allowed`.
    pub fn record(
        &self,
        allowed: bool,
        shadow: bool,
        hits: u64,
        tokens_remaining: Option<f64>,
        near: bool,
    ) {
        let (counter, slot) = match (allowed, shadow) {
            (true, _) => (&self.allowed, 0),
            (false, false) => (&self.denied, 1),
            (false, true) => (&self.shadow_denied, 2),
        };
        counter.increment(hits);
        self.counts[slot].fetch_add(hits, Relaxed);
        if near {
            self.near_limit.increment(hits);
            self.counts[3].fetch_add(hits, Relaxed);
        }
        if let Some(tokens) = tokens_remaining {
            self.tokens.set(tokens);
        }
    }

    pub fn counts(&self) -> RuleCounts {
        let c = |i: usize| self.counts[i].load(Relaxed);
        RuleCounts {
            allowed: c(0),
            denied: c(1),
            shadow_denied: c(2),
            near_limit: c(3),
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
}

impl Default for ShedMetrics {
    fn default() -> Self {
        let c = |reason: &'static str| metrics::counter!(names::SHED, "reason" => reason);
        Self {
            concurrency: c("concurrency"),
            message_size: c("message_size"),
            bounds: c("bounds"),
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
    }
}
