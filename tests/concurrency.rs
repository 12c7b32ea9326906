//! Many clients, two tollgate processes, one Redis, one bucket: exactly its capacity is allowed.

mod common;

use common::{RedisServer, Tollgate, ask, should_allow};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn five_hundred_calls_over_two_replicas_allow_exactly_capacity() {
    let redis = RedisServer::start().await;
    let env = [
        ("REDIS_URL", redis.url()),
        ("REDIS_TIMEOUT_MS", "2000".to_string()),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let replicas = [
        Tollgate::start(&[], &env).await,
        Tollgate::start(&[], &env).await,
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
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory_backend_is_exact_under_concurrency() {
    let t = Tollgate::start(&[], &[]).await;
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
