//! ShouldAllow through a real sluicegate process (memory backend): answers, defaults, input checks,
//! shadow mode, health, probes, and configuration errors.

use crate::support::{SERVING, Sluicegate, ask, health, http_get, metric_value, should_allow};
use tonic::Code;

#[tokio::test]
async fn allows_then_denies_with_figures() {
    let t = Sluicegate::start(&["--capacity", "3", "--rate", "0.001"], &[]).await;
    let mut c = t.client().await;
    for left in [2.0, 1.0, 0.0] {
        let r = should_allow(&mut c, ask("user:1", 0.0, 0.0, 0))
            .await
            .unwrap();
        assert!(r.allowed);
        assert!((r.tokens_remaining - left).abs() < 1e-3, "{r:?}");
        assert_eq!(
            (r.capacity, r.rate),
            (3.0, 0.001),
            "the default shape is reported"
        );
        assert!(!r.degraded);
    }
    let r = should_allow(&mut c, ask("user:1", 0.0, 0.0, 0))
        .await
        .unwrap();
    assert!(!r.allowed);
    assert!(
        r.retry_after_ms > 999_000,
        "one token at 0.001/s takes ~1000 s: {r:?}"
    );
    // Another key has its own bucket; a request's own shape wins over the default.
    let r = should_allow(&mut c, ask("user:2", 100.0, 50.0, 60))
        .await
        .unwrap();
    assert!(r.allowed);
    assert_eq!((r.capacity, r.rate), (100.0, 50.0));
    assert!((r.tokens_remaining - 40.0).abs() < 1.0, "{r:?}");
}

#[tokio::test]
async fn dry_run_takes_nothing() {
    let t = Sluicegate::start(&["--capacity", "2", "--rate", "0.001"], &[]).await;
    let mut c = t.client().await;
    let mut req = ask("dry", 0.0, 0.0, 2);
    req.dry_run = true;
    for _ in 0..3 {
        let r = should_allow(&mut c, req.clone()).await.unwrap();
        assert!(r.allowed);
        assert_eq!(r.tokens_remaining, 2.0);
    }
    assert!(
        should_allow(&mut c, ask("dry", 0.0, 0.0, 2))
            .await
            .unwrap()
            .allowed
    );
    let r = should_allow(&mut c, req).await.unwrap();
    assert!(!r.allowed);
}

#[tokio::test]
async fn bad_input_is_invalid_argument_naming_the_field() {
    let t = Sluicegate::start(&["--max-capacity", "1000", "--max-rate", "100"], &[]).await;
    let mut c = t.client().await;
    let long = "k".repeat(513);
    let cases = [
        (ask("", 0.0, 0.0, 1), "key"),
        (ask(&long, 0.0, 0.0, 1), "key"),
        (ask("k", -1.0, 0.0, 1), "capacity"),
        (ask("k", f64::NAN, 0.0, 1), "capacity"),
        (ask("k", f64::INFINITY, 0.0, 1), "capacity"),
        (ask("k", 1001.0, 0.0, 1), "capacity"),
        (ask("k", 0.0, -5.0, 1), "rate"),
        (ask("k", 0.0, f64::NAN, 1), "rate"),
        (ask("k", 0.0, f64::NEG_INFINITY, 1), "rate"),
        (ask("k", 0.0, 101.0, 1), "rate"),
        (ask("k", 5.0, 1.0, 6), "cost"),
    ];
    for (req, field) in cases {
        let err = should_allow(&mut c, req.clone()).await.expect_err(field);
        assert_eq!(err.code(), Code::InvalidArgument, "{field}: {err:?}");
        assert!(
            err.message().starts_with(field),
            "{field}: {}",
            err.message()
        );
    }
    // A capacity below 0 is refused; the message does not hide that 0 is fine (the default).
    let err = should_allow(&mut c, ask("k", -1.0, 0.0, 1))
        .await
        .unwrap_err();
    assert!(
        err.message().contains("or 0 for the server's default"),
        "{}",
        err.message()
    );
    // The longest allowed key works.
    assert!(
        should_allow(&mut c, ask(&"k".repeat(512), 0.0, 0.0, 1))
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn shadow_mode_counts_but_always_allows() {
    let t = Sluicegate::start(
        &["--capacity", "1", "--rate", "0.001", "--shadow-mode"],
        &[],
    )
    .await;
    let mut c = t.client().await;
    for _ in 0..3 {
        assert!(
            should_allow(&mut c, ask("s", 0.0, 0.0, 1))
                .await
                .unwrap()
                .allowed
        );
    }
    let (_, metrics) = http_get(&t.http_url("/metrics")).await.unwrap();
    let denied = metric_value(
        &metrics,
        "sluicegate_decisions_total{api=\"should_allow\",result=\"denied\"}",
    );
    assert_eq!(
        denied,
        Some(2.0),
        "shadow mode still counts denials:\n{metrics}"
    );
}

#[tokio::test]
async fn health_probes_and_metrics() {
    let t = Sluicegate::start(&[], &[]).await;
    crate::support::eventually(std::time::Duration::from_secs(5), "SERVING", async || {
        health(&t.grpc_url(), "").await == Some(SERVING)
    })
    .await;
    assert_eq!(
        health(&t.grpc_url(), "sluicegate.v1.RateLimitService").await,
        Some(SERVING)
    );
    for path in ["/healthz", "/readyz", "/healthcheck"] {
        let (status, _) = http_get(&t.http_url(path)).await.unwrap();
        assert_eq!(status, 200, "{path}");
    }
    // Before any decision: counters a dashboard alerts on exist at 0, not absent.
    let (_, metrics) = http_get(&t.http_url("/metrics")).await.unwrap();
    for bucket in ["full", "partial"] {
        let series = format!("sluicegate_memory_evictions_total{{bucket=\"{bucket}\"}}");
        assert_eq!(metric_value(&metrics, &series), Some(0.0), "{series}");
    }
    let mut c = t.client().await;
    should_allow(&mut c, ask("m", 0.0, 0.0, 1)).await.unwrap();
    let (_, metrics) = http_get(&t.http_url("/metrics")).await.unwrap();
    assert_eq!(
        metric_value(
            &metrics,
            "sluicegate_decisions_total{api=\"should_allow\",result=\"allowed\"}"
        ),
        Some(1.0)
    );
    for name in [
        "# TYPE sluicegate_decision_duration_seconds histogram",
        "sluicegate_decision_duration_seconds_bucket{api=\"should_allow\",le=\"0.001\"}",
        "sluicegate_build_info{version=",
        "process_resident_memory_bytes",
    ] {
        assert!(metrics.contains(name), "missing {name}:\n{metrics}");
    }
}

#[tokio::test]
async fn bad_configuration_fails_with_one_line_naming_the_variable() {
    for (var, value) in [
        ("TB_CAPACITY", "abc"),
        ("TB_RATE", "-2"),
        ("REDIS_TIMEOUT_MS", "0"),
        ("FAILURE_MODE", "maybe"),
        ("REDIS_URL", "localhost:6379"),
        ("GRPC_ADDR", "nowhere"),
        ("MAX_CAPACITY", "2e15"),
        ("MAX_RATE", "1e16"),
        ("BUCKET_PREFIX", ""),
        ("RLS_KEY_PREFIX", "tb:user:envoy:"),
        ("TB_CAPACITY", "2e9"),
    ] {
        let out = crate::support::our_binary(env!("CARGO_BIN_EXE_sluicegate"))
            .env(var, value)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{var}={value}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.trim().lines().count(), 1, "{var}: {stderr}");
        assert!(stderr.contains(var), "{var}: {stderr}");
    }
}

/// What a newcomer types wrong gets a line that says what is expected.
#[test]
fn newcomer_mistakes_are_answered_with_what_is_expected() {
    let run = |args: &[&str], env: &[(&str, &str)]| {
        let out = crate::support::our_binary(env!("CARGO_BIN_EXE_sluicegate"))
            .args(args)
            .envs(env.iter().copied())
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    for (args, env, want) in [
        (
            &[][..],
            &[("REDIS_TYPE", "bogus")][..],
            "expected one of: single, cluster, sentinel",
        ),
        (
            &[],
            &[("LOG_FORMAT", "yaml")],
            "expected one of: text, json",
        ),
        (
            &[],
            &[("REDIS_TYPE", "clster")],
            "a similar value exists: 'cluster'",
        ),
        (
            &["--redis-tpye", "single"],
            &[],
            "a similar argument exists: '--redis-type'",
        ),
        (
            &["--capacity", "-1"],
            &[],
            "expected a finite number greater than 0, got '-1'",
        ),
        (
            &[],
            &[("GRPC_ADDR", "somehost:8081")],
            "expected IP:PORT, e.g. 0.0.0.0:8081",
        ),
        (&[], &[("NEAR_LIMIT_RATIO", "1.5")], "between 0 and 1"),
        (
            &[],
            &[("LIMIT_LIMIT_HEADER", "Bad Header")],
            "HTTP header name",
        ),
    ] {
        let (code, stderr) = run(args, env);
        assert_eq!(code, Some(2), "{args:?} {env:?}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
        assert!(stderr.contains(want), "{args:?} {env:?}: {stderr}");
    }

    // `localhost:PORT` is understood, from the environment as from flags (`:PORT`, every
    // interface, is checked in src/config's unit tests: a test listens on loopback only).
    let mut t = std::process::Command::new(env!("CARGO_BIN_EXE_sluicegate"));
    // A directory of its own: a .env is written there below.
    let dir = tempfile::tempdir().unwrap();
    let mut child = t
        .current_dir(dir.path())
        .env_clear()
        .env("GRPC_ADDR", "localhost:0")
        .env("HTTP_ADDR", "localhost:0")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let alive = child.try_wait().unwrap().is_none();
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(alive, "{log}");
    assert!(
        log.contains("grpc_addr=127.0.0.1:") && log.contains("http_addr=127.0.0.1:"),
        "{log}"
    );
    assert!(
        !log.contains('\u{1b}'),
        "no colour codes when not a terminal: {log}"
    );

    // A .env line that does not parse stops the start, without showing the line.
    std::fs::write(
        dir.path().join(".env"),
        "TB_RATE=3\nREDIS_URL redis://:s3cret@x\n",
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sluicegate"))
        .current_dir(dir.path())
        .env_clear()
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains(".env line 2"), "{stderr}");
    assert!(!stderr.contains("s3cret"), "{stderr}");
}

#[tokio::test]
async fn an_unparsable_redis_url_never_shows_its_password() {
    for url in [
        "redis://user:s3cret@host:port/0",
        "redis://:s3cret@[::1",
        "rediss://u:s3cret@h:99999",
    ] {
        let out = crate::support::our_binary(env!("CARGO_BIN_EXE_sluicegate"))
            .env("REDIS_URL", url)
            .env("RUST_LOG", "debug")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{url}");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(text.contains("REDIS_URL"), "{text}");
        assert!(!text.contains("s3cret"), "the password leaked: {text}");
    }
}

/// Figures at the edges: a tiny rate gives capped times, never an overflow; SHADOW_MODE holds
/// for a FAILURE_MODE=deny answer.
#[tokio::test]
async fn tiny_rates_cap_the_figures() {
    let t = Sluicegate::start(&[], &[]).await;
    let mut c = t.client().await;
    let r = should_allow(&mut c, ask("tiny", 10.0, 1e-17, 10))
        .await
        .unwrap();
    assert!(r.allowed);
    assert_eq!(r.reset_after_ms, (1 << 53) - 1);
    let r = should_allow(&mut c, ask("tiny", 10.0, 1e-17, 1))
        .await
        .unwrap();
    assert!(!r.allowed);
    assert_eq!(r.retry_after_ms, (1 << 53) - 1, "{r:?}");
}

#[tokio::test]
async fn shadow_mode_holds_for_the_failure_mode_deny_answer() {
    let closed = format!("redis://127.0.0.1:{}/0", crate::support::free_port());
    let t = Sluicegate::start(
        &[
            "--failure-mode",
            "deny",
            "--shadow-mode",
            "--redis-timeout-ms",
            "50",
        ],
        &[("REDIS_URL", &closed)],
    )
    .await;
    let mut c = t.client().await;
    let r = should_allow(&mut c, ask("k", 0.0, 0.0, 1)).await.unwrap();
    assert!(r.degraded);
    assert!(r.allowed, "SHADOW_MODE answers allowed: {r:?}");
}

#[test]
fn bad_rules_fail_the_start_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, "domain: edge\ndescriptors:\n  - key: a\n    rate_limit: { unit: fortnight, requests_per_unit: 1 }\n").unwrap();
    for path in [bad.to_str().unwrap(), "/nonexistent/rules"] {
        let out = crate::support::our_binary(env!("CARGO_BIN_EXE_sluicegate"))
            .args(["--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"])
            .env("RULES", path)
            .env("RUST_LOG", "error")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{path}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
        assert!(
            stderr.contains("RULES") && stderr.contains(path),
            "{stderr}"
        );
    }
}

#[test]
fn secrets_never_appear_in_help() {
    let out = crate::support::our_binary(env!("CARGO_BIN_EXE_sluicegate"))
        .arg("--help")
        .env("REDIS_URL", "redis://:hunter2@10.0.0.1:6379")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(
        help.contains("REDIS_URL") && help.contains("TB_CAPACITY"),
        "{help}"
    );
    assert!(!help.contains("hunter2"), "{help}");
}
