//! The HTTP port (HTTP_ADDR): `/metrics`, the probes, and, unless DEBUG_ENDPOINTS=false, what an
//! operator can look at (the README's "Operating it").

use std::sync::Arc;

use axum::{Router, extract::State, http::StatusCode, routing::get};

use super::debug::{self, DebugState};
use super::health::Health;
use crate::telemetry::{METRICS_CONTENT_TYPE, MetricsHandle};

#[derive(Clone)]
pub struct HttpState {
    pub metrics: MetricsHandle,
    pub health: Arc<Health>,
    /// The status page and /debug/*; None with DEBUG_ENDPOINTS=false.
    pub debug: Option<DebugState>,
}

/// The routes of the HTTP port.
pub fn router(state: HttpState) -> Router {
    let debug = state.debug.clone();
    let probes = Router::new()
        .route("/metrics", get(render_metrics))
        .route("/healthz", get(|| async { "OK" }))
        .route("/readyz", get(readiness))
        .route("/healthcheck", get(healthcheck))
        .with_state(state);
    match debug {
        Some(d) => probes.merge(debug::routes(d)),
        None => probes,
    }
}

async fn render_metrics(State(state): State<HttpState>) -> impl axum::response::IntoResponse {
    (
        [(axum::http::header::CONTENT_TYPE, METRICS_CONTENT_TYPE)],
        state.metrics.render(),
    )
}

async fn readiness(State(state): State<HttpState>) -> (StatusCode, &'static str) {
    if state.health.ready() {
        (StatusCode::OK, "OK")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "backend unreachable or shutting down",
        )
    }
}

/// envoyproxy/ratelimit's probe: 200 `OK`, or 500 when unhealthy.
async fn healthcheck(State(state): State<HttpState>) -> (StatusCode, &'static str) {
    if state.health.ready() {
        (StatusCode::OK, "OK")
    } else {
        (StatusCode::INTERNAL_SERVER_ERROR, "unhealthy")
    }
}
