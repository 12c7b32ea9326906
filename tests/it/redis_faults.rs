//! Redis going wrong under a running sluicegate: scripts flushed, the server killed and restarted.
//! Latency stays bounded by REDIS_TIMEOUT_MS, FAILURE_MODE decides the answers, health follows,
//! and sluicegate recovers by itself.

use std::time::{Duration, Instant};

use crate::support::{
    NOT_SERVING, RedisServer, SERVING, Sluicegate, ask, eventually, health, http_get, should_allow,
};
use tonic::Code;

/// Long enough that a real answer (two round trips after SCRIPT FLUSH) is never cut on a busy
/// machine; the bounds below are about a dead Redis, which is refused at once.
const TIMEOUT_MS: u64 = 200;
/// Scheduling slack on a loaded 2-core machine; the point is "bounded", not "fast".
const SLACK: Duration = Duration::from_millis(400);

async fn start(redis: &RedisServer, mode: &str) -> Sluicegate {
    Sluicegate::start(
        &[
            "--redis-timeout-ms",
            &TIMEOUT_MS.to_string(),
            "--failure-mode",
            mode,
        ],
        &[("REDIS_URL", &redis.url())],
    )
    .await
}

#[tokio::test]
async fn script_flush_changes_nothing_for_the_caller() {
    let redis = RedisServer::start().await;
    let t = start(&redis, "error").await;
    let mut c = t.client().await;
    let mut admin = redis.connection().await;
    for i in 0..6 {
        let r = should_allow(&mut c, ask("flush", 4.0, 0.001, 1)).await;
        let r = r.unwrap_or_else(|e| panic!("call {i} after SCRIPT FLUSH failed: {e}"));
        assert_eq!(r.allowed, i < 4, "call {i}: {r:?}");
        let _: () = redis::cmd("SCRIPT")
            .arg("FLUSH")
            .query_async(&mut admin)
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn redis_killed_then_restarted() {
    let mut redis = RedisServer::start().await;
    let modes = [
        start(&redis, "error").await,
        start(&redis, "allow").await,
        start(&redis, "deny").await,
    ];
    let mut clients = Vec::new();
    for t in &modes {
        eventually(Duration::from_secs(5), "SERVING", async || {
            health(&t.grpc_url(), "").await == Some(SERVING)
        })
        .await;
        let mut c = t.client().await;
        assert!(
            should_allow(&mut c, ask("k", 0.0, 0.0, 1))
                .await
                .unwrap()
                .allowed
        );
        clients.push(c);
    }

    redis.kill();

    // Every answer comes within the deadline plus slack, shaped by FAILURE_MODE.
    for round in 0..10 {
        for (i, c) in clients.iter_mut().enumerate() {
            let started = Instant::now();
            let result = should_allow(c, ask("k", 0.0, 0.0, 1)).await;
            let took = started.elapsed();
            assert!(
                took < Duration::from_millis(TIMEOUT_MS) + SLACK,
                "round {round}, mode {i}: answered after {took:?}"
            );
            match i {
                0 => assert_eq!(result.unwrap_err().code(), Code::Unavailable),
                1 => {
                    let r = result.unwrap();
                    assert!(r.allowed && r.degraded, "{r:?}");
                }
                _ => {
                    let r = result.unwrap();
                    assert!(!r.allowed && r.degraded, "{r:?}");
                }
            }
        }
    }
    // FAILURE_MODE=error cannot answer without Redis: not ready. allow and deny still answer
    // every call, so they stay ready (the README's "Operating it").
    let strict = &modes[0];
    eventually(Duration::from_secs(5), "NOT_SERVING", async || {
        health(&strict.grpc_url(), "").await == Some(NOT_SERVING)
    })
    .await;
    assert_eq!(
        health(&strict.grpc_url(), "sluicegate.v1.RateLimitService").await,
        Some(NOT_SERVING)
    );
    assert_eq!(http_get(&strict.http_url("/readyz")).await.unwrap().0, 503);
    for t in &modes {
        assert_eq!(
            http_get(&t.http_url("/healthz")).await.unwrap().0,
            200,
            "still alive"
        );
    }
    for t in &modes[1..] {
        assert_eq!(health(&t.grpc_url(), "").await, Some(SERVING));
        assert_eq!(http_get(&t.http_url("/readyz")).await.unwrap().0, 200);
    }
    let (_, metrics) = http_get(&modes[1].http_url("/metrics")).await.unwrap();
    assert!(
        metrics.contains("sluicegate_failure_mode_total{mode=\"allow\"} 10"),
        "{metrics}"
    );
    assert!(
        metrics.contains("sluicegate_backend_errors_total{backend=\"redis\""),
        "{metrics}"
    );

    redis.restart().await;

    // Recovery without restarting sluicegate: real answers again, health back to SERVING.
    for (t, c) in modes.iter().zip(clients.iter_mut()) {
        eventually(
            Duration::from_secs(10),
            "a real answer after restart",
            async || matches!(should_allow(c, ask("k2", 0.0, 0.0, 1)).await, Ok(r) if !r.degraded),
        )
        .await;
        eventually(Duration::from_secs(5), "SERVING again", async || {
            health(&t.grpc_url(), "").await == Some(SERVING)
        })
        .await;
        assert_eq!(http_get(&t.http_url("/readyz")).await.unwrap().0, 200);
    }
}

#[tokio::test]
async fn starts_while_redis_is_down_and_connects_when_it_appears() {
    let mut redis = RedisServer::start().await;
    redis.kill();
    let t = start(&redis, "error").await;
    let mut c = t.client().await;
    assert_eq!(health(&t.grpc_url(), "").await, Some(NOT_SERVING));
    let started = Instant::now();
    let err = should_allow(&mut c, ask("late", 0.0, 0.0, 1))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert!(started.elapsed() < Duration::from_millis(TIMEOUT_MS) + SLACK);
    redis.restart().await;
    eventually(
        Duration::from_secs(10),
        "answers once Redis is up",
        async || should_allow(&mut c, ask("late", 0.0, 0.0, 1)).await.is_ok(),
    )
    .await;
    eventually(Duration::from_secs(5), "SERVING", async || {
        health(&t.grpc_url(), "").await == Some(SERVING)
    })
    .await;
}

/// Redis paused (SIGSTOP: connections open, nothing answers) under FAILURE_MODE=allow: the first
/// calls wait out REDIS_TIMEOUT_MS, then the breaker opens and answers come at once, degraded;
/// one missed ping does not flip readiness; after SIGCONT the breaker closes by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_redis_trips_the_breaker_and_it_closes_by_itself() {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    const PAUSED_TIMEOUT_MS: u64 = 300;
    let redis = RedisServer::start().await;
    let t = Sluicegate::start(
        &[
            "--redis-timeout-ms",
            &PAUSED_TIMEOUT_MS.to_string(),
            "--failure-mode",
            "allow",
        ],
        &[("REDIS_URL", &redis.url())],
    )
    .await;
    let mut c = t.client().await;
    eventually(
        Duration::from_secs(5),
        "a real answer",
        async || matches!(should_allow(&mut c, ask("p", 0.0, 0.0, 1)).await, Ok(r) if !r.degraded),
    )
    .await;
    let pid = Pid::from_raw(redis.pid() as i32);
    kill(pid, Signal::SIGSTOP).unwrap();
    // Until the breaker opens, each call waits for its deadline.
    let mut fast = 0;
    let mut latencies = Vec::new();
    for _ in 0..12 {
        let started = Instant::now();
        let r = should_allow(&mut c, ask("p", 0.0, 0.0, 1)).await.unwrap();
        let took = started.elapsed();
        assert!(r.allowed && r.degraded, "{r:?}");
        assert!(
            took < Duration::from_millis(PAUSED_TIMEOUT_MS) + SLACK,
            "{took:?}"
        );
        latencies.push(took);
        if took < Duration::from_millis(50) {
            fast += 1;
        }
    }
    assert!(
        fast >= 5,
        "the breaker should answer at once after a few failures: {latencies:?}"
    );
    let m = http_get(&t.http_url("/metrics")).await.unwrap().1;
    assert!(
        m.contains("sluicegate_backend_circuit_open{node=\"127.0.0.1:"),
        "{m}"
    );
    assert!(
        m.lines()
            .any(|l| l.starts_with("sluicegate_backend_circuit_open{") && l.ends_with(" 1")),
        "{m}"
    );
    // FAILURE_MODE=allow still answers: the replica stays ready.
    assert_eq!(http_get(&t.http_url("/readyz")).await.unwrap().0, 200);
    kill(pid, Signal::SIGCONT).unwrap();
    eventually(
        Duration::from_secs(15),
        "the breaker to close",
        async || matches!(should_allow(&mut c, ask("p", 0.0, 0.0, 1)).await, Ok(r) if !r.degraded),
    )
    .await;
    let m = http_get(&t.http_url("/metrics")).await.unwrap().1;
    assert!(
        m.lines()
            .any(|l| l.starts_with("sluicegate_backend_circuit_open{") && l.ends_with(" 0")),
        "{m}"
    );
}

/// One missed ping is not an outage: readiness stays up through a Redis pause shorter than the
/// threshold, and drops after several misses (FAILURE_MODE=error).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_needs_several_failed_pings() {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    let redis = RedisServer::start().await;
    let t = Sluicegate::start(
        &["--redis-timeout-ms", "100"],
        &[("REDIS_URL", &redis.url())],
    )
    .await;
    eventually(Duration::from_secs(5), "ready", async || {
        http_get(&t.http_url("/readyz"))
            .await
            .is_some_and(|(s, _)| s == 200)
    })
    .await;
    let pid = Pid::from_raw(redis.pid() as i32);
    // A pause of about one ping interval: at most one ping misses.
    kill(pid, Signal::SIGSTOP).unwrap();
    let mut statuses = Vec::new();
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(450) {
        statuses.push(http_get(&t.http_url("/readyz")).await.unwrap().0);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    kill(pid, Signal::SIGCONT).unwrap();
    assert!(
        statuses.iter().all(|&s| s == 200),
        "flipped on one miss: {statuses:?}"
    );
    // A long pause: not ready after a few misses.
    kill(pid, Signal::SIGSTOP).unwrap();
    eventually(Duration::from_secs(5), "not ready", async || {
        http_get(&t.http_url("/readyz"))
            .await
            .is_some_and(|(s, _)| s == 503)
    })
    .await;
    kill(pid, Signal::SIGCONT).unwrap();
    eventually(Duration::from_secs(5), "ready again", async || {
        http_get(&t.http_url("/readyz"))
            .await
            .is_some_and(|(s, _)| s == 200)
    })
    .await;
}

/// A healthy start is quiet: with Redis up, no warning (the first pings race the connection being
/// made, which used to warn "backend not reachable yet" on every start).
#[tokio::test]
async fn a_start_with_redis_up_warns_of_nothing() {
    let redis = RedisServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("stderr.log");
    let url = redis.url();
    let t = Sluicegate::start_logging(
        &[],
        &[("RUST_LOG", "warn"), ("REDIS_URL", url.as_str())],
        Some(&log),
    )
    .await;
    eventually(Duration::from_secs(10), "ready", async || {
        http_get(&t.http_url("/readyz"))
            .await
            .is_some_and(|(s, _)| s == 200)
    })
    .await;
    // A few ping periods more.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    drop(t);
    let stderr = std::fs::read_to_string(&log).unwrap();
    // (Without RULES, one warning says Envoy's requests have no limits: that one is meant.)
    let warnings: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("WARN") && !l.contains("no RULES"))
        .collect();
    assert!(warnings.is_empty(), "{stderr}");
}

/// A wrong password is reported as such, once, not as a timeout on every call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_cause_of_a_connection_failure_is_logged_once() {
    let redis = RedisServer::start_with(&["--requirepass", "right"]).await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("stderr.log");
    let url = format!("redis://:wrong@127.0.0.1:{}/0", redis.port);
    let t = Sluicegate::start_logging(
        &["--redis-timeout-ms", "100", "--debug-endpoints", "true"],
        &[("RUST_LOG", "warn"), ("REDIS_URL", url.as_str())],
        Some(&log),
    )
    .await;
    let mut c = t.client().await;
    for _ in 0..10 {
        let err = should_allow(&mut c, ask("k", 0.0, 0.0, 1))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unavailable);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    drop(t);
    let stderr = std::fs::read_to_string(&log).unwrap();
    let named: Vec<&str> = stderr
        .lines()
        .filter(|l| {
            l.contains("WRONGPASS")
                || l.contains("authentication failed")
                || l.contains("invalid username-password")
        })
        .collect();
    assert_eq!(named.len(), 1, "the cause, once:\n{stderr}");
    assert!(
        !stderr.contains("s3cret") && !stderr.contains(":wrong@"),
        "{stderr}"
    );
}

/// An open circuit closes as soon as the health pings get answers again, not only when a call
/// happens to probe: with no traffic at all after Redis comes back, the circuit is closed within
/// a couple of ping periods (without this it would stay open until the next call).
#[tokio::test]
async fn the_circuit_closes_when_pings_answer_again() {
    let mut redis = RedisServer::start().await;
    let t = Sluicegate::start(
        &[
            "--redis-timeout-ms",
            &TIMEOUT_MS.to_string(),
            "--failure-mode",
            "allow",
            "--debug-endpoints",
            "true",
        ],
        &[("REDIS_URL", &redis.url())],
    )
    .await;
    let mut c = t.client().await;
    assert!(
        !should_allow(&mut c, ask("k", 0.0, 0.0, 1))
            .await
            .unwrap()
            .degraded
    );
    let open = |metrics: &str| {
        crate::support::metric_value(metrics, "sluicegate_backend_circuit_open{").map(|v| v == 1.0)
    };

    redis.kill();
    for _ in 0..10 {
        let r = should_allow(&mut c, ask("k", 0.0, 0.0, 1)).await.unwrap();
        assert!(r.degraded);
    }
    let (_, metrics) = http_get(&t.http_url("/metrics")).await.unwrap();
    assert_eq!(open(&metrics), Some(true), "{metrics}");

    redis.restart().await;
    let up = Instant::now();
    eventually(Duration::from_secs(3), "the circuit to close", async || {
        let (_, metrics) = http_get(&t.http_url("/metrics")).await.unwrap();
        open(&metrics) == Some(false)
    })
    .await;
    let (_, status) = http_get(&t.http_url("/debug/status")).await.unwrap();
    assert!(status.contains("\"open\":false"), "{status}");
    assert!(up.elapsed() < Duration::from_secs(3));
    let r = should_allow(&mut c, ask("k3", 0.0, 0.0, 1)).await.unwrap();
    assert!(!r.degraded, "a real answer at once: {r:?}");
}

/// A blip is a blip: Redis paused for less than two timeouts under load, on a hot key at its
/// limit, with FAILURE_MODE=allow and no local deny cache. The calls in flight during the pause
/// fail (their callers get FAILURE_MODE's allow), and nobody else: the breaker judges Redis calls,
/// not the callers they carry, so one failed call of 64 callers does not open the circuit for the
/// next 250 ms (which admitted 5,000 to 10,000 requests here before).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blip_admits_at_most_the_calls_in_flight_during_it() {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    use std::sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
    };
    const CALLERS: u64 = 64;
    const BLIP_TIMEOUT_MS: u64 = 60;
    let redis = RedisServer::start().await;
    let t = Sluicegate::start(
        &[
            "--redis-timeout-ms",
            &BLIP_TIMEOUT_MS.to_string(),
            "--failure-mode",
            "allow",
            "--local-deny-cache",
            "false",
        ],
        &[("REDIS_URL", &redis.url())],
    )
    .await;
    let mut c = t.client().await;
    // 10 tokens, 1 a second: the key is drained within the first moment of the load.
    let hot = || ask("blip", 10.0, 1.0, 1);
    eventually(
        Duration::from_secs(5),
        "a real answer",
        async || matches!(should_allow(&mut c, ask("warm", 0.0, 0.0, 1)).await, Ok(r) if !r.degraded),
    )
    .await;
    let (allowed, degraded) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let stop = Arc::new(AtomicBool::new(false));
    let mut callers = Vec::new();
    for _ in 0..CALLERS {
        let (mut c, allowed, degraded, stop) =
            (c.clone(), allowed.clone(), degraded.clone(), stop.clone());
        callers.push(tokio::spawn(async move {
            while !stop.load(Relaxed) {
                if let Ok(r) = should_allow(&mut c, hot()).await {
                    allowed.fetch_add(u64::from(r.allowed), Relaxed);
                    degraded.fetch_add(u64::from(r.degraded), Relaxed);
                }
            }
        }));
    }
    let started = Instant::now();
    tokio::time::sleep(Duration::from_millis(700)).await;
    let pid = Pid::from_raw(redis.pid() as i32);
    kill(pid, Signal::SIGSTOP).unwrap();
    // Longer than one timeout (the calls in flight fail), shorter than two.
    std::thread::sleep(Duration::from_millis(BLIP_TIMEOUT_MS * 3 / 2));
    kill(pid, Signal::SIGCONT).unwrap();
    tokio::time::sleep(Duration::from_millis(1300)).await;
    stop.store(true, Relaxed);
    for caller in callers {
        caller.await.unwrap();
    }
    let elapsed = started.elapsed().as_secs_f64();
    let (allowed, degraded) = (allowed.load(Relaxed), degraded.load(Relaxed));
    // The bucket's own: 10 + 1 a second. On top: the callers of the calls that failed, one call
    // per connection (2) in flight when Redis stopped, and as many again as slack for a busy
    // machine's own slow calls.
    let bound = 10 + elapsed.ceil() as u64 + 4 * CALLERS;
    eprintln!("blip: {allowed} allowed ({degraded} by FAILURE_MODE) in {elapsed:.1} s");
    assert!(
        allowed <= bound,
        "{allowed} allowed ({degraded} by FAILURE_MODE) in {elapsed:.1} s, at most {bound}"
    );
}
