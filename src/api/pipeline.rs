//! The steps both APIs share after the backend decided: FAILURE_MODE for what failed, and the
//! compensation of an all-or-nothing group that is refused after all. Written once, here.
//!
//! The compensation runs in a task of its own, which the caller then waits for: a caller that goes
//! away (its deadline passed, the connection dropped) drops its handler, and refunds made there
//! would be lost with it, leaving tokens spent for nobody; the task finishes regardless. At most
//! [`MAX_DETACHED`] run at once; beyond that the caller makes its own (the backend bounds each
//! call in time).

use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};

use crate::telemetry::FailureModeMetrics;
use sluicegate_core::backend::{Backend, BackendError, BucketRequest};
use sluicegate_core::{Decision, FailureMode, Op, Shape};

/// Compensations in flight at most, detached from their callers.
const MAX_DETACHED: usize = 1024;

/// FAILURE_MODE with its metrics.
pub(crate) struct Fallback {
    mode: FailureMode,
    metrics: FailureModeMetrics,
}

impl Fallback {
    pub fn new(mode: FailureMode) -> Self {
        Self {
            mode,
            metrics: FailureModeMetrics::default(),
        }
    }

    /// FAILURE_MODE's verdict for a request whose backend call failed with `e`: `None` means
    /// report the error (UNAVAILABLE). Counted per answer; logged per call at debug only (an
    /// outage would flood the log; health logs the transition).
    pub fn verdict(&self, e: &BackendError) -> Option<bool> {
        let allowed = self.mode.fallback_allowed();
        match allowed {
            Some(allowed) => {
                tracing::debug!(error = %e, allowed, "backend failed; FAILURE_MODE answered");
                self.metrics.record(allowed);
            }
            None => tracing::debug!(error = %e, "backend failed; answering UNAVAILABLE"),
        }
        allowed
    }
}

/// Gives back what the takes of an all-or-nothing group were charged, when the group is refused
/// after all because some of its buckets failed (FAILURE_MODE deny, or error: the caller gets no
/// answer, so nothing may stay charged). Nothing to do when the backend rolled the group back
/// itself (a vetoing denial among the answers). Detached from the caller (see the module).
pub(crate) async fn compensate<B: Backend>(
    backend: &Arc<B>,
    reqs: &[BucketRequest<'_>],
    results: &[Result<Decision, BackendError>],
) {
    static DETACHED: AtomicUsize = AtomicUsize::new(0);
    let rolled_back = reqs
        .iter()
        .zip(results)
        .any(|(r, d)| r.ask.veto && matches!(d, Ok(d) if !d.allowed));
    if rolled_back {
        return;
    }
    let refunds: Vec<(String, Shape, u64)> = reqs
        .iter()
        .zip(results)
        .filter_map(|(r, d)| match d {
            Ok(d) if d.granted > 0 => Some((r.key.to_string(), r.ask.shape, d.granted)),
            _ => None,
        })
        .collect();
    if refunds.is_empty() {
        return;
    }
    let run = {
        let backend = backend.clone();
        async move {
            let reqs: Vec<BucketRequest<'_>> = refunds
                .iter()
                .map(|(key, shape, hits)| BucketRequest::new(key, *shape, Op::Refund(*hits)))
                .collect();
            for failed in backend
                .decide_group(&reqs, false)
                .await
                .iter()
                .filter_map(|r| r.as_ref().err())
            {
                tracing::warn!(error = %failed, "a compensating refund failed; those tokens stay spent");
            }
        }
    };
    if DETACHED.fetch_add(1, Ordering::Relaxed) < MAX_DETACHED {
        let task = tokio::spawn(async move {
            run.await;
            DETACHED.fetch_sub(1, Ordering::Relaxed);
        });
        // Answered after the refunds landed; dropping this wait leaves the task running.
        let _ = task.await;
    } else {
        DETACHED.fetch_sub(1, Ordering::Relaxed);
        run.await;
    }
}
