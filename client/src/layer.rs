//! A `tower::Layer` that asks sluicegate before each HTTP request reaches the service it wraps.

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use http::{HeaderMap, HeaderValue, StatusCode, request::Parts};

use crate::{Client, Decision, Error, LeasePolicy, LeasedClient, Request};

/// Why no key could be taken from a request: answered with `status` and `message` (as JSON),
/// never a shared bucket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyError {
    /// The HTTP status to answer with (`401` for a missing identity, say).
    pub status: StatusCode,
    /// What the client should fix.
    pub message: String,
}

impl KeyError {
    /// A request without the identity its key needs: `401 Unauthorized`.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::UNAUTHORIZED,
            message: message.into(),
        }
    }
}

type Hook = Arc<dyn Fn(&Error) + Send + Sync>;

/// Limits a service by a key taken from each request (see [`RateLimitLayer::new`]).
///
/// On every limited answer: `X-RateLimit-Limit` (the bucket's size), `X-RateLimit-Remaining`
/// (whole tokens left) and `X-RateLimit-Reset` (seconds until full, never 0 on a denial). A
/// denial is `429` with `Retry-After` (whole seconds, rounded up) and a JSON body; a key that
/// cannot be taken is the [`KeyError`]'s status; sluicegate refusing the request (a key too long)
/// is `400`; sluicegate unavailable is the client's [`crate::FailureMode`]: served, or `503` with
/// `Retry-After`. An answer a failure mode gave (this client's or sluicegate's) carries
/// `X-RateLimit-Degraded: 1`, is counted in `sluicegate_client_degraded_total{answer}` (the
/// `metrics` facade: the application's recorder) and logged at warn, at most every 10 s.
///
/// Wrap the routes, not the fallback, so that a 404 costs nothing: in axum,
/// `Router::new().route(..).route_layer(layer)` rather than `.layer(layer)`.
pub struct RateLimitLayer<K> {
    client: Client,
    key: K,
    cost: u32,
    capacity: f64,
    rate: f64,
    near_limit_ratio: Option<f64>,
    on_unavailable: Option<Hook>,
    degraded: Arc<DegradedLog>,
    /// Decisions from leased quota instead of a call each ([`RateLimitLayer::leased`]).
    leased: Option<Arc<LeasedClient>>,
}

impl<K: Clone> Clone for RateLimitLayer<K> {
    fn clone(&self) -> Self {
        Self {
            client: self.client.clone(),
            key: self.key.clone(),
            cost: self.cost,
            capacity: self.capacity,
            rate: self.rate,
            near_limit_ratio: self.near_limit_ratio,
            on_unavailable: self.on_unavailable.clone(),
            degraded: self.degraded.clone(),
            leased: self.leased.clone(),
        }
    }
}

impl<K> RateLimitLayer<K>
where
    K: Fn(&Parts) -> Result<String, KeyError> + Clone + Send + Sync + 'static,
{
    /// Limits by the key `key` takes from each request's head (one token per request, the
    /// server's default bucket shape).
    ///
    /// ```
    /// use sluicegate_client::{Client, KeyError, RateLimitLayer};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let client = Client::builder("http://127.0.0.1:8081").build().unwrap();
    /// let layer = RateLimitLayer::new(client, |req: &http::request::Parts| {
    ///     req.headers
    ///         .get("x-api-key")
    ///         .and_then(|v| v.to_str().ok())
    ///         .map(|k| format!("key:{k}"))
    ///         .ok_or_else(|| KeyError::unauthorized("missing X-API-Key"))
    /// })
    /// .cost(1);
    /// // axum: Router::new().route(...).layer(layer)
    /// # let _ = layer;
    /// # }
    /// ```
    pub fn new(client: Client, key: K) -> Self {
        Self {
            client,
            key,
            cost: 1,
            capacity: 0.0,
            rate: 0.0,
            near_limit_ratio: None,
            on_unavailable: None,
            degraded: Arc::default(),
            leased: None,
        }
    }

    /// Decides from quota leased in advance ([`LeasedClient`]): a hot key's requests mostly need
    /// no call to sluicegate, and the limit still holds exactly across every process (the
    /// trade-off, tokens held unspent in a lease for up to its lifetime, is in
    /// [`LeasedClient`]'s docs). Beyond what the leases hold, the client's failure mode applies
    /// when sluicegate is unavailable.
    pub fn leased(mut self, policy: LeasePolicy) -> Self {
        self.leased = Some(Arc::new(LeasedClient::new(self.client.clone(), policy)));
        self
    }

    /// Tokens each request takes (default 1).
    pub fn cost(mut self, cost: u32) -> Self {
        self.cost = cost;
        self
    }

    /// The bucket shape to ask for (0: the server's defaults).
    pub fn shape(mut self, capacity: f64, rate: f64) -> Self {
        self.capacity = capacity;
        self.rate = rate;
        self
    }

    /// Warn before a 429: when an allowed request leaves less than `1 - ratio` of the bucket,
    /// the answer carries `X-RateLimit-Warning`.
    pub fn near_limit_ratio(mut self, ratio: f64) -> Self {
        self.near_limit_ratio = Some(ratio);
        self
    }

    /// Called when sluicegate is unavailable (before the failure mode answers): for a counter or a
    /// log line.
    pub fn on_unavailable(mut self, hook: impl Fn(&Error) + Send + Sync + 'static) -> Self {
        self.on_unavailable = Some(Arc::new(hook));
        self
    }
}

impl<S, K: Clone> tower::Layer<S> for RateLimitLayer<K> {
    type Service = RateLimit<S, K>;

    fn layer(&self, inner: S) -> Self::Service {
        RateLimit {
            inner,
            config: self.clone(),
        }
    }
}

/// The service [`RateLimitLayer`] makes.
pub struct RateLimit<S, K> {
    inner: S,
    config: RateLimitLayer<K>,
}

impl<S: Clone, K: Clone> Clone for RateLimit<S, K> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            config: self.config.clone(),
        }
    }
}

impl<S, K, ReqB, ResB> tower::Service<http::Request<ReqB>> for RateLimit<S, K>
where
    S: tower::Service<http::Request<ReqB>, Response = http::Response<ResB>>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
    K: Fn(&Parts) -> Result<String, KeyError> + Clone + Send + Sync + 'static,
    ReqB: Send + 'static,
    ResB: From<String> + Send + 'static,
{
    type Response = http::Response<ResB>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqB>) -> Self::Future {
        // The service that was polled ready serves this request; its clone waits for the next.
        let ready = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, ready);
        Box::pin(limit(self.config.clone(), inner, req))
    }
}

/// One request through the layer: its key, sluicegate's decision, then the service or an answer.
async fn limit<S, K, ReqB, ResB>(
    config: RateLimitLayer<K>,
    mut inner: S,
    req: http::Request<ReqB>,
) -> Result<http::Response<ResB>, S::Error>
where
    S: tower::Service<http::Request<ReqB>, Response = http::Response<ResB>>,
    K: Fn(&Parts) -> Result<String, KeyError>,
    ResB: From<String>,
{
    let (parts, body) = req.into_parts();
    let key = match (config.key)(&parts) {
        Ok(key) => key,
        Err(e) => return Ok(json(e.status, &[("error", &e.message)], None)),
    };
    let decision = match decide(&config, &key).await {
        Ok(d) => d,
        Err(answer) => return Ok(answer),
    };
    if !decision.allowed {
        return Ok(if decision.degraded {
            unavailable()
        } else {
            too_many(&decision)
        });
    }
    let mut response = inner.call(http::Request::from_parts(parts, body)).await?;
    if decision.degraded {
        // Served without a bucket's word: no figures to show, but say so.
        response
            .headers_mut()
            .insert(DEGRADED, HeaderValue::from_static("1"));
        return Ok(response);
    }
    headers(response.headers_mut(), &decision, false);
    if let Some(warning) = near_limit(&config, &decision) {
        response
            .headers_mut()
            .insert("x-ratelimit-warning", warning);
    }
    Ok(response)
}

/// sluicegate's decision for `key`, or the answer to give instead: 400 for a key sluicegate
/// refuses, 503 when it is unavailable and the failure mode says so, 500 for anything else it
/// refuses. A failure mode's answer (this client's or sluicegate's) is logged and counted.
async fn decide<K, B: From<String>>(
    config: &RateLimitLayer<K>,
    key: &str,
) -> Result<Decision, http::Response<B>> {
    let asked = Request {
        key,
        cost: config.cost,
        capacity: config.capacity,
        rate: config.rate,
        dry_run: false,
        up_to: false,
    };
    let decided = match &config.leased {
        Some(leased) => leased.decide(asked).await.map(|d| d.decision),
        None => config.client.check(asked).await,
    };
    match decided {
        Ok(d) if d.degraded => {
            config.degraded.record(d.allowed, None);
            if let Some(hook) = &config.on_unavailable {
                hook(&Error::Unavailable("a failure mode answered".into()));
            }
            Ok(d)
        }
        Ok(d) => Ok(d),
        Err(Error::Rejected {
            code: tonic::Code::InvalidArgument,
            message,
        }) => {
            // The key is the application's (a prefix and an identity): sluicegate's figures
            // count a prefix the caller never sent, so they would only confuse.
            let detail = if message.starts_with("key:") {
                "the identity cannot be a rate-limit key (empty, or over 512 bytes)"
            } else {
                &message
            };
            Err(json(
                StatusCode::BAD_REQUEST,
                &[("error", "bad request"), ("detail", detail)],
                None,
            ))
        }
        Err(e @ Error::Unavailable(_)) => {
            config.degraded.record(false, Some(&e));
            if let Some(hook) = &config.on_unavailable {
                hook(&e);
            }
            Err(unavailable())
        }
        Err(e) => {
            tracing::error!(error = %e, "sluicegate refused the decision; not serving");
            Err(json(
                StatusCode::INTERNAL_SERVER_ERROR,
                &[("error", "rate limiter refused the request")],
                None,
            ))
        }
    }
}

/// `429` with `Retry-After` (whole seconds, at least 1), the `X-RateLimit-*` headers and a body.
fn too_many<B: From<String>>(decision: &Decision) -> http::Response<B> {
    let retry = whole_seconds(decision.retry_after).max(1);
    let mut response = json(
        StatusCode::TOO_MANY_REQUESTS,
        &[("error", "rate limited")],
        Some(("retry_after_seconds", retry)),
    );
    headers(response.headers_mut(), decision, true);
    response
        .headers_mut()
        .insert("retry-after", HeaderValue::from(retry));
    response
}

/// `X-RateLimit-Warning` when an allowed request left less than `1 - near_limit_ratio` of the
/// bucket.
fn near_limit<K>(config: &RateLimitLayer<K>, decision: &Decision) -> Option<HeaderValue> {
    let ratio = config.near_limit_ratio?;
    if decision.tokens_remaining >= (1.0 - ratio) * decision.capacity {
        return None;
    }
    let warning = format!(
        "near limit: {} of {} left",
        decision.tokens_remaining.floor().max(0.0),
        decision.capacity
    );
    HeaderValue::from_str(&warning).ok()
}

/// The header every answer given without sluicegate's word carries.
pub(crate) const DEGRADED: &str = "x-ratelimit-degraded";

/// Counts and logs the answers a failure mode gave: `sluicegate_client_degraded_total{answer}`
/// through the `metrics` facade (whatever recorder the application installed), and a warning at
/// most every [`DegradedLog::EVERY`] with how many came since, so an outage cannot flood the log.
#[derive(Default)]
pub(crate) struct DegradedLog {
    /// Milliseconds since `start` of the last warning, plus one (0: never warned).
    last: AtomicU64,
    since: AtomicU64,
    start: OnceLock<Instant>,
}

impl DegradedLog {
    const EVERY: Duration = Duration::from_secs(10);

    pub(crate) fn record(&self, allowed: bool, error: Option<&Error>) {
        let answer = if allowed { "allowed" } else { "denied" };
        metrics::counter!("sluicegate_client_degraded_total", "answer" => answer).increment(1);
        let since = self.since.fetch_add(1, Relaxed) + 1;
        let start = *self.start.get_or_init(Instant::now);
        let now = start.elapsed().as_millis() as u64 + 1;
        let last = self.last.load(Relaxed);
        let due = last == 0 || now.saturating_sub(last) >= Self::EVERY.as_millis() as u64;
        if due
            && self
                .last
                .compare_exchange(last, now, Relaxed, Relaxed)
                .is_ok()
        {
            self.since.fetch_sub(since, Relaxed);
            let error = error.map_or_else(
                || "sluicegate answered degraded".to_string(),
                |e| e.to_string(),
            );
            tracing::warn!(
                answer,
                degraded_answers = since,
                %error,
                "rate limiter degraded: answering by the failure mode, not by a bucket"
            );
        }
    }
}

fn whole_seconds(d: Duration) -> u64 {
    d.as_millis().div_ceil(1000) as u64
}

/// `X-RateLimit-Limit`, `-Remaining`, `-Reset` (seconds until full; at least 1 on a denial, so a
/// client honouring it never retries at once).
fn headers(h: &mut HeaderMap, d: &Decision, denied: bool) {
    let reset = whole_seconds(d.reset_after).max(u64::from(denied));
    h.insert(
        "x-ratelimit-limit",
        HeaderValue::from(d.capacity.floor().max(0.0) as u64),
    );
    h.insert(
        "x-ratelimit-remaining",
        HeaderValue::from(d.tokens_remaining.floor().max(0.0) as u64),
    );
    h.insert("x-ratelimit-reset", HeaderValue::from(reset));
}

/// `503` for a request the failure mode denies: with `Retry-After` (a retry time, not "at
/// once") and the degraded header.
pub(crate) fn unavailable<B: From<String>>() -> http::Response<B> {
    let retry = whole_seconds(crate::FALLBACK_RETRY_AFTER).max(1);
    let mut response = json(
        StatusCode::SERVICE_UNAVAILABLE,
        &[("error", "rate limiter unavailable")],
        Some(("retry_after_seconds", retry)),
    );
    let h = response.headers_mut();
    h.insert("retry-after", HeaderValue::from(retry));
    h.insert(DEGRADED, HeaderValue::from_static("1"));
    response
}

/// A small JSON object response (the crate needs no JSON library for it).
pub(crate) fn json<B: From<String>>(
    status: StatusCode,
    strings: &[(&str, &str)],
    number: Option<(&str, u64)>,
) -> http::Response<B> {
    let mut fields: Vec<String> = strings
        .iter()
        .map(|(k, v)| format!("\"{k}\":\"{}\"", escape(v)))
        .collect();
    if let Some((k, n)) = number {
        fields.push(format!("\"{k}\":{n}"));
    }
    let mut response = http::Response::new(B::from(format!("{{{}}}", fields.join(","))));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert("content-type", HeaderValue::from_static("application/json"));
    response
}

fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_bodies_escape() {
        let r: http::Response<String> = json(
            StatusCode::BAD_REQUEST,
            &[("error", "a \"b\"\n")],
            Some(("n", 3)),
        );
        assert_eq!(r.body(), "{\"error\":\"a \\\"b\\\"\\u000a\",\"n\":3}");
    }

    #[test]
    fn reset_is_never_zero_on_a_denial() {
        let d = Decision {
            allowed: false,
            tokens_remaining: 0.0,
            retry_after: Duration::ZERO,
            reset_after: Duration::ZERO,
            capacity: 5.0,
            rate: 1.0,
            degraded: false,
            granted: 0,
        };
        let mut h = HeaderMap::new();
        headers(&mut h, &d, true);
        assert_eq!(h["x-ratelimit-reset"], "1");
        headers(&mut h, &d, false);
        assert_eq!(h["x-ratelimit-reset"], "0");
    }
}
