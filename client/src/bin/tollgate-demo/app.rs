//! `tollgate-demo`: a small HTTP API that asks tollgate before serving each request.
//!
//! - `identity.rs`: who is asking (client address, `X-API-Key` or `X-User`), i.e. the bucket key.
//! - `limit.rs`: the ShouldAllow call, its deadline and failure mode, and the rate-limit headers.
//! - here: configuration, routes, request metrics, serving and shutdown.

mod identity;
mod limit;

use std::{net::SocketAddr, str::FromStr, sync::Arc, time::Duration};

use axum::{
    Json, Router,
    extract::{MatchedPath, Request, State},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::get,
};
use clap::Parser;
use tokio_util::sync::CancellationToken;

pub use identity::Identity;
pub use limit::DemoFailureMode;

use crate::telemetry::{LogArgs, METRICS_CONTENT_TYPE, MetricsHandle, install_recorder};

/// Demo metric names (its own, not tollgate's).
pub mod names {
    pub const REQUESTS: &str = "demo_http_requests_total";
    pub const DURATION: &str = "demo_http_request_duration_seconds";
    pub const LIMITER_FAILURES: &str = "demo_limiter_failures_total";
}

/// Flags and environment of `tollgate-demo` (a `.env` file is read too).
#[derive(Clone, Debug, Parser)]
#[command(
    name = "tollgate-demo",
    version,
    about = "An HTTP API rate-limited by tollgate."
)]
pub struct DemoConfig {
    /// HTTP listener.
    #[arg(
        long,
        env = "DEMO_ADDR",
        value_name = "DEMO_ADDR",
        default_value = "0.0.0.0:8000"
    )]
    pub addr: SocketAddr,

    /// tollgate's gRPC address.
    #[arg(
        long,
        env = "TOLLGATE_URL",
        value_name = "TOLLGATE_URL",
        default_value = "http://127.0.0.1:8081"
    )]
    pub tollgate_url: String,

    /// Who a request counts against: ip, api-key (X-API-Key header) or user (X-User header).
    #[arg(long, env = "IDENTITY", value_name = "IDENTITY", default_value = "ip", value_parser = Identity::from_str)]
    pub identity: Identity,

    /// Take the client address from the last X-Forwarded-For entry (only behind a proxy you trust,
    /// such as Envoy: a client can forge the header).
    #[arg(long, env = "TRUST_FORWARDED", value_name = "TRUST_FORWARDED")]
    pub trust_forwarded: bool,

    /// Deadline of one call to tollgate, in milliseconds.
    #[arg(long, env = "TOLLGATE_TIMEOUT_MS", value_name = "TOLLGATE_TIMEOUT_MS", default_value = "50", value_parser = clap::value_parser!(u64).range(1..))]
    pub tollgate_timeout_ms: u64,

    /// When tollgate is unreachable or slow: allow (serve anyway) or deny (503).
    #[arg(long = "failure-mode", env = "DEMO_FAILURE_MODE", value_name = "DEMO_FAILURE_MODE", default_value = "allow", value_parser = DemoFailureMode::from_str)]
    pub failure_mode: DemoFailureMode,

    /// Bucket size to ask for; 0 uses tollgate's default (TB_CAPACITY).
    #[arg(
        long,
        env = "DEMO_CAPACITY",
        value_name = "DEMO_CAPACITY",
        default_value = "0"
    )]
    pub capacity: f64,

    /// Refill to ask for, tokens per second; 0 uses tollgate's default (TB_RATE).
    #[arg(long, env = "DEMO_RATE", value_name = "DEMO_RATE", default_value = "0")]
    pub rate: f64,

    #[command(flatten)]
    pub log: LogArgs,
}

impl DemoConfig {
    pub fn tollgate_timeout(&self) -> Duration {
        Duration::from_millis(self.tollgate_timeout_ms)
    }
}

#[derive(Clone)]
struct AppState {
    limiter: Arc<limit::Limiter>,
    metrics: MetricsHandle,
}

/// Serves the demo on `listener` until `shutdown`, then lets in-flight requests finish.
pub async fn run(
    config: DemoConfig,
    listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let metrics = install_recorder(describe);
    let limiter = Arc::new(limit::Limiter::new(&config)?);
    let state = AppState { limiter, metrics };

    let limited = Router::new()
        .route("/", get(index))
        .route("/api/items", get(items))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            limit::enforce,
        ));
    let app = Router::new()
        .merge(limited)
        .route("/healthz", get(|| async { "OK" }))
        .route("/metrics", get(render_metrics))
        .layer(middleware::from_fn(record))
        // A span per request (method, path; status and latency at DEBUG): RUST_LOG=tower_http=debug.
        .layer(tower_http::trace::TraceLayer::new_for_http())
        .with_state(state);

    tracing::info!(addr = %listener.local_addr()?, tollgate = %config.tollgate_url, identity = ?config.identity, "tollgate-demo listening");
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown.cancelled_owned())
    .await?;
    Ok(())
}

fn describe() {
    metrics::describe_counter!(
        names::REQUESTS,
        "HTTP requests served, by route and status."
    );
    metrics::describe_histogram!(
        names::DURATION,
        metrics::Unit::Seconds,
        "Time to serve one HTTP request (tollgate's decision included), by route."
    );
    metrics::describe_counter!(
        names::LIMITER_FAILURES,
        "Requests decided by DEMO_FAILURE_MODE because tollgate failed or was too slow, by mode."
    );
}

/// Counts every request by route (the matched pattern: bounded) and status.
async fn record(request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let started = std::time::Instant::now();
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    metrics::histogram!(names::DURATION, "route" => route.clone())
        .record(started.elapsed().as_secs_f64());
    metrics::counter!(names::REQUESTS, "route" => route, "status" => status).increment(1);
    response
}

async fn index() -> Json<serde_json::Value> {
    Json(serde_json::json!({
        "service": "tollgate-demo",
        "try": ["/api/items", "/healthz", "/metrics"],
    }))
}

async fn items() -> Json<serde_json::Value> {
    Json(serde_json::json!({
        "items": [
            { "id": 1, "name": "toll" },
            { "id": 2, "name": "gate" },
            { "id": 3, "name": "bucket" },
        ]
    }))
}

async fn render_metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(axum::http::header::CONTENT_TYPE, METRICS_CONTENT_TYPE)],
        state.metrics.render(),
    )
}
