//! The per-rule metrics and the counts the status page shows.

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering::Relaxed},
};

use metrics::Counter;

use super::recorder::names;

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
