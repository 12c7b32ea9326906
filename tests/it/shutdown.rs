//! SIGTERM with calls in flight: they complete, then the process exits 0.

use std::time::Duration;

use crate::support::{RedisServer, Sluicegate, ask, should_allow};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_in_flight_calls_finish() {
    let redis = RedisServer::start().await;
    let mut t = Sluicegate::start(
        &["--redis-timeout-ms", "5000", "--shutdown-grace-secs", "10"],
        &[("REDIS_URL", &redis.url())],
    )
    .await;
    let client = t.client().await;
    {
        let mut c = client.clone();
        should_allow(&mut c, ask("warm", 0.0, 0.0, 1))
            .await
            .unwrap(); // script loaded, connected
    }

    // Hold Redis busy for a second, so the calls below are in flight when SIGTERM arrives.
    let sleep = redis.sleep(1).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let calls: Vec<_> = (0..20)
        .map(|i| {
            let mut c = client.clone();
            tokio::spawn(
                async move { should_allow(&mut c, ask(&format!("k{i}"), 0.0, 0.0, 1)).await },
            )
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        calls.iter().all(|c| !c.is_finished()),
        "calls must still be in flight"
    );

    let status = tokio::task::spawn_blocking(move || t.terminate(Duration::from_secs(8)))
        .await
        .unwrap()
        .expect("sluicegate exits within the grace period");
    for (i, call) in calls.into_iter().enumerate() {
        let r = call
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("in-flight call {i} failed: {e}"));
        assert!(r.allowed);
    }
    assert!(status.success(), "exit status {status:?}");
    let _ = sleep.await;
}

/// SHUTDOWN_DELAY_SECS=2: on SIGTERM readiness and gRPC health go down at once, calls are still
/// answered for the delay (load balancers take a moment to stop sending), then a clean exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_a_delay_goes_unready_first_and_keeps_answering() {
    use crate::support::{NOT_SERVING, SERVING, health, http_get};
    use std::time::Instant;
    let mut t = Sluicegate::start(&["--shutdown-delay-secs", "2"], &[]).await;
    let mut c = t.client().await;
    crate::support::eventually(Duration::from_secs(5), "SERVING", async || {
        health(&t.grpc_url(), "").await == Some(SERVING)
    })
    .await;
    let started = Instant::now();
    t.signal_term();
    crate::support::eventually(
        Duration::from_millis(500),
        "NOT_SERVING at once",
        async || {
            health(&t.grpc_url(), "").await == Some(NOT_SERVING)
                && http_get(&t.http_url("/readyz"))
                    .await
                    .is_some_and(|(s, _)| s == 503)
        },
    )
    .await;
    // Still answering during the delay.
    let mut answered = 0;
    while started.elapsed() < Duration::from_millis(1500) {
        should_allow(&mut c, ask("late", 0.0, 0.0, 1))
            .await
            .unwrap_or_else(|e| panic!("refused {:?} after SIGTERM: {e}", started.elapsed()));
        answered += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(answered >= 5, "{answered}");
    let status = tokio::task::spawn_blocking(move || {
        let s = t.wait_exit(Duration::from_secs(8));
        (s, started.elapsed())
    })
    .await
    .unwrap();
    let (status, took) = status;
    assert!(status.expect("exits after the delay").success());
    assert!(
        took >= Duration::from_secs(2),
        "exited before the delay: {took:?}"
    );
}
