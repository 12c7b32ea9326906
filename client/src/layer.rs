//! A `tower::Layer` that asks sluicegate before each HTTP request reaches the service it wraps.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use http::{HeaderMap, HeaderValue, StatusCode, request::Parts};

use crate::{Client, Decision, Error, Request};

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
/// is `400`; sluicegate unavailable is the client's [`crate::FailureMode`]: served, or `503`.
pub struct RateLimitLayer<K> {
    client: Client,
    key: K,
    cost: u32,
    capacity: f64,
    rate: f64,
    near_limit_ratio: Option<f64>,
    on_unavailable: Option<Hook>,
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
        }
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
        let mut inner = std::mem::replace(&mut self.inner, ready);
        let config = self.config.clone();
        Box::pin(async move {
            let (parts, body) = req.into_parts();
            let key = match (config.key)(&parts) {
                Ok(key) => key,
                Err(e) => return Ok(json(e.status, &[("error", &e.message)], None)),
            };
            let asked = Request {
                key: &key,
                cost: config.cost,
                capacity: config.capacity,
                rate: config.rate,
                dry_run: false,
            };
            let decision = match config.client.check(asked).await {
                Ok(d) => d,
                Err(Error::Rejected {
                    code: tonic::Code::InvalidArgument,
                    message,
                }) => {
                    return Ok(json(
                        StatusCode::BAD_REQUEST,
                        &[("error", "bad request"), ("detail", &message)],
                        None,
                    ));
                }
                Err(e @ Error::Unavailable(_)) => {
                    if let Some(hook) = &config.on_unavailable {
                        hook(&e);
                    }
                    return Ok(unavailable());
                }
                Err(e) => {
                    tracing::error!(error = %e, "sluicegate refused the decision; not serving");
                    return Ok(json(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        &[("error", "rate limiter refused the request")],
                        None,
                    ));
                }
            };
            if decision.degraded {
                // A failure mode answered (this client's or sluicegate's).
                if let Some(hook) = &config.on_unavailable {
                    hook(&Error::Unavailable("a failure mode answered".into()));
                }
                if !decision.allowed {
                    return Ok(unavailable());
                }
                return inner.call(http::Request::from_parts(parts, body)).await;
            }
            if !decision.allowed {
                let retry = whole_seconds(decision.retry_after).max(1);
                let mut response = json(
                    StatusCode::TOO_MANY_REQUESTS,
                    &[("error", "rate limited")],
                    Some(("retry_after_seconds", retry)),
                );
                headers(response.headers_mut(), &decision, true);
                response
                    .headers_mut()
                    .insert("retry-after", HeaderValue::from(retry));
                return Ok(response);
            }
            let mut response = inner.call(http::Request::from_parts(parts, body)).await?;
            headers(response.headers_mut(), &decision, false);
            if let Some(ratio) = config.near_limit_ratio
                && decision.tokens_remaining < (1.0 - ratio) * decision.capacity
            {
                let warning = format!(
                    "near limit: {} of {} left",
                    decision.tokens_remaining.floor().max(0.0),
                    decision.capacity
                );
                if let Ok(v) = HeaderValue::from_str(&warning) {
                    response.headers_mut().insert("x-ratelimit-warning", v);
                }
            }
            Ok(response)
        })
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

fn unavailable<B: From<String>>() -> http::Response<B> {
    json(
        StatusCode::SERVICE_UNAVAILABLE,
        &[("error", "rate limiter unavailable")],
        None,
    )
}

/// A small JSON object response (the crate needs no JSON library for it).
fn json<B: From<String>>(
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
        };
        let mut h = HeaderMap::new();
        headers(&mut h, &d, true);
        assert_eq!(h["x-ratelimit-reset"], "1");
        headers(&mut h, &d, false);
        assert_eq!(h["x-ratelimit-reset"], "0");
    }
}
