//! In-flight limits through `sluicegate.v1` Acquire, Release and Renew: the arithmetic against a
//! model (random sequences, expiry included), memory and Redis alike, exactness across two
//! replicas, and what a caller gets for bad input or a backend that is down.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use sluicegate_core::backend::memory::ManualClock;
use sluicegate_core::backend::{Backend, LeaseRequest, MemoryBackend, RedisBackend};
use sluicegate_core::{InFlight, LeaseOp};
use sluicegate_proto::sluicegate::v1::{AcquireRequest, ReleaseRequest, RenewRequest};

use crate::support::{RedisServer, Sluicegate};

/// The model: each key's leases as id -> expiry, and the refused paired acquires whose release is
/// still to come as id -> (count, expiry).
#[derive(Default)]
struct Model(HashMap<String, (Held, Refused)>);

/// id -> expiry.
type Held = HashMap<String, f64>;
/// id -> (refusals whose release is to come, expiry).
type Refused = HashMap<String, (u32, f64)>;

impl Model {
    fn apply(&mut self, now: f64, key: &str, id: &str, op: LeaseOp) -> (bool, u32, u32) {
        let (leases, refused) = self.0.entry(key.to_string()).or_default();
        let before = leases.len();
        leases.retain(|_, e| *e > now);
        refused.retain(|_, (_, e)| *e > now);
        let expired = (before - leases.len()) as u32;
        let done = match op {
            LeaseOp::Acquire {
                max,
                ttl_ms,
                paired,
            } => {
                let free = !leases.contains_key(id) && leases.len() < max as usize;
                if free {
                    leases.insert(id.to_string(), now + f64::from(ttl_ms));
                } else if paired {
                    let r = refused.entry(id.to_string()).or_insert((0, 0.0));
                    *r = (r.0 + 1, now + f64::from(ttl_ms));
                }
                free
            }
            // A refused paired acquire's own release frees nothing.
            LeaseOp::Release if refused.contains_key(id) => {
                let r = refused.get_mut(id).unwrap();
                r.0 -= 1;
                if r.0 == 0 {
                    refused.remove(id);
                }
                false
            }
            LeaseOp::Release => leases.remove(id).is_some(),
            LeaseOp::Renew { ttl_ms } => match leases.get_mut(id) {
                Some(e) => {
                    *e = now + f64::from(ttl_ms);
                    true
                }
                None => false,
            },
        };
        (done, leases.len() as u32, expired)
    }
}

#[derive(Clone, Debug)]
enum Step {
    /// (key, id, op)
    Op(usize, usize, LeaseOp),
    /// Time passes (ms).
    Wait(u32),
}

fn steps() -> impl proptest::strategy::Strategy<Value = Vec<Step>> {
    use proptest::prelude::*;
    let op = prop_oneof![
        3 => (1u32..4, 1u32..300, any::<bool>())
            .prop_map(|(max, ttl_ms, paired)| LeaseOp::Acquire { max, ttl_ms, paired }),
        2 => Just(LeaseOp::Release),
        1 => (1u32..300).prop_map(|ttl_ms| LeaseOp::Renew { ttl_ms }),
    ];
    let step = prop_oneof![
        5 => (0usize..2, 0usize..5, op).prop_map(|(k, i, op)| Step::Op(k, i, op)),
        1 => (1u32..200).prop_map(Step::Wait),
    ];
    prop::collection::vec(step, 1..60)
}

/// Random acquire (paired or not), release, renew and expiry sequences: the memory backend answers
/// as the model, and never holds more than `max` (the model would say so).
#[test]
fn leases_follow_the_model() {
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};
    let mut runner = TestRunner::new(Config {
        cases: 512,
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&steps(), |steps| {
        let clock = ManualClock::default();
        let backend = MemoryBackend::with_clock(100, clock.clone());
        let mut model = Model::default();
        let mut now = 1.0;
        clock.set_ms(now);
        for (n, step) in steps.iter().enumerate() {
            let (k, i, op) = match step {
                Step::Wait(ms) => {
                    now += f64::from(*ms);
                    clock.set_ms(now);
                    continue;
                }
                Step::Op(k, i, op) => (*k, *i, *op),
            };
            let (key, id) = (format!("k{k}"), format!("id{i}"));
            let got = backend.lease_now(LeaseRequest {
                key: &key,
                id: &id,
                op,
            });
            let want = model.apply(now, &key, &id, op);
            prop_assert_eq!(
                (got.done, got.in_flight, got.expired),
                want,
                "step {} {:?}",
                n,
                step
            );
            if let LeaseOp::Acquire { max, .. } = op {
                prop_assert!(got.done || got.retry_after_ms <= 300 || got.in_flight < max);
            }
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

/// Memory and Redis (`lua/in_flight.lua`) give the same answers to random sequences whose leases
/// outlive the test (Redis's clock cannot be stepped; expiry has its own test below).
#[test]
fn memory_and_redis_answer_alike() {
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};
    let rt = tokio::runtime::Runtime::new().unwrap();
    let server = rt.block_on(RedisServer::start());
    let _runtime = rt.enter();
    let redis = RedisBackend::new(&server.url(), Duration::from_secs(2)).unwrap();
    let case = AtomicUsize::new(0);
    let mut runner = TestRunner::new(Config {
        cases: 48,
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&steps(), |steps| {
        let case = case.fetch_add(1, Ordering::Relaxed);
        let memory = MemoryBackend::new(100);
        for step in &steps {
            let Step::Op(k, i, op) = step else { continue };
            // A minute-long lease: nothing expires while the case runs.
            let op = match *op {
                LeaseOp::Acquire { max, paired, .. } => LeaseOp::Acquire {
                    max,
                    ttl_ms: 60_000,
                    paired,
                },
                LeaseOp::Renew { .. } => LeaseOp::Renew { ttl_ms: 60_000 },
                LeaseOp::Release => LeaseOp::Release,
            };
            let (key, id) = (format!("case{case}:k{k}"), format!("id{i}"));
            let req = LeaseRequest {
                key: &key,
                id: &id,
                op,
            };
            let (m, r) = rt.block_on(async { (memory.lease(req).await, redis.lease(req).await) });
            let (m, r) = (m.unwrap(), r.unwrap());
            prop_assert_eq!(
                (m.done, m.in_flight, m.expired),
                (r.done, r.in_flight, r.expired)
            );
            if !r.done && matches!(op, LeaseOp::Acquire { .. }) && r.in_flight > 0 {
                prop_assert!(r.retry_after_ms > 55_000, "{:?}", r);
            }
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

/// In Redis a lease expires after its TTL by the server's clock, is counted as expired by the
/// next call, and its key goes with its last lease.
#[tokio::test]
async fn redis_leases_expire_and_their_key_goes_with_them() {
    let server = RedisServer::start().await;
    let redis = RedisBackend::new(&server.url(), Duration::from_secs(2)).unwrap();
    let lease = |id: &'static str, op| LeaseRequest {
        key: "exp|in_flight",
        id,
        op,
    };
    let acquire = LeaseOp::Acquire {
        max: 1,
        ttl_ms: 300,
        paired: false,
    };
    let first: InFlight = redis.lease(lease("a", acquire)).await.unwrap();
    assert!(first.done);
    let refused = redis.lease(lease("b", acquire)).await.unwrap();
    assert!(!refused.done);
    assert!((1..=300).contains(&refused.retry_after_ms), "{refused:?}");
    let mut conn = server.connection().await;
    let ttl: i64 = redis::cmd("PTTL")
        .arg("exp|in_flight")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(
        (60_000..=60_300).contains(&ttl),
        "the key outlives its last lease by a minute: {ttl}"
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    let after = redis.lease(lease("b", acquire)).await.unwrap();
    assert_eq!((after.done, after.in_flight, after.expired), (true, 1, 1));
    let gone = redis.lease(lease("b", LeaseOp::Release)).await.unwrap();
    assert_eq!((gone.done, gone.in_flight), (true, 0));
    let exists: i64 = redis::cmd("EXISTS")
        .arg("exp|in_flight")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(exists, 0, "nothing left behind");
}

/// 500 callers at once over two replicas on one Redis, at most 8 in flight per key, each holding its
/// slot 40-80 ms once granted and trying again until it is: from the callers' own times (granted
/// answer received .. release sent, inside the real hold), never more than 8 held at once; nearly
/// 8 is reached (the check could see a breach), and every caller got its turn (releases free).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_more_than_max_across_two_replicas() {
    let redis = RedisServer::start().await;
    let args = ["--redis-url", &redis.url()];
    let (a, b) = (
        Sluicegate::start(&args, &[]).await,
        Sluicegate::start(&args, &[]).await,
    );
    let clients = [a.client().await, b.client().await];
    let held = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let granted = Arc::new(AtomicUsize::new(0));
    let calls = (0..500).map(|i| {
        let mut client = clients[i % 2].clone();
        let (held, most, granted) = (held.clone(), most.clone(), granted.clone());
        tokio::spawn(async move {
            for _ in 0..2000 {
                let answer = client
                    .acquire(AcquireRequest {
                        key: "shared".into(),
                        max_in_flight: 8,
                        lease_ttl_ms: 30_000,
                    })
                    .await
                    .unwrap()
                    .into_inner();
                if !answer.granted {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
                granted.fetch_add(1, Ordering::Relaxed);
                let now = held.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(40 + (i % 40) as u64)).await;
                held.fetch_sub(1, Ordering::SeqCst);
                let released = client
                    .release(ReleaseRequest {
                        key: "shared".into(),
                        lease_id: answer.lease_id,
                    })
                    .await
                    .unwrap()
                    .into_inner();
                assert!(released.released);
                return;
            }
        })
    });
    for call in futures::future::join_all(calls).await {
        call.unwrap();
    }
    let most = most.load(Ordering::SeqCst);
    assert!(most <= 8, "{most} held at once");
    // The callers' windows sit inside the server's holds, so a loaded machine can shave one or two
    // off what they see; a limiter that admitted one at a time would show 1.
    assert!(
        most >= 6,
        "only {most} seen at once: the check could not see a breach"
    );
    assert_eq!(
        granted.load(Ordering::Relaxed),
        500,
        "every caller got a slot in turn"
    );
}

/// What a caller gets: errors naming the field, an idempotent release, a renewal that keeps a
/// lease alive past its first TTL, and FAILURE_MODE's answer while Redis is down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_names_bad_fields_renews_and_degrades() {
    let mut redis = RedisServer::start().await;
    let sluicegate = Sluicegate::start(
        &["--redis-url", &redis.url()],
        &[("FAILURE_MODE", "deny"), ("REDIS_TIMEOUT_MS", "200")],
    )
    .await;
    let mut c = sluicegate.client().await;
    let acquire = |max, ttl| AcquireRequest {
        key: "api".into(),
        max_in_flight: max,
        lease_ttl_ms: ttl,
    };
    for (req, field) in [
        (acquire(0, 0), "max_in_flight"),
        (acquire(1, 86_400_001), "lease_ttl_ms"),
        (
            AcquireRequest {
                key: String::new(),
                ..acquire(1, 0)
            },
            "key",
        ),
    ] {
        let e = c.acquire(req).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().starts_with(field), "{}", e.message());
    }
    let e = c
        .release(ReleaseRequest {
            key: "api".into(),
            lease_id: String::new(),
        })
        .await
        .unwrap_err();
    assert!(e.message().starts_with("lease_id"), "{}", e.message());

    let lease = c.acquire(acquire(1, 1000)).await.unwrap().into_inner();
    assert!(lease.granted && lease.lease_id.len() == 32, "{lease:?}");
    assert_eq!(lease.in_flight, 1);
    // Renewed every 400 ms, it outlives its first second.
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        let renewed = c
            .renew(RenewRequest {
                key: "api".into(),
                lease_id: lease.lease_id.clone(),
                lease_ttl_ms: 1000,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(renewed.granted, "{renewed:?}");
    }
    let refused = c.acquire(acquire(1, 400)).await.unwrap().into_inner();
    assert!(!refused.granted && refused.lease_id.is_empty() && refused.retry_after_ms > 0);
    let release = ReleaseRequest {
        key: "api".into(),
        lease_id: lease.lease_id.clone(),
    };
    let first = c.release(release.clone()).await.unwrap().into_inner();
    assert_eq!((first.released, first.in_flight), (true, 0));
    let again = c.release(release).await.unwrap().into_inner();
    assert!(!again.released, "idempotent: nothing changes");

    redis.kill();
    let degraded = c.acquire(acquire(1, 400)).await.unwrap().into_inner();
    assert!(degraded.degraded && !degraded.granted, "{degraded:?}");
    redis.restart().await;
    crate::support::eventually(Duration::from_secs(15), "leases again", async || {
        c.acquire(acquire(5, 400))
            .await
            .is_ok_and(|a| a.into_inner().granted)
    })
    .await;
}

/// Envoy's paired acquires in Redis: a request naming a held id is refused, and its release (the
/// stream-done call) frees nothing of the holder's slot; a refusal whose release never came is
/// forgotten after its TTL.
#[tokio::test]
async fn redis_remembers_refused_paired_acquires() {
    let server = RedisServer::start().await;
    let redis = RedisBackend::new(&server.url(), Duration::from_secs(2)).unwrap();
    let call = |id: &'static str, op| {
        let redis = &redis;
        async move {
            redis
                .lease(LeaseRequest {
                    key: "paired|in_flight",
                    id,
                    op,
                })
                .await
                .unwrap()
        }
    };
    let paired = |ttl_ms| LeaseOp::Acquire {
        max: 1,
        ttl_ms,
        paired: true,
    };
    assert!(call("a", paired(60_000)).await.done);
    assert!(
        !call("a", paired(60_000)).await.done,
        "an id held is refused"
    );
    assert!(!call("a", paired(60_000)).await.done);
    // The two refused requests' releases come first: the holder keeps its slot.
    for _ in 0..2 {
        let r = call("a", LeaseOp::Release).await;
        assert_eq!((r.done, r.in_flight), (false, 1));
    }
    assert!(!call("b", paired(60_000)).await.done, "still held");
    assert!(!call("b", LeaseOp::Release).await.done, "b's own release");
    assert!(
        call("a", LeaseOp::Release).await.done,
        "the holder's release"
    );

    // A refusal remembered for 300 ms whose release never comes: forgotten after it.
    assert!(call("c", paired(60_000)).await.done);
    assert!(!call("c", paired(300)).await.done);
    tokio::time::sleep(Duration::from_millis(400)).await;
    let freed = call("c", LeaseOp::Release).await;
    assert_eq!((freed.done, freed.in_flight), (true, 0));
}
