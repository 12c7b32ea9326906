//! Any bytes sent to ShouldRateLimit that decode: answered with one status per descriptor, the
//! overall code agreeing with them and no bucket reporting more than it holds. The only error is
//! INVALID_ARGUMENT for what Envoy never sends (no domain, no descriptors): any other error would
//! be Envoy's fail-open, an allow.
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use prost::Message;
use sluicegate::api::{ApiError, EnvoyApi, EnvoySettings};
use sluicegate_core::backend::MemoryBackend;
use sluicegate_core::backend::memory::{Clock as _, ManualClock};
use sluicegate_core::rules::{RulesHandle, parse_text};
use sluicegate_proto::envoy::service::ratelimit::v3::RateLimitRequest;
use sluicegate_proto::envoy::service::ratelimit::v3::rate_limit_response::Code;

/// The largest `burst` of the rules below: no rule's bucket holds more.
const MAX_BURST: u32 = 100;

struct Harness {
    api: EnvoyApi<MemoryBackend<ManualClock>>,
    clock: ManualClock,
    runtime: tokio::runtime::Runtime,
}

fn harness() -> &'static Harness {
    static HARNESS: OnceLock<Harness> = OnceLock::new();
    HARNESS.get_or_init(|| {
        let rules = parse_text(
            "fuzz.yaml",
            r#"
domain: d
descriptors:
  - key: a
    rate_limit: { unit: second, requests_per_unit: 5, burst: 100, name: a }
  - key: a
    value: "x*"
    share_threshold: true
    rate_limit: { unit: minute, requests_per_unit: 3, name: shared }
  - key: b
    value: "0"
    rate_limit: { unit: second, requests_per_unit: 0 }
  - key: b
    value: "u"
    rate_limit: { unlimited: true }
  - key: c
    debt: true
    rate_limit: { unit: hour, requests_per_unit: 10, name: c, replaces: [{ name: a }] }
  - key: s
    shadow_mode: true
    rate_limit: { unit: second, requests_per_unit: 1 }
  - key: n
    descriptors:
      - key: m
        rate_limit: { unit: day, requests_per_unit: 2, unit_multiplier: 3 }
"#,
        )
        .expect("the fuzz rules parse");
        let clock = ManualClock::default();
        clock.set_ms(1_000_000.0);
        let backend = MemoryBackend::with_clock(10_000, clock.clone());
        let api = EnvoyApi::new(
            backend,
            Arc::new(RulesHandle::fixed(rules)),
            EnvoySettings::new("envoy:"),
        );
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a runtime");
        Harness {
            api,
            clock,
            runtime,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&tick, bytes)) = data.split_first() else {
        return;
    };
    let Ok(req) = RateLimitRequest::decode(bytes) else {
        return;
    };
    let h = harness();
    // Time moves on a little between requests, so buckets refill as they would.
    h.clock.set_ms(h.clock.now_ms() + f64::from(tick));
    match h.runtime.block_on(h.api.should_rate_limit(&req)) {
        Ok(resp) => {
            assert_eq!(resp.statuses.len(), req.descriptors.len());
            let any_over = resp
                .statuses
                .iter()
                .any(|s| s.code == Code::OverLimit as i32);
            let overall = if any_over { Code::OverLimit } else { Code::Ok };
            assert_eq!(resp.overall_code, overall as i32, "{req:?} {resp:?}");
            for s in &resp.statuses {
                assert!(
                    s.code == Code::Ok as i32 || s.code == Code::OverLimit as i32,
                    "{s:?}"
                );
                if let Some(limit) = &s.current_limit {
                    let most = limit.requests_per_unit.max(MAX_BURST);
                    assert!(s.limit_remaining <= most, "{req:?} {s:?}");
                    if s.code == Code::OverLimit as i32 {
                        assert_eq!(s.limit_remaining, 0, "{s:?}");
                    }
                }
            }
        }
        Err(ApiError::InvalidArgument { .. })
            if req.domain.is_empty() || req.descriptors.is_empty() => {}
        Err(e) => panic!("{req:?} was not answered: {e}"),
    }
});
