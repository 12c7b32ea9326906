//! Bounded work per caller, on the gRPC port. A decision call is refused at once, before any
//! backend work, when it cannot be answered usefully:
//! - its deadline (`grpc-timeout`) leaves less than [`MIN_DEADLINE`], or has passed by the time
//!   the call gets its turn: DEADLINE_EXCEEDED (a decision made anyway would spend tokens for
//!   nobody);
//! - it waited for its turn longer than MAX_QUEUE_MS: RESOURCE_EXHAUSTED (reason `queue`);
//! - the calls in progress are at the adaptive limit (`adaptive.rs`; reason `adaptive`) or at
//!   MAX_CONCURRENT_REQUESTS (reason `concurrency`): RESOURCE_EXHAUSTED, never queued.
//!
//! On the Envoy API, under FAILURE_MODE allow or deny, a refused call is answered as that mode
//! answers instead (`shed_answer.rs`): Envoy fails open on any error.
//!
//! It also counts messages over GRPC_MAX_MESSAGE_BYTES (refused by tonic from their length
//! prefix, before any decoding).

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use super::adaptive::Adaptive;
use super::shed_answer::{ENVOY_PATH, envoy_answer};
use crate::telemetry::{FailureModeMetrics, ShedMetrics};

/// The least deadline a call may bring: below it, no decision reaches the caller in time (a
/// Redis round trip alone takes a good part of a millisecond).
pub const MIN_DEADLINE: std::time::Duration = std::time::Duration::from_millis(1);

/// A `grpc-timeout` header's value (`<up to 8 digits><H|M|S|m|u|n>`); None when absent or not
/// well formed (tonic then answers as it does).
fn grpc_timeout(headers: &http::HeaderMap) -> Option<std::time::Duration> {
    use std::time::Duration;
    let v = headers.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Health checks and reflection are never shed: an overloaded replica must still say so. Nor is
/// an Envoy's quota stream: opened once, it is what spares this replica a call per request.
fn exempt(path: &str) -> bool {
    path.starts_with("/grpc.health.")
        || path.starts_with("/grpc.reflection.")
        || path.starts_with("/envoy.service.rate_limit_quota.")
}

#[derive(Clone)]
pub struct LimitLayer {
    adaptive: Arc<Adaptive>,
    hard: usize,
    max_queue: Duration,
    shed: ShedMetrics,
    /// FAILURE_MODE's answer to a shed Envoy call (None: `error`, the shed's own status).
    envoy_fallback: Option<Arc<(bool, FailureModeMetrics)>>,
}

impl LimitLayer {
    /// At most `max_concurrent` calls in progress (fewer when the adaptive limit says so), none
    /// that waited longer than `max_queue`.
    pub fn new(max_concurrent: usize, max_queue: Duration) -> Self {
        let gauge = metrics::gauge!(crate::telemetry::names::CONCURRENCY_LIMIT);
        Self {
            adaptive: Arc::new(Adaptive::new(max_concurrent, max_queue, Some(gauge))),
            hard: max_concurrent,
            max_queue,
            shed: ShedMetrics::default(),
            envoy_fallback: None,
        }
    }

    /// Shed Envoy calls are answered as FAILURE_MODE answers (`Some(allowed)`), not as errors.
    pub fn envoy_failure_mode(mut self, fallback: Option<bool>) -> Self {
        self.envoy_fallback =
            fallback.map(|allowed| Arc::new((allowed, FailureModeMetrics::default())));
        self
    }
}

/// A shed call's answer: the status, or on the Envoy API FAILURE_MODE's verdict when it has one.
fn shed_answer(
    status: tonic::Status,
    fallback: Option<&(bool, FailureModeMetrics)>,
) -> http::Response<tonic::body::Body> {
    match fallback {
        Some((allowed, metrics)) => {
            metrics.record(*allowed);
            envoy_answer(*allowed)
        }
        None => status.into_http(),
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

type Answer<R, E> = Pin<Box<dyn Future<Output = Result<R, E>> + Send>>;

/// A call refused before any work: its answer, already made.
fn refused<E: Send + 'static>(
    response: http::Response<tonic::body::Body>,
) -> Answer<http::Response<tonic::body::Body>, E> {
    Box::pin(async move { Ok(response) })
}

impl<S, B> tower::Service<http::Request<B>> for Limit<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Answer<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if exempt(req.uri().path()) {
            return Box::pin(self.inner.call(req));
        }
        let layer = &self.layer;
        let deadline = grpc_timeout(req.headers());
        let fallback = (req.uri().path() == ENVOY_PATH)
            .then(|| layer.envoy_fallback.clone())
            .flatten();
        if let Some(d) = deadline.filter(|d| *d < MIN_DEADLINE) {
            layer.shed.deadline.increment(1);
            let status = tonic::Status::deadline_exceeded(format!(
                "a deadline of {d:?} leaves no time to decide (at least {MIN_DEADLINE:?})"
            ));
            return refused(shed_answer(status, fallback.as_deref()));
        }
        let Some(admitted) = layer.adaptive.try_admit() else {
            return refused(shed_answer(self.over_limit(), fallback.as_deref()));
        };
        let (max_queue, shed) = (layer.max_queue, layer.shed.clone());
        let future = self.inner.call(req);
        Box::pin(async move {
            // The first poll: the call has its turn. Refuse it if the wait took its deadline or
            // more than MAX_QUEUE_MS (nothing has been done for it yet).
            let waited = admitted.started.elapsed();
            if let Some(status) = waited_too_long(waited, deadline, max_queue, &shed) {
                return Ok(shed_answer(status, fallback.as_deref()));
            }
            let response = future.await?;
            drop(admitted);
            if too_large(response.headers()) {
                shed.message_size.increment(1);
            }
            Ok(response)
        })
    }
}

impl<S> Limit<S> {
    /// The calls in progress are at the limit: the adaptive one, or MAX_CONCURRENT_REQUESTS.
    fn over_limit(&self) -> tonic::Status {
        let (limit, hard) = (self.layer.adaptive.limit(), self.layer.hard);
        if limit >= hard {
            self.layer.shed.concurrency.increment(1);
            tonic::Status::resource_exhausted(format!(
                "more than MAX_CONCURRENT_REQUESTS ({hard}) calls in progress; retry later"
            ))
        } else {
            self.layer.shed.adaptive.increment(1);
            tonic::Status::resource_exhausted(format!(
                "more than {limit} calls in progress (the adaptive limit: answers are slower than MAX_QUEUE_MS); retry later"
            ))
        }
    }
}

/// A call that waited `waited` for its turn: refused when that took its deadline or MAX_QUEUE_MS.
fn waited_too_long(
    waited: Duration,
    deadline: Option<Duration>,
    max_queue: Duration,
    shed: &ShedMetrics,
) -> Option<tonic::Status> {
    if deadline.is_some_and(|d| waited + MIN_DEADLINE > d) {
        shed.deadline.increment(1);
        return Some(tonic::Status::deadline_exceeded(format!(
            "the deadline passed while the call waited ({waited:?})"
        )));
    }
    (waited > max_queue).then(|| {
        shed.queue.increment(1);
        tonic::Status::resource_exhausted(format!(
            "the call waited {waited:?}, longer than MAX_QUEUE_MS ({max_queue:?}); retry later"
        ))
    })
}

/// tonic's answer to a message over the limit: OUT_OF_RANGE, "message length too large".
fn too_large(headers: &http::HeaderMap) -> bool {
    headers.get("grpc-status").is_some_and(|s| s == "11")
        && headers
            .get("grpc-message")
            .and_then(|m| m.to_str().ok())
            .is_some_and(|m| m.contains("length%20too%20large") || m.contains("length too large"))
}

#[cfg(test)]
mod tests {
    use super::grpc_timeout;
    use std::time::Duration;

    #[test]
    fn grpc_timeouts_parse_as_the_protocol_writes_them() {
        let parse = |v: &str| {
            let mut h = http::HeaderMap::new();
            h.insert("grpc-timeout", v.parse().unwrap());
            grpc_timeout(&h)
        };
        assert_eq!(parse("20m"), Some(Duration::from_millis(20)));
        assert_eq!(parse("999u"), Some(Duration::from_micros(999)));
        assert_eq!(parse("0n"), Some(Duration::ZERO));
        assert_eq!(parse("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse("1H"), Some(Duration::from_secs(3600)));
        for bad in ["", "m", "123456789m", "12x", "-1m", "1.5m"] {
            assert_eq!(parse(bad), None, "{bad}");
        }
        assert_eq!(grpc_timeout(&http::HeaderMap::new()), None);
    }
}
