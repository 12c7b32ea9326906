//! `tollgate.v1.RateLimitService/ShouldAllow`: one key, one bucket, one decision.

use std::time::Instant;

use tonic::{Request, Response, Status};

use super::ApiError;
use crate::backend::{Backend, BucketRequest};
use crate::core::{Decision, FailureMode, Limits, Op, Shape};
use crate::proto::tollgate::v1::{
    ShouldAllowRequest, ShouldAllowResponse, rate_limit_service_server::RateLimitService,
};
use crate::telemetry::{DecisionMetrics, FailureModeMetrics};

/// The longest key accepted, in bytes.
pub const MAX_KEY_BYTES: usize = 512;

/// What ShouldAllow fills in for what a request leaves out, and what it refuses.
#[derive(Clone, Debug)]
pub struct Defaults {
    pub shape: Shape,
    pub limits: Limits,
    pub bucket_prefix: String,
    pub failure_mode: FailureMode,
    pub shadow_mode: bool,
}

/// The ShouldAllow service over any backend.
pub struct ShouldAllowApi<B> {
    backend: B,
    defaults: Defaults,
    metrics: DecisionMetrics,
    failure_metrics: FailureModeMetrics,
}

impl<B: Backend> ShouldAllowApi<B> {
    pub fn new(backend: B, defaults: Defaults) -> Self {
        Self {
            backend,
            defaults,
            metrics: DecisionMetrics::new("should_allow"),
            failure_metrics: FailureModeMetrics::default(),
        }
    }

    /// Checks a request and turns it into a bucket key, shape and operation.
    fn parse(&self, req: &ShouldAllowRequest) -> Result<(String, Shape, Op), ApiError> {
        if req.key.is_empty() {
            return Err(ApiError::invalid("key", "must not be empty"));
        }
        if req.key.len() > MAX_KEY_BYTES {
            return Err(ApiError::invalid(
                "key",
                format!(
                    "must be at most {MAX_KEY_BYTES} bytes, got {}",
                    req.key.len()
                ),
            ));
        }
        let d = &self.defaults;
        let capacity = if req.capacity == 0.0 {
            d.shape.capacity()
        } else {
            req.capacity
        };
        let rate = if req.rate == 0.0 {
            d.shape.rate()
        } else {
            req.rate
        };
        let shape = Shape::within(capacity, rate, &d.limits)?;
        let cost = req.cost.max(1);
        if f64::from(cost) > shape.capacity() {
            return Err(ApiError::invalid(
                "cost",
                format!(
                    "{cost} exceeds the bucket capacity {} and could never be allowed",
                    shape.capacity()
                ),
            ));
        }
        let op = if req.dry_run {
            // Answers as a request of this cost would be answered (at least 1 token).
            Op::Check(u64::from(cost))
        } else {
            Op::Take(u64::from(cost))
        };
        let mut key = String::with_capacity(d.bucket_prefix.len() + req.key.len());
        key.push_str(&d.bucket_prefix);
        key.push_str(&req.key);
        Ok((key, shape, op))
    }

    /// Decides one request: the whole of ShouldAllow but the proto envelope.
    pub async fn should_allow(
        &self,
        req: &ShouldAllowRequest,
    ) -> Result<ShouldAllowResponse, ApiError> {
        let started = Instant::now();
        let (key, shape, op) = self.parse(req)?;
        let result = self
            .backend
            .decide(BucketRequest::new(&key, shape, op))
            .await;
        match result {
            Ok(decision) => {
                self.metrics.record(Some(decision.allowed), started);
                Ok(self.answer(decision, shape))
            }
            Err(e) => {
                self.metrics.record(None, started);
                match self.defaults.failure_mode.fallback_allowed() {
                    Some(allowed) => {
                        // Per call at debug only: an outage would flood the log; health logs the transition.
                        tracing::debug!(error = %e, allowed, "backend failed; FAILURE_MODE answered");
                        self.failure_metrics.record(allowed);
                        Ok(ShouldAllowResponse {
                            // SHADOW_MODE holds for a FAILURE_MODE=deny answer too.
                            allowed: allowed || self.defaults.shadow_mode,
                            capacity: shape.capacity(),
                            rate: shape.rate(),
                            degraded: true,
                            ..Default::default()
                        })
                    }
                    None => {
                        tracing::debug!(error = %e, "backend failed; answering UNAVAILABLE");
                        Err(ApiError::Backend(e))
                    }
                }
            }
        }
    }

    fn answer(&self, d: Decision, shape: Shape) -> ShouldAllowResponse {
        // Shadow mode: the bucket was charged and the decision counted; the caller is never held.
        let allowed = d.allowed || self.defaults.shadow_mode;
        ShouldAllowResponse {
            allowed,
            tokens_remaining: d.tokens_remaining,
            retry_after_ms: if allowed { 0 } else { d.retry_after_ms },
            reset_after_ms: d.reset_after_ms,
            capacity: shape.capacity(),
            rate: shape.rate(),
            degraded: false,
        }
    }
}

#[tonic::async_trait]
impl<B: Backend> RateLimitService for ShouldAllowApi<B> {
    async fn should_allow(
        &self,
        request: Request<ShouldAllowRequest>,
    ) -> Result<Response<ShouldAllowResponse>, Status> {
        let answer = ShouldAllowApi::should_allow(self, request.get_ref()).await?;
        Ok(Response::new(answer))
    }
}
