//! Wire compatibility of sluicegate's Envoy protos with the `envoy-types` crate (generated from
//! envoyproxy/data-plane-api): every field of a request and a response, encoded by one side and
//! re-encoded by the other, gives identical bytes, both ways.

use envoy_types::pb::envoy as et;
use envoy_types::pb::google::protobuf as etp;
use prost::Message;
use sluicegate_proto::envoy as tg;

fn envoy_types_request() -> et::service::ratelimit::v3::RateLimitRequest {
    use et::extensions::common::ratelimit::v3::{RateLimitDescriptor, rate_limit_descriptor as d};
    et::service::ratelimit::v3::RateLimitRequest {
        domain: "edge".into(),
        descriptors: vec![
            RateLimitDescriptor {
                entries: vec![
                    d::Entry {
                        key: "tenant".into(),
                        value: "acme".into(),
                    },
                    d::Entry {
                        key: "api_key".into(),
                        value: "premium-1".into(),
                    },
                ],
                limit: Some(d::RateLimitOverride {
                    requests_per_unit: 42,
                    unit: et::r#type::v3::RateLimitUnit::Minute as i32,
                }),
                hits_addend: Some(etp::UInt64Value { value: 7 }),
                is_negative_hits: true,
            },
            RateLimitDescriptor {
                entries: vec![d::Entry {
                    key: "remote_address".into(),
                    value: "10.0.0.1".into(),
                }],
                limit: None,
                hits_addend: Some(etp::UInt64Value { value: 0 }),
                is_negative_hits: false,
            },
        ],
        hits_addend: 3,
    }
}

fn envoy_types_response() -> et::service::ratelimit::v3::RateLimitResponse {
    use et::service::ratelimit::v3::rate_limit_response::{self as r, rate_limit::Unit};
    let header = |k: &str, v: &str| et::config::core::v3::HeaderValue {
        key: k.into(),
        value: v.into(),
        raw_value: v.as_bytes().to_vec(),
    };
    let quota = r::Quota {
        requests: 5,
        id: "q1".into(),
        expiration_specifier: Some(r::quota::ExpirationSpecifier::ValidUntil(etp::Timestamp {
            seconds: 1_800_000_000,
            nanos: 5,
        })),
    };
    et::service::ratelimit::v3::RateLimitResponse {
        overall_code: r::Code::OverLimit as i32,
        statuses: vec![
            r::DescriptorStatus {
                code: r::Code::OverLimit as i32,
                current_limit: Some(r::RateLimit {
                    name: "weekly".into(),
                    requests_per_unit: 100,
                    unit: Unit::Week as i32,
                }),
                limit_remaining: 0,
                duration_until_reset: Some(etp::Duration {
                    seconds: 3,
                    nanos: 250_000_000,
                }),
                quota: Some(quota.clone()),
            },
            r::DescriptorStatus {
                code: r::Code::Ok as i32,
                ..Default::default()
            },
        ],
        response_headers_to_add: vec![header("x-ratelimit-limit", "100"), header("x-a", "b")],
        request_headers_to_add: vec![header("x-sluicegate", "1")],
        raw_body: b"slow down".to_vec(),
        dynamic_metadata: Some(etp::Struct {
            fields: [(
                "tier".to_string(),
                etp::Value {
                    kind: Some(etp::value::Kind::StringValue("gold".into())),
                },
            )]
            .into_iter()
            .collect(),
        }),
        quota: Some(quota),
    }
}

#[test]
fn request_bytes_identical_both_ways() {
    let theirs = envoy_types_request().encode_to_vec();
    let ours = tg::service::ratelimit::v3::RateLimitRequest::decode(theirs.as_slice()).unwrap();
    // Every field arrived with its meaning.
    assert_eq!(ours.domain, "edge");
    assert_eq!(ours.hits_addend, 3);
    let d0 = &ours.descriptors[0];
    assert_eq!(
        (d0.entries[1].key.as_slice(), d0.entries[1].value.as_slice()),
        (&b"api_key"[..], &b"premium-1"[..])
    );
    assert_eq!(
        d0.limit.as_ref().map(|l| (l.requests_per_unit, l.unit)),
        Some((42, 2))
    );
    assert_eq!(d0.hits_addend, Some(7));
    assert!(d0.is_negative_hits);
    assert_eq!(
        ours.descriptors[1].hits_addend,
        Some(0),
        "a present zero stays distinct from absent"
    );
    assert_eq!(
        ours.encode_to_vec(),
        theirs,
        "ours re-encodes to the same bytes"
    );

    let back =
        et::service::ratelimit::v3::RateLimitRequest::decode(ours.encode_to_vec().as_slice())
            .unwrap();
    assert_eq!(back, envoy_types_request());
}

#[test]
fn response_bytes_identical_both_ways() {
    let theirs = envoy_types_response().encode_to_vec();
    let ours = tg::service::ratelimit::v3::RateLimitResponse::decode(theirs.as_slice()).unwrap();
    assert_eq!(ours.overall_code, 2);
    let s0 = &ours.statuses[0];
    assert_eq!(
        s0.current_limit.as_ref().map(|l| l.unit),
        Some(7),
        "WEEK = 7"
    );
    assert_eq!(
        s0.duration_until_reset.map(|d| (d.seconds, d.nanos)),
        Some((3, 250_000_000))
    );
    assert_eq!(ours.response_headers_to_add[0].key, "x-ratelimit-limit");
    assert_eq!(ours.raw_body, b"slow down");
    assert!(
        ours.dynamic_metadata
            .as_ref()
            .unwrap()
            .fields
            .contains_key("tier")
    );
    assert_eq!(ours.encode_to_vec(), theirs);

    // And from our side: our encoding is what envoy-types reads back unchanged.
    let ours_bytes = ours.encode_to_vec();
    let back =
        et::service::ratelimit::v3::RateLimitResponse::decode(ours_bytes.as_slice()).unwrap();
    assert_eq!(back, envoy_types_response());
    assert_eq!(back.encode_to_vec(), ours_bytes);
}

#[test]
fn service_path_matches() {
    assert_eq!(
        sluicegate_proto::envoy::service::ratelimit::v3::rate_limit_service_server::SERVICE_NAME,
        "envoy.service.ratelimit.v3.RateLimitService"
    );
}

/// The same request built independently with sluicegate's types encodes to envoy-types' bytes.
#[test]
fn independently_built_request_encodes_identically() {
    use tg::extensions::common::ratelimit::v3::{RateLimitDescriptor, rate_limit_descriptor as d};
    let ours = tg::service::ratelimit::v3::RateLimitRequest {
        domain: "edge".into(),
        descriptors: vec![
            RateLimitDescriptor {
                entries: vec![
                    d::Entry {
                        key: "tenant".into(),
                        value: "acme".into(),
                    },
                    d::Entry {
                        key: "api_key".into(),
                        value: "premium-1".into(),
                    },
                ],
                limit: Some(d::RateLimitOverride {
                    requests_per_unit: 42,
                    unit: tg::r#type::v3::RateLimitUnit::Minute as i32,
                }),
                hits_addend: Some(7),
                is_negative_hits: true,
            },
            RateLimitDescriptor {
                entries: vec![d::Entry {
                    key: "remote_address".into(),
                    value: "10.0.0.1".into(),
                }],
                limit: None,
                hits_addend: Some(0),
                is_negative_hits: false,
            },
        ],
        hits_addend: 3,
    };
    assert_eq!(ours.encode_to_vec(), envoy_types_request().encode_to_vec());
}
