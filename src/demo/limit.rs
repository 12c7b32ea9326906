//! The limiter middleware: one ShouldAllow call per limited request over one reused channel,
//! bounded by `--tollgate-timeout-ms`, with the rate-limit headers on every limited answer.

use std::{fmt, net::SocketAddr, str::FromStr, time::Duration};

use axum::{
    Json,
    extract::{ConnectInfo, Request, State},
    http::{HeaderMap, HeaderValue, StatusCode},
    middleware::Next,
    response::{IntoResponse, Response},
};
use metrics::Counter;
use serde_json::json;
use tonic::transport::{Channel, Endpoint};

use super::{AppState, DemoConfig, Identity, names};
use crate::proto::tollgate::v1::{
    ShouldAllowRequest, ShouldAllowResponse, rate_limit_service_client::RateLimitServiceClient,
};

/// What to do when tollgate cannot answer in time (DEMO_FAILURE_MODE).
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

pub(super) struct Limiter {
    client: RateLimitServiceClient<Channel>,
    identity: Identity,
    trust_forwarded: bool,
    timeout: Duration,
    failure_mode: DemoFailureMode,
    capacity: f64,
    rate: f64,
    failures: Counter,
}

impl Limiter {
    pub fn new(config: &DemoConfig) -> anyhow::Result<Self> {
        // Lazy: the demo starts (and fails open or closed) while tollgate is away.
        let channel = Endpoint::from_shared(config.tollgate_url.clone())
            .map_err(|e| anyhow::anyhow!("TOLLGATE_URL: {e}"))?
            .connect_timeout(config.tollgate_timeout().max(Duration::from_millis(250)))
            .tcp_nodelay(true)
            .connect_lazy();
        Ok(Self {
            client: RateLimitServiceClient::new(channel),
            identity: config.identity,
            trust_forwarded: config.trust_forwarded,
            timeout: config.tollgate_timeout(),
            failure_mode: config.failure_mode,
            capacity: config.capacity,
            rate: config.rate,
            failures: metrics::counter!(names::LIMITER_FAILURES, "mode" => config.failure_mode.to_string()),
        })
    }

    async fn ask(&self, key: String) -> Result<ShouldAllowResponse, Refusal> {
        let mut request = tonic::Request::new(ShouldAllowRequest {
            key,
            cost: 1,
            capacity: self.capacity,
            rate: self.rate,
            dry_run: false,
        });
        request.set_timeout(self.timeout);
        let mut client = self.client.clone();
        // The gRPC deadline travels to tollgate; the local one also bounds connecting.
        match tokio::time::timeout(self.timeout, client.should_allow(request)).await {
            Ok(Ok(answer)) => Ok(answer.into_inner()),
            Ok(Err(status)) => Err(Refusal::classify(&status)),
            Err(_) => Err(Refusal::Unavailable(format!(
                "no answer within {} ms",
                self.timeout.as_millis()
            ))),
        }
    }
}

/// Why tollgate gave no decision. Only an unreachable or slow tollgate is left to
/// DEMO_FAILURE_MODE: any other error is never an allow.
#[derive(Debug)]
enum Refusal {
    /// Unreachable, overloaded or too slow: DEMO_FAILURE_MODE decides.
    Unavailable(String),
    /// The request's identity is not acceptable (too long, say): the client's error, 400.
    BadRequest(String),
    /// Anything else (tollgate refuses this demo's settings, a bug): 500, never served.
    Other(String),
}

impl Refusal {
    fn classify(status: &tonic::Status) -> Self {
        use tonic::Code;
        let text = format!("{:?}: {}", status.code(), status.message());
        match status.code() {
            Code::Unavailable
            | Code::DeadlineExceeded
            | Code::Cancelled
            | Code::ResourceExhausted
            | Code::Unknown => Refusal::Unavailable(text),
            Code::InvalidArgument => Refusal::BadRequest(status.message().to_string()),
            _ => Refusal::Other(text),
        }
    }
}

/// The middleware on limited routes.
pub(super) async fn enforce(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    request: Request,
    next: Next,
) -> Response {
    let limiter = &state.limiter;
    let key = match limiter
        .identity
        .key(request.headers(), peer, limiter.trust_forwarded)
    {
        Ok(key) => key,
        Err(missing) => {
            let body = json!({
                "error": "unauthorized",
                "detail": format!("missing {} header (IDENTITY={})", missing.0, limiter.identity),
            });
            return (StatusCode::UNAUTHORIZED, Json(body)).into_response();
        }
    };
    match limiter.ask(key).await {
        Ok(answer) if answer.allowed => {
            let mut response = next.run(request).await;
            rate_limit_headers(response.headers_mut(), &answer);
            response
        }
        Ok(answer) => {
            let retry_after = answer.retry_after_ms.div_ceil(1000).max(1);
            let body = json!({
                "error": "rate limited",
                "retry_after_seconds": retry_after,
                "retry_after_ms": answer.retry_after_ms,
            });
            let mut response = (StatusCode::TOO_MANY_REQUESTS, Json(body)).into_response();
            rate_limit_headers(response.headers_mut(), &answer);
            response
                .headers_mut()
                .insert("retry-after", HeaderValue::from(retry_after));
            response
        }
        Err(Refusal::BadRequest(detail)) => {
            let body = json!({ "error": "bad request", "detail": detail });
            (StatusCode::BAD_REQUEST, Json(body)).into_response()
        }
        Err(Refusal::Other(e)) => {
            tracing::error!(error = %e, "tollgate refused the decision; not serving");
            let body = json!({ "error": "rate limiter refused the request" });
            (StatusCode::INTERNAL_SERVER_ERROR, Json(body)).into_response()
        }
        Err(Refusal::Unavailable(e)) => {
            limiter.failures.increment(1);
            tracing::warn!(error = %e, mode = %limiter.failure_mode, "tollgate unavailable; DEMO_FAILURE_MODE decides");
            match limiter.failure_mode {
                DemoFailureMode::Allow => next.run(request).await,
                DemoFailureMode::Deny => {
                    let body = json!({ "error": "rate limiter unavailable" });
                    (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
                }
            }
        }
    }
}

/// `X-RateLimit-Limit` (the bucket size), `-Remaining` (whole tokens left), `-Reset` (seconds until
/// full, rounded up).
fn rate_limit_headers(headers: &mut HeaderMap, answer: &ShouldAllowResponse) {
    let limit = answer.capacity.floor().max(0.0) as u64;
    let remaining = answer.tokens_remaining.floor().max(0.0) as u64;
    headers.insert("x-ratelimit-limit", HeaderValue::from(limit));
    headers.insert("x-ratelimit-remaining", HeaderValue::from(remaining));
    headers.insert(
        "x-ratelimit-reset",
        HeaderValue::from(answer.reset_after_ms.div_ceil(1000)),
    );
}
