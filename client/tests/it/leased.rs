//! Leased quota (`LeasedClient`, `RateLimitLayer::leased`, `sluicegate-load --api leased`) against
//! a real sluicegate in this process: decisions mostly without a call, and never more admitted
//! than the bucket held.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use sluicegate_client::{Client, LeasePolicy, LeasedClient, Request};

use crate::support::sluicegate;

fn hot(cost: u32) -> Request<'static> {
    Request {
        key: "hot",
        cost,
        capacity: 1000.0,
        rate: 0.001,
        ..Default::default()
    }
}

/// 16 callers spend a bucket of 1,000 (no refill to speak of) through leases, asking for 3,200
/// tokens: never more than 1,000 admitted, and once the leases are closed, what was admitted plus
/// what the bucket holds is exactly 1,000 (every unspent token went back); most decisions made no
/// call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_answer_locally_and_the_bucket_adds_up() {
    let t = sluicegate(&[]).await;
    let client = Client::builder(&t.url)
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let leased = Arc::new(LeasedClient::new(client.clone(), LeasePolicy::default()));
    let admitted = Arc::new(AtomicU64::new(0));
    let callers: Vec<_> = (0..16)
        .map(|_| {
            let (leased, admitted) = (leased.clone(), admitted.clone());
            tokio::spawn(async move {
                for _ in 0..200 {
                    let d = leased.decide(hot(1)).await.unwrap();
                    assert!(!d.decision.degraded);
                    if d.decision.allowed {
                        admitted.fetch_add(1, Relaxed);
                        assert!(
                            d.taken.is_some(),
                            "an allowed decision says when it was taken"
                        );
                    }
                }
            })
        })
        .collect();
    for c in callers {
        c.await.unwrap();
    }
    let admitted = admitted.load(Relaxed);
    assert!(admitted <= 1000, "{admitted}");
    let before_close = leased.stats();
    leased.close().await;
    let left = client
        .check(Request {
            dry_run: true,
            ..hot(1)
        })
        .await
        .unwrap()
        .tokens_remaining;
    assert!(
        (admitted as f64 + left - 1000.0).abs() < 0.01,
        "admitted {admitted} + left {left} = 1000"
    );
    let s = leased.stats();
    eprintln!("admitted {admitted}, before close {before_close:?}, after {s:?}");
    assert_eq!(s.decisions, 3200);
    assert!(
        before_close.calls * 5 < before_close.decisions,
        "most decisions made no call: {before_close:?}"
    );
    assert_eq!(s.leased - s.returned, admitted, "{s:?}");
}

/// A cost the lease cannot cover is a denial that keeps nothing, one above the capacity an
/// error, and a dry run goes to sluicegate as it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cost_beyond_what_is_there_is_denied_and_takes_nothing() {
    let t = sluicegate(&[]).await;
    let client = Client::builder(&t.url)
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let leased = LeasedClient::new(client.clone(), LeasePolicy::default());
    let small = |cost| Request {
        key: "small",
        cost,
        capacity: 10.0,
        rate: 0.001,
        ..Default::default()
    };
    assert!(leased.decide(small(8)).await.unwrap().decision.allowed);
    let d = leased.decide(small(5)).await.unwrap();
    assert!(
        !d.decision.allowed && d.decision.retry_after > Duration::ZERO,
        "{d:?}"
    );
    assert!((d.decision.tokens_remaining - 2.0).abs() < 0.01, "{d:?}");
    // A cost above the capacity is the error a plain take gets, and takes nothing.
    let err = leased.decide(small(11)).await.unwrap_err();
    assert!(err.to_string().contains("cost: 11 exceeds"), "{err}");
    leased.close().await;
    let probe = leased
        .decide(Request {
            dry_run: true,
            ..small(1)
        })
        .await
        .unwrap();
    assert!(!probe.local);
    assert!(
        (probe.decision.tokens_remaining - 2.0).abs() < 0.01,
        "{probe:?}"
    );
}

/// The tower layer, leased: a bucket of 20 serves exactly 20 of 30 requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_layer_runs_leased_and_holds_the_limit() {
    use axum::{Router, routing::get};
    use sluicegate_client::RateLimitLayer;
    use tower::ServiceExt as _;

    let t = sluicegate(&[]).await;
    let client = Client::builder(&t.url)
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let layer = RateLimitLayer::new(client, |_: &http::request::Parts| Ok("leased-layer".into()))
        .shape(20.0, 0.001)
        .leased(LeasePolicy {
            max_fraction: 0.5,
            ..LeasePolicy::default()
        });
    let app = Router::new()
        .route("/", get(|| async { "ok" }))
        .layer(layer);
    let mut served = 0;
    for _ in 0..30 {
        let r = app
            .clone()
            .oneshot(
                http::Request::get("/")
                    .body(axum::body::Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        match r.status().as_u16() {
            200 => served += 1,
            429 => assert!(r.headers().contains_key("retry-after")),
            other => panic!("{other}"),
        }
    }
    assert_eq!(served, 20);
}

/// Many keys over time: the ones idle (their leases ended) are swept out and settled, so what the
/// client holds stays bounded, and every unspent token still goes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keys_are_swept_and_their_leases_settled() {
    let t = sluicegate(&[]).await;
    let client = Client::builder(&t.url)
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let policy = LeasePolicy {
        lifetime: Duration::from_millis(20),
        ..LeasePolicy::default()
    };
    let leased = LeasedClient::new(client.clone(), policy);
    let started = std::time::Instant::now();
    let keys: Vec<String> = (0..3000).map(|i| format!("many:{i}")).collect();
    fn ask(key: &str) -> Request<'_> {
        Request {
            key,
            cost: 1,
            capacity: 100.0,
            rate: 0.001,
            ..Default::default()
        }
    }
    for (i, key) in keys.iter().enumerate() {
        assert!(leased.decide(ask(key)).await.unwrap().decision.allowed);
        if i % 500 == 499 {
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
    }
    assert!(leased.held_keys() < 3000, "{}", leased.held_keys());
    leased.close().await;
    // Every lease, swept or closed, gave back what it did not spend: 99 of 100 are there.
    tokio::time::sleep(Duration::from_millis(200)).await;
    for key in ["many:0", "many:1500", "many:2999"] {
        let left = client
            .check(Request {
                dry_run: true,
                ..ask(key)
            })
            .await
            .unwrap()
            .tokens_remaining;
        // 99 and the refill since (0.001 a second: a busy machine's run takes seconds).
        let refill = 0.001 * started.elapsed().as_secs_f64();
        assert!(
            left > 99.0 - 0.001 && left < 99.0 + refill + 0.001,
            "{key}: {left}"
        );
    }
}
