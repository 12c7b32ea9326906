//! Settle and ShouldAllowBatch: the same answers on both backends (in process), and batches from
//! many callers over two replicas that never admit more than a bucket holds (real processes).

use std::time::Duration;

use sluicegate::api::{ApiError, ShouldAllowApi, ShouldAllowSettings};
use sluicegate_core::Shape;
use sluicegate_core::backend::{Backend, MemoryBackend, RedisBackend};
use sluicegate_proto::sluicegate::v1::{
    SettleRequest, ShouldAllowBatchRequest, ShouldAllowRequest,
};

/// A refill slow enough that the milliseconds of a test add nothing measurable.
const SLOW: f64 = 0.001;
const EPS: f64 = 1e-3;

/// Refunds on the caller's word allowed (ALLOW_REFUNDS=true): `settle_less_equal_more` is about
/// them; reservations need no switch.
fn api<B: Backend>(backend: B) -> ShouldAllowApi<B> {
    let mut defaults = ShouldAllowSettings::new(Shape::new(10.0, SLOW).unwrap(), "tb:user:");
    defaults.allow_refunds = true;
    ShouldAllowApi::new(backend, defaults)
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

fn reserve(key: &str, cost: u32, ttl_ms: u32) -> ShouldAllowRequest {
    ShouldAllowRequest {
        reserve_ttl_ms: ttl_ms,
        ..take(key, cost)
    }
}

fn settle_id(key: &str, id: &str, actual: u64) -> SettleRequest {
    SettleRequest {
        reservation_id: id.into(),
        ..settle(key, 0, actual)
    }
}

async fn left<B: Backend>(a: &ShouldAllowApi<B>, key: &str) -> f64 {
    let r = a
        .should_allow(&ShouldAllowRequest {
            dry_run: true,
            ..take(key, 1)
        })
        .await
        .unwrap();
    r.tokens_remaining
}

/// A reservation is settled once, for at most what it took: the same id again answers the same
/// and changes nothing; a denied request has none; an unknown, expired or other bucket's id is
/// NOT_FOUND; more than reserved is a forced charge.
async fn reservations_settle_once<B: Backend>(a: &ShouldAllowApi<B>) {
    let r = a.should_allow(&reserve("r", 6, 60_000)).await.unwrap();
    assert!(r.allowed && r.reservation_id.len() == 32, "{r:?}");
    let first = a
        .settle(&settle_id("r", &r.reservation_id, 2))
        .await
        .unwrap();
    assert!(
        (first.tokens_remaining - 8.0).abs() < EPS,
        "refunded 4: {first:?}"
    );
    for actual in [0, 2, 9] {
        let again = a
            .settle(&settle_id("r", &r.reservation_id, actual))
            .await
            .unwrap();
        assert!(
            (again.tokens_remaining - first.tokens_remaining).abs() < EPS,
            "the first answer again: {again:?}"
        );
    }
    assert!(
        (left(a, "r").await - 8.0).abs() < EPS,
        "nothing more came back"
    );

    // A denial took nothing: no reservation.
    let denied = a.should_allow(&reserve("r", 9, 60_000)).await.unwrap();
    assert!(
        !denied.allowed && denied.reservation_id.is_empty(),
        "{denied:?}"
    );

    // Unknown, made for another bucket, another shape of the same key, expired.
    let not_found = |e: ApiError| {
        assert!(matches!(e, ApiError::NotFound(_)), "{e:?}");
        assert!(e.to_string().starts_with("reservation_id"), "{e}");
    };
    not_found(a.settle(&settle_id("r", "0123", 0)).await.unwrap_err());
    let other = a.should_allow(&reserve("other", 1, 60_000)).await.unwrap();
    not_found(
        a.settle(&settle_id("r", &other.reservation_id, 0))
            .await
            .unwrap_err(),
    );
    let shaped = SettleRequest {
        capacity: 20.0,
        ..settle_id("other", &other.reservation_id, 0)
    };
    not_found(a.settle(&shaped).await.unwrap_err());
    let brief = a.should_allow(&reserve("brief", 3, 30)).await.unwrap();
    assert!(brief.allowed);
    tokio::time::sleep(Duration::from_millis(150)).await;
    not_found(
        a.settle(&settle_id("brief", &brief.reservation_id, 0))
            .await
            .unwrap_err(),
    );
    assert!(
        (left(a, "brief").await - 7.0).abs() < EPS,
        "what it took stays spent"
    );

    // More than reserved: the rest is a forced charge, into debt.
    let big = a.should_allow(&reserve("big", 5, 60_000)).await.unwrap();
    let s = a
        .settle(&settle_id("big", &big.reservation_id, 18))
        .await
        .unwrap();
    assert!(
        (s.tokens_remaining + 8.0).abs() < EPS,
        "charged 13 more of 5: {s:?}"
    );
    assert!(s.in_debt);

    // A batch all or nothing that was denied charged nothing: no reservation in it.
    let batch = ShouldAllowBatchRequest {
        requests: vec![reserve("b1", 1, 60_000), reserve("b2", 11, 60_000)],
        all_or_nothing: true,
    };
    let err = a.should_allow_batch(&batch).await.unwrap_err();
    assert!(err.to_string().contains("cost"), "11 > capacity: {err}");
    let batch = ShouldAllowBatchRequest {
        requests: vec![reserve("b1", 1, 60_000), reserve("big", 1, 60_000)],
        all_or_nothing: true,
    };
    let r = a.should_allow_batch(&batch).await.unwrap();
    assert!(!r.allowed);
    assert!(r.responses[0].allowed, "b1 alone would pass");
    assert!(
        r.responses.iter().all(|r| r.reservation_id.is_empty()),
        "{r:?}"
    );
    let batch = ShouldAllowBatchRequest {
        requests: vec![reserve("b1", 1, 60_000), reserve("b3", 2, 60_000)],
        all_or_nothing: true,
    };
    let r = a.should_allow_batch(&batch).await.unwrap();
    assert!(r.allowed && r.responses.iter().all(|r| r.reservation_id.len() == 32));
    a.settle(&settle_id("b3", &r.responses[1].reservation_id, 0))
        .await
        .unwrap();
    assert!((left(a, "b3").await - 10.0).abs() < EPS);

    // A reservation longer than a day is refused, naming the field.
    let err = a
        .should_allow(&reserve("r", 1, 86_400_001))
        .await
        .unwrap_err();
    assert!(err.to_string().starts_with("reserve_ttl_ms"), "{err}");
}

/// Up to: a reservation takes what the bucket can give (any cost may be asked), `granted` says
/// how much, and its Settle gives the unused part back; not even one token is a denial that took
/// nothing; a dry run asks whether one is there; in an all-or-nothing batch another's denial
/// means nothing was taken (granted 0, no reservation).
async fn up_to_takes_what_is_there<B: Backend>(a: &ShouldAllowApi<B>) {
    let up_to = |key: &str, cost| ShouldAllowRequest {
        up_to: true,
        ..reserve(key, cost, 60_000)
    };
    assert_eq!(a.should_allow(&take("u", 7)).await.unwrap().granted, 7);
    let lease = a.should_allow(&up_to("u", 50)).await.unwrap();
    assert!(
        lease.allowed && lease.reservation_id.len() == 32,
        "{lease:?}"
    );
    assert_eq!(lease.granted, 3, "{lease:?}");
    assert!(lease.tokens_remaining.abs() < EPS, "{lease:?}");
    let err = a.should_allow(&take("u", 50)).await.unwrap_err();
    assert!(
        err.to_string().starts_with("cost"),
        "a plain take still can't: {err}"
    );
    let none = a.should_allow(&up_to("u", 5)).await.unwrap();
    assert!(!none.allowed && none.granted == 0 && none.reservation_id.is_empty());
    assert!(none.retry_after_ms > 0, "{none:?}");
    let s = a
        .settle(&settle_id("u", &lease.reservation_id, 1))
        .await
        .unwrap();
    assert!((s.tokens_remaining - 2.0).abs() < EPS, "2 of 3 back: {s:?}");
    let probe = ShouldAllowRequest {
        dry_run: true,
        ..up_to("u", 5)
    };
    let r = a.should_allow(&probe).await.unwrap();
    assert!(
        r.allowed && r.granted == 0 && r.reservation_id.is_empty(),
        "{r:?}"
    );
    assert!(
        (left(a, "u").await - 2.0).abs() < EPS,
        "a dry run takes nothing"
    );

    let batch = ShouldAllowBatchRequest {
        requests: vec![up_to("u3", 4), take("u", 3)],
        all_or_nothing: true,
    };
    let r = a.should_allow_batch(&batch).await.unwrap();
    assert!(!r.allowed && r.responses[0].allowed, "{r:?}");
    assert_eq!(r.responses[0].granted, 0, "{r:?}");
    assert!(r.responses[0].reservation_id.is_empty(), "{r:?}");
    assert!((left(a, "u3").await - 10.0).abs() < EPS);
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
                    let server = crate::support::RedisServer::start().await;
                    let backend = RedisBackend::new(&server.url(), Duration::from_secs(2)).unwrap();
                    super::$name(&api(backend)).await;
                }
            )*
        }
    };
}

both!(
    settle_less_equal_more,
    reservations_settle_once,
    another_shape_is_another_bucket,
    batch_all_or_nothing,
    batch_bounds_and_field_names,
    up_to_takes_what_is_there
);

#[tokio::test]
async fn refunding_settles_can_be_refused() {
    let mut defaults = ShouldAllowSettings::new(Shape::new(10.0, SLOW).unwrap(), "tb:user:");
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
    use crate::support::{RedisServer, Sluicegate};
    use sluicegate_proto::sluicegate::v1::rate_limit_service_client::RateLimitServiceClient;

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
        Sluicegate::start(&args, &env).await,
        Sluicegate::start(&args, &env).await,
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

/// The same reservation settled at once through two replicas over one Redis, 20 times: exactly one
/// refund lands.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_settles_of_one_id_over_two_replicas_refund_once() {
    use crate::support::{RedisServer, Sluicegate};
    let redis = RedisServer::start().await;
    let replicas = [
        Sluicegate::start(&[], &[("REDIS_URL", &redis.url())]).await,
        Sluicegate::start(&[], &[("REDIS_URL", &redis.url())]).await,
    ];
    let mut clients = Vec::new();
    for t in &replicas {
        clients.push(t.client().await);
    }
    let ask = |cost| ShouldAllowRequest {
        capacity: 10.0,
        rate: SLOW,
        ..reserve("once", cost, 60_000)
    };
    let first = clients[0].should_allow(ask(4)).await.unwrap().into_inner();
    clients[0].should_allow(ask(4)).await.unwrap();
    assert!(first.allowed);
    let settles = (0..20).map(|i| {
        let mut c = clients[i % 2].clone();
        let req = SettleRequest {
            capacity: 10.0,
            rate: SLOW,
            ..settle_id("once", &first.reservation_id, 0)
        };
        tokio::spawn(async move { c.settle(req).await.map(|r| r.into_inner().tokens_remaining) })
    });
    let answers: Vec<f64> = futures_answers(settles).await;
    let after = clients[1]
        .should_allow(ShouldAllowRequest {
            dry_run: true,
            ..ask(1)
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        (after.tokens_remaining - 6.0).abs() < EPS,
        "2 left + one refund of 4: {after:?} (answers {answers:?})"
    );
    assert!(
        answers.iter().all(|t| (t - 6.0).abs() < EPS),
        "every settle answers the one settlement: {answers:?}"
    );
}

async fn futures_answers(
    tasks: impl Iterator<Item = tokio::task::JoinHandle<Result<f64, tonic::Status>>>,
) -> Vec<f64> {
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap().unwrap());
    }
    out
}
