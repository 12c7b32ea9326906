//! The per-rule metrics and the counts the status page shows.

use std::sync::{
    Arc,
    atomic::{AtomicI64, AtomicU64, Ordering::Relaxed},
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
    /// A `concurrency` rule's leases.
    pub in_flight: Option<InFlightMetrics>,
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
    /// `in_flight`: the rule is an in-flight limit (its leases are counted too).
    pub fn new(domain: &str, rule: &str, in_flight: bool) -> Self {
        let c = |result: &'static str| metrics::counter!(names::RULE_DECISIONS, "domain" => domain.to_string(), "rule" => rule.to_string(), "result" => result);
        Self {
            allowed: c("allowed"),
            denied: c("denied"),
            shadow_denied: c("shadow_denied"),
            near_limit: c("near_limit"),
            tokens: metrics::gauge!(names::TOKENS_REMAINING, "domain" => domain.to_string(), "rule" => rule.to_string()),
            counts: Arc::new(Default::default()),
            in_flight: in_flight.then(|| InFlightMetrics::new(domain, rule)),
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

/// The leases of one in-flight limit (a `concurrency` rule, or the Acquire API's), as this replica
/// saw them: granted here, released here, and found expired by a call made here. Summed over the
/// replicas, `sluicegate_in_flight` is the leases held; on one replica it counts its own grants and
/// frees (and can dip below zero when another replica releases what it granted).
#[derive(Clone)]
pub struct InFlightMetrics {
    held: metrics::Gauge,
    expired: Counter,
    now: Arc<AtomicI64>,
}

impl InFlightMetrics {
    pub fn new(domain: &str, rule: &str) -> Self {
        Self {
            held: metrics::gauge!(names::IN_FLIGHT, "domain" => domain.to_string(), "rule" => rule.to_string()),
            expired: metrics::counter!(names::IN_FLIGHT_EXPIRED, "domain" => domain.to_string(), "rule" => rule.to_string()),
            now: Arc::new(AtomicI64::new(0)),
        }
    }

    /// A lease taken.
    pub fn granted(&self) {
        self.held.increment(1.0);
        self.now.fetch_add(1, Relaxed);
    }

    /// A lease released (`released`), and `expired` leases found gone without a release (leaks).
    pub fn freed(&self, released: bool, expired: u32) {
        let n = i64::from(released) + i64::from(expired);
        if n > 0 {
            self.held.decrement(n as f64);
            self.now.fetch_sub(n, Relaxed);
        }
        if expired > 0 {
            self.expired.increment(u64::from(expired));
        }
    }

    /// Leases held, as this replica counts them.
    pub fn held(&self) -> i64 {
        self.now.load(Relaxed)
    }
}
