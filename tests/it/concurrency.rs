//! Many clients, two sluicegate processes, one Redis, one bucket: exactly its capacity is allowed,
//! with decisions batched per script call and the local deny cache on.

use std::time::{Duration, Instant};

use crate::support::{RedisServer, Sluicegate, ask, eventually, http_get, metric, should_allow};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn five_hundred_calls_over_two_replicas_allow_exactly_capacity() {
    let redis = RedisServer::start().await;
    let env = [
        ("REDIS_URL", redis.url()),
        ("REDIS_TIMEOUT_MS", "2000".to_string()),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let replicas = [
        Sluicegate::start(&[], &env).await,
        Sluicegate::start(&[], &env).await,
    ];
    let clients = [replicas[0].client().await, replicas[1].client().await];

    let calls = (0..500).map(|i| {
        let mut client = clients[i % 2].clone();
        tokio::spawn(async move {
            // Capacity 100, a negligible refill over the test's few seconds.
            should_allow(&mut client, ask("one-bucket", 100.0, 1e-6, 1)).await
        })
    });
    let results = futures::future::join_all(calls).await;
    let mut allowed = [0; 2];
    for (i, r) in results.into_iter().enumerate() {
        let r = r.unwrap().unwrap_or_else(|e| panic!("call {i}: {e}"));
        if r.allowed {
            allowed[i % 2] += 1;
        }
    }
    assert_eq!(
        allowed[0] + allowed[1],
        100,
        "allowed per replica: {allowed:?}"
    );
    // However the allowed calls fell between the replicas, both now see the one drained bucket.
    for mut c in clients {
        let r = should_allow(&mut c, ask("one-bucket", 100.0, 1e-6, 1))
            .await
            .unwrap();
        assert!(!r.allowed && r.tokens_remaining < 1.0, "{r:?}");
    }
    // The exactness held with batching at work: some script calls decided several buckets.
    let mut batched = false;
    for r in &replicas {
        let (_, m) = http_get(&r.http_url("/metrics")).await.unwrap();
        let sum = metric(&m, "sluicegate_backend_batch_size_sum{backend=\"redis\"}");
        let count = metric(&m, "sluicegate_backend_batch_size_count{backend=\"redis\"}");
        batched |= sum > count;
    }
    assert!(batched, "no script call carried more than one decision");
}

/// Two replicas hammer one key while refunds come in through one of them: the deny cache answers
/// locally (its counter moves), and no window of the run admits more than the bucket allows.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_deny_cache_never_admits_more_than_the_bucket() {
    let redis = RedisServer::start().await;
    let env = [("REDIS_URL", redis.url())];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    // Refunds on the caller's word (a Settle without a reservation): they add tokens the deny
    // cache of the other replica does not know of.
    let args = [
        "--redis-timeout-ms",
        "2000",
        "--local-deny-cache",
        "true",
        "--allow-refunds",
        "true",
    ];
    let replicas = [
        Sluicegate::start(&args, &env).await,
        Sluicegate::start(&args, &env).await,
    ];
    let clients = [replicas[0].client().await, replicas[1].client().await];
    // 20 tokens, 20 per second: over 2 s at most 20 + 40 = 60, plus what the refunds give back.
    const CAPACITY: f64 = 20.0;
    const RATE: f64 = 20.0;
    let started = Instant::now();
    let run = Duration::from_secs(2);
    let hammer = (0..16).map(|i| {
        let mut c = clients[i % 2].clone();
        tokio::spawn(async move {
            let mut allowed = 0u32;
            while started.elapsed() < run {
                if should_allow(&mut c, ask("hot", CAPACITY, RATE, 1))
                    .await
                    .unwrap()
                    .allowed
                {
                    allowed += 1;
                }
            }
            allowed
        })
    });
    let refunds = {
        let mut c = clients[1].clone();
        tokio::spawn(async move {
            let mut given = 0u64;
            while started.elapsed() < run {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let s = c
                    .settle(sluicegate_proto::sluicegate::v1::SettleRequest {
                        key: "hot".into(),
                        capacity: CAPACITY,
                        rate: RATE,
                        reserved: 3,
                        actual: 0,
                        ..Default::default()
                    })
                    .await;
                if s.is_ok() {
                    given += 3;
                }
            }
            given
        })
    };
    let allowed: u32 = futures::future::join_all(hammer)
        .await
        .into_iter()
        .map(|r| r.unwrap())
        .sum();
    let refunded = refunds.await.unwrap() as f64;
    assert!(refunded > 0.0, "no refund landed");
    let elapsed = started.elapsed().as_secs_f64();
    let bound = CAPACITY + RATE * elapsed + refunded;
    assert!(
        f64::from(allowed) <= bound,
        "{allowed} allowed, at most {bound:.1} possible"
    );
    assert!(
        f64::from(allowed) > RATE * elapsed * 0.5,
        "the limiter starved: {allowed}"
    );
    let mut local = 0.0;
    for r in &replicas {
        let (_, m) = http_get(&r.http_url("/metrics")).await.unwrap();
        local += metric(&m, "sluicegate_local_answers_total{api=\"should_allow\"}");
    }
    assert!(local > 0.0, "the deny cache never answered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory_backend_is_exact_under_concurrency() {
    let t = Sluicegate::start(&[], &[]).await;
    let client = t.client().await;
    let calls = (0..500).map(|_| {
        let mut client = client.clone();
        tokio::spawn(async move { should_allow(&mut client, ask("mem", 100.0, 1e-6, 1)).await })
    });
    let allowed = futures::future::join_all(calls)
        .await
        .into_iter()
        .filter(|r| r.as_ref().unwrap().as_ref().unwrap().allowed)
        .count();
    assert_eq!(allowed, 100);
}

/// A refund through one replica reaches the other's deny cache: replica A learns a bucket is
/// empty (and denies locally), replica B settles a reservation that fills it, and A admits again
/// within a round trip, not after the refill (1,000 s at this rate).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refund_through_another_replica_reaches_the_deny_cache() {
    use sluicegate_proto::sluicegate::v1::{SettleRequest, ShouldAllowRequest};
    let redis = RedisServer::start().await;
    let env = [("REDIS_URL", redis.url())];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let args = ["--redis-timeout-ms", "2000", "--local-deny-cache", "true"];
    let (a, b) = (
        Sluicegate::start(&args, &env).await,
        Sluicegate::start(&args, &env).await,
    );
    let (mut ca, mut cb) = (a.client().await, b.client().await);
    let ask = |cost| ShouldAllowRequest {
        reserve_ttl_ms: 60_000,
        ..crate::support::ask("shared", 10.0, 0.001, cost)
    };
    let reserved = should_allow(&mut cb, ask(5)).await.unwrap();
    assert!(reserved.allowed);
    assert!(should_allow(&mut ca, ask(5)).await.unwrap().allowed);
    // Empty: A asks Redis once, then denies locally.
    for _ in 0..3 {
        assert!(!should_allow(&mut ca, ask(1)).await.unwrap().allowed);
    }
    let (_, m) = http_get(&a.http_url("/metrics")).await.unwrap();
    assert!(
        metric(&m, "sluicegate_local_answers_total{api=\"should_allow\"}") >= 1.0,
        "A's deny cache knows the bucket is empty"
    );
    // The refund through B.
    cb.settle(SettleRequest {
        key: "shared".into(),
        capacity: 10.0,
        rate: 0.001,
        actual: 0,
        reservation_id: reserved.reservation_id,
        ..Default::default()
    })
    .await
    .unwrap();
    let refunded = Instant::now();
    eventually(Duration::from_secs(2), "A to admit again", async || {
        should_allow(&mut ca, ask(1)).await.unwrap().allowed
    })
    .await;
    eprintln!(
        "deny cache: A admitted {:?} after B's refund",
        refunded.elapsed()
    );
}
