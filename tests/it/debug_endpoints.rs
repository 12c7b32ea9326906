//! What an operator sees on the HTTP port (the README's "Operating it"): the status page and the JSON it reads, the
//! loaded rules, the effective configuration (redacted), the heaviest denied keys; all off with
//! DEBUG_ENDPOINTS=false. And the decision logs: a line per decision at debug, denials sampled at
//! info.

use std::time::Duration;

use crate::support::{RedisServer, Sluicegate, ask, eventually, http_get, http_request};
use serde_json::Value;

const RULES: &str = "domain: edge
descriptors:
  - key: api_key
    rate_limit: { unit: minute, requests_per_unit: 3, name: per_key }
  - key: tenant
    descriptors:
      - key: plan
        rate_limit: { unit: hour, requests_per_unit: 10, unit_multiplier: 2, burst: 4 }
";

async fn json(t: &Sluicegate, path: &str) -> Value {
    let (status, body) = http_get(&t.http_url(path)).await.expect("an answer");
    assert_eq!(status, 200, "{path}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"))
}

#[tokio::test]
async fn status_rules_config_and_top_keys() {
    let redis = RedisServer::start_with(&["--requirepass", "s3cret"]).await;
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules.yaml");
    std::fs::write(&rules, RULES).unwrap();
    let url = format!("redis://:s3cret@127.0.0.1:{}/0", redis.port);
    let t = Sluicegate::start(
        &[
            "--rules",
            rules.to_str().unwrap(),
            "--debug-endpoints",
            "true",
            "--debug-show-keys",
            "true",
        ],
        &[("REDIS_URL", url.as_str())],
    )
    .await;
    let mut c = t.client().await;

    // One key hammered far past its bucket, many others asked once.
    for i in 0..300 {
        c.should_allow(ask("hammer", 2.0, 0.01, 1)).await.unwrap();
        if i % 3 == 0 {
            c.should_allow(ask(&format!("quiet-{i}"), 2.0, 0.01, 1))
                .await
                .unwrap();
        }
    }
    // Near the limit (less than 20% left, NEAR_LIMIT_RATIO=0.8): "hammer"'s second call (0 of 2
    // left) and this one (1 of 10 left).
    c.should_allow(ask("near", 10.0, 0.01, 9)).await.unwrap();

    let top = json(&t, "/debug/top?n=3").await;
    assert_eq!(top["enabled"], true);
    let keys = top["keys"].as_array().unwrap();
    assert_eq!(keys[0]["key"], "hammer", "{top}");
    assert!(keys[0]["count"].as_f64().unwrap() > 250.0, "{top}");
    assert!(keys.len() <= 3);

    // The status JSON: completed seconds only, so wait until they hold every call the totals
    // count (the calls above can straddle two seconds), then the backend, the verdicts, the top
    // keys.
    let verdicts = |v: &Value| v["allowed"].as_u64().unwrap() + v["denied"].as_u64().unwrap();
    let mut status = Value::Null;
    eventually(
        Duration::from_secs(5),
        "every call's second completed",
        async || {
            status = json(&t, "/debug/status").await;
            let in_seconds: u64 = status["seconds"]
                .as_array()
                .unwrap()
                .iter()
                .map(verdicts)
                .sum();
            in_seconds == verdicts(&status["totals"]["should_allow"])
        },
    )
    .await;
    let seconds = status["seconds"].as_array().unwrap();
    assert!(
        seconds
            .iter()
            .any(|s| s["allowed"].as_u64().unwrap() > 0 && s["denied"].as_u64().unwrap() > 0),
        "{status}"
    );
    assert_eq!(status["backend"], "redis");
    assert_eq!(status["backend_up"], true);
    assert_eq!(status["ready"], true);
    assert_eq!(status["totals"]["should_allow"]["allowed"], 103, "{status}");
    assert_eq!(status["totals"]["should_allow"]["denied"], 298, "{status}");
    assert_eq!(status["top_denied"][0]["key"], "hammer");
    assert_eq!(status["rules_loaded"], 2);
    let circuits = status["circuits"].as_array().unwrap();
    assert_eq!(circuits.len(), 1, "{status}");
    assert_eq!(circuits[0]["open"], false);
    assert!(
        seconds
            .iter()
            .filter_map(|s| s["near_limit"].as_u64())
            .sum::<u64>()
            == 2,
        "{status}"
    );
    assert!(seconds.iter().any(|s| s["p99_ms"].as_f64().is_some()));

    // The rules with their bucket shapes.
    let r = json(&t, "/debug/rules").await;
    let rules = r["rules"].as_array().unwrap();
    assert_eq!(rules.len(), 2);
    assert_eq!(rules[1]["descriptor"], "tenant.plan");
    assert_eq!(rules[1]["limit"]["unit_multiplier"], 2);
    assert_eq!(rules[1]["bucket"]["capacity"], 4.0);
    let rate = rules[1]["bucket"]["rate_per_second"].as_f64().unwrap();
    assert!((rate - 10.0 / 7200.0).abs() < 1e-12, "{rate}");

    // The configuration, password redacted.
    let (_, body) = http_get(&t.http_url("/debug/config")).await.unwrap();
    assert!(!body.contains("s3cret"), "{body}");
    let config: Value = serde_json::from_str(&body).unwrap();
    assert!(config["REDIS_URL"].as_str().unwrap().contains("***"));
    assert_eq!(config["TOP_KEYS"], 100);
    assert_eq!(config["RULES"], rules_path_text(&r));

    // The near-limit counter in Prometheus.
    let (_, metrics) = http_get(&t.http_url("/metrics")).await.unwrap();
    assert!(
        metrics.contains("sluicegate_near_limit_total{api=\"should_allow\"} 2"),
        "{metrics}"
    );

    // The page itself, its script and style, with a policy that runs no script but its own.
    let page = http_request(&t.http_url("/"), &[]).await.unwrap();
    assert_eq!(page.status, 200);
    assert!(
        page.header("content-type")
            .unwrap()
            .starts_with("text/html")
    );
    let csp = page.header("content-security-policy").unwrap();
    assert!(
        csp.contains("script-src 'self'") && !csp.contains("unsafe"),
        "{csp}"
    );
    assert!(page.body.contains("<canvas id=\"chart\""));
    for asset in ["/status.js", "/status.css"] {
        assert_eq!(
            http_get(&t.http_url(asset)).await.unwrap().0,
            200,
            "{asset}"
        );
    }
}

fn rules_path_text(r: &Value) -> Value {
    r["path"].clone()
}

#[tokio::test]
async fn debug_endpoints_are_off_by_default() {
    let t = Sluicegate::start(&[], &[]).await;
    for path in [
        "/",
        "/status.js",
        "/debug/status",
        "/debug/config",
        "/debug/top",
    ] {
        let (status, _) = http_get(&t.http_url(path)).await.unwrap();
        assert_eq!(status, 404, "{path}");
    }
    assert_eq!(http_get(&t.http_url("/metrics")).await.unwrap().0, 200);
    assert_eq!(http_get(&t.http_url("/readyz")).await.unwrap().0, 200);
}

#[tokio::test]
async fn top_keys_can_be_turned_off() {
    let t = Sluicegate::start(&["--top-keys", "0", "--debug-endpoints", "true"], &[]).await;
    let mut c = t.client().await;
    for _ in 0..5 {
        c.should_allow(ask("k", 1.0, 0.01, 1)).await.unwrap();
    }
    let top = json(&t, "/debug/top").await;
    assert_eq!(top["enabled"], false);
    assert_eq!(top["keys"].as_array().unwrap().len(), 0);
}

#[tokio::test]
async fn decision_logs_one_line_per_decision_at_debug() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("stderr.log");
    let t = Sluicegate::start_logging(
        &[],
        &[("RUST_LOG", "warn,sluicegate::decision=debug")],
        Some(&log),
    )
    .await;
    let mut c = t.client().await;
    for i in 0..25 {
        c.should_allow(ask(&format!("user-{}", i % 5), 3.0, 0.01, 1))
            .await
            .unwrap();
    }
    drop(t);
    let text = std::fs::read_to_string(&log).unwrap();
    let decisions: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("sluicegate::decision") && l.contains("DEBUG"))
        .collect();
    assert_eq!(decisions.len(), 25, "{text}");
    assert!(decisions[0].contains("key=\"user-0\""), "{}", decisions[0]);
    assert!(decisions[0].contains("allowed=true"), "{}", decisions[0]);
    // 5 keys of 3 tokens: 10 denials, each logged at info too (well under the cap).
    let denials = text
        .lines()
        .filter(|l| l.contains("INFO") && l.contains("denied"))
        .count();
    assert_eq!(denials, 10, "{text}");
}

#[tokio::test]
async fn denial_logs_stay_under_the_cap_under_load() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("stderr.log");
    let t = Sluicegate::start_logging(&[], &[("RUST_LOG", "info")], Some(&log)).await;
    let started = std::time::Instant::now();
    // Many callers at once, nearly every call denied.
    let mut tasks = Vec::new();
    for w in 0..8 {
        let mut c = t.client().await;
        tasks.push(tokio::spawn(async move {
            let mut denied = 0u64;
            for _ in 0..400 {
                let r = c
                    .should_allow(ask(&format!("flood-{w}"), 1.0, 0.01, 1))
                    .await;
                denied += u64::from(!r.unwrap().into_inner().allowed);
            }
            denied
        }));
    }
    let mut denied = 0;
    for task in tasks {
        denied += task.await.unwrap();
    }
    let seconds = started.elapsed().as_secs() + 1;
    drop(t);
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("sluicegate::decision") && l.contains("denied"))
        .collect();
    // At most 10 a second (one more second for a boundary), and the rest counted in left_out.
    assert!(denied >= 3000, "{denied}");
    assert!(
        (lines.len() as u64) <= 10 * (seconds + 1),
        "{} lines in {seconds} s",
        lines.len()
    );
    let left_out: u64 = lines
        .iter()
        .filter_map(|l| l.split("left_out=").nth(1))
        .filter_map(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    assert!(
        left_out + lines.len() as u64 <= denied && left_out > 0,
        "{left_out} left out, {} lines, {denied} denials",
        lines.len()
    );
}

/// Keys are often secrets: without DEBUG_SHOW_KEYS the pages show a key's first characters and a
/// digest, never the whole key.
#[tokio::test]
async fn keys_are_hidden_unless_asked_for() {
    let t = Sluicegate::start(&["--debug-endpoints", "true"], &[]).await;
    let mut c = t.client().await;
    let secret = "sk-live-0123456789abcdef";
    for _ in 0..5 {
        c.should_allow(ask(secret, 1.0, 0.01, 1)).await.unwrap();
    }
    for path in ["/debug/top", "/debug/status"] {
        let (status, body) = http_get(&t.http_url(path)).await.unwrap();
        assert_eq!(status, 200, "{path}");
        assert!(!body.contains(secret), "{path}: {body}");
        assert!(body.contains("sk-liv…#"), "{path}: {body}");
    }
}

/// DNS rebinding: a page on another site whose name now resolves here sends its own Host. The
/// status page and /debug/* answer only HTTP_ALLOWED_HOSTS; /metrics and the probes answer any.
#[tokio::test]
async fn only_allowed_hosts_see_the_pages() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let t = Sluicegate::start(&["--debug-endpoints", "true"], &[]).await;
    let addr = t
        .http_url("")
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string();
    let get = |path: &'static str, host: &'static str| {
        let addr = addr.clone();
        async move {
            let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
            let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
            s.write_all(req.as_bytes()).await.unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out.split_whitespace()
                .nth(1)
                .unwrap()
                .parse::<u16>()
                .unwrap()
        }
    };
    for path in ["/", "/debug/config", "/debug/top"] {
        assert_eq!(get(path, "evil.example:8080").await, 403, "{path}");
        assert_eq!(get(path, "localhost:8080").await, 200, "{path}");
        assert_eq!(get(path, "127.0.0.1").await, 200, "{path}");
    }
    assert_eq!(get("/metrics", "evil.example").await, 200);
    assert_eq!(get("/readyz", "evil.example").await, 200);

    let named = Sluicegate::start(
        &[
            "--debug-endpoints",
            "true",
            "--http-allowed-hosts",
            "status.internal",
        ],
        &[],
    )
    .await;
    let addr = named
        .http_url("")
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string();
    let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: Status.Internal:80\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
}
