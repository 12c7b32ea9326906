//! The quota protocol (RLQS) on the wire, as Envoy 1.40 speaks it: bytes a real Envoy sent decode
//! with sluicegate's protos (a repeated `bucket_quota_usages`, not the map of Envoy's main branch;
//! bucket values as bytes, whatever the client's header held), and what sluicegate sends decodes
//! with `envoy-types` (generated from data-plane-api) to the same fields.

use std::time::Duration;

use prost::Message;
use sluicegate_proto::envoy::service::rate_limit_quota::v3 as tg;

use crate::support::{Envoy, Upstream};

/// The first report Envoy 1.40 sent for `x-user: a` with the reference filter config
/// (`shared/reference/envoy-rlqs-facts.md`): domain `acme`, one usage of bucket {name: user}, an
/// empty `time_elapsed`, 1 request allowed.
const ENVOY_1_40_FIRST_REPORT: &[u8] = &[
    0x0a, 0x04, b'a', b'c', b'm', b'e', 0x12, 0x14, 0x0a, 0x0e, 0x0a, 0x0c, 0x0a, 0x04, b'n', b'a',
    b'm', b'e', 0x12, 0x04, b'u', b's', b'e', b'r', 0x12, 0x00, 0x18, 0x01,
];

#[test]
fn a_report_envoy_1_40_sent_decodes() {
    let r = tg::RateLimitQuotaUsageReports::decode(ENVOY_1_40_FIRST_REPORT).unwrap();
    assert_eq!(r.domain, "acme");
    assert_eq!(r.bucket_quota_usages.len(), 1);
    let u = &r.bucket_quota_usages[0];
    let id = u.bucket_id.as_ref().unwrap();
    assert_eq!(id.bucket.len(), 1);
    assert_eq!(id.bucket[0].key, b"name");
    assert_eq!(id.bucket[0].value, b"user");
    assert_eq!(u.time_elapsed.unwrap_or_default().seconds, 0);
    assert_eq!((u.num_requests_allowed, u.num_requests_denied), (1, 0));
    // The same bytes, read as data-plane-api declares them at v1.40.
    let et =
        envoy_types::pb::envoy::service::rate_limit_quota::v3::RateLimitQuotaUsageReports::decode(
            ENVOY_1_40_FIRST_REPORT,
        )
        .unwrap();
    assert_eq!(et.bucket_quota_usages.len(), 1);
}

#[test]
fn an_assignment_decodes_as_data_plane_api_declares_it() {
    use sluicegate_proto::envoy::r#type::v3::{
        RateLimitStrategy, TokenBucket, rate_limit_strategy,
    };
    use tg::rate_limit_quota_response::{BucketAction, bucket_action};
    let id = tg::BucketId {
        bucket: vec![
            tg::bucket_id::BucketEntry {
                key: b"name".to_vec(),
                value: b"per_user".to_vec(),
            },
            tg::bucket_id::BucketEntry {
                key: b"user".to_vec(),
                value: b"alice".to_vec(),
            },
        ],
    };
    let response = tg::RateLimitQuotaResponse {
        bucket_action: vec![
            BucketAction {
                bucket_id: Some(id.clone()),
                bucket_action: Some(bucket_action::BucketAction::QuotaAssignmentAction(
                    bucket_action::QuotaAssignmentAction {
                        assignment_time_to_live: Some(prost_types::Duration {
                            seconds: 15,
                            nanos: 0,
                        }),
                        rate_limit_strategy: Some(RateLimitStrategy {
                            strategy: Some(rate_limit_strategy::Strategy::TokenBucket(
                                TokenBucket {
                                    max_tokens: 75,
                                    tokens_per_fill: Some(4_500),
                                    fill_interval: Some(prost_types::Duration {
                                        seconds: 60,
                                        nanos: 60,
                                    }),
                                },
                            )),
                        }),
                    },
                )),
            },
            BucketAction {
                bucket_id: Some(id),
                bucket_action: Some(bucket_action::BucketAction::AbandonAction(
                    bucket_action::AbandonAction {},
                )),
            },
        ],
    };
    use envoy_types::pb::envoy::service::rate_limit_quota::v3 as et;
    let theirs = et::RateLimitQuotaResponse::decode(&*response.encode_to_vec()).unwrap();
    assert_eq!(theirs.bucket_action.len(), 2);
    let first = &theirs.bucket_action[0];
    let bucket = &first.bucket_id.as_ref().unwrap().bucket;
    assert_eq!(bucket.get("name").map(String::as_str), Some("per_user"));
    assert_eq!(bucket.get("user").map(String::as_str), Some("alice"));
    let Some(et::rate_limit_quota_response::bucket_action::BucketAction::QuotaAssignmentAction(q)) =
        &first.bucket_action
    else {
        panic!("not an assignment: {first:?}");
    };
    assert_eq!(q.assignment_time_to_live.unwrap().seconds, 15);
    let Some(envoy_types::pb::envoy::r#type::v3::rate_limit_strategy::Strategy::TokenBucket(t)) =
        &q.rate_limit_strategy.as_ref().unwrap().strategy
    else {
        panic!("not a token bucket");
    };
    assert_eq!(t.max_tokens, 75);
    assert_eq!(t.tokens_per_fill.as_ref().unwrap().value, 4_500);
    assert_eq!(t.fill_interval.unwrap().seconds, 60);
    assert!(matches!(
        theirs.bucket_action[1].bucket_action,
        Some(et::rate_limit_quota_response::bucket_action::BucketAction::AbandonAction(_))
    ));
}

/// A real Envoy 1.40 with the shipped quota config (its header matcher relaxed to any value, as an
/// operator's may be), pointed at a bare HTTP/2 listener that keeps the first gRPC message it is
/// sent: a request whose `x-user` holds bytes that are not UTF-8 (as an attacker's header can)
/// reaches the report as they were, and sluicegate's protos decode it.
#[tokio::test]
async fn a_report_captured_from_a_real_envoy_decodes_with_its_bytes() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let capture = tokio::spawn(async move {
        let (socket, _) = listener.accept().await.unwrap();
        let mut conn = h2::server::handshake(socket).await.unwrap();
        let (request, _respond) = conn.accept().await.unwrap().unwrap();
        let path = request.uri().path().to_string();
        let driver = tokio::spawn(async move { while conn.accept().await.is_some() {} });
        let mut body = request.into_body();
        let mut buf: Vec<u8> = Vec::new();
        let framed = |b: &[u8]| {
            b.len() >= 5 && b.len() >= 5 + u32::from_be_bytes([b[1], b[2], b[3], b[4]]) as usize
        };
        while !framed(&buf) {
            let chunk = body.data().await.expect("a message").unwrap();
            let _ = body.flow_control().release_capacity(chunk.len());
            buf.extend_from_slice(&chunk);
        }
        driver.abort();
        (path, buf)
    });
    let upstream = Upstream::start().await;
    let config = crate::rlqs_e2e::lax_envoy_config();
    let envoy = Envoy::start(&config, upstream.port, port).await;

    let request = b"GET / HTTP/1.1\r\nHost: x\r\nx-user: caf\xe9-\xff\r\nConnection: close\r\n\r\n";
    crate::support::raw_http(envoy.listen_port, request).await;
    let (path, framed) = tokio::time::timeout(Duration::from_secs(20), capture)
        .await
        .expect("Envoy sends its first report at once")
        .unwrap();
    assert_eq!(
        path,
        "/envoy.service.rate_limit_quota.v3.RateLimitQuotaService/StreamRateLimitQuotas"
    );
    assert_eq!(framed[0], 0, "uncompressed");
    let r = tg::RateLimitQuotaUsageReports::decode(&framed[5..]).unwrap();
    assert_eq!(r.domain, "quota");
    let id = r.bucket_quota_usages[0].bucket_id.as_ref().unwrap();
    let mut pairs: Vec<(&[u8], &[u8])> = id
        .bucket
        .iter()
        .map(|e| (&e.key[..], &e.value[..]))
        .collect();
    pairs.sort();
    assert_eq!(
        pairs,
        [
            (&b"name"[..], &b"per_user"[..]),
            (&b"user"[..], &b"caf\xe9-\xff"[..])
        ]
    );
    assert_eq!(r.bucket_quota_usages[0].num_requests_allowed, 1);
}
