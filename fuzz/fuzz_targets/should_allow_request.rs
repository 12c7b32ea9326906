//! Any bytes sent to ShouldAllow, ShouldAllowBatch or Settle: either refused as the caller's fault
//! (never as a backend failure, which FAILURE_MODE=allow would turn into an allow), or answered
//! with figures inside the bucket: tokens between -capacity and capacity, a wait exactly when
//! denied, a batch's verdict the conjunction of its answers.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use prost::Message;
use sluicegate::api::{ApiError, ShouldAllowApi, ShouldAllowSettings};
use sluicegate_core::Shape;
use sluicegate_core::backend::MemoryBackend;
use sluicegate_core::backend::memory::{Clock as _, ManualClock};
use sluicegate_proto::sluicegate::v1::{
    SettleRequest, ShouldAllowBatchRequest, ShouldAllowRequest, ShouldAllowResponse,
};

struct Harness {
    api: ShouldAllowApi<MemoryBackend<ManualClock>>,
    clock: ManualClock,
    runtime: tokio::runtime::Runtime,
}

fn harness() -> &'static Harness {
    static HARNESS: OnceLock<Harness> = OnceLock::new();
    HARNESS.get_or_init(|| {
        let clock = ManualClock::default();
        clock.set_ms(1_000_000.0);
        let backend = MemoryBackend::with_clock(10_000, clock.clone());
        let defaults = ShouldAllowSettings::new(Shape::new(20.0, 20.0).expect("a shape"), "tb:");
        Harness {
            api: ShouldAllowApi::new(backend, defaults),
            clock,
            runtime: tokio::runtime::Builder::new_current_thread()
                .build()
                .expect("a runtime"),
        }
    })
}

fn check(r: &ShouldAllowResponse) {
    assert!(r.capacity.is_finite() && r.capacity > 0.0, "{r:?}");
    assert!(r.rate.is_finite() && r.rate > 0.0, "{r:?}");
    assert!(
        r.tokens_remaining <= r.capacity && r.tokens_remaining >= -r.capacity,
        "{r:?}"
    );
    assert_eq!(r.allowed, r.retry_after_ms == 0, "{r:?}");
    assert!(!r.degraded, "{r:?}");
}

/// Refused for the request's own sake: bad input, a refund on the caller's word (ALLOW_REFUNDS is
/// off by default), an unknown reservation id. Never a backend failure.
fn caller_fault(e: ApiError) {
    match e {
        ApiError::InvalidArgument { .. }
        | ApiError::OutOfBounds { .. }
        | ApiError::PermissionDenied(_)
        | ApiError::NotFound(_) => {}
        e => panic!("not refused as the caller's fault: {e}"),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, bytes)) = data.split_first() else {
        return;
    };
    let h = harness();
    h.clock.set_ms(h.clock.now_ms() + f64::from(selector >> 2));
    match selector % 3 {
        0 => {
            let Ok(req) = ShouldAllowRequest::decode(bytes) else {
                return;
            };
            match h.runtime.block_on(h.api.should_allow(&req)) {
                Ok(r) => check(&r),
                Err(e) => caller_fault(e),
            }
        }
        1 => {
            let Ok(req) = ShouldAllowBatchRequest::decode(bytes) else {
                return;
            };
            match h.runtime.block_on(h.api.should_allow_batch(&req)) {
                Ok(r) => {
                    assert_eq!(r.responses.len(), req.requests.len());
                    r.responses.iter().for_each(check);
                    assert_eq!(r.allowed, r.responses.iter().all(|x| x.allowed));
                }
                Err(e) => caller_fault(e),
            }
        }
        _ => {
            let Ok(req) = SettleRequest::decode(bytes) else {
                return;
            };
            match h.runtime.block_on(h.api.settle(&req)) {
                Ok(r) => {
                    assert!(r.tokens_remaining.is_finite(), "{r:?}");
                    assert_eq!(r.in_debt, r.tokens_remaining < 0.0, "{r:?}");
                    assert!(!r.degraded);
                }
                Err(e) => caller_fault(e),
            }
        }
    }
});
