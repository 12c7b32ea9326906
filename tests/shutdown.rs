//! SIGTERM with calls in flight: they complete, then the process exits 0.

mod common;

use std::time::Duration;

use common::{RedisServer, Tollgate, ask, should_allow};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_in_flight_calls_finish() {
    let redis = RedisServer::start().await;
    let mut t = Tollgate::start(
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
    let mut admin = redis.connection().await;
    let sleep = tokio::spawn(async move {
        redis::cmd("DEBUG")
            .arg("SLEEP")
            .arg("1")
            .query_async::<()>(&mut admin)
            .await
    });
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
        .expect("tollgate exits within the grace period");
    for (i, call) in calls.into_iter().enumerate() {
        let r = call
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("in-flight call {i} failed: {e}"));
        assert!(r.allowed);
    }
    assert!(status.success(), "exit status {status:?}");
    // The admin connection may time out its own reply to DEBUG SLEEP; only its effect mattered.
    let _ = sleep.await;
}
