//! Settle and ShouldAllowBatch: the same answers on both backends (in process), and batches from
//! many callers over two replicas that never admit more than a bucket holds (real processes).

mod common;

use std::time::Duration;

use tollgate::api::{ApiError, Defaults, ShouldAllowApi};
use tollgate::backend::{Backend, MemoryBackend, RedisBackend};
use tollgate::core::Shape;
use tollgate::proto::tollgate::v1::{SettleRequest, ShouldAllowBatchRequest, ShouldAllowRequest};

/// A refill slow enough that the milliseconds of a test add nothing measurable.
const SLOW: f64 = 0.001;
const EPS: f64 = 1e-3;

fn api<B: Backend>(backend: B) -> ShouldAllowApi<B> {
    ShouldAllowApi::new(
        backend,
        Defaults::new(Shape::new(10.0, SLOW).unwrap(), "tb:user:"),
    )
}

fn take(key: &str, cost: u32) -> ShouldAllowRequest {
    ShouldAllowRequest {
        key: key.into(),
        cost,
        ..Default::default()
    }
}

fn settle(key: &str, reserved: u64, actual: u64) -> SettleRequest {
    SettleRequest {
        key: key.into(),
        reserved,
        actual,
        ..Default::default()
    }
}

/// Less than reserved gives the difference back; equal changes nothing; more is a forced charge
/// into debt, floored at -capacity, and later requests wait for the refill.
async fn settle_less_equal_more<B: Backend>(a: &ShouldAllowApi<B>) {
    let r = a.should_allow(&take("s", 6)).await.unwrap();
    assert!((r.tokens_remaining - 4.0).abs() < EPS);
    let s = a.settle(&settle("s", 6, 2)).await.unwrap();
    assert!((s.tokens_remaining - 8.0).abs() < EPS, "refunded 4: {s:?}");
    assert!(!s.in_debt);
    let s = a.settle(&settle("s", 3, 3)).await.unwrap();
    assert!(
        (s.tokens_remaining - 8.0).abs() < EPS,
        "nothing to settle: {s:?}"
    );
    let s = a.settle(&settle("s", 1, 15)).await.unwrap();
    assert!(
        (s.tokens_remaining + 6.0).abs() < EPS,
        "charged 14 of 8: {s:?}"
    );
    assert!(s.in_debt);
    assert!(s.reset_after_ms > 15_000_000, "{s:?}");
    let r = a.should_allow(&take("s", 1)).await.unwrap();
    assert!(!r.allowed, "in debt");
    let s = a.settle(&settle("s", 0, 1_000_000)).await.unwrap();
    assert!((s.tokens_remaining + 10.0).abs() < EPS, "the floor: {s:?}");
    // A refund caps at capacity.
    let s = a.settle(&settle("s", 1_000, 0)).await.unwrap();
    assert!((s.tokens_remaining - 10.0).abs() < EPS, "{s:?}");
}

async fn batch_all_or_nothing<B: Backend>(a: &ShouldAllowApi<B>) {
    a.should_allow(&take("org", 9)).await.unwrap();
    // user would pass, org has 1 left and is asked for 2.
    let req = ShouldAllowBatchRequest {
        requests: vec![take("user", 3), take("org", 2)],
        all_or_nothing: true,
    };
    let r = a.should_allow_batch(&req).await.unwrap();
    assert!(!r.allowed);
    assert!(r.responses[0].allowed, "its own verdict");
    assert!(!r.responses[1].allowed);
    assert!(
        (r.responses[0].tokens_remaining - 10.0).abs() < EPS,
        "{r:?}"
    );
    let check = ShouldAllowRequest {
        dry_run: true,
        ..take("user", 10)
    };
    assert!(
        a.should_allow(&check).await.unwrap().allowed,
        "user uncharged"
    );

    // Not all or nothing: user is charged.
    let r = a
        .should_allow_batch(&ShouldAllowBatchRequest {
            all_or_nothing: false,
            ..req
        })
        .await
        .unwrap();
    assert!(!r.allowed);
    assert!((r.responses[0].tokens_remaining - 7.0).abs() < EPS, "{r:?}");
}

async fn batch_bounds_and_field_names<B: Backend>(a: &ShouldAllowApi<B>) {
    let err = a
        .should_allow_batch(&ShouldAllowBatchRequest::default())
        .await
        .unwrap_err();
    assert!(err.to_string().starts_with("requests"), "{err}");
    let many = ShouldAllowBatchRequest {
        requests: (0..101).map(|i| take(&format!("k{i}"), 1)).collect(),
        all_or_nothing: false,
    };
    let err = a.should_allow_batch(&many).await.unwrap_err();
    assert!(err.to_string().contains("MAX_BATCH"), "{err}");
    let bad = ShouldAllowBatchRequest {
        requests: vec![take("a", 1), take("", 1)],
        all_or_nothing: true,
    };
    let err = a.should_allow_batch(&bad).await.unwrap_err();
    assert!(err.to_string().starts_with("key: request 1"), "{err}");
}

/// A bucket is its key and its shape: a caller naming the victim's key with another shape has a
/// bucket of its own, and can neither refill nor drain the victim's.
async fn another_shape_is_another_bucket<B: Backend>(a: &ShouldAllowApi<B>) {
    let r = a.should_allow(&take("victim", 10)).await.unwrap();
    assert!(r.allowed);
    assert!(!a.should_allow(&take("victim", 1)).await.unwrap().allowed);
    // Same key, a huge rate: allowed in its own bucket, the victim's stays empty.
    let greedy = ShouldAllowRequest {
        rate: 1e9,
        ..take("victim", 1)
    };
    assert!(a.should_allow(&greedy).await.unwrap().allowed);
    assert!(!a.should_allow(&take("victim", 1)).await.unwrap().allowed);
    // A forced charge with another shape lands in that shape's bucket only.
    assert!(a.should_allow(&take("other", 1)).await.unwrap().allowed);
    let s = a
        .settle(&SettleRequest {
            capacity: 1e9,
            actual: 2_000_000_000,
            ..settle("other", 0, 0)
        })
        .await
        .unwrap();
    assert!(s.in_debt, "{s:?}");
    let r = a.should_allow(&take("other", 1)).await.unwrap();
    assert!(r.allowed, "the 10-token bucket is not in that debt: {r:?}");
    assert!((r.tokens_remaining - 8.0).abs() < EPS, "{r:?}");
}

macro_rules! both {
    ($($name:ident),* $(,)?) => {
        mod memory {
            use super::*;
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(&api(MemoryBackend::new(1000))).await;
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
                    super::$name(&api(backend)).await;
                }
            )*
        }
    };
}

both!(
    settle_less_equal_more,
    another_shape_is_another_bucket,
    batch_all_or_nothing,
    batch_bounds_and_field_names
);

#[tokio::test]
async fn refunding_settles_can_be_refused() {
    let mut defaults = Defaults::new(Shape::new(10.0, SLOW).unwrap(), "tb:user:");
    defaults.allow_refunds = false;
    let a = ShouldAllowApi::new(MemoryBackend::new(10), defaults);
    let err = a.settle(&settle("k", 5, 2)).await.unwrap_err();
    assert!(matches!(err, ApiError::PermissionDenied(_)), "{err:?}");
    assert!(
        a.settle(&settle("k", 2, 5)).await.is_ok(),
        "charging more is fine"
    );
}

/// 200 concurrent all-or-nothing batches over two replicas sharing Redis, on overlapping keys:
/// every key ends with exactly its capacity minus what the allowed batches took, so no key was
/// ever over-admitted and no refused batch left a charge behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_batches_over_two_replicas_never_over_admit() {
    use common::{RedisServer, Tollgate};
    use tollgate::proto::tollgate::v1::rate_limit_service_client::RateLimitServiceClient;

    let redis = RedisServer::start().await;
    let env = [("REDIS_URL", redis.url())];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let args = [
        "--redis-timeout-ms",
        "2000",
        "--capacity",
        "20",
        "--rate",
        "0.000001",
    ];
    let replicas = [
        Tollgate::start(&args, &env).await,
        Tollgate::start(&args, &env).await,
    ];
    let clients: Vec<RateLimitServiceClient<_>> =
        vec![replicas[0].client().await, replicas[1].client().await];
    const KEYS: usize = 5;
    // Batch i takes key i % 5 and key (i + 1) % 5, costs 1 and 2.
    let calls = (0..200).map(|i| {
        let mut c = clients[i % 2].clone();
        tokio::spawn(async move {
            let req = ShouldAllowBatchRequest {
                requests: vec![
                    take(&format!("b{}", i % KEYS), 1),
                    take(&format!("b{}", (i + 1) % KEYS), 2),
                ],
                all_or_nothing: true,
            };
            (i, c.should_allow_batch(req).await.map(|r| r.into_inner()))
        })
    });
    let mut charged = [0u32; KEYS];
    for r in futures::future::join_all(calls).await {
        let (i, answer) = r.unwrap();
        let answer = answer.unwrap_or_else(|e| panic!("batch {i}: {e}"));
        if answer.allowed {
            charged[i % KEYS] += 1;
            charged[(i + 1) % KEYS] += 2;
        }
    }
    let mut c = clients[0].clone();
    for (k, &n) in charged.iter().enumerate() {
        assert!(n <= 20, "key b{k} admitted {n} of 20");
        let left = c
            .should_allow(ShouldAllowRequest {
                dry_run: true,
                ..take(&format!("b{k}"), 1)
            })
            .await
            .unwrap()
            .into_inner()
            .tokens_remaining;
        assert!(
            (left - f64::from(20 - n)).abs() < 0.01,
            "key b{k}: {left} left after {n} charged"
        );
    }
    assert!(charged.iter().sum::<u32>() > 0);
}
