//! Envoy's quota protocol (RLQS) end to end: real Envoy 1.40 processes with the shipped quota
//! filter config (`deploy/envoy/envoy-rlqs.yaml`), each streaming to its own sluicegate replica,
//! the replicas sharing one Redis; requests offered open loop at fixed rates.

use std::time::{Duration, Instant};

use prost::Message as _;
use sluicegate_proto::envoy::service::rate_limit_quota::v3 as rlqs;
use tokio::task::JoinHandle;

use crate::support::{
    Envoy, RedisServer, SERVING, Sluicegate, Upstream, eventually, free_port, health, http_get,
    http_request, metric, metric_value, raw_http, repo_path,
};

fn envoy_config() -> String {
    std::fs::read_to_string(repo_path("deploy/envoy/envoy-rlqs.yaml")).unwrap()
}

/// The shipped config with its `x-user` matcher taking any value, bytes that are not UTF-8
/// included (the shipped one admits printable ASCII only).
pub fn lax_envoy_config() -> String {
    let shipped = envoy_config();
    let lax = shipped.replace(r#"regex: "[!-~]{1,256}""#, r#"regex: ".+""#);
    assert_ne!(lax, shipped, "the matcher was relaxed");
    lax
}

/// Answers to requests offered open loop: when each was sent (since `t0`) and its status.
type Answers = Vec<(Duration, u16)>;

/// Offers `rate` requests a second through Envoy's listener on `port` for `time`, open loop (a
/// slow answer never delays the next request), each with `headers`.
fn offer(
    port: u16,
    headers: &[(&str, &str)],
    rate: f64,
    time: Duration,
    t0: Instant,
) -> JoinHandle<Answers> {
    let headers: Vec<(String, String)> = headers
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    tokio::spawn(async move {
        let url = format!("http://127.0.0.1:{port}/");
        let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let end = Instant::now() + time;
        let mut sent = Vec::new();
        while Instant::now() < end {
            tick.tick().await;
            let (url, headers) = (url.clone(), headers.clone());
            let at = t0.elapsed();
            sent.push(tokio::spawn(async move {
                let h: Vec<(&str, &str)> = headers
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect();
                (at, http_request(&url, &h).await.map_or(0, |a| a.status))
            }));
        }
        let mut answers = Vec::with_capacity(sent.len());
        for s in sent {
            answers.push(s.await.unwrap());
        }
        answers
    })
}

/// Answers with `status` sent within `[from, to)`.
fn count(answers: &Answers, status: u16, from: f64, to: f64) -> usize {
    answers
        .iter()
        .filter(|(at, s)| *s == status && (from..to).contains(&at.as_secs_f64()))
        .count()
}

/// Requests sent within `[from, to)`.
fn sent(answers: &Answers, from: f64, to: f64) -> usize {
    answers
        .iter()
        .filter(|(at, _)| (from..to).contains(&at.as_secs_f64()))
        .count()
}

/// The share rates (tokens per second) a replica's status page shows for buckets of `rule`.
async fn shown_shares(replica: &Sluicegate, rule: &str) -> Vec<f64> {
    let (_, body) = http_get(&replica.http_url("/debug/status")).await.unwrap();
    let status: serde_json::Value = serde_json::from_str(&body).unwrap();
    status["rlqs"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|s| s["buckets"].as_array().unwrap().clone())
        .filter(|b| b["rule"] == rule)
        .filter_map(|b| b["rate"].as_f64())
        .collect()
}

/// Two Envoys, each on its own replica over one Redis, offered 300/s and 100/s against one rule
/// of 100/s: once the first reports are in, the fleet admits 100/s (within 20%), each Envoy in
/// proportion to its demand (the same chance of admission on both); with one Envoy gone, the
/// other gets the whole limit.
#[tokio::test]
async fn envoys_on_two_replicas_share_one_global_limit_by_demand() {
    let redis = RedisServer::start().await;
    let rules = repo_path("deploy/rules/rlqs.yaml");
    let args = ["--rules", &rules, "--debug-endpoints"];
    let env = [("REDIS_URL", redis.url())];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let (r1, r2) = (
        Sluicegate::start(&args, &env).await,
        Sluicegate::start(&args, &env).await,
    );
    let upstream = Upstream::start().await;
    let a = Envoy::start(&envoy_config(), upstream.port, r1.grpc_port).await;
    let b = Envoy::start(&envoy_config(), upstream.port, r2.grpc_port).await;

    let t0 = Instant::now();
    let load_a = offer(a.listen_port, &[], 300.0, Duration::from_secs(36), t0);
    let load_b = offer(b.listen_port, &[], 100.0, Duration::from_secs(22), t0);

    // The shares each replica assigns, once two reports have come in: they follow demand (3:1)
    // and add up to the limit over both replicas.
    tokio::time::sleep(Duration::from_secs(16)).await;
    let (s1, s2) = (
        shown_shares(&r1, "name=edge").await,
        shown_shares(&r2, "name=edge").await,
    );
    assert_eq!(
        (s1.len(), s2.len()),
        (1, 1),
        "one edge bucket per Envoy: {s1:?} {s2:?}"
    );
    let total = s1[0] + s2[0];
    assert!(
        (90.0..=105.0).contains(&total),
        "shares {s1:?} + {s2:?} = {total}"
    );
    assert!(
        s1[0] > 2.0 * s2[0],
        "shares follow demand: {s1:?} vs {s2:?}"
    );

    let b_answers = load_b.await.unwrap();
    drop(b);
    let a_answers = load_a.await.unwrap();
    // Settled: from 12 s (two reports, ~10 s) to 22 s, both Envoys offered.
    let (a_ok, b_ok) = (
        count(&a_answers, 200, 12.0, 22.0),
        count(&b_answers, 200, 12.0, 22.0),
    );
    let admitted = (a_ok + b_ok) as f64 / 10.0;
    assert!(
        (80.0..=120.0).contains(&admitted),
        "the fleet admitted {admitted}/s against a limit of 100/s (A {a_ok}, B {b_ok} in 10 s)"
    );
    let chance_a = a_ok as f64 / sent(&a_answers, 12.0, 22.0) as f64;
    let chance_b = b_ok as f64 / sent(&b_answers, 12.0, 22.0) as f64;
    assert!(
        (chance_a - chance_b).abs() < 0.12,
        "a client's chance of admission depends on its Envoy: {chance_a:.2} vs {chance_b:.2}"
    );
    // Envoy B gone at 22 s: within a few intervals A's share grows to the whole limit.
    let alone = count(&a_answers, 200, 28.0, 36.0) as f64 / 8.0;
    assert!(
        (80.0..=120.0).contains(&alone),
        "alone, Envoy A admitted {alone}/s (limit 100/s)"
    );
    let metrics = http_get(&r1.http_url("/metrics")).await.unwrap().1;
    assert!(metric(&metrics, "sluicegate_rlqs_exchanges_total{outcome=\"ok\"}") >= 20.0);
    assert!(
        metric(
            &metrics,
            "sluicegate_decisions_total{api=\"rlqs\",result=\"denied\"}"
        ) > 0.0
    );
}

/// Bursts of `n` requests as user `user` through `envoy`, one after another: how many were let
/// through.
async fn burst(envoy: &Envoy, user: &[u8], n: usize) -> usize {
    let mut ok = 0;
    for _ in 0..n {
        if burst_port(envoy.listen_port, user).await == Some(200) {
            ok += 1;
        }
    }
    ok
}

const PER_USER_RULES: &str = r#"
domain: quota
descriptors:
  - key: name
    value: per_user
    descriptors:
      - key: user
        rate_limit: { unit: minute, requests_per_unit: RATE }
      - key: user
        value: blocked
        rate_limit: { unit: second, requests_per_unit: 0 }
      - key: user
        value: free
        rate_limit: { unlimited: true }
"#;

/// One Envoy, per-value buckets (`x-user` values, each its own limit), DENY_ALL and ALLOW_ALL
/// rules, an unmatched bucket, and a rules reload that reaches the Envoy's assignments. Its
/// matcher lets a header value that is not UTF-8 make a bucket: Envoy 1.40 cannot read an
/// assignment for it (it would reset the stream and every bucket would lose its assignment), so
/// sluicegate leaves that one bucket unanswered and the stream keeps working.
#[tokio::test]
async fn per_value_buckets_blanket_rules_and_a_reload_reach_envoy() {
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules.yaml");
    std::fs::write(&rules, PER_USER_RULES.replace("RATE", "5")).unwrap();
    let rules_arg = rules.display().to_string();
    let sg = Sluicegate::start(&["--rules", &rules_arg, "--debug-endpoints"], &[]).await;
    let upstream = Upstream::start().await;
    let envoy = Envoy::start(&lax_envoy_config(), upstream.port, sg.grpc_port).await;

    // Each bucket's first request passes (no assignment yet) and brings its assignment.
    for user in [&b"alice"[..], b"bob", b"blocked", b"free", b"\xff\xfe"] {
        burst(&envoy, user, 1).await;
    }
    // Requests without x-user make the edge bucket, which no rule here matches: ALLOW_ALL.
    assert_eq!(
        http_request(&envoy.url("/"), &[]).await.unwrap().status,
        200
    );
    tokio::time::sleep(Duration::from_millis(500)).await;

    // 5 a minute, 5 deep (Envoy's bucket starts full), and bob's bucket is his own.
    let alice = burst(&envoy, b"alice", 12).await;
    assert!(
        (4..=6).contains(&alice),
        "alice: {alice} of 12 through a 5-token bucket"
    );
    let bob = burst(&envoy, b"bob", 12).await;
    assert!((4..=6).contains(&bob), "bob: {bob} of 12 (his own bucket)");
    assert_eq!(burst(&envoy, b"blocked", 10).await, 0, "DENY_ALL");
    assert_eq!(
        burst(&envoy, b"free", 20).await,
        20,
        "ALLOW_ALL (unlimited)"
    );
    for _ in 0..20 {
        assert_eq!(
            http_request(&envoy.url("/"), &[]).await.unwrap().status,
            200
        );
    }
    // Bytes that are not UTF-8 in the bucket id: not tracked, not answered (counted); a
    // periodic report (every 5 s) carries that bucket with the others, and the stream lives on.
    let metrics = http_get(&sg.http_url("/metrics")).await.unwrap().1;
    assert!(
        metric(
            &metrics,
            "sluicegate_refused_total{api=\"rlqs\",reason=\"not_utf8\"}"
        ) >= 1.0
    );
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(burst(&envoy, b"blocked", 5).await, 0, "still DENY_ALL");
    // Envoy lets a new bucket's requests through until its assignment arrives (a round trip,
    // longer on a busy machine), then the 5-token bucket: at least two of 12 refused shows the
    // assignment came.
    let carol = burst(&envoy, b"carol", 12).await;
    assert!(
        (5..=10).contains(&carol),
        "a new user after it: {carol} of 12"
    );
    let metrics = http_get(&sg.http_url("/metrics")).await.unwrap().1;
    assert_eq!(metric(&metrics, "sluicegate_rlqs_streams"), 1.0);
    assert_eq!(metric(&metrics, "sluicegate_rlqs_buckets"), 6.0);

    // The rule becomes 60 a minute, 60 deep: the new assignment reaches Envoy without waiting
    // for a report, and Envoy lets through what the old rule (5 a minute, spent) could not.
    let url = sg.http_url("/metrics");
    let reloads = async || {
        let m = http_get(&url).await.unwrap().1;
        metric_value(&m, "sluicegate_rules_reloads_total{outcome=\"ok\"}").unwrap_or(0.0)
    };
    let before = reloads().await;
    std::fs::write(&rules, PER_USER_RULES.replace("RATE", "60")).unwrap();
    eventually(Duration::from_secs(20), "the rules reload", async || {
        reloads().await > before
    })
    .await;
    let status = sg.http_url("/debug/status");
    eventually(Duration::from_secs(3), "the new assignment", async || {
        let (_, body) = http_get(&status).await.unwrap();
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        v["rlqs"][0]["buckets"].as_array().unwrap().iter().any(|b| {
            b["max_tokens"] == 60 && (b["rate"].as_f64().unwrap_or(0.0) - 1.0).abs() < 0.01
        })
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = burst(&envoy, b"alice", 30).await;
    assert!(
        after >= 3,
        "after the reload alice got {after} of 30 (the old rule allows at most 1 now)"
    );
}

/// sluicegate killed: Envoy keeps its assignment until the TTL, then falls back as its
/// `expired_assignment_behavior` says (DENY_ALL here, to see it); sluicegate back on its port:
/// Envoy's next report gets an assignment again.
#[tokio::test]
async fn envoy_falls_back_when_sluicegate_goes_and_resumes_when_it_returns() {
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules.yaml");
    std::fs::write(&rules, PER_USER_RULES.replace("RATE", "6000")).unwrap();
    let rules_arg = rules.display().to_string();
    let (grpc_port, http_port) = (free_port(), free_port());
    let mut sg = Sluicegate::start_on(grpc_port, http_port, &["--rules", &rules_arg], &[]).await;
    let upstream = Upstream::start().await;
    let config = envoy_config().replace(
        "fallback_rate_limit:\n                              token_bucket: { max_tokens: 10, tokens_per_fill: 10, fill_interval: 1s }",
        "fallback_rate_limit: { blanket_rule: DENY_ALL }",
    );
    assert_ne!(config, envoy_config(), "the fallback was rewritten");
    let envoy = Envoy::start(&config, upstream.port, grpc_port).await;

    burst(&envoy, b"alice", 1).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        burst(&envoy, b"alice", 5).await,
        5,
        "assigned: 6000 a minute"
    );

    let gone = Instant::now();
    sg.terminate(Duration::from_secs(15));
    // Within the TTL (15 s: three reports), the last assignment stands.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        burst(&envoy, b"alice", 3).await,
        3,
        "the last assignment stands"
    );
    let port = envoy.listen_port;
    eventually(
        Duration::from_secs(30),
        "Envoy's fallback (DENY_ALL)",
        async || burst_port(port, b"alice").await == Some(429),
    )
    .await;
    let fell_back = gone.elapsed();
    // The TTL (15 s) runs from the last answer, up to a report interval (5 s) before the kill.
    assert!(
        fell_back >= Duration::from_secs(9),
        "fell back after {fell_back:?}, before the assignment's TTL"
    );

    let _sg = Sluicegate::start_on(grpc_port, http_port, &["--rules", &rules_arg], &[]).await;
    let back = Instant::now();
    eventually(Duration::from_secs(25), "an assignment again", async || {
        burst_port(port, b"alice").await == Some(200)
    })
    .await;
    // Envoy reconnects at its next report (every 5 s) and is answered at once: within two
    // report intervals, with room for a busy machine.
    assert!(
        back.elapsed() <= Duration::from_secs(12),
        "resumed after {:?}",
        back.elapsed()
    );
}

/// One request as user `user` (raw bytes) through Envoy's listener on `port`: its status.
async fn burst_port(port: u16, user: &[u8]) -> Option<u16> {
    let mut request = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\nx-user: ".to_vec();
    request.extend_from_slice(user);
    request.extend_from_slice(b"\r\n\r\n");
    raw_http(port, &request).await
}

/// A quota stream spoken by hand: reports of one bucket every second, and the assignments that
/// come back.
pub(crate) struct Stream {
    reports: tokio::sync::mpsc::Sender<rlqs::RateLimitQuotaUsageReports>,
    responses: tonic::Streaming<rlqs::RateLimitQuotaResponse>,
}

impl Stream {
    async fn open(sg: &Sluicegate) -> Self {
        Self::open_url(sg.grpc_url()).await
    }

    /// A stream to the gRPC server at `url`.
    pub(crate) async fn open_url(url: String) -> Self {
        use rlqs::rate_limit_quota_service_client::RateLimitQuotaServiceClient;
        let mut client = RateLimitQuotaServiceClient::connect(url).await.unwrap();
        let (reports, rx) = tokio::sync::mpsc::channel(16);
        let outbound =
            futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|r| (r, rx)) });
        let responses = client
            .stream_rate_limit_quotas(outbound)
            .await
            .unwrap()
            .into_inner();
        Stream { reports, responses }
    }

    pub(crate) async fn report(&self, name: &str, allowed: u64, denied: u64) {
        let usage = rlqs::rate_limit_quota_usage_reports::BucketQuotaUsage {
            bucket_id: Some(rlqs::BucketId {
                bucket: vec![rlqs::bucket_id::BucketEntry {
                    key: b"name".to_vec(),
                    value: name.as_bytes().to_vec(),
                }],
            }),
            time_elapsed: Some(prost_types::Duration {
                seconds: 1,
                nanos: 0,
            }),
            num_requests_allowed: allowed,
            num_requests_denied: denied,
        };
        let report = rlqs::RateLimitQuotaUsageReports {
            domain: "quota".into(),
            bucket_quota_usages: vec![usage],
        };
        assert!(report.encoded_len() > 0);
        self.reports.send(report).await.unwrap();
    }

    /// The next response within `within`, if one comes.
    pub(crate) async fn next(&mut self, within: Duration) -> Option<rlqs::RateLimitQuotaResponse> {
        tokio::time::timeout(within, self.responses.message())
            .await
            .ok()?
            .ok()?
    }
}

/// The token bucket's rate (tokens per second) in an assignment, if it holds one.
fn assigned_rate(r: &rlqs::RateLimitQuotaResponse) -> Option<f64> {
    use rlqs::rate_limit_quota_response::bucket_action::BucketAction as A;
    use sluicegate_proto::envoy::r#type::v3::rate_limit_strategy::Strategy;
    r.bucket_action.iter().find_map(|a| match &a.bucket_action {
        Some(A::QuotaAssignmentAction(q)) => {
            match q.rate_limit_strategy.as_ref()?.strategy.as_ref()? {
                Strategy::TokenBucket(t) => {
                    Some(f64::from(t.tokens_per_fill?) / t.fill_interval?.seconds as f64)
                }
                _ => None,
            }
        }
        _ => None,
    })
}

/// Redis down: the shares stand while they are fresh (an assignment's TTL, 15 s), then none is
/// sent (Envoy's own fallback takes over at its TTL); Redis back: shares again within two
/// exchanges. Without Redis a replica cannot know the others' demand, so it never makes one up.
#[tokio::test]
async fn with_redis_down_shares_stand_until_stale_then_none_is_sent() {
    let mut redis = RedisServer::start().await;
    let rules = repo_path("deploy/rules/rlqs.yaml");
    let sg = Sluicegate::start(&["--rules", &rules], &[("REDIS_URL", &redis.url())]).await;
    let (url, rlqs_service) = (
        sg.grpc_url(),
        "envoy.service.rate_limit_quota.v3.RateLimitQuotaService",
    );
    eventually(Duration::from_secs(10), "RLQS health SERVING", async || {
        health(&url, rlqs_service).await == Some(SERVING)
    })
    .await;
    let mut stream = Stream::open(&sg).await;
    stream.report("edge", 50, 0).await;
    let first = stream
        .next(Duration::from_secs(5))
        .await
        .expect("an assignment");
    let rate = assigned_rate(&first).expect("a token bucket");
    assert!(
        (99.0..=100.0).contains(&rate),
        "alone: the whole limit, got {rate}"
    );

    redis.kill();
    let down = Instant::now();
    // Reports keep coming; the answers keep the last share until it is stale.
    let mut last_answer = None;
    while down.elapsed() < Duration::from_secs(24) {
        stream.report("edge", 50, 0).await;
        if let Some(r) = stream.next(Duration::from_millis(900)).await
            && let Some(rate) = assigned_rate(&r)
        {
            assert!((99.0..=100.0).contains(&rate), "{rate}");
            last_answer = Some(down.elapsed());
        }
    }
    let last = last_answer.expect("answers while the shares were fresh");
    assert!(
        (Duration::from_secs(12)..=Duration::from_secs(18)).contains(&last),
        "the last share was sent {last:?} after Redis went (fresh for 15 s)"
    );

    redis.restart().await;
    let up = Instant::now();
    loop {
        stream.report("edge", 50, 0).await;
        if stream
            .next(Duration::from_millis(900))
            .await
            .is_some_and(|r| assigned_rate(&r).is_some())
        {
            break;
        }
        assert!(
            up.elapsed() < Duration::from_secs(10),
            "no share within 10 s of Redis's return"
        );
    }
    let metrics = http_get(&sg.http_url("/metrics")).await.unwrap().1;
    assert!(
        metric(
            &metrics,
            "sluicegate_rlqs_exchanges_total{outcome=\"error\"}"
        ) >= 5.0
    );
}

/// The quota stream over mutual TLS: Envoy presents its certificate, sluicegate accepts only its
/// SAN, and assignments still reach Envoy (a DENY_ALL rule refuses after the first request).
#[tokio::test]
async fn the_quota_stream_runs_over_mutual_tls() {
    let dir = tempfile::tempdir().unwrap();
    let ca = crate::support::pki::Ca::new(dir.path(), "ca");
    ca.issue("sluicegate", &["DNS:sluicegate"], "serverAuth");
    ca.issue(
        "envoy",
        &["URI:spiffe://sluicegate.local/envoy"],
        "clientAuth",
    );
    let file = |name: &str| dir.path().join(name).display().to_string();
    let transport = format!(
        r#"    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        sni: sluicegate
        common_tls_context:
          alpn_protocols: ["h2"]
          tls_certificates:
          - certificate_chain: {{ filename: {} }}
            private_key: {{ filename: {} }}
          validation_context:
            trusted_ca: {{ filename: {} }}
            match_typed_subject_alt_names:
            - san_type: DNS
              matcher: {{ exact: sluicegate }}
    load_assignment:
      cluster_name: sluicegate
"#,
        file("envoy.pem"),
        file("envoy.key"),
        file("ca.pem")
    );
    let shipped = envoy_config();
    let config = shipped.replace(
        "    load_assignment:\n      cluster_name: sluicegate\n",
        &transport,
    );
    assert_ne!(config, shipped, "the TLS transport was added");
    let rules = repo_path("deploy/rules/rlqs.yaml");
    let (cert, key, client_ca) = (
        file("sluicegate.pem"),
        file("sluicegate.key"),
        file("ca.pem"),
    );
    let sg = Sluicegate::start(
        &[
            "--rules",
            &rules,
            "--grpc-tls",
            "--grpc-tls-cert",
            &cert,
            "--grpc-tls-key",
            &key,
            "--grpc-client-ca",
            &client_ca,
            "--grpc-client-san",
            "spiffe://sluicegate.local/envoy",
        ],
        &[],
    )
    .await;
    let upstream = Upstream::start().await;
    let envoy = Envoy::start(&config, upstream.port, sg.grpc_port).await;
    burst(&envoy, b"blocked", 1).await;
    let port = envoy.listen_port;
    eventually(Duration::from_secs(10), "DENY_ALL over mTLS", async || {
        burst_port(port, b"blocked").await == Some(429)
    })
    .await;
    let metrics = http_get(&sg.http_url("/metrics")).await.unwrap().1;
    assert_eq!(metric(&metrics, "sluicegate_rlqs_streams"), 1.0);
}

/// A periodic report carries every bucket an Envoy holds, and clients choose how many (a bucket
/// per header value): a report of 8,000 buckets with 256-byte values (over 2 MiB, past
/// GRPC_MAX_MESSAGE_BYTES) is answered, bucket by bucket, not refused (a refused report ends the
/// stream at every report and every bucket on that Envoy loses its assignment).
#[tokio::test]
async fn a_report_of_many_buckets_is_answered() {
    let rules = repo_path("deploy/rules/rlqs.yaml");
    let sg = Sluicegate::start(&["--rules", &rules], &[]).await;
    let mut stream = Stream::open(&sg).await;
    let usage = |i: usize| rlqs::rate_limit_quota_usage_reports::BucketQuotaUsage {
        bucket_id: Some(rlqs::BucketId {
            bucket: vec![
                rlqs::bucket_id::BucketEntry {
                    key: b"name".to_vec(),
                    value: b"per_user".to_vec(),
                },
                rlqs::bucket_id::BucketEntry {
                    key: b"user".to_vec(),
                    value: format!("{i:0>256}").into_bytes(),
                },
            ],
        }),
        time_elapsed: None,
        num_requests_allowed: 1,
        num_requests_denied: 0,
    };
    let report = rlqs::RateLimitQuotaUsageReports {
        domain: "quota".into(),
        bucket_quota_usages: (0..8_000).map(usage).collect(),
    };
    assert!(report.encoded_len() > 2 << 20, "{}", report.encoded_len());
    stream.reports.send(report).await.unwrap();
    let answer = stream
        .next(Duration::from_secs(20))
        .await
        .expect("the report is answered");
    assert_eq!(answer.bucket_action.len(), 8_000);
    assert!(answer.bucket_action.iter().all(|a| {
        assigned_rate(&rlqs::RateLimitQuotaResponse {
            bucket_action: vec![a.clone()],
        })
        .is_some_and(|r| (r - 10.0).abs() < 0.1)
    }));
}
