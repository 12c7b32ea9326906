//! Leased quota in the service (QUOTA_LEASES): replicas answer hot keys from slices of the Redis
//! bucket, and nothing they admit, over any window, exceeds what the bucket allows.
//!
//! In-process replicas (two `RedisBackend`s with leases over one redis-server) for the property
//! test and the exact figures; real processes for a kill and for offered load at the limit.

use std::time::Duration;

use proptest::prelude::*;
use sluicegate_core::backend::redis::{LeaseSettings, RedisOptions};
use sluicegate_core::backend::{Backend, BucketRequest, RedisBackend, Reserve, SettleRequest};
use sluicegate_core::{Decision, Op, Shape};
use tokio::time::Instant;

use crate::support::{RedisServer, Sluicegate, workspace_bin};

fn replica(url: &str, lease_ms: u32, max_fraction: f64) -> RedisBackend {
    let mut options = RedisOptions::new(Duration::from_secs(2));
    options.leases = Some(LeaseSettings {
        lease_ms,
        max_fraction,
    });
    RedisBackend::with_options(url, options).unwrap()
}

async fn take(b: &RedisBackend, key: &str, shape: Shape, cost: u64) -> Decision {
    b.decide(BucketRequest::new(key, shape, Op::Take(cost)))
        .await
        .unwrap()
}

/// Takes of 1 every `pace` until `b` answers one from a lease (at most 3 s). Returns how many
/// were allowed.
async fn warm(b: &RedisBackend, key: &str, shape: Shape, pace: Duration) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut allowed = 0;
    while Instant::now() < deadline {
        let d = take(b, key, shape, 1).await;
        allowed += d.granted;
        if d.allowed && d.without_backend {
            return allowed;
        }
        tokio::time::sleep(pace).await;
    }
    panic!("no lease within 3 s ({allowed} allowed)");
}

/// What the bucket holds now, and what is leased out of it (0 when stored without leases).
async fn bucket(conn: &mut redis::aio::MultiplexedConnection, key: &str) -> (f64, f64) {
    let raw: Option<Vec<u8>> = redis::cmd("GET").arg(key).query_async(conn).await.unwrap();
    let Some(raw) = raw else {
        return (f64::NAN, 0.0);
    };
    let d = |i: usize| f64::from_le_bytes(raw[8 * i..8 * i + 8].try_into().unwrap());
    (d(0), if raw.len() == 40 { d(2) } else { 0.0 })
}

/// One allowed take: when it was sent and answered (µs from the start), and what it took.
#[derive(Clone, Copy)]
struct Admitted {
    sent: u64,
    done: u64,
    tokens: u64,
}

/// The excess over the bucket's bound in the worst window, in tokens (<= 0: none): a window may
/// start at any take's send and end at any answer, and must not hold more than capacity + rate x
/// its length (sluicegate-load's check).
fn worst_excess(mut events: Vec<Admitted>, shape: Shape) -> f64 {
    events.sort_by_key(|e| e.sent);
    let rate_us = shape.rate() / 1e6;
    let (mut sum, mut latest, mut best_start, mut worst) = (0.0, 0u64, f64::NEG_INFINITY, f64::MIN);
    for e in events {
        best_start = f64::max(best_start, rate_us * e.sent as f64 - sum);
        sum += e.tokens as f64;
        latest = latest.max(e.done);
        worst = f64::max(
            worst,
            sum - rate_us * latest as f64 + best_start - shape.capacity(),
        );
    }
    worst
}

/// One case: two replicas, four callers each on one key, each pacing its takes for `run`, then
/// taking as fast as it can for `burst` (a bucket refilled while leases are out, then drained:
/// where a lease could add to the bucket's burst); returns the admitted takes, how many came from
/// leases, and the run's length in µs.
#[allow(clippy::too_many_arguments)]
async fn hammer(
    url: &str,
    key: &str,
    shape: Shape,
    cost: u64,
    leases: (u32, f64),
    pace: Duration,
    run: Duration,
    burst: Duration,
) -> (Vec<Admitted>, u64, u64) {
    let replicas = [
        std::sync::Arc::new(replica(url, leases.0, leases.1)),
        std::sync::Arc::new(replica(url, leases.0, leases.1)),
    ];
    let start = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..8 {
        let b = replicas[i % 2].clone();
        let key = key.to_string();
        tasks.push(tokio::spawn(async move {
            let (mut out, mut local) = (Vec::new(), 0);
            while start.elapsed() < run + burst {
                let sent = start.elapsed().as_micros() as u64;
                let d = take(&b, &key, shape, cost).await;
                let done = start.elapsed().as_micros() as u64;
                if d.allowed {
                    local += u64::from(d.without_backend);
                    out.push(Admitted {
                        sent,
                        done,
                        tokens: d.granted,
                    });
                }
                if start.elapsed() < run {
                    tokio::time::sleep(pace).await;
                }
            }
            (out, local)
        }));
    }
    let (mut events, mut local) = (Vec::new(), 0);
    for t in tasks {
        let (e, l) = t.await.unwrap();
        events.extend(e);
        local += l;
    }
    for r in &replicas {
        r.close().await;
    }
    (events, local, start.elapsed().as_micros() as u64)
}

#[test]
fn two_replicas_on_one_hot_key_never_exceed_the_bound_in_any_window() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let server = rt.block_on(RedisServer::start());
    let url = server.url();
    let local_total = std::sync::atomic::AtomicU64::new(0);
    let case = std::sync::atomic::AtomicU64::new(0);
    let config = ProptestConfig {
        cases: 12,
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    proptest!(config, |(
        capacity in 40.0f64..2_000.0,
        rate in 20.0f64..3_000.0,
        cost in 1u64..=3,
        lease_ms in 20u32..400,
        fraction in 0.05f64..0.5,
        load in 0.2f64..1.5,
    )| {
        let n = case.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let shape = Shape::new(capacity, rate).unwrap();
        let key = format!("tb:prop:{n}");
        let (events, local, _) = rt.block_on(hammer(
            &url,
            &key,
            shape,
            cost,
            (lease_ms, fraction),
            // Eight callers offering `load` times the rate.
            Duration::from_secs_f64(8.0 * cost as f64 / (load * rate)),
            Duration::from_millis(400),
            Duration::from_millis(150),
        ));
        local_total.fetch_add(local, std::sync::atomic::Ordering::Relaxed);
        let excess = worst_excess(events, shape);
        prop_assert!(excess <= 1e-6, "{excess} tokens over the bound ({local} from leases)");
    });
    assert!(
        local_total.into_inner() > 0,
        "no take was answered from a lease"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn most_takes_of_a_hot_key_within_its_limit_need_no_call() {
    let server = RedisServer::start().await;
    // 8 callers, a take each 2 ms: about 4,000 a second, within a limit of 10,000 a second.
    let shape = Shape::new(20_000.0, 10_000.0).unwrap();
    let (events, local, span) = hammer(
        &server.url(),
        "tb:hot",
        shape,
        1,
        (250, 0.1),
        Duration::from_millis(2),
        Duration::from_secs(1),
        Duration::ZERO,
    )
    .await;
    let admitted = events.len() as u64;
    assert!(worst_excess(events, shape) <= 1e-6);
    eprintln!("{local} of {admitted} takes answered from leases in {span} µs");
    assert!(
        local * 10 >= admitted * 8,
        "{local} of {admitted} from leases"
    );
    // Every lease came back at close: nothing is leased out, and the bucket holds what was not
    // spent (within the refill since).
    let mut conn = server.connection().await;
    let (_, leased) = bucket(&mut conn, "tb:hot").await;
    assert_eq!(leased, 0.0);
}

/// All-or-nothing groups (an Envoy request's descriptors) through two leasing replicas: a roomy
/// bucket and a tight one (drained within the run), with a refill too slow to matter. A group is answered from leases only
/// whole, so the roomy bucket is charged for exactly the groups allowed, and the tight one allows
/// no more than its capacity in all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_spends_from_leases_only_whole() {
    let server = RedisServer::start().await;
    let mut conn = server.connection().await;
    let roomy = Shape::new(10_000.0, 0.000_1).unwrap();
    let tight = Shape::new(2_000.0, 0.000_1).unwrap();
    // Leases spent for 300 ms are counted for 600: a busy machine's late sweep still returns them
    // in time (a return after that would lose its tokens, and the exact figures below with them).
    let replicas = [
        std::sync::Arc::new(replica(&server.url(), 300, 0.2)),
        std::sync::Arc::new(replica(&server.url(), 300, 0.2)),
    ];
    let start = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..8 {
        let b = replicas[i % 2].clone();
        tasks.push(tokio::spawn(async move {
            let (mut allowed, mut local) = (0u64, 0u64);
            while start.elapsed() < Duration::from_millis(1_500) {
                let reqs = [
                    BucketRequest::new("tb:group:roomy", roomy, Op::Take(1)),
                    BucketRequest::new("tb:group:tight", tight, Op::Take(1)),
                ];
                let d: Vec<Decision> = b
                    .decide_group(&reqs, true)
                    .await
                    .into_iter()
                    .map(Result::unwrap)
                    .collect();
                let whole = d[0].allowed && d[1].allowed;
                allowed += u64::from(whole);
                assert_eq!(d[0].granted, u64::from(whole), "{d:?}");
                assert_eq!(d[1].granted, u64::from(whole), "{d:?}");
                assert_eq!(d[0].without_backend, d[1].without_backend, "{d:?}");
                local += u64::from(whole && d[0].without_backend);
                tokio::time::sleep(Duration::from_micros(500)).await;
            }
            (allowed, local)
        }));
    }
    let (mut allowed, mut local) = (0, 0);
    for t in tasks {
        let (a, l) = t.await.unwrap();
        allowed += a;
        local += l;
    }
    for r in &replicas {
        r.close().await;
    }
    eprintln!("{allowed} groups allowed, {local} of them from leases");
    assert!(
        allowed <= 2_000,
        "{allowed} groups allowed of a bucket of 2,000"
    );
    assert!(
        allowed >= 1_900,
        "only {allowed} of 2,000: leases kept tokens from the group"
    );
    assert!(local > 0, "no group answered from leases");
    let (r, leased_r) = bucket(&mut conn, "tb:group:roomy").await;
    let (t, leased_t) = bucket(&mut conn, "tb:group:tight").await;
    assert_eq!((leased_r, leased_t), (0.0, 0.0), "every lease came back");
    assert!((r - (10_000.0 - allowed as f64)).abs() < 1e-2, "roomy: {r}");
    assert!((t - (2_000.0 - allowed as f64)).abs() < 1e-2, "tight: {t}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settle_and_refund_through_another_replica_stay_exact_while_a_lease_is_out() {
    let server = RedisServer::start().await;
    let mut conn = server.connection().await;
    // A refill too slow to matter: every figure below is exact to a thousandth.
    let shape = Shape::new(1_000.0, 0.000_1).unwrap();
    let a = replica(&server.url(), 60_000, 0.1);
    let b = RedisBackend::new(&server.url(), Duration::from_secs(2)).unwrap();
    let key = "tb:exact";
    let mut spent_a = warm(&a, key, shape, Duration::from_millis(1)).await;
    let (held, _) = a.leases_held();
    assert_eq!(held, 1);
    let (tokens, leased) = bucket(&mut conn, key).await;
    assert!(leased > 0.0, "the lease is counted out of the bucket");
    // Through B: a reservation of 50 settled at 20 (30 back), and a take of 10 refunded.
    let reserve = Reserve {
        id: "r-exact",
        ttl_ms: 60_000,
    };
    let mut r = BucketRequest::new(key, shape, Op::Take(50));
    r.reserve = Some(reserve);
    assert!(b.decide(r).await.unwrap().allowed);
    b.settle(SettleRequest {
        key,
        shape,
        id: "r-exact",
        actual: 20,
    })
    .await
    .unwrap();
    assert!(take(&b, key, shape, 10).await.allowed);
    b.decide(BucketRequest::new(key, shape, Op::Refund(10)))
        .await
        .unwrap();
    let (after, still) = bucket(&mut conn, key).await;
    assert!(
        (after - (tokens - 20.0)).abs() < 1e-3,
        "{tokens} -> {after}"
    );
    assert_eq!(still, leased);
    // A spends more from its lease, then gives the rest back at close.
    for _ in 0..5 {
        let d = take(&a, key, shape, 1).await;
        assert!(d.allowed && d.without_backend);
        spent_a += 1;
    }
    a.close().await;
    assert_eq!(a.leases_held(), (0, 0));
    let (end, leased) = bucket(&mut conn, key).await;
    assert_eq!(leased, 0.0);
    let expected = 1_000.0 - spent_a as f64 - 20.0;
    assert!((end - expected).abs() < 1e-2, "{end} != {expected}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shape_change_returns_the_lease_in_the_same_call() {
    let server = RedisServer::start().await;
    let mut conn = server.connection().await;
    let old = Shape::new(1_000.0, 0.000_1).unwrap();
    let new = Shape::new(1_200.0, 0.000_1).unwrap();
    let a = replica(&server.url(), 60_000, 0.1);
    let key = "tb:reshaped";
    let spent = warm(&a, key, old, Duration::from_millis(1)).await;
    assert!(bucket(&mut conn, key).await.1 > 0.0);
    let d = take(&a, key, new, 1).await;
    assert!(
        d.allowed && !d.without_backend,
        "asked of Redis under the new shape"
    );
    let (tokens, leased) = bucket(&mut conn, key).await;
    // The old shape's lease came back before the take (a new one may have been granted with it:
    // count it as unspent).
    let (_, unspent) = a.leases_held();
    assert_eq!(leased, unspent as f64);
    let expected = 1_000.0 - spent as f64 - 1.0 - unspent as f64;
    assert!((tokens - expected).abs() < 1e-2, "{tokens} != {expected}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_with_a_lease_out_loses_at_most_that_lease() {
    let redis = RedisServer::start().await;
    let mut conn = redis.connection().await;
    let env = [
        ("QUOTA_LEASES", "true"),
        ("LEASE_MS", "1500"),
        ("REDIS_TIMEOUT_MS", "2000"),
        ("DEBUG_ENDPOINTS", "true"),
    ];
    let a = Sluicegate::start(&["--redis-url", &redis.url()], &env).await;
    let mut client = a.client().await;
    let (capacity, rate) = (1_000.0, 5.0);
    let started = Instant::now();
    // Warm the key on A until it answers from a lease.
    let mut admitted = 0u64;
    let mut local = false;
    while !local && started.elapsed() < Duration::from_secs(3) {
        let req = crate::support::ask("victim", capacity, rate, 1);
        let answer = client.should_allow(req).await.unwrap().into_inner();
        admitted += u64::from(answer.allowed);
        let m = a.metrics().await;
        local = crate::support::metric(&m, "sluicegate_lease_answers_total") > 0.0;
    }
    assert!(local, "no lease on A");
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*victim*")
        .query_async(&mut conn)
        .await
        .unwrap();
    let key = keys.first().expect("the bucket's key").clone();
    let (_, leased) = bucket(&mut conn, &key).await;
    assert!(leased > 0.0, "A holds a lease");
    // The status page's figures say so too.
    let (status, body) = crate::support::http_get(&a.http_url("/debug/status"))
        .await
        .expect("/debug/status");
    assert_eq!(status, 200);
    let s: serde_json::Value = serde_json::from_str(&body).unwrap();
    let l = &s["leases"];
    assert_eq!(l["held"], 1, "{l}");
    assert!(
        l["granted"].as_u64() >= Some(1) && l["answers"].as_u64() >= Some(1),
        "{l}"
    );
    assert!(l["leased_tokens"].as_f64() >= Some(leased), "{l}");
    // SIGKILL: no lease goes back.
    drop(client);
    drop(a);
    // Whatever A held is lost to B, and nothing more: B takes all there is.
    let b = RedisBackend::new(&redis.url(), Duration::from_secs(2)).unwrap();
    let shape = Shape::new(capacity, rate).unwrap();
    let d = b
        .decide(BucketRequest::new(&key, shape, Op::TakeUpTo(2_000)))
        .await
        .unwrap();
    let elapsed = started.elapsed().as_secs_f64();
    let total = admitted as f64 + d.granted as f64;
    assert!(
        total <= capacity + rate * elapsed,
        "{total} admitted in {elapsed:.2} s"
    );
    assert!(
        total + leased >= capacity - 1.0,
        "{total} admitted, {leased} leased: lost more than the lease"
    );
    // Once the lease's generation has ended, the whole capacity is the bucket's again.
    // (Counted for twice LEASE_MS from its grant.)
    tokio::time::sleep(Duration::from_millis(3_100)).await;
    let full = b
        .decide(BucketRequest::new(&key, shape, Op::Refund(2_000)))
        .await
        .unwrap();
    assert_eq!(full.tokens_remaining, capacity);
}

/// Offered load at and over the limit through two replicas with leases: every run's own check
/// passes, and together they admit at least 90% of what the bucket allows (leases stop near the
/// limit, so no replica sits on tokens the other could use).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_limit_two_leasing_replicas_admit_nine_tenths_of_the_bound() {
    let redis = RedisServer::start().await;
    let env = [
        ("QUOTA_LEASES", "true"),
        ("REDIS_TIMEOUT_MS", "2000"),
        ("MAX_QUEUE_MS", "1000"),
    ];
    let a = Sluicegate::start(&["--redis-url", &redis.url()], &env).await;
    let b = Sluicegate::start(&["--redis-url", &redis.url()], &env).await;
    let dir = tempfile::tempdir().unwrap();
    let (capacity, rate) = (600.0, 300.0);
    // Open loop, each at half the rate: together exactly the limit; then closed loop, far over.
    for (name, load) in [
        ("at", vec!["--rps", "150"]),
        ("over", vec!["--concurrency", "8"]),
    ] {
        let runs: Vec<_> = [&a, &b]
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let json = dir.path().join(format!("{name}{i}.json"));
                let mut cmd = std::process::Command::new(workspace_bin("sluicegate-load"));
                cmd.args(["--target", &t.grpc_url(), "--api", "should-allow"])
                    .args(["--keys", "1", "--key-prefix", name])
                    .args(["--capacity", &capacity.to_string()])
                    .args(["--rate", &rate.to_string()])
                    .args(&load)
                    .args(["--duration", "3s", "--check-bound", "--timeout", "2s"])
                    .arg("--json")
                    .arg(&json);
                (cmd.spawn().expect("spawn sluicegate-load"), json)
            })
            .collect();
        let runs = crate::support::LoadRuns::wait(runs).await;
        for j in &runs.reports {
            assert_eq!(j["bound"]["violations"], 0, "{j}");
        }
        let (admitted, offered) = (runs.sum("allowed"), runs.sum("requests"));
        let bound = runs.bound(capacity, rate);
        eprintln!("{name} the limit: admitted {admitted} of {offered} offered, bound {bound:.0}");
        assert!(admitted <= bound, "admitted {admitted} > {bound}");
        if name == "over" {
            assert!(
                offered > 1.5 * bound,
                "not over the limit: {offered} offered"
            );
        }
        let reachable = offered.min(bound);
        assert!(
            admitted >= 0.9 * reachable,
            "{name} the limit: admitted {admitted} of {reachable}"
        );
    }
    let mut leases = 0.0;
    for t in [&a, &b] {
        leases += crate::support::metric(&t.metrics().await, "sluicegate_leases_total");
    }
    assert!(leases > 0.0, "no lease was granted");
}

/// Through the Envoy API and a real rules reload: a lease taken under the old shape goes back in
/// the key's next call after the reload, and what the bucket counts as leased out is the new
/// lease's alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rules_reload_that_changes_the_shape_returns_the_lease() {
    use crate::support::envoy::{RateLimitServiceClient, descriptor, request};
    let redis = RedisServer::start().await;
    let mut conn = redis.connection().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rules.yaml");
    let rules = |rpu: u32| {
        format!(
            "domain: edge\ndescriptors:\n  - key: api_key\n    rate_limit: {{ unit: minute, requests_per_unit: {rpu} }}\n"
        )
    };
    std::fs::write(&path, rules(100_000)).unwrap();
    let env = [("QUOTA_LEASES", "true"), ("LEASE_MS", "60000")];
    let t = Sluicegate::start(
        &[
            "--redis-url",
            &redis.url(),
            "--rules",
            path.to_str().unwrap(),
        ],
        &env,
    )
    .await;
    let mut c = RateLimitServiceClient::connect(t.grpc_url()).await.unwrap();
    let hot = || request("edge", vec![descriptor(&[("api_key", "hot")])]);
    let metric = async |name: &str| crate::support::metric(&t.metrics().await, name);
    // Taken fast enough for the largest lease: a tenth of 100,000.
    let started = Instant::now();
    while metric("sluicegate_lease_answers_total").await == 0.0 {
        assert!(started.elapsed() < Duration::from_secs(5), "no lease");
        for _ in 0..50 {
            c.should_rate_limit(hot()).await.unwrap();
        }
    }
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*hot*")
        .query_async(&mut conn)
        .await
        .unwrap();
    let key = keys.first().expect("the bucket's key").clone();
    let (_, before) = bucket(&mut conn, &key).await;
    assert!(before > 5_000.0, "the old shape's lease: {before}");
    assert_eq!(metric("sluicegate_lease_returned_tokens_total").await, 0.0);

    std::fs::write(&path, rules(50_000)).unwrap();
    crate::support::eventually(Duration::from_secs(10), "the new rules", async || {
        let r = c
            .should_rate_limit(request("edge", vec![descriptor(&[("api_key", "probe")])]))
            .await
            .unwrap()
            .into_inner();
        r.statuses[0]
            .current_limit
            .as_ref()
            .map(|l| l.requests_per_unit)
            == Some(50_000)
    })
    .await;
    let answer = c.should_rate_limit(hot()).await.unwrap().into_inner();
    assert_eq!(answer.statuses[0].code, crate::support::envoy::OK);
    let (_, after) = bucket(&mut conn, &key).await;
    assert!(
        after <= 5_000.0,
        "leased out after the reload: {after} (the old lease was {before})"
    );
    assert!(metric("sluicegate_lease_returned_tokens_total").await > 0.0);
}
