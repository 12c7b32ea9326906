//! sluicegate-load against real servers: sluicegate (run in this process on loopback), the demo app,
//! and a broken limiter that allows everything, which the bound check must catch.

use crate::support::sluicegate;
use std::process::Command;

use sluicegate_client::proto::sluicegate::v1::{
    AcquireRequest, AcquireResponse, ReleaseRequest, ReleaseResponse, RenewRequest, SettleRequest,
    SettleResponse, ShouldAllowBatchRequest, ShouldAllowBatchResponse, ShouldAllowRequest,
    ShouldAllowResponse,
    rate_limit_service_server::{RateLimitService, RateLimitServiceServer},
};
use tokio::net::TcpListener;

struct Run {
    code: Option<i32>,
    stdout: String,
    json: serde_json::Value,
}

/// Runs sluicegate-load with `args` (plus --json) and reads what it wrote.
async fn load(args: &[&str]) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("run.json");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sluicegate-load"));
    cmd.args(args).arg("--json").arg(&json);
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let json = std::fs::read(&json)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(serde_json::Value::Null);
    eprintln!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    Run {
        code: out.status.code(),
        stdout,
        json,
    }
}

fn n(v: &serde_json::Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a count: {v}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_loop_counts_add_up_and_bound_holds() {
    let t = sluicegate(&[]).await;
    let dir = tempfile::tempdir().unwrap();
    let plot = dir.path().join("plot.svg");
    let unix_now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64()
    };
    let before = unix_now();
    let run = load(&[
        "--target",
        &t.url,
        "--duration",
        "2s",
        "--concurrency",
        "8",
        "--keys",
        "10",
        "--capacity",
        "20",
        "--rate",
        "10",
        "--check-bound",
        "--plot",
        plot.to_str().unwrap(),
    ])
    .await;
    let after = unix_now();
    assert_eq!(run.code, Some(0), "{}", run.stdout);
    let j = &run.json;
    for field in [
        "api",
        "started_unix_s",
        "duration_s",
        "requests",
        "allowed",
        "denied",
        "errors",
        "rate",
        "latency_ms",
        "bound",
        "timeline",
    ] {
        assert!(j.get(field).is_some(), "missing {field}: {j}");
    }
    for q in ["p50", "p90", "p99", "p999", "max"] {
        assert!(
            j["latency_ms"][q].as_f64().is_some(),
            "missing latency_ms.{q}"
        );
    }
    assert_eq!(j["api"], "should-allow");
    // The timeline's second 0 by the wall clock: after the process started, two seconds before
    // it ended at the latest.
    let started = j["started_unix_s"].as_f64().unwrap();
    assert!(
        before < started && started <= after - 2.0,
        "{before} {started} {after}"
    );
    let (requests, allowed, denied, errors) = (
        n(&j["requests"]),
        n(&j["allowed"]),
        n(&j["denied"]),
        n(&j["errors"]),
    );
    assert_eq!(requests, allowed + denied + errors);
    assert_eq!(errors, 0);
    assert!(denied > 0, "the buckets must have run dry");
    // 10 keys, each at most 20 + 10/s * ~2 s.
    assert!(allowed <= 10 * (20 + 10 * 3), "{allowed}");
    assert!(allowed >= 10 * 20, "{allowed}");
    assert_eq!(j["bound"]["checked"], true);
    assert_eq!(n(&j["bound"]["violations"]), 0);
    let timeline = j["timeline"].as_array().unwrap();
    let sum = |f: &str| timeline.iter().map(|s| n(&s[f])).sum::<u64>();
    assert_eq!(
        (sum("allowed"), sum("denied"), sum("errors")),
        (allowed, denied, errors)
    );
    assert!(timeline[0].get("p99_ms").is_some() && timeline[0].get("second").is_some());
    assert!(run.stdout.contains("p99.9"), "{}", run.stdout);
    let svg = std::fs::read_to_string(&plot).unwrap();
    assert!(
        svg.starts_with("<svg") && svg.contains("allowed") && svg.contains("p99"),
        "plot"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_loop_keeps_its_rate() {
    let t = sluicegate(&[]).await;
    let run = load(&[
        "--target",
        &t.url,
        "--rps",
        "200",
        "--duration",
        "3s",
        "--keys",
        "50",
    ])
    .await;
    assert_eq!(run.code, Some(0));
    // The schedule decides the count, whatever the machine's speed: 200/s for 3 s.
    assert_eq!(n(&run.json["requests"]), 600);
    // The achieved rate can only fall short of the schedule (a stalled machine), never pass it.
    let rate = run.json["rate"].as_f64().unwrap();
    assert!(rate > 0.0 && rate <= 200.0 * 1.02, "achieved {rate}/s");
}

/// A limiter that allows everything while claiming a bucket of 5 tokens at 1 per second.
struct Broken;

#[tonic::async_trait]
impl RateLimitService for Broken {
    async fn should_allow(
        &self,
        _: tonic::Request<ShouldAllowRequest>,
    ) -> Result<tonic::Response<ShouldAllowResponse>, tonic::Status> {
        Ok(tonic::Response::new(ShouldAllowResponse {
            allowed: true,
            tokens_remaining: 4.0,
            capacity: 5.0,
            rate: 1.0,
            ..Default::default()
        }))
    }

    async fn should_allow_batch(
        &self,
        _: tonic::Request<ShouldAllowBatchRequest>,
    ) -> Result<tonic::Response<ShouldAllowBatchResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("broken"))
    }

    async fn settle(
        &self,
        _: tonic::Request<SettleRequest>,
    ) -> Result<tonic::Response<SettleResponse>, tonic::Status> {
        Ok(tonic::Response::new(SettleResponse::default()))
    }

    /// Grants every lease: no in-flight limit at all.
    async fn acquire(
        &self,
        _: tonic::Request<AcquireRequest>,
    ) -> Result<tonic::Response<AcquireResponse>, tonic::Status> {
        Ok(tonic::Response::new(AcquireResponse {
            granted: true,
            lease_id: "same".into(),
            in_flight: 1,
            ..Default::default()
        }))
    }

    async fn release(
        &self,
        _: tonic::Request<ReleaseRequest>,
    ) -> Result<tonic::Response<ReleaseResponse>, tonic::Status> {
        Ok(tonic::Response::new(ReleaseResponse {
            released: true,
            in_flight: 0,
        }))
    }

    async fn renew(
        &self,
        _: tonic::Request<RenewRequest>,
    ) -> Result<tonic::Response<AcquireResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("broken"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bound_check_catches_a_broken_limiter() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(RateLimitServiceServer::new(Broken))
            .serve_with_incoming(tokio_stream_from(listener)),
    );
    let run = load(&[
        "--target",
        &url,
        "--duration",
        "1s",
        "--keys",
        "3",
        "--check-bound",
    ])
    .await;
    server.abort();
    assert_eq!(run.code, Some(2), "{}", run.stdout);
    assert!(n(&run.json["bound"]["violations"]) >= 1);

    // The same limiter grants every slot: more than 2 held at once is caught.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(RateLimitServiceServer::new(Broken))
            .serve_with_incoming(tokio_stream_from(listener)),
    );
    let run = load(&[
        "--target",
        &url,
        "--api",
        "concurrency",
        "--max-in-flight",
        "2",
        "--duration",
        "1s",
        "--keys",
        "2",
        "--concurrency",
        "16",
        "--check-bound",
    ])
    .await;
    server.abort();
    assert_eq!(run.code, Some(2), "{}", run.stdout);
    assert!(n(&run.json["bound"]["violations"]) >= 1);
}

/// A server that fails every call, one kind of failure in turn.
#[derive(Default)]
struct Failing(std::sync::atomic::AtomicU64);

#[tonic::async_trait]
impl RateLimitService for Failing {
    async fn should_allow(
        &self,
        _: tonic::Request<ShouldAllowRequest>,
    ) -> Result<tonic::Response<ShouldAllowResponse>, tonic::Status> {
        use tonic::Status;
        match self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 5 {
            0 => Err(Status::resource_exhausted("shed")),
            1 => Err(Status::deadline_exceeded("late")),
            2 => {
                // Past the client's own timeout: it gives up first.
                tokio::time::sleep(std::time::Duration::from_secs(2)).await;
                Err(Status::internal("too late to matter"))
            }
            3 => Err(Status::unavailable("going away")),
            _ => Err(Status::invalid_argument("nonsense")),
        }
    }

    async fn should_allow_batch(
        &self,
        _: tonic::Request<ShouldAllowBatchRequest>,
    ) -> Result<tonic::Response<ShouldAllowBatchResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("failing"))
    }

    async fn settle(
        &self,
        _: tonic::Request<SettleRequest>,
    ) -> Result<tonic::Response<SettleResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("failing"))
    }

    async fn acquire(
        &self,
        _: tonic::Request<AcquireRequest>,
    ) -> Result<tonic::Response<AcquireResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("failing"))
    }

    async fn release(
        &self,
        _: tonic::Request<ReleaseRequest>,
    ) -> Result<tonic::Response<ReleaseResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("failing"))
    }

    async fn renew(
        &self,
        _: tonic::Request<RenewRequest>,
    ) -> Result<tonic::Response<AcquireResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("failing"))
    }
}

/// Errors are told apart by kind (the overload benchmark's columns): the server's deadline and
/// the client's own timeout are `deadline`, RESOURCE_EXHAUSTED is `shed`, UNAVAILABLE is
/// `unavailable`, the rest `other`; the kinds add up to the errors, and exceeding the error
/// budget is exit 3.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_counted_by_kind() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(RateLimitServiceServer::new(Failing::default()))
            .serve_with_incoming(tokio_stream_from(listener)),
    );
    let run = load(&[
        "--target",
        &url,
        "--rps",
        "100",
        "--duration",
        "1s",
        "--timeout",
        "200ms",
    ])
    .await;
    server.abort();
    assert_eq!(run.code, Some(3), "{}", run.stdout);
    let j = &run.json;
    assert_eq!((n(&j["requests"]), n(&j["errors"])), (100, 100));
    let kinds = &j["errors_by_kind"];
    assert_eq!(
        [
            n(&kinds["shed"]),
            n(&kinds["deadline"]),
            n(&kinds["unavailable"]),
            n(&kinds["other"])
        ],
        [20, 40, 20, 20],
        "{kinds}"
    );
    assert!(
        run.stdout
            .contains("deadline 40, other 20, shed 20, unavailable 20"),
        "{}",
        run.stdout
    );
}

/// `--api concurrency` against two replicas' worth of connections to one sluicegate: slots held at
/// random lengths, never more than --max-in-flight per key at once, and refusals when all are taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_mode_holds_the_in_flight_bound() {
    let t = sluicegate(&[]).await;
    let run = load(&[
        "--target",
        &format!("{},{}", t.url, t.url),
        "--api",
        "concurrency",
        "--max-in-flight",
        "3",
        "--hold",
        "20ms",
        "--duration",
        "2s",
        "--keys",
        "4",
        "--concurrency",
        "32",
        "--check-bound",
    ])
    .await;
    assert_eq!(run.code, Some(0), "{}", run.stdout);
    let j = &run.json;
    assert_eq!(j["bound"]["checked"], true);
    assert_eq!(n(&j["bound"]["violations"]), 0);
    assert!(n(&j["allowed"]) > 0 && n(&j["denied"]) > 0, "{j}");
    assert_eq!(n(&j["errors"]), 0);
}

/// An Envoy RLS that answers OK to everything, claiming 60 per minute.
struct BrokenEnvoy;

#[tonic::async_trait]
impl sluicegate_client::proto::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitService
    for BrokenEnvoy
{
    async fn should_rate_limit(
        &self,
        req: tonic::Request<sluicegate_client::proto::envoy::service::ratelimit::v3::RateLimitRequest>,
    ) -> Result<
        tonic::Response<sluicegate_client::proto::envoy::service::ratelimit::v3::RateLimitResponse>,
        tonic::Status,
    > {
        use sluicegate_client::proto::envoy::service::ratelimit::v3::rate_limit_response::{
            DescriptorStatus, RateLimit,
        };
        let statuses = req
            .get_ref()
            .descriptors
            .iter()
            .map(|_| DescriptorStatus {
                code: 1,
                current_limit: Some(RateLimit {
                    name: String::new(),
                    requests_per_unit: 60,
                    unit: 2,
                }),
                ..Default::default()
            })
            .collect();
        Ok(tonic::Response::new(
            sluicegate_client::proto::envoy::service::ratelimit::v3::RateLimitResponse {
                overall_code: 1,
                statuses,
                ..Default::default()
            },
        ))
    }
}

/// With --rules the check knows the rule's burst of 2: 60 per minute from current_limit alone
/// would let a second's worth of excess pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_bound_check_takes_burst_from_the_rules() {
    use sluicegate_client::proto::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitServiceServer as EnvoyServer;
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules.yaml");
    std::fs::write(
        &rules,
        "domain: edge\ndescriptors:\n  - key: api_key\n    rate_limit: { unit: minute, requests_per_unit: 60, burst: 2 }\n",
    )
    .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(EnvoyServer::new(BrokenEnvoy))
            .serve_with_incoming(tokio_stream_from(listener)),
    );
    let args = |with_rules: bool| {
        let mut a = vec![
            "--api".to_string(),
            "envoy".into(),
            "--target".into(),
            url.clone(),
            "--descriptor".into(),
            "api_key={key}".into(),
            "--keys".into(),
            "2".into(),
            "--rps".into(),
            "20".into(),
            "--duration".into(),
            "1s".into(),
            "--check-bound".into(),
        ];
        if with_rules {
            a.extend(["--rules".into(), rules.display().to_string()]);
        }
        a
    };
    let run = |a: Vec<String>| async move {
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        load(&a).await
    };
    // 10 per key in a second: within 60 + 1/s, beyond 2 + 1/s.
    let without = run(args(false)).await;
    assert_eq!(without.code, Some(0), "{}", without.stdout);
    let with = run(args(true)).await;
    server.abort();
    assert_eq!(with.code, Some(2), "{}", with.stdout);
}

fn tokio_stream_from(listener: TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_mode_against_the_demo_counts_429_as_denied() {
    let t = sluicegate(&["--capacity", "5", "--rate", "1"]).await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let demo_url = format!("http://127.0.0.1:{port}/api/items");
    let mut demo = Command::new(env!("CARGO_BIN_EXE_sluicegate-demo"))
        .env_clear()
        .env("RUST_LOG", "error")
        .args([
            "--addr",
            &format!("127.0.0.1:{port}"),
            "--sluicegate-url",
            &t.url,
        ])
        .args(["--identity", "api-key", "--sluicegate-timeout-ms", "1000"])
        .spawn()
        .unwrap();
    for _ in 0..200 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    let run = load(&[
        "--api",
        "http",
        "--url",
        &demo_url,
        "--header",
        "X-API-Key: {key}",
        "--keys",
        "4",
        "--duration",
        "2s",
        "--concurrency",
        "4",
        "--rate",
        "1",
        "--check-bound",
    ])
    .await;
    let _ = demo.kill();
    let _ = demo.wait();
    assert_eq!(run.code, Some(0), "{}", run.stdout);
    let (allowed, denied) = (n(&run.json["allowed"]), n(&run.json["denied"]));
    assert!(denied > 0, "429s count as denied");
    assert!((4 * 5..=4 * (5 + 3)).contains(&allowed), "{allowed}");
    assert_eq!(n(&run.json["errors"]), 0);
    assert_eq!(n(&run.json["bound"]["violations"]), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_mode_reports_each_descriptor() {
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules.yaml");
    std::fs::write(
        &rules,
        "domain: edge
descriptors:
  - key: api_key
    rate_limit: { unit: second, requests_per_unit: 5 }
  - key: generic_key
    value: free
    rate_limit: { unlimited: true }
",
    )
    .unwrap();
    let t = sluicegate(&["--rules", rules.to_str().unwrap()]).await;
    let run = load(&[
        "--api",
        "envoy",
        "--target",
        &t.url,
        "--domain",
        "edge",
        "--descriptor",
        "api_key={key}",
        "--descriptor",
        "generic_key=free",
        "--keys",
        "3",
        "--duration",
        "2s",
        "--concurrency",
        "4",
        "--check-bound",
    ])
    .await;
    assert_eq!(run.code, Some(0), "{}", run.stdout);
    let d = run.json["descriptors"]
        .as_array()
        .expect("per-descriptor outcomes");
    assert_eq!(d.len(), 2);
    assert_eq!(d[0]["descriptor"], "api_key={key}");
    assert!(n(&d[0]["allowed"]) > 0 && n(&d[0]["denied"]) > 0, "{d:?}");
    assert_eq!(n(&d[1]["denied"]), 0);
    assert_eq!(n(&d[1]["unlimited"]), n(&run.json["requests"]));
    assert!(
        run.stdout.contains("descriptor 0 [api_key={key}]"),
        "{}",
        run.stdout
    );
    assert_eq!(n(&run.json["bound"]["violations"]), 0);
}

/// Reserve then settle a random real cost (0 to twice the reservation): per key, what was settled
/// stays within capacity + refill + one capacity of debt, and refunds and debts both happen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settle_mode_holds_the_debt_bound() {
    let t = sluicegate(&[]).await;
    let run = load(&[
        "--api",
        "settle",
        "--target",
        &t.url,
        "--cost",
        "5",
        "--capacity",
        "50",
        "--rate",
        "20",
        "--keys",
        "5",
        "--duration",
        "2s",
        "--concurrency",
        "8",
        "--check-bound",
    ])
    .await;
    assert_eq!(run.code, Some(0), "{}", run.stdout);
    assert!(
        n(&run.json["allowed"]) > 0 && n(&run.json["denied"]) > 0,
        "{}",
        run.stdout
    );
    assert_eq!(n(&run.json["bound"]["violations"]), 0);
    assert_eq!(run.json["api"], "settle");
}

#[test]
fn bad_usage_and_unreachable_target_exit_1() {
    let bin = env!("CARGO_BIN_EXE_sluicegate-load");
    let code = |args: &[&str]| Command::new(bin).args(args).output().unwrap().status.code();
    assert_eq!(
        code(&["--api", "envoy"]),
        Some(1),
        "envoy without descriptors"
    );
    assert_eq!(code(&["--api", "http"]), Some(1), "http without url");
    assert_eq!(code(&["--duration", "0s"]), Some(1));
    assert_eq!(
        code(&["--bogus-flag"]),
        Some(1),
        "an unknown flag is bad usage"
    );
    assert_eq!(
        code(&["--keys", "many"]),
        Some(1),
        "a bad value is bad usage"
    );
    assert_eq!(code(&["--help"]), Some(0));
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = Command::new(bin)
        .args([
            "--target",
            &format!("http://127.0.0.1:{port}"),
            "--duration",
            "1s",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("unreachable"), "{stderr}");
    assert_eq!(
        stderr.matches("tcp connect error").count(),
        1,
        "each cause said once: {stderr}"
    );
}

/// `--api leased`: decisions from leased quota, the bound checked from when each lease's tokens
/// were taken (0 violations), and far fewer calls than decisions (reported per decision).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leased_mode_holds_the_bound_with_few_calls() {
    let t = sluicegate(&[]).await;
    let run = load(&[
        "--target",
        &t.url,
        "--api",
        "leased",
        "--duration",
        "2s",
        "--keys",
        "3",
        "--capacity",
        "200",
        "--rate",
        "100",
        "--concurrency",
        "16",
        "--check-bound",
    ])
    .await;
    assert_eq!(run.code, Some(0), "{}", run.stdout);
    let j = &run.json;
    assert_eq!(j["api"], "leased");
    assert_eq!(n(&j["errors"]), 0);
    assert!(n(&j["allowed"]) > 0 && n(&j["denied"]) > 0, "{j}");
    assert_eq!(n(&j["bound"]["violations"]), 0);
    let per = j["calls_per_decision"]
        .as_f64()
        .expect("calls per decision");
    assert!(per < 0.2, "calls per decision: {per}");
    assert!(run.stdout.contains("per decision"), "{}", run.stdout);
}
