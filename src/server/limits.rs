//! Bounded work per caller, on the gRPC port: at most MAX_CONCURRENT_REQUESTS decision calls in
//! progress (beyond it a call is refused at once with RESOURCE_EXHAUSTED, never queued), and the
//! count of what was shed, including messages over GRPC_MAX_MESSAGE_BYTES (refused by tonic from
//! their length prefix, before any decoding).

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use tokio::sync::Semaphore;

use crate::telemetry::ShedMetrics;

/// Health checks and reflection are never shed: an overloaded replica must still say so.
fn exempt(path: &str) -> bool {
    path.starts_with("/grpc.health.") || path.starts_with("/grpc.reflection.")
}

#[derive(Clone)]
pub struct LimitLayer {
    permits: Arc<Semaphore>,
    max: usize,
    shed: ShedMetrics,
}

impl LimitLayer {
    pub fn new(max_concurrent: usize) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(max_concurrent)),
            max: max_concurrent,
            shed: ShedMetrics::default(),
        }
    }
}

impl<S> tower::Layer<S> for LimitLayer {
    type Service = Limit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Limit {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Limit<S> {
    inner: S,
    layer: LimitLayer,
}

impl<S, B> tower::Service<http::Request<B>> for Limit<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let permit = if exempt(req.uri().path()) {
            None
        } else {
            match self.layer.permits.clone().try_acquire_owned() {
                Ok(p) => Some(p),
                Err(_) => {
                    self.layer.shed.concurrency.increment(1);
                    let status = tonic::Status::resource_exhausted(format!(
                        "more than MAX_CONCURRENT_REQUESTS ({}) calls in progress; retry later",
                        self.layer.max
                    ));
                    return Box::pin(async move { Ok(status.into_http()) });
                }
            }
        };
        let shed = self.layer.shed.clone();
        let future = self.inner.call(req);
        Box::pin(async move {
            let response = future.await?;
            drop(permit);
            if too_large(response.headers()) {
                shed.message_size.increment(1);
            }
            Ok(response)
        })
    }
}

/// tonic's answer to a message over the limit: OUT_OF_RANGE, "message length too large".
fn too_large(headers: &http::HeaderMap) -> bool {
    headers.get("grpc-status").is_some_and(|s| s == "11")
        && headers
            .get("grpc-message")
            .and_then(|m| m.to_str().ok())
            .is_some_and(|m| m.contains("length%20too%20large") || m.contains("length too large"))
}
