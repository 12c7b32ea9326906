//! What an operator can look at on the HTTP port, with DEBUG_ENDPOINTS=true (off by default): the
//! status page (`/`, with its script and style) and the JSON it refreshes from, the loaded rules,
//! the effective configuration and the heaviest denied keys.
//!
//! Everything shown is already in this process; nothing here touches the backend. Keys and
//! descriptor values are caller input: the page puts them in the document as text, never as HTML,
//! and its Content-Security-Policy allows no script but its own. Keys are often secrets (API
//! keys): shown truncated and hashed unless DEBUG_SHOW_KEYS=true. Only the Host names of
//! HTTP_ALLOWED_HOSTS are answered, so a page elsewhere cannot read these through DNS rebinding.

use std::sync::Arc;

use axum::{
    Json, Router,
    extract::{Query, State},
    http::header,
    response::IntoResponse,
    routing::get,
};
use serde_json::{Value, json};

use super::health::Health;
use crate::telemetry::Activity;
use sluicegate_core::rules::{Limit, RulesHandle};

/// How much history the status page shows.
const STATUS_SECONDS: usize = 120;
/// Rows of top denied keys on the status page; `/debug/top` takes `n` up to [`MAX_TOP`].
const STATUS_TOP: usize = 20;
const MAX_TOP: usize = 1000;

const PAGE: &str = include_str!("status/index.html");
const SCRIPT: &str = include_str!("status/status.js");
const STYLE: &str = include_str!("status/status.css");
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
                   img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

#[derive(Clone)]
pub struct DebugState {
    pub activity: Arc<Activity>,
    pub rules: Arc<RulesHandle>,
    pub health: Arc<Health>,
    /// The effective configuration, secrets redacted (computed once at start).
    pub config: Arc<serde_json::Map<String, Value>>,
    pub backend: &'static str,
    /// DEBUG_SHOW_KEYS: raw keys; otherwise truncated and hashed.
    pub show_keys: bool,
    /// HTTP_ALLOWED_HOSTS (lower case, no ports).
    pub allowed_hosts: Arc<Vec<String>>,
    /// The Envoy quota streams (RLQS) open here.
    pub quotas: Arc<crate::api::Quotas>,
    /// This replica's leases of Redis buckets (None: QUOTA_LEASES off).
    pub leases: Arc<dyn Fn() -> Option<sluicegate_core::backend::redis::LeaseStats> + Send + Sync>,
}

/// Buckets listed per quota stream on the status page (the busiest).
const STATUS_QUOTA_BUCKETS: usize = 10;

/// The first characters of a key kept when it is hidden.
const SHOWN_CHARS: usize = 6;

/// A key as these pages show it: whole with DEBUG_SHOW_KEYS, else its first few characters and a
/// digest (the same key always shows the same, so an operator can still follow one).
pub fn shown_key(key: &str, show: bool) -> String {
    if show {
        return key.to_string();
    }
    use std::fmt::Write as _;
    let digest = ring::digest::digest(&ring::digest::SHA256, key.as_bytes());
    let mut shown: String = key.chars().take(SHOWN_CHARS).collect();
    shown.push_str("…#");
    for b in &digest.as_ref()[..6] {
        let _ = write!(shown, "{b:02x}");
    }
    shown
}

/// The Host a request names (the header, or HTTP/2's authority), lower case, without its port.
fn host_of(req: &axum::extract::Request) -> Option<String> {
    let raw = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
        .or_else(|| req.uri().authority().map(|a| a.as_str().to_string()))?;
    let host = match raw.strip_prefix('[') {
        // [v6]:port
        Some(rest) => rest.split(']').next().unwrap_or_default(),
        None => raw.rsplit_once(':').map_or(raw.as_str(), |(h, _)| h),
    };
    Some(host.to_ascii_lowercase())
}

/// Refuses a request whose Host is not in HTTP_ALLOWED_HOSTS (DNS rebinding: a page on another
/// site whose name now points here).
async fn allowed_host(
    State(s): State<DebugState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    match host_of(&req) {
        Some(host) if s.allowed_hosts.contains(&host) => next.run(req).await,
        host => (
            axum::http::StatusCode::FORBIDDEN,
            format!(
                "Host {:?} is not in HTTP_ALLOWED_HOSTS ({}): set it to the names you reach this port by\n",
                host.unwrap_or_default(),
                s.allowed_hosts.join(",")
            ),
        )
            .into_response(),
    }
}

/// The routes of this module, for the HTTP router.
pub fn routes(state: DebugState) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/status.js", get(script))
        .route("/status.css", get(style))
        // Browsers ask for it; nothing to show.
        .route(
            "/favicon.ico",
            get(|| async { axum::http::StatusCode::NO_CONTENT }),
        )
        .route("/debug/status", get(status))
        .route("/debug/rules", get(rules))
        .route("/debug/config", get(config))
        .route("/debug/top", get(top))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            allowed_host,
        ))
        .with_state(state)
}

/// The heaviest denied keys, shown as DEBUG_SHOW_KEYS says.
fn top_keys(s: &DebugState, n: usize) -> Vec<crate::telemetry::top_keys::TopKey> {
    let mut rows = s.activity.top(n);
    for row in &mut rows {
        row.key = shown_key(&row.key, s.show_keys);
    }
    rows
}

async fn page() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        PAGE,
    )
}

async fn script() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        SCRIPT,
    )
}

async fn style() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], STYLE)
}

/// Everything the status page shows, refreshed every second.
async fn status(State(s): State<DebugState>) -> Json<Value> {
    use crate::telemetry::live::Api;
    let mut rules = s.activity.rule_stats();
    rules.sort_by(|a, b| {
        (b.denied + b.shadow_denied, b.allowed).cmp(&(a.denied + a.shadow_denied, a.allowed))
    });
    Json(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_s": s.activity.live.uptime().as_secs(),
        "backend": s.backend,
        "backend_up": s.health.backend_up(),
        "ready": s.health.ready(),
        "circuits": s.activity.circuits(),
        "seconds": s.activity.live.seconds(STATUS_SECONDS),
        "totals": {
            "should_allow": s.activity.live.totals(Api::ShouldAllow),
            "envoy": s.activity.live.totals(Api::Envoy),
            "concurrency": s.activity.live.totals(Api::Concurrency),
            "rlqs": s.activity.live.totals(Api::Rlqs),
        },
        "rules": rules,
        "rules_loaded": s.rules.current().map_or(0, |set| set.rules().len()),
        "top_keys_enabled": s.activity.top_enabled(),
        "top_denied": top_keys(&s, STATUS_TOP),
        "rlqs": quota_streams(&s),
        "leases": (s.leases)(),
    }))
}

/// The connected Envoys (quota streams) and each one's share of its busiest buckets; bucket
/// values are request attributes, shown as keys are.
fn quota_streams(s: &DebugState) -> Vec<crate::api::StreamView> {
    let mut streams = s.quotas.snapshot(STATUS_QUOTA_BUCKETS);
    for stream in &mut streams {
        for bucket in &mut stream.buckets {
            for (_, value) in &mut bucket.pairs {
                *value = shown_key(value, s.show_keys);
            }
        }
    }
    streams
}

/// The loaded rules with their bucket shapes (envoyproxy/ratelimit's `/rlconfig`, as JSON).
async fn rules(State(s): State<DebugState>) -> Json<Value> {
    let Some(set) = s.rules.current() else {
        return Json(json!({ "path": null, "rules": [] }));
    };
    let rules: Vec<Value> = set
        .rules()
        .iter()
        .map(|r| {
            let (limit, bucket) = match r.limit {
                Limit::Unlimited => (json!({ "kind": "unlimited" }), Value::Null),
                Limit::InFlight { max, lease_ms } => (
                    json!({ "kind": "concurrency", "max": max, "lease_ms": lease_ms }),
                    Value::Null,
                ),
                Limit::Blocked { unit } => (
                    json!({ "kind": "blocked", "requests_per_unit": 0, "unit": unit.as_str() }),
                    Value::Null,
                ),
                Limit::Bucket {
                    shape,
                    requests_per_unit,
                    unit,
                    unit_multiplier,
                } => (
                    json!({
                        "kind": "bucket",
                        "requests_per_unit": requests_per_unit,
                        "unit": unit.as_str(),
                        "unit_multiplier": unit_multiplier,
                    }),
                    json!({ "capacity": shape.capacity(), "rate_per_second": shape.rate() }),
                ),
            };
            json!({
                "domain": r.domain,
                "descriptor": r.path,
                "name": r.name,
                "rule": r.label,
                "source": r.source,
                "limit": limit,
                "bucket": bucket,
                "shadow_mode": r.shadow_mode,
                "debt": r.debt,
                "replaces": r.replaces,
            })
        })
        .collect();
    Json(json!({
        "path": s.rules.path().map(|p| p.display().to_string()),
        "rules": rules,
    }))
}

async fn config(State(s): State<DebugState>) -> Json<Value> {
    Json(Value::Object((*s.config).clone()))
}

#[derive(serde::Deserialize)]
struct TopQuery {
    n: Option<usize>,
}

/// The heaviest denied keys on this replica, decayed so that they show now.
async fn top(State(s): State<DebugState>, Query(q): Query<TopQuery>) -> Json<Value> {
    let n = q.n.unwrap_or(STATUS_TOP).min(MAX_TOP);
    Json(json!({
        "enabled": s.activity.top_enabled(),
        "half_life_s": crate::telemetry::top_keys::HALF_LIFE.as_secs(),
        "keys": top_keys(&s, n),
    }))
}
