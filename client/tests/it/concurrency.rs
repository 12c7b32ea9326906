//! The in-flight layer and calls against a real sluicegate (run in this process): an axum app
//! with a slow handler never runs more than N handlers for a key, a dropped response body
//! releases its slot, a long response renews, and the failure mode applies when sluicegate is away.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::{Router, body::Body, routing::get};
use sluicegate_client::{Client, ConcurrencyLimitLayer, FailureMode, KeyError};
use tower::ServiceExt;

use crate::support::sluicegate;

fn by_user(parts: &http::request::Parts) -> Result<String, KeyError> {
    parts
        .headers
        .get("x-user")
        .and_then(|v| v.to_str().ok())
        .map(|u| format!("gen:{u}"))
        .ok_or_else(|| KeyError::unauthorized("missing X-User"))
}

fn client(url: &str) -> Client {
    Client::builder(url)
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap()
}

/// Counts the handlers running now, and the most ever running at once.
#[derive(Clone, Default)]
struct Running {
    now: Arc<AtomicUsize>,
    most: Arc<AtomicUsize>,
}

fn slow_app(client: Client, max: u32, running: Running) -> Router {
    Router::new()
        .route(
            "/generate",
            get(move || {
                let running = running.clone();
                async move {
                    let now = running.now.fetch_add(1, Ordering::SeqCst) + 1;
                    running.most.fetch_max(now, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    running.now.fetch_sub(1, Ordering::SeqCst);
                    "generated"
                }
            }),
        )
        .route_layer(ConcurrencyLimitLayer::new(client, max, by_user))
}

async fn call(app: &Router, user: &str) -> http::Response<Body> {
    let req = http::Request::get("/generate")
        .header("x-user", user)
        .body(Body::empty())
        .unwrap();
    app.clone().oneshot(req).await.unwrap()
}

/// Drains a response (its body sent to the end, as a server would).
async fn drain(r: http::Response<Body>) -> u16 {
    let status = r.status().as_u16();
    axum::body::to_bytes(r.into_body(), 1 << 16).await.unwrap();
    status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_more_than_n_handlers_for_a_key() {
    let t = sluicegate(&[]).await;
    let running = Running::default();
    let app = slow_app(client(&t.url), 3, running.clone());
    for wave in 0..3 {
        let calls = (0..12).map(|_| async { drain(call(&app, "ann").await).await });
        let statuses = futures::future::join_all(calls).await;
        let served = statuses.iter().filter(|&&s| s == 200).count();
        let refused = statuses.iter().filter(|&&s| s == 429).count();
        assert_eq!(served + refused, 12, "wave {wave}: {statuses:?}");
        assert!((1..=3).contains(&served), "wave {wave}: {statuses:?}");
        // Slots come back once the bodies are sent: the next wave is served again.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        running.most.load(Ordering::SeqCst),
        3,
        "at most 3 at once, and 3 reached"
    );
    // A refusal says why and when to come back.
    let _held: Vec<_> = futures::future::join_all((0..3).map(|_| call(&app, "bo"))).await;
    let refused = call(&app, "bo").await;
    assert_eq!(refused.status(), 429);
    assert!(refused.headers().contains_key("retry-after"));
    assert_eq!(refused.headers()["x-concurrency-limit"], "3");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_body_releases_and_a_long_response_renews() {
    let t = sluicegate(&[]).await;
    let c = client(&t.url);
    let app = Router::new()
        .route("/generate", get(|| async { "generated" }))
        .route_layer(
            ConcurrencyLimitLayer::new(c.clone(), 1, by_user).lease_ttl(Duration::from_secs(1)),
        );
    // The body is held, not sent: the slot stays taken past several TTLs (renewed).
    let held = call(&app, "cy").await;
    assert_eq!(held.status(), 200);
    tokio::time::sleep(Duration::from_millis(3000)).await;
    assert_eq!(call(&app, "cy").await.status(), 429, "renewed, still held");
    // Dropped (a client that went away): released.
    drop(held);
    let mut statuses = Vec::new();
    for _ in 0..50 {
        let r = call(&app, "cy").await;
        statuses.push(r.status().as_u16());
        if r.status() == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(statuses.last(), Some(&200), "{statuses:?}");
    assert!(statuses.len() < 50);
    // Nothing held any more once that body is gone too.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let probe = c
        .acquire("gen:cy", 1, Duration::from_secs(1))
        .await
        .unwrap();
    assert!(probe.granted, "{probe:?}");
    assert!(c.release(&probe).await.unwrap());
    assert!(
        !c.release(&probe).await.unwrap(),
        "a second release finds nothing"
    );
}

#[tokio::test]
async fn failure_modes_when_sluicegate_is_away() {
    let dead = "http://127.0.0.1:9";
    for (mode, status) in [
        (FailureMode::Allow, 200),
        (FailureMode::Deny, 503),
        (FailureMode::Error, 503),
    ] {
        let c = Client::builder(dead)
            .timeout(Duration::from_millis(200))
            .failure_mode(mode)
            .build()
            .unwrap();
        let app = slow_app(c, 1, Running::default());
        let r = call(&app, "dee").await;
        assert_eq!(r.status().as_u16(), status, "{mode:?}");
        assert_eq!(r.headers()["x-ratelimit-degraded"], "1", "{mode:?}");
    }
    // No identity: 401, without asking anyone.
    let anonymous = http::Request::get("/generate").body(Body::empty()).unwrap();
    let app = slow_app(client(dead), 1, Running::default());
    assert_eq!(app.oneshot(anonymous).await.unwrap().status(), 401);
}
