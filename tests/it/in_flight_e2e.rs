//! In-flight limits end to end: a real Envoy 1.40 with the shipped deploy/envoy/envoy-in-flight.yaml
//! (acquire before the request, release on stream done), a slow upstream, sluicegate on memory or
//! on a real redis-server with two replicas.

use std::time::{Duration, Instant};

use futures::future::join_all;

use crate::support::{Envoy, RedisServer, Sluicegate, Upstream, eventually, http_get, metric};

const IN_FLIGHT_YAML: &str = include_str!("../../deploy/envoy/envoy-in-flight.yaml");

fn rules(dir: &std::path::Path, max: u32, lease: &str) -> String {
    let path = dir.join("in_flight.yaml");
    std::fs::write(
        &path,
        format!(
            "domain: in_flight\ndescriptors:\n  - key: user\n    concurrency: {{ max: {max}, lease: {lease}, name: per_user }}\n"
        ),
    )
    .unwrap();
    path.display().to_string()
}

/// An upstream whose `/slow` takes `slow` and whose other paths answer at once.
async fn slow_upstream(slow: Duration) -> Upstream {
    let app = axum::Router::new()
        .route(
            "/slow",
            axum::routing::get(move || async move {
                tokio::time::sleep(slow).await;
                "done"
            }),
        )
        .fallback(|| async { "fast" });
    Upstream::serving(app).await
}

/// `n` requests for `user` at once, spread over `envoys`; their statuses, sorted.
async fn at_once(envoys: &[&Envoy], n: usize, user: &str, extra: &[(&str, &str)]) -> Vec<u16> {
    let calls = (0..n).map(|i| {
        let envoy = envoys[i % envoys.len()];
        let mut headers = vec![("x-user", user)];
        headers.extend_from_slice(extra);
        async move {
            crate::support::http_request(&envoy.url("/slow"), &headers)
                .await
                .map_or(0, |a| a.status)
        }
    });
    let mut statuses = join_all(calls).await;
    statuses.sort_unstable();
    statuses
}

fn count(statuses: &[u16], status: u16) -> usize {
    statuses.iter().filter(|&&s| s == status).count()
}

/// 20 requests of one user at once through Envoy, with max 5 and a two-second upstream: 5 are
/// served, 15 refused; once they are done the slots are free again (stream-done released them),
/// and a forged `x-request-id` shared by every request does not let them share a slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_most_n_requests_of_a_user_in_flight_through_envoy() {
    let dir = tempfile::tempdir().unwrap();
    let rules = rules(dir.path(), 5, "60s");
    let sluicegate = Sluicegate::start(&["--rules", &rules], &[]).await;
    // Two seconds: every request of a burst reaches sluicegate while the first ones still run,
    // even on a loaded machine.
    let upstream = slow_upstream(Duration::from_secs(2)).await;
    let envoy = Envoy::start(IN_FLIGHT_YAML, upstream.port, sluicegate.grpc_port).await;

    let first = at_once(&[&envoy], 20, "alice", &[]).await;
    assert_eq!(
        (count(&first, 200), count(&first, 429)),
        (5, 15),
        "{first:?}"
    );
    // Another user has slots of their own, and alice's are back once her requests are done.
    let envoys = [&envoy];
    let (alice, bob) = tokio::join!(
        at_once(&envoys, 5, "alice", &[]),
        at_once(&envoys, 6, "bob", &[])
    );
    assert_eq!(count(&alice, 200), 5, "released on stream done: {alice:?}");
    assert_eq!(count(&bob, 200), 5, "{bob:?}");

    // Every request naming the same id: Envoy replaces an id from outside, so each still holds a
    // slot of its own.
    let forged = at_once(&[&envoy], 12, "carol", &[("x-request-id", "same-id")]).await;
    assert_eq!(count(&forged, 200), 5, "{forged:?}");

    // Nothing leaks: every lease was released (refused requests hold none).
    eventually(Duration::from_secs(10), "in-flight back to 0", async || {
        let (_, text) = http_get(&sluicegate.http_url("/metrics")).await.unwrap();
        metric(
            &text,
            "sluicegate_in_flight{domain=\"in_flight\",rule=\"per_user\"}",
        ) == 0.0
    })
    .await;
    let (_, text) = http_get(&sluicegate.http_url("/metrics")).await.unwrap();
    assert_eq!(
        metric(
            &text,
            "sluicegate_in_flight_expired_total{domain=\"in_flight\",rule=\"per_user\"}"
        ),
        0.0
    );
    assert!(
        metric(
            &text,
            "sluicegate_rule_decisions_total{domain=\"in_flight\",rule=\"per_user\",result=\"denied\"}"
        ) >= 15.0
    );
}

/// Envoy killed while requests are in flight never sends their stream-done calls: the slots stay
/// taken until the lease TTL frees them, and not longer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slots_of_a_killed_envoy_come_back_after_the_lease_ttl() {
    let dir = tempfile::tempdir().unwrap();
    let rules = rules(dir.path(), 3, "3s");
    let sluicegate = Sluicegate::start(&["--rules", &rules], &[]).await;
    let upstream = slow_upstream(Duration::from_secs(60)).await;
    let envoy = Envoy::start(IN_FLIGHT_YAML, upstream.port, sluicegate.grpc_port).await;
    let url = envoy.url("/slow");
    let hung: Vec<_> = (0..3)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(
                async move { crate::support::http_request(&url, &[("x-user", "dan")]).await },
            )
        })
        .collect();
    let gauge = "sluicegate_in_flight{domain=\"in_flight\",rule=\"per_user\"}";
    eventually(Duration::from_secs(10), "3 leases held", async || {
        let (_, text) = http_get(&sluicegate.http_url("/metrics")).await.unwrap();
        metric(&text, gauge) == 3.0
    })
    .await;
    let killed = Instant::now();
    drop(envoy);
    hung.iter().for_each(|h| h.abort());

    let envoy = Envoy::start(IN_FLIGHT_YAML, upstream.port, sluicegate.grpc_port).await;
    let fast = envoy.url("/fast");
    let refused = crate::support::http_request(&fast, &[("x-user", "dan")]).await;
    if killed.elapsed() < Duration::from_millis(2500) {
        assert_eq!(
            refused.map(|a| a.status),
            Some(429),
            "the slots are still held"
        );
    }
    eventually(
        Duration::from_secs(10),
        "served after the TTL",
        async || {
            crate::support::http_request(&fast, &[("x-user", "dan")])
                .await
                .is_some_and(|a| a.status == 200)
        },
    )
    .await;
    assert!(
        killed.elapsed() >= Duration::from_millis(2900),
        "freed by the TTL, not sooner: {:?}",
        killed.elapsed()
    );
    let (_, text) = http_get(&sluicegate.http_url("/metrics")).await.unwrap();
    assert_eq!(
        metric(
            &text,
            "sluicegate_in_flight_expired_total{domain=\"in_flight\",rule=\"per_user\"}"
        ),
        3.0,
        "the leaked leases are counted"
    );
}

/// Two sluicegate replicas over one Redis, each behind its own Envoy: one user's requests spread
/// over both Envoys still get exactly `max` slots, and the releases land wherever they go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_behind_two_envoys_stay_exact() {
    let dir = tempfile::tempdir().unwrap();
    let rules = rules(dir.path(), 4, "60s");
    let redis = RedisServer::start().await;
    let args = ["--rules", rules.as_str(), "--redis-url", &redis.url()];
    let a = Sluicegate::start(&args, &[]).await;
    let b = Sluicegate::start(&args, &[]).await;
    // Two seconds: every request of a burst reaches sluicegate while the first ones still run,
    // even on a loaded machine.
    let upstream = slow_upstream(Duration::from_secs(2)).await;
    let ea = Envoy::start(IN_FLIGHT_YAML, upstream.port, a.grpc_port).await;
    let eb = Envoy::start(IN_FLIGHT_YAML, upstream.port, b.grpc_port).await;
    for round in 0..2 {
        let statuses = at_once(&[&ea, &eb], 16, "erin", &[]).await;
        assert_eq!(
            (count(&statuses, 200), count(&statuses, 429)),
            (4, 12),
            "round {round}: {statuses:?}"
        );
    }
    // Every lease released: the key is gone from Redis.
    let mut conn = redis.connection().await;
    eventually(
        Duration::from_secs(10),
        "no lease left in Redis",
        async || {
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg("*in_flight")
                .query_async(&mut conn)
                .await
                .unwrap();
            keys.is_empty()
        },
    )
    .await;
}

/// An attacker's own `x-request-id`, behind an Envoy that keeps ids it is sent (an internal hop:
/// `use_remote_address: false`): requests naming the id of a request in flight are refused, and
/// their stream-done releases do not free that request's slot, so nobody else gets in meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_request_id_cannot_free_a_slot_in_use() {
    let dir = tempfile::tempdir().unwrap();
    let rules = rules(dir.path(), 1, "60s");
    let sluicegate = Sluicegate::start(&["--rules", &rules], &[]).await;
    let upstream = slow_upstream(Duration::from_secs(3)).await;
    let config = IN_FLIGHT_YAML.replace("use_remote_address: true", "use_remote_address: false");
    assert_ne!(config, IN_FLIGHT_YAML);
    let envoy = Envoy::start(&config, upstream.port, sluicegate.grpc_port).await;
    let url = envoy.url("/slow");
    let holder = {
        let url = url.clone();
        tokio::spawn(async move {
            crate::support::http_request(&url, &[("x-user", "eve"), ("x-request-id", "A")]).await
        })
    };
    let gauge = "sluicegate_in_flight{domain=\"in_flight\",rule=\"per_user\"}";
    eventually(
        Duration::from_secs(10),
        "the holder in flight",
        async || {
            let (_, text) = http_get(&sluicegate.http_url("/metrics")).await.unwrap();
            metric(&text, gauge) == 1.0
        },
    )
    .await;
    // Five more naming the holder's id: refused at once (each then sends its release).
    let reused = at_once(&[&envoy], 5, "eve", &[("x-request-id", "A")]).await;
    assert_eq!(reused, [429; 5]);
    // The slot is still the holder's: a request of another id is refused too.
    let other = crate::support::http_request(&url, &[("x-user", "eve"), ("x-request-id", "B")])
        .await
        .map(|a| a.status);
    assert_eq!(
        other,
        Some(429),
        "the reused id's releases freed the holder's slot"
    );
    assert_eq!(holder.await.unwrap().map(|a| a.status), Some(200));
    // Once the holder is done, the slot is free: Envoy sends its release after the response, so
    // wait for it to land (a busy machine answered the next request first).
    eventually(
        Duration::from_secs(10),
        "the holder's release",
        async || {
            let (_, text) = http_get(&sluicegate.http_url("/metrics")).await.unwrap();
            metric(&text, gauge) == 0.0
        },
    )
    .await;
    let after = crate::support::http_request(&envoy.url("/fast"), &[("x-user", "eve")]).await;
    assert_eq!(after.map(|a| a.status), Some(200));
}
