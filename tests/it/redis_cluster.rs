//! Scale-out on real Redis: a 3-master, 3-replica cluster and a sentinel group, several sluicegate
//! replicas, and failovers survived without restarting sluicegate.

use std::time::{Duration, Instant};

use crate::support::{
    RedisCluster, RedisSentinels, Sluicegate, ask, eventually, http_get, should_allow,
};
use sluicegate_core::Shape;

/// One cluster at a time: several six-node clusters at once on two cores could miss their own
/// node timeouts and fail over by themselves.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn on_cluster(cluster: &RedisCluster, extra: &[&str]) -> Sluicegate {
    let mut args = vec!["--redis-type", "cluster"];
    args.extend_from_slice(extra);
    Sluicegate::start(&args, &[("REDIS_URL", &cluster.url())]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_keys_over_every_master_through_two_replicas() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let cluster = RedisCluster::start(3, 1).await;
    let sluicegates = [
        on_cluster(&cluster, &["--redis-timeout-ms", "2000"]).await,
        on_cluster(&cluster, &["--redis-timeout-ms", "2000"]).await,
    ];
    let clients = [sluicegates[0].client().await, sluicegates[1].client().await];
    // Each of 1000 keys (capacity 2) asked 3 times, alternating replicas, 100 keys at a time.
    let mut allowed = vec![0u32; 1000];
    for chunk in (0..1000).collect::<Vec<usize>>().chunks(100) {
        let calls = chunk
            .iter()
            .flat_map(|&k| (0..3).map(move |i| (k, i)))
            .map(|(k, i)| {
                let mut c = clients[(k + i) % 2].clone();
                async move {
                    let r = should_allow(&mut c, ask(&format!("spread-{k}"), 2.0, 1e-6, 1)).await;
                    (k, r.unwrap_or_else(|e| panic!("key {k}: {e}")).allowed)
                }
            });
        for (k, ok) in futures::future::join_all(calls).await {
            allowed[k] += u32::from(ok);
        }
    }
    let wrong: Vec<(usize, u32)> = allowed
        .iter()
        .copied()
        .enumerate()
        .filter(|&(_, a)| a != 2)
        .collect();
    assert!(
        wrong.is_empty(),
        "keys not allowed exactly their capacity: {wrong:?}"
    );
    // The keys really are spread over every master.
    let masters = cluster.masters().await;
    assert_eq!(masters.len(), 3);
    for port in masters {
        let keys = RedisCluster::dbsize(port).await;
        assert!(keys > 200, "master {port} holds only {keys} buckets");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_replicas_one_key_exactly_capacity() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let cluster = RedisCluster::start(3, 1).await;
    let mut clients = Vec::new();
    let mut sluicegates = Vec::new();
    for _ in 0..3 {
        let t = on_cluster(&cluster, &["--redis-timeout-ms", "2000"]).await;
        clients.push(t.client().await);
        sluicegates.push(t);
    }
    let calls = (0..300).map(|i| {
        let mut c = clients[i % 3].clone();
        tokio::spawn(async move { should_allow(&mut c, ask("hot-key", 100.0, 1e-6, 1)).await })
    });
    let mut per_replica = [0; 3];
    for (i, r) in futures::future::join_all(calls)
        .await
        .into_iter()
        .enumerate()
    {
        if r.unwrap()
            .unwrap_or_else(|e| panic!("call {i}: {e}"))
            .allowed
        {
            per_replica[i % 3] += 1;
        }
    }
    assert_eq!(per_replica.iter().sum::<i32>(), 100, "{per_replica:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_master_killed_under_load() {
    let _turn = ONE_AT_A_TIME.lock().await;
    const TIMEOUT_MS: u64 = 200;
    let mut cluster = RedisCluster::start(3, 1).await;
    let t = on_cluster(&cluster, &["--redis-timeout-ms", &TIMEOUT_MS.to_string()]).await;
    let client = t.client().await;
    let keys: Vec<String> = (0..60).map(|i| format!("failover-{i}")).collect();
    let bucket =
        |k: &str| sluicegate::api::bucket_key("tb:user:", k, Shape::new(1e6, 1e6).unwrap());
    let victim = cluster.master_of(&bucket(&keys[0])).await;
    let mut victim_keys = Vec::new();
    for k in &keys {
        if cluster.master_of(&bucket(k)).await == victim {
            victim_keys.push(k.clone());
        }
    }
    assert!(!victim_keys.is_empty());

    // Calls flow on every key; each answer (ok or error) is recorded with its time and latency.
    let started = Instant::now();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut workers = Vec::new();
    for w in 0..6 {
        let (mut c, keys, stop) = (client.clone(), keys.clone(), stop.clone());
        workers.push(tokio::spawn(async move {
            let mut log = Vec::new();
            let mut i = w;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let key = &keys[i % keys.len()];
                let sent = Instant::now();
                let ok = should_allow(&mut c, ask(key, 1e6, 1e6, 1)).await.is_ok();
                log.push((
                    key.clone(),
                    sent.duration_since(started),
                    sent.elapsed(),
                    ok,
                ));
                i += 6;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            log
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let killed_at = started.elapsed();
    cluster.kill(victim);
    // One dead shard never takes the replica out of service: the other masters still answer.
    for _ in 0..10 {
        assert_eq!(http_get(&t.http_url("/readyz")).await.unwrap().0, 200);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Keys of the dead master answer again once a replica is promoted: bounded, no restart.
    let mut c = client.clone();
    let probe = victim_keys[0].clone();
    let recovered = Instant::now();
    eventually(
        Duration::from_secs(30),
        "keys of the killed master to answer again",
        async || should_allow(&mut c, ask(&probe, 1e6, 1e6, 1)).await.is_ok(),
    )
    .await;
    let recovered_at = started.elapsed();
    eprintln!(
        "failover: master {victim} killed at {killed_at:?}, keys answered again after {:?}",
        recovered.elapsed()
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut log = Vec::new();
    for w in workers {
        log.extend(w.await.unwrap());
    }

    let slack = Duration::from_millis(TIMEOUT_MS + 800);
    let slowest = log.iter().map(|e| e.2).max().unwrap();
    assert!(slowest < slack, "a call hung for {slowest:?}");
    let errors: Vec<_> = log.iter().filter(|e| !e.3).collect();
    assert!(
        !errors.is_empty(),
        "killing a master must show up as errors for its keys"
    );
    for (key, at, took, _) in &errors {
        // A call may have been sent just before the kill and failed because of it: what counts is
        // when it ended.
        assert!(
            *at + *took + Duration::from_millis(10) >= killed_at,
            "{key} failed before the kill, at {at:?}"
        );
        assert!(
            *at <= recovered_at + Duration::from_millis(1500),
            "{key} failed at {at:?}, after recovery at {recovered_at:?}"
        );
    }
    // Failures stay with the dead master's slots: keys on the other masters keep their real
    // answers throughout.
    let elsewhere: Vec<_> = errors
        .iter()
        .filter(|e| !victim_keys.contains(&e.0))
        .collect();
    eprintln!(
        "failover: {} errors, {} of them for keys on healthy masters",
        errors.len(),
        elsewhere.len()
    );
    assert!(
        elsewhere.is_empty(),
        "healthy masters' keys failed: {elsewhere:?}"
    );
    let late_ok = log
        .iter()
        .filter(|e| e.1 > recovered_at + Duration::from_millis(1500) && e.3)
        .count();
    assert!(late_ok > 0, "calls flowed after recovery");
    let (_, metrics) = http_get(&t.http_url("/metrics")).await.unwrap();
    let counted: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("sluicegate_backend_errors_total{backend=\"redis\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(counted >= 1.0, "errors are counted:\n{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sentinel_failover_is_followed() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let mut group = RedisSentinels::start().await;
    let t = Sluicegate::start(
        &["--redis-type", "sentinel", "--redis-timeout-ms", "200"],
        &[("REDIS_URL", &group.url())],
    )
    .await;
    let mut c = t.client().await;
    eventually(
        Duration::from_secs(10),
        "calls through the sentinel-named master",
        async || should_allow(&mut c, ask("s", 5.0, 1e-6, 1)).await.is_ok(),
    )
    .await;
    let before = should_allow(&mut c, ask("s", 5.0, 1e-6, 1)).await.unwrap();
    assert!(before.allowed);
    // Replication is asynchronous: make sure the replica has the bucket before the master dies.
    // (WAIT on another connection would not do: it waits for that connection's own writes.)
    let replica = group.replica;
    eventually(
        Duration::from_secs(10),
        "the bucket on the replica",
        async || {
            let Ok(mut conn) = redis::Client::open(format!("redis://127.0.0.1:{replica}/"))
                .unwrap()
                .get_multiplexed_async_connection()
                .await
            else {
                return false;
            };
            let exists: i64 = redis::cmd("EXISTS")
                .arg(sluicegate::api::bucket_key(
                    "tb:user:",
                    "s",
                    Shape::new(5.0, 1e-6).unwrap(),
                ))
                .query_async(&mut conn)
                .await
                .unwrap_or(0);
            exists == 1
        },
    )
    .await;

    group.kill(group.master);
    let started = Instant::now();
    eventually(
        Duration::from_secs(30),
        "sluicegate to follow the promoted replica",
        async || {
            should_allow(&mut c, ask("after", 5.0, 1e-6, 1))
                .await
                .is_ok()
        },
    )
    .await;
    eprintln!("sentinel failover followed after {:?}", started.elapsed());
    // The new master is the old replica, and it carries on the replicated bucket.
    let repl = RedisCluster::info(group.replica, "replication").await;
    assert!(repl.contains("role:master"), "{repl}");
    let r = should_allow(&mut c, ask("s", 5.0, 1e-6, 1))
        .await
        .unwrap_or_else(|e| panic!("after the failover: {e}"));
    assert!(
        r.tokens_remaining < 4.0,
        "the bucket survived the failover: {r:?}"
    );
}

/// One Envoy request whose descriptors' buckets live on different masters: sent together, each
/// decided on its own node.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn envoy_descriptors_across_masters_in_one_request() {
    use crate::support::envoy::{OK, OVER, RateLimitServiceClient, descriptor, request};
    let _turn = ONE_AT_A_TIME.lock().await;
    let cluster = RedisCluster::start(3, 1).await;
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules.yaml");
    std::fs::write(
        &rules,
        "domain: edge\ndescriptors:\n  - key: user\n    rate_limit: { unit: hour, requests_per_unit: 2 }\n",
    )
    .unwrap();
    let t = on_cluster(
        &cluster,
        &[
            "--redis-timeout-ms",
            "2000",
            "--rules",
            rules.to_str().unwrap(),
        ],
    )
    .await;
    let mut c = RateLimitServiceClient::connect(t.grpc_url()).await.unwrap();
    let users = ["ann", "bob", "cy", "dee", "eve", "fay", "gus", "hal"];
    let req = request(
        "edge",
        users.iter().map(|u| descriptor(&[("user", u)])).collect(),
    );
    for (round, (code, remaining)) in [(OK, 1), (OK, 0), (OVER, 0)].into_iter().enumerate() {
        let r = c.should_rate_limit(req.clone()).await.unwrap().into_inner();
        assert_eq!(r.overall_code, code, "round {round}");
        assert!(
            r.statuses.iter().all(|s| s.limit_remaining == remaining),
            "round {round}: {:?}",
            r.statuses
        );
    }
    let mut holding = 0;
    for port in cluster.masters().await {
        let keys = RedisCluster::dbsize(port).await;
        holding += usize::from(keys > 0);
    }
    assert!(holding >= 2, "the 8 buckets landed on {holding} master(s)");
}

/// An all-or-nothing batch whose buckets live on several masters, vetoed by one denial: the
/// parts on other masters were charged and are given back, so their answers say they took
/// nothing (`granted` 0; before, the given-back takes still said 1, and what refunds a caller's
/// takes reads `granted`), carry no reservation id, and every bucket is full again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_vetoed_batch_across_masters_takes_and_reserves_nothing() {
    use sluicegate_proto::sluicegate::v1::ShouldAllowBatchRequest;
    let _turn = ONE_AT_A_TIME.lock().await;
    let cluster = RedisCluster::start(3, 1).await;
    // Without the deny cache, which would refuse the drained bucket before any call (and the
    // batch would then charge nothing anywhere).
    let t = Sluicegate::start(
        &["--redis-type", "cluster", "--redis-timeout-ms", "2000"],
        &[("REDIS_URL", &cluster.url()), ("LOCAL_DENY_CACHE", "false")],
    )
    .await;
    let mut c = t.client().await;
    let reserve = |key: &str| sluicegate_proto::sluicegate::v1::ShouldAllowRequest {
        reserve_ttl_ms: 60_000,
        ..ask(key, 5.0, 0.001, 1)
    };
    // A bucket of 5 emptied: the batch's first request is denied.
    should_allow(&mut c, ask("drained", 5.0, 0.001, 5))
        .await
        .unwrap();
    let keys: Vec<String> = (0..12).map(|i| format!("spread{i}")).collect();
    let batch = ShouldAllowBatchRequest {
        requests: std::iter::once(reserve("drained"))
            .chain(keys.iter().map(|k| reserve(k)))
            .collect(),
        all_or_nothing: true,
    };
    let r = c.should_allow_batch(batch).await.unwrap().into_inner();
    assert!(!r.allowed && !r.responses[0].allowed, "{r:?}");
    for (key, answer) in keys.iter().zip(&r.responses[1..]) {
        assert!(answer.allowed, "{key} alone would pass: {answer:?}");
        assert_eq!(answer.granted, 0, "{key}: {answer:?}");
        assert!(answer.reservation_id.is_empty(), "{key}: {answer:?}");
        let mut probe = ask(key, 5.0, 0.001, 1);
        probe.dry_run = true;
        let left = should_allow(&mut c, probe).await.unwrap().tokens_remaining;
        assert!((left - 5.0).abs() < 0.01, "{key}: {left}");
    }
}

/// A sentinel-managed master that requires a password: `redis://:password@master_name` gives the
/// master's credentials (the sentinels themselves need none here).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sentinel_master_with_a_password() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let group = RedisSentinels::start_with_password(Some("s3cret")).await;
    let sentinels: Vec<String> = group
        .sentinels
        .iter()
        .map(|p| format!("127.0.0.1:{p}"))
        .collect();
    let url = format!(
        "redis://:s3cret@{},{}",
        crate::support::SENTINEL_MASTER,
        sentinels.join(",")
    );
    let t = Sluicegate::start(
        &["--redis-type", "sentinel", "--redis-timeout-ms", "500"],
        &[("REDIS_URL", &url)],
    )
    .await;
    let mut c = t.client().await;
    eventually(
        Duration::from_secs(10),
        "a decision through the sentinels",
        async || should_allow(&mut c, ask("pw", 5.0, 1e-6, 1)).await.is_ok(),
    )
    .await;
    // Without the password the master refuses: an error, never an answer.
    let plain = format!(
        "{},{}",
        crate::support::SENTINEL_MASTER,
        sentinels.join(",")
    );
    let t2 = Sluicegate::start(
        &["--redis-type", "sentinel", "--redis-timeout-ms", "300"],
        &[("REDIS_URL", &plain)],
    )
    .await;
    let mut c2 = t2.client().await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let err = should_allow(&mut c2, ask("pw", 5.0, 1e-6, 1))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
}

/// Slots move under load (`redis-cli --cluster reshard`, the keys migrating one by one): a bucket
/// whose slot is moving, or has just moved, is followed (ASK, MOVED) per bucket, the other buckets
/// of the same script call are answered as usual, and no call fails. With FAILURE_MODE=error any
/// failure would be an error here; and every key still admits exactly its capacity.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slots_resharded_under_load() {
    use std::sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
    };
    let _turn = ONE_AT_A_TIME.lock().await;
    const KEYS: usize = 1000;
    let cluster = RedisCluster::start(3, 0).await;
    let t = on_cluster(&cluster, &["--redis-timeout-ms", "2000"]).await;
    let client = t.client().await;
    let masters = cluster.masters().await;
    let id = |port: u16| async move {
        let out = std::process::Command::new("redis-cli")
            .args(["-p", &port.to_string(), "cluster", "myid"])
            .output()
            .expect(crate::support::INSTALL_REDIS);
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let (from, to) = (id(masters[0]).await, id(masters[1]).await);
    // Every key once, so the migration has buckets to move.
    let allowed: Arc<Vec<AtomicU64>> = Arc::new((0..KEYS).map(|_| AtomicU64::new(0)).collect());
    let errors = Arc::new(AtomicU64::new(0));
    let first_error = Arc::new(std::sync::Mutex::new(None::<String>));
    let stop = Arc::new(AtomicBool::new(false));
    let callers: Vec<_> = (0..32)
        .map(|c| {
            let (mut client, allowed, errors, first_error, stop) = (
                client.clone(),
                allowed.clone(),
                errors.clone(),
                first_error.clone(),
                stop.clone(),
            );
            tokio::spawn(async move {
                let mut k = c * 31;
                while !stop.load(Relaxed) {
                    k = (k + 7) % KEYS;
                    match should_allow(&mut client, ask(&format!("move-{k}"), 2.0, 1e-6, 1)).await {
                        Ok(r) => {
                            allowed[k].fetch_add(u64::from(r.allowed), Relaxed);
                        }
                        Err(e) => {
                            errors.fetch_add(1, Relaxed);
                            first_error.lock().unwrap().get_or_insert(e.to_string());
                        }
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let reshard = tokio::task::spawn_blocking(move || {
        std::process::Command::new("redis-cli")
            .args([
                "--cluster",
                "reshard",
                &format!("127.0.0.1:{}", masters[0]),
                "--cluster-from",
                &from,
                "--cluster-to",
                &to,
                "--cluster-slots",
                "1000",
                "--cluster-yes",
                "--cluster-pipeline",
                "10",
            ])
            .output()
            .expect(crate::support::INSTALL_REDIS)
    });
    let out = reshard.await.unwrap();
    assert!(
        out.status.success(),
        "reshard: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A little longer: the moves' last MOVED answers are followed too.
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Relaxed);
    for c in callers {
        c.await.unwrap();
    }
    let errors = errors.load(Relaxed);
    assert_eq!(
        errors,
        0,
        "calls failed while slots moved; first: {:?}",
        first_error.lock().unwrap()
    );
    let over: Vec<(usize, u64)> = allowed
        .iter()
        .map(|a| a.load(Relaxed))
        .enumerate()
        .filter(|&(_, a)| a > 2)
        .collect();
    assert!(
        over.is_empty(),
        "keys admitted past their capacity: {over:?}"
    );
}
