//! Decision logs: at debug, one line per decision; at info, denials, sampled so that a flood of
//! them cannot flood the log (at most [`DENIALS_PER_SECOND`] lines a second, each saying how many
//! were left out since the previous one).

use std::{
    sync::atomic::{AtomicU64, Ordering::Relaxed},
    time::Instant,
};

use sluicegate_core::Decision;

/// The most denial lines logged at info per second.
pub const DENIALS_PER_SECOND: u32 = 10;

/// Admits at most `per_second` denials a second to the info log.
pub struct DenialSampler {
    per_second: u32,
    started: Instant,
    /// The current second (high 32 bits) and the lines logged in it (low 32 bits).
    window: AtomicU64,
    /// Denials not logged since the last line that was.
    left_out: AtomicU64,
}

impl DenialSampler {
    pub fn new(per_second: u32) -> Self {
        Self {
            per_second,
            started: Instant::now(),
            window: AtomicU64::new(0),
            left_out: AtomicU64::new(0),
        }
    }

    /// Whether this denial gets a line; if so, how many were left out before it.
    pub fn admit(&self) -> Option<u64> {
        self.admit_at(Instant::now())
    }

    fn admit_at(&self, now: Instant) -> Option<u64> {
        let second = now.saturating_duration_since(self.started).as_secs() & 0xffff_ffff;
        let mut current = self.window.load(Relaxed);
        loop {
            let (s, n) = (current >> 32, current & 0xffff_ffff);
            let next = if s != second {
                (second << 32) | 1
            } else if n < u64::from(self.per_second) {
                (second << 32) | (n + 1)
            } else {
                self.left_out.fetch_add(1, Relaxed);
                return None;
            };
            match self
                .window
                .compare_exchange_weak(current, next, Relaxed, Relaxed)
            {
                Ok(_) => return Some(self.left_out.swap(0, Relaxed)),
                Err(seen) => current = seen,
            }
        }
    }
}

/// Logs a ShouldAllow decision: every one at debug, denials sampled at info.
pub fn should_allow(sampler: &DenialSampler, key: &str, cost: u64, d: &Decision) {
    tracing::debug!(
        target: "sluicegate::decision",
        api = "should_allow",
        key,
        cost,
        allowed = d.allowed,
        tokens_remaining = d.tokens_remaining,
        local = d.without_backend,
        "decision"
    );
    if !d.allowed
        && let Some(left_out) = sampler.admit()
    {
        tracing::info!(
            target: "sluicegate::decision",
            api = "should_allow",
            key,
            cost,
            tokens_remaining = d.tokens_remaining,
            retry_after_ms = d.retry_after_ms,
            left_out,
            "denied"
        );
    }
}

/// Logs the decision of one Envoy descriptor: every one at debug, denials sampled at info.
/// `entries` is rendered only when a line is written.
pub fn envoy(
    sampler: &DenialSampler,
    domain: &str,
    rule: &str,
    entries: &dyn std::fmt::Display,
    hits: u64,
    d: &Decision,
    shadow: bool,
) {
    tracing::debug!(
        target: "sluicegate::decision",
        api = "envoy",
        domain,
        rule,
        descriptor = %entries,
        hits,
        allowed = d.allowed,
        shadow,
        tokens_remaining = d.tokens_remaining,
        local = d.without_backend,
        "decision"
    );
    if !d.allowed
        && let Some(left_out) = sampler.admit()
    {
        tracing::info!(
            target: "sluicegate::decision",
            api = "envoy",
            domain,
            rule,
            descriptor = %entries,
            hits,
            shadow,
            tokens_remaining = d.tokens_remaining,
            retry_after_ms = d.retry_after_ms,
            left_out,
            "denied"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn at_most_n_lines_a_second_and_the_rest_counted() {
        let s = DenialSampler::new(3);
        let t0 = s.started;
        let admitted: Vec<Option<u64>> = (0..10).map(|_| s.admit_at(t0)).collect();
        assert_eq!(admitted[..3], [Some(0), Some(0), Some(0)]);
        assert!(admitted[3..].iter().all(Option::is_none));
        // The next second: the first line reports the 7 left out.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(s.admit_at(t1), Some(7));
        assert_eq!(s.admit_at(t1), Some(0));
    }
}
