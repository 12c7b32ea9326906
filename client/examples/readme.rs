//! The README's Rust snippets ("From Rust: the sluicegate-client crate": the layer and leased
//! quota; and the in-flight layer of "In-flight limits"), verbatim between the markers, in order: they compile with every
//! build of the examples, and `tests/it/readme.rs` fails if they differ. Not meant to be run.

#[rustfmt::skip] // as the README shows it
#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // README snippet begins
    use std::time::Duration;

    use axum::{Router, http::request::Parts, routing::get};
    use sluicegate_client::{Client, FailureMode, KeyError, RateLimitLayer};

    // Inside a Tokio runtime (the client's connection is a task there).
    let client = Client::builder("http://127.0.0.1:8081")
        .timeout(Duration::from_millis(50))
        .failure_mode(FailureMode::Allow)            // sluicegate down or slow: serve, flagged degraded
        .build()?;
    let limit = RateLimitLayer::new(client, |req: &Parts| {
        req.headers.get("x-api-key").and_then(|v| v.to_str().ok())
            .map(|key| format!("key:{key}"))
            .ok_or_else(|| KeyError::unauthorized("send an X-API-Key header"))
    })
    .shape(20.0, 10.0);
    // route_layer: only matched routes are limited, so a 404 costs nobody a token.
    let app: Router = Router::new().route("/", get(|| async { "hello" })).route_layer(limit);
    // README snippet ends
    drop(app);
    Ok(())
}

#[rustfmt::skip] // as the README shows it
#[allow(dead_code)]
async fn leased() -> Result<(), Box<dyn std::error::Error>> {
    // README snippet begins
    use sluicegate_client::{Client, LeasePolicy, LeasedClient, Request};

    let leased = LeasedClient::new(Client::builder("http://127.0.0.1:8081").build()?, LeasePolicy::default());
    let d = leased.decide(Request { key: "user:42", cost: 1, ..Default::default() }).await?;
    if d.decision.allowed { /* serve it; d.local: answered without a call */ }
    leased.close().await;   // before exiting: what the leases did not spend goes back
    // README snippet ends
    Ok(())
}

#[rustfmt::skip] // as the README shows it
#[allow(dead_code)]
async fn in_flight() -> Result<(), Box<dyn std::error::Error>> {
    // README snippet begins
    use std::time::Duration;

    use axum::{Router, http::request::Parts, routing::post};
    use sluicegate_client::{Client, ConcurrencyLimitLayer, KeyError};

    let client = Client::builder("http://127.0.0.1:8081").build()?;
    // At most 5 generations per API key at once, across every replica of this app.
    let generations = ConcurrencyLimitLayer::new(client, 5, |req: &Parts| {
        req.headers.get("x-api-key").and_then(|v| v.to_str().ok())
            .map(|key| format!("generations:{key}"))
            .ok_or_else(|| KeyError::unauthorized("send an X-API-Key header"))
    })
    .lease_ttl(Duration::from_secs(60));   // what a crashed replica holds a slot for, at most
    let app: Router = Router::new().route("/generate", post(|| async { "done" })).route_layer(generations);
    // README snippet ends
    drop(app);
    Ok(())
}
