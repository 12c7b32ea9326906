//! An axum API limited by sluicegate: 20 requests per API key, refilled at 10 per second (the shape
//! asked for below; sluicegate's own default is TB_CAPACITY=20, TB_RATE=20), failing open if
//! sluicegate is unreachable (those answers carry `X-RateLimit-Degraded: 1`).
//!
//!   cargo run --release                                          # sluicegate on :8081
//!   cargo run -p sluicegate-client --example axum                  # this API on :3000
//!   curl -i -H 'X-API-Key: alice' localhost:3000/

use std::time::Duration;

use axum::{Router, http::request::Parts, routing::get};
use sluicegate_client::{Client, FailureMode, KeyError, RateLimitLayer};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let client = Client::builder("http://127.0.0.1:8081")
        .timeout(Duration::from_millis(50))
        .failure_mode(FailureMode::Allow)
        .build()?;
    let limit = RateLimitLayer::new(client, |req: &Parts| {
        req.headers
            .get("x-api-key")
            .and_then(|v| v.to_str().ok())
            .map(|key| format!("key:{key}"))
            .ok_or_else(|| KeyError::unauthorized("send an X-API-Key header"))
    })
    .shape(20.0, 10.0);
    let app = Router::new()
        .route("/", get(|| async { "hello, within your limit\n" }))
        // route_layer: only matched routes are limited, so a 404 costs nobody a token.
        .route_layer(limit);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
    axum::serve(listener, app).await?;
    Ok(())
}
