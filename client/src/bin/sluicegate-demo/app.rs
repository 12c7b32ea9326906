//! Configuration, routes, the rate-limit layer, request metrics, serving and shutdown.

use std::{
    fmt,
    net::SocketAddr,
    str::FromStr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use crate::process::{LogArgs, METRICS_CONTENT_TYPE, Metrics};
use axum::{
    Json, Router,
    extract::{MatchedPath, Request, State},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use clap::Parser;
use sluicegate_client::{Client, ConcurrencyLimitLayer, FailureMode, RateLimitLayer};
use tokio_util::sync::CancellationToken;

use crate::generate;
use crate::identity::Identity;

/// Demo metric names (its own, not sluicegate's).
pub mod names {
    pub const REQUESTS: &str = "demo_http_requests_total";
    pub const DURATION: &str = "demo_http_request_duration_seconds";
    pub const LIMITER_FAILURES: &str = "demo_limiter_failures_total";
}

/// What to do when sluicegate cannot answer in time (DEMO_FAILURE_MODE).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DemoFailureMode {
    Allow,
    Deny,
}

impl FromStr for DemoFailureMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "allow" => Ok(DemoFailureMode::Allow),
            "deny" => Ok(DemoFailureMode::Deny),
            other => Err(format!("expected allow or deny, got '{other}'")),
        }
    }
}

impl fmt::Display for DemoFailureMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DemoFailureMode::Allow => "allow",
            DemoFailureMode::Deny => "deny",
        })
    }
}

/// Flags and environment of `sluicegate-demo` (a `.env` file is read too).
#[derive(Clone, Debug, Parser)]
#[command(
    name = "sluicegate-demo",
    version,
    about = "An HTTP API rate-limited by sluicegate."
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

    /// sluicegate's gRPC address.
    #[arg(
        long,
        alias = "tollgate-url",
        env = "TOLLGATE_URL",
        value_name = "TOLLGATE_URL",
        default_value = "http://127.0.0.1:8081"
    )]
    pub sluicegate_url: String,

    /// Who a request counts against: ip, api-key (X-API-Key header) or user (X-User header).
    #[arg(long, env = "IDENTITY", value_name = "IDENTITY", default_value = "ip", value_parser = Identity::from_str)]
    pub identity: Identity,

    /// Take the client address from the last X-Forwarded-For entry (only behind a proxy you trust,
    /// such as Envoy: a client can forge the header).
    #[arg(long, env = "TRUST_FORWARDED", value_name = "TRUST_FORWARDED")]
    pub trust_forwarded: bool,

    /// Deadline of one call to sluicegate, in milliseconds.
    #[arg(long, alias = "tollgate-timeout-ms", env = "TOLLGATE_TIMEOUT_MS", value_name = "TOLLGATE_TIMEOUT_MS", default_value = "50", value_parser = clap::value_parser!(u64).range(1..))]
    pub sluicegate_timeout_ms: u64,

    /// When sluicegate is unreachable or slow: allow (serve anyway) or deny (503).
    #[arg(long = "failure-mode", env = "DEMO_FAILURE_MODE", value_name = "DEMO_FAILURE_MODE", default_value = "allow", value_parser = DemoFailureMode::from_str)]
    pub failure_mode: DemoFailureMode,

    /// Bucket size to ask for; 0 uses sluicegate's default (TB_CAPACITY).
    #[arg(
        long,
        env = "DEMO_CAPACITY",
        value_name = "DEMO_CAPACITY",
        default_value = "0"
    )]
    pub capacity: f64,

    /// Refill to ask for, tokens per second; 0 uses sluicegate's default (TB_RATE).
    #[arg(long, env = "DEMO_RATE", value_name = "DEMO_RATE", default_value = "0")]
    pub rate: f64,

    /// Add X-RateLimit-Warning when an allowed request leaves less than (1 - ratio) of the
    /// bucket: a warning before the 429.
    #[arg(
        long,
        env = "DEMO_NEAR_LIMIT_RATIO",
        value_name = "DEMO_NEAR_LIMIT_RATIO",
        default_value = "0.8"
    )]
    pub near_limit_ratio: f64,

    /// Ask sluicegate before serving / and /api/items. false: serve them unlimited, for running
    /// behind Envoy, which already asks sluicegate (else each answer would be limited twice and
    /// carry two sets of rate-limit headers).
    #[arg(long, env = "DEMO_LIMIT", value_name = "DEMO_LIMIT", default_value = "true", action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub limit: bool,

    /// POST /api/generate: the token budget's size per identity (LLM tokens, say).
    #[arg(
        long,
        env = "DEMO_TOKEN_CAPACITY",
        value_name = "DEMO_TOKEN_CAPACITY",
        default_value = "1000"
    )]
    pub token_capacity: f64,

    /// POST /api/generate: the token budget's refill per second.
    #[arg(
        long,
        env = "DEMO_TOKEN_RATE",
        value_name = "DEMO_TOKEN_RATE",
        default_value = "50"
    )]
    pub token_rate: f64,

    /// POST /api/generate: generations one identity may run at once (an in-flight limit,
    /// shared by every demo replica through sluicegate).
    #[arg(
        long,
        env = "DEMO_MAX_GENERATIONS",
        value_name = "DEMO_MAX_GENERATIONS",
        default_value = "2",
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    pub max_generations: u32,

    /// POST /api/generate: how long the fake model takes per token written, in milliseconds.
    #[arg(
        long,
        env = "DEMO_MS_PER_TOKEN",
        value_name = "DEMO_MS_PER_TOKEN",
        default_value = "2"
    )]
    pub ms_per_token: f64,

    #[command(flatten)]
    pub log: LogArgs,
}

impl DemoConfig {
    pub fn sluicegate_timeout(&self) -> Duration {
        Duration::from_millis(self.sluicegate_timeout_ms)
    }
}

#[derive(Clone)]
pub struct AppState {
    pub client: Client,
    pub identity: Identity,
    pub trust_forwarded: bool,
    pub token_capacity: f64,
    pub token_rate: f64,
    pub ms_per_token: f64,
    pub max_generations: u32,
    metrics: Metrics,
}

impl axum::extract::FromRef<AppState> for generate::Budget {
    fn from_ref(app: &AppState) -> Self {
        Self {
            client: app.client.clone(),
            identity: app.identity,
            trust_forwarded: app.trust_forwarded,
            token_capacity: app.token_capacity,
            token_rate: app.token_rate,
            ms_per_token: app.ms_per_token,
            max_generations: app.max_generations,
        }
    }
}

/// Serves the demo on `listener` until `shutdown`, then lets in-flight requests finish.
pub async fn run(
    config: DemoConfig,
    listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let metrics = Metrics::install(describe);
    let client = Client::builder(config.sluicegate_url.clone())
        .timeout(config.sluicegate_timeout())
        .failure_mode(match config.failure_mode {
            DemoFailureMode::Allow => FailureMode::Allow,
            DemoFailureMode::Deny => FailureMode::Deny,
        })
        .build()
        .map_err(|e| anyhow::anyhow!("TOLLGATE_URL: {e}"))?;
    let state = AppState {
        client: client.clone(),
        identity: config.identity,
        trust_forwarded: config.trust_forwarded,
        token_capacity: config.token_capacity,
        token_rate: config.token_rate,
        ms_per_token: config.ms_per_token.max(0.0),
        max_generations: config.max_generations,
        metrics,
    };

    let failures =
        metrics::counter!(names::LIMITER_FAILURES, "mode" => config.failure_mode.to_string());
    let last_warned = Arc::new(AtomicU64::new(0));
    let mode = config.failure_mode;
    let started = Instant::now();
    let (identity, trust) = (config.identity, config.trust_forwarded);
    // At most DEMO_MAX_GENERATIONS generations per identity at once, across replicas.
    let generations = ConcurrencyLimitLayer::new(
        client.clone(),
        config.max_generations,
        move |parts: &http::request::Parts| {
            identity
                .key(parts, trust)
                .map(|k| format!("generations:{k}"))
        },
    );
    let limit = RateLimitLayer::new(client, move |parts: &http::request::Parts| {
        identity.key(parts, trust)
    })
    .shape(config.capacity, config.rate)
    .near_limit_ratio(config.near_limit_ratio)
    .on_unavailable(move |e| {
        failures.increment(1);
        // One line per 10 s at most: an outage would otherwise log every request.
        let now = started.elapsed().as_secs();
        let last = last_warned.load(Ordering::Relaxed);
        if (last == 0 || now >= last + 10)
            && last_warned
                .compare_exchange(last, now.max(1), Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(error = %e, %mode, "sluicegate unavailable; DEMO_FAILURE_MODE decides");
        }
    });

    let pages = Router::new()
        .route("/", get(index))
        .route("/api/items", get(items));
    let limited = if config.limit {
        pages.route_layer(limit)
    } else {
        tracing::info!("DEMO_LIMIT=false: / and /api/items are not limited by the demo itself");
        pages
    };
    let app =
        Router::new()
            .merge(limited)
            .route(
                "/api/generate",
                post(generate::generate).route_layer(generations),
            )
            .route("/healthz", get(|| async { "OK" }))
            .route("/metrics", get(render_metrics))
            .layer(middleware::from_fn(record))
            // A span per request (method, path; status and latency at DEBUG): RUST_LOG=tower_http=debug.
            // Answers the demo chose (429, 503 in deny mode) are not server failures: logged at DEBUG.
            .layer(tower_http::trace::TraceLayer::new_for_http().on_failure(
                tower_http::trace::DefaultOnFailure::new().level(tracing::Level::DEBUG),
            ))
            .with_state(state);

    tracing::info!(addr = %listener.local_addr()?, sluicegate = %config.sluicegate_url, identity = %config.identity, "sluicegate-demo listening");
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
        "Time to serve one HTTP request (sluicegate's decision included), by route."
    );
    metrics::describe_counter!(
        names::LIMITER_FAILURES,
        "Requests decided by DEMO_FAILURE_MODE because sluicegate failed or was too slow, by mode."
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
        "service": "sluicegate-demo",
        "try": ["/api/items", "POST /api/generate", "/healthz", "/metrics"],
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
