//! sluicegate-demo end to end against a real sluicegate (memory and Redis), and its failure modes
//! when sluicegate is stopped or hangs.

use std::time::{Duration, Instant};

use crate::support::{Demo, HttpAnswer, RedisServer, Sluicegate, http_request};

async fn get(demo: &Demo, path: &str, headers: &[(&str, &str)]) -> HttpAnswer {
    http_request(&demo.url(path), headers)
        .await
        .expect("demo answers")
}

fn rl(a: &HttpAnswer) -> (u16, Option<&str>, Option<&str>, Option<&str>) {
    (
        a.status,
        a.header("x-ratelimit-limit"),
        a.header("x-ratelimit-remaining"),
        a.header("x-ratelimit-reset"),
    )
}

/// Capacity 3, one token per second: exact headers along allow, allow, allow, deny.
async fn header_sequence(sluicegate: &Sluicegate) {
    let demo = Demo::start(&sluicegate.grpc_url(), &["--identity", "api-key"]).await;
    let k = [("x-api-key", "seq")];
    let seen: Vec<_> = {
        let mut v = Vec::new();
        for _ in 0..3 {
            v.push(get(&demo, "/api/items", &k).await);
        }
        v
    };
    assert_eq!(rl(&seen[0]), (200, Some("3"), Some("2"), Some("1")));
    assert_eq!(rl(&seen[1]), (200, Some("3"), Some("1"), Some("2")));
    assert_eq!(rl(&seen[2]), (200, Some("3"), Some("0"), Some("3")));
    assert!(seen[0].body.contains("items"), "{}", seen[0].body);
    let denied = get(&demo, "/api/items", &k).await;
    assert_eq!(rl(&denied), (429, Some("3"), Some("0"), Some("3")));
    assert_eq!(denied.header("retry-after"), Some("1"));
    assert!(denied.body.contains("rate limited"), "{}", denied.body);
    // `/` is limited by the same bucket.
    assert_eq!(get(&demo, "/", &k).await.status, 429);
    // Another key has its own bucket.
    assert_eq!(get(&demo, "/", &[("x-api-key", "other")]).await.status, 200);
}

#[tokio::test]
async fn headers_along_a_sequence_memory() {
    let t = Sluicegate::start(&["--capacity", "3", "--rate", "1"], &[]).await;
    header_sequence(&t).await;
}

#[tokio::test]
async fn headers_along_a_sequence_redis() {
    let redis = RedisServer::start().await;
    let t = Sluicegate::start(
        &[
            "--capacity",
            "3",
            "--rate",
            "1",
            "--redis-timeout-ms",
            "1000",
        ],
        &[("REDIS_URL", &redis.url())],
    )
    .await;
    header_sequence(&t).await;
}

#[tokio::test]
async fn retry_after_rounds_up() {
    // One token every 2.5 s: a drained bucket says 2.5 s, so Retry-After is 3, never 2.
    let t = Sluicegate::start(&["--capacity", "1", "--rate", "0.4"], &[]).await;
    let demo = Demo::start(&t.grpc_url(), &["--identity", "user"]).await;
    let u = [("x-user", "ann")];
    assert_eq!(get(&demo, "/api/items", &u).await.status, 200);
    let denied = get(&demo, "/api/items", &u).await;
    assert_eq!(denied.status, 429);
    assert_eq!(denied.header("retry-after"), Some("3"));
    assert_eq!(denied.header("x-ratelimit-reset"), Some("3"));
}

#[tokio::test]
async fn missing_identity_is_401_and_probes_are_never_limited() {
    let t = Sluicegate::start(&["--capacity", "1", "--rate", "0.001"], &[]).await;
    for (identity, header) in [("api-key", "x-api-key"), ("user", "x-user")] {
        let demo = Demo::start(&t.grpc_url(), &["--identity", identity]).await;
        let a = get(&demo, "/api/items", &[]).await;
        assert_eq!(a.status, 401, "{identity}");
        assert!(a.body.contains(header), "{identity}: {}", a.body);
        assert_eq!(a.header("content-type"), Some("application/json"));
    }
    let demo = Demo::start(&t.grpc_url(), &[]).await; // ip identity
    assert_eq!(get(&demo, "/", &[]).await.status, 200);
    assert_eq!(get(&demo, "/", &[]).await.status, 429);
    for _ in 0..20 {
        assert_eq!(get(&demo, "/healthz", &[]).await.status, 200);
    }
    let metrics = get(&demo, "/metrics", &[]).await;
    assert_eq!(metrics.status, 200);
    for series in [
        "demo_http_requests_total{route=\"/\",status=\"429\"} 1",
        "demo_http_request_duration_seconds_bucket{route=\"/\"",
    ] {
        assert!(
            metrics.body.contains(series),
            "missing {series}:\n{}",
            metrics.body
        );
    }
    let healthz: u64 = metrics
        .body
        .lines()
        .find_map(|l| {
            l.strip_prefix("demo_http_requests_total{route=\"/healthz\",status=\"200\"} ")
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(healthz >= 20, "healthz count {healthz}");
}

#[tokio::test]
async fn trusted_forwarded_for_picks_the_bucket() {
    let t = Sluicegate::start(&["--capacity", "1", "--rate", "0.001"], &[]).await;
    let demo = Demo::start(&t.grpc_url(), &["--trust-forwarded"]).await;
    assert_eq!(
        get(&demo, "/", &[("x-forwarded-for", "203.0.113.7")])
            .await
            .status,
        200
    );
    assert_eq!(
        get(&demo, "/", &[("x-forwarded-for", "203.0.113.8")])
            .await
            .status,
        200
    );
    assert_eq!(
        get(&demo, "/", &[("x-forwarded-for", "1.1.1.1, 203.0.113.7")])
            .await
            .status,
        429
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_concurrent_requests_on_a_bucket_of_twenty() {
    let t = Sluicegate::start(&["--capacity", "20", "--rate", "0.001"], &[]).await;
    let demo = Demo::start(
        &t.grpc_url(),
        &["--identity", "api-key", "--sluicegate-timeout-ms", "2000"],
    )
    .await;
    let url = demo.url("/api/items");
    let statuses = futures::future::join_all((0..50).map(|_| {
        let url = url.clone();
        async move {
            http_request(&url, &[("x-api-key", "shared")])
                .await
                .unwrap()
                .status
        }
    }))
    .await;
    assert_eq!(
        statuses.iter().filter(|&&s| s == 200).count(),
        20,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|&&s| s == 429).count(),
        30,
        "{statuses:?}"
    );
}

/// A listener that accepts connections and never answers.
async fn black_hole() -> (String, tokio::task::JoinHandle<()>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = l.accept().await {
            held.push(s);
        }
    });
    (url, task)
}

#[tokio::test]
async fn sluicegate_stopped_or_hanging_within_the_timeout() {
    let stopped = format!("http://127.0.0.1:{}", crate::support::free_port());
    let (hanging, _hole) = black_hole().await;
    const TIMEOUT_MS: u64 = 100;
    let bound = Duration::from_millis(TIMEOUT_MS + 400);
    for target in [stopped.as_str(), hanging.as_str()] {
        for (mode, want) in [("allow", 200), ("deny", 503)] {
            let demo = Demo::start(
                target,
                &[
                    "--failure-mode",
                    mode,
                    "--sluicegate-timeout-ms",
                    &TIMEOUT_MS.to_string(),
                ],
            )
            .await;
            for i in 0..3 {
                let started = Instant::now();
                let a = get(&demo, "/api/items", &[]).await;
                let took = started.elapsed();
                assert_eq!(a.status, want, "{target} {mode} #{i}: {a:?}");
                assert!(
                    took < bound,
                    "{target} {mode} #{i}: answered after {took:?}"
                );
                if want == 503 {
                    assert!(a.body.contains("unavailable"), "{}", a.body);
                    assert_eq!(a.header("retry-after"), Some("1"), "{a:?}");
                }
                // Seen from outside, whatever the mode.
                assert_eq!(a.header("x-ratelimit-degraded"), Some("1"), "{a:?}");
            }
            let m = get(&demo, "/metrics", &[]).await;
            assert!(
                m.body
                    .contains(&format!("demo_limiter_failures_total{{mode=\"{mode}\"}} 3")),
                "{}",
                m.body
            );
            // The layer counts them by itself (no hook wired for it).
            let answer = if want == 200 { "allowed" } else { "denied" };
            assert!(
                m.body.contains(&format!(
                    "sluicegate_client_degraded_total{{answer=\"{answer}\"}} 3"
                )),
                "{}",
                m.body
            );
        }
    }
}

/// A too-long identity is the client's error, never "sluicegate down": with DEMO_FAILURE_MODE=allow
/// it used to be served.
#[tokio::test]
async fn an_oversized_identity_is_refused_not_served() {
    let t = Sluicegate::start(&["--capacity", "1", "--rate", "0.001"], &[]).await;
    let demo = Demo::start(
        &t.grpc_url(),
        &["--identity", "api-key", "--failure-mode", "allow"],
    )
    .await;
    let long = "k".repeat(600);
    for _ in 0..3 {
        let a = get(&demo, "/api/items", &[("x-api-key", &long)]).await;
        assert_eq!(a.status, 400, "{a:?}");
        assert!(a.body.contains("key"), "names the field: {}", a.body);
    }
    let m = get(&demo, "/metrics", &[]).await;
    assert!(
        !m.body
            .contains("demo_limiter_failures_total{mode=\"allow\"} 3"),
        "counted as a sluicegate failure: {}",
        m.body
    );
}

/// POST /api/generate reserves max_tokens, writes up to that many, and settles the real cost:
/// the unused part comes back, and a budget too small for the reservation is a 429.
#[tokio::test]
async fn generate_reserves_works_and_settles() {
    let t = Sluicegate::start(&[], &[]).await;
    let demo = Demo::start(
        &t.grpc_url(),
        &[
            "--identity",
            "user",
            "--token-capacity",
            "500",
            "--token-rate",
            "0.001",
            "--sluicegate-timeout-ms",
            "2000",
        ],
    )
    .await;
    let post = |max: u32| {
        let url = demo.url("/api/generate");
        async move {
            crate::support::http_post_json(
                &url,
                &[("x-user", "ann")],
                &format!("{{\"prompt\":\"hi\",\"max_tokens\":{max}}}"),
            )
            .await
            .expect("demo answers")
        }
    };
    let mut spent = 0.0;
    for _ in 0..3 {
        let a = post(100).await;
        assert_eq!(a.status, 200, "{a:?}");
        let j: serde_json::Value = serde_json::from_str(&a.body).unwrap();
        let generated = j["generated_tokens"].as_f64().unwrap();
        assert!((1.0..=100.0).contains(&generated), "{j}");
        assert_eq!(j["reserved_tokens"], 100);
        assert_eq!(j["refunded_tokens"].as_f64().unwrap(), 100.0 - generated);
        spent += generated;
        let left = j["tokens_remaining"].as_f64().unwrap();
        assert!(
            (left - (500.0 - spent)).abs() < 0.5,
            "only what was generated is spent: {j}"
        );
    }
    // A reservation larger than what is left: refused before any work.
    let left = 500.0 - spent;
    let a = post(left as u32 + 1).await;
    assert_eq!(a.status, 429, "{a:?}");
    assert!(a.header("retry-after").is_some());
    // Without an identity: 401; a reservation beyond the budget's size: 400.
    let anon =
        crate::support::http_post_json(&demo.url("/api/generate"), &[], "{\"max_tokens\":5}")
            .await
            .unwrap();
    assert_eq!(anon.status, 401);
    assert_eq!(post(501).await.status, 400);
}

/// POST /api/generate runs at most DEMO_MAX_GENERATIONS generations per identity at once: of five
/// sent together, two are served (each saying how many run) and three are 429 with Retry-After;
/// once they are done, the next ones are served again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generations_are_limited_in_flight_per_identity() {
    let t = Sluicegate::start(&[], &[]).await;
    let demo = Demo::start(
        &t.grpc_url(),
        &[
            "--identity",
            "user",
            "--max-generations",
            "2",
            // 100 tokens at 10 ms each: a second per generation, so all five overlap.
            "--ms-per-token",
            "10",
            "--token-capacity",
            "100000",
            "--sluicegate-timeout-ms",
            "2000",
        ],
    )
    .await;
    let post = |user: &'static str| {
        let url = demo.url("/api/generate");
        async move {
            crate::support::http_post_json(&url, &[("x-user", user)], "{\"max_tokens\":100}")
                .await
                .expect("demo answers")
        }
    };
    // Generations write 1..=100 tokens at random (10 ms to a second): all five arrive within a
    // few milliseconds, so at least one, and at most two, are served.
    let answers = futures::future::join_all((0..5).map(|_| post("ann"))).await;
    let served: Vec<&crate::support::HttpAnswer> =
        answers.iter().filter(|a| a.status == 200).collect();
    let refused: Vec<&crate::support::HttpAnswer> =
        answers.iter().filter(|a| a.status == 429).collect();
    assert_eq!(served.len() + refused.len(), 5, "{answers:?}");
    assert!((1..=2).contains(&served.len()), "{answers:?}");
    for a in &served {
        let j: serde_json::Value = serde_json::from_str(&a.body).unwrap();
        assert_eq!(j["max_generations"], 2, "{j}");
        assert!(
            (1..=2).contains(&j["generations_running"].as_u64().unwrap()),
            "{j}"
        );
    }
    for a in &refused {
        assert!(a.header("retry-after").is_some(), "{a:?}");
        assert!(a.body.contains("too many requests in flight"), "{a:?}");
    }
    // Another identity has slots of its own; ann's are back once hers are done.
    let (ann, bob) = tokio::join!(post("ann"), post("bob"));
    assert_eq!((ann.status, bob.status), (200, 200), "{ann:?} {bob:?}");
}
