//! Lock-down switches and bounded work per caller, through a real sluicegate: each refusal gets its
//! status code, is counted, and leaves the server healthy.

use std::time::{Duration, Instant};

use crate::support::envoy::{RateLimitServiceClient as EnvoyClient, descriptor, request};
use crate::support::{RedisServer, Sluicegate, ask, metric, should_allow};
use sluicegate_proto::sluicegate::v1::SettleRequest;
use tonic::Code;

/// The server still answers a normal call.
async fn healthy(t: &Sluicegate) {
    let mut c = t.client().await;
    let r = should_allow(&mut c, ask("healthy", 0.0, 0.0, 1)).await;
    assert!(r.is_ok(), "{r:?}");
}

#[tokio::test]
async fn a_message_over_the_limit_is_refused_before_decoding() {
    let t = Sluicegate::start(&["--grpc-max-message-bytes", "1024"], &[]).await;
    let mut c = t.client().await;
    let big = "k".repeat(4000);
    let err = should_allow(&mut c, ask(&big, 0.0, 0.0, 1))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    assert!(err.message().contains("too large"), "{err:?}");
    healthy(&t).await;
    let m = t.metrics().await;
    assert_eq!(
        metric(&m, "sluicegate_shed_total{reason=\"message_size\"}"),
        1.0,
        "{m}"
    );
}

#[tokio::test]
async fn past_max_concurrent_requests_a_call_is_refused_at_once() {
    let redis = RedisServer::start().await;
    let t = Sluicegate::start(
        &[
            "--max-concurrent-requests",
            "1",
            "--redis-timeout-ms",
            "3000",
        ],
        &[("REDIS_URL", &redis.url())],
    )
    .await;
    let mut c = t.client().await;
    should_allow(&mut c, ask("warm", 0.0, 0.0, 1))
        .await
        .unwrap();
    // Hold Redis for a second: the first call waits in sluicegate, taking the only slot.
    let sleeper = redis.sleep(1).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut held = t.client().await;
    let first =
        tokio::spawn(async move { should_allow(&mut held, ask("held", 0.0, 0.0, 1)).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    let err = should_allow(&mut c, ask("second", 0.0, 0.0, 1))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("MAX_CONCURRENT_REQUESTS"), "{err:?}");
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "refused at once, not queued"
    );
    assert!(first.await.unwrap().is_ok(), "the held call finishes");
    sleeper.await.unwrap();
    healthy(&t).await;
    let m = t.metrics().await;
    assert!(
        metric(&m, "sluicegate_shed_total{reason=\"concurrency\"}") >= 1.0,
        "{m}"
    );
}

#[tokio::test]
async fn lock_down_switches_refuse_with_permission_denied() {
    let t = Sluicegate::start(
        &["--allow-client-shapes", "false", "--allow-refunds", "false"],
        &[],
    )
    .await;
    let mut c = t.client().await;
    let err = should_allow(&mut c, ask("k", 5.0, 1.0, 1))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("ALLOW_CLIENT_SHAPES"), "{err:?}");
    assert!(
        should_allow(&mut c, ask("k", 0.0, 0.0, 1)).await.is_ok(),
        "the server's shape"
    );
    let err = c
        .settle(SettleRequest {
            key: "k".into(),
            reserved: 5,
            actual: 1,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("ALLOW_REFUNDS"), "{err:?}");
    // On the Envoy API a refused refund is answered OK (an error would be Envoy's fail-open) and
    // counted.
    let mut envoy = EnvoyClient::connect(t.grpc_url()).await.unwrap();
    let mut d = descriptor(&[("user", "u")]);
    d.hits_addend = Some(3);
    d.is_negative_hits = true;
    let r = envoy
        .should_rate_limit(request("edge", vec![d]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.overall_code, envoy_ok());
    let m = t.metrics().await;
    assert_eq!(
        metric(
            &m,
            "sluicegate_refused_total{api=\"envoy\",reason=\"refund\"}"
        ),
        1.0,
        "{m}"
    );
    healthy(&t).await;
}

#[tokio::test]
async fn envoy_requests_past_the_bounds_are_over_limit_and_counted() {
    let t = Sluicegate::start(&["--max-descriptors", "8"], &[]).await;
    let mut envoy = EnvoyClient::connect(t.grpc_url()).await.unwrap();
    let many = (0..9)
        .map(|i| descriptor(&[("k", &i.to_string())]))
        .collect();
    let r = envoy
        .should_rate_limit(request("edge", many))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.overall_code, envoy_over(), "fail closed, never an error");
    assert_eq!(r.statuses.len(), 9);
    let m = t.metrics().await;
    assert_eq!(
        metric(
            &m,
            "sluicegate_refused_total{api=\"envoy\",reason=\"descriptors\"}"
        ),
        1.0,
        "{m}"
    );
}

fn envoy_ok() -> i32 {
    crate::support::envoy::OK
}

fn envoy_over() -> i32 {
    crate::support::envoy::OVER
}

/// Resident memory of a process, in bytes.
fn rss(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap()
        * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_connections_and_oversized_requests_leave_memory_bounded() {
    use tokio::io::AsyncWriteExt;
    let t = Sluicegate::start(&[], &[]).await;
    healthy(&t).await;
    let before = rss(t.pid());
    // 100 connections that send junk instead of HTTP/2, and stay open.
    let mut junk = Vec::new();
    for i in 0..100u32 {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", t.grpc_port))
            .await
            .unwrap();
        let _ = s.write_all(&[(i % 251) as u8; 4096]).await;
        junk.push(s);
    }
    // 200 requests of 2 MB each (twice GRPC_MAX_MESSAGE_BYTES), 20 at a time.
    let big = "x".repeat(2 << 20);
    let client = t.client().await;
    for _ in 0..10 {
        let calls = (0..20).map(|_| {
            let mut c = client.clone();
            let key = big.clone();
            async move { should_allow(&mut c, ask(&key, 0.0, 0.0, 1)).await }
        });
        for r in futures::future::join_all(calls).await {
            let code = r.unwrap_err().code();
            assert!(
                matches!(code, Code::OutOfRange | Code::Cancelled | Code::Unavailable),
                "{code:?}"
            );
        }
    }
    healthy(&t).await;
    let after = rss(t.pid());
    assert!(
        after < before + 120 * 1024 * 1024,
        "RSS grew from {} to {} MB",
        before >> 20,
        after >> 20
    );
    drop(junk);
}
