//! A `tower::Layer` that holds one of a key's in-flight slots while each HTTP request is served:
//! acquired before the inner service is called, renewed while a long response runs, released
//! when the response body has been sent or dropped (or when the request is dropped first).

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use http::{HeaderValue, StatusCode, request::Parts};

use crate::layer::{DEGRADED, DegradedLog, json, unavailable};
use crate::{Client, Error, KeyError, Lease};

/// At most `max` requests per key served at once (see [`ConcurrencyLimitLayer::new`]).
///
/// A request beyond the limit is `429` with `Retry-After` and a JSON body saying how many are in
/// flight; a key that cannot be taken is the [`KeyError`]'s status; sluicegate refusing the
/// request (a key too long) is `400`; sluicegate unavailable is the client's
/// [`crate::FailureMode`]: served without a slot, or `503`, both marked `X-RateLimit-Degraded: 1`
/// and counted as the rate layer counts them.
///
/// The inner service finds the [`Lease`] in the request's extensions (`Extension<Lease>` in
/// axum): how many of the key's requests are in flight, this one included.
///
/// The slot is released when the response body has been sent or is dropped (a client that went
/// away), and when the request future is dropped before an answer. A process that dies holding
/// slots frees them after the lease TTL (default one minute: keep it above your longest request,
/// or let the layer renew: it renews every third of the TTL while the response runs).
pub struct ConcurrencyLimitLayer<K> {
    client: Client,
    key: K,
    max: u32,
    ttl: Duration,
    degraded: Arc<DegradedLog>,
}

impl<K: Clone> Clone for ConcurrencyLimitLayer<K> {
    fn clone(&self) -> Self {
        Self {
            client: self.client.clone(),
            key: self.key.clone(),
            max: self.max,
            ttl: self.ttl,
            degraded: self.degraded.clone(),
        }
    }
}

impl<K> ConcurrencyLimitLayer<K>
where
    K: Fn(&Parts) -> Result<String, KeyError> + Clone + Send + Sync + 'static,
{
    /// At most `max` requests of the key `key` takes from each request's head in flight at
    /// once, across every process sharing the sluicegate.
    ///
    /// ```
    /// use sluicegate_client::{Client, ConcurrencyLimitLayer, KeyError};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let client = Client::builder("http://127.0.0.1:8081").build().unwrap();
    /// let layer = ConcurrencyLimitLayer::new(client, 5, |req: &http::request::Parts| {
    ///     req.headers
    ///         .get("x-api-key")
    ///         .and_then(|v| v.to_str().ok())
    ///         .map(|k| format!("generations:{k}"))
    ///         .ok_or_else(|| KeyError::unauthorized("missing X-API-Key"))
    /// });
    /// // axum: Router::new().route("/generate", post(generate)).route_layer(layer)
    /// # let _ = layer;
    /// # }
    /// ```
    pub fn new(client: Client, max: u32, key: K) -> Self {
        Self {
            client,
            key,
            max: max.max(1),
            ttl: Duration::from_secs(60),
            degraded: Arc::default(),
        }
    }

    /// How long a slot outlives a process that died holding it (default 60 s; at most a day).
    pub fn lease_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl.max(Duration::from_millis(30));
        self
    }
}

impl<S, K: Clone> tower::Layer<S> for ConcurrencyLimitLayer<K> {
    type Service = ConcurrencyLimit<S, K>;

    fn layer(&self, inner: S) -> Self::Service {
        ConcurrencyLimit {
            inner,
            config: self.clone(),
        }
    }
}

/// The service [`ConcurrencyLimitLayer`] makes.
pub struct ConcurrencyLimit<S, K> {
    inner: S,
    config: ConcurrencyLimitLayer<K>,
}

impl<S: Clone, K: Clone> Clone for ConcurrencyLimit<S, K> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            config: self.config.clone(),
        }
    }
}

impl<S, K, ReqB, ResB> tower::Service<http::Request<ReqB>> for ConcurrencyLimit<S, K>
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
    type Response = http::Response<LeaseBody<ResB>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqB>) -> Self::Future {
        let ready = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, ready);
        Box::pin(hold(self.config.clone(), inner, req))
    }
}

/// One request through the layer: its key, a slot, then the service with the slot held by the
/// response body.
async fn hold<S, K, ReqB, ResB>(
    config: ConcurrencyLimitLayer<K>,
    mut inner: S,
    req: http::Request<ReqB>,
) -> Result<http::Response<LeaseBody<ResB>>, S::Error>
where
    S: tower::Service<http::Request<ReqB>, Response = http::Response<ResB>>,
    K: Fn(&Parts) -> Result<String, KeyError>,
    ResB: From<String>,
{
    let (mut parts, body) = req.into_parts();
    let key = match (config.key)(&parts) {
        Ok(key) => key,
        Err(e) => return Ok(json(e.status, &[("error", &e.message)], None)),
    };
    let lease = match acquire(&config, &key).await {
        Ok(lease) => lease,
        Err(answer) => return Ok(answer),
    };
    let degraded = lease.degraded;
    // The handler may say how many run (`Extension<Lease>` in axum).
    parts.extensions.insert(lease.clone());
    // Held from here: dropped with this future, the response's error, or the response body.
    let held = Held::start(config.client.clone(), lease, config.ttl);
    let response = inner.call(http::Request::from_parts(parts, body)).await?;
    let mut response = response.map(|inner| LeaseBody {
        inner,
        held: Some(held),
    });
    if degraded {
        response
            .headers_mut()
            .insert(DEGRADED, HeaderValue::from_static("1"));
    }
    Ok(response)
}

/// A slot for `key`, or the answer to give instead.
async fn acquire<K, B: From<String>>(
    config: &ConcurrencyLimitLayer<K>,
    key: &str,
) -> Result<Lease, http::Response<LeaseBody<B>>> {
    match config.client.acquire(key, config.max, config.ttl).await {
        Ok(lease) if lease.degraded => {
            config.degraded.record(lease.granted, None);
            if lease.granted {
                Ok(lease)
            } else {
                Err(unavailable())
            }
        }
        Ok(lease) if lease.granted => Ok(lease),
        Ok(lease) => Err(busy(&lease, config.max)),
        Err(Error::Rejected {
            code: tonic::Code::InvalidArgument,
            ..
        }) => Err(json(
            StatusCode::BAD_REQUEST,
            &[
                ("error", "bad request"),
                (
                    "detail",
                    "the identity cannot be a rate-limit key (empty, or over 512 bytes)",
                ),
            ],
            None,
        )),
        Err(e @ Error::Unavailable(_)) => {
            config.degraded.record(false, Some(&e));
            Err(unavailable())
        }
        Err(e) => {
            tracing::error!(error = %e, "sluicegate refused the lease; not serving");
            Err(json(
                StatusCode::INTERNAL_SERVER_ERROR,
                &[("error", "rate limiter refused the request")],
                None,
            ))
        }
    }
}

/// `429`: every slot is taken. `Retry-After: 1`: a slot comes back the moment any of the key's
/// requests ends, which nobody can know in advance (the lease's expiry, which sluicegate
/// answers, is only the latest it could be: the TTL, usually far off).
fn busy<B: From<String>>(lease: &Lease, max: u32) -> http::Response<B> {
    let retry = 1;
    let mut response = json(
        StatusCode::TOO_MANY_REQUESTS,
        &[("error", "too many requests in flight")],
        Some(("in_flight", u64::from(lease.in_flight))),
    );
    let h = response.headers_mut();
    h.insert("retry-after", HeaderValue::from(retry));
    h.insert("x-concurrency-limit", HeaderValue::from(max));
    response
}

/// A held slot: renewed in the background while it lives, released when dropped.
struct Held {
    client: Client,
    lease: Lease,
    renewing: Option<tokio::task::JoinHandle<()>>,
}

impl Held {
    fn start(client: Client, lease: Lease, ttl: Duration) -> Self {
        let renewing = lease.id.is_some().then(|| {
            let (client, lease) = (client.clone(), lease.clone());
            tokio::spawn(async move {
                let every = ttl / 3;
                loop {
                    tokio::time::sleep(every).await;
                    match client.renew(&lease, ttl).await {
                        Ok(true) => {}
                        Ok(false) => {
                            tracing::warn!(key = %lease.key, "an in-flight lease expired before its request finished");
                            return;
                        }
                        // Tried again at the next third; the TTL still has two thirds left.
                        Err(e) => tracing::debug!(error = %e, "renewing an in-flight lease failed"),
                    }
                }
            })
        });
        Self {
            client,
            lease,
            renewing,
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Some(task) = self.renewing.take() {
            task.abort();
        }
        if self.lease.id.is_none() {
            return;
        }
        // Outside a runtime (a process shutting down) nothing can be sent: the TTL frees it.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let (client, lease) = (self.client.clone(), self.lease.clone());
            runtime.spawn(async move {
                if let Err(e) = client.release(&lease).await {
                    tracing::debug!(error = %e, "releasing an in-flight lease failed; its TTL frees it");
                }
            });
        }
    }
}

pin_project_lite::pin_project! {
    /// A response body holding its request's in-flight slot: released when the body has been
    /// sent to its end or is dropped.
    pub struct LeaseBody<B> {
        #[pin]
        inner: B,
        held: Option<Held>,
    }
}

impl<B: From<String>> From<String> for LeaseBody<B> {
    fn from(s: String) -> Self {
        Self {
            inner: B::from(s),
            held: None,
        }
    }
}

impl<B: http_body::Body> http_body::Body for LeaseBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        if let Poll::Ready(None) = polled {
            // Sent to its end: the slot is free now, not when the connection lets go of it.
            this.held.take();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
