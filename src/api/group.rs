//! What both APIs do when FAILURE_MODE turns a failed bucket of an all-or-nothing group into a
//! denial: give back what the group's other buckets were charged.

use crate::backend::{Backend, BackendError, BucketRequest};
use crate::core::{Decision, Op};

/// The backend saw no denial in the group (some buckets failed instead), so it charged the
/// others; the group is refused after all, so their charges are refunded. Nothing to do when the
/// backend rolled the group back itself (a vetoing denial among the answers).
pub(crate) async fn refund_charges<B: Backend>(
    backend: &B,
    reqs: &[BucketRequest<'_>],
    results: &[Result<Decision, BackendError>],
) {
    let rolled_back = reqs
        .iter()
        .zip(results)
        .any(|(r, d)| r.veto && matches!(d, Ok(d) if !d.allowed));
    if rolled_back {
        return;
    }
    let refunds: Vec<BucketRequest<'_>> = reqs
        .iter()
        .zip(results)
        .filter_map(|(r, d)| match (r.op, d) {
            (Op::Take(hits), Ok(d)) if hits > 0 && d.allowed => Some(BucketRequest {
                op: Op::Refund(hits),
                ..*r
            }),
            _ => None,
        })
        .collect();
    if !refunds.is_empty() {
        backend.decide_group(&refunds, false).await;
    }
}
