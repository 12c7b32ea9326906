//! Well-formed RateLimitRequests whose descriptor keys and values are arbitrary bytes (any length,
//! not only UTF-8, empty), in any number within the message limit: every one is answered OK or
//! OVER_LIMIT, one status per descriptor, never an error (Envoy would let the request through).
#![no_main]

use std::sync::{Arc, OnceLock};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use prost::Message;
use sluicegate::api::{EnvoyApi, EnvoySettings};
use sluicegate_core::backend::MemoryBackend;
use sluicegate_core::rules::{RulesHandle, parse_text};
use sluicegate_proto::envoy::extensions::common::ratelimit::v3::{
    RateLimitDescriptor, rate_limit_descriptor::Entry,
};
use sluicegate_proto::envoy::service::ratelimit::v3::RateLimitRequest;
use sluicegate_proto::envoy::service::ratelimit::v3::rate_limit_response::Code;

/// GRPC_MAX_MESSAGE_BYTES's default: larger requests never reach the handler.
const MAX_MESSAGE: usize = 1 << 20;

#[derive(Arbitrary, Debug)]
struct Request {
    /// Entries of each descriptor: (key, value) as raw bytes.
    descriptors: Vec<Vec<(Vec<u8>, Vec<u8>)>>,
    hits: u8,
    /// Descriptor overrides' hits and refunds, cycled over the descriptors.
    own_hits: Vec<Option<u8>>,
    negative: bool,
}

struct Harness {
    api: EnvoyApi<MemoryBackend>,
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
    rate_limit: { unit: second, requests_per_unit: 5 }
  - key: a
    value: "p*"
    rate_limit: { unit: minute, requests_per_unit: 3 }
  - key: z
    rate_limit: { unit: second, requests_per_unit: 0 }
  - key: n
    descriptors:
      - key: m
        rate_limit: { unit: day, requests_per_unit: 2 }
"#,
        )
        .expect("the fuzz rules parse");
        let mut settings = EnvoySettings::new("envoy:");
        settings.max_key_bytes = 64;
        settings.max_descriptors = 16;
        Harness {
            api: EnvoyApi::new(
                MemoryBackend::new(10_000),
                Arc::new(RulesHandle::fixed(rules)),
                settings,
            ),
            runtime: tokio::runtime::Builder::new_current_thread()
                .build()
                .expect("a runtime"),
        }
    })
}

fuzz_target!(|input: Request| {
    if input.descriptors.is_empty() {
        return;
    }
    let descriptors: Vec<RateLimitDescriptor> = input
        .descriptors
        .into_iter()
        .enumerate()
        .map(|(i, entries)| RateLimitDescriptor {
            entries: entries
                .into_iter()
                .map(|(key, value)| Entry { key, value })
                .collect(),
            hits_addend: input
                .own_hits
                .get(i % input.own_hits.len().max(1))
                .copied()
                .flatten()
                .map(u64::from),
            is_negative_hits: input.negative && i % 2 == 0,
            ..Default::default()
        })
        .collect();
    let req = RateLimitRequest {
        domain: "d".into(),
        descriptors,
        hits_addend: u32::from(input.hits),
    };
    if req.encoded_len() > MAX_MESSAGE {
        return;
    }
    let h = harness();
    let resp = h
        .runtime
        .block_on(h.api.should_rate_limit(&req))
        .unwrap_or_else(|e| panic!("an error is Envoy's fail-open: {e} for {req:?}"));
    assert_eq!(resp.statuses.len(), req.descriptors.len());
    for s in &resp.statuses {
        assert!(
            s.code == Code::Ok as i32 || s.code == Code::OverLimit as i32,
            "{s:?}"
        );
    }
});
