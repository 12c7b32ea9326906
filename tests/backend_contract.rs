//! One contract, two backends: every test body here runs against the in-memory backend and
//! against a real redis-server running `lua/token_bucket.lua`, and must give the same answers.

mod common;

use std::time::Duration;

use tollgate::backend::{Backend, BucketRequest, MemoryBackend, RedisBackend};
use tollgate::core::{Decision, Op, Shape};

/// A very slow refill, so that the milliseconds between calls add a negligible fraction of a token.
const SLOW: f64 = 0.001;
/// Tolerance on token counts for that drift (and for the float round trip through Redis).
const EPS: f64 = 1e-3;

async fn decide(b: &impl Backend, key: &str, cap: f64, rate: f64, op: Op) -> Decision {
    let shape = Shape::new(cap, rate).unwrap();
    b.decide(BucketRequest { key, shape, op })
        .await
        .unwrap_or_else(|e| panic!("{key}: {e}"))
}

async fn new_bucket_is_full(b: &impl Backend) {
    let d = decide(b, "new", 10.0, SLOW, Op::Check(0)).await;
    assert!(d.allowed);
    assert_eq!(d.tokens_remaining, 10.0);
    assert_eq!(d.reset_after_ms, 0);
    let d = decide(b, "new", 10.0, SLOW, Op::Take(10)).await;
    assert!(d.allowed, "a new bucket gives its whole capacity at once");
    assert!(d.tokens_remaining.abs() < EPS);
}

async fn exact_allow_deny_sequence(b: &impl Backend) {
    let mut seen = Vec::new();
    for _ in 0..7 {
        let d = decide(b, "seq", 5.0, SLOW, Op::Take(1)).await;
        seen.push((d.allowed, d.tokens_remaining.round() as i64));
    }
    assert_eq!(
        seen,
        [
            (true, 4),
            (true, 3),
            (true, 2),
            (true, 1),
            (true, 0),
            (false, 0),
            (false, 0)
        ]
    );
}

async fn refill_over_time_is_capped(b: &impl Backend) {
    // 2 tokens, 10 per second: drained, then 300 ms give 3 tokens' worth, capped at 2.
    for _ in 0..2 {
        assert!(decide(b, "refill", 2.0, 10.0, Op::Take(1)).await.allowed);
    }
    assert!(!decide(b, "refill", 2.0, 10.0, Op::Take(1)).await.allowed);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let d = decide(b, "refill", 2.0, 10.0, Op::Check(0)).await;
    assert_eq!(d.tokens_remaining, 2.0, "tokens are capped at capacity");
    assert!(decide(b, "refill", 2.0, 10.0, Op::Take(1)).await.allowed);
    assert!(decide(b, "refill", 2.0, 10.0, Op::Take(1)).await.allowed);
    assert!(!decide(b, "refill", 2.0, 10.0, Op::Take(1)).await.allowed);

    // Partial refill: 10 tokens, 10 per second, drained, then about 150 ms: 1.5 tokens (a stalled
    // machine may add a little more; the bucket is far from full either way).
    decide(b, "partial", 10.0, 10.0, Op::Take(10)).await;
    tokio::time::sleep(Duration::from_millis(150)).await;
    let d = decide(b, "partial", 10.0, 10.0, Op::Check(0)).await;
    assert!((1.4..6.0).contains(&d.tokens_remaining), "{d:?}");
}

async fn denied_request_costs_nothing(b: &impl Backend) {
    assert!(decide(b, "deny", 5.0, SLOW, Op::Take(4)).await.allowed);
    let d = decide(b, "deny", 5.0, SLOW, Op::Take(3)).await;
    assert!(!d.allowed);
    assert!((d.tokens_remaining - 1.0).abs() < EPS, "{d:?}");
    let d = decide(b, "deny", 5.0, SLOW, Op::Take(1)).await;
    assert!(
        d.allowed,
        "the denied request must not have spent the last token"
    );
}

async fn retry_and_reset_after(b: &impl Backend) {
    // 10 tokens, 2 per second: drained, full again in 5 s; one token in 0.5 s. The ranges allow the
    // milliseconds (up to 250 on a stalled machine) that pass between calls.
    let d = decide(b, "times", 10.0, 2.0, Op::Take(10)).await;
    assert_eq!(d.retry_after_ms, 0);
    assert!((4_750..=5_000).contains(&d.reset_after_ms), "{d:?}");
    let d = decide(b, "times", 10.0, 2.0, Op::Take(1)).await;
    assert!(!d.allowed);
    assert!((250..=500).contains(&d.retry_after_ms), "{d:?}");
    assert!((4_750..=5_000).contains(&d.reset_after_ms), "{d:?}");
    let d = decide(b, "times", 10.0, 2.0, Op::Take(3)).await;
    assert!((1_250..=1_500).contains(&d.retry_after_ms), "{d:?}");
}

async fn check_only_spends_nothing(b: &impl Backend) {
    for _ in 0..5 {
        let d = decide(b, "check", 3.0, SLOW, Op::Check(2)).await;
        assert!(d.allowed);
        assert_eq!(d.tokens_remaining, 3.0);
    }
    decide(b, "check", 3.0, SLOW, Op::Take(3)).await;
    let d = decide(b, "check", 3.0, SLOW, Op::Check(0)).await;
    assert!(!d.allowed, "check-only asks about at least one token");
    assert!(d.retry_after_ms > 0);
}

async fn refund_gives_back_up_to_capacity(b: &impl Backend) {
    decide(b, "refund", 5.0, SLOW, Op::Take(5)).await;
    let d = decide(b, "refund", 5.0, SLOW, Op::Refund(2)).await;
    assert!(d.allowed);
    assert_eq!(d.retry_after_ms, 0);
    assert!((d.tokens_remaining - 2.0).abs() < EPS, "{d:?}");
    let d = decide(b, "refund", 5.0, SLOW, Op::Refund(100)).await;
    assert_eq!(d.tokens_remaining, 5.0);
}

async fn buckets_are_independent(b: &impl Backend) {
    decide(b, "a", 1.0, SLOW, Op::Take(1)).await;
    assert!(!decide(b, "a", 1.0, SLOW, Op::Take(1)).await.allowed);
    assert!(decide(b, "b", 1.0, SLOW, Op::Take(1)).await.allowed);
}

async fn many_at_once_keeps_order(b: &impl Backend) {
    let shape = Shape::new(1.0, SLOW).unwrap();
    let reqs = [
        BucketRequest {
            key: "m1",
            shape,
            op: Op::Take(1),
        },
        BucketRequest {
            key: "m2",
            shape,
            op: Op::Take(1),
        },
        BucketRequest {
            key: "m1",
            shape,
            op: Op::Check(1),
        },
    ];
    // Not a transaction: m1's check may see m1's take or not, but m2 is independent.
    let out = b.decide_many(&reqs).await;
    assert_eq!(out.len(), 3);
    assert!(out[0].as_ref().unwrap().allowed);
    assert!(out[1].as_ref().unwrap().allowed);
}

macro_rules! contract {
    ($($name:ident),* $(,)?) => {
        mod memory {
            use super::*;
            $(
                #[tokio::test]
                async fn $name() {
                    let backend = MemoryBackend::new(1000);
                    super::$name(&backend).await;
                }
            )*
        }

        mod redis {
            use super::*;
            $(
                #[tokio::test]
                async fn $name() {
                    let server = common::RedisServer::start().await;
                    let backend = RedisBackend::new(&server.url(), Duration::from_secs(2)).unwrap();
                    super::$name(&backend).await;
                }
            )*
        }
    };
}

contract!(
    new_bucket_is_full,
    exact_allow_deny_sequence,
    refill_over_time_is_capped,
    denied_request_costs_nothing,
    retry_and_reset_after,
    check_only_spends_nothing,
    refund_gives_back_up_to_capacity,
    buckets_are_independent,
    many_at_once_keeps_order,
);

/// The Redis key expires after exactly the full-refill time of idleness.
#[tokio::test]
async fn redis_key_ttl_is_the_full_refill_time() {
    let server = common::RedisServer::start().await;
    let backend = RedisBackend::new(&server.url(), Duration::from_secs(2)).unwrap();
    decide(&backend, "tb:ttl", 10.0, 2.0, Op::Take(1)).await; // full refill 5000 ms
    let mut conn = server.connection().await;
    let pttl: i64 = ::redis::cmd("PTTL")
        .arg("tb:ttl")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!((4_900..=5_000).contains(&pttl), "PTTL {pttl}");
    // 3 tokens at 7 per second: ceil(3/7*1000) = 429 ms.
    decide(&backend, "tb:ttl2", 3.0, 7.0, Op::Take(1)).await;
    let pttl: i64 = ::redis::cmd("PTTL")
        .arg("tb:ttl2")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!((380..=429).contains(&pttl), "PTTL {pttl}");
    // A check writes nothing, so no key appears.
    decide(&backend, "tb:none", 3.0, 7.0, Op::Check(1)).await;
    let exists: i64 = ::redis::cmd("EXISTS")
        .arg("tb:none")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(exists, 0);
}

/// Memory: a clock that steps back adds nothing (Redis uses the server's TIME, tested in the Lua).
#[tokio::test]
async fn memory_clock_stepping_back_adds_nothing() {
    use tollgate::backend::memory::ManualClock;
    let clock = ManualClock::default();
    clock.set_ms(1_000_000.0);
    let b = MemoryBackend::with_clock(100, clock.clone());
    decide(&b, "clock", 10.0, 10.0, Op::Take(10)).await;
    clock.set_ms(900_000.0); // 100 s in the past
    let d = decide(&b, "clock", 10.0, 10.0, Op::Check(0)).await;
    assert!(!d.allowed);
    assert_eq!(d.tokens_remaining, 0.0);
    clock.set_ms(1_000_000.0); // back to the present: the step back earned nothing
    assert_eq!(
        decide(&b, "clock", 10.0, 10.0, Op::Check(0))
            .await
            .tokens_remaining,
        0.0
    );
    clock.set_ms(1_000_500.0);
    assert_eq!(
        decide(&b, "clock", 10.0, 10.0, Op::Check(0))
            .await
            .tokens_remaining,
        5.0
    );
}

/// Both backends give the same figures for the same sequence (within the drift of real time).
#[tokio::test]
async fn both_backends_answer_alike() {
    let server = common::RedisServer::start().await;
    let redis = RedisBackend::new(&server.url(), Duration::from_secs(2)).unwrap();
    let memory = MemoryBackend::new(100);
    let ops = [
        Op::Take(3),
        Op::Take(4),
        Op::Check(2),
        Op::Take(5),
        Op::Refund(2),
        Op::Take(2),
        Op::Check(0),
    ];
    for op in ops {
        let m = decide(&memory, "same", 7.5, SLOW, op).await;
        let r = decide(&redis, "same", 7.5, SLOW, op).await;
        assert_eq!(m.allowed, r.allowed, "{op:?}: {m:?} vs {r:?}");
        assert!(
            (m.tokens_remaining - r.tokens_remaining).abs() < EPS,
            "{op:?}: {m:?} vs {r:?}"
        );
        let close = |a: u64, b: u64| a.abs_diff(b) <= a.max(b) / 100 + 1;
        assert!(
            close(m.retry_after_ms, r.retry_after_ms),
            "{op:?}: {m:?} vs {r:?}"
        );
        assert!(
            close(m.reset_after_ms, r.reset_after_ms),
            "{op:?}: {m:?} vs {r:?}"
        );
    }
}
