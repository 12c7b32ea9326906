//! The leases of a request's `concurrency` rules: acquired before its buckets are decided (a
//! refused lease refuses the request, so its buckets are then only asked), released by Envoy's
//! stream-done call (the README's "In-flight limits").
//!
//! A lease granted to a request that is refused all the same (another descriptor over its limit,
//! a failed bucket) is not given back here: Envoy's stream-done call for that request releases
//! it a moment later, and a release of our own before it would let that late call free the slot
//! of another request naming the same id.

use futures::future::join_all;

use super::plan::{Plan, PlannedLease};
use crate::telemetry::RuleMetrics;
use sluicegate_core::backend::{Backend, BackendError, LeaseRequest};
use sluicegate_core::{InFlight, LeaseOp};

/// One answer per planned lease, in order.
pub(super) type Leases = Vec<Result<InFlight, BackendError>>;

/// Acquires and releases the plan's leases, all at once.
pub(super) async fn run<B: Backend>(backend: &B, plan: &Plan) -> Leases {
    if plan.leases.is_empty() {
        return Vec::new();
    }
    join_all(plan.leases.iter().map(|l| backend.lease(request(l)))).await
}

fn request(l: &PlannedLease) -> LeaseRequest<'_> {
    LeaseRequest {
        key: &l.key,
        id: &l.id,
        op: l.op,
    }
}

/// An enforced acquire was refused: the request is over its limit whatever its buckets say.
pub(super) fn refused(plan: &Plan, leases: &Leases) -> bool {
    plan.leases
        .iter()
        .zip(leases)
        .any(|(l, r)| l.veto && l.acquires() && matches!(r, Ok(a) if !a.done))
}

/// A failed acquire, for FAILURE_MODE (a failed release is no decision: its TTL frees it).
pub(super) fn failure<'a>(plan: &Plan, leases: &'a Leases) -> Option<&'a BackendError> {
    plan.leases
        .iter()
        .zip(leases)
        .find_map(|(l, r)| r.as_ref().err().filter(|_| l.acquires()))
}

/// Counts the leases in their rules' metrics: taken, released, and found expired without a
/// release.
pub(super) fn observe(plan: &Plan, leases: &Leases, rules: &[RuleMetrics]) {
    for (l, r) in plan.leases.iter().zip(leases) {
        let (Ok(a), Some(m)) = (r, rules.get(l.rule).and_then(|m| m.in_flight.as_ref())) else {
            continue;
        };
        match l.op {
            LeaseOp::Acquire { .. } if a.done => m.granted(),
            LeaseOp::Release => m.freed(a.done, 0),
            _ => {}
        }
        m.freed(false, a.expired);
    }
}
