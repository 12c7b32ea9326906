//! One contract, two backends: every test body here runs against the in-memory backend and
//! against a real redis-server running `lua/token_bucket.lua`, and must give the same answers.

use std::time::Duration;

use sluicegate_core::backend::{Backend, BucketRequest, MemoryBackend, RedisBackend};
use sluicegate_core::{Decision, MAX_MS, Op, Shape};

/// A very slow refill, so that the milliseconds between calls add a negligible fraction of a token.
const SLOW: f64 = 0.001;
/// Tolerance on token counts for that drift (and for the float round trip through Redis).
const EPS: f64 = 1e-3;

async fn decide(b: &impl Backend, key: &str, cap: f64, rate: f64, op: Op) -> Decision {
    let shape = Shape::new(cap, rate).unwrap();
    b.decide(BucketRequest::new(key, shape, op))
        .await
        .unwrap_or_else(|e| panic!("{key}: {e}"))
}

async fn new_bucket_is_full(b: &impl Backend) {
    let d = decide(b, "new", 10.0, SLOW, Op::Check(1)).await;
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
    let d = decide(b, "refill", 2.0, 10.0, Op::Check(1)).await;
    assert_eq!(d.tokens_remaining, 2.0, "tokens are capped at capacity");
    assert!(decide(b, "refill", 2.0, 10.0, Op::Take(1)).await.allowed);
    assert!(decide(b, "refill", 2.0, 10.0, Op::Take(1)).await.allowed);
    assert!(!decide(b, "refill", 2.0, 10.0, Op::Take(1)).await.allowed);

    // Partial refill: 10 tokens, 10 per second, drained, then about 150 ms: 1.5 tokens (a stalled
    // machine may add a little more; the bucket is far from full either way).
    decide(b, "partial", 10.0, 10.0, Op::Take(10)).await;
    tokio::time::sleep(Duration::from_millis(150)).await;
    let d = decide(b, "partial", 10.0, 10.0, Op::Check(1)).await;
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
    let d = decide(b, "check", 3.0, SLOW, Op::Check(1)).await;
    assert!(!d.allowed, "no token left");
    assert!(d.retry_after_ms > 0);
    // 0 hits: OK while not in debt (Envoy's hits_addend 0).
    assert!(decide(b, "check", 3.0, SLOW, Op::Check(0)).await.allowed);
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

/// One group call answers each request in its place: every bucket has its own shape and cost, so
/// its tokens left identify it, and a reordering would show.
async fn many_at_once_keeps_order(b: &impl Backend) {
    let keys: Vec<String> = (0..8).map(|i| format!("order{i}")).collect();
    let reqs: Vec<BucketRequest<'_>> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| {
            let cap = 10.0 + i as f64;
            BucketRequest::new(k, Shape::new(cap, SLOW).unwrap(), Op::Take(1))
        })
        .collect();
    let out = b.decide_group(&reqs, false).await;
    let left: Vec<f64> = out
        .iter()
        .map(|d| d.as_ref().unwrap().tokens_remaining.round())
        .collect();
    // Bucket i: capacity 10 + i, took 1: 9 + i left.
    let want: Vec<f64> = (0..8).map(|i| (9 + i) as f64).collect();
    assert_eq!(left, want);
    // The same keys again in reverse order: each sees its own state.
    let rev: Vec<BucketRequest<'_>> = reqs
        .iter()
        .rev()
        .map(|r| BucketRequest::new(r.key, r.ask.shape, Op::Check(1)))
        .collect();
    let out = b.decide_group(&rev, false).await;
    let left: Vec<f64> = out
        .iter()
        .map(|d| d.as_ref().unwrap().tokens_remaining.round())
        .collect();
    assert_eq!(left, want.iter().rev().copied().collect::<Vec<_>>());
    // Distinct figures per position: retry_after grows with the cost asked.
    let asks: Vec<BucketRequest<'_>> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| {
            BucketRequest::new(
                k,
                Shape::new(10.0 + i as f64, 1.0).unwrap(),
                Op::Check(100 + 2 * i as u64),
            )
        })
        .collect();
    let out = b.decide_group(&asks, false).await;
    let retries: Vec<u64> = out
        .iter()
        .map(|d| d.as_ref().unwrap().retry_after_ms)
        .collect();
    assert!(retries.windows(2).all(|w| w[0] < w[1]), "{retries:?}");
}

/// A tiny rate and a huge cost: a denial with figures capped at 2^53 - 1, never an overflow or an
/// error, and the same on both backends.
async fn figures_are_capped(b: &impl Backend) {
    let d = decide(b, "cap", 10.0, 1e-17, Op::Take(u64::MAX)).await;
    assert!(!d.allowed);
    assert_eq!(d.retry_after_ms, MAX_MS);
    assert_eq!(d.tokens_remaining, 10.0);
    let d = decide(b, "cap", 10.0, 1e-17, Op::Take(1)).await;
    assert!(d.allowed);
    assert_eq!(d.reset_after_ms, MAX_MS);
    let d = decide(b, "cap2", 10.0, 1.0, Op::Take(10_000_000_000_000_000)).await;
    assert!(!d.allowed);
    assert_eq!(d.retry_after_ms, MAX_MS);
    let d = decide(b, "cap3", 1e15, 1e15, Op::Take(1)).await;
    assert!(d.allowed);
    assert_eq!(
        d.tokens_remaining,
        1e15 - 1.0,
        "a cost of 1 counts at the largest shape"
    );
}

/// Forced charges land whatever is left, down to -capacity, and later requests wait for the refill.
async fn debt_floors_at_minus_capacity(b: &impl Backend) {
    let d = decide(b, "debt", 10.0, SLOW, Op::Force(4)).await;
    assert!(d.allowed);
    assert!((d.tokens_remaining - 6.0).abs() < EPS, "{d:?}");
    let d = decide(b, "debt", 10.0, SLOW, Op::Force(9)).await;
    assert!(!d.allowed, "the tokens were not there");
    assert!(
        (d.tokens_remaining + 3.0).abs() < EPS,
        "charged anyway: {d:?}"
    );
    let d = decide(b, "debt", 10.0, SLOW, Op::Take(1)).await;
    assert!(!d.allowed);
    assert!(
        !decide(b, "debt", 10.0, SLOW, Op::Check(0)).await.allowed,
        "in debt"
    );
    let d = decide(b, "debt", 10.0, SLOW, Op::Force(1_000)).await;
    assert!((d.tokens_remaining + 10.0).abs() < EPS, "floor: {d:?}");
    // A refund pays debt back.
    let d = decide(b, "debt", 10.0, SLOW, Op::Refund(12)).await;
    assert!((d.tokens_remaining - 2.0).abs() < EPS, "{d:?}");
}

async fn debt_refills_back(b: &impl Backend) {
    // 2 tokens, 10 per second: -2 after a forced charge of 4; 300 ms later +1.
    decide(b, "payback", 2.0, 10.0, Op::Force(4)).await;
    assert!(!decide(b, "payback", 2.0, 10.0, Op::Take(1)).await.allowed);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let d = decide(b, "payback", 2.0, 10.0, Op::Take(1)).await;
    assert!(d.allowed, "the refill paid the debt back: {d:?}");
}

/// All or nothing: one denied bucket and no other is charged; without it, the others are.
async fn group_all_or_nothing(b: &impl Backend) {
    let shape = Shape::new(5.0, SLOW).unwrap();
    decide(b, "aon-c", 5.0, SLOW, Op::Take(5)).await;
    let group = [
        BucketRequest::new("aon-a", shape, Op::Take(2)),
        BucketRequest::new("aon-b", shape, Op::Take(3)),
        BucketRequest::new("aon-c", shape, Op::Take(1)),
        BucketRequest::new("aon-d", shape, Op::Force(2)),
    ];
    let out = b.decide_group(&group, true).await;
    let out: Vec<Decision> = out.into_iter().map(Result::unwrap).collect();
    assert!(
        out[0].allowed && out[1].allowed,
        "their own verdicts: {out:?}"
    );
    assert!(!out[2].allowed);
    for key in ["aon-a", "aon-b"] {
        let d = decide(b, key, 5.0, SLOW, Op::Check(5)).await;
        assert!(d.allowed, "{key} was charged although c was denied: {d:?}");
    }
    let d = decide(b, "aon-d", 5.0, SLOW, Op::Check(1)).await;
    assert!(
        (d.tokens_remaining - 3.0).abs() < EPS,
        "the forced charge landed: {d:?}"
    );

    // A shadow request's denial vetoes nothing.
    let shadow = [
        BucketRequest::new("aon-e", shape, Op::Take(2)),
        BucketRequest::new("aon-c", shape, Op::Take(1)).with_veto(false),
    ];
    b.decide_group(&shadow, true).await;
    let d = decide(b, "aon-e", 5.0, SLOW, Op::Check(1)).await;
    assert!((d.tokens_remaining - 3.0).abs() < EPS, "{d:?}");

    // Not all or nothing: the others are charged.
    b.decide_group(&group[..3], false).await;
    let d = decide(b, "aon-a", 5.0, SLOW, Op::Check(1)).await;
    assert!((d.tokens_remaining - 3.0).abs() < EPS, "{d:?}");
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
                    let server = crate::support::RedisServer::start().await;
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
    figures_are_capped,
    debt_floors_at_minus_capacity,
    debt_refills_back,
    group_all_or_nothing,
);

/// The Redis key expires after exactly the full-refill time of idleness.
#[tokio::test]
async fn redis_key_ttl_is_the_full_refill_time() {
    let server = crate::support::RedisServer::start().await;
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
    // In debt the key lives until the bucket is full again: -5 of 10 at 2/s is 7.5 s.
    decide(&backend, "tb:ttl3", 10.0, 2.0, Op::Force(15)).await;
    let pttl: i64 = ::redis::cmd("PTTL")
        .arg("tb:ttl3")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!((7_400..=7_500).contains(&pttl), "PTTL {pttl}");
    // A check and a denial write nothing, so no key appears.
    decide(&backend, "tb:none", 3.0, 7.0, Op::Check(1)).await;
    decide(&backend, "tb:none", 3.0, 7.0, Op::Take(4)).await;
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
    use sluicegate_core::backend::memory::ManualClock;
    let clock = ManualClock::default();
    clock.set_ms(1_000_000.0);
    let b = MemoryBackend::with_clock(100, clock.clone());
    decide(&b, "clock", 10.0, 10.0, Op::Take(10)).await;
    clock.set_ms(900_000.0); // 100 s in the past
    let d = decide(&b, "clock", 10.0, 10.0, Op::Check(1)).await;
    assert!(!d.allowed);
    assert_eq!(d.tokens_remaining, 0.0);
    clock.set_ms(1_000_000.0); // back to the present: the step back earned nothing
    assert_eq!(
        decide(&b, "clock", 10.0, 10.0, Op::Check(1))
            .await
            .tokens_remaining,
        0.0
    );
    clock.set_ms(1_000_500.0);
    assert_eq!(
        decide(&b, "clock", 10.0, 10.0, Op::Check(1))
            .await
            .tokens_remaining,
        5.0
    );
}

/// One step of a random sequence: a single request, or a group decided together.
#[derive(Clone, Debug)]
enum Step {
    One(usize, Op),
    Group(Vec<(usize, Op, bool)>, bool),
}

fn any_op() -> impl proptest::strategy::Strategy<Value = Op> {
    use proptest::prelude::*;
    let cost = prop_oneof![
        3 => 0u64..=12,
        1 => Just(u64::MAX),
        1 => 1_000u64..=2_000_000,
    ];
    (0u8..4, cost).prop_map(|(kind, c)| match kind {
        0 => Op::Take(c),
        1 => Op::Check(c),
        2 => Op::Refund(c),
        _ => Op::Force(c),
    })
}

fn steps() -> impl proptest::strategy::Strategy<Value = Vec<Step>> {
    use proptest::prelude::*;
    let one = (0usize..3, any_op()).prop_map(|(k, op)| Step::One(k, op));
    let group = (
        prop::collection::vec((0usize..3, any_op(), any::<bool>()), 1..5),
        any::<bool>(),
    )
        .prop_map(|(reqs, aon)| Step::Group(reqs, aon));
    prop::collection::vec(prop_oneof![3 => one, 1 => group], 1..30)
}

/// Memory and Redis give the same answers to random sequences of single and grouped requests over
/// a few buckets of different shapes (within the drift of real time at a very slow refill).
#[test]
fn both_backends_answer_random_sequences_alike() {
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};

    let rt = tokio::runtime::Runtime::new().unwrap();
    let server = rt.block_on(crate::support::RedisServer::start());
    // The backend spawns its connection tasks on this runtime.
    let _runtime = rt.enter();
    let redis = RedisBackend::new(&server.url(), Duration::from_secs(2)).unwrap();
    let memory = MemoryBackend::new(10_000);
    let capacities = [7.5, 1.0, 1e6];
    let case = std::sync::atomic::AtomicU32::new(0);
    let mut runner = TestRunner::new(Config {
        cases: 96,
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&steps(), |steps| {
        let case = case.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let keys: Vec<String> = (0..3).map(|k| format!("prop:{case}:{k}")).collect();
        let request = |k: usize, op: Op, veto: bool| {
            BucketRequest::new(&keys[k], Shape::new(capacities[k], SLOW).unwrap(), op)
                .with_veto(veto)
        };
        for (i, step) in steps.iter().enumerate() {
            let (m, r) = rt.block_on(async {
                match step {
                    Step::One(k, op) => {
                        let req = request(*k, *op, true);
                        (
                            vec![memory.decide(req).await],
                            vec![redis.decide(req).await],
                        )
                    }
                    Step::Group(reqs, aon) => {
                        let group: Vec<BucketRequest> = reqs
                            .iter()
                            .map(|&(k, op, veto)| request(k, op, veto))
                            .collect();
                        (
                            memory.decide_group(&group, *aon).await,
                            redis.decide_group(&group, *aon).await,
                        )
                    }
                }
            });
            for (m, r) in m.into_iter().zip(r) {
                let (m, r) = (m.unwrap(), r.unwrap());
                let close = |a: u64, b: u64| a.abs_diff(b) <= a.max(b) / 100 + 1;
                let context = format!("step {i} {step:?}: memory {m:?}, redis {r:?}");
                prop_assert_eq!(m.allowed, r.allowed, "{}", context);
                prop_assert!(
                    (m.tokens_remaining - r.tokens_remaining).abs() < EPS,
                    "{}",
                    context
                );
                prop_assert!(close(m.retry_after_ms, r.retry_after_ms), "{}", context);
                prop_assert!(close(m.reset_after_ms, r.reset_after_ms), "{}", context);
            }
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}
