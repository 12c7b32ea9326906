//! Overload: what the gRPC port does when offered more than it can answer. The server never
//! tears a connection down (one connection carries every call of an Envoy), and TLS handshakes
//! cannot be held hostage (`grpc_tls.rs`).

use std::time::Duration;

use futures::future::join_all;
use sluicegate_proto::sluicegate::v1::rate_limit_service_client::RateLimitServiceClient;
use tonic::{Code, transport::Endpoint};

use crate::support::{Sluicegate, ask, metric, metric_value};

/// One HTTP/2 connection carrying far more calls than the server answers at once, each with a
/// short deadline (as Envoy multiplexes them): every call is answered, refused
/// (RESOURCE_EXHAUSTED) or past its deadline; none fails because the server ended the
/// connection (before: GOAWAY ENHANCE_YOUR_CALM, "too_many_data_frames", and every call in
/// flight on it failed), and the connection serves on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_connection_is_never_torn_down() {
    let t = Sluicegate::start(&["--max-concurrent-requests", "64"], &[]).await;
    let channel = Endpoint::from_shared(t.grpc_url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let client = RateLimitServiceClient::new(channel);
    for wave in 0..3 {
        let calls = (0..10_000).map(|i| {
            let mut c = client.clone();
            async move {
                let mut r = tonic::Request::new(ask(&format!("k{}", i % 100), 1e6, 1e6, 1));
                r.set_timeout(Duration::from_millis(20));
                c.should_allow(r)
                    .await
                    .map(|_| ())
                    .map_err(|s| (s.code(), s.message().to_string()))
            }
        });
        let results = join_all(calls).await;
        let answered = results.iter().filter(|r| r.is_ok()).count();
        let torn: Vec<&(Code, String)> = results
            .iter()
            .filter_map(|r| r.as_ref().err())
            .filter(|(code, _)| {
                !matches!(
                    code,
                    Code::ResourceExhausted | Code::DeadlineExceeded | Code::Cancelled
                )
            })
            .collect();
        assert!(
            torn.is_empty(),
            "wave {wave}: {} calls failed with the connection ({} answered), e.g. {:?}",
            torn.len(),
            answered,
            &torn[..torn.len().min(3)]
        );
    }
    // The same connection serves on (once the calls the waves left in progress have ended:
    // until then a call may still be shed, which is an answer, not a failure).
    let mut c = client.clone();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match c.should_allow(ask("after", 0.0, 0.0, 1)).await {
            Ok(_) => break,
            Err(s)
                if s.code() == Code::ResourceExhausted && std::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(s) => panic!("the connection serves on: {s:?}"),
        }
    }
    // And the server says so itself: no GOAWAY at all was sent (not even an orderly one).
    let m = t.metrics().await;
    let sent: f64 = m
        .lines()
        .filter(|l| l.starts_with("sluicegate_goaways_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(sent, 0.0, "{m}");
}

/// GOAWAY frames are counted by error code as they leave: a client that breaks the protocol (a
/// DATA frame on stream 0) gets PROTOCOL_ERROR; a connection past GRPC_MAX_CONNECTION_AGE_SECS
/// gets an orderly NO_ERROR at its age (tonic's own grace skipped it: the connection was cut at
/// age + grace without one), its calls are served, and a stream that never ends is cut at age +
/// grace (SHUTDOWN_GRACE_SECS).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn goaways_sent_are_counted_by_reason() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let t = Sluicegate::start(
        &[],
        &[
            ("GRPC_MAX_CONNECTION_AGE_SECS", "1"),
            ("SHUTDOWN_GRACE_SECS", "2"),
        ],
    )
    .await;
    let series = |reason: &str| format!("sluicegate_goaways_total{{reason=\"{reason}\"}}");
    let m = t.metrics().await;
    assert_eq!(
        metric_value(&m, &series("protocol_error")),
        Some(0.0),
        "{m}"
    );

    let mut raw = tokio::net::TcpStream::connect(("127.0.0.1", t.grpc_port))
        .await
        .unwrap();
    let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    bytes.extend_from_slice(&[0, 0, 0, 0x4, 0, 0, 0, 0, 0]); // SETTINGS, empty
    bytes.extend_from_slice(&[0, 0, 1, 0x0, 0, 0, 0, 0, 0, b'x']); // DATA on stream 0
    raw.write_all(&bytes).await.unwrap();
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), raw.read_to_end(&mut sink)).await;
    let m = t.metrics().await;
    assert_eq!(metric(&m, &series("protocol_error")), 1.0, "{m}");

    // An orderly close: a connection that outlives its age is told to go, calls go on.
    let mut c = t.client().await;
    for _ in 0..30 {
        c.should_allow(ask("aged", 0.0, 0.0, 1)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let m = t.metrics().await;
    assert!(metric(&m, &series("no_error")) >= 1.0, "{m}");
    assert_eq!(metric(&m, &series("enhance_your_calm")), 0.0, "{m}");

    // A call that never ends (its request body never finishes) keeps its connection past the
    // GOAWAY; the connection is cut at age + grace, 3 s after it opened.
    let before = metric(&t.metrics().await, &series("no_error"));
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", t.grpc_port))
        .await
        .unwrap();
    let opened = std::time::Instant::now();
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    let connection = tokio::spawn(connection);
    let mut client = client.ready().await.unwrap();
    let (_response, _send) = client
        .send_request(should_allow_head(t.grpc_port, None), false)
        .unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(30), connection)
        .await
        .expect("the connection ends");
    let lived = opened.elapsed();
    assert!(
        (Duration::from_millis(2_500)..Duration::from_secs(20)).contains(&lived),
        "cut at age + grace: {lived:?}"
    );
    let m = t.metrics().await;
    assert!(
        metric(&m, &series("no_error")) > before,
        "a GOAWAY first: {m}"
    );
}

/// Calls whose deadline passes while Redis is slow (paused): the tokens their decisions took
/// when Redis got to them are given back, so the key is charged only for what its callers were
/// told (before, a call already in flight when its caller left kept its tokens).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_taken_for_callers_who_left_are_given_back() {
    let redis = crate::support::RedisServer::start().await;
    let t = Sluicegate::start(
        &["--redis-url", &redis.url()],
        &[("REDIS_TIMEOUT_MS", "2000")],
    )
    .await;
    let mut c = t.client().await;
    c.should_allow(ask("warm", 100.0, 0.001, 1)).await.unwrap();
    let mut conn = redis.connection().await;
    redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(400)
        .arg("ALL")
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    let calls = (0..20).map(|_| {
        let mut c = c.clone();
        async move {
            let mut r = tonic::Request::new(ask("probe", 100.0, 0.001, 1));
            r.set_timeout(Duration::from_millis(50));
            c.should_allow(r).await.map(|a| a.into_inner().allowed)
        }
    });
    let told_allowed = join_all(calls)
        .await
        .iter()
        .filter(|r| matches!(r, Ok(true)))
        .count();
    assert_eq!(told_allowed, 0, "Redis was paused past every deadline");
    let left = async || {
        let mut check = ask("probe", 100.0, 0.001, 0);
        check.dry_run = true;
        let mut c = t.client().await;
        c.should_allow(check)
            .await
            .unwrap()
            .into_inner()
            .tokens_remaining
    };
    crate::support::eventually(
        Duration::from_secs(10),
        "the probe's tokens back",
        async || left().await >= 99.99,
    )
    .await;
    let (_, metrics) = crate::support::http_get(&t.http_url("/metrics"))
        .await
        .unwrap();
    let gone = crate::support::metric(&metrics, "sluicegate_gone_refunds_total{backend=\"redis\"}");
    assert!(
        gone >= 1.0,
        "a call was in flight when its caller left: {gone}"
    );
}

/// A call whose deadline leaves no time to decide is refused at once, DEADLINE_EXCEEDED, counted,
/// and charges nothing; one with time to spare is decided.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_without_time_to_decide_is_refused_before_any_work() {
    let t = Sluicegate::start(&[], &[]).await;
    let mut c = t.client().await;
    let started = std::time::Instant::now();
    let status = call_with_deadline_header(t.grpc_port, ask("dl", 5.0, 0.001, 5), "500u").await;
    assert_eq!(status, Code::DeadlineExceeded as i32);
    assert!(started.elapsed() < Duration::from_secs(1));
    let mut fine = tonic::Request::new(ask("dl", 5.0, 0.001, 5));
    fine.set_timeout(Duration::from_secs(2));
    let answer = c.should_allow(fine).await.unwrap().into_inner();
    assert!(answer.allowed, "the refused call took nothing: {answer:?}");
    let (_, metrics) = crate::support::http_get(&t.http_url("/metrics"))
        .await
        .unwrap();
    assert_eq!(
        crate::support::metric(&metrics, "sluicegate_shed_total{reason=\"deadline\"}"),
        1.0
    );
}

/// Redis slow (paused) behind one connection: the calls queued behind the one in flight are shed
/// once they have waited MAX_QUEUE_MS, long before Redis answers again (before, they waited for
/// the whole pause and were answered too late to be of use), and they charge nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_redis_does_not_grow_the_queue() {
    let redis = crate::support::RedisServer::start().await;
    let t = Sluicegate::start(
        &["--redis-url", &redis.url()],
        &[
            ("REDIS_TIMEOUT_MS", "10000"),
            ("REDIS_CONNECTIONS", "1"),
            ("MAX_QUEUE_MS", "50"),
            ("FAILURE_MODE", "error"),
        ],
    )
    .await;
    let mut c = t.client().await;
    c.should_allow(ask("q", 1000.0, 0.001, 1)).await.unwrap();
    let mut conn = redis.connection().await;
    const PAUSE: Duration = Duration::from_secs(3);
    redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(PAUSE.as_millis() as u64)
        .arg("ALL")
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    let started = std::time::Instant::now();
    // The one call in flight: it holds the node's only slot until the pause ends.
    let first = tokio::spawn({
        let mut c = c.clone();
        async move { c.should_allow(ask("q", 1000.0, 0.001, 1)).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let queued = (0..100).map(|_| {
        let mut c = c.clone();
        async move {
            let answer = c.should_allow(ask("q", 1000.0, 0.001, 1)).await;
            (answer, started.elapsed())
        }
    });
    for (answer, at) in join_all(queued).await {
        let refused = answer.expect_err("queued behind a paused Redis: shed");
        assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
        assert!(
            at < PAUSE - Duration::from_millis(500),
            "shed after {at:?}: it waited for Redis"
        );
    }
    let first = first
        .await
        .unwrap()
        .expect("the call in flight is answered");
    assert!(first.into_inner().allowed);
    let (_, metrics) = crate::support::http_get(&t.http_url("/metrics"))
        .await
        .unwrap();
    let shed = crate::support::metric(&metrics, "sluicegate_shed_total{reason=\"queue\"}");
    assert!(shed >= 100.0, "every queued call counted: {shed}");
    // Only the two answered calls were charged.
    let mut check = ask("q", 1000.0, 0.001, 0);
    check.dry_run = true;
    let left = c
        .should_allow(check)
        .await
        .unwrap()
        .into_inner()
        .tokens_remaining;
    assert!((998.0..998.1).contains(&left), "{left}");
}

/// The head of a ShouldAllow call on a raw HTTP/2 stream, with `grpc-timeout` when given.
fn should_allow_head(port: u16, timeout: Option<&str>) -> http::Request<()> {
    let mut head = http::Request::post(format!(
        "http://127.0.0.1:{port}/sluicegate.v1.RateLimitService/ShouldAllow"
    ))
    .header("content-type", "application/grpc")
    .header("te", "trailers");
    if let Some(t) = timeout {
        head = head.header("grpc-timeout", t);
    }
    head.body(()).unwrap()
}

/// A ShouldAllow call over a raw HTTP/2 stream carrying `grpc-timeout: timeout`: tonic's client
/// would enforce the deadline itself and, on a busy machine, give up before the server's answer
/// arrives. Returns the grpc-status the server answered.
async fn call_with_deadline_header(
    port: u16,
    request: sluicegate_proto::sluicegate::v1::ShouldAllowRequest,
    timeout: &str,
) -> i32 {
    use prost::Message;
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(connection);
    let mut client = client.ready().await.unwrap();
    let head = should_allow_head(port, Some(timeout));
    let (response, mut send) = client.send_request(head, false).unwrap();
    let message = request.encode_to_vec();
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
    frame.extend_from_slice(&message);
    send.send_data(bytes::Bytes::from(frame), true).unwrap();
    let response = response.await.unwrap();
    let status_in = |h: &http::HeaderMap| {
        h.get("grpc-status")
            .map(|v| v.to_str().unwrap().parse::<i32>().unwrap())
    };
    if let Some(status) = status_in(response.headers()) {
        return status;
    }
    let mut body = response.into_body();
    while body.data().await.is_some() {}
    let trailers = body.trailers().await.unwrap().expect("trailers");
    status_in(&trailers).expect("a grpc-status")
}

/// An Envoy call shed (here: past MAX_CONCURRENT_REQUESTS while the one slot waits on a sleeping
/// Redis) is answered as FAILURE_MODE says, not as an error Envoy would fail open on: OVER_LIMIT
/// under deny, OK under allow, RESOURCE_EXHAUSTED under error. sluicegate's own API stays
/// RESOURCE_EXHAUSTED (its clients have their own failure mode).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shed_envoy_call_is_answered_as_failure_mode_says() {
    use crate::support::envoy::{OK, OVER, RateLimitServiceClient, descriptor, request};
    let redis = crate::support::RedisServer::start().await;
    for (mode, expected) in [("deny", Some(OVER)), ("allow", Some(OK)), ("error", None)] {
        let t = Sluicegate::start(
            &["--max-concurrent-requests", "1"],
            &[
                ("REDIS_URL", &redis.url()),
                ("REDIS_TIMEOUT_MS", "5000"),
                ("FAILURE_MODE", mode),
            ],
        )
        .await;
        let mut c = t.client().await;
        c.should_allow(ask("warm", 0.0, 0.0, 1)).await.unwrap();
        // Redis asleep: this call holds the only slot until it wakes.
        let sleeper = redis.sleep(1).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let held = tokio::spawn({
            let mut c = c.clone();
            async move { c.should_allow(ask("held", 0.0, 0.0, 1)).await }
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut envoy = RateLimitServiceClient::connect(t.grpc_url()).await.unwrap();
        let answer = envoy
            .should_rate_limit(request("edge", vec![descriptor(&[("k", "v")])]))
            .await;
        match expected {
            Some(code) => {
                let answer = answer.unwrap_or_else(|s| panic!("{mode}: {s:?}"));
                assert_eq!(answer.into_inner().overall_code, code, "{mode}");
            }
            None => assert_eq!(answer.unwrap_err().code(), Code::ResourceExhausted),
        }
        let own = c.should_allow(ask("own", 0.0, 0.0, 1)).await.unwrap_err();
        assert_eq!(own.code(), Code::ResourceExhausted, "{mode}: {own:?}");
        held.await.unwrap().expect("the held call finishes");
        sleeper.await.unwrap();
        let (_, metrics) = crate::support::http_get(&t.http_url("/metrics"))
            .await
            .unwrap();
        let shed =
            crate::support::metric(&metrics, "sluicegate_shed_total{reason=\"concurrency\"}");
        assert!(shed >= 2.0, "{mode}: {shed}");
        if expected.is_some() {
            let counted = crate::support::metric(
                &metrics,
                &format!("sluicegate_failure_mode_total{{mode=\"{mode}\"}}"),
            );
            assert!(counted >= 1.0, "{mode}: {counted}");
        }
    }
}

/// The adaptive limit follows the backend: while Redis stalls again and again (paused 300 ms of
/// every 350), answers are slower than MAX_QUEUE_MS and the limit on calls in progress falls
/// from its start towards the floor, the excess shed at once (`adaptive`); once Redis is quick
/// again, the same offered load makes it grow back. The gauge shows it all along.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_concurrency_limit_follows_the_backend() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let redis = crate::support::RedisServer::start().await;
    let t = Sluicegate::start(
        &["--redis-url", &redis.url()],
        &[
            ("REDIS_TIMEOUT_MS", "10000"),
            ("MAX_QUEUE_MS", "100"),
            ("MAX_CONCURRENT_REQUESTS", "400"),
            ("FAILURE_MODE", "error"),
        ],
    )
    .await;
    let limit = |m: &str| metric_value(m, "sluicegate_concurrency_limit ").expect("the gauge");
    assert_eq!(limit(&t.metrics().await), 400.0);

    // 300 callers, closed loop, a rest after a refusal (50 ms: the refusals of 300 callers
    // retrying every 10 ms took the CPU a busy machine needs to answer the admitted calls in time,
    // and the limit could not grow back); over 4 connections, since one carries at most 128 calls
    // at once (below the limit, nothing would be shed).
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let mut connections = Vec::new();
    for _ in 0..4 {
        connections.push(t.client().await);
    }
    let callers: Vec<_> = (0..300)
        .map(|i| {
            let (mut c, stop) = (connections[i % 4].clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let ask = ask(&format!("a{}", i % 50), 1e9, 1e9, 1);
                    if c.should_allow(ask).await.is_err() {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            })
        })
        .collect();

    let stalling = std::sync::Arc::new(AtomicBool::new(true));
    let staller = tokio::spawn({
        let (mut admin, stalling) = (redis.connection().await, stalling.clone());
        async move {
            while stalling.load(Ordering::Relaxed) {
                let _: redis::RedisResult<()> = redis::cmd("CLIENT")
                    .arg("PAUSE")
                    .arg(300)
                    .arg("ALL")
                    .query_async(&mut admin)
                    .await;
                tokio::time::sleep(Duration::from_millis(350)).await;
            }
        }
    });
    let mut low = f64::MAX;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::time::Instant::now() < deadline && low > 150.0 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        low = low.min(limit(&t.metrics().await));
    }
    assert!(low <= 150.0, "the limit fell with Redis stalling: {low}");
    let m = t.metrics().await;
    assert!(
        metric(&m, "sluicegate_shed_total{reason=\"adaptive\"}") >= 1.0,
        "{m}"
    );
    stalling.store(false, Ordering::Relaxed);
    staller.await.unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let low = low.min(limit(&t.metrics().await));

    // Redis quick again: the limit grows back under the same load.
    let mut now = low;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while std::time::Instant::now() < deadline && now < 1.25 * low {
        tokio::time::sleep(Duration::from_millis(100)).await;
        now = limit(&t.metrics().await);
    }
    stop.store(true, Ordering::Relaxed);
    for c in callers {
        c.await.unwrap();
    }
    // By a quarter at least (a busy machine keeps some windows slow; a fixed limit, none).
    assert!(now >= 1.25 * low, "the limit grew back: {low} -> {now}");
}
