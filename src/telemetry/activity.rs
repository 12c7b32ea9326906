//! What the limiter is doing, kept in this process for the status page and `/debug` (the README's "Operating it"):
//! the last minutes second by second, the heaviest denied keys, each rule's decisions, the
//! circuit of every Redis node; and the two things every decision goes through on its way out:
//! the near-limit test and the decision log.

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering::Relaxed},
};

use arc_swap::ArcSwapOption;
use parking_lot::Mutex;

use super::decision_log::{DENIALS_PER_SECOND, DenialSampler};
use super::live::LiveStats;
use super::rule_metrics::{RuleCounts, RuleMetrics};
use super::top_keys::{TopKey, TopKeys};
use sluicegate_core::Decision;
use sluicegate_core::rules::{Limit, RuleSet};

/// The per-rule metrics of one loaded rule set, by rule id.
pub struct RuleMetricsFor {
    pub set: Arc<RuleSet>,
    pub metrics: Vec<RuleMetrics>,
}

/// One rule's decisions since its rules were loaded (hits, as the Prometheus counters count).
#[derive(Clone, Debug, serde::Serialize)]
pub struct RuleStat {
    pub domain: String,
    pub rule: String,
    pub allowed: u64,
    pub denied: u64,
    pub shadow_denied: u64,
    pub near_limit: u64,
    /// A `concurrency` rule: leases held, as this replica counts them.
    pub in_flight: Option<i64>,
}

/// One Redis node's circuit breaker.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Circuit {
    pub node: String,
    pub open: bool,
}

/// Shared by both APIs and the HTTP port of one server.
pub struct Activity {
    pub live: LiveStats,
    top: Option<TopKeys>,
    denials: DenialSampler,
    near_limit_ratio: f64,
    circuits: Mutex<Vec<(String, Arc<AtomicBool>)>>,
    rules: ArcSwapOption<RuleMetricsFor>,
}

impl std::fmt::Debug for Activity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Activity")
            .field("top_keys", &self.top.is_some())
            .field("near_limit_ratio", &self.near_limit_ratio)
            .finish_non_exhaustive()
    }
}

impl Default for Activity {
    /// The README's defaults: TOP_KEYS=100, NEAR_LIMIT_RATIO=0.8.
    fn default() -> Self {
        Self::new(100, 0.8)
    }
}

impl Activity {
    /// `top_keys` counters for the denied-keys sketch (0: none); `near_limit_ratio` as
    /// NEAR_LIMIT_RATIO.
    pub fn new(top_keys: usize, near_limit_ratio: f64) -> Self {
        Self {
            live: LiveStats::new(),
            top: (top_keys > 0).then(|| TopKeys::new(top_keys)),
            denials: DenialSampler::new(DENIALS_PER_SECOND),
            near_limit_ratio,
            circuits: Mutex::new(Vec::new()),
            rules: ArcSwapOption::empty(),
        }
    }

    /// Whether an allowed decision left less than (1 - NEAR_LIMIT_RATIO) of the capacity.
    pub fn is_near_limit(&self, d: &Decision, capacity: f64) -> bool {
        d.allowed && d.tokens_remaining < (1.0 - self.near_limit_ratio) * capacity
    }

    /// Counts a denial of `key` in the sketch; `key` is only built when the sketch is on.
    pub fn denied(&self, key: impl FnOnce() -> String) {
        if let Some(top) = &self.top {
            top.record(&key());
        }
    }

    /// Counts a denial of a key the caller already holds as text.
    pub fn denied_str(&self, key: &str) {
        if let Some(top) = &self.top {
            top.record(key);
        }
    }

    /// The heaviest denied keys now (empty with TOP_KEYS=0).
    pub fn top(&self, n: usize) -> Vec<TopKey> {
        self.top.as_ref().map_or_else(Vec::new, |t| t.top(n))
    }

    pub fn top_enabled(&self) -> bool {
        self.top.is_some()
    }

    pub fn denial_sampler(&self) -> &DenialSampler {
        &self.denials
    }

    /// A gauge for a node's breaker that the status page can read too.
    pub fn circuit_gauge(&self, node: &str, gauge: metrics::Gauge) -> metrics::Gauge {
        let open = Arc::new(AtomicBool::new(false));
        self.circuits.lock().push((node.to_string(), open.clone()));
        metrics::Gauge::from_arc(Arc::new(Tee { gauge, open }))
    }

    /// Every Redis node's breaker, by address.
    pub fn circuits(&self) -> Vec<Circuit> {
        let mut out: Vec<Circuit> = Vec::new();
        for (node, open) in self.circuits.lock().iter() {
            // A node seen again (a reconnect, a topology refresh) keeps one row: the latest.
            out.retain(|c| &c.node != node);
            out.push(Circuit {
                node: node.clone(),
                open: open.load(Relaxed),
            });
        }
        out.sort_by(|a, b| a.node.cmp(&b.node));
        out
    }

    /// The metrics of the rules in force, registered once per loaded rule set.
    pub fn rule_metrics(&self, set: &Arc<RuleSet>) -> Arc<RuleMetricsFor> {
        if let Some(current) = self.rules.load_full()
            && Arc::ptr_eq(&current.set, set)
        {
            return current;
        }
        let fresh = Arc::new(RuleMetricsFor {
            set: set.clone(),
            metrics: set
                .rules()
                .iter()
                .map(|r| {
                    let in_flight = matches!(r.limit, Limit::InFlight { .. });
                    RuleMetrics::new(&r.domain, &r.label, in_flight)
                })
                .collect(),
        });
        self.rules.store(Some(fresh.clone()));
        fresh
    }

    /// Each rule's decisions since the rules in force were first used.
    pub fn rule_stats(&self) -> Vec<RuleStat> {
        let Some(current) = self.rules.load_full() else {
            return Vec::new();
        };
        current
            .set
            .rules()
            .iter()
            .zip(&current.metrics)
            .map(|(rule, m)| {
                let RuleCounts {
                    allowed,
                    denied,
                    shadow_denied,
                    near_limit,
                } = m.counts();
                RuleStat {
                    domain: rule.domain.clone(),
                    rule: rule.label.clone(),
                    allowed,
                    denied,
                    shadow_denied,
                    near_limit,
                    in_flight: m.in_flight.as_ref().map(|f| f.held()),
                }
            })
            .collect()
    }
}

/// Forwards to the Prometheus gauge and keeps "open" where the status page can read it.
struct Tee {
    gauge: metrics::Gauge,
    open: Arc<AtomicBool>,
}

impl metrics::GaugeFn for Tee {
    fn increment(&self, value: f64) {
        self.gauge.increment(value);
    }

    fn decrement(&self, value: f64) {
        self.gauge.decrement(value);
    }

    fn set(&self, value: f64) {
        self.gauge.set(value);
        self.open.store(value > 0.0, Relaxed);
    }
}
