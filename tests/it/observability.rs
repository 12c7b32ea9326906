//! Metrics as Prometheus sees them: `promtool check metrics` finds nothing to report, and with a
//! real Prometheus scraping sluicegate (Redis backend, rules loaded) and the demo app every second
//! while sluicegate-load drives should-allow, envoy and http traffic (and a quota stream reports),
//! every panel query of the Grafana dashboard returns data.

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use crate::support::{
    Demo, RedisServer, Sluicegate, ask, eventually, free_port, http_get, should_allow,
};
use serde_json::Value;

const INSTALL_PROMETHEUS: &str = "prometheus/promtool not found: install them with `apt-get install -y prometheus` (scripts/test.sh does)";

fn promtool_check(text: &str) -> (bool, String) {
    use std::io::Write;
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{INSTALL_PROMETHEUS} ({e})"));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success() && report.trim().is_empty(), report)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promtool_finds_nothing_after_traffic() {
    let redis = RedisServer::start().await;
    let t = Sluicegate::start(
        &[
            "--rules",
            &crate::support::repo_path("deploy/rules"),
            "--redis-timeout-ms",
            "1000",
        ],
        &[("REDIS_URL", &redis.url())],
    )
    .await;
    let mut c = t.client().await;
    for i in 0..30 {
        let _ = should_allow(&mut c, ask(&format!("k{}", i % 3), 5.0, 1.0, 1)).await;
    }
    let mut envoy = crate::support::envoy::RateLimitServiceClient::connect(t.grpc_url())
        .await
        .unwrap();
    for _ in 0..20 {
        let req = crate::support::envoy::request(
            "edge",
            vec![
                crate::support::envoy::descriptor(&[("api_key", "x")]),
                crate::support::envoy::descriptor(&[("generic_key", "slow")]),
            ],
        );
        envoy.should_rate_limit(req).await.unwrap();
    }
    let (_, metrics) = http_get(&t.http_url("/metrics")).await.unwrap();
    assert!(
        metrics.contains("sluicegate_rule_decisions_total{"),
        "{metrics}"
    );
    let (clean, report) = promtool_check(&metrics);
    assert!(clean, "promtool check metrics on sluicegate:\n{report}");

    let demo = Demo::start(&t.grpc_url(), &[]).await;
    let _ = http_get(&demo.url("/api/items")).await;
    let (_, demo_metrics) = http_get(&demo.url("/metrics")).await.unwrap();
    let (clean, report) = promtool_check(&demo_metrics);
    assert!(clean, "promtool check metrics on the demo:\n{report}");
}

/// A Prometheus scraping `targets` (job, host:port) every second.
struct Prometheus {
    port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    async fn start(targets: &[(&str, String)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut config = String::from(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n",
        );
        for (job, target) in targets {
            config.push_str(&format!(
                "  - job_name: {job}\n    static_configs:\n      - targets: [\"{target}\"]\n"
            ));
        }
        let file = dir.path().join("prometheus.yml");
        std::fs::write(&file, config).unwrap();
        let port = free_port();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", file.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{INSTALL_PROMETHEUS} ({e})"));
        let p = Prometheus {
            port,
            child,
            _dir: dir,
        };
        let ready = format!("http://127.0.0.1:{port}/-/ready");
        eventually(Duration::from_secs(30), "prometheus /-/ready", async || {
            http_get(&ready).await.is_some_and(|(s, _)| s == 200)
        })
        .await;
        p
    }

    /// An instant query; the `result` array of a successful answer.
    async fn query(&self, expr: &str) -> Option<Vec<Value>> {
        let url = format!(
            "http://127.0.0.1:{}/api/v1/query?query={}",
            self.port,
            encode(expr)
        );
        let (status, body) = http_get(&url).await?;
        let j: Value = serde_json::from_str(body.trim()).ok()?;
        (status == 200 && j["status"] == "success")
            .then(|| j["data"]["result"].as_array().cloned().unwrap_or_default())
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// sluicegate-load, built beside this test by `cargo test --workspace`.
fn load_bin() -> PathBuf {
    crate::support::workspace_bin("sluicegate-load").into()
}

struct Load(Child);

impl Drop for Load {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn load(args: &[&str]) -> Load {
    Load(
        Command::new(load_bin())
            .args([
                "--duration",
                "40s",
                "--rps",
                "150",
                "--keys",
                "20",
                "--max-error-rate",
                "1",
            ])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn sluicegate-load"),
    )
}

/// A sample value that is a number (not NaN): data a panel can draw.
fn has_data(series: &[Value]) -> bool {
    series.iter().any(|s| {
        s["value"][1]
            .as_str()
            .and_then(|v| v.parse::<f64>().ok())
            .is_some_and(|v| v.is_finite())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_panel_has_data() {
    let redis = RedisServer::start().await;
    let t = Sluicegate::start(
        &[
            "--rules",
            &crate::support::repo_path("deploy/rules"),
            "--redis-timeout-ms",
            "1000",
        ],
        // Leases on: the leased-quota panels show real leases.
        &[("REDIS_URL", &redis.url()), ("QUOTA_LEASES", "true")],
    )
    .await;
    let demo = Demo::start(
        &t.grpc_url(),
        &["--identity", "api-key", "--sluicegate-timeout-ms", "500"],
    )
    .await;
    let prometheus = Prometheus::start(&[
        ("sluicegate", format!("127.0.0.1:{}", t.http_port)),
        ("demo", format!("127.0.0.1:{}", demo.port)),
    ])
    .await;

    let grpc = t.grpc_url();
    let grpc_for_quota = grpc.clone();
    let demo_url = demo.url("/api/items");
    let _loads = [
        load(&[
            "--api",
            "should-allow",
            "--target",
            &grpc,
            "--capacity",
            "10",
            "--rate",
            "5",
        ]),
        load(&[
            "--api",
            "envoy",
            "--target",
            &grpc,
            "--domain",
            "edge",
            "--descriptor",
            "api_key={key}",
            "--descriptor",
            "remote_address=10.0.0.1",
            "--descriptor",
            "generic_key=slow",
        ]),
        // Hot keys well within their limits: answered from leases (QUOTA_LEASES).
        load(&[
            "--api",
            "should-allow",
            "--target",
            &grpc,
            "--key-prefix",
            "hot",
            "--capacity",
            "100000",
            "--rate",
            "100000",
        ]),
        load(&[
            "--api",
            "http",
            "--url",
            &demo_url,
            "--header",
            "X-API-Key: {key}",
        ]),
        // In-flight limits: Envoy acquiring slots of deploy/rules/in_flight.yaml for one user (20
        // lease ids, never released: 5 held, the rest refused), and the Acquire API.
        load(&[
            "--api",
            "envoy",
            "--target",
            &grpc,
            "--domain",
            "in_flight",
            "--descriptor",
            "user=ann,acquire={key}",
        ]),
        load(&[
            "--api",
            "concurrency",
            "--target",
            &grpc,
            "--max-in-flight",
            "2",
        ]),
    ];

    // Envoy's quota protocol: a stream reporting the edge bucket of deploy/rules/rlqs.yaml every
    // second, as an Envoy with deploy/envoy/envoy-rlqs.yaml does every 5 s.
    let quota = tokio::spawn(async move {
        let mut stream = crate::rlqs_e2e::Stream::open_url(grpc_for_quota).await;
        loop {
            stream.report("edge", 40, 10).await;
            let _ = stream.next(Duration::from_millis(900)).await;
        }
    });

    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string("dashboards/grafana/sluicegate.json").unwrap(),
    )
    .unwrap();
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"]
                .as_str()
                .unwrap()
                .replace("$__rate_interval", "5s");
            queries.push((panel["title"].as_str().unwrap().to_string(), expr));
        }
    }
    assert!(queries.len() >= 16);
    for title in [
        "Near-limit decisions",
        "Local deny-cache answers",
        "Shed requests, connections torn down",
        "Circuit open, by Redis node",
        "In flight, by rule",
        "Acquisitions refused",
        "Leases expired without release",
        "RLQS requests reported, by rule",
        "RLQS streams and buckets",
        "RLQS assignments and demand exchanges",
        "Takes answered from leases, and all decisions",
        "Leases granted, tokens leased and returned unspent",
    ] {
        assert!(
            queries.iter().any(|(t, _)| t == title),
            "panel '{title}' missing"
        );
    }
    for (title, expr) in &queries {
        eventually(
            Duration::from_secs(30),
            &format!("data for panel '{title}': {expr}"),
            async || prometheus.query(expr).await.is_some_and(|r| has_data(&r)),
        )
        .await;
    }
    // The leased-quota panels show leases that happened, not only series at 0.
    eventually(
        Duration::from_secs(30),
        "takes answered from leases",
        async || {
            let r = prometheus
                .query("sum(sluicegate_lease_answers_total) > 0")
                .await;
            r.is_some_and(|r| has_data(&r))
        },
    )
    .await;
    quota.abort();
}
