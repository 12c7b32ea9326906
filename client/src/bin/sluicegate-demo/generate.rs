//! `POST /api/generate`: the pattern for a cost known only after the work (LLM tokens, bytes,
//! rows). Reserve the most it can cost (`max_tokens`) with ShouldAllow, do the work (a fake
//! model that writes a random number of tokens up to it), then Settle the real cost: sluicegate
//! gives the unused part of the reservation back (or, for work that cost more, charges the rest
//! into debt). Around it, the app's `ConcurrencyLimitLayer` holds one of the identity's
//! DEMO_MAX_GENERATIONS slots while the generation runs; the answer says how many run.

use std::time::Duration;

use axum::{
    Json,
    extract::State,
    http::{HeaderValue, StatusCode},
    response::{IntoResponse, Response},
};
use rand::Rng;
use serde::Deserialize;
use serde_json::json;
use sluicegate_client::{Error, Request};

use crate::identity::Identity;

/// What the route needs from the app: who is asking, and the token budget to reserve from.
#[derive(Clone)]
pub struct Budget {
    pub client: sluicegate_client::Client,
    pub identity: Identity,
    pub trust_forwarded: bool,
    pub token_capacity: f64,
    pub token_rate: f64,
    pub ms_per_token: f64,
    pub max_generations: u32,
}

/// How long a reservation may wait for its Settle: far longer than the (fake) work takes.
const RESERVE_FOR: Duration = Duration::from_secs(60);

#[derive(Deserialize)]
pub struct Generate {
    #[serde(default)]
    prompt: String,
    /// The most tokens the answer may have: the reservation.
    max_tokens: u32,
}

pub async fn generate(
    State(state): State<Budget>,
    slot: Option<axum::Extension<sluicegate_client::Lease>>,
    parts: http::request::Parts,
    Json(body): Json<Generate>,
) -> Response {
    // The slot this generation holds (the layer took it): how many of this identity's run now.
    let running = slot.map_or(0, |s| s.in_flight);
    let identity = match state.identity.key(&parts, state.trust_forwarded) {
        Ok(k) => k,
        Err(e) => return (e.status, Json(json!({ "error": e.message }))).into_response(),
    };
    let key = format!("llm:{identity}");
    if body.max_tokens == 0 || f64::from(body.max_tokens) > state.token_capacity {
        let detail = format!(
            "max_tokens must be 1..={} (the token budget)",
            state.token_capacity
        );
        return (StatusCode::BAD_REQUEST, Json(json!({ "error": detail }))).into_response();
    }

    // 1. Reserve the most the work can cost.
    let reserve = Request {
        key: &key,
        cost: body.max_tokens,
        capacity: state.token_capacity,
        rate: state.token_rate,
        dry_run: false,
        up_to: false,
    };
    let reservation = match state.client.reserve(reserve, RESERVE_FOR).await {
        Ok(r) => r,
        Err(e) => return refused(e),
    };
    let reserved = match reservation.decision {
        d if d.allowed => d,
        d if d.degraded => return unavailable(json!({ "error": "rate limiter unavailable" })),
        d => {
            let retry = d.retry_after.as_millis().div_ceil(1000).max(1) as u64;
            let body = json!({
                "error": "token budget exhausted",
                "retry_after_seconds": retry,
                "tokens_remaining": d.tokens_remaining.floor().max(0.0),
            });
            let mut r = (StatusCode::TOO_MANY_REQUESTS, Json(body)).into_response();
            r.headers_mut()
                .insert("retry-after", HeaderValue::from(retry));
            return r;
        }
    };

    // 2. The work: a fake model writing between 1 and max_tokens tokens.
    let produced = rand::rng().random_range(1..=body.max_tokens);
    let work = Duration::from_secs_f64(f64::from(produced) * state.ms_per_token / 1000.0);
    tokio::time::sleep(work).await;
    let words = ["toll", "gate", "bucket", "token", "refill"];
    let text: Vec<&str> = (0..produced.min(50) as usize)
        .map(|i| words[(i + body.prompt.len()) % words.len()])
        .collect();

    // 3. Settle the real cost: the unused part of the reservation comes back (once, at most what
    // was taken). A degraded allow took nothing: nothing to settle.
    let settled = match &reservation.id {
        Some(_) => Some(
            state
                .client
                .settle_reservation(&reservation, u64::from(produced))
                .await,
        ),
        None => None,
    };
    let (tokens_remaining, in_debt) = match settled {
        None => (reserved.tokens_remaining, false),
        Some(Ok(s)) => (s.tokens_remaining, s.in_debt),
        // The work is done; a settlement that could not land costs the caller its reservation.
        Some(Err(e)) => {
            tracing::warn!(error = %e, "settle failed; the reservation stands");
            (reserved.tokens_remaining, false)
        }
    };
    Json(json!({
        "text": text.join(" "),
        "reserved_tokens": body.max_tokens,
        "generated_tokens": produced,
        "refunded_tokens": body.max_tokens - produced,
        "tokens_remaining": tokens_remaining,
        "in_debt": in_debt,
        "generations_running": running,
        "max_generations": state.max_generations,
    }))
    .into_response()
}

fn refused(e: Error) -> Response {
    let (status, error) = match &e {
        Error::Rejected {
            code: tonic::Code::InvalidArgument,
            ..
        } => (StatusCode::BAD_REQUEST, "bad request"),
        Error::Unavailable(_) => {
            return unavailable(
                json!({ "error": "rate limiter unavailable", "detail": e.to_string() }),
            );
        }
        _ => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "rate limiter refused the request",
        ),
    };
    (
        status,
        Json(json!({ "error": error, "detail": e.to_string() })),
    )
        .into_response()
}

/// `503` without a bucket's word (sluicegate unavailable, or a failure mode's denial): with a
/// retry time, never "at once", and marked degraded as the layer marks it.
fn unavailable(body: serde_json::Value) -> Response {
    let retry = sluicegate_client::FALLBACK_RETRY_AFTER.as_secs().max(1);
    let mut r = (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response();
    let h = r.headers_mut();
    h.insert("retry-after", HeaderValue::from(retry));
    h.insert("x-ratelimit-degraded", HeaderValue::from_static("1"));
    r
}
