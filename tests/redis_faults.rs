//! Redis going wrong under a running tollgate: scripts flushed, the server killed and restarted.
//! Latency stays bounded by REDIS_TIMEOUT_MS, FAILURE_MODE decides the answers, health follows,
//! and tollgate recovers by itself.

mod common;

use std::time::{Duration, Instant};

use common::{
    NOT_SERVING, RedisServer, SERVING, Tollgate, ask, eventually, health, http_get, should_allow,
};
use tonic::Code;

const TIMEOUT_MS: u64 = 50;
/// Scheduling slack on a loaded 2-core machine; the point is "bounded", not "fast".
const SLACK: Duration = Duration::from_millis(400);

async fn start(redis: &RedisServer, mode: &str) -> Tollgate {
    Tollgate::start(
        &[
            "--redis-timeout-ms",
            &TIMEOUT_MS.to_string(),
            "--failure-mode",
            mode,
        ],
        &[("REDIS_URL", &redis.url())],
    )
    .await
}

#[tokio::test]
async fn script_flush_changes_nothing_for_the_caller() {
    let redis = RedisServer::start().await;
    let t = start(&redis, "error").await;
    let mut c = t.client().await;
    let mut admin = redis.connection().await;
    for i in 0..6 {
        let r = should_allow(&mut c, ask("flush", 4.0, 0.001, 1)).await;
        let r = r.unwrap_or_else(|e| panic!("call {i} after SCRIPT FLUSH failed: {e}"));
        assert_eq!(r.allowed, i < 4, "call {i}: {r:?}");
        let _: () = redis::cmd("SCRIPT")
            .arg("FLUSH")
            .query_async(&mut admin)
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn redis_killed_then_restarted() {
    let mut redis = RedisServer::start().await;
    let modes = [
        start(&redis, "error").await,
        start(&redis, "allow").await,
        start(&redis, "deny").await,
    ];
    let mut clients = Vec::new();
    for t in &modes {
        eventually(Duration::from_secs(5), "SERVING", async || {
            health(&t.grpc_url(), "").await == Some(SERVING)
        })
        .await;
        let mut c = t.client().await;
        assert!(
            should_allow(&mut c, ask("k", 0.0, 0.0, 1))
                .await
                .unwrap()
                .allowed
        );
        clients.push(c);
    }

    redis.kill();

    // Every answer comes within the deadline plus slack, shaped by FAILURE_MODE.
    for round in 0..10 {
        for (i, c) in clients.iter_mut().enumerate() {
            let started = Instant::now();
            let result = should_allow(c, ask("k", 0.0, 0.0, 1)).await;
            let took = started.elapsed();
            assert!(
                took < Duration::from_millis(TIMEOUT_MS) + SLACK,
                "round {round}, mode {i}: answered after {took:?}"
            );
            match i {
                0 => assert_eq!(result.unwrap_err().code(), Code::Unavailable),
                1 => {
                    let r = result.unwrap();
                    assert!(r.allowed && r.degraded, "{r:?}");
                }
                _ => {
                    let r = result.unwrap();
                    assert!(!r.allowed && r.degraded, "{r:?}");
                }
            }
        }
    }
    for t in &modes {
        eventually(Duration::from_secs(5), "NOT_SERVING", async || {
            health(&t.grpc_url(), "").await == Some(NOT_SERVING)
        })
        .await;
        assert_eq!(
            health(&t.grpc_url(), "tollgate.v1.RateLimitService").await,
            Some(NOT_SERVING)
        );
        assert_eq!(http_get(&t.http_url("/readyz")).await.unwrap().0, 503);
        assert_eq!(
            http_get(&t.http_url("/healthz")).await.unwrap().0,
            200,
            "still alive"
        );
    }
    let (_, metrics) = http_get(&modes[1].http_url("/metrics")).await.unwrap();
    assert!(
        metrics.contains("tollgate_failure_mode_total{mode=\"allow\"} 10"),
        "{metrics}"
    );
    assert!(
        metrics.contains("tollgate_backend_errors_total{backend=\"redis\""),
        "{metrics}"
    );

    redis.restart().await;

    // Recovery without restarting tollgate: real answers again, health back to SERVING.
    for (t, c) in modes.iter().zip(clients.iter_mut()) {
        eventually(
            Duration::from_secs(10),
            "a real answer after restart",
            async || matches!(should_allow(c, ask("k2", 0.0, 0.0, 1)).await, Ok(r) if !r.degraded),
        )
        .await;
        eventually(Duration::from_secs(5), "SERVING again", async || {
            health(&t.grpc_url(), "").await == Some(SERVING)
        })
        .await;
        assert_eq!(http_get(&t.http_url("/readyz")).await.unwrap().0, 200);
    }
}

#[tokio::test]
async fn starts_while_redis_is_down_and_connects_when_it_appears() {
    let mut redis = RedisServer::start().await;
    redis.kill();
    let t = start(&redis, "error").await;
    let mut c = t.client().await;
    assert_eq!(health(&t.grpc_url(), "").await, Some(NOT_SERVING));
    let started = Instant::now();
    let err = should_allow(&mut c, ask("late", 0.0, 0.0, 1))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert!(started.elapsed() < Duration::from_millis(TIMEOUT_MS) + SLACK);
    redis.restart().await;
    eventually(
        Duration::from_secs(10),
        "answers once Redis is up",
        async || should_allow(&mut c, ask("late", 0.0, 0.0, 1)).await.is_ok(),
    )
    .await;
    eventually(Duration::from_secs(5), "SERVING", async || {
        health(&t.grpc_url(), "").await == Some(SERVING)
    })
    .await;
}
